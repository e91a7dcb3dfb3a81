/* Strict RFC 3339 timestamps as the contract defines them. */
#ifndef TALLY_RFC3339_H
#define TALLY_RFC3339_H

#include <stddef.h>
#include <stdint.h>

/* Parses YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM): upper-case T and
 * Z, a real calendar date (leap years), hours 00-23, minutes and seconds
 * 00-59 (no leap second), offset hours 00-23 and minutes 00-59, at least one
 * fraction digit when there is a '.', fraction truncated to microseconds.
 * Years 0001-9999. Stores µs since 1970-01-01T00:00:00Z in *us. Returns 0,
 * or -1 on anything else (nothing before or after the timestamp). */
int rfc3339_parse(const char *s, size_t len, int64_t *us);

/* Formats µs since the epoch as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (28 bytes
 * with the NUL). */
void rfc3339_format(int64_t us, char out[32]);

/* Days since 1970-01-01 of a UTC instant (floor), and the civil date of a
 * day number. */
int64_t rfc3339_day_of(int64_t us);
void rfc3339_civil(int64_t day, int *year, int *month, int *mday);

#endif
