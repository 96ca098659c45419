/*
 * Read-copy-update for the subscription tables (internal).
 *
 * Why our own and not liburcu: the core depends on nothing but libc, and
 * readers here are arbitrary user threads (publishers) that we cannot ask
 * to register or to announce quiescent states. The scheme is SRCU-like:
 * readers increment a counter for the current generation (0 or 1) in one
 * of 64 cache-line-padded slots chosen per thread, so publishers on
 * different threads do not share a cache line; the writer flips the
 * generation and waits until the old generation's counters drain, twice
 * (a reader may have read the generation just before a flip and
 * incremented just after the writer's check; the second round catches
 * it).
 *
 * Read sections without atomic RMWs (liburcu's membarrier flavour, our
 * own code). The first BUS_RCU_OWNED threads to read each own a slot for
 * as long as they live (claimed with a CAS, given back at thread exit),
 * so a slot's counters have one writer, who updates them with a plain
 * load and store and a compiler barrier. The missing hardware fences are
 * supplied by the writer: synchronize and poll call membarrier(2)
 * (private expedited), which runs a full barrier on every thread of the
 * process, between storing the new pointer and reading the counters, and
 * again after finding them drained (so the readers' loads before their
 * decrement are complete before the reclaim). A reader whose increment
 * the writer missed is then ordered after the writer's earlier stores,
 * exactly as with seq_cst RMWs. Threads beyond BUS_RCU_OWNED share one
 * more slot with atomic RMWs. When the kernel refuses membarrier (or
 * under ThreadSanitizer, which does not model it), every section uses
 * seq_cst RMWs as described above: two uncontended atomic RMWs per
 * section.
 *
 * Orders: reader increment and the writer's flip and counter reads are
 * seq_cst, so a reader the writer did not see has its later loads of the
 * protected pointer ordered after the writer's store of the new one. The
 * reader's decrement is release and the writer's reads acquire (covered by
 * seq_cst), so everything the reader did happens-before the reclaim.
 *
 * Nesting: a thread may hold several sections (a handler that publishes).
 * The thread remembers which domains it holds sections of (up to 16
 * deep); bus__rcu_synchronize called inside a section of the same domain
 * does not wait at all (waiting could deadlock: another thread's section
 * may be waiting for this one, e.g. a publisher blocked on a queue that
 * this worker drains) and returns false, so the caller defers
 * reclamation to a later grace period.
 */
#ifndef BUS_RCU_H
#define BUS_RCU_H

#include <stdatomic.h>

#include "platform.h"

#define BUS_RCU_OWNED 64                  /* slots owned by one thread */
#define BUS_RCU_SLOTS (BUS_RCU_OWNED + 1) /* + the shared one */

typedef struct bus__rcu_slot {
    _Alignas(BUS_CACHELINE) _Atomic int64_t cnt[2];
} bus__rcu_slot;

typedef struct bus__rcu {
    _Alignas(BUS_CACHELINE) _Atomic uint32_t gen;
    bool memb; /* readers of owned slots use plain stores (membarrier) */
    bus__mutex sync_mtx; /* serialises writers' grace periods */
    bus__rcu_slot slots[BUS_RCU_SLOTS];
} bus__rcu;

void bus__rcu_init(bus__rcu *r);
void bus__rcu_fini(bus__rcu *r);

/* Enters a read section; returns a token for bus__rcu_exit. */
uint32_t bus__rcu_enter(bus__rcu *r);
void bus__rcu_exit(bus__rcu *r, uint32_t token);

/* True when the calling thread is inside a read section of r. */
bool bus__rcu_in_section(const bus__rcu *r);

/* Waits until every read section that began before the call has ended
 * and returns true. Inside a section of r it returns false at once
 * without waiting: nothing retired may be freed yet. Blocks. */
bool bus__rcu_synchronize(bus__rcu *r);

/* Never blocks: true when no read section of r was running at some
 * instant during the call, which ends a grace period for everything
 * retired before it (as synchronize returning true does); false when one
 * was, or when the caller is inside a section of r. */
bool bus__rcu_poll(bus__rcu *r);

#endif
