/*
 * The envelope codec: one MessagePack map per event, with a format version.
 * docs/wire-format.md is the specification; any MessagePack library in any
 * language can read and write it.
 *
 * Decoding is strict and bounded: every declared length is checked against
 * the bytes left and against bus_codec_limits before anything is allocated,
 * so a hostile frame costs at most its own size. Unknown map keys are
 * skipped (forward compatibility); duplicate keys, wrong types, truncation,
 * trailing bytes and unknown format versions are errors.
 *
 * Thread: any; the functions keep no state.
 */
#ifndef BUS_CODEC_H
#define BUS_CODEC_H

#include <bus/event.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The envelope format version this library writes (key "v"). */
#define BUS_WIRE_VERSION 1

/* Bounds applied while decoding. Zero in any field means its default. */
typedef struct bus_codec_limits {
    size_t max_frame;   /* whole frame, bytes; default 64 MiB */
    size_t max_payload; /* payload bytes; default 16 MiB */
    size_t max_headers; /* header entries; default 64 */
    size_t max_string;  /* type, stream, each header key/value; default 4096 */
    size_t max_depth;   /* nesting of skipped unknown values; default 16 */
} bus_codec_limits;

/* Fills l with the defaults above. */
BUS_API void bus_codec_limits_init(bus_codec_limits *l);

/* Exact number of bytes bus_codec_encode writes for e. */
BUS_API size_t bus_codec_encoded_size(const bus_event *e);

/* Encodes e into buf[0..cap). *written gets the length (may be NULL).
 * Borrows e. Returns BUS_OK, BUS_ENOBUFS (cap too small: nothing useful
 * written; *written gets the size needed), BUS_EINVAL (e has no type). */
BUS_API int bus_codec_encode(const bus_event *e, void *buf, size_t cap,
                             size_t *written);

/* Encodes e into a new buffer from the libbus allocator; free it with
 * bus_codec_buf_free(buf, len). */
BUS_API int bus_codec_encode_alloc(const bus_event *e, void **buf,
                                   size_t *len);
BUS_API void bus_codec_buf_free(void *buf, size_t len);

/* Decodes exactly len bytes into a new event (refcount 1, not frozen: a
 * receiver may record the topic or add headers before publishing, which
 * freezes it), copying
 * what it needs: buf is borrowed. limits may be NULL (defaults). errbuf (if
 * not NULL) gets a reason naming the offending key and offset.
 * Returns BUS_OK, BUS_EPROTO (malformed), BUS_ETOOBIG (a limit exceeded),
 * BUS_EVERSION (unknown format version), BUS_ENOMEM. On failure *out is
 * NULL and nothing was allocated that is not freed. */
BUS_API int bus_codec_decode(bus_event **out, const void *buf, size_t len,
                             const bus_codec_limits *limits, char *errbuf,
                             size_t errbuf_len);

/* As bus_codec_decode, but the event adopts buf and its payload points into
 * it (zero copy; useful for frames received from a socket): free_fn(buf,
 * hint) runs exactly once when the event is freed, or before this call
 * returns on failure. free_fn may be NULL when buf outlives the event. */
BUS_API int bus_codec_decode_adopt(bus_event **out, void *buf, size_t len,
                                   bus_free_fn free_fn, void *hint,
                                   const bus_codec_limits *limits,
                                   char *errbuf, size_t errbuf_len);

#ifdef __cplusplus
}
#endif
#endif /* BUS_CODEC_H */
