/* The token-usage committer thread: one batch's Postgres transaction at a
 * time, while the consumer fills the next. */
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
    /* The outcome (store_commit_batch()). */
    store_status_t status;
    store_batch_result_t res;
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
