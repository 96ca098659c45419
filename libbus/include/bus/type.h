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
 * Encoding rules (docs/typed-events.md is the guide): fields are written in
 * table order under their names; a NULL string and empty optional bytes
 * are omitted (they read back the same); every other field is written,
 * optional or not. A NULL string inside an array is written as nil.
 * Decoding skips unknown keys, treats nil as absent for optional fields and
 * leaves absent optional fields zero.
 *
 * Tables are trusted: bus_type_register validates them once;
 * bus_type_encode and bus_type_decode do not repeat bus_type_validate on
 * every call, so validate a table you build at run time.
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

/* Limits, checked by bus_type_validate. Depth counts structs inside
 * structs (directly or as array elements), so a type that contains itself
 * through an array is refused; the same bound applies to unknown values
 * skipped while decoding. */
#define BUS_TYPE_MAX_DEPTH 16
#define BUS_TYPE_MAX_FIELDS 256 /* per struct */

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

/* Checks a type description: a non-empty UTF-8 name and version >= 1;
 * per struct at most BUS_TYPE_MAX_FIELDS fields with unique, non-empty
 * UTF-8 names, valid kinds and flags, array elements not ARRAY, STRUCT and
 * arrays of STRUCT with a type, each member (offset, size, alignment)
 * inside the struct; nested types valid the same way (their name and
 * version are not used), depth <= BUS_TYPE_MAX_DEPTH. errbuf (may be NULL)
 * gets the reason, naming the field path. Borrows t. Thread: any.
 * Returns BUS_OK or BUS_EINVAL. */
BUS_API int bus_type_validate(const bus_type *t, char *errbuf,
                              size_t errbuf_len);

/* ---- The generic codec --------------------------------------------------- */

/* Encodes obj (a struct described by t) into a new buffer from the libbus
 * allocator, whose allocation size is exactly *len: free it with
 * bus_codec_buf_free(buf, len). One allocation. On failure *buf is NULL.
 * Returns BUS_OK, BUS_EINVAL (NULL argument, a required string is NULL,
 * invalid UTF-8, NULL bytes data or array items with a non-zero length, a
 * length over 2^32 - 1; errbuf names the field path), BUS_ENOMEM. Borrows
 * t and obj; obj must not change during the call. Thread: any. */
BUS_API int bus_type_encode(const bus_type *t, const void *obj, void **buf,
                            size_t *len, char *errbuf, size_t errbuf_len);

/* Decodes a payload into a new object of type t, allocated in one block;
 * release it with bus_type_free(). Strings, bytes and arrays point inside
 * that block (empty bytes and arrays are {NULL, 0}). Every declared length
 * is checked against the bytes left before anything is allocated, so the
 * block is bounded by the payload size times the largest element. A known
 * key present twice is an error; unknown keys are skipped unchecked.
 * Returns BUS_OK, BUS_EPROTO (malformed, trailing bytes, duplicate key,
 * missing required field, wrong kind, integer or f32 out of range, bad
 * UTF-8: errbuf names the field path, e.g. "lines[2].sku"), BUS_EINVAL
 * (NULL argument or an invalid table), BUS_ENOMEM. On failure *obj is NULL.
 * Borrows t and buf. Thread: any. */
BUS_API int bus_type_decode(const bus_type *t, const void *buf, size_t len,
                            void **obj, char *errbuf, size_t errbuf_len);

/* Releases an object from bus_type_decode or bus_type_registry_decode (and
 * the older versions it was upcast from, and what bus_type_alloc attached
 * to any of them). NULL is a no-op. Only for objects libbus allocated.
 * Thread: any, once no other thread uses obj. */
BUS_API void bus_type_free(void *obj);

/* Allocates n bytes (aligned as malloc's, not zeroed) owned by obj, an
 * object from the decoders or the `to` of an upcaster: bus_type_free(obj)
 * frees them. For upcasters that need new strings or arrays. Returns NULL
 * when out of memory (an upcaster then returns BUS_ENOMEM).
 * Thread: the one handling obj. */
BUS_API void *bus_type_alloc(void *obj, size_t n);

/* Copies s[0..len) and a NUL into memory owned by obj (bus_type_alloc).
 * Returns NULL when out of memory. */
BUS_API char *bus_type_strdup(void *obj, const char *s, size_t len);

/* Builds an event of type t->name, schema version t->version, whose payload
 * is obj encoded (adopted by the event, not copied) with a content-type
 * header "application/msgpack" unless init has one. init (may be NULL)
 * supplies the other fields (stream, headers, id, ...); its type,
 * schema_version and payload fields are ignored. Two allocations (the
 * payload and the event) with up to 7 headers in init. On failure *out is
 * NULL. Returns BUS_OK, the
 * errors of bus_type_encode and bus_event_create. Borrows t, obj and init.
 * Thread: any. */
BUS_API int bus_event_new_typed(bus_event **out, const bus_type *t,
                                const void *obj, const bus_event_init *init,
                                char *errbuf, size_t errbuf_len);

/* ---- Registry and upcasting --------------------------------------------- */

typedef struct bus_type_registry bus_type_registry;

/* Converts an object of version N (from) into version N+1 (to: a zeroed
 * struct of the newer type's size, allocated by libbus). from stays alive
 * until bus_type_free of the final result, so to may alias its strings,
 * bytes and arrays instead of copying them; new memory comes from
 * bus_type_alloc(to, n) or bus_type_strdup(to, s, len). Returns BUS_OK or
 * an error code, which decoding returns (after freeing everything).
 * Called on the decoding thread. */
typedef int (*bus_upcast_fn)(const void *from, void *to, void *opaque);

/* A new, empty registry. Returns BUS_OK, BUS_EINVAL, BUS_ENOMEM. */
BUS_API int bus_type_registry_new(bus_type_registry **out);
/* Frees r (not the types it borrowed). NULL is a no-op. */
BUS_API void bus_type_registry_free(bus_type_registry *r);

/* Registers t (borrowed: it must outlive the registry, as static tables
 * do). Registering the same pointer twice is a no-op; a different type
 * under an existing (name, version) is BUS_EEXIST. BUS_EINVAL if t does
 * not validate. Thread: not concurrently with other registry calls;
 * lookups and decodes may then run from any thread. */
BUS_API int bus_type_register(bus_type_registry *r, const bus_type *t);

/* Registers the step name vN -> vN+1 (name is copied). Both versions must
 * be registered before decoding needs the step. Returns BUS_OK, BUS_EEXIST
 * if the step is present, BUS_EINVAL (empty name, NULL fn, from_version 0
 * or UINT32_MAX), BUS_ENOMEM. Thread: as bus_type_register. */
BUS_API int bus_type_register_upcaster(bus_type_registry *r,
                                       const char *name,
                                       uint32_t from_version,
                                       bus_upcast_fn fn, void *opaque);

/* The type registered for (name, version), or NULL. version 0 means the
 * latest registered version. Thread: any, with no registration running. */
BUS_API const bus_type *bus_type_lookup(const bus_type_registry *r,
                                        const char *name, uint32_t version);

/* Decodes payload (written as name vversion) into the latest registered
 * version of name, running the upcasters in order; free the result with
 * bus_type_free (it frees the intermediate versions too). *out_type (may
 * be NULL) gets the type of the result. The chain is checked before
 * decoding. Returns BUS_OK, BUS_EINVAL (NULL argument, version 0),
 * BUS_ENOTFOUND (no such type, a missing step or intermediate type; errbuf
 * says which), the errors of bus_type_decode, or the upcaster's. On
 * failure *out is NULL. Borrows buf. Thread: any, with no registration
 * running. */
BUS_API int bus_type_registry_decode(const bus_type_registry *r,
                                     const char *name, uint32_t version,
                                     const void *buf, size_t len, void **out,
                                     const bus_type **out_type, char *errbuf,
                                     size_t errbuf_len);

/* Decodes the payload of e using its type name and schema version, as
 * bus_type_registry_decode. Borrows e. */
BUS_API int bus_event_decode_typed(const bus_type_registry *r,
                                   const bus_event *e, void **out,
                                   const bus_type **out_type, char *errbuf,
                                   size_t errbuf_len);

#ifdef __cplusplus
}
#endif
#endif /* BUS_TYPE_H */
