/*
 * Brokers attached to a context (bus.h, broker.h): mem:// carries local
 * publishes and joins contexts by name; routes choose the brokers a topic
 * goes to; deliveries from any broker run through the same subscription
 * table and dispatch (inline in the broker's thread, queued on workers);
 * handler results are acked to the broker with their tokens; attach,
 * detach and close keep brokers consistent. The fake:// backend
 * (fake_broker.h) stands in for a broker with acks.
 */
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker.h>
#include <bus/broker_memory.h>

#include "bus_test_util.h"
#include "fake_broker.h"

static bus_broker *
open_broker(const char *uri)
{
    char err[256];
    bus_broker *b = NULL;
    int rv = bus_broker_open_uri(&b, uri, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

static int
group_setup(void **state)
{
    (void)state;
    fake_register();
    return 0;
}

/* ---- mem:// -------------------------------------------------------------- */

static void
test_attached_mem_broker_carries_local_publishes(void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = bt_ctx_open(2);
    bus_broker *b = open_broker("mem://unit-local");
    bus_broker_memory_stats ms;
    bt_count ci = {0}, cq = {0};
    int i;

    (void)state;
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "m.*", bt_count_handler, &ci, &in, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "m.>", bt_count_handler, &cq, NULL, NULL), BUS_OK);
    for (i = 0; i < 100; i++)
        bt_publish_u64(ctx, "m.x", "s", (uint64_t)i);
    assert_int_equal(atomic_load(&ci.n), 100); /* inline: done already */
    assert_true(bt_count_wait(&cq, 100));
    assert_int_equal(bus_broker_memory_stats_get(b, &ms), BUS_OK);
    assert_int_equal(ms.published, 100);
    assert_int_equal(ms.delivered, 200);
    assert_int_equal(ms.subscriptions, 2);
    assert_int_equal(bus_ctx_close(ctx), 0);
    /* The context detached itself: the broker has no subscription left
     * and stays usable. */
    assert_int_equal(bus_broker_memory_stats_get(b, &ms), BUS_OK);
    assert_int_equal(ms.subscriptions, 0);
    bus_broker_close(b);
}

static void
test_two_contexts_share_a_named_mem_broker(void **state)
{
    bus_ctx *c1 = bt_ctx_open(1), *c2 = bt_ctx_open(1);
    bus_broker *b1 = open_broker("mem://unit-shared");
    bus_broker *b2 = open_broker("mem://unit-shared");
    bt_count n1 = {0}, n2 = {0};
    int i;

    (void)state;
    assert_int_equal(bus_ctx_attach(c1, b1, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(c2, b2, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(c1, "x.>", bt_count_handler, &n1, NULL, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(c2, "x.>", bt_count_handler, &n2, NULL, NULL), BUS_OK);
    for (i = 0; i < 50; i++) {
        bt_publish_u64(c1, "x.from1", NULL, (uint64_t)i);
        bt_publish_u64(c2, "x.from2", NULL, (uint64_t)i);
    }
    assert_true(bt_count_wait(&n1, 100));
    assert_true(bt_count_wait(&n2, 100));
    assert_int_equal(bus_ctx_close(c1), 0);
    assert_int_equal(bus_ctx_close(c2), 0);
    assert_int_equal(atomic_load(&n1.n), 100);
    assert_int_equal(atomic_load(&n2.n), 100);
    bus_broker_close(b1);
    bus_broker_close(b2);
}

static void
test_topics_go_to_the_brokers_whose_route_matches(void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *c1 = bt_ctx_open(1), *c2 = bt_ctx_open(1), *c3 = bt_ctx_open(1);
    bus_broker *ra1 = open_broker("mem://unit-ra"),
               *rb1 = open_broker("mem://unit-rb"),
               *ra2 = open_broker("mem://unit-ra"),
               *rb3 = open_broker("mem://unit-rb");
    bt_count all1 = {0}, a2 = {0}, b3 = {0};

    (void)state;
    assert_int_equal(bus_ctx_attach(c1, ra1, "a.>"), BUS_OK);
    assert_int_equal(bus_ctx_attach(c1, rb1, "b.>"), BUS_OK);
    assert_int_equal(bus_ctx_attach(c2, ra2, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(c3, rb3, NULL), BUS_OK);
    assert_int_equal(bus_subscribe(c1, ">", bt_count_handler, &all1, &in, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(c2, ">", bt_count_handler, &a2, &in, NULL),
                     BUS_OK);
    assert_int_equal(bus_subscribe(c3, ">", bt_count_handler, &b3, &in, NULL),
                     BUS_OK);
    bt_publish_u64(c1, "a.x", NULL, 1); /* ra: c1 and c2 */
    assert_int_equal(atomic_load(&all1.n), 1);
    assert_int_equal(atomic_load(&a2.n), 1);
    assert_int_equal(atomic_load(&b3.n), 0);
    bt_publish_u64(c1, "b.x", NULL, 2); /* rb: c1 and c3 */
    assert_int_equal(atomic_load(&all1.n), 2);
    assert_int_equal(atomic_load(&a2.n), 1);
    assert_int_equal(atomic_load(&b3.n), 1);
    bt_publish_u64(c1, "c.x", NULL, 3); /* no route: local to c1 only */
    assert_int_equal(atomic_load(&all1.n), 3);
    assert_int_equal(atomic_load(&a2.n), 1);
    assert_int_equal(atomic_load(&b3.n), 1);
    assert_int_equal(bus_ctx_close(c1), 0);
    assert_int_equal(bus_ctx_close(c2), 0);
    assert_int_equal(bus_ctx_close(c3), 0);
    bus_broker_close(ra1);
    bus_broker_close(rb1);
    bus_broker_close(ra2);
    bus_broker_close(rb3);
}

static void
test_attach_checks_its_arguments(void **state)
{
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *b = open_broker("mem://unit-args");
    bus_broker *other = open_broker("mem://unit-args-2");

    (void)state;
    assert_int_equal(bus_ctx_attach(ctx, b, "a..b"), BUS_EINVAL);
    assert_int_equal(bus_ctx_attach(ctx, NULL, NULL), BUS_EINVAL);
    assert_int_equal(bus_ctx_attach(NULL, b, NULL), BUS_EINVAL);
    assert_int_equal(bus_ctx_attach(ctx, b, "a.>"), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, b, "b.>"), BUS_EEXIST);
    assert_int_equal(bus_ctx_detach(ctx, other), BUS_ENOTFOUND);
    assert_int_equal(bus_ctx_detach(ctx, b), BUS_OK);
    assert_int_equal(bus_ctx_detach(ctx, b), BUS_ENOTFOUND);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    bus_broker_close(other);
}

static void
test_detach_stops_deliveries_from_that_broker(void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *c1 = bt_ctx_open(1), *c2 = bt_ctx_open(1);
    bus_broker *b1 = open_broker("mem://unit-detach");
    bus_broker *b2 = open_broker("mem://unit-detach");
    bus_broker_memory_stats ms;
    bt_count n = {0};

    (void)state;
    assert_int_equal(bus_ctx_attach(c1, b1, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(c2, b2, NULL), BUS_OK);
    assert_int_equal(bus_subscribe(c2, "d", bt_count_handler, &n, &in, NULL),
                     BUS_OK);
    bt_publish_u64(c1, "d", NULL, 1);
    assert_int_equal(atomic_load(&n.n), 1);
    assert_int_equal(bus_ctx_detach(c2, b2), BUS_OK);
    assert_int_equal(bus_broker_memory_stats_get(b2, &ms), BUS_OK);
    assert_int_equal(ms.subscriptions, 0);
    bt_publish_u64(c1, "d", NULL, 2); /* nobody on the broker listens */
    assert_int_equal(atomic_load(&n.n), 1);
    bt_publish_u64(c2, "d", NULL, 3); /* c2 alone: local again */
    assert_int_equal(atomic_load(&n.n), 2);
    /* Attach again: subscriptions made before are linked anew. */
    assert_int_equal(bus_ctx_attach(c2, b2, NULL), BUS_OK);
    bt_publish_u64(c1, "d", NULL, 4);
    assert_int_equal(atomic_load(&n.n), 3);
    assert_int_equal(bus_ctx_close(c1), 0);
    assert_int_equal(bus_ctx_close(c2), 0);
    bus_broker_close(b1);
    bus_broker_close(b2);
}

/* ---- Deliveries from a broker ----------------------------------------------
 */

typedef struct thread_seen {
    pthread_t t;
    atomic_int calls;
} thread_seen;

static bus_result
thread_seen_handler(bus_delivery *d, void *opaque)
{
    thread_seen *s = opaque;

    (void)d;
    s->t = pthread_self();
    atomic_fetch_add(&s->calls, 1);
    return BUS_ACK;
}

typedef struct deliverer {
    bus_broker *b;
    int took;
    pthread_t self;
} deliverer;

static void *
deliver_thread(void *arg)
{
    deliverer *d = arg;
    bus_event *e = bt_event_u64(NULL, 1);

    d->self = pthread_self();
    d->took = fake_deliver(d->b, "f.x", e, 7);
    bus_event_unref(e);
    return NULL;
}

static int
thread_seen_called(void *arg)
{
    return atomic_load(&((thread_seen *)arg)->calls) > 0;
}

static void
test_broker_deliveries_run_inline_in_its_thread_or_queued_on_workers(
    void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *b = open_broker("fake://threads");
    thread_seen si, sq;
    deliverer d = {b, 0, 0};
    pthread_t th;

    (void)state;
    memset(&si, 0, sizeof(si));
    memset(&sq, 0, sizeof(sq));
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "f.*", thread_seen_handler, &si, &in, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "f.x", thread_seen_handler, &sq, NULL, NULL),
        BUS_OK);
    assert_int_equal(fake_n_subs(b), 2);
    assert_int_equal(pthread_create(&th, NULL, deliver_thread, &d), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(d.took, 2);
    assert_int_equal(atomic_load(&si.calls), 1);
    assert_true(pthread_equal(si.t, d.self));
    assert_true(bt_wait_for(thread_seen_called, &sq, BT_WAIT_MS));
    assert_false(pthread_equal(sq.t, d.self));
    assert_false(pthread_equal(sq.t, pthread_self()));
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(fake_n_subs(b), 0);
    bus_broker_close(b);
}

static bus_result
result_from_payload(bus_delivery *d, void *opaque)
{
    (void)opaque;
    return (bus_result)(bt_payload_u64(bus_delivery_event(d)) % 3);
}

typedef struct acks_want {
    fake_state *st;
    int n;
} acks_want;

static int
acks_reached(void *arg)
{
    acks_want *w = arg;

    return atomic_load(&w->st->n_acks) >= w->n;
}

static void
results_are_acked(bus_dispatch dispatch)
{
    bus_sub_config sc = bt_sub_cfg(dispatch);
    bus_ctx *ctx = bt_ctx_open(2);
    bus_broker *b = open_broker("fake://acks");
    fake_state *st = fake_of(b);
    acks_want w = {st, 60};
    uint64_t i;

    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "r", result_from_payload, NULL, &sc, NULL), BUS_OK);
    /* Tokens 100..159; payload i % 3 picks ACK, RETRY, REJECT. */
    for (i = 0; i < 60; i++) {
        bus_event *e = bt_event_u64(NULL, i);
        assert_int_equal(fake_deliver(b, "r", e, 100 + i), 1);
        bus_event_unref(e);
    }
    assert_true(bt_wait_for(acks_reached, &w, BT_WAIT_MS));
    for (i = 0; i < 60; i++)
        assert_int_equal(fake_ack_of(b, 100 + i), (int)(i % 3));
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(atomic_load(&st->n_acks), 60);
    bus_broker_close(b);
}

static void
test_inline_results_are_acked_to_the_broker_with_their_tokens(void **state)
{
    (void)state;
    results_are_acked(BUS_DISPATCH_INLINE);
}

static void
test_queued_results_are_acked_to_the_broker_with_their_tokens(void **state)
{
    (void)state;
    results_are_acked(BUS_DISPATCH_QUEUED);
}

static void
batch_results(bus_delivery *const *batch, size_t n, bus_result *results,
              void *opaque)
{
    size_t i;

    (void)opaque;
    for (i = 0; i < n; i++)
        results[i] = result_from_payload(batch[i], NULL);
}

static void
test_batch_results_are_acked_per_event(void **state)
{
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *b = open_broker("fake://acks-batch");
    fake_state *st = fake_of(b);
    acks_want w = {st, 40};
    uint64_t i;

    (void)state;
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    sc.batch_fn = batch_results;
    sc.batch_max = 8;
    assert_int_equal(bus_subscribe(ctx, "r", NULL, NULL, &sc, NULL), BUS_OK);
    for (i = 0; i < 40; i++) {
        bus_event *e = bt_event_u64("k", i);
        assert_int_equal(fake_deliver(b, "r", e, 500 + i), 1);
        bus_event_unref(e);
    }
    assert_true(bt_wait_for(acks_reached, &w, BT_WAIT_MS));
    for (i = 0; i < 40; i++)
        assert_int_equal(fake_ack_of(b, 500 + i), (int)(i % 3));
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
}

/* Close with deliveries still queued: they are handled and acked before
 * the context lets go of the broker. */
static bus_result
slow_ack_handler(bus_delivery *d, void *opaque)
{
    uint64_t t0 = bt_now_ns();

    (void)d;
    (void)opaque;
    while (bt_now_ns() - t0 < 20000)
        ;
    return BUS_ACK;
}

static void
test_close_handles_and_acks_queued_broker_deliveries(void **state)
{
    bus_ctx *ctx = bt_ctx_open(2);
    bus_broker *b = open_broker("fake://close-acks");
    fake_state *st = fake_of(b);
    uint64_t i;

    (void)state;
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "c", slow_ack_handler, NULL, NULL, NULL), BUS_OK);
    for (i = 0; i < 300; i++) {
        bus_event *e = bt_event_u64(NULL, i);
        assert_int_equal(fake_deliver(b, "c", e, 1000 + i), 1);
        bus_event_unref(e);
    }
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(atomic_load(&st->n_acks), 300);
    assert_int_equal(fake_n_subs(b), 0);
    bus_broker_close(b);
}

static bus_result
hold_first_handler(bus_delivery *d, void *opaque)
{
    (void)d;
    bt_gate_wait(opaque);
    return BUS_ACK;
}

static void
test_a_full_queue_refuses_a_broker_delivery(void **state)
{
    bus_ctx_config c;
    bus_sub_config sc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_broker *b = open_broker("fake://full");
    fake_state *st = fake_of(b);
    bt_count n = {0};
    bt_gate gate;
    bus_ctx *ctx;
    bus_event *e;
    int i;

    (void)state;
    bt_gate_init(&gate);
    bus_ctx_config_init(&c);
    c.workers = 1;
    c.queue_capacity = 4;
    assert_int_equal(bus_ctx_open(&ctx, &c), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "hold", hold_first_handler, &gate, NULL, NULL),
        BUS_OK);
    sc.backpressure = BUS_BP_FAIL;
    assert_int_equal(bus_subscribe(ctx, "q", bt_count_handler, &n, &sc, NULL),
                     BUS_OK);
    e = bt_event_u64(NULL, 0);
    assert_int_equal(fake_deliver(b, "hold", e, 1), 1);
    assert_true(bt_gate_wait_entered(&gate, 1)); /* the worker is held */
    for (i = 0; i < 4; i++)
        assert_int_equal(fake_deliver(b, "q", e, 2), 1);
    assert_int_equal(fake_deliver(b, "q", e, 3), 0); /* refused */
    assert_int_equal(atomic_load(&st->deliver_errors), 1);
    /* e came without a topic, so each queued delivery is a clone that
     * carries it: the refused one left ours alone. */
    assert_int_equal(bus_event_refcount(e), 1);
    bt_gate_open(&gate);
    assert_true(bt_count_wait(&n, 4));
    assert_int_equal(bus_ctx_close(ctx), 0);
    assert_int_equal(bus_event_refcount(e), 1);
    bus_event_unref(e);
    bus_broker_close(b);
    bt_gate_fini(&gate);
}

static void
test_subscribe_fails_when_an_attached_broker_refuses(void **state)
{
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *b = open_broker("fake://refuse");
    bus_ctx_stats st;
    bt_count n = {0};
    bus_sub *s = (bus_sub *)&n;

    (void)state;
    assert_int_equal(bus_ctx_attach(ctx, b, "r.>"), BUS_OK);
    fake_of(b)->refuse_subscribe = BUS_EUNAVAIL;
    assert_int_equal(bus_subscribe(ctx, "r.x", bt_count_handler, &n, NULL, &s),
                     BUS_EUNAVAIL);
    assert_null(s);
    /* A pattern that cannot overlap the route does not involve b. */
    assert_int_equal(
        bus_subscribe(ctx, "local", bt_count_handler, &n, NULL, NULL), BUS_OK);
    bus_ctx_stats_get(ctx, &st);
    assert_int_equal(st.subscriptions, 1);
    assert_int_equal(fake_n_subs(b), 0);
    fake_of(b)->refuse_subscribe = 0;
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
}

typedef struct ack_once {
    atomic_int calls;
    atomic_int err;
} ack_once;

static void
ack_once_fn(void *opaque, bus_event *ev, int err)
{
    ack_once *a = opaque;

    (void)ev;
    atomic_store(&a->err, err);
    atomic_fetch_add(&a->calls, 1);
}

static void
test_publish_ack_through_two_brokers_runs_once(void **state)
{
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *m = open_broker("mem://unit-two");
    bus_broker *f = open_broker("fake://two");
    bt_count n = {0};
    ack_once a;
    bus_event *e;

    (void)state;
    memset(&a, 0, sizeof(a));
    assert_int_equal(bus_ctx_attach(ctx, m, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, f, NULL), BUS_OK);
    assert_int_equal(bus_subscribe(ctx, "t", bt_count_handler, &n, &in, NULL),
                     BUS_OK);
    e = bt_event_u64(NULL, 1);
    assert_int_equal(bus_publish_ack(ctx, "t", e, 0, ack_once_fn, &a), BUS_OK);
    assert_int_equal(atomic_load(&a.calls), 1);
    assert_int_equal(atomic_load(&a.err), BUS_OK);
    /* Each broker delivered it to the subscription it carries. */
    assert_int_equal(atomic_load(&n.n), 2);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(m);
    bus_broker_close(f);
}

/* ---- Link lifetime: acks after unsubscribe or detach --------------------
 *
 * A queued broker delivery acks through its link (backend handle, token)
 * after the handler, on a worker. Neither an unsubscribe from inside
 * another handler (which cannot wait) nor a detach may end the backend
 * subscription or free the link while such an entry is pending. */

static uint64_t
key_zero(const bus_event *ev, void *opaque)
{
    (void)ev;
    (void)opaque;
    return 0;
}

typedef struct unsub_other {
    bus_sub *victim;
    atomic_int rv;
    atomic_int calls;
} unsub_other;

static bus_result
unsub_other_handler(bus_delivery *d, void *opaque)
{
    unsub_other *u = opaque;

    (void)d;
    if (atomic_fetch_add(&u->calls, 1) == 0)
        atomic_store(&u->rv, bus_unsubscribe(u->victim));
    return BUS_ACK;
}

typedef struct ack_want {
    bus_broker *b;
    uint64_t token;
} ack_want;

static int
ack_arrived(void *arg)
{
    ack_want *w = arg;

    return fake_ack_of(w->b, w->token) >= 0;
}

static void
test_unsubscribe_from_another_handler_keeps_pending_acks_valid(void **state)
{
    bus_sub_config qc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_sub_config in = bt_sub_cfg(BUS_DISPATCH_INLINE);
    bus_ctx *ctx = bt_ctx_open(2);
    bus_broker *b = open_broker("fake://unsub-in-handler");
    fake_state *st = fake_of(b);
    ack_want w = {b, 11};
    unsub_other u;
    bt_gate gate;
    bus_event *e;
    uint64_t t;

    (void)state;
    memset(&u, 0, sizeof(u));
    bt_gate_init(&gate);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    qc.key_fn = key_zero; /* all on worker 0, in order */
    assert_int_equal(
        bus_subscribe(ctx, "a", hold_first_handler, &gate, &qc, &u.victim),
        BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "b", unsub_other_handler, &u, &in, NULL), BUS_OK);
    e = bt_event_u64(NULL, 1);
    for (t = 11; t <= 13; t++)
        assert_int_equal(fake_deliver(b, "a", e, t), 1);
    assert_true(bt_gate_wait_entered(&gate, 1)); /* 11 runs, 12, 13 wait */
    /* B's handler (inline, in this thread, inside a read section)
     * unsubscribes A: it cannot wait, so A's handler is still running
     * and two entries with tokens are still queued. */
    assert_int_equal(fake_deliver(b, "b", e, 20), 1);
    assert_int_equal(atomic_load(&u.calls), 1);
    assert_int_equal(atomic_load(&u.rv), BUS_OK);
    /* A refuses new deliveries, but its backend subscription stays while
     * entries may still ack through it. */
    assert_int_equal(fake_deliver(b, "a", e, 14), 0);
    assert_int_equal(fake_n_subs(b), 2);
    bt_gate_open(&gate);
    assert_true(bt_wait_for(ack_arrived, &w, BT_WAIT_MS));
    assert_int_equal(fake_ack_of(b, 11), BUS_ACK); /* the running call */
    assert_int_equal(bus_ctx_close(ctx), 0);
    /* The queued ones were dropped (not acked: the broker redelivers). */
    assert_int_equal(fake_ack_of(b, 12), -1);
    assert_int_equal(fake_ack_of(b, 13), -1);
    assert_int_equal(fake_ack_of(b, 20), BUS_ACK);
    assert_int_equal(atomic_load(&st->acks_unsubscribed), 0);
    assert_int_equal(fake_n_subs(b), 0);
    bus_event_unref(e);
    bus_broker_close(b);
    bt_gate_fini(&gate);
}

typedef struct detacher {
    bus_ctx *ctx;
    bus_broker *b;
    atomic_int rv;
    atomic_int done;
} detacher;

static void *
detach_thread(void *arg)
{
    detacher *d = arg;

    atomic_store(&d->rv, bus_ctx_detach(d->ctx, d->b));
    atomic_store(&d->done, 1);
    return NULL;
}

static void
test_detach_waits_for_queued_deliveries_to_ack(void **state)
{
    bus_sub_config qc = bt_sub_cfg(BUS_DISPATCH_QUEUED);
    bus_ctx *ctx = bt_ctx_open(1);
    bus_broker *b = open_broker("fake://detach-acks");
    fake_state *st = fake_of(b);
    detacher d;
    bt_gate gate;
    pthread_t th;
    bus_event *e;
    uint64_t t, t0;

    (void)state;
    bt_gate_init(&gate);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, "a", hold_first_handler, &gate, &qc, NULL), BUS_OK);
    e = bt_event_u64(NULL, 1);
    for (t = 31; t <= 33; t++)
        assert_int_equal(fake_deliver(b, "a", e, t), 1);
    assert_true(bt_gate_wait_entered(&gate, 1));
    memset(&d, 0, sizeof(d));
    d.ctx = ctx;
    d.b = b;
    assert_int_equal(pthread_create(&th, NULL, detach_thread, &d), 0);
    /* Detach cannot finish while entries with tokens are pending: the
     * backend subscription stays (no condition to wait on for "still
     * waiting", so look for a while). */
    t0 = bt_now_ns();
    while (bt_now_ns() - t0 < 20000000u) {
        assert_int_equal(atomic_load(&d.done), 0);
        assert_int_equal(fake_n_subs(b), 1);
        sched_yield();
    }
    bt_gate_open(&gate);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(atomic_load(&d.rv), BUS_OK);
    for (t = 31; t <= 33; t++)
        assert_int_equal(fake_ack_of(b, t), BUS_ACK);
    assert_int_equal(atomic_load(&st->acks_unsubscribed), 0);
    assert_int_equal(fake_n_subs(b), 0);
    /* Local again, the subscription works without the broker. */
    bt_publish_u64(ctx, "a", NULL, 2);
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_event_unref(e);
    bus_broker_close(b);
    bt_gate_fini(&gate);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attached_mem_broker_carries_local_publishes),
        cmocka_unit_test(test_two_contexts_share_a_named_mem_broker),
        cmocka_unit_test(test_topics_go_to_the_brokers_whose_route_matches),
        cmocka_unit_test(test_attach_checks_its_arguments),
        cmocka_unit_test(test_detach_stops_deliveries_from_that_broker),
        cmocka_unit_test(
            test_broker_deliveries_run_inline_in_its_thread_or_queued_on_workers),
        cmocka_unit_test(
            test_inline_results_are_acked_to_the_broker_with_their_tokens),
        cmocka_unit_test(
            test_queued_results_are_acked_to_the_broker_with_their_tokens),
        cmocka_unit_test(test_batch_results_are_acked_per_event),
        cmocka_unit_test(test_close_handles_and_acks_queued_broker_deliveries),
        cmocka_unit_test(test_a_full_queue_refuses_a_broker_delivery),
        cmocka_unit_test(test_subscribe_fails_when_an_attached_broker_refuses),
        cmocka_unit_test(test_publish_ack_through_two_brokers_runs_once),
        cmocka_unit_test(
            test_unsubscribe_from_another_handler_keeps_pending_acks_valid),
        cmocka_unit_test(test_detach_waits_for_queued_deliveries_to_ack),
    };

    bt_filter_from_env();
    return cmocka_run_group_tests_name("bus_brokers", tests, group_setup, NULL);
}
