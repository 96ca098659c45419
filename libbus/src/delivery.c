/* Accessors of bus_delivery (handler.h). */
#include <stdarg.h>
#include <stdio.h>

#include "delivery.h"

bus_event *
bus_delivery_event(const bus_delivery *d)
{
    return d->event;
}

const char *
bus_delivery_topic(const bus_delivery *d)
{
    return d->topic;
}

uint32_t
bus_delivery_attempt(const bus_delivery *d)
{
    return d->attempt;
}

uint64_t
bus_delivery_deadline(const bus_delivery *d)
{
    return d->deadline_ns;
}

const char *
bus_delivery_name(const bus_delivery *d)
{
    return d->name;
}

void
bus_delivery_set_error(bus_delivery *d, int code, const char *fmt, ...)
{
    va_list ap;

    d->err_code = code;
    if (fmt == NULL) {
        d->err_msg[0] = '\0';
        return;
    }
    va_start(ap, fmt);
    vsnprintf(d->err_msg, sizeof(d->err_msg), fmt, ap);
    va_end(ap);
}

int
bus_delivery_error_code(const bus_delivery *d)
{
    return d->err_code;
}

const char *
bus_delivery_error_msg(const bus_delivery *d)
{
    return d->err_msg;
}
