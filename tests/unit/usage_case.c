/* Runs one data-driven token-usage case: usage_case <case-dir>. */
#include "case_ctx.h"
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

/* Reads a whole file into a buffer of exactly its size (so that ASan sees
 * any read past the message); NULL if it does not exist. */
static char *read_file(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = bigger;
        }
    }
    fclose(f);
    if (!buf) {
        fprintf(stderr, "out of memory reading %s\n", path);
        exit(2);
    }
    char *exact = malloc(n ? n : 1);
    if (!exact) {
        fprintf(stderr, "out of memory reading %s\n", path);
        exit(2);
    }
    memcpy(exact, buf, n);
    free(buf);
    *len = n;
    return exact;
}

/* The same file as a NUL-terminated string without trailing whitespace. */
static char *read_text(const char *dir, const char *name)
{
    size_t n;
    char *raw = read_file(dir, name, &n);
    if (!raw)
        return NULL;
    char *s = malloc(n + 1);
    if (!s)
        exit(2);
    memcpy(s, raw, n);
    free(raw);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' ||
                     s[n - 1] == '\t'))
        n--;
    s[n] = '\0';
    return s;
}

static void enum_add(usage_enum_t *e, const char *value)
{
    if (e->n < USAGE_ENUM_VALUES_MAX)
        snprintf(e->values[e->n++], sizeof(e->values[0]), "%s", value);
}

static int apply_ctx(char *text, usage_parse_ctx_t *ctx, usage_enum_t *tt,
                     usage_enum_t *op)
{
    bool kafka_ts_set = false;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#')
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
static void dump(FILE *f, const usage_event_t *ev)
{
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

/* Every line of `expected` must be a line of `dumped`. */
static int check_fields(char *expected, const char *dumped)
{
    int bad = 0;
    for (char *line = strtok(expected, "\n"); line; line = strtok(NULL, "\n")) {
        size_t n = strlen(line);
        if (n > 0 && line[n - 1] == '\r')
            line[--n] = '\0';
        if (n == 0 || line[0] == '#')
            continue;
        char *want = malloc(n + 3);
        if (!want)
            exit(2);
        snprintf(want, n + 3, "\n%s\n", line);
        if (!strstr(dumped, want)) {
            printf("MISMATCH: expected field line %s\n", line);
            bad = 1;
        }
        free(want);
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: usage_case CASE-DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    usage_parse_ctx_t ctx;
    usage_enum_t tt, op;
    case_ctx_init(&ctx, &tt, &op);

    size_t len = 0;
    char *input = read_file(dir, "input.json", &len);
    char *expected = read_text(dir, "expected");
    char *fields = read_text(dir, "expected_fields");
    char *ctx_text = read_text(dir, "ctx");
    int rc = 2;
    char *dumped = NULL;
    size_t dumped_len = 0;
    FILE *f = NULL;

    if (!input || !expected) {
        fprintf(stderr, "%s: needs input.json and expected\n", dir);
        goto out;
    }
    if (ctx_text && apply_ctx(ctx_text, &ctx, &tt, &op) != 0) {
        fprintf(stderr, "%s: bad ctx file\n", dir);
        goto out;
    }

    usage_event_t ev;
    char err[512];
    usage_reason_t r =
        usage_event_parse(input, len, &ctx, &ev, err, sizeof(err));
    const char *got = usage_reason_code(r);
    printf("input: %zu bytes\nexpected: %s\ngot: %s%s%s\n", len, expected, got,
           r ? ": " : "", r ? err : "");
    rc = strcmp(got, expected) == 0 ? 0 : 1;
    if (r != USAGE_OK)
        goto out;

    f = open_memstream(&dumped, &dumped_len);
    if (!f)
        goto out;
    dump(f, &ev);
    fclose(f);
    f = NULL;
    fputs(dumped, stdout);
    if (fields && check_fields(fields, dumped))
        rc = 1;
out:
    printf("%s\n", rc == 0 ? "PASS" : "FAIL");
    free(dumped);
    free(input);
    free(expected);
    free(fields);
    free(ctx_text);
    return rc;
}
