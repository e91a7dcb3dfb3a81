/* Prometheus text endpoint: counters, gauges, histograms, readiness. */
#ifndef TALLY_METRICS_H
#define TALLY_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct metric metric_t;
typedef struct metrics_ready metrics_ready_t;

/* Registers a series (thread-safe).
 * `labels` is NULL or the label set, e.g. "reason=\"too_old\"" (copied
 * when the series is new). Series with one name share its
 * HELP line (the first non-NULL `help`) and are rendered together. Returns
 * a handle that lives until exit; never NULL. */
metric_t *metrics_counter(const char *name, const char *labels,
                          const char *help);
metric_t *metrics_gauge(const char *name, const char *labels,
                        const char *help);

/* A counter kept as an integer and rendered divided by 10^decimals, so
 * that a pipeline adds nanoseconds (decimals 9) or microseconds (6) and
 * Prometheus reads seconds, the base unit: name it *_seconds_total.
 * metric_add() adds integer units; the rendering is exact. */
metric_t *metrics_counter_scaled(const char *name, const char *labels,
                                 const char *help, unsigned decimals);

/* A histogram with the `n` upper bounds `bounds` (strictly increasing,
 * copied; +Inf is implicit). Rendered as name_bucket{le="..."} (cumulative),
 * name_sum and name_count. metric_observe() records one value; lock-free. */
metric_t *metrics_histogram(const char *name, const char *labels,
                            const char *help, const double *bounds,
                            size_t n);

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
void metric_observe(metric_t *m, double value);

/* Readiness: /readyz answers 200 iff at least one check is registered and
 * every registered check is ok; else 503 with the reasons on one line.
 * metrics_readiness() finds or registers the check `name` (copied); a new
 * one starts not ready, reason "starting". metrics_set_ready() may be
 * called from any thread, as often as wanted (it only takes a lock);
 * `reason` (copied, may be NULL when ok) says why not. Each check is also
 * the gauge tally_ready{check="<name>"}. Never NULL. */
metrics_ready_t *metrics_readiness(const char *name);
void metrics_set_ready(metrics_ready_t *r, bool ok, const char *reason);

/* Whether /readyz would answer 200; when not and `reason` is not NULL,
 * the one-line reason goes there (truncated to `size`). */
bool metrics_is_ready(char *reason, size_t size);

/* Parses a listen address: "host:port" with host an IPv4 address,
 * "localhost" (127.0.0.1), "[IPv6]" or empty (every interface, IPv6 and
 * IPv4). Fills `ss` (sockaddr_in or sockaddr_in6; *any_host tells the
 * empty host). 0, or -1 with errstr naming `origin`. */
struct sockaddr_storage;
int metrics_parse_addr(const char *addr, const char *origin,
                       struct sockaddr_storage *ss, bool *any_host,
                       char *errstr, size_t errstr_size);

/* Serves GET /metrics, /healthz and /readyz on `addr` (see
 * metrics_parse_addr) in a background thread; other methods get 405. An
 * empty addr turns it off. 0, or -1 with errstr, which names the setting
 * as `origin` (e.g. "--metrics-addr"). */
int metrics_start(const char *addr, const char *origin, char *errstr,
                  size_t errstr_size);
void metrics_stop(void);

/* Renders all series in the text exposition format (0.0.4) into a buffer
 * of its own (malloc; the caller frees it); *len gets the length. NULL
 * when out of memory. */
char *metrics_render(size_t *len);

#endif
