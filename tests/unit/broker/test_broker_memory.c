/* The memory broker at the SPI level: bus_broker_open_uri("mem://...")
 * plus bus__broker_subscribe with a deliver function, as the bus context
 * uses it. Fan-out, patterns, sharing by name, groups, unsubscribe from
 * inside a delivery, refusals and publish results, close, concurrency
 * (run under TSan) and allocation faults (run under ASan). */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <bus/broker_memory.h>

#include "broker_impl.h"
#include "platform.h"
#include "test_support.h"
#include "testing.h"

/* ---- A recording subscriber ------------------------------------------ */

typedef struct rec {
    _Atomic int calls; /* deliver calls */
    _Atomic int taken; /* calls that returned BUS_OK */
    _Atomic int rv;    /* what to return */
    char topic[64];    /* last topic (single-threaded tests only) */
    void *handle;
} rec;

static int
rec_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
            unsigned flags)
{
    rec *r = opaque;
    int rv = atomic_load(&r->rv);

    (void)flags;
    atomic_fetch_add(&r->calls, 1);
    if (token != 0)
        return BUS_EINTERNAL; /* memory never uses tokens */
    if (rv != BUS_OK)
        return rv; /* the reference stays with the broker */
    snprintf(r->topic, sizeof(r->topic), "%s", topic);
    atomic_fetch_add(&r->taken, 1);
    bus_event_unref(ev);
    return BUS_OK;
}

static void
rec_sub(bus_broker *b, const char *pattern, const char *group, rec *r)
{
    assert_int_equal(
        bus__broker_subscribe(b, pattern, group, rec_deliver, r, &r->handle),
        BUS_OK);
    assert_non_null(r->handle);
}

static bus_broker *
open_mem(const char *uri)
{
    char err[256];
    bus_broker *b;
    int rv = bus_broker_open_uri(&b, uri, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

static bus_event *
new_event(void)
{
    bus_event *e;

    assert_int_equal(bus_event_new(&e, "t.created", "abc", 3), BUS_OK);
    return e;
}

/* Publishes a fresh event; the caller keeps a second reference to check
 * ownership: returns the publish result, and *refs_after the count. */
static int
publish_counted(bus_broker *b, const char *topic, uint32_t *refs_after,
                bus_ack_fn ack, void *ack_opaque)
{
    bus_event *e = new_event();
    int rv;

    bus_event_ref(e);
    rv = bus_broker_publish(b, topic, e, 0, ack, ack_opaque);
    *refs_after = bus_event_refcount(e);
    bus_event_unref(e);
    if (rv != BUS_OK)
        bus_event_unref(e); /* still ours on failure */
    return rv;
}

static void
ack_count(void *opaque, bus_event *ev, int err)
{
    if (ev != NULL && err == BUS_OK)
        (*(int *)opaque)++;
}

/* ---- Tests ------------------------------------------------------------- */

static void
test_fanout_to_every_matching_subscription(void **state)
{
    bus_broker *b = open_mem("mem://fanout");
    rec star = {0}, rest = {0}, all = {0}, exact = {0}, other = {0};
    bus_broker_memory_stats st;
    uint32_t refs;
    int acks = 0;

    (void)state;
    rec_sub(b, "orders.*", NULL, &star);
    rec_sub(b, "orders.>", NULL, &rest);
    rec_sub(b, ">", NULL, &all);
    rec_sub(b, "orders.placed", NULL, &exact);
    rec_sub(b, "users.*", NULL, &other);

    assert_int_equal(
        publish_counted(b, "orders.placed", &refs, ack_count, &acks), BUS_OK);
    assert_int_equal(refs, 1); /* the broker took ours; subscribers let go */
    assert_int_equal(acks, 1);
    assert_int_equal(star.taken, 1);
    assert_int_equal(rest.taken, 1);
    assert_int_equal(all.taken, 1);
    assert_int_equal(exact.taken, 1);
    assert_int_equal(other.calls, 0);
    assert_string_equal(star.topic, "orders.placed");

    assert_int_equal(publish_counted(b, "orders.eu.placed", &refs, NULL, NULL),
                     BUS_OK);
    assert_int_equal(star.calls, 1); /* '*' is one segment */
    assert_int_equal(rest.taken, 2);
    assert_int_equal(all.taken, 2);
    assert_int_equal(exact.calls, 1);
    assert_int_equal(publish_counted(b, "orders", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(rest.calls, 2); /* '>' needs one more segment */
    assert_int_equal(all.taken, 3);

    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.published, 3);
    assert_int_equal(st.delivered, 4 + 2 + 1);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(st.subscriptions, 5);

    bus__broker_unsubscribe(b, rest.handle);
    bus__broker_unsubscribe(b, all.handle);
    assert_int_equal(publish_counted(b, "orders.x", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(rest.calls, 2);
    assert_int_equal(all.calls, 3);
    assert_int_equal(star.taken, 2);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.subscriptions, 3);
    bus__broker_unsubscribe(b, star.handle);
    bus__broker_unsubscribe(b, exact.handle);
    bus__broker_unsubscribe(b, other.handle);
    bus_broker_close(b);
}

static void
test_no_subscriber_releases_the_event(void **state)
{
    bus_broker *b = open_mem("mem://");
    rec r = {0};
    uint32_t refs;
    int acks = 0;

    (void)state;
    assert_int_equal(
        publish_counted(b, "nobody.listens", &refs, ack_count, &acks), BUS_OK);
    assert_int_equal(refs, 1);
    assert_int_equal(acks, 1);
    /* A subscription that is gone counts as nothing matching. */
    rec_sub(b, "nobody.*", NULL, &r);
    bus__broker_unsubscribe(b, r.handle);
    assert_int_equal(publish_counted(b, "nobody.listens", &refs, NULL, NULL),
                     BUS_OK);
    assert_int_equal(r.calls, 0);
    bus_broker_close(b);
}

static void
test_many_subscriptions_on_one_topic(void **state)
{
    bus_broker *b = open_mem("mem://many");
    rec r[40];
    uint32_t refs;
    int i, round;

    (void)state;
    memset(r, 0, sizeof(r));
    for (i = 0; i < 40; i++)
        rec_sub(b, i % 2 ? "m.*" : "m.x", NULL, &r[i]);
    for (round = 1; round <= 3; round++) { /* miss, then cached */
        assert_int_equal(publish_counted(b, "m.x", &refs, NULL, NULL), BUS_OK);
        assert_int_equal(refs, 1);
        for (i = 0; i < 40; i++)
            assert_int_equal(r[i].taken, round);
    }
    for (i = 0; i < 40; i++)
        bus__broker_unsubscribe(b, r[i].handle);
    bus_broker_close(b);
}

static void
test_brokers_on_one_name_share_private_ones_do_not(void **state)
{
    bus_broker *a = open_mem("mem://shared");
    bus_broker *b = open_mem("mem://shared");
    bus_broker *o = open_mem("mem://other");
    bus_broker *p1 = open_mem("mem://");
    bus_broker *p2 = open_mem("mem://");
    rec on_b = {0}, on_o = {0}, on_p1 = {0}, on_p2 = {0};
    uint32_t refs;

    (void)state;
    rec_sub(b, "x.>", NULL, &on_b);
    rec_sub(o, "x.>", NULL, &on_o);
    rec_sub(p1, "x.>", NULL, &on_p1);
    rec_sub(p2, "x.>", NULL, &on_p2);

    assert_int_equal(publish_counted(a, "x.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(on_b.taken, 1);
    assert_int_equal(on_o.calls + on_p1.calls + on_p2.calls, 0);
    assert_int_equal(publish_counted(p1, "x.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(on_p1.taken, 1);
    assert_int_equal(on_p2.calls + on_o.calls, 0);
    assert_int_equal(on_b.taken, 1);

    /* The name outlives one of its brokers, and is fresh once all are
     * closed. */
    bus__broker_unsubscribe(b, on_b.handle);
    bus_broker_close(b);
    on_b = (rec){0};
    b = open_mem("mem://shared");
    rec_sub(b, "x.>", NULL, &on_b);
    assert_int_equal(publish_counted(a, "x.2", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(on_b.taken, 1);
    bus__broker_unsubscribe(b, on_b.handle);

    bus__broker_unsubscribe(o, on_o.handle);
    bus__broker_unsubscribe(p1, on_p1.handle);
    bus__broker_unsubscribe(p2, on_p2.handle);
    bus_broker_close(a);
    bus_broker_close(b);
    bus_broker_close(o);
    bus_broker_close(p1);
    bus_broker_close(p2);
}

static void
test_groups_share_round_robin(void **state)
{
    bus_broker *a = open_mem("mem://groups");
    bus_broker *b = open_mem("mem://groups");
    rec g[3], solo = {0}, h = {0};
    uint32_t refs;
    int i;

    (void)state;
    memset(g, 0, sizeof(g));
    rec_sub(a, "jobs.>", "workers", &g[0]);
    rec_sub(b, "jobs.>", "workers", &g[1]);
    rec_sub(b, "jobs.*", "workers", &g[2]);
    rec_sub(a, "jobs.>", NULL, &solo);
    rec_sub(a, "jobs.>", "auditors", &h);

    for (i = 0; i < 30; i++)
        assert_int_equal(publish_counted(a, "jobs.run", &refs, NULL, NULL),
                         BUS_OK);
    assert_int_equal(g[0].taken, 10);
    assert_int_equal(g[1].taken, 10);
    assert_int_equal(g[2].taken, 10);
    assert_int_equal(solo.taken, 30); /* no group: everything */
    assert_int_equal(h.taken, 30);    /* a group of one */

    /* Only members whose pattern matches share: g[2] takes no two-level
     * topic. */
    for (i = 0; i < 10; i++)
        assert_int_equal(publish_counted(b, "jobs.run.fast", &refs, NULL, NULL),
                         BUS_OK);
    assert_int_equal(g[0].taken + g[1].taken, 30);
    assert_int_equal(g[2].taken, 10);
    assert_true(g[0].taken >= 14 && g[1].taken >= 14);

    /* A member that refuses passes the event to the next one. */
    int before = g[1].taken + g[2].taken, refused = g[0].calls;
    atomic_store(&g[0].rv, BUS_EAGAIN);
    for (i = 0; i < 9; i++)
        assert_int_equal(publish_counted(a, "jobs.run", &refs, NULL, NULL),
                         BUS_OK);
    assert_int_equal(g[1].taken + g[2].taken, before + 9);
    assert_int_equal(g[0].calls - refused, 3); /* its turns: 3 of 9 */

    /* Leaving the group: the rest share. */
    bus__broker_unsubscribe(b, g[2].handle);
    atomic_store(&g[0].rv, BUS_OK);
    g[0].taken = g[1].taken = 0;
    for (i = 0; i < 10; i++)
        assert_int_equal(publish_counted(a, "jobs.run", &refs, NULL, NULL),
                         BUS_OK);
    assert_int_equal(g[0].taken, 5);
    assert_int_equal(g[1].taken, 5);

    bus__broker_unsubscribe(a, g[0].handle);
    bus__broker_unsubscribe(b, g[1].handle);
    bus__broker_unsubscribe(a, solo.handle);
    bus__broker_unsubscribe(a, h.handle);
    bus_broker_close(a);
    bus_broker_close(b);
}

static void
test_group_that_refuses_everywhere_fails_publish(void **state)
{
    bus_broker *b = open_mem("mem://grefuse");
    bus_broker_memory_stats st;
    rec g[2];
    uint32_t refs;
    int acks = 0;

    (void)state;
    memset(g, 0, sizeof(g));
    rec_sub(b, "q", "g", &g[0]);
    rec_sub(b, "q", "g", &g[1]);
    atomic_store(&g[0].rv, BUS_EAGAIN);
    atomic_store(&g[1].rv, BUS_EAGAIN);
    assert_int_equal(publish_counted(b, "q", &refs, ack_count, &acks),
                     BUS_EAGAIN);
    assert_int_equal(refs, 2); /* still ours */
    assert_int_equal(acks, 0);
    assert_int_equal(g[0].calls + g[1].calls, 2);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.dropped, 1); /* one group, one drop */
    assert_int_equal(st.published, 0);
    bus__broker_unsubscribe(b, g[0].handle);
    bus__broker_unsubscribe(b, g[1].handle);
    bus_broker_close(b);
}

typedef struct log_count {
    _Atomic int warn;
    char last[512];
} log_count;

static void
log_counter(void *opaque, bus_log_level level, const char *subsys,
            const char *msg)
{
    log_count *lc = opaque;

    (void)subsys;
    if (level == BUS_LOG_WARN) {
        atomic_fetch_add(&lc->warn, 1);
        snprintf(lc->last, sizeof(lc->last), "%s", msg);
    }
}

static void
test_refusals_are_counted_and_decide_the_result(void **state)
{
    bus_broker_config cfg;
    log_count lc = {0};
    bus_broker_memory_stats st;
    bus_broker *b;
    rec bad = {0}, good = {0};
    uint32_t refs;
    int acks = 0, i;

    (void)state;
    bus_broker_config_init(&cfg);
    cfg.uri = "mem://refuse";
    cfg.log = (bus_logger){log_counter, &lc, BUS_LOG_WARN};
    assert_int_equal(bus_broker_open(&b, &cfg, NULL, 0), BUS_OK);
    rec_sub(b, "r.*", NULL, &bad);
    atomic_store(&bad.rv, BUS_EAGAIN);

    /* The only target refuses: its error, the event stays ours, no ack. */
    assert_int_equal(publish_counted(b, "r.1", &refs, ack_count, &acks),
                     BUS_EAGAIN);
    assert_int_equal(refs, 2);
    assert_int_equal(acks, 0);
    assert_int_equal(lc.warn, 1);
    assert_non_null(strstr(lc.last, "r.*"));
    assert_non_null(strstr(lc.last, "BUS_EAGAIN"));

    /* One target takes it: BUS_OK, a drop counted for the other. */
    rec_sub(b, "r.>", NULL, &good);
    assert_int_equal(publish_counted(b, "r.1", &refs, ack_count, &acks),
                     BUS_OK);
    assert_int_equal(refs, 1);
    assert_int_equal(acks, 1);
    assert_int_equal(good.taken, 1);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.dropped, 2);
    assert_int_equal(st.published, 1);

    /* Logged at the first drop and every 1000th: drops 1, 1001, 2001. */
    for (i = 0; i < 1999; i++)
        assert_int_equal(publish_counted(b, "r.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.dropped, 2001);
    assert_int_equal(lc.warn, 3);

    bus__broker_unsubscribe(b, bad.handle);
    bus__broker_unsubscribe(b, good.handle);
    bus_broker_close(b);
}

/* Unsubscribes itself (and optionally another) from inside its call. */
typedef struct self_unsub {
    rec r;
    bus_broker *b;
    void *other; /* another handle to end from inside, or NULL */
} self_unsub;

static int
self_unsub_deliver(void *opaque, const char *topic, bus_event *ev,
                   uint64_t token, unsigned flags)
{
    self_unsub *s = opaque;
    int rv = rec_deliver(&s->r, topic, ev, token, flags);

    bus__broker_unsubscribe(s->b, s->r.handle);
    if (s->other != NULL) {
        bus__broker_unsubscribe(s->b, s->other);
        s->other = NULL;
    }
    return rv;
}

static void
test_unsubscribe_from_inside_the_delivery(void **state)
{
    bus_broker *b = open_mem("mem://inside");
    self_unsub s = {.b = NULL};
    rec victim = {0}, after = {0};
    bus_broker_memory_stats st;
    uint32_t refs;
    int i;

    (void)state;
    s.b = b;
    assert_int_equal(bus__broker_subscribe(b, "u.*", NULL, self_unsub_deliver,
                                           &s, &s.r.handle),
                     BUS_OK);
    rec_sub(b, "u.*", NULL, &victim);
    rec_sub(b, "u.*", NULL, &after);
    s.other = victim.handle;
    /* Matching order is unspecified: victim may run before or after s in
     * this first publish, but never after it. */
    assert_int_equal(publish_counted(b, "u.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(s.r.calls, 1);
    assert_true(victim.calls <= 1);
    int victim_calls = victim.calls;
    for (i = 0; i < 5; i++)
        assert_int_equal(publish_counted(b, "u.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(s.r.calls, 1);
    assert_int_equal(victim.calls, victim_calls);
    assert_int_equal(after.taken, 6);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.subscriptions, 1);
    bus__broker_unsubscribe(b, after.handle);
    bus_broker_close(b); /* frees what was retired inside (ASan) */
}

/* Subscribes, and publishes, from inside a delivery. */
typedef struct reentrant {
    bus_broker *b;
    rec inner;
    _Atomic int depth;
} reentrant;

static int
reentrant_deliver(void *opaque, const char *topic, bus_event *ev,
                  uint64_t token, unsigned flags)
{
    reentrant *r = opaque;
    bus_event *e;

    (void)token;
    (void)flags;
    bus_event_unref(ev);
    if (strcmp(topic, "re.outer") != 0 || atomic_fetch_add(&r->depth, 1))
        return BUS_OK;
    if (bus__broker_subscribe(r->b, "re.inner", NULL, rec_deliver, &r->inner,
                              &r->inner.handle) != BUS_OK)
        return BUS_EINTERNAL;
    if (bus_event_new(&e, "t.inner", NULL, 0) != BUS_OK)
        return BUS_EINTERNAL;
    if (bus_broker_publish(r->b, "re.inner", e, 0, NULL, NULL) != BUS_OK) {
        bus_event_unref(e);
        return BUS_EINTERNAL;
    }
    return BUS_OK;
}

static void
test_subscribe_and_publish_from_inside_the_delivery(void **state)
{
    reentrant r = {0};
    void *h;
    uint32_t refs;

    (void)state;
    r.b = open_mem("mem://reentrant");
    assert_int_equal(
        bus__broker_subscribe(r.b, "re.*", NULL, reentrant_deliver, &r, &h),
        BUS_OK);
    assert_int_equal(publish_counted(r.b, "re.outer", &refs, NULL, NULL),
                     BUS_OK);
    assert_int_equal(r.inner.taken, 1);
    assert_int_equal(publish_counted(r.b, "re.inner", &refs, NULL, NULL),
                     BUS_OK);
    assert_int_equal(r.inner.taken, 2);
    bus__broker_unsubscribe(r.b, r.inner.handle);
    bus__broker_unsubscribe(r.b, h);
    bus_broker_close(r.b);
}

static void
test_closed_broker_refuses_work(void **state)
{
    bus_broker *a = open_mem("mem://closing");
    bus_broker *b = open_mem("mem://closing");
    rec r = {0}, left = {0};
    bus_event *e = new_event();
    bus_broker_config cfg;
    log_count lc = {0};
    bus_broker *c;
    uint32_t refs;
    void *h;

    (void)state;
    rec_sub(a, "c.*", NULL, &r);
    bus_broker_close_async(a);
    assert_int_equal(bus_broker_publish(a, "c.1", e, 0, NULL, NULL),
                     BUS_ECLOSED);
    assert_int_equal(bus_event_refcount(e), 1); /* still ours */
    assert_int_equal(bus__broker_subscribe(a, "c.*", NULL, rec_deliver, &r, &h),
                     BUS_ECLOSED);
    assert_int_equal(bus_broker_flush(a, 100), BUS_OK);
    bus_event_unref(e);
    /* Its subscriptions still serve the other broker until it stops. */
    assert_int_equal(publish_counted(b, "c.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(r.taken, 1);
    bus__broker_unsubscribe(a, r.handle);
    bus_broker_close(a);

    /* A broker closed with subscriptions left: stop removes them (and
     * says so), so the other broker never calls into it again. */
    bus_broker_config_init(&cfg);
    cfg.uri = "mem://closing";
    cfg.log = (bus_logger){log_counter, &lc, BUS_LOG_WARN};
    assert_int_equal(bus_broker_open(&c, &cfg, NULL, 0), BUS_OK);
    rec_sub(c, "c.*", NULL, &left);
    rec_sub(c, "c.>", "g", &left);
    assert_int_equal(publish_counted(b, "c.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(left.taken, 2);
    bus_broker_close(c);
    assert_int_equal(lc.warn, 1);
    assert_non_null(strstr(lc.last, "2 subscription"));
    assert_int_equal(publish_counted(b, "c.1", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(left.calls, 2);
    bus_broker_close(b);
}

static void
test_options_and_paths_are_refused(void **state)
{
    char err[256], msg[32];
    bus_broker *b;

    (void)state;
    assert_int_equal(
        bus_broker_open_uri(&b, "mem://x?size=3", err, sizeof(err)),
        BUS_EINVAL);
    assert_string_equal(err, "unknown option 'size' for scheme 'mem'");
    assert_int_equal(bus_broker_open_uri(&b, "mem://x/y", err, sizeof(err)),
                     BUS_EINVAL);
    assert_non_null(strstr(err, "unexpected path '/y'"));
    b = open_mem("mem://x");
    assert_int_equal(bus_broker_health(b, msg, sizeof(msg)), BUS_OK);
    assert_int_equal(bus_broker_flush(b, 0), BUS_OK);
    assert_string_equal(bus_broker_scheme(b), "mem");
    /* Bad subscriptions. */
    void *h = &h;
    assert_int_equal(
        bus__broker_subscribe(b, "a..b", NULL, rec_deliver, NULL, &h),
        BUS_EINVAL);
    assert_null(h);
    assert_int_equal(bus__broker_subscribe(b, "a.b", "", rec_deliver, NULL, &h),
                     BUS_EINVAL);
    assert_int_equal(bus_broker_memory_stats_get(NULL, NULL), BUS_EINVAL);
    bus_broker_close(b);
}

/* ---- Unsubscribe waits for a running call -------------------------------- */

typedef struct blocker {
    bus_broker *b;
    void *handle;
    atomic_int entered, release, unsub_calling, unsub_done;
    atomic_int done_before_return; /* violation: must stay 0 */
    atomic_int published;
} blocker;

static int
blocker_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
                unsigned flags)
{
    blocker *k = opaque;

    (void)topic;
    (void)token;
    (void)flags;
    atomic_store(&k->entered, 1);
    while (!atomic_load(&k->release))
        bus__thread_yield();
    if (atomic_load(&k->unsub_done))
        atomic_store(&k->done_before_return, 1);
    bus_event_unref(ev);
    return BUS_OK;
}

static void
blocker_publish_thread(void *arg)
{
    blocker *k = arg;
    bus_event *e;

    if (bus_event_new(&e, "t.created", NULL, 0) != BUS_OK)
        return;
    if (bus_broker_publish(k->b, "blk", e, 0, NULL, NULL) != BUS_OK)
        bus_event_unref(e);
    atomic_store(&k->published, 1);
}

static void
blocker_unsub_thread(void *arg)
{
    blocker *k = arg;

    atomic_store(&k->unsub_calling, 1);
    bus__broker_unsubscribe(k->b, k->handle);
    atomic_store(&k->unsub_done, 1);
}

static int
flag_set(void *p)
{
    return atomic_load((atomic_int *)p) != 0;
}

static void
test_unsubscribe_waits_for_a_running_call(void **state)
{
    blocker k = {0};
    bus__thread tp, tu;

    (void)state;
    k.b = open_mem("mem://blocker");
    assert_int_equal(
        bus__broker_subscribe(k.b, "blk", NULL, blocker_deliver, &k, &k.handle),
        BUS_OK);
    assert_int_equal(bus__thread_start(&tp, "pub", blocker_publish_thread, &k),
                     BUS_OK);
    assert_true(bt_wait_for(flag_set, &k.entered, 10000));
    assert_int_equal(bus__thread_start(&tu, "unsub", blocker_unsub_thread, &k),
                     BUS_OK);
    assert_true(bt_wait_for(flag_set, &k.unsub_calling, 10000));
    atomic_store(&k.release, 1);
    bus__thread_join(&tp);
    bus__thread_join(&tu);
    assert_int_equal(k.done_before_return, 0);
    assert_int_equal(k.unsub_done, 1);
    bus_broker_close(k.b);
}

/* ---- Concurrency: publishers and subscription churn (TSan) -------------- */

#define CC_PUBLISHERS 4
#define CC_EVENTS 3000
#define CC_CHURN 200

typedef struct cc_msg {
    uint32_t pub;
    uint32_t seq;
} cc_msg;

typedef struct cc {
    bus_broker *pub_b, *sub_b;
    /* The permanent subscription: per-publisher order. Each slot is only
     * touched by its publisher's thread (delivery is synchronous). */
    uint32_t next_seq[CC_PUBLISHERS];
    atomic_int order_errors;
    atomic_int received;
    atomic_int churn_calls;
    atomic_int late_calls; /* a call after unsubscribe returned */
    atomic_int errors;
} cc;

typedef struct cc_pub {
    cc *c;
    uint32_t id;
} cc_pub;

typedef struct cc_transient {
    cc *c;
    atomic_int gone;
} cc_transient;

static int
cc_permanent_deliver(void *opaque, const char *topic, bus_event *ev,
                     uint64_t token, unsigned flags)
{
    cc *c = opaque;
    cc_msg m;

    (void)topic;
    (void)token;
    (void)flags;
    memcpy(&m, bus_event_payload(ev), sizeof(m));
    if (m.pub >= CC_PUBLISHERS || m.seq != c->next_seq[m.pub])
        atomic_fetch_add(&c->order_errors, 1);
    else
        c->next_seq[m.pub]++;
    atomic_fetch_add(&c->received, 1);
    bus_event_unref(ev);
    return BUS_OK;
}

static int
cc_transient_deliver(void *opaque, const char *topic, bus_event *ev,
                     uint64_t token, unsigned flags)
{
    cc_transient *t = opaque;

    (void)topic;
    (void)token;
    (void)flags;
    if (atomic_load(&t->gone))
        atomic_fetch_add(&t->c->late_calls, 1);
    atomic_fetch_add(&t->c->churn_calls, 1);
    bus_event_unref(ev);
    return BUS_OK;
}

static void
cc_publisher(void *arg)
{
    cc_pub *p = arg;
    char topic[32];
    uint32_t i;

    snprintf(topic, sizeof(topic), "cc.p%u", p->id);
    for (i = 0; i < CC_EVENTS; i++) {
        cc_msg m = {p->id, i};
        bus_event *e;
        if (bus_event_new(&e, "t.cc", &m, sizeof(m)) != BUS_OK) {
            atomic_fetch_add(&p->c->errors, 1);
            return;
        }
        if (bus_broker_publish(p->c->pub_b, topic, e, 0, NULL, NULL) !=
            BUS_OK) {
            bus_event_unref(e);
            atomic_fetch_add(&p->c->errors, 1);
        }
    }
}

static void
cc_churner(void *arg)
{
    cc *c = arg;
    static const char *const patterns[] = {"cc.*", "cc.>", "cc.p1", ">"};
    int i;

    for (i = 0; i < CC_CHURN; i++) {
        cc_transient t = {.c = c};
        void *h;
        atomic_init(&t.gone, 0);
        if (bus__broker_subscribe(c->sub_b, patterns[i % 4],
                                  i % 3 == 0 ? "churners" : NULL,
                                  cc_transient_deliver, &t, &h) != BUS_OK) {
            atomic_fetch_add(&c->errors, 1);
            return;
        }
        bus__thread_yield();
        bus__broker_unsubscribe(c->sub_b, h);
        /* After unsubscribe returns no call may run: t dies now. */
        atomic_store(&t.gone, 1);
    }
}

static void
test_concurrent_publishers_and_churn(void **state)
{
    cc c;
    cc_pub pubs[CC_PUBLISHERS];
    bus__thread tp[CC_PUBLISHERS], tc;
    void *h;
    uint32_t i;

    (void)state;
    memset(&c, 0, sizeof(c));
    c.pub_b = open_mem("mem://concurrent");
    c.sub_b = open_mem("mem://concurrent");
    assert_int_equal(bus__broker_subscribe(c.sub_b, "cc.*", NULL,
                                           cc_permanent_deliver, &c, &h),
                     BUS_OK);
    assert_int_equal(bus__thread_start(&tc, "churn", cc_churner, &c), BUS_OK);
    for (i = 0; i < CC_PUBLISHERS; i++) {
        pubs[i] = (cc_pub){&c, i};
        assert_int_equal(
            bus__thread_start(&tp[i], "pub", cc_publisher, &pubs[i]), BUS_OK);
    }
    for (i = 0; i < CC_PUBLISHERS; i++)
        bus__thread_join(&tp[i]);
    bus__thread_join(&tc);
    assert_int_equal(c.errors, 0);
    assert_int_equal(c.order_errors, 0);
    assert_int_equal(c.late_calls, 0);
    assert_int_equal(c.received, CC_PUBLISHERS * CC_EVENTS);
    for (i = 0; i < CC_PUBLISHERS; i++)
        assert_int_equal(c.next_seq[i], CC_EVENTS);
    bus__broker_unsubscribe(c.sub_b, h);
    bus_broker_close(c.sub_b);
    bus_broker_close(c.pub_b);
}

/* ---- Allocation faults -----------------------------------------------------
 */

/* Runs op with the nth allocation failing until it succeeds with no
 * failure injected; returns the number of failing runs. */
#define FAULT_LOOP(persistent, rv_var, op, on_fail)                            \
    do {                                                                       \
        uint64_t n_;                                                           \
        for (n_ = 1;; n_++) {                                                  \
            bool fired_;                                                       \
            bus_fault_alloc_fail_nth(n_, persistent);                          \
            rv_var = (op);                                                     \
            fired_ = bus_fault_alloc_fired();                                  \
            bus_fault_alloc_fail_nth(0, false);                                \
            if (!fired_)                                                       \
                break;                                                         \
            on_fail;                                                           \
        }                                                                      \
        assert_true(n_ > 1);                                                   \
    } while (0)

static void
test_open_survives_allocation_faults(void **state)
{
    char err[256];
    bus_broker *keep = open_mem("mem://faulty");
    bus_broker *b = NULL;
    int rv, pass;

    (void)state;
    /* A fresh name (creates the bus), a name that exists, a private bus. */
    static const char *const uris[] = {"mem://faulty-new", "mem://faulty",
                                       "mem://"};
    for (pass = 0; pass < 3; pass++) {
        for (int persistent = 0; persistent < 2; persistent++) {
            FAULT_LOOP(persistent, rv,
                       bus_broker_open_uri(&b, uris[pass], err, sizeof(err)), {
                           if (rv == BUS_OK) {
                               bus_broker_close(b); /* fault was harmless */
                           } else {
                               assert_int_equal(rv, BUS_ENOMEM);
                               assert_null(b);
                           }
                       });
            assert_int_equal(rv, BUS_OK);
            bus_broker_close(b);
        }
    }
    bus_broker_close(keep);
}

static void
test_subscribe_and_unsubscribe_survive_allocation_faults(void **state)
{
    bus_broker *b = open_mem("mem://faulty-sub");
    bus_broker_memory_stats st;
    rec base = {0}, r = {0}, z = {0};
    uint32_t refs;
    int rv;

    (void)state;
    rec_sub(b, "f.*", NULL, &base);
    for (int persistent = 0; persistent < 2; persistent++) {
        FAULT_LOOP(
            persistent, rv,
            bus__broker_subscribe(b, "f.>", "grp", rec_deliver, &r, &r.handle),
            {
                assert_int_equal(rv, BUS_ENOMEM);
                assert_null(r.handle);
                assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
                assert_int_equal(st.subscriptions, 1);
            });
        assert_int_equal(rv, BUS_OK);
        /* Both deliver; then unsubscribe the new one. */
        assert_int_equal(publish_counted(b, "f.1", &refs, NULL, NULL), BUS_OK);
        assert_int_equal(r.taken, 1);
        bus__broker_unsubscribe(b, r.handle);
        r = (rec){0};
    }

    /* Unsubscribe cannot fail: under a persistent fault the subscription
     * is dead at once (never called again) and leaves the index later. */
    rec_sub(b, "f.>", NULL, &z);
    bus_fault_alloc_fail_nth(1, true);
    bus__broker_unsubscribe(b, z.handle);
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(publish_counted(b, "f.2", &refs, NULL, NULL), BUS_OK);
    assert_int_equal(z.calls, 0);
    assert_int_equal(base.taken, 2 + 1);
    /* The next unsubscribe also takes the parked one out; close frees
     * everything either way (ASan checks). */
    rec_sub(b, "f.x", NULL, &z);
    bus__broker_unsubscribe(b, z.handle);
    bus__broker_unsubscribe(b, base.handle);
    assert_int_equal(bus_broker_memory_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.subscriptions, 0);

    /* A parked one freed by the bus's last close. */
    rec_sub(b, "f.y", NULL, &z);
    bus_fault_alloc_fail_nth(1, true);
    bus__broker_unsubscribe(b, z.handle);
    bus_fault_alloc_fail_nth(0, false);
    bus_broker_close(b);
}

static void
test_publish_survives_allocation_faults(void **state)
{
    bus_broker *b = open_mem("mem://faulty-pub");
    rec r[20];
    int i, rv, persistent, base = 0;

    (void)state;
    memset(r, 0, sizeof(r));
    /* More matches than the stack buffer: an uncached lookup needs a heap
     * array, and caching needs an allocation. */
    for (i = 0; i < 20; i++)
        rec_sub(b, "p.*", NULL, &r[i]);
    for (persistent = 0; persistent < 2; persistent++) {
        /* Each round needs a fresh snapshot (an empty cache): subscribe
         * and unsubscribe one more. */
        rec extra = {0};
        rec_sub(b, "other", NULL, &extra);
        bus__broker_unsubscribe(b, extra.handle);
        bus_event *e = new_event();
        FAULT_LOOP(persistent, rv,
                   bus_broker_publish(b, "p.1", e, 0, NULL, NULL), {
                       if (rv == BUS_OK) {
                           /* the cache could not be filled: harmless */
                           base++;
                           e = new_event();
                       } else {
                           assert_int_equal(rv, BUS_ENOMEM);
                           assert_int_equal(bus_event_refcount(e), 1);
                       }
                       for (i = 0; i < 20; i++)
                           assert_int_equal(r[i].taken, base);
                   });
        assert_int_equal(rv, BUS_OK);
        base++;
        for (i = 0; i < 20; i++)
            assert_int_equal(r[i].taken, base);
    }
    for (i = 0; i < 20; i++)
        bus__broker_unsubscribe(b, r[i].handle);
    bus_broker_close(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fanout_to_every_matching_subscription),
        cmocka_unit_test(test_no_subscriber_releases_the_event),
        cmocka_unit_test(test_many_subscriptions_on_one_topic),
        cmocka_unit_test(test_brokers_on_one_name_share_private_ones_do_not),
        cmocka_unit_test(test_groups_share_round_robin),
        cmocka_unit_test(test_group_that_refuses_everywhere_fails_publish),
        cmocka_unit_test(test_refusals_are_counted_and_decide_the_result),
        cmocka_unit_test(test_unsubscribe_from_inside_the_delivery),
        cmocka_unit_test(test_subscribe_and_publish_from_inside_the_delivery),
        cmocka_unit_test(test_closed_broker_refuses_work),
        cmocka_unit_test(test_options_and_paths_are_refused),
        cmocka_unit_test(test_unsubscribe_waits_for_a_running_call),
        cmocka_unit_test(test_concurrent_publishers_and_churn),
        cmocka_unit_test(test_open_survives_allocation_faults),
        cmocka_unit_test(
            test_subscribe_and_unsubscribe_survive_allocation_faults),
        cmocka_unit_test(test_publish_survives_allocation_faults),
    };

    return cmocka_run_group_tests_name("broker_memory", tests, NULL, NULL);
}
