/* Strict Prometheus text format parser for the tests (prom_parse.h). */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prom_parse.h"

typedef struct pstate {
    prom_doc *doc;
    char *err;
    size_t errlen;
    int line;
    int cur_family; /* family whose samples are being read, or -1 */
    bool *family_done;
} pstate;

static int perr(pstate *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
perr(pstate *p, const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(p->err, p->errlen, "line %d: %s", p->line, msg);
    return -1;
}

static char *
xstrndup(const char *s, size_t n)
{
    char *d = malloc(n + 1);

    if (d == NULL)
        abort();
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static bool
is_name_start(char c, bool metric)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           (metric && c == ':');
}

static bool
is_name_char(char c, bool metric)
{
    return is_name_start(c, metric) || (c >= '0' && c <= '9');
}

/* Reads a name at *s; returns its length (0 when none). */
static size_t
read_name(const char *s, bool metric)
{
    size_t n = 0;

    if (!is_name_start(s[0], metric))
        return 0;
    while (is_name_char(s[n], metric))
        n++;
    return n;
}

static int
find_family(const prom_doc *d, const char *name)
{
    int i;

    for (i = 0; i < d->nfamilies; i++)
        if (strcmp(d->families[i].name, name) == 0)
            return i;
    return -1;
}

static int
add_family(prom_doc *d, const char *name, size_t n)
{
    d->families =
        realloc(d->families, (size_t)(d->nfamilies + 1) * sizeof(prom_family));
    if (d->families == NULL)
        abort();
    memset(&d->families[d->nfamilies], 0, sizeof(prom_family));
    d->families[d->nfamilies].name = xstrndup(name, n);
    return d->nfamilies++;
}

/* Unescapes src[0..n) with the escapes allowed (quote: also \"). */
static char *
unescape(pstate *p, const char *src, size_t n, bool quote)
{
    char *d = malloc(n + 1);
    size_t i, k = 0;

    if (d == NULL)
        abort();
    for (i = 0; i < n; i++) {
        if (src[i] != '\\') {
            d[k++] = src[i];
            continue;
        }
        if (i + 1 >= n) {
            free(d);
            perr(p, "dangling backslash");
            return NULL;
        }
        i++;
        if (src[i] == '\\')
            d[k++] = '\\';
        else if (src[i] == 'n')
            d[k++] = '\n';
        else if (quote && src[i] == '"')
            d[k++] = '"';
        else {
            free(d);
            perr(p, "invalid escape \\%c", src[i]);
            return NULL;
        }
    }
    d[k] = '\0';
    return d;
}

static int
parse_comment(pstate *p, const char *s, size_t len)
{
    prom_doc *d = p->doc;
    bool help;
    size_t n;
    int f;

    if (len >= 7 && strncmp(s, "# HELP ", 7) == 0)
        help = true;
    else if (len >= 7 && strncmp(s, "# TYPE ", 7) == 0)
        help = false;
    else
        return perr(p, "comment that is neither HELP nor TYPE");
    s += 7;
    len -= 7;
    if ((n = read_name(s, true)) == 0)
        return perr(p, "bad metric name in comment");
    if (n >= len || s[n] != ' ')
        return perr(p, "missing space after the name");
    {
        char *name = xstrndup(s, n);
        f = find_family(d, name);
        if (f < 0)
            f = add_family(d, s, n);
        free(name);
    }
    if (p->family_done != NULL && f < d->nfamilies && p->family_done[f])
        return perr(p, "%s: comment after its samples", d->families[f].name);
    s += n + 1;
    len -= n + 1;
    if (help) {
        if (d->families[f].help != NULL)
            return perr(p, "%s: HELP twice", d->families[f].name);
        if ((d->families[f].help = unescape(p, s, len, false)) == NULL)
            return -1;
        return 0;
    }
    if (d->families[f].type != NULL)
        return perr(p, "%s: TYPE twice", d->families[f].name);
    if (!(len == 7 && strncmp(s, "counter", 7) == 0) &&
        !(len == 5 && strncmp(s, "gauge", 5) == 0) &&
        !(len == 9 && strncmp(s, "histogram", 9) == 0) &&
        !(len == 7 && strncmp(s, "summary", 7) == 0) &&
        !(len == 7 && strncmp(s, "untyped", 7) == 0))
        return perr(p, "bad type '%.*s'", (int)len, s);
    d->families[f].type = xstrndup(s, len);
    /* A TYPE starts a new family: the previous one is finished. */
    if (p->cur_family >= 0 && p->cur_family != f)
        p->family_done[p->cur_family] = true;
    p->cur_family = f;
    return 0;
}

/* The declared family a sample name belongs to, or -1. */
static int
sample_family(const prom_doc *d, const char *name)
{
    static const char *const sfx[] = {"_bucket", "_sum", "_count"};
    size_t nl = strlen(name), i;
    int f;

    for (f = 0; f < d->nfamilies; f++) {
        const prom_family *pf = &d->families[f];
        size_t fl = strlen(pf->name);
        if (pf->type == NULL)
            continue;
        if (strcmp(pf->type, "histogram") != 0) {
            if (strcmp(pf->name, name) == 0)
                return f;
            continue;
        }
        if (nl <= fl || strncmp(name, pf->name, fl) != 0)
            continue;
        for (i = 0; i < 3; i++)
            if (strcmp(name + fl, sfx[i]) == 0)
                return f;
    }
    return -1;
}

static bool
same_labels(const prom_sample *a, const prom_sample *b, const char *skip)
{
    int i, j, na = 0, nb = 0;

    for (i = 0; i < a->nlabels; i++)
        if (skip == NULL || strcmp(a->labels[i].name, skip) != 0)
            na++;
    for (i = 0; i < b->nlabels; i++)
        if (skip == NULL || strcmp(b->labels[i].name, skip) != 0)
            nb++;
    if (na != nb)
        return false;
    for (i = 0; i < a->nlabels; i++) {
        if (skip != NULL && strcmp(a->labels[i].name, skip) == 0)
            continue;
        for (j = 0; j < b->nlabels; j++)
            if (strcmp(a->labels[i].name, b->labels[j].name) == 0 &&
                strcmp(a->labels[i].value, b->labels[j].value) == 0)
                break;
        if (j == b->nlabels)
            return false;
    }
    return true;
}

static bool
parse_number(const char *s, size_t n, double *out)
{
    char *tmp = xstrndup(s, n), *end;
    bool ok;

    if (strcmp(tmp, "+Inf") == 0) {
        *out = INFINITY;
        ok = true;
    } else if (strcmp(tmp, "-Inf") == 0) {
        *out = -INFINITY;
        ok = true;
    } else if (strcmp(tmp, "NaN") == 0) {
        *out = NAN;
        ok = true;
    } else {
        *out = strtod(tmp, &end);
        ok = n > 0 && *end == '\0' && isfinite(*out);
    }
    free(tmp);
    return ok;
}

#define FAIL(x)                                                                \
    do {                                                                       \
        (void)(x);                                                             \
        goto fail;                                                             \
    } while (0)

static int
parse_sample(pstate *p, const char *s, size_t len)
{
    prom_doc *d = p->doc;
    prom_sample sm;
    size_t n, i = 0;
    int k;

    memset(&sm, 0, sizeof(sm));
    if ((n = read_name(s, true)) == 0)
        FAIL(perr(p, "bad metric name"));
    sm.name = xstrndup(s, n);
    i = n;
    if (i < len && s[i] == '{') {
        i++;
        while (i < len && s[i] != '}') {
            size_t ln = read_name(s + i, false), vs;
            prom_label *l;
            if (ln == 0)
                FAIL(perr(p, "bad label name"));
            if (sm.nlabels == PROM_MAX_LABELS)
                FAIL(perr(p, "too many labels"));
            l = &sm.labels[sm.nlabels++];
            l->name = xstrndup(s + i, ln);
            i += ln;
            if (i + 1 >= len || s[i] != '=' || s[i + 1] != '"')
                FAIL(perr(p, "expected =\" after label name"));
            i += 2;
            vs = i;
            while (i < len && s[i] != '"') {
                if (s[i] == '\\')
                    i++;
                i++;
            }
            if (i >= len)
                FAIL(perr(p, "unterminated label value"));
            if ((l->value = unescape(p, s + vs, i - vs, true)) == NULL)
                FAIL(-1);
            i++; /* closing quote */
            if (i < len && s[i] == ',')
                i++;
            else if (i < len && s[i] != '}')
                FAIL(perr(p, "expected , or } after a label"));
        }
        if (i >= len)
            FAIL(perr(p, "unterminated label set"));
        i++; /* } */
    }
    for (k = 0; k < sm.nlabels; k++) {
        int j;
        for (j = 0; j < k; j++)
            if (strcmp(sm.labels[j].name, sm.labels[k].name) == 0)
                FAIL(perr(p, "duplicate label %s", sm.labels[k].name));
    }
    if (i >= len || s[i] != ' ')
        FAIL(perr(p, "expected a space before the value"));
    i++;
    n = 0;
    while (i + n < len && s[i + n] != ' ')
        n++;
    if (!parse_number(s + i, n, &sm.value))
        FAIL(perr(p, "bad value '%.*s'", (int)n, s + i));
    if (i + n != len)
        FAIL(perr(p, "trailing text after the value"));
    if ((sm.family = sample_family(d, sm.name)) < 0)
        FAIL(perr(p, "%s: sample of no declared family", sm.name));
    if (p->family_done[sm.family])
        FAIL(perr(p, "%s: family's samples are not contiguous", sm.name));
    if (sm.family != p->cur_family)
        FAIL(perr(p, "%s: sample before or away from its TYPE", sm.name));
    for (k = 0; k < d->nsamples; k++)
        if (strcmp(d->samples[k].name, sm.name) == 0 &&
            same_labels(&d->samples[k], &sm, NULL))
            FAIL(perr(p, "%s: duplicate sample", sm.name));
    d->samples =
        realloc(d->samples, (size_t)(d->nsamples + 1) * sizeof(prom_sample));
    if (d->samples == NULL)
        abort();
    d->samples[d->nsamples++] = sm;
    return 0;
fail:
    free(sm.name);
    for (k = 0; k < sm.nlabels; k++) {
        free(sm.labels[k].name);
        free(sm.labels[k].value);
    }
    return -1;
}

static const char *
label_value(const prom_sample *s, const char *name)
{
    int i;

    for (i = 0; i < s->nlabels; i++)
        if (strcmp(s->labels[i].name, name) == 0)
            return s->labels[i].value;
    return NULL;
}

static bool
has_suffix(const char *name, const prom_family *f, const char *sfx)
{
    size_t fl = strlen(f->name);

    return strncmp(name, f->name, fl) == 0 && strcmp(name + fl, sfx) == 0;
}

/* Per histogram series (labels without le): the bucket rules. */
static int
check_histograms(pstate *p)
{
    prom_doc *d = p->doc;
    int i, j;

    p->line = 0;
    for (i = 0; i < d->nsamples; i++) {
        const prom_sample *a = &d->samples[i];
        const prom_family *f = &d->families[a->family];
        double last_le = -INFINITY, last_count = 0, inf_count = -1;
        int nsum = 0, ncount = 0, nbuckets = 0;
        double count = -1;
        bool first = true;

        if (strcmp(f->type, "histogram") != 0)
            continue;
        /* Handle each series once: at its first sample. */
        for (j = 0; j < i; j++)
            if (d->samples[j].family == a->family &&
                same_labels(&d->samples[j], a, "le"))
                break;
        if (j < i)
            continue;
        for (j = i; j < d->nsamples; j++) {
            const prom_sample *b = &d->samples[j];
            if (b->family != a->family || !same_labels(b, a, "le"))
                continue;
            if (has_suffix(b->name, f, "_bucket")) {
                const char *le = label_value(b, "le");
                double lev;
                if (le == NULL || !parse_number(le, strlen(le), &lev) ||
                    isnan(lev))
                    return perr(p, "%s: bucket without a valid le", b->name);
                if (inf_count >= 0)
                    return perr(p, "%s: bucket after +Inf", b->name);
                if (!first && !(lev > last_le))
                    return perr(p, "%s: le not ascending", b->name);
                if (!first && b->value < last_count)
                    return perr(p, "%s: buckets not cumulative", b->name);
                if (b->value < 0 || b->value != floor(b->value))
                    return perr(p, "%s: bad bucket count", b->name);
                last_le = lev;
                last_count = b->value;
                first = false;
                nbuckets++;
                if (isinf(lev))
                    inf_count = b->value;
            } else if (has_suffix(b->name, f, "_sum")) {
                nsum++;
            } else {
                if (label_value(b, "le") != NULL)
                    return perr(p, "%s: le on _count", b->name);
                ncount++;
                count = b->value;
            }
        }
        if (nbuckets == 0 || inf_count < 0)
            return perr(p, "%s: no +Inf bucket", f->name);
        if (nsum != 1 || ncount != 1)
            return perr(p, "%s: %d _sum and %d _count", f->name, nsum, ncount);
        if (count != inf_count)
            return perr(p, "%s: _count %g != +Inf bucket %g", f->name, count,
                        inf_count);
    }
    return 0;
}

int
prom_parse(const char *text, prom_doc *doc, char *err, size_t errlen)
{
    pstate p;
    const char *s = text;
    int rv = 0;

    memset(doc, 0, sizeof(*doc));
    memset(&p, 0, sizeof(p));
    p.doc = doc;
    p.err = err;
    p.errlen = errlen;
    p.cur_family = -1;
    /* Generous: families are only ever created by comment lines. */
    p.family_done = calloc(strlen(text) + 1, sizeof(bool));
    if (p.family_done == NULL)
        abort();
    while (*s != '\0') {
        const char *nl = strchr(s, '\n');
        size_t len;

        p.line++;
        if (nl == NULL) {
            rv = perr(&p, "last line does not end in a newline");
            break;
        }
        len = (size_t)(nl - s);
        if (len == 0) {
            rv = perr(&p, "empty line");
            break;
        }
        rv = s[0] == '#' ? parse_comment(&p, s, len) : parse_sample(&p, s, len);
        if (rv != 0)
            break;
        s = nl + 1;
    }
    if (rv == 0)
        rv = check_histograms(&p);
    free(p.family_done);
    return rv;
}

void
prom_doc_free(prom_doc *doc)
{
    int i, j;

    for (i = 0; i < doc->nsamples; i++) {
        free(doc->samples[i].name);
        for (j = 0; j < doc->samples[i].nlabels; j++) {
            free(doc->samples[i].labels[j].name);
            free(doc->samples[i].labels[j].value);
        }
    }
    for (i = 0; i < doc->nfamilies; i++) {
        free(doc->families[i].name);
        free(doc->families[i].type);
        free(doc->families[i].help);
    }
    free(doc->samples);
    free(doc->families);
    memset(doc, 0, sizeof(*doc));
}

const prom_sample *
prom_find(const prom_doc *doc, const char *name, const char *const *kv, int n)
{
    int i, k;

    for (i = 0; i < doc->nsamples; i++) {
        const prom_sample *s = &doc->samples[i];
        if (strcmp(s->name, name) != 0 || s->nlabels != n)
            continue;
        for (k = 0; k < n; k++) {
            const char *v = label_value(s, kv[2 * k]);
            if (v == NULL || strcmp(v, kv[2 * k + 1]) != 0)
                break;
        }
        if (k == n)
            return s;
    }
    return NULL;
}
