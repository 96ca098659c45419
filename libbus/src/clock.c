/*
 * Injectable clocks (clock.h). The manual clock keeps its time in a plain
 * uint64_t of the public struct, accessed only with __atomic builtins
 * (relaxed: a test clock orders nothing but itself).
 */
#include <bus/clock.h>

#include "platform.h"

uint64_t
bus_clock_now(const bus_clock *c)
{
    if (c == NULL || c->now_ns == NULL)
        return bus__clock_mono_ns();
    return c->now_ns(c->opaque);
}

void
bus_clock_sleep(const bus_clock *c, uint64_t ns)
{
    if (ns == 0)
        return;
    if (c == NULL || (c->now_ns == NULL && c->sleep_ns == NULL)) {
        bus__sleep_ns(ns);
        return;
    }
    if (c->sleep_ns != NULL)
        c->sleep_ns(c->opaque, ns);
}

static uint64_t
manual_now(void *opaque)
{
    bus_manual_clock *mc = opaque;

    return __atomic_load_n(&mc->now, __ATOMIC_RELAXED);
}

static void
manual_sleep(void *opaque, uint64_t ns)
{
    bus_manual_clock_advance(opaque, ns);
}

void
bus_manual_clock_init(bus_manual_clock *mc, uint64_t start_ns)
{
    mc->clock.now_ns = manual_now;
    mc->clock.sleep_ns = manual_sleep;
    mc->clock.opaque = mc;
    __atomic_store_n(&mc->now, start_ns, __ATOMIC_RELAXED);
}

void
bus_manual_clock_advance(bus_manual_clock *mc, uint64_t ns)
{
    __atomic_fetch_add(&mc->now, ns, __ATOMIC_RELAXED);
}

uint64_t
bus_manual_clock_get(const bus_manual_clock *mc)
{
    return __atomic_load_n(&mc->now, __ATOMIC_RELAXED);
}
