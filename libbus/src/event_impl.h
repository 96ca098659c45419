/*
 * The event's layout, shared by event.c and the codecs (internal).
 *
 * One block holds the struct, the headers table, the payload (unless
 * adopted), the strings and some spare room ("arena") that setters use
 * before they fall back to extra chunks. Strings are NUL-terminated and
 * carry their length, so encoders never call strlen.
 */
#ifndef BUS_EVENT_IMPL_H
#define BUS_EVENT_IMPL_H

#include <stdatomic.h>

#include <bus/event.h>

typedef struct ev_header {
    const char *key;
    const char *value;
    uint32_t klen;
    uint32_t vlen;
} ev_header;

typedef struct ev_chunk ev_chunk;
typedef struct ev_cache ev_cache;

struct bus_event {
    _Atomic uint32_t refs;
    atomic_bool frozen;
    uint8_t flags;
    uint16_t pad_;
    uint32_t schema_version;
    uint32_t n_headers;
    uint32_t cap_headers;
    uint32_t type_len;
    uint32_t stream_len;
    bus_uuid id;
    int64_t timestamp;
    uint64_t stream_version;
    uint64_t position;
    const char *type;   /* never NULL: "" when unset */
    const char *stream; /* NULL when none */
    const char *topic;  /* set when first published; NULL before */
    uint32_t topic_len;
    ev_header *headers;
    const uint8_t *payload;
    size_t payload_len;
    bus_free_fn payload_free; /* NULL: payload is ours or static */
    void *payload_hint;
    void *payload_owner; /* what payload_free frees: the adopted buffer the
                          * payload lies in (a decoded frame); NULL means
                          * the payload pointer itself */
    char *arena; /* spare room in the block */
    size_t arena_left;
    ev_chunk *chunks; /* overflow allocations, freed with the event */
    size_t block_size;
    ev_cache *cache; /* the thread cache the block came from, or NULL:
                      * from bus__alloc (event.c, "Block caches") */
    _Alignas(16) unsigned char data[];
};

/* A string with its length (not NUL-terminated). */
typedef struct bus__str {
    const char *p;
    size_t len;
} bus__str;

/* What bus__event_build needs; strings need not be NUL-terminated. The
 * caller has validated UTF-8, uniqueness of header keys and limits. */
typedef struct bus__event_spec {
    bus__str type;
    bus__str stream; /* p NULL: none */
    uint32_t schema_version;
    uint64_t stream_version;
    uint64_t position;
    const bus_uuid *id; /* NULL: new */
    int64_t timestamp;  /* 0: now */
    const bus__str *hkeys;
    const bus__str *hvals;
    size_t n_headers;
    const void *payload;
    size_t payload_len;
    bus_free_fn payload_free; /* adopt payload when set */
    void *payload_hint;
    bool adopt_static;        /* payload outlives the event: reference it */
    size_t spare;             /* extra arena bytes for later setters */
} bus__event_spec;

/* Builds an event in one allocation. On failure an adopted payload is
 * freed (payload_free called). Returns BUS_OK or BUS_ENOMEM. */
int bus__event_build(bus_event **out, const bus__event_spec *s);

/* A UUIDv7 for the instant unix_ns (a clock reading the caller also uses
 * for the timestamp): bus_uuid_v7 without its own clock read. */
void bus__uuid_v7_at(bus_uuid *u, int64_t unix_ns);

/* Records the topic the event is published on, before it is frozen
 * (bus_publish and bus_broker_publish do this), so that queued deliveries
 * can name it after the publisher's string is gone. BUS_OK, BUS_EFROZEN,
 * BUS_ENOMEM. */
int bus__event_set_topic(bus_event *e, const char *topic, size_t len);

/* True when e was published on exactly this topic. */
static inline bool
bus__event_topic_is(const bus_event *e, const char *topic, size_t len)
{
    return e->topic != NULL && e->topic_len == len
        && __builtin_memcmp(e->topic, topic, len) == 0;
}

/* Drops the frozen flag check: true when setters may still run. */
static inline bool
bus__event_is_frozen(const bus_event *e)
{
    return atomic_load_explicit(&e->frozen, memory_order_relaxed);
}

#endif
