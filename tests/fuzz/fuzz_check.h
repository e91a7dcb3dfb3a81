/* What every fuzz target shares: the entry point and the invariant check. */
#ifndef TALLY_FUZZ_CHECK_H
#define TALLY_FUZZ_CHECK_H

#include "json_rules.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* libFuzzer's entry point; replay.c calls it for each file without
 * libFuzzer. Returns 0; a broken invariant abort()s, which both libFuzzer
 * and ctest report with the input that did it. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant: on failure names the condition and aborts. Unlike
 * assert() it stays in release builds. */
#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                          \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* The error buffer the worker hands the decoders (usage_consumer.c,
 * invalidation_consumer.c): messages must fit it whole, as text, since they become
 * the dead-letter header tally.error.message. */
#define FUZZ_ERRSTR_SIZE 512

/* s is NUL-terminated inside its array of `size` bytes. */
static inline void fuzz_check_terminated(const char *s, size_t size)
{
    CHECK(memchr(s, '\0', size) != NULL);
}

/* A rejection's message (err has FUZZ_ERRSTR_SIZE bytes): not empty,
 * whole (never cut by the buffer) and text, as a header value must be. */
static inline void fuzz_check_errstr(const char *err)
{
    fuzz_check_terminated(err, FUZZ_ERRSTR_SIZE);
    size_t n = strlen(err);
    CHECK(n > 0 && n < FUZZ_ERRSTR_SIZE - 1);
    CHECK(json_rules_is_text(err, n));
}

#endif
