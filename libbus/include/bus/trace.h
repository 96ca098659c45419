/*
 * Tracing and correlation: the delivery a thread is handling (set by the
 * tracing middleware around handler calls), W3C traceparent parsing and
 * formatting, and the inheritance rule for events published from inside a
 * handler:
 *   - correlation-id: the handled event's correlation id, or its id when
 *     it has none (the first event of a conversation correlates itself);
 *   - causation-id: the handled event's id;
 *   - traceparent: the handled event's trace id with a new span id per hop
 *     (a new trace when the handled event has none or a malformed one).
 */
#ifndef BUS_TRACE_H
#define BUS_TRACE_H

#include <bus/common.h>
#include <bus/event.h>
#include <bus/handler.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bus_trace_ctx {
    uint8_t trace_id[16];
    uint8_t span_id[8];
    uint8_t flags; /* 0x01: sampled */
} bus_trace_ctx;

#define BUS_TRACEPARENT_LEN 55 /* "00-<32 hex>-<16 hex>-<2 hex>" */

/* Parses a version-00 traceparent. BUS_OK or BUS_EINVAL (also for the
 * all-zero ids the spec forbids). */
BUS_API int bus_traceparent_parse(const char *s, bus_trace_ctx *out);
/* Writes the 55 characters and a NUL into out (>= 56 bytes). */
BUS_API char *bus_traceparent_format(const bus_trace_ctx *tc, char *out);
/* child = parent's trace id and flags, a new random span id; parent NULL:
 * a new trace (random trace id, sampled). */
BUS_API void bus_trace_child(const bus_trace_ctx *parent, bus_trace_ctx *child);

/* The delivery this thread is handling (inside a tracing middleware), or
 * NULL. Thread-local. */
BUS_API const bus_delivery *bus_delivery_current(void);
/* Sets it and returns the previous one (restore it after): for
 * dispatchers that call handlers without the tracing middleware. */
BUS_API const bus_delivery *bus_delivery_current_set(const bus_delivery *d);

/* Applies the inheritance rule above to e (not yet frozen) from the
 * current delivery; a no-op without one. Headers e already has are kept.
 * Returns BUS_OK, BUS_EFROZEN, BUS_ENOMEM. Thread: the handler's. */
BUS_API int bus_trace_inherit(bus_event *e);

#ifdef __cplusplus
}
#endif
#endif /* BUS_TRACE_H */
