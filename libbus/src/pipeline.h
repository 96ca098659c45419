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

#include <bus/breaker.h>
#include <bus/clock.h>
#include <bus/dedup.h>
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
int bus__ratelimit_take_at(bus_ratelimit *rl, const void *key, size_t len,
                           double cost, bool reserve, uint64_t *wait_ns,
                           uint64_t mono_now);
bool bus__dedup_seen_at(bus_dedup *dd, const bus_uuid *id,
                        uint64_t mono_now);
int bus__dedup_mark_at(bus_dedup *dd, const bus_uuid *id, uint64_t mono_now);

/* A chain's middlewares (n of them), for the dispatcher, which composes
 * the per-subscription chain it runs. */
const bus_middleware *bus__chain_items(const bus_chain *c, size_t *n);

#endif
