/* One data-driven case folder: its files and the common checks. */
#ifndef TALLY_TEST_CASE_DIR_H
#define TALLY_TEST_CASE_DIR_H

#include <stddef.h>
#include <stdio.h>

/* A case directory holds input.json (the message, exact bytes), expected
 * ("ok" or a reason code) and, optionally, expected_fields and ctx; each
 * runner documents what they mean for its event kind. */
typedef struct {
    const char *dir;
    char *input; /* exactly input_len bytes, nothing after them */
    size_t input_len;
    char *expected; /* the text files: NULL when absent */
    char *fields;
    char *ctx;
} case_dir_t;

/* Reads the case named by argv[1]. Returns 0, or 2 (exit status of a
 * malformed case) with a message on stderr; case_dir_close() either way. */
int case_dir_open(case_dir_t *c, int argc, char **argv);

/* Prints the outcome; 0 if got (a reason code) is what `expected` says,
 * else 1. err is the parser's message, printed when got is not "ok". */
int case_dir_check_reason(const case_dir_t *c, const char *got,
                          const char *err);

/* Prints the dump of a parsed event (dump() writes "\nname=value\n"
 * lines) and checks that every line of expected_fields is one of them:
 * 0, 1 on a mismatch, 2 if it could not dump. Splits c->fields. */
int case_dir_check_fields(const case_dir_t *c,
                          void (*dump)(FILE *f, const void *event),
                          const void *event);

/* Prints PASS or FAIL, frees c and returns rc (the exit status). */
int case_dir_close(case_dir_t *c, int rc);

/* Reads dir/name into a buffer of exactly its size (so that ASan sees
 * any read past it); NULL if it does not exist. Exits 2 on read errors. */
char *case_dir_read(const char *dir, const char *name, size_t *len);

/* The same file as a NUL-terminated string without trailing whitespace. */
char *case_dir_read_text(const char *dir, const char *name);

/* Splits text in place into lines without '\r', skipping blank lines
 * and "#" comments; returns the next line or NULL. */
char *case_dir_next_line(char **cursor);

#endif
