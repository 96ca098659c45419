/*
 * Reliable mode: DEALER (sender) to ROUTER (receiver), at least once
 * (contract: <bus/broker_zmq.h>).
 *
 * Sender design (I/O thread):
 * - The window is a fixed pool of `window` flights. A publish takes a
 *   credit (zmq_broker.c), so when the I/O thread pops it a flight is
 *   always free. A flight's tag is its index << 32 | a generation, so
 *   an ack finds it in O(1) and a late ack for a recycled flight is
 *   recognised as stale.
 * - Flights sit on `unsent` (waiting for the socket: the DEALER has
 *   ZMQ_IMMEDIATE, so with no connection a send fails at once instead of
 *   queueing into a pipe that a dead peer would take down with it) or on
 *   `sent`, oldest first. Each send is [tag][topic][copy of envelope]; the
 *   copy shares the buffer (zmq_msg_copy), so resends copy nothing.
 * - Resends: flights on `sent` longer than resend_ivl go back to the
 *   front of `unsent`; after a reconnect (the monitor's handshake
 *   event) all of `sent` does, since the old connection may have lost
 *   them. An ack ends a flight: its publish ack runs with BUS_OK and the
 *   credit comes back.
 *
 * Hub design (bind side, I/O thread): a peer that subscribes sends
 * SUB pattern (and UNSUB, and PING every peer_timeout/4); the hub
 * answers SUBOK (the peer's subscribe returns then) and keeps one remote
 * subscription per (peer, pattern) among its own. Delivering to a remote
 * subscription sends [tag][topic][envelope] to the peer (ROUTER with
 * ZMQ_ROUTER_MANDATORY: an unreachable peer is an error, its HWM
 * EAGAIN), tagged by a per-peer sequence that indexes a window of slots;
 * the peer acks it as any receiver does, unacked ones are resent after
 * resend_ivl, and a peer silent for peer_timeout (or unreachable) is
 * dropped with its subscriptions. A record is acked to its sender once
 * the hub's own subscriptions and the peers' have acked it. A PING from
 * an unknown peer (the hub restarted) gets WHO, and the peer subscribes
 * again (it also does on every reconnect).
 *
 * Receiver design (hub and peers, I/O thread):
 * - Each new event becomes a record (zb_rec) keyed by its id in an
 *   open-addressing table, with one delivery (zb_dlv, whose address is
 *   the token) per matching subscription. The record keeps a reference
 *   on the event for redeliveries and the reply addresses (ROUTER
 *   identity and tag) of every copy received.
 * - A delivery refused with BUS_EAGAIN waits on its subscription's
 *   backlog, after which later deliveries to that subscription queue too
 *   (order kept); the backlog is offered again when that subscription
 *   acks (room was made), else after a backoff of 1 to 64 ms that grows
 *   only while nothing is taken.
 *   BUS_RETRY from the ack op redelivers after 50 ms doubling to 2 s.
 * - The ack op may run on any thread: it writes the result and pushes
 *   the delivery on a lock-free stack (Treiber; one consumer takes the
 *   whole stack with an exchange, so there is no ABA). When the last
 *   delivery of a record is done, acks go to every reply address
 *   (batched per peer), and the id moves to the "handled" ring of the
 *   table (`dedup` ids, oldest evicted). A copy whose id is pending or
 *   handled is dropped and counted; for a handled id it is re-acked.
 * - Unsubscribing orphans the subscription's outstanding deliveries (an
 *   ack may still come for them: the memory lives until then, or fini)
 *   and counts them done for their records, so a record never waits for
 *   a subscription that is gone.
 * - Events are not acked while no subscription is live, nor beyond
 *   ZB_PENDING_PER_WINDOW windows of pending records: they are dropped
 *   unacked and wait at their sender for a resend, which is the
 *   receiver's flow control. (Reading goes on: the same socket carries
 *   the acks and subscriptions that let pending records finish.)
 */
#include <errno.h>
#include <string.h>

#include "topic.h"
#include "zmq_impl.h"

#define ZB_BACKLOG_MAX_MS 64
#define ZB_RETRY_BASE_MS 50
#define ZB_RETRY_MAX_MS 2000

static void
zb_put_be64(uint8_t *p, uint64_t v)
{
    int i;

    for (i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t
zb_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* ---- The id table -------------------------------------------------------- */

static int
zb_idtab_init(zb_idtab *t, size_t entries, size_t fifo)
{
    size_t cap = 16;

    while (cap < entries + entries / 3 + 1) /* load factor <= 3/4 */
        cap <<= 1;
    if ((t->slots = bus__zalloc(cap * sizeof(*t->slots))) == NULL ||
        (t->fifo = bus__zalloc(fifo * sizeof(*t->fifo))) == NULL)
        return BUS_ENOMEM;
    t->cap = cap;
    t->fifo_cap = fifo;
    /* Keyed, so that a peer cannot choose ids that collide. */
    t->k0 = bus__random_u64();
    t->k1 = bus__random_u64();
    return BUS_OK;
}

static void
zb_idtab_fini(zb_idtab *t)
{
    bus__free(t->slots, t->cap * sizeof(*t->slots));
    bus__free(t->fifo, t->fifo_cap * sizeof(*t->fifo));
    memset(t, 0, sizeof(*t));
}

static size_t
zb_idhash(const zb_idtab *t, const bus_uuid *u)
{
    uint64_t a, b, h;

    memcpy(&a, u->b, 8);
    memcpy(&b, u->b + 8, 8);
    h = (a ^ t->k0) * 0x9E3779B97F4A7C15ull;
    h ^= (b ^ t->k1);
    h *= 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 31;
    return (size_t)h & (t->cap - 1);
}

/* The slot holding u (*found) or the empty slot where it would go. */
static size_t
zb_idtab_slot(const zb_idtab *t, const bus_uuid *u, bool *found)
{
    size_t i = zb_idhash(t, u);

    for (;;) {
        if (t->slots[i].val == NULL) {
            *found = false;
            return i;
        }
        if (memcmp(t->slots[i].key.b, u->b, 16) == 0) {
            *found = true;
            return i;
        }
        i = (i + 1) & (t->cap - 1);
    }
}

/* Deletes slot i (linear probing: shift the followers back). */
static void
zb_idtab_del_at(zb_idtab *t, size_t i)
{
    size_t j = i, mask = t->cap - 1;

    for (;;) {
        size_t k;
        j = (j + 1) & mask;
        if (t->slots[j].val == NULL)
            break;
        k = zb_idhash(t, &t->slots[j].key);
        /* Move j to i unless its home k lies cyclically in (i, j]. */
        if ((i <= j) ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        t->slots[i] = t->slots[j];
        i = j;
    }
    t->slots[i].val = NULL;
    t->n--;
}

/* Marks the id at slot i handled and remembers it, evicting the oldest
 * handled id when the ring is full. */
static void
zb_idtab_done(zb_idtab *t, size_t i)
{
    bus_uuid id = t->slots[i].key;

    t->slots[i].val = ZB_DONE;
    if (t->fifo_n == t->fifo_cap) {
        bus_uuid *old = &t->fifo[t->fifo_head];
        bool found;
        size_t j = zb_idtab_slot(t, old, &found);
        if (found && t->slots[j].val == ZB_DONE)
            zb_idtab_del_at(t, j);
        t->fifo_head = (t->fifo_head + 1) % t->fifo_cap;
        t->fifo_n--;
    }
    t->fifo[(t->fifo_head + t->fifo_n) % t->fifo_cap] = id;
    t->fifo_n++;
}

/* ---- Setup ------------------------------------------------------------------
 */

int
zb_rel_init(zb *z)
{
    uint32_t i;
    int rv;

    /* Both sides send: the connecting side to its peer, the bound side
     * through its loopback DEALER. */
    z->nflights = z->o.window;
    if ((z->flights = bus__zalloc(z->nflights * sizeof(*z->flights))) == NULL)
        return BUS_ENOMEM;
    for (i = z->nflights; i-- > 0;) {
        zb_flight *f = &z->flights[i];
        zmq_msg_init(&f->p.env);
        f->gen = 1;
        f->next = z->free_flights;
        z->free_flights = f;
    }
    if ((rv = zb_idtab_init(&z->ids, z->max_pending + z->o.dedup,
                            z->o.dedup)) != BUS_OK)
        return rv;
    return BUS_OK;
}

static void zb_peer_free(zb_peer *p);

static void zb_rec_clear(zb_rec *r);

void
zb_rel_fini(zb *z)
{
    uint32_t i;
    zb_rec *r;
    zb_dlv *d;

    if (z->flights != NULL) {
        for (i = 0; i < z->nflights; i++) {
            zb_pub_clear(&z->flights[i].p);
            zmq_msg_close(&z->flights[i].p.env);
        }
        bus__free(z->flights, z->nflights * sizeof(*z->flights));
        z->flights = NULL;
    }
    /* Acks pushed after the I/O thread ended: the deliveries themselves
     * are freed from the lists below. */
    atomic_store_explicit(&z->acks, NULL, memory_order_relaxed);
    while ((d = z->orphans) != NULL) {
        z->orphans = d->snext;
        bus__free(d, sizeof(*d));
    }
    while ((r = z->recs) != NULL) {
        z->recs = r->next;
        zb_rec_clear(r);
        bus__free(r, sizeof(*r));
    }
    while ((r = z->rec_pool) != NULL) {
        z->rec_pool = r->next;
        bus__free(r, sizeof(*r));
    }
    while ((d = z->dlv_pool) != NULL) {
        z->dlv_pool = d->next;
        bus__free(d, sizeof(*d));
    }
    while (z->peers != NULL) {
        zb_peer *p = z->peers;
        z->peers = p->next;
        zb_peer_free(p);
    }
    zb_idtab_fini(&z->ids);
}

/* ---- Sender
 * --------------------------------------------------------------------- */

static void
zb_fl_append(zb_flist *l, zb_flight *f, uint8_t which)
{
    f->list = which;
    f->next = NULL;
    f->prev = l->tail;
    if (l->tail != NULL)
        l->tail->next = f;
    else
        l->head = f;
    l->tail = f;
    l->n++;
}

static void
zb_fl_remove(zb_flist *l, zb_flight *f)
{
    if (f->prev != NULL)
        f->prev->next = f->next;
    else
        l->head = f->next;
    if (f->next != NULL)
        f->next->prev = f->prev;
    else
        l->tail = f->prev;
    f->prev = f->next = NULL;
    f->list = ZB_FL_NONE;
    l->n--;
}

/* Moves all of src to the front of dst, in order. */
static void
zb_fl_prepend(zb_flist *dst, zb_flist *src, uint8_t which)
{
    zb_flight *f;

    if (src->n == 0)
        return;
    for (f = src->head; f != NULL; f = f->next)
        f->list = which;
    src->tail->next = dst->head;
    if (dst->head != NULL)
        dst->head->prev = src->tail;
    else
        dst->tail = src->tail;
    dst->head = src->head;
    dst->n += src->n;
    src->head = src->tail = NULL;
    src->n = 0;
}

void
zb_rel_take(zb *z, zb_pub *p)
{
    zb_flight *f = z->free_flights;

    if (f == NULL) { /* cannot happen: credits bound the flights */
        zb_logf(z, BUS_LOG_ERR, "window overflow (a bug): event failed");
        zb_pub_finish(p, BUS_EINTERNAL);
        zb_release(z, 1, 1);
        return;
    }
    z->free_flights = f->next;
    zb_pub_move(&f->p, p);
    f->used = true;
    f->sends = 0;
    f->sent_ns = 0;
    zb_fl_append(&z->unsent, f, ZB_FL_UNSENT);
}

static uint64_t
zb_flight_tag(const zb *z, const zb_flight *f)
{
    return (uint64_t)(f - z->flights) << 32 | f->gen;
}

/* A flight's record in a batch frame. */
static size_t
zb_batch_rec_size(const zb_flight *f)
{
    return ZB_BATCH_HDR + f->p.topic_len + zmq_msg_size(&f->p.env);
}

static void
zb_put_be(uint8_t *p, uint64_t v, int n)
{
    while (n-- > 0) {
        p[n] = (uint8_t)v;
        v >>= 8;
    }
}

/* The flight went out (alone or in a batch). */
static void
zb_flight_sent(zb *z, zb_flight *f, uint64_t now)
{
    zb_count(f->sends++ == 0 ? &z->st.sent : &z->st.resent, 1);
    f->sent_ns = now;
    zb_fl_remove(&z->unsent, f);
    zb_fl_append(&z->sent, f, ZB_FL_SENT);
}

/* Sends the head of unsent and the flights after it that fit in one
 * batch frame of up to o.batch bytes: one libzmq message (and one
 * receive, one wire frame) for many events instead of three frames per
 * event. Copies each envelope (a resend builds a new batch). False when
 * the socket refused it (no peer, HWM): retried when writable. */
static bool
zb_rel_send_batch(zb *z, uint64_t now)
{
    size_t total = 1, n = 0, off = 1, i;
    zb_flight *f;
    zmq_msg_t m;
    uint8_t *d;

    for (f = z->unsent.head; f != NULL; f = f->next, n++) {
        size_t rec = zb_batch_rec_size(f);
        if (total + rec > (size_t)z->o.batch)
            break;
        total += rec;
    }
    if (zmq_msg_init_size(&m, total) != 0)
        return false; /* out of memory: try later */
    d = zmq_msg_data(&m);
    d[0] = ZB_C_BATCH;
    for (i = 0, f = z->unsent.head; i < n; i++, f = f->next) {
        size_t esize = zmq_msg_size(&f->p.env);
        zb_put_be(d + off, zb_flight_tag(z, f), ZB_TAG_LEN);
        zb_put_be(d + off + ZB_TAG_LEN, f->p.topic_len, 2);
        off += ZB_TAG_LEN + 2;
        memcpy(d + off, zb_pub_topic(&f->p), f->p.topic_len);
        off += f->p.topic_len;
        zb_put_be(d + off, esize, 4);
        off += 4;
        memcpy(d + off, zmq_msg_data(&f->p.env), esize);
        off += esize;
    }
    ZB_TSAN_RELEASE(&m);
    if (zmq_msg_send(&m, z->send_sock, ZMQ_DONTWAIT) < 0) {
        if (zmq_errno() != EAGAIN)
            zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN, "send: %s",
                        zmq_strerror(zmq_errno()));
        zmq_msg_close(&m);
        return false;
    }
    for (i = 0; i < n; i++)
        zb_flight_sent(z, z->unsent.head, now);
    return true;
}

/* True when the head of unsent and the flight after it fit in a batch:
 * then a batch goes, otherwise [tag][topic][envelope] alone. */
static bool
zb_rel_batchable(const zb *z, const zb_flight *f)
{
    return z->o.batch > 0 && f->next != NULL &&
           1 + zb_batch_rec_size(f) + zb_batch_rec_size(f->next) <=
               (size_t)z->o.batch;
}

void
zb_rel_send(zb *z, uint64_t now)
{
    zb_flight *f;

    while ((f = z->unsent.head) != NULL) {
        uint8_t tag[ZB_TAG_LEN];
        zmq_msg_t c;

        if (zb_rel_batchable(z, f)) {
            if (!zb_rel_send_batch(z, now))
                return;
            continue;
        }
        zb_put_be64(tag, zb_flight_tag(z, f));
        if (zmq_send(z->send_sock, tag, sizeof(tag),
                     ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
            if (zmq_errno() != EAGAIN)
                zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN, "send: %s",
                            zmq_strerror(zmq_errno()));
            return; /* no peer or HWM: retried when writable */
        }
        /* The first part went, so the rest goes (multipart is whole). */
        if (zmq_send(z->send_sock, zb_pub_topic(&f->p), f->p.topic_len,
                     ZMQ_SNDMORE) < 0)
            zb_logf(z, BUS_LOG_ERR, "send topic: %s",
                    zmq_strerror(zmq_errno()));
        zmq_msg_init(&c);
        zmq_msg_copy(&c, &f->p.env);
        ZB_TSAN_RELEASE(&c);
        if (zmq_msg_send(&c, z->send_sock, 0) < 0) {
            zmq_msg_close(&c);
            zb_logf(z, BUS_LOG_ERR, "send envelope: %s",
                    zmq_strerror(zmq_errno()));
        }
        zb_flight_sent(z, f, now);
    }
}

/* An ack for tag: ends the flight if it is still the one tagged. */
static bool
zb_rel_acked(zb *z, uint64_t tag)
{
    uint64_t idx = tag >> 32;
    zb_flight *f;

    if (idx >= z->nflights)
        return false;
    f = &z->flights[idx];
    if (!f->used || f->gen != (uint32_t)tag)
        return false; /* a second ack, after a resend: already done */
    zb_fl_remove(f->list == ZB_FL_SENT ? &z->sent : &z->unsent, f);
    zb_pub_finish(&f->p, BUS_OK);
    f->used = false;
    if (++f->gen == 0)
        f->gen = 1;
    f->next = z->free_flights;
    z->free_flights = f;
    zb_count(&z->st.acked, 1);
    return true;
}

/* ---- Peer side: patterns, pings, input ------------------------------- */

static uint32_t
zb_pow2_u32(uint32_t v)
{
    uint32_t p = 1;

    while (p < v)
        p <<= 1;
    return p;
}

static void
zb_dealer_ctrl(zb *z, uint8_t kind, const char *text, size_t len)
{
    uint8_t buf[1 + BUS_TOPIC_MAX_LEN];

    buf[0] = kind;
    memcpy(buf + 1, text, len);
    /* Not connected (ZMQ_IMMEDIATE): lost, and sent again on connect. */
    (void)zmq_send(z->send_sock, buf, 1 + len, ZMQ_DONTWAIT);
}

static void
zb_resubscribe(zb *z)
{
    size_t i;

    for (i = 0; i < z->my_prefixes.cap; i++)
        if (z->my_prefixes.v[i].p != NULL)
            zb_dealer_ctrl(z, ZB_C_SUB, z->my_prefixes.v[i].p,
                           z->my_prefixes.v[i].len);
}

/* A peer's patterns, counted (two subscriptions with one pattern are one
 * registration at the hub). */
int
zb_rel_sub_add(zb *z, zb_sub *s, bool *sent)
{
    size_t len = strlen(s->pattern);
    bool first;
    int rv;

    *sent = false;
    if (z->o.bind)
        return BUS_OK; /* the hub's own: nobody to tell */
    if ((rv = zb_prefix_inc(&z->my_prefixes, s->pattern, len, &first)) !=
        BUS_OK)
        return rv;
    if (first) {
        zb_dealer_ctrl(z, ZB_C_SUB, s->pattern, len);
        *sent = true;
    }
    return BUS_OK;
}

void
zb_rel_sub_del(zb *z, zb_sub *s)
{
    size_t len = strlen(s->pattern);
    bool found;

    if (z->o.bind || !s->added)
        return;
    if (zb_prefix_dec(&z->my_prefixes, s->pattern, len, &found))
        zb_dealer_ctrl(z, ZB_C_UNSUB, s->pattern, len);
}

void
zb_rel_reconnected(zb *z)
{
    if (z->sent.n > 0)
        zb_logf(z, BUS_LOG_INFO,
                "resending %zu unacked event(s) after reconnecting", z->sent.n);
    zb_fl_prepend(&z->unsent, &z->sent, ZB_FL_UNSENT);
    zb_resubscribe(z);
}

static int zb_recv_parts(void *sock, zmq_msg_t m[4]);
static void zb_rel_batch(zb *z, const void *pid, size_t pidlen,
                         const uint8_t *d, size_t len, uint64_t now);
static void zb_rel_data(zb *z, const void *pid, size_t pidlen, zmq_msg_t *m,
                        uint64_t now);

void
zb_rel_dealer_input(zb *z)
{
    uint64_t done = 0, now = bus__clock_mono_ns();
    zmq_msg_t m[4];
    int i, n, k;

    for (i = 0; i < ZB_RECV_BATCH; i++) {
        const uint8_t *d;
        size_t len;

        if ((n = zb_recv_parts(z->send_sock, m)) == 0)
            break;
        if (n == 3) { /* the hub delivers: [tag][topic][envelope] */
            zb_rel_data(z, "", 0, m, now); /* no identity: our DEALER */
            continue;
        }
        if (n != 1) {
            for (k = 0; k < n && k < 4; k++)
                zmq_msg_close(&m[k]);
            zb_bad_frame(z, "from the hub: want a control frame or "
                            "[tag][topic][envelope]");
            continue;
        }
        d = zmq_msg_data(&m[0]);
        len = zmq_msg_size(&m[0]);
        if (len >= 1 + ZB_TAG_LEN && d[0] == ZB_C_ACK &&
            (len - 1) % ZB_TAG_LEN == 0) {
            for (k = 1; (size_t)k < len; k += ZB_TAG_LEN)
                done += zb_rel_acked(z, zb_get_be64(d + k));
        } else if (len >= 1 && d[0] == ZB_C_BATCH) {
            ZB_TSAN_ACQUIRE(&m[0]);
            zb_rel_batch(z, "", 0, d, len, now);
        } else if (len >= 1 && d[0] == ZB_C_SUBOK) {
            zb_sync_done(z, (const char *)d + 1, len - 1);
        } else if (len == 1 && d[0] == ZB_C_WHO) {
            zb_logf(z, BUS_LOG_INFO,
                    "the hub does not know us (it "
                    "restarted?): subscribing again");
            zb_resubscribe(z);
        } else {
            zb_bad_frame(z, "malformed control frame from the hub");
        }
        zmq_msg_close(&m[0]);
    }
    if (done > 0)
        zb_release(z, done, done);
}

bool
zb_rel_sender_idle(zb *z)
{
    return z->unsent.n == 0 && z->sent.n == 0;
}

void
zb_rel_abort(zb *z)
{
    uint64_t n = 0;
    uint32_t i;

    for (i = 0; i < z->nflights; i++) {
        zb_flight *f = &z->flights[i];
        if (!f->used)
            continue;
        zb_fl_remove(f->list == ZB_FL_SENT ? &z->sent : &z->unsent, f);
        zb_pub_finish(&f->p, BUS_ECLOSED);
        f->used = false;
        n++;
    }
    if (n > 0) {
        zb_logf(z, BUS_LOG_WARN,
                "stopped with %llu event(s) unacked: their acks report "
                "BUS_ECLOSED",
                (unsigned long long)n);
        zb_release(z, n, n);
    }
}

/* ---- Receiver: records and deliveries ---------------------------------------
 */

static void
zb_reply_free(zb_reply *p)
{
    if (p->id != p->id_buf)
        bus__free(p->id, p->idlen);
    if (!p->embedded)
        bus__free(p, sizeof(*p));
}

/* Frees r's contents (keeps r). */
static void
zb_rec_clear(zb_rec *r)
{
    zb_reply *p;

    while ((p = r->replies) != NULL) {
        r->replies = p->next;
        zb_reply_free(p);
    }
    bus_event_unref(r->ev);
    r->ev = NULL;
    if (r->has_env)
        zmq_msg_close(&r->env);
    r->has_env = false;
    if (r->topic != r->topic_buf)
        bus__free(r->topic, r->topic_size);
    r->topic = NULL;
}

static zb_rec *
zb_rec_get(zb *z)
{
    zb_rec *r = z->rec_pool;

    if (r != NULL) {
        z->rec_pool = r->next;
        z->nrec_pool--;
        memset(r, 0, sizeof(*r));
        return r;
    }
    return bus__zalloc(sizeof(*r));
}

/* Frees r's contents and keeps r for reuse (bounded). */
static void
zb_rec_put(zb *z, zb_rec *r)
{
    zb_rec_clear(r);
    if (z->nrec_pool >= ZB_POOL_MAX || z->stopped) {
        bus__free(r, sizeof(*r));
        return;
    }
    r->next = z->rec_pool;
    z->rec_pool = r;
    z->nrec_pool++;
}

static zb_dlv *
zb_dlv_get(zb *z)
{
    zb_dlv *d = z->dlv_pool;

    if (d != NULL) {
        z->dlv_pool = d->next;
        z->ndlv_pool--;
        memset(d, 0, sizeof(*d));
        return d;
    }
    return bus__zalloc(sizeof(*d));
}

static void
zb_dlv_put(zb *z, zb_dlv *d)
{
    if (z->ndlv_pool >= ZB_POOL_MAX || z->stopped) {
        bus__free(d, sizeof(*d));
        return;
    }
    d->next = z->dlv_pool;
    z->dlv_pool = d;
    z->ndlv_pool++;
}

static int
zb_rec_set_topic(zb_rec *r, const char *topic)
{
    size_t n = strlen(topic) + 1;

    if (n <= sizeof(r->topic_buf)) {
        r->topic = r->topic_buf;
    } else {
        if ((r->topic = bus__alloc(n)) == NULL)
            return BUS_ENOMEM;
        r->topic_size = n;
    }
    memcpy(r->topic, topic, n);
    return BUS_OK;
}

static int
zb_rec_add_reply(zb_rec *r, const void *id, size_t idlen, uint64_t tag)
{
    zb_reply *p;

    for (p = r->replies; p != NULL; p = p->next)
        if (p->tag == tag && p->idlen == idlen && memcmp(p->id, id, idlen) == 0)
            return BUS_OK;
    if (!r->reply0.embedded) {
        p = &r->reply0;
        p->embedded = true;
    } else if ((p = bus__zalloc(sizeof(*p))) == NULL) {
        return BUS_ENOMEM;
    }
    p->id = p->id_buf;
    if (idlen > sizeof(p->id_buf) && (p->id = bus__alloc(idlen)) == NULL) {
        if (p->embedded)
            p->embedded = false, r->reply0.embedded = false;
        else
            bus__free(p, sizeof(*p));
        return BUS_ENOMEM;
    }
    p->tag = tag;
    p->idlen = idlen;
    memcpy(p->id, id, idlen);
    p->next = r->replies;
    r->replies = p;
    return BUS_OK;
}

void
zb_rel_ack_flush(zb *z)
{
    if (z->ack_n == 0)
        return;
    /* An ack that cannot go (a sender gone, or at its HWM) is dropped:
     * the sender resends and we ack again. */
    if (z->ack_idlen == 0) /* a peer acks the hub through its DEALER */
        (void)zmq_send(z->send_sock, z->ack_buf, 1 + ZB_TAG_LEN * z->ack_n,
                       ZMQ_DONTWAIT);
    else if (zmq_send(z->recv_sock, z->ack_id, z->ack_idlen,
                      ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        (void)zmq_send(z->recv_sock, z->ack_buf, 1 + ZB_TAG_LEN * z->ack_n,
                       ZMQ_DONTWAIT);
    z->ack_n = 0;
}

static void
zb_ack_queue(zb *z, const void *id, size_t idlen, uint64_t tag)
{
    if ((idlen == 0 ? z->send_sock : z->recv_sock) == NULL || z->stopped)
        return; /* fini: nobody to tell */
    if (z->ack_n > 0 && (z->ack_n == ZB_ACK_BATCH || idlen != z->ack_idlen ||
                         memcmp(id, z->ack_id, idlen) != 0))
        zb_rel_ack_flush(z);
    if (z->ack_n == 0) {
        memcpy(z->ack_id, id, idlen);
        z->ack_idlen = idlen;
        z->ack_buf[0] = ZB_ACK_KIND;
    }
    zb_put_be64(z->ack_buf + 1 + ZB_TAG_LEN * z->ack_n, tag);
    z->ack_n++;
}

static void
zb_rec_complete(zb *z, zb_rec *r)
{
    zb_reply *p;
    size_t i;
    bool found;

    for (p = r->replies; p != NULL; p = p->next)
        zb_ack_queue(z, p->id, p->idlen, p->tag);
    i = zb_idtab_slot(&z->ids, &r->id, &found);
    if (found && z->ids.slots[i].val == r)
        zb_idtab_done(&z->ids, i);
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        z->recs = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    z->npending--;
    zb_count(&z->st.acked, 1);
    zb_rec_put(z, r);
}

static void
zb_dlv_unlink(zb_dlv **list, zb_dlv *d)
{
    if (d->sprev != NULL)
        d->sprev->snext = d->snext;
    else
        *list = d->snext;
    if (d->snext != NULL)
        d->snext->sprev = d->sprev;
    d->sprev = d->snext = NULL;
}

static void
zb_dlv_link(zb_dlv **list, zb_dlv *d)
{
    d->sprev = NULL;
    d->snext = *list;
    if (*list != NULL)
        (*list)->sprev = d;
    *list = d;
}

/* A delivery is finished for its subscription: free it and count it
 * done for its record. */
static void
zb_dlv_done(zb *z, zb_dlv *d)
{
    zb_rec *r = d->rec;

    zb_dlv_unlink(&d->sub->dlvs, d);
    zb_dlv_put(z, d);
    if (r != NULL && --r->remaining == 0)
        zb_rec_complete(z, r);
}

static void
zb_backlog_push(zb_sub *s, zb_dlv *d)
{
    d->state = ZB_D_BACKLOG;
    d->next = NULL;
    if (s->bl_tail != NULL)
        s->bl_tail->next = d;
    else
        s->bl_head = d;
    s->bl_tail = d;
}

/* Calls the subscription with d. Returns its result. */
/* ---- Hub: peers ------------------------------------------------------------
 */

static void
zb_peer_free(zb_peer *p)
{
    bus__free(p->slots, p->nslots * sizeof(*p->slots));
    bus__free(p, sizeof(*p));
}

static zb_peer *
zb_peer_find(zb *z, const void *id, size_t idlen)
{
    zb_peer *p;

    for (p = z->peers; p != NULL; p = p->next)
        if (p->idlen == idlen && memcmp(p->id, id, idlen) == 0)
            return p;
    return NULL;
}

static zb_peer *
zb_peer_get(zb *z, const void *id, size_t idlen, uint64_t now)
{
    zb_peer *p = zb_peer_find(z, id, idlen);

    if (p != NULL || idlen == 0 || idlen > sizeof(p->id))
        return p;
    if ((p = bus__zalloc(sizeof(*p))) == NULL)
        return NULL;
    p->nslots = zb_pow2_u32(z->o.window);
    if ((p->slots = bus__zalloc(p->nslots * sizeof(*p->slots))) == NULL) {
        bus__free(p, sizeof(*p));
        return NULL;
    }
    memcpy(p->id, id, idlen);
    p->idlen = idlen;
    p->last_ns = now;
    p->next = z->peers;
    z->peers = p;
    return p;
}

static void
zb_rout_unlink(zb *z, zb_dlv *d)
{
    if (d->rprev != NULL)
        d->rprev->rnext = d->rnext;
    else
        z->rout_head = d->rnext;
    if (d->rnext != NULL)
        d->rnext->rprev = d->rprev;
    else
        z->rout_tail = d->rprev;
    d->rprev = d->rnext = NULL;
}

static void
zb_rout_append(zb *z, zb_dlv *d)
{
    d->rnext = NULL;
    d->rprev = z->rout_tail;
    if (z->rout_tail != NULL)
        z->rout_tail->rnext = d;
    else
        z->rout_head = d;
    z->rout_tail = d;
}

/* Sends d to its peer (again, when resend). BUS_OK, BUS_EAGAIN (window
 * or HWM full), BUS_ECLOSED (the peer is unreachable). */
static int
zb_peer_offer(zb *z, zb_dlv *d, uint64_t now, bool resend)
{
    zb_peer *p = d->sub->peer;
    zb_rec *r = d->rec;
    uint8_t tag[ZB_TAG_LEN];
    uint64_t seq;
    zmq_msg_t c;

    if (p->gone || !r->has_env)
        return BUS_ECLOSED;
    if (resend) {
        seq = d->rseq;
    } else {
        seq = p->next_seq + 1;
        if (p->nout >= p->nslots || p->slots[seq & (p->nslots - 1)] != NULL)
            return BUS_EAGAIN;
    }
    if (zmq_send(z->recv_sock, p->id, p->idlen, ZMQ_SNDMORE | ZMQ_DONTWAIT) <
        0) {
        if (zmq_errno() == EAGAIN)
            return BUS_EAGAIN;
        p->gone = true; /* EHOSTUNREACH: disconnected */
        return BUS_ECLOSED;
    }
    zb_put_be64(tag, seq);
    (void)zmq_send(z->recv_sock, tag, sizeof(tag), ZMQ_SNDMORE);
    (void)zmq_send(z->recv_sock, r->topic, strlen(r->topic), ZMQ_SNDMORE);
    zmq_msg_init(&c);
    zmq_msg_copy(&c, &r->env);
    ZB_TSAN_RELEASE(&c);
    if (zmq_msg_send(&c, z->recv_sock, 0) < 0)
        zmq_msg_close(&c);
    d->sent_ns = now;
    if (resend) {
        zb_count(&z->st.resent, 1);
        zb_rout_unlink(z, d);
    } else {
        p->next_seq = seq;
        p->slots[seq & (p->nslots - 1)] = d;
        p->nout++;
        d->rseq = seq;
        d->state = ZB_D_OUT;
        zb_count(&z->st.sent, 1);
    }
    zb_rout_append(z, d);
    return BUS_OK;
}

/* Takes an outstanding remote delivery out of its peer's window. */
static void
zb_peer_release(zb *z, zb_dlv *d)
{
    zb_peer *p = d->sub->peer;
    size_t i = d->rseq & (p->nslots - 1);

    if (d->state != ZB_D_OUT || p->slots[i] != d)
        return;
    p->slots[i] = NULL;
    p->nout--;
    zb_rout_unlink(z, d);
}

static void
zb_peer_send_ctrl(zb *z, const void *id, size_t idlen, uint8_t kind,
                  const char *text, size_t len)
{
    uint8_t buf[1 + BUS_TOPIC_MAX_LEN];

    buf[0] = kind;
    memcpy(buf + 1, text, len);
    if (zmq_send(z->recv_sock, id, idlen, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        (void)zmq_send(z->recv_sock, buf, 1 + len, ZMQ_DONTWAIT);
}

static zb_sub *
zb_peer_sub_find(zb_peer *p, const char *pattern, size_t len)
{
    zb_sub *s;

    for (s = p->subs; s != NULL; s = s->pnext)
        if (!s->dead && strlen(s->pattern) == len &&
            memcmp(s->pattern, pattern, len) == 0)
            return s;
    return NULL;
}

/* A control frame from a peer (hub side). */
static void
zb_hub_ctrl(zb *z, const uint8_t *id, size_t idlen, const uint8_t *d,
            size_t len, uint64_t now)
{
    char pat[BUS_TOPIC_MAX_LEN + 1];
    zb_peer *p = zb_peer_find(z, id, idlen);
    size_t k, plen = len > 0 ? len - 1 : 0;
    zb_sub *s;

    if (p != NULL)
        p->last_ns = now;
    if (len >= 1 + ZB_TAG_LEN && d[0] == ZB_C_ACK &&
        (len - 1) % ZB_TAG_LEN == 0) {
        if (p == NULL)
            return; /* acks from a peer we dropped: nothing waits */
        for (k = 1; k < len; k += ZB_TAG_LEN) {
            uint64_t seq = zb_get_be64(d + k);
            zb_dlv *x = p->slots[seq & (p->nslots - 1)];
            if (x == NULL || x->rseq != seq)
                continue; /* a second ack after a resend */
            zb_peer_release(z, x);
            if (x->sub->bl_head != NULL)
                x->sub->bl_due = now; /* room in its window */
            zb_dlv_done(z, x);
        }
        return;
    }
    if (len == 1 && d[0] == ZB_C_PING) {
        if (p == NULL)
            zb_peer_send_ctrl(z, id, idlen, ZB_C_WHO, "", 0);
        return;
    }
    if (len < 2 || plen > BUS_TOPIC_MAX_LEN ||
        (d[0] != ZB_C_SUB && d[0] != ZB_C_UNSUB)) {
        zb_bad_frame(z, "malformed control frame from a peer");
        return;
    }
    memcpy(pat, d + 1, plen);
    pat[plen] = '\0';
    if (memchr(pat, '\0', plen) != NULL ||
        bus__topic_check(pat, true, NULL, 0) != BUS_OK) {
        zb_bad_frame(z, "a peer subscribed an invalid pattern");
        return;
    }
    if (d[0] == ZB_C_UNSUB) {
        if (p != NULL && (s = zb_peer_sub_find(p, pat, plen)) != NULL)
            zb_sub_kill(z, s);
        return;
    }
    if ((p = zb_peer_get(z, id, idlen, now)) == NULL) {
        zb_logf(z, BUS_LOG_ERR,
                "out of memory: a peer's subscription "
                "'%s' refused",
                pat);
        return;
    }
    if (zb_peer_sub_find(p, pat, plen) == NULL) {
        if ((s = bus__zalloc(sizeof(*s))) == NULL ||
            (s->pattern = bus__strdup(pat, NULL)) == NULL ||
            (s->z = z, s->peer = p, zb_sub_add(z, s)) != BUS_OK) {
            zb_sub_free(s);
            zb_logf(z, BUS_LOG_ERR,
                    "out of memory: a peer's "
                    "subscription '%s' refused",
                    pat);
            return;
        }
        s->pnext = p->subs;
        p->subs = s;
        zb_logf(z, BUS_LOG_DEBUG, "a peer subscribed '%s'", pat);
    }
    zb_peer_send_ctrl(z, id, idlen, ZB_C_SUBOK, pat, plen);
}

/* Drops a peer that is gone or silent, with its subscriptions. @io,
 * outside deliver loops. */
static void
zb_peer_expire(zb *z, zb_peer *p)
{
    zb_peer **pp;

    zb_logf(z, BUS_LOG_INFO, "dropping a %s peer with %u event(s) outstanding",
            p->gone ? "disconnected" : "silent", p->nout);
    /* Called outside deliver loops, so each kill frees the subscription
     * at once, which unlinks it from p->subs. */
    while (p->subs != NULL && !p->subs->dead)
        zb_sub_kill(z, p->subs);
    if (p->subs != NULL) { /* cannot happen; do not free what is used */
        p->gone = true;
        return;
    }
    for (pp = &z->peers; *pp != p; pp = &(*pp)->next)
        ;
    *pp = p->next;
    zb_peer_free(p);
}

/* Calls the subscription with d (or sends it to its peer). */
static int
zb_offer(zb *z, zb_dlv *d, uint64_t now)
{
    zb_sub *s = d->sub;
    zb_rec *r = d->rec;
    int rv;

    if (s->peer != NULL)
        return zb_peer_offer(z, d, now, false);
    rv = s->fn(s->opaque, r->topic, bus_event_ref(r->ev),
               (uint64_t)(uintptr_t)d, BUS_PUB_NONBLOCK);
    if (rv == BUS_OK) {
        d->state = ZB_D_OUT;
        zb_count(&z->st.delivered, 1);
        return BUS_OK;
    }
    bus_event_unref(r->ev); /* the reference we offered */
    return rv;
}

static void
zb_backlog_start(zb_sub *s, uint64_t now)
{
    s->bl_backoff_ms = 1;
    s->bl_due = now + 1000000u;
}

/* A new record: one delivery per matching subscription. Takes ev, and
 * env when a peer must get it (env may be NULL). */
static void
zb_rel_incoming(zb *z, const void *pid, size_t pidlen, uint64_t tag,
                const char *topic, bus_event *ev, zmq_msg_t *env, uint64_t now)
{
    const bus_uuid *id = bus_event_id(ev);
    zb_dlv *list = NULL, *d;
    size_t slot, i, n, matched = 0, remote = 0;
    bool found;
    zb_rec *r;

    slot = zb_idtab_slot(&z->ids, id, &found);
    if (found) {
        void *v = z->ids.slots[slot].val;
        zb_count(&z->st.duplicates_dropped, 1);
        if (v == ZB_DONE)
            zb_ack_queue(z, pid, pidlen, tag);
        else
            (void)zb_rec_add_reply(v, pid, pidlen, tag);
        bus_event_unref(ev);
        return;
    }
    /* Allocate everything first: a failure then drops the event unacked
     * (the sender resends it), never half-delivered. */
    if ((r = zb_rec_get(z)) == NULL)
        goto nomem;
    r->id = *id;
    r->ev = ev;
    zmq_msg_init(&r->env);
    if (zb_rec_set_topic(r, topic) != BUS_OK ||
        zb_rec_add_reply(r, pid, pidlen, tag) != BUS_OK)
        goto nomem;
    n = z->nsubs;
    for (i = 0; i < n; i++) {
        zb_sub *s = z->subs[i];
        if (s->dead || (s->peer != NULL && s->peer->gone) ||
            !bus__topic_match(s->pattern, topic))
            continue;
        if ((d = zb_dlv_get(z)) == NULL)
            goto nomem;
        d->rec = r;
        d->sub = s;
        d->next = list;
        list = d;
        matched++;
        remote += s->peer != NULL;
    }
    if (remote > 0 && env != NULL) {
        zmq_msg_move(&r->env, env);
        r->has_env = true;
    }
    z->ids.slots[slot].key = *id;
    z->ids.slots[slot].val = r;
    z->ids.n++;
    r->next = z->recs;
    if (z->recs != NULL)
        z->recs->prev = r;
    z->recs = r;
    z->npending++;
    r->remaining = 1; /* held until every delivery below was offered */
    zb_deliver_begin(z);
    while ((d = list) != NULL) {
        zb_sub *s = d->sub;
        int rv;
        list = d->next;
        d->next = NULL;
        if (s->dead) { /* unsubscribed by an earlier delivery */
            zb_dlv_put(z, d);
            continue;
        }
        r->remaining++;
        zb_dlv_link(&s->dlvs, d);
        if (s->bl_head != NULL) {
            zb_backlog_push(s, d);
            continue;
        }
        rv = zb_offer(z, d, now);
        if (rv == BUS_ECLOSED) {
            zb_dlv_done(z, d);
        } else if (rv != BUS_OK) {
            zb_backlog_push(s, d);
            zb_backlog_start(s, now);
        }
    }
    zb_deliver_end(z);
    if (matched == 0)
        zb_count(&z->st.unrouted, 1);
    if (--r->remaining == 0)
        zb_rec_complete(z, r);
    return;
nomem:
    zb_ratelogf(z, &z->rl_drop, BUS_LOG_ERR,
                "out of memory: event on '%s' left unacked (resent later)",
                topic);
    while ((d = list) != NULL) {
        list = d->next;
        zb_dlv_put(z, d);
    }
    if (r != NULL)
        zb_rec_put(z, r); /* drops ev */
    else
        bus_event_unref(ev);
}

/* Receives one message's parts into m[0..4); returns the part count (5:
 * more than 4, the rest discarded) or 0 when nothing was there. */
static int
zb_recv_parts(void *sock, zmq_msg_t m[4])
{
    int n = 0;

    for (;;) {
        if (n == 4) {
            zb_drain_parts(sock);
            return 5;
        }
        zmq_msg_init(&m[n]);
        if (zmq_msg_recv(&m[n], sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m[n]);
            return n;
        }
        n++;
        if (!zmq_msg_more(&m[n - 1]))
            return n;
    }
}

/* Not ready (no subscription yet) or full: the event is left unacked,
 * and its sender keeps it and resends it. */
static bool
zb_rel_refuse(zb *z)
{
    if (z->nlive == 0 || z->npending >= z->max_pending) {
        if (z->nlive > 0)
            zb_count(&z->st.dropped_queue, 1);
        return true;
    }
    return false;
}

/* A data message [tag][topic][envelope] in m[0..3) from pid (a ROUTER
 * identity, or NULL: the hub, through our DEALER). Closes m. */
static void
zb_rel_data(zb *z, const void *pid, size_t pidlen, zmq_msg_t *m, uint64_t now)
{
    char topic[BUS_TOPIC_MAX_LEN + 1];
    zmq_msg_t keep;
    bus_event *ev;
    uint64_t tag;
    int rv;

    zmq_msg_init(&keep);
    if (zmq_msg_size(&m[0]) != ZB_TAG_LEN) {
        zmq_msg_close(&m[0]);
        zmq_msg_close(&m[1]);
        zmq_msg_close(&m[2]);
        zb_bad_frame(z, "tag frame is not 8 bytes");
        return;
    }
    tag = zb_get_be64(zmq_msg_data(&m[0]));
    if (zb_rel_refuse(z)) {
        zmq_msg_close(&m[0]);
        zmq_msg_close(&m[1]);
        zmq_msg_close(&m[2]);
        return;
    }
    if (z->nremote > 0)
        zmq_msg_copy(&keep, &m[2]); /* shares the buffer */
    rv = zb_decode(z, &m[1], &m[2], topic, &ev);
    if (rv == BUS_OK)
        zb_rel_incoming(z, pid, pidlen, tag, topic, ev, &keep, now);
    else if (rv != BUS_ENOMEM)
        /* Undecodable: no handler could ever take it. Ack it so that an
         * honest sender with a bad event does not resend it forever; it
         * was counted (and dead-lettered if asked). */
        zb_ack_queue(z, pid, pidlen, tag);
    zmq_msg_close(&keep);
    zmq_msg_close(&m[0]);
    zmq_msg_close(&m[1]);
}

static uint64_t
zb_get_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* A batch frame d[0..len) (d[0] is ZB_C_BATCH) from pid: each record as
 * zb_rel_data. A malformed record ends the batch (the records before it
 * stand; the rest is counted as one bad frame and resent by an honest
 * sender, unacked). */
static void
zb_rel_batch(zb *z, const void *pid, size_t pidlen, const uint8_t *d,
             size_t len, uint64_t now)
{
    char topic[BUS_TOPIC_MAX_LEN + 1];
    size_t off = 1;

    if (len < 1 + ZB_BATCH_HDR) {
        zb_bad_msg(z, "empty or truncated batch", d, len);
        return;
    }
    while (off < len) {
        size_t tlen, elen;
        const uint8_t *t, *e;
        bus_event *ev;
        zmq_msg_t keep;
        uint64_t tag;
        int rv;

        if (len - off < ZB_BATCH_HDR)
            goto bad;
        tag = zb_get_be(d + off, ZB_TAG_LEN);
        tlen = (size_t)zb_get_be(d + off + ZB_TAG_LEN, 2);
        off += ZB_TAG_LEN + 2;
        if (len - off < tlen + 4)
            goto bad;
        t = d + off;
        off += tlen;
        elen = (size_t)zb_get_be(d + off, 4);
        off += 4;
        if (len - off < elen)
            goto bad;
        e = d + off;
        off += elen;
        if (zb_rel_refuse(z))
            continue;
        rv = zb_decode_buf(z, t, tlen, e, elen, topic, &ev);
        if (rv != BUS_OK) {
            if (rv != BUS_ENOMEM) /* undecodable: as in zb_rel_data */
                zb_ack_queue(z, pid, pidlen, tag);
            continue;
        }
        /* A record going to a peer keeps its envelope as a message. */
        zmq_msg_init(&keep);
        if (z->nremote > 0) {
            zmq_msg_close(&keep);
            if (zmq_msg_init_size(&keep, elen) != 0) {
                zmq_msg_init(&keep);
                bus_event_unref(ev); /* unacked: resent later */
                continue;
            }
            memcpy(zmq_msg_data(&keep), e, elen);
        }
        zb_rel_incoming(z, pid, pidlen, tag, topic, ev, &keep, now);
        zmq_msg_close(&keep);
    }
    return;
bad:
    zb_bad_msg(z, "truncated batch record", d, len);
}

void
zb_rel_router_input(zb *z)
{
    uint64_t now = bus__clock_mono_ns();
    zmq_msg_t m[4];
    int i, n, k;

    for (i = 0; i < ZB_RECV_BATCH; i++) {
        if ((n = zb_recv_parts(z->recv_sock, m)) == 0)
            return;
        /* m[0] is the peer's identity, added by the ROUTER. */
        if (n == 4) {
            zb_peer *p =
                zb_peer_find(z, zmq_msg_data(&m[0]), zmq_msg_size(&m[0]));
            if (p != NULL)
                p->last_ns = now;
            zb_rel_data(z, zmq_msg_data(&m[0]), zmq_msg_size(&m[0]), m + 1,
                        now);
            zmq_msg_close(&m[0]);
        } else if (n == 2 && zmq_msg_size(&m[1]) > 0 &&
                   *(const uint8_t *)zmq_msg_data(&m[1]) == ZB_C_BATCH) {
            zb_peer *p =
                zb_peer_find(z, zmq_msg_data(&m[0]), zmq_msg_size(&m[0]));
            if (p != NULL)
                p->last_ns = now;
            ZB_TSAN_ACQUIRE(&m[1]);
            zb_rel_batch(z, zmq_msg_data(&m[0]), zmq_msg_size(&m[0]),
                         zmq_msg_data(&m[1]), zmq_msg_size(&m[1]), now);
            zmq_msg_close(&m[0]);
            zmq_msg_close(&m[1]);
        } else if (n == 2) {
            zb_hub_ctrl(z, zmq_msg_data(&m[0]), zmq_msg_size(&m[0]),
                        zmq_msg_data(&m[1]), zmq_msg_size(&m[1]), now);
            zmq_msg_close(&m[0]);
            zmq_msg_close(&m[1]);
        } else {
            zb_bad_msg(z, "want [tag][topic][envelope] or a control frame",
                       zmq_msg_data(&m[n > 4 ? 3 : n - 1]),
                       zmq_msg_size(&m[n > 4 ? 3 : n - 1]));
            for (k = 0; k < n && k < 4; k++)
                zmq_msg_close(&m[k]);
        }
    }
}

/* ---- Receiver: acks, retries, backlogs
 * --------------------------------------- */

void
zb_rel_ack(void *priv, void *handle, uint64_t token, bus_result res)
{
    zb *z = priv;
    zb_dlv *d = (zb_dlv *)(uintptr_t)token, *head;

    (void)handle; /* the delivery knows its subscription */
    if (d == NULL || z->stopped)
        return;
    d->result = res;
    head = atomic_load_explicit(&z->acks, memory_order_relaxed);
    do {
        d->ack_next = head;
        /* release: result and ack_next are visible to the I/O thread,
         * which takes the stack with an acquire exchange. */
    } while (!atomic_compare_exchange_weak_explicit(
        &z->acks, &head, d, memory_order_release, memory_order_relaxed));
    zb_wake(z);
}

static uint32_t
zb_retry_ms(uint32_t attempts)
{
    uint64_t ms = (uint64_t)ZB_RETRY_BASE_MS << (attempts > 6 ? 6 : attempts);

    return ms > ZB_RETRY_MAX_MS ? ZB_RETRY_MAX_MS : (uint32_t)ms;
}

/* An ack from s's subscriber: it took a delivery off its queue, so the
 * backlog that waits for room is offered again now, not after its
 * backoff (which stays, for a subscriber that acks nothing). */
static void
zb_backlog_kick(zb_sub *s, uint64_t now)
{
    if (s->bl_head != NULL && s->bl_due > now)
        s->bl_due = now;
}

bool
zb_rel_acks_run(zb *z, uint64_t now)
{
    zb_dlv *d, *rev = NULL, *next;

    /* acquire: pairs with the pushers' release. */
    d = atomic_exchange_explicit(&z->acks, NULL, memory_order_acquire);
    if (d == NULL)
        return false;
    for (; d != NULL; d = next) { /* the stack is newest first */
        next = d->ack_next;
        d->ack_next = rev;
        rev = d;
    }
    for (d = rev; d != NULL; d = next) {
        next = d->ack_next;
        if (d->state == ZB_D_ORPHAN) {
            zb_dlv_unlink(&z->orphans, d);
            zb_dlv_put(z, d);
        } else if (d->state != ZB_D_OUT || d->sub->peer != NULL) {
            zb_logf(z, BUS_LOG_ERR,
                    "ack for a delivery not outstanding "
                    "(acked twice?): ignored");
        } else if (d->result == BUS_RETRY) {
            zb_backlog_kick(d->sub, now);
            d->attempts++;
            d->state = ZB_D_RETRY;
            d->due_ns = now + (uint64_t)zb_retry_ms(d->attempts) * 1000000u;
            d->next = NULL;
            if (z->retry_tail != NULL)
                z->retry_tail->next = d;
            else
                z->retry_head = d;
            z->retry_tail = d;
        } else {
            zb_backlog_kick(d->sub, now);
            zb_dlv_done(z, d);
        }
    }
    return true;
}

/* Offers s's backlog in order until a refusal. The backoff grows only
 * while nothing is taken: a run that made progress waits 1 ms. @io, in
 * a deliver loop */
static void
zb_backlog_run(zb *z, zb_sub *s, uint64_t now)
{
    bool progress = false;
    zb_dlv *d;

    while ((d = s->bl_head) != NULL && !s->dead) {
        int rv = zb_offer(z, d, now);
        if (rv != BUS_OK && rv != BUS_ECLOSED) {
            uint32_t b = progress ? 1 : s->bl_backoff_ms * 2;
            if (b == 0)
                b = 1;
            s->bl_backoff_ms = b > ZB_BACKLOG_MAX_MS ? ZB_BACKLOG_MAX_MS : b;
            s->bl_due = now + (uint64_t)s->bl_backoff_ms * 1000000u;
            return;
        }
        s->bl_head = d->next;
        if (s->bl_head == NULL)
            s->bl_tail = NULL;
        d->next = NULL;
        progress = true;
        if (rv == BUS_ECLOSED)
            zb_dlv_done(z, d);
    }
    s->bl_backoff_ms = 0;
}

static uint64_t
zb_min_due(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}

uint64_t
zb_rel_timers(zb *z, uint64_t now)
{
    uint64_t next = 0, resend = (uint64_t)z->o.resend_ivl_ms * 1000000u;
    uint64_t ptimeout = (uint64_t)z->o.peer_timeout_ms * 1000000u;
    zb_dlv *d, **pp;
    zb_peer *p, *pn;
    size_t i, n;

    /* Sender: flights unacked for resend_ivl go again, oldest first. */
    if (z->sent.head != NULL && z->sent.head->sent_ns + resend <= now) {
        zb_flist exp = {0};
        zb_flight *f;
        while ((f = z->sent.head) != NULL && f->sent_ns + resend <= now) {
            zb_fl_remove(&z->sent, f);
            zb_fl_append(&exp, f, ZB_FL_UNSENT);
        }
        zb_logf(z, BUS_LOG_DEBUG,
                "resending %zu event(s) unacked after "
                "%d ms",
                exp.n, z->o.resend_ivl_ms);
        zb_fl_prepend(&z->unsent, &exp, ZB_FL_UNSENT);
    }
    if (z->sent.head != NULL)
        next = z->sent.head->sent_ns + resend;

    /* Peer: keep the hub aware of us while we subscribe. */
    if (!z->o.bind && z->my_prefixes.n > 0) {
        if (now >= z->next_ping_ns) {
            zb_dealer_ctrl(z, ZB_C_PING, "", 0);
            z->next_ping_ns = now + ptimeout / 4;
        }
        next = zb_min_due(next, z->next_ping_ns);
    }

    /* Hub: deliveries to peers unacked for resend_ivl go again. */
    while ((d = z->rout_head) != NULL && d->sent_ns + resend <= now) {
        if (zb_peer_offer(z, d, now, true) != BUS_OK) {
            d->sent_ns = now; /* HWM or gone: try later (or expire) */
            zb_rout_unlink(z, d);
            zb_rout_append(z, d);
            break;
        }
    }
    if (z->rout_head != NULL)
        next = zb_min_due(next, z->rout_head->sent_ns + resend);

    /* Hub: peers gone or silent. */
    for (p = z->peers; p != NULL; p = pn) {
        pn = p->next;
        if (p->gone || now - p->last_ns > ptimeout)
            zb_peer_expire(z, p);
        else
            next = zb_min_due(next, p->last_ns + ptimeout + 1);
    }

    /* Receiver: retries that are due join their backlog. */
    for (pp = &z->retry_head; (d = *pp) != NULL;) {
        if (d->due_ns > now) {
            next = zb_min_due(next, d->due_ns);
            pp = &d->next;
            continue;
        }
        *pp = d->next;
        if (d->sub->bl_head == NULL)
            d->sub->bl_due = now;
        zb_backlog_push(d->sub, d);
    }
    z->retry_tail = NULL;
    for (d = z->retry_head; d != NULL; d = d->next)
        z->retry_tail = d;

    /* Backlogs. */
    n = z->nsubs;
    zb_deliver_begin(z);
    for (i = 0; i < n && i < z->nsubs; i++) {
        zb_sub *s = z->subs[i];
        if (s->dead || s->bl_head == NULL)
            continue;
        if (s->bl_due <= now)
            zb_backlog_run(z, s, now);
        if (s->bl_head != NULL && !s->dead)
            next = zb_min_due(next, s->bl_due);
    }
    zb_deliver_end(z);
    return next;
}

void
zb_rel_sub_dead(zb *z, zb_sub *s)
{
    zb_dlv *d, **pp;

    for (pp = &z->retry_head; (d = *pp) != NULL;) {
        if (d->sub == s)
            *pp = d->next;
        else
            pp = &d->next;
    }
    z->retry_tail = NULL;
    for (d = z->retry_head; d != NULL; d = d->next)
        z->retry_tail = d;
    s->bl_head = s->bl_tail = NULL;
    if (s->peer != NULL) { /* out of its peer's list */
        zb_sub **sp;
        for (sp = &s->peer->subs; *sp != NULL; sp = &(*sp)->pnext)
            if (*sp == s) {
                *sp = s->pnext;
                break;
            }
    }
    while ((d = s->dlvs) != NULL) {
        zb_rec *r = d->rec;
        zb_dlv_unlink(&s->dlvs, d);
        if (s->peer != NULL) {
            /* A peer's ack is looked up in its window, which goes away
             * with it: nothing can reach d afterwards. */
            zb_peer_release(z, d);
            zb_dlv_put(z, d);
        } else if (d->state == ZB_D_OUT) {
            /* The bus may still ack it: keep it until then (or fini). */
            d->state = ZB_D_ORPHAN;
            d->rec = NULL;
            zb_dlv_link(&z->orphans, d);
        } else {
            zb_dlv_put(z, d);
        }
        if (r != NULL && --r->remaining == 0)
            zb_rec_complete(z, r);
    }
}
