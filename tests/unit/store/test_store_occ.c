/*
 * Optimistic concurrency under contention: 16 threads append to 3 hot
 * streams with exact expected versions. Accepted appends must equal the
 * final stream lengths, no version may be given twice, every refusal must
 * be a conflict carrying the version that made it one.
 */
#include <stdatomic.h>

#include "platform.h"
#include "store_test.h"

#define OCC_THREADS 16
#define OCC_STREAMS 3
#define OCC_ATTEMPTS 150

typedef struct occ_arg {
    bus_store *s;
    int idx;
    uint64_t accepted[OCC_STREAMS];
    uint64_t conflicts;
    uint64_t other;
    uint64_t got[OCC_ATTEMPTS]; /* version won, per attempt (0: lost) */
    int stream_of[OCC_ATTEMPTS];
} occ_arg;

static const char *occ_names[OCC_STREAMS] = {"hot-0", "hot-1", "hot-2"};

static void
occ_thread(void *p)
{
    occ_arg *a = p;
    uint64_t expect[OCC_STREAMS] = {0, 0, 0}, rs = (uint64_t)a->idx + 1;
    int i;

    for (i = 0; i < OCC_ATTEMPTS; i++) {
        int k = (int)(bt_rand(&rs) % OCC_STREAMS);
        char payload[32];
        bus_event *e;
        bus_store_append_result r;
        int rv;

        snprintf(payload, sizeof(payload), "%d:%d", a->idx, i);
        if (bus_event_new(&e, "occ", payload, strlen(payload)) != BUS_OK) {
            a->other++;
            continue;
        }
        rv = bus_store_append(a->s, occ_names[k], expect[k], &e, 1, &r);
        bus_event_unref(e);
        a->stream_of[i] = k;
        if (rv == BUS_OK) {
            a->accepted[k]++;
            a->got[i] = r.first_version;
            expect[k] = r.last_version;
        } else if (rv == BUS_ECONFLICT && r.current_version > expect[k]) {
            /* Learn the version that beat us and try with it next time. */
            a->conflicts++;
            expect[k] = r.current_version;
        } else {
            a->other++;
        }
    }
}

static void
run_occ(bus_store_durability dur)
{
    char *dir = bt_mkdtemp("bus-store-occ");
    bus_store *s = st_open_dir(dir, dur);
    bus__thread th[OCC_THREADS];
    occ_arg *a = calloc(OCC_THREADS, sizeof(*a));
    bus_store_slice sl;
    uint64_t accepted[OCC_STREAMS] = {0, 0, 0}, conflicts = 0;
    bus_store_stats st;
    int t, k, i;

    assert_non_null(a);
    memset(&sl, 0, sizeof(sl));
    for (t = 0; t < OCC_THREADS; t++) {
        a[t].s = s;
        a[t].idx = t;
        assert_int_equal(bus__thread_start(&th[t], "occ", occ_thread, &a[t]),
                         BUS_OK);
    }
    for (t = 0; t < OCC_THREADS; t++)
        bus__thread_join(&th[t]);
    for (t = 0; t < OCC_THREADS; t++) {
        assert_int_equal(a[t].other, 0); /* every refusal a conflict */
        conflicts += a[t].conflicts;
        for (k = 0; k < OCC_STREAMS; k++)
            accepted[k] += a[t].accepted[k];
    }
    for (k = 0; k < OCC_STREAMS; k++) {
        /* Accepted appends = final lengths. */
        assert_int_equal(st_last_version(s, occ_names[k]), accepted[k]);
        assert_int_equal(bus_store_read_stream(s, occ_names[k], 0,
                                               BUS_STORE_FORWARD, 100000, NULL,
                                               &sl),
                         BUS_OK);
        assert_int_equal(sl.count, accepted[k]);
        /* Each version holds the event of the one append that won it. */
        for (t = 0; t < OCC_THREADS; t++)
            for (i = 0; i < OCC_ATTEMPTS; i++) {
                char payload[32];
                bus_event *e;
                if (a[t].got[i] == 0 || a[t].stream_of[i] != k)
                    continue;
                e = sl.events[a[t].got[i] - 1];
                assert_int_equal(bus_event_stream_version(e), a[t].got[i]);
                snprintf(payload, sizeof(payload), "%d:%d", t, i);
                assert_int_equal(bus_event_payload_len(e), strlen(payload));
                assert_memory_equal(bus_event_payload(e), payload,
                                    strlen(payload));
            }
    }
    bus_store_stats_get(s, &st);
    assert_int_equal(st.conflicts, conflicts);
    assert_int_equal(st.events, accepted[0] + accepted[1] + accepted[2]);
    fprintf(stderr, "# %s: %llu accepted, %llu conflicts, %llu groups\n",
            dur == BUS_STORE_GROUP ? "group" : "none",
            (unsigned long long)st.events, (unsigned long long)conflicts,
            (unsigned long long)st.groups);
    st_verify_ok(s);
    bus_store_slice_free(&sl);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
    free(a);
}

static void
test_occ_without_sync(void **state)
{
    (void)state;
    run_occ(BUS_STORE_NONE);
}

static void
test_occ_with_group_commit(void **state)
{
    (void)state;
    run_occ(BUS_STORE_GROUP);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_occ_without_sync),
        cmocka_unit_test(test_occ_with_group_commit),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
