/*
 * A scriptable broker backend for the bus unit tests ("fake://"),
 * registered through the public SPI (bus_broker_register). It keeps its
 * subscriptions in a table, lets the test deliver events to them with a
 * token of its choice (fake_deliver), records every ack, and can be told
 * to refuse subscriptions or to block inside subscribe (which the context
 * calls with its writer mutex held).
 *
 * publish delivers synchronously, in the publishing thread, to every
 * subscription whose pattern matches, with tokens 1, 2, 3, ... (one per
 * publish), like the memory broker but with acks.
 */
#ifndef BUS_FAKE_BROKER_H
#define BUS_FAKE_BROKER_H

#include <stdatomic.h>

#include <bus/broker.h>

#define FAKE_MAX_SUBS 64
#define FAKE_MAX_ACKS 4096

typedef struct fake_ack {
    uint64_t token;
    bus_result res;
} fake_ack;

/* Per-broker control and observations; fake_of(b) returns it. */
typedef struct fake_state {
    /* Control, set by the test before the call that uses it. */
    int refuse_subscribe;       /* error subscribe returns, 0: accept */
    atomic_int block_subscribe; /* subscribe waits until cleared */
    atomic_int in_subscribe;    /* a subscribe call is blocked */
    /* Observations. */
    _Atomic uint64_t published;
    _Atomic uint64_t next_token;
    _Atomic uint64_t subscribes, unsubscribes;
    _Atomic int n_acks;           /* read it, then fake_ack_of */
    fake_ack acks[FAKE_MAX_ACKS]; /* under the broker's mutex */
    _Atomic int deliver_errors;   /* deliver returned an error */
    _Atomic int acks_unsubscribed; /* acks through a handle already
                                    * unsubscribed (a core bug) */
} fake_state;

/* Registers "fake" once per process (BUS_OK or already registered). */
void fake_register(void);

/* The state of a broker opened on fake://anything. */
fake_state *fake_of(bus_broker *b);

/* Delivers ev on topic to every subscription of b matching it, with token;
 * returns the number that took it. The caller keeps its reference. */
int fake_deliver(bus_broker *b, const char *topic, bus_event *ev,
                 uint64_t token);

/* The result acked for token (a bus_result), or -1 if none. */
int fake_ack_of(bus_broker *b, uint64_t token);

/* Live subscriptions. */
int fake_n_subs(bus_broker *b);

#endif
