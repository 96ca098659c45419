/*
 * The Kafka broker: kafka://host:port[,host:port...] (brokers/kafka, built
 * when BUS_WITH_KAFKA is on, against librdkafka). docs/brokers/kafka.md has
 * the record format, the configuration and the operations notes.
 *
 * URI:
 *   kafka://h1:9092,h2:9092?group=billing&topic.prefix=prod.
 *   kafka://mock        an in-process mock cluster (librdkafka's), shared
 *                       by every kafka://mock broker open in the process and
 *                       destroyed with the last one: for tests, examples and
 *                       the conformance suite. bus_broker_kafka_bootstrap
 *                       gives its address, so another process, kcat or a
 *                       kafka://host:port broker can reach it.
 *   kafka://?config=/etc/svc/kafka.properties   (bootstrap.servers in the
 *                       file)
 *
 * Options (query keys or bus_broker_config.props; unknown keys fail the
 * open with BUS_EINVAL naming the key):
 *   group=NAME               consumer group for subscriptions made without
 *                            one (default: none, see "Subscriptions")
 *   topic.prefix=STR         Kafka topic = prefix + bus topic ("")
 *   compression=none|gzip|snappy|lz4|zstd    producer compression (none;
 *                            lz4 on kafka://mock)
 *   publish.backpressure=block|fail          when librdkafka's queue is
 *                            full: wait up to publish.timeout.ms (1000) for
 *                            room, or fail at once; both end in BUS_EAGAIN
 *   max.inflight=N           deliveries per partition and subscription
 *                            handed to the bus and not finished (1000,
 *                            1..1000000); beyond it the partition pauses
 *   rebalance.timeout.ms=N   how long a revoked partition waits for its
 *                            running handlers before it is committed and
 *                            released (10000)
 *   redelivery.backoff.ms=N  first delay before redelivering a record whose
 *                            handler returned BUS_RETRY (100); doubles up to
 *                            redelivery.backoff.max.ms (10000)
 *   redelivery.max=N         redeliveries of one record before it is
 *                            skipped with an error log (0: unlimited)
 *   close.timeout.ms=N       close waits this long for outstanding
 *                            publishes before it cancels them (10000)
 *   default.type=NAME        type of records without a ce_type header
 *                            (default: the bus topic)
 *   source=URI-REF           the ce_source header written ("libbus")
 *   start=latest|earliest    where a subscription without a group starts
 *                            (latest: what is published after subscribe)
 *   discover.interval.ms=N   how often subscriptions look for new topics
 *                            and partitions matching their pattern (5000;
 *                            500 on kafka://mock)
 *   config=PATH              librdkafka properties file ("name=value"
 *                            lines, '#' comments), applied before the
 *                            kafka.* options
 *   mock.brokers=N           kafka://mock only: brokers in the mock (3)
 *   kafka.<property>=V       any librdkafka property, for the producer and
 *                            the consumers; kafka.producer.<property> and
 *                            kafka.consumer.<property> for one side only.
 *                            An invalid property fails the open naming it.
 *                            SASL and TLS settings pass through this way;
 *                            values of secret properties (passwords, keys,
 *                            tokens) are never logged or put in errbuf.
 * Defaults set before the user's properties: enable.idempotence=true,
 * acks=all, partitioner=murmur2_random (the Java client's, so one key
 * lands on the same partition from either), and for consumers
 * enable.auto.offset.store=false, enable.partition.eof=false,
 * auto.offset.reset=earliest (a new group reads what is retained). On
 * kafka://mock also fetch.wait.max.ms=10, session.timeout.ms=4500,
 * heartbeat.interval.ms=500, topic.metadata.refresh.interval.ms=1000,
 * allow.auto.create.topics=true (groups), compression lz4.
 *
 * Topics: a bus topic maps to the Kafka topic prefix + topic; it must then
 * be a legal Kafka name ([A-Za-z0-9._-], at most 249 bytes), otherwise
 * publish and subscribe return BUS_EINVAL. The partition key is the
 * event's stream id, so one stream stays ordered; events without a stream
 * are spread over the partitions.
 *
 * Record format (docs/brokers/kafka.md): the payload is the record value;
 * the envelope travels in headers, CloudEvents Kafka binary mode where it
 * fits (ce_specversion, ce_id, ce_type, ce_source, ce_time) and ours
 * (bus_schema_version, bus_stream, bus_stream_version, bus_position);
 * event headers are record headers of the same name. A publish whose event
 * carries a header with one of those reserved names returns BUS_EINVAL.
 * Records written by other clients are accepted: no ce_type means
 * default.type, no ce_id a deterministic id derived from (topic,
 * partition, offset), no ce_time the record timestamp, no bus_stream the
 * key (when it is UTF-8).
 *
 * Publish guarantee: the ack runs with BUS_OK only once Kafka has the
 * record (acks=all, from the delivery report); otherwise with the mapped
 * error (BUS_ETIMEDOUT, BUS_EUNAVAIL: retriable; BUS_ETOOBIG, BUS_EACCESS,
 * BUS_EIO: not; BUS_ECANCELED when close cancelled it), the original
 * librdkafka error logged. The idempotent producer retries internally, so
 * broker failures and leader moves neither lose, duplicate nor reorder the
 * records of one key. Acks run on the broker's poll thread, never inside
 * another caller's publish. flush returns once every ack of the publishes
 * before it has run.
 *
 * Subscriptions: the broker has one librdkafka consumer (and thread) for
 *   its subscriptions without a group and one per consumer group; a
 *   record goes to every subscription whose pattern matches, or in a group
 *   to one of the group's matching subscriptions.
 *   With a group (the subscription's, else ?group=): a Kafka consumer
 *   group member; partitions are balanced among the members (in this and
 *   other processes); at least once. Per partition, records are handed to
 *   each subscription in offset order. The committed position of a
 *   partition is its lowest unfinished offset: only records whose handling
 *   finished (ACK, or REJECT: dead-lettered or given up) are ever committed
 *   past, never ahead of an unfinished one. RETRY redelivers the record after a
 * backoff (later records keep flowing; the position waits for it). On a
 *   rebalance the revoked partitions stop delivering, their running
 *   handlers get rebalance.timeout.ms to finish, the finished prefix is
 *   committed, then they are released; the next owner resumes there.
 *   Without a group: reads every partition of the matching topics from
 *   where they were when subscribe returned (start=latest; topics and
 *   partitions created later from their beginning; partitions already read
 *   for another subscription from where the consumer is) and commits
 *   nothing: at least once while the subscription lives, like mem://, but
 *   through Kafka.
 *   Backpressure: records are handed over with BUS_PUB_NONBLOCK; a refused
 *   one (BUS_EAGAIN, BUS_ECLOSED) is kept and its partition paused until
 *   the bus takes it, as is a partition with max.inflight unfinished
 *   deliveries: nothing is dropped and nothing is buffered without bound.
 *   The token of a delivery is (partition slot + 1) << 48 | offset.
 *   Unsubscribe returns once the subscription's deliver function runs
 *   nowhere; what it had not finished is not committed past (the last
 *   subscription of a consumer commits what finished and leaves the
 *   group). From inside a delivery of this broker it cannot wait: no new
 *   call starts after it returns. Acks for a subscription that is gone are
 *   ignored.
 *
 * Threads: publish, flush, subscribe, unsubscribe and ack from any thread.
 * Deliver functions run on their consumer's thread, never under a libbus
 * lock; acks on the poll thread. Close is two-phase: close_async refuses new
 * work and wakes waiters; close stops the consumers (committing), flushes the
 * producer up to close.timeout.ms, cancels the rest (acks with BUS_ECANCELED)
 * and joins every thread: after it returns no callback runs.
 */
#ifndef BUS_BROKER_KAFKA_H
#define BUS_BROKER_KAFKA_H

#include <bus/broker.h>

#ifdef __cplusplus
extern "C" {
#endif

/* librdkafka's mock cluster type (rdkafka_mock.h), opaque here. */
struct rd_kafka_mock_cluster_s;

/* The bootstrap servers b connects to ("127.0.0.1:39123,..." for
 * kafka://mock), valid while b is open; NULL when b is not a Kafka broker.
 * Thread: any. */
BUS_API const char *bus_broker_kafka_bootstrap(const bus_broker *b);

/* The mock cluster behind a kafka://mock broker, for fault injection with
 * rdkafka_mock.h (rd_kafka_mock_broker_set_down, ..._push_request_errors);
 * valid while b is open. NULL for other brokers. Thread: any. */
BUS_API struct rd_kafka_mock_cluster_s *
bus_broker_kafka_mock_cluster(const bus_broker *b);

/* The effective value of librdkafka producer property `name` of b (after
 * our defaults, the URI's kafka.* options and the config file), as
 * librdkafka reports it, e.g. "enable.idempotence" -> "true". Copies it
 * NUL-terminated into buf; *len (may be NULL) gets its length + 1.
 * Returns BUS_OK, BUS_ENOTFOUND (no such property), BUS_ENOBUFS (buf too
 * small: *len says what it needs), BUS_EACCESS (a secret: a name with
 * pass, secret, key, token, private, jaas, credential or pem is never read
 * back), BUS_EINVAL (not a Kafka broker). Thread: any. */
BUS_API int bus_broker_kafka_producer_property(const bus_broker *b,
                                               const char *name, char *buf,
                                               size_t cap, size_t *len);

typedef struct bus_broker_kafka_stats {
    uint64_t published;     /* publishes accepted (handed to librdkafka) */
    uint64_t acked;         /* delivery reports with success */
    uint64_t nacked;        /* delivery reports with an error */
    uint64_t delivered;     /* records the bus took (first deliveries) */
    uint64_t redelivered;   /* RETRY redeliveries the bus took */
    uint64_t refused;       /* deliveries refused (partition then paused) */
    uint64_t pauses;        /* partitions paused for backpressure */
    uint64_t committed;     /* offset commits that succeeded (explicit) */
    uint64_t skipped;       /* records skipped: malformed or redelivery.max */
    uint64_t rebalances;    /* assignments and revocations handled */
    uint64_t subscriptions; /* live subscriptions */
} bus_broker_kafka_stats;

/* Counters of b, which must be a kafka:// broker. Returns BUS_OK or
 * BUS_EINVAL. Thread: any (the values are read without a common lock). */
BUS_API int bus_broker_kafka_stats_get(const bus_broker *b,
                                       bus_broker_kafka_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* BUS_BROKER_KAFKA_H */
