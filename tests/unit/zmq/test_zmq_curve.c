/* CURVE: the bound broker is the server, with an allow-list checked by
 * its ZAP handler (ZMQ_ZAP_ENFORCE_DOMAIN set). An allowed client works
 * in both modes; a client with an unknown key delivers and receives 0
 * messages; a client without CURVE cannot connect; keys load from Z85
 * options (props or a percent-encoded URI) and from files; bad key
 * options fail the open without echoing the key; secret keys never
 * appear in a log line, at any level. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <zmq.h>

#include "zmq_test_util.h"

typedef struct keypair {
    char pub[41], sec[41];
    char sec_enc[128]; /* sec percent-encoded, as a URI carries it */
} keypair;

static void percent_encode(const char *in, char *out, size_t len);

static keypair g_server, g_allowed, g_unknown;
static char *g_dir;

/* ---- A log capture that looks for secrets ------------------------------ */

typedef struct logcap {
    _Atomic uint64_t lines;
    _Atomic uint64_t leaks;
    _Atomic uint64_t denied; /* "refused" lines */
} logcap;

static logcap g_log;

static void
cap_log(void *opaque, bus_log_level level, const char *subsys, const char *msg)
{
    logcap *c = opaque;

    (void)level;
    (void)subsys;
    atomic_fetch_add(&c->lines, 1);
    /* A secret may leak as given or as the URI carried it. */
    if (strstr(msg, g_server.sec) != NULL ||
        strstr(msg, g_allowed.sec) != NULL ||
        strstr(msg, g_unknown.sec) != NULL ||
        strstr(msg, g_server.sec_enc) != NULL ||
        strstr(msg, g_allowed.sec_enc) != NULL ||
        strstr(msg, g_unknown.sec_enc) != NULL)
        atomic_fetch_add(&c->leaks, 1);
    if (strstr(msg, "refused") != NULL)
        atomic_fetch_add(&c->denied, 1);
    if (getenv("BUS_TEST_LOG") != NULL)
        bus_log_stderr(NULL, level, subsys, msg);
}

/* Opens uri with props (key, value, ..., NULL), logging at DEBUG into
 * g_log. Returns the open's result; *out the broker. */
static int
copen(bus_broker **out, const char *uri, const char *const *props, char *err,
      size_t errlen)
{
    bus_broker_config cfg;

    bus_broker_config_init(&cfg);
    cfg.uri = uri;
    cfg.props = props;
    cfg.log.fn = cap_log;
    cfg.log.opaque = &g_log;
    cfg.log.level = BUS_LOG_DEBUG;
    return bus_broker_open(out, &cfg, err, errlen);
}

static bus_broker *
copen_ok(const char *uri, const char *const *props)
{
    char err[256];
    bus_broker *b = NULL;
    int rv = copen(&b, uri, props, err, sizeof(err));

    if (rv != BUS_OK)
        fail_msg("open %s: %s (%s)", uri, bus_err_name(rv), err);
    return b;
}

static bus_broker *
server(const char *mode)
{
    char uri[128];
    const char *props[] = {"curve_secret_key", g_server.sec, "curve_allow",
                           g_allowed.pub, NULL};

    snprintf(uri, sizeof(uri), "zmq+tcp://127.0.0.1:0?mode=%s", mode);
    return copen_ok(uri, props);
}

/* A client of hub with the given secret key (NULL: no CURVE at all). */
static bus_broker *
client(bus_broker *hub, const char *mode, const keypair *k)
{
    char uri[300];
    const char *props[] = {"curve_server_key", g_server.pub, "curve_secret_key",
                           k != NULL ? k->sec : "", NULL};

    snprintf(uri, sizeof(uri), "zmq+%s?bind=0&mode=%s&subscribe_timeout=300",
             bus_broker_zmq_endpoint(hub), mode);
    return copen_ok(uri, k != NULL ? props : NULL);
}

static int
group_setup(void **state)
{
    (void)state;
    if (bus_broker_zmq_keypair(g_server.pub, g_server.sec) != BUS_OK ||
        bus_broker_zmq_keypair(g_allowed.pub, g_allowed.sec) != BUS_OK ||
        bus_broker_zmq_keypair(g_unknown.pub, g_unknown.sec) != BUS_OK)
        return -1;
    percent_encode(g_server.sec, g_server.sec_enc, sizeof(g_server.sec_enc));
    percent_encode(g_allowed.sec, g_allowed.sec_enc,
                   sizeof(g_allowed.sec_enc));
    percent_encode(g_unknown.sec, g_unknown.sec_enc,
                   sizeof(g_unknown.sec_enc));
    g_dir = bt_mkdtemp("bus-zmq-curve");
    return g_dir == NULL ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    bt_rmtree(g_dir);
    free(g_dir);
    /* Whatever ran, no line ever carried a secret key. */
    if (atomic_load(&g_log.leaks) != 0) {
        fprintf(stderr, "secret keys leaked into %llu log line(s)\n",
                (unsigned long long)atomic_load(&g_log.leaks));
        return -1;
    }
    return 0;
}

/* ---- Fanout ----------------------------------------------------------------
 */

static void
test_fanout_allowed_client_receives_unknown_and_plain_get_nothing(void **state)
{
    bus_broker *hub = server("fanout");
    bus_broker *ok = client(hub, "fanout", &g_allowed);
    bus_broker *bad = client(hub, "fanout", &g_unknown);
    bus_broker *plain = client(hub, "fanout", NULL);
    zt_rec r_ok, r_bad, r_plain;
    uint64_t i;

    (void)state;
    zt_rec_init(&r_ok, ok);
    zt_rec_init(&r_bad, bad);
    zt_rec_init(&r_plain, plain);
    zt_sub(ok, "sec.>", &r_ok);
    zt_sub(bad, "sec.>", &r_bad);
    zt_sub(plain, "sec.>", &r_plain);
    for (i = 0; i < 100; i++)
        assert_int_equal(zt_publish(hub, "sec.x", i, 0), BUS_OK);
    assert_true(zt_wait(&r_ok.n, 100, ZT_WAIT_MS));
    assert_int_equal(bus_broker_flush(hub, ZT_WAIT_MS), BUS_OK);
    /* The allowed client got everything, so the others had the time. */
    assert_int_equal(atomic_load(&r_bad.n), 0);
    assert_int_equal(atomic_load(&r_plain.n), 0);
    assert_true(zt_stats(hub).auth_denied >= 1);
    assert_int_equal(zt_stats(hub).subscribers, 1); /* ok's prefix */
    /* Their publishes go nowhere either. */
    {
        zt_rec at_hub;
        zt_rec_init(&at_hub, hub);
        zt_sub(hub, "up.>", &at_hub);
        for (i = 0; i < 20; i++) {
            assert_int_equal(zt_publish(bad, "up.x", i, 0), BUS_OK);
            assert_int_equal(zt_publish(plain, "up.x", i, 0), BUS_OK);
        }
        assert_int_equal(zt_publish(ok, "up.x", 99, 0), BUS_OK);
        assert_true(zt_wait(&at_hub.n, 1, ZT_WAIT_MS));
        assert_int_equal(bus_broker_flush(bad, ZT_WAIT_MS), BUS_OK);
        assert_int_equal(bus_broker_flush(plain, ZT_WAIT_MS), BUS_OK);
        assert_int_equal(atomic_load(&at_hub.n), 1);
        assert_int_equal(at_hub.last, 99);
        zt_unsub(&at_hub);
        zt_rec_fini(&at_hub);
    }
    assert_int_not_equal(bus_broker_health(bad, NULL, 0), BUS_OK);
    assert_int_equal(bus_broker_health(ok, NULL, 0), BUS_OK);
    bus_broker_close(plain);
    bus_broker_close(bad);
    bus_broker_close(ok);
    bus_broker_close(hub);
    zt_rec_fini(&r_ok);
    zt_rec_fini(&r_bad);
    zt_rec_fini(&r_plain);
}

static void
test_a_raw_plain_subscriber_cannot_connect(void **state)
{
    bus_broker *hub = server("fanout");
    void *ctx = zmq_ctx_new(), *sub = zmq_socket(ctx, ZMQ_SUB);
    int linger = 0, timeout = 300, n = 0;
    char buf[64];

    (void)state;
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sub, ZMQ_RCVTIMEO, &timeout, sizeof(timeout));
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    assert_int_equal(zmq_connect(sub, bus_broker_zmq_endpoint(hub)), 0);
    for (n = 0; n < 20; n++)
        assert_int_equal(zt_publish(hub, "raw.x", (uint64_t)n, 0), BUS_OK);
    assert_true(zmq_recv(sub, buf, sizeof(buf), 0) < 0); /* nothing */
    assert_int_equal(zt_stats(hub).subscribers, 0);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    bus_broker_close(hub);
}

/* ---- Reliable ---------------------------------------------------------------
 */

static void
test_reliable_unknown_client_delivers_nothing(void **state)
{
    bus_broker *hub = server("reliable");
    bus_broker *ok = client(hub, "reliable", &g_allowed);
    bus_broker *bad = client(hub, "reliable", &g_unknown);
    zt_rec r;
    zt_acks a_bad = {0}, a_ok = {0};
    uint64_t i;

    (void)state;
    zt_rec_init(&r, hub);
    zt_sub(hub, "rsec.>", &r);
    for (i = 0; i < 10; i++) {
        bus_event *e = zt_event(1000 + i);
        assert_int_equal(
            bus_broker_publish(bad, "rsec.x", e, 0, zt_ack_fn, &a_bad), BUS_OK);
        e = zt_event(i);
        assert_int_equal(
            bus_broker_publish(ok, "rsec.x", e, 0, zt_ack_fn, &a_ok), BUS_OK);
    }
    assert_int_equal(bus_broker_flush(ok, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&a_ok.ok), 10);
    /* The unknown client never got through: 0 delivered, 0 acked. */
    assert_int_equal(bus_broker_flush(bad, 300), BUS_ETIMEDOUT);
    assert_int_equal(atomic_load(&a_bad.ok), 0);
    assert_int_equal(atomic_load(&r.n), 10);
    for (i = 0; i < 10; i++)
        assert_int_equal(r.seen[1000 + i], 0);
    assert_true(zt_stats(hub).auth_denied >= 1);
    bus_broker_close(bad); /* its 10 events fail with BUS_ECLOSED */
    assert_int_equal(atomic_load(&a_bad.failed), 10);
    bus_broker_close(ok);
    bus_broker_close(hub);
    zt_rec_fini(&r);
}

/* ---- Keys: files, URIs, bad options ----------------------------------------
 */

static void
write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* A Z85 key always has characters a URI must escape ('&', '%', '+'...),
 * so its encoded form differs from it: the log capture looks for both. */
static void
percent_encode(const char *in, char *out, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;

    for (; *in != '\0' && n + 4 < len; in++) {
        unsigned char c = (unsigned char)*in;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
            (c >= '0' && c <= '9') || c == '.' || c == '-') {
            out[n++] = (char)c;
        } else {
            out[n++] = '%';
            out[n++] = hex[c >> 4];
            out[n++] = hex[c & 15];
        }
    }
    out[n] = '\0';
}

static void
test_keys_load_from_files_and_from_an_encoded_uri(void **state)
{
    char sfile[300], afile[300], uri[2048], text[256], enc_sec[200],
        enc_pub[200];
    bus_broker *hub, *ok;
    zt_rec r;

    (void)state;
    snprintf(sfile, sizeof(sfile), "%s/server.key", g_dir);
    snprintf(afile, sizeof(afile), "%s/allowed.txt", g_dir);
    snprintf(text, sizeof(text), "%s\n", g_server.sec);
    write_file(sfile, text);
    snprintf(text, sizeof(text),
             "# clients\n  %s  # the allowed one\n\n%s\n#%s\n", g_allowed.pub,
             g_server.pub, "a comment, not a key");
    write_file(afile, text);
    snprintf(uri, sizeof(uri),
             "zmq+ipc://%s/curve.sock?curve_secret_key_file=%s"
             "&curve_allow_file=%s&mode=reliable",
             g_dir, sfile, afile);
    hub = copen_ok(uri, NULL);
    percent_encode(g_allowed.sec, enc_sec, sizeof(enc_sec));
    percent_encode(g_server.pub, enc_pub, sizeof(enc_pub));
    snprintf(uri, sizeof(uri),
             "zmq+%s?bind=0&mode=reliable&curve_secret_key=%s"
             "&curve_server_key=%s",
             bus_broker_zmq_endpoint(hub), enc_sec, enc_pub);
    ok = copen_ok(uri, NULL);
    zt_rec_init(&r, hub);
    zt_sub(hub, "kf.>", &r);
    assert_int_equal(zt_publish(ok, "kf.x", 1, 0), BUS_OK);
    assert_int_equal(bus_broker_flush(ok, ZT_WAIT_MS), BUS_OK);
    assert_int_equal(atomic_load(&r.n), 1);
    bus_broker_close(ok);
    bus_broker_close(hub);
    zt_rec_fini(&r);
}

static void
test_bad_key_options_fail_without_echoing_the_key(void **state)
{
    char bad_sec[41], err[256], wrong_pub[41];
    const char *const p1[] = {"curve_secret_key", bad_sec, "curve_allow_any",
                              "1", NULL};
    const char *const p2[] = {"curve_secret_key", g_server.sec, NULL};
    const char *const p3[] = {"curve_secret_key",
                              g_server.sec,
                              "curve_public_key",
                              wrong_pub,
                              "curve_allow_any",
                              "1",
                              NULL};
    const char *const p4[] = {"curve_secret_key",
                              g_server.sec,
                              "curve_server_key",
                              g_server.pub,
                              "curve_allow_any",
                              "1",
                              NULL};
    const char *const p5[] = {"curve_secret_key", g_server.sec, "curve_allow",
                              "not-a-key", NULL};
    const char *const *cases[] = {p1, p2, p3, p4, p5};
    bus_broker *b;
    size_t i;

    (void)state;
    memcpy(bad_sec, g_server.sec, sizeof(bad_sec));
    bad_sec[5] = '"'; /* not in the Z85 alphabet */
    memcpy(wrong_pub, g_allowed.pub, sizeof(wrong_pub));
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        err[0] = '\0';
        b = NULL;
        assert_int_equal(
            copen(&b, "zmq+tcp://127.0.0.1:0", cases[i], err, sizeof(err)),
            BUS_EINVAL);
        assert_null(b);
        assert_true(err[0] != '\0');
        assert_null(strstr(err, g_server.sec));
        assert_null(strstr(err, bad_sec));
    }
}

static void
test_secret_keys_given_in_a_uri_stay_out_of_the_logs(void **state)
{
    char enc[200], uri[600];
    bus_broker *b;
    uint64_t before = atomic_load(&g_log.lines);

    (void)state;
    percent_encode(g_server.sec, enc, sizeof(enc));
    snprintf(uri, sizeof(uri),
             "zmq+tcp://127.0.0.1:0?curve_secret_key=%s&curve_allow_any=1",
             enc);
    b = copen_ok(uri, NULL); /* the core logs the URI it opened */
    bus_broker_close(b);
    /* A failed open logs it too. */
    snprintf(uri, sizeof(uri),
             "zmq+tcp://127.0.0.1:0?curve_secret_key=%s&typo=1", enc);
    assert_int_equal(copen(&b, uri, NULL, NULL, 0), BUS_EINVAL);
    /* The key is judged decoded: an escaped letter hides nothing. */
    snprintf(uri, sizeof(uri),
             "zmq+tcp://127.0.0.1:0?curve_s%%65cret_key=%s&curve_allow_any=1",
             enc);
    b = copen_ok(uri, NULL);
    bus_broker_close(b);
    /* Nor does case: refused as unknown, and logged by the failed open. */
    snprintf(uri, sizeof(uri), "zmq+tcp://127.0.0.1:0?CURVE_SECRET_KEY=%s",
             enc);
    assert_int_equal(copen(&b, uri, NULL, NULL, 0), BUS_EINVAL);
    assert_true(atomic_load(&g_log.lines) > before);
    assert_int_equal(atomic_load(&g_log.leaks), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(
            test_fanout_allowed_client_receives_unknown_and_plain_get_nothing),
        cmocka_unit_test(test_a_raw_plain_subscriber_cannot_connect),
        cmocka_unit_test(test_reliable_unknown_client_delivers_nothing),
        cmocka_unit_test(test_keys_load_from_files_and_from_an_encoded_uri),
        cmocka_unit_test(test_bad_key_options_fail_without_echoing_the_key),
        cmocka_unit_test(test_secret_keys_given_in_a_uri_stay_out_of_the_logs),
    };

    return cmocka_run_group_tests_name("zmq curve", tests, group_setup,
                                       group_teardown);
}
