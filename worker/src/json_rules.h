/* Shared JSON rules of the contract: size, depth pre-scan, jansson load and
 * error mapping, typed member getters, id/text validators. */
#ifndef TALLY_JSON_RULES_H
#define TALLY_JSON_RULES_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#define JSON_RULES_ID_MAX 128       /* ^[A-Za-z0-9_.@-]{1,128}$ */
#define JSON_RULES_ECHO_MAX 64      /* bytes of a value quoted in errstr */
#define JSON_RULES_DESCRIBE_SIZE 96 /* room for json_rules_describe() */

/* The outcomes both event kinds share. Each parser's public enum starts
 * with these, in this order and with these values, so that a shared
 * reason is the parser's own by value (JSON_RULES_SAME_REASONS checks it
 * at compile time). Their codes, here and only here, are the dead-letter
 * header `tally.error.reason`. */
typedef enum {
    JSON_RULES_OK = 0,               /* "ok" */
    JSON_RULES_ERR_TOO_LARGE,        /* "too_large" */
    JSON_RULES_ERR_INVALID_JSON,     /* "invalid_json" */
    JSON_RULES_ERR_INVALID_UTF8,     /* "invalid_utf8" */
    JSON_RULES_ERR_NUL_CHARACTER,    /* "nul_character" */
    JSON_RULES_ERR_DUPLICATE_MEMBER, /* "duplicate_member" */
    JSON_RULES_ERR_TOO_DEEP,         /* "too_deep" */
    JSON_RULES_ERR_NOT_OBJECT,       /* "not_object" */
    JSON_RULES_ERR_SCHEMA_VERSION,   /* "unsupported_schema_version" */
    JSON_RULES_ERR_MISSING_FIELD,    /* "missing_field" */
    JSON_RULES_ERR_WRONG_TYPE,       /* "wrong_type" */
    JSON_RULES_ERR_OUT_OF_RANGE,     /* "out_of_range" */
    JSON_RULES_ERR_INVALID_ID,       /* "invalid_id" */
    JSON_RULES_ERR_INVALID_STRING,   /* "invalid_string" */
    JSON_RULES_ERR__COUNT
} json_rules_reason_t;

/* At file scope in a parser: JSON_RULES_SAME_REASONS(USAGE_); checks that
 * USAGE_OK, USAGE_ERR_TOO_LARGE, ... equal the shared values. */
#define JSON_RULES_SAME_(P, R)                                                 \
    _Static_assert((int)P##ERR_##R == (int)JSON_RULES_ERR_##R,                 \
                   #P "ERR_" #R " must equal JSON_RULES_ERR_" #R)
#define JSON_RULES_SAME_REASONS(P)                                             \
    _Static_assert((int)P##OK == (int)JSON_RULES_OK, #P "OK must be 0");       \
    JSON_RULES_SAME_(P, TOO_LARGE);                                            \
    JSON_RULES_SAME_(P, INVALID_JSON);                                         \
    JSON_RULES_SAME_(P, INVALID_UTF8);                                         \
    JSON_RULES_SAME_(P, NUL_CHARACTER);                                        \
    JSON_RULES_SAME_(P, DUPLICATE_MEMBER);                                     \
    JSON_RULES_SAME_(P, TOO_DEEP);                                             \
    JSON_RULES_SAME_(P, NOT_OBJECT);                                           \
    JSON_RULES_SAME_(P, SCHEMA_VERSION);                                       \
    JSON_RULES_SAME_(P, MISSING_FIELD);                                        \
    JSON_RULES_SAME_(P, WRONG_TYPE);                                           \
    JSON_RULES_SAME_(P, OUT_OF_RANGE);                                         \
    JSON_RULES_SAME_(P, INVALID_ID);                                           \
    JSON_RULES_SAME_(P, INVALID_STRING)

/* The code of a parser's reason (0 <= reason < count): a shared reason's
 * from the table here, any other from own[reason] (own has count entries
 * indexed by the parser's enum, NULL for the shared ones). "unknown" out
 * of range. */
const char *json_rules_reason_code(int reason, const char *const *own,
                                   int count);

/* One message being parsed. The parser fills the first group (a
 * designated initializer leaves the rest zero), json_rules_load() the
 * second; every getter below records its failure in `reason` and
 * errstr. */
typedef struct {
    /* The members the parser knows: names[i] is filed into members[i]
     * (n_members entries, all NULL at the start). */
    const char *const *names;
    json_t **members;
    size_t n_members;
    size_t max_bytes; /* --max-message-bytes */
    int max_depth;    /* nesting limit, checked before jansson recurses */
    /* Optional: a top-level member whose value's exact raw bytes are
     * wanted (span_* below), e.g. "metadata". */
    const char *span_name;
    /* How jansson's error text appears in errstr: false, as any echoed
     * text (json_rules_echo()); true, printable ASCII only, other bytes
     * '?', uncut. */
    bool json_error_ascii;
    /* True when the parser only asks whether a member is an object or an
     * array, never what it holds (the token-usage metadata, kept as raw
     * bytes): the fast path may then take messages with containers. */
    bool opaque_containers;
    char *errstr;
    size_t errstr_size;

    json_t *root; /* the object; owned, json_rules_free() */
    bool members_owned; /* loaded by the fast path: members are owned */
    /* The first failure: a json_rules_reason_t or the parser's own
     * reason (json_rules_fail()); 0 while all is well. */
    int reason;
    bool span_found;
    size_t span_start; /* span_name's value is buf[span_start, span_end) */
    size_t span_end;
} json_rules_doc_t;

/* Size, depth, JSON (one object, no duplicate member names, valid UTF-8,
 * no U+0000), in that order, then files the object's members: null ones
 * are left out (null means absent), unknown ones ignored. Returns true,
 * or false with the reason and errstr set. Clears errstr first. */
__attribute__((warn_unused_result)) bool
json_rules_load(json_rules_doc_t *doc, const char *buf, size_t len);

/* Whether json_rules_load() may take its fast path (on by default): a
 * one-pass load of flat objects of plain members, which gives the same
 * outcome as jansson's. Off, every message goes through jansson; for the
 * tests that compare the two. Not thread-safe: set it before parsing. */
void json_rules_set_fast_path(bool on);
/* Frees what json_rules_load() parsed; member values and strings from
 * the getters die with it. Safe after a failed load. */
void json_rules_free(json_rules_doc_t *doc);

/* Records reason (a shared or a parser's own) and the message in errstr,
 * and returns false, so that a getter can `return json_rules_fail(...)`. */
__attribute__((format(printf, 3, 4))) bool
json_rules_fail(json_rules_doc_t *doc, int reason, const char *fmt, ...);

/* Typed getters of member f (an index into names/members). Each returns
 * true, or false with the reason and errstr naming the field. */

/* A string; *s is NULL when absent (then missing_field if required).
 * *s lives as long as the document. */
__attribute__((warn_unused_result)) bool
json_rules_get_string(json_rules_doc_t *doc, size_t f, bool required,
                      const char **s, size_t *len);
/* An id into out (JSON_RULES_ID_MAX + 1 bytes); absent leaves out as it
 * is. With allow_all, exactly "*" is accepted too. */
__attribute__((warn_unused_result)) bool
json_rules_get_id(json_rules_doc_t *doc, size_t f, bool required,
                  bool allow_all, char *out);
/* Optional text of 1..max bytes without control characters into out
 * (max + 1 bytes); absent leaves out as it is. */
__attribute__((warn_unused_result)) bool
json_rules_get_text(json_rules_doc_t *doc, size_t f, size_t max, char *out);
/* JSON true or false; absent -> false. 1 and "true" are wrong_type. */
__attribute__((warn_unused_result)) bool
json_rules_get_bool(json_rules_doc_t *doc, size_t f, bool *out);
/* Absent or the integer 1: any other integer is schema_version, anything
 * else wrong_type. */
__attribute__((warn_unused_result)) bool
json_rules_get_schema_version(json_rules_doc_t *doc, size_t f);

/* What a member held, for errstr: "\"text\"" (as json_rules_echo()),
 * "1000 (a real number)", "true", "an object", ... Returns buf (size
 * JSON_RULES_DESCRIBE_SIZE is enough), or a static string. */
const char *json_rules_describe(const json_t *v, char *buf, size_t size);

/* Copies at most JSON_RULES_ECHO_MAX bytes of untrusted text for a log
 * line or a Kafka header: control characters and bytes that are not UTF-8
 * become '?', a cut never splits a UTF-8 sequence and ends in "...". */
void json_rules_echo(const char *s, size_t len,
                     char out[JSON_RULES_ECHO_MAX + 4]);

/* ^[A-Za-z0-9_.@-]{1,128}$ */
bool json_rules_is_id(const char *s, size_t len);
/* Well-formed UTF-8 with no U+0000-U+001F, U+007F-U+009F (callers may
 * hand in bytes that did not come through jansson). */
bool json_rules_is_text(const char *s, size_t len);

#endif
