/* Subscriptions: history, the switch to live with racing appends, stream
 * subscriptions, retries and dead letters, falling behind, checkpoints. */
#include <sched.h>
#include <stdatomic.h>

#include "platform.h"
#include "store_test.h"
#include "testing.h"

#define REC_MAX 20000

/* Records what a subscription delivers and signals. */
typedef struct rec {
    bus__mutex mtx;
    uint64_t pos[REC_MAX];
    uint64_t ver[REC_MAX];
    size_t n;
    bus_store_signal sigs[64];
    size_t nsig;
    atomic_int caught_up, fell_behind, dead, stopped;
    /* behaviour */
    int retry_first; /* RETRY this many times per event */
    const char *reject_payload;
    atomic_bool gate_closed; /* block the handler while set */
    uint32_t attempts_seen[8];
    /* Set by the test after open returns; the handler may run before
     * that, so it waits for it (atomic: written and read by two threads). */
    _Atomic(bus_store_sub *) self;
    uint64_t close_at;
} rec;

static rec *
rec_new(void)
{
    rec *r = calloc(1, sizeof(*r));

    assert_non_null(r);
    bus__mutex_init(&r->mtx);
    return r;
}

static void
rec_free(rec *r)
{
    bus__mutex_fini(&r->mtx);
    free(r);
}

static size_t
rec_count(rec *r)
{
    size_t n;

    bus__mutex_lock(&r->mtx);
    n = r->n;
    bus__mutex_unlock(&r->mtx);
    return n;
}

typedef struct waitn {
    rec *r;
    size_t n;
} waitn;

static int
rec_has(void *p)
{
    waitn *w = p;

    return rec_count(w->r) >= w->n;
}

static void
rec_wait(rec *r, size_t n)
{
    waitn w = {r, n};

    if (!bt_wait_for(rec_has, &w, 20000))
        fprintf(stderr, "waited for %zu deliveries, got %zu\n", n,
                rec_count(r));
    assert_true(rec_count(r) >= n);
}

typedef struct sub_want {
    bus_store_sub *sub;
    uint64_t position, delivered;
} sub_want;

static int
sub_reached(void *p)
{
    sub_want *w = p;
    bus_store_sub_stats st;

    bus_store_sub_stats_get(w->sub, &st);
    return st.position >= w->position && st.delivered >= w->delivered;
}

/* Waits until sub's statistics reach position and delivered. The
 * subscription thread counts a delivery when the handler returns and
 * moves its position after that, so a handler-side count reaching n does
 * not mean the statistics have. */
static void
sub_wait(bus_store_sub *sub, uint64_t position, uint64_t delivered)
{
    sub_want w = {sub, position, delivered};

    assert_true(bt_wait_for(sub_reached, &w, 20000));
}

static int
caught_up_once(void *p)
{
    return atomic_load(&((rec *)p)->caught_up) > 0;
}

static bus_result
rec_handler(bus_delivery *d, void *opaque)
{
    rec *r = opaque;
    bus_event *e = bus_delivery_event(d);
    uint32_t a = bus_delivery_attempt(d);

    while (atomic_load(&r->gate_closed))
        bus__thread_yield();
    if (a < 8)
        r->attempts_seen[a]++;
    if ((int)a <= r->retry_first)
        return BUS_RETRY;
    if (r->reject_payload != NULL && bus_event_payload_len(e) > 0 &&
        strncmp(bus_event_payload(e), r->reject_payload,
                bus_event_payload_len(e)) == 0) {
        bus_delivery_set_error(d, 42, "rejected %s", r->reject_payload);
        return BUS_REJECT;
    }
    bus__mutex_lock(&r->mtx);
    if (r->n < REC_MAX) {
        r->pos[r->n] = bus_event_position(e);
        r->ver[r->n] = bus_event_stream_version(e);
        r->n++;
    }
    bus__mutex_unlock(&r->mtx);
    if (r->close_at != 0 && bus_event_position(e) == r->close_at) {
        bus_store_sub *self;
        while ((self = atomic_load(&r->self)) == NULL)
            sched_yield();
        bus_store_sub_close_async(self);
    }
    return BUS_ACK;
}

static void
rec_signal(void *opaque, bus_store_signal sig,
           const bus_store_signal_info *info)
{
    rec *r = opaque;

    bus__mutex_lock(&r->mtx);
    if (r->nsig < 64)
        r->sigs[r->nsig++] = sig;
    bus__mutex_unlock(&r->mtx);
    switch (sig) {
    case BUS_STORE_CAUGHT_UP:
        atomic_fetch_add(&r->caught_up, 1);
        break;
    case BUS_STORE_FELL_BEHIND:
        atomic_fetch_add(&r->fell_behind, 1);
        break;
    case BUS_STORE_DEAD_LETTER:
        assert_non_null(info->event);
        assert_int_equal(info->err, 42);
        assert_string_equal(info->msg, "rejected bad");
        atomic_fetch_add(&r->dead, 1);
        break;
    case BUS_STORE_STOPPED:
        atomic_fetch_add(&r->stopped, 1);
        break;
    }
}

static bus_store_sub *
sub_open(bus_store *s, rec *r, const char *stream, uint64_t after,
         const bus_store_filter *flt)
{
    bus_store_sub_config cfg;
    bus_store_sub *sub;

    bus_store_sub_config_init(&cfg);
    cfg.name = "test";
    cfg.stream = stream;
    cfg.start_after = after;
    if (flt != NULL)
        cfg.filter = *flt;
    cfg.handler = rec_handler;
    cfg.opaque = r;
    cfg.on_signal = rec_signal;
    cfg.signal_opaque = r;
    cfg.batch_size = 32;
    cfg.retry.backoff_ms = 1;
    cfg.retry.backoff_max_ms = 2;
    assert_int_equal(bus_store_sub_open(&sub, s, &cfg), BUS_OK);
    atomic_store(&r->self, sub);
    return sub;
}

static void
assert_positions(rec *r, uint64_t first, size_t n)
{
    size_t i;

    bus__mutex_lock(&r->mtx);
    assert_int_equal(r->n, n);
    for (i = 0; i < n; i++)
        assert_int_equal(r->pos[i], first + i);
    bus__mutex_unlock(&r->mtx);
}

static void
test_history_then_caught_up_then_live(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub *sub;
    bus_store_sub_stats st;
    int i;

    for (i = 0; i < 5; i++)
        assert_int_equal(st_append_n(f->s, "h", BUS_STORE_ANY, "t", 10, NULL),
                         BUS_OK);
    sub = sub_open(f->s, r, NULL, BUS_STORE_START, NULL);
    rec_wait(r, 50);
    assert_true(bt_wait_for(caught_up_once, r, 10000));
    for (i = 0; i < 20; i++)
        assert_int_equal(st_append_n(f->s, "h", BUS_STORE_ANY, "t", 1, NULL),
                         BUS_OK);
    rec_wait(r, 70);
    sub_wait(sub, 70, 70);
    bus_store_sub_stats_get(sub, &st);
    assert_int_equal(st.position, 70);
    assert_int_equal(st.delivered, 70);
    bus_store_sub_close(sub);
    assert_positions(r, 1, 70);
    assert_int_equal(atomic_load(&r->caught_up), 1);
    assert_int_equal(r->sigs[0], BUS_STORE_CAUGHT_UP);
    rec_free(r);
}

/* ---- The switch under racing appends ------------------------------------- */

#define RACE_THREADS 4
#define RACE_APPENDS 300

typedef struct racer {
    bus_store *s;
    int idx;
} racer;

static void
race_thread(void *p)
{
    racer *a = p;
    char stream[32];
    int i;

    snprintf(stream, sizeof(stream), "%s-%d", a->idx % 2 ? "odd" : "even",
             a->idx);
    for (i = 0; i < RACE_APPENDS; i++)
        assert_int_equal(st_append_n(a->s, stream, BUS_STORE_ANY, "t",
                                     1 + (size_t)(i % 3), NULL),
                         BUS_OK);
}

static void
test_switch_to_live_has_no_gap_or_duplicate(void **state)
{
    st_fix *f = *state;
    bus__thread th[RACE_THREADS];
    racer a[RACE_THREADS];
    rec *r_all = rec_new(), *r_late = rec_new(), *r_odd = rec_new();
    bus_store_filter odd = {"odd-", NULL};
    bus_store_sub *s1, *s2, *s3;
    bus_store_slice sl;
    uint64_t head;
    size_t i, n_odd = 0;
    int t;

    memset(&sl, 0, sizeof(sl));
    assert_int_equal(st_append_n(f->s, "odd-x", BUS_STORE_ANY, "t", 30, NULL),
                     BUS_OK);
    for (t = 0; t < RACE_THREADS; t++) {
        a[t] = (racer){f->s, t};
        assert_int_equal(bus__thread_start(&th[t], "racer", race_thread, &a[t]),
                         BUS_OK);
    }
    /* Subscriptions start while appends race: each must switch from
     * history to live somewhere in the middle. */
    s1 = sub_open(f->s, r_all, NULL, BUS_STORE_START, NULL);
    s3 = sub_open(f->s, r_odd, NULL, BUS_STORE_START, &odd);
    rec_wait(r_all, 100);
    s2 = sub_open(f->s, r_late, NULL, 17, NULL);
    for (t = 0; t < RACE_THREADS; t++)
        bus__thread_join(&th[t]);
    head = bus_store_head(f->s);
    assert_int_equal(head, 30 + RACE_THREADS * (RACE_APPENDS / 3) * 6);
    rec_wait(r_all, head);
    rec_wait(r_late, head - 17);
    assert_int_equal(
        bus_store_read_all(f->s, 0, BUS_STORE_FORWARD, 100000, &odd, &sl),
        BUS_OK);
    n_odd = sl.count;
    rec_wait(r_odd, n_odd);
    bus_store_sub_close(s1);
    bus_store_sub_close(s2);
    bus_store_sub_close(s3);
    assert_positions(r_all, 1, head);
    assert_positions(r_late, 18, head - 17);
    assert_int_equal(r_odd->n, n_odd);
    for (i = 0; i < n_odd; i++)
        assert_int_equal(r_odd->pos[i], bus_event_position(sl.events[i]));
    assert_true(atomic_load(&r_all->caught_up) >= 1);
    bus_store_slice_free(&sl);
    rec_free(r_all);
    rec_free(r_late);
    rec_free(r_odd);
}

static void
test_from_end_delivers_only_new_events(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub *sub;

    assert_int_equal(st_append_n(f->s, "e", BUS_STORE_ANY, "t", 10, NULL),
                     BUS_OK);
    sub = sub_open(f->s, r, NULL, BUS_STORE_END, NULL);
    assert_true(bt_wait_for(caught_up_once, r, 10000));
    assert_int_equal(st_append_n(f->s, "e", BUS_STORE_ANY, "t", 5, NULL),
                     BUS_OK);
    rec_wait(r, 5);
    bus_store_sub_close(sub);
    assert_positions(r, 11, 5);
    rec_free(r);
}

static void
test_stream_subscription(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new(), *r2 = rec_new();
    bus_store_sub *sub, *sub2;
    size_t i;

    /* The stream does not exist yet: the subscription waits for it. */
    sub = sub_open(f->s, r, "st", BUS_STORE_START, NULL);
    assert_true(bt_wait_for(caught_up_once, r, 10000));
    assert_int_equal(st_append_n(f->s, "other", BUS_STORE_ANY, "t", 3, NULL),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "st", BUS_STORE_ANY, "t", 4, NULL),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "st-not", BUS_STORE_ANY, "t", 2, NULL),
                     BUS_OK);
    assert_int_equal(st_append_n(f->s, "st", BUS_STORE_ANY, "t", 2, NULL),
                     BUS_OK);
    rec_wait(r, 6);
    sub2 = sub_open(f->s, r2, "st", 4, NULL);
    rec_wait(r2, 2);
    bus_store_sub_close(sub);
    bus_store_sub_close(sub2);
    assert_int_equal(r->n, 6);
    for (i = 0; i < 6; i++)
        assert_int_equal(r->ver[i], i + 1);
    assert_int_equal(r->pos[0], 4);
    assert_int_equal(r->pos[5], 11);
    assert_int_equal(r2->n, 2);
    assert_int_equal(r2->ver[0], 5);
    rec_free(r);
    rec_free(r2);
}

static void
test_retry_then_ack_keeps_order(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub *sub;
    bus_store_sub_stats st;

    r->retry_first = 2; /* every event: RETRY, RETRY, ACK */
    assert_int_equal(st_append_n(f->s, "r", BUS_STORE_ANY, "t", 3, NULL),
                     BUS_OK);
    sub = sub_open(f->s, r, NULL, BUS_STORE_START, NULL);
    rec_wait(r, 3);
    bus_store_sub_stats_get(sub, &st);
    bus_store_sub_close(sub);
    assert_positions(r, 1, 3);
    assert_int_equal(st.retries, 6);
    assert_int_equal(st.dead_letters, 0);
    assert_int_equal(r->attempts_seen[1], 3);
    assert_int_equal(r->attempts_seen[3], 3);
    rec_free(r);
}

static void
test_reject_dead_letters_and_moves_on(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub *sub;
    bus_store_sub_stats st;
    bus_event *ev[3];

    r->reject_payload = "bad";
    ev[0] = st_ev("t", "ok");
    ev[1] = st_ev("t", "bad");
    ev[2] = st_ev("t", "ok");
    assert_int_equal(bus_store_append(f->s, "dl", BUS_STORE_ANY, ev, 3, NULL),
                     BUS_OK);
    sub = sub_open(f->s, r, NULL, BUS_STORE_START, NULL);
    rec_wait(r, 2);
    bus_store_sub_stats_get(sub, &st);
    bus_store_sub_close(sub);
    assert_int_equal(r->pos[0], 1);
    assert_int_equal(r->pos[1], 3);
    assert_int_equal(st.dead_letters, 1);
    assert_int_equal(atomic_load(&r->dead), 1);
    bus_event_unref(ev[0]);
    bus_event_unref(ev[1]);
    bus_event_unref(ev[2]);
    rec_free(r);
}

static int
stopped_once(void *p)
{
    return atomic_load(&((rec *)p)->stopped) > 0;
}

static void
test_stop_policy_stops_before_the_event(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub_config cfg;
    bus_store_sub *sub;
    bus_store_sub_stats st;
    bus_event *ev[3];

    r->reject_payload = "bad";
    ev[0] = st_ev("t", "ok");
    ev[1] = st_ev("t", "bad");
    ev[2] = st_ev("t", "ok");
    assert_int_equal(bus_store_append(f->s, "stop", BUS_STORE_ANY, ev, 3, NULL),
                     BUS_OK);
    bus_store_sub_config_init(&cfg);
    cfg.handler = rec_handler;
    cfg.opaque = r;
    cfg.on_signal = rec_signal;
    cfg.signal_opaque = r;
    cfg.retry.on_fail = BUS_STORE_ON_FAIL_STOP;
    assert_int_equal(bus_store_sub_open(&sub, f->s, &cfg), BUS_OK);
    assert_true(bt_wait_for(stopped_once, r, 10000));
    bus_store_sub_stats_get(sub, &st);
    assert_true(st.stopped);
    assert_int_equal(st.position, 1);
    bus_store_sub_close(sub);
    assert_positions(r, 1, 1);
    bus_event_unref(ev[0]);
    bus_event_unref(ev[1]);
    bus_event_unref(ev[2]);
    rec_free(r);
}

static int
fell_behind_then_caught_up(void *p)
{
    rec *r = p;

    return atomic_load(&r->fell_behind) > 0 && atomic_load(&r->caught_up) > 1;
}

static void
test_slow_subscriber_falls_behind_and_catches_up(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new();
    bus_store_sub_config cfg;
    bus_store_sub *sub;
    size_t i;

    bus_store_sub_config_init(&cfg);
    cfg.handler = rec_handler;
    cfg.opaque = r;
    cfg.on_signal = rec_signal;
    cfg.signal_opaque = r;
    cfg.batch_size = 8;
    cfg.max_live_lag = 20;
    assert_int_equal(bus_store_sub_open(&sub, f->s, &cfg), BUS_OK);
    assert_true(bt_wait_for(caught_up_once, r, 10000));
    /* Live; the handler blocks on its first event while 200 more come. */
    atomic_store(&r->gate_closed, true);
    assert_int_equal(st_append_n(f->s, "slow", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_OK);
    for (i = 0; i < 20; i++)
        assert_int_equal(
            st_append_n(f->s, "slow", BUS_STORE_ANY, "t", 10, NULL), BUS_OK);
    atomic_store(&r->gate_closed, false);
    rec_wait(r, 201);
    assert_true(bt_wait_for(fell_behind_then_caught_up, r, 10000));
    bus_store_sub_close(sub);
    assert_positions(r, 1, 201);
    /* CAUGHT_UP, FELL_BEHIND, CAUGHT_UP in that order. */
    assert_int_equal(r->sigs[0], BUS_STORE_CAUGHT_UP);
    assert_int_equal(r->sigs[1], BUS_STORE_FELL_BEHIND);
    assert_int_equal(r->sigs[2], BUS_STORE_CAUGHT_UP);
    rec_free(r);
}

static void
test_named_checkpoint_resumes(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new(), *r2 = rec_new();
    bus_store_sub_config cfg;
    bus_store_sub *sub;
    uint64_t pos;

    assert_int_equal(st_append_n(f->s, "c", BUS_STORE_ANY, "t", 25, NULL),
                     BUS_OK);
    bus_store_sub_config_init(&cfg);
    cfg.handler = rec_handler;
    cfg.opaque = r;
    cfg.checkpoint = "sub-c";
    cfg.checkpoint_every = 10;
    assert_int_equal(bus_store_sub_open(&sub, f->s, &cfg), BUS_OK);
    rec_wait(r, 25);
    bus_store_sub_close(sub); /* saves 25 */
    assert_int_equal(bus_store_checkpoint_get(f->s, "sub-c", &pos), BUS_OK);
    assert_int_equal(pos, 25);
    assert_int_equal(st_append_n(f->s, "c", BUS_STORE_ANY, "t", 5, NULL),
                     BUS_OK);
    st_reopen(f);
    cfg.opaque = r2;
    cfg.start_after = 3; /* the checkpoint wins */
    assert_int_equal(bus_store_sub_open(&sub, f->s, &cfg), BUS_OK);
    rec_wait(r2, 5);
    bus_store_sub_close(sub);
    assert_positions(r2, 26, 5);
    rec_free(r);
    rec_free(r2);
}

static void
test_checkpoint_api(void **state)
{
    st_fix *f = *state;
    uint64_t pos;
    char longname[300];

    assert_int_equal(bus_store_checkpoint_get(f->s, "x", &pos), BUS_ENOTFOUND);
    assert_int_equal(bus_store_checkpoint_set(f->s, "x", 42), BUS_OK);
    assert_int_equal(bus_store_checkpoint_get(f->s, "x", &pos), BUS_OK);
    assert_int_equal(pos, 42);
    st_reopen(f);
    assert_int_equal(bus_store_checkpoint_get(f->s, "x", &pos), BUS_OK);
    assert_int_equal(pos, 42);
    assert_int_equal(bus_store_checkpoint_delete(f->s, "x"), BUS_OK);
    assert_int_equal(bus_store_checkpoint_get(f->s, "x", &pos), BUS_ENOTFOUND);
    memset(longname, 'n', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    assert_int_equal(bus_store_checkpoint_set(f->s, longname, 1), BUS_EINVAL);
    assert_int_equal(bus_store_checkpoint_set(f->s, "", 1), BUS_EINVAL);
    bus_failpoint_set("store.write_direct", BUS_EIO, 1, false);
    assert_int_equal(bus_store_checkpoint_set(f->s, "x", 1), BUS_EIO);
    bus_failpoint_clear_all();
    assert_int_equal(bus_store_checkpoint_get(f->s, "x", &pos), BUS_ENOTFOUND);
}

static void
test_close_from_handler_and_store_close_with_open_subs(void **state)
{
    st_fix *f = *state;
    rec *r = rec_new(), *r2 = rec_new();
    bus_store_sub *sub;
    bus_store_sub_config cfg;

    assert_int_equal(st_append_n(f->s, "cl", BUS_STORE_ANY, "t", 10, NULL),
                     BUS_OK);
    r->close_at = 4;
    sub = sub_open(f->s, r, NULL, BUS_STORE_START, NULL);
    rec_wait(r, 4);
    bus_store_sub_close(sub);
    assert_int_equal(r->n, 4);
    /* The store stops and frees a subscription still open. */
    (void)sub_open(f->s, r2, NULL, BUS_STORE_START, NULL);
    rec_wait(r2, 10);
    st_reopen(f);
    bus_store_sub_config_init(&cfg);
    assert_int_equal(bus_store_sub_open(&sub, f->s, &cfg), BUS_EINVAL);
    rec_free(r);
    rec_free(r2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, st_setup, st_teardown)
        T(test_history_then_caught_up_then_live),
        T(test_switch_to_live_has_no_gap_or_duplicate),
        T(test_from_end_delivers_only_new_events),
        T(test_stream_subscription),
        T(test_retry_then_ack_keeps_order),
        T(test_reject_dead_letters_and_moves_on),
        T(test_stop_policy_stops_before_the_event),
        T(test_slow_subscriber_falls_behind_and_catches_up),
        T(test_named_checkpoint_resumes),
        T(test_checkpoint_api),
        T(test_close_from_handler_and_store_close_with_open_subs),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
