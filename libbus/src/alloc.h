/*
 * Internal allocation. Every libbus allocation goes through these, so the
 * user's hooks (bus_allocator_set) see all of them and the test build can
 * fail the Nth one (bus_fault_alloc_fail_nth, testing.h).
 */
#ifndef BUS_ALLOC_H
#define BUS_ALLOC_H

#include <bus/common.h>

void *bus__alloc(size_t size);
void *bus__zalloc(size_t size);
void *bus__realloc(void *p, size_t old_size, size_t new_size);
void bus__free(void *p, size_t size);
/* NUL-terminated copy; *len_out (may be NULL) gets strlen + 1, the size to
 * pass to bus__free. */
char *bus__strdup(const char *s, size_t *len_out);
void bus__strfree(char *s);

#endif
