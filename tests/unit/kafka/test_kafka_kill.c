/* A consumer process SIGKILLed mid-stream and restarted, several times.
 *
 * kafka_mock_helper (a separate process) owns the mock cluster, since a
 * child cannot share an in-process one. This test publishes the events,
 * then runs kafka_consumer_child processes in one group one after the
 * other; each reports every event it finished handling on stdout before
 * acking it. Each run but the last is SIGKILLed after a share of the
 * stream; after each kill the committed offsets are checked: below the
 * committed offset of a partition, every record must have been reported
 * handled (no offset is committed for an event not handled). The last run
 * ends cleanly. Then every event must have been handled at least once;
 * duplicates (expected after kills) are counted and reported. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kafka_test_util.h"

#ifndef KAFKA_HELPER_DIR
#error "KAFKA_HELPER_DIR must name the directory of the helper programs"
#endif

#define EVENTS 3000
#define RUNS 4
#define PARTS 4
#define DEADLINE_MS 60000

typedef struct child {
    pid_t pid;
    int in, out; /* our ends: its stdin, its stdout */
    char buf[8192];
    size_t len;
} child;

static void
child_start(child *c, char *const argv[])
{
    int in[2], out[2];

    assert_int_equal(pipe(in), 0);
    assert_int_equal(pipe(out), 0);
    c->pid = fork();
    assert_true(c->pid >= 0);
    if (c->pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    c->in = in[1];
    c->out = out[0];
    c->len = 0;
}

/* Reads one line (without '\n') into line; false on EOF or deadline. */
static bool
child_line(child *c, char *line, size_t cap, int timeout_ms)
{
    uint64_t deadline = bt_now_ns() + (uint64_t)timeout_ms * 1000000u;

    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        struct pollfd pf;
        ssize_t r;
        int64_t left;
        if (nl != NULL) {
            size_t n = (size_t)(nl - c->buf);
            snprintf(line, cap, "%.*s", (int)n, c->buf);
            memmove(c->buf, nl + 1, c->len - n - 1);
            c->len -= n + 1;
            return true;
        }
        left = (int64_t)(deadline - bt_now_ns()) / 1000000;
        if (left <= 0)
            return false;
        pf.fd = c->out;
        pf.events = POLLIN;
        if (poll(&pf, 1, (int)left) <= 0)
            continue;
        r = read(c->out, c->buf + c->len, sizeof(c->buf) - c->len);
        if (r <= 0)
            return false; /* EOF: the child is gone */
        c->len += (size_t)r;
    }
}

static void
child_reap(child *c)
{
    int st;

    close(c->in);
    close(c->out);
    while (waitpid(c->pid, &st, 0) < 0 && errno == EINTR)
        ;
}

typedef struct layout {
    int32_t part[EVENTS]; /* where each event landed */
    int64_t off[EVENTS];
    int seq_at[PARTS][EVENTS]; /* (partition, offset) -> seq */
    int64_t end[PARTS];
} layout;

static void
layout_record(const rd_kafka_message_t *m, void *arg)
{
    layout *l = arg;
    char buf[16];
    int seq;

    snprintf(buf, sizeof(buf), "%.*s", (int)m->len, (const char *)m->payload);
    seq = atoi(buf);
    assert_true(seq >= 0 && seq < EVENTS);
    assert_true(m->partition >= 0 && m->partition < PARTS);
    assert_true(m->offset < EVENTS);
    l->part[seq] = m->partition;
    l->off[seq] = m->offset;
    l->seq_at[m->partition][m->offset] = seq;
    if (m->offset + 1 > l->end[m->partition])
        l->end[m->partition] = m->offset + 1;
}

static void
test_sigkilled_consumer_loses_nothing(void **state)
{
    static layout lay;
    char helper[512], childp[512], boot[256], topic[64], group[64];
    char *hargv[] = {helper, "3", NULL};
    unsigned handled[EVENTS];
    child mock, c;
    bus_broker *b;
    size_t total_dups = 0, missing = 0, violations = 0, i;
    int run;

    (void)state;
    signal(SIGPIPE, SIG_IGN);
    snprintf(helper, sizeof(helper), "%s/kafka_mock_helper", KAFKA_HELPER_DIR);
    snprintf(childp, sizeof(childp), "%s/kafka_consumer_child",
             KAFKA_HELPER_DIR);
    child_start(&mock, hargv);
    assert_true(child_line(&mock, boot, sizeof(boot), DEADLINE_MS));
    kt_unique(topic, sizeof(topic), "kill");
    kt_unique(group, sizeof(group), "killgrp");

    {
        char uri[512];
        snprintf(uri, sizeof(uri), "kafka://%s", boot);
        b = kt_open(uri);
    }
    for (i = 0; i < EVENTS; i++) {
        char payload[16], stream[16];
        snprintf(payload, sizeof(payload), "%zu", i);
        snprintf(stream, sizeof(stream), "s%zu", i % 16);
        kt_publish(b, topic, "kill.event", stream, payload);
    }
    assert_int_equal(bus_broker_flush(b, DEADLINE_MS), BUS_OK);
    bus_broker_close(b);
    memset(&lay, 0, sizeof(lay));
    assert_int_equal(
        kt_raw_read(boot, topic, EVENTS, DEADLINE_MS, layout_record, &lay),
        EVENTS);
    memset(handled, 0, sizeof(handled));

    for (run = 0; run < RUNS; run++) {
        char *cargv[] = {childp, boot, topic, group, NULL};
        bool last = run == RUNS - 1;
        size_t got = 0, kill_after = 300 + (size_t)run * 250;
        char line[64];
        int32_t p;

        child_start(&c, cargv);
        for (;;) {
            size_t done = 0;
            if (!last && got >= kill_after)
                break;
            if (last) {
                for (i = 0; i < EVENTS; i++)
                    done += handled[i] > 0;
                if (done == EVENTS)
                    break;
            }
            if (!child_line(&c, line, sizeof(line), DEADLINE_MS))
                fail_msg("run %d: child stopped reporting after %zu", run, got);
            i = (size_t)atol(line);
            assert_true(i < EVENTS);
            handled[i]++;
            got++;
        }
        if (!last) {
            kill(c.pid, SIGKILL);
            /* What it wrote before dying still counts as handled. */
            while (child_line(&c, line, sizeof(line), 2000)) {
                i = (size_t)atol(line);
                assert_true(i < EVENTS);
                handled[i]++;
                got++;
            }
        } else {
            close(c.in); /* clean exit: commits */
            c.in = open("/dev/null", O_RDONLY);
            while (child_line(&c, line, sizeof(line), DEADLINE_MS)) {
                i = (size_t)atol(line);
                if (i < EVENTS)
                    handled[i]++;
            }
        }
        child_reap(&c);
        /* Committed offsets never run ahead of handling. */
        for (p = 0; p < PARTS; p++) {
            int64_t co = kt_committed(boot, group, topic, p), o;
            if (co < 0)
                continue; /* nothing committed yet */
            assert_true(co <= lay.end[p]);
            for (o = 0; o < co; o++)
                if (handled[lay.seq_at[p][o]] == 0) {
                    violations++;
                    printf("run %d: partition %d committed at %lld but "
                           "offset %lld (event %d) was never handled\n",
                           run, (int)p, (long long)co, (long long)o,
                           lay.seq_at[p][o]);
                }
            if (last && co < lay.end[p])
                printf("run %d: partition %d committed %lld of %lld (acks "
                       "still queued at close are redelivered next time)\n",
                       run, (int)p, (long long)co, (long long)lay.end[p]);
        }
        printf("run %d: %zu events handled%s; committed", run, got,
               last ? " (clean exit)" : ", then SIGKILL");
        for (p = 0; p < PARTS; p++)
            printf(" %lld/%lld", (long long)kt_committed(boot, group, topic, p),
                   (long long)lay.end[p]);
        printf("\n");
    }
    for (i = 0; i < EVENTS; i++) {
        if (handled[i] == 0)
            missing++;
        else
            total_dups += handled[i] - 1;
    }
    printf("%d events, %d runs (%d SIGKILLed): missing %zu, duplicates "
           "%zu, commits ahead of handling %zu\n",
           EVENTS, RUNS, RUNS - 1, missing, total_dups, violations);
    assert_int_equal(missing, 0);
    assert_int_equal(violations, 0);
    child_reap(&mock); /* EOF on its stdin: it closes the cluster */
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkilled_consumer_loses_nothing),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
