/* Helpers shared by the codec tests (codec_test_util.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_test_util.h"
#include "test_support.h"

static size_t
ct_put_cp(char *out, uint32_t cp)
{
    uint8_t *o = (uint8_t *)out;

    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xc0 | cp >> 6);
        o[1] = (uint8_t)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xe0 | cp >> 12);
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (uint8_t)(0xf0 | cp >> 18);
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (uint8_t)(0x80 | (cp & 0x3f));
    return 4;
}

size_t
ct_random_utf8(uint64_t *rng, char *out, size_t min_cp, size_t max_cp)
{
    size_t n = min_cp + bt_rand(rng) % (max_cp - min_cp + 1), len = 0, i;

    for (i = 0; i < n; i++) {
        uint64_t r = bt_rand(rng);
        uint32_t cp;
        switch (r % 8) {
        case 0: cp = 0x80 + (uint32_t)(r >> 8) % (0x800 - 0x80); break;
        case 1:
            cp = 0x800 + (uint32_t)(r >> 8) % (0x10000 - 0x800);
            if (cp >= 0xd800 && cp <= 0xdfff) /* surrogates are not UTF-8 */
                cp -= 0x800;
            break;
        case 2: cp = 0x10000 + (uint32_t)(r >> 8) % (0x110000 - 0x10000);
            break;
        default: cp = 0x20 + (uint32_t)(r >> 8) % (0x7f - 0x20); break;
        }
        len += ct_put_cp(out + len, cp);
    }
    out[len] = '\0';
    return len;
}

bus_event *
ct_random_event(uint64_t *rng)
{
    char type[4 * 40 + 1], stream[4 * 40 + 1];
    char keys[20][4 * 8 + 16], vals[20][4 * 24 + 1];
    bus_header hs[20];
    static uint8_t payload[70000];
    bus_event_init init;
    bus_uuid id;
    bus_event *e;
    uint64_t r = bt_rand(rng);
    int64_t ts;
    size_t i, n;

    memset(&init, 0, sizeof(init));
    for (i = 0; i < sizeof(id.b); i++)
        id.b[i] = (uint8_t)bt_rand(rng);
    init.id = &id;
    ct_random_utf8(rng, type, 1, 40);
    init.type = type;
    init.schema_version = r % 3 == 0 ? 1 + (uint32_t)(bt_rand(rng) >> 33)
                        : r % 3 == 1 ? 1 : 0;
    if (r & 8) {
        ct_random_utf8(rng, stream, 0, 40);
        init.stream = stream;
    }
    if (r & 16) /* may be set without a stream: the codec keeps it */
        init.stream_version = bt_rand(rng) >> (bt_rand(rng) % 64);
    n = (r >> 8) % 4 == 0 ? bt_rand(rng) % 21 : (r >> 8) % 3;
    for (i = 0; i < n; i++) {
        size_t kl = ct_random_utf8(rng, keys[i], 0, 8);
        snprintf(keys[i] + kl, sizeof(keys[i]) - kl, "#%zu", i); /* unique */
        ct_random_utf8(rng, vals[i], 0, 24);
        hs[i].key = keys[i];
        hs[i].value = vals[i];
    }
    init.headers = hs;
    init.n_headers = n;
    init.payload_len = (r >> 16) % 50 == 0 ? 65536 + bt_rand(rng) % 4000
                                           : bt_rand(rng) % 300;
    for (i = 0; i < init.payload_len; i++)
        payload[i] = (uint8_t)bt_rand(rng);
    init.payload = payload;
    assert_int_equal(bus_event_create(&e, &init), BUS_OK);
    /* Signed values of every width, 0 and the extremes included. */
    ts = (int64_t)(bt_rand(rng) >> (1 + bt_rand(rng) % 63));
    if ((r >> 32) & 1)
        ts = -ts - 1;
    if ((r >> 24) % 10 == 0)
        ts = (r >> 28) % 3 == 0 ? INT64_MIN : (r >> 28) % 3 == 1 ? 0
                                                                : INT64_MAX;
    assert_int_equal(bus_event_set_timestamp(e, ts), BUS_OK);
    if (r & 32)
        assert_int_equal(
            bus_event_set_position(e, bt_rand(rng) >> (bt_rand(rng) % 64)),
            BUS_OK);
    return e;
}

void
ct_assert_events_equal(const bus_event *a, const bus_event *b)
{
    size_t i, n;

    assert_memory_equal(bus_event_id(a)->b, bus_event_id(b)->b, 16);
    assert_string_equal(bus_event_type(a), bus_event_type(b));
    assert_int_equal(bus_event_schema_version(a),
                     bus_event_schema_version(b));
    if (bus_event_stream(a) == NULL)
        assert_null(bus_event_stream(b));
    else {
        assert_non_null(bus_event_stream(b));
        assert_string_equal(bus_event_stream(a), bus_event_stream(b));
    }
    assert_true(bus_event_stream_version(a) == bus_event_stream_version(b));
    assert_true(bus_event_position(a) == bus_event_position(b));
    assert_true(bus_event_timestamp(a) == bus_event_timestamp(b));
    n = bus_event_header_count(a);
    assert_int_equal(n, bus_event_header_count(b));
    for (i = 0; i < n; i++) {
        const char *ka, *va, *kb, *vb;
        assert_true(bus_event_header_at(a, i, &ka, &va));
        assert_true(bus_event_header_at(b, i, &kb, &vb));
        assert_string_equal(ka, kb);
        assert_string_equal(va, vb);
    }
    assert_int_equal(bus_event_payload_len(a), bus_event_payload_len(b));
    if (bus_event_payload_len(a) > 0)
        assert_memory_equal(bus_event_payload(a), bus_event_payload(b),
                            bus_event_payload_len(a));
}

void
ct_hex(const void *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    const uint8_t *b = p;
    size_t i;

    for (i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static int
ct_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

size_t
ct_unhex(const char *hex, size_t hexlen, uint8_t *out)
{
    size_t i;

    if (hexlen % 2 != 0)
        return (size_t)-1;
    for (i = 0; i < hexlen / 2; i++) {
        int hi = ct_digit(hex[2 * i]), lo = ct_digit(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return (size_t)-1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return hexlen / 2;
}

/* Appends to a growing malloc'd string. */
typedef struct ct_str {
    char *p;
    size_t len, cap;
} ct_str;

static char *
ct_room(ct_str *s, size_t n)
{
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 256;
        while (s->len + n + 1 > cap)
            cap *= 2;
        s->p = realloc(s->p, cap);
        assert_non_null(s->p);
        s->cap = cap;
    }
    return s->p + s->len;
}

static void
ct_puts(ct_str *s, const char *txt)
{
    size_t n = strlen(txt);

    memcpy(ct_room(s, n), txt, n + 1);
    s->len += n;
}

static void
ct_puthex(ct_str *s, const void *p, size_t n)
{
    ct_hex(p, n, ct_room(s, 2 * n));
    s->len += 2 * n;
}

char *
ct_dump(const bus_event *e)
{
    ct_str s = {NULL, 0, 0};
    char num[96];
    size_t i;

    ct_puts(&s, "id=");
    ct_puthex(&s, bus_event_id(e)->b, 16);
    ct_puts(&s, " type=");
    ct_puthex(&s, bus_event_type(e), strlen(bus_event_type(e)));
    snprintf(num, sizeof(num), " sv=%u stream=", bus_event_schema_version(e));
    ct_puts(&s, num);
    if (bus_event_stream(e) == NULL)
        ct_puts(&s, "-");
    else
        ct_puthex(&s, bus_event_stream(e), strlen(bus_event_stream(e)));
    snprintf(num, sizeof(num), " sver=%llu pos=%llu ts=%lld h=",
             (unsigned long long)bus_event_stream_version(e),
             (unsigned long long)bus_event_position(e),
             (long long)bus_event_timestamp(e));
    ct_puts(&s, num);
    for (i = 0; i < bus_event_header_count(e); i++) {
        const char *k, *v;
        bus_event_header_at(e, i, &k, &v);
        if (i > 0)
            ct_puts(&s, ",");
        ct_puthex(&s, k, strlen(k));
        ct_puts(&s, ":");
        ct_puthex(&s, v, strlen(v));
    }
    ct_puts(&s, " p=");
    ct_puthex(&s, bus_event_payload(e), bus_event_payload_len(e));
    return s.p;
}

void
ct_expected_keys(const bus_event *e, char *out, size_t cap)
{
    snprintf(out, cap, "v,id,type%s%s%s%s,ts%s,p",
             bus_event_schema_version(e) != 1 ? ",sv" : "",
             bus_event_stream(e) != NULL ? ",stream" : "",
             bus_event_stream_version(e) != 0 ? ",sver" : "",
             bus_event_position(e) != 0 ? ",pos" : "",
             bus_event_header_count(e) != 0 ? ",h" : "");
}
