/*
 * The Kafka broker's consumers and subscriptions (contract:
 * <bus/broker_kafka.h>).
 *
 * Design:
 * - One librdkafka consumer and one thread per broker for the group-less
 *   subscriptions, and one per consumer group: a bus context may hold
 *   thousands of subscriptions, which share these. A record is handed to
 *   every live subscription whose pattern matches its topic (found with a
 *   topic index, topic.h); in a group, to one of them (the group shares
 *   the records). Handing over uses BUS_PUB_NONBLOCK, so the thread never
 *   sleeps inside the bus and stays free to serve rebalances; per
 *   partition, records reach each subscription in offset order.
 * - Every handed-over record is first pushed on the tracker of its
 *   (subscription, partition) (kafka_track.h). A partition's commit
 *   position is the lowest of: the offset after the last record handed to
 *   all its targets, the lowest unfinished offset of each subscription's
 *   tracker, and the floor left by departed subscriptions. Acks (from any
 *   thread) finish entries; the thread stores positions that moved
 *   (rd_kafka_offsets_store, which stores exactly what it is given: the
 *   next offset to read) and librdkafka's auto-commit commits them. So no
 *   offset is ever committed past a record whose handling did not finish.
 * - Hand-over cost: records of one partition that librdkafka returns
 *   together (a run in one rd_kafka_consume_batch_queue batch) and that
 *   have a single target go through kafka_process_run: one lock round per
 *   record (the round after a call also pushes the next record on the
 *   tracker), and the acks an inline handler gives during a call are
 *   deferred to that round (c->deferring) instead of taking the lock
 *   each. Records are converted one at a time (never a batch of events
 *   alive at once), so glibc's thread cache reuses librdkafka's header
 *   list and our event memory record after record.
 * - Backpressure: when a target refuses a record (its queue full, or its
 *   tracker at max.inflight), the thread retries for up to a millisecond
 *   (bus workers drain fast), then keeps the record ("held") for the
 *   targets still to do and pauses the partition; it retries with a
 *   growing backoff (1 to 64 ms, at once when an ack frees tracker room)
 *   and resumes the partition when all took it. librdkafka 2.0 pauses at
 *   the position after the last record returned, which is the held one,
 *   and drops records of the partition fetched before (op version
 *   barrier), so nothing is skipped and nothing piles up.
 * - RETRY acks put the entry in KT_RETRY with a due time; the thread
 *   redelivers due entries (same event, same token) to that subscription
 *   only. REJECT counts as finished: the pipeline dead-lettered it, or the
 *   handler gave up.
 * - Rebalance (groups; the callback runs on the thread inside
 *   consumer_poll): on revoke the partitions stop delivering (held
 *   records dropped: never handled), the thread waits up to
 *   rebalance.timeout.ms for their in-flight handlers, commits the
 *   positions synchronously, then releases them. While the consumer is
 *   stopping it does not wait: the bus has stopped handling by then.
 * - Group-less consumers assign partitions themselves (no group join). A
 *   new subscription asks the thread for a discovery and waits for it:
 *   partitions of matching topics nobody reads yet start at their current
 *   end (start=latest), so what is published after subscribe returns is
 *   delivered; partitions found later (new topics, a publish's poke,
 *   every discover.interval.ms) start at their beginning. Partitions
 *   already read for other subscriptions are shared from where the
 *   consumer is.
 * - A subscription leaving a group consumer folds its unfinished offsets
 *   into the partitions' floors and, when its pattern was the last user
 *   of a topic subscription, changes the consumer's subscription: the
 *   rebalance that follows commits no further than the floor, so another
 *   member redelivers what it had not finished.
 * - Lifetimes: subscriptions are refcounted (the handle, plus the thread
 *   while it holds one as a target) and freed by the last holder; acks
 *   find a handle in kb's registry first and are ignored once it has
 *   left. Unsubscribe waits until the thread is not inside the
 *   subscription's deliver function (the thread checks "dead" under mtx
 *   before each call), except from one of this broker's consumer threads,
 *   where waiting could deadlock.
 *
 * Lock order: kb->smtx, then a consumer's mtx. Deliver functions and
 * blocking librdkafka calls run with neither held.
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "event_impl.h"
#include "kafka_impl.h"
#include "topic.h"

#define KAFKA_SUB_POLL_MS 100
#define KAFKA_HOLD_MIN_MS 1
#define KAFKA_HOLD_MAX_MS 64
#define KAFKA_SPIN_NS (1000u * 1000u) /* retry a refusal this long first */
#define KAFKA_STORE_EVERY_NS (20u * 1000000u)
#define KAFKA_FAST_DISCOVER_NS (50u * 1000000u)
#define KAFKA_FAST_DISCOVERIES 40 /* 2 s of quick retries after a poke */
#define KAFKA_VIEW_TTL_NS (250u * 1000000u)
#define KAFKA_RETRY_BATCH 64
#define KAFKA_DRAIN_MAX 4096
#define KAFKA_BATCH 256
#define KAFKA_MS(ms) ((uint64_t)(ms)*1000000u)

/* The consumer whose thread this is (NULL elsewhere). */
static _Thread_local kafka_cons *kafka_tl_cons;

static void kafka_ack_locked(kafka_cons *c, kafka_sub *s, uint64_t token,
                             bus_result res);
static void kafka_on_message(kafka_cons *c, rd_kafka_message_t *m);
static void kafka_apply_defacks(kafka_cons *c);

static uint64_t
kafka_token(const kafka_part *p, int64_t off)
{
    return ((uint64_t)(p->slot + 1) << KAFKA_OFFSET_BITS) | (uint64_t)off;
}

static bool
kafka_on_broker_thread(const kafka_broker *kb)
{
    return kafka_tl_cons != NULL && kafka_tl_cons->kb == kb;
}

/* Wakes the thread from consumer_poll. Never once it is closing: the
 * consumer queue is then forwarded to rd_kafka_consumer_close's own
 * queue, and a yield there ends close before the group has terminated
 * (rd_kafka_destroy would then wait for it forever). @locks c->mtx. */
static void
kafka_cons_wake(kafka_cons *c)
{
    if (!c->closing)
        rd_kafka_queue_yield(c->q);
}

/* ---- The registry of live subscriptions (kb->smtx held) ---------------- */

#define KAFKA_REG_GONE ((kafka_sub *)(uintptr_t)1)

static uint32_t
kafka_reg_hash(const kafka_sub *s, uint32_t cap)
{
    uint64_t h = (uint64_t)(uintptr_t)s * UINT64_C(0x9E3779B97F4A7C15);

    return (uint32_t)(h >> 32) & (cap - 1);
}

static bool
kafka_reg_has(const kafka_broker *kb, const kafka_sub *s)
{
    uint32_t i, n;

    if (kb->reg_cap == 0)
        return false;
    for (i = kafka_reg_hash(s, kb->reg_cap), n = 0; n < kb->reg_cap;
         i = (i + 1) & (kb->reg_cap - 1), n++) {
        if (kb->reg[i] == s)
            return true;
        if (kb->reg[i] == NULL)
            return false;
    }
    return false;
}

static int
kafka_reg_add(kafka_broker *kb, kafka_sub *s)
{
    uint32_t i;

    if ((kb->reg_used + 1) * 2 > kb->reg_cap) {
        uint32_t ncap = kb->reg_cap ? kb->reg_cap : 64, j;
        kafka_sub **nr;
        while ((kb->reg_n + 1) * 2 > ncap)
            ncap *= 2;
        if ((nr = bus__zalloc(ncap * sizeof(*nr))) == NULL)
            return BUS_ENOMEM;
        for (j = 0; j < kb->reg_cap; j++) {
            kafka_sub *x = kb->reg[j];
            if (x == NULL || x == KAFKA_REG_GONE)
                continue;
            for (i = kafka_reg_hash(x, ncap); nr[i] != NULL;
                 i = (i + 1) & (ncap - 1))
                ;
            nr[i] = x;
        }
        if (kb->reg != NULL)
            bus__free(kb->reg, kb->reg_cap * sizeof(*kb->reg));
        kb->reg = nr;
        kb->reg_cap = ncap;
        kb->reg_used = kb->reg_n;
    }
    for (i = kafka_reg_hash(s, kb->reg_cap);
         kb->reg[i] != NULL && kb->reg[i] != KAFKA_REG_GONE;
         i = (i + 1) & (kb->reg_cap - 1))
        ;
    if (kb->reg[i] == NULL)
        kb->reg_used++;
    kb->reg[i] = s;
    kb->reg_n++;
    return BUS_OK;
}

static bool
kafka_reg_del(kafka_broker *kb, const kafka_sub *s)
{
    uint32_t i, n;

    if (kb->reg_cap == 0)
        return false;
    for (i = kafka_reg_hash(s, kb->reg_cap), n = 0; n < kb->reg_cap;
         i = (i + 1) & (kb->reg_cap - 1), n++) {
        if (kb->reg[i] == s) {
            kb->reg[i] = KAFKA_REG_GONE;
            kb->reg_n--;
            return true;
        }
        if (kb->reg[i] == NULL)
            return false;
    }
    return false;
}

/* ---- Subscriptions ------------------------------------------------------- */

static void
kafka_sub_free(kafka_sub *s)
{
    uint32_t i;

    if (s == NULL)
        return;
    for (i = 0; i < s->n_trk; i++)
        kt_clear(&s->trk[i]);
    if (s->trk != NULL)
        bus__free(s->trk, s->n_trk * sizeof(*s->trk));
    if (s->pattern != NULL)
        bus__free(s->pattern, s->pattern_size);
    if (s->substr != NULL)
        bus__free(s->substr, s->substr_size);
    bus__free(s, sizeof(*s));
}

/* Drops a reference taken under mtx; frees s when it was the last.
 * Not under mtx. */
static void
kafka_sub_release(kafka_cons *c, kafka_sub *s)
{
    bool last;

    bus__mutex_lock(&c->mtx);
    last = --s->refs == 0;
    bus__mutex_unlock(&c->mtx);
    if (last)
        kafka_sub_free(s);
}

/* s's tracker for slot, grown on demand. @locks c->mtx. */
static kt *
kafka_sub_trk(kafka_cons *c, kafka_sub *s, uint32_t slot)
{
    if (slot >= s->n_trk) {
        uint32_t n = c->n_parts > slot + 1 ? c->n_parts : slot + 1, i;
        kt *nt = bus__realloc(s->trk, s->n_trk * sizeof(*nt), n * sizeof(*nt));
        if (nt == NULL)
            return NULL;
        for (i = s->n_trk; i < n; i++)
            kt_init(&nt[i], c->kb->max_inflight);
        s->trk = nt;
        s->n_trk = n;
    }
    return &s->trk[slot];
}

/* ---- Partitions ------------------------------------------------------------
 */

static void
kafka_part_drop_pending(kafka_part *p, kafka_sub **free_list)
{
    uint32_t i;

    for (i = 0; i < p->n_pending; i++) {
        kafka_sub *s = p->pending[i];
        if (--s->refs == 0) { /* chain for freeing outside the lock */
            s->next = *free_list;
            *free_list = s;
        }
    }
    p->n_pending = 0;
}

static void
kafka_part_free(kafka_part *p)
{
    if (p == NULL)
        return;
    bus_event_unref(p->held);
    if (p->held_msg != NULL)
        rd_kafka_message_destroy(p->held_msg);
    if (p->subs != NULL)
        bus__free(p->subs, p->cap_subs * sizeof(*p->subs));
    if (p->pending != NULL)
        bus__free(p->pending, p->cap_pending * sizeof(*p->pending));
    if (p->ktopic != NULL)
        bus__free(p->ktopic, p->ktopic_size);
    bus__free(p, sizeof(*p));
}

/* The partition, or NULL. Lock-free on the consumer's thread (the only
 * writer of the array), else @locks c->mtx. */
static kafka_part *
kafka_part_find(kafka_cons *c, const char *ktopic, int32_t partition)
{
    uint32_t i;

    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        if (p->partition == partition && strcmp(p->ktopic, ktopic) == 0)
            return p;
    }
    return NULL;
}

static bool
kafka_part_add_sub(kafka_part *p, kafka_sub *s)
{
    if (p->n_subs == p->cap_subs) {
        uint32_t ncap = p->cap_subs ? p->cap_subs * 2 : 4;
        kafka_sub **ns = bus__realloc(p->subs, p->cap_subs * sizeof(*ns),
                                      ncap * sizeof(*ns));
        if (ns == NULL)
            return false;
        p->subs = ns;
        p->cap_subs = ncap;
    }
    p->subs[p->n_subs++] = s;
    return true;
}

static void
kafka_part_del_sub(kafka_part *p, kafka_sub *s)
{
    uint32_t i;

    for (i = 0; i < p->n_subs; i++)
        if (p->subs[i] == s) {
            p->subs[i] = p->subs[--p->n_subs];
            return;
        }
}

/* Recomputes p's matching subscriptions from the index. @locks c->mtx. */
static void
kafka_part_match(kafka_cons *c, kafka_part *p)
{
    void *small[32], **buf = small;
    size_t n, cap = 32, i;

    p->n_subs = 0;
    if (p->btopic == NULL || c->index == NULL)
        return;
    n = bus__tindex_match(c->index, p->btopic, p->btopic_len, buf, cap);
    if (n > cap) {
        cap = n;
        if ((buf = bus__alloc(cap * sizeof(*buf))) == NULL) {
            bus_logf(&c->kb->log, BUS_LOG_ERR, "kafka",
                     "%s [%d]: no memory to list its subscriptions", p->ktopic,
                     (int)p->partition);
            return;
        }
        n = bus__tindex_match(c->index, p->btopic, p->btopic_len, buf, cap);
    }
    for (i = 0; i < n && i < cap; i++) {
        kafka_sub *s = buf[i];
        if (!s->dead)
            (void)kafka_part_add_sub(p, s);
    }
    if (buf != small)
        bus__free(buf, cap * sizeof(*buf));
}

/* Finds or creates. @thread the consumer's, @locks c->mtx. */
static kafka_part *
kafka_part_get(kafka_cons *c, const char *ktopic, int32_t partition)
{
    kafka_part *p = kafka_part_find(c, ktopic, partition);
    const char *bt;

    if (p != NULL)
        return p;
    if (c->n_parts >= KAFKA_MAX_SLOTS)
        return NULL;
    if (c->n_parts == c->cap_parts) {
        uint32_t ncap = c->cap_parts ? c->cap_parts * 2 : 16;
        kafka_part **np = bus__realloc(c->parts, c->cap_parts * sizeof(*np),
                                       ncap * sizeof(*np));
        if (np == NULL)
            return NULL;
        c->parts = np;
        c->cap_parts = ncap;
    }
    if ((p = bus__zalloc(sizeof(*p))) == NULL)
        return NULL;
    if ((p->ktopic = bus__strdup(ktopic, &p->ktopic_size)) == NULL) {
        bus__free(p, sizeof(*p));
        return NULL;
    }
    p->partition = partition;
    p->next = -1;
    p->stored = -1;
    p->floor = INT64_MAX;
    if ((bt = kafka_bus_topic(c->kb, p->ktopic)) != NULL) {
        p->btopic = bt;
        p->btopic_len = strlen(bt);
    } /* else records of this partition are skipped */
    p->slot = c->n_parts;
    c->parts[c->n_parts++] = p;
    return p;
}

/* The commit position of p: see the top comment. -1: nothing to store.
 * @locks c->mtx. */
static int64_t
kafka_position(kafka_cons *c, kafka_part *p)
{
    int64_t pos = p->next;
    uint32_t i;

    (void)c;
    if (pos < 0)
        return -1;
    if (p->floor < pos)
        pos = p->floor;
    for (i = 0; i < p->n_subs; i++) {
        kafka_sub *s = p->subs[i];
        if (p->slot < s->n_trk && s->trk[p->slot].n > 0) {
            int64_t h = kt_position(&s->trk[p->slot]);
            if (h < pos)
                pos = h;
        }
    }
    return pos;
}

static void
kafka_mark_dirty(kafka_cons *c, kafka_part *p)
{
    if (c->group != NULL && !p->dirty) {
        p->dirty = true;
        c->n_dirty++;
    }
}

/* Resets p for a new assignment or a release. @locks c->mtx. */
static void
kafka_part_reset(kafka_cons *c, kafka_part *p)
{
    uint32_t i;

    for (i = 0; i < p->n_subs; i++)
        if (p->slot < p->subs[i]->n_trk)
            kt_clear(&p->subs[i]->trk[p->slot]);
    p->next = -1;
    p->floor = INT64_MAX;
    p->stored = -1;
    p->revoking = false;
    if (p->dirty) {
        p->dirty = false;
        c->n_dirty--;
    }
}

/* @thread the consumer's */
static void
kafka_part_pause(kafka_cons *c, kafka_part *p, bool pause)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_resp_err_t err;

    if (p->paused == pause)
        return;
    if ((l = rd_kafka_topic_partition_list_new(1)) == NULL)
        return;
    rd_kafka_topic_partition_list_add(l, p->ktopic, p->partition);
    err = pause ? rd_kafka_pause_partitions(c->rk, l)
                : rd_kafka_resume_partitions(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        bus_logf(&c->kb->log, BUS_LOG_WARN, "kafka", "cannot %s %s [%d]: %s",
                 pause ? "pause" : "resume", p->ktopic, (int)p->partition,
                 rd_kafka_err2name(err));
        return;
    }
    p->paused = pause;
    if (pause)
        atomic_fetch_add_explicit(&c->kb->st_pauses, 1, memory_order_relaxed);
}

/* Resumes a partition whose held record went through. */
static void
kafka_part_resume(kafka_cons *c, kafka_part *p, int64_t next)
{
    p->held_backoff_ms = 0;
    if (p->reseek) {
        rd_kafka_topic_partition_list_t *l =
            rd_kafka_topic_partition_list_new(1);
        p->reseek = false;
        if (l != NULL) {
            rd_kafka_error_t *e;
            rd_kafka_topic_partition_list_add(l, p->ktopic, p->partition)
                ->offset = next;
            if ((e = rd_kafka_seek_partitions(c->rk, l, 0)) != NULL) {
                bus_logf(&c->kb->log, BUS_LOG_WARN, "kafka",
                         "seek %s [%d] to %lld: %s", p->ktopic,
                         (int)p->partition, (long long)next,
                         rd_kafka_error_string(e));
                rd_kafka_error_destroy(e);
            }
            rd_kafka_topic_partition_list_destroy(l);
        }
    }
    kafka_part_pause(c, p, false);
}

/* ---- Handing records to the bus --------------------------------------------
 */

/* Copies p's targets for one record into c->targets, with a reference
 * each: every matching subscription, or one of them in a group. Returns
 * the count. @locks c->mtx. */
static uint32_t
kafka_targets(kafka_cons *c, kafka_part *p)
{
    uint32_t n = c->group != NULL ? (p->n_subs > 0) : p->n_subs, i;

    if (n > c->cap_targets) {
        kafka_sub **nt = bus__realloc(c->targets, c->cap_targets * sizeof(*nt),
                                      n * sizeof(*nt));
        if (nt == NULL)
            return UINT32_MAX;
        c->targets = nt;
        c->cap_targets = n;
    }
    if (c->group != NULL && n == 1)
        c->targets[0] = p->subs[(uint32_t)p->partition % p->n_subs];
    else
        for (i = 0; i < n; i++)
            c->targets[i] = p->subs[i];
    for (i = 0; i < n; i++)
        c->targets[i]->refs++;
    return n;
}

/* Calls s's deliver function with ev (a reference of the bus's is the
 * caller's to take). A full queue usually drains within a moment: a
 * refusal is retried briefly before the caller pays for a pause and a
 * refetch. Returns fn's answer. @thread the consumer's, no lock held,
 * c->calling set. */
static int
kafka_call(kafka_sub *s, kafka_part *p, bus_event *ev, int64_t off)
{
    uint64_t t0 = 0;
    int rv;

    for (;;) {
        rv = s->fn(s->opaque, p->btopic, ev, kafka_token(p, off),
                   BUS_PUB_NONBLOCK);
        if (rv != BUS_EAGAIN)
            return rv;
        if (t0 == 0)
            t0 = kafka_now();
        else if (kafka_now() - t0 > KAFKA_SPIN_NS)
            return rv;
        bus__thread_yield();
    }
}

/* After a call: clears c->calling, applies the acks the handler gave
 * during it and wakes an unsubscribe waiting for the call to end.
 * @locks c->mtx */
static void
kafka_call_done(kafka_cons *c)
{
    c->calling = NULL;
    kafka_apply_defacks(c);
    if (c->calling_waiters > 0)
        bus__cond_broadcast(&c->cond);
}

/* Hands ev to s (tracker first: the ack may come before fn returns).
 * Returns BUS_OK when s took it or is gone, else its refusal. When s took
 * it (or is gone), s's reference is dropped (*gone gets s when that was
 * the last one, for the caller to free) and, with advance, the partition
 * records that off went to all its targets: all in the one lock round
 * after the call, the common case costing two lock rounds in all. */
static int
kafka_offer(kafka_cons *c, kafka_part *p, kafka_sub *s, bus_event *ev,
            int64_t off, bool advance, kafka_sub **gone)
{
    bus_event *back = NULL;
    kt *t;
    int rv;

    bus__mutex_lock(&c->mtx);
    if (s->dead) {
        rv = BUS_OK;
        goto done_locked;
    }
    if ((t = kafka_sub_trk(c, s, p->slot)) == NULL) {
        bus__mutex_unlock(&c->mtx);
        return BUS_ENOMEM;
    }
    if ((rv = kt_push(t, off, bus_event_ref(ev))) != BUS_OK) {
        if (rv == BUS_EAGAIN)
            c->waiting_room = true;
        bus__mutex_unlock(&c->mtx);
        bus_event_unref(ev);
        return rv;
    }
    c->calling = s;
    bus__mutex_unlock(&c->mtx);
    c->deferring = s;

    bus_event_ref(ev); /* the bus's, if it takes it */
    rv = kafka_call(s, p, ev, off);

    bus__mutex_lock(&c->mtx);
    kafka_call_done(c);
    if (rv != BUS_OK) {
        (void)kt_cancel_last(t, &back); /* no handler saw it */
        bus__mutex_unlock(&c->mtx);
        bus_event_unref(back);
        bus_event_unref(ev); /* the bus's, which it did not take */
        atomic_fetch_add_explicit(&c->kb->st_refused, 1, memory_order_relaxed);
        return rv;
    }
    atomic_fetch_add_explicit(&c->kb->st_delivered, 1, memory_order_relaxed);
done_locked:
    if (--s->refs == 0)
        *gone = s;
    if (advance && p->assigned && !p->revoking && off + 1 > p->next) {
        p->next = off + 1;
        kafka_mark_dirty(c, p);
    }
    bus__mutex_unlock(&c->mtx);
    return rv;
}

/* Records that a record was handed to all its targets. */
static void
kafka_advance(kafka_cons *c, kafka_part *p, int64_t off)
{
    bus__mutex_lock(&c->mtx);
    if (p->assigned && !p->revoking && off + 1 > p->next) {
        p->next = off + 1;
        kafka_mark_dirty(c, p);
    }
    bus__mutex_unlock(&c->mtx);
}

/* Keeps a record for the targets in pend[0..n) (references taken) and
 * pauses its partition. Takes ev or msg. */
static void
kafka_hold(kafka_cons *c, kafka_part *p, bus_event *ev, rd_kafka_message_t *msg,
           int64_t off, kafka_sub **pend, uint32_t n)
{
    uint32_t b = p->held_backoff_ms, i;
    kafka_sub *gone = NULL;

    bus__mutex_lock(&c->mtx);
    if (n > p->cap_pending) {
        kafka_sub **np = bus__realloc(p->pending, p->cap_pending * sizeof(*np),
                                      n * sizeof(*np));
        if (np != NULL) {
            p->pending = np;
            p->cap_pending = n;
        }
    }
    if (n <= p->cap_pending) {
        for (i = 0; i < n; i++)
            p->pending[i] = pend[i];
        p->n_pending = n;
    } else {
        /* No room to remember who is left: all targets get it again. */
        for (i = 0; i < n; i++)
            if (--pend[i]->refs == 0) {
                pend[i]->next = gone;
                gone = pend[i];
            }
        p->n_pending = 0;
        msg = NULL;
    }
    p->held = ev;
    p->held_msg = msg;
    p->held_all = msg != NULL || n > p->cap_pending;
    p->held_off = off;
    bus__mutex_unlock(&c->mtx);
    while (gone != NULL) {
        kafka_sub *x = gone;
        gone = x->next;
        kafka_sub_free(x);
    }
    c->n_held++;
    b = b == 0 ? KAFKA_HOLD_MIN_MS
               : (b * 2 > KAFKA_HOLD_MAX_MS ? KAFKA_HOLD_MAX_MS : b * 2);
    p->held_backoff_ms = b;
    p->held_due_ns = kafka_now() + KAFKA_MS(b);
    kafka_part_pause(c, p, true);
}

/* Hands ev (taken) to its targets: fresh ones (from p->subs) when pend is
 * NULL, else the n subscriptions in pend (references owned). Returns true
 * when it went through, false when held. */
static bool
kafka_fanout(kafka_cons *c, kafka_part *p, bus_event *ev, int64_t off,
             kafka_sub **pend, uint32_t n)
{
    uint32_t i, n_left = 0;

    if (pend == NULL) {
        bus__mutex_lock(&c->mtx);
        n = kafka_targets(c, p);
        bus__mutex_unlock(&c->mtx);
        if (n == UINT32_MAX) { /* no memory for the list: try later */
            kafka_hold(c, p, ev, NULL, off, NULL, 0);
            p->held_all = true;
            return false;
        }
        pend = c->targets;
    }
    if (n == 0) {
        kafka_advance(c, p, off);
        bus_event_unref(ev);
        return true;
    }
    /* Those that refuse are compacted at the front of pend, in order. */
    for (i = 0; i < n; i++) {
        kafka_sub *s = pend[i], *gone = NULL;
        bool last = i == n - 1 && n_left == 0;
        if (kafka_offer(c, p, s, ev, off, last, &gone) != BUS_OK)
            pend[n_left++] = s;
        if (gone != NULL)
            kafka_sub_free(gone);
    }
    if (n_left > 0) {
        kafka_hold(c, p, ev, NULL, off, pend, n_left);
        return false;
    }
    bus_event_unref(ev);
    return true;
}

/* Converts and hands over one record (msg, taken). True when it went
 * through (or was skipped), false when it is now held. */
static bool
kafka_process(kafka_cons *c, kafka_part *p, rd_kafka_message_t *msg)
{
    int64_t off = msg->offset;
    bus_event *ev;

    if (p->btopic == NULL) {
        rd_kafka_message_destroy(msg);
        kafka_advance(c, p, off);
        return true;
    }
    if ((uint64_t)off > KAFKA_OFFSET_MASK) {
        /* 2^48 records in one partition: not representable in a token. */
        bus_logf(&c->kb->log, BUS_LOG_ERR, "kafka",
                 "%s [%d] @%lld: offset too large for a delivery token",
                 p->ktopic, (int)p->partition, (long long)off);
        kafka_hold(c, p, NULL, msg, off, NULL, 0);
        return false;
    }
    if (kafka_record_event(c->kb, p, msg, &ev) != BUS_OK) {
        kafka_hold(c, p, NULL, msg, off, NULL, 0); /* ENOMEM: later */
        return false;
    }
    rd_kafka_message_destroy(msg);
    return kafka_fanout(c, p, ev, off, NULL, 0);
}

/* The only target of p's records, with a reference, or NULL when there
 * are none or several (the general path handles those). @locks c->mtx. */
static kafka_sub *
kafka_single_target(kafka_cons *c, kafka_part *p)
{
    kafka_sub *s;

    if (p->n_subs == 0 || (c->group == NULL && p->n_subs != 1))
        return NULL;
    s = p->subs[c->group != NULL ? (uint32_t)p->partition % p->n_subs : 0];
    if (s->dead)
        return NULL; /* unsubscribed during a close: still in p->subs */
    s->refs++;
    return s;
}

/* Converts msg (taken on success). @thread the consumer's. */
static bool
kafka_convert(kafka_cons *c, kafka_part *p, rd_kafka_message_t *msg,
              bus_event **ev)
{
    if ((uint64_t)msg->offset > KAFKA_OFFSET_MASK ||
        kafka_record_event(c->kb, p, msg, ev) != BUS_OK)
        return false; /* the per-record path holds it */
    rd_kafka_message_destroy(msg);
    return true;
}

/* Converts and hands over a run of records of p (msgs[0..n), consecutive
 * in one librdkafka batch) to p's single target, with one lock round per
 * record instead of four: the round after a record's call also pushes the
 * next record on the tracker (converted meanwhile, outside the lock) and
 * applies the acks an inline handler gave during the call. One record at
 * a time, so that librdkafka's header list and our event are freed before
 * the next are allocated (glibc reuses them from its thread cache).
 * Returns how many records it took (0: none, use the per-record path for
 * msgs[0]). A refused record is held as kafka_fanout holds it; a record
 * this cannot take (no room, target gone, conversion failed) ends the run
 * and goes to the per-record path. @thread the consumer's. */
static uint32_t
kafka_process_run(kafka_cons *c, kafka_part *p, rd_kafka_message_t **msgs,
                  uint32_t n)
{
    bus_event *cur, *nxt;
    int64_t off = msgs[0]->offset, noff;
    uint32_t taken = 1, delivered = 0;
    kafka_sub *s, *gone = NULL;
    kt *t;
    int rv;

    if (p->btopic == NULL || !kafka_convert(c, p, msgs[0], &cur))
        return 0;
    bus__mutex_lock(&c->mtx);
    if ((s = kafka_single_target(c, p)) == NULL) {
        bus__mutex_unlock(&c->mtx);
        (void)kafka_fanout(c, p, cur, off, NULL, 0);
        return taken;
    }
    if ((t = kafka_sub_trk(c, s, p->slot)) == NULL || t->n >= t->max ||
        kt_push(t, off, cur) != BUS_OK) {
        s->refs--; /* p->subs holds one too: never the last */
        bus__mutex_unlock(&c->mtx);
        (void)kafka_fanout(c, p, cur, off, NULL, 0); /* holds it */
        return taken;
    }
    /* The tracker took our reference. It keeps cur alive through the
     * call: an ack can only come once the bus took cur (with a reference
     * of its own), unsubscribe waits for calling to clear before it
     * empties trackers, and revocations run on this thread. After an
     * accepted call cur is not touched again; after a refusal the
     * reference the bus did not take is ours. */
    c->calling = s;
    bus__mutex_unlock(&c->mtx);
    for (;;) {
        c->deferring = s;
        bus_event_ref(cur); /* the bus's, if it takes it */
        rv = kafka_call(s, p, cur, off);
        nxt = NULL;
        noff = taken < n ? msgs[taken]->offset : -1;
        if (rv == BUS_OK && taken < n && kafka_convert(c, p, msgs[taken], &nxt))
            taken++;

        bus__mutex_lock(&c->mtx);
        kafka_call_done(c);
        if (rv != BUS_OK) {
            /* No handler saw it. The reference the bus did not take is
             * ours now (for the hold); the tracker drops its own. */
            (void)kt_cancel_last(t, NULL);
            bus__mutex_unlock(&c->mtx);
            break;
        }
        delivered++;
        if (p->assigned && !p->revoking && off + 1 > p->next) {
            p->next = off + 1;
            kafka_mark_dirty(c, p);
        }
        cur = NULL; /* the tracker's and the bus's now */
        if (nxt != NULL && !s->dead && t->n < t->max &&
            kt_push(t, noff, nxt) == BUS_OK) {
            c->calling = s;
            bus__mutex_unlock(&c->mtx);
            cur = nxt;
            off = noff;
            continue;
        }
        if (--s->refs == 0)
            gone = s;
        bus__mutex_unlock(&c->mtx);
        break;
    }
    atomic_fetch_add_explicit(&c->kb->st_delivered, delivered,
                              memory_order_relaxed);
    if (gone != NULL)
        kafka_sub_free(gone);
    if (cur != NULL) {
        /* Refused: kept for s (its reference goes to the hold), the
         * partition paused. */
        atomic_fetch_add_explicit(&c->kb->st_refused, 1, memory_order_relaxed);
        kafka_hold(c, p, cur, NULL, off, &s, 1);
    } else if (nxt != NULL) {
        (void)kafka_fanout(c, p, nxt, noff, NULL, 0); /* the general path */
    }
    return taken;
}

/* Hands over a batch of messages (taken): runs of one partition go
 * through kafka_process_run, the rest through kafka_on_message. */
static void
kafka_on_batch(kafka_cons *c, rd_kafka_message_t **msgs, uint32_t n)
{
    uint32_t i = 0, j;

    while (i < n) {
        rd_kafka_message_t *m = msgs[i];
        kafka_part *p = c->last_part;
        for (j = i + 1;
             m->err == RD_KAFKA_RESP_ERR_NO_ERROR && j < n &&
             msgs[j]->err == RD_KAFKA_RESP_ERR_NO_ERROR &&
             msgs[j]->rkt == m->rkt && msgs[j]->partition == m->partition;
             j++)
            ;
        if (j - i >= 2) {
            const char *ktopic = rd_kafka_topic_name(m->rkt);
            if (p == NULL || p->partition != m->partition ||
                strcmp(p->ktopic, ktopic) != 0)
                p = kafka_part_find(c, ktopic, m->partition);
            if (p != NULL && p->assigned && !p->revoking && p->held == NULL &&
                p->held_msg == NULL) {
                uint32_t took;
                c->last_part = p;
                if ((took = kafka_process_run(c, p, msgs + i, j - i)) > 0) {
                    i += took;
                    continue;
                }
            }
        }
        kafka_on_message(c, msgs[i]);
        i++;
    }
}

/* Retries held records that are due (all of them when an ack freed
 * room). Returns the earliest due time of those still held (0: none). */
static uint64_t
kafka_service_held(kafka_cons *c, uint64_t now, bool room)
{
    uint64_t next = 0;
    uint32_t i;

    for (i = 0; i < c->n_parts && c->n_held > 0; i++) {
        kafka_part *p = c->parts[i];
        kafka_sub **pend = NULL;
        rd_kafka_message_t *msg;
        uint32_t n = 0;
        bus_event *ev;
        bool all, ok;
        int64_t off;
        if (p->held == NULL && p->held_msg == NULL)
            continue;
        if (p->held_due_ns > now && !room) {
            if (next == 0 || p->held_due_ns < next)
                next = p->held_due_ns;
            continue;
        }
        bus__mutex_lock(&c->mtx);
        ev = p->held;
        msg = p->held_msg;
        off = p->held_off;
        all = p->held_all;
        if (!all && p->n_pending > 0) {
            n = p->n_pending;
            if ((pend = bus__alloc(n * sizeof(*pend))) != NULL) {
                memcpy(pend, p->pending, n * sizeof(*pend));
                p->n_pending = 0;
            }
        }
        if (pend != NULL || all || n == 0) {
            p->held = NULL;
            p->held_msg = NULL;
        }
        bus__mutex_unlock(&c->mtx);
        if (p->held != NULL || p->held_msg != NULL) {
            next = now + KAFKA_MS(KAFKA_HOLD_MAX_MS); /* ENOMEM */
            continue;
        }
        c->n_held--;
        if (msg != NULL)
            ok = kafka_process(c, p, msg);
        else if (all)
            ok = kafka_fanout(c, p, ev, off, NULL, 0);
        else if (n == 0) { /* every target left meanwhile */
            kafka_advance(c, p, off);
            bus_event_unref(ev);
            ok = true;
        } else
            ok = kafka_fanout(c, p, ev, off, pend, n);
        if (pend != NULL)
            bus__free(pend, n * sizeof(*pend));
        if (ok)
            kafka_part_resume(c, p, off + 1);
        else if (next == 0 || p->held_due_ns < next)
            next = p->held_due_ns;
    }
    return next;
}

/* Drops a partition's held record (it was never handled by those it
 * waits for). @thread the consumer's. */
static void
kafka_drop_hold(kafka_cons *c, kafka_part *p)
{
    kafka_sub *gone = NULL;
    bus_event *ev;
    rd_kafka_message_t *msg;

    bus__mutex_lock(&c->mtx);
    ev = p->held;
    msg = p->held_msg;
    p->held = NULL;
    p->held_msg = NULL;
    kafka_part_drop_pending(p, &gone);
    bus__mutex_unlock(&c->mtx);
    if (ev == NULL && msg == NULL)
        return;
    bus_event_unref(ev);
    if (msg != NULL)
        rd_kafka_message_destroy(msg);
    while (gone != NULL) {
        kafka_sub *x = gone;
        gone = x->next;
        kafka_sub_free(x);
    }
    p->held_backoff_ms = 0;
    p->paused = false;
    c->n_held--;
}

/* ---- Redelivery
 * ---------------------------------------------------------------- */

typedef struct kafka_redo {
    kafka_sub *s;
    kafka_part *p;
    int64_t off;
    bus_event *ev;
} kafka_redo;

/* Redelivers due KT_RETRY entries, in offset order per (subscription,
 * partition). */
static void
kafka_service_retries(kafka_cons *c, uint64_t now)
{
    kafka_redo batch[KAFKA_RETRY_BATCH];
    size_t n = 0, k;
    uint64_t next = 0;
    kafka_sub *s;
    uint32_t i, j;

    bus__mutex_lock(&c->mtx);
    if (c->retry_due_ns == 0 || now < c->retry_due_ns) {
        bus__mutex_unlock(&c->mtx);
        return;
    }
    for (s = c->subs; s != NULL; s = s->next) {
        for (i = 0; i < s->n_trk; i++) {
            kt *t = &s->trk[i];
            kafka_part *p = c->parts[i];
            if (t->retry == 0 || !p->assigned || p->revoking)
                continue;
            for (j = 0; j < t->n; j++) {
                kt_entry *e = kt_at(t, j);
                if (e->state != KT_RETRY)
                    continue;
                if (e->due_ns > now || n == KAFKA_RETRY_BATCH) {
                    if (next == 0 || e->due_ns < next)
                        next = e->due_ns > now ? e->due_ns : now;
                    continue;
                }
                /* In flight before the call: its ack may come first. */
                kt_redelivered(t, e);
                s->refs++;
                batch[n].s = s;
                batch[n].p = p;
                batch[n].off = e->off;
                batch[n].ev = bus_event_ref(e->ev);
                n++;
            }
        }
    }
    c->retry_due_ns = next;
    bus__mutex_unlock(&c->mtx);

    for (k = 0; k < n; k++) {
        kafka_redo *r = &batch[k];
        int rv = BUS_ECLOSED;
        bus__mutex_lock(&c->mtx);
        if (!r->s->dead) {
            c->calling = r->s;
            bus__mutex_unlock(&c->mtx);
            rv = r->s->fn(r->s->opaque, r->p->btopic, r->ev,
                          kafka_token(r->p, r->off), BUS_PUB_NONBLOCK);
            bus__mutex_lock(&c->mtx);
            c->calling = NULL;
            if (c->calling_waiters > 0)
                bus__cond_broadcast(&c->cond);
        }
        if (rv != BUS_OK && !r->s->dead && r->p->slot < r->s->n_trk) {
            kt *t = &r->s->trk[r->p->slot];
            kt_entry *e = kt_find(t, r->off);
            uint64_t due = kafka_now() + KAFKA_MS(KAFKA_HOLD_MAX_MS / 4);
            if (e != NULL && e->state == KT_INFLIGHT) {
                e->attempts--; /* this one never reached a handler */
                (void)kt_retry(t, r->off, due);
                if (c->retry_due_ns == 0 || due < c->retry_due_ns)
                    c->retry_due_ns = due;
            }
        }
        bus__mutex_unlock(&c->mtx);
        if (rv == BUS_OK)
            atomic_fetch_add_explicit(&c->kb->st_redelivered, 1,
                                      memory_order_relaxed);
        else
            bus_event_unref(r->ev);
        kafka_sub_release(c, r->s);
    }
}

/* ---- Offsets
 * ------------------------------------------------------------------------ */

/* Gives positions that moved to librdkafka, which auto-commits them.
 * @thread the consumer's. */
static void
kafka_store_offsets(kafka_cons *c)
{
    rd_kafka_topic_partition_list_t *l = NULL;
    rd_kafka_resp_err_t err;
    uint32_t i;

    bus__mutex_lock(&c->mtx);
    if (c->n_dirty == 0) {
        bus__mutex_unlock(&c->mtx);
        return;
    }
    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        int64_t pos;
        if (!p->dirty)
            continue;
        p->dirty = false;
        if (!p->assigned || p->revoking || (pos = kafka_position(c, p)) < 0 ||
            pos <= p->stored)
            continue;
        if (l == NULL &&
            (l = rd_kafka_topic_partition_list_new((int)c->n_dirty)) == NULL)
            break;
        rd_kafka_topic_partition_list_add(l, p->ktopic, p->partition)->offset =
            pos;
        p->stored = pos;
    }
    c->n_dirty = 0;
    bus__mutex_unlock(&c->mtx);
    if (l == NULL)
        return;
    err = rd_kafka_offsets_store(c->rk, l);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        bus_logf(&c->kb->log, BUS_LOG_DEBUG, "kafka",
                 "group %s: offsets_store: %s", c->group,
                 rd_kafka_err2name(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---- Rebalance
 * ----------------------------------------------------------------------- */

static void
kafka_assign(kafka_cons *c, rd_kafka_topic_partition_list_t *parts)
{
    int i;

    bus__mutex_lock(&c->mtx);
    for (i = 0; i < parts->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        kafka_part *p = kafka_part_get(c, tp->topic, tp->partition);
        if (p == NULL) {
            bus_logf(&c->kb->log, BUS_LOG_ERR, "kafka",
                     "no memory to track %s [%d]: its records are not "
                     "delivered (nor committed) until the next rebalance",
                     tp->topic, (int)tp->partition);
            continue;
        }
        kafka_part_match(c, p);
        kafka_part_reset(c, p);
        p->assigned = true;
        p->paused = false; /* a new assignment starts unpaused */
    }
    bus__mutex_unlock(&c->mtx);
}

/* True while a revoking partition has handlers running. @locks c->mtx. */
static bool
kafka_revoking_busy(kafka_cons *c)
{
    uint32_t i, j;

    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        if (!p->revoking)
            continue;
        for (j = 0; j < p->n_subs; j++)
            if (p->slot < p->subs[j]->n_trk &&
                p->subs[j]->trk[p->slot].inflight > 0)
                return true;
    }
    return false;
}

/* Stops delivering parts (NULL: every assigned one), waits for their
 * handlers (unless stopping), commits their positions and releases them.
 * @thread the consumer's. */
static void
kafka_revoke(kafka_cons *c, rd_kafka_topic_partition_list_t *parts)
{
    kafka_broker *kb = c->kb;
    rd_kafka_topic_partition_list_t *commit = NULL;
    bool wait = !atomic_load_explicit(&c->stop, memory_order_acquire);
    uint32_t i, n = 0;
    int j;

    bus__mutex_lock(&c->mtx);
    if (parts != NULL) {
        for (j = 0; j < parts->cnt; j++) {
            kafka_part *p = kafka_part_find(c, parts->elems[j].topic,
                                            parts->elems[j].partition);
            if (p != NULL && p->assigned) {
                p->revoking = true;
                n++;
            }
        }
    } else {
        for (i = 0; i < c->n_parts; i++)
            if (c->parts[i]->assigned) {
                c->parts[i]->revoking = true;
                n++;
            }
    }
    bus__mutex_unlock(&c->mtx);
    if (n == 0)
        return;
    for (i = 0; i < c->n_parts; i++)
        if (c->parts[i]->revoking)
            kafka_drop_hold(c, c->parts[i]);

    if (wait && kb->rebalance_timeout_ms > 0) {
        uint64_t deadline = kafka_now() + KAFKA_MS(kb->rebalance_timeout_ms);
        bus__mutex_lock(&c->mtx);
        while (kafka_revoking_busy(c) &&
               !atomic_load_explicit(&c->stop, memory_order_acquire))
            if (!bus__cond_wait_until(&c->cond, &c->mtx, deadline))
                break;
        if (kafka_revoking_busy(c))
            bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                     "group %s: revoked partitions still have handlers "
                     "running after %d ms; their records will be "
                     "redelivered to the next owner",
                     c->group, (int)kb->rebalance_timeout_ms);
        bus__mutex_unlock(&c->mtx);
    }

    bus__mutex_lock(&c->mtx);
    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        int64_t pos;
        if (!p->revoking || c->group == NULL ||
            (pos = kafka_position(c, p)) < 0)
            continue;
        if (commit == NULL &&
            (commit = rd_kafka_topic_partition_list_new((int)n)) == NULL)
            break;
        rd_kafka_topic_partition_list_add(commit, p->ktopic, p->partition)
            ->offset = pos;
    }
    bus__mutex_unlock(&c->mtx);
    if (commit != NULL) {
        rd_kafka_resp_err_t err = rd_kafka_commit(c->rk, commit, 0);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
            atomic_fetch_add_explicit(&kb->st_committed, 1,
                                      memory_order_relaxed);
        else if (err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                     "group %s: commit on revoke failed: %s (%s); the next "
                     "owner resumes from the last commit",
                     c->group, rd_kafka_err2str(err), rd_kafka_err2name(err));
        rd_kafka_topic_partition_list_destroy(commit);
    }
    bus__mutex_lock(&c->mtx);
    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        if (!p->revoking)
            continue;
        kafka_part_reset(c, p);
        p->assigned = false;
    }
    bus__mutex_unlock(&c->mtx);
}

void
kafka_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                   rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    kafka_cons *c = ((kafka_rkop *)opaque)->cons;
    kafka_broker *kb = c->kb;
    bool coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    rd_kafka_error_t *e = NULL;
    rd_kafka_resp_err_t aerr = RD_KAFKA_RESP_ERR_NO_ERROR;

    atomic_fetch_add_explicit(&kb->st_rebalances, 1, memory_order_relaxed);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        bus_logf(&kb->log, BUS_LOG_INFO, "kafka",
                 "group %s: %d partitions assigned", c->group, parts->cnt);
        kafka_assign(c, parts);
        if (coop)
            e = rd_kafka_incremental_assign(rk, parts);
        else
            aerr = rd_kafka_assign(rk, parts);
    } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
        bus_logf(&kb->log, BUS_LOG_INFO, "kafka",
                 "group %s: %d partitions revoked", c->group, parts->cnt);
        kafka_revoke(c, parts);
        if (coop)
            e = rd_kafka_incremental_unassign(rk, parts);
        else
            aerr = rd_kafka_assign(rk, NULL);
    } else {
        bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                 "group %s: rebalance error %s: releasing everything", c->group,
                 rd_kafka_err2name(err));
        kafka_revoke(c, NULL);
        aerr = rd_kafka_assign(rk, NULL);
    }
    if (e != NULL) {
        bus_logf(&kb->log, BUS_LOG_WARN, "kafka", "group %s: %s", c->group,
                 rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    if (aerr != RD_KAFKA_RESP_ERR_NO_ERROR)
        bus_logf(&kb->log, BUS_LOG_WARN, "kafka", "group %s: assign: %s",
                 c->group, rd_kafka_err2name(aerr));
}

/* The group's topic subscription changed: apply it. @thread consumer. */
static void
kafka_resubscribe(kafka_cons *c)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_resp_err_t err;
    uint32_t i;

    bus__mutex_lock(&c->mtx);
    if (!c->resubscribe || c->n_substrs == 0) {
        c->resubscribe = false;
        bus__mutex_unlock(&c->mtx);
        return;
    }
    c->resubscribe = false;
    if ((l = rd_kafka_topic_partition_list_new((int)c->n_substrs)) != NULL)
        for (i = 0; i < c->n_substrs; i++)
            rd_kafka_topic_partition_list_add(l, c->substrs[i],
                                              RD_KAFKA_PARTITION_UA);
    bus__mutex_unlock(&c->mtx);
    if (l == NULL) {
        bus__mutex_lock(&c->mtx);
        c->resubscribe = true; /* try again */
        bus__mutex_unlock(&c->mtx);
        return;
    }
    if ((err = rd_kafka_subscribe(c->rk, l)) != RD_KAFKA_RESP_ERR_NO_ERROR)
        bus_logf(&c->kb->log, BUS_LOG_ERR, "kafka", "group %s: subscribe: %s",
                 c->group, rd_kafka_err2name(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---- Discovery
 * ------------------------------------------------------------------------- */

static int
kafka_refresh_view(kafka_cons *c, int timeout_ms)
{
    const struct rd_kafka_metadata *md;
    rd_kafka_resp_err_t err;

    err = rd_kafka_metadata(c->rk, 1, NULL, &md, timeout_ms);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        bus_logf(&c->kb->log, BUS_LOG_DEBUG, "kafka", "metadata: %s (%s)",
                 rd_kafka_err2str(err), rd_kafka_err2name(err));
        return kafka_map_err(err);
    }
    if (c->view != NULL)
        rd_kafka_metadata_destroy(c->view);
    c->view = md;
    c->view_ns = kafka_now();
    return BUS_OK;
}

/* Group-less: assigns partitions of matching topics not read yet (see
 * the top comment for where they start) and completes the waiting
 * subscriptions' first discovery. Groups: only refreshes the full
 * metadata, which makes librdkafka re-check its subscription at once.
 * @thread the consumer's. */
static void
kafka_discover(kafka_cons *c, bool force)
{
    kafka_broker *kb = c->kb;
    rd_kafka_topic_partition_list_t *l = NULL;
    bool requests;
    int i, j, rv = BUS_OK;
    uint64_t now = kafka_now();

    bus__mutex_lock(&c->mtx);
    requests = c->discover_req > 0;
    c->discover_req = 0;
    bus__mutex_unlock(&c->mtx);
    if (force || c->view == NULL ||
        (requests && now - c->view_ns > KAFKA_VIEW_TTL_NS))
        rv = kafka_refresh_view(c, requests ? kb->open_timeout_ms : 2000);
    if (c->group != NULL || c->view == NULL)
        goto done;
    for (i = 0; i < c->view->topic_cnt; i++) {
        const rd_kafka_metadata_topic_t *t = &c->view->topics[i];
        const char *bt;
        if (t->err != RD_KAFKA_RESP_ERR_NO_ERROR ||
            (bt = kafka_bus_topic(kb, t->topic)) == NULL)
            continue;
        for (j = 0; j < t->partition_cnt; j++) {
            int32_t pid = t->partitions[j].id;
            /* "From the beginning" as offset 0, not the logical
             * BEGINNING: librdkafka resolves that with a ListOffsets
             * request it may delay by 500 ms while leader connections
             * come up. If retention removed offset 0, the fetch fails
             * out of range and auto.offset.reset=earliest moves to the
             * log start. */
            int64_t start = 0;
            bool old = false, fresh = false;
            kafka_part *p;
            uint32_t k;
            void *one[1];
            bus__mutex_lock(&c->mtx);
            p = kafka_part_find(c, t->topic, pid);
            if ((p != NULL && p->assigned) ||
                (p == NULL &&
                 bus__tindex_match(c->index, bt, strlen(bt), one, 1) == 0)) {
                bus__mutex_unlock(&c->mtx); /* read, or nobody wants it */
                continue;
            }
            if ((p = kafka_part_get(c, t->topic, pid)) == NULL) {
                bus__mutex_unlock(&c->mtx);
                rv = BUS_ENOMEM;
                goto done;
            }
            kafka_part_match(c, p);
            for (k = 0; k < p->n_subs; k++) {
                if (p->subs[k]->discovered)
                    old = true;
                else
                    fresh = true;
            }
            bus__mutex_unlock(&c->mtx);
            if (!old && !fresh)
                continue; /* nobody wants it (yet) */
            /* Only new subscriptions want it: it existed when they
             * subscribed, so they start at its end. */
            if (!old && !kb->start_earliest) {
                int64_t lo, hi;
                rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(
                    c->rk, t->topic, pid, &lo, &hi, kb->open_timeout_ms);
                if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
                    bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                             "end of %s [%d]: %s", t->topic, (int)pid,
                             rd_kafka_err2name(err));
                    rv = kafka_map_err(err);
                    continue; /* found again by the next discovery */
                }
                start = hi;
            }
            if (l == NULL &&
                (l = rd_kafka_topic_partition_list_new(8)) == NULL) {
                rv = BUS_ENOMEM;
                goto done;
            }
            rd_kafka_topic_partition_list_add(l, t->topic, pid)->offset = start;
        }
    }
    if (l != NULL && l->cnt > 0) {
        rd_kafka_error_t *e;
        kafka_assign(c, l);
        if ((e = rd_kafka_incremental_assign(c->rk, l)) != NULL) {
            bus_logf(&kb->log, BUS_LOG_WARN, "kafka", "assign: %s",
                     rd_kafka_error_string(e));
            rv = kafka_map_err(rd_kafka_error_code(e));
            rd_kafka_error_destroy(e);
            bus__mutex_lock(&c->mtx);
            for (i = 0; i < l->cnt; i++) {
                kafka_part *p = kafka_part_find(c, l->elems[i].topic,
                                                l->elems[i].partition);
                if (p != NULL)
                    p->assigned = false; /* the next discovery retries */
            }
            bus__mutex_unlock(&c->mtx);
        } else {
            bus_logf(&kb->log, BUS_LOG_DEBUG, "kafka", "%d partitions added",
                     l->cnt);
        }
    }
done:
    if (l != NULL)
        rd_kafka_topic_partition_list_destroy(l);
    if (rv != BUS_OK)
        bus_logf(&kb->log, BUS_LOG_DEBUG, "kafka", "discovery: %s",
                 bus_err_name(rv));
    if (requests || c->group == NULL) {
        /* Whatever happened, the waiting subscriptions go on: topics
         * missed now are found by the next discovery. */
        kafka_sub *s;
        bus__mutex_lock(&c->mtx);
        for (s = c->subs; s != NULL; s = s->next)
            s->discovered = true;
        bus__cond_broadcast(&c->cond);
        bus__mutex_unlock(&c->mtx);
    }
}

static void
kafka_service_discovery(kafka_cons *c, uint64_t now)
{
    bool poked =
        atomic_exchange_explicit(&c->poke, false, memory_order_relaxed);

    if (poked) {
        c->discover_fast = KAFKA_FAST_DISCOVERIES;
        c->next_discover_ns = now;
    }
    if (now < c->next_discover_ns)
        return;
    kafka_discover(c, true);
    now = kafka_now();
    if (c->discover_fast > 0) {
        c->discover_fast--;
        c->next_discover_ns = now + KAFKA_FAST_DISCOVER_NS;
    } else {
        c->next_discover_ns = now + KAFKA_MS(c->kb->discover_interval_ms);
    }
}

/* ---- The consumer's thread
 * --------------------------------------------------------------- */

static void
kafka_on_message_error(kafka_cons *c, rd_kafka_message_t *m)
{
    bus_log_level lvl = BUS_LOG_WARN;

    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
        return;
    if (m->err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
        m->err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC ||
        m->err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION)
        lvl = BUS_LOG_DEBUG; /* a subscribed topic that does not exist yet */
    bus_logf(&c->kb->log, lvl, "kafka", "consumer (group %s): %s (%s -> %s)",
             c->group != NULL ? c->group : "none", rd_kafka_message_errstr(m),
             rd_kafka_err2name(m->err), bus_err_name(kafka_map_err(m->err)));
}

static void
kafka_on_message(kafka_cons *c, rd_kafka_message_t *m)
{
    kafka_part *p = c->last_part;
    const char *ktopic;

    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        kafka_on_message_error(c, m);
        rd_kafka_message_destroy(m);
        return;
    }
    ktopic = rd_kafka_topic_name(m->rkt);
    if (p == NULL || p->partition != m->partition ||
        strcmp(p->ktopic, ktopic) != 0)
        p = kafka_part_find(c, ktopic, m->partition);
    /* Released since it was fetched (librdkafka's version barrier should
     * have dropped it): the next owner reads it from the commit. */
    if (p == NULL || !p->assigned || p->revoking) {
        rd_kafka_message_destroy(m);
        return;
    }
    if (p->held != NULL || p->held_msg != NULL) {
        /* Fetched before the pause took effect and not filtered: drop it
         * and seek back explicitly on resume, since the consumer's
         * position has moved past it. */
        if (m->offset > p->held_off)
            p->reseek = true;
        rd_kafka_message_destroy(m);
        return;
    }
    c->last_part = p;
    (void)kafka_process(c, p, m);
}

static void
kafka_cons_thread(void *arg)
{
    kafka_cons *c = arg;
    kafka_broker *kb = c->kb;
    rd_kafka_message_t *batch[KAFKA_BATCH];
    uint64_t now, due, held_due;
    uint32_t i;
    int timeout, n, got;
    bool room, req, resub;

    kafka_tl_cons = c;
    c->next_discover_ns = kafka_now() + KAFKA_MS(kb->discover_interval_ms);
    while (!atomic_load_explicit(&c->stop, memory_order_acquire)) {
        now = kafka_now();
        bus__mutex_lock(&c->mtx);
        room = c->waiting_room;
        c->waiting_room = false;
        due = c->retry_due_ns;
        req = c->discover_req > 0;
        resub = c->resubscribe;
        bus__mutex_unlock(&c->mtx);
        if (resub)
            kafka_resubscribe(c);
        if (req)
            kafka_discover(c, false);
        held_due = c->n_held > 0 ? kafka_service_held(c, now, room) : 0;
        if (due != 0 && now >= due) {
            kafka_service_retries(c, now);
            bus__mutex_lock(&c->mtx);
            due = c->retry_due_ns;
            bus__mutex_unlock(&c->mtx);
        }
        if (c->group != NULL && now >= c->next_store_ns) {
            kafka_store_offsets(c);
            c->next_store_ns = now + KAFKA_STORE_EVERY_NS;
        }
        if (c->group == NULL || c->discover_fast > 0 ||
            atomic_load_explicit(&c->poke, memory_order_relaxed))
            kafka_service_discovery(c, now);
        /* Sleep until the next thing due, at most KAFKA_SUB_POLL_MS; acks
         * that matter wake us (rd_kafka_queue_yield). */
        timeout = KAFKA_SUB_POLL_MS;
        if (held_due != 0 && (due == 0 || held_due < due))
            due = held_due;
        if (due != 0) {
            int64_t ms;
            now = kafka_now();
            ms = due > now ? (int64_t)((due - now) / 1000000) : 0;
            if (ms < timeout)
                timeout = (int)ms;
        }
        /* Wait for the first record (rd_kafka_consume_batch_queue would
         * wait to fill a whole batch), then drain what is fetched already
         * a batch at a time (one queue lock per batch) without sleeping,
         * bounded so that stores, retries and held records get their
         * turn. Callbacks such as rebalances are served inside both. */
        if ((batch[0] = rd_kafka_consumer_poll(c->rk, timeout)) == NULL)
            continue;
        kafka_on_message(c, batch[0]);
        for (n = 0; n < KAFKA_DRAIN_MAX &&
                    !atomic_load_explicit(&c->stop, memory_order_acquire);
             n += got) {
            ssize_t k =
                rd_kafka_consume_batch_queue(c->q, 0, batch, KAFKA_BATCH);
            got = k > 0 ? (int)k : 0;
            kafka_on_batch(c, batch, (uint32_t)got);
            if (got == 0)
                break;
        }
    }
    /* Winding down: store what finished, then close (the revoke callback
     * commits it, without waiting: the bus has stopped handling). */
    if (c->group != NULL)
        kafka_store_offsets(c);
    bus__mutex_lock(&c->mtx);
    c->closing = true;
    bus__mutex_unlock(&c->mtx);
    (void)rd_kafka_consumer_close(c->rk);
    for (i = 0; i < c->n_parts; i++)
        kafka_drop_hold(c, c->parts[i]);
    atomic_store_explicit(&c->exited, true, memory_order_release);
}

/* ---- Consumers
 * ------------------------------------------------------------------------------
 */

static void
kafka_cons_free(kafka_cons *c)
{
    uint32_t i;

    if (c == NULL)
        return;
    if (c->q != NULL)
        rd_kafka_queue_destroy(c->q);
    if (c->rk != NULL)
        rd_kafka_destroy(c->rk);
    if (c->view != NULL)
        rd_kafka_metadata_destroy(c->view);
    for (i = 0; i < c->n_parts; i++)
        kafka_part_free(c->parts[i]);
    if (c->parts != NULL)
        bus__free(c->parts, c->cap_parts * sizeof(*c->parts));
    if (c->targets != NULL)
        bus__free(c->targets, c->cap_targets * sizeof(*c->targets));
    for (i = 0; i < c->n_substrs; i++)
        bus__strfree(c->substrs[i]);
    if (c->substrs != NULL) {
        bus__free(c->substrs, c->cap_substrs * sizeof(*c->substrs));
        bus__free(c->substr_refs, c->cap_substrs * sizeof(*c->substr_refs));
    }
    bus__tindex_release(c->index);
    if (c->group != NULL)
        bus__free(c->group, c->group_size);
    if (c->mtx_ready) {
        bus__cond_fini(&c->cond);
        bus__mutex_fini(&c->mtx);
    }
    bus__free(c, sizeof(*c));
}

static int
kafka_cons_new(kafka_broker *kb, const char *group, kafka_cons **out)
{
    char errbuf[512];
    rd_kafka_conf_t *conf;
    kafka_cons *c;
    int rv = BUS_ENOMEM;

    *out = NULL;
    if ((c = bus__zalloc(sizeof(*c))) == NULL)
        return BUS_ENOMEM;
    c->kb = kb;
    c->rkop.kb = kb;
    c->rkop.cons = c;
    bus__mutex_init(&c->mtx);
    bus__cond_init(&c->cond);
    c->mtx_ready = true;
    if (group != NULL &&
        (c->group = bus__strdup(group, &c->group_size)) == NULL)
        goto fail;
    if ((c->index = bus__tindex_new(0)) == NULL)
        goto fail;
    rv = BUS_EINVAL;
    if ((conf = kafka_conf_new(kb, c, errbuf, sizeof(errbuf))) == NULL) {
        bus_logf(&kb->log, BUS_LOG_ERR, "kafka", "consumer: %s", errbuf);
        goto fail;
    }
    if ((c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf,
                              sizeof(errbuf))) == NULL) {
        rd_kafka_conf_destroy(conf);
        bus_logf(&kb->log, BUS_LOG_ERR, "kafka", "consumer: %s", errbuf);
        goto fail;
    }
    /* Errors and logs come through the consumer queue we poll. */
    (void)rd_kafka_poll_set_consumer(c->rk);
    rv = BUS_ENOMEM;
    if ((c->q = rd_kafka_queue_get_consumer(c->rk)) == NULL)
        goto fail;
    *out = c;
    return BUS_OK;
fail:
    kafka_cons_free(c);
    return rv;
}

/* Asks c's thread to wind down and wakes it (and a revocation wait). */
static void
kafka_cons_signal_stop(kafka_cons *c)
{
    atomic_store_explicit(&c->stop, true, memory_order_release);
    bus__mutex_lock(&c->mtx);
    bus__cond_broadcast(&c->cond);
    kafka_cons_wake(c);
    bus__mutex_unlock(&c->mtx);
}

/* Joins c's thread, frees the subscriptions still in it and c. c is on
 * no list and no registry entry points into it. */
static void
kafka_cons_join_free(kafka_cons *c)
{
    kafka_sub *s, *gone = NULL;

    if (c->started)
        bus__thread_join(&c->thread);
    bus__mutex_lock(&c->mtx);
    while ((s = c->subs) != NULL) {
        c->subs = s->next;
        s->dead = true;
        if (--s->refs == 0) {
            s->next = gone;
            gone = s;
        }
    }
    bus__mutex_unlock(&c->mtx);
    while ((s = gone) != NULL) {
        gone = s->next;
        kafka_sub_free(s);
    }
    kafka_cons_free(c);
}

/* Joins consumers emptied from one of their own deliveries. Not from a
 * consumer thread of kb. */
static void
kafka_reap(kafka_broker *kb, bool all)
{
    kafka_cons *done = NULL, **pp, *c;

    bus__mutex_lock(&kb->smtx);
    for (pp = &kb->reap; (c = *pp) != NULL;) {
        if (all || atomic_load_explicit(&c->exited, memory_order_acquire)) {
            *pp = c->next;
            c->next = done;
            done = c;
        } else {
            pp = &c->next;
        }
    }
    bus__mutex_unlock(&kb->smtx);
    while ((c = done) != NULL) {
        done = c->next;
        kafka_cons_join_free(c);
    }
}

/* ---- Subscribe, unsubscribe, ack
 * ------------------------------------------------------------- */

/* Counts a topic subscription of a group consumer; true when it is new
 * (the consumer must resubscribe). @locks c->mtx. */
static int
kafka_substr_ref(kafka_cons *c, const char *substr, bool *added)
{
    uint32_t i;

    *added = false;
    for (i = 0; i < c->n_substrs; i++)
        if (strcmp(c->substrs[i], substr) == 0) {
            c->substr_refs[i]++;
            return BUS_OK;
        }
    if (c->n_substrs == c->cap_substrs) {
        uint32_t ncap = c->cap_substrs ? c->cap_substrs * 2 : 4;
        char **ns = bus__alloc(ncap * sizeof(*ns));
        uint32_t *nr = bus__alloc(ncap * sizeof(*nr));
        if (ns == NULL || nr == NULL) {
            if (ns != NULL)
                bus__free(ns, ncap * sizeof(*ns));
            if (nr != NULL)
                bus__free(nr, ncap * sizeof(*nr));
            return BUS_ENOMEM;
        }
        if (c->n_substrs > 0) {
            memcpy(ns, c->substrs, c->n_substrs * sizeof(*ns));
            memcpy(nr, c->substr_refs, c->n_substrs * sizeof(*nr));
        }
        if (c->substrs != NULL) {
            bus__free(c->substrs, c->cap_substrs * sizeof(*ns));
            bus__free(c->substr_refs, c->cap_substrs * sizeof(*nr));
        }
        c->substrs = ns;
        c->substr_refs = nr;
        c->cap_substrs = ncap;
    }
    if ((c->substrs[c->n_substrs] = bus__strdup(substr, NULL)) == NULL)
        return BUS_ENOMEM;
    c->substr_refs[c->n_substrs++] = 1;
    *added = true;
    return BUS_OK;
}

/* @locks c->mtx. True when the topic subscription is gone. */
static bool
kafka_substr_unref(kafka_cons *c, const char *substr)
{
    uint32_t i;

    for (i = 0; i < c->n_substrs; i++)
        if (strcmp(c->substrs[i], substr) == 0) {
            if (--c->substr_refs[i] > 0)
                return false;
            bus__strfree(c->substrs[i]);
            c->substrs[i] = c->substrs[c->n_substrs - 1];
            c->substr_refs[i] = c->substr_refs[c->n_substrs - 1];
            c->n_substrs--;
            return true;
        }
    return false;
}

int
kafka_subscribe(void *priv, const char *pattern, const char *group,
                bus_deliver_fn fn, void *opaque, void **handle)
{
    kafka_broker *kb = priv;
    char substr[2 * KAFKA_TOPIC_MAX + 16];
    bus__tindex *nix;
    kafka_cons *c = NULL;
    bool literal, added = false, fresh = false;
    kafka_sub *s;
    uint32_t i;
    int rv;

    *handle = NULL;
    if (atomic_load_explicit(&kb->closed, memory_order_acquire))
        return BUS_ECLOSED;
    if (group == NULL)
        group = kb->group;
    if (kafka_pattern_subscription(kb, pattern, substr, sizeof(substr),
                                   &literal) != BUS_OK) {
        bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                 "subscribe: pattern '%s' cannot match Kafka topic names "
                 "([A-Za-z0-9._-], %d bytes with the prefix)",
                 pattern, KAFKA_TOPIC_MAX);
        return BUS_EINVAL;
    }
    if (!kafka_on_broker_thread(kb))
        kafka_reap(kb, false);
    if ((s = bus__zalloc(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    s->fn = fn;
    s->opaque = opaque;
    s->refs = 1;
    s->literal = literal;
    if ((s->pattern = bus__strdup(pattern, &s->pattern_size)) == NULL ||
        (s->substr = bus__strdup(substr, &s->substr_size)) == NULL) {
        kafka_sub_free(s);
        return BUS_ENOMEM;
    }

    bus__mutex_lock(&kb->smtx);
    for (c = kb->conss; c != NULL; c = c->next)
        if ((c->group == NULL && group == NULL) ||
            (c->group != NULL && group != NULL && strcmp(c->group, group) == 0))
            break;
    if (c == NULL) {
        if ((rv = kafka_cons_new(kb, group, &c)) != BUS_OK) {
            bus__mutex_unlock(&kb->smtx);
            kafka_sub_free(s);
            return rv;
        }
        fresh = true;
    }
    if ((rv = kafka_reg_add(kb, s)) != BUS_OK)
        goto fail_locked;
    bus__mutex_lock(&c->mtx);
    if ((rv = bus__tindex_add(c->index, pattern, s, &nix)) != BUS_OK) {
        bus__mutex_unlock(&c->mtx);
        kafka_reg_del(kb, s);
        goto fail_locked;
    }
    if (c->group != NULL &&
        (rv = kafka_substr_ref(c, substr, &added)) != BUS_OK) {
        bus__tindex_release(nix);
        bus__mutex_unlock(&c->mtx);
        kafka_reg_del(kb, s);
        goto fail_locked;
    }
    bus__tindex_release(c->index);
    c->index = nix;
    /* The bus may get a delivery (and ack it with this handle) before we
     * return: the handle is published before the thread can see s, under
     * the mutex the thread takes to find its targets. */
    *handle = s;
    s->cons = c;
    s->next = c->subs;
    if (c->subs != NULL)
        c->subs->prev = s;
    c->subs = s;
    c->n_subs++;
    /* Partitions read already: shared from where the consumer is. */
    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        if (p->assigned && p->btopic != NULL &&
            bus__topic_match(pattern, p->btopic))
            (void)kafka_part_add_sub(p, s);
    }
    if (c->group != NULL) {
        s->discovered = true;
        if (added)
            c->resubscribe = true;
    } else {
        c->discover_req++;
    }
    bus__mutex_unlock(&c->mtx);
    if (fresh) {
        if ((rv = bus__thread_start(&c->thread, "bus-kafka-cons",
                                    kafka_cons_thread, c)) != BUS_OK) {
            *handle = NULL;
            kafka_reg_del(kb, s);
            bus__mutex_unlock(&kb->smtx);
            kafka_cons_free(c); /* frees nothing of s but its index */
            s->cons = NULL;
            kafka_sub_free(s);
            return rv;
        }
        c->started = true;
        c->next = kb->conss;
        kb->conss = c;
    }
    bus__mutex_unlock(&kb->smtx);
    atomic_fetch_add_explicit(&kb->st_subs, 1, memory_order_relaxed);

    /* Group-less: wait for the first discovery, so that what is published
     * after this returns is delivered. */
    if (c->group == NULL) {
        if (kafka_tl_cons == c) {
            kafka_discover(c, false); /* we are its thread */
        } else {
            uint64_t deadline = kafka_now() + KAFKA_MS(kb->open_timeout_ms);
            bus__mutex_lock(&c->mtx);
            kafka_cons_wake(c);
            while (!s->discovered && !s->dead &&
                   !atomic_load_explicit(&c->stop, memory_order_acquire))
                if (!bus__cond_wait_until(&c->cond, &c->mtx, deadline))
                    break;
            if (!s->discovered)
                bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                         "subscribe %s: no metadata within %d ms; topics "
                         "are picked up when the cluster answers",
                         pattern, (int)kb->open_timeout_ms);
            bus__mutex_unlock(&c->mtx);
        }
    } else {
        bus__mutex_lock(&c->mtx);
        kafka_cons_wake(c);
        bus__mutex_unlock(&c->mtx);
    }
    bus_logf(&kb->log, BUS_LOG_DEBUG, "kafka", "subscribed %s (%s, %s%s)",
             pattern, substr, group != NULL ? "group " : "no group",
             group != NULL ? group : "");
    return BUS_OK;

fail_locked:
    if (fresh)
        kafka_cons_free(c);
    bus__mutex_unlock(&kb->smtx);
    kafka_sub_free(s);
    return rv;
}

void
kafka_unsubscribe(void *priv, void *handle)
{
    kafka_broker *kb = priv;
    kafka_sub *s = handle;
    kafka_cons *c, **pp;
    bus__tindex *nix;
    bool empty, last, on_thread = kafka_on_broker_thread(kb);
    uint32_t i;

    bus__mutex_lock(&kb->smtx);
    if (!kafka_reg_del(kb, s)) {
        kafka_cons *tc = kafka_tl_cons;
        kafka_sub *x;

        bus__mutex_unlock(&kb->smtx);
        /* Not ours, or already gone, or taken out of the registry by a
         * close (kafka_subs_stop) that raced with this unsubscribe from a
         * handler: the thread would then go on calling s until it sees
         * stop, after this returned. A subscription still on this
         * thread's list lives until the thread is joined: mark it dead so
         * that no further call of it starts. */
        if (on_thread && tc != NULL) {
            bus__mutex_lock(&tc->mtx);
            for (x = tc->subs; x != NULL && x != s; x = x->next)
                ;
            if (x != NULL)
                s->dead = true;
            bus__mutex_unlock(&tc->mtx);
        }
        return;
    }
    c = s->cons;
    bus__mutex_lock(&c->mtx);
    s->dead = true;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        c->subs = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    c->n_subs--;
    if (bus__tindex_remove(c->index, s->pattern, s, &nix) == BUS_OK) {
        bus__tindex_release(c->index);
        c->index = nix;
    } /* else (no memory): it stays in the index, dead, never matched */
    for (i = 0; i < c->n_parts; i++) {
        kafka_part *p = c->parts[i];
        uint32_t k;
        kafka_part_del_sub(p, s);
        for (k = 0; k < p->n_pending; k++)
            if (p->pending[k] == s) {
                p->pending[k] = p->pending[--p->n_pending];
                s->refs--;
                break;
            }
        /* What it had not finished must not be committed past. */
        if (c->group != NULL && i < s->n_trk && s->trk[i].n > 0 &&
            p->assigned) {
            int64_t h = kt_position(&s->trk[i]);
            if (h < p->floor)
                p->floor = h;
            kafka_mark_dirty(c, p);
        }
    }
    if (c->group != NULL && kafka_substr_unref(c, s->substr))
        c->resubscribe = true;
    empty = c->n_subs == 0;
    if (empty) {
        for (pp = &kb->conss; *pp != NULL; pp = &(*pp)->next)
            if (*pp == c) {
                *pp = c->next;
                break;
            }
        /* Maybe its own thread: it closes on its own (signalled below)
         * and is joined by the next subscribe/unsubscribe from outside,
         * or by stop. Listed in the same section that unlinks it, so a
         * close that runs meanwhile always finds it to join. */
        if (on_thread) {
            c->next = kb->reap;
            kb->reap = c;
        }
    }
    kafka_cons_wake(c);
    bus__mutex_unlock(&c->mtx);
    bus__mutex_unlock(&kb->smtx);
    atomic_fetch_sub_explicit(&kb->st_subs, 1, memory_order_relaxed);

    /* After this no call of s's deliver function is running (unless we
     * are a consumer thread of this broker: then none starts). */
    bus__mutex_lock(&c->mtx);
    if (!on_thread) {
        c->calling_waiters++;
        while (c->calling == s)
            bus__cond_wait(&c->cond, &c->mtx);
        c->calling_waiters--;
    }
    for (i = 0; i < s->n_trk; i++)
        kt_clear(&s->trk[i]);
    last = --s->refs == 0;
    bus__mutex_unlock(&c->mtx);
    if (last)
        kafka_sub_free(s);

    if (empty) {
        kafka_cons_signal_stop(c);
        if (!on_thread)
            kafka_cons_join_free(c);
    }
    if (!on_thread)
        kafka_reap(kb, false);
}

/* Applies an outcome to s's tracker. @locks c->mtx. */
static void
kafka_ack_locked(kafka_cons *c, kafka_sub *s, uint64_t token, bus_result res)
{
    kafka_broker *kb = c->kb;
    uint64_t slot = token >> KAFKA_OFFSET_BITS;
    int64_t off = (int64_t)(token & KAFKA_OFFSET_MASK);
    bool wake = false;
    kafka_part *p;
    kt *t;

    if (s->dead || slot > c->n_parts || slot > s->n_trk ||
        !(p = c->parts[slot - 1])->assigned)
        return; /* gone, or released since: the next owner redelivers it */
    t = &s->trk[slot - 1];
    if (res == BUS_RETRY && !p->revoking &&
        !atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        kt_entry *e = kt_find(t, off);
        if (e != NULL && e->state == KT_INFLIGHT) {
            if (kb->redelivery_max > 0 && e->attempts > kb->redelivery_max) {
                bus_logf(&kb->log, BUS_LOG_ERR, "kafka",
                         "%s [%d] @%lld: still failing after %u "
                         "redeliveries: skipped (redelivery.max)",
                         p->ktopic, (int)p->partition, (long long)off,
                         kb->redelivery_max);
                atomic_fetch_add_explicit(&kb->st_skipped, 1,
                                          memory_order_relaxed);
                res = BUS_REJECT; /* finished: handled below */
            } else {
                uint64_t b = (uint64_t)kb->backoff_ms, due;
                uint32_t k;
                for (k = 1; k < e->attempts && b < (uint64_t)kb->backoff_max_ms;
                     k++)
                    b *= 2;
                if (b > (uint64_t)kb->backoff_max_ms)
                    b = (uint64_t)kb->backoff_max_ms;
                due = kafka_now() + KAFKA_MS(b);
                (void)kt_retry(t, off, due);
                if (c->retry_due_ns == 0 || due < c->retry_due_ns) {
                    c->retry_due_ns = due;
                    wake = true;
                }
            }
        }
    } else if (res == BUS_RETRY) {
        /* Revoking or stopping: not handled, so not finished; it no
         * longer counts as running (the revocation need not wait). */
        (void)kt_retry(t, off, UINT64_MAX);
    }
    if (res != BUS_RETRY) {
        bool was_full = t->n >= t->max;
        if (kt_done(t, off, NULL)) {
            kafka_mark_dirty(c, p);
            if (was_full) {
                /* Its partition may be held for want of room. */
                c->waiting_room = true;
                wake = true;
            }
        }
    }
    if (p->revoking)
        bus__cond_broadcast(&c->cond);
    if (wake)
        kafka_cons_wake(c); /* only signals: safe under our lock */
}

/* Applies the acks deferred during a call of c->deferring's deliver
 * function and stops deferring. @locks c->mtx, @thread the consumer's. */
static void
kafka_apply_defacks(kafka_cons *c)
{
    kafka_sub *s = c->deferring;
    uint32_t i;

    c->deferring = NULL;
    for (i = 0; i < c->n_defacks; i++)
        kafka_ack_locked(c, s, c->defacks[i].token, c->defacks[i].res);
    c->n_defacks = 0;
}

void
kafka_ack(void *priv, void *handle, uint64_t token, bus_result res)
{
    kafka_broker *kb = priv;
    kafka_sub *s = handle;
    kafka_cons *c, *tc = kafka_tl_cons;

    if ((token >> KAFKA_OFFSET_BITS) == 0)
        return;
    if (tc != NULL && tc->calling == s && tc == s->cons) {
        /* An inline handler acking during its own delivery: the thread
         * pins s (calling), so the registry need not vouch for it; the
         * thread applies the ack in the lock round after the call. */
        c = tc;
        if (c->deferring == s && c->n_defacks < KAFKA_DEFACKS) {
            c->defacks[c->n_defacks].token = token;
            c->defacks[c->n_defacks].res = res;
            c->n_defacks++;
            return;
        }
        bus__mutex_lock(&c->mtx);
    } else {
        bus__mutex_lock(&kb->smtx);
        if (!kafka_reg_has(kb, s)) {
            bus__mutex_unlock(&kb->smtx);
            return; /* unsubscribed: its records were not committed */
        }
        c = s->cons;
        bus__mutex_lock(&c->mtx);
        bus__mutex_unlock(&kb->smtx);
    }
    kafka_ack_locked(c, s, token, res);
    bus__mutex_unlock(&c->mtx);
}

void
kafka_poke_subs(kafka_broker *kb, const char *btopic)
{
    void *buf[1];
    kafka_cons *c;

    bus__mutex_lock(&kb->smtx);
    for (c = kb->conss; c != NULL; c = c->next) {
        bus__mutex_lock(&c->mtx);
        if (bus__tindex_match(c->index, btopic, strlen(btopic), buf, 1) > 0) {
            atomic_store_explicit(&c->poke, true, memory_order_relaxed);
            kafka_cons_wake(c);
        }
        bus__mutex_unlock(&c->mtx);
    }
    bus__mutex_unlock(&kb->smtx);
}

void
kafka_subs_close(kafka_broker *kb)
{
    kafka_cons *c;

    bus__mutex_lock(&kb->smtx);
    for (c = kb->conss; c != NULL; c = c->next)
        kafka_cons_signal_stop(c);
    bus__mutex_unlock(&kb->smtx);
}

void
kafka_subs_stop(kafka_broker *kb)
{
    kafka_cons *c, *all;
    kafka_sub *s;

    bus__mutex_lock(&kb->smtx);
    all = kb->conss;
    kb->conss = NULL;
    for (c = all; c != NULL; c = c->next) {
        bus__mutex_lock(&c->mtx);
        for (s = c->subs; s != NULL; s = s->next) {
            kafka_reg_del(kb, s);
            atomic_fetch_sub_explicit(&kb->st_subs, 1, memory_order_relaxed);
        }
        bus__mutex_unlock(&c->mtx);
    }
    bus__mutex_unlock(&kb->smtx);
    while ((c = all) != NULL) {
        all = c->next;
        kafka_cons_signal_stop(c);
        kafka_cons_join_free(c);
    }
    kafka_reap(kb, true);
    if (kb->reg != NULL) {
        bus__free(kb->reg, kb->reg_cap * sizeof(*kb->reg));
        kb->reg = NULL;
        kb->reg_cap = kb->reg_n = kb->reg_used = 0;
    }
}

bool
kafka_subs_fatal(kafka_broker *kb, char *msg, size_t msg_len)
{
    kafka_cons *c;
    bool fatal = false;

    bus__mutex_lock(&kb->smtx);
    for (c = kb->conss; c != NULL && !fatal; c = c->next)
        if (atomic_load_explicit(&c->fatal, memory_order_relaxed)) {
            fatal = true;
            if (msg != NULL && msg_len > 0)
                snprintf(msg, msg_len,
                         "consumer (group %s) hit a fatal error (see log)",
                         c->group != NULL ? c->group : "none");
        }
    bus__mutex_unlock(&kb->smtx);
    return fatal;
}
