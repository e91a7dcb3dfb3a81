/* pipeline.c: the partition state machine, the backoff, batch lists. */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "pipeline.h"

/* A consumer handle that never connects: pause and resume work on it
 * as on any (librdkafka keeps the flags per partition). */
static rd_kafka_t *offline_consumer(void)
{
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;
    rd_kafka_conf_set(conf, "group.id", "test", err, sizeof(err));
    rd_kafka_conf_set(conf, "bootstrap.servers", "127.0.0.1:1", err,
                      sizeof(err));
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof(err));
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
    assert_non_null(rk);
    return rk;
}

static part_table_t table(void)
{
    part_table_t t;
    memset(&t, 0, sizeof(t));
    t.topic = "token-usage";
    t.lag_name = "test_lag_messages";
    t.lag_help = "lag";
    t.assigned = metrics_gauge("test_assigned", NULL, "assigned");
    return t;
}

static void test_backoff_doubles_to_max_and_resets(void **state)
{
    backoff_t b;
    (void)state;
    backoff_init(&b, 1000, 60000);
    assert_false(backoff_waiting(&b));
    assert_int_equal(backoff_fail(&b), 1000);
    assert_true(backoff_waiting(&b));
    assert_int_equal(backoff_fail(&b), 2000);
    for (int i = 0; i < 4; i++)
        backoff_fail(&b);                      /* 4, 8, 16, 32 s */
    assert_int_equal(backoff_fail(&b), 60000); /* 64 capped */
    assert_int_equal(backoff_fail(&b), 60000);
    backoff_reset(&b);
    assert_false(backoff_waiting(&b));
    assert_int_equal(b.retry_at_ms, 0);
    assert_int_equal(backoff_fail(&b), 1000);
}

static void test_backoff_wait_passes(void **state)
{
    backoff_t b;
    (void)state;
    backoff_init(&b, 20, 40);
    backoff_fail(&b);
    assert_true(backoff_waiting(&b));
    usleep(40 * 1000);
    assert_false(backoff_waiting(&b));
}

/* The usage path: assigned, claimed, abandoned, fenced, retried,
 * revoked; counts and fields follow. */
static void test_usage_lifecycle(void **state)
{
    part_table_t t = table();
    (void)state;
    t.rk = offline_consumer();
    parts_set_state(&t, 3, PART_CLAIMING, "assigned");
    parts_set_state(&t, 1, PART_CLAIMING, "assigned");
    assert_int_equal(t.n, 4); /* grown on demand */
    assert_int_equal(parts_assigned(&t), 2);
    assert_int_equal(parts_count(&t, PART_CLAIMING), 2);
    assert_int_equal(parts_count(&t, PART_UNASSIGNED), 0);
    assert_int_equal(t.parts[3].committed, -1);

    parts_set_state(&t, 3, PART_ACTIVE, "claimed");
    t.parts[3].next = 42;
    t.parts[3].first = 40;
    t.parts[3].in_batch = true;
    parts_sync(&t);
    assert_false(t.parts[3].dirty);

    /* An abandoned batch: active ones claim again, others untouched. */
    assert_int_equal(parts_move_all(&t, PART_ACTIVE, PART_CLAIMING, "x"), 1);
    assert_int_equal(parts_count(&t, PART_CLAIMING), 2);
    assert_int_equal(parts_move_all(&t, PART_CLAIMING, PART_FENCED, "y"), 2);
    assert_int_equal(parts_count(&t, PART_FENCED), 2);
    parts_set_state(&t, 1, PART_CLAIMING, "retry");

    /* Revoked: cleared; assigned again it starts from nothing. */
    parts_set_state(&t, 3, PART_UNASSIGNED, "revoked");
    assert_false(t.parts[3].in_batch);
    assert_int_equal(parts_assigned(&t), 1);
    parts_set_state(&t, 3, PART_CLAIMING, "assigned");
    assert_int_equal(t.parts[3].next, 0);
    assert_int_equal(t.parts[3].first, -1);
    parts_report_assigned(&t);
    assert_int_equal(metric_get(t.assigned), 2);
    parts_set_state(&t, 3, PART_UNASSIGNED, "revoked");
    parts_report_assigned(&t);
    assert_int_equal(metric_get(t.assigned), 1); /* the change is added */
    parts_sync(&t);
    parts_free(&t);
    rd_kafka_destroy(t.rk);
}

/* The invalidation path, and the batch lists both use. */
static void test_invalidation_rewind_list(void **state)
{
    part_table_t t = table();
    rd_kafka_topic_partition_list_t *l;
    (void)state;
    t.rk = offline_consumer();
    parts_set_state(&t, 0, PART_ACTIVE, "assigned");
    parts_set_state(&t, 2, PART_ACTIVE, "assigned");
    parts_set_state(&t, 5, PART_WAITING, "assigned; redis unavailable");
    t.parts[0].in_batch = true;
    t.parts[0].first = 7;
    t.parts[0].next = 10;
    t.parts[2].in_batch = false;

    l = parts_in_batch(&t, true);
    assert_int_equal(l->cnt, 1);
    assert_int_equal(l->elems[0].partition, 0);
    assert_int_equal(l->elems[0].offset, 7);
    rd_kafka_topic_partition_list_destroy(l);
    l = parts_in_batch(&t, false);
    assert_int_equal(l->elems[0].offset, 10);
    rd_kafka_topic_partition_list_destroy(l);

    assert_int_equal(parts_move_all(&t, PART_ACTIVE, PART_WAITING, "down"), 2);
    assert_int_equal(parts_count(&t, PART_WAITING), 3);
    parts_sync(&t);
    assert_int_equal(parts_move_all(&t, PART_WAITING, PART_ACTIVE, "up"), 3);
    parts_clear_batch(&t);
    l = parts_in_batch(&t, true);
    assert_int_equal(l->cnt, 0);
    rd_kafka_topic_partition_list_destroy(l);
    parts_sync(&t);
    parts_free(&t);
    rd_kafka_destroy(t.rk);
}

/* A transition the list does not have is a programming error: abort. */
static int transition_aborts(part_state_t from, part_state_t to)
{
    pid_t pid = fork();
    int status;
    if (pid == 0) {
        part_table_t t = table();
        if (from != PART_UNASSIGNED) {
            /* reach `from` by allowed steps */
            part_state_t first = from == PART_FENCED ? PART_CLAIMING : from;
            parts_set_state(&t, 0, first, "setup");
            if (from == PART_FENCED)
                parts_set_state(&t, 0, PART_FENCED, "setup");
        }
        parts_set_state(&t, 0, to, "test");
        _exit(0);
    }
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

static void test_bad_transitions_abort(void **state)
{
    (void)state;
    assert_true(transition_aborts(PART_UNASSIGNED, PART_UNASSIGNED));
    assert_true(transition_aborts(PART_UNASSIGNED, PART_FENCED));
    assert_true(transition_aborts(PART_CLAIMING, PART_WAITING));
    assert_true(transition_aborts(PART_WAITING, PART_CLAIMING));
    assert_true(transition_aborts(PART_WAITING, PART_FENCED));
    assert_true(transition_aborts(PART_FENCED, PART_ACTIVE));
    assert_true(transition_aborts(PART_ACTIVE, PART_ACTIVE));
    /* and the allowed ones do not */
    assert_false(transition_aborts(PART_ACTIVE, PART_WAITING));
    assert_false(transition_aborts(PART_FENCED, PART_CLAIMING));
    assert_false(transition_aborts(PART_CLAIMING, PART_FENCED));
    assert_false(transition_aborts(PART_FENCED, PART_UNASSIGNED));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backoff_doubles_to_max_and_resets),
        cmocka_unit_test(test_backoff_wait_passes),
        cmocka_unit_test(test_usage_lifecycle),
        cmocka_unit_test(test_invalidation_rewind_list),
        cmocka_unit_test(test_bad_transitions_abort),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
