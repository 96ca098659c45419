/*
 * Asynchronous appends (bus_store_append_async): callbacks run once each,
 * in queue order, with the figures of bus_store_append; errors are
 * returned at once or given to the callback; the window blocks or says
 * BUS_EAGAIN; callbacks may queue more but not block; close waits for
 * every queued append and its callback; concurrent appenders, async and
 * blocking, share the group commit.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "platform.h"
#include "store_test.h"

#define MAX_SEEN 4096
#define ASYNC_WAIT_MS 30000 /* deadline of a callback wait */

/* What the callbacks saw, in the order they ran. */
typedef struct seen {
    pthread_mutex_t mtx;
    size_t n;
    int tag[MAX_SEEN];
    bus_store_append_result res[MAX_SEEN];
    _Atomic size_t calls;
} seen;

typedef struct cb_arg {
    seen *sn;
    int tag;
} cb_arg;

static void
seen_init(seen *sn)
{
    memset(sn, 0, sizeof(*sn));
    pthread_mutex_init(&sn->mtx, NULL);
}

static void
record(void *opaque, const bus_store_append_result *res)
{
    cb_arg *a = opaque;
    seen *sn = a->sn;

    pthread_mutex_lock(&sn->mtx);
    if (sn->n < MAX_SEEN) {
        sn->tag[sn->n] = a->tag;
        sn->res[sn->n] = *res;
        sn->n++;
    }
    pthread_mutex_unlock(&sn->mtx);
    atomic_fetch_add(&sn->calls, 1);
}

typedef struct calls_want {
    seen *sn;
    size_t n;
} calls_want;

static int
calls_reached(void *arg)
{
    calls_want *w = arg;

    return atomic_load(&w->sn->calls) >= w->n;
}

static void
wait_calls(seen *sn, size_t n)
{
    calls_want w = {sn, n};

    assert_true(bt_wait_for(calls_reached, &w, ASYNC_WAIT_MS));
}

/* A store without fsync in dir, with a window of max_async_bytes and at
 * most max_events events an append (0: the defaults). */
static bus_store *
open_small(const char *dir, size_t max_async_bytes, uint32_t max_events)
{
    bus_store_config cfg;
    bus_store *s = NULL;

    bus_store_config_init(&cfg);
    cfg.path = dir;
    cfg.create_if_missing = true;
    cfg.durability = BUS_STORE_NONE;
    if (max_async_bytes != 0)
        cfg.max_async_bytes = max_async_bytes;
    if (max_events != 0)
        cfg.max_append_events = max_events;
    assert_int_equal(bus_store_open(&s, &cfg, NULL, 0), BUS_OK);
    return s;
}

static int
append_one(bus_store *s, const char *stream, uint64_t expected,
           unsigned flags, cb_arg *a)
{
    bus_event *e = st_ev("t", stream);
    int rv = bus_store_append_async(s, stream, expected, &e, 1, flags, record,
                                    a);

    bus_event_unref(e);
    return rv;
}

/* ---- Order and figures ----------------------------------------------- */

static void
test_callbacks_in_order_with_pipelined_versions(void **state)
{
    st_fix *f = *state;
    enum { N = 1000 };
    static cb_arg args[N];
    static seen sn;
    bus_event *ev[3];
    size_t i;

    seen_init(&sn);
    for (i = 0; i < N; i++) {
        args[i] = (cb_arg){&sn, (int)i};
        /* Exact expected versions, each following the one queued before. */
        assert_int_equal(append_one(f->s, "pipe", i == 0 ? BUS_STORE_NO_STREAM
                                                         : (uint64_t)i,
                                    0, &args[i]),
                         BUS_OK);
    }
    wait_calls(&sn, N);
    assert_int_equal(sn.n, N);
    for (i = 0; i < N; i++) {
        assert_int_equal(sn.tag[i], (int)i);
        assert_int_equal(sn.res[i].err, BUS_OK);
        assert_int_equal(sn.res[i].first_version, i + 1);
        assert_int_equal(sn.res[i].last_version, i + 1);
        if (i > 0)
            assert_true(sn.res[i].first_position >
                        sn.res[i - 1].last_position);
    }
    assert_int_equal(st_last_version(f->s, "pipe"), N);

    /* Several events in one request; the events are frozen and held
     * until the callback, then released. */
    for (i = 0; i < 3; i++)
        ev[i] = st_ev("multi", "x");
    args[0].tag = 7777;
    assert_int_equal(bus_store_append_async(f->s, "pipe", N, ev, 3, 0, record,
                                            &args[0]),
                     BUS_OK);
    assert_true(bus_event_frozen(ev[0]));
    wait_calls(&sn, N + 1);
    assert_int_equal(sn.tag[N], 7777);
    assert_int_equal(sn.res[N].first_version, N + 1);
    assert_int_equal(sn.res[N].last_version, N + 3);
    for (i = 0; i < 3; i++) {
        assert_int_equal(bus_event_refcount(ev[i]), 1);
        bus_event_unref(ev[i]);
    }
    st_verify_ok(f->s);
}

static void
test_conflict_and_idempotence_go_to_the_callback(void **state)
{
    st_fix *f = *state;
    cb_arg a[4];
    bus_event *e = st_ev("t", "once");
    seen sn;
    int i;

    seen_init(&sn);
    for (i = 0; i < 4; i++)
        a[i] = (cb_arg){&sn, i};
    assert_int_equal(bus_store_append_async(f->s, "c", BUS_STORE_NO_STREAM,
                                            &e, 1, 0, record, &a[0]),
                     BUS_OK);
    /* Wrong expected version: refused, the others unaffected. */
    assert_int_equal(append_one(f->s, "c", 5, 0, &a[1]), BUS_OK);
    /* The same event again with the same expectation: a duplicate. */
    assert_int_equal(bus_store_append_async(f->s, "c", BUS_STORE_NO_STREAM,
                                            &e, 1, 0, record, &a[2]),
                     BUS_OK);
    assert_int_equal(append_one(f->s, "c", 1, 0, &a[3]), BUS_OK);
    wait_calls(&sn, 4);
    assert_int_equal(sn.res[0].err, BUS_OK);
    assert_int_equal(sn.res[1].err, BUS_ECONFLICT);
    assert_int_equal(sn.res[1].current_version, 1);
    assert_int_equal(sn.res[2].err, BUS_OK);
    assert_true(sn.res[2].duplicate);
    assert_int_equal(sn.res[2].first_version, 1);
    assert_int_equal(sn.res[3].err, BUS_OK);
    assert_int_equal(sn.res[3].first_version, 2);
    bus_event_unref(e);
}

/* ---- Errors returned at once ----------------------------------------- */

static void
test_bad_arguments_are_refused_without_a_callback(void **state)
{
    st_fix *f = *state;
    bus_event *e = st_ev("t", "x");
    bus_event *none = NULL;
    bus_store *small;
    char *dir = bt_mkdtemp("bus-store-async-lim");
    seen sn;
    cb_arg a = {&sn, 0};

    seen_init(&sn);
    assert_int_equal(bus_store_append_async(NULL, "s", BUS_STORE_ANY, &e, 1,
                                            0, record, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, "s", BUS_STORE_ANY, &e, 1,
                                            0, NULL, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, "s", BUS_STORE_ANY, &e, 1,
                                            0x80, record, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, "", BUS_STORE_ANY, &e, 1, 0,
                                            record, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, NULL, BUS_STORE_ANY, &e, 1,
                                            0, record, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, "s", BUS_STORE_ANY, &none,
                                            1, 0, record, &a),
                     BUS_EINVAL);
    assert_int_equal(bus_store_append_async(f->s, "s", BUS_STORE_ANY, NULL, 2,
                                            0, record, &a),
                     BUS_EINVAL);

    small = open_small(dir, 0, 1);
    {
        bus_event *two[2] = {e, e};
        assert_int_equal(bus_store_append_async(small, "s", BUS_STORE_ANY,
                                                two, 2, 0, record, &a),
                         BUS_ETOOBIG);
    }
    bus_store_close_async(small);
    assert_int_equal(bus_store_append_async(small, "s", BUS_STORE_ANY, &e, 1,
                                            0, record, &a),
                     BUS_ECLOSED);
    bus_store_close(small);
    bt_rmtree(dir);
    free(dir);

    assert_int_equal(bus_event_refcount(e), 1);
    bus_event_unref(e);
    assert_int_equal(atomic_load(&sn.calls), 0);
}

/* ---- The window ------------------------------------------------------ */

/* A callback that holds the writer thread until the test opens the gate. */
typedef struct gate {
    pthread_mutex_t mtx;
    pthread_cond_t cond;
    bool open, entered;
    seen *sn;
} gate;

static void
gated(void *opaque, const bus_store_append_result *res)
{
    gate *g = opaque;
    cb_arg a = {g->sn, -1};

    pthread_mutex_lock(&g->mtx);
    g->entered = true;
    pthread_cond_broadcast(&g->cond);
    while (!g->open)
        pthread_cond_wait(&g->cond, &g->mtx);
    pthread_mutex_unlock(&g->mtx);
    record(&a, res);
}

typedef struct blocker {
    bus_store *s;
    seen *sn;
    cb_arg a;
    atomic_int rv;
    atomic_bool returned;
} blocker;

static void
blocking_append(void *arg)
{
    blocker *b = arg;

    atomic_store(&b->rv, append_one(b->s, "w", BUS_STORE_ANY, 0, &b->a));
    atomic_store(&b->returned, true);
}

static void
test_window_blocks_or_says_eagain(void **state)
{
    char *dir = bt_mkdtemp("bus-store-async-win");
    bus_store *s;
    bus_event *e = st_ev("t", "w");
    bus__thread th;
    blocker b;
    gate g;
    seen sn;
    cb_arg a = {&sn, 1};

    (void)state;
    seen_init(&sn);
    memset(&g, 0, sizeof(g));
    pthread_mutex_init(&g.mtx, NULL);
    pthread_cond_init(&g.cond, NULL);
    g.sn = &sn;
    s = open_small(dir, 1, 0); /* one request in flight at a time */

    /* The first always fits; its callback holds the window. */
    assert_int_equal(bus_store_append_async(s, "w", BUS_STORE_ANY, &e, 1, 0,
                                            gated, &g),
                     BUS_OK);
    pthread_mutex_lock(&g.mtx);
    while (!g.entered)
        pthread_cond_wait(&g.cond, &g.mtx);
    pthread_mutex_unlock(&g.mtx);
    assert_int_equal(bus_store_append_async(s, "w", BUS_STORE_ANY, &e, 1,
                                            BUS_STORE_NONBLOCK, record, &a),
                     BUS_EAGAIN);

    /* A blocking one waits for the room. */
    memset(&b, 0, sizeof(b));
    b.s = s;
    b.a = (cb_arg){&sn, 2};
    assert_int_equal(bus__thread_start(&th, "blocker", blocking_append, &b),
                     BUS_OK);
    bus__sleep_ns(50 * 1000000u);
    assert_false(atomic_load(&b.returned));

    pthread_mutex_lock(&g.mtx);
    g.open = true;
    pthread_cond_broadcast(&g.cond);
    pthread_mutex_unlock(&g.mtx);
    bus__thread_join(&th);
    assert_int_equal(atomic_load(&b.rv), BUS_OK);
    wait_calls(&sn, 2);
    assert_int_equal(sn.tag[0], -1);
    assert_int_equal(sn.tag[1], 2);
    assert_int_equal(sn.res[1].first_version, 2);
    bus_store_close(s);
    bus_event_unref(e);
    pthread_cond_destroy(&g.cond);
    pthread_mutex_destroy(&g.mtx);
    bt_rmtree(dir);
    free(dir);
}

/* ---- Calls from a callback ------------------------------------------- */

typedef struct reenter {
    bus_store *s;
    seen *sn;
    cb_arg next;
    atomic_int sync_rv, async_rv, meta_rv, delete_rv;
} reenter;

static void
reentering(void *opaque, const bus_store_append_result *res)
{
    reenter *r = opaque;
    bus_store_append_result sr;
    bus_event *e = st_ev("t", "inner");

    (void)res;
    /* A blocking append would wait for this very thread. */
    atomic_store(&r->sync_rv,
                 bus_store_append(r->s, "re", BUS_STORE_ANY, &e, 1, &sr));
    {
        bus_store_stream_meta m;
        memset(&m, 0, sizeof(m));
        m.max_count = 10;
        atomic_store(&r->meta_rv, bus_store_stream_set_meta(r->s, "re", &m));
    }
    atomic_store(&r->delete_rv, bus_store_stream_delete(r->s, "re",
                                                        BUS_STORE_ANY, false));
    atomic_store(&r->async_rv,
                 bus_store_append_async(r->s, "re", BUS_STORE_ANY, &e, 1, 0,
                                        record, &r->next));
    bus_event_unref(e);
}

static void
test_callback_may_queue_but_not_block(void **state)
{
    st_fix *f = *state;
    bus_event *e = st_ev("t", "outer");
    reenter r;
    seen sn;

    seen_init(&sn);
    memset(&r, 0, sizeof(r));
    r.s = f->s;
    r.sn = &sn;
    r.next = (cb_arg){&sn, 9};
    assert_int_equal(bus_store_append_async(f->s, "re", BUS_STORE_ANY, &e, 1,
                                            0, reentering, &r),
                     BUS_OK);
    wait_calls(&sn, 1);
    assert_int_equal(atomic_load(&r.sync_rv), BUS_EBUSY);
    assert_int_equal(atomic_load(&r.meta_rv), BUS_EBUSY);
    assert_int_equal(atomic_load(&r.delete_rv), BUS_EBUSY);
    assert_int_equal(atomic_load(&r.async_rv), BUS_OK);
    assert_int_equal(sn.tag[0], 9);
    assert_int_equal(sn.res[0].err, BUS_OK);
    assert_int_equal(sn.res[0].first_version, 2);
    bus_event_unref(e);
}

/* A chain: each callback queues the next append, in a window of one
 * request. The running callback's own request no longer counts, so the
 * next one fits (it would be BUS_EAGAIN otherwise, for ever). */
typedef struct chain {
    bus_store *s;
    int left;
    atomic_int errs;
    atomic_int done;
} chain;

static void
chained(void *opaque, const bus_store_append_result *res)
{
    chain *c = opaque;
    bus_event *e;
    int rv;

    if (res->err != BUS_OK)
        atomic_fetch_add(&c->errs, 1);
    if (--c->left == 0) {
        atomic_store(&c->done, 1);
        return;
    }
    e = st_ev("t", "link");
    rv = bus_store_append_async(c->s, "chain", res->last_version, &e, 1, 0,
                                chained, c);
    bus_event_unref(e);
    if (rv != BUS_OK) {
        atomic_fetch_add(&c->errs, 1);
        atomic_store(&c->done, 1);
    }
}

static int
chain_done(void *arg)
{
    return atomic_load(&((chain *)arg)->done);
}

static void
test_callback_chain_in_a_window_of_one(void **state)
{
    char *dir = bt_mkdtemp("bus-store-async-chain");
    bus_store *s;
    bus_event *e = st_ev("t", "first");
    chain c;

    (void)state;
    s = open_small(dir, 1, 0);
    memset(&c, 0, sizeof(c));
    c.s = s;
    c.left = 50;
    assert_int_equal(bus_store_append_async(s, "chain", BUS_STORE_NO_STREAM,
                                            &e, 1, 0, chained, &c),
                     BUS_OK);
    assert_true(bt_wait_for(chain_done, &c, ASYNC_WAIT_MS));
    assert_int_equal(atomic_load(&c.errs), 0);
    assert_int_equal(st_last_version(s, "chain"), 50);
    bus_store_close(s);
    bus_event_unref(e);
    bt_rmtree(dir);
    free(dir);
}

/* ---- Close ----------------------------------------------------------- */

static void
test_close_waits_for_every_callback(void **state)
{
    st_fix *f = *state;
    enum { N = 500 };
    static cb_arg args[N];
    static seen sn;
    int i;

    seen_init(&sn);
    f->dur = BUS_STORE_GROUP;
    st_reopen(f);
    for (i = 0; i < N; i++) {
        args[i] = (cb_arg){&sn, i};
        assert_int_equal(append_one(f->s, "cl", BUS_STORE_ANY, 0, &args[i]),
                         BUS_OK);
    }
    bus_store_close(f->s);
    /* Everything queued was written and answered before close returned. */
    assert_int_equal(atomic_load(&sn.calls), N);
    for (i = 0; i < N; i++)
        assert_int_equal(sn.res[i].err, BUS_OK);
    f->s = st_open_dir(f->dir, f->dur);
    assert_int_equal(st_last_version(f->s, "cl"), N);
    st_verify_ok(f->s);
}

/* ---- Concurrency ----------------------------------------------------- */

#define CT_THREADS 6
#define CT_APPENDS 300

typedef struct ct_arg {
    bus_store *s;
    int id;
    seen sn;
    cb_arg a;
    int sync_ok, errs;
} ct_arg;

/* No cmocka assertion off the main thread: failures are counted. */
static void
ct_thread(void *arg)
{
    ct_arg *c = arg;
    char stream[32];
    int i;

    snprintf(stream, sizeof(stream), "ct-%d", c->id);
    for (i = 0; i < CT_APPENDS; i++) {
        if (c->id % 2 == 0) { /* async, exact versions, own stream */
            if (append_one(c->s, stream,
                           i == 0 ? BUS_STORE_NO_STREAM : (uint64_t)i, 0,
                           &c->a) != BUS_OK ||
                append_one(c->s, "ct-shared", BUS_STORE_ANY, 0, &c->a)
                    != BUS_OK)
                c->errs++;
        } else { /* blocking, on the same shared stream */
            bus_store_append_result r;
            if (st_append_n(c->s, stream, BUS_STORE_ANY, "t", 1, &r)
                    != BUS_OK ||
                st_append_n(c->s, "ct-shared", BUS_STORE_ANY, "t", 1, &r)
                    != BUS_OK)
                c->errs++;
            else
                c->sync_ok += 2;
        }
    }
}

static void
test_async_and_blocking_appenders_share_group_commit(void **state)
{
    char *dir = bt_mkdtemp("bus-store-async-ct");
    bus_store *s = st_open_dir(dir, BUS_STORE_GROUP);
    static ct_arg c[CT_THREADS];
    bus__thread th[CT_THREADS];
    bus_store_stats st;
    int i;
    size_t k;

    (void)state;
    for (i = 0; i < CT_THREADS; i++) {
        memset(&c[i], 0, sizeof(c[i]));
        c[i].s = s;
        c[i].id = i;
        seen_init(&c[i].sn);
        c[i].a = (cb_arg){&c[i].sn, i};
        assert_int_equal(bus__thread_start(&th[i], "ct", ct_thread, &c[i]),
                         BUS_OK);
    }
    for (i = 0; i < CT_THREADS; i++) {
        bus__thread_join(&th[i]);
        assert_int_equal(c[i].errs, 0);
    }
    for (i = 0; i < CT_THREADS; i += 2) {
        uint64_t own = 0;
        wait_calls(&c[i].sn, 2 * CT_APPENDS);
        for (k = 0; k < c[i].sn.n; k++) {
            assert_int_equal(c[i].sn.res[k].err, BUS_OK);
            /* Own stream's versions come back in order. */
            if (k % 2 == 0) {
                assert_int_equal(c[i].sn.res[k].first_version, own + 1);
                own++;
            }
        }
    }
    for (i = 1; i < CT_THREADS; i += 2)
        assert_int_equal(c[i].sync_ok, 2 * CT_APPENDS);
    assert_int_equal(st_last_version(s, "ct-shared"),
                     CT_THREADS * CT_APPENDS);
    bus_store_stats_get(s, &st);
    assert_int_equal(st.head, 2 * CT_THREADS * CT_APPENDS);
    assert_true(st.syncs < st.appends); /* grouped */
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
        T(test_callbacks_in_order_with_pipelined_versions),
        T(test_conflict_and_idempotence_go_to_the_callback),
        T(test_bad_arguments_are_refused_without_a_callback),
        cmocka_unit_test(test_window_blocks_or_says_eagain),
        T(test_callback_may_queue_but_not_block),
        cmocka_unit_test(test_callback_chain_in_a_window_of_one),
        T(test_close_waits_for_every_callback),
        cmocka_unit_test(test_async_and_blocking_appenders_share_group_commit),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
