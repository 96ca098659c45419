/*
 * Helpers for the Kafka broker tests: open a broker, a recording
 * subscriber at the SPI level (the role the bus context plays), raw
 * librdkafka clients for checks (committed offsets, reading records as a
 * foreign client would), and waits on conditions with deadlines.
 */
#ifndef BUS_KAFKA_TEST_UTIL_H
#define BUS_KAFKA_TEST_UTIL_H

#include <stdatomic.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <bus/broker_kafka.h>

#include "broker_impl.h"
#include "platform.h"
#include "test_support.h"

/* Opens uri or fails the test with the reason. */
bus_broker *kt_open(const char *uri);
/* Opens uri and returns the error (errbuf filled). */
int kt_open_err(const char *uri, char *errbuf, size_t len, bus_broker **out);

/* How a recording subscriber answers deliveries. */
typedef enum kt_mode {
    KT_ACK_INLINE = 0, /* take the event and ack it (BUS_ACK) at once */
    KT_KEEP = 1        /* take the event, ack later (kt_rec_ack_*) */
} kt_mode;

#define KT_REC_MAX 200000

typedef struct kt_item {
    bus_event *ev; /* a reference (kept until kt_rec_free) */
    uint64_t token;
    char topic[64];
} kt_item;

typedef struct kt_rec {
    bus__mutex mtx;
    kt_item *items; /* KT_REC_MAX */
    size_t n;
    kt_mode mode;
    _Atomic int refuse; /* refuse this many calls with BUS_EAGAIN */
    _Atomic int refused;
    _Atomic int calls;
    bool keep_events; /* keep a reference on each delivered event */
    bus_broker *b;    /* for inline acks */
    void *handle;
    bus_result inline_result;
    _Atomic int unsubscribe_in_call;  /* > 0: unsubscribe self on that call */
    _Atomic int unsubscribe_after_ms; /* ... after sleeping this long in it
                                       * (to let a close overtake it) */
    _Atomic int refuse_from_call;     /* > 0: from that call on, refuse
                                       * until refuse is set to 0 */
} kt_rec;

void kt_rec_init(kt_rec *r, bus_broker *b, kt_mode mode);
void kt_rec_free(kt_rec *r);
int kt_rec_deliver(void *opaque, const char *topic, bus_event *ev,
                   uint64_t token, unsigned flags);
/* Subscribes r (asserting success). */
void kt_rec_sub(kt_rec *r, const char *pattern, const char *group);
size_t kt_rec_count(kt_rec *r);
/* Waits until r has n deliveries; false at the deadline. */
bool kt_rec_wait(kt_rec *r, size_t n, int timeout_ms);
/* Acks item i with res. */
void kt_rec_ack(kt_rec *r, size_t i, bus_result res);

/* Publishes a new event (type, stream may be NULL, payload text) and
 * asserts BUS_OK. */
void kt_publish(bus_broker *b, const char *topic, const char *type,
                const char *stream, const char *payload);

/* A raw librdkafka consumer for group (NULL: none) at bootstrap. */
rd_kafka_t *kt_raw_consumer(const char *bootstrap, const char *group);
rd_kafka_t *kt_raw_producer(const char *bootstrap);
/* The committed offset of (topic, partition) for group, or -1001. */
int64_t kt_committed(const char *bootstrap, const char *group,
                     const char *topic, int32_t partition);
/* Reads every record of topic (all partitions, from the beginning) until
 * n were read or timeout; calls fn for each. Returns the count. */
size_t kt_raw_read(const char *bootstrap, const char *topic, size_t n,
                   int timeout_ms,
                   void (*fn)(const rd_kafka_message_t *m, void *arg),
                   void *arg);

/* Waits until cond(arg) or timeout_ms; true if it became true. */
bool kt_wait(int (*cond)(void *), void *arg, int timeout_ms);

/* A unique name ("t<seq>x<pid>") so tests do not see each other's topics
 * on the shared mock. */
void kt_unique(char *buf, size_t len, const char *base);

#endif
