/*
 * Fanout mode: XPUB/XSUB, at most once (contract: <bus/broker_zmq.h>).
 *
 * Design:
 * - The hub (bind side) sends everything through its XPUB: its own
 *   publishes and what its peers publish upstream. The XPUB has
 *   ZMQ_XPUB_NODROP, so a send that would pass a subscriber's high-water
 *   mark fails with EAGAIN instead of being dropped silently; with
 *   ZMQ_XPUB_VERBOSER every subscribe and unsubscribe (including those
 *   libzmq generates when a subscriber goes away) reaches us, so
 *   their_prefixes mirrors what the XPUB filters on. Each event then
 *   meets one of these fates, each counted: no prefix matches its topic
 *   (dropped_late: nobody listening, e.g. a late joiner), the send fails
 *   at the HWM for longer than hwm_wait (dropped_hwm: it went to no
 *   subscriber, NODROP being all-or-none), or it is sent. While a send
 *   waits at the HWM, later ones wait behind it (order), the publish
 *   queue fills and publishers meet their backpressure policy.
 * - A peer (connect side) publishes upstream through its XSUB, which
 *   libzmq passes to the hub's XPUB as data: [topic][envelope][seq]. An
 *   XSUB drops silently when its pipe is full, so the third frame carries
 *   a publisher id and a sequence number, and the hub counts the gaps
 *   (dropped_upstream). Publishes while the peer is not connected are
 *   counted by the peer (dropped_late). The hub checks each upstream
 *   message (topic, envelope) before forwarding it.
 * - No frame but the first may start with 0x00 or 0x01 (libzmq 4.3 reads
 *   such a frame of an upstream multipart message as a subscription):
 *   envelopes start with a map header, the seq frame with 'S'.
 * - Subscription sync: when the hub's XPUB gets a subscription for
 *   prefix P it sends [P][0xC1 "bus-sync"], which reaches the new
 *   subscriber; its subscribe call returns then (or after
 *   subscribe_timeout), so events published after subscribe returns are
 *   not lost to the slow-joiner race.
 * - Subscribing: each subscription's literal prefix (its pattern up to
 *   the first wildcard segment) is subscribed on the XSUB, refcounted so
 *   that two subscriptions sharing a prefix subscribe it once; the full
 *   pattern is applied on receipt (bus__topic_match).
 * - Receiving (I/O thread): [topic][envelope], anything else is a bad
 *   frame. Deliveries pass flags 0: a subscription's backpressure policy
 *   may block this thread, which then stops reading, so the loss moves to
 *   the publisher's HWM where it is counted; a refusal is counted as
 *   dropped_queue.
 */
#include <errno.h>
#include <string.h>

#include "topic.h"
#include "zmq_impl.h"

/* ---- Prefix multisets --------------------------------------------------- */

void
zb_prefixes_free(zb_prefixes *ps)
{
    size_t i;

    for (i = 0; i < ps->cap; i++)
        if (ps->v[i].p != NULL)
            bus__free(ps->v[i].p, ps->v[i].len + 1);
    bus__free(ps->v, ps->cap * sizeof(*ps->v));
    bus__free(ps->lens, (BUS_TOPIC_MAX_LEN + 1) * sizeof(*ps->lens));
    memset(ps, 0, sizeof(*ps));
}

/* The slot holding p (*found) or the empty one where it would go. The
 * table is never full (load <= 3/4). */
static size_t
zb_pslot(const zb_prefixes *ps, const char *p, size_t len, bool *found)
{
    size_t i = (size_t)bus__hash(p, len) & (ps->cap - 1);

    for (;; i = (i + 1) & (ps->cap - 1)) {
        const zb_prefix *e = &ps->v[i];
        if (e->p == NULL) {
            *found = false;
            return i;
        }
        if (e->len == len && memcmp(e->p, p, len) == 0) {
            *found = true;
            return i;
        }
    }
}

static int
zb_prefixes_grow(zb_prefixes *ps)
{
    size_t ncap = ps->cap == 0 ? 16 : ps->cap * 2, i;
    zb_prefix *old = ps->v, *nv;
    size_t ocap = ps->cap;

    if ((nv = bus__zalloc(ncap * sizeof(*nv))) == NULL)
        return BUS_ENOMEM;
    ps->v = nv;
    ps->cap = ncap;
    for (i = 0; i < ocap; i++) {
        bool found;
        if (old[i].p != NULL)
            nv[zb_pslot(ps, old[i].p, old[i].len, &found)] = old[i];
    }
    bus__free(old, ocap * sizeof(*old));
    return BUS_OK;
}

int
zb_prefix_inc(zb_prefixes *ps, const char *p, size_t len, bool *first)
{
    zb_prefix *e;
    bool found;
    size_t i;

    *first = false;
    if (len > BUS_TOPIC_MAX_LEN)
        return BUS_EINVAL; /* could never match a topic */
    if (ps->lens == NULL && (ps->lens = bus__zalloc((BUS_TOPIC_MAX_LEN + 1) *
                                                    sizeof(*ps->lens))) == NULL)
        return BUS_ENOMEM;
    if ((ps->n + 1) * 4 > ps->cap * 3 && zb_prefixes_grow(ps) != BUS_OK)
        return BUS_ENOMEM;
    i = zb_pslot(ps, p, len, &found);
    e = &ps->v[i];
    if (found) {
        e->count++;
        return BUS_OK;
    }
    if ((e->p = bus__alloc(len + 1)) == NULL)
        return BUS_ENOMEM;
    memcpy(e->p, p, len);
    e->p[len] = '\0';
    e->len = len;
    e->count = 1;
    ps->n++;
    ps->lens[len]++;
    *first = true;
    return BUS_OK;
}

bool
zb_prefix_dec(zb_prefixes *ps, const char *p, size_t len, bool *found)
{
    size_t i, j, k, mask;

    *found = false;
    if (ps->cap == 0 || len > BUS_TOPIC_MAX_LEN)
        return false;
    i = zb_pslot(ps, p, len, found);
    if (!*found || --ps->v[i].count > 0)
        return false;
    bus__free(ps->v[i].p, len + 1);
    ps->lens[len]--;
    ps->n--;
    /* Backward-shift deletion (linear probing): no tombstones. */
    mask = ps->cap - 1;
    for (j = i;;) {
        j = (j + 1) & mask;
        if (ps->v[j].p == NULL)
            break;
        k = (size_t)bus__hash(ps->v[j].p, ps->v[j].len) & mask;
        if ((i <= j) ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        ps->v[i] = ps->v[j];
        i = j;
    }
    memset(&ps->v[i], 0, sizeof(ps->v[i]));
    return true;
}

bool
zb_prefixes_match(const zb_prefixes *ps, const char *topic, size_t len)
{
    size_t l;

    if (ps->n == 0)
        return false;
    for (l = 0; l <= len && l <= BUS_TOPIC_MAX_LEN; l++) {
        bool found;
        if (ps->lens[l] != 0 && (zb_pslot(ps, topic, l, &found), found))
            return true;
    }
    return false;
}

char *
zb_pattern_prefix(const char *pattern, size_t *len)
{
    const char *seg = pattern, *end;
    char *out;

    for (;;) {
        end = strchr(seg, '.');
        if (end == NULL)
            end = seg + strlen(seg);
        if ((end - seg == 1) && (seg[0] == '*' || seg[0] == '>'))
            break; /* the prefix ends before this segment */
        if (*end == '\0') {
            seg = end; /* no wildcard: the whole pattern */
            break;
        }
        seg = end + 1;
    }
    *len = (size_t)(seg - pattern);
    if ((out = bus__alloc(*len + 1)) == NULL)
        return NULL;
    memcpy(out, pattern, *len);
    out[*len] = '\0';
    return out;
}

/* ---- Our subscriptions (XSUB) ------------------------------------------ */

static void
zb_xsub_send(zb *z, uint8_t op, const char *prefix, size_t len)
{
    uint8_t buf[BUS_TOPIC_MAX_LEN + 1];

    buf[0] = op;
    memcpy(buf + 1, prefix, len);
    /* XSUB sends subscriptions to every publisher and replays them on
     * reconnect; it never blocks. */
    if (zmq_send(z->recv_sock, buf, len + 1, ZMQ_DONTWAIT) < 0)
        (void)zb_zerr(z, op ? "subscribe" : "unsubscribe");
}

int
zb_fan_sub_add(zb *z, zb_sub *s, bool *sent)
{
    size_t len = strlen(s->prefix);
    bool first;
    int rv;

    *sent = false;
    if (z->recv_sock == NULL)
        return BUS_OK;
    if ((rv = zb_prefix_inc(&z->my_prefixes, s->prefix, len, &first)) != BUS_OK)
        return rv;
    if (first) {
        zb_xsub_send(z, 1, s->prefix, len);
        *sent = true;
    }
    return BUS_OK;
}

void
zb_fan_sub_del(zb *z, zb_sub *s)
{
    size_t len = strlen(s->prefix);
    bool found;

    if (z->recv_sock == NULL || !s->added)
        return;
    if (zb_prefix_dec(&z->my_prefixes, s->prefix, len, &found))
        zb_xsub_send(z, 0, s->prefix, len);
}

/* ---- The hub: their subscriptions, sending, forwarding --------------- */

enum { ZB_OUT_SENT, ZB_OUT_LATE, ZB_OUT_HWM, ZB_OUT_BLOCKED };

/* Sends [topic][*env] through the XPUB (env is consumed when sent).
 * @io, hub */
static int
zb_fan_out(zb *z, const char *topic, size_t len, zmq_msg_t *env, uint64_t now)
{
    uint64_t n;
    int e;

    if (!zb_prefixes_match(&z->their_prefixes, topic, len)) {
        zb_count(&z->st.dropped_late, 1);
        return ZB_OUT_LATE;
    }
    if (zmq_send(z->send_sock, topic, len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        e = zmq_errno();
        if (e == EAGAIN) {
            if (z->hwm_since_ns == 0) {
                z->hwm_since_ns = now;
                zb_count(&z->st.hwm_waits, 1);
            }
            if (now - z->hwm_since_ns < (uint64_t)z->o.hwm_wait_ms * 1000000u) {
                z->hwm_blocked = true;
                return ZB_OUT_BLOCKED;
            }
        }
        z->hwm_blocked = false;
        n = atomic_fetch_add_explicit(&z->st.dropped_hwm, 1,
                                      memory_order_relaxed) +
            1;
        if (e == EAGAIN)
            zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN,
                        "a subscriber is at its high-water mark (%d) for "
                        "over %d ms: event on '%.*s' dropped, %llu so far",
                        z->o.hwm, z->o.hwm_wait_ms, (int)len, topic,
                        (unsigned long long)n);
        else
            zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN,
                        "send on '%.*s' failed: %s: dropped, %llu so far",
                        (int)len, topic, zmq_strerror(e),
                        (unsigned long long)n);
        return ZB_OUT_HWM;
    }
    z->hwm_since_ns = 0;
    z->hwm_blocked = false;
    /* The first part went, so the rest goes: libzmq sends multipart
     * messages whole. */
    ZB_TSAN_RELEASE(env);
    if (zmq_msg_send(env, z->send_sock, ZMQ_DONTWAIT) < 0)
        zb_logf(z, BUS_LOG_ERR, "send envelope: %s", zmq_strerror(zmq_errno()));
    zb_count(&z->st.sent, 1);
    return ZB_OUT_SENT;
}

static void
zb_put_u64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8); /* both ends are us: native order */
}

static uint64_t
zb_get_u64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return v;
}

/* A peer's publish: upstream through the XSUB. */
static void
zb_fan_send_upstream(zb *z, zb_pub *p)
{
    uint8_t seq[ZB_SEQ_LEN];

    if (!atomic_load_explicit(&z->connected, memory_order_relaxed)) {
        /* The XSUB would drop it silently: count it here. */
        zb_count(&z->st.dropped_late, 1);
        zb_pub_finish(p, BUS_OK);
        return;
    }
    seq[0] = 'S';
    zb_put_u64(seq + 1, z->pubid);
    zb_put_u64(seq + 9, ++z->pubseq);
    ZB_TSAN_RELEASE(&p->env);
    if (zmq_send(z->recv_sock, zb_pub_topic(p), p->topic_len,
                 ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_msg_send(&p->env, z->recv_sock, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(z->recv_sock, seq, sizeof(seq), ZMQ_DONTWAIT) < 0)
        zb_logf(z, BUS_LOG_ERR, "send upstream: %s", zmq_strerror(zmq_errno()));
    zb_count(&z->st.sent, 1);
    zb_pub_finish(p, BUS_OK);
}

bool
zb_fan_send(zb *z, zb_pub *p, uint64_t now)
{
    int r;

    if (z->send_sock == NULL) {
        zb_fan_send_upstream(z, p);
        return true;
    }
    r = zb_fan_out(z, zb_pub_topic(p), p->topic_len, &p->env, now);
    if (r == ZB_OUT_BLOCKED)
        return false;
    zb_pub_finish(p, r == ZB_OUT_HWM ? BUS_EAGAIN : BUS_OK);
    return true;
}

bool
zb_fan_fwd_retry(zb *z, uint64_t now)
{
    char topic[BUS_TOPIC_MAX_LEN + 1];
    size_t len;

    if (!z->fwd_pending)
        return true;
    len = zmq_msg_size(&z->fwd_topic);
    memcpy(topic, zmq_msg_data(&z->fwd_topic), len);
    if (zb_fan_out(z, topic, len, &z->fwd_env, now) == ZB_OUT_BLOCKED)
        return false;
    zmq_msg_close(&z->fwd_topic);
    zmq_msg_close(&z->fwd_env);
    z->fwd_pending = false;
    return true;
}

void
zb_fan_fini(zb *z)
{
    if (z->fwd_pending) {
        zmq_msg_close(&z->fwd_topic);
        zmq_msg_close(&z->fwd_env);
        z->fwd_pending = false;
        zb_count(&z->st.dropped_hwm, 1);
    }
}

/* Counts what an upstream publisher's sequence says was lost. */
static void
zb_upstream_seq(zb *z, uint64_t id, uint64_t seq, uint64_t now)
{
    zb_upub *e = NULL, *oldest = NULL;
    size_t i;

    for (i = 0; i < z->nupubs; i++) {
        if (z->upubs[i].id == id) {
            e = &z->upubs[i];
            break;
        }
        if (oldest == NULL || z->upubs[i].last_ns < oldest->last_ns)
            oldest = &z->upubs[i];
    }
    if (e == NULL) {
        e = z->nupubs < ZB_UPSTREAM_PUBS ? &z->upubs[z->nupubs++] : oldest;
        e->id = id;
        e->next = 1;
    }
    if (seq > e->next) {
        uint64_t lost = seq - e->next;
        zb_count(&z->st.dropped_upstream, lost);
        zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN,
                    "%llu event(s) from a peer lost upstream (its XSUB "
                    "pipe was full)",
                    (unsigned long long)lost);
    }
    if (seq >= e->next)
        e->next = seq + 1;
    e->last_ns = now;
}

/* One upstream message [topic][envelope][seq], m[0] read already: checks
 * and forwards it. */
static void
zb_fan_upstream(zb *z, zmq_msg_t *t, uint64_t now)
{
    char topic[BUS_TOPIC_MAX_LEN + 1], why[200];
    zmq_msg_t e, q;
    const uint8_t *qd;
    size_t tlen = zmq_msg_size(t);
    bus_event *ev;
    int rv;

    zmq_msg_init(&e);
    zmq_msg_init(&q);
    if (zmq_msg_recv(&e, z->send_sock, 0) < 0 || !zmq_msg_more(&e) ||
        zmq_msg_recv(&q, z->send_sock, 0) < 0 || zmq_msg_more(&q)) {
        zb_drain_parts(z->send_sock);
        zb_bad_frame(z, "upstream: want [topic][envelope][seq]");
        goto out;
    }
    qd = zmq_msg_data(&q);
    if (zmq_msg_size(&q) != ZB_SEQ_LEN || qd[0] != 'S') {
        zb_bad_frame(z, "upstream: bad seq frame");
        goto out;
    }
    memcpy(topic, zmq_msg_data(t), tlen < sizeof(topic) ? tlen : 0);
    topic[tlen < sizeof(topic) ? tlen : 0] = '\0';
    if (tlen == 0 || tlen > BUS_TOPIC_MAX_LEN ||
        memchr(topic, '\0', tlen) != NULL ||
        bus__topic_check(topic, false, NULL, 0) != BUS_OK) {
        zb_bad_frame(z, "upstream: bad topic frame");
        goto out;
    }
    /* Check the envelope before it goes to every subscriber. */
    ZB_TSAN_ACQUIRE(&e);
    rv = bus_codec_decode(&ev, zmq_msg_data(&e), zmq_msg_size(&e), &z->limits,
                          why, sizeof(why));
    if (rv != BUS_OK) {
        char line[300];
        if (rv == BUS_ENOMEM)
            goto out;
        snprintf(line, sizeof(line), "upstream: %s (%s)", why,
                 bus_err_name(rv));
        zb_bad_frame(z, line);
        goto out;
    }
    bus_event_unref(ev);
    zb_upstream_seq(z, zb_get_u64(qd + 1), zb_get_u64(qd + 9), now);
    zb_count(&z->st.forwarded, 1);
    if (zb_fan_out(z, topic, tlen, &e, now) == ZB_OUT_BLOCKED) {
        zmq_msg_init(&z->fwd_topic);
        zmq_msg_init(&z->fwd_env);
        zmq_msg_move(&z->fwd_topic, t);
        zmq_msg_move(&z->fwd_env, &e);
        z->fwd_pending = true;
    }
out:
    zmq_msg_close(&e);
    zmq_msg_close(&q);
}

static void
zb_fan_send_sync(zb *z, const uint8_t *prefix, size_t len)
{
    /* Best effort: at the HWM the subscriber's subscribe times out. */
    if (zmq_send(z->send_sock, prefix, len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        (void)zmq_send(z->send_sock, ZB_SYNC, ZB_SYNC_LEN, ZMQ_DONTWAIT);
}

void
zb_fan_xpub_input(zb *z, uint64_t now)
{
    bool changed = false;
    zmq_msg_t m;
    int i;

    for (i = 0; i < ZB_RECV_BATCH && !z->fwd_pending; i++) {
        const uint8_t *d;
        size_t n;

        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->send_sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            break;
        }
        d = zmq_msg_data(&m);
        n = zmq_msg_size(&m);
        if (zmq_msg_more(&m)) {
            zb_fan_upstream(z, &m, now);
            zmq_msg_close(&m);
            continue;
        }
        if (n < 1 || (d[0] != 0 && d[0] != 1)) {
            zmq_msg_close(&m);
            zb_bad_frame(z, "a peer sent a one-frame message that is not "
                            "a subscription");
            continue;
        }
        if (d[0] == 1) {
            bool first;
            int rv = zb_prefix_inc(&z->their_prefixes, (const char *)d + 1,
                                   n - 1, &first);
            if (rv == BUS_OK) {
                zb_count(&z->st.subscribers, 1);
                changed = true;
            } else if (rv == BUS_ENOMEM) {
                zb_logf(z, BUS_LOG_ERR,
                        "out of memory tracking a subscription: its "
                        "events will count as dropped_late");
            } /* else longer than any topic: it can never match */
            zb_fan_send_sync(z, d + 1, n - 1);
        } else {
            bool found;
            (void)zb_prefix_dec(&z->their_prefixes, (const char *)d + 1, n - 1,
                                &found);
            if (found) {
                /* relaxed: a statistic (waiters re-read under mtx). */
                atomic_fetch_sub_explicit(&z->st.subscribers, 1,
                                          memory_order_relaxed);
                changed = true;
            }
        }
        zmq_msg_close(&m);
    }
    if (changed)
        zb_notify(z);
}

bool
zb_fan_holding(zb *z, uint64_t now)
{
    if (z->hold_until_ns == 0)
        return false;
    if (z->their_prefixes.n > 0 || now >= z->hold_until_ns) {
        if (z->their_prefixes.n == 0)
            zb_logf(z, BUS_LOG_INFO,
                    "wait_subscriber: no subscription after %d ms; "
                    "publishing",
                    z->o.wait_subscriber_ms);
        z->hold_until_ns = 0;
        return false;
    }
    return true;
}

/* ---- Receiving
 * ------------------------------------------------------------------ */

void
zb_deliver_plain(zb *z, const char *topic, bus_event *ev)
{
    size_t i, n = z->nsubs, matched = 0;

    zb_deliver_begin(z);
    for (i = 0; i < n && i < z->nsubs; i++) {
        zb_sub *s = z->subs[i];
        int rv;

        if (s->dead || s->peer != NULL || !bus__topic_match(s->pattern, topic))
            continue;
        matched++;
        rv = s->fn(s->opaque, topic, bus_event_ref(ev), 0, 0);
        if (rv == BUS_OK) {
            zb_count(&z->st.delivered, 1);
        } else {
            uint64_t k;
            bus_event_unref(ev);
            k = atomic_fetch_add_explicit(&z->st.dropped_queue, 1,
                                          memory_order_relaxed) +
                1;
            zb_ratelogf(z, &z->rl_drop, BUS_LOG_WARN,
                        "subscription '%s' refused an event on '%s' "
                        "(%s): dropped, %llu so far",
                        s->pattern, topic, bus_err_name(rv),
                        (unsigned long long)k);
        }
    }
    zb_deliver_end(z);
    if (matched == 0)
        zb_count(&z->st.unrouted, 1);
    bus_event_unref(ev);
}

void
zb_fan_recv(zb *z)
{
    char topic[BUS_TOPIC_MAX_LEN + 1];
    zmq_msg_t t, e;
    bus_event *ev;
    int i;

    for (i = 0; i < ZB_RECV_BATCH; i++) {
        zmq_msg_init(&t);
        if (zmq_msg_recv(&t, z->recv_sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&t);
            if (zmq_errno() != EAGAIN)
                (void)zb_zerr(z, "receive");
            return;
        }
        if (!zmq_msg_more(&t)) {
            zb_bad_msg(z, "1 frame, want [topic][envelope]", zmq_msg_data(&t),
                       zmq_msg_size(&t));
            zmq_msg_close(&t);
            continue;
        }
        zmq_msg_init(&e);
        if (zmq_msg_recv(&e, z->recv_sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&e);
            zmq_msg_close(&t);
            zb_bad_frame(z, "truncated multipart message");
            continue;
        }
        if (zmq_msg_more(&e)) {
            zb_drain_parts(z->recv_sock);
            zb_bad_msg(z, "more than 2 frames, want [topic][envelope]",
                       zmq_msg_data(&e), zmq_msg_size(&e));
            zmq_msg_close(&e);
            zmq_msg_close(&t);
            continue;
        }
        if (zmq_msg_size(&e) > 0 &&
            *(const uint8_t *)zmq_msg_data(&e) == ZB_CTRL_BYTE) {
            /* A control message; the only one so far is the sync. */
            if (zmq_msg_size(&e) == ZB_SYNC_LEN &&
                memcmp(zmq_msg_data(&e), ZB_SYNC, ZB_SYNC_LEN) == 0)
                zb_sync_done(z, zmq_msg_data(&t), zmq_msg_size(&t));
            zmq_msg_close(&e);
            zmq_msg_close(&t);
            continue;
        }
        if (zb_decode(z, &t, &e, topic, &ev) == BUS_OK)
            zb_deliver_plain(z, topic, ev);
        zmq_msg_close(&t);
    }
}
