/*
 * Pipeline internals shared by the middlewares (middleware.c), their
 * building blocks (breaker.c, ratelimit.c, dedup.c) and the dispatcher
 * (ctx.c).
 *
 * One clock read per delivery: the dispatcher stamps a delivery with
 * CLOCK_MONOTONIC (d->now_ns) before the chain runs, and the innermost
 * middleware that needs the time after the handler (deadline) leaves it in
 * d->end_ns. A building block whose bus_clock is the default (zeroed: the
 * same CLOCK_MONOTONIC scale) takes that time through its _at variant
 * instead of reading the clock again; one with an injected clock always
 * reads its own (tests drive those by hand).
 */
#ifndef BUS_PIPELINE_H
#define BUS_PIPELINE_H

#include <stdatomic.h>

#include <bus/breaker.h>
#include <bus/clock.h>
#include <bus/dedup.h>
#include <bus/metrics.h>
#include <bus/middleware.h>
#include <bus/ratelimit.h>

#include "delivery.h"
#include "platform.h"

/* True for a zeroed bus_clock: CLOCK_MONOTONIC, which d->now_ns uses. */
static inline bool
bus__clock_is_mono(const bus_clock *c)
{
    return c == NULL || c->now_ns == NULL;
}

/* The time at the start of the delivery on c's scale: the dispatcher's
 * stamp when c is the monotonic clock and d is stamped, else a read. */
static inline uint64_t
bus__delivery_now(const bus_delivery *d, const bus_clock *c)
{
    if (!bus__clock_is_mono(c))
        return c->now_ns(c->opaque);
    return d->now_ns != 0 ? d->now_ns : bus__clock_mono_ns();
}

/* The time after the handler on c's scale: d->end_ns when an inner
 * middleware read it already, else a read (kept in d->end_ns). */
static inline uint64_t
bus__delivery_end(bus_delivery *d, const bus_clock *c)
{
    if (!bus__clock_is_mono(c))
        return c->now_ns(c->opaque);
    if (d->end_ns == 0)
        d->end_ns = bus__clock_mono_ns();
    return d->end_ns;
}

/* The delivery this thread is handling (trace.h: bus_delivery_current);
 * the dispatcher sets it around each handler call. */
extern BUS__TLS const bus_delivery *bus__trace_current;

/* As the public calls, with mono_now (CLOCK_MONOTONIC, 0: unknown) used
 * in place of a clock read when the object's clock is the default. */
void bus__breaker_record_at(bus_breaker *b, bool success, uint64_t mono_now);
/* key_hash: bus__hash_bytes of the key (lru.h). */
int bus__ratelimit_take_at(bus_ratelimit *rl, uint64_t key_hash, double cost,
                           bool reserve, uint64_t *wait_ns, uint64_t mono_now);
bool bus__dedup_seen_at(bus_dedup *dd, const bus_uuid *id,
                        uint64_t mono_now);
int bus__dedup_mark_at(bus_dedup *dd, const bus_uuid *id, uint64_t mono_now);

/* ---- Per-thread shards ---------------------------------------------------
 *
 * A thread that records into a sharded object (metrics cells, breaker
 * counters) holds one process-wide slot (metrics.c), claimed on its first
 * record and freed when it exits: slot k (1-based) owns shard k - 1 of
 * every object that has at least k shards and updates it with relaxed
 * loads and stores, no read-modify-write; a thread with a higher slot (or
 * UINT32_MAX: none left) uses the object's shared shard, with atomic
 * read-modify-writes. A slot passes to a new thread through a release on
 * free and an acquire on claim, so the new owner continues from the old
 * one's last stores. */
extern BUS__TLS uint32_t bus__thread_slot_tls;
uint32_t bus__thread_slot_claim(void);

static inline uint32_t
bus__thread_slot(void)
{
    uint32_t k = bus__thread_slot_tls;

    if (__builtin_expect(k == 0, 0))
        k = bus__thread_slot_claim();
    return k;
}

/* Adds n to a cell owned by this thread (owned) or shared (atomic add).
 * Relaxed: counters order nothing. */
static inline void
bus__cell_add(_Atomic uint64_t *cell, uint64_t n, bool owned)
{
    if (owned)
        atomic_store_explicit(
            cell, atomic_load_explicit(cell, memory_order_relaxed) + n,
            memory_order_relaxed);
    else
        atomic_fetch_add_explicit(cell, n, memory_order_relaxed);
}

/* bus_counter_add and bus_hist_record without the PLT (metrics.c). */
void bus__counter_add(bus_counter *c, uint64_t n);
void bus__hist_record(bus_hist *h, uint64_t ns);

/* A latency sample left open (delivery.h, d->pend). A queued worker
 * stamps each delivery anyway (d->now_ns); when it goes straight on from
 * one delivery to the next, that stamp is also the end of the previous
 * handler call, so the metrics middleware need not read the clock after
 * the handler: it leaves (h, t0) here, and the worker closes it with its
 * next stamp, or with a clock read before anything else runs (a handler
 * without pipeline, a batch, going idle, leaving the read section that
 * keeps h alive). What lies between the handler's return and that stamp
 * (the result counted, the broker's ack, the next entry taken) counts in
 * the sample. One sample at a time: a second metrics middleware in the
 * same delivery reads the clock as before. */
struct bus__lat_pend {
    bus_hist *h; /* NULL: nothing open */
    uint64_t t0;
};

static inline void
bus__lat_pend_close(bus__lat_pend *p, uint64_t end_ns)
{
    if (p->h != NULL) {
        bus__hist_record(p->h, end_ns - p->t0);
        p->h = NULL;
    }
}

/* Closes d's open sample now, before time passes that is not the
 * handler's (a retry's backoff). */
static inline void
bus__delivery_settle(bus_delivery *d)
{
    if (d->pend != NULL && d->pend->h != NULL)
        bus__lat_pend_close(d->pend, bus__delivery_end(d, NULL));
}

/* A chain's middlewares (n of them), for the dispatcher, which composes
 * the per-subscription chain it runs. */
const bus_middleware *bus__chain_items(const bus_chain *c, size_t *n);

/* Appends mw, which its constructor built with result rv, to c: returns
 * rv if that failed; frees mw's state if the append fails. For building
 * chains from the bus_mw_* constructors in one expression each. */
int bus__chain_add(bus_chain *c, int rv, bus_middleware *mw);

#endif
