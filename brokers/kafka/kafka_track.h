/*
 * The in-flight offset tracker of one Kafka partition (internal).
 *
 * The consumer hands a partition's records to the bus in offset order and
 * pushes each one here first. Handlers finish in any order (queued
 * subscriptions, deferred retries), so the tracker keeps the deliveries
 * not yet finished in a ring sorted by offset, and the commit position is
 * the offset of the lowest unfinished one: every record below it has been
 * handled (ACK, or REJECT once dead-lettered) and none above it is
 * committed early. With nothing unfinished the position is the offset
 * after the last record pushed. This is the value given to
 * rd_kafka_offsets_store, which stores it as is (the next offset to read),
 * never offset + 1 of some finished record that may sit above an
 * unfinished one.
 *
 * Offsets need not be contiguous (compacted topics, transaction markers):
 * entries carry their offset and lookups binary-search the ring.
 *
 * The ring grows by doubling up to max entries; a full tracker refuses the
 * push (the consumer then pauses the partition: bounded, never buffered).
 * Each entry keeps a reference on its event, for redelivery after a
 * RETRY, released when the entry leaves the tracker.
 *
 * Thread: none of its own; the caller serialises every call (kafka.c holds
 * the subscription's mutex).
 */
#ifndef BUS_KAFKA_TRACK_H
#define BUS_KAFKA_TRACK_H

#include <bus/event.h>

typedef enum kt_state {
    KT_INFLIGHT = 0, /* handed to the bus, no outcome yet */
    KT_DONE = 1,     /* handled: may be committed past */
    KT_RETRY = 2     /* the handler asked for redelivery: due at due_ns */
} kt_state;

typedef struct kt_entry {
    int64_t off;
    bus_event *ev;     /* one reference, or NULL */
    uint64_t due_ns;   /* KT_RETRY: monotonic time of the redelivery */
    uint32_t attempts; /* deliveries so far */
    uint32_t state;    /* kt_state */
} kt_entry;

typedef struct kt {
    kt_entry *ring;
    uint32_t cap;      /* allocated entries, a power of two (0: none yet) */
    uint32_t max;      /* refuse pushes beyond this many entries */
    uint32_t head;     /* index of the oldest entry */
    uint32_t n;        /* entries in the ring */
    uint32_t inflight; /* entries in KT_INFLIGHT */
    uint32_t retry;    /* entries in KT_RETRY */
    int64_t next;      /* offset after the last kept push; -1: none */
} kt;

/* An empty tracker that holds at most max (>= 1) entries. */
void kt_init(kt *t, uint32_t max);
/* Releases every entry's event and the ring; t is empty again (kt_init
 * state, same max). */
void kt_clear(kt *t);

/* Appends off (greater than every offset pushed so far) in KT_INFLIGHT,
 * taking the caller's reference on ev (may be NULL) on success.
 * Returns BUS_OK, BUS_EAGAIN (max entries reached), BUS_EINVAL (off not
 * increasing), BUS_ENOMEM. */
int kt_push(kt *t, int64_t off, bus_event *ev);

/* Removes the last pushed entry (its delivery failed before any handler
 * saw it) and returns its event reference to the caller through *ev (may
 * be NULL). The position goes back to its offset. Returns false when the
 * tracker is empty. */
bool kt_cancel_last(kt *t, bus_event **ev);

/* The entry for off, or NULL. */
kt_entry *kt_find(kt *t, int64_t off);

/* Marks off finished. Returns true when the commit position advanced.
 * An unknown offset (already finished, or from an older assignment) is
 * ignored: *found (may be NULL) says which. */
bool kt_done(kt *t, int64_t off, bool *found);

/* Marks off for redelivery at due_ns. Returns false when off is not in
 * flight (unknown or finished). */
bool kt_retry(kt *t, int64_t off, uint64_t due_ns);

/* Puts a KT_RETRY entry back in flight (its redelivery was accepted). */
void kt_redelivered(kt *t, kt_entry *e);

/* The commit position: offset of the lowest unfinished entry, or next;
 * -1 when nothing was ever pushed. */
int64_t kt_position(const kt *t);

/* The i-th entry from the oldest (i < t->n). */
static inline kt_entry *
kt_at(kt *t, uint32_t i)
{
    return &t->ring[(t->head + i) & (t->cap - 1)];
}

#endif
