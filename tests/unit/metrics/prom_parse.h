/*
 * A strict parser for the Prometheus text exposition format 0.0.4, written
 * for the tests independently of the library's writer. It checks:
 * - every line ends in '\n' and is "# HELP name text", "# TYPE name type"
 *   or a sample `name{label="value",...} value`;
 * - names and label names follow the syntax, label values use only the
 *   escapes \\ \" \n, HELP text only \\ \n, no duplicate labels;
 * - TYPE is declared once per family, before its samples; HELP at most
 *   once; a family's samples are contiguous; no sample appears twice;
 * - every sample belongs to a declared family (histograms: name_bucket,
 *   name_sum, name_count);
 * - per histogram series: le bounds strictly ascending and ending in +Inf,
 *   bucket counts cumulative (non-decreasing), _count equal to the +Inf
 *   bucket, exactly one _sum and one _count.
 */
#ifndef PROM_PARSE_H
#define PROM_PARSE_H

#include <stddef.h>

#define PROM_MAX_LABELS 16

typedef struct prom_label {
    char *name;
    char *value; /* unescaped */
} prom_label;

typedef struct prom_sample {
    char *name;
    prom_label labels[PROM_MAX_LABELS];
    int nlabels;
    double value;
    int family; /* index in prom_doc.families */
} prom_sample;

typedef struct prom_family {
    char *name;
    char *type;
    char *help; /* unescaped; NULL when none */
} prom_family;

typedef struct prom_doc {
    prom_sample *samples;
    int nsamples;
    prom_family *families;
    int nfamilies;
} prom_doc;

/* Parses and checks text. Returns 0, or -1 with a reason (and the line
 * number) in err. The doc must be freed with prom_doc_free either way. */
int prom_parse(const char *text, prom_doc *doc, char *err, size_t errlen);
void prom_doc_free(prom_doc *doc);

/* The sample called name whose labels are exactly the n (name, value)
 * pairs in kv (any order); NULL when absent. */
const prom_sample *prom_find(const prom_doc *doc, const char *name,
                             const char *const *kv, int n);

#endif
