/*
 * SRCU-like read-copy-update (design in rcu.h).
 *
 * Per-thread state: a slot index (an owned slot claimed on first use and
 * given back at thread exit, or the shared one) and a small stack of the
 * sections the thread holds, so that synchronize knows whether the
 * caller is inside a section of the domain.
 */
#include <stdio.h>
#include <stdlib.h>

#include <bus/err.h>

#include "rcu.h"

#if defined(__SANITIZE_THREAD__)
#define RCU_USE_MEMBARRIER 0 /* TSan does not model membarrier(2) */
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RCU_USE_MEMBARRIER 0
#endif
#endif
#ifndef RCU_USE_MEMBARRIER
#define RCU_USE_MEMBARRIER 1
#endif

#define RCU_NEST_MAX 16

typedef struct rcu_held {
    const bus__rcu *r;
    uint32_t token;
} rcu_held;

/* Owners of the owned slots, process-wide (a slot index is the same in
 * every domain). */
static atomic_bool rcu_slot_taken[BUS_RCU_OWNED];
static atomic_flag rcu_key_lock = ATOMIC_FLAG_INIT;
static bool rcu_key_ok;
static bus__tls rcu_key;
static BUS__TLS int32_t rcu_slot = -1;
static BUS__TLS rcu_held rcu_stack[RCU_NEST_MAX];
static BUS__TLS uint32_t rcu_depth;

void
bus__rcu_init(bus__rcu *r)
{
    int i;

    atomic_init(&r->gen, 0);
    r->memb = RCU_USE_MEMBARRIER && bus__membarrier_init();
    for (i = 0; i < BUS_RCU_SLOTS; i++) {
        atomic_init(&r->slots[i].cnt[0], 0);
        atomic_init(&r->slots[i].cnt[1], 0);
    }
    bus__mutex_init(&r->sync_mtx);
}

void
bus__rcu_fini(bus__rcu *r)
{
    bus__mutex_fini(&r->sync_mtx);
}

/* Thread exit: give the owned slot back. Its counters are back to
 * their values before the thread's first section (sections are closed
 * LIFO before a thread can exit). release: our last counter stores
 * happen-before the next owner's loads. */
static void
rcu_slot_release(void *arg)
{
    uintptr_t slot = (uintptr_t)arg - 1;

    rcu_slot = -1;
    if (slot < BUS_RCU_OWNED)
        atomic_store_explicit(&rcu_slot_taken[slot], false,
                              memory_order_release);
}

static uint32_t
rcu_slot_claim(void)
{
    uint32_t i;

    while (atomic_flag_test_and_set_explicit(&rcu_key_lock,
                                             memory_order_acquire))
        bus__thread_yield();
    if (!rcu_key_ok)
        rcu_key_ok = bus__tls_create(&rcu_key, rcu_slot_release) == BUS_OK;
    atomic_flag_clear_explicit(&rcu_key_lock, memory_order_release);
    for (i = 0; rcu_key_ok && i < BUS_RCU_OWNED; i++) {
        bool expect = false;
        /* acquire: the previous owner's counter stores (its release). */
        if (!atomic_load_explicit(&rcu_slot_taken[i], memory_order_relaxed)
            && atomic_compare_exchange_strong_explicit(
                &rcu_slot_taken[i], &expect, true, memory_order_acquire,
                memory_order_relaxed)) {
            bus__tls_set(&rcu_key, (void *)(uintptr_t)(i + 1));
            return i;
        }
    }
    return BUS_RCU_OWNED; /* the shared slot */
}

static inline uint32_t
rcu_my_slot(void)
{
    if (rcu_slot < 0)
        rcu_slot = (int32_t)rcu_slot_claim();
    return (uint32_t)rcu_slot;
}

uint32_t
bus__rcu_enter(bus__rcu *r)
{
    uint32_t slot = rcu_my_slot();
    uint32_t idx = atomic_load_explicit(&r->gen, memory_order_relaxed) & 1;
    uint32_t token = slot << 1 | idx;
    _Atomic int64_t *c = &r->slots[slot].cnt[idx];

    if (r->memb && slot < BUS_RCU_OWNED) {
        /* One writer (us): a plain increment. The compiler barrier keeps
         * the section's loads after it; the writer's membarrier does the
         * rest (rcu.h). */
        atomic_store_explicit(
            c, atomic_load_explicit(c, memory_order_relaxed) + 1,
            memory_order_relaxed);
        atomic_signal_fence(memory_order_seq_cst);
    } else {
        /* seq_cst: see rcu.h (pairs with the writer's flip and reads). */
        atomic_fetch_add_explicit(c, 1, memory_order_seq_cst);
    }
    if (rcu_depth < RCU_NEST_MAX)
        rcu_stack[rcu_depth] = (rcu_held){r, token};
    rcu_depth++;
    return token;
}

void
bus__rcu_exit(bus__rcu *r, uint32_t token)
{
    uint32_t slot = token >> 1;
    _Atomic int64_t *c = &r->slots[slot].cnt[token & 1];

    /* Sections nest properly (LIFO) within a thread. */
    rcu_depth--;
    if (r->memb && slot < BUS_RCU_OWNED) {
        atomic_signal_fence(memory_order_seq_cst); /* section before */
        atomic_store_explicit(
            c, atomic_load_explicit(c, memory_order_relaxed) - 1,
            memory_order_relaxed);
    } else {
        /* release: the section's reads happen-before the writer's
         * reclaim. */
        atomic_fetch_sub_explicit(c, 1, memory_order_release);
    }
}

/* The writer's side of the membarrier scheme: a full barrier on every
 * thread of the process. Registered at init, so a refusal now is a
 * broken promise of the kernel: we cannot fall back (readers already
 * skip their fences), so abort. */
static void
rcu_barrier(bus__rcu *r)
{
    if (r->memb && !bus__membarrier()) {
        fprintf(stderr, "libbus: membarrier failed after registration\n");
        abort();
    }
}

bool
bus__rcu_in_section(const bus__rcu *r)
{
    uint32_t i, n = rcu_depth < RCU_NEST_MAX ? rcu_depth : RCU_NEST_MAX;

    for (i = 0; i < n; i++)
        if (rcu_stack[i].r == r)
            return true;
    return false;
}

static void
rcu_wait_drained(bus__rcu *r, uint32_t idx)
{
    uint32_t spins = 0;

    for (;;) {
        int64_t sum = 0;
        int i;
        for (i = 0; i < BUS_RCU_SLOTS; i++)
            sum += atomic_load_explicit(&r->slots[i].cnt[idx],
                                        memory_order_seq_cst);
        if (sum == 0)
            return;
        if (++spins < 200)
            bus__cpu_relax();
        else if (spins < 400)
            bus__thread_yield();
        else
            bus__sleep_ns(20000);
    }
}

bool
bus__rcu_synchronize(bus__rcu *r)
{
    int round;

    /* Inside a section of r (a handler, or a publish that runs inline
     * handlers), waiting is unsafe: another thread's section may itself
     * be waiting on us (a publisher blocked on a full queue that our
     * worker drains). Return at once; the caller defers reclamation. */
    if (bus__rcu_in_section(r))
        return false;
    bus__mutex_lock(&r->sync_mtx);
    for (round = 0; round < 2; round++) {
        uint32_t old = atomic_load_explicit(&r->gen, memory_order_seq_cst);
        atomic_store_explicit(&r->gen, old ^ 1, memory_order_seq_cst);
        /* Readers whose increment we then miss see our earlier stores. */
        rcu_barrier(r);
        rcu_wait_drained(r, old & 1);
    }
    /* The drained readers' loads are complete before we reclaim. */
    rcu_barrier(r);
    bus__mutex_unlock(&r->sync_mtx);
    return true;
}

/* One pass over every counter of both generations. A section that began
 * before the call and is still running holds a non-zero counter for the
 * whole pass; one whose increment comes after the pass read its counter
 * is ordered after it (seq_cst), hence after the caller's earlier store
 * of the new pointer, and cannot see what was retired. */
bool
bus__rcu_poll(bus__rcu *r)
{
    int i;

    if (bus__rcu_in_section(r))
        return false;
    rcu_barrier(r); /* as in synchronize */
    for (i = 0; i < BUS_RCU_SLOTS; i++)
        if (atomic_load_explicit(&r->slots[i].cnt[0], memory_order_seq_cst)
                != 0
            || atomic_load_explicit(&r->slots[i].cnt[1],
                                    memory_order_seq_cst)
                   != 0)
            return false;
    rcu_barrier(r);
    return true;
}
