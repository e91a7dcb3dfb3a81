/* tally-redis-probe: what another Redis client sees (GET latency), and how
 * many SCAN calls one pass takes; for scripts/bench_invalidation.sh. */
#include <hiredis/hiredis.h>

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROBE_USAGE                                                            \
    "usage: tally-redis-probe latency HOST PORT KEY_PREFIX N_KEYS "            \
    "[EVERY_US]\n"                                                             \
    "         GETs KEY_PREFIX<i> (i = 0..N_KEYS-1, in turn) one at a\n"        \
    "         time (one every EVERY_US microseconds, default 0: back to\n"     \
    "         back) until SIGTERM; a SIGUSR1 forgets what was measured\n"      \
    "         so far (the window starts); then prints\n"                       \
    "         'gets N p50_us X p99_us X p999_us X max_us X'\n"                 \
    "       tally-redis-probe scanpass HOST PORT PATTERN COUNT\n"              \
    "         prints the SCAN calls of one full pass (MATCH PATTERN)\n"        \
    "       tally-redis-probe keys HOST PORT PATTERN COUNT\n"                  \
    "         prints the keys one full pass finds, one a line\n"               \
    "       tally-redis-probe slowlog HOST PORT\n"                             \
    "         prints how many SLOWLOG entries took over 2, 5 and 10 ms,\n"     \
    "         and the longest\n"

static volatile sig_atomic_t probe_stop, probe_restart;

static void on_term(int sig)
{
    (void)sig;
    probe_stop = 1;
}

static void on_usr1(int sig)
{
    (void)sig;
    probe_restart = 1;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static redisContext *probe_connect(const char *host, int port)
{
    struct timeval tv = {.tv_sec = 30};
    redisContext *ctx = redisConnectWithTimeout(host, port, tv);

    if (!ctx || ctx->err) {
        fprintf(stderr, "tally-redis-probe: connect %s:%d: %s\n", host, port,
                ctx ? ctx->errstr : "out of memory");
        exit(1);
    }
    redisSetTimeout(ctx, tv);
    return ctx;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The q-quantile of sorted v[0..n), nearest rank. */
static double quantile(const double *v, size_t n, double q)
{
    size_t i = (size_t)(q * (double)n);
    return n == 0 ? 0 : v[i < n ? i : n - 1];
}

/* GETs at a steady pace (when every_us > 0): a client that asks now and
 * then, whose latency says how long Redis made it wait, without the
 * probe itself keeping Redis busy. A late GET is not made up for. */
static int probe_latency(redisContext *ctx, const char *prefix, long n_keys,
                         long every_us)
{
    double next = now_us();
    size_t n = 0, cap = 1 << 16;
    double *lat = malloc(cap * sizeof(*lat));
    long k = 0;

    if (!lat)
        return 1;
    while (!probe_stop) {
        char key[256];
        if (probe_restart) { /* SIGUSR1: the window starts now */
            probe_restart = 0;
            n = 0;
        }
        snprintf(key, sizeof(key), "%s%ld", prefix, k++ % n_keys);
        if (every_us > 0) {
            double wait = next - now_us();
            if (wait > 0) {
                struct timespec ts = {
                    .tv_sec = (time_t)(wait / 1e6),
                    .tv_nsec =
                        (long)((wait - (double)(time_t)(wait / 1e6) * 1e6) *
                               1e3)};
                nanosleep(&ts, NULL);
            }
            next = (next > now_us() ? next : now_us()) + (double)every_us;
        }
        double t0 = now_us();
        redisReply *r = redisCommand(ctx, "GET %s", key);
        double dt = now_us() - t0;
        if (!r) {
            fprintf(stderr, "tally-redis-probe: GET: %s\n", ctx->errstr);
            free(lat);
            return 1;
        }
        freeReplyObject(r);
        if (n == cap) {
            double *v = realloc(lat, 2 * cap * sizeof(*lat));
            if (!v)
                break;
            lat = v;
            cap *= 2;
        }
        lat[n++] = dt;
    }
    qsort(lat, n, sizeof(*lat), cmp_double);
    printf("gets %zu p50_us %.0f p99_us %.0f p999_us %.0f max_us %.0f\n", n,
           quantile(lat, n, 0.5), quantile(lat, n, 0.99),
           quantile(lat, n, 0.999), n ? lat[n - 1] : 0.0);
    free(lat);
    return 0;
}

/* One full SCAN pass: prints its number of calls, or each key found. */
static int probe_scanpass(redisContext *ctx, const char *pattern,
                          const char *count, bool print_keys)
{
    char cursor[32] = "0";
    long calls = 0;

    do {
        redisReply *r = redisCommand(ctx, "SCAN %s MATCH %s COUNT %s", cursor,
                                     pattern, count);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            fprintf(stderr, "tally-redis-probe: SCAN failed\n");
            freeReplyObject(r);
            return 1;
        }
        snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
        for (size_t i = 0; print_keys && i < r->element[1]->elements; i++)
            printf("%s\n", r->element[1]->element[i]->str);
        freeReplyObject(r);
        calls++;
    } while (strcmp(cursor, "0") != 0);
    if (!print_keys)
        printf("%ld\n", calls);
    return 0;
}

/* What the slow log holds: how long Redis itself was busy with one
 * command (other clients wait that long), whatever the machine's load
 * did to the probe's own GETs. */
static int probe_slowlog(redisContext *ctx)
{
    redisReply *r = redisCommand(ctx, "SLOWLOG GET -1");
    long long over2 = 0, over5 = 0, over10 = 0, max = 0;
    char max_cmd[64] = "-";

    if (!r || r->type != REDIS_REPLY_ARRAY) {
        fprintf(stderr, "tally-redis-probe: SLOWLOG GET failed\n");
        freeReplyObject(r);
        return 1;
    }
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 4 ||
            e->element[2]->type != REDIS_REPLY_INTEGER)
            continue;
        long long us = e->element[2]->integer;
        over2 += us > 2000;
        over5 += us > 5000;
        over10 += us > 10000;
        if (us > max) {
            const redisReply *args = e->element[3];
            max = us;
            snprintf(max_cmd, sizeof(max_cmd), "%s",
                     args->type == REDIS_REPLY_ARRAY && args->elements > 0
                         ? args->element[0]->str
                         : "?");
        }
    }
    printf("over_2ms %lld over_5ms %lld over_10ms %lld max_us %lld (%s)\n",
           over2, over5, over10, max, max_cmd);
    freeReplyObject(r);
    return 0;
}

int main(int argc, char **argv)
{
    redisContext *ctx;
    int rc;

    if (argc == 4 && strcmp(argv[1], "slowlog") == 0) {
        ctx = probe_connect(argv[2], atoi(argv[3]));
        rc = probe_slowlog(ctx);
        redisFree(ctx);
        return rc;
    }
    if ((argc != 6 && !(argc == 7 && strcmp(argv[1], "latency") == 0)) ||
        (strcmp(argv[1], "latency") != 0 && strcmp(argv[1], "scanpass") != 0 &&
         strcmp(argv[1], "keys") != 0)) {
        fputs(PROBE_USAGE, stderr);
        return 2;
    }
    ctx = probe_connect(argv[2], atoi(argv[3]));
    if (strcmp(argv[1], "latency") == 0) {
        signal(SIGTERM, on_term);
        signal(SIGINT, on_term);
        signal(SIGUSR1, on_usr1);
        rc = probe_latency(ctx, argv[4], atol(argv[5]) > 0 ? atol(argv[5]) : 1,
                           argc == 7 ? atol(argv[6]) : 0);
    } else {
        rc =
            probe_scanpass(ctx, argv[4], argv[5], strcmp(argv[1], "keys") == 0);
    }
    redisFree(ctx);
    return rc;
}
