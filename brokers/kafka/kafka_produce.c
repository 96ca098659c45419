/*
 * The Kafka broker's producer: publish, delivery reports, flush, the poll
 * thread (contract: <bus/broker_kafka.h>).
 *
 * Design:
 * - publish builds the record headers, hands the event's payload and
 *   stream (key) to librdkafka without copying (the event stays alive:
 *   the message's opaque holds its reference) and returns. The ack runs
 *   from the delivery report, so an event is acked only once Kafka has it
 *   (acks=all, idempotence on).
 * - Delivery reports are served by the publishing threads while publishes
 *   flow (each publish polls without waiting, a full queue polls until
 *   there is room), as a plain librdkafka application does, and by the
 *   poll thread when publishing pauses. librdkafka then frees each message
 *   and its headers on the thread that allocated them: with the poll
 *   thread serving every report, the two threads fought over glibc's
 *   arena lock and produce throughput was about a third of a plain
 *   application's. User ack callbacks still run only on the poll thread:
 *   a report served elsewhere queues its ack there (kb->ackq) and wakes
 *   it, so no ack runs inside another caller's publish, under its locks.
 * - outstanding counts publishes whose ack has not run yet: it is raised
 *   before the produce call (the report may come first) and lowered after
 *   the ack ran, so flush == "outstanding reached 0" means every ack has
 *   returned. Waiters (flush, publishers blocked on a full queue) sleep on
 *   wcond; a report signals only when someone waits (seq_cst on both
 *   counters makes the check race-free, see kafka_outstanding_drop).
 * - A full librdkafka queue follows publish.backpressure: BLOCK waits for
 *   room (a report) up to publish.timeout.ms, FAIL and BUS_PUB_NONBLOCK
 *   return BUS_EAGAIN at once; either way the event stays with the caller.
 * - Stop flushes for close.timeout.ms, then purges what is left: librdkafka
 *   reports purged messages with _PURGE_QUEUE/_PURGE_INFLIGHT, so every
 *   ack still runs exactly once (BUS_ECANCELED), before stop returns.
 * - The first publish to each topic pokes the subscriptions whose pattern
 *   matches, so they find the topic the publish is creating without
 *   waiting for their next periodic discovery. It also asks the poll
 *   thread to fetch the topic's metadata at once: once connected,
 *   librdkafka 2.0 looks up a topic it has not seen only at its 1 s topic
 *   scan, so the first records to a new topic would wait up to a second.
 */
#include <string.h>

#include "alloc.h"
#include "event_impl.h"
#include "kafka_impl.h"
#include "topic.h"

#define KAFKA_POLL_MS 100
#define KAFKA_STANDBY_NS (2u * 1000000u) /* publishes quiet this long: poll */
#define KAFKA_PROBE_NS (2000u * 1000000u)
#define KAFKA_DR_LOG_EVERY 1000

/* What a message carries to its delivery report: a kafka_msg when the
 * publish has an ack callback, else the event itself with the low bit set
 * (events are malloc-aligned), which saves an allocation per publish. */
typedef struct kafka_msg {
    bus_event *ev;
    bus_ack_fn ack;
    void *ack_opaque;
    int err;                /* the outcome, once reported */
    struct kafka_msg *next; /* kb->ackq */
} kafka_msg;

/* The poll thread (acks run here). */
static _Thread_local bool kafka_tl_poll;

#define KAFKA_EV_TAG ((uintptr_t)1)

static void
kafka_outstanding_drop(kafka_broker *kb)
{
    /* seq_cst pairs with kafka_wait_outstanding: either the waiter sees
     * the new count, or this sees the waiter and signals under the lock. */
    atomic_fetch_sub_explicit(&kb->outstanding, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&kb->waiters, memory_order_seq_cst) > 0) {
        bus__mutex_lock(&kb->wmtx);
        bus__cond_broadcast(&kb->wcond);
        bus__mutex_unlock(&kb->wmtx);
    }
}

void
kafka_producer_wake(kafka_broker *kb)
{
    bus__mutex_lock(&kb->wmtx);
    bus__cond_broadcast(&kb->wcond);
    bus__mutex_unlock(&kb->wmtx);
}

/* @thread poll (or a flusher, inside rd_kafka_flush/poll). */
void
kafka_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    kafka_broker *kb = ((kafka_rkop *)opaque)->kb;
    kafka_msg *c = NULL;
    bus_event *ev;
    int err = BUS_OK;

    (void)rk;
    if (m->_private == NULL)
        return;
    if ((uintptr_t)m->_private & KAFKA_EV_TAG)
        ev = (bus_event *)((uintptr_t)m->_private & ~KAFKA_EV_TAG);
    else {
        c = m->_private;
        ev = c->ev;
    }
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        uint64_t n =
            atomic_fetch_add_explicit(&kb->st_nacked, 1, memory_order_relaxed);
        err = kafka_map_err(m->err);
        if (n % KAFKA_DR_LOG_EVERY == 0)
            bus_logf(
                &kb->log, err == BUS_ECANCELED ? BUS_LOG_INFO : BUS_LOG_WARN,
                "kafka",
                "delivery to %s failed: %s (%s -> %s%s); %llu "
                "failed so far",
                m->rkt != NULL ? rd_kafka_topic_name(m->rkt) : "?",
                rd_kafka_err2str(m->err), rd_kafka_err2name(m->err),
                bus_err_name(err), bus_err_retriable(err) ? ", retriable" : "",
                (unsigned long long)n + 1);
    } else {
        atomic_fetch_add_explicit(&kb->st_acked, 1, memory_order_relaxed);
        atomic_store_explicit(&kb->down, false, memory_order_relaxed);
    }
    if (c != NULL && !kafka_tl_poll) {
        /* Served by a publisher or a flusher: the ack goes to the poll
         * thread, which finishes the job (outstanding drops after it). */
        c->err = err;
        c->next = NULL;
        bool first;
        bus__mutex_lock(&kb->ackq_mtx);
        first = kb->ackq == NULL;
        if (kb->ackq_tail != NULL)
            kb->ackq_tail->next = c;
        else
            kb->ackq = c;
        kb->ackq_tail = c;
        if (first) /* the poll thread, standing back or not, takes all */
            bus__cond_signal(&kb->ackq_cond);
        bus__mutex_unlock(&kb->ackq_mtx);
        if (first)
            rd_kafka_queue_yield(kb->mainq); /* if in rd_kafka_poll */
        return;
    }
    if (c != NULL && c->ack != NULL)
        c->ack(c->ack_opaque, ev, err);
    bus_event_unref(ev);
    if (c != NULL)
        bus__free(c, sizeof(*c));
    kafka_outstanding_drop(kb);
}

typedef struct kafka_warm {
    struct kafka_warm *next;
    size_t size;
    char topic[];
} kafka_warm;

/* Asks the poll thread to look up ktopic's metadata (best effort). */
static void
kafka_warm_topic(kafka_broker *kb, const char *ktopic)
{
    size_t n = strlen(ktopic) + 1;
    kafka_warm *w = bus__alloc(sizeof(*w) + n);

    if (w == NULL)
        return; /* librdkafka's scan finds it within a second anyway */
    w->size = sizeof(*w) + n;
    memcpy(w->topic, ktopic, n);
    bus__mutex_lock(&kb->ackq_mtx);
    w->next = kb->warm;
    kb->warm = w;
    bus__cond_signal(&kb->ackq_cond);
    bus__mutex_unlock(&kb->ackq_mtx);
    rd_kafka_queue_yield(kb->mainq);
}

/* @thread poll (or stop). With fetch, looks the topics up; else only
 * frees the requests. */
static void
kafka_run_warm(kafka_broker *kb, bool fetch)
{
    kafka_warm *w;

    bus__mutex_lock(&kb->ackq_mtx);
    w = kb->warm;
    kb->warm = NULL;
    bus__mutex_unlock(&kb->ackq_mtx);
    while (w != NULL) { /* one lookup per topic: first publishes only */
        kafka_warm *next = w->next;
        rd_kafka_topic_t *rkt;
        const struct rd_kafka_metadata *md;
        if (fetch &&
            (rkt = rd_kafka_topic_new(kb->prod, w->topic, NULL)) != NULL) {
            if (rd_kafka_metadata(kb->prod, 0, rkt, &md, 2000) ==
                RD_KAFKA_RESP_ERR_NO_ERROR)
                rd_kafka_metadata_destroy(md);
            rd_kafka_topic_destroy(rkt);
        }
        bus__free(w, w->size);
        w = next;
    }
}

/* Runs the acks queued by reports served off the poll thread.
 * @thread poll (or stop, after the poll thread is gone). */
static void
kafka_run_queued_acks(kafka_broker *kb)
{
    kafka_msg *c;

    bus__mutex_lock(&kb->ackq_mtx);
    c = kb->ackq;
    kb->ackq = kb->ackq_tail = NULL;
    bus__mutex_unlock(&kb->ackq_mtx);
    while (c != NULL) {
        kafka_msg *next = c->next;
        if (c->ack != NULL)
            c->ack(c->ack_opaque, c->ev, c->err);
        bus_event_unref(c->ev);
        bus__free(c, sizeof(*c));
        kafka_outstanding_drop(kb);
        c = next;
    }
}

/* Waits until outstanding <= target, or the deadline (0: none) passes, or
 * (stop_on_close) the broker closes. True when the count was reached. */
static bool
kafka_wait_outstanding(kafka_broker *kb, int64_t target, uint64_t deadline,
                       bool stop_on_close)
{
    bool ok;

    atomic_fetch_add_explicit(&kb->waiters, 1, memory_order_seq_cst);
    bus__mutex_lock(&kb->wmtx);
    for (;;) {
        if (atomic_load_explicit(&kb->outstanding, memory_order_seq_cst) <=
            target) {
            ok = true;
            break;
        }
        if (stop_on_close &&
            atomic_load_explicit(&kb->closed, memory_order_acquire)) {
            ok = false;
            break;
        }
        if (deadline == 0) {
            bus__cond_wait(&kb->wcond, &kb->wmtx);
        } else if (!bus__cond_wait_until(&kb->wcond, &kb->wmtx, deadline)) {
            ok = atomic_load_explicit(&kb->outstanding, memory_order_seq_cst) <=
                 target;
            break;
        }
    }
    bus__mutex_unlock(&kb->wmtx);
    atomic_fetch_sub_explicit(&kb->waiters, 1, memory_order_seq_cst);
    return ok;
}

/* True the first time this broker publishes to btopic (best effort: a
 * full table stops remembering, which only costs later pokes). */
static bool
kafka_topic_first_seen(kafka_broker *kb, const char *btopic)
{
    uint64_t h = bus__hash(btopic, strlen(btopic)) | 1; /* 0: free slot */
    uint32_t i, slot = (uint32_t)(h % KAFKA_SEEN_CAP);

    for (i = 0; i < 16; i++) {
        _Atomic uint64_t *p = &kb->seen[(slot + i) % KAFKA_SEEN_CAP];
        uint64_t cur = atomic_load_explicit(p, memory_order_relaxed);
        if (cur == h)
            return false;
        if (cur == 0 &&
            atomic_compare_exchange_strong_explicit(
                p, &cur, h, memory_order_relaxed, memory_order_relaxed))
            return true;
        if (cur == h)
            return false;
    }
    return false;
}

int
kafka_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
              bus_ack_fn ack, void *ack_opaque)
{
    kafka_broker *kb = priv;
    char ktopic[KAFKA_TOPIC_MAX + 1], why[128];
    rd_kafka_headers_t *hdrs;
    rd_kafka_resp_err_t err;
    uint64_t deadline = 0;
    size_t key_len = ev->stream != NULL ? ev->stream_len : 0;
    kafka_msg *c = NULL;
    void *opq;
    int rv;

    /* acquire: pairs with kafka_close. */
    if (atomic_load_explicit(&kb->closed, memory_order_acquire))
        return BUS_ECLOSED;
    if (kafka_topic_name(kb, topic, ktopic, sizeof(ktopic), why, sizeof(why)) !=
        BUS_OK) {
        bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                 "publish: topic '%s' has no Kafka name: %s", topic, why);
        return BUS_EINVAL;
    }
    if ((rv = kafka_event_headers(kb, ev, &hdrs)) != BUS_OK)
        return rv;
    if (ack == NULL) {
        opq = (void *)((uintptr_t)ev | KAFKA_EV_TAG);
    } else {
        if ((c = bus__alloc(sizeof(*c))) == NULL) {
            rd_kafka_headers_destroy(hdrs);
            return BUS_ENOMEM;
        }
        c->ev = ev;
        c->ack = ack;
        c->ack_opaque = ack_opaque;
        opq = c;
    }
    /* Before the produce call: its report may run before it returns. */
    atomic_fetch_add_explicit(&kb->outstanding, 1, memory_order_seq_cst);
    for (;;) {
        /* No RD_KAFKA_MSG_F_COPY: the payload and the key live in ev,
         * which c keeps alive until the report. */
        err = rd_kafka_producev(
            kb->prod, RD_KAFKA_V_TOPIC(ktopic),
            RD_KAFKA_V_KEY(ev->stream, key_len),
            RD_KAFKA_V_VALUE((void *)ev->payload, ev->payload_len),
            RD_KAFKA_V_HEADERS(hdrs),
            RD_KAFKA_V_TIMESTAMP(ev->timestamp / 1000000),
            RD_KAFKA_V_OPAQUE(opq), RD_KAFKA_V_END);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            break;
        if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL &&
            !(flags & BUS_PUB_NONBLOCK) && !kb->bp_fail &&
            kb->publish_timeout_ms != 0) {
            /* Make room by serving delivery reports here, a slice at a
             * time, up to the deadline. */
            uint64_t now = kafka_now();
            if (deadline == 0)
                deadline =
                    kb->publish_timeout_ms < 0
                        ? UINT64_MAX
                        : now + (uint64_t)kb->publish_timeout_ms * 1000000u;
            if (now < deadline &&
                !atomic_load_explicit(&kb->closed, memory_order_acquire)) {
                uint64_t left = (deadline - now) / 1000000u;
                (void)rd_kafka_poll(kb->prod, left < 10 ? (int)left : 10);
                continue;
            }
        }
        atomic_fetch_sub_explicit(&kb->outstanding, 1, memory_order_seq_cst);
        rd_kafka_headers_destroy(hdrs); /* not taken on failure */
        if (c != NULL)
            bus__free(c, sizeof(*c));
        rv = kafka_map_err(err);
        if (atomic_load_explicit(&kb->closed, memory_order_acquire))
            rv = BUS_ECLOSED;
        bus_logf(&kb->log, rv == BUS_EAGAIN ? BUS_LOG_DEBUG : BUS_LOG_WARN,
                 "kafka", "publish to %s refused: %s (%s -> %s)", ktopic,
                 rd_kafka_err2str(err), rd_kafka_err2name(err),
                 bus_err_name(rv));
        return rv;
    }
    atomic_fetch_add_explicit(&kb->st_published, 1, memory_order_relaxed);
    if (kafka_topic_first_seen(kb, topic)) {
        kafka_warm_topic(kb, ktopic);
        kafka_poke_subs(kb, topic);
    }
    /* Serve reports that are ready, without waiting (see the top). */
    (void)rd_kafka_poll(kb->prod, 0);
    return BUS_OK;
}

int
kafka_flush(void *priv, int32_t timeout_ms)
{
    kafka_broker *kb = priv;
    uint64_t deadline =
        timeout_ms < 0 ? 0 : kafka_now() + (uint64_t)timeout_ms * 1000000u;

    if (atomic_load_explicit(&kb->outstanding, memory_order_seq_cst) == 0)
        return BUS_OK;
    /* rd_kafka_flush sends at once (ignores linger.ms) and serves reports
     * on this thread too; then wait for acks running on the poll thread. */
    (void)rd_kafka_flush(kb->prod, timeout_ms < 0 ? -1 : timeout_ms);
    if (!kafka_wait_outstanding(kb, 0, timeout_ms < 0 ? 0 : deadline, false))
        return BUS_ETIMEDOUT;
    return BUS_OK;
}

/* @thread poll: serves delivery reports and checks on a broker marked
 * down (librdkafka reports "all brokers down" but not their return). */
static void
kafka_poll_thread(void *arg)
{
    kafka_broker *kb = arg;

    uint64_t last = UINT64_MAX;

    kafka_tl_poll = true;
    while (!atomic_load_explicit(&kb->poll_stop, memory_order_acquire)) {
        uint64_t pub =
            atomic_load_explicit(&kb->st_published, memory_order_relaxed);
        kafka_run_queued_acks(kb);
        kafka_run_warm(kb, true);
        if (pub != last) {
            /* Publishes are flowing and serve the reports: stand back a
             * moment (acks queued meanwhile wake us at once). */
            last = pub;
            bus__mutex_lock(&kb->ackq_mtx);
            if (kb->ackq == NULL && kb->warm == NULL &&
                !atomic_load_explicit(&kb->poll_stop, memory_order_acquire))
                (void)bus__cond_wait_until(&kb->ackq_cond, &kb->ackq_mtx,
                                           kafka_now() + KAFKA_STANDBY_NS);
            bus__mutex_unlock(&kb->ackq_mtx);
            continue;
        }
        rd_kafka_poll(kb->prod, KAFKA_POLL_MS);
        if (atomic_load_explicit(&kb->down, memory_order_relaxed) &&
            kafka_now() >= kb->next_probe_ns) {
            const struct rd_kafka_metadata *md;
            kb->next_probe_ns = kafka_now() + KAFKA_PROBE_NS;
            if (rd_kafka_metadata(kb->prod, 0, NULL, &md, 1000) ==
                RD_KAFKA_RESP_ERR_NO_ERROR) {
                rd_kafka_metadata_destroy(md);
                atomic_store_explicit(&kb->down, false, memory_order_relaxed);
                bus_logf(&kb->log, BUS_LOG_INFO, "kafka",
                         "brokers reachable again");
            }
        }
    }
}

int
kafka_producer_start(kafka_broker *kb, char *errbuf, size_t errbuf_len)
{
    const struct rd_kafka_metadata *md;
    rd_kafka_resp_err_t err;
    rd_kafka_conf_t *conf;
    char errstr[512];
    int rv;

    if ((conf = kafka_conf_new(kb, NULL, errbuf, errbuf_len)) == NULL)
        return BUS_EINVAL;
    if ((kb->prod = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr,
                                 sizeof(errstr))) == NULL) {
        rd_kafka_conf_destroy(conf);
        if (errbuf != NULL)
            snprintf(errbuf, errbuf_len, "producer: %s", errstr);
        return BUS_EINVAL; /* rd_kafka_new fails on configuration */
    }
    /* Open blocks until the cluster answered once: a wrong address fails
     * here with BUS_EUNAVAIL instead of at the first publish. */
    err = rd_kafka_metadata(kb->prod, 0, NULL, &md, kb->open_timeout_ms);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rv = kafka_map_err(err);
        if (rv != BUS_EACCESS)
            rv = BUS_EUNAVAIL;
        if (errbuf != NULL)
            snprintf(errbuf, errbuf_len,
                     "cannot reach Kafka at %s within %d ms: %s (%s)",
                     kb->bootstrap, (int)kb->open_timeout_ms,
                     rd_kafka_err2str(err), rd_kafka_err2name(err));
        return rv;
    }
    rd_kafka_metadata_destroy(md);
    if ((kb->mainq = rd_kafka_queue_get_main(kb->prod)) == NULL)
        return BUS_ENOMEM;
    if ((rv = bus__thread_start(&kb->poll_thread, "bus-kafka-poll",
                                kafka_poll_thread, kb)) != BUS_OK)
        return rv;
    kb->poll_started = true;
    return BUS_OK;
}

void
kafka_producer_stop(kafka_broker *kb)
{
    uint64_t deadline;

    if (kb->prod == NULL)
        return;
    deadline = kafka_now() + (uint64_t)kb->close_timeout_ms * 1000000u;
    if (atomic_load_explicit(&kb->outstanding, memory_order_seq_cst) > 0) {
        (void)rd_kafka_flush(kb->prod, kb->close_timeout_ms);
        if (!kafka_wait_outstanding(kb, 0, deadline, false)) {
            bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                     "close: %lld publishes not acknowledged after %d ms: "
                     "cancelled",
                     (long long)atomic_load(&kb->outstanding),
                     (int)kb->close_timeout_ms);
            rd_kafka_purge(kb->prod,
                           RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        }
    }
    /* Purged messages are reported at once: wait for the poll thread to
     * run their acks, then stop it and finish whatever is left here. */
    deadline = kafka_now() + 5000u * 1000000u;
    if (kb->poll_started)
        (void)kafka_wait_outstanding(kb, 0, deadline, false);
    if (kb->poll_started) {
        atomic_store_explicit(&kb->poll_stop, true, memory_order_release);
        bus__mutex_lock(&kb->ackq_mtx);
        bus__cond_signal(&kb->ackq_cond);
        bus__mutex_unlock(&kb->ackq_mtx);
        bus__thread_join(&kb->poll_thread);
        kb->poll_started = false;
    }
    kafka_tl_poll = true; /* this thread now stands in for it */
    while (atomic_load_explicit(&kb->outstanding, memory_order_seq_cst) > 0 &&
           kafka_now() < deadline) {
        rd_kafka_poll(kb->prod, 10);
        kafka_run_queued_acks(kb);
    }
    kafka_run_queued_acks(kb);
    kafka_run_warm(kb, false);
    kafka_tl_poll = false;
    if (atomic_load(&kb->outstanding) > 0)
        bus_logf(&kb->log, BUS_LOG_ERR, "kafka",
                 "close: %lld acks never ran (librdkafka kept the "
                 "messages)",
                 (long long)atomic_load(&kb->outstanding));
}
