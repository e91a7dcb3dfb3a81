/* Fuzz target: invalidation_parse against the contract. */
#include "fuzz_check.h"
#include "invalidation_event.h"
#include "json_rules.h"

#include <jansson.h>
#include <string.h>

#define MAX_BYTES (1024 * 1024) /* --max-message-bytes default */

/* A field of the parsed struct against an independent reading of the
 * same member: absent or null gives "", anything else the exact string
 * (the parser copied it whole, and it holds no NUL). */
static void check_member(const json_t *root, const char *name, const char *got)
{
    const json_t *v = json_object_get(root, name);
    if (!v || json_is_null(v)) {
        CHECK(got[0] == '\0');
        return;
    }
    CHECK(json_is_string(v));
    CHECK(strlen(got) == json_string_length(v));
    CHECK(strcmp(got, json_string_value(v)) == 0);
}

static void check_flag(const json_t *root, const char *name, bool got)
{
    const json_t *v = json_object_get(root, name);
    CHECK(!v || json_is_null(v) || json_is_boolean(v));
    CHECK(got == json_is_true(v));
}

static bool is_opt_id(const char *s, size_t size)
{
    fuzz_check_terminated(s, size);
    return s[0] == '\0' || json_rules_is_id(s, strlen(s));
}

/* What must hold for any bytes: a known reason with a whole, textual
 * message, the same on a second parse; or a struct whose every field
 * obeys the contract (ids, data_type, "*" only as resource_id and never
 * with cascade, event_id text) and agrees with what jansson reads from
 * the same bytes on its own. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    invalidation_t inv, again;
    char err[FUZZ_ERRSTR_SIZE], err2[FUZZ_ERRSTR_SIZE];
    const char *buf = (const char *)data;

    invalidation_reason_t r =
        invalidation_parse(buf, size, MAX_BYTES, &inv, err, sizeof(err));
    CHECK((unsigned)r < INVALIDATION_ERR__COUNT);
    CHECK(strcmp(invalidation_reason_code(r), "unknown") != 0);
    /* The second parse through jansson alone: json_rules_load()'s fast
     * path changes nothing. */
    json_rules_set_fast_path(false);
    CHECK(invalidation_parse(buf, size, MAX_BYTES, &again, err2,
                             sizeof(err2)) == r);
    json_rules_set_fast_path(true);
    CHECK(strcmp(err, err2) == 0);
    if (r != INVALIDATION_OK) {
        fuzz_check_errstr(err);
        /* One byte over the limit is always too_large, first. */
        if (size > 0)
            CHECK(invalidation_parse(buf, size, size - 1, &again, err2,
                                     sizeof(err2)) ==
                  INVALIDATION_ERR_TOO_LARGE);
        return 0;
    }

    CHECK(err[0] == '\0');
    CHECK(memcmp(&inv, &again, sizeof(inv)) == 0);
    fuzz_check_terminated(inv.tenant_id, sizeof(inv.tenant_id));
    CHECK(json_rules_is_id(inv.tenant_id, strlen(inv.tenant_id)));
    fuzz_check_terminated(inv.data_type, sizeof(inv.data_type));
    CHECK(invalidation_is_data_type(inv.data_type, strlen(inv.data_type)));
    fuzz_check_terminated(inv.resource_id, sizeof(inv.resource_id));
    bool all = strcmp(inv.resource_id, "*") == 0;
    CHECK(all || json_rules_is_id(inv.resource_id, strlen(inv.resource_id)));
    CHECK(!(all && inv.cascade));
    CHECK(is_opt_id(inv.agent_id, sizeof(inv.agent_id)));
    CHECK(is_opt_id(inv.conversation_id, sizeof(inv.conversation_id)));
    CHECK(is_opt_id(inv.collection_id, sizeof(inv.collection_id)));
    fuzz_check_terminated(inv.event_id, sizeof(inv.event_id));
    size_t n = strlen(inv.event_id);
    CHECK(n <= INVALIDATION_EVENT_ID_MAX &&
          json_rules_is_text(inv.event_id, n));

    json_t *root = json_loadb(buf, size, JSON_REJECT_DUPLICATES, NULL);
    CHECK(json_is_object(root));
    const json_t *sv = json_object_get(root, "schema_version");
    CHECK(!sv || json_is_null(sv) ||
          (json_is_integer(sv) && json_integer_value(sv) == 1));
    check_member(root, "tenant_id", inv.tenant_id);
    check_member(root, "data_type", inv.data_type);
    check_member(root, "resource_id", inv.resource_id);
    check_member(root, "agent_id", inv.agent_id);
    check_member(root, "conversation_id", inv.conversation_id);
    check_member(root, "collection_id", inv.collection_id);
    check_member(root, "event_id", inv.event_id);
    check_flag(root, "cascade", inv.cascade);
    check_flag(root, "invalidate_conversations", inv.invalidate_conversations);
    json_decref(root);
    return 0;
}
