/* Unit tests of the strict RFC 3339 parser and formatter. */
#include "rfc3339.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define US 1000000LL
#define DAY_US (86400LL * US)

static int parse(const char *s, int64_t *us)
{
    return rfc3339_parse(s, strlen(s), us);
}

static void assert_parses(const char *s, int64_t want)
{
    int64_t us = 0;
    if (parse(s, &us) != 0)
        fail_msg("rejected %s", s);
    if (us != want)
        fail_msg("%s: got %lld, want %lld", s, (long long)us, (long long)want);
}

static void test_known_instants(void **state)
{
    (void)state;
    assert_parses("1970-01-01T00:00:00Z", 0);
    assert_parses("2026-01-15T12:00:00Z", 1768478400LL * US);
    assert_parses("2000-03-01T00:00:00Z", 951868800LL * US);
    assert_parses("1969-12-31T23:59:59Z", -1 * US);
    assert_parses("0001-01-01T00:00:00Z", -62135596800LL * US);
    assert_parses("9999-12-31T23:59:59.999999Z", 253402300799999999LL);
    assert_parses("2024-02-29T12:00:00Z", 1709208000LL * US);
}

static void test_offsets(void **state)
{
    (void)state;
    assert_parses("1970-01-01T00:00:00+00:00", 0);
    assert_parses("1970-01-01T00:00:00-00:00", 0);
    assert_parses("1970-01-01T01:30:00+01:30", 0);
    assert_parses("1969-12-31T19:00:00-05:00", 0);
    assert_parses("1970-01-01T23:59:00+23:59", 0);
    assert_parses("1969-12-31T00:01:00-23:59", 0);
    /* the offset may carry the instant out of 0001..9999 */
    assert_parses("0001-01-01T00:00:00+01:00", (-62135596800LL - 3600) * US);
    assert_parses("9999-12-31T23:59:59-01:00", 253402304399LL * US);
}

static void test_fraction(void **state)
{
    (void)state;
    assert_parses("1970-01-01T00:00:00.1Z", 100000);
    assert_parses("1970-01-01T00:00:00.000001Z", 1);
    assert_parses("1970-01-01T00:00:00.0000009Z", 0);
    assert_parses("1970-01-01T00:00:00.123456789Z", 123456);
    assert_parses("1970-01-01T00:00:00.99999999999999999999999999Z", 999999);
    assert_parses("1969-12-31T23:59:59.5Z", -500000);
    assert_parses("1970-01-01T00:00:00.5+01:00", -3600 * US + 500000);
}

static void test_calendar(void **state)
{
    (void)state;
    int64_t us;
    char s[32];
    for (int y = 1; y <= 9999; y++) {
        bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        snprintf(s, sizeof(s), "%04d-02-29T00:00:00Z", y);
        assert_int_equal(parse(s, &us), leap ? 0 : -1);
        snprintf(s, sizeof(s), "%04d-02-28T00:00:00Z", y);
        assert_int_equal(parse(s, &us), 0);
    }
    static const char *const last_days[] = {
        "2025-01-31", "2025-03-31", "2025-04-30", "2025-05-31",
        "2025-06-30", "2025-07-31", "2025-08-31", "2025-09-30",
        "2025-10-31", "2025-11-30", "2025-12-31"};
    static const char *const past_end[] = {
        "2025-01-32", "2025-03-32", "2025-04-31", "2025-05-32", "2025-06-31",
        "2025-07-32", "2025-08-32", "2025-09-31", "2025-10-32", "2025-11-31",
        "2025-12-32", "2024-02-30", "2023-02-29", "1900-02-29", "2025-00-10",
        "2025-13-01", "2025-01-00"};
    for (size_t i = 0; i < sizeof(last_days) / sizeof(last_days[0]); i++) {
        snprintf(s, sizeof(s), "%sT00:00:00Z", last_days[i]);
        assert_int_equal(parse(s, &us), 0);
    }
    for (size_t i = 0; i < sizeof(past_end) / sizeof(past_end[0]); i++) {
        snprintf(s, sizeof(s), "%sT00:00:00Z", past_end[i]);
        if (parse(s, &us) == 0)
            fail_msg("accepted %s", s);
    }
    assert_parses("2000-02-29T00:00:00Z", 951782400LL * US);
}

static void test_rejects(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "now",
        "infinity",
        "-infinity",
        "2026-01-15",
        "2026-01-15T12:00:00",
        "2026-01-15T12:00Z",
        "2026-01-15t12:00:00Z",
        "2026-01-15T12:00:00z",
        "2026-01-15 12:00:00Z",
        "2026-01-15T12:00:00.Z",
        "2026-01-15T12:00:00.",
        "2026-01-15T12:00:00,5Z",
        "2026-01-15T12:00:00+01",
        "2026-01-15T12:00:00+0100",
        "2026-01-15T12:00:00+01:00:00",
        "2026-01-15T12:00:00+24:00",
        "2026-01-15T12:00:00+01:60",
        "2026-01-15T12:00:00UTC",
        "2026-01-15T12:00:00ZZ",
        "2026-01-15T12:00:00Z ",
        " 2026-01-15T12:00:00Z",
        "2026-01-15T24:00:00Z",
        "2026-01-15T12:60:00Z",
        "2026-01-15T12:00:60Z",
        "2016-12-31T23:59:60Z",
        "0000-01-01T00:00:00Z",
        "+2026-01-15T12:00:00Z",
        "20260-01-15T12:00:00Z",
        "26-01-15T12:00:00Z",
        "2026-1-15T12:00:00Z",
        "2026-01-5T12:00:00Z",
        "2026/01/15T12:00:00Z",
        "2026-01-15T12:00:00.5.5Z",
        "2026-01-15T1:00:00Z",
        "2026-01-15T12:00:0Z",
        "2026-01-15T12:00:00-",
        "2026-01-15T12:00:00+1:00",
        "2026-01-15T12:00:00+01:0",
        "2026-01-15T12:00:00+01:000",
        "2026-01-15T12:00:00.123456+",
        "２026-01-15T12:00:00Z",
    };
    int64_t us;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (parse(bad[i], &us) == 0)
            fail_msg("accepted \"%s\"", bad[i]);
}

/* len is the whole input: bytes after it are never looked at, and a
 * shorter len never reaches past its end (ASan checks the heap copy). */
static void test_length_bound(void **state)
{
    (void)state;
    const char *s = "2026-01-15T12:00:00.123Z";
    size_t n = strlen(s);
    int64_t us;
    for (size_t len = 0; len < n; len++) {
        char *copy = malloc(len ? len : 1);
        assert_non_null(copy);
        memcpy(copy, s, len);
        assert_int_equal(rfc3339_parse(copy, len, &us), -1);
        free(copy);
    }
    char *exact = malloc(n);
    assert_non_null(exact);
    memcpy(exact, s, n);
    assert_int_equal(rfc3339_parse(exact, n, &us), 0);
    assert_int_equal(us, 1768478400LL * US + 123000);
    free(exact);
    assert_int_equal(rfc3339_parse("2026-01-15T12:00:00Zjunk", 20, &us), 0);
    /* a NUL inside the span is just a bad byte */
    assert_int_equal(rfc3339_parse("2026-01-15T12:00:00\0Z", 21, &us), -1);
}

static void test_format(void **state)
{
    (void)state;
    char out[32];
    rfc3339_format(0, out);
    assert_string_equal(out, "1970-01-01T00:00:00.000000Z");
    rfc3339_format(-1, out);
    assert_string_equal(out, "1969-12-31T23:59:59.999999Z");
    rfc3339_format(1768478400LL * US + 42, out);
    assert_string_equal(out, "2026-01-15T12:00:00.000042Z");
    rfc3339_format(-62135596800LL * US, out);
    assert_string_equal(out, "0001-01-01T00:00:00.000000Z");
    rfc3339_format(253402300799999999LL, out);
    assert_string_equal(out, "9999-12-31T23:59:59.999999Z");
    /* out of the parser's range, but still a bounded string */
    rfc3339_format(INT64_MAX, out);
    assert_string_equal(out, "294247-01-10T04:00:54.775807Z");
    rfc3339_format(INT64_MIN, out);
    assert_string_equal(out, "-290308-12-21T19:59:05.224192Z");
}

static void test_round_trip(void **state)
{
    (void)state;
    const int64_t lo = -62135596800LL * US, hi = 253402300799999999LL;
    uint64_t x = 88172645463325252ULL;
    char out[32];
    int64_t back;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13; /* xorshift64 */
        x ^= x >> 7;
        x ^= x << 17;
        int64_t us = lo + (int64_t)(x % (uint64_t)(hi - lo + 1));
        rfc3339_format(us, out);
        if (rfc3339_parse(out, strlen(out), &back) != 0 || back != us)
            fail_msg("round trip of %lld via %s", (long long)us, out);
    }
}

static void test_every_day(void **state)
{
    (void)state;
    /* 0001-01-01 .. 9999-12-31: civil() and the parser agree everywhere */
    const int64_t first = -719162, last = 2932896;
    char s[32];
    int y, m, d, py = 0, pm = 0, pd = 0;
    for (int64_t day = first; day <= last; day++) {
        rfc3339_civil(day, &y, &m, &d);
        if (day > first && !(d == pd + 1 && m == pm && y == py) &&
            !(d == 1 && ((m == pm + 1 && y == py) ||
                         (m == 1 && pm == 12 && y == py + 1))))
            fail_msg("day %lld: %d-%d-%d after %d-%d-%d", (long long)day, y, m,
                     d, py, pm, pd);
        py = y, pm = m, pd = d;
        if (day % 97 == 0 || (y >= 1900 && y <= 2100)) {
            int64_t us;
            snprintf(s, sizeof(s), "%04d-%02d-%02dT00:00:00Z", y, m, d);
            assert_int_equal(parse(s, &us), 0);
            assert_true(us == day * DAY_US);
        }
    }
    assert_int_equal(y, 9999);
    rfc3339_civil(first, &y, &m, &d);
    assert_int_equal(y, 1);
    assert_int_equal(m, 1);
    assert_int_equal(d, 1);
}

static void test_day_of(void **state)
{
    (void)state;
    assert_true(rfc3339_day_of(0) == 0);
    assert_true(rfc3339_day_of(DAY_US - 1) == 0);
    assert_true(rfc3339_day_of(DAY_US) == 1);
    assert_true(rfc3339_day_of(-1) == -1);
    assert_true(rfc3339_day_of(-DAY_US) == -1);
    assert_true(rfc3339_day_of(-DAY_US - 1) == -2);
    assert_true(rfc3339_day_of(1768478400LL * US) == 20468);
    assert_true(rfc3339_day_of(-62135596800LL * US) == -719162);
    int y, m, d;
    rfc3339_civil(-1, &y, &m, &d);
    assert_int_equal(y, 1969);
    assert_int_equal(m, 12);
    assert_int_equal(d, 31);
    rfc3339_civil(20468, &y, &m, &d);
    assert_int_equal(y, 2026);
    assert_int_equal(m, 1);
    assert_int_equal(d, 15);
    /* a UTC day bucket of an instant given with an offset */
    int64_t us;
    assert_int_equal(parse("2026-01-15T00:30:00+01:00", &us), 0);
    rfc3339_civil(rfc3339_day_of(us), &y, &m, &d);
    assert_int_equal(d, 14);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_instants),
        cmocka_unit_test(test_offsets),
        cmocka_unit_test(test_fraction),
        cmocka_unit_test(test_calendar),
        cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_length_bound),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_every_day),
        cmocka_unit_test(test_day_of),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
