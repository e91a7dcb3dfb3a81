/* Test-only fault points: TALLY_TEST_FAULT=NAME[:N] kills the process. */
#include "fault.h"

#include <pthread.h>
#include <stdbool.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static pthread_once_t fault_once = PTHREAD_ONCE_INIT;
static char fault_name[64];
static long fault_at = 1;
static bool fault_every; /* NAME:*N */
static atomic_long fault_passes;

static void fault_init(void)
{
    const char *v = getenv("TALLY_TEST_FAULT");
    const char *colon;

    if (!v || !*v)
        return;
    colon = strchr(v, ':');
    snprintf(fault_name, sizeof(fault_name), "%.*s",
             (int)(colon ? (size_t)(colon - v) : strlen(v)), v);
    if (colon && colon[1] == '*') {
        fault_every = true;
        colon++;
    }
    if (colon)
        fault_at = atol(colon + 1) > 0 ? atol(colon + 1) : 1;
}

bool fault_hit(const char *name)
{
    long pass;

    pthread_once(&fault_once, fault_init);
    if (!fault_name[0] || strcmp(fault_name, name) != 0)
        return false;
    pass = atomic_fetch_add(&fault_passes, 1) + 1;
    if (fault_every ? pass % fault_at != 0 : pass != fault_at)
        return false;
    log_warn("TALLY_TEST_FAULT: %s (pass %ld)", name, pass);
    return true;
}

void fault_point(const char *name)
{
    pthread_once(&fault_once, fault_init);
    if (!fault_name[0] || strcmp(fault_name, name) != 0)
        return;
    if (atomic_fetch_add(&fault_passes, 1) + 1 != fault_at)
        return;
    log_error("TALLY_TEST_FAULT: killing the process at %s", name);
    fflush(stderr);
    raise(SIGKILL);
}
