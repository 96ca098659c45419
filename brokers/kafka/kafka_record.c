/*
 * Bus events <-> Kafka records (format: docs/brokers/kafka.md), topic
 * names and subscription patterns.
 *
 * Design:
 * - The payload is the record value, the stream id its key; the envelope
 *   rides in headers, CloudEvents Kafka binary mode where it fits, so that
 *   any Kafka client reads and writes our events without our code.
 * - Consuming is lenient: a record from another producer may lack any of
 *   our headers or carry headers an event cannot hold (binary values,
 *   duplicate names); those are skipped, never fatal, and every derived
 *   field is a pure function of the record, so a redelivered record
 *   becomes the same event (same id).
 * - The consumed event is built in one allocation with bus__event_build
 *   from (pointer, length) pairs into the record: header values are not
 *   NUL-terminated, and copying them first would cost a second pass.
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "event_impl.h"
#include "kafka_impl.h"
#include "mp.h"
#include "topic.h"

/* Our header names (docs/brokers/kafka.md). */
#define H_SPECVERSION "ce_specversion"
#define H_ID "ce_id"
#define H_TYPE "ce_type"
#define H_SOURCE "ce_source"
#define H_TIME "ce_time"
#define H_SCHEMA "bus_schema_version"
#define H_STREAM "bus_stream"
#define H_STREAM_VERSION "bus_stream_version"
#define H_POSITION "bus_position"

static const char *const kafka_reserved[] = {
    H_SPECVERSION, H_ID,     H_TYPE,           H_SOURCE,   H_TIME,
    H_SCHEMA,      H_STREAM, H_STREAM_VERSION, H_POSITION, NULL};

#define KAFKA_MAX_HEADERS 1024 /* consumed record headers kept */
#define KAFKA_MAX_STRING 65535 /* the event's limit on one string */

/* ---- Topics and patterns ---------------------------------------------- */

static bool
kafka_topic_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

int
kafka_topic_name(const kafka_broker *kb, const char *btopic, char *out,
                 size_t cap, char *why, size_t why_len)
{
    size_t n = strlen(btopic), i;

    if (kb->prefix_len + n > KAFKA_TOPIC_MAX || kb->prefix_len + n >= cap) {
        if (why != NULL)
            snprintf(why, why_len, "Kafka topic names are at most %d bytes",
                     KAFKA_TOPIC_MAX);
        return BUS_EINVAL;
    }
    for (i = 0; i < n; i++) {
        if (!kafka_topic_char(btopic[i])) {
            if (why != NULL)
                snprintf(why, why_len,
                         "'%c' is not allowed in Kafka topic names "
                         "([A-Za-z0-9._-])",
                         btopic[i]);
            return BUS_EINVAL;
        }
    }
    if (kb->prefix_len > 0)
        memcpy(out, kb->prefix, kb->prefix_len);
    memcpy(out + kb->prefix_len, btopic, n + 1);
    return BUS_OK;
}

/* Appends s escaped for a regex (only '.' needs it among legal chars). */
static bool
kafka_rx_put(char **p, char *end, const char *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (s[i] == '.') {
            if (end - *p < 2)
                return false;
            *(*p)++ = '\\';
        } else if (end - *p < 1) {
            return false;
        }
        *(*p)++ = s[i];
    }
    return true;
}

int
kafka_pattern_subscription(const kafka_broker *kb, const char *pattern,
                           char *out, size_t cap, bool *literal)
{
    const char *seg = pattern, *dot;
    char *p = out, *end = out + cap - 1;
    size_t i, n = strlen(pattern);

    *literal = strchr(pattern, '*') == NULL && strchr(pattern, '>') == NULL;
    for (i = 0; i < n; i++)
        if (pattern[i] != '*' && pattern[i] != '>' &&
            !kafka_topic_char(pattern[i]))
            return BUS_EINVAL;
    if (*literal)
        return kafka_topic_name(kb, pattern, out, cap, NULL, 0);
    if (kb->prefix_len + n > KAFKA_TOPIC_MAX)
        return BUS_EINVAL;
    *p++ = '^';
    if (!kafka_rx_put(&p, end, kb->prefix, kb->prefix_len))
        return BUS_EINVAL;
    for (;;) {
        size_t len;
        dot = strchr(seg, '.');
        len = dot != NULL ? (size_t)(dot - seg) : strlen(seg);
        if (len == 1 && seg[0] == '*') {
            if (end - p < 5)
                return BUS_EINVAL;
            memcpy(p, "[^.]+", 5);
            p += 5;
        } else if (len == 1 && seg[0] == '>') {
            if (end - p < 2)
                return BUS_EINVAL;
            memcpy(p, ".+", 2);
            p += 2;
        } else if (!kafka_rx_put(&p, end, seg, len)) {
            return BUS_EINVAL;
        }
        if (dot == NULL)
            break;
        if (!kafka_rx_put(&p, end, ".", 1))
            return BUS_EINVAL;
        seg = dot + 1;
    }
    if (end - p < 1)
        return BUS_EINVAL;
    *p++ = '$';
    *p = '\0';
    return BUS_OK;
}

const char *
kafka_bus_topic(const kafka_broker *kb, const char *ktopic)
{
    if (ktopic[0] == '_' && ktopic[1] == '_')
        return NULL; /* Kafka's own: __consumer_offsets, ... */
    if (kb->prefix_len > 0 && strncmp(ktopic, kb->prefix, kb->prefix_len) != 0)
        return NULL;
    ktopic += kb->prefix_len;
    if (bus__topic_check(ktopic, false, NULL, 0) != BUS_OK)
        return NULL;
    return ktopic;
}

/* ---- Time -----------------------------------------------------------------
 */

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
 * days_from_civil). */
static int64_t
kafka_days_from_civil(int64_t y, unsigned m, unsigned d)
{
    int64_t era;
    unsigned yoe, doy, doe;

    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = (unsigned)(y - era * 400);
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

/* Inverse of kafka_days_from_civil. */
static void
kafka_civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    int64_t era;
    unsigned doe, yoe, doy, mp;

    z += 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = (unsigned)(z - era * 146097);
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

static void
kafka_put_digits(char *p, uint64_t v, int n)
{
    while (n-- > 0) {
        p[n] = (char)('0' + v % 10);
        v /= 10;
    }
}

size_t
kafka_format_time(int64_t ns, char *out, size_t cap)
{
    /* Every publish formats one: the date part is cached per thread for
     * the current second, the rest written by hand (snprintf cost more
     * than the rest of the record's headers together). */
    static _Thread_local int64_t cached_sec = INT64_MIN;
    static _Thread_local char cached[24]; /* "YYYY-MM-DDTHH:MM:SS" */
    int64_t secs = ns / 1000000000, frac = ns % 1000000000;

    if (cap < 31)
        return 0;
    if (frac < 0) {
        frac += 1000000000;
        secs--;
    }
    if (secs != cached_sec) {
        int64_t days = secs / 86400, sod = secs % 86400, y;
        unsigned m, d;
        if (sod < 0) {
            days--;
            sod += 86400;
        }
        kafka_civil_from_days(days, &y, &m, &d);
        if (y < 0 || y > 9999)
            return 0;
        kafka_put_digits(cached, (uint64_t)y, 4);
        cached[4] = '-';
        kafka_put_digits(cached + 5, m, 2);
        cached[7] = '-';
        kafka_put_digits(cached + 8, d, 2);
        cached[10] = 'T';
        kafka_put_digits(cached + 11, (uint64_t)sod / 3600, 2);
        cached[13] = ':';
        kafka_put_digits(cached + 14, (uint64_t)sod / 60 % 60, 2);
        cached[16] = ':';
        kafka_put_digits(cached + 17, (uint64_t)sod % 60, 2);
        cached_sec = secs;
    }
    memcpy(out, cached, 19);
    out[19] = '.';
    kafka_put_digits(out + 20, (uint64_t)frac, 9);
    out[29] = 'Z';
    out[30] = '\0';
    return 30;
}

static bool
kafka_digits(const char *s, size_t n, unsigned *out)
{
    unsigned v = 0;
    size_t i;

    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    *out = v;
    return true;
}

bool
kafka_parse_time(const char *s, size_t len, int64_t *ns)
{
    /* Records consumed together were mostly written within the same
     * second: the seconds of the last "YYYY-MM-DDTHH:MM:SS" parsed are
     * cached per thread (the consumer parses a ce_time per record). */
    static _Thread_local char cached[19];
    static _Thread_local int64_t cached_t;
    static _Thread_local bool cached_ok;
    unsigned y, mo, d, h, mi, sec, oh = 0, om = 0;
    int64_t frac = 0, t;
    size_t i = 19, fd = 0;
    int sign = 0;

    if (len < 20)
        return false;
    if (cached_ok && memcmp(s, cached, 19) == 0) {
        t = cached_t;
    } else {
        /* YYYY-MM-DDTHH:MM:SS */
        if (s[4] != '-' || s[7] != '-' ||
            (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || s[13] != ':' ||
            s[16] != ':')
            return false;
        if (!kafka_digits(s, 4, &y) || !kafka_digits(s + 5, 2, &mo) ||
            !kafka_digits(s + 8, 2, &d) || !kafka_digits(s + 11, 2, &h) ||
            !kafka_digits(s + 14, 2, &mi) || !kafka_digits(s + 17, 2, &sec))
            return false;
        if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 ||
            sec > 60)
            return false;
        t = kafka_days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec;
        memcpy(cached, s, 19);
        cached_t = t;
        cached_ok = true;
    }
    if (s[i] == '.') {
        i++;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            if (fd < 9) {
                frac = frac * 10 + (s[i] - '0');
                fd++;
            }
            i++;
        }
        if (fd == 0)
            return false;
        for (; fd < 9; fd++)
            frac *= 10;
    }
    if (i < len && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i + 6 == len && (s[i] == '+' || s[i] == '-') &&
               s[i + 3] == ':' && kafka_digits(s + i + 1, 2, &oh) &&
               kafka_digits(s + i + 4, 2, &om) && oh < 24 && om < 60) {
        sign = s[i] == '+' ? 1 : -1;
        i += 6;
    } else {
        return false;
    }
    if (i != len)
        return false;
    t -= sign * (int64_t)(oh * 3600 + om * 60);
    *ns = t * 1000000000 + frac;
    return true;
}

/* ---- Event -> record headers ------------------------------------------------
 */

static bool
kafka_reserved_name(const char *k)
{
    size_t i;

    for (i = 0; kafka_reserved[i] != NULL; i++)
        if (strcmp(k, kafka_reserved[i]) == 0)
            return true;
    return false;
}

int
kafka_event_headers(kafka_broker *kb, const bus_event *ev,
                    rd_kafka_headers_t **out)
{
    size_t nh = bus_event_header_count(ev), i;
    char id[BUS_UUID_STR_LEN + 1], tbuf[48], num[24];
    rd_kafka_headers_t *h;
    const char *k, *v;
    size_t tlen;

    *out = NULL;
    for (i = 0; i < nh; i++) {
        bus_event_header_at(ev, i, &k, &v);
        if (kafka_reserved_name(k)) {
            bus_logf(&kb->log, BUS_LOG_WARN, "kafka",
                     "publish: event header '%s' uses a name reserved for "
                     "the envelope (docs/brokers/kafka.md)",
                     k);
            return BUS_EINVAL;
        }
    }
    if ((h = rd_kafka_headers_new(nh + 9)) == NULL)
        return BUS_ENOMEM;
    /* rd_kafka_header_add only fails for a read-only set: not ours. */
    rd_kafka_header_add(h, H_SPECVERSION, -1, "1.0", 3);
    rd_kafka_header_add(h, H_ID, -1, bus_uuid_format(bus_event_id(ev), id),
                        BUS_UUID_STR_LEN);
    rd_kafka_header_add(h, H_TYPE, -1, ev->type, (ssize_t)ev->type_len);
    rd_kafka_header_add(h, H_SOURCE, -1,
                        kb->source != NULL ? kb->source : "libbus", -1);
    tlen = kafka_format_time(bus_event_timestamp(ev), tbuf, sizeof(tbuf));
    rd_kafka_header_add(h, H_TIME, -1, tbuf, (ssize_t)tlen);
    if (ev->schema_version != 1) {
        snprintf(num, sizeof(num), "%u", (unsigned)ev->schema_version);
        rd_kafka_header_add(h, H_SCHEMA, -1, num, -1);
    }
    if (ev->stream != NULL) {
        rd_kafka_header_add(h, H_STREAM, -1, ev->stream,
                            (ssize_t)ev->stream_len);
        if (ev->stream_version != 0) {
            snprintf(num, sizeof(num), "%llu",
                     (unsigned long long)ev->stream_version);
            rd_kafka_header_add(h, H_STREAM_VERSION, -1, num, -1);
        }
    }
    if (ev->position != 0) {
        snprintf(num, sizeof(num), "%llu", (unsigned long long)ev->position);
        rd_kafka_header_add(h, H_POSITION, -1, num, -1);
    }
    for (i = 0; i < ev->n_headers; i++)
        rd_kafka_header_add(h, ev->headers[i].key, (ssize_t)ev->headers[i].klen,
                            ev->headers[i].value, (ssize_t)ev->headers[i].vlen);
    *out = h;
    return BUS_OK;
}

/* ---- Record -> event -------------------------------------------------------
 */

/* Our envelope headers, recognised by length first (every consumed
 * record goes through this for each of its headers). */
enum {
    KH_OTHER,
    KH_ID,
    KH_TYPE,
    KH_TIME,
    KH_TRANSPORT, /* ce_specversion, ce_source */
    KH_SCHEMA,
    KH_STREAM,
    KH_STREAM_VERSION,
    KH_POSITION
};

static int
kafka_hdr_kind(const char *name)
{
    size_t n;

    if (name[0] == 'c' && name[1] == 'e' && name[2] == '_') {
        n = strlen(name);
        if (n == 5 && memcmp(name, H_ID, 5) == 0)
            return KH_ID;
        if (n == 7 && memcmp(name, H_TYPE, 7) == 0)
            return KH_TYPE;
        if (n == 7 && memcmp(name, H_TIME, 7) == 0)
            return KH_TIME;
        if ((n == 14 && memcmp(name, H_SPECVERSION, 14) == 0) ||
            (n == 9 && memcmp(name, H_SOURCE, 9) == 0))
            return KH_TRANSPORT;
    } else if (name[0] == 'b' && name[1] == 'u' && name[2] == 's' &&
               name[3] == '_') {
        n = strlen(name);
        if (n == 18 && memcmp(name, H_SCHEMA, 18) == 0)
            return KH_SCHEMA;
        if (n == 10 && memcmp(name, H_STREAM, 10) == 0)
            return KH_STREAM;
        if (n == 18 && memcmp(name, H_STREAM_VERSION, 18) == 0)
            return KH_STREAM_VERSION;
        if (n == 12 && memcmp(name, H_POSITION, 12) == 0)
            return KH_POSITION;
    }
    return KH_OTHER;
}

/* Hex digit values plus one, 0 for anything else: the consumer parses a
 * ce_id per record, and a table lookup per character costs a fraction of
 * the range tests' mispredicted branches (the parse was a fifth of the
 * consumer thread's time). */
static const uint8_t kafka_hex1[256] = {
    ['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,
    ['6'] = 7,  ['7'] = 8,  ['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12,
    ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16, ['A'] = 11, ['B'] = 12,
    ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16};

/* The canonical 36-character UUID text (not NUL-ended), as
 * bus_uuid_parse accepts it: 8-4-4-4-12 hex digits. */
static bool
kafka_parse_uuid(const char *s, size_t n, bus_uuid *u)
{
    /* Where each of the 16 bytes starts in the text. */
    static const uint8_t at[16] = {0,  2,  4,  6,  9,  11, 14, 16,
                                   19, 21, 24, 26, 28, 30, 32, 34};
    const uint8_t *t = (const uint8_t *)s;
    bool ok = true;
    unsigned i;

    if (n != BUS_UUID_STR_LEN || t[8] != '-' || t[13] != '-' || t[18] != '-' ||
        t[23] != '-')
        return false;
    for (i = 0; i < 16; i++) {
        unsigned hi = kafka_hex1[t[at[i]]], lo = kafka_hex1[t[at[i] + 1]];
        ok &= hi != 0 && lo != 0;
        u->b[i] = (uint8_t)((hi - 1) << 4 | (lo - 1));
    }
    return ok;
}

/* Parses a decimal number of at most 20 digits (value not NUL-ended). */
static bool
kafka_parse_u64(const void *v, size_t n, uint64_t max, uint64_t *out)
{
    const char *s = v;
    uint64_t x = 0;
    size_t i;

    if (n == 0 || n > 20)
        return false;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        if (x > (UINT64_MAX - (uint64_t)(s[i] - '0')) / 10)
            return false;
        x = x * 10 + (uint64_t)(s[i] - '0');
    }
    if (x > max)
        return false;
    *out = x;
    return true;
}

/* A valid event string: UTF-8 without NUL, at most the event's limit. */
static bool
kafka_str_ok(const void *v, size_t n, bool allow_empty)
{
    size_t i;

    if (v == NULL)
        return allow_empty && n == 0;
    if (n == 0)
        return allow_empty;
    if (n > KAFKA_MAX_STRING)
        return false;
    /* Nearly every value is ASCII: whole characters, no call needed. */
    for (i = 0; i < n; i++)
        if ((unsigned)((const unsigned char *)v)[i] - 1u >= 0x7fu)
            return bus__utf8_valid((const char *)v + i, n - i);
    return true;
}

/* The id of a record that has no ce_id: a UUID (version 8) made of the
 * record's millisecond timestamp and a hash of (topic, partition, offset),
 * so every delivery of the record yields the same id. */
static void
kafka_derived_id(const rd_kafka_message_t *m, const kafka_part *part,
                 int64_t ts_ms, bus_uuid *u)
{
    uint64_t h1 =
        bus__hash(part->ktopic, strlen(part->ktopic)) ^
        ((uint64_t)(uint32_t)part->partition * UINT64_C(0x9E3779B97F4A7C15));
    uint64_t off = (uint64_t)m->offset, h2;
    int i;

    h2 = bus__hash(&off, sizeof(off)) ^ h1;
    if (ts_ms < 0)
        ts_ms = 0;
    for (i = 0; i < 6; i++)
        u->b[i] = (uint8_t)((uint64_t)ts_ms >> (40 - 8 * i));
    u->b[6] = (uint8_t)(0x80 | (h1 & 0x0f));
    u->b[7] = (uint8_t)(h1 >> 8);
    u->b[8] = (uint8_t)(0x80 | ((h1 >> 16) & 0x3f));
    for (i = 0; i < 7; i++)
        u->b[9 + i] = (uint8_t)(h2 >> (8 * i));
}

int
kafka_record_event(kafka_broker *kb, const kafka_part *part,
                   const rd_kafka_message_t *m, bus_event **out)
{
    bus__str small_k[16], small_v[16], *hk = small_k, *hv = small_v;
    size_t cap_h = 16, nh = 0, idx, j;
    rd_kafka_headers_t *hdrs = NULL;
    const char *name;
    const void *val;
    size_t vlen;
    bus__event_spec s;
    bus_uuid id;
    bool have_id = false, have_stream = false;
    rd_kafka_timestamp_type_t tst;
    int64_t ts_ms = rd_kafka_message_timestamp(m, &tst);
    int rv;

    *out = NULL;
    memset(&s, 0, sizeof(s));
    if (rd_kafka_message_headers(m, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
        hdrs = NULL;
    for (idx = 0; hdrs != NULL &&
                  rd_kafka_header_get_all(hdrs, idx, &name, &val, &vlen) ==
                      RD_KAFKA_RESP_ERR_NO_ERROR;
         idx++) {
        uint64_t u;
        switch (kafka_hdr_kind(name)) {
        case KH_ID:
            if (val != NULL)
                have_id = kafka_parse_uuid(val, vlen, &id);
            continue;
        case KH_TYPE:
            if (kafka_str_ok(val, vlen, false)) {
                s.type.p = val;
                s.type.len = vlen;
            }
            continue;
        case KH_TIME:
            if (val != NULL)
                (void)kafka_parse_time(val, vlen, &s.timestamp);
            continue;
        case KH_TRANSPORT:
            continue; /* not the event's */
        case KH_SCHEMA:
            if (kafka_parse_u64(val, vlen, UINT32_MAX, &u) && u > 0)
                s.schema_version = (uint32_t)u;
            continue;
        case KH_STREAM:
            if (kafka_str_ok(val, vlen, true)) {
                s.stream.p = val != NULL ? val : "";
                s.stream.len = vlen;
                have_stream = true;
            }
            continue;
        case KH_STREAM_VERSION:
            if (kafka_parse_u64(val, vlen, UINT64_MAX, &u))
                s.stream_version = u;
            continue;
        case KH_POSITION:
            if (kafka_parse_u64(val, vlen, UINT64_MAX, &u))
                s.position = u;
            continue;
        default:
            break;
        }
        /* An ordinary header: kept when the event can hold it. */
        if (!kafka_str_ok(name, strlen(name), false) ||
            !kafka_str_ok(val, vlen, true)) {
            bus_logf(&kb->log, BUS_LOG_DEBUG, "kafka",
                     "%s [%d] @%lld: header '%s' skipped (not UTF-8 text)",
                     part->ktopic, (int)part->partition, (long long)m->offset,
                     name);
            continue;
        }
        for (j = 0; j < nh; j++) /* a repeated name: the last one wins */
            if (hk[j].len == strlen(name) &&
                memcmp(hk[j].p, name, hk[j].len) == 0)
                break;
        if (j == nh) {
            if (nh == KAFKA_MAX_HEADERS)
                continue;
            if (nh == cap_h) {
                size_t ncap = cap_h * 2;
                bus__str *nk = bus__alloc(ncap * sizeof(*nk));
                bus__str *nv = bus__alloc(ncap * sizeof(*nv));
                if (nk == NULL || nv == NULL) {
                    if (nk != NULL)
                        bus__free(nk, ncap * sizeof(*nk));
                    if (nv != NULL)
                        bus__free(nv, ncap * sizeof(*nv));
                    rv = BUS_ENOMEM;
                    goto out;
                }
                memcpy(nk, hk, nh * sizeof(*nk));
                memcpy(nv, hv, nh * sizeof(*nv));
                if (hk != small_k) {
                    bus__free(hk, cap_h * sizeof(*hk));
                    bus__free(hv, cap_h * sizeof(*hv));
                }
                hk = nk;
                hv = nv;
                cap_h = ncap;
            }
            nh++;
        }
        hk[j].p = name;
        hk[j].len = strlen(name);
        hv[j].p = val != NULL ? val : "";
        hv[j].len = vlen;
    }
    if (s.type.p == NULL) {
        if (kb->default_type != NULL) {
            s.type.p = kb->default_type;
            s.type.len = strlen(kb->default_type);
        } else {
            s.type.p = part->btopic;
            s.type.len = part->btopic_len;
        }
    }
    if (!have_stream && m->key != NULL && m->key_len > 0 &&
        kafka_str_ok(m->key, m->key_len, false)) {
        /* A foreign record keyed by its aggregate: the key is the stream
         * (we write the stream as the key). */
        s.stream.p = m->key;
        s.stream.len = m->key_len;
    }
    if (s.stream.p == NULL)
        s.stream_version = 0;
    if (!have_id)
        kafka_derived_id(
            m, part, tst != RD_KAFKA_TIMESTAMP_NOT_AVAILABLE ? ts_ms : 0, &id);
    s.id = &id;
    if (s.timestamp == 0)
        s.timestamp = tst != RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts_ms > 0
                          ? ts_ms * 1000000
                          : bus__clock_real_ns();
    s.hkeys = hk;
    s.hvals = hv;
    s.n_headers = nh;
    s.payload = m->payload;
    s.payload_len = m->payload != NULL ? m->len : 0;
    s.spare = part->btopic_len + 16; /* the topic, set below */
    if ((rv = bus__event_build(out, &s)) != BUS_OK)
        goto out;
    if ((rv = bus__event_set_topic(*out, part->btopic, part->btopic_len)) !=
        BUS_OK) {
        bus_event_unref(*out);
        *out = NULL;
    }
out:
    if (hk != small_k) {
        bus__free(hk, cap_h * sizeof(*hk));
        bus__free(hv, cap_h * sizeof(*hv));
    }
    return rv;
}
