/* tally produce: JSON lines from stdin or a file to a Kafka topic. */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include "commands.h"
#include "config.h"
#include "log.h"
#include "invalidation_event.h"
#include "usage_event.h"

#define PRODUCE_PROGRESS_SEC 2.0
#define PRODUCE_POLL_EVERY 256     /* lines between two rd_kafka_poll(0) */
#define PRODUCE_MAX_FAIL_LOGS 10   /* delivery failures logged one by one */

static const opt_def_t produce_opts[] = {
    {"brokers", "TALLY_BROKERS", OPT_STR, "localhost:9092", 1, 0, NULL,
     "HOST:PORT,...", "Kafka bootstrap servers"},
    {"topic", NULL, OPT_STR, "token-usage", 1, 0, NULL, "TOPIC",
     "topic to produce to"},
    {"file", NULL, OPT_STR, NULL, 0, 0, NULL, "PATH",
     "read lines from PATH instead of stdin ('-': stdin)"},
    {"validate", NULL, OPT_BOOL, "false", 0, 0, NULL, NULL,
     "check lines against the contract for the --kind of event the topic "
     "carries; report invalid ones, skip them"},
    {"kind", NULL, OPT_CHOICE, "auto", 0, 0, "auto|usage|invalidation",
     "KIND",
     "--validate: the lines' kind of event; auto: invalidation when "
     "--topic is --invalidation-topic, usage otherwise"},
    {"invalidation-topic", "TALLY_INVALIDATION_TOPIC", OPT_STR,
     "cache-invalidation", 0, 0, NULL, "TOPIC",
     "--kind auto: the topic that carries cache invalidations"},
    {"dedupe-days", "TALLY_DEDUPE_DAYS", OPT_INT, "35", 1, 3650, NULL, "N",
     "--validate: oldest accepted occurred_at, in days before now"},
    {"max-message-bytes", "TALLY_MAX_MESSAGE_BYTES", OPT_INT, "1048576", 1,
     1000000000, NULL, "N", "--validate: largest accepted line, in bytes"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
    {"log-format", "TALLY_LOG_FORMAT", OPT_CHOICE, "text", 0, 0, "text|json",
     "FORMAT", "log lines as text, or one JSON object per line"},
};

#define PRODUCE_SUMMARY                                                      \
    "Sends one Kafka message per line (empty lines are skipped), keyed by\n" \
    "the line's tenant_id when it is a JSON object with a string\n"          \
    "tenant_id (unkeyed otherwise), with an idempotent lz4 producer.\n"      \
    "Waits for every delivery report; exits 1 if a delivery failed.\n"       \
    "Without --validate, lines are sent as they are, however large, up to\n" \
    "librdkafka's message.max.bytes (raise it with -X).\n"                   \
    "SIGINT/SIGTERM: stop reading, deliver what was read, exit; a second\n"  \
    "signal abandons undelivered messages."

/* First signal: stop reading. Second: stop waiting for deliveries. */
static volatile sig_atomic_t produce_stop;
static volatile sig_atomic_t produce_abort;

static void produce_on_signal(int sig)
{
    (void)sig;
    if (produce_stop)
        produce_abort = 1;
    produce_stop = 1;
}

/* Counters of one run; delivery counters are updated by the delivery
 * report callback, which runs on this thread inside rd_kafka_poll(). */
typedef struct {
    uint64_t lines;     /* lines read, empty ones included */
    uint64_t sent;      /* messages handed to librdkafka */
    uint64_t invalid;   /* --validate rejects */
    uint64_t unkeyed;   /* sent without a key */
    uint64_t delivered; /* acknowledged by the broker */
    uint64_t failed;    /* not deliverable, or refused by librdkafka */
    double start;       /* monotonic seconds */
    double last_progress;
} produce_stats_t;

static double produce_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t produce_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Delivery report: the opaque is the line number. */
static void produce_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm,
                          void *opaque)
{
    produce_stats_t *stats = opaque;
    (void)rk;

    if (!rkm->err) {
        stats->delivered++;
        return;
    }
    if (stats->failed++ < PRODUCE_MAX_FAIL_LOGS)
        log_error("line %" PRIuPTR ": delivery failed: %s",
                  (uintptr_t)rkm->_private, rd_kafka_err2str(rkm->err));
    else if (stats->failed == PRODUCE_MAX_FAIL_LOGS + 1)
        log_error("further delivery failures are only counted");
}

/* librdkafka's client-level errors; fatal ones (the idempotent producer
 * lost its guarantees) end the run. */
static void produce_error_cb(rd_kafka_t *rk, int err, const char *reason,
                             void *opaque)
{
    char fatal[512];
    (void)opaque;

    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        log_error("fatal producer error: %s", fatal);
        produce_stop = 1;
        produce_abort = 1;
        return;
    }
    /* Connection failures are already in librdkafka's own log. */
    log_msg(err == RD_KAFKA_RESP_ERR__TRANSPORT ? LOG_LVL_DEBUG
                                                : LOG_LVL_WARN,
            "kafka: %s: %s", rd_kafka_err2name((rd_kafka_resp_err_t)err),
            reason);
}

/* Routes librdkafka's own log lines (syslog levels) into ours. */
static void produce_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                           const char *buf)
{
    (void)rk;
    log_msg(level <= 3   ? LOG_LVL_ERROR
            : level == 4 ? LOG_LVL_WARN
            : level <= 6 ? LOG_LVL_INFO
                         : LOG_LVL_DEBUG,
            "rdkafka %s: %s", fac, buf);
}

static void produce_progress(produce_stats_t *stats, bool final)
{
    double now = produce_clock();
    double elapsed = now - stats->start;
    double rate = elapsed > 0 ? (double)stats->sent / elapsed : 0;

    stats->last_progress = now;
    if (!final) {
        log_info("produced %" PRIu64 " lines (%.0f/s), %" PRIu64 " invalid",
                 stats->sent, rate, stats->invalid);
        return;
    }
    log_info("done: %" PRIu64 " lines read, %" PRIu64 " sent, %" PRIu64
             " delivered, %" PRIu64 " invalid, %" PRIu64
             " delivery failures, %" PRIu64 " without key; %.2f s (%.0f "
             "lines/s)",
             stats->lines, stats->sent, stats->delivered, stats->invalid,
             stats->failed, stats->unkeyed, elapsed, rate);
}

/* Builds the producer: our defaults first (each overridable by -X), then
 * every -X pair. Returns NULL with errstr on a configuration error. */
static rd_kafka_t *produce_client_new(const config_t *cfg,
                                      produce_stats_t *stats, char *errstr,
                                      size_t errstr_size)
{
    static const char *const defaults[][2] = {
        {"enable.idempotence", "true"},
        {"compression.type", "lz4"},
        {"linger.ms", "50"},
        {"batch.num.messages", "10000"},
        {"batch.size", "1000000"},
        {"queue.buffering.max.messages", "500000"},
        {"queue.buffering.max.kbytes", "1048576"},
    };
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk = NULL;
    char max_bytes[32];
    long long mmb = config_int(cfg, "max-message-bytes");

    /* Room for a line of --max-message-bytes plus the record overhead. */
    snprintf(max_bytes, sizeof(max_bytes), "%lld",
             mmb + 1024 > 1000000 ? (mmb + 1024 > 1000000000 ? 1000000000
                                                             : mmb + 1024)
                                  : 1000000);
    if (config_kafka_default(cfg, conf, "bootstrap.servers",
                             config_str(cfg, "brokers"), errstr,
                             errstr_size) == -1 ||
        config_kafka_default(cfg, conf, "message.max.bytes", max_bytes,
                             errstr, errstr_size) == -1)
        goto out;
    for (size_t i = 0; i < sizeof(defaults) / sizeof(*defaults); i++)
        if (config_kafka_default(cfg, conf, defaults[i][0], defaults[i][1],
                                 errstr, errstr_size) == -1)
            goto out;
    if (config_apply_x(cfg, conf, errstr, errstr_size) == -1)
        goto out;
    rd_kafka_conf_set_dr_msg_cb(conf, produce_dr_cb);
    rd_kafka_conf_set_error_cb(conf, produce_error_cb);
    rd_kafka_conf_set_log_cb(conf, produce_log_cb);
    rd_kafka_conf_set_opaque(conf, stats);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, errstr_size);
    if (rk)
        conf = NULL; /* owned by rk */
out:
    if (conf)
        rd_kafka_conf_destroy(conf);
    return rk;
}

/* ------------------------------------------------------------------ */
/* Key extraction without --validate                                   */
/* ------------------------------------------------------------------ */

/* A strict JSON syntax scanner that finds the top-level "tenant_id"
 * without building a document: jansson's allocations cost more than
 * everything else per line. It only answers when it is sure and the
 * answer is simple (an ASCII line, an unescaped string tenant_id, no
 * duplicate, no number jansson could overflow on); anything else goes to
 * jansson, which stays the reference. */
typedef struct {
    const char *p, *end;
    const char *key; /* the tenant_id value, when found */
    size_t key_len;
} produce_scan_t;

#define PRODUCE_SCAN_MAX_DEPTH 64
#define PRODUCE_SCAN_MAX_NUMBER 15 /* longer numbers: ask jansson */

static void scan_ws(produce_scan_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' ||
                             *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static bool scan_is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
           (c >= 'A' && c <= 'F');
}

/* A string at s->p; *escaped tells whether it had any escape. */
static bool scan_string(produce_scan_t *s, const char **str, size_t *len,
                        bool *escaped)
{
    const char *start;

    *escaped = false;
    if (s->p >= s->end || *s->p != '"')
        return false;
    start = ++s->p;
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            *str = start;
            *len = (size_t)(s->p - start);
            s->p++;
            return true;
        }
        if (c < 0x20 || c >= 0x80)
            return false;
        if (c == '\\') {
            *escaped = true;
            if (++s->p >= s->end)
                return false;
            if (*s->p == 'u') {
                if (s->end - s->p < 5 || !scan_is_hex(s->p[1]) ||
                    !scan_is_hex(s->p[2]) || !scan_is_hex(s->p[3]) ||
                    !scan_is_hex(s->p[4]) ||
                    !strncmp(s->p + 1, "0000", 4))
                    return false;
                s->p += 4;
            } else if (!*s->p || !strchr("\"\\/bfnrt", *s->p)) {
                return false;
            }
        }
        s->p++;
    }
    return false;
}

static bool scan_number(produce_scan_t *s)
{
    const char *start = s->p;

    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p < s->end && *s->p == '0') {
        s->p++;
    } else if (s->p < s->end && *s->p >= '1' && *s->p <= '9') {
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
    } else {
        return false;
    }
    if (s->p < s->end && *s->p == '.') {
        const char *digits = ++s->p;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
        if (s->p == digits)
            return false;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        const char *digits;
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        digits = s->p;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
            s->p++;
        if (s->p == digits)
            return false;
    }
    return s->p - start <= PRODUCE_SCAN_MAX_NUMBER;
}

static bool scan_literal(produce_scan_t *s, const char *word)
{
    size_t len = strlen(word);
    if ((size_t)(s->end - s->p) < len || memcmp(s->p, word, len) != 0)
        return false;
    s->p += len;
    return true;
}

static bool scan_value(produce_scan_t *s, int depth);

/* An object at s->p; at depth 0 it records the tenant_id. */
static bool scan_object(produce_scan_t *s, int depth)
{
    s->p++; /* '{' */
    scan_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return true;
    }
    for (;;) {
        const char *name, *val;
        size_t name_len, val_len;
        bool escaped;

        if (!scan_string(s, &name, &name_len, &escaped))
            return false;
        if (depth == 0 && escaped)
            return false; /* might spell tenant_id */
        scan_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return false;
        s->p++;
        scan_ws(s);
        if (depth == 0 && name_len == 9 && !memcmp(name, "tenant_id", 9)) {
            if (s->key || !scan_string(s, &val, &val_len, &escaped) ||
                escaped)
                return false;
            s->key = val;
            s->key_len = val_len;
        } else if (!scan_value(s, depth + 1)) {
            return false;
        }
        scan_ws(s);
        if (s->p >= s->end)
            return false;
        if (*s->p == '}') {
            s->p++;
            return true;
        }
        if (*s->p != ',')
            return false;
        s->p++;
        scan_ws(s);
    }
}

static bool scan_array(produce_scan_t *s, int depth)
{
    s->p++; /* '[' */
    scan_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return true;
    }
    for (;;) {
        if (!scan_value(s, depth + 1))
            return false;
        scan_ws(s);
        if (s->p >= s->end)
            return false;
        if (*s->p == ']') {
            s->p++;
            return true;
        }
        if (*s->p != ',')
            return false;
        s->p++;
        scan_ws(s);
    }
}

static bool scan_value(produce_scan_t *s, int depth)
{
    const char *str;
    size_t len;
    bool escaped;

    if (depth > PRODUCE_SCAN_MAX_DEPTH || s->p >= s->end)
        return false;
    switch (*s->p) {
    case '{':
        return scan_object(s, depth);
    case '[':
        return scan_array(s, depth);
    case '"':
        return scan_string(s, &str, &len, &escaped);
    case 't':
        return scan_literal(s, "true");
    case 'f':
        return scan_literal(s, "false");
    case 'n':
        return scan_literal(s, "null");
    default:
        return scan_number(s);
    }
}

/* Finds the Kafka key of a line sent without --validate: the string
 * tenant_id of a JSON object. *key points into `line`, or, when jansson
 * had to decide, into *root (the caller decrefs it; NULL otherwise).
 * Returns false (no key) when the line is not such an object. */
static bool produce_extract_key(const char *line, size_t len, json_t **root,
                                const char **key, size_t *key_len)
{
    produce_scan_t scan = {line, line + len, NULL, 0};
    json_error_t jerr;
    json_t *tenant;

    *root = NULL;
    scan_ws(&scan);
    if (scan.p < scan.end && *scan.p == '{' && scan_object(&scan, 0) &&
        scan.key) {
        scan_ws(&scan);
        if (scan.p == scan.end) {
            *key = scan.key;
            *key_len = scan.key_len;
            return true;
        }
    }

    *root = json_loadb(line, len, 0, &jerr);
    if (!*root)
        return false;
    tenant = json_is_object(*root) ? json_object_get(*root, "tenant_id")
                                   : NULL;
    if (!json_is_string(tenant))
        return false;
    *key = json_string_value(tenant);
    *key_len = json_string_length(tenant);
    return true;
}

/* Hands one message to librdkafka (which copies it), polling while its
 * queue is full. Returns 0, or -1 if the message was refused for good
 * (counted and logged) or a signal arrived while waiting. */
static int produce_send(rd_kafka_t *rk, rd_kafka_topic_t *rkt,
                        produce_stats_t *stats, const char *line, size_t len,
                        const char *key, size_t key_len, uint64_t line_no)
{
    rd_kafka_resp_err_t err;

    for (;;) {
        err = rd_kafka_producev(
            rk, RD_KAFKA_V_RKT(rkt), RD_KAFKA_V_VALUE((void *)line, len),
            RD_KAFKA_V_KEY(key, key ? key_len : 0),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_OPAQUE((void *)(uintptr_t)line_no), RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        if (produce_abort)
            return -1;
        rd_kafka_poll(rk, 100);
    }
    if (err) {
        stats->failed++;
        if (err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE)
            log_error("line %" PRIu64 ": not sent: %zu bytes is over "
                      "message.max.bytes (raise it with -X)",
                      line_no, len);
        else
            log_error("line %" PRIu64 ": not sent: %s", line_no,
                      rd_kafka_err2str(err));
        return -1;
    }
    stats->sent++;
    return 0;
}

/* Waits for every outstanding delivery report, with progress lines. After
 * a second signal, purges what is left (reported as failures). */
static void produce_flush(rd_kafka_t *rk, produce_stats_t *stats)
{
    while (rd_kafka_outq_len(rk) > 0) {
        if (produce_abort) {
            log_warn("abandoning %d undelivered messages",
                     rd_kafka_outq_len(rk));
            rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE |
                                   RD_KAFKA_PURGE_F_INFLIGHT);
            rd_kafka_flush(rk, 2000);
            return;
        }
        rd_kafka_flush(rk, 100);
        if (produce_clock() - stats->last_progress >= PRODUCE_PROGRESS_SEC)
            produce_progress(stats, false);
    }
}

int produce_main(int argc, char **argv)
{
    config_t cfg;
    char errstr[512];
    produce_stats_t stats;
    rd_kafka_t *rk = NULL;
    rd_kafka_topic_t *rkt = NULL;
    FILE *fp = NULL;
    bool fp_owned = false;
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t n;
    bool validate;
    usage_enum_t token_types, operations;
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    invalidation_t inv;
    bool invalidations = false; /* --validate as cache invalidations */
    struct sigaction sa;
    const char *path;
    int ret = 1;

    memset(&stats, 0, sizeof(stats));
    ret = config_parse_command(&cfg, "produce", PRODUCE_SUMMARY, produce_opts,
                               sizeof(produce_opts) / sizeof(*produce_opts), argc,
                               argv);
    if (ret >= 0)
        goto out;
    ret = 1;
    validate = config_bool(&cfg, "validate");

    path = config_str(&cfg, "file");
    if (!path || !strcmp(path, "-")) {
        fp = stdin;
    } else {
        fp = fopen(path, "r");
        if (!fp) {
            fprintf(stderr, "tally produce: --file %s: %s\n", path,
                    strerror(errno));
            ret = 2;
            goto out;
        }
        fp_owned = true;
    }

    memset(&ctx, 0, sizeof(ctx));
    if (!strcmp(config_str(&cfg, "kind"), "invalidation") ||
        (!strcmp(config_str(&cfg, "kind"), "auto") &&
         !strcmp(config_str(&cfg, "topic"),
                 config_str(&cfg, "invalidation-topic"))))
        invalidations = true;
    if (validate) {
        usage_enums_default(&token_types, &operations);
        ctx.token_types = &token_types;
        ctx.operations = &operations;
        ctx.dedupe_days = (int)config_int(&cfg, "dedupe-days");
        ctx.max_message_bytes = (size_t)config_int(&cfg, "max-message-bytes");
        ctx.topic = config_str(&cfg, "topic");
        ctx.partition = -1;
        ctx.offset = -1;
        ctx.kafka_timestamp_ms = -1;
    }

    rk = produce_client_new(&cfg, &stats, errstr, sizeof(errstr));
    if (!rk) {
        fprintf(stderr, "tally produce: %s\n", errstr);
        ret = 2;
        goto out;
    }
    rkt = rd_kafka_topic_new(rk, config_str(&cfg, "topic"), NULL);
    if (!rkt) {
        fprintf(stderr, "tally produce: --topic %s: %s\n",
                config_str(&cfg, "topic"),
                rd_kafka_err2str(rd_kafka_last_error()));
        ret = 2;
        goto out;
    }

    /* No SA_RESTART: a signal interrupts a blocking read of stdin. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = produce_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    stats.start = stats.last_progress = produce_clock();
    while (!produce_stop && (n = getline(&line, &line_cap, fp)) != -1) {
        size_t len = (size_t)n;
        const char *key = NULL;
        size_t key_len = 0;
        json_t *root = NULL;

        stats.lines++;
        if (len > 0 && line[len - 1] == '\n')
            len--;
        if (len > 0 && line[len - 1] == '\r')
            len--;
        if (len == 0)
            continue;

        if (validate) {
            const char *bad = NULL; /* reason code of a rejected line */
            if (invalidations) {
                invalidation_reason_t r = invalidation_parse(
                    line, len, ctx.max_message_bytes, &inv, errstr,
                    sizeof(errstr));
                if (r != INVALIDATION_OK)
                    bad = invalidation_reason_code(r);
                key = inv.tenant_id;
            } else {
                usage_reason_t r;
                ctx.now_us = produce_now_us();
                r = usage_event_parse(line, len, &ctx, &ev, errstr,
                                      sizeof(errstr));
                if (r != USAGE_OK)
                    bad = usage_reason_code(r);
                key = ev.tenant_id;
            }
            if (bad) {
                fprintf(stderr, "line %" PRIu64 ": %s: %s\n", stats.lines,
                        bad, errstr);
                stats.invalid++;
                continue;
            }
            key_len = strlen(key);
        } else if (!produce_extract_key(line, len, &root, &key, &key_len)) {
            key = NULL;
        }
        if (!key)
            stats.unkeyed++;
        /* A refused line is counted and logged there; carry on. */
        (void)produce_send(rk, rkt, &stats, line, len, key, key_len,
                           stats.lines);
        json_decref(root);

        if (stats.lines % PRODUCE_POLL_EVERY == 0) {
            rd_kafka_poll(rk, 0);
            if (produce_clock() - stats.last_progress >= PRODUCE_PROGRESS_SEC)
                produce_progress(&stats, false);
        }
    }
    if (produce_stop) {
        log_warn("signal received: stopped reading after line %" PRIu64,
                 stats.lines);
    } else if (ferror(fp)) {
        log_error("reading %s: %s", fp_owned ? path : "stdin",
                  strerror(errno));
        stats.failed++;
    }

    produce_flush(rk, &stats);
    produce_progress(&stats, true);
    ret = stats.failed > 0 || stats.invalid > 0 ? 1 : 0;

out:
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    if (rk)
        rd_kafka_destroy(rk);
    if (fp_owned)
        fclose(fp);
    free(line);
    config_free(&cfg);
    return ret;
}
