/* Unit tests of the cache key layout: patterns, duplicates, isolation. */
#include "cache_key.h"
#include "invalidation_event.h"

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

/* ------------------------------------------------------------------ */
/* Helpers                                                            */
/* ------------------------------------------------------------------ */

/* A glob matcher with the meaning Redis's SCAN MATCH gives '*', '?',
 * '[...]' (with '^' and ranges) and '\\' escapes: enough to show that an
 * escaped pattern matches exactly the keys that start with its prefix. */
static bool glob_match(const char *p, const char *s)
{
    for (; *p; p++, s++) {
        switch (*p) {
        case '*':
            while (p[1] == '*')
                p++;
            for (;; s++) {
                if (glob_match(p + 1, s))
                    return true;
                if (!*s)
                    return false;
            }
        case '?':
            if (!*s)
                return false;
            break;
        case '[': {
            if (!*s)
                return false;
            p++;
            bool neg = *p == '^', hit = false;
            if (neg)
                p++;
            while (*p && *p != ']') {
                if (*p == '\\' && p[1]) {
                    p++;
                    hit |= *p == *s;
                } else if (p[1] == '-' && p[2] && p[2] != ']') {
                    hit |= *p <= *s && *s <= p[2];
                    p += 2;
                } else {
                    hit |= *p == *s;
                }
                p++;
            }
            if (!*p)
                p--;
            if (hit == neg)
                return false;
            break;
        }
        case '\\':
            if (p[1])
                p++;
            /* fall through */
        default:
            if (*p != *s)
                return false;
            break;
        }
    }
    return *s == '\0';
}

static void set(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src);
}

static invalidation_t make(const char *tenant, const char *type,
                           const char *resource)
{
    invalidation_t inv;
    memset(&inv, 0, sizeof(inv));
    set(inv.tenant_id, sizeof(inv.tenant_id), tenant);
    set(inv.data_type, sizeof(inv.data_type), type);
    set(inv.resource_id, sizeof(inv.resource_id), resource);
    return inv;
}

static const char *pattern_of(const char *prefix, char *buf, size_t size)
{
    size_t n = cache_glob_escape(prefix, buf, size);
    assert_true(n < size);
    assert_int_equal(strlen(buf), n);
    return buf;
}

/* Whether any target of t matches key: an exact key equal to it, or a
 * prefix set whose escaped pattern matches it. */
static bool targets_touch(const cache_targets_t *t, const char *key)
{
    char pat[2048];
    for (size_t i = 0; i < t->n; i++) {
        const cache_target_t *it = &t->items[i];
        if (it->kind == CACHE_TARGET_KEY && strcmp(it->str, key) == 0)
            return true;
        if (it->kind == CACHE_TARGET_PREFIX &&
            glob_match(pattern_of(it->str, pat, sizeof(pat)), key))
            return true;
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* cache_glob_escape                                                  */
/* ------------------------------------------------------------------ */

static void test_escape_plain(void **state)
{
    char out[64];
    (void)state;
    assert_int_equal(cache_glob_escape("cache:{t1}:agent:", out, sizeof(out)),
                     18);
    assert_string_equal(out, "cache:{t1}:agent:*");
    assert_int_equal(cache_glob_escape("", out, sizeof(out)), 1);
    assert_string_equal(out, "*");
}

static void test_escape_specials(void **state)
{
    char out[64];
    (void)state;
    assert_int_equal(cache_glob_escape("a*b?c[d]e\\f:", out, sizeof(out)), 18);
    assert_string_equal(out, "a\\*b\\?c\\[d\\]e\\\\f:*");
    /* '-', '^', '{', '}' and spaces mean nothing outside [...] */
    cache_glob_escape("x-^{} :", out, sizeof(out));
    assert_string_equal(out, "x-^{} :*");
}

/* Too small: the needed length comes back, out is "" and never a cut
 * pattern; exactly big enough: written. */
static void test_escape_too_small(void **state)
{
    char out[32];
    (void)state;
    const char *prefix = "c*:{t1}:"; /* pattern "c\*:{t1}:*", 10 bytes */
    assert_int_equal(cache_glob_escape(prefix, NULL, 0), 10);
    for (size_t size = 1; size <= 10; size++) {
        memset(out, 'x', sizeof(out));
        assert_int_equal(cache_glob_escape(prefix, out, size), 10);
        assert_string_equal(out, "");
        assert_int_equal(out[1], 'x'); /* nothing past out[0] written */
    }
    assert_int_equal(cache_glob_escape(prefix, out, 11), 10);
    assert_string_equal(out, "c\\*:{t1}:*");
}

/* With --cache-prefix full of glob specials, every prefix set's pattern
 * still matches exactly the keys that start with it. */
static void test_escape_matches_exactly_the_prefix(void **state)
{
    (void)state;
    const char *cache_prefix = "c*?[a-z]\\x";
    invalidation_t inv = make("t1", "document", "*");
    set(inv.collection_id, sizeof(inv.collection_id), "l1");
    cache_targets_t t;
    assert_int_equal(cache_targets_build(&inv, cache_prefix, &t), 0);
    assert_int_equal(t.n, 1);
    assert_int_equal(t.items[0].kind, CACHE_TARGET_PREFIX);
    assert_string_equal(t.items[0].str, "c*?[a-z]\\x:{t1}:document:coll=l1:");

    char pat[256];
    pattern_of(t.items[0].str, pat, sizeof(pat));
    assert_string_equal(pat, "c\\*\\?\\[a-z\\]\\\\x:{t1}:document:coll=l1:*");

    static const char *const keys[] = {
        "c*?[a-z]\\x:{t1}:document:coll=l1:d1",  /* in */
        "c*?[a-z]\\x:{t1}:document:coll=l1:",    /* in: empty resource */
        "cX?[a-z]\\x:{t1}:document:coll=l1:d1",  /* '*' taken literally */
        "c*Q[a-z]\\x:{t1}:document:coll=l1:d1",  /* '?' too */
        "c*?q\\x:{t1}:document:coll=l1:d1",      /* no class */
        "c*?[a-z]x:{t1}:document:coll=l1:d1",    /* '\\' literal */
        "c*?[a-z]\\x:{t10}:document:coll=l1:d1", /* other tenant */
        "c*?[a-z]\\x:{t1}:document:coll=l10:d1", /* other collection */
        "c*?[a-z]\\x:{t1}:document:d1",          /* unscoped */
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        bool in =
            cache_key_has_prefix(keys[i], strlen(keys[i]), t.items[0].str);
        assert_int_equal(glob_match(pat, keys[i]), in);
        assert_int_equal(in, i < 2);
    }
    /* ... which the unescaped prefix would not do */
    const char *other = "cZZqx:{t1}:document:coll=l1:d1";
    char raw[256];
    snprintf(raw, sizeof(raw), "%s*", t.items[0].str);
    assert_true(glob_match(raw, other));
    assert_false(glob_match(pat, other));
    cache_targets_free(&t);
}

/* ------------------------------------------------------------------ */
/* cache_key_has_prefix                                               */
/* ------------------------------------------------------------------ */

static void test_has_prefix(void **state)
{
    (void)state;
    const char key[] = {'c', ':', '{', 't', '1', '}', ':', 'a'}; /* no NUL */
    assert_true(cache_key_has_prefix(key, sizeof(key), "c:{t1}:"));
    assert_true(cache_key_has_prefix(key, sizeof(key), "c:{t1}:a"));
    assert_true(cache_key_has_prefix(key, sizeof(key), ""));
    assert_false(cache_key_has_prefix(key, sizeof(key), "c:{t1}:ab"));
    assert_false(cache_key_has_prefix(key, 6, "c:{t1}:"));
    assert_false(cache_key_has_prefix(key, sizeof(key), "c:{t10}:"));
    assert_false(cache_key_has_prefix("", 0, "c"));
}

/* ------------------------------------------------------------------ */
/* cache_targets_build                                                */
/* ------------------------------------------------------------------ */

static void test_contract_examples(void **state)
{
    (void)state;
    cache_targets_t t;
    invalidation_t inv = make("t1", "agent", "a1");
    assert_int_equal(cache_targets_build(&inv, NULL, &t), 0);
    assert_int_equal(t.n, 1);
    assert_string_equal(t.items[0].str, "cache:{t1}:agent:a1");
    cache_targets_free(&t);

    inv = make("t1", "conversation_memory", "c9");
    set(inv.agent_id, sizeof(inv.agent_id), "a1");
    set(inv.conversation_id, sizeof(inv.conversation_id), "c9");
    assert_int_equal(cache_targets_build(&inv, "cache", &t), 0);
    assert_int_equal(t.n, 1);
    assert_string_equal(t.items[0].str,
                        "cache:{t1}:conversation_memory:agent=a1:conv=c9:c9");
    cache_targets_free(&t);

    inv = make("t1", "conversation_message", "m42");
    set(inv.agent_id, sizeof(inv.agent_id), "a1");
    set(inv.conversation_id, sizeof(inv.conversation_id), "c9");
    assert_int_equal(cache_targets_build(&inv, "cache", &t), 0);
    assert_int_equal(t.n, 1);
    assert_int_equal(t.n_keys, 1);
    assert_string_equal(t.items[0].str,
                        "cache:{t1}:conversation_message:agent=a1:conv=c9:m42");
    cache_targets_free(&t);
}

/* Every combination of the fields that shape the output: no string
 * twice, counts add up, everything inside the one buffer and under the
 * event's own "cache:{t1}:". */
static void test_no_duplicates(void **state)
{
    (void)state;
    static const char *const types[] = {"agent", "conversation",
                                        "conversation_memory", "agent_config",
                                        "document"};
    static const char *const resources[] = {"a1", "c9", "*"};
    static const char *const agents[] = {"", "a1", "a2"};
    static const char *const convs[] = {"", "c9", "a1"};
    static const char *const colls[] = {"", "l1"};
    size_t builds = 0;
    /* one index walks all 5 * 3 * 3 * 3 * 2 * 4 combinations */
    for (size_t i = 0; i < 5 * 3 * 3 * 3 * 2 * 4; i++) {
        size_t v = i, flags = v % 4, cl = (v /= 4) % 2, co = (v /= 2) % 3,
               ag = (v /= 3) % 3, re = (v /= 3) % 3, ty = v / 3;
        invalidation_t inv = make("t1", types[ty], resources[re]);
        set(inv.agent_id, sizeof(inv.agent_id), agents[ag]);
        set(inv.conversation_id, sizeof(inv.conversation_id), convs[co]);
        set(inv.collection_id, sizeof(inv.collection_id), colls[cl]);
        inv.cascade = flags & 1;
        inv.invalidate_conversations = flags & 2;
        cache_targets_t t;
        if (inv.cascade && re == 2) {
            errno = 0;
            assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
            assert_int_equal(errno, EINVAL);
            assert_int_equal(t.n, 0);
            assert_null(t.buf);
            continue;
        }
        assert_int_equal(cache_targets_build(&inv, NULL, &t), 0);
        builds++;
        assert_true(t.n >= 1 && t.n <= CACHE_TARGETS_MAX);
        assert_int_equal(t.n_keys + t.n_prefixes, t.n);
        size_t keys = 0;
        for (size_t k = 0; k < t.n; k++) {
            const cache_target_t *a = &t.items[k];
            keys += a->kind == CACHE_TARGET_KEY;
            assert_int_equal(strlen(a->str), a->len);
            assert_true(a->str >= t.buf);
            assert_true(cache_key_has_prefix(a->str, a->len, "cache:{t1}:"));
            for (size_t j = 0; j < k; j++)
                assert_false(t.items[j].kind == a->kind &&
                             strcmp(t.items[j].str, a->str) == 0);
        }
        assert_int_equal(keys, t.n_keys);
        /* the most there can be: agent, cascade, conversations */
        if (ty == 0 && inv.cascade && inv.invalidate_conversations)
            assert_int_equal(t.n, 7);
        cache_targets_free(&t);
        assert_null(t.buf);
        assert_int_equal(t.n, 0);
    }
    assert_int_equal(builds, 5 * 3 * 3 * 3 * 2 * 4 - 5 * 3 * 3 * 2 * 2);
}

/* t1's targets never touch t10's (or t1x's) keys, and the other way
 * round, for events as wide as the contract allows. */
static void test_tenant_isolation(void **state)
{
    (void)state;
    static const char *const tenants[] = {"t1", "t10", "t1.x", "T1"};
    /* keys of every tenant: "cache:{<tenant>}:" + each of these */
    static const char *const rests[] = {
        "agent:a1",
        "agent_config:a1",
        "agent_tools:a1",
        "conversation:agent=a1:conv=c9:c9",
        "conversation_message:agent=a1:conv=c9:m42",
        "conversation_memory:conv=c9:c9",
        "document:coll=l1:d1",
    };
    for (size_t a = 0; a < 4; a++) {
        /* the widest sets one tenant can name */
        invalidation_t evs[4];
        evs[0] = make(tenants[a], "agent", "a1");
        evs[0].cascade = evs[0].invalidate_conversations = true;
        evs[1] = make(tenants[a], "conversation", "c9");
        evs[1].cascade = true;
        evs[2] = make(tenants[a], "conversation_message", "*");
        evs[3] = make(tenants[a], "document", "*");
        for (size_t e = 0; e < 4; e++) {
            cache_targets_t t;
            assert_int_equal(cache_targets_build(&evs[e], NULL, &t), 0);
            bool touched_own = false;
            for (size_t b = 0; b < 4; b++) {
                for (size_t k = 0; k < 7; k++) {
                    char key[256];
                    snprintf(key, sizeof(key), "cache:{%s}:%s", tenants[b],
                             rests[k]);
                    bool hit = targets_touch(&t, key);
                    if (a != b)
                        assert_false(hit);
                    touched_own |= hit;
                }
            }
            assert_true(touched_own);
            cache_targets_free(&t);
        }
    }
}

/* A struct filled by hand with values the parser would refuse cannot
 * produce keys: the builder checks again. */
static void test_build_rejects_invalid(void **state)
{
    (void)state;
    static const char *const bad_tenants[] = {"t1}:x", "t1:*", "*",  "",
                                              "{t2}",  "t 1",  "t1?"};
    cache_targets_t t;
    for (size_t i = 0; i < sizeof(bad_tenants) / sizeof(bad_tenants[0]); i++) {
        invalidation_t inv = make(bad_tenants[i], "agent", "a1");
        errno = 0;
        assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
        assert_int_equal(errno, EINVAL);
        assert_int_equal(t.n, 0);
        assert_null(t.buf);
        cache_targets_free(&t); /* safe after a failure */
    }

    invalidation_t inv = make("t1", "Agent", "a1");
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    inv = make("t1", "agent", "a*");
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    inv = make("t1", "agent", "a1");
    set(inv.agent_id, sizeof(inv.agent_id), "a1:conv=x");
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    inv = make("t1", "agent", "a1");
    set(inv.collection_id, sizeof(inv.collection_id), "*");
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    inv = make("t1", "agent", "*");
    inv.cascade = true;
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    inv = make("t1", "agent", "a1");
    memset(inv.tenant_id, 'a', sizeof(inv.tenant_id)); /* no NUL */
    assert_int_equal(cache_targets_build(&inv, NULL, &t), -1);
    assert_int_equal(cache_targets_build(NULL, NULL, &t), -1);
}

/* The parser and the builder together on hostile tenants: nothing gets
 * as far as a key. */
static void test_parse_hostile_tenants(void **state)
{
    (void)state;
    static const char *const msgs[] = {
        "{\"tenant_id\":\"t1:*\",\"data_type\":\"agent\",\"resource_id\":\"*"
        "\"}",
        "{\"tenant_id\":\"t1}\",\"data_type\":\"agent\",\"resource_id\":\"a\"}",
        "{\"tenant_id\":\"t1\",\"data_type\":\"agent}:{t2\","
        "\"resource_id\":\"a\"}",
        "{\"tenant_id\":\"t1\",\"data_type\":\"agent\","
        "\"resource_id\":\"a\",\"agent_id\":\"x:{t2}\"}",
    };
    for (size_t i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++) {
        invalidation_t inv;
        char err[256];
        assert_int_not_equal(invalidation_parse(msgs[i], strlen(msgs[i]),
                                                1 << 20, &inv, err,
                                                sizeof(err)),
                             INVALIDATION_OK);
        assert_true(err[0] != '\0');
    }
}

static void test_reason_codes(void **state)
{
    (void)state;
    assert_string_equal(invalidation_reason_code(INVALIDATION_OK), "ok");
    assert_string_equal(
        invalidation_reason_code(INVALIDATION_ERR_CASCADE_WILDCARD),
        "cascade_wildcard");
    assert_string_equal(
        invalidation_reason_code(INVALIDATION_ERR_INVALID_DATA_TYPE),
        "invalid_data_type");
    assert_string_equal(invalidation_reason_code(INVALIDATION_ERR__COUNT),
                        "unknown");
    for (int r = 0; r < INVALIDATION_ERR__COUNT; r++)
        assert_non_null(invalidation_reason_code((invalidation_reason_t)r));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escape_plain),
        cmocka_unit_test(test_escape_specials),
        cmocka_unit_test(test_escape_too_small),
        cmocka_unit_test(test_escape_matches_exactly_the_prefix),
        cmocka_unit_test(test_has_prefix),
        cmocka_unit_test(test_contract_examples),
        cmocka_unit_test(test_no_duplicates),
        cmocka_unit_test(test_tenant_isolation),
        cmocka_unit_test(test_build_rejects_invalid),
        cmocka_unit_test(test_parse_hostile_tenants),
        cmocka_unit_test(test_reason_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
