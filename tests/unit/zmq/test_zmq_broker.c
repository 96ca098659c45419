/* The ZeroMQ broker at the SPI level: URIs and options, the hub and its
 * peers in both modes (loopback delivery, upstream publishing, reliable
 * delivery to peers), publish acks and flush, the in-flight window,
 * subscription sync, unsubscribe from inside a delivery, close, and
 * allocation faults on open. tcp on 127.0.0.1 port 0, ipc in a fresh
 * directory, inproc. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "testing.h"
#include "zmq_test_util.h"

static char *g_dir;

static int
group_setup(void **state)
{
    (void)state;
    g_dir = bt_mkdtemp("bus-zmq-broker");
    return g_dir == NULL ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    bt_rmtree(g_dir);
    free(g_dir);
    return 0;
}

/* ---- URIs and options -----------------------------------------------------
 */

static void
test_unknown_or_bad_options_fail_the_open(void **state)
{
    static const char *const bad[] = {
        "zmq+tcp://127.0.0.1:0?bogus=1",
        "zmq+tcp://127.0.0.1:0?mode=lossy",
        "zmq+tcp://127.0.0.1:0?hwm=-1",
        "zmq+tcp://127.0.0.1:0?window=0",
        "zmq+tcp://127.0.0.1:0?bind=maybe",
        "zmq+tcp://127.0.0.1:0?backpressure=wait",
        "zmq+tcp://127.0.0.1",
        "zmq+tcp://127.0.0.1:0/path",
        "zmq+ipc://relative/path",
        "zmq+inproc://",
        "zmq+tcp://127.0.0.1:0?wait_subscriber=10&bind=0",
        "zmq+tcp://127.0.0.1:0?routing_id=me",
        "zmq+tcp://127.0.0.1:0?dead_letter=not..a.topic",
        "zmq+tcp://127.0.0.1:0?curve_allow_any=1",
        "zmq+tcp://127.0.0.1:0?bind=0&curve_secret_key=short",
        "zmq+tcp://127.0.0.1:0?curve_secret_key_file=/nonexistent/key",
    };
    char err[256];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        int rv = zt_open_rv(bad[i], err, sizeof(err));
        if (rv == BUS_OK)
            fail_msg("%s opened", bad[i]);
        if (err[0] == '\0')
            fail_msg("%s: no reason given", bad[i]);
    }
    assert_int_equal(
        zt_open_rv("zmq+tcp://127.0.0.1:0?bogus=1", err, sizeof(err)),
        BUS_EINVAL);
    assert_non_null(strstr(err, "bogus"));
}

static void
test_port_zero_reads_back_the_bound_endpoint(void **state)
{
    bus_broker *b = zt_open("zmq+tcp://127.0.0.1:0");
    const char *ep = bus_broker_zmq_endpoint(b);

    (void)state;
    assert_non_null(ep);
    assert_int_equal(strncmp(ep, "tcp://127.0.0.1:", 16), 0);
    assert_true(strcmp(ep + 16, "0") != 0);
    assert_string_equal(bus_broker_scheme(b), "zmq+tcp");
    assert_null(bus_broker_zmq_endpoint(NULL));
    bus_broker_close(b);
}

static void
test_two_binds_on_one_port_fail_with_unavail(void **state)
{
    bus_broker *b = zt_open("zmq+tcp://127.0.0.1:0");
    char uri[300], err[256];

    (void)state;
    snprintf(uri, sizeof(uri), "zmq+%s", bus_broker_zmq_endpoint(b));
    assert_int_equal(zt_open_rv(uri, err, sizeof(err)), BUS_EUNAVAIL);
    bus_broker_close(b);
}

/* ---- Fanout ---------------------------------------------------------------
 */

static void
fanout_loopback(const char *uri)
{
    bus_broker *b = zt_open(uri);
    zt_rec all, some, none;
    bus_broker_zmq_stats st;
    uint64_t i, n = 2000;

    zt_rec_init(&all, b);
    zt_rec_init(&some, b);
    zt_rec_init(&none, b);
    zt_sub(b, ">", &all);
    zt_sub(b, "lb.*.c", &some);
    zt_sub(b, "other.>", &none);
    /* subscribe returned: the hub has the subscriptions (sync). */
    for (i = 0; i < n; i++)
        assert_int_equal(zt_publish(b, i % 2 ? "lb.b.c" : "lb.b.d", i, 0),
                         BUS_OK);
    assert_true(zt_wait(&all.n, n, ZT_WAIT_MS));
    assert_true(zt_wait(&some.n, n / 2, ZT_WAIT_MS));
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    st = zt_stats(b);
    assert_int_equal(st.published, n);
    assert_int_equal(st.sent, n);
    assert_int_equal(st.dropped_hwm + st.dropped_late, 0);
    assert_int_equal(atomic_load(&all.out_of_order), 0);
    assert_int_equal(atomic_load(&some.out_of_order), 0);
    assert_int_equal(atomic_load(&all.zero_tokens), n); /* no acks */
    bus_broker_close(b);
    assert_int_equal(atomic_load(&all.n), n);
    assert_int_equal(atomic_load(&some.n), n / 2);
    assert_int_equal(atomic_load(&none.n), 0);
    zt_rec_fini(&all);
    zt_rec_fini(&some);
    zt_rec_fini(&none);
}

static void
test_fanout_loopback_tcp(void **state)
{
    (void)state;
    fanout_loopback("zmq+tcp://127.0.0.1:0");
}

static void
test_fanout_loopback_ipc(void **state)
{
    char uri[512];

    (void)state;
    snprintf(uri, sizeof(uri), "zmq+ipc://%s/fan.sock", g_dir);
    fanout_loopback(uri);
}

static void
test_fanout_loopback_inproc(void **state)
{
    (void)state;
    fanout_loopback("zmq+inproc://fanout-loop");
}

static void
test_fanout_peer_receives_and_publishes_through_the_hub(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0");
    bus_broker *peer = zt_open_peer(hub, "");
    zt_rec at_peer, at_hub;
    bus_broker_zmq_stats st;
    uint64_t i;

    (void)state;
    zt_rec_init(&at_peer, peer);
    zt_rec_init(&at_hub, hub);
    zt_sub(peer, "to.peer.>", &at_peer);
    zt_sub(hub, "to.hub.>", &at_hub);
    for (i = 0; i < 100; i++) {
        assert_int_equal(zt_publish(hub, "to.peer.x", i, 0), BUS_OK);
        assert_int_equal(zt_publish(peer, "to.hub.y", i, 0), BUS_OK);
    }
    assert_true(zt_wait(&at_peer.n, 100, ZT_WAIT_MS));
    assert_true(zt_wait(&at_hub.n, 100, ZT_WAIT_MS));
    assert_string_equal(at_peer.topic, "to.peer.x");
    assert_string_equal(at_hub.topic, "to.hub.y");
    st = zt_stats(hub);
    assert_int_equal(st.forwarded, 100);
    assert_int_equal(st.dropped_upstream, 0);
    assert_int_equal(st.bad_frames, 0);
    assert_true(st.subscribers >= 2);
    bus_broker_close(peer);
    bus_broker_close(hub);
    assert_int_equal(atomic_load(&at_peer.out_of_order), 0);
    assert_int_equal(atomic_load(&at_hub.out_of_order), 0);
    zt_rec_fini(&at_peer);
    zt_rec_fini(&at_hub);
}

static void
test_fanout_late_events_are_counted(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://late");
    zt_rec r;
    zt_acks a = {0};
    bus_event *e;
    uint64_t i;

    (void)state;
    zt_rec_init(&r, b);
    for (i = 0; i < 10; i++) { /* nobody listens yet */
        e = zt_event(i);
        assert_int_equal(bus_broker_publish(b, "late.x", e, 0, zt_ack_fn, &a),
                         BUS_OK);
    }
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), 10); /* as mem://: BUS_OK */
    assert_int_equal(zt_stats(b).dropped_late, 10);
    zt_sub(b, "late.>", &r);
    assert_int_equal(zt_publish(b, "late.x", 10, 0), BUS_OK);
    assert_true(zt_wait(&r.n, 1, ZT_WAIT_MS));
    assert_int_equal(zt_stats(b).dropped_late, 10);
    bus_broker_close(b);
    zt_rec_fini(&r);
}

static void
test_wait_subscriber_holds_publishes_until_a_subscription(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?wait_subscriber=10000");
    bus_broker *peer;
    zt_rec r;
    uint64_t i;

    (void)state;
    for (i = 0; i < 50; i++) /* before any subscriber exists */
        assert_int_equal(zt_publish(hub, "wj.x", i, 0), BUS_OK);
    peer = zt_open_peer(hub, "");
    zt_rec_init(&r, peer);
    zt_sub(peer, "wj.>", &r);
    assert_true(zt_wait(&r.n, 50, ZT_WAIT_MS));
    assert_int_equal(zt_stats(hub).dropped_late, 0);
    assert_int_equal(bus_broker_zmq_wait_subscribers(hub, 1, 1000), BUS_OK);
    assert_int_equal(bus_broker_zmq_wait_subscribers(hub, 99, 10),
                     BUS_ETIMEDOUT);
    bus_broker_close(peer);
    bus_broker_close(hub);
    assert_int_equal(atomic_load(&r.out_of_order), 0);
    zt_rec_fini(&r);
}

/* ---- Reliable ---------------------------------------------------------------
 */

static void
test_reliable_publish_ack_waits_for_the_receiver(void **state)
{
    bus_broker *b = zt_open("zmq+tcp://127.0.0.1:0?mode=reliable");
    zt_rec r;
    zt_acks a = {0};
    bus_event *e;
    uint64_t i;

    (void)state;
    zt_rec_init(&r, b);
    atomic_store(&r.ack, false);
    zt_sub(b, "rel.>", &r);
    for (i = 0; i < 5; i++) {
        e = zt_event(i);
        assert_int_equal(bus_broker_publish(b, "rel.a", e, 0, zt_ack_fn, &a),
                         BUS_OK);
    }
    assert_true(zt_wait(&r.n, 5, ZT_WAIT_MS));
    assert_int_equal(atomic_load(&r.tokens), 5);
    assert_int_equal(bus_broker_flush(b, 50), BUS_ETIMEDOUT);
    assert_int_equal(atomic_load(&a.ok), 0); /* nobody acked yet */
    zt_ack_kept(&r, BUS_ACK);
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), 5);
    assert_int_equal(zt_stats(b).acked, 10); /* 5 sent + 5 received */
    bus_broker_close(b);
    zt_rec_fini(&r);
}

static void
test_reliable_full_window_applies_backpressure(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://win?mode=reliable&window=4"
                            "&block_timeout_ms=50");
    zt_rec r;
    uint64_t t0;
    uint64_t i;

    (void)state;
    zt_rec_init(&r, b);
    atomic_store(&r.ack, false);
    zt_sub(b, "w.>", &r);
    for (i = 0; i < 4; i++)
        assert_int_equal(zt_publish(b, "w.x", i, 0), BUS_OK);
    assert_int_equal(zt_publish(b, "w.x", 4, BUS_PUB_NONBLOCK), BUS_EAGAIN);
    t0 = bt_now_ns();
    assert_int_equal(zt_publish(b, "w.x", 4, 0), BUS_EAGAIN);
    assert_true(bt_now_ns() - t0 >= 40000000u); /* blocked ~50 ms */
    assert_int_equal(zt_stats(b).inflight, 4);
    assert_true(zt_wait(&r.n, 4, ZT_WAIT_MS));
    zt_ack_kept(&r, BUS_ACK);
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(zt_publish(b, "w.x", 4, BUS_PUB_NONBLOCK), BUS_OK);
    assert_true(zt_wait(&r.n, 5, ZT_WAIT_MS));
    zt_ack_kept(&r, BUS_ACK);
    bus_broker_close(b);
    zt_rec_fini(&r);

    /* backpressure=fail: a full window refuses at once, however long
     * block_timeout_ms is */
    b = zt_open("zmq+inproc://winfail?mode=reliable&window=2"
                "&backpressure=fail&block_timeout_ms=60000");
    zt_rec_init(&r, b);
    atomic_store(&r.ack, false);
    zt_sub(b, "w.>", &r);
    for (i = 0; i < 2; i++)
        assert_int_equal(zt_publish(b, "w.x", i, 0), BUS_OK);
    t0 = bt_now_ns();
    assert_int_equal(zt_publish(b, "w.x", 2, 0), BUS_EAGAIN);
    assert_true(bt_now_ns() - t0 < 5000000000u);
    assert_true(zt_wait(&r.n, 2, ZT_WAIT_MS));
    zt_ack_kept(&r, BUS_ACK);
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(zt_publish(b, "w.x", 2, 0), BUS_OK);
    assert_true(zt_wait(&r.n, 3, ZT_WAIT_MS));
    zt_ack_kept(&r, BUS_ACK);
    bus_broker_close(b);
    zt_rec_fini(&r);
}

static void
reliable_peer(const char *uri)
{
    bus_broker *hub = zt_open(uri);
    bus_broker *peer = zt_open_peer(hub, "mode=reliable");
    zt_rec at_peer, at_hub;
    zt_acks a = {0}, pa = {0};
    bus_broker_zmq_stats st;
    bus_event *e;
    uint64_t i, n = 500;

    zt_rec_init(&at_peer, peer);
    zt_rec_init(&at_hub, hub);
    zt_sub(peer, "to.peer.>", &at_peer);
    zt_sub(hub, "to.hub.>", &at_hub);
    for (i = 0; i < n; i++) {
        e = zt_event(i);
        assert_int_equal(
            bus_broker_publish(hub, "to.peer.x", e, 0, zt_ack_fn, &a), BUS_OK);
        e = zt_event(i);
        assert_int_equal(
            bus_broker_publish(peer, "to.hub.y", e, 0, zt_ack_fn, &pa), BUS_OK);
    }
    assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(bus_broker_flush(peer, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), n);
    assert_int_equal(atomic_load(&pa.ok), n);
    assert_int_equal(atomic_load(&at_peer.n), n);
    assert_int_equal(atomic_load(&at_hub.n), n);
    assert_int_equal(atomic_load(&at_peer.dups), 0);
    assert_int_equal(atomic_load(&at_peer.out_of_order), 0);
    assert_int_equal(atomic_load(&at_hub.out_of_order), 0);
    st = zt_stats(hub);
    assert_int_equal(st.bad_frames, 0);
    assert_int_equal(st.unrouted, 0);
    bus_broker_close(peer);
    bus_broker_close(hub);
    zt_rec_fini(&at_peer);
    zt_rec_fini(&at_hub);
}

static void
test_reliable_peer_and_hub_exchange_tcp(void **state)
{
    (void)state;
    reliable_peer("zmq+tcp://127.0.0.1:0?mode=reliable");
}

static void
test_reliable_peer_and_hub_exchange_ipc(void **state)
{
    char uri[512];

    (void)state;
    snprintf(uri, sizeof(uri), "zmq+ipc://%s/rel.sock?mode=reliable", g_dir);
    reliable_peer(uri);
}

static void
test_reliable_peer_and_hub_exchange_inproc(void **state)
{
    (void)state;
    reliable_peer("zmq+inproc://relpeer?mode=reliable");
}

static void
test_reliable_retry_result_redelivers(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://retry?mode=reliable");
    zt_rec r;

    (void)state;
    zt_rec_init(&r, b);
    atomic_store(&r.ack_result, BUS_RETRY);
    zt_sub(b, "rt.>", &r);
    assert_int_equal(zt_publish(b, "rt.x", 7, 0), BUS_OK);
    assert_true(zt_wait(&r.n, 3, ZT_WAIT_MS)); /* redelivered */
    atomic_store(&r.ack_result, BUS_ACK);
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_true(atomic_load(&r.dups) >= 2); /* the same event again */
    bus_broker_close(b);
    zt_rec_fini(&r);
}

static void
test_reliable_refused_deliveries_wait_in_order(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://refuse?mode=reliable");
    zt_rec r;
    uint64_t i;

    (void)state;
    zt_rec_init(&r, b);
    atomic_store(&r.rv, BUS_EAGAIN); /* a full queue */
    zt_sub(b, "rf.>", &r);
    for (i = 0; i < 100; i++)
        assert_int_equal(zt_publish(b, "rf.x", i, 0), BUS_OK);
    assert_true(zt_wait(&r.calls, 3, ZT_WAIT_MS));
    atomic_store(&r.rv, BUS_OK);
    assert_true(zt_wait(&r.n, 100, ZT_WAIT_MS));
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&r.out_of_order), 0);
    assert_int_equal(atomic_load(&r.dups), 0);
    bus_broker_close(b);
    zt_rec_fini(&r);
}

/* ---- Subscriptions, close -------------------------------------------------
 */

typedef struct self_unsub {
    zt_rec r;
    _Atomic uint64_t after;
    atomic_bool gone;
} self_unsub;

static int
self_unsub_deliver(void *opaque, const char *topic, bus_event *ev,
                   uint64_t token, unsigned flags)
{
    self_unsub *s = opaque;

    if (atomic_load(&s->gone))
        atomic_fetch_add(&s->after, 1);
    zt_deliver(&s->r, topic, ev, token, flags);
    if (!atomic_load(&s->gone)) {
        atomic_store(&s->gone, true);
        bus__broker_unsubscribe(s->r.b, atomic_load(&s->r.handle));
    }
    return BUS_OK;
}

static void
unsubscribe_inside(const char *uri)
{
    bus_broker *b = zt_open(uri);
    self_unsub s;
    zt_rec other;
    void *h = NULL;
    uint64_t i;

    memset(&s, 0, sizeof(s));
    zt_rec_init(&s.r, b);
    zt_rec_init(&other, b);
    zt_sub(b, "un.>", &other);
    assert_int_equal(
        bus__broker_subscribe(b, "un.>", NULL, self_unsub_deliver, &s, &h),
        BUS_OK);
    atomic_store(&s.r.handle, h);
    for (i = 0; i < 50; i++)
        assert_int_equal(zt_publish(b, "un.x", i, 0), BUS_OK);
    assert_true(zt_wait(&other.n, 50, ZT_WAIT_MS));
    assert_int_equal(atomic_load(&s.r.n), 1);
    assert_int_equal(atomic_load(&s.after), 0);
    assert_int_equal(bus_broker_flush(b, ZT_WAIT_MS), BUS_OK);
    bus_broker_close(b);
    zt_rec_fini(&s.r);
    zt_rec_fini(&other);
}

static void
test_unsubscribe_from_inside_its_delivery(void **state)
{
    (void)state;
    unsubscribe_inside("zmq+inproc://unsub-f");
    unsubscribe_inside("zmq+inproc://unsub-r?mode=reliable");
}

static void
test_closed_broker_refuses_publish_and_keeps_the_event(void **state)
{
    static const char *const uris[] = {"zmq+tcp://127.0.0.1:0",
                                       "zmq+tcp://127.0.0.1:0?mode=reliable"};
    size_t k;

    (void)state;
    for (k = 0; k < 2; k++) {
        bus_broker *b = zt_open(uris[k]);
        bus_event *e = zt_event(1);
        bus_broker_close_async(b);
        bus_broker_close_async(b);
        assert_int_equal(bus_broker_publish(b, "c.x", e, 0, NULL, NULL),
                         BUS_ECLOSED);
        assert_int_equal(bus_event_refcount(e), 1);
        bus_broker_close(b);
        bus_event_unref(e);
    }
}

static void
test_unacked_reliable_events_fail_with_eclosed_at_close(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://unacked?mode=reliable&linger=0");
    zt_rec r;
    zt_acks a = {0};
    uint64_t i;

    (void)state;
    zt_rec_init(&r, b);
    atomic_store(&r.ack, false);
    zt_sub(b, "ua.>", &r);
    for (i = 0; i < 3; i++) {
        bus_event *e = zt_event(i);
        assert_int_equal(bus_broker_publish(b, "ua.x", e, 0, zt_ack_fn, &a),
                         BUS_OK);
    }
    assert_true(zt_wait(&r.n, 3, ZT_WAIT_MS));
    zt_unsub(&r);
    bus_broker_close(b);
    assert_int_equal(atomic_load(&a.ok) + atomic_load(&a.failed), 3);
    zt_rec_fini(&r);
}

static void
test_open_survives_allocation_failures(void **state)
{
    uint64_t n;
    int rv = BUS_ENOMEM;

    (void)state;
    for (n = 1; n < 200 && rv != BUS_OK; n++) {
        bus_broker *b = NULL;
        char err[256];
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_broker_open_uri(&b, "zmq+inproc://faults?mode=reliable", err,
                                 sizeof(err));
        bus_fault_alloc_fail_nth(0, false);
        if (rv != BUS_OK) {
            assert_null(b);
            assert_int_equal(rv, BUS_ENOMEM);
            continue;
        }
        bus_broker_close(b);
    }
    assert_int_equal(rv, BUS_OK);
    bus_failpoint_set("zmq.socket", BUS_ENOMEM, 1, false);
    assert_int_equal(zt_open_rv("zmq+inproc://faults2", NULL, 0), BUS_ENOMEM);
    bus_failpoint_set("zmq.ctx", BUS_ENOMEM, 1, false);
    assert_int_equal(zt_open_rv("zmq+inproc://faults3", NULL, 0), BUS_ENOMEM);
    bus_failpoint_clear_all();
}

static void
test_publish_failpoint_keeps_the_event(void **state)
{
    bus_broker *b = zt_open("zmq+inproc://pubfault");
    bus_event *e = zt_event(3);

    (void)state;
    bus_failpoint_set("zmq.msg", BUS_ENOMEM, 1, false);
    assert_int_equal(bus_broker_publish(b, "pf.x", e, 0, NULL, NULL),
                     BUS_ENOMEM);
    assert_int_equal(bus_event_refcount(e), 1);
    assert_int_equal(zt_stats(b).inflight, 0); /* the credit came back */
    assert_int_equal(bus_broker_publish(b, "pf.x", e, 0, NULL, NULL), BUS_OK);
    bus_failpoint_clear_all();
    bus_broker_close(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unknown_or_bad_options_fail_the_open),
        cmocka_unit_test(test_port_zero_reads_back_the_bound_endpoint),
        cmocka_unit_test(test_two_binds_on_one_port_fail_with_unavail),
        cmocka_unit_test(test_fanout_loopback_tcp),
        cmocka_unit_test(test_fanout_loopback_ipc),
        cmocka_unit_test(test_fanout_loopback_inproc),
        cmocka_unit_test(
            test_fanout_peer_receives_and_publishes_through_the_hub),
        cmocka_unit_test(test_fanout_late_events_are_counted),
        cmocka_unit_test(
            test_wait_subscriber_holds_publishes_until_a_subscription),
        cmocka_unit_test(test_reliable_publish_ack_waits_for_the_receiver),
        cmocka_unit_test(test_reliable_full_window_applies_backpressure),
        cmocka_unit_test(test_reliable_peer_and_hub_exchange_tcp),
        cmocka_unit_test(test_reliable_peer_and_hub_exchange_ipc),
        cmocka_unit_test(test_reliable_peer_and_hub_exchange_inproc),
        cmocka_unit_test(test_reliable_retry_result_redelivers),
        cmocka_unit_test(test_reliable_refused_deliveries_wait_in_order),
        cmocka_unit_test(test_unsubscribe_from_inside_its_delivery),
        cmocka_unit_test(
            test_closed_broker_refuses_publish_and_keeps_the_event),
        cmocka_unit_test(
            test_unacked_reliable_events_fail_with_eclosed_at_close),
        cmocka_unit_test(test_open_survives_allocation_failures),
        cmocka_unit_test(test_publish_failpoint_keeps_the_event),
    };

    return cmocka_run_group_tests_name("zmq broker", tests, group_setup,
                                       group_teardown);
}
