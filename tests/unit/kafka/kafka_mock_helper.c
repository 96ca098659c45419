/*
 * kafka_mock_helper: owns a librdkafka mock cluster for other processes.
 *
 *   kafka_mock_helper [BROKERS]
 *
 * Starts an in-process mock cluster (kafka://mock, BROKERS brokers,
 * default 3) through the public API, prints its bootstrap servers on one
 * line of stdout and runs until stdin reaches end of file (or it is
 * killed). Tests start it first and point consumer processes, kcat or a
 * kafka://host:port broker at the printed address; it is handy for trying
 * the examples without a Kafka cluster too:
 *
 *   kafka_mock_helper 3 | { read boot; kcat -L -b "$boot"; }
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <bus/broker_kafka.h>

int
main(int argc, char **argv)
{
    char uri[64], err[256], buf[256];
    int brokers = argc > 1 ? atoi(argv[1]) : 3;
    bus_broker *b;
    int rv;

    snprintf(uri, sizeof(uri), "kafka://mock?mock.brokers=%d",
             brokers > 0 ? brokers : 3);
    if ((rv = bus_broker_open_uri(&b, uri, err, sizeof(err))) != BUS_OK) {
        fprintf(stderr, "kafka_mock_helper: %s: %s (%s)\n", uri,
                bus_err_name(rv), err);
        return 1;
    }
    printf("%s\n", bus_broker_kafka_bootstrap(b));
    fflush(stdout);
    while (read(0, buf, sizeof(buf)) > 0)
        ;
    bus_broker_close(b);
    return 0;
}
