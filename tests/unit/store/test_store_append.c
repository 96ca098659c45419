/* Appends: expected versions, idempotence, multi-stream atomicity,
 * transactions, group commit and injected faults. */
#include "platform.h"
#include "store_test.h"
#include "testing.h"

#define STORE_TEST_BIG 4098 /* a stream name one byte too long */

static void
test_append_gives_versions_and_positions(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;

    assert_int_equal(st_append_n(f->s, "a", BUS_STORE_NO_STREAM, "t", 3, &r),
                     BUS_OK);
    assert_int_equal(r.err, BUS_OK);
    assert_false(r.duplicate);
    assert_int_equal(r.first_version, 1);
    assert_int_equal(r.last_version, 3);
    assert_int_equal(r.first_position, 1);
    assert_int_equal(r.last_position, 3);
    assert_int_equal(r.current_version, 3);
    assert_int_equal(st_append_n(f->s, "b", BUS_STORE_ANY, "t", 2, &r), BUS_OK);
    assert_int_equal(r.first_version, 1);
    assert_int_equal(r.first_position, 4);
    assert_int_equal(r.last_position, 5);
    assert_int_equal(bus_store_head(f->s), 5);
    st_verify_ok(f->s);
}

static void
test_expected_version_rules(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;

    /* New stream: NO_STREAM, ANY and exact 0 pass; EXISTS and 1 fail. */
    assert_int_equal(st_append_n(f->s, "s", BUS_STORE_EXISTS, "t", 1, &r),
                     BUS_ECONFLICT);
    assert_int_equal(r.current_version, 0);
    assert_int_equal(st_append_n(f->s, "s", 1, "t", 1, &r), BUS_ECONFLICT);
    assert_int_equal(st_append_n(f->s, "s", 0, "t", 1, &r), BUS_OK);
    assert_int_equal(st_append_n(f->s, "s", BUS_STORE_NO_STREAM, "t", 1, &r),
                     BUS_ECONFLICT);
    assert_int_equal(r.current_version, 1);
    assert_int_equal(r.err, BUS_ECONFLICT);
    assert_int_equal(st_append_n(f->s, "s", BUS_STORE_EXISTS, "t", 1, &r),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "s", 1, "t", 1, &r), BUS_ECONFLICT);
    assert_int_equal(r.current_version, 2);
    assert_int_equal(st_append_n(f->s, "s", 2, "t", 2, &r), BUS_OK);
    assert_int_equal(r.first_version, 3);
    assert_int_equal(st_append_n(f->s, "s", BUS_STORE_ANY, "t", 1, &r), BUS_OK);
    assert_int_equal(r.last_version, 5);
    /* A conflict writes nothing. */
    assert_int_equal(bus_store_head(f->s), 5);
}

static void
test_empty_append_checks_expected_only(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;

    assert_int_equal(
        bus_store_append(f->s, "e", BUS_STORE_NO_STREAM, NULL, 0, &r), BUS_OK);
    assert_int_equal(r.first_version, 0);
    assert_int_equal(st_last_version(f->s, "e"), 0);
    assert_int_equal(bus_store_append(f->s, "e", BUS_STORE_EXISTS, NULL, 0, &r),
                     BUS_ECONFLICT);
    assert_int_equal(bus_store_head(f->s), 0);
}

static void
test_idempotent_retry_returns_original(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r1, r2;
    bus_event *ev[3], *mix[2], *other;
    size_t i;

    for (i = 0; i < 3; i++)
        ev[i] = st_ev("t", "x");
    assert_int_equal(st_append_n(f->s, "pre", BUS_STORE_ANY, "t", 2, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_append(f->s, "a", 0, ev, 3, &r1), BUS_OK);
    /* The same request again: same figures, nothing written. */
    assert_int_equal(bus_store_append(f->s, "a", 0, ev, 3, &r2), BUS_OK);
    assert_true(r2.duplicate);
    assert_int_equal(r2.first_version, r1.first_version);
    assert_int_equal(r2.last_version, r1.last_version);
    assert_int_equal(r2.first_position, r1.first_position);
    assert_int_equal(r2.last_position, r1.last_position);
    assert_int_equal(bus_store_head(f->s), 5);
    /* Any and no-stream retries are idempotent too (EventStoreDB). */
    assert_int_equal(bus_store_append(f->s, "a", BUS_STORE_ANY, ev, 3, &r2),
                     BUS_OK);
    assert_true(r2.duplicate);
    assert_int_equal(
        bus_store_append(f->s, "a", BUS_STORE_NO_STREAM, ev, 3, &r2), BUS_OK);
    assert_true(r2.duplicate);
    /* A tail of the original run is a retry as well. */
    assert_int_equal(bus_store_append(f->s, "a", 1, ev + 1, 2, &r2), BUS_OK);
    assert_true(r2.duplicate);
    assert_int_equal(r2.first_version, 2);
    /* A different expected version is a conflict, not a retry. */
    assert_int_equal(bus_store_append(f->s, "a", 2, ev, 3, &r2), BUS_ECONFLICT);
    assert_int_equal(r2.current_version, 3);
    /* Some ids known, some new: refused. */
    other = st_ev("t", "new");
    mix[0] = ev[2];
    mix[1] = other;
    assert_int_equal(bus_store_append(f->s, "a", 3, mix, 2, &r2), BUS_EEXIST);
    /* Known ids in another stream: refused. */
    assert_int_equal(bus_store_append(f->s, "b", BUS_STORE_ANY, ev, 3, &r2),
                     BUS_EEXIST);
    /* The same id twice in one append. */
    mix[0] = other;
    assert_int_equal(bus_store_append(f->s, "c", BUS_STORE_ANY, mix, 2, &r2),
                     BUS_EINVAL);
    assert_int_equal(bus_store_head(f->s), 5);
    /* After a reopen (index on disk, not the writer's memory). */
    st_reopen(f);
    assert_int_equal(bus_store_append(f->s, "a", 0, ev, 3, &r2), BUS_OK);
    assert_true(r2.duplicate);
    assert_int_equal(r2.first_position, r1.first_position);
    for (i = 0; i < 3; i++)
        bus_event_unref(ev[i]);
    bus_event_unref(other);
    st_verify_ok(f->s);
}

/* Appends one event to stream; returns it (the caller unrefs). */
static bus_event *
append_one(bus_store *s, const char *stream, bus_store_append_result *r)
{
    bus_event *e = st_ev("t", stream);

    assert_int_equal(bus_store_append(s, stream, BUS_STORE_ANY, &e, 1, r),
                     BUS_OK);
    return e;
}

static void
assert_retry_is_duplicate(bus_store *s, const char *stream, bus_event *e,
                          const bus_store_append_result *orig)
{
    bus_store_append_result r;

    assert_int_equal(bus_store_append(s, stream, BUS_STORE_ANY, &e, 1, &r),
                     BUS_OK);
    assert_true(r.duplicate);
    assert_int_equal(r.first_position, orig->first_position);
    assert_int_equal(r.first_version, orig->first_version);
}

/* Fresh ids are indexed in runs written every few hundred positions (the
 * writer's tail before that), other ids one by one: a retry finds its
 * original wherever it is, before and after a reopen, and after a reopen
 * that had to rebuild the tail from the log. */
/* An id made before another but appended after it (two appenders), in
 * the group that turns the tail into runs: it must get an 'e' record.
 * Regression: it was left above the new watermark, below ids of the
 * runs, so the next open after a kill refused the store as corrupt. */
static void
test_older_id_in_the_flushing_group_is_indexed(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;
    bus_store_verify_report rep;
    bus_event *older = st_ev("t", "older"), *e = st_ev("t", "newer");
    char err[256] = "";
    int i;

    assert_int_equal(bus_store_append(f->s, "a", BUS_STORE_ANY, &e, 1, &r),
                     BUS_OK);
    bus_event_unref(e);
    /* 1 + 512 positions: the next group flushes the tail (512 apart). */
    for (i = 0; i < 8; i++)
        assert_int_equal(st_append_n(f->s, "b", BUS_STORE_ANY, "t", 64, NULL),
                         BUS_OK);
    assert_int_equal(
        bus_store_append(f->s, "c", BUS_STORE_ANY, &older, 1, &r), BUS_OK);
    assert_false(r.duplicate);
    assert_int_equal(bus_store_verify(f->s, &rep, err, sizeof(err)), BUS_OK);
    if (rep.problems != 0)
        fail_msg("verify: %s", err);
    /* Found again as a duplicate, before and after a reopen. */
    assert_int_equal(
        bus_store_append(f->s, "c", BUS_STORE_ANY, &older, 1, &r), BUS_OK);
    assert_true(r.duplicate);
    st_reopen(f);
    assert_int_equal(
        bus_store_append(f->s, "c", BUS_STORE_ANY, &older, 1, &r), BUS_OK);
    assert_true(r.duplicate);
    bus_event_unref(older);
}

static void
test_idempotence_across_id_runs_tail_and_stale_ids(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r_kept[4], r_stale, r;
    bus_event *stale[2], *kept[4], *e, *mix[2];
    static const char *const kept_stream[4] = {"s-early", "s-late", "s-crash"};
    uint64_t head;
    char stream[32];
    int i, round, n_kept = 0;

    /* Created first, appended last: their ids are below the store's. */
    stale[0] = st_ev("t", "stale-0");
    stale[1] = st_ev("t", "stale-1");
    kept[n_kept] = append_one(f->s, "s-early", &r_kept[n_kept]);
    n_kept++;
    for (i = 0; i < 700; i++) {
        snprintf(stream, sizeof(stream), "s-%d", i % 7);
        bus_event_unref(append_one(f->s, stream, NULL));
    }
    kept[n_kept] = append_one(f->s, "s-late", &r_kept[n_kept]);
    n_kept++;
    assert_int_equal(bus_store_append(f->s, "s-stale", BUS_STORE_NO_STREAM,
                                      stale, 2, &r_stale),
                     BUS_OK);
    for (round = 0; round < 3; round++) {
        head = bus_store_head(f->s);
        /* In a run, in the tail, and stale ('e' records). */
        for (i = 0; i < n_kept; i++)
            assert_retry_is_duplicate(f->s, kept_stream[i], kept[i],
                                      &r_kept[i]);
        assert_int_equal(bus_store_append(f->s, "s-stale", 0, stale, 2, &r),
                         BUS_OK);
        assert_true(r.duplicate);
        assert_int_equal(r.first_position, r_stale.first_position);
        /* Elsewhere, or mixed with a new id: refused. */
        assert_int_equal(
            bus_store_append(f->s, "other", BUS_STORE_ANY, &kept[0], 1, &r),
            BUS_EEXIST);
        assert_int_equal(
            bus_store_append(f->s, "other", BUS_STORE_ANY, &stale[1], 1, &r),
            BUS_EEXIST);
        e = st_ev("t", "new");
        mix[0] = kept[1];
        mix[1] = e;
        assert_int_equal(
            bus_store_append(f->s, "s-late", BUS_STORE_ANY, mix, 2, &r),
            BUS_EEXIST);
        bus_event_unref(e);
        assert_int_equal(bus_store_head(f->s), head);
        st_verify_ok(f->s);
        if (round == 0) {
            st_reopen(f); /* close writes the tail */
        } else if (round == 1) {
            /* New events in the tail, and a close that cannot write it:
             * the next open rebuilds the tail from the log. */
            for (i = 0; i < 5; i++)
                bus_event_unref(append_one(f->s, "s-crash", NULL));
            kept[n_kept] = append_one(f->s, "s-crash", &r_kept[n_kept]);
            n_kept++;
            bus_failpoint_set("store.write_direct", BUS_EIO, 1, true);
            bus_store_close(f->s);
            bus_failpoint_clear_all();
            f->s = st_open_dir(f->dir, f->dur);
        }
    }
    for (i = 0; i < n_kept; i++)
        bus_event_unref(kept[i]);
    bus_event_unref(stale[0]);
    bus_event_unref(stale[1]);
}

static void
test_multi_stream_append_is_all_or_nothing(void **state)
{
    st_fix *f = *state;
    bus_event *a[2], *b[1], *c[1];
    bus_store_append_req req[3];
    bus_store_append_result res[3];

    a[0] = st_ev("t", "a0");
    a[1] = st_ev("t", "a1");
    b[0] = st_ev("t", "b0");
    c[0] = st_ev("t", "c0");
    assert_int_equal(st_append_n(f->s, "y", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_OK);
    memset(req, 0, sizeof(req));
    req[0] = (bus_store_append_req){"x", BUS_STORE_NO_STREAM, a, 2};
    req[1] = (bus_store_append_req){"y", BUS_STORE_NO_STREAM, b, 1};
    assert_int_equal(bus_store_append_multi(f->s, req, 2, res), BUS_ECONFLICT);
    assert_int_equal(res[0].err, BUS_ECANCELED);
    assert_int_equal(res[1].err, BUS_ECONFLICT);
    assert_int_equal(res[1].current_version, 1);
    assert_int_equal(st_last_version(f->s, "x"), 0);
    assert_int_equal(bus_store_head(f->s), 1);

    req[1].expected_version = 1;
    req[2] = (bus_store_append_req){"x", 2, c, 1}; /* sees part 0 */
    assert_int_equal(bus_store_append_multi(f->s, req, 3, res), BUS_OK);
    assert_int_equal(res[0].first_version, 1);
    assert_int_equal(res[0].first_position, 2);
    assert_int_equal(res[1].first_version, 2);
    assert_int_equal(res[1].first_position, 4);
    assert_int_equal(res[2].first_version, 3);
    assert_int_equal(res[2].first_position, 5);
    assert_int_equal(st_last_version(f->s, "x"), 3);
    assert_int_equal(bus_store_head(f->s), 5);
    bus_event_unref(a[0]);
    bus_event_unref(a[1]);
    bus_event_unref(b[0]);
    bus_event_unref(c[0]);
    st_verify_ok(f->s);
}

static void
test_transaction_commits_state_and_appends_together(void **state)
{
    st_fix *f = *state;
    bus_store_txn *t;
    bus_event *e = st_ev("orders.placed", "o1");
    bus_store_append_result res;
    void *v;
    size_t vlen;
    uint64_t pos;

    assert_int_equal(bus_store_txn_begin(f->s, &t), BUS_OK);
    assert_int_equal(
        bus_store_txn_put(t, BUS_STORE_APP, "order/1", 7, "new", 3), BUS_OK);
    /* Reads see the transaction's own writes. */
    assert_int_equal(
        bus_store_txn_get(t, BUS_STORE_APP, "order/1", 7, &v, &vlen), BUS_OK);
    assert_int_equal(vlen, 3);
    bus_store_buf_free(v, vlen);
    assert_int_equal(
        bus_store_txn_append(t, "order-1", BUS_STORE_NO_STREAM, &e, 1), BUS_OK);
    assert_int_equal(bus_store_txn_checkpoint(t, "relay", 7), BUS_OK);
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_OUTBOX, "o\0\1", 3, "m", 1),
                     BUS_OK);
    /* Nothing visible before commit. */
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_APP, "order/1", 7, &v, &vlen),
        BUS_ENOTFOUND);
    assert_int_equal(bus_store_txn_commit(t, &res, 1), BUS_OK);
    assert_int_equal(res.first_position, 1);
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_APP, "order/1", 7, &v, &vlen), BUS_OK);
    assert_memory_equal(v, "new", 3);
    bus_store_buf_free(v, vlen);
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_OUTBOX, "o\0\1", 3, &v, &vlen), BUS_OK);
    bus_store_buf_free(v, vlen);
    assert_int_equal(bus_store_checkpoint_get(f->s, "relay", &pos), BUS_OK);
    assert_int_equal(pos, 7);

    /* A conflicting transaction writes none of its state. */
    assert_int_equal(bus_store_txn_begin(f->s, &t), BUS_OK);
    assert_int_equal(
        bus_store_txn_put(t, BUS_STORE_APP, "order/1", 7, "paid", 4), BUS_OK);
    assert_int_equal(bus_store_txn_delete(t, BUS_STORE_APP, "order/1", 7),
                     BUS_OK);
    assert_int_equal(
        bus_store_txn_get(t, BUS_STORE_APP, "order/1", 7, &v, &vlen),
        BUS_ENOTFOUND);
    assert_int_equal(
        bus_store_txn_append(t, "order-1", BUS_STORE_NO_STREAM, &e, 1), BUS_OK);
    bus_event_unref(e); /* the transaction holds its own reference */
    e = st_ev("orders.paid", "p");
    assert_int_equal(
        bus_store_txn_append(t, "order-1", BUS_STORE_NO_STREAM, &e, 1), BUS_OK);
    assert_int_equal(bus_store_txn_commit(t, NULL, 0), BUS_ECONFLICT);
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_APP, "order/1", 7, &v, &vlen), BUS_OK);
    assert_memory_equal(v, "new", 3);
    bus_store_buf_free(v, vlen);
    /* Abort writes nothing. */
    assert_int_equal(bus_store_txn_begin(f->s, &t), BUS_OK);
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, "k", 1, "v", 1),
                     BUS_OK);
    bus_store_txn_abort(t);
    assert_int_equal(bus_store_get(f->s, BUS_STORE_APP, "k", 1, &v, &vlen),
                     BUS_ENOTFOUND);
    bus_event_unref(e);
    assert_int_equal(bus_store_head(f->s), 1);
}

static bool
count_kv(void *opaque, const void *k, size_t kl, const void *v, size_t vl)
{
    (void)k;
    (void)kl;
    (void)v;
    (void)vl;
    ++*(int *)opaque;
    return true;
}

static void
test_scan_walks_a_prefix(void **state)
{
    st_fix *f = *state;
    bus_store_txn *t;
    int n = 0;

    assert_int_equal(bus_store_txn_begin(f->s, &t), BUS_OK);
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, "a/1", 3, "", 0),
                     BUS_OK);
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, "a/2", 3, "", 0),
                     BUS_OK);
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, "b/1", 3, "", 0),
                     BUS_OK);
    assert_int_equal(bus_store_txn_commit(t, NULL, 0), BUS_OK);
    assert_int_equal(bus_store_scan(f->s, BUS_STORE_APP, "a/", 2, count_kv, &n),
                     BUS_OK);
    assert_int_equal(n, 2);
    n = 0;
    assert_int_equal(bus_store_scan(f->s, BUS_STORE_APP, NULL, 0, count_kv, &n),
                     BUS_OK);
    assert_int_equal(n, 3);
}

static void
test_invalid_appends_are_refused(void **state)
{
    st_fix *f = *state;
    bus_event *e = st_ev("t", "x"), *untyped;
    char bad[] = {'a', (char)0xff, 0};
    char big[STORE_TEST_BIG];

    assert_int_equal(bus_store_append(f->s, NULL, 0, &e, 1, NULL), BUS_EINVAL);
    assert_int_equal(bus_store_append(f->s, "", 0, &e, 1, NULL), BUS_EINVAL);
    assert_int_equal(bus_store_append(f->s, bad, 0, &e, 1, NULL), BUS_EINVAL);
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(bus_store_append(f->s, big, 0, &e, 1, NULL), BUS_EINVAL);
    assert_int_equal(bus_event_wrap(&untyped, NULL, 0, NULL, NULL), BUS_OK);
    assert_int_equal(bus_store_append(f->s, "a", 0, &untyped, 1, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append(f->s, "a", 0, NULL, 1, NULL), BUS_EINVAL);
    bus_event_unref(untyped);
    bus_event_unref(e);
    assert_int_equal(bus_store_head(f->s), 0);
}

static void
test_limits_are_etoobig(void **state)
{
    char *dir = bt_mkdtemp("bus-store-append");
    bus_store_config cfg;
    bus_store *s;
    bus_event *ev[5], *fat;
    char *payload = calloc(1, 8192);
    size_t i;

    (void)state;
    bus_store_config_init(&cfg);
    cfg.path = dir;
    cfg.create_if_missing = true;
    cfg.max_append_events = 4;
    cfg.max_event_bytes = 4096;
    assert_int_equal(bus_store_open(&s, &cfg, NULL, 0), BUS_OK);
    for (i = 0; i < 5; i++)
        ev[i] = st_ev("t", "x");
    assert_int_equal(bus_store_append(s, "a", BUS_STORE_ANY, ev, 5, NULL),
                     BUS_ETOOBIG);
    assert_int_equal(bus_store_append(s, "a", BUS_STORE_ANY, ev, 4, NULL),
                     BUS_OK);
    assert_int_equal(bus_event_new(&fat, "t", payload, 8192), BUS_OK);
    assert_int_equal(bus_store_append(s, "a", BUS_STORE_ANY, &fat, 1, NULL),
                     BUS_ETOOBIG);
    assert_int_equal(bus_store_head(s), 4);
    for (i = 0; i < 5; i++)
        bus_event_unref(ev[i]);
    bus_event_unref(fat);
    free(payload);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_deleted_stream_refuses_appends(void **state)
{
    st_fix *f = *state;

    assert_int_equal(st_append_n(f->s, "d", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_OK);
    assert_int_equal(bus_store_stream_delete(f->s, "d", BUS_STORE_ANY, true),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "d", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_EDELETED);
    assert_int_equal(st_append_n(f->s, "d", BUS_STORE_NO_STREAM, "t", 1, NULL),
                     BUS_EDELETED);
    st_reopen(f);
    assert_int_equal(st_append_n(f->s, "d", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_EDELETED);
}

static void
test_write_failure_applies_nothing(void **state)
{
    st_fix *f = *state;
    bus_store_append_result r;

    assert_int_equal(st_append_n(f->s, "w", BUS_STORE_NO_STREAM, "t", 2, &r),
                     BUS_OK);
    bus_failpoint_set("store.write", BUS_EIO, 1, false);
    assert_int_equal(st_append_n(f->s, "w", 2, "t", 3, &r), BUS_EIO);
    assert_int_equal(r.err, BUS_EIO);
    bus_failpoint_clear_all();
    assert_int_equal(bus_store_head(f->s), 2);
    assert_int_equal(st_last_version(f->s, "w"), 2);
    /* The writer's memory did not run ahead: the same append works and
     * gets the positions the failed one would have had. */
    assert_int_equal(st_append_n(f->s, "w", 2, "t", 3, &r), BUS_OK);
    assert_int_equal(r.first_version, 3);
    assert_int_equal(r.first_position, 3);
    /* A persistent failure fails each append cleanly. */
    bus_failpoint_set("store.write", BUS_EIO, 1, true);
    assert_int_equal(st_append_n(f->s, "w", 5, "t", 1, &r), BUS_EIO);
    assert_int_equal(st_append_n(f->s, "v", BUS_STORE_ANY, "t", 1, &r),
                     BUS_EIO);
    bus_failpoint_clear_all();
    assert_int_equal(bus_store_head(f->s), 5);
    st_verify_ok(f->s);
}

static void
test_append_survives_every_allocation_failure(void **state)
{
    st_fix *f = *state;
    bus_event *ev[3];
    bus_store_append_result r;
    uint64_t n;
    size_t i;
    int rv;

    for (i = 0; i < 3; i++)
        ev[i] = st_ev("t", "payload");
    assert_int_equal(st_append_n(f->s, "pre", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_OK);
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_store_append(f->s, "new-stream", BUS_STORE_NO_STREAM, ev, 3,
                              &r);
        bus_fault_alloc_fail_nth(0, false);
        if (rv == BUS_OK)
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_int_equal(bus_store_head(f->s), 1);
        assert_int_equal(st_last_version(f->s, "new-stream"), 0);
    }
    assert_int_equal(r.first_position, 2);
    assert_int_equal(r.last_version, 3);
    /* Persistent: every later allocation fails. */
    for (i = 0; i < 3; i++) {
        bus_event_unref(ev[i]);
        ev[i] = st_ev("t", "fresh");
    }
    for (n = 1; n < 8; n++) {
        bus_fault_alloc_fail_nth(n, true);
        rv = bus_store_append(f->s, "p", BUS_STORE_ANY, ev, 3, &r);
        bus_fault_alloc_fail_nth(0, false);
        assert_true(rv == BUS_OK || rv == BUS_ENOMEM);
        if (rv == BUS_OK)
            break;
    }
    for (i = 0; i < 3; i++)
        bus_event_unref(ev[i]);
    st_verify_ok(f->s);
}

/* ---- Group commit -------------------------------------------------------- */

#define GC_THREADS 8
#define GC_APPENDS 60

typedef struct gc_arg {
    bus_store *s;
    int idx;
    int ok, conflicts, other;
} gc_arg;

static void
gc_thread(void *p)
{
    gc_arg *a = p;
    char stream[32];
    uint64_t v = 0;
    int i, rv;

    snprintf(stream, sizeof(stream), "gc-%d", a->idx);
    for (i = 0; i < GC_APPENDS; i++) {
        bus_store_append_result r;
        rv = st_append_n(a->s, stream, v, "t", 1, &r);
        if (rv == BUS_OK) {
            a->ok++;
            v = r.last_version;
        } else {
            a->other++;
        }
        /* Everyone also races on one shared stream with a stale version:
         * those conflicts must not fail anyone else's append. */
        rv = st_append_n(a->s, "shared", 0, "t", 1, &r);
        if (rv == BUS_ECONFLICT)
            a->conflicts++;
        else if (rv != BUS_OK)
            a->other++;
    }
}

static void
test_concurrent_appends_are_grouped_with_own_results(void **state)
{
    char *dir = bt_mkdtemp("bus-store-gc");
    bus_store *s = st_open_dir(dir, BUS_STORE_GROUP);
    bus__thread th[GC_THREADS];
    gc_arg a[GC_THREADS];
    bus_store_stats st;
    int i, conflicts = 0;
    char stream[32];

    (void)state;
    for (i = 0; i < GC_THREADS; i++) {
        a[i] = (gc_arg){s, i, 0, 0, 0};
        assert_int_equal(bus__thread_start(&th[i], "gc", gc_thread, &a[i]),
                         BUS_OK);
    }
    for (i = 0; i < GC_THREADS; i++)
        bus__thread_join(&th[i]);
    for (i = 0; i < GC_THREADS; i++) {
        assert_int_equal(a[i].ok, GC_APPENDS);
        assert_int_equal(a[i].other, 0);
        conflicts += a[i].conflicts;
        snprintf(stream, sizeof(stream), "gc-%d", i);
        assert_int_equal(st_last_version(s, stream), GC_APPENDS);
    }
    /* Exactly one append to "shared" with expected 0 can win. */
    assert_int_equal(conflicts, GC_THREADS * GC_APPENDS - 1);
    assert_int_equal(st_last_version(s, "shared"), 1);
    bus_store_stats_get(s, &st);
    assert_int_equal(st.head, GC_THREADS * GC_APPENDS + 1);
    assert_int_equal(st.conflicts, (uint64_t)conflicts);
    /* Group commit: fewer synced writes than appends. */
    assert_true(st.syncs < st.appends);
    st_verify_ok(s);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_small_stream_cache_evicts_and_reloads(void **state)
{
    char *dir = bt_mkdtemp("bus-store-cache");
    bus_store_config cfg;
    bus_store *s;
    bus_store_append_result r;
    char name[32];
    int round, i;

    (void)state;
    bus_store_config_init(&cfg);
    cfg.path = dir;
    cfg.create_if_missing = true;
    cfg.durability = BUS_STORE_NONE;
    cfg.stream_cache = 16; /* the minimum: 100 streams cycle through it */
    assert_int_equal(bus_store_open(&s, &cfg, NULL, 0), BUS_OK);
    for (round = 0; round < 3; round++) {
        for (i = 0; i < 100; i++) {
            snprintf(name, sizeof(name), "cache-%d", i);
            /* cache-0 was soft-deleted: re-created, versions go on. */
            assert_int_equal(st_append_n(s, name,
                                         i == 0 && round > 0
                                             ? BUS_STORE_NO_STREAM
                                             : (uint64_t)round,
                                         "t", 1, &r),
                             BUS_OK);
            assert_int_equal(r.first_version, (uint64_t)round + 1);
        }
        /* A soft delete on an evicted stream must be seen on reload. */
        assert_int_equal(
            bus_store_stream_delete(s, "cache-0", BUS_STORE_ANY, false),
            BUS_OK);
        assert_int_equal(
            st_append_n(s, "cache-0", BUS_STORE_NO_STREAM, "t", 0, &r), BUS_OK);
    }
    for (i = 1; i < 100; i++) {
        snprintf(name, sizeof(name), "cache-%d", i);
        assert_int_equal(st_last_version(s, name), 3);
    }
    st_verify_ok(s);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, st_setup, st_teardown)
        T(test_append_gives_versions_and_positions),
        T(test_expected_version_rules),
        T(test_empty_append_checks_expected_only),
        T(test_idempotent_retry_returns_original),
        T(test_idempotence_across_id_runs_tail_and_stale_ids),
        T(test_older_id_in_the_flushing_group_is_indexed),
        T(test_multi_stream_append_is_all_or_nothing),
        T(test_transaction_commits_state_and_appends_together),
        T(test_scan_walks_a_prefix),
        T(test_invalid_appends_are_refused),
        cmocka_unit_test(test_limits_are_etoobig),
        T(test_deleted_stream_refuses_appends),
        T(test_write_failure_applies_nothing),
        T(test_append_survives_every_allocation_failure),
        cmocka_unit_test(test_concurrent_appends_are_grouped_with_own_results),
        cmocka_unit_test(test_small_stream_cache_evicts_and_reloads),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
