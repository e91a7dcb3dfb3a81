/* Kafka group consumers as both pipelines need them, and the workarounds
 * for librdkafka 2.0.2 (Debian's) that they rely on. */
#include "kafka.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

struct kafka_consumer {
    rd_kafka_t *rk;
    kafka_rebalance_fn fn;
    void *arg;
    /* A rebalance callback came: librdkafka received an assignment and
     * holds its assignor state, so rd_kafka_destroy() is safe. */
    bool synced;
    bool subscribed;
    bool commit_failed; /* an offset commit failed since last asked */
    int64_t failed_ms;  /* when it failed (monotonic ms) */
    /* Offset commits held until then (monotonic ms, 0: not held): see
     * kafka_consumer_commit(). */
    int64_t hold_until_ms;
};

static int64_t kafka_now_ms(void);

/* ---------------------------------------------------------------- */
/* -X properties tally cannot allow                                   */

static const struct {
    const char *key;
    const char *why;
} refused_x[] = {
    {"enable.auto.commit",
     "tally commits offsets itself, only after a batch is safe"},
    {"auto.commit.enable",
     "tally commits offsets itself, only after a batch is safe"},
    {"enable.auto.offset.store",
     "tally stores offsets itself, only after a batch is safe"},
    {"offset.store.method", "tally keeps positions in Postgres"},
    {"partition.assignment.strategy",
     "tally's rebalance handling is written for cooperative-sticky"},
    {"group.id", "use --group (and --invalidation-group)"},
    {"group.instance.id",
     "one static member id would be shared by every consumer of the "
     "process"},
    {"group.protocol.type", "tally needs the consumer protocol"},
    {"isolation.level",
     "read_uncommitted would count messages of aborted transactions"},
    {"auto.offset.reset",
     "use --start-from; past the retention tally takes what is left, never "
     "skips to the end"},
    {"bootstrap.servers", "use --brokers"},
    {"metadata.broker.list", "use --brokers"},
    {"transactional.id",
     "the dead-letter producer is not transactional"},
};

int kafka_check_x(const config_t *cfg, char *errstr, size_t errstr_size)
{
    for (size_t i = 0; i < cfg->n_x; i++) {
        const char *k = cfg->x_keys[i], *v = cfg->x_vals[i];
        for (size_t r = 0; r < sizeof(refused_x) / sizeof(*refused_x);
             r++) {
            if (strcmp(k, refused_x[r].key) == 0) {
                snprintf(errstr, errstr_size, "-X %s=%s is refused: %s", k,
                         v, refused_x[r].why);
                return -1;
            }
        }
        /* A dead letter counts as delivered when acknowledged: acks=0
         * would acknowledge nothing. */
        if ((!strcmp(k, "acks") || !strcmp(k, "request.required.acks")) &&
            !strcmp(v, "0")) {
            snprintf(errstr, errstr_size,
                     "-X %s=0 is refused: a dead letter must be "
                     "acknowledged before its offset is committed",
                     k);
            return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* librdkafka's logs through ours                                     */

static void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                         const char *buf)
{
    log_level_t l = level <= 3   ? LOG_LVL_ERROR
                    : level <= 5 ? LOG_LVL_WARN
                    : level <= 6 ? LOG_LVL_INFO
                                 : LOG_LVL_DEBUG;
    /* -X goes to every client, so a consumer property given to the
     * dead-letter producer (and the other way) is expected, not news. */
    if (!strcmp(fac, "CONFWARN"))
        l = LOG_LVL_DEBUG;
    log_msg(l, "kafka %s: %s: %s", rd_kafka_name(rk), fac, buf);
}

static void kafka_error_cb(rd_kafka_t *rk, int err, const char *reason,
                           void *opaque)
{
    /* Transport errors come and go with the brokers; librdkafka retries
     * them by itself. */
    log_msg(err == RD_KAFKA_RESP_ERR__FATAL ? LOG_LVL_ERROR : LOG_LVL_WARN,
            "kafka %s: %s: %s", rd_kafka_name(rk),
            rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

void kafka_conf_logging(rd_kafka_conf_t *conf, const char *who)
{
    (void)who;
    rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
    rd_kafka_conf_set_error_cb(conf, kafka_error_cb);
}

/* ---------------------------------------------------------------- */
/* Consumers                                                          */

static void kafka_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                               rd_kafka_topic_partition_list_t *parts,
                               void *opaque)
{
    kafka_consumer_t *kc = opaque;
    rd_kafka_error_t *error = NULL;

    kc->synced = true;
    /* The rebalance has reached us: commits may go again (those of a
     * revocation, from the callback, are the ones Kafka expects). */
    kc->hold_until_ms = 0;
    switch (err) {
    case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
    case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
        if (kc->fn) {
            kc->fn(kc->arg, rk, err, parts, rd_kafka_assignment_lost(rk));
            return;
        }
        error = err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                    ? rd_kafka_incremental_assign(rk, parts)
                    : rd_kafka_incremental_unassign(rk, parts);
        break;
    default:
        /* Not expected from librdkafka: let go of what it names. */
        log_error("rebalance: unexpected %s; unassigning %d partitions",
                  rd_kafka_err2str(err), parts->cnt);
        if (kc->fn)
            kc->fn(kc->arg, rk, RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS,
                   parts, true);
        else
            error = rd_kafka_incremental_unassign(rk, parts);
        break;
    }
    if (error) {
        log_error("rebalance: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
}

/* Reads an integer property back from `conf` (-1 if unreadable). */
static long long conf_get_int(rd_kafka_conf_t *conf, const char *key)
{
    char val[64];
    size_t size = sizeof(val);
    if (rd_kafka_conf_get(conf, key, val, &size) != RD_KAFKA_CONF_OK)
        return -1;
    return strtoll(val, NULL, 10);
}

static bool x_has(const config_t *cfg, const char *key)
{
    for (size_t i = 0; i < cfg->n_x; i++)
        if (!strcmp(cfg->x_keys[i], key))
            return true;
    return false;
}

/* The outcome of every offset commit, from the consumer's poll. */
static void kafka_offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                                   rd_kafka_topic_partition_list_t *offsets,
                                   void *opaque)
{
    kafka_consumer_t *kc = opaque;
    (void)rk;
    (void)offsets;
    kafka_consumer_commit_result(kc, err);
}

/* An offset commit was refused because the group is rebalancing (or has
 * moved on to a generation we have not joined yet). */
static bool kafka_err_rebalancing(rd_kafka_resp_err_t err)
{
    return err == RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS ||
           err == RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION ||
           err == RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID;
}

/* The positions are to be committed again (kafka_consumer_commit_failed()). */
static void kafka_commit_mark_failed(kafka_consumer_t *kc)
{
    if (!kc->commit_failed)
        kc->failed_ms = kafka_now_ms();
    kc->commit_failed = true;
}

void kafka_consumer_commit_result(kafka_consumer_t *kc,
                                  rd_kafka_resp_err_t err)
{
    if (!err || err == RD_KAFKA_RESP_ERR__NO_OFFSET)
        return;
    log_debug("kafka offset commit failed: %s", rd_kafka_err2str(err));
    kafka_commit_mark_failed(kc);
    if (kafka_err_rebalancing(err) && kc->hold_until_ms == 0)
        kc->hold_until_ms = kafka_now_ms() + KAFKA_COMMIT_HOLD_MS;
}

rd_kafka_resp_err_t
kafka_consumer_commit(kafka_consumer_t *kc,
                      const rd_kafka_topic_partition_list_t *offsets,
                      bool sync)
{
    rd_kafka_resp_err_t err;

    /* Synchronous commits (a revocation, a stop) are never held: they
     * are the last chance to commit those positions, and their outcome
     * is reported to the caller. */
    if (!sync && kc->hold_until_ms != 0 &&
        kafka_now_ms() < kc->hold_until_ms) {
        /* Sent again (pipeline_recommit()) once the hold is over. */
        kafka_commit_mark_failed(kc);
        return RD_KAFKA_RESP_ERR_NO_ERROR;
    }
    if (!sync)
        kc->hold_until_ms = 0;
    err = rd_kafka_commit(kc->rk, offsets, sync ? 0 : 1);
    if (sync)
        kafka_consumer_commit_result(kc, err);
    return err;
}

bool kafka_consumer_commit_failed(kafka_consumer_t *kc)
{
    int64_t now;

    if (!kc->commit_failed)
        return false;
    now = kafka_now_ms();
    if ((kc->hold_until_ms != 0 && now < kc->hold_until_ms) ||
        now - kc->failed_ms < KAFKA_RECOMMIT_MS)
        return false;
    kc->commit_failed = false;
    return true;
}

kafka_consumer_t *kafka_consumer_new(const config_t *cfg,
                                     const char *brokers, const char *group,
                                     const char *const *defaults,
                                     char *errstr, size_t errstr_size)
{
    kafka_consumer_t *kc = calloc(1, sizeof(*kc));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char msg[512], num[32];
    long long max_msg, fetch;

    if (!kc)
        abort();
    if (config_kafka_set(conf, "bootstrap.servers", brokers, errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "group.id", group, errstr, errstr_size) ==
            -1 ||
        config_kafka_set(conf, "partition.assignment.strategy",
                         "cooperative-sticky", errstr, errstr_size) == -1 ||
        config_kafka_set(conf, "enable.auto.commit", "false", errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "enable.auto.offset.store", "false", errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "isolation.level", "read_committed", errstr,
                         errstr_size) == -1)
        goto fail;
    for (size_t i = 0; defaults && defaults[i]; i += 2)
        if (config_kafka_default(cfg, conf, defaults[i], defaults[i + 1],
                                 errstr, errstr_size) == -1)
            goto fail;
    if (config_apply_x(cfg, conf, errstr, errstr_size) == -1)
        goto fail;
    /* librdkafka requires fetch.max.bytes >= message.max.bytes once
     * fetch.max.bytes is set, as tally's defaults do: a larger
     * message.max.bytes of the user's raises tally's fetch size with it
     * (a -X fetch.max.bytes of the user's stays as given). */
    max_msg = conf_get_int(conf, "message.max.bytes");
    fetch = conf_get_int(conf, "fetch.max.bytes");
    if (!x_has(cfg, "fetch.max.bytes") && max_msg > fetch && fetch > 0) {
        snprintf(num, sizeof(num), "%lld", max_msg);
        if (config_kafka_set(conf, "fetch.max.bytes", num, errstr,
                             errstr_size) == -1)
            goto fail;
    }
    kafka_conf_logging(conf, group);
    rd_kafka_conf_set_rebalance_cb(conf, kafka_rebalance_cb);
    rd_kafka_conf_set_offset_commit_cb(conf, kafka_offset_commit_cb);
    rd_kafka_conf_set_opaque(conf, kc);
    kc->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, msg, sizeof(msg));
    if (!kc->rk) {
        snprintf(errstr, errstr_size, "-X: kafka consumer: %s", msg);
        goto fail;
    }
    conf = NULL; /* owned by rk now */
    rd_kafka_poll_set_consumer(kc->rk);
    return kc;
fail:
    if (conf)
        rd_kafka_conf_destroy(conf);
    free(kc);
    return NULL;
}

rd_kafka_t *kafka_consumer_rk(const kafka_consumer_t *kc)
{
    return kc->rk;
}

int kafka_consumer_subscribe(kafka_consumer_t *kc, const char *topic,
                             kafka_rebalance_fn fn, void *arg,
                             char *errstr, size_t errstr_size)
{
    rd_kafka_topic_partition_list_t *topics =
        rd_kafka_topic_partition_list_new(1);
    rd_kafka_resp_err_t err;

    kc->fn = fn;
    kc->arg = arg;
    rd_kafka_topic_partition_list_add(topics, topic, RD_KAFKA_PARTITION_UA);
    err = rd_kafka_subscribe(kc->rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (err) {
        snprintf(errstr, errstr_size, "subscribe to %s: %s", topic,
                 rd_kafka_err2str(err));
        return -1;
    }
    kc->subscribed = true;
    return 0;
}

/* Handles closed but not destroyed (librdkafka #4312), reachable from
 * here so that leak checkers do not report them. */
static pthread_mutex_t parked_mu = PTHREAD_MUTEX_INITIALIZER;
static kafka_consumer_t *parked[16];
static size_t n_parked;

void kafka_consumer_close(kafka_consumer_t *kc)
{
    rd_kafka_resp_err_t err;

    if (!kc)
        return;
    err = rd_kafka_consumer_close(kc->rk);
    if (err)
        log_warn("kafka consumer close: %s", rd_kafka_err2str(err));
    kc->fn = NULL; /* nothing may call back into the pipeline now */
    if (kc->subscribed && !kc->synced) {
        log_info("kafka %s: left the group before its first assignment; "
                 "not destroying the client (librdkafka 2.0.2 would abort "
                 "there, its issue #4312)",
                 rd_kafka_name(kc->rk));
        pthread_mutex_lock(&parked_mu);
        if (n_parked < sizeof(parked) / sizeof(*parked))
            parked[n_parked++] = kc; /* else a leak checker may see it */
        pthread_mutex_unlock(&parked_mu);
        return;
    }
    rd_kafka_destroy(kc->rk);
    free(kc);
}

void kafka_consumer_free(kafka_consumer_t *kc)
{
    if (!kc)
        return;
    if (kc->subscribed) {
        kafka_consumer_close(kc);
        return;
    }
    rd_kafka_destroy(kc->rk);
    free(kc);
}

/* ---------------------------------------------------------------- */
/* Reading messages again                                             */

static int64_t kafka_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int kafka_fetch_each(const config_t *cfg, const char *brokers,
                     const char *topic, const kafka_position_t *want,
                     size_t n, int timeout_ms,
                     int (*fn)(void *arg, size_t i,
                               const rd_kafka_message_t *rkm),
                     void *arg, char *errstr, size_t errstr_size)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk = NULL;
    rd_kafka_topic_t *rkt = NULL;
    int64_t deadline = kafka_now_ms() + timeout_ms;
    char msg[512];
    int rc = -1;
    size_t i = 0;

    if (config_kafka_set(conf, "bootstrap.servers", brokers, errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "client.id", "tally-refetch", errstr,
                         errstr_size) == -1 ||
        config_apply_x(cfg, conf, errstr, errstr_size) == -1) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    kafka_conf_logging(conf, "refetch");
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, msg, sizeof(msg));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(errstr, errstr_size, "refetch consumer: %s", msg);
        return -1;
    }
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    while (i < n) {
        int32_t part = want[i].partition;
        if (rd_kafka_consume_start(rkt, part, want[i].offset) == -1) {
            snprintf(errstr, errstr_size, "refetch %s [%d]: %s", topic,
                     (int)part, rd_kafka_err2str(rd_kafka_last_error()));
            goto out;
        }
        while (i < n && want[i].partition == part) {
            int64_t left = deadline - kafka_now_ms();
            rd_kafka_message_t *rkm;
            if (left <= 0) {
                snprintf(errstr, errstr_size,
                         "refetch %s [%d] offset %lld: not read within %d "
                         "ms",
                         topic, (int)part, (long long)want[i].offset,
                         timeout_ms);
                rd_kafka_consume_stop(rkt, part);
                goto out;
            }
            rkm = rd_kafka_consume(rkt, part, left > 500 ? 500 : (int)left);
            if (!rkm)
                continue;
            if (rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR &&
                rkm->offset == want[i].offset) {
                int r = fn(arg, i, rkm);
                rd_kafka_message_destroy(rkm);
                i++;
                if (r == -1) {
                    snprintf(errstr, errstr_size, "refetch %s: stopped",
                             topic);
                    rd_kafka_consume_stop(rkt, part);
                    goto out;
                }
                continue;
            }
            if (rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR &&
                rkm->offset > want[i].offset) {
                snprintf(errstr, errstr_size,
                         "refetch %s [%d]: offset %lld is gone", topic,
                         (int)part, (long long)want[i].offset);
                rd_kafka_message_destroy(rkm);
                rd_kafka_consume_stop(rkt, part);
                goto out;
            }
            if (rkm->err && rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF) {
                snprintf(errstr, errstr_size, "refetch %s [%d]: %s", topic,
                         (int)part, rd_kafka_err2str(rkm->err));
                rd_kafka_message_destroy(rkm);
                rd_kafka_consume_stop(rkt, part);
                goto out;
            }
            rd_kafka_message_destroy(rkm); /* before the one we want */
        }
        rd_kafka_consume_stop(rkt, part);
    }
    rc = 0;
out:
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    return rc;
}

rd_kafka_error_t *kafka_seek_partitions(rd_kafka_t *rk,
                                        rd_kafka_topic_partition_list_t *l,
                                        int timeout_ms)
{
    if (rd_kafka_version() < 0x02010000 && timeout_ms > 0)
        timeout_ms = timeout_ms > INT_MAX / 1000 ? INT_MAX : timeout_ms * 1000;
    return rd_kafka_seek_partitions(rk, l, timeout_ms);
}
