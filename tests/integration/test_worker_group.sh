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
# Bound of every wait on the group (seconds): how long the group takes is
# not what this test checks. tally devbroker's group coordinator (the
# mock) waits up to session.timeout.ms - 1 s (5 s here) in every
# rebalance, and a Kafka commit queued behind a member's JoinGroup reaches
# it with the old generation: the member's assignment is "lost" and it
# joins again, another rebalance. With the workers committing every 200 ms
# a hand-over can take several such rounds (20-40 s were seen on a loaded
# 2-core machine, against bounds of 30 s before).
GROUP_S=180

# Number of partitions of group g whose last claim was by worker NAME
# (claims write the claimer's host/pid as the owner).
owned_by() { # owner is "host/pid/member"
  it_sql "SELECT count(*) FROM tally.consumer_offsets
          WHERE group_id = 'g' AND owner LIKE '%/$(it_worker_pid "$1")/%'"
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
# Thirds: a backlog, a trickle while both share it, a trickle after w1
# stopped (so that the stop certainly lands mid-run, and w2 has events of
# every partition to consume after it, however long the group took).
third=$((lines1 / 3))
head -n "$third" "$IT_DIR/events1.jsonl" >"$IT_DIR/first.jsonl"
sed -n "$((third + 1)),$((2 * third))p" "$IT_DIR/events1.jsonl" \
  >"$IT_DIR/mid.jsonl"
tail -n +$((2 * third + 1)) "$IT_DIR/events1.jsonl" >"$IT_DIR/last.jsonl"
it_produce "$IT_DIR/first.jsonl"
it_worker_start w1 --group g --batch-size 2000
it_worker_start w2 --group g --batch-size 2000
it_produce_trickle "$IT_DIR/mid.jsonl" 2000 0.4
it_wait_log w1 "rebalance \(token-usage\): assigned [1-9]" "$GROUP_S"
it_wait_log w2 "rebalance \(token-usage\): assigned [1-9]" "$GROUP_S"
# Both hold partitions of their own: each was the last to claim some.
for _ in $(seq 1 $((GROUP_S * 10))); do
  [ "$(owned_by w1)" -gt 0 ] && [ "$(owned_by w2)" -gt 0 ] && break
  sleep 0.1
done
for w in w1 w2; do
  [ "$(owned_by "$w")" -gt 0 ] || fail "$w holds no partition in Postgres"
done
it_wait_progress "$(it_committed g)" 60 g >/dev/null
at=$(it_committed g)
[ "$at" -lt "$lines1" ] || fail "consumed everything before the stop"
step "SIGTERM w1 at $at of $lines1 (holding $(owned_by w1) partitions): it" \
  "exits 0, w2 takes its partitions"
it_worker_stop w1
grep -q "stopped cleanly" "$IT_DIR/w1.log" || fail "w1 did not log a clean stop"
it_trickle_wait
it_produce_trickle "$IT_DIR/last.jsonl" 2000 0.4
it_trickle_wait
it_wait_consumed "$lines1" "$GROUP_S" g
# Every partition had events after the stop: w2 claimed each of them.
[ "$(owned_by w2)" = 8 ] ||
  fail "w2 holds $(owned_by w2) of the 8 partitions after w1 left"
it_assert_sums "$IT_DIR/expect1"
it_assert_alive w2 "after taking over"

# ------------------------------------------------------------------
step "2. a zombie: SIGSTOP one worker past the session timeout"
# Long batches (15 s, no size limit reached): frozen as soon as it has
# consumed its first message, the worker holds an open batch that it has
# not tried to commit yet (for 15 s: ample on a loaded machine); it tries
# when it thaws. (Frozen in the middle of a commit, it would hold row locks
# in Postgres that stall the other worker until it thaws or Postgres drops
# the session.)
it_worker_start w3 --group g --batch-size 1000000 --batch-bytes 1000000000 \
  --batch-ms 15000 --batch-idle-ms 0
it_produce_trickle "$IT_DIR/events2.jsonl" 1500 0.3
it_wait_log w3 "claimed \(epoch" "$GROUP_S"
it_wait_log w3 "first message: " "$GROUP_S"
# ... and still the owner of partitions (not lost to w2 meanwhile).
for _ in $(seq 1 $((GROUP_S * 10))); do
  [ "$(owned_by w3)" -gt 0 ] && break
  sleep 0.1
done
zpid=$(it_worker_pid w3)
kill -STOP "$zpid"
frozen_at=$(it_committed g)
step "w3 frozen at $frozen_at; w2 must claim its partitions and go on"
[ "$(owned_by w3)" -gt 0 ] || fail "w3 owned no partition when frozen"
for _ in $(seq 1 $((GROUP_S * 10))); do
  [ "$(owned_by w3)" = 0 ] && break
  sleep 0.1
done
[ "$(owned_by w3)" = 0 ] ||
  fail "w2 did not claim the frozen worker's partitions in ${GROUP_S}s"
it_wait_progress "$(it_committed g)" 60 g >/dev/null
sleep 2
step "SIGCONT w3: it must find out that its partitions are gone"
kill -CONT "$zpid"
it_wait_log w3 "fenced: another member claimed it|rebalance \(token-usage\): revoked [0-9]+ partitions \(lost\)" "$GROUP_S"
it_trickle_wait
it_wait_consumed $((lines1 + lines2)) "$GROUP_S" g
it_merge_expect "$IT_DIR/expect" "$IT_DIR/expect1" "$IT_DIR/expect2"
it_assert_sums "$IT_DIR/expect"
events=$(($(it_summary "$IT_DIR/expect1.summary" events) +
  $(it_summary "$IT_DIR/expect2.summary" events)))
got=$(it_sql "SELECT sum(events) FROM tally.token_usage_daily")
[ "$got" = "$events" ] || fail "counted $got events, expected $events"
stored=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$stored" = "$events" ] || fail "dedupe store has $stored, expected $events"

echo "    what the zombie's log says after SIGCONT:"
grep -E "fenced|\(lost\)|abandoned|rebalance \(token-usage\): " "$IT_DIR/w3.log" |
  sed 's/^/      /' | tail -8
it_assert_alive w2 "at the end"
it_assert_alive w3 "at the end"
it_worker_stop w3
it_worker_stop w2
echo "PASS: exact sums across a clean hand-over and a zombie"
