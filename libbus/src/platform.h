/*
 * The platform layer: threads, mutexes, condition variables, clocks. Only
 * platform/posix/ includes pthread.h; everything else uses these wrappers.
 * Mutex and condvar failures other than EBUSY/ETIMEDOUT are programmer
 * errors and abort.
 */
#ifndef BUS_PLATFORM_H
#define BUS_PLATFORM_H

#include <bus/common.h>

#if defined(__x86_64__) || defined(__i386__)
#define bus__cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define bus__cpu_relax() __asm__ __volatile__("yield")
#else
#define bus__cpu_relax() ((void)0)
#endif

#define BUS_CACHELINE 64

/* Hot thread-locals: initial-exec, so that an access in libbus.so is a
 * %fs-relative load instead of a __tls_get_addr call (callgrind: ~56
 * instructions per event created). Costs static TLS space, which glibc
 * reserves for libraries loaded at startup (and some for dlopen). */
#if defined(__GNUC__) && !defined(BUS_NO_TLS_IE)
#define BUS__TLS _Thread_local __attribute__((tls_model("initial-exec")))
#else
#define BUS__TLS _Thread_local
#endif

/* Opaque storage sized for pthread types on glibc/musl x86_64/aarch64;
 * platform/posix/thread.c checks the sizes with static asserts. */
typedef struct bus__mutex {
    _Alignas(8) unsigned char opaque[48];
} bus__mutex;
typedef struct bus__cond {
    _Alignas(8) unsigned char opaque[56];
} bus__cond;
typedef struct bus__thread {
    uintptr_t handle;
} bus__thread;

void bus__mutex_init(bus__mutex *m);
void bus__mutex_fini(bus__mutex *m);
void bus__mutex_lock(bus__mutex *m);
void bus__mutex_unlock(bus__mutex *m);

/* Condition variables wait on CLOCK_MONOTONIC. */
void bus__cond_init(bus__cond *c);
void bus__cond_fini(bus__cond *c);
void bus__cond_wait(bus__cond *c, bus__mutex *m);
/* Waits until the monotonic deadline (ns); false when it passed. */
bool bus__cond_wait_until(bus__cond *c, bus__mutex *m, uint64_t deadline_ns);
void bus__cond_signal(bus__cond *c);
void bus__cond_broadcast(bus__cond *c);

/* Starts fn(arg) on a new thread named name (<= 15 chars, for debuggers).
 * Returns BUS_OK or BUS_ENOMEM/BUS_EAGAIN. */
int bus__thread_start(bus__thread *t, const char *name, void (*fn)(void *),
                      void *arg);
void bus__thread_join(bus__thread *t);
void bus__thread_yield(void);

/* Clocks, in nanoseconds. */
uint64_t bus__clock_mono_ns(void);
int64_t bus__clock_real_ns(void);
/* Sleeps (for tests and backoff only; never to wait for a condition). */
void bus__sleep_ns(uint64_t ns);

/* A thread-local slot whose destructor runs when a thread that set it to
 * non-NULL exits (pthread keys). For caches that must outlive threads. */
typedef struct bus__tls {
    uintptr_t key;
} bus__tls;
/* BUS_OK or BUS_EAGAIN (no key left). Call once per key. */
int bus__tls_create(bus__tls *k, void (*dtor)(void *));
void bus__tls_set(bus__tls *k, void *value);

/* Process-wide memory barrier (membarrier(2), private expedited): when it
 * returns, every other running thread of the process has passed a full
 * barrier, so readers may order their accesses with compiler barriers
 * only. bus__membarrier_init registers the process (once; any thread)
 * and returns whether the command is available; bus__membarrier must be
 * called only after it returned true, and returns false if the kernel
 * refused anyway. */
bool bus__membarrier_init(void);
bool bus__membarrier(void);

/* Fills buf with len random bytes from a per-thread generator seeded from
 * the OS (getrandom); fast, not for secrets. */
void bus__random_bytes(void *buf, size_t len);
uint64_t bus__random_u64(void);

#endif
