/*
 * libbus: common definitions shared by every public header.
 *
 * Export macro, version, the allocator hooks and small types that more than
 * one header needs. Include <bus/bus.h> for everything.
 */
#ifndef BUS_COMMON_H
#define BUS_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(BUS_BUILDING) && defined(__GNUC__)
#define BUS_API __attribute__((visibility("default")))
#else
#define BUS_API
#endif

#if defined(__GNUC__)
#define BUS_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define BUS_PRINTF(fmt, args)
#endif

#define BUS_VERSION_MAJOR 0
#define BUS_VERSION_MINOR 1
#define BUS_VERSION_PATCH 0

/* "0.1.0". Thread: any. */
BUS_API const char *bus_version(void);

/* Frees a buffer that libbus adopted (bus_event_wrap). Runs exactly once,
 * on any thread. */
typedef void (*bus_free_fn)(void *data, void *hint);

/* Allocator hooks. free receives the size that was asked for (sized free,
 * as nng), so a pool allocator needs no header. All three must be set. */
typedef struct bus_allocator {
    void *(*alloc)(void *opaque, size_t size);
    void *(*realloc)(void *opaque, void *p, size_t old_size, size_t new_size);
    void (*free)(void *opaque, void *p, size_t size);
    void *opaque;
} bus_allocator;

/* Replace the process-wide allocator (default: malloc/realloc/free).
 * Thread: must be called before any other libbus call, once; like
 * sqlite3_config(SQLITE_CONFIG_MALLOC) it is process state, because events
 * outlive any one context. NULL restores the default.
 * Returns BUS_OK or BUS_EINVAL (a hook is missing). */
BUS_API int bus_allocator_set(const bus_allocator *a);

#ifdef __cplusplus
}
#endif
#endif /* BUS_COMMON_H */
