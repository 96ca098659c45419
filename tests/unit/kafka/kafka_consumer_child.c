/*
 * kafka_consumer_child: a consumer process for the SIGKILL test.
 *
 *   kafka_consumer_child BOOTSTRAP TOPIC GROUP
 *
 * Joins GROUP on TOPIC through a bus context with a queued subscription
 * (two workers, so handlers of one partition finish out of order) and,
 * for every event handled, writes "<payload>\n" to stdout with one
 * write(2) *before* returning BUS_ACK: the parent knows every event whose
 * handling finished, even if this process is SIGKILLed right after. Each
 * handler call also takes about 1 ms (simulated work), so that commits
 * happen while the parent decides when to kill. Exits cleanly (committing)
 * when stdin reaches end of file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bus/broker_kafka.h>

static bus_result
handle(bus_delivery *d, void *opaque)
{
    bus_event *ev = bus_delivery_event(d);
    char line[64];
    size_t n = bus_event_payload_len(ev);

    struct timespec work = {0, 1000000};

    (void)opaque;
    nanosleep(&work, NULL);
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    memcpy(line, bus_event_payload(ev), n);
    line[n++] = '\n';
    if (write(1, line, n) != (ssize_t)n)
        return BUS_RETRY;
    return BUS_ACK;
}

int
main(int argc, char **argv)
{
    char uri[512], err[256], buf[64];
    const char *lv = getenv("BUS_KAFKA_TEST_LOG");
    bus_broker_config bc;
    bus_ctx_config cc;
    bus_sub_config sc;
    bus_broker *b;
    bus_ctx *ctx;
    int rv;

    if (argc != 4) {
        fprintf(stderr, "usage: kafka_consumer_child BOOTSTRAP TOPIC "
                        "GROUP\n");
        return 2;
    }
    /* The timings kafka://mock would set (kafka://host:port gets
     * librdkafka's), and frequent commits so that a kill finds many. */
    snprintf(uri, sizeof(uri),
             "kafka://%s?kafka.consumer.session.timeout.ms=4500&"
             "kafka.consumer.heartbeat.interval.ms=500&"
             "kafka.consumer.fetch.wait.max.ms=10&"
             "kafka.consumer.auto.commit.interval.ms=20&"
             "kafka.consumer.topic.metadata.refresh.interval.ms=1000",
             argv[1]);
    bus_broker_config_init(&bc);
    bc.uri = uri;
    if (lv != NULL && bus_log_level_parse(lv, &bc.log.level) == BUS_OK)
        bc.log.fn = bus_log_stderr; /* for debugging */
    if ((rv = bus_broker_open(&b, &bc, err, sizeof(err))) != BUS_OK) {
        fprintf(stderr, "child: %s (%s)\n", bus_err_name(rv), err);
        return 1;
    }
    bus_ctx_config_init(&cc);
    cc.workers = 2;
    if (bus_ctx_open(&ctx, &cc) != BUS_OK ||
        bus_ctx_attach(ctx, b, NULL) != BUS_OK)
        return 1;
    bus_sub_config_init(&sc);
    sc.group = argv[3];
    if ((rv = bus_subscribe(ctx, argv[2], handle, NULL, &sc, NULL)) != BUS_OK) {
        fprintf(stderr, "child: subscribe: %s\n", bus_err_name(rv));
        return 1;
    }
    while (read(0, buf, sizeof(buf)) > 0)
        ;
    bus_ctx_close(ctx);
    bus_broker_close(b);
    return 0;
}
