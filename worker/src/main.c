/* tally: subcommand dispatch. */
#include <stdio.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "commands.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command_t;

static const command_t commands[] = {
    {"worker", worker_main,
     "consume token-usage events and keep exact sums in Postgres"},
    {"produce", produce_main,
     "send JSON lines from stdin or a file to a topic"},
    {"devbroker", devbroker_main,
     "run a local Kafka-protocol broker (librdkafka mock cluster)"},
    {"migrate", migrate_main, "apply the sql/ migrations to Postgres"},
    {"offsets", offsets_main,
     "show or reset a group's positions (Postgres and Kafka)"},
    {"reconcile", reconcile_main,
     "check (and --fix) the sums against the counted events"},
};

#define N_COMMANDS (sizeof(commands) / sizeof(*commands))

static void usage(FILE *fp)
{
    fprintf(fp, "usage: tally <command> [options]\n\n"
                "Counts LLM and embedding token usage from Kafka, exactly "
                "once.\n\ncommands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(fp, "  %-11s %s\n", commands[i].name, commands[i].summary);
    fprintf(fp, "  %-11s %s\n", "help CMD", "show a command's options");
    fprintf(fp, "  %-11s %s\n", "version", "print the version");
    fprintf(fp, "\nSee 'tally help <command>' or 'tally <command> --help'.\n");
}

static const command_t *command_find(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (!strcmp(commands[i].name, name))
            return &commands[i];
    return NULL;
}

int main(int argc, char **argv)
{
    const command_t *cmd;

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("tally %s (librdkafka %s)\n", TALLY_VERSION,
               rd_kafka_version_str());
        return 0;
    }
    if (!strcmp(argv[1], "help")) {
        char *help_argv[] = {"--help", NULL};
        if (argc < 3) {
            usage(stdout);
            return 0;
        }
        cmd = command_find(argv[2]);
        if (!cmd) {
            fprintf(stderr, "tally: unknown command '%s'\n", argv[2]);
            return 2;
        }
        return cmd->run(1, help_argv);
    }
    cmd = command_find(argv[1]);
    if (!cmd) {
        fprintf(stderr, "tally: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        return 2;
    }
    return cmd->run(argc - 2, argv + 2);
}
