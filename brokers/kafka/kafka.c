/*
 * The Kafka broker, kafka://host:port (contract: <bus/broker_kafka.h>;
 * record format and operations: docs/brokers/kafka.md).
 *
 * Design:
 * - One idempotent producer (rd_kafka_t) per broker object: a publish is
 *   acked only from its delivery report, i.e. once Kafka has the record
 *   with acks=all; reports are served by the publishing threads and a poll
 *   thread, acks run on the poll thread (kafka_produce.c).
 * - One consumer (rd_kafka_t) and one thread for the broker's group-less
 *   subscriptions and one per consumer group (kafka_consume.c): a bus
 *   context may make thousands of subscriptions through one broker (one
 *   per matching bus subscription), so they share consumers and a record
 *   is fanned out to the matching ones. Commit positions are tracked per
 *   (subscription, partition) and combined per partition.
 * - The options are parsed once (bus_uri_get*) and the librdkafka
 *   properties validated at init against both a producer and a consumer
 *   configuration, so an invalid property fails the open naming it; the
 *   configurations for later consumers are then built from the same list.
 * - kafka://mock starts librdkafka's in-process mock cluster, shared by
 *   every kafka://mock broker of the process (like a mem:// name) and
 *   destroyed with the last one.
 * - Errors from librdkafka are mapped to BUS_E* codes (kafka_map_err) and
 *   the original name logged where they happen. librdkafka's own log goes
 *   to the broker's logger (subsystem "kafka"), never to stderr.
 *
 * Lock order: see kafka_impl.h. This file takes kafka_mock_mtx (alone) and
 * kb->smtx (kafka_subs_fatal).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "broker_impl.h"
#include "kafka_impl.h"
#include "mp.h"

#define KAFKA_DEF_MAX_INFLIGHT 1000
#define KAFKA_DEF_REBALANCE_MS 10000
#define KAFKA_DEF_BACKOFF_MS 100
#define KAFKA_DEF_BACKOFF_MAX_MS 10000
#define KAFKA_DEF_CLOSE_MS 10000
#define KAFKA_DEF_PUBLISH_MS 1000
#define KAFKA_DEF_DISCOVER_MS 5000
#define KAFKA_MOCK_DISCOVER_MS 500
#define KAFKA_DEF_MOCK_BROKERS 3

/* ---- Small helpers ------------------------------------------------------ */

static void kafka_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
kafka_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errbuf_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errbuf_len, fmt, ap);
    va_end(ap);
}

static char *
kafka_strdup(const char *s, size_t *size)
{
    return bus__strdup(s, size);
}

static void
kafka_strfree(char **s, size_t *size)
{
    if (*s != NULL)
        bus__free(*s, *size);
    *s = NULL;
    *size = 0;
}

/* Properties whose values must never reach a log line or an errbuf. */
static bool
kafka_prop_secret(const char *name)
{
    return bus__option_is_secret(name, strlen(name));
}

/* ---- Error mapping ------------------------------------------------------ */

int
kafka_map_err(rd_kafka_resp_err_t err)
{
    switch (err) {
    case RD_KAFKA_RESP_ERR_NO_ERROR:
        return BUS_OK;
    case RD_KAFKA_RESP_ERR__QUEUE_FULL:
        return BUS_EAGAIN;
    case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
    case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
        return BUS_ETIMEDOUT;
    case RD_KAFKA_RESP_ERR__TRANSPORT:
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
    case RD_KAFKA_RESP_ERR__RESOLVE:
    case RD_KAFKA_RESP_ERR__WAIT_COORD:
    case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
    case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
    case RD_KAFKA_RESP_ERR__NODE_UPDATE:
    case RD_KAFKA_RESP_ERR__PARTITION_EOF:
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
    case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
    case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_REPLICA_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
    case RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS:
    case RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_NOT_COORDINATOR:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND:
    case RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR:
    case RD_KAFKA_RESP_ERR_FENCED_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_UNKNOWN_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_OFFSET_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS:
        return BUS_EUNAVAIL;
    case RD_KAFKA_RESP_ERR__NO_OFFSET:
    case RD_KAFKA_RESP_ERR__NOENT:
        return BUS_ENOTFOUND;
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
        return BUS_ETOOBIG;
    case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_SASL_AUTHENTICATION_FAILED:
    case RD_KAFKA_RESP_ERR__AUTHENTICATION:
    case RD_KAFKA_RESP_ERR__SSL:
        return BUS_EACCESS;
    case RD_KAFKA_RESP_ERR__PURGE_QUEUE:
    case RD_KAFKA_RESP_ERR__PURGE_INFLIGHT:
        return BUS_ECANCELED;
    case RD_KAFKA_RESP_ERR__DESTROY:
        return BUS_ECLOSED;
    case RD_KAFKA_RESP_ERR__INVALID_ARG:
    case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
    case RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS:
    case RD_KAFKA_RESP_ERR_INVALID_CONFIG:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
    case RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP:
    case RD_KAFKA_RESP_ERR_UNSUPPORTED_VERSION:
    case RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT:
    case RD_KAFKA_RESP_ERR__UNSUPPORTED_FEATURE:
        return BUS_EINVAL;
    case RD_KAFKA_RESP_ERR__BAD_MSG:
    case RD_KAFKA_RESP_ERR__BAD_COMPRESSION:
        return BUS_EPROTO;
    case RD_KAFKA_RESP_ERR__STATE:
        return BUS_EBUSY;
    default:
        /* _FATAL (the idempotent producer cannot guarantee its promise
         * any more), OUT_OF_ORDER_SEQUENCE_NUMBER, unknown codes: not
         * retriable by the caller; the original name is logged. */
        return BUS_EIO;
    }
}

/* ---- Logging glue -------------------------------------------------------- */

void
kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    kafka_rkop *op = rd_kafka_opaque(rk);
    bus_log_level lvl;

    if (op == NULL || op->kb == NULL)
        return;
    /* librdkafka uses syslog levels, as bus_log_level does. */
    if (level <= 3)
        lvl = BUS_LOG_ERR;
    else if (level == 4)
        lvl = BUS_LOG_WARN;
    else if (level <= 6)
        lvl = BUS_LOG_INFO;
    else
        lvl = BUS_LOG_DEBUG;
    if (!bus_log_enabled(&op->kb->log, lvl))
        return;
    if (op->cons != NULL)
        bus_logf(&op->kb->log, lvl, "kafka", "consumer (group %s): %s: %s",
                 op->cons->group != NULL ? op->cons->group : "none", fac, buf);
    else
        bus_logf(&op->kb->log, lvl, "kafka", "producer: %s: %s", fac, buf);
}

void
kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    kafka_rkop *op = opaque;
    char fbuf[512];

    if (op == NULL || op->kb == NULL)
        return;
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fbuf, sizeof(fbuf));
        bus_logf(&op->kb->log, BUS_LOG_ERR, "kafka",
                 "%s: fatal error %s: %s (-> %s)",
                 op->cons != NULL ? "consumer" : "producer",
                 rd_kafka_err2name(ferr), fbuf,
                 bus_err_name(kafka_map_err(ferr)));
        if (op->cons != NULL)
            atomic_store_explicit(&op->cons->fatal, true, memory_order_relaxed);
        else
            atomic_store_explicit(&op->kb->fatal, true, memory_order_relaxed);
        return;
    }
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN && op->cons == NULL)
        atomic_store_explicit(&op->kb->down, true, memory_order_relaxed);
    bus_logf(&op->kb->log, BUS_LOG_WARN, "kafka", "%s: %s: %s (-> %s)",
             op->cons != NULL ? "consumer" : "producer",
             rd_kafka_err2name((rd_kafka_resp_err_t)err), reason,
             bus_err_name(kafka_map_err((rd_kafka_resp_err_t)err)));
}

/* The mock's owner handle logs nowhere: the library never writes to
 * stderr, and mock chatter belongs to no broker's logger. */
static void
kafka_quiet_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                   const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

/* ---- The shared mock cluster -----------------------------------------------
 */

static bus__mutex kafka_mock_mtx;
static kafka_mock *kafka_mock_shared; /* @locks kafka_mock_mtx */
static atomic_bool kafka_mock_ready;
static atomic_flag kafka_mock_init_lock = ATOMIC_FLAG_INIT;

static void
kafka_mock_table_init(void)
{
    if (atomic_load_explicit(&kafka_mock_ready, memory_order_acquire))
        return;
    /* acquire/release on the spin flag: the winner's initialisation
     * happens-before a loser's re-check (as memory.c). */
    while (atomic_flag_test_and_set_explicit(&kafka_mock_init_lock,
                                             memory_order_acquire))
        bus__thread_yield();
    if (!atomic_load_explicit(&kafka_mock_ready, memory_order_relaxed)) {
        bus__mutex_init(&kafka_mock_mtx);
        atomic_store_explicit(&kafka_mock_ready, true, memory_order_release);
    }
    atomic_flag_clear_explicit(&kafka_mock_init_lock, memory_order_release);
}

static void
kafka_mock_free(kafka_mock *m)
{
    if (m == NULL)
        return;
    if (m->cluster != NULL)
        rd_kafka_mock_cluster_destroy(m->cluster);
    if (m->owner != NULL)
        rd_kafka_destroy(m->owner);
    kafka_strfree(&m->bootstrap, &m->bootstrap_size);
    bus__free(m, sizeof(*m));
}

static int
kafka_mock_acquire(kafka_broker *kb, int brokers, char *errbuf,
                   size_t errbuf_len)
{
    kafka_mock *m;
    rd_kafka_conf_t *conf;
    char errstr[256];
    int rv = BUS_OK;

    kafka_mock_table_init();
    bus__mutex_lock(&kafka_mock_mtx);
    if ((m = kafka_mock_shared) != NULL) {
        if (brokers > 0 && brokers != m->brokers) {
            kafka_err(errbuf, errbuf_len,
                      "mock.brokers=%d: the process's mock cluster is "
                      "already running with %d brokers",
                      brokers, m->brokers);
            rv = BUS_EINVAL;
        } else {
            m->refs++;
            kb->mock = m;
        }
        bus__mutex_unlock(&kafka_mock_mtx);
        return rv;
    }
    if ((m = bus__zalloc(sizeof(*m))) == NULL) {
        bus__mutex_unlock(&kafka_mock_mtx);
        return BUS_ENOMEM;
    }
    m->brokers = brokers > 0 ? brokers : KAFKA_DEF_MOCK_BROKERS;
    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, kafka_quiet_log_cb);
    m->owner = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (m->owner == NULL) {
        rd_kafka_conf_destroy(conf);
        kafka_err(errbuf, errbuf_len, "mock cluster: %s", errstr);
        rv = BUS_ENOMEM;
        goto fail;
    }
    if ((m->cluster = rd_kafka_mock_cluster_new(m->owner, m->brokers)) ==
        NULL) {
        kafka_err(errbuf, errbuf_len, "mock cluster: cannot start");
        rv = BUS_EUNAVAIL;
        goto fail;
    }
    m->bootstrap = kafka_strdup(rd_kafka_mock_cluster_bootstraps(m->cluster),
                                &m->bootstrap_size);
    if (m->bootstrap == NULL) {
        rv = BUS_ENOMEM;
        goto fail;
    }
    m->refs = 1;
    kafka_mock_shared = m;
    kb->mock = m;
    bus__mutex_unlock(&kafka_mock_mtx);
    bus_logf(&kb->log, BUS_LOG_INFO, "kafka",
             "mock cluster with %d brokers at %s", m->brokers, m->bootstrap);
    return BUS_OK;
fail:
    kafka_mock_free(m);
    bus__mutex_unlock(&kafka_mock_mtx);
    return rv;
}

static void
kafka_mock_release(kafka_broker *kb)
{
    kafka_mock *m = kb->mock, *dead = NULL;

    if (m == NULL)
        return;
    kb->mock = NULL;
    bus__mutex_lock(&kafka_mock_mtx);
    if (--m->refs == 0) {
        kafka_mock_shared = NULL;
        dead = m;
    }
    bus__mutex_unlock(&kafka_mock_mtx);
    /* Destroy outside the table lock: it joins the mock's threads. */
    kafka_mock_free(dead);
}

/* ---- Properties ------------------------------------------------------------
 */

static int
kafka_prop_add(kafka_broker *kb, const char *name, size_t name_len,
               const char *value, const char *origin, int side)
{
    kafka_prop *p;

    if (kb->n_props == kb->cap_props) {
        size_t ncap = kb->cap_props ? kb->cap_props * 2 : 16;
        kafka_prop *np = bus__realloc(kb->props, kb->cap_props * sizeof(*np),
                                      ncap * sizeof(*np));
        if (np == NULL)
            return BUS_ENOMEM;
        kb->props = np;
        kb->cap_props = ncap;
    }
    p = &kb->props[kb->n_props];
    memset(p, 0, sizeof(*p));
    p->side = side;
    if ((p->name = bus__alloc(name_len + 1)) == NULL)
        return BUS_ENOMEM;
    memcpy(p->name, name, name_len);
    p->name[name_len] = '\0';
    if ((p->value = bus__strdup(value, NULL)) == NULL ||
        (p->origin = bus__strdup(origin, NULL)) == NULL) {
        bus__strfree(p->value);
        bus__strfree(p->name);
        return BUS_ENOMEM;
    }
    kb->n_props++;
    return BUS_OK;
}

static void
kafka_props_free(kafka_broker *kb)
{
    size_t i;

    for (i = 0; i < kb->n_props; i++) {
        bus__strfree(kb->props[i].name);
        bus__strfree(kb->props[i].value);
        bus__strfree(kb->props[i].origin);
    }
    if (kb->props != NULL)
        bus__free(kb->props, kb->cap_props * sizeof(*kb->props));
    kb->props = NULL;
    kb->n_props = kb->cap_props = 0;
}

static char *
kafka_trim(char *s)
{
    char *e;

    while (*s == ' ' || *s == '\t')
        s++;
    e = s + strlen(s);
    while (e > s &&
           (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r' || e[-1] == '\n'))
        *--e = '\0';
    return s;
}

/* Reads "name=value" lines ('#' or '!' comments, blank lines) into the
 * property list, for both sides. */
static int
kafka_read_config(kafka_broker *kb, const char *path, char *errbuf,
                  size_t errbuf_len)
{
    char *line = NULL, *l, *eq, origin[320];
    size_t cap = 0, lineno = 0;
    int rv = BUS_OK;
    FILE *f;

    if ((f = fopen(path, "r")) == NULL) {
        kafka_err(errbuf, errbuf_len, "config=%s: cannot open: %s", path,
                  strerror(errno));
        return errno == EACCES ? BUS_EACCESS : BUS_ENOTFOUND;
    }
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        l = kafka_trim(line);
        if (*l == '\0' || *l == '#' || *l == '!')
            continue;
        if ((eq = strchr(l, '=')) == NULL) {
            kafka_err(errbuf, errbuf_len, "%s:%zu: expected name=value", path,
                      lineno);
            rv = BUS_EINVAL;
            break;
        }
        *eq = '\0';
        snprintf(origin, sizeof(origin), "%s:%zu", path, lineno);
        l = kafka_trim(l);
        rv = kafka_prop_add(kb, l, strlen(l), kafka_trim(eq + 1), origin,
                            KAFKA_SIDE_BOTH);
        if (rv != BUS_OK)
            break;
    }
    free(line); /* getline's buffer comes from malloc */
    fclose(f);
    return rv;
}

static int
kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
               const char *origin, char *errbuf, size_t errbuf_len)
{
    char errstr[512];

    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) ==
        RD_KAFKA_CONF_OK)
        return BUS_OK;
    /* librdkafka's message quotes the value: keep it out for secrets. */
    if (kafka_prop_secret(name))
        kafka_err(errbuf, errbuf_len,
                  "%s: invalid value for property "
                  "\"%s\" (value not shown)",
                  origin, name);
    else
        kafka_err(errbuf, errbuf_len, "%s: %s", origin, errstr);
    return BUS_EINVAL;
}

rd_kafka_conf_t *
kafka_conf_new(kafka_broker *kb, kafka_cons *cons, char *errbuf,
               size_t errbuf_len)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    int side = cons != NULL ? KAFKA_SIDE_CONSUMER : KAFKA_SIDE_PRODUCER;
    char anon[64];
    size_t i;

#define KAFKA_SET(k, v)                                                        \
    do {                                                                       \
        if (kafka_conf_set(conf, (k), (v), "default", errbuf, errbuf_len) !=   \
            BUS_OK)                                                            \
            goto fail;                                                         \
    } while (0)
    if (kb->bootstrap != NULL)
        KAFKA_SET("bootstrap.servers", kb->bootstrap);
    KAFKA_SET("client.id", "libbus");
    KAFKA_SET("log.connection.close", "false");
    if (cons == NULL) {
        KAFKA_SET("enable.idempotence", "true");
        KAFKA_SET("acks", "all");
        KAFKA_SET("partitioner", "murmur2_random");
        if (kb->compression != NULL)
            KAFKA_SET("compression.codec", kb->compression);
        else if (kb->mock != NULL)
            /* The mock keeps 5 MiB per partition and drops older records
             * beyond: compressed batches make that go much further. */
            KAFKA_SET("compression.codec", "lz4");
    } else {
        if (cons->group != NULL) {
            KAFKA_SET("group.id", cons->group);
            KAFKA_SET("enable.auto.commit", "true");
        } else {
            /* A group id lets the client use assign() and consumer_poll;
             * it never joins (no subscribe) and commits nothing. */
            bus_uuid u;
            char us[BUS_UUID_STR_LEN + 1];
            bus_uuid_v7(&u);
            snprintf(anon, sizeof(anon), "libbus-nogroup-%s",
                     bus_uuid_format(&u, us));
            KAFKA_SET("group.id", anon);
            KAFKA_SET("enable.auto.commit", "false");
        }
        KAFKA_SET("enable.auto.offset.store", "false");
        KAFKA_SET("enable.partition.eof", "false");
        KAFKA_SET("auto.offset.reset", "earliest");
        if (kb->mock != NULL) {
            /* The mock holds an empty fetch for fetch.wait.max.ms even when
             * records arrive, and waits session.timeout.ms - 1 s before it
             * completes a rebalance: short values keep tests fast. But a
             * new group's first join waits 3 s there, and a member whose
             * session expires meanwhile is dropped with its join unanswered:
             * the session must outlast that delay. */
            KAFKA_SET("fetch.wait.max.ms", "10");
            KAFKA_SET("session.timeout.ms", "4500");
            KAFKA_SET("heartbeat.interval.ms", "500");
            KAFKA_SET("topic.metadata.refresh.interval.ms", "1000");
            /* A group's literal subscription creates its topic, so the
             * first join already covers it. */
            if (cons->group != NULL)
                KAFKA_SET("allow.auto.create.topics", "true");
        }
    }
#undef KAFKA_SET
    for (i = 0; i < kb->n_props; i++) {
        const kafka_prop *p = &kb->props[i];
        if (p->side != KAFKA_SIDE_BOTH && p->side != side)
            continue;
        if (kafka_conf_set(conf, p->name, p->value, p->origin, errbuf,
                           errbuf_len) != BUS_OK)
            goto fail;
    }
    rd_kafka_conf_set_opaque(conf, cons != NULL ? &cons->rkop : &kb->rkop);
    rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
    rd_kafka_conf_set_error_cb(conf, kafka_error_cb);
    if (cons == NULL)
        rd_kafka_conf_set_dr_msg_cb(conf, kafka_dr_cb);
    else if (cons->group != NULL)
        rd_kafka_conf_set_rebalance_cb(conf, kafka_rebalance_cb);
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

/* ---- Options ---------------------------------------------------------------
 */

static int
kafka_opt_i32(bus_uri *uri, const char *key, int64_t min, int64_t max,
              int32_t *out, char *errbuf, size_t errbuf_len)
{
    int64_t v;
    int rv = bus_uri_get_i64(uri, key, min, max, &v);

    if (rv == BUS_ENOTFOUND)
        return BUS_OK;
    if (rv != BUS_OK) {
        kafka_err(errbuf, errbuf_len,
                  "option '%s': expected an integer in [%lld, %lld]", key,
                  (long long)min, (long long)max);
        return BUS_EINVAL;
    }
    *out = (int32_t)v;
    return BUS_OK;
}

static int
kafka_opt_str(bus_uri *uri, const char *key, char **out, size_t *size)
{
    const char *v = bus_uri_get(uri, key);

    if (v == NULL)
        return BUS_OK;
    kafka_strfree(out, size);
    if ((*out = kafka_strdup(v, size)) == NULL)
        return BUS_ENOMEM;
    return BUS_OK;
}

static int
kafka_parse_options(kafka_broker *kb, bus_uri *uri, int32_t *mock_brokers,
                    char *errbuf, size_t errbuf_len)
{
    const char *v;
    int32_t i32;
    int rv;
    size_t i;

    if ((rv = kafka_opt_str(uri, "group", &kb->group, &kb->group_size)) !=
            BUS_OK ||
        (rv = kafka_opt_str(uri, "topic.prefix", &kb->prefix,
                            &kb->prefix_size)) != BUS_OK ||
        (rv = kafka_opt_str(uri, "default.type", &kb->default_type,
                            &kb->default_type_size)) != BUS_OK ||
        (rv = kafka_opt_str(uri, "source", &kb->source, &kb->source_size)) !=
            BUS_OK)
        return rv;
    if (kb->group != NULL && kb->group[0] == '\0') {
        kafka_err(errbuf, errbuf_len, "option 'group': empty");
        return BUS_EINVAL;
    }
    if (kb->default_type != NULL &&
        (kb->default_type[0] == '\0' ||
         !bus__utf8_valid(kb->default_type, strlen(kb->default_type)))) {
        /* The rules of bus_event_set_type: non-empty UTF-8. */
        kafka_err(errbuf, errbuf_len, "option 'default.type': invalid");
        return BUS_EINVAL;
    }
    kb->prefix_len = kb->prefix != NULL ? strlen(kb->prefix) : 0;
    for (i = 0; i < kb->prefix_len; i++) {
        char c = kb->prefix[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) {
            kafka_err(errbuf, errbuf_len,
                      "option 'topic.prefix': '%c' is not allowed in Kafka "
                      "topic names ([A-Za-z0-9._-])",
                      c);
            return BUS_EINVAL;
        }
    }
    if ((v = bus_uri_get(uri, "compression")) != NULL) {
        if (strcmp(v, "none") != 0 && strcmp(v, "gzip") != 0 &&
            strcmp(v, "snappy") != 0 && strcmp(v, "lz4") != 0 &&
            strcmp(v, "zstd") != 0) {
            kafka_err(errbuf, errbuf_len,
                      "option 'compression': '%s' is not one of none, gzip, "
                      "snappy, lz4, zstd",
                      v);
            return BUS_EINVAL;
        }
        if ((kb->compression = kafka_strdup(v, &kb->compression_size)) == NULL)
            return BUS_ENOMEM;
    }
    if ((v = bus_uri_get(uri, "publish.backpressure")) != NULL) {
        if (strcmp(v, "block") == 0)
            kb->bp_fail = false;
        else if (strcmp(v, "fail") == 0)
            kb->bp_fail = true;
        else {
            kafka_err(errbuf, errbuf_len,
                      "option 'publish.backpressure': '%s' is not block or "
                      "fail",
                      v);
            return BUS_EINVAL;
        }
    }
    if ((v = bus_uri_get(uri, "start")) != NULL) {
        if (strcmp(v, "latest") == 0)
            kb->start_earliest = false;
        else if (strcmp(v, "earliest") == 0)
            kb->start_earliest = true;
        else {
            kafka_err(errbuf, errbuf_len,
                      "option 'start': '%s' is not latest or earliest", v);
            return BUS_EINVAL;
        }
    }
    if ((rv = kafka_opt_i32(uri, "publish.timeout.ms", -1, INT32_MAX,
                            &kb->publish_timeout_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "rebalance.timeout.ms", 0, INT32_MAX,
                            &kb->rebalance_timeout_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "redelivery.backoff.ms", 1, INT32_MAX,
                            &kb->backoff_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "redelivery.backoff.max.ms", 1, INT32_MAX,
                            &kb->backoff_max_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "close.timeout.ms", 0, INT32_MAX,
                            &kb->close_timeout_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "discover.interval.ms", 10, INT32_MAX,
                            &kb->discover_interval_ms, errbuf, errbuf_len)) ||
        (rv = kafka_opt_i32(uri, "mock.brokers", 1, 64, mock_brokers, errbuf,
                            errbuf_len)))
        return rv;
    i32 = (int32_t)kb->max_inflight;
    if ((rv = kafka_opt_i32(uri, "max.inflight", 1, 1000000, &i32, errbuf,
                            errbuf_len)) != BUS_OK)
        return rv;
    kb->max_inflight = (uint32_t)i32;
    i32 = (int32_t)kb->redelivery_max;
    if ((rv = kafka_opt_i32(uri, "redelivery.max", 0, INT32_MAX, &i32, errbuf,
                            errbuf_len)) != BUS_OK)
        return rv;
    kb->redelivery_max = (uint32_t)i32;
    if (kb->backoff_max_ms < kb->backoff_ms)
        kb->backoff_max_ms = kb->backoff_ms;
    return BUS_OK;
}

/* kafka.<prop>, kafka.producer.<prop>, kafka.consumer.<prop>, after the
 * config file, in the order given. */
static int
kafka_collect_props(kafka_broker *kb, bus_uri *uri, char *errbuf,
                    size_t errbuf_len)
{
    const char *cfg;
    size_t i;
    int rv;

    if ((cfg = bus_uri_get(uri, "config")) != NULL &&
        (rv = kafka_read_config(kb, cfg, errbuf, errbuf_len)) != BUS_OK)
        return rv;
    for (i = 0; i < uri->n_params; i++) {
        bus_uri_param *p = &uri->params[i];
        const char *name;
        int side = KAFKA_SIDE_BOTH;
        if (p->consumed || strncmp(p->key, "kafka.", 6) != 0)
            continue;
        name = p->key + 6;
        if (strncmp(name, "producer.", 9) == 0) {
            side = KAFKA_SIDE_PRODUCER;
            name += 9;
        } else if (strncmp(name, "consumer.", 9) == 0) {
            side = KAFKA_SIDE_CONSUMER;
            name += 9;
        }
        if (*name == '\0') {
            kafka_err(errbuf, errbuf_len, "option '%s': no property name",
                      p->key);
            return BUS_EINVAL;
        }
        (void)bus_uri_get(uri, p->key); /* marks it consumed */
        if ((rv = kafka_prop_add(kb, name, strlen(name), p->value, p->key,
                                 side)) != BUS_OK)
            return rv;
    }
    return BUS_OK;
}

static const char *
kafka_prop_value(const kafka_broker *kb, const char *name)
{
    const char *v = NULL;
    size_t i;

    for (i = 0; i < kb->n_props; i++)
        if (strcmp(kb->props[i].name, name) == 0 &&
            kb->props[i].side != KAFKA_SIDE_CONSUMER)
            v = kb->props[i].value;
    return v;
}

/* ---- Ops ----------------------------------------------------------------- */

static void kafka_fini(void *priv);

static int
kafka_init(void *priv, const bus_broker_config *cfg, bus_uri *uri, char *errbuf,
           size_t errbuf_len)
{
    kafka_broker *kb = priv;
    rd_kafka_conf_t *conf;
    int32_t mock_brokers = 0;
    bool mock;
    int rv;

    kb->rkop.kb = kb;
    kb->log = cfg->log;
    bus__mutex_init(&kb->wmtx);
    bus__cond_init(&kb->wcond);
    bus__mutex_init(&kb->smtx);
    bus__mutex_init(&kb->ackq_mtx);
    bus__cond_init(&kb->ackq_cond);
    kb->mtx_ready = true;
    kb->max_inflight = KAFKA_DEF_MAX_INFLIGHT;
    kb->rebalance_timeout_ms = KAFKA_DEF_REBALANCE_MS;
    kb->backoff_ms = KAFKA_DEF_BACKOFF_MS;
    kb->backoff_max_ms = KAFKA_DEF_BACKOFF_MAX_MS;
    kb->close_timeout_ms = KAFKA_DEF_CLOSE_MS;
    kb->publish_timeout_ms = KAFKA_DEF_PUBLISH_MS;
    kb->open_timeout_ms =
        cfg->open_timeout_ms > 0 ? cfg->open_timeout_ms : 10000;
    kb->discover_interval_ms = 0;

    if (uri->path[0] != '\0' && strcmp(uri->path, "/") != 0) {
        kafka_err(errbuf, errbuf_len,
                  "kafka URIs have no path ('%s'): kafka://host:port,...",
                  uri->path);
        return BUS_EINVAL;
    }
    mock = strcmp(uri->authority, "mock") == 0;
    if ((rv = kafka_parse_options(kb, uri, &mock_brokers, errbuf,
                                  errbuf_len)) != BUS_OK)
        return rv;
    if (mock_brokers != 0 && !mock) {
        kafka_err(errbuf, errbuf_len,
                  "option 'mock.brokers' needs kafka://mock");
        return BUS_EINVAL;
    }
    if (kb->discover_interval_ms == 0)
        kb->discover_interval_ms =
            mock ? KAFKA_MOCK_DISCOVER_MS : KAFKA_DEF_DISCOVER_MS;
    if ((rv = kafka_collect_props(kb, uri, errbuf, errbuf_len)) != BUS_OK)
        return rv;
    if (mock) {
        if ((rv = kafka_mock_acquire(kb, mock_brokers, errbuf, errbuf_len)) !=
            BUS_OK)
            return rv;
        kb->bootstrap = kafka_strdup(kb->mock->bootstrap, &kb->bootstrap_size);
    } else if (uri->authority[0] != '\0') {
        kb->bootstrap = kafka_strdup(uri->authority, &kb->bootstrap_size);
    } else if (kafka_prop_value(kb, "bootstrap.servers") != NULL) {
        kb->bootstrap = kafka_strdup(kafka_prop_value(kb, "bootstrap.servers"),
                                     &kb->bootstrap_size);
    } else {
        kafka_err(errbuf, errbuf_len,
                  "no bootstrap servers: kafka://host:port[,host:port], "
                  "kafka://mock, or bootstrap.servers in config=");
        return BUS_EINVAL;
    }
    if (kb->bootstrap == NULL)
        return BUS_ENOMEM;

    /* Validate the consumer side now (every property once more, as a
     * consumer would get it), so a bad one fails the open, not a later
     * subscribe. The throwaway consumer only carries the group. */
    {
        kafka_cons probe;
        memset(&probe, 0, sizeof(probe));
        probe.kb = kb;
        probe.rkop.kb = kb;
        probe.rkop.cons = &probe;
        probe.group = kb->group;
        if ((conf = kafka_conf_new(kb, &probe, errbuf, errbuf_len)) == NULL)
            return BUS_EINVAL;
        rd_kafka_conf_destroy(conf);
    }
    return kafka_producer_start(kb, errbuf, errbuf_len);
}

static int
kafka_health(void *priv, char *msg, size_t msg_len)
{
    kafka_broker *kb = priv;

    if (atomic_load_explicit(&kb->fatal, memory_order_relaxed)) {
        kafka_err(msg, msg_len, "producer hit a fatal error (see log)");
        return BUS_EIO;
    }
    if (kafka_subs_fatal(kb, msg, msg_len))
        return BUS_EIO;
    if (atomic_load_explicit(&kb->down, memory_order_relaxed)) {
        kafka_err(msg, msg_len, "all brokers down (%s)", kb->bootstrap);
        return BUS_EUNAVAIL;
    }
    return BUS_OK;
}

static void
kafka_close(void *priv)
{
    kafka_broker *kb = priv;

    /* release: a publisher that sees closed also sees everything before. */
    atomic_store_explicit(&kb->closed, true, memory_order_release);
    if (!kb->mtx_ready)
        return;
    kafka_subs_close(kb);
    kafka_producer_wake(kb);
}

static void
kafka_stop(void *priv)
{
    kafka_broker *kb = priv;

    if (!kb->mtx_ready)
        return;
    /* Consumers first: their handlers may still publish through us. */
    kafka_subs_stop(kb);
    kafka_producer_stop(kb);
}

static void
kafka_fini(void *priv)
{
    kafka_broker *kb = priv;

    if (kb->mainq != NULL) {
        rd_kafka_queue_destroy(kb->mainq);
        kb->mainq = NULL;
    }
    if (kb->prod != NULL) {
        rd_kafka_destroy(kb->prod);
        kb->prod = NULL;
    }
    kafka_props_free(kb);
    kafka_strfree(&kb->group, &kb->group_size);
    kafka_strfree(&kb->prefix, &kb->prefix_size);
    kafka_strfree(&kb->default_type, &kb->default_type_size);
    kafka_strfree(&kb->source, &kb->source_size);
    kafka_strfree(&kb->compression, &kb->compression_size);
    kafka_strfree(&kb->bootstrap, &kb->bootstrap_size);
    kafka_mock_release(kb);
    if (kb->mtx_ready) {
        bus__cond_fini(&kb->wcond);
        bus__mutex_fini(&kb->wmtx);
        bus__mutex_fini(&kb->smtx);
        bus__mutex_fini(&kb->ackq_mtx);
        bus__cond_fini(&kb->ackq_cond);
        kb->mtx_ready = false;
    }
}

const bus_broker_ops bus_broker_kafka_ops = {
    .version = BUS_BROKER_OPS_VERSION,
    .scheme = "kafka",
    .priv_size = sizeof(kafka_broker),
    .init = kafka_init,
    .publish = kafka_publish,
    .subscribe = kafka_subscribe,
    .unsubscribe = kafka_unsubscribe,
    .ack = kafka_ack,
    .flush = kafka_flush,
    .health = kafka_health,
    .close = kafka_close,
    .stop = kafka_stop,
    .fini = kafka_fini,
};

/* ---- Public extras (broker_kafka.h) ---------------------------------------
 */

static kafka_broker *
kafka_of(const bus_broker *b)
{
    if (b == NULL || b->ops != &bus_broker_kafka_ops)
        return NULL;
    return (kafka_broker *)b->priv;
}

const char *
bus_broker_kafka_bootstrap(const bus_broker *b)
{
    kafka_broker *kb = kafka_of(b);

    return kb != NULL ? kb->bootstrap : NULL;
}

int
bus_broker_kafka_producer_property(const bus_broker *b, const char *name,
                                   char *buf, size_t cap, size_t *len)
{
    kafka_broker *kb = kafka_of(b);
    size_t n = cap;
    rd_kafka_conf_res_t r;

    if (len != NULL)
        *len = 0;
    if (kb == NULL || kb->prod == NULL || name == NULL ||
        (buf == NULL && cap > 0))
        return BUS_EINVAL;
    if (kafka_prop_secret(name))
        return BUS_EACCESS;
    /* librdkafka: size in, the value's size (NUL included) out; a NULL
     * buffer asks for the size only. */
    r = rd_kafka_conf_get(rd_kafka_conf(kb->prod), name,
                          cap > 0 ? buf : NULL, &n);
    if (r == RD_KAFKA_CONF_UNKNOWN)
        return BUS_ENOTFOUND;
    if (r != RD_KAFKA_CONF_OK)
        return BUS_EINVAL;
    if (len != NULL)
        *len = n;
    if (n > cap) {
        if (cap > 0)
            buf[cap - 1] = '\0';
        return BUS_ENOBUFS;
    }
    return BUS_OK;
}

struct rd_kafka_mock_cluster_s *
bus_broker_kafka_mock_cluster(const bus_broker *b)
{
    kafka_broker *kb = kafka_of(b);

    return kb != NULL && kb->mock != NULL ? kb->mock->cluster : NULL;
}

int
bus_broker_kafka_stats_get(const bus_broker *b, bus_broker_kafka_stats *st)
{
    kafka_broker *kb = kafka_of(b);

    if (kb == NULL || st == NULL)
        return BUS_EINVAL;
#define KAFKA_LOAD(f) atomic_load_explicit(&kb->f, memory_order_relaxed)
    st->published = KAFKA_LOAD(st_published);
    st->acked = KAFKA_LOAD(st_acked);
    st->nacked = KAFKA_LOAD(st_nacked);
    st->delivered = KAFKA_LOAD(st_delivered);
    st->redelivered = KAFKA_LOAD(st_redelivered);
    st->refused = KAFKA_LOAD(st_refused);
    st->pauses = KAFKA_LOAD(st_pauses);
    st->committed = KAFKA_LOAD(st_committed);
    st->skipped = KAFKA_LOAD(st_skipped);
    st->rebalances = KAFKA_LOAD(st_rebalances);
    st->subscriptions = KAFKA_LOAD(st_subs);
#undef KAFKA_LOAD
    return BUS_OK;
}
