/* The token-usage committer thread: one batch at a time goes to Postgres,
 * while the consumer fills the next. */
#include "usage_committer.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fault.h"

struct committer {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    store_t *store;
    committer_job_t *job; /* out: submitted and not collected */
    bool done;            /* its result is ready */
    bool quit;
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The job's batch into the window, or the window alone. */
static void committer_run(store_t *st, committer_job_t *job)
{
    store_batch_result_t wres;

    job->committed = false;
    job->sqlstate[0] = '\0';
    if (!job->batch) {
        job->window_batches = store_window_batches(st);
        job->status =
            store_window_commit(st, &wres, job->err, sizeof(job->err));
        job->committed = job->status == STORE_OK;
        job->upserted = wres.buckets;
        memset(&job->res, 0, sizeof(job->res));
    } else if (job->close && store_window_batches(st) == 0) {
        /* A batch alone: store_commit_batch() also finds the events
         * Postgres refuses when the sums fail. */
        job->window_batches = 1;
        job->status = store_commit_batch(st, job->batch, job->pos, job->n,
                                         &job->res, job->err,
                                         sizeof(job->err));
        job->committed = job->status == STORE_OK;
        job->upserted = job->res.buckets;
    } else {
        job->window_batches = store_window_batches(st) + 1;
        job->status = store_window_add(st, job->batch, job->pos, job->n,
                                       &job->res, job->err, sizeof(job->err));
        if (job->status == STORE_OK &&
            (job->close ||
             store_window_batches(st) >= STORE_WINDOW_MAX_BATCHES ||
             (job->max_buckets > 0 &&
              store_window_buckets(st) >= job->max_buckets))) {
            job->status = store_window_commit(st, &wres, job->err,
                                              sizeof(job->err));
            job->committed = job->status == STORE_OK;
            job->upserted = wres.buckets;
        } else if (job->status == STORE_OK) {
            fault_point("window-open"); /* added, the window still open */
        }
    }
    if (job->status != STORE_OK)
        snprintf(job->sqlstate, sizeof(job->sqlstate), "%s",
                 store_last_sqlstate(st));
}

static void *committer_main(void *arg)
{
    committer_t *com = arg;
    char parent[16], name[16];

    /* The consumer's name (inherited), e.g. usage-1-commit. */
    if (pthread_getname_np(pthread_self(), parent, sizeof(parent)) == 0) {
        snprintf(name, sizeof(name), "%.8s-commit", parent);
        pthread_setname_np(pthread_self(), name);
    }
    pthread_mutex_lock(&com->mu);
    for (;;) {
        committer_job_t *job;
        int64_t t0;
        while (!com->quit && !(com->job && !com->done))
            pthread_cond_wait(&com->cv, &com->mu);
        if (com->quit)
            break;
        job = com->job;
        pthread_mutex_unlock(&com->mu);
        t0 = now_us();
        committer_run(com->store, job);
        job->took_us = now_us() - t0;
        pthread_mutex_lock(&com->mu);
        com->done = true;
        pthread_cond_broadcast(&com->cv);
    }
    pthread_mutex_unlock(&com->mu);
    return NULL;
}

committer_t *committer_start(store_t *store)
{
    committer_t *com = calloc(1, sizeof(*com));
    if (!com)
        return NULL;
    com->store = store;
    pthread_mutex_init(&com->mu, NULL);
    pthread_cond_init(&com->cv, NULL);
    if (pthread_create(&com->thread, NULL, committer_main, com) != 0) {
        pthread_mutex_destroy(&com->mu);
        pthread_cond_destroy(&com->cv);
        free(com);
        return NULL;
    }
    return com;
}

void committer_submit(committer_t *com, committer_job_t *job)
{
    pthread_mutex_lock(&com->mu);
    if (com->job)
        abort(); /* a programming error: depth one */
    com->job = job;
    com->done = false;
    pthread_cond_broadcast(&com->cv);
    pthread_mutex_unlock(&com->mu);
}

bool committer_idle(committer_t *com)
{
    bool idle;
    pthread_mutex_lock(&com->mu);
    idle = com->job == NULL;
    pthread_mutex_unlock(&com->mu);
    return idle;
}

committer_job_t *committer_collect(committer_t *com, bool wait)
{
    committer_job_t *job = NULL;

    pthread_mutex_lock(&com->mu);
    if (com->job && wait)
        while (!com->done)
            pthread_cond_wait(&com->cv, &com->mu);
    if (com->job && com->done) {
        job = com->job;
        com->job = NULL;
        com->done = false;
    }
    pthread_mutex_unlock(&com->mu);
    return job;
}

void committer_stop(committer_t *com)
{
    if (!com)
        return;
    committer_collect(com, true);
    pthread_mutex_lock(&com->mu);
    com->quit = true;
    pthread_cond_broadcast(&com->cv);
    pthread_mutex_unlock(&com->mu);
    pthread_join(com->thread, NULL);
    pthread_mutex_destroy(&com->mu);
    pthread_cond_destroy(&com->cv);
    free(com);
}
