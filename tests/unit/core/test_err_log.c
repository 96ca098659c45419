/* Error table and logging. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "test_support.h"

static void
test_every_code_has_name_and_text(void **state)
{
    int c;

    (void)state;
    assert_string_equal(bus_err_name(BUS_OK), "BUS_OK");
    assert_string_equal(bus_err_name(BUS_ENOMEM), "BUS_ENOMEM");
    assert_string_equal(bus_strerror(BUS_EINVAL), "invalid argument");
    for (c = 1; c < BUS_ERR_COUNT_; c++) {
        assert_true(strncmp(bus_err_name(c), "BUS_E", 5) == 0);
        assert_true(strlen(bus_strerror(c)) > 3);
        assert_string_not_equal(bus_strerror(c), "unknown error");
    }
    assert_string_equal(bus_strerror(-1), "unknown error");
    assert_string_equal(bus_strerror(BUS_ERR_COUNT_), "unknown error");
    assert_string_equal(bus_err_name(9999), "BUS_E?");
}

static void
test_retriable_codes(void **state)
{
    (void)state;
    assert_true(bus_err_retriable(BUS_EAGAIN));
    assert_true(bus_err_retriable(BUS_EUNAVAIL));
    assert_true(bus_err_retriable(BUS_ETIMEDOUT));
    assert_true(bus_err_retriable(BUS_EBUSY));
    assert_false(bus_err_retriable(BUS_OK));
    assert_false(bus_err_retriable(BUS_EINVAL));
    assert_false(bus_err_retriable(BUS_EPROTO));
    assert_false(bus_err_retriable(BUS_ECONFLICT));
    assert_false(bus_err_retriable(12345));
}

typedef struct captured {
    int calls;
    bus_log_level level;
    char subsys[32];
    char msg[2048];
} captured;

static void
capture_fn(void *opaque, bus_log_level level, const char *subsys,
           const char *msg)
{
    captured *c = opaque;

    c->calls++;
    c->level = level;
    snprintf(c->subsys, sizeof(c->subsys), "%s", subsys);
    snprintf(c->msg, sizeof(c->msg), "%s", msg);
}

static void
test_logf_filters_by_level(void **state)
{
    captured c = {0};
    bus_logger lg = {capture_fn, &c, BUS_LOG_WARN};
    bus_logger dflt = {capture_fn, &c, BUS_LOG_DEFAULT};
    char big[3000];

    (void)state;
    bus_logf(&lg, BUS_LOG_INFO, "core", "dropped %d", 1);
    assert_int_equal(c.calls, 0);
    bus_logf(&lg, BUS_LOG_ERR, "store", "failed: %s", "disk");
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.level, BUS_LOG_ERR);
    assert_string_equal(c.subsys, "store");
    assert_string_equal(c.msg, "failed: disk");
    bus_logf(&dflt, BUS_LOG_INFO, "core", "info passes by default");
    assert_int_equal(c.calls, 2);
    bus_logf(&dflt, BUS_LOG_DEBUG, "core", "debug does not");
    assert_int_equal(c.calls, 2);
    bus_logf(NULL, BUS_LOG_ERR, "core", "no logger: no-op");
    assert_false(bus_log_enabled(NULL, BUS_LOG_ERR));
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    bus_logf(&lg, BUS_LOG_ERR, "core", "%s", big); /* truncated, no overflow */
    assert_int_equal(strlen(c.msg), 1023);
}

static void
test_level_parse(void **state)
{
    bus_log_level l;

    (void)state;
    assert_int_equal(bus_log_level_parse("WARN", &l), BUS_OK);
    assert_int_equal(l, BUS_LOG_WARN);
    assert_int_equal(bus_log_level_parse("error", &l), BUS_OK);
    assert_int_equal(l, BUS_LOG_ERR);
    assert_int_equal(bus_log_level_parse("debug", &l), BUS_OK);
    assert_int_equal(bus_log_level_parse("loud", &l), BUS_EINVAL);
    assert_string_equal(bus_log_level_name(BUS_LOG_INFO), "info");
}

/* Runs bus_log_stderr with stderr redirected to a pipe and returns what
 * it wrote. */
static void
capture_stderr(const bus_log_format *fmt, const char *msg, char *out,
               size_t cap)
{
    int p[2], saved;
    ssize_t n;

    assert_int_equal(pipe(p), 0);
    saved = dup(2);
    dup2(p[1], 2);
    bus_log_stderr((void *)fmt, BUS_LOG_WARN, "kafka", msg);
    dup2(saved, 2);
    close(saved);
    close(p[1]);
    n = read(p[0], out, cap - 1);
    assert_true(n > 0);
    out[n] = '\0';
    close(p[0]);
}

static void
test_stderr_text_and_json(void **state)
{
    bus_log_format json = BUS_LOG_JSON;
    char out[4096];

    (void)state;
    capture_stderr(NULL, "broker down", out, sizeof(out));
    assert_non_null(strstr(out, "WARN"));
    assert_non_null(strstr(out, "kafka: broker down\n"));
    assert_true(out[4] == '-' && out[10] == 'T'); /* ISO 8601 */

    capture_stderr(&json, "quote \" back\\slash\nnewline\x01", out,
                   sizeof(out));
    assert_true(out[0] == '{');
    assert_non_null(strstr(out, "\"level\":\"warn\""));
    assert_non_null(strstr(out, "\"subsys\":\"kafka\""));
    assert_non_null(
        strstr(out, "\"msg\":\"quote \\\" back\\\\slash\\nnewline\\u0001\""));
    assert_non_null(strstr(out, "}\n"));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_code_has_name_and_text),
        cmocka_unit_test(test_retriable_codes),
        cmocka_unit_test(test_logf_filters_by_level),
        cmocka_unit_test(test_level_parse),
        cmocka_unit_test(test_stderr_text_and_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
