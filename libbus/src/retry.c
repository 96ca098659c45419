/*
 * Retry backoff and dead-letter helpers (policy.h). Pure functions: the
 * policy middleware (middleware.c) decides when to call them.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <bus/policy.h>

void
bus_failure_policy_init(bus_failure_policy *p)
{
    memset(p, 0, sizeof(*p));
    p->size = sizeof(*p);
    p->retry.backoff = BUS_BACKOFF_EXPONENTIAL;
    p->retry.jitter = BUS_JITTER_FULL;
    p->retry.initial_ms = 100;
    p->retry.multiplier = 2.0;
    p->retry.max_delay_ms = 30000;
    p->retry.max_attempts = 5;
}

uint64_t
bus_retry_delay_ns(const bus_retry_config *rc, uint32_t attempt, uint64_t rnd)
{
    double init = (double)(rc->initial_ms ? rc->initial_ms : 100) * 1e6;
    double cap = (double)(rc->max_delay_ms ? rc->max_delay_ms : 30000) * 1e6;
    double mult = rc->multiplier >= 1.0 ? rc->multiplier : 2.0;
    double d;
    uint64_t di, r;

    if (attempt == 0)
        attempt = 1;
    switch (rc->backoff) {
    case BUS_BACKOFF_FIXED:
        d = init;
        break;
    case BUS_BACKOFF_LINEAR:
        d = init * attempt;
        break;
    case BUS_BACKOFF_DEFAULT:
    case BUS_BACKOFF_EXPONENTIAL:
    default:
        /* pow overflows to inf for huge attempts; the cap handles it */
        d = init * pow(mult, (double)(attempt - 1));
        break;
    }
    if (!(d <= cap))
        d = cap;
    di = (uint64_t)d;
    switch (rc->jitter) {
    case BUS_JITTER_NONE:
        return di;
    case BUS_JITTER_EQUAL:
        r = di / 2 + 1;
        return di - di / 2 + rnd % r; /* [d - d/2, d] */
    case BUS_JITTER_DEFAULT:
    case BUS_JITTER_FULL:
    default:
        return rnd % (di + 1); /* [0, d] */
    }
}

int
bus_dlq_topic(const bus_failure_policy *p, const char *topic, char *buf,
              size_t cap)
{
    const char *pat = p != NULL ? p->dlq_topic : NULL;
    const char *pct;
    int n;

    if (pat == NULL)
        n = snprintf(buf, cap, "%s.dlq", topic);
    else if ((pct = strstr(pat, "%s")) != NULL)
        n = snprintf(buf, cap, "%.*s%s%s", (int)(pct - pat), pat, topic,
                     pct + 2);
    else
        n = snprintf(buf, cap, "%s", pat);
    return n >= 0 && (size_t)n < cap ? BUS_OK : BUS_ENOBUFS;
}

int
bus_dlq_event(bus_event **out, const bus_event *ev, const char *topic,
              const char *subscription, int code, const char *msg,
              uint32_t attempts, int64_t first_failure_ns,
              int64_t last_failure_ns)
{
    bus_event *e;
    char num[32];
    int rv;

    *out = NULL;
    if ((rv = bus_event_clone(&e, ev)) != BUS_OK)
        return rv;
#define SET(k, v)                                                          \
    if ((rv = bus_event_set_header(e, (k), (v))) != BUS_OK)                \
        goto fail
    SET(BUS_H_DLQ_TOPIC, topic ? topic : "");
    SET(BUS_H_DLQ_SUBSCRIPTION, subscription ? subscription : "");
    snprintf(num, sizeof(num), "%d", code);
    SET(BUS_H_DLQ_ERROR_CODE, num);
    SET(BUS_H_DLQ_ERROR, msg ? msg : "");
    snprintf(num, sizeof(num), "%" PRIu32, attempts);
    SET(BUS_H_DLQ_ATTEMPTS, num);
    snprintf(num, sizeof(num), "%" PRId64, first_failure_ns);
    SET(BUS_H_DLQ_FIRST_FAILURE, num);
    snprintf(num, sizeof(num), "%" PRId64, last_failure_ns);
    SET(BUS_H_DLQ_LAST_FAILURE, num);
#undef SET
    *out = e;
    return BUS_OK;
fail:
    bus_event_unref(e);
    return rv;
}
