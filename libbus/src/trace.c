/*
 * Tracing and correlation (trace.h). The current delivery is a C11
 * thread-local pointer: set by the tracing middleware (or a dispatcher)
 * around handler calls, read by bus_trace_inherit when a handler builds
 * and publishes an event. Span ids come from the per-thread generator of
 * platform.h (fast, not for secrets: ids need uniqueness, not secrecy).
 */
#include <string.h>

#include <bus/trace.h>

#include "delivery.h"
#include "pipeline.h"
#include "platform.h"

/* Set by the dispatcher (ctx.c) around every handler call, without a
 * function call: initial-exec TLS (platform.h). */
BUS__TLS const bus_delivery *bus__trace_current;
#define trace_current bus__trace_current

const bus_delivery *
bus_delivery_current(void)
{
    return trace_current;
}

const bus_delivery *
bus_delivery_current_set(const bus_delivery *d)
{
    const bus_delivery *prev = trace_current;

    trace_current = d;
    return prev;
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1; /* the spec allows lowercase only */
}

static bool
hex_decode(const char *s, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return false;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

static bool
all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

int
bus_traceparent_parse(const char *s, bus_trace_ctx *out)
{
    uint8_t ver;

    if (s == NULL || strlen(s) < BUS_TRACEPARENT_LEN || s[2] != '-'
        || s[35] != '-' || s[52] != '-')
        return BUS_EINVAL;
    if (!hex_decode(s, &ver, 1) || ver == 0xff)
        return BUS_EINVAL;
    /* Version 00 is exactly 55 chars; later versions may append "-...". */
    if (ver == 0 && s[BUS_TRACEPARENT_LEN] != '\0')
        return BUS_EINVAL;
    if (ver != 0 && s[BUS_TRACEPARENT_LEN] != '\0'
        && s[BUS_TRACEPARENT_LEN] != '-')
        return BUS_EINVAL;
    if (!hex_decode(s + 3, out->trace_id, 16)
        || !hex_decode(s + 36, out->span_id, 8)
        || !hex_decode(s + 53, &out->flags, 1))
        return BUS_EINVAL;
    if (all_zero(out->trace_id, 16) || all_zero(out->span_id, 8))
        return BUS_EINVAL;
    return BUS_OK;
}

char *
bus_traceparent_format(const bus_trace_ctx *tc, char *out)
{
    static const char hx[] = "0123456789abcdef";
    char *p = out;

    *p++ = '0';
    *p++ = '0';
    *p++ = '-';
    for (int i = 0; i < 16; i++) {
        *p++ = hx[tc->trace_id[i] >> 4];
        *p++ = hx[tc->trace_id[i] & 15];
    }
    *p++ = '-';
    for (int i = 0; i < 8; i++) {
        *p++ = hx[tc->span_id[i] >> 4];
        *p++ = hx[tc->span_id[i] & 15];
    }
    *p++ = '-';
    *p++ = hx[tc->flags >> 4];
    *p++ = hx[tc->flags & 15];
    *p = '\0';
    return out;
}

static void
random_nonzero(uint8_t *p, size_t n)
{
    do
        bus__random_bytes(p, n);
    while (all_zero(p, n));
}

void
bus_trace_child(const bus_trace_ctx *parent, bus_trace_ctx *child)
{
    if (parent != NULL) {
        memcpy(child->trace_id, parent->trace_id, 16);
        child->flags = parent->flags;
    } else {
        random_nonzero(child->trace_id, 16);
        child->flags = 0x01;
    }
    random_nonzero(child->span_id, 8);
}

int
bus_trace_inherit(bus_event *e)
{
    const bus_delivery *d = trace_current;
    const bus_event *src;
    const char *corr, *tp;
    char idbuf[BUS_UUID_STR_LEN + 1], tpbuf[BUS_TRACEPARENT_LEN + 1];
    bus_trace_ctx parent, child;
    int rv;

    if (d == NULL || d->event == NULL)
        return BUS_OK;
    if (bus_event_frozen(e))
        return BUS_EFROZEN;
    src = d->event;
    bus_uuid_format(bus_event_id(src), idbuf);
    if (bus_event_correlation_id(e) == NULL) {
        corr = bus_event_correlation_id(src);
        if ((rv = bus_event_set_header(e, BUS_H_CORRELATION_ID,
                                       corr ? corr : idbuf)) != BUS_OK)
            return rv;
    }
    if (bus_event_causation_id(e) == NULL
        && (rv = bus_event_set_header(e, BUS_H_CAUSATION_ID, idbuf))
               != BUS_OK)
        return rv;
    if (bus_event_header(e, BUS_H_TRACEPARENT) == NULL) {
        tp = bus_event_header(src, BUS_H_TRACEPARENT);
        if (tp != NULL && bus_traceparent_parse(tp, &parent) == BUS_OK)
            bus_trace_child(&parent, &child);
        else
            bus_trace_child(NULL, &child);
        bus_traceparent_format(&child, tpbuf);
        if ((rv = bus_event_set_header(e, BUS_H_TRACEPARENT, tpbuf))
            != BUS_OK)
            return rv;
    }
    return BUS_OK;
}
