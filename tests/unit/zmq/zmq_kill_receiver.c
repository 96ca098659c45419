/*
 * Helper process for test_zmq_kill: one incarnation of a reliable
 * receiver. Usage: zmq_kill_receiver URI FILE
 *
 * Opens a bus context with one inline subscription on ">" and attaches a
 * reliable broker opened on URI (it binds). The handler appends the
 * event's number to FILE ("<n>\n" in one write(2) on an O_APPEND file, so
 * a SIGKILL never leaves half a line) and returns BUS_ACK, so the broker
 * acks the sender only after the number is on record. Prints "READY"
 * once subscribed; runs until killed, or until stdin reaches EOF (then it
 * closes cleanly and exits 0).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bus/broker.h>
#include <bus/bus.h>

static bus_result
record(bus_delivery *d, void *opaque)
{
    int fd = *(int *)opaque;
    bus_event *e = bus_delivery_event(d);
    uint64_t n = UINT64_MAX;
    char line[32];
    int len;

    if (bus_event_payload_len(e) == sizeof(n))
        memcpy(&n, bus_event_payload(e), sizeof(n));
    len = snprintf(line, sizeof(line), "%" PRIu64 "\n", n);
    if (write(fd, line, (size_t)len) != len)
        return BUS_RETRY;
    return BUS_ACK;
}

int
main(int argc, char **argv)
{
    bus_sub_config sc;
    bus_ctx *ctx = NULL;
    bus_broker *b = NULL;
    char err[256], c;
    int fd, rv;

    if (argc != 3) {
        fprintf(stderr, "usage: %s URI FILE\n", argv[0]);
        return 2;
    }
    if ((fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT, 0644)) < 0) {
        perror(argv[2]);
        return 1;
    }
    if ((rv = bus_ctx_open(&ctx, NULL)) != BUS_OK ||
        (rv = bus_broker_open_uri(&b, argv[1], err, sizeof(err))) != BUS_OK ||
        (rv = bus_ctx_attach(ctx, b, NULL)) != BUS_OK) {
        fprintf(stderr, "receiver: %s (%s)\n", bus_err_name(rv),
                b == NULL ? err : "");
        return 1;
    }
    bus_sub_config_init(&sc);
    sc.dispatch = BUS_DISPATCH_INLINE;
    if ((rv = bus_subscribe(ctx, ">", record, &fd, &sc, NULL)) != BUS_OK) {
        fprintf(stderr, "receiver: subscribe: %s\n", bus_err_name(rv));
        return 1;
    }
    printf("READY\n");
    fflush(stdout);
    while (read(0, &c, 1) > 0)
        ;
    bus_ctx_close(ctx);
    bus_broker_close(b);
    close(fd);
    return 0;
}
