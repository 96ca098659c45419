/*
 * bus_event: building, reference counting, getters and setters.
 *
 * Design (see event_impl.h): one block = struct + headers table + payload
 * copy + strings + spare arena. Setters before freezing take room from the
 * arena and fall back to linked overflow chunks, so an event never moves
 * and pointers from getters stay valid until the field is set again or the
 * last reference goes. Once frozen (published) the event is read-only and
 * shared by every holder; the refcount increments relaxed and decrements
 * acq_rel so the destroyer sees every holder's reads done (STYLE.md §9).
 *
 * Block caches (STYLE.md §8: no malloc on the publish path). Event
 * blocks of up to EVC_MAX_BLOCK bytes come from per-thread caches with
 * one free list per size class, carved from EVC_CHUNK-byte chunks got
 * from bus__alloc_chunk (the user's hooks see those). A block records
 * its cache (bus_event.cache). Freed by the thread that owns the cache,
 * a block goes back on the local list (no atomic); freed by another
 * thread (a worker freeing what a publisher made), it is pushed on the
 * cache's per-class remote stack (one CAS, release); the owner takes a
 * whole remote stack with one exchange (acquire) when its local list is
 * empty. So a producer that allocates and a worker that frees never meet
 * in the global allocator, and they share one cache line per class (the
 * remote stack's head), touched once per free and once per refill.
 * A cache outlives its thread: at thread exit (a pthread key destructor)
 * it is put on an orphan list and the next thread that needs a cache
 * adopts it, so blocks still in flight always point at a live cache;
 * caches and their chunks are never freed (the memory stays with the
 * process, at the high-water mark of the events alive per thread).
 * Each block allocation counts as one allocation for fault injection
 * (bus__alloc_fault), cached or not. Under AddressSanitizer, free blocks
 * are poisoned (but the list word), so a use after free is still caught
 * until the block is reused.
 */
#include <stdatomic.h>
#include <string.h>

#include <bus/event.h>

#include "alloc.h"
#include "event_impl.h"
#include "mp.h"
#include "platform.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EVC_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define EVC_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define EVC_POISON(p, n) ((void)(p), (void)(n))
#define EVC_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define EV_MAX_STRING 65535u
#define EV_MAX_HEADERS 65535u
#define EV_DEFAULT_SPARE 96 /* a correlation id and a traceparent fit */
#define EV_MIN_HEADER_CAP 4

struct ev_chunk {
    ev_chunk *next;
    size_t size;
    _Alignas(16) unsigned char data[];
};

static size_t
ev_align(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

/* Takes n bytes (aligned to 8) from the arena or a new overflow chunk. */
static void *
ev_arena_take(bus_event *e, size_t n)
{
    ev_chunk *c;
    size_t need = ev_align(n, 8);
    size_t csize;
    void *p;

    size_t pad = (size_t)(-(uintptr_t)e->arena & 7u); /* align to 8 */

    if (e->arena_left >= pad && e->arena_left - pad >= need) {
        p = e->arena + pad;
        e->arena += pad + need;
        e->arena_left -= pad + need;
        return p;
    }
    csize = sizeof(ev_chunk) + (need > 256 ? need : 256);
    if ((c = bus__alloc(csize)) == NULL)
        return NULL;
    c->next = e->chunks;
    c->size = csize;
    e->chunks = c;
    /* The rest of the chunk becomes the arena; the old arena's remainder
     * is abandoned (it is small by construction). */
    e->arena = (char *)c->data + need;
    e->arena_left = csize - sizeof(ev_chunk) - need;
    return c->data;
}

static char *
ev_arena_str(bus_event *e, const char *s, size_t len)
{
    char *d = ev_arena_take(e, len + 1);

    if (d != NULL) {
        if (len > 0)
            memcpy(d, s, len);
        d[len] = '\0';
    }
    return d;
}

/* ---- Block caches (see the top) ---- */

#define EVC_MIN_SHIFT 8 /* classes of 256, 512, ..., EVC_MAX_BLOCK bytes */
#define EVC_CLASSES 5
#define EVC_MAX_BLOCK ((size_t)1 << (EVC_MIN_SHIFT + EVC_CLASSES - 1))
#define EVC_CHUNK ((size_t)64 * 1024)
#define EVC_HDR 64 /* chunk header: keeps blocks 64-byte aligned */

typedef struct evc_block {
    struct evc_block *next;
} evc_block;

typedef struct evc_chunk {
    struct evc_chunk *next;
} evc_chunk;

struct ev_cache {
    /* Pushed by other threads: one line per class. */
    struct {
        _Alignas(BUS_CACHELINE) _Atomic(evc_block *) head;
    } remote[EVC_CLASSES];
    /* The owner's. */
    _Alignas(BUS_CACHELINE) evc_block *local[EVC_CLASSES];
    evc_chunk *chunks;
    ev_cache *next_all;    /* evc_all, under evc_lock */
    ev_cache *next_orphan; /* evc_orphans, under evc_lock */
};

static BUS__TLS ev_cache *evc_mine;
static atomic_flag evc_lock = ATOMIC_FLAG_INIT; /* thread start/exit only */
static ev_cache *evc_all;     /* every cache: they are never freed */
static ev_cache *evc_orphans; /* caches of exited threads */
static bus__tls evc_key;
static bool evc_key_ok;

static void
evc_lock_take(void)
{
    while (atomic_flag_test_and_set_explicit(&evc_lock,
                                             memory_order_acquire))
        bus__thread_yield();
}

static void
evc_lock_give(void)
{
    atomic_flag_clear_explicit(&evc_lock, memory_order_release);
}

/* Thread exit: the cache goes to the orphans, blocks and all. The thread
 * forgets it, so frees it still makes (later destructors) are remote. */
static void
evc_orphan(void *arg)
{
    ev_cache *c = arg;

    evc_mine = NULL;
    evc_lock_take();
    c->next_orphan = evc_orphans;
    evc_orphans = c;
    evc_lock_give();
}

/* The calling thread's cache: an orphan adopted, or a new one; NULL when
 * out of memory or no thread-exit hook could be set. */
static ev_cache *
evc_attach(void)
{
    ev_cache *c;
    void *mem;

    evc_lock_take();
    if (!evc_key_ok)
        evc_key_ok = bus__tls_create(&evc_key, evc_orphan) == BUS_OK;
    if (!evc_key_ok) {
        evc_lock_give();
        return NULL;
    }
    if ((c = evc_orphans) != NULL) {
        evc_orphans = c->next_orphan;
    } else if ((mem = bus__alloc_chunk(sizeof(*c) + BUS_CACHELINE))
               != NULL) {
        c = (ev_cache *)(((uintptr_t)mem + BUS_CACHELINE - 1)
                         & ~(uintptr_t)(BUS_CACHELINE - 1));
        memset(c, 0, sizeof(*c));
        c->next_all = evc_all;
        evc_all = c;
    }
    evc_lock_give();
    if (c != NULL) {
        bus__tls_set(&evc_key, c);
        evc_mine = c;
    }
    return c;
}

static int
evc_class(size_t size)
{
    int k = 0;

    while (((size_t)1 << (EVC_MIN_SHIFT + k)) < size)
        k++;
    return k;
}

/* Carves a new chunk into class k's local list. @thread owner. */
static evc_block *
evc_refill(ev_cache *c, int k)
{
    size_t bs = (size_t)1 << (EVC_MIN_SHIFT + k);
    size_t n = (EVC_CHUNK - EVC_HDR) / bs, i;
    evc_chunk *ch = bus__alloc_chunk(EVC_CHUNK);
    char *base;

    if (ch == NULL)
        return NULL;
    ch->next = c->chunks;
    c->chunks = ch;
    base = (char *)ch + EVC_HDR;
    for (i = 0; i < n; i++) {
        evc_block *b = (evc_block *)(void *)(base + i * bs);
        b->next = i + 1 < n ? (evc_block *)(void *)(base + (i + 1) * bs)
                            : NULL;
        EVC_POISON((char *)b + sizeof(*b), bs - sizeof(*b));
    }
    return (evc_block *)(void *)base;
}

/* A block of at least *size bytes (*size is raised to what the block
 * holds); *cache gets its cache, NULL when it comes from bus__alloc.
 * NULL on (injected) allocation failure. */
static void *
evc_alloc(size_t *size, ev_cache **cache)
{
    ev_cache *c;
    evc_block *b;
    int k;

    *cache = NULL;
    if (*size > EVC_MAX_BLOCK)
        return bus__alloc(*size);
    if (bus__alloc_fault())
        return NULL;
    if ((c = evc_mine) == NULL && (c = evc_attach()) == NULL)
        return bus__alloc_chunk(*size); /* counted above already */
    k = evc_class(*size);
    if ((b = c->local[k]) == NULL) {
        /* acquire: pairs with the remote frees' release, so their
         * writes to the blocks happen-before our reuse. */
        b = atomic_exchange_explicit(&c->remote[k].head, NULL,
                                     memory_order_acquire);
        if (b == NULL && (b = evc_refill(c, k)) == NULL)
            return NULL;
    }
    c->local[k] = b->next;
    *size = (size_t)1 << (EVC_MIN_SHIFT + k);
    EVC_UNPOISON(b, *size);
    *cache = c;
    return b;
}

static void
evc_free(void *p, size_t size, ev_cache *c)
{
    evc_block *b = p, *head;
    int k;

    if (c == NULL) {
        bus__free(p, size);
        return;
    }
    k = evc_class(size);
    EVC_POISON((char *)b + sizeof(*b), size - sizeof(*b));
    if (c == evc_mine) {
        b->next = c->local[k];
        c->local[k] = b;
        return;
    }
    /* release: our use of the block happens-before the owner's reuse. */
    head = atomic_load_explicit(&c->remote[k].head, memory_order_relaxed);
    do {
        b->next = head;
    } while (!atomic_compare_exchange_weak_explicit(
        &c->remote[k].head, &head, b, memory_order_release,
        memory_order_relaxed));
}

int
bus__event_build(bus_event **out, const bus__event_spec *s)
{
    size_t hcap = s->n_headers < EV_MIN_HEADER_CAP ? EV_MIN_HEADER_CAP
                                                   : s->n_headers;
    bool copy_payload = s->payload_free == NULL && !s->adopt_static;
    size_t off_headers, off_payload, off_strings, strings, size, i;
    ev_cache *cache;
    int64_t now;
    bus_event *e;
    char *sp;

    *out = NULL;
    strings = s->type.len + 1 + (s->stream.p ? s->stream.len + 1 : 0);
    for (i = 0; i < s->n_headers; i++)
        strings += s->hkeys[i].len + 1 + s->hvals[i].len + 1;
    off_headers = ev_align(sizeof(bus_event), 16);
    off_payload = ev_align(off_headers + hcap * sizeof(ev_header), 16);
    off_strings = off_payload + (copy_payload ? s->payload_len : 0);
    size = ev_align(off_strings + strings + s->spare, 16);

    if ((e = evc_alloc(&size, &cache)) == NULL) {
        if (s->payload_free != NULL)
            s->payload_free((void *)s->payload, s->payload_hint);
        return BUS_ENOMEM;
    }
    atomic_init(&e->refs, 1);
    atomic_init(&e->frozen, false);
    e->flags = 0;
    e->pad_ = 0;
    e->block_size = size; /* the whole block: the rest is arena */
    e->cache = cache;
    e->chunks = NULL;
    e->schema_version = s->schema_version ? s->schema_version : 1;
    e->stream_version = s->stream_version;
    e->position = s->position;
    /* One clock reading for both the id and the timestamp. */
    now = s->id == NULL || s->timestamp == 0 ? bus__clock_real_ns() : 0;
    if (s->id != NULL)
        e->id = *s->id;
    else
        bus__uuid_v7_at(&e->id, now);
    e->timestamp = s->timestamp ? s->timestamp : now;

    e->headers = (ev_header *)(void *)((char *)e + off_headers);
    e->cap_headers = (uint32_t)hcap;
    e->n_headers = (uint32_t)s->n_headers;
    if (copy_payload) {
        uint8_t *p = (uint8_t *)e + off_payload;
        if (s->payload_len > 0)
            memcpy(p, s->payload, s->payload_len);
        e->payload = p;
        e->payload_free = NULL;
        e->payload_hint = NULL;
        e->payload_owner = NULL;
    } else {
        e->payload = s->payload;
        e->payload_free = s->payload_free;
        e->payload_hint = s->payload_hint;
        e->payload_owner = NULL;
    }
    e->payload_len = s->payload_len;

    sp = (char *)e + off_strings;
#define EV_PUT(dst, str)                                                   \
    do {                                                                   \
        (dst) = sp;                                                        \
        if ((str).len > 0)                                                 \
            memcpy(sp, (str).p, (str).len);                                \
        sp[(str).len] = '\0';                                              \
        sp += (str).len + 1;                                               \
    } while (0)
    EV_PUT(e->type, s->type);
    e->type_len = (uint32_t)s->type.len;
    if (s->stream.p != NULL) {
        EV_PUT(e->stream, s->stream);
        e->stream_len = (uint32_t)s->stream.len;
    } else {
        e->stream = NULL;
        e->stream_len = 0;
    }
    for (i = 0; i < s->n_headers; i++) {
        EV_PUT(e->headers[i].key, s->hkeys[i]);
        EV_PUT(e->headers[i].value, s->hvals[i]);
        e->headers[i].klen = (uint32_t)s->hkeys[i].len;
        e->headers[i].vlen = (uint32_t)s->hvals[i].len;
    }
#undef EV_PUT
    e->topic = NULL;
    e->topic_len = 0;
    e->arena = sp;
    e->arena_left = (size_t)((char *)e + size - sp);
    *out = e;
    return BUS_OK;
}

static int
ev_check_str(const char *s, size_t *len, bool allow_empty)
{
    size_t n = strlen(s);

    if (n == 0 && !allow_empty)
        return BUS_EINVAL;
    if (n > EV_MAX_STRING)
        return BUS_ETOOBIG;
    if (!bus__utf8_valid(s, n))
        return BUS_EINVAL;
    *len = n;
    return BUS_OK;
}

int
bus_event_create(bus_event **out, const bus_event_init *init)
{
    bus__str small_k[8], small_v[8];
    bus__str *hk = small_k, *hv = small_v;
    bus__event_spec s;
    size_t i, j;
    int rv;

    if (out == NULL) {
        if (init != NULL && init->payload_free != NULL)
            init->payload_free((void *)init->payload, init->payload_hint);
        return BUS_EINVAL;
    }
    *out = NULL;
    if (init == NULL)
        return BUS_EINVAL;
    memset(&s, 0, sizeof(s));
    rv = BUS_EINVAL;
    if (init->type == NULL || (init->payload == NULL && init->payload_len))
        goto fail;
    if ((rv = ev_check_str(init->type, &s.type.len, false)) != BUS_OK)
        goto fail;
    s.type.p = init->type;
    if (init->stream != NULL) {
        if ((rv = ev_check_str(init->stream, &s.stream.len, true)) != BUS_OK)
            goto fail;
        s.stream.p = init->stream;
    }
    rv = BUS_ETOOBIG;
    if (init->n_headers > EV_MAX_HEADERS
        || (uint64_t)init->payload_len > UINT32_MAX)
        goto fail;
    rv = BUS_EINVAL;
    if (init->n_headers > 0 && init->headers == NULL)
        goto fail;
    if (init->n_headers > 8) {
        rv = BUS_ENOMEM;
        hk = bus__alloc(init->n_headers * sizeof(*hk));
        hv = bus__alloc(init->n_headers * sizeof(*hv));
        if (hk == NULL || hv == NULL)
            goto fail;
    }
    for (i = 0; i < init->n_headers; i++) {
        const bus_header *h = &init->headers[i];
        rv = BUS_EINVAL;
        if (h->key == NULL || h->value == NULL)
            goto fail;
        if ((rv = ev_check_str(h->key, &hk[i].len, false)) != BUS_OK
            || (rv = ev_check_str(h->value, &hv[i].len, true)) != BUS_OK)
            goto fail;
        hk[i].p = h->key;
        hv[i].p = h->value;
        for (j = 0; j < i; j++) {
            if (hk[j].len == hk[i].len
                && memcmp(hk[j].p, hk[i].p, hk[i].len) == 0) {
                rv = BUS_EINVAL;
                goto fail;
            }
        }
    }
    s.schema_version = init->schema_version;
    s.stream_version = init->stream_version;
    s.id = init->id;
    s.timestamp = init->timestamp_ns;
    s.hkeys = hk;
    s.hvals = hv;
    s.n_headers = init->n_headers;
    s.payload = init->payload;
    s.payload_len = init->payload_len;
    s.payload_free = init->payload_free;
    s.payload_hint = init->payload_hint;
    s.spare = EV_DEFAULT_SPARE;
    rv = bus__event_build(out, &s); /* frees an adopted payload on error */
    if (hk != small_k) {
        bus__free(hk, init->n_headers * sizeof(*hk));
        bus__free(hv, init->n_headers * sizeof(*hv));
    }
    return rv;
fail:
    if (hk != small_k) {
        bus__free(hk, init->n_headers * sizeof(*hk));
        bus__free(hv, init->n_headers * sizeof(*hv));
    }
    if (init->payload_free != NULL)
        init->payload_free((void *)init->payload, init->payload_hint);
    return rv;
}

int
bus_event_new(bus_event **out, const char *type, const void *payload,
              size_t len)
{
    bus_event_init init;

    memset(&init, 0, sizeof(init));
    init.type = type;
    init.payload = payload;
    init.payload_len = len;
    return bus_event_create(out, &init);
}

int
bus_event_wrap(bus_event **out, void *data, size_t len, bus_free_fn free_fn,
               void *hint)
{
    bus__event_spec s;

    if (out == NULL || (data == NULL && len > 0)
        || (uint64_t)len > UINT32_MAX) {
        if (out != NULL)
            *out = NULL;
        if (free_fn != NULL)
            free_fn(data, hint);
        return out == NULL || data == NULL ? BUS_EINVAL : BUS_ETOOBIG;
    }
    memset(&s, 0, sizeof(s));
    s.type.p = "";
    s.payload = data;
    s.payload_len = len;
    s.payload_free = free_fn;
    s.payload_hint = hint;
    s.adopt_static = free_fn == NULL;
    s.spare = EV_DEFAULT_SPARE + 32; /* room for the type set later */
    return bus__event_build(out, &s);
}

int
bus_event_clone(bus_event **out, const bus_event *e)
{
    bus__str small_k[8], small_v[8];
    bus__str *hk = small_k, *hv = small_v;
    bus__event_spec s;
    size_t i, n;
    int rv;

    if (out == NULL || e == NULL)
        return BUS_EINVAL;
    n = e->n_headers;
    if (n > 8) {
        hk = bus__alloc(n * sizeof(*hk));
        hv = bus__alloc(n * sizeof(*hv));
        if (hk == NULL || hv == NULL) {
            bus__free(hk, n * sizeof(*hk));
            bus__free(hv, n * sizeof(*hv));
            *out = NULL;
            return BUS_ENOMEM;
        }
    }
    for (i = 0; i < n; i++) {
        hk[i] = (bus__str){e->headers[i].key, e->headers[i].klen};
        hv[i] = (bus__str){e->headers[i].value, e->headers[i].vlen};
    }
    memset(&s, 0, sizeof(s));
    s.type = (bus__str){e->type, e->type_len};
    if (e->stream != NULL)
        s.stream = (bus__str){e->stream, e->stream_len};
    s.schema_version = e->schema_version;
    s.stream_version = e->stream_version;
    s.position = e->position;
    s.id = &e->id;
    s.timestamp = e->timestamp;
    s.hkeys = hk;
    s.hvals = hv;
    s.n_headers = n;
    s.payload = e->payload;
    s.payload_len = e->payload_len;
    s.spare = EV_DEFAULT_SPARE * 2; /* clones exist to be changed */
    rv = bus__event_build(out, &s);
    if (hk != small_k) {
        bus__free(hk, n * sizeof(*hk));
        bus__free(hv, n * sizeof(*hv));
    }
    return rv;
}

bus_event *
bus_event_ref(bus_event *e)
{
    /* relaxed: taking a reference needs no ordering, the caller already
     * holds one (nng). */
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
    return e;
}

static void
ev_destroy(bus_event *e)
{
    ev_chunk *c, *next;

    if (e->payload_free != NULL)
        e->payload_free(e->payload_owner != NULL ? e->payload_owner
                                                 : (void *)e->payload,
                        e->payload_hint);
    for (c = e->chunks; c != NULL; c = next) {
        next = c->next;
        bus__free(c, c->size);
    }
    evc_free(e, e->block_size, e->cache);
}

void
bus_event_unref(bus_event *e)
{
    if (e == NULL)
        return;
    /* The last reference (the common case for a queued event: the worker
     * drops the one the publisher handed over): nobody else holds one, so
     * nobody can take one either, and a plain load does. acquire: pairs
     * with the other holders' acq_rel decrements, so their reads of the
     * event happen-before we free it. */
    if (atomic_load_explicit(&e->refs, memory_order_acquire) == 1
        || atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel)
               == 1)
        ev_destroy(e);
}

uint32_t
bus_event_refcount(const bus_event *e)
{
    return atomic_load_explicit(&e->refs, memory_order_relaxed);
}

void
bus_event_freeze(bus_event *e)
{
    /* release: pairs with nothing by itself; the hand-off to other
     * threads (queues) publishes the event's contents. */
    atomic_store_explicit(&e->frozen, true, memory_order_release);
}

bool
bus_event_frozen(const bus_event *e)
{
    return bus__event_is_frozen(e);
}

const bus_uuid *
bus_event_id(const bus_event *e)
{
    return &e->id;
}

const char *
bus_event_type(const bus_event *e)
{
    return e->type;
}

uint32_t
bus_event_schema_version(const bus_event *e)
{
    return e->schema_version;
}

const char *
bus_event_stream(const bus_event *e)
{
    return e->stream;
}

uint64_t
bus_event_stream_version(const bus_event *e)
{
    return e->stream_version;
}

uint64_t
bus_event_position(const bus_event *e)
{
    return e->position;
}

int64_t
bus_event_timestamp(const bus_event *e)
{
    return e->timestamp;
}

const void *
bus_event_payload(const bus_event *e)
{
    return e->payload;
}

size_t
bus_event_payload_len(const bus_event *e)
{
    return e->payload_len;
}

static ev_header *
ev_find_header(const bus_event *e, const char *key, size_t klen)
{
    uint32_t i;

    for (i = 0; i < e->n_headers; i++)
        if (e->headers[i].klen == klen
            && memcmp(e->headers[i].key, key, klen) == 0)
            return &e->headers[i];
    return NULL;
}

const char *
bus_event_header(const bus_event *e, const char *key)
{
    ev_header *h = ev_find_header(e, key, strlen(key));

    return h != NULL ? h->value : NULL;
}

size_t
bus_event_header_count(const bus_event *e)
{
    return e->n_headers;
}

bool
bus_event_header_at(const bus_event *e, size_t i, const char **key,
                    const char **value)
{
    if (i >= e->n_headers)
        return false;
    if (key != NULL)
        *key = e->headers[i].key;
    if (value != NULL)
        *value = e->headers[i].value;
    return true;
}

const char *
bus_event_correlation_id(const bus_event *e)
{
    return bus_event_header(e, BUS_H_CORRELATION_ID);
}

const char *
bus_event_causation_id(const bus_event *e)
{
    return bus_event_header(e, BUS_H_CAUSATION_ID);
}

/* ---- Setters ---- */

#define EV_MUTABLE(e)                                                      \
    do {                                                                   \
        if ((e) == NULL)                                                   \
            return BUS_EINVAL;                                             \
        if (bus__event_is_frozen(e))                                       \
            return BUS_EFROZEN;                                            \
    } while (0)

int
bus_event_set_type(bus_event *e, const char *type)
{
    size_t len;
    char *d;
    int rv;

    EV_MUTABLE(e);
    if (type == NULL)
        return BUS_EINVAL;
    if ((rv = ev_check_str(type, &len, false)) != BUS_OK)
        return rv;
    if ((d = ev_arena_str(e, type, len)) == NULL)
        return BUS_ENOMEM;
    e->type = d;
    e->type_len = (uint32_t)len;
    return BUS_OK;
}

int
bus_event_set_schema_version(bus_event *e, uint32_t version)
{
    EV_MUTABLE(e);
    if (version == 0)
        return BUS_EINVAL;
    e->schema_version = version;
    return BUS_OK;
}

int
bus_event_set_stream(bus_event *e, const char *stream, uint64_t version)
{
    size_t len;
    char *d;
    int rv;

    EV_MUTABLE(e);
    if (stream == NULL) {
        e->stream = NULL;
        e->stream_len = 0;
        e->stream_version = 0;
        return BUS_OK;
    }
    if ((rv = ev_check_str(stream, &len, true)) != BUS_OK)
        return rv;
    if ((d = ev_arena_str(e, stream, len)) == NULL)
        return BUS_ENOMEM;
    e->stream = d;
    e->stream_len = (uint32_t)len;
    e->stream_version = version;
    return BUS_OK;
}

int
bus_event_set_position(bus_event *e, uint64_t position)
{
    EV_MUTABLE(e);
    e->position = position;
    return BUS_OK;
}

int
bus_event_set_id(bus_event *e, const bus_uuid *id)
{
    EV_MUTABLE(e);
    if (id == NULL)
        return BUS_EINVAL;
    e->id = *id;
    return BUS_OK;
}

int
bus_event_set_timestamp(bus_event *e, int64_t ns)
{
    EV_MUTABLE(e);
    e->timestamp = ns;
    return BUS_OK;
}

int
bus_event_set_header(bus_event *e, const char *key, const char *value)
{
    size_t klen, vlen;
    ev_header *h;
    char *kd, *vd;
    int rv;

    EV_MUTABLE(e);
    if (key == NULL)
        return BUS_EINVAL;
    if ((rv = ev_check_str(key, &klen, false)) != BUS_OK)
        return rv;
    h = ev_find_header(e, key, klen);
    if (value == NULL) {
        if (h != NULL) {
            size_t i = (size_t)(h - e->headers);
            memmove(h, h + 1, (e->n_headers - i - 1) * sizeof(*h));
            e->n_headers--;
        }
        return BUS_OK;
    }
    if ((rv = ev_check_str(value, &vlen, true)) != BUS_OK)
        return rv;
    if ((vd = ev_arena_str(e, value, vlen)) == NULL)
        return BUS_ENOMEM;
    if (h != NULL) {
        h->value = vd;
        h->vlen = (uint32_t)vlen;
        return BUS_OK;
    }
    if (e->n_headers == EV_MAX_HEADERS)
        return BUS_ETOOBIG;
    if (e->n_headers == e->cap_headers) {
        size_t ncap = (size_t)e->cap_headers * 2;
        ev_header *nh;
        if (ncap > EV_MAX_HEADERS)
            ncap = EV_MAX_HEADERS;
        if ((nh = ev_arena_take(e, ncap * sizeof(*nh))) == NULL)
            return BUS_ENOMEM;
        memcpy(nh, e->headers, e->n_headers * sizeof(*nh));
        e->headers = nh;
        e->cap_headers = (uint32_t)ncap;
    }
    if ((kd = ev_arena_str(e, key, klen)) == NULL)
        return BUS_ENOMEM;
    h = &e->headers[e->n_headers++];
    h->key = kd;
    h->klen = (uint32_t)klen;
    h->value = vd;
    h->vlen = (uint32_t)vlen;
    return BUS_OK;
}

int
bus__event_set_topic(bus_event *e, const char *topic, size_t len)
{
    char *d;

    if (bus__event_is_frozen(e))
        return BUS_EFROZEN;
    if (bus__event_topic_is(e, topic, len))
        return BUS_OK;
    if ((d = ev_arena_str(e, topic, len)) == NULL)
        return BUS_ENOMEM;
    e->topic = d;
    e->topic_len = (uint32_t)len;
    return BUS_OK;
}
