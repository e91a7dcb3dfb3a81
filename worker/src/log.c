/* Leveled logging to stderr: one line per event, as text or JSON. */
#include "log.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static log_level_t log_min_level = LOG_LVL_INFO;
static log_format_t log_format = LOG_FMT_TEXT;

static const char *const log_level_names[] = {"debug", "info", "warn",
                                              "error"};
static const char *const log_format_names[] = {"text", "json"};

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

void log_set_format(log_format_t format)
{
    log_format = format;
}

int log_format_parse(const char *name, log_format_t *format)
{
    for (size_t i = 0;
         i < sizeof(log_format_names) / sizeof(*log_format_names); i++) {
        if (strcmp(name, log_format_names[i]) == 0) {
            *format = (log_format_t)i;
            return 0;
        }
    }
    return -1;
}

/* The length of the valid UTF-8 sequence at s (at most `left` bytes), or
 * 0 when it is not one (a stray byte, an overlong form, a surrogate, a
 * sequence cut by truncation). */
static size_t utf8_len(const unsigned char *s, size_t left)
{
    size_t n;
    unsigned int cp;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        n = 2, cp = s[0] & 0x1f;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        n = 3, cp = s[0] & 0x0f;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        n = 4, cp = s[0] & 0x07;
    else
        return 0;
    if (n > left)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return n;
}

/* Appends `msg` to out[*len..size) as the inside of a JSON string:
 * quote, backslash and control characters escaped, invalid UTF-8 as
 * U+FFFD, so that any message (an event's bytes included) stays one
 * valid JSON line. Stops before overflowing; keeps room for the end. */
static void json_escape(char *out, size_t *len, size_t size, const char *msg)
{
    const unsigned char *p = (const unsigned char *)msg;
    size_t o = *len, left = strlen(msg);

    while (left > 0 && o + 12 < size) {
        size_t n = utf8_len(p, left);
        if (n == 0) {
            o += (size_t)snprintf(out + o, size - o, "\\ufffd");
            n = 1;
        } else if (*p == '"' || *p == '\\') {
            out[o++] = '\\';
            out[o++] = (char)*p;
        } else if (*p == '\n') {
            o += (size_t)snprintf(out + o, size - o, "\\n");
        } else if (*p == '\t') {
            o += (size_t)snprintf(out + o, size - o, "\\t");
        } else if (*p == '\r') {
            o += (size_t)snprintf(out + o, size - o, "\\r");
        } else if (*p < 0x20 || *p == 0x7f) {
            o += (size_t)snprintf(out + o, size - o, "\\u%04x", *p);
        } else {
            memcpy(out + o, p, n);
            o += n;
        }
        p += n;
        left -= n;
    }
    *len = o;
}

void log_vmsg(log_level_t level, const char *fmt, va_list ap)
{
    char msg[2048], line[8192], ts[40];
    struct timeval tv;
    struct tm tm;
    size_t len, mlen;

    if (level < log_min_level)
        return;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    len = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + len, sizeof(ts) - len, ".%03dZ", (int)(tv.tv_usec / 1000));
    vsnprintf(msg, sizeof(msg), fmt, ap);
    /* Libraries end some lines with a newline (libmicrohttpd does). */
    mlen = strlen(msg);
    while (mlen > 0 && (msg[mlen - 1] == '\n' || msg[mlen - 1] == '\r'))
        msg[--mlen] = '\0';
    if (log_format == LOG_FMT_JSON) {
        len = (size_t)snprintf(line, sizeof(line),
                               "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"",
                               ts, log_level_names[level]);
        json_escape(line, &len, sizeof(line), msg);
        memcpy(line + len, "\"}\n", 3);
        len += 3;
    } else {
        len = (size_t)snprintf(line, sizeof(line), "%s %-5s %s", ts,
                               log_level_names[level], msg);
        if (len > sizeof(line) - 2)
            len = sizeof(line) - 2;
        line[len++] = '\n';
    }
    /* The whole line with one call, so that lines from different threads
     * do not interleave. */
    fwrite(line, 1, len, stderr);
}

void log_msg(log_level_t level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, fmt, ap);
    va_end(ap);
}
