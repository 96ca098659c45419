/*
 * Typed events: describe a C struct by a table of fields and let one generic
 * codec turn it into an event payload (a MessagePack map keyed by field
 * name) and back. Users never write MessagePack by hand.
 *
 *     typedef struct order_placed {
 *         char *order_id;          // string: NUL-terminated, NULL = absent
 *         int64_t amount_cents;
 *         bus_array lines;         // of struct order_line
 *     } order_placed;
 *
 *     static const bus_field order_placed_fields[] = {
 *         BUS_FIELD(order_placed, order_id, BUS_KIND_STRING, BUS_REQUIRED),
 *         BUS_FIELD(order_placed, amount_cents, BUS_KIND_I64, BUS_REQUIRED),
 *         BUS_FIELD_ARRAY_OF_STRUCT(order_placed, lines, &order_line_type, 0),
 *     };
 *     static const bus_type order_placed_type =
 *         BUS_TYPE("orders.placed", 2, order_placed, order_placed_fields);
 *
 * Versions evolve by upcasters: a function from version N to N+1. A
 * registry chains them, so an event stored as v1 decodes into today's v3
 * struct. Decoded objects are allocated by libbus in one block (plus one per
 * upcast step) and released with bus_type_free().
 *
 * Encoding rules (docs/wire-format.md, "Typed payloads"): fields are written
 * in table order under their names; a NULL string, empty optional bytes and
 * absent nested structs are omitted; unknown keys are skipped when decoding.
 */
#ifndef BUS_TYPE_H
#define BUS_TYPE_H

#include <bus/event.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum bus_kind {
    BUS_KIND_BOOL = 1, /* bool */
    BUS_KIND_I8,       /* int8_t ... */
    BUS_KIND_I16,
    BUS_KIND_I32,
    BUS_KIND_I64,
    BUS_KIND_U8,       /* uint8_t ... */
    BUS_KIND_U16,
    BUS_KIND_U32,
    BUS_KIND_U64,
    BUS_KIND_F32,      /* float */
    BUS_KIND_F64,      /* double */
    BUS_KIND_STRING,   /* char *: UTF-8, NUL-terminated; NULL = absent */
    BUS_KIND_BYTES,    /* bus_bytes */
    BUS_KIND_STRUCT,   /* an embedded struct described by field->type */
    BUS_KIND_ARRAY     /* bus_array of field->elem kind */
} bus_kind;

/* Binary data inside a typed struct. */
typedef struct bus_bytes {
    const uint8_t *data;
    size_t len;
} bus_bytes;

/* A counted array inside a typed struct: items points to count elements of
 * the field's element kind (int64_t, char *, bus_bytes, a struct, ...). */
typedef struct bus_array {
    void *items;
    size_t count;
} bus_array;

/* Field flags. */
#define BUS_REQUIRED 0x1u /* decoding fails if the key is missing */

typedef struct bus_type bus_type;

typedef struct bus_field {
    const char *name;     /* map key */
    bus_kind kind;
    size_t offset;        /* offsetof(struct, member) */
    uint32_t flags;       /* BUS_REQUIRED */
    bus_kind elem;        /* BUS_KIND_ARRAY: element kind (not ARRAY) */
    const bus_type *type; /* STRUCT, or ARRAY of STRUCT: the nested type */
} bus_field;

struct bus_type {
    const char *name;        /* event type name: "orders.placed" */
    uint32_t version;        /* schema version, >= 1 */
    size_t size;             /* sizeof the struct */
    const bus_field *fields;
    size_t n_fields;
};

#define BUS_FIELD(st, member, kind, flags)                                 \
    { #member, (kind), offsetof(st, member), (flags), (bus_kind)0, NULL }
#define BUS_FIELD_STRUCT(st, member, nested_type, flags)                   \
    { #member, BUS_KIND_STRUCT, offsetof(st, member), (flags),             \
      (bus_kind)0, (nested_type) }
#define BUS_FIELD_ARRAY(st, member, elem_kind, flags)                      \
    { #member, BUS_KIND_ARRAY, offsetof(st, member), (flags), (elem_kind), \
      NULL }
#define BUS_FIELD_ARRAY_OF_STRUCT(st, member, nested_type, flags)          \
    { #member, BUS_KIND_ARRAY, offsetof(st, member), (flags),              \
      BUS_KIND_STRUCT, (nested_type) }
#define BUS_TYPE(tname, tversion, st, field_array)                         \
    { (tname), (tversion), sizeof(st), (field_array),                      \
      sizeof(field_array) / sizeof((field_array)[0]) }

/* Checks a type description: names unique and non-empty, kinds valid,
 * offsets inside size, nested types valid (recursively, depth <= 16).
 * errbuf gets the reason. Returns BUS_OK or BUS_EINVAL. */
BUS_API int bus_type_validate(const bus_type *t, char *errbuf,
                              size_t errbuf_len);

/* ---- The generic codec --------------------------------------------------- */

/* Encodes obj (a struct described by t) into a new buffer from the libbus
 * allocator; free it with bus_codec_buf_free(buf, len). Returns BUS_OK,
 * BUS_EINVAL (a required string is NULL, invalid UTF-8; errbuf names the
 * field), BUS_ENOMEM. Borrows t and obj. Thread: any. */
BUS_API int bus_type_encode(const bus_type *t, const void *obj, void **buf,
                            size_t *len, char *errbuf, size_t errbuf_len);

/* Decodes a payload into a new object of type t, allocated in one block;
 * release it with bus_type_free(). Strings, bytes and arrays point inside
 * that block. Every declared length is checked against the bytes left
 * before anything is allocated, so the block is bounded by the payload size
 * times the largest element. Returns BUS_OK, BUS_EPROTO (malformed, missing
 * required field, wrong kind, integer out of range: errbuf names the field
 * path, e.g. "lines[2].sku"), BUS_ENOMEM. Borrows buf. Thread: any. */
BUS_API int bus_type_decode(const bus_type *t, const void *buf, size_t len,
                            void **obj, char *errbuf, size_t errbuf_len);

/* Releases an object from bus_type_decode or bus_type_registry_decode (and
 * the older versions it was upcast from). NULL is a no-op. */
BUS_API void bus_type_free(void *obj);

/* Builds an event of type t->name, schema version t->version, whose payload
 * is obj encoded (content-type "application/msgpack"). init (may be NULL)
 * supplies the other fields (stream, headers, ...); its type, payload and
 * schema_version are ignored. */
BUS_API int bus_event_new_typed(bus_event **out, const bus_type *t,
                                const void *obj, const bus_event_init *init,
                                char *errbuf, size_t errbuf_len);

/* ---- Registry and upcasting ------------------------------------------------ */

typedef struct bus_type_registry bus_type_registry;

/* Converts an object of version N (from, borrowed until bus_type_free of
 * the result: strings may be aliased, not copied) into version N+1 (to: a
 * zeroed struct of the newer type's size). Returns BUS_OK or an error code,
 * which decoding returns. */
typedef int (*bus_upcast_fn)(const void *from, void *to, void *opaque);

BUS_API int bus_type_registry_new(bus_type_registry **out);
BUS_API void bus_type_registry_free(bus_type_registry *r);

/* Registers t (borrowed: it must outlive the registry, as static tables
 * do). Registering the same pointer twice is a no-op; a different type
 * under an existing (name, version) is BUS_EEXIST. BUS_EINVAL if t does
 * not validate. Thread: not concurrently with other registry calls;
 * lookups and decodes may then run from any thread. */
BUS_API int bus_type_register(bus_type_registry *r, const bus_type *t);

/* Registers the step name vN -> vN+1. Both versions must be registered
 * before decoding needs the step. BUS_EEXIST if the step is present. */
BUS_API int bus_type_register_upcaster(bus_type_registry *r,
                                       const char *name,
                                       uint32_t from_version,
                                       bus_upcast_fn fn, void *opaque);

/* The type registered for (name, version), or NULL. version 0 means the
 * latest registered version. */
BUS_API const bus_type *bus_type_lookup(const bus_type_registry *r,
                                        const char *name, uint32_t version);

/* Decodes payload (written as name vversion) into the latest registered
 * version of name, running the upcasters in order. *out_type (may be NULL)
 * gets the type of the result. Returns BUS_ENOTFOUND (no such type or a
 * missing step; errbuf says which), decode errors, or the upcaster's. */
BUS_API int bus_type_registry_decode(const bus_type_registry *r,
                                     const char *name, uint32_t version,
                                     const void *buf, size_t len, void **out,
                                     const bus_type **out_type, char *errbuf,
                                     size_t errbuf_len);

/* Decodes the payload of e using its type name and schema version. */
BUS_API int bus_event_decode_typed(const bus_type_registry *r,
                                   const bus_event *e, void **out,
                                   const bus_type **out_type, char *errbuf,
                                   size_t errbuf_len);

#ifdef __cplusplus
}
#endif
#endif /* BUS_TYPE_H */
