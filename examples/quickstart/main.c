/*
 * quickstart: the smallest complete libbus program.
 *
 * Defines two typed events (an order placed with its lines, and a payment
 * received), builds events from C structs, encodes them with the envelope
 * codec (the bytes that go on the wire and to disk), decodes them back and
 * prints every field. No MessagePack by hand.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <bus/bus.h>

/* ---- The event types ------------------------------------------------- */

typedef struct order_line {
    char *sku;
    uint32_t quantity;
    int64_t unit_price_cents;
} order_line;

typedef struct order_placed {
    char *order_id;
    char *customer;
    bus_array lines; /* of order_line */
    bool gift;
} order_placed;

typedef struct payment_received {
    char *order_id;
    int64_t amount_cents;
    char *currency;
    double fx_rate;
} payment_received;

static const bus_field order_line_fields[] = {
    BUS_FIELD(order_line, sku, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order_line, quantity, BUS_KIND_U32, BUS_REQUIRED),
    BUS_FIELD(order_line, unit_price_cents, BUS_KIND_I64, BUS_REQUIRED),
};
static const bus_type order_line_type =
    BUS_TYPE("orders.line", 1, order_line, order_line_fields);

static const bus_field order_placed_fields[] = {
    BUS_FIELD(order_placed, order_id, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order_placed, customer, BUS_KIND_STRING, 0),
    BUS_FIELD_ARRAY_OF_STRUCT(order_placed, lines, &order_line_type,
                              BUS_REQUIRED),
    BUS_FIELD(order_placed, gift, BUS_KIND_BOOL, 0),
};
static const bus_type order_placed_type =
    BUS_TYPE("orders.placed", 1, order_placed, order_placed_fields);

static const bus_field payment_fields[] = {
    BUS_FIELD(payment_received, order_id, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(payment_received, amount_cents, BUS_KIND_I64, BUS_REQUIRED),
    BUS_FIELD(payment_received, currency, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(payment_received, fx_rate, BUS_KIND_F64, 0),
};
static const bus_type payment_type =
    BUS_TYPE("payments.received", 1, payment_received, payment_fields);

/* ---- Helpers ---------------------------------------------------------- */

static int
fail(const char *what, int rv, const char *detail)
{
    fprintf(stderr, "quickstart: %s: %s (%s)%s%s\n", what, bus_strerror(rv),
            bus_err_name(rv), detail && *detail ? ": " : "",
            detail ? detail : "");
    return 1;
}

static void
print_envelope(const bus_event *e)
{
    char id[BUS_UUID_STR_LEN + 1];
    const char *k, *v;
    size_t i;

    printf("  id        %s\n", bus_uuid_format(bus_event_id(e), id));
    printf("  type      %s v%" PRIu32 "\n", bus_event_type(e),
           bus_event_schema_version(e));
    printf("  stream    %s @ %" PRIu64 "\n",
           bus_event_stream(e) ? bus_event_stream(e) : "(none)",
           bus_event_stream_version(e));
    printf("  timestamp %" PRId64 " ns\n", bus_event_timestamp(e));
    for (i = 0; bus_event_header_at(e, i, &k, &v); i++)
        printf("  header    %s: %s\n", k, v);
    printf("  payload   %zu bytes\n", bus_event_payload_len(e));
}

/* Encodes ev as it would travel, decodes it back: a round trip. */
static int
round_trip(const bus_event *ev, bus_event **out)
{
    char err[256] = "";
    void *wire;
    size_t len;
    int rv;

    if ((rv = bus_codec_encode_alloc(ev, &wire, &len)) != BUS_OK)
        return fail("encode", rv, NULL);
    printf("encoded %s: %zu bytes on the wire\n", bus_event_type(ev), len);
    rv = bus_codec_decode(out, wire, len, NULL, err, sizeof(err));
    bus_codec_buf_free(wire, len);
    if (rv != BUS_OK)
        return fail("decode", rv, err);
    return 0;
}

int
main(void)
{
    char err[256] = "";
    bus_type_registry *reg = NULL;
    bus_event *ev = NULL, *back = NULL;
    const bus_type *t;
    void *obj = NULL;
    order_line lines[2] = {
        {"sku-apple", 3, 125},
        {"sku-pear", 1, 240},
    };
    order_placed order = {"order-1001", "alice", {lines, 2}, true};
    payment_received pay = {"order-1001", 615, "EUR", 1.0};
    bus_header hdr[] = {{BUS_H_CORRELATION_ID, "checkout-7"},
                        {BUS_H_CAUSATION_ID, NULL}};
    char order_id[BUS_UUID_STR_LEN + 1];
    bus_event_init init;
    int rv, status = 1;

    printf("libbus %s quickstart\n\n", bus_version());
    if ((rv = bus_type_registry_new(&reg)) != BUS_OK)
        return fail("registry", rv, NULL);
    if ((rv = bus_type_register(reg, &order_placed_type)) != BUS_OK
        || (rv = bus_type_register(reg, &payment_type)) != BUS_OK) {
        fail("register", rv, NULL);
        goto out;
    }

    /* 1. An order, as a typed event on stream order-1001. */
    memset(&init, 0, sizeof(init));
    init.stream = "order-1001";
    init.stream_version = 1;
    init.headers = hdr;
    init.n_headers = 1;
    rv = bus_event_new_typed(&ev, &order_placed_type, &order, &init, err,
                             sizeof(err));
    if (rv != BUS_OK) {
        fail("build order", rv, err);
        goto out;
    }
    if (round_trip(ev, &back) != 0)
        goto out;
    print_envelope(back);
    rv = bus_event_decode_typed(reg, back, &obj, &t, err, sizeof(err));
    if (rv != BUS_OK) {
        fail("decode order", rv, err);
        goto out;
    }
    {
        const order_placed *o = obj;
        const order_line *l = o->lines.items;
        size_t i;
        printf("  order     %s for %s%s\n", o->order_id, o->customer,
               o->gift ? " (gift)" : "");
        for (i = 0; i < o->lines.count; i++)
            printf("  line      %u x %s at %" PRId64 " cents\n",
                   l[i].quantity, l[i].sku, l[i].unit_price_cents);
    }
    bus_uuid_format(bus_event_id(back), order_id);
    bus_type_free(obj);
    obj = NULL;
    bus_event_unref(ev);
    bus_event_unref(back);
    ev = back = NULL;

    /* 2. The payment, caused by the order (causation id = its id). */
    printf("\n");
    init.stream_version = 2;
    hdr[1].value = order_id;
    init.n_headers = 2;
    rv = bus_event_new_typed(&ev, &payment_type, &pay, &init, err,
                             sizeof(err));
    if (rv != BUS_OK) {
        fail("build payment", rv, err);
        goto out;
    }
    if (round_trip(ev, &back) != 0)
        goto out;
    print_envelope(back);
    rv = bus_event_decode_typed(reg, back, &obj, &t, err, sizeof(err));
    if (rv != BUS_OK) {
        fail("decode payment", rv, err);
        goto out;
    }
    {
        const payment_received *p = obj;
        printf("  payment   %" PRId64 " %s cents for %s (%s v%" PRIu32 ")\n",
               p->amount_cents, p->currency, p->order_id, t->name,
               t->version);
    }
    status = 0;
out:
    bus_type_free(obj);
    bus_event_unref(ev);
    bus_event_unref(back);
    bus_type_registry_free(reg);
    return status;
}
