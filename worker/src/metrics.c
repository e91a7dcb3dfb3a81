/* Prometheus text endpoint: counters and gauges, updated lock-free. */
#include "metrics.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <microhttpd.h>

#define METRICS_MAX 1024

struct metric {
    const char *name;
    const char *labels;
    char *owned_labels; /* labels of a run-time series, freed never */
    const char *help;
    bool gauge;
    atomic_llong value;
};

static metric_t metrics[METRICS_MAX];
static size_t n_metrics;
static pthread_mutex_t metrics_lock = PTHREAD_MUTEX_INITIALIZER;
/* Where counts go when the registry is full: counted, never shown. */
static metric_t metrics_overflow = {.name = "overflow"};
static struct MHD_Daemon *daemon_handle;

static metric_t *metrics_register_locked(const char *name,
                                         const char *labels,
                                         const char *help, bool gauge)
{
    metric_t *m;
    if (n_metrics >= METRICS_MAX)
        abort(); /* a programming error: raise METRICS_MAX */
    m = &metrics[n_metrics];
    m->name = name;
    m->labels = labels;
    m->help = help;
    m->gauge = gauge;
    atomic_init(&m->value, 0);
    n_metrics++;
    return m;
}

static metric_t *metrics_register(const char *name, const char *labels,
                                  const char *help, bool gauge)
{
    metric_t *m;
    pthread_mutex_lock(&metrics_lock);
    m = metrics_register_locked(name, labels, help, gauge);
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

metric_t *metrics_counter_labeled(const char *name, const char *key,
                                  const char *value, size_t max_values,
                                  const char *help)
{
    char labels[256];
    size_t same_name = 0;
    metric_t *m = NULL;

    snprintf(labels, sizeof(labels), "%s=\"%s\"", key, value);
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
    m = metrics_register_locked(name, NULL, help, false);
    m->owned_labels = strdup(labels);
    m->labels = m->owned_labels;
out:
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

metric_t *metrics_counter(const char *name, const char *labels,
                          const char *help)
{
    return metrics_register(name, labels, help, false);
}

metric_t *metrics_gauge(const char *name, const char *labels,
                        const char *help)
{
    return metrics_register(name, labels, help, true);
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

size_t metrics_render(char *buf, size_t size)
{
    size_t len = 0;
    pthread_mutex_lock(&metrics_lock);
    for (size_t i = 0; i < n_metrics && len < size; i++) {
        const metric_t *m = &metrics[i];
        bool first = true;
        for (size_t j = 0; j < i; j++)
            if (!strcmp(metrics[j].name, m->name))
                first = false;
        if (first)
            len += (size_t)snprintf(buf + len, size - len,
                                    "# HELP %s %s\n# TYPE %s %s\n", m->name,
                                    m->help, m->name,
                                    m->gauge ? "gauge" : "counter");
        if (len >= size)
            break;
        len += (size_t)snprintf(buf + len, size - len, "%s%s%s%s %lld\n",
                                m->name, m->labels ? "{" : "",
                                m->labels ? m->labels : "",
                                m->labels ? "}" : "", (long long)metric_get(m));
    }
    pthread_mutex_unlock(&metrics_lock);
    return len < size ? len : size - 1;
}

static enum MHD_Result metrics_answer(void *cls,
                                      struct MHD_Connection *conn,
                                      const char *url, const char *method,
                                      const char *version,
                                      const char *upload_data,
                                      size_t *upload_data_size, void **ptr)
{
    static char body[262144];
    struct MHD_Response *resp;
    enum MHD_Result ret;
    unsigned int status = MHD_HTTP_OK;
    size_t len;

    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return MHD_NO;
    /* One thread serves (MHD_USE_INTERNAL_POLLING_THREAD), so the static
     * buffer is not shared. */
    if (!strcmp(url, "/metrics")) {
        len = metrics_render(body, sizeof(body));
    } else if (!strcmp(url, "/healthz")) {
        len = (size_t)snprintf(body, sizeof(body), "ok\n");
    } else {
        len = (size_t)snprintf(body, sizeof(body), "not found\n");
        status = MHD_HTTP_NOT_FOUND;
    }
    resp = MHD_create_response_from_buffer(len, body,
                                           MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(resp, "Content-Type",
                            "text/plain; version=0.0.4");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

int metrics_start(const char *addr, const char *origin, char *errstr,
                  size_t errstr_size)
{
    struct sockaddr_in sin;
    char host[64];
    const char *colon;
    long port;

    if (!addr || !*addr)
        return 0;
    colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof(host)) {
        snprintf(errstr, errstr_size,
                 "%s: '%s' is not host:port", origin, addr);
        return -1;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    port = strtol(colon + 1, NULL, 10);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    if (port < 0 || port > 65535 ||
        inet_pton(AF_INET, !strcmp(host, "localhost") || !*host
                               ? "127.0.0.1"
                               : host,
                  &sin.sin_addr) != 1) {
        snprintf(errstr, errstr_size,
                 "%s: '%s' is not an IPv4 host:port", origin, addr);
        return -1;
    }
    daemon_handle = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, (uint16_t)port,
        NULL, NULL, metrics_answer, NULL, MHD_OPTION_SOCK_ADDR, &sin,
        MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (!daemon_handle) {
        snprintf(errstr, errstr_size,
                 "%s: cannot listen on %s (in use?)", origin, addr);
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
