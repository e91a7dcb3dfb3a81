#!/usr/bin/env bash
# Postgres failing in the ways that matter for exactness, under one
# running worker: the connection lost while COMMIT is in flight (every
# 4th commit, the fault point commit-lost: COMMIT sent, its answer never
# read, so the worker cannot know whether it went in), the worker's
# connections terminated every 2 s, and Postgres stopped for 30 s.
# The worker stays up and the sums end exact.
#
# usage: test_fault_postgres.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

"$TALLY_GEN" --count 60000 --seed 61 --tenants 300 --dup-rate 0.05 \
  --implicit-rate 0.02 --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)

step "a worker losing the connection during every 4th COMMIT"
TALLY_TEST_FAULT='commit-lost:*4' it_worker_start w1 --batch-size 1000 \
  --batch-ms 100 --commit-ms 100
it_wait_log w1 "rebalance \(token-usage\): assigned [1-9]" 30
it_produce_trickle "$IT_DIR/events.jsonl" 3000 1

step "its connections terminated every 2 s for 10 s"
kills=0
for _ in $(seq 1 5); do
  sleep 2
  n=$(it_pg_terminate_workers)
  kills=$((kills + n))
done
echo "    $kills connections terminated"

step "Postgres stopped for 30 s"
at=$(it_committed)
stack_pg_stop "$IT_DIR" fast
for _ in $(seq 1 300); do
  it_assert_alive w1 "while Postgres was stopped"
  sleep 0.1
done
stack_pg_start "$IT_DIR" || fail "Postgres did not start again"
echo "    stopped at $at of $total committed"
it_trickle_wait
it_wait_consumed "$total" 180
it_assert_sums "$IT_DIR/expect"
lost=$(grep -c "TALLY_TEST_FAULT: commit-lost" "$IT_DIR/w1.log" || true)
[ "$lost" -gt 0 ] || fail "no COMMIT was lost"
events=$(it_summary "$IT_DIR/expect.summary" events)
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$got" = "$events" ] || fail "dedupe store has $got events, expected $events"
it_worker_stop w1
echo "PASS: $lost COMMITs lost in flight, $kills connections terminated," \
  "30 s without Postgres: $events events counted exactly once of $total"
