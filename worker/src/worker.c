/* tally worker and tally migrate: configuration and start-up. */
#include <signal.h>
#include <stdio.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "config.h"
#include "consumer.h"
#include "dead_letter.h"
#include "log.h"
#include "metrics.h"
#include "store.h"

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* The contract's connection settings come first, in its order. */
static const opt_def_t worker_opts[] = {
    {"brokers", "TALLY_BROKERS", OPT_STR, "localhost:9092", 1, 0, NULL,
     "HOST:PORT,...", "Kafka bootstrap servers"},
    {"group", "TALLY_GROUP", OPT_STR, "tally", 1, 0, NULL, "NAME",
     "consumer group id"},
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},
    {"redis-url", "TALLY_REDIS_URL", OPT_STR, "redis://localhost:6379/0", 0,
     0, NULL, "URL", "Redis for cache invalidation"},
    {"metrics-addr", "TALLY_METRICS_ADDR", OPT_STR, "127.0.0.1:9464", 0, 0,
     NULL, "HOST:PORT", "Prometheus /metrics listener (empty: off)"},
    {"usage-topic", "TALLY_USAGE_TOPIC", OPT_STR, "token-usage", 0, 0, NULL,
     "TOPIC", "token-usage topic (empty: not consumed)"},
    {"invalidation-topic", "TALLY_INVALIDATION_TOPIC", OPT_STR,
     "cache-invalidation", 0, 0, NULL, "TOPIC",
     "cache-invalidation topic (empty: not consumed)"},
    {"usage-dlq-topic", "TALLY_USAGE_DLQ_TOPIC", OPT_STR, "", 0, 0, NULL,
     "TOPIC", "dead letters of token-usage (empty: <usage-topic>.dlq)"},
    {"start-from", "TALLY_START_FROM", OPT_CHOICE, "earliest", 0, 0,
     "earliest|latest", "WHERE",
     "where a partition with no stored position starts"},
    {"batch-size", "TALLY_BATCH_SIZE", OPT_INT, "10000", 1, 1000000, NULL,
     "N", "close a batch after this many messages"},
    {"batch-bytes", "TALLY_BATCH_BYTES", OPT_INT, "8388608", 1024,
     1073741824, NULL, "BYTES", "close a batch after this many bytes"},
    {"batch-ms", "TALLY_BATCH_MS", OPT_INT, "500", 1, 600000, NULL, "MS",
     "close a batch this long after its first message"},
    {"dedupe-days", "TALLY_DEDUPE_DAYS", OPT_INT, "35", 1, 3650, NULL,
     "DAYS", "dedupe window; older events are rejected"},
    {"max-message-bytes", "TALLY_MAX_MESSAGE_BYTES", OPT_INT, "1048576", 64,
     104857600, NULL, "BYTES", "larger messages are rejected"},
    {"prune-interval", "TALLY_PRUNE_INTERVAL", OPT_INT, "3600", 0, 604800,
     NULL, "SECONDS",
     "delete counted events past the window this often (0: never)"},
    {"no-migrate", "TALLY_NO_MIGRATE", OPT_BOOL, "false", 0, 0, NULL, NULL,
     "do not apply pending migrations at start"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
};

static const opt_def_t migrate_opts[] = {
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
};

#define N_OPTS(a) (sizeof(a) / sizeof(*(a)))

/* Parses the command line; returns -1 to continue or the exit code. */
static int parse_or_exit(config_t *cfg, const char *cmd, const char *summary,
                         const opt_def_t *defs, size_t n, int argc,
                         char **argv)
{
    char err[512];
    log_level_t level;

    switch (config_parse(cfg, cmd, summary, defs, n, argc, argv, 0, err,
                         sizeof(err))) {
    case CONFIG_OK:
        break;
    case CONFIG_EXIT_0:
        return 0;
    case CONFIG_USAGE:
        fprintf(stderr, "tally %s: %s\n", cmd, err);
        return 2;
    }
    if (log_level_parse(config_str(cfg, "log-level"), &level) == 0)
        log_set_level(level);
    return -1;
}

/* Connects and migrates. Postgres being down is not a reason to exit (an
 * orchestrator would restart us in a loop): it waits with the same backoff
 * as the worker, 1 s doubling to 60 s, until a signal. A migration that
 * fails is fatal. Returns 0, or the exit code. */
static int start_store(store_t *st, bool migrate)
{
    char err[512];
    int applied = 0, backoff = 1;

    while (store_connect(st, err, sizeof(err)) == -1) {
        log_warn("%s; retrying in %d s", err, backoff);
        for (int i = 0; i < backoff * 10 && !stop_requested; i++)
            usleep(100000);
        if (stop_requested)
            return 0;
        backoff = backoff * 2 > 60 ? 60 : backoff * 2;
    }
    if (migrate) {
        if (store_migrate(st, &applied, err, sizeof(err)) == -1) {
            log_error("%s", err);
            return 1;
        }
        log_info("schema up to date (%d migrations applied now)", applied);
    }
    return 0;
}

int migrate_main(int argc, char **argv)
{
    config_t cfg;
    store_t *st;
    int rc = parse_or_exit(&cfg, "migrate",
                           "Apply the sql/ migrations (embedded in the "
                           "binary) that are not applied yet.",
                           migrate_opts, N_OPTS(migrate_opts), argc, argv);
    if (rc >= 0) {
        config_free(&cfg);
        return rc;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    st = store_new(config_str(&cfg, "pg-dsn"), "-", "migrate");
    rc = start_store(st, true);
    if (rc == 0 && stop_requested)
        rc = 1; /* interrupted before it could migrate */
    store_free(st);
    config_free(&cfg);
    return rc;
}

int worker_main(int argc, char **argv)
{
    config_t cfg;
    consumer_conf_t cc;
    store_t *st = NULL;
    dead_letter_t *dlq = NULL;
    char err[512], owner[256], host[128], dlq_topic[300];
    struct sigaction sa;
    int stored_days = -1;
    int rc = parse_or_exit(
        &cfg, "worker",
        "Consume token-usage events, count each (tenant, idempotency key) "
        "exactly once and\nkeep daily and monthly sums in Postgres.",
        worker_opts, N_OPTS(worker_opts), argc, argv);
    const char *usage_topic, *inval_topic;

    if (rc >= 0)
        goto out;
    rc = 1;
#ifdef __GLIBC__
    /* A few threads (librdkafka's, the committer, metrics) each get a
     * malloc arena by default; two keep the peak RSS down. */
    mallopt(M_ARENA_MAX, 2);
#endif

    /* Order matters: signals, metrics, Postgres (schema, enums), the
     * dead-letter producer, then the consumer that needs them all. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    usage_topic = config_str(&cfg, "usage-topic");
    inval_topic = config_str(&cfg, "invalidation-topic");
    if (inval_topic && *inval_topic)
        log_warn("cache invalidation is not implemented yet: %s is not "
                 "consumed",
                 inval_topic);
    if (!usage_topic || !*usage_topic) {
        log_error("nothing to consume: --usage-topic is empty");
        rc = 2;
        goto out;
    }
    if (metrics_start(config_str(&cfg, "metrics-addr"), err, sizeof(err)) ==
        -1) {
        log_error("%s", err);
        goto out;
    }

    gethostname(host, sizeof(host));
    host[sizeof(host) - 1] = '\0';
    snprintf(owner, sizeof(owner), "%s/%d", host, (int)getpid());
    st = store_new(config_str(&cfg, "pg-dsn"), config_str(&cfg, "group"),
                   owner);
    if ((rc = start_store(st, !config_bool(&cfg, "no-migrate"))) != 0 ||
        stop_requested)
        goto out;
    rc = 1;
    if (store_read_dedupe_days(st, &stored_days, err, sizeof(err)) == 0 &&
        stored_days > 0 && stored_days != config_int(&cfg, "dedupe-days"))
        log_warn("--dedupe-days is %lld but tally.settings says %d for "
                 "track_token_usage(); keep them equal",
                 config_int(&cfg, "dedupe-days"), stored_days);

    if (config_str(&cfg, "usage-dlq-topic")[0])
        snprintf(dlq_topic, sizeof(dlq_topic), "%s",
                 config_str(&cfg, "usage-dlq-topic"));
    else
        snprintf(dlq_topic, sizeof(dlq_topic), "%s.dlq", usage_topic);
    dlq = dead_letter_new(&cfg, config_str(&cfg, "brokers"), err,
                          sizeof(err));
    if (!dlq) {
        log_error("%s", err);
        rc = 2;
        goto out;
    }

    memset(&cc, 0, sizeof(cc));
    cc.cfg = &cfg;
    cc.brokers = config_str(&cfg, "brokers");
    cc.group = config_str(&cfg, "group");
    cc.topic = usage_topic;
    cc.dlq_topic = dlq_topic;
    cc.start_from = config_str(&cfg, "start-from");
    cc.batch_size = (size_t)config_int(&cfg, "batch-size");
    cc.batch_bytes = (size_t)config_int(&cfg, "batch-bytes");
    cc.batch_ms = (int)config_int(&cfg, "batch-ms");
    cc.dedupe_days = (int)config_int(&cfg, "dedupe-days");
    cc.max_message_bytes = (size_t)config_int(&cfg, "max-message-bytes");
    cc.prune_interval_s = (long)config_int(&cfg, "prune-interval");
    cc.store = st;
    cc.dlq = dlq;
    cc.stop = &stop_requested;
    if (consumer_run(&cc, err, sizeof(err)) == -1) {
        log_error("%s", err);
        goto out;
    }
    log_info("stopped cleanly");
    rc = 0;
out:
    dead_letter_destroy(dlq);
    store_free(st);
    metrics_stop();
    config_free(&cfg);
    return rc;
}
