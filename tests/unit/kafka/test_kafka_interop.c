/* Interop with another Kafka client, Debian's kcat, on our mock cluster:
 * kcat reads the records we produce and shows the envelope headers; the
 * records kcat produces (with a ce_type header, a key and a header of its
 * own) are handled by our consumer. Skipped when kcat is not installed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kafka_test_util.h"

#define KCAT "/usr/bin/kcat"
#define DEADLINE_MS 30000

static void
test_kcat_reads_our_records_and_headers(void **state)
{
    bus_broker *b = kt_open("kafka://mock");
    char topic[64], boot[256], *out = NULL;
    bus_header hs[] = {{BUS_H_CORRELATION_ID, "corr-7"}};
    bus_event_init in;
    bus_event *e;
    size_t len = 0;
    int rv;

    (void)state;
    if (access(KCAT, X_OK) != 0)
        skip();
    kt_unique(topic, sizeof(topic), "interop.out");
    snprintf(boot, sizeof(boot), "%s", bus_broker_kafka_bootstrap(b));
    memset(&in, 0, sizeof(in));
    in.type = "orders.placed";
    in.stream = "order-1";
    in.stream_version = 2;
    in.payload = "{\"n\":1}";
    in.payload_len = 7;
    in.headers = hs;
    in.n_headers = 1;
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    assert_int_equal(bus_broker_publish(b, topic, e, 0, NULL, NULL), BUS_OK);
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    {
        /* -e: exit at the end of the partitions; %h: the headers. */
        char *argv[] = {
            KCAT,  "-C", "-b", boot, "-t",
            topic, "-e", "-q", "-f", "key=%k value=%s headers=%h\\n",
            "-m",  "15", NULL};
        rv = bt_run(argv, NULL, 0, &out, &len);
    }
    assert_int_equal(rv, 0);
    assert_non_null(out);
    printf("kcat: %s", out);
    assert_non_null(strstr(out, "key=order-1 value={\"n\":1}"));
    assert_non_null(strstr(out, "ce_type=orders.placed"));
    assert_non_null(strstr(out, "ce_specversion=1.0"));
    assert_non_null(strstr(out, "ce_id="));
    assert_non_null(strstr(out, "ce_time="));
    assert_non_null(strstr(out, "bus_stream=order-1"));
    assert_non_null(strstr(out, "bus_stream_version=2"));
    assert_non_null(strstr(out, "correlation-id=corr-7"));
    free(out);
    bus_broker_close(b);
}

static void
test_records_from_kcat_reach_our_handlers(void **state)
{
    bus_broker *b = kt_open("kafka://mock");
    char topic[64], boot[256], *out = NULL;
    const char *input = "id-1:{\"shipped\":true}\n";
    bus_event *ev;
    size_t len = 0;
    kt_rec r;
    int rv;

    (void)state;
    if (access(KCAT, X_OK) != 0)
        skip();
    kt_unique(topic, sizeof(topic), "interop.in");
    snprintf(boot, sizeof(boot), "%s", bus_broker_kafka_bootstrap(b));
    kt_rec_init(&r, b, KT_ACK_INLINE);
    kt_rec_sub(&r, topic, NULL);
    {
        char *argv[] = {KCAT, "-P",
                        "-b", boot,
                        "-t", topic,
                        "-K", ":",
                        "-H", "ce_type=shipment.sent",
                        "-H", "x-origin=kcat",
                        NULL};
        rv = bt_run(argv, input, strlen(input), &out, &len);
    }
    assert_int_equal(rv, 0);
    free(out);
    assert_true(kt_rec_wait(&r, 1, DEADLINE_MS));
    ev = r.items[0].ev;
    assert_string_equal(bus_event_type(ev), "shipment.sent");
    assert_string_equal(bus_event_stream(ev), "id-1");
    assert_string_equal(bus_event_header(ev, "x-origin"), "kcat");
    assert_int_equal(bus_event_payload_len(ev), strlen("{\"shipped\":true}"));
    assert_memory_equal(bus_event_payload(ev), "{\"shipped\":true}",
                        strlen("{\"shipped\":true}"));
    bus__broker_unsubscribe(b, r.handle);
    kt_rec_free(&r);
    bus_broker_close(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kcat_reads_our_records_and_headers),
        cmocka_unit_test(test_records_from_kcat_reach_our_handlers),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
