/*
 * bus_event: the immutable, reference-counted event envelope.
 *
 * Fields: id (16-byte UUIDv7), type name, schema version, stream id and
 * stream version, global position (set by the store), timestamp (ns since
 * the Unix epoch), headers (a small string map) and payload bytes.
 *
 * Life cycle: an event is built (bus_event_create / _new / _wrap), may be
 * changed with the setters while its creator is the only one holding it,
 * and is frozen when published (or by bus_event_freeze). After that the
 * setters return BUS_EFROZEN and every holder shares the same bytes without
 * copying. Each holder owns one reference: bus_event_ref / bus_event_unref.
 *
 * Memory: building an event costs one allocation in the common case: the
 * envelope, its strings, a headers table and (unless adopted) the payload
 * live in one block with some spare room, so a few setters after creation
 * allocate nothing. Getters never allocate.
 *
 * Threads: getters, ref and unref from any thread at any time. Setters and
 * freeze only from the thread that holds the sole reference, before the
 * event is shared.
 *
 * Strings (type, stream, header keys and values) are UTF-8 without NUL
 * bytes; setters check it and return BUS_EINVAL otherwise.
 */
#ifndef BUS_EVENT_H
#define BUS_EVENT_H

#include <bus/common.h>
#include <bus/err.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_event bus_event;

/* ---- UUIDv7 ---------------------------------------------------------- */

/* 16 bytes, big-endian as in RFC 9562: 48-bit Unix milliseconds, version 7,
 * 12-bit sub-millisecond counter, variant, 62 random bits. Comparing the
 * bytes with memcmp orders ids by creation time. */
typedef struct bus_uuid {
    uint8_t b[16];
} bus_uuid;

#define BUS_UUID_STR_LEN 36 /* "0190c1a2-...": without the NUL */

/* Fills u with a new UUIDv7. Monotonic: within one process every id is
 * greater (memcmp) than every id generated before it, on any thread, even
 * within one millisecond or if the wall clock steps back. Lock-free.
 * Thread: any. */
BUS_API void bus_uuid_v7(bus_uuid *u);

/* Writes the canonical 36-character lowercase form and a NUL into out,
 * which must hold BUS_UUID_STR_LEN + 1 bytes. Returns out. */
BUS_API char *bus_uuid_format(const bus_uuid *u, char *out);

/* Parses the canonical form (either case). Returns BUS_OK or BUS_EINVAL. */
BUS_API int bus_uuid_parse(bus_uuid *u, const char *s);

/* Milliseconds since the epoch stored in a UUIDv7. */
BUS_API uint64_t bus_uuid_v7_ms(const bus_uuid *u);

BUS_API bool bus_uuid_is_nil(const bus_uuid *u);

/* ---- Well-known header keys ------------------------------------------- */

#define BUS_H_CORRELATION_ID "correlation-id"
#define BUS_H_CAUSATION_ID "causation-id"
#define BUS_H_TRACEPARENT "traceparent"
#define BUS_H_CONTENT_TYPE "content-type"

typedef struct bus_header {
    const char *key;
    const char *value;
} bus_header;

/* ---- Building ----------------------------------------------------------- */

/* Everything an event can be built from at once: one allocation.
 * Zero-initialise and set what you need. */
typedef struct bus_event_init {
    const char *type;          /* required: "orders.placed" */
    uint32_t schema_version;   /* 0 means 1 */
    const char *stream;        /* aggregate id, NULL for none */
    uint64_t stream_version;   /* version within stream, 0 = unset */
    const void *payload;       /* may be NULL when payload_len is 0 */
    size_t payload_len;
    /* When set, the event adopts payload instead of copying it (zero copy):
     * payload_free(payload, payload_hint) runs exactly once, on any thread,
     * when the last reference goes, and also when create fails. */
    bus_free_fn payload_free;
    void *payload_hint;
    const bus_header *headers; /* n_headers entries, keys unique */
    size_t n_headers;
    const bus_uuid *id;        /* NULL: a new UUIDv7 */
    int64_t timestamp_ns;      /* 0: now (CLOCK_REALTIME) */
} bus_event_init;

/* Builds a new event from init; *out gets its single reference.
 * On failure *out is NULL (and an adopted payload has been freed).
 * Returns BUS_OK, BUS_EINVAL (type missing, bad UTF-8, duplicate header
 * key), BUS_ETOOBIG (a string over 65535 bytes, more than 65535 headers,
 * payload over 4 GiB - 1), BUS_ENOMEM. Thread: any. */
BUS_API int bus_event_create(bus_event **out, const bus_event_init *init);

/* Shorthand: type and a copied payload, new id, timestamp now. */
BUS_API int bus_event_new(bus_event **out, const char *type,
                          const void *payload, size_t len);

/* Shorthand that adopts data (zero copy); type is set later with
 * bus_event_set_type (an event without a type cannot be published or
 * encoded). free_fn(data, hint) runs exactly once, on any thread, also when
 * this call fails. free_fn may be NULL for static data. */
BUS_API int bus_event_wrap(bus_event **out, void *data, size_t len,
                           bus_free_fn free_fn, void *hint);

/* A new, unfrozen copy of e with the same id and fields (payload copied),
 * so that it can be changed (e.g. dead-letter headers). Borrows e. */
BUS_API int bus_event_clone(bus_event **out, const bus_event *e);

/* ---- References --------------------------------------------------------- */

/* Adds a reference and returns e. Thread: any. */
BUS_API bus_event *bus_event_ref(bus_event *e);

/* Drops a reference; the last one frees the event. NULL is a no-op.
 * Thread: any. */
BUS_API void bus_event_unref(bus_event *e);

/* Current count: for tests and diagnostics only (racy by nature). */
BUS_API uint32_t bus_event_refcount(const bus_event *e);

/* ---- Freezing ------------------------------------------------------------ */

/* Makes e immutable: later setters return BUS_EFROZEN. Publishing freezes.
 * Idempotent. */
BUS_API void bus_event_freeze(bus_event *e);
BUS_API bool bus_event_frozen(const bus_event *e);

/* ---- Getters: never allocate, never fail --------------------------------- */

BUS_API const bus_uuid *bus_event_id(const bus_event *e);
BUS_API const char *bus_event_type(const bus_event *e);     /* "" if unset */
BUS_API uint32_t bus_event_schema_version(const bus_event *e);
BUS_API const char *bus_event_stream(const bus_event *e);   /* NULL if none */
BUS_API uint64_t bus_event_stream_version(const bus_event *e);
BUS_API uint64_t bus_event_position(const bus_event *e);    /* 0 if none */
BUS_API int64_t bus_event_timestamp(const bus_event *e);    /* ns */
BUS_API const void *bus_event_payload(const bus_event *e);
BUS_API size_t bus_event_payload_len(const bus_event *e);

/* Value of header key, or NULL. Linear scan: headers are few. */
BUS_API const char *bus_event_header(const bus_event *e, const char *key);
BUS_API size_t bus_event_header_count(const bus_event *e);
/* i-th header in insertion order; returns false when i is out of range. */
BUS_API bool bus_event_header_at(const bus_event *e, size_t i,
                                 const char **key, const char **value);

/* Shorthands for the well-known headers (NULL when absent). */
BUS_API const char *bus_event_correlation_id(const bus_event *e);
BUS_API const char *bus_event_causation_id(const bus_event *e);

/* ---- Setters: BUS_EFROZEN once frozen ------------------------------------ */
/* Strings are copied. Each returns BUS_OK, BUS_EFROZEN, BUS_EINVAL (bad
 * UTF-8, NUL, empty type), BUS_ETOOBIG or BUS_ENOMEM. */

BUS_API int bus_event_set_type(bus_event *e, const char *type);
BUS_API int bus_event_set_schema_version(bus_event *e, uint32_t version);
/* stream NULL removes the stream id and version. */
BUS_API int bus_event_set_stream(bus_event *e, const char *stream,
                                 uint64_t version);
BUS_API int bus_event_set_position(bus_event *e, uint64_t position);
BUS_API int bus_event_set_id(bus_event *e, const bus_uuid *id);
BUS_API int bus_event_set_timestamp(bus_event *e, int64_t ns);
/* Adds key or replaces its value; value NULL removes the key. */
BUS_API int bus_event_set_header(bus_event *e, const char *key,
                                 const char *value);

#ifdef __cplusplus
}
#endif
#endif /* BUS_EVENT_H */
