/* Kafka test helpers (kafka_test_util.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kafka_test_util.h"

/* BUS_KAFKA_TEST_LOG=debug|info|warn sends the brokers' logs to stderr
 * (for debugging a failing test). */
static void
kt_config(bus_broker_config *cfg, const char *uri)
{
    const char *lv = getenv("BUS_KAFKA_TEST_LOG");

    bus_broker_config_init(cfg);
    cfg->uri = uri;
    if (lv != NULL && bus_log_level_parse(lv, &cfg->log.level) == BUS_OK)
        cfg->log.fn = bus_log_stderr;
}

int
kt_open_err(const char *uri, char *errbuf, size_t len, bus_broker **out)
{
    bus_broker_config cfg;

    kt_config(&cfg, uri);
    return bus_broker_open(out, &cfg, errbuf, len);
}

bus_broker *
kt_open(const char *uri)
{
    char err[512];
    bus_broker *b = NULL;
    bus_broker_config cfg;
    int rv;

    kt_config(&cfg, uri);
    rv = bus_broker_open(&b, &cfg, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

void
kt_rec_init(kt_rec *r, bus_broker *b, kt_mode mode)
{
    memset(r, 0, sizeof(*r));
    bus__mutex_init(&r->mtx);
    r->items = calloc(KT_REC_MAX, sizeof(kt_item));
    assert_non_null(r->items);
    r->mode = mode;
    r->b = b;
    r->keep_events = true;
    r->inline_result = BUS_ACK;
}

void
kt_rec_free(kt_rec *r)
{
    size_t i;

    for (i = 0; i < r->n; i++)
        bus_event_unref(r->items[i].ev);
    free(r->items);
    bus__mutex_fini(&r->mtx);
}

int
kt_rec_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
               unsigned flags)
{
    kt_rec *r = opaque;
    int calls = atomic_fetch_add(&r->calls, 1) + 1;
    kt_item *it;

    (void)flags;
    if (atomic_load(&r->refuse_from_call) == calls)
        atomic_store(&r->refuse, 1 << 30);
    if (atomic_load(&r->refuse) > 0) {
        atomic_fetch_sub(&r->refuse, 1);
        atomic_fetch_add(&r->refused, 1);
        return BUS_EAGAIN; /* the reference stays with the broker */
    }
    bus__mutex_lock(&r->mtx);
    if (r->n == KT_REC_MAX) {
        bus__mutex_unlock(&r->mtx);
        return BUS_EAGAIN;
    }
    it = &r->items[r->n];
    it->ev = r->keep_events ? ev : NULL;
    it->token = token;
    snprintf(it->topic, sizeof(it->topic), "%s", topic);
    r->n++;
    bus__mutex_unlock(&r->mtx);
    if (!r->keep_events)
        bus_event_unref(ev);
    if (r->mode == KT_ACK_INLINE)
        bus__broker_ack(r->b, r->handle, token, r->inline_result);
    if (atomic_load(&r->unsubscribe_in_call) == calls) {
        int ms = atomic_load(&r->unsubscribe_after_ms);
        if (ms > 0) {
            struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        bus__broker_unsubscribe(r->b, r->handle);
    }
    return BUS_OK;
}

void
kt_rec_sub(kt_rec *r, const char *pattern, const char *group)
{
    int rv = bus__broker_subscribe(r->b, pattern, group, kt_rec_deliver, r,
                                   &r->handle);

    if (rv != BUS_OK)
        fail_msg("subscribe %s: %s", pattern, bus_err_name(rv));
}

size_t
kt_rec_count(kt_rec *r)
{
    size_t n;

    bus__mutex_lock(&r->mtx);
    n = r->n;
    bus__mutex_unlock(&r->mtx);
    return n;
}

typedef struct kt_rec_want {
    kt_rec *r;
    size_t n;
} kt_rec_want;

static int
kt_rec_has(void *arg)
{
    kt_rec_want *w = arg;

    return kt_rec_count(w->r) >= w->n;
}

bool
kt_rec_wait(kt_rec *r, size_t n, int timeout_ms)
{
    kt_rec_want w = {r, n};

    return bt_wait_for(kt_rec_has, &w, timeout_ms) != 0;
}

void
kt_rec_ack(kt_rec *r, size_t i, bus_result res)
{
    uint64_t token;

    bus__mutex_lock(&r->mtx);
    assert_true(i < r->n);
    token = r->items[i].token;
    bus__mutex_unlock(&r->mtx);
    bus__broker_ack(r->b, r->handle, token, res);
}

void
kt_publish(bus_broker *b, const char *topic, const char *type,
           const char *stream, const char *payload)
{
    bus_event_init in;
    bus_event *e;
    int rv;

    memset(&in, 0, sizeof(in));
    in.type = type;
    in.stream = stream;
    in.payload = payload;
    in.payload_len = strlen(payload);
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    rv = bus_broker_publish(b, topic, e, 0, NULL, NULL);
    if (rv != BUS_OK) {
        bus_event_unref(e);
        fail_msg("publish %s: %s", topic, bus_err_name(rv));
    }
}

static void
kt_quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

static rd_kafka_conf_t *
kt_conf(const char *bootstrap)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char err[256];

    assert_int_equal(
        rd_kafka_conf_set(c, "bootstrap.servers", bootstrap, err, sizeof(err)),
        RD_KAFKA_CONF_OK);
    rd_kafka_conf_set_log_cb(c, kt_quiet_log);
    return c;
}

rd_kafka_t *
kt_raw_consumer(const char *bootstrap, const char *group)
{
    rd_kafka_conf_t *c = kt_conf(bootstrap);
    char err[256], gid[64];
    rd_kafka_t *rk;

    if (group == NULL) {
        kt_unique(gid, sizeof(gid), "rawgrp");
        group = gid;
    }
    rd_kafka_conf_set(c, "group.id", group, err, sizeof(err));
    rd_kafka_conf_set(c, "enable.auto.commit", "false", err, sizeof(err));
    rd_kafka_conf_set(c, "fetch.wait.max.ms", "10", err, sizeof(err));
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, err, sizeof(err));
    assert_non_null(rk);
    rd_kafka_poll_set_consumer(rk);
    return rk;
}

rd_kafka_t *
kt_raw_producer(const char *bootstrap)
{
    rd_kafka_conf_t *c = kt_conf(bootstrap);
    char err[256];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, c, err, sizeof(err));

    assert_non_null(rk);
    return rk;
}

int64_t
kt_committed(const char *bootstrap, const char *group, const char *topic,
             int32_t partition)
{
    rd_kafka_t *rk = kt_raw_consumer(bootstrap, group);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    int64_t off = -1001;

    rd_kafka_topic_partition_list_add(l, topic, partition);
    if (rd_kafka_committed(rk, l, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR &&
        l->elems[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
        off = l->elems[0].offset;
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return off;
}

size_t
kt_raw_read(const char *bootstrap, const char *topic, size_t n, int timeout_ms,
            void (*fn)(const rd_kafka_message_t *m, void *arg), void *arg)
{
    rd_kafka_t *rk = kt_raw_consumer(bootstrap, NULL);
    const struct rd_kafka_metadata *md;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(4);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    uint64_t deadline = bt_now_ns() + (uint64_t)timeout_ms * 1000000u;
    size_t got = 0;
    int i;

    assert_int_equal(rd_kafka_metadata(rk, 0, rkt, &md, 5000),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    assert_int_equal(md->topic_cnt, 1);
    for (i = 0; i < md->topics[0].partition_cnt; i++)
        rd_kafka_topic_partition_list_add(l, topic,
                                          md->topics[0].partitions[i].id)
            ->offset = RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    assert_int_equal(rd_kafka_assign(rk, l), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(l);
    while (got < n && bt_now_ns() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m == NULL)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            if (fn != NULL)
                fn(m, arg);
            got++;
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return got;
}

bool
kt_wait(int (*cond)(void *), void *arg, int timeout_ms)
{
    return bt_wait_for(cond, arg, timeout_ms) != 0;
}

void
kt_unique(char *buf, size_t len, const char *base)
{
    static _Atomic unsigned seq;

    snprintf(buf, len, "%s%ux%d", base, atomic_fetch_add(&seq, 1) + 1,
             (int)getpid());
}
