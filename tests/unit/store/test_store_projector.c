/* Projectors: state and checkpoint in one write, restart, reset, pause,
 * retries that roll back, dead letters, commit failures. */
#include <stdatomic.h>

#include "platform.h"
#include "store_test.h"
#include "testing.h"

typedef struct counter {
    atomic_int retry_left; /* RETRY the next n first attempts */
    const char *reject;    /* REJECT events with this payload */
    atomic_int calls;
    atomic_int busy_checks;
    _Atomic(bus_projector *) self;
    atomic_int dead_signals, stopped_signals;
} counter;

/* Counts events per stream under "count/<stream>" (relative keys). */
static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    counter *c = opaque;
    bus_event *e = bus_delivery_event(d);
    bus_store_txn *t = bus_projector_txn(d);
    char key[300];
    void *v;
    size_t vlen, klen;
    uint64_t n = 0;
    int rv;

    atomic_fetch_add(&c->calls, 1);
    assert_non_null(t);
    klen = (size_t)snprintf(key, sizeof(key), "count/%s", bus_event_stream(e));
    rv = bus_store_txn_get(t, BUS_STORE_APP, key, klen, &v, &vlen);
    if (rv == BUS_OK) {
        assert_int_equal(vlen, 8);
        memcpy(&n, v, 8);
        bus_store_buf_free(v, vlen);
    } else {
        assert_int_equal(rv, BUS_ENOTFOUND);
    }
    n++;
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, key, klen, &n, 8),
                     BUS_OK);
    /* Writes made before a RETRY or REJECT are rolled back. */
    if (atomic_load(&c->retry_left) > 0 && bus_delivery_attempt(d) == 1) {
        atomic_fetch_sub(&c->retry_left, 1);
        return BUS_RETRY;
    }
    if (c->reject != NULL && bus_event_payload_len(e) == strlen(c->reject) &&
        memcmp(bus_event_payload(e), c->reject, strlen(c->reject)) == 0) {
        bus_delivery_set_error(d, 77, "cannot project %s", c->reject);
        return BUS_REJECT;
    }
    if (atomic_load(&c->self) != NULL && atomic_load(&c->busy_checks) == 0) {
        assert_int_equal(bus_projector_pause(atomic_load(&c->self)), BUS_EBUSY);
        assert_int_equal(bus_projector_reset(atomic_load(&c->self)), BUS_EBUSY);
        assert_int_equal(bus_store_txn_append(t, "x", BUS_STORE_ANY, &e, 1),
                         BUS_ENOTSUP);
        atomic_fetch_add(&c->busy_checks, 1);
    }
    return BUS_ACK;
}

static void
count_signal(void *opaque, bus_store_signal sig,
             const bus_store_signal_info *info)
{
    counter *c = opaque;

    (void)info;
    if (sig == BUS_STORE_DEAD_LETTER)
        atomic_fetch_add(&c->dead_signals, 1);
    if (sig == BUS_STORE_STOPPED)
        atomic_fetch_add(&c->stopped_signals, 1);
}

static bus_projector *
proj_open(bus_store *s, counter *c, const char *name,
          const bus_store_filter *flt, bus_store_on_fail on_fail)
{
    bus_projector_config cfg;
    bus_projector *p;

    bus_projector_config_init(&cfg);
    cfg.name = name;
    cfg.handler = count_handler;
    cfg.opaque = c;
    cfg.on_signal = count_signal;
    cfg.signal_opaque = c;
    cfg.batch_size = 16;
    cfg.retry.backoff_ms = 1;
    cfg.retry.backoff_max_ms = 2;
    cfg.retry.on_fail = on_fail;
    if (flt != NULL)
        cfg.filter = *flt;
    assert_int_equal(bus_projector_open(&p, s, &cfg), BUS_OK);
    atomic_store(&c->self, p);
    return p;
}

static uint64_t
count_of(bus_store *s, const char *proj, const char *stream)
{
    char key[300];
    void *v;
    size_t vlen, klen;
    uint64_t n = 0;
    int rv;

    klen = (size_t)snprintf(key, sizeof(key), "%s/count/%s", proj, stream);
    rv = bus_store_get(s, BUS_STORE_APP, key, klen, &v, &vlen);
    if (rv == BUS_ENOTFOUND)
        return 0;
    assert_int_equal(rv, BUS_OK);
    memcpy(&n, v, 8);
    bus_store_buf_free(v, vlen);
    return n;
}

static void
fill(bus_store *s, int rounds)
{
    static const char *streams[] = {"a", "b", "c", "user-1"};
    int i;

    for (i = 0; i < rounds; i++)
        assert_int_equal(st_append_n(s, streams[i % 4], BUS_STORE_ANY, "t",
                                     1 + (size_t)(i % 5), NULL),
                         BUS_OK);
}

static void
check_counts(bus_store *s, const char *proj)
{
    static const char *streams[] = {"a", "b", "c", "user-1"};
    int i;

    for (i = 0; i < 4; i++)
        assert_int_equal(count_of(s, proj, streams[i]),
                         st_last_version(s, streams[i]));
}

static void
test_projection_counts_events_per_stream(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;
    uint64_t ck;

    memset(&c, 0, sizeof(c));
    fill(f->s, 40);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    fill(f->s, 40);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    bus_projector_stats_get(p, &st);
    assert_int_equal(st.lag, 0);
    assert_int_equal(st.applied, bus_store_head(f->s));
    assert_true(st.commits >= 1);
    assert_int_equal(atomic_load(&c.busy_checks), 1);
    check_counts(f->s, "counter");
    assert_int_equal(bus_store_checkpoint_get(f->s, "$projector/counter", &ck),
                     BUS_OK);
    assert_int_equal(ck, bus_store_head(f->s));
    bus_projector_close(p);
}

static void
test_restart_continues_without_skip_or_repeat(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_config cfg;

    memset(&c, 0, sizeof(c));
    fill(f->s, 30);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, 20, 20000), BUS_OK);
    bus_projector_close(p); /* somewhere after 20 */
    fill(f->s, 30);
    st_reopen(f);
    memset(&c, 0, sizeof(c));
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    check_counts(f->s, "counter");
    /* Only one projector per name at a time. */
    bus_projector_config_init(&cfg);
    cfg.name = "counter";
    cfg.handler = count_handler;
    cfg.opaque = &c;
    {
        bus_projector *dup;
        assert_int_equal(bus_projector_open(&dup, f->s, &cfg), BUS_EEXIST);
        assert_null(dup);
    }
    /* The store closes a projector still open. */
    st_reopen(f);
}

static void
test_reset_rebuilds_from_the_start(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;

    memset(&c, 0, sizeof(c));
    fill(f->s, 20);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    assert_int_equal(bus_projector_reset(p), BUS_OK);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    check_counts(f->s, "counter");
    bus_projector_stats_get(p, &st);
    assert_int_equal(st.applied, 2 * bus_store_head(f->s));
    /* Reset while paused stays paused, with empty state. */
    assert_int_equal(bus_projector_pause(p), BUS_OK);
    assert_int_equal(bus_projector_reset(p), BUS_OK);
    bus_projector_stats_get(p, &st);
    assert_true(st.paused);
    assert_int_equal(st.checkpoint, 0);
    assert_int_equal(count_of(f->s, "counter", "a"), 0);
    assert_int_equal(bus_projector_resume(p), BUS_OK);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    check_counts(f->s, "counter");
    bus_projector_close(p);
}

static void
test_pause_and_resume(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;
    uint64_t ck;

    memset(&c, 0, sizeof(c));
    fill(f->s, 10);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    assert_int_equal(bus_projector_pause(p), BUS_OK);
    bus_projector_stats_get(p, &st);
    ck = st.checkpoint;
    fill(f->s, 10);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 50),
                     BUS_ETIMEDOUT);
    bus_projector_stats_get(p, &st);
    assert_true(st.paused);
    assert_int_equal(st.checkpoint, ck);
    assert_int_equal(st.lag, bus_store_head(f->s) - ck);
    assert_int_equal(bus_projector_resume(p), BUS_OK);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    check_counts(f->s, "counter");
    bus_projector_close(p);
}

static void
test_retry_rolls_back_the_attempt(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;

    memset(&c, 0, sizeof(c));
    atomic_store(&c.retry_left, 7);
    fill(f->s, 20);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    bus_projector_stats_get(p, &st);
    assert_int_equal(st.retries, 7);
    check_counts(f->s, "counter");
    bus_projector_close(p);
}

typedef struct dl_seen {
    uint64_t pos[8];
    int n;
} dl_seen;

static bool
dl_cb(void *opaque, uint64_t position, int err, uint32_t attempts,
      const char *msg)
{
    dl_seen *d = opaque;

    assert_int_equal(err, 77);
    assert_int_equal(attempts, 1);
    assert_string_equal(msg, "cannot project bad");
    d->pos[d->n++] = position;
    return true;
}

static void
test_dead_letters_are_recorded_with_the_checkpoint(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;
    bus_event *ev[4];
    dl_seen d;
    int i;

    memset(&c, 0, sizeof(c));
    memset(&d, 0, sizeof(d));
    c.reject = "bad";
    ev[0] = st_ev("t", "ok");
    ev[1] = st_ev("t", "bad");
    ev[2] = st_ev("t", "ok");
    ev[3] = st_ev("t", "bad");
    assert_int_equal(bus_store_append(f->s, "a", BUS_STORE_ANY, ev, 4, NULL),
                     BUS_OK);
    p = proj_open(f->s, &c, "dl", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, 4, 20000), BUS_OK);
    bus_projector_stats_get(p, &st);
    assert_int_equal(st.dead_letters, 2);
    assert_int_equal(atomic_load(&c.dead_signals), 2);
    assert_int_equal(count_of(f->s, "dl", "a"), 2);
    assert_int_equal(bus_store_dead_letters(f->s, "dl", dl_cb, &d), BUS_OK);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.pos[0], 2);
    assert_int_equal(d.pos[1], 4);
    /* Reset clears them with the state. */
    assert_int_equal(bus_projector_reset(p), BUS_OK);
    assert_int_equal(bus_projector_pause(p), BUS_OK);
    bus_projector_close(p);
    for (i = 0; i < 4; i++)
        bus_event_unref(ev[i]);
}

static void
test_stop_policy_waits_for_resume(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;
    bus_projector_stats st;
    bus_event *ev[3];
    int i;

    memset(&c, 0, sizeof(c));
    c.reject = "bad";
    ev[0] = st_ev("t", "ok");
    ev[1] = st_ev("t", "bad");
    ev[2] = st_ev("t", "ok");
    assert_int_equal(bus_store_append(f->s, "a", BUS_STORE_ANY, ev, 3, NULL),
                     BUS_OK);
    p = proj_open(f->s, &c, "stopper", NULL, BUS_STORE_ON_FAIL_STOP);
    assert_int_equal(bus_projector_wait(p, 3, 20000), BUS_ECANCELED);
    bus_projector_stats_get(p, &st);
    assert_true(st.stopped);
    assert_int_equal(st.err, 77);
    assert_int_equal(st.checkpoint, 1); /* the event before the bad one */
    assert_int_equal(atomic_load(&c.stopped_signals), 1);
    assert_int_equal(count_of(f->s, "stopper", "a"), 1);
    /* Fixed: resume retries the event. */
    c.reject = NULL;
    assert_int_equal(bus_projector_resume(p), BUS_OK);
    assert_int_equal(bus_projector_wait(p, 3, 20000), BUS_OK);
    assert_int_equal(count_of(f->s, "stopper", "a"), 3);
    bus_projector_close(p);
    for (i = 0; i < 3; i++)
        bus_event_unref(ev[i]);
}

static void
test_commit_failure_replays_without_double_apply(void **state)
{
    st_fix *f = *state;
    counter c;
    bus_projector *p;

    memset(&c, 0, sizeof(c));
    fill(f->s, 20);
    bus_failpoint_set("store.projector.commit", BUS_EIO, 2, false);
    p = proj_open(f->s, &c, "counter", NULL, BUS_STORE_ON_FAIL_SKIP);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    bus_failpoint_clear_all();
    check_counts(f->s, "counter");
    /* Some events were handled twice (the failed batch), applied once. */
    assert_true((uint64_t)atomic_load(&c.calls) > bus_store_head(f->s));
    bus_projector_close(p);
}

static void
test_filtered_projector_and_own_prefix(void **state)
{
    st_fix *f = *state;
    bus_store_filter flt = {"user-", NULL};
    bus_projector_config cfg;
    counter c;
    bus_projector *p;
    void *v;
    size_t vlen;

    memset(&c, 0, sizeof(c));
    fill(f->s, 20);
    bus_projector_config_init(&cfg);
    cfg.name = "users";
    cfg.state_prefix = "U:";
    cfg.filter = flt;
    cfg.handler = count_handler;
    cfg.opaque = &c;
    assert_int_equal(bus_projector_open(&p, f->s, &cfg), BUS_OK);
    assert_int_equal(bus_projector_wait(p, bus_store_head(f->s), 20000),
                     BUS_OK);
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_APP, "U:count/user-1", 14, &v, &vlen),
        BUS_OK);
    assert_int_equal(*(uint64_t *)v, st_last_version(f->s, "user-1"));
    bus_store_buf_free(v, vlen);
    assert_int_equal(
        bus_store_get(f->s, BUS_STORE_APP, "U:count/a", 9, &v, &vlen),
        BUS_ENOTFOUND);
    assert_int_equal((uint64_t)atomic_load(&c.calls),
                     st_last_version(f->s, "user-1"));
    bus_projector_close(p);
    cfg.name = NULL;
    assert_int_equal(bus_projector_open(&p, f->s, &cfg), BUS_EINVAL);
    assert_null(bus_projector_txn(NULL));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, st_setup, st_teardown)
        T(test_projection_counts_events_per_stream),
        T(test_restart_continues_without_skip_or_repeat),
        T(test_reset_rebuilds_from_the_start),
        T(test_pause_and_resume),
        T(test_retry_rolls_back_the_attempt),
        T(test_dead_letters_are_recorded_with_the_checkpoint),
        T(test_stop_policy_waits_for_resume),
        T(test_commit_failure_replays_without_double_apply),
        T(test_filtered_projector_and_own_prefix),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
