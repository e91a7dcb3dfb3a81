/* One batch of token-usage events: dedupe inside it, pre-aggregation. */
#include "usage_batch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rfc3339.h"

#define N_SUMS 5 /* tokens, prompt, completion, thoughts, cached */

/* A growable byte buffer. */
typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

typedef struct {
    uint64_t key_hash;     /* of tenant + key */
    uint64_t payload_hash;
    size_t key_off;        /* arena: "tenant\0key\0" */
    size_t source_off;     /* arena: "topic/partition/offset\0" */
    size_t row_off;        /* its row in `rows` */
    size_t row_len;
    size_t key_row_off;    /* its row in `keys` */
    size_t key_row_len;
    size_t reject_off;     /* arena: why Postgres rejected it */
    uint32_t bucket;       /* index into buckets */
    bool counted_before;   /* found in the dedupe store */
    bool unselected;       /* outside the range being committed */
    bool rejected;         /* Postgres refused it: never committed */
    int64_t sums[N_SUMS];
} batch_event_t;

typedef struct {
    uint64_t hash;
    size_t key_off; /* arena: tenant\0type\0op\0model\0agent\0 */
    size_t key_len; /* bytes of that run, NULs included */
    int64_t day;
    int64_t sums[N_SUMS];
    int64_t events;
} batch_bucket_t;

struct batch {
    size_t max_events;
    batch_event_t *events;
    size_t n_events;
    batch_bucket_t *buckets;
    size_t n_buckets;
    /* Open-addressing tables of index+1 (0: empty), power-of-two sized. */
    uint32_t *event_slots;
    uint32_t *bucket_slots;
    size_t slots_mask;
    buf_t arena; /* the strings the tables refer to */
    buf_t keys;  /* COPY rows of the keys, for the dedupe check */
    buf_t rows;  /* COPY rows of the events table */
    buf_t agg;   /* COPY rows of the buckets */
    size_t *sorted; /* seqs by (tenant_id, idempotency_key), on demand */
    size_t n_sorted;
};

/* ---------------------------------------------------------------- */
/* Buffers and hashing                                                */

static void buf_reserve(buf_t *b, size_t more)
{
    size_t cap = b->cap ? b->cap : 4096;
    if (b->len + more <= b->cap)
        return;
    while (cap < b->len + more)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data)
        abort(); /* out of memory: nothing sensible to do in a worker */
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_putc(buf_t *b, char c)
{
    buf_reserve(b, 1);
    b->data[b->len++] = c;
}

static void buf_put_i64(buf_t *b, int64_t v)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof(tmp), "%lld", (long long)v);
    buf_put(b, tmp, (size_t)n);
}

/* Appends a string in COPY text format: backslash, tab, newline and
 * carriage return escaped; "" becomes NULL (\N) when null_if_empty. */
static void buf_put_copy_str(buf_t *b, const char *s, size_t n,
                             bool null_if_empty)
{
    if (n == 0 && null_if_empty) {
        buf_put(b, "\\N", 2);
        return;
    }
    buf_reserve(b, n * 2);
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        switch (c) {
        case '\\':
            b->data[b->len++] = '\\';
            b->data[b->len++] = '\\';
            break;
        case '\t':
            b->data[b->len++] = '\\';
            b->data[b->len++] = 't';
            break;
        case '\n':
            b->data[b->len++] = '\\';
            b->data[b->len++] = 'n';
            break;
        case '\r':
            b->data[b->len++] = '\\';
            b->data[b->len++] = 'r';
            break;
        default:
            b->data[b->len++] = c;
        }
    }
}

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define HASH_SEED 0xcbf29ce484222325ULL

/* ---------------------------------------------------------------- */
/* Life cycle                                                         */

batch_t *batch_new(size_t max_events)
{
    batch_t *b = calloc(1, sizeof(*b));
    size_t slots = 16;

    if (!b)
        return NULL;
    while (slots < max_events * 2)
        slots *= 2;
    b->max_events = max_events;
    b->events = calloc(max_events, sizeof(*b->events));
    b->buckets = calloc(max_events, sizeof(*b->buckets));
    b->event_slots = calloc(slots, sizeof(uint32_t));
    b->bucket_slots = calloc(slots, sizeof(uint32_t));
    b->slots_mask = slots - 1;
    if (!b->events || !b->buckets || !b->event_slots || !b->bucket_slots) {
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
    free(b->buckets);
    free(b->event_slots);
    free(b->bucket_slots);
    free(b->arena.data);
    free(b->keys.data);
    free(b->rows.data);
    free(b->agg.data);
    free(b->sorted);
    free(b);
}

void batch_clear(batch_t *b)
{
    memset(b->event_slots, 0, (b->slots_mask + 1) * sizeof(uint32_t));
    memset(b->bucket_slots, 0, (b->slots_mask + 1) * sizeof(uint32_t));
    b->n_events = 0;
    b->n_buckets = 0;
    b->arena.len = 0;
    b->keys.len = 0;
    b->rows.len = 0;
    b->agg.len = 0;
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

/* Finds the bucket of `ev` (creating it), returns its index. */
static uint32_t batch_bucket_of(batch_t *b, const usage_event_t *ev)
{
    const char *parts[] = {ev->tenant_id, ev->token_type, ev->operation,
                           ev->model, ev->agent_id};
    size_t lens[5], key_len = 0;
    int64_t day = rfc3339_day_of(ev->occurred_at_us);
    uint64_t h = hash_bytes(HASH_SEED, &day, sizeof(day));
    size_t slot;

    for (int i = 0; i < 5; i++) {
        lens[i] = strlen(parts[i]) + 1;
        h = hash_bytes(h, parts[i], lens[i]);
        key_len += lens[i];
    }
    for (slot = h & b->slots_mask; b->bucket_slots[slot];
         slot = (slot + 1) & b->slots_mask) {
        batch_bucket_t *bk = &b->buckets[b->bucket_slots[slot] - 1];
        const char *k;
        size_t off = 0;
        int i;
        if (bk->hash != h || bk->day != day || bk->key_len != key_len)
            continue;
        k = b->arena.data + bk->key_off;
        for (i = 0; i < 5; i++) {
            if (memcmp(k + off, parts[i], lens[i]) != 0)
                break;
            off += lens[i];
        }
        if (i == 5)
            return b->bucket_slots[slot] - 1;
    }
    {
        batch_bucket_t *bk = &b->buckets[b->n_buckets];
        memset(bk, 0, sizeof(*bk));
        bk->hash = h;
        bk->day = day;
        bk->key_off = b->arena.len;
        bk->key_len = key_len;
        for (int i = 0; i < 5; i++)
            buf_put(&b->arena, parts[i], lens[i]);
        b->bucket_slots[slot] = (uint32_t)++b->n_buckets;
        return (uint32_t)(b->n_buckets - 1);
    }
}

/* Appends the event's key row and events-table row. */
static void batch_stage_row(batch_t *b, batch_event_t *e, size_t seq,
                            const usage_event_t *ev, const char *source)
{
    buf_t *k = &b->keys, *s = &b->rows;
    const int64_t nums[] = {ev->tokens, ev->prompt_tokens,
                            ev->completion_tokens, ev->thoughts_tokens,
                            ev->cached_tokens};
    const char *ids[] = {ev->agent_id, ev->conversation_id,
                         ev->collection_id, ev->owner_tenant_id};
    char ts[32];

    e->key_row_off = k->len;
    buf_put_i64(k, (int64_t)seq);
    buf_putc(k, '\t');
    buf_put_copy_str(k, ev->tenant_id, strlen(ev->tenant_id), false);
    buf_putc(k, '\t');
    buf_put_copy_str(k, ev->idempotency_key, strlen(ev->idempotency_key),
                     false);
    buf_putc(k, '\t');
    buf_put_i64(k, (int64_t)ev->payload_hash);
    buf_putc(k, '\n');
    e->key_row_len = k->len - e->key_row_off;

    e->row_off = s->len;
    buf_put_copy_str(s, ev->tenant_id, strlen(ev->tenant_id), false);
    buf_putc(s, '\t');
    buf_put_copy_str(s, ev->idempotency_key, strlen(ev->idempotency_key),
                     false);
    buf_putc(s, '\t');
    rfc3339_format(ev->occurred_at_us, ts);
    buf_put(s, ts, strlen(ts));
    buf_putc(s, '\t');
    buf_put_copy_str(s, ev->token_type, strlen(ev->token_type), false);
    buf_putc(s, '\t');
    buf_put_copy_str(s, ev->operation, strlen(ev->operation), false);
    buf_putc(s, '\t');
    buf_put_copy_str(s, ev->model, strlen(ev->model), false);
    for (int i = 0; i < 4; i++) {
        buf_putc(s, '\t');
        buf_put_copy_str(s, ids[i], strlen(ids[i]), true);
    }
    for (int i = 0; i < N_SUMS; i++) {
        buf_putc(s, '\t');
        buf_put_i64(s, nums[i]);
    }
    buf_putc(s, '\t');
    buf_put_copy_str(s, ev->metadata ? ev->metadata : "",
                     ev->metadata ? ev->metadata_len : 0, true);
    buf_putc(s, '\t');
    buf_put_i64(s, (int64_t)ev->payload_hash);
    buf_putc(s, '\t');
    buf_put_copy_str(s, source, strlen(source), false);
    buf_putc(s, '\n');
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
    buf_put(&b->arena, ev->tenant_id, tlen);
    buf_put(&b->arena, ev->idempotency_key, klen);
    e->source_off = b->arena.len;
    buf_put(&b->arena, source, strlen(source) + 1);
    e->bucket = batch_bucket_of(b, ev);
    e->counted_before = false;
    e->unselected = false;
    e->rejected = false;
    e->sums[0] = ev->tokens;
    e->sums[1] = ev->prompt_tokens;
    e->sums[2] = ev->completion_tokens;
    e->sums[3] = ev->thoughts_tokens;
    e->sums[4] = ev->cached_tokens;
    batch_stage_row(b, e, b->n_events, ev, source);
    b->event_slots[slot] = (uint32_t)++b->n_events;
    return BATCH_ADDED;
}

/* ---------------------------------------------------------------- */
/* Reading back                                                       */

const char *batch_key_row(const batch_t *b, size_t seq, size_t *len)
{
    if (seq >= b->n_events) {
        *len = 0;
        return "";
    }
    *len = b->events[seq].key_row_len;
    return b->keys.data + b->events[seq].key_row_off;
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
    buf_put(&b->arena, why, strlen(why) + 1);
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

const char *batch_aggregate_copy(batch_t *b, size_t *len, size_t *rows,
                                 size_t *events)
{
    size_t n_rows = 0, n_events = 0;

    for (size_t i = 0; i < b->n_buckets; i++) {
        memset(b->buckets[i].sums, 0, sizeof(b->buckets[i].sums));
        b->buckets[i].events = 0;
    }
    for (size_t i = 0; i < b->n_events; i++) {
        const batch_event_t *e = &b->events[i];
        batch_bucket_t *bk = &b->buckets[e->bucket];
        if (e->counted_before || e->unselected || e->rejected)
            continue;
        for (int j = 0; j < N_SUMS; j++)
            bk->sums[j] += e->sums[j];
        bk->events++;
        n_events++;
    }
    b->agg.len = 0;
    for (size_t i = 0; i < b->n_buckets; i++) {
        const batch_bucket_t *bk = &b->buckets[i];
        const char *k = b->arena.data + bk->key_off;
        if (bk->events == 0)
            continue;
        /* tenant, then day, then type, op, model, agent */
        for (int f = 0; f < 5; f++) {
            size_t n = strlen(k);
            buf_put_copy_str(&b->agg, k, n, false);
            buf_putc(&b->agg, '\t');
            if (f == 0) {
                buf_put_i64(&b->agg, bk->day);
                buf_putc(&b->agg, '\t');
            }
            k += n + 1;
        }
        for (int j = 0; j < N_SUMS; j++) {
            buf_put_i64(&b->agg, bk->sums[j]);
            buf_putc(&b->agg, '\t');
        }
        buf_put_i64(&b->agg, bk->events);
        buf_putc(&b->agg, '\n');
        n_rows++;
    }
    *len = b->agg.len;
    *rows = n_rows;
    *events = n_events;
    return b->agg.data;
}
