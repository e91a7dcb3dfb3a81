/* One data-driven case folder: its files and the common checks. */
#include "case_dir.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

char *case_dir_read(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    char *buf = NULL;
    long size;
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "rb");
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0)
        goto fail;
    buf = malloc(size > 0 ? (size_t)size : 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size)
        goto fail;
    fclose(f);
    *len = (size_t)size;
    return buf;
fail:
    fprintf(stderr, "cannot read %s\n", path);
    exit(2);
}

char *case_dir_read_text(const char *dir, const char *name)
{
    size_t n;
    char *raw = case_dir_read(dir, name, &n);
    if (!raw)
        return NULL;
    char *s = malloc(n + 1);
    if (!s)
        exit(2);
    memcpy(s, raw, n);
    free(raw);
    while (n > 0 && strchr("\n\r\t ", s[n - 1]))
        n--;
    s[n] = '\0';
    return s;
}

char *case_dir_next_line(char **cursor)
{
    char *line;
    do {
        line = *cursor;
        if (!line || !*line)
            return NULL;
        char *nl = strchr(line, '\n');
        if (nl) {
            *nl = '\0';
            *cursor = nl + 1;
        } else {
            *cursor = line + strlen(line);
        }
        size_t n = strlen(line);
        while (n > 0 && line[n - 1] == '\r')
            line[--n] = '\0';
    } while (line[0] == '\0' || line[0] == '#');
    return line;
}

int case_dir_open(case_dir_t *c, int argc, char **argv)
{
    memset(c, 0, sizeof(*c));
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASE-DIR\n", argv[0]);
        return 2;
    }
    c->dir = argv[1];
    c->input = case_dir_read(c->dir, "input.json", &c->input_len);
    c->expected = case_dir_read_text(c->dir, "expected");
    c->fields = case_dir_read_text(c->dir, "expected_fields");
    c->ctx = case_dir_read_text(c->dir, "ctx");
    if (!c->input || !c->expected) {
        fprintf(stderr, "%s: needs input.json and expected\n", c->dir);
        return 2;
    }
    return 0;
}

int case_dir_check_reason(const case_dir_t *c, const char *got, const char *err)
{
    bool ok = strcmp(got, "ok") == 0;
    printf("input: %zu bytes\nexpected: %s\ngot: %s%s%s\n", c->input_len,
           c->expected, got, ok ? "" : ": ", ok ? "" : err);
    return strcmp(got, c->expected) == 0 ? 0 : 1;
}

/* Every line of `expected` must be a line of `dumped`. */
static int check_lines(char *expected, const char *dumped)
{
    char *cursor = expected, *line;
    int bad = 0;
    while ((line = case_dir_next_line(&cursor))) {
        size_t n = strlen(line) + 3;
        char *want = malloc(n);
        if (!want)
            exit(2);
        snprintf(want, n, "\n%s\n", line);
        if (!strstr(dumped, want)) {
            printf("MISMATCH: expected field line %s\n", line);
            bad = 1;
        }
        free(want);
    }
    return bad;
}

int case_dir_check_fields(const case_dir_t *c,
                          void (*dump)(FILE *f, const void *event),
                          const void *event)
{
    char *dumped = NULL;
    size_t dumped_len = 0;
    int rc = 0;
    FILE *f = open_memstream(&dumped, &dumped_len);
    if (!f)
        return 2;
    dump(f, event);
    fclose(f);
    fputs(dumped, stdout);
    if (c->fields && check_lines(c->fields, dumped))
        rc = 1;
    free(dumped);
    return rc;
}

int case_dir_close(case_dir_t *c, int rc)
{
    printf("%s\n", rc == 0 ? "PASS" : "FAIL");
    free(c->input);
    free(c->expected);
    free(c->fields);
    free(c->ctx);
    return rc;
}
