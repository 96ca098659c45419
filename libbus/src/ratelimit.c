/*
 * Token buckets per key (ratelimit.h), on the sharded LRU (lru.h): node.d
 * holds the tokens, node.ts the time of the last refill (= last use).
 * Refill is computed lazily at each access: tokens += elapsed * rate,
 * capped at capacity. Each call also evicts at most one idle bucket from
 * its shard's LRU end, so idle eviction costs O(1) per call.
 *
 * Cost: one shard lock (an exchange and a release store, lru.h) per take
 * and no other read-modify-write: the allowed/limited/evicted counts are
 * plain fields of the shard, under its lock, summed by stats_get.
 */
#include <stdatomic.h>
#include <string.h>

#include <bus/err.h>
#include <bus/ratelimit.h>

#include "alloc.h"
#include "lru.h"
#include "pipeline.h"

struct bus_ratelimit {
    bus__lru lru;
    bus_ratelimit_config cfg;
    double per_ns; /* tokens per ns */
    uint64_t idle_ns;
};

/* Per-shard counters (bus__lru_shard.stats), @locks the shard's lock. */
enum { RL_ALLOWED, RL_LIMITED, RL_EVICTED };

void
bus_ratelimit_config_init(bus_ratelimit_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->max_keys = 10000;
    cfg->idle_ms = 60000;
}

int
bus_ratelimit_new(bus_ratelimit **out, const bus_ratelimit_config *cfg)
{
    bus_ratelimit *rl;
    int rv;

    *out = NULL;
    if (cfg == NULL || !(cfg->rate > 0) || cfg->capacity < 0)
        return BUS_EINVAL;
    if ((rl = bus__zalloc(sizeof(*rl))) == NULL)
        return BUS_ENOMEM;
    rl->cfg = *cfg;
    if (rl->cfg.capacity == 0)
        rl->cfg.capacity = cfg->rate < 1 ? 1 : cfg->rate;
    if (rl->cfg.max_keys == 0)
        rl->cfg.max_keys = 10000;
    if (rl->cfg.idle_ms == 0)
        rl->cfg.idle_ms = 60000;
    rl->per_ns = rl->cfg.rate / 1e9;
    rl->idle_ns = (uint64_t)rl->cfg.idle_ms * 1000000u;
    if ((rv = bus__lru_init(&rl->lru, rl->cfg.max_keys,
                            rl->cfg.max_keys >= 256 ? 16 : 1)) != BUS_OK) {
        bus__free(rl, sizeof(*rl));
        return rv;
    }
    *out = rl;
    return BUS_OK;
}

void
bus_ratelimit_free(bus_ratelimit *rl)
{
    if (rl == NULL)
        return;
    bus__lru_fini(&rl->lru);
    bus__free(rl, sizeof(*rl));
}

/* @locks s->lock held. */
static void
rl_evict_idle(bus_ratelimit *rl, bus__lru_shard *s, uint64_t now)
{
    bus__lru_node *old = bus__lru_oldest(s);

    /* now < ts: a caller with an older stamp than the last one; not idle */
    if (old != NULL && now > old->ts && now - old->ts > rl->idle_ns) {
        bus__lru_remove(s, old);
        s->stats[RL_EVICTED]++;
    }
}

static inline double
rl_refill(const bus_ratelimit *rl, const bus__lru_node *n, uint64_t now)
{
    double t = now > n->ts ? n->d + (double)(now - n->ts) * rl->per_ns
                           : n->d;

    return t > rl->cfg.capacity ? rl->cfg.capacity : t;
}

int
bus_ratelimit_take(bus_ratelimit *rl, const void *key, size_t len, double cost,
                   bool reserve, uint64_t *wait_ns)
{
    return bus__ratelimit_take_at(rl, bus__hash_bytes(key, len), cost,
                                  reserve, wait_ns, 0);
}

int
bus__ratelimit_take_at(bus_ratelimit *rl, uint64_t h, double cost,
                       bool reserve, uint64_t *wait_ns, uint64_t mono_now)
{
    bus__lru_shard *s = bus__lru_shard_of(&rl->lru, h);
    uint64_t now = mono_now != 0 && bus__clock_is_mono(&rl->cfg.clock)
                     ? mono_now
                     : bus_clock_now(&rl->cfg.clock);
    bus__lru_node *n;
    bool ev;
    double t;
    int rv = BUS_OK;
    uint64_t wait = 0;

    if (cost > rl->cfg.capacity)
        return BUS_EINVAL;
    bus__lru_lock(s);
    rl_evict_idle(rl, s, now);
    if ((n = bus__lru_find(s, h, 0)) == NULL) {
        n = bus__lru_insert(s, h, 0, &ev);
        if (ev)
            s->stats[RL_EVICTED]++;
        t = rl->cfg.capacity;
    } else {
        t = rl_refill(rl, n, now);
    }
    /* Stamps of several threads may arrive out of order: the bucket's
     * time never goes back (tokens refilled up to it stay refilled). */
    if (now > n->ts)
        n->ts = now;
    if (t >= cost) {
        t -= cost;
    } else {
        wait = (uint64_t)((cost - t) / rl->per_ns) + 1;
        if (reserve)
            t -= cost;
        else
            rv = BUS_EAGAIN;
    }
    n->d = t;
    s->stats[rv == BUS_OK && wait == 0 ? RL_ALLOWED : RL_LIMITED]++;
    bus__lru_unlock(s);
    if (wait_ns != NULL)
        *wait_ns = wait;
    return rv;
}

void
bus_ratelimit_status_get(bus_ratelimit *rl, const void *key, size_t len,
                         bus_ratelimit_status *st)
{
    uint64_t h = bus__hash_bytes(key, len);
    bus__lru_shard *s = bus__lru_shard_of(&rl->lru, h);
    uint64_t now = bus_clock_now(&rl->cfg.clock);
    bus__lru_node *n;

    memset(st, 0, sizeof(*st));
    st->capacity = rl->cfg.capacity;
    st->rate = rl->cfg.rate;
    st->tokens = rl->cfg.capacity;
    bus__lru_lock(s);
    if ((n = bus__lru_find(s, h, 0)) != NULL
        && (now <= n->ts || now - n->ts <= rl->idle_ns)) {
        st->known = true;
        st->tokens = rl_refill(rl, n, now);
        st->idle_ns = now > n->ts ? now - n->ts : 0;
    }
    bus__lru_unlock(s);
}

void
bus_ratelimit_stats_get(bus_ratelimit *rl, bus_ratelimit_stats *st)
{
    memset(st, 0, sizeof(*st));
    for (uint32_t i = 0; i < rl->lru.nshards; i++) {
        bus__lru_shard *s = &rl->lru.shards[i];
        bus__lru_lock(s);
        st->allowed += s->stats[RL_ALLOWED];
        st->limited += s->stats[RL_LIMITED];
        st->evicted += s->stats[RL_EVICTED];
        st->keys += s->used;
        bus__lru_unlock(s);
    }
}
