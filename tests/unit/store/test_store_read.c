/* Reads (a stream, $all, filters), stream metadata, deletes, scavenge. */
#include <time.h>

#include "store_test.h"
#include "testing.h"

static void
check_versions(const bus_store_slice *sl, uint64_t first, int step, size_t n)
{
    size_t i;

    assert_int_equal(sl->count, n);
    for (i = 0; i < n; i++)
        assert_int_equal(bus_event_stream_version(sl->events[i]),
                         first + (uint64_t)((int64_t)i * step));
}

static void
test_read_stream_both_ways(void **state)
{
    st_fix *f = *state;
    bus_store_slice sl;
    bus_event_init init;
    bus_header h = {"tenant", "acme"};
    bus_event *e;
    int i;

    memset(&sl, 0, sizeof(sl));
    for (i = 0; i < 10; i++) {
        assert_int_equal(st_append_n(f->s, "a", BUS_STORE_ANY, "t", 1, NULL),
                         BUS_OK);
        assert_int_equal(st_append_n(f->s, "b", BUS_STORE_ANY, "t", 1, NULL),
                         BUS_OK);
    }
    memset(&init, 0, sizeof(init));
    init.type = "typed";
    init.schema_version = 2;
    init.payload = "body";
    init.payload_len = 4;
    init.headers = &h;
    init.n_headers = 1;
    init.stream = "ignored-by-append";
    assert_int_equal(bus_event_create(&e, &init), BUS_OK);
    assert_int_equal(bus_store_append(f->s, "a", 10, &e, 1, NULL), BUS_OK);
    bus_event_unref(e);

    assert_int_equal(bus_store_read_stream(f->s, "a", BUS_STORE_START,
                                           BUS_STORE_FORWARD, 4, NULL, &sl),
                     BUS_OK);
    assert_int_equal(sl.status, BUS_STORE_READ_OK);
    check_versions(&sl, 1, 1, 4);
    assert_false(sl.end);
    assert_int_equal(sl.next, 5);
    assert_int_equal(sl.last, 11);
    assert_int_equal(bus_event_position(sl.events[1]), 3);
    assert_string_equal(bus_event_stream(sl.events[1]), "a");
    assert_true(bus_event_frozen(sl.events[0]));
    assert_int_equal(bus_store_read_stream(f->s, "a", sl.next,
                                           BUS_STORE_FORWARD, 100, NULL, &sl),
                     BUS_OK);
    check_versions(&sl, 5, 1, 7);
    assert_true(sl.end);
    assert_int_equal(sl.next, 12);
    /* The last one kept everything but the stream its creator set. */
    e = sl.events[6];
    assert_string_equal(bus_event_type(e), "typed");
    assert_int_equal(bus_event_schema_version(e), 2);
    assert_string_equal(bus_event_header(e, "tenant"), "acme");
    assert_int_equal(bus_event_payload_len(e), 4);
    assert_string_equal(bus_event_stream(e), "a");
    assert_int_equal(bus_event_position(e), 21);

    assert_int_equal(bus_store_read_stream(f->s, "a", BUS_STORE_END,
                                           BUS_STORE_BACKWARD, 3, NULL, &sl),
                     BUS_OK);
    check_versions(&sl, 11, -1, 3);
    assert_int_equal(sl.next, 8);
    assert_false(sl.end);
    assert_int_equal(
        bus_store_read_stream(f->s, "a", 2, BUS_STORE_BACKWARD, 10, NULL, &sl),
        BUS_OK);
    check_versions(&sl, 2, -1, 2);
    assert_true(sl.end);
    bus_store_slice_free(&sl);
}

static void
test_missing_stream_is_a_result_not_an_error(void **state)
{
    st_fix *f = *state;
    bus_store_slice sl;
    bus_store_stream_info info;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(bus_store_read_stream(f->s, "nope", 0, BUS_STORE_FORWARD,
                                           10, NULL, &sl),
                     BUS_OK);
    assert_int_equal(sl.status, BUS_STORE_READ_NO_STREAM);
    assert_int_equal(sl.count, 0);
    assert_true(sl.end);
    assert_int_equal(bus_store_stream_info_get(f->s, "nope", &info), BUS_OK);
    assert_int_equal(info.state, BUS_STORE_STREAM_NONE);
    bus_store_slice_free(&sl);
}

static void
test_read_all_with_filters(void **state)
{
    st_fix *f = *state;
    const char *types[] = {"placed", "paid", NULL};
    bus_store_filter flt = {"order-", types};
    bus_store_slice sl;
    size_t i;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(
        st_append_n(f->s, "order-1", BUS_STORE_ANY, "placed", 2, NULL),
        BUS_OK); /* 1, 2 */
    assert_int_equal(
        st_append_n(f->s, "user-1", BUS_STORE_ANY, "placed", 1, NULL),
        BUS_OK); /* 3 */
    assert_int_equal(
        st_append_n(f->s, "order-2", BUS_STORE_ANY, "shipped", 1, NULL),
        BUS_OK); /* 4 */
    assert_int_equal(
        st_append_n(f->s, "order-2", BUS_STORE_ANY, "paid", 1, NULL),
        BUS_OK); /* 5 */

    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100, NULL, &sl), BUS_OK);
    assert_int_equal(sl.count, 5);
    for (i = 0; i < 5; i++)
        assert_int_equal(bus_event_position(sl.events[i]), i + 1);
    assert_true(sl.end);
    assert_int_equal(sl.next, 6);
    assert_int_equal(sl.last, 5);

    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100, &flt, &sl), BUS_OK);
    assert_int_equal(sl.count, 3);
    assert_int_equal(bus_event_position(sl.events[0]), 1);
    assert_int_equal(bus_event_position(sl.events[1]), 2);
    assert_int_equal(bus_event_position(sl.events[2]), 5);

    assert_int_equal(bus_store_read_all(f->s, BUS_STORE_END, BUS_STORE_BACKWARD,
                                        2, &flt, &sl),
                     BUS_OK);
    assert_int_equal(sl.count, 2);
    assert_int_equal(bus_event_position(sl.events[0]), 5);
    assert_int_equal(bus_event_position(sl.events[1]), 2);
    assert_false(sl.end);
    assert_int_equal(sl.next, 1);
    assert_int_equal(
        bus_store_read_all(f->s, sl.next, BUS_STORE_BACKWARD, 2, &flt, &sl),
        BUS_OK);
    assert_int_equal(sl.count, 1);
    assert_true(sl.end);

    /* Types alone; prefix alone. */
    flt.stream_prefix = NULL;
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100, &flt, &sl), BUS_OK);
    assert_int_equal(sl.count, 4);
    flt.stream_prefix = "order-2";
    flt.types = NULL;
    assert_int_equal(
        bus_store_read_all(f->s, 3, BUS_STORE_FORWARD, 100, &flt, &sl), BUS_OK);
    assert_int_equal(sl.count, 2);
    /* Stream reads filter by type. */
    flt.types = types;
    assert_int_equal(bus_store_read_stream(f->s, "order-2", 0,
                                           BUS_STORE_FORWARD, 10, &flt, &sl),
                     BUS_OK);
    assert_int_equal(sl.count, 1);
    assert_string_equal(bus_event_type(sl.events[0]), "paid");
    bus_store_slice_free(&sl);
}

static void
test_selective_filter_reads_in_bounded_steps(void **state)
{
    st_fix *f = *state;
    const char *types[] = {"rare", NULL};
    bus_store_filter flt = {NULL, types};
    bus_store_slice sl;
    uint64_t from = 0;
    size_t found = 0;
    int i, calls = 0;

    memset(&sl, 0, sizeof(sl));
    for (i = 0; i < 10; i++)
        assert_int_equal(
            st_append_n(f->s, "x", BUS_STORE_ANY, "common", 40, NULL), BUS_OK);
    assert_int_equal(st_append_n(f->s, "x", BUS_STORE_ANY, "rare", 1, NULL),
                     BUS_OK);
    /* max_count 1 examines at most 64 records a call. */
    do {
        assert_int_equal(
            bus_store_read_all(f->s, from, BUS_STORE_FORWARD, 1, &flt, &sl),
            BUS_OK);
        found += sl.count;
        from = sl.next;
        calls++;
    } while (!sl.end);
    assert_int_equal(found, 1);
    assert_true(calls >= 401 / 64);
    bus_store_slice_free(&sl);
}

static size_t
count_stream_in_all(bus_store *s, const char *stream)
{
    bus_store_filter flt = {stream, NULL};
    bus_store_slice sl;
    size_t n;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(
        bus_store_read_all(s, 0, BUS_STORE_FORWARD, 10000, &flt, &sl), BUS_OK);
    n = sl.count;
    bus_store_slice_free(&sl);
    return n;
}

static void
test_max_count_and_truncate_hide_at_once(void **state)
{
    st_fix *f = *state;
    bus_store_stream_meta m = {0, 0, 0};
    bus_store_stream_info info;
    bus_store_slice sl;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(st_append_n(f->s, "m", BUS_STORE_ANY, "t", 10, NULL),
                     BUS_OK);
    m.max_count = 3;
    assert_int_equal(bus_store_stream_set_meta(f->s, "m", &m), BUS_OK);
    assert_int_equal(
        bus_store_read_stream(f->s, "m", 0, BUS_STORE_FORWARD, 100, NULL, &sl),
        BUS_OK);
    check_versions(&sl, 8, 1, 3);
    assert_int_equal(count_stream_in_all(f->s, "m"), 3);
    assert_int_equal(st_append_n(f->s, "m", 10, "t", 2, NULL), BUS_OK);
    assert_int_equal(bus_store_read_stream(f->s, "m", BUS_STORE_END,
                                           BUS_STORE_BACKWARD, 100, NULL, &sl),
                     BUS_OK);
    check_versions(&sl, 12, -1, 3);
    assert_int_equal(count_stream_in_all(f->s, "m"), 3);

    m.max_count = 0;
    m.truncate_before = 6;
    assert_int_equal(bus_store_stream_set_meta(f->s, "m", &m), BUS_OK);
    assert_int_equal(
        bus_store_read_stream(f->s, "m", 0, BUS_STORE_FORWARD, 100, NULL, &sl),
        BUS_OK);
    check_versions(&sl, 6, 1, 7);
    /* truncate_before never goes back. */
    m.truncate_before = 2;
    assert_int_equal(bus_store_stream_set_meta(f->s, "m", &m), BUS_OK);
    assert_int_equal(bus_store_stream_info_get(f->s, "m", &info), BUS_OK);
    assert_int_equal(info.meta.truncate_before, 6);
    assert_int_equal(info.state, BUS_STORE_STREAM_LIVE);
    /* Policies are loaded again on open. */
    st_reopen(f);
    assert_int_equal(count_stream_in_all(f->s, "m"), 7);
    bus_store_slice_free(&sl);
}

static void
test_max_age_hides_old_events(void **state)
{
    st_fix *f = *state;
    bus_store_stream_meta m = {0, 60000, 0};
    bus_event_init init;
    bus_event *ev[3];
    bus_store_slice sl;
    int64_t now = (int64_t)time(NULL) * 1000000000;
    int i;

    memset(&sl, 0, sizeof(sl));
    for (i = 0; i < 3; i++) {
        memset(&init, 0, sizeof(init));
        init.type = "t";
        /* Two events an hour old, then one of now. */
        init.timestamp_ns = i < 2 ? now - (int64_t)3600 * 1000000000 : now;
        assert_int_equal(bus_event_create(&ev[i], &init), BUS_OK);
    }
    assert_int_equal(bus_store_append(f->s, "age", BUS_STORE_ANY, ev, 3, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_stream_set_meta(f->s, "age", &m), BUS_OK);
    assert_int_equal(
        bus_store_read_stream(f->s, "age", 0, BUS_STORE_FORWARD, 10, NULL, &sl),
        BUS_OK);
    check_versions(&sl, 3, 1, 1);
    assert_int_equal(count_stream_in_all(f->s, "age"), 1);
    m.max_age_ms = 0;
    assert_int_equal(bus_store_stream_set_meta(f->s, "age", &m), BUS_OK);
    assert_int_equal(count_stream_in_all(f->s, "age"), 3);
    for (i = 0; i < 3; i++)
        bus_event_unref(ev[i]);
    bus_store_slice_free(&sl);
}

static void
test_soft_delete_hides_and_recreate_continues(void **state)
{
    st_fix *f = *state;
    bus_store_stream_info info;
    bus_store_slice sl;
    bus_store_append_result r;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(st_append_n(f->s, "sd", BUS_STORE_ANY, "t", 4, NULL),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "other", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_stream_delete(f->s, "sd", 3, false),
                     BUS_ECONFLICT);
    assert_int_equal(bus_store_stream_delete(f->s, "sd", 4, false), BUS_OK);
    assert_int_equal(
        bus_store_read_stream(f->s, "sd", 0, BUS_STORE_FORWARD, 10, NULL, &sl),
        BUS_OK);
    assert_int_equal(sl.status, BUS_STORE_READ_NO_STREAM);
    assert_int_equal(count_stream_in_all(f->s, "sd"), 0);
    assert_int_equal(bus_store_stream_info_get(f->s, "sd", &info), BUS_OK);
    assert_int_equal(info.state, BUS_STORE_STREAM_DELETED);
    assert_int_equal(info.last_version, 4);
    /* Deleting again: there is nothing to delete. */
    assert_int_equal(bus_store_stream_delete(f->s, "sd", BUS_STORE_ANY, false),
                     BUS_ENOTFOUND);
    assert_int_equal(
        bus_store_stream_delete(f->s, "never", BUS_STORE_ANY, false),
        BUS_ENOTFOUND);
    /* A writer with the old version must learn of the delete. */
    assert_int_equal(st_append_n(f->s, "sd", 4, "t", 1, &r), BUS_ECONFLICT);
    assert_int_equal(st_append_n(f->s, "sd", BUS_STORE_EXISTS, "t", 1, &r),
                     BUS_ECONFLICT);
    /* Re-created: versions continue, old events stay hidden. */
    assert_int_equal(st_append_n(f->s, "sd", BUS_STORE_NO_STREAM, "t", 2, &r),
                     BUS_OK);
    assert_int_equal(r.first_version, 5);
    assert_int_equal(
        bus_store_read_stream(f->s, "sd", 0, BUS_STORE_FORWARD, 10, NULL, &sl),
        BUS_OK);
    assert_int_equal(sl.status, BUS_STORE_READ_OK);
    check_versions(&sl, 5, 1, 2);
    assert_int_equal(count_stream_in_all(f->s, "sd"), 2);
    assert_int_equal(bus_store_stream_info_get(f->s, "sd", &info), BUS_OK);
    assert_int_equal(info.state, BUS_STORE_STREAM_LIVE);
    assert_int_equal(count_stream_in_all(f->s, "other"), 1);
    st_verify_ok(f->s);
    bus_store_slice_free(&sl);
}

static void
test_hard_delete_is_forever(void **state)
{
    st_fix *f = *state;
    bus_store_stream_meta m = {1, 0, 0};
    bus_store_stream_info info;
    bus_store_slice sl;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(st_append_n(f->s, "hd", BUS_STORE_ANY, "t", 3, NULL),
                     BUS_OK);
    assert_int_equal(
        bus_store_stream_delete(f->s, "hd", BUS_STORE_EXISTS, true), BUS_OK);
    assert_int_equal(
        bus_store_read_stream(f->s, "hd", 0, BUS_STORE_FORWARD, 10, NULL, &sl),
        BUS_OK);
    assert_int_equal(sl.status, BUS_STORE_READ_DELETED);
    assert_int_equal(count_stream_in_all(f->s, "hd"), 0);
    assert_int_equal(bus_store_stream_delete(f->s, "hd", BUS_STORE_ANY, true),
                     BUS_EDELETED);
    assert_int_equal(bus_store_stream_set_meta(f->s, "hd", &m), BUS_EDELETED);
    /* A name that never existed can be tombstoned too. */
    assert_int_equal(
        bus_store_stream_delete(f->s, "fresh", BUS_STORE_NO_STREAM, true),
        BUS_OK);
    st_reopen(f);
    assert_int_equal(bus_store_stream_info_get(f->s, "hd", &info), BUS_OK);
    assert_int_equal(info.state, BUS_STORE_STREAM_TOMBSTONE);
    assert_int_equal(bus_store_stream_info_get(f->s, "fresh", &info), BUS_OK);
    assert_int_equal(info.state, BUS_STORE_STREAM_TOMBSTONE);
    assert_int_equal(count_stream_in_all(f->s, "hd"), 0);
    bus_store_slice_free(&sl);
}

static void
test_read_failure_leaves_slice_empty(void **state)
{
    st_fix *f = *state;
    bus_store_slice sl;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(st_append_n(f->s, "r", BUS_STORE_ANY, "t", 3, NULL),
                     BUS_OK);
    bus_failpoint_set("store.read", BUS_EIO, 1, false);
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 10, NULL, &sl), BUS_EIO);
    assert_int_equal(sl.count, 0);
    bus_failpoint_clear_all();
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 10, NULL, &sl), BUS_OK);
    assert_int_equal(sl.count, 3);
    bus_store_slice_free(&sl);
}

static void
append_random(bus_store *s, const char *stream, size_t n, size_t size,
              uint64_t *rng)
{
    bus_event *ev[50];
    uint8_t *buf = malloc(size);
    size_t i, j, k;

    assert_non_null(buf);
    for (i = 0; i < n; i += 50) {
        size_t m = n - i < 50 ? n - i : 50;
        for (j = 0; j < m; j++) {
            for (k = 0; k + 8 <= size; k += 8) {
                uint64_t r = bt_rand(rng);
                memcpy(buf + k, &r, 8);
            }
            assert_int_equal(bus_event_new(&ev[j], "blob", buf, size), BUS_OK);
        }
        assert_int_equal(
            bus_store_append(s, stream, BUS_STORE_ANY, ev, m, NULL), BUS_OK);
        for (j = 0; j < m; j++)
            bus_event_unref(ev[j]);
    }
    free(buf);
}

static void
test_scavenge_frees_disk(void **state)
{
    st_fix *f = *state;
    bus_store_scavenge_stats sc;
    bus_store_stats st1, st2;
    bus_store_slice sl;
    uint64_t rng = 42;

    memset(&sl, 0, sizeof(sl));
    append_random(f->s, "big", 2000, 2048, &rng);
    assert_int_equal(st_append_n(f->s, "keep", BUS_STORE_ANY, "t", 10, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_flush(f->s), BUS_OK);
    bus_store_stats_get(f->s, &st1);
    assert_true(st1.sst_bytes > 2000u * 2048u);
    assert_int_equal(bus_store_stream_delete(f->s, "big", BUS_STORE_ANY, true),
                     BUS_OK);
    assert_int_equal(bus_store_scavenge(f->s, true, &sc), BUS_OK);
    assert_int_equal(sc.events_removed, 2000);
    bus_store_stats_get(f->s, &st2);
    fprintf(stderr, "# sst bytes %llu -> %llu\n",
            (unsigned long long)st1.sst_bytes,
            (unsigned long long)st2.sst_bytes);
    assert_true(st2.sst_bytes < st1.sst_bytes / 10);
    assert_int_equal(bus_store_read_stream(f->s, "keep", 0, BUS_STORE_FORWARD,
                                           100, NULL, &sl),
                     BUS_OK);
    assert_int_equal(sl.count, 10);
    st_verify_ok(f->s);
    /* Nothing left to do the second time. */
    assert_int_equal(bus_store_scavenge(f->s, false, &sc), BUS_OK);
    assert_int_equal(sc.events_removed, 0);
    bus_store_slice_free(&sl);
}

static void
test_scavenge_removes_prefixes_only(void **state)
{
    st_fix *f = *state;
    bus_store_stream_meta m = {5, 0, 0};
    bus_store_scavenge_stats sc;
    bus_store_slice before, after;
    bus_store_append_result r;
    size_t i;

    memset(&before, 0, sizeof(before));
    memset(&after, 0, sizeof(after));
    assert_int_equal(st_append_n(f->s, "mc", BUS_STORE_ANY, "t", 20, NULL),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "sd", BUS_STORE_ANY, "t", 4, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_stream_set_meta(f->s, "mc", &m), BUS_OK);
    assert_int_equal(bus_store_stream_delete(f->s, "sd", BUS_STORE_ANY, false),
                     BUS_OK);
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100, NULL, &before),
        BUS_OK);
    assert_int_equal(bus_store_scavenge(f->s, false, &sc), BUS_OK);
    assert_int_equal(sc.streams, 2);
    assert_int_equal(sc.events_removed, 15 + 4);
    /* Reads do not change: scavenge removes only what was hidden. */
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100, NULL, &after),
        BUS_OK);
    assert_int_equal(after.count, before.count);
    for (i = 0; i < after.count; i++)
        assert_int_equal(bus_event_position(after.events[i]),
                         bus_event_position(before.events[i]));
    st_verify_ok(f->s);
    /* Streams go on as before. */
    assert_int_equal(st_append_n(f->s, "mc", 20, "t", 1, &r), BUS_OK);
    assert_int_equal(st_append_n(f->s, "sd", BUS_STORE_NO_STREAM, "t", 1, &r),
                     BUS_OK);
    assert_int_equal(r.first_version, 5);
    st_reopen(f);
    st_verify_ok(f->s);
    bus_store_slice_free(&before);
    bus_store_slice_free(&after);
}

/* Scavenge removes entries from the id index's runs (which mix streams)
 * and 'e' records: kept events stay idempotent, removed ones are gone. */
static void
test_scavenge_trims_the_id_index(void **state)
{
    st_fix *f = *state;
    bus_store_stream_meta m = {10, 0, 0};
    bus_store_scavenge_stats sc;
    bus_store_append_result r, first_keep;
    bus_event *gone, *keep, *stale, *e;
    int i;

    stale = st_ev("t", "stale"); /* appended last: below the others */
    for (i = 0; i < 600; i++) {
        e = st_ev("t", "x");
        assert_int_equal(bus_store_append(f->s, i % 2 ? "keep" : "mc",
                                          BUS_STORE_ANY, &e, 1, &r),
                         BUS_OK);
        if (i == 0)
            gone = e;
        else if (i == 1) {
            keep = e;
            first_keep = r;
        } else
            bus_event_unref(e);
    }
    assert_int_equal(
        bus_store_append(f->s, "mc", BUS_STORE_ANY, &stale, 1, NULL), BUS_OK);
    for (i = 0; i < 12; i++) /* pushes the stale one out of the last 10 */
        assert_int_equal(st_append_n(f->s, "mc", BUS_STORE_ANY, "t", 1, NULL),
                         BUS_OK);
    assert_int_equal(bus_store_stream_set_meta(f->s, "mc", &m), BUS_OK);
    assert_int_equal(bus_store_scavenge(f->s, false, &sc), BUS_OK);
    assert_int_equal(sc.events_removed, 300 + 1 + 12 - 10);
    st_verify_ok(f->s);
    /* Kept: still a retry. Removed: its id is free again. */
    assert_int_equal(
        bus_store_append(f->s, "keep", BUS_STORE_ANY, &keep, 1, &r), BUS_OK);
    assert_true(r.duplicate);
    assert_int_equal(r.first_position, first_keep.first_position);
    assert_int_equal(
        bus_store_append(f->s, "again", BUS_STORE_ANY, &gone, 1, &r), BUS_OK);
    assert_false(r.duplicate);
    assert_int_equal(
        bus_store_append(f->s, "again", BUS_STORE_ANY, &stale, 1, &r), BUS_OK);
    assert_false(r.duplicate);
    st_verify_ok(f->s);
    st_reopen(f);
    st_verify_ok(f->s);
    assert_int_equal(
        bus_store_append(f->s, "again", BUS_STORE_ANY, &gone, 1, &r), BUS_OK);
    assert_true(r.duplicate);
    bus_event_unref(gone);
    bus_event_unref(keep);
    bus_event_unref(stale);
}

static void
test_positions_are_never_reused_after_scavenge(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;

    assert_int_equal(st_append_n(f->s, "gone", BUS_STORE_ANY, "t", 3, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_stream_delete(f->s, "gone", BUS_STORE_ANY, true),
                     BUS_OK);
    assert_int_equal(bus_store_scavenge(f->s, true, NULL), BUS_OK);
    st_reopen(f); /* the log is empty now */
    assert_int_equal(bus_store_head(f->s), 3);
    assert_int_equal(st_append_n(f->s, "next", BUS_STORE_ANY, "t", 1, &r),
                     BUS_OK);
    assert_int_equal(r.first_position, 4);
    st_verify_ok(f->s);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, st_setup, st_teardown)
        T(test_read_stream_both_ways),
        T(test_missing_stream_is_a_result_not_an_error),
        T(test_read_all_with_filters),
        T(test_selective_filter_reads_in_bounded_steps),
        T(test_max_count_and_truncate_hide_at_once),
        T(test_max_age_hides_old_events),
        T(test_soft_delete_hides_and_recreate_continues),
        T(test_hard_delete_is_forever),
        T(test_read_failure_leaves_slice_empty),
        T(test_scavenge_frees_disk),
        T(test_scavenge_removes_prefixes_only),
        T(test_scavenge_trims_the_id_index),
        T(test_positions_are_never_reused_after_scavenge),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
