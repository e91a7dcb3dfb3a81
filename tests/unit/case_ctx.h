/* The fixed clock and Kafka origin every token-usage test is judged by. */
#ifndef TALLY_TEST_CASE_CTX_H
#define TALLY_TEST_CASE_CTX_H

#include "usage_event.h"

#include <string.h>

/* 2026-01-15T12:00:00Z; the fixtures' occurred_at values are chosen
 * against it (window 2025-12-11T12:00:00Z .. 2026-01-15T13:00:00Z). */
#define CASE_NOW_US 1768478400000000LL
#define CASE_DEDUPE_DAYS 35
#define CASE_TOPIC "token-usage"
#define CASE_PARTITION 3
#define CASE_OFFSET 42
#define CASE_MAX_BYTES (1024 * 1024)

/* Fills ctx with the fixed clock, the default enums (stored in tt and op,
 * which must outlive ctx) and a Kafka timestamp 1 s before now. */
static inline void case_ctx_init(usage_parse_ctx_t *ctx, usage_enum_t *tt,
                                 usage_enum_t *op)
{
    usage_enums_default(tt, op);
    memset(ctx, 0, sizeof(*ctx));
    ctx->token_types = tt;
    ctx->operations = op;
    ctx->now_us = CASE_NOW_US;
    ctx->dedupe_days = CASE_DEDUPE_DAYS;
    ctx->max_message_bytes = CASE_MAX_BYTES;
    ctx->topic = CASE_TOPIC;
    ctx->partition = CASE_PARTITION;
    ctx->offset = CASE_OFFSET;
    ctx->kafka_timestamp_ms = CASE_NOW_US / 1000 - 1000;
}

#endif
