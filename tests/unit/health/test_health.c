/* Health checks: each status, aggregation per view, timeouts (the run
 * returns in time and late results are discarded), inline, threaded and
 * manual checks, deregistration (also from inside a check, and of a hung
 * check), close abandoning a hung check, JSON validity with jansson,
 * concurrency, allocation faults. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "test_support.h"

#include <bus/health.h>

#include "platform.h"
#include "testing.h"

/* Live allocations through libbus's allocator: lets a test wait until an
 * abandoned check thread has freed everything. */
static atomic_long live_allocs;

static void *
count_alloc(void *opaque, size_t size)
{
    void *p = malloc(size);

    (void)opaque;
    if (p != NULL)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}

static void *
count_realloc(void *opaque, void *p, size_t old_size, size_t new_size)
{
    (void)opaque;
    (void)old_size;
    return realloc(p, new_size);
}

static void
count_free(void *opaque, void *p, size_t size)
{
    (void)opaque;
    (void)size;
    if (p != NULL)
        atomic_fetch_sub(&live_allocs, 1);
    free(p);
}

static const bus_allocator counting = {count_alloc, count_realloc, count_free,
                                       NULL};

#define MS 1000000ull

/* ---- Check functions ---------------------------------------------------- */

typedef struct fixed {
    bus_health_status st;
    const char *msg;
} fixed;

static bus_health_status
fixed_check(void *opaque, char *msg, size_t len)
{
    fixed *f = opaque;

    assert_int_equal(len, BUS_HEALTH_MSG_MAX);
    assert_string_equal(msg, "");
    if (f->msg != NULL)
        snprintf(msg, len, "%s", f->msg);
    return f->st;
}

/* Blocks until released (or 10 s, so a failing test still ends). The
 * first call returns DEGRADED "late"; later calls return at once. */
typedef struct blocker {
    atomic_bool release;
    atomic_int calls;
    atomic_int returned;
} blocker;

static bus_health_status
blocking_check(void *opaque, char *msg, size_t len)
{
    blocker *b = opaque;
    uint64_t until = bus__clock_mono_ns() + 10000 * MS;

    if (atomic_fetch_add(&b->calls, 1) > 0) {
        snprintf(msg, len, "fresh");
        atomic_fetch_add(&b->returned, 1);
        return BUS_HEALTH_HEALTHY;
    }
    while (!atomic_load(&b->release) && bus__clock_mono_ns() < until)
        bus__sleep_ns(MS);
    snprintf(msg, len, "late");
    atomic_fetch_add(&b->returned, 1);
    return BUS_HEALTH_DEGRADED;
}

static bus_health_status
sleepy_check(void *opaque, char *msg, size_t len)
{
    (void)msg;
    (void)len;
    bus__sleep_ns(*(uint64_t *)opaque);
    return BUS_HEALTH_HEALTHY;
}

static bus_health *
open_health(void)
{
    bus_health *h;

    assert_int_equal(bus_health_open(&h, NULL), BUS_OK);
    return h;
}

static bus_health_check *
add_check(bus_health *h, const char *name, bus_health_fn fn, void *opaque,
          unsigned views, bool run_inline, int32_t timeout_ms)
{
    bus_health_check_config cc;
    bus_health_check *c;

    bus_health_check_config_init(&cc);
    cc.name = name;
    cc.fn = fn;
    cc.opaque = opaque;
    cc.views = views;
    cc.run_inline = run_inline;
    cc.timeout_ms = timeout_ms;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_OK);
    return c;
}

static const bus_health_result *
find_result(const bus_health_report *r, const char *name)
{
    size_t i;

    for (i = 0; i < r->nchecks; i++)
        if (strcmp(r->checks[i].name, name) == 0)
            return &r->checks[i];
    return NULL;
}

/* ---- Statuses and views -------------------------------------------------- */

static void
test_each_status_threaded_inline_and_manual(void **state)
{
    bus_health *h = open_health();
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    fixed deg = {BUS_HEALTH_DEGRADED, "queue 90% full"};
    fixed bad = {BUS_HEALTH_UNHEALTHY, "broker down"};
    fixed weird = {(bus_health_status)7, NULL};
    bus_health_check *man;
    bus_health_check_config cc;
    bus_health_report *r;
    const bus_health_result *x;

    (void)state;
    add_check(h, "t.ok", fixed_check, &ok, 0, false, 0);
    add_check(h, "i.degraded", fixed_check, &deg, 0, true, 0);
    add_check(h, "t.unhealthy", fixed_check, &bad, 0, false, 0);
    bus_health_check_config_init(&cc);
    cc.name = "manual";
    cc.initial = BUS_HEALTH_DEGRADED;
    assert_int_equal(bus_health_register(h, &cc, &man), BUS_OK);

    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->nchecks, 4);
    assert_int_equal(r->views, BUS_HEALTH_BOTH);
    /* Registration order. */
    assert_string_equal(r->checks[0].name, "t.ok");
    assert_string_equal(r->checks[3].name, "manual");
    x = find_result(r, "t.ok");
    assert_int_equal(x->status, BUS_HEALTH_HEALTHY);
    assert_string_equal(x->message, "");
    assert_int_equal(x->views, BUS_HEALTH_BOTH);
    assert_false(x->timed_out);
    x = find_result(r, "i.degraded");
    assert_int_equal(x->status, BUS_HEALTH_DEGRADED);
    assert_string_equal(x->message, "queue 90% full");
    x = find_result(r, "t.unhealthy");
    assert_int_equal(x->status, BUS_HEALTH_UNHEALTHY);
    assert_string_equal(x->message, "broker down");
    x = find_result(r, "manual");
    assert_int_equal(x->status, BUS_HEALTH_DEGRADED);
    assert_int_equal(r->status, BUS_HEALTH_UNHEALTHY);
    assert_int_equal(r->liveness, BUS_HEALTH_UNHEALTHY);
    assert_int_equal(r->readiness, BUS_HEALTH_UNHEALTHY);
    bus_health_report_free(r);

    /* Manual checks follow bus_health_check_set. */
    assert_int_equal(bus_health_check_set(man, BUS_HEALTH_HEALTHY, "ok %d", 3),
                     BUS_OK);
    bad.st = BUS_HEALTH_HEALTHY;
    deg.st = BUS_HEALTH_HEALTHY;
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->status, BUS_HEALTH_HEALTHY);
    assert_string_equal(find_result(r, "manual")->message, "ok 3");
    bus_health_report_free(r);

    /* An out-of-range status counts as unhealthy. */
    add_check(h, "weird", fixed_check, &weird, 0, true, 0);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(find_result(r, "weird")->status, BUS_HEALTH_UNHEALTHY);
    assert_int_equal(r->status, BUS_HEALTH_UNHEALTHY);
    bus_health_report_free(r);

    assert_string_equal(bus_health_status_name(BUS_HEALTH_DEGRADED),
                        "degraded");
    assert_string_equal(bus_health_status_name((bus_health_status)9),
                        "unknown");
    assert_int_equal(bus_health_http_status(BUS_HEALTH_HEALTHY), 200);
    assert_int_equal(bus_health_http_status(BUS_HEALTH_DEGRADED), 200);
    assert_int_equal(bus_health_http_status(BUS_HEALTH_UNHEALTHY), 503);
    bus_health_close(h);
}

static void
test_views_aggregate_separately(void **state)
{
    bus_health *h = open_health();
    fixed live_bad = {BUS_HEALTH_UNHEALTHY, "deadlock"};
    fixed ready_deg = {BUS_HEALTH_DEGRADED, "slow"};
    fixed both_ok = {BUS_HEALTH_HEALTHY, NULL};
    bus_health_report *r;

    (void)state;
    /* No checks: healthy. */
    assert_int_equal(bus_health_run(h, BUS_HEALTH_READINESS, &r), BUS_OK);
    assert_int_equal(r->nchecks, 0);
    assert_int_equal(r->status, BUS_HEALTH_HEALTHY);
    bus_health_report_free(r);

    add_check(h, "live", fixed_check, &live_bad, BUS_HEALTH_LIVENESS, true, 0);
    add_check(h, "ready", fixed_check, &ready_deg, BUS_HEALTH_READINESS, false,
              0);
    add_check(h, "both", fixed_check, &both_ok, BUS_HEALTH_BOTH, false, 0);

    assert_int_equal(bus_health_run(h, BUS_HEALTH_LIVENESS, &r), BUS_OK);
    assert_int_equal(r->nchecks, 2); /* live, both */
    assert_null(find_result(r, "ready"));
    assert_int_equal(r->liveness, BUS_HEALTH_UNHEALTHY);
    assert_int_equal(r->status, BUS_HEALTH_UNHEALTHY);
    bus_health_report_free(r);

    assert_int_equal(bus_health_run(h, BUS_HEALTH_READINESS, &r), BUS_OK);
    assert_int_equal(r->nchecks, 2); /* ready, both */
    assert_null(find_result(r, "live"));
    assert_int_equal(r->readiness, BUS_HEALTH_DEGRADED);
    assert_int_equal(r->status, BUS_HEALTH_DEGRADED);
    bus_health_report_free(r);

    assert_int_equal(bus_health_run(h, BUS_HEALTH_BOTH, &r), BUS_OK);
    assert_int_equal(r->nchecks, 3);
    assert_int_equal(r->liveness, BUS_HEALTH_UNHEALTHY);
    assert_int_equal(r->readiness, BUS_HEALTH_DEGRADED);
    assert_int_equal(r->status, BUS_HEALTH_UNHEALTHY);
    bus_health_report_free(r);

    assert_int_equal(bus_health_run(h, 4, &r), BUS_EINVAL);
    assert_null(r);
    bus_health_close(h);
}

/* ---- Timeouts ------------------------------------------------------------ */

static int
blocker_called(void *arg)
{
    return atomic_load(&((blocker *)arg)->calls) >= 1;
}

typedef struct settled_run {
    bus_health *h;
    const char *name;
    bus_health_report *r; /* the run that found name settled */
} settled_run;

/* Runs h; true (keeping the report) once name's last call has been
 * stored, i.e. the run did not find that call still in flight. */
static int
run_settled(void *arg)
{
    settled_run *w = arg;
    bus_health_report *r;
    const bus_health_result *x;

    if (bus_health_run(w->h, 0, &r) != BUS_OK)
        return 0;
    x = find_result(r, w->name);
    if (x == NULL || x->timed_out) {
        bus_health_report_free(r);
        return 0;
    }
    w->r = r;
    return 1;
}

static void
test_threaded_timeout_returns_in_time_and_discards_late_result(void **state)
{
    bus_health *h = open_health();
    blocker b;
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    bus_health_report *r;
    const bus_health_result *x;
    uint64_t t0, took;

    (void)state;
    memset(&b, 0, sizeof(b));
    add_check(h, "hung", blocking_check, &b, 0, false, 100);
    add_check(h, "fine", fixed_check, &ok, 0, false, 0);

    t0 = bus__clock_mono_ns();
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    took = bus__clock_mono_ns() - t0;
    /* Returns at the 100 ms deadline, not when the check returns (10 s);
     * the margin covers an overloaded CI box under TSan. */
    assert_true(took >= 100 * MS);
    assert_true(took < 1500 * MS);
    x = find_result(r, "hung");
    assert_int_equal(x->status, BUS_HEALTH_UNHEALTHY);
    assert_true(x->timed_out);
    assert_true(x->duration_ns >= 100 * MS);
    assert_non_null(strstr(x->message, "timed out"));
    assert_int_equal(find_result(r, "fine")->status, BUS_HEALTH_HEALTHY);
    assert_int_equal(r->status, BUS_HEALTH_UNHEALTHY);
    bus_health_report_free(r);

    /* Still hung: the next run does not wait for it again. (Under load
     * the check's thread may begin the call only after the first run
     * gave up on it: wait until it has, as calls is checked below.) */
    assert_true(bt_wait_for(blocker_called, &b, 10000));
    t0 = bus__clock_mono_ns();
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    took = bus__clock_mono_ns() - t0;
    assert_true(took < 1000 * MS);
    x = find_result(r, "hung");
    assert_true(x->timed_out);
    assert_int_equal(atomic_load(&b.calls), 1); /* not called twice */
    bus_health_report_free(r);

    /* It returns DEGRADED "late": that result belongs to a run that gave
     * up, so the next run asks for a fresh call (HEALTHY "fresh"). */
    atomic_store(&b.release, true);
    /* The check counts its return before its thread stores the result:
     * until then a run still finds the (overdue) call in flight and
     * reports it timed out without calling it. Wait for a run that does
     * not: it must have asked for a fresh call. */
    {
        settled_run w = {h, "hung", NULL};
        assert_true(bt_wait_for(run_settled, &w, 10000));
        r = w.r;
    }
    x = find_result(r, "hung");
    assert_int_equal(x->status, BUS_HEALTH_HEALTHY);
    assert_string_equal(x->message, "fresh");
    assert_false(x->timed_out);
    assert_int_equal(atomic_load(&b.calls), 2);
    bus_health_report_free(r);
    bus_health_close(h);
}

static void
test_inline_overrun_is_unhealthy(void **state)
{
    bus_health *h = open_health();
    uint64_t sleep_ns = 400 * MS;
    bus_health_report *r;
    const bus_health_result *x;

    (void)state;
    /* 200 ms: room for a preempted fast call in the second run */
    add_check(h, "slow.inline", sleepy_check, &sleep_ns, 0, true, 200);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    x = find_result(r, "slow.inline");
    assert_int_equal(x->status, BUS_HEALTH_UNHEALTHY);
    assert_true(x->timed_out);
    assert_true(x->duration_ns >= 400 * MS);
    assert_non_null(strstr(x->message, "discarded"));
    bus_health_report_free(r);

    sleep_ns = 0;
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(find_result(r, "slow.inline")->status, BUS_HEALTH_HEALTHY);
    bus_health_report_free(r);
    bus_health_close(h);
}

/* ---- Registration and deregistration ------------------------------------- */

static void
test_registration_errors(void **state)
{
    bus_health *h = open_health();
    bus_health_check_config cc;
    bus_health_check *c, *fnc;
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    char longname[200];
    bus_health_config hc;

    (void)state;
    bus_health_check_config_init(&cc);
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL); /* name */
    assert_null(c);
    memset(longname, 'x', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    cc.name = longname;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL);
    cc.name = "a";
    cc.views = 8;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL);
    cc.views = 0;
    cc.timeout_ms = -1;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL);
    cc.timeout_ms = 700000;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL);
    cc.timeout_ms = 0;
    cc.initial = (bus_health_status)5;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_EINVAL);
    cc.initial = BUS_HEALTH_HEALTHY;
    assert_int_equal(bus_health_register(h, &cc, &c), BUS_OK);
    assert_int_equal(bus_health_register(h, &cc, NULL), BUS_EEXIST);
    cc.fn = fixed_check; /* a threaded one with the same name */
    cc.opaque = &ok;
    assert_int_equal(bus_health_register(h, &cc, NULL), BUS_EEXIST);
    assert_int_equal(bus_health_register(NULL, &cc, NULL), BUS_EINVAL);
    assert_int_equal(bus_health_register(h, NULL, NULL), BUS_EINVAL);

    fnc = add_check(h, "with.fn", fixed_check, &ok, 0, true, 0);
    assert_int_equal(bus_health_check_set(fnc, BUS_HEALTH_DEGRADED, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_health_check_set(c, (bus_health_status)3, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_health_check_set(NULL, BUS_HEALTH_HEALTHY, NULL),
                     BUS_EINVAL);
    assert_int_equal(bus_health_deregister(NULL), BUS_OK);

    bus_health_config_init(&hc);
    hc.default_timeout_ms = 0; /* zero: default */
    {
        bus_health *h2;
        assert_int_equal(bus_health_open(&h2, &hc), BUS_OK);
        bus_health_close(h2);
        hc.default_timeout_ms = 700000;
        assert_int_equal(bus_health_open(&h2, &hc), BUS_EINVAL);
        assert_null(h2);
    }
    bus_health_close(h);
    bus_health_close(NULL);
}

static void
test_deregister_removes_and_frees_the_name(void **state)
{
    bus_health *h = open_health();
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    fixed bad = {BUS_HEALTH_UNHEALTHY, NULL};
    bus_health_check *t, *i, *m;
    bus_health_check_config cc;
    bus_health_report *r;

    (void)state;
    t = add_check(h, "threaded", fixed_check, &bad, 0, false, 0);
    i = add_check(h, "inline", fixed_check, &bad, 0, true, 0);
    bus_health_check_config_init(&cc);
    cc.name = "manual";
    cc.initial = BUS_HEALTH_UNHEALTHY;
    assert_int_equal(bus_health_register(h, &cc, &m), BUS_OK);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->nchecks, 3);
    bus_health_report_free(r);

    assert_int_equal(bus_health_deregister(t), BUS_OK);
    assert_int_equal(bus_health_deregister(i), BUS_OK);
    assert_int_equal(bus_health_deregister(m), BUS_OK);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->nchecks, 0);
    assert_int_equal(r->status, BUS_HEALTH_HEALTHY);
    bus_health_report_free(r);

    t = add_check(h, "threaded", fixed_check, &ok, 0, false, 0);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->nchecks, 1);
    assert_int_equal(r->status, BUS_HEALTH_HEALTHY);
    bus_health_report_free(r);
    bus_health_close(h); /* deregisters what is left */
}

/* Deregistering a check whose call is hung: waits its timeout plus the
 * margin, then gives up with ETIMEDOUT; the thread is reclaimed once the
 * call returns (ASan: nothing leaks). */
static void
test_deregister_hung_check_times_out(void **state)
{
    bus_health *h = open_health();
    blocker b;
    bus_health_check *c;
    bus_health_report *r;
    uint64_t t0, took;

    (void)state;
    memset(&b, 0, sizeof(b));
    c = add_check(h, "hung", blocking_check, &b, 0, false, 50);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_true(r->checks[0].timed_out);
    bus_health_report_free(r);
    /* Under load the check's thread may not have begun the call within
     * its 50 ms; deregister then rightly returns BUS_OK (nothing runs).
     * This test is about a call that is running: wait until it is. */
    {
        uint64_t limit = bus__clock_mono_ns() + 10000 * MS;
        while (atomic_load(&b.calls) == 0 && bus__clock_mono_ns() < limit)
            bus__sleep_ns(MS);
        assert_int_equal(atomic_load(&b.calls), 1);
    }
    t0 = bus__clock_mono_ns();
    assert_int_equal(bus_health_deregister(c), BUS_ETIMEDOUT);
    took = bus__clock_mono_ns() - t0;
    assert_true(took < 3000 * MS);
    atomic_store(&b.release, true);
    while (atomic_load(&b.returned) < 1)
        bus__sleep_ns(MS);
    /* A later call reaps it; close would too. */
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(r->nchecks, 0);
    bus_health_report_free(r);
    bus_health_close(h);
}

typedef struct selfdereg {
    bus_health_check *me;
    bus_health_check *other;
    int rv_self;
    int rv_other;
    atomic_int calls;
} selfdereg;

static bus_health_status
deregistering_check(void *opaque, char *msg, size_t len)
{
    selfdereg *s = opaque;

    (void)msg;
    (void)len;
    atomic_fetch_add(&s->calls, 1);
    if (s->other != NULL)
        s->rv_other = bus_health_deregister(s->other);
    s->rv_self = bus_health_deregister(s->me);
    return BUS_HEALTH_DEGRADED;
}

static void
test_check_may_deregister_itself_and_others(void **state)
{
    bus_health *h = open_health();
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    selfdereg st, si;
    bus_health_report *r;
    int pass;

    (void)state;
    memset(&st, 0, sizeof(st));
    memset(&si, 0, sizeof(si));
    for (pass = 0; pass < 2; pass++) {
        selfdereg *s = pass == 0 ? &st : &si;
        /* "other" is reported by the same run: an inline check must not
         * wait for the reference its own run holds. */
        s->other = add_check(h, "other", fixed_check, &ok, 0, pass == 1, 0);
        s->me =
            add_check(h, "self", deregistering_check, s, 0, pass == 1, 1000);
        assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
        bus_health_report_free(r);
        assert_int_equal(s->rv_self, BUS_OK);
        assert_int_equal(s->rv_other, BUS_OK);
        assert_int_equal(atomic_load(&s->calls), 1);
        assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
        assert_int_equal(r->nchecks, 0);
        bus_health_report_free(r);
    }
    bus_health_close(h);
}

/* ---- Close --------------------------------------------------------------- */

/* An open and close joins abandoned threads that have exited. */
static int
allocs_back_to(void *arg)
{
    bus_health *h;

    assert_int_equal(bus_health_open(&h, NULL), BUS_OK);
    bus_health_close(h);
    return atomic_load(&live_allocs) == *(long *)arg;
}

static void
test_close_abandons_hung_check(void **state)
{
    bus_health_config hc;
    bus_health *h;
    blocker b;
    bus_health_report *r;
    long baseline = atomic_load(&live_allocs);
    uint64_t t0, took;

    (void)state;
    memset(&b, 0, sizeof(b));
    bus_health_config_init(&hc);
    hc.close_timeout_ms = 100;
    assert_int_equal(bus_health_open(&h, &hc), BUS_OK);
    add_check(h, "hung", blocking_check, &b, 0, false, 50);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    bus_health_report_free(r);
    t0 = bus__clock_mono_ns();
    bus_health_close(h);
    took = bus__clock_mono_ns() - t0;
    assert_true(took >= 100 * MS);
    assert_true(took < 2000 * MS);
    assert_true(atomic_load(&live_allocs) > baseline); /* still alive */
    /* When the call returns, the thread frees its check and the registry
     * (the last reference); a later open or close joins it (TSan checks
     * that no thread is left unjoined). */
    atomic_store(&b.release, true);
    assert_true(bt_wait_for(allocs_back_to, &baseline, 5000));
}

/* ---- JSON ---------------------------------------------------------------- */

static void
test_json_is_valid_escaped_and_complete(void **state)
{
    bus_health *h = open_health();
    fixed nasty = {BUS_HEALTH_DEGRADED,
                   "quote \" backslash \\ newline \n tab \t bell \x07 "
                   "caf\xc3\xa9 bad \xff cut \xe2\x82"};
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    blocker b;
    bus_health_report *r;
    json_t *root, *checks, *c, *v;
    json_error_t jerr;
    char *text;
    size_t len, i;

    (void)state;
    memset(&b, 0, sizeof(b));
    add_check(h, "name \"with\" quotes", fixed_check, &nasty,
              BUS_HEALTH_READINESS, true, 0);
    add_check(h, "live.only", fixed_check, &ok, BUS_HEALTH_LIVENESS, false, 0);
    add_check(h, "hung", blocking_check, &b, 0, false, 30);
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(bus_health_report_json_alloc(r, &text, &len), BUS_OK);
    assert_int_equal(strlen(text), len);

    root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        print_error("json: %s at %d: %s\n", jerr.text, jerr.position, text);
        fail();
    }
    assert_string_equal(json_string_value(json_object_get(root, "status")),
                        "unhealthy");
    assert_string_equal(json_string_value(json_object_get(root, "liveness")),
                        "unhealthy");
    assert_string_equal(json_string_value(json_object_get(root, "readiness")),
                        "unhealthy");
    assert_true(json_is_number(json_object_get(root, "duration_ms")));
    assert_true(json_is_integer(json_object_get(root, "timestamp_ms")));
    checks = json_object_get(root, "checks");
    assert_true(json_is_array(checks));
    assert_int_equal(json_array_size(checks), 3);
    json_array_foreach(checks, i, c)
    {
        assert_true(json_is_string(json_object_get(c, "name")));
        assert_true(json_is_string(json_object_get(c, "status")));
        assert_true(json_is_string(json_object_get(c, "message")));
        assert_true(json_is_number(json_object_get(c, "duration_ms")));
        assert_true(json_is_array(json_object_get(c, "views")));
        assert_true(json_is_boolean(json_object_get(c, "timed_out")));
        assert_string_equal(json_string_value(json_object_get(c, "name")),
                            r->checks[i].name);
    }
    c = json_array_get(checks, 0);
    assert_string_equal(json_string_value(json_object_get(c, "name")),
                        "name \"with\" quotes");
    /* Valid text round-trips; invalid bytes became U+FFFD. */
    assert_string_equal(json_string_value(json_object_get(c, "message")),
                        "quote \" backslash \\ newline \n tab \t bell \x07 "
                        "caf\xc3\xa9 bad \xef\xbf\xbd cut "
                        "\xef\xbf\xbd\xef\xbf\xbd");
    v = json_object_get(c, "views");
    assert_int_equal(json_array_size(v), 1);
    assert_string_equal(json_string_value(json_array_get(v, 0)), "readiness");
    c = json_array_get(checks, 2);
    assert_true(json_is_true(json_object_get(c, "timed_out")));
    assert_true(json_number_value(json_object_get(c, "duration_ms")) >= 30);
    v = json_object_get(c, "views");
    assert_int_equal(json_array_size(v), 2);
    json_decref(root);
    bus_health_text_free(text);
    bus_health_report_free(r);

    /* Only the requested view's aggregate appears. */
    assert_int_equal(bus_health_run(h, BUS_HEALTH_LIVENESS, &r), BUS_OK);
    assert_int_equal(bus_health_report_json_alloc(r, &text, NULL), BUS_OK);
    root = json_loads(text, 0, &jerr);
    assert_non_null(root);
    assert_non_null(json_object_get(root, "liveness"));
    assert_null(json_object_get(root, "readiness"));
    json_decref(root);
    bus_health_text_free(text);
    bus_health_report_free(r);

    atomic_store(&b.release, true);
    bus_health_close(h);
}

static void
test_json_caller_buffer(void **state)
{
    bus_health *h = open_health();
    bus_health_report *r;
    char small[8], big[512];
    size_t len = 0, len2 = 0;
    json_t *root;
    json_error_t jerr;

    (void)state;
    assert_int_equal(bus_health_run(h, 0, &r), BUS_OK);
    assert_int_equal(bus_health_report_json(r, small, sizeof(small), &len),
                     BUS_ENOBUFS);
    assert_int_equal(strlen(small), sizeof(small) - 1);
    assert_int_equal(bus_health_report_json(r, NULL, 0, &len2), BUS_ENOBUFS);
    assert_int_equal(len, len2);
    assert_int_equal(bus_health_report_json(r, big, sizeof(big), &len2),
                     BUS_OK);
    assert_int_equal(strlen(big), len);
    root = json_loads(big, 0, &jerr);
    assert_non_null(root);
    assert_int_equal(json_array_size(json_object_get(root, "checks")), 0);
    json_decref(root);
    assert_int_equal(bus_health_report_json(NULL, big, 1, NULL), BUS_EINVAL);
    bus_health_report_free(r);
    bus_health_report_free(NULL);
    bus_health_close(h);
}

/* ---- Concurrency --------------------------------------------------------- */

typedef struct exclusive {
    atomic_int in_fn;
    atomic_int overlaps;
    atomic_int calls;
} exclusive;

static bus_health_status
exclusive_check(void *opaque, char *msg, size_t len)
{
    exclusive *e = opaque;

    (void)msg;
    (void)len;
    if (atomic_fetch_add(&e->in_fn, 1) != 0)
        atomic_fetch_add(&e->overlaps, 1);
    atomic_fetch_add(&e->calls, 1);
    bus__sleep_ns(200000); /* widen the window */
    atomic_fetch_sub(&e->in_fn, 1);
    return BUS_HEALTH_HEALTHY;
}

typedef struct conc {
    bus_health *h;
    bus_health_check *manual;
    atomic_bool stop;
    atomic_int runs;
} conc;

static void
conc_runner(void *arg)
{
    conc *x = arg;
    int i;

    for (i = 0; i < 30; i++) {
        bus_health_report *r;
        char *text;
        assert_int_equal(bus_health_run(x->h, (unsigned)(i % 3) + 1, &r),
                         BUS_OK);
        assert_int_equal(bus_health_report_json_alloc(r, &text, NULL), BUS_OK);
        bus_health_text_free(text);
        bus_health_report_free(r);
        atomic_fetch_add(&x->runs, 1);
    }
}

static void
conc_churn(void *arg)
{
    conc *x = arg;
    fixed ok = {BUS_HEALTH_HEALTHY, NULL};
    int i = 0;

    while (!atomic_load(&x->stop)) {
        bus_health_check *c =
            add_check(x->h, "churn", fixed_check, &ok, 0, (i & 1) != 0, 0);
        assert_int_equal(bus_health_check_set(x->manual,
                                              (bus_health_status)(i % 3),
                                              "flip %d", i),
                         BUS_OK);
        assert_int_equal(bus_health_deregister(c), BUS_OK);
        i++;
    }
}

static void
test_concurrent_runs_share_calls(void **state)
{
    exclusive et, ei;
    conc x;
    bus__thread th[4], churn;
    bus_health_check_config cc;
    int i;

    (void)state;
    memset(&et, 0, sizeof(et));
    memset(&ei, 0, sizeof(ei));
    memset(&x, 0, sizeof(x));
    x.h = open_health();
    add_check(x.h, "exclusive.threaded", exclusive_check, &et, 0, false, 0);
    add_check(x.h, "exclusive.inline", exclusive_check, &ei, 0, true, 0);
    bus_health_check_config_init(&cc);
    cc.name = "manual";
    assert_int_equal(bus_health_register(x.h, &cc, &x.manual), BUS_OK);
    assert_int_equal(bus__thread_start(&churn, "churn", conc_churn, &x),
                     BUS_OK);
    for (i = 0; i < 4; i++)
        assert_int_equal(bus__thread_start(&th[i], "run", conc_runner, &x),
                         BUS_OK);
    for (i = 0; i < 4; i++)
        bus__thread_join(&th[i]);
    atomic_store(&x.stop, true);
    bus__thread_join(&churn);
    assert_int_equal(atomic_load(&x.runs), 120);
    /* Never concurrently with itself, and calls are shared between runs
     * in flight together (fewer calls than runs is allowed, none more). */
    assert_int_equal(atomic_load(&et.overlaps), 0);
    assert_int_equal(atomic_load(&ei.overlaps), 0);
    assert_true(atomic_load(&et.calls) >= 1 && atomic_load(&et.calls) <= 120);
    assert_true(atomic_load(&ei.calls) >= 1 && atomic_load(&ei.calls) <= 120);
    bus_health_close(x.h);
}

/* ---- Allocation faults --------------------------------------------------- */

static int
fault_scenario(void)
{
    bus_health *h = NULL;
    bus_health_check_config cc;
    bus_health_check *t = NULL;
    bus_health_report *r = NULL;
    fixed ok = {BUS_HEALTH_DEGRADED, "m"};
    char *text = NULL;
    int rv;

    if ((rv = bus_health_open(&h, NULL)) != BUS_OK)
        return rv;
    bus_health_check_config_init(&cc);
    cc.name = "threaded";
    cc.fn = fixed_check;
    cc.opaque = &ok;
    if ((rv = bus_health_register(h, &cc, &t)) != BUS_OK)
        goto out;
    cc.name = "inline";
    cc.run_inline = true;
    if ((rv = bus_health_register(h, &cc, NULL)) != BUS_OK)
        goto out;
    cc.name = "manual";
    cc.fn = NULL;
    if ((rv = bus_health_register(h, &cc, NULL)) != BUS_OK)
        goto out;
    if ((rv = bus_health_run(h, 0, &r)) != BUS_OK)
        goto out;
    assert_int_equal(r->nchecks, 3);
    assert_int_equal(r->status, BUS_HEALTH_DEGRADED);
    if ((rv = bus_health_report_json_alloc(r, &text, NULL)) != BUS_OK)
        goto out;
    assert_non_null(strstr(text, "\"status\":\"degraded\""));
    rv = bus_health_deregister(t);
    assert_int_equal(rv, BUS_OK);
out:
    bus_health_text_free(text);
    bus_health_report_free(r);
    bus_health_close(h);
    return rv;
}

static void
test_allocation_faults(void **state)
{
    uint64_t n;
    int persistent, rv;

    (void)state;
    for (persistent = 0; persistent < 2; persistent++) {
        for (n = 1;; n++) {
            bus_fault_alloc_fail_nth(n, persistent != 0);
            rv = fault_scenario();
            bus_fault_alloc_fail_nth(0, false);
            if (rv == BUS_OK)
                break;
            assert_int_equal(rv, BUS_ENOMEM);
            assert_true(n < 100);
        }
        assert_true(n > 5);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_status_threaded_inline_and_manual),
        cmocka_unit_test(test_views_aggregate_separately),
        cmocka_unit_test(
            test_threaded_timeout_returns_in_time_and_discards_late_result),
        cmocka_unit_test(test_inline_overrun_is_unhealthy),
        cmocka_unit_test(test_registration_errors),
        cmocka_unit_test(test_deregister_removes_and_frees_the_name),
        cmocka_unit_test(test_deregister_hung_check_times_out),
        cmocka_unit_test(test_check_may_deregister_itself_and_others),
        cmocka_unit_test(test_close_abandons_hung_check),
        cmocka_unit_test(test_json_is_valid_escaped_and_complete),
        cmocka_unit_test(test_json_caller_buffer),
        cmocka_unit_test(test_concurrent_runs_share_calls),
        cmocka_unit_test(test_allocation_faults),
    };

    /* Process state, set before any other libbus call (common.h). */
    assert_int_equal(bus_allocator_set(&counting), BUS_OK);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
