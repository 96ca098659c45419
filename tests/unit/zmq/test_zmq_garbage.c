/* Bad input from raw libzmq sockets: wrong frame counts, garbage
 * MessagePack, truncated envelopes, envelopes over the decoder's limits,
 * bad topics and tags, frames over max_msg_size. Each is counted, logged
 * at most once a second, and dropped (or dead-lettered when dead_letter
 * is set); the connection, or a new one after libzmq drops an oversized
 * sender, and the other peers keep working. Also the limits against
 * hostile peers: a connection that never completes its handshake is
 * closed after handshake_ivl. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <zmq.h>

#include "zmq_test_util.h"

/* ---- Raw sockets -----------------------------------------------------------
 */

static void *g_zctx;
static int g_raw_open; /* raw sockets a failed test left open */

static int
group_setup(void **state)
{
    (void)state;
    g_zctx = zmq_ctx_new();
    return g_zctx == NULL ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    /* zmq_ctx_term waits for every socket: after a failed test that
     * could not close its own, leave the context to the exit. */
    if (g_raw_open == 0)
        zmq_ctx_term(g_zctx);
    return 0;
}

static void
raw_close(void *s)
{
    zmq_close(s);
    g_raw_open--;
}

static void *
raw_socket(int type)
{
    void *s = zmq_socket(g_zctx, type);
    int linger = 0, timeout = 5000;

    assert_non_null(s);
    g_raw_open++;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof(timeout));
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout, sizeof(timeout));
    return s;
}

/* Sends n frames (data, len pairs). */
static void
raw_send(void *s, int n, ...)
{
    va_list ap;
    int i;

    va_start(ap, n);
    for (i = 0; i < n; i++) {
        const void *d = va_arg(ap, const void *);
        size_t len = va_arg(ap, size_t);
        assert_true(zmq_send(s, d, len, i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
    }
    va_end(ap);
}

/* A valid envelope for number n (malloc'd; *len its size). */
static void *
envelope(uint64_t n, size_t *len)
{
    bus_event *e = zt_event(n);
    void *buf;

    assert_int_equal(bus_codec_encode_alloc(e, &buf, len), BUS_OK);
    bus_event_unref(e);
    return buf;
}

/* An envelope whose type (5000 bytes) is over the decoder's 4096. */
static void *
envelope_big_type(size_t *len)
{
    char type[5001];
    bus_event_init in;
    bus_event *e;
    void *buf;

    memset(type, 't', 5000);
    type[5000] = '\0';
    memset(&in, 0, sizeof(in));
    in.type = type;
    assert_int_equal(bus_event_create(&e, &in), BUS_OK);
    assert_int_equal(bus_codec_encode_alloc(e, &buf, len), BUS_OK);
    bus_event_unref(e);
    return buf;
}

/* ---- A log capture counting warnings --------------------------------------
 */

typedef struct logcap {
    _Atomic uint64_t malformed;
} logcap;

static void
cap_log(void *opaque, bus_log_level level, const char *subsys, const char *msg)
{
    logcap *c = opaque;

    (void)subsys;
    if (level == BUS_LOG_WARN && strstr(msg, "malformed") != NULL)
        atomic_fetch_add(&c->malformed, 1);
    if (getenv("BUS_TEST_LOG") != NULL)
        bus_log_stderr(NULL, level, subsys, msg);
}

static bus_broker *
open_logged(const char *uri, logcap *c)
{
    bus_broker_config cfg;
    bus_broker *b = NULL;
    char err[256];
    int rv;

    bus_broker_config_init(&cfg);
    cfg.uri = uri;
    cfg.log.fn = cap_log;
    cfg.log.opaque = c;
    cfg.log.level = BUS_LOG_INFO;
    rv = bus_broker_open(&b, &cfg, err, sizeof(err));
    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

static uint64_t
st_bad(const bus_broker_zmq_stats *s)
{
    return s->bad_frames;
}

/* Waits until the raw XPUB has seen the subscription to prefix. */
static void
xpub_wait_sub(void *xpub, const char *prefix)
{
    char buf[256];
    int n;

    for (;;) {
        n = zmq_recv(xpub, buf, sizeof(buf) - 1, 0);
        assert_true(n > 0);
        buf[n] = '\0';
        if (getenv("BUS_TEST_LOG") != NULL)
            fprintf(stderr, "xpub got %d:'%s'\n", buf[0], buf + 1);
        if (buf[0] == 1 && strcmp(buf + 1, prefix) == 0)
            return;
    }
}

/* ---- Fanout: a raw publisher sends garbage to our subscriber --------------
 */

static void
test_fanout_receiver_counts_and_dead_letters_garbage(void **state)
{
    void *pub = raw_socket(ZMQ_XPUB);
    char ep[256], uri[400];
    size_t eplen = sizeof(ep), n1, n2, nbig, i;
    unsigned char *e1, *e2, *big, huge[10000];
    bus_broker *peer;
    zt_rec good, dl;
    logcap cap = {0};
    bus_broker_zmq_stats st;

    (void)state;
    assert_int_equal(zmq_bind(pub, "tcp://127.0.0.1:*"), 0);
    zmq_getsockopt(pub, ZMQ_LAST_ENDPOINT, ep, &eplen);
    snprintf(uri, sizeof(uri),
             "zmq+%s?bind=0&subscribe_timeout=0&max_msg_size=8192"
             "&reconnect_ivl=20&reconnect_ivl_max=50&dead_letter=dl.bad",
             ep);
    peer = open_logged(uri, &cap);
    zt_rec_init(&good, peer);
    zt_rec_init(&dl, peer);
    zt_sub(peer, "g.>", &good);
    zt_sub(peer, "dl.>", &dl);
    dl.keep_last = true;
    xpub_wait_sub(pub, "g.");

    e1 = envelope(1, &n1);
    e2 = envelope(2, &n2);
    big = envelope_big_type(&nbig);
    raw_send(pub, 1, "g.x", (size_t)3); /* 1 frame */
    raw_send(pub, 3, "g.x", (size_t)3, "a", (size_t)1, "b",
             (size_t)1); /* 3 frames */
    raw_send(pub, 2, "g.x", (size_t)3, "\xff\xfe\xfd", (size_t)3);
    raw_send(pub, 2, "g.x", (size_t)3, e1, n1 / 2);             /* truncated */
    raw_send(pub, 2, "g.x", (size_t)3, big, nbig);              /* limits */
    raw_send(pub, 2, "g..x", (size_t)4, e1, n1);                /* topic */
    raw_send(pub, 2, "g.x", (size_t)3, "\xc1later", (size_t)6); /* ctrl */
    raw_send(pub, 2, "g.x", (size_t)3, e1, n1);                 /* good */
    assert_true(zt_wait(&good.n, 1, ZT_WAIT_MS));
    assert_true(zt_swait(peer, st_bad, 6, ZT_WAIT_MS));
    assert_true(zt_wait(&dl.n, 6, ZT_WAIT_MS));
    st = zt_stats(peer);
    assert_int_equal(st.bad_frames, 6); /* the control frame is not bad */
    assert_int_equal(atomic_load(&good.n), 1);
    {
        /* The last dead letter: the bad topic's frame, with the why. */
        bus_event *d = dl.keep;
        assert_string_equal(bus_event_type(d), "bus.bad_frame");
        assert_string_equal(bus_event_header(d, "bus-error"), "BUS_EPROTO");
        assert_non_null(bus_event_header(d, "bus-reason"));
        assert_int_equal(bus_event_payload_len(d), n1);
        assert_string_equal(dl.topic, "dl.bad");
    }
    /* Done with dead letters: the unsubscribe (a round trip to the I/O
     * thread) also orders the reads above before its later writes. */
    zt_unsub(&dl);

    /* Many more: counted, but logged at most once a second. */
    for (i = 0; i < 200; i++)
        raw_send(pub, 2, "g.x", (size_t)3, "\xff", (size_t)1);
    assert_true(zt_swait(peer, st_bad, 206, ZT_WAIT_MS));
    assert_true(atomic_load(&cap.malformed) <= 3);

    /* Over max_msg_size: libzmq drops the connection; it reconnects,
     * subscribes again, and works. */
    memset(huge, 'x', sizeof(huge));
    raw_send(pub, 2, "g.x", (size_t)3, huge, sizeof(huge));
    xpub_wait_sub(pub, "g.");
    raw_send(pub, 2, "g.x", (size_t)3, e2, n2);
    assert_true(zt_wait(&good.n, 2, ZT_WAIT_MS));
    assert_int_equal(good.last, 2);
    assert_true(zt_stats(peer).reconnects >= 1);

    bus_broker_close(peer);
    raw_close(pub);
    free(e1);
    free(e2);
    free(big);
    zt_rec_fini(&good);
    zt_rec_fini(&dl);
}

/* ---- Fanout hub: a raw XSUB sends garbage upstream ------------------------
 */

static void
test_fanout_hub_counts_garbage_from_a_raw_peer(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0");
    void *xsub = raw_socket(ZMQ_XSUB);
    zt_rec r;
    size_t n1;
    unsigned char *e1 = envelope(1, &n1);

    (void)state;
    zt_rec_init(&r, hub);
    zt_sub(hub, "h.>", &r);
    assert_int_equal(zmq_connect(xsub, bus_broker_zmq_endpoint(hub)), 0);
    raw_send(xsub, 1, "\x01h.", (size_t)3);      /* a real subscription */
    raw_send(xsub, 1, "junk", (size_t)4);        /* not a subscription */
    raw_send(xsub, 2, "h.x", (size_t)3, e1, n1); /* no seq frame */
    raw_send(xsub, 3, "h.x", (size_t)3, "\xff\xff", (size_t)2, "S123",
             (size_t)4); /* bad seq, bad env */
    raw_send(xsub, 3, "h.x", (size_t)3, "\xa0", (size_t)1, "S0123456789abcdef",
             (size_t)17); /* bad envelope */
    assert_true(zt_swait(hub, st_bad, 4, ZT_WAIT_MS));
    /* The hub still works, for its own subscribers and the raw one. */
    assert_int_equal(zt_publish(hub, "h.x", 7, 0), BUS_OK);
    assert_true(zt_wait(&r.n, 1, ZT_WAIT_MS));
    {
        char buf[64];
        assert_true(zmq_recv(xsub, buf, sizeof(buf), 0) > 0);
    }
    assert_int_equal(zt_stats(hub).bad_frames, 4);
    raw_close(xsub);
    bus_broker_close(hub);
    free(e1);
    zt_rec_fini(&r);
}

/* ---- Reliable: a raw DEALER sends garbage to a hub ------------------------
 */

static void
tag8(unsigned char t[8], uint64_t v)
{
    int i;

    for (i = 7; i >= 0; i--, v >>= 8)
        t[i] = (unsigned char)v;
}

/* Appends a batch record [tag][topic len 2][topic][env len 4][env] at
 * b + *off (docs/brokers/zmq.md, reliable wire protocol). */
static void
batch_rec(unsigned char *b, size_t *off, uint64_t tag, const char *topic,
          const void *env, size_t len)
{
    size_t tl = strlen(topic), o = *off;

    tag8(b + o, tag);
    b[o + 8] = (unsigned char)(tl >> 8);
    b[o + 9] = (unsigned char)tl;
    memcpy(b + o + 10, topic, tl);
    o += 10 + tl;
    b[o] = (unsigned char)(len >> 24);
    b[o + 1] = (unsigned char)(len >> 16);
    b[o + 2] = (unsigned char)(len >> 8);
    b[o + 3] = (unsigned char)len;
    memcpy(b + o + 4, env, len);
    *off = o + 4 + len;
}

/* Receives acks on the raw dealer until tag arrives. */
static void
dealer_wait_ack(void *d, uint64_t tag)
{
    unsigned char buf[1024], want[8];
    int n, k;

    tag8(want, tag);
    for (;;) {
        n = zmq_recv(d, buf, sizeof(buf), 0);
        assert_true(n >= 9);
        assert_int_equal(buf[0], 0x01);
        for (k = 1; k + 8 <= n; k += 8)
            if (memcmp(buf + k, want, 8) == 0)
                return;
    }
}

static void
test_reliable_hub_counts_garbage_and_keeps_serving(void **state)
{
    bus_broker *hub =
        zt_open("zmq+tcp://127.0.0.1:0?mode=reliable&max_msg_size=4096");
    bus_broker *peer = zt_open_peer(hub, "mode=reliable");
    void *d = raw_socket(ZMQ_DEALER);
    unsigned char t1[8], t2[8], t3[8], t4[8], huge[10000];
    size_t n5, n6, n7;
    unsigned char *e5 = envelope(5, &n5), *e6 = envelope(6, &n6),
                  *e7 = envelope(7, &n7);
    zt_rec r;
    zt_acks a = {0};
    uint64_t i;

    (void)state;
    zt_rec_init(&r, hub);
    zt_sub(hub, "g.>", &r);
    assert_int_equal(zmq_connect(d, bus_broker_zmq_endpoint(hub)), 0);
    tag8(t1, 1);
    tag8(t2, 2);
    tag8(t3, 3);
    tag8(t4, 4);
    raw_send(d, 1, "\x09garbage", (size_t)8);       /* control? */
    raw_send(d, 2, "x", (size_t)1, "y", (size_t)1); /* 2 frames */
    raw_send(d, 3, t1, (size_t)8, "g.x", (size_t)3, "\xff\xff",
             (size_t)2);                                     /* bad env */
    raw_send(d, 3, t2, (size_t)7, "g.x", (size_t)3, e5, n5); /* tag */
    raw_send(d, 4, t2, (size_t)8, "g.x", (size_t)3, e5, n5, "z",
             (size_t)1);                                     /* 4 frames */
    raw_send(d, 1, "\x02g..bad", (size_t)7);                 /* pattern */
    raw_send(d, 3, t3, (size_t)8, "g.x", (size_t)3, e5, n5); /* good */
    dealer_wait_ack(d, 3);
    assert_true(zt_wait(&r.n, 1, ZT_WAIT_MS));
    assert_int_equal(zt_stats(hub).bad_frames, 6);
    /* An undecodable event is acked (it can never be handled). */
    (void)t1;

    /* Over max_msg_size: libzmq drops this connection; the DEALER
     * reconnects by itself and the next event goes through. */
    memset(huge, 'x', sizeof(huge));
    raw_send(d, 3, t4, (size_t)8, "g.x", (size_t)3, huge, sizeof(huge));
    for (i = 10; !zt_wait(&r.n, 2, 100); i++) {
        unsigned char t[8];
        tag8(t, i);
        raw_send(d, 3, t, (size_t)8, "g.x", (size_t)3, e6, n6);
        assert_true(i < 100);
    }
    /* Meanwhile an honest peer was never disturbed. */
    for (i = 0; i < 20; i++) {
        bus_event *e = zt_event(100 + i);
        assert_int_equal(bus_broker_publish(peer, "g.y", e, 0, zt_ack_fn, &a),
                         BUS_OK);
    }
    assert_int_equal(bus_broker_flush(peer, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a.ok), 20);

    /* Batches: an empty one; one whose second record is cut short (its
     * first stands: handled and acked); one with a bad topic and an
     * undecodable envelope (both counted; the envelope's acked). */
    {
        unsigned char b[1024];
        size_t off = 1, bad0 = zt_stats(hub).bad_frames;
        uint64_t n0 = atomic_load(&r.n);

        b[0] = 0x07;
        raw_send(d, 1, b, (size_t)1);
        batch_rec(b, &off, 200, "g.b", e7, n7);
        batch_rec(b, &off, 201, "g.b", e7, n7);
        raw_send(d, 1, b, off - 5); /* the second record truncated */
        dealer_wait_ack(d, 200);
        assert_true(zt_wait(&r.n, n0 + 1, ZT_WAIT_MS));
        off = 1;
        batch_rec(b, &off, 202, "g..b", e7, n7);
        batch_rec(b, &off, 203, "g.b", "\xff\xff", 2);
        raw_send(d, 1, b, off);
        dealer_wait_ack(d, 203);
        assert_int_equal(zt_stats(hub).bad_frames, bad0 + 4);
        assert_int_equal(atomic_load(&r.n), n0 + 1);
    }
    raw_close(d);
    bus_broker_close(peer);
    bus_broker_close(hub);
    free(e5);
    free(e6);
    free(e7);
    zt_rec_fini(&r);
}

/* ---- Hostile peers: a handshake that never comes ------------------------- */

static void
test_a_silent_connection_is_closed_after_handshake_ivl(void **state)
{
    bus_broker *hub = zt_open("zmq+tcp://127.0.0.1:0?handshake_ivl=200");
    const char *ep = bus_broker_zmq_endpoint(hub);
    struct sockaddr_in sa;
    uint64_t t0, waited;
    char buf[256];
    int fd;

    (void)state;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(strrchr(ep, ':') + 1));
    sa.sin_addr.s_addr = htonl(0x7f000001);
    fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    t0 = bt_now_ns();
    /* We say nothing; libzmq greets us, then hangs up on us. */
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        ssize_t n;
        assert_true(bt_now_ns() - t0 < 5000000000ull);
        if (poll(&p, 1, 100) <= 0)
            continue;
        n = read(fd, buf, sizeof(buf));
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            break;
    }
    waited = (bt_now_ns() - t0) / 1000000u;
    print_message("silent connection closed after %llu ms\n",
                  (unsigned long long)waited);
    assert_true(waited >= 150);
    close(fd);
    bus_broker_close(hub);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fanout_receiver_counts_and_dead_letters_garbage),
        cmocka_unit_test(test_fanout_hub_counts_garbage_from_a_raw_peer),
        cmocka_unit_test(test_reliable_hub_counts_garbage_and_keeps_serving),
        cmocka_unit_test(
            test_a_silent_connection_is_closed_after_handshake_ivl),
    };

    return cmocka_run_group_tests_name("zmq bad input", tests, group_setup,
                                       group_teardown);
}
