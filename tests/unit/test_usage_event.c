/* Unit tests of the token-usage event parser beyond the fixture cases. */
#include "case_ctx.h"
#include "json_rules.h"
#include "usage_event.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define BASE                                                                   \
    "\"tenant_id\":\"t1\",\"tokens\":1200,\"token_type\":\"llm\","             \
    "\"operation\":\"chat\""

typedef struct {
    usage_enum_t tt, op;
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    char err[512];
} fixture_t;

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof(*fx));
    if (!fx)
        return -1;
    case_ctx_init(&fx->ctx, &fx->tt, &fx->op);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    free(*state);
    return 0;
}

/* Parses a copy of exactly len bytes (no NUL after it), so that ASan
 * catches any read past the message. */
static usage_reason_t parse_n(fixture_t *fx, const char *json, size_t len)
{
    char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, json, len);
    usage_reason_t r = usage_event_parse(copy, len, &fx->ctx, &fx->ev, fx->err,
                                         sizeof(fx->err));
    /* metadata points into the message: rebase it on the caller's bytes */
    if (r == USAGE_OK && fx->ev.metadata)
        fx->ev.metadata = json + (fx->ev.metadata - copy);
    free(copy);
    return r;
}

static usage_reason_t parse(fixture_t *fx, const char *json)
{
    return parse_n(fx, json, strlen(json));
}

static void expect(fixture_t *fx, const char *json, usage_reason_t want)
{
    usage_reason_t r = parse(fx, json);
    if (r != want)
        fail_msg("%s: got %s (%s), want %s", json, usage_reason_code(r),
                 fx->err, usage_reason_code(want));
}

static void test_all_fields(void **state)
{
    fixture_t *fx = *state;
    expect(fx,
           "{\"schema_version\":1,\"idempotency_key\":\"req-7\","
           "\"tenant_id\":\"acme\",\"tokens\":1000000000000,"
           "\"token_type\":\"embedding\",\"operation\":\"ingestion\","
           "\"model\":\"m-1\",\"agent_id\":\"a\",\"conversation_id\":\"c\","
           "\"collection_id\":\"k\",\"owner_tenant_id\":\"o\","
           "\"prompt_tokens\":1,\"completion_tokens\":2,"
           "\"thoughts_tokens\":3,\"cached_tokens\":4,"
           "\"occurred_at\":\"2026-01-15T11:00:00.5+00:30\","
           "\"metadata\":{\"x\":[1]}}",
           USAGE_OK);
    usage_event_t *ev = &fx->ev;
    assert_string_equal(ev->tenant_id, "acme");
    assert_string_equal(ev->idempotency_key, "req-7");
    assert_false(ev->key_implicit);
    assert_true(ev->tokens == 1000000000000LL);
    assert_true(ev->prompt_tokens == 1);
    assert_true(ev->completion_tokens == 2);
    assert_true(ev->thoughts_tokens == 3);
    assert_true(ev->cached_tokens == 4);
    assert_string_equal(ev->token_type, "embedding");
    assert_string_equal(ev->operation, "ingestion");
    assert_string_equal(ev->model, "m-1");
    assert_string_equal(ev->agent_id, "a");
    assert_string_equal(ev->conversation_id, "c");
    assert_string_equal(ev->collection_id, "k");
    assert_string_equal(ev->owner_tenant_id, "o");
    assert_true(ev->occurred_at_us == CASE_NOW_US - 5400000000LL + 500000);
    assert_int_equal(ev->metadata_len, 9);
    assert_memory_equal(ev->metadata, "{\"x\":[1]}", 9);
    assert_true(ev->payload_hash != 0);
    assert_string_equal(fx->err, "");
}

static void test_defaults_and_implicit_key(void **state)
{
    fixture_t *fx = *state;
    expect(fx, "{" BASE "}", USAGE_OK);
    assert_string_equal(fx->ev.idempotency_key, "kafka:token-usage:3:42");
    assert_true(fx->ev.key_implicit);
    assert_string_equal(fx->ev.model, "");
    assert_string_equal(fx->ev.agent_id, "");
    assert_string_equal(fx->ev.owner_tenant_id, "");
    assert_true(fx->ev.prompt_tokens == 0 && fx->ev.cached_tokens == 0);
    assert_null(fx->ev.metadata);
    assert_int_equal(fx->ev.metadata_len, 0);
    /* occurred_at: the Kafka timestamp, ms -> µs */
    assert_true(fx->ev.occurred_at_us == CASE_NOW_US - 1000000);

    fx->ctx.topic = "usage.eu-1";
    fx->ctx.partition = 0;
    fx->ctx.offset = INT64_MAX;
    fx->ctx.kafka_timestamp_ms = CASE_NOW_US / 1000 - 7;
    expect(fx, "{" BASE ",\"idempotency_key\":null,\"occurred_at\":null}",
           USAGE_OK);
    assert_string_equal(fx->ev.idempotency_key,
                        "kafka:usage.eu-1:0:9223372036854775807");
    assert_true(fx->ev.occurred_at_us == CASE_NOW_US - 7000);

    /* no Kafka timestamp: the worker's clock */
    fx->ctx.kafka_timestamp_ms = -1;
    expect(fx, "{" BASE "}", USAGE_OK);
    assert_true(fx->ev.occurred_at_us == CASE_NOW_US);

    /* the stand-in is held to the same window */
    fx->ctx.kafka_timestamp_ms = CASE_NOW_US / 1000 - 36LL * 86400000;
    expect(fx, "{" BASE "}", USAGE_ERR_TOO_OLD);
    assert_non_null(strstr(fx->err, "Kafka timestamp"));
    fx->ctx.kafka_timestamp_ms = INT64_MAX;
    expect(fx, "{" BASE "}", USAGE_ERR_TOO_FAR_FUTURE);
}

static void test_window_edges(void **state)
{
    fixture_t *fx = *state;
    expect(fx, "{" BASE ",\"occurred_at\":\"2025-12-11T12:00:00Z\"}", USAGE_OK);
    expect(fx, "{" BASE ",\"occurred_at\":\"2025-12-11T11:59:59.999999Z\"}",
           USAGE_ERR_TOO_OLD);
    expect(fx, "{" BASE ",\"occurred_at\":\"2026-01-15T13:00:00Z\"}", USAGE_OK);
    expect(fx, "{" BASE ",\"occurred_at\":\"2026-01-15T13:00:00.000001Z\"}",
           USAGE_ERR_TOO_FAR_FUTURE);
    fx->ctx.dedupe_days = 1;
    expect(fx, "{" BASE ",\"occurred_at\":\"2026-01-14T11:59:59Z\"}",
           USAGE_ERR_TOO_OLD);
    assert_non_null(strstr(fx->err, "occurred_at"));
    assert_non_null(strstr(fx->err, "1-day"));
}

/* Fingerprints: equal for the same payload whatever the key, member order
 * or whitespace outside metadata; different when any counted field
 * differs. */
static void test_payload_hash(void **state)
{
    fixture_t *fx = *state;
    static const char *const fields[] = {
        "\"tenant_id\":\"t1\"",      "\"tokens\":10",
        "\"token_type\":\"llm\"",    "\"operation\":\"chat\"",
        "\"model\":\"m\"",           "\"agent_id\":\"a\"",
        "\"conversation_id\":\"c\"", "\"collection_id\":\"k\"",
        "\"owner_tenant_id\":\"o\"", "\"prompt_tokens\":1",
        "\"completion_tokens\":2",   "\"thoughts_tokens\":3",
        "\"cached_tokens\":4",       "\"occurred_at\":\"2026-01-15T11:00:00Z\"",
        "\"metadata\":{\"a\":1}",
    };
    static const char *const changed[] = {
        "\"tenant_id\":\"t2\"",
        "\"tokens\":11",
        "\"token_type\":\"embedding\"",
        "\"operation\":\"query\"",
        "\"model\":\"n\"",
        "\"agent_id\":\"b\"",
        "\"conversation_id\":\"d\"",
        "\"collection_id\":\"l\"",
        "\"owner_tenant_id\":\"p\"",
        "\"prompt_tokens\":2",
        "\"completion_tokens\":3",
        "\"thoughts_tokens\":4",
        "\"cached_tokens\":5",
        "\"occurred_at\":\"2026-01-15T11:00:00.000001Z\"",
        "\"metadata\":{\"a\": 1}",
    };
    enum { N = sizeof(fields) / sizeof(fields[0]) };
    char json[2048];
    uint64_t hashes[N + 1];

    for (size_t v = 0; v <= N; v++) {
        size_t o = 0;
        o += (size_t)snprintf(json + o, sizeof(json) - o,
                              "{\"idempotency_key\":\"k\"");
        for (size_t i = 0; i < N; i++)
            o += (size_t)snprintf(json + o, sizeof(json) - o, ",%s",
                                  i == v ? changed[i] : fields[i]);
        snprintf(json + o, sizeof(json) - o, "}");
        expect(fx, json, USAGE_OK);
        hashes[v] = fx->ev.payload_hash;
    }
    for (size_t i = 0; i < N; i++)
        for (size_t j = i + 1; j <= N; j++)
            if (hashes[i] == hashes[j])
                fail_msg("variants %zu and %zu hash alike", i, j);

    /* same payload, other key, order and spacing: same hash */
    expect(fx,
           "{ \"metadata\":{\"a\":1}, \"occurred_at\":\"2026-01-15T11:00:00Z\","
           "\"cached_tokens\":4,\"thoughts_tokens\":3,\"completion_tokens\":2,"
           "\"prompt_tokens\":1,\"owner_tenant_id\":\"o\","
           "\"collection_id\":\"k\",\"conversation_id\":\"c\","
           "\"agent_id\":\"a\",\"model\":\"m\",\"operation\":\"chat\","
           "\"token_type\":\"llm\",\"tokens\":10,\"tenant_id\":\"t1\","
           "\"unknown\":[1,2,3] }",
           USAGE_OK);
    assert_true(fx->ev.payload_hash == hashes[N]);

    /* absent metadata, null metadata and {} */
    expect(fx, "{" BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\"}", USAGE_OK);
    uint64_t absent = fx->ev.payload_hash;
    expect(fx,
           "{" BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\","
           "\"metadata\":null}",
           USAGE_OK);
    assert_true(fx->ev.payload_hash == absent);
    expect(fx,
           "{" BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\","
           "\"metadata\":{}}",
           USAGE_OK);
    assert_true(fx->ev.payload_hash != absent);

    /* fields cannot run together: "ab"+"c" vs "a"+"bc" */
    expect(fx,
           "{" BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\","
           "\"agent_id\":\"ab\",\"conversation_id\":\"c\"}",
           USAGE_OK);
    uint64_t h1 = fx->ev.payload_hash;
    expect(fx,
           "{" BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\","
           "\"agent_id\":\"a\",\"conversation_id\":\"bc\"}",
           USAGE_OK);
    assert_true(fx->ev.payload_hash != h1);
}

static void test_metadata_span(void **state)
{
    fixture_t *fx = *state;
    const char *json = "{" BASE ", \"metadata\"\t:\r\n  { \"k\" : \"v}\\\"\","
                       " \"n\":[ {}, [] ] }  \n, \"z\": {\"metadata\": 1}}";
    expect(fx, json, USAGE_OK);
    const char *want = "{ \"k\" : \"v}\\\"\", \"n\":[ {}, [] ] }";
    assert_int_equal(fx->ev.metadata_len, strlen(want));
    assert_memory_equal(fx->ev.metadata, want, strlen(want));
    assert_ptr_equal(fx->ev.metadata, strstr(json, want));

    /* escaped member name, and a nested "metadata" that is not it */
    json = "{\"inner\":{\"metadata\":{\"no\":1}},\"\\u006detadata\":{\"y\":2}"
           "," BASE "}";
    expect(fx, json, USAGE_OK);
    assert_int_equal(fx->ev.metadata_len, 7);
    assert_memory_equal(fx->ev.metadata, "{\"y\":2}", 7);

    /* a top-level array never has members */
    expect(fx, "[{\"metadata\":{}}]", USAGE_ERR_NOT_OBJECT);
}

/* {"m":"xxx"} of exactly n bytes inside an otherwise valid event. */
static usage_reason_t parse_metadata_of(fixture_t *fx, size_t n)
{
    char *json = malloc(n + 256);
    assert_non_null(json);
    int o = snprintf(json, 256, "{" BASE ",\"metadata\":{\"m\":\"");
    size_t pad = n - strlen("{\"m\":\"\"}");
    memset(json + o, 'x', pad);
    strcpy(json + o + pad, "\"}}");
    usage_reason_t r = parse(fx, json);
    if (r == USAGE_OK)
        assert_int_equal(fx->ev.metadata_len, n);
    fx->ev.metadata = NULL; /* json is freed */
    free(json);
    return r;
}

static void test_metadata_size(void **state)
{
    fixture_t *fx = *state;
    assert_int_equal(parse_metadata_of(fx, 8192), USAGE_OK);
    assert_int_equal(parse_metadata_of(fx, 8193), USAGE_ERR_METADATA_TOO_LARGE);
    assert_non_null(strstr(fx->err, "8193"));
    expect(fx, "{" BASE ",\"metadata\":[]}", USAGE_ERR_WRONG_TYPE);
    expect(fx, "{" BASE ",\"metadata\":\"x\"}", USAGE_ERR_WRONG_TYPE);
    expect(fx, "{" BASE ",\"metadata\":true}", USAGE_ERR_WRONG_TYPE);
}

/* nesting levels: the top-level object is level 1 */
static void test_depth(void **state)
{
    fixture_t *fx = *state;
    char json[4096];
    for (int levels = 30; levels <= 34; levels++) {
        /* metadata is level 2; objects and arrays alternate below it */
        int o = snprintf(json, sizeof(json), "{" BASE ",\"metadata\":");
        for (int i = 2; i <= levels; i++)
            o += snprintf(json + o, sizeof(json) - (size_t)o, "%s",
                          i % 2 ? "[" : "{\"a\":");
        o += snprintf(json + o, sizeof(json) - (size_t)o, "1");
        for (int i = levels; i >= 2; i--)
            o += snprintf(json + o, sizeof(json) - (size_t)o, "%s",
                          i % 2 ? "]" : "}");
        snprintf(json + o, sizeof(json) - (size_t)o, "}");
        expect(fx, json, levels <= 32 ? USAGE_OK : USAGE_ERR_TOO_DEEP);
    }
    /* brackets inside strings do not count */
    expect(fx,
           "{" BASE ",\"metadata\":{\"s\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
           "[[[[[[[[[[[[[[[[[[[\"}}",
           USAGE_OK);
    /* far past jansson's own limit: rejected by the pre-scan */
    size_t n = 100000;
    char *deep = malloc(2 * n + 64);
    assert_non_null(deep);
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    assert_int_equal(parse_n(fx, deep, 2 * n), USAGE_ERR_TOO_DEEP);
    free(deep);
}

static void test_message_size(void **state)
{
    fixture_t *fx = *state;
    size_t max = CASE_MAX_BYTES;
    char *json = malloc(max + 1);
    assert_non_null(json);
    int o = snprintf(json, 256, "{" BASE ",\"blob\":\"");
    memset(json + o, 'x', max + 1 - (size_t)o);
    memcpy(json + max - 2, "\"}", 2);
    assert_int_equal(parse_n(fx, json, max), USAGE_OK);
    json[max - 2] = 'x';
    memcpy(json + max - 1, "\"}", 2);
    assert_int_equal(parse_n(fx, json, max + 1), USAGE_ERR_TOO_LARGE);
    assert_non_null(strstr(fx->err, "1048577"));
    free(json);
}

static void test_enum_extension(void **state)
{
    fixture_t *fx = *state;
    const char *json = "{\"tenant_id\":\"t1\",\"tokens\":1,"
                       "\"token_type\":\"audio\",\"operation\":\"rerank\"}";
    expect(fx, json, USAGE_ERR_UNKNOWN_ENUM);
    assert_non_null(strstr(fx->err, "token_type"));
    snprintf(fx->tt.values[fx->tt.n++], USAGE_ENUM_MAX + 1, "audio");
    expect(fx, json, USAGE_ERR_UNKNOWN_ENUM);
    assert_non_null(strstr(fx->err, "operation"));
    snprintf(fx->op.values[fx->op.n++], USAGE_ENUM_MAX + 1, "rerank");
    expect(fx, json, USAGE_OK);
    assert_string_equal(fx->ev.token_type, "audio");
    assert_string_equal(fx->ev.operation, "rerank");

    usage_enum_t tt, op;
    usage_enums_default(&tt, &op);
    assert_int_equal(tt.n, 2);
    assert_int_equal(op.n, 5);
    assert_true(usage_enum_contains(&tt, "llm"));
    assert_true(usage_enum_contains(&tt, "embedding"));
    assert_true(usage_enum_contains(&op, "vector_search"));
    assert_true(usage_enum_contains(&op, "ingestion"));
    assert_false(usage_enum_contains(&op, "Chat"));
    assert_false(usage_enum_contains(&op, ""));
    assert_false(usage_enum_contains(NULL, "chat"));
}

static void test_errstr(void **state)
{
    fixture_t *fx = *state;
    expect(fx, "{" BASE ",\"prompt_tokens\":1e3}", USAGE_ERR_WRONG_TYPE);
    assert_non_null(strstr(fx->err, "prompt_tokens"));
    assert_non_null(strstr(fx->err, "1000"));
    expect(fx, "{" BASE ",\"cached_tokens\":-3}", USAGE_ERR_OUT_OF_RANGE);
    assert_non_null(strstr(fx->err, "cached_tokens"));
    assert_non_null(strstr(fx->err, "-3"));
    expect(fx, "{\"tokens\":1}", USAGE_ERR_MISSING_FIELD);
    assert_non_null(strstr(fx->err, "tenant_id"));

    /* a huge value is not echoed whole, and controls are not echoed */
    size_t n = 100000;
    char *json = malloc(n + 128);
    assert_non_null(json);
    int o = snprintf(json, 128, "{\"tenant_id\":\"\\u0085\\n");
    memset(json + o, 'y', n);
    strcpy(json + o + n, "\",\"tokens\":1}");
    assert_int_equal(parse(fx, json), USAGE_ERR_INVALID_ID);
    free(json);
    assert_non_null(strstr(fx->err, "tenant_id"));
    assert_true(strlen(fx->err) < 200);
    assert_true(json_rules_is_text(fx->err, strlen(fx->err)));

    /* JSON errors quote jansson's text, which may hold raw bytes */
    expect(fx, "{\"a\":\"\xff\"}", USAGE_ERR_INVALID_UTF8);
    assert_true(json_rules_is_text(fx->err, strlen(fx->err)));

    /* no errstr at all is fine */
    assert_int_equal(usage_event_parse("[]", 2, &fx->ctx, &fx->ev, NULL, 0),
                     USAGE_ERR_NOT_OBJECT);
    char one[1] = {'x'};
    assert_int_equal(usage_event_parse("[]", 2, &fx->ctx, &fx->ev, one, 1),
                     USAGE_ERR_NOT_OBJECT);
    assert_int_equal(one[0], '\0');
}

static void test_json_level(void **state)
{
    fixture_t *fx = *state;
    expect(fx, "", USAGE_ERR_INVALID_JSON);
    expect(fx, "{", USAGE_ERR_INVALID_JSON);
    expect(fx, "{\"a\":\"", USAGE_ERR_INVALID_JSON);
    expect(fx, "{\"a\":\"\\", USAGE_ERR_INVALID_JSON);
    expect(fx, "}}}}", USAGE_ERR_INVALID_JSON);
    expect(fx, "\"x\"", USAGE_ERR_NOT_OBJECT);
    expect(fx, " 1 ", USAGE_ERR_NOT_OBJECT);
    expect(fx, "nul", USAGE_ERR_INVALID_JSON);
    expect(fx, "{" BASE "} {}", USAGE_ERR_INVALID_JSON);
    expect(fx, "{" BASE ",\"tokens\":2}", USAGE_ERR_DUPLICATE_MEMBER);
    expect(fx, "{" BASE ",\"x\":\"\\u0000\"}", USAGE_ERR_NUL_CHARACTER);
    expect(fx, "{" BASE ",\"\\u0000\":1}", USAGE_ERR_NUL_CHARACTER);
    assert_int_equal(parse_n(fx, "{\"a\":\"\0\"}", 9), USAGE_ERR_NUL_CHARACTER);
    assert_int_equal(parse_n(fx, "{\"a\":1}\0", 8), USAGE_ERR_INVALID_JSON);
    assert_int_equal(parse_n(fx, "\0", 1), USAGE_ERR_INVALID_JSON);
    expect(fx, "{" BASE ",\"x\":18446744073709551616}", USAGE_ERR_OUT_OF_RANGE);
    expect(fx,
           "{\"tenant_id\":\"t1\",\"tokens\":9223372036854775807,"
           "\"token_type\":\"llm\",\"operation\":\"chat\"}",
           USAGE_ERR_OUT_OF_RANGE);
    expect(fx,
           "{\"tenant_id\":\"t1\",\"tokens\":-9223372036854775808,"
           "\"token_type\":\"llm\",\"operation\":\"chat\"}",
           USAGE_ERR_OUT_OF_RANGE);
}

static void test_validators(void **state)
{
    (void)state;
    char id[USAGE_ID_MAX + 2];
    memset(id, 'a', sizeof(id));
    assert_true(usage_is_id(id, USAGE_ID_MAX));
    assert_false(usage_is_id(id, USAGE_ID_MAX + 1));
    assert_false(usage_is_id("", 0));
    assert_true(usage_is_id("A-z_0.9@x", 9));
    assert_false(usage_is_id("a b", 3));
    assert_false(usage_is_id("a\0b", 3));
    assert_false(usage_is_id("a*", 2));
    assert_false(usage_is_id("\xc3\xa9", 2));

#define NC(s) json_rules_is_text(s, sizeof(s) - 1)
    assert_true(NC(""));
    assert_true(NC("plain ascii ~"));
    assert_true(NC("\xc2\xa0"));             /* U+00A0 */
    assert_true(NC("\xc3\xa9\xe2\x82\xac")); /* é € */
    assert_true(NC("\xf0\x9f\x99\x82"));     /* U+1F642 */
    assert_true(NC("\xf4\x8f\xbf\xbf"));     /* U+10FFFF */
    assert_false(NC("\x01"));
    assert_false(NC("a\x1f"));
    assert_false(NC("\x7f"));
    assert_false(NC("\t"));
    assert_false(NC("\0"));
    assert_false(NC("\xc2\x80"));         /* U+0080 */
    assert_false(NC("\xc2\x85"));         /* U+0085 */
    assert_false(NC("\xc2\x9f"));         /* U+009F */
    assert_false(NC("\xc0\x80"));         /* overlong NUL */
    assert_false(NC("\xe0\x80\x80"));     /* overlong */
    assert_false(NC("\xed\xa0\x80"));     /* surrogate */
    assert_false(NC("\xf4\x90\x80\x80")); /* past U+10FFFF */
    assert_false(NC("\xc3"));             /* truncated */
    assert_false(NC("\x80"));             /* lone continuation */
    assert_false(NC("\xff"));
#undef NC

    for (int r = 0; r < USAGE_ERR__COUNT; r++) {
        const char *code = usage_reason_code((usage_reason_t)r);
        assert_non_null(code);
        assert_string_not_equal(code, "unknown");
        for (int q = 0; q < r; q++)
            assert_string_not_equal(code, usage_reason_code((usage_reason_t)q));
    }
    assert_string_equal(usage_reason_code(USAGE_ERR_TOO_OLD), "too_old");
    assert_string_equal(usage_reason_code(USAGE_ERR_SCHEMA_VERSION),
                        "unsupported_schema_version");
    assert_string_equal(usage_reason_code(USAGE_ERR__COUNT), "unknown");
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_all_fields),     T(test_defaults_and_implicit_key),
        T(test_window_edges),   T(test_payload_hash),
        T(test_metadata_span),  T(test_metadata_size),
        T(test_depth),          T(test_message_size),
        T(test_enum_extension), T(test_errstr),
        T(test_json_level),     T(test_validators),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
