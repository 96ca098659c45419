/*
 * The fake:// broker (fake_broker.h). Its subscription table is guarded by
 * one mutex, never held while calling a deliver function: each delivery
 * takes a reference on its subscription record (busy), and unsubscribe
 * waits for busy to drop to zero unless called from that delivery, as the
 * SPI contract (broker.h, unsubscribe) requires.
 */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/bus.h>

#include "broker_impl.h" /* struct bus_broker: fake_of reaches priv */
#include "fake_broker.h"

typedef struct fake_sub {
    char pattern[256];
    bus_deliver_fn fn;
    void *opaque;
    atomic_int busy; /* deliveries running */
    bool live;
} fake_sub;

typedef struct fake_priv {
    fake_state st;
    pthread_mutex_t mtx;
    fake_sub subs[FAKE_MAX_SUBS];
} fake_priv;

/* Delivery nesting, per thread: which records this thread is inside. */
static _Thread_local fake_sub *fake_current[8];
static _Thread_local int fake_depth;

static int
fake_init(void *priv, const bus_broker_config *cfg, bus_uri *uri, char *errbuf,
          size_t errbuf_len)
{
    fake_priv *p = priv;

    (void)cfg;
    (void)uri;
    (void)errbuf;
    (void)errbuf_len;
    pthread_mutex_init(&p->mtx, NULL);
    atomic_init(&p->st.next_token, 1);
    return BUS_OK;
}

/* Calls every live matching subscription; returns how many took ev. */
static int
fake_fanout(fake_priv *p, const char *topic, bus_event *ev, uint64_t token,
            int *first_err)
{
    int i, took = 0;

    for (i = 0; i < FAKE_MAX_SUBS; i++) {
        fake_sub *s = &p->subs[i];
        int rv;

        pthread_mutex_lock(&p->mtx);
        if (!s->live || !bus_topic_matches(s->pattern, topic)) {
            pthread_mutex_unlock(&p->mtx);
            continue;
        }
        atomic_fetch_add(&s->busy, 1);
        pthread_mutex_unlock(&p->mtx);
        fake_current[fake_depth++] = s;
        /* The callee takes a reference on success: give it one. */
        bus_event_ref(ev);
        rv = s->fn(s->opaque, topic, ev, token, 0);
        fake_depth--;
        atomic_fetch_sub(&s->busy, 1);
        if (rv == BUS_OK) {
            took++;
        } else {
            bus_event_unref(ev);
            atomic_fetch_add(&p->st.deliver_errors, 1);
            if (first_err != NULL && *first_err == BUS_OK)
                *first_err = rv;
        }
    }
    return took;
}

static int
fake_publish(void *priv, const char *topic, bus_event *ev, unsigned flags,
             bus_ack_fn ack, void *ack_opaque)
{
    fake_priv *p = priv;
    uint64_t token = atomic_fetch_add(&p->st.next_token, 1);
    int err = BUS_OK, took;

    (void)flags;
    took = fake_fanout(p, topic, ev, token, &err);
    if (took == 0 && err != BUS_OK)
        return err; /* nobody took it: the caller keeps ev */
    atomic_fetch_add(&p->st.published, 1);
    if (ack != NULL)
        ack(ack_opaque, ev, BUS_OK);
    bus_event_unref(ev); /* the caller's reference */
    return BUS_OK;
}

static int
fake_subscribe(void *priv, const char *pattern, const char *group,
               bus_deliver_fn fn, void *opaque, void **handle)
{
    fake_priv *p = priv;
    int i;

    (void)group;
    if (atomic_load(&p->st.block_subscribe)) {
        atomic_store(&p->st.in_subscribe, 1);
        while (atomic_load(&p->st.block_subscribe))
            sched_yield();
        atomic_store(&p->st.in_subscribe, 0);
    }
    if (p->st.refuse_subscribe != 0)
        return p->st.refuse_subscribe;
    pthread_mutex_lock(&p->mtx);
    for (i = 0; i < FAKE_MAX_SUBS; i++) {
        fake_sub *s = &p->subs[i];
        if (!s->live && atomic_load(&s->busy) == 0) {
            snprintf(s->pattern, sizeof(s->pattern), "%s", pattern);
            s->fn = fn;
            s->opaque = opaque;
            s->live = true;
            *handle = s;
            atomic_fetch_add(&p->st.subscribes, 1);
            pthread_mutex_unlock(&p->mtx);
            return BUS_OK;
        }
    }
    pthread_mutex_unlock(&p->mtx);
    return BUS_ENOMEM;
}

static void
fake_unsubscribe(void *priv, void *handle)
{
    fake_priv *p = priv;
    fake_sub *s = handle;
    int i, mine = 0;

    pthread_mutex_lock(&p->mtx);
    s->live = false;
    pthread_mutex_unlock(&p->mtx);
    atomic_fetch_add(&p->st.unsubscribes, 1);
    for (i = 0; i < fake_depth; i++)
        if (fake_current[i] == s)
            mine++;
    /* Wait for deliveries running elsewhere (not our own). */
    while (atomic_load(&s->busy) > mine)
        sched_yield();
}

static void
fake_ack_op(void *priv, void *handle, uint64_t token, bus_result res)
{
    fake_priv *p = priv;
    fake_sub *s = handle;
    int i;

    pthread_mutex_lock(&p->mtx);
    /* The SPI: a handle is valid until unsubscribe returns (a real
     * backend may free it there). */
    if (!s->live)
        atomic_fetch_add(&p->st.acks_unsubscribed, 1);
    i = atomic_load(&p->st.n_acks);
    if (i < FAKE_MAX_ACKS) {
        p->st.acks[i].token = token;
        p->st.acks[i].res = res;
    }
    atomic_store(&p->st.n_acks, i + 1);
    pthread_mutex_unlock(&p->mtx);
}

static int
fake_flush(void *priv, int32_t timeout_ms)
{
    (void)priv;
    (void)timeout_ms;
    return BUS_OK;
}

static void
fake_close(void *priv)
{
    (void)priv;
}

static void
fake_stop(void *priv)
{
    (void)priv;
}

static void
fake_fini(void *priv)
{
    fake_priv *p = priv;

    pthread_mutex_destroy(&p->mtx);
}

static const bus_broker_ops fake_ops = {
    .version = BUS_BROKER_OPS_VERSION,
    .scheme = "fake",
    .priv_size = sizeof(fake_priv),
    .init = fake_init,
    .publish = fake_publish,
    .subscribe = fake_subscribe,
    .unsubscribe = fake_unsubscribe,
    .ack = fake_ack_op,
    .flush = fake_flush,
    .close = fake_close,
    .stop = fake_stop,
    .fini = fake_fini,
};

void
fake_register(void)
{
    int rv = bus_broker_register(&fake_ops);

    if (rv != BUS_OK && rv != BUS_EEXIST)
        abort();
}

fake_state *
fake_of(bus_broker *b)
{
    return &((fake_priv *)b->priv)->st;
}

int
fake_deliver(bus_broker *b, const char *topic, bus_event *ev, uint64_t token)
{
    return fake_fanout(b->priv, topic, ev, token, NULL);
}

int
fake_ack_of(bus_broker *b, uint64_t token)
{
    fake_priv *p = b->priv;
    int i, n, res = -1;

    pthread_mutex_lock(&p->mtx);
    n = atomic_load(&p->st.n_acks);
    for (i = 0; i < n && i < FAKE_MAX_ACKS; i++)
        if (p->st.acks[i].token == token)
            res = (int)p->st.acks[i].res;
    pthread_mutex_unlock(&p->mtx);
    return res;
}

int
fake_n_subs(bus_broker *b)
{
    fake_priv *p = b->priv;
    int i, n = 0;

    pthread_mutex_lock(&p->mtx);
    for (i = 0; i < FAKE_MAX_SUBS; i++)
        n += p->subs[i].live;
    pthread_mutex_unlock(&p->mtx);
    return n;
}
