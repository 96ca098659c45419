/*
 * Helpers shared by the bus tests (tests/unit/bus and tests/conformance):
 * counters that handlers bump and tests wait on, gates that hold a handler
 * until the test opens them, a log capture, and event builders. Header
 * only (static functions), so each test program takes what it uses.
 *
 * Waiting is always on a condition with a deadline (STYLE.md §12): a gate
 * that is never opened releases its waiter after BT_GATE_MAX_MS and counts
 * it as a timeout, so a broken test fails instead of hanging.
 */
#ifndef BUS_TEST_UTIL_H
#define BUS_TEST_UTIL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "test_support.h"

#define BT_WAIT_MS 10000 /* default deadline of a condition wait */
#define BT_GATE_MAX_MS 10000

/* ---- Counters ------------------------------------------------------------ */

typedef struct bt_count {
    _Atomic uint64_t n;
    uint64_t want; /* for bt_count_reached */
} bt_count;

static inline int
bt_count_reached(void *arg)
{
    bt_count *c = arg;

    return atomic_load(&c->n) >= c->want;
}

/* Waits until c reaches want (deadline BT_WAIT_MS). */
static inline int
bt_count_wait(bt_count *c, uint64_t want)
{
    c->want = want;
    return bt_wait_for(bt_count_reached, c, BT_WAIT_MS);
}

/* A handler counting its calls in opaque (a bt_count). */
static inline bus_result
bt_count_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    atomic_fetch_add(&((bt_count *)opaque)->n, 1);
    return BUS_ACK;
}

/* ---- Gates -----------------------------------------------------------------
 */

/* A handler blocked on a gate says so (entered) and waits until the test
 * opens it. */
typedef struct bt_gate {
    pthread_mutex_t mtx;
    pthread_cond_t cond;
    bool open;
    atomic_int entered; /* waiters that arrived */
    atomic_int timeouts;
} bt_gate;

static inline void
bt_gate_init(bt_gate *g)
{
    pthread_condattr_t a;

    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_mutex_init(&g->mtx, NULL);
    pthread_cond_init(&g->cond, &a);
    pthread_condattr_destroy(&a);
    g->open = false;
    atomic_init(&g->entered, 0);
    atomic_init(&g->timeouts, 0);
}

static inline void
bt_gate_fini(bt_gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->mtx);
}

/* Waits until the gate opens, at most max_ms; returns whether it opened. */
static inline bool
bt_gate_wait_ms(bt_gate *g, int max_ms)
{
    struct timespec ts;
    bool opened;

    atomic_fetch_add(&g->entered, 1);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += max_ms / 1000;
    ts.tv_nsec += (long)(max_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g->mtx);
    while (!g->open)
        if (pthread_cond_timedwait(&g->cond, &g->mtx, &ts) != 0)
            break;
    opened = g->open;
    pthread_mutex_unlock(&g->mtx);
    if (!opened)
        atomic_fetch_add(&g->timeouts, 1);
    return opened;
}

static inline bool
bt_gate_wait(bt_gate *g)
{
    return bt_gate_wait_ms(g, BT_GATE_MAX_MS);
}

static inline void
bt_gate_open(bt_gate *g)
{
    pthread_mutex_lock(&g->mtx);
    g->open = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->mtx);
}

typedef struct bt_gate_want {
    bt_gate *g;
    int n;
} bt_gate_want;

static inline int
bt_gate_entered_cond(void *arg)
{
    bt_gate_want *w = arg;

    return atomic_load(&w->g->entered) >= w->n;
}

/* Waits until n waiters have arrived at g. */
static inline int
bt_gate_wait_entered(bt_gate *g, int n)
{
    bt_gate_want w = {g, n};

    return bt_wait_for(bt_gate_entered_cond, &w, BT_WAIT_MS);
}

/* ---- Log capture ------------------------------------------------------------
 */

typedef struct bt_log {
    pthread_mutex_t mtx;
    int n;
    int n_err, n_warn;
    char last[512];
} bt_log;

static inline void
bt_log_init(bt_log *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mtx, NULL);
}

static inline void
bt_log_fn(void *opaque, bus_log_level level, const char *subsys,
          const char *msg)
{
    bt_log *l = opaque;

    pthread_mutex_lock(&l->mtx);
    l->n++;
    if (level == BUS_LOG_ERR)
        l->n_err++;
    if (level == BUS_LOG_WARN)
        l->n_warn++;
    snprintf(l->last, sizeof(l->last), "%s: %s", subsys, msg);
    pthread_mutex_unlock(&l->mtx);
}

static inline bus_logger
bt_logger(bt_log *l)
{
    bus_logger lg = {bt_log_fn, l, BUS_LOG_DEBUG};

    return lg;
}

/* ---- Events
 * ------------------------------------------------------------------ */

/* An event of type "t.test" with stream (may be NULL) and payload.
 * Thread: any (aborts on failure). */
static inline bus_event *
bt_event(const char *stream, const void *payload, size_t len)
{
    bus_event_init in;
    bus_event *e = NULL;

    memset(&in, 0, sizeof(in));
    in.type = "t.test";
    in.stream = stream;
    in.payload = payload;
    in.payload_len = len;
    /* Not a cmocka assert: builders also run on helper threads, where a
     * failing assert cannot unwind to the test. */
    if (bus_event_create(&e, &in) != BUS_OK) {
        fprintf(stderr, "bt_event: bus_event_create failed\n");
        abort();
    }
    return e;
}

/* An event whose payload is the 8 bytes of v. */
static inline bus_event *
bt_event_u64(const char *stream, uint64_t v)
{
    return bt_event(stream, &v, sizeof(v));
}

static inline uint64_t
bt_payload_u64(const bus_event *e)
{
    uint64_t v = 0;

    if (bus_event_payload_len(e) >= sizeof(v))
        memcpy(&v, bus_event_payload(e), sizeof(v));
    return v;
}

/* Publishes an 8-byte payload event; asserts BUS_OK. Main thread only
 * (cmocka asserts). */
static inline void
bt_publish_u64(bus_ctx *ctx, const char *topic, const char *stream, uint64_t v)
{
    bus_event *e = bt_event_u64(stream, v);
    int rv = bus_publish(ctx, topic, e, 0);

    if (rv != BUS_OK)
        bus_event_unref(e);
    assert_int_equal(rv, BUS_OK);
}

/* A context with n workers (0: default) and otherwise cfg defaults. */
static inline bus_ctx *
bt_ctx_open(uint32_t workers)
{
    bus_ctx_config cfg;
    bus_ctx *ctx = NULL;

    bus_ctx_config_init(&cfg);
    if (workers != 0)
        cfg.workers = workers;
    assert_int_equal(bus_ctx_open(&ctx, &cfg), BUS_OK);
    return ctx;
}

static inline bus_sub_config
bt_sub_cfg(bus_dispatch dispatch)
{
    bus_sub_config c;

    bus_sub_config_init(&c);
    c.dispatch = dispatch;
    return c;
}

/* Ordering key from the first 8 payload bytes. */
static inline uint64_t
bt_key_payload(const bus_event *ev, void *opaque)
{
    (void)opaque;
    return bt_payload_u64(ev);
}

/* BUS_TEST_FILTER=pattern runs only the matching tests (cmocka). */
static inline void
bt_filter_from_env(void)
{
    const char *f = getenv("BUS_TEST_FILTER");

    if (f != NULL && *f != '\0')
        cmocka_set_test_filter(f);
}

#endif
