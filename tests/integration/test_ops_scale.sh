#!/usr/bin/env bash
# Scale out: three members of the token-usage group as threads of one
# process (--consumers 3), then as processes, with members leaving (kill
# -9) and joining mid-run while a producer keeps going; the same keys
# arrive on several partitions, so concurrent commits insert the same
# keys. Exact totals, every deadlock between windows answered by
# committing its range a batch at a time, every member ready.
#
# usage: test_ops_scale.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 8

"$TALLY_GEN" --count 40000 --seed 71 --tenants 400 --dup-rate 0.1 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
# A third of the lines again without a Kafka key (kcat: random
# partitions): the duplicates land on other partitions, committed by other
# members at the same time.
awk 'NR % 3 == 0' "$IT_DIR/events.jsonl" >"$IT_DIR/replay.jsonl"
total=$(($(wc -l <"$IT_DIR/events.jsonl") + $(wc -l <"$IT_DIR/replay.jsonl")))
short=(-X session.timeout.ms=3000 --batch-size 1000 --batch-ms 100
  --commit-ms 100)

step "one process with --consumers 3"
port=$(it_free_port)
it_worker_start w1 --consumers 3 --metrics-addr "127.0.0.1:$port" "${short[@]}"
for _ in $(seq 1 300); do
  n=$(grep -c "rebalance (token-usage): assigned [1-9]" "$IT_DIR/w1.log" || true)
  [ "$n" -ge 3 ] && break
  sleep 0.1
done
[ "$n" -ge 3 ] || fail "the 3 members of w1 did not all get partitions"
got=$(it_metric "127.0.0.1:$port" tally_usage_partitions_assigned)
[ "$got" = 8 ] || fail "tally_usage_partitions_assigned is $got, expected 8"
for k in 1 2 3; do
  it_metric "127.0.0.1:$port" "tally_ready{check=\"token-usage#$k\"}" |
    grep -qx 1 || fail "member $k is not ready"
done
it_produce_trickle "$IT_DIR/events.jsonl" 4000 1
# (random per message: kcat's sticky batching would pile them on one
# partition, past what tally devbroker keeps)
kcat -P -b "$TALLY_BROKERS" -t token-usage -X partitioner=random \
  -X sticky.partitioning.linger.ms=0 -l "$IT_DIR/replay.jsonl" ||
  fail "producing the replay failed"

step "processes join and leave mid-run"
it_wait_progress 7000 60 >/dev/null
it_worker_start w2 "${short[@]}"
it_wait_progress 16000 60 >/dev/null
it_worker_start w3 --consumers 2 "${short[@]}"
sleep 3
it_worker_kill9 w2
it_wait_progress 26000 60 >/dev/null
it_worker_kill9 w1
it_trickle_wait

it_assert_retained token-usage

step "the rest finish: exact totals"
it_wait_consumed "$total" 180
it_assert_sums "$IT_DIR/expect"
# Two members' windows (several batches a transaction) that insert the
# same keys can deadlock: Postgres rolls one back, and that member
# consumes the range again a batch at a time (sorted keys: a batch alone
# never waits in a cycle with another batch alone). Each deadlock must
# be answered so; nothing else may fail.
deadlocks=$(cat "$IT_DIR"/w*.log | grep -c "messages not committed.*deadlock detected" || true)
answered=$(cat "$IT_DIR"/w*.log | grep -c "committed again a batch at a time" || true)
echo "    $deadlocks deadlocks between windows, $answered answered"
[ "$answered" -ge "$deadlocks" ] ||
  fail "$deadlocks deadlocks, only $answered answered a batch at a time"
other=$(cat "$IT_DIR"/w*.log | grep -i "deadlock" |
  grep -vc "messages not committed\|postgres commit failed\|committed again a batch at a time" || true)
[ "$other" -eq 0 ] || fail "$other deadlock lines outside a window's commit"

step "a replay of the whole topic into the same group changes no sum"
it_daily_tsv >"$IT_DIR/before.tsv"
it_worker_kill9 w3
sleep 4 # its session expires: the group is empty
"$TALLY" offsets reset --to earliest >"$IT_DIR/reset.log" 2>&1 ||
  fail "tally offsets reset --to earliest: $(tail -3 "$IT_DIR/reset.log")"
grep -q "moved" "$IT_DIR/reset.log" || fail "the reset did not move"
[ "$(it_committed)" -lt "$total" ] || fail "the reset left nothing to replay"
sleep 7 # the reset's own member of the group times out on the dev broker
it_worker_start w4 "${short[@]}"
it_wait_consumed "$total" 180
it_daily_tsv >"$IT_DIR/after.tsv"
cmp -s "$IT_DIR/before.tsv" "$IT_DIR/after.tsv" ||
  fail "the replay changed the sums: $(diff "$IT_DIR/before.tsv" "$IT_DIR/after.tsv" | head -5)"
it_assert_sums "$IT_DIR/expect"
it_worker_stop w4
echo "PASS: $total messages over 3 threads, then processes joining and" \
  "leaving: exact sums, $deadlocks deadlocks between windows each answered a batch at a time; a replay of the whole topic changed" \
  "no sum"
