/* Cache-invalidation event: JSON bytes -> validated struct, every rule. */
#include "invalidation_event.h"

#include "json_rules.h"

#include <jansson.h>
#include <string.h>

/* The shared reasons are ours by value; ids are the shared pattern. */
JSON_RULES_SAME_REASONS(INVALIDATION_);
_Static_assert(INVALIDATION_ID_MAX == JSON_RULES_ID_MAX, "one id pattern");

/* ------------------------------------------------------------------ */
/* Reason codes and small validators                                  */
/* ------------------------------------------------------------------ */

/* Beyond the shared reasons (json_rules.c has their codes). */
static const char *const reason_codes[INVALIDATION_ERR__COUNT] = {
    [INVALIDATION_ERR_INVALID_DATA_TYPE] = "invalid_data_type",
    [INVALIDATION_ERR_CASCADE_WILDCARD] = "cascade_wildcard",
};

const char *invalidation_reason_code(invalidation_reason_t reason)
{
    return json_rules_reason_code((int)reason, reason_codes,
                                  INVALIDATION_ERR__COUNT);
}

bool invalidation_is_data_type(const char *s, size_t len)
{
    if (len < 1 || len > INVALIDATION_DATA_TYPE_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    return true;
}

/* ------------------------------------------------------------------ */
/* Fields                                                             */
/* ------------------------------------------------------------------ */

/* The members the contract knows, in the order they are checked. */
typedef enum {
    F_SCHEMA_VERSION,
    F_TENANT_ID,
    F_DATA_TYPE,
    F_RESOURCE_ID,
    F_AGENT_ID,
    F_CONVERSATION_ID,
    F_COLLECTION_ID,
    F_CASCADE,
    F_INVALIDATE_CONVERSATIONS,
    F_EVENT_ID,
    F__COUNT
} field_t;

static const char *const field_names[F__COUNT] = {
    [F_SCHEMA_VERSION] = "schema_version",
    [F_TENANT_ID] = "tenant_id",
    [F_DATA_TYPE] = "data_type",
    [F_RESOURCE_ID] = "resource_id",
    [F_AGENT_ID] = "agent_id",
    [F_CONVERSATION_ID] = "conversation_id",
    [F_COLLECTION_ID] = "collection_id",
    [F_CASCADE] = "cascade",
    [F_INVALIDATE_CONVERSATIONS] = "invalidate_conversations",
    [F_EVENT_ID] = "event_id",
};

/* Required, ^[a-z0-9_]{1,64}$, into out (INVALIDATION_DATA_TYPE_MAX + 1
 * bytes). */
static bool get_data_type(json_rules_doc_t *doc, char *out)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const char *s;
    size_t len;
    if (!json_rules_get_string(doc, F_DATA_TYPE, true, &s, &len))
        return false;
    if (!invalidation_is_data_type(s, len))
        return json_rules_fail(
            doc, INVALIDATION_ERR_INVALID_DATA_TYPE,
            "data_type: must match ^[a-z0-9_]{1,64}$, got %s (%zu bytes)",
            json_rules_describe(doc->members[F_DATA_TYPE], d, sizeof(d)), len);
    memcpy(out, s, len + 1);
    return true;
}

/* ------------------------------------------------------------------ */
/* The parse                                                          */
/* ------------------------------------------------------------------ */

invalidation_reason_t invalidation_parse(const char *buf, size_t len,
                                         size_t max_message_bytes,
                                         invalidation_t *out, char *errstr,
                                         size_t errstr_size)
{
    json_t *members[F__COUNT] = {0};
    /* jansson's error text is echoed as printable ASCII, uncut, as this
     * parser always did (the token-usage one cuts it at 64 bytes). */
    json_rules_doc_t doc = {.names = field_names,
                            .members = members,
                            .n_members = F__COUNT,
                            .max_bytes = max_message_bytes,
                            .max_depth = INVALIDATION_MAX_DEPTH,
                            .json_error_ascii = true,
                            .errstr = errstr,
                            .errstr_size = errstr_size};

    memset(out, 0, sizeof(*out));
    /* The fields in the contract's order. event_id: the contract only
     * says "string, for logs"; it is echoed into logs and the published
     * notice, so 1..256 bytes, no control characters. */
    if (!json_rules_load(&doc, buf, len) ||
        !json_rules_get_schema_version(&doc, F_SCHEMA_VERSION) ||
        !json_rules_get_id(&doc, F_TENANT_ID, true, false, out->tenant_id) ||
        !get_data_type(&doc, out->data_type) ||
        !json_rules_get_id(&doc, F_RESOURCE_ID, true, true, out->resource_id) ||
        !json_rules_get_id(&doc, F_AGENT_ID, false, false, out->agent_id) ||
        !json_rules_get_id(&doc, F_CONVERSATION_ID, false, false,
                           out->conversation_id) ||
        !json_rules_get_id(&doc, F_COLLECTION_ID, false, false,
                           out->collection_id) ||
        !json_rules_get_bool(&doc, F_CASCADE, &out->cascade) ||
        !json_rules_get_bool(&doc, F_INVALIDATE_CONVERSATIONS,
                             &out->invalidate_conversations) ||
        !json_rules_get_text(&doc, F_EVENT_ID, INVALIDATION_EVENT_ID_MAX,
                             out->event_id))
        goto out;

    /* "*" names a whole set; cascading from a set is not defined (and
     * would turn one message into tenant-wide prefix scans). */
    if (out->cascade && strcmp(out->resource_id, "*") == 0)
        json_rules_fail(&doc, INVALIDATION_ERR_CASCADE_WILDCARD,
                        "cascade: not allowed with resource_id \"*\"");
out:
    json_rules_free(&doc);
    return (invalidation_reason_t)doc.reason;
}
