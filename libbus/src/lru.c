/*
 * Sharded bounded LRU (lru.h). Nodes live in one array per shard, linked
 * by 32-bit indices: hash chains through hnext, the recency list through
 * prev/next (head = most recent). Free nodes chain through hnext.
 */
#include <string.h>

#include <bus/err.h>

#include "alloc.h"
#include "lru.h"

/* Word at a time (the byte loop of FNV-1a was a chain of one multiply per
 * byte: ~7 ns for a stream id). Each 8-byte word is mixed in with a
 * multiply and a shift; the last, partial word is read as overlapping
 * loads (the last 8 bytes, or for a key under 8 bytes its first and last
 * 4, or bytes 0, len/2 and len-1), which cover every byte, and the length
 * seeds the hash, so two keys of the same length give different words and
 * two of different lengths different seeds. The murmur3 finaliser then
 * spreads the bits for the shard and bucket choice. */
static inline uint64_t
hash_mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0xff51afd7ed558ccdu;
    return h ^ (h >> 29);
}

uint64_t
bus__hash_bytes(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325u ^ ((uint64_t)len * 0x9e3779b97f4a7c15u);
    uint64_t w;
    uint32_t a, b;
    size_t n = len;

    for (; n > 8; s += 8, n -= 8) {
        memcpy(&w, s, 8);
        h = hash_mix(h, w);
    }
    if (len >= 8) {
        memcpy(&w, s + n - 8, 8); /* the last 8 bytes of the key */
        h = hash_mix(h, w);
    } else if (len >= 4) {
        memcpy(&a, s, 4);
        memcpy(&b, s + len - 4, 4);
        h = hash_mix(h, (uint64_t)a | (uint64_t)b << 32);
    } else if (len > 0) {
        h = hash_mix(h, (uint64_t)s[0] | (uint64_t)s[len / 2] << 8
                            | (uint64_t)s[len - 1] << 16);
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdu;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53u;
    h ^= h >> 33;
    return h;
}

uint64_t
bus__hash_str(const char *s, size_t *len)
{
    size_t n = strlen(s);

    if (len != NULL)
        *len = n;
    return bus__hash_bytes(s, n);
}

void
bus__lru_lock_slow(bus__lru_shard *s)
{
    for (unsigned spins = 0;; spins++) {
        /* Wait with plain loads (no line ping-pong), then try again. */
        if (!atomic_load_explicit(&s->lock, memory_order_relaxed)
            && !atomic_exchange_explicit(&s->lock, 1, memory_order_acquire))
            return;
        if (spins < BUS__LRU_SPINS)
            bus__cpu_relax();
        else
            bus__thread_yield();
    }
}

static uint32_t
lru_pow2(uint32_t v)
{
    uint32_t p = 1;

    while (p < v)
        p <<= 1;
    return p;
}

int
bus__lru_init(bus__lru *l, uint32_t capacity, uint32_t nshards)
{
    memset(l, 0, sizeof(*l));
    nshards = lru_pow2(nshards ? nshards : 1);
    if (capacity < nshards)
        capacity = nshards;
    /* Aligned by hand: a shard's lock and list heads on lines of their own
     * (the allocator hooks promise only malloc's alignment). */
    if ((l->shards_raw = bus__zalloc((nshards + 1) * sizeof(*l->shards)))
        == NULL)
        return BUS_ENOMEM;
    l->shards = (bus__lru_shard *)(((uintptr_t)l->shards_raw
                                    + BUS_CACHELINE - 1)
                                   & ~(uintptr_t)(BUS_CACHELINE - 1));
    l->nshards = nshards;
    for (uint32_t i = 0; i < nshards; i++) {
        bus__lru_shard *s = &l->shards[i];
        uint32_t cap = (capacity + nshards - 1) / nshards;
        uint32_t nb = lru_pow2(cap);

        atomic_init(&s->lock, 0);
        s->cap = cap;
        s->bmask = nb - 1;
        s->head = s->tail = BUS__LRU_NIL;
        s->nodes = bus__zalloc((size_t)cap * sizeof(*s->nodes));
        s->buckets = bus__alloc((size_t)nb * sizeof(*s->buckets));
        if (s->nodes == NULL || s->buckets == NULL) {
            bus__lru_fini(l);
            return BUS_ENOMEM;
        }
        memset(s->buckets, 0xff, (size_t)nb * sizeof(*s->buckets));
        for (uint32_t j = 0; j < cap; j++)
            s->nodes[j].hnext = j + 1 < cap ? j + 1 : BUS__LRU_NIL;
        s->free_head = 0;
    }
    return BUS_OK;
}

void
bus__lru_fini(bus__lru *l)
{
    if (l->shards_raw == NULL)
        return;
    for (uint32_t i = 0; i < l->nshards; i++) {
        bus__lru_shard *s = &l->shards[i];
        if (s->nodes != NULL)
            bus__free(s->nodes, (size_t)s->cap * sizeof(*s->nodes));
        if (s->buckets != NULL)
            bus__free(s->buckets, ((size_t)s->bmask + 1) * sizeof(*s->buckets));
    }
    bus__free(l->shards_raw, (l->nshards + 1) * sizeof(*l->shards));
    l->shards = NULL;
}

static void
lru_unlink(bus__lru_shard *s, uint32_t i)
{
    bus__lru_node *n = &s->nodes[i];

    if (n->prev != BUS__LRU_NIL)
        s->nodes[n->prev].next = n->next;
    else
        s->head = n->next;
    if (n->next != BUS__LRU_NIL)
        s->nodes[n->next].prev = n->prev;
    else
        s->tail = n->prev;
}

static void
lru_push_head(bus__lru_shard *s, uint32_t i)
{
    bus__lru_node *n = &s->nodes[i];

    n->prev = BUS__LRU_NIL;
    n->next = s->head;
    if (s->head != BUS__LRU_NIL)
        s->nodes[s->head].prev = i;
    s->head = i;
    if (s->tail == BUS__LRU_NIL)
        s->tail = i;
}

bus__lru_node *
bus__lru_find(bus__lru_shard *s, uint64_t k0, uint64_t k1)
{
    uint32_t i = s->buckets[k0 & s->bmask];

    while (i != BUS__LRU_NIL) {
        bus__lru_node *n = &s->nodes[i];
        if (n->k0 == k0 && n->k1 == k1) {
            if (s->head != i) {
                lru_unlink(s, i);
                lru_push_head(s, i);
            }
            return n;
        }
        i = n->hnext;
    }
    return NULL;
}

void
bus__lru_remove(bus__lru_shard *s, bus__lru_node *n)
{
    uint32_t i = (uint32_t)(n - s->nodes);
    uint32_t *pp = &s->buckets[n->k0 & s->bmask];

    while (*pp != i)
        pp = &s->nodes[*pp].hnext;
    *pp = n->hnext;
    lru_unlink(s, i);
    n->hnext = s->free_head;
    s->free_head = i;
    s->used--;
}

bus__lru_node *
bus__lru_insert(bus__lru_shard *s, uint64_t k0, uint64_t k1, bool *evicted)
{
    uint32_t i;
    bus__lru_node *n;

    if (evicted != NULL)
        *evicted = false;
    if (s->free_head == BUS__LRU_NIL) {
        bus__lru_remove(s, &s->nodes[s->tail]);
        s->evictions++;
        if (evicted != NULL)
            *evicted = true;
    }
    i = s->free_head;
    n = &s->nodes[i];
    s->free_head = n->hnext;
    n->k0 = k0;
    n->k1 = k1;
    n->ts = 0;
    n->u = 0;
    n->d = 0;
    n->hnext = s->buckets[k0 & s->bmask];
    s->buckets[k0 & s->bmask] = i;
    lru_push_head(s, i);
    s->used++;
    return n;
}

size_t
bus__lru_size(bus__lru *l)
{
    size_t n = 0;

    for (uint32_t i = 0; i < l->nshards; i++) {
        bus__lru_lock(&l->shards[i]);
        n += l->shards[i].used;
        bus__lru_unlock(&l->shards[i]);
    }
    return n;
}
