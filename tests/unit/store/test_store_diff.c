/*
 * Differential test: random operations (append with every kind of expected
 * version, idempotent retries, multi-stream appends, reads of streams and
 * of $all with filters both ways, soft and hard deletes, retention rules,
 * scavenge, reopen) run against the store and against a plain in-memory
 * model; any divergence fails with the seed (BUS_TEST_SEED replays it).
 * Some events are made long before they are appended (their ids are below
 * the store's: the id index's 'e' records), and retries reach back to
 * older appends (ids in runs, in the writer's tail, across reopens).
 */
#include "store_test.h"

#define NSTREAMS 6
#define NTYPES 3
#define MAX_EV 4096

static const char *names[NSTREAMS] = {"a", "b", "x-1", "x-2", "x-3", "y"};
static const char *types[NTYPES] = {"t0", "t1", "t2"};

enum { M_NONE, M_LIVE, M_DELETED, M_TOMB };

typedef struct mlog {
    int stream;
    uint64_t ver;
    int type;
    bool present; /* not scavenged */
} mlog;

typedef struct mstream {
    uint64_t last;
    int state;
    uint64_t trunc, max_count;
    uint64_t pos[MAX_EV]; /* position of version v at [v] */
} mstream;

typedef struct model {
    mlog log[MAX_EV * 4];
    uint64_t head;
    mstream st[NSTREAMS];
} model;

static bool
m_has_policy(const mstream *m)
{
    return m->trunc != 0 || m->max_count != 0 || m->state == M_DELETED ||
           m->state == M_TOMB;
}

static bool
m_visible(const mstream *m, uint64_t ver)
{
    if (m->state == M_TOMB)
        return false;
    if (ver < m->trunc)
        return false;
    if (m->max_count != 0 && m->last >= m->max_count &&
        ver <= m->last - m->max_count)
        return false;
    return true;
}

static int
m_check_expected(const mstream *m, uint64_t exp)
{
    bool deleted = m->state == M_DELETED;

    if (m->state == M_TOMB)
        return BUS_EDELETED;
    if (exp == BUS_STORE_ANY)
        return BUS_OK;
    if (exp == BUS_STORE_NO_STREAM)
        return (m->last == 0 || deleted) ? BUS_OK : BUS_ECONFLICT;
    if (exp == BUS_STORE_EXISTS)
        return (m->last > 0 && !deleted) ? BUS_OK : BUS_ECONFLICT;
    return (!deleted && m->last == exp) ? BUS_OK : BUS_ECONFLICT;
}

static uint64_t
pick_expected(uint64_t *rng, const mstream *m)
{
    switch (bt_rand(rng) % 6) {
    case 0:
        return BUS_STORE_ANY;
    case 1:
        return BUS_STORE_NO_STREAM;
    case 2:
        return BUS_STORE_EXISTS;
    case 3:
        return m->last + 1 + bt_rand(rng) % 2; /* wrong */
    default:
        return m->last;
    }
}

/* The last successful append, for an idempotent retry. */
typedef struct last_append {
    bool valid;
    int stream;
    uint64_t expected;
    bus_event *ev[4];
    size_t n;
    bus_store_append_result res;
} last_append;

/* Events made ahead of time: appended later, their ids are stale. */
#define POOL 16
static bus_event *pool[POOL];
static size_t n_pool;

static bus_event *
pool_or_new(uint64_t *rng, const char *type)
{
    bus_event *e;
    size_t i;

    if (n_pool == 0) {
        for (i = 0; i < POOL; i++)
            pool[i] = st_ev("t0", "p");
        n_pool = POOL;
    }
    if (bt_rand(rng) % 4 != 0)
        return st_ev(type, "p");
    /* The pool's events all have type t0: keep the model's type right by
     * making a stale-id copy of the requested type. */
    e = pool[--n_pool];
    {
        bus_event_init init;
        bus_event *c;
        memset(&init, 0, sizeof(init));
        init.type = type;
        init.id = bus_event_id(e);
        init.payload = "p";
        init.payload_len = 1;
        assert_int_equal(bus_event_create(&c, &init), BUS_OK);
        bus_event_unref(e);
        return c;
    }
}

static void
pool_clear(void)
{
    while (n_pool > 0)
        bus_event_unref(pool[--n_pool]);
}

/* Past appends, for retries long after. */
#define HIST 32
typedef struct hist_ent {
    int stream;
    bus_event *ev[4];
    size_t n;
    uint64_t first_position, first_version;
} hist_ent;
static hist_ent hist[HIST];
static size_t hist_next;

static void
hist_add(int k, bus_event *const *ev, size_t n,
         const bus_store_append_result *r)
{
    hist_ent *h = &hist[hist_next++ % HIST];
    size_t i;

    for (i = 0; i < h->n; i++)
        bus_event_unref(h->ev[i]);
    h->stream = k;
    h->n = n;
    h->first_position = r->first_position;
    h->first_version = r->first_version;
    for (i = 0; i < n; i++)
        h->ev[i] = bus_event_ref(ev[i]);
}

static void
hist_clear(void)
{
    size_t i, j;

    for (i = 0; i < HIST; i++) {
        for (j = 0; j < hist[i].n; j++)
            bus_event_unref(hist[i].ev[j]);
        hist[i].n = 0;
    }
    hist_next = 0;
}

/* Retries an older append whose events are all still stored: a
 * duplicate with the original figures. */
static void
op_retry_old(bus_store *s, model *m, uint64_t *rng)
{
    hist_ent *h = &hist[bt_rand(rng) % HIST];
    bus_store_append_result r;
    size_t i;

    if (h->n == 0)
        return;
    for (i = 0; i < h->n; i++)
        if (!m->log[h->first_position + i - 1].present)
            return;
    assert_int_equal(
        bus_store_append(s, names[h->stream], BUS_STORE_ANY, h->ev, h->n, &r),
        BUS_OK);
    assert_true(r.duplicate);
    assert_int_equal(r.first_position, h->first_position);
    assert_int_equal(r.first_version, h->first_version);
}

static void
last_clear(last_append *la)
{
    size_t i;

    for (i = 0; i < la->n; i++)
        bus_event_unref(la->ev[i]);
    la->n = 0;
    la->valid = false;
}

static void
op_append(bus_store *s, model *m, uint64_t *rng, last_append *la)
{
    int k = (int)(bt_rand(rng) % NSTREAMS), rv, want;
    mstream *ms = &m->st[k];
    uint64_t exp = pick_expected(rng, ms);
    size_t n = bt_rand(rng) % 5, i;
    bus_event *ev[4];
    int ty[4];
    bus_store_append_result r;

    if (n > 4)
        n = 4;
    for (i = 0; i < n; i++) {
        ty[i] = (int)(bt_rand(rng) % NTYPES);
        ev[i] = pool_or_new(rng, types[ty[i]]);
    }
    want = m_check_expected(ms, exp);
    rv = bus_store_append(s, names[k], exp, ev, n, &r);
    if (rv != want)
        fprintf(stderr, "append %s exp %llu n %zu: %s, model %s\n", names[k],
                (unsigned long long)exp, n, bus_err_name(rv),
                bus_err_name(want));
    assert_int_equal(rv, want);
    if (rv == BUS_ECONFLICT)
        assert_int_equal(r.current_version, ms->last);
    if (rv == BUS_OK && n > 0) {
        assert_int_equal(r.first_version, ms->last + 1);
        assert_int_equal(r.first_position, m->head + 1);
        for (i = 0; i < n; i++) {
            mlog *l = &m->log[m->head];
            assert_true(ms->last + 1 < MAX_EV);
            l->stream = k;
            l->ver = ++ms->last;
            l->type = ty[i];
            l->present = true;
            ms->pos[ms->last] = ++m->head;
        }
        ms->state = M_LIVE;
        hist_add(k, ev, n, &r);
        last_clear(la);
        la->valid = true;
        la->stream = k;
        la->expected = exp;
        la->n = n;
        la->res = r;
        for (i = 0; i < n; i++)
            la->ev[i] = bus_event_ref(ev[i]);
    }
    for (i = 0; i < n; i++)
        bus_event_unref(ev[i]);
}

static void
op_retry(bus_store *s, model *m, last_append *la)
{
    bus_store_append_result r;
    int rv;

    if (!la->valid)
        return;
    /* Retry of the last append: idempotent while nothing removed its
     * events; with an exact expected version it must still match. */
    rv =
        bus_store_append(s, names[la->stream], la->expected, la->ev, la->n, &r);
    assert_int_equal(rv, BUS_OK);
    assert_true(r.duplicate);
    assert_int_equal(r.first_position, la->res.first_position);
    assert_int_equal(r.last_version, la->res.last_version);
    (void)m;
}

static void
op_multi(bus_store *s, model *m, uint64_t *rng)
{
    int k1 = (int)(bt_rand(rng) % NSTREAMS);
    int k2 = (int)(bt_rand(rng) % NSTREAMS);
    uint64_t e1 = pick_expected(rng, &m->st[k1]), e2;
    bus_event *a = st_ev(types[0], "m1"), *b = st_ev(types[1], "m2");
    bus_store_append_req req[2] = {{names[k1], 0, &a, 1},
                                   {names[k2], 0, &b, 1}};
    bus_store_append_result res[2];
    mstream t1 = m->st[k1];
    int want, rv;

    /* The second part sees the first when both name one stream. */
    want = m_check_expected(&t1, e1);
    if (k1 == k2 && want == BUS_OK) {
        t1.last++;
        t1.state = M_LIVE;
    }
    e2 = pick_expected(rng, k1 == k2 ? &t1 : &m->st[k2]);
    if (want == BUS_OK)
        want = m_check_expected(k1 == k2 ? &t1 : &m->st[k2], e2);
    req[0].expected_version = e1;
    req[1].expected_version = e2;
    rv = bus_store_append_multi(s, req, 2, res);
    assert_int_equal(rv, want);
    if (rv == BUS_OK) {
        int ks[2] = {k1, k2}, j;
        for (j = 0; j < 2; j++) {
            mstream *ms = &m->st[ks[j]];
            mlog *l = &m->log[m->head];
            l->stream = ks[j];
            l->ver = ++ms->last;
            l->type = j;
            l->present = true;
            ms->pos[ms->last] = ++m->head;
            ms->state = M_LIVE;
            assert_int_equal(res[j].first_position, m->head);
        }
    }
    bus_event_unref(a);
    bus_event_unref(b);
}

static void
build_filter(uint64_t *rng, bus_store_filter *f, const char **tl, bool *tmask)
{
    int i, n = 0;

    memset(f, 0, sizeof(*f));
    for (i = 0; i < NTYPES; i++)
        tmask[i] = true;
    if (bt_rand(rng) % 3 == 0)
        f->stream_prefix = "x-";
    if (bt_rand(rng) % 3 == 0) {
        for (i = 0; i < NTYPES; i++) {
            tmask[i] = bt_rand(rng) % 2 == 0;
            if (tmask[i])
                tl[n++] = types[i];
        }
        tl[n] = NULL;
        f->types = tl;
    }
}

static void
op_read_stream(bus_store *s, model *m, uint64_t *rng)
{
    int k = (int)(bt_rand(rng) % NSTREAMS);
    mstream *ms = &m->st[k];
    bool fwd = bt_rand(rng) % 2 == 0, tmask[NTYPES], stop_limit = false;
    size_t max = 1 + bt_rand(rng) % 6, count = 0, scanned = 0;
    uint64_t from, lo = 1, v, next, expect_ver[64];
    const char *tl[NTYPES + 1];
    bus_store_filter f;
    bus_store_slice sl;
    size_t i;

    memset(&sl, 0, sizeof(sl));
    build_filter(rng, &f, tl, tmask);
    from = bt_rand(rng) % (ms->last + 3);
    if (!fwd && bt_rand(rng) % 2 == 0)
        from = BUS_STORE_END;
    assert_int_equal(
        bus_store_read_stream(s, names[k], from,
                              fwd ? BUS_STORE_FORWARD : BUS_STORE_BACKWARD, max,
                              &f, &sl),
        BUS_OK);
    if (ms->state == M_TOMB) {
        assert_int_equal(sl.status, BUS_STORE_READ_DELETED);
        assert_int_equal(sl.count, 0);
        goto out;
    }
    if (ms->state != M_LIVE) {
        assert_int_equal(sl.status, BUS_STORE_READ_NO_STREAM);
        assert_int_equal(sl.count, 0);
        goto out;
    }
    assert_int_equal(sl.status, BUS_STORE_READ_OK);
    if (ms->trunc > lo)
        lo = ms->trunc;
    if (ms->max_count != 0 && ms->last >= ms->max_count &&
        ms->last - ms->max_count + 1 > lo)
        lo = ms->last - ms->max_count + 1;
    if (fwd) {
        v = from < lo ? lo : from;
        next = v;
        for (; v <= ms->last; v++) {
            /* Versions a scavenge removed are gone even if a later rule
             * would show them: skipped, not examined. */
            if (!m->log[ms->pos[v] - 1].present)
                continue;
            if (count >= max || scanned >= max * 64) {
                stop_limit = true;
                break;
            }
            scanned++;
            next = v + 1;
            if (tmask[m->log[ms->pos[v] - 1].type])
                expect_ver[count++] = v;
        }
        if (sl.next != next || sl.end != !stop_limit)
            fprintf(stderr,
                    "read %s fwd from %llu max %zu lo %llu last "
                    "%llu: next %llu end %d, model %llu %d (count %zu/%zu)\n",
                    names[k], (unsigned long long)from, max,
                    (unsigned long long)lo, (unsigned long long)ms->last,
                    (unsigned long long)sl.next, sl.end,
                    (unsigned long long)next, !stop_limit, sl.count, count);
        if (sl.next != next) {
            bus_store_stream_info info;
            bus_store_stream_info_get(s, names[k], &info);
            fprintf(stderr,
                    "  store: last %llu trunc %llu maxc %llu; model trunc %llu "
                    "maxc %llu state %d\n",
                    (unsigned long long)info.last_version,
                    (unsigned long long)info.meta.truncate_before,
                    (unsigned long long)info.meta.max_count,
                    (unsigned long long)ms->trunc,
                    (unsigned long long)ms->max_count, ms->state);
        }
        if (sl.next != next)
            for (i = 0; i < sl.count; i++)
                fprintf(
                    stderr, "  got v%llu %s, model v%llu type %d\n",
                    (unsigned long long)bus_event_stream_version(sl.events[i]),
                    bus_event_type(sl.events[i]),
                    (unsigned long long)expect_ver[i],
                    m->log[ms->pos[expect_ver[i]] - 1].type);
        assert_int_equal(sl.end, !stop_limit);
        assert_int_equal(sl.next, next);
    } else {
        v = from > ms->last ? ms->last : from;
        for (; v >= lo && v > 0; v--) {
            if (!m->log[ms->pos[v] - 1].present)
                continue;
            if (count >= max || scanned >= max * 64) {
                stop_limit = true;
                break;
            }
            scanned++;
            if (tmask[m->log[ms->pos[v] - 1].type])
                expect_ver[count++] = v;
        }
        assert_int_equal(sl.end, !stop_limit);
    }
    if (sl.count != count)
        fprintf(stderr,
                "read %s %s from %llu max %zu: %zu events, model "
                "%zu\n",
                names[k], fwd ? "fwd" : "bwd", (unsigned long long)from, max,
                sl.count, count);
    assert_int_equal(sl.count, count);
    for (i = 0; i < count; i++) {
        assert_int_equal(bus_event_stream_version(sl.events[i]), expect_ver[i]);
        assert_int_equal(bus_event_position(sl.events[i]),
                         ms->pos[expect_ver[i]]);
    }
    assert_int_equal(sl.last, ms->last);
out:
    bus_store_slice_free(&sl);
}

static void
op_read_all(bus_store *s, model *m, uint64_t *rng)
{
    bool fwd = bt_rand(rng) % 2 == 0, tmask[NTYPES];
    size_t max = 1 + bt_rand(rng) % 8, count = 0, scanned = 0, i;
    uint64_t from = bt_rand(rng) % (m->head + 3), p, expect_pos[64];
    uint64_t last_examined = 0;
    const char *tl[NTYPES + 1];
    bus_store_filter f;
    bus_store_slice sl;
    bool more = false;

    memset(&sl, 0, sizeof(sl));
    build_filter(rng, &f, tl, tmask);
    if (!fwd && bt_rand(rng) % 2 == 0)
        from = BUS_STORE_END;
    assert_int_equal(bus_store_read_all(
                         s, from, fwd ? BUS_STORE_FORWARD : BUS_STORE_BACKWARD,
                         max, &f, &sl),
                     BUS_OK);
    p = fwd ? (from == 0 ? 1 : from)
            : (from == BUS_STORE_END || from > m->head ? m->head : from);
    while (p >= 1 && p <= m->head) {
        const mlog *l = &m->log[p - 1];
        if (l->present) {
            if (count >= max || scanned >= max * 64) {
                more = true;
                break;
            }
            scanned++;
            last_examined = p;
            if ((f.stream_prefix == NULL ||
                 strncmp(names[l->stream], "x-", 2) == 0) &&
                tmask[l->type] && m_visible(&m->st[l->stream], l->ver))
                expect_pos[count++] = p;
        }
        p = fwd ? p + 1 : p - 1;
    }
    if (sl.count != count)
        fprintf(stderr, "read $all %s from %llu max %zu: %zu, model %zu\n",
                fwd ? "fwd" : "bwd", (unsigned long long)from, max, sl.count,
                count);
    assert_int_equal(sl.count, count);
    for (i = 0; i < count; i++)
        assert_int_equal(bus_event_position(sl.events[i]), expect_pos[i]);
    assert_int_equal(sl.end, !more || (!fwd && last_examined == 1));
    if (scanned > 0)
        assert_int_equal(sl.next, fwd ? last_examined + 1 : last_examined - 1);
    bus_store_slice_free(&sl);
}

static void
op_delete(bus_store *s, model *m, uint64_t *rng, bool hard)
{
    int k = (int)(bt_rand(rng) % NSTREAMS), want, rv;
    mstream *ms = &m->st[k];
    uint64_t exp = pick_expected(rng, ms);

    want = m_check_expected(ms, exp);
    if (want == BUS_OK && !hard && ms->state != M_LIVE)
        want = BUS_ENOTFOUND;
    rv = bus_store_stream_delete(s, names[k], exp, hard);
    if (rv != want)
        fprintf(stderr, "delete %s hard %d exp %llu: %s model %s\n", names[k],
                hard, (unsigned long long)exp, bus_err_name(rv),
                bus_err_name(want));
    assert_int_equal(rv, want);
    if (rv != BUS_OK)
        return;
    if (hard) {
        ms->state = M_TOMB;
    } else {
        ms->state = M_DELETED;
        if (ms->last + 1 > ms->trunc)
            ms->trunc = ms->last + 1;
    }
}

static void
op_meta(bus_store *s, model *m, uint64_t *rng)
{
    int k = (int)(bt_rand(rng) % NSTREAMS), rv;
    mstream *ms = &m->st[k];
    bus_store_stream_meta meta = {0, 0, 0};

    if (bt_rand(rng) % 2)
        meta.max_count = 1 + bt_rand(rng) % 6;
    if (bt_rand(rng) % 2)
        meta.truncate_before = bt_rand(rng) % (ms->last + 2);
    rv = bus_store_stream_set_meta(s, names[k], &meta);
    assert_int_equal(rv, ms->state == M_TOMB ? BUS_EDELETED : BUS_OK);
    if (rv != BUS_OK)
        return;
    ms->max_count = meta.max_count;
    if (meta.truncate_before > ms->trunc)
        ms->trunc = meta.truncate_before;
}

static void
op_scavenge(bus_store *s, model *m)
{
    bus_store_scavenge_stats st;
    uint64_t removed = 0, p;

    assert_int_equal(bus_store_scavenge(s, false, &st), BUS_OK);
    for (p = 1; p <= m->head; p++) {
        mlog *l = &m->log[p - 1];
        mstream *ms = &m->st[l->stream];
        uint64_t cut;
        if (!l->present || !m_has_policy(ms))
            continue;
        if (ms->state == M_TOMB) {
            cut = UINT64_MAX;
        } else {
            cut = ms->trunc > 1 ? ms->trunc : 1;
            if (ms->max_count != 0 && ms->last >= ms->max_count &&
                ms->last - ms->max_count + 1 > cut)
                cut = ms->last - ms->max_count + 1;
        }
        if (l->ver < cut) {
            l->present = false;
            removed++;
        }
    }
    assert_int_equal(st.events_removed, removed);
    st_verify_ok(s); /* index runs and records still agree */
}

static void
op_info(bus_store *s, model *m, uint64_t *rng)
{
    int k = (int)(bt_rand(rng) % NSTREAMS);
    bus_store_stream_info info;
    static const bus_store_stream_state map[] = {
        BUS_STORE_STREAM_NONE, BUS_STORE_STREAM_LIVE, BUS_STORE_STREAM_DELETED,
        BUS_STORE_STREAM_TOMBSTONE};

    assert_int_equal(bus_store_stream_info_get(s, names[k], &info), BUS_OK);
    assert_int_equal(info.last_version, m->st[k].last);
    assert_int_equal(info.state, map[m->st[k].state]);
    assert_int_equal(info.meta.max_count, m->st[k].max_count);
    assert_int_equal(info.meta.truncate_before, m->st[k].trunc);
}

static void
test_store_matches_model(void **state)
{
    st_fix *f = *state;
    model *m = calloc(1, sizeof(*m));
    uint64_t rng = bt_seed();
    const char *env = getenv("BUS_DIFF_OPS");
    int ops = env != NULL ? atoi(env) : 3000, i;
    last_append la;

    assert_non_null(m);
    memset(&la, 0, sizeof(la));
    for (i = 0; i < ops && m->head + 8 < MAX_EV; i++) {
        uint64_t r = bt_rand(&rng) % 100;
        if (r < 30)
            op_append(f->s, m, &rng, &la);
        else if (r < 34) {
            op_retry(f->s, m, &la);
            op_retry_old(f->s, m, &rng);
        } else if (r < 40)
            op_multi(f->s, m, &rng);
        else if (r < 58)
            op_read_stream(f->s, m, &rng);
        else if (r < 76)
            op_read_all(f->s, m, &rng);
        else if (r < 80)
            op_delete(f->s, m, &rng, false);
        else if (r < 81)
            op_delete(f->s, m, &rng, true);
        else if (r < 87)
            op_meta(f->s, m, &rng);
        else if (r < 90)
            op_scavenge(f->s, m);
        else if (r < 98)
            op_info(f->s, m, &rng);
        else
            st_reopen(f);
        if (r >= 30 && r < 34)
            continue;
        if (r >= 40 || bt_rand(&rng) % 4 == 0)
            last_clear(&la); /* retries only right after their append */
    }
    assert_int_equal(bus_store_head(f->s), m->head);
    st_verify_ok(f->s);
    fprintf(stderr, "# %d operations, %llu events\n", i,
            (unsigned long long)m->head);
    last_clear(&la);
    pool_clear();
    hist_clear();
    free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_store_matches_model, st_setup,
                                        st_teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
