/*
 * orders: libbus end to end on its embedded defaults (what `make demo`
 * runs): typed events over the in-memory broker, a subscription with a
 * failure policy that records them in a RocksDB event store, a dead-letter
 * topic, and a projector that keeps a read model in the same store.
 *
 *   ./orders [store-dir]      (default ./data; run it again: the store
 *                              keeps what earlier runs appended)
 *
 * - "recorder" handles orders.placed: it appends each order to its stream
 *   in the store. order-1002 meets a busy store once (RETRY: the policy
 *   retries it later, deferred on the bus's timer wheel); order-1003 has
 *   no lines and is refused for good (REJECT: dead-lettered to
 *   orders.placed.dlq with the failure in its headers).
 * - The projector "orders-per-customer" reads the store's global log and
 *   counts orders per customer; its counts and its checkpoint are written
 *   together, so a crash never counts an order twice.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <bus/broker.h>
#include <bus/bus.h>
#include <bus/store.h>

/* ---- The event type ------------------------------------------------------ */

typedef struct order_line {
    char *sku;
    uint32_t quantity;
} order_line;

typedef struct order_placed {
    char *order_id;
    char *customer;
    bus_array lines; /* of order_line */
} order_placed;

static const bus_field order_line_fields[] = {
    BUS_FIELD(order_line, sku, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order_line, quantity, BUS_KIND_U32, BUS_REQUIRED),
};
static const bus_type order_line_type =
    BUS_TYPE("orders.line", 1, order_line, order_line_fields);

static const bus_field order_placed_fields[] = {
    BUS_FIELD(order_placed, order_id, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD(order_placed, customer, BUS_KIND_STRING, BUS_REQUIRED),
    BUS_FIELD_ARRAY_OF_STRUCT(order_placed, lines, &order_line_type,
                              BUS_REQUIRED),
};
static const bus_type order_placed_type =
    BUS_TYPE("orders.placed", 1, order_placed, order_placed_fields);

/* ---- Handlers -------------------------------------------------------------- */

typedef struct app {
    bus_store *store;
    bus_type_registry *types;
    atomic_int recorded, dead; /* orders stored, dead letters seen */
} app;

/* Appends the order to its stream ("order-1001", ...). A retry of an
 * append that went through is a duplicate to the store (same event id):
 * nothing is written twice. */
static bus_result
recorder(bus_delivery *d, void *opaque)
{
    app *a = opaque;
    bus_event *e = bus_delivery_event(d);
    const bus_type *t;
    bus_store_append_result res;
    order_placed *o = NULL;
    char err[256];
    int rv;

    if (bus_event_decode_typed(a->types, e, (void **)&o, &t, err,
                               sizeof(err))
        != BUS_OK) {
        bus_delivery_set_error(d, BUS_EPROTO, "bad payload: %s", err);
        return BUS_REJECT;
    }
    if (o->lines.count == 0) {
        bus_delivery_set_error(d, 422, "order %s has no lines", o->order_id);
        bus_type_free(o);
        return BUS_REJECT; /* permanent: dead-letter at once */
    }
    if (strcmp(o->order_id, "order-1002") == 0
        && bus_delivery_attempt(d) == 1) {
        bus_delivery_set_error(d, BUS_EAGAIN, "store busy (simulated)");
        bus_type_free(o);
        return BUS_RETRY; /* transient: the policy retries it later */
    }
    rv = bus_store_append(a->store, bus_event_stream(e), BUS_STORE_ANY, &e, 1,
                          &res);
    if (rv != BUS_OK) {
        bus_delivery_set_error(d, rv, "append: %s", bus_strerror(rv));
        bus_type_free(o);
        return bus_err_retriable(rv) ? BUS_RETRY : BUS_REJECT;
    }
    printf("recorder: %s of %s stored at version %" PRIu64
           ", position %" PRIu64 " (attempt %u)\n",
           o->order_id, o->customer, res.first_version, res.first_position,
           bus_delivery_attempt(d));
    bus_type_free(o);
    atomic_fetch_add(&a->recorded, 1);
    return BUS_ACK;
}

static bus_result
dead_letters(bus_delivery *d, void *opaque)
{
    app *a = opaque;
    const bus_event *e = bus_delivery_event(d);

    printf("dead letter from %s (%s): error %s \"%s\" after %s attempt(s)\n",
           bus_event_header(e, BUS_H_DLQ_TOPIC),
           bus_event_header(e, BUS_H_DLQ_SUBSCRIPTION),
           bus_event_header(e, BUS_H_DLQ_ERROR_CODE),
           bus_event_header(e, BUS_H_DLQ_ERROR),
           bus_event_header(e, BUS_H_DLQ_ATTEMPTS));
    atomic_fetch_add(&a->dead, 1);
    return BUS_ACK;
}

/* The projector: count[customer] += 1, in its transaction. */
static bus_result
count_per_customer(bus_delivery *d, void *opaque)
{
    app *a = opaque;
    bus_store_txn *t = bus_projector_txn(d);
    const bus_type *ty;
    order_placed *o = NULL;
    uint64_t n = 0;
    void *val;
    size_t vlen;
    char buf[24];
    int rv;

    if (bus_event_decode_typed(a->types, bus_delivery_event(d), (void **)&o,
                               &ty, NULL, 0)
        != BUS_OK)
        return BUS_ACK; /* not an order: nothing to count */
    rv = bus_store_txn_get(t, BUS_STORE_APP, o->customer, strlen(o->customer),
                           &val, &vlen);
    if (rv == BUS_OK) {
        snprintf(buf, sizeof(buf), "%.*s", (int)(vlen < 23 ? vlen : 23),
                 (const char *)val);
        n = strtoull(buf, NULL, 10);
        bus_store_buf_free(val, vlen);
    } else if (rv != BUS_ENOTFOUND) {
        bus_type_free(o);
        return BUS_RETRY;
    }
    snprintf(buf, sizeof(buf), "%" PRIu64, n + 1);
    rv = bus_store_txn_put(t, BUS_STORE_APP, o->customer, strlen(o->customer),
                           buf, strlen(buf));
    bus_type_free(o);
    return rv == BUS_OK ? BUS_ACK : BUS_RETRY;
}

/* The projector's state lives under "<name>/" in the application
 * family; its transaction's keys are relative to that prefix. */
#define PROJ_NAME "orders-per-customer"
#define PROJ_PREFIX PROJ_NAME "/"

static bool
print_count(void *opaque, const void *key, size_t klen, const void *val,
            size_t vlen)
{
    size_t skip = strlen(PROJ_PREFIX);

    (void)opaque;
    printf("  %.*s: %.*s order(s)\n", (int)(klen - skip),
           (const char *)key + skip, (int)vlen, (const char *)val);
    return true;
}

/* ---- main ------------------------------------------------------------------ */

static int
publish_order(bus_ctx *ctx, const char *id, const char *customer,
              order_line *lines, size_t n)
{
    order_placed o = {(char *)id, (char *)customer, {lines, n}};
    bus_event_init init;
    bus_event *e;
    char err[256];
    int rv;

    memset(&init, 0, sizeof(init));
    init.stream = id;
    rv = bus_event_new_typed(&e, &order_placed_type, &o, &init, err,
                             sizeof(err));
    if (rv != BUS_OK) {
        fprintf(stderr, "orders: event: %s (%s)\n", bus_strerror(rv), err);
        return rv;
    }
    if ((rv = bus_publish(ctx, "orders.placed", e, 0)) != BUS_OK) {
        fprintf(stderr, "orders: publish: %s\n", bus_strerror(rv));
        bus_event_unref(e);
    }
    return rv;
}

int
main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "./data";
    struct timespec tick = {0, 1000000};
    order_line l1[] = {{"sku-apple", 3}, {"sku-pear", 1}};
    order_line l2[] = {{"sku-plum", 12}};
    bus_store_config stc;
    bus_projector_config pc;
    bus_failure_policy fp;
    bus_sub_config sc;
    bus_projector *proj = NULL;
    bus_broker *broker = NULL;
    bus_ctx *ctx = NULL;
    bus_store_slice sl = {0};
    char err[256] = "";
    app a;
    int rv, i, status = 1;

    memset(&a, 0, sizeof(a));
    printf("libbus %s: orders on mem://, store at %s\n\n", bus_version(),
           dir);
    if ((rv = bus_type_registry_new(&a.types)) != BUS_OK
        || (rv = bus_type_register(a.types, &order_placed_type)) != BUS_OK) {
        fprintf(stderr, "orders: types: %s\n", bus_strerror(rv));
        goto out;
    }

    /* The event store (RocksDB), created on the first run. */
    bus_store_config_init(&stc);
    stc.path = dir;
    stc.create_if_missing = true;
    if ((rv = bus_store_open(&a.store, &stc, err, sizeof(err))) != BUS_OK) {
        fprintf(stderr, "orders: store %s: %s (%s)\n", dir, bus_strerror(rv),
                err);
        goto out;
    }

    /* The bus: a context with the in-memory broker attached. */
    if ((rv = bus_ctx_open(&ctx, NULL)) != BUS_OK
        || (rv = bus_broker_open_uri(&broker, "mem://orders", err,
                                     sizeof(err)))
               != BUS_OK
        || (rv = bus_ctx_attach(ctx, broker, NULL)) != BUS_OK) {
        fprintf(stderr, "orders: bus: %s %s\n", bus_strerror(rv), err);
        goto out;
    }

    /* Retries: 3 attempts, 20 ms apart and growing; then dead-letter. */
    bus_failure_policy_init(&fp);
    fp.retry.initial_ms = 20;
    fp.retry.max_attempts = 3;
    bus_sub_config_init(&sc);
    sc.name = "recorder";
    sc.policy = &fp;
    if ((rv = bus_subscribe(ctx, "orders.placed", recorder, &a, &sc, NULL))
            != BUS_OK
        || (rv = bus_subscribe(ctx, "orders.placed.dlq", dead_letters, &a,
                               NULL, NULL))
               != BUS_OK) {
        fprintf(stderr, "orders: subscribe: %s\n", bus_strerror(rv));
        goto out;
    }

    /* The read model, kept up to date from the store's log. */
    bus_projector_config_init(&pc);
    pc.name = PROJ_NAME;
    pc.handler = count_per_customer;
    pc.opaque = &a;
    if ((rv = bus_projector_open(&proj, a.store, &pc)) != BUS_OK) {
        fprintf(stderr, "orders: projector: %s\n", bus_strerror(rv));
        goto out;
    }

    if (publish_order(ctx, "order-1001", "alice", l1, 2) != BUS_OK
        || publish_order(ctx, "order-1002", "bob", l2, 1) != BUS_OK
        || publish_order(ctx, "order-1003", "carol", NULL, 0) != BUS_OK)
        goto out;
    /* Two orders stored and one dead letter; give up after 10 s. */
    for (i = 0; i < 10000
                && (atomic_load(&a.recorded) < 2 || atomic_load(&a.dead) < 1);
         i++)
        nanosleep(&tick, NULL);
    if (atomic_load(&a.recorded) < 2 || atomic_load(&a.dead) < 1) {
        fprintf(stderr, "orders: timed out waiting for the handlers\n");
        goto out;
    }

    /* Read back what the store holds. */
    rv = bus_store_read_stream(a.store, "order-1001", BUS_STORE_START,
                               BUS_STORE_FORWARD, 0, NULL, &sl);
    if (rv == BUS_OK)
        printf("\nstream order-1001: %zu event(s), last version %" PRIu64
               "\n",
               sl.count, sl.last);
    bus_store_slice_free(&sl);
    printf("store head: position %" PRIu64 "\n", bus_store_head(a.store));
    if ((rv = bus_projector_wait(proj, bus_store_head(a.store), 10000))
        != BUS_OK) {
        fprintf(stderr, "orders: projector wait: %s\n", bus_strerror(rv));
        goto out;
    }
    printf("orders per customer (projection):\n");
    bus_store_scan(a.store, BUS_STORE_APP, PROJ_PREFIX, strlen(PROJ_PREFIX),
                   print_count, NULL);
    status = 0;

out:
    bus_ctx_close(ctx); /* drains, then no handler runs */
    bus_broker_close(broker);
    bus_projector_close(proj);
    bus_store_close(a.store);
    bus_type_registry_free(a.types);
    return status;
}
