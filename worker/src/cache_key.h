/* The Redis key layout of the cache: keys, prefix sets, SCAN patterns. */
#ifndef TALLY_CACHE_KEY_H
#define TALLY_CACHE_KEY_H

#include "invalidation_event.h"

#include <stdbool.h>
#include <stddef.h>

/* The wire format, shared with the services' cache manager, byte for
 * byte (CONTRACT.md, "Redis key layout"):
 *
 *   P(type) = <prefix>:{<tenant_id>}:<type>[:agent=<agent_id>]
 *             [:conv=<conversation_id>][:coll=<collection_id>]:
 *   key     = P(type) <resource_id>
 *
 * a scope segment present exactly when the event carries that field.
 *
 * Tenant isolation holds by construction, whatever the fields hold:
 * - every key and every prefix built here starts with
 *   "<prefix>:{<tenant_id>}:" of the event's own tenant;
 * - invalidation_parse() (and cache_targets_build() again) admits only
 *   ids matching ^[A-Za-z0-9_.@-]{1,128}$, data types ^[a-z0-9_]{1,64}$
 *   and the resource "*": no value can hold ':', '{', '}' (so it cannot
 *   close the tenant's hash tag or forge a segment) nor a glob special
 *   '*', '?', '[', ']', '\\' (so it cannot widen a SCAN pattern);
 * - a prefix set always ends with ':' right after a complete segment, so
 *   tenant "t1"'s "<prefix>:{t1}:" is never a prefix of "<prefix>:{t10}:"
 *   and agent "a1"'s ":agent=a1:" never matches ":agent=a10:";
 * - cache_glob_escape() escapes every glob special anyway, which matters
 *   only for a --cache-prefix that holds some (defence in depth).
 * A --cache-prefix holding '{' or '}' would move the Redis Cluster hash
 * tag off the tenant (one tenant, several slots) without crossing
 * tenants; configuration should refuse it. */

#define CACHE_PREFIX_DEFAULT "cache"
/* Most targets one event yields: agent with cascade and
 * invalidate_conversations gives 3 keys and 4 prefixes. */
#define CACHE_TARGETS_MAX 8

typedef enum {
    CACHE_TARGET_KEY,    /* one exact key: UNLINK it */
    CACHE_TARGET_PREFIX, /* every key starting with it: SCAN MATCH */
} cache_target_kind_t;

typedef struct {
    cache_target_kind_t kind;
    const char *str; /* NUL-terminated, in the owner's buffer */
    size_t len;
} cache_target_t;

/* What one invalidation names: exact keys and prefix sets, each string
 * once, in a fixed order (the event's own key or prefix first, then the
 * cascade's keys, then its prefixes). All strings live in one heap
 * buffer (`buf`), so there is one allocation per event, none per key;
 * items point into it and stay valid until cache_targets_free(). */
typedef struct {
    size_t n;          /* items[0 .. n-1] */
    size_t n_keys;     /* how many are CACHE_TARGET_KEY */
    size_t n_prefixes; /* how many are CACHE_TARGET_PREFIX */
    cache_target_t items[CACHE_TARGETS_MAX];
    char *buf;
} cache_targets_t;

/* Fills out with the keys and prefix sets inv names under `prefix`
 * (NULL: CACHE_PREFIX_DEFAULT), per the contract:
 * - resource R: key P(data_type)+R; "*": prefix P(data_type);
 * - agent R with cascade: keys P(agent_config)+R, P(agent_tools)+R; with
 *   invalidate_conversations also the prefixes
 *   "<prefix>:{t}:<ct>:agent=R:" for the four conversation types;
 * - conversation R with cascade: the prefixes
 *   "<prefix>:{t}:<ct>[:agent=<agent_id>]:conv=R:" for the four
 *   conversation types (agent segment when the event carries agent_id).
 * invalidate_conversations is ignored otherwise. An exact key that a
 * prefix also covers is kept; no string appears twice.
 * Returns 0, or -1 with errno EINVAL (inv fails the parser's rules: it
 * re-checks them so that a hand-made struct cannot escape its tenant) or
 * ENOMEM; out is then empty. Either way cache_targets_free() is safe. */
__attribute__((warn_unused_result)) int
cache_targets_build(const invalidation_t *inv, const char *prefix,
                    cache_targets_t *out);

/* Frees the buffer and empties t; safe on an emptied or failed t. */
void cache_targets_free(cache_targets_t *t);

/* Writes the Redis glob pattern (SCAN MATCH) that matches exactly the
 * keys starting with `prefix`: every '*', '?', '[', ']' and '\\' is
 * preceded by '\\', and '*' is appended. Returns the pattern's length
 * (without the NUL), like snprintf(); it was written only if that is
 * less than out_size. If out is too small, out (when out_size > 0) gets
 * "" -- never a truncated pattern, which could match other keys -- so
 * callers must check the result. The pattern may hold spaces or
 * quotes: pass it as one argument (redisCommandArgv, %b), never
 * formatted into a command line. */
size_t cache_glob_escape(const char *prefix, char *out, size_t out_size);

/* Whether key (key_len bytes, not necessarily NUL-terminated) starts
 * with prefix: client-side filtering of SCAN results. */
bool cache_key_has_prefix(const char *key, size_t key_len, const char *prefix);

#endif
