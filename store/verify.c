/*
 * bus_store_verify: checks the store's invariants from one snapshot. Used
 * by the crash tests after every kill and by the bus-store CLI.
 *
 * Invariants (store_impl.h has the key layout):
 * 1. every log record decodes, names a stream and version, and the id
 *    index maps its id to (position, version, stream);
 * 2. every stream's index runs cover contiguous versions (scavenge only
 *    removes prefixes) and each version's position holds a record of that
 *    stream and version;
 * 3. as many indexed versions and id entries as records, so no entry
 *    points anywhere else (id entries are checked one by one only when
 *    their count differs).
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
    uint64_t n_index; /* stream-index entries */
    uint64_t n_ids;   /* id-index entries */
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

static int
verify_log(vctx *v)
{
    rocksdb_iterator_t *it;
    uint64_t prev = 0;
    char *err = NULL;
    int rv = BUS_OK;

    it = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_LOG]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && rv == 0;
         rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        uint64_t pos;
        bus_event *e;
        char *x;

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
        x = vget(v, CF_IDS, e->id.b, 16, &vl, &rv);
        if (x == NULL || vl != 16 + e->stream_len || store_get_be64(x) != pos ||
            store_get_be64(x + 8) != e->stream_version ||
            memcmp(x + 16, e->stream, e->stream_len) != 0)
            vproblem(v, "log record %llu: id index entry %s",
                     (unsigned long long)pos,
                     x == NULL ? "missing" : "differs");
        rocksdb_free(x);
        bus_event_unref(e);
    }
    if (rv == BUS_OK) {
        rocksdb_iter_get_error(it, &err);
        if (err != NULL)
            rv = bus__store_rdb_err(v->s, err, "verify log");
    }
    rocksdb_iter_destroy(it);
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

static int
verify_ids(vctx *v)
{
    rocksdb_iterator_t *it;
    char *err = NULL;
    int rv = BUS_OK;

    it = rocksdb_create_iterator_cf(v->s->db, v->ro, v->s->cf[CF_IDS]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && rv == 0;
         rocksdb_iter_next(it)) {
        size_t kl, vl, ll;
        const char *key = rocksdb_iter_key(it, &kl);
        const char *val = rocksdb_iter_value(it, &vl);
        uint8_t pk[8];
        bus_event *e;
        char *rec;

        if (kl != 16 || vl < 16) {
            vproblem(v, "malformed id index entry");
            continue;
        }
        v->n_ids++;
        if (!v->deep)
            continue;
        memcpy(pk, val, 8);
        rec = vget(v, CF_LOG, pk, 8, &ll, &rv);
        if (rec == NULL) {
            vproblem(v, "id index entry points to missing log record %llu",
                     (unsigned long long)store_get_be64(pk));
            continue;
        }
        if (bus__store_decode(v->s, rec, ll, store_get_be64(pk), &e) ==
            BUS_OK) {
            if (memcmp(e->id.b, key, 16) != 0)
                vproblem(v,
                         "id index entry points to log record %llu of "
                         "another event",
                         (unsigned long long)store_get_be64(pk));
            bus_event_unref(e);
        }
        rocksdb_free(rec);
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
    int rv;

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
     * and id entries as records there is nothing else. When the id count
     * differs the id entries are looked up one by one to name the
     * strays. */
    v.deep = false;
    v.n_index = v.n_ids = 0;
    rv = verify_log(&v);
    if (rv == BUS_OK)
        rv = verify_streams(&v);
    if (rv == BUS_OK)
        rv = verify_ids(&v);
    if (rv == BUS_OK && (v.n_index != r->events || v.n_ids != r->events)) {
        vproblem(&v,
                 "%llu log records, %llu indexed versions, %llu id "
                 "entries",
                 (unsigned long long)r->events, (unsigned long long)v.n_index,
                 (unsigned long long)v.n_ids);
        if (v.n_ids != r->events) {
            v.deep = true;
            rv = verify_ids(&v);
        }
    }
    rocksdb_release_snapshot(s->db, snap);
    rocksdb_readoptions_destroy(v.ro);
    return rv;
}
