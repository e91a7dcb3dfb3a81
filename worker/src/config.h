/* Command-line and environment configuration from one declarative table. */
#ifndef TALLY_CONFIG_H
#define TALLY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include <librdkafka/rdkafka.h>

typedef enum {
    OPT_STR,  /* any text (empty allowed unless min > 0) */
    OPT_INT,  /* decimal integer within [min, max] */
    OPT_BOOL, /* a switch: "--name" sets true; env accepts 1/0/true/false */
    OPT_CHOICE, /* one of the '|'-separated words in `choices` */
} opt_type_t;

/* One row of a command's option table. Flag `--name`, variable `env`. */
typedef struct {
    const char *name;    /* long flag without "--" */
    const char *env;     /* environment variable, or NULL */
    opt_type_t type;
    const char *def;     /* default as text; NULL: unset */
    long long min, max;  /* OPT_INT bounds; OPT_STR: min length when min>0 */
    const char *choices; /* OPT_CHOICE: "a|b|c" */
    const char *metavar; /* shown in --help, e.g. "N" */
    const char *help;
} opt_def_t;

typedef struct {
    const char *str; /* points into argv, environ or the default */
    long long num;   /* OPT_INT value; OPT_BOOL 0/1 */
    bool set;        /* has a value (from flag, env or default) */
    const char *from; /* "flag", "env" or "default" */
} opt_val_t;

#define CONFIG_MAX_OPTS 48
#define CONFIG_MAX_X 64

/* The parsed configuration of one command. */
typedef struct {
    const char *command;  /* e.g. "worker" */
    const char *summary;  /* one line for --help */
    const opt_def_t *defs;
    size_t n_defs;
    opt_val_t vals[CONFIG_MAX_OPTS];
    /* -X key=value pairs, in order, applied to every librdkafka client. */
    const char *x_keys[CONFIG_MAX_X];
    const char *x_vals[CONFIG_MAX_X];
    size_t n_x;
    /* Positional arguments left after the options. */
    char **args;
    int n_args;
    char x_buf[8192]; /* storage for split -X pairs */
} config_t;

typedef enum {
    CONFIG_OK = 0,
    CONFIG_EXIT_0, /* --help or -X list was handled: exit 0 */
    CONFIG_USAGE,  /* usage error: message in errstr, exit 2 */
} config_result_t;

/* Parses argv (after the subcommand name) and the environment against
 * `defs`. Flags win over environment variables, which win over defaults.
 * `max_args` positional arguments are allowed. On CONFIG_USAGE, errstr
 * names the offending flag or variable. --help prints the help itself. */
config_result_t config_parse(config_t *cfg, const char *command,
                             const char *summary, const opt_def_t *defs,
                             size_t n_defs, int argc, char **argv,
                             int max_args, char *errstr, size_t errstr_size);

/* config_parse() for a command's main: prints a usage error as
 * "tally CMD: message", applies --log-level and --log-format when the
 * table has them, and
 * returns -1 to go on, or the exit code (0 after --help, 2 on a usage
 * error). */
int config_parse_command(config_t *cfg, const char *command,
                         const char *summary, const opt_def_t *defs,
                         size_t n_defs, int argc, char **argv);

/* Frees what config_parse allocated. */
void config_free(config_t *cfg);

/* Writes the command's help (every flag, its variable and default). */
void config_print_help(const config_t *cfg, FILE *fp);

/* Lookups by option name; abort() on an unknown name (a programming
 * error, caught by any test that runs the command). */
const char *config_str(const config_t *cfg, const char *name);
long long config_int(const config_t *cfg, const char *name);
bool config_bool(const config_t *cfg, const char *name);

/* True when option `name` was given (flag or environment), not its
 * default. */
bool config_is_set(const config_t *cfg, const char *name);

/* How to name option `name` in a message: "--name", or its environment
 * variable when the value came from there. */
const char *config_origin(const config_t *cfg, const char *name);

/* Applies every -X pair to `conf`. Returns -1 with errstr on an unknown
 * property or bad value. */
int config_apply_x(const config_t *cfg, rd_kafka_conf_t *conf, char *errstr,
                   size_t errstr_size);

/* Sets a librdkafka property, failing with errstr (for our own defaults). */
int config_kafka_set(rd_kafka_conf_t *conf, const char *key, const char *val,
                     char *errstr, size_t errstr_size);

/* Sets a property only if no -X pair overrides it. */
int config_kafka_default(const config_t *cfg, rd_kafka_conf_t *conf,
                         const char *key, const char *val, char *errstr,
                         size_t errstr_size);

#endif
