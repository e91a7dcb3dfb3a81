/* FNV-1a over bytes, and the size of an open-addressing table. */
#ifndef TALLY_HASH_H
#define TALLY_HASH_H

#include <stddef.h>
#include <stdint.h>

#define HASH_SEED 0xcbf29ce484222325ULL

static inline uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Slots for `n` entries at most half full: a power of two, at least 16. */
static inline size_t hash_slots(size_t n)
{
    size_t slots = 16;
    while (slots < n * 2)
        slots *= 2;
    return slots;
}

#endif
