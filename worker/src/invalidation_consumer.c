/* The cache-invalidation consumer: poll, validate, apply to Redis, notify. */
#include "invalidation_consumer.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "cache_key.h"
#include "invalidation_event.h"
#include "fault.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define DLQ_FLUSH_MS 30000
#define DATA_TYPE_LABELS_MAX 64 /* distinct data_type label values */
#define PING_MS 5000            /* check Redis this often while idle */

/* A partition's part in the open batch. */
typedef struct {
    bool assigned;
    bool in_batch;
    metric_t *lag; /* tally_invalidation_lag_messages of this partition */
    int64_t first; /* first offset in the batch: where to rewind to */
    int64_t next;  /* offset after the last one in the batch */
} inv_part_t;

/* One accepted invalidation of the open batch. */
typedef struct {
    invalidation_t inv;
    cache_targets_t targets;
} inv_item_t;

typedef struct {
    const invalidation_consumer_conf_t *conf;
    rd_kafka_t *rk;
    inv_part_t *parts;
    int32_t n_parts;
    inv_item_t *items;
    cache_job_t *jobs;
    size_t n_items;
    size_t batch_msgs, batch_dlq;
    int64_t batch_opened_ms;
    bool redis_down;
    int64_t retry_at_ms;
    int backoff_ms;
    bool fatal;
    char fatal_error[512];
    metric_t *messages, *redis_up, *redis_errors, *assigned;
    metrics_ready_t *ready;
    metric_t *rebalances;
    int64_t redis_seen_ms; /* Redis last answered */
    int64_t lag_ms;        /* lag gauges last updated */
    metric_t *dead_letters[INVALIDATION_ERR__COUNT];
} invalidator_t;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void invalidator_metrics_init(invalidator_t *iv)
{
    static char labels[INVALIDATION_ERR__COUNT][64];
    iv->messages = metrics_counter("tally_invalidation_messages_total", NULL,
                                   "cache-invalidation messages consumed");
    iv->redis_up = metrics_gauge("tally_redis_up", NULL,
                                 "1 when the Redis connection works");
    iv->ready = metrics_readiness("cache-invalidation");
    iv->rebalances =
        metrics_counter("tally_invalidation_rebalances_total", NULL,
                        "rebalance callbacks (assignments and revocations) of "
                        "cache-invalidation");
    iv->redis_errors = metrics_counter(
        "tally_redis_errors_total", NULL,
        "Redis failures (the batch is applied again after a backoff)");
    iv->assigned = metrics_gauge("tally_invalidation_partitions_assigned", NULL,
                                 "cache-invalidation partitions assigned");
    for (int r = 1; r < INVALIDATION_ERR__COUNT; r++) {
        snprintf(labels[r], sizeof(labels[r]), "reason=\"%s\"",
                 invalidation_reason_code((invalidation_reason_t)r));
        iv->dead_letters[r] = metrics_counter(
            "tally_invalidation_dead_letters_total", labels[r],
            "invalidations sent to the dead-letter topic, by reason");
    }
}

/* The state of `partition` (>= 0), grown on demand. Never NULL. */
static inv_part_t *inv_part(invalidator_t *iv, int32_t partition)
{
    if (partition < 0)
        abort();
    if (partition >= iv->n_parts) {
        int32_t n = partition + 1;
        inv_part_t *p = realloc(iv->parts, (size_t)n * sizeof(*p));
        if (!p)
            abort();
        memset(p + iv->n_parts, 0, (size_t)(n - iv->n_parts) * sizeof(*p));
        iv->parts = p;
        iv->n_parts = n;
    }
    return &iv->parts[partition];
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
    for (int32_t i = 0; i < iv->n_parts; i++)
        iv->parts[i].in_batch = false;
}

/* Pauses (true) or resumes every assigned partition. */
static void invalidator_pause_all(invalidator_t *iv, bool pause)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(iv->n_parts + 1);
    for (int32_t i = 0; i < iv->n_parts; i++)
        if (iv->parts[i].assigned)
            rd_kafka_topic_partition_list_add(l, iv->conf->topic, i);
    if (l->cnt > 0) {
        if (pause)
            rd_kafka_pause_partitions(iv->rk, l);
        else
            rd_kafka_resume_partitions(iv->rk, l);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* The batch could not be applied: nothing of it is committed; its
 * partitions go back to their first offsets in it, and everything waits
 * for Redis (or Kafka) with backoff. */
static void invalidator_fail(invalidator_t *iv, const char *why)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(iv->n_parts + 1);
    rd_kafka_error_t *error;

    log_warn("cache-invalidation: %zu messages not applied (%s); retrying "
             "in %d s",
             iv->batch_msgs, why, iv->backoff_ms / 1000);
    metric_add(iv->redis_errors, 1);
    for (size_t i = 0; i < iv->n_items; i++)
        metric_add(metrics_counter_labeled(
                       "tally_invalidation_errors_total", "data_type",
                       iv->items[i].inv.data_type, DATA_TYPE_LABELS_MAX,
                       "invalidations whose application failed and is "
                       "retried, by data_type"),
                   1);
    for (int32_t i = 0; i < iv->n_parts; i++)
        if (iv->parts[i].assigned && iv->parts[i].in_batch)
            rd_kafka_topic_partition_list_add(l, iv->conf->topic, i)->offset =
                iv->parts[i].first;
    invalidator_clear(iv);
    invalidator_pause_all(iv, true);
    if (l->cnt > 0) {
        error = kafka_seek_partitions(iv->rk, l, 10000);
        if (error) {
            /* Cannot rewind: stop rather than skip invalidations. */
            snprintf(iv->fatal_error, sizeof(iv->fatal_error),
                     "cannot rewind %s after a failure: %s", iv->conf->topic,
                     rd_kafka_error_string(error));
            iv->fatal = true;
            rd_kafka_error_destroy(error);
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
    iv->redis_down = true;
    iv->retry_at_ms = now_ms() + iv->backoff_ms;
    iv->backoff_ms = iv->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS
                                                         : iv->backoff_ms * 2;
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
    iv->backoff_ms = BACKOFF_MIN_MS;
    invalidator_redis_ok(iv);

    l = rd_kafka_topic_partition_list_new(iv->n_parts + 1);
    for (int32_t i = 0; i < iv->n_parts; i++) {
        if (!iv->parts[i].in_batch)
            continue;
        rd_kafka_topic_partition_list_add(l, iv->conf->topic, i)->offset =
            iv->parts[i].next;
        dead_letter_forget(iv->conf->dlq, i, iv->parts[i].next);
    }
    kerr = rd_kafka_commit(iv->rk, l, sync ? 0 : 1);
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

static void invalidator_handle(invalidator_t *iv, const rd_kafka_message_t *rkm)
{
    inv_part_t *p;
    inv_item_t *item;
    invalidation_reason_t reason;
    char err[512];

    if (rkm->err) {
        if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
            log_warn("cache-invalidation consumer: %s",
                     rd_kafka_err2str(rkm->err));
        return;
    }
    p = inv_part(iv, rkm->partition);
    if (!p->assigned || iv->redis_down)
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
        snprintf(iv->fatal_error, sizeof(iv->fatal_error),
                 "out of memory building cache keys");
        iv->fatal = true;
        return;
    }
    if (reason != INVALIDATION_OK) {
        log_warn("%s [%" PRId32 "] offset %" PRId64 ": rejected (%s): %s",
                 iv->conf->topic, rkm->partition, rkm->offset,
                 invalidation_reason_code(reason), err);
        switch (dead_letter_send(iv->conf->dlq, rkm, iv->conf->dlq_topic,
                                 invalidation_reason_code(reason), err,
                                 iv->conf->max_message_bytes, err,
                                 sizeof(err))) {
        case -1:
            invalidator_fail(iv, err); /* rewinds: comes again */
            return;
        case 0:
            metric_add(iv->dead_letters[reason], 1);
            break;
        default:
            break; /* sent before this rewind: not again */
        }
        iv->batch_dlq++; /* acknowledged before the offsets commit */
    } else {
        iv->n_items++;
    }
}

/* ---------------------------------------------------------------- */
/* Rebalances                                                         */

static void inv_rebalance_cb(void *arg, rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *parts, bool lost)
{
    invalidator_t *iv = arg;
    rd_kafka_error_t *error;
    int64_t n = 0;

    metric_add(iv->rebalances, 1);
    log_info("rebalance (%s): %s %d partitions%s", iv->conf->topic,
             err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS ? "assigned"
                                                         : "revoked",
             parts->cnt, lost ? " (lost)" : "");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        error = rd_kafka_incremental_assign(rk, parts);
        for (int i = 0; i < parts->cnt; i++) {
            inv_part_t *p = inv_part(iv, parts->elems[i].partition);
            metric_t *lag = p->lag; /* the series outlives assignments */
            memset(p, 0, sizeof(*p));
            p->lag = lag;
            p->assigned = true;
        }
        /* librdkafka keeps a pause across unassign and assign: say what
         * we want either way. */
        if (iv->redis_down)
            rd_kafka_pause_partitions(rk, parts);
        else
            rd_kafka_resume_partitions(rk, parts);
    } else {
        if (lost)
            invalidator_fail(iv, "partitions lost");
        else
            invalidator_apply(iv, true); /* rewinds on failure */
        for (int i = 0; i < parts->cnt; i++) {
            inv_part_t *p = inv_part(iv, parts->elems[i].partition);
            p->assigned = false;
            p->in_batch = false;
            dead_letter_forget(iv->conf->dlq, parts->elems[i].partition,
                               INT64_MAX);
            if (p->lag)
                metric_set(p->lag, 0); /* its next owner reports it */
        }
        error = rd_kafka_incremental_unassign(rk, parts);
    }
    if (error) {
        log_error("cache-invalidation: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    for (int32_t i = 0; i < iv->n_parts; i++)
        n += iv->parts[i].assigned;
    metric_set(iv->assigned, n);
}

/* Every few seconds: per assigned partition, the messages between what
 * this consumer has read (its position) and the log end, from the
 * watermarks of librdkafka's last fetch (no broker round trip). */
static void invalidator_update_lag(invalidator_t *iv)
{
    rd_kafka_topic_partition_list_t *l;

    if (now_ms() - iv->lag_ms < PING_MS)
        return;
    iv->lag_ms = now_ms();
    l = rd_kafka_topic_partition_list_new(iv->n_parts + 1);
    for (int32_t i = 0; i < iv->n_parts; i++)
        if (iv->parts[i].assigned)
            rd_kafka_topic_partition_list_add(l, iv->conf->topic, i);
    if (l->cnt > 0 && rd_kafka_position(iv->rk, l) == 0) {
        for (int i = 0; i < l->cnt; i++) {
            inv_part_t *p = &iv->parts[l->elems[i].partition];
            int64_t lo = -1, hi = -1, lag = 0, pos = l->elems[i].offset;
            if (!p->lag) {
                char labels[320];
                snprintf(labels, sizeof(labels),
                         "topic=\"%s\",partition=\"%" PRId32 "\"",
                         iv->conf->topic, l->elems[i].partition);
                p->lag = metrics_gauge(
                    "tally_invalidation_lag_messages", strdup(labels),
                    "messages after the consumed position, per assigned "
                    "partition");
            }
            if (rd_kafka_get_watermark_offsets(
                    iv->rk, iv->conf->topic, l->elems[i].partition, &lo, &hi) ==
                    RD_KAFKA_RESP_ERR_NO_ERROR &&
                hi >= 0) {
                int64_t from = pos >= 0 ? pos : lo;
                lag = from >= 0 && hi > from ? hi - from : 0;
            }
            metric_set(p->lag, lag);
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---------------------------------------------------------------- */
/* The loop                                                           */

/* As the token-usage consumer's (usage_consumer.c): small compressed fetches
 * keep the decompressed data of one response bounded. */
const char *const invalidation_consumer_kafka_defaults[] = {
    "client.id",
    "tally-invalidator",
    "queued.max.messages.kbytes",
    "2048",
    "message.max.bytes",
    "65536",
    "fetch.max.bytes",
    "65536",
    "max.partition.fetch.bytes",
    "65536",
    NULL,
};

int invalidation_consumer_run(const invalidation_consumer_conf_t *conf,
                              char *errstr, size_t errstr_size)
{
    invalidator_t iv;
    int rc = -1;

    memset(&iv, 0, sizeof(iv));
    iv.conf = conf;
    iv.backoff_ms = BACKOFF_MIN_MS;
    invalidator_metrics_init(&iv);
    iv.items = calloc(conf->batch_size, sizeof(*iv.items));
    iv.jobs = calloc(conf->batch_size, sizeof(*iv.jobs));
    if (!iv.items || !iv.jobs)
        abort(); /* out of memory at start */
    iv.rk = kafka_consumer_rk(conf->kc);
    if (kafka_consumer_subscribe(conf->kc, conf->topic, inv_rebalance_cb, &iv,
                                 errstr, errstr_size) == -1)
        goto out;
    log_info("consuming %s as group %s (Redis keys under %s:, notices on "
             "%s; dead letters to %s)",
             conf->topic, conf->group, conf->cache_prefix, conf->channel,
             conf->dlq_topic);

    while (!*conf->stop && !iv.fatal) {
        rd_kafka_message_t *rkm;

        if (iv.redis_down && now_ms() >= iv.retry_at_ms) {
            char e[512];
            if (cache_connect(conf->cache, e, sizeof(e)) == 0) {
                log_info("cache-invalidation: redis reachable, resuming");
                iv.redis_down = false;
                invalidator_redis_ok(&iv);
                invalidator_pause_all(&iv, false);
            } else {
                log_warn("cache-invalidation: %s; retrying in %d s", e,
                         iv.backoff_ms / 1000);
                iv.retry_at_ms = now_ms() + iv.backoff_ms;
                iv.backoff_ms = iv.backoff_ms * 2 > BACKOFF_MAX_MS
                                    ? BACKOFF_MAX_MS
                                    : iv.backoff_ms * 2;
            }
        }
        rkm = rd_kafka_consumer_poll(iv.rk, 100);
        if (rkm) {
            if (rkm->err == RD_KAFKA_RESP_ERR__FATAL) {
                char reason[256];
                rd_kafka_fatal_error(iv.rk, reason, sizeof(reason));
                snprintf(iv.fatal_error, sizeof(iv.fatal_error),
                         "fatal kafka error: %s", reason);
                iv.fatal = true;
            } else {
                invalidator_handle(&iv, rkm);
            }
            rd_kafka_message_destroy(rkm);
        }
        if (iv.batch_msgs > 0 &&
            (iv.batch_msgs >= conf->batch_size ||
             now_ms() - iv.batch_opened_ms >= conf->batch_ms))
            invalidator_apply(&iv, false);
        invalidator_ping(&iv);
        invalidator_update_lag(&iv);
    }
    log_info("cache-invalidation: stopping");
    if (!iv.fatal)
        invalidator_apply(&iv, true);
    kafka_consumer_close(conf->kc); /* the last revocation comes here */
    iv.rk = NULL;
    if (iv.fatal) {
        snprintf(errstr, errstr_size, "%s", iv.fatal_error);
        goto out;
    }
    rc = 0;
out:
    if (iv.rk)
        kafka_consumer_close(conf->kc);
    invalidator_clear(&iv);
    free(iv.items);
    free(iv.jobs);
    free(iv.parts);
    return rc;
}
