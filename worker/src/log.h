/* Leveled logging to stderr: one line per event, as text or JSON. */
#ifndef TALLY_LOG_H
#define TALLY_LOG_H

#include <stdarg.h>

typedef enum {
    LOG_LVL_DEBUG = 0,
    LOG_LVL_INFO,
    LOG_LVL_WARN,
    LOG_LVL_ERROR,
} log_level_t;

typedef enum {
    LOG_FMT_TEXT = 0, /* 2024-05-01T12:00:00.123Z info  message */
    LOG_FMT_JSON,     /* {"ts":"...","level":"info","msg":"message"} */
} log_format_t;

/* Messages below `level` are dropped. Default: LOG_LVL_INFO. */
void log_set_level(log_level_t level);

/* Parses "debug", "info", "warn" or "error"; returns -1 on anything else. */
int log_level_parse(const char *name, log_level_t *level);

/* Default: LOG_FMT_TEXT. Set it at start, before other threads log. */
void log_set_format(log_format_t format);

/* Parses "text" or "json"; returns -1 on anything else. */
int log_format_parse(const char *name, log_format_t *format);

void log_msg(log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void log_vmsg(log_level_t level, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)

#endif
