/*
 * The process test_store_crash kills: it opens the store, runs a counting
 * projector, and appends batches with exact expected versions from two
 * threads (each owns half of the streams), reporting every acknowledged
 * append on stdout, until SIGKILL.
 *
 *   store_crash_child <dir> <none|group|always|async> <seed> <streams>
 *
 * "async" is group durability with the second thread appending through
 * bus_store_append_async (one stream a request, expected versions queued
 * one after another); its lines are written by the callbacks.
 *
 * Each acknowledged part is one line "A <stream> <first> <last> <batch>",
 * and all lines of one request are written by one write(2) (atomic on a
 * pipe below PIPE_BUF), after the append returned. Every event carries the
 * headers "batch" (a unique id) and "n" (events in the whole request), so
 * the parent can find torn batches. Exit codes: 2 usage/open, 3 an append
 * failed (never expected), 4 projector.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bus/store.h>

#include "platform.h"

#define THREADS 2
#define MAX_STREAMS 64

static bus_store *store;
static int nstreams;
static uint64_t seed;
static int async_mode;

/* What an asynchronous append expects; freed by its callback. */
typedef struct async_req {
    const char *stream;
    uint64_t first, last;
    char batch[64];
} async_req;

static void
async_done(void *opaque, const bus_store_append_result *res)
{
    async_req *a = opaque;
    char line[256];
    int len;

    if (res->err != BUS_OK || res->first_version != a->first ||
        res->last_version != a->last) {
        fprintf(stderr, "child: async append: %s (%llu..%llu)\n",
                bus_err_name(res->err),
                (unsigned long long)res->first_version,
                (unsigned long long)res->last_version);
        _exit(3); /* the writer thread: no atexit while others run */
    }
    len = snprintf(line, sizeof(line), "A %s %llu %llu %s\n", a->stream,
                   (unsigned long long)a->first, (unsigned long long)a->last,
                   a->batch);
    if (write(1, line, (size_t)len) != (ssize_t)len)
        _exit(3);
    free(a);
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
    if (bus_store_txn_put(t, BUS_STORE_APP, key, klen, &n, 8) != BUS_OK)
        return BUS_RETRY;
    return BUS_ACK;
}

static uint64_t
rnd(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static bus_event *
mk_event(const char *batch, size_t n)
{
    bus_header h[2];
    bus_event_init init;
    bus_event *e;
    char nbuf[16];

    snprintf(nbuf, sizeof(nbuf), "%zu", n);
    h[0].key = "batch";
    h[0].value = batch;
    h[1].key = "n";
    h[1].value = nbuf;
    memset(&init, 0, sizeof(init));
    init.type = "crash.test";
    init.payload = batch;
    init.payload_len = strlen(batch);
    init.headers = h;
    init.n_headers = 2;
    if (bus_event_create(&e, &init) != BUS_OK)
        exit(3);
    return e;
}

static void
appender(void *arg)
{
    int t = (int)(intptr_t)arg;
    uint64_t rs = seed * 31 + (uint64_t)t + 1, seq = 0;
    uint64_t ver[MAX_STREAMS];
    char names[MAX_STREAMS][16];
    int mine[MAX_STREAMS], nmine = 0, i;

    for (i = 0; i < nstreams; i++) {
        bus_store_stream_info info;
        snprintf(names[i], sizeof(names[i]), "s-%d", i);
        if (i % THREADS != t)
            continue;
        mine[nmine++] = i;
        if (bus_store_stream_info_get(store, names[i], &info) != BUS_OK)
            exit(3);
        ver[i] = info.last_version;
    }
    for (;;) {
        bus_store_append_req req[2];
        bus_store_append_result res[2];
        bus_event *ev[2][8];
        size_t k[2], total = 0, p, j, i0;
        int np = (rnd(&rs) % 4 == 0 && nmine > 1) ? 2 : 1, si[2], rv;
        char batch[64], line[512];
        size_t len = 0;

        snprintf(batch, sizeof(batch), "%d.%d.%llu.%llu", (int)getpid(), t,
                 (unsigned long long)seed, (unsigned long long)seq++);
        if (async_mode && t == 1) {
            async_req *a = calloc(1, sizeof(*a));
            i0 = rnd(&rs) % (uint64_t)nmine;
            k[0] = 1 + rnd(&rs) % 5;
            if (a == NULL)
                exit(3);
            for (j = 0; j < k[0]; j++)
                ev[0][j] = mk_event(batch, k[0]);
            a->stream = names[mine[i0]];
            a->first = ver[mine[i0]] + 1;
            a->last = ver[mine[i0]] + k[0];
            memcpy(a->batch, batch, sizeof(batch));
            rv = bus_store_append_async(store, a->stream, ver[mine[i0]],
                                        ev[0], k[0], 0, async_done, a);
            for (j = 0; j < k[0]; j++)
                bus_event_unref(ev[0][j]);
            if (rv != BUS_OK) {
                fprintf(stderr, "child: append_async: %s\n",
                        bus_err_name(rv));
                exit(3);
            }
            ver[mine[i0]] = a->last; /* queued in order: the next follows */
            continue;
        }
        i0 = rnd(&rs) % (uint64_t)nmine;
        si[0] = mine[i0];
        si[1] =
            mine[(i0 + 1 + rnd(&rs) % (uint64_t)(nmine - 1)) % (uint64_t)nmine];
        for (p = 0; p < (size_t)np; p++) {
            k[p] = 1 + rnd(&rs) % 5;
            total += k[p];
        }
        for (p = 0; p < (size_t)np; p++) {
            for (j = 0; j < k[p]; j++)
                ev[p][j] = mk_event(batch, total);
            req[p].stream = names[si[p]];
            req[p].expected_version = ver[si[p]];
            req[p].events = ev[p];
            req[p].n_events = k[p];
        }
        rv = bus_store_append_multi(store, req, (size_t)np, res);
        for (p = 0; p < (size_t)np; p++)
            for (j = 0; j < k[p]; j++)
                bus_event_unref(ev[p][j]);
        if (rv != BUS_OK) {
            fprintf(stderr, "child: append: %s\n", bus_err_name(rv));
            exit(3);
        }
        for (p = 0; p < (size_t)np; p++) {
            ver[si[p]] = res[p].last_version;
            len += (size_t)snprintf(
                line + len, sizeof(line) - len, "A %s %llu %llu %s\n",
                names[si[p]], (unsigned long long)res[p].first_version,
                (unsigned long long)res[p].last_version, batch);
        }
        if (write(1, line, len) != (ssize_t)len)
            exit(3);
    }
}

int
main(int argc, char **argv)
{
    bus_store_config cfg;
    bus_projector_config pc;
    bus_projector *proj;
    bus__thread th[THREADS];
    char err[256];
    int i;

    if (argc != 5)
        return 2;
    bus_store_config_init(&cfg);
    cfg.path = argv[1];
    cfg.create_if_missing = true;
    async_mode = strcmp(argv[2], "async") == 0;
    cfg.durability = strcmp(argv[2], "none") == 0     ? BUS_STORE_NONE
                     : strcmp(argv[2], "always") == 0 ? BUS_STORE_ALWAYS
                                                      : BUS_STORE_GROUP;
    cfg.write_buffer_bytes = (size_t)2 << 20;
    cfg.block_cache_bytes = (size_t)4 << 20;
    seed = strtoull(argv[3], NULL, 10);
    nstreams = atoi(argv[4]);
    if (nstreams < THREADS * 2 || nstreams > MAX_STREAMS)
        return 2;
    if (bus_store_open(&store, &cfg, err, sizeof(err)) != BUS_OK) {
        fprintf(stderr, "child: open: %s\n", err);
        return 2;
    }
    bus_projector_config_init(&pc);
    pc.name = "counter";
    pc.handler = count_handler;
    pc.batch_size = 8;
    if (bus_projector_open(&proj, store, &pc) != BUS_OK)
        return 4;
    if (write(1, "R\n", 2) != 2)
        return 2;
    for (i = 0; i < THREADS; i++)
        if (bus__thread_start(&th[i], "appender", appender,
                              (void *)(intptr_t)i) != BUS_OK)
            return 2;
    for (i = 0; i < THREADS; i++)
        bus__thread_join(&th[i]); /* never: appenders run until killed */
    return 0;
}
