/*
 * Typed events against the envelope codec, in the same run.
 *
 * The question: what does describing a struct by a table and letting the
 * generic codec (type.c) do the work cost, next to the codec every event
 * already pays for? Both sides move a comparable amount of data:
 *
 * - typed: a struct with two ~20-character strings, two small integers and
 *   a 100-byte bytes field. Per operation: bus_type_encode (size walk, one
 *   allocation, write walk), bus_type_decode (validating walk, one
 *   allocation, fill walk; UTF-8, ranges and duplicates checked), then
 *   bus_type_free and bus_codec_buf_free.
 * - raw baseline: a typical envelope (16-byte id, 19-byte type and stream,
 *   two headers, a 100-byte payload, as bench_codec.c). Per operation:
 *   bus_codec_encode into a reused buffer (no allocation), bus_codec_decode
 *   into a new event (one allocation, strictly validated), bus_event_unref.
 *
 * The typed side allocates twice per round trip and the envelope once (its
 * encode buffer is reused), which is how each is used. Target: typed within
 * 2x of the envelope codec. Also shown, with no baseline: the whole typed
 * event path (bus_event_new_typed, bus_event_decode_typed through a
 * registry).
 *
 * Each figure is the best of several rounds (the machine is shared), with
 * the modes interleaved so that drifts hit all of them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/bus.h>

#include "bench.h"

#define ROUNDS 5
#define BYTES_LEN 100

typedef struct bench_order {
    char *order_id;
    char *customer;
    int64_t amount_cents;
    uint32_t quantity;
    bus_bytes note;
} bench_order;

static const bus_field bench_order_fields[] = {
    BUS_FIELD(bench_order, order_id, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(bench_order, customer, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(bench_order, amount_cents, BUS_KIND_I64, BUS_REQUIRED),
    BUS_FIELD(bench_order, quantity, BUS_KIND_U32, 0),
    BUS_FIELD(bench_order, note, BUS_KIND_BYTES, 0),
};
static const bus_type bench_order_type =
    BUS_TYPE("orders.order_placed", 1, bench_order, bench_order_fields);

typedef enum mode {
    M_TYPED_ENC,
    M_TYPED_DEC,
    M_TYPED_RT,
    M_ENV_ENC,
    M_ENV_DEC,
    M_ENV_RT,
    M_EVENT_RT,
    M_COUNT
} mode;

typedef struct ctx {
    bench_order obj;
    uint8_t bytes[BYTES_LEN];
    void *typed;      /* obj encoded, for decode-only */
    size_t typed_len;
    bus_event *e;     /* the typical envelope */
    uint8_t frame[1024];
    size_t frame_len;
    bus_type_registry *reg;
} ctx;

static void
die(const char *what)
{
    fprintf(stderr, "bench_typed: %s failed\n", what);
    exit(1);
}

static bus_event *
typical_event(const uint8_t *payload)
{
    static const bus_header hs[] = {
        {BUS_H_CORRELATION_ID, "0190c1a2-3b4c-7d5e-8f60-718293a4b5c6"},
        {BUS_H_CONTENT_TYPE, "application/json"},
    };
    bus_event_init init;
    bus_event *e;

    memset(&init, 0, sizeof(init));
    init.type = "orders.order_placed";
    init.stream = "order-7f3a9c2e41b8d";
    init.stream_version = 42;
    init.headers = hs;
    init.n_headers = 2;
    init.payload = payload;
    init.payload_len = BYTES_LEN;
    if (bus_event_create(&e, &init) != BUS_OK)
        die("bus_event_create");
    return e;
}

static double
run(ctx *c, mode m, uint64_t n)
{
    uint64_t t0 = bench_now_ns(), i;
    bus_event *e, *back;
    void *buf, *obj;
    size_t len;

    for (i = 0; i < n; i++) {
        switch (m) {
        case M_TYPED_ENC:
            if (bus_type_encode(&bench_order_type, &c->obj, &buf, &len, NULL,
                                0) != BUS_OK)
                die("bus_type_encode");
            BENCH_KEEP(buf);
            bus_codec_buf_free(buf, len);
            break;
        case M_TYPED_DEC:
            if (bus_type_decode(&bench_order_type, c->typed, c->typed_len,
                                &obj, NULL, 0) != BUS_OK)
                die("bus_type_decode");
            BENCH_KEEP(obj);
            bus_type_free(obj);
            break;
        case M_TYPED_RT:
            if (bus_type_encode(&bench_order_type, &c->obj, &buf, &len, NULL,
                                0) != BUS_OK
                || bus_type_decode(&bench_order_type, buf, len, &obj, NULL,
                                   0) != BUS_OK)
                die("typed round trip");
            BENCH_KEEP(obj);
            bus_type_free(obj);
            bus_codec_buf_free(buf, len);
            break;
        case M_ENV_ENC:
            if (bus_codec_encode(c->e, c->frame, sizeof(c->frame), &len)
                != BUS_OK)
                die("bus_codec_encode");
            BENCH_KEEP(len);
            break;
        case M_ENV_DEC:
            if (bus_codec_decode(&back, c->frame, c->frame_len, NULL, NULL,
                                 0) != BUS_OK)
                die("bus_codec_decode");
            BENCH_KEEP(back);
            bus_event_unref(back);
            break;
        case M_ENV_RT:
            if (bus_codec_encode(c->e, c->frame, sizeof(c->frame), &len)
                    != BUS_OK
                || bus_codec_decode(&back, c->frame, len, NULL, NULL, 0)
                    != BUS_OK)
                die("envelope round trip");
            BENCH_KEEP(back);
            bus_event_unref(back);
            break;
        default: /* the whole typed event path, no wire in between */
            if (bus_event_new_typed(&e, &bench_order_type, &c->obj, NULL,
                                    NULL, 0) != BUS_OK
                || bus_event_decode_typed(c->reg, e, &obj, NULL, NULL, 0)
                    != BUS_OK)
                die("typed event round trip");
            BENCH_KEEP(obj);
            bus_type_free(obj);
            bus_event_unref(e);
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
    bench_order *back;
    int round, m;
    size_t i;

    for (i = 0; i < BYTES_LEN; i++)
        c.bytes[i] = (uint8_t)('a' + i % 26);
    c.obj.order_id = "ord-7f3a9c2e41b8d0a1"; /* 20 characters */
    c.obj.customer = "cust-0190c1a2-3b4c-7"; /* 20 characters */
    c.obj.amount_cents = 129900;
    c.obj.quantity = 3;
    c.obj.note = (bus_bytes){c.bytes, BYTES_LEN};
    if (bus_type_encode(&bench_order_type, &c.obj, &c.typed, &c.typed_len,
                        NULL, 0) != BUS_OK)
        die("bus_type_encode");
    if (bus_type_decode(&bench_order_type, c.typed, c.typed_len,
                        (void **)&back, NULL, 0) != BUS_OK
        || strcmp(back->customer, c.obj.customer) != 0
        || back->note.len != BYTES_LEN || back->quantity != 3)
        die("typed decode check");
    bus_type_free(back);
    c.e = typical_event(c.bytes);
    if (bus_codec_encode(c.e, c.frame, sizeof(c.frame), &c.frame_len)
        != BUS_OK)
        die("bus_codec_encode");
    if (bus_type_registry_new(&c.reg) != BUS_OK
        || bus_type_register(c.reg, &bench_order_type) != BUS_OK)
        die("registry");

    for (m = 0; m < M_COUNT; m++)
        best[m] = 1e30;
    run(&c, M_TYPED_RT, n / 10); /* warm caches and the allocator */
    run(&c, M_ENV_RT, n / 10);
    for (round = 0; round < ROUNDS; round++) {
        for (m = 0; m < M_COUNT; m++) {
            double ns = run(&c, (mode)m, n);
            if (ns < best[m])
                best[m] = ns;
        }
    }

    bench_header("typed events (raw: the envelope codec on a typical "
                 "event)");
    printf("typed payload: %zu bytes (two 20-char strings, two ints, "
           "100-byte bytes); envelope frame: %zu bytes\n",
           c.typed_len, c.frame_len);
    printf("%llu operations per round, best of %d rounds\n",
           (unsigned long long)n, ROUNDS);
    bench_row("encode only (typed allocates, raw reuses)", "ns/op",
              best[M_TYPED_ENC], best[M_ENV_ENC], NULL, 0);
    bench_row("decode + free", "ns/op", best[M_TYPED_DEC], best[M_ENV_DEC],
              NULL, 0);
    bench_row("encode+decode+free", "ns/op", best[M_TYPED_RT],
              best[M_ENV_RT], "<= 2x the envelope codec",
              best[M_TYPED_RT] <= 2.0 * best[M_ENV_RT]);
    bench_row_plain("typed event: new_typed + decode_typed", "ns/op",
                    best[M_EVENT_RT]);

    bus_type_registry_free(c.reg);
    bus_event_unref(c.e);
    bus_codec_buf_free(c.typed, c.typed_len);
    return 0;
}
