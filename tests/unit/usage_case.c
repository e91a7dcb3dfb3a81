/* Runs one data-driven token-usage case: usage_case <case-dir>. */
#include "case_ctx.h"
#include "case_dir.h"
#include "rfc3339.h"
#include "usage_event.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A case directory holds
 *   input.json       the message, exact bytes
 *   expected         "ok" or a reason code (usage_reason_code())
 *   expected_fields  optional, for ok cases: "name=value" lines that must
 *                    appear in the dump of the parsed event (see dump())
 *   ctx              optional "name=value" lines that change the fixed
 *                    context of case_ctx.h: now (RFC 3339), dedupe_days,
 *                    max_message_bytes, kafka_timestamp_ms, add_token_type,
 *                    add_operation
 * Exit status 0 iff the outcome matches. */

static void enum_add(usage_enum_t *e, const char *value)
{
    if (e->n < USAGE_ENUM_VALUES_MAX)
        snprintf(e->values[e->n++], sizeof(e->values[0]), "%s", value);
}

static int apply_ctx(char *text, usage_parse_ctx_t *ctx, usage_enum_t *tt,
                     usage_enum_t *op)
{
    bool kafka_ts_set = false;
    char *cursor = text, *line;
    while ((line = case_dir_next_line(&cursor))) {
        char *eq = strchr(line, '=');
        if (!eq)
            continue;
        *eq = '\0';
        const char *k = line, *v = eq + 1;
        if (strcmp(k, "now") == 0) {
            if (rfc3339_parse(v, strlen(v), &ctx->now_us) != 0)
                return -1;
        } else if (strcmp(k, "dedupe_days") == 0) {
            ctx->dedupe_days = atoi(v);
        } else if (strcmp(k, "max_message_bytes") == 0) {
            ctx->max_message_bytes = strtoull(v, NULL, 10);
        } else if (strcmp(k, "kafka_timestamp_ms") == 0) {
            ctx->kafka_timestamp_ms = strtoll(v, NULL, 10);
            kafka_ts_set = true;
        } else if (strcmp(k, "add_token_type") == 0) {
            enum_add(tt, v);
        } else if (strcmp(k, "add_operation") == 0) {
            enum_add(op, v);
        } else {
            fprintf(stderr, "ctx: unknown setting %s\n", k);
            return -1;
        }
    }
    if (!kafka_ts_set)
        ctx->kafka_timestamp_ms = ctx->now_us / 1000 - 1000;
    return 0;
}

/* Writes s with \n, \r, \t, \\ and other unprintable bytes escaped, so
 * that one field is one line. */
static void put_escaped(FILE *f, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n')
            fputs("\\n", f);
        else if (c == '\r')
            fputs("\\r", f);
        else if (c == '\t')
            fputs("\\t", f);
        else if (c == '\\')
            fputs("\\\\", f);
        else if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
}

/* One "name=value" line per field, preceded by a newline so that a line
 * can be searched for as "\nname=value\n". */
static void dump(FILE *f, const void *event)
{
    const usage_event_t *ev = event;
    char ts[32];
    rfc3339_format(ev->occurred_at_us, ts);
    fprintf(f, "\ntenant_id=%s\n", ev->tenant_id);
    fprintf(f, "idempotency_key=%s\n", ev->idempotency_key);
    fprintf(f, "key_implicit=%d\n", ev->key_implicit);
    fprintf(f, "tokens=%" PRId64 "\n", ev->tokens);
    fprintf(f, "prompt_tokens=%" PRId64 "\n", ev->prompt_tokens);
    fprintf(f, "completion_tokens=%" PRId64 "\n", ev->completion_tokens);
    fprintf(f, "thoughts_tokens=%" PRId64 "\n", ev->thoughts_tokens);
    fprintf(f, "cached_tokens=%" PRId64 "\n", ev->cached_tokens);
    fprintf(f, "token_type=%s\n", ev->token_type);
    fprintf(f, "operation=%s\n", ev->operation);
    fprintf(f, "model=%s\n", ev->model);
    fprintf(f, "agent_id=%s\n", ev->agent_id);
    fprintf(f, "conversation_id=%s\n", ev->conversation_id);
    fprintf(f, "collection_id=%s\n", ev->collection_id);
    fprintf(f, "owner_tenant_id=%s\n", ev->owner_tenant_id);
    fprintf(f, "occurred_at=%s\n", ts);
    fprintf(f, "occurred_at_us=%" PRId64 "\n", ev->occurred_at_us);
    fprintf(f, "metadata_len=%zu\n", ev->metadata_len);
    fputs("metadata=", f);
    if (ev->metadata)
        put_escaped(f, ev->metadata, ev->metadata_len);
    else
        fputs("(absent)", f);
    fprintf(f, "\npayload_hash=%016" PRIx64 "\n", ev->payload_hash);
}

int main(int argc, char **argv)
{
    case_dir_t c;
    usage_parse_ctx_t ctx;
    usage_enum_t tt, op;
    usage_event_t ev;
    char err[512];
    int rc = case_dir_open(&c, argc, argv);

    case_ctx_init(&ctx, &tt, &op);
    if (rc == 0 && c.ctx && apply_ctx(c.ctx, &ctx, &tt, &op) != 0) {
        fprintf(stderr, "%s: bad ctx file\n", c.dir);
        rc = 2;
    }
    if (rc != 0)
        return case_dir_close(&c, rc);

    usage_reason_t r =
        usage_event_parse(c.input, c.input_len, &ctx, &ev, err, sizeof(err));
    rc = case_dir_check_reason(&c, usage_reason_code(r), err);
    if (r == USAGE_OK) {
        int fields = case_dir_check_fields(&c, dump, &ev);
        if (fields > rc)
            rc = fields;
    }
    return case_dir_close(&c, rc);
}
