/* Histogram accuracy: quantiles, min, max, count and sum against the exact
 * values of a sorted array of samples, for several distributions; bucket
 * geometry; recording split over threads gives the same result. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

#include <bus/metrics.h>

#include "platform.h"

#define N ((size_t)100000)

static uint64_t rng_state;

static double
unif01(void)
{
    /* 53 random bits in (0, 1): never 0, so log() is finite. */
    return ((double)(bt_rand(&rng_state) >> 11) + 0.5) / 9007199254740992.0;
}

static double
normal(double mean, double sd)
{
    double u1 = unif01(), u2 = unif01();

    return mean + sd * sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

static uint64_t
clamp_ns(double v)
{
    return v < 1 ? 1 : (uint64_t)v;
}

typedef enum dist {
    DIST_UNIFORM,     /* 1 us .. 10 ms */
    DIST_EXPONENTIAL, /* mean 200 us */
    DIST_BIMODAL,     /* 90% ~ 50 us, 10% ~ 20 ms */
    DIST_LOGNORMAL,   /* median ~ 100 us, heavy tail */
    DIST_SMALL        /* 0 .. 300 ns: the exact and first log buckets */
} dist;

static const char *const dist_name[] = {"uniform", "exponential", "bimodal",
                                        "lognormal", "small"};

static void
fill(uint64_t *v, size_t n, dist d)
{
    size_t i;

    for (i = 0; i < n; i++) {
        switch (d) {
        case DIST_UNIFORM:
            v[i] = 1000 + bt_rand(&rng_state) % 9999001u;
            break;
        case DIST_EXPONENTIAL:
            v[i] = clamp_ns(-200000.0 * log(unif01()));
            break;
        case DIST_BIMODAL:
            v[i] = unif01() < 0.9 ? clamp_ns(normal(50000, 5000))
                                  : clamp_ns(normal(20000000, 2000000));
            break;
        case DIST_LOGNORMAL:
            v[i] = clamp_ns(exp(normal(log(100000.0), 1.5)));
            break;
        case DIST_SMALL:
            v[i] = bt_rand(&rng_state) % 301u;
            break;
        }
    }
}

static int
u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* The exact nearest-rank quantile, the same definition as the library. */
static uint64_t
exact_q(const uint64_t *sorted, size_t n, double q)
{
    size_t rank = (size_t)ceil(q * (double)n);

    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

static void
assert_within_1pct(const char *what, const char *d, uint64_t est,
                   uint64_t exact)
{
    double err = exact == 0 ? (double)est
                            : fabs((double)est - (double)exact) / (double)exact;

    if (err > 0.01) {
        print_error("%s %s: estimate %llu exact %llu (%.3f%%)\n", d, what,
                    (unsigned long long)est, (unsigned long long)exact,
                    err * 100);
        fail();
    }
    /* The design bound is 1/128, tighter than the 1% asked. */
    assert_true(err <= 1.0 / 128 + 1e-12);
}

typedef struct rec_part {
    bus_hist *h;
    const uint64_t *v;
    size_t n;
} rec_part;

static void
rec_worker(void *arg)
{
    rec_part *p = arg;
    size_t i;

    for (i = 0; i < p->n; i++)
        bus_hist_record(p->h, p->v[i]);
}

static void
check_distribution(dist d, int threads)
{
    uint64_t *v = malloc(N * sizeof(*v));
    bus_metrics *m;
    bus_hist *h;
    bus_metrics_snapshot *s;
    const bus_hist_value *hv;
    uint64_t sum = 0;
    size_t i;
    static const double qs[] = {0.5, 0.9, 0.95, 0.99, 0.999};

    assert_non_null(v);
    fill(v, N, d);
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "lat_seconds", NULL, NULL, 0, &h),
                     BUS_OK);
    if (threads <= 1) {
        for (i = 0; i < N; i++)
            bus_hist_record(h, v[i]);
    } else {
        bus__thread th[8];
        rec_part parts[8];
        int t;
        for (t = 0; t < threads; t++) {
            parts[t].h = h;
            parts[t].v = v + (size_t)t * (N / threads);
            parts[t].n =
                t == threads - 1 ? N - (size_t)t * (N / threads) : N / threads;
            assert_int_equal(
                bus__thread_start(&th[t], "rec", rec_worker, &parts[t]),
                BUS_OK);
        }
        for (t = 0; t < threads; t++)
            bus__thread_join(&th[t]);
    }
    for (i = 0; i < N; i++)
        sum += v[i];
    qsort(v, N, sizeof(*v), u64_cmp);

    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    hv = &bus_metrics_snapshot_find(s, "lat_seconds", NULL, 0)->hist;
    assert_int_equal(hv->count, N);
    assert_int_equal(hv->sum_ns, sum); /* exact */
    assert_within_1pct("p50", dist_name[d], hv->p50_ns, exact_q(v, N, 0.5));
    assert_within_1pct("p90", dist_name[d], hv->p90_ns, exact_q(v, N, 0.9));
    assert_within_1pct("p95", dist_name[d], hv->p95_ns, exact_q(v, N, 0.95));
    assert_within_1pct("p99", dist_name[d], hv->p99_ns, exact_q(v, N, 0.99));
    assert_within_1pct("p999", dist_name[d], hv->p999_ns, exact_q(v, N, 0.999));
    assert_within_1pct("max", dist_name[d], hv->max_ns, v[N - 1]);
    assert_within_1pct("min", dist_name[d], hv->min_ns, v[0]);
    for (i = 0; i < sizeof(qs) / sizeof(qs[0]); i++)
        assert_within_1pct("quantile()", dist_name[d],
                           bus_hist_value_quantile(hv, qs[i]),
                           exact_q(v, N, qs[i]));
    /* Every bucket holds exactly the samples in [lo, hi), and is at most
     * 1/64 of its lower edge wide: the geometry behind the bound. */
    {
        size_t j = 0;
        uint64_t total = 0;
        for (i = 0; i < hv->nbuckets; i++) {
            const bus_hist_bucket *b = &hv->buckets[i];
            uint64_t cnt = 0;
            assert_true(b->lo_ns < b->hi_ns);
            assert_true(b->hi_ns - b->lo_ns <=
                        (b->lo_ns < 128 ? (uint64_t)1 : b->lo_ns / 64));
            if (i > 0)
                assert_true(b->lo_ns >= hv->buckets[i - 1].hi_ns);
            while (j < N && v[j] < b->lo_ns)
                j++;
            while (j < N && v[j] < b->hi_ns) {
                cnt++;
                j++;
            }
            assert_int_equal(cnt, b->count);
            total += b->count;
        }
        assert_int_equal(total, N);
    }
    bus_metrics_snapshot_free(s);
    bus_hist_release(h);
    bus_metrics_free(m);
    free(v);
}

static void
test_uniform(void **state)
{
    (void)state;
    check_distribution(DIST_UNIFORM, 1);
}

static void
test_exponential(void **state)
{
    (void)state;
    check_distribution(DIST_EXPONENTIAL, 1);
}

static void
test_bimodal(void **state)
{
    (void)state;
    check_distribution(DIST_BIMODAL, 1);
}

static void
test_lognormal(void **state)
{
    (void)state;
    check_distribution(DIST_LOGNORMAL, 1);
}

static void
test_small_values_are_exact(void **state)
{
    (void)state;
    check_distribution(DIST_SMALL, 1);
}

static void
test_recorded_from_four_threads(void **state)
{
    (void)state;
    check_distribution(DIST_BIMODAL, 4);
}

static void
test_empty_and_edge_values(void **state)
{
    bus_metrics_config cfg;
    bus_metrics *m;
    bus_hist *h;
    bus_metrics_snapshot *s;
    const bus_hist_value *hv;

    (void)state;
    bus_metrics_config_init(&cfg);
    cfg.hist_max_ns = 1000000; /* rounds up to 2^20 */
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "e_seconds", NULL, NULL, 0, &h),
                     BUS_OK);
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    hv = &bus_metrics_snapshot_find(s, "e_seconds", NULL, 0)->hist;
    assert_int_equal(hv->count, 0);
    assert_int_equal(hv->p99_ns, 0);
    assert_int_equal(hv->nbuckets, 0);
    assert_int_equal(bus_hist_value_quantile(hv, 0.5), 0);
    bus_metrics_snapshot_free(s);

    bus_hist_record(h, 0);
    bus_hist_record(h, (1u << 20) - 1); /* last regular bucket */
    bus_hist_record(h, 1u << 20);       /* overflow */
    bus_hist_record(h, UINT64_MAX / 4); /* overflow, sum still exact */
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    hv = &bus_metrics_snapshot_find(s, "e_seconds", NULL, 0)->hist;
    assert_int_equal(hv->count, 4);
    assert_int_equal(hv->sum_ns, (1u << 20) - 1 + (1u << 20) + UINT64_MAX / 4);
    assert_int_equal(hv->min_ns, 0);
    assert_int_equal(hv->nbuckets, 3);
    assert_int_equal(hv->buckets[1].hi_ns, 1u << 20);
    assert_int_equal(hv->buckets[2].lo_ns, 1u << 20);
    assert_true(hv->buckets[2].hi_ns == UINT64_MAX);
    assert_int_equal(hv->buckets[2].count, 2);
    /* Quantiles in the overflow bucket read as the limit. */
    assert_int_equal(hv->max_ns, 1u << 20);
    assert_int_equal(bus_hist_value_quantile(hv, 0.5),
                     hv->buckets[1].lo_ns +
                         (hv->buckets[1].hi_ns - hv->buckets[1].lo_ns) / 2);
    assert_int_equal(bus_hist_value_quantile(hv, -1), 0);
    assert_int_equal(bus_hist_value_quantile(hv, NAN), 0);
    assert_int_equal(bus_hist_value_quantile(hv, 2), 1u << 20);
    assert_int_equal(bus_hist_value_quantile(NULL, 0.5), 0);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uniform),
        cmocka_unit_test(test_exponential),
        cmocka_unit_test(test_bimodal),
        cmocka_unit_test(test_lognormal),
        cmocka_unit_test(test_small_values_are_exact),
        cmocka_unit_test(test_recorded_from_four_threads),
        cmocka_unit_test(test_empty_and_edge_values),
    };

    rng_state = bt_seed();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
