/* Postgres sessions of the operator commands (offsets, reconcile). */
#ifndef TALLY_PGCONN_H
#define TALLY_PGCONN_H

#include <stddef.h>

#include <libpq-fe.h>

/* Connects to `dsn` (conninfo or URI; "" for libpq defaults) as
 * application `app`, with a 10 s connect timeout, the session in UTC and
 * NOTICEs quieted. Returns the connection (the caller PQfinish()es it),
 * or NULL with errstr. */
PGconn *pgconn_open(const char *dsn, const char *app, char *errstr,
                    size_t errstr_size);

/* Runs `sql` with n text parameters (none: simple query, several
 * statements allowed) and returns its result if its status is `want`,
 * else NULL with errstr "what: message" on one line. The caller
 * PQclear()s the result. */
PGresult *pgconn_query(PGconn *conn, const char *what, const char *sql,
                       int n, const char *const *params,
                       ExecStatusType want, char *errstr,
                       size_t errstr_size);

/* pgconn_query() for statements whose rows nobody reads: 0 or -1. */
int pgconn_exec(PGconn *conn, const char *what, const char *sql, int n,
                const char *const *params, char *errstr,
                size_t errstr_size);

#endif
