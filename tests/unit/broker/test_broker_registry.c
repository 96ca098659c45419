/* The broker registry and the user API's routing through a backend's ops:
 * a fake backend with the made-up scheme "test" records every call. */
#include <stdio.h>
#include <string.h>

#include <bus/broker.h>

#include "broker_impl.h"
#include "test_support.h"
#include "testing.h"

/* ---- The fake backend ------------------------------------------------ */

typedef struct fake_calls {
    int init, publish, subscribe, unsubscribe, ack, flush, health;
    int close, stop, fini;
} fake_calls;

static fake_calls calls;

typedef struct fake_priv {
    uint64_t magic; /* zeroed by the core: proves priv_size bytes exist */
    int64_t depth;
    bool verbose;
    char authority[64];
    int32_t open_timeout_ms;
    char last_topic[64];
    bus_event *held; /* what publish took */
    unsigned last_flags;
    void *handle_token;
} fake_priv;

static int
fake_init(void *priv, const bus_broker_config *cfg, bus_uri *uri, char *errbuf,
          size_t errbuf_len)
{
    fake_priv *p = priv;
    const char *fail;
    int rv;

    calls.init++;
    assert_int_equal(p->magic, 0);
    p->magic = 0xfeed;
    p->open_timeout_ms = cfg->open_timeout_ms;
    snprintf(p->authority, sizeof(p->authority), "%s", uri->authority);
    if ((fail = bus_uri_get(uri, "fail")) != NULL) {
        snprintf(errbuf, errbuf_len, "test: told to fail");
        return BUS_EUNAVAIL;
    }
    if ((rv = bus_uri_get_i64(uri, "depth", 1, 100, &p->depth)) == BUS_EINVAL) {
        snprintf(errbuf, errbuf_len, "test: bad depth");
        return rv;
    }
    (void)bus_uri_get_bool(uri, "verbose", &p->verbose);
    return BUS_OK;
}

static int
fake_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
             bus_ack_fn ack, void *ack_opaque)
{
    fake_priv *p = priv;

    calls.publish++;
    assert_true(bus_event_frozen(ev)); /* the core froze it */
    if (strcmp(topic, "refuse.this") == 0)
        return BUS_EAGAIN;
    snprintf(p->last_topic, sizeof(p->last_topic), "%s", topic);
    p->last_flags = flags;
    bus_event_unref(p->held);
    p->held = ev;
    if (ack != NULL)
        ack(ack_opaque, ev, BUS_OK);
    return BUS_OK;
}

static int
fake_subscribe(void *priv, const char *pattern, const char *group,
               bus_deliver_fn fn, void *opaque, void **handle)
{
    fake_priv *p = priv;

    (void)pattern;
    (void)group;
    (void)fn;
    (void)opaque;
    calls.subscribe++;
    *handle = &p->handle_token;
    return BUS_OK;
}

static void
fake_unsubscribe(void *priv, void *handle)
{
    fake_priv *p = priv;

    assert_ptr_equal(handle, &p->handle_token);
    calls.unsubscribe++;
}

static void
fake_ack(void *priv, void *handle, uint64_t token, bus_result res)
{
    (void)priv;
    (void)handle;
    assert_int_equal(token, 77);
    assert_int_equal(res, BUS_RETRY);
    calls.ack++;
}

static int
fake_flush(void *priv, int32_t timeout_ms)
{
    (void)priv;
    calls.flush++;
    return timeout_ms == 0 ? BUS_ETIMEDOUT : BUS_OK;
}

static int
fake_health(void *priv, char *msg, size_t msg_len)
{
    (void)priv;
    calls.health++;
    snprintf(msg, msg_len, "degraded on purpose");
    return BUS_EUNAVAIL;
}

static void
fake_close(void *priv)
{
    (void)priv;
    calls.close++;
}

static void
fake_stop(void *priv)
{
    (void)priv;
    calls.stop++;
}

static void
fake_fini(void *priv)
{
    fake_priv *p = priv;

    calls.fini++;
    bus_event_unref(p->held);
    p->held = NULL;
}

static const bus_broker_ops fake_ops = {
    .version = BUS_BROKER_OPS_VERSION,
    .scheme = "test",
    .priv_size = sizeof(fake_priv),
    .init = fake_init,
    .publish = fake_publish,
    .subscribe = fake_subscribe,
    .unsubscribe = fake_unsubscribe,
    .ack = fake_ack,
    .flush = fake_flush,
    .health = fake_health,
    .close = fake_close,
    .stop = fake_stop,
    .fini = fake_fini,
};

static int
setup_registered(void **state)
{
    int rv;

    (void)state;
    /* The registry is process state: the first test registers. */
    rv = bus_broker_register(&fake_ops);
    assert_true(rv == BUS_OK || rv == BUS_EEXIST);
    memset(&calls, 0, sizeof(calls));
    return 0;
}

/* ---- Tests ------------------------------------------------------------- */

static void
test_register_then_lookup(void **state)
{
    (void)state;
    assert_ptr_equal(bus_broker_lookup("test"), &fake_ops);
    assert_null(bus_broker_lookup("tes"));
    assert_null(bus_broker_lookup(NULL));
    /* Built-in backends register themselves. */
    assert_non_null(bus_broker_lookup("mem"));
    assert_string_equal(bus_broker_lookup("mem")->scheme, "mem");
}

static void
test_register_refuses_a_taken_scheme(void **state)
{
    bus_broker_ops again = fake_ops;

    (void)state;
    assert_int_equal(bus_broker_register(&fake_ops), BUS_EEXIST);
    assert_int_equal(bus_broker_register(&again), BUS_EEXIST);
    again.scheme = "mem";
    assert_int_equal(bus_broker_register(&again), BUS_EEXIST);
}

static void
test_register_refuses_incomplete_ops(void **state)
{
    /* Each mandatory op in turn, the version bounds, the scheme. */
    static bus_broker_ops bad[13];
    size_t i;

    (void)state;
    for (i = 0; i < 13; i++) {
        bad[i] = fake_ops;
        bad[i].scheme = "test-bad";
    }
    bad[0].init = NULL;
    bad[1].publish = NULL;
    bad[2].subscribe = NULL;
    bad[3].unsubscribe = NULL;
    bad[4].flush = NULL;
    bad[5].close = NULL;
    bad[6].stop = NULL;
    bad[7].fini = NULL;
    bad[8].version = 0;
    bad[9].version = BUS_BROKER_OPS_VERSION + 1;
    bad[10].scheme = NULL;
    bad[11].scheme = "Bad";
    bad[12].scheme = "";
    for (i = 0; i < 13; i++)
        if (bus_broker_register(&bad[i]) != BUS_EINVAL)
            fail_msg("bad ops #%zu accepted", i);
    assert_int_equal(bus_broker_register(NULL), BUS_EINVAL);
    assert_null(bus_broker_lookup("test-bad"));

    /* Optional ops may be missing. */
    bus_broker_ops *opt = &bad[0];
    *opt = fake_ops;
    opt->scheme = "test-opt";
    opt->ack = NULL;
    opt->health = NULL;
    assert_int_equal(bus_broker_register(opt), BUS_OK);
}

static int
fake_deliver(void *opaque, const char *topic, bus_event *ev, uint64_t token,
             unsigned flags)
{
    (void)opaque;
    (void)topic;
    (void)token;
    (void)flags;
    bus_event_unref(ev);
    return BUS_OK;
}

static void
ack_count(void *opaque, bus_event *ev, int err)
{
    assert_non_null(ev);
    assert_int_equal(err, BUS_OK);
    (*(int *)opaque)++;
}

static void
test_open_routes_through_the_ops(void **state)
{
    char err[256], msg[64];
    bus_broker *b;
    bus_event *e;
    fake_priv *p;
    int acks = 0;
    void *h;

    (void)state;
    assert_int_equal(bus_broker_open_uri(&b,
                                         "test://somewhere?depth=5&"
                                         "verbose=yes",
                                         err, sizeof(err)),
                     BUS_OK);
    assert_string_equal(bus_broker_scheme(b), "test");
    assert_int_equal(calls.init, 1);
    p = b->priv;
    assert_int_equal(p->magic, 0xfeed);
    assert_int_equal(p->depth, 5);
    assert_true(p->verbose);
    assert_string_equal(p->authority, "somewhere");
    assert_int_equal(p->open_timeout_ms, 10000);

    assert_int_equal(bus_event_new(&e, "t.created", "abc", 3), BUS_OK);
    assert_int_equal(
        bus_broker_publish(b, "orders.placed", e, 0x1u, ack_count, &acks),
        BUS_OK);
    assert_int_equal(calls.publish, 1);
    assert_int_equal(acks, 1);
    assert_string_equal(p->last_topic, "orders.placed");
    assert_int_equal(p->last_flags, 0x1u);
    assert_ptr_equal(p->held, e);

    /* A backend's refusal leaves the event with the caller, frozen. */
    assert_int_equal(bus_event_new(&e, "t.created", "abc", 3), BUS_OK);
    assert_int_equal(
        bus_broker_publish(b, "refuse.this", e, 0, ack_count, &acks),
        BUS_EAGAIN);
    assert_int_equal(acks, 1);
    assert_true(bus_event_frozen(e));
    assert_int_equal(bus_event_refcount(e), 1);

    assert_int_equal(bus_broker_flush(b, 100), BUS_OK);
    assert_int_equal(bus_broker_flush(b, 0), BUS_ETIMEDOUT);
    assert_int_equal(calls.flush, 2);
    assert_int_equal(bus_broker_health(b, msg, sizeof(msg)), BUS_EUNAVAIL);
    assert_string_equal(msg, "degraded on purpose");

    /* The context's side. */
    assert_int_equal(
        bus__broker_subscribe(b, "orders.*", NULL, fake_deliver, NULL, &h),
        BUS_OK);
    assert_ptr_equal(h, &p->handle_token);
    assert_int_equal(
        bus__broker_subscribe(b, "orders..x", NULL, fake_deliver, NULL, &h),
        BUS_EINVAL);
    assert_null(h);
    assert_int_equal(calls.subscribe, 1);
    bus__broker_ack(b, &p->handle_token, 77, BUS_RETRY);
    bus__broker_ack(b, &p->handle_token, 0, BUS_RETRY); /* no token */
    assert_int_equal(calls.ack, 1);
    bus__broker_unsubscribe(b, &p->handle_token);
    bus__broker_unsubscribe(b, NULL);
    assert_int_equal(calls.unsubscribe, 1);

    /* Two-phase close: close_async once, then stop and fini once. */
    bus_broker_close_async(b);
    bus_broker_close_async(b);
    assert_int_equal(calls.close, 1);
    assert_int_equal(bus_broker_publish(b, "orders.placed", e, 0, NULL, NULL),
                     BUS_ECLOSED);
    assert_int_equal(
        bus__broker_subscribe(b, "orders.*", NULL, fake_deliver, NULL, &h),
        BUS_ECLOSED);
    assert_int_equal(bus_broker_health(b, msg, sizeof(msg)), BUS_ECLOSED);
    assert_int_equal(calls.publish, 2);
    bus_broker_close(b);
    assert_int_equal(calls.close, 1);
    assert_int_equal(calls.stop, 1);
    assert_int_equal(calls.fini, 1);
    bus_event_unref(e);
    bus_broker_close(NULL);
    bus_broker_close_async(NULL);
}

static void
test_publish_checks_arguments_before_the_backend(void **state)
{
    bus_broker *b;
    bus_event *e, *untyped;

    (void)state;
    assert_int_equal(bus_broker_open_uri(&b, "test://x", NULL, 0), BUS_OK);
    assert_int_equal(bus_event_new(&e, "t.created", NULL, 0), BUS_OK);
    assert_int_equal(bus_event_wrap(&untyped, NULL, 0, NULL, NULL), BUS_OK);
    assert_int_equal(bus_broker_publish(NULL, "a", e, 0, NULL, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_broker_publish(b, NULL, e, 0, NULL, NULL), BUS_EINVAL);
    assert_int_equal(bus_broker_publish(b, "a", NULL, 0, NULL, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_broker_publish(b, "a..b", e, 0, NULL, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_broker_publish(b, "a.*", e, 0, NULL, NULL),
                     BUS_EINVAL); /* a pattern is not a topic */
    assert_int_equal(bus_broker_publish(b, "", e, 0, NULL, NULL), BUS_EINVAL);
    assert_int_equal(bus_broker_publish(b, "a", untyped, 0, NULL, NULL),
                     BUS_EINVAL);
    assert_int_equal(calls.publish, 0);
    assert_false(bus_event_frozen(e)); /* refused before freezing */
    assert_int_equal(bus_broker_flush(NULL, 0), BUS_EINVAL);
    assert_int_equal(bus_broker_health(NULL, NULL, 0), BUS_EINVAL);
    assert_null(bus_broker_scheme(NULL));
    bus_event_unref(e);
    bus_event_unref(untyped);
    bus_broker_close(b);
}

static void
test_unknown_scheme_is_enotsup_naming_it(void **state)
{
    char err[256];
    bus_broker *b = (bus_broker *)&b;

    (void)state;
    assert_int_equal(bus_broker_open_uri(&b, "xyz://h", err, sizeof(err)),
                     BUS_ENOTSUP);
    assert_null(b);
    assert_non_null(strstr(err, "unknown broker scheme 'xyz'"));
    assert_non_null(strstr(err, "registered: "));
    assert_non_null(strstr(err, "mem"));
    assert_non_null(strstr(err, "test"));
    assert_int_equal(calls.init, 0);
}

static void
test_open_refuses_bad_input(void **state)
{
    bus_broker_config cfg;
    char err[256];
    bus_broker *b;

    (void)state;
    assert_int_equal(bus_broker_open(NULL, NULL, err, sizeof(err)), BUS_EINVAL);
    assert_int_equal(bus_broker_open(&b, NULL, err, sizeof(err)), BUS_EINVAL);
    assert_null(b);
    bus_broker_config_init(&cfg);
    assert_int_equal(cfg.size, sizeof(cfg));
    assert_int_equal(cfg.open_timeout_ms, 10000);
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)),
                     BUS_EINVAL); /* no uri */
    assert_non_null(strstr(err, "no broker URI"));
    cfg.uri = "not a uri";
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "no scheme"));
    assert_int_equal(calls.init, 0);
}

static void
test_unknown_option_is_einval_and_finis_once(void **state)
{
    char err[256];
    bus_broker *b;

    (void)state;
    assert_int_equal(bus_broker_open_uri(&b, "test://h?depth=3&colour=red", err,
                                         sizeof(err)),
                     BUS_EINVAL);
    assert_null(b);
    assert_string_equal(err, "unknown option 'colour' for scheme 'test'");
    /* init succeeded, so the backend was torn down as by close. */
    assert_int_equal(calls.init, 1);
    assert_int_equal(calls.close, 1);
    assert_int_equal(calls.stop, 1);
    assert_int_equal(calls.fini, 1);
}

static void
test_failed_init_is_followed_by_fini_only(void **state)
{
    char err[256];
    bus_broker *b;

    (void)state;
    assert_int_equal(bus_broker_open_uri(&b, "test://h?fail", err, sizeof(err)),
                     BUS_EUNAVAIL);
    assert_null(b);
    assert_string_equal(err, "test: told to fail");
    assert_int_equal(calls.init, 1);
    assert_int_equal(calls.fini, 1);
    assert_int_equal(calls.close + calls.stop, 0);
    /* A bad value the backend refuses: its error and errbuf. */
    assert_int_equal(
        bus_broker_open_uri(&b, "test://h?depth=1000", err, sizeof(err)),
        BUS_EINVAL);
    assert_string_equal(err, "test: bad depth");
    assert_int_equal(calls.fini, 2);
}

static void
test_props_merge_into_options(void **state)
{
    const char *props[] = {"depth", "9", "verbose", "1", NULL};
    const char *clash[] = {"depth", "9", NULL};
    const char *odd[] = {"depth", NULL};
    const char *unknown[] = {"colour", "red", NULL};
    const char *empty[] = {"", "x", NULL};
    bus_broker_config cfg;
    char err[256];
    bus_broker *b;
    fake_priv *p;

    (void)state;
    bus_broker_config_init(&cfg);
    cfg.uri = "test://h";
    cfg.props = props;
    cfg.open_timeout_ms = 250;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_OK);
    p = b->priv;
    assert_int_equal(p->depth, 9);
    assert_true(p->verbose);
    assert_int_equal(p->open_timeout_ms, 250);
    bus_broker_close(b);

    cfg.uri = "test://h?depth=2";
    cfg.props = clash;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "'depth' given both"));
    cfg.uri = "test://h";
    cfg.props = odd;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "'depth' has no value"));
    cfg.props = empty;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    cfg.props = unknown;
    assert_int_equal(bus_broker_open(&b, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_string_equal(err, "unknown option 'colour' for scheme 'test'");
    /* Only the last one reached the backend. */
    assert_int_equal(calls.init, 2);
    assert_int_equal(calls.fini, 2);
}

static void
test_zeroed_config_means_defaults(void **state)
{
    bus_broker_config cfg;
    bus_broker *b;
    fake_priv *p;

    (void)state;
    memset(&cfg, 0, sizeof(cfg)); /* no config_init: size 0 */
    cfg.uri = "test://h";
    assert_int_equal(bus_broker_open(&b, &cfg, NULL, 0), BUS_OK);
    p = b->priv;
    assert_int_equal(p->open_timeout_ms, 10000);
    bus_broker_close(b);
}

static void
test_open_survives_allocation_faults(void **state)
{
    const char *props[] = {"verbose", "no", NULL};
    bus_broker_config cfg;
    char err[256];
    bus_broker *b;
    uint64_t n;
    int rv;

    (void)state;
    bus_broker_config_init(&cfg);
    cfg.uri = "test://h?depth=4";
    cfg.props = props;
    for (n = 1;; n++) {
        memset(&calls, 0, sizeof(calls));
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_broker_open(&b, &cfg, err, sizeof(err));
        bool fired = bus_fault_alloc_fired();
        bus_fault_alloc_fail_nth(0, false);
        if (!fired) {
            assert_int_equal(rv, BUS_OK);
            break;
        }
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(b);
        assert_int_equal(calls.init, calls.fini);
    }
    assert_true(n > 3);
    bus_broker_close(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_register_then_lookup, setup_registered),
        cmocka_unit_test_setup(test_register_refuses_a_taken_scheme,
                               setup_registered),
        cmocka_unit_test_setup(test_register_refuses_incomplete_ops,
                               setup_registered),
        cmocka_unit_test_setup(test_open_routes_through_the_ops,
                               setup_registered),
        cmocka_unit_test_setup(test_publish_checks_arguments_before_the_backend,
                               setup_registered),
        cmocka_unit_test_setup(test_unknown_scheme_is_enotsup_naming_it,
                               setup_registered),
        cmocka_unit_test_setup(test_open_refuses_bad_input, setup_registered),
        cmocka_unit_test_setup(test_unknown_option_is_einval_and_finis_once,
                               setup_registered),
        cmocka_unit_test_setup(test_failed_init_is_followed_by_fini_only,
                               setup_registered),
        cmocka_unit_test_setup(test_props_merge_into_options, setup_registered),
        cmocka_unit_test_setup(test_zeroed_config_means_defaults,
                               setup_registered),
        cmocka_unit_test_setup(test_open_survives_allocation_faults,
                               setup_registered),
    };

    return cmocka_run_group_tests_name("broker_registry", tests, NULL, NULL);
}
