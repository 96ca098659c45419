/*
 * The in-memory broker, mem://name (contract: <bus/broker_memory.h>).
 *
 * Design:
 * - Named buses live in a process-wide table (memory_table, one mutex),
 *   refcounted by the brokers open on them; the last fini frees the bus.
 *   "mem://" (empty name) makes a private bus that is not in the table.
 * - Each bus keeps its subscriptions in a bus__tindex (topic.h): immutable
 *   snapshots, so a publish reads the current one without a lock inside an
 *   RCU read section (rcu.h) of the bus and calls the deliver functions
 *   directly, in the publishing thread.
 * - Writers (subscribe, unsubscribe) serialise on the bus's wmtx, build
 *   the next snapshot, publish it (atomic store, release), and put the old
 *   one (and, for unsubscribe, the subscription) on the bus's retired
 *   list. After dropping wmtx they wait for a grace period
 *   (bus__rcu_synchronize) and free everything retired before it. Inside a
 *   read section of the bus (a deliver function that subscribes or
 *   unsubscribes) synchronize cannot wait and returns false: the entries
 *   go back on the retired list and the next successful grace period, or
 *   the bus's last close, frees them.
 * - A subscription is marked dead before it leaves the index, and publish
 *   checks the flag inside its section just before calling fn, so once the
 *   grace period after unsubscribe has passed no call can start or still
 *   be running.
 * - If taking a subscription out of the index fails (ENOMEM: snapshots
 *   allocate), the dead subscription stays in the index as a "zombie"
 *   (never called, since it is dead) and the next unsubscribe on the bus
 *   retries; the bus's last close frees what is left.
 * - Consumer groups: one memory_group per (bus, name), refcounted by its
 *   members under wmtx and freed with its last member (after a grace
 *   period, like the member itself, so readers never see it freed). Each
 *   event matching some members goes to one of them, round-robin.
 * - Closing a broker refuses its publishes (checked inside the read
 *   section); stop removes the subscriptions it still holds and waits a
 *   grace period, so after stop no publish through it is running and none
 *   of its deliver functions will be called.
 *
 * Lock order: memory_table_mtx and a bus's wmtx are never held together;
 * bus__rcu_synchronize and deliver functions run with neither held.
 */
#include <assert.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <bus/broker_memory.h>

#include "alloc.h"
#include "broker_impl.h"
#include "platform.h"
#include "rcu.h"
#include "topic.h"

#define MEMORY_CACHE_CAP 1024  /* topics cached per snapshot */
#define MEMORY_LOOKUP_STACK 16 /* matches handled without an allocation */
#define MEMORY_DROP_LOG_EVERY 1000

typedef struct memory_bus memory_bus;
typedef struct memory_broker memory_broker;
typedef struct memory_sub memory_sub;

typedef struct memory_group {
    struct memory_group *next; /* bus->groups; @locks bus->wmtx */
    char *name;
    uint32_t members;             /* subscriptions using it; @locks wmtx */
    _Atomic uint64_t next_member; /* round-robin counter */
} memory_group;

/* Something unlinked from the readers' view, freed after a grace period. */
typedef struct memory_retired {
    struct memory_retired *next;
    bus__tindex *snap; /* a snapshot to release, or NULL */
    memory_sub *sub;   /* a subscription to free, or NULL */
    bool own;          /* allocated on its own (else inside sub) */
} memory_retired;

struct memory_sub {
    bus_deliver_fn fn;
    void *opaque;
    char *pattern;
    memory_group *group;     /* NULL: none */
    memory_broker *owner;    /* the broker it was made through */
    memory_sub *prev, *next; /* owner's list, then the zombie list;
                              * @locks bus->wmtx */
    atomic_bool dead;        /* set once, before it leaves the index */
    memory_retired rnode;    /* how unsubscribe retires it */
};

struct memory_bus {
    bus__rcu rcu;     /* first: it is cache-line aligned */
    memory_bus *next; /* memory_table; @locks memory_table_mtx */
    uint32_t refs;    /* brokers open on it; @locks memory_table_mtx */
    char *name;       /* "" when private */
    void *raw;        /* the allocation (the bus is aligned inside it) */
    bus__mutex wmtx;  /* the writer: the index and the fields below */
    _Atomic(bus__tindex *) index;
    memory_group *groups;
    memory_retired *retired;
    memory_sub *zombies;
};

struct memory_broker {
    memory_bus *bus; /* NULL until init acquired one */
    bus_logger log;
    atomic_bool closed;
    memory_sub *subs; /* live subscriptions made through it; @locks wmtx */
    /* Counters: relaxed, they order nothing. */
    _Atomic uint64_t published;
    _Atomic uint64_t delivered;
    _Atomic uint64_t dropped;
    _Atomic uint64_t nsubs;
};

/* ---- Buses and the table of named ones -------------------------------- */

static bus__mutex memory_table_mtx;
static memory_bus *memory_table; /* @locks memory_table_mtx */
/* The table mutex has no static initialiser: the first open initialises
 * it under a spin flag. memory_table_ready is stored release after the
 * mutex is ready and loaded acquire. */
static atomic_bool memory_table_ready;
static atomic_flag memory_table_init_lock = ATOMIC_FLAG_INIT;

static void
memory_table_init(void)
{
    if (atomic_load_explicit(&memory_table_ready, memory_order_acquire))
        return;
    /* acquire/release on the spin flag: the winner's initialisation
     * happens-before a loser's re-check. */
    while (atomic_flag_test_and_set_explicit(&memory_table_init_lock,
                                             memory_order_acquire))
        bus__thread_yield();
    if (!atomic_load_explicit(&memory_table_ready, memory_order_relaxed)) {
        bus__mutex_init(&memory_table_mtx);
        /* release: pairs with the acquire fast path. */
        atomic_store_explicit(&memory_table_ready, true, memory_order_release);
    }
    atomic_flag_clear_explicit(&memory_table_init_lock, memory_order_release);
}

#define MEMORY_BUS_ALLOC (sizeof(memory_bus) + BUS_CACHELINE)

static memory_bus *
memory_bus_new(const char *name)
{
    memory_bus *bus;
    bus__tindex *t;
    void *raw;

    /* bus__alloc promises malloc alignment only, and the RCU slots are
     * cache-line aligned types: align by hand. */
    if ((raw = bus__alloc(MEMORY_BUS_ALLOC)) == NULL)
        return NULL;
    bus = (memory_bus *)(((uintptr_t)raw + BUS_CACHELINE - 1) &
                         ~(uintptr_t)(BUS_CACHELINE - 1));
    memset(bus, 0, sizeof(*bus));
    bus->raw = raw;
    if ((bus->name = bus__strdup(name, NULL)) == NULL) {
        bus__free(raw, MEMORY_BUS_ALLOC);
        return NULL;
    }
    if ((t = bus__tindex_new(MEMORY_CACHE_CAP)) == NULL) {
        bus__strfree(bus->name);
        bus__free(raw, MEMORY_BUS_ALLOC);
        return NULL;
    }
    atomic_init(&bus->index, t);
    bus->refs = 1;
    bus__rcu_init(&bus->rcu);
    bus__mutex_init(&bus->wmtx);
    return bus;
}

/* Frees s and drops its group reference; s must be unreachable for
 * readers (a grace period has passed). @locks bus->wmtx held. */
static void
memory_sub_free(memory_bus *bus, memory_sub *s)
{
    memory_group *g = s->group, **pp;

    if (g != NULL && --g->members == 0) {
        for (pp = &bus->groups; *pp != NULL; pp = &(*pp)->next)
            if (*pp == g) {
                *pp = g->next;
                break;
            }
        bus__strfree(g->name);
        bus__free(g, sizeof(*g));
    }
    bus__strfree(s->pattern);
    bus__free(s, sizeof(*s));
}

/* Frees retired entries whose grace period has passed.
 * @locks bus->wmtx held. */
static void
memory_retired_free(memory_bus *bus, memory_retired *r)
{
    while (r != NULL) {
        memory_retired *next = r->next;
        memory_sub *s = r->sub;
        bool own = r->own; /* read now: r may live inside s */

        bus__tindex_release(r->snap);
        if (own)
            bus__free(r, sizeof(*r));
        if (s != NULL)
            memory_sub_free(bus, s);
        r = next;
    }
}

/* Prepends the chain list to the bus's retired list.
 * @locks bus->wmtx held. */
static void
memory_retired_push(memory_bus *bus, memory_retired *list)
{
    memory_retired *tail;

    if (list == NULL)
        return;
    for (tail = list; tail->next != NULL; tail = tail->next)
        ;
    tail->next = bus->retired;
    bus->retired = list;
}

/* Takes the whole retired list. @locks bus->wmtx held. */
static memory_retired *
memory_retired_take(memory_bus *bus)
{
    memory_retired *r = bus->retired;

    bus->retired = NULL;
    return r;
}

/* Waits for a grace period and frees list (taken with memory_retired_take
 * after its entries were unlinked). Inside a read section of the bus
 * (called from a deliver function) it cannot wait: the list goes back to
 * the bus for a later grace period. @locks none held (synchronize must
 * not wait under wmtx: a deliver function may be blocked on it). */
static void
memory_reclaim(memory_bus *bus, memory_retired *list)
{
    bool waited;

    if (list == NULL)
        return;
    waited = bus__rcu_synchronize(&bus->rcu);
    bus__mutex_lock(&bus->wmtx);
    if (waited)
        memory_retired_free(bus, list);
    else
        memory_retired_push(bus, list);
    bus__mutex_unlock(&bus->wmtx);
}

/* Frees a bus no broker uses any more. */
static void
memory_bus_free(memory_bus *bus)
{
    memory_sub *z;

    /* Every broker on it has stopped, so no section can be open; the
     * grace period also orders their last reads before the frees. */
    (void)bus__rcu_synchronize(&bus->rcu);
    bus__mutex_lock(&bus->wmtx);
    memory_retired_free(bus, memory_retired_take(bus));
    bus__tindex_release(
        atomic_load_explicit(&bus->index, memory_order_relaxed));
    while ((z = bus->zombies) != NULL) {
        bus->zombies = z->next;
        memory_sub_free(bus, z);
    }
    assert(bus->groups == NULL && "memory group outlived its members");
    bus__mutex_unlock(&bus->wmtx);
    bus__mutex_fini(&bus->wmtx);
    bus__rcu_fini(&bus->rcu);
    bus__strfree(bus->name);
    bus__free(bus->raw, MEMORY_BUS_ALLOC);
}

/* ---- Operations -------------------------------------------------------- */

static int
memory_init(void *priv, const bus_broker_config *cfg, bus_uri *uri,
            char *errbuf, size_t errbuf_len)
{
    memory_broker *m = priv;
    const char *name = uri->authority;
    memory_bus *bus;

    m->log = cfg->log;
    atomic_init(&m->closed, false);
    if (uri->path[0] != '\0') {
        if (errbuf != NULL && errbuf_len > 0)
            snprintf(errbuf, errbuf_len,
                     "mem: unexpected path '%s' (a memory bus has only a "
                     "name: mem://name)",
                     uri->path);
        return BUS_EINVAL;
    }
    if (name[0] == '\0') {
        if ((m->bus = memory_bus_new("")) == NULL)
            return BUS_ENOMEM;
        return BUS_OK;
    }
    memory_table_init();
    bus__mutex_lock(&memory_table_mtx);
    for (bus = memory_table; bus != NULL; bus = bus->next)
        if (strcmp(bus->name, name) == 0)
            break;
    if (bus != NULL) {
        bus->refs++;
    } else if ((bus = memory_bus_new(name)) != NULL) {
        bus->next = memory_table;
        memory_table = bus;
    }
    bus__mutex_unlock(&memory_table_mtx);
    if (bus == NULL)
        return BUS_ENOMEM;
    m->bus = bus;
    return BUS_OK;
}

/* Counts a refused delivery; logs the first and every 1000th. */
static void
memory_drop(memory_broker *m, const memory_sub *s, const char *topic, int err)
{
    uint64_t n =
        atomic_fetch_add_explicit(&m->dropped, 1, memory_order_relaxed) + 1;

    if (n % MEMORY_DROP_LOG_EVERY == 1)
        bus_logf(&m->log, BUS_LOG_WARN, "memory",
                 "mem://%s: subscription '%s'%s%s refused an event on '%s' "
                 "(%s): dropped, %llu so far (logged every %d)",
                 m->bus->name, s->pattern, s->group != NULL ? " group " : "",
                 s->group != NULL ? s->group->name : "", topic,
                 bus_err_name(err), (unsigned long long)n,
                 MEMORY_DROP_LOG_EVERY);
}

static bool
memory_sub_dead(memory_sub *s)
{
    /* acquire: pairs with unsubscribe's release. Safety comes from the
     * grace period; the flag stops new calls as early as possible. */
    return atomic_load_explicit(&s->dead, memory_order_acquire);
}

/* One deliver call: fn gets its own reference, which we take back when it
 * refuses. @thread publisher, inside a read section. */
static int
memory_deliver_one(memory_broker *m, memory_sub *s, const char *topic,
                   bus_event *ev, unsigned flags)
{
    int rv = s->fn(s->opaque, topic, bus_event_ref(ev), 0, flags);

    if (rv != BUS_OK) {
        bus_event_unref(ev);
        return rv;
    }
    atomic_fetch_add_explicit(&m->delivered, 1, memory_order_relaxed);
    return BUS_OK;
}

/* Delivers ev to one live member of group g among items[from..n), chosen
 * round-robin, trying the next ones if it refuses. Returns BUS_OK, the
 * first refusal's error when all refused, or -1 when no member is live.
 * *first gets the first member tried (for the log). */
static int
memory_deliver_group(memory_broker *m, void *const *items, size_t n,
                     size_t from, memory_group *g, const char *topic,
                     bus_event *ev, unsigned flags, memory_sub **first)
{
    size_t i, live = 0, tries, pick;
    int rv, first_err = -1;

    for (i = from; i < n; i++) {
        memory_sub *s = items[i];
        if (s->group == g && !memory_sub_dead(s))
            live++;
    }
    if (live == 0)
        return -1;
    /* relaxed: the counter only spreads the load; no data hangs on it. */
    pick = (size_t)(atomic_fetch_add_explicit(&g->next_member, 1,
                                              memory_order_relaxed) %
                    live);
    for (tries = 0; tries < live; tries++, pick = (pick + 1) % live) {
        memory_sub *s = NULL;
        size_t k = 0;
        for (i = from; i < n; i++) {
            memory_sub *c = items[i];
            if (c->group == g && !memory_sub_dead(c) && k++ == pick) {
                s = c;
                break;
            }
        }
        if (s == NULL)
            continue; /* one died meanwhile: the numbering shifted */
        if (*first == NULL)
            *first = s;
        if ((rv = memory_deliver_one(m, s, topic, ev, flags)) == BUS_OK)
            return BUS_OK;
        if (first_err < 0)
            first_err = rv;
    }
    return first_err;
}

static int
memory_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
               bus_ack_fn ack, void *ack_opaque)
{
    memory_broker *m = priv;
    memory_bus *bus = m->bus;
    void *sbuf[MEMORY_LOOKUP_STACK];
    void **heap = NULL;
    void *const *items;
    size_t i, j, n, heap_n = 0, len = strlen(topic);
    size_t targets = 0, ok = 0;
    int rv, first_err = BUS_OK;
    bus__tindex *t;
    uint32_t tok;

    tok = bus__rcu_enter(&bus->rcu);
    /* acquire: pairs with close's release. Checked inside the section so
     * that stop's grace period waits for every publish that got past. */
    if (atomic_load_explicit(&m->closed, memory_order_acquire)) {
        bus__rcu_exit(&bus->rcu, tok);
        return BUS_ECLOSED;
    }
    /* acquire: pairs with the writers' release store. The snapshot stays
     * valid until this section ends (rcu.h: a section that began after
     * the writer's check sees the new pointer). */
    t = atomic_load_explicit(&bus->index, memory_order_acquire);
    n = bus__tindex_lookup(t, topic, len, sbuf, MEMORY_LOOKUP_STACK, &items);
    if (n > MEMORY_LOOKUP_STACK && items == (void *const *)sbuf) {
        /* Not cached (cache full, or its allocation failed): ask again
         * with room for all. Rare: many subscriptions on one topic. */
        heap_n = n;
        if ((heap = bus__alloc(heap_n * sizeof(*heap))) == NULL) {
            bus__rcu_exit(&bus->rcu, tok);
            return BUS_ENOMEM;
        }
        n = bus__tindex_lookup(t, topic, len, heap, heap_n, &items);
        if (n > heap_n)
            n = heap_n; /* cannot happen: a snapshot is immutable */
    }

    for (i = 0; i < n; i++) {
        memory_sub *s = items[i], *first = NULL;

        if (s->group == NULL) {
            if (memory_sub_dead(s))
                continue;
            targets++;
            rv = memory_deliver_one(m, s, topic, ev, flags);
        } else {
            /* A group is served once, at its first member in items.
             * Groups per topic are few: the quadratic scan stays small
             * and costs nothing without groups. */
            for (j = 0; j < i; j++)
                if (((memory_sub *)items[j])->group == s->group)
                    break;
            if (j < i)
                continue;
            rv = memory_deliver_group(m, items, n, i, s->group, topic, ev,
                                      flags, &first);
            if (rv < 0)
                continue; /* no live member */
            targets++;
            if (first != NULL)
                s = first;
        }
        if (rv == BUS_OK) {
            ok++;
        } else {
            memory_drop(m, s, topic, rv);
            if (first_err == BUS_OK)
                first_err = rv;
        }
    }
    bus__rcu_exit(&bus->rcu, tok);
    bus__free(heap, heap_n * sizeof(*heap));

    if (targets > 0 && ok == 0)
        return first_err; /* ev stays with the caller, who may retry */
    atomic_fetch_add_explicit(&m->published, 1, memory_order_relaxed);
    if (ack != NULL)
        ack(ack_opaque, ev, BUS_OK);
    bus_event_unref(ev); /* the caller's reference, which we took */
    return BUS_OK;
}

static void
memory_group_drop_new(memory_group *g)
{
    if (g != NULL) {
        bus__strfree(g->name);
        bus__free(g, sizeof(*g));
    }
}

static int
memory_subscribe(void *priv, const char *pattern, const char *group,
                 bus_deliver_fn fn, void *opaque, void **handle)
{
    memory_broker *m = priv;
    memory_bus *bus = m->bus;
    memory_sub *s = NULL;
    memory_group *g = NULL, *gnew = NULL;
    memory_retired *node = NULL, *list;
    bus__tindex *cur, *next;
    int rv;

    if (handle == NULL)
        return BUS_EINVAL;
    *handle = NULL;
    if (pattern == NULL || fn == NULL ||
        bus__topic_check(pattern, true, NULL, 0) != BUS_OK ||
        (group != NULL && group[0] == '\0'))
        return BUS_EINVAL;
    /* acquire: pairs with close's release. */
    if (atomic_load_explicit(&m->closed, memory_order_acquire))
        return BUS_ECLOSED;

    /* Allocate everything before taking the lock, so that under it only
     * the index itself can fail. */
    rv = BUS_ENOMEM;
    if ((s = bus__zalloc(sizeof(*s))) == NULL ||
        (s->pattern = bus__strdup(pattern, NULL)) == NULL ||
        (node = bus__zalloc(sizeof(*node))) == NULL)
        goto fail;
    if (group != NULL && ((gnew = bus__zalloc(sizeof(*gnew))) == NULL ||
                          (gnew->name = bus__strdup(group, NULL)) == NULL))
        goto fail;
    s->fn = fn;
    s->opaque = opaque;
    s->owner = m;
    atomic_init(&s->dead, false);
    node->own = true;

    bus__mutex_lock(&bus->wmtx);
    if (group != NULL) {
        for (g = bus->groups; g != NULL; g = g->next)
            if (strcmp(g->name, group) == 0)
                break;
        if (g == NULL) {
            g = gnew;
            gnew = NULL;
            atomic_init(&g->next_member, 0);
            g->next = bus->groups;
            bus->groups = g;
        }
        g->members++;
        s->group = g;
    }
    /* relaxed: only writers store it, and we hold wmtx. */
    cur = atomic_load_explicit(&bus->index, memory_order_relaxed);
    if ((rv = bus__tindex_add(cur, pattern, s, &next)) != BUS_OK) {
        s->group = NULL;
        if (g != NULL && --g->members == 0) {
            /* It was created above, so it is first in the list. */
            bus->groups = g->next;
            gnew = g;
        }
        bus__mutex_unlock(&bus->wmtx);
        goto fail;
    }
    /* release: a reader that loads the new snapshot (acquire) sees the
     * subscription fully built. */
    atomic_store_explicit(&bus->index, next, memory_order_release);
    s->next = m->subs;
    if (m->subs != NULL)
        m->subs->prev = s;
    m->subs = s;
    node->snap = cur;
    memory_retired_push(bus, node);
    list = memory_retired_take(bus);
    bus__mutex_unlock(&bus->wmtx);

    atomic_fetch_add_explicit(&m->nsubs, 1, memory_order_relaxed);
    memory_group_drop_new(gnew);
    memory_reclaim(bus, list);
    *handle = s;
    return BUS_OK;
fail:
    memory_group_drop_new(gnew);
    bus__free(node, sizeof(*node));
    if (s != NULL) {
        bus__strfree(s->pattern);
        bus__free(s, sizeof(*s));
    }
    return rv;
}

/* Takes s out of the working snapshot *t (derived from cur, the one
 * readers may hold) or, when that fails (ENOMEM), parks s on the zombie
 * list. Prepends what a grace period must precede the freeing of to
 * *retire. @locks bus->wmtx held. */
static void
memory_index_remove(memory_bus *bus, memory_sub *s, bus__tindex *cur,
                    bus__tindex **t, memory_retired **retire)
{
    bus__tindex *next;
    int rv = bus__tindex_remove(*t, s->pattern, s, &next);

    if (rv == BUS_OK) {
        if (*t != cur) /* a working copy no reader has seen */
            bus__tindex_release(*t);
        *t = next;
    } else if (rv != BUS_ENOTFOUND) {
        s->next = bus->zombies;
        bus->zombies = s;
        return;
    }
    assert(rv == BUS_OK && "memory subscription missing from its index");
    s->rnode = (memory_retired){.next = *retire, .sub = s};
    *retire = &s->rnode;
}

/* Ends s and returns in *list the bus's retired entries, to reclaim once
 * wmtx is dropped. @locks bus->wmtx held. */
static void
memory_unsubscribe_locked(memory_broker *m, memory_sub *s,
                          memory_retired **list)
{
    memory_bus *bus = m->bus;
    memory_retired *retire = NULL;
    memory_sub *z, *zombies;
    bus__tindex *cur, *t;

    /* release: pairs with the acquire in memory_sub_dead. */
    atomic_store_explicit(&s->dead, true, memory_order_release);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        m->subs = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;

    /* relaxed: only writers store it, and we hold wmtx. */
    cur = t = atomic_load_explicit(&bus->index, memory_order_relaxed);
    /* Retry what an earlier unsubscribe could not take out. */
    zombies = bus->zombies;
    bus->zombies = NULL;
    while ((z = zombies) != NULL) {
        zombies = z->next;
        memory_index_remove(bus, z, cur, &t, &retire);
    }
    memory_index_remove(bus, s, cur, &t, &retire);
    if (t != cur) {
        /* release: as in subscribe. Something left the index, so retire
         * is not empty: its head carries the snapshot readers may hold. */
        atomic_store_explicit(&bus->index, t, memory_order_release);
        assert(retire != NULL);
        retire->snap = cur;
    }
    memory_retired_push(bus, retire);
    *list = memory_retired_take(bus);
    atomic_fetch_sub_explicit(&m->nsubs, 1, memory_order_relaxed);
}

static void
memory_unsubscribe(void *priv, void *handle)
{
    memory_broker *m = priv;
    memory_retired *list;

    if (handle == NULL)
        return;
    bus__mutex_lock(&m->bus->wmtx);
    memory_unsubscribe_locked(m, handle, &list);
    bus__mutex_unlock(&m->bus->wmtx);
    memory_reclaim(m->bus, list);
}

static int
memory_flush(void *priv, int32_t timeout_ms)
{
    (void)priv;
    (void)timeout_ms;
    return BUS_OK; /* delivery is synchronous: nothing is outstanding */
}

static int
memory_health(void *priv, char *msg, size_t msg_len)
{
    (void)priv;
    if (msg != NULL && msg_len > 0)
        msg[0] = '\0';
    return BUS_OK;
}

static void
memory_close(void *priv)
{
    memory_broker *m = priv;

    /* release: pairs with the acquire loads in publish and subscribe. */
    atomic_store_explicit(&m->closed, true, memory_order_release);
}

static void
memory_stop(void *priv)
{
    memory_broker *m = priv;
    memory_bus *bus = m->bus;
    memory_retired *list;
    size_t left = 0;
    memory_sub *s;

    if (bus == NULL)
        return;
    /* Subscriptions still here were not unsubscribed by their owner (a
     * context detaches first): remove them, so that publishes through
     * other brokers on the bus never call into a closed one. */
    bus__mutex_lock(&bus->wmtx);
    for (s = m->subs; s != NULL; s = s->next)
        left++;
    while ((s = m->subs) != NULL) {
        memory_unsubscribe_locked(m, s, &list);
        memory_retired_push(bus, list); /* one grace period for all */
    }
    list = memory_retired_take(bus);
    bus__mutex_unlock(&bus->wmtx);
    if (left > 0)
        bus_logf(&m->log, BUS_LOG_WARN, "memory",
                 "mem://%s: closed with %zu subscription(s) still open; "
                 "removed them",
                 bus->name, left);
    /* The grace period also waits for every publish through m that got
     * past the closed check, so none runs after stop. */
    if (list != NULL)
        memory_reclaim(bus, list);
    else
        (void)bus__rcu_synchronize(&bus->rcu);
}

static void
memory_fini(void *priv)
{
    memory_broker *m = priv;
    memory_bus *bus = m->bus, **pp;
    bool last = true; /* a private bus is ours alone */

    if (bus == NULL)
        return; /* init failed before acquiring a bus */
    m->bus = NULL;
    if (bus->name[0] != '\0') {
        bus__mutex_lock(&memory_table_mtx);
        last = --bus->refs == 0;
        if (last) {
            for (pp = &memory_table; *pp != bus; pp = &(*pp)->next)
                ;
            *pp = bus->next;
        }
        bus__mutex_unlock(&memory_table_mtx);
    }
    if (last)
        memory_bus_free(bus);
}

/* Listed by brokers/memory/CMakeLists.txt (bus_add_builtin_broker), so
 * the library registers it at first use. */
const bus_broker_ops bus_broker_memory_ops = {
    .version = BUS_BROKER_OPS_VERSION,
    .scheme = "mem",
    .priv_size = sizeof(memory_broker),
    .init = memory_init,
    .publish = memory_publish,
    .subscribe = memory_subscribe,
    .unsubscribe = memory_unsubscribe,
    .ack = NULL, /* tokens are always 0: nothing to acknowledge */
    .flush = memory_flush,
    .health = memory_health,
    .close = memory_close,
    .stop = memory_stop,
    .fini = memory_fini,
};

int
bus_broker_memory_stats_get(const bus_broker *b, bus_broker_memory_stats *st)
{
    const memory_broker *m;

    if (b == NULL || st == NULL || b->ops != &bus_broker_memory_ops)
        return BUS_EINVAL;
    m = b->priv;
    /* relaxed: statistics; they order nothing. */
    st->published = atomic_load_explicit(&m->published, memory_order_relaxed);
    st->delivered = atomic_load_explicit(&m->delivered, memory_order_relaxed);
    st->dropped = atomic_load_explicit(&m->dropped, memory_order_relaxed);
    st->subscriptions = atomic_load_explicit(&m->nsubs, memory_order_relaxed);
    return BUS_OK;
}
