/* Cache-invalidation event: JSON bytes -> validated struct, every rule. */
#include "invalidation.h"

#include "usage_event.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Reason codes and small validators                                  */
/* ------------------------------------------------------------------ */

static const char *const reason_codes[INVALIDATION_ERR__COUNT] = {
    [INVALIDATION_OK] = "ok",
    [INVALIDATION_ERR_TOO_LARGE] = "too_large",
    [INVALIDATION_ERR_INVALID_JSON] = "invalid_json",
    [INVALIDATION_ERR_INVALID_UTF8] = "invalid_utf8",
    [INVALIDATION_ERR_NUL_CHARACTER] = "nul_character",
    [INVALIDATION_ERR_DUPLICATE_MEMBER] = "duplicate_member",
    [INVALIDATION_ERR_TOO_DEEP] = "too_deep",
    [INVALIDATION_ERR_NOT_OBJECT] = "not_object",
    [INVALIDATION_ERR_SCHEMA_VERSION] = "unsupported_schema_version",
    [INVALIDATION_ERR_MISSING_FIELD] = "missing_field",
    [INVALIDATION_ERR_WRONG_TYPE] = "wrong_type",
    [INVALIDATION_ERR_OUT_OF_RANGE] = "out_of_range",
    [INVALIDATION_ERR_INVALID_ID] = "invalid_id",
    [INVALIDATION_ERR_INVALID_STRING] = "invalid_string",
    [INVALIDATION_ERR_INVALID_DATA_TYPE] = "invalid_data_type",
    [INVALIDATION_ERR_CASCADE_WILDCARD] = "cascade_wildcard",
};

const char *invalidation_reason_code(invalidation_reason_t reason)
{
    if ((unsigned)reason >= INVALIDATION_ERR__COUNT)
        return "unknown";
    return reason_codes[reason];
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
/* Pre-scan of the raw bytes                                          */
/* ------------------------------------------------------------------ */

/* One pass over the raw message, outside strings only (usage_json_string_end() of
 * the token-usage parser skips them): returns -1 as soon as nesting
 * passes INVALIDATION_MAX_DEPTH, before jansson recurses into it, and
 * puts the first byte that is not whitespace in *first ('\0' if none),
 * which tells a top-level scalar from broken JSON on the error path. It
 * does not validate JSON: on malformed input jansson has the last word. */
static int prescan(const char *buf, size_t len, char *first)
{
    int depth = 0;
    *first = '\0';
    for (size_t i = 0; i < len; i++) {
        char c = buf[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
            continue;
        if (*first == '\0')
            *first = c;
        switch (c) {
        case '"':
            i = usage_json_string_end(buf, i + 1, len);
            break;
        case '{':
        case '[':
            if (++depth > INVALIDATION_MAX_DEPTH)
                return -1;
            break;
        case '}':
        case ']':
            depth--;
            break;
        default:
            break;
        }
    }
    return 0;
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

typedef struct {
    json_t *root;
    json_t *members[F__COUNT]; /* NULL: absent or null */
    invalidation_t *out;
    char *errstr;
    size_t errstr_size;
} parser_t;

__attribute__((format(printf, 3, 4))) static invalidation_reason_t
fail(parser_t *p, invalidation_reason_t reason, const char *fmt, ...)
{
    if (p->errstr && p->errstr_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->errstr, p->errstr_size, fmt, ap);
        va_end(ap);
    }
    return reason;
}

/* Files the known members into p->members in one walk; null ones are
 * left out (null means absent), unknown ones ignored. jansson rejects
 * NUL in member names, so strcmp() is exact. */
static void collect_members(parser_t *p)
{
    const char *key;
    json_t *value;
    json_object_foreach(p->root, key, value)
    {
        if (json_is_null(value))
            continue;
        for (int f = 0; f < F__COUNT; f++) {
            if (strcmp(key, field_names[f]) == 0) {
                p->members[f] = value;
                break;
            }
        }
    }
}

/* A string member; *s is NULL when absent (then missing_field if
 * required). */
static invalidation_reason_t get_string(parser_t *p, field_t f, bool required,
                                        const char **s, size_t *len)
{
    char d[96];
    json_t *v = p->members[f];
    *s = NULL;
    *len = 0;
    if (!v) {
        if (required)
            return fail(p, INVALIDATION_ERR_MISSING_FIELD, "%s: required",
                        field_names[f]);
        return INVALIDATION_OK;
    }
    if (!json_is_string(v))
        return fail(p, INVALIDATION_ERR_WRONG_TYPE,
                    "%s: must be a string, got %s", field_names[f],
                    usage_json_describe(v, d, sizeof(d)));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return INVALIDATION_OK;
}

/* An id into out (INVALIDATION_ID_MAX + 1 bytes); absent leaves "". With
 * allow_all, exactly "*" is accepted too (resource_id). */
static invalidation_reason_t get_id(parser_t *p, field_t f, bool required,
                                    bool allow_all, char *out)
{
    char d[96];
    const char *s;
    size_t len;
    invalidation_reason_t r = get_string(p, f, required, &s, &len);
    if (r != INVALIDATION_OK || !s)
        return r;
    if (!(allow_all && len == 1 && s[0] == '*') && !usage_is_id(s, len))
        return fail(p, INVALIDATION_ERR_INVALID_ID,
                    "%s: must match ^[A-Za-z0-9_.@-]{1,128}$%s, got %s "
                    "(%zu bytes)",
                    field_names[f], allow_all ? " or be \"*\"" : "",
                    usage_json_describe(p->members[f], d, sizeof(d)), len);
    memcpy(out, s, len + 1);
    return INVALIDATION_OK;
}

static invalidation_reason_t get_data_type(parser_t *p)
{
    char d[96];
    const char *s;
    size_t len;
    invalidation_reason_t r = get_string(p, F_DATA_TYPE, true, &s, &len);
    if (r != INVALIDATION_OK)
        return r;
    if (!invalidation_is_data_type(s, len))
        return fail(p, INVALIDATION_ERR_INVALID_DATA_TYPE,
                    "data_type: must match ^[a-z0-9_]{1,64}$, got %s "
                    "(%zu bytes)",
                    usage_json_describe(p->members[F_DATA_TYPE], d, sizeof(d)), len);
    memcpy(p->out->data_type, s, len + 1);
    return INVALIDATION_OK;
}

/* JSON true or false; absent -> false. 1, "true" are wrong_type. */
static invalidation_reason_t get_bool(parser_t *p, field_t f, bool *out)
{
    char d[96];
    json_t *v = p->members[f];
    *out = false;
    if (!v)
        return INVALIDATION_OK;
    if (!json_is_boolean(v))
        return fail(p, INVALIDATION_ERR_WRONG_TYPE,
                    "%s: must be true or false, got %s", field_names[f],
                    usage_json_describe(v, d, sizeof(d)));
    *out = json_is_true(v);
    return INVALIDATION_OK;
}

static invalidation_reason_t get_schema_version(parser_t *p)
{
    char d[96];
    json_t *v = p->members[F_SCHEMA_VERSION];
    if (!v)
        return INVALIDATION_OK;
    if (!json_is_integer(v))
        return fail(p, INVALIDATION_ERR_WRONG_TYPE,
                    "schema_version: must be the integer 1, got %s",
                    usage_json_describe(v, d, sizeof(d)));
    if (json_integer_value(v) != 1)
        return fail(p, INVALIDATION_ERR_SCHEMA_VERSION,
                    "schema_version: only 1 is supported, got %s",
                    usage_json_describe(v, d, sizeof(d)));
    return INVALIDATION_OK;
}

/* event_id: the contract only says "string, for logs"; it is echoed into
 * logs and the published notice, so 1..256 bytes, no control
 * characters. */
static invalidation_reason_t get_event_id(parser_t *p)
{
    char d[96];
    const char *s;
    size_t len;
    invalidation_reason_t r = get_string(p, F_EVENT_ID, false, &s, &len);
    if (r != INVALIDATION_OK || !s)
        return r;
    if (len < 1 || len > INVALIDATION_EVENT_ID_MAX)
        return fail(p, INVALIDATION_ERR_INVALID_STRING,
                    "event_id: must be 1..%d bytes, got %zu",
                    INVALIDATION_EVENT_ID_MAX, len);
    if (!usage_has_no_control_chars(s, len))
        return fail(p, INVALIDATION_ERR_INVALID_STRING,
                    "event_id: control character in %s",
                    usage_json_describe(p->members[F_EVENT_ID], d, sizeof(d)));
    memcpy(p->out->event_id, s, len + 1);
    return INVALIDATION_OK;
}

/* ------------------------------------------------------------------ */
/* The parse                                                          */
/* ------------------------------------------------------------------ */

/* Maps a jansson error to a reason, as the token-usage parser does. A
 * top-level scalar fails the parse (no JSON_DECODE_ANY) as a syntax
 * error; on that rare path the bytes are parsed once more so that valid
 * JSON that is not an object is reported as not_object. */
static invalidation_reason_t json_failure(parser_t *p, const json_error_t *jerr,
                                          const char *buf, size_t len,
                                          char first)
{
    invalidation_reason_t r;
    switch (json_error_code(jerr)) {
    case json_error_invalid_utf8:
        r = INVALIDATION_ERR_INVALID_UTF8;
        break;
    case json_error_null_character:
    case json_error_null_byte_in_key:
        r = INVALIDATION_ERR_NUL_CHARACTER;
        break;
    case json_error_duplicate_key:
        r = INVALIDATION_ERR_DUPLICATE_MEMBER;
        break;
    case json_error_numeric_overflow:
        r = INVALIDATION_ERR_OUT_OF_RANGE;
        break;
    case json_error_stack_overflow:
        r = INVALIDATION_ERR_TOO_DEEP;
        break;
    case json_error_invalid_syntax:
        if (jerr->position >= 0 &&
            usage_json_raw_nul(buf, len, (size_t)jerr->position)) {
            r = INVALIDATION_ERR_NUL_CHARACTER;
            break;
        }
        /* fall through */
    default:
        r = INVALIDATION_ERR_INVALID_JSON;
        if (first != '\0' && first != '{' && first != '[') {
            json_error_t e2;
            json_t *any = json_loadb(buf, len, JSON_DECODE_ANY, &e2);
            if (any) {
                char d[96];
                fail(p, INVALIDATION_ERR_NOT_OBJECT,
                     "the message must be a JSON object, got %s",
                     usage_json_describe(any, d, sizeof(d)));
                json_decref(any);
                return INVALIDATION_ERR_NOT_OBJECT;
            }
        }
        break;
    }
    /* jansson's text is ASCII it wrote itself, or quotes a few bytes of
     * the message: keep printable ASCII only. */
    char text[JSON_ERROR_TEXT_LENGTH];
    size_t n = 0;
    for (const char *c = jerr->text; *c && n + 1 < sizeof(text); c++)
        text[n++] = (*c >= 0x20 && *c < 0x7f) ? *c : '?';
    text[n] = '\0';
    return fail(p, r, "JSON error at byte %d: %s", jerr->position, text);
}

invalidation_reason_t invalidation_parse(const char *buf, size_t len,
                                         size_t max_message_bytes,
                                         invalidation_t *out, char *errstr,
                                         size_t errstr_size)
{
    parser_t p = {.out = out, .errstr = errstr, .errstr_size = errstr_size};
    invalidation_reason_t r;
    json_error_t jerr;
    char first, d[96];

    memset(out, 0, sizeof(*out));
    if (errstr && errstr_size > 0)
        errstr[0] = '\0';

    if (len > max_message_bytes)
        return fail(&p, INVALIDATION_ERR_TOO_LARGE,
                    "message of %zu bytes, at most %zu", len,
                    max_message_bytes);
    if (prescan(buf, len, &first) != 0)
        return fail(&p, INVALIDATION_ERR_TOO_DEEP, "nested more than %d levels",
                    INVALIDATION_MAX_DEPTH);

    p.root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!p.root)
        return json_failure(&p, &jerr, buf, len, first);
    if (!json_is_object(p.root)) {
        r = fail(&p, INVALIDATION_ERR_NOT_OBJECT,
                 "the message must be a JSON object, got %s",
                 usage_json_describe(p.root, d, sizeof(d)));
        goto out;
    }
    collect_members(&p);

    if ((r = get_schema_version(&p)) != INVALIDATION_OK ||
        (r = get_id(&p, F_TENANT_ID, true, false, out->tenant_id)) !=
            INVALIDATION_OK ||
        (r = get_data_type(&p)) != INVALIDATION_OK ||
        (r = get_id(&p, F_RESOURCE_ID, true, true, out->resource_id)) !=
            INVALIDATION_OK ||
        (r = get_id(&p, F_AGENT_ID, false, false, out->agent_id)) !=
            INVALIDATION_OK ||
        (r = get_id(&p, F_CONVERSATION_ID, false, false,
                    out->conversation_id)) != INVALIDATION_OK ||
        (r = get_id(&p, F_COLLECTION_ID, false, false, out->collection_id)) !=
            INVALIDATION_OK ||
        (r = get_bool(&p, F_CASCADE, &out->cascade)) != INVALIDATION_OK ||
        (r = get_bool(&p, F_INVALIDATE_CONVERSATIONS,
                      &out->invalidate_conversations)) != INVALIDATION_OK ||
        (r = get_event_id(&p)) != INVALIDATION_OK)
        goto out;

    /* "*" names a whole set; cascading from a set is not defined (and
     * would turn one message into tenant-wide prefix scans). */
    if (out->cascade && strcmp(out->resource_id, "*") == 0) {
        r = fail(&p, INVALIDATION_ERR_CASCADE_WILDCARD,
                 "cascade: not allowed with resource_id \"*\"");
        goto out;
    }
    r = INVALIDATION_OK;
out:
    json_decref(p.root);
    return r;
}
