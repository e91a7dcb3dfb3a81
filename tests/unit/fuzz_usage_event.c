/* libFuzzer target for usage_event_parse; without libFuzzer, replays files. */
#include "case_ctx.h"
#include "rfc3339.h"
#include "json_rules.h"
#include "usage_event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "invariant failed: %s (line %d)\n", #cond,         \
                    __LINE__);                                                 \
            abort();                                                           \
        }                                                                      \
    } while (0)

static void check_string(const char *s, size_t size)
{
    CHECK(memchr(s, '\0', size) != NULL);
}

/* Parses the input with the fixed test context and checks what must hold
 * for any bytes: a known reason with a message, or an event whose fields
 * obey the contract and whose metadata lies inside the input. Inputs that
 * happen to be timestamps also go through a format/parse round trip. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static usage_enum_t tt, op;
    usage_parse_ctx_t ctx;
    usage_event_t ev, again;
    char err[256];
    const char *buf = (const char *)data;

    case_ctx_init(&ctx, &tt, &op);
    usage_reason_t r =
        usage_event_parse(buf, size, &ctx, &ev, err, sizeof(err));
    CHECK((unsigned)r < USAGE_ERR__COUNT);
    CHECK(strcmp(usage_reason_code(r), "unknown") != 0);
    check_string(err, sizeof(err));
    if (r != USAGE_OK) {
        CHECK(err[0] != '\0');
    } else {
        check_string(ev.tenant_id, sizeof(ev.tenant_id));
        CHECK(usage_is_id(ev.tenant_id, strlen(ev.tenant_id)));
        CHECK(ev.idempotency_key[0] != '\0');
        CHECK(ev.key_implicit ==
              (strncmp(ev.idempotency_key, "kafka:", 6) == 0));
        CHECK(ev.tokens >= 0 && ev.tokens <= USAGE_TOKENS_MAX);
        CHECK(ev.cached_tokens >= 0 && ev.cached_tokens <= USAGE_TOKENS_MAX);
        CHECK(usage_enum_contains(&tt, ev.token_type));
        CHECK(usage_enum_contains(&op, ev.operation));
        CHECK(json_rules_is_text(ev.model, strlen(ev.model)));
        CHECK(ev.occurred_at_us >= CASE_NOW_US - 35LL * 86400000000LL);
        CHECK(ev.occurred_at_us <= CASE_NOW_US + 3600000000LL);
        if (ev.metadata) {
            CHECK(ev.metadata >= buf && ev.metadata_len >= 2 &&
                  ev.metadata_len <= USAGE_METADATA_MAX &&
                  ev.metadata + ev.metadata_len <= buf + size);
            CHECK(ev.metadata[0] == '{' &&
                  ev.metadata[ev.metadata_len - 1] == '}');
        } else {
            CHECK(ev.metadata_len == 0);
        }
        CHECK(usage_event_parse(buf, size, &ctx, &again, err, sizeof(err)) ==
              USAGE_OK);
        CHECK(again.payload_hash == ev.payload_hash);
    }

    int64_t us;
    if (rfc3339_parse(buf, size, &us) == 0) {
        char text[32];
        int64_t back;
        rfc3339_format(us, text);
        CHECK(rfc3339_parse(text, strlen(text), &back) == 0 && back == us);
    }
    return 0;
}

#ifndef TALLY_LIBFUZZER
/* usage_event_replay FILE...: runs every file through the fuzz entry. */
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 1;
        }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        rewind(f);
        uint8_t *data = malloc(n > 0 ? (size_t)n : 1);
        if (!data || n < 0 || fread(data, 1, (size_t)n, f) != (size_t)n) {
            fprintf(stderr, "%s: read failed\n", argv[i]);
            free(data);
            fclose(f);
            return 1;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(data, (size_t)n);
        free(data);
    }
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
#endif
