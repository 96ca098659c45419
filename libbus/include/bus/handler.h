/*
 * Handler conventions shared by bus subscriptions, store subscriptions and
 * projectors: a handler gets a delivery (the event plus its context) and
 * returns what happened. The pipeline (retry, circuit breaker,
 * dead-letter) and the brokers (ack/nack) act on the result.
 */
#ifndef BUS_HANDLER_H
#define BUS_HANDLER_H

#include <bus/event.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum bus_result {
    BUS_ACK = 0,    /* handled: ack towards the broker, commit the offset */
    BUS_RETRY = 1,  /* transient failure: retry as the failure policy says */
    BUS_REJECT = 2  /* permanent failure: do not retry; dead-letter */
} bus_result;

/* One delivery of an event to one handler. Valid only during the handler
 * call (copy what you keep; bus_event_ref the event to keep it). */
typedef struct bus_delivery bus_delivery;

/* The handler. Runs on the thread its subscription says (inline: the
 * publisher's; queued: a worker; store: the subscription's thread). It may
 * publish, subscribe and unsubscribe; it must not close the object that
 * calls it except with its _close_async. */
typedef bus_result (*bus_handler_fn)(bus_delivery *d, void *opaque);

/* The event; borrowed for the call. */
BUS_API bus_event *bus_delivery_event(const bus_delivery *d);
/* The topic it was published on ("" for store subscriptions). */
BUS_API const char *bus_delivery_topic(const bus_delivery *d);
/* 1 for the first attempt, 2 for the first retry, ... */
BUS_API uint32_t bus_delivery_attempt(const bus_delivery *d);
/* Monotonic deadline in ns (bus__clock_mono_ns scale, CLOCK_MONOTONIC),
 * 0 when the handler has none. C cannot pre-empt a handler: overruns are
 * counted and logged, the handler should check this itself. */
BUS_API uint64_t bus_delivery_deadline(const bus_delivery *d);
/* Name of the subscription or projector ("" when unnamed). */
BUS_API const char *bus_delivery_name(const bus_delivery *d);

/* Attaches an error to a RETRY or REJECT result: a BUS_E* or user code
 * (> 0) and a message (truncated to 255 bytes), which retries log and
 * dead-letter headers record. Thread: the handler's. */
BUS_API void bus_delivery_set_error(bus_delivery *d, int code,
                                    const char *fmt, ...) BUS_PRINTF(3, 4);
BUS_API int bus_delivery_error_code(const bus_delivery *d);
BUS_API const char *bus_delivery_error_msg(const bus_delivery *d);

#ifdef __cplusplus
}
#endif
#endif /* BUS_HANDLER_H */
