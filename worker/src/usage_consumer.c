/* The token-usage consumer: claims, batches, commits, rebalances. */
#include "usage_consumer.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "fault.h"
#include "kafka.h"
#include "log.h"
#include "metrics.h"
#include "pipeline.h"
#include "usage_batch.h"
#include "usage_committer.h"
#include "usage_event.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define FENCE_RETRY_MS 30000  /* re-claim a fenced partition after this */
#define ENUM_REFRESH_MS 10000 /* re-read enums on an unknown value */
#define DLQ_FLUSH_MS 30000
#define PROGRESS_MS 10000
#define PING_MS 5000         /* check Postgres this often while idle */
#define PRUNE_PAUSE_FACTOR 4 /* a delete is followed by 4x its time off */

typedef struct {
    metric_t *messages, *counted, *dup_batch, *dup_store, *conflicts;
    metric_t *dead_letters[USAGE_ERR__COUNT];
    metric_t *batches, *transactions, *batch_failures, *fenced, *pg_up;
    metric_t *commit_us, *skipped, *store_rejected;
    metric_t *parse_ns, *commit_wait_ns;
    metric_t *batch_messages, *commit_duration;
    metrics_ready_t *ready;
} consumer_metrics_t;

typedef struct {
    const usage_consumer_conf_t *conf;
    pipeline_t pl;
    committer_t *com;
    committer_job_t job; /* with the committer while it is busy */
    batch_t *batch;      /* the open batch */
    batch_t *spare;      /* the other buffer, when not with the committer */
    size_t batch_msgs, batch_bytes, batch_dlq;
    int64_t batch_opened_ms;
    int64_t last_msg_ms; /* when the last message came (consumer_caught_up()) */
    /* The open window: batches in the committer's transaction, not
     * committed yet (their partitions are marked in_window). */
    size_t win_batches, win_msgs, win_dlq;
    store_batch_result_t win_res;
    int64_t win_opened_ms, win_took_us;
    backoff_t pg; /* Postgres failed: wait before using it again */
    bool pg_down_logged;
    int64_t pg_seen_ms; /* Postgres last answered */
    usage_enum_t token_types, operations;
    int64_t enums_read_ms;
    int64_t last_prune_ms;
    consumer_metrics_t m;
    int64_t progress_ms;
    int64_t progress_counted;
} consumer_t;

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

#define now_ms pipeline_now_ms

/* The series are shared by the members of the group in this process
 * (registering one again returns it); gauges are per member where noted. */
static void consumer_metrics_init(consumer_t *c)
{
    consumer_metrics_t *m = &c->m;
    static const double batch_bounds[] = {1,    10,   100,   500,   1000,
                                          2500, 5000, 10000, 25000, 100000};
    static const double commit_bounds[] = {
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
    m->batch_messages = metrics_histogram(
        "tally_usage_batch_messages", NULL, "messages per committed batch",
        batch_bounds, sizeof(batch_bounds) / sizeof(*batch_bounds));
    m->commit_duration = metrics_histogram(
        "tally_usage_commit_duration_seconds", NULL,
        "Postgres time of a committed transaction (its batches' statements "
        "and the COMMIT)",
        commit_bounds,
        sizeof(commit_bounds) / sizeof(*commit_bounds));
    m->ready = metrics_readiness(c->conf->ready_name);
    c->pl.rebalances = metrics_counter(
        "tally_usage_rebalances_total", NULL,
        "rebalance callbacks (assignments and revocations) of token-usage");
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
    for (int r = 1; r < USAGE_ERR__COUNT; r++)
        m->dead_letters[r] = pipeline_reason_counter(
            "tally_usage_dead_letters_total",
            usage_reason_code((usage_reason_t)r),
            "messages sent to the dead-letter topic, by reason");
    m->store_rejected = pipeline_reason_counter(
        "tally_usage_dead_letters_total", "store_rejected", NULL);
    m->batches = metrics_counter("tally_usage_batches_total", NULL,
                                 "batches committed to Postgres");
    m->transactions = metrics_counter(
        "tally_usage_transactions_total", NULL,
        "Postgres transactions that committed batches (one or a window of "
        "several)");
    m->batch_failures = metrics_counter(
        "tally_usage_batch_failures_total", NULL,
        "batches abandoned (Postgres or dead-letter failure, fencing)");
    m->fenced = metrics_counter(
        "tally_usage_fenced_total", NULL,
        "commits refused because another member claimed a partition");
    m->pg_up = metrics_gauge("tally_postgres_up", NULL,
                             "1 when the Postgres connection works");
    c->pl.parts.assigned =
        metrics_gauge("tally_usage_partitions_assigned", NULL,
                      "token-usage partitions assigned");
    /* Added in micro- and nanoseconds, rendered in seconds. */
    m->commit_us =
        metrics_counter_scaled("tally_usage_commit_seconds_total", NULL,
                               "time spent committing batches to Postgres", 6);
    m->parse_ns =
        metrics_counter_scaled("tally_usage_parse_seconds_total", NULL,
                               "time spent parsing and validating messages", 9);
    c->pl.nudge = true;
    c->pl.nudges = metrics_counter(
        "tally_usage_fetch_nudges_total", NULL,
        "requests sent to wake librdkafka's fetcher after the pre-fetch "
        "queue filled up and drained (librdkafka 2.0.2 would wait up to 1 s)");
    c->pl.poll_ns = metrics_counter_scaled(
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
/* Readiness and Postgres availability                                */

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
    bool pg = store_is_connected(c->conf->store) && c->pg.retry_at_ms == 0;
    metric_set(c->m.pg_up, pg);
    if (!pg)
        metrics_set_ready(c->m.ready, false, "postgres unavailable");
    else if (!c->pl.synced)
        metrics_set_ready(c->m.ready, false,
                          "waiting for a partition assignment");
    else
        metrics_set_ready(c->m.ready, true, NULL);
}

static void consumer_pg_failed(consumer_t *c, const char *what,
                               const char *error)
{
    int waits = backoff_fail(&c->pg);
    log_warn("%s: %s; retrying in %d s", what, error, waits / 1000);
    consumer_update_ready(c);
}

/* Postgres answered (a commit, a claim, a ping): backoff reset, and the
 * end of an outage logged once, whichever path noticed it. */
static void consumer_pg_ok(consumer_t *c)
{
    if (c->pg_down_logged)
        log_info("postgres connection restored");
    c->pg_down_logged = false;
    backoff_reset(&c->pg);
    c->pg_seen_ms = now_ms();
    consumer_update_ready(c);
}

/* True when Postgres can be used now; reconnects at most once per backoff
 * step. */
static bool consumer_pg_ready(consumer_t *c)
{
    char err[512];
    if (backoff_waiting(&c->pg))
        return false;
    if (store_is_connected(c->conf->store))
        return true;
    if (store_connect(c->conf->store, err, sizeof(err)) == -1) {
        consumer_pg_failed(c, "postgres unavailable", err);
        c->pg_down_logged = true;
        return false;
    }
    consumer_pg_ok(c);
    return true;
}

static bool consumer_collect(consumer_t *c, bool wait);
static bool consumer_settle(consumer_t *c, bool wait);

/* ---------------------------------------------------------------- */
/* Claims: positions come from Postgres, never from Kafka              */

/* Claims the partitions of `l` (all in state CLAIMING), makes them
 * ACTIVE and sets their offsets in `l` to where to resume. Returns 0, or
 * -1 (Postgres down or failed; they stay CLAIMING). */
static int consumer_claim(consumer_t *c, rd_kafka_topic_partition_list_t *l)
{
    store_position_t *pos = NULL;
    bool *resolved = NULL; /* --start-from latest resolved and logged */
    char err[512];
    int rc = -1;

    if (l->cnt == 0)
        return 0;
    consumer_settle(c, true); /* the store is ours from here */
    for (int i = 0; i < l->cnt; i++) {
        /* Fenced meanwhile: our view of the group is stale; wait. */
        if (parts_get(&c->pl.parts, l->elems[i].partition)->state !=
            PART_CLAIMING)
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
            c->pl.rk, c->conf->topic, pos[i].partition, &lo, &hi, 10000);
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
        part_t *p = parts_get(&c->pl.parts, pos[i].partition);
        parts_set_state(&c->pl.parts, pos[i].partition, PART_ACTIVE, "claimed");
        p->epoch = pos[i].epoch;
        p->committed = pos[i].next_offset >= 0 ? pos[i].next_offset
                                               : consumer_start_offset(c);
        p->next = pos[i].next_offset >= 0 ? pos[i].next_offset : 0;
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

    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        part_t *p = &c->pl.parts.parts[i];
        if (p->state == PART_FENCED && t - p->since_ms >= FENCE_RETRY_MS) {
            log_info("%s [%" PRId32 "]: still assigned to us after being "
                     "fenced; claiming it again",
                     c->conf->topic, i);
            parts_set_state(&c->pl.parts, i, PART_CLAIMING,
                            "still ours after being fenced");
        }
    }
    l = rd_kafka_topic_partition_list_new(4);
    for (int32_t i = 0; i < c->pl.parts.n; i++)
        if (c->pl.parts.parts[i].state == PART_CLAIMING)
            rd_kafka_topic_partition_list_add(l, c->conf->topic, i);
    if (l->cnt == 0 || consumer_claim(c, l) == -1)
        goto out;
    error = kafka_seek_partitions(c->pl.rk, l, 10000);
    if (error) {
        log_warn("seek after claim failed: %s; claiming again",
                 rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
        for (int i = 0; i < l->cnt; i++)
            parts_set_state(&c->pl.parts, l->elems[i].partition, PART_CLAIMING,
                            "seek failed");
        goto out;
    }
    for (int i = 0; i < l->cnt; i++) {
        if (l->elems[i].err) {
            log_warn("%s [%" PRId32 "]: seek failed: %s; claiming again",
                     c->conf->topic, l->elems[i].partition,
                     rd_kafka_err2str(l->elems[i].err));
            parts_set_state(&c->pl.parts, l->elems[i].partition, PART_CLAIMING,
                            "seek failed");
        }
    }
out:
    parts_sync(&c->pl.parts); /* resumes the claimed, keeps the rest paused */
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---------------------------------------------------------------- */
/* Committing                                                         */

static void consumer_abandon_batch(consumer_t *c, const char *why);

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

    if (pipeline_dead_letter(c->conf->dlq, c->conf->dlq_topic, rkm,
                             "store_rejected", ctx->why[i],
                             c->conf->max_message_bytes, c->m.store_rejected,
                             err, sizeof(err)) == -1) {
        log_warn("%s", err);
        return -1;
    }
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

/* ---------------------------------------------------------------- */
/* Windows: several batches in one Postgres transaction               */

/* A batch went into the window (the committer's open transaction): its
 * counts and positions wait there for the window's commit. */
static void consumer_window_put(consumer_t *c, const committer_job_t *job)
{
    if (c->win_batches++ == 0)
        c->win_opened_ms = now_ms();
    c->win_msgs += job->msgs;
    c->win_dlq += job->dlq;
    c->win_res.counted += job->res.counted;
    c->win_res.counted_before += job->res.counted_before;
    c->win_res.conflicts += job->res.conflicts;
    metric_observe(c->m.batch_messages, (double)job->msgs);
    for (size_t i = 0; i < job->n; i++) {
        part_t *p = parts_get(&c->pl.parts, job->pos[i].partition);
        p->in_window = true;
        p->window_next = job->pos[i].next_offset;
    }
}

/* Forgets the window: committed, or rolled back. */
static void consumer_window_reset(consumer_t *c)
{
    c->win_batches = 0;
    c->win_msgs = 0;
    c->win_dlq = 0;
    c->win_took_us = 0;
    memset(&c->win_res, 0, sizeof(c->win_res));
    for (int32_t i = 0; i < c->pl.parts.n; i++)
        c->pl.parts.parts[i].in_window = false;
}

/* A window failed for its data (Postgres refused it at the sums: a
 * window is rolled back whole, STORE_SPLIT) or deadlocked with another
 * writer of the same rows: its messages are committed a batch at a time
 * when they come again (store_commit_batch(), which finds a refused
 * event and has it dead-lettered on its own). */
static void consumer_window_failed(consumer_t *c, const committer_job_t *job)
{
    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        part_t *p = &c->pl.parts.parts[i];
        if (p->in_window && p->window_next > p->alone_until)
            p->alone_until = p->window_next;
    }
    for (size_t i = 0; i < job->n; i++) {
        part_t *p = parts_get(&c->pl.parts, job->pos[i].partition);
        if (job->pos[i].next_offset > p->alone_until)
            p->alone_until = job->pos[i].next_offset;
    }
}

/* True while a partition of ours has messages of a failed window ahead:
 * batches go alone until it passes them. */
static bool consumer_alone(const consumer_t *c)
{
    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        const part_t *p = &c->pl.parts.parts[i];
        if (p->state == PART_ACTIVE && p->alone_until > 0 &&
            p->alone_until > p->committed)
            return true;
    }
    return false;
}

/* Hands the committer a job without a batch: the open window committed
 * (`commit`) or rolled back. */
static void consumer_window_end(consumer_t *c, bool commit)
{
    committer_job_t *job = &c->job;

    job->batch = NULL;
    job->n = 0;
    job->msgs = 0;
    job->dlq = 0;
    job->close = commit;
    committer_submit(c->com, job);
}

/* Makes the store ours: the job out collected (waiting for it when
 * `wait`) and the open window committed. True when the store is free
 * now. */
static bool consumer_settle(consumer_t *c, bool wait)
{
    if (!consumer_collect(c, wait))
        return false;
    if (c->win_batches == 0)
        return true;
    consumer_window_end(c, true);
    return consumer_collect(c, wait);
}

/* The window committed: counters, positions, the Kafka commit. */
static void consumer_committed(consumer_t *c)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_resp_err_t err;

    fault_point("after-pg-commit"); /* before the Kafka commit */
    consumer_pg_ok(c);
    metric_add(c->m.commit_us, (uint64_t)c->win_took_us);
    metric_add(c->m.batches, c->win_batches);
    metric_add(c->m.transactions, 1);
    metric_observe(c->m.commit_duration, (double)c->win_took_us / 1e6);
    metric_add(c->m.counted, c->win_res.counted);
    metric_add(c->m.dup_store, c->win_res.counted_before);
    metric_add(c->m.conflicts, c->win_res.conflicts);
    log_debug("committed %zu batches in one transaction: %zu messages, %zu "
              "counted, %zu counted before, %zu daily rows, %zu dead "
              "letters, %.1f ms in Postgres",
              c->win_batches, c->win_msgs, c->win_res.counted,
              c->win_res.counted_before, c->win_res.buckets, c->win_dlq,
              (double)c->win_took_us / 1000.0);
    l = rd_kafka_topic_partition_list_new(8);
    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        part_t *p = &c->pl.parts.parts[i];
        if (!p->in_window)
            continue;
        p->committed = p->window_next;
        dead_letter_forget(c->conf->dlq, i, p->window_next);
        rd_kafka_topic_partition_list_add(l, c->conf->topic, i)->offset =
            p->window_next;
    }
    /* Postgres is the source of truth; this is for lag tools only. */
    if (l->cnt > 0) {
        err = kafka_consumer_commit(c->pl.kc, l, false);
        if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            log_debug("kafka offset commit: %s", rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
    consumer_window_reset(c);
}

/* A job fenced: being fenced means our view of the group is stale (a
 * zombie after a pause, typically): claiming any partition now could
 * take it from its rightful owner. All wait for librdkafka to report the
 * rebalance; one still ours after FENCE_RETRY_MS is claimed again. */
static void consumer_fenced(consumer_t *c, const committer_job_t *job)
{
    for (size_t i = 0; i < job->n; i++) {
        if (job->pos[i].fenced)
            log_warn("%s [%" PRId32 "]: fenced: another member claimed "
                     "it (epoch %" PRId64 " is no longer current); not "
                     "committing",
                     c->conf->topic, job->pos[i].partition, job->pos[i].epoch);
    }
    consumer_abandon_batch(c, "the batch before it was fenced");
    parts_move_all(&c->pl.parts, PART_CLAIMING, PART_FENCED,
                   "a commit was fenced");
    log_warn("fenced: pausing all %s partitions until the group "
             "settles (at most %d s)",
             c->conf->topic, FENCE_RETRY_MS / 1000);
    metric_add(c->m.fenced, 1);
    metric_add(c->m.batch_failures, 1);
    parts_sync(&c->pl.parts);
}

/* A job failed: the window (this batch and those before it in the
 * transaction) is rolled back, and everything after the positions in
 * Postgres is consumed again. */
static void consumer_job_failed(consumer_t *c, const committer_job_t *job)
{
    size_t msgs = c->win_msgs + job->msgs;

    if (job->status == STORE_SPLIT || strcmp(job->sqlstate, "40P01") == 0)
        consumer_window_failed(c, job);
    if (strcmp(job->sqlstate, "40P01") == 0)
        log_warn("the transaction deadlocked with another writer of the "
                 "same keys (an idempotency key on partitions of two "
                 "members): its messages are committed again a batch at "
                 "a time");
    consumer_window_reset(c);
    if (job->status == STORE_FENCED) {
        consumer_fenced(c, job);
        return;
    }
    metric_add(c->m.batch_failures, 1);
    if (job->status == STORE_SPLIT) {
        /* Not Postgres being down: no backoff. */
        log_warn("%zu messages not committed: %s", msgs, job->err);
        consumer_abandon_batch(c, "the window before it was refused");
        return;
    }
    log_warn("%zu messages not committed (%zu batches): %s", msgs,
             job->window_batches, job->err);
    consumer_pg_failed(c, "postgres commit failed", job->err);
    consumer_abandon_batch(c, "the batch before it failed");
}

/* Takes the committer's result, if there is one (waiting for it when
 * `wait`), and acts on it: the batch in the window, the window
 * committed, or everything behind it abandoned. True when the committer
 * is idle (a window may still be open: consumer_settle()). */
static bool consumer_collect(consumer_t *c, bool wait)
{
    committer_job_t *job;

    for (;;) {
        char err[512];
        if (committer_idle(c->com))
            return true;
        job = committer_collect(c->com, wait);
        if (!job)
            return false;
        if (job->status != STORE_REJECTED)
            break;
        if (consumer_dead_letter_rejected(c, job->batch, err, sizeof(err)) ==
            0) {
            /* The same batch and positions, without those events. */
            committer_submit(c->com, job);
            continue;
        }
        snprintf(job->err, sizeof(job->err), "%s", err);
        job->status = STORE_RETRY;
        break;
    }
    c->win_took_us += job->took_us;
    if (job->status != STORE_OK) {
        consumer_job_failed(c, job);
    } else {
        if (job->batch)
            consumer_window_put(c, job);
        if (job->committed) {
            c->win_res.buckets = job->upserted;
            consumer_committed(c);
        }
    }
    if (job->batch) {
        batch_clear(job->batch);
        c->spare = job->batch;
        job->batch = NULL;
    }
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
    parts_clear_batch(&c->pl.parts);
}

/* Drops the open batch: nothing of it is committed, so every active
 * partition goes back to its Postgres position (claimed again, which also
 * settles a commit whose outcome we did not learn). An open window is
 * committed first (its batches are whole): it must not hold its locks
 * while we wait. */
static void consumer_abandon_batch(consumer_t *c, const char *why)
{
    if (c->win_batches > 0 && committer_idle(c->com))
        consumer_settle(c, true);
    if (c->batch_msgs > 0) {
        log_warn("batch of %zu messages abandoned (%s); they will be "
                 "consumed again from the positions in Postgres",
                 c->batch_msgs, why);
        metric_add(c->m.batch_failures, 1);
    }
    consumer_reset_batch(c);
    parts_move_all(&c->pl.parts, PART_ACTIVE, PART_CLAIMING, why);
    parts_sync(&c->pl.parts);
}

/* Whether the batch being sealed commits the window: `sync` (a
 * rebalance, the end), a batch sealed by --batch-ms or by
 * --batch-idle-ms (consumer_caught_up()): traffic is slower than a
 * batch, no reason to wait), the window full (--commit-batches) or open
 * for --commit-ms already, or messages of a failed window ahead. */
static bool consumer_window_closes(const consumer_t *c, bool sync)
{
    bool by_time = !batch_is_full(c->batch) &&
                   c->batch_msgs < c->conf->batch_size &&
                   c->batch_bytes < c->conf->batch_bytes;
    return sync || by_time || c->win_batches + 1 >= c->conf->commit_batches ||
           (c->win_batches > 0 &&
            now_ms() - c->win_opened_ms >= c->conf->commit_ms) ||
           consumer_alone(c);
}

/* Seals the open batch and hands it to the committer: dead letters
 * acknowledged first, then (in the committer) the events, sums and
 * positions into the window's transaction, committed now or with a later
 * batch (consumer_window_closes()). With `sync`, the window is committed
 * and waited for. On any failure the batch is abandoned. Returns 0 or
 * -1. */
static int consumer_commit_batch(consumer_t *c, bool sync)
{
    committer_job_t *job = &c->job;
    char err[512];
    size_t n = 0;
    int dlq_rc = 0;
    int64_t t0;

    /* The batch's dead letters are acknowledged while the committer is
     * still busy with the previous batch, not after it (the committer
     * would wait for the round trip). */
    if (c->batch_msgs > 0 && c->batch_dlq > 0)
        dlq_rc = dead_letter_flush(c->conf->dlq, DLQ_FLUSH_MS, err,
                                   sizeof(err));
    t0 = pipeline_mono_ns();
    consumer_collect(c, true); /* the previous one first, in order */
    metric_add(c->m.commit_wait_ns, (uint64_t)(pipeline_mono_ns() - t0));
    if (c->batch_msgs == 0) {
        if (sync)
            consumer_settle(c, true);
        return 0;
    }
    if (dlq_rc == -1) {
        consumer_abandon_batch(c, err);
        /* Kafka trouble: back off before claiming and consuming again. */
        consumer_pg_failed(c, "dead letters not acknowledged", err);
        return -1;
    }
    if (!consumer_pg_ready(c)) {
        consumer_abandon_batch(c, "postgres unavailable");
        return -1;
    }
    free(job->pos);
    job->pos = calloc((size_t)c->pl.parts.n + 1, sizeof(*job->pos));
    if (!job->pos)
        abort();
    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        part_t *p = &c->pl.parts.parts[i];
        if (!p->in_batch || p->state != PART_ACTIVE)
            continue;
        job->pos[n].topic = c->conf->topic;
        job->pos[n].partition = i;
        job->pos[n].next_offset = p->next;
        job->pos[n].epoch = p->epoch;
        n++;
    }
    job->close = consumer_window_closes(c, sync);
    job->max_buckets = c->conf->window_buckets;
    parts_clear_batch(&c->pl.parts);
    job->n = n;
    job->msgs = c->batch_msgs;
    job->dlq = c->batch_dlq;
    job->batch = c->batch;
    c->batch = c->spare;
    c->spare = NULL;
    c->batch_msgs = 0;
    c->batch_bytes = 0;
    c->batch_dlq = 0;
    committer_submit(c->com, job);
    if (sync)
        consumer_settle(c, true);
    return 0;
}

/* True when no message came for --batch-idle-ms and every active
 * partition has been read to its end (librdkafka's high watermark from
 * its last fetch): a backlog is drained, and holding the open batch for
 * the rest of --batch-ms would only delay its commit (at the end of a
 * backlog each member's last partial batches, then their window, waited
 * 0.5-1 s that way). An empty partition is at its end; one whose end is
 * not known yet (not fetched since it was assigned) keeps the batch to
 * --batch-ms, and so does one ending in a transaction's commit marker
 * (librdkafka 2.0.2 caches the high watermark, not the last stable
 * offset; tally's producers are not transactional). Under traffic of
 * more than about 1000/--batch-idle-ms messages a second per member
 * messages keep coming and this does not apply; below it a batch closes
 * at each such gap, at most 1000/--batch-idle-ms transactions a second. */
static bool consumer_caught_up(const consumer_t *c, int64_t now)
{
    if (c->conf->batch_idle_ms <= 0 ||
        now - c->last_msg_ms < c->conf->batch_idle_ms)
        return false;
    for (int32_t i = 0; i < c->pl.parts.n; i++) {
        const part_t *p = &c->pl.parts.parts[i];
        int64_t lo = -1, hi = -1;
        if (p->state != PART_ACTIVE)
            continue;
        if (rd_kafka_get_watermark_offsets(c->pl.rk, c->conf->topic, i, &lo,
                                           &hi) != RD_KAFKA_RESP_ERR_NO_ERROR ||
            hi < 0 || (lo < hi && p->next < hi))
            return false;
    }
    return true;
}

static bool consumer_batch_due(const consumer_t *c)
{
    int64_t t;

    if (c->batch_msgs == 0)
        return false;
    if (batch_is_full(c->batch) || c->batch_msgs >= c->conf->batch_size ||
        c->batch_bytes >= c->conf->batch_bytes)
        return true;
    t = now_ms();
    return t - c->batch_opened_ms >= c->conf->batch_ms ||
           consumer_caught_up(c, t);
}

/* ---------------------------------------------------------------- */
/* Messages                                                           */

static void consumer_refresh_enums(consumer_t *c)
{
    char err[512];
    usage_enum_t tt, ops;
    consumer_settle(c, true);
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

static void consumer_handle(void *arg, const rd_kafka_message_t *rkm)
{
    consumer_t *c = arg;
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    usage_reason_t reason;
    char err[512], source[320];
    part_t *p = parts_get(&c->pl.parts, rkm->partition);
    rd_kafka_timestamp_type_t tstype;
    int64_t t0;

    if (p->state != PART_ACTIVE) {
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

    t0 = pipeline_mono_ns();
    reason =
        usage_event_parse(rkm->payload, rkm->len, &ctx, &ev, err, sizeof(err));
    metric_add(c->m.parse_ns, (uint64_t)(pipeline_mono_ns() - t0));
    if (reason == USAGE_ERR_UNKNOWN_ENUM &&
        now_ms() - c->enums_read_ms >= ENUM_REFRESH_MS) {
        /* ALTER TYPE ... ADD VALUE works without a restart. */
        consumer_refresh_enums(c);
        /* The refresh waited for the batch in flight: if that failed, the
         * open batch and this partition's position went with it. */
        if (p->state != PART_ACTIVE)
            return;
        reason = usage_event_parse(rkm->payload, rkm->len, &ctx, &ev, err,
                                   sizeof(err));
    }
    if (reason != USAGE_OK) {
        char dlq_err[512];
        if (pipeline_dead_letter(
                c->conf->dlq, c->conf->dlq_topic, rkm,
                usage_reason_code(reason), err, c->conf->max_message_bytes,
                c->m.dead_letters[reason], dlq_err, sizeof(dlq_err)) == -1) {
            /* Not even queued: the offset must not advance past it. */
            consumer_abandon_batch(c, dlq_err);
            return;
        }
        c->batch_dlq++; /* acknowledged before the batch commits */
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
    c->last_msg_ms = ctx.now_us / 1000; /* the clock of now_ms() */
    if (c->batch_msgs == 0)
        c->batch_opened_ms = c->last_msg_ms;
    p->next = rkm->offset + 1;
    p->in_batch = true;
    c->batch_msgs++;
    c->batch_bytes += rkm->len;
}

/* ---------------------------------------------------------------- */
/* Rebalances (cooperative-sticky: incremental)                       */

static void consumer_assign(void *arg, rd_kafka_topic_partition_list_t *parts)
{
    consumer_t *c = arg;
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_copy(parts);
    rd_kafka_error_t *error;

    for (int i = 0; i < l->cnt; i++) {
        int32_t partition = l->elems[i].partition;
        if (parts_get(&c->pl.parts, partition)->state != PART_UNASSIGNED)
            parts_set_state(&c->pl.parts, partition, PART_UNASSIGNED,
                            "assigned again");
        parts_set_state(&c->pl.parts, partition, PART_CLAIMING, "assigned");
        l->elems[i].offset = RD_KAFKA_OFFSET_INVALID;
    }
    if (consumer_claim(c, l) == -1) {
        for (int i = 0; i < l->cnt; i++)
            l->elems[i].offset = RD_KAFKA_OFFSET_INVALID;
        log_warn("%d partitions assigned but not claimed yet (postgres "
                 "unavailable): paused",
                 l->cnt);
    }
    error = rd_kafka_incremental_assign(c->pl.rk, l);
    if (error) {
        log_error("incremental assign failed: %s",
                  rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    /* Claimed: resumed; else held paused until Postgres tells where to
     * start. */
    parts_sync(&c->pl.parts);
    rd_kafka_topic_partition_list_destroy(l);
    parts_report_assigned(&c->pl.parts);
    consumer_update_ready(c);
}

static void consumer_revoke(void *arg, rd_kafka_topic_partition_list_t *parts,
                            bool lost)
{
    consumer_t *c = arg;
    rd_kafka_error_t *error;

    if (lost) {
        /* An open window is committed (consumer_abandon_batch()): its
         * fence holds the partitions' rows, so no other member has
         * claimed them meanwhile. */
        consumer_collect(c, true);
        consumer_abandon_batch(c, "partitions lost");
    } else {
        consumer_commit_batch(c, true); /* abandons it on failure */
    }
    for (int i = 0; i < parts->cnt; i++) {
        int32_t partition = parts->elems[i].partition;
        if (parts_get(&c->pl.parts, partition)->state != PART_UNASSIGNED)
            parts_set_state(&c->pl.parts, partition, PART_UNASSIGNED,
                            lost ? "lost" : "revoked");
        dead_letter_forget(c->conf->dlq, partition, INT64_MAX);
    }
    error = rd_kafka_incremental_unassign(c->pl.rk, parts);
    if (error) {
        log_error("incremental unassign failed: %s",
                  rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
    parts_sync(&c->pl.parts);
    parts_report_assigned(&c->pl.parts);
    consumer_update_ready(c);
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
    int assigned, paused;

    if (t - c->progress_ms < PROGRESS_MS)
        return;
    for (int r = 1; r < USAGE_ERR__COUNT; r++)
        dlq += metric_get(c->m.dead_letters[r]);
    assigned = parts_assigned(&c->pl.parts);
    paused = assigned - parts_count(&c->pl.parts, PART_ACTIVE);
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

    if (now_ms() - c->pg_seen_ms < PING_MS || backoff_waiting(&c->pg) ||
        c->batch_msgs > 0 || !consumer_collect(c, false) || c->win_batches > 0)
        return;
    if (store_ping(c->conf->store, err, sizeof(err)) == -1) {
        consumer_pg_failed(c, "postgres unavailable", err);
        c->pg_down_logged = true;
        return;
    }
    consumer_pg_ok(c);
}

static void consumer_prune(consumer_t *c)
{
    char err[512];
    long deleted = 0;
    int64_t t = now_ms(), took;

    if (c->conf->prune_interval_s <= 0 ||
        t - c->last_prune_ms < c->conf->prune_interval_s * 1000)
        return;
    /* Only while the committer is idle and no batch is due (none open,
     * or the open one still filling): ingestion goes first, a due
     * pruning waits for such a gap, and it delays a batch by at most
     * one delete. Under steady traffic a batch is nearly always open,
     * so waiting for none would starve the pruning. */
    if (consumer_batch_due(c) || !consumer_collect(c, false) ||
        c->win_batches > 0 || !consumer_pg_ready(c))
        return;
    c->last_prune_ms = t;
    if (store_prune_events(c->conf->store, c->conf->dedupe_days, 50000,
                           &deleted, err, sizeof(err)) == -1) {
        log_warn("pruning the dedupe store: %s", err);
        return;
    }
    /* A full batch: more remain. Due again at a gap between batches
     * after four times as long as this delete took, each its own short
     * transaction: a backlog of expired rows drains in steps of 50,000
     * rather than one an interval, and the deletes take at most a fifth
     * of the connection's time, so that steady traffic below what the
     * worker can count is not held back. */
    took = now_ms() - t;
    if (deleted >= 50000)
        c->last_prune_ms = t + took * (1 + PRUNE_PAUSE_FACTOR) -
                           c->conf->prune_interval_s * 1000;
    if (deleted > 0)
        log_info("pruned %ld events past the %d-day dedupe window in "
                 "%" PRId64 " ms",
                 deleted, c->conf->dedupe_days, took);
}

/* Before each poll: claims, and a timeout that closes the open batch in
 * time. */
static int consumer_prepare(void *arg)
{
    consumer_t *c = arg;
    consumer_claim_pending(c);
    if (c->batch_msgs > 0) {
        int64_t t = now_ms();
        int64_t left = c->batch_opened_ms + c->conf->batch_ms - t;
        int64_t idle_left = c->last_msg_ms + c->conf->batch_idle_ms - t;
        /* Wake when the idle time is up (consumer_caught_up()); once it
         * is past, a message or --batch-ms wakes the loop. */
        if (c->conf->batch_idle_ms > 0 && idle_left > 0 && idle_left < left)
            left = idle_left;
        return left < 0 ? 0 : left < 100 ? (int)left : 100;
    }
    return 100;
}

static void consumer_tick(void *arg)
{
    consumer_t *c = arg;
    /* Nothing more came, or the window is open for --commit-ms while a
     * batch fills slowly (it is not in the transaction): commit. */
    if (consumer_collect(c, false) && c->win_batches > 0 &&
        (c->batch_msgs == 0 ||
         now_ms() - c->win_opened_ms >= c->conf->commit_ms))
        consumer_window_end(c, true);
    if (consumer_batch_due(c))
        consumer_commit_batch(c, false);
    consumer_progress(c);
    consumer_ping(c);
    parts_update_lag(&c->pl.parts, PING_MS);
    consumer_prune(c);
}

static void consumer_finish(void *arg, bool fatal)
{
    consumer_t *c = arg;
    if (!fatal) {
        consumer_commit_batch(c, true);
    } else {
        consumer_collect(c, true);
        consumer_abandon_batch(c, "fatal error");
    }
}

static const pipeline_ops_t consumer_ops = {
    .prepare = consumer_prepare,
    .handle = consumer_handle,
    .tick = consumer_tick,
    .assign = consumer_assign,
    .revoke = consumer_revoke,
    .finish = consumer_finish,
};

int usage_consumer_run(const usage_consumer_conf_t *conf, char *errstr,
                       size_t errstr_size)
{
    consumer_t c;
    int rc;

    memset(&c, 0, sizeof(c));
    c.conf = conf;
    pipeline_init(&c.pl, conf->kc, conf->topic, &consumer_ops, &c, conf->stop,
                  "tally_usage_lag_messages",
                  "messages after the committed position, per assigned "
                  "partition");
    backoff_init(&c.pg, BACKOFF_MIN_MS, BACKOFF_MAX_MS);
    c.progress_ms = now_ms();
    /* The first pruning comes one interval, or a minute, after start. */
    c.last_prune_ms =
        now_ms() - conf->prune_interval_s * 1000 +
        (conf->prune_interval_s < 60 ? conf->prune_interval_s * 1000 : 60000);
    consumer_metrics_init(&c);
    c.batch = batch_new(conf->batch_size);
    c.spare = batch_new(conf->batch_size);
    c.com = committer_start(conf->store);
    if (!c.batch || !c.spare || !c.com)
        abort(); /* out of memory or threads at start */
    c.pg_seen_ms = now_ms();
    consumer_update_ready(&c);
    /* The enums as Postgres has them; the contract's until it answers. */
    usage_enums_default(&c.token_types, &c.operations);
    consumer_refresh_enums(&c);

    log_info("consuming %s as group %s (batches of %zu messages / %zu "
             "bytes / %d ms, up to %zu or %d ms per transaction; dead "
             "letters to %s)",
             conf->topic, conf->group, conf->batch_size, conf->batch_bytes,
             conf->batch_ms, conf->commit_batches, conf->commit_ms,
             conf->dlq_topic);
    rc = pipeline_run(&c.pl, errstr, errstr_size);
    consumer_collect(&c, true);
    committer_stop(c.com);
    free(c.job.pos);
    batch_free(c.batch);
    batch_free(c.spare);
    parts_free(&c.pl.parts);
    return rc;
}
