/*
 * A minimal, strict MessagePack writer and reader for the envelope and typed
 * codecs (internal).
 *
 * Why not msgpack-c's unpacker: it allocates objects for the counts a frame
 * declares before seeing the bytes behind them (a 5-byte array header
 * claiming 4 billion elements asks for gigabytes), and it builds a tree we
 * would then copy. This reader is a cursor over the input: it allocates
 * nothing, and every declared length or count is checked against the bytes
 * left before the caller can act on it (a container of n elements needs at
 * least n bytes, a map 2n).
 *
 * Writer: mp_put_* write at p without bounds checks and return the new end;
 * callers size the buffer first with mp_size_* (the envelope codec knows
 * the exact size) or use mp_buf, which grows.
 */
#ifndef BUS_MP_H
#define BUS_MP_H

#include <string.h>

#include <bus/err.h>

/* ---- Writer ----------------------------------------------------------- */

static inline uint8_t *
mp_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static inline uint8_t *
mp_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static inline uint8_t *
mp_be64(uint8_t *p, uint64_t v)
{
    p = mp_be32(p, (uint32_t)(v >> 32));
    return mp_be32(p, (uint32_t)v);
}

static inline size_t
mp_size_uint(uint64_t v)
{
    return v < 128 ? 1 : v <= 0xff ? 2 : v <= 0xffff ? 3
         : v <= 0xffffffffu ? 5 : 9;
}

static inline size_t
mp_size_int(int64_t v)
{
    if (v >= 0)
        return mp_size_uint((uint64_t)v);
    return v >= -32 ? 1 : v >= INT8_MIN ? 2 : v >= INT16_MIN ? 3
         : v >= INT32_MIN ? 5 : 9;
}

static inline size_t
mp_size_str(size_t len)
{
    return (len < 32 ? 1 : len <= 0xff ? 2 : len <= 0xffff ? 3 : 5) + len;
}

static inline size_t
mp_size_bin(size_t len)
{
    return (len <= 0xff ? 2 : len <= 0xffff ? 3 : 5) + len;
}

static inline size_t
mp_size_map(size_t n)
{
    return n < 16 ? 1 : n <= 0xffff ? 3 : 5;
}

static inline size_t
mp_size_array(size_t n)
{
    return mp_size_map(n);
}

static inline uint8_t *
mp_put_uint(uint8_t *p, uint64_t v)
{
    if (v < 128) {
        *p++ = (uint8_t)v;
    } else if (v <= 0xff) {
        *p++ = 0xcc;
        *p++ = (uint8_t)v;
    } else if (v <= 0xffff) {
        *p++ = 0xcd;
        p = mp_be16(p, (uint16_t)v);
    } else if (v <= 0xffffffffu) {
        *p++ = 0xce;
        p = mp_be32(p, (uint32_t)v);
    } else {
        *p++ = 0xcf;
        p = mp_be64(p, v);
    }
    return p;
}

static inline uint8_t *
mp_put_int(uint8_t *p, int64_t v)
{
    if (v >= 0)
        return mp_put_uint(p, (uint64_t)v);
    if (v >= -32) {
        *p++ = (uint8_t)(int8_t)v; /* negative fixint 0xe0..0xff */
    } else if (v >= INT8_MIN) {
        *p++ = 0xd0;
        *p++ = (uint8_t)(int8_t)v;
    } else if (v >= INT16_MIN) {
        *p++ = 0xd1;
        p = mp_be16(p, (uint16_t)(int16_t)v);
    } else if (v >= INT32_MIN) {
        *p++ = 0xd2;
        p = mp_be32(p, (uint32_t)(int32_t)v);
    } else {
        *p++ = 0xd3;
        p = mp_be64(p, (uint64_t)v);
    }
    return p;
}

static inline uint8_t *
mp_put_nil(uint8_t *p)
{
    *p++ = 0xc0;
    return p;
}

static inline uint8_t *
mp_put_bool(uint8_t *p, bool b)
{
    *p++ = b ? 0xc3 : 0xc2;
    return p;
}

static inline uint8_t *
mp_put_f64(uint8_t *p, double d)
{
    uint64_t u;

    memcpy(&u, &d, sizeof(u));
    *p++ = 0xcb;
    return mp_be64(p, u);
}

static inline uint8_t *
mp_put_f32(uint8_t *p, float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    *p++ = 0xca;
    return mp_be32(p, u);
}

static inline uint8_t *
mp_put_str_hdr(uint8_t *p, size_t len)
{
    if (len < 32) {
        *p++ = (uint8_t)(0xa0 | len);
    } else if (len <= 0xff) {
        *p++ = 0xd9;
        *p++ = (uint8_t)len;
    } else if (len <= 0xffff) {
        *p++ = 0xda;
        p = mp_be16(p, (uint16_t)len);
    } else {
        *p++ = 0xdb;
        p = mp_be32(p, (uint32_t)len);
    }
    return p;
}

static inline uint8_t *
mp_put_str(uint8_t *p, const char *s, size_t len)
{
    p = mp_put_str_hdr(p, len);
    if (len > 0)
        memcpy(p, s, len);
    return p + len;
}

static inline uint8_t *
mp_put_bin_hdr(uint8_t *p, size_t len)
{
    if (len <= 0xff) {
        *p++ = 0xc4;
        *p++ = (uint8_t)len;
    } else if (len <= 0xffff) {
        *p++ = 0xc5;
        p = mp_be16(p, (uint16_t)len);
    } else {
        *p++ = 0xc6;
        p = mp_be32(p, (uint32_t)len);
    }
    return p;
}

static inline uint8_t *
mp_put_bin(uint8_t *p, const void *d, size_t len)
{
    p = mp_put_bin_hdr(p, len);
    if (len > 0)
        memcpy(p, d, len);
    return p + len;
}

static inline uint8_t *
mp_put_map(uint8_t *p, size_t n)
{
    if (n < 16) {
        *p++ = (uint8_t)(0x80 | n);
    } else if (n <= 0xffff) {
        *p++ = 0xde;
        p = mp_be16(p, (uint16_t)n);
    } else {
        *p++ = 0xdf;
        p = mp_be32(p, (uint32_t)n);
    }
    return p;
}

static inline uint8_t *
mp_put_array(uint8_t *p, size_t n)
{
    if (n < 16) {
        *p++ = (uint8_t)(0x90 | n);
    } else if (n <= 0xffff) {
        *p++ = 0xdc;
        p = mp_be16(p, (uint16_t)n);
    } else {
        *p++ = 0xdd;
        p = mp_be32(p, (uint32_t)n);
    }
    return p;
}

/* ---- Reader ----------------------------------------------------------- */

typedef struct mp_reader {
    const uint8_t *p;
    const uint8_t *end;
    const uint8_t *start; /* for error offsets */
} mp_reader;

/* The broad type of the next value, for error messages and dispatch. */
typedef enum mp_type {
    MP_NONE = 0, /* no bytes left */
    MP_NIL,
    MP_BOOL,
    MP_UINT, /* a non-negative integer in any encoding */
    MP_NINT, /* a negative integer */
    MP_FLOAT,
    MP_STR,
    MP_BIN,
    MP_ARRAY,
    MP_MAP,
    MP_EXT,
    MP_INVALID /* 0xc1, never used */
} mp_type;

static inline void
mp_reader_init(mp_reader *r, const void *buf, size_t len)
{
    r->p = (const uint8_t *)buf;
    r->start = r->p;
    r->end = r->p + len;
}

static inline size_t
mp_left(const mp_reader *r)
{
    return (size_t)(r->end - r->p);
}

static inline size_t
mp_offset(const mp_reader *r)
{
    return (size_t)(r->p - r->start);
}

static inline uint16_t
mp_rd16(const uint8_t *p)
{
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static inline uint32_t
mp_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8
         | p[3];
}

static inline uint64_t
mp_rd64(const uint8_t *p)
{
    return (uint64_t)mp_rd32(p) << 32 | mp_rd32(p + 4);
}

mp_type mp_peek(const mp_reader *r);
const char *mp_type_name(mp_type t);

/* Each reader returns BUS_OK and advances, or BUS_EPROTO (wrong type,
 * truncated, count larger than the bytes left) and leaves r unchanged. */
int mp_read_nil(mp_reader *r);
int mp_read_bool(mp_reader *r, bool *b);
int mp_read_uint(mp_reader *r, uint64_t *v);    /* rejects negatives */
int mp_read_int(mp_reader *r, int64_t *v);      /* rejects > INT64_MAX */
int mp_read_double(mp_reader *r, double *d);    /* float32/64 or integer */
int mp_read_str(mp_reader *r, const char **s, size_t *len);
int mp_read_bin(mp_reader *r, const uint8_t **d, size_t *len);
/* str or bin: some writers (old msgpack) send bytes as str. */
int mp_read_bytes(mp_reader *r, const uint8_t **d, size_t *len);
int mp_read_map(mp_reader *r, size_t *n);
int mp_read_array(mp_reader *r, size_t *n);
/* Skips one value of any type, nested at most max_depth levels. */
int mp_skip(mp_reader *r, size_t max_depth);

/* ---- Growable buffer --------------------------------------------------- */

typedef struct mp_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
    int err; /* sticky: BUS_ENOMEM after a failed growth */
} mp_buf;

/* Ensures room for n more bytes; returns the write position or NULL (and
 * sets b->err) when memory runs out. Commit with mp_buf_commit. */
uint8_t *mp_buf_reserve(mp_buf *b, size_t n);

static inline void
mp_buf_commit(mp_buf *b, uint8_t *end)
{
    b->len = (size_t)(end - b->data);
}

void mp_buf_free(mp_buf *b);

/* Valid UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF) with no
 * NUL byte. */
bool bus__utf8_valid(const char *s, size_t len);

#endif
