/*
 * Helpers shared by the envelope codec tests: random valid events, field by
 * field comparison, and the one-line "dump" of an event's fields that the C
 * tests and codec_interop.py both print, so that two implementations can be
 * compared as text.
 *
 * Dump format (all strings as lowercase hex of their UTF-8 bytes, so that
 * no quoting is needed):
 *   id=<32 hex> type=<hex> sv=<u> stream=<hex or -> sver=<u> pos=<u>
 *   ts=<i> h=<khex>:<vhex>,<khex>:<vhex> p=<hex>
 */
#ifndef CODEC_TEST_UTIL_H
#define CODEC_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include <bus/bus.h>

/* A random valid event (UTF-8 strings of all widths, optional fields
 * present or not, 0..20 headers, payloads up to a few hundred bytes and now
 * and then 70 KB). Never fails: asserts instead. */
bus_event *ct_random_event(uint64_t *rng);

/* Random valid UTF-8 without NUL: up to max_cp code points, written to out
 * (room for 4 * max_cp + 1 bytes), NUL-terminated; returns the byte length.
 * min_cp code points at least. */
size_t ct_random_utf8(uint64_t *rng, char *out, size_t min_cp,
                      size_t max_cp);

/* cmocka-asserts that every field of a and b is equal, headers in order. */
void ct_assert_events_equal(const bus_event *a, const bus_event *b);

/* The dump line of e (malloc'd, no newline). */
char *ct_dump(const bus_event *e);

/* The keys the encoder must write for e, comma-separated: "v,id,type,ts,p". */
void ct_expected_keys(const bus_event *e, char *out, size_t cap);

/* Hex helpers. ct_hex writes 2n chars and a NUL. ct_unhex returns the byte
 * count, or (size_t)-1 on a bad digit. */
void ct_hex(const void *p, size_t n, char *out);
size_t ct_unhex(const char *hex, size_t hexlen, uint8_t *out);

#endif
