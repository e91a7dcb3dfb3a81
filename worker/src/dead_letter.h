/* The dead-letter producer: rejected messages to <topic>.dlq. */
#ifndef TALLY_DEAD_LETTER_H
#define TALLY_DEAD_LETTER_H

#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "config.h"

typedef struct dead_letter dead_letter_t;

/* An idempotent lz4 producer to `brokers` with every -X of cfg applied,
 * able to send a value of max_bytes with its key and headers. NULL with
 * errstr on a configuration error. */
dead_letter_t *dead_letter_new(const config_t *cfg, const char *brokers,
                               size_t max_bytes, char *errstr,
                               size_t errstr_size);
void dead_letter_destroy(dead_letter_t *dl);

/* Looks up `dlq_topic` in the background (its leader), so that the
 * first dead letter does not wait for that round trip: without it, the
 * first flush of each member took 0.4-0.9 s at the start of a backlog,
 * while its committer had nothing to do. */
void dead_letter_prepare(dead_letter_t *dl, const char *dlq_topic);

/* Queues `rkm` (key, value, timestamp kept; value cut to max_bytes with
 * header tally.error.truncated) for `dlq_topic` with the contract's
 * tally.error.* headers. Returns 0 when queued; 1 when this process
 * queued a dead letter for the same source (partition, offset) already,
 * which is then not sent again (a batch consumed again after a rewind);
 * -1 with errstr if it could not be queued. Either way, a
 * dead_letter_flush() before the offset is committed tells whether it
 * was acknowledged. After a crash, a dead letter may be sent twice. */
int dead_letter_send(dead_letter_t *dl, const rd_kafka_message_t *rkm,
                     const char *dlq_topic, const char *reason,
                     const char *message, size_t max_bytes, char *errstr,
                     size_t errstr_size);

/* Waits until every queued dead letter is acknowledged. Returns 0 when all
 * were, -1 with errstr if any failed or `timeout_ms` passed (the caller
 * must then not advance the offsets of the messages behind them). The
 * failure count is reset. */
int dead_letter_flush(dead_letter_t *dl, int timeout_ms, char *errstr,
                      size_t errstr_size);

/* Forgets the sources of `partition` below offset `below` (committed, or
 * the partition is gone: INT64_MAX): they will not be consumed again by
 * this process, or if they are, by another owner. */
void dead_letter_forget(dead_letter_t *dl, int32_t partition,
                        int64_t below);

/* Dead letters acknowledged so far. */
unsigned long dead_letter_acked(const dead_letter_t *dl);

#endif
