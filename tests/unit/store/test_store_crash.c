/*
 * Crash test: store_crash_child appends batches with exact expected
 * versions and reports each acknowledged append through a pipe; we SIGKILL
 * it at random moments (also while it opens and recovers), reopen the
 * store and check, every round:
 *   - verify: indexes consistent with the log, versions contiguous;
 *   - no acknowledged append is missing (stream versions reach every
 *     acknowledged version, and those versions hold the acknowledged
 *     batch);
 *   - no torn batch: the events of one request sit at consecutive
 *     positions, so each run of one batch id must have its "n" events;
 *   - the counting projection (also killed mid-commit) equals the stream
 *     lengths: nothing skipped, nothing applied twice.
 * Modes cycle always, group, none (a process kill loses nothing
 * acknowledged even without fsync: the WAL is in the page cache) and
 * async (group, one thread appending with bus_store_append_async: an
 * append is acknowledged when its callback runs).
 * Rounds: BUS_CRASH_ROUNDS (default 50); each mode starts a fresh store
 * every ROUNDS_PER_STORE rounds so the per-round full checks stay short.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "store_test.h"

#define NSTREAMS 16
#define ROUNDS_PER_STORE 6
#define NMODES 4

typedef struct ack {
    char stream[16];
    uint64_t first, last;
    char batch[64];
} ack;

typedef struct mode_state {
    const char *name;
    bus_store_durability dur;
    char *dir;
    uint64_t max_acked[NSTREAMS];
    uint64_t acks, rounds, early_kills;
} mode_state;

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void
sbuf_add(sbuf *b, const char *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static pid_t
spawn_child(const char *dir, const char *mode, uint64_t seed, int *fd)
{
    char seedbuf[32], nbuf[16];
    char *argv[] = {(char *)STORE_CRASH_CHILD,
                    (char *)dir,
                    (char *)mode,
                    seedbuf,
                    nbuf,
                    NULL};
    int p[2];
    pid_t pid;

    snprintf(seedbuf, sizeof(seedbuf), "%llu", (unsigned long long)seed);
    snprintf(nbuf, sizeof(nbuf), "%d", NSTREAMS);
    assert_int_equal(pipe(p), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Only async-signal-safe calls between fork and exec. */
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(p[1]);
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
    *fd = p[0];
    return pid;
}

/* Reads what is there until deadline; returns true when "R\n" was seen. */
static bool
pump(int fd, sbuf *b, uint64_t deadline, bool stop_at_ready)
{
    char buf[4096];

    for (;;) {
        uint64_t now = bt_now_ns();
        struct pollfd pf = {fd, POLLIN, 0};
        ssize_t r;

        if (stop_at_ready && b->p != NULL && strstr(b->p, "R\n") != NULL)
            return true;
        if (now >= deadline)
            return b->p != NULL && strstr(b->p, "R\n") != NULL;
        if (poll(&pf, 1, (int)((deadline - now) / 1000000) + 1) < 0 &&
            errno != EINTR)
            return false;
        while ((r = read(fd, buf, sizeof(buf))) > 0)
            sbuf_add(b, buf, (size_t)r);
        if (r == 0)
            return false; /* the child died by itself */
    }
}

static void
drain(int fd, sbuf *b)
{
    char buf[4096];
    ssize_t r;

    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    while ((r = read(fd, buf, sizeof(buf))) != 0) {
        if (r < 0 && errno == EINTR)
            continue;
        assert_true(r > 0);
        sbuf_add(b, buf, (size_t)r);
    }
    close(fd);
}

static size_t
parse_acks(mode_state *m, const sbuf *b, ack **out)
{
    size_t n = 0, cap = 64;
    ack *v = malloc(cap * sizeof(*v));
    const char *p = b->p ? b->p : "";

    assert_non_null(v);
    while (*p != '\0') {
        const char *nl = strchr(p, '\n');
        unsigned long long first, last;
        ack a;
        int idx;

        if (nl == NULL)
            break; /* a partial line cannot happen: writes are atomic */
        if (p[0] == 'A') {
            assert_int_equal(sscanf(p, "A %15s %llu %llu %63s", a.stream,
                                    &first, &last, a.batch),
                             4);
            a.first = first;
            a.last = last;
            if (n == cap) {
                cap *= 2;
                v = realloc(v, cap * sizeof(*v));
                assert_non_null(v);
            }
            v[n++] = a;
            idx = atoi(a.stream + 2);
            assert_true(idx >= 0 && idx < NSTREAMS);
            if (a.last > m->max_acked[idx])
                m->max_acked[idx] = a.last;
        }
        p = nl + 1;
    }
    *out = v;
    return n;
}

static bus_result
count_handler(bus_delivery *d, void *opaque)
{
    bus_event *e = bus_delivery_event(d);
    bus_store_txn *t = bus_projector_txn(d);
    char key[128];
    void *v;
    size_t vlen, klen;
    uint64_t n = 0;

    (void)opaque;
    klen = (size_t)snprintf(key, sizeof(key), "count/%s", bus_event_stream(e));
    if (bus_store_txn_get(t, BUS_STORE_APP, key, klen, &v, &vlen) == BUS_OK) {
        memcpy(&n, v, 8);
        bus_store_buf_free(v, vlen);
    }
    n++;
    assert_int_equal(bus_store_txn_put(t, BUS_STORE_APP, key, klen, &n, 8),
                     BUS_OK);
    return BUS_ACK;
}

static void
check_no_torn_batch(bus_store *s)
{
    bus_store_slice sl;
    uint64_t from = 0, run = 0, want = 0;
    char cur[64] = "";
    size_t i;

    memset(&sl, 0, sizeof(sl));
    do {
        assert_int_equal(
            bus_store_read_all(s, from, BUS_STORE_FORWARD, 2000, NULL, &sl),
            BUS_OK);
        for (i = 0; i < sl.count; i++) {
            const char *b = bus_event_header(sl.events[i], "batch");
            const char *n = bus_event_header(sl.events[i], "n");
            assert_non_null(b);
            assert_non_null(n);
            if (strcmp(b, cur) != 0) {
                if (run != want)
                    fprintf(stderr, "torn batch %s: %llu of %llu events\n", cur,
                            (unsigned long long)run, (unsigned long long)want);
                assert_int_equal(run, want);
                snprintf(cur, sizeof(cur), "%s", b);
                run = 0;
                want = strtoull(n, NULL, 10);
            }
            run++;
        }
        from = sl.next;
    } while (!sl.end);
    assert_int_equal(run, want);
    bus_store_slice_free(&sl);
}

static void
check_round(mode_state *m, const ack *acks, size_t n)
{
    bus_store *s = st_open_dir(m->dir, m->dur);
    bus_projector_config pc;
    bus_projector *p;
    bus_store_slice sl;
    char name[16], key[64];
    size_t i;
    int k;

    memset(&sl, 0, sizeof(sl));
    st_verify_ok(s);
    for (k = 0; k < NSTREAMS; k++) {
        snprintf(name, sizeof(name), "s-%d", k);
        if (st_last_version(s, name) < m->max_acked[k])
            fprintf(stderr, "%s: %s at %llu, acknowledged %llu\n", m->name,
                    name, (unsigned long long)st_last_version(s, name),
                    (unsigned long long)m->max_acked[k]);
        assert_true(st_last_version(s, name) >= m->max_acked[k]);
    }
    for (i = 0; i < n; i++) {
        size_t j;
        assert_int_equal(bus_store_read_stream(s, acks[i].stream, acks[i].first,
                                               BUS_STORE_FORWARD,
                                               acks[i].last - acks[i].first + 1,
                                               NULL, &sl),
                         BUS_OK);
        assert_int_equal(sl.count, acks[i].last - acks[i].first + 1);
        for (j = 0; j < sl.count; j++)
            assert_string_equal(bus_event_header(sl.events[j], "batch"),
                                acks[i].batch);
    }
    check_no_torn_batch(s);

    bus_projector_config_init(&pc);
    pc.name = "counter";
    pc.handler = count_handler;
    pc.batch_size = 64;
    assert_int_equal(bus_projector_open(&p, s, &pc), BUS_OK);
    assert_int_equal(bus_projector_wait(p, bus_store_head(s), 60000), BUS_OK);
    bus_projector_close(p);
    for (k = 0; k < NSTREAMS; k++) {
        void *v;
        size_t vlen, klen;
        uint64_t cnt = 0;

        snprintf(name, sizeof(name), "s-%d", k);
        klen = (size_t)snprintf(key, sizeof(key), "counter/count/%s", name);
        if (bus_store_get(s, BUS_STORE_APP, key, klen, &v, &vlen) == BUS_OK) {
            memcpy(&cnt, v, 8);
            bus_store_buf_free(v, vlen);
        }
        if (cnt != st_last_version(s, name))
            fprintf(stderr, "%s: projection counts %llu for %s of %llu\n",
                    m->name, (unsigned long long)cnt, name,
                    (unsigned long long)st_last_version(s, name));
        assert_int_equal(cnt, st_last_version(s, name));
    }
    bus_store_slice_free(&sl);
    bus_store_close(s);
}

static uint64_t t_child, t_check;

static uint64_t t_child, t_check;

static void
one_round(mode_state *m, uint64_t *rng)
{
    sbuf b = {NULL, 0, 0};
    uint64_t r = bt_rand(rng), start = bt_now_ns(), deadline;
    int fd, status;
    pid_t pid;
    ack *acks;
    size_t n;

    pid = spawn_child(m->dir, m->name, r, &fd);
    if (r % 4 == 0) {
        /* Early: often while RocksDB opens and replays its WAL. */
        deadline = start + (r >> 8) % 40 * 1000000u;
        pump(fd, &b, deadline, false);
        if (b.p == NULL || strstr(b.p, "R\n") == NULL)
            m->early_kills++;
    } else {
        assert_true(pump(fd, &b, start + 20000000000u, true));
        deadline = bt_now_ns() + (2 + (r >> 8) % 60) * 1000000u;
        pump(fd, &b, deadline, false);
    }
    kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    drain(fd, &b);
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
        fprintf(stderr, "child ended by itself: status %d\n", status);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    n = parse_acks(m, &b, &acks);
    m->acks += n;
    m->rounds++;
    t_child += bt_now_ns() - start;
    start = bt_now_ns();
    check_round(m, acks, n);
    t_check += bt_now_ns() - start;
    free(acks);
    free(b.p);
}

static void
test_kill_loses_nothing_acknowledged(void **state)
{
    mode_state modes[NMODES] = {
        {"always", BUS_STORE_ALWAYS, NULL, {0}, 0, 0, 0},
        {"group", BUS_STORE_GROUP, NULL, {0}, 0, 0, 0},
        {"none", BUS_STORE_NONE, NULL, {0}, 0, 0, 0},
        {"async", BUS_STORE_GROUP, NULL, {0}, 0, 0, 0},
    };
    const char *env = getenv("BUS_CRASH_ROUNDS");
    uint64_t rng = bt_seed(), t0 = bt_now_ns();
    int rounds = env != NULL ? atoi(env) : 50, i;

    (void)state;
    if (rounds <= 0)
        rounds = 50;
    for (i = 0; i < NMODES; i++) {
        modes[i].dir = bt_mkdtemp("bus-store-crash");
        assert_non_null(modes[i].dir);
    }
    for (i = 0; i < rounds; i++) {
        mode_state *m = &modes[i % NMODES];
        /* A fresh store every few rounds keeps each check's full scan
         * short; every round still kills, reopens and verifies. */
        if (m->rounds > 0 && m->rounds % ROUNDS_PER_STORE == 0) {
            bt_rmtree(m->dir);
            free(m->dir);
            m->dir = bt_mkdtemp("bus-store-crash");
            assert_non_null(m->dir);
            memset(m->max_acked, 0, sizeof(m->max_acked));
        }
        one_round(m, &rng);
    }
    for (i = 0; i < NMODES; i++) {
        fprintf(stderr,
                "# %-6s: %llu rounds (%llu killed before ready), %llu "
                "acknowledged appends, all present\n",
                modes[i].name, (unsigned long long)modes[i].rounds,
                (unsigned long long)modes[i].early_kills,
                (unsigned long long)modes[i].acks);
        bt_rmtree(modes[i].dir);
        free(modes[i].dir);
    }
    fprintf(stderr, "# %d rounds in %.1f s (child %.1f s, checks %.1f s)\n",
            rounds, (double)(bt_now_ns() - t0) / 1e9, (double)t_child / 1e9,
            (double)t_check / 1e9);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kill_loses_nothing_acknowledged),
    };

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
