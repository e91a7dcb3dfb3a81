/* Redis: UNLINK exact keys, SCAN prefix sets, PUBLISH notices (hiredis). */
#include "cache.h"

#include "log.h"

#include <hiredis/hiredis.h>
#include <jansson.h>

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define CACHE_PORT_DEFAULT 6379
#define CACHE_CONNECT_TIMEOUT_S 5
#define CACHE_COMMAND_TIMEOUT_S 30
/* Keys per EVALSHA: big enough to amortise the call, small enough that
 * one script run never blocks Redis for long. */
#define CACHE_UNLINK_CHUNK 512
#define CACHE_SCAN_COUNT_DEFAULT 1000
#define CACHE_SHA_LEN 40

/* UNLINKs each of KEYS and returns, in order, what UNLINK said for it
 * (1 removed, 0 absent): one command for many keys with each key's
 * outcome known, which a multi-key UNLINK (a total) cannot give. */
static const char unlink_script[] =
    "local r = {}\n"
    "for i = 1, #KEYS do r[i] = redis.call('UNLINK', KEYS[i]) end\n"
    "return r\n";

struct cache {
    char *host;
    int port;
    int db;
    char *user;        /* NULL: AUTH without a user name */
    char *password;    /* NULL: no AUTH */
    redisContext *ctx; /* NULL when not connected */
    /* SHA1 of unlink_script as SCRIPT LOAD returned it; "" when the
     * server refused SCRIPT LOAD (then every call is an EVAL). */
    char sha[CACHE_SHA_LEN + 1];
};

__attribute__((format(printf, 3, 4))) static void
set_err(char *errstr, size_t errstr_size, const char *fmt, ...)
{
    va_list ap;

    if (!errstr || errstr_size == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errstr, errstr_size, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------ */
/* URL                                                                */
/* ------------------------------------------------------------------ */

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* A new NUL-terminated copy of s[0..n) with %XX escapes decoded (so that
 * a password may hold '@', ':' or '/'). NULL with errno EINVAL on a bad
 * escape or an encoded NUL, ENOMEM. The caller frees it. */
static char *dup_decoded(const char *s, size_t n)
{
    char *out = malloc(n + 1);
    size_t o = 0;

    if (!out) {
        errno = ENOMEM;
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            out[o++] = s[i];
            continue;
        }
        int hi = i + 2 < n ? hex_value(s[i + 1]) : -1;
        int lo = i + 2 < n ? hex_value(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            errno = EINVAL;
            return NULL;
        }
        out[o++] = (char)(hi * 16 + lo);
        i += 2;
    }
    out[o] = '\0';
    return out;
}

/* Parses digits s[0..n) into 0..max; -1 when empty, not all digits or
 * too large. */
static long parse_number(const char *s, size_t n, long max)
{
    long v = 0;

    if (n == 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
        if (v > max)
            return -1;
    }
    return v;
}

/* Fills c's host, port, db, user and password from
 * redis://[[user]:password@]host[:port][/db] or the same without the
 * scheme. Error messages never repeat the password. */
static int parse_url(cache_t *c, const char *url, char *errstr,
                     size_t errstr_size)
{
    const char *p = url, *end, *at, *host, *host_end, *after_host;
    const char *slash;

    if (strncmp(p, "rediss://", 9) == 0) {
        set_err(errstr, errstr_size,
                "redis URL: rediss:// (TLS) is not supported: this build's "
                "hiredis has no TLS");
        return -1;
    }
    if (strncmp(p, "redis://", 8) == 0) {
        p += 8;
    } else if (strstr(p, "://")) {
        set_err(errstr, errstr_size,
                "redis URL: unsupported scheme (expected redis://)");
        return -1;
    }
    if (strpbrk(p, "?#")) {
        set_err(errstr, errstr_size,
                "redis URL: query parameters and fragments are not "
                "supported");
        return -1;
    }
    slash = strchr(p, '/');
    end = slash ? slash : p + strlen(p);

    /* userinfo: up to the last '@' (an unescaped '@' in the password
     * still works). */
    at = memrchr(p, '@', (size_t)(end - p));
    host = p;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (!colon) {
            set_err(errstr, errstr_size,
                    "redis URL: a user name needs a password "
                    "(redis://user:password@host)");
            return -1;
        }
        if (colon + 1 == at) {
            set_err(errstr, errstr_size, "redis URL: empty password");
            return -1;
        }
        if (colon > p) {
            c->user = dup_decoded(p, (size_t)(colon - p));
            if (!c->user)
                goto bad_escape;
        }
        c->password = dup_decoded(colon + 1, (size_t)(at - colon - 1));
        if (!c->password)
            goto bad_escape;
        host = at + 1;
    }

    if (*host == '[') { /* [IPv6] */
        const char *rb = memchr(host, ']', (size_t)(end - host));
        if (!rb) {
            set_err(errstr, errstr_size, "redis URL: unclosed '[' in host");
            return -1;
        }
        host_end = rb;
        after_host = rb + 1;
        host++;
    } else {
        host_end = memchr(host, ':', (size_t)(end - host));
        if (!host_end)
            host_end = end;
        after_host = host_end;
    }
    if (host_end == host) {
        set_err(errstr, errstr_size, "redis URL: no host");
        return -1;
    }
    c->host = strndup(host, (size_t)(host_end - host));
    if (!c->host) {
        set_err(errstr, errstr_size, "redis URL: out of memory");
        return -1;
    }

    c->port = CACHE_PORT_DEFAULT;
    if (after_host < end) {
        long port = -1;
        if (*after_host == ':')
            port = parse_number(after_host + 1, (size_t)(end - after_host - 1),
                                65535);
        if (port < 1) {
            set_err(errstr, errstr_size,
                    "redis URL: bad port '%.*s' (1..65535)",
                    (int)(end - after_host), after_host);
            return -1;
        }
        c->port = (int)port;
    }

    c->db = 0;
    if (slash && slash[1] != '\0') {
        long db = parse_number(slash + 1, strlen(slash + 1), INT_MAX);
        if (db < 0) {
            set_err(errstr, errstr_size,
                    "redis URL: bad database '%s' (a number)", slash + 1);
            return -1;
        }
        c->db = (int)db;
    }
    return 0;

bad_escape:
    set_err(errstr, errstr_size,
            errno == ENOMEM ? "redis URL: out of memory"
                            : "redis URL: bad %%-escape in user or password");
    return -1;
}

cache_t *cache_new(const char *url, char *errstr, size_t errstr_size)
{
    cache_t *c;

    if (!url || !*url) {
        set_err(errstr, errstr_size, "redis URL: empty");
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        set_err(errstr, errstr_size, "redis: out of memory");
        return NULL;
    }
    if (parse_url(c, url, errstr, errstr_size) != 0) {
        cache_free(c);
        return NULL;
    }
    return c;
}

int cache_describe(const cache_t *c, char *buf, size_t size)
{
    bool v6 = strchr(c->host, ':') != NULL;

    return snprintf(buf, size, "%s%s%s%s%s:%d/%d", c->user ? c->user : "",
                    c->user ? "@" : "", v6 ? "[" : "", c->host, v6 ? "]" : "",
                    c->port, c->db);
}

void cache_free(cache_t *c)
{
    if (!c)
        return;
    cache_disconnect(c);
    free(c->host);
    free(c->user);
    if (c->password) {
        explicit_bzero(c->password, strlen(c->password));
        free(c->password);
    }
    free(c);
}

/* ------------------------------------------------------------------ */
/* Connection                                                         */
/* ------------------------------------------------------------------ */

bool cache_is_connected(const cache_t *c)
{
    return c && c->ctx && c->ctx->err == 0;
}

void cache_disconnect(cache_t *c)
{
    if (c && c->ctx) {
        redisFree(c->ctx);
        c->ctx = NULL;
    }
}

/* Runs one command on ctx. Returns the reply (the caller frees it), or
 * NULL with errstr: an I/O failure (ctx is unusable) or an error reply
 * (freed here); `what` names the command in the message. */
static redisReply *run(const cache_t *c, redisContext *ctx, const char *what,
                       int argc, const char **argv, const size_t *argvlen,
                       char *errstr, size_t errstr_size)
{
    redisReply *reply = redisCommandArgv(ctx, argc, argv, argvlen);

    if (!reply) {
        set_err(errstr, errstr_size, "redis %s:%d: %s: %s", c->host, c->port,
                what, ctx->err ? ctx->errstr : "no reply");
        return NULL;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        set_err(errstr, errstr_size, "redis %s:%d: %s failed: %s", c->host,
                c->port, what, reply->str);
        freeReplyObject(reply);
        return NULL;
    }
    return reply;
}

int cache_ping(cache_t *c, char *errstr, size_t errstr_size)
{
    const char *argv[] = {"PING"};
    size_t argvlen[] = {4};
    redisReply *reply;

    if (cache_connect(c, errstr, errstr_size) == -1)
        return -1;
    reply = run(c, c->ctx, "PING", 1, argv, argvlen, errstr, errstr_size);
    if (!reply) {
        cache_disconnect(c);
        return -1;
    }
    freeReplyObject(reply);
    return 0;
}

/* Connects, authenticates, selects the database and loads the UNLINK
 * script; a context that failed any step is freed, never kept, so that
 * the next call starts anew. */
int cache_connect(cache_t *c, char *errstr, size_t errstr_size)
{
    struct timeval tv = {.tv_sec = CACHE_CONNECT_TIMEOUT_S};
    redisContext *ctx = NULL;
    redisReply *reply = NULL;
    const char *argv[3];
    size_t argvlen[3];
    int argc, rc = -1;

    if (cache_is_connected(c))
        return 0;
    cache_disconnect(c); /* a context broken since: drop it */

    ctx = redisConnectWithTimeout(c->host, c->port, tv);
    if (!ctx) {
        set_err(errstr, errstr_size, "redis %s:%d: out of memory", c->host,
                c->port);
        goto out;
    }
    if (ctx->err) {
        set_err(errstr, errstr_size, "redis %s:%d: connect: %s", c->host,
                c->port, ctx->errstr);
        goto out;
    }
    tv.tv_sec = CACHE_COMMAND_TIMEOUT_S;
    if (redisSetTimeout(ctx, tv) != REDIS_OK ||
        redisEnableKeepAlive(ctx) != REDIS_OK) {
        set_err(errstr, errstr_size, "redis %s:%d: socket options: %s", c->host,
                c->port, ctx->errstr);
        goto out;
    }

    if (c->password) {
        argc = 0;
        argv[argc] = "AUTH";
        argvlen[argc++] = 4;
        if (c->user) { /* Redis 6 ACL: AUTH user password */
            argv[argc] = c->user;
            argvlen[argc++] = strlen(c->user);
        }
        argv[argc] = c->password;
        argvlen[argc++] = strlen(c->password);
        reply = run(c, ctx, "AUTH", argc, argv, argvlen, errstr, errstr_size);
        if (!reply)
            goto out;
        freeReplyObject(reply);
        reply = NULL;
    }

    if (c->db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", c->db);
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = db;
        argvlen[1] = strlen(db);
        reply = run(c, ctx, "SELECT", 2, argv, argvlen, errstr, errstr_size);
        if (!reply)
            goto out;
        freeReplyObject(reply);
        reply = NULL;
    }

    argv[0] = "SCRIPT";
    argvlen[0] = 6;
    argv[1] = "LOAD";
    argvlen[1] = 4;
    argv[2] = unlink_script;
    argvlen[2] = sizeof(unlink_script) - 1;
    reply = redisCommandArgv(ctx, 3, argv, argvlen);
    if (!reply) {
        set_err(errstr, errstr_size, "redis %s:%d: SCRIPT LOAD: %s", c->host,
                c->port, ctx->err ? ctx->errstr : "no reply");
        goto out;
    }
    if (reply->type == REDIS_REPLY_STRING && reply->len == CACHE_SHA_LEN) {
        memcpy(c->sha, reply->str, CACHE_SHA_LEN);
        c->sha[CACHE_SHA_LEN] = '\0';
    } else if (reply->type == REDIS_REPLY_ERROR &&
               strncmp(reply->str, "NOPERM", 6) == 0) {
        /* An ACL that allows EVAL but not SCRIPT: carry on with EVAL,
         * which costs only the script's bytes per call. */
        log_warn("redis %s:%d: SCRIPT LOAD refused (%s); using EVAL", c->host,
                 c->port, reply->str);
        c->sha[0] = '\0';
    } else {
        /* NOAUTH (a password is needed), LOADING, ...: not usable. */
        set_err(errstr, errstr_size, "redis %s:%d: SCRIPT LOAD failed: %s",
                c->host, c->port,
                reply->type == REDIS_REPLY_ERROR ? reply->str
                                                 : "unexpected reply");
        goto out;
    }

    c->ctx = ctx;
    ctx = NULL; /* owned by c */
    rc = 0;
out:
    freeReplyObject(reply);
    if (ctx)
        redisFree(ctx);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Applying invalidations                                             */
/* ------------------------------------------------------------------ */

/* A string that lives elsewhere (a job's targets, a SCAN reply) and the
 * job it belongs to. */
typedef struct {
    const char *s;
    size_t len;
    size_t job;
} span_t;

/* A growable array of spans: grows by doubling, so its size follows the
 * batch (exact keys) or one SCAN page, never the key space. */
typedef struct {
    span_t *v;
    size_t n;
    size_t cap;
} spans_t;

static int spans_push(spans_t *a, const char *s, size_t len, size_t job)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        span_t *v = realloc(a->v, cap * sizeof(*v));
        if (!v)
            return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = (span_t){.s = s, .len = len, .job = job};
    return 0;
}

/* Byte order, then length (a proper prefix first). */
static int bytes_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int r = memcmp(a, b, alen < blen ? alen : blen);
    if (r != 0)
        return r;
    return alen < blen ? -1 : alen > blen;
}

/* Same strings end up next to each other, the lowest job first. */
static int span_cmp(const void *pa, const void *pb)
{
    const span_t *a = pa, *b = pb;
    int r = bytes_cmp(a->s, a->len, b->s, b->len);
    if (r != 0)
        return r;
    return a->job < b->job ? -1 : a->job > b->job;
}

/* Sorts a and keeps one span per string, the one of the lowest job. */
static void spans_sort_unique(spans_t *a)
{
    size_t w = 0;

    if (a->n < 2)
        return;
    qsort(a->v, a->n, sizeof(*a->v), span_cmp);
    for (size_t i = 1; i < a->n; i++) {
        if (bytes_cmp(a->v[w].s, a->v[w].len, a->v[i].s, a->v[i].len) != 0)
            a->v[++w] = a->v[i];
    }
    a->n = w + 1;
}

/* State of one cache_apply() call. */
typedef struct {
    cache_t *c;
    cache_job_t *jobs;
    size_t n_jobs;
    char *errstr;
    size_t errstr_size;

    /* Every prefix of every job, sorted and unique (lowest job kept).
     * A key's job is found by looking up the key's own prefixes that
     * end in a byte some prefix ends in (':' for all real ones). */
    spans_t prefixes;
    bool prefix_end[256];
    size_t prefix_min_len;
    size_t prefix_max_len;
    char *pattern; /* SCAN MATCH: the common prefix, glob-escaped, '*' */
    char count[24];

    spans_t sel; /* keys to UNLINK in the next round trip */
    const char *argv[3 + CACHE_UNLINK_CHUNK];
    size_t argvlen[3 + CACHE_UNLINK_CHUNK];

    unsigned long scans; /* SCAN calls made */
    unsigned long trips; /* round trips */
} apply_t;

/* Records an I/O failure (the context is unusable) in errstr. */
static void fail_io(apply_t *a, const char *what)
{
    redisContext *ctx = a->c->ctx;
    set_err(a->errstr, a->errstr_size, "redis %s:%d: %s: %s", a->c->host,
            a->c->port, what, ctx && ctx->err ? ctx->errstr : "no reply");
}

/* Reads the next pipelined reply into *reply (the caller frees it).
 * -1 with errstr on an I/O failure. */
static int read_reply(apply_t *a, const char *what, redisReply **reply)
{
    void *r = NULL;

    *reply = NULL;
    if (redisGetReply(a->c->ctx, &r) != REDIS_OK || !r) {
        freeReplyObject(r);
        fail_io(a, what);
        return -1;
    }
    *reply = r;
    return 0;
}

/* Gathers the prefixes, their common prefix and the SCAN pattern. */
static int prepare_prefixes(apply_t *a, long scan_count)
{
    const char *first = NULL;
    size_t lcp = 0;
    char *common = NULL;
    size_t need;
    int rc = -1;

    a->prefix_min_len = SIZE_MAX;
    for (size_t j = 0; j < a->n_jobs; j++) {
        const cache_targets_t *t = a->jobs[j].targets;
        for (size_t i = 0; i < t->n; i++) {
            const cache_target_t *it = &t->items[i];
            if (it->kind != CACHE_TARGET_PREFIX)
                continue;
            if (it->len == 0) {
                set_err(a->errstr, a->errstr_size,
                        "cache: job %zu has an empty prefix", j);
                goto out;
            }
            if (spans_push(&a->prefixes, it->str, it->len, j) != 0)
                goto nomem;
            a->prefix_end[(unsigned char)it->str[it->len - 1]] = true;
            if (it->len < a->prefix_min_len)
                a->prefix_min_len = it->len;
            if (it->len > a->prefix_max_len)
                a->prefix_max_len = it->len;
            if (!first) {
                first = it->str;
                lcp = it->len;
            } else {
                size_t k = 0;
                while (k < lcp && k < it->len && first[k] == it->str[k])
                    k++;
                lcp = k;
            }
        }
    }
    if (a->prefixes.n == 0)
        return 0;
    spans_sort_unique(&a->prefixes);

    common = strndup(first, lcp);
    if (!common)
        goto nomem;
    need = cache_glob_escape(common, NULL, 0);
    a->pattern = malloc(need + 1);
    if (!a->pattern)
        goto nomem;
    if (cache_glob_escape(common, a->pattern, need + 1) != need) {
        set_err(a->errstr, a->errstr_size, "cache: cannot build pattern");
        goto out;
    }
    snprintf(a->count, sizeof(a->count), "%ld",
             scan_count > 0 ? scan_count : CACHE_SCAN_COUNT_DEFAULT);
    rc = 0;
    goto out;
nomem:
    set_err(a->errstr, a->errstr_size, "cache: out of memory");
out:
    free(common);
    return rc;
}

/* The prefix entry equal to key[0..len), or NULL. */
static const span_t *prefix_find(const apply_t *a, const char *key, size_t len)
{
    size_t lo = 0, hi = a->prefixes.n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const span_t *p = &a->prefixes.v[mid];
        int r = bytes_cmp(key, len, p->s, p->len);
        if (r == 0)
            return p;
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Whether key starts with some job's prefix (cache_key_has_prefix()
 * for one of them); *job is then the first such job in order. The
 * prefixes of key that could be in the set are those ending in a byte
 * some prefix ends in: a few binary searches per key, whatever the
 * number of jobs, instead of a loop over every job's prefixes. */
static bool prefix_owner(const apply_t *a, const char *key, size_t len,
                         size_t *job)
{
    size_t best = SIZE_MAX;
    size_t stop = len < a->prefix_max_len ? len : a->prefix_max_len;

    for (size_t i = a->prefix_min_len - 1; i < stop; i++) {
        if (!a->prefix_end[(unsigned char)key[i]])
            continue;
        const span_t *p = prefix_find(a, key, i + 1);
        if (p && p->job < best) {
            best = p->job;
            if (best == 0)
                break;
        }
    }
    if (best == SIZE_MAX)
        return false;
    *job = best;
    return true;
}

/* Appends EVALSHA (or EVAL) for sel[from .. from+n), n <= chunk. */
static int append_unlink(apply_t *a, size_t from, size_t n, bool eval)
{
    char numkeys[24];
    int argc = 0;

    if (eval || a->c->sha[0] == '\0') {
        a->argv[argc] = "EVAL";
        a->argvlen[argc++] = 4;
        a->argv[argc] = unlink_script;
        a->argvlen[argc++] = sizeof(unlink_script) - 1;
    } else {
        a->argv[argc] = "EVALSHA";
        a->argvlen[argc++] = 7;
        a->argv[argc] = a->c->sha;
        a->argvlen[argc++] = CACHE_SHA_LEN;
    }
    snprintf(numkeys, sizeof(numkeys), "%zu", n);
    a->argv[argc] = numkeys;
    a->argvlen[argc++] = strlen(numkeys);
    for (size_t i = 0; i < n; i++) {
        a->argv[argc] = a->sel.v[from + i].s;
        a->argvlen[argc++] = a->sel.v[from + i].len;
    }
    /* hiredis copies the arguments into its output buffer. */
    if (redisAppendCommandArgv(a->c->ctx, argc, a->argv, a->argvlen) !=
        REDIS_OK) {
        fail_io(a, "EVALSHA");
        return -1;
    }
    return 0;
}

static size_t n_chunks(size_t n)
{
    return (n + CACHE_UNLINK_CHUNK - 1) / CACHE_UNLINK_CHUNK;
}

/* Appends the UNLINK calls for all of sel, in chunks. */
static int append_unlinks(apply_t *a, bool eval)
{
    for (size_t k = 0; k < n_chunks(a->sel.n); k++) {
        size_t from = k * CACHE_UNLINK_CHUNK;
        size_t n = a->sel.n - from;
        if (n > CACHE_UNLINK_CHUNK)
            n = CACHE_UNLINK_CHUNK;
        if (append_unlink(a, from, n, eval) != 0)
            return -1;
    }
    return 0;
}

/* Reads the replies of append_unlinks() and adds each key's outcome to
 * its job's `deleted`. The spans of chunks refused with NOSCRIPT move to
 * the front of sel; *retry says how many there are (the caller sends
 * them again with EVAL). -1 with errstr on anything else unexpected. */
static int read_unlinks(apply_t *a, size_t *retry)
{
    size_t chunks = n_chunks(a->sel.n);
    redisReply *reply = NULL;
    int rc = -1;

    *retry = 0;
    for (size_t k = 0; k < chunks; k++) {
        size_t from = k * CACHE_UNLINK_CHUNK;
        size_t n = a->sel.n - from;
        if (n > CACHE_UNLINK_CHUNK)
            n = CACHE_UNLINK_CHUNK;
        if (read_reply(a, "EVALSHA", &reply) != 0)
            goto out;
        if (reply->type == REDIS_REPLY_ERROR &&
            strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            /* Script cache flushed (SCRIPT FLUSH, failover): resend. */
            memmove(&a->sel.v[*retry], &a->sel.v[from], n * sizeof(*a->sel.v));
            *retry += n;
        } else if (reply->type == REDIS_REPLY_ERROR) {
            set_err(a->errstr, a->errstr_size, "redis %s:%d: UNLINK: %s",
                    a->c->host, a->c->port, reply->str);
            goto out;
        } else if (reply->type != REDIS_REPLY_ARRAY || reply->elements != n) {
            set_err(a->errstr, a->errstr_size,
                    "redis %s:%d: UNLINK script: unexpected reply (type %d)",
                    a->c->host, a->c->port, reply->type);
            goto out;
        } else {
            for (size_t i = 0; i < n; i++) {
                const redisReply *e = reply->element[i];
                if (e->type != REDIS_REPLY_INTEGER || e->integer < 0) {
                    set_err(a->errstr, a->errstr_size,
                            "redis %s:%d: UNLINK script: not a count",
                            a->c->host, a->c->port);
                    goto out;
                }
                a->jobs[a->sel.v[from + i].job].deleted += (uint64_t)e->integer;
            }
        }
        freeReplyObject(reply);
        reply = NULL;
    }
    rc = 0;
out:
    freeReplyObject(reply);
    return rc;
}

static int append_scan(apply_t *a, const char *cursor, size_t cursor_len)
{
    const char *argv[6] = {"SCAN",     cursor,  "MATCH",
                           a->pattern, "COUNT", a->count};
    size_t argvlen[6] = {4, cursor_len,      5, strlen(a->pattern),
                         5, strlen(a->count)};

    if (redisAppendCommandArgv(a->c->ctx, 6, argv, argvlen) != REDIS_OK) {
        fail_io(a, "SCAN");
        return -1;
    }
    a->scans++;
    return 0;
}

/* Checks a SCAN reply's shape: [cursor, [key, ...]] with strings. */
static int check_scan_reply(apply_t *a, const redisReply *reply)
{
    if (reply->type == REDIS_REPLY_ERROR) {
        set_err(a->errstr, a->errstr_size, "redis %s:%d: SCAN: %s", a->c->host,
                a->c->port, reply->str);
        return -1;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
        reply->element[0]->type != REDIS_REPLY_STRING ||
        reply->element[1]->type != REDIS_REPLY_ARRAY)
        goto bad;
    for (size_t i = 0; i < reply->element[1]->elements; i++)
        if (reply->element[1]->element[i]->type != REDIS_REPLY_STRING)
            goto bad;
    return 0;
bad:
    set_err(a->errstr, a->errstr_size, "redis %s:%d: SCAN: unexpected reply",
            a->c->host, a->c->port);
    return -1;
}

/* Puts the keys of a SCAN page that some job's prefix covers into sel,
 * each once (SCAN may return a key twice) and counted for its first job.
 * sel points into the page, which must outlive it. */
static int select_page(apply_t *a, const redisReply *keys)
{
    size_t job;

    for (size_t i = 0; i < keys->elements; i++) {
        const redisReply *k = keys->element[i];
        if (!prefix_owner(a, k->str, k->len, &job))
            continue;
        if (spans_push(&a->sel, k->str, k->len, job) != 0) {
            set_err(a->errstr, a->errstr_size, "cache: out of memory");
            return -1;
        }
    }
    spans_sort_unique(&a->sel);
    for (size_t i = 0; i < a->sel.n; i++)
        a->jobs[a->sel.v[i].job].prefix_matches++;
    return 0;
}

/* The deletes: the exact keys, then the prefixes' keys in one SCAN pass.
 * Each round trip carries the UNLINKs of what the previous one found and
 * the next SCAN, so a pass costs one round trip per SCAN page plus one;
 * only one page of keys is held at a time, whatever the key space. A
 * key already UNLINKed cannot come back in a later page, so the pass
 * needs no memory of what it removed. */
static int apply_deletes(apply_t *a)
{
    redisReply *page = NULL, *next = NULL;
    bool scanning = a->prefixes.n > 0;
    const char *cursor = "0";
    size_t cursor_len = 1, retry;
    int rc = -1;

    for (size_t j = 0; j < a->n_jobs; j++) {
        const cache_targets_t *t = a->jobs[j].targets;
        for (size_t i = 0; i < t->n; i++) {
            const cache_target_t *it = &t->items[i];
            if (it->kind == CACHE_TARGET_KEY &&
                spans_push(&a->sel, it->str, it->len, j) != 0) {
                set_err(a->errstr, a->errstr_size, "cache: out of memory");
                goto out;
            }
        }
    }

    while (a->sel.n > 0 || scanning) {
        if (append_unlinks(a, false) != 0)
            goto out;
        if (scanning && append_scan(a, cursor, cursor_len) != 0)
            goto out;
        a->trips++;
        if (read_unlinks(a, &retry) != 0)
            goto out;
        if (scanning) {
            if (read_reply(a, "SCAN", &next) != 0)
                goto out;
            if (check_scan_reply(a, next) != 0)
                goto out;
        }
        if (retry > 0) {
            size_t again;
            a->sel.n = retry;
            if (append_unlinks(a, true) != 0)
                goto out;
            a->trips++;
            if (read_unlinks(a, &again) != 0)
                goto out;
            if (again > 0) {
                set_err(a->errstr, a->errstr_size,
                        "redis %s:%d: EVAL answered NOSCRIPT", a->c->host,
                        a->c->port);
                goto out;
            }
        }
        /* sel and cursor point into page: done with both. */
        a->sel.n = 0;
        freeReplyObject(page);
        page = next;
        next = NULL;
        if (scanning) {
            cursor = page->element[0]->str;
            cursor_len = page->element[0]->len;
            scanning = !(cursor_len == 1 && cursor[0] == '0');
            if (select_page(a, page->element[1]) != 0)
                goto out;
        }
    }
    rc = 0;
out:
    freeReplyObject(page);
    freeReplyObject(next);
    return rc;
}

/* The notice for job j (compact JSON, fields in contract order); the
 * caller frees it. NULL on ENOMEM. */
static char *notice_dump(const cache_job_t *job)
{
    json_t *root = json_object(), *keys = json_array(),
           *prefixes = json_array();
    const cache_targets_t *t = job->targets;
    char *s = NULL;
    int err = 0;

    if (!root || !keys || !prefixes)
        goto out;
    for (size_t i = 0; i < t->n; i++) {
        json_t *arr = t->items[i].kind == CACHE_TARGET_KEY ? keys : prefixes;
        err |= json_array_append_new(
            arr, json_stringn(t->items[i].str, t->items[i].len));
    }
    err |= json_object_set_new(root, "tenant_id", json_string(job->tenant_id));
    err |= json_object_set(root, "keys", keys);
    err |= json_object_set(root, "prefixes", prefixes);
    err |= json_object_set_new(root, "deleted",
                               json_integer((json_int_t)job->deleted));
    if (job->event_id && job->event_id[0])
        err |=
            json_object_set_new(root, "event_id", json_string(job->event_id));
    if (err == 0)
        s = json_dumps(root, JSON_COMPACT);
out:
    json_decref(keys);
    json_decref(prefixes);
    json_decref(root);
    return s;
}

/* One notice per job, in order, pipelined in one round trip. */
static int publish_notices(apply_t *a, const char *channel)
{
    redisReply *reply = NULL;
    int rc = -1;

    for (size_t j = 0; j < a->n_jobs; j++) {
        char *msg = notice_dump(&a->jobs[j]);
        if (!msg) {
            set_err(a->errstr, a->errstr_size,
                    "cache: cannot build the notice (invalid UTF-8 in "
                    "tenant_id or event_id, or out of memory)");
            goto out;
        }
        const char *argv[3] = {"PUBLISH", channel, msg};
        size_t argvlen[3] = {7, strlen(channel), strlen(msg)};
        int r = redisAppendCommandArgv(a->c->ctx, 3, argv, argvlen);
        free(msg);
        if (r != REDIS_OK) {
            fail_io(a, "PUBLISH");
            goto out;
        }
    }
    a->trips++;
    for (size_t j = 0; j < a->n_jobs; j++) {
        if (read_reply(a, "PUBLISH", &reply) != 0)
            goto out;
        if (reply->type != REDIS_REPLY_INTEGER) {
            set_err(a->errstr, a->errstr_size, "redis %s:%d: PUBLISH: %s",
                    a->c->host, a->c->port,
                    reply->type == REDIS_REPLY_ERROR ? reply->str
                                                     : "unexpected reply");
            goto out;
        }
        freeReplyObject(reply);
        reply = NULL;
    }
    rc = 0;
out:
    freeReplyObject(reply);
    return rc;
}

/* Connects when needed. On any failure after that the connection is
 * dropped, whatever broke: a pipeline abandoned halfway leaves replies
 * unread, and a fresh connection is the one state known to be right. */
int cache_apply(cache_t *c, cache_job_t *jobs, size_t n, const char *channel,
                long scan_count, char *errstr, size_t errstr_size)
{
    apply_t *a = NULL;
    int rc = -1;

    if (!c || (n > 0 && !jobs) || !channel || !*channel) {
        set_err(errstr, errstr_size, "cache_apply: bad arguments");
        return -1;
    }
    for (size_t j = 0; j < n; j++) {
        if (!jobs[j].targets || !jobs[j].tenant_id) {
            set_err(errstr, errstr_size,
                    "cache_apply: job %zu has no targets or tenant", j);
            return -1;
        }
        jobs[j].deleted = 0;
        jobs[j].prefix_matches = 0;
    }
    if (n == 0)
        return 0;
    if (cache_connect(c, errstr, errstr_size) != 0)
        return -1;

    a = calloc(1, sizeof(*a));
    if (!a) {
        set_err(errstr, errstr_size, "cache: out of memory");
        goto out;
    }
    a->c = c;
    a->jobs = jobs;
    a->n_jobs = n;
    a->errstr = errstr;
    a->errstr_size = errstr_size;

    if (prepare_prefixes(a, scan_count) != 0 || apply_deletes(a) != 0 ||
        publish_notices(a, channel) != 0)
        goto out;
    log_debug("cache: %zu invalidations applied (%lu SCAN calls, "
              "%lu round trips)",
              n, a->scans, a->trips);
    rc = 0;
out:
    if (rc != 0)
        cache_disconnect(c);
    if (a) {
        free(a->prefixes.v);
        free(a->sel.v);
        free(a->pattern);
        free(a);
    }
    return rc;
}
