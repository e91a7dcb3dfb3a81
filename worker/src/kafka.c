/* Kafka group consumers as both pipelines need them. */
#include "kafka.h"

#include <limits.h>
#include <stdio.h>

rd_kafka_t *kafka_consumer_new(const config_t *cfg, const char *brokers,
                               const char *group, const char *topic,
                               const char *const *defaults,
                               void (*rebalance_cb)(
                                   rd_kafka_t *, rd_kafka_resp_err_t,
                                   rd_kafka_topic_partition_list_t *, void *),
                               void *opaque, char *errstr,
                               size_t errstr_size)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *topics = NULL;
    rd_kafka_resp_err_t err;
    rd_kafka_t *rk = NULL;
    char msg[512];

    if (config_kafka_set(conf, "bootstrap.servers", brokers, errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "group.id", group, errstr, errstr_size) ==
            -1 ||
        config_kafka_set(conf, "partition.assignment.strategy",
                         "cooperative-sticky", errstr, errstr_size) == -1 ||
        config_kafka_set(conf, "enable.auto.commit", "false", errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "enable.auto.offset.store", "false", errstr,
                         errstr_size) == -1)
        goto fail;
    for (size_t i = 0; defaults && defaults[i]; i += 2)
        if (config_kafka_default(cfg, conf, defaults[i], defaults[i + 1],
                                 errstr, errstr_size) == -1)
            goto fail;
    if (config_apply_x(cfg, conf, errstr, errstr_size) == -1)
        goto fail;
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_opaque(conf, opaque);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, msg, sizeof(msg));
    if (!rk) {
        snprintf(errstr, errstr_size, "kafka consumer: %s", msg);
        goto fail;
    }
    conf = NULL; /* owned by rk now */
    rd_kafka_poll_set_consumer(rk);
    topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, topic, RD_KAFKA_PARTITION_UA);
    err = rd_kafka_subscribe(rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (err) {
        snprintf(errstr, errstr_size, "subscribe to %s: %s", topic,
                 rd_kafka_err2str(err));
        rd_kafka_destroy(rk);
        return NULL;
    }
    return rk;
fail:
    if (conf)
        rd_kafka_conf_destroy(conf);
    return NULL;
}

rd_kafka_error_t *kafka_seek_partitions(rd_kafka_t *rk,
                                        rd_kafka_topic_partition_list_t *l,
                                        int timeout_ms)
{
    if (rd_kafka_version() < 0x02010000 && timeout_ms > 0)
        timeout_ms = timeout_ms > INT_MAX / 1000 ? INT_MAX : timeout_ms * 1000;
    return rd_kafka_seek_partitions(rk, l, timeout_ms);
}
