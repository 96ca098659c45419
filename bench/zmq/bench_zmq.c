/*
 * ZeroMQ broker benchmarks, each against raw libzmq in the same run
 * (bench/bench.h prints ours, raw, the ratio and the target):
 *
 *  1. fanout throughput, tcp and ipc: events/s from one publisher to one
 *     subscriber in another broker. Ours: bus_event_new (100-byte
 *     payload) + bus_broker_publish on the hub; a peer broker attached to
 *     a bus context delivers to an inline handler. Raw: an XPUB
 *     (ZMQ_XPUB_NODROP, retrying at the HWM, as our hwm_wait does) sends
 *     [topic][100 bytes] to a SUB thread. Same HWM (10000). Target: ours
 *     >= 80% of raw.
 *  2. reliable throughput, tcp and ipc: ours: a peer publishes (window
 *     4096, blocking when full) to the hub, whose inline handler acks;
 *     the clock stops when the last event is handled and every publish
 *     is acked. Raw: PUSH -> PULL with 100-byte messages, no acks.
 *     Target: ours >= 50% of raw.
 *  3. round-trip latency over tcp, p50 and p99: ours: a ping published
 *     on one hub reaches a handler in another context (through a peer),
 *     which publishes the pong on a second hub back to the first context
 *     (fanout); the same through one reliable hub and its peer. Raw:
 *     REQ/REP with 100 bytes. No target (reported).
 *
 * Each throughput figure is the best of ROUNDS runs, ours and raw
 * interleaved so that drifts on a shared machine hit both. The whole
 * program runs in well under a minute at BUS_BENCH_SCALE=1.
 *
 * On a shared machine wall figures swing with the load; these print what
 * swings less, per run, to stderr:
 *  BUS_BENCH_VERBOSE=1  events/s, process CPU ns per event, voluntary +
 *                       involuntary context switches per 1000 events, the
 *                       load average, and the brokers' counters;
 *  BUS_BENCH_THREADS=1  (with VERBOSE) CPU ns per event of each thread;
 *  BUS_BENCH_STALL=1    the brokers' counters whenever the handler count
 *                       stood still for 200 ms (finding stalls).
 */
#include <pthread.h>
#include <sched.h>
#include <dirent.h>
#include <sys/resource.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include <bus/broker.h>
#include <bus/broker_zmq.h>
#include <bus/bus.h>

#include "bench.h"

#define PAYLOAD 100
#define HWM 10000
#define ROUNDS 7

static unsigned char g_payload[PAYLOAD];
static char g_dir[] = "/tmp/bus-bench-zmq-XXXXXX";

static void
die(const char *what, int rv)
{
    fprintf(stderr, "bench_zmq: %s: %s\n", what, bus_err_name(rv));
    exit(1);
}

static bus_broker *
open_broker(const char *uri)
{
    char err[256];
    bus_broker *b = NULL;
    int rv = bus_broker_open_uri(&b, uri, err, sizeof(err));

    if (rv != BUS_OK) {
        fprintf(stderr, "bench_zmq: open %s: %s (%s)\n", uri, bus_err_name(rv),
                err);
        exit(1);
    }
    return b;
}

static bus_broker *
open_peer(bus_broker *hub, const char *opts)
{
    char uri[600];

    snprintf(uri, sizeof(uri), "zmq+%s?bind=0&%s", bus_broker_zmq_endpoint(hub),
             opts);
    return open_broker(uri);
}

static bus_ctx *
open_ctx(void)
{
    bus_ctx_config c;
    bus_ctx *ctx;
    int rv;

    bus_ctx_config_init(&c);
    c.workers = 1;
    if ((rv = bus_ctx_open(&ctx, &c)) != BUS_OK)
        die("bus_ctx_open", rv);
    return ctx;
}

/* ---- Cost accounting (BUS_BENCH_VERBOSE) ----------------------------------
 * Wall time swings with the load of a shared machine; the process's CPU
 * time and context switches per event swing much less, so verbose runs
 * print them beside each figure. */

#define COST_THREADS 16

typedef struct cost {
    uint64_t wall_ns, cpu_ns;
    long vcsw, ivcsw;
    int nt; /* threads: tid, name, CPU time (schedstat) */
    int tid[COST_THREADS];
    char name[COST_THREADS][20];
    uint64_t run_ns[COST_THREADS];
} cost;

/* Reads each thread's name and run time from /proc (Linux). */
static void
cost_threads(cost *c)
{
    DIR *dir = opendir("/proc/self/task");
    struct dirent *de;
    char path[128];

    c->nt = 0;
    if (dir == NULL)
        return;
    while (c->nt < COST_THREADS && (de = readdir(dir)) != NULL) {
        int tid = atoi(de->d_name);
        unsigned long long run = 0;
        FILE *f;
        if (tid <= 0)
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%d/schedstat",
                 (int)getpid(), tid);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        if (fscanf(f, "%llu", &run) != 1)
            run = 0;
        fclose(f);
        snprintf(path, sizeof(path), "/proc/%d/task/%d/comm", (int)getpid(),
                 tid);
        c->name[c->nt][0] = '\0';
        if ((f = fopen(path, "r")) != NULL) {
            if (fgets(c->name[c->nt], sizeof(c->name[0]), f) == NULL)
                c->name[c->nt][0] = '\0';
            c->name[c->nt][strcspn(c->name[c->nt], "\n")] = '\0';
            fclose(f);
        }
        c->tid[c->nt] = tid;
        c->run_ns[c->nt] = run;
        c->nt++;
    }
    closedir(dir);
}

static bool
verbose(void)
{
    return getenv("BUS_BENCH_VERBOSE") != NULL;
}

static void
cost_snap(cost *c)
{
    struct rusage ru;
    struct timespec ts;

    c->wall_ns = bench_now_ns();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    c->cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    getrusage(RUSAGE_SELF, &ru);
    c->vcsw = ru.ru_nvcsw;
    c->ivcsw = ru.ru_nivcsw;
    c->nt = 0;
}

/* Prints events/s, CPU ns per event and context switches per 1000
 * events between a and now. */
static void
cost_print(const char *what, const cost *a, uint64_t n)
{
    cost b;
    double load = 0;
    FILE *f = fopen("/proc/loadavg", "r");

    cost_snap(&b);
    if (getenv("BUS_BENCH_THREADS") != NULL) {
        int i, j;
        cost_threads(&b);
        for (i = 0; i < b.nt; i++) {
            uint64_t before = 0;
            for (j = 0; j < a->nt; j++)
                if (a->tid[j] == b.tid[i])
                    before = a->run_ns[j];
            if (b.run_ns[i] - before > (uint64_t)n * 20) /* > 20 ns/ev */
                fprintf(stderr, "    %-14s %6.0f ns/ev\n", b.name[i],
                        (double)(b.run_ns[i] - before) / (double)n);
        }
    }
    if (f != NULL) {
        if (fscanf(f, "%lf", &load) != 1)
            load = 0;
        fclose(f);
    }
    fprintf(stderr,
            "  %-34s %8.0f ev/s  cpu %6.0f ns/ev  csw %6.2f+%.2f /1k ev  "
            "load %.2f  [%.6f %.6f]\n",
            what, (double)n / ((double)(b.wall_ns - a->wall_ns) / 1e9),
            (double)(b.cpu_ns - a->cpu_ns) / (double)n,
            (double)(b.vcsw - a->vcsw) * 1000.0 / (double)n,
            (double)(b.ivcsw - a->ivcsw) * 1000.0 / (double)n, load,
            (double)a->wall_ns / 1e9, (double)b.wall_ns / 1e9);
}

/* ---- A counter a handler bumps and the bench waits on ------------------- */

typedef struct counter {
    _Atomic uint64_t n;
    uint64_t want;
    pthread_mutex_t mtx;
    pthread_cond_t cond;
    bool done;
} counter;

static void
counter_init(counter *c, uint64_t want)
{
    atomic_init(&c->n, 0);
    c->want = want;
    c->done = false;
    pthread_mutex_init(&c->mtx, NULL);
    pthread_cond_init(&c->cond, NULL);
}

static void
counter_fini(counter *c)
{
    pthread_mutex_destroy(&c->mtx);
    pthread_cond_destroy(&c->cond);
}

static void
counter_bump(counter *c)
{
    if (atomic_fetch_add(&c->n, 1) + 1 == c->want) {
        pthread_mutex_lock(&c->mtx);
        c->done = true;
        pthread_cond_signal(&c->cond);
        pthread_mutex_unlock(&c->mtx);
    }
}

static void
counter_wait(counter *c)
{
    pthread_mutex_lock(&c->mtx);
    while (!c->done)
        pthread_cond_wait(&c->cond, &c->mtx);
    pthread_mutex_unlock(&c->mtx);
}

/* BUS_BENCH_STALL: waits on c, printing the brokers' counters whenever
 * nothing moved for 200 ms (finding stalls). */
static void
counter_wait_watch(counter *c, bus_broker *hub, bus_broker *peer)
{
    uint64_t last = atomic_load(&c->n);

    if (getenv("BUS_BENCH_STALL") == NULL) {
        counter_wait(c);
        return;
    }
    for (;;) {
        struct timespec ts;
        bool done;
        int rc = 0;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&c->mtx);
        while (!c->done && rc == 0)
            rc = pthread_cond_timedwait(&c->cond, &c->mtx, &ts);
        done = c->done;
        pthread_mutex_unlock(&c->mtx);
        if (done)
            return;
        if (atomic_load(&c->n) == last) {
            bus_broker_zmq_stats h, p;
            bus_broker_zmq_stats_get(hub, &h);
            bus_broker_zmq_stats_get(peer, &p);
            fprintf(
                stderr,
                "  STALL handled %llu/%llu; hub pub %llu sent %llu "
                "inflight %llu hwm_waits %llu delivered %llu; peer pub "
                "%llu sent %llu delivered %llu acked %llu inflight "
                "%llu\n",
                (unsigned long long)last, (unsigned long long)c->want,
                (unsigned long long)h.published, (unsigned long long)h.sent,
                (unsigned long long)h.inflight, (unsigned long long)h.hwm_waits,
                (unsigned long long)h.delivered,
                (unsigned long long)p.published, (unsigned long long)p.sent,
                (unsigned long long)p.delivered, (unsigned long long)p.acked,
                (unsigned long long)p.inflight);
        }
        last = atomic_load(&c->n);
    }
}

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    counter_bump(opaque);
    return BUS_ACK;
}

static void
subscribe_inline(bus_ctx *ctx, const char *pattern, bus_handler_fn fn,
                 void *opaque)
{
    bus_sub_config sc;
    int rv;

    bus_sub_config_init(&sc);
    sc.dispatch = BUS_DISPATCH_INLINE;
    if ((rv = bus_subscribe(ctx, pattern, fn, opaque, &sc, NULL)) != BUS_OK)
        die("bus_subscribe", rv);
}

static void
publish(bus_broker *b, const char *topic)
{
    bus_event *e;
    int rv;

    if ((rv = bus_event_new(&e, "bench.created", g_payload, PAYLOAD)) != BUS_OK)
        die("bus_event_new", rv);
    if ((rv = bus_broker_publish(b, topic, e, 0, NULL, NULL)) != BUS_OK)
        die("bus_broker_publish", rv);
}

/* ---- 1 and 2: throughput, ours ------------------------------------------- */

/* Events/s from a publisher broker to a handler behind another broker. */
static double
ours_throughput(const char *hub_uri, bool reliable, uint64_t n)
{
    bus_broker *hub = open_broker(hub_uri);
    bus_broker *peer = open_peer(hub, reliable ? "mode=reliable"
                                                 "&block_timeout_ms=-1"
                                               : "mode=fanout");
    bus_broker *from = reliable ? peer : hub, *to = reliable ? hub : peer;
    bus_ctx *ctx = open_ctx();
    counter c;
    cost k;
    uint64_t i, t0, t1;
    int rv;

    counter_init(&c, n + 1000);
    if ((rv = bus_ctx_attach(ctx, to, NULL)) != BUS_OK)
        die("bus_ctx_attach", rv);
    subscribe_inline(ctx, "bench.>", count_handler, &c);
    for (i = 0; i < 1000; i++) /* warm up: connections, allocator */
        publish(from, "bench.thr");
    while (atomic_load(&c.n) < 1000) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    cost_snap(&k);
    if (getenv("BUS_BENCH_THREADS") != NULL)
        cost_threads(&k);
    t0 = bench_now_ns();
    for (i = 0; i < n; i++)
        publish(from, "bench.thr");
    counter_wait_watch(&c, hub, peer);
    if ((rv = bus_broker_flush(from, 60000)) != BUS_OK)
        die("flush", rv);
    t1 = bench_now_ns();
    if (verbose()) {
        bus_broker_zmq_stats h, p;
        cost_print(reliable ? "ours reliable" : "ours fanout", &k, n);
        bus_broker_zmq_stats_get(hub, &h);
        bus_broker_zmq_stats_get(peer, &p);
        fprintf(stderr,
                "    hub sent %llu hwm waits %llu drops %llu late %llu "
                "resent %llu dups %llu; peer resent %llu\n",
                (unsigned long long)h.sent, (unsigned long long)h.hwm_waits,
                (unsigned long long)h.dropped_hwm,
                (unsigned long long)h.dropped_late,
                (unsigned long long)h.resent,
                (unsigned long long)h.duplicates_dropped,
                (unsigned long long)p.resent);
    }
    bus_ctx_close(ctx);
    bus_broker_close(peer);
    bus_broker_close(hub);
    counter_fini(&c);
    return (double)n / ((double)(t1 - t0) / 1e9);
}

/* ---- 1 and 2: throughput, raw ----------------------------------------------
 */

typedef struct raw_rx {
    void *sock;
    uint64_t n;
    int frames; /* per message */
} raw_rx;

static void *
raw_rx_main(void *arg)
{
    raw_rx *r = arg;
    char buf[256];
    uint64_t i;
    int f;

    for (i = 0; i < r->n; i++)
        for (f = 0; f < r->frames; f++)
            if (zmq_recv(r->sock, buf, sizeof(buf), 0) < 0) {
                fprintf(stderr, "raw recv: %s\n", zmq_strerror(zmq_errno()));
                exit(1);
            }
    return NULL;
}

static void
raw_setint(void *s, int opt, int v)
{
    zmq_setsockopt(s, opt, &v, sizeof(v));
}

/* Events/s for raw PUB/SUB (XPUB with NODROP) or PUSH/PULL. */
static double
raw_throughput(const char *ep, bool pushpull, uint64_t n)
{
    void *ctx = zmq_ctx_new();
    void *tx = zmq_socket(ctx, pushpull ? ZMQ_PUSH : ZMQ_XPUB);
    void *rx = zmq_socket(ctx, pushpull ? ZMQ_PULL : ZMQ_SUB);
    char endpoint[256], sub[64];
    size_t len = sizeof(endpoint);
    raw_rx r = {rx, n, pushpull ? 1 : 2};
    pthread_t th;
    cost k;
    uint64_t i, t0, t1;

    raw_setint(tx, ZMQ_SNDHWM, HWM);
    raw_setint(rx, ZMQ_RCVHWM, HWM);
    raw_setint(tx, ZMQ_LINGER, 0);
    raw_setint(rx, ZMQ_LINGER, 0);
    if (!pushpull)
        raw_setint(tx, ZMQ_XPUB_NODROP, 1);
    if (zmq_bind(tx, ep) != 0) {
        fprintf(stderr, "raw bind %s: %s\n", ep, zmq_strerror(zmq_errno()));
        exit(1);
    }
    zmq_getsockopt(tx, ZMQ_LAST_ENDPOINT, endpoint, &len);
    if (!pushpull)
        zmq_setsockopt(rx, ZMQ_SUBSCRIBE, "bench.", 6);
    zmq_connect(rx, endpoint);
    if (!pushpull) /* the slow joiner: wait for the subscription */
        (void)zmq_recv(tx, sub, sizeof(sub), 0);
    cost_snap(&k);
    pthread_create(&th, NULL, raw_rx_main, &r);
    if (getenv("BUS_BENCH_THREADS") != NULL)
        cost_threads(&k);
    t0 = bench_now_ns();
    for (i = 0; i < n; i++) {
        if (!pushpull) {
            while (zmq_send(tx, "bench.thr", 9, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
                sched_yield(); /* at the HWM: NODROP says EAGAIN */
        }
        if (zmq_send(tx, g_payload, PAYLOAD, 0) < 0) {
            fprintf(stderr, "raw send: %s\n", zmq_strerror(zmq_errno()));
            exit(1);
        }
    }
    pthread_join(th, NULL);
    t1 = bench_now_ns();
    if (verbose())
        cost_print(pushpull ? "raw PUSH/PULL" : "raw PUB/SUB", &k, n);
    zmq_close(tx);
    zmq_close(rx);
    zmq_ctx_term(ctx);
    return (double)n / ((double)(t1 - t0) / 1e9);
}

/* BUS_BENCH_ZMQ_ONLY=fanout|reliable|raw|latency runs one part (for
 * profiling); unset runs all. */
static bool
bench_only(const char *part)
{
    const char *o = getenv("BUS_BENCH_ZMQ_ONLY");

    return o == NULL || strcmp(o, part) == 0;
}

static void
throughput_rows(const char *transport, uint64_t n)
{
    char hub_f[400], hub_r[400], raw_ep[300], name[96], ipc[200];
    double ours_f = 0, raw_f = 0, ours_r = 0, raw_r = 0, x;
    int round;

    if (strcmp(transport, "tcp") == 0) {
        snprintf(hub_f, sizeof(hub_f), "zmq+tcp://127.0.0.1:0?hwm=%d", HWM);
        snprintf(hub_r, sizeof(hub_r),
                 "zmq+tcp://127.0.0.1:0?hwm=%d&mode=reliable", HWM);
        snprintf(raw_ep, sizeof(raw_ep), "tcp://127.0.0.1:*");
    } else {
        snprintf(ipc, sizeof(ipc), "%s/b.sock", g_dir);
        snprintf(hub_f, sizeof(hub_f), "zmq+ipc://%s?hwm=%d", ipc, HWM);
        snprintf(hub_r, sizeof(hub_r), "zmq+ipc://%s?hwm=%d&mode=reliable", ipc,
                 HWM);
        snprintf(raw_ep, sizeof(raw_ep), "ipc://%s/raw.sock", g_dir);
    }
    for (round = 0; round < ROUNDS; round++) {
        if (bench_only("fanout") &&
            (x = ours_throughput(hub_f, false, n)) > ours_f)
            ours_f = x;
        if (bench_only("raw") && (x = raw_throughput(raw_ep, false, n)) > raw_f)
            raw_f = x;
        if (bench_only("reliable") &&
            (x = ours_throughput(hub_r, true, n)) > ours_r)
            ours_r = x;
        if (bench_only("raw") && (x = raw_throughput(raw_ep, true, n)) > raw_r)
            raw_r = x;
    }
    snprintf(name, sizeof(name), "fanout %s vs raw PUB/SUB", transport);
    bench_row(name, "k ev/s", ours_f / 1e3, raw_f / 1e3, ">= 0.80x raw",
              ours_f >= 0.8 * raw_f);
    snprintf(name, sizeof(name), "reliable %s vs raw PUSH/PULL", transport);
    bench_row(name, "k ev/s", ours_r / 1e3, raw_r / 1e3, ">= 0.50x raw",
              ours_r >= 0.5 * raw_r);
}

/* ---- 3: latency
 * ---------------------------------------------------------------- */

typedef struct pong {
    counter c;
    bus_broker *back; /* where the ping handler publishes the pong */
} pong;

static bus_result
ping_handler(bus_delivery *d, void *opaque)
{
    pong *p = opaque;

    (void)d;
    publish(p->back, "lat.pong");
    return BUS_ACK;
}

static bus_result
pong_handler(bus_delivery *d, void *opaque)
{
    counter *c = opaque;

    (void)d;
    pthread_mutex_lock(&c->mtx);
    c->done = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->mtx);
    return BUS_ACK;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static void
percentiles(uint64_t *s, size_t n, double *p50, double *p99)
{
    qsort(s, n, sizeof(*s), cmp_u64);
    *p50 = (double)s[n / 2] / 1e3;
    *p99 = (double)s[n * 99 / 100] / 1e3;
}

/* Round trips: ping published on `ping_on`, handled in ctx b (which
 * publishes the pong on pg.back), handled in ctx a. */
static void
ours_rtt_run(bus_broker *ping_on, bus_ctx *a, bus_ctx *b, pong *pg,
             uint64_t *samples, size_t n)
{
    size_t i;

    subscribe_inline(b, "lat.ping", ping_handler, pg);
    subscribe_inline(a, "lat.pong", pong_handler, &pg->c);
    for (i = 0; i < n + 100; i++) {
        uint64_t t0 = bench_now_ns();
        pthread_mutex_lock(&pg->c.mtx);
        pg->c.done = false;
        pthread_mutex_unlock(&pg->c.mtx);
        publish(ping_on, "lat.ping");
        counter_wait(&pg->c);
        if (i >= 100) /* the first 100 warm up */
            samples[i - 100] = bench_now_ns() - t0;
    }
}

static void
ours_rtt_fanout(uint64_t *samples, size_t n)
{
    /* Two hubs, each with a peer in the other context: one hop each
     * way, as REQ/REP. */
    bus_broker *hub_a = open_broker("zmq+tcp://127.0.0.1:0");
    bus_broker *hub_b = open_broker("zmq+tcp://127.0.0.1:0");
    bus_broker *peer_b = open_peer(hub_a, "mode=fanout");
    bus_broker *peer_a = open_peer(hub_b, "mode=fanout");
    bus_ctx *a = open_ctx(), *b = open_ctx();
    pong pg;

    counter_init(&pg.c, 0);
    pg.back = hub_b;
    bus_ctx_attach(a, peer_a, NULL);
    bus_ctx_attach(b, peer_b, NULL);
    ours_rtt_run(hub_a, a, b, &pg, samples, n);
    bus_ctx_close(a);
    bus_ctx_close(b);
    bus_broker_close(peer_a);
    bus_broker_close(peer_b);
    bus_broker_close(hub_a);
    bus_broker_close(hub_b);
    counter_fini(&pg.c);
}

static void
ours_rtt_reliable(uint64_t *samples, size_t n)
{
    /* One hub: the ping goes peer -> hub, the pong hub -> peer. */
    bus_broker *hub = open_broker("zmq+tcp://127.0.0.1:0?mode=reliable");
    bus_broker *peer = open_peer(hub, "mode=reliable");
    bus_ctx *a = open_ctx(), *b = open_ctx();
    pong pg;

    counter_init(&pg.c, 0);
    pg.back = hub;
    bus_ctx_attach(a, peer, NULL);
    bus_ctx_attach(b, hub, NULL);
    ours_rtt_run(peer, a, b, &pg, samples, n);
    bus_ctx_close(a);
    bus_ctx_close(b);
    bus_broker_close(peer);
    bus_broker_close(hub);
    counter_fini(&pg.c);
}

typedef struct rep_srv {
    void *sock;
    size_t n;
} rep_srv;

static void *
rep_main(void *arg)
{
    rep_srv *r = arg;
    char buf[256];
    size_t i;

    for (i = 0; i < r->n; i++) {
        int len = zmq_recv(r->sock, buf, sizeof(buf), 0);
        if (len < 0 || zmq_send(r->sock, buf, (size_t)len, 0) < 0)
            break;
    }
    return NULL;
}

static void
raw_rtt(uint64_t *samples, size_t n)
{
    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP), *req = zmq_socket(ctx, ZMQ_REQ);
    char ep[256], buf[256];
    size_t len = sizeof(ep), i;
    rep_srv r = {rep, n + 100};
    pthread_t th;

    zmq_bind(rep, "tcp://127.0.0.1:*");
    zmq_getsockopt(rep, ZMQ_LAST_ENDPOINT, ep, &len);
    zmq_connect(req, ep);
    pthread_create(&th, NULL, rep_main, &r);
    for (i = 0; i < n + 100; i++) {
        uint64_t t0 = bench_now_ns();
        zmq_send(req, g_payload, PAYLOAD, 0);
        zmq_recv(req, buf, sizeof(buf), 0);
        if (i >= 100)
            samples[i - 100] = bench_now_ns() - t0;
    }
    pthread_join(th, NULL);
    raw_setint(req, ZMQ_LINGER, 0);
    zmq_close(req);
    zmq_close(rep);
    zmq_ctx_term(ctx);
}

static void
latency_rows(size_t n)
{
    uint64_t *s = malloc(n * sizeof(*s));
    double f50, f99, r50, r99, q50, q99;

    ours_rtt_fanout(s, n);
    percentiles(s, n, &f50, &f99);
    ours_rtt_reliable(s, n);
    percentiles(s, n, &r50, &r99);
    raw_rtt(s, n);
    percentiles(s, n, &q50, &q99);
    bench_row("round trip p50, fanout tcp vs raw REQ/REP", "us", f50, q50, NULL,
              0);
    bench_row("round trip p99, fanout tcp vs raw REQ/REP", "us", f99, q99, NULL,
              0);
    bench_row("round trip p50, reliable tcp vs raw REQ/REP", "us", r50, q50,
              NULL, 0);
    bench_row("round trip p99, reliable tcp vs raw REQ/REP", "us", r99, q99,
              NULL, 0);
    free(s);
}

int
main(void)
{
    uint64_t n = bench_iters(100000);
    size_t lat = (size_t)bench_iters(2000);
    char cmd[64];
    int major, minor, patch;

    memset(g_payload, 0x5a, sizeof(g_payload));
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    zmq_version(&major, &minor, &patch);
    bench_header("zmq broker (brokers/zmq) vs raw libzmq");
    printf("libzmq %d.%d.%d, %llu events of %d-byte payload per run, best "
           "of %d; ratio: ours/raw (throughput: higher is better; "
           "latency: lower is better)\n",
           major, minor, patch, (unsigned long long)n, PAYLOAD, ROUNDS);
    throughput_rows("tcp", n);
    throughput_rows("ipc", n);
    if (bench_only("latency"))
        latency_rows(lat);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", g_dir);
    if (system(cmd) != 0)
        return 1;
    return 0;
}
