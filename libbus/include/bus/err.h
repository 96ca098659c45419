/*
 * libbus error codes.
 *
 * Fallible calls return int: BUS_OK (0) or a positive BUS_E* code, never
 * errno and never a "last error". One X-macro table makes the enum,
 * bus_strerror(), bus_err_name() and bus_err_retriable(), so they cannot
 * drift apart. Detail goes to the log callback or to an errbuf.
 */
#ifndef BUS_ERR_H
#define BUS_ERR_H

#include <bus/common.h>

#ifdef __cplusplus
extern "C" {
#endif

/* X(name, retriable, text). Retriable: the same call may succeed later with
 * no change by the caller (the outbox relay retries exactly these). New
 * codes are appended: the numbers are part of the ABI. */
#define BUS_ERR_MAP(X)                                                     \
    X(ENOMEM, 1, "out of memory")                                          \
    X(EINVAL, 0, "invalid argument")                                       \
    X(ECLOSED, 0, "object is closed")                                      \
    X(EAGAIN, 1, "queue full, try again")                                  \
    X(EUNAVAIL, 1, "broker or store unavailable")                          \
    X(EIO, 0, "storage I/O error")                                         \
    X(ETIMEDOUT, 1, "timed out")                                           \
    X(ENOTSUP, 0, "not supported")                                         \
    X(EPROTO, 0, "malformed data (protocol error)")                        \
    X(ETOOBIG, 0, "size limit exceeded")                                   \
    X(EFROZEN, 0, "event is frozen (published) and cannot change")         \
    X(ENOTFOUND, 0, "not found")                                           \
    X(EEXIST, 0, "already exists")                                         \
    X(ECONFLICT, 0, "expected version conflict")                           \
    X(EVERSION, 0, "unsupported format version")                           \
    X(ECORRUPT, 0, "data is corrupt")                                      \
    X(ENOBUFS, 0, "buffer too small")                                      \
    X(EBUSY, 1, "resource busy")                                           \
    X(ECANCELED, 0, "operation canceled")                                  \
    X(EDELETED, 0, "stream is deleted")                                    \
    X(EACCESS, 0, "permission denied")                                     \
    X(EINTERNAL, 0, "internal error (a bug in libbus)")

typedef enum bus_err {
    BUS_OK = 0,
#define BUS_ERR_ENUM(name, retriable, text) BUS_##name,
    BUS_ERR_MAP(BUS_ERR_ENUM)
#undef BUS_ERR_ENUM
    BUS_ERR_COUNT_ /* not a code */
} bus_err;

/* Human text: "out of memory". Unknown codes give "unknown error".
 * Never NULL; static storage. Thread: any. */
BUS_API const char *bus_strerror(int err);

/* Symbolic name: "BUS_ENOMEM"; "BUS_OK" for 0; "BUS_E?" when unknown.
 * Never NULL; static storage. Thread: any. */
BUS_API const char *bus_err_name(int err);

/* True when the failed operation may succeed if retried unchanged (EAGAIN,
 * EUNAVAIL, ETIMEDOUT, EBUSY, ENOMEM). Thread: any. */
BUS_API bool bus_err_retriable(int err);

#ifdef __cplusplus
}
#endif
#endif /* BUS_ERR_H */
