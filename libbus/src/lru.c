/*
 * Sharded bounded LRU (lru.h). Nodes live in one array per shard, linked
 * by 32-bit indices: hash chains through hnext, the recency list through
 * prev/next (head = most recent). Free nodes chain through hnext.
 */
#include <string.h>

#include <bus/err.h>

#include "alloc.h"
#include "lru.h"

uint64_t
bus__hash_bytes(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325u;

    for (size_t i = 0; i < len; i++)
        h = (h ^ s[i]) * 0x100000001b3u;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdu;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53u;
    h ^= h >> 33;
    return h;
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
    if ((l->shards = bus__zalloc(nshards * sizeof(*l->shards))) == NULL)
        return BUS_ENOMEM;
    l->nshards = nshards;
    for (uint32_t i = 0; i < nshards; i++) {
        bus__lru_shard *s = &l->shards[i];
        uint32_t cap = (capacity + nshards - 1) / nshards;
        uint32_t nb = lru_pow2(cap);

        bus__mutex_init(&s->mtx);
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
    if (l->shards == NULL)
        return;
    for (uint32_t i = 0; i < l->nshards; i++) {
        bus__lru_shard *s = &l->shards[i];
        if (s->nodes != NULL)
            bus__free(s->nodes, (size_t)s->cap * sizeof(*s->nodes));
        if (s->buckets != NULL)
            bus__free(s->buckets, ((size_t)s->bmask + 1) * sizeof(*s->buckets));
        bus__mutex_fini(&s->mtx);
    }
    bus__free(l->shards, l->nshards * sizeof(*l->shards));
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

bus__lru_node *
bus__lru_oldest(bus__lru_shard *s)
{
    return s->tail == BUS__LRU_NIL ? NULL : &s->nodes[s->tail];
}

size_t
bus__lru_size(bus__lru *l)
{
    size_t n = 0;

    for (uint32_t i = 0; i < l->nshards; i++) {
        bus__mutex_lock(&l->shards[i].mtx);
        n += l->shards[i].used;
        bus__mutex_unlock(&l->shards[i].mtx);
    }
    return n;
}
