/* Command-line and environment configuration from one declarative table. */
#include "config.h"

#include <errno.h>

#include "log.h"
#include <stdlib.h>
#include <string.h>

static int config_find(const config_t *cfg, const char *name, size_t len)
{
    for (size_t i = 0; i < cfg->n_defs; i++) {
        if (strlen(cfg->defs[i].name) == len &&
            strncmp(cfg->defs[i].name, name, len) == 0)
            return (int)i;
    }
    return -1;
}

static bool choice_ok(const char *choices, const char *val)
{
    size_t vlen = strlen(val);
    const char *p = choices;

    while (*p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == vlen && strncmp(p, val, len) == 0)
            return true;
        if (!bar)
            break;
        p = bar + 1;
    }
    return false;
}

/* Checks and stores one value; `origin` names it in the error ("--x" or
 * "TALLY_X"). */
static int config_set(config_t *cfg, size_t i, const char *val,
                      const char *origin, const char *from, char *errstr,
                      size_t errstr_size)
{
    const opt_def_t *def = &cfg->defs[i];
    opt_val_t *v = &cfg->vals[i];

    switch (def->type) {
    case OPT_INT: {
        char *end;
        long long n;
        errno = 0;
        n = strtoll(val, &end, 10);
        if (errno || end == val || *end != '\0') {
            snprintf(errstr, errstr_size, "%s: '%s' is not an integer", origin,
                     val);
            return -1;
        }
        if (n < def->min || n > def->max) {
            snprintf(errstr, errstr_size,
                     "%s: %lld is out of range (%lld..%lld)", origin, n,
                     def->min, def->max);
            return -1;
        }
        v->num = n;
        break;
    }
    case OPT_BOOL:
        if (!strcmp(val, "1") || !strcmp(val, "true") || !strcmp(val, "yes"))
            v->num = 1;
        else if (!strcmp(val, "0") || !strcmp(val, "false") ||
                 !strcmp(val, "no") || !strcmp(val, ""))
            v->num = 0;
        else {
            snprintf(errstr, errstr_size,
                     "%s: '%s' is not a boolean (true/false/1/0)", origin, val);
            return -1;
        }
        break;
    case OPT_CHOICE:
        if (!choice_ok(def->choices, val)) {
            snprintf(errstr, errstr_size, "%s: '%s' is not one of %s", origin,
                     val, def->choices);
            return -1;
        }
        break;
    case OPT_STR:
        if (def->min > 0 && strlen(val) < (size_t)def->min) {
            snprintf(errstr, errstr_size, "%s: must not be empty", origin);
            return -1;
        }
        break;
    }
    v->str = val;
    v->set = true;
    v->from = from;
    return 0;
}

static int config_add_x(config_t *cfg, const char *pair, size_t *used,
                        char *errstr, size_t errstr_size)
{
    size_t len = strlen(pair);
    char *copy, *eq;

    if (cfg->n_x >= CONFIG_MAX_X || *used + len + 1 > sizeof(cfg->x_buf)) {
        snprintf(errstr, errstr_size, "-X: too many properties");
        return -1;
    }
    copy = cfg->x_buf + *used;
    memcpy(copy, pair, len + 1);
    *used += len + 1;
    eq = strchr(copy, '=');
    if (!eq || eq == copy) {
        snprintf(errstr, errstr_size, "-X %s: expected key=value (or -X list)",
                 pair);
        return -1;
    }
    *eq = '\0';
    cfg->x_keys[cfg->n_x] = copy;
    cfg->x_vals[cfg->n_x] = eq + 1;
    cfg->n_x++;
    return 0;
}

config_result_t config_parse(config_t *cfg, const char *command,
                             const char *summary, const opt_def_t *defs,
                             size_t n_defs, int argc, char **argv, int max_args,
                             char *errstr, size_t errstr_size)
{
    size_t x_used = 0;
    int i;

    memset(cfg, 0, sizeof(*cfg));
    cfg->command = command;
    cfg->summary = summary;
    cfg->defs = defs;
    cfg->n_defs = n_defs;
    if (n_defs > CONFIG_MAX_OPTS)
        abort();

    /* Defaults, then the environment. */
    for (size_t d = 0; d < n_defs; d++) {
        const char *env = defs[d].env ? getenv(defs[d].env) : NULL;
        if (defs[d].def && config_set(cfg, d, defs[d].def, defs[d].name,
                                      "default", errstr, errstr_size) == -1)
            abort(); /* a bad default is a programming error */
        if (env && config_set(cfg, d, env, defs[d].env, "env", errstr,
                              errstr_size) == -1)
            return CONFIG_USAGE;
    }

    /* Flags. */
    cfg->args = calloc((size_t)argc + 1, sizeof(char *));
    for (i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            config_print_help(cfg, stdout);
            return CONFIG_EXIT_0;
        }
        if (!strcmp(arg, "-X") || !strncmp(arg, "-X", 2)) {
            const char *pair = arg[2] ? arg + 2 : NULL;
            if (!pair) {
                if (i + 1 >= argc) {
                    snprintf(errstr, errstr_size, "-X needs key=value");
                    return CONFIG_USAGE;
                }
                pair = argv[++i];
            }
            if (!strcmp(pair, "list")) {
                rd_kafka_conf_properties_show(stdout);
                return CONFIG_EXIT_0;
            }
            if (config_add_x(cfg, pair, &x_used, errstr, errstr_size) == -1)
                return CONFIG_USAGE;
            continue;
        }
        if (!strcmp(arg, "--")) {
            for (i++; i < argc; i++)
                cfg->args[cfg->n_args++] = argv[i];
            break;
        }
        if (!strncmp(arg, "--", 2)) {
            const char *name = arg + 2;
            const char *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            int d = config_find(cfg, name, len);
            char origin[160];
            const char *val;

            if (d < 0) {
                snprintf(errstr, errstr_size,
                         "unknown flag '%.*s' (see 'tally %s --help')",
                         (int)(len + 2), arg, command);
                return CONFIG_USAGE;
            }
            snprintf(origin, sizeof(origin), "--%s", defs[d].name);
            if (defs[d].type == OPT_BOOL) {
                val = eq ? eq + 1 : "true";
            } else if (eq) {
                val = eq + 1;
            } else {
                if (i + 1 >= argc) {
                    snprintf(errstr, errstr_size, "%s needs a value", origin);
                    return CONFIG_USAGE;
                }
                val = argv[++i];
            }
            if (config_set(cfg, (size_t)d, val, origin, "flag", errstr,
                           errstr_size) == -1)
                return CONFIG_USAGE;
            continue;
        }
        if (arg[0] == '-' && arg[1] != '\0') {
            snprintf(errstr, errstr_size,
                     "unknown flag '%s' (see 'tally %s --help')", arg, command);
            return CONFIG_USAGE;
        }
        cfg->args[cfg->n_args++] = argv[i];
    }
    if (cfg->n_args > max_args) {
        snprintf(errstr, errstr_size, "unexpected argument '%s'",
                 cfg->args[max_args]);
        return CONFIG_USAGE;
    }
    return CONFIG_OK;
}

int config_parse_command(config_t *cfg, const char *command,
                         const char *summary, const opt_def_t *defs,
                         size_t n_defs, int argc, char **argv)
{
    char err[512];
    log_level_t level;
    log_format_t format;

    switch (config_parse(cfg, command, summary, defs, n_defs, argc, argv, 0,
                         err, sizeof(err))) {
    case CONFIG_OK:
        break;
    case CONFIG_EXIT_0:
        return 0;
    case CONFIG_USAGE:
        fprintf(stderr, "tally %s: %s\n", command, err);
        return 2;
    }
    if (config_find(cfg, "log-level", 9) >= 0 &&
        log_level_parse(config_str(cfg, "log-level"), &level) == 0)
        log_set_level(level);
    if (config_find(cfg, "log-format", 10) >= 0 &&
        log_format_parse(config_str(cfg, "log-format"), &format) == 0)
        log_set_format(format);
    return -1;
}

void config_free(config_t *cfg)
{
    free(cfg->args);
    cfg->args = NULL;
}

void config_print_help(const config_t *cfg, FILE *fp)
{
    fprintf(fp, "usage: tally %s [options]\n\n%s\n\noptions:\n", cfg->command,
            cfg->summary);
    for (size_t i = 0; i < cfg->n_defs; i++) {
        const opt_def_t *d = &cfg->defs[i];
        char flag[96];
        if (d->type == OPT_BOOL)
            snprintf(flag, sizeof(flag), "--%s", d->name);
        else
            snprintf(flag, sizeof(flag), "--%s %s", d->name,
                     d->metavar           ? d->metavar
                     : d->type == OPT_INT ? "N"
                                          : "VALUE");
        fprintf(fp, "  %-28s %s\n", flag, d->help);
        if (d->type == OPT_CHOICE)
            fprintf(fp, "  %-28s one of: %s\n", "", d->choices);
        else if (d->type == OPT_INT)
            fprintf(fp, "  %-28s range: %lld..%lld\n", "", d->min, d->max);
        fprintf(fp, "  %-28s default: %s%s%s%s\n", "",
                d->def ? (d->def[0] ? d->def : "(empty)") : "(none)",
                d->env ? "; env " : "", d->env ? d->env : "", "");
    }
    fprintf(fp, "  %-28s %s\n", "-X key=value",
            "librdkafka property for every Kafka client (repeatable)");
    fprintf(fp, "  %-28s %s\n", "-X list", "list librdkafka properties");
    fprintf(fp, "  %-28s %s\n\n", "-h, --help", "show this help");
    fprintf(fp, "Flags win over environment variables. Exit codes: 0 clean "
                "stop, 1 runtime failure,\n2 usage or configuration error.\n");
}

static const opt_val_t *config_val(const config_t *cfg, const char *name)
{
    int i = config_find(cfg, name, strlen(name));
    if (i < 0) {
        fprintf(stderr, "BUG: unknown option '%s'\n", name);
        abort();
    }
    return &cfg->vals[i];
}

const char *config_str(const config_t *cfg, const char *name)
{
    const opt_val_t *v = config_val(cfg, name);
    return v->set ? v->str : NULL;
}

long long config_int(const config_t *cfg, const char *name)
{
    const opt_val_t *v = config_val(cfg, name);
    return v->set ? v->num : 0;
}

bool config_bool(const config_t *cfg, const char *name)
{
    return config_int(cfg, name) != 0;
}

bool config_is_set(const config_t *cfg, const char *name)
{
    int i = config_find(cfg, name, strlen(name));
    if (i < 0)
        abort();
    return cfg->vals[i].from && strcmp(cfg->vals[i].from, "default") != 0;
}

const char *config_origin(const config_t *cfg, const char *name)
{
    static char flag[128];
    int i = config_find(cfg, name, strlen(name));
    if (i < 0)
        abort();
    if (cfg->vals[i].from && !strcmp(cfg->vals[i].from, "env"))
        return cfg->defs[i].env;
    snprintf(flag, sizeof(flag), "--%s", cfg->defs[i].name);
    return flag;
}

int config_kafka_set(rd_kafka_conf_t *conf, const char *key, const char *val,
                     char *errstr, size_t errstr_size)
{
    char err[256];
    if (rd_kafka_conf_set(conf, key, val, err, sizeof(err)) !=
        RD_KAFKA_CONF_OK) {
        snprintf(errstr, errstr_size, "-X %s=%s: %s", key, val, err);
        return -1;
    }
    return 0;
}

int config_apply_x(const config_t *cfg, rd_kafka_conf_t *conf, char *errstr,
                   size_t errstr_size)
{
    for (size_t i = 0; i < cfg->n_x; i++) {
        if (config_kafka_set(conf, cfg->x_keys[i], cfg->x_vals[i], errstr,
                             errstr_size) == -1)
            return -1;
    }
    return 0;
}

int config_kafka_default(const config_t *cfg, rd_kafka_conf_t *conf,
                         const char *key, const char *val, char *errstr,
                         size_t errstr_size)
{
    for (size_t i = 0; i < cfg->n_x; i++) {
        if (!strcmp(cfg->x_keys[i], key))
            return 0;
    }
    return config_kafka_set(conf, key, val, errstr, errstr_size);
}
