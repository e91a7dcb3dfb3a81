/* Postgres: migrations, enums, partition claims and batch commits (libpq). */
#ifndef TALLY_USAGE_STORE_H
#define TALLY_USAGE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "usage_batch.h"
#include "usage_event.h"

typedef struct store store_t;

/* A partition's position as Postgres keeps it. */
typedef struct {
    const char *topic;
    int32_t partition;
    int64_t next_offset; /* -1: no stored position yet */
    int64_t epoch;       /* the claim's fencing token */
    bool fenced;         /* set by store_commit_batch */
} store_position_t;

/* What a committed batch did. */
typedef struct {
    size_t counted;          /* new events summed */
    size_t counted_before;   /* found in the dedupe store */
    size_t conflicts;        /* of those, with another payload */
    size_t buckets;          /* daily rows upserted */
} store_batch_result_t;

typedef enum {
    STORE_OK = 0,
    STORE_RETRY = -1,  /* transient: connection, deadlock, ...; retry later */
    STORE_FENCED = -2, /* a partition was claimed by another member */
    STORE_REJECTED = -3, /* Postgres refused some events for their data:
                          * batch_rejected() says which and why; nothing
                          * was committed */
    STORE_SPLIT = -4,    /* windows only: Postgres refused the data of a
                          * window of several batches; nothing was
                          * committed: consume them again and commit each
                          * batch alone (store_commit_batch() finds the
                          * events it refuses) */
} store_status_t;

/* Keeps the DSN (libpq conninfo or URI; "" for libpq defaults), the group
 * and an owner label for the offsets table. Does not connect. */
store_t *store_new(const char *dsn, const char *group, const char *owner);
void store_free(store_t *st);

/* Connects if not connected (connect_timeout 10 s, TCP keepalives) and
 * prepares the session. 0, or -1 with errstr. */
int store_connect(store_t *st, char *errstr, size_t errstr_size);
bool store_is_connected(const store_t *st);

/* Connects if needed and runs SELECT 1: whether Postgres answers now (for
 * /readyz and tally_postgres_up while idle). 0 or -1 with errstr. */
int store_ping(store_t *st, char *errstr, size_t errstr_size);
void store_disconnect(store_t *st);

/* Applies the embedded migrations not applied yet, each in its own
 * transaction, under an advisory lock so that concurrent starts are safe.
 * Sets *applied to the number applied. */
int store_migrate(store_t *st, int *applied, char *errstr,
                  size_t errstr_size);

/* Reads the values of tally.token_type and tally.operation_type. */
int store_read_enums(store_t *st, usage_enum_t *token_types,
                     usage_enum_t *operations, char *errstr,
                     size_t errstr_size);

/* Reads tally.settings' dedupe_days (-1 if unset). */
int store_read_dedupe_days(store_t *st, int *days, char *errstr,
                           size_t errstr_size);

/* Claims the partitions for this member: bumps each one's epoch (which
 * fences any other member still holding it) and returns its stored
 * position in pos[i].next_offset and the new epoch. Waits for a batch of
 * the previous owner that is committing right now. */
store_status_t store_claim(store_t *st, store_position_t *pos, size_t n,
                           char *errstr, size_t errstr_size);

/* Records `next_offset` as the position of a partition claimed with none
 * (where --start-from latest resolved to), if our epoch still holds, so
 * that a rewind before the first commit comes back to it. */
store_status_t store_init_position(store_t *st, const store_position_t *pos,
                                   char *errstr, size_t errstr_size);

/* Commits a batch in one transaction (a window of its own: an open
 * window is committed with it): fences (every pos[i].epoch must
 * still be current, else STORE_FENCED with pos[i].fenced set, nothing
 * written), inserts the new events into the dedupe store, marks in
 * `batch` those counted before, upserts the daily and monthly sums of the
 * rest, and stores pos[i].next_offset. Events rejected before (by
 * batch_reject()) are left out. When Postgres refuses the data itself (a
 * sum past the bigint range, a constraint), it finds the events it
 * refuses, marks them rejected and returns STORE_REJECTED with nothing
 * committed: the caller dead-letters them and calls again. Transient
 * failures are STORE_RETRY. */
store_status_t store_commit_batch(store_t *st, batch_t *batch,
                                  store_position_t *pos, size_t n,
                                  store_batch_result_t *res, char *errstr,
                                  size_t errstr_size);

/* For benchmarks (tally-pgstage): `fn` is called after each step of a
 * batch commit with the step's name ("fence", "commit", ...), e.g. to
 * read the backend's CPU time; NULL for none (the default). */
typedef void (*store_step_fn)(void *arg, const char *step);
void store_set_step_hook(store_t *st, store_step_fn fn, void *arg);

/* The pid of the connection's Postgres backend; 0 when not connected. */
int store_backend_pid(const store_t *st);

/* A window: the batches of several store_window_add() calls in one
 * transaction, committed by store_window_commit(). Each batch's events go
 * into the dedupe store as it is added (as in store_commit_batch(), which
 * is a window of one batch); the sums wait for the commit, which upserts
 * one daily and one monthly row per bucket of the whole window instead of
 * one per bucket of each batch: fewer rows, less Postgres time per event,
 * while the caller's memory holds one batch. The transaction holds the
 * window's partitions (a claim waits for it) and its new keys (another
 * writer of one of them waits) until it ends: keep windows short in time.
 * Each batch takes a subtransaction: at most STORE_WINDOW_MAX_BATCHES a
 * window (past 64, Postgres's snapshots slow down for every session).
 * Nothing else may use the store while a window is open.
 *
 * store_window_add(): fences and advances pos (as store_commit_batch()),
 * dedupes the batch against the store and inserts its new events, and
 * marks in `batch` those counted before; `res` counts this batch (valid
 * once the window commits), `res->buckets` its daily rows. The batch may
 * be cleared afterwards. STORE_OK, or, with the window rolled back (every
 * batch of it to be consumed again): STORE_FENCED, STORE_RETRY, and
 * STORE_SPLIT (Postgres refused this batch's data in a window that held
 * others), or STORE_REJECTED (as store_commit_batch(), when the window
 * held no other batch: the caller dead-letters and adds it again).
 * store_window_commit(): upserts the window's sums and commits. STORE_OK
 * (res->buckets: the daily rows upserted), STORE_RETRY (rolled back, or
 * the outcome is unknown: the connection was lost during COMMIT) or
 * STORE_SPLIT. store_window_abort() rolls an open window back. */
#define STORE_WINDOW_MAX_BATCHES 48
store_status_t store_window_add(store_t *st, batch_t *batch,
                                store_position_t *pos, size_t n,
                                store_batch_result_t *res, char *errstr,
                                size_t errstr_size);
store_status_t store_window_commit(store_t *st, store_batch_result_t *res,
                                   char *errstr, size_t errstr_size);
void store_window_abort(store_t *st);
size_t store_window_batches(const store_t *st); /* 0: no window open */
/* The daily buckets the open window sums in memory (about 140 bytes
 * each): a caller bounding its memory commits past some number. */
size_t store_window_buckets(const store_t *st);

/* The SQLSTATE of the last failed statement ("" if none), e.g. 40P01
 * after a deadlock: windows whose keys overlap another writer's (the
 * same keys on partitions of other members) deadlock now and then, and a
 * caller may then fall back to windows of one batch. */
const char *store_last_sqlstate(const store_t *st);

/* Deletes counted events older than the window plus a day of slack, at
 * most `limit` rows. Sets *deleted. */
int store_prune_events(store_t *st, int dedupe_days, long limit,
                       long *deleted, char *errstr, size_t errstr_size);

#endif
