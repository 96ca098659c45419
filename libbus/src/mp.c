/*
 * Strict MessagePack reader (see mp.h for the design). Every function
 * checks the bytes it needs before reading them and leaves the cursor
 * unchanged on failure.
 */
#include <string.h>

#include "alloc.h"
#include "mp.h"

mp_type
mp_peek(const mp_reader *r)
{
    uint8_t c;

    if (r->p >= r->end)
        return MP_NONE;
    c = *r->p;
    if (c <= 0x7f)
        return MP_UINT;
    if (c <= 0x8f)
        return MP_MAP;
    if (c <= 0x9f)
        return MP_ARRAY;
    if (c <= 0xbf)
        return MP_STR;
    if (c >= 0xe0)
        return MP_NINT;
    switch (c) {
    case 0xc0: return MP_NIL;
    case 0xc2: case 0xc3: return MP_BOOL;
    case 0xc4: case 0xc5: case 0xc6: return MP_BIN;
    case 0xc7: case 0xc8: case 0xc9: return MP_EXT;
    case 0xca: case 0xcb: return MP_FLOAT;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: return MP_UINT;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3:
        return MP_NINT; /* refined by mp_read_int: may be >= 0 */
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return MP_EXT;
    case 0xd9: case 0xda: case 0xdb: return MP_STR;
    case 0xdc: case 0xdd: return MP_ARRAY;
    case 0xde: case 0xdf: return MP_MAP;
    default: return MP_INVALID; /* 0xc1 */
    }
}

const char *
mp_type_name(mp_type t)
{
    static const char *const names[] = {
        "end of data", "nil", "bool", "integer", "integer", "float",
        "str", "bin", "array", "map", "ext", "invalid byte 0xc1",
    };
    return (unsigned)t < sizeof(names) / sizeof(names[0]) ? names[t] : "?";
}

int
mp_read_nil(mp_reader *r)
{
    if (r->p >= r->end || *r->p != 0xc0)
        return BUS_EPROTO;
    r->p++;
    return BUS_OK;
}

int
mp_read_bool(mp_reader *r, bool *b)
{
    if (r->p >= r->end || (*r->p != 0xc2 && *r->p != 0xc3))
        return BUS_EPROTO;
    *b = *r->p == 0xc3;
    r->p++;
    return BUS_OK;
}

/* Reads any integer encoding as a sign flag and a magnitude-free pair:
 * *u for non-negative values, *i for negative ones. */
static int
mp_read_integer(mp_reader *r, bool *neg, uint64_t *u, int64_t *i)
{
    const uint8_t *p = r->p;
    size_t left = mp_left(r);
    size_t need;
    uint8_t c;

    if (left == 0)
        return BUS_EPROTO;
    c = p[0];
    *neg = false;
    if (c <= 0x7f) {
        *u = c;
        r->p += 1;
        return BUS_OK;
    }
    if (c >= 0xe0) {
        *neg = true;
        *i = (int8_t)c;
        r->p += 1;
        return BUS_OK;
    }
    switch (c) {
    case 0xcc: case 0xd0: need = 2; break;
    case 0xcd: case 0xd1: need = 3; break;
    case 0xce: case 0xd2: need = 5; break;
    case 0xcf: case 0xd3: need = 9; break;
    default: return BUS_EPROTO;
    }
    if (left < need)
        return BUS_EPROTO;
    switch (c) {
    case 0xcc: *u = p[1]; break;
    case 0xcd: *u = mp_rd16(p + 1); break;
    case 0xce: *u = mp_rd32(p + 1); break;
    case 0xcf: *u = mp_rd64(p + 1); break;
    case 0xd0: *i = (int8_t)p[1]; break;
    case 0xd1: *i = (int16_t)mp_rd16(p + 1); break;
    case 0xd2: *i = (int32_t)mp_rd32(p + 1); break;
    default: *i = (int64_t)mp_rd64(p + 1); break;
    }
    if (c >= 0xd0) { /* signed encodings may carry non-negative values */
        if (*i >= 0)
            *u = (uint64_t)*i;
        else
            *neg = true;
    }
    r->p += need;
    return BUS_OK;
}

int
mp_read_uint(mp_reader *r, uint64_t *v)
{
    mp_reader save = *r;
    bool neg;
    uint64_t u = 0;
    int64_t i = 0;

    if (mp_read_integer(r, &neg, &u, &i) != BUS_OK || neg) {
        *r = save;
        return BUS_EPROTO;
    }
    *v = u;
    return BUS_OK;
}

int
mp_read_int(mp_reader *r, int64_t *v)
{
    mp_reader save = *r;
    bool neg;
    uint64_t u = 0;
    int64_t i = 0;

    if (mp_read_integer(r, &neg, &u, &i) != BUS_OK
        || (!neg && u > (uint64_t)INT64_MAX)) {
        *r = save;
        return BUS_EPROTO;
    }
    *v = neg ? i : (int64_t)u;
    return BUS_OK;
}

int
mp_read_double(mp_reader *r, double *d)
{
    const uint8_t *p = r->p;
    size_t left = mp_left(r);
    bool neg;
    uint64_t u = 0;
    int64_t i = 0;

    if (left >= 5 && p[0] == 0xca) {
        uint32_t bits = mp_rd32(p + 1);
        float f;
        memcpy(&f, &bits, sizeof(f));
        *d = f;
        r->p += 5;
        return BUS_OK;
    }
    if (left >= 9 && p[0] == 0xcb) {
        uint64_t bits = mp_rd64(p + 1);
        memcpy(d, &bits, sizeof(*d));
        r->p += 9;
        return BUS_OK;
    }
    if (left >= 1 && (p[0] == 0xca || p[0] == 0xcb))
        return BUS_EPROTO; /* truncated float */
    if (mp_read_integer(r, &neg, &u, &i) != BUS_OK)
        return BUS_EPROTO;
    *d = neg ? (double)i : (double)u;
    return BUS_OK;
}

/* Reads a length-prefixed header: fix (mask) or 8/16/32-bit lengths at
 * codes c8, c16, c32. Checks the payload fits in what is left. */
static int
mp_read_len(mp_reader *r, uint8_t fixlo, uint8_t fixhi, uint8_t c8,
            uint8_t c16, uint8_t c32, size_t *len, size_t *hdr)
{
    const uint8_t *p = r->p;
    size_t left = mp_left(r);
    uint8_t c;

    if (left == 0)
        return BUS_EPROTO;
    c = p[0];
    if (fixhi != 0 && c >= fixlo && c <= fixhi) {
        *len = (size_t)(c - fixlo);
        *hdr = 1;
    } else if (c8 != 0 && c == c8) {
        if (left < 2)
            return BUS_EPROTO;
        *len = p[1];
        *hdr = 2;
    } else if (c == c16) {
        if (left < 3)
            return BUS_EPROTO;
        *len = mp_rd16(p + 1);
        *hdr = 3;
    } else if (c == c32) {
        if (left < 5)
            return BUS_EPROTO;
        *len = mp_rd32(p + 1);
        *hdr = 5;
    } else {
        return BUS_EPROTO;
    }
    return BUS_OK;
}

int
mp_read_str(mp_reader *r, const char **s, size_t *len)
{
    size_t n, hdr;

    if (mp_read_len(r, 0xa0, 0xbf, 0xd9, 0xda, 0xdb, &n, &hdr) != BUS_OK)
        return BUS_EPROTO;
    if (n > mp_left(r) - hdr)
        return BUS_EPROTO;
    *s = (const char *)r->p + hdr;
    *len = n;
    r->p += hdr + n;
    return BUS_OK;
}

int
mp_read_bin(mp_reader *r, const uint8_t **d, size_t *len)
{
    size_t n, hdr;

    if (mp_read_len(r, 0, 0, 0xc4, 0xc5, 0xc6, &n, &hdr) != BUS_OK)
        return BUS_EPROTO;
    if (n > mp_left(r) - hdr)
        return BUS_EPROTO;
    *d = r->p + hdr;
    *len = n;
    r->p += hdr + n;
    return BUS_OK;
}

int
mp_read_bytes(mp_reader *r, const uint8_t **d, size_t *len)
{
    const char *s;

    if (mp_peek(r) == MP_STR) {
        if (mp_read_str(r, &s, len) != BUS_OK)
            return BUS_EPROTO;
        *d = (const uint8_t *)s;
        return BUS_OK;
    }
    return mp_read_bin(r, d, len);
}

int
mp_read_map(mp_reader *r, size_t *n)
{
    size_t cnt, hdr;

    if (mp_read_len(r, 0x80, 0x8f, 0, 0xde, 0xdf, &cnt, &hdr) != BUS_OK)
        return BUS_EPROTO;
    /* Each key and each value takes at least one byte. */
    if (cnt > (mp_left(r) - hdr) / 2)
        return BUS_EPROTO;
    *n = cnt;
    r->p += hdr;
    return BUS_OK;
}

int
mp_read_array(mp_reader *r, size_t *n)
{
    size_t cnt, hdr;

    if (mp_read_len(r, 0x90, 0x9f, 0, 0xdc, 0xdd, &cnt, &hdr) != BUS_OK)
        return BUS_EPROTO;
    if (cnt > mp_left(r) - hdr)
        return BUS_EPROTO;
    *n = cnt;
    r->p += hdr;
    return BUS_OK;
}

static int
mp_skip_n(mp_reader *r, size_t n)
{
    if (mp_left(r) < n)
        return BUS_EPROTO;
    r->p += n;
    return BUS_OK;
}

static int
mp_skip_rec(mp_reader *r, size_t depth)
{
    const uint8_t *d;
    const char *s;
    size_t n, len, i;
    uint8_t c;
    bool b;
    double f;

    switch (mp_peek(r)) {
    case MP_NIL: return mp_read_nil(r);
    case MP_BOOL: return mp_read_bool(r, &b);
    case MP_UINT:
    case MP_NINT: {
        bool neg;
        uint64_t u;
        int64_t iv;
        return mp_read_integer(r, &neg, &u, &iv);
    }
    case MP_FLOAT: return mp_read_double(r, &f);
    case MP_STR: return mp_read_str(r, &s, &len);
    case MP_BIN: return mp_read_bin(r, &d, &len);
    case MP_EXT:
        c = *r->p;
        switch (c) {
        case 0xd4: return mp_skip_n(r, 3);
        case 0xd5: return mp_skip_n(r, 4);
        case 0xd6: return mp_skip_n(r, 6);
        case 0xd7: return mp_skip_n(r, 10);
        case 0xd8: return mp_skip_n(r, 18);
        default:
            if (mp_read_len(r, 0, 0, 0xc7, 0xc8, 0xc9, &len, &n) != BUS_OK)
                return BUS_EPROTO;
            if (len > mp_left(r) - n || mp_left(r) - n - len < 1)
                return BUS_EPROTO; /* +1: the ext type byte */
            r->p += n + 1 + len;
            return BUS_OK;
        }
    case MP_ARRAY:
        if (depth == 0)
            return BUS_EPROTO;
        if (mp_read_array(r, &n) != BUS_OK)
            return BUS_EPROTO;
        for (i = 0; i < n; i++)
            if (mp_skip_rec(r, depth - 1) != BUS_OK)
                return BUS_EPROTO;
        return BUS_OK;
    case MP_MAP:
        if (depth == 0)
            return BUS_EPROTO;
        if (mp_read_map(r, &n) != BUS_OK)
            return BUS_EPROTO;
        for (i = 0; i < 2 * n; i++)
            if (mp_skip_rec(r, depth - 1) != BUS_OK)
                return BUS_EPROTO;
        return BUS_OK;
    default:
        return BUS_EPROTO;
    }
}

int
mp_skip(mp_reader *r, size_t max_depth)
{
    mp_reader save = *r;

    if (mp_skip_rec(r, max_depth) != BUS_OK) {
        *r = save;
        return BUS_EPROTO;
    }
    return BUS_OK;
}

uint8_t *
mp_buf_reserve(mp_buf *b, size_t n)
{
    size_t ncap;
    uint8_t *nd;

    if (b->err != BUS_OK)
        return NULL;
    if (b->cap - b->len >= n)
        return b->data + b->len;
    ncap = b->cap ? b->cap : 128;
    while (ncap - b->len < n) {
        if (ncap > SIZE_MAX / 2) {
            b->err = BUS_ENOMEM;
            return NULL;
        }
        ncap *= 2;
    }
    nd = bus__realloc(b->data, b->cap, ncap);
    if (nd == NULL) {
        b->err = BUS_ENOMEM;
        return NULL;
    }
    b->data = nd;
    b->cap = ncap;
    return b->data + b->len;
}

void
mp_buf_free(mp_buf *b)
{
    bus__free(b->data, b->cap);
    b->data = NULL;
    b->len = b->cap = 0;
}

bool
bus__utf8_valid(const char *str, size_t len)
{
    const uint8_t *s = (const uint8_t *)str;
    size_t i = 0;

    while (i < len) {
        uint8_t c = s[i];
        uint32_t cp;
        size_t n, k;

        if (c < 0x80) {
            if (c == 0)
                return false;
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (len - i <= n)
            return false;
        for (k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000)
            || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += n + 1;
    }
    return true;
}
