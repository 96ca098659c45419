/*
 * libbus logging.
 *
 * The library never writes to stderr by itself: every component logs through
 * a bus_logger (a callback, its opaque pointer and a level threshold) that
 * the user puts in the component's config. bus_log_stderr is the ready
 * callback that programs and examples use: text or JSON lines.
 */
#ifndef BUS_LOG_H
#define BUS_LOG_H

#include <bus/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum bus_log_level { /* RFC 5424 values, as in nng */
    BUS_LOG_DEFAULT = 0,     /* as bus_logger.level: means BUS_LOG_INFO */
    BUS_LOG_ERR = 3,
    BUS_LOG_WARN = 4,
    BUS_LOG_INFO = 6,
    BUS_LOG_DEBUG = 7
} bus_log_level;

/* Called from any libbus thread. subsys ("core", "codec", "kafka", "store",
 * ...) and msg are valid only during the call. Must not call back into
 * libbus. */
typedef void (*bus_log_fn)(void *opaque, bus_log_level level,
                           const char *subsys, const char *msg);

/* A logging destination. Zero (fn NULL) logs nothing. level is the
 * threshold: messages above it (less severe) are not even formatted;
 * BUS_LOG_DEFAULT (0) means BUS_LOG_INFO. */
typedef struct bus_logger {
    bus_log_fn fn;
    void *opaque;
    bus_log_level level;
} bus_logger;

/* Format for bus_log_stderr; pass a pointer to one as the opaque. */
typedef enum bus_log_format {
    BUS_LOG_TEXT = 0, /* 2026-11-22T15:04:05.123Z WARN  kafka: message */
    BUS_LOG_JSON = 1  /* {"ts":"...","level":"warn","subsys":"kafka","msg":"..."} */
} bus_log_format;

/* Writes one line per message to stderr, whole (one write(2) call, so lines
 * from several threads do not interleave). opaque: NULL for text, or a
 * `const bus_log_format *`. JSON strings are escaped. Thread: any. */
BUS_API void bus_log_stderr(void *opaque, bus_log_level level,
                            const char *subsys, const char *msg);

/* Formats and sends one message through lg if level passes its threshold.
 * lg may be NULL (no-op). Messages longer than 1 KiB are truncated.
 * Thread: any. */
BUS_API void bus_logf(const bus_logger *lg, bus_log_level level,
                      const char *subsys, const char *fmt, ...)
    BUS_PRINTF(4, 5);

/* True when a message at level would be emitted: lets callers skip
 * expensive argument preparation. Thread: any. */
BUS_API bool bus_log_enabled(const bus_logger *lg, bus_log_level level);

/* "err", "warn", "info", "debug". Thread: any. */
BUS_API const char *bus_log_level_name(bus_log_level level);

/* Parses "err|error|warn|warning|info|debug" (case-insensitive).
 * Returns BUS_OK or BUS_EINVAL. */
BUS_API int bus_log_level_parse(const char *s, bus_log_level *out);

#ifdef __cplusplus
}
#endif
#endif /* BUS_LOG_H */
