/*
 * The bus context: the subscription table, publish, dispatch to inline
 * and queued subscriptions, worker threads, brokers and close.
 *
 * Design.
 * - The table is an immutable snapshot (topic.h: a persistent trie with a
 *   topic cache) behind an RCU domain (rcu.h). Publishers look it up in a
 *   read section: no lock, no shared write. Subscribe/unsubscribe build
 *   the next snapshot under ctx->wmtx, swap it in, and free the old one
 *   after a grace period: unsubscribe waits for one (deferred inside a
 *   handler, where waiting could deadlock); subscribe only looks whether
 *   the domain is idle and waits only when CTX_RETIRED_MAX snapshots are
 *   pending, so it does not wait for the handlers running now.
 *   Snapshots are released under wmtx (topic.h serialises add, remove
 *   and release).
 * - Queued subscriptions: one bounded MPSC ring per worker (ring.h). An
 *   event goes to worker key % workers (a mask when workers is a power
 *   of two), the key being the subscription's ordering key (stream id
 *   hash by default), so one key is always handled by one worker, in
 *   publish order. A publish first claims a slot in every ring it needs
 *   and only then commits them, so a full ring refuses the event as a
 *   whole (no subscription gets it) and the caller keeps it. A claim that
 *   must wait for room first gives back the claims it holds (the consumer
 *   stops at an uncommitted slot: waiting while holding one could wait
 *   for itself).
 * - Handlers run inside a read section (inline: the publisher's; queued:
 *   the worker's, one per drained batch), and every call first checks the
 *   subscription's dead flag. Unsubscribe sets the flag, removes the entry
 *   from the table and waits for a grace period: after that, no call is
 *   running and none can start. A subscription's memory is freed, after
 *   its broker subscriptions are ended, once it is dead, out of the
 *   table, past a grace period, and no queue entry refers to it
 *   (sub->deq == sub->enq).
 * - Events are frozen and carry their topic (bus__event_set_topic) so
 *   queued deliveries can name it after the publisher's string is gone.
 * - Close: intake stops (closing, checked inside read sections), a grace
 *   period lets the publishers inside finish, workers drain until the
 *   deadline (counted from the close call; workers check it themselves
 *   and drop what is left), then brokers are detached: queued broker
 *   deliveries ack through their links while they drain.
 * - Broker links (ctx_link): a queued broker delivery keeps its link in
 *   the queue entry and acks through it (backend handle and token) after
 *   the handler, on a worker, possibly long after the delivery returned.
 *   So a link is never unsubscribed from its backend (which may free the
 *   handle) nor freed while an entry names it. Unsubscribe and detach
 *   mark the links gone (deliveries through them are refused from then
 *   on) and hand them to reclamation: an unsubscribed subscription's
 *   links go with it as a zombie (freed once past a grace period with
 *   no entry left, enq == deq); detached links go to ctx->retired_links
 *   (freed once past a grace period with link->pending == 0). The grace
 *   period ends every delivery that saw the link not gone, so nothing
 *   adds an entry afterwards. Reclamation runs outside read sections
 *   only, so a handler that unsubscribes never frees what another
 *   worker is about to ack through; detach (never from a handler) waits
 *   until its links are gone, since the caller may close the broker
 *   right after.
 * - Counters that both sides would write live apart: per-thread context
 *   statistics (ctx_tstats), and a subscription's enq (publishers) and deq
 *   and results (handler side) on lines of their own, away from the fields
 *   both read. Profiles of the queued path showed those shared lines as
 *   the publisher's main cost.
 *
 * - The handler pipeline (docs/pipeline.md). A subscription composes at
 *   subscribe time the two chains it runs (outer: the metrics middleware
 *   when the context has a registry, then the context's chain; inner:
 *   its failure policy, its own chain, its deadline). With none, the call
 *   is the plain handler call it always was (the fast path: one branch,
 *   and the thread's current delivery set for tracing). With some, the
 *   dispatcher reads the clock once (d->now_ns, pipeline.h) and runs them.
 *   The outcome flags decide the broker ack: DEFERRED means "not done
 *   yet" (no ack; the parked retry owns the event reference, the link's
 *   pending count and an enq count of the subscription), NACK or RETRY
 *   asks for redelivery, ACK and REJECT (dead-lettered, or failed for
 *   good) finish it.
 * - Deferred retries (ctx_redo) wait on a hashed timer wheel owned by the
 *   context, advanced by a timer thread (started with the first
 *   subscription that may defer), which re-enqueues a due retry to the
 *   worker of its key with its attempt number: other keys never wait for
 *   it. Unsubscribe and detach take their parked retries back out
 *   (dropped, not acked: an at-least-once broker redelivers); close drops
 *   those still parked after the workers stopped, and logs them.
 *
 * Lock order: ctx->wmtx, then a worker's wait mutex; ctx->tmtx (the timer
 * thread's) and the wheel's mutex are taken alone, never with wmtx. No libbus lock is
 * held while calling a handler, a broker op or an ack callback, and
 * bus__rcu_synchronize is never called with wmtx held (a handler inside a
 * read section may be waiting for wmtx).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker.h>
#include <bus/bus.h>

#include "alloc.h"
#include "broker_impl.h"
#include "delivery.h"
#include "event_impl.h"
#include "pipeline.h"
#include "platform.h"
#include "rcu.h"
#include "ring.h"
#include "timerwheel.h"
#include "topic.h"

#define CTX_MAX_WORKERS 256
#define CTX_MAX_QUEUE (1u << 24)
#define CTX_POP_BATCH 64
#define CTX_LOOKUP_STACK 16
#define CTX_MAX_BATCH_SUBS 8 /* batch subscriptions pending per worker */
#define CTX_RETIRED_MAX 32   /* snapshots pending before subscribe waits */
#define CTX_TICK_NS 1000000u /* timer wheel tick: 1 ms */
#define CTX_WHEEL_SLOTS 1024 /* 1 s per turn; longer delays take turns */

typedef struct ctx_link ctx_link;
typedef struct ctx_route ctx_route;
typedef struct ctx_worker ctx_worker;

/* A subscription's registration with one attached broker. Queue entries
 * of its deliveries name it (ring_entry.link) to ack after the handler, so
 * it and the backend's handle live until none is pending: see "Broker
 * links" at the top. */
struct ctx_link {
    bus_sub *sub;
    bus_ctx *ctx;
    bus_broker *broker;
    void *handle;        /* the backend's subscription */
    ctx_link *next;      /* s->links or ctx->retired_links, under wmtx */
    uint64_t retired_at; /* grace sequence when it was detached */
    atomic_bool gone;    /* detached or unsubscribed: refuse deliveries */
    /* Queue entries naming this link and not finished yet: incremented by
     * the delivering thread, decremented (release) by the worker after
     * its ack. A parked retry counts as an entry. */
    _Atomic uint64_t pending;
    bus_counter *acked, *nacked; /* ctx metrics, or NULL */
};

/* Per-broker publish series (ctx metrics), freed with its route. */
typedef struct ctx_bmetrics {
    bus_counter *published;
    bus_hist *latency;
} ctx_bmetrics;

/* A broker attached with a route pattern. Immutable once published. */
struct ctx_route {
    bus_broker *broker;
    char *pattern;
    size_t pattern_size;
    ctx_bmetrics *bm; /* NULL without metrics; owned as pattern is */
};

/* The routes, swapped as a whole under RCU like the index. */
typedef struct ctx_routes {
    size_t n;
    ctx_route r[];
} ctx_routes;

struct bus_sub {
    bus_ctx *ctx;
    char *pattern;
    size_t pattern_size;
    char *name;
    size_t name_size;
    char *group;
    size_t group_size;
    bus_handler_fn fn;
    void *opaque;
    bus_batch_fn batch_fn;
    bus_key_fn key_fn;
    void *key_opaque;
    uint32_t batch_max;
    uint32_t batch_linger_us;
    bool inline_;
    bool piped;               /* outer or inner set: run the pipeline */
    bool can_defer;           /* its policy may park retries */
    bool fail_fast;           /* backpressure FAIL */
    bus_chain *outer, *inner; /* composed at subscribe (see the top) */
    bus_breaker *breaker;     /* its policy's, for "<ctx>.breakers" */
    bus_clock pclock;         /* its policy's clock (ctx_defer) */
    bus_gauge *depth;         /* queue depth callback series, or NULL */
    bus_counter *overruns;    /* deadline overruns (metrics), or NULL */
    int32_t block_timeout_ms; /* -1: forever */
    atomic_bool dead;         /* no new call may start */
    ctx_link *links;          /* brokers; under ctx->wmtx */
    bus_sub *next;            /* ctx->subs, under ctx->wmtx */
    uint64_t retired_at;      /* grace sequence when it was removed */
    void *mem;                /* the allocation (ctx_zalloc_lines) */
    /* Queue entries made for s (publishers) and finished (handled or
     * dropped, where the handler runs): enq - deq entries refer to s.
     * On lines of their own, apart from each other and from the fields
     * above that both sides read, so that neither side's writes take
     * those lines from the other. Statistics are relaxed: independent
     * counters, read racily. */
    _Alignas(BUS_CACHELINE) _Atomic uint64_t enq;
    _Alignas(BUS_CACHELINE) _Atomic uint64_t deq;
    _Atomic uint64_t delivered, ok, retry, reject, dropped;
};

/* A deferred retry, parked on the context's timer wheel (t first), then
 * carried by the queue entry that redelivers it (ring_entry.redo). It
 * owns what an entry owns: a reference on ev, one of s->enq, one of
 * link->pending. */
typedef struct ctx_redo {
    bus__timer t;
    bus_event *ev;
    bus_sub *sub;
    ctx_link *link;
    uint64_t token;
    uint32_t attempt; /* the attempt it will be */
    uint64_t first_fail_ns;
    int64_t first_fail_wall;
} ctx_redo;

/* What the context's health checks remember between runs, per worker. */
typedef struct ctx_hstate {
    uint64_t head;        /* ring head at the last look */
    uint64_t stuck_since; /* work queued and head unmoved since; 0 */
    uint64_t sat_since;   /* saturated since; 0 */
} ctx_hstate;

/* Work a worker holds for a batch subscription. */
typedef struct ctx_batch {
    bus_sub *sub;
    size_t n;
    uint64_t first_ns;
    ring_entry *entries; /* batch_max */
} ctx_batch;

struct ctx_worker {
    ring q; /* first: cache-line aligned with the worker */
    bus_ctx *ctx;
    bus__thread thread;
    uint32_t index;
    bool started;
    _Alignas(BUS_CACHELINE) atomic_int sleeping;
    bus__mutex mtx;
    bus__cond cond;
    ctx_batch batches[CTX_MAX_BATCH_SUBS];
    size_t n_batches;
    bus__lat_pend pend; /* the metrics sample the next stamp closes */
};

/* Something to free after a grace period. */
typedef struct ctx_retired {
    struct ctx_retired *next;
    uint64_t seq;       /* freeable once a grace period started after it */
    bus__tindex *index; /* or */
    ctx_routes *routes; /* an array; its patterns are not freed with it
                         * (the next array shares them), except: */
    size_t routes_size;
    char *pattern;      /* a detached route's pattern */
    size_t pattern_size;
    ctx_bmetrics *bm;   /* and its metrics */
} ctx_retired;

/* Context statistics, per thread (STYLE.md §8): a thread adds to its own
 * slot, so publishers and workers never write a shared line for them;
 * bus_ctx_stats_get sums the slots. */
#define CTX_TSLOTS 64
typedef struct ctx_tstats {
    _Alignas(BUS_CACHELINE) _Atomic uint64_t published;
    _Atomic uint64_t no_subscriber, rejected_full, delivered;
} ctx_tstats;

struct bus_ctx {
    bus_ctx_config cfg;
    char *name;
    size_t name_size;
    bus__rcu rcu;
    _Atomic(bus__tindex *) index;
    _Atomic(ctx_routes *) routes;
    size_t routes_size;
    bus__mutex wmtx;
    bus_sub *subs;       /* live subscriptions, under wmtx */
    bus_sub *zombies;    /* unsubscribed, waiting to be freed */
    ctx_retired *retired;
    size_t n_retired;    /* under wmtx */
    ctx_link *retired_links; /* detached, waiting to be unlinked; wmtx */
    uint32_t n_unlinking; /* links being unsubscribed by a reclaim; wmtx */
    uint64_t grace_seq;  /* under wmtx: bumped per retirement */
    ctx_worker *workers;
    void *workers_mem;   /* their allocation (ctx_zalloc_lines) */
    uint32_t n_workers;
    uint32_t worker_mask; /* n_workers - 1 when a power of two, else 0 */
    void *mem;           /* ctx's own allocation */
    atomic_bool closing;
    atomic_bool abort_drain; /* close deadline passed: drop, don't handle */
    _Atomic uint64_t drain_deadline; /* set by close; 0: none */
    atomic_bool intake_done; /* closing, and no publisher is still inside:
                              * workers may exit once their ring is empty */
    _Atomic uint64_t dropped_at_close;
    _Atomic uint64_t n_subs;
    /* Deferred retries: the wheel, and the thread advancing it, which
     * sleeps on tcond (under tmtx) while the wheel is empty. */
    bus__twheel wheel;
    bus__mutex tmtx;
    bus__cond tcond;
    bus__thread timer;
    int tstop;          /* under tmtx */
    int tkick;          /* under tmtx: a retry was parked */
    _Atomic uint64_t parked; /* retries on the wheel or being moved */
    /* Under wmtx (start) or by the closer; kept off the words above,
     * which the timer thread reads. */
    bool timer_started;
    /* Health and metrics (cfg.health, cfg.metrics). */
    bus_health_check *hc[3];
    ctx_hstate *hstate;  /* n_workers, under the checks (never concurrent) */
    bus_gauge **shard_depth; /* n_workers */
    ctx_tstats tstats[CTX_TSLOTS + 1]; /* per thread: ctx_tslot() */
};

/* ---- Allocation and per-thread statistics ------------------------------ */

/* Zeroed memory aligned to a cache line: bus_ctx, ctx_worker and bus_sub
 * have _Alignas(BUS_CACHELINE) members, more than malloc promises. *base
 * gets the block to free (size + BUS_CACHELINE bytes). */
static void *
ctx_zalloc_lines(size_t size, void **base)
{
    uintptr_t p;

    if ((*base = bus__zalloc(size + BUS_CACHELINE)) == NULL)
        return NULL;
    p = ((uintptr_t)*base + BUS_CACHELINE - 1)
      & ~(uintptr_t)(BUS_CACHELINE - 1);
    return (void *)p;
}

static void
ctx_free_lines(void *base, size_t size)
{
    if (base != NULL)
        bus__free(base, size + BUS_CACHELINE);
}

static _Atomic uint32_t ctx_tslot_next;
static BUS__TLS int32_t ctx_tslot_mine = -1;

/* The calling thread's statistics slot. The first CTX_TSLOTS threads of
 * the process to ask own one each, for good (a slot is never handed to
 * another thread); later threads share slot CTX_TSLOTS. */
static inline uint32_t
ctx_tslot(void)
{
    if (ctx_tslot_mine < 0) {
        uint32_t n = atomic_fetch_add_explicit(&ctx_tslot_next, 1,
                                               memory_order_relaxed);
        ctx_tslot_mine = n < CTX_TSLOTS ? (int32_t)n : CTX_TSLOTS;
    }
    return (uint32_t)ctx_tslot_mine;
}

/* Adds n to a counter of slot. An owned slot has one writer, so a load
 * and a store do (no locked instruction); the shared one needs the RMW.
 * Relaxed: statistics, read racily. */
static inline void
ctx_stat_add(_Atomic uint64_t *c, uint32_t slot, uint64_t n)
{
    if (slot < CTX_TSLOTS)
        atomic_store_explicit(
            c, atomic_load_explicit(c, memory_order_relaxed) + n,
            memory_order_relaxed);
    else
        atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

#define CTX_STAT(ctx, field, n)                                           \
    do {                                                                  \
        uint32_t ctx_slot_ = ctx_tslot();                                 \
        ctx_stat_add(&(ctx)->tstats[ctx_slot_].field, ctx_slot_, (n));    \
    } while (0)

/* ---- Configuration ---------------------------------------------------- */

void
bus_ctx_config_init(bus_ctx_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->name = "bus";
    cfg->workers = 2;
    cfg->queue_capacity = 4096;
    cfg->backpressure = BUS_BP_BLOCK;
    cfg->block_timeout_ms = 1000;
    cfg->wait = BUS_WAIT_SPIN_BLOCK;
    cfg->spin_ns = 20000;
    cfg->close_timeout_ms = 5000;
    cfg->topic_cache = 4096;
    cfg->saturation_pct = 90;
    cfg->saturated_ms = 5000;
}

/* Whether a caller's config struct (of in->size bytes; 0: this
 * version's) has field: the structs grow at their end. */
#define CTX_CFG_HAS(in, type, field)                                      \
    ((in)->size == 0                                                      \
     || (in)->size >= offsetof(type, field) + sizeof((in)->field))

void
bus_sub_config_init(bus_sub_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->dispatch = BUS_DISPATCH_QUEUED;
    cfg->batch_max = 64;
}

static uint32_t
ctx_pow2(uint32_t v)
{
    uint32_t p = 2;

    while (p < v)
        p <<= 1;
    return p;
}

/* Copies cfg over the defaults, field by field, so that zero keeps the
 * default and a shorter (older) struct is accepted. */
static int
ctx_config_resolve(bus_ctx_config *out, const bus_ctx_config *in)
{
    bus_ctx_config_init(out);
    if (in == NULL)
        return BUS_OK;
    if (in->size != 0 && in->size < offsetof(bus_ctx_config, log))
        return BUS_EINVAL;
    if (in->name != NULL)
        out->name = in->name;
    if (in->workers != 0)
        out->workers = in->workers;
    if (in->queue_capacity != 0)
        out->queue_capacity = in->queue_capacity;
    if (in->backpressure != BUS_BP_DEFAULT)
        out->backpressure = in->backpressure;
    if (in->block_timeout_ms != 0)
        out->block_timeout_ms = in->block_timeout_ms;
    if (in->wait != BUS_WAIT_DEFAULT)
        out->wait = in->wait;
    if (in->spin_ns != 0)
        out->spin_ns = in->spin_ns;
    if (in->close_timeout_ms != 0)
        out->close_timeout_ms = in->close_timeout_ms;
    if (in->topic_cache != 0)
        out->topic_cache = in->topic_cache;
    out->log = in->log;
    if (CTX_CFG_HAS(in, bus_ctx_config, breakers)) {
        out->chain = in->chain;
        out->metrics = in->metrics;
        out->health = in->health;
        if (in->saturation_pct != 0)
            out->saturation_pct = in->saturation_pct;
        if (in->saturated_ms != 0)
            out->saturated_ms = in->saturated_ms;
        out->clock = in->clock;
        out->breakers = in->breakers;
    }
    if (out->saturation_pct > 100 || out->saturated_ms < 1)
        return BUS_EINVAL;
    if (out->workers > CTX_MAX_WORKERS
        || out->queue_capacity > CTX_MAX_QUEUE
        || out->backpressure > BUS_BP_FAIL || out->wait > BUS_WAIT_SPIN
        || out->block_timeout_ms < -1 || out->close_timeout_ms < -1)
        return BUS_EINVAL;
    out->queue_capacity = ctx_pow2(out->queue_capacity);
    return BUS_OK;
}

/* ---- Grace periods and reclamation ---------------------------------------- */

static void ctx_bmetrics_free(ctx_bmetrics *bm);
static void ctx_timer_stop(bus_ctx *ctx);

static void
ctx_free_retired(ctx_retired *r)
{
    bus__tindex_release(r->index);
    if (r->routes != NULL)
        bus__free(r->routes, r->routes_size);
    if (r->pattern != NULL)
        bus__free(r->pattern, r->pattern_size);
    ctx_bmetrics_free(r->bm);
    bus__free(r, sizeof(*r));
}

static void sub_free(bus_sub *s);
static void ctx_unlink_list(ctx_link *l);
static ctx_bmetrics *ctx_bmetrics_new(bus_ctx *ctx, bus_broker *b);
static void ctx_link_metrics(bus_ctx *ctx, ctx_link *l);
static void ctx_link_free(ctx_link *l);
static int ctx_defer(void *opaque, bus_delivery *d, uint64_t due_ns);
static int ctx_dlq_publish(void *opaque, const char *topic, bus_event *ev);
static int ctx_timer_start(bus_ctx *ctx);
static uint64_t ctx_redo_drop_list(bus_ctx *ctx, bus__timer *t,
                                   bool at_close);
static bool ctx_redo_of_sub(bus__timer *t, void *arg);
static bool ctx_redo_of_broker(bus__timer *t, void *arg);
static double ctx_sub_depth_fn(void *opaque);

/* Frees what was retired before a grace period. With wait, waits for one
 * (unless inside a read section, where waiting could deadlock: a later
 * call does it). Without, only looks whether no read section is running,
 * and waits only once CTX_RETIRED_MAX snapshots are pending, to bound
 * their memory: subscribe need not wait for the handlers running now.
 * Called without wmtx. */
static void
ctx_reclaim(bus_ctx *ctx, bool wait)
{
    ctx_retired *r, **pr, *freeable = NULL;
    bus_sub *s, **ps, *dead = NULL;
    ctx_link *l, **pl, *unlink = NULL;
    uint64_t target;
    size_t pending;
    uint32_t n_unlink = 0;

    bus__mutex_lock(&ctx->wmtx);
    target = ctx->grace_seq;
    pending = ctx->n_retired;
    bus__mutex_unlock(&ctx->wmtx);
    if (wait || pending >= CTX_RETIRED_MAX) {
        if (!bus__rcu_synchronize(&ctx->rcu))
            return; /* inside a handler: a later call will do it */
    } else if (!bus__rcu_poll(&ctx->rcu)) {
        return;
    }

    bus__mutex_lock(&ctx->wmtx);
    for (pr = &ctx->retired; (r = *pr) != NULL;) {
        if (r->seq <= target) {
            *pr = r->next;
            r->next = freeable;
            freeable = r;
            ctx->n_retired--;
        } else {
            pr = &r->next;
        }
    }
    for (ps = &ctx->zombies; (s = *ps) != NULL;) {
        /* acquire: the worker's last use of s happens-before its
         * release increment of deq. enq no longer moves: the grace
         * period ended every publisher that could see s. */
        if (s->retired_at <= target
            && atomic_load_explicit(&s->deq, memory_order_acquire)
                   == atomic_load_explicit(&s->enq, memory_order_relaxed)) {
            *ps = s->next;
            s->next = dead;
            dead = s;
            n_unlink++; /* its links, as one unit */
        } else {
            ps = &s->next;
        }
    }
    for (pl = &ctx->retired_links; (l = *pl) != NULL;) {
        /* acquire: the worker's ack through l happens-before its release
         * decrement, hence before the backend lets go of the handle. */
        if (l->retired_at <= target
            && atomic_load_explicit(&l->pending, memory_order_acquire)
                   == 0) {
            *pl = l->next;
            l->next = unlink;
            unlink = l;
            n_unlink++;
        } else {
            pl = &l->next;
        }
    }
    /* Counted while their backends are told, outside wmtx: a detach of
     * the same broker must not return before (bus_ctx_detach). */
    ctx->n_unlinking += n_unlink;
    /* Under wmtx: releasing a snapshot drops references on the nodes it
     * shares with the live one, which the next add/remove copies; topic.h
     * wants all three serialised (its node counts are not atomic). */
    while ((r = freeable) != NULL) {
        freeable = r->next;
        ctx_free_retired(r);
    }
    bus__mutex_unlock(&ctx->wmtx);
    /* Without wmtx: a backend's unsubscribe waits for its running
     * deliveries, which may be waiting for wmtx. The links first: their
     * deliveries read l->sub until the backend has let go. */
    ctx_unlink_list(unlink);
    while ((s = dead) != NULL) {
        dead = s->next;
        ctx_unlink_list(s->links);
        s->links = NULL;
        sub_free(s);
    }
    if (n_unlink > 0) {
        bus__mutex_lock(&ctx->wmtx);
        ctx->n_unlinking -= n_unlink;
        bus__mutex_unlock(&ctx->wmtx);
    }
}

/* Queues an old snapshot for reclamation. @locks ctx->wmtx held. */
static int
ctx_retire(bus_ctx *ctx, bus__tindex *index, ctx_routes *routes,
           size_t routes_size)
{
    ctx_retired *r = bus__zalloc(sizeof(*r));

    if (r == NULL)
        return BUS_ENOMEM;
    r->seq = ++ctx->grace_seq;
    ctx->n_retired++;
    r->index = index;
    r->routes = routes;
    r->routes_size = routes_size;
    r->next = ctx->retired;
    ctx->retired = r;
    return BUS_OK;
}

/* ---- Workers ---------------------------------------------------------------- */

static void
sub_count_result(bus_sub *s, bus_result res, uint64_t n)
{
    switch (res) {
    case BUS_ACK:
        atomic_fetch_add_explicit(&s->ok, n, memory_order_relaxed);
        break;
    case BUS_RETRY:
        atomic_fetch_add_explicit(&s->retry, n, memory_order_relaxed);
        break;
    default:
        atomic_fetch_add_explicit(&s->reject, n, memory_order_relaxed);
        break;
    }
}

/* Passes a handler outcome to the broker: BUS_RETRY asks for a
 * redelivery (a nack), the others finish the delivery. */
static void
ctx_ack_link(ctx_link *l, uint64_t token, bus_result res)
{
    if (l != NULL && token != 0) {
        bus__broker_ack(l->broker, l->handle, token, res);
        if (l->acked != NULL)
            bus_counter_inc(res == BUS_RETRY ? l->nacked : l->acked);
    }
}

/* An entry naming a link is finished (acked or dropped): the link may go
 * once none is left. release: our use of l happens-before its unlinking
 * (ctx_reclaim's acquire). @thread worker (or the closer, at free). */
static inline void
ctx_link_done(ctx_link *l)
{
    if (l != NULL)
        atomic_fetch_sub_explicit(&l->pending, 1, memory_order_release);
}

/* What the pipeline's hooks (ctx_defer) need of the call in progress;
 * the delivery's owner. */
typedef struct ctx_owner {
    bus_sub *sub;
    ctx_link *link;
    uint64_t token;
} ctx_owner;

/* A worker's open latency sample (pipeline.h), NULL on other threads. */
static BUS__TLS bus__lat_pend *ctx_pend_tl;

/* Runs the pipeline for one delivery (s->piped): one clock read, the
 * composed chains, then the outcome to the statistics and the broker.
 * At a worker's top level (not nested: a handler publishing to an inline
 * subscription) the stamp also closes the previous delivery's latency
 * sample and the delivery is offered the slot for its own.
 * Out of line: the plain call in ctx_call stays small. */
static __attribute__((noinline)) void
ctx_call_piped(bus_sub *s, bus_delivery *d, ctx_link *link, uint64_t token,
               const ctx_redo *redo, bool nested)
{
    ctx_owner own = {s, link, token};
    bus__lat_pend *pend = nested ? NULL : ctx_pend_tl;
    uint64_t now = bus__clock_mono_ns();
    bus_result res;

    if (redo != NULL) {
        d->attempt = redo->attempt;
        d->first_fail_ns = redo->first_fail_ns;
        d->first_fail_wall = redo->first_fail_wall;
    }
    d->owner = &own;
    if (pend != NULL)
        bus__lat_pend_close(pend, now);
    d->pend = pend;
    d->now_ns = now;
    res = bus_chain_run(s->outer, s->inner, d, s->fn, s->opaque);
    sub_count_result(s, res, 1);
    /* Deferred: parked with its own link count; acked when it ends. */
    if (d->flags & BUS_DELIVERY_F_DEFERRED)
        return;
    if (d->flags & BUS_DELIVERY_F_NACK)
        res = BUS_RETRY;
    ctx_ack_link(link, token, res);
}

/* Calls one handler (through its pipeline, if any), with the thread's
 * current delivery set so that what it publishes inherits the trace
 * context (trace.h). redo: the retry this call is, or NULL.
 * @thread publisher or worker, inside a read section. */
static inline void
ctx_call(bus_sub *s, bus_event *ev, ctx_link *link, uint64_t token,
         const ctx_redo *redo)
{
    const bus_delivery *prev = bus__trace_current;
    bus_delivery d;
    bus_result res;

    bus__delivery_init(&d, ev, ev->topic, s->name, 1, 0, s);
    atomic_fetch_add_explicit(&s->delivered, 1, memory_order_relaxed);
    CTX_STAT(s->ctx, delivered, 1);
    bus__trace_current = &d;
    if (__builtin_expect(!s->piped, 1)) {
        res = s->fn(&d, s->opaque);
        bus__trace_current = prev;
        sub_count_result(s, res, 1);
        ctx_ack_link(link, token, res);
        return;
    }
    ctx_call_piped(s, &d, link, token, redo, prev != NULL);
    bus__trace_current = prev;
}

/* Releases an entry without calling its handler. */
static void
ctx_drop_entry(bus_ctx *ctx, ring_entry *e, bool at_close)
{
    atomic_fetch_add_explicit(&e->sub->dropped, 1, memory_order_relaxed);
    if (at_close)
        atomic_fetch_add_explicit(&ctx->dropped_at_close, 1,
                                  memory_order_relaxed);
    /* A dropped broker delivery is not acked: the backend redelivers it
     * if its guarantee says so. */
    bus_event_unref(e->ev);
    ctx_link_done(e->link);
    if (e->redo != NULL)
        bus__free(e->redo, sizeof(*e->redo));
}

/* True once close's drain deadline has passed: queued events are then
 * dropped (and counted) instead of handled. Costs one relaxed load
 * unless the context is closing. @thread worker. */
static bool
ctx_drain_expired(bus_ctx *ctx)
{
    uint64_t dl;

    if (atomic_load_explicit(&ctx->abort_drain, memory_order_acquire))
        return true;
    if (!atomic_load_explicit(&ctx->closing, memory_order_relaxed))
        return false;
    dl = atomic_load_explicit(&ctx->drain_deadline, memory_order_acquire);
    if (dl == 0 || bus__clock_mono_ns() < dl)
        return false;
    atomic_store_explicit(&ctx->abort_drain, true, memory_order_release);
    return true;
}

static void
ctx_batch_flush(ctx_worker *w, ctx_batch *b)
{
    bus_delivery ds[64];
    bus_delivery *ptrs[64];
    bus_result res[64];
    bus_sub *s = b->sub;
    size_t done = 0, i;

    while (done < b->n) {
        size_t n = b->n - done;
        if (n > 64)
            n = 64;
        for (i = 0; i < n; i++) {
            ring_entry *e = &b->entries[done + i];
            bus__delivery_init(&ds[i], e->ev, e->ev->topic, s->name, 1, 0,
                               s);
            ptrs[i] = &ds[i];
            res[i] = BUS_ACK;
        }
        bool expired = ctx_drain_expired(w->ctx);
        if (!expired
            && !atomic_load_explicit(&s->dead, memory_order_seq_cst)) {
            atomic_fetch_add_explicit(&s->delivered, n,
                                      memory_order_relaxed);
            CTX_STAT(w->ctx, delivered, n);
            s->batch_fn(ptrs, n, res, s->opaque);
            for (i = 0; i < n; i++) {
                ring_entry *e = &b->entries[done + i];
                sub_count_result(s, res[i], 1);
                ctx_ack_link(e->link, e->token, res[i]);
                bus_event_unref(e->ev);
                ctx_link_done(e->link);
            }
        } else {
            for (i = 0; i < n; i++)
                ctx_drop_entry(w->ctx, &b->entries[done + i], expired);
        }
        done += n;
    }
    /* release: our last use of s happens-before its reclamation. */
    atomic_fetch_add_explicit(&s->deq, b->n, memory_order_release);
    b->n = 0;
}

static void
ctx_worker_flush_batches(ctx_worker *w, bool only_due)
{
    uint64_t now = only_due ? bus__clock_mono_ns() : 0;
    size_t i;

    for (i = 0; i < w->n_batches; i++) {
        ctx_batch *b = &w->batches[i];
        if (b->n == 0)
            continue;
        if (only_due && now - b->first_ns
                            < (uint64_t)b->sub->batch_linger_us * 1000u)
            continue;
        ctx_batch_flush(w, b);
    }
}

static ctx_batch *
ctx_worker_batch_for(ctx_worker *w, bus_sub *s)
{
    size_t i;

    for (i = 0; i < w->n_batches; i++)
        if (w->batches[i].sub == s)
            return &w->batches[i];
    for (i = 0; i < w->n_batches; i++) {
        if (w->batches[i].n == 0) {
            w->batches[i].sub = s;
            return &w->batches[i];
        }
    }
    if (w->n_batches < CTX_MAX_BATCH_SUBS) {
        ctx_batch *b = &w->batches[w->n_batches++];
        b->sub = s;
        b->n = 0;
        return b;
    }
    return NULL;
}

static void
ctx_worker_handle(ctx_worker *w, ring_entry *e, bool last)
{
    bus_ctx *ctx = w->ctx;
    bus_sub *s = e->sub;
    ctx_batch *b;

    /* The open latency sample (pipeline.h) ends now, not later: before a
     * handler without the pipeline's stamp runs, and before the last
     * entry of the run is taken off the queue (whoever sees the queue
     * drained sees every sample recorded). */
    if (w->pend.h != NULL && (s == NULL || !s->piped || s->batch_fn != NULL))
        bus__lat_pend_close(&w->pend, bus__clock_mono_ns());
    if (s == NULL)
        return; /* a no-op entry from an abandoned claim */
    if (ctx_drain_expired(ctx)) {
        ctx_drop_entry(ctx, e, true);
        atomic_fetch_add_explicit(&s->deq, 1, memory_order_release);
        return;
    }
    if (s->batch_fn != NULL) {
        b = ctx_worker_batch_for(w, s);
        if (b == NULL) { /* too many batch subscriptions: flush them */
            ctx_worker_flush_batches(w, false);
            b = ctx_worker_batch_for(w, s);
        }
        if (b->n == 0)
            b->first_ns = bus__clock_mono_ns();
        b->entries[b->n++] = *e;
        if (b->n >= s->batch_max)
            ctx_batch_flush(w, b);
        return;
    }
    /* seq_cst: pairs with unsubscribe's store of dead (rcu.h). */
    if (atomic_load_explicit(&s->dead, memory_order_seq_cst))
        ctx_drop_entry(ctx, e, false);
    else {
        ctx_call(s, e->ev, e->link, e->token, e->redo);
        bus_event_unref(e->ev);
        ctx_link_done(e->link);
        if (e->redo != NULL)
            bus__free(e->redo, sizeof(*e->redo));
    }
    if (last && w->pend.h != NULL)
        bus__lat_pend_close(&w->pend, bus__clock_mono_ns());
    /* release: our last use of s happens-before its reclamation. */
    atomic_fetch_add_explicit(&s->deq, 1, memory_order_release);
}

static bool
ctx_worker_has_pending_batches(const ctx_worker *w)
{
    size_t i;

    for (i = 0; i < w->n_batches; i++)
        if (w->batches[i].n > 0)
            return true;
    return false;
}

/* Waits for work according to the wait strategy. @thread worker. */
static void
ctx_worker_idle(ctx_worker *w)
{
    bus_ctx *ctx = w->ctx;
    uint64_t start;

    if (ctx_worker_has_pending_batches(w)) {
        /* Lingering batches: poll until they are due or work arrives. */
        ctx_worker_flush_batches(w, true);
        if (ctx_worker_has_pending_batches(w))
            bus__cpu_relax();
        return;
    }
    if (ctx->cfg.wait != BUS_WAIT_BLOCK) {
        start = bus__clock_mono_ns();
        do {
            int i;
            for (i = 0; i < 64; i++) {
                if (ring_ready(&w->q)
                    || atomic_load_explicit(&ctx->intake_done,
                                            memory_order_acquire))
                    return;
                bus__cpu_relax();
            }
        } while (ctx->cfg.wait == BUS_WAIT_SPIN
                 || bus__clock_mono_ns() - start < ctx->cfg.spin_ns);
    }
    /* Dekker with ctx_wake: we store sleeping then look at the next slot
     * (both seq_cst); a producer commits that slot, then a fence, then
     * looks at sleeping; so one of us sees the other. Asymmetric when
     * membarrier(2) is available (the RCU domain says): the sleeper,
     * rare, runs a barrier on every thread of the process, so producers,
     * on every publish, need only a compiler barrier (no mfence). */
    atomic_store_explicit(&w->sleeping, 1, memory_order_seq_cst);
    if (ctx->rcu.memb && !bus__membarrier()) {
        /* Registered at init (rcu.c): producers rely on it. */
        fprintf(stderr, "libbus: membarrier failed after registration\n");
        abort();
    }
    if (!ring_ready(&w->q)
        && !atomic_load_explicit(&ctx->intake_done, memory_order_seq_cst)) {
        bus__mutex_lock(&w->mtx);
        while (atomic_load_explicit(&w->sleeping, memory_order_relaxed)
               && !ring_ready(&w->q)
               && !atomic_load_explicit(&ctx->intake_done,
                                        memory_order_acquire)) {
            /* The timeout is a safety net, not the mechanism. */
            bus__cond_wait_until(&w->cond, &w->mtx,
                                 bus__clock_mono_ns() + 100000000u);
        }
        bus__mutex_unlock(&w->mtx);
    }
    atomic_store_explicit(&w->sleeping, 0, memory_order_relaxed);
}

static void
ctx_wake(bus_ctx *ctx, ctx_worker *w)
{
    if (ctx->cfg.wait == BUS_WAIT_SPIN)
        return;
    /* See ctx_worker_idle: the sleeper's membarrier is our fence. */
    if (ctx->rcu.memb)
        atomic_signal_fence(memory_order_seq_cst);
    else
        atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&w->sleeping, memory_order_relaxed)) {
        bus__mutex_lock(&w->mtx);
        atomic_store_explicit(&w->sleeping, 0, memory_order_relaxed);
        bus__mutex_unlock(&w->mtx);
        /* Signalled after unlocking: woken under our lock, the worker
         * would at once block again on the mutex (strace: 4.7 futex
         * calls per event in the blocking-latency bench, 3 after).
         * Safe: sleeping changed under the lock, which the worker holds
         * while it tests it before waiting. */
        bus__cond_signal(&w->cond);
    }
}

static void
ctx_worker_main(void *arg)
{
    ctx_worker *w = arg;
    bus_ctx *ctx = w->ctx;
    ring_entry batch[CTX_POP_BATCH];

    ctx_pend_tl = &w->pend;
    for (;;) {
        size_t n = ring_pop(&w->q, batch, CTX_POP_BATCH), i;

        if (n > 0) {
            uint32_t tok = bus__rcu_enter(&ctx->rcu);
            for (i = 0; i < n; i++)
                ctx_worker_handle(w, &batch[i], i + 1 == n);
            if (!ring_ready(&w->q))
                ctx_worker_flush_batches(w, true);
            bus__rcu_exit(&ctx->rcu, tok);
            continue;
        }
        if (atomic_load_explicit(&ctx->intake_done, memory_order_acquire)
            && !ring_nonempty(&w->q)) {
            uint32_t tok = bus__rcu_enter(&ctx->rcu);
            ctx_worker_flush_batches(w, false);
            bus__rcu_exit(&ctx->rcu, tok);
            break; /* closed and drained */
        }
        if (ctx_worker_has_pending_batches(w)) {
            uint32_t tok = bus__rcu_enter(&ctx->rcu);
            ctx_worker_idle(w);
            bus__rcu_exit(&ctx->rcu, tok);
        } else {
            ctx_worker_idle(w);
        }
    }
}

/* ---- Health checks and metrics ------------------------------------------------ */

/* "<name>.workers" (liveness): a worker with work queued whose queue head
 * has not moved for saturated_ms, judged between runs (a handler stuck or
 * deadlocked). Inline: reads atomics. Never concurrent with itself. */
static bus_health_status
ctx_check_workers(void *opaque, char *msg, size_t len)
{
    bus_ctx *ctx = opaque;
    uint64_t now = bus__clock_mono_ns();
    uint64_t lim = (uint64_t)ctx->cfg.saturated_ms * 1000000u;
    uint32_t i, stuck = 0, which = 0;

    for (i = 0; i < ctx->n_workers; i++) {
        ctx_worker *w = &ctx->workers[i];
        ctx_hstate *h = &ctx->hstate[i];
        uint64_t head = atomic_load_explicit(&w->q.head, memory_order_acquire);
        if (ring_depth(&w->q) == 0 || head != h->head) {
            h->head = head;
            h->stuck_since = 0;
        } else if (h->stuck_since == 0) {
            h->stuck_since = now;
        } else if (now - h->stuck_since >= lim) {
            if (stuck++ == 0)
                which = i;
        }
    }
    if (stuck > 0) {
        snprintf(msg, len,
                 "%u of %u workers made no progress for %d ms with work "
                 "queued (worker %u first)",
                 stuck, ctx->n_workers, ctx->cfg.saturated_ms, which);
        return BUS_HEALTH_UNHEALTHY;
    }
    snprintf(msg, len, "%u workers", ctx->n_workers);
    return BUS_HEALTH_HEALTHY;
}

/* "<name>.queues" (readiness): a queue at saturation_pct % of its
 * capacity or more for saturated_ms, judged between runs. */
static bus_health_status
ctx_check_queues(void *opaque, char *msg, size_t len)
{
    bus_ctx *ctx = opaque;
    uint64_t now = bus__clock_mono_ns();
    uint64_t lim = (uint64_t)ctx->cfg.saturated_ms * 1000000u;
    uint64_t cap = ctx->cfg.queue_capacity;
    uint64_t thr = cap * ctx->cfg.saturation_pct / 100, depth, most = 0;
    uint32_t i, sat = 0;

    if (thr == 0)
        thr = 1;
    for (i = 0; i < ctx->n_workers; i++) {
        ctx_hstate *h = &ctx->hstate[i];
        depth = ring_depth(&ctx->workers[i].q);
        if (depth > most)
            most = depth;
        if (depth < thr)
            h->sat_since = 0;
        else if (h->sat_since == 0)
            h->sat_since = now;
        else if (now - h->sat_since >= lim)
            sat++;
    }
    if (sat > 0) {
        snprintf(msg, len,
                 "%u of %u queues at >= %u%% of %llu for %d ms or more",
                 sat, ctx->n_workers, ctx->cfg.saturation_pct,
                 (unsigned long long)cap, ctx->cfg.saturated_ms);
        return BUS_HEALTH_UNHEALTHY;
    }
    snprintf(msg, len, "deepest queue %llu of %llu", (unsigned long long)most,
             (unsigned long long)cap);
    return BUS_HEALTH_HEALTHY;
}

/* "<name>.breakers" (both views): any breaker of a subscription's policy
 * (or of cfg.breakers) not CLOSED makes the bus DEGRADED: it works, some
 * deliveries are held back. */
static bus_health_status
ctx_check_breakers(void *opaque, char *msg, size_t len)
{
    bus_ctx *ctx = opaque;
    size_t n = 0, total = 0;
    char first[128] = "";
    bus_sub *s;

    bus__mutex_lock(&ctx->wmtx);
    for (s = ctx->subs; s != NULL; s = s->next) {
        if (s->breaker == NULL)
            continue;
        total++;
        if (bus_breaker_state_get(s->breaker) != BUS_BREAKER_CLOSED
            && n++ == 0)
            snprintf(first, sizeof(first), "%s (%s)",
                     bus_breaker_name(s->breaker),
                     bus_breaker_state_name(
                         bus_breaker_state_get(s->breaker)));
    }
    bus__mutex_unlock(&ctx->wmtx);
    if (ctx->cfg.breakers != NULL) {
        size_t k = bus_breaker_registry_open_count(ctx->cfg.breakers);
        if (k > 0 && n == 0)
            snprintf(first, sizeof(first), "of the registry");
        n += k;
    }
    if (n > 0) {
        snprintf(msg, len, "%zu breaker(s) not closed: %s", n, first);
        return BUS_HEALTH_DEGRADED;
    }
    snprintf(msg, len, "%zu subscription breaker(s) closed", total);
    return BUS_HEALTH_HEALTHY;
}

/* Registers the three checks. A failure is logged, not fatal: the bus
 * runs without that check. */
static void
ctx_health_register(bus_ctx *ctx)
{
    static const struct {
        const char *suffix;
        bus_health_fn fn;
        unsigned views;
    } checks[3] = {
        {"workers", ctx_check_workers, BUS_HEALTH_LIVENESS},
        {"queues", ctx_check_queues, BUS_HEALTH_READINESS},
        {"breakers", ctx_check_breakers, BUS_HEALTH_BOTH},
    };
    bus_health_check_config hc;
    char name[BUS_HEALTH_NAME_MAX];
    int rv;

    for (size_t i = 0; i < 3; i++) {
        bus_health_check_config_init(&hc);
        snprintf(name, sizeof(name), "%s.%s", ctx->name, checks[i].suffix);
        hc.name = name;
        hc.fn = checks[i].fn;
        hc.opaque = ctx;
        hc.views = checks[i].views;
        hc.run_inline = true;
        if ((rv = bus_health_register(ctx->cfg.health, &hc, &ctx->hc[i]))
            != BUS_OK)
            bus_logf(&ctx->cfg.log, BUS_LOG_ERR, "core",
                     "%s: health check %s not registered: %s", ctx->name,
                     name, bus_strerror(rv));
    }
}

static double
ctx_shard_depth_fn(void *opaque)
{
    return (double)ring_depth(opaque);
}

static double
ctx_sub_depth_fn(void *opaque)
{
    bus_sub *s = opaque;
    uint64_t deq = atomic_load_explicit(&s->deq, memory_order_acquire);
    uint64_t enq = atomic_load_explicit(&s->enq, memory_order_relaxed);

    return enq > deq ? (double)(enq - deq) : 0.0;
}

#define CTX_DEPTH_HELP                                                     \
    "Events waiting in the bus queues (subscription=\"\": a shard's queue; " \
    "shard=\"\": a subscription's events in all shards)."

/* bus_queue_depth{subscription="",shard="i"} for each worker queue. */
static void
ctx_metrics_register(bus_ctx *ctx)
{
    char shard[16];
    bus_label l[2] = {{"subscription", ""}, {"shard", shard}};

    ctx->shard_depth = bus__zalloc(sizeof(bus_gauge *) * ctx->n_workers);
    for (uint32_t i = 0; ctx->shard_depth != NULL && i < ctx->n_workers;
         i++) {
        snprintf(shard, sizeof(shard), "%u", i);
        (void)bus_metrics_gauge_fn(ctx->cfg.metrics, "bus_queue_depth",
                                   CTX_DEPTH_HELP, l, 2, ctx_shard_depth_fn,
                                   &ctx->workers[i].q, &ctx->shard_depth[i]);
    }
}

/* Per-broker series of a route or a link ({broker=scheme}). */
static ctx_bmetrics *
ctx_bmetrics_new(bus_ctx *ctx, bus_broker *b)
{
    bus_label l = {"broker", bus_broker_scheme(b)};
    ctx_bmetrics *bm;

    if (ctx->cfg.metrics == NULL || (bm = bus__zalloc(sizeof(*bm))) == NULL)
        return NULL;
    (void)bus_metrics_counter(ctx->cfg.metrics, "bus_broker_published_total",
                              "Events the bus published through a broker.",
                              &l, 1, &bm->published);
    (void)bus_metrics_hist(ctx->cfg.metrics,
                           "bus_broker_publish_latency_seconds",
                           "Time a broker's publish call took.", &l, 1,
                           &bm->latency);
    return bm;
}

static void
ctx_bmetrics_free(ctx_bmetrics *bm)
{
    if (bm == NULL)
        return;
    bus_counter_release(bm->published);
    bus_hist_release(bm->latency);
    bus__free(bm, sizeof(*bm));
}

static void
ctx_link_metrics(bus_ctx *ctx, ctx_link *l)
{
    bus_label lb = {"broker", bus_broker_scheme(l->broker)};

    if (ctx->cfg.metrics == NULL)
        return;
    (void)bus_metrics_counter(ctx->cfg.metrics, "bus_broker_acked_total",
                              "Deliveries the bus acknowledged to a broker "
                              "(handled or dead-lettered).",
                              &lb, 1, &l->acked);
    (void)bus_metrics_counter(ctx->cfg.metrics, "bus_broker_nacked_total",
                              "Deliveries the bus asked a broker to "
                              "redeliver.",
                              &lb, 1, &l->nacked);
    if (l->acked == NULL || l->nacked == NULL) {
        bus_counter_release(l->acked);
        bus_counter_release(l->nacked);
        l->acked = l->nacked = NULL;
    }
}

static void
ctx_link_free(ctx_link *l)
{
    bus_counter_release(l->acked);
    bus_counter_release(l->nacked);
    bus__free(l, sizeof(*l));
}

/* ---- Open and close --------------------------------------------------------- */

static void ctx_free(bus_ctx *ctx);
static void ctx_end_intake(bus_ctx *ctx);

int
bus_ctx_open(bus_ctx **out, const bus_ctx_config *cfg)
{
    bus_ctx *ctx;
    bus__tindex *ix;
    void *mem;
    uint32_t i;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if ((ctx = ctx_zalloc_lines(sizeof(*ctx), &mem)) == NULL)
        return BUS_ENOMEM;
    ctx->mem = mem;
    bus__rcu_init(&ctx->rcu);
    bus__mutex_init(&ctx->wmtx);
    bus__mutex_init(&ctx->tmtx);
    bus__cond_init(&ctx->tcond);
    if ((rv = ctx_config_resolve(&ctx->cfg, cfg)) != BUS_OK) {
        bus_logf(cfg ? &cfg->log : NULL, BUS_LOG_ERR, "core",
                 "bus_ctx_open: a config field is out of range (workers "
                 "1..%d, queue_capacity 2..%u, timeouts >= -1)",
                 CTX_MAX_WORKERS, CTX_MAX_QUEUE);
        goto fail;
    }
    rv = BUS_ENOMEM;
    if ((ctx->name = bus__strdup(ctx->cfg.name, &ctx->name_size)) == NULL)
        goto fail;
    ctx->cfg.name = ctx->name;
    if ((ix = bus__tindex_new(ctx->cfg.topic_cache)) == NULL)
        goto fail;
    atomic_init(&ctx->index, ix);
    if ((rv = bus__twheel_init(&ctx->wheel, CTX_TICK_NS, CTX_WHEEL_SLOTS,
                               bus_clock_now(&ctx->cfg.clock)))
        != BUS_OK)
        goto fail;
    rv = BUS_ENOMEM;
    ctx->n_workers = ctx->cfg.workers;
    if ((ctx->n_workers & (ctx->n_workers - 1)) == 0)
        ctx->worker_mask = ctx->n_workers - 1;
    ctx->workers = ctx_zalloc_lines(sizeof(ctx_worker) * ctx->n_workers,
                                    &ctx->workers_mem);
    if (ctx->workers == NULL)
        goto fail;
    if ((ctx->hstate = bus__zalloc(sizeof(ctx_hstate) * ctx->n_workers))
        == NULL)
        goto fail;
    for (i = 0; i < ctx->n_workers; i++) {
        ctx_worker *w = &ctx->workers[i];
        size_t k;
        w->ctx = ctx;
        w->index = i;
        bus__mutex_init(&w->mtx);
        bus__cond_init(&w->cond);
        if ((rv = ring_init(&w->q, ctx->cfg.queue_capacity)) != BUS_OK)
            goto fail;
        for (k = 0; k < CTX_MAX_BATCH_SUBS; k++) {
            w->batches[k].entries =
                bus__alloc(sizeof(ring_entry) * 4096); /* batch_max cap */
            if (w->batches[k].entries == NULL) {
                rv = BUS_ENOMEM;
                goto fail;
            }
        }
    }
    for (i = 0; i < ctx->n_workers; i++) {
        char tname[16];
        snprintf(tname, sizeof(tname), "bus-w%u", i);
        rv = bus__thread_start(&ctx->workers[i].thread, tname,
                               ctx_worker_main, &ctx->workers[i]);
        if (rv != BUS_OK)
            goto fail;
        ctx->workers[i].started = true;
    }
    if (ctx->cfg.metrics != NULL)
        ctx_metrics_register(ctx);
    if (ctx->cfg.health != NULL)
        ctx_health_register(ctx);
    *out = ctx;
    return BUS_OK;
fail:
    ctx_free(ctx);
    return rv;
}

void
bus_ctx_close_async(bus_ctx *ctx)
{
    uint32_t i;

    if (ctx == NULL)
        return;
    atomic_store_explicit(&ctx->closing, true, memory_order_seq_cst);
    for (i = 0; i < ctx->n_workers && ctx->workers != NULL; i++) {
        ctx_worker *w = &ctx->workers[i];
        if (w->q.slots == NULL)
            continue;
        bus__mutex_lock(&w->mtx);
        atomic_store_explicit(&w->sleeping, 0, memory_order_relaxed);
        bus__cond_signal(&w->cond);
        bus__mutex_unlock(&w->mtx);
    }
}

static uint64_t
ctx_queued_total(bus_ctx *ctx)
{
    uint64_t n = 0;
    uint32_t i;

    for (i = 0; i < ctx->n_workers; i++)
        n += ring_depth(&ctx->workers[i].q);
    return n;
}

/* Lets workers exit once drained. @thread closer, after a grace period
 * (no publisher still inside) or when no publisher can exist. */
static void
ctx_end_intake(bus_ctx *ctx)
{
    uint32_t i;

    atomic_store_explicit(&ctx->intake_done, true, memory_order_release);
    for (i = 0; i < ctx->n_workers && ctx->workers != NULL; i++) {
        ctx_worker *w = &ctx->workers[i];
        if (w->q.slots == NULL)
            continue;
        bus__mutex_lock(&w->mtx);
        bus__cond_signal(&w->cond);
        bus__mutex_unlock(&w->mtx);
    }
}

static void
sub_free(bus_sub *s)
{
    bus_gauge_release(s->depth); /* waits for a snapshot reading it */
    bus_chain_free(s->outer); /* before the counter its deadline uses */
    bus_counter_release(s->overruns);
    bus_chain_free(s->inner);
    bus__free(s->pattern, s->pattern_size);
    bus__free(s->name, s->name_size);
    bus__free(s->group, s->group_size);
    ctx_free_lines(s->mem, sizeof(*s));
}

static void ctx_unlink_brokers(bus_sub *s);

static void
ctx_free(bus_ctx *ctx)
{
    ctx_routes *routes;
    ctx_retired *r;
    bus_sub *s;
    uint32_t i;

    if (ctx == NULL)
        return;
    /* The checks and gauges read the workers and subscriptions: first. */
    for (i = 0; i < 3; i++)
        bus_health_deregister(ctx->hc[i]);
    for (i = 0; ctx->shard_depth != NULL && i < ctx->n_workers; i++)
        bus_gauge_release(ctx->shard_depth[i]);
    if (ctx->shard_depth != NULL)
        bus__free(ctx->shard_depth, sizeof(bus_gauge *) * ctx->n_workers);
    bus_ctx_close_async(ctx);
    ctx_end_intake(ctx);
    for (i = 0; ctx->workers != NULL && i < ctx->n_workers; i++) {
        if (ctx->workers[i].started)
            bus__thread_join(&ctx->workers[i].thread);
        ctx->workers[i].started = false;
    }
    /* Parked retries name subscriptions and links: before those go. */
    ctx_timer_stop(ctx);
    (void)bus__twheel_fini(&ctx->wheel); /* empty now */
    for (i = 0; ctx->workers != NULL && i < ctx->n_workers; i++) {
        ctx_worker *w = &ctx->workers[i];
        size_t k;
        if (w->q.slots != NULL) {
            ring_entry e;
            /* Anything left (only when the drain was cut short). */
            while (ring_pop(&w->q, &e, 1) == 1) {
                if (e.sub == NULL)
                    continue;
                ctx_drop_entry(ctx, &e, true);
                atomic_fetch_add_explicit(&e.sub->deq, 1,
                                          memory_order_relaxed);
            }
            ring_fini(&w->q);
        }
        for (k = 0; k < CTX_MAX_BATCH_SUBS; k++)
            bus__free(w->batches[k].entries, sizeof(ring_entry) * 4096);
        bus__cond_fini(&w->cond);
        bus__mutex_fini(&w->mtx);
    }
    ctx_free_lines(ctx->workers_mem, sizeof(ctx_worker) * ctx->n_workers);
    if (ctx->hstate != NULL)
        bus__free(ctx->hstate, sizeof(ctx_hstate) * ctx->n_workers);
    while ((s = ctx->subs) != NULL) {
        ctx->subs = s->next;
        ctx_unlink_brokers(s);
        sub_free(s);
    }
    /* Workers are joined and their queues emptied: no entry names a
     * link any more. */
    ctx_unlink_list(ctx->retired_links);
    ctx->retired_links = NULL;
    while ((s = ctx->zombies) != NULL) {
        ctx->zombies = s->next;
        ctx_unlink_brokers(s);
        sub_free(s);
    }
    while ((r = ctx->retired) != NULL) {
        ctx->retired = r->next;
        ctx_free_retired(r);
    }
    bus__tindex_release(atomic_load(&ctx->index));
    routes = atomic_load(&ctx->routes);
    if (routes != NULL) {
        for (i = 0; i < routes->n; i++) {
            bus__free(routes->r[i].pattern, routes->r[i].pattern_size);
            ctx_bmetrics_free(routes->r[i].bm);
        }
        bus__free(routes, ctx->routes_size);
    }
    bus__free(ctx->name, ctx->name_size);
    bus__cond_fini(&ctx->tcond);
    bus__mutex_fini(&ctx->tmtx);
    bus__mutex_fini(&ctx->wmtx);
    bus__rcu_fini(&ctx->rcu);
    ctx_free_lines(ctx->mem, sizeof(*ctx));
}

uint64_t
bus_ctx_close(bus_ctx *ctx)
{
    uint64_t deadline = 0, dropped;
    ctx_routes *routes;
    uint32_t i;

    if (ctx == NULL)
        return 0;
    if (bus__rcu_in_section(&ctx->rcu)) {
        /* From a handler of this context: joining would deadlock. */
        bus_logf(&ctx->cfg.log, BUS_LOG_ERR, "core",
                 "bus_ctx_close called from a handler; use close_async");
        bus_ctx_close_async(ctx);
        return 0;
    }
    /* The drain deadline runs from now. Workers check it themselves
     * (ctx_drain_expired): the grace period below waits for the handlers
     * running now, however long they take. */
    if (ctx->cfg.close_timeout_ms >= 0) {
        deadline = bus__clock_mono_ns()
                 + (uint64_t)ctx->cfg.close_timeout_ms * 1000000u;
        atomic_store_explicit(&ctx->drain_deadline, deadline,
                              memory_order_release);
    }
    bus_ctx_close_async(ctx);
    /* Publishers and broker deliveries that passed the closing check are
     * in read sections; after this none is (later ones see closing and
     * are refused), so workers may exit once drained. */
    bus__rcu_synchronize(&ctx->rcu);
    ctx_end_intake(ctx);
    if (deadline != 0) {
        while (ctx_queued_total(ctx) > 0
               && bus__clock_mono_ns() < deadline)
            bus__sleep_ns(200000);
        if (ctx_queued_total(ctx) > 0)
            atomic_store_explicit(&ctx->abort_drain, true,
                                  memory_order_release);
    }
    for (i = 0; i < ctx->n_workers; i++) {
        bus__thread_join(&ctx->workers[i].thread);
        ctx->workers[i].started = false;
    }
    /* Parked retries hold their links: dropped before the detach below
     * waits for the links to be free. */
    ctx_timer_stop(ctx);
    /* Brokers last: the queued deliveries drained above acked through
     * their links. Detaching swaps the routes array: re-read each time. */
    for (;;) {
        bus_broker *b = NULL;
        bus__mutex_lock(&ctx->wmtx);
        routes = atomic_load_explicit(&ctx->routes, memory_order_relaxed);
        if (routes != NULL && routes->n > 0)
            b = routes->r[0].broker;
        bus__mutex_unlock(&ctx->wmtx);
        if (b == NULL)
            break;
        bus_ctx_detach(ctx, b);
    }
    dropped = atomic_load(&ctx->dropped_at_close);
    if (dropped > 0)
        bus_logf(&ctx->cfg.log, BUS_LOG_WARN, "core",
                 "%s: close deadline (%d ms) passed: %llu queued events "
                 "dropped",
                 ctx->name, ctx->cfg.close_timeout_ms,
                 (unsigned long long)dropped);
    ctx_free(ctx);
    return dropped;
}

/* ---- Subscriptions ------------------------------------------------------------ */

static int
ctx_link_broker(bus_sub *s, bus_broker *b, const char *route);

/* Appends src's middlewares to c, not owning their states (src's owner
 * frees them). */
static int
ctx_chain_copy(bus_chain *c, const bus_chain *src)
{
    const bus_middleware *v;
    size_t n, i;
    int rv;

    v = bus__chain_items(src, &n);
    for (i = 0; i < n; i++) {
        bus_middleware m = v[i];
        m.free_state = NULL;
        if ((rv = bus_chain_append(c, &m)) != BUS_OK)
            return rv;
    }
    return BUS_OK;
}

/* Composes the chains s runs (see the top): outer = [metrics] + the
 * context's chain; inner = [policy] + the subscription's chain +
 * [deadline]. Both NULL: the plain call. The policy's hooks are ours. */
static int
ctx_sub_pipeline(bus_ctx *ctx, bus_sub *s, const bus_sub_config *c)
{
    bus_middleware mw;
    int rv = BUS_OK;

    if (s->batch_fn != NULL)
        return BUS_OK; /* no per-delivery pipeline (docs/bus.md) */
    if (ctx->cfg.metrics != NULL || bus_chain_len(ctx->cfg.chain) > 0) {
        if ((rv = bus_chain_new(&s->outer)) != BUS_OK)
            return rv;
        if (ctx->cfg.metrics != NULL)
            rv = bus__chain_add(s->outer,
                               bus_mw_metrics(&mw, ctx->cfg.metrics, s->name),
                               &mw);
        if (rv == BUS_OK)
            rv = ctx_chain_copy(s->outer, ctx->cfg.chain);
    }
    if (rv == BUS_OK
        && (c->policy != NULL || c->deadline_ms > 0
            || bus_chain_len(c->chain) > 0)) {
        if ((rv = bus_chain_new(&s->inner)) != BUS_OK)
            return rv;
        if (c->policy != NULL) {
            bus_failure_policy p = *c->policy;
            if (c->dlq_topic != NULL)
                p.dlq_topic = c->dlq_topic;
            if (p.dlq_publish == NULL) {
                p.dlq_publish = ctx_dlq_publish;
                p.dlq_opaque = s;
            }
            /* Inline handlers run in the publisher's thread, which has no
             * queue to come back to: they retry in place. */
            p.defer = s->inline_ ? NULL : ctx_defer;
            p.defer_opaque = s;
            if (p.log.fn == NULL)
                p.log = ctx->cfg.log;
            s->breaker = p.breaker;
            s->pclock = p.clock;
            s->can_defer = p.defer != NULL;
            rv = bus__chain_add(s->inner, bus_mw_policy(&mw, &p), &mw);
        }
        if (rv == BUS_OK)
            rv = ctx_chain_copy(s->inner, c->chain);
        if (rv == BUS_OK && c->deadline_ms > 0) {
            bus_label l = {"subscription", s->name};
            if (ctx->cfg.metrics != NULL)
                (void)bus_metrics_counter(
                    ctx->cfg.metrics, "bus_handler_overruns_total",
                    "Handler calls that ran past their deadline.", &l, 1,
                    &s->overruns); /* none on failure: logged only */
            rv = bus__chain_add(s->inner,
                               bus_mw_deadline(&mw, c->deadline_ms,
                                               &ctx->cfg.log, s->overruns,
                                               c->policy ? &c->policy->clock
                                                         : NULL),
                               &mw);
        }
    }
    s->piped = s->outer != NULL || s->inner != NULL;
    return rv;
}

static int
ctx_sub_config(bus_ctx *ctx, bus_sub *s, const char *pattern,
               const bus_sub_config *cfg)
{
    bus_sub_config c;
    bus_backpressure bp;

    bus_sub_config_init(&c);
    if (cfg != NULL) {
        c.name = cfg->name;
        if (cfg->dispatch != BUS_DISPATCH_DEFAULT)
            c.dispatch = cfg->dispatch;
        c.backpressure = cfg->backpressure;
        c.block_timeout_ms = cfg->block_timeout_ms;
        c.key_fn = cfg->key_fn;
        c.key_opaque = cfg->key_opaque;
        c.batch_fn = cfg->batch_fn;
        if (cfg->batch_max != 0)
            c.batch_max = cfg->batch_max;
        c.batch_linger_us = cfg->batch_linger_us;
        c.group = cfg->group;
        if (CTX_CFG_HAS(cfg, bus_sub_config, dlq_topic)) {
            c.chain = cfg->chain;
            c.policy = cfg->policy;
            c.deadline_ms = cfg->deadline_ms;
            c.dlq_topic = cfg->dlq_topic;
        }
    }
    if (c.dispatch > BUS_DISPATCH_QUEUED || c.backpressure > BUS_BP_FAIL
        || c.block_timeout_ms < -1 || c.batch_max > 4096
        || (c.batch_fn != NULL && c.dispatch == BUS_DISPATCH_INLINE)
        || c.deadline_ms < 0
        || (c.batch_fn != NULL
            && (c.chain != NULL || c.policy != NULL || c.deadline_ms != 0)))
        return BUS_EINVAL;
    s->inline_ = c.dispatch == BUS_DISPATCH_INLINE;
    bp = c.backpressure != BUS_BP_DEFAULT ? c.backpressure
                                          : ctx->cfg.backpressure;
    s->fail_fast = bp == BUS_BP_FAIL;
    s->block_timeout_ms = c.block_timeout_ms != 0 ? c.block_timeout_ms
                                                  : ctx->cfg.block_timeout_ms;
    s->key_fn = c.key_fn;
    s->key_opaque = c.key_opaque;
    s->batch_fn = c.batch_fn;
    s->batch_max = c.batch_max;
    s->batch_linger_us = c.batch_linger_us;
    if ((s->name = bus__strdup(c.name ? c.name : pattern, &s->name_size))
        == NULL)
        return BUS_ENOMEM;
    if (c.group != NULL
        && (s->group = bus__strdup(c.group, &s->group_size)) == NULL)
        return BUS_ENOMEM;
    return ctx_sub_pipeline(ctx, s, &c);
}

int
bus_subscribe(bus_ctx *ctx, const char *pattern, bus_handler_fn fn,
              void *opaque, const bus_sub_config *cfg, bus_sub **out)
{
    char err[128];
    bus__tindex *old, *nix;
    ctx_routes *routes;
    bus_sub *s;
    void *mem;
    size_t i;
    int rv;

    if (out != NULL)
        *out = NULL;
    if (ctx == NULL || pattern == NULL
        || (fn == NULL && (cfg == NULL || cfg->batch_fn == NULL)))
        return BUS_EINVAL;
    if (bus__topic_check(pattern, true, err, sizeof(err)) != BUS_OK) {
        bus_logf(&ctx->cfg.log, BUS_LOG_ERR, "core",
                 "subscribe: invalid pattern '%s': %s", pattern, err);
        return BUS_EINVAL;
    }
    if (atomic_load_explicit(&ctx->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if ((s = ctx_zalloc_lines(sizeof(*s), &mem)) == NULL)
        return BUS_ENOMEM;
    s->mem = mem;
    s->ctx = ctx;
    s->fn = fn;
    s->opaque = opaque;
    if ((rv = ctx_sub_config(ctx, s, pattern, cfg)) != BUS_OK
        || (rv = BUS_ENOMEM,
            (s->pattern = bus__strdup(pattern, &s->pattern_size)) == NULL)) {
        sub_free(s);
        return rv;
    }

    if (ctx->cfg.metrics != NULL && s->batch_fn == NULL) {
        bus_label l[2] = {{"subscription", s->name}, {"shard", ""}};
        /* EEXIST (two subscriptions of one name): the first one's. */
        (void)bus_metrics_gauge_fn(ctx->cfg.metrics, "bus_queue_depth",
                                   CTX_DEPTH_HELP, l, 2, ctx_sub_depth_fn,
                                   s, &s->depth);
    }

    bus__mutex_lock(&ctx->wmtx);
    if (s->can_defer && (rv = ctx_timer_start(ctx)) != BUS_OK) {
        bus__mutex_unlock(&ctx->wmtx);
        sub_free(s);
        return rv;
    }
    /* Brokers first: if one refuses, nothing is visible yet. */
    routes = atomic_load_explicit(&ctx->routes, memory_order_relaxed);
    for (i = 0; routes != NULL && i < routes->n; i++) {
        rv = ctx_link_broker(s, routes->r[i].broker, routes->r[i].pattern);
        if (rv != BUS_OK) {
            bus__mutex_unlock(&ctx->wmtx);
            ctx_unlink_brokers(s);
            sub_free(s);
            return rv;
        }
    }
    old = atomic_load_explicit(&ctx->index, memory_order_relaxed);
    rv = bus__tindex_add(old, s->pattern, s, &nix);
    if (rv == BUS_OK && (rv = ctx_retire(ctx, old, NULL, 0)) != BUS_OK)
        bus__tindex_release(nix);
    if (rv != BUS_OK) {
        bus__mutex_unlock(&ctx->wmtx);
        ctx_unlink_brokers(s);
        sub_free(s);
        return rv;
    }
    /* release: the new snapshot's contents before its pointer. */
    atomic_store_explicit(&ctx->index, nix, memory_order_seq_cst);
    s->next = ctx->subs;
    ctx->subs = s;
    atomic_fetch_add_explicit(&ctx->n_subs, 1, memory_order_relaxed);
    bus__mutex_unlock(&ctx->wmtx);
    ctx_reclaim(ctx, false);
    if (out != NULL)
        *out = s;
    return BUS_OK;
}

int
bus_unsubscribe(bus_sub *s)
{
    bus__tindex *old, *nix;
    ctx_link *l;
    bus_ctx *ctx;
    bus_sub **ps;
    int rv;

    if (s == NULL)
        return BUS_EINVAL;
    ctx = s->ctx;
    /* seq_cst: pairs with the dispatchers' check (see the top comment). */
    atomic_store_explicit(&s->dead, true, memory_order_seq_cst);
    bus__mutex_lock(&ctx->wmtx);
    old = atomic_load_explicit(&ctx->index, memory_order_relaxed);
    rv = bus__tindex_remove(old, s->pattern, s, &nix);
    if (rv == BUS_OK && (rv = ctx_retire(ctx, old, NULL, 0)) != BUS_OK)
        bus__tindex_release(nix);
    if (rv != BUS_OK) {
        /* ENOMEM: the entry stays in the table but is dead, so it is
         * never called; it is freed with the context. */
        bus__mutex_unlock(&ctx->wmtx);
        return rv == BUS_ENOTFOUND ? BUS_EINVAL : rv;
    }
    atomic_store_explicit(&ctx->index, nix, memory_order_seq_cst);
    for (ps = &ctx->subs; *ps != NULL; ps = &(*ps)->next) {
        if (*ps == s) {
            *ps = s->next;
            break;
        }
    }
    /* Deliveries through s's links are refused from now on; the links
     * stay with s (a handler still running, or an entry still queued,
     * acks through them) and are unlinked when s is freed. seq_cst:
     * pairs with ctx_deliver's check, as dead does. */
    for (l = s->links; l != NULL; l = l->next)
        atomic_store_explicit(&l->gone, true, memory_order_seq_cst);
    atomic_fetch_sub_explicit(&ctx->n_subs, 1, memory_order_relaxed);
    /* A reclaim frees s (and unlinks its brokers) once a grace period
     * that starts after this point has passed, so no handler call, no
     * publisher and no delivery that saw s alive is still running, and
     * no queue entry names s (s->enq == s->deq). */
    s->retired_at = ++ctx->grace_seq;
    s->next = ctx->zombies;
    ctx->zombies = s;
    bus__mutex_unlock(&ctx->wmtx);
    /* Waits for that grace period: afterwards no call of the handler is
     * running and none can start. Then for the workers to release the
     * entries still queued for s (they drop them), so that s's broker
     * subscriptions end before we return: a backend that sees its
     * deliveries refused may hold back others until then (Kafka pauses
     * the partition). Inside a handler it cannot wait (rcu.h) and s is
     * left to a later reclaim: see docs/bus.md. */
    for (;;) {
        bus_sub *z;
        bool pending = false;
        ctx_reclaim(ctx, true);
        if (bus__rcu_in_section(&ctx->rcu))
            break;
        /* After that grace period no handler of s can park a retry: take
         * back those parked (a retry being fired now reaches a worker,
         * which drops it). */
        ctx_redo_drop_list(
            ctx, bus__twheel_remove_if(&ctx->wheel, ctx_redo_of_sub, s),
            false);
        bus__mutex_lock(&ctx->wmtx);
        for (z = ctx->zombies; z != NULL && !pending; z = z->next)
            pending = z == s;
        bus__mutex_unlock(&ctx->wmtx);
        if (!pending)
            break;
        bus__sleep_ns(50000);
    }
    return BUS_OK;
}

/* ---- Dispatch -------------------------------------------------------------------- */

static uint64_t
ctx_default_key(const bus_event *ev)
{
    if (ev->stream != NULL)
        return bus__hash(ev->stream, ev->stream_len);
    return bus__hash(ev->id.b, sizeof(ev->id.b));
}

/* Claims one slot for s in its worker's ring, applying s's backpressure
 * policy; *deadline (0: not started) is shared by the waits of one
 * dispatch. The caller must hold no other uncommitted claim (see
 * ctx_dispatch). @thread publisher, inside a read section. */
static int
ctx_claim(bus_ctx *ctx, bus_sub *s, ctx_worker *w, unsigned flags,
          uint64_t *deadline, uint64_t *pos)
{
    uint64_t spins = 0;

    for (;;) {
        if (ring_claim(&w->q, pos))
            return BUS_OK;
        if (s->fail_fast || (flags & BUS_PUB_NONBLOCK))
            return BUS_EAGAIN;
        if (atomic_load_explicit(&ctx->closing, memory_order_acquire))
            return BUS_ECLOSED;
        if (*deadline == 0)
            *deadline = s->block_timeout_ms < 0
                          ? UINT64_MAX
                          : bus__clock_mono_ns()
                                + (uint64_t)s->block_timeout_ms * 1000000u;
        else if (bus__clock_mono_ns() >= *deadline)
            return BUS_EAGAIN;
        ctx_wake(ctx, w);
        if (++spins < 100)
            bus__cpu_relax();
        else if (spins < 200)
            bus__thread_yield();
        else
            bus__sleep_ns(50000);
    }
}

typedef struct ctx_claimed {
    bus_sub *sub;
    ctx_worker *w;
    uint64_t pos;
} ctx_claimed;

/* Gives claimed slots back as no-op entries. */
static void
ctx_abandon(ctx_claimed *cl, size_t n)
{
    ring_entry nop = {0};
    size_t i;

    for (i = 0; i < n; i++)
        ring_commit(&cl[i].w->q, cl[i].pos, &nop);
}

/* Delivers ev (topic set, frozen; one reference owned by the caller) to
 * the subscriptions in subs. On BUS_OK the caller's reference was
 * consumed; on error no subscription got it and the reference is still
 * the caller's. @thread publisher or broker delivery, in a read section. */
static int
ctx_dispatch(bus_ctx *ctx, bus_sub *const *subs, size_t n, bus_event *ev,
             unsigned flags, ctx_link *link, uint64_t token)
{
    ctx_claimed small[CTX_LOOKUP_STACK], *cl = small, held = {0};
    size_t n_claimed, n_inline, i, held_i = SIZE_MAX;
    uint64_t dkey = 0, deadline = 0;
    bool have_dkey = false;
    int rv = BUS_OK;

    if (n > CTX_LOOKUP_STACK
        && (cl = bus__alloc(sizeof(*cl) * n)) == NULL)
        return BUS_ENOMEM;
    /* Claim a slot in every queue first, then commit them all, so that a
     * full queue refuses the event as a whole. A claim that has to wait
     * for room never waits while this thread holds other uncommitted
     * claims: the consumer stops at an uncommitted slot, so the room
     * could be behind our own claim (or behind that of a publisher
     * waiting for us), and nothing would move until the deadline. It
     * gives them back, waits for that one slot alone, and starts over. */
restart:
    n_claimed = 0;
    n_inline = 0;
    if (held_i != SIZE_MAX) {
        if (atomic_load_explicit(&held.sub->dead, memory_order_seq_cst)) {
            ctx_abandon(&held, 1);
            held_i = SIZE_MAX;
        } else {
            cl[n_claimed++] = held;
        }
    }
    for (i = 0; i < n; i++) {
        bus_sub *s = subs[i];
        ctx_worker *w;
        uint64_t key, pos;
        if (i == held_i)
            continue;
        if (atomic_load_explicit(&s->dead, memory_order_seq_cst))
            continue;
        if (s->inline_) {
            n_inline++;
            continue;
        }
        if (s->key_fn != NULL) {
            key = s->key_fn(ev, s->key_opaque);
        } else {
            if (!have_dkey) {
                dkey = ctx_default_key(ev);
                have_dkey = true;
            }
            key = dkey;
        }
        /* A mask when the count is a power of two (the default): a
         * 64-bit division costs tens of cycles per event. */
        w = &ctx->workers[ctx->worker_mask != 0 || ctx->n_workers == 1
                              ? key & ctx->worker_mask
                              : key % ctx->n_workers];
        if (!ring_claim(&w->q, &pos)) {
            ctx_abandon(cl, n_claimed);
            n_claimed = 0;
            held_i = SIZE_MAX;
            rv = ctx_claim(ctx, s, w, flags, &deadline, &pos);
            if (rv != BUS_OK)
                break;
            held = (ctx_claimed){s, w, pos};
            held_i = i;
            goto restart;
        }
        cl[n_claimed++] = (ctx_claimed){s, w, pos};
    }
    if (rv != BUS_OK) {
        if (rv == BUS_EAGAIN)
            CTX_STAT(ctx, rejected_full, 1);
        if (cl != small)
            bus__free(cl, sizeof(*cl) * n);
        return rv;
    }
    /* References: one per queue entry; the caller's own is kept for the
     * inline calls (workers may finish first) and dropped at the end. */
    if (n_claimed > 0) {
        uint32_t extra = (uint32_t)n_claimed - (n_inline > 0 ? 0 : 1);
        if (extra > 0)
            atomic_fetch_add_explicit(&ev->refs, extra,
                                      memory_order_relaxed);
    }
    if (link != NULL && n_claimed > 0) /* before the workers see them */
        atomic_fetch_add_explicit(&link->pending, n_claimed,
                                  memory_order_relaxed);
    for (i = 0; i < n_claimed; i++) {
        ring_entry e = {ev, cl[i].sub, link, token, NULL};
        atomic_fetch_add_explicit(&cl[i].sub->enq, 1, memory_order_relaxed);
        ring_commit(&cl[i].w->q, cl[i].pos, &e);
    }
    for (i = 0; i < n_claimed; i++)
        if (i == 0 || cl[i].w != cl[i - 1].w)
            ctx_wake(ctx, cl[i].w);
    if (cl != small)
        bus__free(cl, sizeof(*cl) * n);
    if (n_inline > 0) {
        for (i = 0; i < n; i++) {
            bus_sub *s = subs[i];
            /* seq_cst: pairs with unsubscribe's store of dead. */
            if (!s->inline_
                || atomic_load_explicit(&s->dead, memory_order_seq_cst))
                continue;
            ctx_call(s, ev, link, token, NULL);
        }
    }
    if (n_claimed == 0 || n_inline > 0)
        bus_event_unref(ev);
    return BUS_OK;
}

/* ---- Deferred retries ------------------------------------------------------ */

static inline ctx_worker *
ctx_worker_of(bus_ctx *ctx, bus_sub *s, const bus_event *ev)
{
    uint64_t key = s->key_fn != NULL ? s->key_fn(ev, s->key_opaque)
                                     : ctx_default_key(ev);

    return &ctx->workers[ctx->worker_mask != 0 || ctx->n_workers == 1
                             ? key & ctx->worker_mask
                             : key % ctx->n_workers];
}

/* A parked retry is due: queue it to the worker of its key, where it
 * waits behind what that worker has (never ahead of it). A full queue
 * puts it back on the wheel for the next tick: the timer thread never
 * blocks. @thread timer (or the closer). */
static void
ctx_redo_fire(bus__timer *t, void *arg)
{
    ctx_redo *r = (ctx_redo *)t; /* t is its first member */
    bus_ctx *ctx = arg;
    ctx_worker *w = ctx_worker_of(ctx, r->sub, r->ev);
    ring_entry e = {r->ev, r->sub, r->link, r->token, r};
    uint64_t pos;

    if (!ring_claim(&w->q, &pos)) {
        r->t.due_ns = bus_clock_now(&ctx->cfg.clock);
        bus__twheel_add(&ctx->wheel, &r->t);
        return;
    }
    ring_commit(&w->q, pos, &e);
    atomic_fetch_sub_explicit(&ctx->parked, 1, memory_order_relaxed);
    ctx_wake(ctx, w);
}

/* The policy's defer hook (policy.h) of a queued subscription: parks the
 * delivery on the wheel; the worker goes on with other events. Takes what
 * a queue entry owns (see ctx_redo). A retry after a failure is the next
 * attempt; one deferred because the breaker refused it (the handler was
 * not called) keeps its number. @thread worker, in the handler's call. */
static int
ctx_defer(void *opaque, bus_delivery *d, uint64_t due_ns)
{
    bus_sub *s = opaque;
    bus_ctx *ctx = s->ctx;
    const ctx_owner *own = d->owner;
    uint64_t pnow, delay;
    ctx_redo *r;

    if (own == NULL || own->sub != s)
        return BUS_EINVAL; /* not a delivery of ours: retry in place */
    if ((r = bus__zalloc(sizeof(*r))) == NULL)
        return BUS_ENOMEM;
    /* due_ns is on the policy's clock, the wheel on the context's. */
    pnow = bus_clock_now(&s->pclock);
    delay = due_ns > pnow ? due_ns - pnow : 0;
    r->t.due_ns = bus_clock_now(&ctx->cfg.clock) + delay;
    r->t.fn = ctx_redo_fire;
    r->t.arg = ctx;
    r->ev = bus_event_ref(d->event);
    r->sub = s;
    r->link = own->link;
    r->token = own->token;
    r->attempt = (d->flags & BUS_DELIVERY_F_BREAKER) ? d->attempt
                                                     : d->attempt + 1;
    r->first_fail_ns = d->first_fail_ns;
    r->first_fail_wall = d->first_fail_wall;
    /* Relaxed: s and the link are alive (we are in s's handler, whose
     * entry holds both); reclaim reads these after a grace period. */
    atomic_fetch_add_explicit(&s->enq, 1, memory_order_relaxed);
    if (r->link != NULL)
        atomic_fetch_add_explicit(&r->link->pending, 1,
                                  memory_order_relaxed);
    atomic_fetch_add_explicit(&ctx->parked, 1, memory_order_relaxed);
    bus__twheel_add(&ctx->wheel, &r->t);
    bus__mutex_lock(&ctx->tmtx);
    ctx->tkick = true;
    bus__cond_signal(&ctx->tcond);
    bus__mutex_unlock(&ctx->tmtx);
    return BUS_OK;
}

/* The policy's dead-letter sink: a publish on the same context, so an
 * attached broker whose route matches carries it. Never blocks. */
static int
ctx_dlq_publish(void *opaque, const char *topic, bus_event *ev)
{
    bus_sub *s = opaque;

    return bus_publish(s->ctx, topic, ev, BUS_PUB_NONBLOCK);
}

/* Drops parked retries taken off the wheel: released, counted, not acked
 * (an at-least-once broker redelivers). Returns how many. */
static uint64_t
ctx_redo_drop_list(bus_ctx *ctx, bus__timer *t, bool at_close)
{
    uint64_t n = 0;

    while (t != NULL) {
        ctx_redo *r = (ctx_redo *)t;
        bus_sub *s = r->sub;
        ring_entry e = {r->ev, s, r->link, r->token, r};
        t = t->next;
        ctx_drop_entry(ctx, &e, at_close); /* frees r */
        atomic_fetch_sub_explicit(&ctx->parked, 1, memory_order_relaxed);
        /* release: our last use of s happens-before its reclamation. */
        atomic_fetch_add_explicit(&s->deq, 1, memory_order_release);
        n++;
    }
    return n;
}

static bool
ctx_redo_of_sub(bus__timer *t, void *arg)
{
    return ((ctx_redo *)t)->sub == arg;
}

static bool
ctx_redo_of_broker(bus__timer *t, void *arg)
{
    ctx_redo *r = (ctx_redo *)t;

    return r->link != NULL && r->link->broker == arg;
}

static bool
ctx_redo_any(bus__timer *t, void *arg)
{
    (void)t;
    (void)arg;
    return true;
}

/* Advances the wheel every tick while it holds retries, else sleeps until
 * one is parked. The wheel runs on cfg.clock: with a test clock, time
 * moves when the test says and this thread only looks every tick. */
static void
ctx_timer_main(void *arg)
{
    bus_ctx *ctx = arg;
    bool busy;

    bus__mutex_lock(&ctx->tmtx);
    while (!ctx->tstop) {
        ctx->tkick = false;
        bus__mutex_unlock(&ctx->tmtx);
        bus__twheel_advance(&ctx->wheel, bus_clock_now(&ctx->cfg.clock));
        busy = bus__twheel_count(&ctx->wheel) > 0;
        bus__mutex_lock(&ctx->tmtx);
        if (ctx->tstop || ctx->tkick)
            continue;
        bus__cond_wait_until(&ctx->tcond, &ctx->tmtx,
                             bus__clock_mono_ns()
                                 + (busy ? CTX_TICK_NS : 1000000000u));
    }
    bus__mutex_unlock(&ctx->tmtx);
}

/* Starts the timer thread once. @locks ctx->wmtx held. */
static int
ctx_timer_start(bus_ctx *ctx)
{
    int rv;

    if (ctx->timer_started)
        return BUS_OK;
    rv = bus__thread_start(&ctx->timer, "bus-timer", ctx_timer_main, ctx);
    if (rv == BUS_OK)
        ctx->timer_started = true;
    return rv;
}

/* Stops the timer thread and drops what is still parked, then what it
 * queued after the workers stopped. @thread closer, workers joined. */
static void
ctx_timer_stop(bus_ctx *ctx)
{
    uint64_t n;

    if (ctx->wheel.slots == NULL)
        return;
    bus__mutex_lock(&ctx->tmtx);
    ctx->tstop = true;
    bus__cond_signal(&ctx->tcond);
    bus__mutex_unlock(&ctx->tmtx);
    if (ctx->timer_started) {
        bus__thread_join(&ctx->timer);
        ctx->timer_started = false;
    }
    n = ctx_redo_drop_list(
        ctx, bus__twheel_remove_if(&ctx->wheel, ctx_redo_any, NULL), true);
    if (n > 0)
        bus_logf(&ctx->cfg.log, BUS_LOG_WARN, "core",
                 "%s: %llu deferred retries still parked at close dropped "
                 "(not acked: a broker with redelivery delivers them again)",
                 ctx->name, (unsigned long long)n);
    for (uint32_t i = 0; ctx->workers != NULL && i < ctx->n_workers; i++) {
        ctx_worker *w = &ctx->workers[i];
        ring_entry e;
        if (w->q.slots == NULL)
            continue;
        /* Retries the timer queued after the worker had left. */
        while (ring_pop(&w->q, &e, 1) == 1) {
            if (e.sub == NULL)
                continue;
            ctx_drop_entry(ctx, &e, true);
            atomic_fetch_add_explicit(&e.sub->deq, 1, memory_order_release);
        }
    }
}

/* Makes sure ev is frozen and carries topic; may replace *evp by a clone
 * (a frozen event published again on another topic). */
static int
ctx_prepare_event(bus_event **evp, const char *topic, size_t len)
{
    bus_event *ev = *evp, *c;
    int rv;

    if (bus__event_topic_is(ev, topic, len)) {
        bus_event_freeze(ev);
        return BUS_OK;
    }
    if (!bus__event_is_frozen(ev)) {
        if ((rv = bus__event_set_topic(ev, topic, len)) != BUS_OK)
            return rv;
        bus_event_freeze(ev);
        return BUS_OK;
    }
    /* Rare: republished elsewhere. The clone carries the new topic. */
    if ((rv = bus_event_clone(&c, ev)) != BUS_OK)
        return rv;
    if ((rv = bus__event_set_topic(c, topic, len)) != BUS_OK) {
        bus_event_unref(c);
        return rv;
    }
    bus_event_freeze(c);
    *evp = c;
    return BUS_OK;
}

/* Several brokers may take one publish: the user's ack runs once, when
 * the last one answered, with the first error. */
typedef struct ctx_ack_join {
    _Atomic uint32_t pending;
    _Atomic int err;
    bus_ack_fn fn;
    void *opaque;
} ctx_ack_join;

static void
ctx_ack_join_fn(void *opaque, bus_event *ev, int err)
{
    ctx_ack_join *j = opaque;
    int expected = BUS_OK;

    if (err != BUS_OK)
        atomic_compare_exchange_strong(&j->err, &expected, err);
    /* acq_rel: the last one sees every earlier error store. */
    if (atomic_fetch_sub_explicit(&j->pending, 1, memory_order_acq_rel)
        == 1) {
        j->fn(j->opaque, ev, atomic_load(&j->err));
        bus__free(j, sizeof(*j));
    }
}

/* Publishes through the brokers whose route matches. @thread publisher,
 * inside a read section. */
static int
ctx_publish_routed(bus_ctx *ctx, const ctx_routes *routes,
                   const char *topic, bus_event *ev, unsigned flags,
                   bus_ack_fn fn, void *opaque, bool *routed)
{
    bus_broker *match[8];
    ctx_bmetrics *bm[8];
    size_t n = 0, i, sent = 0;
    ctx_ack_join *j = NULL;
    uint64_t t0 = 0;
    int rv = BUS_OK;

    (void)ctx;
    for (i = 0; i < routes->n && n < 8; i++)
        if (bus__topic_match(routes->r[i].pattern, topic)) {
            bm[n] = routes->r[i].bm;
            match[n++] = routes->r[i].broker;
        }
    *routed = n > 0;
    if (n == 0)
        return BUS_OK;
    if (n == 1) {
        if (bm[0] == NULL)
            return bus_broker_publish(match[0], topic, ev, flags, fn, opaque);
        t0 = bus__clock_mono_ns();
        rv = bus_broker_publish(match[0], topic, ev, flags, fn, opaque);
        if (rv == BUS_OK) {
            bus_counter_inc(bm[0]->published);
            bus_hist_record(bm[0]->latency, bus__clock_mono_ns() - t0);
        }
        return rv;
    }
    if (fn != NULL) {
        if ((j = bus__alloc(sizeof(*j))) == NULL)
            return BUS_ENOMEM;
        atomic_init(&j->pending, (uint32_t)n);
        atomic_init(&j->err, BUS_OK);
        j->fn = fn;
        j->opaque = opaque;
    }
    /* Each broker takes one reference; the caller's is dropped after. */
    for (i = 0; i < n; i++) {
        bus_event_ref(ev);
        if (bm[i] != NULL)
            t0 = bus__clock_mono_ns();
        rv = bus_broker_publish(match[i], topic, ev, flags,
                                j ? ctx_ack_join_fn : NULL, j);
        if (rv == BUS_OK && bm[i] != NULL) {
            bus_counter_inc(bm[i]->published);
            bus_hist_record(bm[i]->latency, bus__clock_mono_ns() - t0);
        }
        if (rv != BUS_OK) {
            bus_event_unref(ev);
            if (sent == 0)
                break; /* nothing went out: the caller keeps ev */
            if (j != NULL)
                ctx_ack_join_fn(j, ev, rv); /* counts this broker */
            continue;
        }
        sent++;
    }
    if (sent == 0) {
        bus__free(j, sizeof(*j));
        return rv;
    }
    bus_event_unref(ev);
    return BUS_OK;
}

int
bus_publish_ack(bus_ctx *ctx, const char *topic, bus_event *ev,
                unsigned flags, bus_ack_fn fn, void *opaque)
{
    void *buf[CTX_LOOKUP_STACK], **big = NULL;
    void *const *items;
    bus_event *orig = ev;
    ctx_routes *routes;
    bus__tindex *ix;
    size_t len, n;
    uint32_t tok;
    bool routed = false;
    int rv;

    if (ctx == NULL || topic == NULL || ev == NULL)
        return BUS_EINVAL;
    if (ev->type_len == 0)
        return BUS_EINVAL;
    /* Published from a handler: inherit the handled event's correlation,
     * causation and trace context (trace.h). Best effort: an event that
     * is frozen already keeps what it has, and a failure to add headers
     * (ENOMEM) does not fail the publish. */
    if (__builtin_expect(bus__trace_current != NULL, 0)
        && !bus__event_is_frozen(ev))
        (void)bus_trace_inherit(ev);
    len = strlen(topic); /* the only strlen: everything below takes len */
    tok = bus__rcu_enter(&ctx->rcu);
    /* seq_cst, as the index: the grace-period argument (rcu.h) needs the
     * load ordered after the section's entry. */
    routes = atomic_load_explicit(&ctx->routes, memory_order_seq_cst);
    ix = atomic_load_explicit(&ctx->index, memory_order_seq_cst);
    /* The topic is validated once: by the table lookup on a topic-cache
     * miss only (a hit means these bytes were valid before), or here
     * when brokers are attached, which must not get an invalid one. */
    if (routes != NULL && routes->n > 0) {
        if (bus__topic_check(topic, false, NULL, 0) != BUS_OK) {
            rv = BUS_EINVAL;
            goto out;
        }
        n = 0;
        items = NULL;
    } else if (bus__tindex_lookup_checked(ix, topic, len, buf,
                                          CTX_LOOKUP_STACK, &items, &n)
               != BUS_OK) {
        rv = BUS_EINVAL;
        goto out;
    }
    /* Checked inside the section: close waits for sections that saw
     * closing == false, so no event slips in after the drain. */
    if (atomic_load_explicit(&ctx->closing, memory_order_seq_cst)) {
        rv = BUS_ECLOSED;
        goto out;
    }
    if ((rv = ctx_prepare_event(&ev, topic, len)) != BUS_OK)
        goto out;
    if (routes != NULL && routes->n > 0) {
        rv = ctx_publish_routed(ctx, routes, topic, ev, flags, fn, opaque,
                                &routed);
        if (routed)
            goto done;
        n = bus__tindex_lookup(ix, topic, len, buf, CTX_LOOKUP_STACK,
                               &items);
    }
    if (n > CTX_LOOKUP_STACK && items == (void *const *)buf) {
        /* Not cached and more than the stack holds: one allocation. */
        if ((big = bus__alloc(sizeof(void *) * n)) == NULL) {
            rv = BUS_ENOMEM;
            goto done;
        }
        n = bus__tindex_lookup(ix, topic, len, big, n, &items);
    }
    /* fn borrows ev after the dispatch below has given our reference
     * away (a worker or the last inline call may free it): keep one. */
    if (fn != NULL)
        bus_event_ref(ev);
    if (n == 0) {
        CTX_STAT(ctx, no_subscriber, 1);
        bus_event_unref(ev);
        rv = BUS_OK;
    } else {
        rv = ctx_dispatch(ctx, (bus_sub *const *)items, n, ev, flags, NULL,
                          0);
    }
    if (big != NULL)
        bus__free(big, sizeof(void *) * n);
    if (fn != NULL) {
        if (rv == BUS_OK)
            fn(opaque, ev, BUS_OK);
        bus_event_unref(ev);
    }
done:
    if (rv == BUS_OK) {
        CTX_STAT(ctx, published, 1);
        if (ev != orig)
            bus_event_unref(orig); /* we took it; the clone went out */
    } else if (ev != orig) {
        bus_event_unref(ev); /* the clone; the caller keeps orig */
    }
out:
    bus__rcu_exit(&ctx->rcu, tok);
    return rv;
}

int
bus_publish(bus_ctx *ctx, const char *topic, bus_event *ev, unsigned flags)
{
    return bus_publish_ack(ctx, topic, ev, flags, NULL, NULL);
}

/* ---- Brokers ----------------------------------------------------------------------- */

/* A broker delivers to one subscription. @thread broker. */
static int
ctx_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
            unsigned flags)
{
    ctx_link *l = opaque;
    bus_ctx *ctx = l->ctx;
    bus_event *use = ev;
    bus_sub *s;
    uint32_t tok;
    int rv;

    tok = bus__rcu_enter(&ctx->rcu);
    /* gone before s: once l is gone, s may be freed after a grace period
     * (which this section holds up only if it saw l not gone). seq_cst:
     * pairs with the store in unsubscribe/detach (rcu.h). */
    if (atomic_load_explicit(&ctx->closing, memory_order_seq_cst)
        || atomic_load_explicit(&l->gone, memory_order_seq_cst)) {
        bus__rcu_exit(&ctx->rcu, tok);
        return BUS_ECLOSED;
    }
    s = l->sub;
    if (!bus__event_topic_is(ev, topic, strlen(topic))) {
        /* The event came without its topic (a decoded frame): record it,
         * or clone when it is already shared. */
        if (bus_event_refcount(ev) == 1 && !bus__event_is_frozen(ev)) {
            rv = ctx_prepare_event(&use, topic, strlen(topic));
        } else {
            bus_event *c;
            rv = bus_event_clone(&c, ev);
            if (rv == BUS_OK
                && (rv = bus__event_set_topic(c, topic, strlen(topic)))
                       != BUS_OK)
                bus_event_unref(c);
            if (rv == BUS_OK) {
                bus_event_freeze(c);
                use = c;
            }
        }
        if (rv != BUS_OK) {
            bus__rcu_exit(&ctx->rcu, tok);
            return rv;
        }
    } else {
        bus_event_freeze(ev);
    }
    rv = ctx_dispatch(ctx, &s, 1, use, flags, l, token);
    if (use != ev) {
        if (rv == BUS_OK)
            bus_event_unref(ev); /* took it; the clone went in */
        else
            bus_event_unref(use);
    }
    bus__rcu_exit(&ctx->rcu, tok);
    return rv;
}

/* @locks ctx->wmtx held. */
static int
ctx_link_broker(bus_sub *s, bus_broker *b, const char *route)
{
    ctx_link *l;
    int rv;

    if (!bus__pattern_overlap(route, s->pattern))
        return BUS_OK;
    if ((l = bus__zalloc(sizeof(*l))) == NULL)
        return BUS_ENOMEM;
    l->sub = s;
    l->ctx = s->ctx;
    l->broker = b;
    atomic_init(&l->gone, false);
    atomic_init(&l->pending, 0);
    ctx_link_metrics(s->ctx, l);
    rv = bus__broker_subscribe(b, s->pattern, s->group, ctx_deliver, l,
                               &l->handle);
    if (rv != BUS_OK) {
        ctx_link_free(l);
        return rv;
    }
    l->next = s->links;
    s->links = l;
    return BUS_OK;
}

/* Ends the backend subscriptions of a list of links and frees them.
 * Called without wmtx (a backend waits there for running deliveries). */
static void
ctx_unlink_list(ctx_link *l)
{
    ctx_link *next;

    for (; l != NULL; l = next) {
        next = l->next;
        bus__broker_unsubscribe(l->broker, l->handle);
        ctx_link_free(l);
    }
}

/* Removes s's broker registrations; s must be unreachable by other
 * threads' reclaim (not yet in the table, or the context is closing). */
static void
ctx_unlink_brokers(bus_sub *s)
{
    ctx_link *l = s->links;

    s->links = NULL;
    ctx_unlink_list(l);
}

static size_t
ctx_routes_size(size_t n)
{
    return sizeof(ctx_routes) + n * sizeof(ctx_route);
}

int
bus_ctx_attach(bus_ctx *ctx, bus_broker *b, const char *route)
{
    ctx_routes *old, *nr;
    size_t n, i, nsize;
    bus_sub *s;
    int rv = BUS_OK;

    if (ctx == NULL || b == NULL)
        return BUS_EINVAL;
    if (route == NULL)
        route = ">";
    if (bus__topic_check(route, true, NULL, 0) != BUS_OK)
        return BUS_EINVAL;
    bus__mutex_lock(&ctx->wmtx);
    old = atomic_load_explicit(&ctx->routes, memory_order_relaxed);
    n = old ? old->n : 0;
    for (i = 0; i < n; i++) {
        if (old->r[i].broker == b) {
            bus__mutex_unlock(&ctx->wmtx);
            return BUS_EEXIST;
        }
    }
    nsize = ctx_routes_size(n + 1);
    if ((nr = bus__zalloc(nsize)) == NULL) {
        bus__mutex_unlock(&ctx->wmtx);
        return BUS_ENOMEM;
    }
    nr->n = n + 1;
    for (i = 0; i < n; i++)
        nr->r[i] = old->r[i]; /* patterns are shared, owned by the route */
    nr->r[n].broker = b;
    nr->r[n].bm = ctx_bmetrics_new(ctx, b);
    nr->r[n].pattern = bus__strdup(route, &nr->r[n].pattern_size);
    if (nr->r[n].pattern == NULL) {
        ctx_bmetrics_free(nr->r[n].bm);
        bus__free(nr, nsize);
        bus__mutex_unlock(&ctx->wmtx);
        return BUS_ENOMEM;
    }
    for (s = ctx->subs; s != NULL; s = s->next)
        if ((rv = ctx_link_broker(s, b, route)) != BUS_OK)
            break;
    if (rv == BUS_OK && old != NULL)
        rv = ctx_retire(ctx, NULL, old, ctx->routes_size);
    if (rv != BUS_OK) {
        /* Undo the links made to b. */
        for (s = ctx->subs; s != NULL; s = s->next) {
            ctx_link **pl = &s->links, *l;
            while ((l = *pl) != NULL) {
                if (l->broker == b) {
                    *pl = l->next;
                    bus__broker_unsubscribe(b, l->handle);
                    ctx_link_free(l);
                } else {
                    pl = &l->next;
                }
            }
        }
        bus__free(nr->r[n].pattern, nr->r[n].pattern_size);
        ctx_bmetrics_free(nr->r[n].bm);
        bus__free(nr, nsize);
        bus__mutex_unlock(&ctx->wmtx);
        return rv;
    }
    atomic_store_explicit(&ctx->routes, nr, memory_order_seq_cst);
    ctx->routes_size = nsize;
    bus__mutex_unlock(&ctx->wmtx);
    ctx_reclaim(ctx, true);
    return BUS_OK;
}

int
bus_ctx_detach(bus_ctx *ctx, bus_broker *b)
{
    ctx_routes *old, *nr = NULL;
    size_t n, i, j, nsize = 0, found = SIZE_MAX;
    ctx_link *l;
    uint64_t seq;
    bus_sub *s;
    int k;

    if (ctx == NULL || b == NULL)
        return BUS_EINVAL;
    bus__mutex_lock(&ctx->wmtx);
    old = atomic_load_explicit(&ctx->routes, memory_order_relaxed);
    n = old ? old->n : 0;
    for (i = 0; i < n; i++)
        if (old->r[i].broker == b)
            found = i;
    if (found == SIZE_MAX) {
        bus__mutex_unlock(&ctx->wmtx);
        return BUS_ENOTFOUND;
    }
    if (n > 1) {
        nsize = ctx_routes_size(n - 1);
        if ((nr = bus__zalloc(nsize)) == NULL) {
            bus__mutex_unlock(&ctx->wmtx);
            return BUS_ENOMEM;
        }
        nr->n = n - 1;
        for (i = 0, j = 0; i < n; i++)
            if (i != found)
                nr->r[j++] = old->r[i];
    }
    /* The old array and the detached route's pattern go after a grace
     * period; the old array is not touched meanwhile (publishers may be
     * walking it), and the other patterns now belong to the new one. */
    if (ctx_retire(ctx, NULL, old, ctx->routes_size) != BUS_OK) {
        bus__free(nr, nsize);
        bus__mutex_unlock(&ctx->wmtx);
        return BUS_ENOMEM;
    }
    ctx->retired->pattern = old->r[found].pattern;
    ctx->retired->pattern_size = old->r[found].pattern_size;
    ctx->retired->bm = old->r[found].bm;
    atomic_store_explicit(&ctx->routes, nr, memory_order_seq_cst);
    ctx->routes_size = nsize;
    /* The links to b, of live and of unsubscribed subscriptions, are
     * refused from now on and go to reclamation (see "Broker links" at
     * the top): queued entries may still ack through them. */
    seq = ++ctx->grace_seq;
    for (k = 0; k < 2; k++) {
        for (s = k == 0 ? ctx->subs : ctx->zombies; s != NULL; s = s->next) {
            ctx_link **pl = &s->links;
            while ((l = *pl) != NULL) {
                if (l->broker == b) {
                    *pl = l->next;
                    /* seq_cst: pairs with ctx_deliver's check. */
                    atomic_store_explicit(&l->gone, true,
                                          memory_order_seq_cst);
                    l->retired_at = seq;
                    l->next = ctx->retired_links;
                    ctx->retired_links = l;
                } else {
                    pl = &l->next;
                }
            }
        }
    }
    bus__mutex_unlock(&ctx->wmtx);
    /* Wait until no link to b is left: the caller may close b as soon as
     * this returns. Each round waits for a grace period; the links go
     * once the workers finished the entries naming them. From a handler
     * (not allowed: bus.h) it cannot wait and leaves them to a later
     * reclaim. */
    for (;;) {
        bool left = false;
        ctx_reclaim(ctx, true);
        if (bus__rcu_in_section(&ctx->rcu))
            break;
        /* Parked retries of b's deliveries hold their links. */
        ctx_redo_drop_list(
            ctx, bus__twheel_remove_if(&ctx->wheel, ctx_redo_of_broker, b),
            false);
        bus__mutex_lock(&ctx->wmtx);
        for (l = ctx->retired_links; l != NULL && !left; l = l->next)
            left = l->broker == b;
        /* Links being unsubscribed by another thread's reclaim, which
         * may be b's (zombies' links are not looked at one by one). */
        left = left || ctx->n_unlinking > 0;
        bus__mutex_unlock(&ctx->wmtx);
        if (!left)
            break;
        bus__sleep_ns(100000);
    }
    return BUS_OK;
}

/* ---- Statistics ----------------------------------------------------------------------- */

void
bus_sub_stats_get(const bus_sub *s, bus_sub_stats *st)
{
    /* deq first: read after it, enq is at least as large. */
    uint64_t deq = atomic_load_explicit(&s->deq, memory_order_acquire);
    uint64_t enq = atomic_load_explicit(&s->enq, memory_order_relaxed);

    st->delivered = atomic_load_explicit(&s->delivered, memory_order_relaxed);
    st->ok = atomic_load_explicit(&s->ok, memory_order_relaxed);
    st->retry = atomic_load_explicit(&s->retry, memory_order_relaxed);
    st->reject = atomic_load_explicit(&s->reject, memory_order_relaxed);
    st->dropped = atomic_load_explicit(&s->dropped, memory_order_relaxed);
    st->queued = enq > deq ? enq - deq : 0;
}

void
bus_ctx_stats_get(const bus_ctx *ctx, bus_ctx_stats *st)
{
    uint64_t q = 0;
    uint32_t i;

    memset(st, 0, sizeof(*st));
    for (i = 0; i <= CTX_TSLOTS; i++) {
        const ctx_tstats *t = &ctx->tstats[i];
        st->published += atomic_load_explicit(&t->published,
                                              memory_order_relaxed);
        st->no_subscriber += atomic_load_explicit(&t->no_subscriber,
                                                  memory_order_relaxed);
        st->rejected_full += atomic_load_explicit(&t->rejected_full,
                                                  memory_order_relaxed);
        st->delivered += atomic_load_explicit(&t->delivered,
                                              memory_order_relaxed);
    }
    for (i = 0; i < ctx->n_workers; i++)
        q += ring_depth(&ctx->workers[i].q);
    st->queued = q;
    st->subscriptions = atomic_load_explicit(&ctx->n_subs,
                                             memory_order_relaxed);
}
