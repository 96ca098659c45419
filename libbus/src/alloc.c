/*
 * The allocator behind bus__alloc and friends, the user's hooks, and (in
 * the BUS_TESTING build) allocation fault injection and named failpoints.
 *
 * Design: the hooks are process state set once before use (common.h says
 * why), read with relaxed loads: bus_allocator_set happens-before every
 * other call by contract, so no ordering is needed on the hot path.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <bus/err.h>

#include "alloc.h"
#include "platform.h"
#include "testing.h"

static void *
default_alloc(void *opaque, size_t size)
{
    (void)opaque;
    return malloc(size);
}

static void *
default_realloc(void *opaque, void *p, size_t old_size, size_t new_size)
{
    (void)opaque;
    (void)old_size;
    return realloc(p, new_size);
}

static void
default_free(void *opaque, void *p, size_t size)
{
    (void)opaque;
    (void)size;
    free(p);
}

static bus_allocator alloc_hooks = {
    default_alloc, default_realloc, default_free, NULL,
};

int
bus_allocator_set(const bus_allocator *a)
{
    if (a == NULL) {
        alloc_hooks = (bus_allocator){
            default_alloc, default_realloc, default_free, NULL,
        };
        return BUS_OK;
    }
    if (a->alloc == NULL || a->realloc == NULL || a->free == NULL)
        return BUS_EINVAL;
    alloc_hooks = *a;
    return BUS_OK;
}

#ifdef BUS_TESTING
static _Atomic uint64_t fault_nth;      /* 0: disarmed */
static _Atomic uint64_t fault_count;
static atomic_bool fault_persistent;
static atomic_bool fault_fired;

void
bus_fault_alloc_fail_nth(uint64_t n, bool persistent)
{
    atomic_store(&fault_count, 0);
    atomic_store(&fault_fired, false);
    atomic_store(&fault_persistent, persistent);
    atomic_store(&fault_nth, n);
}

uint64_t
bus_fault_alloc_count(void)
{
    return atomic_load(&fault_count);
}

bool
bus_fault_alloc_fired(void)
{
    return atomic_load(&fault_fired);
}

static bool
fault_alloc_should_fail(void)
{
    uint64_t nth = atomic_load_explicit(&fault_nth, memory_order_relaxed);
    uint64_t c;

    if (nth == 0)
        return false;
    c = atomic_fetch_add(&fault_count, 1) + 1;
    if (c == nth || (c > nth && atomic_load(&fault_persistent))) {
        atomic_store(&fault_fired, true);
        return true;
    }
    return false;
}

#define FP_MAX 64
typedef struct failpoint {
    char name[48];
    int err;
    uint64_t nth;
    uint64_t hits;
    bool persistent;
} failpoint;

static bus__mutex fp_mtx;
static failpoint fp_table[FP_MAX];
static atomic_int fp_count; /* fast path: no failpoint armed */
static atomic_flag fp_init_lock = ATOMIC_FLAG_INIT;
static atomic_bool fp_inited;

static void
fp_init(void)
{
    if (atomic_load(&fp_inited))
        return;
    while (atomic_flag_test_and_set(&fp_init_lock))
        bus__thread_yield();
    if (!atomic_load(&fp_inited)) {
        bus__mutex_init(&fp_mtx);
        atomic_store(&fp_inited, true);
    }
    atomic_flag_clear(&fp_init_lock);
}

void
bus_failpoint_set(const char *name, int err, uint64_t nth, bool persistent)
{
    int i, n;

    fp_init();
    bus__mutex_lock(&fp_mtx);
    n = atomic_load(&fp_count);
    for (i = 0; i < n; i++)
        if (strcmp(fp_table[i].name, name) == 0)
            break;
    if (i == n) {
        if (n == FP_MAX) {
            bus__mutex_unlock(&fp_mtx);
            return;
        }
        atomic_store(&fp_count, n + 1);
    }
    memset(&fp_table[i], 0, sizeof(fp_table[i]));
    strncpy(fp_table[i].name, name, sizeof(fp_table[i].name) - 1);
    fp_table[i].err = err;
    fp_table[i].nth = nth;
    fp_table[i].persistent = persistent;
    bus__mutex_unlock(&fp_mtx);
}

void
bus_failpoint_clear_all(void)
{
    fp_init();
    bus__mutex_lock(&fp_mtx);
    atomic_store(&fp_count, 0);
    bus__mutex_unlock(&fp_mtx);
}

int
bus__failpoint(const char *name)
{
    int i, n, rv = 0;

    if (atomic_load_explicit(&fp_count, memory_order_relaxed) == 0)
        return 0;
    fp_init();
    bus__mutex_lock(&fp_mtx);
    n = atomic_load(&fp_count);
    for (i = 0; i < n; i++) {
        failpoint *f = &fp_table[i];
        if (strcmp(f->name, name) != 0)
            continue;
        f->hits++;
        if (f->hits == f->nth || (f->hits > f->nth && f->persistent))
            rv = f->err;
        break;
    }
    bus__mutex_unlock(&fp_mtx);
    return rv;
}
#define FAULT_CHECK(ret)                                                   \
    do {                                                                   \
        if (fault_alloc_should_fail())                                     \
            return ret;                                                    \
    } while (0)
#else
#define FAULT_CHECK(ret) ((void)0)
#endif

void *
bus__alloc(size_t size)
{
    FAULT_CHECK(NULL);
    return alloc_hooks.alloc(alloc_hooks.opaque, size ? size : 1);
}

void *
bus__zalloc(size_t size)
{
    void *p = bus__alloc(size);

    if (p != NULL)
        memset(p, 0, size);
    return p;
}

void *
bus__realloc(void *p, size_t old_size, size_t new_size)
{
    if (p == NULL)
        return bus__alloc(new_size);
    FAULT_CHECK(NULL);
    return alloc_hooks.realloc(alloc_hooks.opaque, p, old_size,
                               new_size ? new_size : 1);
}

void *
bus__alloc_chunk(size_t size)
{
    return alloc_hooks.alloc(alloc_hooks.opaque, size ? size : 1);
}

bool
bus__alloc_fault(void)
{
#ifdef BUS_TESTING
    return fault_alloc_should_fail();
#else
    return false;
#endif
}

void
bus__free(void *p, size_t size)
{
    if (p != NULL)
        alloc_hooks.free(alloc_hooks.opaque, p, size ? size : 1);
}

char *
bus__strdup(const char *s, size_t *len_out)
{
    size_t n = strlen(s) + 1;
    char *d = bus__alloc(n);

    if (d != NULL)
        memcpy(d, s, n);
    if (len_out != NULL)
        *len_out = n;
    return d;
}

void
bus__strfree(char *s)
{
    if (s != NULL)
        bus__free(s, strlen(s) + 1);
}
