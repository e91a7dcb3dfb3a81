/* A growable byte buffer for COPY ... FROM STDIN rows (text format). */
#ifndef TALLY_COPY_BUF_H
#define TALLY_COPY_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char *data;
    size_t len, cap;
} copy_buf_t;

/* Room for `more` bytes; aborts when memory runs out (a worker has
 * nothing sensible to do then). */
void copy_buf_reserve(copy_buf_t *b, size_t more);
void copy_buf_put(copy_buf_t *b, const void *p, size_t n);
void copy_buf_putc(copy_buf_t *b, char c);
void copy_buf_put_i64(copy_buf_t *b, int64_t v);

/* Appends a string in COPY text format: backslash, tab, newline and
 * carriage return escaped; "" becomes NULL (\N) when null_if_empty. */
void copy_buf_put_str(copy_buf_t *b, const char *s, size_t n,
                      bool null_if_empty);

void copy_buf_free(copy_buf_t *b);

#endif
