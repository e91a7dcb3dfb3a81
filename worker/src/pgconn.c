/* Postgres sessions of the operator commands (offsets, reconcile). */
#include "pgconn.h"

#include <stdio.h>
#include <string.h>

/* "what: message" with libpq's line breaks folded into one line. */
static void pgconn_error(char *errstr, size_t errstr_size, const char *what,
                         const char *msg)
{
    size_t len;

    snprintf(errstr, errstr_size, "%s: %s", what, msg && *msg ? msg : "?");
    for (char *p = errstr; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
    len = strlen(errstr);
    while (len > 0 && errstr[len - 1] == ' ')
        errstr[--len] = '\0';
}

PGconn *pgconn_open(const char *dsn, const char *app, char *errstr,
                    size_t errstr_size)
{
    const char *keys[] = {"connect_timeout", "application_name", "dbname",
                          NULL};
    const char *vals[] = {"10", app, dsn ? dsn : "", NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);

    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        pgconn_error(errstr, errstr_size, "postgres connect",
                     conn ? PQerrorMessage(conn) : "out of memory");
        PQfinish(conn);
        return NULL;
    }
    if (pgconn_exec(conn, "postgres session",
                    "SET client_min_messages = warning;"
                    "SET TIME ZONE 'UTC'",
                    0, NULL, errstr, errstr_size) == -1) {
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

PGresult *pgconn_query(PGconn *conn, const char *what, const char *sql,
                       int n, const char *const *params,
                       ExecStatusType want, char *errstr,
                       size_t errstr_size)
{
    PGresult *res = n > 0 ? PQexecParams(conn, sql, n, NULL, params, NULL,
                                         NULL, 0)
                          : PQexec(conn, sql);

    if (PQresultStatus(res) == want)
        return res;
    pgconn_error(errstr, errstr_size, what,
                 res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    PQclear(res);
    return NULL;
}

int pgconn_exec(PGconn *conn, const char *what, const char *sql, int n,
                const char *const *params, char *errstr,
                size_t errstr_size)
{
    PGresult *res = n > 0 ? PQexecParams(conn, sql, n, NULL, params, NULL,
                                         NULL, 0)
                          : PQexec(conn, sql);
    ExecStatusType s = PQresultStatus(res);
    int rc = 0;

    if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
        pgconn_error(errstr, errstr_size, what,
                     res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        rc = -1;
    }
    PQclear(res);
    return rc;
}
