/* One batch of token-usage events: dedupe inside it, pre-aggregation. */
#include "usage_batch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "copy_buf.h"
#include "hash.h"
#include "rfc3339.h"

#define N_SUMS AGG_N_SUMS

typedef struct {
    uint64_t key_hash;     /* of tenant + key */
    uint64_t payload_hash;
    size_t key_off;        /* arena: "tenant\0key\0" */
    size_t source_off;     /* arena: "topic/partition/offset\0" */
    size_t row_off;        /* its row in `rows` */
    size_t row_len;
    size_t reject_off;     /* arena: why Postgres rejected it */
    uint32_t bucket;       /* its daily bucket in `agg` */
    bool counted_before;   /* found in the dedupe store */
    bool unselected;       /* outside the range being committed */
    bool rejected;         /* Postgres refused it: never committed */
    int64_t sums[N_SUMS];
} batch_event_t;


struct batch {
    size_t max_events;
    batch_event_t *events;
    size_t n_events;
    agg_t *agg;  /* the daily buckets of its events */
    /* Open-addressing table of index+1 (0: empty), power-of-two sized. */
    uint32_t *event_slots;
    size_t slots_mask;
    copy_buf_t arena; /* the strings the table refers to */
    copy_buf_t rows;  /* COPY rows of the events table */
    size_t *sorted; /* seqs by (tenant_id, idempotency_key), on demand */
    size_t n_sorted;
};

/* ---------------------------------------------------------------- */
/* Life cycle                                                         */

batch_t *batch_new(size_t max_events)
{
    batch_t *b = calloc(1, sizeof(*b));
    size_t slots = hash_slots(max_events);

    if (!b)
        return NULL;
    b->max_events = max_events;
    b->events = calloc(max_events, sizeof(*b->events));
    b->agg = agg_new(max_events);
    b->event_slots = calloc(slots, sizeof(uint32_t));
    b->slots_mask = slots - 1;
    if (!b->events || !b->agg || !b->event_slots) {
        batch_free(b);
        return NULL;
    }
    return b;
}

void batch_free(batch_t *b)
{
    if (!b)
        return;
    free(b->events);
    agg_free(b->agg);
    free(b->event_slots);
    copy_buf_free(&b->arena);
    copy_buf_free(&b->rows);
    free(b->sorted);
    free(b);
}

void batch_clear(batch_t *b)
{
    memset(b->event_slots, 0, (b->slots_mask + 1) * sizeof(uint32_t));
    b->n_events = 0;
    agg_clear(b->agg);
    b->arena.len = 0;
    b->rows.len = 0;
    b->n_sorted = 0;
}

size_t batch_count(const batch_t *b)
{
    return b->n_events;
}

bool batch_is_full(const batch_t *b)
{
    return b->n_events >= b->max_events;
}

/* ---------------------------------------------------------------- */
/* Adding                                                             */

/* The daily bucket of `ev` (created if new). */
static uint32_t batch_bucket_of(batch_t *b, const usage_event_t *ev)
{
    const char *parts[] = {ev->tenant_id, ev->token_type, ev->operation,
                           ev->model, ev->agent_id};
    return agg_bucket(b->agg, parts, rfc3339_day_of(ev->occurred_at_us));
}

/* Appends the event's events-table row. */
static void batch_stage_row(batch_t *b, batch_event_t *e,
                            const usage_event_t *ev, const char *source)
{
    copy_buf_t *s = &b->rows;
    const int64_t nums[] = {ev->tokens, ev->prompt_tokens,
                            ev->completion_tokens, ev->thoughts_tokens,
                            ev->cached_tokens};
    const char *ids[] = {ev->agent_id, ev->conversation_id,
                         ev->collection_id, ev->owner_tenant_id};
    char ts[32];

    e->row_off = s->len;
    copy_buf_put_str(s, ev->tenant_id, strlen(ev->tenant_id), false);
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, ev->idempotency_key, strlen(ev->idempotency_key),
                     false);
    copy_buf_putc(s, '\t');
    rfc3339_format(ev->occurred_at_us, ts);
    copy_buf_put(s, ts, strlen(ts));
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, ev->token_type, strlen(ev->token_type), false);
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, ev->operation, strlen(ev->operation), false);
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, ev->model, strlen(ev->model), false);
    for (int i = 0; i < 4; i++) {
        copy_buf_putc(s, '\t');
        copy_buf_put_str(s, ids[i], strlen(ids[i]), true);
    }
    for (int i = 0; i < N_SUMS; i++) {
        copy_buf_putc(s, '\t');
        copy_buf_put_i64(s, nums[i]);
    }
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, ev->metadata ? ev->metadata : "",
                     ev->metadata ? ev->metadata_len : 0, true);
    copy_buf_putc(s, '\t');
    copy_buf_put_i64(s, (int64_t)ev->payload_hash);
    copy_buf_putc(s, '\t');
    copy_buf_put_str(s, source, strlen(source), false);
    copy_buf_putc(s, '\n');
    e->row_len = s->len - e->row_off;
}

batch_add_result_t batch_add(batch_t *b, const usage_event_t *ev,
                             const char *source)
{
    size_t tlen = strlen(ev->tenant_id) + 1;
    size_t klen = strlen(ev->idempotency_key) + 1;
    uint64_t h = hash_bytes(hash_bytes(HASH_SEED, ev->tenant_id, tlen),
                            ev->idempotency_key, klen);
    size_t slot;
    batch_event_t *e;

    for (slot = h & b->slots_mask; b->event_slots[slot];
         slot = (slot + 1) & b->slots_mask) {
        batch_event_t *o = &b->events[b->event_slots[slot] - 1];
        const char *k = b->arena.data + o->key_off;
        if (o->key_hash == h && memcmp(k, ev->tenant_id, tlen) == 0 &&
            memcmp(k + tlen, ev->idempotency_key, klen) == 0)
            return o->payload_hash == ev->payload_hash ? BATCH_DUPLICATE
                                                       : BATCH_CONFLICT;
    }
    e = &b->events[b->n_events];
    e->key_hash = h;
    e->payload_hash = ev->payload_hash;
    e->key_off = b->arena.len;
    copy_buf_put(&b->arena, ev->tenant_id, tlen);
    copy_buf_put(&b->arena, ev->idempotency_key, klen);
    e->source_off = b->arena.len;
    copy_buf_put(&b->arena, source, strlen(source) + 1);
    e->bucket = batch_bucket_of(b, ev);
    e->counted_before = false;
    e->unselected = false;
    e->rejected = false;
    e->sums[0] = ev->tokens;
    e->sums[1] = ev->prompt_tokens;
    e->sums[2] = ev->completion_tokens;
    e->sums[3] = ev->thoughts_tokens;
    e->sums[4] = ev->cached_tokens;
    batch_stage_row(b, e, ev, source);
    b->event_slots[slot] = (uint32_t)++b->n_events;
    return BATCH_ADDED;
}

/* ---------------------------------------------------------------- */
/* Reading back                                                       */

uint64_t batch_event_hash(const batch_t *b, size_t seq)
{
    return seq < b->n_events ? b->events[seq].payload_hash : 0;
}

/* Bytewise order of "tenant\0key\0", as COLLATE "C" compares them. */
static int batch_key_cmp(const void *x, const void *y, void *arg)
{
    const batch_t *b = arg;
    const char *kx = b->arena.data + b->events[*(const size_t *)x].key_off;
    const char *ky = b->arena.data + b->events[*(const size_t *)y].key_off;
    int r = strcmp(kx, ky);
    return r ? r : strcmp(kx + strlen(kx) + 1, ky + strlen(ky) + 1);
}

const size_t *batch_sorted_by_key(batch_t *b)
{
    if (b->n_sorted != b->n_events) {
        size_t *s = realloc(b->sorted, (b->max_events ? b->max_events : 1) *
                                           sizeof(*s));
        if (!s)
            abort();
        b->sorted = s;
        for (size_t i = 0; i < b->n_events; i++)
            s[i] = i;
        qsort_r(s, b->n_events, sizeof(*s), batch_key_cmp, b);
        b->n_sorted = b->n_events;
    }
    return b->sorted;
}

bool batch_is_selected(const batch_t *b, size_t seq)
{
    return seq < b->n_events && !b->events[seq].unselected &&
           !b->events[seq].rejected;
}

void batch_select(batch_t *b, size_t lo, size_t hi)
{
    for (size_t i = 0; i < b->n_events; i++)
        b->events[i].unselected = i < lo || i >= hi;
}

void batch_reset_marks(batch_t *b)
{
    for (size_t i = 0; i < b->n_events; i++)
        b->events[i].counted_before = false;
}

void batch_reject(batch_t *b, size_t seq, const char *why)
{
    if (seq >= b->n_events || b->events[seq].rejected)
        return;
    b->events[seq].rejected = true;
    b->events[seq].reject_off = b->arena.len;
    copy_buf_put(&b->arena, why, strlen(why) + 1);
}

const char *batch_rejected(const batch_t *b, size_t seq)
{
    if (seq >= b->n_events || !b->events[seq].rejected)
        return NULL;
    return b->arena.data + b->events[seq].reject_off;
}

const char *batch_event_row(const batch_t *b, size_t seq, size_t *len)
{
    if (seq >= b->n_events) {
        *len = 0;
        return "";
    }
    *len = b->events[seq].row_len;
    return b->rows.data + b->events[seq].row_off;
}

bool batch_is_counted_before(const batch_t *b, size_t seq)
{
    return seq < b->n_events && b->events[seq].counted_before;
}

void batch_mark_counted_before(batch_t *b, size_t seq)
{
    if (seq < b->n_events)
        b->events[seq].counted_before = true;
}

const char *batch_event_source(const batch_t *b, size_t seq)
{
    return seq < b->n_events ? b->arena.data + b->events[seq].source_off
                             : "?";
}

const char *batch_event_key(const batch_t *b, size_t seq, const char **tenant)
{
    const char *k;
    if (seq >= b->n_events) {
        *tenant = "?";
        return "?";
    }
    k = b->arena.data + b->events[seq].key_off;
    *tenant = k;
    return k + strlen(k) + 1;
}

agg_t *batch_aggregate(batch_t *b, size_t *events)
{
    size_t n = 0;

    agg_zero(b->agg);
    for (size_t i = 0; i < b->n_events; i++) {
        const batch_event_t *e = &b->events[i];
        if (e->counted_before || e->unselected || e->rejected)
            continue;
        agg_add(b->agg, e->bucket, e->sums, 1);
        n++;
    }
    *events = n;
    return b->agg;
}
