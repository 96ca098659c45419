/*
 * bench/pipeline: ns per delivery of each middleware alone and of the
 * default production stack, over a bare handler call (the raw baseline),
 * same event, same thread. Targets (issue #4): production stack <= 200
 * ns/event over bare; breaker check (closed) <= 20 ns; token bucket <= 40
 * ns; metrics recording <= 30 ns. The delivery is filled as the
 * dispatcher fills it (delivery.h, an inline header: no library symbol),
 * including its one clock read per delivery (d->now_ns, pipeline.h),
 * which every middleware reuses instead of reading the clock again.
 *
 * Baselines: a middleware alone is measured over "stamped bare" (the
 * stamp and a bare call: what any pipeline pays once, shared by all its
 * middlewares); the production stack over "bare" (a subscription without
 * a pipeline, which the dispatcher calls without stamping), so its figure
 * includes the stamp.
 *
 * The metrics middleware times the handler. On a queued worker that goes
 * straight on to its next delivery, the next delivery's stamp ends the
 * sample (pipeline.h, bus__lat_pend): that row is the middleware as
 * queued subscriptions (the default) run it, and the one the target is
 * checked on; its baseline runs the same worker loop with no chain. For
 * inline dispatch the publisher's thread does not go on to a delivery,
 * so one clock read after the handler ends the sample: that row is
 * printed too, and "clock read alone" and "metrics recording alone"
 * (its two counters and histogram sample without the clock) split it.
 */
#include <time.h>
#include <stdio.h>
#include <string.h>

#include <bus/bus.h>
#include <bus/middleware.h>

#include "bench.h"
#include "delivery.h"
#include "pipeline.h"

static bus_result
bare(bus_delivery *d, void *opaque)
{
    (void)opaque;
    BENCH_KEEP(d);
    return BUS_ACK;
}

/* The dispatcher's stamp (ctx.c: bus__clock_mono_ns, CLOCK_MONOTONIC). */
static inline uint64_t
stamp_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* How the dispatcher calls the chain: not stamped (a subscription
 * without a pipeline), stamped (inline dispatch: the publisher's thread),
 * or as a queued worker going straight on from one delivery to the next,
 * whose stamp also closes the previous delivery's latency sample
 * (pipeline.h, bus__lat_pend; ctx.c closes the last one of a run with a
 * clock read, here at the end). */
enum { PLAIN, STAMPED, WORKER };

/* bus__lat_pend_close (pipeline.h) through the public recording call:
 * the internal one is not exported from libbus.so. */
static inline void
pend_close(bus__lat_pend *p, uint64_t end_ns)
{
    if (p->h != NULL) {
        bus_hist_record(p->h, end_ns - p->t0);
        p->h = NULL;
    }
}

static double
run_chain_stamped(const bus_chain *c, bus_event *e, uint64_t n, int how)
{
    bus__lat_pend pend = {NULL, 0};
    bus_delivery d;
    uint64_t t0 = bench_now_ns();

    for (uint64_t i = 0; i < n; i++) {
        bus__delivery_init(&d, e, "orders.placed", "billing", 1, 0, NULL);
        if (how != PLAIN)
            d.now_ns = stamp_ns();
        if (how == WORKER) {
            pend_close(&pend, d.now_ns);
            d.pend = &pend;
        }
        bus_result r = bus_chain_run(NULL, c, &d, bare, NULL);
        BENCH_KEEP(r);
    }
    pend_close(&pend, stamp_ns());
    return (double)(bench_now_ns() - t0) / (double)n;
}

/* Best of ROUNDS rounds of n / ROUNDS deliveries: on a shared VM a single
 * timed loop picks up whatever the neighbours did during it (a row moved
 * by +-30 ns from run to run); the best round is the code's own cost.
 * Baselines are taken the same way, so ours - raw compares like with
 * like. */
#define ROUNDS 15

static double
run_best(const bus_chain *c, bus_event *e, uint64_t n, int how)
{
    double best = 0;

    for (int i = 0; i < ROUNDS; i++) {
        double v = run_chain_stamped(c, e, n / ROUNDS, how);
        if (i == 0 || v < best)
            best = v;
    }
    return best;
}

static double
run_chain(const bus_chain *c, bus_event *e, uint64_t n)
{
    return run_best(c, e, n, STAMPED);
}

static bus_chain *
one(bus_middleware *mw)
{
    bus_chain *c;

    bus_chain_new(&c);
    bus_chain_append(c, mw);
    return c;
}

/* ours and its baseline (raw_stamp: stamped bare, else bare) are timed
 * in alternating rounds, best of ROUNDS each, so that both see the same
 * neighbours: a baseline taken once at the start drifted from the rows
 * by more than the targets under load. */
static void
row_as(const char *name, bus_chain *c, bus_event *e, uint64_t n,
       bool raw_stamp, double target, int how, bool keep)
{
    double ours = 0, raw = 0;
    char desc[64];

    run_chain_stamped(c, e, n / 10, how); /* warm up */
    for (int i = 0; i < ROUNDS; i++) {
        double r = run_chain_stamped(NULL, e, n / ROUNDS,
                                     !raw_stamp ? PLAIN : how);
        double o = run_chain_stamped(c, e, n / ROUNDS, how);
        if (i == 0 || r < raw)
            raw = r;
        if (i == 0 || o < ours)
            ours = o;
    }
    snprintf(desc, sizeof(desc), "<= %.0f ns over bare", target);
    bench_row(name, "ns/event", ours, raw, target > 0 ? desc : NULL,
              target <= 0 || ours - raw <= target);
    if (!keep)
        bus_chain_free(c);
}

static void
row(const char *name, bus_chain *c, bus_event *e, uint64_t n, bool raw_stamp,
    double target)
{
    row_as(name, c, e, n, raw_stamp, target, STAMPED, false);
}

int
main(void)
{
    uint64_t n = bench_iters(2000000);
    bus_event *e;
    bus_middleware mw;
    bus_metrics *m;
    bus_breaker *b;
    bus_ratelimit *rl;
    bus_ratelimit_config rc;
    bus_dedup *dd;
    bus_stack_config sc;
    bus_chain *c;
    double raw, bare_raw;
    uint64_t t0;

    bus_event_new(&e, "orders.placed", "x", 1);
    bus_event_set_stream(e, "order-1", 1);
    bus_event_freeze(e);
    bus_metrics_new(&m, NULL);
    bus_breaker_new(&b, NULL);
    bus_ratelimit_config_init(&rc);
    rc.rate = 1e12; /* never limits: measures the bucket arithmetic */
    rc.capacity = 1e12;
    bus_ratelimit_new(&rl, &rc);
    bus_dedup_new(&dd, NULL);

    bench_header("pipeline");
    run_chain_stamped(NULL, e, n / 10, PLAIN);
    bare_raw = run_best(NULL, e, n, PLAIN);
    bench_row_plain("bare handler (no pipeline, no stamp)", "ns/event",
                    bare_raw);
    run_chain(NULL, e, n / 10);
    raw = run_chain(NULL, e, n);
    bench_row_plain("stamped bare (one clock read + call)", "ns/event", raw);

    bus_mw_breaker(&mw, b);
    row("breaker (closed)", one(&mw), e, n, true, 20);
    t0 = bench_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        bool ok = bus_breaker_allow(b);
        BENCH_KEEP(ok);
    }
    bench_row_plain("breaker allow() alone", "ns/call",
                    (double)(bench_now_ns() - t0) / (double)n);
    bus_mw_policy(&mw, NULL);
    row("policy (success path)", one(&mw), e, n, true, 0);
    bus_mw_metrics(&mw, m, "billing");
    {
        bus_chain *mc = one(&mw);
        row_as("metrics, queued worker (next stamp ends sample)", mc, e,
               n, true, 30, WORKER, true);
        row_as("metrics, inline (a clock read ends sample)", mc, e, n,
               true, 0, STAMPED, false);
    }
    t0 = bench_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = stamp_ns();
        BENCH_KEEP(v);
    }
    bench_row_plain("clock read alone (CLOCK_MONOTONIC)", "ns/call",
                    (double)(bench_now_ns() - t0) / (double)n);
    {
        bus_label l[2] = {{"topic", "orders.placed"},
                          {"subscription", "billing"}};
        bus_counter *c1, *c2;
        bus_hist *h;

        bus_metrics_counter(m, "bus_deliveries_total", NULL, l, 2, &c1);
        bus_metrics_counter(m, "bus_deliveries_ok_total", NULL, l, 2, &c2);
        bus_metrics_hist(m, "bus_handler_latency_seconds", NULL, l, 2, &h);
        t0 = bench_now_ns();
        for (uint64_t i = 0; i < n; i++) {
            bus_counter_inc(c1);
            bus_hist_record(h, 1000 + (i & 4095));
            bus_counter_inc(c2);
        }
        bench_row_plain("metrics recording alone (2 counters + 1 sample)",
                        "ns/event", (double)(bench_now_ns() - t0) / (double)n);
        bus_counter_release(c1);
        bus_counter_release(c2);
        bus_hist_release(h);
    }
    bus_mw_ratelimit_config mrc;
    memset(&mrc, 0, sizeof(mrc));
    mrc.rl = rl;
    bus_mw_ratelimit(&mw, &mrc);
    row("token bucket (per stream)", one(&mw), e, n, true, 40);
    bus_mw_dedup(&mw, dd);
    row("dedup (hit: dropped)", one(&mw), e, n, true, 0);
    bus_mw_tracing(&mw);
    row("tracing context", one(&mw), e, n, true, 0);
    bus_mw_deadline(&mw, 1000, NULL, NULL, NULL);
    row("deadline", one(&mw), e, n, true, 0);

    bus_stack_config_init(&sc);
    sc.subscription = "billing";
    sc.metrics = m;
    sc.breaker = b;
    sc.ratelimit = rl;
    bus_stack_production(&c, &sc);
    row_as("production stack (no dedup), stamp included", c, e, n, false,
           200, STAMPED, true);
    row_as("  the same on a queued worker", c, e, n, false, 0, WORKER,
           false);

    bus_chain_free(NULL);
    bus_dedup_free(dd);
    bus_ratelimit_free(rl);
    bus_breaker_free(b);
    bus_metrics_free(m);
    bus_event_unref(e);
    return 0;
}
