/* Leveled logging to stderr: one line per event, with a timestamp. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static log_level_t log_min_level = LOG_LVL_INFO;

static const char *const log_level_names[] = {"debug", "info", "warn",
                                              "error"};

void log_set_level(log_level_t level)
{
    log_min_level = level;
}

int log_level_parse(const char *name, log_level_t *level)
{
    for (size_t i = 0; i < sizeof(log_level_names) / sizeof(*log_level_names);
         i++) {
        if (strcmp(name, log_level_names[i]) == 0) {
            *level = (log_level_t)i;
            return 0;
        }
    }
    return -1;
}

/* Builds the whole line first and writes it with one call, so that lines
 * from different threads do not interleave. */
void log_msg(log_level_t level, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t len;
    va_list ap;

    if (level < log_min_level)
        return;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    len = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    len += (size_t)snprintf(line + len, sizeof(line) - len, ".%03dZ %-5s ",
                            (int)(tv.tv_usec / 1000), log_level_names[level]);
    va_start(ap, fmt);
    vsnprintf(line + len, sizeof(line) - len, fmt, ap);
    va_end(ap);
    len = strlen(line);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}
