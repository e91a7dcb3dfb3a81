/* Kafka group consumers as both pipelines need them. */
#ifndef TALLY_KAFKA_H
#define TALLY_KAFKA_H

#include <stddef.h>

#include <librdkafka/rdkafka.h>

#include "config.h"

/* A consumer in `group` on `brokers` with what tally relies on fixed
 * (cooperative-sticky assignment, no automatic commits or offset stores),
 * `defaults` (NULL-terminated key, value pairs, e.g. client.id) applied
 * unless a -X overrides them, then every -X of cfg. The rebalance callback
 * gets `opaque`. Subscribed to `topic`. NULL with errstr on a bad
 * setting. */
rd_kafka_t *kafka_consumer_new(const config_t *cfg, const char *brokers,
                               const char *group, const char *topic,
                               const char *const *defaults,
                               void (*rebalance_cb)(
                                   rd_kafka_t *, rd_kafka_resp_err_t,
                                   rd_kafka_topic_partition_list_t *, void *),
                               void *opaque, char *errstr,
                               size_t errstr_size);

/* rd_kafka_seek_partitions() with a timeout that means milliseconds on
 * every librdkafka: before 2.1.0 it waited a thousandth of timeout_ms
 * (librdkafka #4230; 10 ms for 10000), so that a slow moment made a
 * rewind time out. Same return as rd_kafka_seek_partitions(). */
rd_kafka_error_t *kafka_seek_partitions(rd_kafka_t *rk,
                                        rd_kafka_topic_partition_list_t *l,
                                        int timeout_ms);

#endif
