/* The dead-letter producer: rejected messages to <topic>.dlq. */
#include "dead_letter.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kafka.h"
#include "log.h"

/* A source message (partition, offset) with a dead letter queued or
 * acknowledged in this process. */
typedef struct {
    int32_t partition;
    int64_t offset;
    bool acked;
} dl_sent_t;

struct dead_letter {
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt; /* dead_letter_prepare(): kept while we run */
    /* Written by the delivery report callback (called from our polls). */
    atomic_ulong failed;
    atomic_ulong acked;
    char last_error[256];
    /* What was sent, sorted by (partition, offset), so that a batch
     * consumed again after a rewind does not send its dead letters
     * again. Entries go once their offsets are committed. */
    pthread_mutex_t mu;
    dl_sent_t *sent;
    size_t n_sent, cap_sent;
};

static int sent_cmp(int32_t p1, int64_t o1, const dl_sent_t *e)
{
    if (p1 != e->partition)
        return p1 < e->partition ? -1 : 1;
    return o1 < e->offset ? -1 : o1 > e->offset ? 1 : 0;
}

/* Index of the first entry >= (partition, offset). Caller holds mu. */
static size_t sent_lower_bound(const dead_letter_t *dl, int32_t partition,
                               int64_t offset)
{
    size_t lo = 0, hi = dl->n_sent;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (sent_cmp(partition, offset, &dl->sent[mid]) > 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The entry of (partition, offset), or NULL. Caller holds mu. */
static dl_sent_t *sent_find(dead_letter_t *dl, int32_t partition,
                            int64_t offset)
{
    size_t i = sent_lower_bound(dl, partition, offset);
    if (i < dl->n_sent && sent_cmp(partition, offset, &dl->sent[i]) == 0)
        return &dl->sent[i];
    return NULL;
}

static void sent_insert(dead_letter_t *dl, int32_t partition, int64_t offset)
{
    size_t i = sent_lower_bound(dl, partition, offset);
    if (dl->n_sent == dl->cap_sent) {
        dl->cap_sent = dl->cap_sent ? dl->cap_sent * 2 : 64;
        dl->sent = realloc(dl->sent, dl->cap_sent * sizeof(*dl->sent));
        if (!dl->sent)
            abort();
    }
    memmove(dl->sent + i + 1, dl->sent + i,
            (dl->n_sent - i) * sizeof(*dl->sent));
    dl->sent[i] = (dl_sent_t){partition, offset, false};
    dl->n_sent++;
}

/* Removes the entries of `partition` in [from, to). Caller holds mu. */
static void sent_remove(dead_letter_t *dl, int32_t partition, int64_t from,
                        int64_t to)
{
    size_t a = sent_lower_bound(dl, partition, from);
    size_t b = sent_lower_bound(dl, partition, to);
    if (b == a)
        return; /* nothing there (dl->sent may still be NULL) */
    memmove(dl->sent + a, dl->sent + b,
            (dl->n_sent - b) * sizeof(*dl->sent));
    dl->n_sent -= b - a;
}

/* What a queued dead letter carries to its delivery report. */
typedef struct {
    int32_t partition;
    int64_t offset;
} dl_source_t;

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm,
                      void *opaque)
{
    dead_letter_t *dl = opaque;
    dl_source_t *src = rkm->_private;

    if (src) {
        pthread_mutex_lock(&dl->mu);
        dl_sent_t *e = sent_find(dl, src->partition, src->offset);
        if (e && rkm->err) /* sent again when consumed again */
            sent_remove(dl, src->partition, src->offset, src->offset + 1);
        else if (e)
            e->acked = true;
        pthread_mutex_unlock(&dl->mu);
        free(src);
    }
    if (rkm->err) {
        atomic_fetch_add(&dl->failed, 1);
        snprintf(dl->last_error, sizeof(dl->last_error), "%s [%" PRId32
                 "]: %s", rd_kafka_topic_name(rkm->rkt), rkm->partition,
                 rd_kafka_err2str(rkm->err));
        log_error("dead letter to %s not delivered: %s",
                  rd_kafka_topic_name(rkm->rkt), rd_kafka_err2str(rkm->err));
    } else {
        atomic_fetch_add(&dl->acked, 1);
    }
}

dead_letter_t *dead_letter_new(const config_t *cfg, const char *brokers,
                               size_t max_bytes, char *errstr,
                               size_t errstr_size)
{
    dead_letter_t *dl = calloc(1, sizeof(*dl));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[512], max_msg[32];

    /* A value cut to max_bytes, plus the original key (bounded by the
     * same limit) and the headers. The topic must allow it too (Kafka's
     * max.message.bytes, 1 MiB by default). */
    snprintf(max_msg, sizeof(max_msg), "%zu", 2 * max_bytes + 65536);

    if (!dl)
        goto fail;
    pthread_mutex_init(&dl->mu, NULL);
    if (config_kafka_set(conf, "bootstrap.servers", brokers, errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "client.id", "tally-dlq", errstr,
                         errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "enable.idempotence", "true", errstr,
                             errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "compression.codec", "lz4", errstr,
                             errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "linger.ms", "5", errstr,
                             errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "message.timeout.ms", "30000",
                             errstr, errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "queue.buffering.max.kbytes", "16384",
                             errstr, errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "message.max.bytes", max_msg, errstr,
                             errstr_size) == -1 ||
        config_apply_x(cfg, conf, errstr, errstr_size) == -1)
        goto fail;
    kafka_conf_logging(conf, "dead letters");
    rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
    rd_kafka_conf_set_opaque(conf, dl);
    dl->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    if (!dl->rk) {
        snprintf(errstr, errstr_size, "dead-letter producer: %s", err);
        goto fail;
    }
    conf = NULL; /* owned by rk now */
    return dl;
fail:
    if (conf)
        rd_kafka_conf_destroy(conf);
    if (dl)
        pthread_mutex_destroy(&dl->mu);
    free(dl);
    return NULL;
}

void dead_letter_destroy(dead_letter_t *dl)
{
    if (!dl)
        return;
    if (dl->rkt)
        rd_kafka_topic_destroy(dl->rkt);
    if (dl->rk) {
        rd_kafka_flush(dl->rk, 10000);
        rd_kafka_destroy(dl->rk); /* reports (and frees) what was left */
    }
    pthread_mutex_destroy(&dl->mu);
    free(dl->sent);
    free(dl);
}

void dead_letter_prepare(dead_letter_t *dl, const char *dlq_topic)
{
    if (!dl->rkt)
        dl->rkt = rd_kafka_topic_new(dl->rk, dlq_topic, NULL);
}

int dead_letter_send(dead_letter_t *dl, const rd_kafka_message_t *rkm,
                     const char *dlq_topic, const char *reason,
                     const char *message, size_t max_bytes, char *errstr,
                     size_t errstr_size)
{
    rd_kafka_headers_t *hdrs;
    rd_kafka_timestamp_type_t tstype;
    int64_t ts = rd_kafka_message_timestamp(rkm, &tstype);
    size_t len = rkm->len;
    char num[32];
    rd_kafka_resp_err_t err;
    dl_source_t *src;
    bool sent;

    pthread_mutex_lock(&dl->mu);
    sent = sent_find(dl, rkm->partition, rkm->offset) != NULL;
    if (!sent)
        sent_insert(dl, rkm->partition, rkm->offset);
    pthread_mutex_unlock(&dl->mu);
    if (sent)
        return 1; /* queued or acknowledged before: not again */
    src = malloc(sizeof(*src));
    if (!src)
        abort();
    src->partition = rkm->partition;
    src->offset = rkm->offset;
    hdrs = rd_kafka_headers_new(6);

    rd_kafka_header_add(hdrs, "tally.error.reason", -1, reason, -1);
    rd_kafka_header_add(hdrs, "tally.error.message", -1, message, -1);
    rd_kafka_header_add(hdrs, "tally.error.topic", -1,
                        rd_kafka_topic_name(rkm->rkt), -1);
    snprintf(num, sizeof(num), "%" PRId32, rkm->partition);
    rd_kafka_header_add(hdrs, "tally.error.partition", -1, num, -1);
    snprintf(num, sizeof(num), "%" PRId64, rkm->offset);
    rd_kafka_header_add(hdrs, "tally.error.offset", -1, num, -1);
    if (len > max_bytes) {
        len = max_bytes;
        rd_kafka_header_add(hdrs, "tally.error.truncated", -1, "true", -1);
    }
    for (;;) {
        err = rd_kafka_producev(
            dl->rk, RD_KAFKA_V_TOPIC(dlq_topic),
            RD_KAFKA_V_KEY(rkm->key, rkm->key_len),
            RD_KAFKA_V_VALUE(rkm->payload, len),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_TIMESTAMP(ts > 0 ? ts : 0),
            RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(src),
            RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        rd_kafka_poll(dl->rk, 100); /* let deliveries drain the queue */
    }
    if (err) {
        rd_kafka_headers_destroy(hdrs); /* not taken on failure */
        free(src);
        pthread_mutex_lock(&dl->mu);
        sent_remove(dl, rkm->partition, rkm->offset, rkm->offset + 1);
        pthread_mutex_unlock(&dl->mu);
        snprintf(errstr, errstr_size, "dead letter to %s: %s", dlq_topic,
                 rd_kafka_err2str(err));
        return -1;
    }
    rd_kafka_poll(dl->rk, 0);
    return 0;
}

int dead_letter_flush(dead_letter_t *dl, int timeout_ms, char *errstr,
                      size_t errstr_size)
{
    rd_kafka_resp_err_t err = rd_kafka_flush(dl->rk, timeout_ms);
    unsigned long failed = atomic_exchange(&dl->failed, 0);

    if (err) {
        snprintf(errstr, errstr_size,
                 "dead letters not acknowledged within %d ms (%d queued)",
                 timeout_ms, rd_kafka_outq_len(dl->rk));
        return -1;
    }
    if (failed) {
        snprintf(errstr, errstr_size, "%lu dead letters failed: %s", failed,
                 dl->last_error);
        return -1;
    }
    return 0;
}

void dead_letter_forget(dead_letter_t *dl, int32_t partition,
                        int64_t below)
{
    pthread_mutex_lock(&dl->mu);
    sent_remove(dl, partition, INT64_MIN, below);
    pthread_mutex_unlock(&dl->mu);
}

unsigned long dead_letter_acked(const dead_letter_t *dl)
{
    return atomic_load(&((dead_letter_t *)dl)->acked);
}
