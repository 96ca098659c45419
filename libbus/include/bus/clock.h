/*
 * Injectable clocks for the pipeline's state machines (circuit breaker,
 * retry, rate limiter, dedup TTL, timer wheel): each takes a bus_clock in
 * its config, so tests drive time by hand and never sleep.
 *
 * A zeroed bus_clock (now_ns NULL) is the monotonic clock
 * (CLOCK_MONOTONIC, the bus_metrics_now_ns scale) and sleeps really.
 */
#ifndef BUS_CLOCK_H
#define BUS_CLOCK_H

#include <bus/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_clock {
    /* Current time in ns on a monotonic scale. NULL: CLOCK_MONOTONIC.
     * Called from any thread, often: must be fast and thread-safe. */
    uint64_t (*now_ns)(void *opaque);
    /* Waits ns (in-place retries, rate-limit delays). NULL with now_ns
     * NULL: a real sleep; NULL with now_ns set: no wait at all. A test
     * clock advances its time here. */
    void (*sleep_ns)(void *opaque, uint64_t ns);
    void *opaque;
} bus_clock;

/* Reads c (NULL or zeroed: monotonic). Thread: any. */
BUS_API uint64_t bus_clock_now(const bus_clock *c);
/* Waits ns as c says (see sleep_ns). Thread: any. */
BUS_API void bus_clock_sleep(const bus_clock *c, uint64_t ns);

/* A manual clock for tests: time moves only by bus_manual_clock_advance or
 * by sleeps through its bus_clock (which advance it by the amount). The
 * time is an atomic, so threads may read it while one advances it. */
typedef struct bus_manual_clock {
    bus_clock clock; /* pass &mc.clock (or copy it) into configs */
    uint64_t now;    /* ns; access through the functions below */
} bus_manual_clock;

/* Sets mc to start_ns (a nonzero start keeps 0 free as "never"). */
BUS_API void bus_manual_clock_init(bus_manual_clock *mc, uint64_t start_ns);
BUS_API void bus_manual_clock_advance(bus_manual_clock *mc, uint64_t ns);
BUS_API uint64_t bus_manual_clock_get(const bus_manual_clock *mc);

#ifdef __cplusplus
}
#endif
#endif /* BUS_CLOCK_H */
