/* The skeleton both consumers share: partitions, backoff, the poll loop. */
#ifndef TALLY_PIPELINE_H
#define TALLY_PIPELINE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "dead_letter.h"
#include "kafka.h"
#include "metrics.h"

/* Wall-clock milliseconds; monotonic nanoseconds (for durations). */
int64_t pipeline_now_ms(void);
int64_t pipeline_mono_ns(void);

/* ---------------------------------------------------------------- */
/* Backoff: 1 s doubling to 60 s, for whatever a pipeline waits on.   */

typedef struct {
    int min_ms, max_ms;
    int delay_ms;        /* the next wait */
    int64_t retry_at_ms; /* 0: not waiting */
} backoff_t;

void backoff_init(backoff_t *b, int min_ms, int max_ms);
/* A failure: waits delay_ms from now (returned, for the log line), and
 * the delay after it doubles up to max_ms. */
int backoff_fail(backoff_t *b);
/* Success: no wait, and the next failure waits min_ms again. */
void backoff_reset(backoff_t *b);
/* True while the wait set by the last failure lasts. */
bool backoff_waiting(const backoff_t *b);

/* ---------------------------------------------------------------- */
/* Partitions                                                         */

/* Where a partition stands. Every change goes through parts_set_state(),
 * which refuses a transition not in this list (a programming error):
 *
 *   UNASSIGNED -> CLAIMING | ACTIVE | WAITING   assigned
 *   CLAIMING   -> ACTIVE      its position was read and sought
 *   ACTIVE     -> CLAIMING    its batch was abandoned: read the position again
 *   ACTIVE     -> WAITING     rewound: wait for the dependency
 *   WAITING    -> ACTIVE      the dependency answers again
 *   ACTIVE | CLAIMING -> FENCED   another member claimed one of ours
 *   FENCED     -> CLAIMING    still ours long after: claim it again
 *   any        -> UNASSIGNED  revoked or lost
 *
 * Only ACTIVE partitions are fetched from: the others are paused in
 * librdkafka (parts_sync()). */
typedef enum {
    PART_UNASSIGNED = 0,
    PART_CLAIMING, /* paused: its position must be read from Postgres */
    PART_ACTIVE,   /* consuming from `next` */
    PART_WAITING,  /* paused: rewound, waiting for Redis (or Kafka) */
    PART_FENCED,   /* paused: another member claimed it, until revoked */
} part_state_t;

typedef struct {
    part_state_t state; /* read-only outside pipeline.c */
    int64_t since_ms;   /* when it entered its state */
    bool in_batch;      /* has messages in the open batch */
    int64_t epoch;      /* token-usage: our claim's fencing token */
    int64_t committed;  /* next offset committed (< 0: none known yet) */
    int64_t first;      /* first offset in the open batch */
    int64_t next;       /* next offset to process */
    /* token-usage: in the open window (a transaction of several batches
     * not committed yet), up to window_next; and, after a window failed,
     * commit its batches alone until `committed` reaches alone_until. */
    bool in_window;
    int64_t window_next;
    int64_t alone_until;
    bool dirty;    /* state changed since librdkafka was told */
    metric_t *lag; /* the lag series of this partition */
} part_t;

typedef struct {
    const char *topic;
    rd_kafka_t *rk;
    part_t *parts;
    int32_t n;
    const char *lag_name; /* e.g. "tally_usage_lag_messages" */
    const char *lag_help;
    metric_t *assigned;        /* gauge shared by the members: the sum */
    int64_t assigned_reported; /* this member's part of it */
    int64_t lag_ms;            /* lag gauges last updated */
} part_table_t;

/* The state of `partition` (>= 0, as librdkafka's are), grown on demand.
 * Never NULL. */
part_t *parts_get(part_table_t *t, int32_t partition);
/* Moves `partition` to `to`, logging the change (debug) with `why`;
 * abort()s on a transition the list above does not have. Entering
 * UNASSIGNED from an assignment clears the partition (except its lag
 * series). librdkafka is told by the next parts_sync(). */
void parts_set_state(part_table_t *t, int32_t partition, part_state_t to,
                     const char *why);
/* parts_set_state() for every partition in state `from`; returns how
 * many moved. */
int parts_move_all(part_table_t *t, part_state_t from, part_state_t to,
                   const char *why);
/* Counts the partitions in `state` (PART_UNASSIGNED: not counted). */
int parts_count(const part_table_t *t, part_state_t state);
int parts_assigned(const part_table_t *t);
/* Pauses the assigned partitions that changed to a state other than
 * ACTIVE and resumes those that became ACTIVE (librdkafka keeps a pause
 * across unassign and assign, so an assignment is always told). */
void parts_sync(part_table_t *t);
/* The partitions with messages in the open batch, as a list (the caller
 * destroys it) whose offsets are `next` (what to commit) or, with
 * `first`, the batch's first offsets (where to rewind to). */
rd_kafka_topic_partition_list_t *parts_in_batch(const part_table_t *t,
                                                bool first);
/* Forgets that any partition has messages in the open batch. */
void parts_clear_batch(part_table_t *t);
/* Publishes the assigned-partitions gauge (the sum over the members of
 * the process). */
void parts_report_assigned(part_table_t *t);
/* Every `every_ms`: per assigned partition, the messages between the
 * committed position (else the consumer's position, else the log start)
 * and the log end, from the watermarks of librdkafka's last fetch (no
 * broker round trip). A partition revoked reads 0, so that the sum over
 * the members is the group's lag. */
void parts_update_lag(part_table_t *t, int every_ms);
void parts_free(part_table_t *t);

/* ---------------------------------------------------------------- */
/* Dead letters                                                       */

/* Logs the rejection of `rkm` (topic, partition, offset, reason,
 * message), hands it to the dead-letter producer and counts it in
 * `counter` unless this process sent it before. Returns 0 (queued or
 * sent before: the offset may advance once dead letters are flushed) or
 * -1 with errstr (not even queued: the offset must not pass it). */
int pipeline_dead_letter(dead_letter_t *dlq, const char *dlq_topic,
                         const rd_kafka_message_t *rkm, const char *reason,
                         const char *message, size_t max_message_bytes,
                         metric_t *counter, char *errstr, size_t errstr_size);
/* The counter `name`{reason="<reason>"}, registered now. */
metric_t *pipeline_reason_counter(const char *name, const char *reason,
                                  const char *help);

/* ---------------------------------------------------------------- */
/* The poll loop                                                      */

typedef struct {
    /* Before each poll (claims, reconnects): returns the poll timeout
     * in ms. */
    int (*prepare)(void *arg);
    /* Each message without an error (errors are logged here). */
    void (*handle)(void *arg, const rd_kafka_message_t *rkm);
    /* After each poll: batches due, pings, lag, progress. */
    void (*tick)(void *arg);
    /* Rebalances, after the count and the log line: must call
     * rd_kafka_incremental_assign() or _unassign() on `parts`. */
    void (*assign)(void *arg, rd_kafka_topic_partition_list_t *parts);
    void (*revoke)(void *arg, rd_kafka_topic_partition_list_t *parts,
                   bool lost);
    /* On stop, before leaving the group: commit the open batch, or
     * (`fatal`) abandon it. */
    void (*finish)(void *arg, bool fatal);
} pipeline_ops_t;

typedef struct {
    const char *name; /* for log lines: the topic */
    part_table_t parts;
    kafka_consumer_t *kc;
    rd_kafka_t *rk;
    const pipeline_ops_t *ops;
    void *arg;
    volatile sig_atomic_t *stop;
    metric_t *rebalances;
    metric_t *poll_ns; /* NULL, or time spent in poll */
    bool synced;       /* a rebalance came: the group has settled once */
    bool fatal;
    char fatal_error[512];
    /* Fetch nudges (pipeline.c, pipeline_nudge()), when `nudge`. */
    bool nudge;
    unsigned nudge_polls;
    rd_kafka_queue_t *consumer_q;
    size_t q_peak;          /* messages queued at most since the last nudge */
    struct nudger *nudger;  /* the thread that sends them (pipeline_run) */
    bool leaders_stale;     /* the assignment changed: look them up again */
    metric_t *nudges;       /* NULL, or counts the nudges */
} pipeline_t;

/* Sets up `pl` for `topic` on `kc` (created, not subscribed; the run
 * closes it) with the pipeline's steps; its partition table reports lag
 * as the gauge `lag_name`. Metrics (rebalances, poll_ns, parts.assigned)
 * are the caller's to register. */
void pipeline_init(pipeline_t *pl, kafka_consumer_t *kc, const char *topic,
                   const pipeline_ops_t *ops, void *arg,
                   volatile sig_atomic_t *stop, const char *lag_name,
                   const char *lag_help);

/* Stops the loop after this iteration with a fatal error (the worker
 * exits non-zero): a fatal Kafka error, or a rewind that failed. */
void pipeline_fatal(pipeline_t *pl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Subscribes pl->kc to its topic and runs the loop until *pl->stop or a
 * fatal error: prepare, poll, handle, tick. Then finish, leave the group
 * (the last revocation comes then) and close pl->kc, in every case.
 * Returns 0 on a clean stop, -1 with errstr on a fatal error. */
int pipeline_run(pipeline_t *pl, char *errstr, size_t errstr_size);

#endif
