/*
 * The event store: an append-only log of events on RocksDB, organised in
 * streams, with optimistic concurrency, a global ordered log ("$all"),
 * catch-up subscriptions and projectors. docs/store.md gives the key
 * layout, the guarantees and the durability modes in full.
 *
 * Numbers. Every event gets a global position (1, 2, 3, ... in commit
 * order, never reused) and a version within its stream (1, 2, 3, ...).
 * Position 0 and version 0 mean "none": a stream whose last version is 0
 * has never had an event.
 *
 * Writes. Every change (appends, transactions, metadata, deletes) goes
 * through one writer that groups concurrent requests into one RocksDB
 * write and, per the durability mode, one WAL sync (group commit). The
 * writer role is taken by the first waiting caller (as RocksDB's own write
 * queue does), so a lone appender pays no thread hand-off. Each request
 * gets its own result: a conflict in one does not fail the others.
 *
 * Events given to the store are borrowed and never changed: the store
 * records them under the stream, version and position it assigns, and the
 * events read back carry those. An event's own stream field is ignored by
 * appends.
 *
 * Threads: every function may be called from any thread unless its comment
 * says otherwise. Callbacks (handlers, signals) run on the thread of their
 * subscription or projector, never under a store lock.
 *
 * Build: this component exists when libbus is built with BUS_WITH_ROCKSDB.
 */
#ifndef BUS_STORE_H
#define BUS_STORE_H

#include <bus/common.h>
#include <bus/err.h>
#include <bus/event.h>
#include <bus/handler.h>
#include <bus/log.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_store bus_store;
typedef struct bus_store_txn bus_store_txn;
typedef struct bus_store_sub bus_store_sub;
typedef struct bus_projector bus_projector;

/* The on-disk format this library writes. Opening a store of a newer
 * format fails with BUS_EVERSION. */
#define BUS_STORE_FORMAT_VERSION 2

/* Expected versions for appends and deletes. Any other value n means "the
 * stream's last version is exactly n" (0: it never had an event). */
#define BUS_STORE_ANY UINT64_MAX             /* no check */
#define BUS_STORE_NO_STREAM (UINT64_MAX - 1) /* absent or soft-deleted */
#define BUS_STORE_EXISTS (UINT64_MAX - 2)    /* has events, not deleted */

/* Read and subscription bounds. */
#define BUS_STORE_START 0        /* before the first version/position */
#define BUS_STORE_END UINT64_MAX /* the current end */

/* ---- Opening ------------------------------------------------------------- */

typedef enum bus_store_durability {
    BUS_STORE_DURABILITY_DEFAULT = 0, /* BUS_STORE_GROUP */
    /* Every write goes to the WAL without fsync: a process crash loses
     * nothing acknowledged (the WAL is in the page cache), an OS crash or
     * power loss may lose the last writes (never part of one). */
    BUS_STORE_NONE = 1,
    /* Everything that goes through the group writer (appends,
     * transactions with their application-family writes, metadata,
     * deletes) is acknowledged after the WAL is fsynced, once per group
     * commit. Checkpoints and projector commits are not synced on their
     * own; a lost one is replayed (state and checkpoint are lost
     * together). */
    BUS_STORE_GROUP = 2,
    /* As GROUP, and checkpoints and projector commits are fsynced too. */
    BUS_STORE_ALWAYS = 3
} bus_store_durability;

/* Zero in any field means its default; bus_store_config_init writes them. */
typedef struct bus_store_config {
    size_t size;            /* sizeof(bus_store_config); 0 = this size */
    const char *path;       /* required: the store's directory */
    bool create_if_missing; /* create an empty store there; default false */
    bus_store_durability durability; /* default BUS_STORE_GROUP */
    size_t block_cache_bytes;   /* shared LRU block cache; default 64 MiB */
    size_t write_buffer_bytes;  /* memtable of the log family; def. 64 MiB */
    uint32_t max_append_events; /* events in one append/txn; def. 10000 */
    size_t max_event_bytes;     /* one encoded event; default 16 MiB */
    size_t max_append_bytes;    /* one request, encoded; default 64 MiB */
    size_t max_group_bytes;     /* group commit batch cap; default 8 MiB
                                 * (a larger single request goes alone) */
    uint32_t stream_cache;      /* streams whose state the writer caches;
                                 * default 65536 */
    bus_logger logger;          /* subsystem "store"; default: no logging */
    size_t max_async_bytes;     /* bus_store_append_async: requests in
                                 * flight (queued, written or waiting for
                                 * their callback), by the same estimate
                                 * as max_group_bytes; default 16 MiB */
} bus_store_config;

/* Fills cfg with the defaults and cfg->size. path is left NULL. */
BUS_API void bus_store_config_init(bus_store_config *cfg);

/* Opens (or, with create_if_missing, creates) the store at cfg->path.
 * Borrows cfg (copied). On failure *out is NULL and errbuf (if not NULL)
 * says why. Blocks: RocksDB recovery (WAL replay).
 * Returns BUS_OK,
 *   BUS_EINVAL    bad config, or path is not a libbus store (a file, a
 *                 directory with other content, a RocksDB of another kind),
 *   BUS_ENOTFOUND path does not exist and create_if_missing is false,
 *   BUS_EVERSION  the store has a newer format version,
 *   BUS_ECORRUPT  RocksDB or our own records are damaged,
 *   BUS_EBUSY     another process has it open (RocksDB LOCK),
 *   BUS_EIO, BUS_ENOMEM. */
BUS_API int bus_store_open(bus_store **out, const bus_store_config *cfg,
                           char *errbuf, size_t errbuf_len);

/* Refuses new requests (BUS_ECLOSED), tells every subscription and
 * projector to stop. Does not block. NULL is a no-op. Thread: any, also a
 * handler of this store. */
BUS_API void bus_store_close_async(bus_store *s);

/* bus_store_close_async, then waits for requests in flight, stops and
 * frees the subscriptions and projectors still open (their handles become
 * invalid: close them first if you hold them), closes RocksDB and frees s.
 * After it returns no callback runs. NULL is a no-op.
 * Thread: not from a handler of this store. Blocks. */
BUS_API void bus_store_close(bus_store *s);

/* ---- Appending ----------------------------------------------------------- */

/* The outcome of one append (one stream's part of a request). */
typedef struct bus_store_append_result {
    int err;                /* BUS_OK or why this part failed */
    bool duplicate;         /* idempotent retry: nothing written; the
                             * figures are the original append's */
    uint64_t first_version; /* versions given to the events; 0 when none */
    uint64_t last_version;
    uint64_t first_position; /* global positions; 0 when none */
    uint64_t last_position;
    uint64_t current_version; /* the stream's last version after the call;
                               * on BUS_ECONFLICT the version found */
} bus_store_append_result;

/* Appends n events to stream (UTF-8, 1..4096 bytes, no NUL) if its last
 * version matches expected_version (a number or BUS_STORE_ANY,
 * BUS_STORE_NO_STREAM, BUS_STORE_EXISTS). Borrows stream and events (their
 * bytes are copied; the events are not changed). res may be NULL.
 *
 * Idempotence (as EventStoreDB): when every event id is already stored, as
 * one run in this stream matching expected_version, nothing is written and
 * res gets the original figures with duplicate set. Ids stored elsewhere,
 * or only some of them stored, is BUS_EEXIST.
 *
 * n may be 0: the expected version is checked and nothing is written.
 * Blocks: until the group commit holding it is written (and fsynced, per
 * durability). Returns BUS_OK, BUS_ECONFLICT (res->current_version is the
 * version found), BUS_EDELETED (stream hard-deleted), BUS_EEXIST,
 * BUS_EINVAL, BUS_ETOOBIG (limits in bus_store_config), BUS_ECLOSED,
 * BUS_EIO, BUS_ENOMEM. On any error nothing of this append was written. */
BUS_API int bus_store_append(bus_store *s, const char *stream,
                             uint64_t expected_version,
                             bus_event *const *events, size_t n,
                             bus_store_append_result *res);

/* Asynchronous appends: bus_store_append without waiting. A thread that
 * queues many appends lets the group commit put them into few fsyncs,
 * where a blocking append has one in flight (docs/store.md, Asynchronous
 * appends). */

/* The outcome of an asynchronous append: res->err is BUS_OK or why it
 * failed (the codes of bus_store_append); the other fields as there. res
 * is valid during the call only. Runs on the store's writer thread
 * ("bus-store-wr"), one call at a time, in the order the appends were
 * queued (which is their commit order). A callback must not block: it
 * may read and queue more asynchronous appends (never blocking: a full
 * window is BUS_EAGAIN there); the blocking writer calls (bus_store_append,
 * _multi, transaction commits, metadata, deletes, scavenge) return
 * BUS_EBUSY from it, and bus_store_close must not be called from it. Nor
 * may it wait on another store (a blocking call, or a blocking
 * asynchronous append there): two stores' writer threads could wait for
 * each other. */
typedef void (*bus_store_append_cb)(void *opaque,
                                    const bus_store_append_result *res);

/* bus_store_append_async flags */
#define BUS_STORE_NONBLOCK 0x1u /* a full window is BUS_EAGAIN, not a wait */

/* Queues an append of n events to stream (as bus_store_append: the same
 * checks, limits, idempotence and durability) and returns; cb(opaque,
 * res) runs exactly once when it is written (and fsynced, per
 * durability) or has failed. Appends queued by one thread are applied in
 * the order queued, so expected versions may follow one another. Copies
 * stream; freezes the events (as publishing does) and holds a reference
 * on each until the callback has returned. Blocks while the appends in
 * flight exceed cfg.max_async_bytes (not with BUS_STORE_NONBLOCK, nor in a
 * callback: BUS_EAGAIN; a callback's own append no longer counts there).
 * The events are frozen even if the call fails. On an error returned here
 * the callback never runs and nothing was queued: BUS_EINVAL (also cb
 * NULL), BUS_ETOOBIG,
 * BUS_EAGAIN, BUS_ECLOSED, BUS_ENOMEM. bus_store_close waits for every
 * queued append and its callback. Thread: any. */
BUS_API int bus_store_append_async(bus_store *s, const char *stream,
                                   uint64_t expected_version,
                                   bus_event *const *events, size_t n,
                                   unsigned flags, bus_store_append_cb cb,
                                   void *opaque);

/* One stream's part of a multi-stream append. */
typedef struct bus_store_append_req {
    const char *stream;
    uint64_t expected_version;
    bus_event *const *events;
    size_t n_events;
} bus_store_append_req;

/* Appends to several streams in one RocksDB write: all parts or none.
 * Parts are applied in order (a stream may appear twice; the second part
 * sees the first). results (may be NULL) has n entries: on failure the
 * failing part's err says why and the others' err is BUS_ECANCELED.
 * Returns as bus_store_append: the first failing part's code. */
BUS_API int bus_store_append_multi(bus_store *s,
                                   const bus_store_append_req *reqs, size_t n,
                                   bus_store_append_result *results);

/* ---- Transactions: appends and application state in one write ------------ */

/* Key/value families a transaction may write besides streams. */
typedef enum bus_store_family {
    BUS_STORE_APP = 0,   /* the application's own state (projections, ...) */
    BUS_STORE_OUTBOX = 1 /* reserved for the transactional outbox */
} bus_store_family;

/* Begins a transaction: it collects application-family writes, appends
 * and checkpoints, and commits them in one RocksDB write through the group
 * writer. Nothing is visible before commit. A transaction belongs to one
 * thread at a time. Returns BUS_OK, BUS_ECLOSED, BUS_ENOMEM. */
BUS_API int bus_store_txn_begin(bus_store *s, bus_store_txn **out);

/* Puts key -> val in family fam (copied). Keys are 1..65535 bytes, values
 * up to max_event_bytes. Returns BUS_OK, BUS_EINVAL, BUS_ETOOBIG,
 * BUS_ENOMEM (the transaction is unchanged). */
BUS_API int bus_store_txn_put(bus_store_txn *t, bus_store_family fam,
                              const void *key, size_t klen, const void *val,
                              size_t vlen);

/* Deletes key in fam at commit. Returns BUS_OK, BUS_EINVAL, BUS_ENOMEM. */
BUS_API int bus_store_txn_delete(bus_store_txn *t, bus_store_family fam,
                                 const void *key, size_t klen);

/* Reads key, seeing this transaction's own writes first. *val gets a new
 * buffer (free with bus_store_buf_free(*val, *vlen)).
 * Returns BUS_OK, BUS_ENOTFOUND, BUS_EIO, BUS_ENOMEM. */
BUS_API int bus_store_txn_get(bus_store_txn *t, bus_store_family fam,
                              const void *key, size_t klen, void **val,
                              size_t *vlen);

/* Adds an append to the transaction: checked and applied at commit as in
 * bus_store_append_multi (all or nothing with the rest). Takes a
 * reference to each event (dropped when the transaction ends).
 * Returns BUS_OK, BUS_EINVAL, BUS_ENOTSUP (in a projector's transaction),
 * BUS_ETOOBIG, BUS_ENOMEM (the transaction is unchanged). */
BUS_API int bus_store_txn_append(bus_store_txn *t, const char *stream,
                                 uint64_t expected_version,
                                 bus_event *const *events, size_t n);

/* Sets the named checkpoint (see bus_store_checkpoint_set) at commit. */
BUS_API int bus_store_txn_checkpoint(bus_store_txn *t, const char *name,
                                     uint64_t position);

/* Commits everything in one write and ends t (freed in all cases).
 * results (may be NULL) gets one entry per bus_store_txn_append, in order,
 * n_results of them at most. Blocks as bus_store_append.
 * Returns BUS_OK or the first error as bus_store_append_multi; on error
 * nothing was written. */
BUS_API int bus_store_txn_commit(bus_store_txn *t,
                                 bus_store_append_result *results,
                                 size_t n_results);

/* Ends t without writing anything. NULL is a no-op. */
BUS_API void bus_store_txn_abort(bus_store_txn *t);

/* Frees a buffer returned by the store (get functions). NULL is a no-op. */
BUS_API void bus_store_buf_free(void *buf, size_t len);

/* Reads key from a family outside any transaction.
 * Returns BUS_OK, BUS_ENOTFOUND, BUS_EIO, BUS_ENOMEM, BUS_ECLOSED. */
BUS_API int bus_store_get(bus_store *s, bus_store_family fam, const void *key,
                          size_t klen, void **val, size_t *vlen);

/* Calls fn for every key of fam starting with prefix (plen 0: all), in key
 * order, from one consistent snapshot; stops early when fn returns false.
 * fn borrows key and val for the call. Thread: fn runs on the caller's.
 * Returns BUS_OK, BUS_EIO, BUS_ECLOSED. */
typedef bool (*bus_store_kv_fn)(void *opaque, const void *key, size_t klen,
                                const void *val, size_t vlen);
BUS_API int bus_store_scan(bus_store *s, bus_store_family fam,
                           const void *prefix, size_t plen, bus_store_kv_fn fn,
                           void *opaque);

/* ---- Reading ------------------------------------------------------------- */

typedef enum bus_store_direction {
    BUS_STORE_FORWARD = 0,
    BUS_STORE_BACKWARD = 1
} bus_store_direction;

/* Both conditions at once (AND). Zero: every event. */
typedef struct bus_store_filter {
    const char *stream_prefix; /* stream starts with it; NULL/"": any */
    const char *const *types;  /* NULL-terminated list of event types
                                * (any of them); NULL: any type */
} bus_store_filter;

typedef enum bus_store_read_status {
    BUS_STORE_READ_OK = 0,        /* the stream exists ($all: always) */
    BUS_STORE_READ_NO_STREAM = 1, /* never written, or soft-deleted */
    BUS_STORE_READ_DELETED = 2    /* hard-deleted (tombstone) */
} bus_store_read_status;

/* What a read returns. Zero-initialise, pass to a read, release with
 * bus_store_slice_free (then it may be reused). */
typedef struct bus_store_slice {
    bus_event **events; /* count events in read order; the slice owns one
                         * reference to each (bus_event_ref to keep one) */
    size_t count;
    bus_store_read_status status;
    uint64_t next; /* pass as `from` to read on (version or position) */
    bool end;      /* nothing further in this direction at read time */
    uint64_t last; /* stream: its last version; $all: head position */
    size_t cap_;   /* private */
} bus_store_slice;

/* Reads up to max_count (0: 1000) events of stream, from from_version
 * (inclusive) in direction dir. Forward from BUS_STORE_START reads from the
 * beginning; backward from BUS_STORE_END from the last event. Events hidden
 * by the stream's metadata (truncate-before, max count, max age) are
 * skipped at once, before any scavenge. A missing stream is not an error:
 * out->status says BUS_STORE_READ_NO_STREAM (or _DELETED) and count is 0.
 * filter (may be NULL) applies its types only. Consistent snapshot.
 * Returns BUS_OK, BUS_EINVAL, BUS_ECORRUPT (an undecodable record; logged),
 * BUS_EIO, BUS_ENOMEM, BUS_ECLOSED; on error out is empty. */
BUS_API int bus_store_read_stream(bus_store *s, const char *stream,
                                  uint64_t from_version,
                                  bus_store_direction dir, size_t max_count,
                                  const bus_store_filter *filter,
                                  bus_store_slice *out);

/* Reads up to max_count (0: 1000) events of the global log from
 * from_position (inclusive) in direction dir, keeping those that pass
 * filter (may be NULL) and are visible under their stream's metadata. A
 * call examines at most 64 * max_count records, so a selective filter may
 * return fewer events with end false: continue from out->next.
 * Returns as bus_store_read_stream. */
BUS_API int bus_store_read_all(bus_store *s, uint64_t from_position,
                               bus_store_direction dir, size_t max_count,
                               const bus_store_filter *filter,
                               bus_store_slice *out);

/* Drops the events' references and the array; leaves sl zeroed. */
BUS_API void bus_store_slice_free(bus_store_slice *sl);

/* The last committed position (0: empty store). Thread: any; lock-free. */
BUS_API uint64_t bus_store_head(const bus_store *s);

/* ---- Stream metadata and deletion ---------------------------------------- */

/* Retention rules, honoured by reads at once and applied to disk by
 * bus_store_scavenge. Zero fields mean "no limit". */
typedef struct bus_store_stream_meta {
    uint64_t max_count;       /* keep the last max_count events */
    uint64_t max_age_ms;      /* hide events whose timestamp is older */
    uint64_t truncate_before; /* hide versions below this one */
} bus_store_stream_meta;

typedef enum bus_store_stream_state {
    BUS_STORE_STREAM_NONE = 0,     /* never had an event */
    BUS_STORE_STREAM_LIVE = 1,     /* has (had) events; appendable */
    BUS_STORE_STREAM_DELETED = 2,  /* soft-deleted: re-created by an append
                                    * (versions continue) */
    BUS_STORE_STREAM_TOMBSTONE = 3 /* hard-deleted: never again */
} bus_store_stream_state;

typedef struct bus_store_stream_info {
    bus_store_stream_state state;
    uint64_t last_version;      /* 0: never had an event */
    bus_store_stream_meta meta; /* soft delete shows as truncate_before */
} bus_store_stream_info;

/* The stream's state now. A stream that does not exist is BUS_OK with
 * state NONE. Returns BUS_OK, BUS_EINVAL, BUS_EIO, BUS_ECLOSED. */
BUS_API int bus_store_stream_info_get(bus_store *s, const char *stream,
                                      bus_store_stream_info *out);

/* Replaces the stream's retention rules (the stream need not exist yet).
 * truncate_before only grows: a smaller value keeps the current one.
 * Returns BUS_OK, BUS_EDELETED (tombstone), BUS_EINVAL, BUS_ECLOSED,
 * BUS_EIO. */
BUS_API int bus_store_stream_set_meta(bus_store *s, const char *stream,
                                      const bus_store_stream_meta *meta);

/* Deletes a stream whose version matches expected_version. Soft (hard
 * false): its events are hidden at once and the stream can be re-created
 * by a later append, with versions continuing after the last one. Hard: a
 * tombstone; appends fail with BUS_EDELETED forever. Disk space returns
 * with bus_store_scavenge. Returns BUS_OK, BUS_ECONFLICT, BUS_ENOTFOUND
 * (soft delete of a stream with no events), BUS_EDELETED (already
 * tombstoned), BUS_EINVAL, BUS_ECLOSED, BUS_EIO. */
BUS_API int bus_store_stream_delete(bus_store *s, const char *stream,
                                    uint64_t expected_version, bool hard);

typedef struct bus_store_scavenge_stats {
    uint64_t streams;        /* streams examined (those with rules) */
    uint64_t events_removed; /* log records deleted */
} bus_store_scavenge_stats;

/* Physically removes what metadata and deletes hide: log records, their
 * stream-index and event-id entries. With compact, also compacts every
 * family so the space returns to the file system now. Runs on the caller's
 * thread; appends continue meanwhile. An event id removed here no longer
 * makes a re-append idempotent. st may be NULL.
 * Returns BUS_OK, BUS_EIO, BUS_ECLOSED, BUS_ENOMEM. */
BUS_API int bus_store_scavenge(bus_store *s, bool compact,
                               bus_store_scavenge_stats *st);

/* ---- Checkpoints --------------------------------------------------------- */

/* Named positions in the checkpoints family. Names are 1..255 bytes; names
 * starting with '$' are the store's ("$projector/<name>").
 * Blocks: a RocksDB write (fsynced with BUS_STORE_ALWAYS).
 * Returns BUS_OK, BUS_EINVAL, BUS_EIO, BUS_ECLOSED. */
BUS_API int bus_store_checkpoint_set(bus_store *s, const char *name,
                                     uint64_t position);
/* Returns BUS_OK, BUS_ENOTFOUND, BUS_EINVAL, BUS_EIO, BUS_ECLOSED. */
BUS_API int bus_store_checkpoint_get(bus_store *s, const char *name,
                                     uint64_t *position);
BUS_API int bus_store_checkpoint_delete(bus_store *s, const char *name);

/* ---- Subscriptions ------------------------------------------------------- */

typedef enum bus_store_signal {
    BUS_STORE_CAUGHT_UP = 1,   /* delivered all up to the head; now live */
    BUS_STORE_FELL_BEHIND = 2, /* lagged more than max_live_lag while live:
                                * catching up from the log again */
    BUS_STORE_DEAD_LETTER = 3, /* an event was given up (REJECT, or RETRY
                                * with attempts exhausted) and skipped */
    BUS_STORE_STOPPED = 4      /* stopped on an error (err says which) or
                                * by the BUS_STORE_ON_FAIL_STOP policy */
} bus_store_signal;

typedef struct bus_store_signal_info {
    const char *name;  /* subscription or projector name ("" if none) */
    uint64_t position; /* last delivered (DEAD_LETTER: the event's) */
    uint64_t head;     /* the store's head then */
    bus_event *event;  /* DEAD_LETTER: the event, borrowed; else NULL */
    int err;           /* DEAD_LETTER, STOPPED: handler's or store's code */
    const char *msg;   /* its message, "" if none */
    uint32_t attempts; /* DEAD_LETTER: attempts made */
} bus_store_signal_info;

/* Called on the subscription's (projector's) thread; info and what it
 * points to are valid during the call. Must not block for long. */
typedef void (*bus_store_signal_fn)(void *opaque, bus_store_signal sig,
                                    const bus_store_signal_info *info);

typedef enum bus_store_on_fail {
    BUS_STORE_ON_FAIL_DEFAULT = 0, /* BUS_STORE_ON_FAIL_SKIP */
    BUS_STORE_ON_FAIL_SKIP = 1,    /* dead-letter the event and go on */
    BUS_STORE_ON_FAIL_STOP = 2     /* stop before it (signal STOPPED) */
} bus_store_on_fail;

/* What a handler's RETRY and REJECT do (handler.h). RETRY waits a backoff
 * (exponential, with jitter, capped) and calls again, up to max_attempts
 * calls in all; REJECT, or RETRY on the last attempt, dead-letters: a
 * counter, a BUS_STORE_DEAD_LETTER signal, for projectors a record in the
 * checkpoints family (bus_store_dead_letters), then on_fail. Zero fields
 * mean the defaults. */
typedef struct bus_store_retry {
    uint32_t max_attempts;  /* calls per event; default 3 */
    int32_t backoff_ms;     /* first wait; default 10 */
    int32_t backoff_max_ms; /* cap (doubling); default 1000 */
    bus_store_on_fail on_fail;
} bus_store_retry;

typedef struct bus_store_sub_config {
    size_t size;        /* sizeof; 0 = this size */
    const char *name;   /* for deliveries, signals and logs; optional */
    const char *stream; /* one stream; NULL: $all */
    /* Deliver events after this position ($all) or version (stream);
     * BUS_STORE_START: from the beginning, BUS_STORE_END: only new ones. */
    uint64_t start_after;
    bus_store_filter filter; /* $all: both parts; stream: types */
    bus_handler_fn handler;  /* required */
    void *opaque;
    bus_store_signal_fn on_signal; /* optional */
    void *signal_opaque;
    bus_store_retry retry;
    uint32_t batch_size;   /* events read from the log at a time; def. 256 */
    uint64_t max_live_lag; /* positions behind the head that make a live
                            * subscription fall behind; default 65536 */
    /* With a checkpoint name: start after the stored checkpoint when there
     * is one (start_after otherwise) and store the last delivered position
     * (a version for a stream subscription) there every checkpoint_every
     * events (default 1000) and on close: at-least-once. Projectors give
     * exactly-once state. */
    const char *checkpoint;
    uint32_t checkpoint_every;
} bus_store_sub_config;

BUS_API void bus_store_sub_config_init(bus_store_sub_config *cfg);

/* Starts a subscription on its own thread: it delivers the history, signals
 * CAUGHT_UP, then delivers new events as they are committed (woken by the
 * commits), with no gap and no duplicate across the switch. Memory stays
 * bounded by batch_size: a live subscriber that falls behind reads from the
 * log again. Borrows cfg (copied). The delivery's topic is "", its name
 * cfg->name, its event carries position and stream version.
 * Returns BUS_OK, BUS_EINVAL, BUS_ECLOSED, BUS_ENOMEM, BUS_EIO. */
BUS_API int bus_store_sub_open(bus_store_sub **out, bus_store *s,
                               const bus_store_sub_config *cfg);

/* Asks the subscription to stop; does not block. Thread: any, also its own
 * handler. NULL is a no-op. */
BUS_API void bus_store_sub_close_async(bus_store_sub *sub);

/* Stops, joins its thread (after it, no callback runs), stores the
 * checkpoint if configured, and frees sub. NULL is a no-op.
 * Thread: not from its own handler. Blocks: until the handler returns. */
BUS_API void bus_store_sub_close(bus_store_sub *sub);

typedef struct bus_store_sub_stats {
    uint64_t position;  /* last delivered position (stream: also) */
    uint64_t version;   /* stream subscriptions: last delivered version */
    uint64_t delivered; /* handler calls that returned ACK */
    uint64_t retries;
    uint64_t dead_letters;
    bool live; /* caught up and live */
    bool stopped;
} bus_store_sub_stats;

BUS_API void bus_store_sub_stats_get(const bus_store_sub *sub,
                                     bus_store_sub_stats *st);

/* ---- Projectors ---------------------------------------------------------- */

typedef struct bus_projector_config {
    size_t size;      /* sizeof; 0 = this size */
    const char *name; /* required, 1..200 bytes: its checkpoint is
                       * "$projector/<name>" */
    /* Application-family key prefix of its state (the transaction's keys
     * are relative to it); default "<name>/". Reset deletes it all. */
    const char *state_prefix;
    bus_store_filter filter;
    bus_handler_fn handler; /* required; bus_projector_txn(d) inside */
    void *opaque;
    bus_store_signal_fn on_signal;
    void *signal_opaque;
    bus_store_retry retry;
    uint32_t batch_size; /* events per commit; default 128 */
    bool start_paused;
} bus_projector_config;

BUS_API void bus_projector_config_init(bus_projector_config *cfg);

/* Starts a projector: a named subscription to $all whose handler updates
 * read-model state through bus_projector_txn(d). Its state changes, its
 * dead-letter records and its checkpoint are committed in one RocksDB
 * write per batch, so after a crash it resumes right after the last
 * commit: no event skipped, none applied twice. A handler's RETRY rolls
 * back that event's writes and retries it; dead-lettering rolls them back
 * and records the failure (or stops: retry.on_fail).
 * Returns BUS_OK, BUS_EINVAL, BUS_EEXIST (a projector of that name is
 * open on s), BUS_ECLOSED, BUS_ENOMEM, BUS_EIO. */
BUS_API int bus_projector_open(bus_projector **out, bus_store *s,
                               const bus_projector_config *cfg);

/* The projector's transaction for the event being delivered: put, delete
 * and get in the application family with keys relative to the state
 * prefix (the outbox family is unprefixed). Valid during the handler call;
 * do not commit or abort it. NULL when d is not a projector's delivery. */
BUS_API bus_store_txn *bus_projector_txn(bus_delivery *d);

/* Stop/join/free as bus_store_sub_close_async/_close. Pending state of the
 * current batch is committed first when its handler calls are complete. */
BUS_API void bus_projector_close_async(bus_projector *p);
BUS_API void bus_projector_close(bus_projector *p);

/* Pause: blocks until the projector is idle with its batch committed.
 * Resume: starts it again. Thread: not from its handler (BUS_EBUSY).
 * Returns BUS_OK, BUS_EBUSY, BUS_ECLOSED. */
BUS_API int bus_projector_pause(bus_projector *p);
BUS_API int bus_projector_resume(bus_projector *p);

/* Rebuild: pauses, deletes its state (the state prefix), checkpoint and
 * dead-letter records in one write, and replays from the start (paused if
 * it was paused). Blocks. Thread: not from its handler (BUS_EBUSY).
 * Returns BUS_OK, BUS_EBUSY, BUS_ECLOSED, BUS_EIO. */
BUS_API int bus_projector_reset(bus_projector *p);

/* Waits until the committed checkpoint reaches position (e.g.
 * bus_store_head()) or timeout_ms passes (-1: no limit).
 * Returns BUS_OK, BUS_ETIMEDOUT, BUS_ECANCELED (the projector stopped). */
BUS_API int bus_projector_wait(bus_projector *p, uint64_t position,
                               int32_t timeout_ms);

typedef struct bus_projector_stats {
    uint64_t checkpoint; /* last committed position */
    uint64_t head;       /* the store's head */
    uint64_t lag;        /* head - checkpoint */
    uint64_t applied;    /* events acknowledged since open */
    uint64_t retries;
    uint64_t dead_letters;
    uint64_t commits;
    bool paused;
    bool stopped;
    int err; /* why it stopped, BUS_OK otherwise */
} bus_projector_stats;

BUS_API void bus_projector_stats_get(bus_projector *p, bus_projector_stats *st);

/* Calls fn for each dead-letter record of the projector name, oldest first:
 * position, the handler's error code and message, attempts made. Stops
 * early when fn returns false. Returns BUS_OK, BUS_EINVAL, BUS_EIO. */
typedef bool (*bus_store_dead_letter_fn)(void *opaque, uint64_t position,
                                         int err, uint32_t attempts,
                                         const char *msg);
BUS_API int bus_store_dead_letters(bus_store *s, const char *projector,
                                   bus_store_dead_letter_fn fn, void *opaque);

/* ---- Operations ---------------------------------------------------------- */

typedef struct bus_store_stats {
    uint64_t head;       /* last committed position */
    uint64_t appends;    /* appends written (parts of requests) */
    uint64_t events;     /* events written */
    uint64_t duplicates; /* idempotent appends answered from the index */
    uint64_t conflicts;  /* appends refused with BUS_ECONFLICT */
    uint64_t groups;     /* RocksDB writes made by the group writer */
    uint64_t syncs;      /* of them fsynced */
    uint64_t sst_bytes;  /* RocksDB table files, all families */
} bus_store_stats;

BUS_API void bus_store_stats_get(bus_store *s, bus_store_stats *st);

/* Flushes memtables to table files (for tools and tests). Blocks.
 * Returns BUS_OK, BUS_EIO, BUS_ECLOSED. */
BUS_API int bus_store_flush(bus_store *s);

/* What bus_store_verify checked and found. */
typedef struct bus_store_verify_report {
    uint64_t events;   /* log records */
    uint64_t streams;  /* streams in the index */
    uint64_t problems; /* inconsistencies (0: consistent) */
} bus_store_verify_report;

/* Checks the store's invariants from one snapshot: every log record
 * decodes and has its stream-index and event-id entries; every index entry
 * points to a record of that stream and version; each stream's indexed
 * versions are contiguous and end at its recorded last version (scavenge
 * removes only prefixes); every id entry points to its event. The first
 * problems are
 * logged and the first one is written to errbuf. Blocks: reads the whole
 * store. Returns BUS_OK (report->problems says if consistent), BUS_EIO,
 * BUS_ENOMEM, BUS_ECLOSED. */
BUS_API int bus_store_verify(bus_store *s, bus_store_verify_report *r,
                             char *errbuf, size_t errbuf_len);

#ifdef __cplusplus
}
#endif
#endif /* BUS_STORE_H */
