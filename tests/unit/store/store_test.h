/* Helpers shared by the store tests. */
#ifndef STORE_TEST_H
#define STORE_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/store.h>

#include "test_support.h"

/* A store in a fresh temporary directory. */
typedef struct st_fix {
    char *dir;
    bus_store *s;
    bus_store_durability dur;
} st_fix;

static inline bus_store *
st_open_dir(const char *dir, bus_store_durability dur)
{
    bus_store_config cfg;
    bus_store *s = NULL;
    char err[256];
    int rv;

    bus_store_config_init(&cfg);
    cfg.path = dir;
    cfg.create_if_missing = true;
    cfg.durability = dur;
    cfg.write_buffer_bytes = (size_t)4 << 20;
    cfg.block_cache_bytes = (size_t)8 << 20;
    rv = bus_store_open(&s, &cfg, err, sizeof(err));
    if (rv != BUS_OK)
        fprintf(stderr, "open %s: %s: %s\n", dir, bus_err_name(rv), err);
    assert_int_equal(rv, BUS_OK);
    return s;
}

static inline int
st_setup(void **state)
{
    st_fix *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->dir = bt_mkdtemp("bus-store-test");
    assert_non_null(f->dir);
    f->dur = BUS_STORE_NONE;
    f->s = st_open_dir(f->dir, f->dur);
    *state = f;
    return 0;
}

static inline int
st_teardown(void **state)
{
    st_fix *f = *state;

    bus_store_close(f->s);
    bt_rmtree(f->dir);
    free(f->dir);
    free(f);
    return 0;
}

static inline void
st_reopen(st_fix *f)
{
    bus_store_close(f->s);
    f->s = st_open_dir(f->dir, f->dur);
}

/* A new event of type with payload text. */
static inline bus_event *
st_ev(const char *type, const char *text)
{
    bus_event *e = NULL;

    assert_int_equal(bus_event_new(&e, type, text, text ? strlen(text) : 0),
                     BUS_OK);
    return e;
}

/* Appends n events "<type>" with payloads "<prefix>-<i>" to stream. */
static inline int
st_append_n(bus_store *s, const char *stream, uint64_t expected,
            const char *type, size_t n, bus_store_append_result *res)
{
    bus_event *ev[64];
    char buf[64];
    size_t i;
    int rv;

    assert_true(n <= 64);
    for (i = 0; i < n; i++) {
        snprintf(buf, sizeof(buf), "%s-%zu", stream, i);
        ev[i] = st_ev(type, buf);
    }
    rv = bus_store_append(s, stream, expected, ev, n, res);
    for (i = 0; i < n; i++)
        bus_event_unref(ev[i]);
    return rv;
}

static inline uint64_t
st_last_version(bus_store *s, const char *stream)
{
    bus_store_stream_info info;

    assert_int_equal(bus_store_stream_info_get(s, stream, &info), BUS_OK);
    return info.last_version;
}

static inline void
st_verify_ok(bus_store *s)
{
    bus_store_verify_report r;
    char err[256];

    assert_int_equal(bus_store_verify(s, &r, err, sizeof(err)), BUS_OK);
    if (r.problems != 0)
        fprintf(stderr, "verify: %llu problems: %s\n",
                (unsigned long long)r.problems, err);
    assert_int_equal(r.problems, 0);
}

#endif
