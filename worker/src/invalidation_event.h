/* Cache-invalidation event: JSON bytes -> validated struct. */
#ifndef TALLY_INVALIDATION_EVENT_H
#define TALLY_INVALIDATION_EVENT_H

#include <stdbool.h>
#include <stddef.h>

#define INVALIDATION_ID_MAX 128       /* ^[A-Za-z0-9_.@-]{1,128}$ */
#define INVALIDATION_DATA_TYPE_MAX 64 /* ^[a-z0-9_]{1,64}$ */
/* The contract sets no limit on event_id; the worker takes 1..256 bytes
 * without control characters (it goes into logs and the notice). */
#define INVALIDATION_EVENT_ID_MAX 256
#define INVALIDATION_MAX_DEPTH 32

/* Why a message was rejected. The codes (invalidation_reason_code()) are
 * the dead-letter header `tally.error.reason` and must stay stable; they
 * are the token-usage codes where the meaning is the same. */
typedef enum {
    INVALIDATION_OK = 0,
    INVALIDATION_ERR_TOO_LARGE,         /* "too_large" */
    INVALIDATION_ERR_INVALID_JSON,      /* "invalid_json" */
    INVALIDATION_ERR_INVALID_UTF8,      /* "invalid_utf8" */
    INVALIDATION_ERR_NUL_CHARACTER,     /* "nul_character" */
    INVALIDATION_ERR_DUPLICATE_MEMBER,  /* "duplicate_member" */
    INVALIDATION_ERR_TOO_DEEP,          /* "too_deep": nesting over 32 */
    INVALIDATION_ERR_NOT_OBJECT,        /* "not_object" */
    INVALIDATION_ERR_SCHEMA_VERSION,    /* "unsupported_schema_version" */
    INVALIDATION_ERR_MISSING_FIELD,     /* "missing_field" */
    INVALIDATION_ERR_WRONG_TYPE,        /* "wrong_type": "true", 1, 1.0 */
    INVALIDATION_ERR_OUT_OF_RANGE,      /* "out_of_range": a number past
                                           what the decoder holds (int64,
                                           double), in any member */
    INVALIDATION_ERR_INVALID_ID,        /* "invalid_id" */
    INVALIDATION_ERR_INVALID_STRING,    /* "invalid_string": event_id */
    INVALIDATION_ERR_INVALID_DATA_TYPE, /* "invalid_data_type" */
    INVALIDATION_ERR_CASCADE_WILDCARD,  /* "cascade_wildcard": cascade
                                           with resource_id "*" */
    INVALIDATION_ERR__COUNT
} invalidation_reason_t;

/* A validated event. Strings are NUL-terminated copies; absent optional
 * ids and event_id are "". Every id matches the id pattern and data_type
 * ^[a-z0-9_]{1,64}$, so none holds ':', '{', '}' or a glob special
 * (cache_key.h relies on it). resource_id is an id or exactly "*". */
typedef struct {
    char tenant_id[INVALIDATION_ID_MAX + 1];
    char data_type[INVALIDATION_DATA_TYPE_MAX + 1];
    char resource_id[INVALIDATION_ID_MAX + 1];
    char agent_id[INVALIDATION_ID_MAX + 1];
    char conversation_id[INVALIDATION_ID_MAX + 1];
    char collection_id[INVALIDATION_ID_MAX + 1];
    bool cascade;
    /* As the message said; cache_targets_build() applies it only with
     * cascade on data_type "agent". */
    bool invalidate_conversations;
    char event_id[INVALIDATION_EVENT_ID_MAX + 1];
} invalidation_t;

/* Parses and validates one message of at most max_message_bytes. Returns
 * INVALIDATION_OK and fills out, or a reason with a human-readable
 * message in errstr naming the field. The checks run in a fixed order
 * (size, depth, JSON, then the fields as listed in the contract, then
 * cascade with "*") so that a message with several faults always gets
 * the same reason. out is complete only on INVALIDATION_OK. Allocates
 * nothing beyond jansson's parse, freed before returning. */
invalidation_reason_t invalidation_parse(const char *buf, size_t len,
                                         size_t max_message_bytes,
                                         invalidation_t *out, char *errstr,
                                         size_t errstr_size);

/* The stable machine-readable code of a reason, e.g. "cascade_wildcard";
 * "ok" for INVALIDATION_OK, "unknown" out of range. */
const char *invalidation_reason_code(invalidation_reason_t reason);

/* Whether s is a data_type: ^[a-z0-9_]{1,64}$. */
bool invalidation_is_data_type(const char *s, size_t len);

#endif
