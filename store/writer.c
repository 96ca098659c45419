/*
 * The group writer: every change to streams (appends, transactions,
 * metadata, deletes) is a request queued here and written by one leader
 * in one RocksDB WriteBatch per group, with one WAL sync per group.
 *
 * Design:
 * - Leader/follower group commit (as RocksDB's own write queue and MySQL's
 *   binlog): a caller queues its request; if no leader is active it
 *   becomes the leader, else it waits on its own condition variable. The
 *   leader detaches a group from the head of the queue (FIFO, capped by
 *   max_group_bytes), processes it without any lock, writes it, answers
 *   every request of the group, and hands the role to the new queue head.
 *   A lone appender therefore writes on its own thread with no hand-off.
 * - Positions are given in queue order by the leader only, and groups are
 *   written one after another, so the log's visible prefix never has a
 *   gap: readers may read anything visible, and s->head (stored after the
 *   write, release) is a position up to which everything is visible.
 * - Each request is checked against the state the earlier requests of the
 *   same group leave ("pending" values in the stream cache, valid while
 *   p_gen == w.gen). A request that fails restores what it changed (undo
 *   log), so one request's conflict never fails another. The batch only
 *   receives a request's records once the whole request has been checked
 *   and encoded, so a failed request leaves nothing in it.
 * - If the write itself fails, every request of the group fails with the
 *   write's error and the pending state is dropped (the next group has a
 *   new generation): memory never runs ahead of disk.
 * - The stream cache (last version and policy per stream) is the writer's
 *   own: only the leader touches it, so it needs no lock. Misses load the
 *   meta records; the least recently used clean entry is evicted.
 * - The event-id index (store_impl.h) costs an append no record per event
 *   when its ids are above every id of the index's records (new UUIDv7s,
 *   also slightly out of order from concurrent appenders): the writer
 *   keeps those in its tail and writes them as run records every
 *   STORE_TAIL_FLUSH positions, in the batch of a later group, with the
 *   watermark. Older ids get their 'e' record in their own batch. An
 *   append so writes its log records and one stream-index entry; the raw
 *   baseline's single puts write one record, so this is what bounds the
 *   ratio (docs/store.md, Performance).
 *
 * - Asynchronous appends (bus_store_append_async) queue the same requests
 *   with no thread waiting for them: when one reaches the queue's head the
 *   role goes to the writer thread (started by the first of them), which
 *   leads like any caller and runs the callbacks in commit order from its
 *   completion queue. A window (max_async_bytes) bounds them.
 *
 * @thread the leader is whichever appending thread, or the writer thread,
 * holds the role.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/codec.h>

#include "alloc.h"
#include "event_impl.h"
#include "store_impl.h"
#include "testing.h"

/* ---- Policy records ------------------------------------------------------ */

void
bus__store_policy_encode(uint8_t *out, const store_policy *p)
{
    out[0] = 1;
    out[1] = p->flags;
    store_put_be64(out + 2, p->truncate_before);
    store_put_be64(out + 10, p->max_count);
    store_put_be64(out + 18, p->max_age_ms);
}

int
bus__store_policy_decode(const void *v, size_t n, store_policy *p)
{
    const uint8_t *b = v;

    memset(p, 0, sizeof(*p));
    if (n < STORE_POLICY_REC_LEN || b[0] != 1)
        return BUS_ECORRUPT;
    p->flags = b[1];
    p->truncate_before = store_get_be64(b + 2);
    p->max_count = store_get_be64(b + 10);
    p->max_age_ms = store_get_be64(b + 18);
    return BUS_OK;
}

/* The greatest version in the stream index, 0 if none. */
static int
load_index_last(bus_store *s, const rocksdb_readoptions_t *ro,
                const char *stream, size_t slen, uint64_t *last)
{
    uint8_t k[STORE_KEY_BUF];
    rocksdb_iterator_t *it;
    size_t klen, kl;
    const char *key;
    char *err = NULL;

    *last = 0;
    klen = store_key_stream(k, stream, slen, UINT64_MAX);
    it = rocksdb_create_iterator_cf(s->db, ro, s->cf[CF_STREAMS]);
    rocksdb_iter_seek_for_prev(it, (const char *)k, klen);
    if (rocksdb_iter_valid(it)) {
        uint64_t first, pos, n;
        size_t vl;
        const char *val;

        key = rocksdb_iter_key(it, &kl);
        val = rocksdb_iter_value(it, &vl);
        if (store_key_stream_match(key, kl, k, slen, &first)) {
            if (!store_run_decode(val, vl, &pos, &n)) {
                rocksdb_iter_destroy(it);
                return BUS_ECORRUPT;
            }
            *last = first + n - 1;
        }
    }
    rocksdb_iter_get_error(it, &err);
    rocksdb_iter_destroy(it);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read stream index");
    return BUS_OK;
}

int
bus__store_load_stream(bus_store *s, const rocksdb_readoptions_t *ro,
                       const char *stream, size_t slen, uint64_t *last,
                       store_policy *pol)
{
    uint8_t k[STORE_KEY_BUF];
    size_t klen, vlen;
    uint64_t ilast;
    char *v, *err = NULL;
    int rv = BUS_OK;

    *last = 0;
    memset(pol, 0, sizeof(*pol));
    /* The last version is the index's greatest, or the 'v' record that a
     * scavenge leaves when it removes a stream's tail, whichever is
     * greater (appends write no 'v': one record less per append). */
    if ((rv = load_index_last(s, ro, stream, slen, &ilast)) != BUS_OK)
        return rv;
    klen = store_key_meta(k, 'v', stream, slen);
    v = rocksdb_get_cf(s->db, ro, s->cf[CF_META], (const char *)k, klen, &vlen,
                       &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read stream state");
    if (v != NULL) {
        if (vlen != 8)
            rv = BUS_ECORRUPT;
        else
            *last = store_get_be64(v);
        rocksdb_free(v);
    }
    if (ilast > *last)
        *last = ilast;
    k[0] = 'm';
    v = rocksdb_get_cf(s->db, ro, s->cf[CF_META], (const char *)k, klen, &vlen,
                       &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read stream metadata");
    if (v != NULL) {
        if (rv == BUS_OK)
            rv = bus__store_policy_decode(v, vlen, pol);
        rocksdb_free(v);
    }
    if (rv != BUS_OK)
        bus__store_logf(s, BUS_LOG_ERR, "stream %.*s: corrupt meta record",
                        (int)(slen > 200 ? 200 : slen), stream);
    return rv;
}

/* ---- Stream cache (leader only) ------------------------------------------ */

int
bus__store_writer_init(bus_store *s)
{
    store_writer *w = &s->w;
    size_t n = 64;

    while (n < s->cfg.stream_cache && n < ((size_t)1 << 24))
        n *= 2;
    w->tab = bus__zalloc(n * sizeof(*w->tab));
    if (w->tab == NULL)
        return BUS_ENOMEM;
    w->tab_size = n;
    w->wb = rocksdb_writebatch_create();
    w->gen = 1;
    return BUS_OK;
}

static void
wc_free(store_stream *st)
{
    bus__free(st, sizeof(*st) + st->len + 1);
}

void
bus__store_writer_fini(bus_store *s)
{
    store_writer *w = &s->w;
    store_stream *st, *nx;

    for (st = w->lru_head; st != NULL; st = nx) {
        nx = st->lru_next;
        wc_free(st);
    }
    bus__free(w->tab, w->tab_size * sizeof(*w->tab));
    if (w->wb != NULL)
        rocksdb_writebatch_destroy(w->wb);
    bus__store_buf_free(&w->enc);
    bus__free(w->enc_off, w->enc_cap * sizeof(*w->enc_off));
    bus__free(w->touched, w->cap_touched * sizeof(*w->touched));
    bus__free(w->pids, w->cap_pids * sizeof(*w->pids));
    bus__free(w->pid_tab, w->pid_tab_size * sizeof(*w->pid_tab));
    bus__free(w->undo, w->cap_undo * sizeof(*w->undo));
    bus__free(w->tail, w->cap_tail * sizeof(*w->tail));
    bus__free(w->recent, w->cap_recent * sizeof(*w->recent));
    bus__store_buf_free(&w->runbuf);
    if (w->run_it != NULL)
        rocksdb_iter_destroy(w->run_it);
    memset(w, 0, sizeof(*w));
}

static void
wc_lru_unlink(store_writer *w, store_stream *st)
{
    if (st->lru_prev != NULL)
        st->lru_prev->lru_next = st->lru_next;
    else
        w->lru_head = st->lru_next;
    if (st->lru_next != NULL)
        st->lru_next->lru_prev = st->lru_prev;
    else
        w->lru_tail = st->lru_prev;
    st->lru_prev = st->lru_next = NULL;
}

static void
wc_lru_front(store_writer *w, store_stream *st)
{
    st->lru_prev = NULL;
    st->lru_next = w->lru_head;
    if (w->lru_head != NULL)
        w->lru_head->lru_prev = st;
    w->lru_head = st;
    if (w->lru_tail == NULL)
        w->lru_tail = st;
}

static void
wc_evict(bus_store *s)
{
    store_writer *w = &s->w;

    while (w->n_streams >= s->cfg.stream_cache && w->lru_tail != NULL) {
        store_stream *st = w->lru_tail, **pp;

        if (st->p_gen == w->gen)
            return; /* pending in this group: keep (over capacity a while) */
        wc_lru_unlink(w, st);
        for (pp = &w->tab[st->hash & (w->tab_size - 1)]; *pp != st;
             pp = &(*pp)->hnext)
            ;
        *pp = st->hnext;
        w->n_streams--;
        wc_free(st);
    }
}

static int
wc_get(bus_store *s, const char *name, size_t len, store_stream **out)
{
    store_writer *w = &s->w;
    uint64_t h = store_hash(name, len);
    store_stream *st;
    int rv;

    for (st = w->tab[h & (w->tab_size - 1)]; st != NULL; st = st->hnext) {
        if (st->hash == h && st->len == len &&
            memcmp(st->name, name, len) == 0) {
            if (w->lru_head != st) {
                wc_lru_unlink(w, st);
                wc_lru_front(w, st);
            }
            *out = st;
            return BUS_OK;
        }
    }
    wc_evict(s);
    if ((st = bus__zalloc(sizeof(*st) + len + 1)) == NULL)
        return BUS_ENOMEM;
    if ((rv = bus__store_load_stream(s, s->ro, name, len, &st->last,
                                     &st->pol)) != BUS_OK) {
        bus__free(st, sizeof(*st) + len + 1);
        return rv;
    }
    st->hash = h;
    st->len = len;
    memcpy(st->name, name, len);
    st->hnext = w->tab[h & (w->tab_size - 1)];
    w->tab[h & (w->tab_size - 1)] = st;
    wc_lru_front(w, st);
    w->n_streams++;
    *out = st;
    return BUS_OK;
}

static inline uint64_t
st_last(const store_writer *w, const store_stream *st)
{
    return st->p_gen == w->gen ? st->p_last : st->last;
}

static inline const store_policy *
st_pol(const store_writer *w, const store_stream *st)
{
    return st->p_gen == w->gen ? &st->p_pol : &st->pol;
}

static int
grow(void **p, size_t *cap, size_t need, size_t elem)
{
    size_t ncap;
    void *np;

    if (need <= *cap)
        return BUS_OK;
    ncap = *cap ? *cap : 16;
    while (ncap < need)
        ncap *= 2;
    np = bus__realloc(*p, *cap * elem, ncap * elem);
    if (np == NULL)
        return BUS_ENOMEM;
    *p = np;
    *cap = ncap;
    return BUS_OK;
}

/* Records st's pending state so that the current request can undo it, and
 * starts its pending state for this group. */
static int
st_touch(bus_store *s, store_stream *st)
{
    store_writer *w = &s->w;
    store_undo *u;
    int rv;

    if ((rv = grow((void **)&w->undo, &w->cap_undo, w->n_undo + 1,
                   sizeof(*w->undo))) != BUS_OK)
        return rv;
    if (st->p_gen != w->gen &&
        (rv = grow((void **)&w->touched, &w->cap_touched, w->n_touched + 1,
                   sizeof(*w->touched))) != BUS_OK)
        return rv;
    u = &w->undo[w->n_undo++];
    u->st = st;
    u->p_gen = st->p_gen;
    u->p_last = st->p_last;
    u->p_pol = st->p_pol;
    if (st->p_gen != w->gen) {
        st->p_gen = w->gen;
        st->p_last = st->last;
        st->p_pol = st->pol;
        w->touched[w->n_touched++] = st;
    }
    return BUS_OK;
}

/* ---- Pending ids of the group -------------------------------------------- */

/* A bucket hash for the group's ids: a multiply of the two 64-bit halves
 * (a UUIDv7's low half is random already; this also spreads other ids). */
static inline uint64_t
pid_hash(const bus_uuid *id)
{
    uint64_t a, b;

    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    return ((a ^ b) * 0x9e3779b97f4a7c15u) >> 17;
}

static store_pid *
pid_find(store_writer *w, const bus_uuid *id)
{
    uint32_t i;

    if (w->pid_tab == NULL)
        return NULL;
    i = w->pid_tab[pid_hash(id) & (w->pid_tab_size - 1)];
    while (i != 0) {
        store_pid *p = &w->pids[i - 1];
        if (memcmp(p->id.b, id->b, 16) == 0)
            return p;
        i = p->hnext;
    }
    return NULL;
}

static int
pid_rehash(store_writer *w, size_t need)
{
    size_t n = w->pid_tab_size ? w->pid_tab_size : 256, i;
    uint32_t *tab;

    if (need * 2 <= w->pid_tab_size)
        return BUS_OK;
    while (n < need * 2)
        n *= 2;
    if ((tab = bus__zalloc(n * sizeof(*tab))) == NULL)
        return BUS_ENOMEM;
    bus__free(w->pid_tab, w->pid_tab_size * sizeof(*w->pid_tab));
    w->pid_tab = tab;
    w->pid_tab_size = n;
    for (i = 0; i < w->n_pids; i++) {
        size_t b = pid_hash(&w->pids[i].id) & (n - 1);
        w->pids[i].hnext = tab[b];
        tab[b] = (uint32_t)(i + 1);
    }
    return BUS_OK;
}

static int
pid_add(store_writer *w, const bus_uuid *id, store_stream *st, uint64_t ver,
        uint64_t pos, uint32_t seq, bool fresh)
{
    store_pid *p;
    size_t b;
    int rv;

    if ((rv = grow((void **)&w->pids, &w->cap_pids, w->n_pids + 1,
                   sizeof(*w->pids))) != BUS_OK)
        return rv;
    if ((rv = pid_rehash(w, w->n_pids + 1)) != BUS_OK)
        return rv;
    p = &w->pids[w->n_pids];
    p->id = *id;
    p->st = st;
    p->ver = ver;
    p->pos = pos;
    p->req_seq = seq;
    p->fresh = fresh;
    b = pid_hash(id) & (w->pid_tab_size - 1);
    p->hnext = w->pid_tab[b];
    w->pid_tab[b] = (uint32_t)(w->n_pids + 1);
    w->n_pids++;
    return BUS_OK;
}

/* Removes the most recent entries, back to n (LIFO keeps chains right). */
static void
pid_truncate(store_writer *w, size_t n)
{
    while (w->n_pids > n) {
        store_pid *p = &w->pids[w->n_pids - 1];
        size_t b = pid_hash(&p->id) & (w->pid_tab_size - 1);
        w->pid_tab[b] = p->hnext;
        w->n_pids--;
    }
}

static void
pid_clear(store_writer *w)
{
    size_t i;

    if (w->pid_tab == NULL || w->n_pids == 0) {
        w->n_pids = 0;
        return;
    }
    /* A small group clears its own buckets, a large one the table. */
    if (w->n_pids * 8 < w->pid_tab_size)
        for (i = 0; i < w->n_pids; i++)
            w->pid_tab[pid_hash(&w->pids[i].id) & (w->pid_tab_size - 1)] = 0;
    else
        memset(w->pid_tab, 0, w->pid_tab_size * sizeof(*w->pid_tab));
    w->n_pids = 0;
}

/* Where an id is stored (committed or pending), if anywhere. */
typedef struct id_hit {
    bool found;
    bool same_req;
    bool same_stream;
    uint64_t pos, ver;
} id_hit;

/* The position of an id in v[0..n) (sorted by id), or 0. */
static uint64_t
ids_find(const store_tail_ent *v, size_t n, const bus_uuid *id)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = memcmp(v[mid].id.b, id->b, 16);
        if (c == 0)
            return v[mid].pos;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* The position of an id in the writer's tail, or 0. */
static uint64_t
tail_find(const store_writer *w, const bus_uuid *id)
{
    return ids_find(w->tail, w->n_tail, id);
}

/* The position an id run gives id, or 0. The iterator lives for the
 * group: runs change only by this writer's own writes (after the group's
 * lookups) and by scavenge, whose removals id_confirm notices. */
static int
run_lookup(bus_store *s, const bus_uuid *id, uint64_t *pos)
{
    store_writer *w = &s->w;
    uint8_t k[STORE_IDK_LEN];
    const char *key, *val;
    size_t kl, vl;
    char *err = NULL;

    *pos = 0;
    if (w->run_it == NULL)
        w->run_it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_IDS]);
    store_key_id(k, STORE_IDK_RUN, id);
    rocksdb_iter_seek_for_prev(w->run_it, (const char *)k, sizeof(k));
    if (rocksdb_iter_valid(w->run_it)) {
        key = rocksdb_iter_key(w->run_it, &kl);
        if (kl == STORE_IDK_LEN && key[0] == STORE_IDK_RUN) {
            val = rocksdb_iter_value(w->run_it, &vl);
            if (!store_idrun_ok(vl)) {
                bus__store_logf(s, BUS_LOG_ERR, "corrupt id run record");
                return BUS_ECORRUPT;
            }
            *pos = store_idrun_find(val, vl, id);
        }
    }
    rocksdb_iter_get_error(w->run_it, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read event id index");
    return BUS_OK;
}

/* Reads the log record at pos and, if it is the event id, fills h with
 * its version and stream. A record gone is not found (a scavenge removed
 * it since the index was read); another event there is damage. */
static int
id_confirm(bus_store *s, uint64_t pos, const bus_uuid *id, const char *stream,
           size_t slen, id_hit *h)
{
    uint8_t k[8];
    store_peek pk;
    char *v, *err = NULL;
    size_t vlen;
    int rv = BUS_OK;

    store_put_be64(k, pos);
    v = rocksdb_get_cf(s->db, s->ro, s->cf[CF_LOG], (const char *)k, 8, &vlen,
                       &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read log record");
    if (v == NULL)
        return BUS_OK;
    if (bus__store_peek(v, vlen, &pk) != BUS_OK || pk.id == NULL ||
        pk.stream == NULL || memcmp(pk.id, id->b, 16) != 0) {
        bus__store_logf(s, BUS_LOG_ERR,
                        "id index points to log record %llu, which is "
                        "another event",
                        (unsigned long long)pos);
        rv = BUS_ECORRUPT;
    } else {
        h->found = true;
        h->pos = pos;
        h->ver = pk.sver;
        h->same_stream =
            pk.stream_len == slen && memcmp(pk.stream, stream, slen) == 0;
    }
    rocksdb_free(v);
    return rv;
}

static int
id_lookup(bus_store *s, const bus_uuid *id, uint32_t seq,
          const bus_uuid *run_max, const char *stream, size_t slen, id_hit *h)
{
    store_writer *w = &s->w;
    uint8_t k[STORE_IDK_LEN];
    store_pid *p;
    uint64_t pos;
    char *v, *err = NULL;
    size_t vlen;
    int rv;

    memset(h, 0, sizeof(*h));
    /* Nothing stored or pending is greater than run_max: a fresh UUIDv7
     * (the usual case) needs no lookup at all. */
    if (memcmp(id->b, run_max->b, 16) > 0)
        return BUS_OK;
    if ((p = pid_find(w, id)) != NULL) {
        h->found = true;
        h->same_req = p->req_seq == seq;
        h->same_stream =
            p->st->len == slen && memcmp(p->st->name, stream, slen) == 0;
        h->pos = p->pos;
        h->ver = p->ver;
        return BUS_OK;
    }
    /* Committed: the tail (memory), an 'e' record, then a run. Above
     * every id of the index's records (the usual stale id: a concurrent
     * appender's, made a moment before ours) only the tail may hold it. */
    if ((pos = tail_find(w, id)) != 0)
        return id_confirm(s, pos, id, stream, slen, h);
    if (memcmp(id->b, w->runs_max.b, 16) > 0)
        return BUS_OK;
    store_key_id(k, STORE_IDK_EXC, id);
    v = rocksdb_get_cf(s->db, s->ro, s->cf[CF_IDS], (const char *)k, sizeof(k),
                       &vlen, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read event id index");
    if (v != NULL) {
        pos = vlen == 8 ? store_get_be64(v) : 0;
        rocksdb_free(v);
        if (pos == 0) {
            bus__store_logf(s, BUS_LOG_ERR, "corrupt id index record");
            return BUS_ECORRUPT;
        }
        return id_confirm(s, pos, id, stream, slen, h);
    }
    if (w->n_recent > 0 && memcmp(id->b, w->recent[0].id.b, 16) >= 0)
        pos = ids_find(w->recent, w->n_recent, id);
    else if ((rv = run_lookup(s, id, &pos)) != BUS_OK)
        return rv;
    if (pos == 0)
        return BUS_OK;
    return id_confirm(s, pos, id, stream, slen, h);
}

/* ---- Processing a request ------------------------------------------------ */

/* What the expected version allows, given the stream's state. */
static int
check_expected(uint64_t expected, uint64_t last, const store_policy *pol)
{
    bool deleted = (pol->flags & STORE_F_DELETED) != 0;

    if (pol->flags & STORE_F_TOMBSTONE)
        return BUS_EDELETED;
    switch (expected) {
    case BUS_STORE_ANY:
        return BUS_OK;
    case BUS_STORE_NO_STREAM:
        return (last == 0 || deleted) ? BUS_OK : BUS_ECONFLICT;
    case BUS_STORE_EXISTS:
        return (last > 0 && !deleted) ? BUS_OK : BUS_ECONFLICT;
    default:
        /* A soft-deleted stream is re-created with NO_STREAM or ANY only:
         * a writer holding an old version must learn of the delete. */
        return (!deleted && last == expected) ? BUS_OK : BUS_ECONFLICT;
    }
}

/* An event as it is stored: the caller's event with the stream, version
 * and position the store gives it. A view (no copy of strings, headers or
 * payload), built field by field because the caller's event may be shared
 * (its reference count changes under us). */
static void
event_view(struct bus_event *v, const bus_event *e, const char *stream,
           size_t slen, uint64_t ver, uint64_t pos)
{
    memset(v, 0, sizeof(*v));
    v->id = e->id;
    v->type = e->type;
    v->type_len = e->type_len;
    v->schema_version = e->schema_version;
    v->stream = stream;
    v->stream_len = (uint32_t)slen;
    v->stream_version = ver;
    v->position = pos;
    v->timestamp = e->timestamp;
    v->n_headers = e->n_headers;
    v->headers = e->headers;
    v->payload = e->payload;
    v->payload_len = e->payload_len;
}

typedef struct req_ctx {
    uint32_t seq;
    size_t nev;       /* events encoded so far in this request */
    size_t bytes;     /* encoded bytes of this request */
    size_t pid0;      /* the request's first entry in w->pids */
    bus_uuid run_max; /* no id stored or pending is greater */
} req_ctx;

static int
enc_event(bus_store *s, req_ctx *rc, const bus_event *e, const char *stream,
          size_t slen, uint64_t ver, uint64_t pos)
{
    store_writer *w = &s->w;
    struct bus_event v;
    size_t need, written;
    int rv;

    event_view(&v, e, stream, slen, ver, pos);
    if (v.type_len == 0)
        return BUS_EINVAL;
    need = bus_codec_encoded_size(&v);
    if (need > s->cfg.max_event_bytes)
        return BUS_ETOOBIG;
    if (rc->bytes + need > s->cfg.max_append_bytes)
        return BUS_ETOOBIG;
    if ((rv = bus__store_buf_reserve(&w->enc, need)) != BUS_OK)
        return rv;
    if ((rv = bus_codec_encode(&v, w->enc.p + w->enc.len, need, &written)) !=
        BUS_OK)
        return rv;
    w->enc_off[rc->nev++] = w->enc.len;
    w->enc.len += written;
    rc->bytes += written;
    return BUS_OK;
}

/* Checks one part (idempotence, expected version), gives versions and
 * positions, encodes the events. Sets part->res. */
static int
do_part(bus_store *s, req_ctx *rc, store_part *pt)
{
    store_writer *w = &s->w;
    bus_store_append_result *res = &pt->res;
    store_stream *st;
    uint64_t last, first_pos = 0, ver0 = 0;
    const store_policy *pol;
    size_t j, nfound = 0;
    bool dup_ok = true, fresh;
    bus_uuid part_max;
    int rv;

    memset(res, 0, sizeof(*res));
    if ((rv = wc_get(s, pt->stream, pt->slen, &st)) != BUS_OK)
        return rv;
    pt->shash = st->hash;
    last = st_last(w, st);
    pol = st_pol(w, st);
    res->current_version = last;

    /* Idempotence: look every id up before anything changes. */
    memset(part_max.b, 0, 16);
    for (j = 0; j < pt->n; j++) {
        const bus_uuid *id = &pt->events[j]->id;
        id_hit h;

        if (memcmp(id->b, part_max.b, 16) > 0) {
            part_max = *id;
        } else {
            size_t i;
            for (i = 0; i < j; i++)
                if (memcmp(pt->events[i]->id.b, id->b, 16) == 0)
                    return BUS_EINVAL; /* same id twice in one append */
        }
        if ((rv = id_lookup(s, id, rc->seq, &rc->run_max, pt->stream, pt->slen,
                            &h)) != BUS_OK)
            return rv;
        if (!h.found)
            continue;
        if (h.same_req)
            return BUS_EINVAL; /* same id in two parts of one request */
        if (nfound == 0) {
            ver0 = h.ver;
            first_pos = h.pos;
        }
        if (nfound != j || !h.same_stream || h.ver != ver0 + j)
            dup_ok = false;
        nfound++;
        res->last_position = h.pos;
    }
    if (nfound > 0) {
        if (nfound != pt->n || !dup_ok)
            return BUS_EEXIST;
        if (pt->expected != BUS_STORE_ANY &&
            pt->expected != BUS_STORE_NO_STREAM &&
            pt->expected != BUS_STORE_EXISTS && pt->expected + 1 != ver0) {
            atomic_fetch_add_explicit(&s->st_conflicts, 1,
                                      memory_order_relaxed);
            return BUS_ECONFLICT;
        }
        res->duplicate = true;
        res->first_version = ver0;
        res->last_version = ver0 + pt->n - 1;
        res->first_position = first_pos;
        atomic_fetch_add_explicit(&s->st_dups, 1, memory_order_relaxed);
        return BUS_OK;
    }

    if ((rv = check_expected(pt->expected, last, pol)) != BUS_OK) {
        if (rv == BUS_ECONFLICT)
            atomic_fetch_add_explicit(&s->st_conflicts, 1,
                                      memory_order_relaxed);
        return rv;
    }
    if (pt->n == 0)
        return BUS_OK;
    if ((rv = st_touch(s, st)) != BUS_OK)
        return rv;
    for (j = 0; j < pt->n; j++) {
        const bus_event *e = pt->events[j];
        uint64_t pos = w->next_pos + j, ver = last + 1 + j;

        if ((rv = enc_event(s, rc, e, pt->stream, pt->slen, ver, pos)) !=
            BUS_OK)
            return rv;
        /* Above every id in the index's records: the tail takes it (the
         * lookup above made sure it is not stored). */
        fresh = memcmp(e->id.b, w->runs_max.b, 16) > 0;
        if ((rv = pid_add(w, &e->id, st, ver, pos, rc->seq, fresh)) != BUS_OK)
            return rv;
        if (memcmp(e->id.b, rc->run_max.b, 16) > 0)
            rc->run_max = e->id;
    }
    st->p_last = last + pt->n;
    st->p_pol.flags &= (uint8_t)~STORE_F_DELETED; /* re-created */
    res->first_version = last + 1;
    res->last_version = last + pt->n;
    res->first_position = w->next_pos;
    res->last_position = w->next_pos + pt->n - 1;
    res->current_version = last + pt->n;
    w->next_pos += pt->n;
    return BUS_OK;
}

/* Puts a checked part's records into the batch; *ev indexes w->enc_off,
 * which ends with a sentinel, and (from rc->pid0) w->pids. A fresh id
 * needs no record here: the tail takes it after the write. */
static void
emit_part(bus_store *s, const req_ctx *rc, const store_part *pt, size_t *ev)
{
    store_writer *w = &s->w;
    uint8_t k[STORE_KEY_BUF], idk[STORE_IDK_LEN], pk[8], run[STORE_RUN_LEN];
    size_t j, klen;

    if (pt->res.duplicate || pt->n == 0)
        return;
    /* One index entry for the whole run. */
    klen = store_key_stream_h(k, pt->shash, pt->stream, pt->slen,
                              pt->res.first_version);
    store_run_encode(run, pt->res.first_position, (uint32_t)pt->n);
    rocksdb_writebatch_put_cf(w->wb, s->cf[CF_STREAMS], (const char *)k, klen,
                              (const char *)run, sizeof(run));
    for (j = 0; j < pt->n; j++, (*ev)++) {
        uint64_t pos = pt->res.first_position + j;
        size_t off = w->enc_off[*ev];
        size_t end = w->enc_off[*ev + 1];

        store_put_be64(pk, pos);
        rocksdb_writebatch_put_cf(w->wb, s->cf[CF_LOG], (const char *)pk, 8,
                                  (const char *)w->enc.p + off, end - off);
        if (!w->pids[rc->pid0 + *ev].fresh) {
            store_key_id(idk, STORE_IDK_EXC, &pt->events[j]->id);
            rocksdb_writebatch_put_cf(w->wb, s->cf[CF_IDS], (const char *)idk,
                                      sizeof(idk), (const char *)pk, 8);
        }
    }
}

void
bus__store_emit_ops(bus_store *s, rocksdb_writebatch_t *wb, const store_op *ops,
                    size_t nops, const uint8_t *bytes)
{
    size_t i;

    for (i = 0; i < nops; i++) {
        const store_op *o = &ops[i];
        if (o->del)
            rocksdb_writebatch_delete_cf(
                wb, s->cf[o->cf], (const char *)bytes + o->koff, o->klen);
        else
            rocksdb_writebatch_put_cf(wb, s->cf[o->cf],
                                      (const char *)bytes + o->koff, o->klen,
                                      (const char *)bytes + o->voff, o->vlen);
    }
}

static int
do_write(bus_store *s, store_req *r, req_ctx *rc)
{
    store_writer *w = &s->w;
    size_t i, ev = 0, total = 0;
    int rv;

    for (i = 0; i < r->nparts; i++)
        total += r->parts[i].n;
    if ((rv = grow((void **)&w->enc_off, &w->enc_cap, total + 1,
                   sizeof(*w->enc_off))) != BUS_OK)
        return rv;
    w->enc.len = 0;
    for (i = 0; i < r->nparts; i++) {
        if ((rv = do_part(s, rc, &r->parts[i])) != BUS_OK) {
            size_t j;
            r->parts[i].res.err = rv;
            for (j = 0; j < r->nparts; j++)
                if (j != i) {
                    memset(&r->parts[j].res, 0, sizeof(r->parts[j].res));
                    r->parts[j].res.err = BUS_ECANCELED;
                }
            return rv;
        }
    }
    /* Everything checked and encoded: now the batch. */
    w->enc_off[rc->nev] = w->enc.len;
    for (i = 0; i < r->nparts; i++)
        emit_part(s, rc, &r->parts[i], &ev);
    bus__store_emit_ops(s, w->wb, r->ops, r->nops, r->opbytes);
    return BUS_OK;
}

static int
do_meta(bus_store *s, store_req *r)
{
    store_writer *w = &s->w;
    store_part *pt = &r->parts[0];
    store_stream *st;
    const store_policy *pol;
    uint64_t last;
    int rv;

    memset(&pt->res, 0, sizeof(pt->res));
    if ((rv = wc_get(s, pt->stream, pt->slen, &st)) != BUS_OK)
        return rv;
    last = st_last(w, st);
    pol = st_pol(w, st);
    pt->res.current_version = last;
    if (pol->flags & STORE_F_TOMBSTONE)
        return BUS_EDELETED;
    if (r->kind == REQ_DELETE) {
        if ((rv = check_expected(pt->expected, last, pol)) != BUS_OK)
            return rv;
        if (!r->hard && (last == 0 || (pol->flags & STORE_F_DELETED)))
            return BUS_ENOTFOUND;
    }
    if ((rv = st_touch(s, st)) != BUS_OK)
        return rv;
    if (r->kind == REQ_META) {
        st->p_pol.max_count = r->meta.max_count;
        st->p_pol.max_age_ms = r->meta.max_age_ms;
        if (r->meta.truncate_before > st->p_pol.truncate_before)
            st->p_pol.truncate_before = r->meta.truncate_before;
    } else if (r->hard) {
        st->p_pol.flags |= STORE_F_TOMBSTONE;
    } else {
        st->p_pol.flags |= STORE_F_DELETED;
        if (last + 1 > st->p_pol.truncate_before)
            st->p_pol.truncate_before = last + 1;
    }
    return BUS_OK;
}

static void
undo_request(store_writer *w, size_t n_touched0, size_t n_pids0,
             uint64_t next_pos0)
{
    while (w->n_undo > 0) {
        store_undo *u = &w->undo[--w->n_undo];
        u->st->p_gen = u->p_gen;
        u->st->p_last = u->p_last;
        u->st->p_pol = u->p_pol;
    }
    w->n_touched = n_touched0;
    pid_truncate(w, n_pids0);
    w->next_pos = next_pos0;
}

/* ---- The id index's tail ------------------------------------------------ */

/* Puts the tail into wb as runs (at most STORE_IDRUN_MAX entries each, and
 * positions within a u32 offset of the run's lowest) and the watermark
 * upto. Returns BUS_OK or BUS_ENOMEM (nothing put). */
#define STORE_IDRUN_MAX 4096u
static int
tail_emit(bus_store *s, rocksdb_writebatch_t *wb, uint64_t upto)
{
    store_writer *w = &s->w;
    uint8_t k[STORE_IDK_LEN], mark[8], *v;
    uint64_t lo, hi;
    size_t i = 0, n, j, size;

    /* Room for the largest run first: nothing is put unless all is. */
    n = w->n_tail < STORE_IDRUN_MAX ? w->n_tail : STORE_IDRUN_MAX;
    w->runbuf.len = 0;
    if (bus__store_buf_reserve(&w->runbuf,
                               STORE_IDRUN_HDR + n * STORE_IDRUN_ENT) != BUS_OK)
        return BUS_ENOMEM;
    while (i < w->n_tail) {
        n = w->n_tail - i;
        if (n > STORE_IDRUN_MAX)
            n = STORE_IDRUN_MAX;
        lo = hi = w->tail[i].pos;
        for (j = 1; j < n; j++) { /* offsets are u32 */
            uint64_t p = w->tail[i + j].pos;
            if ((p < lo ? hi - p : p > hi ? p - lo : 0) > UINT32_MAX) {
                n = j;
                break;
            }
            lo = p < lo ? p : lo;
            hi = p > hi ? p : hi;
        }
        size = STORE_IDRUN_HDR + n * STORE_IDRUN_ENT;
        v = w->runbuf.p;
        store_put_be64(v, lo);
        for (j = 0; j < n; j++) {
            uint8_t *e = v + STORE_IDRUN_HDR + j * STORE_IDRUN_ENT;
            store_put_be32(e, (uint32_t)(w->tail[i + j].pos - lo));
            memcpy(e + 4, w->tail[i + j].id.b, 16);
        }
        store_key_id(k, STORE_IDK_RUN, &w->tail[i].id);
        rocksdb_writebatch_put_cf(wb, s->cf[CF_IDS], (const char *)k, sizeof(k),
                                  (const char *)v, size);
        i += n;
    }
    store_put_be64(mark, upto);
    rocksdb_writebatch_put_cf(wb, s->cf[CF_DEFAULT], STORE_IDX_KEY,
                              strlen(STORE_IDX_KEY), (const char *)mark, 8);
    return BUS_OK;
}

/* Puts an id into the tail, which is sorted by id (mostly in order
 * already: from the end). @thread leader; room was made. */
static void
tail_insert(store_writer *w, const bus_uuid *id, uint64_t pos)
{
    size_t i = w->n_tail;

    while (i > 0 && memcmp(w->tail[i - 1].id.b, id->b, 16) > 0) {
        w->tail[i] = w->tail[i - 1];
        i--;
    }
    w->tail[i].id = *id;
    w->tail[i].pos = pos;
    w->n_tail++;
}

/* The tail was written up to upto. */
static void
tail_flushed(bus_store *s, uint64_t upto)
{
    store_writer *w = &s->w;
    size_t keep;

    if (w->n_tail > 0)
        w->runs_max = w->tail[w->n_tail - 1].id;
    /* Keep the newest entries written (the tail's ids are above all of
     * them): when full, drop the older half to make room (one move per
     * few flushes); if memory is short, keep none, which only costs
     * seeks. */
    if (w->n_tail > STORE_RECENT_IDS / 2) {
        w->n_recent = 0;
    } else if (w->n_tail > 0) {
        keep = w->n_recent + w->n_tail > STORE_RECENT_IDS
                   ? STORE_RECENT_IDS / 2 - w->n_tail
                   : w->n_recent;
        if (keep < w->n_recent)
            memmove(w->recent, w->recent + (w->n_recent - keep),
                    keep * sizeof(*w->recent));
        w->n_recent = keep;
        if (grow((void **)&w->recent, &w->cap_recent, keep + w->n_tail,
                 sizeof(*w->recent)) == BUS_OK) {
            memcpy(w->recent + keep, w->tail, w->n_tail * sizeof(*w->tail));
            w->n_recent += w->n_tail;
        } else {
            w->n_recent = 0;
        }
    }
    w->n_tail = 0;
    w->indexed = upto;
    w->flush_ids = false;
    /* release: the runs written above happen-before a scavenge that
     * acquires the watermark and removes what it covers. */
    atomic_store_explicit(&s->indexed, upto, memory_order_release);
}

void
bus__store_flush_ids_final(bus_store *s)
{
    store_writer *w = &s->w;
    uint64_t head = atomic_load_explicit(&s->head, memory_order_acquire);
    rocksdb_writebatch_t *wb;
    int rv;

    if (s->db == NULL || w->wb == NULL || head <= w->indexed)
        return;
    wb = rocksdb_writebatch_create();
    rv = tail_emit(s, wb, head);
    if (rv == BUS_OK)
        rv =
            bus__store_write_direct(s, wb, s->cfg.durability != BUS_STORE_NONE);
    rocksdb_writebatch_destroy(wb);
    if (rv == BUS_OK)
        tail_flushed(s, head);
    else /* harmless: the next open rebuilds the tail from the log */
        bus__store_logf(s, BUS_LOG_WARN, "id index tail not written: %s",
                        bus_strerror(rv));
}

/* The greatest id of the last record of the id family at or below the
 * key tag + ff..ff: an 'e' record's id, or a run's last entry. */
static int
ids_max(rocksdb_iterator_t *it, char tag, bus_uuid *max)
{
    uint8_t k[STORE_IDK_LEN];
    const char *key, *val;
    size_t kl, vl;

    memset(k + 1, 0xff, 16);
    k[0] = (uint8_t)tag;
    rocksdb_iter_seek_for_prev(it, (const char *)k, sizeof(k));
    if (!rocksdb_iter_valid(it))
        return BUS_OK;
    key = rocksdb_iter_key(it, &kl);
    if (kl == 0 || key[0] != tag)
        return BUS_OK;
    if (kl != STORE_IDK_LEN)
        return BUS_ECORRUPT;
    if (tag == STORE_IDK_EXC) {
        memcpy(max->b, key + 1, 16);
        return BUS_OK;
    }
    val = rocksdb_iter_value(it, &vl);
    if (!store_idrun_ok(vl))
        return BUS_ECORRUPT;
    memcpy(max->b, store_idrun_id(val, store_idrun_n(vl) - 1), 16);
    return BUS_OK;
}

static int
tail_cmp(const void *a, const void *b)
{
    return memcmp(((const store_tail_ent *)a)->id.b,
                  ((const store_tail_ent *)b)->id.b, 16);
}

int
bus__store_ids_recover(bus_store *s)
{
    store_writer *w = &s->w;
    rocksdb_iterator_t *it;
    bus_uuid run_max, exc_max;
    uint8_t k[STORE_IDK_LEN];
    char *v, *err = NULL;
    size_t vlen;
    int rv = BUS_OK;

    memset(&run_max, 0, sizeof(run_max));
    memset(&exc_max, 0, sizeof(exc_max));
    v = rocksdb_get_cf(s->db, s->ro, s->cf[CF_DEFAULT], STORE_IDX_KEY,
                       strlen(STORE_IDX_KEY), &vlen, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read id index watermark");
    if (v != NULL) {
        if (vlen == 8)
            w->indexed = store_get_be64(v);
        else
            rv = BUS_ECORRUPT;
        rocksdb_free(v);
    }
    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_IDS]);
    if (rv == BUS_OK)
        rv = ids_max(it, STORE_IDK_RUN, &run_max);
    if (rv == BUS_OK)
        rv = ids_max(it, STORE_IDK_EXC, &exc_max);
    rocksdb_iter_get_error(it, &err);
    rocksdb_iter_destroy(it);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read event id index");
    if (rv != BUS_OK) {
        bus__store_logf(s, BUS_LOG_ERR, "corrupt id index");
        return rv;
    }
    /* Every id of the index's records is at most runs_max. */
    w->runs_max = memcmp(run_max.b, exc_max.b, 16) > 0 ? run_max : exc_max;

    /* The tail: the records above the watermark without an 'e' record,
     * each above every id of the index's records. */
    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_LOG]);
    store_put_be64(k, w->indexed + 1);
    for (rocksdb_iter_seek(it, (const char *)k, 8);
         rocksdb_iter_valid(it) && rv == BUS_OK; rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        store_peek pk;
        char *x;

        if (kl != 8 || bus__store_peek(val, vl, &pk) != BUS_OK ||
            pk.id == NULL) {
            rv = BUS_ECORRUPT;
            break;
        }
        k[0] = STORE_IDK_EXC;
        memcpy(k + 1, pk.id, 16);
        x = rocksdb_get_cf(s->db, s->ro, s->cf[CF_IDS], (const char *)k,
                           STORE_IDK_LEN, &vlen, &err);
        if (err != NULL)
            break;
        if (x != NULL) {
            if (vlen != 8 || memcmp(x, key, 8) != 0)
                rv = BUS_ECORRUPT;
            rocksdb_free(x);
            continue;
        }
        if (memcmp(pk.id, w->runs_max.b, 16) <= 0) {
            rv = BUS_ECORRUPT;
            break;
        }
        if ((rv = grow((void **)&w->tail, &w->cap_tail, w->n_tail + 1,
                       sizeof(*w->tail))) != BUS_OK)
            break;
        memcpy(w->tail[w->n_tail].id.b, pk.id, 16);
        w->tail[w->n_tail].pos = store_get_be64(key);
        w->n_tail++;
    }
    if (err == NULL)
        rocksdb_iter_get_error(it, &err);
    rocksdb_iter_destroy(it);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "read log");
    if (rv == BUS_ECORRUPT)
        bus__store_logf(s, BUS_LOG_ERR,
                        "log records above position %llu disagree with the "
                        "id index",
                        (unsigned long long)w->indexed);
    if (rv != BUS_OK)
        return rv;
    w->max_id = w->runs_max;
    if (w->n_tail > 0) {
        qsort(w->tail, w->n_tail, sizeof(*w->tail), tail_cmp);
        w->max_id = w->tail[w->n_tail - 1].id; /* above runs_max */
    }
    atomic_store_explicit(&s->indexed, w->indexed, memory_order_relaxed);
    return BUS_OK;
}

/* ---- A group ------------------------------------------------------------- */

/* Processes and writes one group. @thread leader, no lock held. */
static void
write_group(bus_store *s, store_req *g)
{
    store_writer *w = &s->w;
    store_req *r;
    req_ctx rc;
    uint32_t seq = 0;
    size_t i, n_ok = 0, n_fresh = 0;
    bool sync = s->cfg.durability != BUS_STORE_NONE, pol_changed = false;
    bool flush = false, written;
    uint64_t head0 = atomic_load_explicit(&s->head, memory_order_relaxed);
    char *err = NULL;
    int rv;

    w->gen++;
    w->n_touched = 0;
    pid_clear(w);
    w->next_pos = head0 + 1;
    rocksdb_writebatch_clear(w->wb);
    memset(&rc, 0, sizeof(rc));
    rc.run_max = w->max_id;

    for (r = g; r != NULL; r = r->next) {
        size_t nt0 = w->n_touched, np0 = w->n_pids;
        uint64_t pos0 = w->next_pos;
        bus_uuid max0 = rc.run_max;

        rc.seq = ++seq;
        rc.nev = 0;
        rc.bytes = 0;
        rc.pid0 = np0;
        w->n_undo = 0;
        if (r->kind == REQ_WRITE) {
            rv = do_write(s, r, &rc);
        } else if (r->kind == REQ_FLUSH_IDS) {
            w->flush_ids = true;
            rv = BUS_OK;
        } else {
            rv = do_meta(s, r);
        }
        if (rv != BUS_OK) {
            undo_request(w, nt0, np0, pos0);
            rc.run_max = max0;
        } else {
            n_ok++;
        }
        r->rv = rv;
    }
    if (w->run_it != NULL) {
        rocksdb_iter_destroy(w->run_it);
        w->run_it = NULL;
    }
    if (n_ok == 0)
        return;

    /* The id index's tail: every STORE_TAIL_FLUSH positions, or when asked,
     * the fresh events up to the previous group become runs. Out of memory
     * it simply waits for a later group. */
    if (head0 > w->indexed &&
        (w->flush_ids || head0 - w->indexed >= STORE_TAIL_FLUSH))
        flush = tail_emit(s, w->wb, head0) == BUS_OK;
    else if (head0 == w->indexed)
        w->flush_ids = false;
    /* This group's fresh ids were judged against the runs before the
     * flush: those not above the tail just written as runs would lie
     * above the new watermark, below ids of the runs, without an 'e'
     * record (which the recovery rightly calls corrupt, and the lookup
     * would not find): they get their 'e' record instead. An id made by
     * one thread just before another's can be appended after it. */
    if (flush && w->n_tail > 0) {
        const bus_uuid *top = &w->tail[w->n_tail - 1].id;
        uint8_t idk[STORE_IDK_LEN], pk[8];

        for (i = 0; i < w->n_pids; i++) {
            store_pid *p = &w->pids[i];
            if (!p->fresh || memcmp(p->id.b, top->b, 16) > 0)
                continue;
            p->fresh = false;
            store_key_id(idk, STORE_IDK_EXC, &p->id);
            store_put_be64(pk, p->pos);
            rocksdb_writebatch_put_cf(w->wb, s->cf[CF_IDS],
                                      (const char *)idk, sizeof(idk),
                                      (const char *)pk, 8);
        }
    }

    /* Policy records, once per touched stream whose policy changed. */
    for (i = 0; i < w->n_touched; i++) {
        store_stream *st = w->touched[i];
        uint8_t k[STORE_KEY_BUF], v[STORE_POLICY_REC_LEN];
        size_t klen;

        if (!store_policy_eq(&st->p_pol, &st->pol)) {
            klen = store_key_meta(k, 'm', st->name, st->len);
            if (store_policy_is_default(&st->p_pol)) {
                rocksdb_writebatch_delete_cf(w->wb, s->cf[CF_META],
                                             (const char *)k, klen);
            } else {
                bus__store_policy_encode(v, &st->p_pol);
                rocksdb_writebatch_put_cf(w->wb, s->cf[CF_META],
                                          (const char *)k, klen,
                                          (const char *)v, sizeof(v));
            }
        }
    }

    /* Room in the tail for this group's fresh ids, before writing: once
     * written they must go there. */
    for (i = 0; i < w->n_pids; i++)
        n_fresh += w->pids[i].fresh;
    rv = grow((void **)&w->tail, &w->cap_tail,
              (flush ? 0 : w->n_tail) + n_fresh, sizeof(*w->tail));
    if (rv == 0)
        rv = BUS_FAILPOINT("store.write");
    written = rocksdb_writebatch_count(w->wb) > 0;
    if (rv == 0 && written) {
        rocksdb_write(s->db, sync ? s->wo_sync : s->wo, w->wb, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(s, err, "group write");
    }
    if (rv != 0) {
        for (r = g; r != NULL; r = r->next) {
            if (r->rv != BUS_OK)
                continue;
            r->rv = rv;
            for (i = 0; i < r->nparts; i++) {
                memset(&r->parts[i].res, 0, sizeof(r->parts[i].res));
                r->parts[i].res.err = rv;
            }
        }
        w->gen++; /* drop every pending value */
        return;
    }

    /* Written: pending becomes committed. */
    if (flush)
        tail_flushed(s, head0);
    for (i = 0; i < w->n_pids; i++)
        if (w->pids[i].fresh)
            tail_insert(w, &w->pids[i].id, w->pids[i].pos);
    for (i = 0; i < w->n_touched; i++) {
        store_stream *st = w->touched[i];
        st->last = st->p_last;
        if (!store_policy_eq(&st->p_pol, &st->pol)) {
            st->pol = st->p_pol;
            bus__store_pol_set(s, st->name, st->len, &st->pol);
            pol_changed = true;
        }
    }
    w->max_id = rc.run_max;
    if (written)
        atomic_fetch_add_explicit(&s->st_groups, 1, memory_order_relaxed);
    if (written && sync)
        atomic_fetch_add_explicit(&s->st_syncs, 1, memory_order_relaxed);
    if (w->next_pos - 1 != head0) {
        atomic_fetch_add_explicit(&s->st_events, w->next_pos - 1 - head0,
                                  memory_order_relaxed);
        /* release: the records written above happen-before any reader that
         * acquires this head. Stored under ev_mtx so a waiter cannot miss
         * the change between its check and its wait. */
        bus__mutex_lock(&s->ev_mtx);
        atomic_store_explicit(&s->head, w->next_pos - 1, memory_order_release);
        bus__cond_broadcast(&s->ev_cond);
        bus__mutex_unlock(&s->ev_mtx);
    } else if (pol_changed) {
        bus__store_notify(s);
    }
    for (r = g; r != NULL; r = r->next)
        if (r->rv == BUS_OK)
            for (i = 0; i < r->nparts; i++)
                if (!r->parts[i].res.duplicate && r->parts[i].res.err == 0 &&
                    r->kind == REQ_WRITE)
                    atomic_fetch_add_explicit(&s->st_appends, 1,
                                              memory_order_relaxed);
}

/* The store whose asynchronous-append callback this thread runs (the
 * writer thread's, for its whole life): blocking writer calls from there
 * would wait for the thread itself. */
static BUS__TLS bus_store *store_cb_tl;

bool
bus__store_in_callback(const bus_store *s)
{
    return store_cb_tl == s;
}

/* Gives the leader role to whoever leads the queue's head: a waiting
 * caller, or the writer thread for an asynchronous request. @locks wq_mtx */
static void
pass_role(bus_store *s)
{
    store_req *h = s->wq_head;

    if (h == NULL) {
        s->leader_busy = false;
    } else if (h->cb != NULL) {
        s->wr_role = true;
        bus__cond_signal(&s->wr_cond);
    } else {
        h->leader = true;
        bus__cond_signal(&h->cond);
    }
}

/* Leads one group: detaches it from the queue's head (FIFO, capped by
 * max_group_bytes), writes it without the lock, answers it and passes the
 * role on. self (may be NULL) is the caller's own request, not signalled.
 * Returns the group's asynchronous requests, in order, for their
 * callbacks. @locks wq_mtx, held on entry and on return; the caller holds
 * the leader role. */
static store_req *
lead_group(bus_store *s, store_req *self)
{
    store_req *g, *q, *last, *async = NULL, **at = &async;
    size_t cost, n;

    g = s->wq_head;
    last = g;
    cost = g->cost;
    n = 1;
    while (last->next != NULL &&
           cost + last->next->cost <= s->cfg.max_group_bytes) {
        last = last->next;
        cost += last->cost;
        n++;
    }
    s->wq_head = last->next;
    if (s->wq_head == NULL)
        s->wq_tail = NULL;
    last->next = NULL;
    bus__mutex_unlock(&s->wq_mtx);

    write_group(s, g);

    bus__mutex_lock(&s->wq_mtx);
    for (q = g; q != NULL;) {
        store_req *nx = q->next;
        q->done = true;
        if (q->cb != NULL) { /* nobody waits: ours until its callback */
            q->next = NULL;
            *at = q;
            at = &q->next;
        } else if (q != self && q->has_cond) {
            /* Signalled under wq_mtx: the waiter cannot return (and free
             * its request) before we unlock, and we do not touch q after
             * that. */
            bus__cond_signal(&q->cond);
        }
        q = nx;
    }
    s->inflight -= (uint32_t)n;
    pass_role(s);
    if (s->inflight == 0)
        bus__cond_broadcast(&s->wq_idle);
    return async;
}

/* Hands written asynchronous requests to the writer thread, after those
 * already there (commit order). @locks wq_mtx */
static void
cq_append(bus_store *s, store_req *list)
{
    store_req *t = list;

    if (list == NULL)
        return;
    while (t->next != NULL)
        t = t->next;
    if (s->cq_tail != NULL)
        s->cq_tail->next = list;
    else
        s->cq_head = list;
    s->cq_tail = t;
    bus__cond_signal(&s->wr_cond);
}

/* Queues r at the tail. @locks wq_mtx */
static void
enqueue(bus_store *s, store_req *r)
{
    if (s->wq_tail != NULL)
        s->wq_tail->next = r;
    else
        s->wq_head = r;
    s->wq_tail = r;
    s->inflight++;
}

/* A thread leaves the writer's calls (s->callers, which close waits
 * for: it must not free the store under a thread still in them).
 * @locks wq_mtx */
static void
caller_leave(bus_store *s)
{
    if (--s->callers == 0)
        bus__cond_broadcast(&s->wq_idle);
}

int
bus__store_submit(bus_store *s, store_req *r)
{
    store_req *async;

    r->next = NULL;
    r->done = false;
    r->leader = false;
    r->has_cond = false;
    r->rv = BUS_OK;
    if (bus__store_in_callback(s))
        return BUS_EBUSY; /* from a callback: we would wait for ourselves */

    bus__mutex_lock(&s->wq_mtx);
    if (atomic_load_explicit(&s->closing, memory_order_acquire)) {
        bus__mutex_unlock(&s->wq_mtx);
        return BUS_ECLOSED;
    }
    s->callers++;
    enqueue(s, r);
    if (!s->leader_busy) {
        s->leader_busy = true; /* the queue was empty: r is its head */
        r->leader = true;
    } else {
        bus__cond_init(&r->cond);
        r->has_cond = true;
        while (!r->done && !r->leader)
            bus__cond_wait(&r->cond, &s->wq_mtx);
    }
    if (!r->done) {
        /* Leader: r is the queue head. (Writing the next group too,
         * instead of handing the role over, saves a wake-up but makes
         * groups smaller: the threads of the group just answered have not
         * queued again yet. Measured, handing over gave more appends per
         * fsync, which is what counts where fsync is slow.) */
        async = lead_group(s, r);
        cq_append(s, async);
    }
    if (r->has_cond)
        bus__cond_fini(&r->cond);
    caller_leave(s);
    bus__mutex_unlock(&s->wq_mtx);
    return r->rv;
}

/* ---- The writer thread and asynchronous appends -------------------------- */

/* Gives the window back the cost of answered requests. @locks wq_mtx */
static void
window_release(bus_store *s, size_t bytes)
{
    s->async_bytes -= bytes;
    s->wr_released = 0;
    bus__cond_broadcast(&s->async_cond);
    if (s->async_bytes == 0)
        bus__cond_broadcast(&s->wq_idle);
}

/* Runs the callbacks of a list of written asynchronous requests and frees
 * them. A request's cost counts as released (s->wr_released, which an
 * append from a callback subtracts) from its callback on, and is given
 * back to the window every WINDOW_BATCH callbacks. @thread writer */
#define WINDOW_BATCH 64

static void
run_callbacks(bus_store *s, store_req *list)
{
    unsigned k = 0;

    while (list != NULL) {
        store_req *r = list;
        store_part *pt = r->parts;
        bus_store_append_result res = pt->res;
        size_t i;

        list = r->next;
        res.err = r->rv;
        s->wr_released += r->cost;
        r->cb(r->cb_arg, &res);
        for (i = 0; i < pt->n; i++)
            bus_event_unref(pt->events[i]);
        bus__free(r, r->alloc_size);
        if (++k % WINDOW_BATCH == 0 || list == NULL) {
            bus__mutex_lock(&s->wq_mtx);
            window_release(s, s->wr_released);
            bus__mutex_unlock(&s->wq_mtx);
        }
    }
}

static void
writer_main(void *arg)
{
    bus_store *s = arg;
    store_req *list;

    store_cb_tl = s;
    bus__mutex_lock(&s->wq_mtx);
    for (;;) {
        if (s->cq_head != NULL) { /* earlier groups' callbacks first */
            list = s->cq_head;
            s->cq_head = s->cq_tail = NULL;
        } else if (s->wr_role) {
            s->wr_role = false;
            list = lead_group(s, NULL); /* may give the role back to us */
        } else if (s->wr_stop) {
            break;
        } else {
            bus__cond_wait(&s->wr_cond, &s->wq_mtx);
            continue;
        }
        if (list == NULL)
            continue;
        bus__mutex_unlock(&s->wq_mtx);
        run_callbacks(s, list);
        bus__mutex_lock(&s->wq_mtx);
    }
    bus__mutex_unlock(&s->wq_mtx);
}

void
bus__store_writer_thread_stop(bus_store *s)
{
    bool started;

    bus__mutex_lock(&s->wq_mtx);
    s->wr_stop = true;
    started = s->wr_started;
    bus__cond_signal(&s->wr_cond);
    bus__mutex_unlock(&s->wq_mtx);
    if (started)
        bus__thread_join(&s->wr_thread);
}

/* Queues an asynchronous request, waiting for room in the window unless
 * nonblock. @locks takes wq_mtx */
static int
submit_async(bus_store *s, store_req *r, bool nonblock)
{
    bool in_cb = bus__store_in_callback(s);
    size_t busy;
    int rv = BUS_OK;

    if (in_cb)
        nonblock = true; /* the writer thread frees the window */
    bus__mutex_lock(&s->wq_mtx);
    s->callers++;
    for (;;) {
        if (atomic_load_explicit(&s->closing, memory_order_acquire) ||
            s->wr_stop) {
            rv = BUS_ECLOSED;
            goto out;
        }
        /* In flight, less what the callbacks running on this thread have
         * answered (wr_released is the writer thread's own). One request
         * always fits, however large. */
        busy = s->async_bytes - (in_cb ? s->wr_released : 0);
        if (busy == 0 || busy + r->cost <= s->cfg.max_async_bytes)
            break;
        if (nonblock) {
            rv = BUS_EAGAIN;
            goto out;
        }
        bus__cond_wait(&s->async_cond, &s->wq_mtx);
    }
    if (!s->wr_started) {
        if (bus__thread_start(&s->wr_thread, "bus-store-wr", writer_main,
                              s) != BUS_OK) {
            rv = BUS_ENOMEM;
            goto out;
        }
        s->wr_started = true;
    }
    r->next = NULL;
    r->rv = BUS_OK;
    s->async_bytes += r->cost;
    enqueue(s, r);
    if (!s->leader_busy) {
        s->leader_busy = true;
        s->wr_role = true;
        bus__cond_signal(&s->wr_cond);
    }
out:
    caller_leave(s);
    bus__mutex_unlock(&s->wq_mtx);
    return rv;
}

/* ---- Public appends ------------------------------------------------------ */

/* Checks what can be checked on the caller's thread; sets cost. */
static int
check_parts(bus_store *s, store_part *parts, size_t n, size_t *cost)
{
    size_t i, j, nev = 0, c = 0;

    for (i = 0; i < n; i++) {
        store_part *pt = &parts[i];
        if (!bus__store_name_ok(pt->stream, &pt->slen, STORE_MAX_STREAM))
            return BUS_EINVAL;
        if (pt->n > 0 && pt->events == NULL)
            return BUS_EINVAL;
        nev += pt->n;
        if (nev > s->cfg.max_append_events)
            return BUS_ETOOBIG;
        for (j = 0; j < pt->n; j++) {
            const bus_event *e = pt->events[j];
            if (e == NULL || e->type_len == 0)
                return BUS_EINVAL;
            c += e->payload_len + e->type_len + pt->slen + 64;
            for (size_t h = 0; h < e->n_headers; h++)
                c += e->headers[h].klen + e->headers[h].vlen + 4;
        }
    }
    if (c > s->cfg.max_append_bytes)
        return BUS_ETOOBIG;
    *cost = c + 64;
    return BUS_OK;
}

int
bus_store_append(bus_store *s, const char *stream, uint64_t expected_version,
                 bus_event *const *events, size_t n,
                 bus_store_append_result *res)
{
    store_part pt;
    store_req r;
    int rv;

    if (res != NULL)
        memset(res, 0, sizeof(*res));
    if (s == NULL)
        return BUS_EINVAL;
    memset(&pt, 0, sizeof(pt));
    memset(&r, 0, sizeof(r));
    pt.stream = stream;
    pt.expected = expected_version;
    pt.events = events;
    pt.n = n;
    if ((rv = check_parts(s, &pt, 1, &r.cost)) != BUS_OK)
        goto out;
    r.kind = REQ_WRITE;
    r.parts = &pt;
    r.nparts = 1;
    rv = bus__store_submit(s, &r);
out:
    if (res != NULL) {
        *res = pt.res;
        res->err = rv;
    }
    return rv;
}

static size_t
align_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

int
bus_store_append_async(bus_store *s, const char *stream,
                       uint64_t expected_version, bus_event *const *events,
                       size_t n, unsigned flags, bus_store_append_cb cb,
                       void *opaque)
{
    size_t cost, size, off_part, off_ev, off_str, i;
    store_part pt, *p;
    bus_event **evs;
    store_req *r;
    char *str;
    int rv;

    if (s == NULL || cb == NULL || (flags & ~BUS_STORE_NONBLOCK) != 0)
        return BUS_EINVAL;
    memset(&pt, 0, sizeof(pt));
    pt.stream = stream;
    pt.expected = expected_version;
    pt.events = events;
    pt.n = n;
    if ((rv = check_parts(s, &pt, 1, &cost)) != BUS_OK)
        return rv;
    /* One block: the request, its part, the events' array, the stream. */
    off_part = align_up(sizeof(*r), _Alignof(store_part));
    off_ev = align_up(off_part + sizeof(*p), _Alignof(bus_event *));
    off_str = off_ev + n * sizeof(*evs);
    size = off_str + pt.slen + 1;
    if ((r = bus__zalloc(size)) == NULL)
        return BUS_ENOMEM;
    p = (store_part *)((char *)r + off_part);
    evs = (bus_event **)((char *)r + off_ev);
    str = (char *)r + off_str;
    memcpy(str, stream, pt.slen);
    str[pt.slen] = '\0';
    *p = pt;
    p->stream = str;
    p->events = evs;
    for (i = 0; i < n; i++) {
        bus_event_freeze(events[i]);
        evs[i] = bus_event_ref(events[i]);
    }
    r->kind = REQ_WRITE;
    r->parts = p;
    r->nparts = 1;
    r->cost = cost;
    r->cb = cb;
    r->cb_arg = opaque;
    r->alloc_size = size;
    if ((rv = submit_async(s, r, (flags & BUS_STORE_NONBLOCK) != 0))
        != BUS_OK) {
        for (i = 0; i < n; i++)
            bus_event_unref(evs[i]);
        bus__free(r, size);
    }
    return rv;
}

int
bus_store_append_multi(bus_store *s, const bus_store_append_req *reqs, size_t n,
                       bus_store_append_result *results)
{
    store_part local[8], *parts = local;
    store_req r;
    size_t i;
    int rv;

    if (results != NULL)
        memset(results, 0, n * sizeof(*results));
    if (s == NULL || (n > 0 && reqs == NULL))
        return BUS_EINVAL;
    if (n == 0)
        return BUS_OK;
    if (n > 8 && (parts = bus__zalloc(n * sizeof(*parts))) == NULL)
        return BUS_ENOMEM;
    if (n <= 8)
        memset(local, 0, sizeof(local));
    for (i = 0; i < n; i++) {
        parts[i].stream = reqs[i].stream;
        parts[i].expected = reqs[i].expected_version;
        parts[i].events = reqs[i].events;
        parts[i].n = reqs[i].n_events;
    }
    memset(&r, 0, sizeof(r));
    if ((rv = check_parts(s, parts, n, &r.cost)) == BUS_OK) {
        r.kind = REQ_WRITE;
        r.parts = parts;
        r.nparts = n;
        rv = bus__store_submit(s, &r);
    } else {
        for (i = 0; i < n; i++)
            parts[i].res.err = rv;
    }
    if (results != NULL)
        for (i = 0; i < n; i++) {
            results[i] = parts[i].res;
            if (rv != BUS_OK && results[i].err == BUS_OK)
                results[i].err = rv;
        }
    if (parts != local)
        bus__free(parts, n * sizeof(*parts));
    return rv;
}

/* ---- Metadata and deletes ------------------------------------------------ */

static int
submit_meta(bus_store *s, store_req_kind kind, const char *stream,
            uint64_t expected, const bus_store_stream_meta *meta, bool hard)
{
    store_part pt;
    store_req r;
    int rv;

    if (s == NULL)
        return BUS_EINVAL;
    memset(&pt, 0, sizeof(pt));
    memset(&r, 0, sizeof(r));
    if (!bus__store_name_ok(stream, &pt.slen, STORE_MAX_STREAM))
        return BUS_EINVAL;
    pt.stream = stream;
    pt.expected = expected;
    r.kind = kind;
    r.parts = &pt;
    r.nparts = 1;
    r.hard = hard;
    r.cost = 64;
    if (meta != NULL)
        r.meta = *meta;
    /* Before meta_mtx: a caller waiting for the writer thread may hold
     * it. */
    if (bus__store_in_callback(s))
        return BUS_EBUSY;
    /* meta_mtx: a scavenge decides what to remove from the policies; a
     * change must not slip between its decision and its write. */
    bus__mutex_lock(&s->meta_mtx);
    rv = bus__store_submit(s, &r);
    bus__mutex_unlock(&s->meta_mtx);
    return rv;
}

int
bus__store_flush_ids(bus_store *s)
{
    store_req r;

    memset(&r, 0, sizeof(r));
    r.kind = REQ_FLUSH_IDS;
    r.cost = 64;
    return bus__store_submit(s, &r);
}

int
bus_store_stream_set_meta(bus_store *s, const char *stream,
                          const bus_store_stream_meta *meta)
{
    if (meta == NULL)
        return BUS_EINVAL;
    return submit_meta(s, REQ_META, stream, BUS_STORE_ANY, meta, false);
}

int
bus_store_stream_delete(bus_store *s, const char *stream,
                        uint64_t expected_version, bool hard)
{
    return submit_meta(s, REQ_DELETE, stream, expected_version, NULL, hard);
}
