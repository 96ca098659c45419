/*
 * A bounded multi-producer, single-consumer ring of fixed-size entries
 * (internal). Producers claim a position with one CAS on the tail; each
 * slot carries the position it was last filled for (seq = pos + 1,
 * stored with release after the entry), which is how the consumer tells
 * a committed entry from an old one. The consumer needs no atomic RMW and
 * never writes a slot: it publishes how far it has read (head, release)
 * once per ring_pop, and a producer reuses a slot only once head has
 * passed it. Producers keep a copy of head beside the tail and reload the
 * real one only when that copy says the ring is full, so in steady state
 * the only cache lines crossing cores are the slots themselves (one way,
 * producer to consumer) and the head once per full ring.
 *
 * (The first version followed Vyukov's bounded queue, where the consumer
 * hands each slot back by writing its sequence number: one more line
 * transfer per slot, which profiles showed as the producers' main cost.)
 *
 * Publishing is split in two: ring_claim reserves a slot (or fails when
 * the ring is full) and ring_commit fills it. The bus claims a slot in
 * every queue an event goes to before committing any, so a full queue
 * refuses the event as a whole; claimed slots that must be abandoned are
 * committed as no-op entries (sub == NULL). The consumer stops at the
 * first claimed but uncommitted slot.
 *
 * Capacity is a power of two; memory is allocated once at init.
 */
#ifndef BUS_RING_H
#define BUS_RING_H

#include <stdatomic.h>

#include <bus/event.h>

#include "alloc.h"
#include "platform.h"

struct bus_sub;
struct ctx_link;
struct ctx_redo;

typedef struct ring_entry {
    bus_event *ev;          /* one reference owned by the entry */
    struct bus_sub *sub;    /* NULL: a no-op entry, skip */
    struct ctx_link *link;  /* broker link for acks, or NULL */
    uint64_t token;         /* broker delivery token */
    struct ctx_redo *redo;  /* a deferred retry's state, or NULL (the
                             * topic is the event's: ev->topic) */
} ring_entry;

typedef struct ring_slot {
    _Atomic uint64_t seq; /* pos + 1 of the entry committed last */
    ring_entry e;
} ring_slot;

/* Three cache lines: what never changes after init (read by both sides),
 * the producers' tail with their copy of head, the consumer's head.
 * Embedders must allocate the ring cache-line aligned. */
typedef struct ring {
    _Alignas(BUS_CACHELINE) uint64_t mask;
    ring_slot *slots;
    size_t slots_size;
    _Alignas(BUS_CACHELINE) _Atomic uint64_t tail; /* producers */
    /* Producers' copy of head: never ahead of it (only values loaded
     * from head are stored, and a stale smaller one is merely
     * conservative). Release/acquire, so that a producer trusting a copy
     * another producer made inherits that one's acquire of head. */
    _Atomic uint64_t head_seen;
    /* Written by the consumer only, release, once per ring_pop. */
    _Alignas(BUS_CACHELINE) _Atomic uint64_t head;
} ring;

static inline int
ring_init(ring *r, uint32_t capacity)
{
    uint64_t i;

    r->slots_size = sizeof(ring_slot) * capacity;
    r->slots = bus__alloc(r->slots_size);
    if (r->slots == NULL)
        return BUS_ENOMEM;
    for (i = 0; i < capacity; i++)
        atomic_init(&r->slots[i].seq, 0); /* pos + 1 is never 0 */
    atomic_init(&r->tail, 0);
    atomic_init(&r->head_seen, 0);
    atomic_init(&r->head, 0);
    r->mask = capacity - 1;
    return BUS_OK;
}

static inline void
ring_fini(ring *r)
{
    bus__free(r->slots, r->slots_size);
    r->slots = NULL;
}

/* Reserves the next slot; false when the ring is full. */
static inline bool
ring_claim(ring *r, uint64_t *pos_out)
{
    uint64_t pos = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t cap = r->mask + 1;

    for (;;) {
        uint64_t head = atomic_load_explicit(&r->head_seen,
                                             memory_order_acquire);
        if (pos - head >= cap) {
            /* acquire: the consumer's reads of the entries before head
             * happen-before our overwrite of their slots. */
            head = atomic_load_explicit(&r->head, memory_order_acquire);
            if (pos - head >= cap)
                return false;
            atomic_store_explicit(&r->head_seen, head, memory_order_release);
        }
        /* On failure pos is reloaded with the current tail. The acquire
         * above still covers the slot we get: head only grows. */
        if (atomic_compare_exchange_weak_explicit(&r->tail, &pos, pos + 1,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *pos_out = pos;
            return true;
        }
    }
}

static inline void
ring_commit(ring *r, uint64_t pos, const ring_entry *e)
{
    ring_slot *s = &r->slots[pos & r->mask];

    s->e = *e;
    /* release: the entry is visible before the consumer sees the seq. */
    atomic_store_explicit(&s->seq, pos + 1, memory_order_release);
}

/* Pops up to max entries into out; returns how many. Consumer only. */
static inline size_t
ring_pop(ring *r, ring_entry *out, size_t max)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    size_t n = 0;

    while (n < max) {
        ring_slot *s = &r->slots[head & r->mask];
        /* acquire: pairs with ring_commit's release. */
        if (atomic_load_explicit(&s->seq, memory_order_acquire) != head + 1)
            break;
        out[n++] = s->e;
        head++;
    }
    /* release: our reads of these entries happen-before a producer
     * reuses their slots (ring_claim's acquire of head). */
    if (n > 0)
        atomic_store_explicit(&r->head, head, memory_order_release);
    return n;
}

/* True when the next entry is committed: what an idle consumer polls.
 * It reads the next slot's line, which the producer writes anyway, and
 * leaves the tail's line to the producers (polling the tail would pull it
 * away from them on every publish). seq_cst: a consumer that announces
 * it sleeps and then finds nothing pairs with a producer that commits and
 * then looks for sleepers through a seq_cst fence (ctx.c). Consumer
 * only. */
static inline bool
ring_ready(ring *r)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    ring_slot *s = &r->slots[head & r->mask];

    return atomic_load_explicit(&s->seq, memory_order_seq_cst) == head + 1;
}

/* True when the consumer would find something (or a claimed slot is
 * being filled). Consumer only. */
static inline bool
ring_nonempty(ring *r)
{
    return atomic_load_explicit(&r->tail, memory_order_acquire)
        != atomic_load_explicit(&r->head, memory_order_relaxed);
}

/* Approximate number of entries, claimed ones included (any thread).
 * Tail is read first (acquire keeps the head load after it): a tail read
 * earlier is never more than the capacity past the later head, so the
 * result never exceeds what the ring can hold (the clamp is a guard). */
static inline uint64_t
ring_depth(const ring *r)
{
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t d = t >= h ? t - h : 0;

    return d > r->mask + 1 ? r->mask + 1 : d;
}

#endif
