/*
 * Brokers: the user API (open, publish, flush, close) and the backend SPI
 * (struct bus_broker_ops) that memory, ZeroMQ and Kafka implement.
 *
 * A broker is opened from a URI whose scheme names the backend:
 *   mem://name                       in-process, shared by name
 *   zmq+tcp://host:port?mode=...     ZeroMQ (brokers/zmq)
 *   zmq+ipc:///path, zmq+inproc://n
 *   kafka://host:port[,host:port]    Kafka (brokers/kafka)
 * Query options (?key=value&...) and cfg->props go to the backend, which
 * must consume every key it understands: an unknown key fails the open
 * with BUS_EINVAL naming it. Backends built into the library register
 * themselves; others register at run time with bus_broker_register.
 *
 * Guarantees are each backend's contract, written in its header and in
 * docs/brokers/: memory delivers exactly what the process keeps while it
 * runs; zmq fanout at most once; zmq reliable and kafka at least once.
 */
#ifndef BUS_BROKER_H
#define BUS_BROKER_H

#include <bus/bus.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- URIs ------------------------------------------------------------ */

#define BUS_URI_MAX_PARAMS 32

typedef struct bus_uri_param {
    char *key;
    char *value;   /* "" when the query had "key" alone */
    bool consumed; /* set by bus_uri_get/take */
} bus_uri_param;

/* scheme://authority/path?query, percent-decoded. The authority of
 * kafka:// may be a comma-separated host list; mem:// has a name. */
typedef struct bus_uri {
    char *scheme;    /* "zmq+tcp" */
    char *authority; /* "127.0.0.1:5555", "name", "" */
    char *path;      /* "/tmp/x.sock" or "" */
    bus_uri_param params[BUS_URI_MAX_PARAMS];
    size_t n_params;
} bus_uri;

/* Parses s. Returns BUS_OK, BUS_EINVAL (errbuf says why: no scheme, bad
 * percent escape, duplicate or too many keys), BUS_ENOMEM. */
BUS_API int bus_uri_parse(bus_uri *u, const char *s, char *errbuf,
                          size_t errbuf_len);
BUS_API void bus_uri_free(bus_uri *u);
/* The value of key (marking it consumed), or NULL when absent. */
BUS_API const char *bus_uri_get(bus_uri *u, const char *key);
/* Typed getters: BUS_OK (found and valid, *out set), BUS_ENOTFOUND
 * (absent: *out untouched), BUS_EINVAL (present but not a number in
 * [min, max] / not a boolean: 1/0/true/false/yes/no). */
BUS_API int bus_uri_get_i64(bus_uri *u, const char *key, int64_t min,
                            int64_t max, int64_t *out);
BUS_API int bus_uri_get_bool(bus_uri *u, const char *key, bool *out);
/* The first key no backend consumed, or NULL. */
BUS_API const char *bus_uri_unconsumed(const bus_uri *u);

/* ---- The user API ----------------------------------------------------- */

typedef struct bus_broker_config {
    size_t size;               /* set by bus_broker_config_init */
    const char *uri;           /* required */
    const char *const *props;  /* NULL-ended key, value, key, value, ...:
                                * backend options, as the URI query */
    int32_t open_timeout_ms;   /* 10000 */
    bus_logger log;            /* default: none */
} bus_broker_config;

BUS_API void bus_broker_config_init(bus_broker_config *cfg);

/* Opens the backend for cfg->uri's scheme. Borrows cfg. On failure *out
 * is NULL and errbuf (if any) says why. Returns BUS_OK, BUS_EINVAL,
 * BUS_ENOTSUP (unknown scheme, named in errbuf), BUS_ENOMEM,
 * BUS_EUNAVAIL. Blocks up to open_timeout_ms. Thread: any. */
BUS_API int bus_broker_open(bus_broker **out, const bus_broker_config *cfg,
                            char *errbuf, size_t errbuf_len);

/* Shorthand: open uri with defaults. */
BUS_API int bus_broker_open_uri(bus_broker **out, const char *uri,
                                char *errbuf, size_t errbuf_len);

/* Refuses new work and wakes waiters; does not block. Idempotent. */
BUS_API void bus_broker_close_async(bus_broker *b);

/* Closes, joins the backend's threads and frees b. Contexts must have
 * detached it first (bus_ctx_detach / bus_ctx_close). NULL is a no-op.
 * Thread: not from one of b's callbacks. */
BUS_API void bus_broker_close(bus_broker *b);

/* Publishes directly through the broker (bus_publish does this for
 * routed topics). Same ownership as bus_publish: takes ev on success;
 * on failure the event stays with the caller. ack (may be NULL) runs
 * once with the outcome if this returns BUS_OK. */
BUS_API int bus_broker_publish(bus_broker *b, const char *topic,
                               bus_event *ev, unsigned flags, bus_ack_fn ack,
                               void *ack_opaque);

/* Waits until every publish so far is acknowledged or timeout_ms passes
 * (BUS_ETIMEDOUT). Thread: any but a broker callback. */
BUS_API int bus_broker_flush(bus_broker *b, int32_t timeout_ms);

/* BUS_OK when healthy; otherwise a code (BUS_EUNAVAIL, ...) and a reason
 * in msg. Thread: any. */
BUS_API int bus_broker_health(bus_broker *b, char *msg, size_t msg_len);

BUS_API const char *bus_broker_scheme(const bus_broker *b);

/* ---- The backend SPI ---------------------------------------------------- */

/* Delivers one event to a subscription. On BUS_OK the callee took the
 * reference on ev; on failure (BUS_EAGAIN: the subscription's queue is
 * full and its backpressure policy gave up; BUS_ECLOSED: it is going
 * away) the reference stays with the backend, which decides: memory
 * counts a drop, reliable backends redeliver later. token identifies the
 * delivery for ack (e.g. a Kafka offset); 0 when the backend needs no
 * ack. Called from a backend thread (or the publishing thread for
 * memory), never under a libbus lock. May block up to the subscription's
 * backpressure deadline unless flags has BUS_PUB_NONBLOCK. */
typedef int (*bus_deliver_fn)(void *opaque, const char *topic,
                              bus_event *ev, uint64_t token, unsigned flags);

#define BUS_BROKER_OPS_VERSION 1

typedef struct bus_broker_ops {
    uint32_t version;   /* BUS_BROKER_OPS_VERSION it was built against */
    const char *scheme; /* URL scheme: "mem", "zmq+tcp", "kafka" */
    size_t priv_size;   /* backend state; the core allocates and zeroes it */

    /* Validate and acquire resources; may block up to
     * cfg->open_timeout_ms. Must consume (bus_uri_get*) every option it
     * understands from uri; the core rejects what is left. props from cfg
     * are merged into uri->params by the core. On failure priv must still
     * be safe to pass to fini (zeroed fields mean "not acquired"). */
    int (*init)(void *priv, const bus_broker_config *cfg, bus_uri *uri,
                char *errbuf, size_t errbuf_len);

    /* Takes ev on success only. ev is frozen. Never blocks unless the
     * backend's backpressure policy says so (then up to its deadline);
     * BUS_PUB_NONBLOCK forbids blocking: a full queue is BUS_EAGAIN.
     * ack (may be NULL) runs exactly once if this returns BUS_OK, from any
     * thread. Called from any thread. */
    int (*publish)(void *priv, const char *topic, bus_event *ev,
                   unsigned flags, bus_ack_fn ack, void *ack_opaque);

    /* Starts delivering events whose topic matches pattern to fn(opaque,
     * ...). group: consumer group (NULL: none, each subscription gets
     * everything). *handle identifies it for unsubscribe and ack. */
    int (*subscribe)(void *priv, const char *pattern, const char *group,
                     bus_deliver_fn fn, void *opaque, void **handle);

    /* After it returns fn is never called again for handle, and handle
     * is freed. Blocks until a running fn for it has returned, unless
     * called from that very fn. */
    void (*unsubscribe)(void *priv, void *handle);

    /* Optional (NULL: no-op). The handler outcome of a delivery with a
     * non-zero token: BUS_ACK (or a dead-lettered REJECT) lets the backend
     * commit; BUS_RETRY asks for redelivery. Called from any thread. */
    void (*ack)(void *priv, void *handle, uint64_t token, bus_result res);

    /* Waits for the acks of prior publishes, up to timeout_ms. */
    int (*flush)(void *priv, int32_t timeout_ms);

    /* Optional: BUS_OK when healthy, else a code and a reason in msg. */
    int (*health)(void *priv, char *msg, size_t msg_len);

    void (*close)(void *priv); /* non-blocking: refuse work, wake waiters */
    void (*stop)(void *priv);  /* blocking: join threads, drain callbacks */
    void (*fini)(void *priv);  /* free resources; once, after stop (or a
                                * failed init) */
} bus_broker_ops;

/* Registers a backend, process-wide. ops is borrowed (static storage).
 * Returns BUS_OK, BUS_EEXIST (scheme taken), BUS_EINVAL (a mandatory op
 * missing, version 0 or newer than this library, scheme not
 * [a-z][a-z0-9+.-]*), BUS_ENOMEM (64 backends already). Thread: any. */
BUS_API int bus_broker_register(const bus_broker_ops *ops);

/* The backend registered for scheme, or NULL. */
BUS_API const bus_broker_ops *bus_broker_lookup(const char *scheme);

#ifdef __cplusplus
}
#endif
#endif /* BUS_BROKER_H */
