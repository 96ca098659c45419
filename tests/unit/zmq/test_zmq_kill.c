/* Reliable mode against a receiver PROCESS that is SIGKILLed mid-stream
 * and restarted, several times: every event the sender accepted must be
 * handled at least once by some receiver incarnation; duplicates (handled
 * by one incarnation, whose ack died with it, then resent) are reported.
 *
 * The receiver is zmq_kill_receiver (a bus context, an inline
 * subscription, the reliable hub bound on an ipc path in a fresh
 * directory); it appends each number it handles to a file before acking.
 * This process is the sender: a connecting reliable broker publishing
 * from a thread with an unbounded block policy, so a full window waits
 * through the restarts. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zmq_receiver_proc.h"

#define EVENTS 4000
#define KILLS 4
#define SHARE ((uint64_t)EVENTS / (KILLS + 2))

/* Lines in the record file so far. */
static uint64_t
file_lines(const char *file)
{
    FILE *f = fopen(file, "r");
    uint64_t n = 0;
    int c;

    if (f == NULL)
        return 0;
    while ((c = getc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

typedef struct lines_wait {
    const char *file;
    uint64_t want;
} lines_wait;

static int
lines_reached(void *arg)
{
    lines_wait *w = arg;

    return file_lines(w->file) >= w->want;
}

/* The sender publishes events [0, quota): the main thread raises the
 * quota by a share at each kill, so that every incarnation has events
 * left to handle (the sender is faster than the kills: without a quota
 * the first incarnations could take them all). */
typedef struct sender {
    bus_broker *b;
    zt_acks acks;
    atomic_int bad_rv;
    _Atomic uint64_t quota;
} sender;

typedef struct quota_wait {
    sender *s;
    uint64_t i;
} quota_wait;

static int
quota_reached(void *arg)
{
    quota_wait *w = arg;

    return atomic_load(&w->s->quota) > w->i;
}

static void *
sender_thread(void *arg)
{
    sender *s = arg;
    uint64_t i;

    for (i = 0; i < EVENTS; i++) {
        quota_wait qw = {s, i};
        bus_event *e;
        if (!bt_wait_for(quota_reached, &qw, 60000)) {
            atomic_fetch_add(&s->bad_rv, 1);
            return NULL;
        }
        e = zt_event(i);
        int rv = bus_broker_publish(s->b, "kill.n", e, 0, zt_ack_fn, &s->acks);
        if (rv != BUS_OK) {
            bus_event_unref(e);
            atomic_fetch_add(&s->bad_rv, 1);
        }
    }
    return NULL;
}

static void
test_receiver_killed_and_restarted_handles_every_event(void **state)
{
    char *dir = bt_mkdtemp("bus-zmq-kill");
    char uri[512], suri[600], file[512];
    uint32_t *count = calloc(EVENTS, sizeof(*count));
    uint64_t lines, dups = 0, i;
    receiver r;
    sender s;
    pthread_t th;
    FILE *f;
    int k;

    (void)state;
    assert_non_null(dir);
    assert_non_null(count);
    snprintf(uri, sizeof(uri), "zmq+ipc://%s/recv.sock?mode=reliable", dir);
    snprintf(file, sizeof(file), "%s/handled.txt", dir);
    receiver_start(&r, uri, file);

    memset(&s, 0, sizeof(s));
    snprintf(suri, sizeof(suri),
             "zmq+ipc://%s/recv.sock?mode=reliable&bind=0&window=128"
             "&resend_ivl=200&reconnect_ivl=20&reconnect_ivl_max=100"
             "&block_timeout_ms=-1",
             dir);
    s.b = zt_open(suri);
    atomic_store(&s.quota, 2 * SHARE);
    assert_int_equal(pthread_create(&th, NULL, sender_thread, &s), 0);
    for (k = 1; k <= KILLS; k++) {
        /* Each incarnation has at least a share to handle (what the
         * quota allows beyond what came before it); it dies halfway,
         * with events in flight. */
        lines_wait w = {file, file_lines(file) + SHARE / 2};
        assert_true(bt_wait_for(lines_reached, &w, 30000));
        receiver_kill(&r); /* mid-stream: events in flight */
        atomic_store(&s.quota, k == KILLS ? EVENTS : (k + 2) * SHARE);
        receiver_start(&r, uri, file);
    }
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(bus_broker_flush(s.b, 60000), BUS_OK);
    assert_int_equal(atomic_load(&s.bad_rv), 0);
    assert_int_equal(atomic_load(&s.acks.ok), EVENTS);
    assert_int_equal(atomic_load(&s.acks.failed), 0);
    receiver_stop(&r);

    /* Every accepted event handled at least once, by some incarnation. */
    assert_non_null(f = fopen(file, "r"));
    lines = 0;
    for (;;) {
        unsigned long long n;
        if (fscanf(f, "%llu", &n) != 1)
            break;
        assert_true(n < EVENTS);
        count[n]++;
        lines++;
    }
    fclose(f);
    for (i = 0; i < EVENTS; i++) {
        if (count[i] == 0)
            fail_msg("event %llu was never handled", (unsigned long long)i);
        dups += count[i] - 1;
    }
    print_message("%d events, receiver killed %d times: %llu handled, "
                  "%llu duplicate(s) (handled again after a kill), %llu "
                  "resent, %llu reconnects\n",
                  EVENTS, KILLS, (unsigned long long)lines,
                  (unsigned long long)dups,
                  (unsigned long long)zt_stats(s.b).resent,
                  (unsigned long long)zt_stats(s.b).reconnects);
    assert_int_equal(lines, EVENTS + dups);
    assert_true(zt_stats(s.b).reconnects >= KILLS);
    bus_broker_close(s.b);
    free(count);
    bt_rmtree(dir);
    free(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(
            test_receiver_killed_and_restarted_handles_every_event),
    };

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests_name("zmq reliable, receiver killed", tests,
                                       NULL, NULL);
}
