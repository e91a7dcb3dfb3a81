/* The skeleton both consumers share: partitions, backoff, the poll loop. */
#include "pipeline.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

int64_t pipeline_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t pipeline_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---------------------------------------------------------------- */
/* Backoff                                                            */

void backoff_init(backoff_t *b, int min_ms, int max_ms)
{
    b->min_ms = min_ms;
    b->max_ms = max_ms;
    b->delay_ms = min_ms;
    b->retry_at_ms = 0;
}

int backoff_fail(backoff_t *b)
{
    int waits = b->delay_ms;
    b->retry_at_ms = pipeline_now_ms() + waits;
    b->delay_ms = b->delay_ms > b->max_ms / 2 ? b->max_ms : b->delay_ms * 2;
    return waits;
}

void backoff_reset(backoff_t *b)
{
    b->delay_ms = b->min_ms;
    b->retry_at_ms = 0;
}

bool backoff_waiting(const backoff_t *b)
{
    return b->retry_at_ms != 0 && pipeline_now_ms() < b->retry_at_ms;
}

/* ---------------------------------------------------------------- */
/* Partitions                                                         */

static const char *part_state_name(part_state_t s)
{
    switch (s) {
    case PART_UNASSIGNED:
        return "unassigned";
    case PART_CLAIMING:
        return "claiming";
    case PART_ACTIVE:
        return "active";
    case PART_WAITING:
        return "waiting";
    case PART_FENCED:
        return "fenced";
    }
    return "?";
}

/* The transitions of the list in pipeline.h. */
static bool part_transition_ok(part_state_t from, part_state_t to)
{
    if (to == PART_UNASSIGNED)
        return from != PART_UNASSIGNED;
    switch (from) {
    case PART_UNASSIGNED:
        return to == PART_CLAIMING || to == PART_ACTIVE || to == PART_WAITING;
    case PART_CLAIMING:
        return to == PART_ACTIVE || to == PART_FENCED;
    case PART_ACTIVE:
        return to == PART_CLAIMING || to == PART_WAITING || to == PART_FENCED;
    case PART_WAITING:
        return to == PART_ACTIVE;
    case PART_FENCED:
        return to == PART_CLAIMING;
    }
    return false;
}

part_t *parts_get(part_table_t *t, int32_t partition)
{
    if (partition < 0)
        abort();
    if (partition >= t->n) {
        int32_t n = partition + 1;
        part_t *p = realloc(t->parts, (size_t)n * sizeof(*p));
        if (!p)
            abort();
        memset(p + t->n, 0, (size_t)(n - t->n) * sizeof(*p));
        t->parts = p;
        t->n = n;
    }
    return &t->parts[partition];
}

void parts_set_state(part_table_t *t, int32_t partition, part_state_t to,
                     const char *why)
{
    part_t *p = parts_get(t, partition);

    if (!part_transition_ok(p->state, to)) {
        log_error("%s [%" PRId32 "]: no transition from %s to %s (%s)",
                  t->topic, partition, part_state_name(p->state),
                  part_state_name(to), why);
        abort(); /* a programming error */
    }
    log_debug("%s [%" PRId32 "]: %s -> %s (%s)", t->topic, partition,
              part_state_name(p->state), part_state_name(to), why);
    if (p->state == PART_UNASSIGNED) {
        metric_t *lag = p->lag; /* the series outlives assignments */
        memset(p, 0, sizeof(*p));
        p->lag = lag;
        p->committed = -1;
        p->first = -1;
    }
    p->state = to;
    p->since_ms = pipeline_now_ms();
    p->dirty = true;
    if (to == PART_UNASSIGNED) {
        p->in_batch = false;
        if (p->lag)
            metric_set(p->lag, 0); /* its next owner reports it */
    }
}

int parts_move_all(part_table_t *t, part_state_t from, part_state_t to,
                   const char *why)
{
    int n = 0;
    for (int32_t i = 0; i < t->n; i++) {
        if (t->parts[i].state == from) {
            parts_set_state(t, i, to, why);
            n++;
        }
    }
    return n;
}

int parts_count(const part_table_t *t, part_state_t state)
{
    int n = 0;
    for (int32_t i = 0; i < t->n; i++)
        n += state != PART_UNASSIGNED && t->parts[i].state == state;
    return n;
}

int parts_assigned(const part_table_t *t)
{
    int n = 0;
    for (int32_t i = 0; i < t->n; i++)
        n += t->parts[i].state != PART_UNASSIGNED;
    return n;
}

void parts_sync(part_table_t *t)
{
    rd_kafka_topic_partition_list_t *pause =
        rd_kafka_topic_partition_list_new(t->n + 1);
    rd_kafka_topic_partition_list_t *resume =
        rd_kafka_topic_partition_list_new(t->n + 1);

    for (int32_t i = 0; i < t->n; i++) {
        part_t *p = &t->parts[i];
        if (!p->dirty)
            continue;
        p->dirty = false;
        if (p->state == PART_UNASSIGNED)
            continue; /* librdkafka forgets it */
        rd_kafka_topic_partition_list_add(
            p->state == PART_ACTIVE ? resume : pause, t->topic, i);
    }
    if (pause->cnt > 0)
        rd_kafka_pause_partitions(t->rk, pause);
    if (resume->cnt > 0)
        rd_kafka_resume_partitions(t->rk, resume);
    rd_kafka_topic_partition_list_destroy(pause);
    rd_kafka_topic_partition_list_destroy(resume);
}

rd_kafka_topic_partition_list_t *parts_in_batch(const part_table_t *t,
                                                bool first)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new(t->n + 1);
    for (int32_t i = 0; i < t->n; i++) {
        const part_t *p = &t->parts[i];
        if (p->state != PART_UNASSIGNED && p->in_batch)
            rd_kafka_topic_partition_list_add(l, t->topic, i)->offset =
                first ? p->first : p->next;
    }
    return l;
}

void parts_clear_batch(part_table_t *t)
{
    for (int32_t i = 0; i < t->n; i++)
        t->parts[i].in_batch = false;
}

void parts_report_assigned(part_table_t *t)
{
    int64_t n = parts_assigned(t);
    /* The gauge is the sum over the members: add this one's change. */
    metric_add(t->assigned, (uint64_t)(n - t->assigned_reported));
    t->assigned_reported = n;
}

void parts_update_lag(part_table_t *t, int every_ms)
{
    int64_t now = pipeline_now_ms();
    rd_kafka_topic_partition_list_t *l;

    if (now - t->lag_ms < every_ms)
        return;
    t->lag_ms = now;
    l = rd_kafka_topic_partition_list_new(t->n + 1);
    for (int32_t i = 0; i < t->n; i++)
        if (t->parts[i].state != PART_UNASSIGNED)
            rd_kafka_topic_partition_list_add(l, t->topic, i);
    if (l->cnt == 0 || rd_kafka_position(t->rk, l) != 0)
        goto out;
    for (int i = 0; i < l->cnt; i++) {
        int32_t partition = l->elems[i].partition;
        part_t *p = &t->parts[partition];
        int64_t lo = -1, hi = -1, lag = 0, from;
        if (!p->lag) {
            char labels[320];
            snprintf(labels, sizeof(labels),
                     "topic=\"%s\",partition=\"%" PRId32 "\"", t->topic,
                     partition);
            /* Shared by the members of the process (one owns a partition
             * at a time); lives until exit. */
            p->lag = metrics_gauge(t->lag_name, labels, t->lag_help);
        }
        if (rd_kafka_get_watermark_offsets(t->rk, t->topic, partition, &lo,
                                           &hi) == RD_KAFKA_RESP_ERR_NO_ERROR &&
            hi >= 0) {
            from = p->committed >= 0         ? p->committed
                   : l->elems[i].offset >= 0 ? l->elems[i].offset
                                             : lo;
            lag = from >= 0 && hi > from ? hi - from : 0;
        }
        metric_set(p->lag, lag);
    }
out:
    rd_kafka_topic_partition_list_destroy(l);
}

void parts_free(part_table_t *t)
{
    free(t->parts);
    t->parts = NULL;
    t->n = 0;
}

/* ---------------------------------------------------------------- */
/* Dead letters                                                       */

int pipeline_dead_letter(dead_letter_t *dlq, const char *dlq_topic,
                         const rd_kafka_message_t *rkm, const char *reason,
                         const char *message, size_t max_message_bytes,
                         metric_t *counter, char *errstr, size_t errstr_size)
{
    log_warn("%s [%" PRId32 "] offset %" PRId64 ": rejected (%s): %s",
             rd_kafka_topic_name(rkm->rkt), rkm->partition, rkm->offset, reason,
             message);
    switch (dead_letter_send(dlq, rkm, dlq_topic, reason, message,
                             max_message_bytes, errstr, errstr_size)) {
    case -1:
        return -1;
    case 0:
        metric_add(counter, 1);
        return 0;
    default:
        return 0; /* sent before a rewind: not again */
    }
}

metric_t *pipeline_reason_counter(const char *name, const char *reason,
                                  const char *help)
{
    char labels[96];
    snprintf(labels, sizeof(labels), "reason=\"%s\"", reason);
    return metrics_counter(name, labels, help);
}

/* ---------------------------------------------------------------- */
/* The poll loop                                                      */

void pipeline_init(pipeline_t *pl, kafka_consumer_t *kc, const char *topic,
                   const pipeline_ops_t *ops, void *arg,
                   volatile sig_atomic_t *stop, const char *lag_name,
                   const char *lag_help)
{
    memset(pl, 0, sizeof(*pl));
    pl->name = topic;
    pl->kc = kc;
    pl->rk = kafka_consumer_rk(kc);
    pl->ops = ops;
    pl->arg = arg;
    pl->stop = stop;
    pl->parts.topic = topic;
    pl->parts.rk = pl->rk;
    pl->parts.lag_name = lag_name;
    pl->parts.lag_help = lag_help;
}

void pipeline_fatal(pipeline_t *pl, const char *fmt, ...)
{
    va_list ap;
    if (pl->fatal)
        return; /* the first one says what happened */
    va_start(ap, fmt);
    vsnprintf(pl->fatal_error, sizeof(pl->fatal_error), fmt, ap);
    va_end(ap);
    pl->fatal = true;
}

static void pipeline_rebalance(void *arg, rd_kafka_t *rk,
                               rd_kafka_resp_err_t err,
                               rd_kafka_topic_partition_list_t *parts,
                               bool lost)
{
    pipeline_t *pl = arg;

    (void)rk; /* kafka.c handles any other error code */
    metric_add(pl->rebalances, 1);
    log_info("rebalance (%s): %s %d partitions%s", pl->name,
             err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS ? "assigned"
                                                         : "revoked",
             parts->cnt, lost ? " (lost)" : "");
    pl->synced = true; /* the group has settled at least once */
    pl->leaders_stale = true;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS)
        pl->ops->assign(pl->arg, parts);
    else
        pl->ops->revoke(pl->arg, parts, lost);
}

/* An offset commit failed (a rebalance in between, the coordinator
 * moving): the positions committed since are committed again, so that
 * the group's offsets (lag tools; the restart point of invalidations)
 * catch up even on a partition no new batch comes to. */
static void pipeline_recommit(pipeline_t *pl)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_resp_err_t err;

    if (!kafka_consumer_commit_failed(pl->kc))
        return;
    l = rd_kafka_topic_partition_list_new(pl->parts.n + 1);
    for (int32_t i = 0; i < pl->parts.n; i++) {
        const part_t *p = &pl->parts.parts[i];
        if (p->state == PART_ACTIVE && p->committed >= 0)
            rd_kafka_topic_partition_list_add(l, pl->parts.topic, i)->offset =
                p->committed;
    }
    log_info("%s: a Kafka offset commit failed; committing %d positions "
             "again",
             pl->name, l->cnt);
    err =
        l->cnt > 0 ? kafka_consumer_commit(pl->kc, l, false)
                   : RD_KAFKA_RESP_ERR_NO_ERROR;
    if (err)
        log_debug("kafka offset commit: %s", rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* librdkafka 2.0.2 stops fetching a partition while the pre-fetch queue
 * is full and decides again only when the thread of the partition's
 * broker wakes up, at the latest a second later (2.1 added
 * fetch.queue.backoff.ms for this): a consumer that drains the queue
 * sooner waits for the rest of that second, so throughput stopped at
 * about one queue a second. Once the queue has drained to a quarter of
 * its fullest since the last nudge (and held 1,000 messages or more:
 * not while the consumer keeps up with the topic), a ListOffsets request
 * (rd_kafka_query_watermark_offsets()) goes to each broker leading one
 * of our partitions: any request wakes its thread, which fetches again
 * at once. The token-usage pipeline asks for it (pl->nudge), and the
 * invalidation pipeline only next to it, where its queue is 10,000
 * messages (worker.c): alone, with 100,000 small messages a queue, the
 * invalidations went from 121,000 to 66,000 keys/s with it, where token
 * usage went from 30,000 to 39,000 events/s (--consumers 2).
 *
 * The requests are sent from a thread of their own (the nudger), never
 * from the poll loop: a ListOffsets request waits behind a fetch the
 * broker holds for fetch.wait.max.ms (500 ms) when a partition is at its
 * end, and the metadata lookup after a rebalance is a round trip too.
 * In the loop they held a member's next batch back by 300-530 ms at a
 * time at the end of a backlog, while its committer had nothing to do.
 * The loop only hands over the active partitions; a nudge still under
 * way when the next is due makes that one unnecessary. */
#define NUDGE_MIN_PEAK 1000
#define NUDGE_QUERY_MS 100
#define NUDGE_METADATA_MS 2000

struct nudger {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rd_kafka_t *rk;
    const char *topic;
    metric_t *nudges;
    bool quit;
    bool pending;       /* a request is waiting or under way */
    bool stale;         /* the assignment changed: look the leaders up */
    int32_t *want;      /* the request: the active partitions */
    int n_want, want_cap;
    int32_t *leader_of; /* by partition, from the last metadata */
    int n_leader_of;
};

/* The broker leading each partition of the topic (a round trip). 0, or
 * -1 (kept for the next request). */
static int nudger_find_leaders(struct nudger *nd)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(nd->rk, nd->topic, NULL);
    int rc = -1;

    if (!rkt)
        return -1;
    if (rd_kafka_metadata(nd->rk, 0, rkt, &md, NUDGE_METADATA_MS) ==
            RD_KAFKA_RESP_ERR_NO_ERROR &&
        md->topic_cnt == 1 && !md->topics[0].err &&
        md->topics[0].partition_cnt > 0) {
        int n = md->topics[0].partition_cnt;
        free(nd->leader_of);
        nd->leader_of = malloc(((size_t)n + 1) * sizeof(*nd->leader_of));
        if (!nd->leader_of)
            abort();
        for (int i = 0; i < n; i++)
            nd->leader_of[i] = -1;
        for (int i = 0; i < n; i++) {
            const rd_kafka_metadata_partition_t *mp =
                &md->topics[0].partitions[i];
            if (mp->id >= 0 && mp->id < n)
                nd->leader_of[mp->id] = mp->leader;
        }
        nd->n_leader_of = n;
        rc = 0;
    }
    if (md)
        rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    return rc;
}

/* One request: a ListOffsets to each broker leading any of `want`. */
static void nudger_nudge(struct nudger *nd, const int32_t *want, int n_want)
{
    int32_t *leaders = malloc(((size_t)n_want + 1) * sizeof(*leaders));
    int n_leaders = 0;
    bool quit;
    rd_kafka_resp_err_t err;

    if (!leaders)
        abort();
    for (int i = 0; i < n_want; i++) {
        int32_t p = want[i], leader;
        bool seen = false;
        int64_t lo, hi;
        if (p < 0 || p >= nd->n_leader_of)
            continue;
        leader = nd->leader_of[p];
        for (int k = 0; k < n_leaders && !seen; k++)
            seen = leaders[k] == leader;
        if (seen || leader < 0)
            continue;
        leaders[n_leaders++] = leader;
        pthread_mutex_lock(&nd->mu);
        quit = nd->quit;
        pthread_mutex_unlock(&nd->mu);
        if (quit)
            break; /* stopping: the other leaders can do without */
        /* librdkafka 2.0.2 waits for the reply whatever the timeout
         * (fixed in 2.3): behind a held fetch, up to fetch.wait.max.ms. */
        err = rd_kafka_query_watermark_offsets(nd->rk, nd->topic, p, &lo,
                                               &hi, NUDGE_QUERY_MS);
        if (nd->nudges)
            metric_add(nd->nudges, 1);
        if (err && err != RD_KAFKA_RESP_ERR__TIMED_OUT) {
            /* A leader that moved, a broker gone: look them up again. */
            pthread_mutex_lock(&nd->mu);
            nd->stale = true;
            pthread_mutex_unlock(&nd->mu);
        }
    }
    free(leaders);
}

static void *nudger_main(void *arg)
{
    struct nudger *nd = arg;
    int32_t *want = NULL;
    int cap = 0;

    pthread_mutex_lock(&nd->mu);
    for (;;) {
        bool stale;
        int n;
        while (!nd->quit && !nd->pending)
            pthread_cond_wait(&nd->cv, &nd->mu);
        if (nd->quit)
            break;
        if (nd->n_want > cap) {
            cap = nd->n_want;
            free(want);
            want = malloc((size_t)cap * sizeof(*want));
            if (!want)
                abort();
        }
        n = nd->n_want;
        memcpy(want, nd->want, (size_t)n * sizeof(*want));
        stale = nd->stale;
        nd->stale = false;
        pthread_mutex_unlock(&nd->mu);

        if ((stale || !nd->leader_of) && nudger_find_leaders(nd) == -1) {
            pthread_mutex_lock(&nd->mu);
            nd->stale = true; /* again with the next request */
            nd->pending = false;
            continue;
        }
        nudger_nudge(nd, want, n);
        pthread_mutex_lock(&nd->mu);
        nd->pending = false;
    }
    pthread_mutex_unlock(&nd->mu);
    free(want);
    return NULL;
}

static void nudger_start(pipeline_t *pl)
{
    struct nudger *nd = calloc(1, sizeof(*nd));
    char parent[16], name[16];

    if (!nd)
        abort();
    nd->rk = pl->rk;
    nd->topic = pl->parts.topic;
    nd->nudges = pl->nudges;
    nd->stale = true;
    pthread_mutex_init(&nd->mu, NULL);
    pthread_cond_init(&nd->cv, NULL);
    if (pthread_create(&nd->thread, NULL, nudger_main, nd) != 0) {
        log_warn("%s: no fetch nudges: cannot start their thread", pl->name);
        pthread_mutex_destroy(&nd->mu);
        pthread_cond_destroy(&nd->cv);
        free(nd);
        return;
    }
    /* Named after the loop's thread: usage-1-nudge, inval-nudge. */
    if (pthread_getname_np(pthread_self(), parent, sizeof(parent)) == 0) {
        if (strncmp(parent, "usage-", 6) == 0)
            snprintf(name, sizeof(name), "%.9s-nudge", parent);
        else
            snprintf(name, sizeof(name), "%.5s-nudge", parent);
        pthread_setname_np(nd->thread, name);
    }
    pl->nudger = nd;
}

/* Tells the nudger to stop, without waiting: the open batch is
 * committed meanwhile. */
static void nudger_quit(pipeline_t *pl)
{
    struct nudger *nd = pl->nudger;

    if (!nd)
        return;
    pthread_mutex_lock(&nd->mu);
    nd->quit = true;
    pthread_cond_broadcast(&nd->cv);
    pthread_mutex_unlock(&nd->mu);
}

/* Before the consumer is closed: waits for the request under way (one
 * ListOffsets round trip, or one metadata lookup), then frees it all. */
static void nudger_stop(pipeline_t *pl)
{
    struct nudger *nd = pl->nudger;

    if (!nd)
        return;
    nudger_quit(pl);
    pthread_join(nd->thread, NULL);
    pthread_mutex_destroy(&nd->mu);
    pthread_cond_destroy(&nd->cv);
    free(nd->want);
    free(nd->leader_of);
    free(nd);
    pl->nudger = NULL;
}

/* Hands a nudge of the active partitions to the nudger, unless one is
 * under way. Never waits for Kafka. */
static void nudger_request(pipeline_t *pl)
{
    struct nudger *nd = pl->nudger;
    int n = 0;

    pthread_mutex_lock(&nd->mu);
    if (nd->pending) {
        pthread_mutex_unlock(&nd->mu);
        return;
    }
    if (pl->parts.n > nd->want_cap) {
        /* The table grows with the partitions the topic gains. */
        int32_t *w = realloc(nd->want, (size_t)pl->parts.n * sizeof(*w));
        if (!w)
            abort();
        nd->want = w;
        nd->want_cap = pl->parts.n;
    }
    for (int32_t i = 0; i < pl->parts.n; i++)
        if (pl->parts.parts[i].state == PART_ACTIVE)
            nd->want[n++] = i;
    nd->n_want = n;
    if (pl->leaders_stale)
        nd->stale = true;
    pl->leaders_stale = false;
    nd->pending = n > 0;
    if (nd->pending)
        pthread_cond_broadcast(&nd->cv);
    pthread_mutex_unlock(&nd->mu);
}

static void pipeline_nudge(pipeline_t *pl)
{
    size_t len;

    /* The queue's length takes its lock: looked at every 64th poll,
     * not on every message. */
    if (!pl->nudger || (++pl->nudge_polls & 63) != 0)
        return;
    if (!pl->consumer_q &&
        !(pl->consumer_q = rd_kafka_queue_get_consumer(pl->rk)))
        return;
    len = rd_kafka_queue_length(pl->consumer_q);
    if (len > pl->q_peak)
        pl->q_peak = len;
    if (pl->q_peak < NUDGE_MIN_PEAK || len * 4 > pl->q_peak)
        return;
    pl->q_peak = len;
    nudger_request(pl);
}

int pipeline_run(pipeline_t *pl, char *errstr, size_t errstr_size)
{
    int rc = -1;

    if (kafka_consumer_subscribe(pl->kc, pl->parts.topic, pipeline_rebalance,
                                 pl, errstr, errstr_size) == -1)
        goto out;
    if (pl->nudge)
        nudger_start(pl);
    while (!*pl->stop && !pl->fatal) {
        int timeout = pl->ops->prepare(pl->arg);
        int64_t t0 = pipeline_mono_ns();
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(pl->rk, timeout);

        if (pl->poll_ns)
            metric_add(pl->poll_ns, (uint64_t)(pipeline_mono_ns() - t0));
        if (rkm) {
            if (rkm->err == RD_KAFKA_RESP_ERR__FATAL) {
                char reason[256];
                rd_kafka_fatal_error(pl->rk, reason, sizeof(reason));
                pipeline_fatal(pl, "fatal kafka error: %s", reason);
            } else if (rkm->err) {
                if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                    log_warn("%s consumer: %s", pl->name,
                             rd_kafka_err2str(rkm->err));
            } else {
                pl->ops->handle(pl->arg, rkm);
            }
            rd_kafka_message_destroy(rkm);
        }
        if (!pl->fatal) {
            pl->ops->tick(pl->arg);
            pipeline_recommit(pl);
            pipeline_nudge(pl);
        }
    }
    if (pl->consumer_q)
        rd_kafka_queue_destroy(pl->consumer_q);
    pl->consumer_q = NULL;
    nudger_quit(pl);
    log_info("%s: stopping: %s the open batch and leaving the group", pl->name,
             pl->fatal ? "abandoning" : "committing");
    pl->ops->finish(pl->arg, pl->fatal);
    nudger_stop(pl);
    kafka_consumer_close(pl->kc); /* the last revocation comes here */
    pl->kc = NULL;
    pl->rk = NULL;
    if (pl->fatal) {
        snprintf(errstr, errstr_size, "%s", pl->fatal_error);
        goto out;
    }
    rc = 0;
out:
    if (pl->kc)
        kafka_consumer_close(pl->kc);
    pl->kc = NULL;
    return rc;
}
