#!/usr/bin/env bash
# Two workers in one consumer group while events keep arriving.
#  1. One of them stops (SIGTERM, exit 0) mid-run: the other takes its
#     partitions over; exact sums.
#  2. A zombie: one is frozen (SIGSTOP) for longer than the session
#     timeout, the group gives its partitions to the other, then it thaws
#     (SIGCONT) with its old batch: fenced or told its partitions are
#     lost, it must not double count; exact sums.
#
# usage: test_worker_group.sh TALLY TALLY_GEN [EVENTS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 8
EVENTS=${3:-60000}
SESSION_S=6 # lib.sh: -X session.timeout.ms=6000

# Number of "rebalance: assigned N" lines with N > 0 in a worker's log.
assigned_count() {
  grep -Ec "rebalance: assigned [1-9]" "$IT_DIR/$1.log" || true
}

step "generate two sets of $EVENTS events (5% duplicates, 2% implicit keys)"
"$TALLY_GEN" --count "$EVENTS" --seed 31 --tenants 500 --dup-rate 0.05 \
  --conflict-rate 0.01 --implicit-rate 0.02 --expect "$IT_DIR/expect1" \
  >"$IT_DIR/events1.jsonl"
"$TALLY_GEN" --count "$EVENTS" --seed 32 --tenants 500 --dup-rate 0.05 \
  --implicit-rate 0.02 --expect "$IT_DIR/expect2" >"$IT_DIR/events2.jsonl"
lines1=$(it_summary "$IT_DIR/expect1.summary" lines)
lines2=$(it_summary "$IT_DIR/expect2.summary" lines)

# ------------------------------------------------------------------
step "1. two workers share the backlog; events keep arriving"
head -n $((lines1 / 3)) "$IT_DIR/events1.jsonl" >"$IT_DIR/first.jsonl"
tail -n +$((lines1 / 3 + 1)) "$IT_DIR/events1.jsonl" >"$IT_DIR/rest.jsonl"
it_produce "$IT_DIR/first.jsonl"
it_worker_start w1 --group g --batch-size 2000
it_worker_start w2 --group g --batch-size 2000
it_produce_trickle "$IT_DIR/rest.jsonl" 2000 0.4
it_wait_log w1 "rebalance: assigned [1-9]" 30
it_wait_log w2 "rebalance: assigned [1-9]" 30
it_wait_progress "$(it_committed g)" 30 g >/dev/null
# Both hold partitions of their own.
for w in w1 w2; do
  grep -q "claimed (epoch" "$IT_DIR/$w.log" || fail "$w claimed nothing"
done
at=$(it_committed g)
[ "$at" -lt "$lines1" ] || fail "consumed everything before the stop"
before=$(assigned_count w2)
step "SIGTERM w1 at $at of $lines1: it exits 0, w2 takes its partitions"
it_worker_stop w1
grep -q "stopped cleanly" "$IT_DIR/w1.log" || fail "w1 did not log a clean stop"
it_trickle_wait
it_wait_consumed "$lines1" 90 g
[ "$(assigned_count w2)" -gt "$before" ] ||
  fail "w2 was not assigned w1's partitions after w1 left"
owners=$(it_sql "SELECT count(DISTINCT owner) FROM tally.consumer_offsets
                 WHERE group_id = 'g'")
[ "$owners" = "1" ] || fail "$owners owners of the group's partitions, expected w2 alone"
it_assert_sums "$IT_DIR/expect1"
it_assert_alive w2 "after taking over"

# ------------------------------------------------------------------
step "2. a zombie: SIGSTOP one worker past the session timeout"
# Long batches (4 s, no size limit reached): frozen 1.5 s after it claimed
# its partitions, the worker holds an open batch that it has not tried to
# commit yet; it tries when it thaws. (Frozen in the middle of a commit,
# it would hold row locks in Postgres that stall the other worker until
# it thaws or Postgres drops the session.)
it_worker_start w3 --group g --batch-size 1000000 --batch-bytes 1000000000 \
  --batch-ms 4000
it_produce_trickle "$IT_DIR/events2.jsonl" 1500 0.3
it_wait_log w3 "claimed \(epoch" 30
sleep 1.5
zpid=$(it_worker_pid w3)
kill -STOP "$zpid"
frozen_at=$(it_committed g)
step "w3 frozen at $frozen_at; w2 must claim its partitions and go on"
# Claims write the claimer's host/pid as the owner of the partition.
owned_by_zombie() {
  it_sql "SELECT count(*) FROM tally.consumer_offsets
          WHERE group_id = 'g' AND owner LIKE '%/$zpid'"
}
[ "$(owned_by_zombie)" -gt 0 ] || fail "w3 owned no partition when frozen"
for _ in $(seq 1 $(((SESSION_S + 25) * 10))); do
  [ "$(owned_by_zombie)" = 0 ] && break
  sleep 0.1
done
[ "$(owned_by_zombie)" = 0 ] ||
  fail "w2 did not claim the frozen worker's partitions in $((SESSION_S + 25))s"
it_wait_progress "$(it_committed g)" 30 g >/dev/null
sleep 2
step "SIGCONT w3: it must find out that its partitions are gone"
kill -CONT "$zpid"
it_wait_log w3 "fenced: another member claimed it|rebalance: revoked [0-9]+ partitions \(lost\)" 30
it_trickle_wait
it_wait_consumed $((lines1 + lines2)) 90 g
it_merge_expect "$IT_DIR/expect" "$IT_DIR/expect1" "$IT_DIR/expect2"
it_assert_sums "$IT_DIR/expect"
events=$(($(it_summary "$IT_DIR/expect1.summary" events) +
  $(it_summary "$IT_DIR/expect2.summary" events)))
got=$(it_sql "SELECT sum(events) FROM tally.token_usage_daily")
[ "$got" = "$events" ] || fail "counted $got events, expected $events"
stored=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$stored" = "$events" ] || fail "dedupe store has $stored, expected $events"

echo "    what the zombie's log says after SIGCONT:"
grep -E "fenced|\(lost\)|abandoned|rebalance: " "$IT_DIR/w3.log" |
  sed 's/^/      /' | tail -8
it_assert_alive w2 "at the end"
it_assert_alive w3 "at the end"
it_worker_stop w3
it_worker_stop w2
echo "PASS: exact sums across a clean hand-over and a zombie"
