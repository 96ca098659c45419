/*
 * Token-bucket rate limiter, one bucket per key (a stream id, a header
 * value, a tenant...). A bucket holds up to `capacity` tokens and gains
 * `rate` tokens per second; an event costs `cost` tokens.
 *
 * Memory is bounded: at most max_keys buckets; buckets idle for idle_ms
 * are evicted (lazily, on later calls), and a full table evicts its least
 * recently used bucket. An evicted key starts again with a full bucket.
 * Keys are identified by a 64-bit hash of their bytes (a collision shares a
 * bucket; with 64 bits it is negligible for any realistic key count).
 *
 * Thread: any; buckets are sharded, each shard under its own lock (a
 * short spin-then-yield lock: one atomic exchange per take).
 * Time comes from the config's bus_clock.
 */
#ifndef BUS_RATELIMIT_H
#define BUS_RATELIMIT_H

#include <bus/common.h>
#include <bus/clock.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_ratelimit bus_ratelimit;

typedef struct bus_ratelimit_config {
    size_t size;       /* set by _init */
    double rate;       /* tokens per second; required (> 0) */
    double capacity;   /* bucket size (burst); default: rate, at least 1 */
    uint32_t max_keys; /* buckets kept; 10000 */
    uint32_t idle_ms;  /* a bucket untouched this long is evicted; 60000 */
    bus_clock clock;   /* zero: monotonic */
} bus_ratelimit_config;

BUS_API void bus_ratelimit_config_init(bus_ratelimit_config *cfg);

/* Returns BUS_OK, BUS_EINVAL (rate <= 0, capacity < 0), BUS_ENOMEM. */
BUS_API int bus_ratelimit_new(bus_ratelimit **out,
                              const bus_ratelimit_config *cfg);
BUS_API void bus_ratelimit_free(bus_ratelimit *rl);

/* Takes cost tokens from key's bucket (key: len bytes, any content).
 * reserve false: BUS_OK when there were enough, else BUS_EAGAIN with
 * *wait_ns (may be NULL) the time until there will be (nothing taken).
 * reserve true: always takes them (the bucket may go negative: a
 * reservation) and returns BUS_OK with *wait_ns the time the caller must
 * wait before going ahead (0: at once); callers queue fairly this way.
 * BUS_EINVAL when cost > capacity (could never pass). Thread: any. */
BUS_API int bus_ratelimit_take(bus_ratelimit *rl, const void *key, size_t len,
                               double cost, bool reserve, uint64_t *wait_ns);

typedef struct bus_ratelimit_status {
    bool known;      /* false: no bucket (never seen or evicted): full */
    double tokens;   /* now, after refill; negative when reserved ahead */
    double capacity;
    double rate;
    uint64_t idle_ns; /* since last use */
} bus_ratelimit_status;

/* Status of key's bucket without taking anything. Thread: any. */
BUS_API void bus_ratelimit_status_get(bus_ratelimit *rl, const void *key,
                                      size_t len, bus_ratelimit_status *st);

typedef struct bus_ratelimit_stats {
    uint64_t allowed, limited, evicted;
    uint64_t keys; /* buckets now */
} bus_ratelimit_stats;

BUS_API void bus_ratelimit_stats_get(bus_ratelimit *rl,
                                     bus_ratelimit_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* BUS_RATELIMIT_H */
