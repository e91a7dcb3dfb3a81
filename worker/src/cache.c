/* Redis: UNLINK exact keys, SCAN prefix sets, PUBLISH notices (hiredis). */
#include "cache.h"

#include "log.h"

#include <hiredis/hiredis.h>

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define CACHE_PORT_DEFAULT 6379
#define CACHE_CONNECT_TIMEOUT_S 5
#define CACHE_COMMAND_TIMEOUT_S 30
/* Keys per UNLINK (a job's keys found in one SCAN page can be many):
 * one command stays short, so that Redis serves other clients between
 * commands. Pipelined commands are handed to the socket in pieces of
 * about CACHE_SEND_BYTES, so that Redis starts on the first ones while
 * the next ones are being written. */
#define CACHE_UNLINK_KEYS 512
#define CACHE_SEND_BYTES 65536
#define CACHE_SCAN_COUNT_DEFAULT 1000

/* A growable byte buffer; `oom` sticks once an allocation failed. */
typedef struct {
    char *p;
    size_t len;
    size_t cap;
    bool oom;
} buf_t;

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

/* Keys of one job, spans v[from .. from+n) of some spans_t. */
typedef struct {
    size_t job;
    size_t from;
    size_t n;
} group_t;

typedef struct {
    group_t *v;
    size_t n;
    size_t cap;
} groups_t;

/* What cache_apply() reuses from one call to the next, so that a call
 * allocates nothing once the buffers have grown to the batch's size. */
typedef struct {
    buf_t cmd;    /* commands in the wire format, not yet sent */
    buf_t note;   /* one notice */
    spans_t keys; /* exact keys, then one page's selected keys */
    spans_t prev; /* the previous page's selected keys */
    spans_t prefixes;
    groups_t groups;
} apply_bufs_t;

struct cache {
    char *host;
    int port;
    int db;
    char *user;        /* NULL: AUTH without a user name */
    char *password;    /* NULL: no AUTH */
    redisContext *ctx; /* NULL when not connected */
    apply_bufs_t bufs;
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
    free(c->bufs.cmd.p);
    free(c->bufs.note.p);
    free(c->bufs.keys.v);
    free(c->bufs.prev.v);
    free(c->bufs.prefixes.v);
    free(c->bufs.groups.v);
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

/* Connects, authenticates, selects the database and PINGs; a context
 * that failed any step is freed, never kept, so that the next call
 * starts anew. */
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

    /* A first command, so that a server that wants a password (NOAUTH)
     * or is still loading (LOADING) is found here, not halfway through a
     * batch. */
    argv[0] = "PING";
    argvlen[0] = 4;
    reply = run(c, ctx, "PING", 1, argv, argvlen, errstr, errstr_size);
    if (!reply)
        goto out;

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
/* Buffers and the wire format                                        */
/* ------------------------------------------------------------------ */

/* Makes room for `more` bytes after b->len; sets b->oom when it cannot. */
static void buf_reserve(buf_t *b, size_t more)
{
    size_t cap;
    char *p;

    if (b->oom || more <= b->cap - b->len)
        return;
    cap = b->cap ? b->cap : 4096;
    while (cap - b->len < more) {
        if (cap > SIZE_MAX / 2) {
            b->oom = true;
            return;
        }
        cap *= 2;
    }
    p = realloc(b->p, cap);
    if (!p) {
        b->oom = true;
        return;
    }
    b->p = p;
    b->cap = cap;
}

/* Appends s[0..n). Inline with a fast path: the many small pieces of a
 * command or a notice cost a compare and a copy each. */
static inline void buf_put(buf_t *b, const void *s, size_t n)
{
    if (n > b->cap - b->len) {
        buf_reserve(b, n);
        if (b->oom)
            return;
    }
    if (n > 0)
        memcpy(b->p + b->len, s, n);
    b->len += n;
}

/* Writes v in decimal at the start of out (room for 20 digits); returns
 * the number of digits. */
static size_t fmt_uint(char out[24], uint64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp), n;

    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    n = sizeof(tmp) - i;
    memcpy(out, tmp + i, n);
    return n;
}

static void buf_put_uint(buf_t *b, uint64_t v)
{
    char d[24];
    buf_put(b, d, fmt_uint(d, v));
}

/* The start of a command of argc arguments: "*<argc>\r\n". */
static void resp_begin(buf_t *b, size_t argc)
{
    buf_put(b, "*", 1);
    buf_put_uint(b, argc);
    buf_put(b, "\r\n", 2);
}

/* One argument of a command: "$<len>\r\n<bytes>\r\n". */
static void resp_arg(buf_t *b, const char *s, size_t n)
{
    buf_put(b, "$", 1);
    buf_put_uint(b, n);
    buf_put(b, "\r\n", 2);
    buf_put(b, s, n);
    buf_put(b, "\r\n", 2);
}

/* Grows an array of `size`-byte elements to hold `need`; 0 or -1. */
static int grow(void **v, size_t *cap, size_t need, size_t size)
{
    size_t n = *cap ? *cap : 64;
    void *p;

    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    p = realloc(*v, n * size);
    if (!p)
        return -1;
    *v = p;
    *cap = n;
    return 0;
}

static int spans_push(spans_t *a, const char *s, size_t len, size_t job)
{
    if (grow((void **)&a->v, &a->cap, a->n + 1, sizeof(*a->v)) != 0)
        return -1;
    a->v[a->n++] = (span_t){.s = s, .len = len, .job = job};
    return 0;
}

static int groups_push(groups_t *a, size_t job, size_t from, size_t n)
{
    if (grow((void **)&a->v, &a->cap, a->n + 1, sizeof(*a->v)) != 0)
        return -1;
    a->v[a->n++] = (group_t){.job = job, .from = from, .n = n};
    return 0;
}

/* ------------------------------------------------------------------ */
/* Notices                                                            */
/* ------------------------------------------------------------------ */

/* Length of the UTF-8 sequence at s[0..n) (1..4), or 0 when it is not
 * valid UTF-8: stray continuation bytes, overlong forms, surrogates and
 * code points past U+10FFFF are refused, as jansson refuses them. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    uint32_t cp;
    size_t len;

    if (c < 0x80)
        return 1;
    if (c < 0xC2)
        return 0;
    if (c < 0xE0) {
        len = 2;
        cp = c & 0x1F;
    } else if (c < 0xF0) {
        len = 3;
        cp = c & 0x0F;
    } else if (c < 0xF5) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

/* Writes s[0..n) as a JSON string escaped exactly as jansson's
 * json_dumps() escapes it, so that notices stay byte for byte what they
 * were: '"' and '\\' escaped, control characters below 0x20 as \b \f \n
 * \r \t or \u00XX, everything else (DEL, '/', non-ASCII) as it is.
 * false when s is not valid UTF-8 (jansson refuses such strings). Runs
 * of plain bytes are copied at once: no per-character call. */
static bool json_put_string(buf_t *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    size_t run = 0, i = 0;

    buf_put(b, "\"", 1);
    while (i < n) {
        unsigned char ch = u[i];
        char esc[6];
        size_t elen = 2;

        if (ch >= 0x80) {
            size_t l = utf8_len(u + i, n - i);
            if (l == 0)
                return false;
            i += l;
            continue;
        }
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            i++;
            continue;
        }
        buf_put(b, s + run, i - run);
        esc[0] = '\\';
        switch (ch) {
        case '"':
        case '\\':
            esc[1] = (char)ch;
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[ch >> 4];
            esc[5] = hex[ch & 0xF];
            elen = 6;
        }
        buf_put(b, esc, elen);
        run = ++i;
    }
    buf_put(b, s + run, n - run);
    buf_put(b, "\"", 1);
    return true;
}

/* Writes job's notice into b (emptied first), compact JSON with the
 * fields in the contract's order:
 *   {"tenant_id":..,"keys":[..],"prefixes":[..],"deleted":N,"event_id":..}
 * (event_id only when set) without N: *cut is where N goes, b holds the
 * text before and after it. 0, or -1 with errstr (a string that is not
 * UTF-8, or no memory). */
static int notice_build(buf_t *b, const cache_job_t *job, size_t *cut,
                        char *errstr, size_t errstr_size)
{
    const cache_targets_t *t = job->targets;
    bool ok = true;

    b->len = 0;
    buf_put(b, "{\"tenant_id\":", 13);
    ok &= json_put_string(b, job->tenant_id, strlen(job->tenant_id));
    for (int prefixes = 0; prefixes < 2; prefixes++) {
        cache_target_kind_t kind =
            prefixes ? CACHE_TARGET_PREFIX : CACHE_TARGET_KEY;
        bool first = true;
        if (prefixes)
            buf_put(b, "],\"prefixes\":[", 14);
        else
            buf_put(b, ",\"keys\":[", 9);
        for (size_t i = 0; i < t->n; i++) {
            if (t->items[i].kind != kind)
                continue;
            if (!first)
                buf_put(b, ",", 1);
            first = false;
            ok &= json_put_string(b, t->items[i].str, t->items[i].len);
        }
    }
    buf_put(b, "],\"deleted\":", 12);
    *cut = b->len;
    if (job->event_id && job->event_id[0]) {
        buf_put(b, ",\"event_id\":", 12);
        ok &= json_put_string(b, job->event_id, strlen(job->event_id));
    }
    buf_put(b, "}", 1);
    if (!ok || b->oom) {
        set_err(errstr, errstr_size,
                "cache: cannot build the notice (invalid UTF-8 in "
                "tenant_id, event_id or a key, or out of memory)");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Applying invalidations                                             */
/* ------------------------------------------------------------------ */

/* State of one cache_apply() call. */
typedef struct {
    cache_t *c;
    apply_bufs_t *bufs;
    cache_job_t *jobs;
    size_t n_jobs;
    const char *channel;
    char *errstr;
    size_t errstr_size;

    /* A key's job is found by looking up the key's own prefixes that
     * end in a byte some job's prefix ends in (':' for all real ones)
     * among every prefix of every job (bufs->prefixes: sorted, unique,
     * lowest job kept). */
    bool prefix_end[256];
    size_t prefix_min_len;
    size_t prefix_max_len;
    char *pattern; /* SCAN MATCH: the common prefix, glob-escaped, '*' */
    char count[24];

    unsigned long scans;   /* SCAN calls made */
    unsigned long unlinks; /* UNLINK commands sent */
    unsigned long trips;   /* round trips waited for */
} apply_t;

/* Records an I/O failure (the context is unusable) in errstr. */
static void fail_io(apply_t *a, const char *what)
{
    redisContext *ctx = a->c->ctx;
    set_err(a->errstr, a->errstr_size, "redis %s:%d: %s: %s", a->c->host,
            a->c->port, what, ctx && ctx->err ? ctx->errstr : "no reply");
}

static int fail_nomem(apply_t *a)
{
    set_err(a->errstr, a->errstr_size, "cache: out of memory");
    return -1;
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

/* Hands the command in bufs->cmd to hiredis and writes what the socket
 * takes now, so that Redis starts on it while the next one is built. */
static int send_cmd(apply_t *a, const char *what)
{
    int done = 0;

    if (a->bufs->cmd.oom)
        return fail_nomem(a);
    if (redisAppendFormattedCommand(a->c->ctx, a->bufs->cmd.p,
                                    a->bufs->cmd.len) != REDIS_OK ||
        redisBufferWrite(a->c->ctx, &done) != REDIS_OK) {
        fail_io(a, what);
        return -1;
    }
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

/* Same strings next to each other, the lowest job first. */
static int span_cmp(const void *pa, const void *pb)
{
    const span_t *a = pa, *b = pb;
    int r = bytes_cmp(a->s, a->len, b->s, b->len);
    if (r != 0)
        return r;
    return a->job < b->job ? -1 : a->job > b->job;
}

/* Job first, then bytes: one job's keys in a run. */
static int span_job_cmp(const void *pa, const void *pb)
{
    const span_t *a = pa, *b = pb;
    if (a->job != b->job)
        return a->job < b->job ? -1 : 1;
    return bytes_cmp(a->s, a->len, b->s, b->len);
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

/* ------------------------------------------------------------------ */
/* Deletes                                                            */
/* ------------------------------------------------------------------ */

/* Puts every job's exact keys into bufs->keys, in job order, and one
 * group per job that has some. */
static int group_exact_keys(apply_t *a)
{
    apply_bufs_t *bb = a->bufs;

    bb->keys.n = 0;
    bb->groups.n = 0;
    for (size_t j = 0; j < a->n_jobs; j++) {
        const cache_targets_t *t = a->jobs[j].targets;
        size_t from = bb->keys.n;
        for (size_t i = 0; i < t->n; i++) {
            const cache_target_t *it = &t->items[i];
            if (it->kind == CACHE_TARGET_KEY &&
                spans_push(&bb->keys, it->str, it->len, j) != 0)
                return fail_nomem(a);
        }
        if (bb->keys.n > from &&
            groups_push(&bb->groups, j, from, bb->keys.n - from) != 0)
            return fail_nomem(a);
    }
    return 0;
}

/* Sends one UNLINK per group of bufs->groups (its keys, spans of
 * `keys`), pipelined; nothing is read here. */
static int send_unlinks(apply_t *a, const spans_t *keys)
{
    apply_bufs_t *bb = a->bufs;

    bb->cmd.len = 0;
    for (size_t g = 0; g < bb->groups.n; g++) {
        const group_t *gr = &bb->groups.v[g];
        resp_begin(&bb->cmd, 1 + gr->n);
        resp_arg(&bb->cmd, "UNLINK", 6);
        for (size_t k = 0; k < gr->n; k++)
            resp_arg(&bb->cmd, keys->v[gr->from + k].s,
                     keys->v[gr->from + k].len);
        if (bb->cmd.len >= CACHE_SEND_BYTES || g + 1 == bb->groups.n) {
            if (send_cmd(a, "UNLINK") != 0)
                return -1;
            bb->cmd.len = 0;
        }
    }
    a->unlinks += bb->groups.n;
    return 0;
}

/* Reads the reply of group g's UNLINK (sent by send_unlinks()) and adds
 * its count to the group's job. */
static int read_unlink(apply_t *a, size_t g)
{
    const group_t *gr = &a->bufs->groups.v[g];
    redisReply *reply = NULL;

    if (read_reply(a, "UNLINK", &reply) != 0)
        return -1;
    if (reply->type != REDIS_REPLY_INTEGER || reply->integer < 0 ||
        (uint64_t)reply->integer > gr->n) {
        set_err(a->errstr, a->errstr_size, "redis %s:%d: UNLINK: %s",
                a->c->host, a->c->port,
                reply->type == REDIS_REPLY_ERROR ? reply->str
                                                 : "unexpected reply");
        freeReplyObject(reply);
        return -1;
    }
    a->jobs[gr->job].deleted += (uint64_t)reply->integer;
    freeReplyObject(reply);
    return 0;
}

/* Reads the replies of send_unlinks(), in order. */
static int read_unlinks(apply_t *a)
{
    for (size_t g = 0; g < a->bufs->groups.n; g++)
        if (read_unlink(a, g) != 0)
            return -1;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Prefixes: one SCAN pass                                            */
/* ------------------------------------------------------------------ */

/* Gathers the prefixes, their common prefix and the SCAN pattern. */
static int prepare_prefixes(apply_t *a, long scan_count)
{
    spans_t *pf = &a->bufs->prefixes;
    const char *first = NULL;
    size_t lcp = 0;
    char *common = NULL;
    size_t need;
    int rc = -1;

    pf->n = 0;
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
            if (spans_push(pf, it->str, it->len, j) != 0)
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
    if (pf->n == 0)
        return 0;
    spans_sort_unique(pf);

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
    fail_nomem(a);
out:
    free(common);
    return rc;
}

/* The prefix entry equal to key[0..len), or NULL. */
static const span_t *prefix_find(const apply_t *a, const char *key, size_t len)
{
    const spans_t *pf = &a->bufs->prefixes;
    size_t lo = 0, hi = pf->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const span_t *p = &pf->v[mid];
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

static int append_scan(apply_t *a, const char *cursor, size_t cursor_len)
{
    buf_t *b = &a->bufs->cmd;

    b->len = 0;
    resp_begin(b, 6);
    resp_arg(b, "SCAN", 4);
    resp_arg(b, cursor, cursor_len);
    resp_arg(b, "MATCH", 5);
    resp_arg(b, a->pattern, strlen(a->pattern));
    resp_arg(b, "COUNT", 5);
    resp_arg(b, a->count, strlen(a->count));
    a->scans++;
    return send_cmd(a, "SCAN");
}

/* Reads a SCAN reply and checks its shape: [cursor, [key, ...]] with
 * strings. The caller frees *page. */
static int read_scan(apply_t *a, redisReply **page)
{
    redisReply *r;

    if (read_reply(a, "SCAN", page) != 0)
        return -1;
    r = *page;
    if (r->type == REDIS_REPLY_ERROR) {
        set_err(a->errstr, a->errstr_size, "redis %s:%d: SCAN: %s", a->c->host,
                a->c->port, r->str);
        return -1;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[1]->type != REDIS_REPLY_ARRAY)
        goto bad;
    for (size_t i = 0; i < r->element[1]->elements; i++)
        if (r->element[1]->element[i]->type != REDIS_REPLY_STRING)
            goto bad;
    return 0;
bad:
    set_err(a->errstr, a->errstr_size, "redis %s:%d: SCAN: unexpected reply",
            a->c->host, a->c->port);
    return -1;
}

/* Whether sorted (job, key) spans hold s for job. */
static bool spans_has(const spans_t *a, const span_t *s)
{
    size_t lo = 0, hi = a->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = span_job_cmp(s, &a->v[mid]);
        if (r == 0)
            return true;
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return false;
}

/* Puts the keys of a SCAN page that some job's prefix covers into
 * bufs->keys, sorted by job, each once and counted for its first job,
 * and one group per job's run (at most CACHE_UNLINK_KEYS keys a group).
 * A key the previous page selected too (SCAN may return a key twice, and
 * that page's UNLINKs run after this page's SCAN) is left out: what is
 * UNLINKed and counted is each key once. Spans point into the page. */
static int select_page(apply_t *a, const redisReply *keys)
{
    apply_bufs_t *bb = a->bufs;
    spans_t *sel = &bb->keys;
    size_t job, w = 0;

    sel->n = 0;
    bb->groups.n = 0;
    for (size_t i = 0; i < keys->elements; i++) {
        const redisReply *k = keys->element[i];
        if (prefix_owner(a, k->str, k->len, &job) &&
            spans_push(sel, k->str, k->len, job) != 0)
            return fail_nomem(a);
    }
    if (sel->n > 1)
        qsort(sel->v, sel->n, sizeof(*sel->v), span_job_cmp);
    for (size_t i = 0; i < sel->n; i++) {
        if (w > 0 && span_job_cmp(&sel->v[w - 1], &sel->v[i]) == 0)
            continue;
        if (spans_has(&bb->prev, &sel->v[i]))
            continue;
        sel->v[w++] = sel->v[i];
    }
    sel->n = w;
    for (size_t i = 0; i < sel->n;) {
        size_t from = i;
        job = sel->v[i].job;
        while (i < sel->n && sel->v[i].job == job &&
               i - from < CACHE_UNLINK_KEYS)
            i++;
        a->jobs[job].prefix_matches += i - from;
        if (groups_push(&bb->groups, job, from, i - from) != 0)
            return fail_nomem(a);
    }
    return 0;
}

/* The deletes when some job has prefixes: every exact key first, then
 * the prefixes' keys in one SCAN pass. Each round trip sends the next
 * SCAN before the UNLINKs of the page just read, so that Redis scans
 * while the page is filtered here; a pass costs one round trip per SCAN
 * page plus one, and only two pages are held at a time, whatever the key
 * space. A key UNLINKed cannot come back in a later page; only the next
 * page can repeat one of a page's keys (select_page() leaves it out). */
static int apply_deletes(apply_t *a)
{
    apply_bufs_t *bb = a->bufs;
    redisReply *page = NULL, *next = NULL;
    spans_t swap;
    bool more;
    int rc = -1;

    bb->prev.n = 0;
    if (group_exact_keys(a) != 0 || send_unlinks(a, &bb->keys) != 0 ||
        append_scan(a, "0", 1) != 0)
        goto out;
    a->trips++;
    if (read_unlinks(a) != 0 || read_scan(a, &next) != 0)
        goto out;
    bb->keys.n = 0; /* the exact keys are no page's selection */

    do {
        const redisReply *cursor = next->element[0];
        more = !(cursor->len == 1 && cursor->str[0] == '0');
        if (more && append_scan(a, cursor->str, cursor->len) != 0)
            goto out;
        /* This page's selection becomes the previous one, whose spans
         * point into `page`: freed only once `next` is filtered. */
        swap = bb->prev;
        bb->prev = bb->keys;
        bb->keys = swap;
        if (select_page(a, next->element[1]) != 0)
            goto out;
        freeReplyObject(page);
        page = next;
        next = NULL;
        if (send_unlinks(a, &bb->keys) != 0)
            goto out;
        a->trips++;
        if (more && read_scan(a, &next) != 0)
            goto out;
        if (read_unlinks(a) != 0)
            goto out;
    } while (more);
    rc = 0;
out:
    freeReplyObject(page);
    freeReplyObject(next);
    return rc;
}

/* Appends the PUBLISH of job j's notice to bufs->cmd, and hands
 * bufs->cmd to the socket once it holds CACHE_SEND_BYTES (or with
 * `flush`). */
static int append_notice(apply_t *a, size_t j, bool flush)
{
    apply_bufs_t *bb = a->bufs;
    char d[24];
    size_t dlen = fmt_uint(d, a->jobs[j].deleted), cut;

    if (notice_build(&bb->note, &a->jobs[j], &cut, a->errstr, a->errstr_size) !=
        0)
        return -1;
    resp_begin(&bb->cmd, 3);
    resp_arg(&bb->cmd, "PUBLISH", 7);
    resp_arg(&bb->cmd, a->channel, strlen(a->channel));
    buf_put(&bb->cmd, "$", 1);
    buf_put_uint(&bb->cmd, bb->note.len + dlen);
    buf_put(&bb->cmd, "\r\n", 2);
    buf_put(&bb->cmd, bb->note.p, cut);
    buf_put(&bb->cmd, d, dlen);
    buf_put(&bb->cmd, bb->note.p + cut, bb->note.len - cut);
    buf_put(&bb->cmd, "\r\n", 2);
    if (bb->cmd.len >= CACHE_SEND_BYTES || flush) {
        if (send_cmd(a, "PUBLISH") != 0)
            return -1;
        bb->cmd.len = 0;
    }
    return 0;
}

/* Reads the replies of the n_jobs PUBLISHes. */
static int read_notices(apply_t *a)
{
    redisReply *reply = NULL;

    for (size_t j = 0; j < a->n_jobs; j++) {
        if (read_reply(a, "PUBLISH", &reply) != 0)
            return -1;
        if (reply->type != REDIS_REPLY_INTEGER) {
            set_err(a->errstr, a->errstr_size, "redis %s:%d: PUBLISH: %s",
                    a->c->host, a->c->port,
                    reply->type == REDIS_REPLY_ERROR ? reply->str
                                                     : "unexpected reply");
            freeReplyObject(reply);
            return -1;
        }
        freeReplyObject(reply);
    }
    return 0;
}

/* One notice per job, in order, pipelined in one round trip (after the
 * SCAN pass: a job's count is known only at its end). */
static int publish_notices(apply_t *a)
{
    a->bufs->cmd.len = 0;
    for (size_t j = 0; j < a->n_jobs; j++)
        if (append_notice(a, j, j + 1 == a->n_jobs) != 0)
            return -1;
    a->trips++;
    return read_notices(a);
}

/* Exact keys only (no job has a prefix): one UNLINK per job (its keys
 * are distinct, so the count is its own), all pipelined; then, as each
 * count comes back, that job's notice, in order. Every UNLINK is on the
 * wire before the first PUBLISH, so Redis runs all the deletes before
 * any notice, as in the SCAN case, and the notices stream behind the
 * deletes' replies: about one round trip for the batch. */
static int apply_exact(apply_t *a)
{
    const groups_t *gs = &a->bufs->groups;
    size_t next = 0; /* the next job whose notice is to be appended */

    if (group_exact_keys(a) != 0 || send_unlinks(a, &a->bufs->keys) != 0)
        return -1;
    a->trips++;
    for (size_t g = 0; g < gs->n; g++) {
        if (read_unlink(a, g) != 0)
            return -1;
        /* job gs->v[g].job is complete; so is every job before it */
        for (; next <= gs->v[g].job; next++)
            if (append_notice(a, next, false) != 0)
                return -1;
    }
    for (; next < a->n_jobs; next++)
        if (append_notice(a, next, false) != 0)
            return -1;
    if (a->bufs->cmd.len > 0 && send_cmd(a, "PUBLISH") != 0)
        return -1;
    a->bufs->cmd.len = 0;
    return read_notices(a);
}

/* Connects when needed. On any failure after that the connection is
 * dropped, whatever broke: a pipeline abandoned halfway leaves replies
 * unread, and a fresh connection is the one state known to be right. */
int cache_apply(cache_t *c, cache_job_t *jobs, size_t n, const char *channel,
                long scan_count, char *errstr, size_t errstr_size)
{
    struct timespec t0, t1;
    apply_t *a = NULL;
    int rc = -1;

    clock_gettime(CLOCK_MONOTONIC, &t0);
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
    a->bufs = &c->bufs;
    a->bufs->cmd.oom = false;
    a->bufs->note.oom = false;
    a->jobs = jobs;
    a->n_jobs = n;
    a->channel = channel;
    a->errstr = errstr;
    a->errstr_size = errstr_size;

    if (prepare_prefixes(a, scan_count) != 0)
        goto out;
    if (a->bufs->prefixes.n == 0) {
        if (apply_exact(a) != 0)
            goto out;
    } else if (apply_deletes(a) != 0 || publish_notices(a) != 0) {
        goto out;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    log_debug("cache: %zu invalidations applied in %.1f ms (%lu SCAN "
              "calls, %lu UNLINK commands, %lu round trips)",
              n,
              (double)(t1.tv_sec - t0.tv_sec) * 1e3 +
                  (double)(t1.tv_nsec - t0.tv_nsec) / 1e6,
              a->scans, a->unlinks, a->trips);
    rc = 0;
out:
    if (rc != 0)
        cache_disconnect(c);
    if (a) {
        free(a->pattern);
        free(a);
    }
    return rc;
}
