/*
 * Benchmark helpers: timing, a result table that prints our figure, the raw
 * baseline's and the ratio, and a target check. Benchmarks never fail the
 * build on a missed target; they print "met" or "MISSED" beside it.
 */
#ifndef BUS_BENCH_H
#define BUS_BENCH_H

#include <stdint.h>
#include <stddef.h>

uint64_t bench_now_ns(void);

/* Prevents the compiler from optimising a value away. */
#define BENCH_KEEP(x) __asm__ __volatile__("" : : "r"(x) : "memory")

/* Prints the table header once per program. */
void bench_header(const char *suite);

/* One row. unit: "ns/event" (lower is better) or "M ev/s" (higher is
 * better): the ratio is always ours/raw in the unit's own direction, so
 * for ns it is raw_time_ratio = ours/raw and for throughput ours/raw.
 * target_desc (may be NULL): e.g. ">= 1.2x raw throughput"; met says if it
 * is met. */
void bench_row(const char *name, const char *unit, double ours, double raw,
               const char *target_desc, int met);

/* A row with no baseline (e.g. throughput of a configuration). */
void bench_row_plain(const char *name, const char *unit, double value);

/* Iterations: BUS_BENCH_SCALE (default 1.0) multiplies the counts, so CI
 * can run a short pass and a person a long one. */
uint64_t bench_iters(uint64_t base);

#endif
