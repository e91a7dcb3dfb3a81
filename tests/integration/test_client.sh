#!/usr/bin/env bash
# scripts/tally_client.py against tally devbroker and a running worker: a
# few thousand calls (coroutines and sync twins, four threads), a third of
# them re-called with the same idempotency key, give the exact daily and
# monthly sums and zero conflicts; lines without occurred_at re-sent
# unchanged (another Kafka timestamp standing in) are duplicates, never
# conflicts; bad calls raise ValueError naming the field; calls return in
# microseconds while the broker is unreachable.
#
# usage: test_client.sh TALLY TALLY_GEN
source "$(dirname "$0")/client_lib.sh"
it_setup "$1" "$2" 4
T0=$SECONDS
export TALLY_SPOOL="$IT_DIR/spool.jsonl"

step "1. a worker; 3000 events through the client, 900 re-calls"
client_worker_start
drive usage "$IT_DIR"
read -r sent recalls <"$IT_DIR/usage.sent"

step "2. the same 200 lines without occurred_at, produced twice"
for i in $(seq 1 200); do
  printf '{"tenant_id":"raw-t","idempotency_key":"raw-%d","tokens":%d,"token_type":"llm","operation":"chat","model":"m"}\n' "$i" "$i"
done >"$IT_DIR/raw.jsonl"
it_produce "$IT_DIR/raw.jsonl"
sleep 1.1 # another Kafka timestamp for the same lines
it_produce "$IT_DIR/raw.jsonl"

step "3. every message consumed; sums exact; no conflict"
it_wait_consumed $((sent + 400)) 120
# raw-t's day is its Kafka timestamp's: checked by tenant, not by day.
got=$(it_sql "SELECT sum(events) || ' ' || sum(tokens) FROM
              tally.token_usage_daily WHERE tenant_id = 'raw-t'")
[ "$got" = "200 20100" ] || fail "raw-t: events/tokens $got, expected 200 20100"
it_sql "DELETE FROM tally.token_usage_daily WHERE tenant_id = 'raw-t';
        DELETE FROM tally.token_usage_monthly WHERE tenant_id = 'raw-t'" \
  >/dev/null
it_assert_sums "$IT_DIR/usage.expect"
echo "    $(wc -l <"$IT_DIR/usage.expect") daily rows exact," \
  "$(it_sql "SELECT sum(events) FROM tally.token_usage_daily") events"
# The counters move when the worker's loop collects a commit, a moment
# after Postgres has it (the positions it_wait_consumed saw): read them
# until they have caught up, not once; then the conflicts (none).
for _ in $(seq 1 100); do
  dups=$(client_metric_sum tally_usage_duplicates_total)
  [ "$dups" -ge $((recalls + 200)) ] && break
  sleep 0.1
done
[ "$dups" -ge $((recalls + 200)) ] ||
  fail "$dups duplicates counted, expected at least $((recalls + 200))"
client_assert_no_conflicts
echo "    $dups duplicates, 0 conflicts"

step "4. calls while the broker is unreachable"
drive unreachable "$IT_DIR"

it_worker_stop w1
echo "PASS: the client counts exactly once, no conflicts ($((SECONDS - T0)) s)"
