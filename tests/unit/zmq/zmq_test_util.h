/*
 * Helpers for the ZeroMQ broker tests: opening brokers, a recording
 * subscriber at the SPI level (bus__broker_subscribe, as the bus context
 * uses it), numbered events, and waits with deadlines. Header only.
 */
#ifndef BUS_ZMQ_TEST_UTIL_H
#define BUS_ZMQ_TEST_UTIL_H

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker_zmq.h>

#include "broker_impl.h"
#include "test_support.h"

#define ZT_WAIT_MS 10000

/* BUS_TEST_LOG=debug|info|... logs the brokers to stderr. */
static inline void
zt_log_cfg(bus_broker_config *cfg)
{
    const char *lv = getenv("BUS_TEST_LOG");
    bus_log_level l;

    if (lv != NULL && bus_log_level_parse(lv, &l) == BUS_OK) {
        cfg->log.fn = bus_log_stderr;
        cfg->log.level = l;
    }
}

static inline bus_broker *
zt_open(const char *uri)
{
    char err[256];
    bus_broker *b = NULL;
    bus_broker_config cfg;
    int rv;

    bus_broker_config_init(&cfg);
    cfg.uri = uri;
    zt_log_cfg(&cfg);
    rv = bus_broker_open(&b, &cfg, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

/* Opens the connecting peer of hub: "zmq+" endpoint "?bind=0" extra. */
static inline bus_broker *
zt_open_peer(bus_broker *hub, const char *extra)
{
    char uri[600];

    snprintf(uri, sizeof(uri), "zmq+%s?bind=0%s%s",
             bus_broker_zmq_endpoint(hub), extra[0] != '\0' ? "&" : "", extra);
    return zt_open(uri);
}

static inline int
zt_open_rv(const char *uri, char *err, size_t errlen)
{
    bus_broker *b = NULL;
    int rv = bus_broker_open_uri(&b, uri, err, errlen);

    if (rv == BUS_OK)
        bus_broker_close(b);
    else
        assert_null(b);
    return rv;
}

static inline bus_event *
zt_event(uint64_t n)
{
    bus_event *e;

    assert_int_equal(bus_event_new(&e, "t.num", &n, sizeof(n)), BUS_OK);
    return e;
}

static inline uint64_t
zt_num(const bus_event *e)
{
    uint64_t n = UINT64_MAX;

    if (bus_event_payload_len(e) == sizeof(n))
        memcpy(&n, bus_event_payload(e), sizeof(n));
    return n;
}

static inline int
zt_publish(bus_broker *b, const char *topic, uint64_t n, unsigned flags)
{
    bus_event *e = zt_event(n);
    int rv = bus_broker_publish(b, topic, e, flags, NULL, NULL);

    if (rv != BUS_OK)
        bus_event_unref(e);
    return rv;
}

/* ---- A recording subscription ---------------------------------------- */

#define ZT_MAX_NUM 200000

typedef struct zt_rec {
    bus_broker *b;
    _Atomic(void *) handle;
    _Atomic int rv;         /* what deliver returns (BUS_OK: take it) */
    atomic_bool ack;        /* ack tokens at once */
    _Atomic int ack_result; /* what to ack with */
    _Atomic uint64_t calls; /* deliver calls */
    _Atomic uint64_t n;     /* events taken */
    _Atomic uint64_t zero_tokens, tokens;
    _Atomic uint64_t out_of_order;
    _Atomic uint64_t dups; /* numbers seen twice */
    uint64_t last;         /* I/O thread only */
    bool have_last;
    unsigned char *seen; /* ZT_MAX_NUM flags; I/O thread only */
    char topic[128];     /* last topic (single-event tests) */
    bus_event *keep;     /* last event, when keep_last */
    bool keep_last;
    uint64_t delay_ns;  /* busy wait per delivery (slow subscriber) */
    uint64_t kept[256]; /* tokens not acked (ack false) */
    _Atomic uint64_t nkept;
} zt_rec;

static inline void
zt_rec_init(zt_rec *r, bus_broker *b)
{
    memset(r, 0, sizeof(*r));
    r->b = b;
    atomic_init(&r->ack, true);
    r->seen = calloc(ZT_MAX_NUM, 1);
    assert_non_null(r->seen);
}

static inline void
zt_rec_fini(zt_rec *r)
{
    free(r->seen);
    r->seen = NULL;
    if (r->keep != NULL)
        bus_event_unref(r->keep);
}

static inline int
zt_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
           unsigned flags)
{
    zt_rec *r = opaque;
    int rv = atomic_load(&r->rv);
    uint64_t num = zt_num(ev);
    void *h;

    (void)flags;
    atomic_fetch_add(&r->calls, 1);
    if (rv != BUS_OK)
        return rv;
    if (r->delay_ns > 0) {
        uint64_t t0 = bt_now_ns();
        while (bt_now_ns() - t0 < r->delay_ns)
            ;
    }
    if (num < ZT_MAX_NUM) {
        if (r->seen[num])
            atomic_fetch_add(&r->dups, 1);
        r->seen[num] = 1;
    }
    if (r->have_last && num <= r->last)
        atomic_fetch_add(&r->out_of_order, 1);
    r->last = num;
    r->have_last = true;
    snprintf(r->topic, sizeof(r->topic), "%s", topic);
    atomic_fetch_add(token == 0 ? &r->zero_tokens : &r->tokens, 1);
    if (token != 0 && atomic_load(&r->ack)) {
        while ((h = atomic_load(&r->handle)) == NULL)
            ; /* set by zt_sub right after subscribe returns */
        bus__broker_ack(r->b, h, token,
                        (bus_result)atomic_load(&r->ack_result));
    } else if (token != 0) {
        uint64_t k = atomic_load(&r->nkept);
        if (k < 256) {
            r->kept[k] = token;
            atomic_store(&r->nkept, k + 1);
        }
    }
    if (r->keep_last) {
        if (r->keep != NULL)
            bus_event_unref(r->keep);
        r->keep = ev;
    } else {
        bus_event_unref(ev);
    }
    atomic_fetch_add(&r->n, 1);
    return BUS_OK;
}

static inline void
zt_sub(bus_broker *b, const char *pattern, zt_rec *r)
{
    void *h = NULL;

    r->b = b;
    assert_int_equal(bus__broker_subscribe(b, pattern, NULL, zt_deliver, r, &h),
                     BUS_OK);
    atomic_store(&r->handle, h);
}

/* Acks the tokens kept so far (ack false), from the test thread. */
static inline void
zt_ack_kept(zt_rec *r, bus_result res)
{
    uint64_t i, n = atomic_load(&r->nkept);

    for (i = 0; i < n; i++)
        bus__broker_ack(r->b, atomic_load(&r->handle), r->kept[i], res);
    atomic_store(&r->nkept, 0);
}

static inline void
zt_unsub(zt_rec *r)
{
    bus__broker_unsubscribe(r->b, atomic_load(&r->handle));
    atomic_store(&r->handle, NULL);
}

typedef struct zt_want {
    _Atomic uint64_t *v;
    uint64_t want;
} zt_want;

static inline int
zt_reached(void *arg)
{
    zt_want *w = arg;

    return atomic_load(w->v) >= w->want;
}

/* Waits until *v >= want (deadline ms). */
static inline int
zt_wait(_Atomic uint64_t *v, uint64_t want, int ms)
{
    zt_want w = {v, want};

    return bt_wait_for(zt_reached, &w, ms);
}

static inline bus_broker_zmq_stats
zt_stats(bus_broker *b)
{
    bus_broker_zmq_stats st;

    assert_int_equal(bus_broker_zmq_stats_get(b, &st), BUS_OK);
    return st;
}

/* Waits until a stats field (selected by fn) reaches want. */
typedef struct zt_swant {
    bus_broker *b;
    uint64_t (*get)(const bus_broker_zmq_stats *);
    uint64_t want;
} zt_swant;

static inline int
zt_sreached(void *arg)
{
    zt_swant *w = arg;
    bus_broker_zmq_stats st;

    bus_broker_zmq_stats_get(w->b, &st);
    return w->get(&st) >= w->want;
}

static inline int
zt_swait(bus_broker *b, uint64_t (*get)(const bus_broker_zmq_stats *),
         uint64_t want, int ms)
{
    zt_swant w = {b, get, want};

    return bt_wait_for(zt_sreached, &w, ms);
}

/* An ack callback counting outcomes. */
typedef struct zt_acks {
    _Atomic uint64_t ok, failed;
    _Atomic int last_err;
} zt_acks;

static inline void
zt_ack_fn(void *opaque, bus_event *ev, int err)
{
    zt_acks *a = opaque;

    (void)ev;
    if (err == BUS_OK) {
        atomic_fetch_add(&a->ok, 1);
    } else {
        atomic_store(&a->last_err, err);
        atomic_fetch_add(&a->failed, 1);
    }
}

#endif
