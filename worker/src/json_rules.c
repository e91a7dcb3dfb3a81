/* Shared JSON rules of the contract, for both event parsers. */
#include "json_rules.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Reason codes                                                       */
/* ------------------------------------------------------------------ */

static const char *const reason_codes[JSON_RULES_ERR__COUNT] = {
    [JSON_RULES_OK] = "ok",
    [JSON_RULES_ERR_TOO_LARGE] = "too_large",
    [JSON_RULES_ERR_INVALID_JSON] = "invalid_json",
    [JSON_RULES_ERR_INVALID_UTF8] = "invalid_utf8",
    [JSON_RULES_ERR_NUL_CHARACTER] = "nul_character",
    [JSON_RULES_ERR_DUPLICATE_MEMBER] = "duplicate_member",
    [JSON_RULES_ERR_TOO_DEEP] = "too_deep",
    [JSON_RULES_ERR_NOT_OBJECT] = "not_object",
    [JSON_RULES_ERR_SCHEMA_VERSION] = "unsupported_schema_version",
    [JSON_RULES_ERR_MISSING_FIELD] = "missing_field",
    [JSON_RULES_ERR_WRONG_TYPE] = "wrong_type",
    [JSON_RULES_ERR_OUT_OF_RANGE] = "out_of_range",
    [JSON_RULES_ERR_INVALID_ID] = "invalid_id",
    [JSON_RULES_ERR_INVALID_STRING] = "invalid_string",
};

const char *json_rules_reason_code(int reason, const char *const *own,
                                   int count)
{
    if (reason < 0 || reason >= count)
        return "unknown";
    if (reason < JSON_RULES_ERR__COUNT)
        return reason_codes[reason];
    return own[reason] ? own[reason] : "unknown";
}

/* ------------------------------------------------------------------ */
/* Validators and echoes                                              */
/* ------------------------------------------------------------------ */

static bool is_id_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '@' ||
           c == '-';
}

bool json_rules_is_id(const char *s, size_t len)
{
    if (len < 1 || len > JSON_RULES_ID_MAX)
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

bool json_rules_is_text(const char *s, size_t len)
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

void json_rules_echo(const char *s, size_t len,
                     char out[JSON_RULES_ECHO_MAX + 4])
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = len < JSON_RULES_ECHO_MAX ? len : JSON_RULES_ECHO_MAX;
    size_t o = 0, i = 0;
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

const char *json_rules_describe(const json_t *v, char *buf, size_t size)
{
    char text[JSON_RULES_ECHO_MAX + 4];
    switch (json_typeof(v)) {
    case JSON_STRING:
        json_rules_echo(json_string_value(v), json_string_length(v), text);
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

bool json_rules_fail(json_rules_doc_t *doc, int reason, const char *fmt, ...)
{
    doc->reason = reason;
    if (doc->errstr && doc->errstr_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(doc->errstr, doc->errstr_size, fmt, ap);
        va_end(ap);
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* Pre-scan of the raw bytes                                          */
/* ------------------------------------------------------------------ */

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
 * want (want_len bytes of ASCII). Only \uXXXX escapes can yield its
 * letters, so this small decoder is enough and never allocates; anything
 * else does not match. */
static bool name_is(const char *s, size_t n, const char *want, size_t want_len)
{
    if (n == want_len)
        return memcmp(s, want, want_len) == 0;
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
        if (o >= want_len || cp != (unsigned char)want[o])
            return false;
    }
    return o == want_len;
}

/* Index of the quote that closes the string whose first byte is at start,
 * or len. memchr() does the scanning: strings are most of a message. */
static size_t string_end(const char *buf, size_t start, size_t len)
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

/* One pass over the raw message, outside strings only: returns false as
 * soon as nesting passes doc->max_depth (before jansson recurses into
 * it), and records the exact byte span of the top-level member
 * doc->span_name, which the contract may limit "as it appears in the
 * message" and the parser keep as is. It does not validate JSON: on
 * malformed input its findings are only used once jansson has accepted
 * the same bytes. */
static bool prescan(json_rules_doc_t *doc, const char *buf, size_t len)
{
    const char *want = doc->span_name;
    size_t want_len = want ? strlen(want) : 0;
    int depth = 0;
    bool top_object = false, want_key = false, name_matched = false;
    bool span_open = false, span_wait = false;
    size_t last = 0; /* last byte that was not whitespace */

    doc->span_found = false;
    doc->span_start = doc->span_end = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
            continue;
        if (span_wait) {
            doc->span_start = i;
            span_wait = false;
            span_open = true;
        }
        switch (c) {
        case '"': {
            size_t start = i + 1;
            i = string_end(buf, start, len);
            if (i >= len)
                return true; /* unterminated: jansson reports it */
            if (depth == 1 && want_key) {
                want_key = false;
                name_matched = want && !doc->span_found && !span_open &&
                               name_is(buf + start, i - start, want, want_len);
            }
            break;
        }
        case '{':
        case '[':
            if (++depth > doc->max_depth)
                return false;
            if (depth == 1) {
                top_object = c == '{';
                want_key = top_object;
            }
            break;
        case '}':
        case ']':
        case ',':
            if (depth == 1 && span_open) {
                doc->span_end = last + 1;
                doc->span_found = true;
                span_open = false;
            }
            if (c == ',')
                want_key = depth == 1 && top_object;
            else
                depth--;
            break;
        case ':':
            if (depth == 1 && name_matched) {
                span_wait = true;
                name_matched = false;
            }
            break;
        default:
            break;
        }
        last = i;
    }
    return true;
}

/* ------------------------------------------------------------------ */
/* The fast path                                                      */
/* ------------------------------------------------------------------ */

/* jansson spends most of a message's parse on its object (a hash table)
 * and an allocation per value; nearly every event is one flat object of
 * plain members. For those, fast_load() reads the bytes once and makes
 * values for the known members only. It accepts a strict subset of JSON
 * on which jansson would give the same members: an object whose names
 * and string values are printable ASCII without escapes, whose numbers
 * are non-negative integers of at most 18 digits, and whose values are
 * otherwise true, false or null, with only whitespace around; no name
 * twice; at most FAST_UNKNOWN_MAX unknown names. On anything else it
 * gives up, having kept nothing, and jansson parses the message as
 * before (and reports what is wrong with it). A differential check in the
 * fuzz target holds the two paths to the same outcome. */

#define FAST_UNKNOWN_MAX 16

static bool fast_path_on = true;

void json_rules_set_fast_path(bool on)
{
    fast_path_on = on;
}

static size_t fast_ws(const char *buf, size_t i, size_t len)
{
    while (i < len && (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n' ||
                       buf[i] == '\r'))
        i++;
    return i;
}

/* A plain string from its opening quote at buf[i]: printable ASCII, no
 * escape. Its bytes are [*start, *end); returns the index after the
 * closing quote, or 0 when it is not plain. */
static size_t fast_string(const char *buf, size_t i, size_t len, size_t *start,
                          size_t *end)
{
    size_t j = i + 1;
    while (j < len) {
        unsigned char c = (unsigned char)buf[j];
        if (c == '"') {
            *start = i + 1;
            *end = j;
            return j + 1;
        }
        if (c < 0x20 || c > 0x7e || c == '\\')
            return 0;
        j++;
    }
    return 0;
}

static size_t fast_container(const char *buf, size_t i, size_t len);

/* A value the fast path takes at buf[i] (after whitespace); returns the
 * index after it, or 0 when it is not in the subset. With `out`, makes
 * the value: strings, integers and literals as jansson would, objects
 * and arrays as empty placeholders (only for members whose contents the
 * parser never reads: doc->opaque_containers); null gives NULL. */
static size_t fast_value(const char *buf, size_t i, size_t len, json_t **out)
{
    if (out)
        *out = NULL;
    if (i >= len)
        return 0;
    if (buf[i] == '"') {
        size_t vs, ve;
        if (!(i = fast_string(buf, i, len, &vs, &ve)))
            return 0;
        if (out)
            *out = json_stringn_nocheck(buf + vs, ve - vs);
    } else if (buf[i] >= '0' && buf[i] <= '9') {
        long long n = 0;
        size_t digits = 0;
        if (buf[i] == '0' && i + 1 < len && buf[i + 1] >= '0' &&
            buf[i + 1] <= '9')
            return 0; /* a leading zero: not JSON */
        while (i < len && buf[i] >= '0' && buf[i] <= '9') {
            if (++digits > 18)
                return 0;
            n = n * 10 + (buf[i++] - '0');
        }
        if (i < len && (buf[i] == '.' || buf[i] == 'e' || buf[i] == 'E'))
            return 0; /* a real: jansson's */
        if (out)
            *out = json_integer(n);
    } else if (len - i >= 4 && !memcmp(buf + i, "true", 4)) {
        if (out)
            *out = json_true();
        return i + 4;
    } else if (len - i >= 5 && !memcmp(buf + i, "false", 5)) {
        if (out)
            *out = json_false();
        return i + 5;
    } else if (len - i >= 4 && !memcmp(buf + i, "null", 4)) {
        return i + 4; /* null means absent */
    } else if (buf[i] == '{' || buf[i] == '[') {
        size_t end = fast_container(buf, i, len);
        if (end && out)
            *out = buf[i] == '{' ? json_object() : json_array();
        return end;
    } else {
        return 0; /* a sign, or not JSON */
    }
    if (out && !*out)
        abort(); /* out of memory */
    return i;
}

/* A nested object or array at buf[i] (the pre-scan bounded the depth);
 * an object's names are checked for duplicates, as jansson does at every
 * level. Returns the index after it, or 0. */
static size_t fast_container(const char *buf, size_t i, size_t len)
{
    size_t at[FAST_UNKNOWN_MAX], n_at[FAST_UNKNOWN_MAX], n_names = 0;
    bool object = buf[i] == '{';
    char close = object ? '}' : ']';

    i = fast_ws(buf, i + 1, len);
    if (i < len && buf[i] == close)
        return i + 1;
    for (;;) {
        if (object) {
            size_t ns, ne;
            if (i >= len || buf[i] != '"' ||
                !(i = fast_string(buf, i, len, &ns, &ne)) ||
                n_names == FAST_UNKNOWN_MAX)
                return 0;
            for (size_t u = 0; u < n_names; u++)
                if (n_at[u] == ne - ns &&
                    !memcmp(buf + at[u], buf + ns, ne - ns))
                    return 0;
            at[n_names] = ns;
            n_at[n_names++] = ne - ns;
            i = fast_ws(buf, i, len);
            if (i >= len || buf[i] != ':')
                return 0;
            i = fast_ws(buf, i + 1, len);
        }
        if (!(i = fast_value(buf, i, len, NULL)))
            return 0;
        i = fast_ws(buf, i, len);
        if (i < len && buf[i] == ',') {
            i = fast_ws(buf, i + 1, len);
            continue;
        }
        if (i < len && buf[i] == close)
            return i + 1;
        return 0;
    }
}

static void fast_drop(json_t **members, size_t n)
{
    for (size_t f = 0; f < n; f++) {
        json_decref(members[f]);
        members[f] = NULL;
    }
}

/* True when the message was loaded here (doc->members filled, owned);
 * false when jansson must parse it (doc->members untouched). */
static bool fast_load(json_rules_doc_t *doc, const char *buf, size_t len)
{
    size_t unknown_at[FAST_UNKNOWN_MAX], unknown_len[FAST_UNKNOWN_MAX];
    size_t n_unknown = 0, i = fast_ws(buf, 0, len);
    unsigned char seen[64] = {0};

    if (!fast_path_on || doc->n_members > sizeof(seen) || i >= len ||
        buf[i] != '{')
        return false;
    i = fast_ws(buf, i + 1, len);
    if (i < len && buf[i] == '}')
        goto end;
    for (;;) {
        size_t ns, ne, f;
        json_t *v = NULL;
        if (i >= len || buf[i] != '"' ||
            !(i = fast_string(buf, i, len, &ns, &ne)))
            goto give_up;
        for (f = 0; f < doc->n_members; f++) {
            const char *name = doc->names[f];
            if (strlen(name) == ne - ns && !memcmp(name, buf + ns, ne - ns))
                break;
        }
        if (f < doc->n_members) {
            if (seen[f])
                goto give_up; /* jansson names the duplicate */
            seen[f] = 1;
        } else {
            for (size_t u = 0; u < n_unknown; u++)
                if (unknown_len[u] == ne - ns &&
                    !memcmp(buf + unknown_at[u], buf + ns, ne - ns))
                    goto give_up;
            if (n_unknown == FAST_UNKNOWN_MAX)
                goto give_up;
            unknown_at[n_unknown] = ns;
            unknown_len[n_unknown++] = ne - ns;
        }
        i = fast_ws(buf, i, len);
        if (i >= len || buf[i] != ':')
            goto give_up;
        i = fast_ws(buf, i + 1, len);
        if (i < len && (buf[i] == '{' || buf[i] == '[') &&
            !doc->opaque_containers)
            goto give_up; /* the parser reads inside containers */
        if (!(i = fast_value(buf, i, len, f < doc->n_members ? &v : NULL)))
            goto give_up;
        if (v)
            doc->members[f] = v;
        i = fast_ws(buf, i, len);
        if (i < len && buf[i] == ',') {
            i = fast_ws(buf, i + 1, len);
            continue;
        }
        if (i < len && buf[i] == '}')
            break;
        goto give_up;
    }
end:
    if (fast_ws(buf, i + 1, len) != len)
        goto give_up; /* something after the object */
    doc->members_owned = true;
    return true;
give_up:
    fast_drop(doc->members, doc->n_members);
    return false;
}

/* ------------------------------------------------------------------ */
/* The load                                                           */
/* ------------------------------------------------------------------ */

/* Whether a raw NUL byte sits inside a string at or before `limit`:
 * jansson reports it as a syntax error ("control character 0x0"), the
 * contract as U+0000 in a string. Error path only. */
static bool raw_nul(const char *buf, size_t len, size_t limit)
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
static bool load_failed(json_rules_doc_t *doc, const json_error_t *jerr,
                        const char *buf, size_t len)
{
    json_rules_reason_t r;
    switch (json_error_code(jerr)) {
    case json_error_invalid_utf8:
        r = JSON_RULES_ERR_INVALID_UTF8;
        break;
    case json_error_null_character:
    case json_error_null_byte_in_key:
        r = JSON_RULES_ERR_NUL_CHARACTER;
        break;
    case json_error_duplicate_key:
        r = JSON_RULES_ERR_DUPLICATE_MEMBER;
        break;
    case json_error_numeric_overflow:
        r = JSON_RULES_ERR_OUT_OF_RANGE;
        break;
    case json_error_stack_overflow:
        r = JSON_RULES_ERR_TOO_DEEP;
        break;
    case json_error_invalid_syntax:
        if (jerr->position >= 0 && raw_nul(buf, len, (size_t)jerr->position)) {
            r = JSON_RULES_ERR_NUL_CHARACTER;
            break;
        }
        /* fall through */
    default:
        r = JSON_RULES_ERR_INVALID_JSON;
        if (!starts_like_container(buf, len)) {
            json_error_t e2;
            json_t *any = json_loadb(buf, len, JSON_DECODE_ANY, &e2);
            if (any) {
                char d[JSON_RULES_DESCRIBE_SIZE];
                json_rules_fail(doc, JSON_RULES_ERR_NOT_OBJECT,
                                "the message must be a JSON object, got %s",
                                json_rules_describe(any, d, sizeof(d)));
                json_decref(any);
                return false;
            }
        }
        break;
    }
    /* jansson's text is ASCII it wrote itself, or quotes a few bytes of
     * the message. */
    char text[JSON_ERROR_TEXT_LENGTH];
    if (doc->json_error_ascii) {
        size_t n = 0;
        for (const char *c = jerr->text; *c && n + 1 < sizeof(text); c++)
            text[n++] = (*c >= 0x20 && *c < 0x7f) ? *c : '?';
        text[n] = '\0';
    } else {
        json_rules_echo(jerr->text, strlen(jerr->text), text);
    }
    return json_rules_fail(doc, r, "JSON error at byte %d: %s", jerr->position,
                           text);
}

/* Files the known members into doc->members in one walk: cheaper than
 * hashing every field name for json_object_get(). Names cannot hold NUL
 * (jansson rejects it), so strcmp() is exact. */
static void collect_members(json_rules_doc_t *doc)
{
    const char *key;
    json_t *value;
    json_object_foreach(doc->root, key, value)
    {
        if (json_is_null(value))
            continue;
        for (size_t f = 0; f < doc->n_members; f++) {
            const char *name = doc->names[f];
            if (key[0] == name[0] && strcmp(key, name) == 0) {
                doc->members[f] = value;
                break;
            }
        }
    }
}

bool json_rules_load(json_rules_doc_t *doc, const char *buf, size_t len)
{
    json_error_t jerr;
    char d[JSON_RULES_DESCRIBE_SIZE];

    if (doc->errstr && doc->errstr_size > 0)
        doc->errstr[0] = '\0';
    if (len > doc->max_bytes)
        return json_rules_fail(doc, JSON_RULES_ERR_TOO_LARGE,
                               "message of %zu bytes, at most %zu", len,
                               doc->max_bytes);
    if (!prescan(doc, buf, len))
        return json_rules_fail(doc, JSON_RULES_ERR_TOO_DEEP,
                               "nested more than %d levels", doc->max_depth);

    if (fast_load(doc, buf, len))
        return true;
    doc->root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc->root)
        return load_failed(doc, &jerr, buf, len);
    if (!json_is_object(doc->root))
        return json_rules_fail(doc, JSON_RULES_ERR_NOT_OBJECT,
                               "the message must be a JSON object, got %s",
                               json_rules_describe(doc->root, d, sizeof(d)));
    collect_members(doc);
    return true;
}

void json_rules_free(json_rules_doc_t *doc)
{
    if (doc->members_owned)
        fast_drop(doc->members, doc->n_members);
    doc->members_owned = false;
    json_decref(doc->root);
    doc->root = NULL;
}

/* ------------------------------------------------------------------ */
/* Typed getters                                                      */
/* ------------------------------------------------------------------ */

bool json_rules_get_string(json_rules_doc_t *doc, size_t f, bool required,
                           const char **s, size_t *len)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const char *name = doc->names[f];
    const json_t *v = doc->members[f];
    *s = NULL;
    *len = 0;
    if (!v) {
        if (required)
            return json_rules_fail(doc, JSON_RULES_ERR_MISSING_FIELD,
                                   "%s: required", name);
        return true;
    }
    if (!json_is_string(v))
        return json_rules_fail(doc, JSON_RULES_ERR_WRONG_TYPE,
                               "%s: must be a string, got %s", name,
                               json_rules_describe(v, d, sizeof(d)));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return true;
}

bool json_rules_get_id(json_rules_doc_t *doc, size_t f, bool required,
                       bool allow_all, char *out)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const char *s;
    size_t len;
    if (!json_rules_get_string(doc, f, required, &s, &len))
        return false;
    if (!s)
        return true;
    if (!(allow_all && len == 1 && s[0] == '*') && !json_rules_is_id(s, len))
        return json_rules_fail(
            doc, JSON_RULES_ERR_INVALID_ID,
            "%s: must match ^[A-Za-z0-9_.@-]{1,128}$%s, got %s (%zu bytes)",
            doc->names[f], allow_all ? " or be \"*\"" : "",
            json_rules_describe(doc->members[f], d, sizeof(d)), len);
    memcpy(out, s, len + 1);
    return true;
}

bool json_rules_get_text(json_rules_doc_t *doc, size_t f, size_t max, char *out)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const char *s;
    size_t len;
    if (!json_rules_get_string(doc, f, false, &s, &len))
        return false;
    if (!s)
        return true;
    if (len < 1 || len > max)
        return json_rules_fail(doc, JSON_RULES_ERR_INVALID_STRING,
                               "%s: must be 1..%zu bytes, got %zu",
                               doc->names[f], max, len);
    if (!json_rules_is_text(s, len))
        return json_rules_fail(
            doc, JSON_RULES_ERR_INVALID_STRING, "%s: control character in %s",
            doc->names[f], json_rules_describe(doc->members[f], d, sizeof(d)));
    memcpy(out, s, len + 1);
    return true;
}

bool json_rules_get_bool(json_rules_doc_t *doc, size_t f, bool *out)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const json_t *v = doc->members[f];
    *out = false;
    if (!v)
        return true;
    if (!json_is_boolean(v))
        return json_rules_fail(
            doc, JSON_RULES_ERR_WRONG_TYPE, "%s: must be true or false, got %s",
            doc->names[f], json_rules_describe(v, d, sizeof(d)));
    *out = json_is_true(v);
    return true;
}

bool json_rules_get_schema_version(json_rules_doc_t *doc, size_t f)
{
    char d[JSON_RULES_DESCRIBE_SIZE];
    const json_t *v = doc->members[f];
    if (!v)
        return true;
    if (!json_is_integer(v))
        return json_rules_fail(
            doc, JSON_RULES_ERR_WRONG_TYPE, "%s: must be the integer 1, got %s",
            doc->names[f], json_rules_describe(v, d, sizeof(d)));
    if (json_integer_value(v) != 1)
        return json_rules_fail(doc, JSON_RULES_ERR_SCHEMA_VERSION,
                               "%s: only 1 is supported, got %s", doc->names[f],
                               json_rules_describe(v, d, sizeof(d)));
    return true;
}
