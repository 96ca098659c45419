/* Fanout loss accounting: "a drop counter equals the real loss". A
 * numbered burst goes to a slow subscriber (and a fast one) with small
 * high-water marks and kernel buffers; afterwards the numbers each
 * subscriber is missing must equal the counters exactly, and what did
 * arrive arrives once and in order. Also: hwm_wait turns loss into
 * backpressure, and what a peer loses upstream is counted by the hub. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "zmq_test_util.h"

#define BURST 20000

typedef struct loss_wait {
    bus_broker *hub;
    zt_rec *r;
    uint64_t want;
} loss_wait;

/* received + every drop counter that can hold its loss == want */
static int
loss_accounted(void *arg)
{
    loss_wait *w = arg;
    bus_broker_zmq_stats h, p;

    bus_broker_zmq_stats_get(w->hub, &h);
    bus_broker_zmq_stats_get(w->r->b, &p);
    return atomic_load(&w->r->n) + h.dropped_hwm + h.dropped_late +
               p.dropped_queue >=
           w->want;
}

static uint64_t
missing(const zt_rec *r, uint64_t n)
{
    uint64_t i, m = 0;

    for (i = 0; i < n; i++)
        m += r->seen[i] == 0;
    return m;
}

static void
test_burst_to_a_slow_subscriber_counts_every_loss(void **state)
{
    /* hwm_wait=0: the classic PUB/SUB behaviour, drop at once. */
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?hwm=100&sndbuf=4096"
                              "&hwm_wait=0&queue=32768");
    bus_broker *peer = zt_open_peer(hub, "hwm=100&rcvbuf=4096");
    bus_broker_zmq_stats h, p;
    zt_rec slow, fast;
    loss_wait w;
    uint64_t i, lost_slow, lost_fast;

    (void)state;
    zt_rec_init(&slow, peer);
    zt_rec_init(&fast, hub);
    slow.delay_ns = 50000; /* 50 us per event: ~20k events/s */
    zt_sub(peer, "burst.>", &slow);
    zt_sub(hub, "burst.>", &fast);
    for (i = 0; i < BURST; i++) {
        assert_int_equal(zt_publish(hub, "burst.n", i, 0), BUS_OK);
        /* In waves, each let through to the end, so that deliveries and
         * losses interleave. */
        if (i % 2000 == 1999) {
            assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
            w = (loss_wait){hub, &slow, i + 1};
            assert_true(bt_wait_for(loss_accounted, &w, 30000));
        }
    }
    assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
    w = (loss_wait){hub, &slow, BURST};
    assert_true(bt_wait_for(loss_accounted, &w, 30000));
    w.r = &fast;
    assert_true(bt_wait_for(loss_accounted, &w, 30000));
    h = zt_stats(hub);
    p = zt_stats(peer);
    /* Joining the I/O threads orders their writes before our reads. */
    bus_broker_close(peer);
    bus_broker_close(hub);
    lost_slow = missing(&slow, BURST);
    lost_fast = missing(&fast, BURST);
    print_message("burst of %d: slow got %llu, fast got %llu; hub "
                  "dropped_hwm %llu dropped_late %llu\n",
                  BURST, (unsigned long long)atomic_load(&slow.n),
                  (unsigned long long)atomic_load(&fast.n),
                  (unsigned long long)h.dropped_hwm,
                  (unsigned long long)h.dropped_late);
    assert_true(h.dropped_hwm > 0);           /* the test did meet the HWM */
    assert_true(atomic_load(&slow.n) >= 100); /* and delivered some */
    assert_int_equal(h.dropped_late, 0);
    assert_int_equal(h.published, BURST);
    assert_int_equal(h.sent + h.dropped_hwm, BURST);
    /* The real loss of each subscriber is exactly what was counted:
     * NODROP makes a HWM drop all-or-none, so both lost the same. */
    assert_int_equal(lost_slow, h.dropped_hwm + p.dropped_queue);
    assert_int_equal(lost_fast, h.dropped_hwm);
    assert_int_equal(atomic_load(&slow.n), BURST - lost_slow);
    assert_int_equal(atomic_load(&slow.dups), 0);
    assert_int_equal(atomic_load(&slow.out_of_order), 0);
    assert_int_equal(atomic_load(&fast.out_of_order), 0);
    assert_int_equal(p.bad_frames + h.bad_frames, 0);
    zt_rec_fini(&slow);
    zt_rec_fini(&fast);
}

static void
test_refusing_subscription_losses_are_counted_by_the_receiver(void **state)
{
    bus_broker *hub = zt_open("zmq+inproc://refusing");
    zt_rec r;
    uint64_t i;

    (void)state;
    zt_rec_init(&r, hub);
    zt_sub(hub, "rq.>", &r);
    for (i = 0; i < 100; i++) {
        /* every third one meets a full queue */
        atomic_store(&r.rv, i % 3 == 2 ? BUS_EAGAIN : BUS_OK);
        assert_int_equal(zt_publish(hub, "rq.x", i, 0), BUS_OK);
        assert_true(zt_wait(&r.calls, i + 1, ZT_WAIT_MS));
    }
    assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(zt_stats(hub).dropped_queue, 33);
    bus_broker_close(hub);
    assert_int_equal(missing(&r, 100), 33);
    zt_rec_fini(&r);
}

static void
test_hwm_wait_turns_loss_into_backpressure(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?hwm=20&sndbuf=4096"
                              "&queue=64&block_timeout_ms=-1");
    bus_broker *peer = zt_open_peer(hub, "hwm=20&rcvbuf=4096");
    zt_rec slow;
    uint64_t i, n = 3000;

    (void)state;
    zt_rec_init(&slow, peer);
    slow.delay_ns = 20000;
    zt_sub(peer, "bp.>", &slow);
    for (i = 0; i < n; i++) /* blocks while the subscriber catches up */
        assert_int_equal(zt_publish(hub, "bp.n", i, 0), BUS_OK);
    assert_true(zt_wait(&slow.n, n, 30000));
    assert_int_equal(zt_stats(hub).dropped_hwm, 0);
    assert_int_equal(atomic_load(&slow.out_of_order), 0);
    bus_broker_close(peer);
    bus_broker_close(hub);
    zt_rec_fini(&slow);
}

/* ---- Upstream: a peer publishing through the hub ------------------------- */

typedef struct up_wait {
    bus_broker *hub, *peer;
    uint64_t want;
} up_wait;

/* Every upstream publish is forwarded, or counted as lost upstream by
 * the hub, or (not connected: heartbeats may time out behind these tiny
 * buffers) counted by the peer. */
static int
upstream_accounted(void *arg)
{
    up_wait *w = arg;
    bus_broker_zmq_stats h, p;

    bus_broker_zmq_stats_get(w->hub, &h);
    bus_broker_zmq_stats_get(w->peer, &p);
    return h.forwarded + h.dropped_upstream + p.dropped_late >= w->want;
}

static void
test_upstream_losses_are_counted_by_the_hub(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?hwm=10&rcvbuf=4096"
                              "&hwm_wait=0");
    bus_broker *peer = zt_open_peer(hub, "hwm=10&sndbuf=4096");
    bus_broker_zmq_stats h, p;
    zt_rec slow;
    up_wait w;
    uint64_t i, sent = 0, t0;

    (void)state;
    zt_rec_init(&slow, hub);
    slow.delay_ns = 30000; /* the hub's I/O thread is slow to read */
    zt_sub(hub, "up.>", &slow);
    for (i = 0; i < 10000; i++, sent++)
        assert_int_equal(zt_publish(peer, "up.n", i, 0), BUS_OK);
    assert_int_equal(bus_broker_flush(peer, ZT_WAIT_MS), BUS_OK);
    /* A gap shows when a later event arrives: publish markers until one
     * does, then every sequence number is accounted for. */
    t0 = bt_now_ns();
    for (;;) {
        assert_true(bt_now_ns() - t0 < 20000000000ull);
        assert_int_equal(zt_publish(peer, "up.n", sent++, 0), BUS_OK);
        w = (up_wait){hub, peer, sent};
        if (bt_wait_for(upstream_accounted, &w, 200))
            break;
    }
    h = zt_stats(hub);
    p = zt_stats(peer);
    print_message("upstream: %llu sent, %llu forwarded, %llu lost\n",
                  (unsigned long long)sent, (unsigned long long)h.forwarded,
                  (unsigned long long)h.dropped_upstream);
    assert_int_equal(h.forwarded + h.dropped_upstream + p.dropped_late, sent);
    /* What the hub forwarded reached its subscriber or was counted. */
    assert_true(zt_wait(&slow.n, h.forwarded - h.dropped_hwm - h.dropped_late,
                        ZT_WAIT_MS));
    bus_broker_close(peer);
    bus_broker_close(hub);
    assert_int_equal(missing(&slow, sent), h.dropped_upstream + h.dropped_hwm +
                                               h.dropped_late + p.dropped_late);
    zt_rec_fini(&slow);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_burst_to_a_slow_subscriber_counts_every_loss),
        cmocka_unit_test(
            test_refusing_subscription_losses_are_counted_by_the_receiver),
        cmocka_unit_test(test_hwm_wait_turns_loss_into_backpressure),
        cmocka_unit_test(test_upstream_losses_are_counted_by_the_hub),
    };

    return cmocka_run_group_tests_name("zmq fanout loss", tests, NULL, NULL);
}
