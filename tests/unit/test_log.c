/* Unit tests of log.c: --log-format json writes one valid JSON object per
 * line whatever the message holds; text keeps its layout. */
#include "log.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

/* Runs `fn` with stderr going to a temporary file; returns what it wrote
 * (malloc'd). */
static char *capture(void (*fn)(void))
{
    FILE *tmp = tmpfile();
    int saved = dup(2);
    char *out;
    long len;

    assert_non_null(tmp);
    fflush(stderr);
    dup2(fileno(tmp), 2);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    len = ftell(tmp);
    out = calloc(1, (size_t)len + 1);
    rewind(tmp);
    assert_int_equal(fread(out, 1, (size_t)len, tmp), (size_t)len);
    fclose(tmp);
    return out;
}

static char long_msg[5000];

static void write_lines(void)
{
    log_info("plain");
    log_warn("quote \" backslash \\ newline\nx tab\t cr\r del\x7f ctl\x01");
    log_error("euro \xe2\x82\xac bad \xff cut \xe2\x82");
    log_debug("dropped below the level");
    log_msg(LOG_LVL_WARN, "trailing newline from a library\n");
    memset(long_msg, '"', sizeof(long_msg) - 1);
    log_info("%s", long_msg);
}

static void test_json(void **state)
{
    const char *want[] = {
        "plain",
        "quote \" backslash \\ newline\nx tab\t cr\r del\x7f ctl\x01",
        "euro \xe2\x82\xac bad \xef\xbf\xbd cut \xef\xbf\xbd\xef\xbf\xbd",
        "trailing newline from a library",
        NULL, /* the long one: truncated, still valid */
    };
    const char *levels[] = {"info", "warn", "error", "warn", "info"};
    char *out, *line, *save = NULL;
    size_t n = 0;
    (void)state;

    log_set_level(LOG_LVL_INFO);
    log_set_format(LOG_FMT_JSON);
    out = capture(write_lines);
    log_set_format(LOG_FMT_TEXT);
    for (line = strtok_r(out, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save), n++) {
        json_error_t jerr;
        json_t *obj = json_loads(line, JSON_REJECT_DUPLICATES, &jerr);
        if (!obj)
            fail_msg("line %zu is not JSON (%s): %s", n, jerr.text, line);
        assert_true(n < 5);
        assert_int_equal(json_object_size(obj), 3);
        assert_string_equal(json_string_value(json_object_get(obj, "level")),
                            levels[n]);
        assert_int_equal(
            strlen(json_string_value(json_object_get(obj, "ts"))), 24);
        if (want[n])
            assert_string_equal(
                json_string_value(json_object_get(obj, "msg")), want[n]);
        else
            assert_true(json_string_length(json_object_get(obj, "msg")) >
                        1000);
        json_decref(obj);
    }
    assert_int_equal(n, 5);
    free(out);
}

static void text_line(void)
{
    log_warn("hello %d", 42);
}

static void test_text(void **state)
{
    char *out;
    (void)state;
    log_set_format(LOG_FMT_TEXT);
    out = capture(text_line);
    /* 2024-05-01T12:00:00.123Z warn  hello 42 */
    assert_int_equal(strlen(out), 24 + 1 + 5 + 1 + 8 + 1);
    assert_string_equal(out + 24, " warn  hello 42\n");
    free(out);
}

static void test_parse(void **state)
{
    log_format_t f = LOG_FMT_TEXT;
    (void)state;
    assert_int_equal(log_format_parse("json", &f), 0);
    assert_int_equal(f, LOG_FMT_JSON);
    assert_int_equal(log_format_parse("text", &f), 0);
    assert_int_equal(f, LOG_FMT_TEXT);
    assert_int_equal(log_format_parse("JSON", &f), -1);
    assert_int_equal(log_format_parse("", &f), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_text),
        cmocka_unit_test(test_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
