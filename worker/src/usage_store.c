/* Postgres: migrations, enums, partition claims and batch commits (libpq). */
#include "usage_store.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "copy_buf.h"
#include "fault.h"
#include "log.h"
#include "migrations.h"
#include "usage_agg.h"

/* Taken around migrations: "tally" in ASCII. */
#define MIGRATE_LOCK_ID 0x74616c6c79LL

/* A parameter array in Postgres's binary format (pg_array_begin()). */
typedef struct pg_array {
    copy_buf_t buf;
    size_t n; /* elements */
} pg_array_t;
#define KEY_ARRAYS 4

struct store {
    char *dsn;
    char *group;
    char *owner;
    PGconn *conn;
    bool session_ready; /* temp tables created on this connection */
    char sqlstate[6];   /* of the last failed statement; "" if none */
    size_t window_batches; /* in the open window's transaction */
    bool stage_rows_used;  /* tally_stage_rows holds rows (a race) */
    /* The dedupe probe's parameters (store_key_arrays()), kept between
     * batches: seq, tenant_id, idempotency_key, payload_hash. */
    pg_array_t *keys;
    agg_t *window_agg;     /* the sums of a window of several batches */
    agg_t *pending;        /* the sums to upsert when the window ends */
    usage_enum_t token_types, operations; /* in Postgres's order */
    bool enums_read;
    store_step_fn step_fn; /* benchmarks: called after each step */
    void *step_arg;
};

void store_set_step_hook(store_t *st, store_step_fn fn, void *arg)
{
    st->step_fn = fn;
    st->step_arg = arg;
}

int store_backend_pid(const store_t *st)
{
    return st->conn ? PQbackendPID(st->conn) : 0;
}

static void store_step(store_t *st, const char *step)
{
    if (st->step_fn)
        st->step_fn(st->step_arg, step);
}

/* The other uses of the connection must not land inside an open window's
 * transaction. */
static bool store_busy(const store_t *st, char *errstr, size_t errstr_size)
{
    if (st->window_batches == 0)
        return false;
    snprintf(errstr, errstr_size, "postgres: a window is open");
    return true;
}

/* Keeps the SQLSTATE of a failed result (none for a lost connection). */
static void store_note_sqlstate(store_t *st, const PGresult *res)
{
    const char *state =
        res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    snprintf(st->sqlstate, sizeof(st->sqlstate), "%s", state ? state : "");
}

/* True when the last failure was Postgres refusing the data itself
 * (classes 22 data exception, 23 integrity constraint, 54 program limit,
 * e.g. a sum past the bigint range), on a connection that still works:
 * committing the same rows again would fail again. Anything else
 * (connection lost, deadlock, timeout, shutdown) is worth a retry. */
static bool store_data_error(const store_t *st)
{
    if (!st->conn || PQstatus(st->conn) != CONNECTION_OK)
        return false;
    if (!strcmp(st->sqlstate, "23505")) /* a race: retried as such */
        return false;
    return !strncmp(st->sqlstate, "22", 2) ||
           !strncmp(st->sqlstate, "23", 2) ||
           !strncmp(st->sqlstate, "54", 2);
}

/* ---------------------------------------------------------------- */
/* Connection                                                         */

store_t *store_new(const char *dsn, const char *group, const char *owner)
{
    store_t *st = calloc(1, sizeof(*st));
    if (!st)
        return NULL;
    st->dsn = strdup(dsn ? dsn : "");
    st->group = strdup(group);
    st->owner = strdup(owner);
    return st;
}

void store_disconnect(store_t *st)
{
    if (st->conn) {
        PQfinish(st->conn);
        st->conn = NULL;
    }
    st->session_ready = false;
    st->window_batches = 0; /* its transaction went with the connection */
}

void store_free(store_t *st)
{
    if (!st)
        return;
    store_disconnect(st);
    agg_free(st->window_agg);
    for (int i = 0; st->keys && i < KEY_ARRAYS; i++)
        copy_buf_free(&st->keys[i].buf);
    free(st->keys);
    free(st->dsn);
    free(st->group);
    free(st->owner);
    free(st);
}

bool store_is_connected(const store_t *st)
{
    return st->conn && PQstatus(st->conn) == CONNECTION_OK;
}

/* Copies libpq's message without its trailing newline. */
static void store_error(char *errstr, size_t errstr_size, const char *what,
                        const char *msg)
{
    size_t n;
    snprintf(errstr, errstr_size, "%s: %s", what, msg ? msg : "?");
    /* One log line: libpq's "\n\tIs the server running..." joined. */
    for (char *p = errstr; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
    n = strlen(errstr);
    while (n > 0 && (errstr[n - 1] == '\n' || errstr[n - 1] == ' '))
        errstr[--n] = '\0';
}

/* Runs a statement that returns no rows we need; -1 with errstr. A failed
 * connection is dropped so that the next store_connect() starts anew. */
static int store_exec(store_t *st, const char *sql, char *errstr,
                      size_t errstr_size)
{
    PGresult *res = PQexec(st->conn, sql);
    ExecStatusType s = PQresultStatus(res);
    int rc = 0;

    if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
        store_error(errstr, errstr_size, "postgres",
                    PQresultErrorMessage(res));
        store_note_sqlstate(st, res);
        rc = -1;
    }
    PQclear(res);
    return rc;
}

/* `res` if its status is `want`; otherwise NULL (res cleared), with
 * errstr "what: message" and the SQLSTATE noted. */
static PGresult *store_checked(store_t *st, PGresult *res, const char *what,
                               ExecStatusType want, char *errstr,
                               size_t errstr_size)
{
    if (PQresultStatus(res) == want)
        return res;
    store_error(errstr, errstr_size, what, PQresultErrorMessage(res));
    store_note_sqlstate(st, res);
    PQclear(res);
    return NULL;
}

/* Runs `sql` (with n_params text parameters) and returns its result if
 * its status is `want`; otherwise NULL, with errstr "what: message". The
 * caller PQclear()s the result, and recovers the connection on failure. */
static PGresult *store_query(store_t *st, const char *what, const char *sql,
                             int n_params, const char *const *params,
                             ExecStatusType want, char *errstr,
                             size_t errstr_size)
{
    PGresult *res = n_params > 0
                        ? PQexecParams(st->conn, sql, n_params, NULL, params,
                                       NULL, NULL, 0)
                        : PQexec(st->conn, sql);
    return store_checked(st, res, what, want, errstr, errstr_size);
}

/* A statement with parameters in the binary format (see pg_array_t). */
static PGresult *store_query_bin(store_t *st, const char *what,
                                 const char *sql, int n_params,
                                 const Oid *types, const char *const *values,
                                 const int *lengths, ExecStatusType want,
                                 char *errstr, size_t errstr_size)
{
    int formats[8];
    PGresult *res;

    if (n_params > (int)(sizeof(formats) / sizeof(formats[0])))
        abort(); /* a programming error */
    for (int i = 0; i < n_params; i++)
        formats[i] = 1;
    res = PQexecParams(st->conn, sql, n_params, types, values, lengths,
                       formats, 0);
    return store_checked(st, res, what, want, errstr, errstr_size);
}

/* A one-dimensional array without NULLs in Postgres's binary format
 * (array_recv()): a header, then each element's length and bytes, in
 * network byte order. The dedupe probe sends the batch's keys this way,
 * as parameters: no temp table to COPY them into and truncate again for
 * each batch of a window (the TRUNCATE alone cost 2.8 ms a batch, 8% of
 * Postgres's time in a run), and no quoting of keys. pg_array_t is
 * declared above struct store, which keeps the probe's arrays. */
#define PG_OID_INT4 23
#define PG_OID_INT8 20
#define PG_OID_TEXT 25
#define PG_OID_INT4_ARRAY 1007
#define PG_OID_INT8_ARRAY 1016
#define PG_OID_TEXT_ARRAY 1009

static void pg_put_u32(copy_buf_t *b, uint32_t v)
{
    uint32_t be = htonl(v);
    copy_buf_put(b, &be, 4);
}

/* Starts an array of `elem_oid` elements (its length is set by
 * pg_array_end()). */
static void pg_array_begin(pg_array_t *a, uint32_t elem_oid)
{
    a->buf.len = 0;
    a->n = 0;
    pg_put_u32(&a->buf, 1); /* dimensions */
    pg_put_u32(&a->buf, 0); /* flags: no NULLs */
    pg_put_u32(&a->buf, elem_oid);
    pg_put_u32(&a->buf, 0); /* length, below */
    pg_put_u32(&a->buf, 1); /* lower bound */
}

static void pg_array_put(pg_array_t *a, const void *p, size_t len)
{
    pg_put_u32(&a->buf, (uint32_t)len);
    copy_buf_put(&a->buf, p, len);
    a->n++;
}

static void pg_array_put_i32(pg_array_t *a, int32_t v)
{
    pg_put_u32(&a->buf, 4);
    pg_put_u32(&a->buf, (uint32_t)v);
    a->n++;
}

static void pg_array_put_i64(pg_array_t *a, int64_t v)
{
    pg_put_u32(&a->buf, 8);
    pg_put_u32(&a->buf, (uint32_t)((uint64_t)v >> 32));
    pg_put_u32(&a->buf, (uint32_t)v);
    a->n++;
}

static void pg_array_end(pg_array_t *a)
{
    uint32_t be = htonl((uint32_t)a->n);
    memcpy(a->buf.data + 12, &be, 4); /* the dimension's length */
}

/* After a failure: roll back if the connection still works, drop it
 * otherwise. */
static void store_recover(store_t *st)
{
    if (!st->conn)
        return;
    if (PQstatus(st->conn) != CONNECTION_OK) {
        store_disconnect(st);
        return;
    }
    if (PQtransactionStatus(st->conn) != PQTRANS_IDLE) {
        PGresult *res = PQexec(st->conn, "ROLLBACK");
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            store_disconnect(st);
        PQclear(res);
    }
}

/* The temp tables a batch goes through, created once per session. */
static const char *const session_sql =
    "CREATE TEMP TABLE IF NOT EXISTS tally_stage_rows"
    " (LIKE tally.token_usage_events INCLUDING DEFAULTS)"
    " ON COMMIT DELETE ROWS;"
    "CREATE TEMP TABLE IF NOT EXISTS tally_agg ("
    " tenant_id text COLLATE \"C\", day integer, token_type text,"
    " operation text,"
    " model text COLLATE \"C\", agent_id text COLLATE \"C\","
    " tokens bigint, prompt_tokens bigint,"
    " completion_tokens bigint, thoughts_tokens bigint,"
    " cached_tokens bigint, events bigint) ON COMMIT DELETE ROWS;"
    /* The same columns, `day` the first of the month. */
    "CREATE TEMP TABLE IF NOT EXISTS tally_magg (LIKE tally_agg)"
    " ON COMMIT DELETE ROWS;";

int store_connect(store_t *st, char *errstr, size_t errstr_size)
{
    const char *keys[] = {"connect_timeout", "application_name",
                          "keepalives_idle", "keepalives_interval",
                          "keepalives_count", "dbname", NULL};
    const char *vals[] = {"10", "tally", "10", "5", "3", st->dsn, NULL};

    if (store_is_connected(st))
        return 0;
    store_disconnect(st);
    st->conn = PQconnectdbParams(keys, vals, 1);
    if (!st->conn || PQstatus(st->conn) != CONNECTION_OK) {
        store_error(errstr, errstr_size, "postgres connect",
                    st->conn ? PQerrorMessage(st->conn) : "out of memory");
        store_disconnect(st);
        return -1;
    }
    /* Quiet the NOTICEs of "IF NOT EXISTS". Bounded waits: a member
     * frozen inside a transaction (a zombie) must not hold a claim up
     * for long; our own transactions never sit idle. */
    if (store_exec(st,
                   "SET client_min_messages = warning;"
                   "SET statement_timeout = '120s';"
                   "SET lock_timeout = '15s';"
                   "SET idle_in_transaction_session_timeout = '30s';"
                   "SET TIME ZONE 'UTC';"
                   /* Safe: positions commit in the same transactions
                    * as the sums, so a commit lost in a Postgres crash
                    * is lost with its positions and consumed again. */
                   "SET synchronous_commit = off;"
                   /* The batch statements' sorts and aggregates in
                    * memory, the temp tables in local buffers (set
                    * before the session's first temp table); no JIT
                    * (the plans are cheap, its compilation is not). */
                   "SET work_mem = '32MB';"
                   "SET temp_buffers = '64MB';"
                   "SET jit = off",
                   errstr, errstr_size) == -1) {
        store_disconnect(st);
        return -1;
    }
    return 0;
}

int store_ping(store_t *st, char *errstr, size_t errstr_size)
{
    if (store_connect(st, errstr, errstr_size) == -1)
        return -1;
    if (st->window_batches > 0)
        return 0; /* in use: it answers */
    if (store_exec(st, "SELECT 1", errstr, errstr_size) == -1) {
        store_recover(st);
        return -1;
    }
    return 0;
}

/* The temp tables need the session; created lazily before a batch. */
static int store_prepare_session(store_t *st, char *errstr,
                                 size_t errstr_size)
{
    if (st->session_ready)
        return 0;
    if (store_exec(st, session_sql, errstr, errstr_size) == -1) {
        store_recover(st);
        return -1;
    }
    if (!st->enums_read &&
        store_read_enums(st, NULL, NULL, errstr, errstr_size) == -1)
        return -1;
    st->session_ready = true;
    return 0;
}

/* ---------------------------------------------------------------- */
/* Migrations                                                         */

int store_migrate(store_t *st, int *applied, char *errstr,
                  size_t errstr_size)
{
    char sql[256];
    int rc = -1;

    *applied = 0;
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_lock(%lld)",
             MIGRATE_LOCK_ID);
    if (store_exec(st, sql, errstr, errstr_size) == -1)
        goto out;
    if (store_exec(st,
                   "CREATE SCHEMA IF NOT EXISTS tally;"
                   "CREATE TABLE IF NOT EXISTS tally.schema_migrations ("
                   " version text PRIMARY KEY,"
                   " applied_at timestamptz NOT NULL DEFAULT now())",
                   errstr, errstr_size) == -1)
        goto unlock;
    for (size_t i = 0; i < migrations_count; i++) {
        const migration_t *m = &migrations[i];
        const char *params[] = {m->name};
        PGresult *res = store_query(
            st, "postgres",
            "SELECT 1 FROM tally.schema_migrations WHERE version = $1", 1,
            params, PGRES_TUPLES_OK, errstr, errstr_size);
        int done;

        if (!res)
            goto unlock;
        done = PQntuples(res) > 0;
        PQclear(res);
        if (done)
            continue;
        if (store_exec(st, "BEGIN", errstr, errstr_size) == -1)
            goto unlock;
        if (store_exec(st, m->sql, errstr, errstr_size) == -1) {
            char detail[512];
            snprintf(detail, sizeof(detail), "%s", errstr);
            snprintf(errstr, errstr_size, "migration %s: %s", m->name,
                     detail);
            store_recover(st);
            goto unlock;
        }
        res = store_query(st, "postgres",
                          "INSERT INTO tally.schema_migrations (version) "
                          "VALUES ($1)",
                          1, params, PGRES_COMMAND_OK, errstr, errstr_size);
        if (!res) {
            store_recover(st);
            goto unlock;
        }
        PQclear(res);
        if (store_exec(st, "COMMIT", errstr, errstr_size) == -1) {
            store_recover(st);
            goto unlock;
        }
        log_info("migration %s applied", m->name);
        (*applied)++;
    }
    rc = 0;
unlock:
    if (st->conn && PQstatus(st->conn) == CONNECTION_OK) {
        char e2[256];
        snprintf(sql, sizeof(sql), "SELECT pg_advisory_unlock(%lld)",
                 MIGRATE_LOCK_ID);
        store_exec(st, sql, e2, sizeof(e2));
    }
out:
    if (rc == -1)
        store_recover(st);
    return rc;
}

/* ---------------------------------------------------------------- */
/* Reading settings                                                   */

static int store_read_enum(store_t *st, const char *type, usage_enum_t *e,
                           char *errstr, size_t errstr_size)
{
    char sql[256];
    PGresult *res;
    int rc = -1;

    snprintf(sql, sizeof(sql),
             "SELECT unnest(enum_range(NULL::%s))::text", type);
    res = store_query(st, type, sql, 0, NULL, PGRES_TUPLES_OK, errstr,
                      errstr_size);
    if (!res)
        goto out;
    e->n = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *v = PQgetvalue(res, i, 0);
        if (e->n >= USAGE_ENUM_VALUES_MAX || strlen(v) > USAGE_ENUM_MAX) {
            snprintf(errstr, errstr_size, "%s: too many or too long values",
                     type);
            goto out;
        }
        snprintf(e->values[e->n++], sizeof(e->values[0]), "%s", v);
    }
    rc = 0;
out:
    PQclear(res);
    if (rc == -1)
        store_recover(st);
    return rc;
}

/* The store keeps its own copy, in Postgres's order, to sort the sums by
 * the tables' keys (agg_daily_rows()). */
int store_read_enums(store_t *st, usage_enum_t *token_types,
                     usage_enum_t *operations, char *errstr,
                     size_t errstr_size)
{
    if (store_read_enum(st, "tally.token_type", &st->token_types, errstr,
                        errstr_size) == -1 ||
        store_read_enum(st, "tally.operation_type", &st->operations, errstr,
                        errstr_size) == -1)
        return -1;
    st->enums_read = true;
    if (token_types)
        *token_types = st->token_types;
    if (operations)
        *operations = st->operations;
    return 0;
}

int store_read_dedupe_days(store_t *st, int *days, char *errstr,
                           size_t errstr_size)
{
    PGresult *res = store_query(st, "postgres",
                                "SELECT value FROM tally.settings"
                                " WHERE name = 'dedupe_days'",
                                0, NULL, PGRES_TUPLES_OK, errstr,
                                errstr_size);
    if (!res) {
        store_recover(st);
        return -1;
    }
    *days = PQntuples(res) ? atoi(PQgetvalue(res, 0, 0)) : -1;
    PQclear(res);
    return 0;
}

/* ---------------------------------------------------------------- */
/* Positions                                                          */

/* Appends `s` as a quoted element of a Postgres array literal. */
static void array_put_text(char **p, char *end, const char *s, bool first)
{
    if (!first && *p < end)
        *(*p)++ = ',';
    if (*p < end)
        *(*p)++ = '"';
    for (; *s && *p < end - 2; s++) {
        if (*s == '"' || *s == '\\')
            *(*p)++ = '\\';
        *(*p)++ = *s;
    }
    if (*p < end)
        *(*p)++ = '"';
}

/* Builds the array literals {topics}, {partitions}, {offsets}, {epochs}
 * of `pos`. The caller frees *buf. */
static void positions_arrays(const store_position_t *pos, size_t n,
                             char **buf, const char *params[4])
{
    size_t cap = 64 + n * 320;
    char *b = malloc(cap * 4), *p, *end;
    if (!b)
        abort();
    for (int k = 0; k < 4; k++) {
        p = b + cap * (size_t)k;
        end = p + cap - 2;
        params[k] = p;
        *p++ = '{';
        for (size_t i = 0; i < n; i++) {
            char num[32];
            if (k == 0) {
                array_put_text(&p, end, pos[i].topic, i == 0);
                continue;
            }
            snprintf(num, sizeof(num), "%s%" PRId64, i ? "," : "",
                     k == 1   ? (int64_t)pos[i].partition
                     : k == 2 ? pos[i].next_offset
                              : pos[i].epoch);
            for (const char *c = num; *c && p < end; c++)
                *p++ = *c;
        }
        *p++ = '}';
        *p = '\0';
    }
    *buf = b;
}

static size_t position_find(const store_position_t *pos, size_t n,
                            const char *topic, int32_t partition)
{
    for (size_t i = 0; i < n; i++)
        if (pos[i].partition == partition && !strcmp(pos[i].topic, topic))
            return i;
    return n;
}

store_status_t store_claim(store_t *st, store_position_t *pos, size_t n,
                           char *errstr, size_t errstr_size)
{
    const char *params[6];
    char *arrays = NULL;
    PGresult *res = NULL;
    store_status_t rc = STORE_RETRY;

    if (n == 0)
        return STORE_OK;
    if (store_busy(st, errstr, errstr_size))
        return STORE_RETRY;
    positions_arrays(pos, n, &arrays, params);
    params[2] = st->group;
    params[3] = st->owner;
    res = store_query(
        st, "postgres claim",
        "INSERT INTO tally.consumer_offsets AS o"
        " (group_id, topic, partition, next_offset, epoch, owner)"
        " SELECT $3, v.topic, v.partition, NULL, 1, $4"
        " FROM unnest($1::text[], $2::int[]) AS v(topic, partition)"
        " ORDER BY v.topic, v.partition"
        " ON CONFLICT (group_id, topic, partition) DO UPDATE"
        " SET epoch = o.epoch + 1, owner = EXCLUDED.owner,"
        " claimed_at = now()"
        " RETURNING o.topic, o.partition, o.next_offset, o.epoch",
        4, params, PGRES_TUPLES_OK, errstr, errstr_size);
    if (!res) {
        store_recover(st);
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        size_t i = position_find(pos, n, PQgetvalue(res, r, 0),
                                 atoi(PQgetvalue(res, r, 1)));
        if (i == n)
            continue;
        pos[i].next_offset = PQgetisnull(res, r, 2)
                                 ? -1
                                 : strtoll(PQgetvalue(res, r, 2), NULL, 10);
        pos[i].epoch = strtoll(PQgetvalue(res, r, 3), NULL, 10);
    }
    rc = STORE_OK;
out:
    PQclear(res);
    free(arrays);
    return rc;
}

store_status_t store_init_position(store_t *st, const store_position_t *pos,
                                   char *errstr, size_t errstr_size)
{
    char part[16], off[32], epoch[32];
    const char *params[] = {st->group, pos->topic, part, off, epoch};
    PGresult *res;
    store_status_t rc = STORE_OK;

    if (store_busy(st, errstr, errstr_size))
        return STORE_RETRY;
    snprintf(part, sizeof(part), "%" PRId32, pos->partition);
    snprintf(off, sizeof(off), "%" PRId64, pos->next_offset);
    snprintf(epoch, sizeof(epoch), "%" PRId64, pos->epoch);
    res = store_query(st, "postgres position",
                      "UPDATE tally.consumer_offsets SET next_offset = $4,"
                      " updated_at = now() WHERE group_id = $1"
                      " AND topic = $2 AND partition = $3::int"
                      " AND epoch = $5::bigint AND next_offset IS NULL",
                      5, params, PGRES_COMMAND_OK, errstr, errstr_size);
    if (!res) {
        store_recover(st);
        return STORE_RETRY;
    }
    if (strcmp(PQcmdTuples(res), "1") != 0) {
        snprintf(errstr, errstr_size, "fenced while setting the position");
        rc = STORE_FENCED;
    }
    PQclear(res);
    return rc;
}

/* ---------------------------------------------------------------- */
/* Batch commit                                                       */

/* COPY ... FROM STDIN in three steps, so that rows can come from several
 * places. store_copy_end() returns -1 with errstr if anything failed,
 * and `sqlstate` (if not NULL) gets the server's SQLSTATE ("" if none). */
static int store_copy_begin(store_t *st, const char *sql, char *errstr,
                            size_t errstr_size)
{
    PGresult *res = store_query(st, "postgres copy", sql, 0, NULL,
                                PGRES_COPY_IN, errstr, errstr_size);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

static int store_copy_put(store_t *st, const char *data, size_t len,
                          char *errstr, size_t errstr_size)
{
    /* libpq buffers; hand it the data in large pieces. */
    for (size_t off = 0; off < len;) {
        size_t n = len - off > (1 << 20) ? (1 << 20) : len - off;
        if (PQputCopyData(st->conn, data + off, (int)n) != 1) {
            store_error(errstr, errstr_size, "postgres copy",
                        PQerrorMessage(st->conn));
            return -1;
        }
        off += n;
    }
    return 0;
}

static int store_copy_end(store_t *st, bool ok, char *errstr,
                          size_t errstr_size)
{
    PGresult *res;
    int rc = ok ? 0 : -1;

    if (PQputCopyEnd(st->conn, ok ? NULL : "aborted") != 1 && rc == 0) {
        store_error(errstr, errstr_size, "postgres copy",
                    PQerrorMessage(st->conn));
        rc = -1;
    }
    while ((res = PQgetResult(st->conn)) != NULL) {
        if (PQresultStatus(res) != PGRES_COMMAND_OK && rc == 0) {
            store_error(errstr, errstr_size, "postgres copy",
                        PQresultErrorMessage(res));
            store_note_sqlstate(st, res);
            rc = -1;
        }
        PQclear(res);
    }
    return rc;
}

static int store_copy(store_t *st, const char *sql, const char *data,
                      size_t len, char *errstr, size_t errstr_size)
{
    bool ok;
    if (store_copy_begin(st, sql, errstr, errstr_size) == -1)
        return -1;
    ok = store_copy_put(st, data, len, errstr, errstr_size) == 0;
    return store_copy_end(st, ok, errstr, errstr_size);
}

/* Which events of a batch a step takes: the selected events (their keys
 * for the probe), or the selected events not counted before (their rows
 * for the events table). */
typedef enum { ROWS_KEYS, ROWS_NEW_EVENTS } rows_kind_t;

static bool store_row_wanted(const batch_t *b, size_t seq, rows_kind_t kind)
{
    return batch_is_selected(b, seq) &&
           (kind == ROWS_KEYS || !batch_is_counted_before(b, seq));
}

/* COPYs the new events straight into tally.token_usage_events in key
 * order (batch_sorted_by_key(): one lock order for every writer of that
 * table, so concurrent batches sharing keys never deadlock). */
static int store_copy_events_sorted(store_t *st, batch_t *batch,
                                    const char *sql, char *errstr,
                                    size_t errstr_size)
{
    const size_t *order = batch_sorted_by_key(batch);
    size_t n = batch_count(batch);
    bool ok = true;

    if (store_copy_begin(st, sql, errstr, errstr_size) == -1)
        return -1;
    for (size_t i = 0; ok && i < n; i++) {
        const char *row;
        size_t len;
        if (!store_row_wanted(batch, order[i], ROWS_NEW_EVENTS))
            continue;
        row = batch_event_row(batch, order[i], &len);
        ok = store_copy_put(st, row, len, errstr, errstr_size) == 0;
    }
    return store_copy_end(st, ok, errstr, errstr_size);
}

#define SUMS_COLS                                                         \
    "tokens, prompt_tokens, completion_tokens, thoughts_tokens, "          \
    "cached_tokens, events"
/* A bucket's key columns, its date column named `date`. */
#define BUCKET_COLS(date)                                                 \
    "tenant_id, " date ", token_type, operation, model, agent_id"
#define SUMS_UPDATE(t)                                                    \
    "tokens = " t ".tokens + EXCLUDED.tokens, "                            \
    "prompt_tokens = " t ".prompt_tokens + EXCLUDED.prompt_tokens, "       \
    "completion_tokens = " t ".completion_tokens + "                       \
    "EXCLUDED.completion_tokens, "                                         \
    "thoughts_tokens = " t ".thoughts_tokens + EXCLUDED.thoughts_tokens, " \
    "cached_tokens = " t ".cached_tokens + EXCLUDED.cached_tokens, "       \
    "events = " t ".events + EXCLUDED.events, "                            \
    "updated_at = EXCLUDED.updated_at"

static double elapsed_ms(struct timespec *t0)
{
    struct timespec t1;
    double ms;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (double)(t1.tv_sec - t0->tv_sec) * 1e3 +
         (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
    *t0 = t1;
    return ms;
}

/* The staged events whose key was counted before, and whether the stored
 * payload differs (a conflict: first wins). One primary-key probe per
 * staged key, whatever the planner thinks of the sizes: as a plain join
 * it hashed the whole dedupe store once the store outgrew the batch (a
 * sequential scan of every event of the window, each batch). LIMIT 1
 * keeps the lateral subquery from being flattened into such a join. */
static const char *const counted_before_sql =
    "SELECT s.seq, e.payload_hash IS NOT NULL"
    " AND e.payload_hash <> s.payload_hash"
    " FROM unnest($1::int4[], $2::text[], $3::text[], $4::int8[])"
    " AS s(seq, tenant_id, idempotency_key, payload_hash)"
    " CROSS JOIN LATERAL ("
    " SELECT e.payload_hash FROM tally.token_usage_events e"
    " WHERE e.tenant_id = s.tenant_id COLLATE \"C\""
    " AND e.idempotency_key = s.idempotency_key COLLATE \"C\" LIMIT 1) e";

#define EVENTS_COLS                                                       \
    "(tenant_id, idempotency_key, occurred_at, token_type, operation,"     \
    " model, agent_id, conversation_id, collection_id, owner_tenant_id,"   \
    " tokens, prompt_tokens, completion_tokens, thoughts_tokens,"          \
    " cached_tokens, metadata, payload_hash, source)"

/* The cheap path: the new events straight into the table. */
static const char *const copy_events_sql =
    "COPY tally.token_usage_events " EVENTS_COLS " FROM STDIN";

/* After a unique violation (another worker committed one of our keys
 * between our check and our insert): through a stage, tolerating it. */
static const char *const copy_rows_stage_sql =
    "COPY tally_stage_rows " EVENTS_COLS " FROM STDIN";
/* ... and which of them lost that race: those this insert did not
 * insert (decided by the insert itself, not by comparing sources), with
 * their seqs from the probe's arrays. */
static const char *const insert_racing_sql =
    "WITH ins AS ("
    " INSERT INTO tally.token_usage_events " EVENTS_COLS
    " SELECT tenant_id, idempotency_key, occurred_at, token_type,"
    " operation, model, agent_id, conversation_id, collection_id,"
    " owner_tenant_id, tokens, prompt_tokens, completion_tokens,"
    " thoughts_tokens, cached_tokens, metadata, payload_hash, source"
    " FROM tally_stage_rows ORDER BY tenant_id, idempotency_key"
    " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
    " RETURNING tenant_id, idempotency_key)"
    " SELECT s.seq, false FROM tally_stage_rows r"
    " JOIN unnest($1::int4[], $2::text[], $3::text[])"
    " AS s(seq, tenant_id, idempotency_key)"
    " ON s.tenant_id COLLATE \"C\" = r.tenant_id"
    " AND s.idempotency_key COLLATE \"C\" = r.idempotency_key"
    " WHERE NOT EXISTS (SELECT 1 FROM ins i WHERE i.tenant_id = r.tenant_id"
    " AND i.idempotency_key = r.idempotency_key)";

/* The sums, one row per daily bucket (tally_agg) and per monthly bucket
 * (tally_magg), summed and sorted by the worker in the order of each
 * table's primary key (agg_daily_rows(), agg_monthly_rows()): the daily
 * rows are upserted in that order, then the monthly ones, in two
 * statements, so that every daily row is locked before any monthly one,
 * the one lock order of every writer (track_token_usage(), reconcile
 * --fix), and Postgres sorts and groups nothing. (A daily insert as a
 * WITH beside the monthly one ran after it.) The order of the upserts is
 * the order of the COPY: a sequential scan of a temp table filled by one
 * COPY after a commit or a TRUNCATE (never a parallel or synchronized
 * scan) returns its rows as they were written. Were it not so, the cost
 * would be a deadlock, detected and retried, never a wrong sum. */
#define UPSERT_SUMS(table, date, from)                                    \
    "INSERT INTO tally." table " AS t"                                     \
    " (" BUCKET_COLS(date) ", " SUMS_COLS ", updated_at)"                  \
    " SELECT tenant_id, date '1970-01-01' + day,"                          \
    " token_type::tally.token_type, operation::tally.operation_type,"      \
    " model, agent_id, " SUMS_COLS ", now() FROM " from                    \
    " ON CONFLICT (" BUCKET_COLS(date) ")"                                 \
    " DO UPDATE SET " SUMS_UPDATE("t")
static const char *const upsert_daily_sql =
    UPSERT_SUMS("token_usage_daily", "day", "tally_agg");
static const char *const upsert_monthly_sql =
    UPSERT_SUMS("token_usage_monthly", "month", "tally_magg");

/* Moves every position forward, only where the epoch is still ours. */
static const char *const advance_sql =
    "UPDATE tally.consumer_offsets o"
    " SET next_offset = v.next_offset, updated_at = now()"
    " FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[])"
    " AS v(topic, partition, next_offset, epoch)"
    " WHERE o.group_id = $5 AND o.topic = v.topic"
    " AND o.partition = v.partition AND o.epoch = v.epoch"
    " RETURNING o.topic, o.partition";

/* Fences: locks our offsets rows first (a claim by another member waits
 * for this transaction, or we see its new epoch). */
static store_status_t store_advance(store_t *st, store_position_t *pos,
                                    size_t n, char *errstr,
                                    size_t errstr_size)
{
    const char *params[5];
    char *arrays = NULL;
    PGresult *res;
    store_status_t rc = STORE_RETRY;
    size_t matched = 0;

    positions_arrays(pos, n, &arrays, params);
    params[4] = st->group;
    res = store_query(st, "postgres offsets", advance_sql, 5, params,
                      PGRES_TUPLES_OK, errstr, errstr_size);
    if (!res)
        goto out;
    for (size_t i = 0; i < n; i++)
        pos[i].fenced = true;
    for (int r = 0; r < PQntuples(res); r++) {
        size_t i = position_find(pos, n, PQgetvalue(res, r, 0),
                                 atoi(PQgetvalue(res, r, 1)));
        if (i < n && pos[i].fenced) {
            pos[i].fenced = false;
            matched++;
        }
    }
    if (matched != n) {
        snprintf(errstr, errstr_size,
                 "fenced: %zu of %zu partitions were claimed by another "
                 "member",
                 n - matched, n);
        rc = STORE_FENCED;
        goto out;
    }
    rc = STORE_OK;
out:
    PQclear(res);
    free(arrays);
    return rc;
}

/* Marks the events of `res` (seq, conflict) as counted before and logs
 * the conflicts. */
static void mark_counted_before(batch_t *batch, PGresult *res,
                                store_batch_result_t *out)
{
    int n = PQntuples(res);

    for (int r = 0; r < n; r++) {
        size_t seq = (size_t)atol(PQgetvalue(res, r, 0));
        batch_mark_counted_before(batch, seq);
        out->counted_before++;
        if (PQgetvalue(res, r, 1)[0] == 't') {
            const char *tenant;
            const char *key = batch_event_key(batch, seq, &tenant);
            out->conflicts++;
            log_warn("conflict: tenant %s key %s at %s was counted before "
                     "with another payload; first wins",
                     tenant, key, batch_event_source(batch, seq));
        }
    }
}

/* The keys of the selected events, in key order, as the probe's four
 * arrays (seq, tenant_id, idempotency_key, payload_hash). Returns how
 * many. */
static size_t store_key_arrays(store_t *st, batch_t *batch)
{
    const size_t *order = batch_sorted_by_key(batch);
    size_t n = batch_count(batch);
    pg_array_t *a;

    if (!st->keys && !(st->keys = calloc(KEY_ARRAYS, sizeof(*st->keys))))
        abort();
    a = st->keys;
    pg_array_begin(&a[0], PG_OID_INT4);
    pg_array_begin(&a[1], PG_OID_TEXT);
    pg_array_begin(&a[2], PG_OID_TEXT);
    pg_array_begin(&a[3], PG_OID_INT8);
    for (size_t i = 0; i < n; i++) {
        size_t seq = order[i];
        const char *tenant, *key;
        if (!store_row_wanted(batch, seq, ROWS_KEYS))
            continue;
        key = batch_event_key(batch, seq, &tenant);
        pg_array_put_i32(&a[0], (int32_t)seq);
        pg_array_put(&a[1], tenant, strlen(tenant));
        pg_array_put(&a[2], key, strlen(key));
        pg_array_put_i64(&a[3], (int64_t)batch_event_hash(batch, seq));
    }
    for (int i = 0; i < KEY_ARRAYS; i++)
        pg_array_end(&a[i]);
    return a[0].n;
}

/* Runs a query over the first `n_arrays` key arrays returning (seq,
 * conflict) rows, and marks them. */
static int store_mark(store_t *st, batch_t *batch, const char *sql,
                      int n_arrays, store_batch_result_t *out, char *errstr,
                      size_t errstr_size)
{
    static const Oid types[KEY_ARRAYS] = {
        PG_OID_INT4_ARRAY, PG_OID_TEXT_ARRAY, PG_OID_TEXT_ARRAY,
        PG_OID_INT8_ARRAY};
    const char *values[KEY_ARRAYS];
    int lengths[KEY_ARRAYS];
    PGresult *res;

    for (int i = 0; i < n_arrays; i++) {
        values[i] = st->keys[i].buf.data;
        lengths[i] = (int)st->keys[i].buf.len;
    }
    res = store_query_bin(st, "postgres dedupe", sql, n_arrays, types, values,
                          lengths, PGRES_TUPLES_OK, errstr, errstr_size);
    if (!res)
        return -1;
    mark_counted_before(batch, res, out);
    PQclear(res);
    return 0;
}

/* The dedupe step: marks in the batch the events whose key is in the
 * dedupe store already, and copies the others into it. A key that another
 * worker commits between the check and the copy (a unique violation) is
 * settled by a second, conflict-tolerant insert. Returns 0 or -1. */
static int store_dedupe(store_t *st, batch_t *batch,
                        store_batch_result_t *out, char *errstr,
                        size_t errstr_size)
{
    if (store_key_arrays(st, batch) == 0)
        return 0; /* nothing selected */
    store_step(st, "stage_keys");
    if (store_mark(st, batch, counted_before_sql, KEY_ARRAYS, out, errstr,
                   errstr_size) == -1)
        return -1;
    store_step(st, "counted_before");
    if (store_exec(st, "SAVEPOINT tally_insert", errstr, errstr_size) == -1)
        return -1;
    if (store_copy_events_sorted(st, batch, copy_events_sql, errstr,
                                 errstr_size) == 0) {
        store_step(st, "events_copy");
        return 0;
    }
    if (strcmp(st->sqlstate, "23505") != 0)
        return -1;
    log_info("dedupe: a key of this batch was committed by another worker "
             "meanwhile; inserting again, tolerating conflicts");
    if (store_exec(st, "ROLLBACK TO SAVEPOINT tally_insert", errstr,
                   errstr_size) == -1)
        return -1;
    st->stage_rows_used = true;
    if (store_copy_events_sorted(st, batch, copy_rows_stage_sql, errstr,
                                 errstr_size) == -1 ||
        store_mark(st, batch, insert_racing_sql, 3, out, errstr,
                   errstr_size) == -1)
        return -1;
    store_step(st, "events_race");
    return 0;
}

/* The selected events of the batch into the dedupe store, inside the
 * open transaction; returns their sums by daily bucket (the batch's, see
 * batch_aggregate()), or NULL with errstr (and st->sqlstate). */
static agg_t *store_stage_selected(store_t *st, batch_t *batch,
                                   store_batch_result_t *out, char *errstr,
                                   size_t errstr_size)
{
    agg_t *agg;

    if (store_dedupe(st, batch, out, errstr, errstr_size) == -1)
        return NULL;
    agg = batch_aggregate(batch, &out->counted);
    out->buckets = agg_nonempty(agg);
    return agg;
}

/* Upserts the sums of `agg` into the daily then the monthly rows. Sets
 * *daily to the daily rows. 0 or -1. */
static int store_upsert_sums(store_t *st, agg_t *agg, size_t *daily,
                             char *errstr, size_t errstr_size)
{
    const char *data;
    size_t len, rows;

    data = agg_daily_rows(agg, &st->token_types, &st->operations, &len,
                          daily);
    if (*daily == 0)
        return 0;
    if (store_copy(st, "COPY tally_agg FROM STDIN", data, len, errstr,
                   errstr_size) == -1)
        return -1;
    data = agg_monthly_rows(agg, &st->token_types, &st->operations, &len,
                            &rows);
    if (store_copy(st, "COPY tally_magg FROM STDIN", data, len, errstr,
                   errstr_size) == -1)
        return -1;
    store_step(st, "agg_copy");
    if (store_exec(st, upsert_daily_sql, errstr, errstr_size) == -1 ||
        store_exec(st, upsert_monthly_sql, errstr, errstr_size) == -1)
        return -1;
    store_step(st, "sums");
    return 0;
}

/* A probe of store_isolate(): the selected events, their sums upserted at
 * once. */
static int store_apply_selected(store_t *st, batch_t *batch,
                                store_batch_result_t *out, char *errstr,
                                size_t errstr_size)
{
    size_t daily;
    agg_t *agg = store_stage_selected(st, batch, out, errstr, errstr_size);
    if (!agg)
        return -1;
    return store_upsert_sums(st, agg, &daily, errstr, errstr_size);
}

/* Finds the events of [lo, hi) that Postgres refuses, given what the
 * probes before committed inside this transaction: the range is tried
 * under a savepoint and kept if it goes in, else split in two, down to
 * single events, which are rejected (batch_reject()) with the error.
 * Adds to *n_rejected. Returns 0, or -1 with errstr on any failure that
 * is not a data error (the caller rolls back and retries). */
static int store_isolate(store_t *st, batch_t *batch, size_t lo, size_t hi,
                         size_t *n_rejected, char *errstr,
                         size_t errstr_size)
{
    store_batch_result_t scratch;
    char why[512];
    size_t n = 0, only = lo;

    for (size_t i = lo; i < hi; i++) {
        if (!batch_rejected(batch, i)) {
            n++;
            only = i;
        }
    }
    if (n == 0)
        return 0;
    batch_select(batch, lo, hi);
    batch_reset_marks(batch);
    memset(&scratch, 0, sizeof(scratch));
    if (store_exec(st,
                   "SAVEPOINT tally_probe;"
                   "TRUNCATE tally_stage_rows, tally_agg, tally_magg",
                   errstr, errstr_size) == -1)
        return -1;
    if (store_apply_selected(st, batch, &scratch, why, sizeof(why)) == 0)
        return store_exec(st, "RELEASE SAVEPOINT tally_probe", errstr,
                          errstr_size);
    if (!store_data_error(st)) {
        snprintf(errstr, errstr_size, "%s", why);
        return -1;
    }
    if (store_exec(st, "ROLLBACK TO SAVEPOINT tally_probe", errstr,
                   errstr_size) == -1)
        return -1;
    if (n == 1) {
        batch_reject(batch, only, why);
        (*n_rejected)++;
        return 0;
    }
    if (store_isolate(st, batch, lo, lo + (hi - lo) / 2, n_rejected, errstr,
                      errstr_size) == -1)
        return -1;
    return store_isolate(st, batch, lo + (hi - lo) / 2, hi, n_rejected,
                         errstr, errstr_size);
}

/* Rolls the window back. */
static void store_window_drop(store_t *st)
{
    st->window_batches = 0;
    st->pending = NULL;
    if (st->window_agg)
        agg_clear(st->window_agg);
    store_recover(st);
}

/* Opens the window's transaction if none is open, or readies it for one
 * more batch; then fences and advances `pos`. */
static store_status_t store_window_open_for(store_t *st,
                                            store_position_t *pos, size_t n,
                                            char *errstr,
                                            size_t errstr_size)
{
    store_status_t rc = STORE_OK;

    if (st->window_batches == 0) {
        if (store_prepare_session(st, errstr, errstr_size) == -1)
            return STORE_RETRY;
        if (store_exec(st, "BEGIN", errstr, errstr_size) == -1)
            return STORE_RETRY;
        st->stage_rows_used = false; /* emptied by the last COMMIT */
    } else if (st->stage_rows_used) {
        /* The previous batch raced another worker (store_dedupe()). */
        if (store_exec(st, "TRUNCATE tally_stage_rows", errstr,
                       errstr_size) == -1)
            return STORE_RETRY;
        st->stage_rows_used = false;
    }
    if (n > 0)
        rc = store_advance(st, pos, n, errstr, errstr_size);
    store_step(st, "fence");
    return rc;
}

/* Poison in a batch that is its window's only one: rolls back and finds,
 * in a transaction of its own that is rolled back too, the events
 * Postgres refuses (marked in the batch; the caller dead-letters them
 * and commits the rest). STORE_REJECTED, or STORE_RETRY. */
static store_status_t store_find_rejected(store_t *st, batch_t *batch,
                                          store_position_t *pos, size_t n,
                                          char *errstr, size_t errstr_size)
{
    store_status_t rc;
    size_t n_rejected = 0;

    log_warn("postgres refused a batch of %zu events (%s): looking for "
             "the events it refuses",
             batch_count(batch), errstr);
    store_window_drop(st);
    rc = store_window_open_for(st, pos, n, errstr, errstr_size);
    if (rc == STORE_OK)
        rc = store_isolate(st, batch, 0, batch_count(batch), &n_rejected,
                           errstr, errstr_size) == 0
                 ? STORE_REJECTED
                 : STORE_RETRY;
    store_window_drop(st); /* nothing of it is kept */
    batch_select(batch, 0, SIZE_MAX);
    if (rc == STORE_REJECTED && n_rejected > 0) {
        snprintf(errstr, errstr_size,
                 "postgres refused %zu events of the batch", n_rejected);
    } else if (rc == STORE_REJECTED) {
        snprintf(errstr, errstr_size,
                 "postgres refused the batch but each part alone went "
                 "in; retrying it");
        rc = STORE_RETRY;
    }
    return rc;
}

/* A data error (poison) in the window: isolated in `batch` when it is the
 * window's only batch, else the window is rolled back for the caller to
 * commit its batches one by one. */
static store_status_t store_window_refused(store_t *st, batch_t *batch,
                                           store_position_t *pos, size_t n,
                                           char *errstr, size_t errstr_size)
{
    char why[512];
    if (batch && st->window_batches <= 1)
        return store_find_rejected(st, batch, pos, n, errstr, errstr_size);
    snprintf(why, sizeof(why), "%s", errstr);
    snprintf(errstr, errstr_size,
             "postgres refused a window of %zu batches (%s): to be "
             "committed a batch at a time",
             st->window_batches, why);
    store_window_drop(st);
    return STORE_SPLIT;
}

/* store_window_add(), with the batch's positions kept for a poison hunt
 * if the window is the batch alone. */
static store_status_t store_window_put(store_t *st, batch_t *batch,
                                       store_position_t *pos, size_t n,
                                       bool keep, store_batch_result_t *out,
                                       char *errstr, size_t errstr_size)
{
    store_status_t rc;
    agg_t *agg = NULL;

    memset(out, 0, sizeof(*out));
    st->sqlstate[0] = '\0';
    batch_reset_marks(batch);
    batch_select(batch, 0, SIZE_MAX);
    if (st->window_batches >= STORE_WINDOW_MAX_BATCHES) {
        snprintf(errstr, errstr_size, "a window holds at most %d batches",
                 STORE_WINDOW_MAX_BATCHES);
        store_window_drop(st);
        return STORE_RETRY;
    }
    rc = store_window_open_for(st, pos, n, errstr, errstr_size);
    if (rc != STORE_OK) {
        store_window_drop(st);
        return rc;
    }
    if (batch_count(batch) > 0 &&
        !(agg = store_stage_selected(st, batch, out, errstr, errstr_size))) {
        if (store_data_error(st)) {
            /* The batch counts as in the window until it is isolated. */
            st->window_batches++;
            return store_window_refused(st, batch, pos, n, errstr,
                                        errstr_size);
        }
        store_window_drop(st);
        return STORE_RETRY;
    }
    if (agg && keep && st->window_batches == 0) {
        st->pending = agg; /* the batch's own, until the window ends */
    } else if (agg) {
        if (!st->window_agg && !(st->window_agg = agg_new(4096)))
            abort();
        if (st->pending && st->pending != st->window_agg)
            agg_merge(st->window_agg, st->pending);
        agg_merge(st->window_agg, agg);
        st->pending = st->window_agg;
    }
    st->window_batches++;
    return STORE_OK;
}

store_status_t store_window_add(store_t *st, batch_t *batch,
                                store_position_t *pos, size_t n,
                                store_batch_result_t *res, char *errstr,
                                size_t errstr_size)
{
    return store_window_put(st, batch, pos, n, false, res, errstr,
                            errstr_size);
}

/* store_window_commit(); `batch` (with its positions) when the window is
 * that batch alone, for a poison hunt. */
static store_status_t store_window_end(store_t *st, batch_t *batch,
                                       store_position_t *pos, size_t n,
                                       size_t *daily, char *errstr,
                                       size_t errstr_size)
{
    struct timespec t0;
    double ms_sums, ms_commit;

    *daily = 0;
    if (st->window_batches == 0)
        return STORE_OK;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    st->sqlstate[0] = '\0';
    if (st->pending &&
        store_upsert_sums(st, st->pending, daily, errstr, errstr_size) ==
            -1) {
        if (store_data_error(st))
            return store_window_refused(st, batch, pos, n, errstr,
                                        errstr_size);
        store_window_drop(st);
        return STORE_RETRY;
    }
    ms_sums = elapsed_ms(&t0);
    fault_point("inside-txn");
    if (fault_hit("commit-lost")) {
        /* COMMIT sent, its answer never read: the outcome is unknown
         * here, as when the connection drops during COMMIT. */
        PQsendQuery(st->conn, "COMMIT");
        PQflush(st->conn);
        store_disconnect(st);
        store_window_drop(st);
        snprintf(errstr, errstr_size,
                 "postgres: connection lost during COMMIT (test fault)");
        return STORE_RETRY;
    }
    if (store_exec(st, "COMMIT", errstr, errstr_size) == -1) {
        store_window_drop(st);
        return STORE_RETRY;
    }
    ms_commit = elapsed_ms(&t0);
    store_step(st, "commit");
    log_debug("window timings: %zu batches, sums %.1f ms (%zu daily rows), "
              "commit %.1f ms",
              st->window_batches, ms_sums, *daily, ms_commit);
    st->window_batches = 0;
    st->pending = NULL;
    if (st->window_agg)
        agg_clear(st->window_agg);
    return STORE_OK;
}

store_status_t store_window_commit(store_t *st, store_batch_result_t *res,
                                   char *errstr, size_t errstr_size)
{
    memset(res, 0, sizeof(*res));
    return store_window_end(st, NULL, NULL, 0, &res->buckets, errstr,
                            errstr_size);
}

void store_window_abort(store_t *st)
{
    if (st->window_batches > 0)
        store_window_drop(st);
}

size_t store_window_batches(const store_t *st)
{
    return st->window_batches;
}

size_t store_window_buckets(const store_t *st)
{
    if (st->pending && st->pending == st->window_agg)
        return agg_count(st->window_agg);
    return st->pending ? agg_nonempty(st->pending) : 0;
}

const char *store_last_sqlstate(const store_t *st)
{
    return st->sqlstate;
}

store_status_t store_commit_batch(store_t *st, batch_t *batch,
                                  store_position_t *pos, size_t n,
                                  store_batch_result_t *out, char *errstr,
                                  size_t errstr_size)
{
    struct timespec t0;
    double ms_stage;
    size_t daily;
    store_status_t rc;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = store_window_put(st, batch, pos, n, true, out, errstr,
                          errstr_size);
    if (rc != STORE_OK)
        return rc;
    ms_stage = elapsed_ms(&t0);
    log_debug("batch timings: fence, dedupe and daily rows %.1f ms "
              "(%zu rows)",
              ms_stage, out->buckets);
    return store_window_end(st, batch, pos, n, &daily, errstr,
                            errstr_size);
}

/* ---------------------------------------------------------------- */
/* Maintenance                                                        */

int store_prune_events(store_t *st, int dedupe_days, long limit,
                       long *deleted, char *errstr, size_t errstr_size)
{
    char sql[512];
    PGresult *res;

    if (store_busy(st, errstr, errstr_size))
        return -1;
    snprintf(sql, sizeof(sql),
             "DELETE FROM tally.token_usage_events WHERE ctid = ANY(ARRAY("
             "SELECT ctid FROM tally.token_usage_events"
             " WHERE occurred_at < now() - interval '%d days'"
             " LIMIT %ld))",
             dedupe_days + 1, limit);
    res = store_query(st, "postgres prune", sql, 0, NULL, PGRES_COMMAND_OK,
                      errstr, errstr_size);
    if (!res) {
        store_recover(st);
        return -1;
    }
    *deleted = atol(PQcmdTuples(res));
    PQclear(res);
    return 0;
}
