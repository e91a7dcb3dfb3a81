/* Prometheus text endpoint: counters, gauges, histograms, readiness. */
#include "metrics.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "log.h"

#ifndef TALLY_VERSION
#define TALLY_VERSION "unknown"
#endif

#define METRICS_MAX 1024
#define READY_MAX 16

typedef enum {
    METRIC_COUNTER,
    METRIC_GAUGE,
    METRIC_HISTOGRAM,
} metric_kind_t;

struct metric {
    const char *name;
    const char *labels;
    char *owned_labels; /* its copy of the labels, freed never */
    const char *help;
    metric_kind_t kind;
    unsigned decimals; /* counters: rendered value / 10^decimals */
    atomic_llong value;
    /* Histograms: n_bounds upper bounds, n_bounds + 1 buckets (the last
     * is +Inf), counted per bucket (not cumulative) so that one observe
     * is one increment; the sum is a double's bits, updated by CAS. */
    double *bounds;
    size_t n_bounds;
    atomic_ullong *buckets;
    atomic_ullong sum_bits;
};

struct metrics_ready {
    char name[64];
    bool ok;
    char reason[256];
};

static metric_t metrics[METRICS_MAX];
static size_t n_metrics;
static pthread_mutex_t metrics_lock = PTHREAD_MUTEX_INITIALIZER;
/* Where counts go when the registry is full: counted, never shown. */
static metric_t metrics_overflow = {.name = "overflow"};

static metrics_ready_t readiness[READY_MAX];
static size_t n_readiness;
static pthread_mutex_t readiness_lock = PTHREAD_MUTEX_INITIALIZER;

static struct MHD_Daemon *daemon_handle;

/* ---------------------------------------------------------------- */
/* Registry                                                           */

/* The series `name` with `labels` if registered already (several members
 * of one pipeline share their series), else NULL. Caller holds the lock. */
static metric_t *metrics_find_locked(const char *name, const char *labels,
                                     metric_kind_t kind)
{
    for (size_t i = 0; i < n_metrics; i++) {
        metric_t *m = &metrics[i];
        if (m->kind == kind && !strcmp(m->name, name) &&
            (m->labels ? labels && !strcmp(m->labels, labels) : !labels))
            return m;
    }
    return NULL;
}

static metric_t *metrics_register_locked(const char *name,
                                         const char *labels,
                                         const char *help,
                                         metric_kind_t kind)
{
    metric_t *m = metrics_find_locked(name, labels, kind);
    if (m)
        return m;
    if (n_metrics >= METRICS_MAX)
        abort(); /* a programming error: raise METRICS_MAX */
    m = &metrics[n_metrics];
    m->name = name;
    m->labels = NULL;
    if (labels) {
        m->owned_labels = strdup(labels);
        if (!m->owned_labels)
            abort(); /* at registration: start-up or a new partition */
        m->labels = m->owned_labels;
    }
    m->help = help;
    m->kind = kind;
    atomic_init(&m->value, 0);
    n_metrics++;
    return m;
}

static metric_t *metrics_register(const char *name, const char *labels,
                                  const char *help, metric_kind_t kind)
{
    metric_t *m;
    pthread_mutex_lock(&metrics_lock);
    m = metrics_register_locked(name, labels, help, kind);
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

/* Writes `value` escaped as the text format wants label values
 * (backslash, double quote, newline); truncates to `size`. */
static void metrics_escape_label(char *out, size_t size, const char *value)
{
    size_t o = 0;
    for (const char *p = value; *p && o + 3 < size; p++) {
        if (*p == '\\' || *p == '"') {
            out[o++] = '\\';
            out[o++] = *p;
        } else if (*p == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *p;
        }
    }
    out[o] = '\0';
}

metric_t *metrics_counter_labeled(const char *name, const char *key,
                                  const char *value, size_t max_values,
                                  const char *help)
{
    char labels[300], escaped[260];
    size_t same_name = 0;
    metric_t *m = NULL;

    metrics_escape_label(escaped, sizeof(escaped), value);
    snprintf(labels, sizeof(labels), "%s=\"%s\"", key, escaped);
    pthread_mutex_lock(&metrics_lock);
    for (size_t i = 0; i < n_metrics; i++) {
        if (strcmp(metrics[i].name, name) != 0)
            continue;
        same_name++;
        if (metrics[i].labels && !strcmp(metrics[i].labels, labels)) {
            m = &metrics[i];
            goto out;
        }
    }
    if (same_name >= max_values || n_metrics >= METRICS_MAX - 16) {
        pthread_mutex_unlock(&metrics_lock);
        /* "other" is registered once, below the cap. */
        return strcmp(value, "other") == 0
                   ? &metrics_overflow
                   : metrics_counter_labeled(name, key, "other",
                                             max_values + 1, help);
    }
    m = metrics_register_locked(name, labels, help, METRIC_COUNTER);
out:
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

metric_t *metrics_counter(const char *name, const char *labels,
                          const char *help)
{
    return metrics_register(name, labels, help, METRIC_COUNTER);
}

metric_t *metrics_counter_scaled(const char *name, const char *labels,
                                 const char *help, unsigned decimals)
{
    metric_t *m;
    if (decimals > 18)
        abort(); /* a programming error: 10^decimals must fit */
    pthread_mutex_lock(&metrics_lock);
    m = metrics_register_locked(name, labels, help, METRIC_COUNTER);
    m->decimals = decimals;
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

metric_t *metrics_gauge(const char *name, const char *labels,
                        const char *help)
{
    return metrics_register(name, labels, help, METRIC_GAUGE);
}

metric_t *metrics_histogram(const char *name, const char *labels,
                            const char *help, const double *bounds,
                            size_t n)
{
    double *copy = malloc((n ? n : 1) * sizeof(*copy));
    atomic_ullong *buckets = calloc(n + 1, sizeof(*buckets));
    metric_t *m;

    if (!copy || !buckets)
        abort(); /* at start, a few bytes */
    for (size_t i = 0; i < n; i++) {
        if (isnan(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1]))
            abort(); /* a programming error: bounds must increase */
        copy[i] = bounds[i];
    }
    for (size_t i = 0; i <= n; i++)
        atomic_init(&buckets[i], 0);
    pthread_mutex_lock(&metrics_lock);
    m = metrics_find_locked(name, labels, METRIC_HISTOGRAM);
    if (m) { /* shared by the members of a pipeline */
        pthread_mutex_unlock(&metrics_lock);
        free(copy);
        free(buckets);
        return m;
    }
    m = metrics_register_locked(name, labels, help, METRIC_HISTOGRAM);
    m->bounds = copy;
    m->n_bounds = n;
    m->buckets = buckets;
    atomic_init(&m->sum_bits, 0); /* the bits of 0.0 */
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

void metric_add(metric_t *m, uint64_t n)
{
    atomic_fetch_add_explicit(&m->value, (long long)n, memory_order_relaxed);
}

void metric_set(metric_t *m, int64_t v)
{
    atomic_store_explicit(&m->value, v, memory_order_relaxed);
}

int64_t metric_get(const metric_t *m)
{
    return atomic_load_explicit(&((metric_t *)m)->value,
                                memory_order_relaxed);
}

void metric_observe(metric_t *m, double value)
{
    unsigned long long old_bits, new_bits;
    double sum;
    size_t i = 0;

    if (m->kind != METRIC_HISTOGRAM || isnan(value))
        return;
    while (i < m->n_bounds && value > m->bounds[i])
        i++;
    atomic_fetch_add_explicit(&m->buckets[i], 1, memory_order_relaxed);
    old_bits = atomic_load_explicit(&m->sum_bits, memory_order_relaxed);
    do {
        memcpy(&sum, &old_bits, sizeof(sum));
        sum += value;
        memcpy(&new_bits, &sum, sizeof(sum));
    } while (!atomic_compare_exchange_weak_explicit(
        &m->sum_bits, &old_bits, new_bits, memory_order_relaxed,
        memory_order_relaxed));
}

/* ---------------------------------------------------------------- */
/* Readiness                                                          */

/* Copies `reason` into `out` as one line: control characters become
 * spaces, so that /readyz stays one line whatever an error said. */
static void ready_copy_reason(char *out, size_t size, const char *reason)
{
    size_t o = 0;
    for (const char *p = reason ? reason : ""; *p && o + 1 < size; p++)
        out[o++] = (unsigned char)*p < 0x20 || *p == 0x7f ? ' ' : *p;
    out[o] = '\0';
}

metrics_ready_t *metrics_readiness(const char *name)
{
    metrics_ready_t *r = NULL;
    pthread_mutex_lock(&readiness_lock);
    for (size_t i = 0; i < n_readiness; i++)
        if (!strcmp(readiness[i].name, name))
            r = &readiness[i];
    if (!r) {
        if (n_readiness >= READY_MAX)
            abort(); /* a programming error: raise READY_MAX */
        r = &readiness[n_readiness++];
        snprintf(r->name, sizeof(r->name), "%s", name);
        r->ok = false;
        snprintf(r->reason, sizeof(r->reason), "starting");
    }
    pthread_mutex_unlock(&readiness_lock);
    return r;
}

void metrics_set_ready(metrics_ready_t *r, bool ok, const char *reason)
{
    pthread_mutex_lock(&readiness_lock);
    r->ok = ok;
    ready_copy_reason(r->reason, sizeof(r->reason),
                      ok ? "" : reason && *reason ? reason : "not ready");
    pthread_mutex_unlock(&readiness_lock);
}

bool metrics_is_ready(char *reason, size_t size)
{
    bool ready = true;
    size_t len = 0;

    pthread_mutex_lock(&readiness_lock);
    if (n_readiness == 0) {
        ready = false;
        if (reason)
            len = (size_t)snprintf(reason, size,
                                   "not ready: no pipeline has reported");
    }
    for (size_t i = 0; i < n_readiness; i++) {
        if (readiness[i].ok)
            continue;
        if (reason && len < size)
            len += (size_t)snprintf(reason + len, size - len, "%s%s: %s",
                                    ready ? "not ready: " : "; ",
                                    readiness[i].name, readiness[i].reason);
        ready = false;
    }
    pthread_mutex_unlock(&readiness_lock);
    if (ready && reason && size)
        snprintf(reason, size, "ready");
    return ready;
}

/* ---------------------------------------------------------------- */
/* Rendering                                                          */

typedef struct {
    char *buf;
    size_t len, size;
    bool failed; /* out of memory: the result is dropped */
} render_buf_t;

static void render_printf(render_buf_t *rb, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void render_printf(render_buf_t *rb, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (rb->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(rb->buf + rb->len, rb->size - rb->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            rb->failed = true;
            return;
        }
        if ((size_t)n < rb->size - rb->len) {
            rb->len += (size_t)n;
            return;
        }
        char *bigger = realloc(rb->buf, rb->size * 2 + (size_t)n);
        if (!bigger) {
            rb->failed = true;
            return;
        }
        rb->buf = bigger;
        rb->size = rb->size * 2 + (size_t)n;
    }
}

/* The shortest decimal that reads back as `v` (Go's and Prometheus'
 * habit: le="0.005", not "0.0050000000000000001"). */
static void render_double(char *out, size_t size, double v)
{
    if (isinf(v)) {
        snprintf(out, size, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (isnan(v)) {
        snprintf(out, size, "NaN");
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(out, size, "%.0f", v); /* 10, not 1e+01 */
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, size, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

/* HELP text escaped (backslash, newline) as the format wants. */
static void render_help(render_buf_t *rb, const char *name, const char *help,
                        const char *type)
{
    render_printf(rb, "# HELP %s ", name);
    for (const char *p = help ? help : ""; *p; p++) {
        if (*p == '\\')
            render_printf(rb, "\\\\");
        else if (*p == '\n')
            render_printf(rb, "\\n");
        else
            render_printf(rb, "%c", *p);
    }
    render_printf(rb, "\n# TYPE %s %s\n", name, type);
}

static void render_counter(render_buf_t *rb, const metric_t *m)
{
    long long v = metric_get(m);
    const char *open = m->labels ? "{" : "", *close = m->labels ? "}" : "";
    const char *labels = m->labels ? m->labels : "";
    long long div = 1;

    if (m->decimals == 0) {
        render_printf(rb, "%s%s%s%s %lld\n", m->name, open, labels, close,
                      v);
        return;
    }
    for (unsigned i = 0; i < m->decimals; i++)
        div *= 10;
    render_printf(rb, "%s%s%s%s %s%lld.%0*lld\n", m->name, open, labels,
                  close, v < 0 ? "-" : "", llabs(v / div), (int)m->decimals,
                  llabs(v % div));
}

/* Cumulative buckets from the per-bucket counts; _count is the +Inf
 * bucket, so the two always agree (the sum may lag by an observation). */
static void render_histogram(render_buf_t *rb, const metric_t *m)
{
    const char *labels = m->labels ? m->labels : "";
    const char *sep = m->labels ? "," : "";
    unsigned long long cum = 0, sum_bits;
    char num[40];
    double sum;

    for (size_t i = 0; i <= m->n_bounds; i++) {
        cum += atomic_load_explicit(&m->buckets[i], memory_order_relaxed);
        if (i < m->n_bounds)
            render_double(num, sizeof(num), m->bounds[i]);
        else
            snprintf(num, sizeof(num), "+Inf");
        render_printf(rb, "%s_bucket{%s%sle=\"%s\"} %llu\n", m->name, labels,
                      sep, num, cum);
    }
    sum_bits = atomic_load_explicit(&((metric_t *)m)->sum_bits,
                                    memory_order_relaxed);
    memcpy(&sum, &sum_bits, sizeof(sum));
    render_double(num, sizeof(num), sum);
    render_printf(rb, "%s_sum%s%s%s %s\n", m->name, m->labels ? "{" : "",
                  labels, m->labels ? "}" : "", num);
    render_printf(rb, "%s_count%s%s%s %llu\n", m->name, m->labels ? "{" : "",
                  labels, m->labels ? "}" : "", cum);
}

/* The series that are not in the registry: build info and readiness. */
static void render_fixed(render_buf_t *rb)
{
    char escaped[260];

    render_help(rb, "tally_build_info", "tally's version; always 1",
                "gauge");
    render_printf(rb, "tally_build_info{version=\"%s\"} 1\n", TALLY_VERSION);
    pthread_mutex_lock(&readiness_lock);
    if (n_readiness > 0)
        render_help(rb, "tally_ready",
                    "1 when the check is ready (/readyz is 200 iff all are)",
                    "gauge");
    for (size_t i = 0; i < n_readiness; i++) {
        metrics_escape_label(escaped, sizeof(escaped), readiness[i].name);
        render_printf(rb, "tally_ready{check=\"%s\"} %d\n", escaped,
                      readiness[i].ok ? 1 : 0);
    }
    pthread_mutex_unlock(&readiness_lock);
}

char *metrics_render(size_t *len)
{
    static const char *const types[] = {"counter", "gauge", "histogram"};
    render_buf_t rb = {.buf = malloc(65536), .size = 65536};

    if (!rb.buf)
        return NULL;
    rb.buf[0] = '\0';
    render_fixed(&rb);
    pthread_mutex_lock(&metrics_lock);
    /* One family at a time: its HELP and TYPE once, then every series of
     * that name, whatever order they were registered in. */
    for (size_t i = 0; i < n_metrics; i++) {
        const metric_t *m = &metrics[i];
        const char *help = NULL;
        bool seen = false;

        for (size_t j = 0; j < i && !seen; j++)
            seen = !strcmp(metrics[j].name, m->name);
        if (seen)
            continue;
        for (size_t j = i; j < n_metrics && !help; j++)
            if (!strcmp(metrics[j].name, m->name))
                help = metrics[j].help;
        render_help(&rb, m->name, help, types[m->kind]);
        for (size_t j = i; j < n_metrics; j++) {
            if (strcmp(metrics[j].name, m->name) != 0)
                continue;
            if (metrics[j].kind == METRIC_HISTOGRAM)
                render_histogram(&rb, &metrics[j]);
            else
                render_counter(&rb, &metrics[j]);
        }
    }
    pthread_mutex_unlock(&metrics_lock);
    if (rb.failed) {
        free(rb.buf);
        return NULL;
    }
    *len = rb.len;
    return rb.buf;
}

/* ---------------------------------------------------------------- */
/* HTTP                                                               */

static enum MHD_Result metrics_reply(struct MHD_Connection *conn,
                                     unsigned int status, char *body,
                                     size_t len, const char *type,
                                     bool allow)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;

    /* MUST_FREE: MHD frees `body` with free() when it is sent. */
    resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", type);
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    if (allow)
        MHD_add_response_header(resp, "Allow", "GET, HEAD");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result metrics_text(struct MHD_Connection *conn,
                                    unsigned int status, const char *text,
                                    bool allow)
{
    size_t len = strlen(text);
    char *body = malloc(len + 2);
    if (!body)
        return MHD_NO;
    memcpy(body, text, len);
    body[len++] = '\n';
    body[len] = '\0';
    return metrics_reply(conn, status, body, len,
                         "text/plain; charset=utf-8", allow);
}

/* GET (and HEAD) only: /metrics, /healthz (the process answers),
 * /readyz (every readiness check ok). Anything else is 405 with Allow,
 * answered at once without reading a request body (MHD then closes the
 * connection). */
static enum MHD_Result metrics_answer(void *cls,
                                      struct MHD_Connection *conn,
                                      const char *url, const char *method,
                                      const char *version,
                                      const char *upload_data,
                                      size_t *upload_data_size, void **ptr)
{
    char reason[2048];
    char *body;
    size_t len = 0;

    (void)cls, (void)version, (void)upload_data, (void)upload_data_size,
        (void)ptr;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
        strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return metrics_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                            "method not allowed", true);
    if (!strcmp(url, "/metrics")) {
        body = metrics_render(&len);
        if (!body)
            return MHD_NO;
        return metrics_reply(conn, MHD_HTTP_OK, body, len,
                             "text/plain; version=0.0.4; charset=utf-8",
                             false);
    }
    if (!strcmp(url, "/healthz"))
        return metrics_text(conn, MHD_HTTP_OK, "ok", false);
    if (!strcmp(url, "/readyz")) {
        bool ready = metrics_is_ready(reason, sizeof(reason));
        return metrics_text(conn,
                            ready ? MHD_HTTP_OK
                                  : MHD_HTTP_SERVICE_UNAVAILABLE,
                            reason, false);
    }
    return metrics_text(conn, MHD_HTTP_NOT_FOUND, "not found", false);
}

/* libmicrohttpd's own errors (a failed bind, a broken client), through
 * the program's logger like librdkafka's. */
static void metrics_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    log_vmsg(LOG_LVL_WARN, fmt, ap);
}

int metrics_parse_addr(const char *addr, const char *origin,
                       struct sockaddr_storage *ss, bool *any_host,
                       char *errstr, size_t errstr_size)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    const char *colon, *port_s;
    char host[64];
    size_t host_len;
    long port = 0;
    bool v6 = false;

    memset(ss, 0, sizeof(*ss));
    *any_host = false;
    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (!close || close[1] != ':')
            goto bad;
        v6 = true;
        host_len = (size_t)(close - addr - 1);
        if (host_len == 0 || host_len >= sizeof(host))
            goto bad;
        memcpy(host, addr + 1, host_len);
        port_s = close + 2;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || memchr(addr, ':', (size_t)(colon - addr)))
            goto bad; /* none, or an IPv6 address without brackets */
        host_len = (size_t)(colon - addr);
        if (host_len >= sizeof(host))
            goto bad;
        memcpy(host, addr, host_len);
        port_s = colon + 1;
    }
    host[host_len] = '\0';
    if (!*port_s || strlen(port_s) > 5 ||
        strspn(port_s, "0123456789") != strlen(port_s))
        goto bad;
    port = strtol(port_s, NULL, 10);
    if (port < 1 || port > 65535)
        goto bad;
    if (v6) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            goto bad;
        return 0;
    }
    if (!*host) {
        /* Every interface: IPv6 and IPv4 (dual stack) where there is
         * IPv6, else IPv4; metrics_start decides. */
        *any_host = true;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_addr = in6addr_any;
        return 0;
    }
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, !strcmp(host, "localhost") ? "127.0.0.1" : host,
                  &sin->sin_addr) != 1)
        goto bad;
    return 0;
bad:
    snprintf(errstr, errstr_size,
             "%s: '%s' is not IPV4:PORT, [IPV6]:PORT, localhost:PORT or "
             ":PORT (port 1..65535)",
             origin, addr);
    return -1;
}

static struct MHD_Daemon *metrics_listen(const struct sockaddr_storage *ss)
{
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    uint16_t port;

    if (ss->ss_family == AF_INET6) {
        flags |= IN6_IS_ADDR_UNSPECIFIED(
                     &((const struct sockaddr_in6 *)ss)->sin6_addr)
                     ? MHD_USE_DUAL_STACK
                     : MHD_USE_IPv6;
        port = ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    } else {
        port = ntohs(((const struct sockaddr_in *)ss)->sin_port);
    }
    /* The logger first: MHD warns about options before it otherwise. */
    return MHD_start_daemon(
        flags, port, NULL, NULL, metrics_answer, NULL,
        MHD_OPTION_EXTERNAL_LOGGER, metrics_mhd_log, NULL,
        MHD_OPTION_SOCK_ADDR, (const struct sockaddr *)ss,
        MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_CONNECTION_LIMIT, 64u,
        MHD_OPTION_END);
}

int metrics_start(const char *addr, const char *origin, char *errstr,
                  size_t errstr_size)
{
    struct sockaddr_storage ss;
    bool any_host;

    if (!addr || !*addr)
        return 0;
    if (metrics_parse_addr(addr, origin, &ss, &any_host, errstr,
                           errstr_size) == -1)
        return -1;
    daemon_handle = metrics_listen(&ss);
    if (!daemon_handle && any_host) {
        /* No IPv6 here (a container without it): IPv4 only. */
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        uint16_t port = ((struct sockaddr_in6 *)&ss)->sin6_port;
        memset(&ss, 0, sizeof(ss));
        sin->sin_family = AF_INET;
        sin->sin_port = port;
        sin->sin_addr.s_addr = htonl(INADDR_ANY);
        daemon_handle = metrics_listen(&ss);
    }
    if (!daemon_handle) {
        snprintf(errstr, errstr_size,
                 "%s: cannot listen on %s (in use, or no such address?)",
                 origin, addr);
        return -1;
    }
    return 0;
}

void metrics_stop(void)
{
    if (daemon_handle) {
        MHD_stop_daemon(daemon_handle);
        daemon_handle = NULL;
    }
}
