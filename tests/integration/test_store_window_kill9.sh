#!/usr/bin/env bash
# The store's windows (store_window_add/commit: several batches in one
# transaction, the sums upserted once at the end) under SIGKILL. The
# worker does not use them yet; tally-pgstage drives them as a consumer
# would: two connections, each with its own partitions and tenants (as
# producers keying by tenant make them; windows whose keys overlap
# deadlock, see the report of the pg branch), batches of 200 messages,
# windows of 5 batches (a quarter of a second apart, so that kills land
# all along the run), each start resuming at the positions Postgres
# holds. It is killed at random moments, again and again, and at fixed
# steps (the fault points: inside the window's transaction before
# COMMIT; COMMIT sent and its answer lost, after which the window is
# committed again). Every event must count exactly once.
#
# usage: test_store_window_kill9.sh TALLY TALLY_GEN TALLY_PGSTAGE [KILLS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
PGSTAGE=$(readlink -f "$3")
KILLS=${4:-5}
NOW=$(date +%s)

step "generate 60000 events (10% duplicates, 1% conflicts)"
"$TALLY_GEN" --count 60000 --seed 21 --tenants 500 --dup-rate 0.1 \
  --conflict-rate 0.01 --now "$NOW" --expect "$IT_DIR/expect" \
  >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
events=$(it_summary "$IT_DIR/expect.summary" events)

args=(--file "$IT_DIR/events.jsonl" --now "$NOW" --design real
  --batch 200 --window 5 --conns 2 --partitions 8 --resume --pause-ms 250)
stage_start() {
  "$PGSTAGE" "${args[@]}" >>"$IT_DIR/stage.log" 2>&1 &
  echo $! >"$IT_DIR/stage.pid"
}
stage_wait() { # sets $rc: the run's exit status
  rc=0
  wait "$(cat "$IT_DIR/stage.pid")" || rc=$?
  rm -f "$IT_DIR/stage.pid"
}

step "kill -9 at a fixed step: inside the third window's transaction"
TALLY_TEST_FAULT=inside-txn:3 stage_start
stage_wait
[ "$rc" = 137 ] || fail "the inside-txn fault did not kill the run (exit $rc)"
at=$(it_committed pgstage)
echo "    killed inside a window, $at of $lines committed"
[ "$at" -gt 0 ] || fail "killed before any window committed"

step "the answers to COMMITs lost (the windows committed again)"
# Every third COMMIT's answer lost, over the first quarter of the messages:
# each such window is committed again (its events then count before).
quarter=$((lines / 4))
args_half=("${args[@]}" --limit "$quarter")
TALLY_TEST_FAULT='commit-lost:*3' "$PGSTAGE" "${args_half[@]}" --pause-ms 0 \
  >>"$IT_DIR/stage.log" 2>&1 || fail "the run with lost COMMITs failed"
lost=$(grep -c "connection lost during COMMIT (test fault)" "$IT_DIR/stage.log")
[ "$lost" -ge 1 ] || fail "no COMMIT was lost"
got=$(it_committed pgstage)
[ "$got" = "$quarter" ] ||
  fail "after the lost COMMITs $got of the first $quarter committed"
echo "    $lost COMMITs lost, the first $got messages committed"

step "kill -9 $KILLS times at random moments"
prev=$(it_committed pgstage)
for k in $(seq 1 "$KILLS"); do
  stage_start
  moved=$(it_wait_progress "$prev" 120 pgstage)
  delay_ms=$(it_rand 50 700)
  sleep "$(printf '0.%03d' "$delay_ms")"
  kill -KILL "$(cat "$IT_DIR/stage.pid")" 2>/dev/null || true
  stage_wait
  after=$(it_committed pgstage)
  echo "    kill $k: ${delay_ms} ms after progress ($prev -> $moved);" \
    "$after of $lines committed"
  [ "$after" -lt "$lines" ] ||
    fail "kill $k landed after the end: the run is too short for $KILLS kills"
  prev=$after
done

step "a last run finishes"
stage_start
stage_wait
[ "$rc" = 0 ] || fail "the last run exited $rc"
got=$(it_committed pgstage)
[ "$got" = "$lines" ] || fail "positions add up to $got, expected $lines"
it_assert_sums "$IT_DIR/expect"
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$got" = "$events" ] || fail "dedupe store has $got events, expected $events"
echo "PASS: $events events counted exactly once out of $lines messages" \
  "across 2 fault points and $KILLS kill -9 of windows of 5 batches"
