/*
 * The ZeroMQ broker's internals, shared by its files (contract:
 * <bus/broker_zmq.h>; long form: docs/brokers/zmq.md).
 *
 *   zmq_broker.c    ops, options, publish, the I/O thread, subscriptions
 *   zmq_fanout.c    XPUB/XSUB: the hub's sending, forwarding, subscription
 *                   tracking and sync; receiving
 *   zmq_reliable.c  DEALER/ROUTER: in-flight window, acks, dedup, resends,
 *                   the hub's peers
 *   zmq_curve.c     CURVE keys and the ZAP handler
 *
 * Topology: the bound broker is a hub. Every event published on the hub
 * or by a connected peer goes to every matching subscription of the hub
 * and of its peers. fanout: peers publish upstream through their XSUB,
 * the hub forwards through its XPUB. reliable: peers send through their
 * DEALER and register their patterns with the hub, which delivers to
 * them as it does to its own subscriptions and acks the sender when all
 * have acked.
 *
 * Threads: everything named zb_io_*, zb_fan_*, zb_rel_* (but zb_rel_ack)
 * and zb_zap_* runs on the broker's I/O thread, which alone touches the
 * sockets and the fields marked @io. Fields marked @mtx are under z->mtx;
 * atomics say their order where they use one.
 */
#ifndef BUS_ZMQ_IMPL_H
#define BUS_ZMQ_IMPL_H

#include <stdatomic.h>

#include <zmq.h>

#include <bus/broker_zmq.h>

#include "alloc.h"
#include "broker_impl.h"
#include "platform.h"

/* Declared among the draft options of zmq.h 4.3, but implemented by the
 * library whether or not it was built with the draft API. */
#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93
#endif

/* ThreadSanitizer cannot see libzmq's own synchronisation (Debian's
 * libzmq is not instrumented). Over inproc, a message's buffer goes from
 * one socket to another without a copy, so we tell TSan that sending a
 * buffer happens-before receiving it. */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define ZB_TSAN_RELEASE(m) __tsan_release(zmq_msg_data(m))
#define ZB_TSAN_ACQUIRE(m) __tsan_acquire(zmq_msg_data(m))
#else
#define ZB_TSAN_RELEASE(m) ((void)0)
#define ZB_TSAN_ACQUIRE(m) ((void)0)
#endif

#define ZB_SUBSYS "zmq"
#define ZB_PAD BUS_CACHELINE
#define ZB_TOPIC_INLINE 56 /* topics up to this long need no allocation */
#define ZB_ENDPOINT_MAX 512
#define ZB_Z85_LEN 40
#define ZB_TAG_LEN 8
#define ZB_ACK_KIND 0x01
#define ZB_ACK_BATCH 512  /* tags per ack message */
#define ZB_RECV_BATCH 256 /* messages read from one socket per round */

/* Reliable control messages: one frame, this first byte. */
#define ZB_C_ACK 0x01   /* + 8-byte tags (both ways) */
#define ZB_C_SUB 0x02   /* + pattern (peer to hub) */
#define ZB_C_UNSUB 0x03 /* + pattern (peer to hub) */
#define ZB_C_PING 0x04  /* (peer to hub) */
#define ZB_C_SUBOK 0x05 /* + pattern (hub to peer) */
#define ZB_C_WHO 0x06   /* (hub to peer): unknown peer, subscribe again */
/* Events in one frame, from a sender to a receiver: + records of
 * [tag 8][topic length 2][topic][envelope length 4][envelope]. */
#define ZB_C_BATCH 0x07
#define ZB_BATCH_HDR (ZB_TAG_LEN + 2 + 4) /* a batch record's fixed part */

/* Fanout: an envelope frame starting with this byte (never the first
 * byte of a MessagePack map) is a control message; "bus-sync" after it
 * confirms a subscription: [prefix][0xC1 "bus-sync"]. */
#define ZB_CTRL_BYTE 0xC1
#define ZB_SYNC "\301bus-sync" /* octal 301: 0xC1 */
#define ZB_SYNC_LEN 9
/* Fanout upstream (peer to hub): third frame 'S' + publisher id (8) +
 * sequence (8), so the hub counts what the XSUB pipe lost. */
#define ZB_SEQ_LEN 17
#define ZB_UPSTREAM_PUBS 256

typedef struct zb zb;
typedef struct zb_sub zb_sub;
typedef struct zb_peer zb_peer;
typedef struct zb_rec zb_rec;
typedef struct zb_dlv zb_dlv;

typedef enum zb_mode { ZB_FANOUT = 0, ZB_RELIABLE } zb_mode;
typedef enum zb_transport { ZB_TCP = 0, ZB_IPC, ZB_INPROC } zb_transport;

typedef struct zb_key {
    char z85[ZB_Z85_LEN + 1];
} zb_key;

/* Parsed options (bus/broker_zmq.h lists them with their defaults). */
typedef struct zb_opts {
    zb_mode mode;
    bool bind;
    int32_t hwm;
    int32_t sndbuf, rcvbuf; /* kernel buffers, bytes; 0: the OS's */
    uint32_t queue;
    uint32_t window;
    bool bp_fail;
    int32_t block_timeout_ms;
    int32_t resend_ivl_ms;
    uint32_t dedup;
    int32_t wait_subscriber_ms;
    int32_t hwm_wait_ms;
    int32_t subscribe_timeout_ms;
    int32_t peer_timeout_ms;
    int32_t reconnect_ivl, reconnect_ivl_max;
    int32_t heartbeat_ivl, heartbeat_timeout, heartbeat_ttl;
    int32_t handshake_ivl;
    int64_t max_msg_size;
    int32_t linger;
    int32_t spin_us;   /* I/O thread spin before sleeping */
    int32_t batch;     /* reliable: max bytes of a batch frame; 0: none */
    char *routing_id;  /* NULL: libzmq picks one */
    char *dead_letter; /* NULL: bad frames are only counted */
    /* CURVE: on when a secret key (server) or a server key (client) is
     * given. Secret material is wiped at fini. */
    bool curve;
    bool has_secret, has_public, has_server_key;
    zb_key secret, public_, server_key;
    uint8_t (*allow)[32]; /* decoded allowed client keys */
    size_t n_allow;
    bool allow_any;
    char *zap_domain;
} zb_opts;

/* A publish on its way to the I/O thread (and, reliable, in flight). */
typedef struct zb_pub {
    zmq_msg_t env; /* the encoded envelope */
    bus_event *ev; /* a reference for the ack; NULL without ack */
    bus_ack_fn ack;
    void *ack_opaque;
    char *topic_heap; /* when topic_len >= ZB_TOPIC_INLINE */
    uint32_t topic_len;
    char topic_buf[ZB_TOPIC_INLINE];
} zb_pub;

static inline const char *
zb_pub_topic(const zb_pub *p)
{
    return p->topic_heap != NULL ? p->topic_heap : p->topic_buf;
}

/* Slot of the bounded MPSC publish queue (Vyukov): seq says whose turn
 * it is; producers fill the slot in place. */
typedef struct zb_slot {
    _Atomic uint64_t seq;
    zb_pub p;
} zb_slot;

/* Reliable sender: one event in flight. Tag = index << 32 | gen. */
typedef struct zb_flight {
    zb_pub p;
    uint32_t gen;
    bool used;
    uint8_t list; /* ZB_FL_NONE, _UNSENT, _SENT */
    uint32_t sends;
    uint64_t sent_ns;
    struct zb_flight *prev, *next;
} zb_flight;

enum { ZB_FL_NONE = 0, ZB_FL_UNSENT, ZB_FL_SENT };

typedef struct zb_flist {
    zb_flight *head, *tail;
    size_t n;
} zb_flist;

/* A subscription. Owned by the I/O thread once added. A hub also has one
 * per (peer, pattern) of its reliable peers: peer set, fn NULL. */
struct zb_sub {
    zb *z;
    char *pattern;
    char *prefix; /* literal prefix subscribed on the XSUB */
    bus_deliver_fn fn;
    void *opaque;
    zb_peer *peer;  /* remote: the peer it belongs to */
    zb_sub *pnext;  /* the peer's list */
    bool dead;      /* set by unsubscribe; fn is never called again */
    bool added;     /* in z->subs (its prefix subscribed) */
    bool sync_wait; /* added: the publisher has yet to confirm it */
    size_t idx;     /* its place in z->subs */
    zb_sub *dnext;  /* z->dead_subs */
    /* Reliable receiver: deliveries refused (BUS_EAGAIN) wait here in
     * order, retried from bl_due with a backoff. */
    zb_dlv *bl_head, *bl_tail;
    uint64_t bl_due;
    uint32_t bl_backoff_ms;
    zb_dlv *dlvs; /* all its deliveries not yet finished */
};

/* A command for the I/O thread from another thread. */
typedef struct zb_cmd {
    int kind; /* ZB_CMD_SUB, ZB_CMD_UNSUB */
    zb_sub *sub;
    int rv;
    bool done;            /* @mtx */
    uint64_t deadline_ns; /* waiting for a sync, @io */
    struct zb_cmd *next;
} zb_cmd;

enum { ZB_CMD_SUB = 1, ZB_CMD_UNSUB };

/* A counted prefix (XSUB side: our subscriptions; XPUB side: theirs). */
typedef struct zb_prefix {
    char *p;
    size_t len;
    uint64_t count;
} zb_prefix;

/* A multiset of prefixes: open addressing (v[i].p NULL: empty), and how
 * many entries have each length, so that "does any prefix of this topic
 * belong?" costs one lookup per length present, whatever the count. */
typedef struct zb_prefixes {
    zb_prefix *v;
    size_t n, cap;
    uint32_t *lens; /* BUS_TOPIC_MAX_LEN + 1 counters, or NULL */
} zb_prefixes;

/* Rate limit for a class of log messages: one per second. */
typedef struct zb_ratelog {
    uint64_t last_ns;
    uint64_t suppressed;
} zb_ratelog;

/* A thread waiting for a publish credit, in z->waiters. */
#define ZB_CREDIT_WAITER ((uint64_t)1 << 32 | 1)

#define ZB_ID_INLINE 16  /* ROUTER identities libzmq makes are 5 bytes */
#define ZB_POOL_MAX 4096 /* records and deliveries kept for reuse */

/* Reliable receiver: where to send the ack of a record. */
typedef struct zb_reply {
    struct zb_reply *next;
    uint64_t tag;
    size_t idlen;
    uint8_t *id;   /* id_buf, or an allocation of idlen bytes */
    bool embedded; /* the record's own (reply0), not allocated */
    uint8_t id_buf[ZB_ID_INLINE];
} zb_reply;

/* Reliable receiver: an event being handled. Records and deliveries are
 * recycled through free lists (z->rec_pool, z->dlv_pool): the common
 * case allocates only the decoded event. */
struct zb_rec {
    bus_uuid id;
    bus_event *ev; /* one reference, for redeliveries */
    zmq_msg_t env; /* the frame, kept when a peer must get it */
    bool has_env;
    char *topic; /* topic_buf, or an allocation of topic_size */
    size_t topic_size;
    char topic_buf[ZB_TOPIC_INLINE];
    uint32_t remaining; /* deliveries not finished */
    zb_reply *replies;
    zb_reply reply0;
    zb_rec *prev, *next; /* z->recs, or the pool */
};

enum { ZB_D_NEW = 0, ZB_D_OUT, ZB_D_BACKLOG, ZB_D_RETRY, ZB_D_ORPHAN };

/* Reliable receiver: one delivery of a record to a subscription; its
 * address is the token. */
struct zb_dlv {
    zb_rec *rec; /* NULL once orphaned */
    zb_sub *sub;
    uint8_t state;
    bus_result result; /* written by zb_rel_ack before the push */
    uint32_t attempts;
    uint64_t due_ns;
    zb_dlv *next;          /* backlog or retry list */
    zb_dlv *sprev, *snext; /* sub->dlvs or z->orphans */
    zb_dlv *ack_next;      /* the ack stack */
    /* Remote (to a peer): its tag and its place in z->rout. */
    uint64_t rseq;
    uint64_t sent_ns;
    zb_dlv *rprev, *rnext;
};

/* Hub, reliable: a connected peer that subscribed. */
struct zb_peer {
    zb_peer *next;
    uint8_t id[256];
    size_t idlen;
    uint64_t last_ns; /* last message from it */
    zb_sub *subs;     /* its patterns */
    zb_dlv **slots;   /* outstanding deliveries by rseq & mask */
    uint32_t nslots, nout;
    uint64_t next_seq;
    bool gone; /* unreachable: expire it */
};

/* Hub, fanout: the next sequence expected from a publisher upstream. */
typedef struct zb_upub {
    uint64_t id, next, last_ns;
} zb_upub;

/* Open-addressing table of event ids: pending records and handled ids. */
/* One slot: key and value side by side, so a probe is one cache miss. */
typedef struct zb_idslot {
    bus_uuid key;
    void *val; /* zb_rec *, ZB_DONE, or NULL (empty) */
} zb_idslot;

typedef struct zb_idtab {
    zb_idslot *slots;
    size_t cap, n;
    uint64_t k0, k1; /* random hash keys */
    bus_uuid *fifo;  /* handled ids, oldest first (ring) */
    size_t fifo_cap, fifo_head, fifo_n;
} zb_idtab;

#define ZB_DONE ((void *)&zb_done_marker)
extern const char zb_done_marker;

typedef struct zb_stats {
    _Atomic uint64_t published, sent, delivered, dropped_hwm, dropped_late,
        dropped_queue, dropped_upstream, bad_frames, resent, duplicates_dropped,
        acked, unrouted, auth_denied, reconnects, subscribers, forwarded,
        hwm_waits;
} zb_stats;

struct zb {
    bus_logger log;
    zb_opts o;
    zb_transport transport;
    char name[ZB_ENDPOINT_MAX + 16]; /* "hub zmq+tcp://h:p": logs, no query */
    char endpoint[ZB_ENDPOINT_MAX];  /* the zmq endpoint, resolved */
    bool can_publish;
    bus_codec_limits limits;

    void *zctx;
    bool private_ctx;
    bool shared_ref; /* holds a reference on the shared context */
    void *send_sock; /* XPUB (fanout bind) or DEALER (reliable) */
    void *recv_sock; /* XSUB (fanout) or ROUTER (reliable bind) */
    void *mon;       /* PAIR reading the connecting socket's monitor */
    void *mon_of;    /* the socket the monitor watches */
    void *zap;       /* REP on the ZAP endpoint (CURVE server) */

    bus__thread io;
    bool io_started;
    bool stopped; /* fini started: send nothing more */
    int wake_fd[2];
    bool pipe_open;
    atomic_bool closed;    /* close: refuse publishes */
    atomic_bool stopping;  /* stop: the I/O thread winds down */
    atomic_bool connected; /* connect side: a handshake succeeded and
                            * no disconnect since */

    /* The publish queue and the credits that bound it. The fields that
     * publishers and the I/O thread write are kept on separate cache
     * lines (ZB_PAD: the core allocates priv with malloc alignment, so
     * padding rather than _Alignas). */
    zb_slot *slots;
    size_t nslots;
    uint64_t mask;
    uint64_t credit_max;
    char pad0_[ZB_PAD];
    _Atomic uint64_t tail;     /* producers */
    _Atomic uint32_t active;   /* publishes running */
    _Atomic uint64_t accepted; /* publishes taken */
    char pad1_[ZB_PAD];
    _Atomic uint64_t credits; /* taken: queued + (reliable) unacked */
    char pad2_[ZB_PAD];
    atomic_bool sleeping;     /* the I/O thread is about to poll */
    atomic_bool wake_pending; /* a byte is in the pipe */
    char pad3_[ZB_PAD];
    uint64_t head;              /* @io */
    _Atomic uint64_t completed; /* publishes whose ack ran */
    _Atomic uint64_t waiters;   /* threads waiting on cond; those waiting
                                 * for a credit count in the high half too
                                 * (ZB_CREDIT_WAITER) */
    char pad4_[ZB_PAD];

    bus__mutex mtx;
    bus__cond cond;
    bool sync_init;
    zb_cmd *cmds;    /* @mtx */
    zb_cmd *syncing; /* @io: subscribe commands waiting for a sync */
    bool io_exited;  /* @mtx: commands run on the caller's thread */
    atomic_bool cmd_pending;

    /* @io: subscriptions. */
    zb_sub **subs;
    size_t nsubs, cap_subs;
    size_t nlive;
    int in_delivery;         /* depth of deliver loops running */
    zb_sub *dead_subs;       /* died inside a deliver loop: removed after it */
    zb_prefixes my_prefixes; /* what the XSUB subscribed */

    /* @io: fanout. */
    zb_prefixes their_prefixes; /* hub: what the XPUB was told */
    uint64_t hold_until_ns;     /* wait_subscriber deadline; 0: none */
    uint64_t hwm_since_ns;      /* hub: sends failing at the HWM since */
    bool hwm_blocked;           /* hub: waiting to retry (hwm_wait) */
    bool fwd_pending;           /* hub: a forward waits for the HWM */
    zmq_msg_t fwd_topic, fwd_env;
    zb_upub upubs[ZB_UPSTREAM_PUBS]; /* hub: upstream publishers */
    size_t nupubs;
    uint64_t pubid, pubseq; /* peer: our upstream identity */

    /* @io: reliable sender. */
    zb_flight *flights;
    uint32_t nflights;
    zb_flight *free_flights;
    zb_flist unsent, sent;
    uint64_t stop_deadline_ns;

    /* Reliable receiver: the ack stack (any thread pushes), the rest
     * @io. */
    _Atomic(zb_dlv *) acks;
    zb_idtab ids;
    zb_rec *recs;
    size_t npending, max_pending;
    zb_rec *rec_pool;
    zb_dlv *dlv_pool;
    size_t nrec_pool, ndlv_pool;
    zb_peer *peers;                /* hub */
    size_t nremote;                /* hub: live remote subscriptions */
    zb_dlv *rout_head, *rout_tail; /* hub: sent to peers, oldest first */
    uint64_t next_ping_ns;         /* peer */
    zb_dlv *retry_head, *retry_tail;
    zb_dlv *orphans;
    uint8_t ack_id[256];
    size_t ack_idlen;
    uint8_t ack_buf[1 + ZB_TAG_LEN * ZB_ACK_BATCH];
    size_t ack_n;

    zb_ratelog rl_bad, rl_drop, rl_auth, rl_hs;
    char last_topic[ZB_TOPIC_INLINE]; /* @io: last topic that passed */
    size_t last_topic_len;            /* 0: none */
    bool ever_connected;              /* @io */
    uint64_t disc_since_ns; /* @io: connect side, disconnected since */
    zb_stats st;
};

/* ---- zmq_broker.c ------------------------------------------------------ */

extern const bus_broker_ops bus_broker_zmq_tcp_ops;
extern const bus_broker_ops bus_broker_zmq_ipc_ops;
extern const bus_broker_ops bus_broker_zmq_inproc_ops;

void zb_logf(zb *z, bus_log_level level, const char *fmt, ...) BUS_PRINTF(3, 4);
/* Logs at most once a second per rl, adding how many were suppressed. */
void zb_ratelogf(zb *z, zb_ratelog *rl, bus_log_level level, const char *fmt,
                 ...) BUS_PRINTF(4, 5);
/* Logs a failed zmq call (errno) and maps it to a BUS_E* code. */
int zb_zerr(zb *z, const char *what);
int zb_map_errno(int e);

static inline void
zb_count(_Atomic uint64_t *c, uint64_t n)
{
    /* relaxed: statistics, they order nothing. */
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* Wakes the I/O thread if it sleeps (any thread, after making work). */
void zb_wake(zb *z);
/* Subscriptions (I/O thread): add (BUS_OK or BUS_ENOMEM), kill (marks
 * it dead; freed once no deliver loop runs), free. */
int zb_sub_add(zb *z, zb_sub *s);
void zb_sub_kill(zb *z, zb_sub *s);
void zb_sub_free(zb_sub *s);
/* Brackets a loop calling deliver functions: subscriptions that die
 * inside it are freed at its end. @io */
void zb_deliver_begin(zb *z);
void zb_deliver_end(zb *z);
/* Wakes waiters on z->cond (flush, credits, wait_subscribers). */
void zb_notify(zb *z);
/* Gives back n publish credits and counts n completed publishes. */
void zb_release(zb *z, uint64_t credits, uint64_t completed);
/* Frees the topic and the message of p; drops its event. */
void zb_pub_clear(zb_pub *p);
/* Runs p's ack (if any) with err and clears p. */
void zb_pub_finish(zb_pub *p, int err);
/* Moves src into dst (dst's env must be an initialised empty message). */
void zb_pub_move(zb_pub *dst, zb_pub *src);

/* Receiving: validates the topic frame and decodes the envelope (taking
 * env), counting and logging bad frames. On success *out is a frozen
 * event carrying its topic and topic (NUL-terminated) is filled.
 * Returns BUS_OK or the error (already counted). */
int zb_decode(zb *z, zmq_msg_t *tmsg, zmq_msg_t *env, char *topic,
              bus_event **out);
/* As zb_decode, from bytes inside a larger frame (a reliable batch):
 * always copies; borrows t and env. */
int zb_decode_buf(zb *z, const void *t, size_t tlen, const void *env,
                  size_t size, char *topic, bus_event **out);
/* A sync (fanout) or SUBOK (reliable) for key: completes the subscribe
 * commands waiting for it. @io */
void zb_sync_done(zb *z, const char *key, size_t len);
/* Counts and logs (rate-limited) a malformed message. */
void zb_bad_frame(zb *z, const char *why);
/* As zb_bad_frame, and dead-letters data (a frame of the message) when
 * dead_letter is set. */
void zb_bad_msg(zb *z, const char *why, const void *data, size_t len);
/* Reads and discards the remaining parts of a multipart message. */
void zb_drain_parts(void *sock);

/* ---- zmq_fanout.c ------------------------------------------------------- */

void zb_prefixes_free(zb_prefixes *ps);
/* Counts one more p (len <= BUS_TOPIC_MAX_LEN); *first: it was new.
 * BUS_OK, BUS_ENOMEM, BUS_EINVAL (too long). */
int zb_prefix_inc(zb_prefixes *ps, const char *p, size_t len, bool *first);
/* Counts one less p; true when that was the last. *found: it was there. */
bool zb_prefix_dec(zb_prefixes *ps, const char *p, size_t len, bool *found);
/* True when some prefix in ps is a prefix of topic[0..len). */
bool zb_prefixes_match(const zb_prefixes *ps, const char *topic, size_t len);
/* The literal prefix of a pattern: segments before the first wildcard. */
char *zb_pattern_prefix(const char *pattern, size_t *len);
/* Adds/removes s's prefix on the XSUB; *sent: a subscription went out
 * (a sync will confirm it). */
int zb_fan_sub_add(zb *z, zb_sub *s, bool *sent);
void zb_fan_sub_del(zb *z, zb_sub *s);
/* Sends a popped publish; false when blocked at the HWM (p kept, try
 * again later). @io */
bool zb_fan_send(zb *z, zb_pub *p, uint64_t now);
void zb_fan_xpub_input(zb *z, uint64_t now);
/* Retries a forward blocked at the HWM; true when none is pending. */
bool zb_fan_fwd_retry(zb *z, uint64_t now);
void zb_fan_recv(zb *z);
/* Delivers ev (taking it) to the live local subscriptions matching
 * topic, with token 0 and flags 0; a refusal counts in dropped_queue. */
void zb_deliver_plain(zb *z, const char *topic, bus_event *ev);
bool zb_fan_holding(zb *z, uint64_t now);
void zb_fan_fini(zb *z);

/* ---- zmq_reliable.c ---------------------------------------------------- */

int zb_rel_init(zb *z);
void zb_rel_fini(zb *z);
void zb_rel_take(zb *z, zb_pub *p); /* a popped publish into the window */
void zb_rel_send(zb *z, uint64_t now);
void zb_rel_dealer_input(zb *z);
void zb_rel_router_input(zb *z);
void zb_rel_reconnected(zb *z);
/* Peer side: pattern bookkeeping; *sent: a SUB went out. */
int zb_rel_sub_add(zb *z, zb_sub *s, bool *sent);
void zb_rel_sub_del(zb *z, zb_sub *s);
/* Timers; returns the next deadline (0: none). */
uint64_t zb_rel_timers(zb *z, uint64_t now);
bool zb_rel_acks_run(zb *z, uint64_t now);
void zb_rel_ack_flush(zb *z);
/* Cleans up a dead subscription's deliveries. */
void zb_rel_sub_dead(zb *z, zb_sub *s);
/* Any thread: the ack op. */
void zb_rel_ack(void *priv, void *handle, uint64_t token, bus_result res);
/* At the I/O thread's end: fail everything in flight. */
void zb_rel_abort(zb *z);
bool zb_rel_sender_idle(zb *z);

/* ---- zmq_curve.c -------------------------------------------------------- */

/* Reads a key option pair (key=Z85 or key_file=path) into *k. Returns
 * BUS_OK (found: *found true), BUS_OK with *found false, BUS_EINVAL. */
int zb_curve_opts(zb *z, bus_uri *u, char *errbuf, size_t errbuf_len);
/* Sets CURVE options on a socket: server (bound) or client. */
int zb_curve_server(zb *z, void *sock);
int zb_curve_client(zb *z, void *sock, bool loopback);
int zb_zap_open(zb *z);
void zb_zap_input(zb *z);
void zb_curve_wipe(zb_opts *o);

#endif
