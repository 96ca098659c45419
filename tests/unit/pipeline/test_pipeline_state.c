/*
 * Pipeline state machines, all on a manual clock (no sleeps): circuit
 * breaker transitions (consecutive and rate rules, half-open probes,
 * callbacks, registry), retry delays within their jitter bounds, token
 * buckets (refill, delay/reject, status, idle eviction, bounded keys),
 * dedup TTL and LRU bound, the timer wheel.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include <bus/breaker.h>
#include <bus/dedup.h>
#include <bus/err.h>
#include <bus/policy.h>
#include <bus/ratelimit.h>

#include "platform.h"
#include "timerwheel.h"

#define MS 1000000ull

/* ---- Breaker -------------------------------------------------------------- */

typedef struct transitions {
    int n;
    bus_breaker_state from[16], to[16];
} transitions;

static void
on_state(void *opaque, bus_breaker *b, bus_breaker_state from,
         bus_breaker_state to)
{
    transitions *t = opaque;

    (void)b;
    if (t->n < 16) {
        t->from[t->n] = from;
        t->to[t->n] = to;
    }
    t->n++;
}

static void
test_breaker_opens_on_consecutive_failures_and_recovers(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config c;
    bus_breaker *b;
    bus_breaker_stats st;
    transitions tr = {0};

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&c);
    c.failure_threshold = 3;
    c.failure_rate = 2.0; /* rate rule off */
    c.open_ms = 500;
    c.half_open_probes = 1;
    c.close_successes = 2;
    c.on_state = on_state;
    c.on_state_opaque = &tr;
    c.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &c), BUS_OK);

    for (int i = 0; i < 2; i++) {
        assert_true(bus_breaker_allow(b));
        bus_breaker_record(b, false);
    }
    assert_true(bus_breaker_allow(b));
    bus_breaker_record(b, true); /* a success resets the run */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
        assert_true(bus_breaker_allow(b));
        bus_breaker_record(b, false);
    }
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    assert_false(bus_breaker_allow(b));
    bus_breaker_stats_get(b, &st);
    assert_int_equal(st.rejections, 1);
    assert_int_equal(st.retry_in_ns, 500 * MS);
    assert_int_equal(st.calls, 6);
    assert_int_equal(st.failures, 5);

    bus_manual_clock_advance(&mc, 499 * MS);
    assert_false(bus_breaker_allow(b));
    bus_manual_clock_advance(&mc, 1 * MS);
    assert_true(bus_breaker_allow(b)); /* probe 1 */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_HALF_OPEN);
    assert_false(bus_breaker_allow(b)); /* only one probe in flight */
    bus_breaker_record(b, true);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_HALF_OPEN);
    assert_true(bus_breaker_allow(b)); /* probe 2 */
    bus_breaker_record(b, true);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);

    assert_int_equal(tr.n, 3);
    assert_int_equal(tr.from[0], BUS_BREAKER_CLOSED);
    assert_int_equal(tr.to[0], BUS_BREAKER_OPEN);
    assert_int_equal(tr.to[1], BUS_BREAKER_HALF_OPEN);
    assert_int_equal(tr.to[2], BUS_BREAKER_CLOSED);
    bus_breaker_free(b);
}

/* Half-open lets half_open_probes calls in flight at once, and closes
 * after close_successes of them. */
static void
test_breaker_half_open_admits_k_probes(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config c;
    bus_breaker *b;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&c);
    c.failure_threshold = 1;
    c.open_ms = 100;
    c.half_open_probes = 3;
    c.close_successes = 3;
    c.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &c), BUS_OK);
    assert_true(bus_breaker_allow(b));
    bus_breaker_record(b, false);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    bus_manual_clock_advance(&mc, 100 * MS);
    for (int i = 0; i < 3; i++)
        assert_true(bus_breaker_allow(b)); /* three probes at once */
    assert_false(bus_breaker_allow(b));    /* a fourth waits */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_HALF_OPEN);
    bus_breaker_record(b, true);
    assert_true(bus_breaker_allow(b)); /* a slot came back */
    bus_breaker_record(b, true);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_HALF_OPEN);
    bus_breaker_record(b, true); /* the third success closes it */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    bus_breaker_record(b, true); /* the last probe ends: nothing changes */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    bus_breaker_free(b);
}

static void
test_breaker_half_open_failure_reopens(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config c;
    bus_breaker *b;
    bus_breaker_stats st;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&c);
    c.failure_threshold = 1;
    c.open_ms = 100;
    c.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &c), BUS_OK);
    assert_true(bus_breaker_allow(b));
    bus_breaker_record(b, false);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    bus_manual_clock_advance(&mc, 100 * MS);
    assert_true(bus_breaker_allow(b));
    bus_breaker_record(b, false);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    bus_breaker_stats_get(b, &st);
    assert_int_equal(st.opened, 2);
    assert_int_equal(st.retry_in_ns, 100 * MS); /* the timer restarted */
    bus_breaker_reset(b);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    bus_breaker_free(b);
}

static void
test_breaker_opens_on_failure_rate_after_min_calls(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config c;
    bus_breaker *b;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&c);
    c.failure_threshold = UINT32_MAX;
    c.failure_rate = 0.5;
    c.min_calls = 10;
    c.window_ms = 1000;
    c.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &c), BUS_OK);
    /* alternate: rate 0.5 but fewer than 10 calls: stays closed */
    for (int i = 0; i < 8; i++) {
        assert_true(bus_breaker_allow(b));
        bus_breaker_record(b, i % 2 == 0);
    }
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    /* calls leave the window: old ones no longer count */
    bus_manual_clock_advance(&mc, 1100 * MS);
    for (int i = 0; i < 9; i++) {
        bus_breaker_record(b, i % 2 == 0);
        assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    }
    bus_breaker_record(b, false); /* 10 calls, 5 failures */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    bus_breaker_free(b);
}

static void
test_breaker_registry_snapshot(void **state)
{
    bus_breaker_registry *r;
    bus_breaker *a, *b, *a2;
    bus_breaker_config c;
    bus_breaker_info *infos;
    size_t n;
    transitions tr = {0};

    (void)state;
    bus_breaker_config_init(&c);
    c.failure_threshold = 1;
    assert_int_equal(bus_breaker_registry_new(&r, on_state, &tr), BUS_OK);
    assert_int_equal(bus_breaker_registry_get(r, "x", NULL, &a), BUS_ENOTFOUND);
    assert_int_equal(bus_breaker_registry_get(r, "db", &c, &a), BUS_OK);
    assert_int_equal(bus_breaker_registry_get(r, "http", &c, &b), BUS_OK);
    assert_int_equal(bus_breaker_registry_get(r, "db", NULL, &a2), BUS_OK);
    assert_ptr_equal(a, a2);
    bus_breaker_record(b, false);
    assert_int_equal(bus_breaker_registry_open_count(r), 1);
    assert_int_equal(tr.n, 1);
    assert_int_equal(bus_breaker_registry_snapshot(r, &infos, &n), BUS_OK);
    assert_int_equal(n, 2);
    assert_string_equal(infos[0].name, "db");
    assert_int_equal(infos[0].stats.state, BUS_BREAKER_CLOSED);
    assert_string_equal(infos[1].name, "http");
    assert_int_equal(infos[1].stats.state, BUS_BREAKER_OPEN);
    bus_breaker_snapshot_free(infos, n);
    bus_breaker_reset(b);
    assert_int_equal(bus_breaker_registry_open_count(r), 0);
    bus_breaker_registry_free(r);
}

static void *
breaker_hammer(void *arg)
{
    bus_breaker *b = arg;

    for (int i = 0; i < 20000; i++)
        if (bus_breaker_allow(b))
            bus_breaker_record(b, i % 3 != 0);
    return NULL;
}

static void
test_breaker_concurrent_use_is_consistent(void **state)
{
    bus_breaker_config c;
    bus_breaker *b;
    bus_breaker_stats st;
    pthread_t th[4];

    (void)state;
    bus_breaker_config_init(&c);
    c.failure_threshold = 50;
    c.failure_rate = 0.9;
    c.open_ms = 1;
    assert_int_equal(bus_breaker_new(&b, &c), BUS_OK);
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, breaker_hammer, b);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    bus_breaker_stats_get(b, &st);
    assert_int_equal(st.calls + st.rejections, 4 * 20000);
    bus_breaker_free(b);
}

/* The breaker's counters and window are per thread (breaker.c): the rate
 * rule must see the outcomes of every thread, and closing must clear the
 * window of every thread. The recorders stay alive (barrier) while the
 * main thread checks, so each keeps a shard of its own. */
typedef struct rate_threads {
    bus_breaker *b;
    pthread_barrier_t recorded, done;
} rate_threads;

static void *
breaker_rate_recorder(void *arg)
{
    rate_threads *rt = arg;

    for (int i = 0; i < 5; i++) {
        assert_true(bus_breaker_allow(rt->b));
        bus_breaker_record(rt->b, i < 3); /* 3 successes, 2 failures */
    }
    pthread_barrier_wait(&rt->recorded);
    pthread_barrier_wait(&rt->done);
    return NULL;
}

static void
test_breaker_rate_rule_sums_every_thread(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config c;
    bus_breaker_stats st;
    rate_threads rt;
    pthread_t th[4];

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&c);
    c.failure_threshold = UINT32_MAX;
    c.failure_rate = 0.5;
    c.min_calls = 20;
    c.window_ms = 1000;
    c.open_ms = 100;
    c.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&rt.b, &c), BUS_OK);
    pthread_barrier_init(&rt.recorded, NULL, 5);
    pthread_barrier_init(&rt.done, NULL, 5);
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, breaker_rate_recorder, &rt);
    pthread_barrier_wait(&rt.recorded);
    /* 20 calls, 8 failures over four threads: rate 0.4, closed */
    bus_breaker_stats_get(rt.b, &st);
    assert_int_equal(st.calls, 20);
    assert_int_equal(st.failures, 8);
    assert_int_equal(st.state, BUS_BREAKER_CLOSED);
    for (int i = 0; i < 3; i++) { /* 23 calls, 11 failures: 0.478 */
        bus_breaker_record(rt.b, false);
        assert_int_equal(bus_breaker_state_get(rt.b), BUS_BREAKER_CLOSED);
    }
    bus_breaker_record(rt.b, false); /* 24 calls, 12 failures: 0.5 */
    assert_int_equal(bus_breaker_state_get(rt.b), BUS_BREAKER_OPEN);
    /* Probe and close: the window starts empty, whatever the other
     * threads' shards still hold. */
    bus_manual_clock_advance(&mc, 100 * MS);
    assert_true(bus_breaker_allow(rt.b));
    bus_breaker_record(rt.b, true);
    assert_int_equal(bus_breaker_state_get(rt.b), BUS_BREAKER_CLOSED);
    for (int i = 0; i < 19; i++) /* 19 failures: below min_calls */
        bus_breaker_record(rt.b, false);
    assert_int_equal(bus_breaker_state_get(rt.b), BUS_BREAKER_CLOSED);
    bus_breaker_record(rt.b, false); /* 20 calls, all failed */
    assert_int_equal(bus_breaker_state_get(rt.b), BUS_BREAKER_OPEN);
    pthread_barrier_wait(&rt.done);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    bus_breaker_stats_get(rt.b, &st);
    assert_int_equal(st.calls, 20 + 4 + 1 + 20);
    assert_int_equal(st.failures, 8 + 4 + 20);
    pthread_barrier_destroy(&rt.recorded);
    pthread_barrier_destroy(&rt.done);
    bus_breaker_free(rt.b);
}

/* ---- Retry delays ---------------------------------------------------------- */

static void
test_retry_delays_follow_backoff_within_jitter_bounds(void **state)
{
    bus_retry_config rc;

    (void)state;
    memset(&rc, 0, sizeof(rc));
    rc.initial_ms = 100;
    rc.multiplier = 2.0;
    rc.max_delay_ms = 1000;
    rc.jitter = BUS_JITTER_NONE;
    rc.backoff = BUS_BACKOFF_EXPONENTIAL;
    assert_int_equal(bus_retry_delay_ns(&rc, 1, 0), 100 * MS);
    assert_int_equal(bus_retry_delay_ns(&rc, 2, 0), 200 * MS);
    assert_int_equal(bus_retry_delay_ns(&rc, 4, 0), 800 * MS);
    assert_int_equal(bus_retry_delay_ns(&rc, 5, 0), 1000 * MS); /* cap */
    assert_int_equal(bus_retry_delay_ns(&rc, 500, 0), 1000 * MS);
    rc.backoff = BUS_BACKOFF_LINEAR;
    assert_int_equal(bus_retry_delay_ns(&rc, 3, 0), 300 * MS);
    rc.backoff = BUS_BACKOFF_FIXED;
    assert_int_equal(bus_retry_delay_ns(&rc, 7, 0), 100 * MS);

    rc.backoff = BUS_BACKOFF_EXPONENTIAL;
    for (int i = 0; i < 10000; i++) {
        uint32_t a = 1 + (uint32_t)(i % 6);
        uint64_t full = a >= 5 ? 1000 * MS : (100 * MS) << (a - 1);
        uint64_t r = bus__random_u64();
        rc.jitter = BUS_JITTER_FULL;
        assert_true(bus_retry_delay_ns(&rc, a, r) <= full);
        rc.jitter = BUS_JITTER_EQUAL;
        uint64_t d = bus_retry_delay_ns(&rc, a, r);
        assert_true(d >= full - full / 2 && d <= full);
    }
    /* full jitter reaches both ends of its range */
    rc.jitter = BUS_JITTER_FULL;
    assert_int_equal(bus_retry_delay_ns(&rc, 1, 0), 0);
    assert_int_equal(bus_retry_delay_ns(&rc, 1, 100 * MS), 100 * MS);
}

/* ---- Rate limit ------------------------------------------------------------ */

static void
test_ratelimit_token_bucket_per_key(void **state)
{
    bus_manual_clock mc;
    bus_ratelimit_config c;
    bus_ratelimit *rl;
    bus_ratelimit_status st;
    uint64_t wait;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_ratelimit_config_init(&c);
    c.rate = 10; /* per second: one token per 100 ms */
    c.capacity = 3;
    c.clock = mc.clock;
    assert_int_equal(bus_ratelimit_new(&rl, &c), BUS_OK);
    for (int i = 0; i < 3; i++)
        assert_int_equal(bus_ratelimit_take(rl, "a", 1, 1, false, &wait),
                         BUS_OK);
    assert_int_equal(bus_ratelimit_take(rl, "a", 1, 1, false, &wait),
                     BUS_EAGAIN);
    assert_in_range(wait, 99 * MS, 101 * MS);
    /* another key has its own bucket */
    assert_int_equal(bus_ratelimit_take(rl, "b", 1, 1, false, &wait), BUS_OK);
    bus_manual_clock_advance(&mc, 100 * MS);
    assert_int_equal(bus_ratelimit_take(rl, "a", 1, 1, false, &wait), BUS_OK);
    /* reserve (delay mode): goes negative and says how long to wait */
    assert_int_equal(bus_ratelimit_take(rl, "a", 1, 2, true, &wait), BUS_OK);
    assert_in_range(wait, 199 * MS, 201 * MS);
    bus_ratelimit_status_get(rl, "a", 1, &st);
    assert_true(st.known);
    assert_true(st.tokens < -1.99 && st.tokens > -2.01);
    bus_manual_clock_advance(&mc, 10000 * MS); /* refill caps at capacity */
    bus_ratelimit_status_get(rl, "a", 1, &st);
    assert_true(st.tokens > 2.99 && st.tokens < 3.01);
    assert_int_equal(bus_ratelimit_take(rl, "a", 1, 4, false, &wait),
                     BUS_EINVAL);
    bus_ratelimit_free(rl);
}

static void
test_ratelimit_evicts_idle_and_bounds_keys(void **state)
{
    bus_manual_clock mc;
    bus_ratelimit_config c;
    bus_ratelimit *rl;
    bus_ratelimit_stats st;
    bus_ratelimit_status s;
    char key[32];

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_ratelimit_config_init(&c);
    c.rate = 1;
    c.capacity = 1;
    c.max_keys = 100;
    c.idle_ms = 1000;
    c.clock = mc.clock;
    assert_int_equal(bus_ratelimit_new(&rl, &c), BUS_OK);
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(key, sizeof(key), "k%d", i);
        assert_int_equal(bus_ratelimit_take(rl, key, (size_t)n, 1, false, NULL),
                         BUS_OK);
    }
    bus_ratelimit_stats_get(rl, &st);
    assert_int_equal(st.keys, 100);
    assert_int_equal(st.evicted, 900);
    /* idle buckets go: status of an idle key reads as unknown, full */
    bus_manual_clock_advance(&mc, 2000 * MS);
    bus_ratelimit_status_get(rl, "k999", 4, &s);
    assert_false(s.known);
    for (int i = 0; i < 50; i++)
        bus_ratelimit_take(rl, "fresh", 5, 1, true, NULL);
    bus_ratelimit_stats_get(rl, &st);
    assert_true(st.keys < 100);
    bus_ratelimit_free(rl);
}

/* ---- Dedup ----------------------------------------------------------------- */

static void
test_dedup_ttl_and_lru_bound(void **state)
{
    bus_manual_clock mc;
    bus_dedup_config c;
    bus_dedup *dd;
    bus_dedup_stats st;
    bus_uuid ids[300];

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_dedup_config_init(&c);
    c.capacity = 200;
    c.ttl_ms = 1000;
    c.clock = mc.clock;
    assert_int_equal(bus_dedup_new(&dd, &c), BUS_OK);
    for (int i = 0; i < 300; i++)
        bus_uuid_v7(&ids[i]);
    assert_false(bus_dedup_seen(dd, &ids[0]));
    assert_int_equal(bus_dedup_mark(dd, &ids[0]), BUS_OK);
    assert_true(bus_dedup_seen(dd, &ids[0]));
    bus_manual_clock_advance(&mc, 999 * MS);
    assert_true(bus_dedup_seen(dd, &ids[0]));
    bus_manual_clock_advance(&mc, 1 * MS);
    assert_false(bus_dedup_seen(dd, &ids[0])); /* TTL passed */
    for (int i = 0; i < 300; i++)
        bus_dedup_mark(dd, &ids[i]);
    bus_dedup_stats_get(dd, &st);
    assert_int_equal(st.size, 200);
    assert_int_equal(st.evicted, 100);
    assert_true(bus_dedup_seen(dd, &ids[299]));
    assert_false(bus_dedup_seen(dd, &ids[1])); /* the oldest were evicted */
    bus_dedup_stats_get(dd, &st);
    assert_int_equal(st.expired, 1);
    assert_int_equal(st.hits, 3);
    bus_dedup_free(dd);
}

typedef struct fake_store {
    bus_uuid ids[8];
    int n, marks;
} fake_store;

static int
fs_seen(void *o, const bus_uuid *id, bool *seen)
{
    fake_store *fs = o;

    *seen = false;
    for (int i = 0; i < fs->n; i++)
        if (memcmp(&fs->ids[i], id, sizeof(*id)) == 0)
            *seen = true;
    return BUS_OK;
}

static int
fs_mark(void *o, const bus_uuid *id, uint64_t now)
{
    fake_store *fs = o;

    (void)now;
    fs->marks++;
    if (fs->n < 8)
        fs->ids[fs->n++] = *id;
    return BUS_OK;
}

static void
test_dedup_durable_store_behind_the_cache(void **state)
{
    fake_store fs = {0};
    bus_dedup_store ops = {fs_seen, fs_mark, &fs};
    bus_dedup_config c;
    bus_dedup *dd, *dd2;
    bus_uuid id;

    (void)state;
    bus_dedup_config_init(&c);
    c.store = &ops;
    bus_uuid_v7(&id);
    assert_int_equal(bus_dedup_new(&dd, &c), BUS_OK);
    bus_dedup_mark(dd, &id);
    assert_int_equal(fs.marks, 1);
    bus_dedup_free(dd);
    /* a new cache ("after a restart") still knows it, from the store */
    assert_int_equal(bus_dedup_new(&dd2, &c), BUS_OK);
    assert_true(bus_dedup_seen(dd2, &id));
    bus_dedup_free(dd2);
}

/* ---- Timer wheel ----------------------------------------------------------- */

typedef struct fired_log {
    int order[16];
    int n;
} fired_log;

typedef struct tw_item {
    bus__timer t;
    int id;
    fired_log *log;
} tw_item;

static void
tw_fire(bus__timer *t, void *arg)
{
    tw_item *it = arg;

    (void)t;
    it->log->order[it->log->n++] = it->id;
}

static void
test_timer_wheel_fires_in_due_order_across_rounds(void **state)
{
    bus__twheel w;
    fired_log log = {{0}, 0};
    tw_item it[5];
    uint64_t base = 1000 * MS;
    uint64_t due[5] = {base + 5 * MS, base + 3 * MS, base + 300 * MS,
                       base + 3 * MS + 1, base};

    (void)state;
    /* 1 ms ticks, 64 slots: 300 ms is several rounds away */
    assert_int_equal(bus__twheel_init(&w, MS, 64, base), BUS_OK);
    for (int i = 0; i < 5; i++) {
        it[i].id = i;
        it[i].log = &log;
        it[i].t.due_ns = due[i];
        it[i].t.fn = tw_fire;
        it[i].t.arg = &it[i];
        bus__twheel_add(&w, &it[i].t);
    }
    assert_int_equal(bus__twheel_advance(&w, base), 1);
    assert_int_equal(log.order[0], 4);
    assert_int_equal(bus__twheel_advance(&w, base + 10 * MS), 3);
    assert_int_equal(log.order[1], 1);
    assert_int_equal(log.order[2], 3);
    assert_int_equal(log.order[3], 0);
    assert_int_equal(bus__twheel_advance(&w, base + 299 * MS), 0);
    assert_int_equal(bus__twheel_advance(&w, base + 300 * MS), 1);
    assert_int_equal(bus__twheel_count(&w), 0);
    assert_null(bus__twheel_fini(&w));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_breaker_opens_on_consecutive_failures_and_recovers),
        cmocka_unit_test(test_breaker_half_open_admits_k_probes),
        cmocka_unit_test(test_breaker_half_open_failure_reopens),
        cmocka_unit_test(test_breaker_opens_on_failure_rate_after_min_calls),
        cmocka_unit_test(test_breaker_rate_rule_sums_every_thread),
        cmocka_unit_test(test_breaker_registry_snapshot),
        cmocka_unit_test(test_breaker_concurrent_use_is_consistent),
        cmocka_unit_test(test_retry_delays_follow_backoff_within_jitter_bounds),
        cmocka_unit_test(test_ratelimit_token_bucket_per_key),
        cmocka_unit_test(test_ratelimit_evicts_idle_and_bounds_keys),
        cmocka_unit_test(test_dedup_ttl_and_lru_bound),
        cmocka_unit_test(test_dedup_durable_store_behind_the_cache),
        cmocka_unit_test(test_timer_wheel_fires_in_due_order_across_rounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
