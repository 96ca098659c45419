/*
 * SRCU-like read-copy-update (design in rcu.h).
 *
 * Per-thread state: a slot index (assigned round-robin on first use) and a
 * small stack of the sections the thread holds, so that synchronize knows
 * the caller's own contribution to the counters.
 */
#include "rcu.h"

#define RCU_NEST_MAX 16

typedef struct rcu_held {
    const bus__rcu *r;
    uint32_t token;
} rcu_held;

static _Atomic uint32_t rcu_next_slot;
static _Thread_local int32_t rcu_slot = -1;
static _Thread_local rcu_held rcu_stack[RCU_NEST_MAX];
static _Thread_local uint32_t rcu_depth;

void
bus__rcu_init(bus__rcu *r)
{
    int i;

    atomic_init(&r->gen, 0);
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

static uint32_t
rcu_my_slot(void)
{
    if (rcu_slot < 0)
        rcu_slot = (int32_t)(atomic_fetch_add_explicit(
                                 &rcu_next_slot, 1, memory_order_relaxed)
                             % BUS_RCU_SLOTS);
    return (uint32_t)rcu_slot;
}

uint32_t
bus__rcu_enter(bus__rcu *r)
{
    uint32_t slot = rcu_my_slot();
    uint32_t idx = atomic_load_explicit(&r->gen, memory_order_relaxed) & 1;
    uint32_t token = slot << 1 | idx;

    /* seq_cst: see rcu.h (pairs with the writer's flip and reads). */
    atomic_fetch_add_explicit(&r->slots[slot].cnt[idx], 1,
                              memory_order_seq_cst);
    if (rcu_depth < RCU_NEST_MAX)
        rcu_stack[rcu_depth] = (rcu_held){r, token};
    rcu_depth++;
    return token;
}

void
bus__rcu_exit(bus__rcu *r, uint32_t token)
{
    /* Sections nest properly (LIFO) within a thread. */
    rcu_depth--;
    /* release: the section's reads happen-before the writer's reclaim. */
    atomic_fetch_sub_explicit(&r->slots[token >> 1].cnt[token & 1], 1,
                              memory_order_release);
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
        rcu_wait_drained(r, old & 1);
    }
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
    for (i = 0; i < BUS_RCU_SLOTS; i++)
        if (atomic_load_explicit(&r->slots[i].cnt[0], memory_order_seq_cst)
                != 0
            || atomic_load_explicit(&r->slots[i].cnt[1],
                                    memory_order_seq_cst)
                   != 0)
            return false;
    return true;
}
