/* tally worker and tally migrate: configuration and start-up. */
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <pthread.h>

#include "cache.h"
#include "commands.h"
#include "config.h"
#include "usage_consumer.h"
#include "dead_letter.h"
#include "invalidation_consumer.h"
#include "log.h"
#include "metrics.h"
#include "usage_store.h"

#define WORKER_MAX_MEMBERS 64 /* --consumers at most */
#define WORKER_MAX_PIPES (WORKER_MAX_MEMBERS + 1)

static volatile sig_atomic_t stop_requested;

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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
     "consumer group of the token-usage pipeline"},
    {"invalidation-group", "TALLY_INVALIDATION_GROUP", OPT_STR, "", 0, 0, NULL,
     "NAME",
     "consumer group of the cache-invalidation pipeline (empty: "
     "<group>.invalidation)"},
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},
    {"redis-url", "TALLY_REDIS_URL", OPT_STR, "redis://localhost:6379/0", 0, 0,
     NULL, "URL", "Redis for cache invalidation"},
    {"metrics-addr", "TALLY_METRICS_ADDR", OPT_STR, "127.0.0.1:9464", 0, 0,
     NULL, "HOST:PORT",
     "/metrics, /healthz, /readyz listener: IPV4:PORT, [IPV6]:PORT or "
     ":PORT (every interface) (empty: off)"},
    {"usage-topic", "TALLY_USAGE_TOPIC", OPT_STR, "token-usage", 0, 0, NULL,
     "TOPIC", "token-usage topic (empty: not consumed)"},
    {"invalidation-topic", "TALLY_INVALIDATION_TOPIC", OPT_STR,
     "cache-invalidation", 0, 0, NULL, "TOPIC",
     "cache-invalidation topic (empty: not consumed)"},
    {"usage-dlq-topic", "TALLY_USAGE_DLQ_TOPIC", OPT_STR, "", 0, 0, NULL,
     "TOPIC", "dead letters of token-usage (empty: <usage-topic>.dlq)"},
    {"invalidation-dlq-topic", "TALLY_INVALIDATION_DLQ_TOPIC", OPT_STR, "", 0,
     0, NULL, "TOPIC",
     "dead letters of cache-invalidation (empty: <topic>.dlq)"},
    {"cache-prefix", "TALLY_CACHE_PREFIX", OPT_STR, "cache", 1, 0, NULL,
     "PREFIX", "first segment of every Redis cache key"},
    {"notify-channel", "TALLY_NOTIFY_CHANNEL", OPT_STR, "cache:invalidations",
     1, 0, NULL, "CHANNEL", "Redis channel of the invalidation notices"},
    {"invalidation-batch-size", "TALLY_INVALIDATION_BATCH_SIZE", OPT_INT, "500",
     1, 100000, NULL, "N", "invalidations per Redis round at most"},
    {"invalidation-batch-ms", "TALLY_INVALIDATION_BATCH_MS", OPT_INT, "50", 1,
     60000, NULL, "MS", "apply invalidations at least this often"},
    {"scan-count", "TALLY_SCAN_COUNT", OPT_INT, "1000", 10, 1000000, NULL, "N",
     "COUNT hint of the SCAN that finds wildcard keys"},
    {"start-from", "TALLY_START_FROM", OPT_CHOICE, "earliest", 0, 0,
     "earliest|latest", "WHERE",
     "where a partition with no stored position starts"},
    {"batch-size", "TALLY_BATCH_SIZE", OPT_INT, "5000", 1, 1000000, NULL, "N",
     "close a batch after this many messages"},
    {"batch-bytes", "TALLY_BATCH_BYTES", OPT_INT, "8388608", 1024, 1073741824,
     NULL, "BYTES", "close a batch after this many bytes"},
    {"batch-ms", "TALLY_BATCH_MS", OPT_INT, "500", 1, 600000, NULL, "MS",
     "close a batch this long after its first message"},
    {"batch-idle-ms", "TALLY_BATCH_IDLE_MS", OPT_INT, "50", 0, 600000, NULL,
     "MS",
     "close a batch sooner once every partition is read to its end and no "
     "message came for this long (0: only by --batch-ms)"},
    {"commit-batches", "TALLY_COMMIT_BATCHES", OPT_INT, "20", 1, 48, NULL, "N",
     "batches per Postgres transaction while a backlog lasts (their sums "
     "upserted once); a batch closed by --batch-ms or --batch-idle-ms "
     "commits at once"},
    {"commit-ms", "TALLY_COMMIT_MS", OPT_INT, "1000", 1, 600000, NULL, "MS",
     "commit a transaction of several batches once open this long"},
    {"dedupe-days", "TALLY_DEDUPE_DAYS", OPT_INT, "35", 1, 3650, NULL, "DAYS",
     "dedupe window; older events are rejected"},
    {"max-message-bytes", "TALLY_MAX_MESSAGE_BYTES", OPT_INT, "1048576", 64,
     104857600, NULL, "BYTES", "larger messages are rejected"},
    {"prune-interval", "TALLY_PRUNE_INTERVAL", OPT_INT, "3600", 0, 604800, NULL,
     "SECONDS", "delete counted events past the window this often (0: never)"},
    {"no-migrate", "TALLY_NO_MIGRATE", OPT_BOOL, "false", 0, 0, NULL, NULL,
     "do not apply pending migrations at start"},
    {"consumers", "TALLY_CONSUMERS", OPT_INT, "1", 1, WORKER_MAX_MEMBERS, NULL,
     "N",
     "members of the token-usage group in this process, each with its own "
     "Kafka consumer and Postgres connection"},
    {"shutdown-timeout", "TALLY_SHUTDOWN_TIMEOUT", OPT_INT, "30", 1, 3600, NULL,
     "SECONDS",
     "after SIGTERM, exit at the latest this long after it (what was not "
     "committed is consumed again)"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
    {"log-format", "TALLY_LOG_FORMAT", OPT_CHOICE, "text", 0, 0, "text|json",
     "FORMAT", "log lines as text, or one JSON object per line"},
};

static const opt_def_t migrate_opts[] = {
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
    {"log-format", "TALLY_LOG_FORMAT", OPT_CHOICE, "text", 0, 0, "text|json",
     "FORMAT", "log lines as text, or one JSON object per line"},
};

#define N_OPTS(a) (sizeof(a) / sizeof(*(a)))

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
    int rc =
        config_parse_command(&cfg, "migrate",
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

/* What each pipeline thread needs, and how it ended. */
typedef struct {
    config_t *cfg;
    bool usage; /* token-usage (else cache-invalidation) */
    int member; /* token-usage: 1..--consumers */
    const char *topic;
    const char *group;
    char dlq_topic[300];
    dead_letter_t *dlq;
    kafka_consumer_t *kc; /* handed to the pipeline, which closes it */
    int rc;               /* exit code contribution: 0 or 1 */
    atomic_bool done;     /* the thread has ended */
    char ready_name[64];  /* its /readyz check */
} worker_pipe_t;

static void dlq_topic_of(config_t *cfg, const char *flag, const char *topic,
                         char *out, size_t size)
{
    if (config_str(cfg, flag)[0])
        snprintf(out, size, "%s", config_str(cfg, flag));
    else
        snprintf(out, size, "%s.dlq", topic);
}

/* The token-usage pipeline: Postgres (waiting for it), then consuming. */
/* The members of one process share one memory budget: unless
 * --batch-size or -X queued.max.messages.kbytes is given, each of N
 * members gets 1/N of the default batch and pre-fetch queue (a floor of
 * MEMBER_BATCH_MIN messages and MEMBER_QUEUE_MIN_KB), so that peak RSS
 * stays where one member's is. */
#define MEMBER_BATCH_MIN 1000
#define MEMBER_QUEUE_MIN_KB 1024
/* The cache-invalidation consumer's pre-fetch queue when the token-usage
 * pipeline runs in the same process (alone it has 16 MiB): both drained
 * at once must stay within the process's 64 MiB. The queue is bounded by
 * count too: librdkafka keeps an op of a few hundred bytes per queued
 * message beside its payload, and 2 MiB of 70-byte invalidations is
 * 30,000 of them (massif: librdkafka held 30 MB at the peak of a run
 * whose queues were 10 MiB in all). -X sets both. */
#define INVALIDATION_SHARED_QUEUE_KB "2048"
#define INVALIDATION_SHARED_QUEUE_MSGS "10000"
/* True when the token-usage pipeline runs in this process: the
 * invalidation consumer then gets the small queue above and fetch
 * nudges. */
static bool usage_shares_process(const config_t *cfg)
{
    return config_str(cfg, "usage-topic")[0] != '\0';
}

static size_t usage_batch_size(const config_t *cfg)
{
    long long n = config_int(cfg, "consumers");
    long long size = config_int(cfg, "batch-size");
    if (n <= 1 || config_is_set(cfg, "batch-size"))
        return (size_t)size;
    size /= n;
    return (size_t)(size < MEMBER_BATCH_MIN ? MEMBER_BATCH_MIN : size);
}

/* The daily sums a transaction of several batches holds in memory
 * (about 140 bytes each, and their COPY rows at the commit), shared by
 * the members like the batch. 50,000 peaked at 60 MiB with both
 * pipelines and two members on a mix where nearly every event is a sum
 * of its own (bench.sh, BENCH_TENANTS=200000); 40,000 at 52-55. */
#define WINDOW_BUCKETS 40000
#define MEMBER_WINDOW_BUCKETS_MIN 10000
static size_t usage_window_buckets(const config_t *cfg)
{
    long long n = config_int(cfg, "consumers");
    long long b = WINDOW_BUCKETS / (n < 1 ? 1 : n);
    return (size_t)(b < MEMBER_WINDOW_BUCKETS_MIN ? MEMBER_WINDOW_BUCKETS_MIN
                                                  : b);
}

static void *usage_thread(void *arg)
{
    worker_pipe_t *pl = arg;
    config_t *cfg = pl->cfg;
    usage_consumer_conf_t cc;
    store_t *st;
    char err[512], owner[256], host[128], name[16];
    int stored_days = -1;

    /* Named for top -H and perf: usage-1, usage-2, ... (its committer
     * thread: usage-1-commit). */
    snprintf(name, sizeof(name), "usage-%d", pl->member);
    pthread_setname_np(pthread_self(), name);
    gethostname(host, sizeof(host));
    host[sizeof(host) - 1] = '\0';
    snprintf(owner, sizeof(owner), "%s/%d/%d", host, (int)getpid(), pl->member);
    st = store_new(config_str(cfg, "pg-dsn"), config_str(cfg, "group"), owner);
    pl->rc = start_store(st, !config_bool(cfg, "no-migrate"));
    if (pl->rc != 0 || stop_requested) {
        kafka_consumer_free(pl->kc);
        goto out;
    }
    if (store_read_dedupe_days(st, &stored_days, err, sizeof(err)) == 0 &&
        stored_days > 0 && stored_days != config_int(cfg, "dedupe-days"))
        log_warn("--dedupe-days is %lld but tally.settings says %d for "
                 "track_token_usage(); keep them equal",
                 config_int(cfg, "dedupe-days"), stored_days);

    memset(&cc, 0, sizeof(cc));
    cc.kc = pl->kc;
    cc.cfg = cfg;
    cc.brokers = config_str(cfg, "brokers");
    cc.group = pl->group;
    cc.topic = pl->topic;
    cc.dlq_topic = pl->dlq_topic;
    cc.start_from = config_str(cfg, "start-from");
    cc.batch_size = usage_batch_size(cfg);
    cc.batch_bytes = (size_t)config_int(cfg, "batch-bytes");
    cc.batch_ms = (int)config_int(cfg, "batch-ms");
    cc.batch_idle_ms = (int)config_int(cfg, "batch-idle-ms");
    cc.commit_batches = (size_t)config_int(cfg, "commit-batches");
    cc.commit_ms = (int)config_int(cfg, "commit-ms");
    cc.window_buckets = usage_window_buckets(cfg);
    cc.dedupe_days = (int)config_int(cfg, "dedupe-days");
    cc.max_message_bytes = (size_t)config_int(cfg, "max-message-bytes");
    cc.prune_interval_s = (long)config_int(cfg, "prune-interval");
    cc.store = st;
    cc.dlq = pl->dlq;
    cc.ready_name = pl->ready_name;
    cc.stop = &stop_requested;
    if (usage_consumer_run(&cc, err, sizeof(err)) == -1) {
        log_error("%s", err);
        pl->rc = 1;
    }
out:
    store_free(st);
    if (pl->rc != 0)
        stop_requested = 1; /* take the other pipeline down too */
    atomic_store(&pl->done, true);
    return NULL;
}

/* The cache-invalidation pipeline: Redis, then consuming. */
static void *invalidation_thread(void *arg)
{
    worker_pipe_t *pl = arg;
    config_t *cfg = pl->cfg;
    invalidation_consumer_conf_t ic;
    cache_t *cache;
    char err[512];

    pthread_setname_np(pthread_self(), "invalidation");
    cache = cache_new(config_str(cfg, "redis-url"), err, sizeof(err));
    if (!cache) {
        log_error("--redis-url: %s", err);
        kafka_consumer_free(pl->kc);
        pl->rc = 2;
        stop_requested = 1;
        atomic_store(&pl->done, true);
        return NULL;
    }
    memset(&ic, 0, sizeof(ic));
    ic.kc = pl->kc;
    ic.group = pl->group;
    ic.topic = pl->topic;
    ic.dlq_topic = pl->dlq_topic;
    ic.start_from = config_str(cfg, "start-from");
    ic.cache_prefix = config_str(cfg, "cache-prefix");
    ic.channel = config_str(cfg, "notify-channel");
    ic.batch_size = (size_t)config_int(cfg, "invalidation-batch-size");
    ic.batch_ms = (int)config_int(cfg, "invalidation-batch-ms");
    ic.max_message_bytes = (size_t)config_int(cfg, "max-message-bytes");
    ic.scan_count = (long)config_int(cfg, "scan-count");
    ic.nudge_fetches = usage_shares_process(cfg);
    ic.cache = cache;
    ic.dlq = pl->dlq;
    ic.stop = &stop_requested;
    if (invalidation_consumer_run(&ic, err, sizeof(err)) == -1) {
        log_error("%s", err);
        pl->rc = 1;
        stop_requested = 1;
    }
    cache_free(cache);
    atomic_store(&pl->done, true);
    return NULL;
}

/* The pipelines: --consumers members of the token-usage group (each its
 * own consumer, dead-letter producer, Postgres connection and thread),
 * and one cache-invalidation pipeline. Their Kafka clients are created
 * here at start, so that every configuration error librdkafka finds is
 * exit 2 before anything runs. Each pipeline has its own group:
 * librdkafka 2.0.2's cooperative-sticky assignor loops when the members
 * of one group subscribe to different topics (its issue #4783), which one
 * group for both topics would be. Returns 0 or the exit code. */
static int create_pipelines(config_t *cfg, worker_pipe_t *pipes, size_t *n,
                            char *invalidation_group, size_t size)
{
    const char *group = config_str(cfg, "group");
    const char *ig = config_str(cfg, "invalidation-group");
    const char *usage = config_str(cfg, "usage-topic");
    const char *inval = config_str(cfg, "invalidation-topic");
    const char *inv_defaults[20], *usage_defaults[32];
    char err[512], queue_kb[32];
    size_t k = 0, u = 0;

    if (ig[0])
        snprintf(invalidation_group, size, "%s", ig);
    else
        snprintf(invalidation_group, size, "%s.invalidation", group);
    if (usage[0] && inval[0] && !strcmp(invalidation_group, group)) {
        fprintf(stderr,
                "tally worker: %s: must differ from --group (%s): one "
                "group for both topics makes librdkafka 2.0.2 loop in "
                "rebalances (its issue #4783)\n",
                config_origin(cfg, "invalidation-group"), group);
        return 2;
    }
    /* The pre-fetch queue of each token-usage member: its share. */
    for (size_t i = 0; usage_consumer_kafka_defaults[i]; i += 2) {
        usage_defaults[u++] = usage_consumer_kafka_defaults[i];
        if (!strcmp(usage_consumer_kafka_defaults[i],
                    "queued.max.messages.kbytes")) {
            long long kb = atoll(usage_consumer_kafka_defaults[i + 1]) /
                           config_int(cfg, "consumers");
            snprintf(queue_kb, sizeof(queue_kb), "%lld",
                     kb < MEMBER_QUEUE_MIN_KB ? MEMBER_QUEUE_MIN_KB : kb);
            usage_defaults[u++] = queue_kb;
        } else {
            usage_defaults[u++] = usage_consumer_kafka_defaults[i + 1];
        }
    }
    usage_defaults[u] = NULL;
    /* Without a committed offset the invalidations start as --start-from
     * says (token-usage positions come from Postgres). */
    for (size_t i = 0; invalidation_consumer_kafka_defaults[i]; i += 2) {
        inv_defaults[k++] = invalidation_consumer_kafka_defaults[i];
        /* Next to the token-usage pipeline, a share of the budget. */
        inv_defaults[k++] =
            usage_shares_process(cfg) &&
                    !strcmp(invalidation_consumer_kafka_defaults[i],
                            "queued.max.messages.kbytes")
                ? INVALIDATION_SHARED_QUEUE_KB
                : invalidation_consumer_kafka_defaults[i + 1];
    }
    if (usage_shares_process(cfg)) {
        inv_defaults[k++] = "queued.min.messages";
        inv_defaults[k++] = INVALIDATION_SHARED_QUEUE_MSGS;
    }
    inv_defaults[k++] = "auto.offset.reset";
    inv_defaults[k++] = config_str(cfg, "start-from");
    inv_defaults[k] = NULL;

    *n = 0;
    for (long long m = 1; usage[0] && m <= config_int(cfg, "consumers"); m++) {
        worker_pipe_t *pl = &pipes[(*n)++];
        pl->usage = true;
        pl->member = (int)m;
        pl->topic = usage;
        pl->group = group;
        if (config_int(cfg, "consumers") == 1)
            snprintf(pl->ready_name, sizeof(pl->ready_name), "token-usage");
        else
            snprintf(pl->ready_name, sizeof(pl->ready_name), "token-usage#%d",
                     pl->member);
        dlq_topic_of(cfg, "usage-dlq-topic", usage, pl->dlq_topic,
                     sizeof(pl->dlq_topic));
    }
    if (inval[0]) {
        worker_pipe_t *pl = &pipes[(*n)++];
        pl->topic = inval;
        pl->group = invalidation_group;
        snprintf(pl->ready_name, sizeof(pl->ready_name), "cache-invalidation");
        dlq_topic_of(cfg, "invalidation-dlq-topic", inval, pl->dlq_topic,
                     sizeof(pl->dlq_topic));
    }
    for (size_t i = 0; i < *n; i++) {
        worker_pipe_t *pl = &pipes[i];
        pl->cfg = cfg;
        /* A producer of its own: each pipeline waits for the
         * acknowledgements of its own dead letters only. */
        pl->dlq = dead_letter_new(cfg, config_str(cfg, "brokers"),
                                  (size_t)config_int(cfg, "max-message-bytes"),
                                  err, sizeof(err));
        if (pl->dlq) {
            dead_letter_prepare(pl->dlq, pl->dlq_topic);
            pl->kc = kafka_consumer_new(
                cfg, config_str(cfg, "brokers"), pl->group,
                pl->usage ? usage_defaults : inv_defaults, err, sizeof(err));
        }
        if (!pl->dlq || !pl->kc) {
            fprintf(stderr, "tally worker: %s\n", err);
            return 2;
        }
    }
    return 0;
}

int worker_main(int argc, char **argv)
{
    config_t cfg;
    worker_pipe_t *pipes = calloc(WORKER_MAX_PIPES, sizeof(*pipes));
    pthread_t threads[WORKER_MAX_PIPES];
    bool started[WORKER_MAX_PIPES] = {false};
    size_t n_pipes = 0;
    char err[512], invalidation_group[300];
    struct sigaction sa;
    int64_t stop_seen_ms = 0;
    int rc = config_parse_command(
        &cfg, "worker",
        "Consume token-usage events, count each (tenant, idempotency key) "
        "exactly once and\nkeep daily and monthly sums in Postgres; apply "
        "cache-invalidation events to Redis.",
        worker_opts, N_OPTS(worker_opts), argc, argv);

    if (!pipes)
        abort();
    if (rc >= 0)
        goto out;
    rc = 1;
#ifdef __GLIBC__
    /* A few threads (librdkafka's, the committer, metrics) each get a
     * malloc arena by default; two keep the peak RSS down. */
    mallopt(M_ARENA_MAX, 2);
    /* glibc raises its mmap threshold each time a large block is freed
     * (up to 32 MiB), after which the batch and COPY buffers of every
     * window come from the heaps and their freed pages stay resident
     * between windows. A fixed threshold keeps blocks of 256 KiB and
     * more mapped on their own, so that they go back to the kernel when
     * freed: with both pipelines and two members draining, peak RSS was
     * 53-57 MiB with the invalidations' count bound alone and 48-50 with
     * this too (56-66 before both; README, Performance). */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
#endif

    /* Order matters: signals, configuration checks, metrics, the Kafka
     * clients, then one thread per pipeline. Each has its own
     * connections, so that Redis down cannot stop counting and Postgres
     * down cannot stop invalidations. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (!config_str(&cfg, "usage-topic")[0] &&
        !config_str(&cfg, "invalidation-topic")[0]) {
        fprintf(stderr, "tally worker: nothing to consume: --usage-topic "
                        "and --invalidation-topic are both empty\n");
        rc = 2;
        goto out;
    }
    if (kafka_check_x(&cfg, err, sizeof(err)) == -1) {
        fprintf(stderr, "tally worker: %s\n", err);
        rc = 2;
        goto out;
    }
    if (metrics_start(config_str(&cfg, "metrics-addr"),
                      config_origin(&cfg, "metrics-addr"), err,
                      sizeof(err)) == -1) {
        fprintf(stderr, "tally worker: %s\n", err);
        rc = 2;
        goto out;
    }
    rc = create_pipelines(&cfg, pipes, &n_pipes, invalidation_group,
                          sizeof(invalidation_group));
    if (rc != 0)
        goto out;
    /* /readyz waits for every pipeline that runs (each starts "not ready:
     * starting" until its first report). */
    for (size_t i = 0; i < n_pipes; i++)
        metrics_readiness(pipes[i].ready_name);
    for (size_t i = 0; i < n_pipes; i++) {
        if (pthread_create(&threads[i], NULL,
                           pipes[i].usage ? usage_thread : invalidation_thread,
                           &pipes[i]) != 0) {
            log_error("cannot start a thread");
            stop_requested = 1;
            break;
        }
        started[i] = true; /* pipes[i].kc is the thread's now */
    }
    /* Wait for the pipelines; after a stop, at most --shutdown-timeout.
     * Past it something is stuck (a library bug, a dependency that does
     * not answer): everything committed is safe and everything else is
     * consumed again, so exiting is as safe as a kill -9, and an
     * orchestrator's SIGKILL would come next anyway. */
    for (;;) {
        bool running = false;
        for (size_t i = 0; i < n_pipes; i++)
            running |= started[i] && !atomic_load(&pipes[i].done);
        if (!running)
            break;
        if (stop_requested && !stop_seen_ms)
            stop_seen_ms = mono_ms();
        if (stop_seen_ms && mono_ms() - stop_seen_ms >
                                config_int(&cfg, "shutdown-timeout") * 1000) {
            log_error("stop did not finish within --shutdown-timeout (%lld "
                      "s); exiting now (nothing committed is lost, the rest "
                      "is consumed again)",
                      config_int(&cfg, "shutdown-timeout"));
            fflush(stderr);
            _exit(0);
        }
        usleep(50000);
    }
    rc = 0;
    for (size_t i = 0; i < n_pipes; i++) {
        if (!started[i])
            continue;
        pthread_join(threads[i], NULL);
        if (pipes[i].rc > rc)
            rc = pipes[i].rc;
    }
    if (rc == 0)
        log_info("stopped cleanly");
out:
    for (size_t i = 0; i < n_pipes; i++) {
        if (!started[i])
            kafka_consumer_free(pipes[i].kc);
        dead_letter_destroy(pipes[i].dlq);
    }
    free(pipes);
    metrics_stop();
    config_free(&cfg);
    return rc;
}
