/*
 * libbus health: components register checks; a run calls them, each within
 * its timeout, and reports every check's status and the aggregate of each
 * view (liveness, readiness) as a struct or JSON.
 *
 * A check is one of three kinds:
 * - threaded (fn set, run_inline false): fn runs on the check's own thread.
 *   A run asks it to run and waits at most its timeout; a check still
 *   running then is reported UNHEALTHY ("timed out") and the result it
 *   returns later is discarded. C cannot cancel a thread, so a check that
 *   hangs keeps its thread; later runs report it at once as still running
 *   (they never wait for it again) until it returns. A check that may
 *   block (network, disk, a lock) must be threaded.
 * - inline (fn set, run_inline true): fn runs in the thread calling
 *   bus_health_run. For checks that only read state (an atomic flag, a
 *   timestamp, a queue depth): no thread, no wake-up latency. Its
 *   duration is measured; one that took longer than its timeout is
 *   reported UNHEALTHY, but the caller waited for it.
 * - manual (fn NULL): its status is whatever the component last set with
 *   bus_health_check_set (e.g. a circuit breaker opening sets DEGRADED),
 *   so a run costs nothing.
 *
 * The status of a view is the worst status of the checks that count for
 * it (HEALTHY when none does). docs/health.md has the JSON and how the
 * views map to HTTP probes.
 */
#ifndef BUS_HEALTH_H
#define BUS_HEALTH_H

#include <bus/common.h>
#include <bus/log.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_health bus_health;
typedef struct bus_health_check bus_health_check;

/* Ordered: a larger value is worse, so an aggregate is a max. */
typedef enum bus_health_status {
    BUS_HEALTH_HEALTHY = 0,
    BUS_HEALTH_DEGRADED = 1, /* works, impaired: still live and ready */
    BUS_HEALTH_UNHEALTHY = 2
} bus_health_status;

/* Views, a bit set. Liveness: should the process be restarted (deadlocked
 * workers). Readiness: should it get traffic (broker down, queues full). */
#define BUS_HEALTH_LIVENESS 0x1u
#define BUS_HEALTH_READINESS 0x2u
#define BUS_HEALTH_BOTH 0x3u

/* Bytes of a check's message, NUL included; longer ones are truncated. */
#define BUS_HEALTH_MSG_MAX 256
/* Bytes of a check's name, NUL included. */
#define BUS_HEALTH_NAME_MAX 128

/* A check. Writes a message (optional; msg is "" on entry, msg_len is
 * BUS_HEALTH_MSG_MAX) and returns the status; a value beyond UNHEALTHY
 * counts as UNHEALTHY. Runs on the check's thread (threaded) or the
 * caller's (inline), never under a libbus lock, and never concurrently
 * with itself. It may call bus_health_check_set, register checks and
 * deregister checks (itself included: that call is then its last); it
 * must not call bus_health_run or close the registry. */
typedef bus_health_status (*bus_health_fn)(void *opaque, char *msg,
                                           size_t msg_len);

/* Registry configuration: zero means default. Copied by bus_health_open. */
typedef struct bus_health_config {
    size_t size;                /* sizeof(bus_health_config), set by _init */
    int32_t default_timeout_ms; /* checks that set none; 1000; 1..600000 */
    int32_t close_timeout_ms;   /* how long close waits for running checks
                                 * before abandoning them; 2000; 1..600000 */
    bus_logger log;             /* default: none */
} bus_health_config;

BUS_API void bus_health_config_init(bus_health_config *cfg);

/* A check's registration: zero means default. Copied. */
typedef struct bus_health_check_config {
    size_t size;        /* set by bus_health_check_config_init */
    const char *name;   /* required; unique in the registry; 1..127 bytes,
                         * e.g. "bus.workers", "broker.kafka" */
    bus_health_fn fn;   /* NULL: a manual check */
    void *opaque;       /* passed to fn */
    int32_t timeout_ms; /* 0: the registry's default; 1..600000 */
    unsigned views;     /* BUS_HEALTH_* bits; 0: BUS_HEALTH_BOTH */
    bool run_inline;    /* fn reads state and never blocks: run it in the
                         * caller's thread (no thread of its own) */
    bus_health_status initial; /* manual checks: status until the first
                                * bus_health_check_set; HEALTHY */
} bus_health_check_config;

BUS_API void bus_health_check_config_init(bus_health_check_config *cfg);

/* Opens an empty registry. cfg may be NULL. Returns BUS_OK, BUS_EINVAL
 * (a field out of range; logged), BUS_ENOMEM. Thread: any. */
BUS_API int bus_health_open(bus_health **out, const bus_health_config *cfg);

/* Deregisters every check, waits up to close_timeout_ms for threaded
 * checks still running, and frees the registry: every check handle
 * becomes invalid. A check still running at the deadline is abandoned: its
 * thread frees its state when fn returns and is joined by a later
 * bus_health_open or bus_health_close (of any registry); a check that
 * never returns keeps its thread. No bus_health_run may be in progress or
 * start. NULL is a no-op. Thread: any but a check.
 * Blocks: up to close_timeout_ms. */
BUS_API void bus_health_close(bus_health *h);

/* Registers a check; threaded checks get their thread ("bus-health") now.
 * Borrows cfg. *out (may be NULL when never deregistered) gets the handle.
 * Returns BUS_OK, BUS_EINVAL (no name, too long, bad timeout or views;
 * logged), BUS_EEXIST (name taken), BUS_ENOMEM, BUS_EAGAIN (no thread).
 * Thread: any, including a check. Blocks: briefly. */
BUS_API int bus_health_register(bus_health *h,
                                const bus_health_check_config *cfg,
                                bus_health_check **out);

/* Removes the check: runs in progress leave it out of their reports,
 * later runs do not see it. Waits for a call of its fn in progress: an
 * inline one until it returns, a threaded one up to its timeout plus a
 * margin (1 s). Returns BUS_OK when fn is not running and never will again
 * (opaque may be freed); BUS_ETIMEDOUT when a threaded call is still
 * running past that (hung): it keeps opaque until it returns, and the
 * registry reclaims its thread later. Called from inside the check's own
 * fn, it does not wait: that call is the last. NULL is a no-op (BUS_OK).
 * Thread: any. Blocks: as said. */
BUS_API int bus_health_deregister(bus_health_check *c);

/* Sets a manual check's status and message (printf format; NULL for "").
 * Returns BUS_OK, or BUS_EINVAL for a check with a fn or a bad status.
 * Thread: any, including a check or a handler. Blocks: briefly (the
 * registry mutex, which runs hold only between calls of checks). */
BUS_API int bus_health_check_set(bus_health_check *c, bus_health_status st,
                                 const char *fmt, ...) BUS_PRINTF(3, 4);

/* ---- Running and reporting ----------------------------------------------- */

typedef struct bus_health_result {
    const char *name;
    bus_health_status status;
    const char *message;  /* "" when none */
    uint64_t duration_ns; /* time fn took; for a timeout, time waited */
    unsigned views;       /* BUS_HEALTH_* it counts for */
    bool timed_out;       /* UNHEALTHY because it exceeded its timeout */
} bus_health_result;

typedef struct bus_health_report {
    bus_health_status status;        /* worst over the requested views */
    bus_health_status liveness;      /* when requested, else HEALTHY */
    bus_health_status readiness;     /* when requested, else HEALTHY */
    unsigned views;                  /* the views requested */
    const bus_health_result *checks; /* registration order */
    size_t nchecks;
    uint64_t duration_ns; /* the whole run */
    int64_t taken_ms;     /* wall clock at the start, ms since epoch */
} bus_health_report;

/* Runs the checks that count for any of views (0: both) and reports them.
 * Threaded checks run concurrently; a check already running for another
 * caller's run is not started twice: this run waits for that call (up to
 * its timeout). Returns BUS_OK, BUS_EINVAL, BUS_ENOMEM (before any check
 * ran). Thread: any but a check. Blocks: up to the longest timeout of the
 * threaded checks it waits for, or the time its inline checks take if
 * longer, plus scheduling delays. */
BUS_API int bus_health_run(bus_health *h, unsigned views,
                           bus_health_report **out);
/* NULL is a no-op. Thread: any. */
BUS_API void bus_health_report_free(bus_health_report *r);

/* The report as one JSON object (docs/health.md), snprintf-style: writes
 * into buf (cap bytes, NUL-terminated when cap > 0), sets *len (may be
 * NULL) to the full length without the NUL. Strings are escaped and
 * invalid UTF-8 replaced with U+FFFD. Returns BUS_OK, or BUS_ENOBUFS when
 * it did not fit. Thread: any. */
BUS_API int bus_health_report_json(const bus_health_report *r, char *buf,
                                   size_t cap, size_t *len);
/* Same into a new string, freed with bus_health_text_free. Returns BUS_OK,
 * BUS_EINVAL, BUS_ENOMEM. */
BUS_API int bus_health_report_json_alloc(const bus_health_report *r, char **out,
                                         size_t *len);
/* NULL is a no-op. */
BUS_API void bus_health_text_free(char *text);

/* "healthy", "degraded", "unhealthy" ("unknown" otherwise). Thread: any. */
BUS_API const char *bus_health_status_name(bus_health_status st);

/* The HTTP status a probe endpoint answers: 200 for HEALTHY and DEGRADED,
 * 503 for UNHEALTHY. Thread: any. */
BUS_API int bus_health_http_status(bus_health_status st);

#ifdef __cplusplus
}
#endif
#endif /* BUS_HEALTH_H */
