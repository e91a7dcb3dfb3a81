/* Replays files through a fuzz target's entry point: the ctest build. */
#include "fuzz_check.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Without libFuzzer, each target links this main():
 *   <target>_replay PATH...
 * runs every file named, and every regular file under every directory
 * named (recursively, in name order), through LLVMFuzzerTestOneInput()
 * once. Each input is in a heap buffer of exactly its size, so that
 * ASan sees a read past its end. Exit status 0, or 1 if a path cannot be
 * read (an invariant failure aborts). */

static int replay_file(const char *path, int *count)
{
    FILE *f = fopen(path, "rb");
    uint8_t *data = NULL;
    long n;
    int rc = 1;

    if (!f) {
        perror(path);
        return 1;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0)
        goto out;
    data = malloc(n > 0 ? (size_t)n : 1);
    if (!data || fread(data, 1, (size_t)n, f) != (size_t)n)
        goto out;
    LLVMFuzzerTestOneInput(data, (size_t)n);
    (*count)++;
    rc = 0;
out:
    if (rc != 0)
        fprintf(stderr, "%s: read failed\n", path);
    free(data);
    fclose(f);
    return rc;
}

static int replay_path(const char *path, int *count)
{
    struct stat st;
    struct dirent **names;
    int n, rc = 0;

    if (stat(path, &st) != 0) {
        perror(path);
        return 1;
    }
    if (!S_ISDIR(st.st_mode))
        return replay_file(path, count);
    n = scandir(path, &names, NULL, alphasort);
    if (n < 0) {
        perror(path);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        if (name[0] != '.') {
            size_t len = strlen(path) + strlen(name) + 2;
            char *sub = malloc(len);
            if (!sub) {
                rc = 1;
            } else {
                snprintf(sub, len, "%s/%s", path, name);
                if (replay_path(sub, count) != 0)
                    rc = 1;
                free(sub);
            }
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    int count = 0, rc = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++)
        if (replay_path(argv[i], &count) != 0)
            rc = 1;
    printf("replayed %d inputs\n", count);
    return rc;
}
