/* Fault tests on the mock cluster (3 brokers):
 * - produce N events (100,000; BUS_KAFKA_FAULT_EVENTS to change) over 64
 *   keys while brokers go down and up, Produce requests fail with
 *   NOT_LEADER_FOR_PARTITION, REQUEST_TIMED_OUT and NOT_ENOUGH_REPLICAS,
 *   and partition leaders move: every ack is a success, and a plain
 *   consumer reads each event exactly once, in order per key;
 * - two consumers of one group with handlers in flight while partitions
 *   move between them (join, then leave): no event is lost across the
 *   moves; duplicates are counted and reported.
 * Waits are on conditions with deadlines. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kafka_test_util.h"

#define KEYS 64
#define PARTS 16
#define DEADLINE_MS 60000

static bus_broker *shared;

static int
group_setup(void **state)
{
    (void)state;
    shared = kt_open("kafka://mock");
    return 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    bus_broker_close(shared);
    return 0;
}

static rd_kafka_mock_cluster_t *
mock_cluster(void)
{
    return (rd_kafka_mock_cluster_t *)bus_broker_kafka_mock_cluster(shared);
}

static size_t
fault_events(void)
{
    const char *s = getenv("BUS_KAFKA_FAULT_EVENTS");
    long n = s != NULL ? atol(s) : 0;

    return n > 0 ? (size_t)n : 100000;
}

/* ---- Produce through failures ------------------------------------------ */

typedef struct acks {
    _Atomic uint64_t ok, failed;
} acks;

static void
ack_fn(void *opaque, bus_event *ev, int err)
{
    acks *a = opaque;

    (void)ev;
    if (err == BUS_OK)
        atomic_fetch_add(&a->ok, 1);
    else
        atomic_fetch_add(&a->failed, 1);
}

typedef struct check {
    size_t n;
    uint32_t *count;    /* per event: times read */
    int64_t last[KEYS]; /* last sequence read per key */
    size_t out_of_order, dups, bad;
} check;

static void
check_record(const rd_kafka_message_t *m, void *arg)
{
    check *c = arg;
    unsigned key;
    unsigned long long seq;
    char buf[64];

    snprintf(buf, sizeof(buf), "%.*s", (int)m->len, (const char *)m->payload);
    if (sscanf(buf, "k%u:%llu", &key, &seq) != 2 || key >= KEYS ||
        seq >= c->n) {
        c->bad++;
        return;
    }
    if (c->count[seq]++ > 0)
        c->dups++;
    if ((int64_t)seq <= c->last[key])
        c->out_of_order++;
    c->last[key] = (int64_t)seq;
}

static void
test_produce_survives_broker_failures(void **state)
{
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    size_t n = fault_events(), i, missing = 0;
    bus_broker *b;
    char topic[64];
    check c;
    acks a = {0};
    int32_t p;

    (void)state;
    kt_unique(topic, sizeof(topic), "fault.produce");
    /* The mock keeps 5 MiB per partition and drops older records: with
     * ~250-byte records (the envelope headers), 16 partitions hold
     * 100,000 comfortably; the check below makes sure none was dropped. */
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, PARTS, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    /* Batches of up to 10,000 records, 5 ms linger: the 100,000 go fast.
     * One request in flight per connection: librdkafka's mock checks
     * producer sequences only for transactional producers, so with several
     * in flight, an earlier batch failed by an injected error could be
     * overtaken by a later one, which a real broker refuses
     * (OUT_OF_ORDER_SEQUENCE_NUMBER) and the mock appends; librdkafka then
     * acks the earlier one implicitly, as Kafka's ordering guarantees
     * allow, although the mock never wrote it. */
    b = kt_open("kafka://mock?publish.timeout.ms=-1&"
                "kafka.producer.linger.ms=5&"
                "kafka.producer.batch.num.messages=10000&"
                "kafka.producer.max.in.flight.requests.per.connection=1");
    for (i = 0; i < n; i++) {
        char payload[48], stream[16];
        bus_event_init in;
        bus_event *e;
        unsigned key = (unsigned)(i % KEYS);
        int rv;

        /* The schedule of failures, by progress. */
        if (i == n / 10)
            rd_kafka_mock_push_request_errors(
                mc, 0 /* Produce */, 6,
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION);
        if (i == n * 2 / 10)
            rd_kafka_mock_broker_set_down(mc, 1);
        if (i == n * 3 / 10)
            rd_kafka_mock_broker_set_up(mc, 1);
        if (i == n * 4 / 10)
            for (p = 0; p < PARTS; p++) /* leader move */
                rd_kafka_mock_partition_set_leader(mc, topic, p,
                                                   1 + (p + 1) % 3);
        if (i == n * 5 / 10)
            rd_kafka_mock_push_request_errors(
                mc, 0, 4, RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT);
        if (i == n * 6 / 10)
            rd_kafka_mock_broker_set_down(mc, 2);
        if (i == n * 7 / 10)
            rd_kafka_mock_broker_set_up(mc, 2);
        if (i == n * 8 / 10)
            for (p = 0; p < PARTS; p++)
                rd_kafka_mock_partition_set_leader(mc, topic, p,
                                                   1 + (p + 2) % 3);

        snprintf(payload, sizeof(payload), "k%u:%zu", key, i);
        snprintf(stream, sizeof(stream), "key-%u", key);
        memset(&in, 0, sizeof(in));
        in.type = "fault.event";
        in.stream = stream;
        in.payload = payload;
        in.payload_len = strlen(payload);
        assert_int_equal(bus_event_create(&e, &in), BUS_OK);
        rv = bus_broker_publish(b, topic, e, 0, ack_fn, &a);
        if (rv != BUS_OK)
            fail_msg("publish %zu: %s", i, bus_err_name(rv));
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.failed), 0);
    assert_int_equal(atomic_load(&a.ok), n);
    bus_broker_close(b);

    {
        rd_kafka_t *rk =
            kt_raw_consumer(bus_broker_kafka_bootstrap(shared), NULL);
        int64_t lo, hi, sum = 0;
        for (p = 0; p < PARTS; p++) {
            assert_int_equal(
                rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000),
                RD_KAFKA_RESP_ERR_NO_ERROR);
            if (lo != 0 || getenv("BUS_KAFKA_FAULT_VERBOSE") != NULL)
                printf("partition %d: [%lld, %lld)\n", (int)p, (long long)lo,
                       (long long)hi);
            assert_int_equal(lo, 0); /* the mock dropped nothing */
            sum += hi;
        }
        rd_kafka_destroy(rk);
        if (sum != (int64_t)n)
            printf("Kafka holds %lld records, %zu were acked\n", (long long)sum,
                   n);
    }
    memset(&c, 0, sizeof(c));
    c.n = n;
    c.count = calloc(n, sizeof(*c.count));
    for (i = 0; i < KEYS; i++)
        c.last[i] = -1;
    /* The watermarks above say Kafka holds exactly n records (a duplicate
     * would make it n + 1); read them all and check each event is there
     * once, in order per key. */
    (void)kt_raw_read(bus_broker_kafka_bootstrap(shared), topic, n, DEADLINE_MS,
                      check_record, &c);
    for (i = 0; i < n; i++)
        if (c.count[i] == 0 && missing++ < 20)
            printf("missing: event %zu (key %zu)\n", i, i % KEYS);
    printf("produced %zu through failures: lost %zu, duplicates %zu, "
           "out of order %zu\n",
           n, missing, c.dups, c.out_of_order);
    assert_int_equal(missing, 0);
    assert_int_equal(c.dups, 0);
    assert_int_equal(c.out_of_order, 0);
    assert_int_equal(c.bad, 0);
    free(c.count);
}

/* ---- Rebalance between two consumers ------------------------------------ */

#define REB_EVENTS 4000

/* A consumer whose handler acks from a worker thread, a little later, so
 * that deliveries are in flight when partitions move. */
typedef struct member {
    kt_rec rec;
    bus__thread worker;
    _Atomic bool stop;
    _Atomic size_t acked;
    _Atomic uint32_t *handled; /* per event: times acked (shared) */
} member;

static void
member_worker(void *arg)
{
    member *m = arg;
    size_t next = 0;

    while (!atomic_load(&m->stop)) {
        size_t n = kt_rec_count(&m->rec);
        if (next == n) {
            bus__thread_yield();
            continue;
        }
        for (; next < n; next++) {
            unsigned long long seq;
            char buf[32];
            bus_event *ev = m->rec.items[next].ev;
            snprintf(buf, sizeof(buf), "%.*s", (int)bus_event_payload_len(ev),
                     (const char *)bus_event_payload(ev));
            if (sscanf(buf, "%llu", &seq) == 1 && seq < REB_EVENTS)
                atomic_fetch_add(&m->handled[seq], 1);
            /* Simulated handler time: keeps a few deliveries in flight. */
            if (next % 64 == 0)
                bus__sleep_ns(200000);
            kt_rec_ack(&m->rec, next, BUS_ACK);
            atomic_fetch_add(&m->acked, 1);
        }
    }
}

static void
member_start(member *m, bus_broker *b, const char *topic, const char *group,
             _Atomic uint32_t *handled)
{
    memset(m, 0, sizeof(*m));
    m->handled = handled;
    kt_rec_init(&m->rec, b, KT_KEEP);
    kt_rec_sub(&m->rec, topic, group);
    assert_int_equal(bus__thread_start(&m->worker, "member", member_worker, m),
                     BUS_OK);
}

static int
member_idle(void *arg)
{
    member *m = arg;

    return atomic_load(&m->acked) == kt_rec_count(&m->rec);
}

/* Leaves the group; when drain, only after every delivery was acked. */
static void
member_stop(member *m, bool drain)
{
    if (drain)
        assert_true(kt_wait(member_idle, m, DEADLINE_MS));
    bus__broker_unsubscribe(m->rec.b, m->rec.handle);
    atomic_store(&m->stop, true);
    bus__thread_join(&m->worker);
}

typedef struct all_handled {
    _Atomic uint32_t *handled;
    size_t upto;
} all_handled;

static int
all_are_handled(void *arg)
{
    all_handled *h = arg;
    size_t i;

    for (i = 0; i < h->upto; i++)
        if (atomic_load(&h->handled[i]) == 0)
            return 0;
    return 1;
}

static int
member_has(void *arg)
{
    void **a = arg;

    return atomic_load(&((member *)a[0])->acked) >= *(size_t *)a[1];
}

typedef struct committed_want {
    const char *boot, *group, *topic;
    int64_t total;
} committed_want;

static int
committed_total_is(void *arg)
{
    committed_want *w = arg;
    int64_t total = 0, c;
    int32_t p;

    for (p = 0; p < 4; p++)
        if ((c = kt_committed(w->boot, w->group, w->topic, p)) > 0)
            total += c;
    return total == w->total;
}

static int
b_assigned(void *arg)
{
    bus_broker_kafka_stats st;

    bus_broker_kafka_stats_get(arg, &st);
    return st.rebalances >= 1;
}

static void
publish_range(bus_broker *b, const char *topic, size_t from, size_t to)
{
    size_t i;

    for (i = from; i < to; i++) {
        char payload[24], stream[16];
        snprintf(payload, sizeof(payload), "%zu", i);
        snprintf(stream, sizeof(stream), "s%zu", i % 32);
        kt_publish(b, topic, "reb.event", stream, payload);
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
}

static void
test_rebalance_moves_partitions_without_loss(void **state)
{
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    _Atomic uint32_t *handled = calloc(REB_EVENTS, sizeof(*handled));
    bus_broker *pub = kt_open("kafka://mock");
    bus_broker *ba = kt_open("kafka://mock?kafka.consumer.auto.commit."
                             "interval.ms=100&rebalance.timeout.ms=5000");
    bus_broker *bb = kt_open("kafka://mock?kafka.consumer.auto.commit."
                             "interval.ms=100&rebalance.timeout.ms=5000");
    char topic[64], group[64];
    size_t i, dups = 0, want;
    bus_broker_kafka_stats sa, sb;
    all_handled ah;
    member a, m2;
    void *arg[2];

    (void)state;
    kt_unique(topic, sizeof(topic), "fault.rebalance");
    kt_unique(group, sizeof(group), "grp");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 4, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    ah.handled = handled;

    /* A alone. */
    member_start(&a, ba, topic, group, handled);
    publish_range(pub, topic, 0, 1000);
    want = 1000;
    arg[0] = &a;
    arg[1] = &want;
    assert_true(kt_wait(member_has, arg, DEADLINE_MS));
    /* Let A's commits catch up first: the mock refuses OffsetCommit while
     * the group is rebalancing (Kafka accepts the current generation's),
     * so what A finished but had not committed when B joined would be
     * handled again by the next owner. */
    {
        committed_want cw = {bus_broker_kafka_bootstrap(pub), group, topic,
                             1000};
        assert_true(kt_wait(committed_total_is, &cw, DEADLINE_MS));
    }

    /* B joins: partitions move to B (A revokes with handlers in flight,
     * publishes keep coming). */
    member_start(&m2, bb, topic, group, handled);
    publish_range(pub, topic, 1000, 1500);
    assert_true(kt_wait(b_assigned, bb, DEADLINE_MS));
    publish_range(pub, topic, 1500, 2500);
    ah.upto = 2500;
    assert_true(kt_wait(all_are_handled, &ah, DEADLINE_MS));
    assert_true(atomic_load(&m2.acked) > 0); /* B got some partitions */

    /* A leaves: everything moves to B. */
    member_stop(&a, false); /* with deliveries in flight */
    publish_range(pub, topic, 2500, REB_EVENTS);
    ah.upto = REB_EVENTS;
    assert_true(kt_wait(all_are_handled, &ah, DEADLINE_MS));
    /* B re-reads what A had not committed: let it reach the end (its
     * commits say so), then it leaves. */
    {
        committed_want cw = {bus_broker_kafka_bootstrap(pub), group, topic,
                             REB_EVENTS};
        assert_true(kt_wait(committed_total_is, &cw, DEADLINE_MS));
    }
    member_stop(&m2, true);

    for (i = 0; i < REB_EVENTS; i++)
        if (atomic_load(&handled[i]) > 1)
            dups += atomic_load(&handled[i]) - 1;
    bus_broker_kafka_stats_get(ba, &sa);
    bus_broker_kafka_stats_get(bb, &sb);
    printf("rebalance: %d events, A handled %zu, B handled %zu, "
           "duplicates %zu, rebalances %llu + %llu, commits on revoke "
           "%llu + %llu\n",
           REB_EVENTS, atomic_load(&a.acked), atomic_load(&m2.acked), dups,
           (unsigned long long)sa.rebalances, (unsigned long long)sb.rebalances,
           (unsigned long long)sa.committed, (unsigned long long)sb.committed);
    assert_true(sa.rebalances >= 2); /* assigned, revoked (and more) */
    /* Everything is committed at the end. */
    {
        int64_t total = 0;
        int32_t p;
        for (p = 0; p < 4; p++) {
            int64_t c =
                kt_committed(bus_broker_kafka_bootstrap(pub), group, topic, p);
            assert_true(c >= 0);
            total += c;
        }
        assert_int_equal(total, REB_EVENTS);
    }
    kt_rec_free(&a.rec);
    kt_rec_free(&m2.rec);
    bus_broker_close(ba);
    bus_broker_close(bb);
    bus_broker_close(pub);
    free((void *)handled);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_produce_survives_broker_failures),
        cmocka_unit_test(test_rebalance_moves_partitions_without_loss),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
