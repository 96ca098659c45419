/*
 * The event store: opening and closing, the format marker, column
 * families, key-value reads of the application families, checkpoints,
 * statistics and verification. Appends live in writer.c, reads in read.c.
 *
 * Design:
 * - One RocksDB database, one column family per kind of record (the key
 *   layout is in store_impl.h and docs/store.md). All records an append
 *   produces are in one WriteBatch, so after a crash RocksDB's WAL replay
 *   (point-in-time recovery) gives either all of them or none: the store
 *   needs no repair step of its own. Opening recovers only in-memory
 *   state: the head (last key of the log), the id index's tail (the
 *   events above its watermark, from the log) and greatest id, and the
 *   retention policies.
 * - A path is a store when it holds a RocksDB database whose default
 *   family has our "format" record. A path that is a file, a directory
 *   with foreign content, or a RocksDB without the record is refused with
 *   BUS_EINVAL and never written to.
 * - Closing has two phases: _close_async refuses new requests and stops
 *   workers; _close also joins them and waits for accepted requests.
 */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <bus/log.h>

#include "alloc.h"
#include "delivery.h"
#include "mp.h"
#include "store_impl.h"
#include "testing.h"

const char *const bus__store_cf_names[CF_COUNT] = {
    "default", "log", "streams", "meta", "ids", "checkpoints", "outbox", "app",
};

#define FORMAT_KEY "format"

/* ---- Small helpers ------------------------------------------------------- */

int
bus__store_buf_reserve(store_buf *b, size_t extra)
{
    size_t ncap;
    uint8_t *np;

    if (b->cap - b->len >= extra)
        return BUS_OK;
    if (extra > SIZE_MAX / 2 - b->len)
        return BUS_ENOMEM;
    ncap = b->cap ? b->cap : 256;
    while (ncap - b->len < extra)
        ncap *= 2;
    np = bus__realloc(b->p, b->cap, ncap);
    if (np == NULL)
        return BUS_ENOMEM;
    b->p = np;
    b->cap = ncap;
    return BUS_OK;
}

int
bus__store_buf_append(store_buf *b, const void *p, size_t n)
{
    int rv;

    if ((rv = bus__store_buf_reserve(b, n)) != BUS_OK)
        return rv;
    if (n > 0)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    return BUS_OK;
}

void
bus__store_buf_free(store_buf *b)
{
    bus__free(b->p, b->cap);
    b->p = NULL;
    b->len = b->cap = 0;
}

void
bus__store_logf(bus_store *s, bus_log_level lv, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    if (!bus_log_enabled(&s->cfg.logger, lv))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    bus_logf(&s->cfg.logger, lv, "store", "%s", msg);
}

static void store_errf(char *errbuf, size_t len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
store_errf(char *errbuf, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, len, fmt, ap);
    va_end(ap);
}

/* RocksDB reports errors as "<Status>: detail" strings. */
static int
store_rdb_code(const char *e)
{
    if (strstr(e, "Corruption") != NULL)
        return BUS_ECORRUPT;
    if (strstr(e, "lock") != NULL &&
        (strstr(e, "Resource temporarily unavailable") != NULL ||
         strstr(e, "No locks available") != NULL ||
         strstr(e, "Resource busy") != NULL))
        return BUS_EBUSY;
    if (strstr(e, "does not exist") != NULL)
        return BUS_ENOTFOUND;
    if (strstr(e, "Not implemented") != NULL)
        return BUS_ENOTSUP;
    if (strstr(e, "Invalid argument") != NULL)
        return BUS_EINVAL;
    return BUS_EIO;
}

int
bus__store_rdb_err(bus_store *s, char *err, const char *what)
{
    int rv;

    if (err == NULL)
        return BUS_EIO;
    rv = store_rdb_code(err);
    bus__store_logf(s, BUS_LOG_ERR, "%s: %s", what, err);
    rocksdb_free(err);
    return rv;
}

bool
bus__store_name_ok(const char *name, size_t *len, size_t max)
{
    size_t n, i;

    if (name == NULL)
        return false;
    n = strlen(name);
    if (n == 0 || n > max)
        return false;
    /* Names are nearly always ASCII: only others need the full check. */
    for (i = 0; i < n; i++)
        if ((unsigned char)name[i] >= 0x80)
            break;
    if (i < n && !bus__utf8_valid(name + i, n - i))
        return false;
    *len = n;
    return true;
}

int
bus__store_write_direct(bus_store *s, rocksdb_writebatch_t *wb, bool sync)
{
    char *err = NULL;
    int rv;

    if ((rv = BUS_FAILPOINT("store.write_direct")) != 0)
        return rv;
    rocksdb_write(s->db, sync ? s->wo_sync : s->wo, wb, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "write");
    return BUS_OK;
}

void
bus__store_notify(bus_store *s)
{
    bus__mutex_lock(&s->ev_mtx);
    bus__cond_broadcast(&s->ev_cond);
    bus__mutex_unlock(&s->ev_mtx);
}

void
bus__store_worker_add(bus_store *s, store_worker *w)
{
    /* @locks ev_mtx held by the caller. */
    w->next = s->workers.next;
    w->prev = &s->workers;
    s->workers.next->prev = w;
    s->workers.next = w;
}

void
bus__store_worker_remove(bus_store *s, store_worker *w)
{
    /* @locks ev_mtx held by the caller. */
    (void)s;
    if (w->next == NULL)
        return;
    w->prev->next = w->next;
    w->next->prev = w->prev;
    w->next = w->prev = NULL;
}

void
bus_store_buf_free(void *buf, size_t len)
{
    bus__free(buf, len);
}

/* ---- Configuration ------------------------------------------------------- */

void
bus_store_config_init(bus_store_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->durability = BUS_STORE_GROUP;
    cfg->block_cache_bytes = (size_t)64 << 20;
    cfg->write_buffer_bytes = (size_t)64 << 20;
    cfg->max_append_events = 10000;
    cfg->max_event_bytes = (size_t)16 << 20;
    cfg->max_append_bytes = (size_t)64 << 20;
    cfg->max_group_bytes = (size_t)8 << 20;
    cfg->stream_cache = 65536;
    cfg->max_async_bytes = (size_t)16 << 20;
}

static int
store_config_copy(bus_store *s, const bus_store_config *in, char *errbuf,
                  size_t errlen)
{
    bus_store_config def, *c = &s->cfg;
    size_t n = in->size ? in->size : sizeof(*in);

    if (n > sizeof(*c))
        n = sizeof(*c); /* a newer caller: fields we do not know */
    memset(c, 0, sizeof(*c));
    memcpy(c, in, n);
    c->size = sizeof(*c);
    bus_store_config_init(&def);
    if (c->durability == BUS_STORE_DURABILITY_DEFAULT)
        c->durability = def.durability;
    if (c->block_cache_bytes == 0)
        c->block_cache_bytes = def.block_cache_bytes;
    if (c->write_buffer_bytes == 0)
        c->write_buffer_bytes = def.write_buffer_bytes;
    if (c->max_append_events == 0)
        c->max_append_events = def.max_append_events;
    if (c->max_event_bytes == 0)
        c->max_event_bytes = def.max_event_bytes;
    if (c->max_append_bytes == 0)
        c->max_append_bytes = def.max_append_bytes;
    if (c->max_group_bytes == 0)
        c->max_group_bytes = def.max_group_bytes;
    if (c->stream_cache == 0)
        c->stream_cache = def.stream_cache;
    if (c->max_async_bytes == 0)
        c->max_async_bytes = def.max_async_bytes;

    if (c->path == NULL || c->path[0] == '\0') {
        store_errf(errbuf, errlen, "store config: path is required");
        return BUS_EINVAL;
    }
    if ((int)c->durability < BUS_STORE_NONE ||
        (int)c->durability > BUS_STORE_ALWAYS) {
        store_errf(errbuf, errlen, "store config: bad durability %d",
                   (int)c->durability);
        return BUS_EINVAL;
    }
    if (c->max_event_bytes > ((size_t)64 << 20)) {
        store_errf(errbuf, errlen,
                   "store config: max_event_bytes above 64 MiB");
        return BUS_EINVAL;
    }
    if (c->stream_cache < 16)
        c->stream_cache = 16;
    if (c->write_buffer_bytes < ((size_t)1 << 20))
        c->write_buffer_bytes = (size_t)1 << 20;
    if ((s->path = bus__strdup(c->path, &s->path_size)) == NULL)
        return BUS_ENOMEM;
    c->path = s->path;
    bus_codec_limits_init(&s->limits);
    s->limits.max_frame = c->max_event_bytes + 4096;
    if (s->limits.max_payload > c->max_event_bytes)
        s->limits.max_payload = c->max_event_bytes;
    s->limits.max_headers = 65535;
    s->limits.max_string = STORE_MAX_STREAM;
    return BUS_OK;
}

/* ---- Opening ------------------------------------------------------------- */

static bool
store_has_suffix(const char *name, const char *suf)
{
    size_t n = strlen(name), k = strlen(suf);

    return n >= k && strcmp(name + n - k, suf) == 0;
}

/* A file RocksDB writes while it creates a database, before CURRENT: a
 * directory holding only these is a creation cut short (a crash), not
 * someone else's data. */
static bool
store_rocksdb_file(const char *name)
{
    return strcmp(name, "LOCK") == 0 || strcmp(name, "LOG") == 0 ||
           strncmp(name, "LOG.old", 7) == 0 || strcmp(name, "IDENTITY") == 0 ||
           strncmp(name, "MANIFEST-", 9) == 0 ||
           strncmp(name, "OPTIONS-", 8) == 0 ||
           store_has_suffix(name, ".log") || store_has_suffix(name, ".sst") ||
           store_has_suffix(name, ".dbtmp");
}

/* Decides whether path holds a database (*exists), may hold a new one, or
 * must be refused. A directory with RocksDB's files but no CURRENT is a
 * creation a crash cut short: nothing in it was ever acknowledged, so it
 * is created again. */
static int
store_probe_path(const char *path, bool create, bool *exists, char *errbuf,
                 size_t errlen)
{
    struct stat st;
    char cur[4096];
    DIR *d;
    struct dirent *de;
    bool empty = true;

    *exists = false;
    if (stat(path, &st) != 0) {
        if (errno != ENOENT) {
            store_errf(errbuf, errlen, "cannot access %s: %s", path,
                       strerror(errno));
            return BUS_EIO;
        }
        if (!create) {
            store_errf(errbuf, errlen,
                       "no store at %s (and create_if_missing is off)", path);
            return BUS_ENOTFOUND;
        }
        return BUS_OK;
    }
    if (!S_ISDIR(st.st_mode)) {
        store_errf(errbuf, errlen,
                   "%s is not a libbus store (not a "
                   "directory)",
                   path);
        return BUS_EINVAL;
    }
    if ((size_t)snprintf(cur, sizeof(cur), "%s/CURRENT", path) >= sizeof(cur)) {
        store_errf(errbuf, errlen, "path too long");
        return BUS_EINVAL;
    }
    if (stat(cur, &st) == 0) {
        *exists = true;
        return BUS_OK;
    }
    if ((d = opendir(path)) == NULL) {
        store_errf(errbuf, errlen, "cannot read %s: %s", path, strerror(errno));
        return BUS_EIO;
    }
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0 &&
            !store_rocksdb_file(de->d_name)) {
            empty = false;
            break;
        }
    }
    closedir(d);
    if (!empty) {
        store_errf(errbuf, errlen,
                   "%s is not a libbus store (a directory with other "
                   "files and no database)",
                   path);
        return BUS_EINVAL;
    }
    if (!create) {
        store_errf(errbuf, errlen,
                   "no store at %s (empty directory; create_if_missing is "
                   "off)",
                   path);
        return BUS_ENOTFOUND;
    }
    return BUS_OK;
}

static rocksdb_block_based_table_options_t *
store_bbto(bus_store *s, bool bloom)
{
    rocksdb_block_based_table_options_t *t;

    t = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(t, s->cache);
    rocksdb_block_based_options_set_format_version(t, 5);
    rocksdb_block_based_options_set_cache_index_and_filter_blocks(t, 1);
    rocksdb_block_based_options_set_pin_l0_filter_and_index_blocks_in_cache(t,
                                                                            1);
    if (bloom)
        rocksdb_block_based_options_set_filter_policy(
            t, rocksdb_filterpolicy_create_bloom_full(10));
    return t;
}

static void
store_make_options(bus_store *s, bool create)
{
    size_t wb = s->cfg.write_buffer_bytes;
    int i;

    s->dbopts = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(s->dbopts, create);
    rocksdb_options_set_create_missing_column_families(s->dbopts, create);
    rocksdb_options_set_error_if_exists(s->dbopts, 0);
    rocksdb_options_set_paranoid_checks(s->dbopts, 1);
    /* Point-in-time recovery: a torn last WAL record (a write cut by a
     * crash) is dropped whole, so a batch is all or nothing. */
    rocksdb_options_set_wal_recovery_mode(s->dbopts, 2);
    rocksdb_options_set_max_background_jobs(s->dbopts, 2);
    rocksdb_options_set_info_log_level(s->dbopts, 2 /* WARN */);
    rocksdb_options_set_keep_log_file_num(s->dbopts, 2);
    rocksdb_options_set_bytes_per_sync(s->dbopts, (uint64_t)1 << 20);
    rocksdb_options_set_max_total_wal_size(s->dbopts, (uint64_t)wb * 4);

    s->cache = rocksdb_cache_create_lru(s->cfg.block_cache_bytes);
    s->bbto[0] = store_bbto(s, false);
    s->bbto[1] = store_bbto(s, true);
    for (i = 0; i < CF_COUNT; i++) {
        rocksdb_options_t *o = rocksdb_options_create_copy(s->dbopts);
        size_t w;

        switch (i) {
        case CF_LOG:
            w = wb;
            break;
        case CF_STREAMS:
        case CF_IDS:
            w = wb / 2;
            break;
        case CF_APP:
        case CF_OUTBOX:
            w = wb / 4;
            break;
        default:
            w = (size_t)4 << 20;
        }
        rocksdb_options_set_write_buffer_size(o, w);
        rocksdb_options_set_block_based_table_factory(
            o, s->bbto[i == CF_LOG ? 0 : 1]);
        if (i == CF_STREAMS) {
            /* An insert hint per stream (store_impl.h, store_key_stream):
             * only settable through an options string in the C API. */
            rocksdb_options_t *h = rocksdb_options_create_copy(o);
            char *err = NULL;
            rocksdb_get_options_from_string(
                o,
                "memtable_insert_with_hint_prefix_extractor="
                "rocksdb.FixedPrefix.8",
                h, &err);
            if (err == NULL) {
                rocksdb_options_destroy(o);
                o = h;
            } else {
                bus__store_logf(s, BUS_LOG_WARN, "insert hints off: %s", err);
                rocksdb_free(err);
                rocksdb_options_destroy(h);
            }
        }
        if (i == CF_IDS) {
            /* Idempotence looks up ids that are almost never there. */
            rocksdb_options_set_memtable_prefix_bloom_size_ratio(o, 0.05);
            rocksdb_options_set_memtable_whole_key_filtering(o, 1);
        }
        s->cfopts[i] = o;
    }
}

static int
store_get_raw(bus_store *s, int cf, const void *k, size_t klen, char **val,
              size_t *vlen)
{
    char *err = NULL;

    *val = rocksdb_get_cf(s->db, s->ro, s->cf[cf], k, klen, vlen, &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "get");
    return *val == NULL ? BUS_ENOTFOUND : BUS_OK;
}

static bool
store_cf_empty(bus_store *s, int cf)
{
    rocksdb_iterator_t *it =
        rocksdb_create_iterator_cf(s->db, s->ro, s->cf[cf]);
    bool empty;

    rocksdb_iter_seek_to_first(it);
    empty = !rocksdb_iter_valid(it);
    rocksdb_iter_destroy(it);
    return empty;
}

static int
store_write_format(bus_store *s)
{
    uint8_t v[4];
    char *err = NULL;

    store_put_be32(v, STORE_FORMAT_VERSION);
    rocksdb_put_cf(s->db, s->wo_sync, s->cf[CF_DEFAULT], FORMAT_KEY,
                   strlen(FORMAT_KEY), (const char *)v, sizeof(v), &err);
    if (err != NULL)
        return bus__store_rdb_err(s, err, "write format marker");
    return BUS_OK;
}

static int
store_check_format(bus_store *s, bool create, char *errbuf, size_t errlen)
{
    char *val;
    size_t vlen;
    uint32_t ver;
    int rv, i;

    rv = store_get_raw(s, CF_DEFAULT, FORMAT_KEY, strlen(FORMAT_KEY), &val,
                       &vlen);
    if (rv == BUS_ENOTFOUND) {
        /* Only our families and nothing in them: a creation a crash cut
         * short before the record (families are created one by one, the
         * record last). Finish it. Anything else is someone else's. */
        bool ours = s->n_extra_cf == 0;
        char *err = NULL;
        for (i = 0; i < CF_COUNT; i++)
            if (s->cf[i] != NULL && !store_cf_empty(s, i))
                ours = false;
        if (ours && create) {
            for (i = 0; i < CF_COUNT; i++) {
                if (s->cf[i] != NULL)
                    continue;
                s->cf[i] = rocksdb_create_column_family(
                    s->db, s->cfopts[i], bus__store_cf_names[i], &err);
                if (err != NULL) {
                    s->cf[i] = NULL;
                    store_errf(errbuf, errlen,
                               "cannot create column "
                               "family %s: %s",
                               bus__store_cf_names[i], err);
                    return bus__store_rdb_err(s, err, "create family");
                }
            }
            return store_write_format(s);
        }
        store_errf(errbuf, errlen,
                   "%s is not a libbus store (a RocksDB database without "
                   "the libbus format record)",
                   s->path);
        return BUS_EINVAL;
    }
    if (rv != BUS_OK) {
        store_errf(errbuf, errlen, "cannot read the format record of %s",
                   s->path);
        return rv;
    }
    if (vlen != 4) {
        rocksdb_free(val);
        store_errf(errbuf, errlen, "%s: corrupt format record (%zu bytes)",
                   s->path, vlen);
        return BUS_ECORRUPT;
    }
    ver = store_get_be32(val);
    rocksdb_free(val);
    if (ver > STORE_FORMAT_VERSION) {
        store_errf(errbuf, errlen,
                   "%s has store format %u, newer than this library's %u",
                   s->path, ver, (unsigned)STORE_FORMAT_VERSION);
        return BUS_EVERSION;
    }
    if (ver != 0 && ver < STORE_FORMAT_VERSION) {
        /* Format 1 (one id record per event) came before any release;
         * there is no migration. */
        store_errf(errbuf, errlen,
                   "%s has store format %u, which this library (format %u) "
                   "cannot read",
                   s->path, ver, (unsigned)STORE_FORMAT_VERSION);
        return BUS_EVERSION;
    }
    if (ver == 0) {
        store_errf(errbuf, errlen, "%s: corrupt format record (version 0)",
                   s->path);
        return BUS_ECORRUPT;
    }
    for (i = 0; i < CF_COUNT; i++) {
        if (s->cf[i] == NULL) {
            store_errf(errbuf, errlen,
                       "%s: column family \"%s\" is missing (corrupt store)",
                       s->path, bus__store_cf_names[i]);
            return BUS_ECORRUPT;
        }
    }
    return BUS_OK;
}

static int
store_cf_index(const char *name)
{
    int i;

    for (i = 0; i < CF_COUNT; i++)
        if (strcmp(name, bus__store_cf_names[i]) == 0)
            return i;
    return -1;
}

static int
store_db_open(bus_store *s, bool exists, char *errbuf, size_t errlen)
{
    char **names = NULL, *err = NULL;
    const char **onames = NULL;
    const rocksdb_options_t **oopts = NULL;
    rocksdb_column_family_handle_t **handles = NULL;
    size_t n = CF_COUNT, i, extra = 0;
    int rv = BUS_OK, idx;

    if (exists) {
        names = rocksdb_list_column_families(s->dbopts, s->path, &n, &err);
        if (err != NULL) {
            store_errf(errbuf, errlen, "cannot open store %s: %s", s->path,
                       err);
            return bus__store_rdb_err(s, err, "list column families");
        }
    }
    onames = bus__zalloc(n * sizeof(*onames));
    oopts = bus__zalloc(n * sizeof(*oopts));
    handles = bus__zalloc(n * sizeof(*handles));
    if (onames == NULL || oopts == NULL || handles == NULL) {
        rv = BUS_ENOMEM;
        goto out;
    }
    for (i = 0; i < n; i++) {
        onames[i] = exists ? names[i] : bus__store_cf_names[i];
        idx = store_cf_index(onames[i]);
        oopts[i] = idx >= 0 ? s->cfopts[idx] : s->dbopts;
        if (idx < 0)
            extra++;
    }
    if (extra > 0) {
        s->extra_cf = bus__zalloc(extra * sizeof(*s->extra_cf));
        if (s->extra_cf == NULL) {
            rv = BUS_ENOMEM;
            goto out;
        }
    }
    s->db = rocksdb_open_column_families(s->dbopts, s->path, (int)n, onames,
                                         oopts, handles, &err);
    if (err != NULL) {
        store_errf(errbuf, errlen, "cannot open store %s: %s", s->path, err);
        rv = bus__store_rdb_err(s, err, "open");
        s->db = NULL;
        goto out;
    }
    for (i = 0; i < n; i++) {
        idx = store_cf_index(onames[i]);
        if (idx >= 0)
            s->cf[idx] = handles[i];
        else
            s->extra_cf[s->n_extra_cf++] = handles[i];
    }
out:
    if (names != NULL)
        rocksdb_list_column_families_destroy(names, n);
    bus__free(onames, n * sizeof(*onames));
    bus__free(oopts, n * sizeof(*oopts));
    bus__free(handles, n * sizeof(*handles));
    return rv;
}

/* In-memory state from the records: head (last log key, or the floor a
 * scavenge left), the id index's tail and the greatest id. */
static int
store_recover(bus_store *s)
{
    rocksdb_iterator_t *it;
    size_t klen, vlen;
    const char *k;
    char *v;

    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_LOG]);
    rocksdb_iter_seek_to_last(it);
    if (rocksdb_iter_valid(it)) {
        k = rocksdb_iter_key(it, &klen);
        if (klen != 8) {
            rocksdb_iter_destroy(it);
            bus__store_logf(s, BUS_LOG_ERR, "log key of %zu bytes", klen);
            return BUS_ECORRUPT;
        }
        atomic_store(&s->head, store_get_be64(k));
    }
    rocksdb_iter_destroy(it);
    /* A scavenge may have removed the last records: never give their
     * positions again. */
    if (store_get_raw(s, CF_DEFAULT, STORE_FLOOR_KEY, strlen(STORE_FLOOR_KEY),
                      &v, &vlen) == BUS_OK) {
        if (vlen == 8 && store_get_be64(v) > atomic_load(&s->head))
            atomic_store(&s->head, store_get_be64(v));
        rocksdb_free(v);
    }
    s->w.next_pos = atomic_load(&s->head) + 1;
    /* The id index: its tail and the greatest id (writer.c). */
    return bus__store_ids_recover(s);
}

int
bus_store_open(bus_store **out, const bus_store_config *cfg, char *errbuf,
               size_t errbuf_len)
{
    bus_store *s;
    bool exists;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
    if (cfg == NULL) {
        store_errf(errbuf, errbuf_len, "store config is NULL");
        return BUS_EINVAL;
    }
    if ((s = bus__zalloc(sizeof(*s))) == NULL)
        return BUS_ENOMEM;
    s->workers.next = s->workers.prev = &s->workers;
    bus__mutex_init(&s->wq_mtx);
    bus__mutex_init(&s->pol_mtx);
    bus__mutex_init(&s->meta_mtx);
    bus__mutex_init(&s->ev_mtx);
    bus__cond_init(&s->wq_idle);
    bus__cond_init(&s->wr_cond);
    bus__cond_init(&s->async_cond);
    bus__cond_init(&s->ev_cond);
    s->mutexes_ready = true;

    if ((rv = store_config_copy(s, cfg, errbuf, errbuf_len)) != BUS_OK)
        goto fail;
    if ((rv = store_probe_path(s->path, s->cfg.create_if_missing, &exists,
                               errbuf, errbuf_len)) != BUS_OK)
        goto fail;
    store_make_options(s, !exists);
    s->wo = rocksdb_writeoptions_create();
    s->wo_sync = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(s->wo_sync, 1);
    s->ro = rocksdb_readoptions_create();
    if ((rv = BUS_FAILPOINT("store.open")) != 0) {
        store_errf(errbuf, errbuf_len, "injected failure");
        goto fail;
    }
    if ((rv = store_db_open(s, exists, errbuf, errbuf_len)) != BUS_OK)
        goto fail;
    if (!exists) {
        if ((rv = store_write_format(s)) != BUS_OK) {
            store_errf(errbuf, errbuf_len, "cannot write the format record");
            goto fail;
        }
    } else if ((rv = store_check_format(s, s->cfg.create_if_missing, errbuf,
                                        errbuf_len)) != BUS_OK) {
        goto fail;
    }
    if ((rv = bus__store_writer_init(s)) != BUS_OK)
        goto fail;
    if ((rv = store_recover(s)) != BUS_OK) {
        store_errf(errbuf, errbuf_len, "%s: corrupt store (bad keys)", s->path);
        goto fail;
    }
    if ((rv = bus__store_pol_load(s)) != BUS_OK) {
        store_errf(errbuf, errbuf_len,
                   "%s: cannot load stream metadata "
                   "(%s)",
                   s->path, bus_strerror(rv));
        goto fail;
    }
    s->ready = true;
    bus__store_logf(s, BUS_LOG_INFO, "opened %s: head %llu, %s", s->path,
                    (unsigned long long)atomic_load(&s->head),
                    exists ? "existing" : "created");
    *out = s;
    return BUS_OK;
fail:
    if (errbuf != NULL && errbuf_len > 0 && errbuf[0] == '\0')
        store_errf(errbuf, errbuf_len, "cannot open store: %s",
                   bus_strerror(rv));
    bus_store_close(s);
    return rv;
}

void
bus_store_close_async(bus_store *s)
{
    store_worker *w;

    if (s == NULL)
        return;
    bus__mutex_lock(&s->wq_mtx);
    atomic_store_explicit(&s->closing, true, memory_order_release);
    bus__cond_broadcast(&s->async_cond); /* waiting for room: BUS_ECLOSED */
    bus__mutex_unlock(&s->wq_mtx);
    bus__mutex_lock(&s->ev_mtx);
    for (w = s->workers.next; w != &s->workers; w = w->next)
        w->stop(w);
    bus__cond_broadcast(&s->ev_cond);
    bus__mutex_unlock(&s->ev_mtx);
}

void
bus_store_close(bus_store *s)
{
    store_worker *w;
    int i;

    if (s == NULL)
        return;
    if (s->mutexes_ready) {
        bus_store_close_async(s);
        for (;;) {
            bus__mutex_lock(&s->ev_mtx);
            w = s->workers.next;
            if (w == &s->workers) {
                bus__mutex_unlock(&s->ev_mtx);
                break;
            }
            bus__store_worker_remove(s, w);
            bus__mutex_unlock(&s->ev_mtx);
            w->destroy(w);
        }
        bus__mutex_lock(&s->wq_mtx);
        /* Asynchronous appends: written, and their callbacks returned. */
        while (s->inflight > 0 || s->leader_busy || s->async_bytes > 0 ||
               s->callers > 0)
            bus__cond_wait(&s->wq_idle, &s->wq_mtx);
        bus__mutex_unlock(&s->wq_mtx);
        bus__store_writer_thread_stop(s);
    }
    /* No writer is active and none can start: write the id index's tail so
     * that the next open has nothing to rebuild. */
    if (s->ready)
        bus__store_flush_ids_final(s);
    bus__store_writer_fini(s);
    bus__store_pol_fini(s);
    if (s->db != NULL)
        rocksdb_cancel_all_background_work(s->db, 1);
    for (i = 0; i < CF_COUNT; i++)
        if (s->cf[i] != NULL)
            rocksdb_column_family_handle_destroy(s->cf[i]);
    for (size_t j = 0; j < s->n_extra_cf; j++)
        rocksdb_column_family_handle_destroy(s->extra_cf[j]);
    if (s->extra_cf != NULL)
        bus__free(s->extra_cf, s->n_extra_cf * sizeof(*s->extra_cf));
    if (s->db != NULL) {
        rocksdb_close(s->db);
        bus__store_logf(s, BUS_LOG_INFO, "closed %s", s->path);
    }
    for (i = 0; i < CF_COUNT; i++)
        if (s->cfopts[i] != NULL)
            rocksdb_options_destroy(s->cfopts[i]);
    if (s->dbopts != NULL)
        rocksdb_options_destroy(s->dbopts);
    for (i = 0; i < 2; i++)
        if (s->bbto[i] != NULL)
            rocksdb_block_based_options_destroy(s->bbto[i]);
    if (s->cache != NULL)
        rocksdb_cache_destroy(s->cache);
    if (s->wo != NULL)
        rocksdb_writeoptions_destroy(s->wo);
    if (s->wo_sync != NULL)
        rocksdb_writeoptions_destroy(s->wo_sync);
    if (s->ro != NULL)
        rocksdb_readoptions_destroy(s->ro);
    if (s->mutexes_ready) {
        bus__cond_fini(&s->ev_cond);
        bus__cond_fini(&s->wq_idle);
        bus__cond_fini(&s->wr_cond);
        bus__cond_fini(&s->async_cond);
        bus__mutex_fini(&s->ev_mtx);
        bus__mutex_fini(&s->meta_mtx);
        bus__mutex_fini(&s->pol_mtx);
        bus__mutex_fini(&s->wq_mtx);
    }
    if (s->path != NULL)
        bus__free(s->path, s->path_size);
    bus__free(s, sizeof(*s));
}

uint64_t
bus_store_head(const bus_store *s)
{
    /* acquire: pairs with the writer's release store after the write, so
     * records up to head are visible to reads that follow. */
    return atomic_load_explicit(&((bus_store *)s)->head, memory_order_acquire);
}

static bool
store_closed(bus_store *s)
{
    return atomic_load_explicit(&s->closing, memory_order_acquire);
}

/* ---- Key-value families -------------------------------------------------- */

static int
store_family_cf(bus_store_family fam)
{
    switch (fam) {
    case BUS_STORE_APP:
        return CF_APP;
    case BUS_STORE_OUTBOX:
        return CF_OUTBOX;
    }
    return -1;
}

int
bus_store_get(bus_store *s, bus_store_family fam, const void *key, size_t klen,
              void **val, size_t *vlen)
{
    char *v;
    size_t n;
    int cf = store_family_cf(fam), rv;

    if (val != NULL)
        *val = NULL;
    if (vlen != NULL)
        *vlen = 0;
    if (s == NULL || cf < 0 || key == NULL || klen == 0 || val == NULL ||
        vlen == NULL)
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    if ((rv = store_get_raw(s, cf, key, klen, &v, &n)) != BUS_OK)
        return rv;
    *val = bus__alloc(n ? n : 1);
    if (*val == NULL) {
        rocksdb_free(v);
        return BUS_ENOMEM;
    }
    memcpy(*val, v, n);
    *vlen = n;
    rocksdb_free(v);
    return BUS_OK;
}

int
bus_store_scan(bus_store *s, bus_store_family fam, const void *prefix,
               size_t plen, bus_store_kv_fn fn, void *opaque)
{
    rocksdb_readoptions_t *ro;
    const rocksdb_snapshot_t *snap;
    rocksdb_iterator_t *it;
    char *err = NULL;
    int cf = store_family_cf(fam), rv = BUS_OK;

    if (s == NULL || cf < 0 || fn == NULL || (plen > 0 && prefix == NULL))
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    ro = rocksdb_readoptions_create();
    snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_set_snapshot(ro, snap);
    it = rocksdb_create_iterator_cf(s->db, ro, s->cf[cf]);
    if (plen > 0)
        rocksdb_iter_seek(it, prefix, plen);
    else
        rocksdb_iter_seek_to_first(it);
    for (; rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kl, vl;
        const char *k = rocksdb_iter_key(it, &kl);
        const char *v = rocksdb_iter_value(it, &vl);

        if (plen > 0 && (kl < plen || memcmp(k, prefix, plen) != 0))
            break;
        if (!fn(opaque, k, kl, v, vl))
            break;
    }
    rocksdb_iter_get_error(it, &err);
    if (err != NULL)
        rv = bus__store_rdb_err(s, err, "scan");
    rocksdb_iter_destroy(it);
    rocksdb_release_snapshot(s->db, snap);
    rocksdb_readoptions_destroy(ro);
    return rv;
}

/* ---- Checkpoints --------------------------------------------------------- */

int
bus_store_checkpoint_set(bus_store *s, const char *name, uint64_t position)
{
    uint8_t k[STORE_MAX_NAME + 1], v[8];
    rocksdb_writebatch_t *wb;
    size_t n;
    int rv;

    if (s == NULL || !bus__store_name_ok(name, &n, STORE_MAX_NAME))
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    k[0] = 'c';
    memcpy(k + 1, name, n);
    store_put_be64(v, position);
    wb = rocksdb_writebatch_create();
    rocksdb_writebatch_put_cf(wb, s->cf[CF_CHECKPOINTS], (const char *)k, n + 1,
                              (const char *)v, 8);
    rv = bus__store_write_direct(s, wb, s->cfg.durability == BUS_STORE_ALWAYS);
    rocksdb_writebatch_destroy(wb);
    return rv;
}

int
bus_store_checkpoint_get(bus_store *s, const char *name, uint64_t *position)
{
    uint8_t k[STORE_MAX_NAME + 1];
    char *v;
    size_t n, vlen;
    int rv;

    if (position != NULL)
        *position = 0;
    if (s == NULL || position == NULL ||
        !bus__store_name_ok(name, &n, STORE_MAX_NAME))
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    k[0] = 'c';
    memcpy(k + 1, name, n);
    if ((rv = store_get_raw(s, CF_CHECKPOINTS, k, n + 1, &v, &vlen)) != BUS_OK)
        return rv;
    if (vlen != 8) {
        rocksdb_free(v);
        bus__store_logf(s, BUS_LOG_ERR, "checkpoint %s: %zu-byte record", name,
                        vlen);
        return BUS_ECORRUPT;
    }
    *position = store_get_be64(v);
    rocksdb_free(v);
    return BUS_OK;
}

int
bus_store_checkpoint_delete(bus_store *s, const char *name)
{
    uint8_t k[STORE_MAX_NAME + 1];
    rocksdb_writebatch_t *wb;
    size_t n;
    int rv;

    if (s == NULL || !bus__store_name_ok(name, &n, STORE_MAX_NAME))
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    k[0] = 'c';
    memcpy(k + 1, name, n);
    wb = rocksdb_writebatch_create();
    rocksdb_writebatch_delete_cf(wb, s->cf[CF_CHECKPOINTS], (const char *)k,
                                 n + 1);
    rv = bus__store_write_direct(s, wb, s->cfg.durability == BUS_STORE_ALWAYS);
    rocksdb_writebatch_destroy(wb);
    return rv;
}

int
bus_store_dead_letters(bus_store *s, const char *projector,
                       bus_store_dead_letter_fn fn, void *opaque)
{
    uint8_t k[STORE_MAX_NAME + 2];
    rocksdb_iterator_t *it;
    char *err = NULL, msg[BUS_DELIVERY_MSG_MAX + 1];
    size_t n;
    int rv = BUS_OK;

    if (s == NULL || fn == NULL ||
        !bus__store_name_ok(projector, &n, STORE_MAX_NAME))
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    k[0] = 'd';
    memcpy(k + 1, projector, n);
    k[n + 1] = 0;
    it = rocksdb_create_iterator_cf(s->db, s->ro, s->cf[CF_CHECKPOINTS]);
    for (rocksdb_iter_seek(it, (const char *)k, n + 2); rocksdb_iter_valid(it);
         rocksdb_iter_next(it)) {
        size_t kl, vl, ml;
        const char *kk = rocksdb_iter_key(it, &kl);
        const char *v = rocksdb_iter_value(it, &vl);

        if (kl != n + 10 || memcmp(kk, k, n + 2) != 0)
            break;
        if (vl < 8)
            continue;
        ml = vl - 8 < sizeof(msg) - 1 ? vl - 8 : sizeof(msg) - 1;
        memcpy(msg, v + 8, ml);
        msg[ml] = '\0';
        if (!fn(opaque, store_get_be64(kk + n + 2),
                (int)(int32_t)store_get_be32(v), store_get_be32(v + 4), msg))
            break;
    }
    rocksdb_iter_get_error(it, &err);
    if (err != NULL)
        rv = bus__store_rdb_err(s, err, "dead letters");
    rocksdb_iter_destroy(it);
    return rv;
}

/* ---- Operations ---------------------------------------------------------- */

void
bus_store_stats_get(bus_store *s, bus_store_stats *st)
{
    int i;

    memset(st, 0, sizeof(*st));
    if (s == NULL)
        return;
    st->head = bus_store_head(s);
    st->appends = atomic_load_explicit(&s->st_appends, memory_order_relaxed);
    st->events = atomic_load_explicit(&s->st_events, memory_order_relaxed);
    st->duplicates = atomic_load_explicit(&s->st_dups, memory_order_relaxed);
    st->conflicts =
        atomic_load_explicit(&s->st_conflicts, memory_order_relaxed);
    st->groups = atomic_load_explicit(&s->st_groups, memory_order_relaxed);
    st->syncs = atomic_load_explicit(&s->st_syncs, memory_order_relaxed);
    for (i = 0; i < CF_COUNT; i++) {
        uint64_t v = 0;
        if (rocksdb_property_int_cf(s->db, s->cf[i],
                                    "rocksdb.total-sst-files-size", &v) == 0)
            st->sst_bytes += v;
    }
}

int
bus_store_flush(bus_store *s)
{
    rocksdb_flushoptions_t *fo;
    char *err = NULL;
    int i, rv = BUS_OK;

    if (s == NULL)
        return BUS_EINVAL;
    if (store_closed(s))
        return BUS_ECLOSED;
    fo = rocksdb_flushoptions_create();
    rocksdb_flushoptions_set_wait(fo, 1);
    for (i = 0; i < CF_COUNT && rv == BUS_OK; i++) {
        rocksdb_flush_cf(s->db, fo, s->cf[i], &err);
        if (err != NULL)
            rv = bus__store_rdb_err(s, err, "flush");
    }
    rocksdb_flushoptions_destroy(fo);
    return rv;
}
