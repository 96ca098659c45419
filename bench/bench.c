/* Benchmark table printing (bench.h). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "bench.h"

uint64_t
bench_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void
bench_header(const char *suite)
{
    printf("\n== %s ==\n", suite);
    printf("%-46s %12s %12s %8s  %s\n", "benchmark", "ours", "raw", "ratio",
           "target");
}

void
bench_row(const char *name, const char *unit, double ours, double raw,
          const char *target_desc, int met)
{
    double ratio = raw > 0 ? ours / raw : 0;
    /* A side left out (a partial run, e.g. BUS_BENCH_ZMQ_ONLY) is no
     * measurement: no verdict on the target. */
    const char *verdict = ours <= 0 || raw <= 0 ? "not run"
                          : met                 ? "met"
                                                : "MISSED";

    printf("%-46s %12.2f %12.2f %7.2fx  %s%s%s  (%s)\n", name, ours, raw,
           ratio, target_desc ? target_desc : "", target_desc ? ": " : "",
           target_desc ? verdict : "", unit);
    fflush(stdout);
}

void
bench_row_plain(const char *name, const char *unit, double value)
{
    printf("%-46s %12.2f %12s %8s  (%s)\n", name, value, "-", "-", unit);
    fflush(stdout);
}

uint64_t
bench_iters(uint64_t base)
{
    const char *s = getenv("BUS_BENCH_SCALE");
    double scale = s ? atof(s) : 1.0;
    uint64_t n;

    if (scale <= 0)
        scale = 1.0;
    n = (uint64_t)((double)base * scale);
    return n ? n : 1;
}
