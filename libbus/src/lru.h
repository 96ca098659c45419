/*
 * A bounded, sharded hash table with an LRU list per shard (internal),
 * shared by the rate limiter (key = hash of the key string) and the dedup
 * cache (key = event id). Keys are 128 bits; a node carries a timestamp
 * and two value words. Each shard has its own mutex: callers lock the
 * shard (bus__lru_shard_of), work on nodes, unlock. A full shard evicts
 * its least recently used node to make room, so memory is bounded by the
 * capacity given at init. Nothing allocates after init.
 */
#ifndef BUS_LRU_H
#define BUS_LRU_H

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

typedef struct bus__lru_shard {
    _Alignas(BUS_CACHELINE) bus__mutex mtx;
    uint32_t *buckets;
    uint32_t bmask;
    bus__lru_node *nodes;
    uint32_t cap, used, free_head;
    uint32_t head, tail; /* MRU, LRU */
    uint64_t evictions;
} bus__lru_shard;

typedef struct bus__lru {
    bus__lru_shard *shards;
    uint32_t nshards; /* power of two */
} bus__lru;

/* capacity: total nodes (>= nshards). BUS_OK or BUS_ENOMEM. */
int bus__lru_init(bus__lru *l, uint32_t capacity, uint32_t nshards);
void bus__lru_fini(bus__lru *l);

static inline bus__lru_shard *
bus__lru_shard_of(bus__lru *l, uint64_t k0)
{
    return &l->shards[(k0 >> 40) & (l->nshards - 1)];
}

/* @locks s->mtx held for all of these. */
bus__lru_node *bus__lru_find(bus__lru_shard *s, uint64_t k0, uint64_t k1);
/* Inserts a new node (key must be absent), evicting the LRU one if full;
 * *evicted (may be NULL) says so. Fields ts/u/d are zero. */
bus__lru_node *bus__lru_insert(bus__lru_shard *s, uint64_t k0, uint64_t k1,
                               bool *evicted);
void bus__lru_remove(bus__lru_shard *s, bus__lru_node *n);
/* The least recently used node, or NULL when empty. */
bus__lru_node *bus__lru_oldest(bus__lru_shard *s);
size_t bus__lru_size(bus__lru *l);

/* 64-bit hash of bytes (FNV-1a then a murmur finaliser). */
uint64_t bus__hash_bytes(const void *p, size_t len);

#endif
