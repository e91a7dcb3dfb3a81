#!/usr/bin/env bash
# The worker's windows (--commit-batches: several batches in one Postgres
# transaction, their sums upserted once) under SIGKILL:
#   window-open   batches added to an open window, the process killed
#                 before its COMMIT: none of them may count, and the
#                 positions stay where the last COMMIT left them;
#   inside-txn    a whole window written, COMMIT not sent: likewise;
#   commit-lost   the connection drops while a window's COMMIT is in
#                 flight: the worker cannot know the outcome and must
#                 settle it from the positions in Postgres;
# then kill -9 at random moments mid-backlog, restarting each time. Ends
# on exact totals against what was produced.
#
# usage: test_worker_window_kill9.sh TALLY TALLY_GEN [EVENTS] [KILLS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 8
EVENTS=${3:-150000}
KILLS=${4:-4}

step "generate $EVENTS events (10% duplicates, 5% without idempotency_key)"
"$TALLY_GEN" --count "$EVENTS" --seed 23 --tenants 500 --dup-rate 0.1 \
  --conflict-rate 0.01 --implicit-rate 0.05 --expect "$IT_DIR/expect" \
  >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)
events=$(it_summary "$IT_DIR/expect.summary" events)
it_produce "$IT_DIR/events.jsonl"

# Windows of 8 batches of 1,000 messages; --batch-ms and --commit-ms
# long enough that batches close by size while the backlog lasts. A short session: a
# restart gets the partitions back soon after a kill.
args=(--batch-size 1000 --commit-batches 8 --batch-ms 3000 --commit-ms 3000
  -X session.timeout.ms=3000)

# The messages the transactions in worker NAME's debug log committed.
logged_commits() {
  awk '/committed [0-9]+ batches in one transaction/ {
         for (i = 1; i <= NF; i++) if ($i == "transaction:") s += $(i + 1) }
       END { print s + 0 }' "$IT_DIR/$1.log"
}

step "kill -9 with three batches in the first window, before its COMMIT"
it_crash_at w1 window-open:3 "${args[@]}" --log-level debug
at=$(it_committed)
[ "$at" -eq 0 ] || fail "$at messages committed; the open window held all"
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$got" -eq 0 ] || fail "$got events stored from a window never committed"

step "kill -9 inside the second window's transaction (all written)"
it_crash_at w2 inside-txn:2 "${args[@]}" --log-level debug
at=$(it_committed)
want=$(logged_commits w2)
echo "    killed with $at of $total committed ($want by the log)"
[ "$at" -gt 0 ] && [ "$at" -eq "$want" ] ||
  fail "Postgres has $at committed, the worker's log $want"
grep -Eq "committed ([2-9]|[1-9][0-9]+) batches in one transaction" \
  "$IT_DIR/w2.log" || fail "no window of several batches was committed"

step "the connection drops during a window's COMMIT; then kill -9 $KILLS times"
TALLY_TEST_FAULT=commit-lost:1 it_worker_start w3 "${args[@]}"
it_wait_log w3 "connection lost during COMMIT" 60
prev=$at
for k in $(seq 1 "$KILLS"); do
  # An assignment, so that a failure inside (no progress) fails the test.
  moment=$(it_progress_moment "$prev" "$total")
  read -r moved step_msgs delay_ms <<<"$moment"
  at=$(it_committed)
  [ "$at" -lt "$total" ] ||
    fail "kill $k would land after the end ($at of $total committed)"
  it_worker_kill9 w3
  after=$(it_committed)
  echo "    kill $k: ${step_msgs} messages and ${delay_ms} ms after" \
    "progress ($prev -> $moved); $after of $total committed at the kill"
  prev=$after
  it_worker_start w3 "${args[@]}"
done

step "the last worker finishes the backlog: exact sums"
it_wait_consumed "$total" 180
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
it_worker_stop w3
echo "PASS: $events events counted exactly once out of $total messages;" \
  "kills with a window open and inside its COMMIT, a lost COMMIT and" \
  "$KILLS kill -9 at random"
