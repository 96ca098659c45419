/*
 * The handler pipeline (middleware.h): chains, the continuation `next`,
 * and the built-in middlewares (policy, breaker, rate limit, dedup,
 * deadline, metrics, tracing, logging) and stacks.
 *
 * Design: a chain is an array of bus_middleware. bus_next is a small
 * struct on the stack holding the rest of the current chain, the inner
 * chain still to run and the handler; bus_next_call copies it, advances
 * one step and calls that middleware, so a chain of n costs n indirect
 * calls and no allocation. A NULL/empty chain calls the handler directly.
 *
 * Built-ins record their outcome in the delivery's flags (DUPLICATE,
 * DEFERRED, DEAD_LETTER, BREAKER, RATE_LIMIT, OVERRUN, NACK), which outer
 * middlewares (metrics) and the dispatcher (ack/nack) read.
 *
 * Threads: middleware functions run on the handler's thread; their states
 * are shared by all the threads running the chain and use atomics (or, for
 * the metrics topic table, a mutex on the first delivery of a topic only).
 */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <bus/middleware.h>
#include <bus/trace.h>

#include "alloc.h"
#include "delivery.h"
#include "lru.h"
#include "pipeline.h"
#include "platform.h"

struct bus_chain {
    bus_middleware *v;
    size_t n, cap;
};

struct bus_next {
    const bus_middleware *cur, *end;
    const bus_middleware *inner, *inner_end;
    bus_handler_fn fn;
    void *opaque;
};

unsigned
bus_delivery_flags(const bus_delivery *d)
{
    return d->flags;
}

uint32_t
bus_delivery_retries(const bus_delivery *d)
{
    return d->retries;
}

bus_result
bus_next_call(const bus_next *n, bus_delivery *d)
{
    bus_next nn;
    const bus_middleware *m;

    if (n->cur == n->end) {
        if (n->inner == n->inner_end)
            return n->fn(d, n->opaque); /* the handler: nothing to copy */
        nn.cur = n->inner;
        nn.end = n->inner_end;
        nn.inner = nn.inner_end = NULL;
        nn.fn = n->fn;
        nn.opaque = n->opaque;
    } else {
        nn = *n;
    }
    m = nn.cur++;
    return m->fn(d, &nn, m->state);
}

bus_result
bus_chain_run(const bus_chain *outer, const bus_chain *inner, bus_delivery *d,
              bus_handler_fn fn, void *opaque)
{
    bus_next n;
    const bus_middleware *m;
    bool has_inner = inner != NULL && inner->n != 0;

    /* Calls the first middleware itself (one bus_next_call less). */
    if (outer != NULL && outer->n != 0) {
        n.cur = outer->v;
        n.end = outer->v + outer->n;
        n.inner = has_inner ? inner->v : NULL;
        n.inner_end = has_inner ? inner->v + inner->n : NULL;
    } else if (has_inner) {
        n.cur = inner->v;
        n.end = inner->v + inner->n;
        n.inner = n.inner_end = NULL;
    } else {
        return fn(d, opaque);
    }
    n.fn = fn;
    n.opaque = opaque;
    m = n.cur++;
    return m->fn(d, &n, m->state);
}

int
bus_chain_new(bus_chain **out)
{
    *out = bus__zalloc(sizeof(**out));
    return *out ? BUS_OK : BUS_ENOMEM;
}

void
bus_chain_free(bus_chain *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->n; i++) {
        if (c->v[i].free_state != NULL)
            c->v[i].free_state(c->v[i].state);
        bus__strfree((char *)c->v[i].name);
    }
    if (c->v != NULL)
        bus__free(c->v, c->cap * sizeof(*c->v));
    bus__free(c, sizeof(*c));
}

int
bus_chain_append(bus_chain *c, const bus_middleware *mw)
{
    bus_middleware m;

    if (c == NULL || mw == NULL || mw->fn == NULL)
        return BUS_EINVAL;
    if (c->n == c->cap) {
        size_t nc = c->cap ? c->cap * 2 : 8;
        void *p = bus__realloc(c->v, c->cap * sizeof(*c->v),
                               nc * sizeof(*c->v));
        if (p == NULL)
            return BUS_ENOMEM;
        c->v = p;
        c->cap = nc;
    }
    m = *mw;
    if ((m.name = bus__strdup(mw->name ? mw->name : "?", NULL)) == NULL)
        return BUS_ENOMEM;
    c->v[c->n++] = m;
    return BUS_OK;
}

size_t
bus_chain_len(const bus_chain *c)
{
    return c ? c->n : 0;
}

const bus_middleware *
bus__chain_items(const bus_chain *c, size_t *n)
{
    *n = c ? c->n : 0;
    return c ? c->v : NULL;
}

int
bus_chain_dump(const bus_chain *outer, const bus_chain *inner, char *buf,
               size_t cap, size_t *len)
{
    size_t off = 0, k = 1;
    const bus_chain *cs[2] = {outer, inner};
    const char *lvl[2] = {"bus", "subscription"};
    int n;

    if (cap > 0)
        buf[0] = '\0';
    for (int j = 0; j < 2; j++) {
        for (size_t i = 0; cs[j] != NULL && i < cs[j]->n; i++, k++) {
            n = snprintf(off < cap ? buf + off : NULL,
                         off < cap ? cap - off : 0, "%zu. %s (%s)\n", k,
                         cs[j]->v[i].name, lvl[j]);
            off += (size_t)n;
        }
    }
    n = snprintf(off < cap ? buf + off : NULL, off < cap ? cap - off : 0,
                 "-> handler\n");
    off += (size_t)n;
    if (len != NULL)
        *len = off;
    return off < cap ? BUS_OK : BUS_ENOBUFS;
}

/* ---- Helpers -------------------------------------------------------------- */

static void *
mw_state_new(size_t size)
{
    return bus__zalloc(size);
}

#define MW_FREE_FN(type)                                                   \
    static void type##_free(void *p)                                       \
    {                                                                      \
        bus__free(p, sizeof(type));                                        \
    }

/* ---- Failure policy ------------------------------------------------------- */

typedef struct mw_policy {
    bus_failure_policy p;
    char dlq_pattern[256];
    _Atomic uint64_t dead_lettered, dlq_lost;
} mw_policy;
MW_FREE_FN(mw_policy)

static void
policy_dead_letter(mw_policy *s, bus_delivery *d, int64_t wall)
{
    char topic[512];
    bus_event *e = NULL;
    int rv = BUS_ENOTSUP;

    /* An event that already is a dead letter is not dead-lettered again:
     * a failing catch-all subscription would otherwise loop. */
    if (s->p.dlq_publish != NULL
        && bus_event_header(d->event, BUS_H_DLQ_TOPIC) == NULL
        && (rv = bus_dlq_topic(&s->p, d->topic, topic, sizeof(topic)))
               == BUS_OK
        && (rv = bus_dlq_event(&e, d->event, d->topic, d->name, d->err_code,
                               d->err_msg, d->attempt, d->first_fail_wall,
                               wall)) == BUS_OK
        && (rv = s->p.dlq_publish(s->p.dlq_opaque, topic, e)) == BUS_OK) {
        d->flags |= BUS_DELIVERY_F_DEAD_LETTER;
        atomic_fetch_add_explicit(&s->dead_lettered, 1, memory_order_relaxed);
        bus_logf(&s->p.log, BUS_LOG_WARN, "pipeline",
                 "dead-lettered event from %s (%s) to %s after %" PRIu32
                 " attempt(s): error %d: %s",
                 d->topic, d->name, topic, d->attempt, d->err_code,
                 d->err_msg);
        return;
    }
    bus_event_unref(e);
    d->flags |= BUS_DELIVERY_F_DLQ_FAILED;
    atomic_fetch_add_explicit(&s->dlq_lost, 1, memory_order_relaxed);
    bus_logf(&s->p.log, BUS_LOG_ERR, "pipeline",
             "failed event from %s (%s) not dead-lettered (%s) after %" PRIu32
             " attempt(s): error %d: %s",
             d->topic, d->name,
             s->p.dlq_publish == NULL ? "no dead-letter sink" : bus_strerror(rv),
             d->attempt, d->err_code, d->err_msg);
}

static bus_result
policy_fn(bus_delivery *d, const bus_next *next, void *state)
{
    mw_policy *s = state;
    bus_breaker *b = s->p.breaker;
    uint32_t max = s->p.retry.max_attempts ? s->p.retry.max_attempts : 5;
    bool can_defer = s->p.defer != NULL && s->p.mode != BUS_RETRY_IN_PLACE;
    bus_result r;

    for (;;) {
        if (b != NULL && !bus_breaker_allow(b)) {
            bus_breaker_stats st;
            bus_breaker_stats_get(b, &st);
            d->flags |= BUS_DELIVERY_F_BREAKER;
            bus_delivery_set_error(d, BUS_EUNAVAIL, "circuit breaker %s open",
                                   bus_breaker_name(b));
            if (can_defer) {
                uint64_t wait = st.retry_in_ns ? st.retry_in_ns : 1000000u;
                if (s->p.defer(s->p.defer_opaque, d,
                               bus_clock_now(&s->p.clock) + wait) == BUS_OK) {
                    d->flags |= BUS_DELIVERY_F_DEFERRED;
                    return BUS_RETRY;
                }
            }
            d->flags |= BUS_DELIVERY_F_NACK;
            return BUS_RETRY;
        }
        r = bus_next_call(next, d);
        if (r != BUS_ACK && s->p.classify != NULL)
            r = s->p.classify(s->p.classify_opaque, r, d->err_code);
        if (r == BUS_ACK) {
            if (b != NULL)
                bus__breaker_record_at(b, true,
                                       d->end_ns ? d->end_ns : d->now_ns);
            return BUS_ACK;
        }
        /* A rate limiter's refusal is no failure of the handler's: it
         * takes a retry like any retryable error, but the breaker, which
         * watches the handler's health, does not count it. */
        if (b != NULL && !(d->flags & BUS_DELIVERY_F_RATE_LIMIT))
            bus__breaker_record_at(b, false,
                                   d->end_ns ? d->end_ns : d->now_ns);

        uint64_t now = bus__delivery_end(d, &s->p.clock);
        int64_t wall = bus__clock_real_ns();
        bus__delivery_settle(d); /* the attempt ends here, not after */
        if (d->first_fail_ns == 0) {
            d->first_fail_ns = now;
            d->first_fail_wall = wall;
        }
        if (r == BUS_REJECT || d->attempt >= max
            || (s->p.retry.max_elapsed_ms != 0
                && now - d->first_fail_ns
                       >= (uint64_t)s->p.retry.max_elapsed_ms * 1000000u)) {
            policy_dead_letter(s, d, wall);
            return BUS_REJECT;
        }
        uint64_t delay = bus_retry_delay_ns(&s->p.retry, d->attempt,
                                            bus__random_u64());
        /* No retry starts past max_elapsed: this failure is the last. */
        if (s->p.retry.max_elapsed_ms != 0
            && now + delay - d->first_fail_ns
                   > (uint64_t)s->p.retry.max_elapsed_ms * 1000000u) {
            policy_dead_letter(s, d, wall);
            return BUS_REJECT;
        }
        if (s->p.on_retry != NULL)
            s->p.on_retry(s->p.on_retry_opaque, d, d->attempt, delay,
                          d->err_code, d->err_msg);
        if (can_defer
            && s->p.defer(s->p.defer_opaque, d, now + delay) == BUS_OK) {
            d->flags |= BUS_DELIVERY_F_DEFERRED;
            return BUS_RETRY;
        }
        bus_clock_sleep(&s->p.clock, delay);
        /* A new attempt: its own start time (the stamp is the
         * dispatcher's promise of one read per attempt). */
        if (d->now_ns != 0)
            d->now_ns = bus__clock_mono_ns();
        d->end_ns = 0;
        d->attempt++;
        d->retries++;
        d->err_code = 0;
        d->err_msg[0] = '\0';
        d->flags &= ~(BUS_DELIVERY_F_BREAKER | BUS_DELIVERY_F_RATE_LIMIT
                      | BUS_DELIVERY_F_NACK);
    }
}

int
bus_mw_policy(bus_middleware *mw, const bus_failure_policy *p)
{
    mw_policy *s;

    memset(mw, 0, sizeof(*mw));
    if ((s = mw_state_new(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    if (p != NULL)
        s->p = *p;
    else
        bus_failure_policy_init(&s->p);
    if (s->p.dlq_topic != NULL) {
        if (strlen(s->p.dlq_topic) >= sizeof(s->dlq_pattern)) {
            mw_policy_free(s);
            return BUS_EINVAL;
        }
        strcpy(s->dlq_pattern, s->p.dlq_topic);
        s->p.dlq_topic = s->dlq_pattern;
    }
    mw->name = "policy";
    mw->fn = policy_fn;
    mw->state = s;
    mw->free_state = mw_policy_free;
    return BUS_OK;
}

/* ---- Breaker -------------------------------------------------------------- */

static bus_result
breaker_fn(bus_delivery *d, const bus_next *next, void *state)
{
    bus_breaker *b = state;
    bus_result r;

    if (!bus_breaker_allow(b)) {
        d->flags |= BUS_DELIVERY_F_BREAKER | BUS_DELIVERY_F_NACK;
        bus_delivery_set_error(d, BUS_EUNAVAIL, "circuit breaker %s open",
                               bus_breaker_name(b));
        return BUS_RETRY;
    }
    r = bus_next_call(next, d);
    bus__breaker_record_at(b, r == BUS_ACK, d->end_ns ? d->end_ns : d->now_ns);
    return r;
}

int
bus_mw_breaker(bus_middleware *mw, bus_breaker *b)
{
    memset(mw, 0, sizeof(*mw));
    if (b == NULL)
        return BUS_EINVAL;
    mw->name = "breaker";
    mw->fn = breaker_fn;
    mw->state = b;
    return BUS_OK;
}

/* ---- Rate limit ----------------------------------------------------------- */

typedef struct mw_rl {
    bus_mw_ratelimit_config c;
    char header[128];
} mw_rl;
MW_FREE_FN(mw_rl)

/* The key_fn case out of line: its buffer would otherwise put a stack
 * protector check on every call of rl_fn. */
static __attribute__((noinline)) uint64_t
rl_key_fn_hash(const mw_rl *s, const bus_delivery *d)
{
    char kb[256];
    size_t klen = s->c.key_fn(d, s->c.key_opaque, kb, sizeof(kb));

    return bus__hash_bytes(kb, klen > sizeof(kb) ? sizeof(kb) : klen);
}

static bus_result
rl_fn(bus_delivery *d, const bus_next *next, void *state)
{
    mw_rl *s = state;
    const char *key;
    uint64_t h, wait = 0;
    int rv;

    if (s->c.key_fn != NULL) {
        h = rl_key_fn_hash(s, d);
    } else {
        if (s->c.header != NULL)
            key = bus_event_header(d->event, s->c.header);
        else
            key = bus_event_stream(d->event);
        h = bus__hash_str(key != NULL ? key : "", NULL);
    }
    rv = bus__ratelimit_take_at(s->c.rl, h, s->c.cost,
                                s->c.mode == BUS_RL_DELAY, &wait, d->now_ns);
    if (rv == BUS_OK) {
        if (wait > 0)
            bus_clock_sleep(&s->c.clock, wait);
        return bus_next_call(next, d);
    }
    if (rv == BUS_EAGAIN) {
        d->flags |= BUS_DELIVERY_F_RATE_LIMIT;
        bus_delivery_set_error(d, BUS_EAGAIN, "rate limited for %" PRIu64
                               " ns", wait);
        return BUS_RETRY;
    }
    bus_delivery_set_error(d, rv, "rate limit: cost above capacity");
    return BUS_REJECT;
}

int
bus_mw_ratelimit(bus_middleware *mw, const bus_mw_ratelimit_config *cfg)
{
    mw_rl *s;

    memset(mw, 0, sizeof(*mw));
    if (cfg == NULL || cfg->rl == NULL
        || (cfg->header != NULL && strlen(cfg->header) >= 128))
        return BUS_EINVAL;
    if ((s = mw_state_new(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    s->c = *cfg;
    if (s->c.cost <= 0)
        s->c.cost = 1;
    if (cfg->header != NULL) {
        strcpy(s->header, cfg->header);
        s->c.header = s->header;
    }
    mw->name = "ratelimit";
    mw->fn = rl_fn;
    mw->state = s;
    mw->free_state = mw_rl_free;
    return BUS_OK;
}

/* ---- Dedup ---------------------------------------------------------------- */

static bus_result
dedup_fn(bus_delivery *d, const bus_next *next, void *state)
{
    bus_dedup *dd = state;
    const bus_uuid *id = bus_event_id(d->event);
    bus_result r;

    if (bus__dedup_seen_at(dd, id, d->now_ns)) {
        d->flags |= BUS_DELIVERY_F_DUPLICATE;
        return BUS_ACK;
    }
    r = bus_next_call(next, d);
    if (r == BUS_ACK)
        (void)bus__dedup_mark_at(dd, id, d->end_ns ? d->end_ns : d->now_ns);
    /* (a store error is counted there) */
    return r;
}

int
bus_mw_dedup(bus_middleware *mw, bus_dedup *dd)
{
    memset(mw, 0, sizeof(*mw));
    if (dd == NULL)
        return BUS_EINVAL;
    mw->name = "dedup";
    mw->fn = dedup_fn;
    mw->state = dd;
    return BUS_OK;
}

/* ---- Deadline ------------------------------------------------------------- */

typedef struct mw_deadline {
    uint64_t timeout_ns;
    bus_logger log;
    bus_counter *overruns;
    bool own_overruns; /* a stack's: released with the middleware */
    bus_clock clock;
} mw_deadline;

static void
mw_deadline_free(void *p)
{
    mw_deadline *s = p;

    if (s->own_overruns)
        bus_counter_release(s->overruns);
    bus__free(s, sizeof(*s));
}

static bus_result
deadline_fn(bus_delivery *d, const bus_next *next, void *state)
{
    mw_deadline *s = state;
    uint64_t now = bus__delivery_now(d, &s->clock);
    uint64_t saved = d->deadline_ns;
    bus_result r;

    if (d->deadline_ns == 0)
        d->deadline_ns = now + s->timeout_ns;
    r = bus_next_call(next, d);
    now = bus__delivery_end(d, &s->clock);
    if (now > d->deadline_ns) {
        d->flags |= BUS_DELIVERY_F_OVERRUN;
        bus_counter_inc(s->overruns);
        bus_logf(&s->log, BUS_LOG_WARN, "pipeline",
                 "handler %s overran its deadline by %.3f ms on %s",
                 d->name[0] ? d->name : "(unnamed)",
                 (double)(now - d->deadline_ns) / 1e6, d->topic);
    }
    d->deadline_ns = saved;
    return r;
}

int
bus_mw_deadline(bus_middleware *mw, int32_t timeout_ms, const bus_logger *log,
                bus_counter *overruns, const bus_clock *clock)
{
    mw_deadline *s;

    memset(mw, 0, sizeof(*mw));
    if (timeout_ms <= 0)
        return BUS_EINVAL;
    if ((s = mw_state_new(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    s->timeout_ns = (uint64_t)timeout_ms * 1000000u;
    if (log != NULL)
        s->log = *log;
    s->overruns = overruns;
    if (clock != NULL)
        s->clock = *clock;
    mw->name = "deadline";
    mw->fn = deadline_fn;
    mw->state = s;
    mw->free_state = mw_deadline_free;
    return BUS_OK;
}

/* ---- Metrics -------------------------------------------------------------- */

#define METRICS_TOPICS 256

typedef struct mw_topic {
    char *topic;
    bus_counter *delivered, *ok, *retried, *dead, *dlq_failed, *ref_breaker,
        *ref_rate, *dups;
    bus_hist *latency;
} mw_topic;

typedef struct mw_metrics {
    bus_metrics *m;
    char *sub;
    bus__mutex mtx;
    _Atomic size_t n; /* published entries; release after filling one */
    mw_topic *t[METRICS_TOPICS];
    mw_topic *other;
} mw_metrics;

static void
metrics_topic_free(mw_topic *e)
{
    if (e == NULL)
        return;
    bus_counter_release(e->delivered);
    bus_counter_release(e->ok);
    bus_counter_release(e->retried);
    bus_counter_release(e->dead);
    bus_counter_release(e->dlq_failed);
    bus_counter_release(e->ref_breaker);
    bus_counter_release(e->ref_rate);
    bus_counter_release(e->dups);
    bus_hist_release(e->latency);
    bus__strfree(e->topic);
    bus__free(e, sizeof(*e));
}

static void
mw_metrics_free(void *p)
{
    mw_metrics *s = p;
    size_t n = atomic_load_explicit(&s->n, memory_order_acquire);

    for (size_t i = 0; i < n; i++)
        metrics_topic_free(s->t[i]);
    metrics_topic_free(s->other);
    bus__strfree(s->sub);
    bus__mutex_fini(&s->mtx);
    bus__free(s, sizeof(*s));
}

/* Registration failures leave a handle NULL: recording is then a no-op. */
static mw_topic *
metrics_topic_new(mw_metrics *s, const char *topic)
{
    mw_topic *e = bus__zalloc(sizeof(*e));
    bus_label l[3] = {{"topic", topic}, {"subscription", s->sub},
                      {"reason", "breaker"}};

    if (e == NULL)
        return NULL;
    if ((e->topic = bus__strdup(topic, NULL)) == NULL) {
        bus__free(e, sizeof(*e));
        return NULL;
    }
    bus_metrics_counter(s->m, "bus_deliveries_total", "Handler calls started.",
                        l, 2, &e->delivered);
    bus_metrics_counter(s->m, "bus_deliveries_ok_total",
                        "Deliveries handled successfully.", l, 2, &e->ok);
    bus_metrics_counter(s->m, "bus_deliveries_retried_total",
                        "Retries (in place and deferred).", l, 2, &e->retried);
    bus_metrics_counter(s->m, "bus_deliveries_dead_lettered_total",
                        "Deliveries dead-lettered.", l, 2, &e->dead);
    bus_metrics_counter(s->m, "bus_deliveries_failed_total",
                        "Deliveries that failed for good and were not "
                        "dead-lettered (no sink, or it failed).",
                        l, 2, &e->dlq_failed);
    bus_metrics_counter(s->m, "bus_deliveries_refused_total",
                        "Deliveries refused before the handler.", l, 3,
                        &e->ref_breaker);
    l[2].value = "rate_limit";
    bus_metrics_counter(s->m, "bus_deliveries_refused_total",
                        "Deliveries refused before the handler.", l, 3,
                        &e->ref_rate);
    bus_metrics_counter(s->m, "bus_duplicates_dropped_total",
                        "Duplicate events dropped by dedup.", l, 2, &e->dups);
    bus_metrics_hist(s->m, "bus_handler_latency_seconds",
                     "Handler run time (the pipeline inside metrics).", l, 2,
                     &e->latency);
    return e;
}

static mw_topic *
metrics_lookup(mw_metrics *s, const char *topic)
{
    size_t n = atomic_load_explicit(&s->n, memory_order_acquire);
    mw_topic *e;

    for (size_t i = 0; i < n; i++)
        if (strcmp(s->t[i]->topic, topic) == 0)
            return s->t[i];
    bus__mutex_lock(&s->mtx);
    n = atomic_load_explicit(&s->n, memory_order_relaxed);
    for (size_t i = 0; i < n; i++)
        if (strcmp(s->t[i]->topic, topic) == 0) {
            bus__mutex_unlock(&s->mtx);
            return s->t[i];
        }
    if (n < METRICS_TOPICS && (e = metrics_topic_new(s, topic)) != NULL) {
        s->t[n] = e;
        /* release: the entry's fields before the count readers acquire */
        atomic_store_explicit(&s->n, n + 1, memory_order_release);
    } else {
        if (s->other == NULL)
            s->other = metrics_topic_new(s, "_other");
        e = s->other;
    }
    bus__mutex_unlock(&s->mtx);
    return e;
}

static bus_result
metrics_fn(bus_delivery *d, const bus_next *next, void *state)
{
    mw_metrics *s = state;
    mw_topic *e = metrics_lookup(s, d->topic);
    uint64_t t0;
    bus_result r;
    unsigned f;

    if (e == NULL)
        return bus_next_call(next, d);
    bus__counter_add(e->delivered, 1);
    bus__delivery_settle(d); /* an earlier attempt's sample, if any */
    t0 = d->now_ns != 0 ? d->now_ns : bus__clock_mono_ns();
    r = bus_next_call(next, d);
    /* The end of the sample: an inner middleware's reading (d->end_ns);
     * else, on a worker that offers it, its next stamp (pipeline.h,
     * bus__lat_pend: never its idle time, which it closes before); else
     * one clock read. A coarse clock (4 ms steps) would be no latency. */
    if (d->end_ns == 0 && d->pend != NULL && d->pend->h == NULL) {
        d->pend->h = e->latency;
        d->pend->t0 = t0;
    } else {
        bus__hist_record(e->latency, bus__delivery_end(d, NULL) - t0);
    }
    f = d->flags;
    if (__builtin_expect(f == 0 && d->retries == 0, 1)) {
        if (r == BUS_ACK)
            bus__counter_add(e->ok, 1);
        return r;
    }
    if (r == BUS_ACK && !(f & BUS_DELIVERY_F_DUPLICATE))
        bus_counter_inc(e->ok);
    if (f & BUS_DELIVERY_F_DUPLICATE)
        bus_counter_inc(e->dups);
    if (d->retries || (f & BUS_DELIVERY_F_DEFERRED))
        bus_counter_add(e->retried,
                        d->retries + ((f & BUS_DELIVERY_F_DEFERRED) ? 1 : 0));
    if (f & BUS_DELIVERY_F_DEAD_LETTER)
        bus_counter_inc(e->dead);
    if (f & BUS_DELIVERY_F_DLQ_FAILED)
        bus_counter_inc(e->dlq_failed);
    if (f & BUS_DELIVERY_F_BREAKER)
        bus_counter_inc(e->ref_breaker);
    if (f & BUS_DELIVERY_F_RATE_LIMIT)
        bus_counter_inc(e->ref_rate);
    return r;
}

int
bus_mw_metrics(bus_middleware *mw, bus_metrics *m, const char *subscription)
{
    mw_metrics *s;

    memset(mw, 0, sizeof(*mw));
    if (m == NULL)
        return BUS_EINVAL;
    if ((s = mw_state_new(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    if ((s->sub = bus__strdup(subscription ? subscription : "", NULL))
        == NULL) {
        bus__free(s, sizeof(*s));
        return BUS_ENOMEM;
    }
    s->m = m;
    bus__mutex_init(&s->mtx);
    mw->name = "metrics";
    mw->fn = metrics_fn;
    mw->state = s;
    mw->free_state = mw_metrics_free;
    return BUS_OK;
}

/* ---- Tracing and logging -------------------------------------------------- */

static bus_result
tracing_fn(bus_delivery *d, const bus_next *next, void *state)
{
    /* The thread-local itself (trace.c), not bus_delivery_current_set:
     * two calls through the PLT saved per delivery. */
    const bus_delivery *prev = bus__trace_current;
    bus_result r;

    (void)state;
    bus__trace_current = d;
    r = bus_next_call(next, d);
    bus__trace_current = prev;
    return r;
}

int
bus_mw_tracing(bus_middleware *mw)
{
    memset(mw, 0, sizeof(*mw));
    mw->name = "tracing";
    mw->fn = tracing_fn;
    return BUS_OK;
}

typedef struct mw_log {
    bus_logger log;
} mw_log;
MW_FREE_FN(mw_log)

static bus_result
logging_fn(bus_delivery *d, const bus_next *next, void *state)
{
    mw_log *s = state;
    uint64_t t0 = bus__clock_mono_ns();
    bus_result r = bus_next_call(next, d);
    char id[BUS_UUID_STR_LEN + 1];

    if (bus_log_enabled(&s->log, BUS_LOG_DEBUG))
        bus_logf(&s->log, BUS_LOG_DEBUG, "pipeline",
                 "%s %s id=%s attempt=%" PRIu32 " result=%d flags=0x%x "
                 "took %.3f ms%s%s",
                 d->topic, d->name, bus_uuid_format(bus_event_id(d->event), id),
                 d->attempt, (int)r, d->flags,
                 (double)(bus__clock_mono_ns() - t0) / 1e6,
                 d->err_msg[0] ? " error: " : "", d->err_msg);
    return r;
}

int
bus_mw_logging(bus_middleware *mw, const bus_logger *log)
{
    mw_log *s;

    memset(mw, 0, sizeof(*mw));
    if ((s = mw_state_new(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    if (log != NULL)
        s->log = *log;
    mw->name = "logging";
    mw->fn = logging_fn;
    mw->state = s;
    mw->free_state = mw_log_free;
    return BUS_OK;
}

/* ---- Stacks --------------------------------------------------------------- */

void
bus_stack_config_init(bus_stack_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
}

int
bus__chain_add(bus_chain *c, int rv, bus_middleware *mw)
{
    if (rv != BUS_OK)
        return rv;
    if ((rv = bus_chain_append(c, mw)) != BUS_OK && mw->free_state != NULL)
        mw->free_state(mw->state);
    return rv;
}

/* The stacks' failure policy: cfg's (or the defaults), with cfg's breaker
 * and logger where it has none. */
static void
stack_policy(const bus_stack_config *cfg, bus_failure_policy *p)
{
    if (cfg->policy != NULL)
        *p = *cfg->policy;
    else
        bus_failure_policy_init(p);
    if (cfg->breaker != NULL)
        p->breaker = cfg->breaker;
    if (p->log.fn == NULL)
        p->log = cfg->log;
}

/* Appends a deadline to a stack's chain; with cfg->metrics its overruns
 * count in bus_handler_overruns_total{subscription}, as a subscription's
 * deadline_ms does (the middleware owns the counter). */
static int
stack_deadline(bus_chain *c, const bus_stack_config *cfg, int32_t timeout_ms)
{
    bus_label l = {"subscription", cfg->subscription ? cfg->subscription : ""};
    bus_counter *ov = NULL;
    bus_middleware mw;
    int rv;

    if (cfg->metrics != NULL)
        (void)bus_metrics_counter(
            cfg->metrics, "bus_handler_overruns_total",
            "Handler calls that ran past their deadline.", &l, 1,
            &ov); /* none on failure: logged only */
    rv = bus_mw_deadline(&mw, timeout_ms, &cfg->log, ov,
                         cfg->policy ? &cfg->policy->clock : NULL);
    if (rv != BUS_OK) {
        bus_counter_release(ov);
        return rv;
    }
    ((mw_deadline *)mw.state)->own_overruns = true;
    return bus__chain_add(c, BUS_OK, &mw);
}

/* Ends a stack constructor: *out gets c, or c is freed on failure. */
static int
stack_done(bus_chain *c, int rv, bus_chain **out)
{
    if (rv != BUS_OK) {
        bus_chain_free(c);
        return rv;
    }
    *out = c;
    return BUS_OK;
}

int
bus_stack_production(bus_chain **out, const bus_stack_config *cfg)
{
    bus_stack_config dc;
    bus_failure_policy p;
    bus_chain *c;
    bus_middleware mw;
    int rv;

    *out = NULL;
    if (cfg == NULL) {
        bus_stack_config_init(&dc);
        cfg = &dc;
    }
    if ((rv = bus_chain_new(&c)) != BUS_OK)
        return rv;
    rv = bus__chain_add(c, bus_mw_tracing(&mw), &mw);
    if (rv == BUS_OK && cfg->metrics != NULL)
        rv = bus__chain_add(c, bus_mw_metrics(&mw, cfg->metrics, cfg->subscription),
                       &mw);
    if (rv == BUS_OK && cfg->dedup != NULL)
        rv = bus__chain_add(c, bus_mw_dedup(&mw, cfg->dedup), &mw);
    if (rv == BUS_OK) {
        stack_policy(cfg, &p);
        rv = bus__chain_add(c, bus_mw_policy(&mw, &p), &mw);
    }
    if (rv == BUS_OK && cfg->ratelimit != NULL) {
        bus_mw_ratelimit_config rc;
        memset(&rc, 0, sizeof(rc));
        rc.rl = cfg->ratelimit;
        rc.mode = cfg->ratelimit_mode;
        if (cfg->policy != NULL)
            rc.clock = cfg->policy->clock;
        rv = bus__chain_add(c, bus_mw_ratelimit(&mw, &rc), &mw);
    }
    if (rv == BUS_OK && cfg->deadline_ms > 0)
        rv = stack_deadline(c, cfg, cfg->deadline_ms);
    return stack_done(c, rv, out);
}

int
bus_stack_development(bus_chain **out, const bus_stack_config *cfg)
{
    bus_stack_config dc;
    bus_failure_policy p;
    bus_chain *c;
    bus_middleware mw;
    int rv;

    *out = NULL;
    if (cfg == NULL) {
        bus_stack_config_init(&dc);
        cfg = &dc;
    }
    if ((rv = bus_chain_new(&c)) != BUS_OK)
        return rv;
    rv = bus__chain_add(c, bus_mw_tracing(&mw), &mw);
    if (rv == BUS_OK)
        rv = bus__chain_add(c, bus_mw_logging(&mw, &cfg->log), &mw);
    if (rv == BUS_OK) {
        stack_policy(cfg, &p);
        p.mode = BUS_RETRY_IN_PLACE;
        p.retry.backoff = BUS_BACKOFF_FIXED;
        p.retry.jitter = BUS_JITTER_NONE;
        p.retry.initial_ms = 10;
        p.retry.max_attempts = 3;
        rv = bus__chain_add(c, bus_mw_policy(&mw, &p), &mw);
    }
    if (rv == BUS_OK)
        rv = stack_deadline(c, cfg,
                            cfg->deadline_ms > 0 ? cfg->deadline_ms : 1000);
    return stack_done(c, rv, out);
}
