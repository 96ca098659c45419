/*
 * pipeline: a subscription with a failure policy, a dead-letter topic,
 * automatic tracing, metrics and health, all through bus_subscribe and
 * bus_publish.
 *
 * "billing" handles orders.placed: order o-1 fails once (retried later,
 * deferred on the bus's timer wheel), o-2 is refused for good (dead-
 * lettered to orders.placed.dlq with the failure in its headers), o-3
 * passes. Each handled order publishes payments.requested from inside the
 * handler, which inherits the order's correlation and causation ids.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <bus/bus.h>

static bus_ctx *ctx;
static atomic_int done; /* payments seen + dead letters seen */

static bus_result
billing(bus_delivery *d, void *opaque)
{
    const char *order = bus_event_stream(bus_delivery_event(d));
    bus_event *pay;

    (void)opaque;
    if (strcmp(order, "o-2") == 0) {
        bus_delivery_set_error(d, 400, "unknown customer");
        return BUS_REJECT; /* permanent: dead-letter at once */
    }
    if (strcmp(order, "o-1") == 0 && bus_delivery_attempt(d) == 1) {
        bus_delivery_set_error(d, 503, "payment service busy");
        return BUS_RETRY; /* transient: the policy retries later */
    }
    printf("billing: %s handled (attempt %u)\n", order,
           bus_delivery_attempt(d));
    /* Published from a handler: correlation, causation and traceparent
     * are inherited by bus_publish itself. */
    if (bus_event_new(&pay, "payment.requested", order, strlen(order))
        == BUS_OK
        && bus_publish(ctx, "payments.requested", pay, 0) != BUS_OK)
        bus_event_unref(pay);
    return BUS_ACK;
}

static bus_result
payments(bus_delivery *d, void *opaque)
{
    const bus_event *e = bus_delivery_event(d);

    (void)opaque;
    printf("payments: correlation %s, caused by %s\n",
           bus_event_correlation_id(e), bus_event_causation_id(e));
    atomic_fetch_add(&done, 1);
    return BUS_ACK;
}

static bus_result
dead_letters(bus_delivery *d, void *opaque)
{
    const bus_event *e = bus_delivery_event(d);

    (void)opaque;
    printf("dead letter from %s (%s): error %s \"%s\" after %s attempt(s)\n",
           bus_event_header(e, BUS_H_DLQ_TOPIC),
           bus_event_header(e, BUS_H_DLQ_SUBSCRIPTION),
           bus_event_header(e, BUS_H_DLQ_ERROR_CODE),
           bus_event_header(e, BUS_H_DLQ_ERROR),
           bus_event_header(e, BUS_H_DLQ_ATTEMPTS));
    atomic_fetch_add(&done, 1);
    return BUS_ACK;
}

int
main(void)
{
    static const char *const orders[] = {"o-1", "o-2", "o-3"};
    struct timespec tick = {0, 1000000};
    bus_ctx_config cc;
    bus_sub_config sc;
    bus_failure_policy fp;
    bus_metrics *m = NULL;
    bus_health *h = NULL;
    bus_health_report *rep;
    char *text;
    size_t len;
    int i;

    bus_metrics_new(&m, NULL);
    bus_health_open(&h, NULL);
    bus_ctx_config_init(&cc);
    cc.metrics = m;
    cc.health = h;
    if (bus_ctx_open(&ctx, &cc) != BUS_OK)
        return 1;

    bus_failure_policy_init(&fp); /* queued: deferred retries */
    fp.retry.initial_ms = 20;
    fp.retry.max_attempts = 3;
    bus_sub_config_init(&sc);
    sc.name = "billing";
    sc.policy = &fp;
    bus_subscribe(ctx, "orders.placed", billing, NULL, &sc, NULL);
    bus_subscribe(ctx, "orders.placed.dlq", dead_letters, NULL, NULL, NULL);
    bus_subscribe(ctx, "payments.requested", payments, NULL, NULL, NULL);

    for (i = 0; i < 3; i++) {
        bus_event *e;
        if (bus_event_new(&e, "order.placed", "{}", 2) != BUS_OK)
            return 1;
        bus_event_set_stream(e, orders[i], 1);
        if (bus_publish(ctx, "orders.placed", e, 0) != BUS_OK)
            bus_event_unref(e);
    }
    /* Two payments and one dead letter; give up after 5 s. */
    for (i = 0; i < 5000 && atomic_load(&done) < 3; i++)
        nanosleep(&tick, NULL);

    if (bus_health_run(h, BUS_HEALTH_BOTH, &rep) == BUS_OK) {
        if (bus_health_report_json_alloc(rep, &text, &len) == BUS_OK) {
            printf("health: %s\n", text);
            bus_health_text_free(text);
        }
        bus_health_report_free(rep);
    }
    if (bus_metrics_prometheus_alloc(m, &text, &len) == BUS_OK) {
        for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
            if (strncmp(line, "bus_deliveries", 14) == 0)
                printf("%s\n", line);
        bus_metrics_text_free(text);
    }
    bus_ctx_close(ctx);
    bus_health_close(h);
    bus_metrics_free(m);
    return atomic_load(&done) == 3 ? 0 : 1;
}
