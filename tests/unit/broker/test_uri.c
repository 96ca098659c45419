/* Broker URIs: the grammar (good and bad), percent escapes, the typed
 * getters, consumption tracking, and allocation faults. */
#include <stdio.h>
#include <string.h>

#include <bus/broker.h>

#include "test_support.h"
#include "testing.h"

typedef struct uri_good {
    const char *in;
    const char *scheme, *authority, *path;
    const char *params; /* "k=v;k=v" as decoded, "" for none */
} uri_good;

static const uri_good good_table[] = {
    {"mem://orders", "mem", "orders", "", ""},
    {"mem://", "mem", "", "", ""},
    {"zmq+tcp://127.0.0.1:5555", "zmq+tcp", "127.0.0.1:5555", "", ""},
    {"zmq+tcp://127.0.0.1:0?mode=reliable&hwm=1000", "zmq+tcp", "127.0.0.1:0",
     "", "mode=reliable;hwm=1000"},
    {"zmq+ipc:///tmp/x.sock", "zmq+ipc", "", "/tmp/x.sock", ""},
    {"zmq+ipc:///tmp/my%20dir/x.sock?linger=0", "zmq+ipc", "",
     "/tmp/my dir/x.sock", "linger=0"},
    {"zmq+inproc://bus-1", "zmq+inproc", "bus-1", "", ""},
    {"kafka://k1:9092,k2:9092,k3:9092?acks=all", "kafka",
     "k1:9092,k2:9092,k3:9092", "", "acks=all"},
    {"kafka://mock", "kafka", "mock", "", ""},
    {"a1.b-c+d://h/p/q", "a1.b-c+d", "h", "/p/q", ""},
    {"mem://x?flag", "mem", "x", "", "flag="},
    {"mem://x?flag&k=v", "mem", "x", "", "flag=;k=v"},
    {"mem://x?k=", "mem", "x", "", "k="},
    {"mem://x?k=a=b", "mem", "x", "", "k=a=b"},
    {"mem://x?k=1&&j=2&", "mem", "x", "", "k=1;j=2"},
    {"mem://x?", "mem", "x", "", ""},
    {"mem://x?sasl.password=p%2Bq+r%26s%3d", "mem", "x", "",
     "sasl.password=p+q+r&s="},
    {"mem://x?%6Bey=%41%62", "mem", "x", "", "key=Ab"},
    {"mem://caf%C3%A9", "mem", "caf\xc3\xa9", "", ""},
    {"mem://h?path=/a/b", "mem", "h", "", "path=/a/b"},
    {"mem://h/?", "mem", "h", "/", ""},
};

static void
check_params(const bus_uri *u, const char *spec)
{
    char buf[512], *save = NULL, *tok;
    size_t n = 0;

    snprintf(buf, sizeof(buf), "%s", spec);
    for (tok = strtok_r(buf, ";", &save); tok != NULL;
         tok = strtok_r(NULL, ";", &save)) {
        char *eq = strchr(tok, '=');
        assert_non_null(eq);
        *eq = '\0';
        assert_true(n < u->n_params);
        assert_string_equal(u->params[n].key, tok);
        assert_string_equal(u->params[n].value, eq + 1);
        assert_false(u->params[n].consumed);
        n++;
    }
    assert_int_equal(u->n_params, n);
}

static void
test_parse_accepts_the_grammar(void **state)
{
    char err[256];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(good_table) / sizeof(good_table[0]); i++) {
        const uri_good *g = &good_table[i];
        bus_uri u;
        int rv = bus_uri_parse(&u, g->in, err, sizeof(err));
        if (rv != BUS_OK)
            fail_msg("'%s': %s (%s)", g->in, bus_err_name(rv), err);
        assert_string_equal(u.scheme, g->scheme);
        assert_string_equal(u.authority, g->authority);
        assert_string_equal(u.path, g->path);
        check_params(&u, g->params);
        assert_string_equal(err, "");
        bus_uri_free(&u);
    }
}

typedef struct uri_bad {
    const char *in;
    const char *why; /* a substring of errbuf */
} uri_bad;

static const uri_bad bad_table[] = {
    {"", "no scheme"},
    {"orders", "no scheme"},
    {"127.0.0.1:5555", "no scheme"},
    {"/tmp/x.sock", "no scheme"},
    {"://host", "no scheme"},
    {"mem:/x", "no scheme"},
    {"MEM://x", "bad scheme"},
    {"9p://x", "bad scheme"},
    {"zmq_tcp://x", "bad scheme"},
    {"mem://x%", "bad percent escape in authority"},
    {"mem://x%4", "bad percent escape"},
    {"mem://x%zz", "bad percent escape"},
    {"zmq+ipc:///tmp/%g0", "bad percent escape in path"},
    {"mem://x?k=%", "bad percent escape in query value"},
    {"mem://x?%2=v", "bad percent escape in query key"},
    {"mem://x%00y", "%00"},
    {"mem://x?k=a%00", "%00"},
    {"mem://x?=v", "empty key"},
    {"mem://x?a=1&=2", "empty key"},
    {"mem://x?a=1&a=2", "duplicate query key 'a'"},
    {"mem://x?a=1&%61=2", "duplicate query key 'a'"},
    {"mem://x?flag&flag", "duplicate"},
};

static void
test_parse_rejects_with_reasons(void **state)
{
    char err[256];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(bad_table) / sizeof(bad_table[0]); i++) {
        const uri_bad *b = &bad_table[i];
        bus_uri u;
        int rv = bus_uri_parse(&u, b->in, err, sizeof(err));
        if (rv != BUS_EINVAL)
            fail_msg("'%s': want BUS_EINVAL, got %s", b->in, bus_err_name(rv));
        if (strstr(err, b->why) == NULL)
            fail_msg("'%s': errbuf '%s' lacks '%s'", b->in, err, b->why);
        /* A failed parse leaves nothing to free, and freeing is safe. */
        assert_null(u.scheme);
        assert_int_equal(u.n_params, 0);
        bus_uri_free(&u);
    }
    assert_int_equal(bus_uri_parse(&(bus_uri){0}, NULL, err, sizeof(err)),
                     BUS_EINVAL);
    assert_int_equal(bus_uri_parse(NULL, "mem://x", NULL, 0), BUS_EINVAL);
}

static void
test_parse_limits_params(void **state)
{
    char s[2048], err[128];
    size_t n, i;
    bus_uri u;

    (void)state;
    for (n = BUS_URI_MAX_PARAMS; n <= BUS_URI_MAX_PARAMS + 1; n++) {
        size_t pos = (size_t)snprintf(s, sizeof(s), "mem://x?");
        for (i = 0; i < n; i++)
            pos += (size_t)snprintf(s + pos, sizeof(s) - pos, "%sk%zu=%zu",
                                    i ? "&" : "", i, i);
        if (n == BUS_URI_MAX_PARAMS) {
            assert_int_equal(bus_uri_parse(&u, s, err, sizeof(err)), BUS_OK);
            assert_int_equal(u.n_params, BUS_URI_MAX_PARAMS);
            assert_string_equal(u.params[31].key, "k31");
            bus_uri_free(&u);
        } else {
            assert_int_equal(bus_uri_parse(&u, s, err, sizeof(err)),
                             BUS_EINVAL);
            assert_non_null(strstr(err, "too many query parameters"));
        }
    }
}

static void
test_errbuf_may_be_small_or_absent(void **state)
{
    char err[8];
    bus_uri u;

    (void)state;
    assert_int_equal(bus_uri_parse(&u, "nope", err, sizeof(err)), BUS_EINVAL);
    assert_int_equal(strlen(err), sizeof(err) - 1); /* truncated, ended */
    assert_int_equal(bus_uri_parse(&u, "nope", NULL, 0), BUS_EINVAL);
    assert_int_equal(bus_uri_parse(&u, "nope", err, 0), BUS_EINVAL);
}

static void
test_get_marks_consumed(void **state)
{
    bus_uri u;

    (void)state;
    assert_int_equal(bus_uri_parse(&u, "mem://x?a=1&b=&c", NULL, 0), BUS_OK);
    assert_string_equal(bus_uri_unconsumed(&u), "a");
    assert_string_equal(bus_uri_get(&u, "a"), "1");
    assert_string_equal(bus_uri_unconsumed(&u), "b");
    assert_string_equal(bus_uri_get(&u, "b"), "");
    assert_null(bus_uri_get(&u, "zz"));
    assert_string_equal(bus_uri_unconsumed(&u), "c");
    assert_string_equal(bus_uri_get(&u, "c"), "");
    assert_null(bus_uri_unconsumed(&u));
    assert_null(bus_uri_get(&u, NULL));
    assert_null(bus_uri_get(NULL, "a"));
    assert_null(bus_uri_unconsumed(NULL));
    bus_uri_free(&u);
    bus_uri_free(&u); /* zeroed: again is fine */
    bus_uri_free(NULL);
}

static void
test_get_i64_checks_number_and_range(void **state)
{
    static const struct {
        const char *v;
        int rv;
        int64_t want;
    } t[] = {
        {"0", BUS_OK, 0},        {"42", BUS_OK, 42},
        {"-7", BUS_OK, -7},      {"+7", BUS_OK, 7},
        {"100", BUS_OK, 100},    {"101", BUS_EINVAL, 0},
        {"-101", BUS_EINVAL, 0}, {"", BUS_EINVAL, 0},
        {" 1", BUS_EINVAL, 0},   {"1 ", BUS_EINVAL, 0},
        {"1x", BUS_EINVAL, 0},   {"0x10", BUS_EINVAL, 0},
        {"-", BUS_EINVAL, 0},    {"99999999999999999999", BUS_EINVAL, 0},
    };
    char s[128];
    size_t i;
    int64_t out;
    bus_uri u;

    (void)state;
    for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        snprintf(s, sizeof(s), "mem://x?n=%s", t[i].v);
        assert_int_equal(bus_uri_parse(&u, s, NULL, 0), BUS_OK);
        out = 12345;
        if (bus_uri_get_i64(&u, "n", -100, 100, &out) != t[i].rv)
            fail_msg("value '%s'", t[i].v);
        assert_int_equal(out, t[i].rv == BUS_OK ? t[i].want : 12345);
        assert_null(bus_uri_unconsumed(&u)); /* found means consumed */
        bus_uri_free(&u);
    }
    assert_int_equal(
        bus_uri_parse(&u, "mem://x?big=9223372036854775807", NULL, 0), BUS_OK);
    assert_int_equal(bus_uri_get_i64(&u, "big", INT64_MIN, INT64_MAX, &out),
                     BUS_OK);
    assert_true(out == INT64_MAX);
    out = 5;
    assert_int_equal(bus_uri_get_i64(&u, "absent", 0, 10, &out), BUS_ENOTFOUND);
    assert_int_equal(out, 5);
    bus_uri_free(&u);
}

static void
test_get_bool_accepts_the_six_words(void **state)
{
    static const struct {
        const char *v;
        int rv;
        bool want;
    } t[] = {
        {"1", BUS_OK, true},       {"true", BUS_OK, true},
        {"TRUE", BUS_OK, true},    {"yes", BUS_OK, true},
        {"0", BUS_OK, false},      {"false", BUS_OK, false},
        {"No", BUS_OK, false},     {"no", BUS_OK, false},
        {"", BUS_EINVAL, false},   {"2", BUS_EINVAL, false},
        {"on", BUS_EINVAL, false}, {"yess", BUS_EINVAL, false},
    };
    char s[128];
    size_t i;
    bool out;
    bus_uri u;

    (void)state;
    for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        snprintf(s, sizeof(s), "mem://x?b=%s", t[i].v);
        assert_int_equal(bus_uri_parse(&u, s, NULL, 0), BUS_OK);
        if (bus_uri_get_bool(&u, "b", &out) != t[i].rv)
            fail_msg("value '%s'", t[i].v);
        if (t[i].rv == BUS_OK)
            assert_int_equal(out, t[i].want);
        bus_uri_free(&u);
    }
    assert_int_equal(bus_uri_parse(&u, "mem://x", NULL, 0), BUS_OK);
    out = true;
    assert_int_equal(bus_uri_get_bool(&u, "b", &out), BUS_ENOTFOUND);
    assert_true(out);
    bus_uri_free(&u);
}

/* Every allocation of a parse fails in turn: each failure is ENOMEM and
 * leaks nothing (ASan), then the parse succeeds. */
static void
test_parse_survives_allocation_faults(void **state)
{
    const char *s =
        "zmq+ipc:///tmp/a%20b?x=1&y=%41&flag&z=a=b&w=" /* several allocs */;
    uint64_t n;
    bus_uri u;
    int rv;

    (void)state;
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_uri_parse(&u, s, NULL, 0);
        bool fired = bus_fault_alloc_fired();
        bus_fault_alloc_fail_nth(0, false);
        if (!fired) {
            assert_int_equal(rv, BUS_OK);
            break;
        }
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(u.scheme);
        assert_int_equal(u.n_params, 0);
    }
    assert_true(n > 5);
    assert_string_equal(u.path, "/tmp/a b");
    assert_string_equal(bus_uri_get(&u, "y"), "A");
    bus_uri_free(&u);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_accepts_the_grammar),
        cmocka_unit_test(test_parse_rejects_with_reasons),
        cmocka_unit_test(test_parse_limits_params),
        cmocka_unit_test(test_errbuf_may_be_small_or_absent),
        cmocka_unit_test(test_get_marks_consumed),
        cmocka_unit_test(test_get_i64_checks_number_and_range),
        cmocka_unit_test(test_get_bool_accepts_the_six_words),
        cmocka_unit_test(test_parse_survives_allocation_faults),
    };

    return cmocka_run_group_tests_name("uri", tests, NULL, NULL);
}
