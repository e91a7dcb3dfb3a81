/* The sql/ migrations, embedded at build time (see embed_sql.cmake). */
#ifndef TALLY_MIGRATIONS_H
#define TALLY_MIGRATIONS_H

#include <stddef.h>

typedef struct {
    const char *name; /* file name, e.g. "001_schema.sql": its version */
    const char *sql;
} migration_t;

extern const migration_t migrations[];
extern const size_t migrations_count;

#endif
