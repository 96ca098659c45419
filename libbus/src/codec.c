/*
 * The envelope codec: bus_event <-> one MessagePack map (docs/wire-format.md
 * is the specification, codec.h the contract).
 *
 * Design:
 * - Encoding is one pass of mp_put_* into a buffer sized exactly by
 *   bus_codec_encoded_size, which adds up the event's stored lengths (no
 *   strlen). Optional keys are written only when they differ from their
 *   default, in the fixed order v id type sv stream sver pos ts h p, so the
 *   output is canonical: two equal events encode to the same bytes.
 * - Decoding is one pass of a cursor over the input that only collects
 *   pointers and lengths, then one bus__event_build (one allocation). The
 *   header pairs go into a small stack array; only a frame with more than
 *   CODEC_STACK_HEADERS headers costs one temporary allocation. Nothing is
 *   allocated before the frame has been fully validated, so a malformed
 *   frame allocates nothing (except that temporary array) whatever it
 *   declares. The common encodings are read inline with the cursor in a
 *   register; the rest, and every error, take out-of-line slow paths on
 *   the mp.h reader (this roughly halved the decode time of a typical
 *   envelope).
 * - Every declared length or count is compared with its limit first
 *   (BUS_ETOOBIG) and then with the bytes left (BUS_EPROTO), so an absurd
 *   declaration is reported as such and never read.
 * - Error text is only formatted on failure and only if the caller gave an
 *   errbuf; the success path never touches it.
 *
 * Thread: any; no state is kept between calls.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/codec.h>

#include "alloc.h"
#include "event_impl.h"
#include "mp.h"

/* Arena bytes kept in a decoded event for the topic it arrived on. */
#define CODEC_TOPIC_SPARE 64

/* Defaults (codec.h documents them). */
#define CODEC_DEF_MAX_FRAME ((size_t)64 << 20)
#define CODEC_DEF_MAX_PAYLOAD ((size_t)16 << 20)
#define CODEC_DEF_MAX_HEADERS 64
#define CODEC_DEF_MAX_STRING 4096
#define CODEC_DEF_MAX_DEPTH 16

/* Ceilings applied on top of the caller's limits. Strings and header counts
 * follow what bus_event_create accepts, so a decoded event is always one
 * that could have been built; the payload length is stored in 32 bits on
 * the wire anyway. The depth bounds the recursion of mp_skip, i.e. stack
 * use on a thread we do not own. */
#define CODEC_CAP_STRING 65535u
#define CODEC_CAP_HEADERS 65535u
#define CODEC_CAP_PAYLOAD ((size_t)UINT32_MAX)
#define CODEC_CAP_DEPTH 256u

/* Headers collected on the stack; more need one temporary allocation. A
 * usual envelope has a handful (correlation, causation, traceparent,
 * content type); 16 pairs cost 512 bytes of stack. */
#define CODEC_STACK_HEADERS 16

/* Bits of codec_fields.seen, one per known key: duplicates and required
 * keys are found with them. The order is the writers' key order. */
enum {
    K_V = 1u << 0,
    K_ID = 1u << 1,
    K_TYPE = 1u << 2,
    K_SV = 1u << 3,
    K_STREAM = 1u << 4,
    K_SVER = 1u << 5,
    K_POS = 1u << 6,
    K_TS = 1u << 7,
    K_H = 1u << 8,
    K_P = 1u << 9
};
#define K_REQUIRED (K_V | K_ID | K_TYPE | K_TS | K_P)

void
bus_codec_limits_init(bus_codec_limits *l)
{
    l->max_frame = CODEC_DEF_MAX_FRAME;
    l->max_payload = CODEC_DEF_MAX_PAYLOAD;
    l->max_headers = CODEC_DEF_MAX_HEADERS;
    l->max_string = CODEC_DEF_MAX_STRING;
    l->max_depth = CODEC_DEF_MAX_DEPTH;
}

/* ---- Encoding ------------------------------------------------------------ */

/* Key bytes as MessagePack fixstr, precomputed: "\xa1" "v" is the key "v".
 * sizeof - 1 drops the C string's NUL. */
#define KEY_V "\xa1v"
#define KEY_ID "\xa2id"
#define KEY_TYPE "\xa4type"
#define KEY_SV "\xa2sv"
#define KEY_STREAM "\xa6stream"
#define KEY_SVER "\xa4sver"
#define KEY_POS "\xa3pos"
#define KEY_TS "\xa2ts"
#define KEY_H "\xa1h"
#define KEY_P "\xa1p"
#define KLEN(k) (sizeof(k) - 1)

/* "v": 1 and "id": bin8 of 16 bytes, the fixed start of every frame after
 * the map header. */
#define FRAME_HEAD KEY_V "\x01" KEY_ID "\xc4\x10"

static size_t
codec_nkeys(const bus_event *e)
{
    return 5 + (e->schema_version != 1) + (e->stream != NULL)
         + (e->stream_version != 0) + (e->position != 0)
         + (e->n_headers != 0);
}

size_t
bus_codec_encoded_size(const bus_event *e)
{
    size_t n, i;

    n = mp_size_map(codec_nkeys(e)) + KLEN(FRAME_HEAD) + sizeof(e->id.b);
    n += KLEN(KEY_TYPE) + mp_size_str(e->type_len);
    if (e->schema_version != 1)
        n += KLEN(KEY_SV) + mp_size_uint(e->schema_version);
    if (e->stream != NULL)
        n += KLEN(KEY_STREAM) + mp_size_str(e->stream_len);
    if (e->stream_version != 0)
        n += KLEN(KEY_SVER) + mp_size_uint(e->stream_version);
    if (e->position != 0)
        n += KLEN(KEY_POS) + mp_size_uint(e->position);
    n += KLEN(KEY_TS) + mp_size_int(e->timestamp);
    if (e->n_headers != 0) {
        n += KLEN(KEY_H) + mp_size_map(e->n_headers);
        for (i = 0; i < e->n_headers; i++)
            n += mp_size_str(e->headers[i].klen)
               + mp_size_str(e->headers[i].vlen);
    }
    n += KLEN(KEY_P) + mp_size_bin(e->payload_len);
    return n;
}

#define PUT_KEY(p, k) (memcpy((p), (k), KLEN(k)), (p) + KLEN(k))

/* Writes the frame; buf holds at least bus_codec_encoded_size(e) bytes.
 * Returns the end. Must stay in step with bus_codec_encoded_size. */
static uint8_t *
codec_write(const bus_event *e, uint8_t *p)
{
    uint32_t i;

    p = mp_put_map(p, codec_nkeys(e));
    p = PUT_KEY(p, FRAME_HEAD);
    memcpy(p, e->id.b, sizeof(e->id.b));
    p += sizeof(e->id.b);
    p = PUT_KEY(p, KEY_TYPE);
    p = mp_put_str(p, e->type, e->type_len);
    if (e->schema_version != 1) {
        p = PUT_KEY(p, KEY_SV);
        p = mp_put_uint(p, e->schema_version);
    }
    if (e->stream != NULL) {
        p = PUT_KEY(p, KEY_STREAM);
        p = mp_put_str(p, e->stream, e->stream_len);
    }
    if (e->stream_version != 0) {
        p = PUT_KEY(p, KEY_SVER);
        p = mp_put_uint(p, e->stream_version);
    }
    if (e->position != 0) {
        p = PUT_KEY(p, KEY_POS);
        p = mp_put_uint(p, e->position);
    }
    p = PUT_KEY(p, KEY_TS);
    p = mp_put_int(p, e->timestamp);
    if (e->n_headers != 0) {
        p = PUT_KEY(p, KEY_H);
        p = mp_put_map(p, e->n_headers);
        for (i = 0; i < e->n_headers; i++) {
            const ev_header *h = &e->headers[i];
            p = mp_put_str(p, h->key, h->klen);
            p = mp_put_str(p, h->value, h->vlen);
        }
    }
    p = PUT_KEY(p, KEY_P);
    return mp_put_bin(p, e->payload, e->payload_len);
}

int
bus_codec_encode(const bus_event *e, void *buf, size_t cap, size_t *written)
{
    size_t need;
    uint8_t *end;

    if (written != NULL)
        *written = 0;
    /* An event without a type (bus_event_wrap before set_type) has no
     * valid encoding: "type" is required and non-empty. */
    if (e == NULL || e->type_len == 0 || (buf == NULL && cap > 0))
        return BUS_EINVAL;
    need = bus_codec_encoded_size(e);
    if (need > cap) {
        if (written != NULL)
            *written = need;
        return BUS_ENOBUFS;
    }
    end = codec_write(e, buf);
    if (written != NULL)
        *written = (size_t)(end - (uint8_t *)buf);
    return BUS_OK;
}

int
bus_codec_encode_alloc(const bus_event *e, void **buf, size_t *len)
{
    size_t need;
    uint8_t *b;

    if (buf == NULL || len == NULL)
        return BUS_EINVAL;
    *buf = NULL;
    *len = 0;
    if (e == NULL || e->type_len == 0)
        return BUS_EINVAL;
    need = bus_codec_encoded_size(e);
    if ((b = bus__alloc(need)) == NULL)
        return BUS_ENOMEM;
    codec_write(e, b);
    *buf = b;
    *len = need;
    return BUS_OK;
}

void
bus_codec_buf_free(void *buf, size_t len)
{
    bus__free(buf, len);
}

/* ---- Decoding ------------------------------------------------------------ */

/* The cursor is a pointer that each reader takes and returns (NULL on
 * error), so that it stays in a register through the hot loop; the common
 * encodings (fixint, fixstr, str8, bin8, uint64 timestamps) are read
 * inline, and everything else, including every error, goes to an
 * out-of-line slow path built on the mp.h reader. */
typedef struct codec_dec {
    const uint8_t *start;
    const uint8_t *end;
    bus_codec_limits lim; /* effective: defaults and ceilings applied */
    char *errbuf;
    size_t errbuf_len;
    const char *key; /* the key being decoded, for error messages */
    size_t key_len;
    int rv; /* the error when a reader returned NULL */
} codec_dec;

/* Everything the frame said, as pointers into it. */
typedef struct codec_fields {
    unsigned seen; /* K_* bits */
    const uint8_t *id;
    bus__str type;
    bus__str stream;
    uint64_t sv;
    uint64_t sver;
    uint64_t pos;
    int64_t ts;
    const uint8_t *payload;
    size_t payload_len;
    size_t n_headers;
    bus__str *hk; /* hk_small or the temporary block */
    bus__str *hv;
    size_t tmp_size; /* bytes of the temporary block (0: none) */
    bus__str hk_small[CODEC_STACK_HEADERS];
    bus__str hv_small[CODEC_STACK_HEADERS];
} codec_fields;

#if defined(__GNUC__)
#define CODEC_COLD __attribute__((cold, noinline))
#define CODEC_HOT_INLINE inline __attribute__((always_inline))
#else
#define CODEC_COLD
#define CODEC_HOT_INLINE inline
#endif

static size_t
codec_limit(size_t v, size_t def, size_t cap)
{
    if (v == 0)
        v = def;
    return v < cap ? v : cap;
}

static void
codec_limits_effective(bus_codec_limits *out, const bus_codec_limits *in)
{
    bus_codec_limits zero;

    if (in == NULL) {
        memset(&zero, 0, sizeof(zero));
        in = &zero;
    }
    out->max_frame = codec_limit(in->max_frame, CODEC_DEF_MAX_FRAME,
                                 SIZE_MAX);
    out->max_payload = codec_limit(in->max_payload, CODEC_DEF_MAX_PAYLOAD,
                                   CODEC_CAP_PAYLOAD);
    out->max_headers = codec_limit(in->max_headers, CODEC_DEF_MAX_HEADERS,
                                   CODEC_CAP_HEADERS);
    out->max_string = codec_limit(in->max_string, CODEC_DEF_MAX_STRING,
                                  CODEC_CAP_STRING);
    out->max_depth = codec_limit(in->max_depth, CODEC_DEF_MAX_DEPTH,
                                 CODEC_CAP_DEPTH);
}

static mp_reader
codec_reader(const codec_dec *d, const uint8_t *p)
{
    mp_reader r;

    r.p = p;
    r.end = d->end;
    r.start = d->start;
    return r;
}

/* Records rv and formats "key \"type\" at offset 12: <why>" into the
 * errbuf (if any). Returns NULL, so that readers `return codec_fail(..)`. */
static CODEC_COLD const uint8_t *BUS_PRINTF(4, 5)
codec_fail(codec_dec *d, int rv, const uint8_t *at, const char *fmt, ...)
{
    size_t off = (size_t)(at - d->start);
    va_list ap;
    int n;

    d->rv = rv;
    if (d->errbuf == NULL || d->errbuf_len == 0)
        return NULL;
    if (d->key != NULL)
        n = snprintf(d->errbuf, d->errbuf_len, "key \"%.*s\" at offset %zu: ",
                     (int)(d->key_len > 32 ? 32 : d->key_len), d->key, off);
    else
        n = snprintf(d->errbuf, d->errbuf_len, "frame at offset %zu: ", off);
    if (n < 0 || (size_t)n >= d->errbuf_len)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(d->errbuf + n, d->errbuf_len - (size_t)n, fmt, ap);
    va_end(ap);
    return NULL;
}

static CODEC_COLD const uint8_t *
codec_fail_type(codec_dec *d, const uint8_t *at, const char *want)
{
    mp_reader r = codec_reader(d, at);

    return codec_fail(d, BUS_EPROTO, at, "expected %s, got %s", want,
                      mp_type_name(mp_peek(&r)));
}

/* A str (bin false) or bin value of at most limit bytes, any encoding.
 * what prefixes messages about a value inside the key's value ("header
 * key: "), or is "". The limit is checked before the bytes left, so a
 * declared length over the limit is BUS_ETOOBIG even in a short frame. */
static CODEC_COLD const uint8_t *
codec_blob_slow(codec_dec *d, const uint8_t *p, bool bin, size_t limit,
                const char *what, const uint8_t **out, size_t *len)
{
    size_t left = (size_t)(d->end - p), n, hdr;
    uint8_t c;

    if (left == 0)
        return codec_fail(d, BUS_EPROTO, p, "%sexpected %s, got end of data",
                          what, bin ? "bin" : "str");
    c = p[0];
    if (!bin && c >= 0xa0 && c <= 0xbf)
        hdr = 1;
    else if (c == (bin ? 0xc4 : 0xd9))
        hdr = 2;
    else if (c == (bin ? 0xc5 : 0xda))
        hdr = 3;
    else if (c == (bin ? 0xc6 : 0xdb))
        hdr = 5;
    else {
        mp_reader r = codec_reader(d, p);
        return codec_fail(d, BUS_EPROTO, p, "%sexpected %s, got %s", what,
                          bin ? "bin" : "str", mp_type_name(mp_peek(&r)));
    }
    if (left < hdr)
        return codec_fail(d, BUS_EPROTO, p, "%struncated header", what);
    n = hdr == 1 ? (size_t)(c & 0x1fu) : hdr == 2 ? p[1]
      : hdr == 3 ? mp_rd16(p + 1) : mp_rd32(p + 1);
    if (n > limit)
        return codec_fail(d, BUS_ETOOBIG, p,
                          "%s%zu bytes exceed the limit of %zu", what, n,
                          limit);
    if (n > left - hdr)
        return codec_fail(d, BUS_EPROTO, p, "%s%zu bytes declared, %zu left",
                          what, n, left - hdr);
    *out = p + hdr;
    *len = n;
    return p + hdr + n;
}

/* Fast path of codec_blob_slow: fixstr, str8 and bin8 that fit. */
static CODEC_HOT_INLINE const uint8_t *
codec_blob(codec_dec *d, const uint8_t *p, bool bin, size_t limit,
           const char *what, const uint8_t **out, size_t *len)
{
    size_t left = (size_t)(d->end - p), n, hdr;

    if (left >= 2) {
        uint8_t c = p[0];
        if (!bin && c >= 0xa0 && c <= 0xbf) {
            n = c & 0x1fu;
            hdr = 1;
        } else if (c == (bin ? 0xc4 : 0xd9)) {
            n = p[1];
            hdr = 2;
        } else {
            return codec_blob_slow(d, p, bin, limit, what, out, len);
        }
        if (n <= limit && n <= left - hdr) {
            *out = p + hdr;
            *len = n;
            return p + hdr + n;
        }
    }
    return codec_blob_slow(d, p, bin, limit, what, out, len);
}

/* True when the 8 bytes at s are all ASCII and none is NUL. With no high
 * bit set, w - 0x01..01 sets a high bit exactly when some byte is 0. */
static CODEC_HOT_INLINE bool
codec_ascii8(const uint8_t *s)
{
    const uint64_t lo = 0x0101010101010101u, hi = 0x8080808080808080u;
    uint64_t w;

    memcpy(&w, s, sizeof(w));
    return ((w | (w - lo)) & hi) == 0;
}

/* bus__utf8_valid with a fast path for ASCII, which nearly every type name,
 * stream id and header is: 8 bytes at a time, the last word overlapping
 * the one before. ASCII bytes are whole characters, so the full check can
 * start at the first word that is not plain ASCII. */
static CODEC_HOT_INLINE bool
codec_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i;

    if (n < 8) {
        for (i = 0; i < n; i++)
            if ((unsigned)s[i] - 1u >= 0x7fu) /* NUL or not ASCII */
                return bus__utf8_valid((const char *)s + i, n - i);
        return true;
    }
    for (i = 0; i + 8 <= n; i += 8)
        if (!codec_ascii8(s + i))
            return bus__utf8_valid((const char *)s + i, n - i);
    return i == n || codec_ascii8(s + n - 8)
        || bus__utf8_valid((const char *)s + i, n - i);
}

/* A string field: str, at most max_string bytes, valid UTF-8 without NUL,
 * non-empty unless allow_empty. */
static CODEC_HOT_INLINE const uint8_t *
codec_string(codec_dec *d, const uint8_t *p, bool allow_empty,
             const char *what, bus__str *out)
{
    const uint8_t *s, *next;
    size_t n;

    next = codec_blob(d, p, false, d->lim.max_string, what, &s, &n);
    if (next == NULL)
        return NULL;
    if (n == 0 && !allow_empty)
        return codec_fail(d, BUS_EPROTO, p, "%sempty string", what);
    if (!codec_utf8_valid(s, n))
        return codec_fail(d, BUS_EPROTO, p, "%sinvalid UTF-8 or NUL byte",
                          what);
    out->p = (const char *)s;
    out->len = n;
    return next;
}

static CODEC_COLD const uint8_t *
codec_uint_slow(codec_dec *d, const uint8_t *p, uint64_t *v)
{
    mp_reader r = codec_reader(d, p);

    if (mp_read_uint(&r, v) != BUS_OK)
        return codec_fail_type(d, p, "unsigned integer");
    return r.p;
}

/* Inline: positive fixint and uint8..uint64 (versions and positions
 * above 127 come as those); the rest, and truncation, go slow. */
static CODEC_HOT_INLINE const uint8_t *
codec_uint(codec_dec *d, const uint8_t *p, uint64_t *v)
{
    size_t left = (size_t)(d->end - p);

    if (left >= 1 && *p <= 0x7f) {
        *v = *p;
        return p + 1;
    }
    if (left >= 9) {
        switch (*p) {
        case 0xcc:
            *v = p[1];
            return p + 2;
        case 0xcd:
            *v = mp_rd16(p + 1);
            return p + 3;
        case 0xce:
            *v = mp_rd32(p + 1);
            return p + 5;
        case 0xcf:
            *v = mp_rd64(p + 1);
            return p + 9;
        default:
            break;
        }
    }
    return codec_uint_slow(d, p, v);
}

static CODEC_COLD const uint8_t *
codec_int_slow(codec_dec *d, const uint8_t *p, int64_t *v)
{
    mp_reader r = codec_reader(d, p);

    if (mp_read_int(&r, v) != BUS_OK)
        return codec_fail_type(d, p, "64-bit signed integer");
    return r.p;
}

/* Inline: uint64 and int64, how present-day nanosecond timestamps come. */
static CODEC_HOT_INLINE const uint8_t *
codec_int(codec_dec *d, const uint8_t *p, int64_t *v)
{
    if (d->end - p >= 9 && (p[0] == 0xd3 || (p[0] == 0xcf && p[1] < 0x80))) {
        *v = (int64_t)mp_rd64(p + 1);
        return p + 9;
    }
    return codec_int_slow(d, p, v);
}

/* Orders header keys by length, then bytes: only equality matters (to find
 * duplicates), so the cheap length test goes first. */
static int
codec_key_cmp(const void *a, const void *b)
{
    const bus__str *x = *(const bus__str *const *)a;
    const bus__str *y = *(const bus__str *const *)b;

    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return memcmp(x->p, y->p, x->len);
}

/* True when two header keys are equal. Few headers: compare every pair (at
 * most 120 length checks). Many: sort pointers (in the temporary block) so
 * that a hostile frame with thousands of keys stays O(n log n). */
static bool
codec_headers_dup(codec_fields *f, size_t *dup)
{
    size_t n = f->n_headers, i, j;
    const bus__str **idx;

    if (f->hk == f->hk_small) {
        for (i = 1; i < n; i++)
            for (j = 0; j < i; j++)
                if (f->hk[i].len == f->hk[j].len
                    && memcmp(f->hk[i].p, f->hk[j].p, f->hk[i].len) == 0) {
                    *dup = i;
                    return true;
                }
        return false;
    }
    idx = (const bus__str **)(void *)(f->hv + n);
    for (i = 0; i < n; i++)
        idx[i] = &f->hk[i];
    qsort(idx, n, sizeof(*idx), codec_key_cmp);
    for (i = 1; i < n; i++)
        if (codec_key_cmp(&idx[i - 1], &idx[i]) == 0) {
            *dup = (size_t)(idx[i] - f->hk);
            return true;
        }
    return false;
}

static void
codec_fields_release(codec_fields *f)
{
    if (f->tmp_size != 0) {
        bus__free(f->hk, f->tmp_size);
        f->tmp_size = 0;
        f->hk = f->hv = NULL;
    }
}

/* "h": a map of non-empty str keys (unique) to str values. */
static const uint8_t *
codec_headers(codec_dec *d, const uint8_t *p, codec_fields *f)
{
    const uint8_t *at = p;
    size_t left = (size_t)(d->end - p), n, hdr, i, dup;
    uint8_t c;

    if (left == 0 || (c = p[0], (c & 0xf0) != 0x80 && c != 0xde && c != 0xdf))
        return codec_fail_type(d, p, "map");
    /* The count is parsed here: the limit must be checked before the bytes
     * left (mp_read_map checks only the latter). */
    hdr = c <= 0x8f ? 1 : c == 0xde ? 3 : 5;
    if (left < hdr)
        return codec_fail(d, BUS_EPROTO, p, "truncated map header");
    n = hdr == 1 ? (size_t)(c & 0x0fu) : hdr == 3 ? mp_rd16(p + 1)
                                                  : mp_rd32(p + 1);
    if (n > d->lim.max_headers)
        return codec_fail(d, BUS_ETOOBIG, p,
                          "%zu headers exceed the limit of %zu", n,
                          d->lim.max_headers);
    if (n > (left - hdr) / 2) /* a key and a value: at least 2 bytes */
        return codec_fail(d, BUS_EPROTO, p,
                          "%zu headers declared, %zu bytes left", n,
                          left - hdr);
    p += hdr;
    if (n > CODEC_STACK_HEADERS) {
        /* Keys, values, and the pointers codec_headers_dup sorts. */
        size_t size = n * (2 * sizeof(bus__str) + sizeof(bus__str *));
        if ((f->hk = bus__alloc(size)) == NULL) {
            f->hk = f->hk_small;
            return codec_fail(d, BUS_ENOMEM, at, "out of memory");
        }
        f->tmp_size = size;
        f->hv = f->hk + n;
    }
    for (i = 0; i < n; i++) {
        if ((p = codec_string(d, p, false, "header key: ", &f->hk[i]))
            == NULL)
            return NULL;
        if ((p = codec_string(d, p, true, "header value: ", &f->hv[i]))
            == NULL)
            return NULL;
    }
    f->n_headers = n;
    if (n > 1 && codec_headers_dup(f, &dup))
        return codec_fail(d, BUS_EPROTO, at, "duplicate header key \"%.*s\"",
                          (int)(f->hk[dup].len > 64 ? 64 : f->hk[dup].len),
                          f->hk[dup].p);
    return p;
}

/* Maps a key to its K_* bit; 0 for an unknown key. Keys are compared as
 * bytes: a switch on the length first keeps this to one or two compares. */
static CODEC_HOT_INLINE unsigned
codec_key_bit(const uint8_t *k, size_t n)
{
    switch (n) {
    case 1:
        return k[0] == 'v' ? K_V : k[0] == 'p' ? K_P : k[0] == 'h' ? K_H : 0;
    case 2:
        if (k[0] == 'i' && k[1] == 'd')
            return K_ID;
        if (k[0] == 't' && k[1] == 's')
            return K_TS;
        return k[0] == 's' && k[1] == 'v' ? K_SV : 0;
    case 3:
        return memcmp(k, "pos", 3) == 0 ? K_POS : 0;
    case 4:
        if (memcmp(k, "type", 4) == 0)
            return K_TYPE;
        return memcmp(k, "sver", 4) == 0 ? K_SVER : 0;
    case 6:
        return memcmp(k, "stream", 6) == 0 ? K_STREAM : 0;
    default:
        return 0;
    }
}

/* A map key of any str encoding, or an error. */
static CODEC_COLD const uint8_t *
codec_key_slow(codec_dec *d, const uint8_t *p, size_t i, const uint8_t **k,
               size_t *klen)
{
    mp_reader r = codec_reader(d, p);
    const char *s;

    if (mp_read_str(&r, &s, klen) == BUS_OK) {
        *k = (const uint8_t *)s;
        return r.p;
    }
    if (mp_peek(&r) == MP_STR)
        return codec_fail(d, BUS_EPROTO, p, "map key %zu: truncated", i);
    return codec_fail(d, BUS_EPROTO, p, "map key %zu: expected str, got %s",
                      i, mp_type_name(mp_peek(&r)));
}

/* Decodes the value of one known key (bit) into f. */
static CODEC_HOT_INLINE const uint8_t *
codec_value(codec_dec *d, const uint8_t *p, codec_fields *f, unsigned bit)
{
    const uint8_t *next;
    uint64_t u;
    size_t n;

    switch (bit) {
    case K_V:
        if ((next = codec_uint(d, p, &u)) == NULL)
            return NULL;
        /* Checked at once: a newer frame may follow rules this reader does
         * not know, so nothing after "v" should be judged by ours. */
        if (u == BUS_WIRE_VERSION)
            return next;
        if (u == 0)
            return codec_fail(d, BUS_EPROTO, p, "version 0 is invalid");
        return codec_fail(d, BUS_EVERSION, p,
                          "version %llu is newer than %d",
                          (unsigned long long)u, BUS_WIRE_VERSION);
    case K_ID:
        /* No limit: any length but 16 is a malformed id, not a big one. */
        if ((next = codec_blob(d, p, true, SIZE_MAX, "", &f->id, &n)) == NULL)
            return NULL;
        if (n != sizeof(bus_uuid))
            return codec_fail(d, BUS_EPROTO, p, "id is %zu bytes, not 16",
                              n);
        return next;
    case K_TYPE:
        return codec_string(d, p, false, "", &f->type);
    case K_SV:
        if ((next = codec_uint(d, p, &f->sv)) == NULL)
            return NULL;
        if (f->sv == 0 || f->sv > UINT32_MAX)
            return codec_fail(d, BUS_EPROTO, p,
                              "schema version %llu is not in 1..2^32-1",
                              (unsigned long long)f->sv);
        return next;
    case K_STREAM:
        return codec_string(d, p, true, "", &f->stream);
    case K_SVER:
        return codec_uint(d, p, &f->sver);
    case K_POS:
        return codec_uint(d, p, &f->pos);
    case K_TS:
        return codec_int(d, p, &f->ts);
    case K_H:
        return codec_headers(d, p, f);
    default: /* K_P */
        return codec_blob(d, p, true, d->lim.max_payload, "", &f->payload,
                          &f->payload_len);
    }
}

/* One pass over the frame into f. Returns BUS_OK or the error. On failure
 * f may hold a temporary block: the caller releases it in every case. */
static int
codec_parse(codec_dec *d, codec_fields *f)
{
    static const char *const names[] = {
        "v", "id", "type", "sv", "stream", "sver", "pos", "ts", "h", "p",
    };
    const uint8_t *p = d->start, *end = d->end, *k;
    size_t n, i, klen, len = (size_t)(end - p);
    unsigned bit;

    if (len > d->lim.max_frame) {
        codec_fail(d, BUS_ETOOBIG, p,
                   "%zu bytes exceed the frame limit of %zu", len,
                   d->lim.max_frame);
        return d->rv;
    }
    if (len > 0 && (p[0] & 0xf0) == 0x80) { /* fixmap: always, from us */
        n = p[0] & 0x0fu;
        p++;
    } else {
        mp_reader r = codec_reader(d, p);
        if (mp_peek(&r) != MP_MAP) {
            codec_fail_type(d, p, "a map at the top level");
            return d->rv;
        }
        if (mp_read_map(&r, &n) != BUS_OK) {
            codec_fail(d, BUS_EPROTO, p,
                       "map declares more entries than the bytes left");
            return d->rv;
        }
        p = r.p;
    }
    if (n > (size_t)(end - p) / 2) {
        codec_fail(d, BUS_EPROTO, d->start,
                   "map declares more entries than the bytes left");
        return d->rv;
    }
    for (i = 0; i < n; i++) {
        const uint8_t *kp = p;
        d->key = NULL;
        /* Map keys must be strings; fixstr is what every writer uses for
         * names this short. */
        if (p < end && (p[0] & 0xe0) == 0xa0
            && (size_t)(end - p) > (size_t)(p[0] & 0x1fu)) {
            klen = p[0] & 0x1fu;
            k = p + 1;
            p += 1 + klen;
        } else if ((p = codec_key_slow(d, p, i, &k, &klen)) == NULL) {
            return d->rv;
        }
        d->key = (const char *)k;
        d->key_len = klen;
        bit = codec_key_bit(k, klen);
        if (bit == 0) {
            /* Forward compatibility: newer writers may add keys. */
            mp_reader r = codec_reader(d, p);
            if (mp_skip(&r, d->lim.max_depth) != BUS_OK) {
                codec_fail(d, BUS_EPROTO, p,
                           "unknown key's value is malformed or nested "
                           "deeper than %zu",
                           d->lim.max_depth);
                return d->rv;
            }
            p = r.p;
            continue;
        }
        if (f->seen & bit) {
            codec_fail(d, BUS_EPROTO, kp, "duplicate key");
            return d->rv;
        }
        f->seen |= bit;
        if ((p = codec_value(d, p, f, bit)) == NULL)
            return d->rv;
    }
    d->key = NULL;
    if (p != end) {
        codec_fail(d, BUS_EPROTO, p, "%zu trailing bytes after the map",
                   (size_t)(end - p));
        return d->rv;
    }
    if ((f->seen & K_REQUIRED) != K_REQUIRED) {
        for (i = 0; !(K_REQUIRED & ~f->seen & (1u << i)); i++)
            ;
        codec_fail(d, BUS_EPROTO, end, "missing required key \"%s\"",
                   names[i]);
        return d->rv;
    }
    return BUS_OK;
}

/* The common body. adopt: the payload references buf instead of being
 * copied; free_fn (if any) is attached on success only, the caller runs it
 * on failure. */
static int
codec_decode(bus_event **out, const void *buf, size_t len, bool adopt,
             bus_free_fn free_fn, void *hint, const bus_codec_limits *limits,
             char *errbuf, size_t errbuf_len)
{
    codec_dec d;
    codec_fields f;
    bus__event_spec s;
    bus_uuid id;
    bus_event *e;
    int rv;

    *out = NULL;
    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
    if (buf == NULL)
        buf = ""; /* len is 0: a real pointer keeps the arithmetic defined */
    codec_limits_effective(&d.lim, limits);
    d.start = buf;
    d.end = d.start + len;
    d.errbuf = errbuf;
    d.errbuf_len = errbuf_len;
    d.key = NULL;
    d.key_len = 0;
    d.rv = BUS_OK;
    /* Not a memset: the stack header arrays need no clearing. */
    f.seen = 0;
    f.id = NULL;
    f.type.p = NULL;
    f.type.len = 0;
    f.ts = 0;
    f.payload = NULL;
    f.payload_len = 0;
    f.sv = 1;
    f.sver = 0;
    f.pos = 0;
    f.stream.p = NULL;
    f.stream.len = 0;
    f.n_headers = 0;
    f.tmp_size = 0;
    f.hk = f.hk_small;
    f.hv = f.hv_small;
    if ((rv = codec_parse(&d, &f)) != BUS_OK) {
        codec_fields_release(&f);
        return rv;
    }

    memcpy(id.b, f.id, sizeof(id.b));
    memset(&s, 0, sizeof(s));
    s.type = f.type;
    s.stream = f.stream;
    s.schema_version = (uint32_t)f.sv;
    s.stream_version = f.sver;
    s.position = f.pos;
    s.id = &id;
    s.timestamp = f.ts;
    s.hkeys = f.hk;
    s.hvals = f.hv;
    s.n_headers = f.n_headers;
    s.payload = f.payload;
    s.payload_len = f.payload_len;
    /* Spare room for the topic a receiving backend records before
     * delivering (bus__event_set_topic), so that costs no allocation. The
     * payload is never handed to the build with a free function: on
     * ENOMEM the caller frees the frame itself, once. */
    s.adopt_static = adopt;
    s.spare = CODEC_TOPIC_SPARE;
    rv = bus__event_build(&e, &s);
    codec_fields_release(&f);
    if (rv != BUS_OK) {
        codec_fail(&d, rv, d.start, "out of memory");
        return rv;
    }
    /* The build reads timestamp 0 as "now"; on the wire 0 is a value. */
    e->timestamp = f.ts;
    if (adopt && free_fn != NULL) {
        /* The event owns the whole frame: free_fn gets buf, not the
         * payload inside it (payload_owner, event_impl.h). */
        e->payload_free = free_fn;
        e->payload_hint = hint;
        e->payload_owner = (void *)buf;
    }
    /* Not frozen: the receiver owns the only reference and may record
     * the topic first; publishing freezes it. */
    *out = e;
    return BUS_OK;
}

int
bus_codec_decode(bus_event **out, const void *buf, size_t len,
                 const bus_codec_limits *limits, char *errbuf,
                 size_t errbuf_len)
{
    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (buf == NULL && len > 0)
        return BUS_EINVAL;
    return codec_decode(out, buf, len, false, NULL, NULL, limits, errbuf,
                        errbuf_len);
}

int
bus_codec_decode_adopt(bus_event **out, void *buf, size_t len,
                       bus_free_fn free_fn, void *hint,
                       const bus_codec_limits *limits, char *errbuf,
                       size_t errbuf_len)
{
    int rv;

    if (out == NULL || (buf == NULL && len > 0)) {
        if (out != NULL)
            *out = NULL;
        rv = BUS_EINVAL;
    } else {
        rv = codec_decode(out, buf, len, true, free_fn, hint, limits, errbuf,
                          errbuf_len);
    }
    if (rv != BUS_OK && free_fn != NULL)
        free_fn(buf, hint); /* codec.h: runs before return on failure */
    return rv;
}
