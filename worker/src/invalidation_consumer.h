/* The cache-invalidation consumer: poll, validate, apply to Redis, notify. */
#ifndef TALLY_INVALIDATION_CONSUMER_H
#define TALLY_INVALIDATION_CONSUMER_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

#include "cache.h"
#include "config.h"
#include "dead_letter.h"
#include "kafka.h"

typedef struct {
    kafka_consumer_t *kc; /* created, not subscribed; closed by the run */
    const char *group;
    const char *topic;
    const char *dlq_topic;
    const char *start_from;   /* "earliest" or "latest": no committed offset */
    const char *cache_prefix; /* --cache-prefix */
    const char *channel;      /* where notices go */
    size_t batch_size;        /* invalidations per Redis round at most */
    int batch_ms;
    size_t max_message_bytes;
    long scan_count;    /* SCAN COUNT */
    /* Nudge librdkafka's fetcher (pipeline.c, pipeline_nudge()): for a
     * small pre-fetch queue, as next to token usage. */
    bool nudge_fetches;
    cache_t *cache;     /* borrowed; this thread's own connection */
    dead_letter_t *dlq; /* borrowed */
    volatile sig_atomic_t *stop;
} invalidation_consumer_conf_t;

/* librdkafka settings of the invalidation consumer that -X may override,
 * for kafka_consumer_new(); "auto.offset.reset" comes from --start-from. */
extern const char *const invalidation_consumer_kafka_defaults[];

/* Consumes `topic` until *stop: each batch of invalidations is applied to
 * Redis, then the notices are published, then the offsets are committed
 * to the Kafka group (at least once: deletes are idempotent). Redis down:
 * the partitions are rewound to the batch's first offsets and paused, and
 * it retries with backoff (1 s doubling to 60 s), keeping its membership.
 * Returns 0 on a clean stop, -1 with errstr on a fatal error. */
int invalidation_consumer_run(const invalidation_consumer_conf_t *conf,
                              char *errstr, size_t errstr_size);

#endif
