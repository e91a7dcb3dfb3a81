/* Leveled logging to stderr: one line per event, with a timestamp. */
#ifndef TALLY_LOG_H
#define TALLY_LOG_H

typedef enum {
    LOG_LVL_DEBUG = 0,
    LOG_LVL_INFO,
    LOG_LVL_WARN,
    LOG_LVL_ERROR,
} log_level_t;

/* Messages below `level` are dropped. Default: LOG_LVL_INFO. */
void log_set_level(log_level_t level);

/* Parses "debug", "info", "warn" or "error"; returns -1 on anything else. */
int log_level_parse(const char *name, log_level_t *level);

void log_msg(log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)

#endif
