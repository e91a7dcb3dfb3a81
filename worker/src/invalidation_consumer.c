/* The cache-invalidation consumer: batches, Redis, notices, rewinds. */
#include "invalidation_consumer.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "cache_key.h"
#include "fault.h"
#include "invalidation_event.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "pipeline.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define DLQ_FLUSH_MS 30000
#define DATA_TYPE_LABELS_MAX 64 /* distinct data_type label values */
#define PING_MS 5000            /* check Redis this often while idle */

#define now_ms pipeline_now_ms

/* One accepted invalidation of the open batch. */
typedef struct {
    invalidation_t inv;
    cache_targets_t targets;
} inv_item_t;

typedef struct {
    const invalidation_consumer_conf_t *conf;
    pipeline_t pl;
    inv_item_t *items;
    cache_job_t *jobs;
    size_t n_items;
    size_t batch_msgs, batch_dlq;
    int64_t batch_opened_ms;
    bool redis_down; /* waiting for Redis: every partition WAITING */
    backoff_t redis;
    metric_t *messages, *redis_up, *redis_errors;
    metrics_ready_t *ready;
    int64_t redis_seen_ms; /* Redis last answered */
    metric_t *dead_letters[INVALIDATION_ERR__COUNT];
} invalidator_t;

static void invalidator_metrics_init(invalidator_t *iv)
{
    iv->messages = metrics_counter("tally_invalidation_messages_total", NULL,
                                   "cache-invalidation messages consumed");
    iv->redis_up = metrics_gauge("tally_redis_up", NULL,
                                 "1 when the Redis connection works");
    iv->ready = metrics_readiness("cache-invalidation");
    iv->pl.rebalances =
        metrics_counter("tally_invalidation_rebalances_total", NULL,
                        "rebalance callbacks (assignments and revocations) of "
                        "cache-invalidation");
    iv->redis_errors = metrics_counter(
        "tally_redis_errors_total", NULL,
        "Redis failures (the batch is applied again after a backoff)");
    iv->pl.parts.assigned =
        metrics_gauge("tally_invalidation_partitions_assigned", NULL,
                      "cache-invalidation partitions assigned");
    for (int r = 1; r < INVALIDATION_ERR__COUNT; r++)
        iv->dead_letters[r] = pipeline_reason_counter(
            "tally_invalidation_dead_letters_total",
            invalidation_reason_code((invalidation_reason_t)r),
            "invalidations sent to the dead-letter topic, by reason");
}

/* ---------------------------------------------------------------- */
/* Batches                                                            */

static void invalidator_clear(invalidator_t *iv)
{
    for (size_t i = 0; i < iv->n_items; i++)
        cache_targets_free(&iv->items[i].targets);
    iv->n_items = 0;
    iv->batch_msgs = 0;
    iv->batch_dlq = 0;
    parts_clear_batch(&iv->pl.parts);
}

/* Drops the open batch: its partitions (those still assigned) go back to
 * their first offsets in it, so that it is read and applied again. A
 * rewind that fails is fatal: carrying on would skip invalidations. */
static void invalidator_rewind(invalidator_t *iv)
{
    rd_kafka_topic_partition_list_t *l = parts_in_batch(&iv->pl.parts, true);
    rd_kafka_error_t *error = NULL;

    invalidator_clear(iv);
    parts_sync(&iv->pl.parts); /* paused before the seek */
    if (l->cnt > 0)
        error = kafka_seek_partitions(iv->pl.rk, l, 10000);
    if (error) {
        pipeline_fatal(&iv->pl, "cannot rewind %s after a failure: %s",
                       iv->conf->topic, rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* The batch could not be applied: nothing of it is committed; it is
 * rewound, and every partition waits for Redis (or Kafka) with backoff. */
static void invalidator_fail(invalidator_t *iv, const char *why)
{
    int waits = backoff_fail(&iv->redis);

    log_warn("cache-invalidation: %zu messages not applied (%s); retrying "
             "in %d s",
             iv->batch_msgs, why, waits / 1000);
    metric_add(iv->redis_errors, 1);
    for (size_t i = 0; i < iv->n_items; i++)
        metric_add(metrics_counter_labeled(
                       "tally_invalidation_errors_total", "data_type",
                       iv->items[i].inv.data_type, DATA_TYPE_LABELS_MAX,
                       "invalidations whose application failed and is "
                       "retried, by data_type"),
                   1);
    parts_move_all(&iv->pl.parts, PART_ACTIVE, PART_WAITING, why);
    invalidator_rewind(iv);
    iv->redis_down = true;
    metric_set(iv->redis_up, cache_is_connected(iv->conf->cache));
    metrics_set_ready(iv->ready, false, "redis unavailable");
}

/* Redis answered: the gauge, /readyz and the idle check know. */
static void invalidator_redis_ok(invalidator_t *iv)
{
    iv->redis_seen_ms = now_ms();
    metric_set(iv->redis_up, 1);
    metrics_set_ready(iv->ready, true, NULL);
}

/* While idle, PING Redis every PING_MS: /readyz and tally_redis_up tell
 * the truth without invalidations to apply. */
static void invalidator_ping(invalidator_t *iv)
{
    char err[512];

    if (iv->redis_down || iv->batch_msgs > 0 ||
        now_ms() - iv->redis_seen_ms < PING_MS)
        return;
    if (cache_ping(iv->conf->cache, err, sizeof(err)) == 0) {
        invalidator_redis_ok(iv);
        return;
    }
    iv->redis_seen_ms = now_ms();
    log_warn("cache-invalidation: %s", err);
    metric_set(iv->redis_up, 0);
    metrics_set_ready(iv->ready, false, "redis unavailable");
}

/* Counts the applied batch per data_type (one label lookup per type). */
static void invalidator_count(invalidator_t *iv)
{
    for (size_t i = 0; i < iv->n_items; i++) {
        const char *dt = iv->items[i].inv.data_type;
        uint64_t applied = 0, deleted = 0, patterns = 0;
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strcmp(iv->items[j].inv.data_type, dt);
        if (seen)
            continue;
        for (size_t j = i; j < iv->n_items; j++) {
            if (strcmp(iv->items[j].inv.data_type, dt) != 0)
                continue;
            applied++;
            deleted += iv->jobs[j].deleted;
            patterns += iv->items[j].targets.n_prefixes;
        }
        metric_add(metrics_counter_labeled(
                       "tally_invalidations_applied_total", "data_type", dt,
                       DATA_TYPE_LABELS_MAX,
                       "invalidations applied to Redis, by data_type"),
                   applied);
        metric_add(
            metrics_counter_labeled("tally_invalidation_keys_deleted_total",
                                    "data_type", dt, DATA_TYPE_LABELS_MAX,
                                    "keys Redis removed, by data_type"),
            deleted);
        metric_add(metrics_counter_labeled(
                       "tally_invalidation_patterns_scanned_total", "data_type",
                       dt, DATA_TYPE_LABELS_MAX,
                       "prefix sets looked up with SCAN, by data_type"),
                   patterns);
    }
}

/* Applies the open batch: dead letters acknowledged, deletes confirmed by
 * Redis, notices published, then the offsets committed. 0 or -1. */
static int invalidator_apply(invalidator_t *iv, bool sync)
{
    rd_kafka_topic_partition_list_t *l;
    char err[512];
    rd_kafka_resp_err_t kerr;

    if (iv->batch_msgs == 0)
        return 0;
    if (iv->batch_dlq > 0 && dead_letter_flush(iv->conf->dlq, DLQ_FLUSH_MS, err,
                                               sizeof(err)) == -1) {
        invalidator_fail(iv, err);
        return -1;
    }
    if (iv->n_items > 0) {
        if (cache_connect(iv->conf->cache, err, sizeof(err)) == -1) {
            invalidator_fail(iv, err);
            return -1;
        }
        for (size_t i = 0; i < iv->n_items; i++) {
            iv->jobs[i].targets = &iv->items[i].targets;
            iv->jobs[i].tenant_id = iv->items[i].inv.tenant_id;
            iv->jobs[i].event_id = iv->items[i].inv.event_id;
            iv->jobs[i].deleted = 0;
            iv->jobs[i].prefix_matches = 0;
        }
        fault_point("before-redis-apply"); /* read, not applied */
        if (cache_apply(iv->conf->cache, iv->jobs, iv->n_items,
                        iv->conf->channel, iv->conf->scan_count, err,
                        sizeof(err)) == -1) {
            invalidator_fail(iv, err);
            return -1;
        }
        invalidator_count(iv);
    }
    if (iv->redis_down)
        log_info("cache-invalidation: redis available again");
    iv->redis_down = false;
    backoff_reset(&iv->redis);
    invalidator_redis_ok(iv);

    l = parts_in_batch(&iv->pl.parts, false);
    for (int i = 0; i < l->cnt; i++) {
        parts_get(&iv->pl.parts, l->elems[i].partition)->committed =
            l->elems[i].offset;
        dead_letter_forget(iv->conf->dlq, l->elems[i].partition,
                           l->elems[i].offset);
    }
    kerr = l->cnt > 0 ? kafka_consumer_commit(iv->pl.kc, l, sync)
                      : RD_KAFKA_RESP_ERR_NO_ERROR;
    if (kerr && kerr != RD_KAFKA_RESP_ERR__NO_OFFSET)
        log_warn("cache-invalidation: offset commit: %s (the batch may be "
                 "applied again, which is harmless)",
                 rd_kafka_err2str(kerr));
    rd_kafka_topic_partition_list_destroy(l);
    log_debug("cache-invalidation: %zu applied, %zu dead letters", iv->n_items,
              iv->batch_dlq);
    invalidator_clear(iv);
    return 0;
}

/* ---------------------------------------------------------------- */
/* Messages                                                           */

static void invalidator_handle(void *arg, const rd_kafka_message_t *rkm)
{
    invalidator_t *iv = arg;
    part_t *p = parts_get(&iv->pl.parts, rkm->partition);
    inv_item_t *item;
    invalidation_reason_t reason;
    char err[512];

    if (p->state != PART_ACTIVE)
        return; /* fetched before a pause or rewind: comes again */
    metric_add(iv->messages, 1);
    /* In the batch before anything can fail, so that a rewind covers
     * this message too. */
    if (!p->in_batch) {
        p->in_batch = true;
        p->first = rkm->offset;
    }
    p->next = rkm->offset + 1;
    if (iv->batch_msgs++ == 0)
        iv->batch_opened_ms = now_ms();
    item = &iv->items[iv->n_items];
    reason =
        invalidation_parse(rkm->payload, rkm->len, iv->conf->max_message_bytes,
                           &item->inv, err, sizeof(err));
    if (reason == INVALIDATION_OK &&
        cache_targets_build(&item->inv, iv->conf->cache_prefix,
                            &item->targets) == -1) {
        /* The parser's rules passed, so only ENOMEM gets here. */
        pipeline_fatal(&iv->pl, "out of memory building cache keys");
        return;
    }
    if (reason != INVALIDATION_OK) {
        char dlq_err[512];
        if (pipeline_dead_letter(iv->conf->dlq, iv->conf->dlq_topic, rkm,
                                 invalidation_reason_code(reason), err,
                                 iv->conf->max_message_bytes,
                                 iv->dead_letters[reason], dlq_err,
                                 sizeof(dlq_err)) == -1) {
            invalidator_fail(iv, dlq_err); /* rewinds: comes again */
            return;
        }
        iv->batch_dlq++; /* acknowledged before the offsets commit */
    } else {
        iv->n_items++;
    }
}

/* ---------------------------------------------------------------- */
/* Rebalances                                                         */

static void invalidator_assign(void *arg,
                               rd_kafka_topic_partition_list_t *parts)
{
    invalidator_t *iv = arg;
    rd_kafka_error_t *error = rd_kafka_incremental_assign(iv->pl.rk, parts);

    if (error) {
        log_error("cache-invalidation: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    for (int i = 0; i < parts->cnt; i++) {
        int32_t partition = parts->elems[i].partition;
        if (parts_get(&iv->pl.parts, partition)->state != PART_UNASSIGNED)
            parts_set_state(&iv->pl.parts, partition, PART_UNASSIGNED,
                            "assigned again");
        parts_set_state(&iv->pl.parts, partition,
                        iv->redis_down ? PART_WAITING : PART_ACTIVE,
                        iv->redis_down ? "assigned; redis unavailable"
                                       : "assigned");
    }
    parts_sync(&iv->pl.parts);
    parts_report_assigned(&iv->pl.parts);
}

static void
invalidator_revoke(void *arg, rd_kafka_topic_partition_list_t *parts, bool lost)
{
    invalidator_t *iv = arg;
    rd_kafka_error_t *error;

    if (!lost)
        invalidator_apply(iv, true); /* rewinds on failure */
    for (int i = 0; i < parts->cnt; i++) {
        int32_t partition = parts->elems[i].partition;
        if (parts_get(&iv->pl.parts, partition)->state != PART_UNASSIGNED)
            parts_set_state(&iv->pl.parts, partition, PART_UNASSIGNED,
                            lost ? "lost" : "revoked");
        dead_letter_forget(iv->conf->dlq, partition, INT64_MAX);
    }
    /* Lost: the batch is not applied; what it holds of the partitions
     * still ours is read again. */
    if (lost && iv->batch_msgs > 0) {
        log_warn("cache-invalidation: %zu messages not applied (partitions "
                 "lost); reading those still assigned again",
                 iv->batch_msgs);
        invalidator_rewind(iv);
    }
    error = rd_kafka_incremental_unassign(iv->pl.rk, parts);
    if (error) {
        log_error("cache-invalidation: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    parts_report_assigned(&iv->pl.parts);
}

/* ---------------------------------------------------------------- */
/* The loop                                                           */

/* As the token-usage consumer's (usage_consumer.c): small compressed fetches
 * keep the decompressed data of one response bounded. The pre-fetch queue
 * is 16 MiB: librdkafka 2.0.2 stops fetching once it holds that much and
 * is slow to start again after the consumer drains it, which at 2 MiB
 * held invalidations to ~30,000/s whatever Redis did (100,000+ at 16). */
const char *const invalidation_consumer_kafka_defaults[] = {
    "client.id",
    "tally-invalidator",
    "queued.max.messages.kbytes",
    "16384",
    "message.max.bytes",
    "65536",
    "fetch.max.bytes",
    "65536",
    "max.partition.fetch.bytes",
    "65536",
    NULL,
};

/* Before each poll: while Redis is down, try it again when the backoff
 * says so, and resume every partition once it answers. */
static int invalidator_prepare(void *arg)
{
    invalidator_t *iv = arg;
    char err[512];

    if (!iv->redis_down || backoff_waiting(&iv->redis))
        return 100;
    if (cache_connect(iv->conf->cache, err, sizeof(err)) == 0) {
        log_info("cache-invalidation: redis reachable, resuming");
        iv->redis_down = false;
        backoff_reset(&iv->redis);
        invalidator_redis_ok(iv);
        parts_move_all(&iv->pl.parts, PART_WAITING, PART_ACTIVE,
                       "redis reachable");
        parts_sync(&iv->pl.parts);
    } else {
        int waits = backoff_fail(&iv->redis);
        log_warn("cache-invalidation: %s; retrying in %d s", err, waits / 1000);
    }
    return 100;
}

static void invalidator_tick(void *arg)
{
    invalidator_t *iv = arg;
    if (iv->batch_msgs > 0 &&
        (iv->batch_msgs >= iv->conf->batch_size ||
         now_ms() - iv->batch_opened_ms >= iv->conf->batch_ms))
        invalidator_apply(iv, false);
    invalidator_ping(iv);
    parts_update_lag(&iv->pl.parts, PING_MS);
}

static void invalidator_finish(void *arg, bool fatal)
{
    invalidator_t *iv = arg;
    if (!fatal)
        invalidator_apply(iv, true);
}

static const pipeline_ops_t invalidator_ops = {
    .prepare = invalidator_prepare,
    .handle = invalidator_handle,
    .tick = invalidator_tick,
    .assign = invalidator_assign,
    .revoke = invalidator_revoke,
    .finish = invalidator_finish,
};

int invalidation_consumer_run(const invalidation_consumer_conf_t *conf,
                              char *errstr, size_t errstr_size)
{
    invalidator_t iv;
    int rc;

    memset(&iv, 0, sizeof(iv));
    iv.conf = conf;
    pipeline_init(&iv.pl, conf->kc, conf->topic, &invalidator_ops, &iv,
                  conf->stop, "tally_invalidation_lag_messages",
                  "messages after the committed position, per assigned "
                  "partition");
    backoff_init(&iv.redis, BACKOFF_MIN_MS, BACKOFF_MAX_MS);
    invalidator_metrics_init(&iv);
    /* Next to token usage the pre-fetch queue holds 10,000 messages,
     * which drain well within librdkafka's one-second wait: nudge the
     * fetcher as token usage does (200,000 invalidations drained beside
     * 500,000 events in 4-5 s, not 18). With the 16 MiB queue of an
     * invalidation-only process the nudges' round trips cost more than
     * they save. */
    iv.pl.nudge = conf->nudge_fetches;
    if (iv.pl.nudge)
        iv.pl.nudges = metrics_counter(
            "tally_invalidation_fetch_nudges_total", NULL,
            "requests sent to wake librdkafka's fetcher after the "
            "pre-fetch queue filled up and drained (librdkafka 2.0.2 "
            "would wait up to 1 s)");
    iv.items = calloc(conf->batch_size, sizeof(*iv.items));
    iv.jobs = calloc(conf->batch_size, sizeof(*iv.jobs));
    if (!iv.items || !iv.jobs)
        abort(); /* out of memory at start */
    log_info("consuming %s as group %s (Redis keys under %s:, notices on "
             "%s; dead letters to %s)",
             conf->topic, conf->group, conf->cache_prefix, conf->channel,
             conf->dlq_topic);
    rc = pipeline_run(&iv.pl, errstr, errstr_size);
    invalidator_clear(&iv);
    free(iv.items);
    free(iv.jobs);
    parts_free(&iv.pl.parts);
    return rc;
}
