/* Strict RFC 3339 timestamps: parse to and format from µs since the epoch. */
#include "rfc3339.h"

#include <stdbool.h>

#define US_PER_SEC 1000000LL
#define US_PER_DAY (86400LL * US_PER_SEC)

/* Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
 * days_from_civil): pure integer arithmetic, so the result does not depend
 * on TZ, timegm() or the C library's range. */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static bool is_leap(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30,
                                 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : days[m - 1];
}

/* Reads `n` ASCII digits at s; -1 if any is not a digit. */
static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Fixed layout "YYYY-MM-DDTHH:MM:SS" (19 bytes), then an optional fraction
 * and the offset. Every byte is checked by hand: sscanf() would accept
 * signs, spaces and short fields, strptime() depends on the locale. */
int rfc3339_parse(const char *s, size_t len, int64_t *us)
{
    if (len < 20)
        return -1;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' ||
        s[16] != ':')
        return -1;
    int year = digits(s, 4), mon = digits(s + 5, 2), mday = digits(s + 8, 2);
    int hour = digits(s + 11, 2), min = digits(s + 14, 2);
    int sec = digits(s + 17, 2);
    if (year < 1 || mon < 1 || mon > 12 || mday < 1 ||
        mday > days_in_month(year, mon) || hour < 0 || hour > 23 || min < 0 ||
        min > 59 || sec < 0 || sec > 59)
        return -1;

    size_t i = 19;
    int64_t frac = 0;
    if (s[i] == '.') {
        size_t start = ++i;
        int64_t scale = 100000; /* the first digit is 10^-1 s */
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            frac += (s[i] - '0') * scale; /* digits past µs add 0 */
            scale /= 10;
            i++;
        }
        if (i == start)
            return -1;
    }
    if (i >= len)
        return -1;

    int64_t offset_sec = 0;
    if (s[i] == 'Z') {
        i++;
    } else if (s[i] == '+' || s[i] == '-') {
        if (len - i < 6 || s[i + 3] != ':')
            return -1;
        int oh = digits(s + i + 1, 2), om = digits(s + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return -1;
        offset_sec = (oh * 60 + om) * 60;
        if (s[i] == '-')
            offset_sec = -offset_sec;
        i += 6;
    } else {
        return -1;
    }
    if (i != len)
        return -1;

    int64_t days = days_from_civil(year, mon, mday);
    int64_t secs = days * 86400 + hour * 3600 + min * 60 + sec - offset_sec;
    *us = secs * US_PER_SEC + frac;
    return 0;
}

/* Floor division, so that instants before 1970 fall on the day before. */
int64_t rfc3339_day_of(int64_t us)
{
    int64_t q = us / US_PER_DAY;
    if (us % US_PER_DAY < 0)
        q--;
    return q;
}

/* Inverse of days_from_civil (Hinnant's civil_from_days). Days are clamped
 * to about ±1 million years so that the arithmetic cannot overflow and the
 * year fits an int; every day rfc3339_day_of() returns is in range. */
void rfc3339_civil(int64_t day, int *year, int *month, int *mday)
{
    const int64_t lim = 365250000LL;
    if (day > lim)
        day = lim;
    if (day < -lim)
        day = -lim;
    int64_t z = day + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *mday = (int)(doy - (153 * mp + 2) / 5 + 1);
    *month = m;
    *year = (int)(yoe + era * 400 + (m <= 2));
}

/* Writes v as exactly n digits (v < 10^n); returns the end. */
static char *put_digits(char *p, int64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return p + n;
}

/* Hand-written rather than snprintf(): no locale, no truncation warnings,
 * and it is on the hot path of the log and the dead-letter headers. Years
 * outside 0000-9999 (int64 µs reaches ±292277) get a sign and more digits,
 * at most 31 bytes with the NUL. */
void rfc3339_format(int64_t us, char out[32])
{
    int64_t day = rfc3339_day_of(us);
    int64_t rem = us % US_PER_DAY; /* made 0 <= rem < one day, without */
    if (rem < 0)                   /* day * US_PER_DAY, which overflows */
        rem += US_PER_DAY;         /* for the first day of int64 µs */
    int year, mon, mday;
    rfc3339_civil(day, &year, &mon, &mday);

    char *p = out;
    int64_t y = year;
    if (y < 0) {
        *p++ = '-';
        y = -y;
    }
    int ydigits = 4;
    for (int64_t t = 10000; y >= t && ydigits < 9; t *= 10)
        ydigits++;
    p = put_digits(p, y, ydigits);
    *p++ = '-';
    p = put_digits(p, mon, 2);
    *p++ = '-';
    p = put_digits(p, mday, 2);
    *p++ = 'T';
    int64_t secs = rem / US_PER_SEC;
    p = put_digits(p, secs / 3600, 2);
    *p++ = ':';
    p = put_digits(p, secs / 60 % 60, 2);
    *p++ = ':';
    p = put_digits(p, secs % 60, 2);
    *p++ = '.';
    p = put_digits(p, rem % US_PER_SEC, 6);
    *p++ = 'Z';
    *p = '\0';
}
