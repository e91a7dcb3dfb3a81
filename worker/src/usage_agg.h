/* Token-usage sums by daily bucket (tenant_id, day, token_type, operation,
 * model, agent_id), and their rows for Postgres: daily ones, and monthly
 * ones grouped from them, each sorted in the order of its table's primary
 * key (the one lock order of every writer). */
#ifndef TALLY_USAGE_AGG_H
#define TALLY_USAGE_AGG_H

#include <stddef.h>
#include <stdint.h>

#include "usage_event.h"

#define AGG_N_SUMS 5 /* tokens, prompt, completion, thoughts, cached */

typedef struct agg agg_t;

/* Room for `expected` buckets at first; grows as needed. */
agg_t *agg_new(size_t expected);
void agg_free(agg_t *a);
void agg_clear(agg_t *a); /* no buckets, memory kept */
void agg_zero(agg_t *a);  /* buckets kept, every sum back to 0 */
size_t agg_count(const agg_t *a);    /* buckets */
size_t agg_nonempty(const agg_t *a); /* buckets that count events */

/* The bucket of (tenant_id, day, token_type, operation, model, agent_id),
 * created if new: its index. `parts` are tenant_id, token_type,
 * operation, model, agent_id ("" when absent); `day` counts days since
 * 1970-01-01. */
uint32_t agg_bucket(agg_t *a, const char *const parts[5], int64_t day);
void agg_add(agg_t *a, uint32_t bucket, const int64_t sums[AGG_N_SUMS],
             int64_t events);

/* Adds every bucket of `from` that counts events into `into`. */
void agg_merge(agg_t *into, const agg_t *from);

/* COPY text rows of the buckets that count events: tenant_id, day (days
 * since 1970-01-01), token_type, operation, model, agent_id, the five
 * sums, events; sorted as tally.token_usage_daily's primary key sorts
 * them, enums in the order of their labels in `token_types` and
 * `operations` (as enum_range() lists them; a label missing from them
 * sorts after the others, by its bytes). Valid until the next call. */
const char *agg_daily_rows(agg_t *a, const usage_enum_t *token_types,
                           const usage_enum_t *operations, size_t *len,
                           size_t *rows);

/* The same rows summed by month (the day number of its first day
 * instead of the day), sorted as tally.token_usage_monthly's key. */
const char *agg_monthly_rows(agg_t *a, const usage_enum_t *token_types,
                             const usage_enum_t *operations, size_t *len,
                             size_t *rows);

#endif
