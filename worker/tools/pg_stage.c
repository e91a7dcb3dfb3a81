/* tally-pgstage: the Postgres stage of tally alone, without Kafka.
 *
 * Reads token-usage JSON lines (tally-gen's), parses them with the
 * worker's parser, splits them into the streams of C connections and into
 * transactions of N messages each, the way the worker batches them, and
 * then replays only the Postgres work, each connection on its own thread:
 *
 *   real    store_commit_batch(), the worker's own code path (usage_store.c);
 *           with --window W, W batches a transaction through the store's
 *           windows (store_window_add/commit), as a consumer would use
 *           them (the worker does not yet); --resume starts at the
 *           positions committed before, as after a kill
 *   onepass one COPY into a temp stage, one statement: INSERT ... ON
 *           CONFLICT DO NOTHING RETURNING, aggregated by Postgres, daily
 *           then monthly upserts, and the rows counted before
 *   binary  onepass with a binary COPY
 *   lean    onepass into an events table without source and counted_at
 *           (the script drops them)
 *   nomonth onepass without the monthly upsert (monthly as a view)
 *   window  onepass without the in-memory dedupe: every message of the
 *           window, duplicates included, streamed in COPY chunks; Postgres
 *           dedupes (DISTINCT ON) and reports the duplicates
 *
 * It reports messages/s, Postgres CPU per message (every process of the
 * cluster, from /proc), the backends' CPU and wall time per step, and
 * the counts, as one JSON line on stdout (and a table on stderr).
 * scripts/bench_pg_stage.sh drives it. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <dirent.h>
#include <libpq-fe.h>
#include <unistd.h>

#include "log.h"
#include "usage_batch.h"
#include "usage_event.h"
#include "usage_store.h"

#define TOPIC "token-usage"
#define GROUP "pgstage"
#define MAX_STEPS 16
#define MAX_CONNS 8

typedef enum {
    D_REAL,
    D_ONEPASS,
    D_BINARY,
    D_LEAN,
    D_NOMONTH,
    D_WINDOW,
} design_t;

static const char *const design_names[] = {"real", "onepass", "binary",
                                           "lean", "nomonth", "window"};

typedef struct {
    const char *file;
    const char *dsn;
    const char *design_name;
    design_t design;
    size_t batch;      /* messages per transaction */
    int conns;
    bool overlap;      /* streams share tenants (else split by tenant) */
    int partitions;
    int64_t now;       /* the parser's clock, seconds */
    long pg_pid;       /* the postmaster, for the cluster's CPU */
    bool sync_commit;  /* synchronous_commit on (tally: off) */
    size_t chunk;      /* window: rows per COPY chunk */
    size_t limit;      /* at most this many lines */
    long explain;      /* EXPLAIN ANALYZE this transaction's statement */
    size_t window;     /* real: batches per transaction (store_window_*) */
    bool resume;       /* start at the committed positions */
    long pause_ms;     /* between transactions (tests: a slower run) */
} opts_t;

/* A growable byte buffer. */
typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->len + n)
            cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data)
            abort();
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_put_be(buf_t *b, uint64_t v, int bytes)
{
    unsigned char tmp[8];
    for (int i = 0; i < bytes; i++)
        tmp[i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
    buf_put(b, tmp, (size_t)bytes);
}

/* One transaction's worth of messages. */
typedef struct {
    size_t msgs;
    size_t events;       /* distinct within the batch */
    batch_t *batch;      /* real: the worker's batch */
    buf_t stage;         /* the others: rows for the stage */
    size_t *chunk_ends;  /* window: where each COPY chunk ends */
    size_t n_chunks;
    int32_t *parts;      /* partitions touched and their next offsets */
    int64_t *next;
    size_t n_parts;
} txn_t;

typedef struct {
    uint64_t wall_ns[MAX_STEPS], cpu_ns[MAX_STEPS];
    const char *names[MAX_STEPS];
    int n;
} steps_t;

typedef struct {
    const opts_t *o;
    int id;
    txn_t *txns;
    size_t n_txns, cap_txns;
    int64_t *offsets;    /* per partition: next offset to assign */
    int64_t *epochs;     /* per partition, from the claim */
    store_t *store;      /* real; and the claim */
    PGconn *conn;        /* the other designs */
    int backend_pid;
    steps_t steps;
    uint64_t last_wall, last_cpu;
    size_t counted_before, conflicts, window_dups, buckets, retries;
    size_t deadlocks; /* windows that deadlocked (then one batch a time) */
    pthread_barrier_t *barrier;
    int failed;
} stream_t;

/* ---------------------------------------------------------------- */
/* Clocks                                                             */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* CPU time of a process in ns (schedstat: precise, unlike ticks). */
static uint64_t proc_cpu_ns(long pid)
{
    char path[64];
    unsigned long long ns = 0;
    FILE *fp;
    snprintf(path, sizeof(path), "/proc/%ld/schedstat", pid);
    fp = fopen(path, "r");
    if (!fp)
        return 0;
    if (fscanf(fp, "%llu", &ns) != 1)
        ns = 0;
    fclose(fp);
    return ns;
}

/* CPU seconds of the whole cluster: the postmaster with its reaped
 * children (autovacuum workers come and go) and its live children. */
static double cluster_cpu_s(long postmaster)
{
    long tck = sysconf(_SC_CLK_TCK);
    unsigned long long ticks = 0;
    DIR *d = opendir("/proc");
    struct dirent *de;

    if (!d || postmaster <= 0) {
        if (d)
            closedir(d);
        return 0;
    }
    while ((de = readdir(d)) != NULL) {
        char path[300], buf[1024], *p;
        long pid = strtol(de->d_name, &p, 10), ppid;
        unsigned long long ut, st, cut, cst;
        FILE *fp;
        if (*p || pid <= 0)
            continue;
        snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
        fp = fopen(path, "r");
        if (!fp)
            continue;
        if (!fgets(buf, sizeof(buf), fp)) {
            fclose(fp);
            continue;
        }
        fclose(fp);
        p = strrchr(buf, ')');
        if (!p || sscanf(p + 2,
                         "%*c %ld %*d %*d %*d %*d %*u %*u %*u %*u %*u "
                         "%llu %llu %llu %llu",
                         &ppid, &ut, &st, &cut, &cst) != 5)
            continue;
        if (pid == postmaster)
            ticks += ut + st + cut + cst;
        else if (ppid == postmaster)
            ticks += ut + st;
    }
    closedir(d);
    return (double)ticks / (double)tck;
}

/* The step hook: wall and backend CPU since the previous step. */
static void step_mark(void *arg, const char *name)
{
    stream_t *s = arg;
    uint64_t w = now_ns(), c = proc_cpu_ns(s->backend_pid);
    int i;
    for (i = 0; i < s->steps.n; i++)
        if (!strcmp(s->steps.names[i], name))
            break;
    if (i == s->steps.n) {
        if (i == MAX_STEPS)
            return;
        s->steps.names[s->steps.n++] = name;
    }
    s->steps.wall_ns[i] += w - s->last_wall;
    s->steps.cpu_ns[i] += c - s->last_cpu;
    s->last_wall = w;
    s->last_cpu = c;
}

static void step_start(stream_t *s)
{
    s->last_wall = now_ns();
    s->last_cpu = proc_cpu_ns(s->backend_pid);
}

/* ---------------------------------------------------------------- */
/* Loading: parse, split into streams and transactions                */

static uint64_t fnv(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t rng(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static txn_t *stream_txn(stream_t *s)
{
    if (s->n_txns == 0 || s->txns[s->n_txns - 1].msgs >= s->o->batch) {
        txn_t *t;
        if (s->n_txns == s->cap_txns) {
            s->cap_txns = s->cap_txns ? s->cap_txns * 2 : 64;
            s->txns = realloc(s->txns, s->cap_txns * sizeof(*s->txns));
            if (!s->txns)
                abort();
        }
        t = &s->txns[s->n_txns++];
        memset(t, 0, sizeof(*t));
        t->parts = calloc((size_t)s->o->partitions, sizeof(*t->parts));
        t->next = calloc((size_t)s->o->partitions, sizeof(*t->next));
        if (s->o->design != D_WINDOW)
            t->batch = batch_new(s->o->batch);
        if (!t->parts || !t->next ||
            (s->o->design != D_WINDOW && !t->batch))
            abort();
    }
    return &s->txns[s->n_txns - 1];
}

static void txn_touch(txn_t *t, int32_t part, int64_t next)
{
    for (size_t i = 0; i < t->n_parts; i++) {
        if (t->parts[i] == part) {
            t->next[i] = next;
            return;
        }
    }
    t->parts[t->n_parts] = part;
    t->next[t->n_parts++] = next;
}

/* The batch's rows with a leading seq, as the stage takes them (lean:
 * without the trailing source). */
static void txn_stage_text(txn_t *t, bool lean)
{
    for (size_t seq = 0; seq < batch_count(t->batch); seq++) {
        char num[24];
        size_t len;
        const char *row = batch_event_row(t->batch, seq, &len);
        int n = snprintf(num, sizeof(num), "%zu\t", seq);
        buf_put(&t->stage, num, (size_t)n);
        if (lean) {
            const char *tab = memrchr(row, '\t', len);
            buf_put(&t->stage, row, (size_t)(tab - row));
            buf_put(&t->stage, "\n", 1);
        } else {
            buf_put(&t->stage, row, len);
        }
    }
}

/* Binary COPY fields. */
static void bin_text(buf_t *b, const char *s, bool null_if_empty)
{
    size_t n = strlen(s);
    if (n == 0 && null_if_empty) {
        buf_put_be(b, 0xffffffffu, 4);
        return;
    }
    buf_put_be(b, n, 4);
    buf_put(b, s, n);
}

static void bin_i64(buf_t *b, int64_t v)
{
    buf_put_be(b, 8, 4);
    buf_put_be(b, (uint64_t)v, 8);
}

/* The event as one binary COPY tuple of the stage (seq, then the
 * events table's columns but counted_at). */
static void txn_stage_binary(txn_t *t, size_t seq, const usage_event_t *ev,
                             const char *source)
{
    /* µs since 2000-01-01, Postgres's epoch */
    const int64_t pg_epoch_us = 946684800LL * 1000000LL;
    const int64_t nums[] = {ev->tokens, ev->prompt_tokens,
                            ev->completion_tokens, ev->thoughts_tokens,
                            ev->cached_tokens};
    buf_t *b = &t->stage;

    if (b->len == 0) {
        buf_put(b, "PGCOPY\n\377\r\n", 11);
        buf_put_be(b, 0, 4);
        buf_put_be(b, 0, 4);
    }
    buf_put_be(b, 19, 2);
    buf_put_be(b, 4, 4);
    buf_put_be(b, (uint64_t)seq, 4);
    bin_text(b, ev->tenant_id, false);
    bin_text(b, ev->idempotency_key, false);
    bin_i64(b, ev->occurred_at_us - pg_epoch_us);
    bin_text(b, ev->token_type, false);
    bin_text(b, ev->operation, false);
    bin_text(b, ev->model, false);
    bin_text(b, ev->agent_id, true);
    bin_text(b, ev->conversation_id, true);
    bin_text(b, ev->collection_id, true);
    bin_text(b, ev->owner_tenant_id, true);
    for (int i = 0; i < 5; i++)
        bin_i64(b, nums[i]);
    if (ev->metadata) {
        buf_put_be(b, ev->metadata_len, 4);
        buf_put(b, ev->metadata, ev->metadata_len);
    } else {
        buf_put_be(b, 0xffffffffu, 4);
    }
    bin_i64(b, (int64_t)ev->payload_hash);
    bin_text(b, source, false);
}

/* window: every message as a stage row, duplicates included (a scratch
 * batch of one builds the row exactly as the worker would). */
static void txn_stage_window(const opts_t *o, txn_t *t, batch_t *one,
                             const usage_event_t *ev, const char *source)
{
    char num[24];
    size_t len;
    const char *row;
    int n;

    batch_clear(one);
    batch_add(one, ev, source);
    row = batch_event_row(one, 0, &len);
    n = snprintf(num, sizeof(num), "%zu\t", t->msgs);
    buf_put(&t->stage, num, (size_t)n);
    buf_put(&t->stage, row, len);
    if ((t->msgs + 1) % o->chunk == 0) {
        t->chunk_ends = realloc(t->chunk_ends,
                                (t->n_chunks + 1) * sizeof(size_t));
        if (!t->chunk_ends)
            abort();
        t->chunk_ends[t->n_chunks++] = t->stage.len;
    }
}

/* --resume: the positions committed before (a restart after a kill),
 * per partition; messages before them are not sent again. */
static int64_t *resume_at;

static int read_positions(const opts_t *o)
{
    PGconn *c = PQconnectdb(o->dsn);
    PGresult *r;

    resume_at = calloc((size_t)o->partitions, sizeof(*resume_at));
    if (!resume_at)
        abort();
    r = PQexec(c, "SELECT partition, next_offset FROM tally.consumer_offsets"
                  " WHERE group_id = '" GROUP "' AND topic = '" TOPIC "'"
                  " AND next_offset IS NOT NULL");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "tally-pgstage: %s", PQerrorMessage(c));
        PQclear(r);
        PQfinish(c);
        return -1;
    }
    for (int i = 0; i < PQntuples(r); i++) {
        int p = atoi(PQgetvalue(r, i, 0));
        if (p >= 0 && p < o->partitions)
            resume_at[p] = strtoll(PQgetvalue(r, i, 1), NULL, 10);
    }
    PQclear(r);
    PQfinish(c);
    return 0;
}

static int load(const opts_t *o, stream_t *streams, usage_enum_t *tt,
                usage_enum_t *ops)
{
    FILE *fp = fopen(o->file, "r");
    char *line = NULL;
    size_t cap = 0, lines = 0, bad = 0;
    ssize_t len;
    uint64_t seed = 11;
    usage_event_t *ev = malloc(sizeof(*ev));
    batch_t *one = batch_new(1);
    usage_parse_ctx_t ctx = {
        .token_types = tt,
        .operations = ops,
        .now_us = o->now * 1000000LL,
        .dedupe_days = 35,
        .max_message_bytes = 1 << 20,
        .topic = TOPIC,
        .kafka_timestamp_ms = o->now * 1000LL,
    };

    if (!fp || !ev || !one) {
        fprintf(stderr, "tally-pgstage: %s: %s\n", o->file, strerror(errno));
        return -1;
    }
    while ((len = getline(&line, &cap, fp)) > 0 &&
           (o->limit == 0 || lines < o->limit)) {
        char err[256], source[96];
        stream_t *s;
        txn_t *t;
        int32_t part;
        int sn;

        if (line[len - 1] == '\n')
            line[--len] = '\0';
        lines++;
        /* First the stream: by tenant (disjoint) or at random
         * (overlapping); then a partition of that stream's share. */
        {
            const char *tp = strstr(line, "\"tenant_id\":\"");
            char tenant[160] = "";
            if (tp) {
                const char *q = strchr(tp + 13, '"');
                size_t n = q ? (size_t)(q - tp - 13) : 0;
                if (n < sizeof(tenant)) {
                    memcpy(tenant, tp + 13, n);
                    tenant[n] = '\0';
                }
            }
            sn = o->overlap ? (int)(rng(&seed) % (uint64_t)o->conns)
                            : (int)(fnv(tenant) % (uint64_t)o->conns);
        }
        s = &streams[sn];
        part = (int32_t)(sn + o->conns * (int)(rng(&seed) %
                                               (uint64_t)(o->partitions /
                                                          o->conns)));
        ctx.partition = part;
        ctx.offset = s->offsets[part]++;
        if (resume_at && ctx.offset < resume_at[part])
            continue; /* committed before the restart */
        if (usage_event_parse(line, (size_t)len, &ctx, ev, err,
                              sizeof(err)) != USAGE_OK) {
            bad++;
            continue;
        }
        snprintf(source, sizeof(source), "%s/%" PRId32 "/%" PRId64, TOPIC,
                 part, ctx.offset);
        t = stream_txn(s);
        if (o->design == D_WINDOW) {
            txn_stage_window(o, t, one, ev, source);
            t->events++;
        } else if (batch_add(t->batch, ev, source) == BATCH_ADDED) {
            if (o->design == D_BINARY)
                txn_stage_binary(t, batch_count(t->batch) - 1, ev, source);
            t->events++;
        }
        t->msgs++;
        txn_touch(t, part, ctx.offset + 1);
    }
    free(line);
    free(ev);
    batch_free(one);
    fclose(fp);
    /* Rows for the stage; the worker's batch itself only for real. */
    for (int i = 0; i < o->conns; i++) {
        for (size_t k = 0; k < streams[i].n_txns; k++) {
            txn_t *t = &streams[i].txns[k];
            if (o->design == D_ONEPASS || o->design == D_LEAN ||
                o->design == D_NOMONTH)
                txn_stage_text(t, o->design == D_LEAN);
            if (o->design == D_BINARY)
                buf_put_be(&t->stage, 0xffff, 2);
            if (o->design == D_WINDOW &&
                (t->n_chunks == 0 ||
                 t->chunk_ends[t->n_chunks - 1] < t->stage.len)) {
                t->chunk_ends = realloc(t->chunk_ends, (t->n_chunks + 1) *
                                                           sizeof(size_t));
                if (!t->chunk_ends)
                    abort();
                t->chunk_ends[t->n_chunks++] = t->stage.len;
            }
            if (o->design != D_REAL && o->design != D_WINDOW) {
                batch_free(t->batch);
                t->batch = NULL;
            }
        }
    }
    fprintf(stderr, "tally-pgstage: %zu lines (%zu not parsed)\n", lines,
            bad);
    return 0;
}

/* ---------------------------------------------------------------- */
/* SQL of the designs other than real                                 */

#define EV_COLS                                                          \
    "tenant_id, idempotency_key, occurred_at, token_type, operation,"    \
    " model, agent_id, conversation_id, collection_id, owner_tenant_id," \
    " tokens, prompt_tokens, completion_tokens, thoughts_tokens,"        \
    " cached_tokens, metadata, payload_hash"
#define SUMS_COLS                                                        \
    "tokens, prompt_tokens, completion_tokens, thoughts_tokens,"         \
    " cached_tokens, events"
#define SUMS_SET(t)                                                      \
    "tokens = " t ".tokens + EXCLUDED.tokens,"                           \
    " prompt_tokens = " t ".prompt_tokens + EXCLUDED.prompt_tokens,"     \
    " completion_tokens = " t ".completion_tokens"                       \
    " + EXCLUDED.completion_tokens,"                                     \
    " thoughts_tokens = " t ".thoughts_tokens + EXCLUDED.thoughts_tokens," \
    " cached_tokens = " t ".cached_tokens + EXCLUDED.cached_tokens,"     \
    " events = " t ".events + EXCLUDED.events,"                          \
    " updated_at = EXCLUDED.updated_at"
#define KEY6 "tenant_id, day, token_type, operation, model, agent_id"

/* The new events in key order (one lock order), their daily sums
 * aggregated by Postgres, upserted in key order, then the monthly ones
 * from the same deltas (joined with d's RETURNING, so that every daily
 * row is locked before any monthly one). %s: the source to insert from;
 * %s: ", source" or ""; %s: the monthly part or "". */
static const char *const onepass_head =
    "WITH ins AS ("
    " INSERT INTO tally.token_usage_events AS e (" EV_COLS "%s)"
    " SELECT " EV_COLS "%s FROM %s"
    " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
    " RETURNING e.tenant_id, e.idempotency_key, e.occurred_at,"
    " e.token_type, e.operation, e.model, e.agent_id, e.tokens,"
    " e.prompt_tokens, e.completion_tokens, e.thoughts_tokens,"
    " e.cached_tokens, e.payload_hash%s),"
    " agg AS (SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date"
    " AS day, token_type, operation, model,"
    " coalesce(agent_id, '') COLLATE \"C\" AS agent_id,"
    " sum(tokens)::bigint AS tokens,"
    " sum(prompt_tokens)::bigint AS prompt_tokens,"
    " sum(completion_tokens)::bigint AS completion_tokens,"
    " sum(thoughts_tokens)::bigint AS thoughts_tokens,"
    " sum(cached_tokens)::bigint AS cached_tokens,"
    " count(*) AS events FROM ins GROUP BY 1, 2, 3, 4, 5, 6),"
    " d AS (INSERT INTO tally.token_usage_daily AS t"
    " (" KEY6 ", " SUMS_COLS ", updated_at)"
    " SELECT " KEY6 ", " SUMS_COLS ", now() FROM agg ORDER BY 1, 2, 3, 4, 5, 6"
    " ON CONFLICT (" KEY6 ") DO UPDATE SET " SUMS_SET("t")
    " RETURNING t.tenant_id, t.day, t.token_type, t.operation, t.model,"
    " t.agent_id)%s ";

static const char *const onepass_month =
    ", m AS (INSERT INTO tally.token_usage_monthly AS t"
    " (tenant_id, month, token_type, operation, model, agent_id, "
    SUMS_COLS ", updated_at)"
    " SELECT a.tenant_id, date_trunc('month', a.day)::date, a.token_type,"
    " a.operation, a.model, a.agent_id, sum(a.tokens), sum(a.prompt_tokens),"
    " sum(a.completion_tokens), sum(a.thoughts_tokens),"
    " sum(a.cached_tokens), sum(a.events), now()"
    " FROM agg a JOIN d USING (" KEY6 ")"
    " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6"
    " ON CONFLICT (tenant_id, month, token_type, operation, model, agent_id)"
    " DO UPDATE SET " SUMS_SET("t") ")";

/* The events of the stage that were not inserted (counted before, or
 * lost a race), and whether the stored payload differs. Only those look
 * the events table up; it shows the rows before this statement. */
static const char *const onepass_tail_key =
    "SELECT s.seq, coalesce((SELECT x.payload_hash <> s.payload_hash"
    " FROM tally.token_usage_events x WHERE x.tenant_id = s.tenant_id"
    " AND x.idempotency_key = s.idempotency_key), false)"
    " FROM pgs_stage s WHERE NOT EXISTS (SELECT 1 FROM ins i"
    " WHERE i.tenant_id = s.tenant_id"
    " AND i.idempotency_key = s.idempotency_key)";

/* window: the stage holds duplicates too. Every row but the one inserted
 * (matched by its source, unique per message); a duplicate inside the
 * window compares with the copy inserted, others with the stored one. */
static const char *const onepass_tail_window =
    "SELECT w.seq, coalesce(coalesce(w.ihash, (SELECT x.payload_hash"
    " FROM tally.token_usage_events x WHERE x.tenant_id = w.tenant_id"
    " AND x.idempotency_key = w.idempotency_key)) <> w.payload_hash, false),"
    " w.isrc IS NOT NULL"
    " FROM (SELECT s.seq, s.tenant_id, s.idempotency_key, s.payload_hash,"
    " i.payload_hash AS ihash, i.source AS isrc FROM pgs_stage s"
    " LEFT JOIN ins i USING (tenant_id, idempotency_key)"
    " WHERE i.source IS DISTINCT FROM s.source) w";

static char *onepass_sql(design_t d)
{
    const char *from =
        d == D_WINDOW
            ? "(SELECT DISTINCT ON (tenant_id, idempotency_key) * FROM"
              " pgs_stage ORDER BY tenant_id, idempotency_key, seq) s"
            : "pgs_stage ORDER BY tenant_id, idempotency_key";
    const char *src = d == D_LEAN ? "" : ", source";
    const char *ret = d == D_WINDOW ? ", e.source" : "";
    size_t cap = strlen(onepass_head) + strlen(onepass_month) +
                 strlen(onepass_tail_window) + 512;
    char *sql = malloc(cap), *p = sql;
    if (!sql)
        abort();
    p += snprintf(p, cap, onepass_head, src, src, from, ret,
                  d == D_NOMONTH ? "" : onepass_month);
    snprintf(p, cap - (size_t)(p - sql), "%s",
             d == D_WINDOW ? onepass_tail_window : onepass_tail_key);
    return sql;
}

/* ---------------------------------------------------------------- */
/* Running                                                            */

static PGresult *pg_run(stream_t *s, const char *sql, int n,
                        const char *const *params, ExecStatusType want)
{
    PGresult *r = n ? PQexecParams(s->conn, sql, n, NULL, params, NULL,
                                   NULL, 0)
                    : PQexec(s->conn, sql);
    if (PQresultStatus(r) != want) {
        fprintf(stderr, "tally-pgstage: stream %d: %s\n  in: %.200s\n",
                s->id, PQresultErrorMessage(r), sql);
        PQclear(r);
        return NULL;
    }
    return r;
}

static int pg_ok(stream_t *s, const char *sql)
{
    PGresult *r = pg_run(s, sql, 0, NULL, PGRES_COMMAND_OK);
    PQclear(r);
    return r ? 0 : -1;
}

static int pg_copy(stream_t *s, const char *sql, const char *data,
                   size_t len)
{
    PGresult *r = pg_run(s, sql, 0, NULL, PGRES_COPY_IN);
    int rc = 0;
    if (!r)
        return -1;
    PQclear(r);
    for (size_t off = 0; off < len && rc == 0;) {
        size_t n = len - off > (1 << 20) ? (1 << 20) : len - off;
        if (PQputCopyData(s->conn, data + off, (int)n) != 1)
            rc = -1;
        off += n;
    }
    if (PQputCopyEnd(s->conn, NULL) != 1)
        rc = -1;
    while ((r = PQgetResult(s->conn)) != NULL) {
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            fprintf(stderr, "tally-pgstage: copy: %s",
                    PQresultErrorMessage(r));
            rc = -1;
        }
        PQclear(r);
    }
    return rc;
}

/* The fence, as store_commit_batch does it: positions move only where
 * the epoch is ours. */
static int pg_fence(stream_t *s, const txn_t *t)
{
    buf_t a[3] = {{0}};
    const char *params[4];
    PGresult *r;
    int rc = -1;

    for (int k = 0; k < 3; k++)
        buf_put(&a[k], "{", 1);
    for (size_t i = 0; i < t->n_parts; i++) {
        char num[3][32];
        snprintf(num[0], 32, "%s%" PRId32, i ? "," : "", t->parts[i]);
        snprintf(num[1], 32, "%s%" PRId64, i ? "," : "", t->next[i]);
        snprintf(num[2], 32, "%s%" PRId64, i ? "," : "",
                 s->epochs[t->parts[i]]);
        for (int k = 0; k < 3; k++)
            buf_put(&a[k], num[k], strlen(num[k]));
    }
    for (int k = 0; k < 3; k++) {
        buf_put(&a[k], "}", 2);
        params[k] = a[k].data;
    }
    params[3] = GROUP;
    r = pg_run(s,
               "UPDATE tally.consumer_offsets o"
               " SET next_offset = v.next_offset, updated_at = now()"
               " FROM unnest($1::int[], $2::bigint[], $3::bigint[])"
               " AS v(partition, next_offset, epoch)"
               " WHERE o.group_id = $4 AND o.topic = '" TOPIC "'"
               " AND o.partition = v.partition AND o.epoch = v.epoch",
               4, params, PGRES_COMMAND_OK);
    if (r && (size_t)atol(PQcmdTuples(r)) == t->n_parts)
        rc = 0;
    else if (r)
        fprintf(stderr, "tally-pgstage: fenced?\n");
    PQclear(r);
    for (int k = 0; k < 3; k++)
        free(a[k].data);
    return rc;
}

/* EXPLAIN (ANALYZE) of the statement, on stderr: where its time goes. */
static int explain(stream_t *s, const char *sql)
{
    char *q = malloc(strlen(sql) + 64);
    PGresult *r;
    if (!q)
        abort();
    sprintf(q, "EXPLAIN (ANALYZE, BUFFERS) %s", sql);
    r = pg_run(s, q, 0, NULL, PGRES_TUPLES_OK);
    free(q);
    if (!r)
        return -1;
    for (int i = 0; i < PQntuples(r); i++)
        fprintf(stderr, "%s\n", PQgetvalue(r, i, 0));
    PQclear(r);
    return 0;
}

static int commit_onepass(stream_t *s, txn_t *t, const char *sql)
{
    const char *copy =
        s->o->design == D_BINARY
            ? "COPY pgs_stage (seq, " EV_COLS ", source) FROM STDIN BINARY"
        : s->o->design == D_LEAN ? "COPY pgs_stage (seq, " EV_COLS
                                   ") FROM STDIN"
                                 : "COPY pgs_stage (seq, " EV_COLS
                                   ", source) FROM STDIN";
    PGresult *r;

    step_start(s);
    if (pg_ok(s, "BEGIN") == -1 || pg_fence(s, t) == -1)
        return -1;
    step_mark(s, "fence");
    if (s->o->design == D_WINDOW) {
        size_t from = 0;
        for (size_t c = 0; c < t->n_chunks; c++) {
            if (pg_copy(s, copy, t->stage.data + from,
                        t->chunk_ends[c] - from) == -1)
                return -1;
            from = t->chunk_ends[c];
        }
    } else if (pg_copy(s, copy, t->stage.data, t->stage.len) == -1) {
        return -1;
    }
    step_mark(s, "stage_copy");
    if (s->o->explain == t - s->txns && s->id == 0) {
        if (explain(s, sql) == -1)
            return -1;
        step_mark(s, "explain");
        return pg_ok(s, "COMMIT");
    }
    r = pg_run(s, sql, 0, NULL, PGRES_TUPLES_OK);
    if (!r)
        return -1;
    for (int i = 0; i < PQntuples(r); i++) {
        bool dup_in_window = PQnfields(r) > 2 &&
                             PQgetvalue(r, i, 2)[0] == 't';
        if (dup_in_window)
            s->window_dups++;
        else
            s->counted_before++;
        if (PQgetvalue(r, i, 1)[0] == 't')
            s->conflicts++;
    }
    PQclear(r);
    step_mark(s, "apply");
    if (pg_ok(s, "COMMIT") == -1)
        return -1;
    step_mark(s, "commit");
    return 0;
}

static store_position_t *txn_positions(const stream_t *s, const txn_t *t)
{
    store_position_t *pos = calloc(t->n_parts + 1, sizeof(*pos));
    if (!pos)
        abort();
    for (size_t i = 0; i < t->n_parts; i++) {
        pos[i].topic = TOPIC;
        pos[i].partition = t->parts[i];
        pos[i].next_offset = t->next[i];
        pos[i].epoch = s->epochs[t->parts[i]];
    }
    return pos;
}

/* Transactions [k, k + n) through the worker's store: one window of n
 * batches (n = 1: store_commit_batch()). A retry (a deadlock, a race)
 * starts the window again, as the worker would consume it again. */
static int commit_real(stream_t *s, size_t k, size_t n)
{
    char err[512] = "";
    store_status_t rc = STORE_RETRY;

    for (int attempt = 0; attempt < 100; attempt++) {
        size_t before = 0, conflicts = 0, buckets = 0;
        store_batch_result_t res;

        rc = STORE_OK;
        step_start(s);
        for (size_t i = k; i < k + n && rc == STORE_OK; i++) {
            store_position_t *pos = txn_positions(s, &s->txns[i]);
            rc = n == 1 ? store_commit_batch(s->store, s->txns[i].batch, pos,
                                             s->txns[i].n_parts, &res, err,
                                             sizeof(err))
                        : store_window_add(s->store, s->txns[i].batch, pos,
                                           s->txns[i].n_parts, &res, err,
                                           sizeof(err));
            free(pos);
            before += res.counted_before;
            conflicts += res.conflicts;
            buckets += res.buckets;
        }
        if (rc == STORE_OK && n > 1) {
            rc = store_window_commit(s->store, &res, err, sizeof(err));
            buckets = res.buckets;
        }
        if (rc == STORE_OK) {
            s->counted_before += before;
            s->conflicts += conflicts;
            s->buckets += buckets;
            return 0;
        }
        if (rc == STORE_RETRY && n > 1 &&
            !strcmp(store_last_sqlstate(s->store), "40P01"))
            s->deadlocks++;
        if (rc == STORE_SPLIT || (rc == STORE_RETRY && n > 1 &&
                                  !strcmp(store_last_sqlstate(s->store),
                                          "40P01"))) {
            /* Refused data, or a deadlock with another writer of the
             * same keys: the window again, a batch at a time (what a
             * consumer would do). */
            for (size_t i = k; i < k + n; i++)
                if (commit_real(s, i, 1) == -1)
                    return -1;
            return 0;
        }
        if (rc != STORE_RETRY)
            break;
        fprintf(stderr, "tally-pgstage: stream %d: retry: %s\n", s->id,
                err);
        s->retries++;
        if (store_connect(s->store, err, sizeof(err)) == -1)
            break;
        s->backend_pid = store_backend_pid(s->store);
    }
    fprintf(stderr, "tally-pgstage: stream %d: %s\n", s->id, err);
    return -1;
}

static int stream_connect(stream_t *s)
{
    char err[512];
    store_position_t *pos = calloc((size_t)s->o->partitions, sizeof(*pos));
    size_t n = 0;

    s->store = store_new(s->o->dsn, GROUP, "pgstage");
    if (!pos || !s->store || store_connect(s->store, err, sizeof(err))) {
        fprintf(stderr, "tally-pgstage: %s\n", err);
        return -1;
    }
    for (int p = s->id; p < s->o->partitions; p += s->o->conns) {
        pos[n].topic = TOPIC;
        pos[n++].partition = p;
    }
    if (store_claim(s->store, pos, n, err, sizeof(err)) != STORE_OK) {
        fprintf(stderr, "tally-pgstage: claim: %s\n", err);
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        s->epochs[pos[i].partition] = pos[i].epoch;
    free(pos);
    if (s->o->design == D_REAL) {
        store_set_step_hook(s->store, step_mark, s);
        s->backend_pid = store_backend_pid(s->store);
        return 0;
    }
    s->conn = PQconnectdb(s->o->dsn);
    if (PQstatus(s->conn) != CONNECTION_OK) {
        fprintf(stderr, "tally-pgstage: %s", PQerrorMessage(s->conn));
        return -1;
    }
    s->backend_pid = PQbackendPID(s->conn);
    /* tally's session (store_connect), and the stage. */
    if (pg_ok(s, "SET client_min_messages = warning;"
                 "SET statement_timeout = '120s';"
                 "SET lock_timeout = '15s';"
                 "SET TIME ZONE 'UTC';"
                 "SET work_mem = '32MB';"
                 "SET temp_buffers = '64MB';"
                 "SET jit = off") == -1 ||
        pg_ok(s, s->o->sync_commit ? "SET synchronous_commit = on"
                                   : "SET synchronous_commit = off") == -1 ||
        pg_ok(s, "CREATE TEMP TABLE pgs_stage (seq integer,"
                 " LIKE tally.token_usage_events INCLUDING DEFAULTS)"
                 " ON COMMIT DELETE ROWS") == -1)
        return -1;
    return 0;
}

static void *stream_main(void *arg)
{
    stream_t *s = arg;
    char *sql = s->o->design == D_REAL ? NULL : onepass_sql(s->o->design);

    pthread_barrier_wait(s->barrier);
    for (size_t k = 0; k < s->n_txns && !s->failed;) {
        size_t n = s->o->design == D_REAL ? s->o->window : 1;
        if (n > s->n_txns - k)
            n = s->n_txns - k;
        if ((s->o->design == D_REAL ? commit_real(s, k, n)
                                    : commit_onepass(s, &s->txns[k], sql)) ==
            -1)
            s->failed = 1;
        k += n;
        if (s->o->pause_ms > 0) {
            struct timespec ts = {s->o->pause_ms / 1000,
                                  s->o->pause_ms % 1000 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    free(sql);
    pthread_barrier_wait(s->barrier);
    return NULL;
}

static void usage(FILE *fp)
{
    fprintf(fp,
            "usage: tally-pgstage --file EVENTS.jsonl [options]\n"
            "  --design NAME    real|onepass|binary|lean|nomonth|window\n"
            "  --batch N        messages per transaction (10000)\n"
            "  --conns C        connections in parallel (1)\n"
            "  --overlap        streams share tenants (default: split by\n"
            "                   tenant, disjoint sum rows)\n"
            "  --partitions P   (64)\n"
            "  --now EPOCH      the parser's clock (tally-gen's --now)\n"
            "  --pg-pid PID     the postmaster, for the cluster's CPU\n"
            "  --sync-commit    synchronous_commit on (tally: off)\n"
            "  --chunk N        window: rows per COPY chunk (2000)\n"
            "  --limit N        at most N lines\n"
            "  --explain K      EXPLAIN ANALYZE transaction K's statement\n"
            "  --window W       real: W batches of --batch messages a\n"
            "                   transaction (store_window_add/commit)\n"
            "  --resume         skip what was committed before (the\n"
            "                   positions of a run that was killed)\n"
            "  --pause-ms N     sleep N ms between transactions\n"
            "  --dsn DSN        (TALLY_PG_DSN)\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"file", 1, NULL, 'f'},      {"design", 1, NULL, 'd'},
        {"batch", 1, NULL, 'b'},     {"conns", 1, NULL, 'c'},
        {"overlap", 0, NULL, 'o'},   {"partitions", 1, NULL, 'p'},
        {"now", 1, NULL, 'n'},       {"pg-pid", 1, NULL, 'P'},
        {"sync-commit", 0, NULL, 's'}, {"chunk", 1, NULL, 'k'},
        {"limit", 1, NULL, 'l'},     {"dsn", 1, NULL, 'D'},
        {"explain", 1, NULL, 'x'},   {"window", 1, NULL, 'w'},
        {"resume", 0, NULL, 'r'},    {"pause-ms", 1, NULL, 'z'},
        {"help", 0, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    opts_t o = {.batch = 10000, .conns = 1, .partitions = 64,
                .now = (int64_t)time(NULL), .chunk = 2000,
                .design_name = "real", .explain = -1, .window = 1};
    stream_t streams[MAX_CONNS];
    pthread_t th[MAX_CONNS];
    pthread_barrier_t barrier;
    usage_enum_t tt, ops;
    store_t *setup;
    char err[512];
    uint64_t t0, t1;
    double cpu0, cpu1, secs;
    size_t msgs = 0, events = 0, txns = 0, before = 0, conflicts = 0,
           wdups = 0, retries = 0, deadlocks = 0;
    int c, failed = 0;

    o.dsn = getenv("TALLY_PG_DSN") ? getenv("TALLY_PG_DSN") : "";
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'f': o.file = optarg; break;
        case 'd': o.design_name = optarg; break;
        case 'b': o.batch = strtoul(optarg, NULL, 10); break;
        case 'c': o.conns = atoi(optarg); break;
        case 'o': o.overlap = true; break;
        case 'p': o.partitions = atoi(optarg); break;
        case 'n': o.now = strtoll(optarg, NULL, 10); break;
        case 'P': o.pg_pid = strtol(optarg, NULL, 10); break;
        case 's': o.sync_commit = true; break;
        case 'k': o.chunk = strtoul(optarg, NULL, 10); break;
        case 'l': o.limit = strtoul(optarg, NULL, 10); break;
        case 'D': o.dsn = optarg; break;
        case 'x': o.explain = strtol(optarg, NULL, 10); break;
        case 'w': o.window = strtoul(optarg, NULL, 10); break;
        case 'r': o.resume = true; break;
        case 'z': o.pause_ms = strtol(optarg, NULL, 10); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    for (c = 0; c < (int)(sizeof(design_names) / sizeof(*design_names)); c++)
        if (!strcmp(o.design_name, design_names[c]))
            break;
    if (!o.file || o.batch == 0 || o.conns < 1 || o.conns > MAX_CONNS ||
        o.window < 1 || o.window > STORE_WINDOW_MAX_BATCHES ||
        o.partitions % o.conns != 0 || o.chunk == 0 ||
        c == (int)(sizeof(design_names) / sizeof(*design_names))) {
        usage(stderr);
        return 2;
    }
    o.design = (design_t)c;
    log_set_level(LOG_LVL_WARN);

    setup = store_new(o.dsn, GROUP, "pgstage");
    if (store_connect(setup, err, sizeof(err)) == -1 ||
        store_read_enums(setup, &tt, &ops, err, sizeof(err)) == -1) {
        fprintf(stderr, "tally-pgstage: %s\n", err);
        return 1;
    }
    store_free(setup);

    memset(streams, 0, sizeof(streams));
    pthread_barrier_init(&barrier, NULL, (unsigned)o.conns + 1);
    for (int i = 0; i < o.conns; i++) {
        streams[i].o = &o;
        streams[i].id = i;
        streams[i].barrier = &barrier;
        streams[i].offsets = calloc((size_t)o.partitions, sizeof(int64_t));
        streams[i].epochs = calloc((size_t)o.partitions, sizeof(int64_t));
        if (!streams[i].offsets || !streams[i].epochs)
            abort();
    }
    if ((o.resume && read_positions(&o) == -1) ||
        load(&o, streams, &tt, &ops) == -1)
        return 1;
    for (int i = 0; i < o.conns; i++) {
        if (stream_connect(&streams[i]) == -1)
            return 1;
        pthread_create(&th[i], NULL, stream_main, &streams[i]);
    }
    cpu0 = cluster_cpu_s(o.pg_pid);
    t0 = now_ns();
    pthread_barrier_wait(&barrier); /* go */
    pthread_barrier_wait(&barrier); /* all done */
    t1 = now_ns();
    cpu1 = cluster_cpu_s(o.pg_pid);
    secs = (double)(t1 - t0) / 1e9;

    /* Steps summed over the streams, by name. */
    {
        steps_t all = {{0}, {0}, {0}, 0};
        uint64_t backend_ns = 0;
        for (int i = 0; i < o.conns; i++) {
            stream_t *s = &streams[i];
            pthread_join(th[i], NULL);
            failed |= s->failed;
            for (size_t k = 0; k < s->n_txns; k++) {
                msgs += s->txns[k].msgs;
                events += s->txns[k].events;
            }
            txns += s->n_txns;
            before += s->counted_before;
            conflicts += s->conflicts;
            wdups += s->window_dups;
            retries += s->retries;
            deadlocks += s->deadlocks;
            for (int j = 0; j < s->steps.n; j++) {
                int a;
                for (a = 0; a < all.n; a++)
                    if (!strcmp(all.names[a], s->steps.names[j]))
                        break;
                if (a == all.n)
                    all.names[all.n++] = s->steps.names[j];
                all.wall_ns[a] += s->steps.wall_ns[j];
                all.cpu_ns[a] += s->steps.cpu_ns[j];
                backend_ns += s->steps.cpu_ns[j];
            }
        }
        printf("{\"design\":\"%s\",\"batch\":%zu,\"window\":%zu,"
               "\"conns\":%d,"
               "\"split\":\"%s\",\"sync_commit\":%s,\"messages\":%zu,"
               "\"events_in_batches\":%zu,\"transactions\":%zu,"
               "\"counted_before\":%zu,\"window_duplicates\":%zu,"
               "\"conflicts\":%zu,\"retries\":%zu,"
               "\"window_deadlocks\":%zu,\"seconds\":%.3f,"
               "\"msgs_per_s\":%.0f,\"pg_cpu_s\":%.2f,"
               "\"pg_cpu_us_per_msg\":%.2f,\"backend_cpu_us_per_msg\":%.2f,"
               "\"steps\":{",
               o.design_name, o.batch, o.window, o.conns,
               o.conns == 1 ? "-" : o.overlap ? "overlap" : "disjoint",
               o.sync_commit ? "true" : "false", msgs, events, txns, before,
               wdups, conflicts, retries, deadlocks, secs,
               (double)msgs / secs,
               cpu1 - cpu0, (cpu1 - cpu0) * 1e6 / (double)msgs,
               (double)backend_ns / 1e3 / (double)msgs);
        for (int a = 0; a < all.n; a++)
            printf("%s\"%s\":{\"wall_us\":%.2f,\"cpu_us\":%.2f}",
                   a ? "," : "", all.names[a],
                   (double)all.wall_ns[a] / 1e3 / (double)msgs,
                   (double)all.cpu_ns[a] / 1e3 / (double)msgs);
        printf("}}\n");
    }
    for (int i = 0; i < o.conns; i++) {
        stream_t *s = &streams[i];
        for (size_t k = 0; k < s->n_txns; k++) {
            batch_free(s->txns[k].batch);
            free(s->txns[k].stage.data);
            free(s->txns[k].chunk_ends);
            free(s->txns[k].parts);
            free(s->txns[k].next);
        }
        free(s->txns);
        free(s->offsets);
        free(s->epochs);
        store_free(s->store);
        if (s->conn)
            PQfinish(s->conn);
    }
    pthread_barrier_destroy(&barrier);
    free(resume_at);
    return failed ? 1 : 0;
}
