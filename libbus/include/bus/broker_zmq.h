/*
 * The ZeroMQ broker: zmq+tcp://, zmq+ipc://, zmq+inproc:// (brokers/zmq,
 * built when BUS_WITH_ZMQ is on). docs/brokers/zmq.md is the long form
 * (topology, frames, options, security); docs/wire-format.md specifies
 * the envelope.
 *
 * URIs:
 *   zmq+tcp://host:port     host a name or address; port 0 (with bind=1)
 *                           picks a free port: read it back with
 *                           bus_broker_zmq_endpoint
 *   zmq+ipc:///abs/path     a Unix socket path
 *   zmq+inproc://name       within the process (no security mechanism)
 *
 * Topology: one broker is one endpoint. With bind=1 (the default) it is
 * a HUB: it binds, and every event published on it or by a connected
 * PEER (bind=0) goes to every matching subscription of the hub and of its
 * peers. A peer connects to one hub and both publishes and subscribes
 * through it. So a process that owns an address opens it with bind=1,
 * the others open the same address with bind=0, and all of them can
 * publish and subscribe.
 *   fanout:   the hub's XPUB sends; peers' XSUBs subscribe and publish
 *             upstream, the hub forwards. Its own subscriptions use an
 *             XSUB connected to itself.
 *   reliable: the hub's ROUTER receives from peers' DEALERs (and its own
 *             loopback DEALER), delivers to its subscriptions and to the
 *             peers that registered patterns, and acks each sender once
 *             every subscription (local or peer) has handled the event.
 * Both sides of a connection must use the same mode.
 *
 * Guarantees:
 * - fanout: AT MOST ONCE. An event is lost when no subscription matched
 *   when the hub sent it (nobody listening yet: late joiners miss what
 *   came before), when a subscriber stayed at the hub's high-water mark
 *   longer than hwm_wait (ZMQ_XPUB_NODROP: the event goes to no
 *   subscriber), when a receiving subscription refused it (its queue full
 *   past its backpressure deadline), when a peer's upstream pipe was full,
 *   or in flight on a connection that broke. Every such loss but the last
 *   is counted: dropped_late and dropped_hwm on the hub, dropped_queue on
 *   the receiver, dropped_upstream on the hub (sequence gaps, seen when a
 *   later event of that peer arrives), dropped_late on a peer publishing
 *   while not connected. With several subscribers a HWM drop is
 *   all-or-none, so for each subscriber present throughout, its loss is
 *   exactly dropped_hwm + its own dropped_queue. While a subscriber is at
 *   the HWM (up to hwm_wait, default 1 s) later events wait behind it and
 *   publishers meet their backpressure policy; hwm_wait=0 drops at once
 *   (classic PUB/SUB). wait_subscriber=ms holds the hub's publishes until
 *   a first subscription arrives. A subscribe call returns once the hub
 *   has confirmed the subscription (or after subscribe_timeout), so what
 *   is published after it returns is not lost to the slow-joiner race.
 * - reliable: AT LEAST ONCE while the sender runs. The sender keeps each
 *   event until the hub acks it, and resends it after resend_ivl without
 *   an ack and at once after a reconnect. The hub acks an event when
 *   every subscription it went to has handled it (the ack op got BUS_ACK
 *   or BUS_REJECT; BUS_RETRY redelivers it later), peers' included, or at
 *   once when none matches (counted as unrouted). It drops duplicates by
 *   event id: an id seen among the last `dedup` handled ids, or still
 *   being handled, is not delivered again (counted, and re-acked), so
 *   handlers see each event once while the hub stays up; a restarted hub
 *   may see again what its previous incarnation handled without acking.
 *   A hub acks nothing while it has no subscription (events wait at their
 *   senders); make subscriptions before events arrive, or subscribe wide,
 *   since events matching none after that are acked as unrouted. A peer
 *   that subscribed is kept while it pings (every peer_timeout/4); one
 *   silent for peer_timeout, or unreachable, is dropped with its
 *   subscriptions and stops holding up acks: at least once towards a peer
 *   holds while it stays connected.
 *   Flow control: at most `window` events unacked per sender; a full
 *   window applies the publish backpressure policy (block up to
 *   block_timeout_ms, then BUS_EAGAIN; BUS_PUB_NONBLOCK or
 *   backpressure=fail: BUS_EAGAIN at once). A receiver holds at most 4
 *   windows of events being handled and leaves the rest unacked (resent).
 *   Order is publish order except across resends and redeliveries.
 *   A sender packs waiting events into frames of up to `batch` bytes
 *   (default 8192; 0: one event per message): the receiver's
 *   max_msg_size must be at least that, and a broker that predates
 *   batches needs batch=0.
 *
 * Publish: takes ev on success; encodes it in the calling thread and
 * hands it to the broker's I/O thread. The ack runs on the I/O thread:
 * fanout: once the frame went to libzmq (BUS_OK), or was dropped at the
 * HWM (BUS_EAGAIN); with nobody subscribed it is BUS_OK (nobody listens,
 * as mem://). reliable: BUS_OK when the hub acked; BUS_ECLOSED when the
 * broker stops first (after waiting up to `linger` for acks). Returns
 * BUS_OK, BUS_ECLOSED, BUS_EAGAIN (queue or window full), BUS_ETOOBIG
 * (the frame would exceed max_msg_size), BUS_ENOMEM. flush waits until
 * every earlier publish's ack has run.
 *
 * Deliveries: on the broker's I/O thread, in arrival order. fanout
 * passes flags 0 (a subscription's own backpressure policy may block the
 * I/O thread, which slows the hub down through ZeroMQ) and token 0.
 * reliable passes BUS_PUB_NONBLOCK and a non-zero token; a refusal
 * (BUS_EAGAIN) keeps the event and retries it in order, so the I/O thread
 * never blocks on a handler's queue. Consumer groups are not supported
 * (subscribe with a group: BUS_ENOTSUP).
 *
 * Options (query or props; unknown keys fail the open with BUS_EINVAL;
 * times in ms): see docs/brokers/zmq.md for the table. bind, mode
 * (fanout|reliable), hwm, sndbuf, rcvbuf, queue, window, backpressure,
 * block_timeout_ms, resend_ivl, dedup, wait_subscriber, hwm_wait,
 * subscribe_timeout, peer_timeout, reconnect_ivl, reconnect_ivl_max,
 * heartbeat_ivl, heartbeat_timeout, heartbeat_ttl, handshake_ivl,
 * max_msg_size, linger, batch, spin_us, routing_id, dead_letter, and for
 * CURVE curve_secret_key[_file], curve_public_key[_file],
 * curve_server_key[_file], curve_allow[_file], curve_allow_any,
 * zap_domain.
 *
 * Security: with CURVE the hub is the server (secret key plus an
 * allow-list of client public keys checked by its ZAP handler, with
 * ZMQ_ZAP_ENFORCE_DOMAIN) and peers are clients (the hub's public key,
 * their own key pair). Keys are Z85 text in an option or a file. Secret
 * keys are never logged (the core masks options named *secret*, *key*,
 * *pass*... in the URIs it logs, judged decoded and in any case); prefer
 * props or files to URIs for them anyway.
 *
 * Bad input (wrong frame counts, malformed envelopes, bad topics or
 * tags) is counted in bad_frames, logged at most once a second, and
 * dropped, or dead-lettered with dead_letter=topic; the connection keeps
 * working. A frame over max_msg_size makes libzmq drop that connection
 * (a peer dials again).
 *
 * Threads: publish, flush, health, subscribe, unsubscribe and ack from
 * any thread (subscribe and unsubscribe also from inside a delivery).
 * One I/O thread per broker owns its sockets; a process-wide ZeroMQ
 * context is shared by the brokers (inproc needs that), except that a
 * CURVE hub gets its own, whose ZAP handler its I/O thread serves.
 */
#ifndef BUS_BROKER_ZMQ_H
#define BUS_BROKER_ZMQ_H

#include <bus/broker.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_broker_zmq_stats {
    uint64_t published;          /* publishes accepted */
    uint64_t sent;               /* frames handed to libzmq (not resends) */
    uint64_t delivered;          /* deliveries a subscription took */
    uint64_t dropped_hwm;        /* fanout: refused at the high-water mark */
    uint64_t hwm_waits;          /* fanout hub: times a send waited at the
                                  * HWM (hwm_wait) instead of dropping */
    uint64_t dropped_late;       /* fanout: no subscription matched when sent */
    uint64_t dropped_queue;      /* fanout receiver: a subscription refused;
                                  * reliable receiver: no room (resent) */
    uint64_t dropped_upstream;   /* fanout hub: lost between a peer's XSUB
                                  * and us (sequence gaps) */
    uint64_t forwarded;          /* fanout hub: peers' publishes forwarded */
    uint64_t bad_frames;         /* malformed frames received and dropped */
    uint64_t resent;             /* reliable: frames sent again */
    uint64_t duplicates_dropped; /* reliable receiver */
    uint64_t acked;              /* reliable: sender: acks received for events
                                  * in flight; receiver: events acked */
    uint64_t unrouted;           /* receiver: matched no subscription */
    uint64_t auth_denied;        /* CURVE server: clients refused by ZAP */
    uint64_t reconnects;         /* peer: connections after the first */
    uint64_t inflight;           /* now: reliable unacked / fanout queued */
    uint64_t subscribers;        /* now, fanout hub: subscriptions the XPUB
                                  * has (one per prefix per subscriber) */
} bus_broker_zmq_stats;

/* Counters of b, which must be a zmq+ broker. Returns BUS_OK or
 * BUS_EINVAL. Thread: any. */
BUS_API int bus_broker_zmq_stats_get(const bus_broker *b,
                                     bus_broker_zmq_stats *st);

/* The ZeroMQ endpoint b is bound or connected to, as libzmq reports it
 * ("tcp://127.0.0.1:41234" after binding port 0, "ipc:///tmp/x"). A peer
 * opens "zmq+" followed by it. NULL when b is not a zmq+ broker. Valid
 * while b is open. Thread: any. */
BUS_API const char *bus_broker_zmq_endpoint(const bus_broker *b);

/* Fanout hub: waits until its XPUB has at least n subscriptions
 * (subscribers times prefixes), up to timeout_ms (-1: no limit). Returns
 * BUS_OK, BUS_ETIMEDOUT, BUS_ECLOSED, BUS_EINVAL (not a fanout hub
 * broker). Thread: any but a delivery of b. */
BUS_API int bus_broker_zmq_wait_subscribers(bus_broker *b, uint64_t n,
                                            int32_t timeout_ms);

/* Makes a new CURVE key pair as Z85 text (40 characters and a NUL).
 * Returns BUS_OK or BUS_ENOTSUP (libzmq without CURVE). Thread: any. */
BUS_API int bus_broker_zmq_keypair(char public_z85[41], char secret_z85[41]);

#ifdef __cplusplus
}
#endif
#endif /* BUS_BROKER_ZMQ_H */
