/*
 * Idempotent consumer cache (dedup.h) on the sharded LRU (lru.h): the key
 * is the 16-byte event id (mixed for the shard and bucket choice), node.ts
 * the time it was marked. Expired nodes are removed when found.
 *
 * Cost: one shard lock (lru.h: an exchange and a release store) per
 * lookup or mark and no other read-modify-write: the counters are plain
 * fields of the shard, under its lock, summed by stats_get. Only what
 * happens outside the lock (the durable store's hits and errors) is
 * counted with atomics.
 */
#include <stdatomic.h>
#include <string.h>

#include <bus/dedup.h>
#include <bus/err.h>

#include "alloc.h"
#include "lru.h"
#include "pipeline.h"

struct bus_dedup {
    bus__lru lru;
    bus_dedup_config cfg;
    bus_dedup_store store;
    bool has_store;
    uint64_t ttl_ns;
    _Atomic uint64_t store_hits, store_errors;
};

/* Per-shard counters (bus__lru_shard.stats), @locks the shard's lock. */
enum { DD_LOOKUPS, DD_HITS, DD_MARKS, DD_EXPIRED };

void
bus_dedup_config_init(bus_dedup_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->capacity = 100000;
    cfg->ttl_ms = 600000;
}

int
bus_dedup_new(bus_dedup **out, const bus_dedup_config *cfg)
{
    bus_dedup *dd;
    int rv;

    *out = NULL;
    if ((dd = bus__zalloc(sizeof(*dd))) == NULL)
        return BUS_ENOMEM;
    if (cfg != NULL)
        dd->cfg = *cfg;
    if (dd->cfg.capacity == 0)
        dd->cfg.capacity = 100000;
    if (dd->cfg.ttl_ms == 0)
        dd->cfg.ttl_ms = 600000;
    if (dd->cfg.store != NULL) {
        dd->store = *dd->cfg.store;
        dd->has_store = true;
        dd->cfg.store = NULL;
    }
    dd->ttl_ns = (uint64_t)dd->cfg.ttl_ms * 1000000u;
    if ((rv = bus__lru_init(&dd->lru, dd->cfg.capacity,
                            dd->cfg.capacity >= 1024 ? 16 : 1)) != BUS_OK) {
        bus__free(dd, sizeof(*dd));
        return rv;
    }
    *out = dd;
    return BUS_OK;
}

void
bus_dedup_free(bus_dedup *dd)
{
    if (dd == NULL)
        return;
    bus__lru_fini(&dd->lru);
    bus__free(dd, sizeof(*dd));
}

static void
dedup_key(const bus_uuid *id, uint64_t *k0, uint64_t *k1)
{
    uint64_t a, b;

    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    /* UUIDv7's first half is a timestamp: mix so shards spread. */
    a ^= b * 0x9e3779b97f4a7c15u;
    a ^= a >> 29;
    a *= 0xbf58476d1ce4e5b9u;
    a ^= a >> 32;
    *k0 = a;
    *k1 = b;
}

bool
bus_dedup_seen(bus_dedup *dd, const bus_uuid *id)
{
    return bus__dedup_seen_at(dd, id, 0);
}

static uint64_t
dedup_now(const bus_dedup *dd, uint64_t mono_now)
{
    return mono_now != 0 && bus__clock_is_mono(&dd->cfg.clock)
             ? mono_now
             : bus_clock_now(&dd->cfg.clock);
}

bool
bus__dedup_seen_at(bus_dedup *dd, const bus_uuid *id, uint64_t mono_now)
{
    uint64_t k0, k1, now = dedup_now(dd, mono_now);
    bus__lru_shard *s;
    bus__lru_node *n;
    bool hit = false;

    dedup_key(id, &k0, &k1);
    s = bus__lru_shard_of(&dd->lru, k0);
    bus__lru_lock(s);
    s->stats[DD_LOOKUPS]++;
    if ((n = bus__lru_find(s, k0, k1)) != NULL) {
        /* now < ts: a stamp older than the mark's (another thread's) */
        if (now <= n->ts || now - n->ts < dd->ttl_ns) {
            hit = true;
            s->stats[DD_HITS]++;
        } else {
            bus__lru_remove(s, n);
            s->stats[DD_EXPIRED]++;
        }
    }
    bus__lru_unlock(s);
    if (!hit && dd->has_store) {
        bool seen = false;
        if (dd->store.seen(dd->store.opaque, id, &seen) != BUS_OK)
            atomic_fetch_add_explicit(&dd->store_errors, 1,
                                      memory_order_relaxed);
        if ((hit = seen))
            atomic_fetch_add_explicit(&dd->store_hits, 1,
                                      memory_order_relaxed);
    }
    return hit;
}

int
bus_dedup_mark(bus_dedup *dd, const bus_uuid *id)
{
    return bus__dedup_mark_at(dd, id, 0);
}

int
bus__dedup_mark_at(bus_dedup *dd, const bus_uuid *id, uint64_t mono_now)
{
    uint64_t k0, k1, now = dedup_now(dd, mono_now);
    bus__lru_shard *s;
    bus__lru_node *n;
    int rv = BUS_OK;

    dedup_key(id, &k0, &k1);
    s = bus__lru_shard_of(&dd->lru, k0);
    bus__lru_lock(s);
    s->stats[DD_MARKS]++;
    if ((n = bus__lru_find(s, k0, k1)) == NULL)
        n = bus__lru_insert(s, k0, k1, NULL);
    if (now > n->ts)
        n->ts = now;
    bus__lru_unlock(s);
    if (dd->has_store
        && (rv = dd->store.mark(dd->store.opaque, id, now)) != BUS_OK)
        atomic_fetch_add_explicit(&dd->store_errors, 1, memory_order_relaxed);
    return rv;
}

void
bus_dedup_stats_get(bus_dedup *dd, bus_dedup_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->hits = atomic_load_explicit(&dd->store_hits, memory_order_relaxed);
    st->store_errors = atomic_load_explicit(&dd->store_errors,
                                            memory_order_relaxed);
    for (uint32_t i = 0; i < dd->lru.nshards; i++) {
        bus__lru_shard *s = &dd->lru.shards[i];
        bus__lru_lock(s);
        st->lookups += s->stats[DD_LOOKUPS];
        st->hits += s->stats[DD_HITS];
        st->marks += s->stats[DD_MARKS];
        st->expired += s->stats[DD_EXPIRED];
        st->evicted += s->evictions;
        st->size += s->used;
        bus__lru_unlock(s);
    }
}
