/* Test-only fault points: TALLY_TEST_FAULT=NAME[:N] kills the process. */
#ifndef TALLY_FAULT_H
#define TALLY_FAULT_H

#include <stdbool.h>

/* When the environment variable TALLY_TEST_FAULT names this point
 * ("after-pg-commit", "inside-txn", "window-open", "before-redis-apply"),
 * its N-th pass
 * (default 1) logs and raises SIGKILL: the crash tests use it to stop the
 * worker at a precise step. Without the variable it costs one branch. */
void fault_point(const char *name);

/* For faults the caller simulates itself ("commit-lost": the connection
 * drops while COMMIT is in flight): true on the N-th pass of NAME[:N], or
 * on every N-th pass with NAME:*N. */
bool fault_hit(const char *name);

#endif
