-- tally.track_token_usage(): synchronous recording for services that do
-- not emit events yet. The same checks and the same dedupe store as the
-- worker, so an event sent both ways counts once. Returns true when the
-- event was counted, false for a duplicate; raises SQLSTATE 22023
-- (invalid_parameter_value) for invalid input.

CREATE FUNCTION tally.check_id(field text, value text, required boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        IF required THEN
            RAISE EXCEPTION '%: required', field USING ERRCODE = '22023';
        END IF;
        RETURN;
    END IF;
    IF octet_length(value) NOT BETWEEN 1 AND 128
       OR value !~ '^[A-Za-z0-9_.@-]+$' THEN
        RAISE EXCEPTION '%: must match ^[A-Za-z0-9_.@-]{1,128}$', field
            USING ERRCODE = '22023';
    END IF;
END $$;

CREATE FUNCTION tally.check_text(field text, value text, max_bytes integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RETURN;
    END IF;
    IF octet_length(value) NOT BETWEEN 1 AND max_bytes THEN
        RAISE EXCEPTION '%: must be 1..% bytes', field, max_bytes
            USING ERRCODE = '22023';
    END IF;
    -- U+0001-U+001F and U+007F-U+009F (text never holds U+0000).
    IF value ~ ('[' || chr(1) || '-' || chr(31) || chr(127) || '-'
                || chr(159) || ']') THEN
        RAISE EXCEPTION '%: must not contain control characters', field
            USING ERRCODE = '22023';
    END IF;
END $$;

CREATE FUNCTION tally.check_tokens(field text, value bigint,
                                   required boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        IF required THEN
            RAISE EXCEPTION '%: required', field USING ERRCODE = '22023';
        END IF;
        RETURN;
    END IF;
    IF value NOT BETWEEN 0 AND 1000000000000 THEN
        RAISE EXCEPTION '%: must be 0..10^12, got %', field, value
            USING ERRCODE = '22023';
    END IF;
END $$;

CREATE FUNCTION tally.track_token_usage(
    tenant_id         text,
    tokens            bigint,
    token_type        text,
    operation         text,
    model             text        DEFAULT NULL,
    idempotency_key   text        DEFAULT NULL,
    agent_id          text        DEFAULT NULL,
    conversation_id   text        DEFAULT NULL,
    collection_id     text        DEFAULT NULL,
    owner_tenant_id   text        DEFAULT NULL,
    prompt_tokens     bigint      DEFAULT NULL,
    completion_tokens bigint      DEFAULT NULL,
    thoughts_tokens   bigint      DEFAULT NULL,
    cached_tokens     bigint      DEFAULT NULL,
    occurred_at       timestamptz DEFAULT NULL,
    metadata          jsonb       DEFAULT NULL,
    schema_version    integer     DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_key     text := idempotency_key;
    v_at      timestamptz := coalesce(occurred_at, now());
    v_type    tally.token_type;
    v_op      tally.operation_type;
    v_days    integer;
    v_day     date;
BEGIN
    IF schema_version IS NOT NULL AND schema_version <> 1 THEN
        RAISE EXCEPTION 'schema_version: only 1 is supported, got %',
            schema_version USING ERRCODE = '22023';
    END IF;
    PERFORM tally.check_id('tenant_id', tenant_id, true);
    PERFORM tally.check_tokens('tokens', tokens, true);
    PERFORM tally.check_tokens('prompt_tokens', prompt_tokens, false);
    PERFORM tally.check_tokens('completion_tokens', completion_tokens, false);
    PERFORM tally.check_tokens('thoughts_tokens', thoughts_tokens, false);
    PERFORM tally.check_tokens('cached_tokens', cached_tokens, false);
    PERFORM tally.check_text('model', model, 128);
    PERFORM tally.check_text('idempotency_key', v_key, 512);
    PERFORM tally.check_id('agent_id', agent_id, false);
    PERFORM tally.check_id('conversation_id', conversation_id, false);
    PERFORM tally.check_id('collection_id', collection_id, false);
    PERFORM tally.check_id('owner_tenant_id', owner_tenant_id, false);

    IF token_type IS NULL OR NOT token_type = ANY
           (enum_range(NULL::tally.token_type)::text[]) THEN
        RAISE EXCEPTION 'token_type: unknown value %', token_type
            USING ERRCODE = '22023';
    END IF;
    IF operation IS NULL OR NOT operation = ANY
           (enum_range(NULL::tally.operation_type)::text[]) THEN
        RAISE EXCEPTION 'operation: unknown value %', operation
            USING ERRCODE = '22023';
    END IF;
    v_type := token_type::tally.token_type;
    v_op := operation::tally.operation_type;

    IF v_key IS NULL THEN
        -- No key: nothing to deduplicate against, counted once per call.
        v_key := 'sql:' || gen_random_uuid();
    ELSIF v_key LIKE 'kafka:%' THEN
        RAISE EXCEPTION 'idempotency_key: the prefix kafka: is reserved'
            USING ERRCODE = '22023';
    END IF;

    IF metadata IS NOT NULL THEN
        IF jsonb_typeof(metadata) <> 'object' THEN
            RAISE EXCEPTION 'metadata: must be an object'
                USING ERRCODE = '22023';
        END IF;
        IF octet_length(metadata::text) > 8192 THEN
            RAISE EXCEPTION 'metadata: larger than 8 KiB'
                USING ERRCODE = '22023';
        END IF;
    END IF;

    SELECT s.value::integer INTO v_days
      FROM tally.settings s WHERE s.name = 'dedupe_days';
    v_days := coalesce(v_days, 35);
    IF v_at < now() - make_interval(days => v_days) THEN
        RAISE EXCEPTION 'occurred_at: older than the % day dedupe window',
            v_days USING ERRCODE = '22023';
    END IF;
    IF v_at > now() + interval '1 hour' THEN
        RAISE EXCEPTION 'occurred_at: more than 1 hour in the future'
            USING ERRCODE = '22023';
    END IF;

    INSERT INTO tally.token_usage_events AS e
        (tenant_id, idempotency_key, occurred_at, token_type, operation,
         model, agent_id, conversation_id, collection_id, owner_tenant_id,
         tokens, prompt_tokens, completion_tokens, thoughts_tokens,
         cached_tokens, metadata, payload_hash, source)
    VALUES
        (tenant_id, v_key, v_at, v_type, v_op, coalesce(model, ''),
         agent_id, conversation_id, collection_id, owner_tenant_id, tokens,
         coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0),
         coalesce(thoughts_tokens, 0), coalesce(cached_tokens, 0),
         metadata::json, NULL, 'sql')
    ON CONFLICT ON CONSTRAINT token_usage_events_pkey DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;

    v_day := (v_at AT TIME ZONE 'UTC')::date;
    INSERT INTO tally.token_usage_daily AS d
        (tenant_id, day, token_type, operation, model, agent_id, tokens,
         prompt_tokens, completion_tokens, thoughts_tokens, cached_tokens,
         events, updated_at)
    VALUES
        (tenant_id, v_day, v_type, v_op, coalesce(model, ''),
         coalesce(agent_id, ''), tokens, coalesce(prompt_tokens, 0),
         coalesce(completion_tokens, 0), coalesce(thoughts_tokens, 0),
         coalesce(cached_tokens, 0), 1, now())
    ON CONFLICT ON CONSTRAINT token_usage_daily_pkey DO UPDATE SET
        tokens = d.tokens + EXCLUDED.tokens,
        prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        thoughts_tokens = d.thoughts_tokens + EXCLUDED.thoughts_tokens,
        cached_tokens = d.cached_tokens + EXCLUDED.cached_tokens,
        events = d.events + 1,
        updated_at = EXCLUDED.updated_at;

    INSERT INTO tally.token_usage_monthly AS m
        (tenant_id, month, token_type, operation, model, agent_id, tokens,
         prompt_tokens, completion_tokens, thoughts_tokens, cached_tokens,
         events, updated_at)
    VALUES
        (tenant_id, date_trunc('month', v_day)::date, v_type, v_op,
         coalesce(model, ''), coalesce(agent_id, ''), tokens,
         coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0),
         coalesce(thoughts_tokens, 0), coalesce(cached_tokens, 0), 1, now())
    ON CONFLICT ON CONSTRAINT token_usage_monthly_pkey DO UPDATE SET
        tokens = m.tokens + EXCLUDED.tokens,
        prompt_tokens = m.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = m.completion_tokens + EXCLUDED.completion_tokens,
        thoughts_tokens = m.thoughts_tokens + EXCLUDED.thoughts_tokens,
        cached_tokens = m.cached_tokens + EXCLUDED.cached_tokens,
        events = m.events + 1,
        updated_at = EXCLUDED.updated_at;
    RETURN true;
END $$;
