/* tally-gen: deterministic token-usage JSON lines and their exact sums. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------ */
/* Vocabulary                                                          */
/* ------------------------------------------------------------------ */

#define GEN_NONE 0xff /* no model / no agent */
#define GEN_DAY 86400
#define GEN_MAX_AGE_DAYS 30 /* oldest valid occurred_at, before --now */
#define GEN_RECENT_DAYS 2   /* where 90% of the events fall */
#define GEN_DAYS (GEN_MAX_AGE_DAYS + 2) /* day slots of the expectation */

enum { TT_LLM, TT_EMBEDDING };

static const char *const gen_token_types[] = {"llm", "embedding"};

static const struct {
    const char *name;
    int token_type;
    unsigned weight; /* out of the sum of weights */
} gen_ops[] = {
    {"chat", TT_LLM, 45},          {"query", TT_LLM, 20},
    {"vector_search", TT_EMBEDDING, 15},
    {"embedding", TT_EMBEDDING, 10}, {"ingestion", TT_EMBEDDING, 10},
};
#define GEN_N_OPS (sizeof(gen_ops) / sizeof(*gen_ops))

static const struct {
    const char *name;
    int token_type;
    bool thinks;     /* reports thoughts_tokens */
    unsigned weight; /* among the models of its token type */
} gen_models[] = {
    {"gpt-4o", TT_LLM, false, 30},
    {"gpt-4o-mini", TT_LLM, false, 35},
    {"o3-mini", TT_LLM, true, 6},
    {"claude-sonnet-4", TT_LLM, false, 15},
    {"claude-3-5-haiku", TT_LLM, false, 8},
    {"gemini-2.0-flash", TT_LLM, true, 4},
    {"llama-3.1-70b-instruct", TT_LLM, false, 2},
    {"text-embedding-3-small", TT_EMBEDDING, false, 70},
    {"text-embedding-3-large", TT_EMBEDDING, false, 20},
    {"voyage-3", TT_EMBEDDING, false, 10},
};
#define GEN_N_MODELS (sizeof(gen_models) / sizeof(*gen_models))

static const char *const gen_agents[] = {
    "support-bot", "sales-assistant", "code-helper",
    "research-agent", "onboarding", "triage",
};
#define GEN_N_AGENTS (sizeof(gen_agents) / sizeof(*gen_agents))

static const int gen_offsets_min[] = {120, -300, 330, 60, -420, 545};
#define GEN_N_OFFSETS (sizeof(gen_offsets_min) / sizeof(*gen_offsets_min))

/* Kinds of invalid lines, each rejected by the contract's rules. */
typedef enum {
    BAD_TRUNCATED,       /* not JSON */
    BAD_NOT_OBJECT,      /* a JSON array */
    BAD_TOKENS_STRING,   /* "tokens": "12" */
    BAD_TOKENS_NEGATIVE, /* "tokens": -5 */
    BAD_TOKENS_FRACTION, /* "tokens": 1.0 */
    BAD_TOKENS_EXPONENT, /* "tokens": 1e3 */
    BAD_TOKENS_HUGE,     /* over 10^12 */
    BAD_TOKENS_MISSING,
    BAD_TOKEN_TYPE,      /* unknown enum value */
    BAD_OPERATION,       /* unknown enum value */
    BAD_TENANT_SPACE,    /* fails the id pattern */
    BAD_TENANT_LONG,     /* 129 bytes */
    BAD_TENANT_MISSING,
    BAD_TOO_OLD,         /* 40 days before --now */
    BAD_FUTURE,          /* 3 days after --now */
    BAD_TIMESTAMP,       /* February 30th */
    BAD_SCHEMA_VERSION,  /* 2 */
    BAD_RESERVED_KEY,    /* kafka:... */
    BAD_DUP_MEMBER,      /* tenant_id twice */
    BAD_MODEL_CONTROL,   /* a control character in model */
    BAD__COUNT,
    BAD_NONE = -1,
} gen_bad_t;

/* ------------------------------------------------------------------ */
/* Random numbers: splitmix64, one stream for the line kinds and one    */
/* derived from (seed, n) per event, so that event n can be rebuilt     */
/* byte for byte when the generator re-sends it.                        */
/* ------------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

static uint64_t rng_below(uint64_t *s, uint64_t n)
{
    return n ? rng_next(s) % n : 0;
}

/* Log-uniform integer in [lo, hi]: token counts span orders of magnitude. */
static int64_t rng_log_range(uint64_t *s, double lo, double hi)
{
    double v = lo * exp(rng_unit(s) * log(hi / lo));
    return (int64_t)v;
}

/* MurmurHash3's finalizer: a bijective mix of 64 bits. */
static uint64_t rng_mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

/* The state of stream `n`: hashed, so that neighbouring streams are not
 * shifted copies of each other (as splitmix64 states n and n+1 would be).
 */
static uint64_t rng_stream(uint64_t seed, uint64_t salt, uint64_t n)
{
    return rng_mix(seed ^ rng_mix(salt * 0xd1b54a32d192ed03ULL ^
                                  rng_mix(n + 0x632be59bd9b4e019ULL)));
}

/* ------------------------------------------------------------------ */
/* Events                                                              */
/* ------------------------------------------------------------------ */

/* One event as generated: everything its JSON line and its contribution
 * to the sums depend on. Token values are the effective ones (0 when the
 * field is absent from the line). */
typedef struct {
    uint64_t n; /* index: key "evt-<seed>-<n>" ("bad-..." for bad lines) */
    uint32_t tenant;
    uint8_t op, model, agent;
    bool implicit;     /* no idempotency_key */
    int64_t at;        /* occurred_at, seconds since the epoch, UTC */
    uint32_t frac_us;  /* fraction shown in the timestamp */
    uint8_t ts_style;  /* 0 "Z", 1 ".mmmZ", 2 ".uuuuuuZ", 3 "+hh:mm" */
    int16_t offset_min;
    int64_t tokens, prompt, completion, thoughts, cached;
    bool has_prompt, has_completion, has_thoughts, has_cached;
    bool null_cached, null_agent, schema_version, extra_field;
    uint64_t conversation; /* 0: none */
    uint32_t collection;   /* 0: none */
    int64_t owner;         /* owner tenant index, -1: none */
    uint8_t meta_kind;     /* 0: none */
    uint64_t meta_id;
} gen_event_t;

/* Command-line settings. */
typedef struct {
    uint64_t count, seed;
    uint32_t tenants;
    double dup_rate, conflict_rate, bad_rate, implicit_rate;
    int64_t now;
    const char *expect;
} gen_opts_t;

/* One daily bucket of the expectation. */
typedef struct {
    uint64_t key; /* gen_bucket_key(); 0: empty slot */
    int64_t tokens, prompt, completion, thoughts, cached, events;
} gen_bucket_t;

typedef struct {
    gen_opts_t o;
    uint64_t rng;       /* line kinds */
    uint32_t *keyed;    /* indexes of counted events with a key */
    size_t n_keyed, cap_keyed;
    uint64_t n_events;  /* base events made so far */
    uint64_t n_bad;
    gen_bucket_t *buckets; /* open addressing, power-of-two size */
    size_t n_buckets, cap_buckets;
    /* Totals for the summary. */
    uint64_t events, duplicates, conflicts, bad, implicit;
    int64_t tokens;
    /* Output buffer for stdout. */
    char *out;
    size_t out_len;
} gen_t;

#define GEN_OUT_SIZE (1u << 20)
#define GEN_LINE_MAX 4096 /* longest line we write, with room to spare */

static void gen_tenant_name(uint32_t idx, char *buf, size_t size)
{
    switch (idx % 10) {
    case 6:
    case 7:
        snprintf(buf, size, "org_%" PRIu32, idx);
        break;
    case 8:
        snprintf(buf, size, "acme.%" PRIu32, idx);
        break;
    case 9:
        snprintf(buf, size, "t%" PRIu32 "@corp.example", idx);
        break;
    default:
        snprintf(buf, size, "tenant-%" PRIu32, idx);
        break;
    }
}

static unsigned gen_pick_weighted_op(uint64_t *s)
{
    unsigned total = 0, r;
    for (size_t i = 0; i < GEN_N_OPS; i++)
        total += gen_ops[i].weight;
    r = (unsigned)rng_below(s, total);
    for (size_t i = 0; i < GEN_N_OPS; i++) {
        if (r < gen_ops[i].weight)
            return (unsigned)i;
        r -= gen_ops[i].weight;
    }
    return 0;
}

static unsigned gen_pick_model(uint64_t *s, int token_type)
{
    unsigned total = 0, r;
    for (size_t i = 0; i < GEN_N_MODELS; i++)
        if (gen_models[i].token_type == token_type)
            total += gen_models[i].weight;
    r = (unsigned)rng_below(s, total);
    for (size_t i = 0; i < GEN_N_MODELS; i++) {
        if (gen_models[i].token_type != token_type)
            continue;
        if (r < gen_models[i].weight)
            return (unsigned)i;
        r -= gen_models[i].weight;
    }
    return 0;
}

/* Builds event `n` from its own random stream (salt tells base events
 * from bad lines apart). The same (seed, salt, n) always gives the same
 * event. */
static void gen_event_make(const gen_t *g, uint64_t salt, uint64_t n,
                           gen_event_t *ev)
{
    uint64_t s = rng_stream(g->o.seed, salt, n);
    double u;
    int tt;

    memset(ev, 0, sizeof(*ev));
    ev->n = n;
    /* Skewed popularity: density ~ x^(-2/3); the top 1% of the tenants
     * send about a fifth of the events. */
    u = rng_unit(&s);
    ev->tenant = (uint32_t)((double)g->o.tenants * u * u * u);
    if (ev->tenant >= g->o.tenants)
        ev->tenant = g->o.tenants - 1;
    ev->op = (uint8_t)gen_pick_weighted_op(&s);
    tt = gen_ops[ev->op].token_type;
    /* Tenants have habits: a primary model per token type (80% of their
     * calls) and two agents, as real tenants do; this is what makes the
     * daily buckets fewer than the events. */
    if (rng_below(&s, 100) < 4) {
        ev->model = GEN_NONE;
    } else if (rng_below(&s, 100) < 80) {
        unsigned k = 0, want = ev->tenant % 7, first = GEN_NONE, nth = 0;
        for (unsigned i = 0; i < GEN_N_MODELS; i++) {
            if (gen_models[i].token_type != tt)
                continue;
            if (first == GEN_NONE)
                first = i;
            if (k++ == want % 3)
                nth = i + 1;
        }
        ev->model = (uint8_t)(nth ? nth - 1 : first);
    } else {
        ev->model = (uint8_t)gen_pick_model(&s, tt);
    }
    ev->agent = rng_below(&s, 2)
                    ? (uint8_t)((ev->tenant * 3 + rng_below(&s, 2)) %
                                GEN_N_AGENTS)
                    : GEN_NONE;
    ev->null_agent = ev->agent == GEN_NONE && rng_below(&s, 10) == 0;

    /* 90% in the last two days, the rest spread over thirty; never in
     * the future, never older than thirty days. */
    if (rng_unit(&s) < 0.9)
        ev->at = g->o.now - 1 -
                 (int64_t)rng_below(&s, GEN_RECENT_DAYS * GEN_DAY - 1);
    else
        ev->at = g->o.now - GEN_RECENT_DAYS * GEN_DAY -
                 (int64_t)rng_below(&s, (GEN_MAX_AGE_DAYS - GEN_RECENT_DAYS) *
                                            GEN_DAY - 1);
    switch (rng_below(&s, 20)) {
    case 0:
    case 1:
    case 2:
        ev->ts_style = 1;
        ev->frac_us = (uint32_t)rng_below(&s, 1000) * 1000;
        break;
    case 3:
        ev->ts_style = 2;
        ev->frac_us = (uint32_t)rng_below(&s, 1000000);
        break;
    case 4:
    case 5:
        ev->ts_style = 3;
        ev->offset_min = (int16_t)gen_offsets_min[rng_below(&s, GEN_N_OFFSETS)];
        break;
    default:
        ev->ts_style = 0;
        break;
    }

    if (tt == TT_LLM) {
        ev->prompt = rng_log_range(&s, 20, 20000);
        ev->completion = rng_log_range(&s, 1, 4000);
        ev->has_prompt = ev->has_completion = true;
        if (ev->model != GEN_NONE && gen_models[ev->model].thinks) {
            ev->thoughts = rng_log_range(&s, 16, 8000);
            ev->has_thoughts = true;
        }
        if (rng_below(&s, 10) < 3) {
            ev->cached = (int64_t)((double)ev->prompt * rng_unit(&s) * 0.9);
            ev->has_cached = true;
        } else {
            ev->has_cached = rng_below(&s, 4) == 0; /* an explicit 0 */
            ev->null_cached = !ev->has_cached && rng_below(&s, 8) == 0;
        }
        ev->tokens = ev->prompt + ev->completion + ev->thoughts;
        if (ev->op == 1 || rng_below(&s, 10) < 6)
            ev->conversation = rng_next(&s) | 1;
        if (ev->op == 1 && rng_below(&s, 2))
            ev->collection = (uint32_t)rng_below(&s, 50) + 1;
    } else {
        ev->tokens = ev->op == 4 ? rng_log_range(&s, 200, 500000)
                                 : rng_log_range(&s, 4, 8000);
        if (rng_below(&s, 2)) {
            ev->prompt = ev->tokens;
            ev->has_prompt = true;
        }
        if (ev->op != 3 || rng_below(&s, 2))
            ev->collection = (uint32_t)rng_below(&s, 50) + 1;
    }
    ev->owner = rng_below(&s, 50) == 0
                    ? (int64_t)rng_below(&s, g->o.tenants)
                    : -1;
    ev->schema_version = rng_below(&s, 10) < 3;
    ev->extra_field = rng_below(&s, 10) == 0;
    if (rng_below(&s, 5) == 0) {
        ev->meta_kind = (uint8_t)(1 + rng_below(&s, 3));
        ev->meta_id = rng_next(&s);
    }
    ev->implicit = false;
}

/* ------------------------------------------------------------------ */
/* Output                                                              */
/* ------------------------------------------------------------------ */

static int gen_out_flush(gen_t *g)
{
    if (g->out_len && fwrite(g->out, 1, g->out_len, stdout) != g->out_len)
        return -1;
    g->out_len = 0;
    return 0;
}

static void out_str(gen_t *g, const char *s)
{
    size_t len = strlen(s);
    memcpy(g->out + g->out_len, s, len);
    g->out_len += len;
}

static void out_u64(gen_t *g, uint64_t v)
{
    char tmp[24];
    int i = (int)sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    memcpy(g->out + g->out_len, tmp + i, sizeof(tmp) - (size_t)i);
    g->out_len += sizeof(tmp) - (size_t)i;
}

static void out_i64(gen_t *g, int64_t v)
{
    if (v < 0) {
        g->out[g->out_len++] = '-';
        out_u64(g, (uint64_t)0 - (uint64_t)v);
    } else {
        out_u64(g, (uint64_t)v);
    }
}

static void out_pad(gen_t *g, unsigned v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        g->out[g->out_len + (size_t)i] = (char)('0' + v % 10);
        v /= 10;
    }
    g->out_len += (size_t)width;
}

/* Civil date of a day number (days since 1970-01-01), proleptic
 * Gregorian (H. Hinnant's algorithm). */
static void gen_civil(int64_t day, int *y, unsigned *m, unsigned *d)
{
    int64_t z = day + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;

    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int)(yoe + (unsigned)era * 400) + (*m <= 2);
}

static int64_t gen_floor_div(int64_t a, int64_t b)
{
    return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

/* "YYYY-MM-DDTHH:MM:SS" of `t` seconds, shifted by `offset_min`. */
static void out_datetime(gen_t *g, int64_t t, int offset_min)
{
    int64_t local = t + offset_min * 60;
    int64_t day = gen_floor_div(local, GEN_DAY);
    int64_t sec = local - day * GEN_DAY;
    int y;
    unsigned m, d;

    gen_civil(day, &y, &m, &d);
    out_pad(g, (unsigned)y, 4);
    g->out[g->out_len++] = '-';
    out_pad(g, m, 2);
    g->out[g->out_len++] = '-';
    out_pad(g, d, 2);
    g->out[g->out_len++] = 'T';
    out_pad(g, (unsigned)(sec / 3600), 2);
    g->out[g->out_len++] = ':';
    out_pad(g, (unsigned)(sec / 60 % 60), 2);
    g->out[g->out_len++] = ':';
    out_pad(g, (unsigned)(sec % 60), 2);
}

static void out_timestamp(gen_t *g, const gen_event_t *ev, gen_bad_t bad)
{
    g->out[g->out_len++] = '"';
    if (bad == BAD_TIMESTAMP) {
        out_str(g, "2024-02-30T12:00:00Z\"");
        return;
    }
    if (bad == BAD_TOO_OLD || bad == BAD_FUTURE) {
        out_datetime(g, g->o.now + (bad == BAD_TOO_OLD ? -40 : 3) * GEN_DAY,
                     0);
        out_str(g, "Z\"");
        return;
    }
    out_datetime(g, ev->at, ev->ts_style == 3 ? ev->offset_min : 0);
    switch (ev->ts_style) {
    case 1:
        g->out[g->out_len++] = '.';
        out_pad(g, ev->frac_us / 1000, 3);
        break;
    case 2:
        g->out[g->out_len++] = '.';
        out_pad(g, ev->frac_us, 6);
        break;
    case 3: {
        int off = ev->offset_min < 0 ? -ev->offset_min : ev->offset_min;
        g->out[g->out_len++] = ev->offset_min < 0 ? '-' : '+';
        out_pad(g, (unsigned)(off / 60), 2);
        g->out[g->out_len++] = ':';
        out_pad(g, (unsigned)(off % 60), 2);
        g->out[g->out_len++] = '"';
        return;
    }
    default:
        break;
    }
    out_str(g, "Z\"");
}

static void out_tenant(gen_t *g, uint32_t idx)
{
    char name[64];
    gen_tenant_name(idx, name, sizeof(name));
    out_str(g, name);
}

/* Writes one event as a JSON line (newline included), spoilt as `bad`
 * says. Deterministic: the same event gives the same bytes. `key_prefix`
 * is "evt" or "bad". */
static void gen_write(gen_t *g, const gen_event_t *ev, gen_bad_t bad,
                      const char *key_prefix)
{
    size_t start = g->out_len;

    if (bad == BAD_NOT_OBJECT) {
        out_str(g, "[\"");
        out_tenant(g, ev->tenant);
        out_str(g, "\",");
        out_i64(g, ev->tokens);
        out_str(g, "]\n");
        return;
    }
    out_str(g, "{");
    if (ev->schema_version || bad == BAD_SCHEMA_VERSION)
        out_str(g, bad == BAD_SCHEMA_VERSION ? "\"schema_version\":2,"
                                             : "\"schema_version\":1,");
    if (bad == BAD_RESERVED_KEY) {
        out_str(g, "\"idempotency_key\":\"kafka:token-usage:0:");
        out_u64(g, ev->n);
        out_str(g, "\",");
    } else if (!ev->implicit) {
        out_str(g, "\"idempotency_key\":\"");
        out_str(g, key_prefix);
        g->out[g->out_len++] = '-';
        out_u64(g, g->o.seed);
        g->out[g->out_len++] = '-';
        out_u64(g, ev->n);
        out_str(g, "\",");
    }
    switch (bad) {
    case BAD_TENANT_MISSING:
        break;
    case BAD_TENANT_SPACE:
        out_str(g, "\"tenant_id\":\"tenant ");
        out_u64(g, ev->tenant);
        out_str(g, "\",");
        break;
    case BAD_TENANT_LONG:
        out_str(g, "\"tenant_id\":\"");
        for (int i = 0; i < 129; i++)
            g->out[g->out_len++] = 'x';
        out_str(g, "\",");
        break;
    case BAD_DUP_MEMBER: /* the member twice */
        out_str(g, "\"tenant_id\":\"");
        out_tenant(g, ev->tenant);
        out_str(g, "\",");
        /* fall through */
    default:
        out_str(g, "\"tenant_id\":\"");
        out_tenant(g, ev->tenant);
        out_str(g, "\",");
        break;
    }
    switch (bad) {
    case BAD_TOKENS_MISSING:
        break;
    case BAD_TOKENS_STRING:
        out_str(g, "\"tokens\":\"12\",");
        break;
    case BAD_TOKENS_NEGATIVE:
        out_str(g, "\"tokens\":-5,");
        break;
    case BAD_TOKENS_FRACTION:
        out_str(g, "\"tokens\":1.0,");
        break;
    case BAD_TOKENS_EXPONENT:
        out_str(g, "\"tokens\":1e3,");
        break;
    case BAD_TOKENS_HUGE:
        out_str(g, "\"tokens\":1000000000001,");
        break;
    default:
        out_str(g, "\"tokens\":");
        out_i64(g, ev->tokens);
        out_str(g, ",");
        break;
    }
    out_str(g, "\"token_type\":\"");
    out_str(g, bad == BAD_TOKEN_TYPE
                   ? "audio"
                   : gen_token_types[gen_ops[ev->op].token_type]);
    out_str(g, "\",\"operation\":\"");
    out_str(g, bad == BAD_OPERATION ? "transcription" : gen_ops[ev->op].name);
    out_str(g, "\",");
    if (bad == BAD_MODEL_CONTROL)
        out_str(g, "\"model\":\"gpt-4o\\u0007\",");
    else if (ev->model != GEN_NONE) {
        out_str(g, "\"model\":\"");
        out_str(g, gen_models[ev->model].name);
        out_str(g, "\",");
    }
    if (ev->has_prompt) {
        out_str(g, "\"prompt_tokens\":");
        out_i64(g, ev->prompt);
        out_str(g, ",");
    }
    if (ev->has_completion) {
        out_str(g, "\"completion_tokens\":");
        out_i64(g, ev->completion);
        out_str(g, ",");
    }
    if (ev->has_thoughts) {
        out_str(g, "\"thoughts_tokens\":");
        out_i64(g, ev->thoughts);
        out_str(g, ",");
    }
    if (ev->has_cached) {
        out_str(g, "\"cached_tokens\":");
        out_i64(g, ev->cached);
        out_str(g, ",");
    } else if (ev->null_cached) {
        out_str(g, "\"cached_tokens\":null,");
    }
    if (ev->agent != GEN_NONE) {
        out_str(g, "\"agent_id\":\"");
        out_str(g, gen_agents[ev->agent]);
        out_str(g, "\",");
    } else if (ev->null_agent) {
        out_str(g, "\"agent_id\":null,");
    }
    if (ev->conversation) {
        out_str(g, "\"conversation_id\":\"conv-");
        out_u64(g, ev->conversation % 100000000000ULL);
        out_str(g, "\",");
    }
    if (ev->collection) {
        out_str(g, "\"collection_id\":\"coll-");
        out_u64(g, ev->collection);
        out_str(g, "\",");
    }
    if (ev->owner >= 0) {
        out_str(g, "\"owner_tenant_id\":\"");
        out_tenant(g, (uint32_t)ev->owner);
        out_str(g, "\",");
    }
    if (ev->extra_field)
        out_str(g, "\"source\":\"gateway\",");
    switch (ev->meta_kind) {
    case 1:
        out_str(g, "\"metadata\":{\"request_id\":\"req-");
        out_u64(g, ev->meta_id);
        out_str(g, "\"},");
        break;
    case 2:
        out_str(g, "\"metadata\":{\"region\":\"eu-west-1\",\"latency_ms\":");
        out_u64(g, ev->meta_id % 5000);
        out_str(g, ",\"stream\":true},");
        break;
    case 3:
        out_str(g, "\"metadata\":{\"client\":{\"sdk\":\"python\","
                   "\"version\":\"1.4.2\"},\"tags\":[\"batch\",\"t");
        out_u64(g, ev->meta_id % 100);
        out_str(g, "\"]},");
        break;
    default:
        break;
    }
    out_str(g, "\"occurred_at\":");
    out_timestamp(g, ev, bad);
    out_str(g, "}\n");

    if (bad == BAD_TRUNCATED) {
        /* Cut inside the object: never valid JSON. */
        size_t len = g->out_len - start;
        g->out_len = start + len / 2;
        g->out[g->out_len++] = '\n';
    }
}

/* ------------------------------------------------------------------ */
/* Expected sums                                                       */
/* ------------------------------------------------------------------ */

/* Packs a bucket's identity; never 0 (the day slot is at least 1). */
static uint64_t gen_bucket_key(const gen_t *g, const gen_event_t *ev)
{
    int64_t slot = g->o.now / GEN_DAY - gen_floor_div(ev->at, GEN_DAY) + 1;
    return (uint64_t)ev->tenant << 32 | (uint64_t)slot << 24 |
           (uint64_t)ev->op << 16 | (uint64_t)ev->model << 8 |
           (uint64_t)ev->agent;
}

static int gen_buckets_grow(gen_t *g)
{
    size_t cap = g->cap_buckets ? g->cap_buckets * 2 : 4096;
    gen_bucket_t *nb = calloc(cap, sizeof(*nb));

    if (!nb)
        return -1;
    for (size_t i = 0; i < g->cap_buckets; i++) {
        size_t j;
        if (!g->buckets[i].key)
            continue;
        j = rng_mix(g->buckets[i].key) & (cap - 1);
        while (nb[j].key)
            j = (j + 1) & (cap - 1);
        nb[j] = g->buckets[i];
    }
    free(g->buckets);
    g->buckets = nb;
    g->cap_buckets = cap;
    return 0;
}

/* Adds a counted event to its daily bucket. */
static int gen_count(gen_t *g, const gen_event_t *ev)
{
    uint64_t key = gen_bucket_key(g, ev);
    gen_bucket_t *b;
    size_t j;

    if ((g->n_buckets + 1) * 2 > g->cap_buckets &&
        gen_buckets_grow(g) == -1)
        return -1;
    j = rng_mix(key) & (g->cap_buckets - 1);
    while (g->buckets[j].key && g->buckets[j].key != key)
        j = (j + 1) & (g->cap_buckets - 1);
    b = &g->buckets[j];
    if (!b->key) {
        b->key = key;
        g->n_buckets++;
    }
    b->tokens += ev->tokens;
    b->prompt += ev->prompt;
    b->completion += ev->completion;
    b->thoughts += ev->thoughts;
    b->cached += ev->cached;
    b->events++;
    g->events++;
    g->tokens += ev->tokens;
    return 0;
}

static int gen_strcmp_ptr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Writes the buckets as TSV lines sorted in byte order, and the summary
 * next to it. Lines live in one arena; only pointers are sorted. */
static int gen_write_expect(const gen_t *g)
{
    char summary_path[4096];
    char *arena = NULL, **lines = NULL;
    size_t arena_size = g->n_buckets * 400 + 1, used = 0, n = 0;
    int64_t now_day = g->o.now / GEN_DAY;
    FILE *fp = NULL;
    int ret = -1;

    if (g->n_buckets) {
        arena = malloc(arena_size);
        lines = malloc(g->n_buckets * sizeof(*lines));
        if (!arena || !lines) {
            fprintf(stderr, "tally-gen: out of memory\n");
            goto out;
        }
    }
    for (size_t i = 0; i < g->cap_buckets; i++) {
        const gen_bucket_t *b = &g->buckets[i];
        char tenant[64];
        unsigned model, agent, op, mon, mday;
        int year;
        int len;

        if (!b->key)
            continue;
        gen_tenant_name((uint32_t)(b->key >> 32), tenant, sizeof(tenant));
        gen_civil(now_day - (int64_t)((b->key >> 24) & 0xff) + 1, &year,
                  &mon, &mday);
        op = (unsigned)(b->key >> 16) & 0xff;
        model = (unsigned)(b->key >> 8) & 0xff;
        agent = (unsigned)b->key & 0xff;
        len = snprintf(arena + used, arena_size - used,
                       "%s\t%04d-%02u-%02u\t%s\t%s\t%s\t%s\t%" PRId64
                       "\t%" PRId64 "\t%" PRId64 "\t%" PRId64 "\t%" PRId64
                       "\t%" PRId64 "\n",
                       tenant, year, mon, mday,
                       gen_token_types[gen_ops[op].token_type],
                       gen_ops[op].name,
                       model == GEN_NONE ? "" : gen_models[model].name,
                       agent == GEN_NONE ? "" : gen_agents[agent], b->tokens,
                       b->prompt, b->completion, b->thoughts, b->cached,
                       b->events);
        lines[n++] = arena + used;
        used += (size_t)len + 1;
    }
    if (n)
        qsort(lines, n, sizeof(*lines), gen_strcmp_ptr);

    fp = fopen(g->o.expect, "w");
    if (!fp)
        goto fail;
    for (size_t i = 0; i < n; i++)
        if (fputs(lines[i], fp) == EOF)
            goto fail;
    if (fclose(fp) == EOF) {
        fp = NULL;
        goto fail;
    }
    fp = NULL;

    snprintf(summary_path, sizeof(summary_path), "%s.summary", g->o.expect);
    fp = fopen(summary_path, "w");
    if (!fp)
        goto fail;
    fprintf(fp,
            "events %" PRIu64 "\ntokens %" PRId64 "\nbad %" PRIu64
            "\nduplicates %" PRIu64 "\nconflicts %" PRIu64
            "\nimplicit %" PRIu64 "\nbuckets %zu\nlines %" PRIu64 "\n",
            g->events, g->tokens, g->bad, g->duplicates, g->conflicts,
            g->implicit, g->n_buckets, g->o.count);
    if (fclose(fp) == EOF) {
        fp = NULL;
        goto fail;
    }
    fp = NULL;
    ret = 0;
    goto out;
fail:
    fprintf(stderr, "tally-gen: --expect %s: %s\n", g->o.expect,
            strerror(errno));
out:
    if (fp)
        fclose(fp);
    free(lines);
    free(arena);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Main loop                                                           */
/* ------------------------------------------------------------------ */

static int gen_remember(gen_t *g, uint64_t n)
{
    if (g->n_keyed == g->cap_keyed) {
        size_t cap = g->cap_keyed ? g->cap_keyed * 2 : 4096;
        uint32_t *nk = realloc(g->keyed, cap * sizeof(*nk));
        if (!nk)
            return -1;
        g->keyed = nk;
        g->cap_keyed = cap;
    }
    g->keyed[g->n_keyed++] = (uint32_t)n;
    return 0;
}

/* An earlier keyed event to re-send: mostly a recent one (a retry), now
 * and then any (a replay). */
static uint64_t gen_pick_earlier(gen_t *g)
{
    size_t window = g->n_keyed < 2000 ? g->n_keyed : 2000;
    if (rng_below(&g->rng, 10) < 7)
        return g->keyed[g->n_keyed - 1 - rng_below(&g->rng, window)];
    return g->keyed[rng_below(&g->rng, g->n_keyed)];
}

static int gen_run(gen_t *g)
{
    gen_event_t ev;
    double bad_cut = g->o.bad_rate;
    double dup_cut = bad_cut + g->o.dup_rate;
    double conflict_cut = dup_cut + g->o.conflict_rate;

    for (uint64_t line = 0; line < g->o.count; line++) {
        double u = rng_unit(&g->rng);

        if (u < bad_cut) {
            gen_bad_t kind = (gen_bad_t)rng_below(&g->rng, BAD__COUNT);
            gen_event_make(g, 2, g->n_bad, &ev);
            gen_write(g, &ev, kind, "bad");
            g->n_bad++;
            g->bad++;
        } else if (u < dup_cut && g->n_keyed) {
            gen_event_make(g, 1, gen_pick_earlier(g), &ev);
            gen_write(g, &ev, BAD_NONE, "evt");
            g->duplicates++;
        } else if (u < conflict_cut && g->n_keyed) {
            gen_event_make(g, 1, gen_pick_earlier(g), &ev);
            ev.tokens += 1 + (int64_t)rng_below(&g->rng, 1000);
            gen_write(g, &ev, BAD_NONE, "evt");
            g->conflicts++;
        } else {
            gen_event_make(g, 1, g->n_events, &ev);
            ev.implicit = rng_unit(&g->rng) < g->o.implicit_rate;
            gen_write(g, &ev, BAD_NONE, "evt");
            if (g->o.expect && gen_count(g, &ev) == -1)
                goto oom;
            if (ev.implicit)
                g->implicit++;
            else if (g->n_events <= UINT32_MAX && gen_remember(g, g->n_events) == -1)
                goto oom;
            g->n_events++;
        }
        if (g->out_len > GEN_OUT_SIZE - GEN_LINE_MAX &&
            gen_out_flush(g) == -1)
            goto io;
    }
    if (gen_out_flush(g) == -1 || fflush(stdout) == EOF)
        goto io;
    return 0;
oom:
    fprintf(stderr, "tally-gen: out of memory\n");
    return -1;
io:
    fprintf(stderr, "tally-gen: writing stdout: %s\n", strerror(errno));
    return -1;
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */
/* ------------------------------------------------------------------ */

static void gen_usage(FILE *fp)
{
    fprintf(fp,
        "usage: tally-gen [options] > events.jsonl\n\n"
        "Writes deterministic token-usage events as JSON lines (one per\n"
        "line, --count in all) and, with --expect, the exact daily sums a\n"
        "correct worker must reach.\n\n"
        "options:\n"
        "  --count N          lines to write (default 1000)\n"
        "  --seed S           random seed; keys are evt-<S>-<n> (default 1)\n"
        "  --tenants N        tenants, skewed popularity (default 1000)\n"
        "  --dup-rate F       lines re-sending an earlier event, same key\n"
        "                     and payload (default 0.05)\n"
        "  --conflict-rate F  lines re-sending an earlier key with other\n"
        "                     tokens; the first wins (default 0)\n"
        "  --bad-rate F       invalid lines of assorted kinds (default 0)\n"
        "  --implicit-rate F  new events without idempotency_key, never\n"
        "                     re-sent (default 0)\n"
        "  --now EPOCH        reference clock, seconds (default: now);\n"
        "                     events fall in the 30 days before it\n"
        "  --expect FILE      write the expected daily buckets as TSV,\n"
        "                     sorted in byte order (LC_ALL=C sort), and\n"
        "                     FILE.summary\n"
        "  -h, --help         show this help\n\n"
        "TSV columns: tenant_id, day (UTC), token_type, operation, model,\n"
        "agent_id (empty when absent), tokens, prompt_tokens,\n"
        "completion_tokens, thoughts_tokens, cached_tokens, events.\n"
        "Summary lines: events, tokens, bad, duplicates, conflicts,\n"
        "implicit, buckets, lines. Bad lines assume --dedupe-days >= 31\n"
        "(too old: 40 days; too far in the future: 3 days).\n");
}

static int gen_parse_u64(const char *flag, const char *s, uint64_t min,
                         uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < min || v > max) {
        fprintf(stderr,
                "tally-gen: --%s: '%s' is not an integer in %" PRIu64
                "..%" PRIu64 "\n",
                flag, s, min, max);
        return -1;
    }
    *out = v;
    return 0;
}

static int gen_parse_rate(const char *flag, const char *s, double *out)
{
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0.0 && v <= 1.0)) {
        fprintf(stderr, "tally-gen: --%s: '%s' is not a number in 0..1\n",
                flag, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Returns 0, 1 (help shown) or -1 (usage error, reported). */
static int gen_parse_args(int argc, char **argv, gen_opts_t *o)
{
    static const struct option longopts[] = {
        {"count", required_argument, NULL, 'c'},
        {"seed", required_argument, NULL, 's'},
        {"tenants", required_argument, NULL, 't'},
        {"dup-rate", required_argument, NULL, 'd'},
        {"conflict-rate", required_argument, NULL, 'C'},
        {"bad-rate", required_argument, NULL, 'b'},
        {"implicit-rate", required_argument, NULL, 'i'},
        {"now", required_argument, NULL, 'n'},
        {"expect", required_argument, NULL, 'e'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    uint64_t v;
    int c;

    o->count = 1000;
    o->seed = 1;
    o->tenants = 1000;
    o->dup_rate = 0.05;
    o->now = (int64_t)time(NULL);
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            if (gen_parse_u64("count", optarg, 0, 4000000000ULL,
                              &o->count) == -1)
                return -1;
            break;
        case 's':
            if (gen_parse_u64("seed", optarg, 0, UINT64_MAX, &o->seed) == -1)
                return -1;
            break;
        case 't':
            if (gen_parse_u64("tenants", optarg, 1, 100000000, &v) == -1)
                return -1;
            o->tenants = (uint32_t)v;
            break;
        case 'd':
            if (gen_parse_rate("dup-rate", optarg, &o->dup_rate) == -1)
                return -1;
            break;
        case 'C':
            if (gen_parse_rate("conflict-rate", optarg, &o->conflict_rate) ==
                -1)
                return -1;
            break;
        case 'b':
            if (gen_parse_rate("bad-rate", optarg, &o->bad_rate) == -1)
                return -1;
            break;
        case 'i':
            if (gen_parse_rate("implicit-rate", optarg, &o->implicit_rate) ==
                -1)
                return -1;
            break;
        case 'n':
            if (gen_parse_u64("now", optarg, 40 * GEN_DAY, 253402300799ULL -
                              40 * GEN_DAY, &v) == -1)
                return -1;
            o->now = (int64_t)v;
            break;
        case 'e':
            o->expect = optarg;
            break;
        case 'h':
            gen_usage(stdout);
            return 1;
        default:
            gen_usage(stderr);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tally-gen: unexpected argument '%s'\n",
                argv[optind]);
        return -1;
    }
    if (o->dup_rate + o->conflict_rate + o->bad_rate > 1.0) {
        fprintf(stderr, "tally-gen: --dup-rate + --conflict-rate + "
                        "--bad-rate must not exceed 1\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    gen_t g;
    int ret = 1;

    memset(&g, 0, sizeof(g));
    switch (gen_parse_args(argc, argv, &g.o)) {
    case 0:
        break;
    case 1:
        return 0;
    default:
        return 2;
    }
    g.rng = rng_stream(g.o.seed, 0, 0);
    g.out = malloc(GEN_OUT_SIZE);
    if (!g.out) {
        fprintf(stderr, "tally-gen: out of memory\n");
        goto out;
    }
    if (gen_run(&g) == -1)
        goto out;
    if (g.o.expect && gen_write_expect(&g) == -1)
        goto out;
    ret = 0;
out:
    free(g.out);
    free(g.keyed);
    free(g.buckets);
    return ret;
}
