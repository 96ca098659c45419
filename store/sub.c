/*
 * Catch-up subscriptions: a thread per subscription that reads the log
 * from its position and calls the handler, forever.
 *
 * Design:
 * - One mechanism for history and live events: the subscription always
 *   reads the log (or the stream's index) in batches after the last
 *   position it handled. When a read reaches the end of what is visible it
 *   signals CAUGHT_UP (once per switch) and sleeps on the store's commit
 *   condition until the head moves. There is no hand-over between a
 *   "catch-up" reader and a "live" queue, so no gap and no duplicate can
 *   appear at the switch, whatever the appends racing it.
 * - No lost wake-up: the head is read before each read; the writer stores
 *   a new head after its write becomes visible, under ev_mtx, and
 *   broadcasts. If anything became visible after our read began, the head
 *   differs from the value read before it, so the wait loop (which checks
 *   the head under ev_mtx) does not sleep.
 * - Bounded memory: at most batch_size events are held. A live subscriber
 *   more than max_live_lag positions behind the head signals FELL_BEHIND
 *   and is catching up again (it reads the same way; only the signal
 *   differs), and CAUGHT_UP follows when it reaches the head.
 * - Handler results follow handler.h: RETRY waits an exponential backoff
 *   with jitter and calls again (attempt + 1); REJECT or the last RETRY
 *   dead-letters (counter and DEAD_LETTER signal), then skips the event or
 *   stops (retry.on_fail).
 *
 * @thread the subscription's own; control fields are atomics, waits use
 * the store's ev_mtx/ev_cond.
 */
#include <string.h>

#include "alloc.h"
#include "delivery.h"
#include "store_impl.h"
#include "testing.h"

/* ---- Shared with projectors ---------------------------------------------- */

int
bus__store_fcopy_init(store_fcopy *fc, const bus_store_filter *in)
{
    size_t i, n = 0;

    memset(fc, 0, sizeof(*fc));
    if (in == NULL)
        return BUS_OK;
    if (in->stream_prefix != NULL && in->stream_prefix[0] != '\0' &&
        (fc->prefix = bus__strdup(in->stream_prefix, &fc->prefix_size)) == NULL)
        return BUS_ENOMEM;
    if (in->types == NULL)
        return BUS_OK;
    while (in->types[n] != NULL)
        n++;
    fc->types = bus__zalloc((n + 1) * sizeof(*fc->types));
    fc->type_sizes = bus__zalloc((n + 1) * sizeof(*fc->type_sizes));
    if (fc->types == NULL || fc->type_sizes == NULL) {
        bus__free(fc->types, (n + 1) * sizeof(*fc->types));
        bus__free(fc->type_sizes, (n + 1) * sizeof(*fc->type_sizes));
        fc->types = NULL;
        fc->type_sizes = NULL;
        return BUS_ENOMEM;
    }
    fc->n_types = n;
    for (i = 0; i < n; i++)
        if ((fc->types[i] = bus__strdup(in->types[i], &fc->type_sizes[i])) ==
            NULL)
            return BUS_ENOMEM;
    return BUS_OK;
}

void
bus__store_fcopy_fini(store_fcopy *fc)
{
    size_t i;

    if (fc->prefix != NULL)
        bus__free(fc->prefix, fc->prefix_size);
    if (fc->types != NULL) {
        for (i = 0; i < fc->n_types; i++)
            if (fc->types[i] != NULL)
                bus__free(fc->types[i], fc->type_sizes[i]);
        bus__free(fc->types, (fc->n_types + 1) * sizeof(*fc->types));
        bus__free(fc->type_sizes, (fc->n_types + 1) * sizeof(*fc->type_sizes));
    }
    memset(fc, 0, sizeof(*fc));
}

void
bus__store_fcopy_filter(const store_fcopy *fc, store_filter *out)
{
    bus_store_filter bf;

    bf.stream_prefix = fc->prefix;
    bf.types = (const char *const *)fc->types;
    bus__store_filter_init(out, &bf);
}

void
bus__store_retry_defaults(bus_store_retry *r)
{
    if (r->max_attempts == 0)
        r->max_attempts = 3;
    if (r->backoff_ms <= 0)
        r->backoff_ms = 10;
    if (r->backoff_max_ms <= 0)
        r->backoff_max_ms = 1000;
    if (r->backoff_max_ms < r->backoff_ms)
        r->backoff_max_ms = r->backoff_ms;
    if (r->on_fail == BUS_STORE_ON_FAIL_DEFAULT)
        r->on_fail = BUS_STORE_ON_FAIL_SKIP;
}

uint64_t
bus__store_backoff_ns(const bus_store_retry *r, uint32_t attempt)
{
    uint64_t ms = (uint64_t)r->backoff_ms, ns;
    uint32_t i;

    for (i = 1; i < attempt && ms < (uint64_t)r->backoff_max_ms; i++)
        ms *= 2;
    if (ms > (uint64_t)r->backoff_max_ms)
        ms = (uint64_t)r->backoff_max_ms;
    ns = ms * 1000000u;
    /* Jitter: uniform in [ns/2, ns], so retries of many subscribers that
     * failed together spread out. */
    return ns / 2 + bus__random_u64() % (ns / 2 + 1);
}

bool
bus__store_sleep(bus_store *s, uint64_t deadline, bool (*stop)(void *),
                 void *arg)
{
    bool stopped;

    bus__mutex_lock(&s->ev_mtx);
    while (!(stopped = stop(arg)) && bus__clock_mono_ns() < deadline)
        bus__cond_wait_until(&s->ev_cond, &s->ev_mtx, deadline);
    bus__mutex_unlock(&s->ev_mtx);
    return !stopped;
}

/* ---- Subscriptions ------------------------------------------------------- */

struct bus_store_sub {
    store_worker w; /* first: the store's registry holds &w */
    bus_store *s;
    bus_store_sub_config cfg;
    char *name, *stream, *ckpt;
    size_t name_size, stream_size, ckpt_size, slen;
    store_fcopy fc;
    store_filter f;
    bus__thread th;
    bool started;
    atomic_bool stop;
    _Atomic uint64_t pos, ver, delivered, retries, dead;
    atomic_bool live, stopped;
    uint64_t ckpt_saved;
};

void
bus_store_sub_config_init(bus_store_sub_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->batch_size = 256;
    cfg->max_live_lag = 65536;
    cfg->checkpoint_every = 1000;
    bus__store_retry_defaults(&cfg->retry);
}

static bool
sub_stopping(void *arg)
{
    bus_store_sub *sub = arg;

    return atomic_load_explicit(&sub->stop, memory_order_acquire);
}

static void
sub_signal(bus_store_sub *sub, bus_store_signal sig, bus_event *e, int err,
           const char *msg, uint32_t attempts)
{
    bus_store_signal_info info;

    if (sub->cfg.on_signal == NULL)
        return;
    memset(&info, 0, sizeof(info));
    info.name = sub->name != NULL ? sub->name : "";
    info.position = e != NULL
                        ? bus_event_position(e)
                        : atomic_load_explicit(&sub->pos, memory_order_relaxed);
    info.head = bus_store_head(sub->s);
    info.event = e;
    info.err = err;
    info.msg = msg != NULL ? msg : "";
    info.attempts = attempts;
    sub->cfg.on_signal(sub->cfg.signal_opaque, sig, &info);
}

static void
sub_save_ckpt(bus_store_sub *sub, bool force)
{
    uint64_t at = sub->stream != NULL
                      ? atomic_load_explicit(&sub->ver, memory_order_relaxed)
                      : atomic_load_explicit(&sub->pos, memory_order_relaxed);
    int rv;

    if (sub->ckpt == NULL || at == sub->ckpt_saved)
        return;
    if (!force && at - sub->ckpt_saved < sub->cfg.checkpoint_every)
        return;
    /* Not through bus_store_checkpoint_set: that refuses a closing store,
     * and the last save happens while the store closes. */
    {
        uint8_t k[STORE_MAX_NAME + 1], v[8];
        size_t n = strlen(sub->ckpt);
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();

        k[0] = 'c';
        memcpy(k + 1, sub->ckpt, n);
        store_put_be64(v, at);
        rocksdb_writebatch_put_cf(wb, sub->s->cf[CF_CHECKPOINTS],
                                  (const char *)k, n + 1, (const char *)v, 8);
        rv = bus__store_write_direct(
            sub->s, wb, sub->s->cfg.durability == BUS_STORE_ALWAYS);
        rocksdb_writebatch_destroy(wb);
    }
    if (rv == BUS_OK)
        sub->ckpt_saved = at;
}

/* Returns BUS_OK (handled or skipped), BUS_ECANCELED (stopping: not
 * handled) or the STOP policy's code. */
static int
sub_deliver(bus_store_sub *sub, bus_event *e)
{
    bus_delivery d;
    uint32_t attempt = 1;
    bus_result res;

    for (;;) {
        bus__delivery_init(&d, e, "", sub->name, attempt, 0, sub);
        res = sub->cfg.handler(&d, sub->cfg.opaque);
        if (res == BUS_ACK) {
            atomic_fetch_add_explicit(&sub->delivered, 1, memory_order_relaxed);
            return BUS_OK;
        }
        if (res == BUS_RETRY && attempt < sub->cfg.retry.max_attempts) {
            uint64_t dl = bus__clock_mono_ns() +
                          bus__store_backoff_ns(&sub->cfg.retry, attempt);
            atomic_fetch_add_explicit(&sub->retries, 1, memory_order_relaxed);
            if (!bus__store_sleep(sub->s, dl, sub_stopping, sub))
                return BUS_ECANCELED;
            attempt++;
            continue;
        }
        atomic_fetch_add_explicit(&sub->dead, 1, memory_order_relaxed);
        bus__store_logf(sub->s, BUS_LOG_WARN,
                        "subscription %s: event at %llu dead-lettered "
                        "after %u attempt(s): %s",
                        sub->name ? sub->name : "",
                        (unsigned long long)bus_event_position(e), attempt,
                        d.err_msg);
        sub_signal(sub, BUS_STORE_DEAD_LETTER, e,
                   d.err_code ? d.err_code : BUS_ECANCELED, d.err_msg, attempt);
        if (sub->cfg.retry.on_fail == BUS_STORE_ON_FAIL_STOP)
            return d.err_code ? d.err_code : BUS_ECANCELED;
        return BUS_OK;
    }
}

static void
sub_main(void *arg)
{
    bus_store_sub *sub = arg;
    bus_store *s = sub->s;
    bus_store_slice sl;
    bool live = false;
    int rv = BUS_OK;

    memset(&sl, 0, sizeof(sl));
    while (!sub_stopping(sub)) {
        uint64_t head0 = bus_store_head(s), lag;
        uint64_t pos = atomic_load_explicit(&sub->pos, memory_order_relaxed);
        uint64_t ver = atomic_load_explicit(&sub->ver, memory_order_relaxed);
        size_t i;

        bus__store_slice_clear(&sl);
        if (sub->stream != NULL)
            rv = bus__store_read_stream(s, sub->stream, sub->slen, ver + 1,
                                        BUS_STORE_FORWARD, sub->cfg.batch_size,
                                        &sub->f, &sl);
        else
            rv = bus__store_read_all(
                s, pos + 1, BUS_STORE_FORWARD, sub->cfg.batch_size,
                (size_t)sub->cfg.batch_size * 64, &sub->f, &sl);
        if (rv != BUS_OK) {
            bus__store_logf(s, BUS_LOG_ERR, "subscription %s: read: %s",
                            sub->name ? sub->name : "", bus_strerror(rv));
            break;
        }
        if (sl.status == BUS_STORE_READ_DELETED) {
            rv = BUS_EDELETED;
            break;
        }
        for (i = 0; i < sl.count && rv == BUS_OK; i++) {
            bus_event *e = sl.events[i];
            if (sub_stopping(sub)) {
                rv = BUS_ECANCELED;
                break;
            }
            rv = sub_deliver(sub, e);
            if (rv != BUS_OK)
                break;
            atomic_store_explicit(&sub->pos, bus_event_position(e),
                                  memory_order_relaxed);
            atomic_store_explicit(&sub->ver, bus_event_stream_version(e),
                                  memory_order_relaxed);
            sub_save_ckpt(sub, false);
        }
        if (rv == BUS_ECANCELED) {
            rv = BUS_OK;
            break;
        }
        if (rv != BUS_OK)
            break;
        /* Everything read was handled: move past what the filter skipped
         * too. */
        if (sub->stream == NULL && sl.next > 0 && sl.next - 1 > pos)
            atomic_store_explicit(&sub->pos, sl.next - 1, memory_order_relaxed);
        if (sub->stream != NULL && sl.status == BUS_STORE_READ_OK &&
            sl.next > 0 && sl.next - 1 > ver)
            atomic_store_explicit(&sub->ver, sl.next - 1, memory_order_relaxed);
        if (sl.end) {
            if (!live) {
                live = true;
                atomic_store(&sub->live, true);
                sub_signal(sub, BUS_STORE_CAUGHT_UP, NULL, 0, NULL, 0);
            }
            bus__mutex_lock(&s->ev_mtx);
            while (!sub_stopping(sub) &&
                   atomic_load_explicit(&s->head, memory_order_acquire) ==
                       head0)
                bus__cond_wait(&s->ev_cond, &s->ev_mtx);
            bus__mutex_unlock(&s->ev_mtx);
            continue;
        }
        if (sub->stream != NULL)
            lag = sl.last - atomic_load(&sub->ver);
        else
            lag = bus_store_head(s) - atomic_load(&sub->pos);
        if (live && lag > sub->cfg.max_live_lag) {
            live = false;
            atomic_store(&sub->live, false);
            sub_signal(sub, BUS_STORE_FELL_BEHIND, NULL, 0, NULL, 0);
        }
    }
    bus_store_slice_free(&sl);
    sub_save_ckpt(sub, true);
    atomic_store(&sub->live, false);
    if (rv != BUS_OK) {
        atomic_store(&sub->stopped, true);
        sub_signal(sub, BUS_STORE_STOPPED, NULL, rv, bus_strerror(rv), 0);
    }
}

static void
sub_free(bus_store_sub *sub)
{
    if (sub->name != NULL)
        bus__free(sub->name, sub->name_size);
    if (sub->stream != NULL)
        bus__free(sub->stream, sub->stream_size);
    if (sub->ckpt != NULL)
        bus__free(sub->ckpt, sub->ckpt_size);
    bus__store_fcopy_fini(&sub->fc);
    bus__free(sub, sizeof(*sub));
}

static void
sub_w_stop(store_worker *w)
{
    bus_store_sub *sub = (bus_store_sub *)w;

    atomic_store_explicit(&sub->stop, true, memory_order_release);
}

static void
sub_w_destroy(store_worker *w)
{
    bus_store_sub *sub = (bus_store_sub *)w;

    sub_w_stop(w);
    bus__store_notify(sub->s);
    if (sub->started)
        bus__thread_join(&sub->th);
    sub_free(sub);
}

int
bus_store_sub_open(bus_store_sub **out, bus_store *s,
                   const bus_store_sub_config *cfg)
{
    bus_store_sub *sub;
    bus_store_sub_config def;
    size_t n, len;
    uint64_t start;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (s == NULL || cfg == NULL || cfg->handler == NULL)
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if ((sub = bus__zalloc(sizeof(*sub))) == NULL)
        return BUS_ENOMEM;
    sub->s = s;
    n = cfg->size ? cfg->size : sizeof(*cfg);
    memcpy(&sub->cfg, cfg, n < sizeof(*cfg) ? n : sizeof(*cfg));
    bus_store_sub_config_init(&def);
    if (sub->cfg.batch_size == 0)
        sub->cfg.batch_size = def.batch_size;
    if (sub->cfg.max_live_lag == 0)
        sub->cfg.max_live_lag = def.max_live_lag;
    if (sub->cfg.checkpoint_every == 0)
        sub->cfg.checkpoint_every = def.checkpoint_every;
    bus__store_retry_defaults(&sub->cfg.retry);
    rv = BUS_EINVAL;
    if (cfg->name != NULL && !bus__store_name_ok(cfg->name, &len, 255))
        goto fail;
    if (cfg->stream != NULL &&
        !bus__store_name_ok(cfg->stream, &sub->slen, STORE_MAX_STREAM))
        goto fail;
    if (cfg->checkpoint != NULL &&
        !bus__store_name_ok(cfg->checkpoint, &len, STORE_MAX_NAME))
        goto fail;
    rv = BUS_ENOMEM;
    if (cfg->name != NULL &&
        (sub->name = bus__strdup(cfg->name, &sub->name_size)) == NULL)
        goto fail;
    if (cfg->stream != NULL &&
        (sub->stream = bus__strdup(cfg->stream, &sub->stream_size)) == NULL)
        goto fail;
    if (cfg->checkpoint != NULL &&
        (sub->ckpt = bus__strdup(cfg->checkpoint, &sub->ckpt_size)) == NULL)
        goto fail;
    if ((rv = bus__store_fcopy_init(&sub->fc, &cfg->filter)) != BUS_OK)
        goto fail;
    bus__store_fcopy_filter(&sub->fc, &sub->f);
    if (sub->stream != NULL) {
        sub->f.plen = 0;
        sub->f.any = sub->f.types == NULL;
    }

    start = cfg->start_after;
    if (sub->ckpt != NULL) {
        uint64_t at;
        rv = bus_store_checkpoint_get(s, sub->ckpt, &at);
        if (rv == BUS_OK)
            start = at;
        else if (rv != BUS_ENOTFOUND)
            goto fail;
    }
    if (start == BUS_STORE_END) {
        if (sub->stream != NULL) {
            bus_store_stream_info info;
            if ((rv = bus_store_stream_info_get(s, sub->stream, &info)) !=
                BUS_OK)
                goto fail;
            start = info.last_version;
        } else {
            start = bus_store_head(s);
        }
    }
    if (sub->stream != NULL)
        atomic_store(&sub->ver, start);
    else
        atomic_store(&sub->pos, start);
    sub->ckpt_saved = start;

    sub->w.stop = sub_w_stop;
    sub->w.destroy = sub_w_destroy;
    sub->w.name = sub->name;
    bus__mutex_lock(&s->ev_mtx);
    if (atomic_load_explicit(&s->closing, memory_order_acquire)) {
        bus__mutex_unlock(&s->ev_mtx);
        rv = BUS_ECLOSED;
        goto fail;
    }
    if ((rv = bus__thread_start(&sub->th, "bus-store-sub", sub_main, sub)) !=
        BUS_OK) {
        bus__mutex_unlock(&s->ev_mtx);
        goto fail;
    }
    sub->started = true;
    bus__store_worker_add(s, &sub->w);
    bus__mutex_unlock(&s->ev_mtx);
    *out = sub;
    return BUS_OK;
fail:
    sub_free(sub);
    return rv;
}

void
bus_store_sub_close_async(bus_store_sub *sub)
{
    if (sub == NULL)
        return;
    sub_w_stop(&sub->w);
    bus__store_notify(sub->s);
}

void
bus_store_sub_close(bus_store_sub *sub)
{
    if (sub == NULL)
        return;
    bus__mutex_lock(&sub->s->ev_mtx);
    bus__store_worker_remove(sub->s, &sub->w);
    bus__mutex_unlock(&sub->s->ev_mtx);
    sub_w_destroy(&sub->w);
}

void
bus_store_sub_stats_get(const bus_store_sub *csub, bus_store_sub_stats *st)
{
    bus_store_sub *sub = (bus_store_sub *)csub;

    memset(st, 0, sizeof(*st));
    if (sub == NULL)
        return;
    st->position = atomic_load(&sub->pos);
    st->version = atomic_load(&sub->ver);
    st->delivered = atomic_load(&sub->delivered);
    st->retries = atomic_load(&sub->retries);
    st->dead_letters = atomic_load(&sub->dead);
    st->live = atomic_load(&sub->live);
    st->stopped = atomic_load(&sub->stopped);
}
