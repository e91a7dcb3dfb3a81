/* Prometheus text endpoint: counters and gauges, updated lock-free. */
#ifndef TALLY_METRICS_H
#define TALLY_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metric metric_t;

/* Registers a series (thread-safe).
 * `labels` is NULL or the label set, e.g. "reason=\"too_old\"". Series
 * with one name share its HELP line. Returns a handle that lives until
 * exit; never NULL. */
metric_t *metrics_counter(const char *name, const char *labels,
                          const char *help);
metric_t *metrics_gauge(const char *name, const char *labels,
                        const char *help);

/* The series `name` with the one label key=value (value copied), found or
 * registered now; thread-safe, for label values known only at run time
 * (e.g. a data_type). At most `max_values` distinct values per name;
 * beyond that, value "other" is used. Never NULL. */
metric_t *metrics_counter_labeled(const char *name, const char *key,
                                  const char *value, size_t max_values,
                                  const char *help);

void metric_add(metric_t *m, uint64_t n);
void metric_set(metric_t *m, int64_t v);
int64_t metric_get(const metric_t *m);

/* Serves GET /metrics (and /healthz) on "host:port" in a background
 * thread. An empty addr turns it off. 0, or -1 with errstr, which names
 * the setting as `origin` (e.g. "--metrics-addr"). */
int metrics_start(const char *addr, const char *origin, char *errstr,
                  size_t errstr_size);
void metrics_stop(void);

/* Renders all series in the text exposition format into buf; returns the
 * length (truncated to size - 1). */
size_t metrics_render(char *buf, size_t size);

#endif
