/* The cache key layout: what an invalidation names, SCAN patterns. */
#include "cache_key.h"

#include "usage_event.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Always cached with the conv segment set to their conversation. */
static const char *const conversation_types[] = {
    "conversation",
    "conversation_memory",
    "conversation_message",
    "conversation_messages_list",
};
#define N_CONVERSATION_TYPES                                                   \
    (sizeof(conversation_types) / sizeof(conversation_types[0]))

/* ------------------------------------------------------------------ */
/* Building the targets                                               */
/* ------------------------------------------------------------------ */

/* Writes the strings twice: a dry run (buf NULL) that only adds up their
 * size, then into one buffer of that size, so that nothing is allocated
 * per key and nothing is ever truncated. */
typedef struct {
    const invalidation_t *inv;
    const char *prefix;
    cache_targets_t *t;
    char *buf; /* NULL in the dry run */
    size_t cap;
    size_t used;
    bool overflow; /* more than CACHE_TARGETS_MAX: a bug, not input */
} builder_t;

static void put(builder_t *b, const char *s, size_t n)
{
    if (b->buf && n <= b->cap - b->used)
        memcpy(b->buf + b->used, s, n);
    b->used += n;
}

static void put_str(builder_t *b, const char *s)
{
    put(b, s, strlen(s));
}

/* "<prefix>:{<tenant>}:<type>[:agent=A][:conv=C][:coll=L]:", a segment
 * for each non-empty value. */
static void put_scope(builder_t *b, const char *type, const char *agent,
                      const char *conv, const char *coll)
{
    put_str(b, b->prefix);
    put(b, ":{", 2);
    put_str(b, b->inv->tenant_id);
    put(b, "}:", 2);
    put_str(b, type);
    if (agent[0]) {
        put(b, ":agent=", 7);
        put_str(b, agent);
    }
    if (conv[0]) {
        put(b, ":conv=", 6);
        put_str(b, conv);
    }
    if (coll[0]) {
        put(b, ":coll=", 6);
        put_str(b, coll);
    }
    put(b, ":", 1);
}

/* NUL-terminates the string begun at `start` and records it, unless the
 * same string of the same kind is already there: then it is taken back
 * (the dry run keeps its room, so the buffer is at most a little big). */
static void finish(builder_t *b, size_t start, cache_target_kind_t kind)
{
    put(b, "", 1);
    if (!b->buf)
        return;
    cache_targets_t *t = b->t;
    const char *s = b->buf + start;
    size_t len = b->used - start - 1;
    for (size_t i = 0; i < t->n; i++) {
        if (t->items[i].kind == kind && t->items[i].len == len &&
            memcmp(t->items[i].str, s, len) == 0) {
            b->used = start;
            return;
        }
    }
    if (t->n == CACHE_TARGETS_MAX) {
        b->overflow = true;
        return;
    }
    t->items[t->n++] = (cache_target_t){.kind = kind, .str = s, .len = len};
    if (kind == CACHE_TARGET_KEY)
        t->n_keys++;
    else
        t->n_prefixes++;
}

static void add_key(builder_t *b, const char *type, const char *agent,
                    const char *conv, const char *coll, const char *resource)
{
    size_t start = b->used;
    put_scope(b, type, agent, conv, coll);
    put_str(b, resource);
    finish(b, start, CACHE_TARGET_KEY);
}

static void add_prefix(builder_t *b, const char *type, const char *agent,
                       const char *conv, const char *coll)
{
    size_t start = b->used;
    put_scope(b, type, agent, conv, coll);
    finish(b, start, CACHE_TARGET_PREFIX);
}

/* The contract's rules, in the order the targets are listed. */
static void plan(builder_t *b)
{
    const invalidation_t *inv = b->inv;
    const char *r = inv->resource_id, *agent = inv->agent_id,
               *conv = inv->conversation_id, *coll = inv->collection_id;
    bool all = strcmp(r, "*") == 0;

    if (all)
        add_prefix(b, inv->data_type, agent, conv, coll);
    else
        add_key(b, inv->data_type, agent, conv, coll, r);
    if (!inv->cascade || all)
        return;

    if (strcmp(inv->data_type, "agent") == 0) {
        add_key(b, "agent_config", agent, conv, coll, r);
        add_key(b, "agent_tools", agent, conv, coll, r);
        if (inv->invalidate_conversations)
            for (size_t i = 0; i < N_CONVERSATION_TYPES; i++)
                add_prefix(b, conversation_types[i], r, "", "");
    } else if (strcmp(inv->data_type, "conversation") == 0) {
        for (size_t i = 0; i < N_CONVERSATION_TYPES; i++)
            add_prefix(b, conversation_types[i], agent, r, "");
    }
}

static bool optional_id(const char *s)
{
    return s[0] == '\0' || usage_is_id(s, strlen(s));
}

/* The parser's rules again, on the struct (every array NUL-terminated
 * within its size), so that no caller can build keys outside the tenant
 * from a struct it filled by hand. */
static bool is_valid(const invalidation_t *inv)
{
    const char *r = inv->resource_id;
    if (!memchr(inv->tenant_id, '\0', sizeof(inv->tenant_id)) ||
        !memchr(inv->data_type, '\0', sizeof(inv->data_type)) ||
        !memchr(r, '\0', sizeof(inv->resource_id)) ||
        !memchr(inv->agent_id, '\0', sizeof(inv->agent_id)) ||
        !memchr(inv->conversation_id, '\0', sizeof(inv->conversation_id)) ||
        !memchr(inv->collection_id, '\0', sizeof(inv->collection_id)))
        return false;
    bool all = strcmp(r, "*") == 0;
    return usage_is_id(inv->tenant_id, strlen(inv->tenant_id)) &&
           invalidation_is_data_type(inv->data_type, strlen(inv->data_type)) &&
           (all || usage_is_id(r, strlen(r))) && optional_id(inv->agent_id) &&
           optional_id(inv->conversation_id) &&
           optional_id(inv->collection_id) && !(all && inv->cascade);
}

int cache_targets_build(const invalidation_t *inv, const char *prefix,
                        cache_targets_t *out)
{
    builder_t b = {
        .inv = inv, .prefix = prefix ? prefix : CACHE_PREFIX_DEFAULT, .t = out};
    int rc = -1;

    memset(out, 0, sizeof(*out));
    if (!inv || !is_valid(inv)) {
        errno = EINVAL;
        goto out;
    }

    plan(&b); /* dry run: b.used is the size needed */
    b.cap = b.used;
    b.used = 0;
    b.buf = malloc(b.cap);
    if (!b.buf) {
        errno = ENOMEM;
        goto out;
    }
    out->buf = b.buf;
    plan(&b);
    if (b.overflow || b.used > b.cap) {
        errno = EINVAL; /* cannot happen: CACHE_TARGETS_MAX is too small */
        goto out;
    }
    rc = 0;
out:
    if (rc != 0)
        cache_targets_free(out);
    return rc;
}

void cache_targets_free(cache_targets_t *t)
{
    if (!t)
        return;
    free(t->buf);
    memset(t, 0, sizeof(*t));
}

/* ------------------------------------------------------------------ */
/* Patterns                                                           */
/* ------------------------------------------------------------------ */

/* The characters Redis's glob matcher (stringmatchlen) gives a meaning;
 * '-' and '^' only mean something inside [...], which cannot open once
 * '[' is escaped. */
static bool is_glob_special(char c)
{
    return c == '*' || c == '?' || c == '[' || c == ']' || c == '\\';
}

size_t cache_glob_escape(const char *prefix, char *out, size_t out_size)
{
    size_t need = 1; /* the final '*' */
    for (const char *c = prefix; *c; c++)
        need += is_glob_special(*c) ? 2 : 1;
    if (need >= out_size) {
        if (out_size > 0)
            out[0] = '\0';
        return need;
    }
    size_t o = 0;
    for (const char *c = prefix; *c; c++) {
        if (is_glob_special(*c))
            out[o++] = '\\';
        out[o++] = *c;
    }
    out[o++] = '*';
    out[o] = '\0';
    return need;
}

bool cache_key_has_prefix(const char *key, size_t key_len, const char *prefix)
{
    size_t n = strlen(prefix);
    return n <= key_len && memcmp(key, prefix, n) == 0;
}
