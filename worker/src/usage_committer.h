/* The token-usage committer thread: one batch at a time goes to Postgres,
 * while the consumer fills the next. Batches go into a window (one
 * transaction for several batches, usage_store.h) that a job closes. */
#ifndef TALLY_USAGE_COMMITTER_H
#define TALLY_USAGE_COMMITTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "usage_batch.h"
#include "usage_store.h"

/* A sealed batch and what became of it. The consumer fills the first
 * part, submits it, and reads the rest once it is collected. */
typedef struct {
    batch_t *batch;
    store_position_t *pos; /* the positions it advances */
    size_t n;
    size_t msgs, dlq; /* messages and dead letters it covers */
    /* Commit the window with this batch (a batch alone when no window is
     * open: store_commit_batch()). A job with no batch (NULL) commits the
     * open window alone. */
    bool close;
    /* The committer also closes the window once its sums hold this many
     * daily buckets (0: no bound). */
    size_t max_buckets;
    /* The outcome. On STORE_OK, `committed` says whether the window
     * (with this batch) is committed or still open. Any other status:
     * the window is rolled back, every batch of it to be consumed
     * again. */
    store_status_t status;
    bool committed;
    size_t window_batches; /* the window's batches, this one included */
    size_t upserted;       /* committed: the daily rows upserted */
    store_batch_result_t res;
    char sqlstate[6];
    int64_t took_us;
    char err[512];
} committer_job_t;

typedef struct committer committer_t;

/* Starts the thread; it uses `store` only while a job is out. NULL when
 * the thread cannot be created. */
committer_t *committer_start(store_t *store);
/* Hands `job` to the thread (no job may be out): depth one, so commits
 * stay in offset order. The job is the thread's until collected. */
void committer_submit(committer_t *com, committer_job_t *job);
/* True when no job is out: the store is the caller's. */
bool committer_idle(committer_t *com);
/* The job out, once done (waiting for it when `wait`), which makes the
 * committer idle again; NULL when none is out or it is not done. */
committer_job_t *committer_collect(committer_t *com, bool wait);
/* Joins the thread (a job out is waited for first) and frees it. */
void committer_stop(committer_t *com);

#endif
