/*
 * UUIDv7 (RFC 9562 §5.7) with the "replace leftmost random bits with an
 * increased clock precision" counter of §6.2 method 1.
 *
 * Design. The 60-bit (unix_ms << 12 | counter) prefix is strictly
 * increasing in happens-before order across all threads: an id made
 * after another (on any thread, with any synchronisation between them)
 * is greater, even within a millisecond or when the wall clock steps
 * back; when 4096 ids are made in one millisecond the counter carries
 * into the ms field (the id runs a little ahead of the clock, never
 * backwards). The remaining 62 bits are random from the per-thread
 * generator.
 *
 * Prefixes are handed out in leases: one process-wide atomic (uuid_next)
 * holds the end of the last lease, and a thread moves it with a CAS to
 * take [max(now, next), +n), then makes ids from its lease with no
 * atomic RMW for as long as (a) the lease is not used up, (b) the clock
 * has not passed it and (c) uuid_next still equals the lease's end, i.e.
 * no thread took a lease since (a relaxed load). Why (c) keeps the
 * order: if an id made by thread B happens-before our call, so does B's
 * CAS that leased it, so our load sees that CAS or a later one: either B
 * leased before us (all its ids are below our lease) or after (uuid_next
 * moved past our end and we take a new lease above B's). The lease
 * length doubles (1 .. UUID_LEASE_MAX) while a thread keeps its leases
 * to itself and drops back to 1 when another thread interleaves, so
 * publishers that alternate do not burn counter values (which would push
 * ids ahead of the clock) and a lone one pays one CAS per 64 ids.
 */
#include <stdatomic.h>
#include <string.h>

#include <bus/event.h>

#include "event_impl.h"
#include "platform.h"

#define UUID_LEASE_MAX 64

static _Atomic uint64_t uuid_next; /* end of the last lease */
static BUS__TLS uint64_t uuid_cur, uuid_end; /* our lease */
static BUS__TLS uint64_t uuid_lease_n;

void
bus__uuid_v7_at(bus_uuid *u, int64_t unix_ns)
{
    uint64_t now = (uint64_t)(unix_ns / 1000000) << 12;
    uint64_t v, ms, rnd;
    uint16_t ctr;

    /* relaxed: see the top (coherence gives (c); the id carries no data
     * another thread reads through it). */
    if (uuid_cur < uuid_end && now <= uuid_cur
        && atomic_load_explicit(&uuid_next, memory_order_relaxed)
               == uuid_end) {
        v = uuid_cur++;
    } else {
        uint64_t old = atomic_load_explicit(&uuid_next, memory_order_relaxed);
        uint64_t n;

        if (uuid_end != 0 && old == uuid_end) /* used up or clock moved */
            n = uuid_lease_n < UUID_LEASE_MAX ? uuid_lease_n * 2
                                              : UUID_LEASE_MAX;
        else
            n = 1; /* first, or another thread leased since */
        do {
            v = now > old ? now : old;
        } while (!atomic_compare_exchange_weak_explicit(
            &uuid_next, &old, v + n, memory_order_relaxed,
            memory_order_relaxed));
        uuid_lease_n = n;
        uuid_cur = v + 1;
        uuid_end = v + n;
    }

    ms = v >> 12;
    ctr = (uint16_t)(v & 0xfff);
    rnd = bus__random_u64();
    u->b[0] = (uint8_t)(ms >> 40);
    u->b[1] = (uint8_t)(ms >> 32);
    u->b[2] = (uint8_t)(ms >> 24);
    u->b[3] = (uint8_t)(ms >> 16);
    u->b[4] = (uint8_t)(ms >> 8);
    u->b[5] = (uint8_t)ms;
    u->b[6] = (uint8_t)(0x70 | (ctr >> 8)); /* version 7 */
    u->b[7] = (uint8_t)ctr;
    u->b[8] = (uint8_t)(0x80 | ((rnd >> 56) & 0x3f)); /* variant 10 */
    u->b[9] = (uint8_t)(rnd >> 48);
    u->b[10] = (uint8_t)(rnd >> 40);
    u->b[11] = (uint8_t)(rnd >> 32);
    u->b[12] = (uint8_t)(rnd >> 24);
    u->b[13] = (uint8_t)(rnd >> 16);
    u->b[14] = (uint8_t)(rnd >> 8);
    u->b[15] = (uint8_t)rnd;
}

void
bus_uuid_v7(bus_uuid *u)
{
    bus__uuid_v7_at(u, bus__clock_real_ns());
}

uint64_t
bus_uuid_v7_ms(const bus_uuid *u)
{
    uint64_t ms = 0;
    int i;

    for (i = 0; i < 6; i++)
        ms = ms << 8 | u->b[i];
    return ms;
}

bool
bus_uuid_is_nil(const bus_uuid *u)
{
    static const bus_uuid nil;
    return memcmp(u, &nil, sizeof(nil)) == 0;
}

char *
bus_uuid_format(const bus_uuid *u, char *out)
{
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    int i;

    for (i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hex[u->b[i] >> 4];
        *p++ = hex[u->b[i] & 15];
    }
    *p = '\0';
    return out;
}

static int
uuid_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int
bus_uuid_parse(bus_uuid *u, const char *s)
{
    bus_uuid tmp;
    int i, pos = 0;

    if (s == NULL || u == NULL)
        return BUS_EINVAL;
    for (i = 0; i < 16; i++) {
        int hi, lo;
        if (i == 4 || i == 6 || i == 8 || i == 10) {
            if (s[pos] != '-')
                return BUS_EINVAL;
            pos++;
        }
        if ((hi = uuid_hexval(s[pos])) < 0
            || (lo = uuid_hexval(s[pos + 1])) < 0)
            return BUS_EINVAL;
        tmp.b[i] = (uint8_t)(hi << 4 | lo);
        pos += 2;
    }
    if (s[pos] != '\0')
        return BUS_EINVAL;
    *u = tmp;
    return BUS_OK;
}
