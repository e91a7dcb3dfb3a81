/* tally offsets: a group's positions in Postgres and Kafka, shown and reset. */
#include "commands.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "config.h"
#include "kafka.h"
#include "log.h"
#include "pgconn.h"
#include "rfc3339.h"

/* ---------------------------------------------------------------- */
/* Options                                                            */

/* The connection settings are the worker's, under the same names. */
#define OFFSETS_COMMON_OPTS                                                \
    {"brokers", "TALLY_BROKERS", OPT_STR, "localhost:9092", 1, 0, NULL,    \
     "HOST:PORT,...", "Kafka bootstrap servers"},                          \
    {"group", "TALLY_GROUP", OPT_STR, "tally", 1, 0, NULL, "NAME",          \
     "consumer group of the token-usage pipeline"},                        \
    {"invalidation-group", "TALLY_INVALIDATION_GROUP", OPT_STR, "", 0, 0,   \
     NULL, "NAME",                                                         \
     "consumer group of the cache-invalidation pipeline (empty: "          \
     "<group>.invalidation)"},                                             \
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",              \
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},   \
    {"usage-topic", "TALLY_USAGE_TOPIC", OPT_STR, "token-usage", 0, 0,     \
     NULL, "TOPIC", "token-usage topic (positions in Postgres)"},          \
    {"invalidation-topic", "TALLY_INVALIDATION_TOPIC", OPT_STR,            \
     "cache-invalidation", 0, 0, NULL, "TOPIC",                            \
     "cache-invalidation topic (positions only in Kafka)"},                \
    {"timeout", "TALLY_OFFSETS_TIMEOUT", OPT_INT, "15", 1, 3600, NULL,      \
     "SECONDS", "how long to wait for each Kafka request"},                \
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "warn", 0, 0,              \
     "debug|info|warn|error", "LEVEL", "log verbosity"}

static const opt_def_t show_opts[] = {
    OFFSETS_COMMON_OPTS,
    {"topic", NULL, OPT_STR, "", 0, 0, NULL, "TOPIC",
     "only this topic, --usage-topic or --invalidation-topic (empty: both)"},
    {"json", NULL, OPT_BOOL, "false", 0, 0, NULL, NULL,
     "one JSON object per partition and line instead of the table"},
};

static const opt_def_t reset_opts[] = {
    OFFSETS_COMMON_OPTS,
    {"topic", NULL, OPT_STR, "", 0, 0, NULL, "TOPIC",
     "--usage-topic (the default: Postgres and Kafka move) or "
     "--invalidation-topic (Kafka only)"},
    {"to", NULL, OPT_STR, NULL, 1, 0, NULL, "WHERE",
     "earliest, latest, an RFC 3339 time (the first message at or after "
     "it), or PARTITION=OFFSET[,...] (partitions not named stay)"},
    {"dry-run", NULL, OPT_BOOL, "false", 0, 0, NULL, NULL,
     "print what would change and change nothing"},
};

#define N_OPTS(a) (sizeof(a) / sizeof(*(a)))

#define SHOW_SUMMARY                                                        \
    "Per partition: the position stored in Postgres (token-usage), the "    \
    "offset committed\nto the Kafka group, the log start and end, and the " \
    "lag (log end minus the\nposition the pipeline resumes from: Postgres " \
    "for token-usage, the Kafka commit\nfor cache-invalidation; with "      \
    "none, the log start). --json: JSON lines."

#define RESET_SUMMARY                                                       \
    "Moves a stopped group's positions: for token-usage in Postgres (one "  \
    "transaction,\nepochs bumped so that a zombie member is fenced) and in " \
    "the Kafka group together;\nfor cache-invalidation in the Kafka group " \
    "only. Refuses (exit 1) while the group\nhas active members."

/* ---------------------------------------------------------------- */
/* What is known about a topic's partitions                           */

typedef struct {
    int32_t partition;
    bool pg_row;       /* a row in tally.consumer_offsets */
    int64_t pg_next;   /* its next_offset; -1: NULL (claimed, none yet) */
    int64_t pg_epoch;
    char pg_owner[160];
    int64_t committed; /* in the Kafka group; -1: none */
    int64_t low, high; /* log start and end (high watermark) */
    int64_t target;    /* reset: the new position; -1: unchanged */
} offsets_part_t;

typedef struct {
    const char *topic;
    const char *group; /* the Kafka group of its pipeline */
    bool in_postgres;  /* token-usage: Postgres holds the real position */
    offsets_part_t *parts;
    int n;
} offsets_topic_t;

static int part_cmp(const void *a, const void *b)
{
    const offsets_part_t *x = a, *y = b;
    return (x->partition > y->partition) - (x->partition < y->partition);
}

static offsets_part_t *offsets_find(offsets_topic_t *ot, int32_t partition)
{
    for (int i = 0; i < ot->n; i++)
        if (ot->parts[i].partition == partition)
            return &ot->parts[i];
    return NULL;
}

/* Where the pipeline resumes: the stored position, else the log start
 * (--start-from earliest, the default). */
static int64_t offsets_resume_at(const offsets_topic_t *ot,
                                 const offsets_part_t *p)
{
    int64_t at = ot->in_postgres ? (p->pg_row ? p->pg_next : -1)
                                 : p->committed;
    return at < 0 ? p->low : at;
}

/* Picks the topics --topic names (both when empty and `both_default`, else
 * the usage topic) and their groups. Returns 0, or 2 after a usage error
 * on stderr. `inv_group` is storage for the invalidation group name. */
static int offsets_select(const config_t *cfg, const char *cmd,
                          bool both_default, offsets_topic_t ots[2],
                          int *n, char *inv_group, size_t size)
{
    const char *want = config_str(cfg, "topic");
    const char *usage = config_str(cfg, "usage-topic");
    const char *inval = config_str(cfg, "invalidation-topic");
    const char *ig = config_str(cfg, "invalidation-group");

    if (ig[0])
        snprintf(inv_group, size, "%s", ig);
    else
        snprintf(inv_group, size, "%s.invalidation",
                 config_str(cfg, "group"));
    *n = 0;
    memset(ots, 0, 2 * sizeof(*ots));
    if (want[0] && strcmp(want, usage) != 0 && strcmp(want, inval) != 0) {
        fprintf(stderr,
                "tally %s: --topic %s: neither the usage topic (%s) nor the "
                "invalidation topic (%s)\n",
                cmd, want, usage[0] ? usage : "none",
                inval[0] ? inval : "none");
        return 2;
    }
    if (usage[0] && (want[0] ? !strcmp(want, usage) : true)) {
        ots[*n].topic = usage;
        ots[*n].group = config_str(cfg, "group");
        ots[*n].in_postgres = true;
        (*n)++;
    }
    if (inval[0] && (want[0] ? !strcmp(want, inval) : both_default)) {
        ots[*n].topic = inval;
        ots[*n].group = inv_group;
        (*n)++;
    }
    if (*n == 0) {
        fprintf(stderr, "tally %s: no topic: --usage-topic and "
                        "--invalidation-topic are empty\n", cmd);
        return 2;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* Kafka                                                              */

/* A consumer in `group`, never subscribed by `offsets show`. */
static kafka_consumer_t *offsets_consumer(const config_t *cfg,
                                          const char *group, char *errstr,
                                          size_t errstr_size)
{
    static const char *const defaults[] = {
        "client.id", "tally-offsets",
        /* Short: a reset that could not finish leaves the group soon. */
        "session.timeout.ms", "6000", "heartbeat.interval.ms", "500",
        NULL};
    return kafka_consumer_new(cfg, config_str(cfg, "brokers"), group,
                              defaults, errstr, errstr_size);
}

/* Fills ot->parts from the topic's metadata, watermarks and the group's
 * committed offsets. 0, or -1 with errstr. */
static int offsets_read_kafka(rd_kafka_t *rk, offsets_topic_t *ot,
                              int timeout_ms, char *errstr,
                              size_t errstr_size)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, ot->topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_partition_list_t *list = NULL;
    rd_kafka_resp_err_t err;
    int rc = -1;

    err = rd_kafka_metadata(rk, 0, rkt, &md, timeout_ms);
    if (err || md->topic_cnt != 1 || md->topics[0].err) {
        snprintf(errstr, errstr_size, "kafka: topic %s: %s", ot->topic,
                 rd_kafka_err2str(err ? err
                                  : md->topic_cnt ? md->topics[0].err
                                                  : RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC));
        goto out;
    }
    ot->n = md->topics[0].partition_cnt;
    ot->parts = calloc((size_t)ot->n + 1, sizeof(*ot->parts));
    if (!ot->parts)
        abort();
    for (int i = 0; i < ot->n; i++) {
        ot->parts[i].partition = md->topics[0].partitions[i].id;
        ot->parts[i].pg_next = -1;
        ot->parts[i].committed = -1;
        ot->parts[i].target = -1;
    }
    qsort(ot->parts, (size_t)ot->n, sizeof(*ot->parts), part_cmp);
    list = rd_kafka_topic_partition_list_new(ot->n);
    for (int i = 0; i < ot->n; i++) {
        offsets_part_t *p = &ot->parts[i];
        err = rd_kafka_query_watermark_offsets(rk, ot->topic, p->partition,
                                               &p->low, &p->high,
                                               timeout_ms);
        if (err) {
            snprintf(errstr, errstr_size, "kafka: watermarks of %s [%d]: %s",
                     ot->topic, (int)p->partition, rd_kafka_err2str(err));
            goto out;
        }
        rd_kafka_topic_partition_list_add(list, ot->topic, p->partition);
    }
    err = rd_kafka_committed(rk, list, timeout_ms);
    if (err) {
        snprintf(errstr, errstr_size, "kafka: committed offsets of group %s: %s",
                 ot->group, rd_kafka_err2str(err));
        goto out;
    }
    for (int i = 0; i < list->cnt; i++) {
        offsets_part_t *p = offsets_find(ot, list->elems[i].partition);
        if (p && !list->elems[i].err && list->elems[i].offset >= 0)
            p->committed = list->elems[i].offset;
    }
    rc = 0;
out:
    if (list)
        rd_kafka_topic_partition_list_destroy(list);
    if (md)
        rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    return rc;
}

/* ---------------------------------------------------------------- */
/* Postgres                                                           */

/* Fills the Postgres columns of ot->parts. 0, or -1 with errstr. */
static int offsets_read_pg(PGconn *conn, offsets_topic_t *ot, char *errstr,
                           size_t errstr_size)
{
    const char *params[] = {ot->group, ot->topic};
    PGresult *res = pgconn_query(
        conn, "postgres offsets",
        "SELECT partition, next_offset, epoch, coalesce(owner, '')"
        " FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2",
        2, params, PGRES_TUPLES_OK, errstr, errstr_size);

    if (!res)
        return -1;
    for (int r = 0; r < PQntuples(res); r++) {
        offsets_part_t *p = offsets_find(ot, atoi(PQgetvalue(res, r, 0)));
        if (!p)
            continue; /* a partition the topic no longer has */
        p->pg_row = true;
        p->pg_next = PQgetisnull(res, r, 1)
                         ? -1
                         : strtoll(PQgetvalue(res, r, 1), NULL, 10);
        p->pg_epoch = strtoll(PQgetvalue(res, r, 2), NULL, 10);
        snprintf(p->pg_owner, sizeof(p->pg_owner), "%s",
                 PQgetvalue(res, r, 3));
    }
    PQclear(res);
    return 0;
}

/* Reads everything about the selected topics: each topic through a
 * consumer of its own group (never subscribed), the usage topic's
 * positions from Postgres. 0, or -1 with errstr. */
static int offsets_read(const config_t *cfg, offsets_topic_t *ots, int n,
                        PGconn *conn, char *errstr, size_t errstr_size)
{
    int timeout_ms = (int)config_int(cfg, "timeout") * 1000;

    for (int i = 0; i < n; i++) {
        kafka_consumer_t *kc =
            offsets_consumer(cfg, ots[i].group, errstr, errstr_size);
        int rc;
        if (!kc)
            return -1;
        rc = offsets_read_kafka(kafka_consumer_rk(kc), &ots[i], timeout_ms,
                                errstr, errstr_size);
        kafka_consumer_free(kc);
        if (rc == -1 ||
            (ots[i].in_postgres &&
             offsets_read_pg(conn, &ots[i], errstr, errstr_size) == -1))
            return -1;
    }
    return 0;
}

static void offsets_free(offsets_topic_t *ots, int n)
{
    for (int i = 0; i < n; i++) {
        free(ots[i].parts);
        ots[i].parts = NULL;
    }
}

/* "-" for none, else the number. */
static const char *num_or_dash(int64_t v, char buf[24])
{
    if (v < 0)
        return "-";
    snprintf(buf, 24, "%" PRId64, v);
    return buf;
}

/* ---------------------------------------------------------------- */
/* tally offsets show                                                 */

static void show_text(const offsets_topic_t *ots, int n)
{
    printf("%-24s %-24s %9s %12s %12s %12s %12s %10s\n", "TOPIC", "GROUP",
           "PARTITION", "POSTGRES", "KAFKA", "LOG-START", "LOG-END", "LAG");
    for (int t = 0; t < n; t++) {
        const offsets_topic_t *ot = &ots[t];
        int64_t total = 0;
        for (int i = 0; i < ot->n; i++) {
            const offsets_part_t *p = &ot->parts[i];
            char b1[24], b2[24];
            int64_t lag = p->high - offsets_resume_at(ot, p);
            total += lag;
            printf("%-24s %-24s %9d %12s %12s %12" PRId64 " %12" PRId64
                   " %10" PRId64 "\n",
                   ot->topic, ot->group, (int)p->partition,
                   !ot->in_postgres ? "n/a"
                   : p->pg_row      ? num_or_dash(p->pg_next, b1)
                                    : "-",
                   num_or_dash(p->committed, b2), p->low, p->high, lag);
        }
        printf("%-24s %-24s %9s %12s %12s %12s %12s %10" PRId64 "\n",
               ot->topic, ot->group, "total", "", "", "", "", total);
    }
}

static json_t *json_num_or_null(int64_t v)
{
    return v < 0 ? json_null() : json_integer((json_int_t)v);
}

static void show_json(const offsets_topic_t *ots, int n)
{
    for (int t = 0; t < n; t++) {
        const offsets_topic_t *ot = &ots[t];
        for (int i = 0; i < ot->n; i++) {
            const offsets_part_t *p = &ot->parts[i];
            bool row = ot->in_postgres && p->pg_row;
            json_t *o = json_object();
            char *text;
            json_object_set_new(o, "topic", json_string(ot->topic));
            json_object_set_new(o, "group", json_string(ot->group));
            json_object_set_new(o, "partition", json_integer(p->partition));
            json_object_set_new(o, "positions_in",
                                json_string(ot->in_postgres ? "postgres"
                                                            : "kafka"));
            json_object_set_new(o, "postgres",
                                json_num_or_null(row ? p->pg_next : -1));
            json_object_set_new(o, "epoch",
                                json_num_or_null(row ? p->pg_epoch : -1));
            json_object_set_new(o, "owner", row && p->pg_owner[0]
                                                ? json_string(p->pg_owner)
                                                : json_null());
            json_object_set_new(o, "kafka", json_num_or_null(p->committed));
            json_object_set_new(o, "log_start", json_integer(p->low));
            json_object_set_new(o, "log_end", json_integer(p->high));
            json_object_set_new(
                o, "lag", json_integer(p->high - offsets_resume_at(ot, p)));
            text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
            puts(text);
            free(text);
            json_decref(o);
        }
    }
}

static int offsets_show(int argc, char **argv)
{
    config_t cfg;
    offsets_topic_t ots[2];
    char err[1024], inv_group[300];
    PGconn *conn = NULL;
    int n = 0;
    int rc = config_parse_command(&cfg, "offsets show", SHOW_SUMMARY,
                                  show_opts, N_OPTS(show_opts), argc, argv);

    memset(ots, 0, sizeof(ots));
    if (rc >= 0)
        goto out;
    rc = 2;
    if (kafka_check_x(&cfg, err, sizeof(err)) == -1) {
        fprintf(stderr, "tally offsets show: %s\n", err);
        goto out;
    }
    rc = offsets_select(&cfg, "offsets show", true, ots, &n, inv_group,
                        sizeof(inv_group));
    if (rc != 0)
        goto out;
    rc = 1;
    if (ots[0].in_postgres) {
        conn = pgconn_open(config_str(&cfg, "pg-dsn"), "tally-offsets", err,
                           sizeof(err));
        if (!conn) {
            fprintf(stderr, "tally offsets show: %s\n", err);
            goto out;
        }
    }
    if (offsets_read(&cfg, ots, n, conn, err, sizeof(err)) == -1) {
        fprintf(stderr, "tally offsets show: %s\n", err);
        goto out;
    }
    if (config_bool(&cfg, "json"))
        show_json(ots, n);
    else
        show_text(ots, n);
    rc = 0;
out:
    offsets_free(ots, n);
    PQfinish(conn);
    config_free(&cfg);
    return rc;
}

/* ---------------------------------------------------------------- */
/* tally offsets reset: where to                                       */

typedef enum { TO_EARLIEST, TO_LATEST, TO_TIME, TO_LIST } to_kind_t;

typedef struct {
    to_kind_t kind;
    int64_t time_ms;
    int n;
    int32_t partitions[1024];
    int64_t offsets[1024];
} to_spec_t;

/* Parses --to. Returns 0, or -1 with errstr naming the flag. */
static int to_parse(const char *s, to_spec_t *to, char *errstr,
                    size_t errstr_size)
{
    int64_t us;

    memset(to, 0, sizeof(*to));
    if (!strcmp(s, "earliest")) {
        to->kind = TO_EARLIEST;
        return 0;
    }
    if (!strcmp(s, "latest")) {
        to->kind = TO_LATEST;
        return 0;
    }
    if (rfc3339_parse(s, strlen(s), &us) == 0) {
        to->kind = TO_TIME;
        to->time_ms = us / 1000;
        if (to->time_ms < 0) {
            snprintf(errstr, errstr_size, "--to %s: before 1970", s);
            return -1;
        }
        return 0;
    }
    to->kind = TO_LIST;
    for (const char *p = s; *p;) {
        char *end;
        long long part, off;
        part = strtoll(p, &end, 10);
        if (end == p || *end != '=' || part < 0 || part > INT32_MAX)
            goto bad;
        p = end + 1;
        off = strtoll(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0') || off < 0)
            goto bad;
        for (int i = 0; i < to->n; i++) {
            if (to->partitions[i] == part) {
                snprintf(errstr, errstr_size,
                         "--to: partition %lld named twice", part);
                return -1;
            }
        }
        if (to->n == (int)(sizeof(to->partitions) / sizeof(int32_t))) {
            snprintf(errstr, errstr_size, "--to: too many partitions");
            return -1;
        }
        to->partitions[to->n] = (int32_t)part;
        to->offsets[to->n++] = off;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p)
            goto bad;
    }
    if (to->n > 0)
        return 0;
bad:
    snprintf(errstr, errstr_size,
             "--to %s: expected earliest, latest, an RFC 3339 time "
             "(2024-05-01T00:00:00Z) or PARTITION=OFFSET[,...]",
             s);
    return -1;
}

/* The first offset of [p->low, p->high) whose message timestamp is at or
 * after `ts_ms` (p->high if none), read message by message. The fallback
 * for brokers that do not look offsets up by time: the librdkafka 2.0.2
 * mock cluster answers every ListOffsets by timestamp with -1 ("FIXME: by
 * timestamp" in rdkafka_mock_handlers.c). 0, or -1 with errstr. */
static int scan_for_time(rd_kafka_t *rk, const char *topic,
                         offsets_part_t *p, int64_t ts_ms, int timeout_ms,
                         char *errstr, size_t errstr_size)
{
    rd_kafka_topic_partition_list_t *list =
        rd_kafka_topic_partition_list_new(1);
    int64_t next = p->low;
    int idle_ms = 0;
    int rc = -1;

    rd_kafka_topic_partition_list_add(list, topic, p->partition)->offset =
        p->low;
    if (rd_kafka_assign(rk, list)) {
        snprintf(errstr, errstr_size, "kafka: cannot read %s [%d]", topic,
                 (int)p->partition);
        goto out;
    }
    p->target = p->high;
    while (next < p->high) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 100);
        if (!rkm) {
            idle_ms += 100;
            if (idle_ms > timeout_ms) {
                snprintf(errstr, errstr_size,
                         "kafka: reading %s [%d] for --to: no message "
                         "within %d s",
                         topic, (int)p->partition, timeout_ms / 1000);
                goto out;
            }
            continue;
        }
        idle_ms = 0;
        if (!rkm->err && rkm->partition == p->partition) {
            next = rkm->offset + 1;
            if (rd_kafka_message_timestamp(rkm, NULL) >= ts_ms) {
                p->target = rkm->offset;
                rd_kafka_message_destroy(rkm);
                break;
            }
        }
        rd_kafka_message_destroy(rkm);
    }
    rc = 0;
out:
    rd_kafka_assign(rk, NULL);
    rd_kafka_topic_partition_list_destroy(list);
    return rc;
}

/* True when a partition's answer -1 ("no message at or after the time")
 * is contradicted by its last message: the broker did not look it up. */
static bool time_unanswered(rd_kafka_t *rk, const char *topic,
                            const offsets_part_t *p, int64_t ts_ms,
                            int timeout_ms)
{
    rd_kafka_topic_partition_list_t *list =
        rd_kafka_topic_partition_list_new(1);
    bool unanswered = false;

    if (p->high <= p->low)
        goto out;
    rd_kafka_topic_partition_list_add(list, topic, p->partition)->offset =
        p->high - 1;
    if (rd_kafka_assign(rk, list))
        goto out;
    for (int waited = 0; waited < timeout_ms; waited += 100) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 100);
        if (!rkm)
            continue;
        if (!rkm->err && rkm->partition == p->partition) {
            unanswered = rd_kafka_message_timestamp(rkm, NULL) >= ts_ms;
            rd_kafka_message_destroy(rkm);
            break;
        }
        rd_kafka_message_destroy(rkm);
    }
    rd_kafka_assign(rk, NULL);
out:
    rd_kafka_topic_partition_list_destroy(list);
    return unanswered;
}

/* Sets every partition's target from --to. Explicit offsets must lie in
 * [log start, log end] of an existing partition (-1 with errstr
 * otherwise: a usage error). A time with no message at or after it means
 * the log end. Kafka failures are -1 too, with *usage false. */
static int to_resolve(rd_kafka_t *rk, offsets_topic_t *ot,
                      const to_spec_t *to, int timeout_ms, bool *usage,
                      char *errstr, size_t errstr_size)
{
    rd_kafka_topic_partition_list_t *list;
    rd_kafka_resp_err_t err;

    *usage = false;
    switch (to->kind) {
    case TO_EARLIEST:
    case TO_LATEST:
        for (int i = 0; i < ot->n; i++)
            ot->parts[i].target = to->kind == TO_EARLIEST ? ot->parts[i].low
                                                          : ot->parts[i].high;
        return 0;
    case TO_LIST:
        for (int i = 0; i < to->n; i++) {
            offsets_part_t *p = offsets_find(ot, to->partitions[i]);
            *usage = true;
            if (!p) {
                snprintf(errstr, errstr_size,
                         "--to: %s has no partition %d (it has %d)",
                         ot->topic, (int)to->partitions[i], ot->n);
                return -1;
            }
            if (to->offsets[i] < p->low || to->offsets[i] > p->high) {
                snprintf(errstr, errstr_size,
                         "--to: offset %" PRId64 " of %s [%d] is outside "
                         "the log (%" PRId64 "..%" PRId64 ")",
                         to->offsets[i], ot->topic, (int)p->partition,
                         p->low, p->high);
                return -1;
            }
            p->target = to->offsets[i];
        }
        *usage = false;
        return 0;
    case TO_TIME:
        break;
    }
    list = rd_kafka_topic_partition_list_new(ot->n);
    for (int i = 0; i < ot->n; i++)
        rd_kafka_topic_partition_list_add(list, ot->topic,
                                          ot->parts[i].partition)
            ->offset = to->time_ms;
    err = rd_kafka_offsets_for_times(rk, list, timeout_ms);
    for (int i = 0; !err && i < list->cnt; i++) {
        offsets_part_t *p = offsets_find(ot, list->elems[i].partition);
        if (list->elems[i].err) {
            err = list->elems[i].err;
            break;
        }
        if (!p)
            continue;
        if (list->elems[i].offset >= 0)
            p->target = list->elems[i].offset;
        else if (!time_unanswered(rk, ot->topic, p, to->time_ms, timeout_ms))
            p->target = p->high;
        else if (scan_for_time(rk, ot->topic, p, to->time_ms, timeout_ms,
                               errstr, errstr_size) == -1) {
            rd_kafka_topic_partition_list_destroy(list);
            return -1;
        }
    }
    rd_kafka_topic_partition_list_destroy(list);
    if (err) {
        snprintf(errstr, errstr_size, "kafka: offsets for the time in %s: %s",
                 ot->topic, rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* tally offsets reset: is the group stopped?                          */

/* Asks the brokers for the group's members (rd_kafka_list_groups(): the
 * coordinator's DescribeGroups). Returns the number of members (each one's
 * client id and host on stderr), or -1 when the brokers cannot tell (the
 * librdkafka mock cluster implements neither ListGroups nor
 * DescribeGroups), with errstr. Not rd_kafka_DescribeConsumerGroups():
 * in librdkafka 2.0.2, once a broker refuses it, the client that asked
 * can never be destroyed (rd_kafka_destroy() waits forever; seen on the
 * mock cluster). Through a client without group.id of its own. */
static int group_members(const config_t *cfg, const char *group,
                         int timeout_ms, char *errstr, size_t errstr_size)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const struct rd_kafka_group_list *groups = NULL;
    rd_kafka_resp_err_t err;
    rd_kafka_t *rk;
    char msg[512];
    int members = -1;

    if (config_kafka_set(conf, "bootstrap.servers",
                         config_str(cfg, "brokers"), errstr,
                         errstr_size) == -1 ||
        config_kafka_set(conf, "client.id", "tally-offsets", errstr,
                         errstr_size) == -1 ||
        config_apply_x(cfg, conf, errstr, errstr_size) == -1) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    kafka_conf_logging(conf, "admin");
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, msg, sizeof(msg));
    if (!rk) {
        snprintf(errstr, errstr_size, "kafka admin client: %s", msg);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    conf = NULL; /* owned by rk now */
    err = rd_kafka_list_groups(rk, group, &groups, timeout_ms);
    if (err) {
        snprintf(errstr, errstr_size, "list groups: %s",
                 rd_kafka_err2str(err));
        goto out;
    }
    members = 0;
    for (int g = 0; g < groups->group_cnt; g++) {
        const struct rd_kafka_group_info *gi = &groups->groups[g];
        if (strcmp(gi->group, group) != 0)
            continue;
        if (gi->err) {
            snprintf(errstr, errstr_size, "group %s: %s", group,
                     rd_kafka_err2str(gi->err));
            members = -1;
            goto out;
        }
        for (int m = 0; m < gi->member_cnt; m++)
            fprintf(stderr, "  member %s (client %s on %s)\n",
                    gi->members[m].member_id, gi->members[m].client_id,
                    gi->members[m].client_host);
        members += gi->member_cnt;
    }
out:
    if (groups)
        rd_kafka_group_list_destroy(groups);
    rd_kafka_destroy(rk);
    return members;
}

/* The reset's own membership: how many partitions of the topic it holds. */
typedef struct {
    int held;
    bool assigned; /* an assignment came */
} join_state_t;

static void join_rebalance(void *arg, rd_kafka_t *rk,
                           rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t *parts,
                           bool lost)
{
    join_state_t *js = arg;
    rd_kafka_error_t *error;

    (void)lost;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        error = rd_kafka_incremental_assign(rk, parts);
        /* Nothing is read: the positions are only committed. */
        rd_kafka_pause_partitions(rk, parts);
        js->held += parts->cnt;
        js->assigned = true;
    } else {
        error = rd_kafka_incremental_unassign(rk, parts);
        js->held -= parts->cnt;
    }
    if (error) {
        log_error("offsets reset: rebalance: %s",
                  rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
    }
}

/* Joins the group on the topic and waits until it is the only member,
 * holding every partition. A commit then carries a real member id and
 * generation, which both Kafka and the mock cluster accept; a commit from
 * outside the group (generation -1) is refused by the mock once the group
 * exists (UNKNOWN_MEMBER_ID), even with no member left. An assignment
 * short of every partition means another member holds the rest. Returns
 * 0, or -1 with errstr. */
static int group_join_alone(kafka_consumer_t *kc, const offsets_topic_t *ot,
                            join_state_t *js, int timeout_ms, char *errstr,
                            size_t errstr_size)
{
    rd_kafka_t *rk = kafka_consumer_rk(kc);
    struct timespec t0, t;

    if (kafka_consumer_subscribe(kc, ot->topic, join_rebalance, js, errstr,
                                 errstr_size) == -1)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 100);
        if (rkm)
            rd_kafka_message_destroy(rkm);
        if (js->held == ot->n)
            return 0;
        if (js->assigned) {
            snprintf(errstr, errstr_size,
                     "group %s has active members: joining it gave this "
                     "reset %d of %d partitions of %s; stop every worker "
                     "of the group first",
                     ot->group, js->held, ot->n, ot->topic);
            return -1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000 +
                (t.tv_nsec - t0.tv_nsec) / 1000000 > timeout_ms) {
            snprintf(errstr, errstr_size,
                     "group %s: no assignment within %d s (a member is "
                     "active, or a stopped member's session has not "
                     "expired yet); stop every worker of the group and "
                     "try again",
                     ot->group, timeout_ms / 1000);
            return -1;
        }
    }
}

/* ---------------------------------------------------------------- */
/* tally offsets reset: moving                                         */

/* Postgres first, inside a transaction left open: every position of the
 * topic that moves, with its epoch bumped (a zombie member's next batch
 * commit finds its epoch gone and rolls back), rows locked in partition
 * order as claims lock them. Then the Kafka commit. COMMIT only if Kafka
 * took the offsets: a refused commit leaves both as they were. (A COMMIT
 * lost after Kafka moved leaves Kafka ahead; running the reset again
 * settles it.) 0, or -1 with errstr. */
static int reset_apply(PGconn *conn, rd_kafka_t *rk, offsets_topic_t *ot,
                       char *errstr, size_t errstr_size)
{
    rd_kafka_topic_partition_list_t *list =
        rd_kafka_topic_partition_list_new(ot->n);
    char *parts = malloc((size_t)ot->n * 12 + 3);
    char *offs = malloc((size_t)ot->n * 21 + 3);
    size_t pl = 0, ol = 0;
    rd_kafka_resp_err_t err;
    bool open = false;
    int rc = -1;

    if (!parts || !offs)
        abort();
    parts[pl++] = '{';
    offs[ol++] = '{';
    for (int i = 0; i < ot->n; i++) {
        offsets_part_t *p = &ot->parts[i];
        if (p->target < 0)
            continue;
        rd_kafka_topic_partition_list_add(list, ot->topic, p->partition)
            ->offset = p->target;
        pl += (size_t)sprintf(parts + pl, "%s%d", pl > 1 ? "," : "",
                              (int)p->partition);
        ol += (size_t)sprintf(offs + ol, "%s%" PRId64, ol > 1 ? "," : "",
                              p->target);
    }
    strcpy(parts + pl, "}");
    strcpy(offs + ol, "}");
    if (ot->in_postgres) {
        const char *params[] = {ot->group, ot->topic, parts, offs};
        if (pgconn_exec(conn, "postgres", "BEGIN", 0, NULL, errstr,
                        errstr_size) == -1)
            goto out;
        open = true;
        if (pgconn_exec(
                conn, "postgres offsets",
                "INSERT INTO tally.consumer_offsets AS o"
                " (group_id, topic, partition, next_offset, epoch, owner)"
                " SELECT $1, $2, v.partition, v.next_offset, 1,"
                " 'tally offsets reset'"
                " FROM unnest($3::int[], $4::bigint[])"
                " AS v(partition, next_offset) ORDER BY v.partition"
                " ON CONFLICT (group_id, topic, partition) DO UPDATE"
                " SET next_offset = EXCLUDED.next_offset,"
                " epoch = o.epoch + 1, owner = EXCLUDED.owner,"
                " claimed_at = now(), updated_at = now()",
                4, params, errstr, errstr_size) == -1)
            goto out;
    }
    err = rd_kafka_commit(rk, list, 0);
    for (int i = 0; !err && i < list->cnt; i++)
        err = list->elems[i].err;
    if (err) {
        snprintf(errstr, errstr_size,
                 "kafka: commit to group %s: %s%s", ot->group,
                 rd_kafka_err2str(err),
                 ot->in_postgres ? " (Postgres rolled back: nothing moved)"
                                 : "");
        goto out;
    }
    if (open) {
        open = false;
        if (pgconn_exec(conn, "postgres", "COMMIT", 0, NULL, errstr,
                        errstr_size) == -1)
            goto out;
    }
    rc = 0;
out:
    if (open) {
        char e2[256];
        (void)pgconn_exec(conn, "postgres", "ROLLBACK", 0, NULL, e2,
                          sizeof(e2));
    }
    rd_kafka_topic_partition_list_destroy(list);
    free(parts);
    free(offs);
    return rc;
}

/* The plan: one line per partition, with where it is and where it goes. */
static int reset_print_plan(const offsets_topic_t *ot)
{
    int moving = 0;

    printf("group %s, topic %s: %s\n", ot->group, ot->topic,
           ot->in_postgres ? "positions in Postgres and the Kafka group"
                           : "positions in the Kafka group only");
    printf("%9s %12s %12s %12s %12s %12s\n", "PARTITION", "POSTGRES",
           "KAFKA", "LOG-START", "LOG-END", "NEW");
    for (int i = 0; i < ot->n; i++) {
        const offsets_part_t *p = &ot->parts[i];
        char b1[24], b2[24], b3[24];
        if (p->target >= 0)
            moving++;
        printf("%9d %12s %12s %12" PRId64 " %12" PRId64 " %12s\n",
               (int)p->partition,
               ot->in_postgres ? num_or_dash(p->pg_row ? p->pg_next : -1, b1)
                               : "n/a",
               num_or_dash(p->committed, b2), p->low, p->high,
               p->target >= 0 ? num_or_dash(p->target, b3) : "(stays)");
    }
    return moving;
}

static int offsets_reset(int argc, char **argv)
{
    config_t cfg;
    offsets_topic_t ots[2];
    to_spec_t *to = calloc(1, sizeof(*to));
    kafka_consumer_t *kc = NULL;
    join_state_t js = {0, false};
    char err[1024], inv_group[300];
    PGconn *conn = NULL;
    offsets_topic_t *ot = &ots[0];
    int n = 0, timeout_ms, members;
    bool usage;
    int rc = config_parse_command(&cfg, "offsets reset", RESET_SUMMARY,
                                  reset_opts, N_OPTS(reset_opts), argc,
                                  argv);

    memset(ots, 0, sizeof(ots));
    if (!to)
        abort();
    if (rc >= 0)
        goto out;
    rc = 2;
    if (!config_str(&cfg, "to")) {
        fprintf(stderr, "tally offsets reset: --to is required (earliest, "
                        "latest, a time or PARTITION=OFFSET,...)\n");
        goto out;
    }
    if (to_parse(config_str(&cfg, "to"), to, err, sizeof(err)) == -1 ||
        kafka_check_x(&cfg, err, sizeof(err)) == -1) {
        fprintf(stderr, "tally offsets reset: %s\n", err);
        goto out;
    }
    rc = offsets_select(&cfg, "offsets reset", false, ots, &n, inv_group,
                        sizeof(inv_group));
    if (rc != 0)
        goto out;
    rc = 1;
    timeout_ms = (int)config_int(&cfg, "timeout") * 1000;
    if (ot->in_postgres) {
        conn = pgconn_open(config_str(&cfg, "pg-dsn"), "tally-offsets", err,
                           sizeof(err));
        if (!conn)
            goto fail;
    }
    kc = offsets_consumer(&cfg, ot->group, err, sizeof(err));
    if (!kc)
        goto fail;
    if (offsets_read_kafka(kafka_consumer_rk(kc), ot, timeout_ms, err,
                           sizeof(err)) == -1 ||
        (ot->in_postgres && offsets_read_pg(conn, ot, err, sizeof(err)) == -1))
        goto fail;
    if (to_resolve(kafka_consumer_rk(kc), ot, to, timeout_ms, &usage, err,
                   sizeof(err)) == -1) {
        rc = usage ? 2 : 1;
        goto fail;
    }
    reset_print_plan(ot);
    members = group_members(&cfg, ot->group, timeout_ms, err, sizeof(err));
    if (members > 0) {
        fprintf(stderr,
                "tally offsets reset: group %s has %d active members; stop "
                "every worker of the group first\n",
                ot->group, members);
        goto out;
    }
    if (members < 0)
        log_info("the brokers cannot describe group %s (%s); the reset "
                 "joins the group to check that it is alone",
                 ot->group, err);
    if (config_bool(&cfg, "dry-run")) {
        printf("dry run: nothing changed%s\n",
               members < 0 ? " (whether the group is stopped was not checked: "
                             "the brokers do not describe groups)"
                           : "");
        rc = 0;
        goto out;
    }
    if (group_join_alone(kc, ot, &js, timeout_ms, err, sizeof(err)) == -1 ||
        reset_apply(conn, kafka_consumer_rk(kc), ot, err, sizeof(err)) == -1)
        goto fail;
    printf("reset %s for group %s: %s moved\n", ot->topic, ot->group,
           ot->in_postgres ? "Postgres (epochs bumped) and Kafka" : "Kafka");
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "tally offsets reset: %s\n", err);
out:
    kafka_consumer_close(kc);
    offsets_free(ots, n);
    PQfinish(conn);
    free(to);
    config_free(&cfg);
    return rc;
}

/* ---------------------------------------------------------------- */
/* tally offsets                                                      */

static void offsets_usage(FILE *fp)
{
    fprintf(fp,
            "usage: tally offsets show [options]\n"
            "       tally offsets reset --to WHERE [options]\n\n"
            "A group's positions: the token-usage pipeline's in Postgres "
            "(what it resumes\nfrom) and in its Kafka group (for lag "
            "tools); the cache-invalidation\npipeline's (group "
            "<group>.invalidation) in Kafka only.\n\n"
            "  show    positions, log ends and lag per partition\n"
            "  reset   move a stopped group's positions (--dry-run: only "
            "print)\n\n"
            "See 'tally offsets show --help' and 'tally offsets reset "
            "--help'.\n");
}

int offsets_main(int argc, char **argv)
{
    if (argc < 1) {
        offsets_usage(stderr);
        return 2;
    }
    if (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h")) {
        offsets_usage(stdout);
        return 0;
    }
    if (!strcmp(argv[0], "show"))
        return offsets_show(argc - 1, argv + 1);
    if (!strcmp(argv[0], "reset"))
        return offsets_reset(argc - 1, argv + 1);
    fprintf(stderr, "tally offsets: unknown subcommand '%s' (show or reset)\n",
            argv[0]);
    return 2;
}
