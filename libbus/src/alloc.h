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

/* For caches that carve many objects out of one allocation (the event
 * block cache, event.c): bus__alloc_chunk allocates through the user's
 * hooks but is not counted by fault injection; bus__alloc_fault counts
 * one allocation there and says whether it must fail (always false
 * outside the BUS_TESTING build), so that each cached object still
 * counts as one allocation that tests can fail. */
void *bus__alloc_chunk(size_t size);
bool bus__alloc_fault(void);

#endif
