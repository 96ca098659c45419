/*
 * Transactions: application-family writes, checkpoints and appends
 * collected by one thread and committed in one RocksDB write through the
 * group writer (writer.c), all or nothing.
 *
 * Design: a transaction is a log of operations whose keys and values live
 * in one growing byte buffer (offsets, not pointers, so growth is free),
 * plus the appends with a reference to each event. Reads see the
 * transaction's own writes first (a backward scan of the log: transactions
 * are small), then the database. Projectors reuse one transaction per
 * batch with a key prefix (their namespace) and roll back a failed event's
 * writes by truncating the log (projector.c).
 */
#include <string.h>

#include "alloc.h"
#include "event_impl.h"
#include "store_impl.h"

void
bus__store_txn_init(bus_store_txn *t, bus_store *s)
{
    memset(t, 0, sizeof(*t));
    t->s = s;
}

void
bus__store_txn_clear(bus_store_txn *t)
{
    size_t i;

    for (i = 0; i < t->nevs; i++)
        bus_event_unref(t->evs[i]);
    t->nevs = 0;
    t->nops = 0;
    t->nparts = 0;
    t->bytes.len = 0;
}

void
bus__store_txn_fini(bus_store_txn *t)
{
    bus__store_txn_clear(t);
    bus__store_buf_free(&t->bytes);
    bus__free(t->ops, t->cap_ops * sizeof(*t->ops));
    bus__free(t->parts, t->cap_parts * sizeof(*t->parts));
    bus__free(t->evs, t->cap_evs * sizeof(*t->evs));
    t->ops = NULL;
    t->parts = NULL;
    t->evs = NULL;
    t->cap_ops = t->cap_parts = t->cap_evs = 0;
}

void
bus__store_txn_truncate(bus_store_txn *t, size_t nops, size_t nbytes)
{
    t->nops = nops;
    t->bytes.len = nbytes;
}

static int
txn_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    size_t ncap;
    void *np;

    if (need <= *cap)
        return BUS_OK;
    ncap = *cap ? *cap * 2 : 16;
    while (ncap < need)
        ncap *= 2;
    if ((np = bus__realloc(*p, *cap * elem, ncap * elem)) == NULL)
        return BUS_ENOMEM;
    *p = np;
    *cap = ncap;
    return BUS_OK;
}

int
bus__store_txn_put_raw(bus_store_txn *t, int cf, const void *k1, size_t k1len,
                       const void *k2, size_t k2len, const void *v, size_t vlen,
                       bool del)
{
    size_t len0 = t->bytes.len;
    store_op *o;
    int rv;

    if ((rv = txn_grow((void **)&t->ops, &t->cap_ops, t->nops + 1,
                       sizeof(*t->ops))) != BUS_OK)
        return rv;
    if ((rv = bus__store_buf_reserve(&t->bytes, k1len + k2len + vlen)) !=
        BUS_OK)
        return rv;
    o = &t->ops[t->nops];
    o->cf = (uint8_t)cf;
    o->del = del;
    o->koff = len0;
    o->klen = k1len + k2len;
    if (k1len > 0)
        memcpy(t->bytes.p + t->bytes.len, k1, k1len);
    t->bytes.len += k1len;
    if (k2len > 0)
        memcpy(t->bytes.p + t->bytes.len, k2, k2len);
    t->bytes.len += k2len;
    o->voff = t->bytes.len;
    o->vlen = del ? 0 : vlen;
    if (!del && vlen > 0) {
        memcpy(t->bytes.p + t->bytes.len, v, vlen);
        t->bytes.len += vlen;
    }
    t->nops++;
    return BUS_OK;
}

static int
txn_cf(bus_store_family fam)
{
    return fam == BUS_STORE_APP      ? CF_APP
           : fam == BUS_STORE_OUTBOX ? CF_OUTBOX
                                     : -1;
}

int
bus_store_txn_begin(bus_store *s, bus_store_txn **out)
{
    bus_store_txn *t;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (s == NULL)
        return BUS_EINVAL;
    if (atomic_load_explicit(&s->closing, memory_order_acquire))
        return BUS_ECLOSED;
    if ((t = bus__alloc(sizeof(*t))) == NULL)
        return BUS_ENOMEM;
    bus__store_txn_init(t, s);
    *out = t;
    return BUS_OK;
}

static bool
txn_prefixed(const bus_store_txn *t, int cf)
{
    return cf == CF_APP && t->plen > 0;
}

int
bus_store_txn_put(bus_store_txn *t, bus_store_family fam, const void *key,
                  size_t klen, const void *val, size_t vlen)
{
    int cf = txn_cf(fam);

    if (t == NULL || cf < 0 || key == NULL || klen == 0 ||
        (val == NULL && vlen > 0))
        return BUS_EINVAL;
    if (klen > STORE_MAX_KEY || vlen > t->s->cfg.max_event_bytes)
        return BUS_ETOOBIG;
    if (txn_prefixed(t, cf))
        return bus__store_txn_put_raw(t, cf, t->prefix, t->plen, key, klen, val,
                                      vlen, false);
    return bus__store_txn_put_raw(t, cf, key, klen, NULL, 0, val, vlen, false);
}

int
bus_store_txn_delete(bus_store_txn *t, bus_store_family fam, const void *key,
                     size_t klen)
{
    int cf = txn_cf(fam);

    if (t == NULL || cf < 0 || key == NULL || klen == 0)
        return BUS_EINVAL;
    if (klen > STORE_MAX_KEY)
        return BUS_ETOOBIG;
    if (txn_prefixed(t, cf))
        return bus__store_txn_put_raw(t, cf, t->prefix, t->plen, key, klen,
                                      NULL, 0, true);
    return bus__store_txn_put_raw(t, cf, key, klen, NULL, 0, NULL, 0, true);
}

int
bus_store_txn_get(bus_store_txn *t, bus_store_family fam, const void *key,
                  size_t klen, void **val, size_t *vlen)
{
    int cf = txn_cf(fam);
    uint8_t small[256], *full = small;
    size_t flen, i;
    char *v, *err = NULL;
    size_t n;
    int rv = BUS_OK;

    if (val != NULL)
        *val = NULL;
    if (vlen != NULL)
        *vlen = 0;
    if (t == NULL || cf < 0 || key == NULL || klen == 0 || val == NULL ||
        vlen == NULL)
        return BUS_EINVAL;
    if (klen > STORE_MAX_KEY)
        return BUS_ETOOBIG;
    flen = klen + (txn_prefixed(t, cf) ? t->plen : 0);
    if (flen > sizeof(small) && (full = bus__alloc(flen)) == NULL)
        return BUS_ENOMEM;
    if (flen > klen)
        memcpy(full, t->prefix, t->plen);
    memcpy(full + (flen - klen), key, klen);

    /* Newest own write first. */
    for (i = t->nops; i-- > 0;) {
        const store_op *o = &t->ops[i];
        if (o->cf != cf || o->klen != flen ||
            memcmp(t->bytes.p + o->koff, full, flen) != 0)
            continue;
        if (o->del) {
            rv = BUS_ENOTFOUND;
        } else if ((*val = bus__alloc(o->vlen ? o->vlen : 1)) == NULL) {
            rv = BUS_ENOMEM;
        } else {
            if (o->vlen > 0)
                memcpy(*val, t->bytes.p + o->voff, o->vlen);
            *vlen = o->vlen;
        }
        goto out;
    }
    v = rocksdb_get_cf(t->s->db, t->s->ro, t->s->cf[cf], (const char *)full,
                       flen, &n, &err);
    if (err != NULL) {
        rv = bus__store_rdb_err(t->s, err, "transaction get");
        goto out;
    }
    if (v == NULL) {
        rv = BUS_ENOTFOUND;
        goto out;
    }
    if ((*val = bus__alloc(n ? n : 1)) == NULL) {
        rv = BUS_ENOMEM;
    } else {
        memcpy(*val, v, n);
        *vlen = n;
    }
    rocksdb_free(v);
out:
    if (full != small)
        bus__free(full, flen);
    return rv;
}

int
bus_store_txn_append(bus_store_txn *t, const char *stream,
                     uint64_t expected_version, bus_event *const *events,
                     size_t n)
{
    struct txn_part *p;
    size_t slen, i, len0;
    int rv;

    if (t == NULL || (n > 0 && events == NULL))
        return BUS_EINVAL;
    if (t->projector)
        return BUS_ENOTSUP;
    if (!bus__store_name_ok(stream, &slen, STORE_MAX_STREAM))
        return BUS_EINVAL;
    for (i = 0; i < n; i++)
        if (events[i] == NULL || events[i]->type_len == 0)
            return BUS_EINVAL;
    if (t->nevs + n > t->s->cfg.max_append_events)
        return BUS_ETOOBIG;
    if ((rv = txn_grow((void **)&t->parts, &t->cap_parts, t->nparts + 1,
                       sizeof(*t->parts))) != BUS_OK)
        return rv;
    if ((rv = txn_grow((void **)&t->evs, &t->cap_evs, t->nevs + n,
                       sizeof(*t->evs))) != BUS_OK)
        return rv;
    len0 = t->bytes.len;
    if ((rv = bus__store_buf_append(&t->bytes, stream, slen)) != BUS_OK)
        return rv;
    p = &t->parts[t->nparts++];
    p->soff = len0;
    p->slen = slen;
    p->expected = expected_version;
    p->ev_off = t->nevs;
    p->n = n;
    for (i = 0; i < n; i++)
        t->evs[t->nevs++] = bus_event_ref(events[i]);
    return BUS_OK;
}

int
bus_store_txn_checkpoint(bus_store_txn *t, const char *name, uint64_t position)
{
    uint8_t v[8];
    size_t n;

    if (t == NULL || !bus__store_name_ok(name, &n, STORE_MAX_NAME))
        return BUS_EINVAL;
    store_put_be64(v, position);
    return bus__store_txn_put_raw(t, CF_CHECKPOINTS, "c", 1, name, n, v, 8,
                                  false);
}

int
bus_store_txn_commit(bus_store_txn *t, bus_store_append_result *results,
                     size_t n_results)
{
    store_part local[4], *parts = local;
    store_req r;
    size_t i, cost;
    int rv;

    if (results != NULL)
        memset(results, 0, n_results * sizeof(*results));
    if (t == NULL)
        return BUS_EINVAL;
    if (t->projector)
        return BUS_EINVAL; /* the projector commits its own */
    if (t->nops == 0 && t->nparts == 0) {
        bus_store_txn_abort(t);
        return BUS_OK;
    }
    if (t->nparts > 4 &&
        (parts = bus__zalloc(t->nparts * sizeof(*parts))) == NULL) {
        bus_store_txn_abort(t);
        return BUS_ENOMEM;
    }
    memset(local, 0, sizeof(local));
    cost = t->bytes.len + 64;
    for (i = 0; i < t->nparts; i++) {
        parts[i].stream = (const char *)t->bytes.p + t->parts[i].soff;
        parts[i].slen = t->parts[i].slen;
        parts[i].expected = t->parts[i].expected;
        parts[i].events = &t->evs[t->parts[i].ev_off];
        parts[i].n = t->parts[i].n;
        for (size_t j = 0; j < parts[i].n; j++)
            cost += parts[i].events[j]->payload_len + 64;
    }
    if (cost > t->s->cfg.max_append_bytes) {
        rv = BUS_ETOOBIG;
    } else {
        memset(&r, 0, sizeof(r));
        r.kind = REQ_WRITE;
        r.parts = parts;
        r.nparts = t->nparts;
        r.ops = t->ops;
        r.nops = t->nops;
        r.opbytes = t->bytes.p;
        r.cost = cost;
        rv = bus__store_submit(t->s, &r);
    }
    if (results != NULL)
        for (i = 0; i < t->nparts && i < n_results; i++) {
            results[i] = parts[i].res;
            if (rv != BUS_OK && results[i].err == BUS_OK)
                results[i].err = rv;
        }
    if (parts != local)
        bus__free(parts, t->nparts * sizeof(*parts));
    bus_store_txn_abort(t);
    return rv;
}

void
bus_store_txn_abort(bus_store_txn *t)
{
    if (t == NULL || t->projector)
        return; /* a projector's transaction is its own */
    bus__store_txn_fini(t);
    bus__free(t, sizeof(*t));
}
