#!/usr/bin/env bash
# Postgres goes away under a running worker (a fast shutdown, then a crash:
# pg_ctl -m immediate) while it works through a backlog: the worker stays
# up, backs off (1 s doubling), re-claims its positions when Postgres is
# back and ends on exact sums. Then a worker started while Postgres is down
# waits for it (no crash loop) and proceeds once it is up.
#
# usage: test_worker_pg_restart.sh TALLY TALLY_GEN [EVENTS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 8
EVENTS=${3:-120000}
OUTAGE=5

step "generate and produce $EVENTS events (5% duplicates)"
"$TALLY_GEN" --count "$EVENTS" --seed 21 --tenants 1000 --dup-rate 0.05 \
  --implicit-rate 0.02 --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)
events=$(it_summary "$IT_DIR/expect.summary" events)
tokens=$(it_summary "$IT_DIR/expect.summary" tokens)
it_produce "$IT_DIR/events.jsonl"

# Sleeps N seconds, failing as soon as worker NAME is gone.
alive_for() {
  local name=$1 secs=$2
  for _ in $(seq 1 $((secs * 10))); do
    it_assert_alive "$name" "while Postgres was away"
    sleep 0.1
  done
}

# Waits until the group moved past N, asserting the worker is alive.
progress_alive() {
  local name=$1 above=$2 timeout=${3:-60}
  for _ in $(seq 1 $((timeout * 10))); do
    it_assert_alive "$name" "after Postgres came back"
    [ "$(it_committed)" -gt "$above" ] && return 0
    sleep 0.1
  done
  fail "the worker made no progress past $above in ${timeout}s"
}

# Small batches: more commits in flight when Postgres goes.
it_worker_start w1 --batch-size 2000 --batch-ms 100 --commit-ms 100
outage=0
for mode in fast immediate; do
  outage=$((outage + 1))
  before=$(it_committed)
  progress_alive w1 "$before" 60
  at=$(it_committed)
  [ "$at" -lt "$total" ] ||
    fail "the backlog was consumed before outage $outage; raise EVENTS"
  step "outage $outage: stop Postgres ($mode) at $at of $total, ${OUTAGE}s"
  stack_pg_stop "$IT_DIR" "$mode"
  alive_for w1 "$OUTAGE"
  stack_pg_start "$IT_DIR" || fail "Postgres did not start again"
  step "Postgres is back; the worker must resume"
  progress_alive w1 "$(it_committed)" 60
done
it_wait_consumed "$total" 120
it_assert_alive w1 "at the end"
it_assert_sums "$IT_DIR/expect"
got=$(it_sql "SELECT sum(events) FROM tally.token_usage_daily")
[ "$got" = "$events" ] || fail "counted $got events, expected $events"

step "the log shows the back-off and the recovery"
grep -Eq "retrying in 1 s" "$IT_DIR/w1.log" || fail "no 'retrying in 1 s' in the log"
grep -Eq "retrying in 2 s" "$IT_DIR/w1.log" ||
  fail "no 'retrying in 2 s' in the log: the back-off does not double"
# Reset after a recovery: the first retry after the first 'restored' (in
# the second outage) waits 1 s again. (Not a bound on the largest step:
# that depends on how long Postgres takes to come back, crash recovery
# included, which on a loaded machine can reach the 16 s step.)
first_after=$(sed -n '/postgres connection restored/,$p' "$IT_DIR/w1.log" |
  grep -Eo "retrying in [0-9]+ s" | head -1)
[ "$first_after" = "retrying in 1 s" ] ||
  fail "after Postgres came back the back-off was not reset: '$first_after'"
n=$(grep -c "postgres connection restored" "$IT_DIR/w1.log" || true)
[ "$n" -ge 2 ] || fail "'postgres connection restored' logged $n times, expected 2"
grep -q "will be consumed again from the positions in Postgres" \
  "$IT_DIR/w1.log" || fail "no batch was abandoned: did the outages land mid-run?"
it_worker_stop w1

step "a worker started while Postgres is down waits for it"
"$TALLY_GEN" --count 2000 --seed 22 --tenants 50 --dup-rate 0 \
  --expect "$IT_DIR/expect2" >"$IT_DIR/events2.jsonl"
events2=$(it_summary "$IT_DIR/expect2.summary" events)
tokens2=$(it_summary "$IT_DIR/expect2.summary" tokens)
it_produce "$IT_DIR/events2.jsonl"
stack_pg_stop "$IT_DIR" fast
it_worker_start w2
alive_for w2 4
it_wait_log w2 "retrying in [0-9]+ s" 1
stack_pg_start "$IT_DIR" || fail "Postgres did not start again"
it_wait_consumed $((total + 2000)) 60
it_assert_alive w2 "after Postgres came up"
got=$(it_sql "SELECT sum(events) || ' ' || sum(tokens) FROM tally.token_usage_daily")
[ "$got" = "$((events + events2)) $((tokens + tokens2))" ] ||
  fail "events/tokens are $got, expected $((events + events2)) $((tokens + tokens2))"

step "SIGTERM while it waits for Postgres: a clean exit"
it_worker_stop w2
stack_pg_stop "$IT_DIR" fast
it_worker_start w3
it_wait_log w3 "retrying in [0-9]+ s" 10
it_worker_stop w3
stack_pg_start "$IT_DIR"
echo "PASS: exact sums across two Postgres outages; a worker waits for" \
  "Postgres at start"
