/* The dead-letter producer: rejected messages to <topic>.dlq. */
#include "dead_letter.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

struct dead_letter {
    rd_kafka_t *rk;
    /* Written by the delivery report callback (called from our polls). */
    atomic_ulong failed;
    atomic_ulong acked;
    char last_error[256];
};

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm,
                      void *opaque)
{
    dead_letter_t *dl = opaque;
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
    free(dl);
    return NULL;
}

void dead_letter_destroy(dead_letter_t *dl)
{
    if (!dl)
        return;
    if (dl->rk) {
        rd_kafka_flush(dl->rk, 10000);
        rd_kafka_destroy(dl->rk);
    }
    free(dl);
}

int dead_letter_send(dead_letter_t *dl, const rd_kafka_message_t *rkm,
                     const char *dlq_topic, const char *reason,
                     const char *message, size_t max_bytes, char *errstr,
                     size_t errstr_size)
{
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(6);
    rd_kafka_timestamp_type_t tstype;
    int64_t ts = rd_kafka_message_timestamp(rkm, &tstype);
    size_t len = rkm->len;
    char num[32];
    rd_kafka_resp_err_t err;

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
            RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        rd_kafka_poll(dl->rk, 100); /* let deliveries drain the queue */
    }
    if (err) {
        rd_kafka_headers_destroy(hdrs); /* not taken on failure */
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

unsigned long dead_letter_acked(const dead_letter_t *dl)
{
    return atomic_load(&((dead_letter_t *)dl)->acked);
}
