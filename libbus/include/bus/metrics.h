/*
 * libbus metrics: a registry of named metric families with labels
 * (counters, gauges, latency histograms), recorded through handles on the
 * hot path and read as a snapshot struct or as Prometheus text.
 *
 * Registering ("get or create") looks a series up by family name and label
 * set once and returns a handle; recording into a handle is then a few
 * instructions with no lookup, no lock and no atomic read-modify-write:
 *
 *     bus_label l[] = {{"topic", "orders.placed"},
 *                      {"subscription", "billing"}};
 *     bus_hist *h;
 *     bus_metrics_hist(m, "bus_handler_latency_seconds",
 *                      "Handler run time.", l, 2, &h);
 *     ...
 *     bus_hist_record(h, end_ns - start_ns);  // any thread, ~7 ns
 *
 * Counters and histograms are per thread: a thread that records gets a
 * cache-line-padded cell of its own in each of them (up to `shards`
 * threads at a time; the others share one more cell, with atomic adds),
 * updated with a plain load and store, and readers sum the cells.
 * Histograms are log-linear (64 linear sub-buckets per power of two, as
 * HdrHistogram): quantiles are within 0.79% of the exact sample value, and
 * the Prometheus buckets are exact. docs/metrics.md has the names, the
 * accuracy and the cost.
 *
 * Recording functions take a NULL handle as a no-op, so a component can
 * run with metrics disabled by leaving its handles NULL.
 */
#ifndef BUS_METRICS_H
#define BUS_METRICS_H

#include <bus/common.h>
#include <bus/log.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_metrics bus_metrics;
typedef struct bus_counter bus_counter;
typedef struct bus_gauge bus_gauge;
typedef struct bus_hist bus_hist;

/* One label: name (Prometheus label name syntax [a-zA-Z_][a-zA-Z0-9_]*,
 * not starting with "__"; "le" is reserved in histograms) and value (any
 * UTF-8 text; escaped on output). */
typedef struct bus_label {
    const char *name;
    const char *value;
} bus_label;

typedef enum bus_metric_type {
    BUS_METRIC_COUNTER = 1,  /* monotonic uint64 */
    BUS_METRIC_GAUGE = 2,    /* int64 or double, goes up and down */
    BUS_METRIC_HISTOGRAM = 3 /* latency distribution, values in ns */
} bus_metric_type;

/* Registry configuration: zero means default (bus_metrics_config_init
 * fills the defaults and size). Copied by bus_metrics_new. */
typedef struct bus_metrics_config {
    size_t size;          /* sizeof(bus_metrics_config), set by _init */
    uint32_t shards;      /* live recording threads that get their own
                           * cell in each counter and histogram (the
                           * process's first `shards` thread slots; the
                           * rest share one cell, with atomic adds);
                           * default: online CPUs, 4..16; 1..256. Each
                           * histogram costs (shards + 1) x 16 KiB
                           * (docs/metrics.md). */
    uint64_t hist_max_ns; /* highest value histograms resolve, rounded up
                           * to a power of two; default 2^36 ns (68.7 s);
                           * 2^10..2^62. Larger samples are counted and
                           * summed exactly, but their quantiles read as
                           * this value. */
    /* Prometheus `le` bucket bounds, in ns, strictly ascending, below
     * hist_max_ns, at least 1/64 apart; NULL: 1 us .. 10 s in 1-2.5-5
     * steps (docs/metrics.md). Exact: a sample equal to a bound counts in
     * its le. Copied. hist_bounds_len entries, 1..64. */
    const uint64_t *hist_bounds_ns;
    size_t hist_bounds_len;
    uint32_t max_series; /* limit on live series over all families,
                          * against label explosion (e.g. a label per
                          * topic); default 10000; registering more
                          * returns BUS_ETOOBIG */
    bus_logger log;      /* default: none */
} bus_metrics_config;

/* Fills defaults. Thread: any. */
BUS_API void bus_metrics_config_init(bus_metrics_config *cfg);

/* Creates an empty registry. cfg may be NULL (defaults); borrowed.
 * Returns BUS_OK, BUS_EINVAL (a field out of range; logged), BUS_ENOMEM.
 * Thread: any. */
BUS_API int bus_metrics_new(bus_metrics **out, const bus_metrics_config *cfg);

/* Frees the registry and every series in it: every handle it returned
 * becomes invalid, so no thread may record any more. NULL is a no-op.
 * Thread: any, once nothing records or reads. */
BUS_API void bus_metrics_free(bus_metrics *m);

/* ---- Registration (get or create) ------------------------------------- */

/* Each returns the handle of the series (name, labels) of its type,
 * creating the family and the series on first use. name follows the
 * Prometheus metric name syntax [a-zA-Z_:][a-zA-Z0-9_:]*. help (may be
 * NULL) is kept from the family's first registration. labels[0..nlabels)
 * (may be NULL when nlabels is 0) are borrowed and copied; their order does
 * not matter (a series is stored with its labels sorted by name), but
 * every series of a family has the same label names.
 *
 * The same (name, labels) registered again returns the same handle and
 * takes another reference on it: release each registration once. A handle
 * stays valid until its last release or bus_metrics_free.
 *
 * Returns BUS_OK, BUS_EINVAL (bad name, label name or UTF-8 value;
 * duplicate label; NULL argument), BUS_EEXIST (the family exists with
 * another type or other label names, or the series exists with another
 * kind: e.g. an int gauge registered as a double or callback gauge),
 * BUS_ETOOBIG (max_series reached), BUS_ENOMEM. On failure *out is NULL.
 * Thread: any (takes the registry mutex). Blocks: briefly. */
BUS_API int bus_metrics_counter(bus_metrics *m, const char *name,
                                const char *help, const bus_label *labels,
                                size_t nlabels, bus_counter **out);
/* An int64 gauge. */
BUS_API int bus_metrics_gauge(bus_metrics *m, const char *name,
                              const char *help, const bus_label *labels,
                              size_t nlabels, bus_gauge **out);
/* A double gauge (bus_gauge_set_double, bus_gauge_add_double). */
BUS_API int bus_metrics_gauge_double(bus_metrics *m, const char *name,
                                     const char *help, const bus_label *labels,
                                     size_t nlabels, bus_gauge **out);
/* A latency histogram; samples in nanoseconds, exported in seconds, so
 * its name should end in "_seconds". */
BUS_API int bus_metrics_hist(bus_metrics *m, const char *name, const char *help,
                             const bus_label *labels, size_t nlabels,
                             bus_hist **out);

/* Callback series: the value is read when a snapshot is taken (queue
 * depths, sizes, counts some other object keeps already), so recording
 * costs nothing. fn(opaque) runs in the thread taking the snapshot, with
 * no libbus lock held; it must be fast and must not block. It may register
 * and release series (but two callbacks releasing each other's series from
 * two snapshots at once would wait for each other), and must not take
 * snapshots of this registry. A callback series is not
 * shared: registering the same (name, labels) again returns BUS_EEXIST.
 * Released with bus_counter_release / bus_gauge_release, which waits for
 * calls of fn in progress on other threads, so that after it returns fn is
 * never called again and opaque may be freed (called from inside fn
 * itself, it does not wait for that call: it is the last). A snapshot in
 * progress reads a series released before its turn as 0. */
typedef uint64_t (*bus_counter_fn)(void *opaque);
typedef double (*bus_gauge_fn)(void *opaque);
BUS_API int bus_metrics_counter_fn(bus_metrics *m, const char *name,
                                   const char *help, const bus_label *labels,
                                   size_t nlabels, bus_counter_fn fn,
                                   void *opaque, bus_counter **out);
BUS_API int bus_metrics_gauge_fn(bus_metrics *m, const char *name,
                                 const char *help, const bus_label *labels,
                                 size_t nlabels, bus_gauge_fn fn, void *opaque,
                                 bus_gauge **out);

/* Drops one reference; the last removes the series from the registry (and
 * its family when it was the family's last series) and frees it. The
 * caller guarantees no thread records into the handle after its last
 * release (e.g. the bus releases a subscription's handles once
 * unsubscribe has stopped its handler). NULL is a no-op.
 * Thread: any. Blocks: briefly (callback series: see above). */
BUS_API void bus_counter_release(bus_counter *c);
BUS_API void bus_gauge_release(bus_gauge *g);
BUS_API void bus_hist_release(bus_hist *h);

/* ---- Recording: the hot path ------------------------------------------- */

/* All of these: Thread: any, concurrently with each other, registration
 * and snapshots. Never block, no lock; they allocate nothing but, on a
 * thread's first record, its slot (a C11 thread-specific key, freed when
 * the thread exits). Not async-signal-safe. A NULL handle is a no-op.
 * Using a callback series here is a programmer error (ignored). */

/* Adds n to a counter (this thread's cell: a relaxed load and store). */
BUS_API void bus_counter_add(bus_counter *c, uint64_t n);
BUS_API void bus_counter_inc(bus_counter *c);

/* Int gauges. A gauge is one atomic (not per thread: "set" has no meaning
 * across cells), so many threads adding to one gauge contend on it; for a
 * depth that changes on every event prefer bus_metrics_gauge_fn. On a
 * double gauge these convert. */
BUS_API void bus_gauge_set(bus_gauge *g, int64_t v);
BUS_API void bus_gauge_add(bus_gauge *g, int64_t delta);
/* Double gauges; on an int gauge the value is rounded to nearest. */
BUS_API void bus_gauge_set_double(bus_gauge *g, double v);
BUS_API void bus_gauge_add_double(bus_gauge *g, double delta);

/* Records one sample of ns nanoseconds. */
BUS_API void bus_hist_record(bus_hist *h, uint64_t ns);

/* Monotonic clock in ns, for timing what goes into bus_hist_record. */
BUS_API uint64_t bus_metrics_now_ns(void);

/* ---- Reading ------------------------------------------------------------ */

/* A handle's current value, summed over cells (relaxed reads: a value
 * being recorded concurrently may or may not be included). For tests and
 * for components that want their own figures back. Thread: any. */
BUS_API uint64_t bus_counter_value(const bus_counter *c);
BUS_API double bus_gauge_value(const bus_gauge *g);

/* One bucket of a histogram snapshot: count samples in [lo_ns, hi_ns).
 * The overflow bucket (samples >= hist_max_ns) has hi_ns UINT64_MAX. */
typedef struct bus_hist_bucket {
    uint64_t lo_ns;
    uint64_t hi_ns;
    uint64_t count;
} bus_hist_bucket;

/* A histogram's value in a snapshot. Quantiles use the nearest-rank
 * definition (the sample at rank ceil(q * count)) and are reported as the
 * middle of that sample's bucket: within 0.79% of the exact sample (exact
 * below 128 ns). All 0 when count is 0. */
typedef struct bus_hist_value {
    uint64_t count;  /* samples (sum of the buckets) */
    uint64_t sum_ns; /* exact sum of the samples, mod 2^64 */
    uint64_t min_ns;
    uint64_t max_ns;
    uint64_t p50_ns;
    uint64_t p90_ns;
    uint64_t p95_ns;
    uint64_t p99_ns;
    uint64_t p999_ns;
    const bus_hist_bucket *buckets; /* non-empty buckets, ascending */
    size_t nbuckets;
    /* The Prometheus buckets, exact: cumulative[i] samples <= bounds_ns[i]
     * (the registry's hist_bounds_ns). */
    const uint64_t *bounds_ns;
    const uint64_t *cumulative;
    size_t nbounds;
} bus_hist_value;

/* Any quantile q in [0, 1] of v (0 gives min, 1 max); 0 when empty.
 * Thread: any. */
BUS_API uint64_t bus_hist_value_quantile(const bus_hist_value *v, double q);

typedef struct bus_metric_series {
    const bus_label *labels; /* sorted by name; same names in a family */
    size_t nlabels;
    uint64_t counter;    /* BUS_METRIC_COUNTER */
    double gauge;        /* BUS_METRIC_GAUGE (int64: exact to 2^53) */
    bus_hist_value hist; /* BUS_METRIC_HISTOGRAM */
} bus_metric_series;

typedef struct bus_metric_family {
    const char *name;
    const char *help; /* "" when none was given */
    bus_metric_type type;
    const bus_metric_series *series; /* in registration order */
    size_t nseries;
} bus_metric_family;

/* A consistent copy of the registry's structure and each series' value at
 * the time it was read; owns all its strings. Families are sorted by
 * name. Read-only. */
typedef struct bus_metrics_snapshot {
    const bus_metric_family *families;
    size_t nfamilies;
    int64_t taken_ms; /* wall-clock time of the snapshot, ms since epoch */
} bus_metrics_snapshot;

/* Takes a snapshot: copies the structure under the registry mutex (so
 * registration waits for it, never recording), reads the cells with
 * relaxed loads, then calls callback series with no lock held. Samples
 * recorded during the read may be partly included: a histogram's sum may
 * count a sample that its buckets miss or the reverse. Its count is the
 * sum of its buckets, so _count always equals the +Inf bucket.
 * Returns BUS_OK, BUS_ENOMEM. Thread: any. */
BUS_API int bus_metrics_snapshot_take(bus_metrics *m,
                                      bus_metrics_snapshot **out);
/* NULL is a no-op. Thread: any. */
BUS_API void bus_metrics_snapshot_free(bus_metrics_snapshot *s);

/* Looks up a series in a snapshot by family name and labels (any order);
 * NULL when absent. For tests and small exporters. Thread: any. */
BUS_API const bus_metric_series *
bus_metrics_snapshot_find(const bus_metrics_snapshot *s, const char *name,
                          const bus_label *labels, size_t nlabels);

/* ---- Prometheus text exposition (format 0.0.4) --------------------------- */

/* Writes s as Prometheus text into buf (cap bytes, NUL-terminated when cap
 * > 0) and sets *len (may be NULL) to the length of the whole text without
 * the NUL, also when it did not fit. Histograms are in seconds:
 * name_bucket{...,le="..."} cumulative up to le="+Inf", name_sum,
 * name_count. Returns BUS_OK, or BUS_ENOBUFS when cap < *len + 1 (buf then
 * holds a truncated prefix). Thread: any. */
BUS_API int bus_metrics_snapshot_prometheus(const bus_metrics_snapshot *s,
                                            char *buf, size_t cap, size_t *len);

/* Snapshot + text in one call. Into a caller buffer (as above; returns
 * BUS_OK, BUS_ENOBUFS, BUS_ENOMEM), or into a new string *out of *len
 * bytes plus a NUL, freed with bus_metrics_text_free (BUS_OK, BUS_ENOMEM).
 * Thread: any. */
BUS_API int bus_metrics_prometheus(bus_metrics *m, char *buf, size_t cap,
                                   size_t *len);
BUS_API int bus_metrics_prometheus_alloc(bus_metrics *m, char **out,
                                         size_t *len);
/* NULL is a no-op. */
BUS_API void bus_metrics_text_free(char *text);

#ifdef __cplusplus
}
#endif
#endif /* BUS_METRICS_H */
