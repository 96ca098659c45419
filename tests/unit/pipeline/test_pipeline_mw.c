/*
 * Middlewares and the failure policy, driven directly through
 * bus_chain_run with deliveries built as the dispatcher builds them and a
 * manual clock: chain order and dump, in-place retry, deferred retry on
 * the timer wheel not blocking other keys, dead-letter contents, no-sink
 * logging, reclassification, breaker refusals, dedup, rate limit, deadline,
 * metrics, the 3-handler tracing chain, the stacks, and concurrent use
 * (TSan).
 */
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <bus/middleware.h>
#include <bus/trace.h>

#include "delivery.h"
#include "timerwheel.h"

#define MS 1000000ull

static bus_event *
mkev(const char *stream)
{
    bus_event *e;
    bus_event_init in;

    memset(&in, 0, sizeof(in));
    in.type = "t.happened";
    in.stream = stream;
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    bus_event_freeze(e);
    return e;
}

/* ---- Chain order ----------------------------------------------------------- */

typedef struct order_log {
    char s[128];
} order_log;

static order_log g_order;

static bus_result
tag_mw(bus_delivery *d, const bus_next *next, void *state)
{
    strcat(g_order.s, (const char *)state);
    return bus_next_call(next, d);
}

static bus_result
ok_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    if (opaque != NULL)
        (*(int *)opaque)++;
    strcat(g_order.s, "H");
    return BUS_ACK;
}

static void
test_chain_runs_bus_then_subscription_then_handler(void **state)
{
    bus_chain *outer, *inner;
    bus_middleware mw = {0};
    bus_delivery d;
    bus_event *e = mkev("s");
    char dump[256];
    size_t len;
    int calls = 0;

    (void)state;
    assert_int_equal(bus_chain_new(&outer), BUS_OK);
    assert_int_equal(bus_chain_new(&inner), BUS_OK);
    mw.fn = tag_mw;
    mw.name = "a";
    mw.state = "a";
    assert_int_equal(bus_chain_append(outer, &mw), BUS_OK);
    mw.name = "b";
    mw.state = "b";
    assert_int_equal(bus_chain_append(outer, &mw), BUS_OK);
    mw.name = "c";
    mw.state = "c";
    assert_int_equal(bus_chain_append(inner, &mw), BUS_OK);
    g_order.s[0] = '\0';
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(outer, inner, &d, ok_handler, &calls),
                     BUS_ACK);
    assert_string_equal(g_order.s, "abcH");
    g_order.s[0] = '\0';
    assert_int_equal(bus_chain_run(NULL, inner, &d, ok_handler, &calls),
                     BUS_ACK);
    assert_string_equal(g_order.s, "cH");
    g_order.s[0] = '\0';
    assert_int_equal(bus_chain_run(NULL, NULL, &d, ok_handler, &calls),
                     BUS_ACK);
    assert_string_equal(g_order.s, "H");
    assert_int_equal(calls, 3);
    assert_int_equal(bus_chain_dump(outer, inner, dump, sizeof(dump), &len),
                     BUS_OK);
    assert_string_equal(dump, "1. a (bus)\n2. b (bus)\n3. c (subscription)\n"
                              "-> handler\n");
    assert_int_equal(bus_chain_dump(outer, inner, dump, 5, &len), BUS_ENOBUFS);
    assert_int_equal(len, strlen("1. a (bus)\n2. b (bus)\n3. c (subscription)"
                                 "\n-> handler\n"));
    bus_chain_free(outer);
    bus_chain_free(inner);
    bus_event_unref(e);
}

/* ---- Failure policy -------------------------------------------------------- */

typedef struct flaky {
    int fail_first; /* fail this many calls */
    bus_result how; /* RETRY or REJECT */
    int code;
    int calls;
    uint32_t attempts[16];
} flaky;

static bus_result
flaky_handler(bus_delivery *d, void *opaque)
{
    flaky *f = opaque;

    if (f->calls < 16)
        f->attempts[f->calls] = bus_delivery_attempt(d);
    if (f->calls++ < f->fail_first) {
        bus_delivery_set_error(d, f->code, "boom %d", f->calls);
        return f->how;
    }
    return BUS_ACK;
}

typedef struct retries_seen {
    int n;
    uint32_t attempt[8];
    uint64_t delay[8];
    int code[8];
    char msg[8][32];
} retries_seen;

static void
on_retry(void *opaque, const bus_delivery *d, uint32_t attempt,
         uint64_t delay_ns, int code, const char *msg)
{
    retries_seen *r = opaque;

    (void)d;
    if (r->n < 8) {
        r->attempt[r->n] = attempt;
        r->delay[r->n] = delay_ns;
        r->code[r->n] = code;
        snprintf(r->msg[r->n], sizeof(r->msg[0]), "%s", msg);
    }
    r->n++;
}

typedef struct dlq_sink {
    int n;
    char topic[128];
    bus_event *ev;
} dlq_sink;

static int
dlq_publish(void *opaque, const char *topic, bus_event *ev)
{
    dlq_sink *s = opaque;

    s->n++;
    snprintf(s->topic, sizeof(s->topic), "%s", topic);
    bus_event_unref(s->ev);
    s->ev = ev;
    return BUS_OK;
}

static bus_chain *
policy_chain(const bus_failure_policy *p)
{
    bus_chain *c;
    bus_middleware mw;

    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_policy(&mw, p), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    return c;
}

static void
test_policy_retries_in_place_with_backoff(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    retries_seen rs = {0};
    flaky f = {.fail_first = 2, .how = BUS_RETRY, .code = 7};
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.retry.jitter = BUS_JITTER_NONE;
    p.retry.initial_ms = 10;
    p.on_retry = on_retry;
    p.on_retry_opaque = &rs;
    p.clock = mc.clock;
    c = policy_chain(&p);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f), BUS_ACK);
    assert_int_equal(f.calls, 3);
    assert_int_equal(f.attempts[0], 1);
    assert_int_equal(f.attempts[2], 3);
    assert_int_equal(bus_delivery_retries(&d), 2);
    assert_int_equal(rs.n, 2);
    assert_int_equal(rs.attempt[0], 1);
    assert_int_equal(rs.delay[0], 10 * MS);
    assert_int_equal(rs.delay[1], 20 * MS);
    /* each retry's callback gets the failure it follows */
    assert_int_equal(rs.code[0], 7);
    assert_string_equal(rs.msg[0], "boom 1");
    assert_int_equal(rs.code[1], 7);
    assert_string_equal(rs.msg[1], "boom 2");
    /* the waits went through the clock: no real sleep */
    assert_int_equal(bus_manual_clock_get(&mc), 1030 * MS);
    bus_chain_free(c);
    bus_event_unref(e);
}

static void
test_policy_dead_letters_with_failure_headers(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    flaky f = {.fail_first = 100, .how = BUS_RETRY, .code = 42};
    dlq_sink sink = {0};
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");
    int64_t first, last;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.retry.max_attempts = 3;
    p.dlq_publish = dlq_publish;
    p.dlq_opaque = &sink;
    p.clock = mc.clock;
    c = policy_chain(&p);
    bus__delivery_init(&d, e, "orders.placed", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_int_equal(f.calls, 3);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_DEAD_LETTER);
    assert_int_equal(sink.n, 1);
    assert_string_equal(sink.topic, "orders.placed.dlq");
    assert_memory_equal(bus_event_id(sink.ev), bus_event_id(e), 16);
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_TOPIC),
                        "orders.placed");
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_SUBSCRIPTION),
                        "billing");
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_ERROR_CODE), "42");
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_ERROR), "boom 3");
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_ATTEMPTS), "3");
    first = strtoll(bus_event_header(sink.ev, BUS_H_DLQ_FIRST_FAILURE), NULL,
                    10);
    last = strtoll(bus_event_header(sink.ev, BUS_H_DLQ_LAST_FAILURE), NULL, 10);
    assert_true(first > 0 && last >= first);

    /* a permanent error goes at once, to a configured topic */
    bus_chain_free(c);
    p.dlq_topic = "dead.%s";
    c = policy_chain(&p);
    f.calls = 0;
    f.how = BUS_REJECT;
    bus__delivery_init(&d, e, "orders.placed", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_int_equal(f.calls, 1);
    assert_int_equal(sink.n, 2);
    assert_string_equal(sink.topic, "dead.orders.placed");
    assert_string_equal(bus_event_header(sink.ev, BUS_H_DLQ_ATTEMPTS), "1");

    /* a dead letter that fails is not dead-lettered again */
    bus_event *dl = bus_event_ref(sink.ev);
    bus_event_freeze(dl);
    bus__delivery_init(&d, dl, "dead.orders.placed", "x", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_int_equal(sink.n, 2);
    bus_event_unref(dl);
    bus_event_unref(sink.ev);
    bus_chain_free(c);
    bus_event_unref(e);
}

typedef struct log_capture {
    int n;
    char last[512];
} log_capture;

static void
capture_log(void *opaque, bus_log_level level, const char *subsys,
            const char *msg)
{
    log_capture *lc = opaque;

    (void)level;
    (void)subsys;
    lc->n++;
    snprintf(lc->last, sizeof(lc->last), "%s", msg);
}

static bus_result
classify_42_permanent(void *opaque, bus_result r, int code)
{
    (void)opaque;
    return code == 42 ? BUS_REJECT : r;
}

static void
test_policy_without_sink_logs_and_reclassifies(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    flaky f = {.fail_first = 100, .how = BUS_RETRY, .code = 42};
    log_capture lc = {0};
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.classify = classify_42_permanent;
    p.log.fn = capture_log;
    p.log.opaque = &lc;
    p.clock = mc.clock;
    c = policy_chain(&p);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_int_equal(f.calls, 1); /* reclassified permanent: no retry */
    assert_int_equal(lc.n, 1);
    assert_non_null(strstr(lc.last, "no dead-letter sink"));
    assert_non_null(strstr(lc.last, "boom 1"));
    bus_chain_free(c);
    bus_event_unref(e);
}

static void
test_policy_max_elapsed_bounds_the_last_retry(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    retries_seen rs = {0};
    flaky f = {.fail_first = 100, .how = BUS_RETRY, .code = 3};
    dlq_sink sink = {0};
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.retry.backoff = BUS_BACKOFF_FIXED;
    p.retry.jitter = BUS_JITTER_NONE;
    p.retry.initial_ms = 600;
    p.retry.max_attempts = 10;
    p.retry.max_elapsed_ms = 1000;
    p.on_retry = on_retry;
    p.on_retry_opaque = &rs;
    p.dlq_publish = dlq_publish;
    p.dlq_opaque = &sink;
    p.clock = mc.clock;
    c = policy_chain(&p);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    /* fails at 0 and at 600 ms; a third call would start at 1200 ms,
     * past max_elapsed: the second failure is the last */
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_int_equal(f.calls, 2);
    assert_int_equal(rs.n, 1);
    assert_int_equal(sink.n, 1);
    assert_int_equal(bus_manual_clock_get(&mc), 1600 * MS);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_DEAD_LETTER);
    bus_chain_free(c);
    bus_event_unref(sink.ev);
    bus_event_unref(e);
}

/* ---- Deferred retry on the timer wheel ------------------------------------ */

typedef struct parked {
    bus__timer t;
    bus_event *ev;
    char topic[64];
    uint32_t attempt;
    uint64_t first_fail_ns;
    struct worker *w;
} parked;

/* A miniature dispatcher: a FIFO of events and a wheel of parked retries. */
typedef struct worker {
    bus__twheel wheel;
    parked *queue[16];
    int qh, qt;
    bus_chain *chain;
    flaky *f;
    char handled[64];
} worker;

static void
redeliver(bus__timer *t, void *arg)
{
    parked *p = arg;

    (void)t;
    p->w->queue[p->w->qt++ % 16] = p;
}

static int
defer_to_wheel(void *opaque, bus_delivery *d, uint64_t due_ns)
{
    worker *w = opaque;
    parked *p = calloc(1, sizeof(*p));

    p->ev = bus_event_ref(d->event);
    snprintf(p->topic, sizeof(p->topic), "%s", d->topic);
    p->attempt = d->attempt + 1;
    p->first_fail_ns = d->first_fail_ns;
    p->w = w;
    p->t.due_ns = due_ns;
    p->t.fn = redeliver;
    p->t.arg = p;
    bus__twheel_add(&w->wheel, &p->t);
    return BUS_OK;
}

static bus_result
keyed_handler(bus_delivery *d, void *opaque)
{
    worker *w = opaque;
    const char *s = bus_event_stream(d->event);

    /* stream "a" fails on its first attempt only */
    if (strcmp(s, "a") == 0 && bus_delivery_attempt(d) == 1) {
        bus_delivery_set_error(d, BUS_EUNAVAIL, "later");
        return BUS_RETRY;
    }
    strcat(w->handled, s);
    return BUS_ACK;
}

static void
worker_drain(worker *w)
{
    while (w->qh != w->qt) {
        parked *p = w->queue[w->qh++ % 16];
        bus_delivery d;

        bus__delivery_init(&d, p->ev, p->topic, "sub", p->attempt, 0, NULL);
        d.first_fail_ns = p->first_fail_ns;
        bus_chain_run(NULL, w->chain, &d, keyed_handler, w);
        bus_event_unref(p->ev);
        free(p);
    }
}

static void
test_deferred_retry_does_not_block_other_keys(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    worker w;
    const char *streams[] = {"a", "b", "c"};

    (void)state;
    memset(&w, 0, sizeof(w));
    bus_manual_clock_init(&mc, 1000 * MS);
    assert_int_equal(bus__twheel_init(&w.wheel, MS, 64, 1000 * MS), BUS_OK);
    bus_failure_policy_init(&p);
    p.retry.jitter = BUS_JITTER_NONE;
    p.retry.initial_ms = 50;
    p.defer = defer_to_wheel;
    p.defer_opaque = &w;
    p.clock = mc.clock;
    w.chain = policy_chain(&p);
    for (int i = 0; i < 3; i++) {
        parked *q = calloc(1, sizeof(*q));
        q->ev = mkev(streams[i]);
        strcpy(q->topic, "t.x");
        q->attempt = 1;
        w.queue[w.qt++] = q;
    }
    worker_drain(&w);
    /* a was parked: b and c went ahead without waiting for its delay */
    assert_string_equal(w.handled, "bc");
    assert_int_equal(bus__twheel_count(&w.wheel), 1);
    assert_int_equal(bus_manual_clock_get(&mc), 1000 * MS); /* nobody slept */
    assert_int_equal(bus__twheel_advance(&w.wheel, 1049 * MS), 0);
    bus_manual_clock_advance(&mc, 50 * MS);
    assert_int_equal(bus__twheel_advance(&w.wheel, bus_manual_clock_get(&mc)),
                     1);
    worker_drain(&w);
    assert_string_equal(w.handled, "bca");
    bus_chain_free(w.chain);
    bus__twheel_fini(&w.wheel);
}

/* ---- Breaker in the policy -------------------------------------------------- */

static void
test_open_breaker_refuses_without_calling_handler(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config bc;
    bus_breaker *b;
    bus_failure_policy p;
    flaky f = {.fail_first = 2, .how = BUS_RETRY, .code = 1};
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&bc);
    bc.failure_threshold = 2;
    bc.open_ms = 1000;
    bc.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &bc), BUS_OK);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.retry.max_attempts = 2;
    p.breaker = b;
    p.clock = mc.clock;
    c = policy_chain(&p);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT); /* 2 failures: dead-lettered, breaker open */
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_OPEN);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f), BUS_RETRY);
    assert_int_equal(f.calls, 2); /* not called */
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_BREAKER);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_NACK);
    assert_int_equal(bus_delivery_error_code(&d), BUS_EUNAVAIL);
    bus_manual_clock_advance(&mc, 1000 * MS); /* half-open probe succeeds */
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f), BUS_ACK);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    bus_chain_free(c);
    bus_breaker_free(b);
    bus_event_unref(e);
}

/* ---- Dedup, rate limit, deadline, metrics ----------------------------------- */

static uint64_t
counter(bus_metrics *m, const char *name, const char *topic, const char *sub,
        const char *reason)
{
    bus_metrics_snapshot *s;
    bus_label l[3] = {{"topic", topic}, {"subscription", sub},
                      {"reason", reason}};
    const bus_metric_series *se;
    uint64_t v = UINT64_MAX;

    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    se = bus_metrics_snapshot_find(s, name, l, reason ? 3 : 2);
    if (se != NULL)
        v = se->counter;
    bus_metrics_snapshot_free(s);
    return v;
}

static bus_result
slow_handler(bus_delivery *d, void *opaque)
{
    bus_manual_clock *mc = opaque;

    assert_true(bus_delivery_deadline(d) != 0);
    bus_manual_clock_advance(mc, 150 * MS);
    return BUS_ACK;
}

static void
test_dedup_ratelimit_deadline_and_metrics(void **state)
{
    bus_manual_clock mc;
    bus_metrics *m;
    bus_dedup_config dc;
    bus_dedup *dd;
    bus_ratelimit_config rc;
    bus_ratelimit *rl;
    bus_mw_ratelimit_config mrc;
    bus_chain *c;
    bus_middleware mw;
    bus_delivery d;
    bus_event *e1 = mkev("s1"), *e2 = mkev("s1");
    bus_counter *overruns;
    log_capture lc = {0};
    bus_logger lg = {capture_log, &lc, BUS_LOG_DEBUG};
    int calls = 0;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    bus_dedup_config_init(&dc);
    dc.clock = mc.clock;
    assert_int_equal(bus_dedup_new(&dd, &dc), BUS_OK);
    bus_ratelimit_config_init(&rc);
    rc.rate = 10;
    rc.capacity = 1;
    rc.clock = mc.clock;
    assert_int_equal(bus_ratelimit_new(&rl, &rc), BUS_OK);
    assert_int_equal(bus_metrics_counter(m, "overruns_total", NULL, NULL, 0,
                                         &overruns), BUS_OK);

    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_metrics(&mw, m, "sub"), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    assert_int_equal(bus_mw_dedup(&mw, dd), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    memset(&mrc, 0, sizeof(mrc));
    mrc.rl = rl;
    mrc.mode = BUS_RL_REJECT;
    assert_int_equal(bus_mw_ratelimit(&mw, &mrc), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);

    bus__delivery_init(&d, e1, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, ok_handler, &calls), BUS_ACK);
    bus__delivery_init(&d, e1, "t.x", "sub", 1, 0, NULL); /* redelivery */
    assert_int_equal(bus_chain_run(NULL, c, &d, ok_handler, &calls), BUS_ACK);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_DUPLICATE);
    assert_int_equal(calls, 1);
    bus__delivery_init(&d, e2, "t.x", "sub", 1, 0, NULL); /* no token left */
    assert_int_equal(bus_chain_run(NULL, c, &d, ok_handler, &calls), BUS_RETRY);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_RATE_LIMIT);
    assert_int_equal(bus_delivery_error_code(&d), BUS_EAGAIN);
    assert_int_equal(calls, 1);

    assert_int_equal(counter(m, "bus_deliveries_total", "t.x", "sub", NULL), 3);
    assert_int_equal(counter(m, "bus_deliveries_ok_total", "t.x", "sub", NULL),
                     1);
    assert_int_equal(counter(m, "bus_duplicates_dropped_total", "t.x", "sub",
                             NULL), 1);
    assert_int_equal(counter(m, "bus_deliveries_refused_total", "t.x", "sub",
                             "rate_limit"), 1);
    assert_int_equal(counter(m, "bus_deliveries_refused_total", "t.x", "sub",
                             "breaker"), 0);
    bus_chain_free(c);

    /* delay mode waits on the clock; the deadline middleware counts and
     * logs an overrun with the handler's name */
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    mrc.mode = BUS_RL_DELAY;
    mrc.clock = mc.clock;
    assert_int_equal(bus_mw_ratelimit(&mw, &mrc), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    assert_int_equal(bus_mw_deadline(&mw, 100, &lg, overruns, &mc.clock),
                     BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    uint64_t t0 = bus_manual_clock_get(&mc);
    bus__delivery_init(&d, e2, "t.x", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, slow_handler, &mc), BUS_ACK);
    /* waited ~100 ms for a token, then ran 150 ms */
    assert_in_range(bus_manual_clock_get(&mc) - t0, 249 * MS, 251 * MS);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_OVERRUN);
    assert_int_equal(bus_counter_value(overruns), 1);
    assert_non_null(strstr(lc.last, "billing"));
    bus_chain_free(c);

    bus_counter_release(overruns);
    bus_ratelimit_free(rl);
    bus_dedup_free(dd);
    bus_metrics_free(m);
    bus_event_unref(e1);
    bus_event_unref(e2);
}

/* Runs a delivery that fails for good through metrics -> policy p (a
 * fresh registry: a series goes with the last handle on it) and checks
 * the flag it ends with and the two counters. */
static void
final_failure(const bus_failure_policy *p, unsigned want_flag,
              unsigned not_flag, uint64_t want_failed, uint64_t want_dead)
{
    flaky f = {.fail_first = 100, .how = BUS_REJECT, .code = 9};
    bus_metrics *m;
    bus_middleware mw;
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");

    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_metrics(&mw, m, "sub"), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    assert_int_equal(bus_mw_policy(&mw, p), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                     BUS_REJECT);
    assert_true(bus_delivery_flags(&d) & want_flag);
    assert_false(bus_delivery_flags(&d) & not_flag);
    assert_int_equal(counter(m, "bus_deliveries_failed_total", "t.x", "sub",
                             NULL), want_failed);
    assert_int_equal(counter(m, "bus_deliveries_dead_lettered_total", "t.x",
                             "sub", NULL), want_dead);
    bus_chain_free(c);
    bus_metrics_free(m);
    bus_event_unref(e);
}

/* A failure with nowhere to go is counted apart from dead letters. */
static void
test_failure_without_sink_is_counted_not_dead_lettered(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    log_capture lc = {0};
    dlq_sink sink = {0};

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.log.fn = capture_log;
    p.log.opaque = &lc;
    p.clock = mc.clock;
    final_failure(&p, BUS_DELIVERY_F_DLQ_FAILED, BUS_DELIVERY_F_DEAD_LETTER,
                  1, 0);
    assert_int_equal(lc.n, 1); /* logged */
    /* the same with a sink: a dead letter, not a failure */
    p.dlq_publish = dlq_publish;
    p.dlq_opaque = &sink;
    final_failure(&p, BUS_DELIVERY_F_DEAD_LETTER, BUS_DELIVERY_F_DLQ_FAILED,
                  0, 1);
    assert_int_equal(sink.n, 1);
    bus_event_unref(sink.ev);
}

typedef struct tenant_key {
    int calls;
} tenant_key;

static size_t
first_letter_key(const bus_delivery *d, void *opaque, char *buf, size_t cap)
{
    tenant_key *k = opaque;
    const char *t = bus_event_header(bus_delivery_event(d), "tenant");

    k->calls++;
    if (cap < 1 || t == NULL)
        return 0;
    buf[0] = t[0];
    return 1;
}

static bus_event *
mkev_tenant(const char *tenant)
{
    bus_event *e;
    bus_event_init in;
    bus_header h = {"tenant", tenant};

    memset(&in, 0, sizeof(in));
    in.type = "t.happened";
    in.stream = "same-stream";
    in.headers = &h;
    in.n_headers = 1;
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    bus_event_freeze(e);
    return e;
}

static bus_result
rl_run(bus_chain *c, bus_event *e, int *calls)
{
    bus_delivery d;

    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    return bus_chain_run(NULL, c, &d, ok_handler, calls);
}

/* Keys from a header or a key function, and a cost per event. */
static void
test_ratelimit_keys_from_a_header_or_a_function_with_a_cost(void **state)
{
    bus_manual_clock mc;
    bus_ratelimit_config rc;
    bus_ratelimit *rl;
    bus_ratelimit_status st;
    bus_mw_ratelimit_config mrc;
    bus_middleware mw;
    bus_chain *c;
    tenant_key tk = {0};
    bus_event *a1 = mkev_tenant("acme"), *a2 = mkev_tenant("apex"),
              *b1 = mkev_tenant("bolt");
    int calls = 0;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_ratelimit_config_init(&rc);
    rc.rate = 1; /* a token a second */
    rc.capacity = 3;
    rc.clock = mc.clock;
    assert_int_equal(bus_ratelimit_new(&rl, &rc), BUS_OK);
    memset(&mrc, 0, sizeof(mrc));
    mrc.rl = rl;
    mrc.mode = BUS_RL_REJECT;
    mrc.header = "tenant";
    mrc.cost = 2;
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_ratelimit(&mw, &mrc), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    /* all three share a stream: only the header tells them apart */
    assert_int_equal(rl_run(c, a1, &calls), BUS_ACK); /* acme: 3 -> 1 */
    assert_int_equal(rl_run(c, a1, &calls), BUS_RETRY); /* 1 < cost 2 */
    assert_int_equal(rl_run(c, a2, &calls), BUS_ACK);   /* apex: its own */
    assert_int_equal(rl_run(c, b1, &calls), BUS_ACK);   /* bolt: its own */
    assert_int_equal(calls, 3);
    bus_ratelimit_status_get(rl, "acme", 4, &st);
    assert_true(st.known);
    assert_true(st.tokens > 0.99 && st.tokens < 1.01);
    bus_manual_clock_advance(&mc, 1000 * MS); /* acme refills to 2 */
    assert_int_equal(rl_run(c, a1, &calls), BUS_ACK);
    bus_chain_free(c);

    /* a key function: one bucket for every tenant starting with 'a' */
    bus_ratelimit_free(rl);
    assert_int_equal(bus_ratelimit_new(&rl, &rc), BUS_OK);
    mrc.rl = rl;
    mrc.header = NULL;
    mrc.key_fn = first_letter_key;
    mrc.key_opaque = &tk;
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_ratelimit(&mw, &mrc), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    calls = 0;
    assert_int_equal(rl_run(c, a1, &calls), BUS_ACK);   /* 'a': 3 -> 1 */
    assert_int_equal(rl_run(c, a2, &calls), BUS_RETRY); /* same bucket */
    assert_int_equal(rl_run(c, b1, &calls), BUS_ACK);   /* 'b' */
    assert_int_equal(calls, 2);
    assert_int_equal(tk.calls, 3);
    bus_ratelimit_status_get(rl, "a", 1, &st);
    assert_true(st.known);
    assert_true(st.tokens > 0.99 && st.tokens < 1.01);
    bus_chain_free(c);
    bus_ratelimit_free(rl);
    bus_event_unref(a1);
    bus_event_unref(a2);
    bus_event_unref(b1);
}

/* A rate limiter inside the policy (as in the production stack): its
 * refusals take retries, but the breaker, which watches the handler,
 * does not count them. */
static void
test_rate_limit_refusals_do_not_trip_the_breaker(void **state)
{
    bus_manual_clock mc;
    bus_breaker_config bc;
    bus_breaker *b;
    bus_breaker_stats bst;
    bus_failure_policy p;
    bus_ratelimit_config rc;
    bus_ratelimit *rl;
    bus_mw_ratelimit_config mrc;
    bus_middleware mw;
    bus_chain *c;
    bus_delivery d;
    bus_event *e = mkev("s");
    int calls = 0;

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    bus_breaker_config_init(&bc);
    bc.failure_threshold = 1;
    bc.clock = mc.clock;
    assert_int_equal(bus_breaker_new(&b, &bc), BUS_OK);
    bus_ratelimit_config_init(&rc);
    rc.rate = 0.001; /* one token, then none for the test's time */
    rc.capacity = 1;
    rc.clock = mc.clock;
    assert_int_equal(bus_ratelimit_new(&rl, &rc), BUS_OK);
    bus_failure_policy_init(&p);
    p.mode = BUS_RETRY_IN_PLACE;
    p.retry.jitter = BUS_JITTER_NONE;
    p.retry.max_attempts = 3;
    p.breaker = b;
    p.clock = mc.clock;
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_policy(&mw, &p), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    memset(&mrc, 0, sizeof(mrc));
    mrc.rl = rl;
    mrc.mode = BUS_RL_REJECT;
    assert_int_equal(bus_mw_ratelimit(&mw, &mrc), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, ok_handler, &calls), BUS_ACK);
    bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
    /* refused three times: retried, then failed for good */
    assert_int_equal(bus_chain_run(NULL, c, &d, ok_handler, &calls),
                     BUS_REJECT);
    assert_int_equal(calls, 1);
    assert_int_equal(bus_delivery_retries(&d), 2);
    assert_int_equal(bus_breaker_state_get(b), BUS_BREAKER_CLOSED);
    bus_breaker_stats_get(b, &bst);
    assert_int_equal(bst.failures, 0);
    bus_chain_free(c);
    bus_ratelimit_free(rl);
    bus_breaker_free(b);
    bus_event_unref(e);
}

static bus_result
overrun_handler(bus_delivery *d, void *opaque)
{
    bus_manual_clock *mc = opaque;

    (void)d;
    bus_manual_clock_advance(mc, 150 * MS);
    return BUS_ACK;
}

/* The stacks' deadline counts overruns in the stack's metrics, as a
 * subscription's deadline_ms does. */
static void
test_stack_deadline_counts_overruns(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_metrics *m;
    bus_metrics_snapshot *snap;
    bus_stack_config sc;
    bus_label l = {"subscription", "billing"};
    const bus_metric_series *se;
    bus_chain *c, *c2;
    bus_delivery d;
    bus_event *e = mkev("s");

    (void)state;
    bus_manual_clock_init(&mc, 1000 * MS);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    bus_failure_policy_init(&p);
    p.clock = mc.clock;
    bus_stack_config_init(&sc);
    sc.subscription = "billing";
    sc.metrics = m;
    sc.policy = &p;
    sc.deadline_ms = 100;
    assert_int_equal(bus_stack_production(&c, &sc), BUS_OK);
    bus__delivery_init(&d, e, "t.x", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c, &d, overrun_handler, &mc),
                     BUS_ACK);
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_OVERRUN);
    assert_int_equal(bus_stack_development(&c2, &sc), BUS_OK);
    bus__delivery_init(&d, e, "t.x", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(NULL, c2, &d, overrun_handler, &mc),
                     BUS_ACK);
    /* both stacks' deadlines count in the same series */
    assert_int_equal(bus_metrics_snapshot_take(m, &snap), BUS_OK);
    se = bus_metrics_snapshot_find(snap, "bus_handler_overruns_total", &l, 1);
    assert_non_null(se);
    assert_int_equal(se->counter, 2);
    bus_metrics_snapshot_free(snap);
    bus_chain_free(c);
    bus_chain_free(c2);
    bus_metrics_free(m);
    bus_event_unref(e);
}

/* Only a handled (ACK) event is marked: a failed one runs again. */
static void
test_dedup_marks_only_handled_events(void **state)
{
    bus_dedup *dd;
    bus_dedup_stats st;
    bus_middleware mw;
    bus_chain *c;
    bus_delivery d;
    flaky f = {.fail_first = 1, .how = BUS_RETRY, .code = 5};
    bus_event *e = mkev("s");

    (void)state;
    assert_int_equal(bus_dedup_new(&dd, NULL), BUS_OK);
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_dedup(&mw, dd), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    for (int i = 0; i < 3; i++) {
        bus__delivery_init(&d, e, "t.x", "sub", 1, 0, NULL);
        assert_int_equal(bus_chain_run(NULL, c, &d, flaky_handler, &f),
                         i == 0 ? BUS_RETRY : BUS_ACK);
    }
    assert_int_equal(f.calls, 2); /* failed, handled, then a duplicate */
    assert_true(bus_delivery_flags(&d) & BUS_DELIVERY_F_DUPLICATE);
    bus_dedup_stats_get(dd, &st);
    assert_int_equal(st.lookups, 3);
    assert_int_equal(st.hits, 1);
    assert_int_equal(st.marks, 1);
    bus_chain_free(c);
    bus_dedup_free(dd);
    bus_event_unref(e);
}

/* ---- Tracing: a chain of three handlers ------------------------------------ */

typedef struct hop {
    bus_event *out; /* what the handler published */
} hop;

static bus_result
forwarding_handler(bus_delivery *d, void *opaque)
{
    hop *h = opaque;
    bus_event *e;

    (void)d;
    assert_int_equal(bus_event_new(&e, "t.next", "x", 1), BUS_OK);
    /* what bus_publish does for a handler's event (phase 2 wires it) */
    assert_int_equal(bus_trace_inherit(e), BUS_OK);
    bus_event_freeze(e);
    h->out = e;
    return BUS_ACK;
}

static void
test_tracing_chain_of_three_handlers(void **state)
{
    bus_chain *c;
    bus_middleware mw;
    bus_delivery d;
    bus_event *first, *cur;
    bus_event *hops[4];
    bus_trace_ctx tc[4];
    char idbuf[BUS_UUID_STR_LEN + 1], root_id[BUS_UUID_STR_LEN + 1];
    hop h;

    (void)state;
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_tracing(&mw), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    assert_int_equal(bus_event_new(&first, "t.start", "x", 1), BUS_OK);
    assert_int_equal(bus_event_set_header(first, BUS_H_TRACEPARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), BUS_OK);
    bus_event_freeze(first);
    bus_uuid_format(bus_event_id(first), root_id);
    hops[0] = cur = first;
    assert_null(bus_delivery_current());
    for (int i = 1; i <= 3; i++) {
        bus__delivery_init(&d, cur, "t.x", "h", 1, 0, NULL);
        assert_int_equal(bus_chain_run(NULL, c, &d, forwarding_handler, &h),
                         BUS_ACK);
        assert_null(bus_delivery_current()); /* restored */
        hops[i] = cur = h.out;
    }
    for (int i = 0; i <= 3; i++)
        assert_int_equal(bus_traceparent_parse(
            bus_event_header(hops[i], BUS_H_TRACEPARENT), &tc[i]), BUS_OK);
    for (int i = 1; i <= 3; i++) {
        /* same conversation, caused by the previous hop, same trace, new
         * span per hop */
        assert_string_equal(bus_event_correlation_id(hops[i]), root_id);
        assert_string_equal(bus_event_causation_id(hops[i]),
                            bus_uuid_format(bus_event_id(hops[i - 1]), idbuf));
        assert_memory_equal(tc[i].trace_id, tc[0].trace_id, 16);
        assert_memory_not_equal(tc[i].span_id, tc[i - 1].span_id, 8);
        assert_int_equal(tc[i].flags, 1);
    }
    for (int i = 0; i <= 3; i++)
        bus_event_unref(hops[i]);
    bus_chain_free(c);
}

static void
test_traceparent_parse_and_format(void **state)
{
    bus_trace_ctx t, c;
    char buf[BUS_TRACEPARENT_LEN + 1];
    const char *ok =
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    (void)state;
    assert_int_equal(bus_traceparent_parse(ok, &t), BUS_OK);
    assert_string_equal(bus_traceparent_format(&t, buf), ok);
    assert_int_equal(bus_traceparent_parse(
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01", &t),
        BUS_EINVAL);
    assert_int_equal(bus_traceparent_parse(
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", &t),
        BUS_EINVAL);
    assert_int_equal(bus_traceparent_parse("00-4bf9", &t), BUS_EINVAL);
    assert_int_equal(bus_traceparent_parse(NULL, &t), BUS_EINVAL);
    bus_trace_child(NULL, &c);
    assert_int_equal(bus_traceparent_parse(bus_traceparent_format(&c, buf), &t),
                     BUS_OK);
}

/* ---- Stacks ----------------------------------------------------------------- */

static void
test_stacks_order_and_run(void **state)
{
    bus_metrics *m;
    bus_dedup *dd;
    bus_ratelimit_config rc;
    bus_ratelimit *rl;
    bus_stack_config sc;
    bus_chain *c;
    char dump[512];
    bus_delivery d;
    bus_event *e = mkev("s");
    int calls = 0;

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_dedup_new(&dd, NULL), BUS_OK);
    bus_ratelimit_config_init(&rc);
    rc.rate = 1e9;
    assert_int_equal(bus_ratelimit_new(&rl, &rc), BUS_OK);
    bus_stack_config_init(&sc);
    sc.subscription = "billing";
    sc.metrics = m;
    sc.dedup = dd;
    sc.ratelimit = rl;
    sc.deadline_ms = 1000;
    assert_int_equal(bus_stack_production(&c, &sc), BUS_OK);
    assert_int_equal(bus_chain_dump(NULL, c, dump, sizeof(dump), NULL), BUS_OK);
    assert_string_equal(dump,
                        "1. tracing (subscription)\n2. metrics (subscription)\n"
                        "3. dedup (subscription)\n4. policy (subscription)\n"
                        "5. ratelimit (subscription)\n"
                        "6. deadline (subscription)\n-> handler\n");
    bus__delivery_init(&d, e, "t.x", "billing", 1, 0, NULL);
    assert_int_equal(bus_chain_run(c, NULL, &d, ok_handler, &calls), BUS_ACK);
    assert_int_equal(calls, 1);
    bus_chain_free(c);
    assert_int_equal(bus_stack_development(&c, NULL), BUS_OK);
    assert_int_equal(bus_chain_dump(c, NULL, dump, sizeof(dump), NULL), BUS_OK);
    assert_string_equal(dump, "1. tracing (bus)\n2. logging (bus)\n"
                              "3. policy (bus)\n4. deadline (bus)\n"
                              "-> handler\n");
    bus_chain_free(c);
    bus_ratelimit_free(rl);
    bus_dedup_free(dd);
    bus_metrics_free(m);
    bus_event_unref(e);
}

/* ---- Concurrency (TSan) ----------------------------------------------------- */

typedef struct conc {
    bus_chain *c;
    int t;
} conc;

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    (void)opaque;
    return BUS_ACK;
}

static void *
conc_run(void *arg)
{
    conc *k = arg;
    char topic[32];

    for (int i = 0; i < 2000; i++) {
        bus_event *e = mkev(i % 2 ? "a" : "b");
        bus_delivery d;
        snprintf(topic, sizeof(topic), "t.%d", i % 8);
        bus__delivery_init(&d, e, topic, "sub", 1, 0, NULL);
        bus_chain_run(k->c, NULL, &d, count_handler, NULL);
        bus_event_unref(e);
    }
    return NULL;
}

static void
test_production_stack_is_thread_safe(void **state)
{
    bus_metrics *m;
    bus_dedup *dd;
    bus_breaker *b;
    bus_stack_config sc;
    conc k[4];
    pthread_t th[4];
    uint64_t total = 0;
    char topic[32];

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_dedup_new(&dd, NULL), BUS_OK);
    assert_int_equal(bus_breaker_new(&b, NULL), BUS_OK);
    bus_stack_config_init(&sc);
    sc.subscription = "sub";
    sc.metrics = m;
    sc.dedup = dd;
    sc.breaker = b;
    assert_int_equal(bus_stack_production(&k[0].c, &sc), BUS_OK);
    for (int i = 0; i < 4; i++) {
        k[i].c = k[0].c;
        pthread_create(&th[i], NULL, conc_run, &k[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 8; i++) {
        snprintf(topic, sizeof(topic), "t.%d", i);
        total += counter(m, "bus_deliveries_ok_total", topic, "sub", NULL);
    }
    assert_int_equal(total, 4 * 2000);
    bus_chain_free(k[0].c);
    bus_breaker_free(b);
    bus_dedup_free(dd);
    bus_metrics_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chain_runs_bus_then_subscription_then_handler),
        cmocka_unit_test(test_policy_retries_in_place_with_backoff),
        cmocka_unit_test(test_policy_dead_letters_with_failure_headers),
        cmocka_unit_test(test_policy_without_sink_logs_and_reclassifies),
        cmocka_unit_test(test_policy_max_elapsed_bounds_the_last_retry),
        cmocka_unit_test(
            test_failure_without_sink_is_counted_not_dead_lettered),
        cmocka_unit_test(
            test_ratelimit_keys_from_a_header_or_a_function_with_a_cost),
        cmocka_unit_test(test_rate_limit_refusals_do_not_trip_the_breaker),
        cmocka_unit_test(test_stack_deadline_counts_overruns),
        cmocka_unit_test(test_dedup_marks_only_handled_events),
        cmocka_unit_test(test_deferred_retry_does_not_block_other_keys),
        cmocka_unit_test(test_open_breaker_refuses_without_calling_handler),
        cmocka_unit_test(test_dedup_ratelimit_deadline_and_metrics),
        cmocka_unit_test(test_tracing_chain_of_three_handlers),
        cmocka_unit_test(test_traceparent_parse_and_format),
        cmocka_unit_test(test_stacks_order_and_run),
        cmocka_unit_test(test_production_stack_is_thread_safe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
