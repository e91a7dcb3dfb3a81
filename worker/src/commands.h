/* Entry points of the tally subcommands (argv starts after the name). */
#ifndef TALLY_COMMANDS_H
#define TALLY_COMMANDS_H

int worker_main(int argc, char **argv);
int produce_main(int argc, char **argv);
int devbroker_main(int argc, char **argv);
int migrate_main(int argc, char **argv);
int offsets_main(int argc, char **argv);   /* offsets.c */
int reconcile_main(int argc, char **argv); /* reconcile.c */

#endif
