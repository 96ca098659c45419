/*
 * The ZeroMQ broker: zmq+tcp://, zmq+ipc://, zmq+inproc:// (contract:
 * <bus/broker_zmq.h>; long form: docs/brokers/zmq.md). This file has the
 * ops, the options, publish, the I/O thread and the subscriptions; the
 * modes live in zmq_fanout.c and zmq_reliable.c, CURVE in zmq_curve.c.
 *
 * Design:
 * - ZeroMQ sockets are not thread-safe, so each broker has one I/O thread
 *   that owns its sockets (created in init on the opening thread, handed
 *   over by the thread start, closed in fini after the join). Everything
 *   else talks to it through memory:
 *   - publishers encode the event in their own thread into a zmq_msg and
 *     put it in a bounded MPSC queue (Vyukov: a sequence per slot, one CAS
 *     to claim, filled in place) after taking a credit. Credits bound the
 *     queue (fanout: given back when the I/O thread takes the slot) or the
 *     in-flight window (reliable: given back when the receiver acks), so
 *     a claimed slot is always free and a full window is a publish-side
 *     backpressure decision (block up to a deadline, or BUS_EAGAIN);
 *   - subscribe and unsubscribe from other threads are commands the I/O
 *     thread runs between deliveries (so unsubscribe returns once no call
 *     of fn is running); from inside a delivery they run inline;
 *   - acks of reliable deliveries (the ack op, any thread) are pushed on a
 *     lock-free stack (zmq_reliable.c).
 * - Waking the I/O thread: it polls a pipe with its sockets. Before
 *   sleeping it sets `sleeping` and re-checks for work; a producer writes
 *   the pipe only when it sees `sleeping` (seq_cst fences on both sides
 *   make one of them see the other), and only once per sleep
 *   (`wake_pending`), so a busy stream of publishes costs no syscall.
 * - One process-wide ZeroMQ context is shared by the brokers (inproc
 *   endpoints need it), refcounted, terminated by the last fini. A CURVE
 *   server gets a private context, because the ZAP handler endpoint is
 *   one per context and its I/O thread serves it.
 * - Receiving (both modes): the topic frame is validated, the envelope
 *   decoded with bus_codec_decode (copying: cheaper than a second
 *   allocation for small frames) or, above ZB_ADOPT_MIN bytes,
 *   bus_codec_decode_adopt with the zmq_msg kept alive until the event
 *   dies (zero copy). Malformed input is counted, logged at most once a
 *   second, and dropped or dead-lettered; the socket keeps working.
 *
 * Lock order: z->mtx, then nothing (zb_ctx_mtx is never held with it).
 * No lock is held while calling a deliver function or an ack callback.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "event_impl.h"
#include "testing.h"
#include "topic.h"
#include "zmq_impl.h"

#define ZB_ADOPT_MIN 4096 /* envelopes above this are decoded zero-copy */
#define ZB_MAX_POLL_MS 500
#define ZB_DRAIN_BATCH 256

/* Defaults (bus/broker_zmq.h documents them). */
#define ZB_DEF_HWM 10000
#define ZB_DEF_QUEUE 8192
#define ZB_DEF_WINDOW 4096
#define ZB_DEF_BLOCK_MS 1000
#define ZB_DEF_RESEND_MS 1000
#define ZB_DEF_DEDUP 65536
#define ZB_DEF_RECONNECT_MS 100
#define ZB_DEF_RECONNECT_MAX_MS 5000
#define ZB_DEF_HB_IVL 1000
#define ZB_DEF_HB_TIMEOUT 3000
#define ZB_DEF_HB_TTL 3000
#define ZB_DEF_HANDSHAKE_MS 5000
#define ZB_DEF_MAX_MSG ((int64_t)16 << 20)
#define ZB_DEF_LINGER 200
#define ZB_DEF_SPIN_US 0
#define ZB_DEF_BATCH 8192
#define ZB_DEF_HWM_WAIT_MS 1000
#define ZB_DEF_SUB_TIMEOUT_MS 2000
#define ZB_DEF_PEER_TIMEOUT_MS 10000
#define ZB_PENDING_PER_WINDOW 4 /* receiver records per window of a sender */

const char zb_done_marker = 0;

/* The I/O thread of the broker running on this thread, if any. */
static _Thread_local zb *zb_io_self;

static bool
zb_on_io(const zb *z)
{
    return zb_io_self == z;
}

/* ---- Logging and errors ------------------------------------------------ */

void
zb_logf(zb *z, bus_log_level level, const char *fmt, ...)
{
    char msg[768];
    va_list ap;

    if (!bus_log_enabled(&z->log, level))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    bus_logf(&z->log, level, ZB_SUBSYS, "%s: %s", z->name, msg);
}

void
zb_ratelogf(zb *z, zb_ratelog *rl, bus_log_level level, const char *fmt, ...)
{
    uint64_t now = bus__clock_mono_ns();
    char msg[640];
    va_list ap;

    if (rl->last_ns != 0 && now - rl->last_ns < 1000000000u) {
        rl->suppressed++;
        return;
    }
    if (!bus_log_enabled(&z->log, level))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (rl->suppressed > 0)
        zb_logf(z, level, "%s (and %llu more like it in the last second)", msg,
                (unsigned long long)rl->suppressed);
    else
        zb_logf(z, level, "%s", msg);
    rl->last_ns = now;
    rl->suppressed = 0;
}

int
zb_map_errno(int e)
{
    switch (e) {
    case ENOMEM:
        return BUS_ENOMEM;
    case EAGAIN:
        return BUS_EAGAIN;
    case EINVAL:
    case EPROTONOSUPPORT:
    case ENOCOMPATPROTO:
        return BUS_EINVAL;
    case ETERM:
    case ENOTSOCK:
        return BUS_ECLOSED;
    case EMSGSIZE:
        return BUS_ETOOBIG;
    case EADDRINUSE:
    case EADDRNOTAVAIL:
    case ENODEV:
    case EHOSTUNREACH:
    case EMTHREAD:
        return BUS_EUNAVAIL;
    case EACCES:
        return BUS_EACCESS;
    default:
        return BUS_EUNAVAIL;
    }
}

int
zb_zerr(zb *z, const char *what)
{
    int e = zmq_errno();
    int rv = zb_map_errno(e);

    zb_logf(z, BUS_LOG_WARN, "%s: %s (errno %d) -> %s", what, zmq_strerror(e),
            e, bus_err_name(rv));
    return rv;
}

static void zb_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
zb_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errbuf_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errbuf_len, fmt, ap);
    va_end(ap);
}

/* ---- The shared ZeroMQ context ---------------------------------------- */

static bus__mutex zb_ctx_mtx;
static void *zb_ctx_shared;  /* @locks zb_ctx_mtx */
static uint32_t zb_ctx_refs; /* @locks zb_ctx_mtx */
/* The mutex has no static initialiser: the first open initialises it
 * under a spin flag; zb_ctx_ready is stored release once it is ready and
 * loaded acquire (as brokers/memory does). */
static atomic_bool zb_ctx_ready;
static atomic_flag zb_ctx_init_lock = ATOMIC_FLAG_INIT;

static void
zb_ctx_global_init(void)
{
    if (atomic_load_explicit(&zb_ctx_ready, memory_order_acquire))
        return;
    while (atomic_flag_test_and_set_explicit(&zb_ctx_init_lock,
                                             memory_order_acquire))
        bus__thread_yield();
    if (!atomic_load_explicit(&zb_ctx_ready, memory_order_relaxed)) {
        bus__mutex_init(&zb_ctx_mtx);
        atomic_store_explicit(&zb_ctx_ready, true, memory_order_release);
    }
    atomic_flag_clear_explicit(&zb_ctx_init_lock, memory_order_release);
}

static void
zb_ctx_term(void *c)
{
    while (zmq_ctx_term(c) != 0 && zmq_errno() == EINTR)
        ;
}

static int
zb_ctx_acquire(zb *z)
{
    if (BUS_FAILPOINT("zmq.ctx") != 0) {
        zb_logf(z, BUS_LOG_WARN, "zmq_ctx_new: injected failure");
        return BUS_ENOMEM;
    }
    if (z->o.curve && z->o.bind) {
        if ((z->zctx = zmq_ctx_new()) == NULL)
            return zb_zerr(z, "zmq_ctx_new");
        z->private_ctx = true;
        return BUS_OK;
    }
    zb_ctx_global_init();
    bus__mutex_lock(&zb_ctx_mtx);
    if (zb_ctx_shared == NULL)
        zb_ctx_shared = zmq_ctx_new();
    if (zb_ctx_shared != NULL) {
        zb_ctx_refs++;
        z->zctx = zb_ctx_shared;
        z->shared_ref = true;
    }
    bus__mutex_unlock(&zb_ctx_mtx);
    if (z->zctx == NULL)
        return zb_zerr(z, "zmq_ctx_new");
    return BUS_OK;
}

static void
zb_ctx_release(zb *z)
{
    void *c = NULL;

    if (z->private_ctx) {
        zb_ctx_term(z->zctx);
    } else if (z->shared_ref) {
        bus__mutex_lock(&zb_ctx_mtx);
        if (--zb_ctx_refs == 0) {
            c = zb_ctx_shared;
            zb_ctx_shared = NULL;
        }
        bus__mutex_unlock(&zb_ctx_mtx);
        /* Outside the lock: termination waits for the sockets' linger. */
        if (c != NULL)
            zb_ctx_term(c);
    }
    z->zctx = NULL;
    z->private_ctx = z->shared_ref = false;
}

/* ---- Publish records ---------------------------------------------------- */

void
zb_pub_clear(zb_pub *p)
{
    zmq_msg_close(&p->env);
    zmq_msg_init(&p->env); /* the slot stays ready for zmq_msg_move */
    if (p->ev != NULL)
        bus_event_unref(p->ev);
    if (p->topic_heap != NULL)
        bus__free(p->topic_heap, (size_t)p->topic_len + 1);
    p->ev = NULL;
    p->ack = NULL;
    p->ack_opaque = NULL;
    p->topic_heap = NULL;
    p->topic_len = 0;
}

void
zb_pub_finish(zb_pub *p, int err)
{
    if (p->ack != NULL)
        p->ack(p->ack_opaque, p->ev, err);
    zb_pub_clear(p);
}

void
zb_pub_move(zb_pub *dst, zb_pub *src)
{
    zmq_msg_move(&dst->env, &src->env);
    dst->ev = src->ev;
    dst->ack = src->ack;
    dst->ack_opaque = src->ack_opaque;
    dst->topic_heap = src->topic_heap;
    dst->topic_len = src->topic_len;
    if (src->topic_heap == NULL)
        memcpy(dst->topic_buf, src->topic_buf, (size_t)src->topic_len + 1);
    src->ev = NULL;
    src->ack = NULL;
    src->ack_opaque = NULL;
    src->topic_heap = NULL;
    src->topic_len = 0;
}

/* ---- Waking and waiting -------------------------------------------------- */

void
zb_wake(zb *z)
{
    char one = 1;

    /* seq_cst fence: our write of the work (a commit, a command, an ack,
     * a flag) is ordered before this load, against the I/O thread's
     * store of `sleeping` and fence before its re-check (Dekker). */
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(&z->sleeping, memory_order_relaxed))
        return;
    if (atomic_exchange_explicit(&z->wake_pending, true, memory_order_acq_rel))
        return;
    if (write(z->wake_fd[1], &one, 1) < 0 && errno != EAGAIN)
        zb_logf(z, BUS_LOG_ERR, "wake pipe: %s", strerror(errno));
}

void
zb_notify(zb *z)
{
    /* seq_cst: pairs with the waiters' increment before they re-check
     * (see zb_credit_take). */
    if (atomic_load_explicit(&z->waiters, memory_order_seq_cst) == 0)
        return;
    bus__mutex_lock(&z->mtx);
    bus__cond_broadcast(&z->cond);
    bus__mutex_unlock(&z->mtx);
}

void
zb_release(zb *z, uint64_t credits, uint64_t completed)
{
    uint64_t left = 0, w;

    /* seq_cst: ordered before the load of waiters below. */
    if (credits > 0)
        left = atomic_fetch_sub_explicit(&z->credits, credits,
                                         memory_order_seq_cst) -
               credits;
    if (completed > 0)
        atomic_fetch_add_explicit(&z->completed, completed,
                                  memory_order_seq_cst);
    w = atomic_load_explicit(&z->waiters, memory_order_seq_cst);
    if (w == 0)
        return;
    /* Fanout: when only publishers waiting for a credit wait, wake them
     * once a quarter of the queue is free rather than at every drain
     * round: they refill it in one go instead of a wake-up (two futex
     * calls and a context switch) per few hundred events. The I/O thread
     * keeps draining meanwhile, and a drain to below the mark always
     * comes (an empty queue is below it; a queue stuck at the HWM drops
     * after hwm_wait). A waiter whose deadline passes takes a free
     * credit all the same (zb_credit_take), so no publish fails for
     * it. Not in reliable mode, where credits come back as acks do, at
     * the receiver's pace. */
    if (z->o.mode == ZB_FANOUT && (uint32_t)w == (uint32_t)(w >> 32) &&
        left > z->credit_max - z->credit_max / 4)
        return;
    zb_notify(z);
}

static bool
zb_credit_try(zb *z)
{
    uint64_t c = atomic_load_explicit(&z->credits, memory_order_seq_cst);

    while (c < z->credit_max)
        if (atomic_compare_exchange_weak_explicit(&z->credits, &c, c + 1,
                                                  memory_order_seq_cst,
                                                  memory_order_seq_cst))
            return true;
    return false;
}

static uint64_t
zb_deadline(int32_t ms)
{
    return ms < 0 ? 0 : bus__clock_mono_ns() + (uint64_t)ms * 1000000u;
}

/* Takes one publish credit, applying the backpressure policy. */
static int
zb_credit_take(zb *z, unsigned flags)
{
    uint64_t deadline;
    int rv;

    if (zb_credit_try(z))
        return BUS_OK;
    /* The I/O thread (an ack callback or a delivery publishing here)
     * cannot wait for itself to make room. */
    if ((flags & BUS_PUB_NONBLOCK) || z->o.bp_fail ||
        z->o.block_timeout_ms == 0 || zb_on_io(z))
        return BUS_EAGAIN;
    deadline = zb_deadline(z->o.block_timeout_ms);
    bus__mutex_lock(&z->mtx);
    /* seq_cst: this increment comes before our re-check of the credits,
     * and a releaser's decrement before its load of waiters: one of us
     * sees the other, so no wakeup is lost. */
    atomic_fetch_add_explicit(&z->waiters, ZB_CREDIT_WAITER,
                              memory_order_seq_cst);
    for (;;) {
        if (atomic_load_explicit(&z->closed, memory_order_acquire)) {
            rv = BUS_ECLOSED;
            break;
        }
        if (zb_credit_try(z)) {
            rv = BUS_OK;
            break;
        }
        if (deadline == 0) {
            bus__cond_wait(&z->cond, &z->mtx);
        } else if (!bus__cond_wait_until(&z->cond, &z->mtx, deadline)) {
            rv = zb_credit_try(z) ? BUS_OK : BUS_EAGAIN;
            break;
        }
    }
    atomic_fetch_sub_explicit(&z->waiters, ZB_CREDIT_WAITER,
                              memory_order_seq_cst);
    bus__mutex_unlock(&z->mtx);
    return rv;
}

/* ---- Publish
 * ----------------------------------------------------------------- */

static bool
zb_claim(zb *z, uint64_t *pos_out)
{
    uint64_t pos = atomic_load_explicit(&z->tail, memory_order_relaxed);

    for (;;) {
        zb_slot *s = &z->slots[pos & z->mask];
        /* acquire: the I/O thread finished with this slot's last lap. */
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        int64_t dif = (int64_t)(seq - pos);

        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&z->tail, &pos, pos + 1,
                                                      memory_order_relaxed,
                                                      memory_order_relaxed)) {
                *pos_out = pos;
                return true;
            }
        } else if (dif < 0) {
            return false;
        } else {
            pos = atomic_load_explicit(&z->tail, memory_order_relaxed);
        }
    }
}

static int
zb_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
           bus_ack_fn ack, void *ack_opaque)
{
    zb *z = priv;
    size_t tlen = strlen(topic), esize;
    char *theap = NULL;
    zmq_msg_t env;
    zb_slot *slot;
    uint64_t pos;
    int rv;

    if (!z->can_publish)
        return BUS_ENOTSUP;
    /* seq_cst: stop waits until no publish is inside (active == 0) after
     * close; either it sees our increment, or we see `closed`. */
    atomic_fetch_add_explicit(&z->active, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&z->closed, memory_order_seq_cst)) {
        rv = BUS_ECLOSED;
        goto out;
    }
    esize = bus_codec_encoded_size(ev);
    if (z->o.max_msg_size > 0 && (int64_t)esize > z->o.max_msg_size) {
        zb_logf(z, BUS_LOG_DEBUG,
                "publish on '%s': %zu-byte envelope over max_msg_size", topic,
                esize);
        rv = BUS_ETOOBIG;
        goto out;
    }
    if ((rv = zb_credit_take(z, flags)) != BUS_OK)
        goto out;
    if (tlen >= ZB_TOPIC_INLINE && (theap = bus__strdup(topic, NULL)) == NULL) {
        rv = BUS_ENOMEM;
        goto fail;
    }
    if (BUS_FAILPOINT("zmq.msg") != 0 || zmq_msg_init_size(&env, esize)) {
        zb_logf(z, BUS_LOG_WARN, "zmq_msg_init_size(%zu) failed", esize);
        rv = BUS_ENOMEM;
        goto fail;
    }
    if ((rv = bus_codec_encode(ev, zmq_msg_data(&env), esize, NULL)) !=
        BUS_OK) {
        zmq_msg_close(&env);
        goto fail;
    }
    /* A credit guarantees a free slot: credits never exceed the slots,
     * and the I/O thread frees a slot before it gives the credit back. */
    while (!zb_claim(z, &pos))
        bus__thread_yield();
    slot = &z->slots[pos & z->mask];
    zmq_msg_move(&slot->p.env, &env);
    slot->p.ev = ack != NULL ? ev : NULL;
    slot->p.ack = ack;
    slot->p.ack_opaque = ack_opaque;
    slot->p.topic_len = (uint32_t)tlen;
    slot->p.topic_heap = theap;
    if (theap == NULL)
        memcpy(slot->p.topic_buf, topic, tlen + 1);
    zb_count(&z->accepted, 1);
    /* release: the filled slot is visible before its sequence. */
    atomic_store_explicit(&slot->seq, pos + 1, memory_order_release);
    zb_wake(z);
    if (ack == NULL)
        bus_event_unref(ev); /* ours since we return BUS_OK */
    rv = BUS_OK;
    goto out;
fail:
    if (theap != NULL)
        bus__free(theap, tlen + 1);
    zb_release(z, 1, 0);
out:
    atomic_fetch_sub_explicit(&z->active, 1, memory_order_seq_cst);
    return rv;
}

/* Takes up to ZB_DRAIN_BATCH publishes from the queue. @io */
static size_t
zb_drain(zb *z, uint64_t now)
{
    size_t n = 0;

    if (z->o.mode == ZB_FANOUT &&
        (zb_fan_holding(z, now) || !zb_fan_fwd_retry(z, now)))
        return 0;
    while (n < ZB_DRAIN_BATCH) {
        zb_slot *s = &z->slots[z->head & z->mask];
        /* acquire: pairs with the producer's release of the sequence. */
        if (atomic_load_explicit(&s->seq, memory_order_acquire) != z->head + 1)
            break;
        if (z->o.mode == ZB_RELIABLE)
            zb_rel_take(z, &s->p);
        else if (!zb_fan_send(z, &s->p, now))
            break; /* at the HWM: this one goes first, later */
        /* release: we are done with the slot before a producer reuses
         * it. */
        atomic_store_explicit(&s->seq, z->head + z->mask + 1,
                              memory_order_release);
        z->head++;
        n++;
    }
    if (n > 0 && z->o.mode == ZB_FANOUT)
        zb_release(z, n, n);
    return n;
}

static bool
zb_queue_nonempty(zb *z)
{
    zb_slot *s = &z->slots[z->head & z->mask];

    return atomic_load_explicit(&s->seq, memory_order_acquire) == z->head + 1;
}

/* ---- Receiving helpers ----------------------------------------------------
 */

void
zb_bad_frame(zb *z, const char *why)
{
    uint64_t n =
        atomic_fetch_add_explicit(&z->st.bad_frames, 1, memory_order_relaxed) +
        1;

    zb_ratelogf(z, &z->rl_bad, BUS_LOG_WARN,
                "dropped a malformed message: %s (%llu so far)", why,
                (unsigned long long)n);
}

void
zb_drain_parts(void *sock)
{
    int more = 1;
    size_t len = sizeof(more);
    zmq_msg_t m;

    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more) {
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        zmq_msg_close(&m);
        len = sizeof(more);
    }
}

static void
zb_msg_free(void *data, void *hint)
{
    zmq_msg_t *m = hint;

    (void)data;
    zmq_msg_close(m);
    bus__free(m, sizeof(*m));
}

/* Turns a bad frame into a "bus.bad_frame" event (payload: the frame's
 * bytes) delivered to the subscriptions matching the dead_letter topic. */
static void
zb_dead_letter(zb *z, const char *topic, const void *data, size_t len, int err,
               const char *why)
{
    const char *dl = z->o.dead_letter;
    bus_event_init in;
    bus_header h[3];
    bus_event *ev;
    int rv;

    memset(&in, 0, sizeof(in));
    in.type = "bus.bad_frame";
    in.payload = data;
    in.payload_len = len;
    in.headers = h;
    h[0] = (bus_header){"bus-error", bus_err_name(err)};
    h[1] = (bus_header){"bus-reason", why};
    h[2] = (bus_header){"bus-topic", topic};
    in.n_headers = topic[0] != '\0' ? 3 : 2;
    rv = bus_event_create(&ev, &in);
    if (rv == BUS_EINVAL) { /* the reason quoted bytes that are not UTF-8 */
        in.n_headers = 1;
        rv = bus_event_create(&ev, &in);
    }
    if (rv != BUS_OK) {
        zb_logf(z, BUS_LOG_WARN, "dead letter: %s", bus_err_name(rv));
        return;
    }
    (void)bus__event_set_topic(ev, dl, strlen(dl));
    bus_event_freeze(ev);
    zb_deliver_plain(z, dl, ev);
}

void
zb_bad_msg(zb *z, const char *why, const void *data, size_t len)
{
    if (z->o.dead_letter != NULL)
        zb_dead_letter(z, "", data, len, BUS_EPROTO, why);
    zb_bad_frame(z, why);
}

/* Copies and checks a topic frame into topic (NUL-terminated). BUS_OK, or
 * BUS_EPROTO with why filled (topic then empty). */
static int
zb_topic_take(zb *z, const void *t, size_t tlen, char *topic, char *why,
              size_t why_len)
{
    char tw[128];

    topic[0] = '\0';
    if (tlen == 0 || tlen > BUS_TOPIC_MAX_LEN) {
        snprintf(why, why_len, "topic frame of %zu bytes", tlen);
        return BUS_EPROTO;
    }
    memcpy(topic, t, tlen);
    topic[tlen] = '\0';
    /* A stream usually repeats its topics: the last one that passed the
     * check needs no second one. */
    if (tlen == z->last_topic_len && memcmp(topic, z->last_topic, tlen) == 0)
        return BUS_OK;
    if (memchr(topic, '\0', tlen) != NULL ||
        bus__topic_check(topic, false, tw, sizeof(tw)) != BUS_OK) {
        snprintf(why, why_len, "bad topic frame: %s",
                 memchr(topic, '\0', tlen) != NULL ? "NUL byte" : tw);
        topic[0] = '\0';
        return BUS_EPROTO;
    }
    if (tlen <= sizeof(z->last_topic)) {
        memcpy(z->last_topic, topic, tlen);
        z->last_topic_len = tlen;
    }
    return BUS_OK;
}

/* The decoded event carries its topic and is frozen. */
static void
zb_decoded(bus_event *ev, const char *topic)
{
    /* Decoded events may come frozen (older codec): the bus context then
     * records the topic on a copy. */
    if (!bus__event_is_frozen(ev))
        (void)bus__event_set_topic(ev, topic, strlen(topic));
    bus_event_freeze(ev);
}

int
zb_decode(zb *z, zmq_msg_t *tmsg, zmq_msg_t *env, char *topic, bus_event **out)
{
    size_t size = zmq_msg_size(env);
    char why[200], line[320];
    bus_event *ev = NULL;
    zmq_msg_t *holder;
    int rv;

    *out = NULL;
    ZB_TSAN_ACQUIRE(env);
    if ((rv = zb_topic_take(z, zmq_msg_data(tmsg), zmq_msg_size(tmsg), topic,
                            why, sizeof(why))) != BUS_OK)
        goto bad;
    if (size > ZB_ADOPT_MIN && z->o.dead_letter == NULL) {
        if ((holder = bus__alloc(sizeof(*holder))) == NULL) {
            zmq_msg_close(env);
            return BUS_ENOMEM;
        }
        zmq_msg_init(holder);
        zmq_msg_move(holder, env);
        rv =
            bus_codec_decode_adopt(&ev, zmq_msg_data(holder), size, zb_msg_free,
                                   holder, &z->limits, why, sizeof(why));
        if (rv == BUS_ENOMEM)
            return rv; /* not the peer's fault: no count */
        if (rv != BUS_OK)
            goto counted;
    } else {
        rv = bus_codec_decode(&ev, zmq_msg_data(env), size, &z->limits, why,
                              sizeof(why));
        if (rv == BUS_ENOMEM) {
            zmq_msg_close(env);
            return rv;
        }
        if (rv != BUS_OK)
            goto bad;
        zmq_msg_close(env);
    }
    zb_decoded(ev, topic);
    *out = ev;
    return BUS_OK;
bad:
    if (z->o.dead_letter != NULL)
        zb_dead_letter(z, topic, zmq_msg_data(env), size, rv, why);
    zmq_msg_close(env);
counted:
    snprintf(line, sizeof(line), "%s (%s)", why, bus_err_name(rv));
    zb_bad_frame(z, line);
    return rv;
}

int
zb_decode_buf(zb *z, const void *t, size_t tlen, const void *env, size_t size,
              char *topic, bus_event **out)
{
    char why[200], line[320];
    bus_event *ev = NULL;
    int rv;

    *out = NULL;
    if ((rv = zb_topic_take(z, t, tlen, topic, why, sizeof(why))) == BUS_OK) {
        rv = bus_codec_decode(&ev, env, size, &z->limits, why, sizeof(why));
        if (rv == BUS_ENOMEM)
            return rv;
        if (rv == BUS_OK) {
            zb_decoded(ev, topic);
            *out = ev;
            return BUS_OK;
        }
    }
    if (z->o.dead_letter != NULL)
        zb_dead_letter(z, topic, env, size, rv, why);
    snprintf(line, sizeof(line), "%s (%s)", why, bus_err_name(rv));
    zb_bad_frame(z, line);
    return rv;
}

/* ---- Subscriptions (I/O thread) -------------------------------------------
 */

void
zb_sub_free(zb_sub *s)
{
    if (s == NULL)
        return;
    bus__strfree(s->pattern);
    bus__strfree(s->prefix);
    bus__free(s, sizeof(*s));
}

int
zb_sub_add(zb *z, zb_sub *s)
{
    bool sent = false;
    int rv = BUS_OK;

    if (z->nsubs == z->cap_subs) {
        size_t ncap = z->cap_subs == 0 ? 8 : z->cap_subs * 2;
        zb_sub **v =
            bus__realloc(z->subs, z->cap_subs * sizeof(*v), ncap * sizeof(*v));
        if (v == NULL)
            return BUS_ENOMEM;
        z->subs = v;
        z->cap_subs = ncap;
    }
    if (z->o.mode == ZB_FANOUT)
        rv = zb_fan_sub_add(z, s, &sent);
    else if (s->peer == NULL)
        rv = zb_rel_sub_add(z, s, &sent);
    if (rv != BUS_OK)
        return rv;
    s->added = true;
    s->sync_wait = sent;
    s->idx = z->nsubs;
    z->subs[z->nsubs++] = s;
    z->nlive++;
    if (s->peer != NULL)
        z->nremote++;
    return BUS_OK;
}

/* Takes s out of z->subs (the last one takes its place: deliveries
 * have no order across subscriptions) and frees it. Only outside deliver
 * loops, which iterate z->subs by index. @io */
static void
zb_sub_remove(zb *z, zb_sub *s)
{
    zb_sub *last = z->subs[--z->nsubs];

    z->subs[s->idx] = last;
    last->idx = s->idx;
    if (z->o.mode == ZB_RELIABLE)
        zb_rel_sub_dead(z, s);
    zb_sub_free(s);
}

static void
zb_compact(zb *z)
{
    zb_sub *s;

    if (z->in_delivery > 0)
        return;
    while ((s = z->dead_subs) != NULL) {
        z->dead_subs = s->dnext;
        zb_sub_remove(z, s);
    }
}

void
zb_sub_kill(zb *z, zb_sub *s)
{
    if (s->dead)
        return;
    s->dead = true;
    z->nlive--;
    if (s->peer != NULL)
        z->nremote--;
    if (z->o.mode == ZB_FANOUT)
        zb_fan_sub_del(z, s);
    else if (s->peer == NULL)
        zb_rel_sub_del(z, s);
    if (z->in_delivery > 0) {
        s->dnext = z->dead_subs; /* a loop may be looking at it */
        z->dead_subs = s;
    } else {
        zb_sub_remove(z, s);
    }
}

void
zb_deliver_begin(zb *z)
{
    z->in_delivery++;
}

void
zb_deliver_end(zb *z)
{
    z->in_delivery--;
    zb_compact(z);
}

/* Runs queued commands. @io */
static bool
zb_cmds_run(zb *z)
{
    zb_cmd *list, *c;

    /* acquire: pairs with the release in zb_cmd_run. */
    if (!atomic_load_explicit(&z->cmd_pending, memory_order_acquire))
        return false;
    bus__mutex_lock(&z->mtx);
    list = z->cmds;
    z->cmds = NULL;
    atomic_store_explicit(&z->cmd_pending, false, memory_order_relaxed);
    bus__mutex_unlock(&z->mtx);
    for (c = list; c != NULL; c = c->next) {
        if (c->kind == ZB_CMD_SUB)
            c->rv = zb_sub_add(z, c->sub);
        else
            zb_sub_kill(z, c->sub);
    }
    bus__mutex_lock(&z->mtx);
    while ((c = list) != NULL) {
        list = c->next; /* read before done: the waiter owns c after */
        if (c->kind == ZB_CMD_SUB && c->rv == BUS_OK && c->sub->sync_wait &&
            z->o.subscribe_timeout_ms > 0 && !z->io_exited) {
            /* Done once the publisher confirms it (zb_sync_done). */
            c->deadline_ns = bus__clock_mono_ns() +
                             (uint64_t)z->o.subscribe_timeout_ms * 1000000u;
            c->next = z->syncing;
            z->syncing = c;
            continue;
        }
        c->done = true;
    }
    bus__cond_broadcast(&z->cond);
    bus__mutex_unlock(&z->mtx);
    return true;
}

static bool
zb_sync_key_is(const zb *z, const zb_sub *s, const char *key, size_t len)
{
    const char *k = z->o.mode == ZB_FANOUT ? s->prefix : s->pattern;

    return strlen(k) == len && memcmp(k, key, len) == 0;
}

/* Completes waiting subscribe commands: those whose key matches (key
 * NULL: all), or whose deadline passed (now != 0). Returns the next
 * deadline (0: none). @io */
static uint64_t
zb_sync_complete(zb *z, const char *key, size_t len, uint64_t now)
{
    zb_cmd **pp, *c;
    uint64_t next = 0;
    bool any = false;

    if (z->syncing == NULL)
        return 0;
    bus__mutex_lock(&z->mtx);
    for (pp = &z->syncing; (c = *pp) != NULL;) {
        bool hit = key != NULL ? zb_sync_key_is(z, c->sub, key, len)
                               : (now == 0 || c->deadline_ns <= now);
        if (!hit) {
            if (next == 0 || c->deadline_ns < next)
                next = c->deadline_ns;
            pp = &c->next;
            continue;
        }
        if (key == NULL && now != 0)
            zb_logf(z, BUS_LOG_INFO,
                    "subscribe '%s': not confirmed by the publisher within "
                    "%d ms (not connected yet?); it stays active",
                    c->sub->pattern, z->o.subscribe_timeout_ms);
        c->sub->sync_wait = false;
        *pp = c->next;
        c->done = true; /* the waiter owns c from here */
        any = true;
    }
    if (any)
        bus__cond_broadcast(&z->cond);
    bus__mutex_unlock(&z->mtx);
    return next;
}

void
zb_sync_done(zb *z, const char *key, size_t len)
{
    (void)zb_sync_complete(z, key, len, 0);
}

/* Hands a command to the I/O thread and waits for it; when the thread
 * has ended (after stop), runs it here: nobody else uses the sockets. */
static int
zb_cmd_run(zb *z, int kind, zb_sub *s)
{
    zb_cmd c = {.kind = kind, .sub = s};
    bool io_gone;

    bus__mutex_lock(&z->mtx);
    io_gone = !z->io_started || z->io_exited;
    if (!io_gone) {
        zb_cmd **pp = &z->cmds;
        while (*pp != NULL)
            pp = &(*pp)->next;
        *pp = &c;
        /* release: the list is written before the flag is seen. */
        atomic_store_explicit(&z->cmd_pending, true, memory_order_release);
    }
    bus__mutex_unlock(&z->mtx);
    if (io_gone) {
        if (kind == ZB_CMD_SUB)
            return BUS_ECLOSED;
        zb_sub_kill(z, s);
        return BUS_OK;
    }
    zb_wake(z);
    bus__mutex_lock(&z->mtx);
    atomic_fetch_add_explicit(&z->waiters, 1, memory_order_seq_cst);
    while (!c.done)
        bus__cond_wait(&z->cond, &z->mtx);
    atomic_fetch_sub_explicit(&z->waiters, 1, memory_order_seq_cst);
    bus__mutex_unlock(&z->mtx);
    return c.rv;
}

static int
zb_subscribe(void *priv, const char *pattern, const char *group,
             bus_deliver_fn fn, void *opaque, void **handle)
{
    zb *z = priv;
    zb_sub *s;
    size_t plen;
    int rv;

    if (handle == NULL)
        return BUS_EINVAL;
    *handle = NULL;
    if (pattern == NULL || fn == NULL ||
        bus__topic_check(pattern, true, NULL, 0) != BUS_OK)
        return BUS_EINVAL;
    if (group != NULL) {
        zb_logf(z, BUS_LOG_WARN,
                "subscribe '%s': consumer groups are not supported by "
                "zmq brokers (group '%s')",
                pattern, group);
        return BUS_ENOTSUP;
    }
    /* acquire: pairs with close. */
    if (atomic_load_explicit(&z->closed, memory_order_acquire))
        return BUS_ECLOSED;
    if ((s = bus__zalloc(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    s->z = z;
    s->fn = fn;
    s->opaque = opaque;
    if ((s->pattern = bus__strdup(pattern, NULL)) == NULL ||
        (s->prefix = zb_pattern_prefix(pattern, &plen)) == NULL) {
        zb_sub_free(s);
        return BUS_ENOMEM;
    }
    /* The handle is out before the first delivery can happen: a
     * delivery's ack names it, maybe before we return. */
    *handle = s;
    if (zb_on_io(z))
        rv = zb_sub_add(z, s);
    else
        rv = zb_cmd_run(z, ZB_CMD_SUB, s);
    if (rv != BUS_OK) {
        *handle = NULL;
        zb_sub_free(s);
        return rv;
    }
    return BUS_OK;
}

static void
zb_unsubscribe(void *priv, void *handle)
{
    zb *z = priv;

    if (handle == NULL)
        return;
    if (zb_on_io(z))
        zb_sub_kill(z, handle); /* freed once the deliver loop ends */
    else
        (void)zb_cmd_run(z, ZB_CMD_UNSUB, handle);
}

/* ---- Monitor (connecting sockets)
 * -------------------------------------------- */

static _Atomic uint64_t zb_mon_seq;

static int
zb_monitor_open(zb *z, void *sock)
{
    char addr[64];
    uint64_t n =
        atomic_fetch_add_explicit(&zb_mon_seq, 1, memory_order_relaxed);
    int events = ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                 ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                 ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                 ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;

    snprintf(addr, sizeof(addr), "inproc://bus-zmq-monitor-%llu",
             (unsigned long long)n);
    if (zmq_socket_monitor(sock, addr, events) != 0)
        return zb_zerr(z, "zmq_socket_monitor");
    z->mon_of = sock;
    if ((z->mon = zmq_socket(z->zctx, ZMQ_PAIR)) == NULL)
        return zb_zerr(z, "zmq_socket(PAIR)");
    if (zmq_connect(z->mon, addr) != 0)
        return zb_zerr(z, "connect monitor");
    return BUS_OK;
}

static void
zb_monitor_input(zb *z)
{
    uint8_t head[6];
    uint16_t ev;
    uint32_t val;
    char ep[256];
    zmq_msg_t m;
    int i;

    for (i = 0; i < 64; i++) {
        size_t n;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        if (zmq_msg_size(&m) < sizeof(head) || !zmq_msg_more(&m)) {
            zmq_msg_close(&m);
            zb_drain_parts(z->mon);
            continue;
        }
        memcpy(head, zmq_msg_data(&m), sizeof(head));
        zmq_msg_close(&m);
        memcpy(&ev, head, 2);
        memcpy(&val, head + 2, 4);
        zmq_msg_init(&m);
        ep[0] = '\0';
        if (zmq_msg_recv(&m, z->mon, 0) >= 0) {
            n = zmq_msg_size(&m) < sizeof(ep) ? zmq_msg_size(&m)
                                              : sizeof(ep) - 1;
            memcpy(ep, zmq_msg_data(&m), n);
            ep[n] = '\0';
        }
        zmq_msg_close(&m);
        zb_drain_parts(z->mon);
        switch (ev) {
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
            z->disc_since_ns = 0;
            atomic_store_explicit(&z->connected, true, memory_order_relaxed);
            if (z->ever_connected) {
                zb_count(&z->st.reconnects, 1);
                zb_logf(z, BUS_LOG_INFO, "reconnected to %s", ep);
            } else {
                zb_logf(z, BUS_LOG_DEBUG, "connected to %s", ep);
            }
            z->ever_connected = true;
            if (z->o.mode == ZB_RELIABLE && z->send_sock != NULL)
                zb_rel_reconnected(z);
            break;
        case ZMQ_EVENT_DISCONNECTED:
            if (z->disc_since_ns == 0)
                z->disc_since_ns = bus__clock_mono_ns();
            atomic_store_explicit(&z->connected, false, memory_order_relaxed);
            zb_logf(z, BUS_LOG_INFO, "disconnected from %s", ep);
            break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
            zb_ratelogf(z, &z->rl_hs, BUS_LOG_WARN,
                        "%s refused our credentials (ZAP status %u)", ep, val);
            break;
        default:
            zb_ratelogf(z, &z->rl_hs, BUS_LOG_WARN,
                        "handshake with %s failed (%s, %u)", ep,
                        ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "protocol"
                                                                  : "no detail",
                        val);
            break;
        }
    }
}

/* libzmq reconnects after a network error, but not after a protocol
 * error (a frame over ZMQ_MAXMSGSIZE, a malformed greeting): it drops
 * the session for good. A connecting broker that stays disconnected
 * longer than reconnecting could take dials again. Returns the next
 * deadline (0: none). @io */
static uint64_t
zb_redial(zb *z, uint64_t now)
{
    uint64_t ivl = (uint64_t)(z->o.reconnect_ivl_max > z->o.reconnect_ivl
                                  ? z->o.reconnect_ivl_max
                                  : z->o.reconnect_ivl) *
                       2000000u +
                   100000000u;

    if (z->mon_of == NULL || z->disc_since_ns == 0)
        return 0;
    if (now - z->disc_since_ns < ivl)
        return z->disc_since_ns + ivl;
    zb_logf(z, BUS_LOG_INFO,
            "still disconnected from %s after %llu ms (libzmq does not "
            "reconnect after a protocol error): dialing again",
            z->endpoint,
            (unsigned long long)((now - z->disc_since_ns) / 1000000u));
    (void)zmq_disconnect(z->mon_of, z->endpoint);
    if (zmq_connect(z->mon_of, z->endpoint) != 0)
        (void)zb_zerr(z, "connect again");
    z->disc_since_ns = now;
    return now + ivl;
}

/* ---- The I/O thread
 * ---------------------------------------------------------- */

/* Work that should keep the I/O thread from sleeping. A queue blocked at
 * the HWM is not (it is retried on a timer); a stop already seen is not. */
static bool
zb_has_work(zb *z, bool saw_stop)
{
    return (zb_queue_nonempty(z) && !z->hwm_blocked) ||
           atomic_load_explicit(&z->cmd_pending, memory_order_relaxed) ||
           atomic_load_explicit(&z->acks, memory_order_relaxed) != NULL ||
           (!saw_stop &&
            atomic_load_explicit(&z->stopping, memory_order_relaxed));
}

static void
zb_wake_drain(zb *z)
{
    char buf[64];

    /* Empty the pipe first, then clear the flag. The other order loses
     * wake-ups: a waker that set the flag after the clear could have its
     * byte swallowed by these reads, leaving the flag set over an empty
     * pipe, so that every later waker skips its write and the thread
     * sleeps its full poll timeout (the 0.5 s stalls bench/zmq showed).
     * In this order a waker racing with us at worst leaves a byte behind:
     * one spurious wake-up. A waker that saw the flag still set before
     * the clear made its work visible before its fence, so our re-check
     * before sleeping sees it (see zb_wake). */
    while (read(z->wake_fd[0], buf, sizeof(buf)) > 0)
        ;
    atomic_store_explicit(&z->wake_pending, false, memory_order_relaxed);
}

/* The end: what the queue still holds is sent (fanout) or failed
 * (reliable), events in flight are failed, waiting commands run. */
static void
zb_io_finish(zb *z)
{
    uint64_t n = 0;

    for (;;) {
        zb_slot *s = &z->slots[z->head & z->mask];
        if (atomic_load_explicit(&s->seq, memory_order_acquire) != z->head + 1)
            break;
        if (z->o.mode == ZB_FANOUT) {
            z->hwm_since_ns = 1; /* long ago: drop at the HWM now */
            z->hwm_blocked = false;
            (void)zb_fan_send(z, &s->p, UINT64_MAX);
        } else {
            zb_pub_finish(&s->p, BUS_ECLOSED);
        }
        atomic_store_explicit(&s->seq, z->head + z->mask + 1,
                              memory_order_release);
        z->head++;
        n++;
    }
    zb_release(z, n, n);
    if (z->o.mode == ZB_RELIABLE)
        zb_rel_abort(z);
    /* Commands handed over before io_exited was set run here; later ones
     * run on their caller's thread (zb_cmd_run), since we are done with
     * the sockets and the subscriptions. */
    bus__mutex_lock(&z->mtx);
    z->io_exited = true;
    bus__mutex_unlock(&z->mtx);
    atomic_store_explicit(&z->cmd_pending, true, memory_order_relaxed);
    (void)zb_cmds_run(z);
    (void)zb_sync_complete(z, NULL, 0, 0);
    if (z->o.mode == ZB_FANOUT)
        zb_fan_fini(z);
}

/* What zmq_poll with a zero timeout would say, asked of each socket
 * (ZMQ_EVENTS) without building a poll(2) over every descriptor. The wake
 * pipe is left for the next real poll: nobody writes it while we do not
 * sleep. */
static int
zb_poll_now(zmq_pollitem_t *items, int n)
{
    int i, ready = 0;

    items[0].revents = 0;
    for (i = 1; i < n; i++) {
        int ev = 0;
        size_t len = sizeof(ev);
        items[i].revents = 0;
        if (zmq_getsockopt(items[i].socket, ZMQ_EVENTS, &ev, &len) != 0)
            continue;
        items[i].revents = (short)(ev & items[i].events);
        ready += items[i].revents != 0;
    }
    return ready;
}

/* Before sleeping, spins up to spin_us for work to show up: waking a
 * sleeping thread costs more than a short spin under a steady stream.
 * True when something came. */
static bool
zb_spin(zb *z, zmq_pollitem_t *items, int n, bool saw_stop)
{
    uint64_t until = bus__clock_mono_ns() + (uint64_t)z->o.spin_us * 1000u;
    unsigned k = 0;

    do {
        int i;
        for (i = 0; i < 64; i++)
            bus__cpu_relax();
        if (zb_has_work(z, saw_stop))
            return true;
        if ((++k & 7) == 0 && zb_poll_now(items, n) > 0)
            return true;
    } while (bus__clock_mono_ns() < until);
    return false;
}

static uint64_t
zb_min_deadline(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}

static void
zb_io_main(void *arg)
{
    zb *z = arg;
    zmq_pollitem_t items[8];
    int idx_send, idx_recv, idx_mon, idx_zap, n, rc;
    bool saw_stop = false, streaming = false;

    zb_io_self = z;
    for (;;) {
        uint64_t now = bus__clock_mono_ns(), next = 0;
        bool busy = false;
        long timeout;

        busy |= zb_cmds_run(z);
        if (z->o.mode == ZB_RELIABLE)
            busy |= zb_rel_acks_run(z, now);
        if (zb_drain(z, now) > 0)
            busy = streaming = true;
        next = zb_sync_complete(z, NULL, 0, now);
        next = zb_min_deadline(next, zb_redial(z, now));
        if (z->o.mode == ZB_RELIABLE) {
            zb_rel_send(z, now);
            next = zb_min_deadline(next, zb_rel_timers(z, now));
            zb_rel_ack_flush(z);
        } else {
            next = zb_min_deadline(next, z->hold_until_ns);
            if (z->hwm_blocked)
                next = zb_min_deadline(next, now + 1000000u); /* retry */
        }
        /* acquire: pairs with stop's release. */
        if (atomic_load_explicit(&z->stopping, memory_order_acquire)) {
            saw_stop = true;
            if (z->o.mode == ZB_FANOUT)
                break;
            if (z->stop_deadline_ns == 0)
                z->stop_deadline_ns = now + (uint64_t)z->o.linger * 1000000u;
            if ((zb_rel_sender_idle(z) && !zb_queue_nonempty(z)) ||
                now >= z->stop_deadline_ns)
                break;
            next = zb_min_deadline(next, z->stop_deadline_ns);
        }

        timeout = ZB_MAX_POLL_MS;
        if (next != 0)
            timeout = next <= now ? 0 : (long)((next - now) / 1000000u) + 1;
        if (timeout > ZB_MAX_POLL_MS)
            timeout = ZB_MAX_POLL_MS;
        if (busy)
            timeout = 0;

        n = 0;
        idx_send = idx_recv = idx_mon = idx_zap = -1;
        items[n++] = (zmq_pollitem_t){NULL, z->wake_fd[0], ZMQ_POLLIN, 0};
        if (z->send_sock != NULL) {
            short evs = 0;
            if (z->o.mode == ZB_RELIABLE) {
                evs = ZMQ_POLLIN;
                if (z->unsent.n > 0)
                    evs |= ZMQ_POLLOUT;
            } else if (!z->fwd_pending) {
                /* A forward blocked at the HWM is retried first: the
                 * XPUB's input waits in libzmq meanwhile. */
                evs = ZMQ_POLLIN;
            }
            if (evs != 0) {
                idx_send = n;
                items[n++] = (zmq_pollitem_t){z->send_sock, 0, evs, 0};
            }
        }
        if (z->recv_sock != NULL) {
            idx_recv = n;
            items[n++] = (zmq_pollitem_t){z->recv_sock, 0, ZMQ_POLLIN, 0};
        }
        if (z->mon != NULL) {
            idx_mon = n;
            items[n++] = (zmq_pollitem_t){z->mon, 0, ZMQ_POLLIN, 0};
        }
        if (z->zap != NULL) {
            idx_zap = n;
            items[n++] = (zmq_pollitem_t){z->zap, 0, ZMQ_POLLIN, 0};
        }
        /* Spin only while events flow: commands alone do not pay. */
        if (timeout != 0 && z->o.spin_us > 0 && streaming &&
            zb_spin(z, items, n, saw_stop))
            timeout = 0;
        if (timeout != 0) {
            atomic_store_explicit(&z->sleeping, true, memory_order_relaxed);
            /* seq_cst: our store of `sleeping` before the re-check, as
             * zb_wake's fence orders its work before its load. */
            atomic_thread_fence(memory_order_seq_cst);
            if (zb_has_work(z, saw_stop))
                timeout = 0;
        }
        if (timeout == 0)
            rc = zb_poll_now(items, n);
        else
            rc = zmq_poll(items, n, timeout);
        atomic_store_explicit(&z->sleeping, false, memory_order_relaxed);
        if (rc < 0) {
            if (zmq_errno() == EINTR)
                continue;
            (void)zb_zerr(z, "zmq_poll");
            if (zmq_errno() == ETERM)
                break;
            bus__sleep_ns(1000000); /* do not spin on a persistent error */
            continue;
        }
        now = bus__clock_mono_ns();
        if (items[0].revents & ZMQ_POLLIN)
            zb_wake_drain(z);
        if (idx_zap >= 0 && (items[idx_zap].revents & ZMQ_POLLIN))
            zb_zap_input(z);
        if (idx_mon >= 0 && (items[idx_mon].revents & ZMQ_POLLIN))
            zb_monitor_input(z);
        streaming = false;
        if (idx_send >= 0 && (items[idx_send].revents & ZMQ_POLLIN)) {
            streaming = true;
            if (z->o.mode == ZB_FANOUT)
                zb_fan_xpub_input(z, now);
            else
                zb_rel_dealer_input(z);
        }
        if (idx_recv >= 0 && (items[idx_recv].revents & ZMQ_POLLIN)) {
            streaming = true;
            if (z->o.mode == ZB_FANOUT)
                zb_fan_recv(z);
            else
                zb_rel_router_input(z);
        }
        if (z->o.mode == ZB_RELIABLE)
            zb_rel_ack_flush(z);
    }
    zb_io_finish(z);
    zb_io_self = NULL;
}

/* ---- Options
 * ------------------------------------------------------------------ */

static int
zb_opt_i64(bus_uri *u, const char *key, int64_t min, int64_t max, int64_t *out,
           char *errbuf, size_t errbuf_len)
{
    int rv = bus_uri_get_i64(u, key, min, max, out);

    if (rv == BUS_EINVAL)
        zb_err(errbuf, errbuf_len,
               "option '%s': want an integer in [%lld, %lld]", key,
               (long long)min, (long long)max);
    return rv == BUS_ENOTFOUND ? BUS_OK : rv;
}

static int
zb_opt_i32(bus_uri *u, const char *key, int64_t min, int64_t max, int32_t *out,
           char *errbuf, size_t errbuf_len)
{
    int64_t v = *out;
    int rv = zb_opt_i64(u, key, min, max, &v, errbuf, errbuf_len);

    *out = (int32_t)v;
    return rv;
}

static int
zb_opt_bool(bus_uri *u, const char *key, bool *out, char *errbuf,
            size_t errbuf_len)
{
    int rv = bus_uri_get_bool(u, key, out);

    if (rv == BUS_EINVAL)
        zb_err(errbuf, errbuf_len,
               "option '%s': want a boolean (1/0/true/false/yes/no)", key);
    return rv == BUS_ENOTFOUND ? BUS_OK : rv;
}

static int
zb_opt_str(bus_uri *u, const char *key, size_t maxlen, char **out, char *errbuf,
           size_t errbuf_len)
{
    const char *v = bus_uri_get(u, key);

    if (v == NULL)
        return BUS_OK;
    if (v[0] == '\0' || strlen(v) > maxlen) {
        zb_err(errbuf, errbuf_len, "option '%s': want 1 to %zu bytes", key,
               maxlen);
        return BUS_EINVAL;
    }
    if ((*out = bus__strdup(v, NULL)) == NULL)
        return BUS_ENOMEM;
    return BUS_OK;
}

static uint32_t
zb_pow2(uint32_t v)
{
    uint32_t p = 1;

    while (p < v)
        p <<= 1;
    return p;
}

static int
zb_parse_opts(zb *z, bus_uri *u, char *errbuf, size_t errbuf_len)
{
    zb_opts *o = &z->o;
    const char *v;
    int64_t q = ZB_DEF_QUEUE, w = ZB_DEF_WINDOW, d = ZB_DEF_DEDUP;
    int rv;

    o->bind = true;
    o->hwm = ZB_DEF_HWM;
    o->block_timeout_ms = ZB_DEF_BLOCK_MS;
    o->resend_ivl_ms = ZB_DEF_RESEND_MS;
    o->reconnect_ivl = ZB_DEF_RECONNECT_MS;
    o->reconnect_ivl_max = ZB_DEF_RECONNECT_MAX_MS;
    o->heartbeat_ivl = ZB_DEF_HB_IVL;
    o->heartbeat_timeout = ZB_DEF_HB_TIMEOUT;
    o->heartbeat_ttl = ZB_DEF_HB_TTL;
    o->handshake_ivl = ZB_DEF_HANDSHAKE_MS;
    o->max_msg_size = ZB_DEF_MAX_MSG;
    o->linger = ZB_DEF_LINGER;
    o->spin_us = ZB_DEF_SPIN_US;
    o->batch = ZB_DEF_BATCH;
    o->hwm_wait_ms = ZB_DEF_HWM_WAIT_MS;
    o->subscribe_timeout_ms = ZB_DEF_SUB_TIMEOUT_MS;
    o->peer_timeout_ms = ZB_DEF_PEER_TIMEOUT_MS;

    if ((v = bus_uri_get(u, "mode")) != NULL) {
        if (strcmp(v, "fanout") == 0) {
            o->mode = ZB_FANOUT;
        } else if (strcmp(v, "reliable") == 0) {
            o->mode = ZB_RELIABLE;
        } else {
            zb_err(errbuf, errbuf_len,
                   "option 'mode': want fanout or reliable, not '%s'", v);
            return BUS_EINVAL;
        }
    }
    if ((v = bus_uri_get(u, "backpressure")) != NULL) {
        if (strcmp(v, "block") == 0) {
            o->bp_fail = false;
        } else if (strcmp(v, "fail") == 0) {
            o->bp_fail = true;
        } else {
            zb_err(errbuf, errbuf_len,
                   "option 'backpressure': want block or fail, not '%s'", v);
            return BUS_EINVAL;
        }
    }
    if ((rv = zb_opt_bool(u, "bind", &o->bind, errbuf, errbuf_len)) ||
        (rv =
             zb_opt_i32(u, "hwm", 0, INT32_MAX, &o->hwm, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "sndbuf", 0, INT32_MAX, &o->sndbuf, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i32(u, "rcvbuf", 0, INT32_MAX, &o->rcvbuf, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i64(u, "queue", 2, 1 << 20, &q, errbuf, errbuf_len)) ||
        (rv = zb_opt_i64(u, "window", 1, 1 << 20, &w, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "block_timeout_ms", -1, INT32_MAX,
                         &o->block_timeout_ms, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "resend_ivl", 1, 3600000, &o->resend_ivl_ms, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i64(u, "dedup", 1, 1 << 24, &d, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "wait_subscriber", 0, 3600000,
                         &o->wait_subscriber_ms, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "hwm_wait", 0, 3600000, &o->hwm_wait_ms, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i32(u, "subscribe_timeout", 0, 3600000,
                         &o->subscribe_timeout_ms, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "peer_timeout", 100, 3600000, &o->peer_timeout_ms,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "reconnect_ivl", 1, 3600000, &o->reconnect_ivl,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "reconnect_ivl_max", 0, 3600000,
                         &o->reconnect_ivl_max, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "heartbeat_ivl", 0, 3600000, &o->heartbeat_ivl,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "heartbeat_timeout", 0, 3600000,
                         &o->heartbeat_timeout, errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "heartbeat_ttl", 0, 6553500, &o->heartbeat_ttl,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "handshake_ivl", 0, 3600000, &o->handshake_ivl,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i64(u, "max_msg_size", 64, INT64_MAX / 2, &o->max_msg_size,
                         errbuf, errbuf_len)) ||
        (rv = zb_opt_i32(u, "linger", 0, 3600000, &o->linger, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i32(u, "spin_us", 0, 1000000, &o->spin_us, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_i32(u, "batch", 0, 1 << 24, &o->batch, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_str(u, "routing_id", 255, &o->routing_id, errbuf,
                         errbuf_len)) ||
        (rv = zb_opt_str(u, "dead_letter", BUS_TOPIC_MAX_LEN, &o->dead_letter,
                         errbuf, errbuf_len)))
        return rv;
    o->queue = (uint32_t)q;
    o->window = (uint32_t)w;
    /* A batch is one frame: never over our own limit either. */
    if ((int64_t)o->batch > o->max_msg_size)
        o->batch = (int32_t)o->max_msg_size;
    o->dedup = (uint32_t)d;
    if (o->dead_letter != NULL &&
        bus__topic_check(o->dead_letter, false, NULL, 0) != BUS_OK) {
        zb_err(errbuf, errbuf_len, "option 'dead_letter': not a valid topic");
        return BUS_EINVAL;
    }
    if (o->hwm_wait_ms > 0 && o->mode == ZB_FANOUT && !o->bind)
        o->hwm_wait_ms = 0; /* a peer's XSUB never reports its HWM */
    if (o->routing_id != NULL && (o->mode != ZB_RELIABLE || o->bind)) {
        zb_err(errbuf, errbuf_len,
               "option 'routing_id': only for a connecting reliable broker "
               "(mode=reliable&bind=0)");
        return BUS_EINVAL;
    }
    if (o->wait_subscriber_ms > 0 && (o->mode != ZB_FANOUT || !o->bind)) {
        zb_err(errbuf, errbuf_len,
               "option 'wait_subscriber': only for a fanout publisher "
               "(mode=fanout&bind=1)");
        return BUS_EINVAL;
    }
    return zb_curve_opts(z, u, errbuf, errbuf_len);
}

/* "zmq+tcp://h:p" -> "tcp://h:p", checking the parts each scheme takes. */
static int
zb_endpoint(zb *z, const bus_uri *u, char *errbuf, size_t errbuf_len)
{
    const char *a = u->authority, *p = u->path, *colon;
    int n = -1;

    switch (z->transport) {
    case ZB_TCP:
        colon = strrchr(a, ':');
        if (a[0] == '\0' || p[0] != '\0' || colon == NULL || colon[1] == '\0') {
            zb_err(errbuf, errbuf_len,
                   "zmq+tcp wants host:port and no path "
                   "(zmq+tcp://127.0.0.1:5555)");
            return BUS_EINVAL;
        }
        n = snprintf(z->endpoint, sizeof(z->endpoint), "tcp://%s", a);
        break;
    case ZB_IPC:
        if (a[0] != '\0' || p[0] != '/') {
            zb_err(errbuf, errbuf_len,
                   "zmq+ipc wants an absolute path (zmq+ipc:///tmp/x.sock)");
            return BUS_EINVAL;
        }
        if (strlen(p) >= 108) { /* sockaddr_un.sun_path */
            zb_err(errbuf, errbuf_len,
                   "zmq+ipc: path longer than 107 "
                   "bytes");
            return BUS_EINVAL;
        }
        n = snprintf(z->endpoint, sizeof(z->endpoint), "ipc://%s", p);
        break;
    case ZB_INPROC:
        if (a[0] == '\0' || p[0] != '\0') {
            zb_err(errbuf, errbuf_len,
                   "zmq+inproc wants a name and no path (zmq+inproc://n)");
            return BUS_EINVAL;
        }
        n = snprintf(z->endpoint, sizeof(z->endpoint), "inproc://%s", a);
        break;
    }
    if (n < 0 || (size_t)n >= sizeof(z->endpoint)) {
        zb_err(errbuf, errbuf_len, "endpoint too long");
        return BUS_EINVAL;
    }
    snprintf(z->name, sizeof(z->name), "zmq+%s", z->endpoint);
    return BUS_OK;
}

/* The log prefix: "hub zmq+tcp://127.0.0.1:5555" or "peer ...". */
static void
zb_set_name(zb *z)
{
    snprintf(z->name, sizeof(z->name), "%s zmq+%s", z->o.bind ? "hub" : "peer",
             z->endpoint);
}

/* ---- Sockets --------------------------------------------------------------
 */

static int
zb_setint(zb *z, void *s, int opt, int v, const char *name)
{
    if (zmq_setsockopt(s, opt, &v, sizeof(v)) != 0)
        return zb_zerr(z, name);
    return BUS_OK;
}

static int
zb_sock_common(zb *z, void *s, bool connecting)
{
    int64_t mx = z->o.max_msg_size;
    int rv;

    if ((rv = zb_setint(z, s, ZMQ_LINGER, z->o.linger, "ZMQ_LINGER")) ||
        (rv = zb_setint(z, s, ZMQ_SNDHWM, z->o.hwm, "ZMQ_SNDHWM")) ||
        (rv = zb_setint(z, s, ZMQ_RCVHWM, z->o.hwm, "ZMQ_RCVHWM")) ||
        (rv = zb_setint(z, s, ZMQ_HANDSHAKE_IVL, z->o.handshake_ivl,
                        "ZMQ_HANDSHAKE_IVL")))
        return rv;
    if (zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &mx, sizeof(mx)) != 0)
        return zb_zerr(z, "ZMQ_MAXMSGSIZE");
    if ((z->o.sndbuf > 0 &&
         (rv = zb_setint(z, s, ZMQ_SNDBUF, z->o.sndbuf, "ZMQ_SNDBUF"))) ||
        (z->o.rcvbuf > 0 &&
         (rv = zb_setint(z, s, ZMQ_RCVBUF, z->o.rcvbuf, "ZMQ_RCVBUF"))))
        return rv;
    if (z->o.heartbeat_ivl > 0 &&
        ((rv = zb_setint(z, s, ZMQ_HEARTBEAT_IVL, z->o.heartbeat_ivl,
                         "ZMQ_HEARTBEAT_IVL")) ||
         (rv = zb_setint(z, s, ZMQ_HEARTBEAT_TIMEOUT, z->o.heartbeat_timeout,
                         "ZMQ_HEARTBEAT_TIMEOUT")) ||
         (rv = zb_setint(z, s, ZMQ_HEARTBEAT_TTL, z->o.heartbeat_ttl,
                         "ZMQ_HEARTBEAT_TTL"))))
        return rv;
    if (connecting &&
        ((rv = zb_setint(z, s, ZMQ_RECONNECT_IVL, z->o.reconnect_ivl,
                         "ZMQ_RECONNECT_IVL")) ||
         (rv = zb_setint(z, s, ZMQ_RECONNECT_IVL_MAX, z->o.reconnect_ivl_max,
                         "ZMQ_RECONNECT_IVL_MAX"))))
        return rv;
    if (z->transport == ZB_TCP && strchr(z->endpoint, '[') != NULL &&
        (rv = zb_setint(z, s, ZMQ_IPV6, 1, "ZMQ_IPV6")))
        return rv;
    return BUS_OK;
}

static int
zb_new_socket(zb *z, int type, void **out)
{
    if (BUS_FAILPOINT("zmq.socket") != 0) {
        zb_logf(z, BUS_LOG_WARN, "zmq_socket: injected failure");
        return BUS_ENOMEM;
    }
    if ((*out = zmq_socket(z->zctx, type)) == NULL)
        return zb_zerr(z, "zmq_socket");
    return BUS_OK;
}

static int
zb_bind(zb *z, void *s, char *errbuf, size_t errbuf_len)
{
    size_t len = sizeof(z->endpoint);
    char ep[ZB_ENDPOINT_MAX];

    if (zmq_bind(s, z->endpoint) != 0) {
        int e = zmq_errno();
        zb_err(errbuf, errbuf_len, "bind %s: %s", z->endpoint, zmq_strerror(e));
        return zb_map_errno(e);
    }
    /* Read back what was bound: port 0 becomes a real port. */
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, ep, &len) == 0 && len > 1) {
        memcpy(z->endpoint, ep, len);
        z->endpoint[sizeof(z->endpoint) - 1] = '\0';
        zb_set_name(z);
    }
    return BUS_OK;
}

static int
zb_connect(zb *z, void *s, char *errbuf, size_t errbuf_len)
{
    if (zmq_connect(s, z->endpoint) != 0) {
        int e = zmq_errno();
        zb_err(errbuf, errbuf_len, "connect %s: %s", z->endpoint,
               zmq_strerror(e));
        return zb_map_errno(e);
    }
    return BUS_OK;
}

static int
zb_open_sockets(zb *z, char *errbuf, size_t errbuf_len)
{
    bool fan = z->o.mode == ZB_FANOUT, curve = z->o.curve;
    int rv;

    if (curve && z->o.bind && (rv = zb_zap_open(z)) != BUS_OK) {
        zb_err(errbuf, errbuf_len, "cannot start the ZAP handler");
        return rv;
    }
    if (z->o.bind) {
        /* The bound socket: XPUB sends (fanout), ROUTER receives. */
        void **bound = fan ? &z->send_sock : &z->recv_sock;
        void **loop = fan ? &z->recv_sock : &z->send_sock;
        if ((rv = zb_new_socket(z, fan ? ZMQ_XPUB : ZMQ_ROUTER, bound)) ||
            (rv = zb_sock_common(z, *bound, false)))
            return rv;
        if (fan && ((rv = zb_setint(z, *bound, ZMQ_XPUB_NODROP, 1,
                                    "ZMQ_XPUB_NODROP")) ||
                    (rv = zb_setint(z, *bound, ZMQ_XPUB_VERBOSER, 1,
                                    "ZMQ_XPUB_VERBOSER"))))
            return rv;
        if (!fan && ((rv = zb_setint(z, *bound, ZMQ_ROUTER_HANDOVER, 1,
                                     "ZMQ_ROUTER_HANDOVER")) ||
                     (rv = zb_setint(z, *bound, ZMQ_ROUTER_MANDATORY, 1,
                                     "ZMQ_ROUTER_MANDATORY"))))
            return rv;
        if (curve && (rv = zb_curve_server(z, *bound)))
            return rv;
        if ((rv = zb_bind(z, *bound, errbuf, errbuf_len)) != BUS_OK)
            return rv;
        /* The loopback socket: this broker's own subscriptions (fanout)
         * or publishes (reliable) go through its own endpoint. */
        if ((rv = zb_new_socket(z, fan ? ZMQ_XSUB : ZMQ_DEALER, loop)) ||
            (rv = zb_sock_common(z, *loop, true)))
            return rv;
        if (!fan &&
            (rv = zb_setint(z, *loop, ZMQ_IMMEDIATE, 1, "ZMQ_IMMEDIATE")))
            return rv;
        if (curve && (rv = zb_curve_client(z, *loop, true)))
            return rv;
        return zb_connect(z, *loop, errbuf, errbuf_len);
    }
    /* Connecting: XSUB receives (fanout), DEALER sends (reliable). */
    {
        void **s = fan ? &z->recv_sock : &z->send_sock;
        if ((rv = zb_new_socket(z, fan ? ZMQ_XSUB : ZMQ_DEALER, s)) ||
            (rv = zb_sock_common(z, *s, true)))
            return rv;
        if (!fan && (rv = zb_setint(z, *s, ZMQ_IMMEDIATE, 1, "ZMQ_IMMEDIATE")))
            return rv;
        if (z->o.routing_id != NULL &&
            zmq_setsockopt(*s, ZMQ_ROUTING_ID, z->o.routing_id,
                           strlen(z->o.routing_id)) != 0)
            return zb_zerr(z, "ZMQ_ROUTING_ID");
        if (curve && (rv = zb_curve_client(z, *s, false)))
            return rv;
        if (z->transport != ZB_INPROC &&
            (rv = zb_monitor_open(z, *s)) != BUS_OK)
            return rv;
        return zb_connect(z, *s, errbuf, errbuf_len);
    }
}

/* ---- Ops
 * ---------------------------------------------------------------------- */

static int
zb_init_common(void *priv, const bus_broker_config *cfg, bus_uri *uri,
               zb_transport tr, char *errbuf, size_t errbuf_len)
{
    zb *z = priv;
    size_t i;
    int rv;

    z->log = cfg->log;
    z->transport = tr;
    z->wake_fd[0] = z->wake_fd[1] = -1;
    atomic_init(&z->acks, NULL);
    snprintf(z->name, sizeof(z->name), "%s", uri->scheme);
    if ((rv = zb_endpoint(z, uri, errbuf, errbuf_len)) != BUS_OK ||
        (rv = zb_parse_opts(z, uri, errbuf, errbuf_len)) != BUS_OK)
        return rv;
    zb_set_name(z);
    if (z->o.curve && tr == ZB_INPROC) {
        zb_err(errbuf, errbuf_len,
               "CURVE needs tcp or ipc (inproc has no security mechanism)");
        return BUS_EINVAL;
    }
    bus_codec_limits_init(&z->limits);
    z->limits.max_frame = (size_t)z->o.max_msg_size;
    if (z->limits.max_payload > z->limits.max_frame)
        z->limits.max_payload = z->limits.max_frame;
    z->can_publish = true;
    z->max_pending = (size_t)z->o.window * ZB_PENDING_PER_WINDOW;

    bus__mutex_init(&z->mtx);
    bus__cond_init(&z->cond);
    z->sync_init = true;

    /* The queue: fanout bounds it by `queue`, reliable by the window. */
    z->credit_max = z->o.mode == ZB_FANOUT ? z->o.queue : z->o.window;
    z->nslots = zb_pow2((uint32_t)z->credit_max);
    z->mask = z->nslots - 1;
    if ((z->slots = bus__zalloc(z->nslots * sizeof(*z->slots))) == NULL)
        return BUS_ENOMEM;
    for (i = 0; i < z->nslots; i++) {
        atomic_init(&z->slots[i].seq, i);
        zmq_msg_init(&z->slots[i].p.env);
    }
    if (z->o.mode == ZB_RELIABLE && (rv = zb_rel_init(z)) != BUS_OK)
        return rv;

    if (pipe(z->wake_fd) != 0) {
        zb_err(errbuf, errbuf_len, "pipe: %s", strerror(errno));
        z->wake_fd[0] = z->wake_fd[1] = -1;
        return BUS_EUNAVAIL;
    }
    z->pipe_open = true;
    for (i = 0; i < 2; i++) {
        int fl = fcntl(z->wake_fd[i], F_GETFL);
        (void)fcntl(z->wake_fd[i], F_SETFL, fl | O_NONBLOCK);
        (void)fcntl(z->wake_fd[i], F_SETFD, FD_CLOEXEC);
    }
    if ((rv = zb_ctx_acquire(z)) != BUS_OK ||
        (rv = zb_open_sockets(z, errbuf, errbuf_len)) != BUS_OK)
        return rv;
    z->pubid = bus__random_u64() | 1;
    if (tr == ZB_INPROC) /* no monitor: inproc connects at once */
        atomic_store_explicit(&z->connected, true, memory_order_relaxed);
    if (z->o.wait_subscriber_ms > 0)
        z->hold_until_ns =
            bus__clock_mono_ns() + (uint64_t)z->o.wait_subscriber_ms * 1000000u;
    if ((rv = bus__thread_start(&z->io,
                                z->o.bind ? "bus-zmq-hub" : "bus-zmq-peer",
                                zb_io_main, z)) != BUS_OK) {
        zb_err(errbuf, errbuf_len, "cannot start the I/O thread");
        return rv;
    }
    z->io_started = true;
    zb_logf(z, BUS_LOG_DEBUG, "open: mode=%s %s",
            z->o.mode == ZB_FANOUT ? "fanout" : "reliable",
            z->o.bind ? "bound" : "connecting");
    return BUS_OK;
}

static int
zb_init_tcp(void *priv, const bus_broker_config *cfg, bus_uri *uri,
            char *errbuf, size_t errbuf_len)
{
    return zb_init_common(priv, cfg, uri, ZB_TCP, errbuf, errbuf_len);
}

static int
zb_init_ipc(void *priv, const bus_broker_config *cfg, bus_uri *uri,
            char *errbuf, size_t errbuf_len)
{
    return zb_init_common(priv, cfg, uri, ZB_IPC, errbuf, errbuf_len);
}

static int
zb_init_inproc(void *priv, const bus_broker_config *cfg, bus_uri *uri,
               char *errbuf, size_t errbuf_len)
{
    return zb_init_common(priv, cfg, uri, ZB_INPROC, errbuf, errbuf_len);
}

static int
zb_flush(void *priv, int32_t timeout_ms)
{
    zb *z = priv;
    uint64_t target, deadline;
    int rv = BUS_OK;

    target = atomic_load_explicit(&z->accepted, memory_order_seq_cst);
    if (atomic_load_explicit(&z->completed, memory_order_seq_cst) >= target)
        return BUS_OK;
    if (timeout_ms == 0 || zb_on_io(z))
        return BUS_ETIMEDOUT;
    deadline = zb_deadline(timeout_ms);
    bus__mutex_lock(&z->mtx);
    atomic_fetch_add_explicit(&z->waiters, 1, memory_order_seq_cst);
    while (atomic_load_explicit(&z->completed, memory_order_seq_cst) < target) {
        if (deadline == 0) {
            bus__cond_wait(&z->cond, &z->mtx);
        } else if (!bus__cond_wait_until(&z->cond, &z->mtx, deadline)) {
            if (atomic_load_explicit(&z->completed, memory_order_seq_cst) <
                target)
                rv = BUS_ETIMEDOUT;
            break;
        }
    }
    atomic_fetch_sub_explicit(&z->waiters, 1, memory_order_seq_cst);
    bus__mutex_unlock(&z->mtx);
    return rv;
}

static int
zb_health(void *priv, char *msg, size_t msg_len)
{
    zb *z = priv;

    if (!z->o.bind &&
        !atomic_load_explicit(&z->connected, memory_order_relaxed) &&
        z->transport != ZB_INPROC) {
        zb_err(msg, msg_len, "not connected to %s", z->endpoint);
        return BUS_EUNAVAIL;
    }
    if (msg != NULL && msg_len > 0)
        msg[0] = '\0';
    return BUS_OK;
}

static void
zb_close(void *priv)
{
    zb *z = priv;

    /* seq_cst: publish's check against its `active` increment (stop). */
    atomic_store_explicit(&z->closed, true, memory_order_seq_cst);
    if (z->sync_init) {
        bus__mutex_lock(&z->mtx);
        bus__cond_broadcast(&z->cond); /* blocked publishers give up */
        bus__mutex_unlock(&z->mtx);
    }
}

static void
zb_stop(void *priv)
{
    zb *z = priv;

    if (!z->io_started)
        return;
    /* A publish that got past the closed check before close may still
     * be filling a slot: let it commit, so the final drain sees it. */
    while (atomic_load_explicit(&z->active, memory_order_seq_cst) != 0)
        bus__thread_yield();
    /* release: the I/O thread sees everything before it (acquire). */
    atomic_store_explicit(&z->stopping, true, memory_order_release);
    zb_wake(z);
    bus__thread_join(&z->io);
    z->io_started = false;
}

static void
zb_close_sock(void **s)
{
    if (*s != NULL) {
        zmq_close(*s);
        *s = NULL;
    }
}

static void
zb_fini(void *priv)
{
    zb *z = priv;
    size_t i;

    z->stopped = true;
    if (z->mon_of != NULL)
        (void)zmq_socket_monitor(z->mon_of, NULL, 0);
    zb_close_sock(&z->mon);
    zb_close_sock(&z->send_sock);
    zb_close_sock(&z->recv_sock);
    zb_close_sock(&z->zap);
    for (i = 0; i < z->nsubs; i++) {
        if (z->o.mode == ZB_RELIABLE)
            zb_rel_sub_dead(z, z->subs[i]);
        zb_sub_free(z->subs[i]);
    }
    if (z->nsubs > 0)
        zb_logf(z, BUS_LOG_DEBUG, "closed with %zu subscription(s) open",
                z->nsubs);
    bus__free(z->subs, z->cap_subs * sizeof(*z->subs));
    z->subs = NULL;
    z->nsubs = z->cap_subs = 0;
    if (z->o.mode == ZB_RELIABLE)
        zb_rel_fini(z);
    if (z->slots != NULL) {
        for (i = 0; i < z->nslots; i++)
            zb_pub_clear(&z->slots[i].p);
        for (i = 0; i < z->nslots; i++)
            zmq_msg_close(&z->slots[i].p.env);
        bus__free(z->slots, z->nslots * sizeof(*z->slots));
        z->slots = NULL;
    }
    zb_prefixes_free(&z->my_prefixes);
    zb_prefixes_free(&z->their_prefixes);
    zb_ctx_release(z);
    if (z->pipe_open) {
        close(z->wake_fd[0]);
        close(z->wake_fd[1]);
        z->pipe_open = false;
    }
    if (z->sync_init) {
        bus__cond_fini(&z->cond);
        bus__mutex_fini(&z->mtx);
        z->sync_init = false;
    }
    bus__strfree(z->o.routing_id);
    bus__strfree(z->o.dead_letter);
    bus__strfree(z->o.zap_domain);
    z->o.routing_id = z->o.dead_letter = z->o.zap_domain = NULL;
    zb_curve_wipe(&z->o);
}

/* Listed by brokers/zmq/CMakeLists.txt (bus_add_builtin_broker), so the
 * library registers them at first use. */
#define ZB_OPS(sym, sch, initfn)                                               \
    const bus_broker_ops sym = {                                               \
        .version = BUS_BROKER_OPS_VERSION,                                     \
        .scheme = sch,                                                         \
        .priv_size = sizeof(zb),                                               \
        .init = initfn,                                                        \
        .publish = zb_publish,                                                 \
        .subscribe = zb_subscribe,                                             \
        .unsubscribe = zb_unsubscribe,                                         \
        .ack = zb_rel_ack,                                                     \
        .flush = zb_flush,                                                     \
        .health = zb_health,                                                   \
        .close = zb_close,                                                     \
        .stop = zb_stop,                                                       \
        .fini = zb_fini,                                                       \
    }

ZB_OPS(bus_broker_zmq_tcp_ops, "zmq+tcp", zb_init_tcp);
ZB_OPS(bus_broker_zmq_ipc_ops, "zmq+ipc", zb_init_ipc);
ZB_OPS(bus_broker_zmq_inproc_ops, "zmq+inproc", zb_init_inproc);

/* ---- Public extras (bus/broker_zmq.h)
 * ---------------------------------------- */

static zb *
zb_of(const bus_broker *b)
{
    if (b == NULL || (b->ops != &bus_broker_zmq_tcp_ops &&
                      b->ops != &bus_broker_zmq_ipc_ops &&
                      b->ops != &bus_broker_zmq_inproc_ops))
        return NULL;
    return b->priv;
}

int
bus_broker_zmq_stats_get(const bus_broker *b, bus_broker_zmq_stats *st)
{
    const zb *z = zb_of(b);

    if (z == NULL || st == NULL)
        return BUS_EINVAL;
#define ZB_LD(f) atomic_load_explicit(&z->st.f, memory_order_relaxed)
    st->published = atomic_load_explicit(&z->accepted, memory_order_relaxed);
    st->sent = ZB_LD(sent);
    st->delivered = ZB_LD(delivered);
    st->dropped_hwm = ZB_LD(dropped_hwm);
    st->hwm_waits = ZB_LD(hwm_waits);
    st->dropped_late = ZB_LD(dropped_late);
    st->dropped_queue = ZB_LD(dropped_queue);
    st->dropped_upstream = ZB_LD(dropped_upstream);
    st->forwarded = ZB_LD(forwarded);
    st->bad_frames = ZB_LD(bad_frames);
    st->resent = ZB_LD(resent);
    st->duplicates_dropped = ZB_LD(duplicates_dropped);
    st->acked = ZB_LD(acked);
    st->unrouted = ZB_LD(unrouted);
    st->auth_denied = ZB_LD(auth_denied);
    st->reconnects = ZB_LD(reconnects);
    st->subscribers = ZB_LD(subscribers);
#undef ZB_LD
    st->inflight = atomic_load_explicit(&z->credits, memory_order_relaxed);
    return BUS_OK;
}

const char *
bus_broker_zmq_endpoint(const bus_broker *b)
{
    const zb *z = zb_of(b);

    return z != NULL ? z->endpoint : NULL;
}

int
bus_broker_zmq_wait_subscribers(bus_broker *b, uint64_t n, int32_t timeout_ms)
{
    zb *z = zb_of(b);
    uint64_t deadline;
    int rv = BUS_OK;

    if (z == NULL || z->o.mode != ZB_FANOUT || !z->o.bind || zb_on_io(z))
        return BUS_EINVAL;
    deadline = zb_deadline(timeout_ms);
    bus__mutex_lock(&z->mtx);
    atomic_fetch_add_explicit(&z->waiters, 1, memory_order_seq_cst);
    while (atomic_load_explicit(&z->st.subscribers, memory_order_seq_cst) < n) {
        if (atomic_load_explicit(&z->closed, memory_order_acquire)) {
            rv = BUS_ECLOSED;
            break;
        }
        if (deadline == 0) {
            bus__cond_wait(&z->cond, &z->mtx);
        } else if (!bus__cond_wait_until(&z->cond, &z->mtx, deadline)) {
            if (atomic_load_explicit(&z->st.subscribers, memory_order_seq_cst) <
                n)
                rv = BUS_ETIMEDOUT;
            break;
        }
    }
    atomic_fetch_sub_explicit(&z->waiters, 1, memory_order_seq_cst);
    bus__mutex_unlock(&z->mtx);
    return rv;
}

int
bus_broker_zmq_keypair(char public_z85[41], char secret_z85[41])
{
    if (public_z85 == NULL || secret_z85 == NULL)
        return BUS_EINVAL;
    if (!zmq_has("curve"))
        return BUS_ENOTSUP;
    if (zmq_curve_keypair(public_z85, secret_z85) != 0)
        return BUS_ENOTSUP;
    return BUS_OK;
}
