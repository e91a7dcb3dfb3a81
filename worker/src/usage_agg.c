/* Token-usage sums by daily bucket, and their rows for Postgres. */
#include "usage_agg.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "copy_buf.h"
#include "hash.h"
#include "rfc3339.h"

typedef struct {
    uint64_t hash;
    size_t key_off;        /* arena: tenant\0type\0op\0model\0agent\0 */
    uint16_t part_off[5];  /* of each part, from key_off */
    uint16_t key_len;      /* NULs included */
    int64_t day;
    int64_t sums[AGG_N_SUMS];
    int64_t events;
    /* For sorting: */
    int64_t month;         /* day number of the month's first day */
    uint32_t rank[2];      /* of token_type and operation */
    uint32_t srank[3];     /* of tenant_id, model, agent_id (bytewise) */
} agg_bucket_t;

struct agg {
    agg_bucket_t *buckets;
    size_t n, cap;
    uint32_t *slots; /* open addressing, index + 1 (0: empty) */
    size_t mask;
    copy_buf_t arena;
    copy_buf_t rows;
    size_t *order;
    size_t order_cap;
};

#define RANK_UNKNOWN UINT32_MAX

agg_t *agg_new(size_t expected)
{
    agg_t *a = calloc(1, sizeof(*a));
    size_t slots = hash_slots(expected);

    if (!a)
        return NULL;
    a->cap = expected ? expected : 16;
    a->buckets = malloc(a->cap * sizeof(*a->buckets));
    a->slots = calloc(slots, sizeof(*a->slots));
    a->mask = slots - 1;
    if (!a->buckets || !a->slots) {
        agg_free(a);
        return NULL;
    }
    return a;
}

void agg_free(agg_t *a)
{
    if (!a)
        return;
    free(a->buckets);
    free(a->slots);
    copy_buf_free(&a->arena);
    copy_buf_free(&a->rows);
    free(a->order);
    free(a);
}

void agg_clear(agg_t *a)
{
    memset(a->slots, 0, (a->mask + 1) * sizeof(*a->slots));
    a->n = 0;
    a->arena.len = 0;
    a->rows.len = 0;
}

void agg_zero(agg_t *a)
{
    for (size_t i = 0; i < a->n; i++) {
        memset(a->buckets[i].sums, 0, sizeof(a->buckets[i].sums));
        a->buckets[i].events = 0;
    }
}

size_t agg_count(const agg_t *a)
{
    return a->n;
}

size_t agg_nonempty(const agg_t *a)
{
    size_t n = 0;
    for (size_t i = 0; i < a->n; i++)
        n += a->buckets[i].events > 0;
    return n;
}

/* Twice the slots once half are taken. */
static void agg_grow(agg_t *a)
{
    size_t slots = (a->mask + 1) * 2;
    uint32_t *ns;

    if (a->n == a->cap) {
        a->cap *= 2;
        a->buckets = realloc(a->buckets, a->cap * sizeof(*a->buckets));
        if (!a->buckets)
            abort();
    }
    if ((a->n + 1) * 2 <= a->mask + 1)
        return;
    ns = calloc(slots, sizeof(*ns));
    if (!ns)
        abort();
    for (size_t i = 0; i < a->n; i++) {
        size_t s = a->buckets[i].hash & (slots - 1);
        while (ns[s])
            s = (s + 1) & (slots - 1);
        ns[s] = (uint32_t)(i + 1);
    }
    free(a->slots);
    a->slots = ns;
    a->mask = slots - 1;
}

static const char *agg_part(const agg_t *a, const agg_bucket_t *b, int i)
{
    return a->arena.data + b->key_off + b->part_off[i];
}

uint32_t agg_bucket(agg_t *a, const char *const parts[5], int64_t day)
{
    size_t lens[5], key_len = 0, slot;
    uint64_t h = hash_bytes(HASH_SEED, &day, sizeof(day));
    agg_bucket_t *b;

    for (int i = 0; i < 5; i++) {
        lens[i] = strlen(parts[i]) + 1;
        h = hash_bytes(h, parts[i], lens[i]);
        key_len += lens[i];
    }
    for (slot = h & a->mask; a->slots[slot]; slot = (slot + 1) & a->mask) {
        const agg_bucket_t *o = &a->buckets[a->slots[slot] - 1];
        int i;
        if (o->hash != h || o->day != day || o->key_len != key_len)
            continue;
        for (i = 0; i < 5; i++)
            if (memcmp(agg_part(a, o, i), parts[i], lens[i]) != 0)
                break;
        if (i == 5)
            return a->slots[slot] - 1;
    }
    if (a->n == a->cap || (a->n + 1) * 2 > a->mask + 1) {
        agg_grow(a);
        for (slot = h & a->mask; a->slots[slot];
             slot = (slot + 1) & a->mask)
            ;
    }
    b = &a->buckets[a->n];
    memset(b, 0, sizeof(*b));
    b->hash = h;
    b->day = day;
    b->key_off = a->arena.len;
    b->key_len = (uint16_t)key_len;
    for (int i = 0, off = 0; i < 5; i++) {
        b->part_off[i] = (uint16_t)off;
        copy_buf_put(&a->arena, parts[i], lens[i]);
        off += (int)lens[i];
    }
    a->slots[slot] = (uint32_t)++a->n;
    return (uint32_t)(a->n - 1);
}

void agg_add(agg_t *a, uint32_t bucket, const int64_t sums[AGG_N_SUMS],
             int64_t events)
{
    agg_bucket_t *b = &a->buckets[bucket];
    for (int i = 0; i < AGG_N_SUMS; i++)
        b->sums[i] += sums[i];
    b->events += events;
}

void agg_merge(agg_t *into, const agg_t *from)
{
    for (size_t i = 0; i < from->n; i++) {
        const agg_bucket_t *b = &from->buckets[i];
        const char *parts[5];
        if (b->events == 0)
            continue;
        for (int k = 0; k < 5; k++)
            parts[k] = agg_part(from, b, k);
        agg_add(into, agg_bucket(into, parts, b->day), b->sums, b->events);
    }
}

/* ---------------------------------------------------------------- */
/* Rows                                                               */

static uint32_t agg_rank(const usage_enum_t *e, const char *label)
{
    for (size_t i = 0; e && i < e->n; i++)
        if (!strcmp(e->values[i], label))
            return (uint32_t)i;
    return RANK_UNKNOWN;
}

typedef struct {
    const agg_t *a;
    bool monthly;
} agg_sort_t;

/* The primary keys' order: tenant_id (bytes, COLLATE "C"), the day or
 * the month, token_type and operation (enum order), model, agent_id. */
static int agg_cmp(const void *x, const void *y, void *arg)
{
    const agg_sort_t *s = arg;
    const agg_bucket_t *b1 = &s->a->buckets[*(const size_t *)x];
    const agg_bucket_t *b2 = &s->a->buckets[*(const size_t *)y];
    int64_t d1 = s->monthly ? b1->month : b1->day;
    int64_t d2 = s->monthly ? b2->month : b2->day;
    int r;

    if (b1->srank[0] != b2->srank[0])
        return b1->srank[0] < b2->srank[0] ? -1 : 1;
    if (d1 != d2)
        return d1 < d2 ? -1 : 1;
    for (int k = 0; k < 2; k++) {
        if (b1->rank[k] != b2->rank[k])
            return b1->rank[k] < b2->rank[k] ? -1 : 1;
        if (b1->rank[k] == RANK_UNKNOWN &&
            (r = strcmp(agg_part(s->a, b1, 1 + k),
                        agg_part(s->a, b2, 1 + k))) != 0)
            return r;
    }
    if (b1->srank[1] != b2->srank[1])
        return b1->srank[1] < b2->srank[1] ? -1 : 1;
    return b1->srank[2] < b2->srank[2] ? -1 : b1->srank[2] > b2->srank[2];
}

static int agg_str_cmp(const void *x, const void *y, void *arg)
{
    const char *const *strs = arg;
    return strcmp(strs[*(const uint32_t *)x], strs[*(const uint32_t *)y]);
}

/* Sets srank[j] of the buckets a->order[0..n) to the bytewise rank of
 * their part `part` among the distinct values: each distinct string is
 * compared while ranking them, not each bucket while sorting them. */
static void agg_rank_strings(agg_t *a, size_t n, int part, int j)
{
    size_t slots = hash_slots(n), mask = slots - 1, nd = 0;
    uint32_t *tab = calloc(slots, sizeof(*tab)); /* distinct index + 1 */
    const char **strs = malloc((n + 1) * sizeof(*strs));
    uint32_t *which = malloc((n + 1) * sizeof(*which)); /* per bucket */
    uint32_t *ids = malloc((n + 1) * sizeof(*ids));

    if (!tab || !strs || !which || !ids)
        abort();
    for (size_t i = 0; i < n; i++) {
        const char *p = agg_part(a, &a->buckets[a->order[i]], part);
        size_t h = hash_bytes(HASH_SEED, p, strlen(p)) & mask;
        while (tab[h] && strcmp(strs[tab[h] - 1], p) != 0)
            h = (h + 1) & mask;
        if (!tab[h]) {
            strs[nd] = p;
            tab[h] = (uint32_t)++nd;
        }
        which[i] = tab[h] - 1;
    }
    for (size_t d = 0; d < nd; d++)
        ids[d] = (uint32_t)d;
    qsort_r(ids, nd, sizeof(*ids), agg_str_cmp, strs);
    /* The table, no longer needed (slots >= nd), becomes each distinct
     * value's rank. */
    for (size_t r = 0; r < nd; r++)
        tab[ids[r]] = (uint32_t)r;
    for (size_t i = 0; i < n; i++)
        a->buckets[a->order[i]].srank[j] = tab[which[i]];
    free(tab);
    free(strs);
    free(which);
    free(ids);
}

/* Sorts the buckets that count events; returns how many. */
static size_t agg_sort(agg_t *a, bool monthly, const usage_enum_t *tt,
                       const usage_enum_t *ops)
{
    agg_sort_t s = {a, monthly};
    size_t n = 0;

    if (a->order_cap < a->n) {
        free(a->order);
        a->order_cap = a->cap;
        a->order = malloc(a->order_cap * sizeof(*a->order));
        if (!a->order)
            abort();
    }
    for (size_t i = 0; i < a->n; i++) {
        agg_bucket_t *b = &a->buckets[i];
        int year, mon, mday;
        if (b->events == 0)
            continue;
        b->rank[0] = agg_rank(tt, agg_part(a, b, 1));
        b->rank[1] = agg_rank(ops, agg_part(a, b, 2));
        rfc3339_civil(b->day, &year, &mon, &mday);
        b->month = b->day - (mday - 1);
        a->order[n++] = i;
    }
    agg_rank_strings(a, n, 0, 0);
    agg_rank_strings(a, n, 3, 1);
    agg_rank_strings(a, n, 4, 2);
    if (n > 1) /* a->order is NULL while nothing was ever summed */
        qsort_r(a->order, n, sizeof(*a->order), agg_cmp, &s);
    return n;
}

static void agg_put_row(agg_t *a, const agg_bucket_t *b, int64_t date,
                        const int64_t sums[AGG_N_SUMS], int64_t events)
{
    copy_buf_t *r = &a->rows;
    for (int k = 0; k < 5; k++) {
        const char *p = agg_part(a, b, k);
        copy_buf_put_str(r, p, strlen(p), false);
        copy_buf_putc(r, '\t');
        if (k == 0) {
            copy_buf_put_i64(r, date);
            copy_buf_putc(r, '\t');
        }
    }
    for (int k = 0; k < AGG_N_SUMS; k++) {
        copy_buf_put_i64(r, sums[k]);
        copy_buf_putc(r, '\t');
    }
    copy_buf_put_i64(r, events);
    copy_buf_putc(r, '\n');
}

const char *agg_daily_rows(agg_t *a, const usage_enum_t *token_types,
                           const usage_enum_t *operations, size_t *len,
                           size_t *rows)
{
    size_t n = agg_sort(a, false, token_types, operations);

    a->rows.len = 0;
    for (size_t i = 0; i < n; i++) {
        const agg_bucket_t *b = &a->buckets[a->order[i]];
        agg_put_row(a, b, b->day, b->sums, b->events);
    }
    *len = a->rows.len;
    *rows = n;
    return a->rows.data;
}

/* Whether two buckets (sorted by month) fall in one monthly row. */
static bool agg_same_month(const agg_t *a, const agg_bucket_t *b1,
                           const agg_bucket_t *b2)
{
    return b1->month == b2->month && b1->key_len == b2->key_len &&
           memcmp(agg_part(a, b1, 0), agg_part(a, b2, 0), b1->key_len) ==
               0;
}

const char *agg_monthly_rows(agg_t *a, const usage_enum_t *token_types,
                             const usage_enum_t *operations, size_t *len,
                             size_t *rows)
{
    size_t n = agg_sort(a, true, token_types, operations), out = 0;

    a->rows.len = 0;
    for (size_t i = 0; i < n;) {
        const agg_bucket_t *b = &a->buckets[a->order[i]];
        int64_t sums[AGG_N_SUMS], events = 0;
        memset(sums, 0, sizeof(sums));
        for (; i < n && agg_same_month(a, b, &a->buckets[a->order[i]]);
             i++) {
            const agg_bucket_t *o = &a->buckets[a->order[i]];
            for (int k = 0; k < AGG_N_SUMS; k++)
                sums[k] += o->sums[k];
            events += o->events;
        }
        agg_put_row(a, b, b->month, sums, events);
        out++;
    }
    *len = a->rows.len;
    *rows = out;
    return a->rows.data;
}
