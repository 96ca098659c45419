/*
 * Typed events: round trips of every kind, decode rules and the errors that
 * name field paths, validation, the registry and upcasting, random and
 * mutated payloads, allocation faults, and events built from structs.
 *
 * Objects for property tests are generated from the same bus_type tables
 * the codec uses, and compared by a table-driven comparison written here
 * independently of type.c, so a bug in the codec cannot hide in both.
 * msgpack-c plays "another language" for the interoperability checks.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "mp.h"
#include "test_support.h"
#include "testing.h"

/* ---- Test types ---------------------------------------------------------- */

typedef struct leaf {
    uint16_t code;
    bus_bytes blob;
} leaf;

typedef struct inner {
    char *label;
    int32_t n;
    bus_array tags; /* char * */
    leaf leaf;
} inner;

typedef struct all_kinds {
    bool b;
    int8_t i8;
    int16_t i16;
    int32_t i32;
    int64_t i64;
    uint8_t u8;
    uint16_t u16;
    uint32_t u32;
    uint64_t u64;
    float f32;
    double f64;
    char *s;             /* required */
    char *s_opt;
    bus_bytes bytes;     /* required */
    bus_bytes bytes_opt;
    inner nested;
    bus_array a_bool, a_i8, a_i16, a_i32, a_i64, a_u8, a_u16, a_u32, a_u64;
    bus_array a_f32, a_f64, a_str, a_bytes, a_inner;
} all_kinds;

static const bus_field leaf_fields[] = {
    BUS_FIELD(leaf, code, BUS_KIND_U16, BUS_REQUIRED),
    BUS_FIELD(leaf, blob, BUS_KIND_BYTES, 0),
};
static const bus_type leaf_type = BUS_TYPE("test.leaf", 1, leaf, leaf_fields);

static const bus_field inner_fields[] = {
    BUS_FIELD(inner, label, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(inner, n, BUS_KIND_I32, 0),
    BUS_FIELD_ARRAY(inner, tags, BUS_KIND_STRING, 0),
    BUS_FIELD_STRUCT(inner, leaf, &leaf_type, 0),
};
static const bus_type inner_type =
    BUS_TYPE("test.inner", 1, inner, inner_fields);

static const bus_field all_fields[] = {
    BUS_FIELD(all_kinds, b, BUS_KIND_BOOL, 0),
    BUS_FIELD(all_kinds, i8, BUS_KIND_I8, 0),
    BUS_FIELD(all_kinds, i16, BUS_KIND_I16, 0),
    BUS_FIELD(all_kinds, i32, BUS_KIND_I32, 0),
    BUS_FIELD(all_kinds, i64, BUS_KIND_I64, BUS_REQUIRED),
    BUS_FIELD(all_kinds, u8, BUS_KIND_U8, 0),
    BUS_FIELD(all_kinds, u16, BUS_KIND_U16, 0),
    BUS_FIELD(all_kinds, u32, BUS_KIND_U32, 0),
    BUS_FIELD(all_kinds, u64, BUS_KIND_U64, 0),
    BUS_FIELD(all_kinds, f32, BUS_KIND_F32, 0),
    BUS_FIELD(all_kinds, f64, BUS_KIND_F64, 0),
    BUS_FIELD(all_kinds, s, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(all_kinds, s_opt, BUS_KIND_STRING, 0),
    BUS_FIELD(all_kinds, bytes, BUS_KIND_BYTES, BUS_REQUIRED),
    BUS_FIELD(all_kinds, bytes_opt, BUS_KIND_BYTES, 0),
    BUS_FIELD_STRUCT(all_kinds, nested, &inner_type, BUS_REQUIRED),
    BUS_FIELD_ARRAY(all_kinds, a_bool, BUS_KIND_BOOL, 0),
    BUS_FIELD_ARRAY(all_kinds, a_i8, BUS_KIND_I8, 0),
    BUS_FIELD_ARRAY(all_kinds, a_i16, BUS_KIND_I16, 0),
    BUS_FIELD_ARRAY(all_kinds, a_i32, BUS_KIND_I32, 0),
    BUS_FIELD_ARRAY(all_kinds, a_i64, BUS_KIND_I64, 0),
    BUS_FIELD_ARRAY(all_kinds, a_u8, BUS_KIND_U8, 0),
    BUS_FIELD_ARRAY(all_kinds, a_u16, BUS_KIND_U16, 0),
    BUS_FIELD_ARRAY(all_kinds, a_u32, BUS_KIND_U32, 0),
    BUS_FIELD_ARRAY(all_kinds, a_u64, BUS_KIND_U64, 0),
    BUS_FIELD_ARRAY(all_kinds, a_f32, BUS_KIND_F32, 0),
    BUS_FIELD_ARRAY(all_kinds, a_f64, BUS_KIND_F64, 0),
    BUS_FIELD_ARRAY(all_kinds, a_str, BUS_KIND_STRING, 0),
    BUS_FIELD_ARRAY(all_kinds, a_bytes, BUS_KIND_BYTES, 0),
    BUS_FIELD_ARRAY_OF_STRUCT(all_kinds, a_inner, &inner_type, 0),
};
static const bus_type all_type =
    BUS_TYPE("test.all", 1, all_kinds, all_fields);

/* The header's example, for error paths. */
typedef struct order_line {
    char *sku;
    uint8_t qty;
    int64_t price;
} order_line;

typedef struct order {
    char *order_id;
    int64_t amount;
    bus_array lines; /* order_line */
    bool gift;
} order;

static const bus_field order_line_fields[] = {
    BUS_FIELD(order_line, sku, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order_line, qty, BUS_KIND_U8, BUS_REQUIRED),
    BUS_FIELD(order_line, price, BUS_KIND_I64, 0),
};
static const bus_type order_line_type =
    BUS_TYPE("orders.line", 1, order_line, order_line_fields);

static const bus_field order_fields[] = {
    BUS_FIELD(order, order_id, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order, amount, BUS_KIND_I64, BUS_REQUIRED),
    BUS_FIELD_ARRAY_OF_STRUCT(order, lines, &order_line_type, 0),
    BUS_FIELD(order, gift, BUS_KIND_BOOL, 0),
};
static const bus_type order_type =
    BUS_TYPE("orders.placed", 2, order, order_fields);

/* ---- Helpers: memory, comparison, generation ----------------------------- */

/* Test-side allocations for generated objects, freed together. */
typedef struct arena {
    void **p;
    size_t n, cap;
} arena;

static void *
ar_alloc(arena *a, size_t n)
{
    void *m;

    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->p = realloc(a->p, a->cap * sizeof(*a->p));
        assert_non_null(a->p);
    }
    m = calloc(1, n ? n : 1);
    assert_non_null(m);
    a->p[a->n++] = m;
    return m;
}

static void
ar_free(arena *a)
{
    size_t i;

    for (i = 0; i < a->n; i++)
        free(a->p[i]);
    free(a->p);
    memset(a, 0, sizeof(*a));
}

static size_t
kind_size(bus_kind k, const bus_type *nt)
{
    switch (k) {
    case BUS_KIND_BOOL: return sizeof(bool);
    case BUS_KIND_I8: case BUS_KIND_U8: return 1;
    case BUS_KIND_I16: case BUS_KIND_U16: return 2;
    case BUS_KIND_I32: case BUS_KIND_U32: case BUS_KIND_F32: return 4;
    case BUS_KIND_I64: case BUS_KIND_U64: case BUS_KIND_F64: return 8;
    case BUS_KIND_STRING: return sizeof(char *);
    case BUS_KIND_BYTES: return sizeof(bus_bytes);
    case BUS_KIND_STRUCT: return nt->size;
    default: return sizeof(bus_array);
    }
}

static bool struct_eq(const bus_type *t, const void *a, const void *b);

/* Floats compare by bits (so -0.0 differs from 0.0), NaN equals NaN. */
static bool
val_eq(bus_kind k, bus_kind elem, const bus_type *nt, const void *a,
       const void *b)
{
    switch (k) {
    case BUS_KIND_BOOL:
        return *(const bool *)a == *(const bool *)b;
    case BUS_KIND_F32: {
        float x = *(const float *)a, y = *(const float *)b;
        return (isnan(x) && isnan(y)) || memcmp(&x, &y, sizeof(x)) == 0;
    }
    case BUS_KIND_F64: {
        double x = *(const double *)a, y = *(const double *)b;
        return (isnan(x) && isnan(y)) || memcmp(&x, &y, sizeof(x)) == 0;
    }
    case BUS_KIND_STRING: {
        const char *x = *(char *const *)a, *y = *(char *const *)b;
        if (x == NULL || y == NULL)
            return x == y;
        return strcmp(x, y) == 0;
    }
    case BUS_KIND_BYTES: {
        const bus_bytes *x = a, *y = b;
        return x->len == y->len
            && (x->len == 0 || memcmp(x->data, y->data, x->len) == 0);
    }
    case BUS_KIND_STRUCT:
        return struct_eq(nt, a, b);
    case BUS_KIND_ARRAY: {
        const bus_array *x = a, *y = b;
        size_t i, esz = kind_size(elem, nt);
        if (x->count != y->count)
            return false;
        for (i = 0; i < x->count; i++)
            if (!val_eq(elem, (bus_kind)0, nt,
                        (const char *)x->items + i * esz,
                        (const char *)y->items + i * esz))
                return false;
        return true;
    }
    default:
        return memcmp(a, b, kind_size(k, nt)) == 0;
    }
}

static bool
struct_eq(const bus_type *t, const void *a, const void *b)
{
    size_t i;

    for (i = 0; i < t->n_fields; i++) {
        const bus_field *f = &t->fields[i];
        if (!val_eq(f->kind, f->elem, f->type, (const char *)a + f->offset,
                    (const char *)b + f->offset)) {
            print_message("field %s.%s differs\n", t->name, f->name);
            return false;
        }
    }
    return true;
}

static uint64_t rng;

static uint64_t
rnd(uint64_t n)
{
    return n ? bt_rand(&rng) % n : bt_rand(&rng);
}

/* Often an edge value, sometimes anything in range. */
static int64_t
pick_i(int64_t lo, int64_t hi)
{
    switch (rnd(6)) {
    case 0: return 0;
    case 1: return lo;
    case 2: return hi;
    case 3: return -1;
    case 4: return (int64_t)rnd(128) - (lo < 0 ? 64 : 0);
    default:
        if (lo == INT64_MIN && hi == INT64_MAX)
            return (int64_t)rnd(0);
        return lo + (int64_t)(rnd(0) % (uint64_t)(hi - lo + 1));
    }
}

static uint64_t
pick_u(uint64_t hi)
{
    switch (rnd(5)) {
    case 0: return 0;
    case 1: return hi;
    case 2: return rnd(200);
    default: return hi == UINT64_MAX ? rnd(0) : rnd(0) % (hi + 1);
    }
}

static double
pick_f64(void)
{
    static const double special[] = {
        0.0, -0.0, 1.5, -2.25, DBL_MAX, -DBL_MAX, DBL_MIN, 4.9e-324,
    };
    uint64_t bits;
    double d;

    switch (rnd(4)) {
    case 0: return special[rnd(sizeof(special) / sizeof(special[0]))];
    case 1: return rnd(2) ? INFINITY : rnd(2) ? -INFINITY : NAN;
    default:
        bits = rnd(0);
        memcpy(&d, &bits, sizeof(d));
        return isnan(d) ? NAN : d; /* NaN payloads are not our business */
    }
}

static float
pick_f32(void)
{
    uint32_t bits;
    float f;

    switch (rnd(4)) {
    case 0: return rnd(2) ? FLT_MAX : -FLT_MIN;
    case 1: return rnd(2) ? INFINITY : NAN;
    default:
        bits = (uint32_t)rnd(0);
        memcpy(&f, &bits, sizeof(f));
        return isnan(f) ? NAN : f;
    }
}

/* Valid UTF-8 with 1- to 4-byte sequences. */
static char *
gen_str(arena *a)
{
    static const char *const pieces[] = {
        "a", "Z", "0", " ", "-", "\xc3\xa9", "\xe2\x82\xac",
        "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\x7f",
    };
    size_t n = rnd(40) == 0 ? 300 : rnd(4) == 0 ? 0 : rnd(30), i;
    char *s = ar_alloc(a, 4 * n + 1);

    for (i = 0; i < n; i++)
        strcat(s, pieces[rnd(sizeof(pieces) / sizeof(pieces[0]))]);
    return s;
}

static void gen_struct(arena *a, const bus_type *t, void *obj);

static void
gen_val(arena *a, bus_kind k, bus_kind elem, const bus_type *nt, void *dst,
        bool required, bool in_array)
{
    switch (k) {
    case BUS_KIND_BOOL: *(bool *)dst = rnd(2); break;
    case BUS_KIND_I8: *(int8_t *)dst = (int8_t)pick_i(INT8_MIN, INT8_MAX);
        break;
    case BUS_KIND_I16:
        *(int16_t *)dst = (int16_t)pick_i(INT16_MIN, INT16_MAX);
        break;
    case BUS_KIND_I32:
        *(int32_t *)dst = (int32_t)pick_i(INT32_MIN, INT32_MAX);
        break;
    case BUS_KIND_I64: *(int64_t *)dst = pick_i(INT64_MIN, INT64_MAX);
        break;
    case BUS_KIND_U8: *(uint8_t *)dst = (uint8_t)pick_u(UINT8_MAX); break;
    case BUS_KIND_U16: *(uint16_t *)dst = (uint16_t)pick_u(UINT16_MAX);
        break;
    case BUS_KIND_U32: *(uint32_t *)dst = (uint32_t)pick_u(UINT32_MAX);
        break;
    case BUS_KIND_U64: *(uint64_t *)dst = pick_u(UINT64_MAX); break;
    case BUS_KIND_F32: *(float *)dst = pick_f32(); break;
    case BUS_KIND_F64: *(double *)dst = pick_f64(); break;
    case BUS_KIND_STRING:
        *(char **)dst = !required && rnd(in_array ? 10 : 5) == 0
                      ? NULL : gen_str(a);
        break;
    case BUS_KIND_BYTES: {
        bus_bytes *b = dst;
        size_t i, n = rnd(60) == 0 ? 70000 : rnd(3) == 0 ? 0 : rnd(120);
        uint8_t *d = ar_alloc(a, n);
        for (i = 0; i < n; i++)
            d[i] = (uint8_t)rnd(256);
        b->data = d;
        b->len = n;
        break;
    }
    case BUS_KIND_STRUCT: gen_struct(a, nt, dst); break;
    case BUS_KIND_ARRAY: {
        bus_array *arr = dst;
        size_t i, esz = kind_size(elem, nt);
        arr->count = rnd(20) == 0 ? 20 : rnd(5) == 0 ? 0 : rnd(5);
        arr->items = ar_alloc(a, arr->count * esz);
        for (i = 0; i < arr->count; i++)
            gen_val(a, elem, (bus_kind)0, nt,
                    (char *)arr->items + i * esz, false, true);
        break;
    }
    default: fail();
    }
}

static void
gen_struct(arena *a, const bus_type *t, void *obj)
{
    size_t i;

    for (i = 0; i < t->n_fields; i++) {
        const bus_field *f = &t->fields[i];
        gen_val(a, f->kind, f->elem, f->type, (char *)obj + f->offset,
                f->flags & BUS_REQUIRED, false);
    }
}

/* Encode, decode, compare; the decoded object re-encodes to the same
 * bytes (the encoding is canonical). Returns the decoded object. */
static void *
round_trip(const bus_type *t, const void *obj)
{
    char err[256];
    void *buf, *buf2, *back;
    size_t len, len2;

    assert_int_equal(bus_type_encode(t, obj, &buf, &len, err, sizeof(err)),
                     BUS_OK);
    if (bus_type_decode(t, buf, len, &back, err, sizeof(err)) != BUS_OK)
        fail_msg("decode: %s", err);
    assert_true(struct_eq(t, obj, back));
    assert_int_equal(bus_type_encode(t, back, &buf2, &len2, err,
                                     sizeof(err)),
                     BUS_OK);
    assert_int_equal(len2, len);
    assert_memory_equal(buf2, buf, len);
    bus_codec_buf_free(buf, len);
    bus_codec_buf_free(buf2, len2);
    return back;
}

/* Payloads written by hand. */
typedef struct wbuf {
    uint8_t b[4096];
    uint8_t *p;
} wbuf;

static void
w_init(wbuf *w)
{
    w->p = w->b;
}

static size_t
w_len(const wbuf *w)
{
    return (size_t)(w->p - w->b);
}

static void
w_str(wbuf *w, const char *s)
{
    w->p = mp_put_str(w->p, s, strlen(s));
}

static void
w_map(wbuf *w, size_t n)
{
    w->p = mp_put_map(w->p, n);
}

static void
w_arr(wbuf *w, size_t n)
{
    w->p = mp_put_array(w->p, n);
}

static void
w_int(wbuf *w, int64_t v)
{
    w->p = mp_put_int(w->p, v);
}

static void
w_uint(wbuf *w, uint64_t v)
{
    w->p = mp_put_uint(w->p, v);
}

/* Decodes w as t, expecting rv and (when msg is set) that errbuf. */
static void
expect_decode(const bus_type *t, const wbuf *w, int rv, const char *msg)
{
    char err[256] = "unset";
    void *obj = (void *)1;

    assert_int_equal(bus_type_decode(t, w->b, w_len(w), &obj, err,
                                     sizeof(err)),
                     rv);
    if (rv != BUS_OK) {
        assert_null(obj);
        if (msg != NULL)
            assert_string_equal(err, msg);
    }
    bus_type_free(obj);
}

/* A valid order line map. */
static void
w_line(wbuf *w, const char *sku, int64_t qty)
{
    w_map(w, 2);
    w_str(w, "sku");
    w_str(w, sku);
    w_str(w, "qty");
    w_int(w, qty);
}

/* ---- Round trips --------------------------------------------------------- */

static void
fill_extremes(all_kinds *o, bool max, arena *a)
{
    static bool bools[] = {true, false};
    static int8_t i8s[] = {INT8_MIN, INT8_MAX, 0, -1};
    static int16_t i16s[] = {INT16_MIN, INT16_MAX};
    static int32_t i32s[] = {INT32_MIN, INT32_MAX};
    static int64_t i64s[] = {INT64_MIN, INT64_MAX, -33, -32, 127, 128};
    static uint8_t u8s[] = {0, UINT8_MAX};
    static uint16_t u16s[] = {0, UINT16_MAX};
    static uint32_t u32s[] = {0, UINT32_MAX};
    static uint64_t u64s[] = {0, UINT64_MAX, 65535, 65536};
    static float f32s[] = {FLT_MAX, -FLT_MAX, FLT_MIN, 0.5f};
    static double f64s[] = {DBL_MAX, -DBL_MAX, DBL_MIN, 4.9e-324};
    static char *strs[] = {"", "x", NULL, "\xf0\x9f\x98\x80"};
    static const uint8_t raw[] = {0, 1, 2, 255};
    static bus_bytes bys[] = {{NULL, 0}, {raw, 4}};
    static char *tags[] = {"t1", "", NULL};
    inner *in = ar_alloc(a, 2 * sizeof(inner));

    memset(o, 0, sizeof(*o));
    o->b = max;
    o->i8 = max ? INT8_MAX : INT8_MIN;
    o->i16 = max ? INT16_MAX : INT16_MIN;
    o->i32 = max ? INT32_MAX : INT32_MIN;
    o->i64 = max ? INT64_MAX : INT64_MIN;
    o->u8 = max ? UINT8_MAX : 0;
    o->u16 = max ? UINT16_MAX : 0;
    o->u32 = max ? UINT32_MAX : 0;
    o->u64 = max ? UINT64_MAX : 0;
    o->f32 = max ? FLT_MAX : -FLT_MAX;
    o->f64 = max ? DBL_MAX : -DBL_MAX;
    o->s = max ? "\xe2\x82\xac 100" : "";
    o->s_opt = max ? "opt" : NULL;
    o->bytes = (bus_bytes){raw, max ? sizeof(raw) : 0};
    o->bytes_opt = (bus_bytes){max ? raw : NULL, max ? sizeof(raw) : 0};
    o->nested.label = "outer";
    o->nested.n = max ? INT32_MAX : INT32_MIN;
    o->nested.tags = (bus_array){tags, 3};
    o->nested.leaf.code = max ? UINT16_MAX : 0;
    o->nested.leaf.blob = (bus_bytes){raw, 2};
#define ARR(x) (bus_array){(x), sizeof(x) / sizeof((x)[0])}
    o->a_bool = ARR(bools);
    o->a_i8 = ARR(i8s);
    o->a_i16 = ARR(i16s);
    o->a_i32 = ARR(i32s);
    o->a_i64 = ARR(i64s);
    o->a_u8 = ARR(u8s);
    o->a_u16 = ARR(u16s);
    o->a_u32 = ARR(u32s);
    o->a_u64 = ARR(u64s);
    o->a_f32 = ARR(f32s);
    o->a_f64 = ARR(f64s);
    o->a_str = ARR(strs);
    o->a_bytes = ARR(bys);
#undef ARR
    in[0].label = "first";
    in[0].n = -1;
    in[0].tags = (bus_array){tags, 2};
    in[1].label = "";
    in[1].leaf.code = 7;
    in[1].leaf.blob = (bus_bytes){raw, 4};
    o->a_inner = (bus_array){in, 2};
}

static void
test_round_trip_extremes(void **state)
{
    arena a = {0};
    all_kinds o;
    all_kinds *back;

    (void)state;
    fill_extremes(&o, false, &a);
    back = round_trip(&all_type, &o);
    assert_int_equal(back->i64, INT64_MIN);
    assert_string_equal(back->s, "");
    assert_null(back->s_opt);
    assert_null(back->bytes.data);
    assert_int_equal(back->bytes.len, 0);
    assert_null(((char **)back->a_str.items)[2]);
    assert_string_equal(((char **)back->a_str.items)[0], "");
    assert_string_equal(((inner *)back->a_inner.items)[1].label, "");
    bus_type_free(back);

    fill_extremes(&o, true, &a);
    back = round_trip(&all_type, &o);
    assert_true(back->u64 == UINT64_MAX);
    assert_true(back->i64 == INT64_MAX);
    assert_string_equal(back->s_opt, "opt");
    assert_int_equal(((inner *)back->a_inner.items)[1].leaf.code, 7);
    bus_type_free(back);
    ar_free(&a);
}

static void
test_round_trip_special_floats(void **state)
{
    static const double d[] = {NAN, INFINITY, -INFINITY, -0.0, 0.0};
    arena a = {0};
    all_kinds o, *back;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(d) / sizeof(d[0]); i++) {
        fill_extremes(&o, i % 2 == 0, &a);
        o.f64 = d[i];
        o.f32 = (float)d[i];
        back = round_trip(&all_type, &o);
        if (isnan(d[i])) {
            assert_true(isnan(back->f64) && isnan(back->f32));
        } else {
            assert_true(back->f64 == d[i] && back->f32 == (float)d[i]);
            assert_int_equal(signbit(back->f64) != 0, signbit(d[i]) != 0);
        }
        bus_type_free(back);
    }
    ar_free(&a);
}

/* msgpack-c stands for another language: the payload is a plain map. */
static bool
payload_has_key(const void *buf, size_t len, const char *key)
{
    msgpack_unpacked u;
    size_t off = 0, i;
    bool found = false;

    msgpack_unpacked_init(&u);
    assert_int_equal(msgpack_unpack_next(&u, buf, len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, len);
    assert_int_equal(u.data.type, MSGPACK_OBJECT_MAP);
    for (i = 0; i < u.data.via.map.size; i++) {
        const msgpack_object *k = &u.data.via.map.ptr[i].key;
        assert_int_equal(k->type, MSGPACK_OBJECT_STR);
        if (k->via.str.size == strlen(key)
            && memcmp(k->via.str.ptr, key, strlen(key)) == 0)
            found = true;
    }
    msgpack_unpacked_destroy(&u);
    return found;
}

static void
test_absent_values_and_large_bytes(void **state)
{
    arena a = {0};
    all_kinds o, *back;
    uint8_t *big;
    void *buf;
    size_t len, i;

    (void)state;
    fill_extremes(&o, false, &a);
    assert_int_equal(bus_type_encode(&all_type, &o, &buf, &len, NULL, 0),
                     BUS_OK);
    /* Absent: a NULL string, empty optional bytes. Present: the empty
     * required bytes and string, and every optional scalar. */
    assert_false(payload_has_key(buf, len, "s_opt"));
    assert_false(payload_has_key(buf, len, "bytes_opt"));
    assert_true(payload_has_key(buf, len, "bytes"));
    assert_true(payload_has_key(buf, len, "s"));
    assert_true(payload_has_key(buf, len, "u8"));
    assert_true(payload_has_key(buf, len, "a_inner"));
    bus_codec_buf_free(buf, len);

    big = ar_alloc(&a, 1 << 20);
    for (i = 0; i < 1 << 20; i++)
        big[i] = (uint8_t)(i * 7);
    o.bytes = (bus_bytes){big, 1 << 20};
    o.bytes_opt = (bus_bytes){big, 70000};
    back = round_trip(&all_type, &o);
    assert_int_equal(back->bytes.len, 1 << 20);
    assert_ptr_not_equal(back->bytes.data, big);
    bus_type_free(back);
    ar_free(&a);
}

static void
test_round_trip_random(void **state)
{
    all_kinds o;
    void *back;
    int i;

    (void)state;
    rng = bt_seed();
    for (i = 0; i < 1000; i++) {
        arena a = {0};
        memset(&o, 0, sizeof(o));
        gen_struct(&a, &all_type, &o);
        back = round_trip(&all_type, &o);
        bus_type_free(back);
        ar_free(&a);
    }
}

/* The decoded object is one block: strings and arrays point inside it. */
static void
test_decode_is_one_allocation(void **state)
{
    arena a = {0};
    all_kinds o;
    void *buf, *back;
    size_t len;

    (void)state;
    fill_extremes(&o, true, &a);
    bus_fault_alloc_fail_nth(1u << 30, false); /* count only */
    assert_int_equal(bus_type_encode(&all_type, &o, &buf, &len, NULL, 0),
                     BUS_OK);
    assert_int_equal(bus_fault_alloc_count(), 1);
    bus_fault_alloc_fail_nth(1u << 30, false);
    assert_int_equal(bus_type_decode(&all_type, buf, len, &back, NULL, 0),
                     BUS_OK);
    assert_int_equal(bus_fault_alloc_count(), 1);
    bus_fault_alloc_fail_nth(0, false);
    bus_type_free(back);
    bus_codec_buf_free(buf, len);
    bus_type_free(NULL);
    ar_free(&a);
}

/* ---- Decode rules and errors --------------------------------------------- */

static void
test_missing_required_names_field(void **state)
{
    wbuf w;

    (void)state;
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "amount");
    w_int(&w, 5);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "missing required field \"order_id\"");

    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "o-1");
    w_str(&w, "amount");
    w_int(&w, 5);
    w_str(&w, "lines");
    w_arr(&w, 2);
    w_line(&w, "a", 1);
    w_map(&w, 1);
    w_str(&w, "qty");
    w_int(&w, 1);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "missing required field \"lines[1].sku\"");

    /* nil is absent for an optional field, an error for a required one. */
    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "o-1");
    w_str(&w, "amount");
    w_int(&w, 5);
    w_str(&w, "lines");
    w.p = mp_put_nil(w.p);
    expect_decode(&order_type, &w, BUS_OK, NULL);
    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "order_id");
    w.p = mp_put_nil(w.p);
    w_str(&w, "amount");
    w_int(&w, 5);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"order_id\": expected str, got nil");
}

static void
test_wrong_kind_names_path(void **state)
{
    wbuf w;

    (void)state;
    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "o-1");
    w_str(&w, "amount");
    w_int(&w, 5);
    w_str(&w, "lines");
    w_arr(&w, 3);
    w_line(&w, "a", 1);
    w_line(&w, "b", 2);
    w_map(&w, 2);
    w_str(&w, "sku");
    w_int(&w, 42);
    w_str(&w, "qty");
    w_int(&w, 1);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"lines[2].sku\": expected str, got integer");

    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "lines");
    w_str(&w, "nope");
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"lines\": expected array, got str");

    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "lines");
    w_arr(&w, 1);
    w_arr(&w, 0);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"lines[0]\": expected map, got array");

    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "gift");
    w_int(&w, 1);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"gift\": expected bool, got integer");

    w_init(&w);
    w_arr(&w, 0);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "payload: expected map, got array");
    w_init(&w);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "payload: expected map, got end of data");
}

/* Decodes {name: value} written by put into a one-field type. */
#define ONE_FIELD_TYPE(ctype, kind)                                        \
    typedef struct one_##kind {                                            \
        ctype v;                                                           \
    } one_##kind;                                                          \
    static const bus_field one_##kind##_fields[] = {                       \
        BUS_FIELD(one_##kind, v, BUS_KIND_##kind, BUS_REQUIRED),           \
    };                                                                     \
    static const bus_type one_##kind##_type =                              \
        BUS_TYPE("test.one", 1, one_##kind, one_##kind##_fields)

ONE_FIELD_TYPE(int8_t, I8);
ONE_FIELD_TYPE(int16_t, I16);
ONE_FIELD_TYPE(int32_t, I32);
ONE_FIELD_TYPE(int64_t, I64);
ONE_FIELD_TYPE(uint8_t, U8);
ONE_FIELD_TYPE(uint16_t, U16);
ONE_FIELD_TYPE(uint32_t, U32);
ONE_FIELD_TYPE(uint64_t, U64);
ONE_FIELD_TYPE(float, F32);
ONE_FIELD_TYPE(double, F64);

static void
w_one_int(wbuf *w, int64_t v)
{
    w_init(w);
    w_map(w, 1);
    w_str(w, "v");
    w_int(w, v);
}

static void
w_one_uint(wbuf *w, uint64_t v)
{
    w_init(w);
    w_map(w, 1);
    w_str(w, "v");
    w_uint(w, v);
}

static void
test_integer_ranges(void **state)
{
    wbuf w;
    void *obj;

    (void)state;
    w_one_int(&w, 127);
    expect_decode(&one_I8_type, &w, BUS_OK, NULL);
    w_one_int(&w, 128);
    expect_decode(&one_I8_type, &w, BUS_EPROTO,
                  "field \"v\": 128 out of range for i8");
    w_one_int(&w, -129);
    expect_decode(&one_I8_type, &w, BUS_EPROTO,
                  "field \"v\": -129 out of range for i8");
    w_one_int(&w, INT16_MIN - 1);
    expect_decode(&one_I16_type, &w, BUS_EPROTO,
                  "field \"v\": -32769 out of range for i16");
    w_one_int(&w, (int64_t)INT32_MAX + 1);
    expect_decode(&one_I32_type, &w, BUS_EPROTO,
                  "field \"v\": 2147483648 out of range for i32");
    w_one_uint(&w, (uint64_t)INT64_MAX + 1);
    expect_decode(&one_I64_type, &w, BUS_EPROTO,
                  "field \"v\": 9223372036854775808 out of range for i64");
    w_one_int(&w, -1);
    expect_decode(&one_U8_type, &w, BUS_EPROTO,
                  "field \"v\": -1 out of range for u8");
    w_one_int(&w, 256);
    expect_decode(&one_U8_type, &w, BUS_EPROTO,
                  "field \"v\": 256 out of range for u8");
    w_one_int(&w, 65536);
    expect_decode(&one_U16_type, &w, BUS_EPROTO,
                  "field \"v\": 65536 out of range for u16");
    w_one_uint(&w, (uint64_t)UINT32_MAX + 1);
    expect_decode(&one_U32_type, &w, BUS_EPROTO,
                  "field \"v\": 4294967296 out of range for u32");
    w_one_int(&w, INT64_MIN);
    expect_decode(&one_U64_type, &w, BUS_EPROTO,
                  "field \"v\": -9223372036854775808 out of range for u64");
    w_one_uint(&w, UINT64_MAX);
    expect_decode(&one_U64_type, &w, BUS_OK, NULL);

    /* A signed encoding of a non-negative value is fine for unsigned. */
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    *w.p++ = 0xd1; /* int16 */
    w.p = mp_be16(w.p, 300);
    assert_int_equal(bus_type_decode(&one_U16_type, w.b, w_len(&w), &obj,
                                     NULL, 0),
                     BUS_OK);
    assert_int_equal(((one_U16 *)obj)->v, 300);
    bus_type_free(obj);

    /* Floats: float32, float64 and integers; f32 refuses finite values
     * beyond its range but keeps infinities. */
    w_one_int(&w, -7);
    assert_int_equal(bus_type_decode(&one_F64_type, w.b, w_len(&w), &obj,
                                     NULL, 0),
                     BUS_OK);
    assert_true(((one_F64 *)obj)->v == -7.0);
    bus_type_free(obj);
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    w.p = mp_put_f32(w.p, 0.25f);
    assert_int_equal(bus_type_decode(&one_F64_type, w.b, w_len(&w), &obj,
                                     NULL, 0),
                     BUS_OK);
    assert_true(((one_F64 *)obj)->v == 0.25);
    bus_type_free(obj);
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    w.p = mp_put_f64(w.p, 1e300);
    expect_decode(&one_F32_type, &w, BUS_EPROTO,
                  "field \"v\": 1e+300 out of range for f32");
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    w.p = mp_put_f64(w.p, -INFINITY);
    assert_int_equal(bus_type_decode(&one_F32_type, w.b, w_len(&w), &obj,
                                     NULL, 0),
                     BUS_OK);
    assert_true(isinf(((one_F32 *)obj)->v) && ((one_F32 *)obj)->v < 0);
    bus_type_free(obj);
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    w_str(&w, "1.5");
    expect_decode(&one_F32_type, &w, BUS_EPROTO,
                  "field \"v\": expected float, got str");
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "v");
    w.p = mp_put_f64(w.p, 1.5);
    expect_decode(&one_I32_type, &w, BUS_EPROTO,
                  "field \"v\": expected integer, got float");
}

static void
test_unknown_keys_are_skipped(void **state)
{
    wbuf w;
    order *o;
    void *obj;
    int i;

    (void)state;
    w_init(&w);
    w_map(&w, 6);
    w_str(&w, "future");
    w_map(&w, 2);
    w_str(&w, "x");
    w_arr(&w, 2);
    w_int(&w, 1);
    w.p = mp_put_f64(w.p, 2.0);
    w_str(&w, "y");
    w.p = mp_put_bin(w.p, "ab", 2);
    w_str(&w, "order_id");
    w_str(&w, "o-9");
    w_str(&w, "ext");
    *w.p++ = 0xd4; /* fixext1 */
    *w.p++ = 1;
    *w.p++ = 2;
    w_str(&w, "amount");
    w_int(&w, -3);
    w_str(&w, "future"); /* an unknown key twice is not checked */
    w.p = mp_put_nil(w.p);
    w_str(&w, "lines");
    w_arr(&w, 1);
    w_map(&w, 3);
    w_str(&w, "unknown_in_line");
    w_str(&w, "z");
    w_str(&w, "qty");
    w_int(&w, 3);
    w_str(&w, "sku");
    w_str(&w, "s-1");
    assert_int_equal(bus_type_decode(&order_type, w.b, w_len(&w), &obj,
                                     NULL, 0),
                     BUS_OK);
    o = obj;
    assert_string_equal(o->order_id, "o-9");
    assert_int_equal(o->amount, -3);
    assert_int_equal(o->lines.count, 1);
    assert_string_equal(((order_line *)o->lines.items)[0].sku, "s-1");
    assert_int_equal(((order_line *)o->lines.items)[0].qty, 3);
    assert_false(o->gift);
    bus_type_free(obj);

    /* Unknown values nest at most BUS_TYPE_MAX_DEPTH levels. */
    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "o");
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "deep");
    for (i = 0; i < BUS_TYPE_MAX_DEPTH; i++)
        w_arr(&w, 1);
    w_int(&w, 0);
    expect_decode(&order_type, &w, BUS_OK, NULL);
    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "o");
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "deep");
    for (i = 0; i < BUS_TYPE_MAX_DEPTH + 1; i++)
        w_arr(&w, 1);
    w_int(&w, 0);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "payload: malformed or too deeply nested value of an "
                  "unknown key at offset 25");
}

static void
test_duplicate_and_malformed(void **state)
{
    wbuf w;

    (void)state;
    w_init(&w);
    w_map(&w, 3);
    w_str(&w, "order_id");
    w_str(&w, "a");
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "order_id");
    w_str(&w, "b");
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"order_id\": duplicate key");

    /* nil then a value is still twice. */
    w_init(&w);
    w_map(&w, 4);
    w_str(&w, "order_id");
    w_str(&w, "a");
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "gift");
    w.p = mp_put_nil(w.p);
    w_str(&w, "gift");
    w.p = mp_put_bool(w.p, true);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"gift\": duplicate key");

    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "order_id");
    w_str(&w, "a");
    w_str(&w, "lines");
    w_arr(&w, 1);
    w_map(&w, 3);
    w_str(&w, "sku");
    w_str(&w, "x");
    w_str(&w, "qty");
    w_int(&w, 1);
    w_str(&w, "qty");
    w_int(&w, 2);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"lines[0].qty\": duplicate key");

    /* Trailing bytes, non-string keys, truncation, bad UTF-8. */
    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "order_id");
    w_str(&w, "a");
    w_str(&w, "amount");
    w_int(&w, 1);
    w_int(&w, 0);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "payload: 1 trailing bytes after the map at offset 20");
    w_init(&w);
    w_map(&w, 1);
    w_int(&w, 1);
    w_int(&w, 1);
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "payload: map key at offset 1: expected str, got "
                  "integer");
    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "order_id");
    w.p = mp_put_str_hdr(w.p, 10);
    w_str(&w, "abc");
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"order_id\": malformed or truncated str at "
                  "offset 18");
    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "order_id");
    w.p = mp_put_str(w.p, "a\xc0\x80", 3); /* overlong NUL */
    expect_decode(&order_type, &w, BUS_EPROTO,
                  "field \"order_id\": invalid UTF-8 (or a NUL byte) in "
                  "str");
    w_init(&w);
    w_map(&w, 2);
    w_str(&w, "amount");
    w_int(&w, 1);
    w_str(&w, "order_id");
    w.p = mp_put_str(w.p, "a\0b", 3);
    expect_decode(&order_type, &w, BUS_EPROTO, NULL);
}

/* A declared count is checked against the bytes behind it before anything
 * is allocated, and what is allocated is bounded by the payload. */
static void
test_hostile_counts_are_bounded(void **state)
{
    uint8_t *big;
    wbuf w;
    size_t i, n = 3000, len;
    void *obj;

    (void)state;
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "a_inner");
    *w.p++ = 0xdd; /* array32 */
    w.p = mp_be32(w.p, UINT32_MAX);
    w_map(&w, 0);
    bus_fault_alloc_fail_nth(1u << 30, false);
    expect_decode(&all_type, &w, BUS_EPROTO,
                  "field \"a_inner\": malformed or truncated array at "
                  "offset 9");
    assert_int_equal(bus_fault_alloc_count(), 0);
    bus_fault_alloc_fail_nth(0, false);

    /* n empty maps where structs are expected: n bytes of payload, n
     * structs of memory, then a missing required field. */
    big = malloc(n + 64);
    assert_non_null(big);
    len = (size_t)(mp_put_map(big, 1) - big);
    len = (size_t)(mp_put_str(big + len, "a_inner", 7) - big);
    len = (size_t)(mp_put_array(big + len, n) - big);
    for (i = 0; i < n; i++)
        big[len++] = 0x80;
    assert_int_equal(bus_type_decode(&all_type, big, len, &obj, NULL, 0),
                     BUS_EPROTO);
    assert_null(obj);
    free(big);
}

/* ---- Interoperability: another MessagePack writer ------------------------ */

static void
test_other_writers_decode(void **state)
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    char err[256];
    all_kinds *o;
    void *obj;

    (void)state;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 8);
    msgpack_pack_str_with_body(&pk, "s", 1);
    msgpack_pack_str_with_body(&pk, "hi", 2);
    msgpack_pack_str_with_body(&pk, "i64", 3);
    msgpack_pack_int64(&pk, -5);
    msgpack_pack_str_with_body(&pk, "bytes", 5); /* old writers: str */
    msgpack_pack_str_with_body(&pk, "raw", 3);
    msgpack_pack_str_with_body(&pk, "f32", 3); /* float64 for a float */
    msgpack_pack_double(&pk, 0.5);
    msgpack_pack_str_with_body(&pk, "f64", 3);
    msgpack_pack_uint64(&pk, 3);
    msgpack_pack_str_with_body(&pk, "u64", 3);
    msgpack_pack_uint64(&pk, UINT64_MAX);
    msgpack_pack_str_with_body(&pk, "nested", 6);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "label", 5);
    msgpack_pack_str_with_body(&pk, "L", 1);
    msgpack_pack_str_with_body(&pk, "a_str", 5);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_nil(&pk);
    msgpack_pack_str_with_body(&pk, "x", 1);
    if (bus_type_decode(&all_type, sb.data, sb.size, &obj, err, sizeof(err))
        != BUS_OK)
        fail_msg("%s", err);
    o = obj;
    assert_string_equal(o->s, "hi");
    assert_int_equal(o->i64, -5);
    assert_int_equal(o->bytes.len, 3);
    assert_memory_equal(o->bytes.data, "raw", 3);
    assert_true(o->f32 == 0.5f && o->f64 == 3.0);
    assert_true(o->u64 == UINT64_MAX);
    assert_string_equal(o->nested.label, "L");
    assert_int_equal(o->a_str.count, 2);
    assert_null(((char **)o->a_str.items)[0]);
    assert_string_equal(((char **)o->a_str.items)[1], "x");
    bus_type_free(obj);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- Encode errors ------------------------------------------------------- */

static void
test_encode_errors_name_field(void **state)
{
    order_line lines[3] = {{"a", 1, 0}, {"b", 2, 0}, {NULL, 3, 0}};
    order o = {"o-1", 5, {lines, 3}, false};
    char err[256];
    void *buf = (void *)1;
    size_t len = 7;
    all_kinds ak;
    arena a = {0};

    (void)state;
    assert_int_equal(bus_type_encode(&order_type, &o, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"lines[2].sku\": required string is "
                             "NULL");
    assert_null(buf);
    assert_int_equal(len, 0);
    lines[2].sku = "c\xff";
    assert_int_equal(bus_type_encode(&order_type, &o, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"lines[2].sku\": invalid UTF-8");
    lines[2].sku = "c";
    o.order_id = NULL;
    assert_int_equal(bus_type_encode(&order_type, &o, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"order_id\": required string is NULL");
    o.order_id = "o-1";
    o.lines.items = NULL;
    assert_int_equal(bus_type_encode(&order_type, &o, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"lines\": items is NULL, count 3");
    o.lines.count = 0; /* {NULL, 0} is an empty array */
    assert_int_equal(bus_type_encode(&order_type, &o, &buf, &len, err,
                                     sizeof(err)),
                     BUS_OK);
    bus_codec_buf_free(buf, len);

    fill_extremes(&ak, true, &a);
    ak.bytes_opt = (bus_bytes){NULL, 3};
    assert_int_equal(bus_type_encode(&all_type, &ak, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"bytes_opt\": data is NULL, len 3");
    ak.bytes_opt.len = 0;
    ((inner *)ak.a_inner.items)[1].label = NULL;
    assert_int_equal(bus_type_encode(&all_type, &ak, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"a_inner[1].label\": required string "
                             "is NULL");
    /* Found after the output outgrew encode's stack buffer. */
    ((inner *)ak.a_inner.items)[1].label = "ok";
    {
        static uint8_t big[3000];
        static char *bad[] = {"fine", "bad\xed\xa0\x80"}; /* surrogate */
        ak.bytes = (bus_bytes){big, sizeof(big)};
        ak.a_str = (bus_array){bad, 2};
        assert_int_equal(bus_type_encode(&all_type, &ak, &buf, &len, err,
                                         sizeof(err)),
                         BUS_EINVAL);
        assert_string_equal(err, "field \"a_str[1]\": invalid UTF-8");
        assert_null(buf);
    }
    assert_int_equal(bus_type_encode(NULL, &ak, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    ar_free(&a);
}

/* ---- Validation ---------------------------------------------------------- */

typedef struct selfref {
    int32_t x;
    bus_array kids; /* selfref */
} selfref;

static const bus_type selfref_type;
static const bus_field selfref_fields[] = {
    BUS_FIELD(selfref, x, BUS_KIND_I32, 0),
    BUS_FIELD_ARRAY_OF_STRUCT(selfref, kids, &selfref_type, 0),
};
static const bus_type selfref_type =
    BUS_TYPE("test.self", 1, selfref, selfref_fields);

static void
expect_invalid(const bus_type *t, const char *msg)
{
    char err[256];

    assert_int_equal(bus_type_validate(t, err, sizeof(err)), BUS_EINVAL);
    assert_string_equal(err, msg);
}

static void
test_validate_errors(void **state)
{
    bus_field f[3];
    bus_type t;
    bus_type nested;

    (void)state;
    assert_int_equal(bus_type_validate(&all_type, NULL, 0), BUS_OK);
    assert_int_equal(bus_type_validate(&order_type, NULL, 0), BUS_OK);
    expect_invalid(NULL, "type: NULL");

    memcpy(f, order_line_fields, sizeof(order_line_fields));
    t = (bus_type){"t", 1, sizeof(order_line), f, 3};
    assert_int_equal(bus_type_validate(&t, NULL, 0), BUS_OK);
    t.name = "";
    expect_invalid(&t, "type: name is NULL or empty");
    t.name = "t";
    t.version = 0;
    expect_invalid(&t, "type \"t\": version 0 (versions start at 1)");
    t.version = 1;
    t.size = 0;
    expect_invalid(&t, "type \"t\": struct size is 0");
    t.size = sizeof(order_line);
    f[1].name = "sku";
    expect_invalid(&t, "type \"t\": field \"sku\": duplicate field name");
    f[1].name = "";
    expect_invalid(&t, "type \"t\": field #1 has no name");
    f[1].name = "qty";
    f[2].offset = sizeof(order_line);
    expect_invalid(&t, "type \"t\": field \"price\": offset 24 + size 8 "
                       "outside the struct (size 24)");
    f[2].offset = 12;
    expect_invalid(&t, "type \"t\": field \"price\": offset 12 misaligned "
                       "for i64");
    f[2].offset = offsetof(order_line, price);
    f[2].kind = (bus_kind)99;
    expect_invalid(&t, "type \"t\": field \"price\": invalid kind 99");
    f[2].kind = BUS_KIND_I64;
    f[2].flags = 0x8;
    expect_invalid(&t, "type \"t\": field \"price\": unknown flags 0x8");
    f[2].flags = 0;
    f[0] = (bus_field)BUS_FIELD_ARRAY(order_line, sku, BUS_KIND_ARRAY, 0);
    t.size = sizeof(bus_array) + 16;
    expect_invalid(&t, "type \"t\": field \"sku\": invalid array element "
                       "kind 15 (arrays of arrays are not supported)");
    f[0] = (bus_field)BUS_FIELD_STRUCT(order_line, sku, NULL, 0);
    expect_invalid(&t, "type \"t\": field \"sku\": struct without a "
                       "nested type");
    t.size = sizeof(order_line);

    /* Errors inside nested types name the path. */
    nested = (bus_type){"n", 1, sizeof(order_line), f, 3};
    memcpy(f, order_line_fields, sizeof(order_line_fields));
    f[2].offset = 100;
    {
        bus_field outer[1] = {
            BUS_FIELD_ARRAY_OF_STRUCT(order, lines, &nested, 0),
        };
        bus_type o = {"o", 1, sizeof(order), outer, 1};
        expect_invalid(&o, "type \"o\": field \"lines.price\": offset 100 "
                           "+ size 8 outside the struct (size 24)");
    }
    expect_invalid(&selfref_type,
                   "type \"test.self\": field \"kids.kids.kids.kids.kids."
                   "kids.kids.kids.kids.kids.kids.kids.kids.kids.kids."
                   "kids.kids\": structs nested deeper than 16 (a recursive "
                   "type?)");
    t = (bus_type){"t", 1, 8, NULL, 300};
    expect_invalid(&t, "type \"t\": 300 fields (at most 256)");
}

/* encode and decode trust their table for speed, but an invalid one
 * (never registered) still fails cleanly, never out of bounds. */
static void
test_unvalidated_tables_fail_cleanly(void **state)
{
    static const uint8_t dummy[1];
    bus_field f[1] = {BUS_FIELD(order_line, sku, (bus_kind)42, 0)};
    bus_type t = {"t", 1, sizeof(order_line), f, 1};
    order_line line = {"x", 1, 2};
    all_kinds ak;
    selfref nodes[BUS_TYPE_MAX_DEPTH + 2];
    char err[256];
    void *buf, *obj;
    size_t len, i;
    arena a = {0};
    wbuf w;

    (void)state;
    assert_int_equal(bus_type_encode(&t, &line, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"sku\": invalid kind 42");
    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "sku");
    w_str(&w, "x");
    expect_decode(&t, &w, BUS_EINVAL, "field \"sku\": invalid kind 42");
    f[0] = (bus_field)BUS_FIELD_STRUCT(order_line, sku, NULL, 0);
    assert_int_equal(bus_type_encode(&t, &line, &buf, &len, NULL, 0),
                     BUS_EINVAL);
    expect_decode(&t, &w, BUS_EINVAL, "field \"sku\": struct without a "
                                      "type");
    f[0] = (bus_field)BUS_FIELD_ARRAY(order_line, sku, BUS_KIND_ARRAY, 0);
    t.size = 32;
    assert_int_equal(bus_type_encode(&t, &ak, &buf, &len, NULL, 0),
                     BUS_EINVAL);
    expect_decode(&t, &w, BUS_EINVAL,
                  "field \"sku\": invalid element kind 15");
    t.n_fields = BUS_TYPE_MAX_FIELDS + 1;
    expect_decode(&t, &w, BUS_EINVAL, "payload: more than 256 fields");

    /* A recursive type nests as deep as its data: refused past 16. */
    memset(nodes, 0, sizeof(nodes));
    for (i = 0; i + 1 < sizeof(nodes) / sizeof(nodes[0]); i++)
        nodes[i].kids = (bus_array){&nodes[i + 1], 1};
    assert_int_equal(bus_type_encode(&selfref_type, &nodes[0], &buf, &len,
                                     err, sizeof(err)),
                     BUS_EINVAL);
    assert_non_null(strstr(err, "structs nested deeper than 16"));
    nodes[BUS_TYPE_MAX_DEPTH].kids.count = 0;
    assert_int_equal(bus_type_encode(&selfref_type, &nodes[0], &buf, &len,
                                     NULL, 0),
                     BUS_OK);
    obj = NULL;
    assert_int_equal(bus_type_decode(&selfref_type, buf, len, &obj, NULL, 0),
                     BUS_OK);
    bus_type_free(obj);
    bus_codec_buf_free(buf, len);
    w_init(&w);
    for (i = 0; i < BUS_TYPE_MAX_DEPTH + 1; i++) {
        w_map(&w, 1);
        w_str(&w, "kids");
        w_arr(&w, 1);
    }
    w_map(&w, 0);
    expect_decode(&selfref_type, &w, BUS_EINVAL, NULL);

    /* Lengths MessagePack cannot carry are refused before any read. */
    fill_extremes(&ak, true, &a);
    ak.bytes = (bus_bytes){dummy, (size_t)UINT32_MAX + 1};
    assert_int_equal(bus_type_encode(&all_type, &ak, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"bytes\": 4294967296 bytes (at most "
                             "4 GiB - 1)");
    ak.bytes.len = 0;
    ak.a_u8 = (bus_array){(void *)dummy, (size_t)UINT32_MAX + 1};
    assert_int_equal(bus_type_encode(&all_type, &ak, &buf, &len, err,
                                     sizeof(err)),
                     BUS_EINVAL);
    assert_string_equal(err, "field \"a_u8\": 4294967296 items (at most "
                             "4294967295)");

    /* NULL arguments. */
    assert_int_equal(bus_type_decode(NULL, w.b, 1, &obj, err, sizeof(err)),
                     BUS_EINVAL);
    assert_int_equal(bus_type_decode(&order_type, NULL, 1, &obj, NULL, 0),
                     BUS_EINVAL);
    assert_int_equal(bus_type_decode(&order_type, NULL, 0, &obj, err,
                                     sizeof(err)),
                     BUS_EPROTO);
    assert_string_equal(err, "payload: expected map, got end of data");
    assert_int_equal(bus_type_encode(&order_type, NULL, &buf, &len, NULL, 0),
                     BUS_EINVAL);
    ar_free(&a);
}

static void
test_validate_names_and_tables(void **state)
{
    bus_field f[1] = {BUS_FIELD(order_line, sku, BUS_KIND_STRING, 0)};
    bus_type t = {"t", 1, sizeof(order_line), f, 1};

    (void)state;
    f[0].name = "s\xff";
    expect_invalid(&t, "type \"t\": field \"s\xff\": name is not valid "
                       "UTF-8");
    f[0].name = "sku";
    t.name = "t\xc0";
    expect_invalid(&t, "type: name is not valid UTF-8");
    t.name = "t";
    t.fields = NULL;
    expect_invalid(&t, "type \"t\": 1 fields but fields is NULL");
    t.n_fields = 0; /* a struct with no fields is fine: it encodes {} */
    assert_int_equal(bus_type_validate(&t, NULL, 0), BUS_OK);
}

/* ---- Registry and upcasting ---------------------------------------------- */

typedef struct person_v1 {
    char *name;
    int32_t age;
} person_v1;

typedef struct person_v2 {
    char *first;
    char *last;
    int32_t age;
} person_v2;

typedef struct person_v3 {
    char *first;
    char *last;
    int32_t age;
    char *country;
    bool verified;
} person_v3;

static const bus_field person_v1_fields[] = {
    BUS_FIELD(person_v1, name, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(person_v1, age, BUS_KIND_I32, 0),
};
static const bus_type person_v1_type =
    BUS_TYPE("people.added", 1, person_v1, person_v1_fields);

static const bus_field person_v2_fields[] = {
    BUS_FIELD(person_v2, first, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(person_v2, last, BUS_KIND_STRING, 0),
    BUS_FIELD(person_v2, age, BUS_KIND_I32, 0),
};
static const bus_type person_v2_type =
    BUS_TYPE("people.added", 2, person_v2, person_v2_fields);

static const bus_field person_v3_fields[] = {
    BUS_FIELD(person_v3, first, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(person_v3, last, BUS_KIND_STRING, 0),
    BUS_FIELD(person_v3, age, BUS_KIND_I32, 0),
    BUS_FIELD(person_v3, country, BUS_KIND_STRING, 0),
    BUS_FIELD(person_v3, verified, BUS_KIND_BOOL, 0),
};
static const bus_type person_v3_type =
    BUS_TYPE("people.added", 3, person_v3, person_v3_fields);

/* v1 -> v2: "Ada Lovelace" becomes "Ada" (a new string owned by to) and
 * "Lovelace" (aliased: it is the tail of from's string). */
static int
person_1_to_2(const void *from, void *to, void *opaque)
{
    const person_v1 *a = from;
    person_v2 *b = to;
    const char *sp = strchr(a->name, ' ');

    ++*(int *)opaque;
    if (a->age < 0)
        return BUS_EPROTO; /* refuses some input: decoding returns this */
    b->age = a->age;
    if (sp == NULL) {
        b->first = a->name;
        return BUS_OK;
    }
    b->first = bus_type_strdup(to, a->name, (size_t)(sp - a->name));
    if (b->first == NULL)
        return BUS_ENOMEM;
    b->last = (char *)sp + 1;
    return BUS_OK;
}

/* v2 -> v3: same fields, plus a default for the new one. */
static int
person_2_to_3(const void *from, void *to, void *opaque)
{
    const person_v2 *a = from;
    person_v3 *b = to;
    char *note;

    ++*(int *)opaque;
    b->first = a->first;
    b->last = a->last;
    b->age = a->age;
    b->country = "unknown";
    /* Memory an upcaster allocates is freed with the result. */
    if ((note = bus_type_alloc(to, 64)) == NULL)
        return BUS_ENOMEM;
    memset(note, 0, 64);
    return BUS_OK;
}

static int upcalls;

static bus_type_registry *
people_registry(void)
{
    bus_type_registry *r;

    assert_int_equal(bus_type_registry_new(&r), BUS_OK);
    /* Registration order does not matter. */
    assert_int_equal(bus_type_register(r, &person_v3_type), BUS_OK);
    assert_int_equal(bus_type_register(r, &person_v1_type), BUS_OK);
    assert_int_equal(bus_type_register(r, &order_type), BUS_OK);
    assert_int_equal(bus_type_register(r, &person_v2_type), BUS_OK);
    assert_int_equal(bus_type_register_upcaster(r, "people.added", 2,
                                                person_2_to_3, &upcalls),
                     BUS_OK);
    assert_int_equal(bus_type_register_upcaster(r, "people.added", 1,
                                                person_1_to_2, &upcalls),
                     BUS_OK);
    return r;
}

static void
test_upcast_chain(void **state)
{
    bus_type_registry *r = people_registry();
    person_v1 p1 = {"Ada Lovelace", 36};
    person_v2 p2 = {"Alan", "Turing", 41};
    const bus_type *t;
    person_v3 *p3;
    char err[256];
    void *buf, *obj;
    size_t len;

    (void)state;
    assert_null(bus_type_alloc(NULL, 1));
    assert_ptr_equal(bus_type_lookup(r, "people.added", 0), &person_v3_type);
    assert_ptr_equal(bus_type_lookup(r, "people.added", 1), &person_v1_type);
    assert_null(bus_type_lookup(r, "people.added", 4));
    assert_null(bus_type_lookup(r, "people", 0));
    assert_null(bus_type_lookup(r, "people.added.x", 0));
    assert_ptr_equal(bus_type_lookup(r, "orders.placed", 0), &order_type);

    assert_int_equal(bus_type_encode(&person_v1_type, &p1, &buf, &len, NULL,
                                     0),
                     BUS_OK);
    upcalls = 0;
    if (bus_type_registry_decode(r, "people.added", 1, buf, len, &obj, &t,
                                 err, sizeof(err)) != BUS_OK)
        fail_msg("%s", err);
    bus_codec_buf_free(buf, len);
    assert_int_equal(upcalls, 2);
    assert_ptr_equal(t, &person_v3_type);
    p3 = obj;
    assert_string_equal(p3->first, "Ada");
    assert_string_equal(p3->last, "Lovelace");
    assert_int_equal(p3->age, 36);
    assert_string_equal(p3->country, "unknown");
    assert_false(p3->verified);
    bus_type_free(obj); /* and v2, v1 and the upcasters' memory: ASan */

    assert_int_equal(bus_type_encode(&person_v2_type, &p2, &buf, &len, NULL,
                                     0),
                     BUS_OK);
    upcalls = 0;
    assert_int_equal(bus_type_registry_decode(r, "people.added", 2, buf, len,
                                              &obj, NULL, NULL, 0),
                     BUS_OK);
    assert_int_equal(upcalls, 1);
    assert_string_equal(((person_v3 *)obj)->last, "Turing");
    bus_type_free(obj);
    /* The v2 payload read as today's version directly, with no step. */
    upcalls = 0;
    assert_int_equal(bus_type_registry_decode(r, "people.added", 3, buf, len,
                                              &obj, &t, NULL, 0),
                     BUS_OK);
    assert_int_equal(upcalls, 0);
    assert_null(((person_v3 *)obj)->country);
    bus_type_free(obj);
    bus_codec_buf_free(buf, len);

    /* An upcaster's error is returned, and everything is freed. */
    p1.age = -1;
    assert_int_equal(bus_type_encode(&person_v1_type, &p1, &buf, &len, NULL,
                                     0),
                     BUS_OK);
    obj = (void *)1;
    t = (void *)1;
    assert_int_equal(bus_type_registry_decode(r, "people.added", 1, buf, len,
                                              &obj, &t, err, sizeof(err)),
                     BUS_EPROTO);
    assert_null(obj);
    assert_null(t);
    assert_string_equal(err, "upcaster \"people.added\" v1 -> v2 failed: "
                             "malformed data (protocol error)");
    bus_codec_buf_free(buf, len);
    bus_type_registry_free(r);
}

static void
test_registry_errors(void **state)
{
    bus_type_registry *r = people_registry();
    bus_type copy = person_v2_type, bad = person_v2_type;
    bus_type v5 = person_v3_type;
    char err[256];
    void *obj;
    wbuf w;

    (void)state;
    assert_int_equal(bus_type_register(r, &person_v2_type), BUS_OK);
    assert_int_equal(bus_type_register(r, &copy), BUS_EEXIST);
    bad.version = 9;
    bad.size = 1;
    assert_int_equal(bus_type_register(r, &bad), BUS_EINVAL);
    assert_int_equal(bus_type_register(r, NULL), BUS_EINVAL);
    assert_int_equal(bus_type_register(NULL, &copy), BUS_EINVAL);
    assert_int_equal(bus_type_register_upcaster(r, "people.added", 1,
                                                person_1_to_2, NULL),
                     BUS_EEXIST);
    assert_int_equal(bus_type_register_upcaster(r, "", 1, person_1_to_2,
                                                NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_type_register_upcaster(r, "x", 0, person_1_to_2,
                                                NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_type_register_upcaster(r, "x", 1, NULL, NULL),
                     BUS_EINVAL);

    w_init(&w);
    w_map(&w, 1);
    w_str(&w, "name");
    w_str(&w, "x");
    assert_int_equal(bus_type_registry_decode(r, "nope", 1, w.b, w_len(&w),
                                              &obj, NULL, err, sizeof(err)),
                     BUS_ENOTFOUND);
    assert_string_equal(err, "type \"nope\" v1 is not registered");
    assert_int_equal(bus_type_registry_decode(r, "people.added", 0, w.b,
                                              w_len(&w), &obj, NULL, err,
                                              sizeof(err)),
                     BUS_EINVAL);
    /* v5 without a v3 -> v4 step (nor a v4): the chain is checked first. */
    v5.version = 5;
    assert_int_equal(bus_type_register(r, &v5), BUS_OK);
    bus_fault_alloc_fail_nth(1u << 30, false);
    assert_int_equal(bus_type_registry_decode(r, "people.added", 1, w.b,
                                              w_len(&w), &obj, NULL, err,
                                              sizeof(err)),
                     BUS_ENOTFOUND);
    assert_int_equal(bus_fault_alloc_count(), 0);
    bus_fault_alloc_fail_nth(0, false);
    assert_string_equal(err, "no upcaster for \"people.added\" v3 -> v4 "
                             "(decoding v1 into v5)");
    assert_int_equal(bus_type_register_upcaster(r, "people.added", 3,
                                                person_2_to_3, &upcalls),
                     BUS_OK);
    assert_int_equal(bus_type_registry_decode(r, "people.added", 1, w.b,
                                              w_len(&w), &obj, NULL, err,
                                              sizeof(err)),
                     BUS_ENOTFOUND);
    assert_string_equal(err, "type \"people.added\" v4 is not registered "
                             "(needed to upcast v1 to v5)");
    assert_null(obj);
    bus_type_registry_free(r);
    bus_type_registry_free(NULL);
}

/* ---- Events -------------------------------------------------------------- */

static void
test_event_new_typed_end_to_end(void **state)
{
    bus_type_registry *r = people_registry();
    order_line lines[2] = {{"sku-1", 2, 150}, {"sku-\xc3\xa9", 1, -5}};
    order o = {"o-42", 305, {lines, 2}, true};
    bus_header hs[9];
    char keys[9][8];
    bus_event_init init;
    bus_event *e, *back;
    const bus_type *t;
    void *wire, *obj;
    size_t wlen, i;
    char err[256];

    (void)state;
    memset(&init, 0, sizeof(init));
    init.stream = "order-42";
    init.stream_version = 3;
    init.type = "ignored";
    init.schema_version = 77;
    hs[0] = (bus_header){BUS_H_CORRELATION_ID, "c-1"};
    init.headers = hs;
    init.n_headers = 1;
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, &init, err,
                                         sizeof(err)),
                     BUS_OK);
    assert_string_equal(bus_event_type(e), "orders.placed");
    assert_int_equal(bus_event_schema_version(e), 2);
    assert_string_equal(bus_event_stream(e), "order-42");
    assert_string_equal(bus_event_correlation_id(e), "c-1");
    assert_string_equal(bus_event_header(e, BUS_H_CONTENT_TYPE),
                        "application/msgpack");

    /* Through the envelope codec, as on the wire, and back to a struct. */
    assert_int_equal(bus_codec_encode_alloc(e, &wire, &wlen), BUS_OK);
    assert_int_equal(bus_codec_decode(&back, wire, wlen, NULL, err,
                                      sizeof(err)),
                     BUS_OK);
    bus_codec_buf_free(wire, wlen);
    if (bus_event_decode_typed(r, back, &obj, &t, err, sizeof(err))
        != BUS_OK)
        fail_msg("%s", err);
    assert_ptr_equal(t, &order_type);
    assert_true(struct_eq(&order_type, &o, obj));
    bus_type_free(obj);
    bus_event_unref(back);
    bus_event_unref(e);

    /* The caller's content type wins; many headers take the other path. */
    for (i = 0; i < 9; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%zu", i);
        hs[i] = (bus_header){keys[i], "v"};
    }
    init.n_headers = 9;
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, &init, NULL,
                                         0),
                     BUS_OK);
    assert_int_equal(bus_event_header_count(e), 10);
    assert_string_equal(bus_event_header(e, BUS_H_CONTENT_TYPE),
                        "application/msgpack");
    bus_event_unref(e);
    hs[3] = (bus_header){BUS_H_CONTENT_TYPE, "application/x-msgpack"};
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, &init, NULL,
                                         0),
                     BUS_OK);
    assert_int_equal(bus_event_header_count(e), 9);
    assert_string_equal(bus_event_header(e, BUS_H_CONTENT_TYPE),
                        "application/x-msgpack");
    bus_event_unref(e);

    /* NULL init; encode errors leave no event. */
    bus_fault_alloc_fail_nth(1u << 30, false);
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, NULL, NULL, 0),
                     BUS_OK);
    assert_int_equal(bus_fault_alloc_count(), 2); /* payload, event */
    bus_fault_alloc_fail_nth(0, false);
    assert_null(bus_event_stream(e));
    bus_event_unref(e);
    o.order_id = NULL;
    e = (void *)1;
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, NULL, err,
                                         sizeof(err)),
                     BUS_EINVAL);
    assert_null(e);
    assert_string_equal(err, "field \"order_id\": required string is NULL");

    /* An event of an unknown type. */
    assert_int_equal(bus_event_new(&e, "unknown.type", "\x80", 1), BUS_OK);
    assert_int_equal(bus_event_decode_typed(r, e, &obj, NULL, err,
                                            sizeof(err)),
                     BUS_ENOTFOUND);
    assert_string_equal(err, "type \"unknown.type\" v1 is not registered");
    bus_event_unref(e);
    obj = (void *)1;
    assert_int_equal(bus_event_decode_typed(r, NULL, &obj, NULL, NULL, 0),
                     BUS_EINVAL);
    assert_null(obj);
    assert_int_equal(bus_event_new_typed(NULL, &order_type, &o, NULL, NULL,
                                         0),
                     BUS_EINVAL);
    init.headers = NULL;
    assert_int_equal(bus_event_new_typed(&e, &order_type, &o, &init, NULL,
                                         0),
                     BUS_EINVAL);
    bus_type_registry_free(r);
}

/* ---- Fuzzing ------------------------------------------------------------- */

/* Decodes a payload of unknown quality: an error or an object that
 * re-encodes and decodes to itself. Never a crash (ASan watches). */
static void
decode_any(const void *buf, size_t len)
{
    char err[256];
    void *obj, *buf2, *obj2;
    size_t len2;
    int rv;

    rv = bus_type_decode(&all_type, buf, len, &obj, err, sizeof(err));
    if (rv != BUS_OK) {
        assert_int_equal(rv, BUS_EPROTO);
        assert_null(obj);
        assert_true(err[0] != '\0');
        return;
    }
    assert_int_equal(bus_type_encode(&all_type, obj, &buf2, &len2, err,
                                     sizeof(err)),
                     BUS_OK);
    assert_int_equal(bus_type_decode(&all_type, buf2, len2, &obj2, err,
                                     sizeof(err)),
                     BUS_OK);
    assert_true(struct_eq(&all_type, obj, obj2));
    bus_type_free(obj2);
    bus_codec_buf_free(buf2, len2);
    bus_type_free(obj);
}

/* A random MessagePack value whose map keys are mostly our field names, so
 * that decoding gets past the keys and into the values. */
static uint8_t *
rnd_value(uint8_t *p, uint8_t *end, int depth)
{
    static const char *const keys[] = {
        "b", "i8", "u16", "i64", "f32", "f64", "s", "s_opt", "bytes",
        "nested", "label", "tags", "leaf", "code", "blob", "a_inner",
        "a_str", "a_u64", "a_f32", "a_bytes", "n", "zz",
    };
    size_t i, n;

    if (end - p < 600 || depth > 6)
        return mp_put_nil(p);
    switch (rnd(depth == 0 ? 1 : 12)) {
    case 0: case 1: case 2:
        n = rnd(8);
        p = mp_put_map(p, n);
        for (i = 0; i < n; i++) {
            const char *k = keys[rnd(sizeof(keys) / sizeof(keys[0]))];
            p = mp_put_str(p, k, strlen(k));
            p = rnd_value(p, end, depth + 1);
        }
        return p;
    case 3: case 4:
        n = rnd(6);
        p = mp_put_array(p, n);
        for (i = 0; i < n; i++)
            p = rnd_value(p, end, depth + 1);
        return p;
    case 5: return mp_put_int(p, pick_i(INT64_MIN, INT64_MAX));
    case 6: return mp_put_uint(p, pick_u(UINT64_MAX));
    case 7: return rnd(2) ? mp_put_f64(p, pick_f64())
                          : mp_put_f32(p, pick_f32());
    case 8: return mp_put_bool(p, rnd(2));
    case 9: return mp_put_nil(p);
    default:
        n = rnd(40);
        p = rnd(3) ? mp_put_str_hdr(p, n) : mp_put_bin_hdr(p, n);
        for (i = 0; i < n; i++)
            *p++ = (uint8_t)(rnd(4) ? 'a' + rnd(26) : rnd(256));
        return p;
    }
}

static void
test_fuzz_never_crashes(void **state)
{
    static uint8_t tmp[1 << 17];
    all_kinds o;
    void *buf;
    size_t len, n, i;
    int it, k;

    (void)state;
    rng = bt_seed() ^ 0x5eed;
    for (it = 0; it < 500; it++) {
        arena a = {0};
        memset(&o, 0, sizeof(o));
        gen_struct(&a, &all_type, &o);
        assert_int_equal(bus_type_encode(&all_type, &o, &buf, &len, NULL, 0),
                         BUS_OK);
        for (k = 0; k < 24; k++) {
            if (len > sizeof(tmp))
                break;
            memcpy(tmp, buf, len);
            n = len;
            switch (k % 4) {
            case 0: /* a few bit flips */
                for (i = 0; i < 1 + rnd(3); i++)
                    tmp[rnd(len)] ^= (uint8_t)(1u << rnd(8));
                break;
            case 1: /* truncation */
                n = rnd(len);
                break;
            case 2: /* a random byte, often in the headers at the front */
                tmp[rnd(rnd(2) ? len : (len < 64 ? len : 64))] =
                    (uint8_t)rnd(256);
                break;
            default: /* trailing garbage */
                if (n < sizeof(tmp))
                    tmp[n++] = (uint8_t)rnd(256);
                break;
            }
            decode_any(tmp, n);
        }
        bus_codec_buf_free(buf, len);
        ar_free(&a);
    }
    for (it = 0; it < 20000; it++) {
        n = (size_t)(rnd_value(tmp, tmp + sizeof(tmp), 0) - tmp);
        decode_any(tmp, n);
    }
    for (it = 0; it < 20000; it++) {
        n = rnd(64);
        for (i = 0; i < n; i++)
            tmp[i] = (uint8_t)rnd(256);
        if (n > 0 && rnd(2))
            tmp[0] = (uint8_t)(0x80 | rnd(16)); /* a fixmap */
        decode_any(tmp, n);
    }
}

/* ---- Allocation faults --------------------------------------------------- */

static void
test_faults_encode_decode(void **state)
{
    arena a = {0};
    all_kinds o;
    void *buf, *obj;
    size_t len;
    uint64_t n;
    int rv;

    (void)state;
    fill_extremes(&o, true, &a);
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        buf = (void *)1;
        rv = bus_type_encode(&all_type, &o, &buf, &len, NULL, 0);
        if (!bus_fault_alloc_fired())
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(buf);
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(rv, BUS_OK);
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, true);
        obj = (void *)1;
        rv = bus_type_decode(&all_type, buf, len, &obj, NULL, 0);
        if (!bus_fault_alloc_fired())
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(obj);
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(rv, BUS_OK);
    assert_true(struct_eq(&all_type, &o, obj));
    bus_type_free(obj);
    bus_codec_buf_free(buf, len);
    ar_free(&a);
}

static void
test_faults_registry_and_upcasting(void **state)
{
    person_v1 p1 = {"Grace Hopper", 85};
    bus_type_registry *r = NULL;
    char err[256];
    void *buf, *obj;
    size_t len;
    uint64_t n;
    int rv, persistent;

    (void)state;
    /* Building a registry: each failure leaves it consistent and usable. */
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_type_registry_new(&r);
        if (rv == BUS_OK)
            rv = bus_type_register(r, &person_v1_type);
        if (rv == BUS_OK)
            rv = bus_type_register(r, &person_v2_type);
        if (rv == BUS_OK)
            rv = bus_type_register(r, &person_v3_type);
        if (rv == BUS_OK)
            rv = bus_type_register_upcaster(r, "people.added", 1,
                                            person_1_to_2, &upcalls);
        if (rv == BUS_OK)
            rv = bus_type_register_upcaster(r, "people.added", 2,
                                            person_2_to_3, &upcalls);
        if (!bus_fault_alloc_fired())
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        bus_type_registry_free(r);
        r = NULL;
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(rv, BUS_OK);

    assert_int_equal(bus_type_encode(&person_v1_type, &p1, &buf, &len, NULL,
                                     0),
                     BUS_OK);
    /* Decode, two steps, the upcasters' own allocations: transient and
     * persistent failures. */
    for (persistent = 0; persistent < 2; persistent++) {
        for (n = 1;; n++) {
            bus_fault_alloc_fail_nth(n, persistent);
            obj = (void *)1;
            rv = bus_type_registry_decode(r, "people.added", 1, buf, len,
                                          &obj, NULL, err, sizeof(err));
            if (!bus_fault_alloc_fired())
                break;
            assert_int_equal(rv, BUS_ENOMEM);
            assert_null(obj);
        }
        bus_fault_alloc_fail_nth(0, false);
        assert_int_equal(rv, BUS_OK);
        assert_true(n > 4); /* block, v2, strdup, v3, alloc */
        assert_string_equal(((person_v3 *)obj)->first, "Grace");
        bus_type_free(obj);
    }
    bus_codec_buf_free(buf, len);
    bus_type_registry_free(r);
}

static void
test_faults_event_new_typed(void **state)
{
    order_line lines[1] = {{"s", 1, 2}};
    order o = {"o", 1, {lines, 1}, false};
    static const char *const keys[] = {"a", "b", "c", "d", "e", "f", "g",
                                       "h", "i"};
    bus_header hs[9];
    bus_event_init init;
    bus_event *e;
    uint64_t n;
    int rv, i;

    (void)state;
    for (i = 0; i < 9; i++)
        hs[i] = (bus_header){keys[i], "v"};
    memset(&init, 0, sizeof(init));
    init.headers = hs;
    init.n_headers = 9; /* the header copy is allocated too */
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        e = (void *)1;
        rv = bus_event_new_typed(&e, &order_type, &o, &init, NULL, 0);
        if (!bus_fault_alloc_fired())
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(e);
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(rv, BUS_OK);
    /* Our header copy, the payload, bus_event_create's two temporary
     * arrays (more than 8 headers) and the event. */
    assert_int_equal(n, 6);
    bus_event_unref(e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_extremes),
        cmocka_unit_test(test_round_trip_special_floats),
        cmocka_unit_test(test_absent_values_and_large_bytes),
        cmocka_unit_test(test_round_trip_random),
        cmocka_unit_test(test_decode_is_one_allocation),
        cmocka_unit_test(test_missing_required_names_field),
        cmocka_unit_test(test_wrong_kind_names_path),
        cmocka_unit_test(test_integer_ranges),
        cmocka_unit_test(test_unknown_keys_are_skipped),
        cmocka_unit_test(test_duplicate_and_malformed),
        cmocka_unit_test(test_hostile_counts_are_bounded),
        cmocka_unit_test(test_other_writers_decode),
        cmocka_unit_test(test_encode_errors_name_field),
        cmocka_unit_test(test_validate_errors),
        cmocka_unit_test(test_validate_names_and_tables),
        cmocka_unit_test(test_unvalidated_tables_fail_cleanly),
        cmocka_unit_test(test_upcast_chain),
        cmocka_unit_test(test_registry_errors),
        cmocka_unit_test(test_event_new_typed_end_to_end),
        cmocka_unit_test(test_fuzz_never_crashes),
        cmocka_unit_test(test_faults_encode_decode),
        cmocka_unit_test(test_faults_registry_and_upcasting),
        cmocka_unit_test(test_faults_event_new_typed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
