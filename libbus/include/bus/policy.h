/*
 * The failure policy: one declaration of what happens when a handler
 * fails, instead of a pile of middlewares whose order users must guess.
 * It combines
 *   - classification: the handler's BUS_RETRY / BUS_REJECT, optionally
 *     re-classified by error code (classify);
 *   - retry: backoff (fixed, linear, exponential), jitter (none, full,
 *     equal), initial delay, multiplier, cap, max attempts, max total time,
 *     a callback on each retry; in place (the worker waits: keeps the key's
 *     order) or deferred (parked on a timer wheel, redelivered later: the
 *     worker moves on);
 *   - a circuit breaker (breaker.h): while open, deliveries are not passed
 *     to the handler but deferred (queued) or nacked (inline / broker);
 *   - dead-lettering: after the last attempt, or at once for a permanent
 *     error, the event is published to the dead-letter topic with headers
 *     that record the failure. With no dead-letter sink the failure is
 *     logged and counted: nothing is dropped silently.
 *
 * docs/failure-policy.md has the state diagrams. bus_mw_policy
 * (middleware.h) is the middleware that applies a policy.
 */
#ifndef BUS_POLICY_H
#define BUS_POLICY_H

#include <bus/common.h>
#include <bus/breaker.h>
#include <bus/clock.h>
#include <bus/event.h>
#include <bus/handler.h>
#include <bus/log.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum bus_backoff {
    BUS_BACKOFF_DEFAULT = 0, /* EXPONENTIAL */
    BUS_BACKOFF_FIXED,       /* initial */
    BUS_BACKOFF_LINEAR,      /* initial * n */
    BUS_BACKOFF_EXPONENTIAL  /* initial * multiplier^(n-1) */
} bus_backoff;

typedef enum bus_jitter {
    BUS_JITTER_DEFAULT = 0, /* FULL */
    BUS_JITTER_NONE,
    BUS_JITTER_FULL,        /* uniform in [0, d] */
    BUS_JITTER_EQUAL        /* d/2 + uniform in [0, d/2] */
} bus_jitter;

typedef enum bus_retry_mode {
    BUS_RETRY_MODE_DEFAULT = 0, /* DEFERRED when the dispatcher can defer
                                 * (queued subscriptions), else IN_PLACE */
    BUS_RETRY_IN_PLACE,         /* wait in the handler's thread: keeps the
                                 * key's order, holds the key */
    BUS_RETRY_DEFERRED          /* park on the timer wheel; the worker
                                 * moves on */
} bus_retry_mode;

/* Zero means default. */
typedef struct bus_retry_config {
    bus_backoff backoff;     /* EXPONENTIAL */
    bus_jitter jitter;       /* FULL */
    uint32_t initial_ms;     /* first delay; 100 */
    double multiplier;       /* EXPONENTIAL growth; 2.0 (>= 1) */
    uint32_t max_delay_ms;   /* cap on one delay (before jitter); 30000 */
    uint32_t max_attempts;   /* calls in all, the first included; 5;
                              * 1 means never retry */
    uint32_t max_elapsed_ms; /* no retry starts later than this after the
                              * first failure: a failure whose retry would
                              * start later is final (dead-lettered at
                              * once); 0: no limit */
} bus_retry_config;

/* The delay before the retry that follows failed attempt `attempt`
 * (1 = the first call), in ns, jitter drawn from rnd (a uniform 64-bit
 * random number): deterministic, for tests and custom schedulers. */
BUS_API uint64_t bus_retry_delay_ns(const bus_retry_config *rc,
                                    uint32_t attempt, uint64_t rnd);

/* Re-classifies a failure: gets the handler's result (RETRY or REJECT)
 * and its error code; returns the result to act on (BUS_ACK: treat as
 * handled). Runs on the handler's thread; must be pure and fast. */
typedef bus_result (*bus_classify_fn)(void *opaque, bus_result r, int code);

/* Called before each retry is scheduled: attempt = the attempt that just
 * failed, delay_ns before the next. Handler's thread; must not block. */
typedef void (*bus_on_retry_fn)(void *opaque, const bus_delivery *d,
                                uint32_t attempt, uint64_t delay_ns,
                                int code, const char *msg);

/* Publishes a dead-letter event on topic; takes ev on BUS_OK (else the
 * caller releases it). The bus wires bus_publish on the same context. */
typedef int (*bus_dlq_publish_fn)(void *opaque, const char *topic,
                                  bus_event *ev);

/* Parks a delivery for redelivery at due_ns (the policy's clock): the
 * dispatcher takes a reference on the event and calls the subscription
 * again with attempt + 1 (bus_delivery_attempt), without blocking other
 * keys. BUS_OK or an error (the policy then retries in place). */
typedef int (*bus_defer_fn)(void *opaque, bus_delivery *d, uint64_t due_ns);

typedef struct bus_failure_policy {
    size_t size;                /* set by _init */
    bus_retry_config retry;
    bus_retry_mode mode;
    bus_classify_fn classify;   /* NULL: keep the handler's result */
    void *classify_opaque;
    bus_on_retry_fn on_retry;   /* NULL: none */
    void *on_retry_opaque;
    bus_breaker *breaker;       /* borrowed; NULL: no breaker */
    /* Dead-letter topic; NULL: "<topic>.dlq"; "%s" in it is replaced by
     * the original topic ("dlq.%s"). */
    const char *dlq_topic;
    bus_dlq_publish_fn dlq_publish; /* NULL: log and count only */
    void *dlq_opaque;
    bus_defer_fn defer;         /* set by the dispatcher; NULL: in place */
    void *defer_opaque;
    bus_logger log;
    bus_clock clock;            /* zero: monotonic */
} bus_failure_policy;

BUS_API void bus_failure_policy_init(bus_failure_policy *p);

/* Dead-letter headers (values are decimal or text). */
#define BUS_H_DLQ_TOPIC "dlq-original-topic"
#define BUS_H_DLQ_SUBSCRIPTION "dlq-subscription"
#define BUS_H_DLQ_ERROR_CODE "dlq-error-code"
#define BUS_H_DLQ_ERROR "dlq-error-message"
#define BUS_H_DLQ_ATTEMPTS "dlq-attempts"
#define BUS_H_DLQ_FIRST_FAILURE "dlq-first-failure-ns" /* wall clock */
#define BUS_H_DLQ_LAST_FAILURE "dlq-last-failure-ns"

/* Builds the dead-letter copy of ev (same id, payload and headers, plus the
 * BUS_H_DLQ_* ones). Borrows ev. Returns BUS_OK, BUS_ENOMEM, BUS_EINVAL. */
BUS_API int bus_dlq_event(bus_event **out, const bus_event *ev,
                          const char *topic, const char *subscription,
                          int code, const char *msg, uint32_t attempts,
                          int64_t first_failure_ns, int64_t last_failure_ns);

/* The dead-letter topic for topic under p (NULL p: "<topic>.dlq") into
 * buf. Returns BUS_OK or BUS_ENOBUFS. */
BUS_API int bus_dlq_topic(const bus_failure_policy *p, const char *topic,
                          char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif /* BUS_POLICY_H */
