/*
 * struct bus_delivery (internal): whoever calls a handler (the bus
 * dispatcher, a store subscription, a projector) fills one on its stack.
 */
#ifndef BUS_DELIVERY_H
#define BUS_DELIVERY_H

#include <bus/handler.h>

#define BUS_DELIVERY_MSG_MAX 256

/* A latency sample whose end the dispatcher will give (pipeline.h). */
typedef struct bus__lat_pend bus__lat_pend;

struct bus_delivery {
    bus_event *event;
    const char *topic;
    const char *name;
    uint64_t deadline_ns;
    uint32_t attempt;
    int err_code;
    char err_msg[BUS_DELIVERY_MSG_MAX];
    void *owner; /* the caller's own context (subscription, projector) */
    /* Pipeline state (middleware.h flags; policy.c). */
    uint32_t flags;
    uint32_t retries;        /* in-place retries during this delivery */
    uint64_t first_fail_ns;  /* policy clock; 0: no failure yet */
    int64_t first_fail_wall; /* ns since the epoch, for DLQ headers */
    /* One clock read per delivery (pipeline.h): CLOCK_MONOTONIC when the
     * attempt started (stamped by the dispatcher; 0: not stamped) and
     * after the handler (left by the first middleware that read it). */
    uint64_t now_ns;
    uint64_t end_ns;
    /* Offered by a worker that goes straight on to its next delivery:
     * the metrics middleware may leave its latency sample here, to be
     * closed by the worker's next stamp (pipeline.h); NULL: not offered. */
    bus__lat_pend *pend;
};

/* Prepares d for one call: clears the error. */
static inline void
bus__delivery_init(bus_delivery *d, bus_event *ev, const char *topic,
                   const char *name, uint32_t attempt, uint64_t deadline_ns,
                   void *owner)
{
    d->event = ev;
    d->topic = topic ? topic : "";
    d->name = name ? name : "";
    d->attempt = attempt;
    d->deadline_ns = deadline_ns;
    d->err_code = 0;
    d->err_msg[0] = '\0';
    d->owner = owner;
    d->flags = 0;
    d->retries = 0;
    d->first_fail_ns = 0;
    d->first_fail_wall = 0;
    d->now_ns = 0;
    d->end_ns = 0;
    d->pend = NULL;
}

#endif
