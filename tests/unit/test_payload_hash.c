/* The conflict fingerprint covers only what the producer sent. */
#include "case_ctx.h"
#include "usage_event.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#define BASE                                                                   \
    "{\"tenant_id\":\"t1\",\"idempotency_key\":\"k1\",\"tokens\":7,"           \
    "\"token_type\":\"llm\",\"operation\":\"chat\""

/* The fingerprint of json parsed with the Kafka timestamp ts_ms. */
static uint64_t hash_at(const char *json, int64_t ts_ms)
{
    usage_enum_t tt, op;
    usage_parse_ctx_t ctx;
    usage_event_t ev;
    char err[256];

    case_ctx_init(&ctx, &tt, &op);
    ctx.kafka_timestamp_ms = ts_ms;
    assert_int_equal(usage_event_parse(json, strlen(json), &ctx, &ev, err,
                                       sizeof(err)),
                     USAGE_OK);
    return ev.payload_hash;
}

/* Re-sent unchanged, with another Kafka timestamp standing in (or none,
 * the clock standing in): the same payload, a duplicate. */
static void stand_in_not_fingerprinted(void **state)
{
    const char *json = BASE "}";
    int64_t now_ms = CASE_NOW_US / 1000;
    (void)state;
    assert_true(hash_at(json, now_ms - 1000) == hash_at(json, now_ms - 60000));
    assert_true(hash_at(json, now_ms - 1000) == hash_at(json, -1));
}

/* An occurred_at the producer sent is part of the payload. */
static void sent_occurred_at_fingerprinted(void **state)
{
    int64_t now_ms = CASE_NOW_US / 1000;
    const char *a = BASE ",\"occurred_at\":\"2026-01-15T11:00:00Z\"}";
    const char *b = BASE ",\"occurred_at\":\"2026-01-15T11:00:01Z\"}";
    const char *a2 = BASE ",\"occurred_at\":\"2026-01-15T12:00:00+01:00\"}";
    (void)state;
    assert_true(hash_at(a, now_ms - 1000) == hash_at(a, now_ms - 9000));
    assert_true(hash_at(a, now_ms) == hash_at(a2, now_ms)); /* same instant */
    assert_true(hash_at(a, now_ms) != hash_at(b, now_ms));
    /* sent vs. not sent, even when the stand-in is the same instant */
    assert_true(hash_at(a, CASE_NOW_US / 1000 - 3600000) !=
                hash_at(BASE "}", CASE_NOW_US / 1000 - 3600000));
}

/* Every other field still counts. */
static void other_fields_fingerprinted(void **state)
{
    int64_t now_ms = CASE_NOW_US / 1000;
    (void)state;
    assert_true(hash_at(BASE "}", now_ms) !=
                hash_at(BASE ",\"model\":\"m\"}", now_ms));
    assert_true(hash_at(BASE "}", now_ms) !=
                hash_at(BASE ",\"metadata\":{}}", now_ms));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(stand_in_not_fingerprinted),
        cmocka_unit_test(sent_occurred_at_fingerprinted),
        cmocka_unit_test(other_fields_fingerprinted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
