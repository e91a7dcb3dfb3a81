/* One batch of token-usage events: dedupe inside it, pre-aggregation. */
#ifndef TALLY_USAGE_BATCH_H
#define TALLY_USAGE_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "usage_agg.h"
#include "usage_event.h"

typedef struct batch batch_t;

typedef enum {
    BATCH_ADDED,     /* first time this (tenant, key) is seen in the batch */
    BATCH_DUPLICATE, /* same key, same payload: dropped */
    BATCH_CONFLICT,  /* same key, another payload: dropped, first wins */
} batch_add_result_t;

/* A batch holds at most `max_events` distinct events. NULL on ENOMEM. */
batch_t *batch_new(size_t max_events);
void batch_free(batch_t *b);

/* Empties the batch, keeping its memory for the next one. */
void batch_clear(batch_t *b);

/* Copies the event into the batch (the caller keeps `ev`). `source` is
 * where it came from ("<topic>/<partition>/<offset>"), stored for audit.
 * Must not be called when batch_is_full(). */
batch_add_result_t batch_add(batch_t *b, const usage_event_t *ev,
                             const char *source);

size_t batch_count(const batch_t *b); /* distinct events held */
bool batch_is_full(const batch_t *b);

/* The fingerprint of event `seq`'s payload (the dedupe check compares it
 * with the stored one's: a key reused with another payload). */
uint64_t batch_event_hash(const batch_t *b, size_t seq);

/* The seqs of the batch's events ordered by (tenant_id, idempotency_key)
 * bytewise, computed once per batch: inserting in this one order
 * everywhere means two transactions inserting the same keys never wait
 * for each other in a cycle (no deadlock). Valid until batch_add/clear. */
const size_t *batch_sorted_by_key(batch_t *b);

/* Selection, for committing part of a batch (finding the events Postgres
 * rejects): only the events of [lo, hi) that are not rejected are
 * selected; batch_select(b, 0, SIZE_MAX) selects all. Unselected events
 * are left out of batch_aggregate_copy() and must be left out of the
 * rows the caller copies. */
void batch_select(batch_t *b, size_t lo, size_t hi);
bool batch_is_selected(const batch_t *b, size_t seq);

/* Clears every batch_mark_counted_before() (a new attempt). */
void batch_reset_marks(batch_t *b);

/* Marks event `seq` as refused by Postgres for good (`why`: the SQL
 * error), so that it is never selected again; batch_rejected() returns
 * the reason, or NULL for an event not rejected. */
void batch_reject(batch_t *b, size_t seq, const char *why);
const char *batch_rejected(const batch_t *b, size_t seq);

/* Event `seq` as one COPY text row of tally.token_usage_events (tenant_id,
 * idempotency_key, occurred_at, token_type, operation, model, agent_id,
 * conversation_id, collection_id, owner_tenant_id, tokens, prompt_tokens,
 * completion_tokens, thoughts_tokens, cached_tokens, metadata,
 * payload_hash, source). Rows of consecutive seqs are contiguous. */
const char *batch_event_row(const batch_t *b, size_t seq, size_t *len);

bool batch_is_counted_before(const batch_t *b, size_t seq);

/* Marks event `seq` as already counted (found in the dedupe store): it is
 * left out of the sums. Out-of-range seq is ignored. */
void batch_mark_counted_before(batch_t *b, size_t seq);

/* The source and key of event `seq`, for logs. */
const char *batch_event_source(const batch_t *b, size_t seq);
const char *batch_event_key(const batch_t *b, size_t seq, const char **tenant);

/* Sums the selected events not marked by daily bucket (tenant, day,
 * token_type, operation, model, agent_id): the batch's buckets, holding
 * only those sums until the next call or batch_add/clear. Sets *events
 * (the events summed). */
agg_t *batch_aggregate(batch_t *b, size_t *events);

#endif
