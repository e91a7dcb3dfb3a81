/* The token-usage consumer: poll loop, rebalances, batching, commits. */
#include "usage_consumer.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "usage_batch.h"
#include "fault.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "usage_event.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define FENCE_RETRY_MS 30000  /* re-claim a fenced partition after this */
#define ENUM_REFRESH_MS 10000 /* re-read enums on an unknown value */
#define DLQ_FLUSH_MS 30000
#define PROGRESS_MS 10000
#define PING_MS 5000 /* check Postgres this often while idle */

/* Where a partition stands. */
typedef enum {
    PART_CLAIMING, /* paused: its position must be read from Postgres */
    PART_ACTIVE,   /* consuming from `next` */
    PART_FENCED,   /* another member claimed it: paused until revoked */
} part_state_t;

typedef struct {
    bool assigned;
    part_state_t state;
    int64_t epoch;     /* our claim's fencing token */
    int64_t committed; /* next offset per Postgres (or a logical offset) */
    int64_t next;      /* next offset to process */
    bool in_batch;     /* has messages in the open batch */
    int64_t fenced_at_ms;
    metric_t *lag; /* tally_usage_lag_messages of this partition */
} part_t;

typedef struct {
    metric_t *messages, *counted, *dup_batch, *dup_store, *conflicts;
    metric_t *dead_letters[USAGE_ERR__COUNT];
    metric_t *batches, *batch_failures, *fenced, *pg_up, *assigned;
    metric_t *commit_us, *skipped, *store_rejected;
    metric_t *parse_ns, *poll_ns, *commit_wait_ns;
    metric_t *batch_messages, *commit_duration, *rebalances;
    metrics_ready_t *ready;
} consumer_metrics_t;

/* The committer thread: commits one sealed batch while the main thread
 * fills the next. Depth one: a batch is handed over only after the
 * previous one's result was collected, so commits stay in offset order.
 * While a job is out, only the committer touches the store. */
typedef struct {
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool busy; /* handed over and not collected yet */
    bool done; /* result ready */
    bool quit;
    store_t *store;
    batch_t *batch;
    store_position_t *pos;
    size_t n;
    size_t msgs, dlq;
    store_status_t status;
    store_batch_result_t res;
    int64_t took_us;
    char err[512];
} committer_t;

typedef struct {
    const usage_consumer_conf_t *conf;
    rd_kafka_t *rk;
    committer_t com;
    batch_t *spare; /* the other batch buffer, when not with the committer */
    part_t *parts;
    int32_t n_parts;
    batch_t *batch;
    size_t batch_msgs, batch_bytes, batch_dlq;
    int64_t batch_opened_ms;
    int64_t pg_retry_at_ms;
    int pg_backoff_ms;
    bool pg_down_logged;
    usage_enum_t token_types, operations;
    int64_t enums_read_ms;
    int64_t last_prune_ms;
    bool fatal;
    char fatal_error[512];
    bool synced; /* a rebalance came: the group has settled once */
    int64_t assigned_reported; /* this member's part of the gauge */
    int64_t pg_seen_ms;        /* Postgres last answered */
    consumer_metrics_t m;
    int64_t lag_ms; /* lag gauges last updated */
    /* progress */
    int64_t progress_ms;
    int64_t progress_counted;
} consumer_t;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The series are shared by the members of the group in this process
 * (registering one again returns it); gauges are per member where noted. */
static void consumer_metrics_init(consumer_metrics_t *m, const char *ready_name)
{
    static const double batch_bounds[] = {1,    10,   100,   500,   1000,
                                          2500, 5000, 10000, 25000, 100000};
    static const double commit_bounds[] = {
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
    m->batch_messages = metrics_histogram(
        "tally_usage_batch_messages", NULL, "messages per committed batch",
        batch_bounds, sizeof(batch_bounds) / sizeof(*batch_bounds));
    m->commit_duration = metrics_histogram(
        "tally_usage_commit_duration_seconds", NULL,
        "duration of a batch's Postgres transaction", commit_bounds,
        sizeof(commit_bounds) / sizeof(*commit_bounds));
    m->ready = metrics_readiness(ready_name);
    m->rebalances = metrics_counter(
        "tally_usage_rebalances_total", NULL,
        "rebalance callbacks (assignments and revocations) of token-usage");
    static char labels[USAGE_ERR__COUNT][64];
    m->messages = metrics_counter("tally_usage_messages_total", NULL,
                                  "token-usage messages consumed");
    m->counted = metrics_counter("tally_usage_events_counted_total", NULL,
                                 "events counted into the sums");
    m->dup_batch = metrics_counter(
        "tally_usage_duplicates_total", "where=\"batch\"",
        "duplicate events dropped (same tenant and idempotency key)");
    m->dup_store = metrics_counter("tally_usage_duplicates_total",
                                   "where=\"store\"", NULL);
    m->conflicts = metrics_counter(
        "tally_usage_conflicts_total", NULL,
        "duplicates whose payload differed from the first (first wins)");
    for (int r = 1; r < USAGE_ERR__COUNT; r++) {
        snprintf(labels[r], sizeof(labels[r]), "reason=\"%s\"",
                 usage_reason_code((usage_reason_t)r));
        m->dead_letters[r] = metrics_counter(
            "tally_usage_dead_letters_total", labels[r],
            "messages sent to the dead-letter topic, by reason");
    }
    m->store_rejected = metrics_counter("tally_usage_dead_letters_total",
                                        "reason=\"store_rejected\"", NULL);
    m->batches = metrics_counter("tally_usage_batches_total", NULL,
                                 "batches committed to Postgres");
    m->batch_failures = metrics_counter(
        "tally_usage_batch_failures_total", NULL,
        "batches abandoned (Postgres or dead-letter failure, fencing)");
    m->fenced = metrics_counter(
        "tally_usage_fenced_total", NULL,
        "commits refused because another member claimed a partition");
    m->pg_up = metrics_gauge("tally_postgres_up", NULL,
                             "1 when the Postgres connection works");
    m->assigned = metrics_gauge("tally_usage_partitions_assigned", NULL,
                                "token-usage partitions assigned");
    /* Added in micro- and nanoseconds, rendered in seconds. */
    m->commit_us =
        metrics_counter_scaled("tally_usage_commit_seconds_total", NULL,
                               "time spent committing batches to Postgres", 6);
    m->parse_ns =
        metrics_counter_scaled("tally_usage_parse_seconds_total", NULL,
                               "time spent parsing and validating messages", 9);
    m->poll_ns = metrics_counter_scaled(
        "tally_usage_poll_seconds_total", NULL,
        "time spent in the Kafka consumer poll (waiting for messages)", 9);
    m->commit_wait_ns = metrics_counter_scaled(
        "tally_usage_commit_wait_seconds_total", NULL,
        "time the consumer waited for the previous batch's commit", 9);
    m->skipped =
        metrics_counter("tally_usage_messages_skipped_total", NULL,
                        "messages of paused partitions, fetched again later");
}

/* ---------------------------------------------------------------- */
/* Partitions                                                         */

/* The state of `partition` (>= 0: librdkafka's partitions always are),
 * grown on demand. Never NULL. */
static part_t *consumer_part(consumer_t *c, int32_t partition)
{
    if (partition < 0)
        abort();
    if (partition >= c->n_parts) {
        int32_t n = partition + 1;
        part_t *p = realloc(c->parts, (size_t)n * sizeof(*p));
        if (!p)
            abort();
        memset(p + c->n_parts, 0, (size_t)(n - c->n_parts) * sizeof(*p));
        c->parts = p;
        c->n_parts = n;
    }
    return &c->parts[partition];
}

static int64_t consumer_start_offset(const consumer_t *c)
{
    return strcmp(c->conf->start_from, "latest") == 0
               ? RD_KAFKA_OFFSET_END
               : RD_KAFKA_OFFSET_BEGINNING;
}

/* /readyz and tally_postgres_up as the pipeline stands: ready once the
 * group has settled (partitions assigned, or none for us with the group
 * settled) and Postgres answers. */
static void consumer_update_ready(consumer_t *c)
{
    bool pg = store_is_connected(c->conf->store) && c->pg_retry_at_ms == 0;
    metric_set(c->m.pg_up, pg);
    if (!pg)
        metrics_set_ready(c->m.ready, false, "postgres unavailable");
    else if (!c->synced)
        metrics_set_ready(c->m.ready, false,
                          "waiting for a partition assignment");
    else
        metrics_set_ready(c->m.ready, true, NULL);
}

static void consumer_update_assigned_gauge(consumer_t *c)
{
    int64_t n = 0;
    for (int32_t i = 0; i < c->n_parts; i++)
        n += c->parts[i].assigned;
    /* The gauge is the sum over the members: add this one's change. */
    metric_add(c->m.assigned, (uint64_t)(n - c->assigned_reported));
    c->assigned_reported = n;
    c->synced = true; /* called from the rebalance callback */
    consumer_update_ready(c);
}

/* Pauses the partitions in state `state`, e.g. after a failed batch. */
static void consumer_pause_state(consumer_t *c, part_state_t state)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(c->n_parts);
    for (int32_t i = 0; i < c->n_parts; i++)
        if (c->parts[i].assigned && c->parts[i].state == state)
            rd_kafka_topic_partition_list_add(l, c->conf->topic, i);
    if (l->cnt > 0)
        rd_kafka_pause_partitions(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---------------------------------------------------------------- */
/* Postgres availability                                              */

static void consumer_pg_failed(consumer_t *c, const char *what,
                               const char *error)
{
    int64_t t = now_ms();
    log_warn("%s: %s; retrying in %d s", what, error, c->pg_backoff_ms / 1000);
    c->pg_retry_at_ms = t + c->pg_backoff_ms;
    c->pg_backoff_ms *= 2;
    if (c->pg_backoff_ms > BACKOFF_MAX_MS)
        c->pg_backoff_ms = BACKOFF_MAX_MS;
    consumer_update_ready(c);
}

static void consumer_pg_ok(consumer_t *c);

/* True when Postgres can be used now; reconnects at most once per backoff
 * step. */
static bool consumer_pg_ready(consumer_t *c)
{
    char err[512];
    if (store_is_connected(c->conf->store) && now_ms() >= c->pg_retry_at_ms)
        return true;
    if (now_ms() < c->pg_retry_at_ms)
        return false;
    if (store_connect(c->conf->store, err, sizeof(err)) == -1) {
        consumer_pg_failed(c, "postgres unavailable", err);
        c->pg_down_logged = true;
        return false;
    }
    consumer_pg_ok(c);
    return true;
}

/* Postgres answered (a commit, a claim, a ping): backoff reset, and the
 * end of an outage logged once, whichever path noticed it. */
static void consumer_pg_ok(consumer_t *c)
{
    if (c->pg_down_logged)
        log_info("postgres connection restored");
    c->pg_down_logged = false;
    c->pg_backoff_ms = BACKOFF_MIN_MS;
    c->pg_retry_at_ms = 0;
    c->pg_seen_ms = now_ms();
    consumer_update_ready(c);
}

static bool consumer_collect(consumer_t *c, bool wait);

/* ---------------------------------------------------------------- */
/* Claims: positions come from Postgres, never from Kafka              */

/* Claims the partitions of `l` (all in state CLAIMING) and sets their
 * offsets in `l` to where to resume. Returns 0, or -1 (Postgres down or
 * failed; they stay CLAIMING). */
static int consumer_claim(consumer_t *c, rd_kafka_topic_partition_list_t *l)
{
    store_position_t *pos = NULL;
    bool *resolved = NULL; /* --start-from latest resolved and logged */
    char err[512];
    int rc = -1;

    if (l->cnt == 0)
        return 0;
    consumer_collect(c, true); /* the store is ours from here */
    for (int i = 0; i < l->cnt; i++) {
        /* Fenced meanwhile: our view of the group is stale; wait. */
        if (consumer_part(c, l->elems[i].partition)->state != PART_CLAIMING)
            return -1;
    }
    if (!consumer_pg_ready(c))
        return -1;
    pos = calloc((size_t)l->cnt, sizeof(*pos));
    resolved = calloc((size_t)l->cnt, sizeof(*resolved));
    if (!pos || !resolved)
        abort();
    for (int i = 0; i < l->cnt; i++) {
        pos[i].topic = c->conf->topic;
        pos[i].partition = l->elems[i].partition;
    }
    if (store_claim(c->conf->store, pos, (size_t)l->cnt, err, sizeof(err)) !=
        STORE_OK) {
        consumer_pg_failed(c, "cannot claim partitions", err);
        goto out;
    }
    consumer_pg_ok(c);
    for (int i = 0; i < l->cnt; i++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t kerr;
        if (pos[i].next_offset >= 0 || strcmp(c->conf->start_from, "latest"))
            continue;
        /* "latest" is resolved now and stored, so that a rewind before
         * the first commit comes back here rather than to a later end. */
        kerr = rd_kafka_query_watermark_offsets(
            c->rk, c->conf->topic, pos[i].partition, &lo, &hi, 10000);
        if (kerr) {
            consumer_pg_failed(c, "cannot resolve --start-from latest",
                               rd_kafka_err2str(kerr));
            goto out;
        }
        pos[i].next_offset = hi;
        if (store_init_position(c->conf->store, &pos[i], err, sizeof(err)) !=
            STORE_OK) {
            consumer_pg_failed(c, "cannot store the start position", err);
            goto out;
        }
        log_info("%s [%" PRId32 "]: claimed (epoch %" PRId64
                 "), no stored position: starting at the latest offset, "
                 "%" PRId64 " (stored)",
                 c->conf->topic, pos[i].partition, pos[i].epoch, hi);
        resolved[i] = true;
    }
    for (int i = 0; i < l->cnt; i++) {
        part_t *p = consumer_part(c, pos[i].partition);
        p->epoch = pos[i].epoch;
        p->committed = pos[i].next_offset >= 0 ? pos[i].next_offset
                                               : consumer_start_offset(c);
        p->next = pos[i].next_offset >= 0 ? pos[i].next_offset : 0;
        p->state = PART_ACTIVE;
        p->in_batch = false;
        l->elems[i].offset = p->committed;
        if (resolved[i])
            continue; /* logged when resolved */
        if (pos[i].next_offset >= 0)
            log_info("%s [%" PRId32 "]: claimed (epoch %" PRId64
                     "), resuming at offset %" PRId64,
                     c->conf->topic, pos[i].partition, pos[i].epoch,
                     pos[i].next_offset);
        else
            log_info("%s [%" PRId32 "]: claimed (epoch %" PRId64
                     "), no stored position: starting at the %s offset",
                     c->conf->topic, pos[i].partition, pos[i].epoch,
                     c->conf->start_from);
    }
    rc = 0;
out:
    free(pos);
    free(resolved);
    return rc;
}

/* Claims the paused partitions that wait for a position (and fenced ones
 * still assigned after FENCE_RETRY_MS), seeks them there and resumes. */
static void consumer_claim_pending(consumer_t *c)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_error_t *error;
    int64_t t = now_ms();

    for (int32_t i = 0; i < c->n_parts; i++) {
        part_t *p = &c->parts[i];
        if (p->assigned && p->state == PART_FENCED &&
            t - p->fenced_at_ms >= FENCE_RETRY_MS) {
            log_info("%s [%" PRId32 "]: still assigned to us after being "
                     "fenced; claiming it again",
                     c->conf->topic, i);
            p->state = PART_CLAIMING;
        }
    }
    l = rd_kafka_topic_partition_list_new(4);
    for (int32_t i = 0; i < c->n_parts; i++)
        if (c->parts[i].assigned && c->parts[i].state == PART_CLAIMING)
            rd_kafka_topic_partition_list_add(l, c->conf->topic, i);
    if (l->cnt == 0 || consumer_claim(c, l) == -1)
        goto out;
    error = kafka_seek_partitions(c->rk, l, 10000);
    if (error) {
        log_warn("seek after claim failed: %s; claiming again",
                 rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
        for (int i = 0; i < l->cnt; i++)
            consumer_part(c, l->elems[i].partition)->state = PART_CLAIMING;
        goto out;
    }
    for (int i = 0; i < l->cnt; i++) {
        if (l->elems[i].err) {
            log_warn("%s [%" PRId32 "]: seek failed: %s; claiming again",
                     c->conf->topic, l->elems[i].partition,
                     rd_kafka_err2str(l->elems[i].err));
            consumer_part(c, l->elems[i].partition)->state = PART_CLAIMING;
        }
    }
    rd_kafka_resume_partitions(c->rk, l);
    /* Those whose seek failed go back to paused. */
    consumer_pause_state(c, PART_CLAIMING);
out:
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---------------------------------------------------------------- */
/* The committer thread                                               */

static void *committer_main(void *arg)
{
    committer_t *com = arg;
    pthread_mutex_lock(&com->mu);
    for (;;) {
        while (!com->quit && !(com->busy && !com->done))
            pthread_cond_wait(&com->cv, &com->mu);
        if (com->quit)
            break;
        pthread_mutex_unlock(&com->mu);
        {
            int64_t t0 = now_us();
            com->status =
                store_commit_batch(com->store, com->batch, com->pos, com->n,
                                   &com->res, com->err, sizeof(com->err));
            com->took_us = now_us() - t0;
        }
        pthread_mutex_lock(&com->mu);
        com->done = true;
        pthread_cond_broadcast(&com->cv);
    }
    pthread_mutex_unlock(&com->mu);
    return NULL;
}

static int committer_start(committer_t *com, store_t *store)
{
    memset(com, 0, sizeof(*com));
    com->store = store;
    pthread_mutex_init(&com->mu, NULL);
    pthread_cond_init(&com->cv, NULL);
    if (pthread_create(&com->thread, NULL, committer_main, com) != 0)
        return -1;
    com->started = true;
    return 0;
}

static void committer_stop(committer_t *com)
{
    if (com->started) {
        pthread_mutex_lock(&com->mu);
        com->quit = true;
        pthread_cond_broadcast(&com->cv);
        pthread_mutex_unlock(&com->mu);
        pthread_join(com->thread, NULL);
    }
    pthread_mutex_destroy(&com->mu);
    pthread_cond_destroy(&com->cv);
    free(com->pos);
}

static void consumer_abandon_batch(consumer_t *c, const char *why);
static void consumer_commit_kafka(consumer_t *c, const store_position_t *pos,
                                  size_t n, bool sync);

/* Dead letters for the events of `batch` that Postgres refused: reason
 * store_rejected, the SQL error as the message, and the original
 * message, read again from Kafka by its position. Waits for their
 * acknowledgement. 0, or -1 with errstr (the batch is then abandoned and
 * consumed again after a backoff). */
typedef struct {
    consumer_t *c;
    const char **why;
} rejected_ctx_t;

static int consumer_send_rejected(void *arg, size_t i,
                                  const rd_kafka_message_t *rkm)
{
    rejected_ctx_t *ctx = arg;
    consumer_t *c = ctx->c;
    char err[512];
    int r;

    log_warn("%s [%" PRId32 "] offset %" PRId64 ": refused by postgres "
             "(store_rejected): %s",
             c->conf->topic, rkm->partition, rkm->offset, ctx->why[i]);
    r = dead_letter_send(c->conf->dlq, rkm, c->conf->dlq_topic,
                         "store_rejected", ctx->why[i],
                         c->conf->max_message_bytes, err, sizeof(err));
    if (r == -1) {
        log_warn("%s", err);
        return -1;
    }
    if (r == 0)
        metric_add(c->m.store_rejected, 1);
    return 0;
}

static int consumer_dead_letter_rejected(consumer_t *c, batch_t *batch,
                                         char *errstr, size_t errstr_size)
{
    size_t n = batch_count(batch), k = 0;
    kafka_position_t *want = calloc(n + 1, sizeof(*want));
    const char **why = calloc(n + 1, sizeof(*why));
    rejected_ctx_t ctx = {c, why};
    int rc = -1;

    if (!want || !why)
        abort();
    /* Seqs follow the order of arrival, so offsets ascend within each
     * partition; sorted by partition below (stable). */
    for (size_t seq = 0; seq < n; seq++) {
        const char *r = batch_rejected(batch, seq);
        const char *src = batch_event_source(batch, seq);
        const char *slash;
        if (!r)
            continue;
        /* "<topic>/<partition>/<offset>", the topic may hold '/'. */
        slash = strrchr(src, '/');
        if (!slash || slash == src)
            continue;
        want[k].offset = strtoll(slash + 1, NULL, 10);
        while (--slash > src && *slash != '/')
            ;
        want[k].partition = (int32_t)strtol(slash + 1, NULL, 10);
        why[k] = r;
        k++;
    }
    for (size_t i = 1; i < k; i++) { /* insertion sort: few entries */
        kafka_position_t w = want[i];
        const char *y = why[i];
        size_t j = i;
        while (j > 0 && want[j - 1].partition > w.partition) {
            want[j] = want[j - 1];
            why[j] = why[j - 1];
            j--;
        }
        want[j] = w;
        why[j] = y;
    }
    if (kafka_fetch_each(c->conf->cfg, c->conf->brokers, c->conf->topic, want,
                         k, DLQ_FLUSH_MS, consumer_send_rejected, &ctx, errstr,
                         errstr_size) == -1 ||
        dead_letter_flush(c->conf->dlq, DLQ_FLUSH_MS, errstr, errstr_size) ==
            -1)
        goto out;
    rc = 0;
out:
    free(want);
    free(why);
    return rc;
}

/* Takes the committer's result, if there is one (waiting for it when
 * `wait`), and acts on it: positions advanced, or the batch behind it
 * abandoned. Afterwards, when it returns true, the store is ours. */
static bool consumer_collect(consumer_t *c, bool wait)
{
    committer_t *com = &c->com;

again:
    pthread_mutex_lock(&com->mu);
    if (!com->busy) {
        pthread_mutex_unlock(&com->mu);
        return true;
    }
    if (!com->done && !wait) {
        pthread_mutex_unlock(&com->mu);
        return false;
    }
    while (!com->done)
        pthread_cond_wait(&com->cv, &com->mu);
    pthread_mutex_unlock(&com->mu);

    if (com->status == STORE_REJECTED) {
        char err[512];
        if (consumer_dead_letter_rejected(c, com->batch, err, sizeof(err)) ==
            0) {
            /* The same batch and positions, without those events. */
            pthread_mutex_lock(&com->mu);
            com->done = false;
            pthread_cond_broadcast(&com->cv);
            pthread_mutex_unlock(&com->mu);
            goto again;
        }
        snprintf(com->err, sizeof(com->err), "%s", err);
        com->status = STORE_RETRY;
    }
    if (com->status == STORE_FENCED) {
        for (size_t i = 0; i < com->n; i++) {
            if (com->pos[i].fenced)
                log_warn("%s [%" PRId32 "]: fenced: another member claimed "
                         "it (epoch %" PRId64 " is no longer current); not "
                         "committing",
                         c->conf->topic, com->pos[i].partition,
                         com->pos[i].epoch);
        }
        /* Being fenced means our view of the group is stale (a zombie
         * after a pause, typically): claiming any partition now could
         * take it from its rightful owner. All wait for librdkafka to
         * report the rebalance; one still ours after FENCE_RETRY_MS is
         * claimed again. */
        consumer_abandon_batch(c, "the batch before it was fenced");
        for (int32_t i = 0; i < c->n_parts; i++) {
            part_t *p = &c->parts[i];
            if (p->assigned && p->state != PART_FENCED) {
                p->state = PART_FENCED;
                p->fenced_at_ms = now_ms();
            }
        }
        log_warn("fenced: pausing all %s partitions until the group "
                 "settles (at most %d s)",
                 c->conf->topic, FENCE_RETRY_MS / 1000);
        metric_add(c->m.fenced, 1);
        metric_add(c->m.batch_failures, 1);
        consumer_pause_state(c, PART_FENCED);
    } else if (com->status != STORE_OK) {
        log_warn("batch of %zu messages not committed: %s", com->msgs,
                 com->err);
        metric_add(c->m.batch_failures, 1);
        consumer_pg_failed(c, "postgres commit failed", com->err);
        consumer_abandon_batch(c, "the batch before it failed");
    } else {
        fault_point("after-pg-commit"); /* before the Kafka commit */
        consumer_pg_ok(c);
        metric_add(c->m.commit_us, (uint64_t)com->took_us);
        metric_add(c->m.batches, 1);
        metric_observe(c->m.batch_messages, (double)com->msgs);
        metric_observe(c->m.commit_duration, (double)com->took_us / 1e6);
        metric_add(c->m.counted, com->res.counted);
        metric_add(c->m.dup_store, com->res.counted_before);
        metric_add(c->m.conflicts, com->res.conflicts);
        log_debug("batch committed: %zu messages, %zu counted, %zu counted "
                  "before, %zu buckets, %zu dead letters, %.1f ms",
                  com->msgs, com->res.counted, com->res.counted_before,
                  com->res.buckets, com->dlq, (double)com->took_us / 1000.0);
        for (size_t i = 0; i < com->n; i++) {
            consumer_part(c, com->pos[i].partition)->committed =
                com->pos[i].next_offset;
            dead_letter_forget(c->conf->dlq, com->pos[i].partition,
                               com->pos[i].next_offset);
        }
        consumer_commit_kafka(c, com->pos, com->n, false);
    }
    batch_clear(com->batch);
    c->spare = com->batch;
    com->batch = NULL;
    pthread_mutex_lock(&com->mu);
    com->busy = false;
    com->done = false;
    pthread_mutex_unlock(&com->mu);
    return true;
}

/* ---------------------------------------------------------------- */
/* Batches                                                            */

static void consumer_reset_batch(consumer_t *c)
{
    batch_clear(c->batch);
    c->batch_msgs = 0;
    c->batch_bytes = 0;
    c->batch_dlq = 0;
    for (int32_t i = 0; i < c->n_parts; i++)
        c->parts[i].in_batch = false;
}

/* Drops the open batch: nothing of it is committed, so every active
 * partition goes back to its Postgres position (claimed again, which also
 * settles a commit whose outcome we did not learn). */
static void consumer_abandon_batch(consumer_t *c, const char *why)
{
    int n = 0;
    if (c->batch_msgs > 0) {
        log_warn("batch of %zu messages abandoned (%s); they will be "
                 "consumed again from the positions in Postgres",
                 c->batch_msgs, why);
        metric_add(c->m.batch_failures, 1);
    }
    consumer_reset_batch(c);
    for (int32_t i = 0; i < c->n_parts; i++) {
        part_t *p = &c->parts[i];
        if (p->assigned && p->state == PART_ACTIVE) {
            p->state = PART_CLAIMING;
            n++;
        }
    }
    if (n > 0)
        consumer_pause_state(c, PART_CLAIMING);
}

static void consumer_commit_kafka(consumer_t *c, const store_position_t *pos,
                                  size_t n, bool sync)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new((int)n);
    rd_kafka_resp_err_t err;

    for (size_t i = 0; i < n; i++)
        rd_kafka_topic_partition_list_add(l, pos[i].topic, pos[i].partition)
            ->offset = pos[i].next_offset;
    /* Postgres is the source of truth; this is for lag tools only. */
    err = rd_kafka_commit(c->rk, l, sync ? 0 : 1);
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
        log_debug("kafka offset commit: %s", rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* Seals the open batch and hands it to the committer: dead letters
 * acknowledged first, then (in the committer) one Postgres transaction
 * with the events, sums and positions. With `sync`, waits for the result.
 * On any failure the batch is abandoned. Returns 0 or -1. */
static int consumer_commit_batch(consumer_t *c, bool sync)
{
    committer_t *com = &c->com;
    char err[512];
    size_t n = 0;

    int64_t t0 = mono_ns();

    consumer_collect(c, true); /* the previous one first, in order */
    metric_add(c->m.commit_wait_ns, (uint64_t)(mono_ns() - t0));
    if (c->batch_msgs == 0)
        return 0;
    if (c->batch_dlq > 0 &&
        dead_letter_flush(c->conf->dlq, DLQ_FLUSH_MS, err, sizeof(err)) == -1) {
        consumer_abandon_batch(c, err);
        /* Kafka trouble: back off before claiming and consuming again. */
        consumer_pg_failed(c, "dead letters not acknowledged", err);
        return -1;
    }
    if (!consumer_pg_ready(c)) {
        consumer_abandon_batch(c, "postgres unavailable");
        return -1;
    }
    free(com->pos);
    com->pos = calloc((size_t)c->n_parts + 1, sizeof(*com->pos));
    if (!com->pos)
        abort();
    for (int32_t i = 0; i < c->n_parts; i++) {
        part_t *p = &c->parts[i];
        if (!p->in_batch || p->state != PART_ACTIVE)
            continue;
        com->pos[n].topic = c->conf->topic;
        com->pos[n].partition = i;
        com->pos[n].next_offset = p->next;
        com->pos[n].epoch = p->epoch;
        n++;
        p->in_batch = false;
    }
    com->n = n;
    com->msgs = c->batch_msgs;
    com->dlq = c->batch_dlq;
    com->batch = c->batch;
    c->batch = c->spare;
    c->spare = NULL;
    c->batch_msgs = 0;
    c->batch_bytes = 0;
    c->batch_dlq = 0;
    pthread_mutex_lock(&com->mu);
    com->busy = true;
    com->done = false;
    pthread_cond_broadcast(&com->cv);
    pthread_mutex_unlock(&com->mu);
    if (sync)
        consumer_collect(c, true);
    return 0;
}

static bool consumer_batch_due(const consumer_t *c)
{
    if (c->batch_msgs == 0)
        return false;
    return batch_is_full(c->batch) || c->batch_msgs >= c->conf->batch_size ||
           c->batch_bytes >= c->conf->batch_bytes ||
           now_ms() - c->batch_opened_ms >= c->conf->batch_ms;
}

/* ---------------------------------------------------------------- */
/* Messages                                                           */

static void consumer_refresh_enums(consumer_t *c)
{
    char err[512];
    usage_enum_t tt, ops;
    consumer_collect(c, true);
    if (!consumer_pg_ready(c))
        return;
    if (store_read_enums(c->conf->store, &tt, &ops, err, sizeof(err)) == -1) {
        log_warn("cannot re-read enums: %s", err);
        return;
    }
    c->enums_read_ms = now_ms();
    c->token_types = tt;
    c->operations = ops;
}

static void consumer_dead_letter(consumer_t *c, const rd_kafka_message_t *rkm,
                                 usage_reason_t reason, const char *msg)
{
    char err[512];
    log_warn("%s [%" PRId32 "] offset %" PRId64 ": rejected (%s): %s",
             c->conf->topic, rkm->partition, rkm->offset,
             usage_reason_code(reason), msg);
    switch (dead_letter_send(c->conf->dlq, rkm, c->conf->dlq_topic,
                             usage_reason_code(reason), msg,
                             c->conf->max_message_bytes, err, sizeof(err))) {
    case -1:
        /* Not even queued: the offset must not advance past it. */
        consumer_abandon_batch(c, err);
        return;
    case 0:
        metric_add(c->m.dead_letters[reason], 1);
        break;
    default:
        break; /* sent before this rewind: not again */
    }
    c->batch_dlq++; /* acknowledged before the batch commits */
}

static void consumer_handle(consumer_t *c, const rd_kafka_message_t *rkm)
{
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    usage_reason_t reason;
    char err[512], source[320];
    part_t *p;
    rd_kafka_timestamp_type_t tstype;
    int64_t t0;

    if (rkm->err) {
        if (rkm->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
            return;
        log_warn("consumer: %s%s%s", rd_kafka_err2str(rkm->err),
                 rkm->rkt ? " on " : "",
                 rkm->rkt ? rd_kafka_topic_name(rkm->rkt) : "");
        return;
    }
    p = consumer_part(c, rkm->partition);
    if (!p->assigned || p->state != PART_ACTIVE) {
        metric_add(c->m.skipped, 1);
        return;
    }
    if (rkm->offset < p->next)
        return; /* fetched again after a seek: already in the batch */
    if (metric_get(c->m.messages) == 0)
        log_info("first message: %s [%" PRId32 "] offset %" PRId64,
                 c->conf->topic, rkm->partition, rkm->offset);
    metric_add(c->m.messages, 1);

    memset(&ctx, 0, sizeof(ctx));
    ctx.token_types = &c->token_types;
    ctx.operations = &c->operations;
    ctx.now_us = now_us();
    ctx.dedupe_days = c->conf->dedupe_days;
    ctx.max_message_bytes = c->conf->max_message_bytes;
    ctx.topic = c->conf->topic;
    ctx.partition = rkm->partition;
    ctx.offset = rkm->offset;
    ctx.kafka_timestamp_ms = rd_kafka_message_timestamp(rkm, &tstype);

    t0 = mono_ns();
    reason =
        usage_event_parse(rkm->payload, rkm->len, &ctx, &ev, err, sizeof(err));
    metric_add(c->m.parse_ns, (uint64_t)(mono_ns() - t0));
    if (reason == USAGE_ERR_UNKNOWN_ENUM &&
        now_ms() - c->enums_read_ms >= ENUM_REFRESH_MS) {
        /* ALTER TYPE ... ADD VALUE works without a restart. */
        consumer_refresh_enums(c);
        /* The refresh waited for the batch in flight: if that failed, the
         * open batch and this partition's position went with it. */
        if (!p->assigned || p->state != PART_ACTIVE)
            return;
        reason = usage_event_parse(rkm->payload, rkm->len, &ctx, &ev, err,
                                   sizeof(err));
    }
    if (reason != USAGE_OK) {
        consumer_dead_letter(c, rkm, reason, err);
        if (!p->assigned || p->state != PART_ACTIVE)
            return; /* the batch was abandoned */
    } else {
        snprintf(source, sizeof(source), "%s/%" PRId32 "/%" PRId64,
                 c->conf->topic, rkm->partition, rkm->offset);
        switch (batch_add(c->batch, &ev, source)) {
        case BATCH_ADDED:
            break;
        case BATCH_DUPLICATE:
            metric_add(c->m.dup_batch, 1);
            break;
        case BATCH_CONFLICT:
            metric_add(c->m.dup_batch, 1);
            metric_add(c->m.conflicts, 1);
            log_warn("conflict: tenant %s key %s at %s arrived again with "
                     "another payload in the same batch; first wins",
                     ev.tenant_id, ev.idempotency_key, source);
            break;
        }
    }
    if (c->batch_msgs == 0)
        c->batch_opened_ms = now_ms();
    p->next = rkm->offset + 1;
    p->in_batch = true;
    c->batch_msgs++;
    c->batch_bytes += rkm->len;
}

/* ---------------------------------------------------------------- */
/* Rebalances (cooperative-sticky: incremental)                       */

static void consumer_assign(consumer_t *c,
                            rd_kafka_topic_partition_list_t *parts)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_copy(parts);
    rd_kafka_error_t *error;
    bool claimed;

    for (int i = 0; i < l->cnt; i++) {
        part_t *p = consumer_part(c, l->elems[i].partition);
        metric_t *lag = p->lag; /* the series outlives assignments */
        memset(p, 0, sizeof(*p));
        p->lag = lag;
        p->assigned = true;
        p->state = PART_CLAIMING;
        l->elems[i].offset = RD_KAFKA_OFFSET_INVALID;
    }
    claimed = consumer_claim(c, l) == 0;
    if (!claimed) {
        for (int i = 0; i < l->cnt; i++)
            l->elems[i].offset = RD_KAFKA_OFFSET_INVALID;
    }
    error = rd_kafka_incremental_assign(c->rk, l);
    if (error) {
        log_error("incremental assign failed: %s",
                  rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    /* librdkafka keeps a pause across unassign and assign: a partition
     * revoked while paused would come back paused for good. */
    if (claimed)
        rd_kafka_resume_partitions(c->rk, l);
    if (!claimed) {
        /* Held paused until Postgres tells where to start. */
        rd_kafka_pause_partitions(c->rk, l);
        log_warn("%d partitions assigned but not claimed yet (postgres "
                 "unavailable): paused",
                 l->cnt);
    }
    rd_kafka_topic_partition_list_destroy(l);
    consumer_update_assigned_gauge(c);
}

static void consumer_revoke(consumer_t *c,
                            rd_kafka_topic_partition_list_t *parts, bool lost)
{
    rd_kafka_error_t *error;

    if (lost) {
        consumer_collect(c, true);
        consumer_abandon_batch(c, "partitions lost");
    } else
        consumer_commit_batch(c, true); /* abandons it on failure */
    for (int i = 0; i < parts->cnt; i++) {
        part_t *p = consumer_part(c, parts->elems[i].partition);
        p->assigned = false;
        p->in_batch = false;
        dead_letter_forget(c->conf->dlq, parts->elems[i].partition, INT64_MAX);
        if (p->lag)
            metric_set(p->lag, 0); /* its next owner reports it */
    }
    error = rd_kafka_incremental_unassign(c->rk, parts);
    if (error) {
        log_error("incremental unassign failed: %s",
                  rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    consumer_update_assigned_gauge(c);
}

static void rebalance_cb(void *arg, rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, bool lost)
{
    consumer_t *c = arg;

    (void)rk;
    metric_add(c->m.rebalances, 1);
    log_info("rebalance: %s %d partitions%s",
             err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS ? "assigned"
                                                         : "revoked",
             parts->cnt, lost ? " (lost)" : "");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS)
        consumer_assign(c, parts);
    else
        consumer_revoke(c, parts, lost);
}

/* ---------------------------------------------------------------- */
/* The loop                                                           */

/* librdkafka settings of the token-usage consumer, unless -X says
 * otherwise. Memory stays bounded whatever the backlog: the byte cap on
 * the pre-fetch queue does the bounding; the message threshold is high
 * because librdkafka 2.0 parks a partition over it until its broker
 * thread looks again, which starves the consumer. Fetch responses are
 * small (64 KiB, compressed): librdkafka decompresses every record batch
 * of a response before handing out its messages, so a response's memory
 * is its size times the compression ratio (200:1 for a repetitive 1 MiB
 * value); a larger message still comes, alone (KIP-74). The consumer's
 * message.max.bytes only bounds the requests it sends, and librdkafka
 * wants fetch.max.bytes >= it. */
const char *const usage_consumer_kafka_defaults[] = {
    "client.id",
    "tally-worker",
    /* Out of range (retention passed us): take what is left. */
    "auto.offset.reset",
    "earliest",
    "queued.min.messages",
    "50000",
    "queued.max.messages.kbytes",
    "8192",
    "message.max.bytes",
    "65536",
    "fetch.max.bytes",
    "65536",
    "max.partition.fetch.bytes",
    "65536",
    NULL,
};

static void consumer_progress(consumer_t *c)
{
    int64_t t = now_ms();
    int64_t counted = metric_get(c->m.counted);
    int64_t dlq = 0;
    int assigned = 0, paused = 0;

    if (t - c->progress_ms < PROGRESS_MS)
        return;
    for (int r = 1; r < USAGE_ERR__COUNT; r++)
        dlq += metric_get(c->m.dead_letters[r]);
    for (int32_t i = 0; i < c->n_parts; i++) {
        assigned += c->parts[i].assigned;
        paused += c->parts[i].assigned && c->parts[i].state != PART_ACTIVE;
    }
    if (counted != c->progress_counted || paused > 0)
        log_info("progress: %" PRId64 " counted (%.0f/s), %" PRId64
                 " duplicates, %" PRId64 " dead letters, %" PRId64
                 " batches; %d partitions assigned, %d paused",
                 counted,
                 (double)(counted - c->progress_counted) * 1000.0 /
                     (double)(t - c->progress_ms),
                 metric_get(c->m.dup_batch) + metric_get(c->m.dup_store), dlq,
                 metric_get(c->m.batches), assigned, paused);
    c->progress_ms = t;
    c->progress_counted = counted;
}

/* While nothing is committed, asks Postgres whether it answers every
 * PING_MS, so that /readyz and tally_postgres_up tell the truth when
 * idle too. */
static void consumer_ping(consumer_t *c)
{
    char err[512];

    if (now_ms() - c->pg_seen_ms < PING_MS || now_ms() < c->pg_retry_at_ms ||
        c->batch_msgs > 0 || !consumer_collect(c, false))
        return;
    if (store_ping(c->conf->store, err, sizeof(err)) == -1) {
        consumer_pg_failed(c, "postgres unavailable", err);
        c->pg_down_logged = true;
        return;
    }
    consumer_pg_ok(c);
}

/* Every few seconds: per assigned partition, how many messages lie
 * between the position committed in Postgres and the log end (from the
 * watermarks of librdkafka's last fetch; no broker round trip). A
 * partition not assigned here reads 0, so that the sum over the members
 * is the group's lag. */
static void consumer_update_lag(consumer_t *c)
{
    int64_t t = now_ms();

    if (t - c->lag_ms < PING_MS)
        return;
    c->lag_ms = t;
    for (int32_t i = 0; i < c->n_parts; i++) {
        part_t *p = &c->parts[i];
        int64_t lo = -1, hi = -1, lag = 0;
        if (!p->assigned)
            continue; /* set to 0 when it went (consumer_revoke) */
        if (!p->lag) {
            char labels[320];
            snprintf(labels, sizeof(labels),
                     "topic=\"%s\",partition=\"%" PRId32 "\"", c->conf->topic,
                     i);
            /* Lives until exit, as the series does; shared by the
             * members of the process (one owns a partition at a time). */
            p->lag = metrics_gauge("tally_usage_lag_messages", strdup(labels),
                                   "messages after the committed position, "
                                   "per assigned partition");
        }
        if (rd_kafka_get_watermark_offsets(c->rk, c->conf->topic, i, &lo,
                                           &hi) == RD_KAFKA_RESP_ERR_NO_ERROR &&
            hi >= 0) {
            /* No position stored yet: from the log start. */
            int64_t from = p->committed >= 0 ? p->committed : lo;
            lag = from >= 0 && hi > from ? hi - from : 0;
        }
        metric_set(p->lag, lag);
    }
}

static void consumer_prune(consumer_t *c)
{
    char err[512];
    long deleted = 0;
    int64_t t = now_ms();

    if (c->conf->prune_interval_s <= 0 ||
        t - c->last_prune_ms < c->conf->prune_interval_s * 1000)
        return;
    /* Only while the committer is idle and no batch is due (none open,
     * or the open one still filling): ingestion goes first, a due
     * pruning waits for such a gap, and it delays a batch by at most
     * one delete. Under steady traffic a batch is nearly always open,
     * so waiting for none would starve the pruning. */
    if (consumer_batch_due(c) || !consumer_collect(c, false) ||
        !consumer_pg_ready(c))
        return;
    c->last_prune_ms = t;
    if (store_prune_events(c->conf->store, c->conf->dedupe_days, 50000,
                           &deleted, err, sizeof(err)) == -1) {
        log_warn("pruning the dedupe store: %s", err);
        return;
    }
    /* A full batch: more remain. Due again at the next gap between
     * batches, each batch its own short transaction, so a backlog of
     * expired rows drains in steps of 50,000 rather than one an interval. */
    if (deleted >= 50000)
        c->last_prune_ms = t - c->conf->prune_interval_s * 1000;
    if (deleted > 0)
        log_info("pruned %ld events past the %d-day dedupe window in "
                 "%" PRId64 " ms",
                 deleted, c->conf->dedupe_days, now_ms() - t);
}

int usage_consumer_run(const usage_consumer_conf_t *conf, char *errstr,
                       size_t errstr_size)
{
    consumer_t c;
    int rc = -1;

    memset(&c, 0, sizeof(c));
    c.conf = conf;
    c.pg_backoff_ms = BACKOFF_MIN_MS;
    c.progress_ms = now_ms();
    /* The first pruning comes one interval, or a minute, after start. */
    c.last_prune_ms =
        now_ms() - conf->prune_interval_s * 1000 +
        (conf->prune_interval_s < 60 ? conf->prune_interval_s * 1000 : 60000);
    consumer_metrics_init(&c.m, conf->ready_name);
    c.batch = batch_new(conf->batch_size);
    c.spare = batch_new(conf->batch_size);
    if (!c.batch || !c.spare || committer_start(&c.com, conf->store) == -1)
        abort(); /* out of memory or threads at start */
    c.pg_seen_ms = now_ms();
    consumer_update_ready(&c);
    /* The enums as Postgres has them; the contract's until it answers. */
    usage_enums_default(&c.token_types, &c.operations);
    consumer_refresh_enums(&c);

    c.rk = kafka_consumer_rk(conf->kc);
    if (kafka_consumer_subscribe(conf->kc, conf->topic, rebalance_cb, &c,
                                 errstr, errstr_size) == -1)
        goto out;
    log_info("consuming %s as group %s (batches of %zu messages / %zu "
             "bytes / %d ms; dead letters to %s)",
             conf->topic, conf->group, conf->batch_size, conf->batch_bytes,
             conf->batch_ms, conf->dlq_topic);

    while (!*conf->stop && !c.fatal) {
        rd_kafka_message_t *rkm;
        int timeout = 100;
        int64_t t0;

        consumer_claim_pending(&c);
        if (c.batch_msgs > 0) {
            int64_t left = c.batch_opened_ms + conf->batch_ms - now_ms();
            timeout = left < 0 ? 0 : left < 100 ? (int)left : 100;
        }
        t0 = mono_ns();
        rkm = rd_kafka_consumer_poll(c.rk, timeout);
        metric_add(c.m.poll_ns, (uint64_t)(mono_ns() - t0));
        if (rkm) {
            if (rkm->err == RD_KAFKA_RESP_ERR__FATAL) {
                char reason[256];
                rd_kafka_fatal_error(c.rk, reason, sizeof(reason));
                snprintf(c.fatal_error, sizeof(c.fatal_error),
                         "fatal kafka error: %s", reason);
                c.fatal = true;
            } else {
                consumer_handle(&c, rkm);
            }
            rd_kafka_message_destroy(rkm);
        }
        consumer_collect(&c, false);
        if (consumer_batch_due(&c))
            consumer_commit_batch(&c, false);
        consumer_progress(&c);
        consumer_ping(&c);
        consumer_update_lag(&c);
        consumer_prune(&c);
    }

    log_info("stopping: committing the open batch and leaving the group");
    if (!c.fatal) {
        consumer_commit_batch(&c, true);
    } else {
        consumer_collect(&c, true);
        consumer_abandon_batch(&c, "fatal error");
    }
    kafka_consumer_close(conf->kc); /* the last revocation comes here */
    c.rk = NULL;
    if (c.fatal) {
        snprintf(errstr, errstr_size, "%s", c.fatal_error);
        goto out;
    }
    rc = 0;
out:
    if (c.rk)
        kafka_consumer_close(conf->kc);
    consumer_collect(&c, true);
    committer_stop(&c.com);
    batch_free(c.batch);
    batch_free(c.spare);
    free(c.parts);
    return rc;
}
