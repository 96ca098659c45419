/*
 * The envelope codec (codec.h, docs/wire-format.md): round trips, a random
 * property test, every malformed-input rule with its error code, limits,
 * fuzzing, allocation faults, and a cross-check against msgpack-c as an
 * independent MessagePack implementation.
 *
 * Malformed frames are crafted with the mp.h writers (the test links the
 * internal bus_testing library) so that each case states its bytes. The
 * decoder must allocate nothing for them: expect_fail arms the allocation
 * counter (testing.h) with a failure that never comes and checks it stayed
 * at zero.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "codec_test_util.h"
#include "mp.h"
#include "test_support.h"
#include "testing.h"

#define N_PROPERTY 4000
#define N_FUZZ 30000

static uint8_t g_buf[1 << 18];
static uint8_t g_buf2[1 << 18];

/* ---- Helpers ------------------------------------------------------------- */

/* A fixed id: 0190c1a2-... as a UUIDv7 would start. */
static const uint8_t ID_BYTES[16] = {
    0x01, 0x90, 0xc1, 0xa2, 0x3b, 0x4c, 0x7d, 0x5e,
    0x8f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
};

static bus_event *
make_event(const char *type, const char *stream, uint64_t sver,
           const bus_header *hs, size_t nh, const void *payload, size_t plen)
{
    bus_event_init init;
    bus_event *e;
    bus_uuid id;

    memcpy(id.b, ID_BYTES, 16);
    memset(&init, 0, sizeof(init));
    init.type = type;
    init.stream = stream;
    init.stream_version = sver;
    init.headers = hs;
    init.n_headers = nh;
    init.payload = payload;
    init.payload_len = plen;
    init.id = &id;
    init.timestamp_ns = 1700000000123456789LL;
    assert_int_equal(bus_event_create(&e, &init), BUS_OK);
    return e;
}

/* Encodes into g_buf; returns the length and checks encoded_size. */
static size_t
encode(const bus_event *e)
{
    size_t w = 0;

    assert_int_equal(bus_codec_encode(e, g_buf, sizeof(g_buf), &w), BUS_OK);
    assert_int_equal(w, bus_codec_encoded_size(e));
    return w;
}

static bus_event *
decode_ok(const void *buf, size_t len, const bus_codec_limits *lim)
{
    char err[256] = "";
    bus_event *e = NULL;
    int rv = bus_codec_decode(&e, buf, len, lim, err, sizeof(err));

    if (rv != BUS_OK)
        print_message("decode: %s: %s\n", bus_err_name(rv), err);
    assert_int_equal(rv, BUS_OK);
    assert_non_null(e);
    /* Not frozen: the receiver may record the topic before publishing. */
    assert_false(bus_event_frozen(e));
    assert_int_equal(bus_event_refcount(e), 1);
    return e;
}

static void
roundtrip(const bus_event *e)
{
    size_t len = encode(e);
    bus_event *d = decode_ok(g_buf, len, NULL);

    ct_assert_events_equal(e, d);
    bus_event_unref(d);
}

/* Decodes expecting error want, at most max_allocs allocations (0 for
 * nearly every malformed frame: nothing is allocated before the frame has
 * been validated). Returns the error text. */
static const char *
expect_fail_allocs(const void *buf, size_t len, const bus_codec_limits *lim,
                   int want, uint64_t max_allocs)
{
    static char err[512];
    bus_event *e = (bus_event *)&err; /* must be reset to NULL */
    uint64_t allocs;
    int rv;

    err[0] = '\0';
    bus_fault_alloc_fail_nth(UINT64_MAX, false); /* count, never fail */
    rv = bus_codec_decode(&e, buf, len, lim, err, sizeof(err));
    allocs = bus_fault_alloc_count();
    bus_fault_alloc_fail_nth(0, false);
    if (rv != want)
        print_message("want %s, got %s: %s\n", bus_err_name(want),
                      bus_err_name(rv), err);
    assert_int_equal(rv, want);
    assert_null(e);
    assert_true(err[0] != '\0');
    assert_true(allocs <= max_allocs);
    return err;
}

static const char *
expect_fail(const void *buf, size_t len, const bus_codec_limits *lim,
            int want)
{
    return expect_fail_allocs(buf, len, lim, want, 0);
}

/* A map entry for crafted frames: key (a str) and raw value bytes. */
typedef struct kv {
    const char *key;
    const void *val;
    size_t vlen;
} kv;

#define LIT(s) (s), (sizeof(s) - 1)

static const kv BASE[] = {
    {"v", LIT("\x01")},
    {"id", LIT("\xc4\x10" "0123456789abcdef")},
    {"type", LIT("\xa3" "a.b")},
    {"ts", LIT("\x05")},
    {"p", LIT("\xc4\x02" "hi")},
};
#define N_BASE (sizeof(BASE) / sizeof(BASE[0]))

static size_t
craft(uint8_t *out, const kv *kvs, size_t n)
{
    uint8_t *p = mp_put_map(out, n);
    size_t i;

    for (i = 0; i < n; i++) {
        p = mp_put_str(p, kvs[i].key, strlen(kvs[i].key));
        memcpy(p, kvs[i].val, kvs[i].vlen);
        p += kvs[i].vlen;
    }
    return (size_t)(p - out);
}

/* The base frame with key's value replaced by val (appended when key is
 * not a base key; removed when val is NULL). */
static size_t
craft_with(uint8_t *out, const char *key, const void *val, size_t vlen)
{
    kv kvs[N_BASE + 1];
    size_t i, n = 0;
    bool found = false;

    for (i = 0; i < N_BASE; i++) {
        if (strcmp(BASE[i].key, key) == 0) {
            found = true;
            if (val == NULL)
                continue;
            kvs[n++] = (kv){key, val, vlen};
        } else {
            kvs[n++] = BASE[i];
        }
    }
    if (!found && val != NULL)
        kvs[n++] = (kv){key, val, vlen};
    return craft(out, kvs, n);
}

/* A str value of len bytes of c. */
static size_t
str_val(uint8_t *out, char c, size_t len)
{
    uint8_t *p = mp_put_str_hdr(out, len);

    memset(p, c, len);
    return (size_t)(p + len - out);
}

/* ---- Encoding and round trips -------------------------------------------- */

static void
test_limits_init_gives_documented_defaults(void **state)
{
    bus_codec_limits l;

    (void)state;
    memset(&l, 0xff, sizeof(l));
    bus_codec_limits_init(&l);
    assert_int_equal(l.max_frame, 64u << 20);
    assert_int_equal(l.max_payload, 16u << 20);
    assert_int_equal(l.max_headers, 64);
    assert_int_equal(l.max_string, 4096);
    assert_int_equal(l.max_depth, 16);
}

/* The exact bytes of a minimal frame: keys in the writer order, optional
 * keys at their default omitted, smallest encodings. */
static void
test_encode_minimal_frame_is_exact(void **state)
{
    static const uint8_t want[] = {
        0x85,                               /* map of 5 */
        0xa1, 'v', 0x01,                    /* "v": 1 */
        0xa2, 'i', 'd', 0xc4, 0x10,         /* "id": bin8 16 */
        0x01, 0x90, 0xc1, 0xa2, 0x3b, 0x4c, 0x7d, 0x5e,
        0x8f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
        0xa4, 't', 'y', 'p', 'e', 0xa3, 'a', '.', 'b',
        0xa2, 't', 's', 0xcf,               /* "ts": uint64 */
        0x17, 0x97, 0x9c, 0xfe, 0x3d, 0x85, 0xcd, 0x15,
        0xa1, 'p', 0xc4, 0x01, 'x',         /* "p": bin8 1 */
    };
    bus_event *e = make_event("a.b", NULL, 0, NULL, 0, "x", 1);
    size_t len = encode(e);

    (void)state;
    assert_int_equal(len, sizeof(want));
    assert_memory_equal(g_buf, want, sizeof(want));
    roundtrip(e);
    bus_event_unref(e);
}

static void
test_roundtrip_every_field(void **state)
{
    static const bus_header hs[] = {
        {BUS_H_CORRELATION_ID, "0190c1a2-3b4c-7d5e-8f60-718293a4b5c6"},
        {BUS_H_TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71"
                            "69203331-01"},
        {"content-type", "application/json"},
        {"x-empty", ""},
        {"clé-ünïcödé", "値 ✓ \xf0\x9f\x9a\x80"},
    };
    bus_event *e = make_event("orders.placed.ünïcödé", "order-42 ✓", 7, hs,
                              5, "{\"amount\":12}", 13);
    char keys[128];

    (void)state;
    assert_int_equal(bus_event_set_schema_version(e, 3), BUS_OK);
    assert_int_equal(bus_event_set_position(e, 123456789012345ULL), BUS_OK);
    ct_expected_keys(e, keys, sizeof(keys));
    assert_string_equal(keys, "v,id,type,sv,stream,sver,pos,ts,h,p");
    roundtrip(e);
    bus_event_unref(e);
}

/* Absent optional fields stay absent; "present but default" values that
 * have no distinct representation (sv 1, sver 0, pos 0) are omitted, while
 * an empty stream is present and kept. */
static void
test_roundtrip_optional_fields_absent_and_present(void **state)
{
    bus_event *e = make_event("a", NULL, 0, NULL, 0, NULL, 0);
    bus_event *d;
    size_t len;

    (void)state;
    len = encode(e);
    assert_int_equal(g_buf[0], 0x85); /* only the 5 required keys */
    d = decode_ok(g_buf, len, NULL);
    assert_null(bus_event_stream(d));
    assert_int_equal(bus_event_schema_version(d), 1);
    assert_int_equal(bus_event_header_count(d), 0);
    assert_int_equal(bus_event_payload_len(d), 0);
    ct_assert_events_equal(e, d);
    bus_event_unref(d);

    assert_int_equal(bus_event_set_stream(e, "", 0), BUS_OK);
    len = encode(e);
    assert_int_equal(g_buf[0], 0x86); /* + "stream": "" */
    d = decode_ok(g_buf, len, NULL);
    assert_non_null(bus_event_stream(d));
    assert_string_equal(bus_event_stream(d), "");
    bus_event_unref(d);

    bus_event_unref(e);
    /* A stream version without a stream (bus_event_create allows it) is
     * kept as is. */
    e = make_event("a", NULL, 9, NULL, 0, NULL, 0);
    roundtrip(e);
    bus_event_unref(e);
}

static void
test_roundtrip_integer_extremes(void **state)
{
    static const int64_t ts[] = {
        0, 1, -1, -32, -33, 127, 128, -128, -129, 255, 256, 32767, 32768,
        -32768, -32769, 65535, 65536, INT32_MAX, (int64_t)INT32_MAX + 1,
        INT32_MIN, (int64_t)INT32_MIN - 1, INT64_MAX, INT64_MIN,
    };
    static const uint64_t u[] = {
        1, 127, 128, 255, 256, 65535, 65536, UINT32_MAX,
        (uint64_t)UINT32_MAX + 1, UINT64_MAX,
    };
    bus_event *e = make_event("t", "s", 0, NULL, 0, NULL, 0);
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(ts) / sizeof(ts[0]); i++) {
        assert_int_equal(bus_event_set_timestamp(e, ts[i]), BUS_OK);
        roundtrip(e);
    }
    for (i = 0; i < sizeof(u) / sizeof(u[0]); i++) {
        assert_int_equal(bus_event_set_stream(e, "s", u[i]), BUS_OK);
        assert_int_equal(bus_event_set_position(e, u[i]), BUS_OK);
        if (u[i] <= UINT32_MAX)
            assert_int_equal(
                bus_event_set_schema_version(e, (uint32_t)u[i]), BUS_OK);
        roundtrip(e);
    }
    bus_event_unref(e);
}

static void
test_roundtrip_payload_sizes(void **state)
{
    static const size_t sizes[] = {
        0, 1, 31, 32, 255, 256, 65535, 65536, 200000,
    };
    static const size_t slens[] = {31, 32, 255, 256, 4096};
    uint8_t *p = malloc(200000);
    size_t i, j;

    (void)state;
    assert_non_null(p);
    for (i = 0; i < 200000; i++)
        p[i] = (uint8_t)(i * 31 + 7);
    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        bus_event *e = make_event("big", NULL, 0, NULL, 0, p, sizes[i]);
        roundtrip(e);
        bus_event_unref(e);
    }
    /* Strings across the str8/str16 boundaries too. */
    for (j = 0; j < sizeof(slens) / sizeof(slens[0]); j++) {
        char *s = malloc(slens[j] + 1);
        bus_event *e;
        bus_header h;
        memset(s, 'x', slens[j]);
        s[slens[j]] = '\0';
        h.key = s;
        h.value = s;
        e = make_event(s, s, 1, &h, 1, NULL, 0);
        roundtrip(e);
        bus_event_unref(e);
        free(s);
    }
    free(p);
}

/* Headers: the default limit (64), past the stack array (17 and more), and
 * a thousand with the limit raised. */
static void
test_roundtrip_many_headers(void **state)
{
    static const size_t counts[] = {1, 15, 16, 17, 64, 1000};
    char (*keys)[16] = malloc(1000 * 16), (*vals)[16] = malloc(1000 * 16);
    bus_header *hs = malloc(1000 * sizeof(*hs));
    bus_codec_limits lim;
    size_t i, c;

    (void)state;
    assert_non_null(keys);
    assert_non_null(vals);
    assert_non_null(hs);
    for (i = 0; i < 1000; i++) {
        snprintf(keys[i], 16, "k%zu", i);
        snprintf(vals[i], 16, "v%zu", i * 7);
        hs[i].key = keys[i];
        hs[i].value = vals[i];
    }
    bus_codec_limits_init(&lim);
    lim.max_headers = 1000;
    for (c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
        bus_event *e = make_event("h", NULL, 0, hs, counts[c], "p", 1);
        size_t len = encode(e);
        bus_event *d = decode_ok(g_buf, len, &lim);
        ct_assert_events_equal(e, d);
        bus_event_unref(d);
        if (counts[c] > 64)
            expect_fail_allocs(g_buf, len, NULL, BUS_ETOOBIG, 0);
        bus_event_unref(e);
    }
    free(keys);
    free(vals);
    free(hs);
}

/* Thousands of random envelopes: encode -> decode -> equal, the size
 * function is exact, and encoding is canonical (re-encoding the decoded
 * event gives the same bytes). */
static void
test_property_random_roundtrip(void **state)
{
    uint64_t rng = bt_seed();
    int i;

    (void)state;
    for (i = 0; i < N_PROPERTY; i++) {
        bus_event *e = ct_random_event(&rng), *d;
        size_t len = encode(e), len2 = 0;

        d = decode_ok(g_buf, len, NULL);
        ct_assert_events_equal(e, d);
        assert_int_equal(bus_codec_encode(d, g_buf2, len, &len2), BUS_OK);
        assert_int_equal(len2, len);
        assert_memory_equal(g_buf, g_buf2, len);
        bus_event_unref(d);
        bus_event_unref(e);
    }
}

static void
test_encode_small_buffer_is_enobufs_with_needed_size(void **state)
{
    bus_event *e = make_event("orders.placed", "o-1", 1, NULL, 0, "abc", 3);
    size_t need = bus_codec_encoded_size(e), w = 0;
    uint8_t *buf = malloc(need + 8);

    (void)state;
    assert_non_null(buf);
    memset(buf, 0xaa, need + 8);
    assert_int_equal(bus_codec_encode(e, buf, need - 1, &w), BUS_ENOBUFS);
    assert_int_equal(w, need);
    assert_int_equal(buf[0], 0xaa); /* nothing written */
    w = 0;
    assert_int_equal(bus_codec_encode(e, NULL, 0, &w), BUS_ENOBUFS);
    assert_int_equal(w, need);
    assert_int_equal(bus_codec_encode(e, buf, need, &w), BUS_OK);
    assert_int_equal(w, need);
    assert_int_equal(buf[need], 0xaa); /* not one byte past */
    assert_int_equal(bus_codec_encode(e, buf, need, NULL), BUS_OK);
    free(buf);
    bus_event_unref(e);
}

static void
test_encode_event_without_type_is_einval(void **state)
{
    bus_event *e;
    void *buf = (void *)1;
    size_t len = 1, w = 1;

    (void)state;
    assert_int_equal(bus_event_wrap(&e, "x", 1, NULL, NULL), BUS_OK);
    assert_int_equal(bus_codec_encode(e, g_buf, sizeof(g_buf), &w),
                     BUS_EINVAL);
    assert_int_equal(w, 0);
    assert_int_equal(bus_codec_encode_alloc(e, &buf, &len), BUS_EINVAL);
    assert_null(buf);
    assert_int_equal(len, 0);
    assert_int_equal(bus_event_set_type(e, "now.typed"), BUS_OK);
    roundtrip(e);
    bus_event_unref(e);
}

static void
test_encode_alloc_matches_encode(void **state)
{
    bus_event *e = make_event("a.b", "s", 3, NULL, 0, "payload", 7);
    void *buf;
    size_t len, w = encode(e);

    (void)state;
    assert_int_equal(bus_codec_encode_alloc(e, &buf, &len), BUS_OK);
    assert_int_equal(len, w);
    assert_memory_equal(buf, g_buf, len);
    bus_codec_buf_free(buf, len);
    bus_event_unref(e);
}

/* ---- Adopting decode ----------------------------------------------------- */

static int g_frees;
static void *g_freed_buf;
static void *g_freed_hint;

static void
count_free(void *buf, void *hint)
{
    g_frees++;
    g_freed_buf = buf;
    g_freed_hint = hint;
    free(buf);
}

static void *
dup_frame(const void *p, size_t len)
{
    void *c = malloc(len ? len : 1);

    assert_non_null(c);
    memcpy(c, p, len);
    return c;
}

static void
test_decode_adopt_payload_points_into_buffer(void **state)
{
    bus_event *e = make_event("a.b", "s", 2, NULL, 0, "zero-copy", 9), *d;
    size_t len = encode(e);
    uint8_t *buf = dup_frame(g_buf, len);
    int hint;

    (void)state;
    g_frees = 0;
    assert_int_equal(bus_codec_decode_adopt(&d, buf, len, count_free, &hint,
                                            NULL, NULL, 0),
                     BUS_OK);
    ct_assert_events_equal(e, d);
    assert_false(bus_event_frozen(d));
    assert_ptr_equal(bus_event_payload(d), buf + len - 9);
    assert_int_equal(g_frees, 0);
    bus_event_ref(d);
    bus_event_unref(d);
    assert_int_equal(g_frees, 0);
    bus_event_unref(d);
    assert_int_equal(g_frees, 1);
    assert_ptr_equal(g_freed_buf, buf);
    assert_ptr_equal(g_freed_hint, &hint);

    /* free_fn NULL: the buffer outlives the event and is referenced. */
    assert_int_equal(bus_codec_decode_adopt(&d, g_buf, len, NULL, NULL, NULL,
                                            NULL, 0),
                     BUS_OK);
    assert_ptr_equal(bus_event_payload(d), g_buf + len - 9);
    bus_event_unref(d);
    bus_event_unref(e);
}

static void
test_decode_adopt_frees_buffer_on_failure(void **state)
{
    static const uint8_t bad[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    uint8_t *buf = dup_frame(bad, sizeof(bad));
    bus_event *d = (bus_event *)1;
    char err[128];

    (void)state;
    g_frees = 0;
    assert_int_equal(bus_codec_decode_adopt(&d, buf, sizeof(bad), count_free,
                                            NULL, NULL, err, sizeof(err)),
                     BUS_EPROTO);
    assert_null(d);
    assert_int_equal(g_frees, 1);
    assert_ptr_equal(g_freed_buf, buf);
    /* Invalid arguments are failures too: free_fn still runs once. */
    g_frees = 0;
    buf = dup_frame(bad, sizeof(bad));
    assert_int_equal(bus_codec_decode_adopt(NULL, buf, sizeof(bad),
                                            count_free, NULL, NULL, NULL, 0),
                     BUS_EINVAL);
    assert_int_equal(g_frees, 1);
}

/* ---- Malformed input ----------------------------------------------------- */

/* A 5-byte array header claiming 4 billion elements: refused at once,
 * nothing allocated. Likewise other absurd top-level declarations. */
static void
test_decode_hostile_headers_allocate_nothing(void **state)
{
    static const struct {
        uint8_t b[8];
        size_t len;
    } cases[] = {
        {{0xdd, 0xff, 0xff, 0xff, 0xff}, 5}, /* array32 4G */
        {{0xdf, 0xff, 0xff, 0xff, 0xff}, 5}, /* map32 4G */
        {{0xde, 0xff, 0xff}, 3},             /* map16 65535 */
        {{0xc6, 0xff, 0xff, 0xff, 0xff}, 5}, /* bin32 4G */
        {{0xdb, 0xff, 0xff, 0xff, 0xff}, 5}, /* str32 4G */
        {{0x90}, 1},                         /* empty array */
        {{0xc0}, 1},                         /* nil */
        {{0xc1}, 1},                         /* never-used byte */
        {{0x80}, 1},                         /* empty map: keys missing */
        {{0x81}, 1},                         /* map of 1, no bytes */
    };
    size_t i;
    const char *err;

    (void)state;
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_fail(cases[i].b, cases[i].len, NULL, BUS_EPROTO);
    err = expect_fail(cases[0].b, cases[0].len, NULL, BUS_EPROTO);
    assert_non_null(strstr(err, "offset 0"));
    assert_non_null(strstr(err, "array"));
    expect_fail("", 0, NULL, BUS_EPROTO);
    expect_fail(NULL, 0, NULL, BUS_EPROTO);
}

static void
test_decode_top_level_array_is_eproto(void **state)
{
    uint8_t *p = mp_put_array(g_buf, 5);
    size_t i;

    (void)state;
    for (i = 0; i < N_BASE; i++) {
        memcpy(p, BASE[i].val, BASE[i].vlen);
        p += BASE[i].vlen;
    }
    expect_fail(g_buf, (size_t)(p - g_buf), NULL, BUS_EPROTO);
}

static void
test_decode_truncated_at_every_offset(void **state)
{
    static const bus_header hs[] = {{"k1", "v1"}, {"k2", "välue"}};
    bus_event *e = make_event("orders.placed", "order-1", 5, hs, 2,
                              "0123456789abcdef0123456789abcdef", 32);
    size_t len, cut;

    (void)state;
    assert_int_equal(bus_event_set_position(e, 1u << 20), BUS_OK);
    assert_int_equal(bus_event_set_schema_version(e, 2), BUS_OK);
    len = encode(e);
    for (cut = 0; cut < len; cut++) {
        /* An exact-size heap copy: ASan sees any read past the end. */
        uint8_t *b = dup_frame(g_buf, cut);
        expect_fail(b, cut, NULL, BUS_EPROTO);
        free(b);
    }
    bus_event_unref(e);
}

static void
test_decode_trailing_bytes_are_eproto(void **state)
{
    bus_event *e = make_event("a.b", NULL, 0, NULL, 0, "x", 1);
    size_t len = encode(e);
    const char *err;

    (void)state;
    g_buf[len] = 0xc0;
    err = expect_fail(g_buf, len + 1, NULL, BUS_EPROTO);
    assert_non_null(strstr(err, "trailing"));
    /* A second whole frame after the first is trailing bytes too. */
    memcpy(g_buf + len, g_buf, len);
    expect_fail(g_buf, 2 * len, NULL, BUS_EPROTO);
    bus_event_unref(e);
}

/* Random bit flips, byte overwrites, cuts and insertions: the decoder never
 * crashes (ASan/UBSan watch) and answers OK or a decoding error; anything
 * it accepts re-encodes and decodes to the same event. */
static void
test_decode_fuzz_never_crashes(void **state)
{
    enum { N_SEEDS = 32 };
    uint8_t *frames[N_SEEDS];
    size_t lens[N_SEEDS];
    uint64_t rng = bt_seed();
    size_t i, ok = 0;
    int it;

    (void)state;
    for (i = 0; i < N_SEEDS; i++) {
        bus_event *e = ct_random_event(&rng);
        assert_int_equal(bus_codec_encode_alloc(e, (void **)&frames[i],
                                                &lens[i]),
                         BUS_OK);
        bus_event_unref(e);
    }
    for (it = 0; it < N_FUZZ; it++) {
        size_t k = bt_rand(&rng) % N_SEEDS, len = lens[k], m, nmut;
        bus_event *d = NULL;
        char err[256];
        int rv;

        memcpy(g_buf, frames[k], len);
        nmut = 1 + bt_rand(&rng) % 4;
        for (m = 0; m < nmut && len > 0; m++) {
            size_t at = bt_rand(&rng) % len;
            switch (bt_rand(&rng) % 5) {
            case 0: case 1:
                g_buf[at] ^= (uint8_t)(1u << (bt_rand(&rng) % 8));
                break;
            case 2: g_buf[at] = (uint8_t)bt_rand(&rng); break;
            case 3: len = at; break;
            default:
                if (len + 1 < sizeof(g_buf)) {
                    memmove(g_buf + at + 1, g_buf + at, len - at);
                    g_buf[at] = (uint8_t)bt_rand(&rng);
                    len++;
                }
            }
        }
        {
            /* An exact-size heap copy: ASan sees any read past the end. */
            uint8_t *b = dup_frame(g_buf, len);
            rv = bus_codec_decode(&d, b, len, NULL, err, sizeof(err));
            free(b);
        }
        if (rv != BUS_OK) {
            assert_null(d);
            assert_true(rv == BUS_EPROTO || rv == BUS_ETOOBIG
                        || rv == BUS_EVERSION);
            continue;
        }
        ok++;
        {
            void *b2;
            size_t l2;
            bus_event *d2;
            assert_int_equal(bus_codec_encode_alloc(d, &b2, &l2), BUS_OK);
            d2 = decode_ok(b2, l2, NULL);
            ct_assert_events_equal(d, d2);
            bus_event_unref(d2);
            bus_codec_buf_free(b2, l2);
        }
        bus_event_unref(d);
    }
    print_message("fuzz: %zu of %d mutated frames still decoded\n", ok,
                  N_FUZZ);
    for (i = 0; i < N_SEEDS; i++)
        bus_codec_buf_free(frames[i], lens[i]);
}

/* Every known key given a value of each wrong MessagePack type. */
static void
test_decode_wrong_type_for_each_key_is_eproto(void **state)
{
    enum { W_UINT = 1, W_NINT = 2, W_STR = 4, W_BIN = 8, W_MAP = 16,
           W_OTHER = 32 };
    static const struct {
        const char *bytes;
        size_t len;
        unsigned kind;
    } wrongs[] = {
        {LIT("\xc0"), W_OTHER},                     /* nil */
        {LIT("\xc3"), W_OTHER},                     /* true */
        {LIT("\x01"), W_UINT},
        {LIT("\xff"), W_NINT},                      /* -1 */
        {LIT("\xd3\x80\x00\x00\x00\x00\x00\x00\x00"), W_NINT},
        {LIT("\xca\x3f\x80\x00\x00"), W_OTHER},     /* float 1.0 */
        {LIT("\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00"), W_OTHER},
        {LIT("\xa1x"), W_STR},
        {LIT("\xc4\x01x"), W_BIN},
        {LIT("\x91\x01"), W_OTHER},                 /* [1] */
        {LIT("\x81\xa1k\xa1v"), W_MAP},             /* {"k": "v"} */
        {LIT("\xd4\x01\x00"), W_OTHER},             /* fixext1 */
        {LIT("\xc1"), W_OTHER},                     /* never used */
    };
    static const struct {
        const char *key;
        unsigned ok;
    } keys[] = {
        {"v", W_UINT},     {"id", W_BIN},     {"type", W_STR},
        {"sv", W_UINT},    {"stream", W_STR}, {"sver", W_UINT},
        {"pos", W_UINT},   {"ts", W_UINT | W_NINT},
        {"h", W_MAP},      {"p", W_BIN},
    };
    size_t k, w, len, tested = 0;
    char quoted[16];

    (void)state;
    for (k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        snprintf(quoted, sizeof(quoted), "\"%s\"", keys[k].key);
        for (w = 0; w < sizeof(wrongs) / sizeof(wrongs[0]); w++) {
            const char *err;
            if (wrongs[w].kind & keys[k].ok)
                continue;
            len = craft_with(g_buf, keys[k].key, wrongs[w].bytes,
                             wrongs[w].len);
            err = expect_fail(g_buf, len, NULL, BUS_EPROTO);
            assert_non_null(strstr(err, quoted));
            assert_non_null(strstr(err, "offset"));
            tested++;
        }
    }
    assert_true(tested > 90);
    /* A ts above INT64_MAX is not a signed 64-bit integer. */
    len = craft_with(g_buf, "ts", LIT("\xcf\x80\x00\x00\x00\x00\x00\x00\x00"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
}

static void
test_decode_version_rules(void **state)
{
    size_t len;
    const char *err;
    kv kvs[N_BASE + 1];

    (void)state;
    len = craft_with(g_buf, "v", LIT("\x00"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "v", LIT("\x02"));
    err = expect_fail(g_buf, len, NULL, BUS_EVERSION);
    assert_non_null(strstr(err, "\"v\""));
    len = craft_with(g_buf, "v", LIT("\xcf\xff\xff\xff\xff\xff\xff\xff\xff"));
    expect_fail(g_buf, len, NULL, BUS_EVERSION);
    len = craft_with(g_buf, "v", LIT("\xa1" "1"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "v", NULL, 0);
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    /* Non-minimal encodings of 1 are still version 1. */
    len = craft_with(g_buf, "v", LIT("\xcf\x00\x00\x00\x00\x00\x00\x00\x01"));
    bus_event_unref(decode_ok(g_buf, len, NULL));
    len = craft_with(g_buf, "v", LIT("\xd0\x01"));
    bus_event_unref(decode_ok(g_buf, len, NULL));
    /* A future version wins over keys this reader would reject, as long
     * as "v" comes first (writers put it first). */
    kvs[0] = (kv){"v", LIT("\x02")};
    memcpy(kvs + 1, BASE + 1, (N_BASE - 1) * sizeof(kv));
    kvs[N_BASE] = (kv){"type", LIT("\x07")};
    len = craft(g_buf, kvs, N_BASE + 1);
    expect_fail(g_buf, len, NULL, BUS_EVERSION);
}

static void
test_decode_missing_required_key_is_eproto(void **state)
{
    static const char *const req[] = {"v", "id", "type", "ts", "p"};
    char quoted[16];
    size_t i, len;

    (void)state;
    for (i = 0; i < 5; i++) {
        const char *err;
        len = craft_with(g_buf, req[i], NULL, 0);
        err = expect_fail(g_buf, len, NULL, BUS_EPROTO);
        snprintf(quoted, sizeof(quoted), "\"%s\"", req[i]);
        assert_non_null(strstr(err, quoted));
        assert_non_null(strstr(err, "missing"));
    }
    len = craft(g_buf, BASE, N_BASE);
    bus_event_unref(decode_ok(g_buf, len, NULL));
}

static void
test_decode_duplicate_keys_are_eproto(void **state)
{
    static const kv opt[] = {
        {"sv", LIT("\x02")},         {"stream", LIT("\xa1s")},
        {"sver", LIT("\x03")},       {"pos", LIT("\x04")},
        {"h", LIT("\x81\xa1k\xa1v")},
    };
    kv kvs[N_BASE + 2];
    size_t i, len;

    (void)state;
    for (i = 0; i < N_BASE; i++) { /* a required key twice */
        memcpy(kvs, BASE, sizeof(BASE));
        kvs[N_BASE] = BASE[i];
        len = craft(g_buf, kvs, N_BASE + 1);
        assert_non_null(strstr(expect_fail(g_buf, len, NULL, BUS_EPROTO),
                               "duplicate"));
    }
    for (i = 0; i < sizeof(opt) / sizeof(opt[0]); i++) { /* optional twice */
        memcpy(kvs, BASE, sizeof(BASE));
        kvs[N_BASE] = opt[i];
        len = craft(g_buf, kvs, N_BASE + 1);
        bus_event_unref(decode_ok(g_buf, len, NULL));
        kvs[N_BASE + 1] = opt[i];
        len = craft(g_buf, kvs, N_BASE + 2);
        expect_fail(g_buf, len, NULL, BUS_EPROTO);
    }
}

/* Header map: duplicate keys (pairwise path and sorted path for many),
 * empty key, non-str key or value. */
static void
test_decode_header_map_rules(void **state)
{
    uint8_t hv[4096], *p;
    size_t len, i;
    bus_codec_limits lim;

    (void)state;
    len = craft_with(g_buf, "h", LIT("\x82\xa1k\xa1v\xa1k\xa1w"));
    assert_non_null(strstr(expect_fail(g_buf, len, NULL, BUS_EPROTO),
                           "duplicate header key \"k\""));
    len = craft_with(g_buf, "h", LIT("\x81\xa0\xa1v"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "h", LIT("\x81\x01\xa1v"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "h", LIT("\x81\xa1k\x01"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "h", LIT("\x81\xa1k\xc4\x01v"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "h", LIT("\x81\xa1k\xc0"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "h", LIT("\x80")); /* empty map: no headers */
    bus_event_unref(decode_ok(g_buf, len, NULL));

    /* 300 headers, the first and the last equal: found by the sort. */
    bus_codec_limits_init(&lim);
    lim.max_headers = 1000;
    for (i = 0; i < 2; i++) {
        size_t j;
        p = mp_put_map(hv, 300);
        for (j = 0; j < 300; j++) {
            char k[8];
            int n = snprintf(k, sizeof(k), "k%zu", j == 299 && i ? 0 : j);
            p = mp_put_str(p, k, (size_t)n);
            p = mp_put_str(p, "v", 1);
        }
        len = craft_with(g_buf, "h", hv, (size_t)(p - hv));
        if (i == 0) {
            bus_event *d = decode_ok(g_buf, len, &lim);
            assert_int_equal(bus_event_header_count(d), 300);
            assert_string_equal(bus_event_header(d, "k299"), "v");
            bus_event_unref(d);
        } else {
            assert_non_null(strstr(expect_fail_allocs(g_buf, len, &lim,
                                                      BUS_EPROTO, 1),
                                   "duplicate header key \"k0\""));
        }
    }
}

static void
test_decode_id_of_wrong_length_is_eproto(void **state)
{
    size_t len;

    (void)state;
    len = craft_with(g_buf, "id", LIT("\xc4\x00"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "id", LIT("\xc4\x0f" "0123456789abcde"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "id", LIT("\xc4\x11" "0123456789abcdefg"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "id", LIT("\xb0" "0123456789abcdef")); /* str */
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "id", LIT("\xc6\xff\xff\xff\xff")); /* 4G */
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    /* bin16 of 16 bytes is a valid (non-minimal) encoding. */
    len = craft_with(g_buf, "id", LIT("\xc5\x00\x10" "0123456789abcdef"));
    bus_event_unref(decode_ok(g_buf, len, NULL));
}

static void
test_decode_invalid_utf8_and_nul_are_eproto(void **state)
{
    static const char *const bad[] = {
        "\xc0\xaf",         /* overlong '/' */
        "\xe0\x80\xaf",     /* overlong, 3 bytes */
        "\xed\xa0\x80",     /* surrogate U+D800 */
        "\xe2\x82",         /* truncated sequence */
        "\x80",             /* lone continuation byte */
        "\xff",             /* never valid */
        "\xf4\x90\x80\x80", /* above U+10FFFF */
        "a\xc3",            /* cut at the end */
    };
    static const char *const where[] = {"type", "stream", "hkey", "hval"};
    /* Each bad sequence alone, in the tail after whole 8-byte words, and
     * in the first word of a longer string: the ASCII fast path reads
     * words. */
    static const size_t before[] = {0, 10, 3}, after[] = {0, 0, 12};
    uint8_t v[64], *p;
    char s[40];
    size_t i, w, len, n, at;

    (void)state;
    for (i = 0; i < 3 * (sizeof(bad) / sizeof(bad[0]) + 1); i++) {
        /* The last case: a NUL byte inside an otherwise fine string. */
        size_t b = i / 3;
        const char *bs = b < sizeof(bad) / sizeof(bad[0]) ? bad[b] : "\0";
        size_t bl = b < sizeof(bad) / sizeof(bad[0]) ? strlen(bs) : 1;
        at = i % 3;
        memset(s, 'a', sizeof(s));
        memcpy(s + before[at], bs, bl);
        n = before[at] + bl + after[at];
        for (w = 0; w < 4; w++) {
            if (w < 2) {
                p = mp_put_str(v, s, n);
                len = craft_with(g_buf, where[w], v, (size_t)(p - v));
            } else {
                p = mp_put_map(v, 1);
                p = w == 2 ? mp_put_str(p, s, n) : mp_put_str(p, "k", 1);
                p = w == 3 ? mp_put_str(p, s, n) : mp_put_str(p, "v", 1);
                len = craft_with(g_buf, "h", v, (size_t)(p - v));
            }
            assert_non_null(strstr(expect_fail(g_buf, len, NULL, BUS_EPROTO),
                                   "UTF-8"));
        }
    }
}

static void
test_decode_empty_type_is_eproto(void **state)
{
    size_t len = craft_with(g_buf, "type", LIT("\xa0"));

    (void)state;
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
}

static void
test_decode_schema_version_range(void **state)
{
    size_t len;
    bus_event *d;

    (void)state;
    len = craft_with(g_buf, "sv", LIT("\x00"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "sv", LIT("\xcf\x00\x00\x00\x01\x00\x00\x00\x00"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "sv", LIT("\xce\xff\xff\xff\xff"));
    d = decode_ok(g_buf, len, NULL);
    assert_int_equal(bus_event_schema_version(d), UINT32_MAX);
    bus_event_unref(d);
}

static void
test_decode_non_string_map_key_is_eproto(void **state)
{
    uint8_t *p;
    size_t i;

    (void)state;
    p = mp_put_map(g_buf, N_BASE + 1);
    for (i = 0; i < N_BASE; i++) {
        p = mp_put_str(p, BASE[i].key, strlen(BASE[i].key));
        memcpy(p, BASE[i].val, BASE[i].vlen);
        p += BASE[i].vlen;
    }
    p = mp_put_uint(p, 7); /* 7: "x" */
    p = mp_put_str(p, "x", 1);
    assert_non_null(strstr(expect_fail(g_buf, (size_t)(p - g_buf), NULL,
                                       BUS_EPROTO),
                           "map key 5"));
}

/* Unknown keys of any type are skipped, including nested containers, and
 * the result is the same event as without them. */
static void
test_decode_unknown_keys_are_skipped(void **state)
{
    static const kv extra[] = {
        {"x-future", LIT("\x82\xa1" "a\x93\x01\x02\x81\xa1" "b\xc0"
                         "\xa1" "c\xc4\x02zz")},
        {"f", LIT("\xcb\x40\x09\x21\xfb\x54\x44\x2d\x18")},
        {"e", LIT("\xc7\x03\x05" "abc")},          /* ext8 */
        {"e2", LIT("\xd8\x01" "0123456789abcdef")}, /* fixext16 */
        {"n", LIT("\xd3\x80\x00\x00\x00\x00\x00\x00\x00")},
        {"", LIT("\xc0")},                         /* empty key */
        {"V", LIT("\x09")},                         /* keys are exact */
        {"a-rather-long-unknown-key-name-over-32-bytes", LIT("\xc2")},
        {"x-future", LIT("\x90")},                 /* unknown twice: ok */
    };
    kv kvs[N_BASE + 9];
    bus_event *ref, *d;
    size_t len, i, n;

    (void)state;
    len = craft(g_buf, BASE, N_BASE);
    ref = decode_ok(g_buf, len, NULL);
    /* Interleave the unknown keys with the known ones. */
    for (i = 0, n = 0; i < 9; i++) {
        kvs[n++] = extra[i];
        if (i < N_BASE)
            kvs[n++] = BASE[i];
    }
    assert_int_equal(n, N_BASE + 9);
    len = craft(g_buf, kvs, n);
    d = decode_ok(g_buf, len, NULL);
    ct_assert_events_equal(ref, d);
    bus_event_unref(d);
    bus_event_unref(ref);
}

static void
test_decode_max_depth_bounds_skipped_values(void **state)
{
    uint8_t v[64];
    size_t len, k;
    bus_codec_limits lim;

    (void)state;
    for (k = 15; k <= 17; k++) { /* default depth 16 */
        memset(v, 0x91, k);      /* k nested one-element arrays */
        v[k] = 0x01;
        len = craft_with(g_buf, "deep", v, k + 1);
        if (k <= 16)
            bus_event_unref(decode_ok(g_buf, len, NULL));
        else
            assert_non_null(strstr(expect_fail(g_buf, len, NULL, BUS_EPROTO),
                                   "\"deep\""));
    }
    bus_codec_limits_init(&lim);
    lim.max_depth = 2;
    len = craft_with(g_buf, "deep", LIT("\x81\xa1k\x91\x01")); /* {k:[1]} */
    bus_event_unref(decode_ok(g_buf, len, &lim));
    len = craft_with(g_buf, "deep", LIT("\x81\xa1k\x91\x91\x01"));
    expect_fail(g_buf, len, &lim, BUS_EPROTO);
    /* Truncated unknown values are malformed, not skipped. */
    len = craft_with(g_buf, "x", LIT("\x92\x01"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
}

static void
test_decode_any_key_order(void **state)
{
    static const bus_header hs[] = {{"a", "1"}, {"b", "2"}};
    bus_event *e = make_event("t.x", "s-1", 4, hs, 2, "pp", 2), *d;
    uint8_t *p = g_buf2;
    mp_reader r;
    const uint8_t *starts[16], *ends[16];
    size_t n, i, len;

    (void)state;
    assert_int_equal(bus_event_set_position(e, 77), BUS_OK);
    len = encode(e);
    /* Split our frame into its entries and write them back reversed. */
    mp_reader_init(&r, g_buf, len);
    assert_int_equal(mp_read_map(&r, &n), BUS_OK);
    for (i = 0; i < n; i++) {
        starts[i] = r.p;
        assert_int_equal(mp_skip(&r, 4), BUS_OK);
        assert_int_equal(mp_skip(&r, 4), BUS_OK);
        ends[i] = r.p;
    }
    p = mp_put_map(p, n);
    for (i = n; i-- > 0;) {
        memcpy(p, starts[i], (size_t)(ends[i] - starts[i]));
        p += ends[i] - starts[i];
    }
    d = decode_ok(g_buf2, (size_t)(p - g_buf2), NULL);
    ct_assert_events_equal(e, d);
    bus_event_unref(d);
    bus_event_unref(e);
}

/* Each limit: at the limit decodes, one past is BUS_ETOOBIG. */
static void
test_decode_limits_each(void **state)
{
    bus_codec_limits lim;
    uint8_t v[8192];
    size_t len, n;

    (void)state;
    /* max_frame */
    len = craft(g_buf, BASE, N_BASE);
    bus_codec_limits_init(&lim);
    lim.max_frame = len;
    bus_event_unref(decode_ok(g_buf, len, &lim));
    lim.max_frame = len - 1;
    expect_fail(g_buf, len, &lim, BUS_ETOOBIG);

    /* max_payload: the base payload is 2 bytes */
    bus_codec_limits_init(&lim);
    lim.max_payload = 2;
    bus_event_unref(decode_ok(g_buf, len, &lim));
    lim.max_payload = 1;
    assert_non_null(strstr(expect_fail(g_buf, len, &lim, BUS_ETOOBIG),
                           "\"p\""));

    /* max_string, for type, stream, header key and value */
    bus_codec_limits_init(&lim);
    lim.max_string = 10;
    for (n = 10; n <= 11; n++) {
        int want = n == 10 ? BUS_OK : BUS_ETOOBIG;
        size_t vl = str_val(v, 't', n);
        uint8_t h[64], *p;
        len = craft_with(g_buf, "type", v, vl);
        if (want == BUS_OK)
            bus_event_unref(decode_ok(g_buf, len, &lim));
        else
            expect_fail(g_buf, len, &lim, want);
        len = craft_with(g_buf, "stream", v, vl);
        if (want == BUS_OK)
            bus_event_unref(decode_ok(g_buf, len, &lim));
        else
            expect_fail(g_buf, len, &lim, want);
        p = mp_put_map(h, 1);
        memcpy(p, v, vl);
        p = mp_put_str(p + vl, "v", 1);
        len = craft_with(g_buf, "h", h, (size_t)(p - h));
        if (want == BUS_OK)
            bus_event_unref(decode_ok(g_buf, len, &lim));
        else
            expect_fail(g_buf, len, &lim, want);
        p = mp_put_map(h, 1);
        p = mp_put_str(p, "k", 1);
        memcpy(p, v, vl);
        len = craft_with(g_buf, "h", h, (size_t)(p + vl - h));
        if (want == BUS_OK)
            bus_event_unref(decode_ok(g_buf, len, &lim));
        else
            expect_fail(g_buf, len, &lim, want);
    }
    /* The default max_string is 4096. */
    len = craft_with(g_buf, "type", v, str_val(v, 't', 4096));
    bus_event_unref(decode_ok(g_buf, len, NULL));
    len = craft_with(g_buf, "type", v, str_val(v, 't', 4097));
    expect_fail(g_buf, len, NULL, BUS_ETOOBIG);

    /* max_headers */
    bus_codec_limits_init(&lim);
    lim.max_headers = 2;
    len = craft_with(g_buf, "h", LIT("\x82\xa1" "a\xa0\xa1" "b\xa0"));
    bus_event_unref(decode_ok(g_buf, len, &lim));
    len = craft_with(g_buf, "h",
                     LIT("\x83\xa1" "a\xa0\xa1" "b\xa0\xa1" "c\xa0"));
    assert_non_null(strstr(expect_fail(g_buf, len, &lim, BUS_ETOOBIG),
                           "\"h\""));

    /* max_depth is covered by its own test. Limits above the event's own
     * ceilings are clamped: no string over 65535 bytes. */
    {
        uint8_t *big = malloc(70000);
        uint8_t *frame = malloc(70100);
        assert_non_null(big);
        assert_non_null(frame);
        bus_codec_limits_init(&lim);
        lim.max_string = 1u << 20;
        len = craft_with(frame, "type", big, str_val(big, 't', 65536));
        expect_fail(frame, len, &lim, BUS_ETOOBIG);
        len = craft_with(frame, "type", big, str_val(big, 't', 65535));
        bus_event_unref(decode_ok(frame, len, &lim));
        free(big);
        free(frame);
    }
}

/* The declared length is judged before the bytes behind it: a short frame
 * declaring a huge string, payload or header count is BUS_ETOOBIG (the
 * limit), not a truncation, and costs nothing. Within the limit, the same
 * shortfall is BUS_EPROTO. */
static void
test_decode_declared_lengths_checked_before_reading(void **state)
{
    bus_codec_limits lim;
    size_t len;

    (void)state;
    len = craft_with(g_buf, "type", LIT("\xdb\x7f\xff\xff\xff"));
    expect_fail(g_buf, len, NULL, BUS_ETOOBIG);
    len = craft_with(g_buf, "stream", LIT("\xda\xff\xff"));
    expect_fail(g_buf, len, NULL, BUS_ETOOBIG);
    len = craft_with(g_buf, "p", LIT("\xc6\xff\xff\xff\xff"));
    expect_fail(g_buf, len, NULL, BUS_ETOOBIG);
    len = craft_with(g_buf, "h", LIT("\xdf\xff\xff\xff\xff"));
    expect_fail(g_buf, len, NULL, BUS_ETOOBIG);
    len = craft_with(g_buf, "h", LIT("\xde\x00\x3f")); /* 63: in limit */
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "p", LIT("\xc5\x03\xe8" "ab")); /* 1000 */
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    len = craft_with(g_buf, "type", LIT("\xd9\x20" "ab"));
    expect_fail(g_buf, len, NULL, BUS_EPROTO);
    bus_codec_limits_init(&lim);
    lim.max_payload = UINT32_MAX;
    len = craft_with(g_buf, "p", LIT("\xc6\xff\xff\xff\xff"));
    expect_fail(g_buf, len, &lim, BUS_EPROTO);
}

static void
test_errbuf_names_key_and_offset(void **state)
{
    char err[256], tiny[8];
    bus_event *d;
    size_t len = craft_with(g_buf, "type", LIT("\x01"));

    (void)state;
    assert_int_equal(bus_codec_decode(&d, g_buf, len, NULL, err, sizeof(err)),
                     BUS_EPROTO);
    /* map(1) "v"(2) 1(1) "id"(3) bin(18) "type"(5): value at 30 */
    assert_string_equal(err, "key \"type\" at offset 30: expected str, "
                             "got integer");
    len = craft_with(g_buf, "h", LIT("\x81\xa1k\x01"));
    assert_int_equal(bus_codec_decode(&d, g_buf, len, NULL, err, sizeof(err)),
                     BUS_EPROTO);
    assert_string_equal(err, "key \"h\" at offset 49: header value: "
                             "expected str, got integer");
    /* A short errbuf is truncated, never overrun; none at all is fine. */
    memset(tiny, 'z', sizeof(tiny));
    assert_int_equal(bus_codec_decode(&d, g_buf, len, NULL, tiny, 4),
                     BUS_EPROTO);
    assert_int_equal(tiny[3], '\0');
    assert_int_equal(tiny[4], 'z');
    assert_int_equal(bus_codec_decode(&d, g_buf, len, NULL, NULL, 0),
                     BUS_EPROTO);
    assert_int_equal(bus_codec_decode(NULL, g_buf, len, NULL, NULL, 0),
                     BUS_EINVAL);
}

/* ---- Allocation faults --------------------------------------------------- */

static void
fault_decode_loop(const void *frame, size_t len, const bus_event *want,
                  bool adopt)
{
    uint64_t n;

    for (n = 1;; n++) {
        bus_event *d = NULL;
        int rv;
        g_frees = 0;
        bus_fault_alloc_fail_nth(n, false);
        if (adopt) {
            void *buf = dup_frame(frame, len);
            rv = bus_codec_decode_adopt(&d, buf, len, count_free, NULL, NULL,
                                        NULL, 0);
        } else {
            rv = bus_codec_decode(&d, frame, len, NULL, NULL, 0);
        }
        if (!bus_fault_alloc_fired()) {
            bus_fault_alloc_fail_nth(0, false);
            assert_int_equal(rv, BUS_OK);
            ct_assert_events_equal(want, d);
            bus_event_unref(d);
            if (adopt)
                assert_int_equal(g_frees, 1);
            break;
        }
        bus_fault_alloc_fail_nth(0, false);
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(d);
        if (adopt)
            assert_int_equal(g_frees, 1); /* freed on failure, once */
    }
    assert_true(n > 1);
}

static void
test_fault_decode_returns_enomem_cleanly(void **state)
{
    static const bus_header hs[] = {{"a", "1"}, {"b", "2"}};
    bus_header many[20];
    char keys[20][8];
    bus_event *e;
    size_t len, i;

    (void)state;
    e = make_event("f.t", "s", 1, hs, 2, "payload", 7);
    len = encode(e);
    fault_decode_loop(g_buf, len, e, false);
    fault_decode_loop(g_buf, len, e, true);
    bus_event_unref(e);
    /* More headers than the stack array: two allocations to fail. */
    for (i = 0; i < 20; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%zu", i);
        many[i].key = keys[i];
        many[i].value = "v";
    }
    e = make_event("f.t", NULL, 0, many, 20, "x", 1);
    len = encode(e);
    fault_decode_loop(g_buf, len, e, false);
    fault_decode_loop(g_buf, len, e, true);
    bus_event_unref(e);
}

static void
test_fault_encode_alloc_returns_enomem_cleanly(void **state)
{
    bus_event *e = make_event("f.t", "s", 1, NULL, 0, "payload", 7);
    uint64_t n;

    (void)state;
    for (n = 1;; n++) {
        void *buf = (void *)1;
        size_t len = 1;
        int rv;
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_codec_encode_alloc(e, &buf, &len);
        if (!bus_fault_alloc_fired()) {
            bus_fault_alloc_fail_nth(0, false);
            assert_int_equal(rv, BUS_OK);
            assert_int_equal(len, bus_codec_encoded_size(e));
            bus_codec_buf_free(buf, len);
            break;
        }
        bus_fault_alloc_fail_nth(0, false);
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(buf);
        assert_int_equal(len, 0);
    }
    assert_int_equal(n, 2);
    bus_event_unref(e);
}

/* ---- Cross-check with msgpack-c ------------------------------------------ */

static void
mpc_key(msgpack_packer *pk, const char *k)
{
    msgpack_pack_str(pk, strlen(k));
    msgpack_pack_str_body(pk, k, strlen(k));
}

static void
mpc_str(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

/* Packs e with msgpack-c following docs/wire-format.md, from the public
 * getters only. reverse: keys in the opposite order, plus an unknown key. */
static void
mpc_pack(msgpack_packer *pk, const bus_event *e, bool reverse)
{
    size_t nk = 5, i, step;
    bool sv = bus_event_schema_version(e) != 1;
    bool st = bus_event_stream(e) != NULL;
    bool sver = bus_event_stream_version(e) != 0;
    bool pos = bus_event_position(e) != 0;
    bool h = bus_event_header_count(e) != 0;

    nk += sv + st + sver + pos + h + reverse;
    msgpack_pack_map(pk, nk);
    for (step = 0; step < 11; step++) {
        switch (reverse ? 10 - step : step) {
        case 0:
            mpc_key(pk, "v");
            msgpack_pack_uint64(pk, BUS_WIRE_VERSION);
            break;
        case 1:
            mpc_key(pk, "id");
            msgpack_pack_bin(pk, 16);
            msgpack_pack_bin_body(pk, bus_event_id(e)->b, 16);
            break;
        case 2:
            mpc_key(pk, "type");
            mpc_str(pk, bus_event_type(e));
            break;
        case 3:
            if (sv) {
                mpc_key(pk, "sv");
                msgpack_pack_uint32(pk, bus_event_schema_version(e));
            }
            break;
        case 4:
            if (st) {
                mpc_key(pk, "stream");
                mpc_str(pk, bus_event_stream(e));
            }
            break;
        case 5:
            if (sver) {
                mpc_key(pk, "sver");
                msgpack_pack_uint64(pk, bus_event_stream_version(e));
            }
            break;
        case 6:
            if (pos) {
                mpc_key(pk, "pos");
                msgpack_pack_uint64(pk, bus_event_position(e));
            }
            break;
        case 7:
            mpc_key(pk, "ts");
            msgpack_pack_int64(pk, bus_event_timestamp(e));
            break;
        case 8:
            if (h) {
                mpc_key(pk, "h");
                msgpack_pack_map(pk, bus_event_header_count(e));
                for (i = 0; i < bus_event_header_count(e); i++) {
                    const char *k, *v;
                    bus_event_header_at(e, i, &k, &v);
                    mpc_str(pk, k);
                    mpc_str(pk, v);
                }
            }
            break;
        case 9:
            mpc_key(pk, "p");
            msgpack_pack_bin(pk, bus_event_payload_len(e));
            msgpack_pack_bin_body(pk, bus_event_payload(e),
                                  bus_event_payload_len(e));
            break;
        default:
            if (reverse) {
                mpc_key(pk, "x-unknown");
                msgpack_pack_array(pk, 2);
                msgpack_pack_double(pk, 2.5);
                msgpack_pack_nil(pk);
            }
        }
    }
}

static bool
mpc_key_is(const msgpack_object *k, const char *s)
{
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(s)
        && memcmp(k->via.str.ptr, s, k->via.str.size) == 0;
}

static void
mpc_assert_str(const msgpack_object *o, const char *want)
{
    assert_int_equal(o->type, MSGPACK_OBJECT_STR);
    assert_int_equal(o->via.str.size, strlen(want));
    assert_memory_equal(o->via.str.ptr, want, strlen(want));
}

static uint64_t
mpc_uint(const msgpack_object *o)
{
    assert_int_equal(o->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    return o->via.u64;
}

/* Unpacks our frame with msgpack-c and checks every field against e. */
static void
mpc_check_frame(const void *frame, size_t len, const bus_event *e)
{
    msgpack_unpacked u;
    size_t off = 0, i, j;
    unsigned seen = 0;
    const msgpack_object_map *m;

    msgpack_unpacked_init(&u);
    assert_int_equal(msgpack_unpack_next(&u, frame, len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, len);
    assert_int_equal(u.data.type, MSGPACK_OBJECT_MAP);
    m = &u.data.via.map;
    for (i = 0; i < m->size; i++) {
        const msgpack_object *k = &m->ptr[i].key, *v = &m->ptr[i].val;
        if (mpc_key_is(k, "v")) {
            assert_int_equal(mpc_uint(v), 1);
            seen |= 1;
        } else if (mpc_key_is(k, "id")) {
            assert_int_equal(v->type, MSGPACK_OBJECT_BIN);
            assert_int_equal(v->via.bin.size, 16);
            assert_memory_equal(v->via.bin.ptr, bus_event_id(e)->b, 16);
            seen |= 2;
        } else if (mpc_key_is(k, "type")) {
            mpc_assert_str(v, bus_event_type(e));
            seen |= 4;
        } else if (mpc_key_is(k, "sv")) {
            assert_int_equal(mpc_uint(v), bus_event_schema_version(e));
            assert_int_not_equal(bus_event_schema_version(e), 1);
        } else if (mpc_key_is(k, "stream")) {
            assert_non_null(bus_event_stream(e));
            mpc_assert_str(v, bus_event_stream(e));
            seen |= 8;
        } else if (mpc_key_is(k, "sver")) {
            assert_true(mpc_uint(v) == bus_event_stream_version(e));
        } else if (mpc_key_is(k, "pos")) {
            assert_true(mpc_uint(v) == bus_event_position(e));
        } else if (mpc_key_is(k, "ts")) {
            int64_t ts = v->type == MSGPACK_OBJECT_POSITIVE_INTEGER
                       ? (int64_t)v->via.u64 : v->via.i64;
            assert_true(v->type == MSGPACK_OBJECT_POSITIVE_INTEGER
                        || v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER);
            assert_true(ts == bus_event_timestamp(e));
            seen |= 16;
        } else if (mpc_key_is(k, "h")) {
            assert_int_equal(v->type, MSGPACK_OBJECT_MAP);
            assert_int_equal(v->via.map.size, bus_event_header_count(e));
            for (j = 0; j < v->via.map.size; j++) {
                const char *hk, *hv;
                bus_event_header_at(e, j, &hk, &hv);
                mpc_assert_str(&v->via.map.ptr[j].key, hk);
                mpc_assert_str(&v->via.map.ptr[j].val, hv);
            }
        } else if (mpc_key_is(k, "p")) {
            assert_int_equal(v->type, MSGPACK_OBJECT_BIN);
            assert_int_equal(v->via.bin.size, bus_event_payload_len(e));
            if (v->via.bin.size > 0)
                assert_memory_equal(v->via.bin.ptr, bus_event_payload(e),
                                    v->via.bin.size);
            seen |= 32;
        } else {
            fail_msg("unexpected key in our frame");
        }
    }
    assert_int_equal(seen & ~8u, 1 | 2 | 4 | 16 | 32);
    assert_int_equal(!!(seen & 8), bus_event_stream(e) != NULL);
    msgpack_unpacked_destroy(&u);
}

/* msgpack-c, following the spec, writes the same bytes as we do (both use
 * the smallest encodings), decodes with ours, and reads our frames back to
 * the same fields. */
static void
test_msgpackc_cross_check(void **state)
{
    uint64_t rng = bt_seed();
    msgpack_sbuffer sb;
    msgpack_packer pk;
    int i;

    (void)state;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    for (i = 0; i < 500; i++) {
        bus_event *e = ct_random_event(&rng), *d;
        size_t len = encode(e);

        msgpack_sbuffer_clear(&sb);
        mpc_pack(&pk, e, false);
        assert_int_equal(sb.size, len);
        assert_memory_equal(sb.data, g_buf, len);
        d = decode_ok(sb.data, sb.size, NULL);
        ct_assert_events_equal(e, d);
        bus_event_unref(d);

        msgpack_sbuffer_clear(&sb);
        mpc_pack(&pk, e, true); /* other order, unknown key */
        d = decode_ok(sb.data, sb.size, NULL);
        ct_assert_events_equal(e, d);
        bus_event_unref(d);

        mpc_check_frame(g_buf, len, e);
        bus_event_unref(e);
    }
    msgpack_sbuffer_destroy(&sb);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_limits_init_gives_documented_defaults),
        cmocka_unit_test(test_encode_minimal_frame_is_exact),
        cmocka_unit_test(test_roundtrip_every_field),
        cmocka_unit_test(test_roundtrip_optional_fields_absent_and_present),
        cmocka_unit_test(test_roundtrip_integer_extremes),
        cmocka_unit_test(test_roundtrip_payload_sizes),
        cmocka_unit_test(test_roundtrip_many_headers),
        cmocka_unit_test(test_property_random_roundtrip),
        cmocka_unit_test(test_encode_small_buffer_is_enobufs_with_needed_size),
        cmocka_unit_test(test_encode_event_without_type_is_einval),
        cmocka_unit_test(test_encode_alloc_matches_encode),
        cmocka_unit_test(test_decode_adopt_payload_points_into_buffer),
        cmocka_unit_test(test_decode_adopt_frees_buffer_on_failure),
        cmocka_unit_test(test_decode_hostile_headers_allocate_nothing),
        cmocka_unit_test(test_decode_top_level_array_is_eproto),
        cmocka_unit_test(test_decode_truncated_at_every_offset),
        cmocka_unit_test(test_decode_trailing_bytes_are_eproto),
        cmocka_unit_test(test_decode_fuzz_never_crashes),
        cmocka_unit_test(test_decode_wrong_type_for_each_key_is_eproto),
        cmocka_unit_test(test_decode_version_rules),
        cmocka_unit_test(test_decode_missing_required_key_is_eproto),
        cmocka_unit_test(test_decode_duplicate_keys_are_eproto),
        cmocka_unit_test(test_decode_header_map_rules),
        cmocka_unit_test(test_decode_id_of_wrong_length_is_eproto),
        cmocka_unit_test(test_decode_invalid_utf8_and_nul_are_eproto),
        cmocka_unit_test(test_decode_empty_type_is_eproto),
        cmocka_unit_test(test_decode_schema_version_range),
        cmocka_unit_test(test_decode_non_string_map_key_is_eproto),
        cmocka_unit_test(test_decode_unknown_keys_are_skipped),
        cmocka_unit_test(test_decode_max_depth_bounds_skipped_values),
        cmocka_unit_test(test_decode_any_key_order),
        cmocka_unit_test(test_decode_limits_each),
        cmocka_unit_test(test_decode_declared_lengths_checked_before_reading),
        cmocka_unit_test(test_errbuf_names_key_and_offset),
        cmocka_unit_test(test_fault_decode_returns_enomem_cleanly),
        cmocka_unit_test(test_fault_encode_alloc_returns_enomem_cleanly),
        cmocka_unit_test(test_msgpackc_cross_check),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
