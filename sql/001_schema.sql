-- tally: the token-usage tables, the dedupe store and the consumed offsets.
-- Key columns are COLLATE "C": byte order, whatever the database's locale
-- (faster and the same everywhere).

CREATE TYPE tally.token_type AS ENUM ('llm', 'embedding');

CREATE TYPE tally.operation_type AS ENUM
    ('chat', 'query', 'vector_search', 'embedding', 'ingestion');

-- Per-day sums; one row per bucket. Written in batches by the worker and
-- one row at a time by tally.track_token_usage().
CREATE TABLE tally.token_usage_daily (
    tenant_id         text COLLATE "C"     NOT NULL,
    day               date                 NOT NULL,
    token_type        tally.token_type     NOT NULL,
    operation         tally.operation_type NOT NULL,
    model             text COLLATE "C"     NOT NULL DEFAULT '',
    agent_id          text COLLATE "C"     NOT NULL DEFAULT '',
    tokens            bigint               NOT NULL DEFAULT 0,
    prompt_tokens     bigint               NOT NULL DEFAULT 0,
    completion_tokens bigint               NOT NULL DEFAULT 0,
    thoughts_tokens   bigint               NOT NULL DEFAULT 0,
    cached_tokens     bigint               NOT NULL DEFAULT 0,
    events            bigint               NOT NULL DEFAULT 0,
    updated_at        timestamptz          NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day, token_type, operation, model, agent_id)
) WITH (fillfactor = 80); -- room for HOT updates of the sums

-- Per-month sums; `month` is the first day of the month (UTC).
CREATE TABLE tally.token_usage_monthly (
    tenant_id         text COLLATE "C"     NOT NULL,
    month             date                 NOT NULL
        CHECK (month = date_trunc('month', month)::date),
    token_type        tally.token_type     NOT NULL,
    operation         tally.operation_type NOT NULL,
    model             text COLLATE "C"     NOT NULL DEFAULT '',
    agent_id          text COLLATE "C"     NOT NULL DEFAULT '',
    tokens            bigint               NOT NULL DEFAULT 0,
    prompt_tokens     bigint               NOT NULL DEFAULT 0,
    completion_tokens bigint               NOT NULL DEFAULT 0,
    thoughts_tokens   bigint               NOT NULL DEFAULT 0,
    cached_tokens     bigint               NOT NULL DEFAULT 0,
    events            bigint               NOT NULL DEFAULT 0,
    updated_at        timestamptz          NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, month, token_type, operation, model, agent_id)
) WITH (fillfactor = 80);

-- Every counted event, kept for the dedupe window: the dedupe store (its
-- primary key is the counting rule), the audit trail and what
-- reconciliation recomputes the sums from.
CREATE TABLE tally.token_usage_events (
    tenant_id         text COLLATE "C"     NOT NULL,
    idempotency_key   text COLLATE "C"     NOT NULL,
    occurred_at       timestamptz          NOT NULL,
    token_type        tally.token_type     NOT NULL,
    operation         tally.operation_type NOT NULL,
    model             text COLLATE "C"     NOT NULL DEFAULT '',
    agent_id          text,
    conversation_id   text,
    collection_id     text,
    owner_tenant_id   text,
    tokens            bigint               NOT NULL,
    prompt_tokens     bigint               NOT NULL DEFAULT 0,
    completion_tokens bigint               NOT NULL DEFAULT 0,
    thoughts_tokens   bigint               NOT NULL DEFAULT 0,
    cached_tokens     bigint               NOT NULL DEFAULT 0,
    -- json, not jsonb: kept exactly as it appeared in the event (the
    -- worker already checked it), and jsonb would refuse some numbers
    -- JSON allows (1e-20000), which would stall a batch for good.
    metadata          json,
    -- Fingerprint of the payload, to report a key reused with another
    -- payload (NULL for events recorded through SQL).
    payload_hash      bigint,
    -- Where it came from: "<topic>/<partition>/<offset>" or "sql".
    source            text                 NOT NULL,
    counted_at        timestamptz          NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);

-- Pruning past the window scans by time; BRIN costs next to nothing on
-- insert and events arrive roughly in time order.
CREATE INDEX token_usage_events_occurred_at
    ON tally.token_usage_events USING brin (occurred_at);

-- The consumed positions, written in the same transaction as the sums.
-- `epoch` fences zombies: a member that claims a partition bumps it, and a
-- batch commits only if the epoch it claimed is still the current one.
CREATE TABLE tally.consumer_offsets (
    group_id    text COLLATE "C" NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint,     -- NULL: claimed but nothing committed yet
    epoch       bigint      NOT NULL DEFAULT 1,
    owner       text,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Settings shared by the worker and the SQL functions.
CREATE TABLE tally.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO tally.settings (name, value) VALUES ('dedupe_days', '35');
