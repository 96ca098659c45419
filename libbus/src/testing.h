/*
 * Fault injection, compiled only into bus_testing (BUS_TESTING). Tests loop
 * n = 1, 2, ... failing the nth allocation or failpoint until the operation
 * succeeds, and check each failure is clean (STYLE.md §12).
 */
#ifndef BUS_TESTING_H
#define BUS_TESTING_H

#include <bus/common.h>

#ifdef BUS_TESTING
/* The nth allocation from now (1 = the next) fails; 0 disables. With
 * persistent, every allocation after it fails too. Thread: any (atomic). */
void bus_fault_alloc_fail_nth(uint64_t n, bool persistent);
/* Allocations made since the last bus_fault_alloc_fail_nth call. */
uint64_t bus_fault_alloc_count(void);
/* True once the injected failure has fired since the last arm. */
bool bus_fault_alloc_fired(void);

/* Named failpoints: BUS_FAILPOINT("store.put") returns err on its nth hit
 * from now (and every later hit if persistent), else 0. */
void bus_failpoint_set(const char *name, int err, uint64_t nth,
                       bool persistent);
void bus_failpoint_clear_all(void);
int bus__failpoint(const char *name);
#define BUS_FAILPOINT(name) bus__failpoint(name)
#else
#define BUS_FAILPOINT(name) 0
#endif

#endif
