/*
 * The zmq_kill_receiver process, for the tests that kill or freeze it
 * (test_zmq_kill, test_zmq_heartbeat): spawned with its URI and record
 * file, stdin and stdout on pipes; started once it printed READY (its
 * broker is open and its subscription in).
 */
#ifndef BUS_ZMQ_RECEIVER_PROC_H
#define BUS_ZMQ_RECEIVER_PROC_H

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zmq_test_util.h"

#ifndef ZMQ_KILL_HELPER
#error "build with -DZMQ_KILL_HELPER=\"path of zmq_kill_receiver\""
#endif

extern char **environ;

typedef struct receiver {
    pid_t pid;
    int in;  /* its stdin (write end); EOF makes it close cleanly */
    int out; /* its stdout (read end) */
} receiver;

/* Spawns it and waits for READY, with a deadline. */
static inline void
receiver_start(receiver *r, const char *uri, const char *file)
{
    posix_spawn_file_actions_t fa;
    int in[2], out[2];
    char *argv[4];
    char buf[64];
    size_t got = 0;
    uint64_t deadline = bt_now_ns() + 20000000000ull;

    assert_int_equal(pipe(in), 0);
    assert_int_equal(pipe(out), 0);
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    argv[0] = (char *)ZMQ_KILL_HELPER;
    argv[1] = (char *)uri;
    argv[2] = (char *)file;
    argv[3] = NULL;
    assert_int_equal(
        posix_spawn(&r->pid, ZMQ_KILL_HELPER, &fa, NULL, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    r->in = in[1];
    r->out = out[0];
    while (got < 6) {
        struct pollfd p = {r->out, POLLIN, 0};
        ssize_t n;
        if (bt_now_ns() > deadline)
            fail_msg("receiver did not start");
        if (poll(&p, 1, 100) <= 0)
            continue;
        n = read(r->out, buf + got, sizeof(buf) - 1 - got);
        if (n <= 0)
            fail_msg("receiver exited before READY");
        got += (size_t)n;
    }
    buf[got] = '\0';
    assert_non_null(strstr(buf, "READY"));
}

/* SIGKILL (which also ends a SIGSTOP), reaped. */
static inline void
receiver_kill(receiver *r)
{
    int st;

    assert_int_equal(kill(r->pid, SIGKILL), 0);
    assert_int_equal(waitpid(r->pid, &st, 0), r->pid);
    assert_true(WIFSIGNALED(st));
    close(r->in);
    close(r->out);
}

/* EOF on its stdin: it closes cleanly and exits 0. */
static inline void
receiver_stop(receiver *r)
{
    int st;

    close(r->in);
    assert_int_equal(waitpid(r->pid, &st, 0), r->pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    close(r->out);
}

#endif
