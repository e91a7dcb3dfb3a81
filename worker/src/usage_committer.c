/* The token-usage committer thread: one batch's Postgres transaction at a
 * time, while the consumer fills the next. */
#include "usage_committer.h"

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

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

static void *committer_main(void *arg)
{
    committer_t *com = arg;

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
        job->status =
            store_commit_batch(com->store, job->batch, job->pos, job->n,
                               &job->res, job->err, sizeof(job->err));
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
