/*
 * The handler pipeline reached through the bus (bus_subscribe /
 * bus_publish): failure policies (in-place and deferred retries, dead
 * letters), breakers, dedup, automatic tracing, metrics and health, on a
 * context alone and with mem:// and fake:// (acks) brokers attached.
 *
 * Time that matters is a bus_manual_clock shared by the context (its
 * timer wheel) and the policies: deferred retries fire when the test
 * advances it, and every wait is on a condition with a deadline.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker.h>
#include <bus/bus.h>

#include "bus_test_util.h"
#include "fake_broker.h"
#include "platform.h"
#include "prom_parse.h"

#define REC_MAX 64

/* A handler that records its calls and fails as told. */
typedef struct rec {
    pthread_mutex_t mtx;
    const char *fail_stream; /* NULL: every event */
    uint32_t fail_until;     /* fail attempts <= this (0: never) */
    bus_result fail_as;      /* BUS_RETRY or BUS_REJECT */
    int n;
    uint32_t attempt[REC_MAX];
    char stream[REC_MAX][16];
    _Atomic int calls;
    int want;
} rec;

static void
rec_init(rec *r)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mtx, NULL);
    r->fail_as = BUS_RETRY;
}

static bus_result
rec_handler(bus_delivery *d, void *opaque)
{
    rec *r = opaque;
    const char *st = bus_event_stream(bus_delivery_event(d));
    uint32_t a = bus_delivery_attempt(d);
    bool fail;

    pthread_mutex_lock(&r->mtx);
    if (r->n < REC_MAX) {
        r->attempt[r->n] = a;
        snprintf(r->stream[r->n], sizeof(r->stream[0]), "%s", st ? st : "");
        r->n++;
    }
    pthread_mutex_unlock(&r->mtx);
    fail = a <= r->fail_until
        && (r->fail_stream == NULL
            || (st != NULL && strcmp(st, r->fail_stream) == 0));
    atomic_fetch_add(&r->calls, 1);
    if (fail) {
        bus_delivery_set_error(d, 42, "boom %u", a);
        return r->fail_as;
    }
    return BUS_ACK;
}

static int
rec_reached(void *arg)
{
    rec *r = arg;

    return atomic_load(&r->calls) >= r->want;
}

static int
rec_wait(rec *r, int n)
{
    r->want = n;
    return bt_wait_for(rec_reached, r, BT_WAIT_MS) ? 0 : 1; /* 0: reached */
}

static bus_failure_policy
fixed_policy(bus_manual_clock *mc, uint32_t max, uint32_t delay_ms)
{
    bus_failure_policy p;

    bus_failure_policy_init(&p);
    p.retry.backoff = BUS_BACKOFF_FIXED;
    p.retry.jitter = BUS_JITTER_NONE;
    p.retry.initial_ms = delay_ms;
    p.retry.max_attempts = max;
    if (mc != NULL)
        p.clock = mc->clock;
    return p;
}

static bus_ctx *
open_ctx(uint32_t workers, bus_manual_clock *mc, bus_metrics *m,
         bus_health *h)
{
    bus_ctx_config cfg;
    bus_ctx *ctx = NULL;

    bus_ctx_config_init(&cfg);
    cfg.workers = workers;
    if (mc != NULL)
        cfg.clock = mc->clock;
    cfg.metrics = m;
    cfg.health = h;
    assert_int_equal(bus_ctx_open(&ctx, &cfg), BUS_OK);
    return ctx;
}

static bus_event *
ev_stream(const char *stream)
{
    return bt_event_u64(stream, 1);
}

static void
publish(bus_ctx *ctx, const char *topic, bus_event *e)
{
    int rv = bus_publish(ctx, topic, e, 0);

    if (rv != BUS_OK)
        bus_event_unref(e);
    assert_int_equal(rv, BUS_OK);
}

static bus_broker *
open_broker(const char *uri)
{
    char err[256];
    bus_broker *b = NULL;
    int rv = bus_broker_open_uri(&b, uri, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

typedef struct sub_want {
    bus_sub *s;
    uint64_t ok, retry, reject, queued;
} sub_want;

static int
sub_reached(void *arg)
{
    sub_want *w = arg;
    bus_sub_stats st;

    bus_sub_stats_get(w->s, &st);
    return st.ok >= w->ok && st.retry >= w->retry && st.reject >= w->reject;
}

static int
sub_wait(bus_sub *s, uint64_t ok, uint64_t retry, uint64_t reject)
{
    sub_want w = {s, ok, retry, reject, 0};

    return bt_wait_for(sub_reached, &w, BT_WAIT_MS) ? 0 : 1; /* 0: reached */
}

static int
queued_reached(void *arg)
{
    sub_want *w = arg;
    bus_sub_stats st;

    bus_sub_stats_get(w->s, &st);
    return st.queued == w->queued;
}

/* Waits for s's queued count to be q. A worker counts ok or retry when
 * the handler returns and takes the entry off the queue just after, so
 * right after sub_wait an entry may still be counted as queued. */
static int
queued_wait(bus_sub *s, uint64_t q)
{
    sub_want w = {s, 0, 0, 0, q};

    return bt_wait_for(queued_reached, &w, BT_WAIT_MS) ? 0 : 1;
}

static int
group_setup(void **state)
{
    (void)state;
    fake_register();
    return 0;
}

/* ---- Retries ---------------------------------------------------------------- */

static void
test_inline_retries_in_place_then_succeeds(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_sub_stats st;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    ctx = open_ctx(1, &mc, NULL, NULL);
    rec_init(&r);
    r.fail_until = 2;
    p = fixed_policy(&mc, 5, 100);
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "r.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    publish(ctx, "r.x", ev_stream("k"));
    /* Inline: all attempts ran in bus_publish, sleeping on the clock. */
    assert_int_equal(atomic_load(&r.calls), 3);
    assert_int_equal(r.attempt[0], 1);
    assert_int_equal(r.attempt[1], 2);
    assert_int_equal(r.attempt[2], 3);
    assert_true(bus_manual_clock_get(&mc) >= 1000000000u + 200000000u);
    bus_sub_stats_get(s, &st);
    assert_int_equal(st.delivered, 1);
    assert_int_equal(st.ok, 1);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

static void
test_deferred_retry_does_not_block_other_keys(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub_stats st;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    ctx = open_ctx(1, &mc, NULL, NULL); /* one worker: one shard for all */
    rec_init(&r);
    r.fail_stream = "A";
    r.fail_until = 2;
    p = fixed_policy(&mc, 5, 1000);
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "d.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    publish(ctx, "d.x", ev_stream("A"));
    publish(ctx, "d.x", ev_stream("B"));
    publish(ctx, "d.x", ev_stream("C"));
    /* A fails and is parked; B and C go on without the clock moving. */
    assert_int_equal(rec_wait(&r, 3), 0);
    assert_int_equal(sub_wait(s, 2, 1, 0), 0);
    assert_int_equal(queued_wait(s, 1), 0); /* the parked retry */
    assert_string_equal(r.stream[0], "A");
    assert_string_equal(r.stream[1], "B");
    assert_string_equal(r.stream[2], "C");
    bus_sub_stats_get(s, &st);
    assert_int_equal(st.ok, 2);
    assert_int_equal(st.retry, 1);
    assert_int_equal(st.queued, 1); /* the parked retry */
    assert_int_equal(atomic_load(&r.calls), 3);

    /* Due: attempt 2 fails again and parks; then attempt 3 succeeds.
     * (Advance only once it is parked: its due time is taken then.) */
    bus_manual_clock_advance(&mc, 1000000000u);
    assert_int_equal(rec_wait(&r, 4), 0);
    assert_int_equal(sub_wait(s, 2, 2, 0), 0);
    bus_manual_clock_advance(&mc, 1000000000u);
    assert_int_equal(rec_wait(&r, 5), 0);
    assert_int_equal(sub_wait(s, 3, 2, 0), 0);
    assert_int_equal(queued_wait(s, 0), 0);
    assert_string_equal(r.stream[3], "A");
    assert_int_equal(r.attempt[3], 2);
    assert_string_equal(r.stream[4], "A");
    assert_int_equal(r.attempt[4], 3);
    bus_sub_stats_get(s, &st);
    assert_int_equal(st.delivered, 5);
    assert_int_equal(st.queued, 0);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

static void
test_parked_retry_dropped_by_unsubscribe_and_close(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    ctx = open_ctx(2, &mc, NULL, NULL);
    rec_init(&r);
    r.fail_until = 100;
    p = fixed_policy(&mc, 5, 60000);
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "u.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    publish(ctx, "u.x", ev_stream("k"));
    assert_int_equal(rec_wait(&r, 1), 0);
    assert_int_equal(sub_wait(s, 0, 1, 0), 0);
    /* Returns at once: the parked retry (due in a minute) is dropped. */
    assert_int_equal(bus_unsubscribe(s), BUS_OK);

    assert_int_equal(bus_subscribe(ctx, "u.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    publish(ctx, "u.x", ev_stream("k"));
    assert_int_equal(rec_wait(&r, 2), 0);
    assert_int_equal(sub_wait(s, 0, 1, 0), 0);
    assert_int_equal(bus_ctx_close(ctx), 1); /* parked: dropped, counted */
    assert_int_equal(atomic_load(&r.calls), 2);
}

/* ---- Dead letters ------------------------------------------------------------ */

typedef struct dlq_seen {
    pthread_mutex_t mtx;
    _Atomic int n;
    char topic[64], sub[64], code[16], msg[64], attempts[16];
    bool first, last;
    bus_uuid id;
} dlq_seen;

static void
copy_header(const bus_event *e, const char *key, char *out, size_t cap)
{
    const char *v = bus_event_header(e, key);

    snprintf(out, cap, "%s", v ? v : "(none)");
}

static bus_result
dlq_handler(bus_delivery *d, void *opaque)
{
    dlq_seen *s = opaque;
    const bus_event *e = bus_delivery_event(d);

    pthread_mutex_lock(&s->mtx);
    copy_header(e, BUS_H_DLQ_TOPIC, s->topic, sizeof(s->topic));
    copy_header(e, BUS_H_DLQ_SUBSCRIPTION, s->sub, sizeof(s->sub));
    copy_header(e, BUS_H_DLQ_ERROR_CODE, s->code, sizeof(s->code));
    copy_header(e, BUS_H_DLQ_ERROR, s->msg, sizeof(s->msg));
    copy_header(e, BUS_H_DLQ_ATTEMPTS, s->attempts, sizeof(s->attempts));
    s->first = bus_event_header(e, BUS_H_DLQ_FIRST_FAILURE) != NULL;
    s->last = bus_event_header(e, BUS_H_DLQ_LAST_FAILURE) != NULL;
    s->id = *bus_event_id(e);
    pthread_mutex_unlock(&s->mtx);
    atomic_fetch_add(&s->n, 1);
    return BUS_ACK;
}

static int
dlq_arrived(void *arg)
{
    return atomic_load(&((dlq_seen *)arg)->n) >= 1;
}

static void
test_dead_letter_headers_on_topic_dlq(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_sub_config dc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub_stats st;
    bus_event *e;
    bus_uuid id;
    dlq_seen seen;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    ctx = open_ctx(2, &mc, NULL, NULL);
    rec_init(&r);
    r.fail_until = 100;
    memset(&seen, 0, sizeof(seen));
    pthread_mutex_init(&seen.mtx, NULL);
    p = fixed_policy(&mc, 2, 10);
    sc.policy = &p;
    sc.name = "billing";
    assert_int_equal(
        bus_subscribe(ctx, "orders.placed", rec_handler, &r, &sc, &s),
        BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "orders.placed.dlq", dlq_handler,
                                   &seen, &dc, NULL),
                     BUS_OK);
    e = ev_stream("o-1");
    id = *bus_event_id(e);
    publish(ctx, "orders.placed", e);
    assert_true(bt_wait_for(dlq_arrived, &seen, BT_WAIT_MS));
    assert_int_equal(atomic_load(&r.calls), 2);
    assert_string_equal(seen.topic, "orders.placed");
    assert_string_equal(seen.sub, "billing");
    assert_string_equal(seen.code, "42");
    assert_string_equal(seen.msg, "boom 2");
    assert_string_equal(seen.attempts, "2");
    assert_true(seen.first && seen.last);
    assert_memory_equal(&seen.id, &id, sizeof(id));
    bus_sub_stats_get(s, &st);
    assert_int_equal(st.reject, 1);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

/* Through mem://: deferred retries on a queued subscription, then the
 * dead letter goes out through the broker route and comes back. */
static void
test_mem_broker_deferred_retries_then_dead_letter(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub_config dc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_broker *b = open_broker("mem://pipeline-dlq");
    dlq_seen seen;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    ctx = open_ctx(2, &mc, NULL, NULL);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    rec_init(&r);
    r.fail_until = 100;
    memset(&seen, 0, sizeof(seen));
    pthread_mutex_init(&seen.mtx, NULL);
    p = fixed_policy(&mc, 3, 500);
    sc.policy = &p;
    sc.name = "shipping";
    sc.dlq_topic = "dead.%s";
    assert_int_equal(bus_subscribe(ctx, "m.placed", rec_handler, &r, &sc, &s),
                     BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "dead.m.placed", dlq_handler, &seen,
                                   &dc, NULL),
                     BUS_OK);
    publish(ctx, "m.placed", ev_stream("k"));
    assert_int_equal(sub_wait(s, 0, 1, 0), 0); /* parked */
    bus_manual_clock_advance(&mc, 500000000u);
    assert_int_equal(sub_wait(s, 0, 2, 0), 0);
    bus_manual_clock_advance(&mc, 500000000u);
    assert_int_equal(rec_wait(&r, 3), 0);
    assert_true(bt_wait_for(dlq_arrived, &seen, BT_WAIT_MS));
    assert_int_equal(r.attempt[2], 3);
    assert_string_equal(seen.topic, "m.placed");
    assert_string_equal(seen.sub, "shipping");
    assert_string_equal(seen.attempts, "3");
    assert_int_equal(sub_wait(s, 0, 2, 1), 0);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
}

/* ---- Breakers and broker acks -------------------------------------------------- */

typedef struct ack_want {
    bus_broker *b;
    uint64_t token;
} ack_want;

static int
acked(void *arg)
{
    ack_want *w = arg;

    return fake_ack_of(w->b, w->token) >= 0;
}

static int
ack_wait(bus_broker *b, uint64_t token)
{
    ack_want w = {b, token};

    return bt_wait_for(acked, &w, BT_WAIT_MS) ? 0 : 1; /* 0: reached */
}

static bus_breaker *
breaker_one_failure(bus_manual_clock *mc)
{
    bus_breaker_config bc;
    bus_breaker *br;

    bus_breaker_config_init(&bc);
    bc.name = "pay";
    bc.failure_threshold = 1;
    bc.failure_rate = 2; /* off */
    bc.open_ms = 1000;
    bc.clock = mc->clock;
    assert_int_equal(bus_breaker_new(&br, &bc), BUS_OK);
    return br;
}

static void
test_inline_breaker_open_nacks_to_broker(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_broker *b = open_broker("fake://pipeline-inline");
    bus_breaker *br;
    bus_metrics *m;
    bus_metrics_snapshot *snap;
    bus_label lb = {"broker", "fake"};
    const bus_metric_series *se;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    br = breaker_one_failure(&mc);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    ctx = open_ctx(1, &mc, m, NULL);
    assert_int_equal(bus_ctx_attach(ctx, b, "bk.x"), BUS_OK);
    rec_init(&r);
    r.fail_stream = "bad";
    r.fail_until = 1;
    p = fixed_policy(&mc, 1, 10);
    p.breaker = br;
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "bk.x", rec_handler, &r, &sc, NULL),
                     BUS_OK);
    publish(ctx, "bk.x", ev_stream("bad")); /* token 1: fails, opens */
    assert_int_equal(fake_ack_of(b, 1), BUS_REJECT); /* dead-lettered */
    assert_int_equal(bus_breaker_state_get(br), BUS_BREAKER_OPEN);
    publish(ctx, "bk.x", ev_stream("k")); /* token 2: refused */
    assert_int_equal(fake_ack_of(b, 2), BUS_RETRY); /* nacked */
    assert_int_equal(atomic_load(&r.calls), 1);     /* never called */
    bus_manual_clock_advance(&mc, 1000000000u);
    publish(ctx, "bk.x", ev_stream("k")); /* token 3: probe, succeeds */
    assert_int_equal(fake_ack_of(b, 3), BUS_ACK);
    assert_int_equal(bus_breaker_state_get(br), BUS_BREAKER_CLOSED);
    /* per broker: the dead letter and the success acked, the refusal
     * nacked */
    assert_int_equal(bus_metrics_snapshot_take(m, &snap), BUS_OK);
    se = bus_metrics_snapshot_find(snap, "bus_broker_acked_total", &lb, 1);
    assert_non_null(se);
    assert_int_equal(se->counter, 2);
    se = bus_metrics_snapshot_find(snap, "bus_broker_nacked_total", &lb, 1);
    assert_non_null(se);
    assert_int_equal(se->counter, 1);
    bus_metrics_snapshot_free(snap);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    bus_breaker_free(br);
    bus_metrics_free(m);
}

static void
test_queued_breaker_open_defers_and_acks_at_the_end(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_broker *b = open_broker("fake://pipeline-queued");
    bus_breaker *br;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    br = breaker_one_failure(&mc);
    ctx = open_ctx(1, &mc, NULL, NULL);
    assert_int_equal(bus_ctx_attach(ctx, b, "bq.>"), BUS_OK);
    rec_init(&r);
    r.fail_stream = "a";
    r.fail_until = 1;
    p = fixed_policy(&mc, 3, 100);
    p.breaker = br;
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "bq.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    publish(ctx, "bq.x", ev_stream("a")); /* token 1: fails, opens, parks */
    assert_int_equal(sub_wait(s, 0, 1, 0), 0);
    assert_int_equal(bus_breaker_state_get(br), BUS_BREAKER_OPEN);
    publish(ctx, "bq.x", ev_stream("b")); /* token 2: refused, parks */
    assert_int_equal(sub_wait(s, 0, 2, 0), 0);
    assert_int_equal(atomic_load(&r.calls), 1);
    assert_int_equal(fake_ack_of(b, 1), -1); /* not done: no ack yet */
    assert_int_equal(fake_ack_of(b, 2), -1);
    /* Past open_ms: both come back; the first probes and closes it. */
    bus_manual_clock_advance(&mc, 1000000000u);
    assert_int_equal(ack_wait(b, 1), 0);
    assert_int_equal(ack_wait(b, 2), 0);
    assert_int_equal(fake_ack_of(b, 1), BUS_ACK);
    assert_int_equal(fake_ack_of(b, 2), BUS_ACK);
    assert_int_equal(atomic_load(&r.calls), 3);
    assert_int_equal(bus_breaker_state_get(br), BUS_BREAKER_CLOSED);
    pthread_mutex_lock(&r.mtx);
    for (int i = 1; i < r.n; i++) /* b was never called: still attempt 1 */
        if (strcmp(r.stream[i], "b") == 0)
            assert_int_equal(r.attempt[i], 1);
    pthread_mutex_unlock(&r.mtx);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    bus_breaker_free(br);
}

/* ---- Dedup ---------------------------------------------------------------------- */

static void
test_dedup_in_subscription_chain_drops_redelivery(void **state)
{
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_middleware mw;
    bus_chain *c;
    bus_dedup *dd;
    bus_sub_stats st;
    bus_event *e;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;

    (void)state;
    assert_int_equal(bus_dedup_new(&dd, NULL), BUS_OK);
    assert_int_equal(bus_chain_new(&c), BUS_OK);
    assert_int_equal(bus_mw_dedup(&mw, dd), BUS_OK);
    assert_int_equal(bus_chain_append(c, &mw), BUS_OK);
    ctx = open_ctx(1, NULL, NULL, NULL);
    rec_init(&r);
    sc.chain = c;
    assert_int_equal(bus_subscribe(ctx, "dd.x", rec_handler, &r, &sc, &s),
                     BUS_OK);
    e = ev_stream("k");
    bus_event_ref(e);
    publish(ctx, "dd.x", e);
    publish(ctx, "dd.x", e); /* the same event (id) again */
    assert_int_equal(atomic_load(&r.calls), 1);
    bus_sub_stats_get(s, &st);
    assert_int_equal(st.delivered, 2);
    assert_int_equal(st.ok, 2);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_chain_free(c);
    bus_dedup_free(dd);
}

/* ---- Tracing ---------------------------------------------------------------------- */

typedef struct hop {
    bus_ctx *ctx;
    const char *next; /* topic to publish on, NULL: last */
    bus_event *seen;  /* the event handled (a reference) */
    _Atomic int done;
} hop;

static bus_result
hop_handler(bus_delivery *d, void *opaque)
{
    hop *h = opaque;

    h->seen = bus_event_ref(bus_delivery_event(d));
    if (h->next != NULL) {
        bus_event *e = bt_event_u64("k", 2);
        if (bus_publish(h->ctx, h->next, e, 0) != BUS_OK)
            bus_event_unref(e);
    }
    atomic_store(&h->done, 1);
    return BUS_ACK;
}

static int
hop_done(void *arg)
{
    return atomic_load(&((hop *)arg)->done);
}

static void
trace_of(const bus_event *e, bus_trace_ctx *tc)
{
    const char *tp = bus_event_header(e, BUS_H_TRACEPARENT);

    assert_non_null(tp);
    assert_int_equal(bus_traceparent_parse(tp, tc), BUS_OK);
}

static void
test_tracing_chain_of_three_handlers(void **state)
{
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_trace_ctx t0, ta, tb, tc;
    char ida[BUS_UUID_STR_LEN + 1], idb[BUS_UUID_STR_LEN + 1];
    bus_ctx *ctx = open_ctx(2, NULL, NULL, NULL);
    hop a = {ctx, "tr.b", NULL, 0}, b = {ctx, "tr.c", NULL, 0},
        c = {ctx, NULL, NULL, 0};
    bus_event *e;

    (void)state;
    assert_int_equal(bus_subscribe(ctx, "tr.a", hop_handler, &a, &sc, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "tr.b", hop_handler, &b, &sc, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "tr.c", hop_handler, &c, &sc, NULL),
                     BUS_OK);
    e = ev_stream("k");
    assert_int_equal(
        bus_event_set_header(
            e, BUS_H_TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        BUS_OK);
    publish(ctx, "tr.a", e);
    assert_true(bt_wait_for(hop_done, &c, BT_WAIT_MS));
    assert_true(bt_wait_for(hop_done, &b, BT_WAIT_MS));
    bus_uuid_format(bus_event_id(a.seen), ida);
    bus_uuid_format(bus_event_id(b.seen), idb);
    /* The first event correlates itself; both hops carry its id. */
    assert_null(bus_event_correlation_id(a.seen));
    assert_string_equal(bus_event_correlation_id(b.seen), ida);
    assert_string_equal(bus_event_correlation_id(c.seen), ida);
    assert_string_equal(bus_event_causation_id(b.seen), ida);
    assert_string_equal(bus_event_causation_id(c.seen), idb);
    trace_of(a.seen, &t0);
    trace_of(b.seen, &tb);
    trace_of(c.seen, &tc);
    ta = t0;
    assert_memory_equal(tb.trace_id, ta.trace_id, 16);
    assert_memory_equal(tc.trace_id, ta.trace_id, 16);
    assert_memory_not_equal(tb.span_id, ta.span_id, 8);
    assert_memory_not_equal(tc.span_id, tb.span_id, 8);
    assert_int_equal(tc.flags, 1);
    /* Outside a handler nothing is inherited. */
    assert_null(bus_delivery_current());
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_event_unref(a.seen);
    bus_event_unref(b.seen);
    bus_event_unref(c.seen);
}

/* ---- Metrics ---------------------------------------------------------------------- */

static double
prom_value(const prom_doc *doc, const char *name, const char *const *kv,
           int n)
{
    const prom_sample *s = prom_find(doc, name, kv, n);

    if (s == NULL)
        fail_msg("no sample %s", name);
    return s->value;
}

/* m's Prometheus text, parsed into *doc; the text is returned (free it
 * with bus_metrics_text_free after doc). */
static char *
scrape(bus_metrics *m, prom_doc *doc)
{
    char err[256], *text;
    size_t len;

    assert_int_equal(bus_metrics_prometheus_alloc(m, &text, &len), BUS_OK);
    memset(doc, 0, sizeof(*doc));
    if (prom_parse(text, doc, err, sizeof(err)) != 0)
        fail_msg("prometheus text: %s\n%s", err, text);
    return text;
}

static void
test_metrics_in_prometheus_text(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_broker *b = open_broker("mem://pipeline-metrics");
    static const char *const kv[] = {"topic", "orders.placed", "subscription",
                                     "billing"};
    static const char *const kvd[] = {"subscription", "billing", "shard", ""};
    static const char *const kvs[] = {"subscription", "", "shard", "0"};
    static const char *const kvb[] = {"broker", "mem"};
    char *text;
    size_t len;
    prom_doc doc;
    bus_metrics *m;
    bus_sub *s;
    bus_ctx *ctx;
    rec r;
    int i;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    ctx = open_ctx(2, &mc, m, NULL);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    rec_init(&r);
    r.fail_stream = "bad";
    r.fail_until = 100;
    p = fixed_policy(&mc, 2, 100);
    sc.policy = &p;
    sc.name = "billing";
    assert_int_equal(
        bus_subscribe(ctx, "orders.placed", rec_handler, &r, &sc, &s),
        BUS_OK);
    for (i = 0; i < 5; i++)
        publish(ctx, "orders.placed", ev_stream("ok"));
    publish(ctx, "orders.placed", ev_stream("bad"));
    assert_int_equal(sub_wait(s, 5, 1, 0), 0);
    bus_manual_clock_advance(&mc, 100000000u);
    assert_int_equal(sub_wait(s, 5, 1, 1), 0); /* dead-lettered */
    /* The worker takes the entry off the queue after counting the
     * result: wait for that before reading bus_queue_depth. */
    assert_int_equal(queued_wait(s, 0), 0);

    text = scrape(m, &doc);
    assert_true(prom_value(&doc, "bus_deliveries_total", kv, 2) == 7);
    assert_true(prom_value(&doc, "bus_deliveries_ok_total", kv, 2) == 5);
    assert_true(prom_value(&doc, "bus_deliveries_retried_total", kv, 2) == 1);
    assert_true(
        prom_value(&doc, "bus_deliveries_dead_lettered_total", kv, 2) == 1);
    assert_true(prom_value(&doc, "bus_handler_latency_seconds_count", kv, 2)
                == 7);
    assert_true(prom_value(&doc, "bus_queue_depth", kvd, 2) == 0);
    assert_true(prom_value(&doc, "bus_queue_depth", kvs, 2) == 0);
    /* 6 publishes and the dead letter (to a topic nobody listens on). */
    assert_true(prom_value(&doc, "bus_broker_published_total", kvb, 1) == 7);
    assert_true(
        prom_value(&doc, "bus_broker_publish_latency_seconds_count", kvb, 1)
        == 7);
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    /* The context released its series. */
    assert_int_equal(bus_metrics_prometheus_alloc(m, &text, &len), BUS_OK);
    assert_null(strstr(text, "bus_queue_depth"));
    assert_null(strstr(text, "bus_broker_published_total"));
    bus_metrics_text_free(text);
    bus_metrics_free(m);
}

/* A handler that takes 2 ms of real time. */
static bus_result
sleepy_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    bus__sleep_ns(2000000u);
    atomic_fetch_add((atomic_int *)opaque, 1);
    return BUS_ACK;
}

typedef struct drained {
    bus_sub *s;
    atomic_int *calls;
    int n;
} drained;

static int
drained_reached(void *arg)
{
    drained *w = arg;
    bus_sub_stats st;

    bus_sub_stats_get(w->s, &st);
    return atomic_load(w->calls) >= w->n && st.queued == 0;
}

/* A queued worker closes a delivery's latency sample with its next
 * stamp when it goes straight on (pipeline.h, bus__lat_pend): every
 * sample is recorded once the queue is drained, and none includes the
 * worker's idle time. */
static void
test_queued_latency_samples_exclude_idle_time(void **state)
{
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    static const char *const kv[] = {"topic", "lat.x", "subscription",
                                     "lat"};
    char *text;
    atomic_int calls = 0;
    drained w;
    prom_doc doc;
    bus_metrics *m;
    bus_ctx *ctx;
    double sum;
    int i;

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    ctx = open_ctx(1, NULL, m, NULL);
    sc.name = "lat";
    assert_int_equal(bus_subscribe(ctx, "lat.x", sleepy_handler, &calls, &sc,
                                   &w.s),
                     BUS_OK);
    w.calls = &calls;
    for (i = 0; i < 3; i++) /* a backlog: the worker goes straight on */
        publish(ctx, "lat.x", ev_stream("k"));
    w.n = 3;
    assert_true(bt_wait_for(drained_reached, &w, BT_WAIT_MS));
    text = scrape(m, &doc);
    /* Drained: all three recorded. */
    assert_true(prom_value(&doc, "bus_handler_latency_seconds_count", kv, 2)
                == 3);
    prom_doc_free(&doc);
    bus_metrics_text_free(text);

    bus__sleep_ns(500000000u); /* the worker idles */
    publish(ctx, "lat.x", ev_stream("k"));
    w.n = 4;
    assert_true(bt_wait_for(drained_reached, &w, BT_WAIT_MS));
    text = scrape(m, &doc);
    assert_true(prom_value(&doc, "bus_handler_latency_seconds_count", kv, 2)
                == 4);
    sum = prom_value(&doc, "bus_handler_latency_seconds_sum", kv, 2);
    /* Four calls of at least 2 ms each; with the idle half second in a
     * sample the sum would pass 0.5 s. */
    assert_true(sum >= 0.008);
    assert_true(sum < 0.4);
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_metrics_free(m);
}

/* A handler that takes 20 ms on the manual clock it gets. */
static bus_result
slow_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    bus_manual_clock_advance(opaque, 20000000u);
    return BUS_ACK;
}

static void
test_deadline_overruns_counted_in_metrics(void **state)
{
    bus_manual_clock mc;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    static const char *const kv[] = {"subscription", "slow"};
    char *text;
    size_t len;
    prom_doc doc;
    bus_metrics *m;
    bus_ctx *ctx;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    ctx = open_ctx(1, &mc, m, NULL);
    p = fixed_policy(&mc, 1, 10); /* its clock is the deadline's */
    sc.policy = &p;
    sc.name = "slow";
    sc.deadline_ms = 10;
    assert_int_equal(
        bus_subscribe(ctx, "jobs.run", slow_handler, &mc, &sc, NULL), BUS_OK);
    publish(ctx, "jobs.run", ev_stream("a")); /* inline: done on return */
    publish(ctx, "jobs.run", ev_stream("b"));
    text = scrape(m, &doc);
    assert_true(prom_value(&doc, "bus_handler_overruns_total", kv, 1) == 2);
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(bus_metrics_prometheus_alloc(m, &text, &len), BUS_OK);
    assert_null(strstr(text, "bus_handler_overruns_total{"));
    bus_metrics_text_free(text);
    bus_metrics_free(m);
}

/* ---- Health ------------------------------------------------------------------------ */

typedef struct health_want {
    bus_health *h;
    bus_health_status live, ready;
} health_want;

static int
health_is(void *arg)
{
    health_want *w = arg;
    bus_health_report *rep;
    int ok;

    if (bus_health_run(w->h, BUS_HEALTH_BOTH, &rep) != BUS_OK)
        return 0;
    ok = rep->liveness == w->live && rep->readiness == w->ready;
    bus_health_report_free(rep);
    return ok;
}

static int
health_wait(bus_health *h, bus_health_status live, bus_health_status ready)
{
    health_want w = {h, live, ready};

    return bt_wait_for(health_is, &w, BT_WAIT_MS) ? 0 : 1; /* 0: reached */
}

static bus_result
gate_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    bt_gate_wait(opaque);
    return BUS_ACK;
}

static void
test_health_checks_registered_and_deregistered(void **state)
{
    bus_manual_clock mc;
    bus_ctx_config cfg;
    bus_failure_policy p;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_health_report *rep;
    bus_breaker *br;
    bus_health *h;
    bus_sub *s;
    bus_ctx *ctx;
    bt_gate g;
    char *json;
    size_t len;
    int i;

    (void)state;
    bus_manual_clock_init(&mc, 1000000000u);
    br = breaker_one_failure(&mc);
    assert_int_equal(bus_health_open(&h, NULL), BUS_OK);
    bus_ctx_config_init(&cfg);
    cfg.workers = 1;
    cfg.queue_capacity = 4;
    cfg.saturation_pct = 50;
    cfg.saturated_ms = 1;
    cfg.health = h;
    assert_int_equal(bus_ctx_open(&ctx, &cfg), BUS_OK);
    bt_gate_init(&g);
    p = fixed_policy(&mc, 3, 100);
    p.breaker = br;
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "h.x", gate_handler, &g, &sc, &s),
                     BUS_OK);

    assert_int_equal(bus_health_run(h, BUS_HEALTH_BOTH, &rep), BUS_OK);
    assert_int_equal(rep->status, BUS_HEALTH_HEALTHY);
    assert_int_equal(rep->nchecks, 3);
    assert_int_equal(bus_health_report_json_alloc(rep, &json, &len), BUS_OK);
    assert_non_null(strstr(json, "\"bus.workers\""));
    assert_non_null(strstr(json, "\"bus.queues\""));
    assert_non_null(strstr(json, "\"bus.breakers\""));
    bus_health_text_free(json);
    bus_health_report_free(rep);

    /* An open breaker: degraded, still live and ready. */
    bus_breaker_record(br, false);
    assert_int_equal(bus_health_run(h, BUS_HEALTH_BOTH, &rep), BUS_OK);
    assert_int_equal(rep->status, BUS_HEALTH_DEGRADED);
    bus_health_report_free(rep);
    bus_breaker_reset(br);

    /* A handler stuck with work queued behind it: the queue saturates
     * and the worker makes no progress. */
    publish(ctx, "h.x", ev_stream("k"));
    assert_true(bt_gate_wait_entered(&g, 1));
    for (i = 0; i < 3; i++) /* behind it: 3 of 4 slots */
        publish(ctx, "h.x", ev_stream("k"));
    assert_int_equal(
        health_wait(h, BUS_HEALTH_UNHEALTHY, BUS_HEALTH_UNHEALTHY), 0);
    bt_gate_open(&g);
    assert_int_equal(sub_wait(s, 4, 0, 0), 0);
    assert_int_equal(health_wait(h, BUS_HEALTH_HEALTHY, BUS_HEALTH_HEALTHY),
                     0);

    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(bus_health_run(h, BUS_HEALTH_BOTH, &rep), BUS_OK);
    assert_int_equal(rep->nchecks, 0);
    bus_health_report_free(rep);
    bus_health_close(h);
    bt_gate_fini(&g);
    bus_breaker_free(br);
}

/* ---- Configuration ------------------------------------------------------------------ */

static bus_result
batch_noop(bus_delivery *d, void *opaque)
{
    (void)d;
    (void)opaque;
    return BUS_ACK;
}

static void
batch_fn(bus_delivery *const *batch, size_t n, bus_result *res, void *o)
{
    (void)batch;
    (void)o;
    for (size_t i = 0; i < n; i++)
        res[i] = BUS_ACK;
}

static void
test_batch_subscription_refuses_a_policy(void **state)
{
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_failure_policy p = fixed_policy(NULL, 3, 10);
    bus_ctx *ctx = open_ctx(1, NULL, NULL, NULL);

    (void)state;
    sc.batch_fn = batch_fn;
    sc.policy = &p;
    assert_int_equal(bus_subscribe(ctx, "b.x", batch_noop, NULL, &sc, NULL),
                     BUS_EINVAL);
    sc.policy = NULL;
    sc.deadline_ms = -1;
    assert_int_equal(bus_subscribe(ctx, "b.x", batch_noop, NULL, &sc, NULL),
                     BUS_EINVAL);
    sc.deadline_ms = 0;
    assert_int_equal(bus_subscribe(ctx, "b.x", batch_noop, NULL, &sc, NULL),
                     BUS_OK);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

/* A config struct from before the pipeline fields (size) still opens. */
static void
test_older_config_structs_are_accepted(void **state)
{
    bus_ctx_config cfg;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = NULL;
    bt_count c = {0};

    (void)state;
    bus_ctx_config_init(&cfg);
    cfg.size = offsetof(bus_ctx_config, chain);
    cfg.metrics = (bus_metrics *)(uintptr_t)1; /* beyond size: not read */
    assert_int_equal(bus_ctx_open(&ctx, &cfg), BUS_OK);
    sc.size = offsetof(bus_sub_config, chain);
    sc.policy = (const bus_failure_policy *)(uintptr_t)1; /* not read */
    assert_int_equal(
        bus_subscribe(ctx, "o.x", bt_count_handler, &c, &sc, NULL), BUS_OK);
    bt_publish_u64(ctx, "o.x", "k", 1);
    assert_int_equal(atomic_load(&c.n), 1);
    assert_int_equal(bus_ctx_close(ctx), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inline_retries_in_place_then_succeeds),
        cmocka_unit_test(test_deferred_retry_does_not_block_other_keys),
        cmocka_unit_test(test_parked_retry_dropped_by_unsubscribe_and_close),
        cmocka_unit_test(test_dead_letter_headers_on_topic_dlq),
        cmocka_unit_test(test_mem_broker_deferred_retries_then_dead_letter),
        cmocka_unit_test(test_inline_breaker_open_nacks_to_broker),
        cmocka_unit_test(test_queued_breaker_open_defers_and_acks_at_the_end),
        cmocka_unit_test(test_dedup_in_subscription_chain_drops_redelivery),
        cmocka_unit_test(test_tracing_chain_of_three_handlers),
        cmocka_unit_test(test_metrics_in_prometheus_text),
        cmocka_unit_test(test_queued_latency_samples_exclude_idle_time),
        cmocka_unit_test(test_deadline_overruns_counted_in_metrics),
        cmocka_unit_test(test_health_checks_registered_and_deregistered),
        cmocka_unit_test(test_batch_subscription_refuses_a_policy),
        cmocka_unit_test(test_older_config_structs_are_accepted),
    };

    bt_filter_from_env();
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
