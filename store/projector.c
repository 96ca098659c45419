/*
 * Projectors: named subscriptions to $all whose handlers update read-model
 * state, committed together with the projector's checkpoint.
 *
 * Design:
 * - Exactly once with respect to state: the handler writes through the
 *   projector's transaction (bus_projector_txn), and after each batch the
 *   transaction's operations, the dead-letter records of the batch and the
 *   checkpoint "$projector/<name>" = last position handled go into one
 *   RocksDB write. A crash loses the whole uncommitted batch, state and
 *   checkpoint together, and the restart reads from the checkpoint: no
 *   event is skipped and none applied twice.
 * - The state lives under the projector's key prefix in the application
 *   family, so reset deletes it with one range delete (with the
 *   checkpoint and dead letters, in one write).
 * - Per event a save point (the transaction's length): RETRY or
 *   dead-lettering truncates back to it, so a failed attempt leaves no
 *   writes. Before waiting a backoff, the events already handled are
 *   committed, so a long retry does not hold them.
 * - Dead letters: REJECT, or RETRY on the last attempt, records
 *   'd' name 0 position -> (code, attempts, message) in the checkpoints
 *   family in the same write as the checkpoint that moves past the event,
 *   counts it and signals DEAD_LETTER; with on_fail STOP the projector
 *   commits what precedes the event, signals STOPPED and waits for
 *   resume (which retries the event) or close.
 * - Control (pause, resume, reset, stop) are flags under the store's
 *   ev_mtx, looked at between batches and between events; the projector's
 *   thread acknowledges on ack_cond.
 *
 * @thread the projector's own, except the control functions (any thread
 * but the projector's handler).
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "delivery.h"
#include "event_impl.h"
#include "store_impl.h"
#include "testing.h"

#define PROJ_MAX_NAME 200u
#define PROJ_CKPT_PREFIX "$projector/"

struct bus_projector {
    store_worker w; /* first: the store's registry holds &w */
    bus_store *s;
    bus_projector_config cfg;
    char *name, *prefix;
    size_t name_size, nlen, prefix_size, plen;
    char ckpt[STORE_MAX_NAME + 1]; /* "$projector/<name>" */
    size_t ckpt_len;
    store_fcopy fc;
    store_filter f;
    bus_store_txn txn;
    rocksdb_writebatch_t *wb;
    bus__thread th;
    bool started;
    /* Control, under s->ev_mtx. */
    bus__cond ack;
    bool stop, pause_req, paused, reset_req, exited, failed;
    uint64_t reset_gen;
    int reset_rv;
    uint64_t ckpt_pos; /* committed */
    int err;
    /* Statistics. */
    _Atomic uint64_t applied, retries, dead, commits;
};

/* The projector whose handler runs on this thread, and its delivery. */
static _Thread_local bus_projector *proj_tl;
static _Thread_local bus_delivery *proj_tl_d;

void
bus_projector_config_init(bus_projector_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->batch_size = 128;
    bus__store_retry_defaults(&cfg->retry);
}

bus_store_txn *
bus_projector_txn(bus_delivery *d)
{
    if (d == NULL || proj_tl == NULL || proj_tl_d != d)
        return NULL;
    return &proj_tl->txn;
}

static void
proj_signal(bus_projector *p, bus_store_signal sig, bus_event *e, int err,
            const char *msg, uint32_t attempts, uint64_t pos)
{
    bus_store_signal_info info;

    if (p->cfg.on_signal == NULL)
        return;
    memset(&info, 0, sizeof(info));
    info.name = p->name;
    info.position = pos;
    info.head = bus_store_head(p->s);
    info.event = e;
    info.err = err;
    info.msg = msg != NULL ? msg : "";
    info.attempts = attempts;
    p->cfg.on_signal(p->cfg.signal_opaque, sig, &info);
}

/* True when the projector must leave its batch (under ev_mtx). */
static bool
proj_interrupted(void *arg)
{
    bus_projector *p = arg;

    return p->stop || p->pause_req || p->reset_req;
}

static bool
proj_interrupted_now(bus_projector *p)
{
    bool r;

    bus__mutex_lock(&p->s->ev_mtx);
    r = proj_interrupted(p);
    bus__mutex_unlock(&p->s->ev_mtx);
    return r;
}

static void
proj_ckpt_key(const bus_projector *p, uint8_t *k, size_t *klen)
{
    k[0] = 'c';
    memcpy(k + 1, p->ckpt, p->ckpt_len);
    *klen = p->ckpt_len + 1;
}

/* Writes the transaction and the checkpoint upto in one write. */
static int
proj_commit(bus_projector *p, uint64_t upto)
{
    bus_store *s = p->s;
    uint8_t k[STORE_MAX_NAME + 2], v[8];
    size_t klen;
    int rv;

    if (upto == p->ckpt_pos && p->txn.nops == 0)
        return BUS_OK;
    rocksdb_writebatch_clear(p->wb);
    bus__store_emit_ops(s, p->wb, p->txn.ops, p->txn.nops, p->txn.bytes.p);
    proj_ckpt_key(p, k, &klen);
    store_put_be64(v, upto);
    rocksdb_writebatch_put_cf(p->wb, s->cf[CF_CHECKPOINTS], (const char *)k,
                              klen, (const char *)v, 8);
    if ((rv = BUS_FAILPOINT("store.projector.commit")) == 0)
        rv = bus__store_write_direct(s, p->wb,
                                     s->cfg.durability == BUS_STORE_ALWAYS);
    bus__store_txn_clear(&p->txn);
    if (rv != BUS_OK) {
        bus__store_logf(s, BUS_LOG_ERR,
                        "projector %s: commit failed: %s; "
                        "replaying from %llu",
                        p->name, bus_strerror(rv),
                        (unsigned long long)p->ckpt_pos);
        return rv;
    }
    atomic_fetch_add_explicit(&p->commits, 1, memory_order_relaxed);
    bus__mutex_lock(&s->ev_mtx);
    p->ckpt_pos = upto;
    bus__cond_broadcast(&p->ack);
    bus__mutex_unlock(&s->ev_mtx);
    return BUS_OK;
}

static int
proj_dead_letter(bus_projector *p, uint64_t pos, int err, uint32_t attempts,
                 const char *msg)
{
    uint8_t k[STORE_MAX_NAME + 16], v[8 + BUS_DELIVERY_MSG_MAX];
    size_t ml = strlen(msg);

    if (ml > BUS_DELIVERY_MSG_MAX)
        ml = BUS_DELIVERY_MSG_MAX;
    k[0] = 'd';
    memcpy(k + 1, p->name, p->nlen);
    k[p->nlen + 1] = 0;
    store_put_be64(k + p->nlen + 2, pos);
    store_put_be32(v, (uint32_t)err);
    store_put_be32(v + 4, attempts);
    memcpy(v + 8, msg, ml);
    return bus__store_txn_put_raw(&p->txn, CF_CHECKPOINTS, k, p->nlen + 10,
                                  NULL, 0, v, 8 + ml, false);
}

/* Deletes the projector's state, checkpoint and dead letters. */
static int
proj_do_reset(bus_projector *p)
{
    bus_store *s = p->s;
    uint8_t k[STORE_MAX_NAME + 2], lo[STORE_MAX_NAME + 2],
        hi[STORE_MAX_NAME + 2];
    uint8_t *end;
    size_t klen, elen;
    int rv;

    bus__store_txn_clear(&p->txn);
    rocksdb_writebatch_clear(p->wb);
    /* State: [prefix, successor(prefix)). */
    if ((end = bus__alloc(p->plen)) == NULL)
        return BUS_ENOMEM;
    memcpy(end, p->prefix, p->plen);
    elen = p->plen;
    while (elen > 0 && end[elen - 1] == 0xff)
        elen--;
    end[elen - 1]++; /* open() refused an all-0xff prefix */
    rocksdb_writebatch_delete_range_cf(p->wb, s->cf[CF_APP], p->prefix, p->plen,
                                       (const char *)end, elen);
    bus__free(end, p->plen);
    proj_ckpt_key(p, k, &klen);
    rocksdb_writebatch_delete_cf(p->wb, s->cf[CF_CHECKPOINTS], (const char *)k,
                                 klen);
    lo[0] = hi[0] = 'd';
    memcpy(lo + 1, p->name, p->nlen);
    memcpy(hi + 1, p->name, p->nlen);
    lo[p->nlen + 1] = 0;
    hi[p->nlen + 1] = 1;
    rocksdb_writebatch_delete_range_cf(p->wb, s->cf[CF_CHECKPOINTS],
                                       (const char *)lo, p->nlen + 2,
                                       (const char *)hi, p->nlen + 2);
    rv = bus__store_write_direct(s, p->wb, s->cfg.durability != BUS_STORE_NONE);
    if (rv == BUS_OK) {
        bus__mutex_lock(&s->ev_mtx);
        p->ckpt_pos = 0;
        bus__mutex_unlock(&s->ev_mtx);
        bus__store_logf(s, BUS_LOG_INFO, "projector %s: reset", p->name);
    }
    return rv;
}

/* Handles one event. Returns BUS_OK (applied or dead-lettered and
 * skipped), BUS_ECANCELED (interrupted: not handled, nothing of it in the
 * transaction), BUS_EAGAIN (a commit before a backoff failed: replay) or
 * the STOP policy's code (not handled). */
static int
proj_event(bus_projector *p, bus_event *e, uint64_t prev_pos)
{
    bus_delivery d;
    uint32_t attempt = 1;
    size_t sp_ops, sp_bytes;
    bus_result res;
    int code;

    for (;;) {
        sp_ops = p->txn.nops;
        sp_bytes = p->txn.bytes.len;
        bus__delivery_init(&d, e, "", p->name, attempt, 0, p);
        proj_tl = p;
        proj_tl_d = &d;
        res = p->cfg.handler(&d, p->cfg.opaque);
        proj_tl = NULL;
        proj_tl_d = NULL;
        if (res == BUS_ACK) {
            atomic_fetch_add_explicit(&p->applied, 1, memory_order_relaxed);
            return BUS_OK;
        }
        bus__store_txn_truncate(&p->txn, sp_ops, sp_bytes);
        if (res == BUS_RETRY && attempt < p->cfg.retry.max_attempts) {
            uint64_t dl;
            atomic_fetch_add_explicit(&p->retries, 1, memory_order_relaxed);
            /* Commit what precedes: a long backoff must not hold it. */
            if (proj_commit(p, prev_pos) != BUS_OK)
                return BUS_EAGAIN;
            dl = bus__clock_mono_ns() +
                 bus__store_backoff_ns(&p->cfg.retry, attempt);
            if (!bus__store_sleep(p->s, dl, proj_interrupted, p))
                return BUS_ECANCELED;
            attempt++;
            continue;
        }
        code = d.err_code ? d.err_code : BUS_ECANCELED;
        bus__store_logf(p->s, BUS_LOG_WARN,
                        "projector %s: event at %llu %s after %u "
                        "attempt(s): %s",
                        p->name, (unsigned long long)bus_event_position(e),
                        p->cfg.retry.on_fail == BUS_STORE_ON_FAIL_STOP
                            ? "stops the projector"
                            : "dead-lettered",
                        attempt, d.err_msg);
        if (p->cfg.retry.on_fail == BUS_STORE_ON_FAIL_STOP) {
            proj_signal(p, BUS_STORE_STOPPED, e, code, d.err_msg, attempt,
                        bus_event_position(e));
            return code;
        }
        if (proj_dead_letter(p, bus_event_position(e), code, attempt,
                             d.err_msg) != BUS_OK)
            return BUS_EAGAIN;
        atomic_fetch_add_explicit(&p->dead, 1, memory_order_relaxed);
        proj_signal(p, BUS_STORE_DEAD_LETTER, e, code, d.err_msg, attempt,
                    bus_event_position(e));
        return BUS_OK;
    }
}

/* Waits for a control change or (when live) a new head. */
static void
proj_idle(bus_projector *p, bool wait_head, uint64_t head0)
{
    bus_store *s = p->s;

    bus__mutex_lock(&s->ev_mtx);
    while (!proj_interrupted(p) &&
           (!wait_head ||
            atomic_load_explicit(&s->head, memory_order_acquire) == head0) &&
           (wait_head || p->failed))
        bus__cond_wait(&s->ev_cond, &s->ev_mtx);
    bus__mutex_unlock(&s->ev_mtx);
}

static void
proj_main(void *arg)
{
    bus_projector *p = arg;
    bus_store *s = p->s;
    bus_store_slice sl;
    uint64_t pos;
    int rv;

    memset(&sl, 0, sizeof(sl));
    for (;;) {
        uint64_t head0, upto;
        size_t i;
        bool interrupted = false;

        /* Control, between batches (nothing uncommitted here). */
        bus__mutex_lock(&s->ev_mtx);
        if (p->reset_req) {
            bus__mutex_unlock(&s->ev_mtx);
            rv = proj_do_reset(p);
            bus__mutex_lock(&s->ev_mtx);
            p->reset_req = false;
            p->reset_rv = rv;
            p->failed = false;
            p->err = BUS_OK;
            p->reset_gen++;
            bus__cond_broadcast(&p->ack);
        }
        if (p->stop) {
            bus__mutex_unlock(&s->ev_mtx);
            break;
        }
        if (p->pause_req) {
            p->paused = true;
            bus__cond_broadcast(&p->ack);
            while (p->pause_req && !p->stop && !p->reset_req)
                bus__cond_wait(&s->ev_cond, &s->ev_mtx);
            p->paused = false;
            bus__mutex_unlock(&s->ev_mtx);
            continue;
        }
        if (p->failed) {
            bus__mutex_unlock(&s->ev_mtx);
            proj_idle(p, false, 0);
            continue;
        }
        pos = p->ckpt_pos;
        bus__mutex_unlock(&s->ev_mtx);

        head0 = bus_store_head(s);
        bus__store_slice_clear(&sl);
        rv = bus__store_read_all(s, pos + 1, BUS_STORE_FORWARD,
                                 p->cfg.batch_size,
                                 (size_t)p->cfg.batch_size * 64, &p->f, &sl);
        if (rv != BUS_OK) {
            bus__store_logf(s, BUS_LOG_ERR, "projector %s: read: %s", p->name,
                            bus_strerror(rv));
            bus__mutex_lock(&s->ev_mtx);
            p->failed = true;
            p->err = rv;
            bus__cond_broadcast(&p->ack);
            bus__mutex_unlock(&s->ev_mtx);
            proj_signal(p, BUS_STORE_STOPPED, NULL, rv, bus_strerror(rv), 0,
                        pos);
            continue;
        }
        upto = pos;
        rv = BUS_OK;
        for (i = 0; i < sl.count; i++) {
            bus_event *e = sl.events[i];
            if (proj_interrupted_now(p)) {
                interrupted = true;
                break;
            }
            rv = proj_event(p, e, upto);
            if (rv != BUS_OK)
                break;
            upto = bus_event_position(e);
        }
        if (rv == BUS_ECANCELED) {
            interrupted = true;
            rv = BUS_OK;
        }
        if (rv == BUS_EAGAIN) {
            /* A commit failed: its transaction is gone; replay from the
             * checkpoint after a pause. */
            bus__store_txn_clear(&p->txn);
            bus__store_sleep(s, bus__clock_mono_ns() + 100000000u,
                             proj_interrupted, p);
            continue;
        }
        if (rv == BUS_OK && !interrupted && sl.next > 0 && sl.next - 1 > upto)
            upto = sl.next - 1; /* past what the filter skipped */
        if (proj_commit(p, upto) != BUS_OK) {
            bus__store_sleep(s, bus__clock_mono_ns() + 100000000u,
                             proj_interrupted, p);
            continue;
        }
        if (rv != BUS_OK) {
            /* on_fail STOP: wait for resume (retries the event) or close */
            bus__mutex_lock(&s->ev_mtx);
            p->failed = true;
            p->err = rv;
            bus__cond_broadcast(&p->ack); /* bus_projector_wait returns */
            bus__mutex_unlock(&s->ev_mtx);
            continue;
        }
        if (!interrupted && sl.end)
            proj_idle(p, true, head0);
    }
    bus_store_slice_free(&sl);
    bus__store_txn_clear(&p->txn);
    bus__mutex_lock(&s->ev_mtx);
    p->exited = true;
    bus__cond_broadcast(&p->ack);
    bus__mutex_unlock(&s->ev_mtx);
}

static void
proj_free(bus_projector *p)
{
    if (p->name != NULL)
        bus__free(p->name, p->name_size);
    if (p->prefix != NULL)
        bus__free(p->prefix, p->prefix_size);
    bus__store_fcopy_fini(&p->fc);
    p->txn.projector = false;
    bus__store_txn_fini(&p->txn);
    if (p->wb != NULL)
        rocksdb_writebatch_destroy(p->wb);
    bus__cond_fini(&p->ack);
    bus__free(p, sizeof(*p));
}

static void
proj_w_stop(store_worker *w)
{
    /* @locks ev_mtx held (store close) or taken here. */
    ((bus_projector *)w)->stop = true;
}

static void
proj_w_destroy(store_worker *w)
{
    bus_projector *p = (bus_projector *)w;
    bus_store *s = p->s;

    bus__mutex_lock(&s->ev_mtx);
    p->stop = true;
    bus__cond_broadcast(&s->ev_cond);
    bus__mutex_unlock(&s->ev_mtx);
    if (p->started)
        bus__thread_join(&p->th);
    proj_free(p);
}

int
bus_projector_open(bus_projector **out, bus_store *s,
                   const bus_projector_config *cfg)
{
    bus_projector *p;
    bus_projector_config def;
    store_worker *w;
    size_t n;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (s == NULL || cfg == NULL || cfg->handler == NULL)
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if ((p = bus__zalloc(sizeof(*p))) == NULL)
        return BUS_ENOMEM;
    bus__cond_init(&p->ack);
    p->s = s;
    n = cfg->size ? cfg->size : sizeof(*cfg);
    memcpy(&p->cfg, cfg, n < sizeof(*cfg) ? n : sizeof(*cfg));
    bus_projector_config_init(&def);
    if (p->cfg.batch_size == 0)
        p->cfg.batch_size = def.batch_size;
    bus__store_retry_defaults(&p->cfg.retry);
    bus__store_txn_init(&p->txn, s);
    rv = BUS_EINVAL;
    if (!bus__store_name_ok(cfg->name, &p->nlen, PROJ_MAX_NAME))
        goto fail;
    if (cfg->state_prefix != NULL) {
        size_t i, pl = strlen(cfg->state_prefix);
        for (i = 0; i < pl && (uint8_t)cfg->state_prefix[i] == 0xff; i++)
            ;
        if (pl == 0 || i == pl)
            goto fail;
    }
    rv = BUS_ENOMEM;
    if ((p->name = bus__strdup(cfg->name, &p->name_size)) == NULL)
        goto fail;
    if (cfg->state_prefix != NULL) {
        if ((p->prefix = bus__strdup(cfg->state_prefix, &p->prefix_size)) ==
            NULL)
            goto fail;
        p->plen = p->prefix_size - 1;
    } else {
        p->prefix_size = p->nlen + 2;
        if ((p->prefix = bus__alloc(p->prefix_size)) == NULL)
            goto fail;
        memcpy(p->prefix, p->name, p->nlen);
        p->prefix[p->nlen] = '/';
        p->prefix[p->nlen + 1] = '\0';
        p->plen = p->nlen + 1;
    }
    p->ckpt_len = (size_t)snprintf(p->ckpt, sizeof(p->ckpt), "%s%s",
                                   PROJ_CKPT_PREFIX, p->name);
    if ((rv = bus__store_fcopy_init(&p->fc, &cfg->filter)) != BUS_OK)
        goto fail;
    bus__store_fcopy_filter(&p->fc, &p->f);
    p->txn.prefix = (const uint8_t *)p->prefix;
    p->txn.plen = p->plen;
    p->txn.projector = true;
    p->wb = rocksdb_writebatch_create();
    rv = bus_store_checkpoint_get(s, p->ckpt, &p->ckpt_pos);
    if (rv == BUS_ENOTFOUND)
        p->ckpt_pos = 0;
    else if (rv != BUS_OK)
        goto fail;
    p->pause_req = cfg->start_paused;
    p->w.stop = proj_w_stop;
    p->w.destroy = proj_w_destroy;
    p->w.is_projector = true;
    p->w.name = p->name;

    bus__mutex_lock(&s->ev_mtx);
    rv = BUS_OK;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        rv = BUS_ECLOSED;
    for (w = s->workers.next; rv == BUS_OK && w != &s->workers; w = w->next)
        if (w->is_projector && strcmp(w->name, p->name) == 0)
            rv = BUS_EEXIST;
    if (rv == BUS_OK && (rv = bus__thread_start(&p->th, "bus-projector",
                                                proj_main, p)) == BUS_OK) {
        p->started = true;
        bus__store_worker_add(s, &p->w);
    }
    bus__mutex_unlock(&s->ev_mtx);
    if (rv != BUS_OK)
        goto fail;
    *out = p;
    return BUS_OK;
fail:
    proj_free(p);
    return rv;
}

void
bus_projector_close_async(bus_projector *p)
{
    if (p == NULL)
        return;
    bus__mutex_lock(&p->s->ev_mtx);
    p->stop = true;
    bus__cond_broadcast(&p->s->ev_cond);
    bus__mutex_unlock(&p->s->ev_mtx);
}

void
bus_projector_close(bus_projector *p)
{
    if (p == NULL)
        return;
    bus__mutex_lock(&p->s->ev_mtx);
    bus__store_worker_remove(p->s, &p->w);
    bus__mutex_unlock(&p->s->ev_mtx);
    proj_w_destroy(&p->w);
}

int
bus_projector_pause(bus_projector *p)
{
    bus_store *s;

    if (p == NULL)
        return BUS_EINVAL;
    if (proj_tl == p)
        return BUS_EBUSY;
    s = p->s;
    bus__mutex_lock(&s->ev_mtx);
    p->pause_req = true;
    bus__cond_broadcast(&s->ev_cond);
    while (!p->paused && !p->exited && !p->stop)
        bus__cond_wait(&p->ack, &s->ev_mtx);
    bus__mutex_unlock(&s->ev_mtx);
    return p->paused ? BUS_OK : BUS_ECLOSED;
}

int
bus_projector_resume(bus_projector *p)
{
    bus_store *s;
    int rv = BUS_OK;

    if (p == NULL)
        return BUS_EINVAL;
    if (proj_tl == p)
        return BUS_EBUSY;
    s = p->s;
    bus__mutex_lock(&s->ev_mtx);
    if (p->exited || p->stop)
        rv = BUS_ECLOSED;
    p->pause_req = false;
    p->failed = false;
    p->err = BUS_OK;
    bus__cond_broadcast(&s->ev_cond);
    bus__mutex_unlock(&s->ev_mtx);
    return rv;
}

int
bus_projector_reset(bus_projector *p)
{
    bus_store *s;
    uint64_t gen;
    int rv;

    if (p == NULL)
        return BUS_EINVAL;
    if (proj_tl == p)
        return BUS_EBUSY;
    s = p->s;
    bus__mutex_lock(&s->ev_mtx);
    if (p->exited || p->stop) {
        bus__mutex_unlock(&s->ev_mtx);
        return BUS_ECLOSED;
    }
    gen = p->reset_gen;
    p->reset_req = true;
    bus__cond_broadcast(&s->ev_cond);
    while (p->reset_gen == gen && !p->exited)
        bus__cond_wait(&p->ack, &s->ev_mtx);
    rv = p->reset_gen != gen ? p->reset_rv : BUS_ECLOSED;
    bus__mutex_unlock(&s->ev_mtx);
    return rv;
}

int
bus_projector_wait(bus_projector *p, uint64_t position, int32_t timeout_ms)
{
    bus_store *s;
    uint64_t dl;
    int rv = BUS_OK;

    if (p == NULL)
        return BUS_EINVAL;
    s = p->s;
    dl = timeout_ms < 0
             ? UINT64_MAX
             : bus__clock_mono_ns() + (uint64_t)timeout_ms * 1000000u;
    bus__mutex_lock(&s->ev_mtx);
    while (p->ckpt_pos < position) {
        if (p->exited || p->stop || p->failed) {
            rv = BUS_ECANCELED;
            break;
        }
        if (timeout_ms < 0) {
            bus__cond_wait(&p->ack, &s->ev_mtx);
        } else if (!bus__cond_wait_until(&p->ack, &s->ev_mtx, dl) &&
                   p->ckpt_pos < position) {
            rv = BUS_ETIMEDOUT;
            break;
        }
    }
    bus__mutex_unlock(&s->ev_mtx);
    return rv;
}

void
bus_projector_stats_get(bus_projector *p, bus_projector_stats *st)
{
    memset(st, 0, sizeof(*st));
    if (p == NULL)
        return;
    st->head = bus_store_head(p->s);
    bus__mutex_lock(&p->s->ev_mtx);
    st->checkpoint = p->ckpt_pos;
    st->paused = p->paused;
    st->stopped = p->failed || p->exited;
    st->err = p->err;
    bus__mutex_unlock(&p->s->ev_mtx);
    st->lag = st->head > st->checkpoint ? st->head - st->checkpoint : 0;
    st->applied = atomic_load(&p->applied);
    st->retries = atomic_load(&p->retries);
    st->dead_letters = atomic_load(&p->dead);
    st->commits = atomic_load(&p->commits);
}
