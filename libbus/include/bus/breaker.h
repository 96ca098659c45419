/*
 * Circuit breaker: CLOSED (calls pass) -> OPEN (calls refused) after too
 * many failures -> HALF_OPEN (a few probe calls) after open_ms -> CLOSED
 * after enough probe successes, or back to OPEN on a probe failure.
 * docs/failure-policy.md has the state diagram.
 *
 * Opening: on failure_threshold consecutive failures, or when the failure
 * rate over the rolling window reaches failure_rate once at least
 * min_calls were recorded in it.
 *
 * Cost: bus_breaker_allow on a CLOSED breaker is one acquire load (~1-2 ns,
 * bench/pipeline); recording a success on it is a few plain loads and
 * stores into the calling thread's shard of the counters and window, no
 * atomic read-modify-write (plus a clock read when the rate rule is on and
 * the call is not from the bus, which passes its delivery's time). The
 * counters are summed when a failure needs the rate rule and by
 * bus_breaker_stats_get. A breaker takes ~4.5 KiB (16 thread shards).
 * Transitions take the breaker's mutex; the state-change callback runs
 * after it is released.
 *
 * Time comes from the config's bus_clock (tests inject a manual clock).
 */
#ifndef BUS_BREAKER_H
#define BUS_BREAKER_H

#include <bus/common.h>
#include <bus/clock.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_breaker bus_breaker;
typedef struct bus_breaker_registry bus_breaker_registry;

typedef enum bus_breaker_state {
    BUS_BREAKER_CLOSED = 0,
    BUS_BREAKER_OPEN = 1,
    BUS_BREAKER_HALF_OPEN = 2
} bus_breaker_state;

/* Called on each transition, on the thread whose call caused it, with no
 * libbus lock held. Transitions of one breaker on two threads may reach
 * the callback in either order; `to` is exact for that transition. Must
 * not free the breaker. */
typedef void (*bus_breaker_state_fn)(void *opaque, bus_breaker *b,
                                     bus_breaker_state from,
                                     bus_breaker_state to);

/* Zero means default; bus_breaker_config_init fills them. Copied. */
typedef struct bus_breaker_config {
    size_t size;                /* set by _init */
    const char *name;           /* logs, registry, metrics; "breaker" */
    uint32_t failure_threshold; /* consecutive failures that open; 5;
                                 * UINT32_MAX disables the rule */
    double failure_rate;        /* rate in (0, 1] that opens; 0.5;
                                 * > 1 disables the rule */
    uint32_t min_calls;         /* calls in the window before the rate
                                 * rule applies; 20 */
    uint32_t window_ms;         /* rolling window, 10 buckets; 10000 */
    uint32_t open_ms;           /* time OPEN before probing; 30000 */
    uint32_t half_open_probes;  /* probe calls in flight at once; 1 */
    uint32_t close_successes;   /* probe successes that close; 1 */
    bus_breaker_state_fn on_state; /* NULL: none */
    void *on_state_opaque;
    bus_clock clock;            /* zero: monotonic */
} bus_breaker_config;

BUS_API void bus_breaker_config_init(bus_breaker_config *cfg);

/* Creates a CLOSED breaker. cfg may be NULL. Returns BUS_OK, BUS_EINVAL,
 * BUS_ENOMEM. Thread: any. */
BUS_API int bus_breaker_new(bus_breaker **out, const bus_breaker_config *cfg);
/* NULL is a no-op. Thread: any, once no thread uses b. */
BUS_API void bus_breaker_free(bus_breaker *b);

/* Asks to make a call. True: make it and then record its outcome with
 * bus_breaker_record (a HALF_OPEN probe slot is held until then). False:
 * refused (counted as a rejection); do not call. Thread: any. */
BUS_API bool bus_breaker_allow(bus_breaker *b);

/* Records the outcome of an allowed call. Thread: any. */
BUS_API void bus_breaker_record(bus_breaker *b, bool success);

BUS_API bus_breaker_state bus_breaker_state_get(const bus_breaker *b);
BUS_API const char *bus_breaker_name(const bus_breaker *b);
BUS_API const char *bus_breaker_state_name(bus_breaker_state st);

/* Forces CLOSED and clears the counters (operator action). */
BUS_API void bus_breaker_reset(bus_breaker *b);

typedef struct bus_breaker_stats {
    bus_breaker_state state;
    uint64_t calls;      /* outcomes recorded */
    uint64_t failures;   /* of which failures */
    uint64_t rejections; /* allow() refusals */
    uint64_t opened;     /* times it opened */
    uint64_t retry_in_ns; /* OPEN: time until it half-opens; else 0 */
    uint32_t consecutive_failures;
} bus_breaker_stats;

BUS_API void bus_breaker_stats_get(bus_breaker *b, bus_breaker_stats *st);

/* ---- Registry of named breakers ----------------------------------------- */

/* A registry owns breakers by name. on_state (may be NULL) is called for
 * every transition of every breaker in it, after the breaker's own
 * callback; the bus uses it for its "bus.breakers" health check. */
BUS_API int bus_breaker_registry_new(bus_breaker_registry **out,
                                     bus_breaker_state_fn on_state,
                                     void *opaque);
/* Frees the registry and its breakers. NULL is a no-op. */
BUS_API void bus_breaker_registry_free(bus_breaker_registry *r);

/* Get or create: the breaker named cfg->name (cfg may be NULL only to look
 * one up: BUS_ENOTFOUND when absent). The registry owns it; valid until
 * bus_breaker_registry_free. Returns BUS_OK, BUS_EINVAL, BUS_ENOMEM,
 * BUS_ENOTFOUND. Thread: any. */
BUS_API int bus_breaker_registry_get(bus_breaker_registry *r, const char *name,
                                     const bus_breaker_config *cfg,
                                     bus_breaker **out);

typedef struct bus_breaker_info {
    char name[128];
    bus_breaker_stats stats;
} bus_breaker_info;

/* Snapshot of every breaker (in creation order): *out gets n entries,
 * freed with bus_breaker_snapshot_free. Returns BUS_OK, BUS_ENOMEM. */
BUS_API int bus_breaker_registry_snapshot(bus_breaker_registry *r,
                                          bus_breaker_info **out, size_t *n);
BUS_API void bus_breaker_snapshot_free(bus_breaker_info *infos, size_t n);
/* Breakers not CLOSED now. */
BUS_API size_t bus_breaker_registry_open_count(bus_breaker_registry *r);

#ifdef __cplusplus
}
#endif
#endif /* BUS_BREAKER_H */
