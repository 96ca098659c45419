/* bus_store_open/close: creation, the format record, refusing what is not
 * a store, newer formats and corruption, and injected faults. */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <rocksdb/c.h>

#include "store_test.h"
#include "testing.h"

static int
open_at(const char *path, bool create, bus_store **s, char *err, size_t len)
{
    bus_store_config cfg;

    bus_store_config_init(&cfg);
    cfg.path = path;
    cfg.create_if_missing = create;
    cfg.durability = BUS_STORE_NONE;
    return bus_store_open(s, &cfg, err, len);
}

static void
test_config_init_fills_defaults(void **state)
{
    bus_store_config cfg;

    (void)state;
    bus_store_config_init(&cfg);
    assert_int_equal(cfg.size, sizeof(cfg));
    assert_int_equal(cfg.durability, BUS_STORE_GROUP);
    assert_true(cfg.block_cache_bytes > 0);
    assert_true(cfg.max_append_events > 0);
    assert_null(cfg.path);
    assert_false(cfg.create_if_missing);
}

static void
test_zeroed_config_with_path_opens(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open");
    bus_store_config cfg;
    bus_store *s;

    (void)state;
    memset(&cfg, 0, sizeof(cfg)); /* zero means default, size 0 too */
    cfg.path = dir;
    cfg.create_if_missing = true;
    assert_int_equal(bus_store_open(&s, &cfg, NULL, 0), BUS_OK);
    assert_int_equal(bus_store_head(s), 0);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_create_then_reopen_keeps_events(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open");
    bus_store *s;
    bus_store_append_result res;

    (void)state;
    s = st_open_dir(dir, BUS_STORE_GROUP);
    assert_int_equal(st_append_n(s, "a", BUS_STORE_NO_STREAM, "t", 3, &res),
                     BUS_OK);
    bus_store_close(s);
    s = st_open_dir(dir, BUS_STORE_GROUP);
    assert_int_equal(bus_store_head(s), 3);
    assert_int_equal(st_last_version(s, "a"), 3);
    /* Versions and positions continue after a reopen. */
    assert_int_equal(st_append_n(s, "a", 3, "t", 1, &res), BUS_OK);
    assert_int_equal(res.first_version, 4);
    assert_int_equal(res.first_position, 4);
    st_verify_ok(s);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_missing_path_without_create_is_notfound(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), path[512], err[256];
    bus_store *s = (bus_store *)1;

    (void)state;
    snprintf(path, sizeof(path), "%s/nope", dir);
    assert_int_equal(open_at(path, false, &s, err, sizeof(err)), BUS_ENOTFOUND);
    assert_null(s);
    assert_non_null(strstr(err, "no store"));
    /* An empty directory is no store either. */
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_ENOTFOUND);
    bt_rmtree(dir);
    free(dir);
}

static void
test_file_or_foreign_dir_is_not_a_store(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), path[512], err[256];
    bus_store *s;
    int fd;

    (void)state;
    snprintf(path, sizeof(path), "%s/file", dir);
    fd = open(path, O_CREAT | O_WRONLY, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "x", 1), 1);
    close(fd);
    assert_int_equal(open_at(path, true, &s, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "not a libbus store"));
    /* A directory with other files: refused, and nothing written to it. */
    assert_int_equal(open_at(dir, true, &s, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "not a libbus store"));
    snprintf(path, sizeof(path), "%s/CURRENT", dir);
    assert_int_not_equal(access(path, F_OK), 0);
    bt_rmtree(dir);
    free(dir);
}

/* Writes key/value into the default family of the RocksDB at dir. */
static void
raw_put_default(const char *dir, const char *key, const void *val, size_t vlen,
                bool create)
{
    rocksdb_options_t *o = rocksdb_options_create();
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    char *err = NULL, **names;
    size_t n = 0, i;
    rocksdb_t *db;

    rocksdb_options_set_create_if_missing(o, create);
    if (create) {
        db = rocksdb_open(o, dir, &err);
        assert_null(err);
        rocksdb_put(db, wo, key, strlen(key), val, vlen, &err);
        assert_null(err);
        rocksdb_close(db);
    } else {
        const rocksdb_options_t *oo[16];
        rocksdb_column_family_handle_t *h[16];
        names = rocksdb_list_column_families(o, dir, &n, &err);
        assert_null(err);
        assert_true(n <= 16);
        for (i = 0; i < n; i++)
            oo[i] = o;
        db = rocksdb_open_column_families(
            o, dir, (int)n, (const char *const *)names, oo, h, &err);
        assert_null(err);
        rocksdb_put(db, wo, key, strlen(key), val, vlen, &err);
        assert_null(err);
        for (i = 0; i < n; i++)
            rocksdb_column_family_handle_destroy(h[i]);
        rocksdb_close(db);
        rocksdb_list_column_families_destroy(names, n);
    }
    rocksdb_writeoptions_destroy(wo);
    rocksdb_options_destroy(o);
}

static void
test_foreign_rocksdb_is_not_a_store(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    bus_store *s;

    (void)state;
    raw_put_default(dir, "hello", "world", 5, true);
    assert_int_equal(open_at(dir, true, &s, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "format"));
    bt_rmtree(dir);
    free(dir);
}

static void
test_newer_format_is_eversion(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    uint8_t v[4] = {0, 0, 0, BUS_STORE_FORMAT_VERSION + 100};
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);

    (void)state;
    bus_store_close(s);
    raw_put_default(dir, "format", v, 4, false);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_EVERSION);
    assert_non_null(strstr(err, "newer"));
    bt_rmtree(dir);
    free(dir);
}

/* Format 1 (one id-index record per event) predates any release: it is
 * refused rather than misread. */
static void
test_older_format_is_eversion(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    uint8_t v[4] = {0, 0, 0, 1};
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);

    (void)state;
    bus_store_close(s);
    raw_put_default(dir, "format", v, 4, false);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_EVERSION);
    assert_non_null(strstr(err, "cannot read"));
    bt_rmtree(dir);
    free(dir);
}

static void
test_bad_format_record_is_corrupt(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);

    (void)state;
    bus_store_close(s);
    raw_put_default(dir, "format", "xyz", 3, false);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_ECORRUPT);
    bt_rmtree(dir);
    free(dir);
}

/* The id index's watermark (store_impl.h): malformed, or lowered below
 * events that its runs already hold, is damage, not a store to guess at. */
static void
test_id_index_watermark_damage_is_corrupt(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    static const uint8_t zero[8];
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);

    (void)state;
    assert_int_equal(st_append_n(s, "a", BUS_STORE_ANY, "t", 3, NULL), BUS_OK);
    bus_store_close(s); /* the tail goes into a run, the watermark to 3 */
    raw_put_default(dir, "idx", "xyz", 3, false);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_ECORRUPT);
    raw_put_default(dir, "idx", zero, 8, false);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_ECORRUPT);
    bt_rmtree(dir);
    free(dir);
}

static void
test_damaged_manifest_is_corrupt(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256], path[600];
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);
    FILE *f;
    char cur[256];

    (void)state;
    assert_int_equal(st_append_n(s, "a", BUS_STORE_ANY, "t", 2, NULL), BUS_OK);
    bus_store_close(s);
    /* Overwrite the MANIFEST named by CURRENT with garbage. */
    snprintf(path, sizeof(path), "%s/CURRENT", dir);
    f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(cur, sizeof(cur), f));
    fclose(f);
    cur[strcspn(cur, "\n")] = '\0';
    snprintf(path, sizeof(path), "%s/%s", dir, cur);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("this is not a manifest, not at all, garbage garbage garbage", f);
    fclose(f);
    assert_int_equal(open_at(dir, false, &s, err, sizeof(err)), BUS_ECORRUPT);
    assert_null(s);
    assert_true(strlen(err) > 0);
    bt_rmtree(dir);
    free(dir);
}

static void
test_second_open_is_busy(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[256];
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE), *s2;

    (void)state;
    assert_int_equal(open_at(dir, false, &s2, err, sizeof(err)), BUS_EBUSY);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_bad_config_is_einval(void **state)
{
    bus_store_config cfg;
    bus_store *s;
    char err[128];

    (void)state;
    bus_store_config_init(&cfg);
    assert_int_equal(bus_store_open(&s, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_non_null(strstr(err, "path"));
    cfg.path = "/tmp/x";
    cfg.durability = (bus_store_durability)9;
    assert_int_equal(bus_store_open(&s, &cfg, err, sizeof(err)), BUS_EINVAL);
    assert_int_equal(bus_store_open(&s, NULL, err, sizeof(err)), BUS_EINVAL);
    bus_store_close(NULL);
    bus_store_close_async(NULL);
}

static void
test_open_survives_every_allocation_failure(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open");
    bus_store_config cfg;
    bus_store *s;
    uint64_t n;
    int rv;

    (void)state;
    bus_store_config_init(&cfg);
    cfg.path = dir;
    cfg.create_if_missing = true;
    /* Create first: the loop then covers the open of an existing store. */
    assert_int_equal(bus_store_open(&s, &cfg, NULL, 0), BUS_OK);
    assert_int_equal(st_append_n(s, "a", BUS_STORE_ANY, "t", 3, NULL), BUS_OK);
    bus_store_close(s);
    for (n = 1;; n++) {
        bus_fault_alloc_fail_nth(n, false);
        rv = bus_store_open(&s, &cfg, NULL, 0);
        bus_fault_alloc_fail_nth(0, false);
        if (rv == BUS_OK)
            break;
        assert_int_equal(rv, BUS_ENOMEM);
        assert_null(s);
    }
    assert_true(n > 1);
    assert_int_equal(bus_store_head(s), 3);
    st_verify_ok(s);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_open_failpoint_leaves_nothing_open(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open"), err[128];
    bus_store *s;

    (void)state;
    bus_failpoint_set("store.open", BUS_EIO, 1, false);
    assert_int_equal(open_at(dir, true, &s, err, sizeof(err)), BUS_EIO);
    bus_failpoint_clear_all();
    /* No lock left behind: the next open works. */
    assert_int_equal(open_at(dir, true, &s, err, sizeof(err)), BUS_OK);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

static void
test_closed_store_refuses_requests(void **state)
{
    char *dir = bt_mkdtemp("bus-store-open");
    bus_store *s = st_open_dir(dir, BUS_STORE_NONE);
    bus_store_slice sl;
    uint64_t pos;

    (void)state;
    memset(&sl, 0, sizeof(sl));
    bus_store_close_async(s);
    bus_store_close_async(s); /* idempotent */
    assert_int_equal(st_append_n(s, "a", BUS_STORE_ANY, "t", 1, NULL),
                     BUS_ECLOSED);
    assert_int_equal(bus_store_read_all(s, 0, BUS_STORE_FORWARD, 10, NULL, &sl),
                     BUS_ECLOSED);
    assert_int_equal(bus_store_checkpoint_get(s, "x", &pos), BUS_ECLOSED);
    bus_store_close(s);
    bt_rmtree(dir);
    free(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_init_fills_defaults),
        cmocka_unit_test(test_zeroed_config_with_path_opens),
        cmocka_unit_test(test_create_then_reopen_keeps_events),
        cmocka_unit_test(test_missing_path_without_create_is_notfound),
        cmocka_unit_test(test_file_or_foreign_dir_is_not_a_store),
        cmocka_unit_test(test_foreign_rocksdb_is_not_a_store),
        cmocka_unit_test(test_newer_format_is_eversion),
        cmocka_unit_test(test_older_format_is_eversion),
        cmocka_unit_test(test_bad_format_record_is_corrupt),
        cmocka_unit_test(test_id_index_watermark_damage_is_corrupt),
        cmocka_unit_test(test_damaged_manifest_is_corrupt),
        cmocka_unit_test(test_second_open_is_busy),
        cmocka_unit_test(test_bad_config_is_einval),
        cmocka_unit_test(test_open_survives_every_allocation_failure),
        cmocka_unit_test(test_open_failpoint_leaves_nothing_open),
        cmocka_unit_test(test_closed_store_refuses_requests),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
