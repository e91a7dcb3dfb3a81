/* placeholder, being written */
#include "commands.h"
int worker_main(int argc, char **argv) { (void)argc; (void)argv; return 1; }
int migrate_main(int argc, char **argv) { (void)argc; (void)argv; return 1; }
