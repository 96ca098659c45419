/*
 * Topics and patterns: validation, matching, overlap, and the subscription
 * index (topic.h is the contract).
 *
 * Design of the index. A persistent trie over segments: a node has
 *   - its literal children in hash tables keyed by bus__hash of the
 *     segment (open addressing, linear probing, power-of-two capacity,
 *     load <= 0.5), split over about sqrt(children) shared buckets (see
 *     tbucket for why);
 *   - a '*' child;
 *   - "rest" items: patterns ending with '>' here (they match one or more
 *     further segments);
 *   - "exact" items: patterns ending here.
 * A node is one block (header, bucket array, both item arrays, its
 * segment); nodes and buckets are never modified once a snapshot can reach
 * them. Add and remove copy the nodes on the path from the root (each copy
 * rebuilt with the change) and the one bucket per node that the change
 * touches; the copies share everything else with the old versions. Nodes
 * and buckets carry a plain reference count that only the single writer
 * touches: readers never see or change it. Releasing a snapshot drops its
 * root and frees, recursively, what drops to zero, so whatever a live
 * snapshot still reaches survives, and snapshots may be released in any
 * order. Nodes left empty by a removal are pruned (not copied), so the trie
 * holds no dead branches.
 *
 * Cost: lookup is O(segments) table probes per branch followed ('*' and
 * '>' add branches), whatever the number of subscriptions. A change copies
 * at most 33 nodes; copying a node with k children costs O(sqrt(k))
 * reference increments and pointer copies (its bucket array and one
 * bucket), plus O(items) for an item list it changes; when the bucket
 * count must grow, O(k) once (amortised over the doubling). Measured:
 * a few us per add or remove with 10,000 children under one node.
 *
 * The topic cache. Each snapshot has a table of cache_cap atomic slots,
 * allocated on the first miss (so snapshots that nobody reads cost
 * nothing). An entry (hash, topic bytes, matched items) is one allocation,
 * filled before it is published by a CAS into the first empty slot of its
 * probe window (CACHE_PROBE slots from hash & mask). Entries are never
 * removed or changed while the snapshot lives, so:
 *   - a reader loading a slot with acquire sees a fully built entry (the
 *     inserting CAS is a release);
 *   - an empty slot in the window ends the search (inserts take the first
 *     empty slot);
 *   - two readers missing on the same topic race on the CAS; the loser
 *     finds the winner's entry in that slot, uses it and frees its own.
 * The cache is bounded: at most cache_cap entries, and at most
 * cache_budget() bytes for all of them (an entry for a topic matching
 * thousands of items is large; beyond the budget results go through the
 * caller's buffer). Running out of memory on the cache path never fails a
 * lookup: the result then goes through the caller's buffer. Only valid
 * topics are ever cached, which lets bus__tindex_lookup_checked skip
 * validation on a hit.
 *
 * Threads: add/remove/release by one writer at a time (the caller
 * serialises them); lookup/match from any thread on a snapshot not yet
 * released. The caller's grace period makes every reader's accesses to a
 * snapshot happen-before its release.
 */
#include <assert.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <bus/bus.h>

#include "alloc.h"
#include "mp.h"
#include "topic.h"

/* The cache hit path is a few ns: everything on it is inlined, and the
 * miss path kept out of line so it does not cost the hit a stack frame. */
#if defined(__GNUC__)
#define TOPIC_HOT static inline __attribute__((always_inline))
#define TOPIC_COLD static __attribute__((noinline, cold))
#else
#define TOPIC_HOT static inline
#define TOPIC_COLD static
#endif

/* ---- Hash ---------------------------------------------------------------- */

#define HASH_K1 0x9e3779b97f4a7c15u /* 2^64 / golden ratio */
#define HASH_K2 0xd6e8feb86659fd93u /* odd constants with mixed bits */
#define HASH_K3 0xa0761d6478bd642fu

/* The 128-bit product of a and b folded to 64 bits (low half xor high
 * half). Each product bit depends on many input bits and the fold brings
 * the well-mixed middle bits to both ends; it costs one multiply. */
static inline uint64_t
hash_fold(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__)
    __extension__ typedef unsigned __int128 hash_u128;
    hash_u128 r = (hash_u128)a * b;

    return (uint64_t)r ^ (uint64_t)(r >> 64);
#else
    uint64_t al = (uint32_t)a, ah = a >> 32, bl = (uint32_t)b, bh = b >> 32;
    uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
    uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
    uint64_t lo = (mid << 32) | (uint32_t)ll;
    uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);

    return lo ^ hi;
#endif
}

static inline uint64_t
hash_read64(const unsigned char *p)
{
    uint64_t w;

    memcpy(&w, p, 8); /* unaligned read, one instruction on x86/arm64 */
    return w;
}

static inline uint64_t
hash_read32(const unsigned char *p)
{
    uint32_t w;

    memcpy(&w, p, 4);
    return w;
}

/* Topics are short (a typical one is 10-30 bytes), so the design favours
 * them: up to 16 bytes are two (possibly overlapping) word reads and one
 * fold; longer inputs fold 16 bytes per step into the state, then the
 * last 16 bytes (overlapping the previous block if needed) as a short
 * input.
 * Overlapping reads never make inputs collide by shape: the length is in
 * the state from the start. Not meant to resist chosen inputs. */
TOPIC_HOT uint64_t
hash_bytes(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = HASH_K3 ^ ((uint64_t)len * HASH_K1);
    uint64_t a, b;
    size_t n = len;

    if (n <= 16) {
        if (n >= 8) {
            a = hash_read64(p);
            b = hash_read64(p + n - 8);
        } else if (n >= 4) {
            a = hash_read32(p);
            b = hash_read32(p + n - 4);
        } else if (n > 0) {
            a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8)
              | p[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        while (n > 16) {
            h = hash_fold(hash_read64(p) ^ HASH_K1, hash_read64(p + 8) ^ h);
            p += 16;
            n -= 16;
        }
        a = hash_read64(p + n - 16);
        b = hash_read64(p + n - 8);
    }
    /* One fold is enough for table indexes: the high half of the product
     * depends on every input bit, and it is folded onto the low bits
     * (checked: one flipped input bit flips half of the low 16 bits on
     * average; sequential topics spread over buckets as random keys do). */
    return hash_fold(a ^ HASH_K2, b ^ h);
}

uint64_t
bus__hash(const void *data, size_t len)
{
    return hash_bytes(data, len);
}

/* ---- Validation and matching --------------------------------------------- */

static int BUS_PRINTF(3, 4)
topic_fail(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf != NULL && errbuf_len > 0) {
        va_start(ap, fmt);
        vsnprintf(errbuf, errbuf_len, fmt, ap);
        va_end(ap);
    }
    return BUS_EINVAL;
}

/* Bytes that need no check beyond segment lengths: printable ASCII but
 * space, '.', '*' and '>'. */
static const unsigned char topic_plain[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

/* The common case, plain ASCII with valid segment lengths, in one tight
 * pass (a table load and a branch per byte). false means "not sure":
 * topic_check_len then decides and says why. */
static inline bool
topic_fast(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i, seg = 0, nseg = 1;

    if (len == 0 || len > BUS_TOPIC_MAX_LEN)
        return false;
    for (i = 0; i < len; i++) {
        if (topic_plain[s[i]])
            continue;
        if (s[i] != '.' || i == seg || i - seg > BUS_TOPIC_MAX_SEGMENT
            || ++nseg > BUS_TOPIC_MAX_SEGMENTS)
            return false;
        seg = i + 1;
    }
    return i > seg && i - seg <= BUS_TOPIC_MAX_SEGMENT;
}

/* Validates len bytes (a NUL among them is invalid). */
static int
topic_check_len(const char *s, size_t len, bool pattern, char *errbuf,
                size_t errbuf_len)
{
    const char *what = pattern ? "pattern" : "topic";
    size_t i, seg = 0, nseg = 1;

    if (topic_fast(s, len))
        return BUS_OK;
    if (len == 0)
        return topic_fail(errbuf, errbuf_len, "empty %s", what);
    if (len > BUS_TOPIC_MAX_LEN)
        return topic_fail(errbuf, errbuf_len, "%s longer than %d bytes",
                          what, BUS_TOPIC_MAX_LEN);
    /* i == len acts as a final '.' closing the last segment. */
    for (i = 0; i <= len; i++) {
        unsigned char c = i < len ? (unsigned char)s[i] : '.';

        if (c == '.') {
            if (i == seg)
                return topic_fail(errbuf, errbuf_len,
                                  "empty segment at offset %zu", seg);
            if (i - seg > BUS_TOPIC_MAX_SEGMENT)
                return topic_fail(errbuf, errbuf_len,
                                  "segment at offset %zu longer than %d "
                                  "bytes", seg, BUS_TOPIC_MAX_SEGMENT);
            if (i < len && ++nseg > BUS_TOPIC_MAX_SEGMENTS)
                return topic_fail(errbuf, errbuf_len,
                                  "more than %d segments (offset %zu)",
                                  BUS_TOPIC_MAX_SEGMENTS, i + 1);
            seg = i + 1;
        } else if (c == '*' || c == '>') {
            if (!pattern)
                return topic_fail(errbuf, errbuf_len,
                                  "'%c' at offset %zu: wildcards are only "
                                  "allowed in patterns", c, i);
            if (i != seg || (i + 1 < len && s[i + 1] != '.'))
                return topic_fail(errbuf, errbuf_len,
                                  "'%c' at offset %zu must be a whole "
                                  "segment", c, i);
            if (c == '>' && i + 1 < len)
                return topic_fail(errbuf, errbuf_len,
                                  "'>' must be the last segment "
                                  "(offset %zu)", i);
        } else if (c == ' ') {
            return topic_fail(errbuf, errbuf_len, "space at offset %zu", i);
        } else if (c < 0x20 || c == 0x7f) {
            return topic_fail(errbuf, errbuf_len,
                              "control byte 0x%02x at offset %zu", c, i);
        } else if (c >= 0x80) {
            /* A run of non-ASCII bytes must be whole UTF-8 sequences on
             * its own: ASCII bytes are never part of a sequence. */
            size_t j = i;

            while (j < len && (unsigned char)s[j] >= 0x80)
                j++;
            if (!bus__utf8_valid(s + i, j - i))
                return topic_fail(errbuf, errbuf_len,
                                  "invalid UTF-8 at offset %zu", i);
            i = j - 1;
        }
    }
    return BUS_OK;
}

int
bus__topic_check(const char *s, bool pattern, char *errbuf,
                 size_t errbuf_len)
{
    if (s == NULL)
        return topic_fail(errbuf, errbuf_len, "%s is NULL",
                          pattern ? "pattern" : "topic");
    return topic_check_len(s, strnlen(s, BUS_TOPIC_MAX_LEN + 1), pattern,
                           errbuf, errbuf_len);
}

static inline bool
seg_is(const char *p, size_t len, char c)
{
    return len == 1 && p[0] == c;
}

/* Length of the segment at p (up to '.' or the end). */
static inline size_t
seg_len(const char *p)
{
    size_t n = 0;

    while (p[n] != '\0' && p[n] != '.')
        n++;
    return n;
}

bool
bus__topic_match(const char *pattern, const char *topic)
{
    const char *p = pattern, *t = topic;

    /* Invariant at the top: p and t each point at a segment (both valid,
     * so both have at least one). */
    for (;;) {
        size_t pl = seg_len(p), tl = seg_len(t);

        if (seg_is(p, pl, '>'))
            return true; /* t has this segment, so one or more remain */
        if (!seg_is(p, pl, '*') && (pl != tl || memcmp(p, t, pl) != 0))
            return false;
        p += pl;
        t += tl;
        if (*p == '\0' || *t == '\0')
            return *p == '\0' && *t == '\0';
        p++;
        t++;
    }
}

bool
bus__pattern_overlap(const char *a, const char *b)
{
    /* Segment by segment: a '>' on either side absorbs whatever the other
     * has left (at least its current segment); '*' meets anything but the
     * end of the other; two literals must be equal. */
    for (;;) {
        size_t al = seg_len(a), bl = seg_len(b);

        if (seg_is(a, al, '>') || seg_is(b, bl, '>'))
            return true;
        if (!seg_is(a, al, '*') && !seg_is(b, bl, '*')
            && (al != bl || memcmp(a, b, al) != 0))
            return false;
        a += al;
        b += bl;
        if (*a == '\0' || *b == '\0')
            return *a == '\0' && *b == '\0';
        a++;
        b++;
    }
}

int
bus_topic_validate(const char *topic, char *errbuf, size_t errbuf_len)
{
    return bus__topic_check(topic, false, errbuf, errbuf_len);
}

int
bus_pattern_validate(const char *pattern, char *errbuf, size_t errbuf_len)
{
    return bus__topic_check(pattern, true, errbuf, errbuf_len);
}

bool
bus_topic_matches(const char *pattern, const char *topic)
{
    return bus__topic_match(pattern, topic);
}

/* ---- The trie ------------------------------------------------------------ */

typedef struct tnode tnode;

/* A child table slot. tag and len sit beside the pointer so that a probe
 * rejects a different segment without touching the child's memory. */
typedef struct tkid {
    uint32_t tag; /* low 32 bits of bus__hash(segment) */
    uint32_t len; /* segment length */
    tnode *node;  /* NULL: empty slot */
} tkid;

/* A node's literal children are split over nbuckets buckets by bits 16..31
 * of the tag; each bucket is an immutable open-addressing table (linear
 * probing from tag & (cap - 1), load <= 0.5), shared by every version of
 * the node it did not change. Why buckets and not one flat table: a copy
 * must take a reference on every child it shares, touching each child's
 * memory, and releasing the old version touches them again; with 10,000
 * children under one node that made each subscribe cost ~150 us. With
 * about sqrt(nkids) buckets a change copies the bucket array (one
 * reference per bucket) and rebuilds one bucket (one per child in it):
 * O(sqrt(nkids)) instead of O(nkids). */
typedef struct tbucket {
    uint32_t refs;  /* node versions holding it; writer-only */
    uint32_t nkids;
    uint32_t cap;   /* slots: a power of two >= 2 * nkids */
    tkid slots[];
} tbucket;

struct tnode {
    uint32_t refs;     /* buckets, '*' parents and snapshots holding it;
                        * writer-only */
    uint32_t nkids;    /* literal children */
    uint32_t nbuckets; /* 0 (no children) or a power of two */
    uint32_t nexact;   /* items whose pattern ends here */
    uint32_t nrest;    /* items whose pattern ends here with '>' */
    uint32_t seglen;
    tnode *star;       /* the '*' child */
    tbucket **buckets; /* the rest point into this node's block; a bucket
                        * may be NULL (empty) */
    void **exact;
    void **rest;
    char *seg;         /* this node's segment (not NUL-terminated; empty
                        * for the root and '*' children) */
};

/* One segment of a topic or pattern being walked or edited. */
typedef struct tseg {
    const char *p;
    uint32_t len;
    uint32_t tag; /* low bits of bus__hash(p, len) */
} tseg;

static inline uint32_t
bucket_index(uint32_t tag, uint32_t nbuckets)
{
    /* Bits 16..31: independent of the slot bits (the low ones) for
     * buckets of up to 2^16 slots and up to 2^16 buckets. */
    return (tag >> 16) & (nbuckets - 1);
}

static size_t
bucket_size(uint32_t cap)
{
    return sizeof(tbucket) + (size_t)cap * sizeof(tkid);
}

static size_t
node_size_for(uint32_t nbuckets, uint32_t nitems, uint32_t seglen)
{
    return sizeof(tnode) + (size_t)nbuckets * sizeof(tbucket *)
         + (size_t)nitems * sizeof(void *) + seglen;
}

static size_t
node_size(const tnode *n)
{
    return node_size_for(n->nbuckets, n->nexact + n->nrest, n->seglen);
}

static void node_unref(tnode *n);

static void
bucket_unref(tbucket *b)
{
    uint32_t i;

    if (b == NULL)
        return;
    assert(b->refs > 0 && "trie bucket refcount underflow");
    if (--b->refs > 0)
        return;
    for (i = 0; i < b->cap; i++)
        node_unref(b->slots[i].node);
    bus__free(b, bucket_size(b->cap));
}

/* Drops one reference; frees n and, recursively, what it was the last to
 * hold. Recursion depth is bounded by BUS_TOPIC_MAX_SEGMENTS + 1 nodes. */
static void
node_unref(tnode *n)
{
    uint32_t i;

    if (n == NULL)
        return;
    assert(n->refs > 0 && "trie node refcount underflow");
    if (--n->refs > 0)
        return;
    for (i = 0; i < n->nbuckets; i++)
        bucket_unref(n->buckets[i]);
    node_unref(n->star);
    bus__free(n, node_size(n));
}

static inline tnode *
node_kid(const tnode *n, const tseg *s)
{
    const tbucket *b;
    uint32_t mask, i;

    if (n->nkids == 0)
        return NULL;
    if ((b = n->buckets[bucket_index(s->tag, n->nbuckets)]) == NULL)
        return NULL;
    mask = b->cap - 1;
    /* Terminates: load <= 0.5 leaves an empty slot. */
    for (i = s->tag & mask;; i = (i + 1) & mask) {
        const tkid *k = &b->slots[i];

        if (k->node == NULL)
            return NULL;
        if (k->tag == s->tag && k->len == s->len
            && memcmp(k->node->seg, s->p, s->len) == 0)
            return k->node;
    }
}

static void
kid_insert(tbucket *b, uint32_t tag, uint32_t len, tnode *node)
{
    uint32_t mask = b->cap - 1, i = tag & mask;

    while (b->slots[i].node != NULL)
        i = (i + 1) & mask;
    b->slots[i].tag = tag;
    b->slots[i].len = len;
    b->slots[i].node = node;
}

/* An empty bucket for nkids children (refs 1), or NULL on ENOMEM. */
static tbucket *
bucket_new(uint32_t nkids)
{
    uint32_t cap = 2;
    tbucket *b;

    while (cap < nkids * 2)
        cap *= 2;
    if ((b = bus__alloc(bucket_size(cap))) == NULL)
        return NULL;
    b->refs = 1;
    b->nkids = nkids;
    b->cap = cap;
    memset(b->slots, 0, (size_t)cap * sizeof(tkid));
    return b;
}

/* Buckets for nkids children: 1 up to 32 children, then the smallest
 * power of two nb with 2 * nb^2 >= nkids (10,000 children: 128 buckets of
 * ~78), balancing the bucket array copy against the bucket rebuild. */
static uint32_t
buckets_for(uint32_t nkids)
{
    uint32_t nb = 1;

    if (nkids == 0)
        return 0;
    if (nkids <= 32)
        return 1;
    while ((uint64_t)nb * nb * 2 < nkids)
        nb *= 2;
    return nb;
}

/* Keeps the old bucket count until it is too small, or four times too
 * large, so that adding and removing around a threshold does not
 * redistribute every child each time. */
static uint32_t
buckets_keep(uint32_t old_nb, uint32_t nkids)
{
    uint32_t want = buckets_for(nkids);

    if (want == 0 || old_nb == 0 || want > old_nb || want * 4 <= old_nb)
        return want;
    return old_nb;
}

/* The change node_copy applies to the copy. */
enum { EDIT_EXACT, EDIT_REST, EDIT_STAR, EDIT_KID };

typedef struct tedit {
    int what;
    void *item;      /* EXACT/REST: the item to append (when del < 0) */
    int64_t del;     /* EXACT/REST: index of the item to drop, or -1 */
    const tseg *key; /* KID: the segment of the child */
    tnode *old_kid;  /* KID: old's child for key, or NULL */
    tnode *kid;      /* STAR/KID: the new child (a reference this copy
                      * takes), or NULL to drop the old one */
} tedit;

static inline bool
edit_drops(const tedit *e, const tnode *k)
{
    return e->what == EDIT_KID && k == e->old_kid;
}

/* *out = a copy of bucket ob (NULL: empty) with e's child change, or NULL
 * when it ends up empty. Takes a reference on each child it shares.
 * BUS_OK or BUS_ENOMEM (nothing changed). */
static int
bucket_copy(const tbucket *ob, const tedit *e, tbucket **out)
{
    uint32_t n = (ob ? ob->nkids : 0) + (e->kid != NULL)
               - (e->old_kid != NULL);
    uint32_t i;
    tbucket *b;

    *out = NULL;
    if (n == 0)
        return BUS_OK;
    if ((b = bucket_new(n)) == NULL)
        return BUS_ENOMEM;
    for (i = 0; ob != NULL && i < ob->cap; i++) {
        const tkid *k = &ob->slots[i];

        if (k->node != NULL && !edit_drops(e, k->node)) {
            kid_insert(b, k->tag, k->len, k->node);
            k->node->refs++;
        }
    }
    if (e->kid != NULL)
        kid_insert(b, e->key->tag, e->key->len, e->kid);
    *out = b;
    return BUS_OK;
}

/* Fills n's buckets (n->nbuckets of them) from old's children with e
 * applied, sharing every bucket of old that e does not touch. The bucket
 * count is unchanged: one bucket at most is rebuilt. */
static int
kids_patch(tnode *n, const tnode *old, const tedit *e)
{
    uint32_t nb = n->nbuckets, skip = nb, i;
    int rv;

    memcpy(n->buckets, old->buckets, (size_t)nb * sizeof(tbucket *));
    if (e->what == EDIT_KID) {
        skip = bucket_index(e->key->tag, nb);
        rv = bucket_copy(old->buckets[skip], e, &n->buckets[skip]);
        if (rv != BUS_OK)
            return rv;
    }
    for (i = 0; i < nb; i++)
        if (i != skip && n->buckets[i] != NULL)
            n->buckets[i]->refs++;
    return BUS_OK;
}

/* Fills n's buckets from old's children (old may be NULL) with e applied,
 * redistributing all of them (the bucket count changed). Allocates every
 * bucket before taking any reference, so a failure leaves nothing to
 * undo. BUS_OK or BUS_ENOMEM. */
static int
kids_rebuild(tnode *n, const tnode *old, const tedit *e)
{
    uint32_t nb = n->nbuckets, i, j;
    uint32_t *cnt;
    int rv = BUS_OK;

    if ((cnt = bus__alloc((size_t)nb * sizeof(uint32_t))) == NULL)
        return BUS_ENOMEM;
    memset(cnt, 0, (size_t)nb * sizeof(uint32_t));
    for (i = 0; old != NULL && i < old->nbuckets; i++) {
        const tbucket *ob = old->buckets[i];

        for (j = 0; ob != NULL && j < ob->cap; j++)
            if (ob->slots[j].node != NULL
                && !edit_drops(e, ob->slots[j].node))
                cnt[bucket_index(ob->slots[j].tag, nb)]++;
    }
    if (e->what == EDIT_KID && e->kid != NULL)
        cnt[bucket_index(e->key->tag, nb)]++;
    for (i = 0; i < nb; i++) {
        n->buckets[i] = NULL;
        if (cnt[i] > 0 && (n->buckets[i] = bucket_new(cnt[i])) == NULL)
            rv = BUS_ENOMEM;
    }
    bus__free(cnt, (size_t)nb * sizeof(uint32_t));
    if (rv != BUS_OK) {
        for (i = 0; i < nb; i++)
            if (n->buckets[i] != NULL)
                bus__free(n->buckets[i], bucket_size(n->buckets[i]->cap));
        return rv;
    }
    for (i = 0; old != NULL && i < old->nbuckets; i++) {
        const tbucket *ob = old->buckets[i];

        for (j = 0; ob != NULL && j < ob->cap; j++) {
            const tkid *k = &ob->slots[j];

            if (k->node != NULL && !edit_drops(e, k->node)) {
                kid_insert(n->buckets[bucket_index(k->tag, nb)], k->tag,
                           k->len, k->node);
                k->node->refs++;
            }
        }
    }
    if (e->what == EDIT_KID && e->kid != NULL)
        kid_insert(n->buckets[bucket_index(e->key->tag, nb)], e->key->tag,
                   e->key->len, e->kid);
    return BUS_OK;
}

/* Copies an item list of n into dst with e's change if it applies to it
 * (dst has room for the result). */
static void
items_copy(void **dst, void *const *src, uint32_t n, const tedit *e,
           int what)
{
    size_t del;

    if (e->what != what || e->del < 0) {
        if (n > 0)
            memcpy(dst, src, n * sizeof(void *));
        if (e->what == what)
            dst[n] = e->item;
        return;
    }
    del = (size_t)e->del;
    memcpy(dst, src, del * sizeof(void *));
    memcpy(dst + del, src + del + 1, (n - del - 1) * sizeof(void *));
}

/* *out = a new node (refs 1) equal to old (NULL: an empty node) with e
 * applied, labelled seg. It takes a reference on every bucket (or child)
 * it shares with old; e->kid's reference passes to it. *out is NULL, and
 * nothing allocated, when the result would be empty (pruned). old is
 * unchanged. BUS_OK or BUS_ENOMEM (nothing changed). */
static int
node_copy(const tnode *old, const char *seg, uint32_t seglen,
          const tedit *e, tnode **out)
{
    uint32_t nexact = old ? old->nexact : 0;
    uint32_t nrest = old ? old->nrest : 0;
    uint32_t nkids = old ? old->nkids : 0;
    uint32_t old_nb = old ? old->nbuckets : 0;
    tnode *star = old ? old->star : NULL;
    uint32_t nb;
    tnode *n;
    char *p;
    int rv;

    *out = NULL;
    switch (e->what) {
    case EDIT_EXACT:
        nexact = e->del < 0 ? nexact + 1 : nexact - 1;
        break;
    case EDIT_REST:
        nrest = e->del < 0 ? nrest + 1 : nrest - 1;
        break;
    case EDIT_STAR:
        star = e->kid;
        break;
    default:
        nkids = nkids + (e->kid != NULL) - (e->old_kid != NULL);
        break;
    }
    if (nkids == 0 && star == NULL && nexact == 0 && nrest == 0)
        return BUS_OK; /* pruned */
    if (nexact >= UINT32_MAX / 2 || nrest >= UINT32_MAX / 2
        || nkids >= UINT32_MAX / 2)
        return BUS_ENOMEM; /* counts must fit (not reachable in practice) */
    nb = buckets_keep(old_nb, nkids);
    if ((n = bus__alloc(node_size_for(nb, nexact + nrest, seglen))) == NULL)
        return BUS_ENOMEM;

    p = (char *)(n + 1);
    n->refs = 1;
    n->nkids = nkids;
    n->nbuckets = nb;
    n->nexact = nexact;
    n->nrest = nrest;
    n->seglen = seglen;
    n->star = star;
    n->buckets = (tbucket **)p;
    p += (size_t)nb * sizeof(tbucket *);
    n->exact = (void **)p;
    p += (size_t)nexact * sizeof(void *);
    n->rest = (void **)p;
    p += (size_t)nrest * sizeof(void *);
    n->seg = p;
    if (seglen > 0)
        memcpy(n->seg, seg, seglen);

    if (nb > 0) {
        rv = nb == old_nb ? kids_patch(n, old, e) : kids_rebuild(n, old, e);
        if (rv != BUS_OK) {
            bus__free(n, node_size(n));
            return rv;
        }
    }
    /* Only now, when nothing can fail, take the remaining references. */
    items_copy(n->exact, old ? old->exact : NULL, old ? old->nexact : 0, e,
               EDIT_EXACT);
    items_copy(n->rest, old ? old->rest : NULL, old ? old->nrest : 0, e,
               EDIT_REST);
    if (star != NULL && e->what != EDIT_STAR)
        star->refs++;
    *out = n;
    return BUS_OK;
}

static bool
seg_wild(const tseg *s, char c)
{
    return s->len == 1 && s->p[0] == c;
}

/* Splits a valid topic or pattern of len bytes into segs (with their
 * hash tags); returns the count, 0 when there are too many. */
static uint32_t
segs_split(const char *s, size_t len, tseg *segs)
{
    const char *end = s + len;
    uint32_t n = 0;

    for (;;) {
        const char *dot = memchr(s, '.', (size_t)(end - s));
        const char *e = dot ? dot : end;

        if (n == BUS_TOPIC_MAX_SEGMENTS)
            return 0;
        segs[n].p = s;
        segs[n].len = (uint32_t)(e - s);
        segs[n].tag = (uint32_t)bus__hash(s, (size_t)(e - s));
        n++;
        if (dot == NULL)
            return n;
        s = dot + 1;
    }
}

/* *out = the copy of n (NULL: absent), the node reached by segs[0..i)
 * and labelled seg, with item added to or removed from the node of
 * segs[0..nseg). BUS_OK, BUS_ENOTFOUND (remove: no such entry),
 * BUS_ENOMEM; on error nothing is left allocated and no refcount changed.
 * Recursion depth: at most BUS_TOPIC_MAX_SEGMENTS + 1. */
static int
node_edit(tnode *n, const tseg *segs, uint32_t nseg, uint32_t i, bool add,
          void *item, const char *seg, uint32_t seglen, tnode **out)
{
    tedit e = {.del = -1};
    tnode *old_kid;
    const char *kseg = NULL;
    uint32_t kseglen = 0;
    int rv;

    *out = NULL;
    if (i == nseg || seg_wild(&segs[i], '>')) {
        void **list = NULL;
        uint32_t cnt = 0, j;

        e.what = i == nseg ? EDIT_EXACT : EDIT_REST;
        if (n != NULL) {
            list = e.what == EDIT_EXACT ? n->exact : n->rest;
            cnt = e.what == EDIT_EXACT ? n->nexact : n->nrest;
        }
        if (add) {
            e.item = item;
        } else {
            /* Drop the last occurrence: the others keep their order. */
            for (j = cnt; j > 0 && list[j - 1] != item; j--)
                ;
            if (j == 0)
                return BUS_ENOTFOUND;
            e.del = j - 1;
        }
        return node_copy(n, seg, seglen, &e, out);
    }
    if (seg_wild(&segs[i], '*')) {
        e.what = EDIT_STAR;
        old_kid = n ? n->star : NULL;
    } else {
        e.what = EDIT_KID;
        e.key = &segs[i];
        e.old_kid = old_kid = n ? node_kid(n, &segs[i]) : NULL;
        kseg = segs[i].p;
        kseglen = segs[i].len;
    }
    if (old_kid == NULL && !add)
        return BUS_ENOTFOUND;
    rv = node_edit(old_kid, segs, nseg, i + 1, add, item, kseg, kseglen,
                   &e.kid);
    if (rv != BUS_OK)
        return rv;
    if ((rv = node_copy(n, seg, seglen, &e, out)) != BUS_OK)
        node_unref(e.kid); /* frees the new path, unshares the rest */
    return rv;
}

/* ---- Walking ------------------------------------------------------------- */

typedef struct twalk {
    void **buf;
    size_t cap;
    size_t n; /* items matched so far, including those past cap */
} twalk;

static inline void
walk_emit(twalk *w, void *const *items, uint32_t cnt)
{
    if (cnt == 0)
        return;
    if (w->n < w->cap) {
        size_t room = w->cap - w->n;

        memcpy(w->buf + w->n, items,
               (cnt < room ? cnt : room) * sizeof(void *));
    }
    w->n += cnt;
}

/* Emits the items of n's subtree matching segs[i..nseg). Order: at each
 * node, '>' items, then the '*' branch, then the literal branch; at the
 * end, exact items. Deterministic for a snapshot, as topic.h promises. */
static void
walk(const tnode *n, const tseg *segs, uint32_t nseg, uint32_t i, twalk *w)
{
    for (;;) {
        if (i == nseg) {
            walk_emit(w, n->exact, n->nexact);
            return;
        }
        /* segs[i] exists, so '>' here has its one or more segments. */
        walk_emit(w, n->rest, n->nrest);
        if (n->star != NULL)
            walk(n->star, segs, nseg, i + 1, w);
        if ((n = node_kid(n, &segs[i])) == NULL)
            return;
        i++;
    }
}

/* ---- Snapshots and the topic cache --------------------------------------- */

#define CACHE_PROBE 8          /* slots searched from hash & mask */
#define CACHE_MAX_CAP (1u << 24)

/* A cached result, one allocation: header, count items, then the topic. */
typedef struct tcentry {
    uint64_t hash;
    uint32_t len;
    uint32_t count;
    void *items[];
} tcentry;

typedef _Atomic(tcentry *) tcslot;

struct bus__tindex {
    tnode *root;             /* NULL when empty */
    size_t size;             /* (pattern, item) entries */
    uint32_t cache_cap;      /* slots: 0 (no cache) or a power of two */
    uint32_t cache_win;      /* slots probed: min(cache_cap, CACHE_PROBE) */
    _Atomic(tcslot *) slots; /* allocated on the first miss; then fixed */
    atomic_size_t cache_bytes; /* entry bytes reserved, for the budget */
};

static size_t
cache_entry_size(size_t count, size_t len)
{
    return sizeof(tcentry) + count * sizeof(void *) + len;
}

/* Bytes all entries of one snapshot may take: plenty for topics matching
 * a few items each (an entry is ~64 bytes then), while a few topics that
 * each match thousands of items cannot blow the memory up cache_cap-fold. */
static size_t
cache_budget(uint32_t cap)
{
    return 65536 + (size_t)cap * 512;
}

static inline const char *
cache_topic(const tcentry *e)
{
    return (const char *)(e->items + e->count);
}

/* Equality of len bytes, inlined: topics are short, and a call to memcmp
 * is a noticeable part of a cache hit. Word compares, the last one
 * overlapping the previous when len is not a multiple of 8. */
TOPIC_HOT bool
bytes_eq(const char *a, const char *b, size_t len)
{
    uint64_t x, y;
    uint32_t u, v;
    size_t i;

    if (len >= 8) {
        for (i = 0; i + 8 < len; i += 8) {
            memcpy(&x, a + i, 8);
            memcpy(&y, b + i, 8);
            if (x != y)
                return false;
        }
        memcpy(&x, a + len - 8, 8);
        memcpy(&y, b + len - 8, 8);
        return x == y;
    }
    if (len >= 4) {
        memcpy(&u, a, 4);
        memcpy(&v, b, 4);
        if (u != v)
            return false;
        memcpy(&u, a + len - 4, 4);
        memcpy(&v, b + len - 4, 4);
        return u == v;
    }
    for (i = 0; i < len; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

TOPIC_HOT bool
cache_entry_is(const tcentry *e, uint64_t h, const char *topic, size_t len)
{
    return e->hash == h && e->len == len
        && bytes_eq(cache_topic(e), topic, len);
}

bus__tindex *
bus__tindex_new(uint32_t cache_cap)
{
    bus__tindex *t;
    uint32_t cap = 0;

    if (cache_cap > 0) {
        if (cache_cap > CACHE_MAX_CAP)
            cache_cap = CACHE_MAX_CAP;
        for (cap = 1; cap < cache_cap; cap *= 2)
            ;
    }
    if ((t = bus__alloc(sizeof(*t))) == NULL)
        return NULL;
    t->root = NULL;
    t->size = 0;
    t->cache_cap = cap;
    t->cache_win = cap < CACHE_PROBE ? cap : CACHE_PROBE;
    atomic_init(&t->slots, NULL);
    atomic_init(&t->cache_bytes, 0);
    return t;
}

static int
tindex_change(bus__tindex *t, const char *pattern, void *item, bool add,
              bus__tindex **out)
{
    tseg segs[BUS_TOPIC_MAX_SEGMENTS];
    bus__tindex *nt;
    uint32_t nseg;
    int rv;

    *out = NULL;
    if (bus__topic_check(pattern, true, NULL, 0) != BUS_OK)
        return BUS_EINVAL;
    nseg = segs_split(pattern, strlen(pattern), segs);
    assert(nseg > 0);
    if (!add && t->root == NULL)
        return BUS_ENOTFOUND;
    if ((nt = bus__tindex_new(t->cache_cap)) == NULL)
        return BUS_ENOMEM;
    rv = node_edit(t->root, segs, nseg, 0, add, item, NULL, 0, &nt->root);
    if (rv != BUS_OK) {
        bus__tindex_release(nt);
        return rv;
    }
    nt->size = add ? t->size + 1 : t->size - 1;
    *out = nt;
    return BUS_OK;
}

int
bus__tindex_add(bus__tindex *t, const char *pattern, void *item,
                bus__tindex **out)
{
    return tindex_change(t, pattern, item, true, out);
}

int
bus__tindex_remove(bus__tindex *t, const char *pattern, void *item,
                   bus__tindex **out)
{
    return tindex_change(t, pattern, item, false, out);
}

void
bus__tindex_release(bus__tindex *t)
{
    tcslot *slots;
    uint32_t i;

    if (t == NULL)
        return;
    node_unref(t->root);
    /* acquire: we read the entries' fields below; pairs with the release
     * CASes that published them (the caller's grace period normally
     * orders them before this call already). */
    slots = atomic_load_explicit(&t->slots, memory_order_acquire);
    if (slots != NULL) {
        for (i = 0; i < t->cache_cap; i++) {
            tcentry *e = atomic_load_explicit(&slots[i], memory_order_acquire);

            if (e != NULL)
                bus__free(e, cache_entry_size(e->count, e->len));
        }
        bus__free(slots, (size_t)t->cache_cap * sizeof(tcslot));
    }
    bus__free(t, sizeof(*t));
}

size_t
bus__tindex_size(const bus__tindex *t)
{
    return t->size;
}

size_t
bus__tindex_match(const bus__tindex *t, const char *topic, size_t len,
                  void **buf, size_t cap)
{
    tseg segs[BUS_TOPIC_MAX_SEGMENTS];
    twalk w = {buf, cap, 0};
    uint32_t nseg;

    if (t->root == NULL || len == 0)
        return 0;
    if ((nseg = segs_split(topic, len, segs)) == 0)
        return 0; /* more segments than any pattern can match */
    walk(t->root, segs, nseg, 0, &w);
    return w.n;
}

/* The snapshot's slot table, allocating it on first use. NULL on ENOMEM
 * (the lookup then goes uncached). */
static tcslot *
cache_slots(bus__tindex *t)
{
    tcslot *s, *cur = NULL;
    uint32_t i;

    if ((s = bus__alloc((size_t)t->cache_cap * sizeof(tcslot))) == NULL)
        return NULL;
    for (i = 0; i < t->cache_cap; i++)
        atomic_init(&s[i], NULL);
    /* acq_rel: release publishes the initialised slots to readers that
     * load t->slots with acquire; on failure, acquire makes the winner's
     * initialisation visible to us. */
    if (atomic_compare_exchange_strong_explicit(&t->slots, &cur, s,
                                                memory_order_acq_rel,
                                                memory_order_acquire))
        return s;
    bus__free(s, (size_t)t->cache_cap * sizeof(tcslot));
    return cur;
}

/* Caches the result of a miss (n items, the first min(n, cap) in buf).
 * Returns the entry to use (ours or an equal one another thread inserted
 * first), or NULL when the result was not cached (window full, budget
 * spent, ENOMEM). */
static tcentry *
cache_insert(bus__tindex *t, tcslot *slots, uint64_t h, const char *topic,
             size_t len, void **buf, size_t cap, size_t n)
{
    size_t size = cache_entry_size(n, len);
    uint32_t mask = t->cache_cap - 1, win = t->cache_win, p;
    tcentry *e;

    if (n > UINT32_MAX)
        return NULL;
    if (slots == NULL && (slots = cache_slots(t)) == NULL)
        return NULL;
    /* A full window (the cache is full around h) is the steady state for
     * topics that did not fit: do not allocate an entry just to free it. */
    for (p = 0; p < win; p++)
        if (atomic_load_explicit(&slots[(h + p) & mask],
                                 memory_order_relaxed)
            == NULL)
            break;
    if (p == win)
        return NULL;
    /* relaxed: a budget counter; no data is published through it. */
    if (atomic_fetch_add_explicit(&t->cache_bytes, size, memory_order_relaxed)
            + size
        > cache_budget(t->cache_cap))
        goto unreserve;
    if ((e = bus__alloc(size)) == NULL)
        goto unreserve;
    e->hash = h;
    e->len = (uint32_t)len;
    e->count = (uint32_t)n;
    if (n <= cap) {
        if (n > 0)
            memcpy(e->items, buf, n * sizeof(void *));
    } else {
        bus__tindex_match(t, topic, len, e->items, n);
    }
    memcpy(e->items + n, topic, len);

    for (p = 0; p < win; p++) {
        tcslot *s = &slots[(h + p) & mask];
        /* acquire: if the slot holds an entry, we read its fields. */
        tcentry *cur = atomic_load_explicit(s, memory_order_acquire);

        /* acq_rel on success: the release publishes e's contents to
         * readers loading the slot with acquire. acquire on failure: cur
         * is another thread's entry whose fields we compare. */
        if (cur == NULL
            && atomic_compare_exchange_strong_explicit(s, &cur, e,
                                                       memory_order_acq_rel,
                                                       memory_order_acquire))
            return e;
        if (cache_entry_is(cur, h, topic, len)) {
            /* Another reader cached this topic first; same snapshot,
             * same result: use theirs. */
            bus__free(e, size);
            atomic_fetch_sub_explicit(&t->cache_bytes, size,
                                      memory_order_relaxed);
            return cur;
        }
    }
    bus__free(e, size); /* window full: this topic stays uncached */
unreserve:
    atomic_fetch_sub_explicit(&t->cache_bytes, size, memory_order_relaxed);
    return NULL;
}

/* The cache entry for topic, or NULL; sets *h and *slots for the miss
 * path. The hot path: one hash, usually one probe and one compare. */
TOPIC_HOT tcentry *
cache_find(bus__tindex *t, const char *topic, size_t len, uint64_t *h,
           tcslot **slots)
{
    uint32_t mask, win, p;
    tcentry *e;

    *h = hash_bytes(topic, len);
    /* acquire: pairs with cache_slots' release CAS (initialised slots). */
    *slots = atomic_load_explicit(&t->slots, memory_order_acquire);
    if (*slots == NULL)
        return NULL;
    mask = t->cache_cap - 1;
    win = t->cache_win;
    for (p = 0; p < win; p++) {
        /* acquire: pairs with cache_insert's release CAS, so the entry's
         * fields are visible. */
        e = atomic_load_explicit(&(*slots)[(*h + p) & mask],
                                 memory_order_acquire);
        if (e == NULL)
            return NULL; /* inserts fill the first empty slot: a miss */
        if (cache_entry_is(e, *h, topic, len))
            return e;
    }
    return NULL;
}

/* A miss: walks the trie, then tries to cache the result. */
TOPIC_COLD size_t
lookup_miss(bus__tindex *t, const char *topic, size_t len, uint64_t h,
            tcslot *slots, void **buf, size_t cap, void *const **items)
{
    size_t n = bus__tindex_match(t, topic, len, buf, cap);
    tcentry *e;

    if (t->cache_cap > 0
        && (e = cache_insert(t, slots, h, topic, len, buf, cap, n)) != NULL) {
        *items = e->items;
        return e->count;
    }
    *items = buf;
    return n;
}

size_t
bus__tindex_lookup(bus__tindex *t, const char *topic, size_t len,
                   void **buf, size_t cap, void *const **items)
{
    tcslot *slots = NULL;
    tcentry *e;
    uint64_t h = 0;

    if (t->cache_cap > 0
        && (e = cache_find(t, topic, len, &h, &slots)) != NULL) {
        *items = e->items;
        return e->count;
    }
    return lookup_miss(t, topic, len, h, slots, buf, cap, items);
}

int
bus__tindex_lookup_checked(bus__tindex *t, const char *topic, size_t len,
                           void **buf, size_t cap, void *const **items,
                           size_t *count)
{
    tcslot *slots = NULL;
    tcentry *e;
    uint64_t h = 0;

    /* A hit needs no validation: only valid topics are ever cached (here
     * after the check below; by bus__tindex_lookup's precondition), and
     * the entry holds these very bytes. */
    if (t->cache_cap > 0
        && (e = cache_find(t, topic, len, &h, &slots)) != NULL) {
        *items = e->items;
        *count = e->count;
        return BUS_OK;
    }
    if (topic_check_len(topic, len, false, NULL, 0) != BUS_OK) {
        *items = buf;
        *count = 0;
        return BUS_EINVAL;
    }
    *count = lookup_miss(t, topic, len, h, slots, buf, cap, items);
    return BUS_OK;
}
