/* The token-usage consumer: poll loop, rebalances, batching, commits. */
#ifndef TALLY_USAGE_CONSUMER_H
#define TALLY_USAGE_CONSUMER_H

#include <signal.h>
#include <stddef.h>

#include "config.h"
#include "dead_letter.h"
#include "kafka.h"
#include "usage_store.h"

typedef struct {
    kafka_consumer_t
        *kc; /* created, not subscribed; usage_consumer_run closes it */
    const config_t *cfg; /* -X, for reading refused events again */
    const char *brokers;
    const char *group;
    const char *ready_name; /* its /readyz check, e.g. "token-usage#2" */
    const char *topic;
    const char *dlq_topic;
    const char *start_from; /* "earliest" or "latest" */
    size_t batch_size;      /* messages per batch at most */
    size_t batch_bytes;     /* message bytes per batch at most */
    int batch_ms;           /* a batch is closed this long after it opened */
    int batch_idle_ms;      /* or once caught up and idle this long (0: no) */
    size_t commit_batches;  /* batches per Postgres transaction at most */
    int commit_ms;          /* ... and open this long at most */
    size_t window_buckets;  /* a transaction commits past this many daily
                             * sums held in memory (0: no bound) */
    int dedupe_days;
    size_t max_message_bytes;
    long prune_interval_s;       /* 0: never prune the dedupe store */
    store_t *store;              /* borrowed; this thread's own connection */
    dead_letter_t *dlq;          /* borrowed */
    volatile sig_atomic_t *stop; /* set by the signal handler */
} usage_consumer_conf_t;

/* librdkafka settings of the token-usage consumer (key, value pairs,
 * NULL-terminated) that -X may override; for kafka_consumer_new(). */
extern const char *const usage_consumer_kafka_defaults[];

/* Consumes `topic` until *stop, then commits the open batch, leaves the
 * group and returns 0. Closes conf->kc in every case. Returns -1 with errstr on
 * a fatal error (bad configuration, a fatal Kafka error). Postgres outages are
 * not fatal: it pauses, backs off and resumes by itself. */
int usage_consumer_run(const usage_consumer_conf_t *conf, char *errstr,
                       size_t errstr_size);

#endif
