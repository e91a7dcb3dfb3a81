/* Kafka group consumers as both pipelines need them, and the workarounds
 * for librdkafka 2.0.2 (Debian's) that they rely on. */
#ifndef TALLY_KAFKA_H
#define TALLY_KAFKA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "config.h"

/* Called from the consumer's poll for every rebalance (cooperative:
 * incremental). The callee must call rd_kafka_incremental_assign() or
 * _unassign() on `parts`. `lost`: the partitions were lost (session
 * timeout, fencing by the coordinator), not revoked cleanly. */
typedef void (*kafka_rebalance_fn)(void *arg, rd_kafka_t *rk,
                                   rd_kafka_resp_err_t err,
                                   rd_kafka_topic_partition_list_t *parts,
                                   bool lost);

typedef struct kafka_consumer kafka_consumer_t;

/* Refuses the -X properties that would break what tally guarantees
 * (automatic commits or offset stores, another assignor, another group,
 * read_uncommitted, a reset policy that skips data, transactions, ...).
 * Returns 0, or -1 with errstr naming the property and why: a
 * configuration error (exit 2). Called once at start. */
int kafka_check_x(const config_t *cfg, char *errstr, size_t errstr_size);

/* Routes librdkafka's own log lines and errors through log.c, so that
 * every line on stderr has one format. For every client tally creates. */
void kafka_conf_logging(rd_kafka_conf_t *conf, const char *who);

/* A consumer in `group` on `brokers` with what tally relies on fixed
 * (cooperative-sticky assignment, no automatic commits or offset stores),
 * `defaults` (NULL-terminated key, value pairs, e.g. client.id) applied
 * unless a -X overrides them, then every -X of cfg; tally's fetch sizes
 * are raised to a larger message.max.bytes the user asked for. Created
 * but not subscribed, so that start-up can report every configuration
 * error (NULL with errstr: exit 2) before any pipeline runs. */
kafka_consumer_t *kafka_consumer_new(const config_t *cfg,
                                     const char *brokers, const char *group,
                                     const char *const *defaults,
                                     char *errstr, size_t errstr_size);

/* Commits `offsets` to the consumer's group (asynchronously unless
 * `sync`), for lag tools: tally's positions live in Postgres. librdkafka
 * 2.0.2 with cooperative-sticky makes a member whose commit arrives
 * while the group rebalances rejoin, which starts another rebalance
 * (librdkafka issue #4059, fixed after 2.0.2): commits sent again at
 * once after each failure kept a group rebalancing, a member without
 * partitions for minutes. So after a commit is refused because the group
 * rebalances (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION,
 * UNKNOWN_MEMBER_ID), commits are held (not sent, and counted as failed
 * so that kafka_consumer_commit_failed() brings them back) until a
 * rebalance callback reaches this consumer (librdkafka calls it when
 * every rebalance completes, even with nothing new to assign) or, should
 * none come, KAFKA_COMMIT_HOLD_MS has passed. Synchronous commits (a
 * revocation, a stop: the last chance for those positions) are sent
 * whatever the hold. A shorter hold was not
 * enough: a commit sent after 10 s into a rebalance that lasted longer
 * (the mock's last 44 s) was refused as ILLEGAL_GENERATION, which 2.0.2
 * takes as the assignment lost, and the group went round again. Returns
 * rd_kafka_commit()'s result, or NO_ERROR when held. */
#define KAFKA_COMMIT_HOLD_MS 60000
rd_kafka_resp_err_t
kafka_consumer_commit(kafka_consumer_t *kc,
                      const rd_kafka_topic_partition_list_t *offsets,
                      bool sync);

/* The outcome of an offset commit (the consumer's commit callback, and
 * kafka_consumer_commit() for synchronous ones). */
void kafka_consumer_commit_result(kafka_consumer_t *kc,
                                  rd_kafka_resp_err_t err);

/* True when an offset commit failed (or was held) since the last call
 * and the positions should be committed again now: not while commits
 * are held, and not sooner than KAFKA_RECOMMIT_MS after the failure (a
 * failing coordinator is not asked again on every poll). Clears it. */
#define KAFKA_RECOMMIT_MS 1000
bool kafka_consumer_commit_failed(kafka_consumer_t *kc);

/* The librdkafka handle, for polling, pausing, seeking and committing. */
rd_kafka_t *kafka_consumer_rk(const kafka_consumer_t *kc);

/* Subscribes to `topic`; rebalances go to `fn(arg, ...)`. 0, or -1 with
 * errstr. */
int kafka_consumer_subscribe(kafka_consumer_t *kc, const char *topic,
                             kafka_rebalance_fn fn, void *arg,
                             char *errstr, size_t errstr_size);

/* Leaves the group (rd_kafka_consumer_close(), which calls the rebalance
 * function for the last revocation) and destroys the handle. librdkafka
 * 2.0.2 aborts in rd_kafka_destroy() when the cooperative-sticky assignor
 * joined the group but never received an assignment (its issue #4312,
 * fixed in 2.3.0): such a handle is closed but deliberately not
 * destroyed (kept reachable until exit). NULL is a no-op. */
void kafka_consumer_close(kafka_consumer_t *kc);

/* Destroys a consumer that was never subscribed (start-up failed). */
void kafka_consumer_free(kafka_consumer_t *kc);

/* One message to read again by position. */
typedef struct {
    int32_t partition;
    int64_t offset;
} kafka_position_t;

/* Reads the messages at `want` (sorted by partition, then offset) of
 * `topic` again, with a consumer of its own outside any group, and calls
 * fn(arg, i, rkm) for each (rkm valid during the call). For the rare
 * paths that need a message's original bytes after its batch was built
 * (a dead letter for an event Postgres refused). 0, or -1 with errstr if
 * any could not be read within timeout_ms. */
int kafka_fetch_each(const config_t *cfg, const char *brokers,
                     const char *topic, const kafka_position_t *want,
                     size_t n, int timeout_ms,
                     int (*fn)(void *arg, size_t i,
                               const rd_kafka_message_t *rkm),
                     void *arg, char *errstr, size_t errstr_size);

/* rd_kafka_seek_partitions() with a timeout that means milliseconds on
 * every librdkafka: before 2.1.0 it waited a thousandth of timeout_ms
 * (librdkafka #4230; 10 ms for 10000), so that a slow moment made a
 * rewind time out. Same return as rd_kafka_seek_partitions(). */
rd_kafka_error_t *kafka_seek_partitions(rd_kafka_t *rk,
                                        rd_kafka_topic_partition_list_t *l,
                                        int timeout_ms);

#endif
