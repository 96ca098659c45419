/* The per-partition in-flight offset tracker (brokers/kafka/kafka_track.h):
 * the commit position is the lowest unfinished offset, out-of-order
 * finishes, gaps in offsets, retries, the bound, cancel, and allocation
 * failures. */
#include <string.h>

#include "kafka_track.h"
#include "test_support.h"
#include "testing.h"

static void
test_position_is_the_lowest_unfinished_offset(void **state)
{
    kt t;
    int64_t off;

    (void)state;
    kt_init(&t, 100);
    assert_int_equal(kt_position(&t), -1); /* nothing yet: store nothing */
    for (off = 10; off < 15; off++)
        assert_int_equal(kt_push(&t, off, NULL), BUS_OK);
    assert_int_equal(kt_position(&t), 10);
    assert_false(kt_done(&t, 12, NULL)); /* not the head */
    assert_false(kt_done(&t, 14, NULL));
    assert_int_equal(kt_position(&t), 10);
    assert_true(kt_done(&t, 10, NULL));
    assert_int_equal(kt_position(&t), 11);
    assert_true(kt_done(&t, 11, NULL)); /* pops 11 and 12 */
    assert_int_equal(kt_position(&t), 13);
    assert_true(kt_done(&t, 13, NULL)); /* pops 13, 14: empty */
    /* Empty: the offset after the last pushed (the next to read). */
    assert_int_equal(kt_position(&t), 15);
    assert_int_equal(t.n, 0);
    assert_int_equal(t.inflight, 0);
    kt_clear(&t);
}

static void
test_gaps_unknown_and_repeated_acks(void **state)
{
    kt t;
    bool found;

    (void)state;
    kt_init(&t, 10);
    /* Compacted topics and transaction markers leave gaps. */
    assert_int_equal(kt_push(&t, 3, NULL), BUS_OK);
    assert_int_equal(kt_push(&t, 7, NULL), BUS_OK);
    assert_int_equal(kt_push(&t, 8, NULL), BUS_OK);
    assert_int_equal(kt_push(&t, 8, NULL), BUS_EINVAL); /* not increasing */
    assert_int_equal(kt_push(&t, 5, NULL), BUS_EINVAL);
    assert_false(kt_done(&t, 5, &found)); /* never pushed */
    assert_false(found);
    assert_true(kt_done(&t, 3, &found));
    assert_true(found);
    assert_false(kt_done(&t, 3, &found)); /* already popped */
    assert_false(found);
    assert_int_equal(kt_position(&t), 7);
    assert_false(kt_done(&t, 8, &found));
    assert_true(found);
    assert_false(kt_done(&t, 8, &found)); /* repeated: ignored */
    assert_false(found);
    assert_true(kt_done(&t, 7, NULL));
    assert_int_equal(kt_position(&t), 9);
    kt_clear(&t);
}

static void
test_bound_refuses_and_cancel_goes_back(void **state)
{
    kt t;
    bus_event *e, *back = NULL;
    int64_t off;

    (void)state;
    kt_init(&t, 3);
    for (off = 0; off < 3; off++)
        assert_int_equal(kt_push(&t, off, NULL), BUS_OK);
    assert_int_equal(kt_push(&t, 3, NULL), BUS_EAGAIN);
    assert_true(kt_cancel_last(&t, NULL));
    assert_int_equal(kt_position(&t), 0);
    assert_int_equal(t.next, 2); /* the cancelled one comes again */
    assert_true(kt_done(&t, 0, NULL));
    assert_true(kt_done(&t, 1, NULL));
    assert_int_equal(kt_position(&t), 2);
    assert_int_equal(bus_event_new(&e, "t.x", "p", 1), BUS_OK);
    assert_int_equal(kt_push(&t, 2, e), BUS_OK);
    assert_true(kt_cancel_last(&t, &back));
    assert_ptr_equal(back, e); /* the reference comes back */
    assert_int_equal(kt_position(&t), 2);
    assert_false(kt_cancel_last(&t, NULL));
    bus_event_unref(back);
    kt_clear(&t);
}

static void
test_retry_keeps_the_position_and_redelivers(void **state)
{
    kt t;
    kt_entry *e;

    (void)state;
    kt_init(&t, 10);
    assert_int_equal(kt_push(&t, 0, NULL), BUS_OK);
    assert_int_equal(kt_push(&t, 1, NULL), BUS_OK);
    assert_true(kt_retry(&t, 0, 123));
    assert_false(kt_retry(&t, 0, 123)); /* not in flight any more */
    assert_int_equal(t.retry, 1);
    assert_int_equal(t.inflight, 1);
    assert_false(kt_done(&t, 1, NULL)); /* 0 still unfinished */
    assert_int_equal(kt_position(&t), 0);
    e = kt_find(&t, 0);
    assert_non_null(e);
    assert_int_equal(e->state, KT_RETRY);
    assert_int_equal(e->due_ns, 123);
    kt_redelivered(&t, e);
    assert_int_equal(e->attempts, 2);
    assert_int_equal(t.retry, 0);
    assert_int_equal(t.inflight, 1);
    assert_true(kt_done(&t, 0, NULL));
    assert_int_equal(kt_position(&t), 2);
    kt_clear(&t);
}

static void
test_ring_grows_and_wraps(void **state)
{
    kt t;
    int64_t off, head = 0;

    (void)state;
    kt_init(&t, 1000);
    /* Push and finish in a sliding window so the ring wraps and grows. */
    for (off = 0; off < 5000; off++) {
        assert_int_equal(kt_push(&t, off * 2, NULL), BUS_OK);
        if (t.n > 150) {
            assert_true(kt_done(&t, head * 2, NULL));
            head++;
        }
        assert_int_equal(kt_position(&t), head * 2);
    }
    /* Finish from the top down: the position jumps at the end. */
    for (off = 4999; off > head; off--)
        assert_false(kt_done(&t, off * 2, NULL));
    assert_true(kt_done(&t, head * 2, NULL));
    assert_int_equal(kt_position(&t), 5000 * 2 - 1);
    kt_clear(&t);
}

static void
test_push_survives_allocation_failures(void **state)
{
    uint64_t n;

    (void)state;
    for (n = 1;; n++) {
        kt t;
        int rv = BUS_OK;
        int64_t off;
        kt_init(&t, 1000);
        bus_fault_alloc_fail_nth(n, false);
        for (off = 0; off < 200 && rv == BUS_OK; off++)
            rv = kt_push(&t, off, NULL);
        bus_fault_alloc_fail_nth(0, false);
        if (rv == BUS_OK) {
            kt_clear(&t);
            break;
        }
        assert_int_equal(rv, BUS_ENOMEM);
        /* Everything pushed before the failure is still there. */
        assert_int_equal(t.n, (uint32_t)(off - 1));
        assert_int_equal(kt_position(&t), t.n ? 0 : -1);
        kt_clear(&t);
    }
    assert_true(n > 1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_position_is_the_lowest_unfinished_offset),
        cmocka_unit_test(test_gaps_unknown_and_repeated_acks),
        cmocka_unit_test(test_bound_refuses_and_cancel_goes_back),
        cmocka_unit_test(test_retry_keeps_the_position_and_redelivers),
        cmocka_unit_test(test_ring_grows_and_wraps),
        cmocka_unit_test(test_push_survives_allocation_failures),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
