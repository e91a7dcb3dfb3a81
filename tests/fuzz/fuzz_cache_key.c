/* Fuzz target: the Redis key layout (cache_targets_build, glob escape). */
#include "cache_key.h"
#include "fuzz_check.h"
#include "invalidation_event.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>

/* Two ways in, both tried on every input:
 * 1. the bytes as a cache-invalidation message: if invalidation_parse()
 *    accepts it, its targets under a few --cache-prefix values;
 * 2. the bytes as a struct filled by hand, fields split at '\n':
 *      prefix \n tenant \n data_type \n resource \n agent \n conv \n coll
 *      \n flags (bit 0 cascade, bit 1 invalidate_conversations)
 *    each copied into its array as is (unterminated when too long, NUL
 *    bytes kept), which cache_targets_build() must refuse unless it
 *    obeys the parser's rules.
 * Whatever is built must: start with "<prefix>:{<tenant>}:" of the
 * event's own tenant; hold after it only the layout's segments in order
 * (no '{', '}', glob specials); end prefixes with ':'; equal exactly a
 * reference model written from CONTRACT.md with snprintf(); and each
 * prefix's SCAN pattern must match exactly the keys starting with it. */

#define PREFIX_MAX 300
#define STR_MAX 1024

static const char *const conversation_types[] = {
    "conversation", "conversation_memory", "conversation_message",
    "conversation_messages_list"};

/* ------------------------------------------------------------------ */
/* Independent validators and the reference model                     */
/* ------------------------------------------------------------------ */

static bool ref_is_id(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 128)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                    "0123456789_.@-",
                    s[i]))
            return false;
    return true;
}

static bool ref_is_data_type(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr("abcdefghijklmnopqrstuvwxyz0123456789_", s[i]))
            return false;
    return true;
}

static bool terminated(const char *s, size_t size)
{
    return memchr(s, '\0', size) != NULL;
}

/* Whether cache_targets_build() must accept inv (the parser's rules). */
static bool ref_is_valid(const invalidation_t *inv)
{
    if (!terminated(inv->tenant_id, sizeof(inv->tenant_id)) ||
        !terminated(inv->data_type, sizeof(inv->data_type)) ||
        !terminated(inv->resource_id, sizeof(inv->resource_id)) ||
        !terminated(inv->agent_id, sizeof(inv->agent_id)) ||
        !terminated(inv->conversation_id, sizeof(inv->conversation_id)) ||
        !terminated(inv->collection_id, sizeof(inv->collection_id)))
        return false;
    bool all = strcmp(inv->resource_id, "*") == 0;
    return ref_is_id(inv->tenant_id) && ref_is_data_type(inv->data_type) &&
           (all || ref_is_id(inv->resource_id)) &&
           (!inv->agent_id[0] || ref_is_id(inv->agent_id)) &&
           (!inv->conversation_id[0] || ref_is_id(inv->conversation_id)) &&
           (!inv->collection_id[0] || ref_is_id(inv->collection_id)) &&
           !(all && inv->cascade);
}

typedef struct {
    size_t n;
    bool is_key[CACHE_TARGETS_MAX];
    char str[CACHE_TARGETS_MAX][STR_MAX];
} ref_t;

/* P(type) [+ resource] as the contract spells it. */
static void ref_add(ref_t *m, bool is_key, const char *prefix,
                    const char *tenant, const char *type, const char *agent,
                    const char *conv, const char *coll, const char *resource)
{
    CHECK(m->n < CACHE_TARGETS_MAX);
    char *s = m->str[m->n];
    int n =
        snprintf(s, STR_MAX, "%s:{%s}:%s%s%s%s%s%s%s:%s", prefix, tenant, type,
                 agent[0] ? ":agent=" : "", agent, conv[0] ? ":conv=" : "",
                 conv, coll[0] ? ":coll=" : "", coll, is_key ? resource : "");
    CHECK(n > 0 && n < STR_MAX);
    m->is_key[m->n++] = is_key;
}

static void ref_build(const invalidation_t *inv, const char *prefix, ref_t *m)
{
    const char *t = inv->tenant_id, *r = inv->resource_id, *a = inv->agent_id,
               *c = inv->conversation_id, *l = inv->collection_id;
    bool all = strcmp(r, "*") == 0;
    m->n = 0;
    ref_add(m, !all, prefix, t, inv->data_type, a, c, l, r);
    if (!inv->cascade || all)
        return;
    if (strcmp(inv->data_type, "agent") == 0) {
        ref_add(m, true, prefix, t, "agent_config", a, c, l, r);
        ref_add(m, true, prefix, t, "agent_tools", a, c, l, r);
        if (inv->invalidate_conversations)
            for (size_t i = 0; i < 4; i++)
                ref_add(m, false, prefix, t, conversation_types[i], r, "", "",
                        "");
    } else if (strcmp(inv->data_type, "conversation") == 0) {
        for (size_t i = 0; i < 4; i++)
            ref_add(m, false, prefix, t, conversation_types[i], a, r, "", "");
    }
}

/* ------------------------------------------------------------------ */
/* Redis glob semantics, for the SCAN patterns                         */
/* ------------------------------------------------------------------ */

/* Redis's stringmatchlen() for what an escaped pattern may hold: '*',
 * '?', '\\' escapes. An unescaped '[' or ']' must not be there at all. */
static bool glob_match(const char *p, size_t pn, const char *s, size_t sn)
{
    while (pn > 0) {
        switch (*p) {
        case '*':
            while (pn > 1 && p[1] == '*')
                p++, pn--;
            if (pn == 1)
                return true;
            for (size_t i = 0; i <= sn; i++)
                if (glob_match(p + 1, pn - 1, s + i, sn - i))
                    return true;
            return false;
        case '?':
            if (sn == 0)
                return false;
            s++, sn--;
            p++, pn--;
            continue;
        case '[':
        case ']':
            CHECK(!"unescaped bracket in a pattern");
            return false;
        case '\\':
            if (pn >= 2)
                p++, pn--;
            /* fall through */
        default:
            if (sn == 0 || *p != *s)
                return false;
            s++, sn--;
            p++, pn--;
        }
    }
    return sn == 0;
}

/* The pattern of `prefix` matches prefix+tail for any tail, and nothing
 * that does not start with prefix; it is never written truncated. */
static void check_pattern(const char *prefix, const char *tail, size_t tn)
{
    size_t pn = strlen(prefix);
    size_t need = cache_glob_escape(prefix, NULL, 0);
    CHECK(need >= pn + 1 && need <= 2 * pn + 1);
    char *pat = malloc(need + 1), *s = malloc(pn + tn + 1);
    CHECK(pat && s);
    memset(pat, 'x', need + 1);
    CHECK(cache_glob_escape(prefix, pat, need) == need && pat[0] == '\0');
    CHECK(cache_glob_escape(prefix, pat, need + 1) == need);
    CHECK(strlen(pat) == need && pat[need - 1] == '*');
    /* Every special but the final '*' is escaped. */
    for (size_t i = 0; i + 1 < need; i++) {
        if (pat[i] == '\\') {
            CHECK(i + 2 < need && strchr("*?[]\\", pat[i + 1]));
            i++;
        } else {
            CHECK(!strchr("*?[]", pat[i]));
        }
    }
    memcpy(s, prefix, pn);
    memcpy(s + pn, tail, tn);
    CHECK(glob_match(pat, need, s, pn + tn));
    CHECK(glob_match(pat, need, s, pn));
    if (pn > 0) {
        CHECK(!glob_match(pat, need, s, pn - 1));
        s[pn - 1] = (char)(s[pn - 1] ^ 1);
        CHECK(!glob_match(pat, need, s, pn + tn));
    }
    free(s);
    free(pat);
}

/* ------------------------------------------------------------------ */
/* Checks of one build                                                */
/* ------------------------------------------------------------------ */

/* After "<prefix>:{<tenant>}:": type[:agent=id][:conv=id][:coll=id]:
 * and, for a key, the resource id. */
static void check_layout(const char *rest, bool is_key)
{
    char copy[STR_MAX];
    size_t n = strlen(rest);
    CHECK(n < sizeof(copy));
    memcpy(copy, rest, n + 1);
    for (size_t i = 0; i < n; i++)
        CHECK(!strchr("{}*?[]\\", copy[i]));

    char *cursor = copy, *tok;
    int seg = 0; /* segments seen: 1 agent, 2 conv, 3 coll */
    tok = strsep(&cursor, ":");
    CHECK(ref_is_data_type(tok));
    for (;;) {
        CHECK(cursor != NULL); /* the ':' after the scope is there */
        tok = strsep(&cursor, ":");
        if (!cursor) { /* the last piece: resource or "" for a prefix */
            CHECK(is_key ? ref_is_id(tok) : tok[0] == '\0');
            break;
        }
        const char *names[] = {"agent=", "conv=", "coll="};
        int which = 0;
        for (int k = 0; k < 3; k++)
            if (strncmp(tok, names[k], strlen(names[k])) == 0)
                which = k + 1;
        CHECK(which > seg);
        CHECK(ref_is_id(tok + strlen(names[which - 1])));
        seg = which;
    }
}

/* A prefix set's SCAN pattern: it finds exactly the targets that start
 * with the prefix, and never the same layout under a tenant whose id
 * extends this one (t1 vs t10). `on` is the length of the prefix's own
 * "<prefix>:{<tenant>}:". */
static void check_scan(const cache_targets_t *t, const cache_target_t *it,
                       const char *tenant, size_t on, const char *tail,
                       size_t tn)
{
    char other[STR_MAX + 1];
    size_t need = cache_glob_escape(it->str, NULL, 0);
    char *pat = malloc(need + 1);
    CHECK(pat && cache_glob_escape(it->str, pat, need + 1) == need);
    check_pattern(it->str, tail, tn);
    for (size_t j = 0; j < t->n; j++)
        CHECK(glob_match(pat, need, t->items[j].str, t->items[j].len) ==
              cache_key_has_prefix(t->items[j].str, t->items[j].len, it->str));
    /* The same string with tenant "<tenant>0". */
    size_t tl = strlen(tenant), head = on - 2; /* up to the tenant's '}' */
    CHECK(it->len + 1 < sizeof(other) && head >= tl);
    memcpy(other, it->str, head);
    other[head] = '0';
    memcpy(other + head + 1, it->str + head, it->len - head + 1);
    CHECK(!glob_match(pat, need, other, it->len + 1));
    free(pat);
}

static void check_targets(const invalidation_t *inv, const char *prefix,
                          const cache_targets_t *t, const char *tail, size_t tn)
{
    char own[PREFIX_MAX + 140];
    ref_t m;
    size_t keys = 0;

    snprintf(own, sizeof(own), "%s:{%s}:", prefix, inv->tenant_id);
    size_t on = strlen(own);
    ref_build(inv, prefix, &m);
    CHECK(t->n == m.n && t->buf != NULL);
    CHECK(t->n_keys + t->n_prefixes == t->n);
    for (size_t i = 0; i < t->n; i++) {
        const cache_target_t *it = &t->items[i];
        bool is_key = it->kind == CACHE_TARGET_KEY;
        CHECK(is_key || it->kind == CACHE_TARGET_PREFIX);
        CHECK(strlen(it->str) == it->len);
        CHECK(is_key == m.is_key[i] && strcmp(it->str, m.str[i]) == 0);
        CHECK(cache_key_has_prefix(it->str, it->len, own));
        if (!is_key)
            CHECK(it->str[it->len - 1] == ':');
        check_layout(it->str + on, is_key);
        keys += is_key;
        for (size_t j = 0; j < i; j++)
            CHECK(t->items[j].kind != it->kind ||
                  strcmp(t->items[j].str, it->str) != 0);
        if (!is_key)
            check_scan(t, it, inv->tenant_id, on, tail, tn);
    }
    CHECK(keys == t->n_keys);
}

/* Builds inv under prefix: success exactly when the rules say so. */
static void build_and_check(const invalidation_t *inv, const char *prefix,
                            const char *tail, size_t tn)
{
    cache_targets_t t;
    bool valid = ref_is_valid(inv);
    errno = 0;
    int rc = cache_targets_build(inv, prefix, &t);
    if (!valid) {
        CHECK(rc == -1 && errno == EINVAL);
        CHECK(t.n == 0 && t.buf == NULL);
    } else {
        CHECK(rc == 0);
        check_targets(inv, prefix ? prefix : CACHE_PREFIX_DEFAULT, &t, tail,
                      tn);
    }
    cache_targets_free(&t);
    CHECK(t.n == 0 && t.buf == NULL);
    cache_targets_free(&t);
}

/* ------------------------------------------------------------------ */
/* The entry point                                                    */
/* ------------------------------------------------------------------ */

static void copy_field(char *dst, size_t size, const char *src, size_t n)
{
    memcpy(dst, src, n < size ? n : size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const prefixes[] = {NULL, "cache", "", "c*?[x]\\y",
                                           "svc:{x}"};
    const char *buf = (const char *)data;
    invalidation_t inv;
    char err[FUZZ_ERRSTR_SIZE];

    /* 1. As a message. */
    if (invalidation_parse(buf, size, 1024 * 1024, &inv, err, sizeof(err)) ==
        INVALIDATION_OK)
        for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
            build_and_check(&inv, prefixes[i], buf, size);

    /* 2. As a struct filled by hand. */
    const char *field[8] = {0};
    size_t len[8] = {0}, nf = 0, start = 0;
    for (size_t i = 0; i <= size && nf < 8; i++) {
        if (i == size || buf[i] == '\n') {
            field[nf] = buf + start;
            len[nf++] = i - start;
            start = i + 1;
        }
    }
    char prefix[PREFIX_MAX + 1];
    size_t pn = nf > 0 ? strnlen(field[0], len[0]) : 0;
    if (pn > PREFIX_MAX)
        pn = PREFIX_MAX;
    if (pn)
        memcpy(prefix, field[0], pn);
    prefix[pn] = '\0';
    check_pattern(prefix, buf, size);

    memset(&inv, 0, sizeof(inv));
    char *dst[] = {inv.tenant_id, inv.data_type,       inv.resource_id,
                   inv.agent_id,  inv.conversation_id, inv.collection_id};
    size_t dsz[] = {sizeof(inv.tenant_id),       sizeof(inv.data_type),
                    sizeof(inv.resource_id),     sizeof(inv.agent_id),
                    sizeof(inv.conversation_id), sizeof(inv.collection_id)};
    for (size_t f = 1; f < 7 && f < nf; f++)
        copy_field(dst[f - 1], dsz[f - 1], field[f], len[f]);
    if (nf > 7 && len[7] > 0) {
        inv.cascade = field[7][0] & 1;
        inv.invalidate_conversations = (field[7][0] & 2) != 0;
    }
    build_and_check(&inv, prefix, buf, size);
    return 0;
}
