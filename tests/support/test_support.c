/* Shared test helpers (see test_support.h). */
#define _XOPEN_SOURCE 700 /* nftw */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_support.h"

char *
bt_mkdtemp(const char *prefix)
{
    const char *tmp = getenv("TMPDIR");
    char *path;
    size_t n;

    if (tmp == NULL || *tmp == '\0')
        tmp = "/tmp";
    n = strlen(tmp) + strlen(prefix) + 16;
    path = malloc(n);
    if (path == NULL)
        return NULL;
    snprintf(path, n, "%s/%s-XXXXXX", tmp, prefix);
    if (mkdtemp(path) == NULL) {
        free(path);
        return NULL;
    }
    return path;
}

static int
bt_rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

void
bt_rmtree(const char *path)
{
    if (path != NULL)
        nftw(path, bt_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

uint64_t
bt_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int
bt_wait_for(int (*cond)(void *), void *arg, int timeout_ms)
{
    uint64_t deadline = bt_now_ns() + (uint64_t)timeout_ms * 1000000u;
    struct timespec ts = {0, 100000};

    for (;;) {
        if (cond(arg))
            return 1;
        if (bt_now_ns() > deadline)
            return cond(arg);
        nanosleep(&ts, NULL);
    }
}

int
bt_run(char *const argv[], const void *stdin_data, size_t stdin_len,
       char **out, size_t *out_len)
{
    int in[2], outp[2], status;
    pid_t pid;
    size_t cap = 4096, len = 0, off = 0;
    char *buf = NULL;

    if (pipe(in) != 0)
        return -1;
    if (pipe(outp) != 0) {
        close(in[0]);
        close(in[1]);
        return -1;
    }
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(outp[1], 1);
        close(in[0]);
        close(in[1]);
        close(outp[0]);
        close(outp[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(in[0]);
    close(outp[1]);
    signal(SIGPIPE, SIG_IGN);
    /* Non-blocking stdin: a child that writes a lot before reading must
     * not deadlock us in write() while its stdout pipe is full. */
    fcntl(in[1], F_SETFL, fcntl(in[1], F_GETFL) | O_NONBLOCK);
    buf = malloc(cap);
    if (stdin_data == NULL || stdin_len == 0) {
        close(in[1]);
        in[1] = -1;
    }
    for (;;) {
        struct pollfd pf[2];
        int nf = 0, outi = -1, ini = -1;
        if (outp[0] >= 0) {
            pf[nf].fd = outp[0];
            pf[nf].events = POLLIN;
            outi = nf++;
        }
        if (in[1] >= 0) {
            pf[nf].fd = in[1];
            pf[nf].events = POLLOUT;
            ini = nf++;
        }
        if (nf == 0)
            break;
        if (poll(pf, (nfds_t)nf, -1) < 0 && errno != EINTR)
            break;
        if (ini >= 0 && (pf[ini].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(in[1], (const char *)stdin_data + off,
                              stdin_len - off);
            if (w > 0)
                off += (size_t)w;
            if ((w < 0 && errno != EAGAIN) || off == stdin_len) {
                close(in[1]);
                in[1] = -1;
            }
        }
        if (outi >= 0 && (pf[outi].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t r;
            if (buf != NULL && len + 1 >= cap) {
                char *nb = realloc(buf, cap * 2);
                if (nb != NULL) {
                    buf = nb;
                    cap *= 2;
                }
            }
            r = read(outp[0], buf + len, cap - len - 1);
            if (r <= 0) {
                close(outp[0]);
                outp[0] = -1;
            } else {
                len += (size_t)r;
            }
        }
    }
    if (in[1] >= 0)
        close(in[1]);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (buf != NULL)
        buf[len] = '\0';
    if (out != NULL)
        *out = buf;
    else
        free(buf);
    if (out_len != NULL)
        *out_len = len;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return -1;
}

uint64_t
bt_seed(void)
{
    const char *s = getenv("BUS_TEST_SEED");
    uint64_t seed;

    if (s != NULL && *s != '\0')
        seed = strtoull(s, NULL, 0);
    else
        seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    fprintf(stderr, "# BUS_TEST_SEED=%" PRIu64 "\n", seed);
    return seed ? seed : 1;
}

uint64_t
bt_rand(uint64_t *state)
{
    /* splitmix64 */
    uint64_t z = (*state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}
