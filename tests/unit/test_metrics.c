/* Unit tests of metrics.c: the text format (families, scaled counters,
 * histograms, escaping), readiness and listen addresses. With --render it
 * prints a sample registry instead, for `promtool check metrics`. */
#include "metrics.h"

#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <cmocka.h>

static const double secs[] = {0.005, 0.01, 1, 10};

/* One of everything; the same registry feeds the tests and --render. */
static void sample_registry(void)
{
    static bool done;
    metric_t *h, *c, *s;

    if (done)
        return;
    done = true;
    c = metrics_counter("tally_test_messages_total", "where=\"a\"",
                        "messages, with a \\ backslash\nand a newline");
    metric_add(c, 3);
    metric_set(metrics_gauge("tally_test_up", NULL, "1 when up"), -2);
    /* Registered later: must still be rendered with its family. */
    metric_add(metrics_counter("tally_test_messages_total", "where=\"b\"",
                               NULL),
               4);
    s = metrics_counter_scaled("tally_test_commit_seconds_total", NULL,
                               "time committing", 6);
    metric_add(s, 1234567); /* microseconds */
    metric_add(metrics_counter_scaled("tally_test_parse_seconds_total", NULL,
                                      "time parsing", 9),
               5);
    h = metrics_histogram("tally_test_commit_duration_seconds", NULL,
                          "commit durations", secs, 4);
    metric_observe(h, 0.005); /* on a bound: that bucket (le) */
    metric_observe(h, 0.5);
    metric_observe(h, 100);
    metrics_histogram("tally_test_batch_messages", "topic=\"t\"",
                      "messages per batch", secs, 4);
    metric_add(metrics_counter_labeled("tally_test_labeled_total", "type",
                                       "we\"ird\\", 4, "by type"),
               1);
    metrics_set_ready(metrics_readiness("token-usage"), true, NULL);
}

static char *render(void)
{
    size_t len = 0;
    char *text = metrics_render(&len);
    assert_non_null(text);
    assert_int_equal(strlen(text), len);
    return text;
}

static void assert_has(const char *text, const char *want)
{
    if (!strstr(text, want))
        fail_msg("missing:\n%s\nin:\n%s", want, text);
}

static void test_families_and_counters(void **state)
{
    char *text;
    (void)state;
    sample_registry();
    text = render();
    assert_has(text, "# HELP tally_build_info ");
    assert_has(text, "tally_build_info{version=\"");
    assert_has(text,
               "# HELP tally_test_messages_total messages, with a \\\\ "
               "backslash\\nand a newline\n"
               "# TYPE tally_test_messages_total counter\n"
               "tally_test_messages_total{where=\"a\"} 3\n"
               "tally_test_messages_total{where=\"b\"} 4\n");
    assert_has(text, "# TYPE tally_test_up gauge\ntally_test_up -2\n");
    assert_has(text, "tally_test_commit_seconds_total 1.234567\n");
    assert_has(text, "tally_test_parse_seconds_total 0.000000005\n");
    assert_has(text, "tally_test_labeled_total{type=\"we\\\"ird\\\\\"} 1\n");
    assert_has(text, "tally_ready{check=\"token-usage\"} 1\n");
    free(text);
}

static void test_histogram(void **state)
{
    char *text;
    (void)state;
    sample_registry();
    text = render();
    assert_has(text,
               "# HELP tally_test_commit_duration_seconds commit durations\n"
               "# TYPE tally_test_commit_duration_seconds histogram\n"
               "tally_test_commit_duration_seconds_bucket{le=\"0.005\"} 1\n"
               "tally_test_commit_duration_seconds_bucket{le=\"0.01\"} 1\n"
               "tally_test_commit_duration_seconds_bucket{le=\"1\"} 2\n"
               "tally_test_commit_duration_seconds_bucket{le=\"10\"} 2\n"
               "tally_test_commit_duration_seconds_bucket{le=\"+Inf\"} 3\n"
               "tally_test_commit_duration_seconds_sum 100.505\n"
               "tally_test_commit_duration_seconds_count 3\n");
    assert_has(text,
               "tally_test_batch_messages_bucket{topic=\"t\",le=\"+Inf\"} 0\n"
               "tally_test_batch_messages_sum{topic=\"t\"} 0\n"
               "tally_test_batch_messages_count{topic=\"t\"} 0\n");
    free(text);
}

static void test_readiness(void **state)
{
    metrics_ready_t *a, *b;
    char reason[256];
    (void)state;

    /* Separate process state: only the sample's check may exist. */
    a = metrics_readiness("token-usage");
    b = metrics_readiness("invalidation");
    assert_ptr_equal(a, metrics_readiness("token-usage"));
    assert_false(metrics_is_ready(reason, sizeof(reason)));
    assert_string_equal(reason, "not ready: invalidation: starting");
    metrics_set_ready(a, false, "postgres down:\nconnection refused");
    metrics_set_ready(b, true, NULL);
    assert_false(metrics_is_ready(reason, sizeof(reason)));
    assert_string_equal(reason,
                        "not ready: token-usage: postgres down: connection "
                        "refused");
    metrics_set_ready(a, true, "ignored");
    assert_true(metrics_is_ready(reason, sizeof(reason)));
    assert_string_equal(reason, "ready");
    metrics_set_ready(b, false, NULL);
    assert_false(metrics_is_ready(NULL, 0));
}

static void test_addresses(void **state)
{
    struct sockaddr_storage ss;
    char err[256];
    bool any;
    static const char *const good[] = {
        "127.0.0.1:9464", "0.0.0.0:1", "localhost:65535", ":9464",
        "[::1]:9464",     "[::]:80",   "[fe80::1]:9464",
    };
    static const char *const bad[] = {
        "",          "9464",      "127.0.0.1",     "127.0.0.1:",
        "1.2.3.4:0", "1.2.3.4:65536", "256.0.0.1:99", "::1:9464",
        "[::1]",     "[::1:9464", "[::1]9464",     "[]:9464",
        "host:9464", "1.2.3.4:9x", "1.2.3.4:+80",  "[1.2.3.4]:80",
    };
    (void)state;

    for (size_t i = 0; i < sizeof(good) / sizeof(*good); i++)
        if (metrics_parse_addr(good[i], "--metrics-addr", &ss, &any, err,
                               sizeof(err)) != 0)
            fail_msg("rejected %s: %s", good[i], err);
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        if (metrics_parse_addr(bad[i], "--metrics-addr", &ss, &any, err,
                               sizeof(err)) == 0)
            fail_msg("accepted '%s'", bad[i]);
        assert_non_null(strstr(err, "--metrics-addr"));
    }
    assert_int_equal(metrics_parse_addr("[::1]:9464", "x", &ss, &any, err,
                                        sizeof(err)),
                     0);
    assert_int_equal(ss.ss_family, AF_INET6);
    assert_false(any);
    assert_int_equal(metrics_parse_addr(":9464", "x", &ss, &any, err,
                                        sizeof(err)),
                     0);
    assert_true(any);
    assert_int_equal(metrics_parse_addr("localhost:9464", "x", &ss, &any,
                                        err, sizeof(err)),
                     0);
    assert_int_equal(ss.ss_family, AF_INET);
    assert_int_equal(ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr),
                     INADDR_LOOPBACK);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_families_and_counters),
        cmocka_unit_test(test_histogram),
        cmocka_unit_test(test_addresses),
        cmocka_unit_test(test_readiness),
    };
    if (argc > 1 && !strcmp(argv[1], "--render")) {
        size_t len = 0;
        char *text;
        sample_registry();
        text = metrics_render(&len);
        if (!text)
            return 1;
        fwrite(text, 1, len, stdout);
        free(text);
        return 0;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
