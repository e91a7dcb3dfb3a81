#!/usr/bin/env bash
# A few hundred thousand events with duplicates (in a batch, across
# batches, across partitions and re-sent whole): the sums in Postgres equal
# exactly what was produced, counted once.
#
# usage: test_worker_totals.sh TALLY TALLY_GEN [EVENTS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 32
EVENTS=${3:-300000}

step "generate $EVENTS events (5% duplicates, 1% conflicting keys)"
"$TALLY_GEN" --count "$EVENTS" --seed 42 --tenants 2000 --dup-rate 0.05 \
  --conflict-rate 0.01 --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
events=$(it_summary "$IT_DIR/expect.summary" events)

step "produce, then the first half once more (a replay by the producer)"
it_produce "$IT_DIR/events.jsonl"
head -n $((lines / 2)) "$IT_DIR/events.jsonl" >"$IT_DIR/replay.jsonl"
it_produce "$IT_DIR/replay.jsonl"
total=$((lines + lines / 2))

step "one worker consumes all $total messages"
it_worker_start w1
it_wait_consumed "$total" 300
it_assert_sums "$IT_DIR/expect"
got=$(it_sql "SELECT sum(events) FROM tally.token_usage_daily")
[ "$got" = "$events" ] || fail "counted $got events, expected $events"
stored=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$stored" = "$events" ] || fail "dedupe store has $stored, expected $events"

step "the same events through a new group (a full replay) change nothing"
it_worker_stop w1
it_worker_start w2 --group replay
it_wait_consumed "$total" 300 replay
it_assert_sums "$IT_DIR/expect"
grep -q "conflict: tenant" "$IT_DIR/w1.log" ||
  fail "conflicting payloads were not reported in the log"
it_worker_stop w2
echo "PASS: $events events counted exactly once out of $total messages"
