/* cache.c: URL parsing, and against a private redis-server, the deletes,
 * the one SCAN pass, the notices and outages.
 *
 *   test_cache_redis                         URL tests only
 *   test_cache_redis --redis URL [--restart CMD] [--bench]
 *
 * --redis names a private server the tests FLUSHALL; --restart is a shell
 * command that starts it again after the outage test shut it down
 * (tests/integration/test_cache.sh passes both). */
#include "cache.h"
#include "cache_key.h"
#include "invalidation_event.h"

#include <hiredis/hiredis.h>
#include <jansson.h>

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#define CHANNEL "cache:invalidations"

static const char *redis_url;
static const char *restart_cmd;
static bool run_bench;
static char redis_host[128];
static int redis_port;

static redisContext *admin; /* the tests' own connection, per test */

/* ------------------------------------------------------------------ */
/* Helpers                                                            */
/* ------------------------------------------------------------------ */

static redisContext *admin_connect(void)
{
    struct timeval tv = {.tv_sec = 10};
    redisContext *ctx = redisConnectWithTimeout(redis_host, redis_port, tv);

    if (!ctx || ctx->err)
        fail_msg("connect %s:%d: %s", redis_host, redis_port,
                 ctx ? ctx->errstr : "oom");
    redisSetTimeout(ctx, tv);
    return ctx;
}

/* Runs a command built from a format (test data only) and returns the
 * reply, failing the test on an error. */
static redisReply *cmd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(admin, fmt, ap);
    va_end(ap);
    if (!r)
        fail_msg("%s: %s", fmt, admin->errstr);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("%s: %s", fmt, r->str);
    return r;
}

static void cmd_ok(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(admin, fmt, ap);
    va_end(ap);
    if (!r || r->type == REDIS_REPLY_ERROR)
        fail_msg("%s: %s", fmt, r ? r->str : admin->errstr);
    freeReplyObject(r);
}

static long long cmd_int(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(admin, fmt, ap);
    va_end(ap);
    if (!r || r->type != REDIS_REPLY_INTEGER)
        fail_msg("%s: not an integer (%s)", fmt,
                 r && r->type == REDIS_REPLY_ERROR ? r->str : "?");
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

static void seed(const char *const *keys, size_t n)
{
    for (size_t i = 0; i < n; i++)
        redisAppendCommand(admin, "SET %s 1", keys[i]);
    for (size_t i = 0; i < n; i++) {
        void *r = NULL;
        if (redisGetReply(admin, &r) != REDIS_OK)
            fail_msg("seed: %s", admin->errstr);
        freeReplyObject(r);
    }
}

/* Reads the replies of n commands appended to admin. */
static void drain_replies(long n)
{
    for (long i = 0; i < n; i++) {
        void *r = NULL;
        if (redisGetReply(admin, &r) != REDIS_OK)
            fail_msg("reply %ld: %s", i, admin->errstr);
        freeReplyObject(r);
    }
}

static bool exists(const char *key)
{
    return cmd_int("EXISTS %s", key) == 1;
}

static void assert_exist(const char *const *keys, size_t n, bool want)
{
    for (size_t i = 0; i < n; i++)
        if (exists(keys[i]) != want)
            fail_msg("%s should %s", keys[i], want ? "exist" : "be gone");
}

#define N(a) (sizeof(a) / sizeof((a)[0]))

/* An event and its targets. */
typedef struct {
    invalidation_t inv;
    cache_targets_t t;
} ev_t;

/* Builds from JSON written with ' for " (readability). */
static void ev_build_prefix(ev_t *e, const char *json, const char *prefix)
{
    char buf[1024], err[256];
    size_t len = strlen(json);

    assert_true(len < sizeof(buf));
    for (size_t i = 0; i <= len; i++)
        buf[i] = json[i] == '\'' ? '"' : json[i];
    if (invalidation_parse(buf, len, 1 << 20, &e->inv, err, sizeof(err)) !=
        INVALIDATION_OK)
        fail_msg("parse %s: %s", buf, err);
    assert_int_equal(cache_targets_build(&e->inv, prefix, &e->t), 0);
}

static void ev_build(ev_t *e, const char *json)
{
    ev_build_prefix(e, json, NULL);
}

static cache_job_t ev_job(ev_t *e)
{
    return (cache_job_t){.targets = &e->t,
                         .tenant_id = e->inv.tenant_id,
                         .event_id = e->inv.event_id};
}

static cache_t *cache_open(void)
{
    char err[256] = "";
    cache_t *c = cache_new(redis_url, err, sizeof(err));
    if (!c)
        fail_msg("cache_new: %s", err);
    return c;
}

static void apply_ok(cache_t *c, cache_job_t *jobs, size_t n, long count)
{
    char err[512] = "";
    if (cache_apply(c, jobs, n, CHANNEL, count, err, sizeof(err)) != 0)
        fail_msg("cache_apply: %s", err);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* "calls" of cmdstat_<name> in INFO commandstats; -1 when absent. */
static long long cmdstat_calls(const char *info, const char *name)
{
    char needle[64];
    snprintf(needle, sizeof(needle), "cmdstat_%s:calls=", name);
    const char *p = strstr(info, needle);
    return p ? atoll(p + strlen(needle)) : -1;
}

static int setup(void **state)
{
    (void)state;
    admin = admin_connect();
    cmd_ok("FLUSHALL");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (admin) {
        /* undo test_auth_default_password whatever happened */
        freeReplyObject(
            redisCommand(admin, "ACL SETUSER default resetpass nopass"));
        redisFree(admin);
        admin = NULL;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* URL                                                                */
/* ------------------------------------------------------------------ */

static void expect_url(const char *url, const char *want)
{
    char err[256] = "", buf[256];
    cache_t *c = cache_new(url, err, sizeof(err));
    if (!c)
        fail_msg("%s: %s", url, err);
    cache_describe(c, buf, sizeof(buf));
    if (strcmp(buf, want) != 0)
        fail_msg("%s: got %s, want %s", url, buf, want);
    cache_free(c);
}

static void expect_bad_url(const char *url, const char *needle)
{
    char err[256] = "";
    cache_t *c = cache_new(url, err, sizeof(err));
    if (c)
        fail_msg("%s: accepted", url);
    if (!strstr(err, needle))
        fail_msg("%s: error '%s' does not say '%s'", url, err, needle);
    if (strstr(err, "s3cret"))
        fail_msg("%s: error '%s' shows the password", url, err);
}

static void test_url(void **state)
{
    (void)state;
    expect_url("redis://localhost:6379/0", "localhost:6379/0");
    expect_url("redis://localhost", "localhost:6379/0");
    expect_url("redis://localhost/", "localhost:6379/0");
    expect_url("redis://127.0.0.1:7000/5", "127.0.0.1:7000/5");
    expect_url("127.0.0.1:7000", "127.0.0.1:7000/0");
    expect_url("localhost", "localhost:6379/0");
    expect_url("redis://:s3cret@h:1/2", "h:1/2");
    expect_url("redis://u:s3cret@h/", "u@h:6379/0");
    expect_url("redis://u%40x:p%3A@h", "u@x@h:6379/0");
    expect_url("redis://u:p@ss@h:1", "u@h:1/0");
    expect_url("redis://[::1]:6380/1", "[::1]:6380/1");
    expect_url("redis://[::1]", "[::1]:6379/0");
    expect_url("u:s3cret@h:2/3", "u@h:2/3");

    expect_bad_url("", "empty");
    expect_bad_url("rediss://h:1", "TLS");
    expect_bad_url("rediss://u:s3cret@h:1", "TLS");
    expect_bad_url("http://h", "scheme");
    expect_bad_url("redis://h:0", "port");
    expect_bad_url("redis://h:65536", "port");
    expect_bad_url("redis://h:x", "port");
    expect_bad_url("redis://h:", "port");
    expect_bad_url("redis://[::1]x", "port");
    expect_bad_url("redis://h/x", "database");
    expect_bad_url("redis://h/-1", "database");
    expect_bad_url("redis://h/99999999999", "database");
    expect_bad_url("redis://", "no host");
    expect_bad_url("redis://:s3cret@", "no host");
    expect_bad_url("redis://:s3cret@:6379", "no host");
    expect_bad_url("redis://u@h", "password");
    expect_bad_url("redis://u:@h", "empty password");
    expect_bad_url("redis://h?db=1", "query");
    expect_bad_url("redis://u:%zz@h", "escape");
    expect_bad_url("redis://u:%2@h", "escape");
    expect_bad_url("redis://u:%00@h", "escape");
    expect_bad_url("redis://[::1", "[");
}

static void test_apply_nothing(void **state)
{
    (void)state;
    char err[128] = "";
    /* nothing to do: no connection attempted (nothing listens here) */
    cache_t *c = cache_new("redis://127.0.0.1:1/0", err, sizeof(err));
    assert_non_null(c);
    assert_int_equal(cache_apply(c, NULL, 0, CHANNEL, 100, err, sizeof(err)),
                     0);
    assert_false(cache_is_connected(c));
    assert_int_equal(cache_connect(c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "connect"));
    cache_free(c);
}

/* ------------------------------------------------------------------ */
/* Deletes                                                            */
/* ------------------------------------------------------------------ */

static void test_exact_keys(void **state)
{
    (void)state;
    static const char *const present[] = {
        "cache:{t1}:agent:a1",
        "cache:{t1}:agent_config:a1",
        "cache:{t1}:document:d1",
    };
    static const char *const survive[] = {
        "cache:{t1}:agent:a10",
        "cache:{t10}:agent:a1",
        "cache:{t1}:document:d10",
    };
    ev_t e[4];
    cache_job_t jobs[4];
    cache_t *c = cache_open();

    seed(present, N(present));
    seed(survive, N(survive));
    /* agent_tools:a1 is missing; the 2nd job names a key the 1st had */
    ev_build(&e[0], "{'tenant_id':'t1','data_type':'agent',"
                    "'resource_id':'a1','cascade':true}");
    ev_build(&e[1], "{'tenant_id':'t1','data_type':'agent',"
                    "'resource_id':'a1'}");
    ev_build(&e[2], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'d1'}");
    ev_build(&e[3], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'d2'}");
    for (size_t i = 0; i < N(e); i++)
        jobs[i] = ev_job(&e[i]);
    apply_ok(c, jobs, N(jobs), 100);

    assert_int_equal(jobs[0].deleted, 2);
    assert_int_equal(jobs[1].deleted, 0);
    assert_int_equal(jobs[2].deleted, 1);
    assert_int_equal(jobs[3].deleted, 0);
    for (size_t i = 0; i < N(jobs); i++)
        assert_int_equal(jobs[i].prefix_matches, 0);
    assert_exist(present, N(present), false);
    assert_exist(survive, N(survive), true);
    assert_true(cache_is_connected(c));

    /* applying again is harmless: nothing left to delete */
    apply_ok(c, jobs, N(jobs), 100);
    for (size_t i = 0; i < N(jobs); i++)
        assert_int_equal(jobs[i].deleted, 0);

    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

static void test_wildcard_isolation(void **state)
{
    (void)state;
    static const char *const gone[] = {
        "cache:{t1}:document:d1",
        "cache:{t1}:document:d2",
        "cache:{t1}:document:coll=k1:d3",
        "cache:{t1}:document:",
        "cache:{t1}:conversation_message:agent=a1:conv=c9:m1",
        "cache:{t1}:conversation_message:agent=a1:conv=c9:m2",
    };
    static const char *const survive[] = {
        "cache:{t10}:document:d1",
        "cache:{t10}:document:coll=k1:d3",
        "cache:{t2}:document:d1",
        "cache:{t1}:documents:d1",
        "cache:{t1}:document",
        "cache:{t1}:agent:a1",
        "cache:{t1}:query_result:document:d1",
        "cache:{t1}:conversation_message:agent=a1:conv=c90:m1",
        "cache:{t1}:conversation_message:agent=a10:conv=c9:m1",
        "cache:{t1}:conversation_message:conv=c9:m1",
        "cache:{t1}:conversation_memory:agent=a1:conv=c9:c9",
        "cache:{t10}:conversation_message:agent=a1:conv=c9:m1",
        "other:{t1}:document:d1",
    };
    ev_t e[2];
    cache_job_t jobs[2];
    cache_t *c = cache_open();

    seed(gone, N(gone));
    seed(survive, N(survive));
    ev_build(&e[0], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'*'}");
    ev_build(&e[1], "{'tenant_id':'t1','data_type':'conversation_message',"
                    "'agent_id':'a1','conversation_id':'c9',"
                    "'resource_id':'*'}");
    jobs[0] = ev_job(&e[0]);
    jobs[1] = ev_job(&e[1]);
    apply_ok(c, jobs, 2, 3); /* small COUNT: several pages */

    assert_int_equal(jobs[0].deleted, 4);
    assert_int_equal(jobs[0].prefix_matches, 4);
    assert_int_equal(jobs[1].deleted, 2);
    assert_int_equal(jobs[1].prefix_matches, 2);
    assert_exist(gone, N(gone), false);
    assert_exist(survive, N(survive), true);

    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

static void test_conversation_cascade(void **state)
{
    (void)state;
    static const char *const gone[] = {
        "cache:{t1}:conversation:agent=a1:c9", /* the exact key */
        "cache:{t1}:conversation:agent=a1:conv=c9:c9",
        "cache:{t1}:conversation_memory:agent=a1:conv=c9:c9",
        "cache:{t1}:conversation_message:agent=a1:conv=c9:m1",
        "cache:{t1}:conversation_message:agent=a1:conv=c9:m2",
        "cache:{t1}:conversation_messages_list:agent=a1:conv=c9:c9",
    };
    static const char *const survive[] = {
        "cache:{t1}:conversation:agent=a1:conv=c90:c90",
        "cache:{t1}:conversation_memory:agent=a2:conv=c9:c9",
        "cache:{t1}:conversation_message:conv=c9:m1",
        "cache:{t1}:conversation_message:agent=a10:conv=c9:m1",
        "cache:{t10}:conversation_message:agent=a1:conv=c9:m1",
        "cache:{t1}:agent:a1",
        "cache:{t1}:agent_execution_state:agent=a1:conv=c9:x",
    };
    ev_t e;
    cache_job_t job;
    cache_t *c = cache_open();

    seed(gone, N(gone));
    seed(survive, N(survive));
    ev_build(&e, "{'tenant_id':'t1','data_type':'conversation',"
                 "'agent_id':'a1','resource_id':'c9','cascade':true}");
    assert_int_equal(e.t.n_keys, 1);
    assert_int_equal(e.t.n_prefixes, 4);
    job = ev_job(&e);
    apply_ok(c, &job, 1, 100);

    assert_int_equal(job.deleted, 6);
    assert_int_equal(job.prefix_matches, 5);
    assert_exist(gone, N(gone), false);
    assert_exist(survive, N(survive), true);

    cache_targets_free(&e.t);
    cache_free(c);
}

static void test_agent_cascade(void **state)
{
    (void)state;
    static const char *const gone[] = {
        "cache:{t1}:agent:a1",
        "cache:{t1}:agent_config:a1",
        "cache:{t1}:agent_tools:a1",
        "cache:{t1}:conversation:agent=a1:conv=c1:c1",
        "cache:{t1}:conversation_memory:agent=a1:conv=c1:c1",
        "cache:{t1}:conversation_message:agent=a1:conv=c1:m1",
        "cache:{t1}:conversation_message:agent=a1:conv=c2:m1",
        "cache:{t1}:conversation_messages_list:agent=a1:conv=c2:c2",
    };
    static const char *const survive[] = {
        "cache:{t1}:agent:a10",
        "cache:{t1}:agent_tools:a10",
        "cache:{t10}:agent:a1",
        "cache:{t1}:conversation:agent=a10:conv=c1:c1",
        "cache:{t1}:conversation_message:conv=c1:m1",
        "cache:{t10}:conversation_message:agent=a1:conv=c1:m1",
        "cache:{t1}:agent_execution_state:agent=a1:x",
        "cache:{t1}:conversation_summary:agent=a1:conv=c1:x",
    };
    ev_t e;
    cache_job_t job;
    cache_t *c = cache_open();

    seed(gone, N(gone));
    seed(survive, N(survive));
    ev_build(&e, "{'tenant_id':'t1','data_type':'agent','resource_id':'a1',"
                 "'cascade':true,'invalidate_conversations':true}");
    assert_int_equal(e.t.n_keys, 3);
    assert_int_equal(e.t.n_prefixes, 4);
    job = ev_job(&e);
    apply_ok(c, &job, 1, 100);

    assert_int_equal(job.deleted, 8);
    assert_int_equal(job.prefix_matches, 5);
    assert_exist(gone, N(gone), false);
    assert_exist(survive, N(survive), true);

    cache_targets_free(&e.t);
    cache_free(c);
}

/* A key under several jobs' prefixes counts for the first job, in
 * whichever order the prefixes nest. */
static void test_first_job_wins(void **state)
{
    (void)state;
    static const char *const keys[] = {
        "cache:{t1}:conversation_message:agent=a1:conv=c9:m1", /* both */
        "cache:{t1}:conversation_message:agent=a1:conv=c8:m1", /* agent */
    };
    const char *agent = "{'tenant_id':'t1','data_type':'agent',"
                        "'resource_id':'a1','cascade':true,"
                        "'invalidate_conversations':true}";
    const char *conv = "{'tenant_id':'t1','data_type':'conversation',"
                       "'agent_id':'a1','resource_id':'c9',"
                       "'cascade':true}";
    ev_t e[2];
    cache_job_t jobs[2];
    cache_t *c = cache_open();

    /* the wider prefix first */
    seed(keys, N(keys));
    ev_build(&e[0], agent);
    ev_build(&e[1], conv);
    jobs[0] = ev_job(&e[0]);
    jobs[1] = ev_job(&e[1]);
    apply_ok(c, jobs, 2, 100);
    assert_int_equal(jobs[0].prefix_matches, 2);
    assert_int_equal(jobs[0].deleted, 2);
    assert_int_equal(jobs[1].prefix_matches, 0);
    assert_int_equal(jobs[1].deleted, 0);

    /* the narrower first */
    seed(keys, N(keys));
    jobs[0] = ev_job(&e[1]);
    jobs[1] = ev_job(&e[0]);
    apply_ok(c, jobs, 2, 100);
    assert_int_equal(jobs[0].prefix_matches, 1);
    assert_int_equal(jobs[0].deleted, 1);
    assert_int_equal(jobs[1].prefix_matches, 1);
    assert_int_equal(jobs[1].deleted, 1);

    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

/* A --cache-prefix with glob specials and a space: keys pass as single
 * arguments and the pattern is escaped. */
static void test_odd_prefix(void **state)
{
    (void)state;
    static const char *const gone[] = {
        "my cache*[x]:{t1}:document:d1",
        "my cache*[x]:{t1}:document:d2",
    };
    static const char *const survive[] = {
        "my cacheZZx:{t1}:document:d1", /* what an unescaped glob hits */
        "my cache*[x]:{t2}:document:d1",
        "cache:{t1}:document:d1",
    };
    ev_t e[2];
    cache_job_t jobs[2];
    redisReply *r;
    cache_t *c = cache_open();

    for (size_t i = 0; i < N(gone); i++)
        freeReplyObject(cmd("SET %s 1", gone[i]));
    for (size_t i = 0; i < N(survive); i++)
        freeReplyObject(cmd("SET %s 1", survive[i]));
    ev_build_prefix(&e[0],
                    "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'*'}",
                    "my cache*[x]");
    ev_build_prefix(&e[1],
                    "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'d1'}",
                    "my cache*[x]");
    jobs[0] = ev_job(&e[1]); /* exact first: it gets d1 */
    jobs[1] = ev_job(&e[0]);
    apply_ok(c, jobs, 2, 100);
    assert_int_equal(jobs[0].deleted, 1);
    assert_int_equal(jobs[1].deleted, 1);
    assert_int_equal(jobs[1].prefix_matches, 1);
    for (size_t i = 0; i < N(gone); i++) {
        r = cmd("EXISTS %s", gone[i]);
        assert_int_equal(r->integer, 0);
        freeReplyObject(r);
    }
    for (size_t i = 0; i < N(survive); i++) {
        r = cmd("EXISTS %s", survive[i]);
        assert_int_equal(r->integer, 1);
        freeReplyObject(r);
    }
    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

/* ------------------------------------------------------------------ */
/* One SCAN pass                                                      */
/* ------------------------------------------------------------------ */

static char *next_message(redisContext *sub);

/* A connection subscribed to CHANNEL, reads timing out after 5 s. */
static redisContext *subscriber_open(void)
{
    struct timeval tv = {.tv_sec = 5};
    redisContext *sub = admin_connect();
    redisReply *r = redisCommand(sub, "SUBSCRIBE %s", CHANNEL);

    assert_non_null(r);
    freeReplyObject(r);
    redisSetTimeout(sub, tv);
    return sub;
}

/* No notice is left unread: the next message is the one sent now. */
static void assert_no_more_notices(redisContext *sub)
{
    freeReplyObject(cmd("PUBLISH %s sentinel", CHANNEL));
    char *msg = next_message(sub);
    assert_string_equal(msg, "sentinel");
    free(msg);
}

/* Reads notice i and checks that it holds `a` and `b` (NULL: only a). */
static void next_notice_has(redisContext *sub, size_t i, const char *a,
                            const char *b)
{
    char *msg = next_message(sub);
    if (!strstr(msg, a) || (b && !strstr(msg, b)))
        fail_msg("notice %zu: %s (want %s%s%s)", i, msg, a, b ? " and " : "",
                 b ? b : "");
    free(msg);
}

/* Frees the targets of e[0..n) and the arrays, which calloc made. */
static void evs_free(ev_t *e, cache_job_t *jobs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cache_targets_free(&e[i].t);
    free(e);
    free(jobs);
}

/* SCAN calls a full pass over the current key space takes. */
static long scan_pass_calls(const char *pattern, long count)
{
    char cursor[32] = "0";
    long calls = 0;
    do {
        redisReply *r =
            cmd("SCAN %s MATCH %s COUNT %ld", cursor, pattern, count);
        snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
        freeReplyObject(r);
        calls++;
    } while (strcmp(cursor, "0") != 0);
    return calls;
}

static void test_one_scan_pass(void **state)
{
    (void)state;
    char key[128];
    ev_t e[4];
    cache_job_t jobs[4];
    redisReply *r;
    cache_t *c = cache_open();

    /* 300 keys of other tenants (they make the pass longer), 60 under
     * the jobs' prefixes, 40 of the same tenants outside them. The exact
     * keys are absent: deleting one before the pass could move where a
     * SCAN call stops, and the count compared is a dry run's. */
    for (int i = 0; i < 300; i++) {
        snprintf(key, sizeof(key), "cache:{f%d}:document:d", i);
        freeReplyObject(cmd("SET %s 1", key));
    }
    for (int i = 0; i < 20; i++) {
        snprintf(key, sizeof(key), "cache:{t1}:document:d%d", i);
        freeReplyObject(cmd("SET %s 1", key));
        snprintf(key, sizeof(key), "cache:{t2}:document:coll=k:d%d", i);
        freeReplyObject(cmd("SET %s 1", key));
        snprintf(key, sizeof(key),
                 "cache:{t1}:conversation_message:conv=c9:m%d", i);
        freeReplyObject(cmd("SET %s 1", key));
        snprintf(key, sizeof(key), "cache:{t2}:agent:a%d", i);
        freeReplyObject(cmd("SET %s 1", key));
        snprintf(key, sizeof(key), "cache:{t10}:document:d%d", i);
        freeReplyObject(cmd("SET %s 1", key));
    }
    ev_build(&e[0], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'*'}");
    ev_build(&e[1], "{'tenant_id':'t2','data_type':'document',"
                    "'resource_id':'*'}");
    ev_build(&e[2], "{'tenant_id':'t1','data_type':'conversation',"
                    "'resource_id':'c9','cascade':true}");
    ev_build(&e[3], "{'tenant_id':'t3','data_type':'agent',"
                    "'resource_id':'a1'}");
    for (size_t i = 0; i < N(e); i++)
        jobs[i] = ev_job(&e[i]);

    apply_ok(c, jobs, 1, 10); /* connected, script loaded */
    assert_int_equal(jobs[0].deleted, 20);
    for (int i = 0; i < 20; i++) {
        snprintf(key, sizeof(key), "cache:{t1}:document:d%d", i);
        freeReplyObject(cmd("SET %s 1", key));
    }
    usleep(300 * 1000); /* let a pending rehash finish: stable pass */
    /* the common prefix of the four jobs' prefixes is "cache:{t" */
    long want = scan_pass_calls("cache:{t*", 10);
    assert_true(want >= 5);
    cmd_ok("CONFIG RESETSTAT");
    apply_ok(c, jobs, N(jobs), 10);
    r = cmd("INFO commandstats");
    assert_int_equal(cmdstat_calls(r->str, "scan"), want);
    assert_int_equal(cmdstat_calls(r->str, "keys"), -1);
    assert_int_equal(cmdstat_calls(r->str, "publish"), 4);
    /* one UNLINK per job with exact keys, then per page at most one per
     * job found in it (jobs 0-2 have prefixes); never a script */
    long long unlinks = cmdstat_calls(r->str, "unlink");
    assert_true(unlinks >= 2 + 3);
    assert_true(unlinks <= 2 + 3 * want);
    assert_int_equal(cmdstat_calls(r->str, "eval"), -1);
    assert_int_equal(cmdstat_calls(r->str, "evalsha"), -1);
    freeReplyObject(r);

    assert_int_equal(jobs[0].deleted, 20);
    assert_int_equal(jobs[1].deleted, 20);
    assert_int_equal(jobs[2].deleted, 20);
    assert_int_equal(jobs[2].prefix_matches, 20);
    assert_int_equal(jobs[3].deleted, 0);
    assert_int_equal(cmd_int("DBSIZE"), 300 + 40);

    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

/* More keys than one script call takes, both exact and found. */
static void test_large_batches(void **state)
{
    (void)state;
    enum { N_AGENTS = 400, N_DOCS = 1500 };
    char json[256], key[128];
    ev_t *e = calloc(N_AGENTS + 1, sizeof(*e));
    cache_job_t *jobs = calloc(N_AGENTS + 1, sizeof(*jobs));
    cache_t *c = cache_open();

    assert_non_null(e);
    assert_non_null(jobs);
    for (int i = 0; i < N_AGENTS; i++) {
        snprintf(key, sizeof(key), "cache:{t1}:agent:a%d", i);
        redisAppendCommand(admin, "SET %s 1", key);
        snprintf(key, sizeof(key), "cache:{t1}:agent_tools:a%d", i);
        redisAppendCommand(admin, "SET %s 1", key);
    }
    for (int i = 0; i < N_DOCS; i++) {
        snprintf(key, sizeof(key), "cache:{t2}:document:d%d", i);
        redisAppendCommand(admin, "SET %s 1", key);
    }
    drain_replies(2 * N_AGENTS + N_DOCS);
    for (int i = 0; i < N_AGENTS; i++) {
        snprintf(json, sizeof(json),
                 "{'tenant_id':'t1','data_type':'agent',"
                 "'resource_id':'a%d','cascade':true}",
                 i);
        ev_build(&e[i], json);
        jobs[i] = ev_job(&e[i]);
    }
    ev_build(&e[N_AGENTS], "{'tenant_id':'t2','data_type':'document',"
                           "'resource_id':'*'}");
    jobs[N_AGENTS] = ev_job(&e[N_AGENTS]);
    apply_ok(c, jobs, N_AGENTS + 1, 5000);
    for (int i = 0; i < N_AGENTS; i++)
        assert_int_equal(jobs[i].deleted, 2);
    assert_int_equal(jobs[N_AGENTS].deleted, N_DOCS);
    assert_int_equal(jobs[N_AGENTS].prefix_matches, N_DOCS);
    assert_int_equal(cmd_int("DBSIZE"), 0);

    for (int i = 0; i <= N_AGENTS; i++)
        cache_targets_free(&e[i].t);
    free(e);
    free(jobs);
    cache_free(c);
}

/* Many wildcards of many tenants in one batch: one SCAN pass serves
 * them all, each job removes its own tenant's keys only (t1's prefix is
 * neither t10's nor t100's), and each gets its notice, in order. */
static void test_many_prefixes_one_pass(void **state)
{
    (void)state;
    enum { JOBS = 60, TENANTS = 120, DOCS = 5 };
    char key[128], json[256], want[64];
    ev_t *e = calloc(JOBS, sizeof(*e));
    cache_job_t *jobs = calloc(JOBS, sizeof(*jobs));
    redisContext *sub = subscriber_open();
    cache_t *c = cache_open();
    redisReply *r;
    int n = 0;

    assert_non_null(e);
    assert_non_null(jobs);
    for (int t = 1; t <= TENANTS; t++) {
        for (int d = 0; d < DOCS; d++, n++) {
            snprintf(key, sizeof(key), "cache:{t%d}:document:d%d", t, d);
            redisAppendCommand(admin, "SET %s 1", key);
        }
        snprintf(key, sizeof(key), "cache:{t%d}:agent:a1", t);
        redisAppendCommand(admin, "SET %s 1", key);
        n++;
    }
    drain_replies(n);
    for (int j = 0; j < JOBS; j++) {
        snprintf(json, sizeof(json),
                 "{'tenant_id':'t%d','data_type':'document',"
                 "'resource_id':'*','event_id':'w%d'}",
                 j + 1, j);
        ev_build(&e[j], json);
        jobs[j] = ev_job(&e[j]);
    }
    usleep(300 * 1000); /* let a pending rehash finish: stable pass */
    long pass = scan_pass_calls("cache:{t*", 10);
    assert_true(pass >= 10);
    cmd_ok("CONFIG RESETSTAT");
    apply_ok(c, jobs, JOBS, 10);
    r = cmd("INFO commandstats");
    assert_int_equal(cmdstat_calls(r->str, "scan"), pass);
    assert_int_equal(cmdstat_calls(r->str, "publish"), JOBS);
    freeReplyObject(r);

    for (int j = 0; j < JOBS; j++) {
        assert_int_equal(jobs[j].deleted, DOCS);
        assert_int_equal(jobs[j].prefix_matches, DOCS);
    }
    assert_int_equal(cmd_int("DBSIZE"), n - JOBS * DOCS);
    for (int t = JOBS + 1; t <= TENANTS; t++) /* t61..t120: t100 too */
        for (int d = 0; d < DOCS; d++) {
            snprintf(key, sizeof(key), "cache:{t%d}:document:d%d", t, d);
            if (!exists(key))
                fail_msg("%s should exist", key);
        }
    for (int j = 0; j < JOBS; j++) {
        snprintf(want, sizeof(want), "\"deleted\":%d,\"event_id\":\"w%d\"}",
                 DOCS, j);
        next_notice_has(sub, (size_t)j, want, NULL);
    }
    assert_no_more_notices(sub);

    redisFree(sub);
    evs_free(e, jobs, JOBS);
    cache_free(c);
}

/* ------------------------------------------------------------------ */
/* Notices                                                            */
/* ------------------------------------------------------------------ */

static char *next_message(redisContext *sub)
{
    void *v = NULL;
    if (redisGetReply(sub, &v) != REDIS_OK)
        fail_msg("subscriber: %s", sub->errstr);
    redisReply *r = v;
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 3);
    assert_string_equal(r->element[0]->str, "message");
    assert_string_equal(r->element[1]->str, CHANNEL);
    char *s = strdup(r->element[2]->str);
    freeReplyObject(r);
    return s;
}

static void test_notices(void **state)
{
    (void)state;
    static const char *const keys[] = {
        "cache:{t1}:agent:a1",
        "cache:{t2}:document:d1",
        "cache:{t2}:document:coll=k:d2",
        "cache:{t1}:conversation:c9",
        "cache:{t1}:conversation_message:conv=c9:m1",
    };
    static const char *const want[] = {
        "{\"tenant_id\":\"t1\",\"keys\":[\"cache:{t1}:agent:a1\","
        "\"cache:{t1}:agent_config:a1\",\"cache:{t1}:agent_tools:a1\"],"
        "\"prefixes\":[],\"deleted\":1,\"event_id\":\"e-1\"}",
        "{\"tenant_id\":\"t2\",\"keys\":[],"
        "\"prefixes\":[\"cache:{t2}:document:\"],\"deleted\":2}",
        "{\"tenant_id\":\"t1\",\"keys\":[\"cache:{t1}:conversation:c9\"],"
        "\"prefixes\":[\"cache:{t1}:conversation:conv=c9:\","
        "\"cache:{t1}:conversation_memory:conv=c9:\","
        "\"cache:{t1}:conversation_message:conv=c9:\","
        "\"cache:{t1}:conversation_messages_list:conv=c9:\"],"
        "\"deleted\":2,\"event_id\":\"ev \\\"3\\\"\"}",
    };
    redisContext *sub = subscriber_open();
    ev_t e[3];
    cache_job_t jobs[3];
    cache_t *c = cache_open();

    seed(keys, N(keys));
    ev_build(&e[0], "{'tenant_id':'t1','data_type':'agent',"
                    "'resource_id':'a1','cascade':true,'event_id':'e-1'}");
    ev_build(&e[1], "{'tenant_id':'t2','data_type':'document',"
                    "'resource_id':'*'}");
    ev_build(&e[2], "{'tenant_id':'t1','data_type':'conversation',"
                    "'resource_id':'c9','cascade':true,"
                    "'event_id':'ev \\'3\\''}");
    for (size_t i = 0; i < N(e); i++)
        jobs[i] = ev_job(&e[i]);
    apply_ok(c, jobs, N(jobs), 100);

    for (size_t i = 0; i < N(want); i++) {
        char *msg = next_message(sub);
        assert_string_equal(msg, want[i]);
        free(msg);
    }
    /* nothing more: the next message is ours */
    assert_no_more_notices(sub);

    redisFree(sub);
    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

/* Thousands of exact jobs in one batch (the pipeline goes out in
 * several pieces): one UNLINK per job, each job's count its own, a key
 * two jobs name counted for the first, t1's keys apart from t10's, one
 * notice per job in order. */
static void test_exact_many(void **state)
{
    (void)state;
    enum { JOBS = 3000 };
    char key[128], json[256], want[64];
    ev_t *e = calloc(JOBS, sizeof(*e));
    cache_job_t *jobs = calloc(JOBS, sizeof(*jobs));
    redisContext *sub = subscriber_open();
    cache_t *c = cache_open();
    redisReply *r;
    long long survivors = 0;
    int seeded = 0;

    assert_non_null(e);
    assert_non_null(jobs);
    for (int i = 0; i < JOBS; i++) {
        if (i % 3 == 0) { /* t1 agent cascade: 2 of its 3 keys exist */
            snprintf(json, sizeof(json),
                     "{'tenant_id':'t1','data_type':'agent',"
                     "'resource_id':'a%d','cascade':true}",
                     i);
            redisAppendCommand(admin, "SET cache:{t1}:agent:a%d 1", i);
            redisAppendCommand(admin, "SET cache:{t1}:agent_tools:a%d 1", i);
            redisAppendCommand(admin, "SET cache:{t10}:agent:a%d 1", i);
            seeded += 3;
            survivors++;
        } else if (i % 3 == 1) { /* t10 document, every other one exists */
            snprintf(json, sizeof(json),
                     "{'tenant_id':'t10','data_type':'document',"
                     "'resource_id':'d%d','event_id':'e%d'}",
                     i, i);
            if (i % 2) {
                redisAppendCommand(admin, "SET cache:{t10}:document:d%d 1", i);
                seeded++;
            }
            redisAppendCommand(admin, "SET cache:{t1}:document:d%d 1", i);
            seeded++;
            survivors++;
        } else { /* the key job i-2 removed: nothing left for it */
            snprintf(json, sizeof(json),
                     "{'tenant_id':'t1','data_type':'agent',"
                     "'resource_id':'a%d'}",
                     i - 2);
        }
        ev_build(&e[i], json);
        jobs[i] = ev_job(&e[i]);
    }
    drain_replies(seeded);
    cmd_ok("CONFIG RESETSTAT");
    apply_ok(c, jobs, JOBS, 100);
    r = cmd("INFO commandstats");
    assert_int_equal(cmdstat_calls(r->str, "unlink"), JOBS);
    assert_int_equal(cmdstat_calls(r->str, "publish"), JOBS);
    assert_int_equal(cmdstat_calls(r->str, "scan"), -1);
    freeReplyObject(r);

    for (int i = 0; i < JOBS; i++) {
        long want_deleted = i % 3 == 0 ? 2 : i % 3 == 1 ? i % 2 : 0;
        if ((long)jobs[i].deleted != want_deleted)
            fail_msg("job %d: deleted %llu, want %ld", i,
                     (unsigned long long)jobs[i].deleted, want_deleted);
    }
    assert_int_equal(cmd_int("DBSIZE"), survivors);
    for (int i = 0; i < JOBS; i += 3) {
        snprintf(key, sizeof(key), "cache:{t10}:agent:a%d", i);
        if (!exists(key))
            fail_msg("%s should exist", key);
        snprintf(key, sizeof(key), "cache:{t1}:document:d%d", i + 1);
        if (!exists(key))
            fail_msg("%s should exist", key);
    }
    for (int i = 0; i < JOBS; i++) {
        /* in order: the job's own first key, its own count */
        snprintf(want, sizeof(want), "\"deleted\":%llu",
                 (unsigned long long)jobs[i].deleted);
        next_notice_has(sub, (size_t)i, e[i].t.items[0].str, want);
    }
    assert_no_more_notices(sub);

    redisFree(sub);
    evs_free(e, jobs, JOBS);
    cache_free(c);
}

/* The notice as jansson's json_dumps(JSON_COMPACT) would write it,
 * whatever the strings hold (quotes, backslashes, '/', DEL, UTF-8, and
 * control characters, which only a hand-made job can carry); a string
 * that is not UTF-8 fails the call after the deletes, as before. */
static void test_notice_escaping(void **state)
{
    (void)state;
    static const char odd[] = "q\"b\\s/ \xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x98\x80 "
                              "\x7f \x01\x1f\n\t\b\f\r end";
    redisContext *sub = subscriber_open();
    char err[512] = "";
    ev_t e;
    cache_job_t job;
    cache_t *c = cache_open();

    ev_build(&e, "{'tenant_id':'t1','data_type':'agent',"
                 "'resource_id':'a1','cascade':true}");
    cmd_ok("SET cache:{t1}:agent:a1 1");
    snprintf(e.inv.event_id, sizeof(e.inv.event_id), "%s", odd);
    job = ev_job(&e);
    apply_ok(c, &job, 1, 100);
    assert_int_equal(job.deleted, 1);

    json_t *keys = json_array(), *root = json_object();
    for (size_t i = 0; i < e.t.n; i++)
        json_array_append_new(keys, json_string(e.t.items[i].str));
    json_object_set_new(root, "tenant_id", json_string("t1"));
    json_object_set_new(root, "keys", keys);
    json_object_set_new(root, "prefixes", json_array());
    json_object_set_new(root, "deleted", json_integer(1));
    json_object_set_new(root, "event_id", json_string(odd));
    char *want = json_dumps(root, JSON_COMPACT);
    assert_non_null(want);
    char *msg = next_message(sub);
    assert_string_equal(msg, want);
    free(msg);
    free(want);
    json_decref(root);

    /* not UTF-8: refused, the key deleted all the same */
    cmd_ok("SET cache:{t1}:agent:a1 1");
    snprintf(e.inv.event_id, sizeof(e.inv.event_id), "bad \xff byte");
    assert_int_equal(cache_apply(c, &job, 1, CHANNEL, 100, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "notice"));
    assert_false(exists("cache:{t1}:agent:a1"));

    redisFree(sub);
    cache_targets_free(&e.t);
    cache_free(c);
}

/* ------------------------------------------------------------------ */
/* Scripts, AUTH, SELECT                                              */
/* ------------------------------------------------------------------ */

/* No script is involved (plain UNLINK and PUBLISH): a flushed script
 * cache changes nothing. */
static void test_no_scripts(void **state)
{
    (void)state;
    static const char *const keys[] = {
        "cache:{t1}:agent:a1",
        "cache:{t1}:document:d1",
        "cache:{t1}:document:d2",
    };
    ev_t e[2];
    cache_job_t jobs[2];
    redisReply *r;
    cache_t *c = cache_open();

    ev_build(&e[0], "{'tenant_id':'t1','data_type':'agent',"
                    "'resource_id':'a1'}");
    ev_build(&e[1], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'*'}");
    jobs[0] = ev_job(&e[0]);
    jobs[1] = ev_job(&e[1]);
    apply_ok(c, jobs, 2, 100); /* connects */

    for (int round = 0; round < 2; round++) {
        seed(keys, N(keys));
        cmd_ok("SCRIPT FLUSH");
        cmd_ok("CONFIG RESETSTAT");
        apply_ok(c, jobs, 2, 100);
        assert_int_equal(jobs[0].deleted, 1);
        assert_int_equal(jobs[1].deleted, 2);
        assert_true(cache_is_connected(c));
        r = cmd("INFO commandstats");
        assert_int_equal(cmdstat_calls(r->str, "eval"), -1);
        assert_int_equal(cmdstat_calls(r->str, "evalsha"), -1);
        assert_int_equal(cmdstat_calls(r->str, "script"), -1);
        freeReplyObject(r);
    }
    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

__attribute__((format(printf, 1, 2))) static cache_t *
cache_open_url(const char *fmt, ...)
{
    char url[256], err[256] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(url, sizeof(url), fmt, ap);
    va_end(ap);
    cache_t *c = cache_new(url, err, sizeof(err));
    if (!c)
        fail_msg("cache_new(%s): %s", url, err);
    return c;
}

static void test_auth_select(void **state)
{
    (void)state;
    char err[256] = "";
    ev_t e;
    cache_job_t job;
    cache_t *c;

    cmd_ok("ACL SETUSER tuser reset on >p@ss:w/rd ~* &* +@all");
    ev_build(&e, "{'tenant_id':'t1','data_type':'agent','resource_id':'a1'}");

    /* user + password (percent-encoded), database 2 */
    cmd_ok("SELECT 2");
    cmd_ok("SET cache:{t1}:agent:a1 1");
    cmd_ok("SELECT 0");
    cmd_ok("SET cache:{t1}:agent:a1 1");
    c = cache_open_url("redis://tuser:p%%40ss%%3Aw%%2Frd@%s:%d/2", redis_host,
                       redis_port);
    assert_int_equal(cache_connect(c, err, sizeof(err)), 0);
    job = ev_job(&e);
    apply_ok(c, &job, 1, 100);
    assert_int_equal(job.deleted, 1);
    assert_true(exists("cache:{t1}:agent:a1")); /* db 0 untouched */
    cache_free(c);

    /* wrong password: a clear error, no context kept */
    c = cache_open_url("redis://tuser:wrong@%s:%d/0", redis_host, redis_port);
    assert_int_equal(cache_connect(c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "AUTH"));
    assert_null(strstr(err, "wrong"));
    assert_false(cache_is_connected(c));
    assert_int_equal(cache_apply(c, &job, 1, CHANNEL, 100, err, sizeof(err)),
                     -1);
    cache_free(c);

    /* a database that does not exist */
    c = cache_open_url("redis://%s:%d/999", redis_host, redis_port);
    assert_int_equal(cache_connect(c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "SELECT"));
    assert_false(cache_is_connected(c));
    cache_free(c);

    /* password only: the default user (teardown resets it) */
    cmd_ok("ACL SETUSER default on >s3cret");
    c = cache_open_url("redis://:s3cret@%s:%d", redis_host, redis_port);
    apply_ok(c, &job, 1, 100);
    assert_int_equal(job.deleted, 1);
    cache_free(c);
    c = cache_open_url("redis://%s:%d", redis_host, redis_port);
    assert_int_equal(cache_connect(c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "PING")); /* NOAUTH on first use */
    cache_free(c);
    cmd_ok("ACL SETUSER default resetpass nopass");

    cmd_ok("ACL DELUSER tuser");
    cache_targets_free(&e.t);
}

/* ------------------------------------------------------------------ */
/* Failures                                                           */
/* ------------------------------------------------------------------ */

static void test_connection_killed(void **state)
{
    (void)state;
    char err[256] = "";
    ev_t e;
    cache_job_t job;
    cache_t *c = cache_open();

    ev_build(&e, "{'tenant_id':'t1','data_type':'agent','resource_id':'a1'}");
    job = ev_job(&e);
    apply_ok(c, &job, 1, 100);
    assert_true(cache_is_connected(c));

    cmd_ok("SET cache:{t1}:agent:a1 1");
    cmd_ok("CLIENT KILL TYPE normal SKIPME yes");
    assert_int_equal(cache_apply(c, &job, 1, CHANNEL, 100, err, sizeof(err)),
                     -1);
    assert_true(err[0] != '\0');
    assert_false(cache_is_connected(c));
    apply_ok(c, &job, 1, 100); /* reconnects */
    assert_int_equal(job.deleted, 1);

    cache_targets_free(&e.t);
    cache_free(c);
}

static bool redis_answers(void)
{
    struct timeval tv = {.tv_sec = 1};
    redisContext *ctx = redisConnectWithTimeout(redis_host, redis_port, tv);
    bool ok = false;
    if (ctx && !ctx->err) {
        redisReply *r = redisCommand(ctx, "PING");
        ok = r && r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
    }
    if (ctx)
        redisFree(ctx);
    return ok;
}

static void test_redis_down(void **state)
{
    (void)state;
    char err[256] = "";
    ev_t e[2];
    cache_job_t jobs[2];
    cache_t *c;

    if (!restart_cmd)
        skip();
    c = cache_open();
    ev_build(&e[0], "{'tenant_id':'t1','data_type':'agent',"
                    "'resource_id':'a1'}");
    ev_build(&e[1], "{'tenant_id':'t1','data_type':'document',"
                    "'resource_id':'*'}");
    jobs[0] = ev_job(&e[0]);
    jobs[1] = ev_job(&e[1]);
    apply_ok(c, jobs, 2, 100);
    assert_true(cache_is_connected(c));

    /* down */
    freeReplyObject(redisCommand(admin, "SHUTDOWN NOSAVE"));
    redisFree(admin);
    admin = NULL;
    for (int i = 0; i < 50 && redis_answers(); i++)
        usleep(100 * 1000);
    assert_false(redis_answers());
    assert_int_equal(cache_apply(c, jobs, 2, CHANNEL, 100, err, sizeof(err)),
                     -1);
    assert_true(err[0] != '\0');
    assert_false(cache_is_connected(c));
    err[0] = '\0';
    assert_int_equal(cache_connect(c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "connect"));
    assert_false(cache_is_connected(c));
    assert_int_equal(cache_apply(c, jobs, 2, CHANNEL, 100, err, sizeof(err)),
                     -1);

    /* back */
    assert_int_equal(system(restart_cmd), 0);
    for (int i = 0; i < 100 && !redis_answers(); i++)
        usleep(100 * 1000);
    assert_true(redis_answers());
    admin = admin_connect();
    cmd_ok("SET cache:{t1}:agent:a1 1");
    cmd_ok("SET cache:{t1}:document:d1 1");
    apply_ok(c, jobs, 2, 100);
    assert_true(cache_is_connected(c));
    assert_int_equal(jobs[0].deleted, 1);
    assert_int_equal(jobs[1].deleted, 1);
    assert_int_equal(cmd_int("DBSIZE"), 0);

    for (size_t i = 0; i < N(e); i++)
        cache_targets_free(&e[i].t);
    cache_free(c);
}

/* ------------------------------------------------------------------ */
/* Timing                                                             */
/* ------------------------------------------------------------------ */

/* 100k keys, 10k of them under one wildcard. */
static void test_bench(void **state)
{
    (void)state;
    enum { TOTAL = 100000, UNDER = 10000, PER_CMD = 1000 };
    static char keys[PER_CMD][64];
    const char *argv[1 + 2 * PER_CMD];
    size_t argvlen[1 + 2 * PER_CMD];
    ev_t e[2];
    cache_job_t jobs[2];
    double t0;
    cache_t *c;
    /* COUNT, and how many jobs: the 2nd one (tenant t5) makes the common
     * prefix "cache:{t", so that every key comes back and is filtered
     * client-side */
    static const struct {
        long count;
        size_t n_jobs;
    } rounds[] = {{1000, 1}, {100, 1}, {1000, 2}};

    if (!run_bench)
        skip();
    c = cache_open();
    ev_build(&e[0], "{'tenant_id':'tb','data_type':'document',"
                    "'resource_id':'*'}");
    ev_build(&e[1], "{'tenant_id':'t5','data_type':'document',"
                    "'resource_id':'*'}");
    for (size_t round = 0; round < N(rounds); round++) {
        long long t5 = 0;
        cmd_ok("FLUSHALL");
        t0 = now_ms();
        for (int base = 0; base < TOTAL; base += PER_CMD) {
            int argc = 0;
            argv[argc] = "MSET";
            argvlen[argc++] = 4;
            for (int i = 0; i < PER_CMD; i++) {
                int k = base + i;
                /* every 10th key is under the wildcard, spread out */
                if (k % (TOTAL / UNDER) == 0) {
                    snprintf(keys[i], sizeof(keys[i]),
                             "cache:{tb}:document:d%d", k);
                } else if (k % 3 == 0) {
                    snprintf(keys[i], sizeof(keys[i]), "cache:{tb}:agent:a%d",
                             k);
                } else {
                    snprintf(keys[i], sizeof(keys[i]),
                             "cache:{t%d}:document:d%d", k % 97, k);
                    t5 += k % 97 == 5;
                }
                argv[argc] = keys[i];
                argvlen[argc++] = strlen(keys[i]);
                argv[argc] = "1";
                argvlen[argc++] = 1;
            }
            freeReplyObject(redisCommandArgv(admin, argc, argv, argvlen));
        }
        assert_int_equal(cmd_int("DBSIZE"), TOTAL);
        printf("# seeded %d keys in %.0f ms\n", TOTAL, now_ms() - t0);
        usleep(300 * 1000);
        cmd_ok("CONFIG RESETSTAT");

        size_t n = rounds[round].n_jobs;
        for (size_t j = 0; j < n; j++)
            jobs[j] = ev_job(&e[j]);
        t0 = now_ms();
        apply_ok(c, jobs, n, rounds[round].count);
        double ms = now_ms() - t0;
        long long want = UNDER + (n > 1 ? t5 : 0);
        redisReply *r = cmd("INFO commandstats");
        printf("# BENCH wildcard: %zu job(s), %lld of %d keys deleted in "
               "%.1f ms (COUNT %ld, %lld SCAN calls)\n",
               n, want, TOTAL, ms, rounds[round].count,
               cmdstat_calls(r->str, "scan"));
        freeReplyObject(r);
        assert_int_equal(jobs[0].deleted, UNDER);
        assert_int_equal(jobs[0].prefix_matches, UNDER);
        if (n > 1) {
            assert_int_equal(jobs[1].deleted, t5);
            assert_int_equal(jobs[1].prefix_matches, t5);
        }
        assert_int_equal(cmd_int("DBSIZE"), TOTAL - want);
    }
    cache_targets_free(&e[0].t);
    cache_targets_free(&e[1].t);

    /* 1000 events of 3 exact keys each */
    {
        enum { JOBS = 1000 };
        ev_t *ev = calloc(JOBS, sizeof(*ev));
        cache_job_t *many = calloc(JOBS, sizeof(*many));
        char json[256];
        assert_non_null(ev);
        assert_non_null(many);
        for (int i = 0; i < JOBS; i++) {
            snprintf(json, sizeof(json),
                     "{'tenant_id':'tb','data_type':'agent',"
                     "'resource_id':'a%d','cascade':true}",
                     i * 3);
            ev_build(&ev[i], json);
            many[i] = ev_job(&ev[i]);
        }
        t0 = now_ms();
        apply_ok(c, many, JOBS, 1000);
        double ms = now_ms() - t0;
        uint64_t deleted = 0;
        for (int i = 0; i < JOBS; i++)
            deleted += many[i].deleted;
        printf("# BENCH exact: %d events, %d keys, %llu deleted, "
               "%d notices in %.1f ms\n",
               JOBS, 3 * JOBS, (unsigned long long)deleted, JOBS, ms);
        /* agent:a<3i> exists unless 3i is a multiple of 10 */
        assert_int_equal(deleted, 900);
        for (int i = 0; i < JOBS; i++)
            cache_targets_free(&ev[i].t);
        free(ev);
        free(many);
    }
    cache_free(c);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest url_tests[] = {
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_apply_nothing),
    };
    const struct CMUnitTest redis_tests[] = {
        cmocka_unit_test_setup_teardown(test_exact_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wildcard_isolation, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_conversation_cascade, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_agent_cascade, setup, teardown),
        cmocka_unit_test_setup_teardown(test_first_job_wins, setup, teardown),
        cmocka_unit_test_setup_teardown(test_odd_prefix, setup, teardown),
        cmocka_unit_test_setup_teardown(test_one_scan_pass, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_prefixes_one_pass, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_notices, setup, teardown),
        cmocka_unit_test_setup_teardown(test_exact_many, setup, teardown),
        cmocka_unit_test_setup_teardown(test_notice_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_scripts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_auth_select, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connection_killed, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_redis_down, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bench, setup, teardown),
    };
    int failed;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--redis") == 0 && i + 1 < argc)
            redis_url = argv[++i];
        else if (strcmp(argv[i], "--restart") == 0 && i + 1 < argc)
            restart_cmd = argv[++i];
        else if (strcmp(argv[i], "--bench") == 0)
            run_bench = true;
        else {
            fprintf(stderr,
                    "usage: %s [--redis URL [--restart CMD] [--bench]]\n",
                    argv[0]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN); /* as the worker does */

    failed = cmocka_run_group_tests_name("cache_url", url_tests, NULL, NULL);
    if (!redis_url)
        return failed;
    if (sscanf(redis_url, "redis://%127[^:]:%d", redis_host, &redis_port) !=
        2) {
        fprintf(stderr, "--redis: expected redis://HOST:PORT[/0]\n");
        return 2;
    }
    failed +=
        cmocka_run_group_tests_name("cache_redis", redis_tests, NULL, NULL);
    return failed;
}
