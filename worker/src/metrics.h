/* Prometheus text endpoint: counters and gauges, updated lock-free. */
#ifndef TALLY_METRICS_H
#define TALLY_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metric metric_t;

/* Registers a series (at start, before metrics_start; not thread-safe).
 * `labels` is NULL or the label set, e.g. "reason=\"too_old\"". Series
 * with one name share its HELP line. Returns a handle that lives until
 * exit; never NULL. */
metric_t *metrics_counter(const char *name, const char *labels,
                          const char *help);
metric_t *metrics_gauge(const char *name, const char *labels,
                        const char *help);

void metric_add(metric_t *m, uint64_t n);
void metric_set(metric_t *m, int64_t v);
int64_t metric_get(const metric_t *m);

/* Serves GET /metrics (and /healthz) on "host:port" in a background
 * thread. An empty addr turns it off. 0, or -1 with errstr. */
int metrics_start(const char *addr, char *errstr, size_t errstr_size);
void metrics_stop(void);

/* Renders all series in the text exposition format into buf; returns the
 * length (truncated to size - 1). */
size_t metrics_render(char *buf, size_t size);

#endif
