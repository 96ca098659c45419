/* Metrics registry: registration (get or create, errors, limits), counters
 * and gauges with exact totals under concurrency, callback series and
 * their release, snapshots concurrent with recording, allocation faults. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "test_support.h"

#include <bus/metrics.h>

#include "platform.h"
#include "testing.h"

static bus_metrics *
new_registry(uint32_t shards)
{
    bus_metrics_config cfg;
    bus_metrics *m;

    bus_metrics_config_init(&cfg);
    cfg.shards = shards;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
    return m;
}

static void
test_config_defaults_and_ranges(void **state)
{
    bus_metrics_config cfg;
    bus_metrics *m;
    static const uint64_t bad_bounds[] = {1000, 1000};

    (void)state;
    bus_metrics_config_init(&cfg);
    assert_int_equal(cfg.size, sizeof(cfg));
    assert_true(cfg.shards >= 1 && cfg.shards <= 16);
    assert_int_equal(cfg.max_series, 10000);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    bus_metrics_free(m);

    cfg.shards = 1000;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
    assert_null(m);
    bus_metrics_config_init(&cfg);
    cfg.hist_max_ns = 100;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
    bus_metrics_config_init(&cfg);
    cfg.hist_bounds_ns = bad_bounds;
    cfg.hist_bounds_len = 2;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
    cfg.hist_bounds_len = 0;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
    {
        /* Two bounds inside one fine bucket ([1000, 1008)), or a bound
         * beyond the histogram's limit, cannot be exact. */
        static const uint64_t close_bounds[] = {1001, 1003};
        static const uint64_t edge_ok[] = {1000, 1007, 1008};
        static const uint64_t too_high[] = {1000, (uint64_t)1 << 40};
        cfg.hist_bounds_ns = close_bounds;
        cfg.hist_bounds_len = 2;
        assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
        cfg.hist_bounds_ns = too_high;
        assert_int_equal(bus_metrics_new(&m, &cfg), BUS_EINVAL);
        cfg.hist_bounds_ns = edge_ok;
        cfg.hist_bounds_len = 3;
        assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
        bus_metrics_free(m);
    }

    /* A zeroed config is the defaults. */
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
    bus_metrics_free(m);
    bus_metrics_free(NULL);
}

static void
test_get_or_create_returns_same_handle(void **state)
{
    bus_metrics *m = new_registry(4);
    bus_label ab[] = {{"topic", "orders.placed"}, {"subscription", "billing"}};
    bus_label ba[] = {{"subscription", "billing"}, {"topic", "orders.placed"}};
    bus_label other[] = {{"topic", "orders.paid"}, {"subscription", "billing"}};
    bus_counter *c1, *c2, *c3;
    bus_metrics_snapshot *s;
    const bus_metric_series *se;

    (void)state;
    assert_int_equal(
        bus_metrics_counter(m, "bus_delivered_total", "Events.", ab, 2, &c1),
        BUS_OK);
    assert_int_equal(
        bus_metrics_counter(m, "bus_delivered_total", NULL, ba, 2, &c2),
        BUS_OK);
    assert_ptr_equal(c1, c2);
    assert_int_equal(
        bus_metrics_counter(m, "bus_delivered_total", NULL, other, 2, &c3),
        BUS_OK);
    assert_ptr_not_equal(c1, c3);
    bus_counter_add(c1, 5);
    bus_counter_inc(c2);
    bus_counter_add(c3, 7);
    assert_int_equal(bus_counter_value(c1), 6);

    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->nfamilies, 1);
    assert_string_equal(s->families[0].name, "bus_delivered_total");
    assert_string_equal(s->families[0].help, "Events.");
    assert_int_equal(s->families[0].type, BUS_METRIC_COUNTER);
    assert_int_equal(s->families[0].nseries, 2);
    /* Labels are stored sorted by name. */
    se = &s->families[0].series[0];
    assert_int_equal(se->nlabels, 2);
    assert_string_equal(se->labels[0].name, "subscription");
    assert_string_equal(se->labels[1].name, "topic");
    se = bus_metrics_snapshot_find(s, "bus_delivered_total", ab, 2);
    assert_non_null(se);
    assert_int_equal(se->counter, 6);
    se = bus_metrics_snapshot_find(s, "bus_delivered_total", other, 2);
    assert_non_null(se);
    assert_int_equal(se->counter, 7);
    assert_null(bus_metrics_snapshot_find(s, "nope", NULL, 0));
    bus_metrics_snapshot_free(s);

    /* Two registrations, two releases: the series lives until the last. */
    bus_counter_release(c1);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_non_null(bus_metrics_snapshot_find(s, "bus_delivered_total", ab, 2));
    bus_metrics_snapshot_free(s);
    bus_counter_release(c2);
    bus_counter_release(c3);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->nfamilies, 0); /* empty families go too */
    bus_metrics_snapshot_free(s);

    /* The name is free again, for any type. */
    {
        bus_gauge *g;
        assert_int_equal(
            bus_metrics_gauge(m, "bus_delivered_total", NULL, NULL, 0, &g),
            BUS_OK);
        bus_gauge_release(g);
    }
    bus_metrics_free(m);
}

static void
test_registration_errors(void **state)
{
    bus_metrics *m = new_registry(2);
    bus_counter *c;
    bus_gauge *g;
    bus_hist *h;
    bus_label bad_name[] = {{"a-b", "x"}};
    bus_label reserved[] = {{"__name", "x"}};
    bus_label dup[] = {{"a", "x"}, {"a", "y"}};
    bus_label bad_utf8[] = {{"a", "\xff\xfe"}};
    bus_label overlong[] = {{"a", "\xc0\xaf"}};
    bus_label null_value[] = {{"a", NULL}};
    bus_label le[] = {{"le", "1"}};
    bus_label a[] = {{"a", "1"}};
    bus_label b[] = {{"b", "1"}};
    bus_label utf8[] = {{"a", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"}};

    (void)state;
    assert_int_equal(bus_metrics_counter(m, "", NULL, NULL, 0, &c), BUS_EINVAL);
    assert_null(c);
    assert_int_equal(bus_metrics_counter(m, NULL, NULL, NULL, 0, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "1abc", NULL, NULL, 0, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "a b", NULL, NULL, 0, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "ns:sub_total", NULL, NULL, 0, &c),
                     BUS_OK);
    bus_counter_release(c);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, bad_name, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, reserved, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, dup, 2, &c), BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, bad_utf8, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, overlong, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, null_value, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, NULL, 1, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", "bad \xff help", NULL, 0, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, utf8, 1, &c), BUS_OK);
    bus_counter_release(c);
    /* "le" is reserved in histograms only. */
    assert_int_equal(bus_metrics_hist(m, "h_seconds", NULL, le, 1, &h),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_gauge(m, "g", NULL, le, 1, &g), BUS_OK);
    bus_gauge_release(g);

    /* Same name, other type or other label names. */
    assert_int_equal(bus_metrics_counter(m, "fam", NULL, a, 1, &c), BUS_OK);
    assert_int_equal(bus_metrics_gauge(m, "fam", NULL, a, 1, &g), BUS_EEXIST);
    assert_null(g);
    assert_int_equal(bus_metrics_hist(m, "fam", NULL, a, 1, &h), BUS_EEXIST);
    {
        bus_counter *c2;
        assert_int_equal(bus_metrics_counter(m, "fam", NULL, b, 1, &c2),
                         BUS_EEXIST);
        assert_int_equal(bus_metrics_counter(m, "fam", NULL, NULL, 0, &c2),
                         BUS_EEXIST);
    }
    bus_counter_release(c);

    /* Same series, other kind of gauge. */
    assert_int_equal(bus_metrics_gauge(m, "depth", NULL, a, 1, &g), BUS_OK);
    {
        bus_label a2[] = {{"a", "2"}};
        bus_gauge *g2;
        assert_int_equal(bus_metrics_gauge_double(m, "depth", NULL, a, 1, &g2),
                         BUS_EEXIST);
        /* Another series of the family may be a double gauge. */
        assert_int_equal(bus_metrics_gauge_double(m, "depth", NULL, a2, 1, &g2),
                         BUS_OK);
        bus_gauge_release(g2);
    }
    bus_gauge_release(g);

    /* A histogram's _bucket/_sum/_count may not be another family. */
    assert_int_equal(bus_metrics_hist(m, "lat_seconds", NULL, NULL, 0, &h),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_counter(m, "lat_seconds_count", NULL, NULL, 0, &c),
        BUS_EEXIST);
    assert_int_equal(
        bus_metrics_gauge(m, "lat_seconds_bucket", NULL, NULL, 0, &g),
        BUS_EEXIST);
    assert_int_equal(
        bus_metrics_counter(m, "lat_seconds_total", NULL, NULL, 0, &c), BUS_OK);
    bus_counter_release(c);
    bus_hist_release(h);
    assert_int_equal(bus_metrics_counter(m, "q_sum", NULL, NULL, 0, &c),
                     BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "q", NULL, NULL, 0, &h), BUS_EEXIST);
    bus_counter_release(c);

    assert_int_equal(bus_metrics_counter(NULL, "x", NULL, NULL, 0, &c),
                     BUS_EINVAL);
    assert_int_equal(bus_metrics_counter(m, "x", NULL, NULL, 0, NULL),
                     BUS_EINVAL);
    assert_int_equal(
        bus_metrics_counter_fn(m, "x", NULL, NULL, 0, NULL, NULL, &c),
        BUS_EINVAL);
    bus_metrics_free(m);
}

static void
test_max_series_limits_label_explosion(void **state)
{
    bus_metrics_config cfg;
    bus_metrics *m;
    bus_counter *c[5], *extra;
    char topic[32];
    bus_label l[] = {{"topic", topic}};
    int i;

    (void)state;
    bus_metrics_config_init(&cfg);
    cfg.max_series = 4;
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
    for (i = 0; i < 4; i++) {
        snprintf(topic, sizeof(topic), "t%d", i);
        assert_int_equal(bus_metrics_counter(m, "n_total", NULL, l, 1, &c[i]),
                         BUS_OK);
    }
    snprintf(topic, sizeof(topic), "t4");
    assert_int_equal(bus_metrics_counter(m, "n_total", NULL, l, 1, &extra),
                     BUS_ETOOBIG);
    /* An existing series is not a new one. */
    snprintf(topic, sizeof(topic), "t0");
    assert_int_equal(bus_metrics_counter(m, "n_total", NULL, l, 1, &extra),
                     BUS_OK);
    assert_ptr_equal(extra, c[0]);
    bus_counter_release(extra);
    bus_counter_release(c[3]);
    snprintf(topic, sizeof(topic), "t4");
    assert_int_equal(bus_metrics_counter(m, "n_total", NULL, l, 1, &c[4]),
                     BUS_OK);
    bus_metrics_free(m); /* frees what is still registered */
}

static void
test_many_series_grow_the_hash(void **state)
{
    bus_metrics *m = new_registry(1);
    bus_counter *c[600];
    bus_metrics_snapshot *s;
    char v[16];
    bus_label l[] = {{"sub", v}};
    int i;

    (void)state;
    for (i = 0; i < 600; i++) {
        snprintf(v, sizeof(v), "s%d", i);
        assert_int_equal(
            bus_metrics_counter(m, "many_total", NULL, l, 1, &c[i]), BUS_OK);
        bus_counter_add(c[i], (uint64_t)i);
    }
    for (i = 0; i < 600; i += 7) {
        bus_counter *again;
        snprintf(v, sizeof(v), "s%d", i);
        assert_int_equal(
            bus_metrics_counter(m, "many_total", NULL, l, 1, &again), BUS_OK);
        assert_ptr_equal(again, c[i]);
        bus_counter_release(again);
    }
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->families[0].nseries, 600);
    for (i = 0; i < 600; i++) /* registration order */
        assert_int_equal(s->families[0].series[i].counter, (uint64_t)i);
    bus_metrics_snapshot_free(s);
    for (i = 0; i < 600; i += 2)
        bus_counter_release(c[i]);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->families[0].nseries, 300);
    assert_int_equal(s->families[0].series[0].counter, 1);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

static void
test_gauges_int_and_double(void **state)
{
    bus_metrics *m = new_registry(2);
    bus_gauge *gi, *gd;
    bus_metrics_snapshot *s;

    (void)state;
    assert_int_equal(bus_metrics_gauge(m, "depth", NULL, NULL, 0, &gi), BUS_OK);
    assert_int_equal(bus_metrics_gauge_double(m, "ratio", NULL, NULL, 0, &gd),
                     BUS_OK);
    bus_gauge_set(gi, 10);
    bus_gauge_add(gi, -15);
    assert_true(bus_gauge_value(gi) == -5.0);
    bus_gauge_set_double(gi, 2.6); /* rounds on an int gauge */
    assert_true(bus_gauge_value(gi) == 3.0);
    bus_gauge_add_double(gi, -1.4);
    assert_true(bus_gauge_value(gi) == 2.0);
    bus_gauge_set_double(gi, 1e300); /* saturates, no UB */
    assert_true(bus_gauge_value(gi) > 9e18);
    bus_gauge_set(gi, -7);

    bus_gauge_set_double(gd, 0.25);
    bus_gauge_add_double(gd, 0.5);
    bus_gauge_add(gd, 2);
    assert_true(bus_gauge_value(gd) == 2.75);

    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_true(bus_metrics_snapshot_find(s, "depth", NULL, 0)->gauge == -7.0);
    assert_true(bus_metrics_snapshot_find(s, "ratio", NULL, 0)->gauge == 2.75);
    bus_metrics_snapshot_free(s);

    /* NULL handles are no-ops, so a component can run without metrics. */
    bus_gauge_set(NULL, 1);
    bus_gauge_add(NULL, 1);
    bus_gauge_set_double(NULL, 1);
    bus_gauge_add_double(NULL, 1);
    bus_counter_add(NULL, 1);
    bus_counter_inc(NULL);
    bus_hist_record(NULL, 1);
    bus_counter_release(NULL);
    bus_gauge_release(NULL);
    bus_hist_release(NULL);
    assert_int_equal(bus_counter_value(NULL), 0);
    bus_gauge_release(gi);
    bus_gauge_release(gd);
    bus_metrics_free(m);
}

/* ---- Concurrency --------------------------------------------------------- */

#define WORKERS 4
#define ADDS 100000

typedef struct conc {
    bus_metrics *m;
    bus_counter *c;
    bus_gauge *g, *gd;
    bus_hist *h;
    atomic_int started;
    atomic_bool stop;
} conc;

static void
conc_worker(void *arg)
{
    conc *x = arg;
    int i;

    atomic_fetch_add(&x->started, 1);
    for (i = 0; i < ADDS; i++) {
        bus_counter_add(x->c, 3);
        bus_gauge_add(x->g, (i & 1) ? -1 : 2); /* +1 per pair */
        if ((i & 15) == 0)
            bus_gauge_add_double(x->gd, 0.5);
        bus_hist_record(x->h, (uint64_t)(i % 5000) * 1000u);
    }
}

static void
conc_reader(void *arg)
{
    conc *x = arg;
    uint64_t last_c = 0, last_h = 0;

    while (!atomic_load(&x->stop)) {
        bus_metrics_snapshot *s;
        bus_metrics *reg = x->m;
        const bus_metric_series *sc, *sh;
        char *text;
        size_t len;

        assert_int_equal(bus_metrics_snapshot_take(reg, &s), BUS_OK);
        sc = bus_metrics_snapshot_find(s, "c_total", NULL, 0);
        sh = bus_metrics_snapshot_find(s, "h_seconds", NULL, 0);
        assert_non_null(sc);
        assert_non_null(sh);
        /* Monotonic across snapshots; count always equals the buckets. */
        assert_true(sc->counter >= last_c);
        assert_true(sh->hist.count >= last_h);
        last_c = sc->counter;
        last_h = sh->hist.count;
        bus_metrics_snapshot_free(s);
        assert_int_equal(bus_metrics_prometheus_alloc(reg, &text, &len),
                         BUS_OK);
        assert_true(len > 0);
        bus_metrics_text_free(text);
    }
}

static void
test_concurrent_recording_exact_totals(void **state)
{
    struct {
        conc x;
    } t;
    bus__thread th[WORKERS], rd;
    bus_metrics_snapshot *s;
    const bus_metric_series *se;
    int i;

    (void)state;
    memset(&t, 0, sizeof(t));
    t.x.m = new_registry(2); /* fewer shards than threads: shared ones */
    assert_int_equal(
        bus_metrics_counter(t.x.m, "c_total", NULL, NULL, 0, &t.x.c), BUS_OK);
    assert_int_equal(bus_metrics_gauge(t.x.m, "g", NULL, NULL, 0, &t.x.g),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_gauge_double(t.x.m, "gd", NULL, NULL, 0, &t.x.gd), BUS_OK);
    assert_int_equal(
        bus_metrics_hist(t.x.m, "h_seconds", NULL, NULL, 0, &t.x.h), BUS_OK);
    assert_int_equal(bus__thread_start(&rd, "reader", conc_reader, &t.x),
                     BUS_OK);
    for (i = 0; i < WORKERS; i++)
        assert_int_equal(bus__thread_start(&th[i], "rec", conc_worker, &t.x),
                         BUS_OK);
    for (i = 0; i < WORKERS; i++)
        bus__thread_join(&th[i]);
    atomic_store(&t.x.stop, true);
    bus__thread_join(&rd);

    assert_int_equal(bus_counter_value(t.x.c), 3ull * WORKERS * ADDS);
    assert_true(bus_gauge_value(t.x.g) == (double)WORKERS * ADDS / 2);
    assert_true(bus_gauge_value(t.x.gd) == 0.5 * WORKERS * ((ADDS + 15) / 16));
    assert_int_equal(bus_metrics_snapshot_take(t.x.m, &s), BUS_OK);
    se = bus_metrics_snapshot_find(s, "h_seconds", NULL, 0);
    assert_int_equal(se->hist.count, (uint64_t)WORKERS * ADDS);
    {
        uint64_t sum = 0;
        for (i = 0; i < ADDS; i++)
            sum += (uint64_t)(i % 5000) * 1000u;
        assert_int_equal(se->hist.sum_ns, sum * WORKERS);
    }
    assert_int_equal(bus_metrics_snapshot_find(s, "c_total", NULL, 0)->counter,
                     3ull * WORKERS * ADDS);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(t.x.m);
}

/* Threads that exit free their slot; the next thread takes it over and
 * continues from the last value (release on free, acquire on claim):
 * totals stay exact through thread churn, with owned and shared cells. */
typedef struct churn_rec {
    bus_counter *c;
    bus_hist *h;
} churn_rec;

static void
short_lived(void *arg)
{
    churn_rec *r = arg;
    int i;

    for (i = 0; i < 1000; i++) {
        bus_counter_inc(r->c);
        bus_hist_record(r->h, (uint64_t)i);
    }
}

static void
test_thread_churn_keeps_exact_totals(void **state)
{
    bus_metrics *m = new_registry(2);
    churn_rec r;
    bus__thread th[3];
    bus_metrics_snapshot *s;
    int round, i;

    (void)state;
    assert_int_equal(bus_metrics_counter(m, "churn_total", NULL, NULL, 0, &r.c),
                     BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "churn_seconds", NULL, NULL, 0, &r.h),
                     BUS_OK);
    bus_counter_inc(r.c); /* this thread holds a slot too */
    for (round = 0; round < 40; round++) {
        /* three at once: with two owned cells, some share */
        for (i = 0; i < 3; i++)
            assert_int_equal(
                bus__thread_start(&th[i], "short", short_lived, &r), BUS_OK);
        for (i = 0; i < 3; i++)
            bus__thread_join(&th[i]);
    }
    assert_int_equal(bus_counter_value(r.c), 1 + 40 * 3 * 1000);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(
        bus_metrics_snapshot_find(s, "churn_seconds", NULL, 0)->hist.count,
        40 * 3 * 1000);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

/* Registration and release from many threads while others record and
 * snapshot: the registry's structure under its mutex. */
typedef struct churn {
    bus_metrics *m;
    int id;
} churn;

static void
churn_worker(void *arg)
{
    churn *ch = arg;
    char v[16];
    bus_label l[] = {{"worker", v}};
    int i;

    snprintf(v, sizeof(v), "w%d", ch->id);
    for (i = 0; i < 300; i++) {
        bus_counter *c;
        bus_hist *h;
        bus_metrics_snapshot *s;

        assert_int_equal(
            bus_metrics_counter(ch->m, "churn_total", NULL, l, 1, &c), BUS_OK);
        assert_int_equal(
            bus_metrics_hist(ch->m, "churn_seconds", NULL, l, 1, &h), BUS_OK);
        bus_counter_inc(c);
        bus_hist_record(h, (uint64_t)i);
        if (i % 50 == 0) {
            assert_int_equal(bus_metrics_snapshot_take(ch->m, &s), BUS_OK);
            bus_metrics_snapshot_free(s);
        }
        bus_hist_release(h);
        bus_counter_release(c);
    }
}

static void
test_concurrent_register_release(void **state)
{
    churn ch[4];
    bus__thread th[4];
    bus_metrics *m = new_registry(4);
    bus_metrics_snapshot *s;
    int i;

    (void)state;
    for (i = 0; i < 4; i++) {
        ch[i].m = m;
        ch[i].id = i % 2; /* two threads share each series */
        assert_int_equal(
            bus__thread_start(&th[i], "churn", churn_worker, &ch[i]), BUS_OK);
    }
    for (i = 0; i < 4; i++)
        bus__thread_join(&th[i]);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->nfamilies, 0);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

/* ---- Callback series ----------------------------------------------------- */

static uint64_t
cb_counter(void *opaque)
{
    return *(uint64_t *)opaque;
}

static double
cb_gauge(void *opaque)
{
    return *(double *)opaque;
}

static void
test_callback_series(void **state)
{
    bus_metrics *m = new_registry(2);
    uint64_t cval = 42;
    double gval = 1.5;
    bus_label l[] = {{"queue", "q0"}};
    bus_counter *c, *c2;
    bus_gauge *g, *g2;
    bus_metrics_snapshot *s;

    (void)state;
    assert_int_equal(bus_metrics_counter_fn(m, "published_total", NULL, l, 1,
                                            cb_counter, &cval, &c),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_gauge_fn(m, "queue_depth", NULL, l, 1, cb_gauge, &gval, &g),
        BUS_OK);
    /* Not shared: a second registration is a conflict. */
    assert_int_equal(bus_metrics_gauge_fn(m, "queue_depth", NULL, l, 1,
                                          cb_gauge, &gval, &g2),
                     BUS_EEXIST);
    assert_int_equal(bus_metrics_gauge(m, "queue_depth", NULL, l, 1, &g2),
                     BUS_EEXIST);
    assert_int_equal(bus_metrics_counter(m, "published_total", NULL, l, 1, &c2),
                     BUS_EEXIST);
    /* Recording into a callback series by mistake is harmless. */
    bus_counter_add(c, 1);
    bus_gauge_set(g, 3);

    assert_int_equal(bus_counter_value(c), 42);
    assert_true(bus_gauge_value(g) == 1.5);
    cval = 43;
    gval = -2;
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(
        bus_metrics_snapshot_find(s, "published_total", l, 1)->counter, 43);
    assert_true(bus_metrics_snapshot_find(s, "queue_depth", l, 1)->gauge ==
                -2.0);
    bus_metrics_snapshot_free(s);
    bus_counter_release(c);
    bus_gauge_release(g);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->nfamilies, 0);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

/* A callback that blocks until told to go: release must wait for it. */
typedef struct slow_cb {
    atomic_int in_fn;
    atomic_bool go;
    atomic_bool fn_done;
    atomic_bool released;
    atomic_bool released_before_done;
    bus_gauge *g;
    bus_metrics *m;
} slow_cb;

static double
slow_gauge(void *opaque)
{
    slow_cb *x = opaque;

    atomic_store(&x->in_fn, 1);
    while (!atomic_load(&x->go))
        bus__sleep_ns(100000);
    atomic_store(&x->fn_done, true);
    return 7;
}

static void
slow_snapshotter(void *arg)
{
    slow_cb *x = arg;
    bus_metrics_snapshot *s;

    assert_int_equal(bus_metrics_snapshot_take(x->m, &s), BUS_OK);
    assert_true(bus_metrics_snapshot_find(s, "slow", NULL, 0)->gauge == 7);
    bus_metrics_snapshot_free(s);
}

static void
slow_releaser(void *arg)
{
    slow_cb *x = arg;

    bus_gauge_release(x->g);
    if (!atomic_load(&x->fn_done))
        atomic_store(&x->released_before_done, true);
    atomic_store(&x->released, true);
}

static int
in_fn_cond(void *arg)
{
    return atomic_load(&((slow_cb *)arg)->in_fn);
}

static void
test_release_waits_for_running_callback(void **state)
{
    slow_cb x;
    bus__thread snap, rel;

    (void)state;
    memset(&x, 0, sizeof(x));
    x.m = new_registry(1);
    assert_int_equal(
        bus_metrics_gauge_fn(x.m, "slow", NULL, NULL, 0, slow_gauge, &x, &x.g),
        BUS_OK);
    assert_int_equal(bus__thread_start(&snap, "snap", slow_snapshotter, &x),
                     BUS_OK);
    assert_true(bt_wait_for(in_fn_cond, &x, 5000));
    assert_int_equal(bus__thread_start(&rel, "rel", slow_releaser, &x), BUS_OK);
    /* A bounded look for something that must not happen. */
    bus__sleep_ns(50000000);
    assert_false(atomic_load(&x.released));
    atomic_store(&x.go, true);
    bus__thread_join(&rel);
    bus__thread_join(&snap);
    assert_true(atomic_load(&x.released));
    assert_false(atomic_load(&x.released_before_done));
    bus_metrics_free(x.m);
}

/* Release from inside the callback itself: returns at once; the series is
 * freed by the snapshot after the call (ASan checks). A callback may also
 * register. */
typedef struct self_cb {
    bus_metrics *m;
    bus_gauge *g;
    bus_counter *made;
    int calls;
} self_cb;

static double
self_releasing(void *opaque)
{
    self_cb *x = opaque;

    x->calls++;
    assert_int_equal(
        bus_metrics_counter(x->m, "made_in_cb_total", NULL, NULL, 0, &x->made),
        BUS_OK);
    bus_gauge_release(x->g);
    return 1;
}

static void
test_release_from_inside_callback(void **state)
{
    self_cb x;
    bus_metrics_snapshot *s;

    (void)state;
    memset(&x, 0, sizeof(x));
    x.m = new_registry(1);
    assert_int_equal(bus_metrics_gauge_fn(x.m, "selfish", NULL, NULL, 0,
                                          self_releasing, &x, &x.g),
                     BUS_OK);
    assert_int_equal(bus_metrics_snapshot_take(x.m, &s), BUS_OK);
    assert_int_equal(x.calls, 1);
    assert_true(bus_metrics_snapshot_find(s, "selfish", NULL, 0)->gauge == 1);
    bus_metrics_snapshot_free(s);
    assert_int_equal(bus_metrics_snapshot_take(x.m, &s), BUS_OK);
    assert_int_equal(x.calls, 1);
    assert_null(bus_metrics_snapshot_find(s, "selfish", NULL, 0));
    assert_non_null(bus_metrics_snapshot_find(s, "made_in_cb_total", NULL, 0));
    bus_metrics_snapshot_free(s);
    bus_counter_release(x.made);
    bus_metrics_free(x.m);
}

/* A callback releasing another callback series that the same snapshot
 * has yet to call: no deadlock (the snapshot pins it, release waits only
 * for calls in progress); the released one is not called and reads 0. */
typedef struct pair_cb {
    bus_gauge *second;
    int first_calls;
    int second_calls;
} pair_cb;

static double
first_cb(void *opaque)
{
    pair_cb *p = opaque;

    p->first_calls++;
    if (p->second != NULL) {
        bus_gauge_release(p->second);
        p->second = NULL;
    }
    return 1;
}

static double
second_cb(void *opaque)
{
    ((pair_cb *)opaque)->second_calls++;
    return 2;
}

static void
test_callback_releases_another_callback(void **state)
{
    bus_metrics *m = new_registry(1);
    pair_cb p;
    bus_gauge *first;
    bus_metrics_snapshot *s;

    (void)state;
    memset(&p, 0, sizeof(p));
    /* Families are visited by name: a_first before b_second. */
    assert_int_equal(
        bus_metrics_gauge_fn(m, "a_first", NULL, NULL, 0, first_cb, &p, &first),
        BUS_OK);
    assert_int_equal(bus_metrics_gauge_fn(m, "b_second", NULL, NULL, 0,
                                          second_cb, &p, &p.second),
                     BUS_OK);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(p.first_calls, 1);
    assert_int_equal(p.second_calls, 0);
    assert_true(bus_metrics_snapshot_find(s, "b_second", NULL, 0)->gauge == 0);
    bus_metrics_snapshot_free(s);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_null(bus_metrics_snapshot_find(s, "b_second", NULL, 0));
    bus_metrics_snapshot_free(s);
    bus_gauge_release(first);
    bus_metrics_free(m);
}

/* ---- Allocation faults --------------------------------------------------- */

static uint64_t
five(void *opaque)
{
    (void)opaque;
    return 5;
}

/* Registers, records, snapshots and renders; on failure cleans up and
 * returns the error. */
static int
fault_scenario(void)
{
    bus_metrics *m = NULL;
    bus_counter *c = NULL, *cf = NULL;
    bus_gauge *g = NULL;
    bus_hist *h = NULL;
    bus_metrics_snapshot *s = NULL;
    bus_label l[] = {{"topic", "a.b"}, {"subscription", "s1"}};
    char *text = NULL;
    size_t len;
    int rv;

    if ((rv = bus_metrics_new(&m, NULL)) != BUS_OK)
        return rv;
    if ((rv = bus_metrics_counter(m, "f_total", "help", l, 2, &c)) != 0)
        goto out;
    if ((rv = bus_metrics_gauge(m, "f_depth", NULL, l, 2, &g)) != 0)
        goto out;
    if ((rv = bus_metrics_hist(m, "f_seconds", NULL, l, 2, &h)) != 0)
        goto out;
    if ((rv = bus_metrics_counter_fn(m, "f_cb_total", NULL, NULL, 0, five, NULL,
                                     &cf)) != 0)
        goto out;
    bus_counter_add(c, 2);
    bus_gauge_set(g, 3);
    bus_hist_record(h, 1000);
    bus_hist_record(h, 1000000);
    if ((rv = bus_metrics_snapshot_take(m, &s)) != 0)
        goto out;
    assert_int_equal(s->nfamilies, 4);
    if ((rv = bus_metrics_prometheus_alloc(m, &text, &len)) != 0)
        goto out;
    assert_non_null(strstr(text, "f_seconds_count{subscription=\"s1\","
                                 "topic=\"a.b\"} 2\n"));
    assert_non_null(strstr(text, "f_cb_total 5\n"));
out:
    bus_metrics_text_free(text);
    bus_metrics_snapshot_free(s);
    /* Release some, free the rest with the registry. */
    bus_counter_release(c);
    bus_hist_release(h);
    bus_metrics_free(m);
    (void)g;
    (void)cf;
    return rv;
}

static void
test_allocation_faults(void **state)
{
    uint64_t n;
    int persistent, rv;

    (void)state;
    for (persistent = 0; persistent < 2; persistent++) {
        for (n = 1;; n++) {
            bus_fault_alloc_fail_nth(n, persistent != 0);
            rv = fault_scenario();
            bus_fault_alloc_fail_nth(0, false);
            if (rv == BUS_OK)
                break;
            assert_int_equal(rv, BUS_ENOMEM);
            assert_true(n < 1000);
        }
        assert_true(n > 5); /* the loop did reach the later steps */
    }
}

/* A failed registration leaves the registry as it was. */
static void
test_failed_registration_leaves_registry_intact(void **state)
{
    bus_metrics *m = new_registry(2);
    bus_label l[] = {{"k", "v"}};
    bus_metrics_snapshot *s;
    bus_counter *c;
    uint64_t n;
    int rv;

    (void)state;
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_metrics_counter(m, "new_total", NULL, l, 1, &c);
        bus_fault_alloc_fail_nth(0, false);
        if (rv == BUS_OK)
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(c);
        assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
        assert_int_equal(s->nfamilies, 0);
        bus_metrics_snapshot_free(s);
    }
    bus_counter_inc(c);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    assert_int_equal(s->nfamilies, 1);
    assert_int_equal(s->families[0].series[0].counter, 1);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_defaults_and_ranges),
        cmocka_unit_test(test_get_or_create_returns_same_handle),
        cmocka_unit_test(test_registration_errors),
        cmocka_unit_test(test_max_series_limits_label_explosion),
        cmocka_unit_test(test_many_series_grow_the_hash),
        cmocka_unit_test(test_gauges_int_and_double),
        cmocka_unit_test(test_concurrent_recording_exact_totals),
        cmocka_unit_test(test_thread_churn_keeps_exact_totals),
        cmocka_unit_test(test_concurrent_register_release),
        cmocka_unit_test(test_callback_series),
        cmocka_unit_test(test_release_waits_for_running_callback),
        cmocka_unit_test(test_release_from_inside_callback),
        cmocka_unit_test(test_callback_releases_another_callback),
        cmocka_unit_test(test_allocation_faults),
        cmocka_unit_test(test_failed_registration_leaves_registry_intact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
