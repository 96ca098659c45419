/* Reliable mode in one process: resends after resend_ivl and duplicate
 * drops at the receiver, a receiver closed and reopened mid-stream (the
 * sender resends on reconnect; every event is handled at least once), a
 * hub that forgets a silent peer, a peer that subscribes again when its
 * hub restarts, and a full context queue refilled as its worker acks.
 * The receiver process killed with SIGKILL is in test_zmq_kill.c. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "zmq_test_util.h"

static char *g_dir;

static int
group_setup(void **state)
{
    (void)state;
    g_dir = bt_mkdtemp("bus-zmq-rel");
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

static uint64_t
st_resent(const bus_broker_zmq_stats *s)
{
    return s->resent;
}

static uint64_t
st_dups(const bus_broker_zmq_stats *s)
{
    return s->duplicates_dropped;
}

static void
test_unacked_events_are_resent_and_duplicates_dropped(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?mode=reliable&window=16");
    bus_broker *peer = zt_open_peer(hub, "mode=reliable&resend_ivl=50");
    zt_rec r;
    zt_acks a = {0};
    uint64_t i;

    (void)state;
    zt_rec_init(&r, hub);
    atomic_store(&r.ack, false); /* the handler takes its time */
    zt_sub(hub, "rs.>", &r);
    for (i = 0; i < 10; i++) {
        bus_event *e = zt_event(i);
        assert_int_equal(bus_broker_publish(peer, "rs.x", e, 0, zt_ack_fn, &a),
                         BUS_OK);
    }
    assert_true(zt_wait(&r.n, 10, ZT_WAIT_MS));
    /* No ack for a while: the peer resends, the hub drops the copies of
     * events it is still handling, and the handler sees each once. */
    assert_true(zt_swait(peer, st_resent, 10, ZT_WAIT_MS));
    assert_true(zt_swait(hub, st_dups, 10, ZT_WAIT_MS));
    assert_int_equal(atomic_load(&r.n), 10);
    assert_int_equal(atomic_load(&a.ok), 0);
    zt_ack_kept(&r, BUS_ACK);
    assert_int_equal(bus_broker_flush(peer, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), 10);
    assert_int_equal(atomic_load(&a.failed), 0);
    /* Later copies of handled events are dropped too (and re-acked). */
    assert_int_equal(atomic_load(&r.dups), 0);
    bus_broker_close(peer);
    bus_broker_close(hub);
    zt_rec_fini(&r);
}

/* The receiver closes with events in flight and opens again; the sender
 * (peer_opts) must get every event handled by one incarnation or the
 * other. */
static void
reopen_run(const char *sock, const char *peer_opts)
{
    char uri[512];
    bus_broker *hub, *peer;
    zt_rec r1, r2;
    zt_acks a = {0};
    uint64_t i, n = 2000, handled;

    snprintf(uri, sizeof(uri), "zmq+ipc://%s/%s?mode=reliable&window=64",
             g_dir, sock);
    hub = zt_open(uri);
    zt_rec_init(&r1, hub);
    zt_sub(hub, "ro.>", &r1);
    peer = zt_open_peer(hub, peer_opts);
    for (i = 0; i < n; i++) {
        bus_event *e = zt_event(i);
        assert_int_equal(bus_broker_publish(peer, "ro.x", e, 0, zt_ack_fn, &a),
                         BUS_OK);
        if (i == n / 2) {
            /* The receiver goes away with events in flight... */
            bus_broker_close(hub);
            hub = zt_open(uri); /* ...and comes back */
            zt_rec_init(&r2, hub);
            zt_sub(hub, "ro.>", &r2);
        }
    }
    assert_int_equal(bus_broker_flush(peer, 30000), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), n);
    assert_true(zt_stats(peer).reconnects >= 1);
    /* Close first: joining the I/O threads orders their writes to the
     * records before our reads (the acks came through libzmq, which
     * ThreadSanitizer cannot see). */
    bus_broker_close(peer);
    bus_broker_close(hub);
    handled = 0;
    for (i = 0; i < n; i++) {
        if (!r1.seen[i] && !r2.seen[i])
            fail_msg("event %llu was never handled", (unsigned long long)i);
        handled += r1.seen[i] && r2.seen[i];
    }
    print_message("reopened receiver: %llu event(s) handled by both "
                  "incarnations\n",
                  (unsigned long long)handled);
    zt_rec_fini(&r1);
    zt_rec_fini(&r2);
}

static void
test_receiver_reopened_mid_stream_loses_nothing(void **state)
{
    (void)state;
    reopen_run("reopen.sock", "mode=reliable&window=64&resend_ivl=200"
                              "&reconnect_ivl=20&reconnect_ivl_max=50"
                              "&block_timeout_ms=-1");
}

/* Events the receiver took but never acked when it went away are resent
 * when the sender reconnects to its next incarnation. The resend timer is
 * set far past the test's deadlines, so only the resend on reconnecting
 * can bring them back (the flush would time out without it). */
static void
test_events_lost_with_a_connection_are_resent_on_reconnect(void **state)
{
    char uri[512];
    bus_broker *hub, *peer;
    zt_rec r1, r2;
    zt_acks a = {0};
    uint64_t i, n = 30;

    (void)state;
    snprintf(uri, sizeof(uri),
             "zmq+ipc://%s/reconnect.sock?mode=reliable&window=64", g_dir);
    hub = zt_open(uri);
    zt_rec_init(&r1, hub);
    atomic_store(&r1.ack, false); /* takes them, acks none */
    zt_sub(hub, "rc.>", &r1);
    peer = zt_open_peer(hub, "mode=reliable&window=64&resend_ivl=600000"
                             "&reconnect_ivl=20&reconnect_ivl_max=50");
    for (i = 0; i < n; i++)
        assert_int_equal(bus_broker_publish(peer, "rc.x", zt_event(i), 0,
                                            zt_ack_fn, &a),
                         BUS_OK);
    assert_true(zt_wait(&r1.n, n, ZT_WAIT_MS));
    bus_broker_close(hub); /* with all of them unacked */
    hub = zt_open(uri);
    zt_rec_init(&r2, hub);
    zt_sub(hub, "rc.>", &r2);
    assert_int_equal(bus_broker_flush(peer, 30000), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), n);
    assert_true(zt_stats(peer).reconnects >= 1);
    assert_true(zt_stats(peer).resent >= n);
    bus_broker_close(peer);
    bus_broker_close(hub);
    for (i = 0; i < n; i++)
        if (!r2.seen[i])
            fail_msg("event %llu was not handled again",
                     (unsigned long long)i);
    zt_rec_fini(&r1);
    zt_rec_fini(&r2);
}

static void
test_a_silent_peer_is_forgotten_and_its_events_acked(void **state)
{
    bus_broker *hub = zt_open(
        "zmq+tcp://127.0.0.1:0?mode=reliable&peer_timeout=300&linger=0");
    bus_broker *peer = zt_open_peer(hub, "mode=reliable&peer_timeout=300");
    zt_rec r;
    zt_acks a = {0};
    bus_event *e;

    (void)state;
    zt_rec_init(&r, peer);
    atomic_store(&r.ack, false); /* never acks */
    zt_sub(peer, "sp.>", &r);
    e = zt_event(1);
    assert_int_equal(bus_broker_publish(hub, "sp.x", e, 0, zt_ack_fn, &a),
                     BUS_OK);
    assert_true(zt_wait(&r.n, 1, ZT_WAIT_MS));
    bus_broker_close(peer); /* no unsubscribe, no more pings */
    /* The hub drops the peer after peer_timeout; nothing waits for it. */
    assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), 1);
    bus_broker_close(hub);
    zt_rec_fini(&r);
}

static void
test_a_peer_subscribes_again_when_its_hub_restarts(void **state)
{
    char uri[512];
    bus_broker *hub, *peer;
    zt_rec r;
    uint64_t i;

    (void)state;
    snprintf(uri, sizeof(uri), "zmq+ipc://%s/rehub.sock?mode=reliable", g_dir);
    hub = zt_open(uri);
    peer = zt_open_peer(hub, "mode=reliable&reconnect_ivl=20"
                             "&reconnect_ivl_max=50&peer_timeout=400");
    zt_rec_init(&r, peer);
    zt_sub(peer, "rh.>", &r);
    assert_int_equal(zt_publish(hub, "rh.x", 0, 0), BUS_OK);
    assert_true(zt_wait(&r.n, 1, ZT_WAIT_MS));
    bus_broker_close(hub);
    hub = zt_open(uri);
    /* The peer resubscribes on reconnect (or when told WHO): publish
     * until it gets one. */
    for (i = 1; i < 200; i++) {
        assert_int_equal(zt_publish(hub, "rh.x", i, BUS_PUB_NONBLOCK), BUS_OK);
        if (zt_wait(&r.n, 2, 50))
            break;
    }
    assert_true(atomic_load(&r.n) >= 2);
    bus_broker_close(peer);
    bus_broker_close(hub);
    zt_rec_fini(&r);
}

/* A context's worker with a queue of 4 behind a reliable hub: most
 * deliveries meet a full queue and wait on the subscription's backlog.
 * Each ack makes room, and the backlog must be offered again then, not
 * after a backoff that kept growing while the queue was full (64 ms per
 * 4 events: 3000 events took 48 s). */
typedef struct slow_q {
    _Atomic uint64_t n;
} slow_q;

static bus_result
slow_q_handler(bus_delivery *d, void *opaque)
{
    slow_q *q = opaque;

    (void)d;
    atomic_fetch_add(&q->n, 1);
    return BUS_ACK;
}

static void
test_a_full_context_queue_is_refilled_as_its_worker_acks(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?mode=reliable");
    bus_ctx_config cfg;
    bus_ctx *ctx = NULL;
    slow_q q = {0};
    uint64_t i, n = 3000;

    (void)state;
    bus_ctx_config_init(&cfg);
    cfg.workers = 1;
    cfg.queue_capacity = 4;
    assert_int_equal(bus_ctx_open(&ctx, &cfg), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, hub, NULL), BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "fq.>", slow_q_handler, &q, NULL, NULL),
                     BUS_OK);
    for (i = 0; i < n; i++)
        assert_int_equal(bus_publish(ctx, "fq.x", zt_event(i), 0), BUS_OK);
    assert_true(zt_wait(&q.n, n, 20000));
    assert_int_equal(zt_stats(hub).delivered, n);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(hub);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unacked_events_are_resent_and_duplicates_dropped),
        cmocka_unit_test(test_receiver_reopened_mid_stream_loses_nothing),
        cmocka_unit_test(
            test_events_lost_with_a_connection_are_resent_on_reconnect),
        cmocka_unit_test(test_a_silent_peer_is_forgotten_and_its_events_acked),
        cmocka_unit_test(test_a_peer_subscribes_again_when_its_hub_restarts),
        cmocka_unit_test(
            test_a_full_context_queue_is_refilled_as_its_worker_acks),
    };

    return cmocka_run_group_tests_name("zmq reliable", tests, group_setup,
                                       group_teardown);
}
