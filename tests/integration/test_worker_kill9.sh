#!/usr/bin/env bash
# SIGKILL the worker again and again in the middle of a backlog (with
# duplicates, a producer replay and events without idempotency_key), at
# random moments, and restart it each time: every kill loses the open
# batch and maybe a commit in flight, yet the sums end exact, each event
# counted once.
#
# usage: test_worker_kill9.sh TALLY TALLY_GEN [EVENTS] [KILLS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 8
EVENTS=${3:-150000}
KILLS=${4:-5}

step "generate $EVENTS events (10% duplicates, 5% without idempotency_key)"
"$TALLY_GEN" --count "$EVENTS" --seed 9 --tenants 1000 --dup-rate 0.1 \
  --conflict-rate 0.01 --implicit-rate 0.05 --expect "$IT_DIR/expect" \
  >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
events=$(it_summary "$IT_DIR/expect.summary" events)

step "produce, then a producer replay of the first half (keyed events only:"
step "an event without key produced twice is two events)"
it_produce "$IT_DIR/events.jsonl"
head -n $((lines / 2)) "$IT_DIR/events.jsonl" |
  grep '"idempotency_key"' >"$IT_DIR/replay.jsonl"
it_produce "$IT_DIR/replay.jsonl"
total=$((lines + $(wc -l <"$IT_DIR/replay.jsonl")))

step "start a worker; kill -9 it $KILLS times at random moments mid-run"
# Small batches: many commits, so a kill can land anywhere (mid-batch,
# with a commit in flight, between commits). A short session: a restart
# waits for the killed member's session to expire before it gets the
# partitions back.
worker_args=(--batch-size 2000 --batch-ms 100 --commit-ms 100
  -X session.timeout.ms=3000)
it_worker_start w1 "${worker_args[@]}"
prev=0
for k in $(seq 1 "$KILLS"); do
  # Progress since the previous kill: the restarted worker got its
  # partitions back (the killed member's session had to expire first)
  # and committed more; then a moment placed by progress
  # (it_progress_moment), not by time.
  # An assignment, so that a failure inside (no progress) fails the test.
  moment=$(it_progress_moment "$prev" "$total")
  read -r moved step_msgs delay_ms <<<"$moment"
  at=$(it_committed)
  [ "$at" -lt "$total" ] ||
    fail "kill $k would land after the end ($at of $total committed): " \
      "the run is too short for $KILLS kills"
  it_worker_kill9 w1
  after=$(it_committed)
  echo "    kill $k: ${step_msgs} messages and ${delay_ms} ms after" \
    "progress ($prev -> $moved); $after of $total committed at the kill"
  [ "$after" -gt "$prev" ] || fail "no progress between kill $((k - 1)) and $k"
  prev=$after
  it_worker_start w1 "${worker_args[@]}"
done

step "the last worker finishes the backlog"
it_wait_consumed "$total" 120
starts=$(grep -c "consuming token-usage as group" "$IT_DIR/w1.log")
[ "$starts" -eq $((KILLS + 1)) ] ||
  fail "the log shows $starts worker starts, expected $((KILLS + 1))"
it_assert_sums "$IT_DIR/expect"
got=$(it_sql "SELECT sum(events) FROM tally.token_usage_daily")
[ "$got" = "$events" ] || fail "counted $got events, expected $events"
stored=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$stored" = "$events" ] || fail "dedupe store has $stored, expected $events"
implicit=$(it_summary "$IT_DIR/expect.summary" implicit)
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events
              WHERE idempotency_key LIKE 'kafka:token-usage:%'")
[ "$got" = "$implicit" ] ||
  fail "$got events with an implicit key stored, expected $implicit"
# Re-reading after a kill re-delivers what the open batch held: each
# start resumes exactly at the position Postgres has.
grep -q "resuming at offset" "$IT_DIR/w1.log" ||
  fail "no restart resumed from a stored position"
it_worker_stop w1
echo "PASS: $events events counted exactly once out of $total messages" \
  "across $KILLS kill -9"
