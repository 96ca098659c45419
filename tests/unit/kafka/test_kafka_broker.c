/* The Kafka broker at the SPI level on librdkafka's mock cluster
 * (kafka://mock): options and their errors, publish acks from delivery
 * reports, the record format read by a plain librdkafka client, foreign
 * records, group commits (lowest unfinished offset), RETRY/REJECT,
 * backpressure (refused deliveries pause, nothing lost), max.inflight,
 * unsubscribe from a delivery, error mapping with injected errors, queue
 * full, health, close, secrets never logged, and the bus context on top.
 * Every wait is on a condition with a deadline. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kafka_test_util.h"

#define MOCK "kafka://mock"
#define FAST "kafka.consumer.auto.commit.interval.ms=100"
#define DEADLINE_MS 30000

static bus_broker *shared; /* keeps the process's mock cluster up */

static int
group_setup(void **state)
{
    (void)state;
    shared = kt_open(MOCK);
    return 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    bus_broker_close(shared);
    return 0;
}

static const char *
boot(void)
{
    return bus_broker_kafka_bootstrap(shared);
}

static rd_kafka_mock_cluster_t *
mock_cluster(void)
{
    return (rd_kafka_mock_cluster_t *)bus_broker_kafka_mock_cluster(shared);
}

/* ---- Options ------------------------------------------------------------ */

static void
expect_open_error(const char *uri, int want, const char *in_err)
{
    char err[512] = "";
    bus_broker *b = NULL;
    int rv = kt_open_err(uri, err, sizeof(err), &b);

    if (rv != want)
        fail_msg("open %s: got %s (%s), want %s", uri, bus_err_name(rv), err,
                 bus_err_name(want));
    assert_null(b);
    if (in_err != NULL && strstr(err, in_err) == NULL)
        fail_msg("open %s: error '%s' does not mention '%s'", uri, err, in_err);
}

static void
test_open_rejects_bad_options(void **state)
{
    char path[256], uri[512];
    FILE *f;

    (void)state;
    expect_open_error(MOCK "?kafka.no.such.property=1", BUS_EINVAL,
                      "no.such.property");
    expect_open_error(MOCK "?kafka.linger.ms=banana", BUS_EINVAL, "linger.ms");
    expect_open_error(MOCK "?kafka.consumer.session.timeout.ms=-5", BUS_EINVAL,
                      "session.timeout.ms");
    expect_open_error(MOCK "?bogus=1", BUS_EINVAL, "bogus");
    expect_open_error(MOCK "?compression=brotli", BUS_EINVAL, "brotli");
    expect_open_error(MOCK "?max.inflight=0", BUS_EINVAL, "max.inflight");
    expect_open_error(MOCK "?start=middle", BUS_EINVAL, "start");
    expect_open_error(MOCK "?topic.prefix=a/b", BUS_EINVAL, "topic.prefix");
    expect_open_error(MOCK "?mock.brokers=5", BUS_EINVAL, "mock.brokers");
    expect_open_error("kafka://127.0.0.1:9092?mock.brokers=2", BUS_EINVAL,
                      "mock");
    expect_open_error("kafka://127.0.0.1:9092/path", BUS_EINVAL, "path");
    expect_open_error("kafka://", BUS_EINVAL, "bootstrap");
    expect_open_error(MOCK "?config=/nonexistent/kafka.properties",
                      BUS_ENOTFOUND, "/nonexistent");

    /* A properties file: errors name the file and line. */
    snprintf(path, sizeof(path), "/tmp/bus-kafka-conf-%d", (int)getpid());
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "# comment\n\nlinger.ms = 2\nnot.a.property=1\n");
    fclose(f);
    snprintf(uri, sizeof(uri), MOCK "?config=%s", path);
    expect_open_error(uri, BUS_EINVAL, ":4");
    f = fopen(path, "w");
    fprintf(f, "linger.ms=2\nclient.id=from-file\n");
    fclose(f);
    {
        /* The file's properties are applied, and read back. */
        bus_broker *b = kt_open(uri);
        char v[64];
        assert_int_equal(
            bus_broker_kafka_producer_property(b, "client.id", v, sizeof(v),
                                               NULL),
            BUS_OK);
        assert_string_equal(v, "from-file");
        bus_broker_close(b);
    }
    unlink(path);
}

static void
expect_property(bus_broker *b, const char *name, const char *want)
{
    char v[128];
    int rv = bus_broker_kafka_producer_property(b, name, v, sizeof(v), NULL);

    if (rv != BUS_OK)
        fail_msg("%s: %s", name, bus_err_name(rv));
    if (strcmp(v, want) != 0)
        fail_msg("%s = '%s', want '%s'", name, v, want);
}

/* The producer's defaults (idempotence, acks=all), what the URI sets on
 * top, and the accessor's errors. */
static void
test_producer_defaults_and_overrides_take_effect(void **state)
{
    bus_broker *b;
    char v[4];
    size_t len = 0;

    (void)state;
    b = kt_open(MOCK);
    expect_property(b, "enable.idempotence", "true");
    expect_property(b, "acks", "-1"); /* all */
    expect_property(b, "compression.codec", "lz4");
    assert_int_equal(bus_broker_kafka_producer_property(b, "no.such.thing", v,
                                                        sizeof(v), NULL),
                     BUS_ENOTFOUND);
    assert_int_equal(bus_broker_kafka_producer_property(b, "sasl.password", v,
                                                        sizeof(v), NULL),
                     BUS_EACCESS);
    /* too small: says the size it needs, and the buffer stays a string */
    assert_int_equal(bus_broker_kafka_producer_property(b, "client.id", v,
                                                        sizeof(v), &len),
                     BUS_ENOBUFS);
    assert_true(len > sizeof(v));
    assert_int_equal(v[sizeof(v) - 1], '\0');
    bus_broker_close(b);

    b = kt_open(MOCK "?compression=zstd&kafka.producer.linger.ms=7");
    expect_property(b, "compression.codec", "zstd");
    expect_property(b, "linger.ms", "7");
    expect_property(b, "enable.idempotence", "true");
    bus_broker_close(b);
    /* weaker acks only with idempotence turned off, by name */
    expect_open_error(MOCK "?kafka.producer.acks=1", BUS_EINVAL, "acks");
    b = kt_open(MOCK "?kafka.producer.enable.idempotence=false"
                     "&kafka.producer.acks=1");
    expect_property(b, "enable.idempotence", "false");
    expect_property(b, "acks", "1");
    bus_broker_close(b);
}

static void
test_open_fails_fast_on_unreachable_cluster(void **state)
{
    bus_broker_config cfg;
    bus_broker *b = NULL;
    char err[512];
    uint64_t t0 = bt_now_ns();

    (void)state;
    bus_broker_config_init(&cfg);
    cfg.uri = "kafka://127.0.0.1:1";
    cfg.open_timeout_ms = 500;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EUNAVAIL);
    assert_null(b);
    assert_non_null(strstr(err, "127.0.0.1:1"));
    assert_true(bt_now_ns() - t0 < 5000000000ull);
}

/* Captures log lines to check that secrets never appear. */
typedef struct logcap {
    bus__mutex mtx;
    char text[65536];
    size_t len;
} logcap;

static void
logcap_fn(void *opaque, bus_log_level level, const char *subsys,
          const char *msg)
{
    logcap *c = opaque;
    int n;

    (void)level;
    bus__mutex_lock(&c->mtx);
    n = snprintf(c->text + c->len, sizeof(c->text) - c->len, "%s: %s\n", subsys,
                 msg);
    if (n > 0 && c->len + (size_t)n < sizeof(c->text))
        c->len += (size_t)n;
    bus__mutex_unlock(&c->mtx);
}

static void
test_secrets_never_reach_logs_or_errors(void **state)
{
    static logcap cap;
    bus_broker_config cfg;
    bus_broker *b = NULL;
    char err[512] = "";
    const char *props[] = {"kafka.sasl.password",
                           "hunter2-secret",
                           "kafka.ssl.key.password",
                           "hunter3-secret",
                           "kafka.debug",
                           "conf,generic",
                           NULL};

    (void)state;
    bus__mutex_init(&cap.mtx);
    bus_broker_config_init(&cfg);
    cfg.uri = MOCK;
    cfg.props = props;
    cfg.log.fn = logcap_fn;
    cfg.log.opaque = &cap;
    cfg.log.level = BUS_LOG_DEBUG;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_OK);
    bus_broker_close(b);
    /* A failing open with secrets among the properties. */
    {
        const char *bad[] = {"kafka.sasl.password", "hunter5-secret",
                             "kafka.security.protocol", "NOPE", NULL};
        cfg.props = bad;
        assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)),
                         BUS_EINVAL);
        assert_non_null(strstr(err, "security.protocol"));
        assert_null(strstr(err, "hunter"));
    }
    /* The same secrets in the URI's query: the core logs the URI it
     * opens (or fails to), masked. */
    cfg.props = NULL;
    cfg.uri = MOCK "?kafka.sasl.password=hunter6-secret"
                   "&kafka.ssl.key.password=hunter7%2Dsecret"
                   "&kafka.ssl.key.pem=hunter8-secret&kafka.debug=conf";
    if (bus_broker_open(&b, &cfg, err, sizeof(err)) == BUS_OK)
        bus_broker_close(b);
    assert_null(strstr(err, "hunter"));
    cfg.uri = MOCK "?kafka.sasl.password=hunter9-secret&typo=1";
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_null(strstr(err, "hunter"));
    assert_true(cap.len > 0);
    assert_non_null(strstr(cap.text, "typo=1")); /* the URI was logged */
    assert_null(strstr(cap.text, "hunter"));
    bus__mutex_fini(&cap.mtx);
}

/* ---- Publish ----------------------------------------------------------------
 */

typedef struct acks {
    _Atomic int ok;
    _Atomic int failed;
    _Atomic int last_err;
} acks;

static void
ack_fn(void *opaque, bus_event *ev, int err)
{
    acks *a = opaque;

    assert_non_null(ev);
    if (err == BUS_OK)
        atomic_fetch_add(&a->ok, 1);
    else {
        atomic_store(&a->last_err, err);
        atomic_fetch_add(&a->failed, 1);
    }
}

static bus_event *
mk_event(const char *type, const char *stream, const char *payload)
{
    bus_event_init in;
    bus_event *e;

    memset(&in, 0, sizeof(in));
    in.type = type;
    in.stream = stream;
    in.payload = payload;
    in.payload_len = strlen(payload);
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    return e;
}

static void
test_publish_acks_come_from_delivery_reports(void **state)
{
    bus_broker *b = kt_open(MOCK);
    bus_broker_kafka_stats st;
    char topic[64];
    acks a = {0};
    int i;

    (void)state;
    kt_unique(topic, sizeof(topic), "pub.acks");
    assert_non_null(bus_broker_kafka_bootstrap(b));
    assert_string_equal(bus_broker_kafka_bootstrap(b), boot());
    for (i = 0; i < 100; i++) {
        bus_event *e = mk_event("t.created", "s1", "hello");
        assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a),
                         BUS_OK);
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    /* flush returns once every ack has run. */
    assert_int_equal(atomic_load(&a.ok), 100);
    assert_int_equal(atomic_load(&a.failed), 0);
    assert_int_equal(bus_broker_kafka_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.published, 100);
    assert_int_equal(st.acked, 100);
    assert_int_equal(bus_broker_kafka_stats_get(NULL, &st), BUS_EINVAL);
    assert_int_equal(kt_raw_read(boot(), topic, 100, DEADLINE_MS, NULL, NULL),
                     100);
    bus_broker_close(b);
}

static void
test_publish_refuses_what_kafka_cannot_name(void **state)
{
    bus_broker *b = kt_open(MOCK);
    bus_event *e = mk_event("t.created", NULL, "x");

    (void)state;
    /* ':' is a valid bus topic character but not a Kafka one. */
    assert_int_equal(bus_broker_publish(b, "a:b.c", e, 0, NULL, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_event_refcount(e), 1); /* still ours */
    bus_event_unref(e);
    /* An event header may not take an envelope header's name. */
    assert_int_equal(bus_event_new(&e, "t.created", "x", 1), BUS_OK);
    assert_int_equal(bus_event_set_header(e, "ce_type", "spoof"), BUS_OK);
    assert_int_equal(bus_broker_publish(b, "pub.reserved", e, 0, NULL, NULL),
                     BUS_EINVAL);
    bus_event_unref(e);
    bus_broker_close(b);
}

/* ---- Record format
 * ------------------------------------------------------------ */

typedef struct seen_rec {
    char headers[2048];
    char key[64];
    char value[64];
    int n;
} seen_rec;

static void
capture_record(const rd_kafka_message_t *m, void *arg)
{
    seen_rec *s = arg;
    rd_kafka_headers_t *h;
    const char *name;
    const void *val;
    size_t sz, i, pos = 0;

    s->n++;
    snprintf(s->key, sizeof(s->key), "%.*s", (int)m->key_len,
             (const char *)m->key);
    snprintf(s->value, sizeof(s->value), "%.*s", (int)m->len,
             (const char *)m->payload);
    if (rd_kafka_message_headers(m, &h) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return;
    for (i = 0; rd_kafka_header_get_all(h, i, &name, &val, &sz) ==
                RD_KAFKA_RESP_ERR_NO_ERROR;
         i++)
        pos += (size_t)snprintf(s->headers + pos, sizeof(s->headers) - pos,
                                "%s=%.*s\n", name, (int)sz, (const char *)val);
}

static bus_event *
rich_event(void)
{
    static const bus_uuid id = {{0x01, 0x90, 0xc1, 0xa2, 0x00, 0x00, 0x70, 0x00,
                                 0x80, 0, 0, 0, 0, 0, 0, 0x42}};
    bus_header hs[] = {{BUS_H_CORRELATION_ID, "corr-1"},
                       {BUS_H_TRACEPARENT,
                        "00-0af7651916cd43dd8448eb211c80319c-"
                        "b7ad6b7169203331-01"},
                       {"x-tenant", "acme"}};
    bus_event_init in;
    bus_event *e;

    memset(&in, 0, sizeof(in));
    in.type = "orders.placed";
    in.schema_version = 3;
    in.stream = "order-17";
    in.stream_version = 5;
    in.payload = "{\"total\":42}";
    in.payload_len = strlen("{\"total\":42}");
    in.headers = hs;
    in.n_headers = 3;
    in.id = &id;
    in.timestamp_ns = 1767323045123456789LL; /* 2026-01-02T03:04:05.12..Z */
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    return e;
}

static void
test_record_format_is_cloudevents_binary_mode(void **state)
{
    bus_broker *b = kt_open(MOCK);
    seen_rec s;
    char topic[64];

    (void)state;
    memset(&s, 0, sizeof(s));
    kt_unique(topic, sizeof(topic), "fmt");
    assert_int_equal(bus_broker_publish(b, topic, rich_event(), 0, NULL, NULL),
                     BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(
        kt_raw_read(boot(), topic, 1, DEADLINE_MS, capture_record, &s), 1);
    assert_string_equal(s.key, "order-17");
    assert_string_equal(s.value, "{\"total\":42}");
    assert_non_null(strstr(s.headers, "ce_specversion=1.0\n"));
    assert_non_null(
        strstr(s.headers, "ce_id=0190c1a2-0000-7000-8000-000000000042\n"));
    assert_non_null(strstr(s.headers, "ce_type=orders.placed\n"));
    assert_non_null(strstr(s.headers, "ce_source=libbus\n"));
    assert_non_null(
        strstr(s.headers, "ce_time=2026-01-02T03:04:05.123456789Z\n"));
    assert_non_null(strstr(s.headers, "bus_schema_version=3\n"));
    assert_non_null(strstr(s.headers, "bus_stream=order-17\n"));
    assert_non_null(strstr(s.headers, "bus_stream_version=5\n"));
    assert_non_null(strstr(s.headers, "correlation-id=corr-1\n"));
    assert_non_null(strstr(s.headers, "traceparent=00-0af7651916cd43dd"));
    assert_non_null(strstr(s.headers, "x-tenant=acme\n"));
    bus_broker_close(b);
}

static void
test_round_trip_keeps_the_envelope(void **state)
{
    bus_broker *b = kt_open(MOCK);
    bus_event *orig = rich_event(), *got;
    char topic[64];
    kt_rec r;

    (void)state;
    kt_unique(topic, sizeof(topic), "rt");
    kt_rec_init(&r, b, KT_ACK_INLINE);
    kt_rec_sub(&r, topic, NULL);
    bus_event_ref(orig);
    assert_int_equal(bus_broker_publish(b, topic, orig, 0, NULL, NULL), BUS_OK);
    assert_true(kt_rec_wait(&r, 1, DEADLINE_MS));
    got = r.items[0].ev;
    assert_string_equal(r.items[0].topic, topic);
    assert_memory_equal(bus_event_id(got), bus_event_id(orig), 16);
    assert_string_equal(bus_event_type(got), "orders.placed");
    assert_int_equal(bus_event_schema_version(got), 3);
    assert_string_equal(bus_event_stream(got), "order-17");
    assert_int_equal(bus_event_stream_version(got), 5);
    assert_int_equal(bus_event_timestamp(got), bus_event_timestamp(orig));
    assert_int_equal(bus_event_payload_len(got), 12);
    assert_memory_equal(bus_event_payload(got), "{\"total\":42}", 12);
    assert_int_equal(bus_event_header_count(got), 3);
    assert_string_equal(bus_event_correlation_id(got), "corr-1");
    assert_string_equal(bus_event_header(got, "x-tenant"), "acme");
    assert_true(r.items[0].token != 0);
    bus__broker_unsubscribe(b, r.handle);
    bus_event_unref(orig);
    kt_rec_free(&r);
    bus_broker_close(b);
}

static void
test_foreign_records_are_accepted(void **state)
{
    bus_broker *b = kt_open(MOCK "?default.type=legacy.event");
    rd_kafka_t *p = kt_raw_producer(boot());
    rd_kafka_headers_t *h = rd_kafka_headers_new(2);
    char topic[64];
    kt_rec r1, r2;
    bus_event *e1, *e2, *e3;

    (void)state;
    kt_unique(topic, sizeof(topic), "foreign");
    kt_rec_init(&r1, b, KT_ACK_INLINE);
    kt_rec_sub(&r1, topic, NULL);
    /* No headers at all, a key. */
    assert_int_equal(rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic),
                                       RD_KAFKA_V_KEY("cust-9", 6),
                                       RD_KAFKA_V_VALUE("raw", 3),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                       RD_KAFKA_V_END),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    /* A type header, a binary header that an event cannot hold, and a
     * repeated header (the last one wins). */
    rd_kafka_header_add(h, "ce_type", -1, "shipped", -1);
    rd_kafka_header_add(h, "bin", -1, "\xff\x00\xfe", 3);
    rd_kafka_header_add(h, "dup", -1, "one", -1);
    rd_kafka_header_add(h, "dup", -1, "two", -1);
    rd_kafka_header_add(h, "ce_time", -1, "2020-05-06T07:08:09+02:00", -1);
    assert_int_equal(rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic),
                                       RD_KAFKA_V_VALUE("x", 1),
                                       RD_KAFKA_V_HEADERS(h),
                                       RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                       RD_KAFKA_V_END),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(rd_kafka_flush(p, DEADLINE_MS),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_true(kt_rec_wait(&r1, 2, DEADLINE_MS));
    /* Order across partitions is not defined: find them by payload. */
    e1 = r1.items[0].ev;
    e2 = r1.items[1].ev;
    if (bus_event_payload_len(e1) != 3) {
        bus_event *t = e1;
        e1 = e2;
        e2 = t;
    }
    assert_string_equal(bus_event_type(e1), "legacy.event");
    assert_string_equal(bus_event_stream(e1), "cust-9");
    assert_int_equal(bus_event_header_count(e1), 0);
    assert_false(bus_uuid_is_nil(bus_event_id(e1)));
    assert_string_equal(bus_event_type(e2), "shipped");
    assert_null(bus_event_stream(e2));
    assert_null(bus_event_header(e2, "bin"));
    assert_string_equal(bus_event_header(e2, "dup"), "two");
    assert_int_equal(bus_event_timestamp(e2), 1588741689000000000LL);

    /* The derived id is a function of the record: read again, same id. */
    {
        bus_broker *b2 = kt_open(MOCK "?start=earliest");
        size_t i;
        kt_rec_init(&r2, b2, KT_ACK_INLINE);
        kt_rec_sub(&r2, topic, NULL);
        assert_true(kt_rec_wait(&r2, 2, DEADLINE_MS));
        for (i = 0; i < 2; i++) {
            e3 = r2.items[i].ev;
            if (bus_event_payload_len(e3) == 3)
                assert_memory_equal(bus_event_id(e3), bus_event_id(e1), 16);
        }
        bus__broker_unsubscribe(b2, r2.handle);
        kt_rec_free(&r2);
        bus_broker_close(b2);
    }
    rd_kafka_destroy(p);
    bus__broker_unsubscribe(b, r1.handle);
    kt_rec_free(&r1);
    bus_broker_close(b);
}

/* ---- Subscriptions
 * ------------------------------------------------------------- */

static void
test_groupless_subscription_starts_at_subscribe(void **state)
{
    bus_broker *b = kt_open(MOCK);
    char topic[64], pattern[80];
    kt_rec r, w;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "start");
    kt_publish(b, topic, "t.old", "s", "before");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    kt_rec_init(&r, b, KT_ACK_INLINE);
    kt_rec_sub(&r, topic, NULL);
    /* A wildcard subscription discovers topics created after it. */
    kt_rec_init(&w, b, KT_ACK_INLINE);
    snprintf(pattern, sizeof(pattern), "%s.*", topic);
    kt_rec_sub(&w, pattern, NULL);
    for (i = 0; i < 5; i++)
        kt_publish(b, topic, "t.new", "s", "after");
    {
        char sub[96];
        snprintf(sub, sizeof(sub), "%s.created", topic);
        kt_publish(b, sub, "t.new", NULL, "child");
    }
    assert_true(kt_rec_wait(&r, 5, DEADLINE_MS));
    assert_true(kt_rec_wait(&w, 1, DEADLINE_MS));
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    for (i = 0; i < 5; i++)
        assert_string_equal(bus_event_type(r.items[i].ev), "t.new");
    assert_string_equal(bus_event_type(w.items[0].ev), "t.new");
    bus__broker_unsubscribe(b, r.handle);
    bus__broker_unsubscribe(b, w.handle);
    assert_int_equal(kt_rec_count(&r), 5);
    kt_rec_free(&r);
    kt_rec_free(&w);
    bus_broker_close(b);
}

typedef struct commit_want {
    const char *group, *topic;
    int32_t partition;
    int64_t want;
} commit_want;

static int
commit_is(void *arg)
{
    commit_want *c = arg;

    return kt_committed(boot(), c->group, c->topic, c->partition) == c->want;
}

/* Finds item i's offset (token low bits). */
static int64_t
item_off(kt_rec *r, size_t i)
{
    return (int64_t)(r->items[i].token & ((UINT64_C(1) << 48) - 1));
}

static void
test_group_commits_only_the_finished_prefix(void **state)
{
    char topic[64], group[64], uri[256];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b;
    commit_want cw;
    kt_rec r;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "commit");
    kt_unique(group, sizeof(group), "g");
    /* One partition, so offsets are 0..9. */
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    snprintf(uri, sizeof(uri), MOCK "?" FAST);
    b = kt_open(uri);
    for (i = 0; i < 10; i++)
        kt_publish(b, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    kt_rec_init(&r, b, KT_KEEP);
    kt_rec_sub(&r, topic, group);
    assert_true(kt_rec_wait(&r, 10, DEADLINE_MS));
    for (i = 0; i < 10; i++)
        assert_int_equal(item_off(&r, i), (int64_t)i); /* in order */
    /* Finish everything but offset 4: the position stays at 4. */
    for (i = 0; i < 10; i++)
        if (i != 4)
            kt_rec_ack(&r, i, i == 7 ? BUS_REJECT : BUS_ACK);
    cw.group = group;
    cw.topic = topic;
    cw.partition = 0;
    cw.want = 4;
    assert_true(kt_wait(commit_is, &cw, DEADLINE_MS));
    kt_rec_ack(&r, 4, BUS_ACK);
    cw.want = 10;
    assert_true(kt_wait(commit_is, &cw, DEADLINE_MS));
    /* A late or repeated ack is harmless. */
    kt_rec_ack(&r, 4, BUS_ACK);
    bus__broker_unsubscribe(b, r.handle);
    kt_rec_free(&r);
    bus_broker_close(b);
}

static int
redelivered_is_one(void *arg)
{
    bus_broker_kafka_stats st;

    bus_broker_kafka_stats_get(arg, &st);
    return st.redelivered >= 1;
}

/* Three records on a new one-partition topic (name from base; topic and
 * group get 64 bytes), taken and held (KT_KEEP) by r in a new group. */
static void
three_records_taken(bus_broker *b, const char *base, char *topic, char *group,
                    kt_rec *r)
{
    size_t i;

    kt_unique(topic, 64, base);
    kt_unique(group, 64, "g");
    assert_int_equal(rd_kafka_mock_topic_create(mock_cluster(), topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    for (i = 0; i < 3; i++)
        kt_publish(b, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    kt_rec_init(r, b, KT_KEEP);
    kt_rec_sub(r, topic, group);
    assert_true(kt_rec_wait(r, 3, DEADLINE_MS));
}

static void
test_retry_redelivers_and_unsubscribe_commits(void **state)
{
    char topic[64], group[64];
    bus_broker *b = kt_open(MOCK "?redelivery.backoff.ms=10&" FAST);
    bus_broker_kafka_stats st;
    kt_rec r;

    (void)state;
    three_records_taken(b, "retry", topic, group, &r);
    kt_rec_ack(&r, 0, BUS_ACK);
    kt_rec_ack(&r, 1, BUS_RETRY); /* redelivered: same event, same token */
    kt_rec_ack(&r, 2, BUS_ACK);
    assert_true(kt_rec_wait(&r, 4, DEADLINE_MS));
    assert_int_equal(r.items[3].token, r.items[1].token);
    assert_memory_equal(bus_event_id(r.items[3].ev),
                        bus_event_id(r.items[1].ev), 16);
    /* The consumer counts a redelivery once the call that made it has
     * returned, just after the recorder counted the event. */
    assert_true(kt_wait(redelivered_is_one, b, DEADLINE_MS));
    assert_int_equal(bus_broker_kafka_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.redelivered, 1);
    kt_rec_ack(&r, 3, BUS_ACK);
    /* Unsubscribe commits the finished prefix: all 3. */
    bus__broker_unsubscribe(b, r.handle);
    assert_int_equal(kt_committed(boot(), group, topic, 0), 3);
    kt_rec_free(&r);
    bus_broker_close(b);
}

/* topic.prefix maps bus topics to Kafka topics and back; the URI's group
 * is the group of a subscription made without one. */
static void
test_topic_prefix_and_the_uris_group(void **state)
{
    char topic[64], group[64], ktopic[96], uri[256];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b, *b2;
    commit_want cw;
    kt_rec r, r2;

    (void)state;
    kt_unique(topic, sizeof(topic), "pfx");
    kt_unique(group, sizeof(group), "g");
    snprintf(ktopic, sizeof(ktopic), "app1.%s", topic);
    assert_int_equal(rd_kafka_mock_topic_create(mc, ktopic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    snprintf(uri, sizeof(uri), MOCK "?topic.prefix=app1.&group=%s&" FAST,
             group);
    b = kt_open(uri);
    kt_publish(b, topic, "t.x", "s", "p");
    kt_publish(b, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    kt_rec_init(&r, b, KT_KEEP);
    kt_rec_sub(&r, topic, NULL);
    assert_true(kt_rec_wait(&r, 2, DEADLINE_MS));
    assert_string_equal(r.items[0].topic, topic); /* the prefix stripped */
    kt_rec_ack(&r, 0, BUS_ACK);
    kt_rec_ack(&r, 1, BUS_ACK);
    cw.group = group; /* committed under the URI's group */
    cw.topic = ktopic;
    cw.partition = 0;
    cw.want = 2;
    assert_true(kt_wait(commit_is, &cw, DEADLINE_MS));
    /* Without the prefix, the records are on the prefixed Kafka topic. */
    b2 = kt_open(MOCK "?start=earliest");
    kt_rec_init(&r2, b2, KT_ACK_INLINE);
    kt_rec_sub(&r2, ktopic, NULL);
    assert_true(kt_rec_wait(&r2, 2, DEADLINE_MS));
    assert_string_equal(r2.items[0].topic, ktopic);
    bus__broker_unsubscribe(b2, r2.handle);
    kt_rec_free(&r2);
    bus_broker_close(b2);
    bus__broker_unsubscribe(b, r.handle);
    kt_rec_free(&r);
    bus_broker_close(b);
}

static int
skipped_is_one(void *arg)
{
    bus_broker_kafka_stats st;

    bus_broker_kafka_stats_get(arg, &st);
    return st.skipped >= 1;
}

/* A poison record (its handler asks for a retry every time) does not
 * hold its partition: after redelivery.max redeliveries it is skipped,
 * counted, and the commit position passes it. */
static void
test_poison_record_is_skipped_after_redelivery_max(void **state)
{
    char topic[64], group[64];
    bus_broker *b = kt_open(MOCK "?redelivery.backoff.ms=10"
                                 "&redelivery.max=2&" FAST);
    bus_broker_kafka_stats st;
    kt_rec r;

    (void)state;
    three_records_taken(b, "poison", topic, group, &r);
    kt_rec_ack(&r, 0, BUS_ACK);
    kt_rec_ack(&r, 2, BUS_ACK);
    kt_rec_ack(&r, 1, BUS_RETRY);
    assert_true(kt_rec_wait(&r, 4, DEADLINE_MS)); /* redelivery 1 */
    assert_int_equal(r.items[3].token, r.items[1].token);
    kt_rec_ack(&r, 3, BUS_RETRY);
    assert_true(kt_rec_wait(&r, 5, DEADLINE_MS)); /* redelivery 2 */
    assert_int_equal(r.items[4].token, r.items[1].token);
    kt_rec_ack(&r, 4, BUS_RETRY); /* the last one allowed: skipped */
    assert_true(kt_wait(skipped_is_one, b, DEADLINE_MS));
    assert_int_equal(bus_broker_kafka_stats_get(b, &st), BUS_OK);
    assert_int_equal(st.skipped, 1);
    assert_int_equal(st.redelivered, 2);
    /* The position passed the skipped record. */
    bus__broker_unsubscribe(b, r.handle);
    assert_int_equal(kt_committed(boot(), group, topic, 0), 3);
    assert_int_equal(r.n, 5); /* never delivered again */
    kt_rec_free(&r);
    bus_broker_close(b);
}

static int
pauses_at_least_one(void *arg)
{
    bus_broker_kafka_stats st;

    bus_broker_kafka_stats_get(arg, &st);
    return st.pauses >= 1;
}

static void
test_refused_deliveries_pause_and_lose_nothing(void **state)
{
    char topic[64];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b = kt_open(MOCK);
    bus_broker_kafka_stats st;
    kt_rec r;
    size_t i;
    char payload[16];

    (void)state;
    kt_unique(topic, sizeof(topic), "refuse");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    kt_rec_init(&r, b, KT_ACK_INLINE);
    kt_rec_sub(&r, topic, NULL);
    /* A queue that stays full: after a brief retry the partition is
     * paused, the record kept. */
    atomic_store(&r.refuse, 1 << 30);
    for (i = 0; i < 200; i++) {
        snprintf(payload, sizeof(payload), "%zu", i);
        kt_publish(b, topic, "t.x", "s", payload);
    }
    assert_true(kt_wait(pauses_at_least_one, b, DEADLINE_MS));
    assert_int_equal(kt_rec_count(&r), 0);
    atomic_store(&r.refuse, 0); /* the queue drains */
    assert_true(kt_rec_wait(&r, 200, DEADLINE_MS));
    for (i = 0; i < 200; i++) {
        snprintf(payload, sizeof(payload), "%zu", i);
        assert_int_equal(bus_event_payload_len(r.items[i].ev), strlen(payload));
        assert_memory_equal(bus_event_payload(r.items[i].ev), payload,
                            strlen(payload));
    }
    assert_int_equal(bus_broker_kafka_stats_get(b, &st), BUS_OK);
    assert_true(st.refused >= 1);
    bus__broker_unsubscribe(b, r.handle);
    assert_int_equal(kt_rec_count(&r), 200);
    kt_rec_free(&r);
    bus_broker_close(b);
}

/* Records fetched together are handed over as a run (one lock round per
 * record, inline acks applied after each call): a refusal in the middle
 * of a run holds that record and drops the rest of the run for a refetch,
 * and inline acks still move the commit position. Nothing is lost or
 * repeated, order is kept. */
static void
test_refusal_in_the_middle_of_a_run(void **state)
{
    char topic[64], group[64], uri[256];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker_kafka_stats st;
    commit_want cw;
    bus_broker *b;
    kt_rec r;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "run");
    kt_unique(group, sizeof(group), "g");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    snprintf(uri, sizeof(uri), MOCK "?" FAST);
    b = kt_open(uri);
    /* Published before the subscription: fetched in large batches. */
    for (i = 0; i < 500; i++) {
        char payload[16];
        snprintf(payload, sizeof(payload), "%zu", i);
        kt_publish(b, topic, "t.x", "s", payload);
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    kt_rec_init(&r, b, KT_ACK_INLINE);
    atomic_store(&r.refuse_from_call, 150);
    kt_rec_sub(&r, topic, group);
    assert_true(kt_wait(pauses_at_least_one, b, DEADLINE_MS));
    assert_int_equal(kt_rec_count(&r), 149);
    atomic_store(&r.refuse, 0);
    assert_true(kt_rec_wait(&r, 500, DEADLINE_MS));
    for (i = 0; i < 500; i++)
        assert_int_equal(item_off(&r, i), (int64_t)i);
    cw.group = group;
    cw.topic = topic;
    cw.partition = 0;
    cw.want = 500;
    assert_true(kt_wait(commit_is, &cw, DEADLINE_MS));
    assert_int_equal(bus_broker_kafka_stats_get(b, &st), BUS_OK);
    assert_true(st.refused >= 1);
    assert_int_equal(st.delivered, 500);
    bus__broker_unsubscribe(b, r.handle);
    assert_int_equal(kt_rec_count(&r), 500);
    kt_rec_free(&r);
    bus_broker_close(b);
}

static void
test_max_inflight_bounds_unfinished_deliveries(void **state)
{
    char topic[64];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b = kt_open(MOCK "?max.inflight=4");
    kt_rec r;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "window");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    kt_rec_init(&r, b, KT_KEEP);
    kt_rec_sub(&r, topic, NULL);
    for (i = 0; i < 10; i++)
        kt_publish(b, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_true(kt_rec_wait(&r, 4, DEADLINE_MS));
    /* The fifth is held (paused) until an ack makes room. */
    assert_true(kt_wait(pauses_at_least_one, b, DEADLINE_MS));
    assert_int_equal(kt_rec_count(&r), 4);
    kt_rec_ack(&r, 1, BUS_ACK); /* not the head: still no room */
    assert_int_equal(kt_rec_count(&r), 4);
    kt_rec_ack(&r, 0, BUS_ACK); /* head and 1 finish: two slots */
    assert_true(kt_rec_wait(&r, 6, DEADLINE_MS));
    for (i = 2; i < 10; i++) {
        kt_rec_ack(&r, i, BUS_ACK);
        assert_true(kt_rec_wait(&r, i + 5 > 10 ? 10 : i + 5, DEADLINE_MS));
    }
    for (i = 0; i < 10; i++)
        assert_int_equal(item_off(&r, i), (int64_t)i);
    bus__broker_unsubscribe(b, r.handle);
    kt_rec_free(&r);
    bus_broker_close(b);
}

static void
test_unsubscribe_from_inside_a_delivery(void **state)
{
    char topic[64];
    bus_broker *b = kt_open(MOCK);
    kt_rec r;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "selfunsub");
    kt_rec_init(&r, b, KT_ACK_INLINE);
    atomic_store(&r.unsubscribe_in_call, 2);
    kt_rec_sub(&r, topic, NULL);
    for (i = 0; i < 10; i++)
        kt_publish(b, topic, "t.x", "s", "p");
    assert_true(kt_rec_wait(&r, 2, DEADLINE_MS));
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    /* The call that unsubscribed was the last one. */
    assert_int_equal(kt_rec_count(&r), 2);
    /* An ack for the gone subscription is ignored. */
    kt_rec_ack(&r, 0, BUS_ACK);
    bus_broker_close(b); /* joins the subscription's thread */
    assert_int_equal(kt_rec_count(&r), 2);
    kt_rec_free(&r);
}

/* The same, overtaken by a close: close takes every subscription out of
 * the registry before it joins the consumers, so the unsubscribe finds
 * the handle gone; still no call starts after it (the consumer thread
 * went on with the rest of the run). The handler sleeps in the call
 * before unsubscribing so that the close gets there first. */
static void
test_unsubscribe_from_inside_a_delivery_during_close(void **state)
{
    char topic[64];
    bus_broker *b = kt_open(MOCK);
    kt_rec r;
    size_t i;

    (void)state;
    kt_unique(topic, sizeof(topic), "selfunsubclose");
    kt_rec_init(&r, b, KT_ACK_INLINE);
    atomic_store(&r.unsubscribe_in_call, 2);
    atomic_store(&r.unsubscribe_after_ms, 300);
    kt_rec_sub(&r, topic, NULL);
    for (i = 0; i < 10; i++)
        kt_publish(b, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_true(kt_rec_wait(&r, 2, DEADLINE_MS));
    bus_broker_close(b); /* meanwhile call 2 sleeps, then unsubscribes */
    assert_int_equal(kt_rec_count(&r), 2);
    kt_rec_free(&r);
}

/* ---- Errors, backpressure, health, close --------------------------------- */

static void
test_delivery_errors_are_mapped(void **state)
{
    char topic[64];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b = kt_open(MOCK);
    acks a = {0};
    bus_event *e;

    (void)state;
    kt_unique(topic, sizeof(topic), "errmap");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    /* Warm up: metadata and the producer id are in place. */
    kt_publish(b, topic, "t.x", NULL, "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    /* Retriable errors are retried inside: the ack is a success. */
    rd_kafka_mock_push_request_errors(
        mc, 0 /* Produce */, 3, RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION);
    e = mk_event("t.x", NULL, "p");
    assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a), BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.failed), 0);
    assert_int_equal(atomic_load(&a.ok), 1);
    /* Permanent errors nack with the mapped, non-retriable code. */
    rd_kafka_mock_push_request_errors(mc, 0, 1,
                                      RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE);
    e = mk_event("t.x", NULL, "p");
    assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a), BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.failed), 1);
    assert_int_equal(atomic_load(&a.last_err), BUS_ETOOBIG);
    assert_false(bus_err_retriable(BUS_ETOOBIG));
    rd_kafka_mock_push_request_errors(
        mc, 0, 1, RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED);
    e = mk_event("t.x", NULL, "p");
    assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a), BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.failed), 2);
    assert_int_equal(atomic_load(&a.last_err), BUS_EACCESS);
    assert_false(bus_err_retriable(BUS_EACCESS));
    bus_broker_close(b);

    /* A retriable failure that outlasts the delivery timeout: the nack
     * says it may be tried again. */
    b = kt_open(MOCK "?kafka.producer.message.timeout.ms=300");
    kt_publish(b, topic, "t.x", NULL, "p");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, topic, 0, -1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    memset(&a, 0, sizeof(a));
    e = mk_event("t.x", NULL, "p");
    assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a), BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.failed), 1);
    assert_int_equal(atomic_load(&a.last_err), BUS_ETIMEDOUT);
    assert_true(bus_err_retriable(BUS_ETIMEDOUT));
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, topic, 0, 1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    bus_broker_close(b);
}

static void
test_map_err_table(void **state)
{
    (void)state;
    /* Retriable librdkafka errors map to retriable codes. */
    assert_true(bus_err_retriable(BUS_EUNAVAIL));
    assert_true(bus_err_retriable(BUS_ETIMEDOUT));
    assert_true(bus_err_retriable(BUS_EAGAIN));
}

static void
test_full_queue_follows_the_policy(void **state)
{
    char topic[64], uri[256];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b;
    bus_event *e;
    acks a = {0};
    uint64_t t0;
    int i, rv;

    (void)state;
    kt_unique(topic, sizeof(topic), "qfull");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    snprintf(uri, sizeof(uri),
             MOCK "?kafka.producer.queue.buffering.max.messages=2&"
                  "publish.timeout.ms=200&close.timeout.ms=100");
    b = kt_open(uri);
    kt_publish(b, topic, "t.x", NULL, "warm");
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    /* Leader-less partition: records wait in the queue. */
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, topic, 0, -1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    for (i = 0; i < 2; i++) {
        e = mk_event("t.x", NULL, "p");
        assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a),
                         BUS_OK);
    }
    e = mk_event("t.x", NULL, "p");
    assert_int_equal(
        bus_broker_publish(b, topic, e, BUS_PUB_NONBLOCK, ack_fn, &a),
        BUS_EAGAIN);
    t0 = bt_now_ns();
    rv = bus_broker_publish(b, topic, e, 0, ack_fn, &a); /* BLOCK: 200 ms */
    assert_int_equal(rv, BUS_EAGAIN);
    assert_true(bt_now_ns() - t0 >= 150000000ull);
    assert_int_equal(bus_event_refcount(e), 1);
    bus_event_unref(e);
    /* Close cancels what Kafka never got: every ack still runs once. */
    bus_broker_close(b);
    assert_int_equal(atomic_load(&a.failed), 2);
    assert_int_equal(atomic_load(&a.last_err), BUS_ECANCELED);

    /* publish.backpressure=fail: a full queue refuses at once, however
     * long publish.timeout.ms is. */
    snprintf(uri, sizeof(uri),
             MOCK "?kafka.producer.queue.buffering.max.messages=2&"
                  "publish.backpressure=fail&publish.timeout.ms=60000&"
                  "close.timeout.ms=100");
    b = kt_open(uri);
    memset(&a, 0, sizeof(a));
    for (i = 0; i < 2; i++) {
        e = mk_event("t.x", NULL, "p");
        assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a),
                         BUS_OK);
    }
    e = mk_event("t.x", NULL, "p");
    t0 = bt_now_ns();
    assert_int_equal(bus_broker_publish(b, topic, e, 0, ack_fn, &a),
                     BUS_EAGAIN);
    assert_true(bt_now_ns() - t0 < 30000000000ull);
    assert_int_equal(bus_event_refcount(e), 1);
    bus_event_unref(e);
    bus_broker_close(b);
    assert_int_equal(atomic_load(&a.failed), 2);
    assert_int_equal(rd_kafka_mock_partition_set_leader(mc, topic, 0, 1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
}

static int
health_is(void *arg)
{
    void **a = arg;
    char msg[128];

    return bus_broker_health(a[0], msg, sizeof(msg)) == *(int *)a[1];
}

static void
test_health_follows_the_cluster(void **state)
{
    bus_broker *b = kt_open(MOCK "?publish.timeout.ms=0");
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    int want;
    void *arg[2] = {b, &want};
    char msg[128];

    (void)state;
    assert_int_equal(bus_broker_health(b, msg, sizeof(msg)), BUS_OK);
    assert_int_equal(rd_kafka_mock_broker_set_down(mc, -1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    want = BUS_EUNAVAIL;
    assert_true(kt_wait(health_is, arg, DEADLINE_MS));
    assert_int_equal(rd_kafka_mock_broker_set_up(mc, -1),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    want = BUS_OK;
    assert_true(kt_wait(health_is, arg, DEADLINE_MS));
    bus_broker_close_async(b);
    assert_int_equal(bus_broker_health(b, msg, sizeof(msg)), BUS_ECLOSED);
    bus_broker_close(b);
}

static void
test_close_twice_and_publish_after_close(void **state)
{
    bus_broker *b = kt_open(MOCK);
    bus_event *e = mk_event("t.x", NULL, "p");
    kt_rec r;

    (void)state;
    kt_rec_init(&r, b, KT_ACK_INLINE);
    kt_rec_sub(&r, "close.twice", NULL);
    bus_broker_close_async(b);
    bus_broker_close_async(b);
    assert_int_equal(bus_broker_publish(b, "close.twice", e, 0, NULL, NULL),
                     BUS_ECLOSED);
    assert_int_equal(bus_event_refcount(e), 1);
    bus_event_unref(e);
    bus_broker_close(b); /* stops the subscription left open */
    kt_rec_free(&r);
}

/* ---- The bus context on top
 * --------------------------------------------------- */

typedef struct handled {
    _Atomic int n;
    _Atomic int retried_once;
} handled;

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    handled *h = opaque;

    (void)d;
    atomic_fetch_add(&h->n, 1);
    return BUS_ACK;
}

static bus_result
retry_once_handler(bus_delivery *d, void *opaque)
{
    handled *h = opaque;

    (void)d;
    if (atomic_exchange(&h->retried_once, 1) == 0)
        return BUS_RETRY;
    atomic_fetch_add(&h->n, 1);
    return BUS_ACK;
}

static int
handled_n(void *arg)
{
    void **a = arg;

    return atomic_load(&((handled *)a[0])->n) >= *(int *)a[1];
}

static void
test_bus_context_end_to_end(void **state)
{
    bus_broker *b = kt_open(MOCK "?redelivery.backoff.ms=5");
    bus_ctx *ctx;
    bus_sub_config sc;
    handled inl = {0}, queued = {0}, grp = {0};
    char topic[64], group[64], pat[80];
    int want = 20;
    void *a1[2] = {&inl, &want}, *a2[2] = {&queued, &want},
         *a3[2] = {&grp, &want};
    int i;

    (void)state;
    kt_unique(topic, sizeof(topic), "ctx");
    kt_unique(group, sizeof(group), "g");
    snprintf(pat, sizeof(pat), "%s.*", topic);
    assert_int_equal(bus_ctx_open(&ctx, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    bus_sub_config_init(&sc);
    sc.dispatch = BUS_DISPATCH_INLINE;
    assert_int_equal(bus_subscribe(ctx, pat, count_handler, &inl, &sc, NULL),
                     BUS_OK);
    assert_int_equal(
        bus_subscribe(ctx, pat, retry_once_handler, &queued, NULL, NULL),
        BUS_OK);
    bus_sub_config_init(&sc);
    sc.group = group;
    assert_int_equal(bus_subscribe(ctx, pat, count_handler, &grp, &sc, NULL),
                     BUS_OK);
    for (i = 0; i < 20; i++) {
        char t[96];
        bus_event *e = mk_event("t.x", i % 2 ? "s1" : "s2", "p");
        snprintf(t, sizeof(t), "%s.created", topic);
        assert_int_equal(bus_publish(ctx, t, e, 0), BUS_OK);
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    assert_true(kt_wait(handled_n, a1, DEADLINE_MS));
    assert_true(kt_wait(handled_n, a2, DEADLINE_MS));
    assert_true(kt_wait(handled_n, a3, DEADLINE_MS));
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    assert_int_equal(atomic_load(&inl.n), 20);
    assert_int_equal(atomic_load(&queued.n), 20);
}

/* What the rebalance callback of a broker logged, and when. */
typedef struct rebalance_log {
    _Atomic int revoked, assigned;
    _Atomic uint64_t assigned_ns; /* the last "assigned" line */
} rebalance_log;

static void
rebalance_log_fn(void *opaque, bus_log_level level, const char *subsys,
                 const char *msg)
{
    rebalance_log *l = opaque;

    (void)level;
    (void)subsys;
    if (strstr(msg, "partitions revoked") != NULL)
        atomic_fetch_add(&l->revoked, 1);
    if (strstr(msg, "partitions assigned") != NULL) {
        atomic_store(&l->assigned_ns, bt_now_ns());
        atomic_fetch_add(&l->assigned, 1);
    }
}

static int
revoked_once(void *arg)
{
    return atomic_load(&((rebalance_log *)arg)->revoked) >= 1;
}

static int
assigned_twice(void *arg)
{
    return atomic_load(&((rebalance_log *)arg)->assigned) >= 2;
}

/* A revoke waits for the records its partitions still have unfinished
 * (up to rebalance.timeout.ms): the member rejoins, and so gets its next
 * assignment, only after a slow handler finished them. (That it then
 * commits them cannot be seen on the mock cluster, which refuses commits
 * while a rebalance is in progress: see docs/brokers/kafka.md.) */
static void
test_revoke_waits_for_unfinished_records(void **state)
{
    char topic[64], group[64], uri[256];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker_config cfg;
    bus_broker *b1 = NULL, *b2;
    rebalance_log lg;
    kt_rec r1, r2;
    char err[256];
    uint64_t acked_ns;
    size_t i;

    (void)state;
    memset(&lg, 0, sizeof(lg));
    kt_unique(topic, sizeof(topic), "revoke");
    kt_unique(group, sizeof(group), "g");
    assert_int_equal(rd_kafka_mock_topic_create(mc, topic, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    snprintf(uri, sizeof(uri), MOCK "?rebalance.timeout.ms=30000&" FAST);
    bus_broker_config_init(&cfg);
    cfg.uri = uri;
    cfg.log.fn = rebalance_log_fn;
    cfg.log.opaque = &lg;
    cfg.log.level = BUS_LOG_INFO;
    assert_int_equal(bus_broker_open(&b1, &cfg, err, sizeof(err)), BUS_OK);
    for (i = 0; i < 4; i++)
        kt_publish(b1, topic, "t.x", "s", "p");
    assert_int_equal(bus_broker_flush(b1, DEADLINE_MS), BUS_OK);
    kt_rec_init(&r1, b1, KT_KEEP);
    kt_rec_sub(&r1, topic, group);
    assert_true(kt_rec_wait(&r1, 4, DEADLINE_MS)); /* held, unfinished */
    b2 = kt_open(uri);
    kt_rec_init(&r2, b2, KT_ACK_INLINE);
    kt_rec_sub(&r2, topic, group); /* joins: the partition is revoked */
    assert_true(kt_wait(revoked_once, &lg, DEADLINE_MS));
    /* A slow handler: longer than the mock takes to complete a rebalance
     * (session.timeout.ms - 1 s, 3.5 s here), so that a revoke that did
     * not wait would let the group move on before this ack. */
    bus__sleep_ns(5000000000ull);
    acked_ns = bt_now_ns();
    for (i = 0; i < 4; i++)
        kt_rec_ack(&r1, i, BUS_ACK);
    assert_true(kt_wait(assigned_twice, &lg, DEADLINE_MS));
    assert_true(atomic_load(&lg.assigned_ns) > acked_ns);
    bus__broker_unsubscribe(b2, r2.handle);
    bus__broker_unsubscribe(b1, r1.handle);
    for (i = 4; i < kt_rec_count(&r1); i++)
        kt_rec_ack(&r1, i, BUS_ACK);
    kt_rec_free(&r2);
    kt_rec_free(&r1);
    bus_broker_close(b2);
    bus_broker_close(b1);
}

typedef struct policy_seen {
    _Atomic int flaky_ok, flaky_attempts, poison_calls, dead;
    bus__mutex mtx;
    char dlq_topic[128], orig[128], attempts[16], code[16];
} policy_seen;

static bus_result
policy_handler(bus_delivery *d, void *opaque)
{
    policy_seen *p = opaque;
    const char *stream = bus_event_stream(bus_delivery_event(d));

    if (strcmp(stream, "poison") == 0) {
        atomic_fetch_add(&p->poison_calls, 1);
        bus_delivery_set_error(d, 77, "bad record");
        return BUS_RETRY;
    }
    if (bus_delivery_attempt(d) < 3)
        return BUS_RETRY;
    atomic_store(&p->flaky_attempts, (int)bus_delivery_attempt(d));
    atomic_fetch_add(&p->flaky_ok, 1);
    return BUS_ACK;
}

static bus_result
dlq_handler(bus_delivery *d, void *opaque)
{
    policy_seen *p = opaque;
    const bus_event *e = bus_delivery_event(d);
    const char *v;

    bus__mutex_lock(&p->mtx);
    snprintf(p->dlq_topic, sizeof(p->dlq_topic), "%s",
             bus_delivery_topic(d));
    v = bus_event_header(e, "dlq-original-topic");
    snprintf(p->orig, sizeof(p->orig), "%s", v ? v : "");
    v = bus_event_header(e, "dlq-attempts");
    snprintf(p->attempts, sizeof(p->attempts), "%s", v ? v : "");
    v = bus_event_header(e, "dlq-error-code");
    snprintf(p->code, sizeof(p->code), "%s", v ? v : "");
    bus__mutex_unlock(&p->mtx);
    atomic_fetch_add(&p->dead, 1);
    return BUS_ACK;
}

static int
policy_done(void *arg)
{
    policy_seen *p = arg;

    return atomic_load(&p->flaky_ok) == 1 && atomic_load(&p->dead) == 1;
}

/* The pipeline's failure policy over Kafka: deferred retries redeliver
 * from the bus's timer wheel while the offsets wait; a record that keeps
 * failing goes to its dead-letter topic, on Kafka too; both finish, so
 * the group's position passes both. */
static void
test_deferred_retries_and_dead_letters_over_kafka(void **state)
{
    char topic[64], group[64], t[96], dlq[128];
    rd_kafka_mock_cluster_t *mc = mock_cluster();
    bus_broker *b = kt_open(MOCK "?" FAST);
    bus_failure_policy fp;
    bus_sub_config sc;
    policy_seen ps;
    commit_want cw;
    bus_ctx *ctx;

    (void)state;
    memset(&ps, 0, sizeof(ps));
    bus__mutex_init(&ps.mtx);
    kt_unique(topic, sizeof(topic), "fp");
    kt_unique(group, sizeof(group), "g");
    snprintf(t, sizeof(t), "%s.created", topic);
    snprintf(dlq, sizeof(dlq), "%s.dlq", t);
    assert_int_equal(rd_kafka_mock_topic_create(mc, t, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(rd_kafka_mock_topic_create(mc, dlq, 1, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(bus_ctx_open(&ctx, NULL), BUS_OK);
    assert_int_equal(bus_ctx_attach(ctx, b, NULL), BUS_OK);
    bus_sub_config_init(&sc);
    sc.dispatch = BUS_DISPATCH_INLINE;
    assert_int_equal(bus_subscribe(ctx, dlq, dlq_handler, &ps, &sc, NULL),
                     BUS_OK);
    bus_failure_policy_init(&fp);
    fp.mode = BUS_RETRY_DEFERRED;
    fp.retry.backoff = BUS_BACKOFF_FIXED;
    fp.retry.jitter = BUS_JITTER_NONE;
    fp.retry.initial_ms = 20;
    fp.retry.max_attempts = 3;
    bus_sub_config_init(&sc);
    sc.group = group;
    sc.policy = &fp;
    assert_int_equal(bus_subscribe(ctx, t, policy_handler, &ps, &sc, NULL),
                     BUS_OK);
    assert_int_equal(bus_publish(ctx, t, mk_event("t.x", "flaky", "p"), 0),
                     BUS_OK);
    assert_int_equal(bus_publish(ctx, t, mk_event("t.x", "poison", "p"), 0),
                     BUS_OK);
    assert_true(kt_wait(policy_done, &ps, DEADLINE_MS));
    assert_int_equal(atomic_load(&ps.flaky_attempts), 3);
    assert_int_equal(atomic_load(&ps.poison_calls), 3);
    bus__mutex_lock(&ps.mtx);
    assert_string_equal(ps.dlq_topic, dlq);
    assert_string_equal(ps.orig, t);
    assert_string_equal(ps.attempts, "3");
    assert_string_equal(ps.code, "77");
    bus__mutex_unlock(&ps.mtx);
    {
        /* The dead letter is a record on Kafka, not a local hand-over. */
        rd_kafka_t *rk = kt_raw_consumer(boot(), NULL);
        int64_t lo = -1, hi = -1;
        assert_int_equal(rd_kafka_query_watermark_offsets(rk, dlq, 0, &lo, &hi,
                                                          DEADLINE_MS),
                         RD_KAFKA_RESP_ERR_NO_ERROR);
        assert_int_equal(hi - lo, 1);
        rd_kafka_destroy(rk);
    }
    /* Both records finished (handled, dead-lettered): committed past. */
    cw.group = group;
    cw.topic = t;
    cw.partition = 0;
    cw.want = 2;
    assert_true(kt_wait(commit_is, &cw, DEADLINE_MS));
    assert_int_equal(bus_ctx_close(ctx), 0);
    bus_broker_close(b);
    bus__mutex_fini(&ps.mtx);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_rejects_bad_options),
        cmocka_unit_test(test_producer_defaults_and_overrides_take_effect),
        cmocka_unit_test(test_open_fails_fast_on_unreachable_cluster),
        cmocka_unit_test(test_secrets_never_reach_logs_or_errors),
        cmocka_unit_test(test_publish_acks_come_from_delivery_reports),
        cmocka_unit_test(test_publish_refuses_what_kafka_cannot_name),
        cmocka_unit_test(test_record_format_is_cloudevents_binary_mode),
        cmocka_unit_test(test_round_trip_keeps_the_envelope),
        cmocka_unit_test(test_foreign_records_are_accepted),
        cmocka_unit_test(test_groupless_subscription_starts_at_subscribe),
        cmocka_unit_test(test_group_commits_only_the_finished_prefix),
        cmocka_unit_test(test_retry_redelivers_and_unsubscribe_commits),
        cmocka_unit_test(test_poison_record_is_skipped_after_redelivery_max),
        cmocka_unit_test(test_topic_prefix_and_the_uris_group),
        cmocka_unit_test(test_refused_deliveries_pause_and_lose_nothing),
        cmocka_unit_test(test_refusal_in_the_middle_of_a_run),
        cmocka_unit_test(test_max_inflight_bounds_unfinished_deliveries),
        cmocka_unit_test(test_unsubscribe_from_inside_a_delivery),
        cmocka_unit_test(test_unsubscribe_from_inside_a_delivery_during_close),
        cmocka_unit_test(test_delivery_errors_are_mapped),
        cmocka_unit_test(test_map_err_table),
        cmocka_unit_test(test_full_queue_follows_the_policy),
        cmocka_unit_test(test_health_follows_the_cluster),
        cmocka_unit_test(test_close_twice_and_publish_after_close),
        cmocka_unit_test(test_bus_context_end_to_end),
        cmocka_unit_test(test_deferred_retries_and_dead_letters_over_kafka),
        cmocka_unit_test(test_revoke_waits_for_unfinished_records),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
