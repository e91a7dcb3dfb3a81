/* placeholder, being written */
#include "commands.h"
int devbroker_main(int argc, char **argv) { (void)argc; (void)argv; return 1; }
