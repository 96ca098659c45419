/*
 * Topics, patterns and the subscription index (internal).
 *
 * The index maps patterns to opaque items (subscriptions). It is a
 * persistent (path-copying) trie over topic segments: every change
 * produces a new immutable snapshot that shares unchanged nodes with the
 * previous one. Readers (publishers) use a snapshot without any lock or
 * atomic read-modify-write; the writer (under the owner's mutex) builds
 * the next snapshot and releases the old one after a grace period (the
 * owner's business: see ctx.c). Each node's children are in hash tables
 * (about sqrt(children) buckets, so that copying a wide node costs
 * O(sqrt(children)), see topic.c) rebuilt when the node is copied, so
 * lookup costs O(segments) whatever the number of subscriptions, and each
 * snapshot carries a bounded cache of topic -> matching items, filled
 * lock-free by readers.
 *
 * Thread rules: bus__tindex_add/remove/release only by the single writer
 * (callers serialise them); lookup/match from any number of threads
 * concurrently with the writer, on a snapshot not yet released.
 */
#ifndef BUS_TOPIC_H
#define BUS_TOPIC_H

#include <bus/common.h>

#define BUS_TOPIC_MAX_LEN 1024   /* bytes in a topic or pattern */
#define BUS_TOPIC_MAX_SEGMENT 255
#define BUS_TOPIC_MAX_SEGMENTS 32

/* Validates a topic (pattern false) or a pattern (true). BUS_OK or
 * BUS_EINVAL with a reason in errbuf (may be NULL). Rules: bus.h. */
int bus__topic_check(const char *s, bool pattern, char *errbuf,
                     size_t errbuf_len);

/* Reference matcher: does pattern match topic? Both must be valid. */
bool bus__topic_match(const char *pattern, const char *topic);

/* Can some topic match both patterns? (Used to decide which attached
 * brokers a subscription goes to.) Both must be valid patterns. */
bool bus__pattern_overlap(const char *a, const char *b);

/* 64-bit hash of a byte string (for the cache and sharding keys). */
uint64_t bus__hash(const void *data, size_t len);

typedef struct bus__tindex bus__tindex;

/* A new empty snapshot; NULL on ENOMEM. cache_cap: entries in the topic
 * cache (rounded up to a power of two, at most 2^24; 0 disables caching).
 * The cache also stops growing at a byte budget (64 KiB + 512 bytes per
 * entry), so results of thousands of items may go uncached. Snapshots
 * made from this one by add/remove keep its cache_cap, each with its own
 * cache, allocated on its first lookup miss. */
bus__tindex *bus__tindex_new(uint32_t cache_cap);

/* *out = a new snapshot equal to t plus (pattern -> item). t stays valid
 * and unchanged. BUS_OK, BUS_EINVAL (invalid pattern), BUS_ENOMEM (*out
 * NULL, t untouched). The same (pattern, item) twice is allowed and
 * yields the item twice. Writer only. */
int bus__tindex_add(bus__tindex *t, const char *pattern, void *item,
                    bus__tindex **out);

/* *out = t minus one (pattern -> item). BUS_OK, BUS_ENOTFOUND,
 * BUS_ENOMEM. Writer only. */
int bus__tindex_remove(bus__tindex *t, const char *pattern, void *item,
                       bus__tindex **out);

/* Releases a snapshot: frees its nodes not shared with live snapshots and
 * its cache. Only once no reader can still use it. NULL is a no-op.
 * Writer only. */
void bus__tindex_release(bus__tindex *t);

/* Number of (pattern, item) entries. */
size_t bus__tindex_size(const bus__tindex *t);

/* Items whose pattern matches topic (len bytes, valid topic: an invalid
 * one would be cached, and bus__tindex_lookup_checked would then accept
 * it). Returns the
 * count and sets *items to an array of them: either the snapshot's cache
 * entry (valid until the snapshot is released) or buf, of which up to cap
 * are written. If the count exceeds cap and the result could not be
 * cached, call again with a larger buf. A cache miss walks the trie and
 * tries to insert the result (one allocation; lock-free CAS into the
 * cache; when the cache is full the result is simply not cached). Order of
 * items is unspecified but stable for a snapshot. Any thread. */
size_t bus__tindex_lookup(bus__tindex *t, const char *topic, size_t len,
                          void **buf, size_t cap, void *const **items);

/* As bus__tindex_lookup, for a topic (len bytes) not validated yet: it is
 * validated only on a cache miss, since a hit means these exact bytes
 * were valid before; so a publish that hits the cache pays no
 * validation. BUS_OK with *count and *items set as bus__tindex_lookup
 * does, or BUS_EINVAL (*count 0). Any thread. */
int bus__tindex_lookup_checked(bus__tindex *t, const char *topic,
                               size_t len, void **buf, size_t cap,
                               void *const **items, size_t *count);

/* Uncached walk, for tests and the property test: writes up to cap items
 * into buf and returns the total count. Any thread. */
size_t bus__tindex_match(const bus__tindex *t, const char *topic,
                         size_t len, void **buf, size_t cap);

#endif
