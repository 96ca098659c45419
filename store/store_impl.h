/*
 * The event store's internals, shared by store.c (open/close, key-value,
 * checkpoints, verify), writer.c (the group writer: appends, transactions,
 * metadata, deletes), read.c (reads and visibility), scavenge.c, sub.c
 * (subscriptions) and projector.c.
 *
 * Lock order (outermost first): s->meta_mtx, s->wq_mtx, s->pol_mtx,
 * s->ev_mtx. ev_mtx (commit notification, subscription and projector
 * control) and pol_mtx are leaves: nothing else is taken while they are
 * held, and no callback runs under any of them.
 *
 * Key layout (docs/store.md is the reference). Integers are big-endian so
 * byte order is numeric order:
 *   default      "format"                      -> u32 format version
 *                "floor"                       -> u64 head floor (scavenge)
 *                "idx"                         -> u64 id index watermark
 *   log          u64 position                  -> envelope (codec.h)
 *   streams      u64 hash(stream) stream 0x00 u64 first version
 *                                              -> u64 position, u32 count
 *   meta         'v' stream                    -> u64 last version, written
 *                                                 only by scavenge (else the
 *                                                 last index entry's)
 *                'm' stream                    -> policy record
 *   ids          'e' 16-byte event id          -> u64 position
 *                'r' 16-byte event id          -> id run (see below)
 *   checkpoints  'c' name                      -> u64 position
 *                'd' name 0x00 u64 position    -> dead-letter record
 *   outbox       (reserved for the outbox)
 *   app          user keys
 */
#ifndef BUS_STORE_IMPL_H
#define BUS_STORE_IMPL_H

#include <stdatomic.h>
#include <string.h>

#include <rocksdb/c.h>

#include <bus/codec.h>
#include <bus/store.h>

#include "platform.h"

/* Column families, in creation order. */
enum {
    CF_DEFAULT = 0,
    CF_LOG,
    CF_STREAMS,
    CF_META,
    CF_IDS,
    CF_CHECKPOINTS,
    CF_OUTBOX,
    CF_APP,
    CF_COUNT
};
extern const char *const bus__store_cf_names[CF_COUNT];

/* The on-disk layout this code reads and writes (the "format" record).
 * 2: the id index holds runs and exceptions ('r', 'e' keys) and the
 * "idx" watermark. 1 (per-event 16-byte id keys) is refused. The public
 * BUS_STORE_FORMAT_VERSION (store.h) is this number. */
#define STORE_FORMAT_VERSION ((unsigned)BUS_STORE_FORMAT_VERSION)

#define STORE_FLOOR_KEY "floor"
#define STORE_IDX_KEY "idx"
#define STORE_MAX_STREAM 4096u
#define STORE_MAX_NAME 255u  /* checkpoint names */
#define STORE_MAX_KEY 65535u /* application keys */
#define STORE_KEY_BUF (STORE_MAX_STREAM + 32u)

/* Policy record flags ('m' records). */
#define STORE_F_DELETED 0x01u    /* soft-deleted: NO_STREAM until appended */
#define STORE_F_TOMBSTONE 0x02u  /* hard-deleted */
#define STORE_POLICY_REC_LEN 26u /* u8 rec version, u8 flags, 3 x u64 */

typedef struct store_policy {
    uint8_t flags;
    uint64_t truncate_before;
    uint64_t max_count;
    uint64_t max_age_ms;
} store_policy;

static inline bool
store_policy_is_default(const store_policy *p)
{
    return p->flags == 0 && p->truncate_before == 0 && p->max_count == 0 &&
           p->max_age_ms == 0;
}

static inline bool
store_policy_eq(const store_policy *a, const store_policy *b)
{
    return a->flags == b->flags && a->truncate_before == b->truncate_before &&
           a->max_count == b->max_count && a->max_age_ms == b->max_age_ms;
}

/* ---- Bytes --------------------------------------------------------------- */

static inline void
store_put_be64(uint8_t *p, uint64_t v)
{
#if defined(__GNUC__) && defined(__BYTE_ORDER__) &&                            \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
#else
    int i;

    for (i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
#endif
}

static inline uint64_t
store_get_be64(const void *q)
{
#if defined(__GNUC__) && defined(__BYTE_ORDER__) &&                            \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;

    memcpy(&v, q, 8);
    return __builtin_bswap64(v);
#else
    const uint8_t *p = q;
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
#endif
}

static inline void
store_put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline uint32_t
store_get_be32(const void *q)
{
    const uint8_t *p = q;

    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}

/* FNV-1a: stream names are short and the tables small. */
static inline uint64_t
store_hash(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325u;
    size_t i;

    for (i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3u;
    }
    return h;
}

/* A growable byte buffer (bus__alloc). */
typedef struct store_buf {
    uint8_t *p;
    size_t len;
    size_t cap;
} store_buf;

/* Ensures room for extra more bytes. Returns BUS_OK or BUS_ENOMEM. */
int bus__store_buf_reserve(store_buf *b, size_t extra);
int bus__store_buf_append(store_buf *b, const void *p, size_t n);
void bus__store_buf_free(store_buf *b);

/* Keys. Each writes into k (STORE_KEY_BUF bytes) and returns the length.
 *
 * A stream-index key starts with a 64-bit hash of the stream: RocksDB's
 * memtable keeps an insert hint per 8-byte prefix (option
 * memtable_insert_with_hint_prefix_extractor), so appends to many
 * interleaved streams each insert next to their stream's previous entry
 * instead of searching the skiplist from the top. Nothing needs the index
 * in stream-name order (name-prefix filters read the log). */
#define STORE_SKEY_HASH 8u
/* As store_key_stream, with the stream's hash already known. */
static inline size_t
store_key_stream_h(uint8_t *k, uint64_t hash, const char *stream, size_t slen,
                   uint64_t ver)
{
    store_put_be64(k, hash);
    memcpy(k + STORE_SKEY_HASH, stream, slen);
    k[STORE_SKEY_HASH + slen] = 0;
    store_put_be64(k + STORE_SKEY_HASH + slen + 1, ver);
    return STORE_SKEY_HASH + slen + 9;
}

static inline size_t
store_key_stream(uint8_t *k, const char *stream, size_t slen, uint64_t ver)
{
    return store_key_stream_h(k, store_hash(stream, slen), stream, slen, ver);
}

/* A stream-index value describes a run: the versions first..first+n-1
 * (first is in the key) sit at positions pos..pos+n-1. One append part
 * gives its events consecutive versions and consecutive positions, so it
 * writes one index entry however many events it has. */
#define STORE_RUN_LEN 12u
static inline void
store_run_encode(uint8_t *v, uint64_t pos, uint32_t n)
{
    store_put_be64(v, pos);
    store_put_be32(v + 8, n);
}

static inline bool
store_run_decode(const void *v, size_t vl, uint64_t *pos, uint64_t *n)
{
    if (vl != STORE_RUN_LEN)
        return false;
    *pos = store_get_be64(v);
    *n = store_get_be32((const uint8_t *)v + 8);
    return *n > 0;
}

/* Length of a stream's key prefix (hash, name, 0). */
static inline size_t
store_key_stream_prefix(size_t slen)
{
    return STORE_SKEY_HASH + slen + 1;
}

/* Whether key (kl bytes) is an index entry of the stream whose key k was
 * built by store_key_stream for slen bytes; *ver gets its version. */
static inline bool
store_key_stream_match(const void *key, size_t kl, const uint8_t *k,
                       size_t slen, uint64_t *ver)
{
    size_t pl = store_key_stream_prefix(slen);

    if (kl != pl + 8 || memcmp(key, k, pl) != 0)
        return false;
    *ver = store_get_be64((const uint8_t *)key + pl);
    return true;
}

/* ---- The event-id index ---------------------------------------------------
 *
 * Idempotent appends look event ids up; almost all of them are new
 * UUIDv7s, greater than the ids already in the index's records, which
 * need no record of their own per event:
 *
 * - The writer keeps the ids of recent events in memory (the tail,
 *   sorted by id) and writes them every STORE_TAIL_FLUSH positions as one
 *   run record ('r', keyed by its first id, holding (position, id) pairs
 *   sorted by id), with the "idx" watermark: every event at or below it
 *   is in a run or has an 'e' record. After a crash, open rebuilds the
 *   tail from the log records above the watermark without an 'e' record.
 * - An event goes to the tail when its id is above every id of the
 *   index's records (runs_max): so runs are disjoint and ordered, and the
 *   run that may hold an id is the one with the greatest key not above it
 *   (one seek_for_prev). Ids slightly out of order (concurrent appenders)
 *   still qualify; an older id (another clock, an event appended long
 *   after it was made) gets an 'e' record of its own, in the batch of its
 *   event. An id above runs_max needs no lookup in the records at all.
 * - A run record's value: u64 base (lowest) position, then per event u32
 *   position - base and the 16-byte id. Scavenge removes entries in place
 *   and keeps the key (still not above any remaining id, so runs stay
 *   ordered), deleting the record when it is empty. */
#define STORE_IDK_LEN 17u
#define STORE_IDK_EXC 'e'
#define STORE_IDK_RUN 'r'
#define STORE_IDRUN_HDR 8u
#define STORE_IDRUN_ENT 20u
#define STORE_TAIL_FLUSH 512u
#define STORE_RECENT_IDS 8192u /* run entries the writer keeps (above) */

static inline void
store_key_id(uint8_t *k, char tag, const bus_uuid *id)
{
    k[0] = (uint8_t)tag;
    memcpy(k + 1, id->b, 16);
}

static inline bool
store_idrun_ok(size_t vl)
{
    return vl > STORE_IDRUN_HDR &&
           (vl - STORE_IDRUN_HDR) % STORE_IDRUN_ENT == 0;
}

static inline size_t
store_idrun_n(size_t vl)
{
    return (vl - STORE_IDRUN_HDR) / STORE_IDRUN_ENT;
}

static inline const uint8_t *
store_idrun_id(const void *v, size_t i)
{
    return (const uint8_t *)v + STORE_IDRUN_HDR + i * STORE_IDRUN_ENT + 4;
}

static inline uint64_t
store_idrun_pos(const void *v, size_t i)
{
    return store_get_be64(v) +
           store_get_be32((const uint8_t *)v + STORE_IDRUN_HDR +
                          i * STORE_IDRUN_ENT);
}

/* The position of id in a run value (vl bytes, checked), or 0. */
static inline uint64_t
store_idrun_find(const void *v, size_t vl, const bus_uuid *id)
{
    size_t lo = 0, hi = store_idrun_n(vl);

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = memcmp(store_idrun_id(v, mid), id->b, 16);
        if (c == 0)
            return store_idrun_pos(v, mid);
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static inline size_t
store_key_meta(uint8_t *k, char tag, const char *stream, size_t slen)
{
    k[0] = (uint8_t)tag;
    memcpy(k + 1, stream, slen);
    return slen + 1;
}

/* ---- The writer's stream cache ------------------------------------------- */

typedef struct store_stream {
    struct store_stream *hnext;    /* hash chain */
    struct store_stream *lru_prev; /* most recent at s->w.lru_head */
    struct store_stream *lru_next;
    uint64_t hash;
    uint64_t last;    /* committed last version */
    store_policy pol; /* committed policy */
    uint64_t p_gen;   /* pending values below are valid when == w.gen */
    uint64_t p_last;
    store_policy p_pol;
    size_t len;
    char name[]; /* len bytes and a NUL */
} store_stream;

/* ---- Writer requests ----------------------------------------------------- */

/* One stream's part of a request. */
typedef struct store_part {
    const char *stream;
    size_t slen;
    uint64_t shash; /* store_hash(stream), set by the writer */
    uint64_t expected;
    bus_event *const *events;
    size_t n;
    bus_store_append_result res;
} store_part;

/* A key-value operation of a transaction; key and value live in the
 * transaction's byte buffer. */
typedef struct store_op {
    uint8_t cf;
    uint8_t del;
    size_t koff, klen;
    size_t voff, vlen;
} store_op;

typedef enum store_req_kind {
    REQ_WRITE = 1, /* appends and/or key-value operations */
    REQ_META,      /* set a stream's retention policy */
    REQ_DELETE,    /* soft or hard delete */
    REQ_FLUSH_IDS  /* write the id index's tail now (scavenge) */
} store_req_kind;

typedef struct store_req {
    struct store_req *next;
    store_req_kind kind;
    store_part *parts;
    size_t nparts;
    const store_op *ops;
    size_t nops;
    const uint8_t *opbytes;
    /* REQ_META / REQ_DELETE: parts[0].stream, .expected */
    bus_store_stream_meta meta;
    bool hard;
    size_t cost; /* estimated bytes, for the group cap */
    int rv;
    bool done;
    bool leader;
    bool has_cond;
    bus__cond cond;
    /* An asynchronous append (bus_store_append_async): the request owns
     * itself (one block of alloc_size bytes: this, its part, the events'
     * array and the stream's copy) and no thread waits for it; the writer
     * thread calls cb and frees it. */
    bus_store_append_cb cb;
    void *cb_arg;
    size_t alloc_size;
} store_req;

/* Pending event ids of the current group (id -> where it goes). */
typedef struct store_pid {
    bus_uuid id;
    store_stream *st;
    uint64_t ver;
    uint64_t pos;
    uint32_t req_seq; /* which request of the group added it */
    uint32_t hnext;   /* chain, index + 1; 0 ends */
    bool fresh;       /* above every id of the index: no 'e' record */
} store_pid;

/* An event of the id index's tail (committed, not yet in a run). */
typedef struct store_tail_ent {
    bus_uuid id;
    uint64_t pos;
} store_tail_ent;

/* Undo record for a request that fails after changing pending state. */
typedef struct store_undo {
    store_stream *st;
    uint64_t p_gen;
    uint64_t p_last;
    store_policy p_pol;
} store_undo;

/* State only the current writer (the leader) touches. */
typedef struct store_writer {
    rocksdb_writebatch_t *wb;
    store_buf enc;   /* encoded events of the current request */
    size_t *enc_off; /* per event offset into enc */
    size_t enc_cap;
    uint64_t gen;      /* group number */
    uint64_t next_pos; /* next position to give */
    bus_uuid max_id;   /* no stored id is greater (memcmp) */
    /* stream cache */
    store_stream **tab;
    size_t tab_size; /* power of two */
    size_t n_streams;
    store_stream *lru_head, *lru_tail;
    /* current group */
    store_stream **touched;
    size_t n_touched, cap_touched;
    store_pid *pids;
    size_t n_pids, cap_pids;
    uint32_t *pid_tab; /* buckets: index + 1 */
    size_t pid_tab_size;
    store_undo *undo;
    size_t n_undo, cap_undo;
    /* the id index (see "The event-id index" above) */
    store_tail_ent *tail; /* sorted by id */
    size_t n_tail, cap_tail;
    bus_uuid runs_max; /* no id of an 'e' or run record is greater */
    /* The newest run entries this writer wrote, sorted by id: every run
     * entry at or above recent[0].id is here (older runs hold smaller
     * ids), so a lookup in that range needs no seek. Entries a scavenge
     * removed since stay; the log read that confirms a hit notices. */
    store_tail_ent *recent;
    size_t n_recent, cap_recent;
    uint64_t indexed; /* the watermark: positions <= are in the index */
    bool flush_ids;   /* a flush of the tail was asked for */
    store_buf runbuf; /* a run record being built */
    rocksdb_iterator_t *run_it; /* id runs, for this group's lookups */
} store_writer;

/* ---- Readers' view of retention policies --------------------------------- */

typedef struct store_pol_ent {
    struct store_pol_ent *next;
    uint64_t hash;
    store_policy pol;
    size_t len;
    char name[];
} store_pol_ent;

/* ---- Subscriptions and projectors (sub.c, projector.c) ------------------- */

typedef struct store_tail store_tail;

/* Something with a thread that store close must stop. */
typedef struct store_worker {
    struct store_worker *next;
    struct store_worker *prev;
    void (*stop)(struct store_worker *w);    /* non-blocking */
    void (*destroy)(struct store_worker *w); /* join and free */
    bool is_projector;
    const char *name;
} store_worker;

/* Compiled filter. */
typedef struct store_filter {
    const char *prefix;
    size_t plen;
    const char *const *types;
    bool any; /* no condition */
} store_filter;

/* A deep copy of a bus_store_filter (sub.c). */
typedef struct store_fcopy {
    char *prefix;
    size_t prefix_size;
    char **types; /* NULL-terminated */
    size_t n_types;
    size_t *type_sizes;
} store_fcopy;
int bus__store_fcopy_init(store_fcopy *fc, const bus_store_filter *in);
void bus__store_fcopy_fini(store_fcopy *fc);
void bus__store_fcopy_filter(const store_fcopy *fc, store_filter *out);

/* Retry settings with defaults applied; the wait before attempt n+1. */
void bus__store_retry_defaults(bus_store_retry *r);
uint64_t bus__store_backoff_ns(const bus_store_retry *r, uint32_t attempt);

/* Waits on ev_cond until deadline (monotonic ns) or until stop(arg),
 * evaluated under ev_mtx, is true. Returns false when stopped. */
bool bus__store_sleep(bus_store *s, uint64_t deadline, bool (*stop)(void *),
                      void *arg);

/* ---- The store ----------------------------------------------------------- */

struct bus_store {
    bus_store_config cfg; /* validated copy; cfg.path points to path */
    char *path;
    size_t path_size;
    rocksdb_t *db;
    rocksdb_options_t *dbopts;
    rocksdb_options_t *cfopts[CF_COUNT];
    rocksdb_block_based_table_options_t *bbto[2];
    rocksdb_cache_t *cache;
    rocksdb_column_family_handle_t *cf[CF_COUNT];
    rocksdb_column_family_handle_t **extra_cf; /* unknown families */
    size_t n_extra_cf;
    rocksdb_writeoptions_t *wo;      /* WAL, no sync */
    rocksdb_writeoptions_t *wo_sync; /* WAL, fsync */
    rocksdb_readoptions_t *ro;       /* latest, default options */
    bus_codec_limits limits;

    atomic_bool closing;
    _Atomic uint64_t head;    /* last committed position */
    _Atomic uint64_t indexed; /* the id index's watermark (w.indexed) */

    /* group writer queue */
    bus__mutex wq_mtx;
    store_req *wq_head, *wq_tail;
    bool leader_busy;
    uint32_t inflight; /* accepted, not yet answered */
    bus__cond wq_idle;
    /* The writer thread, started by the first asynchronous append: it
     * takes the leader role when the queue's head is an asynchronous
     * request (no thread waits to lead it) and runs the callbacks, in
     * commit order, from its completion queue. */
    bus__thread wr_thread;
    bool wr_started;
    bool wr_role;   /* the leader role is the writer thread's */
    bool wr_stop;
    bus__cond wr_cond;
    store_req *cq_head, *cq_tail; /* written, callbacks to run */
    size_t async_bytes;           /* asynchronous requests' cost in flight */
    size_t wr_released; /* writer thread only: answered, not yet given back
                         * to async_bytes */
    uint32_t callers;   /* threads inside submit / submit_async (close
                         * waits for none) */
    bus__cond async_cond;         /* async_bytes went down, or closing */
    store_writer w; /* @locks the leader role */

    /* readers' policies */
    bus__mutex pol_mtx;
    store_pol_ent **pol_tab;
    size_t pol_tab_size;
    _Atomic size_t n_pol;

    /* serialises metadata changes with scavenge */
    bus__mutex meta_mtx;

    /* commit notification, subscription/projector control and registry */
    bus__mutex ev_mtx;
    bus__cond ev_cond;    /* broadcast on commit and control */
    store_worker workers; /* list head (sentinel) */

    /* statistics (relaxed) */
    _Atomic uint64_t st_appends, st_events, st_dups, st_conflicts;
    _Atomic uint64_t st_groups, st_syncs;
    bool mutexes_ready;
    bool ready; /* opened: the writer's state was recovered */
};

/* store.c */
void bus__store_logf(bus_store *s, bus_log_level lv, const char *fmt, ...)
    BUS_PRINTF(3, 4);
/* Maps a RocksDB error string to a code, logs it, frees it. */
int bus__store_rdb_err(bus_store *s, char *err, const char *what);
bool bus__store_name_ok(const char *s, size_t *len, size_t max);
int bus__store_write_direct(bus_store *s, rocksdb_writebatch_t *wb, bool sync);
/* The monotonic notification: wake everything waiting on ev_cond. */
void bus__store_notify(bus_store *s);
void bus__store_worker_add(bus_store *s, store_worker *w);
void bus__store_worker_remove(bus_store *s, store_worker *w);

/* writer.c */
int bus__store_writer_init(bus_store *s);
void bus__store_writer_fini(bus_store *s);
int bus__store_submit(bus_store *s, store_req *r);
/* At close, once nothing is in flight: stops and joins the writer thread
 * if it was started. */
void bus__store_writer_thread_stop(bus_store *s);
/* True on the writer thread of s (in an asynchronous append's callback):
 * a blocking writer call there would wait for itself (BUS_EBUSY). */
bool bus__store_in_callback(const bus_store *s);
/* Writes the id index's tail through the writer: afterwards every event
 * committed before the call is at or below s->indexed. */
int bus__store_flush_ids(bus_store *s);
/* At close, with no writer active: the same, directly. */
void bus__store_flush_ids_final(bus_store *s);
/* Rebuilds the writer's id state at open: the tail from the log records
 * above the watermark, the greatest id. @thread open. */
int bus__store_ids_recover(bus_store *s);
int bus__store_load_stream(bus_store *s, const rocksdb_readoptions_t *ro,
                           const char *stream, size_t slen, uint64_t *last,
                           store_policy *pol);
void bus__store_policy_encode(uint8_t *out, const store_policy *p);
int bus__store_policy_decode(const void *v, size_t n, store_policy *p);
/* Emits a transaction's operations into wb. */
void bus__store_emit_ops(bus_store *s, rocksdb_writebatch_t *wb,
                         const store_op *ops, size_t nops,
                         const uint8_t *bytes);

/* read.c */
int bus__store_pol_load(bus_store *s);
void bus__store_pol_fini(bus_store *s);
void bus__store_pol_set(bus_store *s, const char *name, size_t len,
                        const store_policy *p);
bool bus__store_pol_get(bus_store *s, const char *name, size_t len,
                        store_policy *p);
void bus__store_filter_init(store_filter *f, const bus_store_filter *bf);
/* What the reader needs from an envelope without decoding it. */
typedef struct store_peek {
    const uint8_t *id; /* 16 bytes; NULL if the envelope has none */
    const char *type;
    size_t type_len;
    const char *stream;
    size_t stream_len;
    uint64_t sver;
    int64_t ts;
} store_peek;
int bus__store_peek(const void *buf, size_t len, store_peek *pk);
bool bus__store_filter_match(const store_filter *f, const store_peek *pk);
/* Decodes a log record into a new event with its position set. */
int bus__store_decode(bus_store *s, const void *buf, size_t len, uint64_t pos,
                      bus_event **out);
int bus__store_slice_push(bus_store_slice *sl, bus_event *e);
void bus__store_slice_clear(bus_store_slice *sl);
/* Internal forms of the reads: filter pre-compiled, slice not cleared
 * first, max_scan bounded. */
int bus__store_read_all(bus_store *s, uint64_t from, bus_store_direction dir,
                        size_t max_count, size_t max_scan,
                        const store_filter *f, bus_store_slice *out);
int bus__store_read_stream(bus_store *s, const char *stream, size_t slen,
                           uint64_t from, bus_store_direction dir,
                           size_t max_count, const store_filter *f,
                           bus_store_slice *out);
/* Visibility of an event under its stream's policy; last is the stream's
 * last version, now_ms the wall clock. */
bool bus__store_visible(const store_policy *p, uint64_t last, uint64_t ver,
                        int64_t ts_ns, int64_t now_ms);

/* Transactions (txn.c): what the projector needs. */
struct bus_store_txn {
    bus_store *s;
    store_buf bytes;
    store_op *ops;
    size_t nops, cap_ops;
    /* appends: stream bytes live in `bytes`, events in evs */
    struct txn_part {
        size_t soff, slen;
        uint64_t expected;
        size_t ev_off, n;
    } * parts;
    size_t nparts, cap_parts;
    bus_event **evs;
    size_t nevs, cap_evs;
    const uint8_t *prefix; /* projector namespace for BUS_STORE_APP */
    size_t plen;
    bool projector;
};
void bus__store_txn_init(bus_store_txn *t, bus_store *s);
void bus__store_txn_clear(bus_store_txn *t);
void bus__store_txn_fini(bus_store_txn *t);
/* Rolls back to (nops, bytes) taken earlier. */
void bus__store_txn_truncate(bus_store_txn *t, size_t nops, size_t nbytes);
int bus__store_txn_put_raw(bus_store_txn *t, int cf, const void *k1,
                           size_t k1len, const void *k2, size_t k2len,
                           const void *v, size_t vlen, bool del);

#endif
