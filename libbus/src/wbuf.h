/*
 * A caller's text buffer that counts what did not fit, as snprintf does
 * (internal): the writers of the Prometheus exposition (metrics.c) and
 * of the health report (health.c) fill it, and the caller learns the
 * length it needs from len when len > cap.
 */
#ifndef BUS_WBUF_H
#define BUS_WBUF_H

#include <stddef.h>
#include <string.h>

typedef struct bus__wbuf {
    char *buf;
    size_t cap;
    size_t len; /* what was written, or would have been */
} bus__wbuf;

static inline void
bus__wbuf_put(bus__wbuf *w, const char *s, size_t n)
{
    if (w->len < w->cap) {
        size_t room = w->cap - w->len;
        memcpy(w->buf + w->len, s, n < room ? n : room);
    }
    w->len += n;
}

static inline void
bus__wbuf_str(bus__wbuf *w, const char *s)
{
    bus__wbuf_put(w, s, strlen(s));
}

#endif
