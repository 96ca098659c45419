/*
 * CURVE security for the ZeroMQ broker: key options and the ZAP handler
 * (contract: <bus/broker_zmq.h>).
 *
 * Design:
 * - The bound side is the CURVE server; the connecting side the client.
 *   Keys come as Z85 text in an option or in a file (40 characters; for
 *   an allow-list file one key per line, '#' comments).
 * - Authentication: a server sets ZMQ_ZAP_DOMAIN and
 *   ZMQ_ZAP_ENFORCE_DOMAIN, so libzmq asks the ZAP handler about every
 *   client and refuses them all if no handler answers. The handler is a
 *   REP socket on inproc://zeromq.zap.01 of the broker's private context,
 *   served by its I/O thread: it allows a client whose public key is in
 *   the allow-list (or any, with curve_allow_any=1), and the server's own
 *   key (its loopback socket).
 * - Secret keys never reach a log line or an errbuf, and are wiped at
 *   fini. Public keys are logged (to say who was refused).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "zmq_impl.h"

#define ZB_ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZB_KEYFILE_MAX 65536

static void zb_cerr(char *errbuf, size_t errbuf_len, const char *fmt, ...)
    BUS_PRINTF(3, 4);

static void
zb_cerr(char *errbuf, size_t errbuf_len, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errbuf_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errbuf_len, fmt, ap);
    va_end(ap);
}

/* Overwrites secrets in a way the compiler may not drop as a dead store
 * (no memset_s or explicit_bzero in C11 + POSIX): the volatile function
 * pointer is the one volatile this code base allows, and this is why. */
static void *(*const volatile zb_memset)(void *, int, size_t) = memset;

void
zb_curve_wipe(zb_opts *o)
{
    zb_memset(&o->secret, 0, sizeof(o->secret));
    if (o->allow != NULL)
        bus__free(o->allow, o->n_allow * sizeof(*o->allow));
    o->allow = NULL;
    o->n_allow = 0;
}

static bool
zb_z85_valid(const char *s, uint8_t out[32])
{
    uint8_t tmp[32];

    if (strlen(s) != ZB_Z85_LEN)
        return false;
    return zmq_z85_decode(out != NULL ? out : tmp, s) != NULL;
}

/* Reads a whole (small) file into a NUL-terminated buffer. */
static int
zb_read_file(const char *path, char **out, size_t *size, char *errbuf,
             size_t errbuf_len)
{
    FILE *f = fopen(path, "r");
    char *buf;
    size_t n;

    *out = NULL;
    if (f == NULL) {
        zb_cerr(errbuf, errbuf_len, "cannot read key file '%s': %s", path,
                strerror(errno));
        return BUS_EINVAL;
    }
    if ((buf = bus__alloc(ZB_KEYFILE_MAX + 1)) == NULL) {
        fclose(f);
        return BUS_ENOMEM;
    }
    n = fread(buf, 1, ZB_KEYFILE_MAX + 1, f);
    fclose(f);
    if (n > ZB_KEYFILE_MAX) {
        zb_memset(buf, 0, ZB_KEYFILE_MAX + 1);
        bus__free(buf, ZB_KEYFILE_MAX + 1);
        zb_cerr(errbuf, errbuf_len, "key file '%s' is too large", path);
        return BUS_EINVAL;
    }
    buf[n] = '\0';
    *out = buf;
    *size = ZB_KEYFILE_MAX + 1;
    return BUS_OK;
}

static void
zb_free_file(char *buf, size_t size)
{
    if (buf != NULL) {
        zb_memset(buf, 0, size); /* it may have held a secret key */
        bus__free(buf, size);
    }
}

/* Trims s in place and returns it. */
static char *
zb_trim(char *s)
{
    char *e;

    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
        s++;
    e = s + strlen(s);
    while (e > s &&
           (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r' || e[-1] == '\n'))
        *--e = '\0';
    return s;
}

/* One key from "name" (Z85) or "name_file" (a file holding it). Never
 * puts the key's text in errbuf. */
static int
zb_key_opt(bus_uri *u, const char *name, zb_key *k, bool *has, char *errbuf,
           size_t errbuf_len)
{
    char fname[64], *buf = NULL;
    const char *v, *path;
    size_t size = 0;
    int rv;

    snprintf(fname, sizeof(fname), "%s_file", name);
    v = bus_uri_get(u, name);
    path = bus_uri_get(u, fname);
    if (v != NULL && path != NULL) {
        zb_cerr(errbuf, errbuf_len, "give '%s' or '%s', not both", name, fname);
        return BUS_EINVAL;
    }
    if (path != NULL) {
        if ((rv = zb_read_file(path, &buf, &size, errbuf, errbuf_len)) !=
            BUS_OK)
            return rv;
        v = zb_trim(buf);
    }
    if (v == NULL)
        return BUS_OK;
    if (!zb_z85_valid(v, NULL)) {
        zb_free_file(buf, size);
        zb_cerr(errbuf, errbuf_len, "option '%s': not a 40-character Z85 key",
                path != NULL ? fname : name);
        return BUS_EINVAL;
    }
    memcpy(k->z85, v, ZB_Z85_LEN + 1);
    *has = true;
    zb_free_file(buf, size);
    return BUS_OK;
}

static int
zb_allow_add(zb_opts *o, const char *key, const char *what, char *errbuf,
             size_t errbuf_len)
{
    uint8_t bin[32];
    uint8_t(*v)[32];

    if (!zb_z85_valid(key, bin)) {
        zb_cerr(errbuf, errbuf_len, "%s: '%.40s' is not a Z85 public key", what,
                key);
        return BUS_EINVAL;
    }
    v = bus__realloc(o->allow, o->n_allow * sizeof(*v),
                     (o->n_allow + 1) * sizeof(*v));
    if (v == NULL)
        return BUS_ENOMEM;
    memcpy(v[o->n_allow], bin, 32);
    o->allow = v;
    o->n_allow++;
    return BUS_OK;
}

/* Adds every key of a list: comma-separated (an option), or one per
 * line (a file: the key is the line's first word; what follows it must
 * be a '#' comment, and a line whose first word is not a key but starts
 * with '#' is a comment. '#' is a Z85 digit, so a key may start with one:
 * a valid key wins). */
static int
zb_allow_list(zb_opts *o, char *list, bool file, const char *what, char *errbuf,
              size_t errbuf_len)
{
    char *p = list;
    int rv;

    while (*p != '\0') {
        char *end = p + strcspn(p, file ? "\n" : ","), *key, *rest;
        char save = *end;
        *end = '\0';
        key = zb_trim(p);
        if (file) {
            rest = key + strcspn(key, " \t");
            if (*rest != '\0') {
                *rest++ = '\0';
                rest = zb_trim(rest);
            }
            if (key[0] == '#' && !zb_z85_valid(key, NULL))
                key = rest = ""; /* a comment line */
            if (*rest != '\0' && *rest != '#') {
                zb_cerr(errbuf, errbuf_len,
                        "%s: one key per line (then only a '#' comment)", what);
                return BUS_EINVAL;
            }
        }
        if (*key != '\0' &&
            (rv = zb_allow_add(o, key, what, errbuf, errbuf_len)) != BUS_OK)
            return rv;
        if (save == '\0')
            break;
        p = end + 1;
    }
    return BUS_OK;
}

int
zb_curve_opts(zb *z, bus_uri *u, char *errbuf, size_t errbuf_len)
{
    zb_opts *o = &z->o;
    const char *v, *dom;
    bool any_allow = false;
    size_t size = 0;
    char *buf = NULL;
    int rv;

    if ((rv = zb_key_opt(u, "curve_secret_key", &o->secret, &o->has_secret,
                         errbuf, errbuf_len)) ||
        (rv = zb_key_opt(u, "curve_public_key", &o->public_, &o->has_public,
                         errbuf, errbuf_len)) ||
        (rv = zb_key_opt(u, "curve_server_key", &o->server_key,
                         &o->has_server_key, errbuf, errbuf_len)))
        return rv;
    if ((v = bus_uri_get(u, "curve_allow")) != NULL) {
        char *copy = bus__strdup(v, NULL);
        if (copy == NULL)
            return BUS_ENOMEM;
        rv = zb_allow_list(o, copy, false, "curve_allow", errbuf, errbuf_len);
        bus__strfree(copy);
        if (rv != BUS_OK)
            return rv;
        any_allow = true;
    }
    if ((v = bus_uri_get(u, "curve_allow_file")) != NULL) {
        if ((rv = zb_read_file(v, &buf, &size, errbuf, errbuf_len)) != BUS_OK)
            return rv;
        rv =
            zb_allow_list(o, buf, true, "curve_allow_file", errbuf, errbuf_len);
        zb_free_file(buf, size);
        if (rv != BUS_OK)
            return rv;
        any_allow = true;
    }
    if ((rv = bus_uri_get_bool(u, "curve_allow_any", &o->allow_any)) ==
        BUS_EINVAL) {
        zb_cerr(errbuf, errbuf_len,
                "option 'curve_allow_any': want a "
                "boolean");
        return rv;
    }
    if (rv == BUS_OK && o->allow_any)
        any_allow = true;
    dom = bus_uri_get(u, "zap_domain");
    if (dom != NULL && (dom[0] == '\0' || strlen(dom) > 254)) {
        zb_cerr(errbuf, errbuf_len, "option 'zap_domain': 1 to 254 bytes");
        return BUS_EINVAL;
    }
    if ((o->zap_domain = bus__strdup(dom != NULL ? dom : "bus", NULL)) == NULL)
        return BUS_ENOMEM;

    o->curve = o->bind ? o->has_secret : o->has_server_key;
    if (!o->curve) {
        if (o->has_secret || o->has_public || o->has_server_key || any_allow ||
            dom != NULL) {
            zb_cerr(errbuf, errbuf_len,
                    o->bind ? "CURVE options on a bound broker need "
                              "curve_secret_key (it is the server)"
                            : "CURVE options on a connecting broker need "
                              "curve_server_key (it is the client)");
            return BUS_EINVAL;
        }
        return BUS_OK;
    }
    if (!zmq_has("curve")) {
        zb_cerr(errbuf, errbuf_len, "this libzmq has no CURVE support");
        return BUS_ENOTSUP;
    }
    if (o->bind) {
        if (o->has_server_key) {
            zb_cerr(errbuf, errbuf_len,
                    "curve_server_key is for the connecting side");
            return BUS_EINVAL;
        }
        if (!any_allow) {
            zb_cerr(errbuf, errbuf_len,
                    "a CURVE server needs curve_allow, curve_allow_file or "
                    "curve_allow_any=1");
            return BUS_EINVAL;
        }
    } else {
        if (any_allow || dom != NULL) {
            zb_cerr(errbuf, errbuf_len,
                    "curve_allow* and zap_domain are for the bound side");
            return BUS_EINVAL;
        }
        if (!o->has_secret) {
            /* No identity given: an ephemeral one (a server that allows
             * any client accepts it; an allow-list does not). */
            if (zmq_curve_keypair(o->public_.z85, o->secret.z85) != 0)
                return BUS_ENOTSUP;
            o->has_secret = o->has_public = true;
        }
    }
    {
        zb_key derived;
        if (zmq_curve_public(derived.z85, o->secret.z85) != 0) {
            zb_cerr(errbuf, errbuf_len, "curve_secret_key is not usable");
            return BUS_EINVAL;
        }
        if (o->has_public && strcmp(derived.z85, o->public_.z85) != 0) {
            zb_cerr(errbuf, errbuf_len,
                    "curve_public_key does not match curve_secret_key");
            return BUS_EINVAL;
        }
        o->public_ = derived;
        o->has_public = true;
    }
    return BUS_OK;
}

static int
zb_setstr(zb *z, void *s, int opt, const void *v, size_t len, const char *name)
{
    if (zmq_setsockopt(s, opt, v, len) != 0)
        return zb_zerr(z, name);
    return BUS_OK;
}

int
zb_curve_server(zb *z, void *sock)
{
    int one = 1, rv;

    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) != 0)
        return zb_zerr(z, "ZMQ_CURVE_SERVER");
    if (zmq_setsockopt(sock, ZMQ_ZAP_ENFORCE_DOMAIN, &one, sizeof(one)) != 0)
        return zb_zerr(z, "ZMQ_ZAP_ENFORCE_DOMAIN");
    if ((rv = zb_setstr(z, sock, ZMQ_CURVE_SECRETKEY, z->o.secret.z85,
                        ZB_Z85_LEN + 1, "ZMQ_CURVE_SECRETKEY")) != BUS_OK)
        return rv;
    return zb_setstr(z, sock, ZMQ_ZAP_DOMAIN, z->o.zap_domain,
                     strlen(z->o.zap_domain), "ZMQ_ZAP_DOMAIN");
}

int
zb_curve_client(zb *z, void *sock, bool loopback)
{
    const char *server = loopback ? z->o.public_.z85 : z->o.server_key.z85;
    int rv;

    if ((rv = zb_setstr(z, sock, ZMQ_CURVE_SERVERKEY, server, ZB_Z85_LEN + 1,
                        "ZMQ_CURVE_SERVERKEY")) ||
        (rv = zb_setstr(z, sock, ZMQ_CURVE_PUBLICKEY, z->o.public_.z85,
                        ZB_Z85_LEN + 1, "ZMQ_CURVE_PUBLICKEY")) ||
        (rv = zb_setstr(z, sock, ZMQ_CURVE_SECRETKEY, z->o.secret.z85,
                        ZB_Z85_LEN + 1, "ZMQ_CURVE_SECRETKEY")))
        return rv;
    return BUS_OK;
}

/* ---- The ZAP handler (RFC 27), on the I/O thread ----------------------------
 */

int
zb_zap_open(zb *z)
{
    int linger = 0;

    if ((z->zap = zmq_socket(z->zctx, ZMQ_REP)) == NULL)
        return zb_zerr(z, "zmq_socket(ZAP)");
    (void)zmq_setsockopt(z->zap, ZMQ_LINGER, &linger, sizeof(linger));
    if (zmq_bind(z->zap, ZB_ZAP_ENDPOINT) != 0)
        return zb_zerr(z, "bind " ZB_ZAP_ENDPOINT);
    return BUS_OK;
}

static bool
zb_frame_is(const zmq_msg_t *m, const char *s)
{
    size_t n = strlen(s);

    return zmq_msg_size((zmq_msg_t *)m) == n &&
           memcmp(zmq_msg_data((zmq_msg_t *)m), s, n) == 0;
}

static bool
zb_zap_allowed(zb *z, const uint8_t key[32])
{
    uint8_t own[32];
    size_t i;

    if (z->o.allow_any)
        return true;
    if (zmq_z85_decode(own, z->o.public_.z85) != NULL &&
        memcmp(own, key, 32) == 0)
        return true; /* our own loopback socket */
    for (i = 0; i < z->o.n_allow; i++)
        if (memcmp(z->o.allow[i], key, 32) == 0)
            return true;
    return false;
}

void
zb_zap_input(zb *z)
{
    zmq_msg_t f[8];
    int n = 0, i;
    bool ok = false;
    const char *code = "400", *text = "not allowed";

    for (;;) {
        zmq_msg_init(&f[n]);
        if (zmq_msg_recv(&f[n], z->zap, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&f[n]);
            if (n == 0)
                return;
            break;
        }
        n++;
        if (!zmq_msg_more(&f[n - 1]))
            break;
        if (n == 8) {
            zb_drain_parts(z->zap);
            break;
        }
    }
    /* version, request id, domain, address, identity, mechanism, key */
    if (n < 7 || !zb_frame_is(&f[0], "1.0")) {
        code = "500";
        text = "malformed ZAP request";
    } else if (!zb_frame_is(&f[2], z->o.zap_domain) ||
               !zb_frame_is(&f[5], "CURVE") || zmq_msg_size(&f[6]) != 32) {
        text = "wrong domain or mechanism";
    } else if (zb_zap_allowed(z, zmq_msg_data(&f[6]))) {
        ok = true;
        code = "200";
        text = "OK";
    }
    if (!ok) {
        char pub[ZB_Z85_LEN + 1] = "?", addr[64] = "?";
        if (n >= 7 && zmq_msg_size(&f[6]) == 32)
            (void)zmq_z85_encode(pub, zmq_msg_data(&f[6]), 32);
        if (n >= 4) {
            size_t al = zmq_msg_size(&f[3]) < sizeof(addr) - 1
                            ? zmq_msg_size(&f[3])
                            : sizeof(addr) - 1;
            memcpy(addr, zmq_msg_data(&f[3]), al);
            addr[al] = '\0';
        }
        zb_count(&z->st.auth_denied, 1);
        zb_ratelogf(z, &z->rl_auth, BUS_LOG_WARN,
                    "CURVE client %s from %s refused: %s", pub, addr, text);
    }
    /* The reply: version, request id, status code, text, user id,
     * metadata. */
    (void)zmq_send(z->zap, "1.0", 3, ZMQ_SNDMORE);
    if (n >= 2)
        (void)zmq_send(z->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]),
                       ZMQ_SNDMORE);
    else
        (void)zmq_send(z->zap, "", 0, ZMQ_SNDMORE);
    (void)zmq_send(z->zap, code, 3, ZMQ_SNDMORE);
    (void)zmq_send(z->zap, text, strlen(text), ZMQ_SNDMORE);
    (void)zmq_send(z->zap, "", 0, ZMQ_SNDMORE);
    (void)zmq_send(z->zap, "", 0, 0);
    for (i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}
