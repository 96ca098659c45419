/*
 * A hashed timer wheel (internal) for deferred retries: O(1) add, O(expired
 * + slots passed) advance. Timers are intrusive; the owner of the wheel
 * (a ctx thread or the workers, whoever calls advance) fires them. Time
 * is in ns on the caller's clock.
 */
#ifndef BUS_TIMERWHEEL_H
#define BUS_TIMERWHEEL_H

#include <bus/common.h>

#include "platform.h"

typedef struct bus__timer bus__timer;
typedef void (*bus__timer_fn)(bus__timer *t, void *arg);

struct bus__timer {
    uint64_t due_ns;
    bus__timer *next;
    bus__timer_fn fn;
    void *arg;
};

typedef struct bus__twheel {
    bus__mutex mtx;
    bus__timer **slots;
    uint32_t mask;
    uint64_t tick_ns;
    uint64_t cur_tick; /* every tick < cur_tick has been processed */
    size_t count;
} bus__twheel;

/* nslots rounded up to a power of two. BUS_OK or BUS_ENOMEM. */
int bus__twheel_init(bus__twheel *w, uint64_t tick_ns, uint32_t nslots,
                     uint64_t now_ns);
/* Frees the wheel; timers still in it are returned as a list (not fired). */
bus__timer *bus__twheel_fini(bus__twheel *w);
/* Schedules t (due_ns, fn, arg set by the caller). Thread: any. */
void bus__twheel_add(bus__twheel *w, bus__timer *t);
/* Fires, with no lock held, every timer due at or before now_ns, in due
 * order. Returns how many fired. Thread: any (one advancer at a time is
 * typical; concurrent ones are safe). */
size_t bus__twheel_advance(bus__twheel *w, uint64_t now_ns);
size_t bus__twheel_count(bus__twheel *w);
/* Removes, without firing, every timer t for which pred(t, arg) is true
 * and returns them as a list (linked by next). Timers an advance has
 * already taken out (firing now) are not seen. Thread: any. */
bus__timer *bus__twheel_remove_if(bus__twheel *w,
                                  bool (*pred)(bus__timer *t, void *arg),
                                  void *arg);

#endif
