/*
 * Scavenge: physically removes what stream metadata and deletes already
 * hide from reads, and optionally compacts so the space returns to the
 * file system.
 *
 * Design:
 * - Only streams with a policy can hide anything, and the readers' policy
 *   table lists exactly those: scavenge copies its names, then handles one
 *   stream at a time under meta_mtx (so no metadata change slips between
 *   the decision and the deletes), re-reading the stream's records.
 * - What goes is always a prefix of the stream: the versions below the
 *   first visible one (truncate-before, max count, and for max age the
 *   versions up to the first event young enough). Removing a prefix keeps
 *   every stream's remaining versions contiguous, which verify checks.
 *   A tombstoned stream loses all its events; its records stay, so it is
 *   never re-created and a soft-deleted one continues its versions.
 * - For each removed event the log record and its event-id entry (its
 *   'e' record, or its entry in an id run, which keeps its key) are
 *   deleted, and its stream-index run is shortened or deleted, in the same
 *   batch (batches end between stream-index runs, after at least 1024
 *   events or 64 changed id runs, not synced: a scavenge cut short by a
 *   crash is simply done again).
 * - It first has the writer put its id tail into runs, and then stops at
 *   that watermark: events appended while it runs wait for the next
 *   scavenge (the writer's tail is its own, in memory).
 *   Each batch also records the head as a floor, since the log's last
 *   record may go and the head is recovered from the log, and the
 *   stream's last version ('v'), since it is otherwise the greatest index
 *   entry and the tail may go.
 *   Appends continue meanwhile: they only add versions above the last,
 *   which never lowers the first visible version.
 */
#include <string.h>

#include "alloc.h"
#include "store_impl.h"
#include "testing.h"

#define SCAVENGE_BATCH 1024

typedef struct scv_name {
    char *name;
    size_t len;
} scv_name;

/* Copies the names of the streams that have a policy. */
static int
scv_names(bus_store *s, scv_name **out, size_t *n, size_t *capp)
{
    size_t cap, i, k = 0;
    scv_name *v;
    int rv = BUS_OK;

    *out = NULL;
    *n = 0;
    bus__mutex_lock(&s->pol_mtx);
    cap = atomic_load(&s->n_pol);
    *capp = cap;
    if (cap == 0) {
        bus__mutex_unlock(&s->pol_mtx);
        return BUS_OK;
    }
    if ((v = bus__zalloc(cap * sizeof(*v))) == NULL) {
        bus__mutex_unlock(&s->pol_mtx);
        return BUS_ENOMEM;
    }
    for (i = 0; i < s->pol_tab_size && rv == BUS_OK; i++) {
        store_pol_ent *e;
        for (e = s->pol_tab[i]; e != NULL && k < cap; e = e->next) {
            if ((v[k].name = bus__alloc(e->len + 1)) == NULL) {
                rv = BUS_ENOMEM;
                break;
            }
            memcpy(v[k].name, e->name, e->len);
            v[k].name[e->len] = '\0';
            v[k].len = e->len;
            k++;
        }
    }
    bus__mutex_unlock(&s->pol_mtx);
    *out = v;
    *n = k;
    return rv;
}

static void
scv_names_free(scv_name *v, size_t n, size_t cap)
{
    size_t i;

    for (i = 0; i < n; i++)
        bus__free(v[i].name, v[i].len + 1);
    bus__free(v, cap * sizeof(*v));
}

/* The log record of a position; *val valid until rocksdb_free. */
static int
scv_log_get(bus_store *s, uint64_t pos, char **val, size_t *vlen)
{
    uint8_t k[8];
    char *err = NULL;

    store_put_be64(k, pos);
    *val = rocksdb_get_cf(s->db, s->ro, s->cf[CF_LOG], (const char *)k, 8, vlen,
                          &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "scavenge read");
    return BUS_OK;
}

/* A run of the id index that this batch changes (store_impl.h, "The
 * event-id index"): its key stays, entries go. */
typedef struct scv_run {
    uint8_t key[STORE_IDK_LEN];
    uint8_t *val;
    size_t len, cap;
} scv_run;

/* One stream's scavenge: the batch and the id runs it changes. */
typedef struct scv_ctx {
    bus_store *s;
    rocksdb_writebatch_t *wb;
    rocksdb_iterator_t *ids; /* finds run keys (values are read fresh) */
    scv_run *runs;
    size_t n_runs, cap_runs;
} scv_ctx;

#define SCAVENGE_DIRTY_RUNS 64

static void
scv_runs_clear(scv_ctx *c)
{
    size_t i;

    for (i = 0; i < c->n_runs; i++)
        bus__free(c->runs[i].val, c->runs[i].cap);
    c->n_runs = 0;
}

/* Removes the index entry of the event id at pos: its 'e' record, or its
 * entry in a run (loaded into c->runs, written with the batch). */
static int
scv_unindex(scv_ctx *c, const uint8_t *id, uint64_t pos)
{
    bus_store *s = c->s;
    uint8_t k[STORE_IDK_LEN];
    const char *key;
    char *v, *err = NULL;
    size_t vlen, kl, i, n, j;
    scv_run *r = NULL;

    k[0] = STORE_IDK_EXC;
    memcpy(k + 1, id, 16);
    v = rocksdb_get_cf(s->db, s->ro, s->cf[CF_IDS], (const char *)k, sizeof(k),
                       &vlen, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "scavenge read");
    if (v != NULL) {
        rocksdb_free(v);
        rocksdb_writebatch_delete_cf(c->wb, s->cf[CF_IDS], (const char *)k,
                                     sizeof(k));
        return BUS_OK;
    }
    /* In a run: one this batch already changes, or the one with the
     * greatest key not above the id. */
    for (i = 0; i < c->n_runs && r == NULL; i++)
        if (memcmp(c->runs[i].key + 1, id, 16) <= 0 &&
            c->runs[i].len > STORE_IDRUN_HDR &&
            memcmp(store_idrun_id(c->runs[i].val,
                                  store_idrun_n(c->runs[i].len) - 1),
                   id, 16) >= 0)
            r = &c->runs[i];
    if (r == NULL) {
        k[0] = STORE_IDK_RUN;
        rocksdb_iter_seek_for_prev(c->ids, (const char *)k, sizeof(k));
        if (!rocksdb_iter_valid(c->ids))
            return BUS_OK; /* not indexed: nothing to remove */
        key = rocksdb_iter_key(c->ids, &kl);
        if (kl != STORE_IDK_LEN || key[0] != STORE_IDK_RUN)
            return BUS_OK;
        memcpy(k, key, sizeof(k));
        for (i = 0; i < c->n_runs; i++)
            if (memcmp(c->runs[i].key, k, sizeof(k)) == 0)
                break;
        if (i == c->n_runs) {
            if (c->n_runs == c->cap_runs) {
                size_t ncap = c->cap_runs ? c->cap_runs * 2 : 8;
                scv_run *nr =
                    bus__realloc(c->runs, c->cap_runs * sizeof(*c->runs),
                                 ncap * sizeof(*c->runs));
                if (nr == NULL)
                    return BUS_ENOMEM;
                c->runs = nr;
                c->cap_runs = ncap;
            }
            /* Its value now, not the iterator's: an earlier batch of this
             * scavenge may have changed it. */
            v = rocksdb_get_cf(s->db, s->ro, s->cf[CF_IDS], (const char *)k,
                               sizeof(k), &vlen, &err);
            if (err != NULL)
                return bus__store_rdb_err(s, err, "scavenge read");
            if (v == NULL)
                return BUS_OK;
            if (!store_idrun_ok(vlen)) {
                rocksdb_free(v);
                return BUS_ECORRUPT;
            }
            r = &c->runs[c->n_runs];
            if ((r->val = bus__alloc(vlen)) == NULL) {
                rocksdb_free(v);
                return BUS_ENOMEM;
            }
            memcpy(r->val, v, vlen);
            rocksdb_free(v);
            memcpy(r->key, k, sizeof(k));
            r->len = r->cap = vlen;
            c->n_runs++;
        } else {
            r = &c->runs[i];
        }
    }
    n = store_idrun_n(r->len);
    for (j = 0; j < n; j++)
        if (memcmp(store_idrun_id(r->val, j), id, 16) == 0 &&
            store_idrun_pos(r->val, j) == pos)
            break;
    if (j == n)
        return BUS_OK;
    memmove(r->val + STORE_IDRUN_HDR + j * STORE_IDRUN_ENT,
            r->val + STORE_IDRUN_HDR + (j + 1) * STORE_IDRUN_ENT,
            (n - j - 1) * STORE_IDRUN_ENT);
    r->len -= STORE_IDRUN_ENT;
    return BUS_OK;
}

/* Writes a batch of deletes with the changed id runs and the head floor:
 * the log's last record may be among them, and positions must never be
 * given again after a reopen (store.c recovers the head as the greater of
 * the last log key and the floor). @locks meta_mtx held, so floors are
 * written in increasing order. */
static int
scv_write(scv_ctx *c, const char *name, size_t len, uint64_t last)
{
    bus_store *s = c->s;
    uint8_t v[8], k[STORE_KEY_BUF];
    size_t klen, i;
    int rv;

    for (i = 0; i < c->n_runs; i++) {
        scv_run *r = &c->runs[i];
        if (r->len == STORE_IDRUN_HDR)
            rocksdb_writebatch_delete_cf(c->wb, s->cf[CF_IDS],
                                         (const char *)r->key, sizeof(r->key));
        else
            rocksdb_writebatch_put_cf(c->wb, s->cf[CF_IDS],
                                      (const char *)r->key, sizeof(r->key),
                                      (const char *)r->val, r->len);
    }
    store_put_be64(v, bus_store_head(s));
    rocksdb_writebatch_put_cf(c->wb, s->cf[CF_DEFAULT], STORE_FLOOR_KEY,
                              strlen(STORE_FLOOR_KEY), (const char *)v, 8);
    /* The stream's last version is its greatest index entry; the tail may
     * go, so record it. */
    klen = store_key_meta(k, 'v', name, len);
    store_put_be64(v, last);
    rocksdb_writebatch_put_cf(c->wb, s->cf[CF_META], (const char *)k, klen,
                              (const char *)v, 8);
    rv = bus__store_write_direct(s, c->wb, false);
    rocksdb_writebatch_clear(c->wb);
    scv_runs_clear(c);
    return rv;
}

/* Removes versions below cut of one stream, at positions up to upto (the
 * id index's watermark: later events are in the writer's tail, which a
 * scavenge leaves alone). @locks meta_mtx held. */
static int
scv_stream(bus_store *s, const char *name, size_t len, uint64_t upto,
           uint64_t *removed)
{
    rocksdb_iterator_t *it;
    uint8_t k[STORE_KEY_BUF];
    uint64_t last, cut;
    int64_t now_ms = bus__clock_real_ns() / 1000000;
    store_policy pol;
    size_t klen, inbatch = 0;
    scv_ctx c;
    char *err = NULL;
    int rv;

    if ((rv = bus__store_load_stream(s, s->ro, name, len, &last, &pol)) !=
        BUS_OK)
        return rv;
    if (pol.flags & STORE_F_TOMBSTONE) {
        cut = UINT64_MAX;
    } else {
        cut = 1;
        if (pol.truncate_before > cut)
            cut = pol.truncate_before;
        if (pol.max_count != 0 && last >= pol.max_count &&
            last - pol.max_count + 1 > cut)
            cut = last - pol.max_count + 1;
    }
    memset(&c, 0, sizeof(c));
    c.s = s;
    c.wb = rocksdb_writebatch_create();
    c.ids = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_IDS]);
    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_STREAMS]);
    klen = store_key_stream(k, name, len, 0);
    for (rocksdb_iter_seek(it, (const char *)k, klen);
         rocksdb_iter_valid(it) && rv == BUS_OK; rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        uint64_t first, pos0, n, j, keep = 0;
        uint8_t nk[STORE_KEY_BUF], nv[STORE_RUN_LEN];
        bool stop = false;

        if (!store_key_stream_match(key, kl, k, len, &first))
            break;
        if (!store_run_decode(val, vl, &pos0, &n)) {
            rv = BUS_ECORRUPT;
            break;
        }
        /* The run's versions from the front: drop while hidden. */
        for (j = 0; j < n; j++) {
            uint64_t ver = first + j, pos = pos0 + j;
            uint8_t pk[8];
            size_t lvl;
            char *rec;
            store_peek pk2;
            bool drop = ver < cut;

            if (pos > upto)
                break; /* the writer's tail: next time */
            if (!drop && pol.max_age_ms == 0)
                break; /* the rest is visible */
            if ((rv = scv_log_get(s, pos, &rec, &lvl)) != BUS_OK)
                break;
            if (rec != NULL && bus__store_peek(rec, lvl, &pk2) != BUS_OK) {
                rocksdb_free(rec);
                rv = BUS_ECORRUPT;
                break;
            }
            /* Max age: drop the prefix of events too old, stop at the
             * first young enough (later ones stay, whatever their age). */
            if (rec != NULL && !drop &&
                !bus__store_visible(&pol, last, ver, pk2.ts, now_ms))
                drop = true;
            if (!drop) {
                rocksdb_free(rec);
                break;
            }
            if (rec != NULL && pk2.id != NULL)
                rv = scv_unindex(&c, pk2.id, pos);
            rocksdb_free(rec);
            if (rv != BUS_OK)
                break;
            store_put_be64(pk, pos);
            rocksdb_writebatch_delete_cf(c.wb, s->cf[CF_LOG], (const char *)pk,
                                         8);
            (*removed)++;
            inbatch++;
        }
        if (rv != BUS_OK)
            break;
        keep = j;
        if (keep == 0)
            break; /* nothing of this run goes: done */
        /* The run loses its first keep versions: replace its entry. */
        rocksdb_writebatch_delete_cf(c.wb, s->cf[CF_STREAMS], key, kl);
        if (keep < n) {
            size_t nkl = store_key_stream(nk, name, len, first + keep);
            store_run_encode(nv, pos0 + keep, (uint32_t)(n - keep));
            rocksdb_writebatch_put_cf(c.wb, s->cf[CF_STREAMS], (const char *)nk,
                                      nkl, (const char *)nv, sizeof(nv));
            stop = true;
        }
        /* Batches end between runs, so index and records agree. */
        if (inbatch >= SCAVENGE_BATCH || c.n_runs >= SCAVENGE_DIRTY_RUNS) {
            if ((rv = scv_write(&c, name, len, last)) != BUS_OK)
                break;
            inbatch = 0;
        }
        if (stop)
            break;
    }
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err == NULL)
            rocksdb_iter_get_error(c.ids, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(s, err, "scavenge");
    }
    if (rv == BUS_OK && rocksdb_writebatch_count(c.wb) > 0)
        rv = scv_write(&c, name, len, last);
    scv_runs_clear(&c);
    bus__free(c.runs, c.cap_runs * sizeof(*c.runs));
    rocksdb_writebatch_destroy(c.wb);
    rocksdb_iter_destroy(c.ids);
    rocksdb_iter_destroy(it);
    return rv;
}

int
bus_store_scavenge(bus_store *s, bool compact, bus_store_scavenge_stats *st)
{
    bus_store_scavenge_stats local;
    scv_name *names;
    size_t n, i, cap;
    uint64_t upto;
    int rv;

    if (st == NULL)
        st = &local;
    memset(st, 0, sizeof(*st));
    if (s == NULL)
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if ((rv = BUS_FAILPOINT("store.scavenge")) != 0)
        return rv;
    /* Everything appended so far into the id index's runs, so that this
     * scavenge may remove it (scv_stream stops at the watermark). */
    if ((rv = bus__store_flush_ids(s)) != BUS_OK)
        return rv;
    upto = atomic_load_explicit(&s->indexed, memory_order_acquire);
    if ((rv = scv_names(s, &names, &n, &cap)) != BUS_OK) {
        if (names != NULL)
            scv_names_free(names, n, cap);
        return rv;
    }
    for (i = 0; i < n && rv == BUS_OK; i++) {
        bus__mutex_lock(&s->meta_mtx);
        rv = scv_stream(s, names[i].name, names[i].len, upto,
                        &st->events_removed);
        bus__mutex_unlock(&s->meta_mtx);
        st->streams++;
    }
    if (names != NULL)
        scv_names_free(names, n, cap);
    if (rv == BUS_OK && compact) {
        rocksdb_compactoptions_t *co = rocksdb_compactoptions_create();
        int c;
        /* Force the bottommost level too: that is where deleted values
         * sit in an old store, and the point is to free their space. */
        rocksdb_compactoptions_set_bottommost_level_compaction(co, 2);
        for (c = 0; c < CF_COUNT; c++)
            rocksdb_compact_range_cf_opt(s->db, s->cf[c], co, NULL, 0, NULL, 0);
        rocksdb_compactoptions_destroy(co);
    }
    bus__store_logf(s, BUS_LOG_INFO,
                    "scavenge: %llu streams, %llu events removed",
                    (unsigned long long)st->streams,
                    (unsigned long long)st->events_removed);
    return rv;
}
