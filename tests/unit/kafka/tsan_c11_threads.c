/*
 * ThreadSanitizer builds only: C11 threads on top of pthreads.
 *
 * Debian's librdkafka uses C11 threads (thrd_create, mtx_*, cnd_*,
 * call_once). glibc 2.36 implements them by calling its internal pthread
 * functions directly, not the pthread_* symbols TSan intercepts: threads
 * made by thrd_create are unknown to TSan (it crashes in their first
 * malloc) and librdkafka's locks are invisible to it (so records handed
 * through librdkafka's queues would look like races in our code). Linked
 * into the Kafka test programs, these definitions take precedence over
 * glibc's for librdkafka (the executable comes first in symbol lookup)
 * and go through the intercepted pthread calls. Nothing here is used by
 * the library itself; the ABI matches glibc (thrd_t is pthread_t, mtx_t
 * and cnd_t wrap the pthread types, once_flag wraps an int).
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <threads.h>

typedef struct shim_start {
    thrd_start_t fn;
    void *arg;
} shim_start;

static void *
shim_trampoline(void *p)
{
    shim_start s = *(shim_start *)p;

    free(p);
    return (void *)(intptr_t)s.fn(s.arg);
}

int
thrd_create(thrd_t *thr, thrd_start_t fn, void *arg)
{
    shim_start *s = malloc(sizeof(*s));
    int rv;

    if (s == NULL)
        return thrd_nomem;
    s->fn = fn;
    s->arg = arg;
    if ((rv = pthread_create((pthread_t *)thr, NULL, shim_trampoline, s)) !=
        0) {
        free(s);
        return rv == ENOMEM ? thrd_nomem : thrd_error;
    }
    return thrd_success;
}

int
thrd_join(thrd_t thr, int *res)
{
    void *r;

    if (pthread_join((pthread_t)thr, &r) != 0)
        return thrd_error;
    if (res != NULL)
        *res = (int)(intptr_t)r;
    return thrd_success;
}

int
mtx_init(mtx_t *m, int type)
{
    pthread_mutexattr_t a;
    int rv;

    pthread_mutexattr_init(&a);
    if (type & mtx_recursive)
        pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    rv = pthread_mutex_init((pthread_mutex_t *)m, &a);
    pthread_mutexattr_destroy(&a);
    return rv == 0 ? thrd_success : thrd_error;
}

int
mtx_lock(mtx_t *m)
{
    return pthread_mutex_lock((pthread_mutex_t *)m) == 0 ? thrd_success
                                                         : thrd_error;
}

int
mtx_unlock(mtx_t *m)
{
    return pthread_mutex_unlock((pthread_mutex_t *)m) == 0 ? thrd_success
                                                           : thrd_error;
}

void
mtx_destroy(mtx_t *m)
{
    pthread_mutex_destroy((pthread_mutex_t *)m);
}

int
cnd_init(cnd_t *c)
{
    return pthread_cond_init((pthread_cond_t *)c, NULL) == 0 ? thrd_success
                                                             : thrd_error;
}

int
cnd_signal(cnd_t *c)
{
    return pthread_cond_signal((pthread_cond_t *)c) == 0 ? thrd_success
                                                         : thrd_error;
}

int
cnd_broadcast(cnd_t *c)
{
    return pthread_cond_broadcast((pthread_cond_t *)c) == 0 ? thrd_success
                                                            : thrd_error;
}

int
cnd_wait(cnd_t *c, mtx_t *m)
{
    return pthread_cond_wait((pthread_cond_t *)c, (pthread_mutex_t *)m) == 0
               ? thrd_success
               : thrd_error;
}

/* C11: an absolute TIME_UTC deadline, as pthread's default clock. */
int
cnd_timedwait(cnd_t *restrict c, mtx_t *restrict m,
              const struct timespec *restrict ts)
{
    int rv =
        pthread_cond_timedwait((pthread_cond_t *)c, (pthread_mutex_t *)m, ts);

    if (rv == 0)
        return thrd_success;
    return rv == ETIMEDOUT ? thrd_timedout : thrd_error;
}

void
cnd_destroy(cnd_t *c)
{
    pthread_cond_destroy((pthread_cond_t *)c);
}

void
call_once(once_flag *flag, void (*fn)(void))
{
    pthread_once((pthread_once_t *)flag, fn);
}
