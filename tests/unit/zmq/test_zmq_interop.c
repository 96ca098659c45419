/* Interop: a Python program using Debian's python3-zmq and
 * python3-msgpack (zmq_interop.py, run with /usr/bin/python3) publishes
 * events that our fanout subscriber handles, and subscribes to events
 * our publisher sends, following docs/wire-format.md and
 * docs/brokers/zmq.md and nothing else: the wire format stands on its
 * own. Skips when the Python modules are missing. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

#include "zmq_test_util.h"

#define N 30
#define SCRIPT BUS_SOURCE_DIR "/tests/unit/zmq/zmq_interop.py"

typedef struct seen {
    zt_rec r;
    atomic_int bad; /* events whose fields are not what Python wrote */
} seen;

static int
seen_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
             unsigned flags)
{
    seen *s = opaque;
    uint64_t n = zt_num(ev);
    char stream[32], corr[32];

    snprintf(stream, sizeof(stream), "py-%llu", (unsigned long long)n);
    snprintf(corr, sizeof(corr), "corr-%llu", (unsigned long long)n);
    if (strcmp(bus_event_type(ev), "interop.created") != 0 ||
        bus_event_schema_version(ev) != 2 || bus_event_stream(ev) == NULL ||
        strcmp(bus_event_stream(ev), stream) != 0 ||
        bus_event_stream_version(ev) != n + 1 ||
        bus_event_header(ev, "correlation-id") == NULL ||
        strcmp(bus_event_header(ev, "correlation-id"), corr) != 0 ||
        bus_event_header(ev, "from") == NULL ||
        strcmp(bus_event_header(ev, "from"), "python \xe2\x9c\x93") != 0 ||
        strncmp(topic, "interop.py.", 11) != 0 ||
        bus_uuid_v7_ms(bus_event_id(ev)) == 0 || bus_event_timestamp(ev) <= 0)
        atomic_fetch_add(&s->bad, 1);
    return zt_deliver(&s->r, topic, ev, token, flags);
}

static FILE *
run_python(const char *args)
{
    char cmd[1024];

    snprintf(cmd, sizeof(cmd), "%s %s %s", BUS_TEST_PYTHON, SCRIPT, args);
    return popen(cmd, "r");
}

static int
python_status(FILE *p)
{
    int st = pclose(p);

    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void
test_python_publisher_to_our_subscriber(void **state)
{
    char line[256], uri[300];
    bus_broker *peer;
    FILE *py;
    seen s;
    int st;

    (void)state;
    memset(&s, 0, sizeof(s));
    assert_non_null(py = run_python("pub 30"));
    if (fgets(line, sizeof(line), py) == NULL) {
        st = python_status(py);
        if (st == 77)
            skip();
        fail_msg("python exited with %d before its endpoint", st);
    }
    assert_int_equal(strncmp(line, "ENDPOINT ", 9), 0);
    line[strcspn(line, "\n")] = '\0';
    snprintf(uri, sizeof(uri), "zmq+%s?bind=0", line + 9);
    peer = zt_open(uri);
    zt_rec_init(&s.r, peer);
    {
        void *h = NULL;
        /* Returns when Python confirmed it with the sync frame. */
        assert_int_equal(bus__broker_subscribe(peer, "interop.>", NULL,
                                               seen_deliver, &s, &h),
                         BUS_OK);
        atomic_store(&s.r.handle, h);
    }
    assert_true(zt_wait(&s.r.n, N, ZT_WAIT_MS));
    assert_non_null(fgets(line, sizeof(line), py));
    assert_string_equal(line, "SENT 30\n");
    assert_int_equal(python_status(py), 0);
    assert_int_equal(atomic_load(&s.bad), 0);
    assert_int_equal(atomic_load(&s.r.out_of_order), 0);
    assert_int_equal(zt_stats(peer).bad_frames, 0);
    bus_broker_close(peer);
    zt_rec_fini(&s.r);
}

static void
test_our_publisher_to_a_python_subscriber(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0");
    char args[400], line[512], want[512];
    FILE *py;
    uint64_t i;
    int st;

    (void)state;
    snprintf(args, sizeof(args), "sub %s %d", bus_broker_zmq_endpoint(hub), N);
    assert_non_null(py = run_python(args));
    if (fgets(line, sizeof(line), py) == NULL) {
        st = python_status(py);
        bus_broker_close(hub);
        if (st == 77)
            skip();
        fail_msg("python exited with %d before READY", st);
    }
    assert_string_equal(line, "READY\n");
    /* The slow-joiner handshake: publish once it has subscribed. */
    assert_int_equal(bus_broker_zmq_wait_subscribers(hub, 1, ZT_WAIT_MS),
                     BUS_OK);
    for (i = 0; i < N; i++) {
        bus_header h[2] = {{"correlation-id", "c-x"},
                           {"greeting", "h\xc3\xa9llo"}};
        bus_event_init in;
        bus_event *e;
        char stream[32];
        memset(&in, 0, sizeof(in));
        snprintf(stream, sizeof(stream), "c-%llu", (unsigned long long)i);
        in.type = "interop.from_c";
        in.schema_version = 3;
        in.stream = stream;
        in.stream_version = i + 7;
        in.payload = &i;
        in.payload_len = sizeof(i);
        in.headers = h;
        in.n_headers = 2;
        assert_int_equal(bus_event_create(&e, &in), BUS_OK);
        assert_int_equal(
            bus_broker_publish(hub, "interop.c.t", e, 0, NULL, NULL), BUS_OK);
    }
    for (i = 0; i < N; i++) {
        assert_non_null(fgets(line, sizeof(line), py));
        snprintf(want, sizeof(want),
                 "EVENT interop.c.t interop.from_c c-%llu 3 %llu %llu "
                 "correlation-id=c-x,greeting=h\xc3\xa9llo\n",
                 (unsigned long long)i, (unsigned long long)(i + 7),
                 (unsigned long long)i);
        assert_string_equal(line, want);
    }
    assert_non_null(fgets(line, sizeof(line), py));
    assert_string_equal(line, "DONE\n");
    assert_int_equal(python_status(py), 0);
    assert_int_equal(zt_stats(hub).dropped_late, 0);
    bus_broker_close(hub);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_python_publisher_to_our_subscriber),
        cmocka_unit_test(test_our_publisher_to_a_python_subscriber),
    };

    return cmocka_run_group_tests_name("zmq interop (python)", tests, NULL,
                                       NULL);
}
