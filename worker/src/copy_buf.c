/* A growable byte buffer for COPY ... FROM STDIN rows (text format). */
#include "copy_buf.h"

#include <stdlib.h>
#include <string.h>

void copy_buf_reserve(copy_buf_t *b, size_t more)
{
    size_t cap = b->cap ? b->cap : 4096;
    if (b->len + more <= b->cap)
        return;
    while (cap < b->len + more)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data)
        abort(); /* out of memory: nothing sensible to do in a worker */
    b->cap = cap;
}

void copy_buf_put(copy_buf_t *b, const void *p, size_t n)
{
    if (n == 0)
        return; /* b->data may still be NULL */
    copy_buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void copy_buf_putc(copy_buf_t *b, char c)
{
    copy_buf_reserve(b, 1);
    b->data[b->len++] = c;
}

/* By hand: snprintf() was a good part of building the rows. */
void copy_buf_put_i64(copy_buf_t *b, int64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp);
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;

    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--i] = '-';
    copy_buf_put(b, tmp + i, sizeof(tmp) - i);
}

void copy_buf_put_str(copy_buf_t *b, const char *s, size_t n,
                      bool null_if_empty)
{
    if (n == 0 && null_if_empty) {
        copy_buf_put(b, "\\N", 2);
        return;
    }
    copy_buf_reserve(b, n * 2);
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        char esc = c == '\\' ? '\\'
                   : c == '\t' ? 't'
                   : c == '\n' ? 'n'
                   : c == '\r' ? 'r'
                                : 0;
        if (esc) {
            b->data[b->len++] = '\\';
            c = esc;
        }
        b->data[b->len++] = c;
    }
}

void copy_buf_free(copy_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
