/*
 * Helpers shared by the tests: temporary directories, waiting on conditions
 * with a deadline (tests never sleep to wait), running a helper process.
 */
#ifndef BUS_TEST_SUPPORT_H
#define BUS_TEST_SUPPORT_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <bus/bus.h>

/* Creates a fresh directory under $TMPDIR (or /tmp) and returns its path in
 * a static-lifetime buffer owned by the caller (free with free()). */
char *bt_mkdtemp(const char *prefix);
/* rm -rf path (for test directories only). */
void bt_rmtree(const char *path);

/* Polls cond(arg) every 100 us until true or timeout_ms passes; returns
 * whether it became true. */
int bt_wait_for(int (*cond)(void *), void *arg, int timeout_ms);

/* Monotonic nanoseconds. */
uint64_t bt_now_ns(void);

/* Runs argv (argv[0] a path), feeds stdin_data (may be NULL), captures
 * stdout into *out (malloc'd, NUL-terminated; may be NULL). Returns the
 * exit status, or -1 when it could not run or was killed by a signal. */
int bt_run(char *const argv[], const void *stdin_data, size_t stdin_len,
           char **out, size_t *out_len);

/* Deterministic PRNG for property tests (seed from BUS_TEST_SEED or time,
 * printed so that failures can be replayed). */
uint64_t bt_seed(void);
uint64_t bt_rand(uint64_t *state);

#endif
