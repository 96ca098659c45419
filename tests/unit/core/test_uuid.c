/* UUIDv7: layout, formatting, and monotonic order across threads. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

static void
test_layout_is_v7(void **state)
{
    bus_uuid u;
    struct timespec ts;
    uint64_t now_ms;

    (void)state;
    clock_gettime(CLOCK_REALTIME, &ts);
    now_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    bus_uuid_v7(&u);
    assert_int_equal(u.b[6] >> 4, 7);       /* version */
    assert_int_equal(u.b[8] >> 6, 2);       /* variant 10 */
    assert_true(bus_uuid_v7_ms(&u) + 1000 >= now_ms);
    assert_true(bus_uuid_v7_ms(&u) <= now_ms + 1000);
}

static void
test_format_and_parse_round_trip(void **state)
{
    bus_uuid u, v;
    char s[BUS_UUID_STR_LEN + 1];

    (void)state;
    bus_uuid_v7(&u);
    bus_uuid_format(&u, s);
    assert_int_equal(strlen(s), 36);
    assert_true(s[8] == '-' && s[13] == '-' && s[18] == '-' && s[23] == '-');
    assert_int_equal(bus_uuid_parse(&v, s), BUS_OK);
    assert_memory_equal(&u, &v, 16);
    assert_int_equal(bus_uuid_parse(&v, "0190C1A2-0000-7ABC-8DEF-0123456789AB"),
                     BUS_OK);
    assert_int_equal(v.b[0], 0x01);
    assert_int_equal(v.b[15], 0xab);
    assert_int_equal(bus_uuid_parse(&v, "0190c1a2-0000-7abc-8def-0123456789a"),
                     BUS_EINVAL);
    assert_int_equal(bus_uuid_parse(&v, "0190c1a2-0000-7abc-8def-0123456789abc"),
                     BUS_EINVAL);
    assert_int_equal(bus_uuid_parse(&v, "0190c1a200007abc8def0123456789ab"),
                     BUS_EINVAL);
    assert_int_equal(bus_uuid_parse(&v, "g190c1a2-0000-7abc-8def-0123456789ab"),
                     BUS_EINVAL);
    assert_int_equal(bus_uuid_parse(&v, ""), BUS_EINVAL);
}

static void
test_strictly_increasing_in_one_thread(void **state)
{
    bus_uuid prev, cur;
    int i;

    (void)state;
    bus_uuid_v7(&prev);
    for (i = 0; i < 200000; i++) { /* many per millisecond */
        bus_uuid_v7(&cur);
        assert_true(memcmp(&prev, &cur, 16) < 0);
        prev = cur;
    }
}

#define NTHREADS 4
#define PER_THREAD 50000

static bus_uuid *ids[NTHREADS];
static atomic_int go;

static void *
gen_thread(void *arg)
{
    int t = (int)(intptr_t)arg, i;

    while (!atomic_load(&go))
        ;
    for (i = 0; i < PER_THREAD; i++)
        bus_uuid_v7(&ids[t][i]);
    return NULL;
}

static int
cmp_uuid(const void *a, const void *b)
{
    return memcmp(a, b, 16);
}

static void
test_monotonic_and_unique_across_threads(void **state)
{
    pthread_t th[NTHREADS];
    bus_uuid *all, before, after;
    int t, i;

    (void)state;
    bus_uuid_v7(&before);
    for (t = 0; t < NTHREADS; t++) {
        ids[t] = malloc(sizeof(bus_uuid) * PER_THREAD);
        assert_non_null(ids[t]);
        assert_int_equal(pthread_create(&th[t], NULL, gen_thread,
                                        (void *)(intptr_t)t), 0);
    }
    atomic_store(&go, 1);
    for (t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    bus_uuid_v7(&after);

    all = malloc(sizeof(bus_uuid) * NTHREADS * PER_THREAD);
    assert_non_null(all);
    for (t = 0; t < NTHREADS; t++) {
        for (i = 0; i < PER_THREAD; i++) {
            /* Each thread's ids increase, and all lie between the ids made
             * before the threads started and after they were joined. */
            if (i > 0)
                assert_true(memcmp(&ids[t][i - 1], &ids[t][i], 16) < 0);
            assert_true(memcmp(&before, &ids[t][i], 16) < 0);
            assert_true(memcmp(&ids[t][i], &after, 16) < 0);
        }
        memcpy(all + (size_t)t * PER_THREAD, ids[t],
               sizeof(bus_uuid) * PER_THREAD);
        free(ids[t]);
    }
    qsort(all, NTHREADS * PER_THREAD, sizeof(bus_uuid), cmp_uuid);
    for (i = 1; i < NTHREADS * PER_THREAD; i++)
        assert_true(memcmp(&all[i - 1], &all[i], 16) < 0); /* unique */
    free(all);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_is_v7),
        cmocka_unit_test(test_format_and_parse_round_trip),
        cmocka_unit_test(test_strictly_increasing_in_one_thread),
        cmocka_unit_test(test_monotonic_and_unique_across_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
