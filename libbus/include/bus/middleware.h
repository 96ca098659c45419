/*
 * The handler pipeline: a chain of middlewares around a handler.
 *
 * A middleware gets the delivery, a `next` to call (or not: a duplicate is
 * dropped, an open breaker refuses) and its own state. A delivery runs the
 * bus-level chain, then the subscription's chain, then the handler:
 *
 *     ctx mw 1 -> ctx mw 2 -> ... -> sub mw 1 -> ... -> handler
 *
 * Each middleware sees the result of everything inside it. Chains are
 * built, then attached; they must not change while deliveries use them
 * (build a new one instead). bus_chain_dump prints the order.
 *
 * The built-ins (bus_mw_*) are ordinary middlewares. The production stack
 * puts them in the order docs/pipeline.md explains:
 *
 *     tracing -> metrics -> dedup -> policy(retry, breaker, DLQ)
 *             -> rate limit -> deadline -> handler
 */
#ifndef BUS_MIDDLEWARE_H
#define BUS_MIDDLEWARE_H

#include <bus/common.h>
#include <bus/breaker.h>
#include <bus/clock.h>
#include <bus/dedup.h>
#include <bus/handler.h>
#include <bus/log.h>
#include <bus/metrics.h>
#include <bus/policy.h>
#include <bus/ratelimit.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_chain bus_chain;
/* The rest of the chain, valid during the middleware's call only. */
typedef struct bus_next bus_next;

/* Runs on the handler's thread. Returns the delivery's result: usually
 * bus_next_call(next, d)'s, possibly changed. It may call next more than
 * once (retries: the delivery's attempt is updated by whoever retries). */
typedef bus_result (*bus_middleware_fn)(bus_delivery *d, const bus_next *next,
                                        void *state);

typedef struct bus_middleware {
    const char *name;           /* for the dump; copied */
    bus_middleware_fn fn;
    void *state;
    void (*free_state)(void *state); /* called by bus_chain_free; may be
                                      * NULL (state not owned) */
} bus_middleware;

/* Calls the rest of the chain (eventually the handler). */
BUS_API bus_result bus_next_call(const bus_next *next, bus_delivery *d);

BUS_API int bus_chain_new(bus_chain **out);
/* Frees the chain and the states it owns. NULL is a no-op. Thread: any,
 * once no delivery uses it. */
BUS_API void bus_chain_free(bus_chain *c);
/* Appends (innermost so far). Takes mw->state on success only. Returns
 * BUS_OK, BUS_EINVAL, BUS_ENOMEM. */
BUS_API int bus_chain_append(bus_chain *c, const bus_middleware *mw);
BUS_API size_t bus_chain_len(const bus_chain *c);

/* Runs outer (may be NULL) then inner (may be NULL) then fn(d, opaque).
 * With both NULL it is a plain call. The dispatcher's entry point; also
 * for tests and benchmarks. */
BUS_API bus_result bus_chain_run(const bus_chain *outer, const bus_chain *inner,
                                 bus_delivery *d, bus_handler_fn fn,
                                 void *opaque);

/* Writes "1. tracing\n2. metrics\n...\n-> handler\n" for outer then inner
 * into buf (NUL-terminated when cap > 0); *len (may be NULL) gets the full
 * length. BUS_OK or BUS_ENOBUFS. */
BUS_API int bus_chain_dump(const bus_chain *outer, const bus_chain *inner,
                           char *buf, size_t cap, size_t *len);

/* ---- Outcome flags set by the built-ins (read by metrics, the bus) ----- */

#define BUS_DELIVERY_F_DUPLICATE 0x01u   /* dropped by dedup */
#define BUS_DELIVERY_F_DEFERRED 0x02u    /* parked for a later retry */
#define BUS_DELIVERY_F_DEAD_LETTER 0x04u /* dead-lettered */
#define BUS_DELIVERY_F_BREAKER 0x08u     /* refused: breaker open */
#define BUS_DELIVERY_F_RATE_LIMIT 0x10u  /* refused: rate limit */
#define BUS_DELIVERY_F_OVERRUN 0x20u     /* ran past its deadline */
#define BUS_DELIVERY_F_NACK 0x40u        /* broker should redeliver */
#define BUS_DELIVERY_F_DLQ_FAILED 0x80u  /* failed for good and not
                                          * dead-lettered (no sink, or it
                                          * failed): logged at ERR */

BUS_API unsigned bus_delivery_flags(const bus_delivery *d);
/* In-place retries made during this delivery. */
BUS_API uint32_t bus_delivery_retries(const bus_delivery *d);

/* ---- Built-in middlewares ------------------------------------------------ */
/* Each fills *mw; the state is owned by the chain once appended (or freed
 * with mw->free_state if never appended). Objects passed in (breaker,
 * dedup, rate limiter, registry) are borrowed and must outlive the chain. */

/* Failure policy (policy.h): copied. BUS_OK, BUS_EINVAL, BUS_ENOMEM. The
 * dead-letter topic name of a subscription comes from d's name. */
BUS_API int bus_mw_policy(bus_middleware *mw, const bus_failure_policy *p);

/* A standalone breaker check: open -> RETRY with BUS_EUNAVAIL and the
 * BREAKER | NACK flags, handler not called; else records the outcome. */
BUS_API int bus_mw_breaker(bus_middleware *mw, bus_breaker *b);

typedef enum bus_rl_mode {
    BUS_RL_DELAY = 0, /* wait for tokens (clock sleep) then go on */
    BUS_RL_REJECT     /* RETRY with BUS_EAGAIN and the RATE_LIMIT flag */
} bus_rl_mode;

/* Key of an event for per-key limits: write up to cap bytes into buf and
 * return the length. NULL key_fn: the stream id ("" when none). */
typedef size_t (*bus_rl_key_fn)(const bus_delivery *d, void *opaque,
                                char *buf, size_t cap);

typedef struct bus_mw_ratelimit_config {
    bus_ratelimit *rl;    /* required */
    bus_rl_mode mode;
    double cost;          /* tokens per event; 0 means 1 */
    const char *header;   /* key = this header's value (if key_fn NULL) */
    bus_rl_key_fn key_fn;
    void *key_opaque;
    bus_clock clock;      /* for DELAY waits; zero: real sleep */
} bus_mw_ratelimit_config;

BUS_API int bus_mw_ratelimit(bus_middleware *mw,
                             const bus_mw_ratelimit_config *cfg);

/* Drops events whose id dd has seen (returns BUS_ACK, DUPLICATE flag,
 * handler not called); marks ids whose handling returned BUS_ACK. */
BUS_API int bus_mw_dedup(bus_middleware *mw, bus_dedup *dd);

/* Per-handler deadline: sets the delivery's deadline to now + timeout_ms
 * (unless one is set) and, after the call, counts an overrun and logs it
 * with the handler's name. It cannot stop a handler (C has no safe
 * pre-emption): handlers read bus_delivery_deadline. overruns (may be
 * NULL) is incremented; clock zero: monotonic. */
BUS_API int bus_mw_deadline(bus_middleware *mw, int32_t timeout_ms,
                            const bus_logger *log, bus_counter *overruns,
                            const bus_clock *clock);

/* Per topic and subscription counters and the latency histogram of
 * docs/metrics.md ("Names the bus uses"), in registry m. Series are
 * registered on the first delivery of each topic (up to 256 topics per
 * middleware; more are counted under topic "_other"). */
BUS_API int bus_mw_metrics(bus_middleware *mw, bus_metrics *m,
                           const char *subscription);

/* Sets the thread's current delivery around the call so that events built
 * and published inside the handler inherit correlation, causation and
 * trace context (bus_trace_inherit, trace.h). */
BUS_API int bus_mw_tracing(bus_middleware *mw);

/* Logs each delivery at DEBUG (topic, name, attempt, result, duration). */
BUS_API int bus_mw_logging(bus_middleware *mw, const bus_logger *log);

/* ---- Stacks --------------------------------------------------------------- */

typedef struct bus_stack_config {
    size_t size;                  /* set by _init */
    const char *subscription;     /* metrics label; "" */
    bus_metrics *metrics;         /* NULL: no metrics middleware */
    const bus_failure_policy *policy; /* NULL: defaults */
    bus_breaker *breaker;         /* overrides policy->breaker when set */
    bus_dedup *dedup;             /* NULL: none */
    bus_ratelimit *ratelimit;     /* NULL: none */
    bus_rl_mode ratelimit_mode;
    int32_t deadline_ms;          /* 0: no deadline middleware */
    bus_logger log;
} bus_stack_config;

BUS_API void bus_stack_config_init(bus_stack_config *cfg);

/* tracing -> metrics -> dedup -> policy -> rate limit -> deadline; parts
 * whose object is NULL are left out. Returns BUS_OK, BUS_EINVAL,
 * BUS_ENOMEM. */
BUS_API int bus_stack_production(bus_chain **out, const bus_stack_config *cfg);

/* tracing -> logging (DEBUG) -> policy (in place, 3 attempts, no jitter,
 * 10 ms fixed) -> deadline (cfg->deadline_ms or 1000): fast feedback while
 * developing. cfg may be NULL. */
BUS_API int bus_stack_development(bus_chain **out,
                                  const bus_stack_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* BUS_MIDDLEWARE_H */
