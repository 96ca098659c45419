/*
 * The in-flight offset tracker (contract and design: kafka_track.h).
 */
#include <string.h>

#include "alloc.h"
#include "kafka_track.h"

#define KT_INITIAL_CAP 64u

void
kt_init(kt *t, uint32_t max)
{
    memset(t, 0, sizeof(*t));
    t->max = max ? max : 1;
    t->next = -1;
}

void
kt_clear(kt *t)
{
    uint32_t i, max = t->max;

    for (i = 0; i < t->n; i++)
        bus_event_unref(kt_at(t, i)->ev);
    if (t->ring != NULL)
        bus__free(t->ring, (size_t)t->cap * sizeof(kt_entry));
    kt_init(t, max);
}

/* Doubles the ring, keeping the entries in order from index 0. */
static int
kt_grow(kt *t)
{
    uint32_t ncap = t->cap ? t->cap * 2 : KT_INITIAL_CAP, i;
    kt_entry *nr;

    if ((nr = bus__alloc((size_t)ncap * sizeof(kt_entry))) == NULL)
        return BUS_ENOMEM;
    for (i = 0; i < t->n; i++)
        nr[i] = *kt_at(t, i);
    if (t->ring != NULL)
        bus__free(t->ring, (size_t)t->cap * sizeof(kt_entry));
    t->ring = nr;
    t->cap = ncap;
    t->head = 0;
    return BUS_OK;
}

int
kt_push(kt *t, int64_t off, bus_event *ev)
{
    kt_entry *e;
    int rv;

    if (off < 0 || (t->next >= 0 && off < t->next))
        return BUS_EINVAL;
    if (t->n >= t->max)
        return BUS_EAGAIN;
    if (t->n == t->cap && (rv = kt_grow(t)) != BUS_OK)
        return rv;
    e = &t->ring[(t->head + t->n) & (t->cap - 1)];
    e->off = off;
    e->ev = ev;
    e->due_ns = 0;
    e->attempts = 1;
    e->state = KT_INFLIGHT;
    t->n++;
    t->inflight++;
    t->next = off + 1;
    return BUS_OK;
}

static void
kt_forget_state(kt *t, const kt_entry *e)
{
    if (e->state == KT_INFLIGHT)
        t->inflight--;
    else if (e->state == KT_RETRY)
        t->retry--;
}

bool
kt_cancel_last(kt *t, bus_event **ev)
{
    kt_entry *e;

    if (t->n == 0)
        return false;
    e = kt_at(t, t->n - 1);
    kt_forget_state(t, e);
    t->next = e->off;
    if (ev != NULL)
        *ev = e->ev;
    else
        bus_event_unref(e->ev);
    t->n--;
    return true;
}

kt_entry *
kt_find(kt *t, int64_t off)
{
    uint32_t lo = 0, hi = t->n;

    /* The ring is sorted by offset from head: binary search. */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        kt_entry *e = kt_at(t, mid);
        if (e->off == off)
            return e;
        if (e->off < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

bool
kt_done(kt *t, int64_t off, bool *found)
{
    kt_entry *e = kt_find(t, off);
    bool advanced = false;

    if (found != NULL)
        *found = e != NULL && e->state != KT_DONE;
    if (e == NULL || e->state == KT_DONE)
        return false;
    kt_forget_state(t, e);
    e->state = KT_DONE;
    /* Pop the finished prefix: the position is the first unfinished. */
    while (t->n > 0 && kt_at(t, 0)->state == KT_DONE) {
        kt_entry *h = kt_at(t, 0);
        bus_event_unref(h->ev);
        h->ev = NULL;
        t->head = (t->head + 1) & (t->cap - 1);
        t->n--;
        advanced = true;
    }
    return advanced;
}

bool
kt_retry(kt *t, int64_t off, uint64_t due_ns)
{
    kt_entry *e = kt_find(t, off);

    if (e == NULL || e->state != KT_INFLIGHT)
        return false;
    t->inflight--;
    t->retry++;
    e->state = KT_RETRY;
    e->due_ns = due_ns;
    return true;
}

void
kt_redelivered(kt *t, kt_entry *e)
{
    if (e->state != KT_RETRY)
        return;
    t->retry--;
    t->inflight++;
    e->state = KT_INFLIGHT;
    e->attempts++;
}

int64_t
kt_position(const kt *t)
{
    if (t->n > 0)
        return t->ring[t->head].off;
    return t->next;
}
