/*
 * The Kafka broker against raw librdkafka, same configuration, same mock
 * cluster (librdkafka's, 3 brokers, in this process), same run.
 *
 * What each side does per event (keep them comparable when changing this):
 * - produce, ours: bus_event_create (type, stream, 100-byte payload), then
 *   bus_broker_publish: the CloudEvents headers are built (ce_specversion,
 *   ce_id, ce_type, ce_source, ce_time, bus_stream), the payload and key
 *   go to librdkafka without a copy; the broker counts the delivery
 *   reports (its "acked" statistic must reach n); flush at the end waits
 *   for every report (acks=all, idempotent). Also shown: with an ack
 *   callback per publish (it runs on the broker's poll thread).
 * - produce, raw: what an application writing the same records with
 *   librdkafka does: an id and an RFC 3339 time formatted, the same six
 *   headers, rd_kafka_producev with a copied 100-byte value and the key,
 *   rd_kafka_poll after each; a delivery report callback counts the acks
 *   (without one librdkafka skips delivery reports altogether, and the
 *   producer would not know what Kafka has); flush at the end. Also
 *   shown: raw with no headers at all (value and key only), for scale.
 * - consume, ours: a bus context with one inline subscription counting
 *   events (BUS_DISPATCH_INLINE: the handler runs on the broker's
 *   consumer thread, which is what a user after throughput picks for a
 *   cheap handler; BUS_BENCH_KAFKA_DISPATCH=queued measures the default,
 *   a bus worker behind a ring), on a group-less subscription from the
 *   beginning; each record becomes an event (headers parsed, payload
 *   copied), is tracked for acks, handed to the bus and acked by the
 *   handler. The output says which dispatch ran.
 * - consume, raw: a consumer that looks the topic up (as our subscribe
 *   does), is assigned the same partitions from the beginning, then
 *   rd_kafka_consumer_poll and rd_kafka_message_destroy. Also shown: raw
 *   that reads the envelope as any consumer of this format must
 *   (rd_kafka_message_headers, ce_type and ce_id looked up).
 * - latency: one event at a time, publish to handler (ours) and produce to
 *   poll (raw), time carried in the payload; p50/p99; linger.ms=0 on both
 *   sides for this one (the throughput runs use 5).
 *
 * Configuration shared by both sides (the producer's: idempotence,
 * acks=all, lz4, linger.ms=5, partitioner murmur2_random; the consumer's):
 * the mock holds an empty fetch for fetch.wait.max.ms even when records
 * arrive, and in librdkafka 2.0.2 a consumer stops fetching for a second
 * once queued.min.messages records are queued: fetch.wait.max.ms=10 and
 * queued.min.messages=1000000 (queued.max.messages.kbytes=1048576) are
 * set on both sides. Every topic gets the same partition leaders (the mock
 * would pick them at random, which moves throughput more than anything
 * measured here). Each figure is the best of ROUNDS rounds, ours and raw
 * interleaved (produce: ROUNDS + 2, it is the most sensitive to the load
 * of a shared machine). BUS_BENCH_SCALE scales the counts;
 * BUS_BENCH_KAFKA_ONLY=produce|consume|latency runs one part;
 * BUS_BENCH_KAFKA_SIDE=ours|raw|hdr|none runs one consumer side only (to
 * profile it: perf stat/record the whole run; "none" is the fill alone);
 * BUS_BENCH_VERBOSE=1 prints every round.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <bus/broker_kafka.h>

#include "bench.h"

#define ROUNDS 3
#define PAYLOAD 100
#define KEYS 64
#define PARTS 16
#define LAT_EVENTS 1000

static const char *const consumer_props[] = {"fetch.wait.max.ms",
                                             "10",
                                             "queued.min.messages",
                                             "1000000",
                                             "queued.max.messages.kbytes",
                                             "1048576",
                                             NULL};

static char boot[512];
static rd_kafka_mock_cluster_t *mock;
static char payload[PAYLOAD];

static void
quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

static void
sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static void
die(const char *what, const char *why)
{
    fprintf(stderr, "bench_kafka: %s: %s\n", what, why);
    exit(1);
}

static uint64_t raw_acked; /* by the delivery reports of produce_raw */

static void
raw_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
        raw_acked++;
}

static rd_kafka_conf_t *
raw_conf(bool producer, const char *linger)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char err[256];
    size_t i;
    static const char *const prod[] = {"enable.idempotence",
                                       "true",
                                       "acks",
                                       "all",
                                       "compression.codec",
                                       "lz4",
                                       "partitioner",
                                       "murmur2_random",
                                       NULL};

#define SET(k, v)                                                              \
    if (rd_kafka_conf_set(c, k, v, err, sizeof(err)) != RD_KAFKA_CONF_OK)      \
    die(k, err)
    SET("bootstrap.servers", boot);
    if (producer) {
        for (i = 0; prod[i] != NULL; i += 2)
            SET(prod[i], prod[i + 1]);
        SET("linger.ms", linger);
        rd_kafka_conf_set_dr_msg_cb(c, raw_dr);
    } else {
        for (i = 0; consumer_props[i] != NULL; i += 2)
            SET(consumer_props[i], consumer_props[i + 1]);
        SET("group.id", "bench-raw");
        SET("enable.auto.commit", "false");
        SET("enable.partition.eof", "false");
    }
#undef SET
    rd_kafka_conf_set_log_cb(c, quiet_log);
    return c;
}

static bus_broker *
open_ours(const char *linger, const char *extra)
{
    char uri[1024], err[256];
    bus_broker *b;
    size_t i;
    int n, rv;

    /* linger.ms=5 and lz4 are what kafka://mock and librdkafka default
     * to; spelled out so that both sides visibly match. */
    n = snprintf(uri, sizeof(uri),
                 "kafka://%s?kafka.producer.linger.ms=%s&compression=lz4%s",
                 boot, linger, extra);
    for (i = 0; consumer_props[i] != NULL; i += 2)
        n += snprintf(uri + n, sizeof(uri) - (size_t)n, "&kafka.consumer.%s=%s",
                      consumer_props[i], consumer_props[i + 1]);
    if (getenv("BUS_BENCH_KAFKA_URI_EXTRA") != NULL) /* for experiments */
        n += snprintf(uri + n, sizeof(uri) - (size_t)n, "%s",
                      getenv("BUS_BENCH_KAFKA_URI_EXTRA"));
    {
        /* BUS_BENCH_LOG=debug shows the broker's log (for a bench run
         * that looks wrong). */
        bus_broker_config cfg;
        const char *lv = getenv("BUS_BENCH_LOG");
        bus_broker_config_init(&cfg);
        cfg.uri = uri;
        if (lv != NULL && bus_log_level_parse(lv, &cfg.log.level) == BUS_OK)
            cfg.log.fn = bus_log_stderr;
        if ((rv = bus_broker_open(&b, &cfg, err, sizeof(err))) != BUS_OK)
            die(uri, err);
    }
    return b;
}

static void
new_topic(char *buf, size_t len, const char *base)
{
    static int seq;

    int p;

    snprintf(buf, len, "bench.%s.%d", base, ++seq);
    if (rd_kafka_mock_topic_create(mock, buf, PARTS, 3) !=
        RD_KAFKA_RESP_ERR_NO_ERROR)
        die("topic", buf);
    /* The mock picks leaders at random: spread them evenly, so that every
     * topic (ours and raw) has the same load on each mock broker. */
    for (p = 0; p < PARTS; p++)
        rd_kafka_mock_partition_set_leader(mock, buf, p, 1 + p % 3);
}

/* ---- Produce --------------------------------------------------------------
 */

static _Atomic uint64_t ours_acked;

static void
ours_ack(void *opaque, bus_event *ev, int err)
{
    (void)opaque;
    (void)ev;
    if (err == BUS_OK)
        atomic_fetch_add_explicit(&ours_acked, 1, memory_order_relaxed);
}

static double
produce_ours(uint64_t n, bool callback)
{
    bus_broker *b = open_ours("5", "");
    bus_broker_kafka_stats st;
    char topic[64], stream[16];
    uint64_t t0, i;
    int rv;

    new_topic(topic, sizeof(topic), "po");
    atomic_store(&ours_acked, 0);
    t0 = bench_now_ns();
    for (i = 0; i < n; i++) {
        bus_event_init in;
        bus_event *e;
        memset(&in, 0, sizeof(in));
        snprintf(stream, sizeof(stream), "key-%u", (unsigned)(i % KEYS));
        in.type = "bench.event";
        in.stream = stream;
        in.payload = payload;
        in.payload_len = PAYLOAD;
        if (bus_event_create(&e, &in) != BUS_OK)
            die("event", "create");
        while ((rv = bus_broker_publish(b, topic, e, 0,
                                        callback ? ours_ack : NULL, NULL)) ==
               BUS_EAGAIN)
            ;
        if (rv != BUS_OK)
            die("publish", bus_strerror(rv));
    }
    if (getenv("BUS_BENCH_VERBOSE") != NULL)
        printf("  ours: publish loop %.3f s\n",
               (double)(bench_now_ns() - t0) / 1e9);
    if (bus_broker_flush(b, 120000) != BUS_OK)
        die("flush", "timeout");
    t0 = bench_now_ns() - t0;
    bus_broker_kafka_stats_get(b, &st);
    if (st.acked != n || (callback && atomic_load(&ours_acked) != n))
        die("produce ours", "not every event was acked");
    bus_broker_close(b);
    return (double)n / ((double)t0 / 1e9) / 1e6;
}

/* The headers an application writing our record format would add. */
static rd_kafka_headers_t *
raw_headers(uint64_t i, const char *stream)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(8);
    char id[40], tbuf[48];
    struct timespec ts;
    struct tm tm;
    size_t n;

    snprintf(id, sizeof(id), "01900000-0000-7000-8000-%012llx",
             (unsigned long long)i);
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(tbuf, sizeof(tbuf), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(tbuf + n, sizeof(tbuf) - n, ".%09ldZ", ts.tv_nsec);
    rd_kafka_header_add(h, "ce_specversion", -1, "1.0", 3);
    rd_kafka_header_add(h, "ce_id", -1, id, -1);
    rd_kafka_header_add(h, "ce_type", -1, "bench.event", -1);
    rd_kafka_header_add(h, "ce_source", -1, "libbus", -1);
    rd_kafka_header_add(h, "ce_time", -1, tbuf, -1);
    rd_kafka_header_add(h, "bus_stream", -1, stream, -1);
    return h;
}

static double
produce_raw(uint64_t n, bool headers)
{
    rd_kafka_t *rk;
    char topic[64], stream[16], err[256];
    uint64_t t0, i;

    new_topic(topic, sizeof(topic), headers ? "pr" : "pm");
    raw_acked = 0;
    if ((rk = rd_kafka_new(RD_KAFKA_PRODUCER, raw_conf(true, "5"), err,
                           sizeof(err))) == NULL)
        die("producer", err);
    t0 = bench_now_ns();
    for (i = 0; i < n; i++) {
        rd_kafka_headers_t *h;
        rd_kafka_resp_err_t e;
        snprintf(stream, sizeof(stream), "key-%u", (unsigned)(i % KEYS));
        h = headers ? raw_headers(i, stream) : NULL;
        for (;;) {
            e = headers ? rd_kafka_producev(
                              rk, RD_KAFKA_V_TOPIC(topic),
                              RD_KAFKA_V_KEY(stream, strlen(stream)),
                              RD_KAFKA_V_VALUE(payload, PAYLOAD),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_END)
                        : rd_kafka_producev(
                              rk, RD_KAFKA_V_TOPIC(topic),
                              RD_KAFKA_V_KEY(stream, strlen(stream)),
                              RD_KAFKA_V_VALUE(payload, PAYLOAD),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_END);
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                break;
            rd_kafka_poll(rk, 1);
        }
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            die("produce", rd_kafka_err2str(e));
        rd_kafka_poll(rk, 0); /* serve reports as an application would */
    }
    if (rd_kafka_flush(rk, 120000) != RD_KAFKA_RESP_ERR_NO_ERROR)
        die("flush", "timeout");
    t0 = bench_now_ns() - t0;
    if (raw_acked != n)
        die("produce raw", "not every record was acked");
    rd_kafka_destroy(rk);
    return (double)n / ((double)t0 / 1e9) / 1e6;
}

/* ---- Consume --------------------------------------------------------------
 */

static char filled[64];

static void
fill_topic(uint64_t n)
{
    bus_broker *b = open_ours("5", "");
    char stream[16];
    uint64_t i;

    new_topic(filled, sizeof(filled), "c");
    for (i = 0; i < n; i++) {
        bus_event_init in;
        bus_event *e;
        memset(&in, 0, sizeof(in));
        snprintf(stream, sizeof(stream), "key-%u", (unsigned)(i % KEYS));
        in.type = "bench.event";
        in.stream = stream;
        in.payload = payload;
        in.payload_len = PAYLOAD;
        bus_event_create(&e, &in);
        while (bus_broker_publish(b, filled, e, 0, NULL, NULL) == BUS_EAGAIN)
            ;
    }
    if (bus_broker_flush(b, 120000) != BUS_OK)
        die("flush", "timeout");
    bus_broker_close(b);
}

typedef struct counter {
    _Atomic uint64_t n;
    uint64_t want;
    _Atomic uint64_t done_ns;
} counter;

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    counter *c = opaque;

    (void)d;
    if (atomic_fetch_add_explicit(&c->n, 1, memory_order_relaxed) + 1 ==
        c->want)
        atomic_store(&c->done_ns, bench_now_ns());
    return BUS_ACK;
}

/* INLINE (the handler on the broker's consumer thread) is what a
 * throughput-minded user picks for a cheap handler; BUS_BENCH_KAFKA_DISPATCH
 * =queued measures the default (a bus worker thread, through its ring). */
static bus_dispatch consume_dispatch = BUS_DISPATCH_INLINE;

static double
consume_ours(uint64_t n)
{
    bus_broker *b = open_ours("5", "&start=earliest");
    bus_sub_config sc;
    counter c;
    bus_ctx *ctx;
    uint64_t t0, deadline;

    memset(&c, 0, sizeof(c));
    c.want = n;
    if (bus_ctx_open(&ctx, NULL) != BUS_OK ||
        bus_ctx_attach(ctx, b, NULL) != BUS_OK)
        die("ctx", "open");
    bus_sub_config_init(&sc);
    sc.dispatch = consume_dispatch;
    t0 = bench_now_ns();
    if (bus_subscribe(ctx, filled, count_handler, &c, &sc, NULL) != BUS_OK)
        die("subscribe", filled);
    if (getenv("BUS_BENCH_VERBOSE") != NULL)
        printf("  ours: subscribed after %.3f s, %llu handled by then\n",
               (double)(bench_now_ns() - t0) / 1e9,
               (unsigned long long)atomic_load(&c.n));
    deadline = t0 + 120000000000ull;
    while (atomic_load(&c.done_ns) == 0 && bench_now_ns() < deadline)
        sleep_ms(1); /* a bench polls its counter */
    if (atomic_load(&c.done_ns) == 0)
        die("consume", "timeout");
    t0 = atomic_load(&c.done_ns) - t0;
    if (getenv("BUS_BENCH_VERBOSE") != NULL)
        printf("  ours: all handled after %.3f s\n", (double)t0 / 1e9);
    bus_ctx_close(ctx);
    bus_broker_close(b);
    return (double)n / ((double)t0 / 1e9) / 1e6;
}

static double
consume_raw(uint64_t n, bool headers)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(PARTS);
    char err[256];
    uint64_t got = 0, t0, deadline;
    rd_kafka_t *rk;
    int p;

    if ((rk = rd_kafka_new(RD_KAFKA_CONSUMER, raw_conf(false, "5"), err,
                           sizeof(err))) == NULL)
        die("consumer", err);
    rd_kafka_poll_set_consumer(rk);
    for (p = 0; p < PARTS; p++)
        rd_kafka_topic_partition_list_add(l, filled, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    t0 = bench_now_ns();
    {
        /* Look the topic up first, as our subscribe does (librdkafka would
         * otherwise find it only at its next 1 s topic scan). */
        const struct rd_kafka_metadata *md;
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, filled, NULL);
        if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) ==
            RD_KAFKA_RESP_ERR_NO_ERROR)
            rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
    }
    rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    deadline = t0 + 120000000000ull;
    while (got < n && bench_now_ns() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m == NULL)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            rd_kafka_headers_t *h;
            const void *v;
            size_t sz;
            got++;
            /* What an application reading our record format does at
             * least: the headers parsed, type and id looked up. */
            if (headers &&
                rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR &&
                rd_kafka_header_get_last(h, "ce_type", &v, &sz) ==
                    RD_KAFKA_RESP_ERR_NO_ERROR)
                (void)rd_kafka_header_get_last(h, "ce_id", &v, &sz);
        }
        rd_kafka_message_destroy(m);
    }
    t0 = bench_now_ns() - t0;
    if (got < n)
        die("consume raw", "timeout");
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return (double)n / ((double)t0 / 1e9) / 1e6;
}

/* ---- Latency --------------------------------------------------------------
 */

typedef struct lat {
    _Atomic uint64_t got;
    uint64_t *samples;
    uint64_t n;
} lat;

static bus_result
lat_handler(bus_delivery *d, void *opaque)
{
    lat *l = opaque;
    bus_event *e = bus_delivery_event(d);
    uint64_t sent, now = bench_now_ns(), i;

    memcpy(&sent, bus_event_payload(e), sizeof(sent));
    i = atomic_load_explicit(&l->got, memory_order_relaxed);
    if (i < l->n)
        l->samples[i] = now - sent;
    atomic_store_explicit(&l->got, i + 1, memory_order_release);
    return BUS_ACK;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static void
percentiles(uint64_t *s, uint64_t n, double *p50, double *p99)
{
    qsort(s, n, sizeof(*s), cmp_u64);
    *p50 = (double)s[n / 2] / 1e3;
    *p99 = (double)s[n * 99 / 100] / 1e3;
}

static void
latency_ours(uint64_t n, double *p50, double *p99)
{
    bus_broker *b = open_ours("0", "");
    bus_sub_config sc;
    char topic[64];
    bus_ctx *ctx;
    lat l;
    uint64_t i;

    new_topic(topic, sizeof(topic), "lo");
    memset(&l, 0, sizeof(l));
    l.n = n;
    l.samples = calloc(n, sizeof(*l.samples));
    if (bus_ctx_open(&ctx, NULL) != BUS_OK ||
        bus_ctx_attach(ctx, b, NULL) != BUS_OK)
        die("ctx", "open");
    bus_sub_config_init(&sc);
    sc.dispatch = BUS_DISPATCH_INLINE;
    if (bus_subscribe(ctx, topic, lat_handler, &l, &sc, NULL) != BUS_OK)
        die("subscribe", topic);
    for (i = 0; i < n; i++) {
        uint64_t t = bench_now_ns(), deadline = t + 10000000000ull;
        bus_event *e;
        memcpy(payload, &t, sizeof(t));
        bus_event_new(&e, "bench.latency", payload, PAYLOAD);
        if (bus_publish(ctx, topic, e, 0) != BUS_OK)
            die("publish", topic);
        while (atomic_load_explicit(&l.got, memory_order_acquire) <= i &&
               bench_now_ns() < deadline)
            ;
    }
    bus_ctx_close(ctx);
    bus_broker_close(b);
    percentiles(l.samples, n, p50, p99);
    free(l.samples);
}

static void
latency_raw(uint64_t n, double *p50, double *p99)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(PARTS);
    uint64_t *s = calloc(n, sizeof(*s)), i;
    char topic[64], err[256];
    rd_kafka_t *prod, *cons;
    int p;

    new_topic(topic, sizeof(topic), "lr");
    prod =
        rd_kafka_new(RD_KAFKA_PRODUCER, raw_conf(true, "0"), err, sizeof(err));
    cons =
        rd_kafka_new(RD_KAFKA_CONSUMER, raw_conf(false, "5"), err, sizeof(err));
    if (prod == NULL || cons == NULL)
        die("raw", err);
    rd_kafka_poll_set_consumer(cons);
    for (p = 0; p < PARTS; p++)
        rd_kafka_topic_partition_list_add(l, topic, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_assign(cons, l);
    rd_kafka_topic_partition_list_destroy(l);
    for (i = 0; i < n; i++) {
        uint64_t t = bench_now_ns();
        rd_kafka_message_t *m = NULL;
        memcpy(payload, &t, sizeof(t));
        rd_kafka_producev(
            prod, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_VALUE(payload, PAYLOAD),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_HEADERS(raw_headers(i, "k")), RD_KAFKA_V_END);
        rd_kafka_poll(prod, 0);
        while (m == NULL)
            m = rd_kafka_consumer_poll(cons, 10);
        memcpy(&t, m->payload, sizeof(t));
        s[i] = bench_now_ns() - t;
        rd_kafka_message_destroy(m);
    }
    rd_kafka_flush(prod, 10000);
    rd_kafka_consumer_close(cons);
    rd_kafka_destroy(cons);
    rd_kafka_destroy(prod);
    percentiles(s, n, p50, p99);
    free(s);
}

/* ---- Main
 * -------------------------------------------------------------------- */

static bool
want(const char *only, const char *phase)
{
    return only == NULL || strcmp(only, phase) == 0;
}

static double
max2(double a, double b)
{
    return a > b ? a : b;
}

int
main(void)
{
    uint64_t np = bench_iters(100000), nc = bench_iters(150000);
    uint64_t nl = bench_iters(LAT_EVENTS);
    double po = 0, pa = 0, pr = 0, pm = 0, co = 0, cr = 0, ch = 0;
    double o50, o99, r50, r99;
    bus_broker *owner;
    const char *only, *side = NULL;
    char err[256];
    int r;

    for (r = 0; r < PAYLOAD; r++)
        payload[r] = (char)(' ' + (r * 7919) % 90);
    /* The mock lives as long as this broker. */
    if (bus_broker_open_uri(&owner, "kafka://mock?mock.brokers=3", err,
                            sizeof(err)) != BUS_OK)
        die("mock", err);
    snprintf(boot, sizeof(boot), "%s", bus_broker_kafka_bootstrap(owner));
    mock = (rd_kafka_mock_cluster_t *)bus_broker_kafka_mock_cluster(owner);

    bench_header("kafka broker vs raw librdkafka (mock cluster, 3 brokers)");
    printf("config: acks=all, idempotence, lz4, linger.ms=5; consumers "
           "fetch.wait.max.ms=10, queued.min.messages=1000000 (mock: empty "
           "fetches held for fetch.wait.max.ms; 2.0.2 stops fetching for "
           "1 s at queued.min.messages); %d partitions, 100-byte payloads\n",
           PARTS);
    only = getenv("BUS_BENCH_KAFKA_ONLY"); /* produce|consume|latency */
    for (r = 0; r < ROUNDS + 2 && want(only, "produce"); r++) {
        double a = produce_ours(np, false), b = produce_raw(np, true);
        if (getenv("BUS_BENCH_VERBOSE") != NULL)
            printf("round %d: produce ours %.3f raw %.3f\n", r, a, b);
        po = max2(po, a);
        pr = max2(pr, b);
        pa = max2(pa, produce_ours(np, true));
        pm = max2(pm, produce_raw(np, false));
    }
    if (want(only, "produce")) {
        bench_row("produce 100-byte events, acked (vs raw, same headers)",
                  "M ev/s", po, pr, ">= 0.85x raw throughput", po >= 0.85 * pr);
        bench_row("  same, with an ack callback per publish", "M ev/s", pa, pr,
                  NULL, 0);
        bench_row("  same, vs raw without headers", "M ev/s", po, pm, NULL, 0);
    }

    if (getenv("BUS_BENCH_KAFKA_DISPATCH") != NULL &&
        strcmp(getenv("BUS_BENCH_KAFKA_DISPATCH"), "queued") == 0)
        consume_dispatch = BUS_DISPATCH_QUEUED;
    if (want(only, "consume")) {
        printf("consume: ours through a bus context, %s subscription\n",
               consume_dispatch == BUS_DISPATCH_INLINE
                   ? "inline (handler on the consumer thread)"
                   : "queued (handler on a bus worker)");
        fill_topic(nc);
    }
    /* BUS_BENCH_KAFKA_SIDE=ours|raw|hdr|none runs one consumer only (to
     * profile one side: perf stat/record the whole run, "none" for the
     * cost of the fill). */
    side = getenv("BUS_BENCH_KAFKA_SIDE");
    for (r = 0; r < ROUNDS && want(only, "consume"); r++) {
        if (side == NULL || strcmp(side, "ours") == 0)
            co = max2(co, consume_ours(nc));
        if (side == NULL || strcmp(side, "raw") == 0)
            cr = max2(cr, consume_raw(nc, false));
        if (side == NULL || strcmp(side, "hdr") == 0)
            ch = max2(ch, consume_raw(nc, true));
    }
    if (want(only, "consume") && side != NULL) {
        printf("consume (%s only): ours %.2f, raw poll %.2f, raw reading "
               "the headers %.2f M ev/s\n",
               side, co, cr, ch);
    } else if (want(only, "consume")) {
        bench_row("consume 100-byte events, handled+acked (vs raw poll)",
                  "M ev/s", co, cr, ">= 0.80x raw throughput", co >= 0.80 * cr);
        bench_row("  same, vs raw reading the headers", "M ev/s", co, ch, NULL,
                  0);
    }

    o50 = o99 = r50 = r99 = 0;
    if (want(only, "latency")) {
        latency_ours(nl, &o50, &o99);
        latency_raw(nl, &r50, &r99);
    }
    if (want(only, "latency")) {
        bench_row("end-to-end latency p50, linger.ms=0", "us", o50, r50, NULL,
                  0);
        bench_row("end-to-end latency p99, linger.ms=0", "us", o99, r99, NULL,
                  0);
    }
    bus_broker_close(owner);
    return 0;
}
