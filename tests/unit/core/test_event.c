/* bus_event: building, references, getters, setters, freezing, faults. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"
#include "testing.h"

static void
test_new_sets_defaults(void **state)
{
    bus_event *e;
    int64_t before = (int64_t)0;

    (void)state;
    assert_int_equal(bus_event_new(&e, "orders.placed", "abc", 3), BUS_OK);
    assert_string_equal(bus_event_type(e), "orders.placed");
    assert_int_equal(bus_event_schema_version(e), 1);
    assert_null(bus_event_stream(e));
    assert_int_equal(bus_event_stream_version(e), 0);
    assert_int_equal(bus_event_position(e), 0);
    assert_true(bus_event_timestamp(e) > before);
    assert_int_equal(bus_event_payload_len(e), 3);
    assert_memory_equal(bus_event_payload(e), "abc", 3);
    assert_int_equal(bus_event_header_count(e), 0);
    assert_false(bus_uuid_is_nil(bus_event_id(e)));
    assert_int_equal(bus_event_refcount(e), 1);
    assert_false(bus_event_frozen(e));
    bus_event_unref(e);
}

static void
test_create_copies_every_field(void **state)
{
    char type[] = "orders.placed", stream[] = "order-42";
    char payload[] = "payload bytes";
    bus_header h[] = {{"correlation-id", "c-1"}, {"tenant", "acme"}};
    bus_uuid id;
    bus_event_init init;
    bus_event *e;
    const char *k, *v;

    (void)state;
    bus_uuid_v7(&id);
    memset(&init, 0, sizeof(init));
    init.type = type;
    init.schema_version = 3;
    init.stream = stream;
    init.stream_version = 7;
    init.payload = payload;
    init.payload_len = sizeof(payload);
    init.headers = h;
    init.n_headers = 2;
    init.id = &id;
    init.timestamp_ns = 1234567890123;
    assert_int_equal(bus_event_create(&e, &init), BUS_OK);
    /* The event owns copies: change the caller's buffers. */
    memset(type, 'x', sizeof(type) - 1);
    memset(stream, 'y', sizeof(stream) - 1);
    memset(payload, 'z', sizeof(payload) - 1);
    assert_string_equal(bus_event_type(e), "orders.placed");
    assert_string_equal(bus_event_stream(e), "order-42");
    assert_int_equal(bus_event_stream_version(e), 7);
    assert_int_equal(bus_event_schema_version(e), 3);
    assert_int_equal(bus_event_timestamp(e), 1234567890123);
    assert_memory_equal(bus_event_id(e), &id, sizeof(id));
    assert_string_equal((const char *)bus_event_payload(e), "payload bytes");
    assert_string_equal(bus_event_correlation_id(e), "c-1");
    assert_null(bus_event_causation_id(e));
    assert_string_equal(bus_event_header(e, "tenant"), "acme");
    assert_true(bus_event_header_at(e, 1, &k, &v));
    assert_string_equal(k, "tenant");
    assert_string_equal(v, "acme");
    assert_false(bus_event_header_at(e, 2, &k, &v));
    bus_event_unref(e);
}

static void
test_create_rejects_bad_input(void **state)
{
    bus_event_init init;
    bus_header dup[] = {{"a", "1"}, {"a", "2"}};
    bus_header bad[] = {{"k", "\xff\xfe"}};
    bus_event *e = (bus_event *)1;

    (void)state;
    memset(&init, 0, sizeof(init));
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL); /* no type */
    assert_null(e);
    init.type = "";
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
    init.type = "bad\xc0\xaf"; /* overlong '/' */
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
    init.type = "ok";
    init.headers = dup;
    init.n_headers = 2;
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
    init.headers = bad;
    init.n_headers = 1;
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
    init.headers = NULL;
    init.n_headers = 0;
    init.payload = NULL;
    init.payload_len = 5;
    assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
    assert_int_equal(bus_event_create(NULL, &init), BUS_EINVAL);
    assert_int_equal(bus_event_create(&e, NULL), BUS_EINVAL);
}

static int free_calls;
static void
count_free(void *data, void *hint)
{
    free_calls++;
    assert_ptr_equal(hint, (void *)0x1234);
    free(data);
}

static void
test_wrap_adopts_and_frees_once(void **state)
{
    char *buf = malloc(64);
    bus_event *e, *e2;

    (void)state;
    memcpy(buf, "hello", 6);
    free_calls = 0;
    assert_int_equal(bus_event_wrap(&e, buf, 6, count_free, (void *)0x1234),
                     BUS_OK);
    assert_ptr_equal(bus_event_payload(e), buf); /* zero copy */
    assert_string_equal(bus_event_type(e), "");
    assert_int_equal(bus_event_set_type(e, "t.wrapped"), BUS_OK);
    e2 = bus_event_ref(e);
    assert_int_equal(bus_event_refcount(e), 2);
    bus_event_unref(e);
    assert_int_equal(free_calls, 0);
    bus_event_unref(e2);
    assert_int_equal(free_calls, 1);

    /* A failing create still frees the adopted buffer, exactly once. */
    {
        bus_event_init init;
        memset(&init, 0, sizeof(init));
        init.type = ""; /* invalid */
        init.payload = malloc(8);
        init.payload_len = 8;
        init.payload_free = count_free;
        init.payload_hint = (void *)0x1234;
        assert_int_equal(bus_event_create(&e, &init), BUS_EINVAL);
        assert_int_equal(free_calls, 2);
    }
}

static void
test_setters_fail_once_frozen(void **state)
{
    bus_event *e;
    bus_uuid id;

    (void)state;
    bus_uuid_v7(&id);
    assert_int_equal(bus_event_new(&e, "t", NULL, 0), BUS_OK);
    assert_int_equal(bus_event_set_stream(e, "s-1", 4), BUS_OK);
    assert_int_equal(bus_event_set_header(e, "k", "v"), BUS_OK);
    bus_event_freeze(e);
    assert_true(bus_event_frozen(e));
    assert_int_equal(bus_event_set_type(e, "x"), BUS_EFROZEN);
    assert_int_equal(bus_event_set_schema_version(e, 2), BUS_EFROZEN);
    assert_int_equal(bus_event_set_stream(e, "s-2", 1), BUS_EFROZEN);
    assert_int_equal(bus_event_set_position(e, 9), BUS_EFROZEN);
    assert_int_equal(bus_event_set_id(e, &id), BUS_EFROZEN);
    assert_int_equal(bus_event_set_timestamp(e, 1), BUS_EFROZEN);
    assert_int_equal(bus_event_set_header(e, "k", "w"), BUS_EFROZEN);
    assert_string_equal(bus_event_stream(e), "s-1");
    assert_string_equal(bus_event_header(e, "k"), "v");
    bus_event_unref(e);
}

static void
test_headers_add_replace_remove_grow(void **state)
{
    bus_event *e;
    char k[16], v[32];
    int i;

    (void)state;
    assert_int_equal(bus_event_new(&e, "t", "p", 1), BUS_OK);
    for (i = 0; i < 40; i++) { /* beyond the inline table and the arena */
        snprintf(k, sizeof(k), "key-%d", i);
        snprintf(v, sizeof(v), "value-%d-xxxxxxxxxxxxxxxx", i);
        assert_int_equal(bus_event_set_header(e, k, v), BUS_OK);
    }
    assert_int_equal(bus_event_header_count(e), 40);
    assert_int_equal(bus_event_set_header(e, "key-3", "replaced"), BUS_OK);
    assert_int_equal(bus_event_header_count(e), 40);
    assert_string_equal(bus_event_header(e, "key-3"), "replaced");
    assert_int_equal(bus_event_set_header(e, "key-0", NULL), BUS_OK);
    assert_int_equal(bus_event_header_count(e), 39);
    assert_null(bus_event_header(e, "key-0"));
    for (i = 1; i < 40; i++) {
        snprintf(k, sizeof(k), "key-%d", i);
        assert_non_null(bus_event_header(e, k));
    }
    assert_int_equal(bus_event_set_header(e, "", "v"), BUS_EINVAL);
    assert_int_equal(bus_event_set_header(e, "k", "bad\xed\xa0\x80"),
                     BUS_EINVAL); /* a UTF-16 surrogate */
    assert_int_equal(bus_event_set_stream(e, NULL, 0), BUS_OK);
    assert_null(bus_event_stream(e));
    bus_event_unref(e);
}

static void
test_clone_is_unfrozen_copy(void **state)
{
    bus_event *e, *c;

    (void)state;
    assert_int_equal(bus_event_new(&e, "t.x", "data", 4), BUS_OK);
    assert_int_equal(bus_event_set_stream(e, "s", 2), BUS_OK);
    assert_int_equal(bus_event_set_header(e, "a", "b"), BUS_OK);
    bus_event_freeze(e);
    assert_int_equal(bus_event_clone(&c, e), BUS_OK);
    assert_false(bus_event_frozen(c));
    assert_memory_equal(bus_event_id(c), bus_event_id(e), 16);
    assert_string_equal(bus_event_type(c), "t.x");
    assert_string_equal(bus_event_stream(c), "s");
    assert_int_equal(bus_event_stream_version(c), 2);
    assert_string_equal(bus_event_header(c, "a"), "b");
    assert_int_equal(bus_event_set_header(c, "dlq", "yes"), BUS_OK);
    assert_null(bus_event_header(e, "dlq"));
    assert_ptr_not_equal(bus_event_payload(c), bus_event_payload(e));
    bus_event_unref(c);
    bus_event_unref(e);
}

static void
test_create_is_one_allocation(void **state)
{
    bus_header h[] = {{"correlation-id", "abc"}, {"tenant", "t1"}};
    char payload[100] = {0};
    bus_event_init init;
    bus_event *e;

    (void)state;
    memset(&init, 0, sizeof(init));
    init.type = "orders.placed.v1.abc";
    init.stream = "order-1234567890123";
    init.headers = h;
    init.n_headers = 2;
    init.payload = payload;
    init.payload_len = sizeof(payload);
    bus_fault_alloc_fail_nth(1u << 30, false); /* count only */
    assert_int_equal(bus_event_create(&e, &init), BUS_OK);
    /* The common case: a correlation id and a traceparent set later fit
     * in the spare room too. */
    assert_int_equal(bus_event_set_header(e, "causation-id",
                                          "0190c1a2-0000-7000-8000-000000000000"),
                     BUS_OK);
    assert_int_equal(bus_fault_alloc_count(), 1);
    bus_fault_alloc_fail_nth(0, false);
    bus_event_unref(e);
}

static void
test_alloc_failures_are_clean(void **state)
{
    bus_header h[12];
    char keys[12][8];
    bus_event_init init;
    bus_event *e, *c;
    uint64_t n;
    int rv, i;

    (void)state;
    for (i = 0; i < 12; i++) { /* > 8 headers: create needs temp arrays */
        snprintf(keys[i], sizeof(keys[i]), "k%d", i);
        h[i].key = keys[i];
        h[i].value = "v";
    }
    memset(&init, 0, sizeof(init));
    init.type = "t";
    init.headers = h;
    init.n_headers = 12;
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_event_create(&e, &init);
        if (rv == BUS_OK)
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(e);
    }
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_event_clone(&c, e);
        if (rv == BUS_OK)
            break;
        assert_int_equal(rv, BUS_ENOMEM);
    }
    /* Setters past the spare room need a chunk: failure leaves e intact. */
    for (i = 0; i < 200; i++) {
        char k[16];
        snprintf(k, sizeof(k), "extra-%d", i);
        bus_fault_alloc_fail_nth(1, true);
        rv = bus_event_set_header(c, k, "some value that takes room");
        bus_fault_alloc_fail_nth(0, false);
        if (rv == BUS_ENOMEM) {
            assert_null(bus_event_header(c, k));
            assert_int_equal(bus_event_set_header(c, k, "again"), BUS_OK);
        } else {
            assert_int_equal(rv, BUS_OK);
        }
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_string_equal(bus_event_header(c, "k11"), "v");
    bus_event_unref(c);
    bus_event_unref(e);
}

/* Event blocks come from per-thread caches (event.c): blocks freed by
 * another thread go back to their cache, and the cache of an exited
 * thread is adopted by the next one, with blocks still in flight. */
#define XT_N 2000

typedef struct xt_batch {
    bus_event *ev[XT_N];
} xt_batch;

static void *
xt_make(void *arg)
{
    xt_batch *b = arg;
    size_t i;

    for (i = 0; i < XT_N; i++) {
        static _Thread_local char payload[64 + 7 * 300];
        size_t len = 64 + (i % 8) * 300; /* several size classes */
        memset(payload, (int)(i & 0xff), len);
        if (bus_event_new(&b->ev[i], "t.cache", payload, len) != BUS_OK)
            abort();
    }
    return NULL;
}

static void
test_blocks_freed_on_other_threads_and_after_exit(void **state)
{
    static xt_batch a, b;
    pthread_t th;
    size_t i;

    (void)state;
    /* Made on a thread that exits before they are freed (here). */
    assert_int_equal(pthread_create(&th, NULL, xt_make, &a), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    for (i = 0; i < XT_N; i++) {
        const unsigned char *p = bus_event_payload(a.ev[i]);
        assert_int_equal(bus_event_payload_len(a.ev[i]), 64 + (i % 8) * 300);
        assert_int_equal(p[0], (unsigned char)(i & 0xff));
        bus_event_unref(a.ev[i]);
    }
    /* The next thread adopts that cache and reuses the blocks. */
    assert_int_equal(pthread_create(&th, NULL, xt_make, &b), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    for (i = 0; i < XT_N; i++) {
        assert_int_equal(bus_event_payload_len(b.ev[i]), 64 + (i % 8) * 300);
        bus_event_unref(b.ev[i]);
    }
    /* And here, made and freed by one thread, interleaved. */
    xt_make(&a);
    for (i = 0; i < XT_N; i++)
        bus_event_unref(a.ev[i]);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_sets_defaults),
        cmocka_unit_test(test_create_copies_every_field),
        cmocka_unit_test(test_create_rejects_bad_input),
        cmocka_unit_test(test_wrap_adopts_and_frees_once),
        cmocka_unit_test(test_setters_fail_once_frozen),
        cmocka_unit_test(test_headers_add_replace_remove_grow),
        cmocka_unit_test(test_clone_is_unfrozen_copy),
        cmocka_unit_test(test_create_is_one_allocation),
        cmocka_unit_test(test_alloc_failures_are_clean),
        cmocka_unit_test(test_blocks_freed_on_other_threads_and_after_exit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
