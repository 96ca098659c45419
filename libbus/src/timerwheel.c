/*
 * Hashed timer wheel (timerwheel.h). A timer due at tick T lives in slot
 * T & mask; a slot holds timers of every "round", and advance fires only
 * those whose due time has passed, so a delay longer than the wheel's span
 * just waits for more turns. advance processes at most one full turn of
 * slots per call (a long pause scans each slot once). Expired timers are
 * collected under the mutex, sorted by due time and fired after unlock,
 * so a callback may add timers.
 */
#include <string.h>

#include <bus/err.h>

#include "alloc.h"
#include "timerwheel.h"

int
bus__twheel_init(bus__twheel *w, uint64_t tick_ns, uint32_t nslots,
                 uint64_t now_ns)
{
    uint32_t n = 1;

    memset(w, 0, sizeof(*w));
    while (n < nslots)
        n <<= 1;
    if ((w->slots = bus__zalloc(n * sizeof(*w->slots))) == NULL)
        return BUS_ENOMEM;
    w->mask = n - 1;
    w->tick_ns = tick_ns ? tick_ns : 1000000u;
    w->cur_tick = now_ns / w->tick_ns;
    bus__mutex_init(&w->mtx);
    return BUS_OK;
}

bus__timer *
bus__twheel_fini(bus__twheel *w)
{
    bus__timer *all = NULL, *t, *n;

    if (w->slots == NULL)
        return NULL;
    for (uint32_t i = 0; i <= w->mask; i++)
        for (t = w->slots[i]; t != NULL; t = n) {
            n = t->next;
            t->next = all;
            all = t;
        }
    bus__free(w->slots, ((size_t)w->mask + 1) * sizeof(*w->slots));
    w->slots = NULL;
    bus__mutex_fini(&w->mtx);
    return all;
}

void
bus__twheel_add(bus__twheel *w, bus__timer *t)
{
    uint64_t tick = t->due_ns / w->tick_ns;

    bus__mutex_lock(&w->mtx);
    if (tick < w->cur_tick)
        tick = w->cur_tick; /* already due: the next advance fires it */
    t->next = w->slots[tick & w->mask];
    w->slots[tick & w->mask] = t;
    w->count++;
    bus__mutex_unlock(&w->mtx);
}

static bus__timer *
twheel_sorted_insert(bus__timer *list, bus__timer *t)
{
    bus__timer **pp = &list;

    while (*pp != NULL && (*pp)->due_ns <= t->due_ns)
        pp = &(*pp)->next;
    t->next = *pp;
    *pp = t;
    return list;
}

size_t
bus__twheel_advance(bus__twheel *w, uint64_t now_ns)
{
    uint64_t now_tick = now_ns / w->tick_ns;
    bus__timer *fired = NULL, *t, *n;
    size_t cnt = 0;

    bus__mutex_lock(&w->mtx);
    if (w->count > 0) {
        uint64_t steps = now_tick + 1 - w->cur_tick;
        if (now_tick + 1 < w->cur_tick)
            steps = 0;
        if (steps > (uint64_t)w->mask + 1)
            steps = (uint64_t)w->mask + 1;
        for (uint64_t s = 0; s < steps; s++) {
            bus__timer **pp = &w->slots[(w->cur_tick + s) & w->mask];
            while ((t = *pp) != NULL) {
                if (t->due_ns <= now_ns) {
                    *pp = t->next;
                    w->count--;
                    fired = twheel_sorted_insert(fired, t);
                    cnt++;
                } else {
                    pp = &t->next;
                }
            }
        }
    }
    /* The current tick may still get timers due later in it: reprocess it
     * next time (cur_tick = now_tick, not now_tick + 1). */
    if (now_tick > w->cur_tick)
        w->cur_tick = now_tick;
    bus__mutex_unlock(&w->mtx);
    for (t = fired; t != NULL; t = n) {
        n = t->next;
        t->next = NULL;
        t->fn(t, t->arg);
    }
    return cnt;
}

size_t
bus__twheel_count(bus__twheel *w)
{
    size_t n;

    bus__mutex_lock(&w->mtx);
    n = w->count;
    bus__mutex_unlock(&w->mtx);
    return n;
}

bus__timer *
bus__twheel_remove_if(bus__twheel *w, bool (*pred)(bus__timer *t, void *arg),
                      void *arg)
{
    bus__timer *out = NULL, *t;

    bus__mutex_lock(&w->mtx);
    for (uint32_t i = 0; w->count > 0 && i <= w->mask; i++) {
        bus__timer **pp = &w->slots[i];
        while ((t = *pp) != NULL) {
            if (pred(t, arg)) {
                *pp = t->next;
                w->count--;
                t->next = out;
                out = t;
            } else {
                pp = &t->next;
            }
        }
    }
    bus__mutex_unlock(&w->mtx);
    return out;
}
