/*
 * The broker object and the SPI calls the bus context makes (internal).
 *
 * The user API (open, publish, flush, close) lives in broker.c; the context
 * (ctx.c) also subscribes brokers on behalf of its subscriptions and
 * forwards handler outcomes, which the public API does not expose. These
 * helpers are the only way the core reaches a backend's subscribe,
 * unsubscribe and ack, so the checks live in one place.
 *
 * Threads: as the ops they call (broker.h). None takes a libbus lock, so
 * the backend may call fn (the deliver callback) from inside them.
 *
 * Blocking: subscribe and unsubscribe may wait until deliveries already
 * running have returned (the memory backend waits for a grace period of
 * its bus so that it can free the old subscription table). So never call
 * them holding a lock that a deliver function, or a handler it runs
 * inline, may take: that handler would wait for the lock, the caller for
 * the handler. (From inside a delivery they do not wait.)
 */
#ifndef BUS_BROKER_IMPL_H
#define BUS_BROKER_IMPL_H

#include <stdatomic.h>
#include <stddef.h>

#include <bus/broker.h>

struct bus_broker {
    const bus_broker_ops *ops;
    void *priv;         /* points into data[]: ops->priv_size bytes */
    bus_logger log;     /* copy of cfg->log */
    atomic_bool closed; /* set once by close_async (it guards ops->close) */
    const char *scheme; /* ops->scheme: static storage */
    size_t alloc_size;  /* of this block, for the sized free */
    _Alignas(max_align_t) unsigned char data[];
};

/* Starts delivering events matching pattern to fn(opaque, ...) through
 * ops->subscribe. group: consumer group or NULL. On success *handle gets
 * the backend's handle, which unsubscribe and ack take; on failure it is
 * NULL and fn is never called. Returns BUS_OK, BUS_EINVAL (NULL argument,
 * invalid pattern), BUS_ECLOSED (close_async was called), or the
 * backend's error (BUS_ENOMEM, ...). Thread: any. */
int bus__broker_subscribe(bus_broker *b, const char *pattern, const char *group,
                          bus_deliver_fn fn, void *opaque, void **handle);

/* Ends a subscription (ops->unsubscribe): after it returns fn is never
 * called again for handle, which is freed; it blocks until a running fn
 * has returned unless called from a delivery (see the backend's header
 * for what it can promise then). NULL handle is a no-op. Thread: any. */
void bus__broker_unsubscribe(bus_broker *b, void *handle);

/* Whether an option named s[0..len) (percent-escapes allowed; judged
 * decoded and in any case) holds a secret, whose value must never reach
 * a log line or an error message: names with secret, pass, key, token,
 * private, credential, jaas or pem. Backends use it for their own
 * properties; the core for the URIs it logs. */
bool bus__option_is_secret(const char *s, size_t len);

/* Passes a handler outcome for a delivery with a non-zero token to the
 * backend (ops->ack); a no-op when the backend has no ack or token is 0.
 * Thread: any. */
void bus__broker_ack(bus_broker *b, void *handle, uint64_t token,
                     bus_result res);

/* The logger the broker was opened with (never NULL for a valid b). */
static inline const bus_logger *
bus__broker_logger(const bus_broker *b)
{
    return &b->log;
}

#endif
