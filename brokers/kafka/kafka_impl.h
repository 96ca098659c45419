/*
 * The Kafka broker's internals, shared by its files (not installed).
 *
 *   kafka.c          ops table, options and librdkafka configuration,
 *                    close/stop/fini, health, stats, the shared mock
 *                    cluster, error mapping, logging glue
 *   kafka_produce.c  publish, delivery reports, flush, the poll thread
 *   kafka_consume.c  consumers and subscriptions: fan-out, rebalances,
 *                    backpressure, acks, offset stores and commits
 *   kafka_record.c   bus event <-> Kafka record, topic names, patterns
 *   kafka_track.c    the per-partition in-flight offset tracker
 *
 * Lock order: kb->smtx, then a consumer's mtx. kb->wmtx and the mock
 * table's mutex are leaves. No lock is held while calling a deliver
 * function, an ack callback or a blocking librdkafka call (metadata,
 * commit, consumer close, destroy), except that rd_kafka_queue_yield
 * (which only signals) is called under a consumer's mtx.
 */
#ifndef BUS_KAFKA_IMPL_H
#define BUS_KAFKA_IMPL_H

#include <stdatomic.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <bus/broker_kafka.h>

#include "kafka_track.h"
#include "platform.h"

#define KAFKA_TOPIC_MAX 249  /* Kafka's limit on topic names */
#define KAFKA_SEEN_CAP 512   /* topics remembered for discovery pokes */
#define KAFKA_OFFSET_BITS 48 /* token = (slot + 1) << 48 | offset */
#define KAFKA_OFFSET_MASK ((UINT64_C(1) << KAFKA_OFFSET_BITS) - 1)
#define KAFKA_MAX_SLOTS 65535u /* partitions one consumer can track */
#define KAFKA_DEFACKS 16       /* acks deferred during one call */

typedef struct kafka_broker kafka_broker;
typedef struct kafka_cons kafka_cons;
typedef struct kafka_sub kafka_sub;
typedef struct kafka_part kafka_part;
typedef struct kafka_mock kafka_mock;
typedef struct bus__tindex bus__tindex;

/* The opaque of every rd_kafka_t we create: callbacks find the broker
 * (and the consumer) through it. */
typedef struct kafka_rkop {
    kafka_broker *kb;
    kafka_cons *cons; /* NULL for the producer */
} kafka_rkop;

/* Which clients a librdkafka property goes to. */
enum { KAFKA_SIDE_BOTH = 0, KAFKA_SIDE_PRODUCER = 1, KAFKA_SIDE_CONSUMER = 2 };

typedef struct kafka_prop {
    char *name; /* librdkafka property */
    char *value;
    char *origin; /* "kafka.linger.ms" or "/etc/x.properties:3", for errors */
    int side;
} kafka_prop;

/* One (topic, partition) a consumer has been assigned at some point. Its
 * slot indexes the subscriptions' trackers and is never reused by the
 * consumer, so a late ack always names the partition it was for. */
struct kafka_part {
    char *ktopic; /* Kafka topic */
    size_t ktopic_size;
    const char *btopic; /* bus topic (inside ktopic), NULL: not ours */
    size_t btopic_len;
    int32_t partition;
    uint32_t slot;
    /* @locks cons->mtx */
    bool assigned;
    bool revoking;
    bool dirty;       /* position may have advanced: store it */
    int64_t next;     /* offset after the last record handed to all
                       * its targets (or skipped); -1: none yet */
    int64_t floor;    /* lowest unfinished offset left by departed
                       * subscriptions; INT64_MAX: none */
    int64_t stored;   /* last position given to offsets_store */
    kafka_sub **subs; /* live subscriptions whose pattern matches */
    uint32_t n_subs, cap_subs;
    /* A record a target refused (its queue full, its tracker full):
     * kept, the partition paused, retried for the targets in pending
     * (each holds a reference on its subscription). */
    bus_event *held;
    rd_kafka_message_t *held_msg; /* not converted yet (out of memory) */
    int64_t held_off;
    kafka_sub **pending;
    uint32_t n_pending, cap_pending;
    bool held_all; /* held_msg: every target still to do */
    uint64_t held_due_ns;
    uint32_t held_backoff_ms;
    bool paused;
    bool reseek; /* later records were dropped: seek on resume */
};

/* A subscription (the handle given to the bus). */
struct kafka_sub {
    kafka_cons *cons;
    kafka_sub *next, *prev; /* cons->subs; @locks cons->mtx */
    uint32_t refs;          /* the handle's, plus the thread's transient
                             * ones; @locks cons->mtx */
    bool dead;              /* unsubscribed; @locks cons->mtx */
    bool discovered;        /* group-less: first discovery done */
    bus_deliver_fn fn;
    void *opaque;
    char *pattern;
    size_t pattern_size;
    char *substr; /* what the consumer subscribes to for it */
    size_t substr_size;
    bool literal;
    kt *trk; /* one tracker per partition slot; @locks mtx */
    uint32_t n_trk;
};

/* One librdkafka consumer and its thread: the broker's group-less one,
 * or one per consumer group. */
struct kafka_cons {
    kafka_rkop rkop; /* rd_kafka_opaque of rk */
    kafka_broker *kb;
    kafka_cons *next; /* kb->conss or kb->reap; @locks kb->smtx */
    char *group;      /* NULL: group-less (manual assignment) */
    size_t group_size;
    rd_kafka_t *rk;
    rd_kafka_queue_t *q; /* the consumer queue, to wake the thread */
    bus__thread thread;
    bool started;
    atomic_bool stop; /* no subscription left, or close */
    atomic_bool exited;
    atomic_bool poke; /* look for new topics now */
    atomic_bool fatal;
    bus__mutex mtx;
    bus__cond cond; /* calling, discovery, revocation waits */
    bool mtx_ready;
    /* @locks mtx */
    kafka_sub *subs;
    uint32_t n_subs;
    bus__tindex *index; /* pattern -> subscription */
    kafka_part **parts;
    uint32_t n_parts, cap_parts;
    uint32_t n_dirty;
    uint64_t retry_due_ns;    /* earliest KT_RETRY due; 0: none */
    bool waiting_room;        /* a tracker was full */
    kafka_sub *calling;       /* whose deliver function the thread is in */
    uint32_t calling_waiters; /* unsubscribes waiting for calling */
    bool closing;             /* the thread is in rd_kafka_consumer_close */
    uint32_t discover_req;    /* subscriptions waiting for discovery */
    bool resubscribe;         /* group: the topic list changed */
    char **substrs;           /* group: distinct subscriptions, refcounted */
    uint32_t *substr_refs;
    uint32_t n_substrs, cap_substrs;
    /* @thread the consumer's */
    const struct rd_kafka_metadata *view; /* last full metadata */
    uint64_t view_ns;
    kafka_part *last_part;
    uint64_t next_store_ns;
    uint64_t next_discover_ns;
    uint32_t discover_fast;
    uint32_t n_held;
    kafka_sub **targets; /* scratch for one record's targets */
    uint32_t cap_targets;
    /* Acks an inline handler gives on this thread while its deliver
     * function is called (for deferring), applied in the lock round that
     * follows the call instead of one lock round each. */
    kafka_sub *deferring;
    struct kafka_defack {
        uint64_t token;
        bus_result res;
    } defacks[KAFKA_DEFACKS];
    uint32_t n_defacks;
};

struct kafka_mock {
    rd_kafka_t *owner; /* the handle the mock belongs to */
    rd_kafka_mock_cluster_t *cluster;
    char *bootstrap;
    size_t bootstrap_size;
    int brokers;
    uint32_t refs; /* @locks the mock table mutex */
};

struct kafka_broker {
    kafka_rkop rkop;
    bus_logger log;
    bool mtx_ready;
    char *bootstrap;
    size_t bootstrap_size;
    kafka_mock *mock;

    /* Options (immutable after init). */
    char *group;
    size_t group_size;
    char *prefix;
    size_t prefix_size, prefix_len;
    char *default_type;
    size_t default_type_size;
    char *source;
    size_t source_size;
    char *compression;
    size_t compression_size;
    bool bp_fail;
    bool start_earliest;
    int32_t publish_timeout_ms;
    uint32_t max_inflight;
    int32_t rebalance_timeout_ms;
    int32_t backoff_ms, backoff_max_ms;
    uint32_t redelivery_max;
    int32_t close_timeout_ms;
    int32_t discover_interval_ms;
    int32_t open_timeout_ms;
    kafka_prop *props;
    size_t n_props, cap_props;

    /* Producer. */
    rd_kafka_t *prod;
    rd_kafka_queue_t *mainq; /* its main queue: yield wakes the poll */
    bus__mutex ackq_mtx;     /* acks waiting for the poll thread */
    bus__cond ackq_cond;     /* signals one queued */
    struct kafka_msg *ackq, *ackq_tail;
    struct kafka_warm *warm; /* topics to look up (first publish) */
    bus__thread poll_thread;
    bool poll_started;
    atomic_bool closed;
    atomic_bool poll_stop;
    _Atomic int64_t outstanding; /* accepted publishes whose ack has not
                                  * run yet */
    _Atomic uint32_t waiters;    /* threads in kafka_wait_outstanding */
    bus__mutex wmtx;
    bus__cond wcond;
    _Atomic uint64_t seen[KAFKA_SEEN_CAP]; /* hashes of topics published */

    /* Health. */
    atomic_bool down; /* librdkafka said all brokers are down */
    atomic_bool fatal;
    uint64_t next_probe_ns; /* @thread poll */

    /* Consumers and the registry of live subscriptions (acks check a
     * handle there before touching it). */
    bus__mutex smtx;
    kafka_cons *conss; /* live; @locks smtx */
    kafka_cons *reap;  /* emptied from one of their own deliveries: to
                        * join; @locks smtx */
    kafka_sub **reg;   /* open addressing, NULL or KAFKA_REG_GONE */
    uint32_t reg_cap, reg_n, reg_used;

    /* Counters: relaxed, they order nothing. */
    _Atomic uint64_t st_published, st_acked, st_nacked, st_delivered,
        st_redelivered, st_refused, st_pauses, st_committed, st_skipped,
        st_rebalances, st_subs;
};

/* ---- kafka.c ------------------------------------------------------------- */

extern const bus_broker_ops bus_broker_kafka_ops;

/* Maps a librdkafka error to a BUS_E* code (retriable errors to
 * BUS_EUNAVAIL, BUS_ETIMEDOUT, BUS_EAGAIN). */
int kafka_map_err(rd_kafka_resp_err_t err);

/* A configuration for the producer (cons NULL) or for a consumer, with
 * our defaults, the user's properties and the callbacks. NULL on error,
 * with the reason (naming the property) in errbuf. */
rd_kafka_conf_t *kafka_conf_new(kafka_broker *kb, kafka_cons *cons,
                                char *errbuf, size_t errbuf_len);

/* Callbacks shared by every client. */
void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                  const char *buf);
void kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque);

/* Monotonic ns. */
static inline uint64_t
kafka_now(void)
{
    return bus__clock_mono_ns();
}

/* ---- kafka_produce.c ------------------------------------------------------
 */

int kafka_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
                  bus_ack_fn ack, void *ack_opaque);
int kafka_flush(void *priv, int32_t timeout_ms);
void kafka_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);
int kafka_producer_start(kafka_broker *kb, char *errbuf, size_t errbuf_len);
/* Flushes up to close.timeout.ms, cancels the rest, joins the thread. */
void kafka_producer_stop(kafka_broker *kb);
/* Wakes publishers waiting for queue room and flushers. */
void kafka_producer_wake(kafka_broker *kb);

/* ---- kafka_consume.c ------------------------------------------------------
 */

int kafka_subscribe(void *priv, const char *pattern, const char *group,
                    bus_deliver_fn fn, void *opaque, void **handle);
void kafka_unsubscribe(void *priv, void *handle);
void kafka_ack(void *priv, void *handle, uint64_t token, bus_result res);
void kafka_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                        rd_kafka_topic_partition_list_t *parts, void *opaque);
/* Asks every consumer to look for new topics now (a publish is creating
 * btopic's Kafka topic). */
void kafka_poke_subs(kafka_broker *kb, const char *btopic);
/* Close: asks every consumer's thread to wind down (no wait). */
void kafka_subs_close(kafka_broker *kb);
/* Stop: joins every consumer's thread, frees consumers and
 * subscriptions. */
void kafka_subs_stop(kafka_broker *kb);
/* True when some consumer hit a fatal error (reason in msg). */
bool kafka_subs_fatal(kafka_broker *kb, char *msg, size_t msg_len);

/* ---- kafka_record.c -------------------------------------------------------
 */

/* Kafka topic for a bus topic: prefix + topic, checked against Kafka's
 * rules. BUS_OK or BUS_EINVAL (reason in why, may be NULL). */
int kafka_topic_name(const kafka_broker *kb, const char *btopic, char *out,
                     size_t cap, char *why, size_t why_len);
/* What a consumer subscribes to for pattern: the Kafka topic itself when
 * the pattern has no wildcard (*literal true), else an anchored regex
 * ("^prefix\.orders\.[^.]+$"). BUS_OK, BUS_EINVAL. */
int kafka_pattern_subscription(const kafka_broker *kb, const char *pattern,
                               char *out, size_t cap, bool *literal);
/* The bus topic of a Kafka topic: the part after the prefix, when it has
 * the prefix and is a valid bus topic; else NULL. Kafka's internal topics
 * ("__consumer_offsets", ...) are never ours. */
const char *kafka_bus_topic(const kafka_broker *kb, const char *ktopic);

/* The record headers for ev (the Kafka header set of docs/brokers/
 * kafka.md). BUS_OK, BUS_EINVAL (an event header uses a reserved name:
 * logged), BUS_ENOMEM. */
int kafka_event_headers(kafka_broker *kb, const bus_event *ev,
                        rd_kafka_headers_t **out);

/* A new event (refcount 1, not frozen, topic set to part->btopic) for a
 * consumed record. BUS_OK, BUS_ENOMEM. Headers an event cannot hold are
 * skipped (logged at DEBUG), never fatal. */
int kafka_record_event(kafka_broker *kb, const kafka_part *part,
                       const rd_kafka_message_t *m, bus_event **out);

/* RFC 3339 with nanoseconds ("2026-01-02T03:04:05.123456789Z"); out
 * holds at least 40 bytes. Returns the length. */
size_t kafka_format_time(int64_t ns, char *out, size_t cap);
/* Parses RFC 3339 (fraction optional, 'Z' or an offset). */
bool kafka_parse_time(const char *s, size_t len, int64_t *ns);

#endif
