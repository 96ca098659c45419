/*
 * The broker conformance suite (STYLE.md §12): one source, built once per
 * backend with -DBUS_TEST_URL="scheme://..." (tests/conformance/
 * CMakeLists.txt). Every test opens the broker from BUS_TEST_URL, attaches
 * it to one or two bus contexts and works through the public bus API
 * (bus_subscribe, bus_publish), so what it checks is what users get:
 * publish/subscribe, fan-out, pattern matching, per-key order under
 * concurrent publishers and workers, full queues, close during delivery,
 * double close, unsubscribe during delivery, 10,000 subscriptions, and two
 * contexts sharing one broker.
 *
 * Backend differences live in one place, the "backend profile" below: how
 * to open a second broker on the same medium (conf_open_peer) and what the
 * backend promises (synchronous delivery, exact counts, how a full queue
 * shows). A new backend adds its case there, under an #if on the scheme.
 */
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker.h>

#include "../unit/bus/bus_test_util.h"

#ifndef BUS_TEST_URL
#error "build with -DBUS_TEST_URL=\"scheme://...\" (see CMakeLists.txt)"
#endif

/* ---- Backend profile ------------------------------------------------- */

typedef struct conf_profile {
    /* A publish has reached every matching subscription (inline handlers
     * ran, queued ones are enqueued) when bus_publish returns. */
    bool synchronous;
    /* A delivery refused by a full queue fails the publish itself
     * (BUS_EAGAIN, the event stays with the caller); otherwise the
     * backend holds or drops it by its own guarantee. */
    bool full_queue_fails_publish;
    /* Time for asynchronous deliveries to arrive (ms). */
    int deliver_ms;
} conf_profile;

static bool
conf_scheme_is(const char *scheme)
{
    size_t n = strlen(scheme);

    return strncmp(BUS_TEST_URL, scheme, n) == 0 &&
           strncmp(BUS_TEST_URL + n, "://", 3) == 0;
}

static conf_profile
conf_profile_get(void)
{
    conf_profile p = {false, false, BT_WAIT_MS};

    if (conf_scheme_is("mem")) {
        /* broker_memory.h: delivery runs in the publishing thread; a
         * refused delivery is the publish's error. */
        p.synchronous = true;
        p.full_queue_fails_publish = true;
    }
    return p;
}

static bus_broker *
conf_open(void)
{
    char err[256];
    bus_broker *b = NULL;
    int rv = bus_broker_open_uri(&b, BUS_TEST_URL, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", BUS_TEST_URL, bus_err_name(rv), err);
    return b;
}

/* A second broker on the same medium as first, for a second context.
 * mem://name: the same name is the same bus. */
#ifdef BUS_TEST_ZMQ
/* zmq+: the broker opened on BUS_TEST_URL binds and is a hub; a peer
 * connects to the endpoint it bound (bus/broker_zmq.h), same options. */
#include <stdio.h>

#include <bus/broker_zmq.h>

static bus_broker *
conf_open_peer(bus_broker *first)
{
    const char *q = strchr(BUS_TEST_URL, '?');
    char uri[600], err[256];
    bus_broker *b = NULL;
    int rv;

    snprintf(uri, sizeof(uri), "zmq+%s?bind=0%s%s",
             bus_broker_zmq_endpoint(first), q != NULL ? "&" : "",
             q != NULL ? q + 1 : "");
    if ((rv = bus_broker_open_uri(&b, uri, err, sizeof(err))) != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}
/* On a failure: the broker's counters, to tell a lost event from a
 * stalled one. */
static void
conf_dump_stats(bus_broker *b)
{
    bus_broker_zmq_stats st;

    if (bus_broker_zmq_stats_get(b, &st) != BUS_OK)
        return;
    print_message("zmq: published %" PRIu64 " sent %" PRIu64
                  " delivered %" PRIu64 " dropped_queue %" PRIu64
                  " resent %" PRIu64 " duplicates %" PRIu64 " acked %" PRIu64
                  " unrouted %" PRIu64 " inflight %" PRIu64 "\n",
                  st.published, st.sent, st.delivered, st.dropped_queue,
                  st.resent, st.duplicates_dropped, st.acked, st.unrouted,
                  st.inflight);
}
#else
static bus_broker *
conf_open_peer(bus_broker *first)
{
    (void)first;
    return conf_open();
}

static void
conf_dump_stats(bus_broker *b)
{
    (void)b;
}
#endif

/* ---- Fixture: one context with the broker attached --------------------- */

typedef struct pub_loop pub_loop;

typedef struct conf {
    bus_ctx *ctx;
    bus_broker *b;
    conf_profile prof;
    /* Publisher threads a test started: a failed assertion leaves the
     * test at once, so the teardown stops and joins them before the
     * context they publish to is closed. */
    pub_loop *loop;
    pthread_t loop_th[2];
    int loop_n;
} conf;

static void pub_loop_join(conf *c);

static bus_ctx *
conf_ctx(uint32_t workers, uint32_t capacity)
{
    bus_ctx_config c;
    bus_ctx *ctx = NULL;

    bus_ctx_config_init(&c);
    c.name = "conformance";
    c.workers = workers;
    if (capacity != 0)
        c.queue_capacity = capacity;
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    return ctx;
}

static int
conf_setup(void **state)
{
    conf *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return -1;
    c->prof = conf_profile_get();
    c->b = conf_open();
    c->ctx = conf_ctx(2, 0);
    if (bus_ctx_attach(c->ctx, c->b, NULL) != BUS_OK)
        return -1;
    *state = c;
    return 0;
}

static int
conf_teardown(void **state)
{
    conf *c = *state;

    pub_loop_join(c);
    if (c->ctx != NULL && bus_ctx_close(c->ctx) != 0)
        return -1;
    bus_broker_close(c->b);
    free(c->loop); /* after the close: a subscription may count into it */
    free(c);
    return 0;
}

/* ---- Publish / subscribe ---------------------------------------------------
 */

typedef struct seen1 {
    atomic_int calls;
    atomic_int ok; /* every field as published */
} seen1;

static bus_result
seen1_handler(bus_delivery *d, void *opaque)
{
    seen1 *s = opaque;
    bus_event *e = bus_delivery_event(d);
    bool ok = strcmp(bus_delivery_topic(d), "conf.ps") == 0 &&
              strcmp(bus_event_type(e), "t.test") == 0 &&
              bus_event_stream(e) != NULL &&
              strcmp(bus_event_stream(e), "order-1") == 0 &&
              bt_payload_u64(e) == 42 && bus_delivery_attempt(d) == 1;

    atomic_store(&s->ok, ok);
    atomic_fetch_add(&s->calls, 1);
    return BUS_ACK;
}

static int
seen1_called(void *arg)
{
    return atomic_load(&((seen1 *)arg)->calls) > 0;
}

static void
test_publish_reaches_a_subscriber_with_every_field(void **state)
{
    conf *c = *state;
    seen1 s;

    memset(&s, 0, sizeof(s));
    assert_int_equal(
        bus_subscribe(c->ctx, "conf.ps", seen1_handler, &s, NULL, NULL),
        BUS_OK);
    bt_publish_u64(c->ctx, "conf.ps", "order-1", 42);
    assert_true(bt_wait_for(seen1_called, &s, c->prof.deliver_ms));
    assert_int_equal(atomic_load(&s.ok), 1);
    assert_int_equal(atomic_load(&s.calls), 1);
}

#define FAN_SUBS 8
#define FAN_EVENTS 200

static void
test_fan_out_reaches_every_subscriber_exactly(void **state)
{
    conf *c = *state;
    bt_count n[FAN_SUBS];
    int i;

    memset(n, 0, sizeof(n));
    for (i = 0; i < FAN_SUBS; i++) {
        bus_sub_config sc =
            bt_sub_cfg(i % 2 ? BUS_DISPATCH_INLINE : BUS_DISPATCH_QUEUED);
        assert_int_equal(bus_subscribe(c->ctx, "conf.fan", bt_count_handler,
                                       &n[i], &sc, NULL),
                         BUS_OK);
    }
    for (i = 0; i < FAN_EVENTS; i++)
        bt_publish_u64(c->ctx, "conf.fan", NULL, (uint64_t)i);
    for (i = 0; i < FAN_SUBS; i++)
        assert_true(bt_count_wait(&n[i], FAN_EVENTS));
    /* Exact: nothing more arrives (duplicates would show at close). */
    assert_int_equal(bus_ctx_close(c->ctx), 0);
    c->ctx = NULL;
    for (i = 0; i < FAN_SUBS; i++)
        assert_int_equal(atomic_load(&n[i].n), FAN_EVENTS);
}

static void
test_patterns_match_through_the_broker(void **state)
{
    static const char *const pats[] = {"cp.a.b", "cp.*.b", "cp.>",
                                       "cp.*",   "*.a.*",  ">"};
    static const struct {
        const char *topic;
        int hits[6];
    } cases[] = {
        {"cp.a.b", {1, 1, 1, 0, 1, 1}}, {"cp.x.b", {0, 1, 1, 0, 0, 1}},
        {"cp.a", {0, 0, 1, 1, 0, 1}},   {"cp.a.b.c", {0, 0, 1, 0, 0, 1}},
        {"zz.a.q", {0, 0, 0, 0, 1, 1}}, {"zz", {0, 0, 0, 0, 0, 1}},
    };
    conf *c = *state;
    bt_count n[6];
    uint64_t want[6] = {0};
    size_t i, k;

    memset(n, 0, sizeof(n));
    for (k = 0; k < 6; k++)
        assert_int_equal(
            bus_subscribe(c->ctx, pats[k], bt_count_handler, &n[k], NULL, NULL),
            BUS_OK);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bt_publish_u64(c->ctx, cases[i].topic, NULL, i);
        for (k = 0; k < 6; k++)
            want[k] += (uint64_t)cases[i].hits[k];
    }
    for (k = 0; k < 6; k++)
        assert_true(bt_count_wait(&n[k], want[k]));
    assert_int_equal(bus_ctx_close(c->ctx), 0);
    c->ctx = NULL;
    for (k = 0; k < 6; k++)
        if (atomic_load(&n[k].n) != want[k])
            fail_msg("pattern %s: %" PRIu64 " events, want %" PRIu64, pats[k],
                     atomic_load(&n[k].n), want[k]);
}

/* ---- Per-key order: 4 publishers x 4 workers ------------------------------
 */

#define ORD_PUBS 4
#define ORD_KEYS 32
#if defined(__SANITIZE_THREAD__)
#define ORD_PER_PUB 4000
#else
#define ORD_PER_PUB 25000
#endif

typedef struct ord {
    bus_ctx *ctx;
    /* next sequence per (publisher, key); one key is handled by one
     * worker at a time, so each cell has one writer at a time (the
     * worker's ring hand-off orders successive writers). */
    uint64_t next[ORD_PUBS][ORD_KEYS];
    atomic_int order_errors;
    atomic_int bad_rv;
    _Atomic uint64_t handled;
    _Atomic unsigned next_pub;
} ord;

static bus_result
ord_handler(bus_delivery *d, void *opaque)
{
    ord *o = opaque;
    uint64_t v = bt_payload_u64(bus_delivery_event(d));
    unsigned pub = (unsigned)(v >> 56), key = (unsigned)(v >> 48) & 0xff;
    uint64_t seq = v & 0xffffffffffffull;

    if (pub >= ORD_PUBS || key >= ORD_KEYS || o->next[pub][key] != seq)
        atomic_fetch_add(&o->order_errors, 1);
    else
        o->next[pub][key] = seq + 1;
    atomic_fetch_add(&o->handled, 1);
    return BUS_ACK;
}

static void *
ord_publisher(void *arg)
{
    ord *o = arg;
    unsigned pub = atomic_fetch_add(&o->next_pub, 1);
    uint64_t seq[ORD_KEYS] = {0}, i, x = 0x2545f4914f6cdd1dull + pub;

    for (i = 0; i < ORD_PER_PUB; i++) {
        char stream[24];
        unsigned key;
        bus_event *e;
        int rv;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        key = (unsigned)(x % ORD_KEYS);
        snprintf(stream, sizeof(stream), "account-%u", key);
        e = bt_event_u64(stream, (uint64_t)pub << 56 | (uint64_t)key << 48 |
                                     seq[key]++);
        /* BLOCK policy: a full queue waits; it must not fail here. */
        rv = bus_publish(o->ctx, "conf.ord", e, 0);
        if (rv != BUS_OK) {
            bus_event_unref(e);
            atomic_fetch_add(&o->bad_rv, 1);
        }
    }
    return NULL;
}

static int
ord_all_handled(void *arg)
{
    ord *o = arg;

    return atomic_load(&o->handled) >= (uint64_t)ORD_PUBS * ORD_PER_PUB;
}

static void
test_per_key_order_with_4_publishers_and_4_workers(void **state)
{
    conf *c = *state;
    pthread_t th[ORD_PUBS];
    uint64_t total = 0;
    ord *o = calloc(1, sizeof(*o));
    int i, k;

    assert_non_null(o);
    /* Its own context: 4 workers, and small queues so that publishers
     * meet full queues (BLOCK) along the way. */
    o->ctx = conf_ctx(4, 256);
    assert_int_equal(bus_ctx_attach(o->ctx, c->b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(o->ctx, "conf.ord", ord_handler, o, NULL, NULL), BUS_OK);
    for (i = 0; i < ORD_PUBS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, ord_publisher, o), 0);
    for (i = 0; i < ORD_PUBS; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    if (!bt_wait_for(ord_all_handled, o, 30000)) {
        conf_dump_stats(c->b);
        fail_msg("%" PRIu64 " of %d events handled after 30 s",
                 atomic_load(&o->handled), ORD_PUBS * ORD_PER_PUB);
    }
    assert_int_equal(bus_ctx_close(o->ctx), 0);
    assert_int_equal(atomic_load(&o->bad_rv), 0);
    assert_int_equal(atomic_load(&o->order_errors), 0);
    assert_int_equal(atomic_load(&o->handled),
                     (uint64_t)ORD_PUBS * ORD_PER_PUB);
    for (i = 0; i < ORD_PUBS; i++)
        for (k = 0; k < ORD_KEYS; k++)
            total += o->next[i][k];
    assert_int_equal(total, (uint64_t)ORD_PUBS * ORD_PER_PUB);
    free(o);
}

/* ---- Full queue -------------------------------------------------------------
 */

typedef struct holder {
    bt_gate gate;
    _Atomic uint64_t handled;
} holder;

static bus_result
holder_handler(bus_delivery *d, void *opaque)
{
    holder *h = opaque;

    (void)d;
    if (atomic_load(&h->gate.entered) == 0)
        bt_gate_wait(&h->gate);
    atomic_fetch_add(&h->handled, 1);
    return BUS_ACK;
}

static void
test_full_queue_refuses_without_growing(void **state)
{
    conf *c = *state;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_ctx_stats st;
    bus_ctx *ctx;
    holder h;
    uint64_t accepted = 0, refused = 0, i;

    memset(&h, 0, sizeof(h));
    bt_gate_init(&h.gate);
    ctx = conf_ctx(1, 8);
    assert_int_equal(bus_ctx_attach(ctx, c->b, NULL), BUS_OK);
    sc.backpressure = BUS_BP_FAIL;
    assert_int_equal(
        bus_subscribe(ctx, "conf.full", holder_handler, &h, &sc, NULL), BUS_OK);
    bt_publish_u64(ctx, "conf.full", NULL, 0);
    assert_true(bt_gate_wait_entered(&h.gate, 1)); /* the worker is held */
    for (i = 1; i <= 100; i++) {
        bus_event *e = bt_event_u64(NULL, i);
        int rv = bus_publish(ctx, "conf.full", e, 0);
        if (rv == BUS_OK) {
            accepted++;
            continue;
        }
        assert_int_equal(rv, BUS_EAGAIN);
        assert_int_equal(bus_event_refcount(e), 1); /* still ours */
        assert_int_equal(bt_payload_u64(e), i);
        bus_event_unref(e);
        refused++;
    }
    bus_ctx_stats_get(ctx, &st);
    assert_true(st.queued <= 8); /* bounded, whatever the backend does */
    if (c->prof.full_queue_fails_publish) {
        assert_int_equal(accepted, 8);
        assert_int_equal(refused, 92);
    }
    bt_gate_open(&h.gate);
    assert_int_equal(bus_ctx_close(ctx), 0);
    if (c->prof.full_queue_fails_publish)
        assert_int_equal(atomic_load(&h.handled), 9);
    bt_gate_fini(&h.gate);
}

/* ---- Close ------------------------------------------------------------------
 */

typedef struct closing {
    atomic_int after_close;
    _Atomic uint64_t calls;
    _Atomic uint64_t late;
} closing;

static bus_result
closing_handler(bus_delivery *d, void *opaque)
{
    closing *s = opaque;
    uint64_t t0 = bt_now_ns();

    (void)d;
    if (atomic_load(&s->after_close))
        atomic_fetch_add(&s->late, 1);
    while (bt_now_ns() - t0 < 20000) /* 20 us: close finds work queued */
        ;
    atomic_fetch_add(&s->calls, 1);
    return BUS_ACK;
}

static int
closing_started(void *arg)
{
    return atomic_load(&((closing *)arg)->calls) >= 10;
}

static void
test_close_during_delivery_drains_and_leaves_the_broker_usable(void **state)
{
    conf *c = *state;
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_broker *peer = conf_open_peer(c->b);
    bus_ctx *other = conf_ctx(1, 0);
    bt_count later = {0};
    closing s;
    int i;

    memset(&s, 0, sizeof(s));
    assert_int_equal(
        bus_subscribe(c->ctx, "conf.close", closing_handler, &s, NULL, NULL),
        BUS_OK);
    assert_int_equal(
        bus_subscribe(c->ctx, "conf.close", closing_handler, &s, &in, NULL),
        BUS_OK);
    for (i = 0; i < 500; i++)
        bt_publish_u64(c->ctx, "conf.close", NULL, (uint64_t)i);
    assert_true(bt_wait_for(closing_started, &s, c->prof.deliver_ms));
    /* Queued work remains: close handles all of it, then detaches. */
    assert_int_equal(bus_ctx_close(c->ctx), 0);
    c->ctx = NULL;
    atomic_store(&s.after_close, 1);
    if (c->prof.synchronous)
        assert_int_equal(atomic_load(&s.calls), 1000);
    /* The broker outlives the context: another context uses it, and
     * nothing reaches the closed one. */
    assert_int_equal(bus_ctx_attach(other, peer, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(other, "conf.close", bt_count_handler, &later, &in, NULL),
        BUS_OK);
    for (i = 0; i < 10; i++)
        bt_publish_u64(other, "conf.close", NULL, (uint64_t)i);
    assert_true(bt_count_wait(&later, 10));
    assert_int_equal(bus_ctx_close(other), 0);
    bus_broker_close(peer);
    assert_int_equal(atomic_load(&s.late), 0);
}

static void
test_double_close_is_harmless(void **state)
{
    conf *c = *state;
    bus_broker *b2 = conf_open_peer(c->b);
    bus_ctx *ctx = conf_ctx(1, 0);
    bus_event *e;

    assert_int_equal(bus_ctx_attach(ctx, b2, NULL), BUS_OK);
    bus_ctx_close_async(ctx);
    bus_ctx_close_async(ctx);
    e = bt_event_u64(NULL, 1);
    assert_int_equal(bus_publish(ctx, "conf.dc", e, 0), BUS_ECLOSED);
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(bus_ctx_close(NULL), 0);
    /* The broker: close_async twice, then close. Publishing through a
     * closed broker fails and leaves the event with the caller. */
    bus_broker_close_async(b2);
    bus_broker_close_async(b2);
    assert_int_equal(bus_broker_publish(b2, "conf.dc", e, 0, NULL, NULL),
                     BUS_ECLOSED);
    assert_int_equal(bus_event_refcount(e), 1);
    bus_broker_close(b2);
    bus_broker_close(NULL);
    bus_event_unref(e);
}

static void
test_publish_routed_to_a_closed_broker_fails_and_keeps_the_event(void **state)
{
    conf *c = *state;
    bus_broker *b2 = conf_open_peer(c->b);
    bus_ctx *ctx = conf_ctx(1, 0);
    bus_event *e;

    assert_int_equal(bus_ctx_attach(ctx, b2, NULL), BUS_OK);
    bus_broker_close_async(b2);
    e = bt_event_u64(NULL, 5);
    assert_int_equal(bus_publish(ctx, "conf.cb", e, 0), BUS_ECLOSED);
    assert_int_equal(bus_event_refcount(e), 1);
    assert_int_equal(bt_payload_u64(e), 5);
    bus_event_unref(e);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b2);
}

/* ---- Unsubscribe during delivery
 * --------------------------------------------- */

typedef struct watched {
    atomic_int gone;
    _Atomic uint64_t calls, late;
} watched;

static bus_result
watched_handler(bus_delivery *d, void *opaque)
{
    watched *w = opaque;

    (void)d;
    if (atomic_load(&w->gone))
        atomic_fetch_add(&w->late, 1);
    atomic_fetch_add(&w->calls, 1);
    return BUS_ACK;
}

/* Publishers in a loop, at most PUB_AHEAD events ahead of what the
 * subscription `seen` counts: a medium with bounded retention (Kafka's
 * log; the mock keeps a few MB per partition) must not be outrun by more
 * than it keeps, or the consumer's position falls off the log. */
#define PUB_AHEAD 2048

struct pub_loop {
    bus_ctx *ctx;
    bt_count seen;
    atomic_int stop;
    _Atomic uint64_t n;
    atomic_int bad_rv;
};

static void *
pub_loop_thread(void *arg)
{
    pub_loop *p = arg;
    uint64_t i;

    for (i = 0; !atomic_load(&p->stop); i++) {
        char stream[16];
        bus_event *e;
        int rv;
        while (atomic_load(&p->n) > atomic_load(&p->seen.n) + PUB_AHEAD &&
               !atomic_load(&p->stop))
            sched_yield();
        snprintf(stream, sizeof(stream), "k%" PRIu64, i % 5);
        e = bt_event_u64(stream, i);
        rv = bus_publish(p->ctx, "conf.un", e, 0);
        if (rv != BUS_OK) {
            bus_event_unref(e);
            atomic_fetch_add(&p->bad_rv, 1);
        } else {
            atomic_fetch_add(&p->n, 1);
        }
    }
    return NULL;
}

/* The publishers' state, owned by c (the teardown frees it after closing
 * the context): p->seen is for the caller's subscription to count into
 * before pub_loop_run. */
static pub_loop *
pub_loop_new(conf *c)
{
    pub_loop *p = calloc(1, sizeof(*p));

    assert_non_null(p);
    p->ctx = c->ctx;
    c->loop = p;
    return p;
}

/* Starts two publisher threads on c->ctx. */
static void
pub_loop_run(conf *c)
{
    int i;

    for (i = 0; i < 2; i++) {
        assert_int_equal(
            pthread_create(&c->loop_th[i], NULL, pub_loop_thread, c->loop),
            0);
        c->loop_n++;
    }
}

/* Stops and joins the publishers (if running). */
static void
pub_loop_join(conf *c)
{
    int i;

    if (c->loop == NULL)
        return;
    atomic_store(&c->loop->stop, 1);
    for (i = 0; i < c->loop_n; i++)
        assert_int_equal(pthread_join(c->loop_th[i], NULL), 0);
    c->loop_n = 0;
}


static int
watched_some(void *arg)
{
    return atomic_load(&((watched *)arg)->calls) >= 20;
}

static void
test_unsubscribe_during_delivery_stops_calls_at_return(void **state)
{
    conf *c = *state;
    pub_loop *p = pub_loop_new(c);
    bt_count *keep = &p->seen; /* outlives a failed assertion, as p */
    int round;

    assert_int_equal(
        bus_subscribe(c->ctx, "conf.un", bt_count_handler, keep, NULL, NULL),
        BUS_OK);
    pub_loop_run(c);
    for (round = 0; round < 10; round++) {
        bus_sub_config sc =
            bt_sub_cfg(round % 2 ? BUS_DISPATCH_INLINE : BUS_DISPATCH_QUEUED);
        watched *w = calloc(1, sizeof(*w));
        bus_sub *s;
        assert_non_null(w);
        assert_int_equal(
            bus_subscribe(c->ctx, "conf.un", watched_handler, w, &sc, &s),
            BUS_OK);
        assert_true(bt_wait_for(watched_some, w, c->prof.deliver_ms));
        assert_int_equal(bus_unsubscribe(s), BUS_OK);
        atomic_store(&w->gone, 1);
        /* Let deliveries published before the unsubscribe go by. */
        assert_true(bt_count_wait(keep, atomic_load(&keep->n) + 500));
        assert_int_equal(atomic_load(&w->late), 0);
        free(w); /* a late call would now be a use after free (ASan) */
    }
    pub_loop_join(c);
    assert_int_equal(atomic_load(&p->bad_rv), 0);
}

/* ---- 10,000 subscriptions
 * ------------------------------------------------------- */

#define MANY 10000

static void
test_ten_thousand_subscriptions_route_exactly(void **state)
{
    conf *c = *state;
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bt_count *n = calloc(MANY, sizeof(*n));
    bus_sub **subs = calloc(MANY, sizeof(*subs));
    bt_count star = {0};
    uint64_t published = 0;
    char topic[32];
    int i;

    assert_non_null(n);
    assert_non_null(subs);
    for (i = 0; i < MANY; i++) {
        snprintf(topic, sizeof(topic), "conf.many.%d", i);
        assert_int_equal(bus_subscribe(c->ctx, topic, bt_count_handler, &n[i],
                                       &in, &subs[i]),
                         BUS_OK);
    }
    assert_int_equal(bus_subscribe(c->ctx, "conf.many.*", bt_count_handler,
                                   &star, NULL, NULL),
                     BUS_OK);
    for (i = 0; i < MANY; i += 97) {
        snprintf(topic, sizeof(topic), "conf.many.%d", i);
        bt_publish_u64(c->ctx, topic, NULL, (uint64_t)i);
        published++;
    }
    bt_publish_u64(c->ctx, "conf.many.none", NULL, 0);
    assert_true(bt_count_wait(&star, published + 1));
    for (i = 0; i < MANY; i++) {
        uint64_t want = i % 97 == 0 ? 1 : 0;
        if (!c->prof.synchronous && want == 1)
            assert_true(bt_count_wait(&n[i], 1));
        if (atomic_load(&n[i].n) != want)
            fail_msg("subscription %d: %" PRIu64 " events, want %" PRIu64, i,
                     atomic_load(&n[i].n), want);
    }
    for (i = 0; i < MANY; i++)
        assert_int_equal(bus_unsubscribe(subs[i]), BUS_OK);
    bt_publish_u64(c->ctx, "conf.many.0", NULL, 0);
    assert_true(bt_count_wait(&star, published + 2));
    assert_int_equal(bus_ctx_close(c->ctx), 0);
    c->ctx = NULL;
    assert_int_equal(atomic_load(&n[0].n), 1);
    free(n);
    free(subs);
}

/* ---- Two contexts, one broker
 * -------------------------------------------------- */

static void
test_two_contexts_exchange_events_through_the_broker(void **state)
{
    conf *c = *state;
    bus_broker *peer = conf_open_peer(c->b);
    bus_ctx *other = conf_ctx(2, 0);
    bt_count here = {0}, there = {0};
    int i;

    assert_int_equal(bus_ctx_attach(other, peer, NULL), BUS_OK);
    assert_int_equal(bus_subscribe(c->ctx, "conf.two.to1", bt_count_handler,
                                   &here, NULL, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(other, "conf.two.to2", bt_count_handler,
                                   &there, NULL, NULL),
                     BUS_OK);
    for (i = 0; i < 100; i++) {
        bt_publish_u64(c->ctx, "conf.two.to2", NULL, (uint64_t)i);
        bt_publish_u64(other, "conf.two.to1", NULL, (uint64_t)i);
    }
    assert_true(bt_count_wait(&here, 100));
    assert_true(bt_count_wait(&there, 100));
    assert_int_equal(bus_ctx_close(other), 0);
    bus_broker_close(peer);
    assert_int_equal(bus_ctx_close(c->ctx), 0);
    c->ctx = NULL;
    assert_int_equal(atomic_load(&here.n), 100);
    assert_int_equal(atomic_load(&there.n), 100);
}

#define CONF_TEST(f)                                                           \
    cmocka_unit_test_setup_teardown(f, conf_setup, conf_teardown)

int
main(void)
{
    const struct CMUnitTest tests[] = {
        CONF_TEST(test_publish_reaches_a_subscriber_with_every_field),
        CONF_TEST(test_fan_out_reaches_every_subscriber_exactly),
        CONF_TEST(test_patterns_match_through_the_broker),
        CONF_TEST(test_per_key_order_with_4_publishers_and_4_workers),
        CONF_TEST(test_full_queue_refuses_without_growing),
        CONF_TEST(
            test_close_during_delivery_drains_and_leaves_the_broker_usable),
        CONF_TEST(test_double_close_is_harmless),
        CONF_TEST(
            test_publish_routed_to_a_closed_broker_fails_and_keeps_the_event),
        CONF_TEST(test_unsubscribe_during_delivery_stops_calls_at_return),
        CONF_TEST(test_ten_thousand_subscriptions_route_exactly),
        CONF_TEST(test_two_contexts_exchange_events_through_the_broker),
    };

    bt_filter_from_env();
    return cmocka_run_group_tests_name("broker_conformance " BUS_TEST_URL,
                                       tests, NULL, NULL);
}
