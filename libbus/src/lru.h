/*
 * A bounded, sharded hash table with an LRU list per shard (internal),
 * shared by the rate limiter (key = hash of the key string) and the dedup
 * cache (key = event id). Keys are 128 bits; a node carries a timestamp
 * and two value words. Each shard has its own lock: callers lock the
 * shard (bus__lru_shard_of, bus__lru_lock), work on nodes, unlock. A full
 * shard evicts its least recently used node to make room, so memory is
 * bounded by the capacity given at init. Nothing allocates after init.
 *
 * The shard lock is a test-and-set lock that spins briefly and then
 * yields, not a platform mutex: every critical section is a few dozen
 * instructions on the shard's own arrays (no call out, no allocation, no
 * blocking), where a pthread mutex costs two locked read-modify-writes
 * (lock and unlock) and two calls. This one costs one exchange to take and
 * a plain release store to drop. A waiter spins BUS__LRU_SPINS times
 * (cpu_relax) and then yields, so a holder preempted by the scheduler
 * costs waiters a yield, not a time slice of spinning.
 */
#ifndef BUS_LRU_H
#define BUS_LRU_H

#include <stdatomic.h>

#include <bus/common.h>

#include "platform.h"

#define BUS__LRU_NIL UINT32_MAX

typedef struct bus__lru_node {
    uint64_t k0, k1;
    uint64_t ts;
    uint64_t u;
    double d;
    uint32_t hnext, prev, next;
} bus__lru_node;

/* Counters kept by the users of a shard, under its lock (no atomics). */
#define BUS__LRU_STATS 4

typedef struct bus__lru_shard {
    _Alignas(BUS_CACHELINE) atomic_uint lock; /* 0 free, 1 held */
    uint32_t *buckets;
    uint32_t bmask;
    bus__lru_node *nodes;
    uint32_t cap, used, free_head;
    uint32_t head, tail; /* MRU, LRU */
    uint64_t evictions;
    uint64_t stats[BUS__LRU_STATS]; /* @locks lock */
} bus__lru_shard;

typedef struct bus__lru {
    bus__lru_shard *shards; /* cache-line aligned inside shards_raw */
    void *shards_raw;
    uint32_t nshards; /* power of two */
} bus__lru;

#define BUS__LRU_SPINS 128

void bus__lru_lock_slow(bus__lru_shard *s);

static inline void
bus__lru_lock(bus__lru_shard *s)
{
    /* acquire: the previous holder's writes (released by its unlock) */
    if (__builtin_expect(!atomic_exchange_explicit(&s->lock, 1,
                                                   memory_order_acquire),
                         1))
        return;
    bus__lru_lock_slow(s);
}

static inline void
bus__lru_unlock(bus__lru_shard *s)
{
    /* release: our writes to the shard before the next holder's acquire */
    atomic_store_explicit(&s->lock, 0, memory_order_release);
}

/* capacity: total nodes (>= nshards). BUS_OK or BUS_ENOMEM. */
int bus__lru_init(bus__lru *l, uint32_t capacity, uint32_t nshards);
void bus__lru_fini(bus__lru *l);

static inline bus__lru_shard *
bus__lru_shard_of(bus__lru *l, uint64_t k0)
{
    return &l->shards[(k0 >> 40) & (l->nshards - 1)];
}

/* @locks s->lock held for all of these. */
bus__lru_node *bus__lru_find(bus__lru_shard *s, uint64_t k0, uint64_t k1);
/* Inserts a new node (key must be absent), evicting the LRU one if full;
 * *evicted (may be NULL) says so. Fields ts/u/d are zero. */
bus__lru_node *bus__lru_insert(bus__lru_shard *s, uint64_t k0, uint64_t k1,
                               bool *evicted);
void bus__lru_remove(bus__lru_shard *s, bus__lru_node *n);
/* The least recently used node, or NULL when empty. */
static inline bus__lru_node *
bus__lru_oldest(bus__lru_shard *s)
{
    return s->tail == BUS__LRU_NIL ? NULL : &s->nodes[s->tail];
}
size_t bus__lru_size(bus__lru *l);

/* 64-bit hash of bytes: 8 bytes per multiply, then a murmur finaliser. */
uint64_t bus__hash_bytes(const void *p, size_t len);
/* The same hash of a NUL-terminated string; *len (may be NULL) gets its
 * length. Equals bus__hash_bytes(s, strlen(s)). */
uint64_t bus__hash_str(const char *s, size_t *len);

#endif
