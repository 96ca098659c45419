/*
 * libbus: the bus context, subscriptions and publishing; also the umbrella
 * header (including <bus/bus.h> gives the whole core API).
 *
 * A bus_ctx owns a subscription table and worker threads. Publishing a
 * topic goes to the brokers attached with a route matching it; with no such
 * broker it is dispatched locally. Either way, deliveries run through the
 * same subscription table: each subscription runs its handler inline (in
 * the publisher's thread, or the broker's delivery thread) or queued (on
 * worker threads through bounded queues, sharded by an ordering key so
 * that the events of one key are handled in publish order).
 *
 * Every delivery runs the handler pipeline (docs/pipeline.md): the
 * context's middleware chain, the subscription's failure policy and chain,
 * then the handler. An event published from inside a handler inherits
 * the handled event's correlation id, gets its id as causation id and a
 * child traceparent (trace.h), with no middleware needed.
 *
 * Topics are dot-separated ASCII segments ("orders.placed"): each segment
 * non-empty, at most 255 bytes, no spaces or control characters, no '*' or
 * '>'. Patterns may use '*' for exactly one segment and '>' as the last
 * segment for one or more trailing segments ("orders.*", "orders.>").
 */
#ifndef BUS_BUS_H
#define BUS_BUS_H

#include <bus/common.h>
#include <bus/err.h>
#include <bus/log.h>
#include <bus/event.h>
#include <bus/codec.h>
#include <bus/type.h>
#include <bus/handler.h>
#include <bus/metrics.h>
#include <bus/health.h>
/* The handler pipeline (docs/pipeline.md): middleware chains and the
 * built-ins, the failure policy, breakers, rate limits, dedup, clocks and
 * tracing. */
#include <bus/clock.h>
#include <bus/breaker.h>
#include <bus/dedup.h>
#include <bus/ratelimit.h>
#include <bus/policy.h>
#include <bus/middleware.h>
#include <bus/trace.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_ctx bus_ctx;
typedef struct bus_sub bus_sub;
typedef struct bus_broker bus_broker; /* broker.h */

/* How idle workers wait for work. The trade-off on a VM, where waking a
 * thread sleeping on another core costs ~40 us: BLOCK sleeps at once
 * (no CPU burnt, worst latency); SPIN_BLOCK spins spin_ns first, then
 * sleeps (low latency under steady load, idle CPU after a pause); SPIN
 * never sleeps (lowest latency, one core per worker at 100%). */
typedef enum bus_wait {
    BUS_WAIT_DEFAULT = 0, /* SPIN_BLOCK */
    BUS_WAIT_BLOCK,
    BUS_WAIT_SPIN_BLOCK,
    BUS_WAIT_SPIN
} bus_wait;

/* What publish does when a subscription's queue is full. */
typedef enum bus_backpressure {
    BUS_BP_DEFAULT = 0, /* the context's policy (itself BLOCK by default) */
    BUS_BP_BLOCK,       /* wait for room up to block_timeout_ms, then EAGAIN */
    BUS_BP_FAIL         /* fail at once with BUS_EAGAIN */
} bus_backpressure;

typedef enum bus_dispatch {
    BUS_DISPATCH_DEFAULT = 0, /* QUEUED */
    BUS_DISPATCH_INLINE,      /* handler runs in the publishing thread */
    BUS_DISPATCH_QUEUED       /* handler runs on a worker thread */
} bus_dispatch;

/* Context configuration: zero means default (bus_ctx_config_init fills
 * the defaults and size). Copied by bus_ctx_open, never retained. */
typedef struct bus_ctx_config {
    size_t size;               /* sizeof(bus_ctx_config), set by _init */
    const char *name;          /* for logs and metrics; default "bus" */
    uint32_t workers;          /* worker threads (= queue shards); 2; 1..256 */
    uint32_t queue_capacity;   /* events per shard queue, rounded up to a
                                * power of two; 4096; 2..2^24 */
    bus_backpressure backpressure; /* default for subscriptions; BLOCK */
    int32_t block_timeout_ms;  /* BLOCK policy deadline; 1000; -1 forever */
    bus_wait wait;             /* idle workers; SPIN_BLOCK */
    uint32_t spin_ns;          /* SPIN_BLOCK spin time; 20000 (20 us) */
    int32_t close_timeout_ms;  /* drain deadline at close; 5000; -1 none */
    uint32_t topic_cache;      /* topics whose matches are cached; 4096 */
    bus_logger log;            /* default: none */
    /* ---- The handler pipeline (appended; docs/pipeline.md) ---- */
    /* Bus-level middlewares, run first for every delivery of every
     * (non-batch) subscription. Borrowed: must outlive the context and
     * not change meanwhile. NULL: none. */
    const bus_chain *chain;
    /* Registry for the series of docs/metrics.md ("Names the bus uses"):
     * per topic and subscription, per broker, queue depths. Borrowed:
     * must outlive the context. NULL: no metrics (and no cost). */
    bus_metrics *metrics;
    /* Registry the context registers its checks in ("<name>.workers",
     * "<name>.queues", "<name>.breakers"; docs/bus.md), deregistered by
     * bus_ctx_close. Borrowed: must outlive the context. NULL: none. */
    bus_health *health;
    /* A queue is saturated when it holds at least saturation_pct percent
     * of its capacity; "<name>.queues" is unhealthy (readiness) once one
     * stayed saturated saturated_ms, and "<name>.workers" (liveness) once
     * a worker with work queued made no progress for saturated_ms.
     * 90 (1..100) and 5000 (>= 1). */
    uint32_t saturation_pct;
    int32_t saturated_ms;
    /* Clock of the timer wheel that parks deferred retries (policy.h):
     * give it the same clock as the policies'. Zero: monotonic. */
    bus_clock clock;
    /* More breakers for "<name>.breakers" (any not CLOSED: degraded),
     * besides those of the subscriptions' policies. Borrowed; NULL. */
    bus_breaker_registry *breakers;
} bus_ctx_config;

BUS_API void bus_ctx_config_init(bus_ctx_config *cfg);

/* Opens a context and starts its workers. cfg may be NULL (defaults).
 * Returns BUS_OK, BUS_EINVAL (a field out of range; logged), BUS_ENOMEM,
 * BUS_EAGAIN (threads). Thread: any. */
BUS_API int bus_ctx_open(bus_ctx **out, const bus_ctx_config *cfg);

/* Stops intake: later publishes return BUS_ECLOSED; wakes workers so they
 * drain. Does not block, so it may be called from a handler. Idempotent.
 * Thread: any. */
BUS_API void bus_ctx_close_async(bus_ctx *ctx);

/* Graceful close: stops intake, lets workers handle every event already
 * accepted, up to close_timeout_ms; events still queued at the deadline
 * are dropped, counted and logged. Detaches brokers (it does not close
 * them), unsubscribes everything, joins the workers and frees ctx. After
 * it returns no handler of this context runs. Returns the number of
 * events dropped (0 normally). NULL is a no-op. Thread: any but a handler
 * of this context (use close_async there). Blocks. */
BUS_API uint64_t bus_ctx_close(bus_ctx *ctx);

/* ---- Subscriptions ---------------------------------------------------- */

/* Maps an event to its ordering key for sharding; equal keys keep order.
 * Default: a hash of the stream id, or of the event id when it has no
 * stream. Called in the publishing thread; must be fast and pure. */
typedef uint64_t (*bus_key_fn)(const bus_event *ev, void *opaque);

/* Batch handler: n deliveries (n >= 1) in order for one shard; it fills
 * results[i] for each. Runs on a worker thread. */
typedef void (*bus_batch_fn)(bus_delivery *const *batch, size_t n,
                             bus_result *results, void *opaque);

typedef struct bus_sub_config {
    size_t size;                   /* set by bus_sub_config_init */
    const char *name;              /* logs and metrics; default: pattern */
    bus_dispatch dispatch;         /* QUEUED */
    bus_backpressure backpressure; /* the context's */
    int32_t block_timeout_ms;      /* 0: the context's */
    bus_key_fn key_fn;             /* NULL: stream id hash */
    void *key_opaque;
    bus_batch_fn batch_fn;         /* set: batch delivery (queued only);
                                    * the handler fn argument may be NULL */
    uint32_t batch_max;            /* events per batch; 64; 1..4096 */
    uint32_t batch_linger_us;      /* wait this long to fill a batch; 0 */
    const char *group;             /* consumer group given to brokers;
                                    * NULL: each subscription gets all */
    /* ---- The handler pipeline (appended; docs/pipeline.md) ----
     * A delivery runs: [metrics] -> the context's chain -> [policy] ->
     * this chain -> [deadline] -> the handler. Batch subscriptions take
     * none of these (EINVAL) and skip the context's chain and metrics:
     * their handler sees many deliveries at once (docs/bus.md). */
    const bus_chain *chain;        /* borrowed, must outlive the
                                    * subscription; NULL: none */
    /* Failure policy (policy.h), copied; NULL: none (a RETRY result is
     * passed to the broker as a nack, as without a pipeline). The bus
     * sets its hooks: queued subscriptions defer retries on the
     * context's timer wheel (mode DEFAULT or DEFERRED), inline ones
     * retry in place; dead letters are published on this context with
     * BUS_PUB_NONBLOCK (so through an attached broker whose route
     * matches); policy->log defaults to the context's logger. */
    const bus_failure_policy *policy;
    int32_t deadline_ms;           /* per-attempt handler deadline
                                    * (bus_delivery_deadline); overruns
                                    * are counted and logged; 0: none */
    const char *dlq_topic;         /* overrides policy->dlq_topic ("%s":
                                    * the topic); copied; NULL: policy's */
} bus_sub_config;

BUS_API void bus_sub_config_init(bus_sub_config *cfg);

/* Subscribes fn(delivery, opaque) to pattern. cfg may be NULL. *out (may
 * be NULL if you never unsubscribe) gets a handle. Returns BUS_OK,
 * BUS_EINVAL (bad pattern: logged with the reason), BUS_ECLOSED,
 * BUS_ENOMEM, or a broker's error when an attached broker refused the
 * subscription. Thread: any, including a handler. Publishers never wait
 * for it: the table is read without locks (docs/bus.md). */
BUS_API int bus_subscribe(bus_ctx *ctx, const char *pattern,
                          bus_handler_fn fn, void *opaque,
                          const bus_sub_config *cfg, bus_sub **out);

/* Removes the subscription and frees the handle. Called outside that
 * subscription's own handler, it returns once the handler is running
 * nowhere and will never be called again; called from inside it, it
 * returns at once and the current call is the last. Events still queued
 * for it are dropped (released). Thread: any. Blocks (briefly). */
BUS_API int bus_unsubscribe(bus_sub *sub);

/* ---- Publishing ------------------------------------------------------- */

/* Publish flags. */
#define BUS_PUB_NONBLOCK 0x1u /* a full queue fails at once (BUS_EAGAIN)
                               * whatever the subscription's policy */

/* Publish acknowledgement: err is BUS_OK once the event is accepted (by
 * the local queues, or persisted by the broker as its guarantee says),
 * else the failure. ev is borrowed for the call. Runs on the publishing
 * thread (local) or a broker thread; must not block. */
typedef void (*bus_ack_fn)(void *opaque, bus_event *ev, int err);

/* Publishes ev on topic: freezes it and takes the caller's reference on
 * success. On failure the event stays with the caller, unchanged but
 * frozen, who may retry. Inline handlers have run when it returns.
 * Returns BUS_OK, BUS_EINVAL (bad topic, event without type), BUS_ECLOSED,
 * BUS_EAGAIN (a queue full: no subscription got the event), or a
 * broker's error. With no subscription matching, returns BUS_OK (the
 * event is dropped: nobody listens). Thread: any, including handlers. */
BUS_API int bus_publish(bus_ctx *ctx, const char *topic, bus_event *ev,
                        unsigned flags);

/* As bus_publish, and fn(opaque, ev, err) runs once with the outcome
 * (only if this call returns BUS_OK; otherwise never). */
BUS_API int bus_publish_ack(bus_ctx *ctx, const char *topic, bus_event *ev,
                            unsigned flags, bus_ack_fn fn, void *opaque);

/* ---- Brokers ------------------------------------------------------------ */

/* Routes topics matching route (a pattern; NULL means ">": everything)
 * to broker b, and subscribes b for every current and future
 * subscription of ctx whose pattern can overlap route. ctx borrows b: b
 * must stay open until it is detached (bus_ctx_detach or bus_ctx_close).
 * Returns BUS_OK, BUS_EINVAL, BUS_EEXIST (already attached), BUS_ENOMEM.
 * Thread: any but a handler. */
BUS_API int bus_ctx_attach(bus_ctx *ctx, bus_broker *b, const char *route);

/* Stops routing to b and removes its subscriptions; after it returns b
 * delivers nothing more to ctx. Thread: any but a handler. */
BUS_API int bus_ctx_detach(bus_ctx *ctx, bus_broker *b);

/* ---- Validation and matching (pure functions) ---------------------------- */

/* BUS_OK or BUS_EINVAL; errbuf (may be NULL) says why. */
BUS_API int bus_topic_validate(const char *topic, char *errbuf,
                               size_t errbuf_len);
BUS_API int bus_pattern_validate(const char *pattern, char *errbuf,
                                 size_t errbuf_len);
/* True when topic matches pattern (both assumed valid). */
BUS_API bool bus_topic_matches(const char *pattern, const char *topic);

/* ---- Statistics ------------------------------------------------------------ */

typedef struct bus_sub_stats {
    uint64_t delivered; /* handler calls started (batch: events); each
                         * redelivery of a deferred retry counts again */
    uint64_t ok;        /* BUS_ACK results (the pipeline's: a duplicate
                         * dropped by dedup counts here) */
    uint64_t retry;     /* BUS_RETRY results: deferred retries, nacks
                         * (breaker open, rate limited, no policy) */
    uint64_t reject;    /* BUS_REJECT results: dead-lettered, or failed
                         * for good with no dead-letter sink */
    uint64_t dropped;   /* queued events released without a call
                         * (unsubscribe, close deadline) */
    uint64_t queued;    /* waiting in queues now (approximate) */
} bus_sub_stats;

BUS_API void bus_sub_stats_get(const bus_sub *sub, bus_sub_stats *st);

typedef struct bus_ctx_stats {
    uint64_t published;      /* accepted publishes */
    uint64_t no_subscriber;  /* accepted, but nothing matched */
    uint64_t rejected_full;  /* publishes refused with BUS_EAGAIN */
    uint64_t delivered;      /* handler deliveries, all subscriptions */
    uint64_t queued;         /* events in the worker queues now */
    uint64_t subscriptions;  /* live subscriptions */
} bus_ctx_stats;

BUS_API void bus_ctx_stats_get(const bus_ctx *ctx, bus_ctx_stats *st);

#ifdef __cplusplus
}
#endif

#endif /* BUS_BUS_H */
