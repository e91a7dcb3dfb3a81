/* Token-usage event: JSON bytes -> validated struct, every contract rule. */
#include "usage_event.h"

#include "json_rules.h"
#include "rfc3339.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define US_PER_SEC 1000000LL
#define US_PER_DAY (86400LL * US_PER_SEC)
#define FUTURE_LIMIT_US (3600LL * US_PER_SEC)

/* The shared reasons are ours by value; ids are the shared pattern. */
JSON_RULES_SAME_REASONS(USAGE_);
_Static_assert(USAGE_ID_MAX == JSON_RULES_ID_MAX, "one id pattern");

/* ------------------------------------------------------------------ */
/* Reason codes and small validators                                  */
/* ------------------------------------------------------------------ */

/* Beyond the shared reasons (json_rules.c has their codes). */
static const char *const reason_codes[USAGE_ERR__COUNT] = {
    [USAGE_ERR_RESERVED_KEY] = "reserved_key",
    [USAGE_ERR_UNKNOWN_ENUM] = "unknown_enum",
    [USAGE_ERR_INVALID_TIMESTAMP] = "invalid_timestamp",
    [USAGE_ERR_TOO_OLD] = "too_old",
    [USAGE_ERR_TOO_FAR_FUTURE] = "too_far_future",
    [USAGE_ERR_METADATA_TOO_LARGE] = "metadata_too_large",
};

const char *usage_reason_code(usage_reason_t reason)
{
    return json_rules_reason_code((int)reason, reason_codes, USAGE_ERR__COUNT);
}

bool usage_is_id(const char *s, size_t len)
{
    return json_rules_is_id(s, len);
}

bool usage_enum_contains(const usage_enum_t *e, const char *value)
{
    if (!e)
        return false;
    for (size_t i = 0; i < e->n && i < USAGE_ENUM_VALUES_MAX; i++)
        if (strcmp(e->values[i], value) == 0)
            return true;
    return false;
}

static void enum_set(usage_enum_t *e, const char *const *values, size_t n)
{
    memset(e, 0, sizeof(*e));
    for (size_t i = 0; i < n; i++)
        snprintf(e->values[i], sizeof(e->values[i]), "%s", values[i]);
    e->n = n;
}

void usage_enums_default(usage_enum_t *token_types, usage_enum_t *operations)
{
    static const char *const tt[] = {"llm", "embedding"};
    static const char *const op[] = {"chat", "query", "vector_search",
                                     "embedding", "ingestion"};
    if (token_types)
        enum_set(token_types, tt, sizeof(tt) / sizeof(tt[0]));
    if (operations)
        enum_set(operations, op, sizeof(op) / sizeof(op[0]));
}

/* ------------------------------------------------------------------ */
/* Fields                                                             */
/* ------------------------------------------------------------------ */

/* The members the contract knows, in the order they are checked. */
typedef enum {
    F_SCHEMA_VERSION,
    F_TENANT_ID,
    F_IDEMPOTENCY_KEY,
    F_TOKENS,
    F_TOKEN_TYPE,
    F_OPERATION,
    F_MODEL,
    F_AGENT_ID,
    F_CONVERSATION_ID,
    F_COLLECTION_ID,
    F_OWNER_TENANT_ID,
    F_PROMPT_TOKENS,
    F_COMPLETION_TOKENS,
    F_THOUGHTS_TOKENS,
    F_CACHED_TOKENS,
    F_OCCURRED_AT,
    F_METADATA,
    F__COUNT
} field_t;

static const char *const field_names[F__COUNT] = {
    [F_SCHEMA_VERSION] = "schema_version",
    [F_TENANT_ID] = "tenant_id",
    [F_IDEMPOTENCY_KEY] = "idempotency_key",
    [F_TOKENS] = "tokens",
    [F_TOKEN_TYPE] = "token_type",
    [F_OPERATION] = "operation",
    [F_MODEL] = "model",
    [F_AGENT_ID] = "agent_id",
    [F_CONVERSATION_ID] = "conversation_id",
    [F_COLLECTION_ID] = "collection_id",
    [F_OWNER_TENANT_ID] = "owner_tenant_id",
    [F_PROMPT_TOKENS] = "prompt_tokens",
    [F_COMPLETION_TOKENS] = "completion_tokens",
    [F_THOUGHTS_TOKENS] = "thoughts_tokens",
    [F_CACHED_TOKENS] = "cached_tokens",
    [F_OCCURRED_AT] = "occurred_at",
    [F_METADATA] = "metadata",
};

typedef struct {
    json_rules_doc_t doc;      /* files into members[], has the reason */
    json_t *members[F__COUNT]; /* NULL: absent or null */
    const usage_parse_ctx_t *ctx;
    usage_event_t *ev;
    bool occurred_at_sent; /* the message carried occurred_at */
} parser_t;

/* An integer in [0, 10^12]; absent -> 0, or missing_field when required.
 * Jansson has already turned 1.0 and 1e3 into reals. */
static bool get_count(parser_t *p, field_t f, bool required, int64_t *out)
{
    const char *name = field_names[f];
    char d[JSON_RULES_DESCRIBE_SIZE];
    json_t *v = p->members[f];
    if (!v) {
        *out = 0;
        if (required)
            return json_rules_fail(&p->doc, USAGE_ERR_MISSING_FIELD,
                                   "%s: required", name);
        return true;
    }
    if (!json_is_integer(v))
        return json_rules_fail(&p->doc, USAGE_ERR_WRONG_TYPE,
                               "%s: must be a JSON integer 0..10^12, got %s",
                               name, json_rules_describe(v, d, sizeof(d)));
    json_int_t n = json_integer_value(v);
    if (n < 0 || n > USAGE_TOKENS_MAX)
        return json_rules_fail(&p->doc, USAGE_ERR_OUT_OF_RANGE,
                               "%s: must be an integer 0..10^12, got %s", name,
                               json_rules_describe(v, d, sizeof(d)));
    *out = n;
    return true;
}

/* A required string that is one of e's values (read from Postgres). */
static bool get_enum(parser_t *p, field_t f, const usage_enum_t *e, char *out)
{
    const char *s;
    size_t len;
    if (!json_rules_get_string(&p->doc, f, true, &s, &len))
        return false;
    if (len > USAGE_ENUM_MAX || !usage_enum_contains(e, s)) {
        char text[JSON_RULES_ECHO_MAX + 4];
        json_rules_echo(s, len, text);
        return json_rules_fail(&p->doc, USAGE_ERR_UNKNOWN_ENUM,
                               "%s: unknown value \"%s\"", field_names[f],
                               text);
    }
    memcpy(out, s, len + 1);
    return true;
}

/* The producer's key (1..512 bytes, no controls, not kafka:*), or the
 * implicit kafka:<topic>:<partition>:<offset> with key_implicit set. */
static bool get_key(parser_t *p)
{
    usage_event_t *ev = p->ev;
    if (!json_rules_get_text(&p->doc, F_IDEMPOTENCY_KEY, USAGE_KEY_MAX,
                             ev->idempotency_key))
        return false;
    if (ev->idempotency_key[0] != '\0') { /* present: no NUL inside */
        if (strncmp(ev->idempotency_key, "kafka:", 6) == 0)
            return json_rules_fail(&p->doc, USAGE_ERR_RESERVED_KEY,
                                   "idempotency_key: the prefix \"kafka:\" "
                                   "is reserved for the implicit key");
        return true;
    }
    const usage_parse_ctx_t *ctx = p->ctx;
    snprintf(ev->idempotency_key, sizeof(ev->idempotency_key),
             "kafka:%s:%" PRId32 ":%" PRId64, ctx->topic ? ctx->topic : "",
             ctx->partition, ctx->offset);
    ev->key_implicit = true;
    return true;
}

/* occurred_at, or the Kafka timestamp, or the worker's clock; then the
 * window [now - dedupe_days, now + 1 h], outside of which the event could
 * not be deduplicated. The stand-ins are held to the same window. */
static bool get_occurred_at(parser_t *p)
{
    const usage_parse_ctx_t *ctx = p->ctx;
    const char *s;
    size_t len;
    int64_t at;
    if (!json_rules_get_string(&p->doc, F_OCCURRED_AT, false, &s, &len))
        return false;
    const char *what = "occurred_at";
    p->occurred_at_sent = s != NULL;
    if (s) {
        if (rfc3339_parse(s, len, &at) != 0) {
            char text[JSON_RULES_ECHO_MAX + 4];
            json_rules_echo(s, len, text);
            return json_rules_fail(&p->doc, USAGE_ERR_INVALID_TIMESTAMP,
                                   "occurred_at: not YYYY-MM-DDTHH:MM:SS[.frac]"
                                   "(Z|+HH:MM|-HH:MM) with a real date: \"%s\"",
                                   text);
        }
    } else if (ctx->kafka_timestamp_ms >= 0) {
        what = "occurred_at (Kafka timestamp)";
        at = ctx->kafka_timestamp_ms > INT64_MAX / 1000
                 ? INT64_MAX
                 : ctx->kafka_timestamp_ms * 1000;
    } else {
        at = ctx->now_us;
    }

    int64_t days = ctx->dedupe_days > 0 ? ctx->dedupe_days : 0;
    int64_t oldest = ctx->now_us - days * US_PER_DAY;
    int64_t latest = ctx->now_us + FUTURE_LIMIT_US;
    char t1[32], t2[32];
    if (at < oldest) {
        rfc3339_format(at, t1);
        rfc3339_format(oldest, t2);
        return json_rules_fail(&p->doc, USAGE_ERR_TOO_OLD,
                               "%s: %s is before the %" PRId64
                               "-day dedupe window (starts %s)",
                               what, t1, days, t2);
    }
    if (at > latest) {
        rfc3339_format(at, t1);
        rfc3339_format(latest, t2);
        return json_rules_fail(&p->doc, USAGE_ERR_TOO_FAR_FUTURE,
                               "%s: %s is more than 1 h ahead (limit %s)", what,
                               t1, t2);
    }
    p->ev->occurred_at_us = at;
    return true;
}

/* An object or absent. ev->metadata points at the value's raw bytes in
 * buf, as the pre-scan found them, and their count is what is limited. */
static bool get_metadata(parser_t *p, const char *buf)
{
    json_rules_doc_t *doc = &p->doc;
    char d[JSON_RULES_DESCRIBE_SIZE];
    json_t *v = p->members[F_METADATA];
    if (!v)
        return true;
    if (!json_is_object(v))
        return json_rules_fail(doc, USAGE_ERR_WRONG_TYPE,
                               "metadata: must be an object, got %s",
                               json_rules_describe(v, d, sizeof(d)));
    if (!doc->span_found) /* cannot happen once jansson accepted the bytes */
        return json_rules_fail(doc, USAGE_ERR_INVALID_JSON,
                               "metadata: value not found");
    size_t n = doc->span_end - doc->span_start;
    if (n > USAGE_METADATA_MAX)
        return json_rules_fail(doc, USAGE_ERR_METADATA_TOO_LARGE,
                               "metadata: %zu bytes, at most %d", n,
                               USAGE_METADATA_MAX);
    p->ev->metadata = buf + doc->span_start;
    p->ev->metadata_len = n;
    return true;
}

/* ------------------------------------------------------------------ */
/* Payload fingerprint                                                */
/* ------------------------------------------------------------------ */

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t fnv_bytes(uint64_t h, const void *data, size_t n)
{
    const unsigned char *b = data;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t fnv_u64(uint64_t h, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    return fnv_bytes(h, b, 8);
}

/* Every variable-length field goes in with its length first, so that no
 * two different events encode to the same byte stream. */
static uint64_t fnv_field(uint64_t h, const void *data, size_t n)
{
    return fnv_bytes(fnv_u64(h, n), data, n);
}

static uint64_t fnv_str(uint64_t h, const char *s)
{
    return fnv_field(h, s, strlen(s));
}

/* FNV-1a 64 over a fixed-order encoding of what the producer sent, but
 * the key. Not a defence against forged collisions: it tells a
 * redelivery from a producer that reused a key for another payload. A
 * stand-in for an absent occurred_at (the Kafka timestamp, the clock) is
 * left out, so a message re-sent unchanged is a duplicate, never a
 * conflict (CONTRACT.md, counting rule). */
static uint64_t payload_hash(const usage_event_t *ev, bool occurred_at_sent)
{
    uint64_t h = FNV_OFFSET;
    h = fnv_str(h, ev->tenant_id);
    h = fnv_u64(h, (uint64_t)ev->tokens);
    h = fnv_u64(h, (uint64_t)ev->prompt_tokens);
    h = fnv_u64(h, (uint64_t)ev->completion_tokens);
    h = fnv_u64(h, (uint64_t)ev->thoughts_tokens);
    h = fnv_u64(h, (uint64_t)ev->cached_tokens);
    h = fnv_str(h, ev->token_type);
    h = fnv_str(h, ev->operation);
    h = fnv_str(h, ev->model);
    h = fnv_str(h, ev->agent_id);
    h = fnv_str(h, ev->conversation_id);
    h = fnv_str(h, ev->collection_id);
    h = fnv_str(h, ev->owner_tenant_id);
    h = fnv_u64(h, occurred_at_sent);
    if (occurred_at_sent)
        h = fnv_u64(h, (uint64_t)ev->occurred_at_us);
    h = fnv_u64(h, ev->metadata != NULL);
    h = fnv_field(h, ev->metadata ? ev->metadata : "", ev->metadata_len);
    return h;
}

/* ------------------------------------------------------------------ */
/* The parse                                                          */
/* ------------------------------------------------------------------ */

/* Order of the checks: size, depth (both before jansson runs), JSON, then
 * the fields in a fixed order so that a message with several faults always
 * gets the same reason. ev is filled only as far as the parse got; it is
 * complete when USAGE_OK is returned. */
usage_reason_t usage_event_parse(const char *buf, size_t len,
                                 const usage_parse_ctx_t *ctx,
                                 usage_event_t *ev, char *errstr,
                                 size_t errstr_size)
{
    parser_t p = {.ctx = ctx, .ev = ev};
    json_rules_doc_t *doc = &p.doc;
    *doc = (json_rules_doc_t){.names = field_names,
                              .members = p.members,
                              .n_members = F__COUNT,
                              .max_bytes = ctx->max_message_bytes,
                              .max_depth = USAGE_MAX_DEPTH,
                              .span_name = "metadata",
                              .opaque_containers = true,
                              .errstr = errstr,
                              .errstr_size = errstr_size};

    memset(ev, 0, sizeof(*ev));
    if (!json_rules_load(doc, buf, len) ||
        !json_rules_get_schema_version(doc, F_SCHEMA_VERSION) ||
        !json_rules_get_id(doc, F_TENANT_ID, true, false, ev->tenant_id) ||
        !get_key(&p) || !get_count(&p, F_TOKENS, true, &ev->tokens) ||
        !get_enum(&p, F_TOKEN_TYPE, ctx->token_types, ev->token_type) ||
        !get_enum(&p, F_OPERATION, ctx->operations, ev->operation) ||
        !json_rules_get_text(doc, F_MODEL, USAGE_MODEL_MAX, ev->model) ||
        !json_rules_get_id(doc, F_AGENT_ID, false, false, ev->agent_id) ||
        !json_rules_get_id(doc, F_CONVERSATION_ID, false, false,
                           ev->conversation_id) ||
        !json_rules_get_id(doc, F_COLLECTION_ID, false, false,
                           ev->collection_id) ||
        !json_rules_get_id(doc, F_OWNER_TENANT_ID, false, false,
                           ev->owner_tenant_id) ||
        !get_count(&p, F_PROMPT_TOKENS, false, &ev->prompt_tokens) ||
        !get_count(&p, F_COMPLETION_TOKENS, false, &ev->completion_tokens) ||
        !get_count(&p, F_THOUGHTS_TOKENS, false, &ev->thoughts_tokens) ||
        !get_count(&p, F_CACHED_TOKENS, false, &ev->cached_tokens) ||
        !get_occurred_at(&p) || !get_metadata(&p, buf))
        goto out;

    ev->payload_hash = payload_hash(ev, p.occurred_at_sent);
out:
    json_rules_free(doc);
    return (usage_reason_t)doc->reason;
}
