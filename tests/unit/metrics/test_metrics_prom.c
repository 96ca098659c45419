/* Prometheus text exposition: the output is parsed back by an independent
 * strict parser (prom_parse.c) and compared with what was recorded; label
 * and HELP escaping; le bucket semantics; the buffer API. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

#include <bus/metrics.h>

#include "platform.h"
#include "prom_parse.h"

static char *
render(bus_metrics *m)
{
    char *text;
    size_t len;

    assert_int_equal(bus_metrics_prometheus_alloc(m, &text, &len), BUS_OK);
    assert_int_equal(strlen(text), len);
    return text;
}

static void
parse_ok(const char *text, prom_doc *doc)
{
    char err[256];

    if (prom_parse(text, doc, err, sizeof(err)) != 0) {
        print_error("parse failed: %s\n--- text ---\n%s------------\n", err,
                    text);
        fail();
    }
}

static void
assert_close(double got, double want)
{
    if (!(fabs(got - want) <= 1e-12 * fabs(want) + 1e-15)) {
        print_error("got %.17g want %.17g\n", got, want);
        fail();
    }
}

static uint64_t
seven(void *opaque)
{
    (void)opaque;
    return 7;
}

static void
test_output_parses_and_matches_recorded_values(void **state)
{
    bus_metrics *m;
    bus_counter *c1, *c2, *cf;
    bus_gauge *g, *gd;
    bus_hist *h1, *h2;
    bus_label l1[] = {{"topic", "orders.placed"}, {"subscription", "billing"}};
    bus_label l2[] = {{"topic", "orders.paid"}, {"subscription", "billing"}};
    bus_label lb[] = {{"broker", "mem"}};
    const char *k1[] = {"topic", "orders.placed", "subscription", "billing"};
    const char *k2[] = {"topic", "orders.paid", "subscription", "billing"};
    const char *k1_le[] = {"topic", "orders.placed", "subscription", "billing",
                           "le",    "0.000001"};
    const char *k1_inf[] = {"topic", "orders.placed", "subscription", "billing",
                            "le",    "+Inf"};
    const char *k1_25[] = {
        "topic", "orders.placed", "subscription", "billing", "le", "2.5"};
    const char *kb[] = {"broker", "mem"};
    prom_doc doc;
    const prom_sample *s;
    char *text;
    int i, f;

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_metrics_counter(m, "bus_delivered_total",
                                         "Deliveries started.", l1, 2, &c1),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_counter(m, "bus_delivered_total", NULL, l2, 2, &c2),
        BUS_OK);
    assert_int_equal(bus_metrics_counter_fn(m, "bus_broker_published_total",
                                            "Published.", lb, 1, seven, NULL,
                                            &cf),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_gauge(m, "bus_queue_depth", "Queued now.", NULL, 0, &g),
        BUS_OK);
    assert_int_equal(bus_metrics_gauge_double(m, "bus_ratio", NULL, lb, 1, &gd),
                     BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "bus_handler_latency_seconds",
                                      "Handler run time.", l1, 2, &h1),
                     BUS_OK);
    assert_int_equal(
        bus_metrics_hist(m, "bus_handler_latency_seconds", NULL, l2, 2, &h2),
        BUS_OK);
    bus_counter_add(c1, 12345678901ull);
    bus_counter_add(c2, 3);
    bus_gauge_set(g, -42);
    bus_gauge_set_double(gd, 0.1);
    for (i = 0; i < 2; i++)
        bus_hist_record(h1, 500);
    bus_hist_record(h1, 1000); /* exactly on a bound: counts in its le */
    bus_hist_record(h1, 1500);
    bus_hist_record(h1, 1500);
    bus_hist_record(h1, 2000000000);   /* 2 s */
    bus_hist_record(h1, 100000000000); /* 100 s: beyond the 68.7 s limit */

    text = render(m);
    parse_ok(text, &doc);

    /* Families sorted by name, each TYPE'd once (the parser checks once). */
    assert_int_equal(doc.nfamilies, 5);
    f = -1;
    for (i = 0; i < doc.nfamilies; i++)
        if (strcmp(doc.families[i].name, "bus_handler_latency_seconds") == 0)
            f = i;
    assert_true(f >= 0);
    assert_string_equal(doc.families[f].type, "histogram");
    assert_string_equal(doc.families[f].help, "Handler run time.");

    s = prom_find(&doc, "bus_delivered_total", k1, 2);
    assert_non_null(s);
    assert_true(s->value == 12345678901.0);
    assert_non_null(strstr(text, "} 12345678901\n")); /* integer, exact */
    s = prom_find(&doc, "bus_delivered_total", k2, 2);
    assert_true(s->value == 3);
    s = prom_find(&doc, "bus_broker_published_total", kb, 1);
    assert_true(s->value == 7);
    s = prom_find(&doc, "bus_queue_depth", NULL, 0);
    assert_true(s->value == -42);
    assert_non_null(strstr(text, "\nbus_queue_depth -42\n"));
    assert_non_null(strstr(text, "bus_ratio{broker=\"mem\"} 0.1\n"));
    assert_non_null(strstr(text, "# TYPE bus_delivered_total counter\n"));
    assert_non_null(strstr(text, "# TYPE bus_queue_depth gauge\n"));

    /* Buckets: 500, 500, 1000 ns <= 1 us; 2 s <= 2.5 s; 100 s only in
     * +Inf. */
    s = prom_find(&doc, "bus_handler_latency_seconds_bucket", k1_le, 3);
    assert_non_null(s);
    assert_true(s->value == 3);
    s = prom_find(&doc, "bus_handler_latency_seconds_bucket", k1_25, 3);
    assert_true(s->value == 6);
    s = prom_find(&doc, "bus_handler_latency_seconds_bucket", k1_inf, 3);
    assert_true(s->value == 7);
    s = prom_find(&doc, "bus_handler_latency_seconds_count", k1, 2);
    assert_true(s->value == 7);
    s = prom_find(&doc, "bus_handler_latency_seconds_sum", k1, 2);
    assert_close(s->value, 102.000005);
    /* The sum is printed exactly, from integer nanoseconds. */
    assert_non_null(strstr(text, "_sum{subscription=\"billing\","
                                 "topic=\"orders.placed\"} 102.000005\n"));
    /* An empty histogram still has all its lines. */
    s = prom_find(&doc, "bus_handler_latency_seconds_count", k2, 2);
    assert_true(s->value == 0);
    s = prom_find(&doc, "bus_handler_latency_seconds_sum", k2, 2);
    assert_true(s->value == 0);

    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    bus_metrics_free(m);
}

static void
test_label_values_and_help_are_escaped(void **state)
{
    static const char nasty[] = "a\\b\"c\nd caf\xc3\xa9 {x=\"y\"}, ";
    bus_metrics *m;
    bus_counter *c;
    bus_label l[] = {{"path", nasty}, {"z", ""}};
    const char *kv[] = {"path", nasty, "z", ""};
    prom_doc doc;
    const prom_sample *s;
    char *text;

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_metrics_counter(m, "esc_total",
                                         "Line one\nline \\two \"quoted\"", l,
                                         2, &c),
                     BUS_OK);
    bus_counter_inc(c);
    text = render(m);
    /* Exactly the escapes of the spec: \\ \" \n in values; \\ \n in HELP
     * (quotes stay as they are there). */
    assert_non_null(strstr(text, "# HELP esc_total Line one\\nline \\\\two "
                                 "\"quoted\"\n"));
    assert_non_null(strstr(text, "esc_total{path=\"a\\\\b\\\"c\\nd "
                                 "caf\xc3\xa9 {x=\\\"y\\\"}, \",z=\"\"} 1\n"));
    parse_ok(text, &doc);
    s = prom_find(&doc, "esc_total", kv, 2);
    assert_non_null(s); /* the value round-trips through the escapes */
    assert_string_equal(doc.families[0].help,
                        "Line one\nline \\two \"quoted\"");
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    bus_metrics_free(m);
}

static void
test_special_gauge_values(void **state)
{
    bus_metrics *m;
    bus_gauge *g[6];
    char name[16];
    prom_doc doc;
    char *text;
    int i;
    const double vals[] = {NAN,    INFINITY,   -INFINITY,
                           1e-300, 123456.789, -0.30000000000000004};

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    for (i = 0; i < 6; i++) {
        snprintf(name, sizeof(name), "g%d", i);
        assert_int_equal(
            bus_metrics_gauge_double(m, name, NULL, NULL, 0, &g[i]), BUS_OK);
        bus_gauge_set_double(g[i], vals[i]);
    }
    text = render(m);
    parse_ok(text, &doc);
    assert_non_null(strstr(text, "g0 NaN\n"));
    assert_non_null(strstr(text, "g1 +Inf\n"));
    assert_non_null(strstr(text, "g2 -Inf\n"));
    assert_non_null(strstr(text, "g4 123456.789\n"));
    for (i = 3; i < 6; i++) { /* finite ones read back exactly */
        snprintf(name, sizeof(name), "g%d", i);
        assert_true(prom_find(&doc, name, NULL, 0)->value == vals[i]);
    }
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    bus_metrics_free(m);
}

/* le buckets are exact: each counts the samples <= its bound, samples
 * equal to a bound included, whether or not the bound is the edge of a
 * fine bucket. The snapshot's cumulative counts say the same. */
static void
test_le_buckets_bound_the_samples(void **state)
{
    static const uint64_t bounds[] = {1000,  1007,   2000,    4095,
                                      10000, 123457, 1000000, 50000000};
    bus_metrics_config cfg;
    bus_metrics *m;
    bus_hist *h;
    uint64_t *v, rng = bt_seed();
    size_t n = 20000, i, b;
    prom_doc doc;
    char *text, le[32];

    (void)state;
    v = malloc(n * sizeof(*v));
    assert_non_null(v);
    bus_metrics_config_init(&cfg);
    cfg.hist_bounds_ns = bounds;
    cfg.hist_bounds_len = sizeof(bounds) / sizeof(bounds[0]);
    assert_int_equal(bus_metrics_new(&m, &cfg), BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "le_seconds", NULL, NULL, 0, &h),
                     BUS_OK);
    for (i = 0; i < n; i++) {
        /* log-uniform over 100 ns .. 100 ms, plus the bounds themselves */
        v[i] = i < 3 * 8
                   ? bounds[i % 8] + (i / 8) - 1 /* b-1, b, b+1 */
                   : (uint64_t)(100.0 *
                                pow(10.0, 6.0 * (double)(bt_rand(&rng) >> 11) /
                                              9007199254740992.0));
        bus_hist_record(h, v[i]);
    }
    text = render(m);
    parse_ok(text, &doc);
    for (b = 0; b < sizeof(bounds) / sizeof(bounds[0]); b++) {
        const char *kv[] = {"le", le};
        const prom_sample *s;
        uint64_t at_most = 0;

        /* The le text is the bound in seconds, exactly. */
        snprintf(le, sizeof(le), "%llu.%09llu",
                 (unsigned long long)(bounds[b] / 1000000000u),
                 (unsigned long long)(bounds[b] % 1000000000u));
        while (le[strlen(le) - 1] == '0')
            le[strlen(le) - 1] = '\0';
        s = prom_find(&doc, "le_seconds_bucket", kv, 1);
        assert_non_null(s);
        for (i = 0; i < n; i++)
            if (v[i] <= bounds[b])
                at_most++;
        assert_true(s->value == (double)at_most);
    }
    {
        bus_metrics_snapshot *snap;
        const bus_hist_value *hv;
        assert_int_equal(bus_metrics_snapshot_take(m, &snap), BUS_OK);
        hv = &bus_metrics_snapshot_find(snap, "le_seconds", NULL, 0)->hist;
        assert_int_equal(hv->nbounds, 8);
        for (b = 0; b < 8; b++) {
            uint64_t at_most = 0;
            assert_int_equal(hv->bounds_ns[b], bounds[b]);
            for (i = 0; i < n; i++)
                if (v[i] <= bounds[b])
                    at_most++;
            assert_int_equal(hv->cumulative[b], at_most);
        }
        bus_metrics_snapshot_free(snap);
    }
    prom_doc_free(&doc);
    bus_metrics_text_free(text);
    bus_metrics_free(m);
    free(v);
}

/* Rendering while other threads record samples on, just below and just
 * above the bounds: every scrape still parses, buckets cumulative and
 * _count equal to +Inf (the parser checks both). */
typedef struct busy {
    bus_hist *h;
    atomic_bool stop;
} busy;

static void
busy_recorder(void *arg)
{
    static const uint64_t around[] = {999,  1000,  1001,   2499,  2500,
                                      2501, 99999, 100000, 100001};
    busy *b = arg;
    size_t i = 0;

    while (!atomic_load_explicit(&b->stop, memory_order_relaxed))
        bus_hist_record(b->h, around[i++ % 9]);
}

static void
test_scrape_while_recording(void **state)
{
    bus_metrics *m;
    busy b;
    bus__thread th[2];
    int i;

    (void)state;
    memset(&b, 0, sizeof(b));
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    assert_int_equal(bus_metrics_hist(m, "busy_seconds", NULL, NULL, 0, &b.h),
                     BUS_OK);
    for (i = 0; i < 2; i++)
        assert_int_equal(bus__thread_start(&th[i], "rec", busy_recorder, &b),
                         BUS_OK);
    for (i = 0; i < 100; i++) {
        char *text = render(m);
        prom_doc doc;
        parse_ok(text, &doc);
        prom_doc_free(&doc);
        bus_metrics_text_free(text);
    }
    atomic_store(&b.stop, true);
    for (i = 0; i < 2; i++)
        bus__thread_join(&th[i]);
    bus_metrics_free(m);
}

static void
test_caller_buffer_and_sizes(void **state)
{
    bus_metrics *m;
    bus_counter *c;
    bus_metrics_snapshot *s;
    char small[16], *big;
    size_t len = 0, len2 = 0;

    (void)state;
    assert_int_equal(bus_metrics_new(&m, NULL), BUS_OK);
    /* An empty registry is an empty (valid) exposition. */
    assert_int_equal(bus_metrics_prometheus(m, small, sizeof(small), &len),
                     BUS_OK);
    assert_int_equal(len, 0);
    assert_string_equal(small, "");

    assert_int_equal(bus_metrics_counter(m, "a_long_enough_name_total",
                                         "Some help.", NULL, 0, &c),
                     BUS_OK);
    bus_counter_add(c, 99);
    assert_int_equal(bus_metrics_prometheus(m, small, sizeof(small), &len),
                     BUS_ENOBUFS);
    assert_true(len > sizeof(small));
    assert_int_equal(strlen(small), sizeof(small) - 1); /* a NUL-ended
                                                         * prefix */
    assert_int_equal(bus_metrics_snapshot_take(m, &s), BUS_OK);
    /* Measuring with no buffer. */
    assert_int_equal(bus_metrics_snapshot_prometheus(s, NULL, 0, &len2),
                     BUS_ENOBUFS);
    assert_int_equal(len2, len);
    big = malloc(len + 1);
    assert_int_equal(bus_metrics_snapshot_prometheus(s, big, len, &len2),
                     BUS_ENOBUFS); /* no room for the NUL */
    assert_int_equal(bus_metrics_snapshot_prometheus(s, big, len + 1, &len2),
                     BUS_OK);
    assert_int_equal(strlen(big), len);
    assert_int_equal(strncmp(big, small, sizeof(small) - 1), 0);
    assert_string_equal(big, "# HELP a_long_enough_name_total Some help.\n"
                             "# TYPE a_long_enough_name_total counter\n"
                             "a_long_enough_name_total 99\n");
    assert_int_equal(bus_metrics_snapshot_prometheus(NULL, big, len, NULL),
                     BUS_EINVAL);
    free(big);
    bus_metrics_snapshot_free(s);
    bus_metrics_free(m);
}

/* The parser must not be vacuous: it rejects each rule's violation. */
static void
test_parser_rejects_malformed_text(void **state)
{
    static const char *const bad[] = {
        "x 1\n",                                        /* no TYPE */
        "# TYPE x counter\nx 1",                        /* no final newline */
        "# TYPE x counter\n# TYPE x counter\nx 1\n",    /* TYPE twice */
        "# TYPE x counter\nx{a=\"\\t\"} 1\n",           /* bad escape */
        "# TYPE x counter\nx{a=\"1\",a=\"2\"} 1\n",     /* duplicate label */
        "# TYPE x counter\nx 1\nx 2\n",                 /* duplicate sample */
        "# TYPE x counter\nx one\n",                    /* bad value */
        "# TYPE x counter\n# TYPE y gauge\ny 1\nx 1\n", /* not contiguous */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
        "h_sum 1\nh_count 1\n", /* not cumulative */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
        "h_sum 1\nh_count 3\n", /* _count != +Inf */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\n"
        "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", /* le order */
        "# TYPE x counter\n\nx 1\n",                     /* empty line */
        "# TYPE x counter\nx{1a=\"v\"} 1\n",             /* label name */
    };
    const char *good = "# HELP h Help \\\\ \\n.\n# TYPE h histogram\n"
                       "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
                       "h_sum 1.5\nh_count 2\n# TYPE x counter\nx 1\n";
    char err[256];
    prom_doc doc;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (prom_parse(bad[i], &doc, err, sizeof(err)) == 0) {
            print_error("accepted bad text #%zu:\n%s", i, bad[i]);
            fail();
        }
        prom_doc_free(&doc);
    }
    parse_ok(good, &doc);
    prom_doc_free(&doc);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_output_parses_and_matches_recorded_values),
        cmocka_unit_test(test_label_values_and_help_are_escaped),
        cmocka_unit_test(test_special_gauge_values),
        cmocka_unit_test(test_le_buckets_bound_the_samples),
        cmocka_unit_test(test_scrape_while_recording),
        cmocka_unit_test(test_caller_buffer_and_sizes),
        cmocka_unit_test(test_parser_rejects_malformed_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
