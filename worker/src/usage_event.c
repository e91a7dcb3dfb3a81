/* Token-usage event: JSON bytes -> validated struct, every contract rule. */
#include "usage_event.h"

#include "rfc3339.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define US_PER_SEC 1000000LL
#define US_PER_DAY (86400LL * US_PER_SEC)
#define FUTURE_LIMIT_US (3600LL * US_PER_SEC)
#define ECHO_MAX 64 /* bytes of an offending value quoted in errstr */

/* ------------------------------------------------------------------ */
/* Reason codes and small validators                                  */
/* ------------------------------------------------------------------ */

static const char *const reason_codes[USAGE_ERR__COUNT] = {
    [USAGE_OK] = "ok",
    [USAGE_ERR_TOO_LARGE] = "too_large",
    [USAGE_ERR_INVALID_JSON] = "invalid_json",
    [USAGE_ERR_INVALID_UTF8] = "invalid_utf8",
    [USAGE_ERR_NUL_CHARACTER] = "nul_character",
    [USAGE_ERR_DUPLICATE_MEMBER] = "duplicate_member",
    [USAGE_ERR_TOO_DEEP] = "too_deep",
    [USAGE_ERR_NOT_OBJECT] = "not_object",
    [USAGE_ERR_SCHEMA_VERSION] = "unsupported_schema_version",
    [USAGE_ERR_MISSING_FIELD] = "missing_field",
    [USAGE_ERR_WRONG_TYPE] = "wrong_type",
    [USAGE_ERR_OUT_OF_RANGE] = "out_of_range",
    [USAGE_ERR_INVALID_ID] = "invalid_id",
    [USAGE_ERR_INVALID_STRING] = "invalid_string",
    [USAGE_ERR_RESERVED_KEY] = "reserved_key",
    [USAGE_ERR_UNKNOWN_ENUM] = "unknown_enum",
    [USAGE_ERR_INVALID_TIMESTAMP] = "invalid_timestamp",
    [USAGE_ERR_TOO_OLD] = "too_old",
    [USAGE_ERR_TOO_FAR_FUTURE] = "too_far_future",
    [USAGE_ERR_METADATA_TOO_LARGE] = "metadata_too_large",
};

const char *usage_reason_code(usage_reason_t reason)
{
    if ((unsigned)reason >= USAGE_ERR__COUNT)
        return "unknown";
    return reason_codes[reason];
}

static bool is_id_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '@' ||
           c == '-';
}

bool usage_is_id(const char *s, size_t len)
{
    if (len < 1 || len > USAGE_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!is_id_char((unsigned char)s[i]))
            return false;
    return true;
}

/* Length of the well-formed UTF-8 sequence at p (at most n bytes) and its
 * code point in *cp, or 0 for an invalid one (overlong forms, surrogates,
 * past U+10FFFF, truncated). */
static size_t utf8_decode(const unsigned char *p, size_t n, uint32_t *cp)
{
    unsigned c = p[0];
    size_t len;
    uint32_t v;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        v = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        v = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        v = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t k = 1; k < len; k++) {
        if ((p[k] & 0xc0) != 0x80)
            return 0;
        v = v << 6 | (p[k] & 0x3f);
    }
    if (len == 3 && (v < 0x800 || (v >= 0xd800 && v <= 0xdfff)))
        return 0;
    if (len == 4 && (v < 0x10000 || v > 0x10ffff))
        return 0;
    *cp = v;
    return len;
}

static bool is_control(uint32_t cp)
{
    return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f);
}

/* Also checks that s is well-formed UTF-8: callers such as the
 * invalidation parser may hand in bytes that did not come through
 * jansson. */
bool usage_has_no_control_chars(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        if (p[i] >= 0x20 && p[i] < 0x7f) { /* the common case */
            i++;
            continue;
        }
        size_t n = utf8_decode(p + i, len - i, &cp);
        if (n == 0 || is_control(cp))
            return false;
        i += n;
    }
    return true;
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
/* Pre-scan of the raw bytes                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    bool meta_found; /* top-level "metadata" member, value span below */
    size_t meta_start;
    size_t meta_end;
} prescan_t;

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Whether the raw bytes of a member name (between the quotes) decode to
 * "metadata". Only \uXXXX escapes can yield its letters, so this small
 * decoder is enough and never allocates; anything else does not match. */
static bool name_is_metadata(const char *s, size_t n)
{
    static const char want[] = "metadata";
    if (n == 8)
        return memcmp(s, want, 8) == 0;
    size_t o = 0;
    for (size_t i = 0; i < n; o++) {
        unsigned cp;
        if (s[i] != '\\') {
            cp = (unsigned char)s[i++];
        } else {
            if (n - i < 6 || s[i + 1] != 'u')
                return false;
            cp = 0;
            for (size_t k = 2; k < 6; k++) {
                int h = hex_value((unsigned char)s[i + k]);
                if (h < 0)
                    return false;
                cp = cp << 4 | (unsigned)h;
            }
            i += 6;
        }
        if (o >= 8 || cp != (unsigned char)want[o])
            return false;
    }
    return o == 8;
}

/* Index of the quote that closes the string whose first byte is at start,
 * or len. memchr() does the scanning: strings are most of a message. */
size_t usage_json_string_end(const char *buf, size_t start, size_t len)
{
    size_t i = start;
    for (;;) {
        const char *q = memchr(buf + i, '"', len - i);
        if (!q)
            return len;
        size_t at = (size_t)(q - buf), bs = 0;
        while (at - bs > start && buf[at - bs - 1] == '\\')
            bs++;
        if (bs % 2 == 0) /* not escaped */
            return at;
        i = at + 1;
    }
}

/* One pass over the raw message, outside strings only: returns -1 as soon
 * as nesting passes USAGE_MAX_DEPTH (before jansson recurses into it), and
 * records the exact byte span of the top-level "metadata" value, which the
 * contract limits "as it appears in the message" and which is kept as is.
 * It does not validate JSON: on malformed input its findings are only used
 * once jansson has accepted the same bytes. */
static int prescan(const char *buf, size_t len, prescan_t *ps)
{
    int depth = 0;
    bool top_object = false, want_key = false, name_matched = false;
    bool meta_open = false, meta_wait = false;
    size_t last = 0; /* last byte that was not whitespace */

    ps->meta_found = false;
    ps->meta_start = ps->meta_end = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
            continue;
        if (meta_wait) {
            ps->meta_start = i;
            meta_wait = false;
            meta_open = true;
        }
        switch (c) {
        case '"': {
            size_t start = i + 1;
            i = usage_json_string_end(buf, start, len);
            if (i >= len)
                return 0; /* unterminated: jansson reports it */
            if (depth == 1 && want_key) {
                want_key = false;
                name_matched = !ps->meta_found && !meta_open &&
                               name_is_metadata(buf + start, i - start);
            }
            break;
        }
        case '{':
        case '[':
            if (++depth > USAGE_MAX_DEPTH)
                return -1;
            if (depth == 1) {
                top_object = c == '{';
                want_key = top_object;
            }
            break;
        case '}':
        case ']':
        case ',':
            if (depth == 1 && meta_open) {
                ps->meta_end = last + 1;
                ps->meta_found = true;
                meta_open = false;
            }
            if (c == ',')
                want_key = depth == 1 && top_object;
            else
                depth--;
            break;
        case ':':
            if (depth == 1 && name_matched) {
                meta_wait = true;
                name_matched = false;
            }
            break;
        default:
            break;
        }
        last = i;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Error messages                                                     */
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
    const usage_parse_ctx_t *ctx;
    json_t *root;
    json_t *members[F__COUNT]; /* NULL: absent or null */
    usage_event_t *ev;
    char *errstr;
    size_t errstr_size;
} parser_t;

__attribute__((format(printf, 3, 4))) static usage_reason_t
fail(parser_t *p, usage_reason_t reason, const char *fmt, ...)
{
    if (p->errstr && p->errstr_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->errstr, p->errstr_size, fmt, ap);
        va_end(ap);
    }
    return reason;
}

/* Copies at most ECHO_MAX bytes of untrusted text for a log line or a
 * Kafka header: control characters (C0, DEL, C1) and bytes that are not
 * UTF-8 become '?', and a cut never splits a UTF-8 sequence. out has room
 * for ECHO_MAX + 4 bytes ("..." and the NUL). */
static void echo_text(const char *s, size_t len, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = len < ECHO_MAX ? len : ECHO_MAX, o = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        size_t k = utf8_decode(u + i, n - i, &cp);
        if (k == 0 && n < len && len - i >= 2 &&
            utf8_decode(u + i, len - i, &cp) > 0)
            break; /* a sequence cut by the limit: stop before it */
        if (k == 0 || is_control(cp)) {
            out[o++] = '?';
            i += k ? k : 1;
        } else {
            memcpy(out + o, u + i, k);
            o += k;
            i += k;
        }
    }
    if (n < len) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

/* "a string \"...\"", "1000 (a real number)", ...: what a field held. */
const char *usage_json_describe(const json_t *v, char *buf, size_t size)
{
    char text[ECHO_MAX + 4];
    switch (json_typeof(v)) {
    case JSON_STRING:
        echo_text(json_string_value(v), json_string_length(v), text);
        snprintf(buf, size, "\"%s\"", text);
        break;
    case JSON_INTEGER:
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        snprintf(buf, size, "%.17g (a real number)", json_real_value(v));
        break;
    case JSON_TRUE:
        return "true";
    case JSON_FALSE:
        return "false";
    case JSON_NULL:
        return "null";
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    default:
        return "?";
    }
    return buf;
}

/* ------------------------------------------------------------------ */
/* Fields                                                             */
/* ------------------------------------------------------------------ */

/* Sorts the object's members into p->members in one walk, null ones left
 * out (null means absent), unknown ones ignored: cheaper than hashing
 * every field name for json_object_get(). Names cannot hold NUL (jansson
 * rejects it), so strcmp() is exact. */
static void collect_members(parser_t *p)
{
    const char *key;
    json_t *value;
    json_object_foreach(p->root, key, value)
    {
        if (json_is_null(value))
            continue;
        for (int f = 0; f < F__COUNT; f++) {
            if (key[0] == field_names[f][0] &&
                strcmp(key, field_names[f]) == 0) {
                p->members[f] = value;
                break;
            }
        }
    }
}

static json_t *member(const parser_t *p, field_t f)
{
    return p->members[f];
}

/* An integer in [0, 10^12]; absent -> dflt, or missing_field when
 * required. Jansson has already turned 1.0 and 1e3 into reals. */
static usage_reason_t get_count(parser_t *p, field_t f, bool required,
                                int64_t *out)
{
    const char *name = field_names[f];
    char d[96];
    json_t *v = member(p, f);
    if (!v) {
        *out = 0;
        if (required)
            return fail(p, USAGE_ERR_MISSING_FIELD, "%s: required", name);
        return USAGE_OK;
    }
    if (!json_is_integer(v))
        return fail(p, USAGE_ERR_WRONG_TYPE,
                    "%s: must be a JSON integer 0..10^12, got %s", name,
                    usage_json_describe(v, d, sizeof(d)));
    json_int_t n = json_integer_value(v);
    if (n < 0 || n > USAGE_TOKENS_MAX)
        return fail(p, USAGE_ERR_OUT_OF_RANGE,
                    "%s: must be an integer 0..10^12, got %s", name,
                    usage_json_describe(v, d, sizeof(d)));
    *out = n;
    return USAGE_OK;
}

/* A string member; *s is NULL when absent (then missing_field if
 * required). */
static usage_reason_t get_string(parser_t *p, field_t f, bool required,
                                 const char **s, size_t *len)
{
    const char *name = field_names[f];
    char d[96];
    json_t *v = member(p, f);
    *s = NULL;
    *len = 0;
    if (!v) {
        if (required)
            return fail(p, USAGE_ERR_MISSING_FIELD, "%s: required", name);
        return USAGE_OK;
    }
    if (!json_is_string(v))
        return fail(p, USAGE_ERR_WRONG_TYPE, "%s: must be a string, got %s",
                    name, usage_json_describe(v, d, sizeof(d)));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return USAGE_OK;
}

/* An id into out (USAGE_ID_MAX + 1 bytes); absent leaves "". */
static usage_reason_t get_id(parser_t *p, field_t f, bool required, char *out)
{
    const char *name = field_names[f];
    const char *s;
    size_t len;
    usage_reason_t r = get_string(p, f, required, &s, &len);
    if (r != USAGE_OK || !s)
        return r;
    if (!usage_is_id(s, len)) {
        char text[ECHO_MAX + 4];
        echo_text(s, len, text);
        return fail(p, USAGE_ERR_INVALID_ID,
                    "%s: must match ^[A-Za-z0-9_.@-]{1,128}$, got \"%s\" "
                    "(%zu bytes)",
                    name, text, len);
    }
    memcpy(out, s, len + 1);
    return USAGE_OK;
}

/* Free text of 1..max bytes without control characters into out
 * (max + 1 bytes); absent leaves "". */
static usage_reason_t get_text(parser_t *p, field_t f, size_t max, char *out,
                               const char **s_out, size_t *len_out)
{
    const char *name = field_names[f];
    const char *s;
    size_t len;
    usage_reason_t r = get_string(p, f, false, &s, &len);
    *s_out = s;
    *len_out = len;
    if (r != USAGE_OK || !s)
        return r;
    if (len < 1 || len > max)
        return fail(p, USAGE_ERR_INVALID_STRING,
                    "%s: must be 1..%zu bytes, got %zu", name, max, len);
    if (!usage_has_no_control_chars(s, len)) {
        char text[ECHO_MAX + 4];
        echo_text(s, len, text);
        return fail(p, USAGE_ERR_INVALID_STRING,
                    "%s: control character in \"%s\"", name, text);
    }
    memcpy(out, s, len + 1);
    return USAGE_OK;
}

/* A required string that is one of e's values (read from Postgres). */
static usage_reason_t get_enum(parser_t *p, field_t f, const usage_enum_t *e,
                               char *out)
{
    const char *name = field_names[f];
    const char *s;
    size_t len;
    usage_reason_t r = get_string(p, f, true, &s, &len);
    if (r != USAGE_OK)
        return r;
    if (len > USAGE_ENUM_MAX || !usage_enum_contains(e, s)) {
        char text[ECHO_MAX + 4];
        echo_text(s, len, text);
        return fail(p, USAGE_ERR_UNKNOWN_ENUM, "%s: unknown value \"%s\"", name,
                    text);
    }
    memcpy(out, s, len + 1);
    return USAGE_OK;
}

/* Absent or 1. A non-integer is wrong_type, another integer a version
 * this worker does not know. */
static usage_reason_t get_schema_version(parser_t *p)
{
    char d[96];
    json_t *v = member(p, F_SCHEMA_VERSION);
    if (!v)
        return USAGE_OK;
    if (!json_is_integer(v))
        return fail(p, USAGE_ERR_WRONG_TYPE,
                    "schema_version: must be the integer 1, got %s",
                    usage_json_describe(v, d, sizeof(d)));
    if (json_integer_value(v) != 1)
        return fail(p, USAGE_ERR_SCHEMA_VERSION,
                    "schema_version: only 1 is supported, got %s",
                    usage_json_describe(v, d, sizeof(d)));
    return USAGE_OK;
}

/* The producer's key (1..512 bytes, no controls, not kafka:*), or the
 * implicit kafka:<topic>:<partition>:<offset> with key_implicit set. */
static usage_reason_t get_key(parser_t *p)
{
    const char *s;
    size_t len;
    usage_event_t *ev = p->ev;
    usage_reason_t r = get_text(p, F_IDEMPOTENCY_KEY, USAGE_KEY_MAX,
                                ev->idempotency_key, &s, &len);
    if (r != USAGE_OK)
        return r;
    if (s) {
        if (len >= 6 && memcmp(s, "kafka:", 6) == 0)
            return fail(p, USAGE_ERR_RESERVED_KEY,
                        "idempotency_key: the prefix \"kafka:\" is reserved "
                        "for the implicit key");
        return USAGE_OK;
    }
    const usage_parse_ctx_t *ctx = p->ctx;
    snprintf(ev->idempotency_key, sizeof(ev->idempotency_key),
             "kafka:%s:%" PRId32 ":%" PRId64, ctx->topic ? ctx->topic : "",
             ctx->partition, ctx->offset);
    ev->key_implicit = true;
    return USAGE_OK;
}

/* occurred_at, or the Kafka timestamp, or the worker's clock; then the
 * window [now - dedupe_days, now + 1 h], outside of which the event could
 * not be deduplicated. The stand-ins are held to the same window. */
static usage_reason_t get_occurred_at(parser_t *p)
{
    const usage_parse_ctx_t *ctx = p->ctx;
    const char *s;
    size_t len;
    int64_t at;
    usage_reason_t r = get_string(p, F_OCCURRED_AT, false, &s, &len);
    if (r != USAGE_OK)
        return r;
    const char *what = "occurred_at";
    if (s) {
        if (rfc3339_parse(s, len, &at) != 0) {
            char text[ECHO_MAX + 4];
            echo_text(s, len, text);
            return fail(p, USAGE_ERR_INVALID_TIMESTAMP,
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
        return fail(p, USAGE_ERR_TOO_OLD,
                    "%s: %s is before the %" PRId64
                    "-day dedupe window (starts %s)",
                    what, t1, days, t2);
    }
    if (at > latest) {
        rfc3339_format(at, t1);
        rfc3339_format(latest, t2);
        return fail(p, USAGE_ERR_TOO_FAR_FUTURE,
                    "%s: %s is more than 1 h ahead (limit %s)", what, t1, t2);
    }
    p->ev->occurred_at_us = at;
    return USAGE_OK;
}

/* An object or absent. ev->metadata points at the value's raw bytes in
 * buf, as the pre-scan found them, and their count is what is limited. */
static usage_reason_t get_metadata(parser_t *p, const prescan_t *ps,
                                   const char *buf)
{
    char d[96];
    json_t *v = member(p, F_METADATA);
    if (!v)
        return USAGE_OK;
    if (!json_is_object(v))
        return fail(p, USAGE_ERR_WRONG_TYPE,
                    "metadata: must be an object, got %s",
                    usage_json_describe(v, d, sizeof(d)));
    if (!ps->meta_found) /* cannot happen once jansson accepted the bytes */
        return fail(p, USAGE_ERR_INVALID_JSON, "metadata: value not found");
    size_t n = ps->meta_end - ps->meta_start;
    if (n > USAGE_METADATA_MAX)
        return fail(p, USAGE_ERR_METADATA_TOO_LARGE,
                    "metadata: %zu bytes, at most %d", n, USAGE_METADATA_MAX);
    p->ev->metadata = buf + ps->meta_start;
    p->ev->metadata_len = n;
    return USAGE_OK;
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

/* FNV-1a 64 over a fixed-order encoding of everything but the key. Not a
 * defence against forged collisions: it tells a redelivery from a producer
 * that reused a key for another payload. */
static uint64_t payload_hash(const usage_event_t *ev)
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
    h = fnv_u64(h, (uint64_t)ev->occurred_at_us);
    h = fnv_u64(h, ev->metadata != NULL);
    h = fnv_field(h, ev->metadata ? ev->metadata : "", ev->metadata_len);
    return h;
}

/* ------------------------------------------------------------------ */
/* The parse                                                          */
/* ------------------------------------------------------------------ */

/* Whether a raw NUL byte sits inside a string at or before `limit`:
 * jansson reports it as a syntax error ("control character 0x0"), the
 * contract as U+0000 in a string. Error path only. */
bool usage_json_raw_nul(const char *buf, size_t len, size_t limit)
{
    bool in_string = false;
    for (size_t i = 0; i < len && i <= limit; i++) {
        if (!in_string)
            in_string = buf[i] == '"';
        else if (buf[i] == '\\')
            i++;
        else if (buf[i] == '"')
            in_string = false;
        else if (buf[i] == '\0')
            return true;
    }
    return false;
}

static bool starts_like_container(const char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = buf[i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return c == '{' || c == '[';
    }
    return true; /* empty: invalid JSON, not a scalar */
}

/* Maps a jansson error to a reason. A top-level scalar fails the main
 * parse (no JSON_DECODE_ANY) as a syntax error; on that rare path the
 * bytes are parsed once more so that valid JSON that is not an object is
 * reported as not_object rather than invalid_json. */
static usage_reason_t json_failure(parser_t *p, const json_error_t *jerr,
                                   const char *buf, size_t len)
{
    usage_reason_t r;
    switch (json_error_code(jerr)) {
    case json_error_invalid_utf8:
        r = USAGE_ERR_INVALID_UTF8;
        break;
    case json_error_null_character:
    case json_error_null_byte_in_key:
        r = USAGE_ERR_NUL_CHARACTER;
        break;
    case json_error_duplicate_key:
        r = USAGE_ERR_DUPLICATE_MEMBER;
        break;
    case json_error_numeric_overflow:
        r = USAGE_ERR_OUT_OF_RANGE;
        break;
    case json_error_stack_overflow:
        r = USAGE_ERR_TOO_DEEP;
        break;
    case json_error_invalid_syntax:
        if (jerr->position >= 0 &&
            usage_json_raw_nul(buf, len, (size_t)jerr->position)) {
            r = USAGE_ERR_NUL_CHARACTER;
            break;
        }
        /* fall through */
    default:
        r = USAGE_ERR_INVALID_JSON;
        if (!starts_like_container(buf, len)) {
            json_error_t e2;
            json_t *any = json_loadb(buf, len, JSON_DECODE_ANY, &e2);
            if (any) {
                char d[96];
                fail(p, USAGE_ERR_NOT_OBJECT,
                     "the message must be a JSON object, got %s",
                     usage_json_describe(any, d, sizeof(d)));
                json_decref(any);
                return USAGE_ERR_NOT_OBJECT;
            }
        }
        break;
    }
    char text[ECHO_MAX + 4];
    echo_text(jerr->text, strlen(jerr->text), text);
    return fail(p, r, "JSON error at byte %d: %s", jerr->position, text);
}

/* Order of the checks: size, depth (both before jansson runs), JSON, then
 * the fields in a fixed order so that a message with several faults always
 * gets the same reason. ev is filled only as far as the parse got; it is
 * complete when USAGE_OK is returned. */
usage_reason_t usage_event_parse(const char *buf, size_t len,
                                 const usage_parse_ctx_t *ctx,
                                 usage_event_t *ev, char *errstr,
                                 size_t errstr_size)
{
    parser_t p = {
        .ctx = ctx, .ev = ev, .errstr = errstr, .errstr_size = errstr_size};
    usage_reason_t r;
    prescan_t ps;
    json_error_t jerr;
    char d[96];

    memset(ev, 0, sizeof(*ev));
    if (errstr && errstr_size > 0)
        errstr[0] = '\0';

    if (len > ctx->max_message_bytes)
        return fail(&p, USAGE_ERR_TOO_LARGE,
                    "message of %zu bytes, at most %zu", len,
                    ctx->max_message_bytes);
    if (prescan(buf, len, &ps) != 0)
        return fail(&p, USAGE_ERR_TOO_DEEP, "nested more than %d levels",
                    USAGE_MAX_DEPTH);

    p.root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!p.root)
        return json_failure(&p, &jerr, buf, len);
    if (!json_is_object(p.root)) {
        r = fail(&p, USAGE_ERR_NOT_OBJECT,
                 "the message must be a JSON object, got %s",
                 usage_json_describe(p.root, d, sizeof(d)));
        goto out;
    }
    collect_members(&p);

    const char *model;
    size_t model_len;
    if ((r = get_schema_version(&p)) != USAGE_OK ||
        (r = get_id(&p, F_TENANT_ID, true, ev->tenant_id)) != USAGE_OK ||
        (r = get_key(&p)) != USAGE_OK ||
        (r = get_count(&p, F_TOKENS, true, &ev->tokens)) != USAGE_OK ||
        (r = get_enum(&p, F_TOKEN_TYPE, ctx->token_types, ev->token_type)) !=
            USAGE_OK ||
        (r = get_enum(&p, F_OPERATION, ctx->operations, ev->operation)) !=
            USAGE_OK ||
        (r = get_text(&p, F_MODEL, USAGE_MODEL_MAX, ev->model, &model,
                      &model_len)) != USAGE_OK ||
        (r = get_id(&p, F_AGENT_ID, false, ev->agent_id)) != USAGE_OK ||
        (r = get_id(&p, F_CONVERSATION_ID, false, ev->conversation_id)) !=
            USAGE_OK ||
        (r = get_id(&p, F_COLLECTION_ID, false, ev->collection_id)) !=
            USAGE_OK ||
        (r = get_id(&p, F_OWNER_TENANT_ID, false, ev->owner_tenant_id)) !=
            USAGE_OK ||
        (r = get_count(&p, F_PROMPT_TOKENS, false, &ev->prompt_tokens)) !=
            USAGE_OK ||
        (r = get_count(&p, F_COMPLETION_TOKENS, false,
                       &ev->completion_tokens)) != USAGE_OK ||
        (r = get_count(&p, F_THOUGHTS_TOKENS, false, &ev->thoughts_tokens)) !=
            USAGE_OK ||
        (r = get_count(&p, F_CACHED_TOKENS, false, &ev->cached_tokens)) !=
            USAGE_OK ||
        (r = get_occurred_at(&p)) != USAGE_OK ||
        (r = get_metadata(&p, &ps, buf)) != USAGE_OK)
        goto out;

    ev->payload_hash = payload_hash(ev);
    r = USAGE_OK;
out:
    json_decref(p.root);
    return r;
}
