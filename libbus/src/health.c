/*
 * Health checks: a registry of checks, runs with per-check deadlines, and
 * the JSON report (contract in health.h, docs/health.md).
 *
 * Design:
 * - One mutex, h->mtx, guards everything mutable here; no other lock is
 *   taken under it, and no check function is ever called with it held.
 *   h->done is broadcast whenever something a waiter may wait for changes:
 *   a result arrived, a run dropped its references, a check thread exited.
 * - Every check has a request generation (req_gen) and a done generation
 *   (done_gen). A run that finds a check idle (done == req) requests a new
 *   call (req_gen++, req_ns = now); one that finds a call in flight
 *   (done < req) does not start another but waits for that one, up to
 *   req_ns + timeout; past that, the check is reported as timed out
 *   without waiting. A result is used only by runs whose target
 *   generation it completes, so a late result (after its runs gave up) is
 *   stored but never reported: the next run requests a fresh call.
 * - Threaded checks have their own thread, which sleeps on c->wake until
 *   req_gen moves, calls fn unlocked, stores the result. A hung fn pins
 *   only its own thread. Inline checks are called by the run that
 *   requested the call, after it released the mutex.
 * - Lifetime: runs take a reference (c->refs) on each check they report.
 *   Deregister unlinks the check and waits only for calls of fn (the
 *   check's thread to exit, an inline call in progress to return), never
 *   for references: a run may be waiting for the very check calling
 *   deregister. What cannot be freed yet (references held, or a thread
 *   still inside fn when deregister gives up) goes to h->graveyard, and is
 *   joined and freed by a later call once both are gone ("reaped"). Close
 *   abandons what is still running at its deadline: such a thread holds a
 *   reference on h (h->refs) and frees its check, and h if it is the last,
 *   when fn returns. Its handle waits on a process-wide list of orphans
 *   (the platform layer cannot detach a thread) until a later
 *   bus_health_open or bus_health_close joins it.
 * - Lock order: h->mtx, then the orphan spinlock (held for list edits
 *   only; nothing is called under it).
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <bus/err.h>
#include <bus/health.h>

#include "alloc.h"
#include "platform.h"
#include "wbuf.h"

#define HEALTH_TIMEOUT_DEFAULT_MS 1000
#define HEALTH_CLOSE_TIMEOUT_DEFAULT_MS 2000
#define HEALTH_TIMEOUT_MAX_MS 600000
/* Slack for a thread to be scheduled after its deadline, when deregister
 * waits for a check thread to notice it must stop. */
#define HEALTH_MARGIN_NS 1000000000u
#define NS_PER_MS 1000000u

struct bus_health_check {
    bus_health *h;
    bus_health_check *next; /* h->checks or h->graveyard; @locks h->mtx */
    char name[BUS_HEALTH_NAME_MAX];
    bus_health_fn fn;
    void *opaque;
    uint64_t timeout_ns;
    unsigned views;
    bool run_inline;
    bool has_thread;
    bus__thread thr;
    bus__cond wake; /* the thread waits for req_gen or stop */
    /* @locks h->mtx for everything below. */
    uint64_t req_gen;  /* calls requested */
    uint64_t req_ns;   /* when the latest was requested (inline: started) */
    uint64_t done_gen; /* calls finished */
    bool calling;      /* inline: a run is calling fn now */
    bool stop;         /* deregistered: the thread exits */
    bool exited;       /* the thread has left its loop */
    bool abandoned;    /* close gave up: the thread frees c itself */
    struct health_orphan *orphan; /* abandoned: where to say "exited" */
    uint32_t refs;                /* runs reporting this check */
    bus_health_status st;         /* latest result (manual: as set) */
    uint64_t dur_ns;
    char msg[BUS_HEALTH_MSG_MAX];
};

struct bus_health {
    bus__mutex mtx;
    bus__cond done;
    uint64_t default_timeout_ns;
    uint64_t close_timeout_ns;
    bus_logger log;
    /* @locks mtx */
    bus_health_check *checks;    /* registration order */
    bus_health_check *graveyard; /* deregistered, thread or refs pending */
    uint32_t refs;               /* 1 (the owner) + abandoned threads */
    bool closed;
};

typedef struct run_item {
    bus_health_check *c;
    uint64_t target; /* generation whose result this run reports */
    bool call;       /* inline: this run calls fn itself */
    bool settled;
    bool skip; /* deregistered before its result came: not reported */
    bus_health_result *res;
    char *msg; /* BUS_HEALTH_MSG_MAX bytes in the report */
} run_item;

/* The check this thread is calling, so that a check deregistering itself
 * does not wait for its own call. */
static _Thread_local const bus_health_check *health_current;

/* A thread close abandoned, to be joined once it has exited. */
typedef struct health_orphan {
    struct health_orphan *next;
    bus__thread thr;
    atomic_bool exited;
} health_orphan;

/* Process-wide (the registry that abandoned it may be gone); a spinlock
 * because the platform mutex has no static initializer, and it guards
 * only a few pointer moves. */
static atomic_flag health_orphan_lock = ATOMIC_FLAG_INIT;
static health_orphan *health_orphans;

static void
health_orphans_lock(void)
{
    /* acquire/release: the list is read and written under the lock */
    while (atomic_flag_test_and_set_explicit(&health_orphan_lock,
                                             memory_order_acquire))
        bus__thread_yield();
}

static void
health_orphans_unlock(void)
{
    atomic_flag_clear_explicit(&health_orphan_lock, memory_order_release);
}

/* Joins and frees the orphans whose thread has exited. */
static void
health_orphans_reap(void)
{
    health_orphan *o, **pp, *done = NULL;

    health_orphans_lock();
    for (pp = &health_orphans; (o = *pp) != NULL;) {
        /* acquire: pairs with the thread's final release store */
        if (atomic_load_explicit(&o->exited, memory_order_acquire)) {
            *pp = o->next;
            o->next = done;
            done = o;
        } else {
            pp = &o->next;
        }
    }
    health_orphans_unlock();
    while ((o = done) != NULL) {
        done = o->next;
        bus__thread_join(&o->thr);
        bus__free(o, sizeof(*o));
    }
}

const char *
bus_health_status_name(bus_health_status st)
{
    switch (st) {
    case BUS_HEALTH_HEALTHY:
        return "healthy";
    case BUS_HEALTH_DEGRADED:
        return "degraded";
    case BUS_HEALTH_UNHEALTHY:
        return "unhealthy";
    }
    return "unknown";
}

int
bus_health_http_status(bus_health_status st)
{
    return st == BUS_HEALTH_HEALTHY || st == BUS_HEALTH_DEGRADED ? 200 : 503;
}

static bus_health_status
health_clamp(bus_health_status st)
{
    return (unsigned)st > BUS_HEALTH_UNHEALTHY ? BUS_HEALTH_UNHEALTHY : st;
}

void
bus_health_config_init(bus_health_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->default_timeout_ms = HEALTH_TIMEOUT_DEFAULT_MS;
    cfg->close_timeout_ms = HEALTH_CLOSE_TIMEOUT_DEFAULT_MS;
}

void
bus_health_check_config_init(bus_health_check_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->views = BUS_HEALTH_BOTH;
    cfg->initial = BUS_HEALTH_HEALTHY;
}

int
bus_health_open(bus_health **out, const bus_health_config *cfg)
{
    bus_health_config def;
    bus_health *h;
    int32_t t, ct;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    health_orphans_reap();
    bus_health_config_init(&def);
    if (cfg == NULL)
        cfg = &def;
    t = cfg->default_timeout_ms ? cfg->default_timeout_ms
                                : def.default_timeout_ms;
    ct = cfg->close_timeout_ms ? cfg->close_timeout_ms : def.close_timeout_ms;
    if ((cfg->size != 0 && cfg->size < sizeof(bus_health_config)) || t < 1 ||
        t > HEALTH_TIMEOUT_MAX_MS || ct < 1 || ct > HEALTH_TIMEOUT_MAX_MS) {
        bus_logf(&cfg->log, BUS_LOG_ERR, "health",
                 "bad config: default_timeout_ms %d (1..%d), "
                 "close_timeout_ms %d (1..%d)",
                 (int)t, HEALTH_TIMEOUT_MAX_MS, (int)ct, HEALTH_TIMEOUT_MAX_MS);
        return BUS_EINVAL;
    }
    if ((h = bus__zalloc(sizeof(*h))) == NULL)
        return BUS_ENOMEM;
    h->default_timeout_ns = (uint64_t)t * NS_PER_MS;
    h->close_timeout_ns = (uint64_t)ct * NS_PER_MS;
    h->log = cfg->log;
    h->refs = 1;
    bus__mutex_init(&h->mtx);
    bus__cond_init(&h->done);
    *out = h;
    return BUS_OK;
}

static void
health_free(bus_health *h)
{
    bus__cond_fini(&h->done);
    bus__mutex_fini(&h->mtx);
    bus__free(h, sizeof(*h));
}

static void
check_free(bus_health_check *c)
{
    bus__cond_fini(&c->wake);
    bus__free(c, sizeof(*c));
}

/* @thread the check's own. */
static void
check_thread(void *arg)
{
    bus_health_check *c = arg;
    bus_health *h = c->h;
    char msg[BUS_HEALTH_MSG_MAX];
    bool last;

    health_current = c;
    bus__mutex_lock(&h->mtx);
    while (!c->stop) {
        uint64_t gen, t0, t1;
        bus_health_status st;

        if (c->done_gen == c->req_gen) {
            bus__cond_wait(&c->wake, &h->mtx);
            continue;
        }
        gen = c->req_gen;
        bus__mutex_unlock(&h->mtx);
        msg[0] = '\0';
        t0 = bus__clock_mono_ns();
        st = c->fn(c->opaque, msg, sizeof(msg));
        t1 = bus__clock_mono_ns();
        msg[sizeof(msg) - 1] = '\0';
        bus__mutex_lock(&h->mtx);
        c->st = health_clamp(st);
        c->dur_ns = t1 - t0;
        memcpy(c->msg, msg, sizeof(msg));
        c->done_gen = gen;
        bus__cond_broadcast(&h->done);
    }
    c->exited = true;
    if (!c->abandoned) {
        bus__cond_broadcast(&h->done);
        bus__mutex_unlock(&h->mtx);
        return;
    }
    /* Close gave up on this check: free it ourselves. */
    {
        bus_health_check **pp;
        health_orphan *o = c->orphan;

        for (pp = &h->graveyard; *pp != NULL; pp = &(*pp)->next) {
            if (*pp == c) {
                *pp = c->next;
                break;
            }
        }
        last = --h->refs == 0;
        bus__mutex_unlock(&h->mtx);
        check_free(c);
        if (last)
            health_free(h);
        /* Last touch of shared memory: once seen, a reaper joins this
         * thread and frees o. release: the frees above come first. */
        if (o != NULL)
            atomic_store_explicit(&o->exited, true, memory_order_release);
    }
}

/* Unlinks the graveyard checks that can go (no run uses them, their
 * thread has exited) and returns them as a list, for the caller to join
 * and free after unlocking. @locks h->mtx held. */
static bus_health_check *
health_reap_locked(bus_health *h)
{
    bus_health_check **pp = &h->graveyard, *c, *list = NULL;

    while ((c = *pp) != NULL) {
        if (c->refs == 0 && (!c->has_thread || c->exited) && !c->abandoned) {
            *pp = c->next;
            c->next = list;
            list = c;
        } else {
            pp = &c->next;
        }
    }
    return list;
}

static void
health_reap_finish(bus_health_check *list)
{
    bus_health_check *c;

    while ((c = list) != NULL) {
        list = c->next;
        if (c->has_thread)
            bus__thread_join(&c->thr);
        check_free(c);
    }
}

int
bus_health_register(bus_health *h, const bus_health_check_config *cfg,
                    bus_health_check **out)
{
    bus_health_check *c, **pp, *reap;
    size_t nlen;
    int rv;

    if (out != NULL)
        *out = NULL;
    if (h == NULL || cfg == NULL)
        return BUS_EINVAL;
    nlen = cfg->name != NULL ? strlen(cfg->name) : 0;
    if ((cfg->size != 0 && cfg->size < sizeof(bus_health_check_config)) ||
        nlen == 0 || nlen >= BUS_HEALTH_NAME_MAX || cfg->timeout_ms < 0 ||
        cfg->timeout_ms > HEALTH_TIMEOUT_MAX_MS ||
        (cfg->views & ~BUS_HEALTH_BOTH) != 0 ||
        (unsigned)cfg->initial > BUS_HEALTH_UNHEALTHY) {
        bus_logf(&h->log, BUS_LOG_ERR, "health",
                 "check '%s': invalid config (name 1..%d bytes, timeout_ms "
                 "0..%d, views BUS_HEALTH_* bits, a valid initial status)",
                 cfg->name ? cfg->name : "(null)", BUS_HEALTH_NAME_MAX - 1,
                 HEALTH_TIMEOUT_MAX_MS);
        return BUS_EINVAL;
    }
    if ((c = bus__zalloc(sizeof(*c))) == NULL)
        return BUS_ENOMEM;
    c->h = h;
    memcpy(c->name, cfg->name, nlen + 1);
    c->fn = cfg->fn;
    c->opaque = cfg->opaque;
    c->timeout_ns = cfg->timeout_ms ? (uint64_t)cfg->timeout_ms * NS_PER_MS
                                    : h->default_timeout_ns;
    c->views = cfg->views ? cfg->views : BUS_HEALTH_BOTH;
    c->run_inline = cfg->run_inline;
    c->st = cfg->fn == NULL ? cfg->initial : BUS_HEALTH_HEALTHY;
    bus__cond_init(&c->wake);
    /* The thread starts before the check is visible, so that a failure
     * needs no unlinking; it just sleeps until a run requests a call. */
    if (c->fn != NULL && !c->run_inline) {
        if ((rv = bus__thread_start(&c->thr, "bus-health", check_thread, c)) !=
            BUS_OK) {
            check_free(c);
            return rv;
        }
        c->has_thread = true;
    }
    bus__mutex_lock(&h->mtx);
    rv = h->closed ? BUS_ECLOSED : BUS_OK;
    for (pp = &h->checks; rv == BUS_OK && *pp != NULL; pp = &(*pp)->next)
        if (strcmp((*pp)->name, c->name) == 0)
            rv = BUS_EEXIST;
    if (rv == BUS_OK)
        *pp = c;
    reap = health_reap_locked(h);
    if (rv != BUS_OK && c->has_thread) {
        c->stop = true;
        bus__cond_signal(&c->wake);
    }
    bus__mutex_unlock(&h->mtx);
    health_reap_finish(reap);
    if (rv != BUS_OK) {
        if (rv == BUS_EEXIST)
            bus_logf(&h->log, BUS_LOG_ERR, "health",
                     "check '%s' is already registered", c->name);
        if (c->has_thread)
            bus__thread_join(&c->thr);
        check_free(c);
        return rv;
    }
    if (out != NULL)
        *out = c;
    return BUS_OK;
}

int
bus_health_deregister(bus_health_check *c)
{
    bus_health *h;
    bus_health_check **pp, *reap;
    bool gone, free_now;
    uint64_t deadline;

    if (c == NULL)
        return BUS_OK;
    h = c->h;
    bus__mutex_lock(&h->mtx);
    for (pp = &h->checks; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    c->next = NULL;
    c->stop = true;
    if (c->has_thread)
        bus__cond_signal(&c->wake);
    if (health_current == c) {
        /* Inside its own fn: waiting would wait for ourselves. That call
         * is the last (the thread exits after it; runs see stop); the
         * graveyard frees the check afterwards. */
        c->next = h->graveyard;
        h->graveyard = c;
        bus__mutex_unlock(&h->mtx);
        return BUS_OK;
    }
    /* An inline call in progress (another thread's run) returns when fn
     * does: inline checks promise not to block. */
    while (c->calling)
        bus__cond_wait(&h->done, &h->mtx);
    /* A threaded call in flight may run until its deadline; then allow
     * the margin for the thread to be scheduled. */
    deadline = bus__clock_mono_ns() + HEALTH_MARGIN_NS;
    if (c->done_gen < c->req_gen &&
        c->req_ns + c->timeout_ns + HEALTH_MARGIN_NS > deadline)
        deadline = c->req_ns + c->timeout_ns + HEALTH_MARGIN_NS;
    while (c->has_thread && !c->exited &&
           bus__cond_wait_until(&h->done, &h->mtx, deadline))
        ;
    gone = !c->has_thread || c->exited;
    free_now = gone && c->refs == 0;
    if (!free_now) {
        c->next = h->graveyard;
        h->graveyard = c;
    }
    reap = health_reap_locked(h);
    bus__mutex_unlock(&h->mtx);
    health_reap_finish(reap);
    if (!gone) {
        bus_logf(&h->log, BUS_LOG_WARN, "health",
                 "check '%s' deregistered while its call is still running "
                 "past its timeout; its thread is reclaimed when it returns",
                 c->name);
        return BUS_ETIMEDOUT;
    }
    if (free_now) {
        if (c->has_thread)
            bus__thread_join(&c->thr);
        check_free(c);
    }
    return BUS_OK;
}

int
bus_health_check_set(bus_health_check *c, bus_health_status st, const char *fmt,
                     ...)
{
    char msg[BUS_HEALTH_MSG_MAX];
    va_list ap;

    if (c == NULL || c->fn != NULL || (unsigned)st > BUS_HEALTH_UNHEALTHY)
        return BUS_EINVAL;
    msg[0] = '\0';
    if (fmt != NULL) {
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
    }
    bus__mutex_lock(&c->h->mtx);
    c->st = st;
    memcpy(c->msg, msg, sizeof(msg));
    bus__mutex_unlock(&c->h->mtx);
    return BUS_OK;
}

void
bus_health_close(bus_health *h)
{
    bus_health_check *c, *reap = NULL, *more;
    uint64_t deadline;
    bool last;

    if (h == NULL)
        return;
    health_orphans_reap();
    bus__mutex_lock(&h->mtx);
    h->closed = true;
    while ((c = h->checks) != NULL) {
        h->checks = c->next;
        c->stop = true;
        if (c->has_thread)
            bus__cond_signal(&c->wake);
        c->next = h->graveyard;
        h->graveyard = c;
    }
    deadline = bus__clock_mono_ns() + h->close_timeout_ns;
    for (;;) {
        more = health_reap_locked(h);
        while ((c = more) != NULL) {
            more = c->next;
            c->next = reap;
            reap = c;
        }
        if (h->graveyard == NULL ||
            !bus__cond_wait_until(&h->done, &h->mtx, deadline))
            break;
    }
    more = health_reap_locked(h);
    while ((c = more) != NULL) {
        more = c->next;
        c->next = reap;
        reap = c;
    }
    /* Still running at the deadline: the threads finish on their own. */
    for (c = h->graveyard; c != NULL; c = c->next) {
        if (c->has_thread && !c->exited) {
            c->abandoned = true;
            h->refs++;
            /* Without a record the thread is never joined (a leak, but
             * only of an already hung thread, on out-of-memory). */
            if ((c->orphan = bus__zalloc(sizeof(*c->orphan))) != NULL) {
                c->orphan->thr = c->thr;
                health_orphans_lock();
                c->orphan->next = health_orphans;
                health_orphans = c->orphan;
                health_orphans_unlock();
            }
            bus_logf(&h->log, BUS_LOG_WARN, "health",
                     "close: check '%s' still running; abandoned", c->name);
        }
    }
    last = --h->refs == 0;
    bus__mutex_unlock(&h->mtx);
    health_reap_finish(reap);
    if (last)
        health_free(h);
}

/* ---- Runs --------------------------------------------------------------- */

typedef struct health_report {
    bus_health_report pub; /* first: the public pointer is this one */
    size_t size;
} health_report;

static void
item_timed_out(run_item *it, uint64_t waited_ns, bool late_result)
{
    it->res->status = BUS_HEALTH_UNHEALTHY;
    it->res->timed_out = true;
    it->res->duration_ns = waited_ns;
    snprintf(it->msg, BUS_HEALTH_MSG_MAX,
             late_result ? "timed out: took %llu ms (timeout %llu ms); "
                           "result discarded"
                         : "timed out: no result after %llu ms "
                           "(timeout %llu ms)",
             (unsigned long long)(waited_ns / NS_PER_MS),
             (unsigned long long)(it->c->timeout_ns / NS_PER_MS));
    it->settled = true;
}

/* Settles it from c's stored result. @locks h->mtx held. */
static void
item_from_check(run_item *it)
{
    bus_health_check *c = it->c;

    if (c->dur_ns > c->timeout_ns) { /* an inline call that overran */
        item_timed_out(it, c->dur_ns, true);
        return;
    }
    it->res->status = c->st;
    it->res->duration_ns = c->dur_ns;
    memcpy(it->msg, c->msg, BUS_HEALTH_MSG_MAX);
    it->settled = true;
}

void
bus_health_report_free(bus_health_report *r)
{
    health_report *hr = (health_report *)r;

    if (hr != NULL)
        bus__free(hr, hr->size);
}

int
bus_health_run(bus_health *h, unsigned views, bus_health_report **out)
{
    size_t n = 0, size, i, k;
    bus_health_check *c, *reap;
    health_report *hr;
    bus_health_result *res;
    run_item *items;
    char *pool;
    uint64_t start, now;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (views == 0)
        views = BUS_HEALTH_BOTH;
    if (h == NULL || (views & ~BUS_HEALTH_BOTH) != 0)
        return BUS_EINVAL;
    start = bus__clock_mono_ns();

    /* 1. Under the lock: allocate the whole report, take references,
     *    request calls. */
    bus__mutex_lock(&h->mtx);
    reap = health_reap_locked(h);
    size = 0;
    for (c = h->checks; c != NULL; c = c->next) {
        if ((c->views & views) == 0)
            continue;
        n++;
        size += strlen(c->name) + 1;
    }
    size += sizeof(health_report) + n * (sizeof(bus_health_result) +
                                         sizeof(run_item) + BUS_HEALTH_MSG_MAX);
    if ((hr = bus__zalloc(size)) == NULL) {
        bus__mutex_unlock(&h->mtx);
        health_reap_finish(reap);
        return BUS_ENOMEM;
    }
    hr->size = size;
    res = (bus_health_result *)(void *)(hr + 1);
    items = (run_item *)(void *)(res + n);
    pool = (char *)(items + n);
    now = bus__clock_mono_ns();
    for (i = 0, c = h->checks; c != NULL; c = c->next) {
        run_item *it;
        size_t l;

        if ((c->views & views) == 0)
            continue;
        it = &items[i];
        it->c = c;
        it->res = &res[i];
        it->msg = pool;
        pool += BUS_HEALTH_MSG_MAX;
        l = strlen(c->name) + 1;
        memcpy(pool, c->name, l);
        res[i].name = pool;
        pool += l;
        res[i].views = c->views;
        res[i].message = it->msg;
        c->refs++;
        i++;
        if (c->fn == NULL) {
            item_from_check(it);
        } else if (c->done_gen < c->req_gen) {
            /* In flight for another run: share it, unless it is overdue
             * (hung): then say so without waiting for it again. */
            if (now >= c->req_ns + c->timeout_ns)
                item_timed_out(it, now - c->req_ns, false);
            else
                it->target = c->req_gen;
        } else {
            it->target = ++c->req_gen;
            c->req_ns = now;
            if (c->run_inline)
                it->call = c->calling = true;
            else
                bus__cond_signal(&c->wake);
        }
    }
    bus__mutex_unlock(&h->mtx);
    health_reap_finish(reap);

    /* 2. Inline calls this run requested, in this thread, unlocked. */
    for (i = 0; i < n; i++) {
        run_item *it = &items[i];
        char msg[BUS_HEALTH_MSG_MAX];
        bus_health_status st;
        uint64_t t0, t1;

        if (!it->call)
            continue;
        c = it->c;
        msg[0] = '\0';
        t0 = bus__clock_mono_ns();
        bus__mutex_lock(&h->mtx);
        if (c->stop) { /* deregistered since step 1 (by an earlier check
                        * of this run, say): do not call it any more */
            c->calling = false;
            c->done_gen = it->target;
            c->st = BUS_HEALTH_HEALTHY;
            c->dur_ns = 0;
            c->msg[0] = '\0';
            it->skip = it->settled = true;
            bus__cond_broadcast(&h->done);
            bus__mutex_unlock(&h->mtx);
            continue;
        }
        c->req_ns = t0; /* its deadline counts from its own start */
        bus__mutex_unlock(&h->mtx);
        health_current = c;
        st = c->fn(c->opaque, msg, sizeof(msg));
        health_current = NULL;
        t1 = bus__clock_mono_ns();
        msg[sizeof(msg) - 1] = '\0';
        bus__mutex_lock(&h->mtx);
        c->st = health_clamp(st);
        c->dur_ns = t1 - t0;
        memcpy(c->msg, msg, sizeof(msg));
        c->done_gen = it->target;
        c->calling = false;
        bus__cond_broadcast(&h->done);
        bus__mutex_unlock(&h->mtx);
    }

    /* 3. Collect results, waiting for each at most until its deadline. */
    bus__mutex_lock(&h->mtx);
    for (;;) {
        uint64_t next = UINT64_MAX;

        now = bus__clock_mono_ns();
        for (i = 0; i < n; i++) {
            run_item *it = &items[i];
            uint64_t dl;

            if (it->settled)
                continue;
            c = it->c;
            if (c->stop) { /* deregistered meanwhile: no longer counts */
                it->skip = it->settled = true;
                continue;
            }
            if (c->done_gen >= it->target) {
                item_from_check(it);
                continue;
            }
            /* done < target <= req: no newer request was made, so req_ns
             * is our call's. */
            dl = c->req_ns + c->timeout_ns;
            if (now >= dl) {
                item_timed_out(it, now - c->req_ns, false);
                continue;
            }
            if (dl < next)
                next = dl;
        }
        if (next == UINT64_MAX)
            break;
        bus__cond_wait_until(&h->done, &h->mtx, next);
    }
    for (i = 0; i < n; i++)
        items[i].c->refs--;
    if (n > 0)
        bus__cond_broadcast(&h->done); /* deregister may wait for refs */
    reap = health_reap_locked(h);
    bus__mutex_unlock(&h->mtx);
    health_reap_finish(reap);

    /* 4. Aggregate; drop the skipped ones (keeps registration order). */
    hr->pub.views = views;
    for (i = 0, k = 0; i < n; i++) {
        bus_health_result *r = items[i].res;
        if (items[i].skip)
            continue;
        if (k != i)
            res[k] = *r;
        r = &res[k++];
        if ((views & r->views & BUS_HEALTH_LIVENESS) &&
            r->status > hr->pub.liveness)
            hr->pub.liveness = r->status;
        if ((views & r->views & BUS_HEALTH_READINESS) &&
            r->status > hr->pub.readiness)
            hr->pub.readiness = r->status;
    }
    hr->pub.status = hr->pub.liveness > hr->pub.readiness ? hr->pub.liveness
                                                          : hr->pub.readiness;
    hr->pub.checks = res;
    hr->pub.nchecks = k;
    hr->pub.duration_ns = bus__clock_mono_ns() - start;
    hr->pub.taken_ms = bus__clock_real_ns() / 1000000 -
                       (int64_t)(hr->pub.duration_ns / NS_PER_MS);
    *out = &hr->pub;
    return BUS_OK;
}

/* ---- JSON --------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when invalid. */
static size_t
utf8_seq(const unsigned char *s)
{
    unsigned c = s[0];
    size_t n, j;
    uint32_t cp;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 1, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
        n = 2, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 3, cp = c & 0x07;
    else
        return 0;
    for (j = 1; j <= n; j++) {
        if ((s[j] & 0xc0) != 0x80)
            return 0; /* also stops at the NUL */
        cp = cp << 6 | (s[j] & 0x3f);
    }
    if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return n + 1;
}

/* A JSON string: quotes, backslashes and control characters escaped;
 * each byte that does not start valid UTF-8 becomes U+FFFD (a message
 * cut at BUS_HEALTH_MSG_MAX may end inside a character). */
static void
w_json_str(bus__wbuf *w, const char *str)
{
    const unsigned char *s = (const unsigned char *)str;
    char esc[8];

    bus__wbuf_put(w, "\"", 1);
    while (*s != '\0') {
        size_t n = utf8_seq(s);

        if (n == 0) {
            bus__wbuf_str(w, "\\ufffd");
            s++;
        } else if (*s == '"' || *s == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*s;
            bus__wbuf_put(w, esc, 2);
            s++;
        } else if (*s < 0x20) {
            const char *e = *s == '\n'   ? "\\n"
                            : *s == '\r' ? "\\r"
                            : *s == '\t' ? "\\t"
                                         : NULL;
            if (e == NULL) {
                snprintf(esc, sizeof(esc), "\\u%04x", *s);
                e = esc;
            }
            bus__wbuf_str(w, e);
            s++;
        } else {
            bus__wbuf_put(w, (const char *)s, n);
            s += n;
        }
    }
    bus__wbuf_put(w, "\"", 1);
}

/* ns as milliseconds with 3 decimals, in integers (no locale). */
static void
w_ms(bus__wbuf *w, uint64_t ns)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%llu.%03llu",
                     (unsigned long long)(ns / NS_PER_MS),
                     (unsigned long long)(ns / 1000 % 1000));

    bus__wbuf_put(w, tmp, (size_t)n);
}

static void
w_status(bus__wbuf *w, const char *key, bus_health_status st)
{
    bus__wbuf_put(w, ",\"", 2);
    bus__wbuf_str(w, key);
    bus__wbuf_put(w, "\":\"", 3);
    bus__wbuf_str(w, bus_health_status_name(st));
    bus__wbuf_put(w, "\"", 1);
}

int
bus_health_report_json(const bus_health_report *r, char *buf, size_t cap,
                       size_t *len)
{
    bus__wbuf w = {buf, cap, 0};
    char tmp[32];
    size_t i;
    int n;

    if (r == NULL || (buf == NULL && cap > 0))
        return BUS_EINVAL;
    bus__wbuf_str(&w, "{\"status\":\"");
    bus__wbuf_str(&w, bus_health_status_name(r->status));
    bus__wbuf_put(&w, "\"", 1);
    if (r->views & BUS_HEALTH_LIVENESS)
        w_status(&w, "liveness", r->liveness);
    if (r->views & BUS_HEALTH_READINESS)
        w_status(&w, "readiness", r->readiness);
    bus__wbuf_str(&w, ",\"duration_ms\":");
    w_ms(&w, r->duration_ns);
    n = snprintf(tmp, sizeof(tmp), "%lld", (long long)r->taken_ms);
    bus__wbuf_str(&w, ",\"timestamp_ms\":");
    bus__wbuf_put(&w, tmp, (size_t)n);
    bus__wbuf_str(&w, ",\"checks\":[");
    for (i = 0; i < r->nchecks; i++) {
        const bus_health_result *c = &r->checks[i];
        if (i > 0)
            bus__wbuf_put(&w, ",", 1);
        bus__wbuf_str(&w, "{\"name\":");
        w_json_str(&w, c->name);
        w_status(&w, "status", c->status);
        bus__wbuf_str(&w, ",\"message\":");
        w_json_str(&w, c->message);
        bus__wbuf_str(&w, ",\"duration_ms\":");
        w_ms(&w, c->duration_ns);
        bus__wbuf_str(&w, ",\"views\":[");
        if (c->views & BUS_HEALTH_LIVENESS)
            bus__wbuf_str(&w, "\"liveness\"");
        if ((c->views & BUS_HEALTH_BOTH) == BUS_HEALTH_BOTH)
            bus__wbuf_put(&w, ",", 1);
        if (c->views & BUS_HEALTH_READINESS)
            bus__wbuf_str(&w, "\"readiness\"");
        bus__wbuf_str(&w, "],\"timed_out\":");
        bus__wbuf_str(&w, c->timed_out ? "true" : "false");
        bus__wbuf_put(&w, "}", 1);
    }
    bus__wbuf_str(&w, "]}");
    if (len != NULL)
        *len = w.len;
    if (cap > 0)
        buf[w.len < cap ? w.len : cap - 1] = '\0';
    return w.len < cap ? BUS_OK : BUS_ENOBUFS;
}

int
bus_health_report_json_alloc(const bus_health_report *r, char **out,
                             size_t *len)
{
    size_t n = 0;
    char *text;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (r == NULL)
        return BUS_EINVAL;
    bus_health_report_json(r, NULL, 0, &n);
    if ((text = bus__alloc(n + 1)) == NULL)
        return BUS_ENOMEM;
    if ((rv = bus_health_report_json(r, text, n + 1, &n)) != BUS_OK) {
        bus__free(text, n + 1);
        return BUS_EINTERNAL; /* cannot happen: same report, same size */
    }
    *out = text;
    if (len != NULL)
        *len = n;
    return BUS_OK;
}

void
bus_health_text_free(char *text)
{
    bus__strfree(text);
}
