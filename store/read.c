/*
 * Reads: a stream forward or backward, the global log ($all) forward or
 * backward, filters, and the visibility rules of stream metadata.
 *
 * Design:
 * - A stream read takes a snapshot, reads the stream's records (last
 *   version, policy) and walks its index runs, reading the events from
 *   the log with one iterator: a run's events sit at consecutive
 *   positions, so within a run (and across short gaps) the next event is
 *   one iterator step away instead of a point lookup. The policy gives the
 *   lowest visible version up front (truncate-before, max count); only a
 *   type filter or a max age makes it peek at an envelope before
 *   decoding.
 * - An $all read walks the log with one iterator (its own snapshot). To
 *   filter and check visibility without decoding, it peeks at the
 *   envelope's id, stream, type, version and timestamp (the codec writes
 *   them before headers and payload); only kept events are decoded,
 *   straight from the iterator's value (one copy, into the event).
 * - Visibility in $all needs each stream's policy. Streams with a policy
 *   are few; their policies are kept in memory (pol_tab, under pol_mtx),
 *   loaded at open and updated by the writer after each commit, so a read
 *   of a store without policies pays one atomic load per event.
 */
#include <stdlib.h>
#include <string.h>

#include <bus/codec.h>

#include "alloc.h"
#include "event_impl.h"
#include "mp.h"
#include "store_impl.h"
#include "testing.h"

/* ---- Policies for readers ------------------------------------------------ */

static void
pol_free(store_pol_ent *e)
{
    bus__free(e, sizeof(*e) + e->len + 1);
}

void
bus__store_pol_fini(bus_store *s)
{
    size_t i;

    if (s->pol_tab == NULL)
        return;
    for (i = 0; i < s->pol_tab_size; i++) {
        store_pol_ent *e = s->pol_tab[i], *nx;
        for (; e != NULL; e = nx) {
            nx = e->next;
            pol_free(e);
        }
    }
    bus__free(s->pol_tab, s->pol_tab_size * sizeof(*s->pol_tab));
    s->pol_tab = NULL;
    s->pol_tab_size = 0;
}

/* @locks pol_mtx held. */
static int
pol_grow(bus_store *s)
{
    size_t n = s->pol_tab_size ? s->pol_tab_size * 2 : 64, i;
    store_pol_ent **tab;

    if ((tab = bus__zalloc(n * sizeof(*tab))) == NULL)
        return BUS_ENOMEM;
    for (i = 0; i < s->pol_tab_size; i++) {
        store_pol_ent *e = s->pol_tab[i], *nx;
        for (; e != NULL; e = nx) {
            nx = e->next;
            e->next = tab[e->hash & (n - 1)];
            tab[e->hash & (n - 1)] = e;
        }
    }
    bus__free(s->pol_tab, s->pol_tab_size * sizeof(*s->pol_tab));
    s->pol_tab = tab;
    s->pol_tab_size = n;
    return BUS_OK;
}

static int
pol_set_locked(bus_store *s, const char *name, size_t len,
               const store_policy *p)
{
    uint64_t h = store_hash(name, len);
    store_pol_ent **pp, *e;

    if (s->pol_tab != NULL) {
        for (pp = &s->pol_tab[h & (s->pol_tab_size - 1)]; *pp != NULL;
             pp = &(*pp)->next) {
            e = *pp;
            if (e->hash != h || e->len != len ||
                memcmp(e->name, name, len) != 0)
                continue;
            if (store_policy_is_default(p)) {
                *pp = e->next;
                pol_free(e);
                atomic_fetch_sub(&s->n_pol, 1);
            } else {
                e->pol = *p;
            }
            return BUS_OK;
        }
    }
    if (store_policy_is_default(p))
        return BUS_OK;
    if (atomic_load(&s->n_pol) + 1 > s->pol_tab_size / 2 &&
        pol_grow(s) != BUS_OK && s->pol_tab == NULL)
        return BUS_ENOMEM;
    if ((e = bus__zalloc(sizeof(*e) + len + 1)) == NULL)
        return BUS_ENOMEM;
    e->hash = h;
    e->pol = *p;
    e->len = len;
    memcpy(e->name, name, len);
    e->next = s->pol_tab[h & (s->pol_tab_size - 1)];
    s->pol_tab[h & (s->pol_tab_size - 1)] = e;
    atomic_fetch_add(&s->n_pol, 1);
    return BUS_OK;
}

void
bus__store_pol_set(bus_store *s, const char *name, size_t len,
                   const store_policy *p)
{
    bus__mutex_lock(&s->pol_mtx);
    if (pol_set_locked(s, name, len, p) != BUS_OK) {
        /* Out of memory: readers of $all would show what the policy hides
         * until the next open; stream reads and scavenge use the records
         * and stay right. */
        bus__store_logf(s, BUS_LOG_WARN,
                        "no memory for a stream policy: $all reads may "
                        "show hidden events until reopened");
    }
    bus__mutex_unlock(&s->pol_mtx);
}

bool
bus__store_pol_get(bus_store *s, const char *name, size_t len, store_policy *p)
{
    uint64_t h;
    store_pol_ent *e;
    bool found = false;

    if (atomic_load_explicit(&s->n_pol, memory_order_relaxed) == 0)
        return false;
    h = store_hash(name, len);
    bus__mutex_lock(&s->pol_mtx);
    if (s->pol_tab != NULL)
        for (e = s->pol_tab[h & (s->pol_tab_size - 1)]; e != NULL; e = e->next)
            if (e->hash == h && e->len == len &&
                memcmp(e->name, name, len) == 0) {
                *p = e->pol;
                found = true;
                break;
            }
    bus__mutex_unlock(&s->pol_mtx);
    return found;
}

int
bus__store_pol_load(bus_store *s)
{
    rocksdb_iterator_t *it;
    char *err = NULL;
    int rv = BUS_OK;

    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_META]);
    for (rocksdb_iter_seek(it, "m", 1); rocksdb_iter_valid(it);
         rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *k = rocksdb_iter_key(it, &kl);
        const char *v = rocksdb_iter_value(it, &vl);
        store_policy p;

        if (kl < 2 || k[0] != 'm')
            break;
        if (bus__store_policy_decode(v, vl, &p) != BUS_OK) {
            bus__store_logf(s, BUS_LOG_ERR, "corrupt stream policy record");
            rv = BUS_ECORRUPT;
            break;
        }
        bus__mutex_lock(&s->pol_mtx);
        rv = pol_set_locked(s, k + 1, kl - 1, &p);
        bus__mutex_unlock(&s->pol_mtx);
        if (rv != BUS_OK)
            break;
    }
    rocksdb_iter_get_error(it, &err);
    if (err != NULL && rv == BUS_OK)
        rv = bus__store_rdb_err(s, err, "load policies");
    else if (err != NULL)
        rocksdb_free(err);
    rocksdb_iter_destroy(it);
    return rv;
}

bool
bus__store_visible(const store_policy *p, uint64_t last, uint64_t ver,
                   int64_t ts_ns, int64_t now_ms)
{
    if (p->flags & STORE_F_TOMBSTONE)
        return false;
    if (ver < p->truncate_before)
        return false;
    if (p->max_count != 0 && last >= p->max_count && ver <= last - p->max_count)
        return false;
    if (p->max_age_ms != 0 && p->max_age_ms < (uint64_t)INT64_MAX &&
        ts_ns / 1000000 < now_ms - (int64_t)p->max_age_ms)
        return false;
    return true;
}

/* ---- Filters and envelope peeking ---------------------------------------- */

void
bus__store_filter_init(store_filter *f, const bus_store_filter *bf)
{
    memset(f, 0, sizeof(*f));
    if (bf != NULL && bf->stream_prefix != NULL) {
        f->prefix = bf->stream_prefix;
        f->plen = strlen(bf->stream_prefix);
    }
    if (bf != NULL)
        f->types = bf->types;
    f->any = f->plen == 0 && f->types == NULL;
}

bool
bus__store_filter_match(const store_filter *f, const store_peek *pk)
{
    size_t i;

    if (f == NULL || f->any)
        return true;
    if (f->plen > 0 && (pk->stream == NULL || pk->stream_len < f->plen ||
                        memcmp(pk->stream, f->prefix, f->plen) != 0))
        return false;
    if (f->types == NULL)
        return true;
    for (i = 0; f->types[i] != NULL; i++)
        if (strlen(f->types[i]) == pk->type_len &&
            memcmp(f->types[i], pk->type, pk->type_len) == 0)
            return true;
    return false;
}

int
bus__store_peek(const void *buf, size_t len, store_peek *pk)
{
    mp_reader r;
    size_t n, i, kl;
    const char *k;
    unsigned seen = 0;

    memset(pk, 0, sizeof(*pk));
    mp_reader_init(&r, buf, len);
    if (mp_read_map(&r, &n) != BUS_OK)
        return BUS_EPROTO;
    for (i = 0; i < n && seen != 0x1f; i++) {
        if (mp_read_str(&r, &k, &kl) != BUS_OK)
            return BUS_EPROTO;
        if (kl == 2 && k[0] == 'i' && k[1] == 'd') {
            const uint8_t *id;
            size_t idl;
            if (mp_read_bin(&r, &id, &idl) != BUS_OK || idl != 16)
                return BUS_EPROTO;
            pk->id = id;
            seen |= 0x10;
        } else if (kl == 4 && memcmp(k, "type", 4) == 0) {
            if (mp_read_str(&r, &pk->type, &pk->type_len) != BUS_OK)
                return BUS_EPROTO;
            seen |= 1;
        } else if (kl == 6 && memcmp(k, "stream", 6) == 0) {
            if (mp_read_str(&r, &pk->stream, &pk->stream_len) != BUS_OK)
                return BUS_EPROTO;
            seen |= 2;
        } else if (kl == 4 && memcmp(k, "sver", 4) == 0) {
            if (mp_read_uint(&r, &pk->sver) != BUS_OK)
                return BUS_EPROTO;
            seen |= 4;
        } else if (kl == 2 && memcmp(k, "ts", 2) == 0) {
            if (mp_read_int(&r, &pk->ts) != BUS_OK)
                return BUS_EPROTO;
            seen |= 8;
        } else if (mp_skip(&r, 16) != BUS_OK) {
            return BUS_EPROTO;
        }
    }
    return (seen & 1) ? BUS_OK : BUS_EPROTO;
}

int
bus__store_decode(bus_store *s, const void *buf, size_t len, uint64_t pos,
                  bus_event **out)
{
    char why[160];
    int rv;

    rv = bus_codec_decode(out, buf, len, &s->limits, why, sizeof(why));
    if (rv != BUS_OK) {
        bus__store_logf(s, BUS_LOG_ERR,
                        "log record %llu does not decode: "
                        "%s (%s)",
                        (unsigned long long)pos, bus_strerror(rv), why);
        return rv == BUS_ENOMEM ? rv : BUS_ECORRUPT;
    }
    /* The new event is ours alone (refcount 1, not yet shared): setting
     * the position the record is stored at needs no synchronisation.
     * Then frozen: a stored event is published, never changed. */
    (*out)->position = pos;
    bus_event_freeze(*out);
    return BUS_OK;
}

/* ---- Slices -------------------------------------------------------------- */

int
bus__store_slice_push(bus_store_slice *sl, bus_event *e)
{
    if (sl->count == sl->cap_) {
        size_t ncap = sl->cap_ ? sl->cap_ * 2 : 64;
        bus_event **np =
            bus__realloc(sl->events, sl->cap_ * sizeof(*sl->events),
                         ncap * sizeof(*sl->events));
        if (np == NULL)
            return BUS_ENOMEM;
        sl->events = np;
        sl->cap_ = ncap;
    }
    sl->events[sl->count++] = e;
    return BUS_OK;
}

void
bus__store_slice_clear(bus_store_slice *sl)
{
    size_t i;

    for (i = 0; i < sl->count; i++)
        bus_event_unref(sl->events[i]);
    sl->count = 0;
    sl->status = BUS_STORE_READ_OK;
    sl->next = 0;
    sl->end = false;
    sl->last = 0;
}

void
bus_store_slice_free(bus_store_slice *sl)
{
    if (sl == NULL)
        return;
    bus__store_slice_clear(sl);
    bus__free(sl->events, sl->cap_ * sizeof(*sl->events));
    memset(sl, 0, sizeof(*sl));
}

/* ---- $all ---------------------------------------------------------------- */

/* The last version of a stream, for max-count visibility; caches one. */
typedef struct last_cache {
    char name[64];
    size_t len;
    uint64_t last;
    bool valid;
} last_cache;

static int
visible_in_all(bus_store *s, const store_peek *pk, int64_t now_ms,
               last_cache *lc, bool *vis)
{
    store_policy pol;
    uint64_t last = 0;

    *vis = true;
    if (pk->stream == NULL ||
        !bus__store_pol_get(s, pk->stream, pk->stream_len, &pol))
        return BUS_OK;
    if (pol.max_count != 0) {
        if (lc->valid && lc->len == pk->stream_len &&
            memcmp(lc->name, pk->stream, lc->len) == 0) {
            last = lc->last;
        } else {
            store_policy ignored;
            int rv = bus__store_load_stream(s, s->ro, pk->stream,
                                            pk->stream_len, &last, &ignored);
            if (rv != BUS_OK)
                return rv;
            lc->valid = pk->stream_len <= sizeof(lc->name);
            if (lc->valid) {
                memcpy(lc->name, pk->stream, pk->stream_len);
                lc->len = pk->stream_len;
                lc->last = last;
            }
        }
    }
    *vis = bus__store_visible(&pol, last, pk->sver, pk->ts, now_ms);
    return BUS_OK;
}

int
bus__store_read_all(bus_store *s, uint64_t from, bus_store_direction dir,
                    size_t max_count, size_t max_scan, const store_filter *f,
                    bus_store_slice *out)
{
    rocksdb_iterator_t *it;
    uint8_t k[8];
    uint64_t pos = 0, examined = 0;
    int64_t now_ms = bus__clock_real_ns() / 1000000;
    size_t scanned = 0;
    last_cache lc;
    char *err = NULL;
    int rv = BUS_OK;
    bool fwd = dir == BUS_STORE_FORWARD;

    if ((rv = BUS_FAILPOINT("store.read")) != 0)
        return rv;
    lc.valid = false;
    out->status = BUS_STORE_READ_OK;
    out->last = bus_store_head(s);
    if (!fwd && from == 0) {
        out->end = true;
        out->next = 0;
        return BUS_OK;
    }
    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_LOG]);
    if (fwd) {
        store_put_be64(k, from == 0 ? 1 : from);
        rocksdb_iter_seek(it, (const char *)k, 8);
    } else if (from == BUS_STORE_END) {
        rocksdb_iter_seek_to_last(it);
    } else {
        store_put_be64(k, from);
        rocksdb_iter_seek_for_prev(it, (const char *)k, 8);
    }
    while (rocksdb_iter_valid(it) && out->count < max_count &&
           scanned < max_scan) {
        size_t kl, vl;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        store_peek pk;
        bus_event *e;
        bool vis;

        if (kl != 8) {
            rv = BUS_ECORRUPT;
            break;
        }
        pos = store_get_be64(key);
        examined++;
        scanned++;
        /* Without a filter or any policy every record is kept: no need to
         * peek before decoding. */
        vis = true;
        if (!f->any ||
            atomic_load_explicit(&s->n_pol, memory_order_relaxed) != 0) {
            if (bus__store_peek(val, vl, &pk) != BUS_OK) {
                bus__store_logf(s, BUS_LOG_ERR, "log record %llu is malformed",
                                (unsigned long long)pos);
                rv = BUS_ECORRUPT;
                break;
            }
            vis = bus__store_filter_match(f, &pk);
            if (vis &&
                (rv = visible_in_all(s, &pk, now_ms, &lc, &vis)) != BUS_OK)
                break;
        }
        {
            if (vis) {
                if ((rv = bus__store_decode(s, val, vl, pos, &e)) != BUS_OK)
                    break;
                if ((rv = bus__store_slice_push(out, e)) != BUS_OK) {
                    bus_event_unref(e);
                    break;
                }
            }
        }
        if (fwd)
            rocksdb_iter_next(it);
        else
            rocksdb_iter_prev(it);
    }
    if (rv == BUS_OK) {
        out->end = !rocksdb_iter_valid(it);
        rocksdb_iter_get_error(it, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(s, err, "read $all");
    }
    rocksdb_iter_destroy(it);
    if (examined == 0)
        out->next = from == BUS_STORE_END ? out->last + 1 : from;
    else
        out->next = fwd ? pos + 1 : pos - 1;
    if (!fwd && out->next == 0)
        out->end = true;
    return rv;
}

int
bus_store_read_all(bus_store *s, uint64_t from_position,
                   bus_store_direction dir, size_t max_count,
                   const bus_store_filter *filter, bus_store_slice *out)
{
    store_filter f;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    bus__store_slice_clear(out);
    if (s == NULL || (dir != BUS_STORE_FORWARD && dir != BUS_STORE_BACKWARD))
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if (max_count == 0)
        max_count = 1000;
    bus__store_filter_init(&f, filter);
    rv = bus__store_read_all(
        s, from_position, dir, max_count,
        max_count > SIZE_MAX / 64 ? SIZE_MAX : max_count * 64, &f, out);
    if (rv != BUS_OK)
        bus__store_slice_clear(out);
    return rv;
}

/* ---- One stream ---------------------------------------------------------- */

/* A cursor over a stream's versions, walking its index runs. */
typedef struct run_cur {
    rocksdb_iterator_t *it;
    const uint8_t *k; /* a key of the stream (its prefix) */
    size_t slen;
    bool fwd;
    bool have; /* a run is loaded and v is in it */
    uint64_t first, pos, n;
    uint64_t v; /* the next version to give */
    int err;
} run_cur;

/* Loads the run under the iterator; false when it is not the stream's. */
static bool
run_load(run_cur *c)
{
    size_t kl, vl;
    const char *key, *val;

    if (!rocksdb_iter_valid(c->it))
        return false;
    key = rocksdb_iter_key(c->it, &kl);
    if (!store_key_stream_match(key, kl, c->k, c->slen, &c->first))
        return false;
    val = rocksdb_iter_value(c->it, &vl);
    if (!store_run_decode(val, vl, &c->pos, &c->n)) {
        c->err = BUS_ECORRUPT;
        return false;
    }
    return true;
}

/* Puts the cursor on version v, or the nearest present version after it
 * (forward) or before it (backward). */
static void
run_seek(run_cur *c, const char *stream, uint64_t v)
{
    uint8_t k[STORE_KEY_BUF];
    size_t klen = store_key_stream(k, stream, c->slen, v);

    c->have = false;
    rocksdb_iter_seek_for_prev(c->it, (const char *)k, klen);
    if (run_load(c)) {
        if (c->first + c->n - 1 >= v) {
            c->have = true;
            c->v = v;
            return;
        }
        if (!c->fwd) { /* the run before v ends below it */
            c->have = true;
            c->v = c->first + c->n - 1;
            return;
        }
    }
    if (c->err != BUS_OK || !c->fwd)
        return;
    rocksdb_iter_seek(c->it, (const char *)k, klen);
    if (run_load(c)) {
        c->have = true;
        c->v = c->first;
    }
}

/* The next version and its position; false at the stream's end. */
static bool
run_next(run_cur *c, uint64_t *ver, uint64_t *pos)
{
    if (!c->have)
        return false;
    *ver = c->v;
    *pos = c->pos + (c->v - c->first);
    if (c->fwd) {
        if (c->v + 1 < c->first + c->n) {
            c->v++;
        } else {
            rocksdb_iter_next(c->it);
            c->have = run_load(c);
            c->v = c->first;
        }
    } else {
        if (c->v > c->first) {
            c->v--;
        } else {
            rocksdb_iter_prev(c->it);
            c->have = run_load(c);
            c->v = c->first + c->n - 1;
        }
    }
    return true;
}

/* A cursor over the log that reaches positions in one direction. A
 * stream's events sit in runs of consecutive positions (one per append)
 * separated by other streams' events: within a run, and across a short
 * gap, the next record is one iterator step away, which costs a fraction
 * of a seek (a seek searches the memtable's skiplist and every level from
 * the top). Farther away, it seeks. */
#define LOG_STEP_MAX 12

typedef struct log_cur {
    rocksdb_iterator_t *it;
    bool fwd;
    bool have; /* the iterator is on a record and at is its position */
    uint64_t at;
} log_cur;

/* Puts the cursor on position pos. Returns BUS_OK with *val (valid until
 * the cursor moves), BUS_ENOTFOUND when the log has no such record, or
 * BUS_ECORRUPT. */
static int
log_cur_get(log_cur *c, uint64_t pos, const char **val, size_t *vl)
{
    uint8_t k[8];
    const char *key;
    size_t kl, steps = 0;

    if (c->have && (c->fwd ? c->at < pos && pos - c->at <= LOG_STEP_MAX
                           : c->at > pos && c->at - pos <= LOG_STEP_MAX)) {
        while (c->have && (c->fwd ? c->at < pos : c->at > pos) &&
               steps++ <= LOG_STEP_MAX) {
            if (c->fwd)
                rocksdb_iter_next(c->it);
            else
                rocksdb_iter_prev(c->it);
            c->have = rocksdb_iter_valid(c->it);
            if (c->have) {
                key = rocksdb_iter_key(c->it, &kl);
                if (kl != 8)
                    return BUS_ECORRUPT;
                c->at = store_get_be64(key);
            }
        }
    }
    if (!c->have || c->at != pos) {
        store_put_be64(k, pos);
        if (c->fwd)
            rocksdb_iter_seek(c->it, (const char *)k, 8);
        else
            rocksdb_iter_seek_for_prev(c->it, (const char *)k, 8);
        c->have = rocksdb_iter_valid(c->it);
        if (!c->have)
            return BUS_ENOTFOUND;
        key = rocksdb_iter_key(c->it, &kl);
        if (kl != 8)
            return BUS_ECORRUPT;
        c->at = store_get_be64(key);
        if (c->at != pos)
            return BUS_ENOTFOUND;
    }
    *val = rocksdb_iter_value(c->it, vl);
    return BUS_OK;
}

int
bus__store_read_stream(bus_store *s, const char *stream, size_t slen,
                       uint64_t from, bus_store_direction dir, size_t max_count,
                       const store_filter *f, bus_store_slice *out)
{
    const rocksdb_snapshot_t *snap;
    rocksdb_readoptions_t *ro;
    rocksdb_iterator_t *it = NULL;
    uint8_t k[STORE_KEY_BUF];
    uint64_t last, lo, ver = 0, pos;
    int64_t now_ms = bus__clock_real_ns() / 1000000;
    store_policy pol;
    size_t scanned = 0, max_scan;
    run_cur rc;
    log_cur lc;
    char *err = NULL;
    int rv;
    bool fwd = dir == BUS_STORE_FORWARD, peek;

    if ((rv = BUS_FAILPOINT("store.read")) != 0)
        return rv;
    max_scan = max_count > SIZE_MAX / 64 ? SIZE_MAX : max_count * 64;
    memset(&lc, 0, sizeof(lc));
    ro = rocksdb_readoptions_create();
    snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_set_snapshot(ro, snap);
    if ((rv = bus__store_load_stream(s, ro, stream, slen, &last, &pol)) !=
        BUS_OK)
        goto out;
    out->last = last;
    out->end = true;
    out->next = fwd ? (from == 0 ? 1 : from) : from;
    if (pol.flags & STORE_F_TOMBSTONE) {
        out->status = BUS_STORE_READ_DELETED;
        goto out;
    }
    if (last == 0 || (pol.flags & STORE_F_DELETED)) {
        out->status = BUS_STORE_READ_NO_STREAM;
        goto out;
    }
    out->status = BUS_STORE_READ_OK;
    lo = 1;
    if (pol.truncate_before > lo)
        lo = pol.truncate_before;
    if (pol.max_count != 0 && last >= pol.max_count &&
        last - pol.max_count + 1 > lo)
        lo = last - pol.max_count + 1;
    if (fwd) {
        ver = from < lo ? lo : from;
        if (ver > last) {
            out->next = ver;
            goto out;
        }
    } else {
        ver = from > last ? last : from;
        if (ver < lo) {
            out->next = 0;
            goto out;
        }
    }
    out->next = ver;
    it = rocksdb_create_iterator_cf(s->db, ro, s->cf[CF_STREAMS]);
    lc.it = rocksdb_create_iterator_cf(s->db, ro, s->cf[CF_LOG]);
    lc.fwd = fwd;
    (void)store_key_stream(k, stream, slen, ver);
    memset(&rc, 0, sizeof(rc));
    rc.it = it;
    rc.k = k;
    rc.slen = slen;
    rc.fwd = fwd;
    run_seek(&rc, stream, ver);
    out->end = false;
    /* Versions lo..last are visible but for max age (truncate-before and
     * max count made lo); only a type filter or a max age needs a look
     * at the envelope before decoding. */
    peek = f->types != NULL || pol.max_age_ms != 0;
    while (out->count < max_count && scanned < max_scan) {
        const char *val;
        store_peek pk;
        bus_event *e;
        size_t vl;

        if (!run_next(&rc, &ver, &pos) || (fwd && ver > last) ||
            (!fwd && ver < lo)) {
            if (rc.err != BUS_OK)
                rv = rc.err;
            else
                out->end = true;
            break;
        }
        scanned++;
        out->next = fwd ? ver + 1 : ver - 1;
        if ((rv = log_cur_get(&lc, pos, &val, &vl)) != BUS_OK) {
            if (rv == BUS_ENOTFOUND) {
                bus__store_logf(s, BUS_LOG_ERR,
                                "stream index points to a "
                                "missing log record %llu",
                                (unsigned long long)pos);
                rv = BUS_ECORRUPT;
            }
            break;
        }
        if (peek) {
            if (bus__store_peek(val, vl, &pk) != BUS_OK) {
                rv = BUS_ECORRUPT;
                break;
            }
            if (!bus__store_filter_match(f, &pk) ||
                !bus__store_visible(&pol, last, ver, pk.ts, now_ms))
                continue;
        }
        if ((rv = bus__store_decode(s, val, vl, pos, &e)) != BUS_OK)
            break;
        if ((rv = bus__store_slice_push(out, e)) != BUS_OK) {
            bus_event_unref(e);
            break;
        }
    }
    /* Stopped by a limit: the end only if no version follows. */
    if (rv == BUS_OK && !out->end)
        out->end =
            rc.err == BUS_OK && (!rc.have || (fwd ? rc.v > last : rc.v < lo));
    if (rv == BUS_OK && rc.err != BUS_OK)
        rv = rc.err;
    if (out->end && !fwd)
        out->next = 0;
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err == NULL)
            rocksdb_iter_get_error(lc.it, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(s, err, "read stream");
    }
out:
    if (it != NULL)
        rocksdb_iter_destroy(it);
    if (lc.it != NULL)
        rocksdb_iter_destroy(lc.it);
    rocksdb_release_snapshot(s->db, snap);
    rocksdb_readoptions_destroy(ro);
    return rv;
}

int
bus_store_read_stream(bus_store *s, const char *stream, uint64_t from_version,
                      bus_store_direction dir, size_t max_count,
                      const bus_store_filter *filter, bus_store_slice *out)
{
    store_filter f;
    size_t slen;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    bus__store_slice_clear(out);
    if (s == NULL || (dir != BUS_STORE_FORWARD && dir != BUS_STORE_BACKWARD) ||
        !bus__store_name_ok(stream, &slen, STORE_MAX_STREAM))
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if (max_count == 0)
        max_count = 1000;
    bus__store_filter_init(&f, filter);
    f.plen = 0; /* a stream read filters by type only */
    f.any = f.types == NULL;
    rv = bus__store_read_stream(s, stream, slen, from_version, dir, max_count,
                                &f, out);
    if (rv != BUS_OK)
        bus__store_slice_clear(out);
    return rv;
}

int
bus_store_stream_info_get(bus_store *s, const char *stream,
                          bus_store_stream_info *out)
{
    const rocksdb_snapshot_t *snap;
    rocksdb_readoptions_t *ro;
    store_policy pol;
    size_t slen;
    int rv;

    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (s == NULL || out == NULL ||
        !bus__store_name_ok(stream, &slen, STORE_MAX_STREAM))
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    ro = rocksdb_readoptions_create();
    snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_set_snapshot(ro, snap);
    rv = bus__store_load_stream(s, ro, stream, slen, &out->last_version, &pol);
    rocksdb_release_snapshot(s->db, snap);
    rocksdb_readoptions_destroy(ro);
    if (rv != BUS_OK)
        return rv;
    out->meta.max_count = pol.max_count;
    out->meta.max_age_ms = pol.max_age_ms;
    out->meta.truncate_before = pol.truncate_before;
    if (pol.flags & STORE_F_TOMBSTONE)
        out->state = BUS_STORE_STREAM_TOMBSTONE;
    else if (pol.flags & STORE_F_DELETED)
        out->state = BUS_STORE_STREAM_DELETED;
    else if (out->last_version > 0)
        out->state = BUS_STORE_STREAM_LIVE;
    else
        out->state = BUS_STORE_STREAM_NONE;
    return BUS_OK;
}
