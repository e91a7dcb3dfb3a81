/* Unit tests of the sums by bucket and their COPY rows (usage_agg.c). */
#include "usage_agg.h"

#include "copy_buf.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#define D20251130 20422 /* 2025-11-30, in days since 1970-01-01 */

static usage_enum_t tt, ops;

static int setup(void **state)
{
    (void)state;
    usage_enums_default(&tt, &ops); /* llm, embedding; chat, query, ... */
    return 0;
}

static void add(agg_t *a, const char *tenant, int64_t day, const char *type,
                const char *op, const char *model, const char *agent,
                int64_t tokens)
{
    const char *parts[] = {tenant, type, op, model, agent};
    const int64_t sums[AGG_N_SUMS] = {tokens, 1, 2, 3, 4};
    agg_add(a, agg_bucket(a, parts, day), sums, 1);
}

static void test_same_bucket_sums(void **state)
{
    static const char want[] =
        "t1\t20422\tllm\tchat\tm\t\t15\t2\t4\t6\t8\t2\n";
    agg_t *a = agg_new(4);
    const char *parts[] = {"t1", "llm", "chat", "m", ""};
    size_t len, rows;
    const char *out;
    (void)state;

    add(a, "t1", D20251130, "llm", "chat", "m", "", 10);
    add(a, "t1", D20251130, "llm", "chat", "m", "", 5);
    assert_int_equal(agg_count(a), 1);
    assert_int_equal(agg_bucket(a, parts, D20251130), 0);
    out = agg_daily_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 1);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(out, want, len);
    agg_free(a);
}

/* Tenant bytewise, then the day, then the enums in their declared order
 * (llm before embedding, chat before query), then model and agent. */
static void test_daily_order(void **state)
{
    agg_t *a = agg_new(2); /* grows */
    size_t len, rows;
    char buf[2048];
    const char *out;
    (void)state;

    add(a, "tb", D20251130, "llm", "chat", "m", "", 1);
    add(a, "ta", D20251130 + 1, "llm", "chat", "m", "", 2);
    add(a, "ta", D20251130, "embedding", "embedding", "e", "", 3);
    add(a, "ta", D20251130, "llm", "query", "m", "", 4);
    add(a, "ta", D20251130, "llm", "chat", "m", "z", 5);
    add(a, "ta", D20251130, "llm", "chat", "m", "", 6);
    add(a, "ta", D20251130, "llm", "chat", "a", "", 7);
    out = agg_daily_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 7);
    snprintf(buf, sizeof(buf), "%.*s", (int)len, out);
    assert_string_equal(buf,
                        "ta\t20422\tllm\tchat\ta\t\t7\t1\t2\t3\t4\t1\n"
                        "ta\t20422\tllm\tchat\tm\t\t6\t1\t2\t3\t4\t1\n"
                        "ta\t20422\tllm\tchat\tm\tz\t5\t1\t2\t3\t4\t1\n"
                        "ta\t20422\tllm\tquery\tm\t\t4\t1\t2\t3\t4\t1\n"
                        "ta\t20422\tembedding\tembedding\te\t\t3\t1\t2\t3\t4\t1\n"
                        "ta\t20423\tllm\tchat\tm\t\t2\t1\t2\t3\t4\t1\n"
                        "tb\t20422\tllm\tchat\tm\t\t1\t1\t2\t3\t4\t1\n");
    agg_free(a);
}

/* Days of one month in one row (the month's first day), in key order;
 * a new month is another row. */
static void test_monthly_rows(void **state)
{
    agg_t *a = agg_new(8);
    size_t len, rows;
    char buf[1024];
    const char *out;
    (void)state;

    add(a, "t1", D20251130, "llm", "chat", "m", "", 1);      /* Nov 30 */
    add(a, "t1", D20251130 - 1, "llm", "chat", "m", "", 2);  /* Nov 29 */
    add(a, "t1", D20251130 + 1, "llm", "chat", "m", "", 4);  /* Dec 1 */
    add(a, "t1", D20251130 - 29, "llm", "chat", "m", "", 8); /* Nov 1 */
    add(a, "t0", D20251130, "llm", "chat", "m", "", 16);
    out = agg_monthly_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 3);
    snprintf(buf, sizeof(buf), "%.*s", (int)len, out);
    assert_string_equal(buf,
                        "t0\t20393\tllm\tchat\tm\t\t16\t1\t2\t3\t4\t1\n"
                        "t1\t20393\tllm\tchat\tm\t\t11\t3\t6\t9\t12\t3\n"
                        "t1\t20423\tllm\tchat\tm\t\t4\t1\t2\t3\t4\t1\n");
    agg_free(a);
}

/* A window or batch whose events were all counted before sums nothing:
 * no rows, and (under UBSan) no null buffer handed to qsort or memcpy. */
static void test_empty_rows(void **state)
{
    agg_t *a = agg_new(4);
    agg_t *b = agg_new(4);
    size_t len = 1, rows = 1;
    const char *out;
    (void)state;

    out = agg_daily_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 0);
    assert_int_equal(len, 0);
    (void)out;
    agg_merge(a, b);
    out = agg_monthly_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 0);
    assert_int_equal(len, 0);
    agg_free(a);
    agg_free(b);
}

/* Merging skips empty buckets; zeroing keeps the buckets; COPY escapes. */
static void test_merge_zero_escape(void **state)
{
    agg_t *a = agg_new(4), *w = agg_new(1);
    size_t len, rows;
    char buf[512];
    const char *out;
    (void)state;

    add(a, "t\\1", D20251130, "llm", "chat", "m\tx", "", 1);
    add(a, "t2", D20251130, "llm", "chat", "m", "", 2);
    agg_merge(w, a);
    agg_merge(w, a);
    agg_zero(a);
    assert_int_equal(agg_count(a), 2);
    assert_int_equal(agg_nonempty(a), 0);
    out = agg_daily_rows(a, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 0);
    agg_merge(w, a); /* nothing */
    out = agg_daily_rows(w, &tt, &ops, &len, &rows);
    assert_int_equal(rows, 2);
    snprintf(buf, sizeof(buf), "%.*s", (int)len, out);
    assert_string_equal(buf,
                        "t2\t20422\tllm\tchat\tm\t\t4\t2\t4\t6\t8\t2\n"
                        "t\\\\1\t20422\tllm\tchat\tm\\tx\t\t2\t2\t4\t6\t8\t2\n");
    agg_clear(w);
    assert_int_equal(agg_count(w), 0);
    agg_free(a);
    agg_free(w);
}

/* A label the enum lists do not know sorts after the known ones. */
static void test_unknown_label_last(void **state)
{
    agg_t *a = agg_new(4);
    size_t len, rows;
    char buf[512];
    const char *out;
    (void)state;

    add(a, "t", D20251130, "audio", "chat", "m", "", 1);
    add(a, "t", D20251130, "embedding", "chat", "m", "", 2);
    add(a, "t", D20251130, "aaa", "chat", "m", "", 3);
    out = agg_daily_rows(a, &tt, &ops, &len, &rows);
    snprintf(buf, sizeof(buf), "%.*s", (int)len, out);
    assert_string_equal(buf,
                        "t\t20422\tembedding\tchat\tm\t\t2\t1\t2\t3\t4\t1\n"
                        "t\t20422\taaa\tchat\tm\t\t3\t1\t2\t3\t4\t1\n"
                        "t\t20422\taudio\tchat\tm\t\t1\t1\t2\t3\t4\t1\n");
    agg_free(a);
}

/* The integers of the COPY rows, formatted by hand. */
static void test_copy_buf_i64(void **state)
{
    copy_buf_t b = {0};
    const int64_t v[] = {0, 7, -1, 10, 1000000000000LL, INT64_MAX,
                         INT64_MIN};
    (void)state;
    for (size_t i = 0; i < sizeof(v) / sizeof(*v); i++) {
        copy_buf_put_i64(&b, v[i]);
        copy_buf_putc(&b, ' ');
    }
    copy_buf_putc(&b, '\0');
    assert_string_equal(b.data, "0 7 -1 10 1000000000000 "
                                "9223372036854775807 -9223372036854775808 ");
    copy_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_bucket_sums),
        cmocka_unit_test(test_empty_rows),
        cmocka_unit_test(test_daily_order),
        cmocka_unit_test(test_monthly_rows),
        cmocka_unit_test(test_merge_zero_escape),
        cmocka_unit_test(test_unknown_label_last),
        cmocka_unit_test(test_copy_buf_i64),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
