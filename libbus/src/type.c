/*
 * Typed events (type.h): the generic codec that turns a C struct described
 * by a bus_type table into a MessagePack map keyed by field name and back,
 * the blocks that hold decoded objects, and the registry of types and
 * upcasters. docs/typed-events.md is the user's guide.
 *
 * Design.
 *
 * Encode walks the object with one function (te_*) in up to two modes.
 * The first walk checks everything that can fail (a NULL required string,
 * bad UTF-8, NULL data with a length, lengths over MessagePack's 32 bits)
 * and writes into a stack buffer; a payload that fits (most do) is then
 * copied into one allocation of exactly its size. When the output outgrows
 * the stack buffer, the first walk goes on counting bytes instead, and a
 * second walk writes, unchecked and unbounded, into one allocation of the
 * exact size. Either way encoding costs one allocation, cannot fail half
 * way, and the buffer's allocation size is exactly the length returned,
 * which the sized bus_codec_buf_free(buf, len) relies on. (mp_buf would
 * grow by doubling and need a final shrink, which a sized allocator may
 * have to do by copying.)
 *
 * Decode walks the payload twice with the same code (td_*). The first walk
 * checks everything (types, integer ranges, UTF-8, duplicate and missing
 * fields, trailing bytes) and adds up the size of one block holding the
 * struct and everything it points to; the second fills the block. Both
 * walks carve the block with the same arithmetic in the same order, so the
 * second lands exactly where the first measured (asserted). The mp.h reader
 * checks every declared count against the bytes left before we multiply it
 * by an element size: the block stays within the payload size times the
 * largest element, whatever a hostile payload declares. The first walk
 * records which field each of the first keys named, so the second replays
 * that instead of comparing names again; small values (fixstr, fixint,
 * bin8, nil) are read inline, the rest through mp.h.
 *
 * Blocks: every object handed out starts TYPE_HDR bytes into a block whose
 * hidden header records the block's size (for the sized bus__free) and the
 * next block to free with it. An upcast result links to the object it was
 * made from, and bus_type_alloc links extra blocks right behind their
 * owner, so bus_type_free walks one list and frees everything.
 *
 * Errors name the field path ("lines[2].sku"): each walk keeps a small
 * stack of frames (field name, array index), bounded by the nesting limit,
 * and formats it only when something fails.
 *
 * Registry: two arrays kept sorted, types by (name, version) and upcasters
 * by (name, from_version), searched by bisection. Registration happens at
 * start-up; it is not synchronised with lookups (type.h says so), which
 * only read.
 */
#include <assert.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <bus/type.h>

#include "alloc.h"
#include "mp.h"

#define TYPE_ALIGN _Alignof(max_align_t)

/* ---- Blocks -------------------------------------------------------------- */

typedef struct type_block type_block;
struct type_block {
    size_t size;      /* the whole allocation: bus__free needs it */
    type_block *next; /* freed together with this block, or NULL */
};

/* The object starts here, so it is aligned as malloc's result would be. */
#define TYPE_HDR                                                           \
    ((sizeof(type_block) + TYPE_ALIGN - 1) & ~(TYPE_ALIGN - 1))

static size_t
type_align(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

static type_block *
type_hdr(void *obj)
{
    return (type_block *)(void *)((unsigned char *)obj - TYPE_HDR);
}

static void *
type_obj(type_block *b)
{
    return (unsigned char *)b + TYPE_HDR;
}

/* A block with room for n bytes after the header; not zeroed. */
static type_block *
type_block_new(size_t n)
{
    type_block *b;

    if (n > SIZE_MAX - TYPE_HDR)
        return NULL;
    if ((b = bus__alloc(TYPE_HDR + n)) == NULL)
        return NULL;
    b->size = TYPE_HDR + n;
    b->next = NULL;
    return b;
}

void
bus_type_free(void *obj)
{
    type_block *b, *next;

    if (obj == NULL)
        return;
    for (b = type_hdr(obj); b != NULL; b = next) {
        next = b->next;
        bus__free(b, b->size);
    }
}

void *
bus_type_alloc(void *obj, size_t n)
{
    type_block *owner, *b;

    if (obj == NULL || (b = type_block_new(n)) == NULL)
        return NULL;
    /* Right behind the owner: the owner's older versions stay at the end
     * of the list, where they were. */
    owner = type_hdr(obj);
    b->next = owner->next;
    owner->next = b;
    return type_obj(b);
}

char *
bus_type_strdup(void *obj, const char *s, size_t len)
{
    char *d;

    if (s == NULL || len == SIZE_MAX)
        return NULL;
    if ((d = bus_type_alloc(obj, len + 1)) == NULL)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

/* ---- Kinds --------------------------------------------------------------- */

static bool
type_kind_valid(bus_kind k)
{
    return k >= BUS_KIND_BOOL && k <= BUS_KIND_ARRAY;
}

/* Size of one member of kind k (nt: the nested type of a STRUCT), 0 for
 * an invalid kind. */
static size_t
type_kind_size(bus_kind k, const bus_type *nt)
{
    switch (k) {
    case BUS_KIND_BOOL: return sizeof(bool);
    case BUS_KIND_I8: case BUS_KIND_U8: return 1;
    case BUS_KIND_I16: case BUS_KIND_U16: return 2;
    case BUS_KIND_I32: case BUS_KIND_U32: return 4;
    case BUS_KIND_I64: case BUS_KIND_U64: return 8;
    case BUS_KIND_F32: return sizeof(float);
    case BUS_KIND_F64: return sizeof(double);
    case BUS_KIND_STRING: return sizeof(char *);
    case BUS_KIND_BYTES: return sizeof(bus_bytes);
    case BUS_KIND_STRUCT: return nt != NULL ? nt->size : 0;
    case BUS_KIND_ARRAY: return sizeof(bus_array);
    default: return 0;
    }
}

/* Alignment of a member of kind k; 0 for STRUCT, whose alignment the table
 * does not record. */
static size_t
type_kind_align(bus_kind k)
{
    switch (k) {
    case BUS_KIND_BOOL: return _Alignof(bool);
    case BUS_KIND_I8: case BUS_KIND_U8: return _Alignof(int8_t);
    case BUS_KIND_I16: case BUS_KIND_U16: return _Alignof(int16_t);
    case BUS_KIND_I32: case BUS_KIND_U32: return _Alignof(int32_t);
    case BUS_KIND_I64: case BUS_KIND_U64: return _Alignof(int64_t);
    case BUS_KIND_F32: return _Alignof(float);
    case BUS_KIND_F64: return _Alignof(double);
    case BUS_KIND_STRING: return _Alignof(char *);
    case BUS_KIND_BYTES: return _Alignof(bus_bytes);
    case BUS_KIND_ARRAY: return _Alignof(bus_array);
    default: return 0;
    }
}

/* The C name, for range errors and validation messages. */
static const char *
type_kind_name(bus_kind k)
{
    static const char *const names[] = {
        "?", "bool", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64",
        "f32", "f64", "string", "bytes", "struct", "array",
    };
    return type_kind_valid(k) ? names[k] : "?";
}

/* The MessagePack type a kind is written as, for "expected ..." errors. */
static const char *
type_kind_wire(bus_kind k)
{
    switch (k) {
    case BUS_KIND_BOOL: return "bool";
    case BUS_KIND_F32: case BUS_KIND_F64: return "float";
    case BUS_KIND_STRING: return "str";
    case BUS_KIND_BYTES: return "bin";
    case BUS_KIND_STRUCT: return "map";
    case BUS_KIND_ARRAY: return "array";
    default: return "integer";
    }
}

/* True when a value of MessagePack type m is acceptable for kind k, so a
 * failed read means malformed or truncated rather than a wrong type. */
static bool
type_kind_accepts(bus_kind k, mp_type m)
{
    bool integer = m == MP_UINT || m == MP_NINT;

    switch (k) {
    case BUS_KIND_BOOL: return m == MP_BOOL;
    case BUS_KIND_F32: case BUS_KIND_F64: return m == MP_FLOAT || integer;
    case BUS_KIND_STRING: return m == MP_STR;
    case BUS_KIND_BYTES: return m == MP_BIN || m == MP_STR;
    case BUS_KIND_STRUCT: return m == MP_MAP;
    case BUS_KIND_ARRAY: return m == MP_ARRAY;
    default: return integer;
    }
}

/* name (NUL-terminated) equals key[0..klen), which may hold NUL bytes.
 * Inline byte loop: names are short, and a libc call costs more here. */
static bool
type_name_eq(const char *name, const char *key, size_t klen)
{
    size_t i;

    for (i = 0; i < klen; i++)
        if (name[i] != key[i] || name[i] == '\0')
            return false;
    return name[klen] == '\0';
}

/* bus__utf8_valid, with a fast path for ASCII, which most field values
 * are: eight bytes at a time, none zero and none with the high bit. The
 * first word that is not plain ASCII goes to the full check, which may
 * start there because every byte before it was a whole character. */
static bool
type_utf8_valid(const char *s, size_t len)
{
    const uint64_t ones = UINT64_C(0x0101010101010101);
    const uint64_t high = UINT64_C(0x8080808080808080);
    size_t i = 0;
    uint64_t w;

    for (; len - i >= 8; i += 8) {
        memcpy(&w, s + i, 8);
        /* (w - ones) & ~w & high: non-zero when some byte is 0. */
        if ((w & high) != 0 || ((w - ones) & ~w & high) != 0)
            break;
    }
    return bus__utf8_valid(s + i, len - i);
}

/* ---- Diagnostics: field paths in errbuf ---------------------------------- */

typedef struct type_frame {
    const char *name;
    size_t index;
    bool indexed; /* inside an array: print "[index]" */
} type_frame;

typedef struct type_diag {
    /* f[d] is the field being handled in a struct nested d levels deep;
     * depth frames are in use. */
    type_frame f[BUS_TYPE_MAX_DEPTH + 1];
    size_t depth;
    const char *root;  /* names the whole thing: "payload", "object" */
    bool root_always;  /* prefix field errors with root too */
    char *errbuf;
    size_t errbuf_len;
} type_diag;

static void type_errf(char *errbuf, size_t errbuf_len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
type_errf(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errbuf_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errbuf_len, fmt, ap);
    va_end(ap);
}

static void
type_diag_init(type_diag *d, const char *root, char *errbuf,
               size_t errbuf_len)
{
    d->depth = 0;
    d->root = root;
    d->root_always = false;
    d->errbuf = errbuf;
    d->errbuf_len = errbuf_len;
    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
}

/* "lines[2].sku" from the first depth frames. */
static void
type_path_fmt(const type_diag *d, size_t depth, char *out, size_t cap)
{
    size_t i, n = 0;
    int w;

    out[0] = '\0';
    for (i = 0; i < depth && n < cap; i++) {
        const type_frame *f = &d->f[i];
        if (f->indexed)
            w = snprintf(out + n, cap - n, "%s%s[%zu]", i ? "." : "",
                         f->name, f->index);
        else
            w = snprintf(out + n, cap - n, "%s%s", i ? "." : "", f->name);
        if (w < 0)
            break;
        n += (size_t)w;
    }
}

static int type_fail(type_diag *d, int rv, const char *fmt, ...)
    BUS_PRINTF(3, 4);

/* Writes "field "<path>": <message>" (or "<root>: <message>" at the top)
 * and returns rv. */
static int
type_fail(type_diag *d, int rv, const char *fmt, ...)
{
    char path[192], msg[192];
    va_list ap;

    if (d->errbuf == NULL || d->errbuf_len == 0)
        return rv;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (d->depth == 0) {
        type_errf(d->errbuf, d->errbuf_len, "%s: %s", d->root, msg);
        return rv;
    }
    type_path_fmt(d, d->depth, path, sizeof(path));
    if (d->root_always)
        type_errf(d->errbuf, d->errbuf_len, "%s: field \"%s\": %s", d->root,
                  path, msg);
    else
        type_errf(d->errbuf, d->errbuf_len, "field \"%s\": %s", path, msg);
    return rv;
}

/* ---- Validation ---------------------------------------------------------- */

static int
tv_type(type_diag *d, const bus_type *t, size_t depth)
{
    size_t i, j, msz, al;
    int rv;

    d->depth = depth;
    if (t->size == 0)
        return type_fail(d, BUS_EINVAL, "struct size is 0");
    if (t->n_fields > BUS_TYPE_MAX_FIELDS)
        return type_fail(d, BUS_EINVAL, "%zu fields (at most %d)",
                         t->n_fields, BUS_TYPE_MAX_FIELDS);
    if (t->n_fields > 0 && t->fields == NULL)
        return type_fail(d, BUS_EINVAL, "%zu fields but fields is NULL",
                         t->n_fields);
    for (i = 0; i < t->n_fields; i++) {
        const bus_field *f = &t->fields[i];
        bool nested = f->kind == BUS_KIND_STRUCT
                   || (f->kind == BUS_KIND_ARRAY
                       && f->elem == BUS_KIND_STRUCT);

        d->depth = depth;
        if (f->name == NULL || f->name[0] == '\0')
            return type_fail(d, BUS_EINVAL, "field #%zu has no name", i);
        d->f[depth] = (type_frame){f->name, 0, false};
        d->depth = depth + 1;
        if (!bus__utf8_valid(f->name, strlen(f->name)))
            return type_fail(d, BUS_EINVAL, "name is not valid UTF-8");
        for (j = 0; j < i; j++)
            if (strcmp(t->fields[j].name, f->name) == 0)
                return type_fail(d, BUS_EINVAL, "duplicate field name");
        if ((f->flags & ~BUS_REQUIRED) != 0)
            return type_fail(d, BUS_EINVAL, "unknown flags 0x%" PRIx32,
                             f->flags & ~BUS_REQUIRED);
        if (!type_kind_valid(f->kind))
            return type_fail(d, BUS_EINVAL, "invalid kind %d", (int)f->kind);
        if (f->kind == BUS_KIND_ARRAY
            && (!type_kind_valid(f->elem) || f->elem == BUS_KIND_ARRAY))
            return type_fail(d, BUS_EINVAL,
                             "invalid array element kind %d (arrays of "
                             "arrays are not supported)", (int)f->elem);
        if (nested && f->type == NULL)
            return type_fail(d, BUS_EINVAL, "%s without a nested type",
                             f->kind == BUS_KIND_STRUCT ? "struct"
                                                        : "array of struct");
        msz = type_kind_size(f->kind, f->type);
        if (f->offset > t->size || msz > t->size - f->offset)
            return type_fail(d, BUS_EINVAL,
                             "offset %zu + size %zu outside the struct "
                             "(size %zu)", f->offset, msz, t->size);
        al = type_kind_align(f->kind);
        if (al > 1 && f->offset % al != 0)
            return type_fail(d, BUS_EINVAL, "offset %zu misaligned for %s",
                             f->offset, type_kind_name(f->kind));
        if (nested) {
            if (depth + 1 > BUS_TYPE_MAX_DEPTH)
                return type_fail(d, BUS_EINVAL,
                                 "structs nested deeper than %d (a "
                                 "recursive type?)", BUS_TYPE_MAX_DEPTH);
            if ((rv = tv_type(d, f->type, depth + 1)) != BUS_OK)
                return rv;
        }
    }
    d->depth = depth;
    return BUS_OK;
}

int
bus_type_validate(const bus_type *t, char *errbuf, size_t errbuf_len)
{
    char root[96];
    type_diag d;

    type_diag_init(&d, "type", errbuf, errbuf_len);
    if (t == NULL)
        return type_fail(&d, BUS_EINVAL, "NULL");
    if (t->name == NULL || t->name[0] == '\0')
        return type_fail(&d, BUS_EINVAL, "name is NULL or empty");
    if (!bus__utf8_valid(t->name, strlen(t->name)))
        return type_fail(&d, BUS_EINVAL, "name is not valid UTF-8");
    snprintf(root, sizeof(root), "type \"%s\"", t->name);
    d.root = root;
    d.root_always = true;
    if (t->version == 0)
        return type_fail(&d, BUS_EINVAL, "version 0 (versions start at 1)");
    return tv_type(&d, t, 0);
}

/* ---- Encoding ------------------------------------------------------------ */

/* First walk: check everything, write into a stack buffer while the
 * output fits, then only count. Second walk (only when it did not fit):
 * write into the exact allocation, no checks, no bounds. */
typedef struct te_ctx {
    uint8_t *start; /* of the output */
    uint8_t *p;     /* next byte; NULL once the walk only counts */
    uint8_t *end;   /* end of the room; NULL: unbounded (second walk) */
    size_t size;    /* counting: the whole size so far */
    bool check;     /* first walk: validate */
    bool overflow;  /* counting: size does not fit a size_t */
    type_diag d;
} te_ctx;

static void
te_add(te_ctx *c, size_t n)
{
    if (n > SIZE_MAX - c->size)
        c->overflow = true;
    else
        c->size += n;
}

/* Where to write at most n bytes, or NULL when the walk counts instead
 * (from now on: the output no longer fits the stack buffer). */
static uint8_t *
te_room(te_ctx *c, size_t n)
{
    if (c->p == NULL)
        return NULL;
    if (c->end == NULL || (size_t)(c->end - c->p) >= n)
        return c->p;
    c->size = (size_t)(c->p - c->start);
    c->p = NULL;
    return NULL;
}

static void
te_uint(te_ctx *c, uint64_t v)
{
    uint8_t *p = te_room(c, 9);

    if (p != NULL)
        c->p = mp_put_uint(p, v);
    else
        te_add(c, mp_size_uint(v));
}

static void
te_int(te_ctx *c, int64_t v)
{
    uint8_t *p = te_room(c, 9);

    if (p != NULL)
        c->p = mp_put_int(p, v);
    else
        te_add(c, mp_size_int(v));
}

static void
te_str(te_ctx *c, const char *s, size_t len)
{
    uint8_t *p = te_room(c, mp_size_str(len));

    if (p != NULL)
        c->p = mp_put_str(p, s, len);
    else
        te_add(c, mp_size_str(len));
}

/* Writes a field name as the map key. Names are short and NUL-terminated:
 * copying up to the NUL behind a fixstr header skips a strlen and a
 * memcpy call per field; longer names (or a nearly full stack buffer) take
 * the general way. */
static void
te_key(te_ctx *c, const char *name)
{
    uint8_t *p = c->p, *q;
    size_t n;

    if (p != NULL && (c->end == NULL || c->end - p >= 32)) {
        q = p + 1;
        for (n = 0; n < 31 && name[n] != '\0'; n++)
            *q++ = (uint8_t)name[n];
        if (name[n] == '\0') {
            *p = (uint8_t)(0xa0 | n); /* fixstr */
            c->p = q;
            return;
        }
    }
    te_str(c, name, strlen(name));
}

/* A field is written unless it is absent: a NULL optional string or empty
 * optional bytes (type.h). A required NULL string counts as present so
 * that te_value reports it. */
static bool
te_present(const bus_field *f, const unsigned char *obj)
{
    const void *src = obj + f->offset;

    if (f->flags & BUS_REQUIRED)
        return true;
    if (f->kind == BUS_KIND_STRING)
        return *(char *const *)src != NULL;
    if (f->kind == BUS_KIND_BYTES)
        return ((const bus_bytes *)src)->len > 0;
    return true;
}

static int te_struct(te_ctx *c, const bus_type *t, const unsigned char *obj,
                     size_t depth);
static int te_array(te_ctx *c, bus_kind elem, const bus_type *nt,
                    const unsigned char *src, size_t depth);

/* One value of kind k at src. in_array: a NULL string is written as nil
 * (an array slot cannot be omitted). */
static int
te_value(te_ctx *c, bus_kind k, bus_kind elem, const bus_type *nt,
         const unsigned char *src, size_t depth, bool in_array)
{
    const void *v = src;
    uint8_t *p;

    switch (k) {
    case BUS_KIND_BOOL:
        if ((p = te_room(c, 1)) != NULL)
            c->p = mp_put_bool(p, *(const bool *)v);
        else
            te_add(c, 1);
        return BUS_OK;
    case BUS_KIND_I8: te_int(c, *(const int8_t *)v); return BUS_OK;
    case BUS_KIND_I16: te_int(c, *(const int16_t *)v); return BUS_OK;
    case BUS_KIND_I32: te_int(c, *(const int32_t *)v); return BUS_OK;
    case BUS_KIND_I64: te_int(c, *(const int64_t *)v); return BUS_OK;
    case BUS_KIND_U8: te_uint(c, *(const uint8_t *)v); return BUS_OK;
    case BUS_KIND_U16: te_uint(c, *(const uint16_t *)v); return BUS_OK;
    case BUS_KIND_U32: te_uint(c, *(const uint32_t *)v); return BUS_OK;
    case BUS_KIND_U64: te_uint(c, *(const uint64_t *)v); return BUS_OK;
    case BUS_KIND_F32:
        if ((p = te_room(c, 5)) != NULL)
            c->p = mp_put_f32(p, *(const float *)v);
        else
            te_add(c, 5);
        return BUS_OK;
    case BUS_KIND_F64:
        if ((p = te_room(c, 9)) != NULL)
            c->p = mp_put_f64(p, *(const double *)v);
        else
            te_add(c, 9);
        return BUS_OK;
    case BUS_KIND_STRING: {
        const char *s = *(char *const *)v;
        size_t len;

        if (s == NULL) {
            if (!in_array)
                return type_fail(&c->d, BUS_EINVAL,
                                 "required string is NULL");
            if ((p = te_room(c, 1)) != NULL)
                c->p = mp_put_nil(p);
            else
                te_add(c, 1);
            return BUS_OK;
        }
        len = strlen(s);
        if (c->check) {
            if ((uint64_t)len > UINT32_MAX)
                return type_fail(&c->d, BUS_EINVAL,
                                 "string of %zu bytes (at most 4 GiB - 1)",
                                 len);
            if (!type_utf8_valid(s, len))
                return type_fail(&c->d, BUS_EINVAL, "invalid UTF-8");
        }
        te_str(c, s, len);
        return BUS_OK;
    }
    case BUS_KIND_BYTES: {
        const bus_bytes *b = v;

        if (c->check) {
            if (b->data == NULL && b->len > 0)
                return type_fail(&c->d, BUS_EINVAL,
                                 "data is NULL, len %zu", b->len);
            if ((uint64_t)b->len > UINT32_MAX)
                return type_fail(&c->d, BUS_EINVAL,
                                 "%zu bytes (at most 4 GiB - 1)", b->len);
        }
        if ((p = te_room(c, mp_size_bin(b->len))) != NULL)
            c->p = mp_put_bin(p, b->data, b->len);
        else
            te_add(c, mp_size_bin(b->len));
        return BUS_OK;
    }
    case BUS_KIND_STRUCT:
        if (nt == NULL)
            return type_fail(&c->d, BUS_EINVAL, "struct without a type");
        return te_struct(c, nt, src, depth + 1);
    case BUS_KIND_ARRAY:
        return te_array(c, elem, nt, src, depth);
    default:
        return type_fail(&c->d, BUS_EINVAL, "invalid kind %d", (int)k);
    }
}

static int
te_array(te_ctx *c, bus_kind elem, const bus_type *nt,
         const unsigned char *src, size_t depth)
{
    const bus_array *a = (const void *)src;
    const unsigned char *items = a->items;
    type_frame *fr = &c->d.f[depth];
    size_t i, esz = type_kind_size(elem, nt);
    uint8_t *p;
    int rv;

    if (esz == 0 || elem == BUS_KIND_ARRAY)
        return type_fail(&c->d, BUS_EINVAL, "invalid element kind %d",
                         (int)elem);
    if (c->check) {
        if (items == NULL && a->count > 0)
            return type_fail(&c->d, BUS_EINVAL,
                             "items is NULL, count %zu", a->count);
        if ((uint64_t)a->count > UINT32_MAX)
            return type_fail(&c->d, BUS_EINVAL,
                             "%zu items (at most 4294967295)", a->count);
    }
    if ((p = te_room(c, 5)) != NULL)
        c->p = mp_put_array(p, a->count);
    else
        te_add(c, mp_size_array(a->count));
    fr->indexed = true;
    for (i = 0; i < a->count; i++) {
        fr->index = i;
        rv = te_value(c, elem, (bus_kind)0, nt, items + i * esz, depth,
                      true);
        if (rv != BUS_OK)
            return rv; /* leave the index in the path for the message */
    }
    fr->indexed = false;
    return BUS_OK;
}

static int
te_struct(te_ctx *c, const bus_type *t, const unsigned char *obj,
          size_t depth)
{
    size_t i, n = 0;
    uint8_t *p;
    int rv;

    if (depth > BUS_TYPE_MAX_DEPTH)
        return type_fail(&c->d, BUS_EINVAL, "structs nested deeper than %d",
                         BUS_TYPE_MAX_DEPTH);
    for (i = 0; i < t->n_fields; i++)
        n += te_present(&t->fields[i], obj);
    if ((p = te_room(c, 5)) != NULL)
        c->p = mp_put_map(p, n);
    else
        te_add(c, mp_size_map(n));
    for (i = 0; i < t->n_fields; i++) {
        const bus_field *f = &t->fields[i];

        if (!te_present(f, obj))
            continue;
        c->d.f[depth] = (type_frame){f->name, 0, false};
        c->d.depth = depth + 1;
        te_key(c, f->name);
        rv = te_value(c, f->kind, f->elem, f->type, obj + f->offset, depth,
                      false);
        if (rv != BUS_OK)
            return rv;
    }
    c->d.depth = depth;
    return BUS_OK;
}

/* Most payloads fit here, so that encoding is one walk and a copy. */
#define TYPE_ENC_STACK 1024

int
bus_type_encode(const bus_type *t, const void *obj, void **buf, size_t *len,
                char *errbuf, size_t errbuf_len)
{
    uint8_t stack[TYPE_ENC_STACK];
    te_ctx c;
    uint8_t *out;
    size_t size;
    int rv;

    type_diag_init(&c.d, "object", errbuf, errbuf_len);
    if (buf != NULL)
        *buf = NULL;
    if (len != NULL)
        *len = 0;
    if (t == NULL || obj == NULL || buf == NULL || len == NULL)
        return type_fail(&c.d, BUS_EINVAL, "NULL argument");
    c.start = c.p = stack;
    c.end = stack + sizeof(stack);
    c.size = 0;
    c.check = true;
    c.overflow = false;
    if ((rv = te_struct(&c, t, obj, 0)) != BUS_OK)
        return rv;
    if (c.overflow)
        return type_fail(&c.d, BUS_ENOMEM, "encoded size overflows size_t");
    size = c.p != NULL ? (size_t)(c.p - stack) : c.size;
    if ((out = bus__alloc(size)) == NULL)
        return type_fail(&c.d, BUS_ENOMEM, "out of memory (%zu bytes)",
                         size);
    if (c.p != NULL) {
        memcpy(out, stack, size);
    } else {
        c.start = c.p = out;
        c.end = NULL;
        c.check = false;
        rv = te_struct(&c, t, obj, 0);
        /* The first walk checked everything and measured exactly; obj
         * must not change during the call (type.h). */
        assert(rv == BUS_OK && (size_t)(c.p - out) == size);
        if (rv != BUS_OK) {
            bus__free(out, size);
            return rv;
        }
    }
    *buf = out;
    *len = size;
    return BUS_OK;
}

/* ---- Decoding ------------------------------------------------------------ */

/* Field indices of the first keys, in the order both walks meet them:
 * the fill walk replays them instead of comparing names again. */
#define TD_KEY_CACHE 64
#define TD_KEY_UNKNOWN 0xffffu

typedef struct td_ctx {
    mp_reader r;
    unsigned char *base; /* fill walk: the block; NULL in the sizing walk */
    size_t off;          /* next free byte of the block, in both walks */
    size_t n_keys;       /* sizing walk: keys cached; fill: next to use */
    uint16_t keys[TD_KEY_CACHE];
    type_diag d;
} td_ctx;

/* Inline fast paths for the encodings most values use; anything else goes
 * to the mp.h readers, which are out of line. */

static bool
td_is_nil(const mp_reader *r)
{
    return r->p < r->end && *r->p == 0xc0;
}

/* mp_read_str's common case: a fixstr (under 32 bytes), which field names
 * and most short values are. */
static bool
td_fixstr(mp_reader *r, const char **s, size_t *len)
{
    size_t n;

    if (r->p < r->end && (*r->p & 0xe0) == 0xa0) {
        n = *r->p & 0x1fu;
        if (n < (size_t)(r->end - r->p)) {
            *s = (const char *)r->p + 1;
            *len = n;
            r->p += 1 + n;
            return true;
        }
    }
    return false;
}

/* The fill walk never fails on input (the sizing walk checked it), so
 * errors come from the sizing walk, whose reader position is meaningful. */
static int
td_bad(td_ctx *c, bus_kind k)
{
    mp_type m = mp_peek(&c->r);

    if (type_kind_accepts(k, m))
        return type_fail(&c->d, BUS_EPROTO,
                         "malformed or truncated %s at offset %zu",
                         mp_type_name(m), mp_offset(&c->r));
    return type_fail(&c->d, BUS_EPROTO, "expected %s, got %s",
                     type_kind_wire(k), mp_type_name(m));
}

/* Reserves n bytes aligned to align; *at gets their block offset. */
static int
td_carve(td_ctx *c, size_t n, size_t align, size_t *at)
{
    size_t o = c->off;

    if (o > SIZE_MAX - align)
        goto big;
    o = type_align(o, align);
    if (n > SIZE_MAX - o)
        goto big;
    *at = o;
    c->off = o + n;
    return BUS_OK;
big:
    return type_fail(&c->d, BUS_ENOMEM, "decoded object too large");
}

/* A positive or negative fixint (-32..127), in range for every kind. */
static bool
td_fixint(mp_reader *r, int64_t *v)
{
    if (r->p < r->end && (*r->p <= 0x7f || *r->p >= 0xe0)) {
        *v = (int8_t)*r->p;
        if (*r->p <= 0x7f)
            *v = *r->p;
        r->p++;
        return true;
    }
    return false;
}

static int
td_sint(td_ctx *c, bus_kind k, void *dst)
{
    int64_t v, lo, hi;
    uint64_t u;

    if (!td_fixint(&c->r, &v) && mp_read_int(&c->r, &v) != BUS_OK) {
        if (mp_read_uint(&c->r, &u) == BUS_OK) /* above INT64_MAX */
            return type_fail(&c->d, BUS_EPROTO,
                             "%" PRIu64 " out of range for %s", u,
                             type_kind_name(k));
        return td_bad(c, k);
    }
    switch (k) {
    case BUS_KIND_I8: lo = INT8_MIN; hi = INT8_MAX; break;
    case BUS_KIND_I16: lo = INT16_MIN; hi = INT16_MAX; break;
    case BUS_KIND_I32: lo = INT32_MIN; hi = INT32_MAX; break;
    default: lo = INT64_MIN; hi = INT64_MAX; break;
    }
    if (v < lo || v > hi)
        return type_fail(&c->d, BUS_EPROTO,
                         "%" PRId64 " out of range for %s", v,
                         type_kind_name(k));
    if (dst == NULL)
        return BUS_OK;
    switch (k) {
    case BUS_KIND_I8: *(int8_t *)dst = (int8_t)v; break;
    case BUS_KIND_I16: *(int16_t *)dst = (int16_t)v; break;
    case BUS_KIND_I32: *(int32_t *)dst = (int32_t)v; break;
    default: *(int64_t *)dst = v; break;
    }
    return BUS_OK;
}

static int
td_uint(td_ctx *c, bus_kind k, void *dst)
{
    uint64_t v, hi;
    int64_t neg;

    if (c->r.p < c->r.end && *c->r.p <= 0x7f) { /* positive fixint */
        v = *c->r.p++;
    } else if (mp_read_uint(&c->r, &v) != BUS_OK) {
        if (mp_read_int(&c->r, &neg) == BUS_OK) /* negative */
            return type_fail(&c->d, BUS_EPROTO,
                             "%" PRId64 " out of range for %s", neg,
                             type_kind_name(k));
        return td_bad(c, k);
    }
    switch (k) {
    case BUS_KIND_U8: hi = UINT8_MAX; break;
    case BUS_KIND_U16: hi = UINT16_MAX; break;
    case BUS_KIND_U32: hi = UINT32_MAX; break;
    default: hi = UINT64_MAX; break;
    }
    if (v > hi)
        return type_fail(&c->d, BUS_EPROTO,
                         "%" PRIu64 " out of range for %s", v,
                         type_kind_name(k));
    if (dst == NULL)
        return BUS_OK;
    switch (k) {
    case BUS_KIND_U8: *(uint8_t *)dst = (uint8_t)v; break;
    case BUS_KIND_U16: *(uint16_t *)dst = (uint16_t)v; break;
    case BUS_KIND_U32: *(uint32_t *)dst = (uint32_t)v; break;
    default: *(uint64_t *)dst = v; break;
    }
    return BUS_OK;
}

static int td_struct(td_ctx *c, const bus_type *t, unsigned char *dst,
                     size_t depth);
static int td_array(td_ctx *c, bus_kind elem, const bus_type *nt,
                    unsigned char *dst, size_t depth);

/* One value of kind k into dst (NULL in the sizing walk). in_array: nil is
 * a NULL string (te_value writes NULL array strings as nil). */
static int
td_value(td_ctx *c, bus_kind k, bus_kind elem, const bus_type *nt,
         unsigned char *dst, size_t depth, bool in_array)
{
    void *v = dst;
    size_t len, at = 0;
    int rv;

    switch (k) {
    case BUS_KIND_BOOL: {
        bool b;
        if (mp_read_bool(&c->r, &b) != BUS_OK)
            return td_bad(c, k);
        if (v != NULL)
            *(bool *)v = b;
        return BUS_OK;
    }
    case BUS_KIND_I8: case BUS_KIND_I16: case BUS_KIND_I32:
    case BUS_KIND_I64:
        return td_sint(c, k, v);
    case BUS_KIND_U8: case BUS_KIND_U16: case BUS_KIND_U32:
    case BUS_KIND_U64:
        return td_uint(c, k, v);
    case BUS_KIND_F32: case BUS_KIND_F64: {
        double d;
        if (mp_read_double(&c->r, &d) != BUS_OK)
            return td_bad(c, k);
        if (k == BUS_KIND_F64) {
            if (v != NULL)
                *(double *)v = d;
            return BUS_OK;
        }
        /* Infinities and NaN carry over; a finite value beyond float's
         * range would silently become one, so it is refused. */
        if (isfinite(d) && fabs(d) > FLT_MAX)
            return type_fail(&c->d, BUS_EPROTO, "%g out of range for f32",
                             d);
        if (v != NULL)
            *(float *)v = (float)d;
        return BUS_OK;
    }
    case BUS_KIND_STRING: {
        const char *s;
        if (in_array && td_is_nil(&c->r)) {
            (void)mp_read_nil(&c->r);
            if (v != NULL)
                *(char **)v = NULL;
            return BUS_OK;
        }
        if (!td_fixstr(&c->r, &s, &len)
            && mp_read_str(&c->r, &s, &len) != BUS_OK)
            return td_bad(c, k);
        if (c->base == NULL && !type_utf8_valid(s, len))
            return type_fail(&c->d, BUS_EPROTO,
                             "invalid UTF-8 (or a NUL byte) in str");
        /* len < the payload size, so len + 1 cannot wrap. */
        if ((rv = td_carve(c, len + 1, 1, &at)) != BUS_OK)
            return rv;
        if (v != NULL) {
            char *d = (char *)c->base + at;
            memcpy(d, s, len);
            d[len] = '\0';
            *(char **)v = d;
        }
        return BUS_OK;
    }
    case BUS_KIND_BYTES: {
        const uint8_t *p;
        bus_bytes *b = v;
        if (mp_left(&c->r) >= 2 && c->r.p[0] == 0xc4 /* bin8 */
            && c->r.p[1] <= mp_left(&c->r) - 2) {
            len = c->r.p[1];
            p = c->r.p + 2;
            c->r.p += 2 + len;
        } else if (mp_read_bytes(&c->r, &p, &len) != BUS_OK) {
            return td_bad(c, k);
        }
        at = 0;
        if (len > 0 && (rv = td_carve(c, len, 1, &at)) != BUS_OK)
            return rv;
        if (b != NULL) {
            if (len > 0)
                memcpy(c->base + at, p, len);
            b->data = len > 0 ? c->base + at : NULL;
            b->len = len;
        }
        return BUS_OK;
    }
    case BUS_KIND_STRUCT:
        if (nt == NULL)
            return type_fail(&c->d, BUS_EINVAL, "struct without a type");
        return td_struct(c, nt, dst, depth + 1);
    case BUS_KIND_ARRAY:
        return td_array(c, elem, nt, dst, depth);
    default:
        return type_fail(&c->d, BUS_EINVAL, "invalid kind %d", (int)k);
    }
}

static int
td_array(td_ctx *c, bus_kind elem, const bus_type *nt, unsigned char *dst,
         size_t depth)
{
    type_frame *fr = &c->d.f[depth];
    unsigned char *items = NULL;
    size_t n, i, at = 0, esz = type_kind_size(elem, nt);
    size_t align = type_kind_align(elem);
    int rv;

    if (esz == 0 || elem == BUS_KIND_ARRAY)
        return type_fail(&c->d, BUS_EINVAL, "invalid element kind %d",
                         (int)elem);
    if (mp_read_array(&c->r, &n) != BUS_OK)
        return td_bad(c, BUS_KIND_ARRAY);
    if (n > 0) {
        /* n <= the bytes left (mp_read_array), so the block grows by at
         * most the payload size times esz. */
        if (n > SIZE_MAX / esz)
            return type_fail(&c->d, BUS_ENOMEM, "decoded object too large");
        rv = td_carve(c, n * esz, align ? align : TYPE_ALIGN, &at);
        if (rv != BUS_OK)
            return rv;
        if (c->base != NULL) {
            items = c->base + at;
            if (elem == BUS_KIND_STRUCT) /* absent fields read as zero */
                memset(items, 0, n * esz);
        }
    }
    fr->indexed = true;
    for (i = 0; i < n; i++) {
        fr->index = i;
        c->d.depth = depth + 1;
        rv = td_value(c, elem, (bus_kind)0, nt,
                      items != NULL ? items + i * esz : NULL, depth, true);
        if (rv != BUS_OK)
            return rv; /* leave the index in the path for the message */
    }
    fr->indexed = false;
    c->d.depth = depth + 1;
    if (dst != NULL) {
        bus_array *a = (void *)dst;
        a->items = items;
        a->count = n;
    }
    return BUS_OK;
}

/* Index of the field named key, or t->n_fields. Tries hint first: our
 * encoder writes fields in table order, so that is usually the one. */
static size_t
td_find(const bus_type *t, const char *key, size_t klen, size_t hint)
{
    size_t i;

    if (hint < t->n_fields && type_name_eq(t->fields[hint].name, key, klen))
        return hint;
    for (i = 0; i < t->n_fields; i++)
        if (type_name_eq(t->fields[i].name, key, klen))
            return i;
    return t->n_fields;
}

static int
td_struct(td_ctx *c, const bus_type *t, unsigned char *dst, size_t depth)
{
    /* Known fields seen so far, to refuse duplicates and find missing
     * required ones (sizing walk only). */
    uint64_t seen[BUS_TYPE_MAX_FIELDS / 64];
    bool sizing = c->base == NULL;
    size_t n, i, fi, klen, hint = 0;
    const char *key;
    int rv;

    c->d.depth = depth;
    if (depth > BUS_TYPE_MAX_DEPTH)
        return type_fail(&c->d, BUS_EINVAL, "structs nested deeper than %d",
                         BUS_TYPE_MAX_DEPTH);
    if (t->n_fields > BUS_TYPE_MAX_FIELDS)
        return type_fail(&c->d, BUS_EINVAL, "more than %d fields",
                         BUS_TYPE_MAX_FIELDS);
    if (mp_read_map(&c->r, &n) != BUS_OK)
        return td_bad(c, BUS_KIND_STRUCT);
    if (sizing)
        memset(seen, 0, (t->n_fields + 63) / 64 * sizeof(seen[0]));
    for (i = 0; i < n; i++) {
        const bus_field *f;

        c->d.depth = depth;
        if (!td_fixstr(&c->r, &key, &klen)
            && mp_read_str(&c->r, &key, &klen) != BUS_OK) {
            if (mp_peek(&c->r) == MP_STR)
                return type_fail(&c->d, BUS_EPROTO,
                                 "truncated map key at offset %zu",
                                 mp_offset(&c->r));
            return type_fail(&c->d, BUS_EPROTO,
                             "map key at offset %zu: expected str, got %s",
                             mp_offset(&c->r), mp_type_name(mp_peek(&c->r)));
        }
        if (sizing) {
            fi = td_find(t, key, klen, hint);
            if (c->n_keys < TD_KEY_CACHE)
                c->keys[c->n_keys++] = fi == t->n_fields ? TD_KEY_UNKNOWN
                                                         : (uint16_t)fi;
        } else if (c->n_keys < TD_KEY_CACHE) { /* same key, same order */
            fi = c->keys[c->n_keys++];
            if (fi == TD_KEY_UNKNOWN)
                fi = t->n_fields;
        } else {
            fi = td_find(t, key, klen, hint);
        }
        if (fi == t->n_fields) {
            /* Unknown: a newer writer's field. Skipped, not checked for
             * duplicates: that would cost time or memory quadratic in a
             * hostile payload, for keys we ignore anyway. */
            if (mp_skip(&c->r, BUS_TYPE_MAX_DEPTH) != BUS_OK)
                return type_fail(&c->d, BUS_EPROTO,
                                 "malformed or too deeply nested value of "
                                 "an unknown key at offset %zu",
                                 mp_offset(&c->r));
            continue;
        }
        hint = fi + 1;
        f = &t->fields[fi];
        c->d.f[depth] = (type_frame){f->name, 0, false};
        c->d.depth = depth + 1;
        if (sizing) {
            if (seen[fi / 64] & (UINT64_C(1) << (fi % 64)))
                return type_fail(&c->d, BUS_EPROTO, "duplicate key");
            seen[fi / 64] |= UINT64_C(1) << (fi % 64);
        }
        if (!(f->flags & BUS_REQUIRED) && td_is_nil(&c->r)) {
            (void)mp_read_nil(&c->r); /* absent: stays zero */
            continue;
        }
        rv = td_value(c, f->kind, f->elem, f->type,
                      dst != NULL ? dst + f->offset : NULL, depth, false);
        if (rv != BUS_OK)
            return rv;
    }
    c->d.depth = depth;
    if (!sizing)
        return BUS_OK;
    for (fi = 0; fi < t->n_fields; fi++) {
        const bus_field *f = &t->fields[fi];
        char path[192];

        if (!(f->flags & BUS_REQUIRED)
            || (seen[fi / 64] & (UINT64_C(1) << (fi % 64))))
            continue;
        c->d.f[depth] = (type_frame){f->name, 0, false};
        type_path_fmt(&c->d, depth + 1, path, sizeof(path));
        type_errf(c->d.errbuf, c->d.errbuf_len,
                  "missing required field \"%s\"", path);
        return BUS_EPROTO;
    }
    return BUS_OK;
}

/* Decodes buf into a new block (header not linked to anything). */
static int
type_decode(const bus_type *t, const void *buf, size_t len, void **out,
            char *errbuf, size_t errbuf_len)
{
    static const uint8_t empty[1];
    type_block *b;
    td_ctx c;
    size_t first, size;
    void *obj;
    int rv;

    type_diag_init(&c.d, "payload", errbuf, errbuf_len);
    if (t->size > SIZE_MAX - TYPE_HDR - TYPE_ALIGN)
        return type_fail(&c.d, BUS_EINVAL, "type size too large");
    /* Strings, bytes and arrays follow the struct in the block. */
    first = TYPE_HDR + t->size;
    mp_reader_init(&c.r, buf != NULL ? buf : empty, len);
    c.base = NULL;
    c.off = first;
    c.n_keys = 0;
    if ((rv = td_struct(&c, t, NULL, 0)) != BUS_OK)
        return rv;
    if (mp_left(&c.r) != 0)
        return type_fail(&c.d, BUS_EPROTO,
                         "%zu trailing bytes after the map at offset %zu",
                         mp_left(&c.r), mp_offset(&c.r));
    size = c.off;
    if ((b = bus__alloc(size)) == NULL)
        return type_fail(&c.d, BUS_ENOMEM, "out of memory (%zu bytes)",
                         size);
    b->size = size;
    b->next = NULL;
    obj = type_obj(b);
    memset(obj, 0, t->size); /* absent fields read as zero */
    mp_reader_init(&c.r, buf != NULL ? buf : empty, len);
    c.base = (unsigned char *)b;
    c.off = first;
    c.n_keys = 0; /* replay the cached field indices */
    rv = td_struct(&c, t, obj, 0);
    assert(rv == BUS_OK && c.off == size);
    if (rv != BUS_OK) {
        bus__free(b, size);
        return rv;
    }
    *out = obj;
    return BUS_OK;
}

int
bus_type_decode(const bus_type *t, const void *buf, size_t len, void **obj,
                char *errbuf, size_t errbuf_len)
{
    if (obj != NULL)
        *obj = NULL;
    if (t == NULL || obj == NULL || (buf == NULL && len > 0)) {
        type_errf(errbuf, errbuf_len, "payload: NULL argument");
        return BUS_EINVAL;
    }
    return type_decode(t, buf, len, obj, errbuf, errbuf_len);
}

/* ---- Events -------------------------------------------------------------- */

/* The event's payload_free for a buffer from bus_type_encode; the hint
 * carries its length, which the sized free needs. */
static void
type_payload_free(void *data, void *hint)
{
    bus__free(data, (size_t)(uintptr_t)hint);
}

#define TYPE_SMALL_HEADERS 8

int
bus_event_new_typed(bus_event **out, const bus_type *t, const void *obj,
                    const bus_event_init *init, char *errbuf,
                    size_t errbuf_len)
{
    bus_header small[TYPE_SMALL_HEADERS], *hs = NULL;
    size_t i, n = 0, hs_size = 0;
    bool has_ct = false;
    bus_event_init ei;
    void *buf;
    size_t len;
    int rv;

    if (out != NULL)
        *out = NULL;
    if (out == NULL || t == NULL || t->name == NULL || obj == NULL) {
        type_errf(errbuf, errbuf_len, "NULL argument");
        return BUS_EINVAL;
    }
    if (init != NULL) {
        ei = *init;
        n = init->n_headers;
        if (n > 0 && init->headers == NULL) {
            type_errf(errbuf, errbuf_len, "headers is NULL, n_headers %zu",
                      n);
            return BUS_EINVAL;
        }
        for (i = 0; i < n && !has_ct; i++)
            has_ct = init->headers[i].key != NULL
                  && strcmp(init->headers[i].key, BUS_H_CONTENT_TYPE) == 0;
    } else {
        memset(&ei, 0, sizeof(ei));
    }
    /* The content type is added to a copy of the caller's headers, so the
     * event is built in one go (a later set_header could need a chunk). */
    if (!has_ct) {
        if (n + 1 <= TYPE_SMALL_HEADERS) {
            hs = small;
        } else {
            hs_size = (n + 1) * sizeof(*hs);
            if ((hs = bus__alloc(hs_size)) == NULL) {
                type_errf(errbuf, errbuf_len, "out of memory");
                return BUS_ENOMEM;
            }
        }
        if (n > 0)
            memcpy(hs, init->headers, n * sizeof(*hs));
        hs[n].key = BUS_H_CONTENT_TYPE;
        hs[n].value = "application/msgpack";
        ei.headers = hs;
        ei.n_headers = n + 1;
    }
    rv = bus_type_encode(t, obj, &buf, &len, errbuf, errbuf_len);
    if (rv == BUS_OK) {
        ei.type = t->name;
        ei.schema_version = t->version;
        ei.payload = buf;
        ei.payload_len = len;
        /* Adopted, not copied: the event frees it (also on failure). */
        ei.payload_free = type_payload_free;
        ei.payload_hint = (void *)(uintptr_t)len;
        if ((rv = bus_event_create(out, &ei)) != BUS_OK)
            type_errf(errbuf, errbuf_len, "creating the event: %s",
                      bus_strerror(rv));
    }
    if (hs_size > 0)
        bus__free(hs, hs_size);
    return rv;
}

/* ---- Registry ------------------------------------------------------------ */

typedef struct reg_up {
    char *name;       /* owned copy */
    size_t name_size; /* for bus__free */
    uint32_t from;
    bus_upcast_fn fn;
    void *opaque;
} reg_up;

struct bus_type_registry {
    const bus_type **types; /* sorted by (name, version) */
    size_t n_types, cap_types;
    reg_up *ups;            /* sorted by (name, from) */
    size_t n_ups, cap_ups;
};

static int
reg_cmp(const char *an, uint32_t av, const char *bn, uint32_t bv)
{
    int c = strcmp(an, bn);

    if (c != 0)
        return c;
    return (av > bv) - (av < bv);
}

/* First index whose (name, version) is not below the key. */
static size_t
reg_type_lb(const bus_type_registry *r, const char *name, uint32_t version)
{
    size_t lo = 0, hi = r->n_types, mid;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        if (reg_cmp(r->types[mid]->name, r->types[mid]->version, name,
                    version) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static size_t
reg_up_lb(const bus_type_registry *r, const char *name, uint32_t from)
{
    size_t lo = 0, hi = r->n_ups, mid;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        if (reg_cmp(r->ups[mid].name, r->ups[mid].from, name, from) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static const reg_up *
reg_up_find(const bus_type_registry *r, const char *name, uint32_t from)
{
    size_t i = reg_up_lb(r, name, from);

    if (i < r->n_ups && r->ups[i].from == from
        && strcmp(r->ups[i].name, name) == 0)
        return &r->ups[i];
    return NULL;
}

/* Makes room for one more element of esz bytes in *arr. */
static int
reg_grow(void **arr, size_t *cap, size_t n, size_t esz)
{
    size_t ncap;
    void *p;

    if (n < *cap)
        return BUS_OK;
    ncap = *cap ? *cap * 2 : 8;
    if (ncap > SIZE_MAX / esz)
        return BUS_ENOMEM;
    if ((p = bus__realloc(*arr, *cap * esz, ncap * esz)) == NULL)
        return BUS_ENOMEM;
    *arr = p;
    *cap = ncap;
    return BUS_OK;
}

int
bus_type_registry_new(bus_type_registry **out)
{
    if (out == NULL)
        return BUS_EINVAL;
    *out = bus__zalloc(sizeof(**out));
    return *out != NULL ? BUS_OK : BUS_ENOMEM;
}

void
bus_type_registry_free(bus_type_registry *r)
{
    size_t i;

    if (r == NULL)
        return;
    for (i = 0; i < r->n_ups; i++)
        bus__free(r->ups[i].name, r->ups[i].name_size);
    bus__free(r->types, r->cap_types * sizeof(*r->types));
    bus__free(r->ups, r->cap_ups * sizeof(*r->ups));
    bus__free(r, sizeof(*r));
}

int
bus_type_register(bus_type_registry *r, const bus_type *t)
{
    size_t i;

    if (r == NULL || bus_type_validate(t, NULL, 0) != BUS_OK)
        return BUS_EINVAL;
    i = reg_type_lb(r, t->name, t->version);
    if (i < r->n_types
        && reg_cmp(r->types[i]->name, r->types[i]->version, t->name,
                   t->version) == 0)
        return r->types[i] == t ? BUS_OK : BUS_EEXIST;
    if (reg_grow((void **)&r->types, &r->cap_types, r->n_types,
                 sizeof(*r->types)) != BUS_OK)
        return BUS_ENOMEM;
    memmove(&r->types[i + 1], &r->types[i],
            (r->n_types - i) * sizeof(*r->types));
    r->types[i] = t;
    r->n_types++;
    return BUS_OK;
}

int
bus_type_register_upcaster(bus_type_registry *r, const char *name,
                           uint32_t from_version, bus_upcast_fn fn,
                           void *opaque)
{
    reg_up u;
    size_t i;

    if (r == NULL || name == NULL || name[0] == '\0' || fn == NULL
        || from_version == 0 || from_version == UINT32_MAX)
        return BUS_EINVAL;
    i = reg_up_lb(r, name, from_version);
    if (i < r->n_ups && r->ups[i].from == from_version
        && strcmp(r->ups[i].name, name) == 0)
        return BUS_EEXIST;
    if (reg_grow((void **)&r->ups, &r->cap_ups, r->n_ups, sizeof(*r->ups))
        != BUS_OK)
        return BUS_ENOMEM;
    if ((u.name = bus__strdup(name, &u.name_size)) == NULL)
        return BUS_ENOMEM;
    u.from = from_version;
    u.fn = fn;
    u.opaque = opaque;
    memmove(&r->ups[i + 1], &r->ups[i], (r->n_ups - i) * sizeof(*r->ups));
    r->ups[i] = u;
    r->n_ups++;
    return BUS_OK;
}

const bus_type *
bus_type_lookup(const bus_type_registry *r, const char *name,
                uint32_t version)
{
    size_t i;

    if (r == NULL || name == NULL)
        return NULL;
    if (version == 0) {
        /* The latest: the last entry of name, just below (name, max). */
        i = reg_type_lb(r, name, UINT32_MAX);
        if (i < r->n_types && r->types[i]->version == UINT32_MAX
            && strcmp(r->types[i]->name, name) == 0)
            return r->types[i];
        if (i > 0 && strcmp(r->types[i - 1]->name, name) == 0)
            return r->types[i - 1];
        return NULL;
    }
    i = reg_type_lb(r, name, version);
    if (i < r->n_types && r->types[i]->version == version
        && strcmp(r->types[i]->name, name) == 0)
        return r->types[i];
    return NULL;
}

int
bus_type_registry_decode(const bus_type_registry *r, const char *name,
                         uint32_t version, const void *buf, size_t len,
                         void **out, const bus_type **out_type, char *errbuf,
                         size_t errbuf_len)
{
    const bus_type *t, *latest, *nt;
    const reg_up *up;
    type_block *b;
    uint32_t v;
    void *obj, *to;
    int rv;

    if (out != NULL)
        *out = NULL;
    if (out_type != NULL)
        *out_type = NULL;
    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
    if (r == NULL || name == NULL || version == 0 || out == NULL
        || (buf == NULL && len > 0)) {
        type_errf(errbuf, errbuf_len, "invalid argument%s",
                  version == 0 ? " (version 0)" : "");
        return BUS_EINVAL;
    }
    if ((t = bus_type_lookup(r, name, version)) == NULL) {
        type_errf(errbuf, errbuf_len, "type \"%s\" v%" PRIu32
                  " is not registered", name, version);
        return BUS_ENOTFOUND;
    }
    latest = bus_type_lookup(r, name, 0);
    /* Check the whole chain before decoding: a missing step should cost
     * nothing and name itself, not surface after an allocation. */
    for (v = version; v < latest->version; v++) {
        if (reg_up_find(r, name, v) == NULL) {
            type_errf(errbuf, errbuf_len, "no upcaster for \"%s\" v%" PRIu32
                      " -> v%" PRIu32 " (decoding v%" PRIu32 " into v%"
                      PRIu32 ")", name, v, v + 1, version, latest->version);
            return BUS_ENOTFOUND;
        }
        if (bus_type_lookup(r, name, v + 1) == NULL) {
            type_errf(errbuf, errbuf_len, "type \"%s\" v%" PRIu32
                      " is not registered (needed to upcast v%" PRIu32
                      " to v%" PRIu32 ")", name, v + 1, version,
                      latest->version);
            return BUS_ENOTFOUND;
        }
    }
    if ((rv = type_decode(t, buf, len, &obj, errbuf, errbuf_len)) != BUS_OK)
        return rv;
    for (v = version; v < latest->version; v++) {
        up = reg_up_find(r, name, v);
        nt = bus_type_lookup(r, name, v + 1);
        if ((b = type_block_new(nt->size)) == NULL) {
            bus_type_free(obj);
            type_errf(errbuf, errbuf_len, "out of memory");
            return BUS_ENOMEM;
        }
        to = type_obj(b);
        memset(to, 0, nt->size);
        /* Linked before the call: the upcaster may alias from's strings,
         * and on failure one bus_type_free releases both. */
        b->next = type_hdr(obj);
        if ((rv = up->fn(obj, to, up->opaque)) != BUS_OK) {
            bus_type_free(to);
            type_errf(errbuf, errbuf_len, "upcaster \"%s\" v%" PRIu32
                      " -> v%" PRIu32 " failed: %s", name, v, v + 1,
                      bus_strerror(rv));
            return rv;
        }
        obj = to;
    }
    *out = obj;
    if (out_type != NULL)
        *out_type = latest;
    return BUS_OK;
}

int
bus_event_decode_typed(const bus_type_registry *r, const bus_event *e,
                       void **out, const bus_type **out_type, char *errbuf,
                       size_t errbuf_len)
{
    if (e == NULL) {
        if (out != NULL)
            *out = NULL;
        if (out_type != NULL)
            *out_type = NULL;
        type_errf(errbuf, errbuf_len, "event is NULL");
        return BUS_EINVAL;
    }
    return bus_type_registry_decode(r, bus_event_type(e),
                                    bus_event_schema_version(e),
                                    bus_event_payload(e),
                                    bus_event_payload_len(e), out, out_type,
                                    errbuf, errbuf_len);
}
