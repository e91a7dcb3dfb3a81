/* tally reconcile: the sums checked (and repaired) against the counted events. */
#include <ctype.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "commands.h"
#include "config.h"
#include "log.h"
#include "pgconn.h"
#include "rfc3339.h"

static const opt_def_t reconcile_opts[] = {
    {"pg-dsn", "TALLY_PG_DSN", OPT_STR, "", 0, 0, NULL, "DSN",
     "Postgres conninfo or URI (empty: libpq defaults, PG* variables)"},
    {"from", NULL, OPT_STR, NULL, 1, 0, NULL, "DATE",
     "first day (YYYY-MM-DD, UTC) to check; required"},
    {"to", NULL, OPT_STR, NULL, 1, 0, NULL, "DATE",
     "last day (YYYY-MM-DD, UTC) to check, inclusive; required"},
    {"tenant", NULL, OPT_STR, NULL, 1, 0, NULL, "ID", "only this tenant"},
    {"json", NULL, OPT_BOOL, "false", 0, 0, NULL, NULL,
     "JSON lines: one per bucket that differs, then a summary"},
    {"fix", NULL, OPT_BOOL, "false", 0, 0, NULL, NULL,
     "repair what differs, in one transaction (safe while workers run)"},
    {"against", NULL, OPT_STR, NULL, 1, 0, NULL, "TABLE",
     "instead: compare the daily sums with TABLE ([schema.]table of the "
     "same columns, e.g. a legacy counter)"},
    {"threshold", "TALLY_RECONCILE_THRESHOLD", OPT_INT, NULL, 0,
     1000000000000000LL, NULL, "TOKENS",
     "with --against: token difference allowed per bucket (unset: 100)"},
    {"threshold-pct", "TALLY_RECONCILE_THRESHOLD_PCT", OPT_STR, NULL, 1, 0,
     NULL, "P",
     "with --against: also allow P percent of tally's tokens (the larger "
     "allowance wins)"},
    {"log-level", "TALLY_LOG_LEVEL", OPT_CHOICE, "warn", 0, 0,
     "debug|info|warn|error", "LEVEL", "log verbosity"},
};

#define N_OPTS(a) (sizeof(a) / sizeof(*(a)))

#define RECONCILE_SUMMARY                                                   \
    "Recomputes the daily sums of the days in [--from, --to] from "         \
    "tally.token_usage_events\nand the monthly sums of the months they "    \
    "touch from the daily rows of the whole\nmonth, and reports every "     \
    "bucket that differs (stored and expected values).\nExit 0: none "      \
    "differ; 1: some differ (or a failure); 2: usage error. --fix "         \
    "repairs\nthem (exit 0 once repaired). --against TABLE compares the "   \
    "daily sums with\nanother table instead (exit 1 when a bucket is over " \
    "the threshold or missing)."

/* ---------------------------------------------------------------- */
/* The SQL                                                            */

#define KEY_D "tenant_id, day, token_type, operation, model, agent_id"
#define KEY_M "tenant_id, month, token_type, operation, model, agent_id"
#define SUMS                                                                \
    "tokens, prompt_tokens, completion_tokens, thoughts_tokens, "           \
    "cached_tokens, events"
#define TENANT_IS " ($3::text IS NULL OR tenant_id = $3::text)"

/* The daily buckets of [$1, $2] recomputed from the counted events, the
 * worker's way: day in UTC, a NULL agent_id as ''. */
#define EVENTS_DAILY                                                        \
    "SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date AS day,"      \
    " token_type, operation, model,"                                        \
    " coalesce(agent_id, '') COLLATE \"C\" AS agent_id,"                    \
    " sum(tokens)::bigint AS tokens,"                                       \
    " sum(prompt_tokens)::bigint AS prompt_tokens,"                         \
    " sum(completion_tokens)::bigint AS completion_tokens,"                 \
    " sum(thoughts_tokens)::bigint AS thoughts_tokens,"                     \
    " sum(cached_tokens)::bigint AS cached_tokens,"                         \
    " count(*)::bigint AS events"                                           \
    " FROM tally.token_usage_events"                                        \
    " WHERE occurred_at >= $1::date::timestamp AT TIME ZONE 'UTC'"          \
    " AND occurred_at < ($2::date + 1)::timestamp AT TIME ZONE 'UTC'"       \
    " AND" TENANT_IS " GROUP BY 1, 2, 3, 4, 5, 6"

/* Stored (s_*) against expected (e_*) values of every bucket present on
 * either side; NULL: no such bucket on that side. */
#define COMPARE(key)                                                        \
    " SELECT " key ","                                                      \
    " s.tokens AS s_tokens, s.prompt_tokens AS s_prompt,"                   \
    " s.completion_tokens AS s_completion,"                                 \
    " s.thoughts_tokens AS s_thoughts, s.cached_tokens AS s_cached,"        \
    " s.events AS s_events,"                                                \
    " e.tokens AS e_tokens, e.prompt_tokens AS e_prompt,"                   \
    " e.completion_tokens AS e_completion,"                                 \
    " e.thoughts_tokens AS e_thoughts, e.cached_tokens AS e_cached,"        \
    " e.events AS e_events,"                                                \
    " (coalesce(s.tokens, 0), coalesce(s.prompt_tokens, 0),"                \
    " coalesce(s.completion_tokens, 0), coalesce(s.thoughts_tokens, 0),"    \
    " coalesce(s.cached_tokens, 0), coalesce(s.events, 0))"                 \
    " IS DISTINCT FROM (coalesce(e.tokens, 0), coalesce(e.prompt_tokens, 0)," \
    " coalesce(e.completion_tokens, 0), coalesce(e.thoughts_tokens, 0),"    \
    " coalesce(e.cached_tokens, 0), coalesce(e.events, 0)) AS differs"      \
    " FROM stored s FULL JOIN expected e USING (" key ")"

/* Every daily bucket of the range, one statement (one snapshot). */
static const char *const daily_cmp_sql =
    "CREATE TEMP TABLE rc_daily ON COMMIT DROP AS"
    " WITH expected AS (" EVENTS_DAILY "),"
    " stored AS (SELECT " KEY_D ", " SUMS " FROM tally.token_usage_daily"
    " WHERE day BETWEEN $1::date AND $2::date AND" TENANT_IS ")"
    COMPARE(KEY_D);

/* Every monthly bucket of the months the range touches, against the sum
 * of the month's daily rows as they are once the range is repaired: the
 * stored rows outside [$1, $2], the recomputation inside it. */
static const char *const monthly_cmp_sql =
    "CREATE TEMP TABLE rc_monthly ON COMMIT DROP AS"
    " WITH expected AS (SELECT tenant_id,"
    " date_trunc('month', day)::date AS month, token_type, operation,"
    " model, agent_id, sum(tokens)::bigint AS tokens,"
    " sum(prompt_tokens)::bigint AS prompt_tokens,"
    " sum(completion_tokens)::bigint AS completion_tokens,"
    " sum(thoughts_tokens)::bigint AS thoughts_tokens,"
    " sum(cached_tokens)::bigint AS cached_tokens,"
    " sum(events)::bigint AS events FROM ("
    " SELECT " KEY_D ", " SUMS " FROM tally.token_usage_daily"
    " WHERE day >= date_trunc('month', $1::date)::date"
    " AND day < (date_trunc('month', $2::date) + interval '1 month')::date"
    " AND (day < $1::date OR day > $2::date) AND" TENANT_IS
    " UNION ALL " EVENTS_DAILY ") x GROUP BY 1, 2, 3, 4, 5, 6),"
    " stored AS (SELECT " KEY_M ", " SUMS " FROM tally.token_usage_monthly"
    " WHERE month BETWEEN date_trunc('month', $1::date)::date"
    " AND date_trunc('month', $2::date)::date AND" TENANT_IS ")"
    COMPARE(KEY_M);

/* The repair of one table from its comparison: each differing bucket gets
 * expected minus stored added, in the worker's lock order; then the rows
 * that should not exist and are all zero now go. */
#define DELTA                                                               \
    " coalesce(e_tokens, 0) - coalesce(s_tokens, 0),"                       \
    " coalesce(e_prompt, 0) - coalesce(s_prompt, 0),"                       \
    " coalesce(e_completion, 0) - coalesce(s_completion, 0),"               \
    " coalesce(e_thoughts, 0) - coalesce(s_thoughts, 0),"                   \
    " coalesce(e_cached, 0) - coalesce(s_cached, 0),"                       \
    " coalesce(e_events, 0) - coalesce(s_events, 0), now()"
#define ADD(c) c " = t." c " + EXCLUDED." c
#define FIX_SQL(table, cmp, key)                                            \
    "INSERT INTO tally." table " AS t (" key ", " SUMS ", updated_at)"      \
    " SELECT " key "," DELTA " FROM " cmp " WHERE differs"                  \
    " ORDER BY 1, 2, 3, 4, 5, 6"                                            \
    " ON CONFLICT (" key ") DO UPDATE SET " ADD("tokens") ", "              \
    ADD("prompt_tokens") ", " ADD("completion_tokens") ", "                 \
    ADD("thoughts_tokens") ", " ADD("cached_tokens") ", " ADD("events")     \
    ", updated_at = EXCLUDED.updated_at"
#define PRUNE_SQL(table, cmp, period)                                       \
    "DELETE FROM tally." table " t USING " cmp " d WHERE d.differs"         \
    " AND d.e_events IS NULL AND t.tenant_id = d.tenant_id"                 \
    " AND t." period " = d." period " AND t.token_type = d.token_type"      \
    " AND t.operation = d.operation AND t.model = d.model"                  \
    " AND t.agent_id = d.agent_id AND t.events = 0 AND t.tokens = 0"        \
    " AND t.prompt_tokens = 0 AND t.completion_tokens = 0"                  \
    " AND t.thoughts_tokens = 0 AND t.cached_tokens = 0"

static const char *const daily_fix_sql =
    FIX_SQL("token_usage_daily", "rc_daily", KEY_D);
static const char *const daily_prune_sql =
    PRUNE_SQL("token_usage_daily", "rc_daily", "day");
static const char *const monthly_fix_sql =
    FIX_SQL("token_usage_monthly", "rc_monthly", KEY_M);
static const char *const monthly_prune_sql =
    PRUNE_SQL("token_usage_monthly", "rc_monthly", "month");

/* ---------------------------------------------------------------- */
/* Output                                                             */

static const char *const value_names[] = {
    "tokens", "prompt_tokens", "completion_tokens", "thoughts_tokens",
    "cached_tokens", "events"};

/* The six values from column `col` on, as a JSON object (NULL: none). */
static json_t *values_json(const PGresult *res, int r, int col)
{
    json_t *o;
    if (PQgetisnull(res, r, col))
        return json_null();
    o = json_object();
    for (int i = 0; i < 6; i++)
        json_object_set_new(
            o, value_names[i],
            json_integer(strtoll(PQgetvalue(res, r, col + i), NULL, 10)));
    return o;
}

static void values_text(const PGresult *res, int r, int col, FILE *fp)
{
    if (PQgetisnull(res, r, col)) {
        fputs("(none)", fp);
        return;
    }
    fprintf(fp, "tokens %s (prompt %s, completion %s, thoughts %s, cached "
                "%s), events %s",
            PQgetvalue(res, r, col), PQgetvalue(res, r, col + 1),
            PQgetvalue(res, r, col + 2), PQgetvalue(res, r, col + 3),
            PQgetvalue(res, r, col + 4), PQgetvalue(res, r, col + 5));
}

/* A bucket as JSON: {"type": type, "tenant_id", period, "token_type",
 * "operation", "model", "agent_id"} from the six key columns at `col`. */
static json_t *bucket_json(const char *type, const PGresult *res, int r,
                           int col, const char *period)
{
    const char *names[] = {"tenant_id", period, "token_type", "operation",
                           "model", "agent_id"};
    json_t *o = json_object();

    json_object_set_new(o, "type", json_string(type));
    for (int i = 0; i < 6; i++)
        json_object_set_new(o, names[i],
                            json_string(PQgetvalue(res, r, col + i)));
    return o;
}

static void json_line(json_t *o)
{
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    puts(text);
    free(text);
    json_decref(o);
}

/* Prints the differing buckets of comparison `cmp` ("rc_daily" or
 * "rc_monthly"); sets *checked and *differing. 0, or -1 with errstr. */
static int report_buckets(PGconn *conn, const char *cmp, const char *kind,
                          const char *period, bool json, long *checked,
                          long *differing, char *errstr, size_t errstr_size)
{
    char sql[512];
    PGresult *res;

    snprintf(sql, sizeof(sql),
             "SELECT count(*), count(*) FILTER (WHERE differs) FROM %s", cmp);
    res = pgconn_query(conn, "postgres", sql, 0, NULL, PGRES_TUPLES_OK,
                       errstr, errstr_size);
    if (!res)
        return -1;
    *checked = atol(PQgetvalue(res, 0, 0));
    *differing = atol(PQgetvalue(res, 0, 1));
    PQclear(res);
    snprintf(sql, sizeof(sql),
             "SELECT tenant_id, %s, token_type, operation, model, agent_id,"
             " s_tokens, s_prompt, s_completion, s_thoughts, s_cached,"
             " s_events, e_tokens, e_prompt, e_completion, e_thoughts,"
             " e_cached, e_events FROM %s WHERE differs"
             " ORDER BY 1, 2, 3, 4, 5, 6",
             period, cmp);
    res = pgconn_query(conn, "postgres", sql, 0, NULL, PGRES_TUPLES_OK,
                       errstr, errstr_size);
    if (!res)
        return -1;
    for (int r = 0; r < PQntuples(res); r++) {
        if (json) {
            json_t *o = bucket_json(kind, res, r, 0, period);
            json_object_set_new(o, "stored", values_json(res, r, 6));
            json_object_set_new(o, "expected", values_json(res, r, 12));
            json_line(o);
            continue;
        }
        printf("%s %s %s %s/%s model=%s agent=%s: stored ", kind,
               PQgetvalue(res, r, 0), PQgetvalue(res, r, 1),
               PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
               PQgetvalue(res, r, 4), PQgetvalue(res, r, 5));
        values_text(res, r, 6, stdout);
        fputs("; expected ", stdout);
        values_text(res, r, 12, stdout);
        fputc('\n', stdout);
    }
    PQclear(res);
    return 0;
}

/* ---------------------------------------------------------------- */
/* Checking and repairing                                             */

/* Compares (and with `fix` repairs) the range in one transaction.
 *
 * Why a repair is exact while workers keep committing: every transaction
 * that counts events (a worker's batch, tally.track_token_usage()) inserts
 * them and adds their sums to the daily and then the monthly rows in that
 * same transaction. So in any snapshot, each committed transaction's
 * events and its sums are both visible or both not, and "stored minus
 * recomputed" of a bucket is exactly the damage done outside the
 * counting path, whatever is committing meanwhile. The comparison is one
 * statement (one snapshot) and the repair adds that difference (never
 * writes an absolute value) with INSERT ... ON CONFLICT DO UPDATE, which
 * works on the newest row version: a worker's sum committed after the
 * snapshot stays in; one still in flight waits for our row lock and adds
 * itself onto the repaired value. A bucket missing at the snapshot that a
 * worker creates meanwhile is likewise added to, not overwritten.
 * Deadlock-free: rows are locked in the worker's order (store_upsert_sums
 * in usage_store.c, rows sorted by usage_agg.c): daily rows ORDER BY
 * tenant_id, day, token_type, operation, model, agent_id, then monthly
 * rows in the same column order; the
 * deletions only touch rows this transaction holds already. The monthly
 * comparison runs after the daily repair, in a later snapshot, by the
 * same argument.
 *
 * Without `fix`: REPEATABLE READ, nothing written, rolled back. Sets
 * *differ to the number of differing buckets. 0, or -1 with errstr. */
static int reconcile_run(PGconn *conn, const char *const params[3],
                         bool fix, bool json, long *differ, char *errstr,
                         size_t errstr_size)
{
    long d_checked = 0, d_diff = 0, m_checked = 0, m_diff = 0;
    int rc = -1;

    if (pgconn_exec(conn, "postgres",
                    fix ? "BEGIN; SET LOCAL lock_timeout = '60s'"
                        : "BEGIN ISOLATION LEVEL REPEATABLE READ",
                    0, NULL, errstr, errstr_size) == -1)
        return -1;
    if (pgconn_exec(conn, "postgres daily", daily_cmp_sql, 3, params,
                    errstr, errstr_size) == -1 ||
        (fix && (pgconn_exec(conn, "postgres daily fix", daily_fix_sql, 0,
                             NULL, errstr, errstr_size) == -1 ||
                 pgconn_exec(conn, "postgres daily fix", daily_prune_sql, 0,
                             NULL, errstr, errstr_size) == -1)) ||
        pgconn_exec(conn, "postgres monthly", monthly_cmp_sql, 3, params,
                    errstr, errstr_size) == -1 ||
        (fix && (pgconn_exec(conn, "postgres monthly fix", monthly_fix_sql,
                             0, NULL, errstr, errstr_size) == -1 ||
                 pgconn_exec(conn, "postgres monthly fix", monthly_prune_sql,
                             0, NULL, errstr, errstr_size) == -1)) ||
        report_buckets(conn, "rc_daily", "daily", "day", json, &d_checked,
                       &d_diff, errstr, errstr_size) == -1 ||
        report_buckets(conn, "rc_monthly", "monthly", "month", json,
                       &m_checked, &m_diff, errstr, errstr_size) == -1 ||
        pgconn_exec(conn, "postgres", fix ? "COMMIT" : "ROLLBACK", 0, NULL,
                    errstr, errstr_size) == -1)
        goto out;
    *differ = d_diff + m_diff;
    if (json) {
        json_t *o = json_object();
        json_object_set_new(o, "type", json_string("summary"));
        json_object_set_new(o, "from", json_string(params[0]));
        json_object_set_new(o, "to", json_string(params[1]));
        json_object_set_new(o, "daily_checked", json_integer(d_checked));
        json_object_set_new(o, "daily_differing", json_integer(d_diff));
        json_object_set_new(o, "monthly_checked", json_integer(m_checked));
        json_object_set_new(o, "monthly_differing", json_integer(m_diff));
        json_object_set_new(o, "fixed", json_boolean(fix && *differ > 0));
        json_line(o);
    } else {
        printf("reconcile %s..%s: %ld daily buckets checked, %ld differ; "
               "%ld monthly buckets checked, %ld differ%s\n",
               params[0], params[1], d_checked, d_diff, m_checked, m_diff,
               fix && *differ > 0 ? "; all repaired" : "");
    }
    rc = 0;
out:
    if (rc == -1 && PQtransactionStatus(conn) != PQTRANS_IDLE) {
        char e2[256];
        (void)pgconn_exec(conn, "postgres", "ROLLBACK", 0, NULL, e2,
                          sizeof(e2));
    }
    return rc;
}

/* ---------------------------------------------------------------- */
/* --against                                                          */

/* [schema.]name, each part a plain SQL identifier: what --against takes.
 * The name is then resolved by Postgres (to_regclass: unquoted names fold
 * to lower case as in SQL) and used only as Postgres quotes it. */
static bool table_name_ok(const char *s)
{
    int parts = 0;

    for (const char *p = s;;) {
        const char *start = p;
        if (!(isalpha((unsigned char)*p) || *p == '_'))
            return false;
        while (isalnum((unsigned char)*p) || *p == '_' || *p == '$')
            p++;
        if (p - start > 63 || ++parts > 2)
            return false;
        if (*p == '\0')
            return true;
        if (*p++ != '.')
            return false;
    }
}

/* The comparison with another table (%s: its name as Postgres quotes
 * it; then the allowance in tokens and in percent, as numbers). */
static const char against_fmt[] =
    "WITH ours AS (SELECT tenant_id, day, token_type::text AS"
    " token_type, operation::text AS operation, model, agent_id,"
    " tokens FROM tally.token_usage_daily"
    " WHERE day BETWEEN $1::date AND $2::date AND" TENANT_IS "),"
    " theirs AS (SELECT tenant_id::text COLLATE \"C\" AS tenant_id,"
    " day::date AS day,"
    " token_type::text COLLATE \"C\" AS token_type,"
    " operation::text COLLATE \"C\" AS operation,"
    " coalesce(model::text, '') COLLATE \"C\" AS model,"
    " coalesce(agent_id::text, '') COLLATE \"C\" AS agent_id,"
    " sum(tokens)::bigint AS tokens FROM %s"
    " WHERE day::date BETWEEN $1::date AND $2::date"
    " AND ($3::text IS NULL OR tenant_id::text = $3::text)"
    " GROUP BY 1, 2, 3, 4, 5, 6),"
    " cmp AS (SELECT tenant_id, day, token_type, operation, model,"
    " agent_id, o.tokens AS ours, t.tokens AS theirs,"
    " CASE WHEN o.tokens IS NULL THEN 'missing_in_tally'"
    " WHEN t.tokens IS NULL THEN 'missing_in_table'"
    " WHEN abs(o.tokens - t.tokens) <= greatest(%s::numeric,"
    " %s::numeric / 100 * abs(o.tokens))"
    " THEN 'within' ELSE 'over' END AS class"
    " FROM ours o FULL JOIN theirs t USING (tenant_id, day,"
    " token_type, operation, model, agent_id))"
    " SELECT class, tenant_id, day, token_type, operation, model,"
    " agent_id, ours, theirs"
    " FROM cmp ORDER BY 2, 3, 4, 5, 6, 7";

/* Compares the daily sums of the range with `table` (its quoted name).
 * A bucket is within the threshold when |tally - table| tokens is at most
 * max(threshold, pct% of tally's tokens). Sets *bad to the buckets over
 * it or missing on a side. 0, or -1 with errstr. */
static int against_run(PGconn *conn, const char *const params[3],
                       const char *table, long long threshold, double pct,
                       bool json, long *bad, char *errstr,
                       size_t errstr_size)
{
    char *sql = NULL, limit[40], share[40];
    size_t len;
    PGresult *res = NULL;
    long total = 0, within = 0, over = 0, miss_table = 0, miss_tally = 0;
    int rc = -1;

    snprintf(limit, sizeof(limit), "%lld", threshold);
    snprintf(share, sizeof(share), "%.6f", pct);

    len = strlen(against_fmt) + strlen(table) + 2 * sizeof(limit);
    sql = malloc(len);
    if (!sql)
        abort();
    snprintf(sql, len, against_fmt, table, limit, share);
    /* The query is built for the comparison only: the table name is
     * Postgres' own quoting of a resolved relation, the limits numbers. */
    res = pgconn_query(conn, "postgres against", sql, 3, params,
                       PGRES_TUPLES_OK, errstr, errstr_size);
    if (!res)
        goto out;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *class = PQgetvalue(res, r, 0);
        total++;
        if (!strcmp(class, "within")) {
            within++;
            continue;
        }
        if (!strcmp(class, "over"))
            over++;
        else if (!strcmp(class, "missing_in_table"))
            miss_table++;
        else
            miss_tally++;
        if (json) {
            json_t *o = bucket_json(class, res, r, 1, "day");
            json_object_set_new(o, "tally",
                                PQgetisnull(res, r, 7)
                                    ? json_null()
                                    : json_integer(strtoll(
                                          PQgetvalue(res, r, 7), NULL, 10)));
            json_object_set_new(o, "table",
                                PQgetisnull(res, r, 8)
                                    ? json_null()
                                    : json_integer(strtoll(
                                          PQgetvalue(res, r, 8), NULL, 10)));
            json_line(o);
            continue;
        }
        printf("%s %s %s %s/%s model=%s agent=%s: tally %s, %s %s\n", class,
               PQgetvalue(res, r, 1), PQgetvalue(res, r, 2),
               PQgetvalue(res, r, 3), PQgetvalue(res, r, 4),
               PQgetvalue(res, r, 5), PQgetvalue(res, r, 6),
               PQgetisnull(res, r, 7) ? "(none)" : PQgetvalue(res, r, 7),
               table,
               PQgetisnull(res, r, 8) ? "(none)" : PQgetvalue(res, r, 8));
    }
    if (json) {
        json_t *o = json_object();
        json_object_set_new(o, "type", json_string("summary"));
        json_object_set_new(o, "table", json_string(table));
        json_object_set_new(o, "compared", json_integer(total));
        json_object_set_new(o, "within", json_integer(within));
        json_object_set_new(o, "over", json_integer(over));
        json_object_set_new(o, "missing_in_table", json_integer(miss_table));
        json_object_set_new(o, "missing_in_tally", json_integer(miss_tally));
        json_line(o);
    } else {
        printf("against %s %s..%s: %ld buckets compared, %ld within "
               "threshold, %ld over it, %ld missing in %s, %ld missing in "
               "tally\n",
               table, params[0], params[1], total, within, over, miss_table,
               table, miss_tally);
    }
    *bad = over + miss_table + miss_tally;
    rc = 0;
out:
    PQclear(res);
    free(sql);
    return rc;
}

/* Resolves --against to Postgres' quoted name of the relation, into out.
 * 0; -1 (usage error, message in errstr) when it does not exist. */
static int against_resolve(PGconn *conn, const char *name, char *out,
                           size_t size, char *errstr, size_t errstr_size)
{
    const char *params[] = {name};
    PGresult *res = pgconn_query(conn, "postgres", "SELECT to_regclass($1)::text",
                                 1, params, PGRES_TUPLES_OK, errstr,
                                 errstr_size);
    int rc = -1;

    if (!res)
        return -1;
    if (PQgetisnull(res, 0, 0))
        snprintf(errstr, errstr_size, "--against %s: no such table", name);
    else if (snprintf(out, size, "%s", PQgetvalue(res, 0, 0)) < (int)size)
        rc = 0;
    PQclear(res);
    return rc;
}

/* ---------------------------------------------------------------- */
/* tally reconcile                                                    */

/* A strict YYYY-MM-DD (a real calendar date). */
static bool date_ok(const char *s)
{
    char ts[32];
    int64_t us;
    if (strlen(s) != 10)
        return false;
    snprintf(ts, sizeof(ts), "%sT00:00:00Z", s);
    return rfc3339_parse(ts, strlen(ts), &us) == 0;
}

/* Refuses --fix over days whose events the worker may have pruned
 * (older than tally.settings' dedupe window): their sums would be wiped.
 * Without --fix it only warns. 0, 2 (refused), or 1 on failure. */
static int check_window(PGconn *conn, const char *from, bool fix)
{
    const char *params[] = {from};
    char err[512];
    PGresult *res = pgconn_query(
        conn, "postgres",
        "SELECT $1::date < current_date - coalesce((SELECT value::int FROM"
        " tally.settings WHERE name = 'dedupe_days'), 35),"
        " (current_date - coalesce((SELECT value::int FROM tally.settings"
        " WHERE name = 'dedupe_days'), 35))::text",
        1, params, PGRES_TUPLES_OK, err, sizeof(err));
    int rc = 0;

    if (!res) {
        fprintf(stderr, "tally reconcile: %s\n", err);
        return 1;
    }
    if (PQgetvalue(res, 0, 0)[0] == 't') {
        if (fix) {
            fprintf(stderr,
                    "tally reconcile: --from %s: the events of days before "
                    "%s may be pruned (past the dedupe window); --fix would "
                    "erase their sums\n",
                    from, PQgetvalue(res, 0, 1));
            rc = 2;
        } else {
            fprintf(stderr,
                    "tally reconcile: warning: days before %s may have "
                    "pruned events; their sums will differ\n",
                    PQgetvalue(res, 0, 1));
        }
    }
    PQclear(res);
    return rc;
}

int reconcile_main(int argc, char **argv)
{
    config_t cfg;
    PGconn *conn = NULL;
    char err[1024], table[512];
    const char *params[3];
    const char *from, *to, *against, *pct_s;
    double pct = 0;
    long bad = 0;
    bool fix, json;
    int rc = config_parse_command(&cfg, "reconcile", RECONCILE_SUMMARY,
                                  reconcile_opts, N_OPTS(reconcile_opts),
                                  argc, argv);

    if (rc >= 0)
        goto out;
    rc = 2;
    from = config_str(&cfg, "from");
    to = config_str(&cfg, "to");
    against = config_str(&cfg, "against");
    pct_s = config_str(&cfg, "threshold-pct");
    fix = config_bool(&cfg, "fix");
    json = config_bool(&cfg, "json");
    if (!from || !to) {
        fprintf(stderr, "tally reconcile: %s is required (YYYY-MM-DD)\n",
                !from ? "--from" : "--to");
        goto out;
    }
    if (!date_ok(from) || !date_ok(to)) {
        fprintf(stderr, "tally reconcile: %s %s: not a date (YYYY-MM-DD)\n",
                date_ok(from) ? "--to" : "--from", date_ok(from) ? to : from);
        goto out;
    }
    if (strcmp(from, to) > 0) {
        fprintf(stderr, "tally reconcile: --from %s is after --to %s\n",
                from, to);
        goto out;
    }
    if (!against && (config_str(&cfg, "threshold") || pct_s)) {
        fprintf(stderr, "tally reconcile: %s needs --against\n",
                pct_s ? config_origin(&cfg, "threshold-pct")
                      : config_origin(&cfg, "threshold"));
        goto out;
    }
    if (against && fix) {
        fprintf(stderr, "tally reconcile: --fix cannot be used with "
                        "--against (the other table is not ours to fix)\n");
        goto out;
    }
    if (against && !table_name_ok(against)) {
        fprintf(stderr, "tally reconcile: --against %s: expected "
                        "[schema.]table (letters, digits, _ and $)\n",
                against);
        goto out;
    }
    if (pct_s) {
        char *end;
        pct = strtod(pct_s, &end);
        if (end == pct_s || *end || !(pct >= 0 && pct <= 1000000)) {
            fprintf(stderr, "tally reconcile: %s %s: not a percentage\n",
                    config_origin(&cfg, "threshold-pct"), pct_s);
            goto out;
        }
    }
    params[0] = from;
    params[1] = to;
    params[2] = config_str(&cfg, "tenant");
    rc = 1;
    conn = pgconn_open(config_str(&cfg, "pg-dsn"), "tally-reconcile", err,
                       sizeof(err));
    if (!conn) {
        fprintf(stderr, "tally reconcile: %s\n", err);
        goto out;
    }
    if (against) {
        if (against_resolve(conn, against, table, sizeof(table), err,
                            sizeof(err)) == -1) {
            rc = strncmp(err, "--against", 9) ? 1 : 2;
            fprintf(stderr, "tally reconcile: %s\n", err);
            goto out;
        }
        if (against_run(conn, params, table,
                        config_str(&cfg, "threshold")
                            ? config_int(&cfg, "threshold")
                            : 100,
                        pct, json, &bad, err, sizeof(err)) == -1) {
            fprintf(stderr, "tally reconcile: %s\n", err);
            goto out;
        }
        rc = bad > 0 ? 1 : 0;
        goto out;
    }
    rc = check_window(conn, from, fix);
    if (rc != 0)
        goto out;
    rc = 1;
    if (reconcile_run(conn, params, fix, json, &bad, err, sizeof(err)) ==
        -1) {
        fprintf(stderr, "tally reconcile: %s\n", err);
        goto out;
    }
    rc = bad > 0 && !fix ? 1 : 0;
out:
    PQfinish(conn);
    config_free(&cfg);
    return rc;
}
