/*
 * Bus benchmarks, each against a raw baseline measured in the same run
 * (bench/bench.h prints ours, raw, the ratio and the target):
 *
 *  1. inline publish -> handler, one exact subscription, a pre-built
 *     event; raw: a direct call through a function pointer;
 *  2. queued, 1 publisher -> 1 worker, an event created per publish;
 *     raw: a plain SPSC ring of pointers between two pinned threads that
 *     publishes its tail in batches;
 *  3. queued, 4 publishers -> 2 workers: events/s (no raw equivalent);
 *  4. latency publish -> handler (p50/p99) with the busy-spin and the
 *     blocking wait strategies; raw: the SPSC ring's one-way latency and a
 *     condition-variable hand-off;
 *  5. publish cost with 1 vs 10,000 subscriptions that do not match the
 *     topic (the index), on one topic and on topics that defeat the cache.
 *
 * Threads are pinned with pthread_setaffinity_np: the bench's own threads
 * directly, the library's worker from its first handler call (a handler
 * may do that to its thread), so ours and raw run on the same cores.
 * BUS_BENCH_SCALE scales the iteration counts (bench_iters).
 */
#define _GNU_SOURCE /* pthread_setaffinity_np, CPU_SET */
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bus/bus.h>

#include "bench.h"

#define CACHELINE 64

static int n_cpus = 1;

/* Pins the calling thread to cpu (mod the cores we have). */
static void
pin_self(int cpu)
{
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu % n_cpus, &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void
unpin_self(void)
{
    cpu_set_t set;
    int i;

    CPU_ZERO(&set);
    for (i = 0; i < n_cpus; i++)
        CPU_SET(i, &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void
die(const char *what, int rv)
{
    fprintf(stderr, "bench_bus: %s: %s\n", what, bus_strerror(rv));
    exit(1);
}

static bus_ctx *
open_ctx(uint32_t workers, bus_wait wait, uint32_t capacity)
{
    bus_ctx_config c;
    bus_ctx *ctx;
    int rv;

    bus_ctx_config_init(&c);
    c.name = "bench";
    c.workers = workers;
    c.wait = wait;
    if (capacity != 0)
        c.queue_capacity = capacity;
    c.block_timeout_ms = -1; /* benches wait for room, never fail */
    if ((rv = bus_ctx_open(&ctx, &c)) != BUS_OK)
        die("bus_ctx_open", rv);
    return ctx;
}

static void
subscribe(bus_ctx *ctx, const char *pattern, bus_handler_fn fn, void *op,
          bus_dispatch dispatch)
{
    bus_sub_config sc;
    int rv;

    bus_sub_config_init(&sc);
    sc.dispatch = dispatch;
    if ((rv = bus_subscribe(ctx, pattern, fn, op, &sc, NULL)) != BUS_OK)
        die("bus_subscribe", rv);
}

static bus_event *
make_event(uint64_t v)
{
    bus_event_init in;
    bus_event *e;
    int rv;

    memset(&in, 0, sizeof(in));
    in.type = "bench.event";
    in.payload = &v;
    in.payload_len = sizeof(v);
    if ((rv = bus_event_create(&e, &in)) != BUS_OK)
        die("bus_event_create", rv);
    return e;
}

static void
publish(bus_ctx *ctx, const char *topic, bus_event *e)
{
    int rv = bus_publish(ctx, topic, e, 0);

    if (rv != BUS_OK)
        die("bus_publish", rv);
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static void
percentiles(uint64_t *v, size_t n, double *p50, double *p99)
{
    qsort(v, n, sizeof(*v), cmp_u64);
    *p50 = (double)v[n / 2];
    *p99 = (double)v[n * 99 / 100];
}

/* ---- 1. Inline publish -> handler --------------------------------------- */

static uint64_t inline_hits; /* the publisher's thread only */

static bus_result
inline_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    (void)opaque;
    inline_hits++;
    return BUS_ACK;
}

/* The raw baseline: the same work through a function pointer the
 * compiler cannot see through. */
typedef bus_result (*raw_fn)(void *arg, void *opaque);

static bus_result
raw_handler(void *arg, void *opaque)
{
    (void)arg;
    (*(uint64_t *)opaque)++;
    return BUS_ACK;
}

static raw_fn volatile raw_ptr = raw_handler;

static double
raw_call_ns(uint64_t n)
{
    uint64_t hits = 0, i, t0;
    char arg[64];

    t0 = bench_now_ns();
    for (i = 0; i < n; i++)
        BENCH_KEEP(raw_ptr(arg, &hits));
    BENCH_KEEP(hits);
    return (double)(bench_now_ns() - t0) / (double)n;
}

/* ns per publish of a pre-built event to topic (one more reference per
 * publish, which the publish takes). */
static double
inline_publish_ns(bus_ctx *ctx, const char *topic, uint64_t n)
{
    bus_event *e = make_event(1);
    uint64_t i, t0;

    publish(ctx, topic, bus_event_ref(e)); /* warm: cache, freeze */
    t0 = bench_now_ns();
    for (i = 0; i < n; i++)
        publish(ctx, topic, bus_event_ref(e));
    t0 = bench_now_ns() - t0;
    bus_event_unref(e);
    return (double)t0 / (double)n;
}

static void
bench_inline(void)
{
    uint64_t n = bench_iters(10000000);
    bus_ctx *ctx = open_ctx(1, BUS_WAIT_BLOCK, 0);
    double ours, raw;
    char target[64];

    pin_self(0);
    subscribe(ctx, "bench.inline", inline_handler, NULL, BUS_DISPATCH_INLINE);
    raw = raw_call_ns(n);
    ours = inline_publish_ns(ctx, "bench.inline", n);
    raw = (raw + raw_call_ns(n)) / 2; /* around ours: same conditions */
    if (inline_hits != n + 1)
        die("inline handler count", BUS_EINTERNAL);
    snprintf(target, sizeof(target), "<= 25 ns and <= 8x raw");
    bench_row("inline publish->handler (1 exact sub)", "ns/event", ours, raw,
              target, ours <= 25.0 && ours <= 8 * raw);
    bus_ctx_close(ctx);
    unpin_self();
}

/* ---- Raw SPSC ring of pointers
 * ------------------------------------------------ */

#define RING_CAP 4096 /* as the bus's default shard queue */
#define RING_BATCH 32 /* producer publishes its tail every this many */

typedef struct spsc {
    _Alignas(CACHELINE) _Atomic uint64_t tail; /* producer -> consumer */
    _Alignas(CACHELINE) _Atomic uint64_t head; /* consumer -> producer */
    _Alignas(CACHELINE) void *slot[RING_CAP];
} spsc;

typedef struct item {
    uint64_t v;
    char pad[56];
} item;

typedef struct spsc_run {
    spsc *r;
    uint64_t n;
    uint64_t sum;
    int cpu;
} spsc_run;

static void *
spsc_consumer(void *arg)
{
    spsc_run *s = arg;
    spsc *r = s->r;
    uint64_t head = 0, sum = 0;

    pin_self(s->cpu);
    while (head < s->n) {
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        if (tail == head) {
            __builtin_ia32_pause();
            continue;
        }
        for (; head < tail; head++)
            sum += ((item *)r->slot[head & (RING_CAP - 1)])->v;
        atomic_store_explicit(&r->head, head, memory_order_release);
    }
    s->sum = sum;
    return NULL;
}

/* Millions of items per second through the ring, producer on cpu 0 and
 * consumer on cpu 1. */
static double
raw_spsc_mps(uint64_t n)
{
    static item items[1024];
    spsc *r = aligned_alloc(CACHELINE, sizeof(spsc));
    spsc_run s = {r, n, 0, 1};
    uint64_t tail = 0, head_cache = 0, t0, i;
    pthread_t th;

    memset(r, 0, sizeof(*r));
    for (i = 0; i < 1024; i++)
        items[i].v = 1;
    pin_self(0);
    pthread_create(&th, NULL, spsc_consumer, &s);
    t0 = bench_now_ns();
    for (i = 0; i < n; i++) {
        while (tail - head_cache >= RING_CAP) {
            /* Full: publish what we have, then look at the head. */
            atomic_store_explicit(&r->tail, tail, memory_order_release);
            head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        }
        r->slot[tail & (RING_CAP - 1)] = &items[i & 1023];
        tail++;
        if ((tail & (RING_BATCH - 1)) == 0)
            atomic_store_explicit(&r->tail, tail, memory_order_release);
    }
    atomic_store_explicit(&r->tail, tail, memory_order_release);
    pthread_join(th, NULL);
    t0 = bench_now_ns() - t0;
    if (s.sum != n)
        die("raw ring sum", BUS_EINTERNAL);
    free(r);
    unpin_self();
    return (double)n / (double)t0 * 1e3;
}

/* ---- 2./3. Queued throughput
 * ------------------------------------------------- */

typedef struct counter {
    _Alignas(CACHELINE) _Atomic uint64_t n;
    int pin_cpu; /* pin the worker on its first call; -1: no */
    _Atomic int pinned;
} counter;

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    counter *c = opaque;

    (void)d;
    if (c->pin_cpu >= 0 &&
        !atomic_load_explicit(&c->pinned, memory_order_relaxed)) {
        pin_self(c->pin_cpu);
        atomic_store(&c->pinned, 1);
    }
    atomic_fetch_add_explicit(&c->n, 1, memory_order_relaxed);
    return BUS_ACK;
}

static void
wait_count(counter *c, uint64_t n)
{
    while (atomic_load_explicit(&c->n, memory_order_acquire) < n)
        __builtin_ia32_pause();
}

/* 1 publisher (cpu 0) -> 1 worker (cpu 1): millions of events per
 * second, from the first publish to the last handler call. Events are
 * created per publish, or (pre) all made beforehand, which leaves out
 * their allocation and the allocator's cross-thread traffic (the worker
 * frees what the publisher allocated). */
static double
queued_1_1_mps(uint64_t n, bus_wait wait, bool pre)
{
    bus_ctx *ctx = open_ctx(1, wait, 0);
    counter c = {.pin_cpu = 1};
    bus_event **evs = NULL;
    uint64_t i, t0;

    subscribe(ctx, "bench.q", count_handler, &c, BUS_DISPATCH_QUEUED);
    pin_self(0);
    publish(ctx, "bench.q", make_event(0)); /* the worker pins itself */
    wait_count(&c, 1);
    if (pre) {
        if ((evs = malloc(sizeof(*evs) * n)) == NULL)
            die("malloc", BUS_ENOMEM);
        for (i = 0; i < n; i++)
            evs[i] = make_event(i);
    }
    t0 = bench_now_ns();
    for (i = 0; i < n; i++)
        publish(ctx, "bench.q", pre ? evs[i] : make_event(i));
    wait_count(&c, n + 1);
    t0 = bench_now_ns() - t0;
    bus_ctx_close(ctx);
    free(evs);
    unpin_self();
    return (double)n / (double)t0 * 1e3;
}

/* Event creation alone (make + unref), for the record. */
static double
event_create_ns(uint64_t n)
{
    uint64_t i, t0 = bench_now_ns();

    for (i = 0; i < n; i++)
        bus_event_unref(make_event(i));
    return (double)(bench_now_ns() - t0) / (double)n;
}

typedef struct multi_pub {
    bus_ctx *ctx;
    uint64_t n;
    unsigned id;
} multi_pub;

static void *
multi_pub_thread(void *arg)
{
    multi_pub *p = arg;
    uint64_t i;

    for (i = 0; i < p->n; i++) {
        bus_event_init in;
        bus_event *e;
        char stream[24];
        memset(&in, 0, sizeof(in));
        snprintf(stream, sizeof(stream), "s-%u-%" PRIu64, p->id, i % 64);
        in.type = "bench.event";
        in.stream = stream;
        in.payload = &i;
        in.payload_len = sizeof(i);
        if (bus_event_create(&e, &in) != BUS_OK)
            die("bus_event_create", BUS_ENOMEM);
        publish(p->ctx, "bench.m", e);
    }
    return NULL;
}

static double
queued_4_2_mps(uint64_t n)
{
    bus_ctx *ctx = open_ctx(2, BUS_WAIT_SPIN_BLOCK, 0);
    counter c = {.pin_cpu = -1};
    multi_pub p[4];
    pthread_t th[4];
    uint64_t t0;
    int i;

    subscribe(ctx, "bench.m", count_handler, &c, BUS_DISPATCH_QUEUED);
    t0 = bench_now_ns();
    for (i = 0; i < 4; i++) {
        p[i] = (multi_pub){ctx, n / 4, (unsigned)i};
        pthread_create(&th[i], NULL, multi_pub_thread, &p[i]);
    }
    for (i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    wait_count(&c, (n / 4) * 4);
    t0 = bench_now_ns() - t0;
    bus_ctx_close(ctx);
    return (double)((n / 4) * 4) / (double)t0 * 1e3;
}

static void
bench_queued(void)
{
    uint64_t n = bench_iters(3000000);
    double raw, ours, ours_spin, ours_pre, create;
    char target[64];

    raw = raw_spsc_mps(n * 4);
    ours = queued_1_1_mps(n, BUS_WAIT_SPIN_BLOCK, false);
    ours_spin = queued_1_1_mps(n, BUS_WAIT_SPIN, false);
    ours_pre = queued_1_1_mps(n, BUS_WAIT_SPIN, true);
    raw = (raw + raw_spsc_mps(n * 4)) / 2;
    snprintf(target, sizeof(target), ">= 25 M/s and >= 30%% raw");
    bench_row("queued 1 pub -> 1 worker (spin-then-block)", "M ev/s", ours, raw,
              target, ours >= 25.0 && ours >= 0.3 * raw);
    bench_row("queued 1 pub -> 1 worker (busy-spin)", "M ev/s", ours_spin, raw,
              target, ours_spin >= 25.0 && ours_spin >= 0.3 * raw);
    bench_row("  same, events made beforehand", "M ev/s", ours_pre, raw, NULL,
              0);
    create = event_create_ns(n);
    bench_row_plain("  event create + free, one thread", "ns/event", create);
    bench_row_plain("queued 4 pub -> 2 workers", "M ev/s", queued_4_2_mps(n));
}

/* ---- 4. Latency
 * ------------------------------------------------------------------ */

typedef struct lat {
    _Alignas(CACHELINE) _Atomic uint64_t t_pub; /* set before publish */
    _Alignas(CACHELINE) _Atomic uint64_t done;  /* samples handled */
    uint64_t *samples;
    int pin_cpu;
    bool pinned;
} lat;

static bus_result
lat_handler(bus_delivery *d, void *opaque)
{
    lat *l = opaque;
    uint64_t now = bench_now_ns();
    uint64_t k = atomic_load_explicit(&l->done, memory_order_relaxed);

    (void)d;
    if (!l->pinned) {
        pin_self(l->pin_cpu);
        l->pinned = true;
    }
    l->samples[k] = now - atomic_load_explicit(&l->t_pub, memory_order_relaxed);
    atomic_store_explicit(&l->done, k + 1, memory_order_release);
    return BUS_ACK;
}

/* One event at a time (unloaded latency): the publisher notes the time,
 * publishes, and waits until the handler took its sample. */
static void
ours_latency(bus_wait wait, uint64_t n, double *p50, double *p99)
{
    bus_ctx *ctx = open_ctx(1, wait, 0);
    lat l;
    uint64_t i, warm = 1000;

    memset(&l, 0, sizeof(l));
    l.samples = calloc(n + warm, sizeof(uint64_t));
    l.pin_cpu = 1;
    subscribe(ctx, "bench.lat", lat_handler, &l, BUS_DISPATCH_QUEUED);
    pin_self(0);
    for (i = 0; i < n + warm; i++) {
        bus_event *e = make_event(i);
        atomic_store_explicit(&l.t_pub, bench_now_ns(), memory_order_relaxed);
        publish(ctx, "bench.lat", e);
        while (atomic_load_explicit(&l.done, memory_order_acquire) <= i)
            __builtin_ia32_pause();
    }
    percentiles(l.samples + warm, n, p50, p99);
    free(l.samples);
    bus_ctx_close(ctx);
    unpin_self();
}

typedef struct raw_lat {
    spsc *r;
    uint64_t n;
    uint64_t *samples;
    _Alignas(CACHELINE) _Atomic uint64_t done;
    /* condvar hand-off */
    pthread_mutex_t mtx;
    pthread_cond_t cond;
    uint64_t slot_t;
    bool ready;
} raw_lat;

static void *
raw_ring_lat_consumer(void *arg)
{
    raw_lat *l = arg;
    uint64_t head = 0;

    pin_self(1);
    while (head < l->n) {
        uint64_t tail = atomic_load_explicit(&l->r->tail, memory_order_acquire);
        if (tail == head) {
            __builtin_ia32_pause();
            continue;
        }
        uint64_t now = bench_now_ns();
        uint64_t t = (uint64_t)(uintptr_t)l->r->slot[head & (RING_CAP - 1)];
        l->samples[head] = now - t;
        head++;
        atomic_store_explicit(&l->r->head, head, memory_order_release);
        atomic_store_explicit(&l->done, head, memory_order_release);
    }
    return NULL;
}

static void
raw_ring_latency(uint64_t n, double *p50, double *p99)
{
    raw_lat l;
    pthread_t th;
    uint64_t i, warm = 1000;

    memset(&l, 0, sizeof(l));
    l.r = aligned_alloc(CACHELINE, sizeof(spsc));
    memset(l.r, 0, sizeof(*l.r));
    l.n = n + warm;
    l.samples = calloc(n + warm, sizeof(uint64_t));
    pin_self(0);
    pthread_create(&th, NULL, raw_ring_lat_consumer, &l);
    for (i = 0; i < n + warm; i++) {
        l.r->slot[i & (RING_CAP - 1)] = (void *)(uintptr_t)bench_now_ns();
        atomic_store_explicit(&l.r->tail, i + 1, memory_order_release);
        while (atomic_load_explicit(&l.done, memory_order_acquire) <= i)
            __builtin_ia32_pause();
    }
    pthread_join(th, NULL);
    percentiles(l.samples + warm, n, p50, p99);
    free(l.samples);
    free(l.r);
    unpin_self();
}

static void *
raw_cond_lat_consumer(void *arg)
{
    raw_lat *l = arg;
    uint64_t k;

    pin_self(1);
    for (k = 0; k < l->n; k++) {
        uint64_t t;
        pthread_mutex_lock(&l->mtx);
        while (!l->ready)
            pthread_cond_wait(&l->cond, &l->mtx);
        l->ready = false;
        t = l->slot_t;
        pthread_mutex_unlock(&l->mtx);
        l->samples[k] = bench_now_ns() - t;
        atomic_store_explicit(&l->done, k + 1, memory_order_release);
    }
    return NULL;
}

static void
raw_cond_latency(uint64_t n, double *p50, double *p99)
{
    raw_lat l;
    pthread_t th;
    uint64_t i, warm = 1000;

    memset(&l, 0, sizeof(l));
    pthread_mutex_init(&l.mtx, NULL);
    pthread_cond_init(&l.cond, NULL);
    l.n = n + warm;
    l.samples = calloc(n + warm, sizeof(uint64_t));
    pin_self(0);
    pthread_create(&th, NULL, raw_cond_lat_consumer, &l);
    for (i = 0; i < n + warm; i++) {
        pthread_mutex_lock(&l.mtx);
        l.slot_t = bench_now_ns();
        l.ready = true;
        pthread_cond_signal(&l.cond);
        pthread_mutex_unlock(&l.mtx);
        while (atomic_load_explicit(&l.done, memory_order_acquire) <= i)
            __builtin_ia32_pause();
    }
    pthread_join(th, NULL);
    percentiles(l.samples + warm, n, p50, p99);
    free(l.samples);
    pthread_cond_destroy(&l.cond);
    pthread_mutex_destroy(&l.mtx);
    unpin_self();
}

static void
bench_latency(void)
{
    uint64_t n = bench_iters(200000);
    uint64_t nb = bench_iters(100000); /* blocking: ~50 us per sample */
    double o50, o99, r50, r99;

    raw_ring_latency(n, &r50, &r99);
    ours_latency(BUS_WAIT_SPIN, n, &o50, &o99);
    bench_row("latency p50, busy-spin wait (vs raw ring)", "ns", o50, r50, NULL,
              0);
    bench_row("latency p99, busy-spin wait (vs raw ring)", "ns", o99, r99, NULL,
              0);
    raw_cond_latency(nb, &r50, &r99);
    ours_latency(BUS_WAIT_BLOCK, nb, &o50, &o99);
    bench_row("latency p50, blocking wait (vs raw condvar)", "ns", o50, r50,
              NULL, 0);
    bench_row("latency p99, blocking wait (vs raw condvar)", "ns", o99, r99,
              NULL, 0);
    ours_latency(BUS_WAIT_SPIN_BLOCK, nb, &o50, &o99);
    bench_row_plain("latency p50, spin-then-block (default)", "ns", o50);
    bench_row_plain("latency p99, spin-then-block (default)", "ns", o99);
}

/* ---- 5. Publish cost vs non-matching subscriptions
 * ----------------------------- */

#define TOPICS 8192 /* more than the default topic cache (4096) */

static char topics[TOPICS][32];

/* ns per publish of a pre-built event to topics cycling over k of them
 * (k = 1: one topic, served from the topic cache). */
static double
cycle_publish_ns(bus_ctx *ctx, uint64_t n, unsigned k)
{
    bus_event *e = make_event(1);
    uint64_t i, t0;
    unsigned j;

    for (j = 0; j < k; j++) /* warm */
        publish(ctx, topics[j], bus_event_ref(e));
    t0 = bench_now_ns();
    for (i = 0; i < n; i++)
        publish(ctx, topics[i % k], bus_event_ref(e));
    t0 = bench_now_ns() - t0;
    bus_event_unref(e);
    return (double)t0 / (double)n;
}

static void
add_nonmatching(bus_ctx *ctx, unsigned from, unsigned to)
{
    char pat[48];
    unsigned i;

    for (i = from; i < to; i++) {
        /* Siblings of the published topics, deeper ones, and wildcards
         * elsewhere in the tree: none matches "bench.idx.t<j>". */
        switch (i % 4) {
        case 0:
            snprintf(pat, sizeof(pat), "bench.idx.m%u", i);
            break;
        case 1:
            snprintf(pat, sizeof(pat), "bench.idx.t%u.x", i);
            break;
        case 2:
            snprintf(pat, sizeof(pat), "other.%u.*", i);
            break;
        default:
            snprintf(pat, sizeof(pat), "bench.*.m%u.>", i);
            break;
        }
        subscribe(ctx, pat, inline_handler, NULL, BUS_DISPATCH_INLINE);
    }
}

static void
bench_index(void)
{
    uint64_t n = bench_iters(3000000);
    bus_ctx *ctx = open_ctx(1, BUS_WAIT_BLOCK, 0);
    double one_hot, one_cold, many_hot, many_cold;
    unsigned j;

    pin_self(0);
    for (j = 0; j < TOPICS; j++)
        snprintf(topics[j], sizeof(topics[j]), "bench.idx.t%u", j);
    subscribe(ctx, "bench.idx.*", inline_handler, NULL, BUS_DISPATCH_INLINE);
    add_nonmatching(ctx, 0, 1);
    one_hot = cycle_publish_ns(ctx, n, 1);
    one_cold = cycle_publish_ns(ctx, n, TOPICS);
    add_nonmatching(ctx, 1, 10000);
    many_hot = cycle_publish_ns(ctx, n, 1);
    many_cold = cycle_publish_ns(ctx, n, TOPICS);
    bench_row("publish, 10k vs 1 non-matching subs", "ns/event", many_hot,
              one_hot, "<= 1.5x", many_hot <= 1.5 * one_hot);
    bench_row("  same, 8192 topics (past the topic cache)", "ns/event",
              many_cold, one_cold, "<= 1.5x", many_cold <= 1.5 * one_cold);
    bus_ctx_close(ctx);
    unpin_self();
}

int
main(void)
{
    n_cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_cpus < 1)
        n_cpus = 1;
    bench_header("bus (libbus/src/ctx.c)");
    bench_inline();
    bench_queued();
    bench_latency();
    bench_index();
    return 0;
}
