#!/usr/bin/env bash
# A rolling restart, the way a deployment does it, on both topics: one
# long-running worker counts a trickle of token-usage events and applies
# a trickle of invalidations while members join and are SIGTERMed again
# and again, some before their first assignment. Each stop must end by
# itself with exit 0 (librdkafka 2.0.2 aborted in rd_kafka_destroy(), its
# issue #4312, and looped when one group's members subscribed to
# different topics, #4783). At the end the sums are exact, every
# invalidation was applied, and the long-running worker still consumes
# every partition of both topics.
#
# usage: test_fault_rolling.sh TALLY TALLY_GEN [ROUNDS] [MEMBERS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
ROUNDS=${3:-2}
MEMBERS=${4:-5}
KEYS=400 # invalidations: one key each

step "generate the usage events and the invalidations"
"$TALLY_GEN" --count 60000 --seed 44 --tenants 500 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)
for i in $(seq 1 "$KEYS"); do
  echo "SET cache:{t1}:agent:a$i v"
done | it_redis_cli >/dev/null
for i in $(seq 1 "$KEYS"); do
  printf '{"tenant_id":"t1","data_type":"agent","resource_id":"a%d","event_id":"e%d"}\n' "$i" "$i"
done >"$IT_DIR/inv.jsonl"
head -n $((KEYS / 2)) "$IT_DIR/inv.jsonl" >"$IT_DIR/inv.during"
tail -n $((KEYS / 2)) "$IT_DIR/inv.jsonl" >"$IT_DIR/inv.after"

worker_args=(--batch-size 2000)
it_worker_start w0 "${worker_args[@]}"
it_wait_log w0 "rebalance \(token-usage\): assigned [1-9]" 30
it_wait_log w0 "rebalance \(cache-invalidation\): assigned [1-9]" 30

step "usage events and the first $((KEYS / 2)) invalidations in a trickle"
it_produce_trickle "$IT_DIR/events.jsonl" 1500 1
split -l 10 -d -a 4 "$IT_DIR/inv.during" "$IT_DIR/inv.chunk."
(
  for f in "$IT_DIR"/inv.chunk.*; do
    "$TALLY" produce --topic cache-invalidation --file "$f" \
      >>"$IT_DIR/produce-inv.log" 2>&1 || exit 1
    sleep 1
  done
) &
inv_pid=$!

step "$ROUNDS rounds of $MEMBERS members started and SIGTERMed"
stops=0
for r in $(seq 1 "$ROUNDS"); do
  for m in $(seq 1 "$MEMBERS"); do
    name="m$r-$m"
    it_worker_start "$name" "${worker_args[@]}"
    # From before the first assignment (0.3 s) to well after it (5 s).
    ms=$(it_rand 300 5000)
    sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
    t0=$(date +%s)
    it_worker_stop "$name" # exit 0 within 60 s, or it fails here
    took=$(($(date +%s) - t0))
    ! grep -q "stop did not finish" "$IT_DIR/$name.log" ||
      fail "$name needed the --shutdown-timeout exit"
    echo "    $name: stopped ${ms} ms after start, in ${took} s"
    stops=$((stops + 1))
    it_assert_alive w0 "during the rolling restart"
  done
done
wait "$inv_pid" || fail "producing the invalidations failed"
it_trickle_wait

step "the long-running worker finishes both topics"
it_wait_consumed "$total" 180
it_assert_sums "$IT_DIR/expect"
"$TALLY" produce --topic cache-invalidation --file "$IT_DIR/inv.after" \
  >>"$IT_DIR/produce-inv.log" 2>&1 || fail "producing the last invalidations"
left=""
for _ in $(seq 1 900); do
  left=$(it_redis_cli --scan --pattern 'cache:{t1}:agent:*' | wc -l)
  [ "$left" -eq 0 ] && break
  sleep 0.2
done
[ "$left" -eq 0 ] ||
  fail "$left of $KEYS invalidated keys are still in Redis (a consumer left idle?)"
it_worker_stop w0
grep -q "rebalance (cache-invalidation): assigned" "$IT_DIR/w0.log" ||
  fail "w0 never had invalidation partitions"
echo "PASS: $stops members started and SIGTERMed (each exit 0, none past" \
  "--shutdown-timeout), sums exact over $total messages, all $KEYS" \
  "invalidations applied"
