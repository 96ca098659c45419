/*
 * Broker URIs: parsing and the typed option getters (contract: broker.h).
 *
 * Grammar (a deliberately small subset of RFC 3986, enough for broker
 * addresses; no userinfo, no fragment):
 *
 *   uri       = scheme "://" authority [ path ] [ "?" query ]
 *   scheme    = [a-z] [a-z0-9+.-]*
 *   authority = everything up to the first '/' or '?' (may be empty:
 *               "zmq+ipc:///tmp/x" has authority "" and path "/tmp/x")
 *   path      = "/" ... up to the first '?'
 *   query     = pair *( "&" pair ),  pair = key [ "=" value ]
 *
 * Authority, path, keys and values are percent-decoded (%XX, either case);
 * '+' stays '+' (this is not form encoding: "zmq+tcp" and Kafka SASL
 * passwords contain it). %00 is refused because every component becomes a
 * C string. In the query an empty pair ("a=1&&b=2", a trailing '&') is
 * skipped, an empty key is an error, "key" alone has value "", and a value
 * may contain '=' (only the first one splits).
 *
 * Memory: every string is its own bus__alloc block of strlen + 1 bytes, so
 * bus_uri_free releases them with bus__strfree; a zeroed or half-filled
 * struct (a parse that failed midway) is safe to free.
 *
 * The "consumed" flags implement the rule that a backend must claim every
 * option it understands: the core rejects whatever is left
 * (bus_uri_unconsumed), so a typo in an option name is an error rather than
 * a silently ignored setting.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <bus/broker.h>

#include "alloc.h"

static void uri_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
uri_err(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errbuf_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errbuf_len, fmt, ap);
    va_end(ap);
}

static int
uri_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..len) into a new string in *out, allocated at its
 * exact strlen + 1 (the size bus__strfree gives back). what names the
 * component for the error message. */
static int
uri_decode(const char *s, size_t len, const char *what, char **out,
           char *errbuf, size_t errbuf_len)
{
    size_t i, n = 0, dlen = len;
    char *d;

    *out = NULL;
    /* Validate first, so that a bad escape costs no allocation. */
    for (i = 0; i < len; i++) {
        if (s[i] != '%')
            continue;
        if (len - i < 3 || uri_hexval(s[i + 1]) < 0 ||
            uri_hexval(s[i + 2]) < 0) {
            uri_err(errbuf, errbuf_len,
                    "bad percent escape in %s at '%.*s' (want %%XX)", what,
                    (int)(len - i < 3 ? len - i : 3), s + i);
            return BUS_EINVAL;
        }
        if (s[i + 1] == '0' && s[i + 2] == '0') {
            uri_err(errbuf, errbuf_len, "%%00 (NUL) is not allowed in %s",
                    what);
            return BUS_EINVAL;
        }
        i += 2;
        dlen -= 2;
    }
    if ((d = bus__alloc(dlen + 1)) == NULL)
        return BUS_ENOMEM;
    for (i = 0; i < len; i++) {
        if (s[i] == '%') {
            d[n++] = (char)(uri_hexval(s[i + 1]) << 4 | uri_hexval(s[i + 2]));
            i += 2;
        } else {
            d[n++] = s[i];
        }
    }
    d[n] = '\0';
    *out = d;
    return BUS_OK;
}

static bus_uri_param *
uri_find(const bus_uri *u, const char *key)
{
    size_t i;

    for (i = 0; i < u->n_params; i++)
        if (strcmp(u->params[i].key, key) == 0)
            return (bus_uri_param *)&u->params[i];
    return NULL;
}

/* One "key[=value]" pair of the query, s[0..len). */
static int
uri_parse_pair(bus_uri *u, const char *s, size_t len, char *errbuf,
               size_t errbuf_len)
{
    const char *eq = memchr(s, '=', len);
    size_t klen = eq != NULL ? (size_t)(eq - s) : len;
    bus_uri_param *p;
    char *key, *value;
    int rv;

    if (klen == 0) {
        uri_err(errbuf, errbuf_len, "empty key in query pair '%.*s'", (int)len,
                s);
        return BUS_EINVAL;
    }
    if (u->n_params == BUS_URI_MAX_PARAMS) {
        uri_err(errbuf, errbuf_len, "too many query parameters (max %d)",
                BUS_URI_MAX_PARAMS);
        return BUS_EINVAL;
    }
    if ((rv = uri_decode(s, klen, "query key", &key, errbuf, errbuf_len)) !=
        BUS_OK)
        return rv;
    if (uri_find(u, key) != NULL) {
        uri_err(errbuf, errbuf_len, "duplicate query key '%s'", key);
        bus__strfree(key);
        return BUS_EINVAL;
    }
    if (eq != NULL)
        rv = uri_decode(eq + 1, len - klen - 1, "query value", &value, errbuf,
                        errbuf_len);
    else
        rv = (value = bus__strdup("", NULL)) != NULL ? BUS_OK : BUS_ENOMEM;
    if (rv != BUS_OK) {
        bus__strfree(key);
        return rv;
    }
    p = &u->params[u->n_params++];
    p->key = key;
    p->value = value;
    p->consumed = false;
    return BUS_OK;
}

int
bus_uri_parse(bus_uri *u, const char *s, char *errbuf, size_t errbuf_len)
{
    const char *p, *auth, *path, *query;
    size_t slen;
    int rv;

    if (errbuf != NULL && errbuf_len > 0)
        errbuf[0] = '\0';
    if (u == NULL)
        return BUS_EINVAL;
    memset(u, 0, sizeof(*u));
    if (s == NULL) {
        uri_err(errbuf, errbuf_len, "no URI given");
        return BUS_EINVAL;
    }

    /* scheme */
    for (p = s; *p != '\0' && *p != ':'; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') ||
                  (p > s && ((c >= '0' && c <= '9') || c == '+' || c == '.' ||
                             c == '-'));
        if (!ok) {
            if (strstr(s, "://") == NULL)
                break; /* reported below as "no scheme" */
            uri_err(errbuf, errbuf_len,
                    "bad scheme in '%s': want [a-z][a-z0-9+.-]* before "
                    "'://'",
                    s);
            return BUS_EINVAL;
        }
    }
    if (p == s || strncmp(p, "://", 3) != 0) {
        uri_err(errbuf, errbuf_len,
                "no scheme in '%s' (want scheme://..., e.g. mem://name)", s);
        return BUS_EINVAL;
    }
    if ((u->scheme = bus__alloc((size_t)(p - s) + 1)) == NULL)
        return BUS_ENOMEM;
    memcpy(u->scheme, s, (size_t)(p - s));
    u->scheme[p - s] = '\0';

    /* authority, path, query */
    auth = p + 3;
    slen = strlen(auth);
    query = memchr(auth, '?', slen);
    if (query == NULL)
        query = auth + slen;
    path = memchr(auth, '/', (size_t)(query - auth));
    if (path == NULL)
        path = query;
    if ((rv = uri_decode(auth, (size_t)(path - auth), "authority",
                         &u->authority, errbuf, errbuf_len)) != BUS_OK)
        goto fail;
    if ((rv = uri_decode(path, (size_t)(query - path), "path", &u->path, errbuf,
                         errbuf_len)) != BUS_OK)
        goto fail;

    if (*query == '?') {
        const char *q = query + 1;
        for (;;) {
            const char *amp = strchr(q, '&');
            size_t len = amp != NULL ? (size_t)(amp - q) : strlen(q);
            if (len > 0 &&
                (rv = uri_parse_pair(u, q, len, errbuf, errbuf_len)) != BUS_OK)
                goto fail;
            if (amp == NULL)
                break;
            q = amp + 1;
        }
    }
    return BUS_OK;
fail:
    bus_uri_free(u);
    return rv;
}

void
bus_uri_free(bus_uri *u)
{
    size_t i;

    if (u == NULL)
        return;
    bus__strfree(u->scheme);
    bus__strfree(u->authority);
    bus__strfree(u->path);
    for (i = 0; i < u->n_params && i < BUS_URI_MAX_PARAMS; i++) {
        bus__strfree(u->params[i].key);
        bus__strfree(u->params[i].value);
    }
    memset(u, 0, sizeof(*u));
}

const char *
bus_uri_get(bus_uri *u, const char *key)
{
    bus_uri_param *p;

    if (u == NULL || key == NULL || (p = uri_find(u, key)) == NULL)
        return NULL;
    p->consumed = true;
    return p->value;
}

int
bus_uri_get_i64(bus_uri *u, const char *key, int64_t min, int64_t max,
                int64_t *out)
{
    const char *v = bus_uri_get(u, key);
    char *end;
    long long n;

    if (v == NULL)
        return BUS_ENOTFOUND;
    /* strtoll skips leading blanks and accepts an empty string as 0:
     * neither is a number here. */
    if (!((v[0] >= '0' && v[0] <= '9') ||
          ((v[0] == '-' || v[0] == '+') && v[1] >= '0' && v[1] <= '9')))
        return BUS_EINVAL;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno != 0 || *end != '\0' || n < min || n > max)
        return BUS_EINVAL;
    *out = (int64_t)n;
    return BUS_OK;
}

static bool
uri_ieq(const char *a, const char *b)
{
    for (; *a != '\0' && *b != '\0'; a++, b++) {
        char x = *a >= 'A' && *a <= 'Z' ? (char)(*a - 'A' + 'a') : *a;
        if (x != *b)
            return false;
    }
    return *a == *b;
}

int
bus_uri_get_bool(bus_uri *u, const char *key, bool *out)
{
    const char *v = bus_uri_get(u, key);

    if (v == NULL)
        return BUS_ENOTFOUND;
    if (strcmp(v, "1") == 0 || uri_ieq(v, "true") || uri_ieq(v, "yes")) {
        *out = true;
        return BUS_OK;
    }
    if (strcmp(v, "0") == 0 || uri_ieq(v, "false") || uri_ieq(v, "no")) {
        *out = false;
        return BUS_OK;
    }
    return BUS_EINVAL;
}

const char *
bus_uri_unconsumed(const bus_uri *u)
{
    size_t i;

    if (u == NULL)
        return NULL;
    for (i = 0; i < u->n_params; i++)
        if (!u->params[i].consumed)
            return u->params[i].key;
    return NULL;
}
