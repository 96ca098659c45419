/*
 * Idempotent consumer: remembers the ids of events handled successfully
 * so that a redelivery of one (at-least-once brokers, retries, replays)
 * is dropped instead of handled twice.
 *
 * In memory: a bounded LRU (capacity ids) where an id counts as seen for
 * ttl_ms after it was marked; older ids are forgotten. A durable store
 * (the outbox's RocksDB inbox) plugs in behind it through
 * bus_dedup_store: the LRU is then a cache in front of the store.
 *
 * Thread: any (sharded, a short spin-then-yield lock per shard). Time: the
 * config's bus_clock.
 */
#ifndef BUS_DEDUP_H
#define BUS_DEDUP_H

#include <bus/common.h>
#include <bus/clock.h>
#include <bus/event.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_dedup bus_dedup;

/* A durable "handled ids" store. Each op runs on the handler's thread and
 * may block (a disk read); errors make the middleware handle the event (a
 * duplicate is better than a loss) and are counted. */
typedef struct bus_dedup_store {
    /* *seen = whether id was marked (within the store's own retention). */
    int (*seen)(void *opaque, const bus_uuid *id, bool *seen);
    /* Records id as handled at now_ns (the dedup clock). */
    int (*mark)(void *opaque, const bus_uuid *id, uint64_t now_ns);
    void *opaque;
} bus_dedup_store;

typedef struct bus_dedup_config {
    size_t size;       /* set by _init */
    uint32_t capacity; /* ids kept in memory; 100000 */
    uint32_t ttl_ms;   /* how long an id counts as seen; 600000 (10 min) */
    const bus_dedup_store *store; /* NULL: memory only; copied */
    bus_clock clock;   /* zero: monotonic */
} bus_dedup_config;

BUS_API void bus_dedup_config_init(bus_dedup_config *cfg);
/* cfg may be NULL. Returns BUS_OK, BUS_ENOMEM. */
BUS_API int bus_dedup_new(bus_dedup **out, const bus_dedup_config *cfg);
BUS_API void bus_dedup_free(bus_dedup *dd);

/* True when id was marked within the TTL (memory, then the store). */
BUS_API bool bus_dedup_seen(bus_dedup *dd, const bus_uuid *id);
/* Marks id handled now. Returns BUS_OK or the store's error. */
BUS_API int bus_dedup_mark(bus_dedup *dd, const bus_uuid *id);

typedef struct bus_dedup_stats {
    uint64_t lookups, hits, marks, expired, evicted, store_errors;
    uint64_t size; /* ids in memory now (expired ones included until
                    * looked up or evicted) */
} bus_dedup_stats;

BUS_API void bus_dedup_stats_get(bus_dedup *dd, bus_dedup_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* BUS_DEDUP_H */
