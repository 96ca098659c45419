/*
 * Interop with an independent implementation of docs/wire-format.md:
 * codec_interop.py, using Python's msgpack. Python writes frames (valid
 * ones, some in another key order or with unknown keys, and malformed ones
 * with the error each must give) that we decode; we write frames that
 * Python decodes with msgpack.unpackb(raw=False) and checks against the
 * spec. Both sides print the fields as dump lines (codec_test_util.h), so
 * the comparison is plain text.
 *
 * Needs /usr/bin/python3 and python3-msgpack; skips when they are missing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_test_util.h"
#include "test_support.h"

#define SCRIPT BUS_SOURCE_DIR "/tests/unit/codec/codec_interop.py"

/* Runs the script in mode with stdin; returns its stdout (malloc'd), or
 * skips the test when Python or its msgpack module is missing. */
static char *
run_script(const char *mode, const char *in, size_t in_len)
{
    char *argv[] = {(char *)BUS_TEST_PYTHON, (char *)SCRIPT, (char *)mode,
                    NULL};
    char *out = NULL;
    size_t out_len = 0;
    int st = bt_run(argv, in, in_len, &out, &out_len);

    if (st == 77 || st == 127) {
        print_message("skipping: %s or python3-msgpack missing\n",
                      BUS_TEST_PYTHON);
        free(out);
        skip();
    }
    if (st != 0)
        print_message("%s %s exited with %d\n", SCRIPT, mode, st);
    assert_int_equal(st, 0);
    assert_non_null(out);
    return out;
}

/* Next line of *cur (NUL-terminated in place), or NULL at the end. */
static char *
next_line(char **cur)
{
    char *s = *cur, *nl;

    if (s == NULL || *s == '\0')
        return NULL;
    nl = strchr(s, '\n');
    if (nl != NULL) {
        *nl = '\0';
        *cur = nl + 1;
    } else {
        *cur = s + strlen(s);
    }
    return s;
}

static void
test_python_frames_decode_with_ours(void **state)
{
    char *out = run_script("gen", NULL, 0), *cur = out, *line;
    size_t n_ok = 0, n_err = 0;

    (void)state;
    while ((line = next_line(&cur)) != NULL) {
        bool ok = strncmp(line, "OK ", 3) == 0;
        char *hex = line + (ok ? 3 : 4), *sp = strchr(hex, ' ');
        size_t hexlen = sp != NULL ? (size_t)(sp - hex) : strlen(hex);
        uint8_t *frame = malloc(hexlen / 2 + 1);
        char err[256] = "";
        bus_event *e = NULL;
        size_t len;
        int rv;

        assert_true(ok || strncmp(line, "ERR ", 4) == 0);
        assert_non_null(frame);
        len = ct_unhex(hex, hexlen, frame);
        assert_true(len != (size_t)-1);
        rv = bus_codec_decode(&e, frame, len, NULL, err, sizeof(err));
        if (ok) {
            char *want = next_line(&cur), *got;
            assert_non_null(want);
            if (rv != BUS_OK)
                print_message("case %zu: %s: %s\n", n_ok, bus_err_name(rv),
                              err);
            assert_int_equal(rv, BUS_OK);
            got = ct_dump(e);
            assert_string_equal(got, want);
            free(got);
            bus_event_unref(e);
            n_ok++;
        } else {
            assert_non_null(sp);
            if (strcmp(bus_err_name(rv), sp + 1) != 0)
                print_message("error case %zu: want %s, got %s: %s\n", n_err,
                              sp + 1, bus_err_name(rv), err);
            assert_string_equal(bus_err_name(rv), sp + 1);
            assert_null(e);
            n_err++;
        }
        free(frame);
    }
    assert_true(n_ok >= 6);
    assert_true(n_err >= 15);
    free(out);
}

static void
test_our_frames_decode_with_python(void **state)
{
    enum { N = 300 };
    uint64_t rng = bt_seed();
    bus_event *evs[N];
    char *in = NULL, *out, *cur, *line;
    size_t in_len = 0, in_cap = 0, i;

    (void)state;
    for (i = 0; i < N; i++) {
        void *buf;
        size_t len;
        evs[i] = ct_random_event(&rng);
        assert_int_equal(bus_codec_encode_alloc(evs[i], &buf, &len), BUS_OK);
        if (in_len + 2 * len + 2 > in_cap) {
            in_cap = (in_len + 2 * len + 2) * 2;
            in = realloc(in, in_cap);
            assert_non_null(in);
        }
        ct_hex(buf, len, in + in_len);
        in_len += 2 * len;
        in[in_len++] = '\n';
        bus_codec_buf_free(buf, len);
    }
    out = run_script("check", in, in_len);
    cur = out;
    for (i = 0; i < N; i++) {
        char keys[96], *want, *dump;
        size_t kl;
        line = next_line(&cur);
        assert_non_null(line);
        ct_expected_keys(evs[i], keys, sizeof(keys));
        dump = ct_dump(evs[i]);
        kl = strlen(keys);
        want = malloc(5 + kl + 1 + strlen(dump) + 1);
        assert_non_null(want);
        sprintf(want, "keys=%s %s", keys, dump);
        assert_string_equal(line, want);
        free(want);
        free(dump);
        bus_event_unref(evs[i]);
    }
    assert_null(next_line(&cur));
    free(out);
    free(in);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_python_frames_decode_with_ours),
        cmocka_unit_test(test_our_frames_decode_with_python),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
