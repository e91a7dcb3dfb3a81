/* Runs one data-driven cache-invalidation case: invalidation_case <dir>. */
#include "cache_key.h"
#include "case_dir.h"
#include "invalidation_event.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A case directory holds
 *   input.json       the message, exact bytes
 *   expected         "ok" or a reason code (invalidation_reason_code())
 *   targets          required for ok cases: what cache_targets_build()
 *                    emits, in its order, one "key <k>" or "prefix <p>"
 *                    line each; this pins the Redis wire format
 *   expected_fields  optional, for ok cases: "name=value" lines that must
 *                    appear in the dump of the parsed event (see dump())
 *   ctx              optional "name=value" lines: prefix (--cache-prefix,
 *                    default "cache"), max_message_bytes (default 1 MiB)
 * Exit status 0 iff the outcome matches, 2 if the case is malformed. */

#define DEFAULT_MAX_BYTES (1024 * 1024)

typedef struct {
    char prefix[1024];
    size_t max_message_bytes;
} case_ctx_t;

static int apply_ctx(char *text, case_ctx_t *ctx)
{
    char *cursor = text, *line;
    while ((line = case_dir_next_line(&cursor))) {
        char *eq = strchr(line, '=');
        if (!eq)
            return -1;
        *eq = '\0';
        if (strcmp(line, "prefix") == 0)
            snprintf(ctx->prefix, sizeof(ctx->prefix), "%s", eq + 1);
        else if (strcmp(line, "max_message_bytes") == 0)
            ctx->max_message_bytes = strtoull(eq + 1, NULL, 10);
        else
            return -1;
    }
    return 0;
}

/* One "name=value" line per field, preceded by a newline so that a line
 * can be searched for as "\nname=value\n". Values are ids or checked
 * event ids: no newlines. */
static void dump(FILE *f, const void *event)
{
    const invalidation_t *inv = event;
    fprintf(f, "\ntenant_id=%s\n", inv->tenant_id);
    fprintf(f, "data_type=%s\n", inv->data_type);
    fprintf(f, "resource_id=%s\n", inv->resource_id);
    fprintf(f, "agent_id=%s\n", inv->agent_id);
    fprintf(f, "conversation_id=%s\n", inv->conversation_id);
    fprintf(f, "collection_id=%s\n", inv->collection_id);
    fprintf(f, "cascade=%d\n", inv->cascade);
    fprintf(f, "invalidate_conversations=%d\n", inv->invalidate_conversations);
    fprintf(f, "event_id=%s\n", inv->event_id);
}

/* Invariants of every build, whatever the case: each string starts with
 * the event's own "<prefix>:{<tenant>}:", prefixes end with ':', no
 * string twice, the counts add up. */
static int check_invariants(const cache_targets_t *t, const char *prefix,
                            const char *tenant)
{
    char own[1024 + 140];
    int bad = 0;
    size_t keys = 0;
    snprintf(own, sizeof(own), "%s:{%s}:", prefix, tenant);
    for (size_t i = 0; i < t->n; i++) {
        const cache_target_t *it = &t->items[i];
        if (strlen(it->str) != it->len) {
            printf("INVARIANT: item %zu length %zu\n", i, it->len);
            bad = 1;
        }
        if (!cache_key_has_prefix(it->str, it->len, own)) {
            printf("INVARIANT: %s outside %s\n", it->str, own);
            bad = 1;
        }
        if (it->kind == CACHE_TARGET_PREFIX && it->str[it->len - 1] != ':') {
            printf("INVARIANT: prefix %s does not end with ':'\n", it->str);
            bad = 1;
        }
        keys += it->kind == CACHE_TARGET_KEY;
        for (size_t j = 0; j < i; j++)
            if (t->items[j].kind == it->kind &&
                strcmp(t->items[j].str, it->str) == 0) {
                printf("INVARIANT: %s twice\n", it->str);
                bad = 1;
            }
    }
    if (keys != t->n_keys || t->n_keys + t->n_prefixes != t->n) {
        printf("INVARIANT: counts %zu keys + %zu prefixes != %zu\n", t->n_keys,
               t->n_prefixes, t->n);
        bad = 1;
    }
    return bad;
}

/* The emitted targets, line by line and in order, against `targets`. */
static int check_targets(char *expected, const cache_targets_t *t)
{
    char *cursor = expected, *line;
    size_t i = 0;
    int bad = 0;
    while ((line = case_dir_next_line(&cursor))) {
        char got[2048] = "(nothing)";
        if (i < t->n)
            snprintf(got, sizeof(got), "%s %s",
                     t->items[i].kind == CACHE_TARGET_KEY ? "key" : "prefix",
                     t->items[i].str);
        if (strcmp(line, got) != 0) {
            printf("MISMATCH: target %zu: expected \"%s\", got \"%s\"\n", i,
                   line, got);
            bad = 1;
        }
        i++;
    }
    for (; i < t->n; i++) {
        printf("MISMATCH: unexpected target %s\n", t->items[i].str);
        bad = 1;
    }
    return bad;
}

int main(int argc, char **argv)
{
    case_dir_t c;
    case_ctx_t ctx = {.prefix = CACHE_PREFIX_DEFAULT,
                      .max_message_bytes = DEFAULT_MAX_BYTES};
    cache_targets_t t = {0};
    char *targets = NULL;
    invalidation_t inv;
    char err[512];
    int rc = case_dir_open(&c, argc, argv);

    if (rc != 0)
        goto out;
    targets = case_dir_read_text(c.dir, "targets");
    if (c.ctx && apply_ctx(c.ctx, &ctx) != 0) {
        fprintf(stderr, "%s: bad ctx file\n", c.dir);
        rc = 2;
        goto out;
    }

    invalidation_reason_t r = invalidation_parse(
        c.input, c.input_len, ctx.max_message_bytes, &inv, err, sizeof(err));
    rc = case_dir_check_reason(&c, invalidation_reason_code(r), err);
    if (r != INVALIDATION_OK)
        goto out;
    if (!targets) {
        fprintf(stderr, "%s: an ok case needs a targets file\n", c.dir);
        rc = 2;
        goto out;
    }
    int fields = case_dir_check_fields(&c, dump, &inv);
    if (fields > rc)
        rc = fields;
    if (fields == 2)
        goto out;

    if (cache_targets_build(&inv, ctx.prefix, &t) != 0) {
        printf("cache_targets_build failed\n");
        rc = 1;
        goto out;
    }
    for (size_t i = 0; i < t.n; i++)
        printf("%s %s\n",
               t.items[i].kind == CACHE_TARGET_KEY ? "key" : "prefix",
               t.items[i].str);
    if (check_invariants(&t, ctx.prefix, inv.tenant_id))
        rc = 1;
    if (check_targets(targets, &t))
        rc = 1;
out:
    cache_targets_free(&t);
    free(targets);
    return case_dir_close(&c, rc);
}
