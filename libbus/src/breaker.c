/*
 * Circuit breaker (breaker.h).
 *
 * Design: the state is an atomic read without a lock on every call, so the
 * CLOSED path of allow() is one acquire load. Recording an outcome on the
 * CLOSED path does no atomic read-modify-write: the call counters and the
 * rolling window are sharded per thread (pipeline.h, bus__thread_slot), each
 * shard written by its owner thread only with relaxed loads and stores, and
 * summed by whoever needs a total (stats, and the rate rule on a failure).
 * Threads beyond BREAKER_SHARDS share one more shard with atomic adds.
 *
 * The window is BREAKER_BUCKETS buckets of window/10 each per shard, tagged
 * with their epoch (time / bucket width); the owner resets a bucket from an
 * older epoch (counts first, then the epoch with release, so a reader that
 * sees the new epoch with acquire never reads the old counts) and keeps the
 * time range of its current bucket, so the common case needs no division.
 * Closing the breaker clears the window by bumping b->gen: a shard whose
 * gen differs is ignored by readers and cleared by its owner on its next
 * record. Only the shared shard can lose a count when two threads reset
 * the same bucket at once (as before the sharding: the window decides a
 * threshold, it is not a statistic).
 *
 * Consecutive failures are one shared counter written only on a failure
 * (an atomic add) or on the first success after one (a store of 0); a
 * success otherwise only reads it, so its cache line stays shared.
 *
 * Transitions (CLOSED->OPEN, OPEN->HALF_OPEN, HALF_OPEN->CLOSED/OPEN) and
 * the probe accounting happen under b->mtx and are re-checked there. The
 * state is stored with release after the fields it publishes (opened_at,
 * gen), and read with acquire where those fields are then used.
 *
 * Registry lock order: registry mutex, then a breaker's mutex (snapshot
 * takes only the registry's; stats read atomics).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <bus/breaker.h>
#include <bus/err.h>

#include "alloc.h"
#include "pipeline.h"
#include "platform.h"

#define BREAKER_BUCKETS 10
/* Thread slots with a shard of their own; the rest share one more. Each
 * shard is 4 cache lines, so a breaker is ~4.5 KiB. */
#define BREAKER_SHARDS 16

typedef struct breaker_bucket {
    _Atomic uint64_t epoch;
    _Atomic uint32_t calls;
    _Atomic uint32_t fails;
} breaker_bucket;

typedef struct breaker_shard {
    _Alignas(BUS_CACHELINE) _Atomic uint64_t calls;
    _Atomic uint64_t failures;
    _Atomic uint32_t gen; /* window generation of the buckets */
    /* Owner only (not the shared shard): the current bucket, valid for
     * times in [cur_lo, cur_hi) while gen is the breaker's. */
    uint64_t cur_lo, cur_hi, cur_epoch;
    uint32_t cur_idx; /* cur_epoch % BREAKER_BUCKETS */
    breaker_bucket buckets[BREAKER_BUCKETS];
} breaker_shard;

struct bus_breaker {
    _Alignas(BUS_CACHELINE) _Atomic int state;
    _Atomic uint32_t gen; /* window generation; bumped when it closes */
    _Atomic uint32_t consecutive;
    _Atomic uint64_t rejections;
    _Atomic uint64_t opened;
    _Atomic uint64_t opened_at; /* ns, valid when OPEN */
    bus__mutex mtx;
    uint32_t probes_in_flight; /* @locks mtx */
    uint32_t probe_successes;  /* @locks mtx */
    bus_breaker_config cfg;
    uint64_t bucket_ns;
    bool rate_rule;
    char name[128];
    bus_breaker_registry *reg; /* set when owned by a registry */
    bus_breaker *reg_next;
    void *raw; /* the allocation, over-sized to align the struct */
    breaker_shard shards[BREAKER_SHARDS + 1]; /* the last one is shared */
};

struct bus_breaker_registry {
    bus__mutex mtx;
    bus_breaker *head, *tail;
    bus_breaker_state_fn on_state;
    void *opaque;
    _Atomic size_t not_closed;
};

void
bus_breaker_config_init(bus_breaker_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->name = "breaker";
    cfg->failure_threshold = 5;
    cfg->failure_rate = 0.5;
    cfg->min_calls = 20;
    cfg->window_ms = 10000;
    cfg->open_ms = 30000;
    cfg->half_open_probes = 1;
    cfg->close_successes = 1;
}

static void
breaker_fill_defaults(bus_breaker_config *c, const bus_breaker_config *in)
{
    bus_breaker_config d;

    bus_breaker_config_init(&d);
    if (in == NULL) {
        *c = d;
        return;
    }
    *c = *in;
#define DEF(f) if (c->f == 0) c->f = d.f
    DEF(failure_threshold);
    DEF(min_calls);
    DEF(window_ms);
    DEF(open_ms);
    DEF(half_open_probes);
    DEF(close_successes);
#undef DEF
    if (c->failure_rate == 0)
        c->failure_rate = d.failure_rate;
    if (c->name == NULL || c->name[0] == '\0')
        c->name = d.name;
}

int
bus_breaker_new(bus_breaker **out, const bus_breaker_config *cfg)
{
    bus_breaker *b;
    void *raw;

    *out = NULL;
    if (cfg != NULL && cfg->failure_rate < 0)
        return BUS_EINVAL;
    /* Cache-line aligned by hand: the shards must not share lines, and
     * the allocator hooks promise only malloc's alignment. */
    if ((raw = bus__zalloc(sizeof(*b) + BUS_CACHELINE)) == NULL)
        return BUS_ENOMEM;
    b = (bus_breaker *)(((uintptr_t)raw + BUS_CACHELINE - 1)
                        & ~(uintptr_t)(BUS_CACHELINE - 1));
    b->raw = raw;
    breaker_fill_defaults(&b->cfg, cfg);
    snprintf(b->name, sizeof(b->name), "%s", b->cfg.name);
    b->cfg.name = b->name;
    b->bucket_ns = (uint64_t)b->cfg.window_ms * 1000000u / BREAKER_BUCKETS;
    if (b->bucket_ns == 0)
        b->bucket_ns = 1;
    b->rate_rule = b->cfg.failure_rate <= 1.0;
    bus__mutex_init(&b->mtx);
    atomic_init(&b->state, BUS_BREAKER_CLOSED);
    *out = b;
    return BUS_OK;
}

void
bus_breaker_free(bus_breaker *b)
{
    if (b == NULL)
        return;
    bus__mutex_fini(&b->mtx);
    bus__free(b->raw, sizeof(*b) + BUS_CACHELINE);
}

const char *
bus_breaker_name(const bus_breaker *b)
{
    return b->name;
}

const char *
bus_breaker_state_name(bus_breaker_state st)
{
    switch (st) {
    case BUS_BREAKER_CLOSED: return "closed";
    case BUS_BREAKER_OPEN: return "open";
    case BUS_BREAKER_HALF_OPEN: return "half_open";
    }
    return "?";
}

bus_breaker_state
bus_breaker_state_get(const bus_breaker *b)
{
    return (bus_breaker_state)atomic_load_explicit(
        &((bus_breaker *)b)->state, memory_order_acquire);
}

/* Runs the callbacks of one transition; no lock held. */
static void
breaker_notify(bus_breaker *b, int from, int to)
{
    bus_breaker_registry *r = b->reg;

    if (r != NULL) {
        if (from == BUS_BREAKER_CLOSED)
            atomic_fetch_add_explicit(&r->not_closed, 1, memory_order_relaxed);
        else if (to == BUS_BREAKER_CLOSED)
            atomic_fetch_sub_explicit(&r->not_closed, 1, memory_order_relaxed);
    }
    if (b->cfg.on_state != NULL)
        b->cfg.on_state(b->cfg.on_state_opaque, b, (bus_breaker_state)from,
                        (bus_breaker_state)to);
    if (r != NULL && r->on_state != NULL)
        r->on_state(r->opaque, b, (bus_breaker_state)from,
                    (bus_breaker_state)to);
}

/* @locks b->mtx held. */
static void
breaker_set_locked(bus_breaker *b, int to, uint64_t now)
{
    if (to == BUS_BREAKER_OPEN) {
        atomic_store_explicit(&b->opened_at, now, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->opened, 1, memory_order_relaxed);
    }
    if (to == BUS_BREAKER_CLOSED) {
        /* A new, empty window: shards of older generations are ignored
         * (and cleared by their owners). */
        atomic_fetch_add_explicit(&b->gen, 1, memory_order_relaxed);
        atomic_store_explicit(&b->consecutive, 0, memory_order_relaxed);
    }
    b->probes_in_flight = 0;
    b->probe_successes = 0;
    /* release: opened_at and the resets happen-before readers of state */
    atomic_store_explicit(&b->state, to, memory_order_release);
}

bool
bus_breaker_allow(bus_breaker *b)
{
    /* acquire: a plain load on x86 and arm64's ldar; pairs with the
     * release of a transition. */
    int st = atomic_load_explicit(&b->state, memory_order_acquire);
    int from = -1;
    bool ok = false;

    if (__builtin_expect(st == BUS_BREAKER_CLOSED, 1))
        return true;
    uint64_t now = bus_clock_now(&b->cfg.clock);
    bus__mutex_lock(&b->mtx);
    st = atomic_load_explicit(&b->state, memory_order_relaxed);
    if (st == BUS_BREAKER_CLOSED) {
        ok = true;
    } else if (st == BUS_BREAKER_OPEN) {
        uint64_t at = atomic_load_explicit(&b->opened_at, memory_order_relaxed);
        if (now - at >= (uint64_t)b->cfg.open_ms * 1000000u) {
            breaker_set_locked(b, BUS_BREAKER_HALF_OPEN, now);
            from = BUS_BREAKER_OPEN;
            b->probes_in_flight = 1;
            ok = true;
        }
    } else if (b->probes_in_flight < b->cfg.half_open_probes) {
        b->probes_in_flight++;
        ok = true;
    }
    bus__mutex_unlock(&b->mtx);
    if (from >= 0)
        breaker_notify(b, from, BUS_BREAKER_HALF_OPEN);
    if (!ok)
        atomic_fetch_add_explicit(&b->rejections, 1, memory_order_relaxed);
    return ok;
}

/* The shard this thread writes; *owned: it is the only writer. */
static inline breaker_shard *
breaker_shard_get(bus_breaker *b, bool *owned)
{
    uint32_t k = bus__thread_slot();

    *owned = __builtin_expect(k <= BREAKER_SHARDS, 1);
    return &b->shards[*owned ? k - 1 : BREAKER_SHARDS];
}

static inline void
cell32_add(_Atomic uint32_t *c, bool owned)
{
    if (owned)
        atomic_store_explicit(
            c, atomic_load_explicit(c, memory_order_relaxed) + 1,
            memory_order_relaxed);
    else
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* Sets bk to epoch with zero counts, unless it is there already. Owner:
 * counts first, then the epoch with release (readers acquire it). Shared
 * shard: the CAS elects one resetter; a racing recorder may lose a
 * count. */
static inline void
breaker_bucket_enter(breaker_bucket *bk, uint64_t epoch, bool owned)
{
    uint64_t e = atomic_load_explicit(&bk->epoch, memory_order_relaxed);

    if (e == epoch)
        return;
    if (owned) {
        atomic_store_explicit(&bk->calls, 0, memory_order_relaxed);
        atomic_store_explicit(&bk->fails, 0, memory_order_relaxed);
        atomic_store_explicit(&bk->epoch, epoch, memory_order_release);
    } else if (atomic_compare_exchange_strong_explicit(
                   &bk->epoch, &e, epoch, memory_order_relaxed,
                   memory_order_relaxed)) {
        atomic_store_explicit(&bk->calls, 0, memory_order_relaxed);
        atomic_store_explicit(&bk->fails, 0, memory_order_relaxed);
    }
}

/* Brings sh to the breaker's window generation gen: clears its buckets. */
static void
breaker_shard_renew(breaker_shard *sh, uint32_t gen, bool owned)
{
    uint32_t g = atomic_load_explicit(&sh->gen, memory_order_relaxed);

    if (!owned
        && !atomic_compare_exchange_strong_explicit(
            &sh->gen, &g, gen, memory_order_relaxed, memory_order_relaxed))
        return; /* another thread renewed it */
    for (size_t i = 0; i < BREAKER_BUCKETS; i++) {
        atomic_store_explicit(&sh->buckets[i].calls, 0, memory_order_relaxed);
        atomic_store_explicit(&sh->buckets[i].fails, 0, memory_order_relaxed);
        atomic_store_explicit(&sh->buckets[i].epoch, 0, memory_order_relaxed);
    }
    if (owned) {
        sh->cur_hi = 0; /* no current bucket */
        /* release: the cleared buckets before the gen readers acquire */
        atomic_store_explicit(&sh->gen, gen, memory_order_release);
    }
}

/* Adds the outcome to this thread's shard of the window; returns the
 * bucket epoch of now. */
static inline uint64_t
breaker_window_add(bus_breaker *b, breaker_shard *sh, bool owned,
                   bool success, uint64_t now, uint32_t gen)
{
    breaker_bucket *bk;
    uint64_t epoch;

    if (__builtin_expect(atomic_load_explicit(&sh->gen, memory_order_relaxed)
                             != gen,
                         0))
        breaker_shard_renew(sh, gen, owned);
    if (owned && now >= sh->cur_lo && now < sh->cur_hi) {
        epoch = sh->cur_epoch; /* same bucket as last time: no division */
        bk = &sh->buckets[sh->cur_idx];
    } else {
        epoch = now / b->bucket_ns;
        bk = &sh->buckets[epoch % BREAKER_BUCKETS];
        breaker_bucket_enter(bk, epoch, owned);
        if (owned) {
            sh->cur_epoch = epoch;
            sh->cur_idx = (uint32_t)(epoch % BREAKER_BUCKETS);
            sh->cur_lo = epoch * b->bucket_ns;
            sh->cur_hi = sh->cur_lo + b->bucket_ns;
        }
    }
    cell32_add(&bk->calls, owned);
    if (!success)
        cell32_add(&bk->fails, owned);
    return epoch;
}

/* True when the rate rule says open: sums the window over the shards of
 * generation gen (relaxed: concurrent outcomes may or may not count). */
static bool
breaker_window_open(bus_breaker *b, uint64_t epoch, uint32_t gen)
{
    uint64_t calls = 0, fails = 0;

    for (size_t s = 0; s <= BREAKER_SHARDS; s++) {
        breaker_shard *sh = &b->shards[s];
        /* acquire: a renewed shard's cleared buckets (release) */
        if (atomic_load_explicit(&sh->gen, memory_order_acquire) != gen)
            continue;
        for (size_t i = 0; i < BREAKER_BUCKETS; i++) {
            breaker_bucket *x = &sh->buckets[i];
            /* acquire: a bucket's zeroed counts before its new epoch */
            uint64_t xe = atomic_load_explicit(&x->epoch,
                                               memory_order_acquire);
            if (xe + BREAKER_BUCKETS <= epoch || xe > epoch)
                continue; /* outside the window */
            calls += atomic_load_explicit(&x->calls, memory_order_relaxed);
            fails += atomic_load_explicit(&x->fails, memory_order_relaxed);
        }
    }
    return calls >= b->cfg.min_calls
        && (double)fails >= b->cfg.failure_rate * (double)calls;
}

void
bus_breaker_record(bus_breaker *b, bool success)
{
    bus__breaker_record_at(b, success, 0);
}

static void breaker_record_slow(bus_breaker *b, bool success,
                                uint64_t mono_now, int st);

/* The common case inline: a success on a CLOSED breaker, recorded by a
 * thread with a shard of its own in the bucket it used last time. Plain
 * loads and stores only; everything else goes to breaker_record_slow. */
void
bus__breaker_record_at(bus_breaker *b, bool success, uint64_t mono_now)
{
    /* acquire: a transition to CLOSED published its new gen */
    int st = atomic_load_explicit(&b->state, memory_order_acquire);
    uint32_t k = bus__thread_slot();

    if (__builtin_expect(success && st == BUS_BREAKER_CLOSED
                             && k <= BREAKER_SHARDS,
                         1)) {
        breaker_shard *sh = &b->shards[k - 1];
        uint64_t now = bus__clock_is_mono(&b->cfg.clock) ? mono_now : 0;

        if (b->rate_rule) {
            breaker_bucket *bk;
            if (now == 0 || now < sh->cur_lo || now >= sh->cur_hi
                || atomic_load_explicit(&sh->gen, memory_order_relaxed)
                       != atomic_load_explicit(&b->gen, memory_order_relaxed))
                goto slow;
            bk = &sh->buckets[sh->cur_idx];
            cell32_add(&bk->calls, true);
        }
        bus__cell_add(&sh->calls, 1, true);
        /* Written only on the first success after a failure. */
        if (atomic_load_explicit(&b->consecutive, memory_order_relaxed))
            atomic_store_explicit(&b->consecutive, 0, memory_order_relaxed);
        return;
    }
slow:
    breaker_record_slow(b, success, mono_now, st);
}

static void
breaker_record_slow(bus_breaker *b, bool success, uint64_t mono_now, int st)
{
    int from = -1, to = -1;
    uint64_t now = 0;
    bool open = false, owned;
    breaker_shard *sh = breaker_shard_get(b, &owned);

    if (mono_now != 0 && bus__clock_is_mono(&b->cfg.clock))
        now = mono_now; /* the delivery's stamp: no clock read */

    bus__cell_add(&sh->calls, 1, owned);
    if (!success)
        bus__cell_add(&sh->failures, 1, owned);
    if (st == BUS_BREAKER_CLOSED) {
        uint32_t gen = atomic_load_explicit(&b->gen, memory_order_relaxed);
        uint64_t epoch = 0;

        if (b->rate_rule) {
            if (now == 0)
                now = bus_clock_now(&b->cfg.clock);
            epoch = breaker_window_add(b, sh, owned, success, now, gen);
        }
        if (success) {
            /* Written only on the first success after a failure. */
            if (atomic_load_explicit(&b->consecutive, memory_order_relaxed))
                atomic_store_explicit(&b->consecutive, 0,
                                      memory_order_relaxed);
            return;
        }
        uint32_t c = atomic_fetch_add_explicit(&b->consecutive, 1,
                                               memory_order_relaxed) + 1;
        if (c >= b->cfg.failure_threshold)
            open = true;
        else if (b->rate_rule)
            open = breaker_window_open(b, epoch, gen);
        if (!open)
            return;
        if (now == 0)
            now = bus_clock_now(&b->cfg.clock);
        bus__mutex_lock(&b->mtx);
        if (atomic_load_explicit(&b->state, memory_order_relaxed)
            == BUS_BREAKER_CLOSED) {
            breaker_set_locked(b, BUS_BREAKER_OPEN, now);
            from = BUS_BREAKER_CLOSED;
            to = BUS_BREAKER_OPEN;
        }
        bus__mutex_unlock(&b->mtx);
    } else {
        if (now == 0)
            now = bus_clock_now(&b->cfg.clock);
        bus__mutex_lock(&b->mtx);
        st = atomic_load_explicit(&b->state, memory_order_relaxed);
        if (st == BUS_BREAKER_HALF_OPEN) {
            if (b->probes_in_flight > 0)
                b->probes_in_flight--;
            if (!success) {
                breaker_set_locked(b, BUS_BREAKER_OPEN, now);
                from = BUS_BREAKER_HALF_OPEN;
                to = BUS_BREAKER_OPEN;
            } else if (++b->probe_successes >= b->cfg.close_successes) {
                breaker_set_locked(b, BUS_BREAKER_CLOSED, now);
                from = BUS_BREAKER_HALF_OPEN;
                to = BUS_BREAKER_CLOSED;
            }
        }
        /* OPEN: a call allowed before it opened finished late; counted. */
        bus__mutex_unlock(&b->mtx);
    }
    if (from >= 0)
        breaker_notify(b, from, to);
}

void
bus_breaker_reset(bus_breaker *b)
{
    int from;

    bus__mutex_lock(&b->mtx);
    from = atomic_load_explicit(&b->state, memory_order_relaxed);
    breaker_set_locked(b, BUS_BREAKER_CLOSED, 0);
    bus__mutex_unlock(&b->mtx);
    if (from != BUS_BREAKER_CLOSED)
        breaker_notify(b, from, BUS_BREAKER_CLOSED);
}

void
bus_breaker_stats_get(bus_breaker *b, bus_breaker_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->state = bus_breaker_state_get(b);
    for (size_t i = 0; i <= BREAKER_SHARDS; i++) {
        st->calls += atomic_load_explicit(&b->shards[i].calls,
                                          memory_order_relaxed);
        st->failures += atomic_load_explicit(&b->shards[i].failures,
                                             memory_order_relaxed);
    }
    st->rejections = atomic_load_explicit(&b->rejections,
                                          memory_order_relaxed);
    st->opened = atomic_load_explicit(&b->opened, memory_order_relaxed);
    st->consecutive_failures = atomic_load_explicit(&b->consecutive,
                                                    memory_order_relaxed);
    if (st->state == BUS_BREAKER_OPEN) {
        uint64_t at = atomic_load_explicit(&b->opened_at,
                                           memory_order_relaxed);
        uint64_t until = at + (uint64_t)b->cfg.open_ms * 1000000u;
        uint64_t now = bus_clock_now(&b->cfg.clock);
        st->retry_in_ns = until > now ? until - now : 0;
    }
}

/* ---- Registry ----------------------------------------------------------- */

int
bus_breaker_registry_new(bus_breaker_registry **out,
                         bus_breaker_state_fn on_state, void *opaque)
{
    bus_breaker_registry *r;

    *out = NULL;
    if ((r = bus__zalloc(sizeof(*r))) == NULL)
        return BUS_ENOMEM;
    bus__mutex_init(&r->mtx);
    r->on_state = on_state;
    r->opaque = opaque;
    *out = r;
    return BUS_OK;
}

void
bus_breaker_registry_free(bus_breaker_registry *r)
{
    bus_breaker *b, *n;

    if (r == NULL)
        return;
    for (b = r->head; b != NULL; b = n) {
        n = b->reg_next;
        bus_breaker_free(b);
    }
    bus__mutex_fini(&r->mtx);
    bus__free(r, sizeof(*r));
}

int
bus_breaker_registry_get(bus_breaker_registry *r, const char *name,
                         const bus_breaker_config *cfg, bus_breaker **out)
{
    bus_breaker *b;
    bus_breaker_config c;
    int rv = BUS_OK;

    *out = NULL;
    if (name == NULL || name[0] == '\0' || strlen(name) >= 128)
        return BUS_EINVAL;
    bus__mutex_lock(&r->mtx);
    for (b = r->head; b != NULL; b = b->reg_next)
        if (strcmp(b->name, name) == 0)
            break;
    if (b == NULL && cfg == NULL) {
        rv = BUS_ENOTFOUND;
    } else if (b == NULL) {
        c = *cfg;
        c.name = name;
        if ((rv = bus_breaker_new(&b, &c)) == BUS_OK) {
            b->reg = r;
            if (r->tail != NULL)
                r->tail->reg_next = b;
            else
                r->head = b;
            r->tail = b;
        }
    }
    bus__mutex_unlock(&r->mtx);
    *out = b;
    return rv;
}

int
bus_breaker_registry_snapshot(bus_breaker_registry *r, bus_breaker_info **out,
                              size_t *n)
{
    bus_breaker *b;
    size_t cnt = 0, i = 0;
    bus_breaker_info *v;

    *out = NULL;
    *n = 0;
    bus__mutex_lock(&r->mtx);
    for (b = r->head; b != NULL; b = b->reg_next)
        cnt++;
    if ((v = bus__zalloc(cnt ? cnt * sizeof(*v) : 1)) == NULL) {
        bus__mutex_unlock(&r->mtx);
        return BUS_ENOMEM;
    }
    for (b = r->head; b != NULL; b = b->reg_next, i++) {
        snprintf(v[i].name, sizeof(v[i].name), "%s", b->name);
        bus_breaker_stats_get(b, &v[i].stats);
    }
    bus__mutex_unlock(&r->mtx);
    *out = v;
    *n = cnt;
    return BUS_OK;
}

void
bus_breaker_snapshot_free(bus_breaker_info *infos, size_t n)
{
    if (infos != NULL)
        bus__free(infos, n ? n * sizeof(*infos) : 1);
}

size_t
bus_breaker_registry_open_count(bus_breaker_registry *r)
{
    return atomic_load_explicit(&r->not_closed, memory_order_relaxed);
}
