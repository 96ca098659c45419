/*
 * The bus context (bus.h): configuration defaults and validation, open
 * and close, graceful close (intake stops, accepted events drain, the
 * deadline drops and counts the rest), close_async from a handler, no
 * callback after close returns, statistics and the log callback.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bus_test_util.h"

/* ---- Configuration ---------------------------------------------------- */

static void
test_config_init_fills_documented_defaults(void **state)
{
    bus_ctx_config c;

    (void)state;
    memset(&c, 0xab, sizeof(c));
    bus_ctx_config_init(&c);
    assert_int_equal(c.size, sizeof(c));
    assert_string_equal(c.name, "bus");
    assert_int_equal(c.workers, 2);
    assert_int_equal(c.queue_capacity, 4096);
    assert_int_equal(c.backpressure, BUS_BP_BLOCK);
    assert_int_equal(c.block_timeout_ms, 1000);
    assert_int_equal(c.wait, BUS_WAIT_SPIN_BLOCK);
    assert_int_equal(c.spin_ns, 20000);
    assert_int_equal(c.close_timeout_ms, 5000);
    assert_int_equal(c.topic_cache, 4096);
    assert_null(c.log.fn);

    bus_sub_config sc;
    memset(&sc, 0xab, sizeof(sc));
    bus_sub_config_init(&sc);
    assert_int_equal(sc.size, sizeof(sc));
    assert_int_equal(sc.dispatch, BUS_DISPATCH_QUEUED);
    assert_int_equal(sc.batch_max, 64);
    assert_null(sc.batch_fn);
    assert_null(sc.key_fn);
    assert_null(sc.group);
}

static void
test_open_with_null_or_zeroed_config_uses_defaults(void **state)
{
    bus_ctx_config zero;
    bus_ctx_stats st;
    bus_ctx *ctx = NULL;
    bt_count c = {0};

    (void)state;
    assert_int_equal(bus_ctx_open(&ctx, NULL), BUS_OK);
    assert_non_null(ctx);
    bus_ctx_stats_get(ctx, &st);
    assert_int_equal(st.published, 0);
    assert_int_equal(st.subscriptions, 0);
    assert_int_equal(bus_ctx_close(ctx), 0);

    memset(&zero, 0, sizeof(zero)); /* size 0 too: every field default */
    assert_int_equal(bus_ctx_open(&ctx, &zero), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "a.b", bt_count_handler, &c, NULL, NULL), BUS_OK);
    bt_publish_u64(ctx, "a.b", NULL, 1);
    assert_true(bt_count_wait(&c, 1)); /* queued by default: a worker */
    assert_int_equal(bus_ctx_close(ctx), 0);
}

static void
test_open_rejects_out_of_range_fields_and_logs_why(void **state)
{
    bus_ctx_config c;
    bus_ctx *ctx = (bus_ctx *)&c; /* must be reset to NULL */
    bt_log log;
    int i;

    (void)state;
    bt_log_init(&log);
    for (i = 0; i < 8; i++) {
        bus_ctx_config_init(&c);
        c.log = bt_logger(&log);
        switch (i) {
        case 0:
            c.workers = 257;
            break;
        case 1:
            c.queue_capacity = (1u << 24) + 1;
            break;
        case 2:
            c.block_timeout_ms = -2;
            break;
        case 3:
            c.close_timeout_ms = -2;
            break;
        case 4:
            c.wait = (bus_wait)17;
            break;
        case 5:
            c.backpressure = (bus_backpressure)9;
            break;
        case 6:
            c.size = 8;
            break; /* older than any real layout */
        default:
            c.workers = 100000;
            break;
        }
        ctx = (bus_ctx *)&c;
        assert_int_equal(bus_ctx_open(&ctx, &c), BUS_EINVAL);
        assert_null(ctx);
    }
    assert_true(log.n_err >= 7);
    assert_int_equal(bus_ctx_open(NULL, NULL), BUS_EINVAL);
    pthread_mutex_destroy(&log.mtx);
}

static void
test_limits_at_the_edge_of_the_range_are_accepted(void **state)
{
    bus_ctx_config c;
    bus_ctx *ctx;

    (void)state;
    bus_ctx_config_init(&c);
    c.workers = 1;
    c.queue_capacity = 2;
    c.block_timeout_ms = -1;
    c.close_timeout_ms = -1;
    c.wait = BUS_WAIT_BLOCK;
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

/* ---- A blocked worker, to fill queues deterministically --------------- */

typedef struct blocker {
    bt_gate gate;
    bt_count handled;
} blocker;

/* The first call waits at the gate; every call counts. */
static bus_result
blocker_handler(bus_delivery *d, void *opaque)
{
    blocker *b = opaque;

    (void)d;
    if (atomic_load(&b->gate.entered) == 0)
        bt_gate_wait(&b->gate);
    atomic_fetch_add(&b->handled.n, 1);
    return BUS_ACK;
}

/* Publishes until the first failure; returns how many were accepted and
 * the failure code in *err. */
static uint64_t
fill_until_refused(bus_ctx *ctx, const char *topic, uint64_t max, int *err)
{
    uint64_t n;

    for (n = 0; n < max; n++) {
        bus_event *e = bt_event_u64(NULL, n);
        int rv = bus_publish(ctx, topic, e, 0);
        if (rv != BUS_OK) {
            assert_int_equal(bus_event_refcount(e), 1); /* still ours */
            bus_event_unref(e);
            *err = rv;
            return n;
        }
    }
    *err = BUS_OK;
    return n;
}

static void
test_queue_capacity_is_rounded_up_to_a_power_of_two(void **state)
{
    bus_ctx_config c;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_ctx *ctx;
    blocker b;
    int err;

    (void)state;
    memset(&b, 0, sizeof(b));
    bt_gate_init(&b.gate);
    bus_ctx_config_init(&c);
    c.workers = 1;
    c.queue_capacity = 5; /* becomes 8 */
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    sc.backpressure = BUS_BP_FAIL;
    assert_int_equal(bus_subscribe(ctx, "q", blocker_handler, &b, &sc, NULL),
                     BUS_OK);
    bt_publish_u64(ctx, "q", NULL, 0);
    assert_true(bt_gate_wait_entered(&b.gate, 1)); /* worker holds 1 */
    assert_int_equal(fill_until_refused(ctx, "q", 100, &err), 8);
    assert_int_equal(err, BUS_EAGAIN);
    bt_gate_open(&b.gate);
    assert_true(bt_count_wait(&b.handled, 9));
    assert_int_equal(bus_ctx_close(ctx), 0);
    bt_gate_fini(&b.gate);
}

/* ---- Close ------------------------------------------------------------- */

static void
test_publish_after_close_async_is_eclosed_and_keeps_event(void **state)
{
    bus_ctx *ctx = bt_ctx_open(1);
    bt_count c = {0};
    bus_event *e;

    (void)state;
    assert_int_equal(bus_subscribe(ctx, "a", bt_count_handler, &c, NULL, NULL),
                     BUS_OK);
    bus_ctx_close_async(ctx);
    bus_ctx_close_async(ctx); /* idempotent */
    e = bt_event_u64(NULL, 42);
    assert_int_equal(bus_publish(ctx, "a", e, 0), BUS_ECLOSED);
    assert_int_equal(bus_event_refcount(e), 1);
    assert_int_equal(bt_payload_u64(e), 42);
    assert_int_equal(bus_subscribe(ctx, "b", bt_count_handler, &c, NULL, NULL),
                     BUS_ECLOSED);
    bus_event_unref(e);
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(atomic_load(&c.n), 0);
}

static void
test_close_null_is_a_noop(void **state)
{
    (void)state;
    assert_int_equal(bus_ctx_close(NULL), 0);
    bus_ctx_close_async(NULL);
}

typedef struct slow {
    _Atomic uint64_t handled;
    _Atomic uint64_t last;
    atomic_int order_errors;
} slow;

/* A handler that takes a little time, to leave work queued at close. */
static bus_result
slow_handler(bus_delivery *d, void *opaque)
{
    slow *s = opaque;
    uint64_t v = bt_payload_u64(bus_delivery_event(d));
    uint64_t t0 = bt_now_ns();

    while (bt_now_ns() - t0 < 2000) /* 2 us of work */
        ;
    if (v != atomic_load(&s->last) + 1)
        atomic_fetch_add(&s->order_errors, 1);
    atomic_store(&s->last, v);
    atomic_fetch_add(&s->handled, 1);
    return BUS_ACK;
}

static void
test_close_drains_every_accepted_event(void **state)
{
    bus_ctx *ctx = bt_ctx_open(1);
    slow s;
    uint64_t i, n = 3000;

    (void)state;
    memset(&s, 0, sizeof(s));
    assert_int_equal(bus_subscribe(ctx, "d", slow_handler, &s, NULL, NULL),
                     BUS_OK);
    for (i = 1; i <= n; i++)
        bt_publish_u64(ctx, "d", "one-stream", i);
    /* Most are still queued: close must handle them all, in order. */
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(atomic_load(&s.handled), n);
    assert_int_equal(atomic_load(&s.order_errors), 0);
}

typedef struct stuck {
    bt_gate gate;
    _Atomic uint64_t handled;
} stuck;

/* The first call is a handler that overruns the close deadline: it waits
 * at a gate nobody opens (released by the gate's own limit). */
static bus_result
stuck_handler(bus_delivery *d, void *opaque)
{
    stuck *s = opaque;

    (void)d;
    if (atomic_load(&s->handled) == 0)
        bt_gate_wait_ms(&s->gate, 300);
    atomic_fetch_add(&s->handled, 1);
    return BUS_ACK;
}

static void
test_close_deadline_drops_and_reports_what_is_left(void **state)
{
    bus_ctx_config c;
    bus_ctx *ctx;
    stuck s;
    bt_log log;
    uint64_t dropped, t0, n = 500, i;

    (void)state;
    memset(&s, 0, sizeof(s));
    bt_gate_init(&s.gate);
    bt_log_init(&log);
    bus_ctx_config_init(&c);
    c.workers = 1;
    c.close_timeout_ms = 50;
    c.log = bt_logger(&log);
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "s", stuck_handler, &s, NULL, NULL),
                     BUS_OK);
    for (i = 0; i < n; i++)
        bt_publish_u64(ctx, "s", NULL, i);
    assert_true(bt_gate_wait_entered(&s.gate, 1));
    t0 = bt_now_ns();
    dropped = bus_ctx_close(ctx);
    /* The stuck call finished (C cannot pre-empt it); everything else was
     * dropped once the deadline passed, and counted. */
    assert_int_equal(atomic_load(&s.handled), 1);
    assert_int_equal(dropped, n - 1);
    assert_true(bt_now_ns() - t0 < 5000000000ull);
    assert_true(log.n_warn >= 1);
    assert_non_null(strstr(log.last, "dropped"));
    bt_gate_fini(&s.gate);
    pthread_mutex_destroy(&log.mtx);
}

typedef struct closer_arg {
    bus_ctx *ctx;
    atomic_int returned;
    atomic_int handler_done_at_return;
    atomic_int *handler_done;
    uint64_t dropped;
} closer_arg;

static void *
closer_thread(void *arg)
{
    closer_arg *a = arg;

    a->dropped = bus_ctx_close(a->ctx);
    atomic_store(&a->handler_done_at_return, atomic_load(a->handler_done));
    atomic_store(&a->returned, 1);
    return NULL;
}

typedef struct inline_blocker {
    bt_gate gate;
    atomic_int done;
} inline_blocker;

static bus_result
inline_block_handler(bus_delivery *d, void *opaque)
{
    inline_blocker *b = opaque;

    (void)d;
    bt_gate_wait(&b->gate);
    atomic_store(&b->done, 1);
    return BUS_ACK;
}

typedef struct pub_arg {
    bus_ctx *ctx;
    const char *topic;
    int rv;
} pub_arg;

static void *
publish_one_thread(void *arg)
{
    pub_arg *p = arg;
    bus_event *e = bt_event_u64(NULL, 1);

    p->rv = bus_publish(p->ctx, p->topic, e, 0);
    if (p->rv != BUS_OK)
        bus_event_unref(e);
    return NULL;
}

static int
closer_returned(void *arg)
{
    return atomic_load(&((closer_arg *)arg)->returned);
}

static void
close_waits_for_running_handler(bus_dispatch dispatch)
{
    bus_sub_config sc = bt_sub_cfg(dispatch);
    bus_ctx *ctx = bt_ctx_open(2);
    inline_blocker b;
    closer_arg ca;
    pub_arg pa = {ctx, "x", -1};
    pthread_t pub, closer;

    memset(&b, 0, sizeof(b));
    bt_gate_init(&b.gate);
    memset(&ca, 0, sizeof(ca));
    ca.ctx = ctx;
    ca.handler_done = &b.done;
    assert_int_equal(
        bus_subscribe(ctx, "x", inline_block_handler, &b, &sc, NULL), BUS_OK);
    assert_int_equal(pthread_create(&pub, NULL, publish_one_thread, &pa), 0);
    assert_true(bt_gate_wait_entered(&b.gate, 1));
    assert_int_equal(pthread_create(&closer, NULL, closer_thread, &ca), 0);
    /* The handler is running: close must not return meanwhile. */
    assert_false(bt_wait_for(closer_returned, &ca, 100));
    bt_gate_open(&b.gate);
    assert_int_equal(pthread_join(closer, NULL), 0);
    assert_int_equal(pthread_join(pub, NULL), 0);
    assert_int_equal(pa.rv, BUS_OK);
    assert_int_equal(atomic_load(&ca.handler_done_at_return), 1);
    assert_int_equal(ca.dropped, 0);
    bt_gate_fini(&b.gate);
}

static void
test_close_waits_for_a_running_inline_handler(void **state)
{
    (void)state;
    close_waits_for_running_handler(BUS_DISPATCH_INLINE);
}

static void
test_close_waits_for_a_running_queued_handler(void **state)
{
    (void)state;
    close_waits_for_running_handler(BUS_DISPATCH_QUEUED);
}

typedef struct async_closer {
    bus_ctx *ctx;
    atomic_int calls;
    atomic_int closed;     /* set once the handler's close_async returned */
    atomic_int publish_rv; /* what a publish from the handler got */
} async_closer;

static bus_result
close_async_handler(bus_delivery *d, void *opaque)
{
    async_closer *a = opaque;
    bus_event *e;

    (void)d;
    if (atomic_fetch_add(&a->calls, 1) == 0) {
        bus_ctx_close_async(a->ctx); /* allowed from a handler */
        atomic_store(&a->closed, 1);
        e = bt_event_u64(NULL, 2);
        atomic_store(&a->publish_rv, bus_publish(a->ctx, "h", e, 0));
        bus_event_unref(e); /* ECLOSED: still ours */
    }
    return BUS_ACK;
}

/* Not calls: the handler counts its call before it closes, so a publish
 * right after calls moved could still be accepted. */
static int
async_closer_closed(void *arg)
{
    return atomic_load(&((async_closer *)arg)->closed);
}

static void
close_async_from_handler(bus_dispatch dispatch)
{
    bus_sub_config sc = bt_sub_cfg(dispatch);
    bus_ctx *ctx = bt_ctx_open(1);
    async_closer a;
    bus_event *e;

    memset(&a, 0, sizeof(a));
    a.ctx = ctx;
    atomic_store(&a.publish_rv, -1);
    assert_int_equal(
        bus_subscribe(ctx, "h", close_async_handler, &a, &sc, NULL), BUS_OK);
    bt_publish_u64(ctx, "h", NULL, 1);
    assert_true(bt_wait_for(async_closer_closed, &a, BT_WAIT_MS));
    e = bt_event_u64(NULL, 3);
    assert_int_equal(bus_publish(ctx, "h", e, 0), BUS_ECLOSED);
    bus_event_unref(e);
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(atomic_load(&a.calls), 1);
    assert_int_equal(atomic_load(&a.publish_rv), BUS_ECLOSED);
}

static void
test_close_async_from_a_queued_handler_stops_intake(void **state)
{
    (void)state;
    close_async_from_handler(BUS_DISPATCH_QUEUED);
}

static void
test_close_async_from_an_inline_handler_stops_intake(void **state)
{
    (void)state;
    close_async_from_handler(BUS_DISPATCH_INLINE);
}

/* Publishers race close_async; every publish that returned BUS_OK is
 * handled before close returns, and nothing runs after it. */
typedef struct race {
    bus_ctx *ctx;
    _Atomic uint64_t accepted;
    _Atomic uint64_t handled;
    atomic_int after_close; /* set once close returned */
    atomic_int late_calls;  /* handler calls that saw after_close */
    atomic_int bad_rv;      /* publish failures other than ECLOSED */
} race;

static bus_result
race_handler(bus_delivery *d, void *opaque)
{
    race *r = opaque;

    (void)d;
    if (atomic_load(&r->after_close))
        atomic_fetch_add(&r->late_calls, 1);
    atomic_fetch_add(&r->handled, 1);
    return BUS_ACK;
}

static void *
race_publisher(void *arg)
{
    race *r = arg;
    uint64_t i;

    for (i = 0;; i++) {
        bus_event *e = bt_event_u64(i % 2 ? "s1" : "s2", i);
        int rv = bus_publish(r->ctx, i % 3 ? "r.q" : "r.i", e, 0);
        if (rv != BUS_OK) {
            bus_event_unref(e);
            if (rv != BUS_ECLOSED) /* no cmocka assert off the main thread */
                atomic_fetch_add(&r->bad_rv, 1);
            return NULL; /* stop touching ctx: it is closing */
        }
        atomic_fetch_add(&r->accepted, 1);
    }
}

static int
race_some_accepted(void *arg)
{
    return atomic_load(&((race *)arg)->accepted) >= 2000;
}

static void
test_every_accepted_event_is_handled_and_none_after_close(void **state)
{
    bus_sub_config q = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    pthread_t th[3];
    race r;
    int i;

    (void)state;
    memset(&r, 0, sizeof(r));
    r.ctx = bt_ctx_open(2);
    assert_int_equal(bus_subscribe(r.ctx, "r.q", race_handler, &r, &q, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(r.ctx, "r.i", race_handler, &r, &in, NULL),
                     BUS_OK);
    for (i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&th[i], NULL, race_publisher, &r), 0);
    assert_true(bt_wait_for(race_some_accepted, &r, BT_WAIT_MS));
    bus_ctx_close_async(r.ctx);
    for (i = 0; i < 3; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    assert_int_equal(bus_ctx_close(r.ctx), 0);
    atomic_store(&r.after_close, 1);
    assert_int_equal(atomic_load(&r.handled), atomic_load(&r.accepted));
    assert_int_equal(atomic_load(&r.late_calls), 0);
    assert_int_equal(atomic_load(&r.bad_rv), 0);
}

/* ---- Statistics and logging --------------------------------------------- */

static void
test_stats_count_publishes_deliveries_and_unmatched(void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = bt_ctx_open(1);
    bus_ctx_stats st;
    bus_sub_stats ss;
    bt_count a = {0}, b = {0};
    bus_sub *sa, *sb;

    (void)state;
    assert_int_equal(bus_subscribe(ctx, "s.a", bt_count_handler, &a, &in, &sa),
                     BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "s.*", bt_count_handler, &b, NULL, &sb),
                     BUS_OK);
    bt_publish_u64(ctx, "s.a", NULL, 1); /* both */
    bt_publish_u64(ctx, "s.b", NULL, 2); /* sb */
    bt_publish_u64(ctx, "t", NULL, 3);   /* nobody */
    assert_true(bt_count_wait(&b, 2));
    bus_ctx_stats_get(ctx, &st);
    assert_int_equal(st.published, 3);
    assert_int_equal(st.no_subscriber, 1);
    assert_int_equal(st.rejected_full, 0);
    assert_int_equal(st.delivered, 3);
    assert_int_equal(st.subscriptions, 2);
    bus_sub_stats_get(sa, &ss);
    assert_int_equal(ss.delivered, 1);
    assert_int_equal(ss.ok, 1);
    assert_int_equal(ss.dropped, 0);
    bus_sub_stats_get(sb, &ss);
    assert_int_equal(ss.delivered, 2);
    assert_int_equal(bus_unsubscribe(sa), BUS_OK);
    bus_ctx_stats_get(ctx, &st);
    assert_int_equal(st.subscriptions, 1);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

static void
test_invalid_pattern_is_logged_with_the_reason(void **state)
{
    bus_ctx_config c;
    bus_ctx *ctx;
    bt_log log;
    bt_count n = {0};

    (void)state;
    bt_log_init(&log);
    bus_ctx_config_init(&c);
    c.log = bt_logger(&log);
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "a..b", bt_count_handler, &n, NULL, NULL),
        BUS_EINVAL);
    assert_int_equal(log.n_err, 1);
    assert_non_null(strstr(log.last, "a..b"));
    assert_int_equal(bus_ctx_close(ctx), 0);
    pthread_mutex_destroy(&log.mtx);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_init_fills_documented_defaults),
        cmocka_unit_test(test_open_with_null_or_zeroed_config_uses_defaults),
        cmocka_unit_test(test_open_rejects_out_of_range_fields_and_logs_why),
        cmocka_unit_test(test_limits_at_the_edge_of_the_range_are_accepted),
        cmocka_unit_test(test_queue_capacity_is_rounded_up_to_a_power_of_two),
        cmocka_unit_test(
            test_publish_after_close_async_is_eclosed_and_keeps_event),
        cmocka_unit_test(test_close_null_is_a_noop),
        cmocka_unit_test(test_close_drains_every_accepted_event),
        cmocka_unit_test(test_close_deadline_drops_and_reports_what_is_left),
        cmocka_unit_test(test_close_waits_for_a_running_inline_handler),
        cmocka_unit_test(test_close_waits_for_a_running_queued_handler),
        cmocka_unit_test(test_close_async_from_a_queued_handler_stops_intake),
        cmocka_unit_test(test_close_async_from_an_inline_handler_stops_intake),
        cmocka_unit_test(
            test_every_accepted_event_is_handled_and_none_after_close),
        cmocka_unit_test(test_stats_count_publishes_deliveries_and_unmatched),
        cmocka_unit_test(test_invalid_pattern_is_logged_with_the_reason),
    };

    bt_filter_from_env();
    return cmocka_run_group_tests_name("bus_ctx", tests, NULL, NULL);
}
