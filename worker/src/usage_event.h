/* Token-usage event: JSON bytes -> validated struct, every contract rule. */
#ifndef TALLY_USAGE_EVENT_H
#define TALLY_USAGE_EVENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define USAGE_ID_MAX 128
#define USAGE_KEY_MAX 512
#define USAGE_MODEL_MAX 128
#define USAGE_ENUM_MAX 63
#define USAGE_TOKENS_MAX 1000000000000LL /* 10^12 */
#define USAGE_METADATA_MAX 8192
#define USAGE_MAX_DEPTH 32
#define USAGE_ENUM_VALUES_MAX 64

/* Why a message was rejected. The codes (usage_reason_code()) are the
 * dead-letter header `tally.error.reason` and must stay stable. */
typedef enum {
    USAGE_OK = 0,
    USAGE_ERR_TOO_LARGE,        /* "too_large": over --max-message-bytes */
    USAGE_ERR_INVALID_JSON,     /* "invalid_json": syntax, trailing data */
    USAGE_ERR_INVALID_UTF8,     /* "invalid_utf8" */
    USAGE_ERR_NUL_CHARACTER,    /* "nul_character": U+0000 in a string */
    USAGE_ERR_DUPLICATE_MEMBER, /* "duplicate_member" */
    USAGE_ERR_TOO_DEEP,         /* "too_deep": nesting over 32 */
    USAGE_ERR_NOT_OBJECT,       /* "not_object": top level not an object */
    USAGE_ERR_SCHEMA_VERSION,   /* "unsupported_schema_version" */
    USAGE_ERR_MISSING_FIELD,    /* "missing_field" */
    USAGE_ERR_WRONG_TYPE,       /* "wrong_type": e.g. "12", 1.0, 1e3 */
    USAGE_ERR_OUT_OF_RANGE,     /* "out_of_range": ints, past 2^63 too */
    USAGE_ERR_INVALID_ID,       /* "invalid_id": fails the id pattern */
    USAGE_ERR_INVALID_STRING,   /* "invalid_string": length/control chars */
    USAGE_ERR_RESERVED_KEY,     /* "reserved_key": idempotency key kafka:* */
    USAGE_ERR_UNKNOWN_ENUM,     /* "unknown_enum": token_type/operation */
    USAGE_ERR_INVALID_TIMESTAMP,/* "invalid_timestamp" */
    USAGE_ERR_TOO_OLD,          /* "too_old": before the dedupe window */
    USAGE_ERR_TOO_FAR_FUTURE,   /* "too_far_future": > 1 h ahead */
    USAGE_ERR_METADATA_TOO_LARGE, /* "metadata_too_large": over 8 KiB */
    USAGE_ERR__COUNT
} usage_reason_t;

/* The allowed values of one SQL enum, read from Postgres at start. */
typedef struct {
    size_t n;
    char values[USAGE_ENUM_VALUES_MAX][USAGE_ENUM_MAX + 1];
} usage_enum_t;

/* Everything a parse depends on besides the bytes. */
typedef struct {
    const usage_enum_t *token_types;  /* tally.token_type */
    const usage_enum_t *operations;   /* tally.operation_type */
    int64_t now_us;          /* the worker's clock, µs since the epoch */
    int dedupe_days;         /* window: occurred_at >= now - days */
    size_t max_message_bytes;
    /* Where the message came from: the implicit idempotency key is
     * "kafka:<topic>:<partition>:<offset>"; the Kafka timestamp (ms since
     * the epoch, -1 if none) stands in for an absent occurred_at (the
     * worker's clock when there is neither). */
    const char *topic;
    int32_t partition;
    int64_t offset;
    int64_t kafka_timestamp_ms;
} usage_parse_ctx_t;

/* A validated event. Strings are NUL-terminated copies; absent optional
 * ids are "" . `metadata` points into the parsed message (not owned,
 * valid while the message is) and is the member's value exactly as it
 * appears there, or NULL/0 when absent or null. */
typedef struct {
    char tenant_id[USAGE_ID_MAX + 1];
    char idempotency_key[USAGE_KEY_MAX + 1];
    bool key_implicit;
    int64_t tokens;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    int64_t thoughts_tokens;
    int64_t cached_tokens;
    char token_type[USAGE_ENUM_MAX + 1];
    char operation[USAGE_ENUM_MAX + 1];
    char model[USAGE_MODEL_MAX + 1];
    char agent_id[USAGE_ID_MAX + 1];
    char conversation_id[USAGE_ID_MAX + 1];
    char collection_id[USAGE_ID_MAX + 1];
    char owner_tenant_id[USAGE_ID_MAX + 1];
    int64_t occurred_at_us; /* µs since the epoch, UTC */
    const char *metadata;
    size_t metadata_len;
    /* 64-bit fingerprint of what the producer sent (all fields above
     * but the key, metadata bytes included, occurred_at only when the
     * message carried it: a stand-in is not part of it): two deliveries
     * with one key and different payloads differ here. */
    uint64_t payload_hash;
} usage_event_t;

/* Parses and validates one message. Returns USAGE_OK and fills `ev`, or a
 * reason with a human-readable message in errstr (naming the field). Never
 * allocates beyond jansson's own parse of the message. */
usage_reason_t usage_event_parse(const char *buf, size_t len,
                                 const usage_parse_ctx_t *ctx,
                                 usage_event_t *ev, char *errstr,
                                 size_t errstr_size);

/* The stable machine-readable code of a reason, e.g. "too_old". */
const char *usage_reason_code(usage_reason_t reason);

/* ^[A-Za-z0-9_.@-]{1,128}$ (json_rules_is_id(), for the key layout). */
bool usage_is_id(const char *s, size_t len);
bool usage_enum_contains(const usage_enum_t *e, const char *value);

/* Fills the contract's initial values of tally.token_type (llm, embedding)
 * and tally.operation_type (chat, query, vector_search, embedding,
 * ingestion), for tests and tools without Postgres. Either may be NULL. */
void usage_enums_default(usage_enum_t *token_types, usage_enum_t *operations);

#endif
