/*
 * The in-memory broker: mem://name (brokers/memory, always built).
 *
 * URI:
 *   mem://name   a named bus, process-wide: every broker opened on the
 *                same name shares one subscription table, so two bus
 *                contexts in one process talk through it. The bus lives
 *                while a broker is open on it; the last close frees it.
 *   mem://       (empty name) a private bus: only this broker's own
 *                subscriptions see its publishes.
 *   A path ("mem://a/b") is refused. Names are compared byte for byte.
 *
 * Options: none. Any query key or props entry fails the open with
 * BUS_EINVAL naming the key.
 *
 * Guarantee: delivers exactly what the process keeps while it runs. A
 * publish calls every matching subscription's deliver function in the
 * publishing thread before it returns; nothing is stored, so nothing
 * survives the process, and an event that a subscription refuses (its
 * deliver function returns an error: a full queue, a closing context) is
 * dropped for that subscription, counted and logged (WARN, the first
 * drop and every 1000th), never retried.
 *
 * Ordering: deliveries to one subscription from one publishing thread
 * happen in publish order (they are synchronous). Publishes from several
 * threads interleave in no defined order.
 *
 * Publish result: BUS_OK when at least one subscription (or group) took
 * the event, or when nothing matched (the event is released: nobody
 * listens); the broker then owns the caller's reference and the ack runs
 * once with BUS_OK before publish returns. When every matching delivery
 * failed, publish returns the first delivery's error, the event stays
 * with the caller and the ack never runs. BUS_ECLOSED after close.
 * flush returns BUS_OK at once (nothing is ever outstanding).
 *
 * Consumer groups: subscriptions made with the same non-NULL group on one
 * named bus share the events they match: each event goes to one member,
 * chosen round-robin (one atomic counter per group) among the members
 * whose pattern matches the topic. If the chosen member refuses it, the
 * next matching member is tried, so the group drops an event only when
 * every matching member refused it. Subscriptions without a group each
 * get every matching event.
 *
 * Unsubscribe: from outside any delivery of this bus, returns once no
 * call of that subscription's deliver function is running and none will
 * start. From inside a delivery of this bus (a deliver function calling
 * unsubscribe, e.g. its own), it cannot wait (the running calls may be
 * waiting on the caller): no new call starts after it returns, but a call
 * already running on another thread may still be finishing; the handle is
 * freed after a later grace period.
 *
 * Threads: publish, subscribe and unsubscribe from any thread, including
 * from inside a deliver function (a handler may publish). Deliver
 * functions run in the publishing thread, never under a libbus lock.
 */
#ifndef BUS_BROKER_MEMORY_H
#define BUS_BROKER_MEMORY_H

#include <bus/broker.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_broker_memory_stats {
    uint64_t published;     /* publishes through this broker accepted */
    uint64_t delivered;     /* deliver calls that took the event */
    uint64_t dropped;       /* subscriptions or groups that refused one */
    uint64_t subscriptions; /* live subscriptions made through this broker */
} bus_broker_memory_stats;

/* Counters of b, which must be a mem:// broker. Returns BUS_OK, or
 * BUS_EINVAL (b NULL or not a memory broker). Thread: any. */
BUS_API int bus_broker_memory_stats_get(const bus_broker *b,
                                        bus_broker_memory_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* BUS_BROKER_MEMORY_H */
