/*
 * Envelope codec throughput against msgpack-c on the same fields.
 *
 * The event is a typical envelope: 16-byte id, a 19-byte type, a 19-byte
 * stream with a version, two headers (a correlation id and a content type),
 * a 100-byte payload, a timestamp. Both sides write the same keys with the
 * same MessagePack encodings (the frames are byte-identical; checked at
 * start).
 *
 * What each side does per event (keep them comparable when changing this):
 * - ours, encode: bus_codec_encode into a reused buffer (the size is
 *   computed from the event's stored lengths, then one pass of writes).
 * - ours, decode: bus_codec_decode into a new event (one allocation:
 *   struct, strings, headers table and a copy of the payload), strictly
 *   validated (types, limits, UTF-8, duplicate keys), then bus_event_unref.
 * - raw, encode: msgpack_pack_* of the same fields (lengths known, as ours)
 *   into a reused msgpack_sbuffer, msgpack_sbuffer_clear between events.
 * - raw, decode: msgpack-c unpacks into its object tree (zone allocated),
 *   the fields are found by key and copied into one malloc'd block (struct,
 *   strings, headers table, payload: what our event holds), then freed.
 *   Two unpack APIs are measured: msgpack_unpack_next with a
 *   msgpack_unpacked (the documented one; it makes a new zone per call)
 *   and msgpack_unpack into a zone kept across events and cleared (the
 *   fastest msgpack-c offers). The target is judged against the faster.
 *   Raw checks only the value types it reads: no UTF-8, duplicate-key or
 *   limit checks, which favours raw.
 *
 * Each figure is the best of several rounds (the machine is shared), with
 * ours and raw interleaved so that drifts hit both.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include <bus/bus.h>

#include "bench.h"

#define ROUNDS 5
#define PAYLOAD_LEN 100

/* ---- The fields, as plain data for the raw side -------------------------- */

typedef struct raw_header {
    const char *key;
    const char *value;
    size_t klen, vlen;
} raw_header;

/* What a producer holds before encoding: pointers and known lengths. */
typedef struct raw_src {
    uint8_t id[16];
    const char *type;
    size_t type_len;
    const char *stream;
    size_t stream_len;
    uint64_t sver;
    int64_t ts;
    raw_header h[2];
    const uint8_t *payload;
    size_t payload_len;
} raw_src;

/* What a consumer gets: one block, as our decoded event. */
typedef struct raw_event {
    uint8_t id[16];
    char *type;
    uint32_t sv;
    char *stream;
    uint64_t sver, pos;
    int64_t ts;
    raw_header *headers;
    size_t n_headers;
    uint8_t *payload;
    size_t payload_len;
} raw_event;

static uint8_t g_payload[PAYLOAD_LEN];

static bus_event *
typical_event(raw_src *src)
{
    static const bus_header hs[] = {
        {BUS_H_CORRELATION_ID, "0190c1a2-3b4c-7d5e-8f60-718293a4b5c6"},
        {BUS_H_CONTENT_TYPE, "application/json"},
    };
    bus_event_init init;
    bus_event *e;
    size_t i;

    for (i = 0; i < PAYLOAD_LEN; i++)
        g_payload[i] = (uint8_t)('a' + i % 26);
    memset(&init, 0, sizeof(init));
    init.type = "orders.order_placed";
    init.stream = "order-7f3a9c2e41b8d";
    init.stream_version = 42;
    init.headers = hs;
    init.n_headers = 2;
    init.payload = g_payload;
    init.payload_len = PAYLOAD_LEN;
    if (bus_event_create(&e, &init) != BUS_OK) {
        fprintf(stderr, "bus_event_create failed\n");
        exit(1);
    }
    memcpy(src->id, bus_event_id(e)->b, 16);
    src->type = init.type;
    src->type_len = strlen(init.type);
    src->stream = init.stream;
    src->stream_len = strlen(init.stream);
    src->sver = init.stream_version;
    src->ts = bus_event_timestamp(e);
    for (i = 0; i < 2; i++) {
        src->h[i].key = hs[i].key;
        src->h[i].klen = strlen(hs[i].key);
        src->h[i].value = hs[i].value;
        src->h[i].vlen = strlen(hs[i].value);
    }
    src->payload = g_payload;
    src->payload_len = PAYLOAD_LEN;
    return e;
}

/* ---- Raw: msgpack-c ------------------------------------------------------ */

static void
raw_key(msgpack_packer *pk, const char *k, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, k, n);
}

/* The same keys, order and encodings as bus_codec_encode. */
static void
raw_pack(msgpack_packer *pk, const raw_src *s)
{
    size_t i;

    msgpack_pack_map(pk, 8);
    raw_key(pk, "v", 1);
    msgpack_pack_uint64(pk, 1);
    raw_key(pk, "id", 2);
    msgpack_pack_bin(pk, 16);
    msgpack_pack_bin_body(pk, s->id, 16);
    raw_key(pk, "type", 4);
    raw_key(pk, s->type, s->type_len);
    raw_key(pk, "stream", 6);
    raw_key(pk, s->stream, s->stream_len);
    raw_key(pk, "sver", 4);
    msgpack_pack_uint64(pk, s->sver);
    raw_key(pk, "ts", 2);
    msgpack_pack_int64(pk, s->ts);
    raw_key(pk, "h", 1);
    msgpack_pack_map(pk, 2);
    for (i = 0; i < 2; i++) {
        raw_key(pk, s->h[i].key, s->h[i].klen);
        raw_key(pk, s->h[i].value, s->h[i].vlen);
    }
    raw_key(pk, "p", 1);
    msgpack_pack_bin(pk, s->payload_len);
    msgpack_pack_bin_body(pk, s->payload, s->payload_len);
}

static bool
raw_is(const msgpack_object *k, const char *s, size_t n)
{
    return k->via.str.size == n && memcmp(k->via.str.ptr, s, n) == 0;
}

static char *
raw_copy_str(char **dst, const msgpack_object *o)
{
    char *d = *dst;

    memcpy(d, o->via.str.ptr, o->via.str.size);
    d[o->via.str.size] = '\0';
    *dst = d + o->via.str.size + 1;
    return d;
}

/* Reads the fields of an unpacked map into one malloc'd block. Returns NULL
 * when a field has the wrong type. */
static raw_event *
raw_extract(const msgpack_object *root)
{
    const msgpack_object *type = NULL, *stream = NULL, *h = NULL, *p = NULL;
    const msgpack_object *id = NULL;
    raw_event *ev;
    size_t size, i, nh = 0;
    uint64_t sv = 1, sver = 0, pos = 0;
    int64_t ts = 0;
    char *sp;

    if (root->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (i = 0; i < root->via.map.size; i++) {
        const msgpack_object *k = &root->via.map.ptr[i].key;
        const msgpack_object *v = &root->via.map.ptr[i].val;
        if (k->type != MSGPACK_OBJECT_STR)
            return NULL;
        if (raw_is(k, "v", 1)) {
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 != 1)
                return NULL;
        } else if (raw_is(k, "id", 2)) {
            if (v->type != MSGPACK_OBJECT_BIN || v->via.bin.size != 16)
                return NULL;
            id = v;
        } else if (raw_is(k, "type", 4)) {
            if (v->type != MSGPACK_OBJECT_STR)
                return NULL;
            type = v;
        } else if (raw_is(k, "sv", 2)) {
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return NULL;
            sv = v->via.u64;
        } else if (raw_is(k, "stream", 6)) {
            if (v->type != MSGPACK_OBJECT_STR)
                return NULL;
            stream = v;
        } else if (raw_is(k, "sver", 4)) {
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return NULL;
            sver = v->via.u64;
        } else if (raw_is(k, "pos", 3)) {
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return NULL;
            pos = v->via.u64;
        } else if (raw_is(k, "ts", 2)) {
            if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
                ts = (int64_t)v->via.u64;
            else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
                ts = v->via.i64;
            else
                return NULL;
        } else if (raw_is(k, "h", 1)) {
            if (v->type != MSGPACK_OBJECT_MAP)
                return NULL;
            h = v;
            nh = v->via.map.size;
        } else if (raw_is(k, "p", 1)) {
            if (v->type != MSGPACK_OBJECT_BIN)
                return NULL;
            p = v;
        }
    }
    if (id == NULL || type == NULL || p == NULL)
        return NULL;
    size = sizeof(*ev) + nh * sizeof(raw_header) + p->via.bin.size
         + type->via.str.size + 1
         + (stream != NULL ? stream->via.str.size + 1 : 0);
    for (i = 0; i < nh; i++) {
        const msgpack_object_kv *kv = &h->via.map.ptr[i];
        if (kv->key.type != MSGPACK_OBJECT_STR
            || kv->val.type != MSGPACK_OBJECT_STR)
            return NULL;
        size += kv->key.via.str.size + 1 + kv->val.via.str.size + 1;
    }
    if ((ev = malloc(size)) == NULL)
        return NULL;
    memcpy(ev->id, id->via.bin.ptr, 16);
    ev->sv = (uint32_t)sv;
    ev->sver = sver;
    ev->pos = pos;
    ev->ts = ts;
    ev->headers = (raw_header *)(void *)(ev + 1);
    ev->n_headers = nh;
    ev->payload = (uint8_t *)(ev->headers + nh);
    ev->payload_len = p->via.bin.size;
    memcpy(ev->payload, p->via.bin.ptr, p->via.bin.size);
    sp = (char *)ev->payload + p->via.bin.size;
    ev->type = raw_copy_str(&sp, type);
    ev->stream = stream != NULL ? raw_copy_str(&sp, stream) : NULL;
    for (i = 0; i < nh; i++) {
        ev->headers[i].klen = h->via.map.ptr[i].key.via.str.size;
        ev->headers[i].key = raw_copy_str(&sp, &h->via.map.ptr[i].key);
        ev->headers[i].vlen = h->via.map.ptr[i].val.via.str.size;
        ev->headers[i].value = raw_copy_str(&sp, &h->via.map.ptr[i].val);
    }
    return ev;
}

/* Raw decode, documented API: a msgpack_unpacked reused across calls. */
static raw_event *
raw_decode_next(msgpack_unpacked *u, const char *buf, size_t len)
{
    size_t off = 0;

    if (msgpack_unpack_next(u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS
        || off != len)
        return NULL;
    return raw_extract(&u->data);
}

/* Raw decode, fastest API: one zone kept and cleared between events. */
static raw_event *
raw_decode_zone(msgpack_zone *z, const char *buf, size_t len)
{
    msgpack_object obj;
    size_t off = 0;
    raw_event *ev;

    if (msgpack_unpack(buf, len, &off, z, &obj) != MSGPACK_UNPACK_SUCCESS
        || off != len)
        return NULL;
    ev = raw_extract(&obj);
    msgpack_zone_clear(z);
    return ev;
}

/* ---- Measurement --------------------------------------------------------- */

typedef enum mode {
    M_OURS_ENC, M_OURS_DEC, M_OURS_RT,
    M_RAW_ENC, M_RAW_DEC_NEXT, M_RAW_DEC_ZONE, M_RAW_RT_NEXT, M_RAW_RT_ZONE,
    M_COUNT
} mode;

typedef struct ctx {
    bus_event *e;
    raw_src src;
    uint8_t buf[1024];
    size_t len; /* our frame, for decode-only */
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_unpacked u;
    msgpack_zone zone;
} ctx;

static void
die(const char *what)
{
    fprintf(stderr, "bench_codec: %s\n", what);
    exit(1);
}

/* Runs n events of mode m; returns ns per event. */
static double
run(ctx *c, mode m, uint64_t n)
{
    uint64_t t0 = bench_now_ns(), i;
    size_t w;

    for (i = 0; i < n; i++) {
        bus_event *d;
        raw_event *r;
        switch (m) {
        case M_OURS_ENC:
            if (bus_codec_encode(c->e, c->buf, sizeof(c->buf), &w) != BUS_OK)
                die("encode");
            BENCH_KEEP(w);
            break;
        case M_OURS_DEC:
            if (bus_codec_decode(&d, c->buf, c->len, NULL, NULL, 0) != BUS_OK)
                die("decode");
            BENCH_KEEP(d);
            bus_event_unref(d);
            break;
        case M_OURS_RT:
            if (bus_codec_encode(c->e, c->buf, sizeof(c->buf), &w) != BUS_OK
                || bus_codec_decode(&d, c->buf, w, NULL, NULL, 0) != BUS_OK)
                die("round trip");
            BENCH_KEEP(d);
            bus_event_unref(d);
            break;
        case M_RAW_ENC:
            msgpack_sbuffer_clear(&c->sb);
            raw_pack(&c->pk, &c->src);
            BENCH_KEEP(c->sb.size);
            break;
        case M_RAW_DEC_NEXT:
        case M_RAW_DEC_ZONE:
            r = m == M_RAW_DEC_NEXT
              ? raw_decode_next(&c->u, (const char *)c->buf, c->len)
              : raw_decode_zone(&c->zone, (const char *)c->buf, c->len);
            if (r == NULL)
                die("raw decode");
            BENCH_KEEP(r);
            free(r);
            break;
        default: /* raw round trips */
            msgpack_sbuffer_clear(&c->sb);
            raw_pack(&c->pk, &c->src);
            r = m == M_RAW_RT_NEXT
              ? raw_decode_next(&c->u, c->sb.data, c->sb.size)
              : raw_decode_zone(&c->zone, c->sb.data, c->sb.size);
            if (r == NULL)
                die("raw round trip");
            BENCH_KEEP(r);
            free(r);
            break;
        }
    }
    return (double)(bench_now_ns() - t0) / (double)n;
}

int
main(void)
{
    static ctx c;
    double best[M_COUNT];
    uint64_t n = bench_iters(400000);
    raw_event *r;
    int round, m;

    c.e = typical_event(&c.src);
    msgpack_sbuffer_init(&c.sb);
    msgpack_packer_init(&c.pk, &c.sb, msgpack_sbuffer_write);
    msgpack_unpacked_init(&c.u);
    if (!msgpack_zone_init(&c.zone, MSGPACK_ZONE_CHUNK_SIZE))
        die("zone");

    /* Same bytes on both sides, and raw reads back what was written. */
    if (bus_codec_encode(c.e, c.buf, sizeof(c.buf), &c.len) != BUS_OK)
        die("encode");
    raw_pack(&c.pk, &c.src);
    if (c.sb.size != c.len || memcmp(c.sb.data, c.buf, c.len) != 0)
        die("msgpack-c and libbus frames differ");
    r = raw_decode_zone(&c.zone, (const char *)c.buf, c.len);
    if (r == NULL || strcmp(r->type, c.src.type) != 0
        || r->payload_len != PAYLOAD_LEN || r->n_headers != 2)
        die("raw decode is wrong");
    free(r);

    for (m = 0; m < M_COUNT; m++)
        best[m] = 1e30;
    run(&c, M_OURS_RT, n / 10); /* warm caches and the allocator */
    run(&c, M_RAW_RT_ZONE, n / 10);
    for (round = 0; round < ROUNDS; round++) {
        for (m = 0; m < M_COUNT; m++) {
            double ns = run(&c, (mode)m, n);
            if (ns < best[m])
                best[m] = ns;
        }
    }

    bench_header("envelope codec (typical event: 19-byte type and stream, "
                 "2 headers, 100-byte payload)");
    printf("frame: %zu bytes; %llu events per round, best of %d rounds\n",
           c.len, (unsigned long long)n, ROUNDS);
    {
        double raw_rt = best[M_RAW_RT_ZONE] < best[M_RAW_RT_NEXT]
                      ? best[M_RAW_RT_ZONE] : best[M_RAW_RT_NEXT];
        double ours_tp = 1e3 / best[M_OURS_RT], raw_tp = 1e3 / raw_rt;

        bench_row("encode only", "ns/event", best[M_OURS_ENC],
                  best[M_RAW_ENC], NULL, 0);
        bench_row("decode only (raw: msgpack_unpack_next)", "ns/event",
                  best[M_OURS_DEC], best[M_RAW_DEC_NEXT], NULL, 0);
        bench_row("decode only (raw: msgpack_unpack, reused zone)",
                  "ns/event", best[M_OURS_DEC], best[M_RAW_DEC_ZONE], NULL,
                  0);
        bench_row("encode+decode (raw: unpack_next)", "ns/event",
                  best[M_OURS_RT], best[M_RAW_RT_NEXT], NULL, 0);
        bench_row("encode+decode (raw: reused zone)", "ns/event",
                  best[M_OURS_RT], best[M_RAW_RT_ZONE], NULL, 0);
        bench_row("encode+decode throughput (raw: faster of two)", "M ev/s",
                  ours_tp, raw_tp, ">= 1.2x raw throughput",
                  ours_tp >= 1.2 * raw_tp);
    }

    msgpack_zone_destroy(&c.zone);
    msgpack_unpacked_destroy(&c.u);
    msgpack_sbuffer_destroy(&c.sb);
    bus_event_unref(c.e);
    return 0;
}
