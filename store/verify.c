/*
 * bus_store_verify: checks the store's invariants from one snapshot. Used
 * by the crash tests after every kill and by the bus-store CLI.
 *
 * Invariants (store_impl.h has the key layout):
 * 1. every log record decodes and names a stream and version; its id has
 *    an 'e' record pointing to it, or else a run holds it with its
 *    position (at or below the id index's watermark) or it is in the
 *    writer's tail (above it), greater than every id of the index's
 *    records;
 * 2. every stream's index runs cover contiguous versions (scavenge only
 *    removes prefixes) and each version's position holds a record of that
 *    stream and version;
 * 3. as many indexed versions as records, and as many 'e' records and run
 *    entries as the records that use them, so no entry points anywhere
 *    else (the id family is checked entry by entry only when a count
 *    differs); runs are well formed, ordered and disjoint.
 * Cost: one pass over each family and two point reads per record.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "event_impl.h"
#include "store_impl.h"

typedef struct vctx {
    bus_store *s;
    rocksdb_readoptions_t *ro;
    bus_store_verify_report *r;
    char *errbuf;
    size_t errlen;
    bool deep;        /* look up every index entry's record too */
    uint64_t indexed; /* the id index's watermark */
    uint64_t n_index; /* stream-index entries */
    uint64_t n_exc;   /* 'e' records */
    uint64_t n_run;   /* run entries */
    uint64_t n_exc_used, n_run_used; /* of them, found from the log */
} vctx;

static void vproblem(vctx *v, const char *fmt, ...) BUS_PRINTF(2, 3);

static void
vproblem(vctx *v, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (v->r->problems < 10)
        bus__store_logf(v->s, BUS_LOG_ERR, "verify: %s", msg);
    if (v->r->problems == 0 && v->errbuf != NULL && v->errlen > 0)
        snprintf(v->errbuf, v->errlen, "%s", msg);
    v->r->problems++;
}

static char *
vget(vctx *v, int cf, const void *k, size_t klen, size_t *vlen, int *rv)
{
    char *err = NULL, *val;

    val = rocksdb_get_cf(v->s->db, v->ro, v->s->cf[cf], k, klen, vlen, &err);
    if (err != NULL)
        *rv = bus__store_rdb_err(v->s, err, "verify read");
    return val;
}

/* Where the id index puts the id of the record at pos; *fresh when it
 * has no 'e' record. */
static int
verify_id_of(vctx *v, rocksdb_iterator_t *runs, const bus_event *e,
             uint64_t pos, bool *fresh)
{
    uint8_t k[STORE_IDK_LEN];
    const char *key, *val;
    size_t kl, vl;
    char *x;
    int rv = BUS_OK;

    store_key_id(k, STORE_IDK_EXC, &e->id);
    x = vget(v, CF_IDS, k, sizeof(k), &vl, &rv);
    *fresh = x == NULL;
    if (x != NULL) {
        if (vl != 8 || store_get_be64(x) != pos)
            vproblem(v, "log record %llu: its id's 'e' record points to %s",
                     (unsigned long long)pos,
                     vl != 8 ? "nothing (malformed)" : "another position");
        else
            v->n_exc_used++;
        rocksdb_free(x);
        return rv;
    }
    if (rv != BUS_OK || pos > v->indexed)
        return rv; /* above the watermark: the writer's tail */
    k[0] = STORE_IDK_RUN;
    rocksdb_iter_seek_for_prev(runs, (const char *)k, sizeof(k));
    if (rocksdb_iter_valid(runs)) {
        key = rocksdb_iter_key(runs, &kl);
        val = rocksdb_iter_value(runs, &vl);
        if (kl == STORE_IDK_LEN && key[0] == STORE_IDK_RUN &&
            store_idrun_ok(vl) && store_idrun_find(val, vl, &e->id) == pos) {
            v->n_run_used++;
            return BUS_OK;
        }
    }
    vproblem(v, "log record %llu: id index entry missing",
             (unsigned long long)pos);
    return BUS_OK;
}

/* The greatest id of the id family's records with tag: an 'e' key, or
 * the last entry of the last run. */
static void
verify_ids_max(rocksdb_iterator_t *it, char tag, bus_uuid *max)
{
    uint8_t k[STORE_IDK_LEN];
    const char *key, *val;
    size_t kl, vl;
    const uint8_t *id = NULL;

    k[0] = (uint8_t)tag;
    memset(k + 1, 0xff, 16);
    rocksdb_iter_seek_for_prev(it, (const char *)k, sizeof(k));
    if (!rocksdb_iter_valid(it))
        return;
    key = rocksdb_iter_key(it, &kl);
    val = rocksdb_iter_value(it, &vl);
    if (kl != STORE_IDK_LEN || key[0] != tag)
        return;
    if (tag == STORE_IDK_EXC)
        id = (const uint8_t *)key + 1;
    else if (store_idrun_ok(vl))
        id = store_idrun_id(val, store_idrun_n(vl) - 1);
    if (id != NULL && memcmp(id, max->b, 16) > 0)
        memcpy(max->b, id, 16);
}

static int
verify_log(vctx *v)
{
    rocksdb_iterator_t *it, *runs;
    uint64_t prev = 0;
    bus_uuid max;
    char *err = NULL;
    int rv = BUS_OK;

    memset(&max, 0, sizeof(max));
    runs = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_IDS]);
    verify_ids_max(runs, STORE_IDK_RUN, &max);
    verify_ids_max(runs, STORE_IDK_EXC, &max);
    it = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_LOG]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && rv == 0;
         rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        uint64_t pos;
        bus_event *e;
        bool fresh;

        v->r->events++;
        if (kl != 8) {
            vproblem(v, "log key of %zu bytes", kl);
            continue;
        }
        pos = store_get_be64(key);
        if (pos <= prev)
            vproblem(v, "log position %llu out of order",
                     (unsigned long long)pos);
        prev = pos;
        if (bus__store_decode(v->s, val, vl, pos, &e) != BUS_OK) {
            vproblem(v, "log record %llu does not decode",
                     (unsigned long long)pos);
            continue;
        }
        if (e->stream == NULL || e->stream_version == 0) {
            vproblem(v, "log record %llu has no stream or version",
                     (unsigned long long)pos);
            bus_event_unref(e);
            continue;
        }
        rv = verify_id_of(v, runs, e, pos, &fresh);
        if (rv == BUS_OK && fresh && pos > v->indexed &&
            memcmp(e->id.b, max.b, 16) <= 0)
            vproblem(v,
                     "log record %llu: in the writer's tail, but its id is "
                     "not above the id index's records",
                     (unsigned long long)pos);
        bus_event_unref(e);
    }
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err == NULL)
            rocksdb_iter_get_error(runs, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(v->s, err, "verify log");
    }
    rocksdb_iter_destroy(it);
    rocksdb_iter_destroy(runs);
    return rv;
}

/* Ends one stream's run of index entries: compares with its record. */
static int
verify_stream_end(vctx *v, const char *name, size_t len, uint64_t last_seen)
{
    uint64_t last;
    store_policy pol;
    int rv;

    v->r->streams++;
    rv = bus__store_load_stream(v->s, v->ro, name, len, &last, &pol);
    if (rv == BUS_ECORRUPT) {
        vproblem(v, "stream %.*s: corrupt records", (int)len, name);
        return BUS_OK;
    }
    if (rv != BUS_OK)
        return rv;
    /* last is max(recorded, indexed): below the indexed is impossible,
     * above it only after a scavenge removed the tail. */
    if (last < last_seen)
        vproblem(v, "stream %.*s: last version %llu recorded, %llu indexed",
                 (int)(len > 200 ? 200 : len), name, (unsigned long long)last,
                 (unsigned long long)last_seen);
    return BUS_OK;
}

static int
verify_streams(vctx *v)
{
    rocksdb_iterator_t *it;
    char cur[STORE_MAX_STREAM + 1];
    size_t curlen = 0;
    uint64_t prev = 0;
    bool have = false;
    char *err = NULL;
    int rv = BUS_OK;

    it = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_STREAMS]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && rv == 0;
         rocksdb_iter_next(it)) {
        size_t kl, vl, slen, ll;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        uint64_t first, pos0, n, j;
        uint8_t pk[8];
        store_peek p;
        char *rec;

        if (kl < STORE_SKEY_HASH + 10 || key[kl - 9] != 0 ||
            kl - 9 - STORE_SKEY_HASH > STORE_MAX_STREAM ||
            store_get_be64(key) !=
                store_hash(key + STORE_SKEY_HASH, kl - 9 - STORE_SKEY_HASH)) {
            vproblem(v, "malformed stream index key (%zu bytes)", kl);
            continue;
        }
        slen = kl - 9 - STORE_SKEY_HASH;
        first = store_get_be64(key + kl - 8);
        if (!store_run_decode(val, vl, &pos0, &n)) {
            vproblem(v, "malformed stream index value (%zu bytes)", vl);
            continue;
        }
        if (!have || slen != curlen ||
            memcmp(cur, key + STORE_SKEY_HASH, slen) != 0) {
            if (have && (rv = verify_stream_end(v, cur, curlen, prev)) != 0)
                break;
            memcpy(cur, key + STORE_SKEY_HASH, slen);
            curlen = slen;
            have = true;
        } else if (first != prev + 1) {
            vproblem(v, "stream %.*s: version %llu follows %llu (gap)",
                     (int)(slen > 200 ? 200 : slen), cur,
                     (unsigned long long)first, (unsigned long long)prev);
        }
        prev = first + n - 1;
        /* Each version of the run must be its record. */
        for (j = 0; j < n && rv == BUS_OK; j++) {
            v->n_index++;
            store_put_be64(pk, pos0 + j);
            rec = vget(v, CF_LOG, pk, 8, &ll, &rv);
            if (rec == NULL) {
                vproblem(v, "stream %.*s v%llu: log record %llu missing",
                         (int)(slen > 200 ? 200 : slen), cur,
                         (unsigned long long)(first + j),
                         (unsigned long long)(pos0 + j));
                continue;
            }
            if (bus__store_peek(rec, ll, &p) != BUS_OK || p.sver != first + j ||
                p.stream_len != slen || memcmp(p.stream, cur, slen) != 0)
                vproblem(v,
                         "stream %.*s v%llu: log record %llu is "
                         "another event",
                         (int)(slen > 200 ? 200 : slen), cur,
                         (unsigned long long)(first + j),
                         (unsigned long long)(pos0 + j));
            rocksdb_free(rec);
        }
    }
    if (rv == BUS_OK && have)
        rv = verify_stream_end(v, cur, curlen, prev);
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(v->s, err, "verify streams");
    }
    rocksdb_iter_destroy(it);
    return rv;
}

/* Deep check: the record at pos exists and is the event id. */
static int
verify_points(vctx *v, const uint8_t *id, uint64_t pos)
{
    uint8_t pk[8];
    store_peek p;
    size_t ll;
    char *rec;
    int rv = BUS_OK;

    store_put_be64(pk, pos);
    rec = vget(v, CF_LOG, pk, 8, &ll, &rv);
    if (rec == NULL) {
        if (rv == BUS_OK)
            vproblem(v, "id index entry points to missing log record %llu",
                     (unsigned long long)pos);
        return rv;
    }
    if (bus__store_peek(rec, ll, &p) != BUS_OK || p.id == NULL ||
        memcmp(p.id, id, 16) != 0)
        vproblem(v,
                 "id index entry points to log record %llu of another "
                 "event",
                 (unsigned long long)pos);
    rocksdb_free(rec);
    return BUS_OK;
}

static int
verify_ids(vctx *v)
{
    rocksdb_iterator_t *it;
    uint8_t prev_last[16];
    bool have_run = false;
    char *err = NULL;
    int rv = BUS_OK;

    it = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_IDS]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && rv == 0;
         rocksdb_iter_next(it)) {
        size_t kl, vl, n, j;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);

        if (kl == STORE_IDK_LEN && key[0] == STORE_IDK_EXC && vl == 8) {
            v->n_exc++;
            if (v->deep)
                rv = verify_points(v, (const uint8_t *)key + 1,
                                   store_get_be64(val));
            continue;
        }
        if (kl != STORE_IDK_LEN || key[0] != STORE_IDK_RUN ||
            !store_idrun_ok(vl)) {
            vproblem(v, "malformed id index entry");
            continue;
        }
        /* A run: ids increasing, the key not above the first id, and
         * every id above the previous run's. */
        n = store_idrun_n(vl);
        v->n_run += n;
        if (memcmp(key + 1, store_idrun_id(val, 0), 16) > 0 ||
            (have_run && memcmp(prev_last, key + 1, 16) >= 0))
            vproblem(v, "id run out of order");
        for (j = 0; j < n; j++) {
            if (j > 0 && memcmp(store_idrun_id(val, j - 1),
                                store_idrun_id(val, j), 16) >= 0)
                vproblem(v, "id run entries out of order");
            if (store_idrun_pos(val, j) > v->indexed)
                vproblem(v, "id run entry above the watermark");
            if (v->deep && rv == BUS_OK)
                rv = verify_points(v, store_idrun_id(val, j),
                                   store_idrun_pos(val, j));
        }
        memcpy(prev_last, store_idrun_id(val, n - 1), 16);
        have_run = true;
    }
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(v->s, err, "verify ids");
    }
    rocksdb_iter_destroy(it);
    return rv;
}

int
bus_store_verify(bus_store *s, bus_store_verify_report *r, char *errbuf,
                 size_t errbuf_len)
{
    bus_store_verify_report local;
    const rocksdb_snapshot_t *snap;
    vctx v;
    int rv = BUS_OK;

    if (r == NULL)
        r = &local;
    memset(r, 0, sizeof(*r));
    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
    if (s == NULL)
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    v.s = s;
    v.r = r;
    v.errbuf = errbuf;
    v.errlen = errbuf_len;
    v.ro = rocksdb_readoptions_create();
    snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_set_snapshot(v.ro, snap);
    /* Every indexed version was checked to be its record, and every
     * record's id entry to point back to it; with as many indexed versions
     * and id entries as the records use there is nothing else. When an id
     * count differs the entries are looked up one by one to name the
     * strays. */
    v.deep = false;
    v.indexed = 0;
    v.n_index = v.n_exc = v.n_run = v.n_exc_used = v.n_run_used = 0;
    {
        size_t vl;
        char *x = vget(&v, CF_DEFAULT, STORE_IDX_KEY, strlen(STORE_IDX_KEY),
                       &vl, &rv);
        if (x != NULL && vl == 8)
            v.indexed = store_get_be64(x);
        else if (x != NULL)
            vproblem(&v, "malformed id index watermark");
        rocksdb_free(x);
    }
    if (rv == BUS_OK)
        rv = verify_log(&v);
    if (rv == BUS_OK)
        rv = verify_streams(&v);
    if (rv == BUS_OK)
        rv = verify_ids(&v);
    if (rv == BUS_OK && v.n_index != r->events)
        vproblem(&v, "%llu log records, %llu indexed versions",
                 (unsigned long long)r->events, (unsigned long long)v.n_index);
    if (rv == BUS_OK && (v.n_exc != v.n_exc_used || v.n_run != v.n_run_used)) {
        vproblem(&v,
                 "%llu 'e' records and %llu run entries, of which the log "
                 "uses %llu and %llu",
                 (unsigned long long)v.n_exc, (unsigned long long)v.n_run,
                 (unsigned long long)v.n_exc_used,
                 (unsigned long long)v.n_run_used);
        v.deep = true;
        v.n_exc = v.n_run = 0;
        rv = verify_ids(&v);
    }
    rocksdb_release_snapshot(s->db, snap);
    rocksdb_readoptions_destroy(v.ro);
    return rv;
}
