/* Fuzz target: usage_event_parse (and rfc3339) against the contract. */
#include "case_ctx.h"
#include "fuzz_check.h"
#include "json_rules.h"
#include "rfc3339.h"
#include "usage_event.h"

#include <jansson.h>
#include <string.h>

/* An optional id: "" (absent) or ^[A-Za-z0-9_.@-]{1,128}$. */
static void check_opt_id(const char *s, size_t size)
{
    fuzz_check_terminated(s, size);
    CHECK(s[0] == '\0' || usage_is_id(s, strlen(s)));
}

static void check_count(int64_t n)
{
    CHECK(n >= 0 && n <= USAGE_TOKENS_MAX);
}

/* The metadata span is the member's value as it appears in the message:
 * on its own it parses to the same object jansson found in the whole. */
static void check_metadata(const usage_event_t *ev, const char *buf,
                           size_t size)
{
    json_t *root, *span, *member;

    CHECK(ev->metadata >= buf && ev->metadata_len >= 2 &&
          ev->metadata_len <= USAGE_METADATA_MAX &&
          ev->metadata + ev->metadata_len <= buf + size);
    CHECK(ev->metadata[0] == '{' && ev->metadata[ev->metadata_len - 1] == '}');
    root = json_loadb(buf, size, JSON_REJECT_DUPLICATES, NULL);
    span = json_loadb(ev->metadata, ev->metadata_len, JSON_REJECT_DUPLICATES,
                      NULL);
    CHECK(root && span);
    member = json_object_get(root, "metadata");
    CHECK(json_is_object(member) && json_equal(member, span));
    json_decref(span);
    json_decref(root);
}

/* json_rules_load()'s fast path changes nothing: jansson alone gives the
 * same reason, message and event, field for field. */
static void check_same_without_fast_path(const usage_parse_ctx_t *ctx,
                                         const char *buf, size_t size,
                                         usage_reason_t r,
                                         const usage_event_t *ev,
                                         const char *err)
{
    usage_event_t slow;
    char slow_err[FUZZ_ERRSTR_SIZE];
    usage_reason_t rs;

    json_rules_set_fast_path(false);
    rs = usage_event_parse(buf, size, ctx, &slow, slow_err, sizeof(slow_err));
    json_rules_set_fast_path(true);
    CHECK(rs == r);
    CHECK(strcmp(slow_err, err) == 0);
    if (r == USAGE_OK)
        CHECK(memcmp(&slow, ev, sizeof(slow)) == 0);
}

/* What must hold for any bytes under ctx: a known reason with a whole,
 * textual message; or an event whose every field obeys the contract,
 * found again (same fingerprint) by a second parse. */
static void check_parse(const usage_parse_ctx_t *ctx, const char *buf,
                        size_t size)
{
    usage_event_t ev, again;
    char err[FUZZ_ERRSTR_SIZE], key[USAGE_KEY_MAX + 1];

    usage_reason_t r = usage_event_parse(buf, size, ctx, &ev, err, sizeof(err));
    check_same_without_fast_path(ctx, buf, size, r, &ev, err);
    CHECK((unsigned)r < USAGE_ERR__COUNT);
    CHECK(strcmp(usage_reason_code(r), "unknown") != 0);
    if (r != USAGE_OK) {
        fuzz_check_errstr(err);
        return;
    }
    fuzz_check_terminated(err, sizeof(err));
    CHECK(err[0] == '\0');
    fuzz_check_terminated(ev.tenant_id, sizeof(ev.tenant_id));
    CHECK(usage_is_id(ev.tenant_id, strlen(ev.tenant_id)));
    fuzz_check_terminated(ev.idempotency_key, sizeof(ev.idempotency_key));
    if (ev.key_implicit) {
        snprintf(key, sizeof(key), "kafka:%s:%d:%lld", ctx->topic,
                 (int)ctx->partition, (long long)ctx->offset);
        CHECK(strcmp(ev.idempotency_key, key) == 0);
    } else {
        size_t n = strlen(ev.idempotency_key);
        CHECK(n >= 1 && n <= USAGE_KEY_MAX);
        CHECK(json_rules_is_text(ev.idempotency_key, n));
        CHECK(strncmp(ev.idempotency_key, "kafka:", 6) != 0);
    }
    check_count(ev.tokens);
    check_count(ev.prompt_tokens);
    check_count(ev.completion_tokens);
    check_count(ev.thoughts_tokens);
    check_count(ev.cached_tokens);
    fuzz_check_terminated(ev.token_type, sizeof(ev.token_type));
    fuzz_check_terminated(ev.operation, sizeof(ev.operation));
    CHECK(usage_enum_contains(ctx->token_types, ev.token_type));
    CHECK(usage_enum_contains(ctx->operations, ev.operation));
    fuzz_check_terminated(ev.model, sizeof(ev.model));
    CHECK(strlen(ev.model) <= USAGE_MODEL_MAX);
    CHECK(json_rules_is_text(ev.model, strlen(ev.model)));
    check_opt_id(ev.agent_id, sizeof(ev.agent_id));
    check_opt_id(ev.conversation_id, sizeof(ev.conversation_id));
    check_opt_id(ev.collection_id, sizeof(ev.collection_id));
    check_opt_id(ev.owner_tenant_id, sizeof(ev.owner_tenant_id));
    CHECK(ev.occurred_at_us >= ctx->now_us - ctx->dedupe_days * 86400000000LL);
    CHECK(ev.occurred_at_us <= ctx->now_us + 3600000000LL);
    if (ev.metadata)
        check_metadata(&ev, buf, size);
    else
        CHECK(ev.metadata_len == 0);
    CHECK(usage_event_parse(buf, size, ctx, &again, err, sizeof(err)) ==
          USAGE_OK);
    CHECK(again.payload_hash == ev.payload_hash);
}

/* Every input under the fixed test context, under an edge one (no
 * dedupe window, no Kafka timestamp, the largest partition and offset),
 * and one byte over the size limit, which must be too_large whatever
 * else is wrong. Inputs that happen to be timestamps also go through a
 * format/parse round trip. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static usage_enum_t tt, op;
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    char err[FUZZ_ERRSTR_SIZE];
    const char *buf = (const char *)data;

    case_ctx_init(&ctx, &tt, &op);
    check_parse(&ctx, buf, size);
    if (size > 0) {
        ctx.max_message_bytes = size - 1;
        CHECK(usage_event_parse(buf, size, &ctx, &ev, err, sizeof(err)) ==
              USAGE_ERR_TOO_LARGE);
        fuzz_check_errstr(err);
        ctx.max_message_bytes = CASE_MAX_BYTES;
    }
    ctx.dedupe_days = 0;
    ctx.kafka_timestamp_ms = -1;
    ctx.topic = "";
    ctx.partition = INT32_MAX;
    ctx.offset = INT64_MAX;
    check_parse(&ctx, buf, size);

    /* A local date of 0001..9999 with an offset may be an instant just
     * outside those years in UTC (test_rfc3339.c: test_offsets), which
     * formats with a year the parser refuses: the round trip holds
     * inside 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999Z. */
    int64_t us;
    if (rfc3339_parse(buf, size, &us) == 0) {
        const int64_t lo = -62135596800LL * 1000000, hi = 253402300799999999LL;
        char text[32];
        int64_t back;
        CHECK(us >= lo - 86400LL * 1000000 && us <= hi + 86400LL * 1000000);
        rfc3339_format(us, text);
        CHECK(strlen(text) == 27 || strlen(text) == 28);
        if (us >= lo && us <= hi)
            CHECK(rfc3339_parse(text, strlen(text), &back) == 0 && back == us);
    }
    return 0;
}
