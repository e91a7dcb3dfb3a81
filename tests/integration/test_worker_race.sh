#!/usr/bin/env bash
# A key committed by someone else between the worker's dedupe check and
# its insert (here a synchronous track_token_usage() call holding its
# transaction open): the worker's insert meets a unique violation, falls
# back to the conflict-tolerant path, and the key counts once.
#
# usage: test_worker_race.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 2

now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ev() { # tenant key tokens
  printf '{"tenant_id":"%s","idempotency_key":"%s","tokens":%s,"token_type":"llm","operation":"chat","occurred_at":"%s"}\n' "$1" "$2" "$3" "$now"
}

step "two tally migrate at once on an empty database: each migration once"
it_sql "DROP SCHEMA tally CASCADE" >/dev/null 2>&1
"$TALLY" migrate >"$IT_DIR/m1.log" 2>&1 &
m1=$!
"$TALLY" migrate >"$IT_DIR/m2.log" 2>&1 || fail "second migrate failed"
wait "$m1" || fail "first migrate failed: $(cat "$IT_DIR/m1.log")"
n=$(ls "$IT_ROOT"/sql/*.sql | wc -l)
[ "$(it_sql "SELECT count(*) FROM tally.schema_migrations")" = "$n" ] ||
  fail "schema_migrations does not list the $n migrations once each"
applied=$(cat "$IT_DIR/m1.log" "$IT_DIR/m2.log" | grep -c "migration .* applied")
[ "$applied" = "$n" ] || fail "$applied migrations applied, expected $n"

step "worker running (pruning every second); an event past the window is stored"
ins() { # key, age in days
  it_sql "INSERT INTO tally.token_usage_events (tenant_id, idempotency_key,
      occurred_at, token_type, operation, tokens, source)
      VALUES ('tp', '$1', now() - interval '$2 days', 'llm', 'chat', 1,
              'test')" >/dev/null
}
ins old-1 40
ins recent-1 2
it_worker_start w1 --prune-interval 1
for _ in $(seq 1 100); do
  [ "$(it_sql "SELECT count(*) FROM tally.consumer_offsets")" = "2" ] && break
  sleep 0.1
done

step "SQL holds key race-1 uncommitted; Kafka brings the same key"
# The SQL session is fed through a FIFO so that the test decides when it
# commits: after its track_token_usage() call is done (the key inserted,
# uncommitted) the events are produced, and it commits only once the
# worker's insert waits for it. Then the worker's dedupe check certainly
# came before the SQL commit and its insert after the SQL insert, however
# slow the machine (no fixed sleep, no time window to hit).
mkfifo "$IT_DIR/sql.fifo"
PGAPPNAME=tally-it-race $PSQL <"$IT_DIR/sql.fifo" >"$IT_DIR/sql.log" 2>&1 &
sql_pid=$!
echo "$sql_pid" >"$IT_DIR/sql.pid"
IT_WORKERS+=(sql) # killed by it_cleanup if the test fails
exec 7>"$IT_DIR/sql.fifo"
cat >&7 <<SQL
BEGIN;
SELECT tally.track_token_usage(tenant_id => 'tr', tokens => 7,
    token_type => 'llm', operation => 'chat', idempotency_key => 'race-1',
    occurred_at => '$now');
SQL
# Waits until the SQL session satisfies CONDITION (on pg_stat_activity):
# sql_session_wait CONDITION WHAT. Prints its backend pid.
sql_session_wait() {
  local got=""
  for _ in $(seq 1 600); do
    got=$(it_sql "SELECT pid FROM pg_stat_activity
                  WHERE application_name = 'tally-it-race' AND ($1)")
    [ -n "$got" ] && { echo "$got"; return 0; }
    kill -0 "$sql_pid" 2>/dev/null ||
      fail "the SQL session ended: $(cat "$IT_DIR/sql.log")"
    sleep 0.1
  done
  fail "after 60s the SQL session is not $2: $(cat "$IT_DIR/sql.log")"
}
sql_backend=$(sql_session_wait "state = 'idle in transaction' AND
  query LIKE '%track_token_usage%'" "done with track_token_usage()")
{ ev tr race-1 1000; ev tr race-2 5; ev tr race-3 6; } >"$IT_DIR/race.jsonl"
it_produce "$IT_DIR/race.jsonl"
blocked=""
for _ in $(seq 1 600); do
  blocked=$(it_sql "SELECT count(*) FROM pg_stat_activity
                    WHERE $sql_backend = ANY (pg_blocking_pids(pid))")
  [ "$blocked" -gt 0 ] && break
  sleep 0.1
done
[ "$blocked" -gt 0 ] ||
  fail "after 60s no worker insert waits for the SQL session's key race-1"
printf 'COMMIT;\n\\q\n' >&7
exec 7>&-
wait "$sql_pid" || fail "the SQL session failed: $(cat "$IT_DIR/sql.log")"
rm -f "$IT_DIR/sql.pid"
it_wait_consumed 3 60

step "race-1 counted once (the SQL call's 7 tokens: it committed first)"
got=$(it_sql "SELECT sum(events) || '/' || sum(tokens)
              FROM tally.token_usage_daily WHERE tenant_id = 'tr'")
[ "$got" = "3/18" ] || fail "tenant tr has events/tokens $got, expected 3/18"
src=$(it_sql "SELECT source FROM tally.token_usage_events
              WHERE tenant_id = 'tr' AND idempotency_key = 'race-1'")
[ "$src" = "sql" ] || fail "race-1 stored from '$src', expected 'sql'"
grep -q "committed by another worker meanwhile" "$IT_DIR/w1.log" ||
  fail "the worker did not take the race fallback (see w1.log)"
step "metadata that JSON allows but jsonb would refuse is kept, not a stall"
printf '%s\n' "{\"tenant_id\":\"tm\",\"idempotency_key\":\"m1\",\"tokens\":3,\"token_type\":\"llm\",\"operation\":\"chat\",\"occurred_at\":\"$now\",\"metadata\":{\"x\":1e-20000, \"y\":\"\\ud83d\\ude00\"}}" >"$IT_DIR/meta.jsonl"
it_produce "$IT_DIR/meta.jsonl"
it_wait_consumed 4 60
[ "$(it_sql "SELECT metadata::text FROM tally.token_usage_events
             WHERE tenant_id = 'tm'")" = '{"x":1e-20000, "y":"\ud83d\ude00"}' ] ||
  fail "metadata not stored as it appeared"
step "the event past the window (plus a day) was pruned, the recent one kept"
keys=$(it_sql "SELECT string_agg(idempotency_key, ',') FROM
               tally.token_usage_events WHERE tenant_id = 'tp'")
[ "$keys" = "recent-1" ] || fail "events of tenant tp left: $keys"
grep -q "pruned 1 events past the 35-day dedupe window" "$IT_DIR/w1.log" ||
  fail "the pruning was not logged"
it_worker_stop w1
echo "PASS: concurrent migrations apply once; a key inserted concurrently counts once; pruning past the window"
