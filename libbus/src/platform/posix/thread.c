/*
 * POSIX implementation of platform.h: the only file that includes
 * pthread.h. Failures of mutex/condvar calls other than ETIMEDOUT are
 * programmer errors (destroyed or uninitialised objects) and abort.
 *
 * _GNU_SOURCE: pthread_setname_np (thread names in debuggers) and
 * getrandom; this is the one file allowed OS extensions.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/membarrier.h>
#endif
#include <stdatomic.h>

#include <bus/err.h>

#include "alloc.h"
#include "platform.h"

_Static_assert(sizeof(pthread_mutex_t) <= sizeof(bus__mutex),
               "bus__mutex too small for pthread_mutex_t");
_Static_assert(sizeof(pthread_cond_t) <= sizeof(bus__cond),
               "bus__cond too small for pthread_cond_t");

#define MTX(m) ((pthread_mutex_t *)(void *)(m)->opaque)
#define CND(c) ((pthread_cond_t *)(void *)(c)->opaque)

static void
platform_check(int rv, const char *what)
{
    if (rv != 0) {
        fprintf(stderr, "libbus: %s failed: %s\n", what, strerror(rv));
        abort();
    }
}

void
bus__mutex_init(bus__mutex *m)
{
    platform_check(pthread_mutex_init(MTX(m), NULL), "pthread_mutex_init");
}

void
bus__mutex_fini(bus__mutex *m)
{
    platform_check(pthread_mutex_destroy(MTX(m)), "pthread_mutex_destroy");
}

void
bus__mutex_lock(bus__mutex *m)
{
    platform_check(pthread_mutex_lock(MTX(m)), "pthread_mutex_lock");
}

void
bus__mutex_unlock(bus__mutex *m)
{
    platform_check(pthread_mutex_unlock(MTX(m)), "pthread_mutex_unlock");
}

void
bus__cond_init(bus__cond *c)
{
    pthread_condattr_t a;

    platform_check(pthread_condattr_init(&a), "pthread_condattr_init");
    platform_check(pthread_condattr_setclock(&a, CLOCK_MONOTONIC),
                   "pthread_condattr_setclock");
    platform_check(pthread_cond_init(CND(c), &a), "pthread_cond_init");
    pthread_condattr_destroy(&a);
}

void
bus__cond_fini(bus__cond *c)
{
    platform_check(pthread_cond_destroy(CND(c)), "pthread_cond_destroy");
}

void
bus__cond_wait(bus__cond *c, bus__mutex *m)
{
    platform_check(pthread_cond_wait(CND(c), MTX(m)), "pthread_cond_wait");
}

bool
bus__cond_wait_until(bus__cond *c, bus__mutex *m, uint64_t deadline_ns)
{
    struct timespec ts;
    int rv;

    ts.tv_sec = (time_t)(deadline_ns / 1000000000u);
    ts.tv_nsec = (long)(deadline_ns % 1000000000u);
    rv = pthread_cond_timedwait(CND(c), MTX(m), &ts);
    if (rv == ETIMEDOUT)
        return false;
    platform_check(rv, "pthread_cond_timedwait");
    return true;
}

void
bus__cond_signal(bus__cond *c)
{
    platform_check(pthread_cond_signal(CND(c)), "pthread_cond_signal");
}

void
bus__cond_broadcast(bus__cond *c)
{
    platform_check(pthread_cond_broadcast(CND(c)), "pthread_cond_broadcast");
}

typedef struct thread_start {
    void (*fn)(void *);
    void *arg;
    char name[16];
} thread_start;

static void *
thread_trampoline(void *p)
{
    thread_start ts = *(thread_start *)p;

    bus__free(p, sizeof(thread_start));
#ifdef __GLIBC__
    pthread_setname_np(pthread_self(), ts.name);
#endif
    ts.fn(ts.arg);
    return NULL;
}

int
bus__thread_start(bus__thread *t, const char *name, void (*fn)(void *),
                  void *arg)
{
    thread_start *ts = bus__alloc(sizeof(*ts));
    pthread_t th;
    int rv;

    if (ts == NULL)
        return BUS_ENOMEM;
    ts->fn = fn;
    ts->arg = arg;
    snprintf(ts->name, sizeof(ts->name), "%s", name ? name : "bus");
    rv = pthread_create(&th, NULL, thread_trampoline, ts);
    if (rv != 0) {
        bus__free(ts, sizeof(*ts));
        return rv == EAGAIN ? BUS_EAGAIN : BUS_ENOMEM;
    }
    t->handle = (uintptr_t)th;
    return BUS_OK;
}

void
bus__thread_join(bus__thread *t)
{
    platform_check(pthread_join((pthread_t)t->handle, NULL), "pthread_join");
}

void
bus__thread_yield(void)
{
    sched_yield();
}

uint64_t
bus__clock_mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t
bus__clock_real_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

_Static_assert(sizeof(pthread_key_t) <= sizeof(uintptr_t),
               "bus__tls too small for pthread_key_t");

int
bus__tls_create(bus__tls *k, void (*dtor)(void *))
{
    pthread_key_t key;

    if (pthread_key_create(&key, dtor) != 0)
        return BUS_EAGAIN;
    k->key = (uintptr_t)key;
    return BUS_OK;
}

void
bus__tls_set(bus__tls *k, void *value)
{
    (void)pthread_setspecific((pthread_key_t)k->key, value);
}

/* 0: not tried, 1: available, -1: not available. */
static atomic_int membarrier_state;

bool
bus__membarrier_init(void)
{
    int st = atomic_load_explicit(&membarrier_state, memory_order_acquire);

    if (st != 0)
        return st > 0;
#if defined(__linux__) && defined(SYS_membarrier)
    {
        long cmds = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
        /* Registering is idempotent, so two threads racing here agree. */
        if (cmds >= 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED)
            && syscall(SYS_membarrier,
                       MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0)
                   == 0)
            st = 1;
        else
            st = -1;
    }
#else
    st = -1;
#endif
    atomic_store_explicit(&membarrier_state, st, memory_order_release);
    return st > 0;
}

bool
bus__membarrier(void)
{
#if defined(__linux__) && defined(SYS_membarrier)
    return syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)
        == 0;
#else
    return false;
#endif
}

void
bus__sleep_ns(uint64_t ns)
{
    struct timespec ts;

    ts.tv_sec = (time_t)(ns / 1000000000u);
    ts.tv_nsec = (long)(ns % 1000000000u);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* xoshiro256** per thread, seeded from getrandom(2). */
static BUS__TLS uint64_t rng_s[4];
static BUS__TLS bool rng_seeded;

static uint64_t
rng_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static void
rng_seed(void)
{
    uint64_t t = bus__clock_mono_ns();
    size_t i;

    if (getrandom(rng_s, sizeof(rng_s), 0) != (ssize_t)sizeof(rng_s)) {
        /* splitmix64 from the clock and the stack address */
        uint64_t z = t ^ (uint64_t)(uintptr_t)&t;
        for (i = 0; i < 4; i++) {
            z += 0x9e3779b97f4a7c15u;
            uint64_t x = z;
            x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
            x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
            rng_s[i] = x ^ (x >> 31);
        }
    }
    if ((rng_s[0] | rng_s[1] | rng_s[2] | rng_s[3]) == 0)
        rng_s[0] = 1;
    rng_seeded = true;
}

uint64_t
bus__random_u64(void)
{
    uint64_t r, t;

    if (!rng_seeded)
        rng_seed();
    r = rng_rotl(rng_s[1] * 5, 7) * 9;
    t = rng_s[1] << 17;
    rng_s[2] ^= rng_s[0];
    rng_s[3] ^= rng_s[1];
    rng_s[1] ^= rng_s[2];
    rng_s[0] ^= rng_s[3];
    rng_s[2] ^= t;
    rng_s[3] = rng_rotl(rng_s[3], 45);
    return r;
}

void
bus__random_bytes(void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len >= 8) {
        uint64_t r = bus__random_u64();
        memcpy(p, &r, 8);
        p += 8;
        len -= 8;
    }
    if (len > 0) {
        uint64_t r = bus__random_u64();
        memcpy(p, &r, len);
    }
}
