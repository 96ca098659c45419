/*
 * Topics, patterns and the subscription index (topic.h): validation with
 * reasons, matching, overlap, the persistent index and its topic cache,
 * checked against the reference matcher by a seeded property test, under
 * allocation failures, and with concurrent readers (TSan).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

#include "mp.h"
#include "testing.h"
#include "topic.h"

#define MAX_RESULT 512

static void *
item(uintptr_t v)
{
    return (void *)v;
}

static int
cmp_ptr(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t) * (void *const *)a;
    uintptr_t y = (uintptr_t) * (void *const *)b;

    return x < y ? -1 : x > y;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static void
sort_ptrs(void **v, size_t n)
{
    if (n > 1)
        qsort(v, n, sizeof(*v), cmp_ptr);
}

/* ---- Validation ---------------------------------------------------------- */

static char *
repeat(char c, size_t n)
{
    char *s = malloc(n + 1);

    assert_non_null(s);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* "a.a.a..." with nseg segments. */
static char *
segments(size_t nseg)
{
    char *s = malloc(nseg * 2);
    size_t i;

    assert_non_null(s);
    for (i = 0; i < nseg; i++) {
        s[2 * i] = 'a';
        s[2 * i + 1] = i + 1 < nseg ? '.' : '\0';
    }
    return s;
}

static void
test_validate_accepts_valid_topics_and_patterns(void **state)
{
    static const char *const topics[] = {
        "a",
        "orders.placed",
        "a.b.c.d",
        "A-Z_0~9!\"#$%&'()+,/:;<=?@[\\]^`{|}",
        "caf\xc3\xa9.\xe2\x82\xac.\xf0\x9f\x98\x80",
    };
    static const char *const patterns[] = {
        "*", ">", "a.*", "a.>", "*.*.>", "a.*.c", "*.>", "orders.placed",
    };
    char errbuf[128];
    char *s, *t;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(topics) / sizeof(topics[0]); i++) {
        assert_int_equal(bus_topic_validate(topics[i], errbuf, sizeof(errbuf)),
                         BUS_OK);
        /* every topic is also a valid pattern */
        assert_int_equal(bus_pattern_validate(topics[i], NULL, 0), BUS_OK);
    }
    for (i = 0; i < sizeof(patterns) / sizeof(patterns[0]); i++)
        assert_int_equal(bus_pattern_validate(patterns[i], errbuf,
                                              sizeof(errbuf)),
                         BUS_OK);

    /* Limits exactly: a 255-byte segment, 32 segments, 1024 bytes. */
    s = repeat('x', 255);
    assert_int_equal(bus_topic_validate(s, NULL, 0), BUS_OK);
    free(s);
    s = segments(32);
    assert_int_equal(bus_topic_validate(s, NULL, 0), BUS_OK);
    free(s);
    s = repeat('x', 1024); /* segments of 255, 255, 255, 254, 1 */
    s[255] = s[511] = s[767] = s[1022] = '.';
    assert_int_equal(bus_topic_validate(s, NULL, 0), BUS_OK);
    t = repeat('x', 1025); /* one byte more */
    memcpy(t, s, 1024);
    t[1024] = 'y';
    assert_int_equal(bus_topic_validate(t, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "topic longer than 1024 bytes");
    free(t);
    free(s);
}

static void
test_validate_rejects_with_precise_reason(void **state)
{
    static const struct {
        const char *s;
        bool pattern;
        const char *reason;
    } rows[] = {
        {"", false, "empty topic"},
        {"", true, "empty pattern"},
        {".a", false, "empty segment at offset 0"},
        {"a.", false, "empty segment at offset 2"},
        {"a..b", true, "empty segment at offset 2"},
        {"orders.placed..x", false, "empty segment at offset 14"},
        {"a b", false, "space at offset 1"},
        {"a\tb", true, "control byte 0x09 at offset 1"},
        {"ab.c\x7f", false, "control byte 0x7f at offset 4"},
        {"a.\xc3", false, "invalid UTF-8 at offset 2"},
        {"a.\xc3x", false, "invalid UTF-8 at offset 2"},
        {"a.\xc0\xaf", false, "invalid UTF-8 at offset 2"},      /* overlong */
        {"a.\xed\xa0\x80", false, "invalid UTF-8 at offset 2"},  /* surrogate */
        {"a.\xf4\x90\x80\x80", true, "invalid UTF-8 at offset 2"}, /* > max */
        {"ok.\xc3\xa9\x80", false, "invalid UTF-8 at offset 3"},
        {"a.*", false,
         "'*' at offset 2: wildcards are only allowed in patterns"},
        {"a.>", false,
         "'>' at offset 2: wildcards are only allowed in patterns"},
        {"a*", true, "'*' at offset 1 must be a whole segment"},
        {"a.*b", true, "'*' at offset 2 must be a whole segment"},
        {"a.b*.c", true, "'*' at offset 3 must be a whole segment"},
        {"a.>>", true, "'>' at offset 2 must be a whole segment"},
        {">.a", true, "'>' must be the last segment (offset 0)"},
        {"a.>.b", true, "'>' must be the last segment (offset 2)"},
        {"a.>.*", true, "'>' must be the last segment (offset 2)"},
    };
    char errbuf[128];
    char *s, *t;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        errbuf[0] = '\0';
        assert_int_equal(bus__topic_check(rows[i].s, rows[i].pattern, errbuf,
                                          sizeof(errbuf)),
                         BUS_EINVAL);
        if (strcmp(errbuf, rows[i].reason) != 0)
            fail_msg("row %zu: \"%s\" != \"%s\"", i, errbuf, rows[i].reason);
        /* NULL errbuf is fine */
        assert_int_equal(bus__topic_check(rows[i].s, rows[i].pattern, NULL,
                                          0),
                         BUS_EINVAL);
    }

    assert_int_equal(bus_topic_validate(NULL, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "topic is NULL");
    assert_int_equal(bus_pattern_validate(NULL, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "pattern is NULL");

    /* Segment too long, too many segments. */
    s = repeat('x', 258);
    s[0] = 'a';
    s[1] = '.';
    assert_int_equal(bus_topic_validate(s, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "segment at offset 2 longer than 255 bytes");
    free(s);
    s = segments(33);
    assert_int_equal(bus_pattern_validate(s, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "more than 32 segments (offset 64)");
    free(s);
    s = repeat('x', 5000);
    assert_int_equal(bus_pattern_validate(s, errbuf, sizeof(errbuf)),
                     BUS_EINVAL);
    assert_string_equal(errbuf, "pattern longer than 1024 bytes");
    free(s);

    /* A short errbuf is truncated, still NUL-terminated. */
    t = "a..b";
    assert_int_equal(bus_topic_validate(t, errbuf, 6), BUS_EINVAL);
    assert_string_equal(errbuf, "empty");
}

/* A plain restatement of the rules (bus.h, topic.h), to check the fast
 * path and the precise one agree with them on random strings. */
static bool
ref_valid(const char *s, bool pattern)
{
    size_t len = strlen(s), start = 0, nseg = 0, i;

    if (len == 0 || len > BUS_TOPIC_MAX_LEN)
        return false;
    if (!bus__utf8_valid(s, len))
        return false;
    for (i = 0; i <= len; i++) {
        if (i < len && s[i] != '.')
            continue;
        /* segment [start, i) */
        {
            size_t sl = i - start, k;
            bool wild = sl == 1 && (s[start] == '*' || s[start] == '>');

            nseg++;
            if (sl == 0 || sl > BUS_TOPIC_MAX_SEGMENT
                || nseg > BUS_TOPIC_MAX_SEGMENTS)
                return false;
            if (wild && (!pattern || (s[start] == '>' && i != len)))
                return false;
            for (k = start; k < i && !wild; k++) {
                unsigned char c = (unsigned char)s[k];

                if (c <= 0x20 || c == 0x7f || c == '*' || c == '>')
                    return false;
            }
        }
        start = i + 1;
    }
    return true;
}

static void
test_validate_agrees_with_reference_rules(void **state)
{
    static const char alphabet[] = {
        'a', 'b', '.', '.', '*', '>', ' ', '\x01', '\x7f', '~', '!',
        '\xc3', '\xa9', '\x80', '\xe2', '\x82', '\xac',
    };
    uint64_t rng = bt_seed();
    char s[300], errbuf[128];
    int it, k;

    (void)state;
    for (it = 0; it < 200000; it++) {
        int len = (int)(bt_rand(&rng) % 14);
        bool pattern = bt_rand(&rng) & 1;
        int rv;

        for (k = 0; k < len; k++)
            s[k] = alphabet[bt_rand(&rng) % sizeof(alphabet)];
        s[len] = '\0';
        errbuf[0] = '\0';
        rv = bus__topic_check(s, pattern, errbuf, sizeof(errbuf));
        if ((rv == BUS_OK) != ref_valid(s, pattern))
            fail_msg("\"%s\" (pattern %d): check %d, reference %d", s,
                     pattern, rv, ref_valid(s, pattern));
        if (rv != BUS_OK && errbuf[0] == '\0')
            fail_msg("\"%s\": no reason given", s);
    }
    /* Segment length limits on the fast path (plain ASCII). */
    for (k = 250; k < 260; k++) {
        memset(s, 'x', (size_t)k);
        strcpy(s + k, ".y");
        assert_int_equal(bus_topic_validate(s, NULL, 0) == BUS_OK, k <= 255);
        s[0] = 'y';
        s[1] = '.';
        s[k] = '\0';
        assert_int_equal(bus_topic_validate(s, NULL, 0) == BUS_OK,
                         k - 2 <= 255);
    }
}

/* ---- Matching and overlap ------------------------------------------------ */

static void
test_match_table(void **state)
{
    static const struct {
        const char *pattern, *topic;
        bool match;
    } rows[] = {
        {"a", "a", true},          {"a", "b", false},
        {"a", "a.b", false},       {"a.b", "a", false},
        {"ab", "a", false},        {"a", "ab", false},
        {"a.b", "a.bc", false},    {"a.bc", "a.b", false},
        {"a.b", "ab.", false},     {"*", "a", true},
        {"*", "a.b", false},       {"a.*", "a.b", true},
        {"a.*", "a", false},       {"a.*", "a.b.c", false},
        {"*.b", "a.b", true},      {"*.b", "a.c", false},
        {"*.*", "a.b", true},      {"*.*", "a.b.c", false},
        {">", "a", true},          {">", "a.b.c", true},
        {"a.>", "a", false},       {"a.>", "a.b", true},
        {"a.>", "a.b.c", true},    {"a.>", "b.c", false},
        {"a.>", "ab.c", false},    {"*.>", "a", false},
        {"*.>", "a.b", true},      {"a.*.>", "a.b", false},
        {"a.*.>", "a.b.c", true},  {"a.*.c", "a.b.c", true},
        {"a.*.c", "a.b.d", false}, {"orders.placed", "orders.placed", true},
        {"caf\xc3\xa9.*", "caf\xc3\xa9.x", true},
        {"caf\xc3\xa9.*", "cafe.x", false},
    };
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        if (bus_topic_matches(rows[i].pattern, rows[i].topic)
            != rows[i].match)
            fail_msg("row %zu: \"%s\" ~ \"%s\" should be %d", i,
                     rows[i].pattern, rows[i].topic, rows[i].match);
    }
}

static void
test_overlap_table(void **state)
{
    static const struct {
        const char *a, *b;
        bool overlap;
    } rows[] = {
        {"a", "a", true},         {"a", "b", false},
        {"a.*", "*.b", true},     {"a.>", "*", false},
        {">", "a", true},         {">", ">", true},
        {"a.>", "a", false},      {"a.>", "a.b.c", true},
        {"*.*", "a.>", true},     {"*.*", "*", false},
        {"a.b", "a.*.>", false},  {"a.*.c", "a.b.*", true},
        {"a.*.c", "a.b.d", false}, {"a.>", "b.>", false},
        {"*.>", "a", false},      {"*", "*", true},
    };
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        if (bus__pattern_overlap(rows[i].a, rows[i].b) != rows[i].overlap
            || bus__pattern_overlap(rows[i].b, rows[i].a) != rows[i].overlap)
            fail_msg("row %zu: \"%s\" vs \"%s\" should be %d", i, rows[i].a,
                     rows[i].b, rows[i].overlap);
    }
}

/* Random pattern over alphabet (nalpha names), 1..maxseg segments, with
 * '*' and a final '>' mixed in. */
static void
random_pattern(uint64_t *rng, char *out, size_t nalpha, int maxseg,
               bool wild)
{
    int nseg = 1 + (int)(bt_rand(rng) % (uint64_t)maxseg);
    size_t o = 0;
    int i;

    for (i = 0; i < nseg; i++) {
        uint64_t r = bt_rand(rng) % 10;

        if (i > 0)
            out[o++] = '.';
        if (wild && i == nseg - 1 && r == 0) {
            out[o++] = '>';
        } else if (wild && r <= 2) {
            out[o++] = '*';
        } else {
            size_t k = (size_t)(bt_rand(rng) % nalpha);
            /* names "a".."z", then "s27", "s28", ... */
            if (k < 26)
                out[o++] = (char)('a' + k);
            else
                o += (size_t)sprintf(out + o, "s%zu", k);
        }
    }
    out[o] = '\0';
}

static void
test_overlap_agrees_with_brute_force(void **state)
{
    /* Witness topics over {a, b, x}, 1..4 segments, are enough for
     * patterns of <= 3 segments over {a, b, *, >}. */
    static char topics[121][8];
    static const char names[] = "abx";
    uint64_t rng = bt_seed();
    size_t ntop = 0;
    int len, it, k;

    (void)state;
    for (len = 1; len <= 4; len++) {
        int total = 1, c;

        for (k = 0; k < len; k++)
            total *= 3;
        for (c = 0; c < total; c++) {
            int v = c, o = 0;

            for (k = 0; k < len; k++) {
                if (k > 0)
                    topics[ntop][o++] = '.';
                topics[ntop][o++] = names[v % 3];
                v /= 3;
            }
            topics[ntop][o] = '\0';
            ntop++;
        }
    }
    for (it = 0; it < 5000; it++) {
        char a[16], b[16];
        bool brute = false;
        size_t i;

        random_pattern(&rng, a, 2, 3, true);
        random_pattern(&rng, b, 2, 3, true);
        for (i = 0; i < ntop && !brute; i++)
            brute = bus__topic_match(a, topics[i])
                 && bus__topic_match(b, topics[i]);
        if (bus__pattern_overlap(a, b) != brute)
            fail_msg("\"%s\" vs \"%s\": overlap should be %d", a, b, brute);
    }
}

static void
test_hash_is_stable_and_spreads(void **state)
{
    enum { N = 100000 };
    uint64_t *h = malloc(N * sizeof(*h));
    char buf[40];
    unsigned char bytes[40];
    size_t i, len;

    (void)state;
    assert_non_null(h);
    assert_int_equal(bus__hash("orders.placed", 13),
                     bus__hash("orders.placed", 13));
    /* Every tail length path, and the unaligned read. */
    memset(bytes, 'q', sizeof(bytes));
    for (len = 0; len < 33; len++)
        assert_int_equal(bus__hash(bytes, len), bus__hash(bytes + 1, len));
    for (len = 1; len < 33; len++)
        assert_true(bus__hash(bytes, len) != bus__hash(bytes, len - 1));
    /* Flipping any single bit of 24 gives 192 distinct hashes, none equal
     * to the all-zero input's. */
    {
        uint64_t flips[24 * 8 + 1];

        memset(bytes, 0, sizeof(bytes));
        flips[24 * 8] = bus__hash(bytes, 24);
        for (i = 0; i < 24 * 8; i++) {
            bytes[i / 8] ^= (unsigned char)(1u << (i % 8));
            flips[i] = bus__hash(bytes, 24);
            bytes[i / 8] ^= (unsigned char)(1u << (i % 8));
        }
        qsort(flips, 24 * 8 + 1, sizeof(flips[0]), cmp_u64);
        for (i = 1; i < 24 * 8 + 1; i++)
            assert_true(flips[i] != flips[i - 1]);
    }
    /* No 64-bit collision, and low bits (table indexes) well spread. */
    {
        static unsigned buckets[1024];
        unsigned max = 0;

        for (i = 0; i < N; i++) {
            int n = snprintf(buf, sizeof(buf), "orders.%zu.placed", i);
            h[i] = bus__hash(buf, (size_t)n);
            buckets[h[i] & 1023]++;
        }
        for (i = 0; i < 1024; i++)
            max = buckets[i] > max ? buckets[i] : max;
        assert_true(max < 2 * N / 1024); /* mean ~98 */
        qsort(h, N, sizeof(*h), cmp_u64);
        for (i = 1; i < N; i++)
            assert_true(h[i] != h[i - 1]);
    }
    free(h);
}

/* ---- The index: helpers -------------------------------------------------- */

/* A model of an index's content: the multiset of (pattern, item). */
typedef struct mentry {
    char pat[80];
    uintptr_t item;
} mentry;

typedef struct model {
    mentry *v;
    size_t n, cap;
} model;

static void
model_add(model *m, const char *pat, uintptr_t it)
{
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 16;
        m->v = realloc(m->v, m->cap * sizeof(*m->v));
        assert_non_null(m->v);
    }
    snprintf(m->v[m->n].pat, sizeof(m->v[m->n].pat), "%s", pat);
    m->v[m->n].item = it;
    m->n++;
}

/* Removes one (pat, it); false when absent. */
static bool
model_remove(model *m, const char *pat, uintptr_t it)
{
    size_t i;

    for (i = 0; i < m->n; i++) {
        if (m->v[i].item == it && strcmp(m->v[i].pat, pat) == 0) {
            m->v[i] = m->v[--m->n];
            return true;
        }
    }
    return false;
}

static model
model_copy(const model *m)
{
    model c = {NULL, m->n, m->n};

    if (m->n > 0) {
        c.v = malloc(m->n * sizeof(*m->v));
        assert_non_null(c.v);
        memcpy(c.v, m->v, m->n * sizeof(*m->v));
    }
    return c;
}

/* The expected answer, sorted: brute force over the reference matcher. */
static size_t
brute(const mentry *v, size_t n, const char *topic, void **out, size_t cap)
{
    size_t i, k = 0;

    for (i = 0; i < n; i++) {
        if (bus__topic_match(v[i].pat, topic)) {
            if (k < cap)
                out[k] = item(v[i].item);
            k++;
        }
    }
    sort_ptrs(out, k < cap ? k : cap);
    return k;
}

/* Checks match and lookup (with a buffer of bufcap, retrying larger when
 * the result did not fit, as topic.h says) against brute force. */
static void
check_topic(bus__tindex *t, const mentry *m, size_t mn, const char *topic,
            size_t bufcap)
{
    void *want[MAX_RESULT], *got[MAX_RESULT], *buf[MAX_RESULT];
    void *const *items;
    size_t nw, ng, len = strlen(topic);

    nw = brute(m, mn, topic, want, MAX_RESULT);
    assert_true(nw <= MAX_RESULT);

    ng = bus__tindex_match(t, topic, len, got, MAX_RESULT);
    assert_int_equal(ng, nw);
    sort_ptrs(got, ng);
    if (ng > 0 && memcmp(got, want, ng * sizeof(void *)) != 0)
        fail_msg("match \"%s\": wrong items", topic);

    ng = bus__tindex_lookup(t, topic, len, buf, bufcap, &items);
    assert_int_equal(ng, nw);
    if (items == buf && ng > bufcap) {
        ng = bus__tindex_lookup(t, topic, len, buf, MAX_RESULT, &items);
        assert_int_equal(ng, nw);
    }
    if (ng > 0)
        memcpy(got, items, ng * sizeof(void *));
    sort_ptrs(got, ng);
    if (ng > 0 && memcmp(got, want, ng * sizeof(void *)) != 0)
        fail_msg("lookup \"%s\": wrong items", topic);

    assert_int_equal(bus__tindex_lookup_checked(t, topic, len, buf,
                                                MAX_RESULT, &items, &ng),
                     BUS_OK);
    assert_int_equal(ng, nw);
    if (ng > 0)
        memcpy(got, items, ng * sizeof(void *));
    sort_ptrs(got, ng);
    if (ng > 0 && memcmp(got, want, ng * sizeof(void *)) != 0)
        fail_msg("lookup_checked \"%s\": wrong items", topic);
}

static void
check_topics(bus__tindex *t, const model *m, const char *const *topics,
             size_t ntop)
{
    size_t i;

    assert_int_equal(bus__tindex_size(t), m->n);
    for (i = 0; i < ntop; i++)
        check_topic(t, m->v, m->n, topics[i], i % 3);
}

static bus__tindex *
must_add(bus__tindex *t, const char *pat, uintptr_t it, model *m)
{
    bus__tindex *out = NULL;

    assert_int_equal(bus__tindex_add(t, pat, item(it), &out), BUS_OK);
    assert_non_null(out);
    if (m != NULL)
        model_add(m, pat, it);
    return out;
}

static bus__tindex *
must_remove(bus__tindex *t, const char *pat, uintptr_t it, model *m)
{
    bus__tindex *out = NULL;

    assert_int_equal(bus__tindex_remove(t, pat, item(it), &out), BUS_OK);
    assert_non_null(out);
    if (m != NULL)
        assert_true(model_remove(m, pat, it));
    return out;
}

/* Adds or removes, then releases the old snapshot (no reader here). */
static void
step_add(bus__tindex **t, const char *pat, uintptr_t it, model *m)
{
    bus__tindex *n = must_add(*t, pat, it, m);

    bus__tindex_release(*t);
    *t = n;
}

static void
step_remove(bus__tindex **t, const char *pat, uintptr_t it, model *m)
{
    bus__tindex *n = must_remove(*t, pat, it, m);

    bus__tindex_release(*t);
    *t = n;
}

/* Looks topic up with no buffer and returns the sorted result as a
 * string like "1,2,5" (for compact expectations). */
static const char *
lookup_str(bus__tindex *t, const char *topic)
{
    static char s[256];
    void *buf[64], *v[64];
    void *const *items;
    size_t n, i, o = 0;

    n = bus__tindex_lookup(t, topic, strlen(topic), buf, 64, &items);
    assert_true(n <= 64);
    memcpy(v, items, n * sizeof(void *));
    sort_ptrs(v, n);
    s[0] = '\0';
    for (i = 0; i < n; i++)
        o += (size_t)snprintf(s + o, sizeof(s) - o, "%s%" PRIuPTR,
                              i ? "," : "", (uintptr_t)v[i]);
    return s;
}

/* ---- The index: unit tests ----------------------------------------------- */

static void
test_index_add_lookup_remove(void **state)
{
    bus__tindex *t, *n = item(1); /* non-NULL: *out must be cleared */

    (void)state;
    assert_non_null(t = bus__tindex_new(16));
    assert_int_equal(bus__tindex_size(t), 0);
    assert_string_equal(lookup_str(t, "a"), "");

    step_add(&t, "a.b", 1, NULL);
    assert_int_equal(bus__tindex_size(t), 1);
    assert_string_equal(lookup_str(t, "a.b"), "1");
    assert_string_equal(lookup_str(t, "a.c"), "");
    assert_string_equal(lookup_str(t, "a"), "");
    assert_string_equal(lookup_str(t, "a.b.c"), "");
    step_add(&t, "a.*", 2, NULL);
    step_add(&t, "a.>", 3, NULL);
    step_add(&t, ">", 4, NULL);
    step_add(&t, "*.b", 5, NULL);
    step_add(&t, "a", 6, NULL);
    assert_int_equal(bus__tindex_size(t), 6);
    assert_string_equal(lookup_str(t, "a.b"), "1,2,3,4,5");
    assert_string_equal(lookup_str(t, "a.b.c"), "3,4");
    assert_string_equal(lookup_str(t, "a"), "4,6");
    assert_string_equal(lookup_str(t, "x.b"), "4,5");
    assert_string_equal(lookup_str(t, "x"), "4");

    /* Invalid patterns and absent entries leave t alone, *out NULL. */
    assert_int_equal(bus__tindex_add(t, "a..b", item(9), &n), BUS_EINVAL);
    assert_null(n);
    n = item(1);
    assert_int_equal(bus__tindex_add(t, NULL, item(9), &n), BUS_EINVAL);
    assert_null(n);
    assert_int_equal(bus__tindex_remove(t, "a.>.b", item(3), &n),
                     BUS_EINVAL);
    assert_int_equal(bus__tindex_remove(t, "a.b", item(9), &n),
                     BUS_ENOTFOUND);
    assert_null(n);
    assert_int_equal(bus__tindex_remove(t, "q", item(1), &n), BUS_ENOTFOUND);
    assert_int_equal(bus__tindex_remove(t, "a.*.c", item(2), &n),
                     BUS_ENOTFOUND);
    assert_int_equal(bus__tindex_remove(t, "a.b.>", item(3), &n),
                     BUS_ENOTFOUND);
    assert_int_equal(bus__tindex_remove(t, "*", item(5), &n), BUS_ENOTFOUND);
    assert_int_equal(bus__tindex_remove(t, "a.b.c", item(1), &n),
                     BUS_ENOTFOUND);
    assert_int_equal(bus__tindex_size(t), 6);

    step_remove(&t, "a.b", 1, NULL);
    assert_string_equal(lookup_str(t, "a.b"), "2,3,4,5");
    step_remove(&t, ">", 4, NULL);
    step_remove(&t, "a.*", 2, NULL);
    step_remove(&t, "a", 6, NULL);
    assert_string_equal(lookup_str(t, "a.b"), "3,5");
    assert_string_equal(lookup_str(t, "a"), "");
    step_remove(&t, "a.>", 3, NULL);
    step_remove(&t, "*.b", 5, NULL);
    assert_int_equal(bus__tindex_size(t), 0);
    assert_string_equal(lookup_str(t, "a.b"), "");
    assert_int_equal(bus__tindex_remove(t, "a.b", item(1), &n),
                     BUS_ENOTFOUND);
    bus__tindex_release(t);
    bus__tindex_release(NULL);
}

static void
test_index_removes_one_of_two_identical_entries(void **state)
{
    bus__tindex *t, *n;

    (void)state;
    assert_non_null(t = bus__tindex_new(8));
    step_add(&t, "a.*", 7, NULL);
    step_add(&t, "a.*", 7, NULL);
    step_add(&t, "a.>", 7, NULL);
    assert_int_equal(bus__tindex_size(t), 3);
    assert_string_equal(lookup_str(t, "a.b"), "7,7,7");
    step_remove(&t, "a.*", 7, NULL);
    assert_string_equal(lookup_str(t, "a.b"), "7,7");
    step_remove(&t, "a.*", 7, NULL);
    assert_string_equal(lookup_str(t, "a.b"), "7");
    assert_int_equal(bus__tindex_remove(t, "a.*", item(7), &n),
                     BUS_ENOTFOUND);
    step_remove(&t, "a.>", 7, NULL);
    assert_int_equal(bus__tindex_size(t), 0);
    bus__tindex_release(t);
}

static void
test_old_snapshots_keep_their_answers(void **state)
{
    static const char *const topics[] = {
        "a.b", "a.b.c", "a", "x.b", "a.c", "b.b.b", "q",
    };
    const size_t ntop = sizeof(topics) / sizeof(topics[0]);
    model m1 = {0}, m2, m3;
    bus__tindex *t0, *t1, *t2, *t3;

    (void)state;
    assert_non_null(t0 = bus__tindex_new(64));
    t1 = must_add(t0, "a.b", 1, &m1);
    bus__tindex_release(t0);
    step_add(&t1, "a.*", 2, &m1);
    step_add(&t1, "*.b", 3, &m1);
    step_add(&t1, "a.>", 4, &m1);
    check_topics(t1, &m1, topics, ntop); /* fills t1's cache */

    m2 = model_copy(&m1);
    t2 = must_add(t1, "a.b", 5, &m2);
    step_add(&t2, ">", 6, &m2);
    m3 = model_copy(&m2);
    t3 = must_remove(t2, "a.b", 1, &m3);
    step_remove(&t3, "a.>", 4, &m3);
    /* Every snapshot gives its own answers, cached or not. */
    check_topics(t1, &m1, topics, ntop);
    check_topics(t2, &m2, topics, ntop);
    check_topics(t3, &m3, topics, ntop);
    assert_string_equal(lookup_str(t1, "a.b"), "1,2,3,4");
    assert_string_equal(lookup_str(t2, "a.b"), "1,2,3,4,5,6");
    assert_string_equal(lookup_str(t3, "a.b"), "2,3,5,6");

    /* Releasing in any order keeps the others intact. */
    bus__tindex_release(t2);
    check_topics(t1, &m1, topics, ntop);
    check_topics(t3, &m3, topics, ntop);
    bus__tindex_release(t1);
    check_topics(t3, &m3, topics, ntop);
    bus__tindex_release(t3);
    free(m1.v);
    free(m2.v);
    free(m3.v);
}

static void
test_lookup_checked_validates_on_miss_only(void **state)
{
    static const char *const bad[] = {
        "a..b", "a.*", "a.>", "", "a b", ".a", "a.", "a.\xc3",
    };
    void *buf[8];
    void *const *items;
    bus__tindex *t;
    size_t i, n = 99;
    int round;

    (void)state;
    assert_non_null(t = bus__tindex_new(64));
    step_add(&t, ">", 1, NULL);
    /* Invalid topics are refused every time: they are never cached. */
    for (round = 0; round < 2; round++) {
        for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            n = 99;
            assert_int_equal(bus__tindex_lookup_checked(t, bad[i],
                                                        strlen(bad[i]), buf,
                                                        8, &items, &n),
                             BUS_EINVAL);
            assert_int_equal(n, 0);
        }
    }
    /* A NUL inside len bytes, a topic too long. */
    assert_int_equal(bus__tindex_lookup_checked(t, "a\0b", 3, buf, 8,
                                                &items, &n),
                     BUS_EINVAL);
    {
        char *longt = repeat('x', 1100);

        for (i = 100; i < 1100; i += 100)
            longt[i] = '.';
        assert_int_equal(bus__tindex_lookup_checked(t, longt, 1100, buf, 8,
                                                    &items, &n),
                         BUS_EINVAL);
        free(longt);
    }
    /* Valid: a miss, then a hit, same answer. */
    for (round = 0; round < 2; round++) {
        assert_int_equal(bus__tindex_lookup_checked(t, "a.b", 3, buf, 8,
                                                    &items, &n),
                         BUS_OK);
        assert_int_equal(n, 1);
        assert_ptr_equal(items[0], item(1));
    }
    assert_ptr_not_equal(items, buf); /* cached */
    bus__tindex_release(t);

    /* Without a cache: checked every time. */
    assert_non_null(t = bus__tindex_new(0));
    step_add(&t, ">", 1, NULL);
    assert_int_equal(bus__tindex_lookup_checked(t, "a..b", 4, buf, 8, &items,
                                                &n),
                     BUS_EINVAL);
    assert_int_equal(bus__tindex_lookup_checked(t, "a.b", 3, buf, 8, &items,
                                                &n),
                     BUS_OK);
    assert_int_equal(n, 1);
    bus__tindex_release(t);
}

/* ---- Property test ------------------------------------------------------- */

typedef struct held {
    bus__tindex *t;
    model m;
} held;

static void
test_index_agrees_with_brute_force(void **state)
{
    static const size_t alphas[] = {2, 3, 5, 40};
    static const uint32_t caches[] = {0, 1, 4, 64, 1024};
    enum { ROUNDS = 160, OPS = 60, NTOP = 40, NHELD = 3 };
    uint64_t rng = bt_seed();
    char topic_store[NTOP][80];
    const char *topics[NTOP];
    uint64_t checks = 0;
    int round, op;
    size_t i;

    (void)state;
    for (round = 0; round < ROUNDS; round++) {
        size_t nalpha = alphas[bt_rand(&rng) % 4];
        int maxseg = 1 + (int)(bt_rand(&rng) % 4);
        uint32_t cache = caches[bt_rand(&rng) % 5];
        held old[NHELD] = {{0}};
        model m = {0};
        bus__tindex *t;

        for (i = 0; i < NTOP; i++) {
            random_pattern(&rng, topic_store[i], nalpha, maxseg + 1, false);
            topics[i] = topic_store[i];
        }
        assert_non_null(t = bus__tindex_new(cache));
        for (op = 0; op < OPS; op++) {
            uint64_t r = bt_rand(&rng) % 10;
            model before = model_copy(&m);
            char pat[80];
            uintptr_t it;
            bus__tindex *n = NULL;
            int rv, want;

            if (r < 6 || m.n == 0) {
                random_pattern(&rng, pat, nalpha, maxseg, true);
                it = 1 + (uintptr_t)(bt_rand(&rng) % 6);
                assert_int_equal(bus__tindex_add(t, pat, item(it), &n),
                                 BUS_OK);
                model_add(&m, pat, it);
            } else {
                if (r < 9) { /* an existing entry */
                    mentry *e = &m.v[bt_rand(&rng) % m.n];

                    snprintf(pat, sizeof(pat), "%s", e->pat);
                    it = e->item;
                } else { /* anything: present or not */
                    random_pattern(&rng, pat, nalpha, maxseg, true);
                    it = 1 + (uintptr_t)(bt_rand(&rng) % 6);
                }
                want = model_remove(&m, pat, it) ? BUS_OK : BUS_ENOTFOUND;
                rv = bus__tindex_remove(t, pat, item(it), &n);
                assert_int_equal(rv, want);
                if (rv != BUS_OK) {
                    assert_null(n);
                    free(before.v);
                    continue;
                }
            }
            /* Keep the old snapshot a while, in place of a random held
             * one, which must still give its old answers. */
            i = (size_t)(bt_rand(&rng) % NHELD);
            if (old[i].t != NULL) {
                check_topics(old[i].t, &old[i].m, topics, NTOP);
                bus__tindex_release(old[i].t);
                free(old[i].m.v);
            }
            old[i].t = t;
            old[i].m = before;
            t = n;
            check_topics(t, &m, topics, NTOP);
            checks += NTOP;
        }
        for (i = 0; i < NHELD; i++) {
            if (old[i].t != NULL) {
                check_topics(old[i].t, &old[i].m, topics, NTOP);
                bus__tindex_release(old[i].t);
                free(old[i].m.v);
            }
        }
        bus__tindex_release(t);
        free(m.v);
    }
    print_message("# %" PRIu64 " topic checks\n", checks);
}

/* ---- Scale --------------------------------------------------------------- */

static void
test_ten_thousand_subscriptions_added_then_removed(void **state)
{
    enum { N = 10000 };
    uint64_t rng = bt_seed();
    uint32_t *order = malloc(N * sizeof(*order));
    void *buf[4];
    void *const *items;
    char pat[32];
    bus__tindex *t;
    uint64_t t0, t1, t2;
    uint32_t i;

    (void)state;
    assert_non_null(order);
    assert_non_null(t = bus__tindex_new(4096));
    t0 = bt_now_ns();
    for (i = 0; i < N; i++) {
        /* One node with N children, and N items on one pattern. */
        snprintf(pat, sizeof(pat), "sub.%" PRIu32, i);
        step_add(&t, pat, i + 1, NULL);
        step_add(&t, "all.>", i + 1, NULL);
    }
    t1 = bt_now_ns();
    assert_int_equal(bus__tindex_size(t), 2 * N);
    assert_int_equal(bus__tindex_lookup(t, "sub.5000", 8, buf, 4, &items),
                     1);
    assert_ptr_equal(items[0], item(5001));
    assert_int_equal(bus__tindex_lookup(t, "sub.x", 5, buf, 4, &items), 0);
    assert_int_equal(bus__tindex_lookup(t, "sub.1.2", 7, buf, 4, &items), 0);
    assert_int_equal(bus__tindex_lookup(t, "all.x", 5, buf, 4, &items), N);
    assert_true(items != buf); /* cached although buf is small */
    assert_int_equal(bus__tindex_lookup(t, "all.x", 5, buf, 4, &items), N);

    for (i = 0; i < N; i++)
        order[i] = i;
    for (i = N - 1; i > 0; i--) { /* shuffle */
        uint32_t j = (uint32_t)(bt_rand(&rng) % (i + 1)), x = order[i];

        order[i] = order[j];
        order[j] = x;
    }
    for (i = 0; i < N; i++) {
        snprintf(pat, sizeof(pat), "sub.%" PRIu32, order[i]);
        step_remove(&t, pat, order[i] + 1, NULL);
        step_remove(&t, "all.>", order[i] + 1, NULL);
        if (i == N / 2)
            assert_int_equal(bus__tindex_match(t, "all.y", 5, NULL, 0),
                             N - N / 2 - 1);
    }
    t2 = bt_now_ns();
    assert_int_equal(bus__tindex_size(t), 0);
    assert_int_equal(bus__tindex_lookup(t, "sub.1", 5, buf, 4, &items), 0);
    bus__tindex_release(t); /* ASan's leak check covers the rest */
    print_message("# %d adds: %.1f us each; %d removes: %.1f us each\n",
                  2 * N, (double)(t1 - t0) / 2e3 / N, 2 * N,
                  (double)(t2 - t1) / 2e3 / N);
    free(order);
}

/* ---- The cache ----------------------------------------------------------- */

static void
test_cache_full_answers_through_buf(void **state)
{
    void *buf[8];
    void *const *items, *const *first;
    bus__tindex *t;
    char topic[16];
    int i, cached = 0;

    (void)state;
    /* One slot: the first topic is cached, every other one is not. */
    assert_non_null(t = bus__tindex_new(1));
    step_add(&t, ">", 1, NULL);
    assert_int_equal(bus__tindex_lookup(t, "x", 1, buf, 8, &first), 1);
    assert_true(first != buf);
    assert_int_equal(bus__tindex_lookup(t, "x", 1, buf, 8, &items), 1);
    assert_ptr_equal(items, first);
    for (i = 0; i < 3; i++) {
        buf[0] = NULL;
        assert_int_equal(bus__tindex_lookup(t, "y", 1, buf, 8, &items), 1);
        assert_ptr_equal(items, buf);
        assert_ptr_equal(buf[0], item(1));
    }
    assert_int_equal(bus__tindex_lookup(t, "x", 1, buf, 8, &items), 1);
    assert_ptr_equal(items, first);
    bus__tindex_release(t);

    /* 4 slots, 100 topics: at most 4 get cached, all answer right. */
    assert_non_null(t = bus__tindex_new(3)); /* rounded up to 4 */
    step_add(&t, "t.*", 2, NULL);
    for (i = 0; i < 100; i++) {
        snprintf(topic, sizeof(topic), "t.%d", i);
        assert_int_equal(bus__tindex_lookup(t, topic, strlen(topic), buf, 8,
                                            &items),
                         1);
        assert_ptr_equal(items[0], item(2));
        assert_int_equal(bus__tindex_lookup(t, topic, strlen(topic), buf, 8,
                                            &items),
                         1);
        assert_ptr_equal(items[0], item(2));
        cached += items != buf;
    }
    assert_true(cached >= 1 && cached <= 4);
    bus__tindex_release(t);

    /* No cache at all: always buf. */
    assert_non_null(t = bus__tindex_new(0));
    step_add(&t, "t.*", 2, NULL);
    assert_int_equal(bus__tindex_lookup(t, "t.1", 3, buf, 8, &items), 1);
    assert_ptr_equal(items, buf);
    assert_int_equal(bus__tindex_lookup(t, "t.1", 3, buf, 8, &items), 1);
    assert_ptr_equal(items, buf);
    assert_int_equal(bus__tindex_lookup(t, "t.1", 3, NULL, 0, &items), 1);
    bus__tindex_release(t);
}

static void
test_cache_budget_bounds_large_results(void **state)
{
    enum { N = 5000 }; /* 40 kB per cached result */
    void **big = malloc(N * sizeof(void *));
    void *const *items;
    bus__tindex *t;
    uintptr_t i;

    (void)state;
    assert_non_null(big);
    assert_non_null(t = bus__tindex_new(4));
    for (i = 0; i < N; i++)
        step_add(&t, ">", i + 1, NULL);
    /* The first fits the budget: cached even with no buffer at all. */
    assert_int_equal(bus__tindex_lookup(t, "a", 1, NULL, 0, &items), N);
    memcpy(big, items, N * sizeof(void *));
    sort_ptrs(big, N);
    for (i = 0; i < N; i++)
        assert_ptr_equal(big[i], item(i + 1));
    /* The second does not: count only, then the caller retries. */
    assert_int_equal(bus__tindex_lookup(t, "b", 1, big, 10, &items), N);
    assert_ptr_equal(items, big);
    assert_int_equal(bus__tindex_lookup(t, "b", 1, big, N, &items), N);
    assert_ptr_equal(items, big);
    sort_ptrs(big, N);
    for (i = 0; i < N; i++)
        assert_ptr_equal(big[i], item(i + 1));
    assert_int_equal(bus__tindex_lookup(t, "a", 1, NULL, 0, &items), N);
    assert_ptr_not_equal(items, big);
    bus__tindex_release(t);
    free(big);
}

/* ---- Allocation failures ------------------------------------------------- */

static const char *const fault_topics[] = {
    "a.b.c", "a.x.c", "a.b", "a", "x", "w.3", "w.100", "w.7",
    "new.path.here", "q.r", "a.b.c.d",
};
#define FAULT_NTOP (sizeof(fault_topics) / sizeof(fault_topics[0]))

/* A base snapshot with a wide node (w.*: nwide children) and some depth.
 * Child tables split into buckets past 32 children, so 32 and 33 make
 * adding or removing one rebuild or patch them. */
static bus__tindex *
fault_base(model *m, int nwide)
{
    bus__tindex *t = bus__tindex_new(16);
    char pat[16];
    int i;

    assert_non_null(t);
    for (i = 0; i < nwide; i++) {
        snprintf(pat, sizeof(pat), "w.%d", i);
        step_add(&t, pat, 100 + (uintptr_t)i, m);
    }
    step_add(&t, "a.b.c", 1, m);
    step_add(&t, "a.*.c", 2, m);
    step_add(&t, "a.>", 3, m);
    step_add(&t, "x", 4, m);
    step_add(&t, "a.b.c", 5, m);
    return t;
}

/* Runs each change on a base with nwide children under "w", failing the
 * nth allocation for n = 1, 2, ... until it succeeds: each failure is
 * BUS_ENOMEM with *out NULL and the base intact (ASan: nothing leaked). */
static void
fault_changes(int nwide, bool persistent)
{
    static const struct {
        bool add;
        const char *pat;
        uintptr_t item;
    } ops[] = {
        {true, "a.b.c", 9},         /* existing path */
        {true, "new.path.here", 9}, /* a new branch */
        {true, "w.100", 9},         /* wide node: may split its buckets */
        {true, "w.*", 9},           /* star under the wide node */
        {true, ">", 9},
        {false, "a.b.c", 1},        /* one of two items */
        {false, "x", 4},            /* prunes a leaf */
        {false, "w.3", 103},        /* wide node: may merge its buckets */
        {false, "a.>", 3},
        {false, "a.*.c", 2},        /* prunes a '*' branch */
    };
    model base = {0};
    bus__tindex *t = fault_base(&base, nwide);
    size_t k;
    uint64_t n;

    for (k = 0; k < sizeof(ops) / sizeof(ops[0]); k++) {
        for (n = 1;; n++) {
            bus__tindex *out = item(1); /* must be cleared */
            model want = model_copy(&base);
            bool fired;
            int rv;

            bus_fault_alloc_fail_nth(n, persistent);
            rv = ops[k].add ? bus__tindex_add(t, ops[k].pat,
                                              item(ops[k].item), &out)
                            : bus__tindex_remove(t, ops[k].pat,
                                                 item(ops[k].item), &out);
            fired = bus_fault_alloc_fired();
            bus_fault_alloc_fail_nth(0, false);
            check_topics(t, &base, fault_topics, FAULT_NTOP); /* intact */
            if (!fired) {
                assert_int_equal(rv, BUS_OK);
                if (ops[k].add)
                    model_add(&want, ops[k].pat, ops[k].item);
                else
                    assert_true(model_remove(&want, ops[k].pat,
                                             ops[k].item));
                check_topics(out, &want, fault_topics, FAULT_NTOP);
                bus__tindex_release(out);
                free(want.v);
                break;
            }
            assert_int_equal(rv, BUS_ENOMEM);
            assert_null(out);
            free(want.v);
            assert_true(n < 200);
        }
    }
    bus__tindex_release(t);
    free(base.v);
}

static void
test_add_and_remove_fail_cleanly(void **state)
{
    (void)state;
    /* 32 and 33 children: adding or removing one regroups the buckets. */
    fault_changes(20, false);
    fault_changes(20, true);
    fault_changes(32, false);
    fault_changes(33, false);
    fault_changes(33, true);
}

static void
test_lookup_under_alloc_failure_answers_through_buf(void **state)
{
    model m = {0}, fm;
    bus__tindex *t = fault_base(&m, 20), *f;
    void *buf[MAX_RESULT], *want[MAX_RESULT];
    void *const *items;
    uint64_t n;
    size_t i, cnt, nw;

    (void)state;
    fm = model_copy(&m);
    model_add(&fm, "zz", 99);
    for (n = 1; n <= 3; n++) {
        /* A fresh snapshot: empty cache, slots not allocated yet. */
        f = must_add(t, "zz", 99, NULL);
        for (i = 0; i < FAULT_NTOP; i++) {
            const char *topic = fault_topics[i];

            nw = brute(m.v, m.n, topic, want, MAX_RESULT);
            bus_fault_alloc_fail_nth(n, true);
            cnt = bus__tindex_lookup(f, topic, strlen(topic), buf, 1,
                                     &items);
            assert_int_equal(cnt, nw);
            if (items == buf && cnt > 1)
                cnt = bus__tindex_lookup(f, topic, strlen(topic), buf,
                                         MAX_RESULT, &items);
            bus_fault_alloc_fail_nth(0, false);
            assert_int_equal(cnt, nw);
            memcpy(buf, items, cnt * sizeof(void *));
            sort_ptrs(buf, cnt);
            if (cnt > 0)
                assert_memory_equal(buf, want, cnt * sizeof(void *));
        }
        /* Once memory is back, the cache fills and answers. */
        check_topics(f, &fm, fault_topics, FAULT_NTOP);
        check_topics(f, &fm, fault_topics, FAULT_NTOP);
        bus__tindex_release(f);
    }
    /* Failures never cached anything: a snapshot under total failure
     * answers every time through buf. */
    f = must_add(t, "zz", 99, NULL);
    bus_fault_alloc_fail_nth(1, true);
    for (i = 0; i < 3; i++) {
        assert_int_equal(bus__tindex_lookup(f, "a.b.c", 5, buf, MAX_RESULT,
                                            &items),
                         4);
        assert_ptr_equal(items, buf);
    }
    bus_fault_alloc_fail_nth(0, false);
    assert_int_equal(bus__tindex_lookup(f, "a.b.c", 5, buf, MAX_RESULT,
                                        &items),
                     4);
    assert_ptr_not_equal(items, buf);
    bus__tindex_release(f);
    bus__tindex_release(t);
    free(m.v);
    free(fm.v);
}

/* ---- Concurrency --------------------------------------------------------- */

/* The writer publishes versions (a snapshot and the model of its content);
 * readers announce the version they use in a hazard slot, and the writer
 * releases a replaced version only once no slot holds it (it keeps a list
 * of replaced versions and frees what it can after each change, so a
 * descheduled reader never stalls it). seq_cst on the publication, the
 * announcement and the scan: either a reader's re-check sees the new
 * version, or the writer's scan sees the reader's slot. */
enum { CC_READERS = 3, CC_OPS = 1500, CC_MIN_LOOKUPS = 20000, CC_NTOP = 24 };
#define CC_MAX_NS (30 * 1000000000ull) /* stop there even if not done */

typedef struct cc_version {
    bus__tindex *t;
    model m;
    struct cc_version *next; /* in the writer's retired list */
} cc_version;

typedef struct cc_shared {
    _Atomic(cc_version *) cur;
    _Atomic(cc_version *) hazard[CC_READERS];
    atomic_bool stop;
    atomic_int errors;
    _Atomic uint64_t lookups[CC_READERS]; /* per reader, so far */
    char topics[CC_NTOP][32];
} cc_shared;

typedef struct cc_reader {
    cc_shared *sh;
    int idx;
    uint64_t seed;
} cc_reader;

static void *
cc_reader_main(void *arg)
{
    cc_reader *r = arg;
    cc_shared *sh = r->sh;
    uint64_t rng = r->seed, n = 0;

    while (!atomic_load_explicit(&sh->stop, memory_order_acquire)) {
        void *buf[MAX_RESULT], *want[MAX_RESULT], *got[MAX_RESULT];
        void *const *items;
        const char *topic;
        cc_version *v = atomic_load(&sh->cur);
        size_t cnt, nw;

        atomic_store(&sh->hazard[r->idx], v);
        if (atomic_load(&sh->cur) != v) {
            /* Replaced meanwhile: it may be released already. Clear the
             * hazard, or a reader stopping here would pin v forever. */
            atomic_store(&sh->hazard[r->idx], NULL);
            continue;
        }
        topic = sh->topics[bt_rand(&rng) % CC_NTOP];
        cnt = bus__tindex_lookup(v->t, topic, strlen(topic), buf, 2, &items);
        if (items == buf && cnt > 2)
            cnt = bus__tindex_lookup(v->t, topic, strlen(topic), buf,
                                     MAX_RESULT, &items);
        nw = brute(v->m.v, v->m.n, topic, want, MAX_RESULT);
        if (cnt != nw) {
            atomic_fetch_add(&sh->errors, 1);
        } else if (cnt > 0) {
            memcpy(got, items, cnt * sizeof(void *));
            sort_ptrs(got, cnt);
            if (memcmp(got, want, cnt * sizeof(void *)) != 0)
                atomic_fetch_add(&sh->errors, 1);
        }
        atomic_store(&sh->hazard[r->idx], NULL);
        /* relaxed: a progress counter, it publishes nothing */
        atomic_store_explicit(&sh->lookups[r->idx], ++n,
                              memory_order_relaxed);
    }
    return NULL;
}

/* Frees the retired versions no reader holds; returns the others. */
static cc_version *
cc_reclaim(cc_shared *sh, cc_version *list)
{
    cc_version *keep = NULL, *v;
    int i;

    while ((v = list) != NULL) {
        bool busy = false;

        list = v->next;
        for (i = 0; i < CC_READERS && !busy; i++)
            busy = atomic_load(&sh->hazard[i]) == v;
        if (busy) {
            v->next = keep;
            keep = v;
            continue;
        }
        bus__tindex_release(v->t);
        free(v->m.v);
        free(v);
    }
    return keep;
}

static void
test_concurrent_readers_see_consistent_snapshots(void **state)
{
    static cc_shared sh;
    uint64_t rng = bt_seed();
    pthread_t th[CC_READERS];
    cc_reader rd[CC_READERS];
    cc_version *v, *retired = NULL;
    uint64_t t0, total = 0;
    int i, op;

    (void)state;
    memset(&sh, 0, sizeof(sh));
    for (i = 0; i < CC_NTOP; i++)
        random_pattern(&rng, sh.topics[i], 3, 3, false);
    v = calloc(1, sizeof(*v));
    assert_non_null(v);
    /* A small cache: readers race to fill the same slots, and it fills. */
    assert_non_null(v->t = bus__tindex_new(8));
    atomic_store(&sh.cur, v);
    for (i = 0; i < CC_READERS; i++) {
        rd[i] = (cc_reader){&sh, i, bt_rand(&rng)};
        assert_int_equal(pthread_create(&th[i], NULL, cc_reader_main, &rd[i]),
                         0);
    }
    /* At least CC_OPS changes, and until every reader has done
     * CC_MIN_LOOKUPS lookups (the readers may start late on a loaded
     * machine), within CC_MAX_NS. */
    t0 = bt_now_ns();
    for (op = 0;; op++) {
        cc_version *nv;

        if (op >= CC_OPS) {
            uint64_t least = UINT64_MAX;

            for (i = 0; i < CC_READERS; i++) {
                uint64_t l = atomic_load_explicit(&sh.lookups[i],
                                                  memory_order_relaxed);
                least = l < least ? l : least;
            }
            if (least >= CC_MIN_LOOKUPS || bt_now_ns() - t0 > CC_MAX_NS)
                break;
        }
        nv = calloc(1, sizeof(*nv));
        char pat[32];
        uintptr_t it;

        assert_non_null(nv);
        nv->m = model_copy(&v->m);
        if (v->m.n < 8 || bt_rand(&rng) % 2 == 0) {
            random_pattern(&rng, pat, 3, 3, true);
            it = 1 + (uintptr_t)(bt_rand(&rng) % 4);
            nv->t = must_add(v->t, pat, it, &nv->m);
        } else {
            mentry e = v->m.v[bt_rand(&rng) % v->m.n];

            nv->t = must_remove(v->t, e.pat, e.item, &nv->m);
        }
        atomic_store(&sh.cur, nv);
        v->next = retired;
        retired = v;
        retired = cc_reclaim(&sh, retired);
        v = nv;
    }
    atomic_store_explicit(&sh.stop, true, memory_order_release);
    for (i = 0; i < CC_READERS; i++)
        pthread_join(th[i], NULL);
    assert_null(cc_reclaim(&sh, retired)); /* no reader left */
    bus__tindex_release(v->t);
    free(v->m.v);
    free(v);
    for (i = 0; i < CC_READERS; i++)
        total += atomic_load(&sh.lookups[i]);
    print_message("# %d changes, %" PRIu64 " concurrent lookups\n", op,
                  total);
    assert_int_equal(atomic_load(&sh.errors), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_validate_accepts_valid_topics_and_patterns),
        cmocka_unit_test(test_validate_rejects_with_precise_reason),
        cmocka_unit_test(test_validate_agrees_with_reference_rules),
        cmocka_unit_test(test_match_table),
        cmocka_unit_test(test_overlap_table),
        cmocka_unit_test(test_overlap_agrees_with_brute_force),
        cmocka_unit_test(test_hash_is_stable_and_spreads),
        cmocka_unit_test(test_index_add_lookup_remove),
        cmocka_unit_test(test_index_removes_one_of_two_identical_entries),
        cmocka_unit_test(test_old_snapshots_keep_their_answers),
        cmocka_unit_test(test_lookup_checked_validates_on_miss_only),
        cmocka_unit_test(test_index_agrees_with_brute_force),
        cmocka_unit_test(test_ten_thousand_subscriptions_added_then_removed),
        cmocka_unit_test(test_cache_full_answers_through_buf),
        cmocka_unit_test(test_cache_budget_bounds_large_results),
        cmocka_unit_test(test_add_and_remove_fail_cleanly),
        cmocka_unit_test(test_lookup_under_alloc_failure_answers_through_buf),
        cmocka_unit_test(test_concurrent_readers_see_consistent_snapshots),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
