/* tally devbroker: a local Kafka-protocol broker (librdkafka mock cluster). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "commands.h"
#include "config.h"
#include "log.h"

#define DEVBROKER_MAX_TOPICS 256
#define DEVBROKER_TOPIC_MAX 249 /* Kafka's limit on a topic name */

static const opt_def_t devbroker_opts[] = {
    {"partitions", NULL, OPT_INT, "8", 1, 1024, NULL, "N",
     "partitions of every topic created at start"},
    {"brokers-count", NULL, OPT_INT, "1", 1, 9, NULL, "N",
     "brokers in the cluster (replication factor: min(N, 3))"},
    {"topics", NULL, OPT_STR, "token-usage,cache-invalidation", 0, 0, NULL,
     "LIST",
     "comma-separated topics to create, each with its <topic>.dlq"},
    {"bootstrap-file", NULL, OPT_STR, NULL, 0, 0, NULL, "PATH",
     "also write the bootstrap address to PATH (atomically; removed at "
     "exit)"},
    {"control", NULL, OPT_STR, "", 0, 0, NULL, "FIFO",
     "create the named pipe FIFO and take fault commands from it, one a "
     "line: 'down', 'up' (every broker), 'errors API COUNT ERROR' (the "
     "next COUNT requests of API, e.g. Fetch, Heartbeat, OffsetCommit, "
     "Produce, answer ERROR, e.g. NOT_COORDINATOR), 'clear API'"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "info", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
    {"log-format", "TALLY_LOG_FORMAT", OPT_CHOICE, "text", 0, 0, "text|json",
     "FORMAT", "log lines as text, or one JSON object per line"},
};

#define DEVBROKER_SUMMARY                                                     \
    "Runs an in-process Kafka-protocol cluster (librdkafka's mock cluster)\n" \
    "on 127.0.0.1 ephemeral ports for tests and demos, prints its\n"          \
    "bootstrap address on stdout and runs until SIGTERM or SIGINT.\n"         \
    "Limits of the mock: data lives in memory only; each partition keeps\n"   \
    "only its newest ~5 MiB or 100,000 message sets (older ones are\n"        \
    "dropped and the log start offset moves on); topics created on first\n"   \
    "use (auto-create) get 4 partitions; CreateTopics is not supported.\n"    \
    "-X properties apply to the librdkafka client hosting the cluster\n"      \
    "(e.g. -X debug=mock)."

static volatile sig_atomic_t devbroker_stop;

static void devbroker_on_signal(int sig)
{
    (void)sig;
    devbroker_stop = 1;
}

/* Routes librdkafka's own log lines (syslog levels) into ours. */
static void devbroker_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                             const char *buf)
{
    log_level_t lvl = level <= 3   ? LOG_LVL_ERROR
                      : level == 4 ? LOG_LVL_WARN
                      : level <= 6 ? LOG_LVL_INFO
                                   : LOG_LVL_DEBUG;
    (void)rk;
    /* The hosting client has no bootstrap.servers on purpose. */
    if (!strcmp(fac, "CONFWARN") && strstr(buf, "bootstrap.servers"))
        lvl = LOG_LVL_DEBUG;
    log_msg(lvl, "rdkafka %s: %s", fac, buf);
}

/* Kafka's rule for topic names: 1..249 of [A-Za-z0-9._-], not "." or "..".
 */
static bool devbroker_topic_ok(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > DEVBROKER_TOPIC_MAX || !strcmp(name, ".") ||
        !strcmp(name, ".."))
        return false;
    for (const char *p = name; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* Appends `name` to `names` unless it is already there. `names` owns the
 * copies. Returns -1 with errstr on a bad name or too many topics. */
static int devbroker_topic_add(char **names, size_t *n, const char *name,
                               char *errstr, size_t errstr_size)
{
    if (!devbroker_topic_ok(name)) {
        snprintf(errstr, errstr_size,
                 "--topics: '%s' is not a valid topic name (1..%d of "
                 "[A-Za-z0-9._-])",
                 name, DEVBROKER_TOPIC_MAX);
        return -1;
    }
    for (size_t i = 0; i < *n; i++)
        if (!strcmp(names[i], name))
            return 0;
    if (*n >= DEVBROKER_MAX_TOPICS) {
        snprintf(errstr, errstr_size, "--topics: more than %d topics",
                 DEVBROKER_MAX_TOPICS);
        return -1;
    }
    names[*n] = strdup(name);
    if (!names[*n]) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    (*n)++;
    return 0;
}

/* Splits the comma-separated --topics value into names plus their ".dlq"
 * topics (blanks around names are ignored, as are empty items). Returns -1
 * with errstr on a bad name; the caller frees names[0..*n). */
static int devbroker_topics_parse(const char *list, char **names, size_t *n,
                                  char *errstr, size_t errstr_size)
{
    char *copy = strdup(list);
    char *save = NULL, *tok;
    char dlq[DEVBROKER_TOPIC_MAX + 8];
    int ret = -1;

    if (!copy) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    for (tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        char *end;
        while (*tok == ' ' || *tok == '\t')
            tok++;
        end = tok + strlen(tok);
        while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (!*tok)
            continue;
        if (devbroker_topic_add(names, n, tok, errstr, errstr_size) == -1)
            goto out;
        snprintf(dlq, sizeof(dlq), "%s.dlq", tok);
        if (devbroker_topic_add(names, n, dlq, errstr, errstr_size) == -1)
            goto out;
    }
    ret = 0;
out:
    free(copy);
    return ret;
}

/* Writes "addr\n" to `path` through a temporary file in the same directory
 * and rename(2), so that a reader never sees a partial address. */
static int devbroker_write_bootstrap(const char *path, const char *addr,
                                     char *errstr, size_t errstr_size)
{
    char tmp[4096];
    size_t len = strlen(addr);
    char *line = NULL;
    int fd = -1, ret = -1;

    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path,
                         (long)getpid()) >= sizeof(tmp)) {
        snprintf(errstr, errstr_size, "--bootstrap-file: path too long");
        return -1;
    }
    line = malloc(len + 1);
    if (!line) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out;
    }
    memcpy(line, addr, len);
    line[len] = '\n';
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd == -1) {
        snprintf(errstr, errstr_size, "--bootstrap-file: %s (temporary "
                 "file): %s", path, strerror(errno));
        goto out;
    }
    if (write(fd, line, len + 1) != (ssize_t)(len + 1) || fsync(fd) == -1) {
        snprintf(errstr, errstr_size, "--bootstrap-file: %s (temporary "
                 "file): %s", path, strerror(errno ? errno : EIO));
        goto out;
    }
    if (close(fd) == -1) {
        fd = -1;
        snprintf(errstr, errstr_size, "--bootstrap-file: %s (temporary "
                 "file): %s", path, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) == -1) {
        snprintf(errstr, errstr_size, "--bootstrap-file: %s: %s", path,
                 strerror(errno));
        goto out;
    }
    ret = 0;
out:
    if (fd != -1)
        close(fd);
    if (ret == -1)
        unlink(tmp);
    free(line);
    return ret;
}

/* ---------------------------------------------------------------- */
/* Fault injection for tests (--control)                              */

static const struct {
    const char *name;
    int16_t key;
} devbroker_apis[] = {
    {"Produce", 0},       {"Fetch", 1},        {"ListOffsets", 2},
    {"Metadata", 3},      {"OffsetCommit", 8}, {"OffsetFetch", 9},
    {"FindCoordinator", 10}, {"JoinGroup", 11}, {"Heartbeat", 12},
    {"LeaveGroup", 13},   {"SyncGroup", 14},   {"InitProducerId", 22},
};

static int devbroker_api(const char *name)
{
    for (size_t i = 0; i < sizeof(devbroker_apis) / sizeof(*devbroker_apis);
         i++)
        if (!strcmp(devbroker_apis[i].name, name))
            return devbroker_apis[i].key;
    return -1;
}

/* An error code by its name without the RD_KAFKA_RESP_ERR_ prefix. */
static int devbroker_error(const char *name, rd_kafka_resp_err_t *err)
{
    const struct rd_kafka_err_desc *descs;
    size_t n;

    rd_kafka_get_err_descs(&descs, &n);
    for (size_t i = 0; i < n; i++) {
        if (descs[i].name && !strcmp(descs[i].name, name)) {
            *err = descs[i].code;
            return 0;
        }
    }
    return -1;
}

static void devbroker_command(rd_kafka_mock_cluster_t *mc, int brokers,
                              char *line)
{
    char *argv[4] = {NULL};
    int argc = 0;
    char *save = NULL;

    for (char *tok = strtok_r(line, " \t", &save); tok && argc < 4;
         tok = strtok_r(NULL, " \t", &save))
        argv[argc++] = tok;
    if (argc == 0)
        return;
    if (!strcmp(argv[0], "down") || !strcmp(argv[0], "up")) {
        for (int b = 1; b <= brokers; b++) {
            if (argv[0][0] == 'd')
                rd_kafka_mock_broker_set_down(mc, b);
            else
                rd_kafka_mock_broker_set_up(mc, b);
        }
        log_info("control: every broker %s", argv[0]);
    } else if (!strcmp(argv[0], "errors") && argc == 4) {
        int api = devbroker_api(argv[1]);
        long cnt = atol(argv[2]);
        rd_kafka_resp_err_t err;
        if (api < 0 || cnt <= 0 || cnt > 100000 ||
            devbroker_error(argv[3], &err) == -1) {
            log_warn("control: bad command 'errors %s %s %s'", argv[1],
                     argv[2], argv[3]);
            return;
        }
        {
            /* One call: pushing them one by one is quadratic. */
            rd_kafka_resp_err_t *errs = malloc((size_t)cnt * sizeof(*errs));
            if (!errs)
                abort();
            for (long i = 0; i < cnt; i++)
                errs[i] = err;
            rd_kafka_mock_push_request_errors_array(mc, (int16_t)api,
                                                    (size_t)cnt, errs);
            free(errs);
        }
        log_info("control: the next %ld %s requests fail with %s", cnt,
                 argv[1], argv[3]);
    } else if (!strcmp(argv[0], "clear") && argc == 2 &&
               devbroker_api(argv[1]) >= 0) {
        rd_kafka_mock_clear_request_errors(
            mc, (int16_t)devbroker_api(argv[1]));
        log_info("control: %s errors cleared", argv[1]);
    } else {
        log_warn("control: unknown command '%s'", argv[0]);
    }
}

/* Reads what is there on the control pipe and runs each complete line. */
static void devbroker_control(int fd, char *buf, size_t size, size_t *len,
                              rd_kafka_mock_cluster_t *mc, int brokers)
{
    ssize_t n;
    char *nl;

    while ((n = read(fd, buf + *len, size - 1 - *len)) > 0) {
        *len += (size_t)n;
        buf[*len] = '\0';
        while ((nl = strchr(buf, '\n')) != NULL) {
            *nl = '\0';
            devbroker_command(mc, brokers, buf);
            memmove(buf, nl + 1, *len - (size_t)(nl + 1 - buf) + 1);
            *len -= (size_t)(nl + 1 - buf);
        }
        if (*len >= size - 1)
            *len = 0; /* a line too long: dropped */
    }
}

int devbroker_main(int argc, char **argv)
{
    config_t cfg;
    char errstr[512];
    char *topics[DEVBROKER_MAX_TOPICS];
    size_t n_topics = 0;
    rd_kafka_conf_t *conf = NULL;
    rd_kafka_t *rk = NULL;
    rd_kafka_mock_cluster_t *mcluster = NULL;
    const char *bootstrap_file, *bootstraps;
    bool file_written = false;
    const char *control;
    int control_fd = -1, control_wfd = -1;
    char control_buf[1024];
    size_t control_len = 0;
    struct sigaction sa;
    int partitions, brokers, replication;
    int ret = 1;

    ret = config_parse_command(&cfg, "devbroker", DEVBROKER_SUMMARY, devbroker_opts,
                               sizeof(devbroker_opts) / sizeof(*devbroker_opts), argc,
                               argv);
    if (ret >= 0)
        goto out;
    ret = 1;
    partitions = (int)config_int(&cfg, "partitions");
    brokers = (int)config_int(&cfg, "brokers-count");
    replication = brokers < 3 ? brokers : 3;
    bootstrap_file = config_str(&cfg, "bootstrap-file");
    if (bootstrap_file && !*bootstrap_file)
        bootstrap_file = NULL;
    if (devbroker_topics_parse(config_str(&cfg, "topics"), topics, &n_topics,
                               errstr, sizeof(errstr)) == -1) {
        fprintf(stderr, "tally devbroker: %s\n", errstr);
        ret = 2;
        goto out;
    }

    /* The hosting client: a producer that never produces, there only
     * because the mock cluster needs an rd_kafka_t for its bookkeeping. */
    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, devbroker_log_cb);
    if (config_apply_x(&cfg, conf, errstr, sizeof(errstr)) == -1) {
        fprintf(stderr, "tally devbroker: %s\n", errstr);
        ret = 2;
        goto out;
    }
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        log_error("cannot create the hosting Kafka client: %s", errstr);
        goto out;
    }
    conf = NULL; /* owned by rk now */

    mcluster = rd_kafka_mock_cluster_new(rk, brokers);
    if (!mcluster) {
        log_error("cannot create the mock cluster (%d brokers)", brokers);
        goto out;
    }
    for (size_t i = 0; i < n_topics; i++) {
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(
            mcluster, topics[i], partitions, replication);
        if (err) {
            log_error("cannot create topic %s: %s", topics[i],
                      rd_kafka_err2str(err));
            goto out;
        }
        log_info("created topic %s (%d partitions, replication factor %d)",
                 topics[i], partitions, replication);
    }
    bootstraps = rd_kafka_mock_cluster_bootstraps(mcluster);

    /* Handlers before the address goes out: whoever reads it may signal
     * us right away. No SA_RESTART is needed; the loop polls. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = devbroker_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    if (bootstrap_file) {
        if (devbroker_write_bootstrap(bootstrap_file, bootstraps, errstr,
                                      sizeof(errstr)) == -1) {
            log_error("%s", errstr);
            goto out;
        }
        file_written = true;
    }
    log_info("mock cluster up: %d broker(s), bootstrap %s", brokers,
             bootstraps);
    control = config_str(&cfg, "control");
    if (control && control[0]) {
        if (mkfifo(control, 0600) == -1 && errno != EEXIST) {
            log_error("--control: %s: %s", control, strerror(errno));
            goto out;
        }
        /* Our own write end keeps read() at EAGAIN, not EOF, between
         * writers. */
        control_fd = open(control, O_RDONLY | O_NONBLOCK);
        control_wfd = control_fd == -1 ? -1 : open(control, O_WRONLY);
        if (control_fd == -1 || control_wfd == -1) {
            log_error("--control: %s: %s", control, strerror(errno));
            goto out;
        }
    }
    printf("%s\n", bootstraps);
    fflush(stdout);

    while (!devbroker_stop) {
        rd_kafka_poll(rk, 100);
        if (control_fd != -1)
            devbroker_control(control_fd, control_buf, sizeof(control_buf),
                              &control_len, mcluster, brokers);
    }
    log_info("signal received, shutting down");
    ret = 0;

out:
    if (control_fd != -1)
        close(control_fd);
    if (control_wfd != -1)
        close(control_wfd);
    if (file_written && unlink(bootstrap_file) == -1 && errno != ENOENT)
        log_warn("cannot remove %s: %s", bootstrap_file, strerror(errno));
    if (mcluster)
        rd_kafka_mock_cluster_destroy(mcluster);
    if (rk)
        rd_kafka_destroy(rk);
    if (conf)
        rd_kafka_conf_destroy(conf);
    for (size_t i = 0; i < n_topics; i++)
        free(topics[i]);
    config_free(&cfg);
    return ret;
}
