/*
 * Metrics registry: families of labelled series, recorded through handles,
 * read as snapshots and Prometheus text (design in metrics.h and
 * docs/metrics.md).
 *
 * Design:
 * - Recording never locks and never looks anything up. A handle is the
 *   series itself; its first cache line holds what the hot path reads
 *   (cells, cell count, stride, histogram limits), written once at
 *   creation and published to other threads by the registry mutex (the
 *   recorder got the handle from a registration that took it) or by
 *   whatever the caller used to hand the pointer over.
 * - Counters and histograms have m->shards cells owned by one thread each,
 *   plus one shared cell, each on its own cache lines. A thread claims the
 *   lowest free process-wide slot on its first record and frees it when it
 *   exits (a C11 tss destructor); slot k < shards owns cell k of every
 *   series, so it updates it with a relaxed load and store: no lock
 *   prefix, which costs 3x a plain increment on the VMs we run on. Other
 *   threads (more live recording threads than shards) add to the shared
 *   cell with atomic read-modify-writes. Readers sum the cells with
 *   relaxed loads: each cell only ever holds a whole value. A slot passes
 *   to a new thread through the slot bitmap (release on free, acquire on
 *   claim), so the new owner continues from the old one's last store.
 * - Histograms are log-linear: values below 128 have a bucket each; above,
 *   every power of two [2^m, 2^(m+1)) is cut into 64 equal buckets, so a
 *   bucket is at most 1/64 of its lower edge wide and its middle is within
 *   1/128 (0.79%) of any value in it. Index = (k << 6) + (v >> k) with
 *   k = max(0, msb(v) - 6): one clz, no loop. Samples >= the limit go to
 *   one overflow bucket. Count is not stored: it is the sum of the buckets,
 *   so a reader's _count always matches its +Inf bucket.
 * - Prometheus `le` buckets are exact, although a bound (1 ms) is rarely a
 *   bucket edge: the fine bucket a bound falls inside of ("straddles") has
 *   a split counter of its samples <= the bound, found through a byte
 *   table indexed by bucket (0: no bound inside). le = sum of the fine
 *   buckets wholly below it + that split counter. Costs one table load and
 *   a well-predicted branch per sample.
 * - Gauges are a single padded atomic (set has no meaning across shards).
 * - Everything else (families, the series hash, refcounts, callback-series
 *   pins and calls) is under m->mtx, the only lock in this file. Callback
 *   series' functions are called with it released. A snapshot pins the
 *   callback series it will call (their memory stays), and counts itself
 *   in `calls` only around each call; release waits for `calls` (never for
 *   pins, which a snapshot calling some other callback may hold: waiting
 *   for them could wait for ourselves) and leaves the free to the last
 *   unpin.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <threads.h>
#include <unistd.h>

#include <bus/err.h>
#include <bus/metrics.h>

#include "alloc.h"
#include "pipeline.h"
#include "platform.h"
#include "wbuf.h"

#define METRICS_NAME_MAX 200   /* bytes in a metric or label name */
#define METRICS_VALUE_MAX 4096 /* bytes in a label value */
#define METRICS_HELP_MAX 4096  /* bytes of help text */
#define METRICS_LABELS_MAX 16  /* labels per family */
#define METRICS_BOUNDS_MAX 64  /* Prometheus le bounds */
#define METRICS_SHARDS_MAX 256
#define METRICS_SHARDS_DEFAULT_MIN 4
#define METRICS_SHARDS_DEFAULT_MAX 16
#define METRICS_SERIES_DEFAULT 10000
#define METRICS_SERIES_MAX (1u << 24)

#define HIST_SUB_BITS 6
#define HIST_EXACT 128 /* values below this have a bucket each */
#define HIST_LIMIT_BITS_DEFAULT 36
#define HIST_LIMIT_BITS_MIN 10
#define HIST_LIMIT_BITS_MAX 62

/* Default Prometheus bounds: 1 us .. 10 s in 1-2.5-5 steps. */
static const uint64_t metrics_default_bounds[] = {
    1000,       2500,       5000,       10000,       25000,     50000,
    100000,     250000,     500000,     1000000,     2500000,   5000000,
    10000000,   25000000,   50000000,   100000000,   250000000, 500000000,
    1000000000, 2500000000, 5000000000, 10000000000,
};
#define METRICS_DEFAULT_BOUNDS_LEN                                             \
    (sizeof(metrics_default_bounds) / sizeof(metrics_default_bounds[0]))

typedef enum series_kind {
    KIND_COUNTER,
    KIND_COUNTER_FN,
    KIND_GAUGE_INT,
    KIND_GAUGE_DOUBLE,
    KIND_GAUGE_FN,
    KIND_HIST
} series_kind;

typedef struct metrics_family metrics_family;

typedef struct metrics_series {
    /* Hot: read by every record; constant after creation. */
    unsigned char *cells;    /* shard 0's cell, BUS_CACHELINE-aligned */
    uint32_t excl;           /* cells owned by one thread; cell excl is the
                              * shared one (gauges: 0, their only cell) */
    uint32_t stride;         /* bytes from one shard's cell to the next */
    uint64_t limit;          /* histograms: samples >= limit overflow */
    uint32_t nb;             /* histograms: index of the overflow bucket */
    uint8_t kind;            /* series_kind */
    const uint8_t *straddle; /* histograms: the registry's table */
    const uint64_t *bounds;  /* histograms: the registry's le bounds */
    /* Cold. @locks m->mtx for everything below but the constants. */
    bus_metrics *m;
    metrics_family *fam;
    struct metrics_series *fnext, *fprev; /* family list, registration order */
    struct metrics_series *hnext;         /* hash chain */
    uint64_t hash;
    uint32_t refs;
    uint32_t pins;  /* callbacks: snapshots that will call fn (memory) */
    uint32_t calls; /* callbacks: threads inside fn right now */
    bool dead;      /* callbacks: released while pinned; last unpin frees */
    bus_counter_fn cfn;
    bus_gauge_fn gfn;
    void *opaque;
    void *cells_raw; /* allocation behind cells (aligned inside it) */
    size_t cells_size;
    size_t size;         /* this struct + values + strings */
    const char **values; /* nlabels label values, family label order */
} metrics_series;

/* The public handle types are the series itself, so a handle is one
 * pointer with no indirection. */
struct bus_counter {
    metrics_series s;
};
struct bus_gauge {
    metrics_series s;
};
struct bus_hist {
    metrics_series s;
};

struct metrics_family {
    metrics_family *next;
    const char *name;
    const char *help;
    bus_metric_type type;
    size_t nlabels;
    const char **label_names; /* sorted */
    metrics_series *head, *tail;
    size_t nseries;
    size_t size; /* this struct + names + strings, one allocation */
};

/* One histogram shard: the sum, then nb + 1 buckets, then one split
 * counter per le bound (b[nb + slot], slot 1-based). */
typedef struct hist_shard {
    _Atomic uint64_t sum;
    _Atomic uint64_t b[];
} hist_shard;

struct bus_metrics {
    bus__mutex mtx;
    bus__cond cond; /* a callback series' calls count dropped */
    uint32_t shards;
    uint32_t limit_bits; /* histograms resolve [0, 2^limit_bits) */
    uint32_t hist_nb;    /* fine buckets below the limit */
    uint32_t hist_stride;
    uint8_t *straddle; /* hist_nb + 1 entries: bound slot (1-based) or 0 */
    uint32_t max_series;
    uint64_t bounds[METRICS_BOUNDS_MAX];
    size_t nbounds;
    bus_logger log;
    /* @locks mtx */
    metrics_family *families;
    size_t nfamilies;
    metrics_series **hash;
    size_t hash_len; /* power of two */
    size_t nseries;
};

/* ---- Thread slots -------------------------------------------------------- */

#define METRICS_SLOTS 256          /* = METRICS_SHARDS_MAX */
#define METRICS_NO_SLOT UINT32_MAX /* all taken: this thread shares */

/* initial-exec: the thread-local is reached with one %fs-relative load
 * instead of a __tls_get_addr call, which would cost as much as the add
 * itself. It takes 4 bytes of the static TLS block, which glibc reserves
 * spare room for even when libbus is dlopen'ed. */
#if defined(__GNUC__)
#define METRICS_TLS_MODEL __attribute__((tls_model("initial-exec")))
#else
#define METRICS_TLS_MODEL
#endif

/* 0: not claimed yet; slot + 1; or METRICS_NO_SLOT. Shared with the
 * pipeline's per-thread shards (pipeline.h: bus__thread_slot), so a thread
 * holds one slot for every sharded object in the process. */
BUS__TLS uint32_t bus__thread_slot_tls;
#define metrics_tls_slot bus__thread_slot_tls
static _Atomic uint64_t metrics_slot_map[METRICS_SLOTS / 64];
static tss_t metrics_slot_key;
/* 0: key not made; 1: being made; 2: made; 3: tss_create failed (then no
 * thread gets a slot: everything goes to the shared cells). Hand-made
 * once rather than call_once, so that TSan sees the ordering. */
static atomic_int metrics_key_state;

/* @thread the exiting one (tss destructor). */
static void
metrics_slot_free(void *p)
{
    uint32_t slot = (uint32_t)(uintptr_t)p - 1;

    metrics_tls_slot = 0; /* a later destructor may record: it reclaims */
    /* release: this thread's stores to its cells happen-before the next
     * owner's loads (it claims with acquire). */
    atomic_fetch_and_explicit(&metrics_slot_map[slot / 64],
                              ~((uint64_t)1 << (slot % 64)),
                              memory_order_release);
}

static bool
metrics_key_ready(void)
{
    int st = atomic_load_explicit(&metrics_key_state, memory_order_acquire);
    int zero = 0;

    if (st >= 2)
        return st == 2;
    if (atomic_compare_exchange_strong_explicit(&metrics_key_state, &zero, 1,
                                                memory_order_acquire,
                                                memory_order_acquire)) {
        st = tss_create(&metrics_slot_key, metrics_slot_free) == thrd_success
                 ? 2
                 : 3;
        /* release: the key is written before anyone reads state 2 */
        atomic_store_explicit(&metrics_key_state, st, memory_order_release);
        return st == 2;
    }
    while ((st = atomic_load_explicit(&metrics_key_state,
                                      memory_order_acquire)) == 1)
        bus__thread_yield();
    return st == 2;
}

/* The slow path, once per thread: claims the lowest free slot. */
static uint32_t
metrics_slot_claim(void)
{
    uint32_t w;

    if (!metrics_key_ready())
        return metrics_tls_slot = METRICS_NO_SLOT;
    for (w = 0; w < METRICS_SLOTS / 64; w++) {
        uint64_t old =
            atomic_load_explicit(&metrics_slot_map[w], memory_order_relaxed);
        while (old != UINT64_MAX) {
            uint32_t bit = (uint32_t)__builtin_ctzll(~old), slot;
            /* acquire: see the previous owner's last stores (it freed
             * with release). */
            if (!atomic_compare_exchange_weak_explicit(
                    &metrics_slot_map[w], &old, old | ((uint64_t)1 << bit),
                    memory_order_acquire, memory_order_relaxed))
                continue;
            slot = w * 64 + bit;
            if (tss_set(metrics_slot_key, (void *)(uintptr_t)(slot + 1)) !=
                thrd_success) {
                atomic_fetch_and_explicit(&metrics_slot_map[w],
                                          ~((uint64_t)1 << bit),
                                          memory_order_release);
                return metrics_tls_slot = METRICS_NO_SLOT;
            }
            return metrics_tls_slot = slot + 1;
        }
    }
    return metrics_tls_slot = METRICS_NO_SLOT;
}

/* This thread's slot + 1 (>= 1), or METRICS_NO_SLOT. */
static inline uint32_t
metrics_slot(void)
{
    uint32_t k = metrics_tls_slot;

    if (__builtin_expect(k == 0, 0))
        k = metrics_slot_claim();
    return k;
}

uint32_t
bus__thread_slot_claim(void)
{
    return metrics_slot_claim();
}

/* The callback series this thread is calling (snapshot phase 2), so that
 * a release from inside the callback knows not to wait for itself. */
static _Thread_local const metrics_series *metrics_calling;

/* ---- Histogram geometry ------------------------------------------------ */

static inline uint32_t
hist_index(uint64_t v)
{
    /* k = msb(v | 127) - 6: 0 for v < 128, where the index is v itself. */
    unsigned k = 57u - (unsigned)__builtin_clzll(v | (HIST_EXACT - 1));

    return (uint32_t)(((uint64_t)k << HIST_SUB_BITS) + (v >> k));
}

static void
hist_bucket_range(uint32_t idx, uint64_t *lo, uint64_t *hi)
{
    unsigned k;

    if (idx < HIST_EXACT) {
        *lo = idx;
        *hi = (uint64_t)idx + 1;
        return;
    }
    k = (idx >> HIST_SUB_BITS) - 1;
    *lo = (uint64_t)(idx - (k << HIST_SUB_BITS)) << k;
    *hi = *lo + ((uint64_t)1 << k);
}

/* Representative value of a bucket: its middle (exact when 1 wide); the
 * overflow bucket reads as its lower edge, the limit. */
static uint64_t
hist_bucket_value(const bus_hist_bucket *b)
{
    if (b->hi_ns == UINT64_MAX || b->hi_ns - b->lo_ns <= 1)
        return b->lo_ns;
    return b->lo_ns + (b->hi_ns - b->lo_ns) / 2;
}

uint64_t
bus_hist_value_quantile(const bus_hist_value *v, double q)
{
    uint64_t rank, cum = 0;
    size_t i;

    if (v == NULL || v->count == 0 || v->nbuckets == 0)
        return 0;
    if (!(q > 0)) /* also NaN */
        q = 0;
    if (q > 1)
        q = 1;
    /* Nearest rank: the sample at ceil(q * count), 1-based. */
    rank = (uint64_t)ceil(q * (double)v->count);
    if (rank < 1)
        rank = 1;
    if (rank > v->count)
        rank = v->count;
    for (i = 0; i < v->nbuckets; i++) {
        cum += v->buckets[i].count;
        if (cum >= rank)
            return hist_bucket_value(&v->buckets[i]);
    }
    return hist_bucket_value(&v->buckets[v->nbuckets - 1]);
}

/* ---- Configuration ------------------------------------------------------ */

/* Online CPUs, at least 4 (a bus has workers, publishers and broker
 * threads recording even on a small box), at most 16 (memory). */
static uint32_t
metrics_default_shards(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    if (n < METRICS_SHARDS_DEFAULT_MIN)
        n = METRICS_SHARDS_DEFAULT_MIN;
    if (n > METRICS_SHARDS_DEFAULT_MAX)
        n = METRICS_SHARDS_DEFAULT_MAX;
    return (uint32_t)n;
}

void
bus_metrics_config_init(bus_metrics_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->size = sizeof(*cfg);
    cfg->shards = metrics_default_shards();
    cfg->hist_max_ns = (uint64_t)1 << HIST_LIMIT_BITS_DEFAULT;
    cfg->hist_bounds_ns = metrics_default_bounds;
    cfg->hist_bounds_len = METRICS_DEFAULT_BOUNDS_LEN;
    cfg->max_series = METRICS_SERIES_DEFAULT;
}

static int
metrics_config_apply(bus_metrics *m, const bus_metrics_config *cfg)
{
    bus_metrics_config def;
    const uint64_t *bounds;
    size_t nbounds, i;
    uint64_t max_ns;

    bus_metrics_config_init(&def);
    if (cfg == NULL)
        cfg = &def;
    if (cfg->size != 0 && cfg->size < offsetof(bus_metrics_config, log)) {
        bus_logf(&cfg->log, BUS_LOG_ERR, "metrics",
                 "config size %zu is too small", cfg->size);
        return BUS_EINVAL;
    }
    m->log = cfg->log;
    m->shards = cfg->shards ? cfg->shards : def.shards;
    if (m->shards > METRICS_SHARDS_MAX) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                 "shards %u out of range 1..%u", m->shards, METRICS_SHARDS_MAX);
        return BUS_EINVAL;
    }

    max_ns = cfg->hist_max_ns ? cfg->hist_max_ns : def.hist_max_ns;
    if (max_ns < ((uint64_t)1 << HIST_LIMIT_BITS_MIN) ||
        max_ns > ((uint64_t)1 << HIST_LIMIT_BITS_MAX)) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                 "hist_max_ns %llu out of range 2^%d..2^%d",
                 (unsigned long long)max_ns, HIST_LIMIT_BITS_MIN,
                 HIST_LIMIT_BITS_MAX);
        return BUS_EINVAL;
    }
    m->limit_bits = HIST_LIMIT_BITS_MIN;
    while (((uint64_t)1 << m->limit_bits) < max_ns)
        m->limit_bits++;
    /* Buckets below 2^L: 128 exact ones, then 64 per power from 2^7. */
    m->hist_nb = (m->limit_bits - 5) << HIST_SUB_BITS;

    bounds = cfg->hist_bounds_ns;
    nbounds = cfg->hist_bounds_len;
    if (bounds == NULL || bounds == metrics_default_bounds) {
        /* The defaults shrink to fit a small hist_max_ns; explicit bounds
         * beyond it are an error (they could not be exact). */
        bounds = metrics_default_bounds;
        nbounds = 0;
        while (nbounds < METRICS_DEFAULT_BOUNDS_LEN &&
               bounds[nbounds] < ((uint64_t)1 << m->limit_bits))
            nbounds++;
    }
    if (nbounds < 1 || nbounds > METRICS_BOUNDS_MAX) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                 "hist_bounds_len %zu out of range 1..%d", nbounds,
                 METRICS_BOUNDS_MAX);
        return BUS_EINVAL;
    }
    for (i = 0; i < nbounds; i++) {
        uint64_t lo, hi, plo, phi;
        if (bounds[i] == 0 || (i > 0 && bounds[i] <= bounds[i - 1]) ||
            bounds[i] >= ((uint64_t)1 << m->limit_bits)) {
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "hist_bounds_ns must be > 0, strictly ascending and "
                     "below hist_max_ns (entry %zu)",
                     i);
            return BUS_EINVAL;
        }
        /* Each straddled fine bucket has one split counter: two bounds
         * inside one bucket (closer than 1/64) cannot both be exact. */
        hist_bucket_range(hist_index(bounds[i]), &lo, &hi);
        if (i > 0 && hi - 1 != bounds[i]) {
            hist_bucket_range(hist_index(bounds[i - 1]), &plo, &phi);
            if (plo == lo) {
                bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                         "hist_bounds_ns entries %zu and %zu are closer "
                         "than the histogram resolution (1/64)",
                         i - 1, i);
                return BUS_EINVAL;
            }
        }
        m->bounds[i] = bounds[i];
    }
    m->nbounds = nbounds;
    /* The sum, nb + 1 buckets and the split counters, padded to whole
     * cache lines. */
    m->hist_stride = (uint32_t)(((m->hist_nb + 2 + nbounds) * sizeof(uint64_t) +
                                 BUS_CACHELINE - 1) &
                                ~(size_t)(BUS_CACHELINE - 1));

    m->max_series = cfg->max_series ? cfg->max_series : METRICS_SERIES_DEFAULT;
    if (m->max_series > METRICS_SERIES_MAX) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                 "max_series %u out of range 1..%u", m->max_series,
                 METRICS_SERIES_MAX);
        return BUS_EINVAL;
    }
    return BUS_OK;
}

int
bus_metrics_new(bus_metrics **out, const bus_metrics_config *cfg)
{
    bus_metrics *m;
    size_t i;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if ((m = bus__zalloc(sizeof(*m))) == NULL)
        return BUS_ENOMEM;
    if ((rv = metrics_config_apply(m, cfg)) != BUS_OK) {
        bus__free(m, sizeof(*m));
        return rv;
    }
    m->hash_len = 64;
    m->hash = bus__zalloc(m->hash_len * sizeof(*m->hash));
    m->straddle = bus__zalloc((size_t)m->hist_nb + 1);
    if (m->hash == NULL || m->straddle == NULL) {
        bus__free(m->hash, m->hash_len * sizeof(*m->hash));
        bus__free(m->straddle, (size_t)m->hist_nb + 1);
        bus__free(m, sizeof(*m));
        return BUS_ENOMEM;
    }
    for (i = 0; i < m->nbounds; i++) {
        uint64_t lo, hi;
        uint32_t idx = hist_index(m->bounds[i]);
        hist_bucket_range(idx, &lo, &hi);
        if (hi - 1 != m->bounds[i]) /* the bound is inside the bucket */
            m->straddle[idx] = (uint8_t)(i + 1);
    }
    bus__mutex_init(&m->mtx);
    bus__cond_init(&m->cond);
    *out = m;
    return BUS_OK;
}

static void
series_free(metrics_series *s)
{
    bus__free(s->cells_raw, s->cells_size);
    bus__free(s, s->size);
}

static void
family_free(metrics_family *f)
{
    bus__free(f, f->size);
}

void
bus_metrics_free(bus_metrics *m)
{
    metrics_family *f, *fn;
    metrics_series *s, *sn;

    if (m == NULL)
        return;
    for (f = m->families; f != NULL; f = fn) {
        fn = f->next;
        for (s = f->head; s != NULL; s = sn) {
            sn = s->fnext;
            series_free(s);
        }
        family_free(f);
    }
    bus__free(m->hash, m->hash_len * sizeof(*m->hash));
    bus__free(m->straddle, (size_t)m->hist_nb + 1);
    bus__cond_fini(&m->cond);
    bus__mutex_fini(&m->mtx);
    bus__free(m, sizeof(*m));
}

/* ---- Validation --------------------------------------------------------- */

static bool
metrics_name_valid(const char *s, bool metric)
{
    size_t i;

    if (s == NULL || s[0] == '\0')
        return false;
    for (i = 0; s[i] != '\0'; i++) {
        char c = s[i];
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                     c == '_' || (metric && c == ':');
        if (i >= METRICS_NAME_MAX)
            return false;
        if (!alpha && !(i > 0 && c >= '0' && c <= '9'))
            return false;
    }
    /* Label names starting with "__" are reserved for Prometheus. */
    return metric || !(s[0] == '_' && s[1] == '_');
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF): the text format
 * requires it, and a bad byte would corrupt the whole scrape. */
static bool
metrics_utf8_valid(const char *str, size_t max)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;

    while (s[i] != '\0') {
        unsigned c = s[i], n, j;
        uint32_t cp;

        if (i >= max)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            n = 1, cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2, cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3, cp = c & 0x07;
        } else {
            return false;
        }
        for (j = 1; j <= n; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false; /* also catches the NUL */
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return false;
        i += n + 1;
    }
    return true;
}

static int
label_cmp(const void *a, const void *b)
{
    return strcmp(((const bus_label *)a)->name, ((const bus_label *)b)->name);
}

/* Validates and sorts labels into out[]. */
static int
metrics_labels_canon(bus_metrics *m, const char *name, bus_metric_type type,
                     const bus_label *labels, size_t n, bus_label *out)
{
    size_t i;

    if (n > METRICS_LABELS_MAX || (n > 0 && labels == NULL)) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics", "%s: %zu labels (at most %d)",
                 name, n, METRICS_LABELS_MAX);
        return BUS_EINVAL;
    }
    for (i = 0; i < n; i++) {
        if (!metrics_name_valid(labels[i].name, false) ||
            (type == BUS_METRIC_HISTOGRAM &&
             strcmp(labels[i].name, "le") == 0)) {
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "%s: invalid or reserved label name '%s'", name,
                     labels[i].name ? labels[i].name : "(null)");
            return BUS_EINVAL;
        }
        if (labels[i].value == NULL ||
            !metrics_utf8_valid(labels[i].value, METRICS_VALUE_MAX)) {
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "%s: label '%s' value is NULL, too long or not UTF-8",
                     name, labels[i].name);
            return BUS_EINVAL;
        }
        out[i] = labels[i];
    }
    qsort(out, n, sizeof(*out), label_cmp);
    for (i = 1; i < n; i++) {
        if (strcmp(out[i].name, out[i - 1].name) == 0) {
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "%s: duplicate label '%s'", name, out[i].name);
            return BUS_EINVAL;
        }
    }
    return BUS_OK;
}

/* ---- Families and the series hash --------------------------------------- */

static bus_metric_type
kind_type(series_kind k)
{
    switch (k) {
    case KIND_COUNTER:
    case KIND_COUNTER_FN:
        return BUS_METRIC_COUNTER;
    case KIND_HIST:
        return BUS_METRIC_HISTOGRAM;
    default:
        return BUS_METRIC_GAUGE;
    }
}

static uint64_t
metrics_hash(const char *name, const bus_label *labels, size_t n)
{
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a */
    const char *p;
    size_t i;

    for (p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3u;
    for (i = 0; i < n; i++) {
        h = (h ^ 0xff) * 0x100000001b3u; /* separator: not valid UTF-8 */
        for (p = labels[i].value; *p; p++)
            h = (h ^ (unsigned char)*p) * 0x100000001b3u;
    }
    return h;
}

/* @locks m->mtx held. */
static metrics_family *
family_find(bus_metrics *m, const char *name)
{
    metrics_family *f;

    for (f = m->families; f != NULL; f = f->next)
        if (strcmp(f->name, name) == 0)
            return f;
    return NULL;
}

/* Creates (not linked). One allocation: struct, label name pointers,
 * then the strings. */
static metrics_family *
family_new(const char *name, const char *help, bus_metric_type type,
           const bus_label *labels, size_t n)
{
    size_t size = sizeof(metrics_family) + n * sizeof(char *);
    size_t nlen = strlen(name) + 1, hlen = strlen(help) + 1, i;
    metrics_family *f;
    char *p;

    size += nlen + hlen;
    for (i = 0; i < n; i++)
        size += strlen(labels[i].name) + 1;
    if ((f = bus__zalloc(size)) == NULL)
        return NULL;
    f->size = size;
    f->type = type;
    f->nlabels = n;
    f->label_names = (const char **)(void *)(f + 1);
    p = (char *)(f->label_names + n);
    memcpy(p, name, nlen);
    f->name = p;
    p += nlen;
    memcpy(p, help, hlen);
    f->help = p;
    p += hlen;
    for (i = 0; i < n; i++) {
        size_t l = strlen(labels[i].name) + 1;
        memcpy(p, labels[i].name, l);
        f->label_names[i] = p;
        p += l;
    }
    return f;
}

/* True when `longer` is `stem` followed by a histogram sample suffix. */
static bool
metrics_is_hist_sample(const char *longer, const char *stem)
{
    static const char *const sfx[] = {"_bucket", "_sum", "_count"};
    size_t sl = strlen(stem), i;

    if (strncmp(longer, stem, sl) != 0)
        return false;
    for (i = 0; i < sizeof(sfx) / sizeof(sfx[0]); i++)
        if (strcmp(longer + sl, sfx[i]) == 0)
            return true;
    return false;
}

/* True when a new family `name` would print a sample name that another
 * family prints too (a histogram's name_bucket, name_sum, name_count):
 * the scrape would be ambiguous. @locks m->mtx held. */
static bool
family_name_clash(bus_metrics *m, const char *name, bus_metric_type type)
{
    metrics_family *f;

    for (f = m->families; f != NULL; f = f->next) {
        if (f->type == BUS_METRIC_HISTOGRAM &&
            metrics_is_hist_sample(name, f->name))
            return true;
        if (type == BUS_METRIC_HISTOGRAM &&
            metrics_is_hist_sample(f->name, name))
            return true;
    }
    return false;
}

/* @locks m->mtx held. */
static void
family_unlink(bus_metrics *m, metrics_family *f)
{
    metrics_family **pp;

    for (pp = &m->families; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == f) {
            *pp = f->next;
            m->nfamilies--;
            return;
        }
    }
}

static bool
family_labels_match(const metrics_family *f, const bus_label *labels, size_t n)
{
    size_t i;

    if (f->nlabels != n)
        return false;
    for (i = 0; i < n; i++)
        if (strcmp(f->label_names[i], labels[i].name) != 0)
            return false;
    return true;
}

static bool
series_values_match(const metrics_series *s, const bus_label *labels, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (strcmp(s->values[i], labels[i].value) != 0)
            return false;
    return true;
}

/* Doubles the hash table when it is fuller than one series per slot. A
 * failed allocation only leaves the chains longer, so it is not an error.
 * @locks m->mtx held. */
static void
metrics_hash_grow(bus_metrics *m)
{
    size_t len = m->hash_len * 2, i;
    metrics_series **t, *s, *sn;

    if (m->nseries <= m->hash_len)
        return;
    if ((t = bus__zalloc(len * sizeof(*t))) == NULL)
        return;
    for (i = 0; i < m->hash_len; i++) {
        for (s = m->hash[i]; s != NULL; s = sn) {
            sn = s->hnext;
            s->hnext = t[s->hash & (len - 1)];
            t[s->hash & (len - 1)] = s;
        }
    }
    bus__free(m->hash, m->hash_len * sizeof(*m->hash));
    m->hash = t;
    m->hash_len = len;
}

/* Allocates zeroed cells: count cells of stride bytes, aligned to a cache
 * line so that no two shards share one. Zero bits are a valid 0 for the
 * lock-free _Atomic uint64_t they hold; the series is published to other
 * threads only after this, through m->mtx. */
static int
series_alloc_cells(metrics_series *s, uint32_t count, uint32_t stride)
{
    size_t size = (size_t)count * stride + BUS_CACHELINE - 1;
    uintptr_t a;

    if ((s->cells_raw = bus__zalloc(size)) == NULL)
        return BUS_ENOMEM;
    s->cells_size = size;
    a = ((uintptr_t)s->cells_raw + BUS_CACHELINE - 1) &
        ~(uintptr_t)(BUS_CACHELINE - 1);
    s->cells = (unsigned char *)a;
    s->excl = count - 1;
    s->stride = stride;
    return BUS_OK;
}

static metrics_series *
series_new(bus_metrics *m, metrics_family *f, series_kind kind,
           const bus_label *labels, size_t n, uint64_t hash)
{
    size_t size = sizeof(metrics_series) + n * sizeof(char *), i;
    metrics_series *s;
    char *p;
    int rv;

    for (i = 0; i < n; i++)
        size += strlen(labels[i].value) + 1;
    if ((s = bus__zalloc(size)) == NULL)
        return NULL;
    s->size = size;
    s->kind = (uint8_t)kind;
    s->m = m;
    s->fam = f;
    s->hash = hash;
    s->refs = 1;
    s->values = (const char **)(void *)(s + 1);
    p = (char *)(s->values + n);
    for (i = 0; i < n; i++) {
        size_t l = strlen(labels[i].value) + 1;
        memcpy(p, labels[i].value, l);
        s->values[i] = p;
        p += l;
    }
    switch (kind) {
    case KIND_COUNTER:
        rv = series_alloc_cells(s, m->shards + 1, BUS_CACHELINE);
        break;
    case KIND_HIST:
        rv = series_alloc_cells(s, m->shards + 1, m->hist_stride);
        s->limit = (uint64_t)1 << m->limit_bits;
        s->nb = m->hist_nb;
        s->straddle = m->straddle;
        s->bounds = m->bounds;
        break;
    default:
        /* Gauges: one cell. Callback series get one too, which recording
         * into by mistake harmlessly writes (no branch on the hot path). */
        rv = series_alloc_cells(s, 1, BUS_CACHELINE);
        break;
    }
    if (rv != BUS_OK) {
        bus__free(s, size);
        return NULL;
    }
    return s;
}

static int
metrics_register(bus_metrics *m, const char *name, const char *help,
                 const bus_label *labels, size_t n, series_kind kind,
                 bus_counter_fn cfn, bus_gauge_fn gfn, void *opaque,
                 metrics_series **out)
{
    bus_label canon[METRICS_LABELS_MAX];
    bus_metric_type type = kind_type(kind);
    bool is_fn = kind == KIND_COUNTER_FN || kind == KIND_GAUGE_FN;
    metrics_family *f;
    metrics_series *s;
    bool new_family = false;
    uint64_t hash;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (m == NULL || (is_fn && cfn == NULL && gfn == NULL))
        return BUS_EINVAL;
    if (!metrics_name_valid(name, true)) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics", "invalid metric name '%s'",
                 name ? name : "(null)");
        return BUS_EINVAL;
    }
    if (help == NULL)
        help = "";
    if (!metrics_utf8_valid(help, METRICS_HELP_MAX)) {
        bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                 "%s: help is too long or not UTF-8", name);
        return BUS_EINVAL;
    }
    if ((rv = metrics_labels_canon(m, name, type, labels, n, canon)) != 0)
        return rv;
    hash = metrics_hash(name, canon, n);

    bus__mutex_lock(&m->mtx);
    if ((f = family_find(m, name)) != NULL) {
        if (f->type != type || !family_labels_match(f, canon, n)) {
            rv = BUS_EEXIST;
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "%s: registered before with another type or other "
                     "label names",
                     name);
            goto out;
        }
        for (s = m->hash[hash & (m->hash_len - 1)]; s != NULL; s = s->hnext) {
            if (s->hash != hash || s->fam != f ||
                !series_values_match(s, canon, n))
                continue;
            if (s->kind != kind || is_fn) {
                rv = BUS_EEXIST;
                bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                         "%s: series exists with another kind", name);
                goto out;
            }
            s->refs++;
            *out = s;
            rv = BUS_OK;
            goto out;
        }
    }
    if (m->nseries >= m->max_series) {
        rv = BUS_ETOOBIG;
        bus_logf(&m->log, BUS_LOG_WARN, "metrics",
                 "%s: max_series (%u) reached", name, m->max_series);
        goto out;
    }
    if (f == NULL) {
        if (family_name_clash(m, name, type)) {
            rv = BUS_EEXIST;
            bus_logf(&m->log, BUS_LOG_ERR, "metrics",
                     "%s: clashes with a histogram's _bucket, _sum or "
                     "_count samples",
                     name);
            goto out;
        }
        if ((f = family_new(name, help, type, canon, n)) == NULL) {
            rv = BUS_ENOMEM;
            goto out;
        }
        new_family = true;
    }
    if ((s = series_new(m, f, kind, canon, n, hash)) == NULL) {
        if (new_family)
            family_free(f);
        rv = BUS_ENOMEM;
        goto out;
    }
    s->cfn = cfn;
    s->gfn = gfn;
    s->opaque = opaque;
    if (new_family) {
        f->next = m->families;
        m->families = f;
        m->nfamilies++;
    }
    s->fprev = f->tail;
    if (f->tail != NULL)
        f->tail->fnext = s;
    else
        f->head = s;
    f->tail = s;
    f->nseries++;
    s->hnext = m->hash[hash & (m->hash_len - 1)];
    m->hash[hash & (m->hash_len - 1)] = s;
    m->nseries++;
    metrics_hash_grow(m);
    *out = s;
    rv = BUS_OK;
out:
    bus__mutex_unlock(&m->mtx);
    return rv;
}

int
bus_metrics_counter(bus_metrics *m, const char *name, const char *help,
                    const bus_label *labels, size_t nlabels, bus_counter **out)
{
    return metrics_register(m, name, help, labels, nlabels, KIND_COUNTER, NULL,
                            NULL, NULL, (metrics_series **)out);
}

int
bus_metrics_gauge(bus_metrics *m, const char *name, const char *help,
                  const bus_label *labels, size_t nlabels, bus_gauge **out)
{
    return metrics_register(m, name, help, labels, nlabels, KIND_GAUGE_INT,
                            NULL, NULL, NULL, (metrics_series **)out);
}

int
bus_metrics_gauge_double(bus_metrics *m, const char *name, const char *help,
                         const bus_label *labels, size_t nlabels,
                         bus_gauge **out)
{
    return metrics_register(m, name, help, labels, nlabels, KIND_GAUGE_DOUBLE,
                            NULL, NULL, NULL, (metrics_series **)out);
}

int
bus_metrics_hist(bus_metrics *m, const char *name, const char *help,
                 const bus_label *labels, size_t nlabels, bus_hist **out)
{
    return metrics_register(m, name, help, labels, nlabels, KIND_HIST, NULL,
                            NULL, NULL, (metrics_series **)out);
}

int
bus_metrics_counter_fn(bus_metrics *m, const char *name, const char *help,
                       const bus_label *labels, size_t nlabels,
                       bus_counter_fn fn, void *opaque, bus_counter **out)
{
    if (fn == NULL) {
        if (out != NULL)
            *out = NULL;
        return BUS_EINVAL;
    }
    return metrics_register(m, name, help, labels, nlabels, KIND_COUNTER_FN, fn,
                            NULL, opaque, (metrics_series **)out);
}

int
bus_metrics_gauge_fn(bus_metrics *m, const char *name, const char *help,
                     const bus_label *labels, size_t nlabels, bus_gauge_fn fn,
                     void *opaque, bus_gauge **out)
{
    if (fn == NULL) {
        if (out != NULL)
            *out = NULL;
        return BUS_EINVAL;
    }
    return metrics_register(m, name, help, labels, nlabels, KIND_GAUGE_FN, NULL,
                            fn, opaque, (metrics_series **)out);
}

static void
series_release(metrics_series *s)
{
    bus_metrics *m;
    metrics_family *f;
    metrics_series **pp;

    if (s == NULL)
        return;
    m = s->m;
    f = s->fam;
    bus__mutex_lock(&m->mtx);
    if (--s->refs > 0) {
        bus__mutex_unlock(&m->mtx);
        return;
    }
    /* Unlink first: no new snapshot can find it. */
    for (pp = &m->hash[s->hash & (m->hash_len - 1)]; *pp != NULL;
         pp = &(*pp)->hnext) {
        if (*pp == s) {
            *pp = s->hnext;
            break;
        }
    }
    if (s->fprev != NULL)
        s->fprev->fnext = s->fnext;
    else
        f->head = s->fnext;
    if (s->fnext != NULL)
        s->fnext->fprev = s->fprev;
    else
        f->tail = s->fprev;
    m->nseries--;
    if (--f->nseries == 0) {
        family_unlink(m, f);
        family_free(f);
    }
    /* Wait for calls of fn on other threads (this one may be inside it:
     * release from fn itself), so that fn never runs after we return. */
    while (s->calls > (metrics_calling == s ? 1u : 0u))
        bus__cond_wait(&m->cond, &m->mtx);
    if (s->pins > 0) { /* snapshots still hold the pointer */
        s->dead = true;
        bus__mutex_unlock(&m->mtx);
        return;
    }
    bus__mutex_unlock(&m->mtx);
    series_free(s);
}

void
bus_counter_release(bus_counter *c)
{
    series_release(c != NULL ? &c->s : NULL);
}

void
bus_gauge_release(bus_gauge *g)
{
    series_release(g != NULL ? &g->s : NULL);
}

void
bus_hist_release(bus_hist *h)
{
    series_release(h != NULL ? &h->s : NULL);
}

/* ---- Recording ---------------------------------------------------------- */

void
bus_counter_add(bus_counter *c, uint64_t n)
{
    bus__counter_add(c, n);
}

/* The body of bus_counter_add, for libbus's own hot paths: a direct call
 * (the public symbol is reached through the PLT from other files). */
void
bus__counter_add(bus_counter *c, uint64_t n)
{
    uint32_t k;
    bool owned;

    if (c == NULL)
        return;
    k = metrics_slot();
    owned = __builtin_expect(k <= c->s.excl, 1);
    bus__cell_add(
        (_Atomic uint64_t *)(void *)(c->s.cells +
                                     (size_t)(owned ? k - 1 : c->s.excl) *
                                         BUS_CACHELINE),
        n, owned);
}

void
bus_counter_inc(bus_counter *c)
{
    bus_counter_add(c, 1);
}

static inline _Atomic uint64_t *
gauge_cell(const bus_gauge *g)
{
    return (_Atomic uint64_t *)(void *)g->s.cells;
}

static inline uint64_t
dbl_bits(double d)
{
    uint64_t u;

    memcpy(&u, &d, sizeof(u));
    return u;
}

static inline double
bits_dbl(uint64_t u)
{
    double d;

    memcpy(&d, &u, sizeof(d));
    return d;
}

/* Double to int64, rounded, saturating (NaN gives 0): a plain cast of an
 * out-of-range double is undefined. */
static int64_t
dbl_to_i64(double v)
{
    if (!(v == v))
        return 0;
    if (v >= 9.2233720368547758e18)
        return INT64_MAX;
    if (v <= -9.2233720368547758e18)
        return INT64_MIN;
    return (int64_t)llround(v);
}

void
bus_gauge_set(bus_gauge *g, int64_t v)
{
    if (g == NULL)
        return;
    if (g->s.kind == KIND_GAUGE_DOUBLE)
        atomic_store_explicit(gauge_cell(g), dbl_bits((double)v),
                              memory_order_relaxed);
    else
        atomic_store_explicit(gauge_cell(g), (uint64_t)v, memory_order_relaxed);
}

void
bus_gauge_add(bus_gauge *g, int64_t delta)
{
    if (g == NULL)
        return;
    if (g->s.kind == KIND_GAUGE_DOUBLE)
        bus_gauge_add_double(g, (double)delta);
    else /* two's complement wrap: adding (uint64_t)-1 subtracts 1 */
        atomic_fetch_add_explicit(gauge_cell(g), (uint64_t)delta,
                                  memory_order_relaxed);
}

void
bus_gauge_set_double(bus_gauge *g, double v)
{
    if (g == NULL)
        return;
    if (g->s.kind == KIND_GAUGE_DOUBLE)
        atomic_store_explicit(gauge_cell(g), dbl_bits(v), memory_order_relaxed);
    else
        bus_gauge_set(g, dbl_to_i64(v));
}

void
bus_gauge_add_double(bus_gauge *g, double delta)
{
    _Atomic uint64_t *cell;
    uint64_t old;

    if (g == NULL)
        return;
    if (g->s.kind != KIND_GAUGE_DOUBLE) {
        bus_gauge_add(g, dbl_to_i64(delta));
        return;
    }
    cell = gauge_cell(g);
    old = atomic_load_explicit(cell, memory_order_relaxed);
    /* No atomic double add in C11: CAS the bits; old is refreshed by a
     * failed exchange. */
    while (!atomic_compare_exchange_weak_explicit(
        cell, &old, dbl_bits(bits_dbl(old) + delta), memory_order_relaxed,
        memory_order_relaxed))
        ;
}

void
bus_hist_record(bus_hist *h, uint64_t ns)
{
    bus__hist_record(h, ns);
}

void
bus__hist_record(bus_hist *h, uint64_t ns)
{
    hist_shard *sh;
    uint32_t i, k, split;
    bool owned;

    if (h == NULL)
        return;
    k = metrics_slot();
    owned = __builtin_expect(k <= h->s.excl, 1);
    sh = (hist_shard *)(void *)(h->s.cells +
                                (size_t)(owned ? k - 1 : h->s.excl) *
                                    h->s.stride);
    i = ns < h->s.limit ? hist_index(ns) : h->s.nb;
    bus__cell_add(&sh->b[i], 1, owned);
    split = h->s.straddle[i];
    if (__builtin_expect(split != 0, 0) && ns <= h->s.bounds[split - 1])
        bus__cell_add(&sh->b[h->s.nb + split], 1, owned);
    bus__cell_add(&sh->sum, ns, owned);
}

uint64_t
bus_metrics_now_ns(void)
{
    return bus__clock_mono_ns();
}

/* ---- Reading ------------------------------------------------------------ */

static uint64_t
counter_sum(const metrics_series *s)
{
    uint64_t v = 0;
    uint32_t i;

    for (i = 0; i <= s->excl; i++)
        v += atomic_load_explicit(
            (_Atomic uint64_t *)(void *)(s->cells + (size_t)i * s->stride),
            memory_order_relaxed);
    return v;
}

static double
gauge_read(const metrics_series *s)
{
    uint64_t u = atomic_load_explicit((_Atomic uint64_t *)(void *)s->cells,
                                      memory_order_relaxed);

    return s->kind == KIND_GAUGE_DOUBLE ? bits_dbl(u) : (double)(int64_t)u;
}

uint64_t
bus_counter_value(const bus_counter *c)
{
    if (c == NULL)
        return 0;
    if (c->s.kind == KIND_COUNTER_FN)
        return c->s.cfn(c->s.opaque);
    return counter_sum(&c->s);
}

double
bus_gauge_value(const bus_gauge *g)
{
    if (g == NULL)
        return 0;
    if (g->s.kind == KIND_GAUGE_FN)
        return g->s.gfn(g->s.opaque);
    return gauge_read(&g->s);
}

/* ---- Snapshots ---------------------------------------------------------- */

/* A callback to call after the lock is dropped, and where its value goes. */
typedef struct snap_call {
    metrics_series *s;
    bus_metric_series *out;
} snap_call;

typedef struct metrics_snap {
    bus_metrics_snapshot pub; /* first: the public pointer is this one */
    size_t size;
    uint64_t *bounds;
    size_t nbounds;
} metrics_snap;

static size_t
snap_align(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

static int
family_ptr_cmp(const void *a, const void *b)
{
    const metrics_family *fa = *(metrics_family *const *)a;
    const metrics_family *fb = *(metrics_family *const *)b;

    return strcmp(fa->name, fb->name);
}

static char *
snap_strcpy(char **pool, const char *s)
{
    size_t l = strlen(s) + 1;
    char *d = *pool;

    memcpy(d, s, l);
    *pool += l;
    return d;
}

/* Read by empty histograms as their cumulative le counts. */
static const uint64_t metrics_zeros[METRICS_BOUNDS_MAX];

/* Merges s's shards into scratch (nb + 1 buckets, then the split
 * counters) and builds v: the non-empty buckets and the cumulative le
 * counts (one allocation, freed with the snapshot), count, sum and
 * quantiles. bounds: the snapshot's copy of the registry's.
 * @locks m->mtx held (for the structure, not the cells). */
static int
snap_hist(const metrics_series *s, uint64_t *scratch, const uint64_t *bounds,
          size_t nbounds, bus_hist_value *v)
{
    uint32_t nb = s->nb, i, sh, n = nb + 1 + (uint32_t)nbounds;
    size_t nz = 0, k = 0, j;
    bus_hist_bucket *out;
    uint64_t *cum;
    uint64_t sum = 0, count = 0;

    memset(scratch, 0, n * sizeof(*scratch));
    for (sh = 0; sh <= s->excl; sh++) {
        hist_shard *h =
            (hist_shard *)(void *)(s->cells + (size_t)sh * s->stride);
        sum += atomic_load_explicit(&h->sum, memory_order_relaxed);
        for (i = 0; i < n; i++)
            scratch[i] += atomic_load_explicit(&h->b[i], memory_order_relaxed);
    }
    for (i = 0; i <= nb; i++) {
        if (scratch[i] != 0) {
            nz++;
            count += scratch[i];
        }
    }
    memset(v, 0, sizeof(*v));
    v->sum_ns = sum;
    v->bounds_ns = bounds;
    v->nbounds = nbounds;
    v->cumulative = metrics_zeros;
    if (nz == 0)
        return BUS_OK;
    if ((out = bus__alloc(nz * sizeof(*out) + nbounds * sizeof(*cum))) == NULL)
        return BUS_ENOMEM;
    cum = (uint64_t *)(void *)(out + nz);
    for (i = 0; i <= nb; i++) {
        if (scratch[i] == 0)
            continue;
        if (i == nb) {
            out[k].lo_ns = s->limit;
            out[k].hi_ns = UINT64_MAX;
        } else {
            hist_bucket_range(i, &out[k].lo_ns, &out[k].hi_ns);
        }
        out[k].count = scratch[i];
        k++;
    }
    /* le_j = the buckets wholly <= bound_j, plus the split counter of the
     * bucket the bound falls inside of (bounds are below the limit). */
    {
        uint64_t prefix = 0;
        uint32_t next = 0; /* buckets summed into prefix so far */
        for (j = 0; j < nbounds; j++) {
            uint32_t idx = hist_index(bounds[j]);
            uint64_t lo, hi;
            hist_bucket_range(idx, &lo, &hi);
            if (hi - 1 == bounds[j])
                idx++; /* the bound ends its bucket: the bucket counts */
            while (next < idx)
                prefix += scratch[next++];
            cum[j] = prefix;
            if (hi - 1 != bounds[j]) {
                /* Read while recording goes on, the split may count a
                 * sample whose bucket add we missed: never more than its
                 * bucket, so the le counts stay monotonic and <= count. */
                uint64_t split = scratch[nb + 1 + j];
                cum[j] += split < scratch[idx] ? split : scratch[idx];
            }
        }
    }
    v->buckets = out;
    v->nbuckets = nz;
    v->cumulative = cum;
    v->count = count;
    v->min_ns = bus_hist_value_quantile(v, 0);
    v->max_ns = bus_hist_value_quantile(v, 1);
    v->p50_ns = bus_hist_value_quantile(v, 0.50);
    v->p90_ns = bus_hist_value_quantile(v, 0.90);
    v->p95_ns = bus_hist_value_quantile(v, 0.95);
    v->p99_ns = bus_hist_value_quantile(v, 0.99);
    v->p999_ns = bus_hist_value_quantile(v, 0.999);
    return BUS_OK;
}

void
bus_metrics_snapshot_free(bus_metrics_snapshot *ps)
{
    metrics_snap *snap = (metrics_snap *)ps;
    size_t i, j;

    if (snap == NULL)
        return;
    for (i = 0; i < ps->nfamilies; i++) {
        const bus_metric_family *f = &ps->families[i];
        if (f->type != BUS_METRIC_HISTOGRAM)
            continue;
        for (j = 0; j < f->nseries; j++) {
            const bus_hist_value *v = &f->series[j].hist;
            /* buckets and cumulative are one allocation (when non-empty) */
            bus__free((void *)(uintptr_t)v->buckets,
                      v->nbuckets * sizeof(*v->buckets) +
                          v->nbounds * sizeof(uint64_t));
        }
    }
    bus__free(snap, snap->size);
}

int
bus_metrics_snapshot_take(bus_metrics *m, bus_metrics_snapshot **out)
{
    size_t nfam, nser = 0, nlab = 0, nstr = 0, ncall = 0, size, i, j, k;
    metrics_family **fams = NULL, *f;
    bus_metric_family *ofam;
    bus_metric_series *oser;
    bus_label *olab;
    snap_call *calls;
    metrics_snap *snap = NULL;
    metrics_series *s;
    uint64_t *scratch = NULL;
    size_t scratch_size;
    char *pool;
    int rv = BUS_OK;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if (m == NULL)
        return BUS_EINVAL;
    scratch_size = ((size_t)m->hist_nb + 1 + m->nbounds) * sizeof(*scratch);
    bus__mutex_lock(&m->mtx);
    nfam = m->nfamilies;
    for (f = m->families; f != NULL; f = f->next) {
        nstr += strlen(f->name) + 1 + strlen(f->help) + 1;
        nser += f->nseries;
        nlab += f->nseries * f->nlabels;
        for (s = f->head; s != NULL; s = s->fnext) {
            for (k = 0; k < f->nlabels; k++)
                nstr +=
                    strlen(f->label_names[k]) + 1 + strlen(s->values[k]) + 1;
            if (s->kind == KIND_COUNTER_FN || s->kind == KIND_GAUGE_FN)
                ncall++;
        }
    }
    /* One block: header, families, series, labels, bounds, calls,
     * strings; each part 8-aligned. */
    size = snap_align(sizeof(metrics_snap)) +
           snap_align(nfam * sizeof(bus_metric_family)) +
           snap_align(nser * sizeof(bus_metric_series)) +
           snap_align(nlab * sizeof(bus_label)) +
           snap_align(m->nbounds * sizeof(uint64_t)) +
           snap_align(ncall * sizeof(snap_call)) + nstr;
    if ((snap = bus__zalloc(size)) == NULL ||
        (fams = bus__alloc((nfam ? nfam : 1) * sizeof(*fams))) == NULL ||
        (scratch = bus__alloc(scratch_size)) == NULL) {
        rv = BUS_ENOMEM;
        goto fail;
    }
    snap->size = size;
    pool = (char *)snap + snap_align(sizeof(metrics_snap));
    ofam = (bus_metric_family *)(void *)pool;
    pool += snap_align(nfam * sizeof(bus_metric_family));
    oser = (bus_metric_series *)(void *)pool;
    pool += snap_align(nser * sizeof(bus_metric_series));
    olab = (bus_label *)(void *)pool;
    pool += snap_align(nlab * sizeof(bus_label));
    snap->bounds = (uint64_t *)(void *)pool;
    snap->nbounds = m->nbounds;
    memcpy(snap->bounds, m->bounds, m->nbounds * sizeof(uint64_t));
    pool += snap_align(m->nbounds * sizeof(uint64_t));
    calls = (snap_call *)(void *)pool;
    pool += snap_align(ncall * sizeof(snap_call));
    snap->pub.families = ofam;
    snap->pub.taken_ms = bus__clock_real_ns() / 1000000;

    for (i = 0, f = m->families; f != NULL; f = f->next)
        fams[i++] = f;
    qsort(fams, nfam, sizeof(*fams), family_ptr_cmp);
    ncall = 0;
    for (i = 0; i < nfam; i++) {
        bus_metric_family *of = &ofam[i];
        f = fams[i];
        of->name = snap_strcpy(&pool, f->name);
        of->help = snap_strcpy(&pool, f->help);
        of->type = f->type;
        of->series = oser;
        /* Counted as it fills, so that a failure below frees exactly the
         * bucket arrays made so far. */
        snap->pub.nfamilies = i + 1;
        for (s = f->head; s != NULL; s = s->fnext) {
            bus_metric_series *os = oser++;
            os->labels = olab;
            os->nlabels = f->nlabels;
            for (k = 0; k < f->nlabels; k++) {
                olab->name = snap_strcpy(&pool, f->label_names[k]);
                olab->value = snap_strcpy(&pool, s->values[k]);
                olab++;
            }
            switch (s->kind) {
            case KIND_COUNTER:
                os->counter = counter_sum(s);
                break;
            case KIND_GAUGE_INT:
            case KIND_GAUGE_DOUBLE:
                os->gauge = gauge_read(s);
                break;
            case KIND_HIST:
                rv = snap_hist(s, scratch, snap->bounds, snap->nbounds,
                               &os->hist);
                break;
            default:
                calls[ncall].s = s;
                calls[ncall].out = os;
                ncall++;
                break;
            }
            of->nseries++;
            if (rv != BUS_OK)
                goto fail;
        }
    }
    /* Everything allocated: from here on nothing fails. Pins keep the
     * callback series' memory until we are done with them. */
    for (j = 0; j < ncall; j++)
        calls[j].s->pins++;
    bus__mutex_unlock(&m->mtx);
    bus__free(fams, (nfam ? nfam : 1) * sizeof(*fams));
    bus__free(scratch, scratch_size);

    /* Callbacks run with no lock held (STYLE.md §9): they may register,
     * and release series. One released before its turn is not called
     * (it reads as 0 in this snapshot). */
    for (j = 0; j < ncall; j++) {
        s = calls[j].s;
        bus__mutex_lock(&m->mtx);
        if (s->dead || s->refs == 0) {
            bus__mutex_unlock(&m->mtx);
            continue;
        }
        s->calls++;
        bus__mutex_unlock(&m->mtx);
        metrics_calling = s;
        if (s->kind == KIND_COUNTER_FN)
            calls[j].out->counter = s->cfn(s->opaque);
        else
            calls[j].out->gauge = s->gfn(s->opaque);
        metrics_calling = NULL;
        bus__mutex_lock(&m->mtx);
        if (--s->calls == 0)
            bus__cond_broadcast(&m->cond); /* a release may wait */
        bus__mutex_unlock(&m->mtx);
    }
    if (ncall > 0) {
        bus__mutex_lock(&m->mtx);
        for (j = 0; j < ncall; j++) {
            s = calls[j].s;
            if (--s->pins == 0 && s->dead)
                series_free(s);
        }
        bus__mutex_unlock(&m->mtx);
    }
    *out = &snap->pub;
    return BUS_OK;
fail:
    bus__mutex_unlock(&m->mtx);
    bus__free(fams, (nfam ? nfam : 1) * sizeof(*fams));
    bus__free(scratch, scratch_size);
    bus_metrics_snapshot_free(snap != NULL ? &snap->pub : NULL);
    return rv;
}

const bus_metric_series *
bus_metrics_snapshot_find(const bus_metrics_snapshot *s, const char *name,
                          const bus_label *labels, size_t nlabels)
{
    bus_label canon[METRICS_LABELS_MAX];
    size_t i, j, k;

    if (s == NULL || name == NULL || nlabels > METRICS_LABELS_MAX ||
        (nlabels > 0 && labels == NULL))
        return NULL;
    for (i = 0; i < nlabels; i++) {
        if (labels[i].name == NULL || labels[i].value == NULL)
            return NULL;
        canon[i] = labels[i];
    }
    qsort(canon, nlabels, sizeof(*canon), label_cmp);
    for (i = 0; i < s->nfamilies; i++) {
        const bus_metric_family *f = &s->families[i];
        if (strcmp(f->name, name) != 0)
            continue;
        for (j = 0; j < f->nseries; j++) {
            const bus_metric_series *se = &f->series[j];
            if (se->nlabels != nlabels)
                return NULL; /* a family's series share label names */
            for (k = 0; k < nlabels; k++)
                if (strcmp(se->labels[k].name, canon[k].name) != 0 ||
                    strcmp(se->labels[k].value, canon[k].value) != 0)
                    break;
            if (k == nlabels)
                return se;
        }
        return NULL;
    }
    return NULL;
}

/* ---- Prometheus text ---------------------------------------------------- */

/* Escapes per the format: in HELP, backslash and newline; in label values
 * also the double quote. */
static void
w_escaped(bus__wbuf *w, const char *s, bool quote)
{
    const char *run = s;

    for (; *s; s++) {
        const char *esc = NULL;
        if (*s == '\\')
            esc = "\\\\";
        else if (*s == '\n')
            esc = "\\n";
        else if (quote && *s == '"')
            esc = "\\\"";
        if (esc == NULL)
            continue;
        bus__wbuf_put(w, run, (size_t)(s - run));
        bus__wbuf_str(w, esc);
        run = s + 1;
    }
    bus__wbuf_put(w, run, (size_t)(s - run));
}

/* By hand: snprintf was a third of the rendering time. */
static void
w_u64(bus__wbuf *w, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp);

    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    bus__wbuf_put(w, tmp + i, sizeof(tmp) - i);
}

/* Nanoseconds as decimal seconds, exactly ("0.0025", "12.5", "3"): integer
 * arithmetic, so no rounding and no dependence on the C locale's decimal
 * point. */
static void
w_seconds(bus__wbuf *w, uint64_t ns)
{
    char frac[10];
    int n;

    w_u64(w, ns / 1000000000u);
    ns %= 1000000000u;
    if (ns == 0)
        return;
    snprintf(frac, sizeof(frac), "%09llu", (unsigned long long)ns);
    for (n = 9; frac[n - 1] == '0'; n--)
        ;
    bus__wbuf_put(w, ".", 1);
    bus__wbuf_put(w, frac, (size_t)n);
}

/* A double in the shortest of %.15g / %.17g that reads back the same, as
 * Prometheus clients print (Go's 'g', -1), with a '.' whatever the locale
 * says. */
static void
w_double(bus__wbuf *w, double v)
{
    char tmp[40];
    int n, i;

    if (v != v) {
        bus__wbuf_str(w, "NaN");
        return;
    }
    if (v == HUGE_VAL || v == -HUGE_VAL) {
        bus__wbuf_str(w, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    n = snprintf(tmp, sizeof(tmp), "%.15g", v);
    if (strtod(tmp, NULL) != v)
        n = snprintf(tmp, sizeof(tmp), "%.17g", v);
    for (i = 0; i < n; i++) {
        char c = tmp[i];
        if (!((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e'))
            tmp[i] = '.'; /* a locale's decimal separator */
    }
    bus__wbuf_put(w, tmp, (size_t)n);
}

/* name{labels[,le="..."]} with suffix appended to name. le_ns: bound, or
 * UINT64_MAX for "+Inf", or 0 for no le label. */
static void
w_series_name(bus__wbuf *w, const bus_metric_family *f, const char *suffix,
              const bus_metric_series *s, uint64_t le_ns)
{
    size_t i;

    bus__wbuf_str(w, f->name);
    bus__wbuf_str(w, suffix);
    if (s->nlabels == 0 && le_ns == 0)
        return;
    bus__wbuf_put(w, "{", 1);
    for (i = 0; i < s->nlabels; i++) {
        if (i > 0)
            bus__wbuf_put(w, ",", 1);
        bus__wbuf_str(w, s->labels[i].name);
        bus__wbuf_put(w, "=\"", 2);
        w_escaped(w, s->labels[i].value, true);
        bus__wbuf_put(w, "\"", 1);
    }
    if (le_ns != 0) {
        if (s->nlabels > 0)
            bus__wbuf_put(w, ",", 1);
        bus__wbuf_put(w, "le=\"", 4);
        if (le_ns == UINT64_MAX)
            bus__wbuf_str(w, "+Inf");
        else
            w_seconds(w, le_ns);
        bus__wbuf_put(w, "\"", 1);
    }
    bus__wbuf_put(w, "}", 1);
}

static void
w_hist(bus__wbuf *w, const metrics_snap *snap, const bus_metric_family *f,
       const bus_metric_series *s)
{
    const bus_hist_value *v = &s->hist;
    size_t b;

    (void)snap;
    for (b = 0; b < v->nbounds; b++) {
        w_series_name(w, f, "_bucket", s, v->bounds_ns[b]);
        bus__wbuf_put(w, " ", 1);
        w_u64(w, v->cumulative[b]);
        bus__wbuf_put(w, "\n", 1);
    }
    w_series_name(w, f, "_bucket", s, UINT64_MAX);
    bus__wbuf_put(w, " ", 1);
    w_u64(w, v->count);
    bus__wbuf_put(w, "\n", 1);
    w_series_name(w, f, "_sum", s, 0);
    bus__wbuf_put(w, " ", 1);
    w_seconds(w, v->sum_ns);
    bus__wbuf_put(w, "\n", 1);
    w_series_name(w, f, "_count", s, 0);
    bus__wbuf_put(w, " ", 1);
    w_u64(w, v->count);
    bus__wbuf_put(w, "\n", 1);
}

static const char *
type_name(bus_metric_type t)
{
    switch (t) {
    case BUS_METRIC_COUNTER:
        return "counter";
    case BUS_METRIC_GAUGE:
        return "gauge";
    default:
        return "histogram";
    }
}

int
bus_metrics_snapshot_prometheus(const bus_metrics_snapshot *ps, char *buf,
                                size_t cap, size_t *len)
{
    const metrics_snap *snap = (const metrics_snap *)ps;
    bus__wbuf w = {buf, cap, 0};
    size_t i, j;

    if (ps == NULL || (buf == NULL && cap > 0))
        return BUS_EINVAL;
    for (i = 0; i < ps->nfamilies; i++) {
        const bus_metric_family *f = &ps->families[i];
        if (f->help[0] != '\0') {
            bus__wbuf_str(&w, "# HELP ");
            bus__wbuf_str(&w, f->name);
            bus__wbuf_put(&w, " ", 1);
            w_escaped(&w, f->help, false);
            bus__wbuf_put(&w, "\n", 1);
        }
        bus__wbuf_str(&w, "# TYPE ");
        bus__wbuf_str(&w, f->name);
        bus__wbuf_put(&w, " ", 1);
        bus__wbuf_str(&w, type_name(f->type));
        bus__wbuf_put(&w, "\n", 1);
        for (j = 0; j < f->nseries; j++) {
            const bus_metric_series *s = &f->series[j];
            if (f->type == BUS_METRIC_HISTOGRAM) {
                w_hist(&w, snap, f, s);
                continue;
            }
            w_series_name(&w, f, "", s, 0);
            bus__wbuf_put(&w, " ", 1);
            if (f->type == BUS_METRIC_COUNTER)
                w_u64(&w, s->counter);
            else
                w_double(&w, s->gauge);
            bus__wbuf_put(&w, "\n", 1);
        }
    }
    if (len != NULL)
        *len = w.len;
    if (cap > 0)
        buf[w.len < cap ? w.len : cap - 1] = '\0';
    return w.len < cap ? BUS_OK : BUS_ENOBUFS;
}

int
bus_metrics_prometheus(bus_metrics *m, char *buf, size_t cap, size_t *len)
{
    bus_metrics_snapshot *s;
    int rv;

    if ((rv = bus_metrics_snapshot_take(m, &s)) != BUS_OK)
        return rv;
    rv = bus_metrics_snapshot_prometheus(s, buf, cap, len);
    bus_metrics_snapshot_free(s);
    return rv;
}

int
bus_metrics_prometheus_alloc(bus_metrics *m, char **out, size_t *len)
{
    bus_metrics_snapshot *s;
    size_t n = 0;
    char *text;
    int rv;

    if (out == NULL)
        return BUS_EINVAL;
    *out = NULL;
    if ((rv = bus_metrics_snapshot_take(m, &s)) != BUS_OK)
        return rv;
    /* Measure, then render the same snapshot into an exact allocation
     * (so bus_metrics_text_free can size the free from strlen). */
    bus_metrics_snapshot_prometheus(s, NULL, 0, &n);
    if ((text = bus__alloc(n + 1)) == NULL) {
        bus_metrics_snapshot_free(s);
        return BUS_ENOMEM;
    }
    rv = bus_metrics_snapshot_prometheus(s, text, n + 1, &n);
    bus_metrics_snapshot_free(s);
    if (rv != BUS_OK) { /* cannot happen: same snapshot, same size */
        bus__free(text, n + 1);
        return BUS_EINTERNAL;
    }
    *out = text;
    if (len != NULL)
        *len = n;
    return BUS_OK;
}

void
bus_metrics_text_free(char *text)
{
    bus__strfree(text);
}
