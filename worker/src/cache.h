/* Redis: UNLINK exact keys, SCAN prefix sets, PUBLISH notices (hiredis). */
#ifndef TALLY_CACHE_H
#define TALLY_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache_key.h"

typedef struct cache cache_t;

/* One invalidation to apply: what it names, and what Redis did. */
typedef struct {
    const cache_targets_t *targets; /* borrowed */
    const char *tenant_id;          /* for the notice */
    const char *event_id;           /* "" when the event had none */
    uint64_t deleted;               /* out: keys Redis removed for it */
    uint64_t prefix_matches;        /* out: keys found under its prefixes */
} cache_job_t;

/* Parses redis://[[user]:password@]host[:port][/db] (also a bare
 * host:port). NULL with errstr on a bad URL. Does not connect. */
cache_t *cache_new(const char *url, char *errstr, size_t errstr_size);
void cache_free(cache_t *c);

/* Writes "[user@]host:port/db" -- never the password -- for logs.
 * Returns what snprintf() returns. */
int cache_describe(const cache_t *c, char *buf, size_t size);

/* Connects if not connected (timeouts: 5 s connect, 30 s per command),
 * AUTH and SELECT as the URL says, then a PING (NOAUTH, LOADING show
 * here). 0, or -1 with errstr. */
int cache_connect(cache_t *c, char *errstr, size_t errstr_size);
bool cache_is_connected(const cache_t *c);

/* Connects if needed and sends PING: whether Redis answers now (for
 * /readyz and tally_redis_up while there is nothing to apply). 0 or -1
 * with errstr; the connection is dropped on failure. */
int cache_ping(cache_t *c, char *errstr, size_t errstr_size);
void cache_disconnect(cache_t *c);

/* Applies the jobs in order. Every exact key UNLINKed: one UNLINK per
 * job with its keys (distinct within a job, so each count is the job's
 * own; a key an earlier job removed counts 0 for a later one), all
 * pipelined. Every prefix of every job found in ONE SCAN pass (MATCH on
 * the prefixes' common prefix, COUNT scan_count) with keys filtered
 * client-side against all prefixes and UNLINKed likewise, one UNLINK per
 * job and page (a key under several jobs' prefixes counts for the
 * first). Then one notice per job, in order, PUBLISHed on `channel`,
 * pipelined, every PUBLISH sent after every UNLINK:
 *   {"tenant_id":..,"keys":[..],"prefixes":[..],"deleted":N,"event_id":..}
 * (event_id only when set). Without prefixes the notices are sent as the
 * UNLINK counts come back: about one round trip for the batch, whatever
 * its size; with prefixes, one per SCAN page plus two. Returns 0 when
 * Redis confirmed everything (every reply read), -1 with errstr
 * otherwise; the caller retries the same jobs later: deletes are
 * idempotent, so a retry only repeats notices. Connects first when not
 * connected; resets every job's counters before starting (after a retry
 * they count only what that attempt removed); scan_count <= 0 means
 * 1000. Any failure drops the connection, so that no half-read pipeline
 * survives. The buffers it needs stay in c from one call to the next: a
 * call allocates nothing once they have grown to the batch's size (but
 * hiredis's reply objects). */
int cache_apply(cache_t *c, cache_job_t *jobs, size_t n, const char *channel,
                long scan_count, char *errstr, size_t errstr_size);

#endif
