#!/usr/bin/env bash
# The 64 MiB peak-RSS bound with everything draining at once: one worker
# with both pipelines and --consumers 2 takes a token-usage backlog many
# times its pre-fetch queues and a backlog of small cache invalidations
# (librdkafka's per-message overhead, not their bytes, is what a queue of
# them costs). The sums are exact and every invalidation is applied.
#
# usage: test_worker_rss.sh TALLY TALLY_GEN [EVENTS] [INVALIDATIONS]
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 64
EVENTS=${3:-500000}
INVALIDATIONS=${4:-200000}

step "a backlog: $EVENTS events over 3,000 tenants, $INVALIDATIONS invalidations"
"$TALLY_GEN" --count "$EVENTS" --seed 7 --tenants 3000 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
it_produce "$IT_DIR/events.jsonl"
# One cached key per invalidation, and one more per tenant that must stay.
awk -v n="$INVALIDATIONS" 'BEGIN { for (i = 0; i < n; i++)
    printf "{\"tenant_id\":\"t%d\",\"data_type\":\"agent\",\"resource_id\":\"a%d\"}\n",
      i % 3000, i }' >"$IT_DIR/invalidations.jsonl"
"$TALLY" produce --topic cache-invalidation \
  --file "$IT_DIR/invalidations.jsonl" >>"$IT_DIR/produce.log" 2>&1 ||
  fail "producing the invalidations failed"
it_assert_retained cache-invalidation
awk -v n="$INVALIDATIONS" 'BEGIN { for (i = 0; i < n; i++)
    printf "SET cache:{t%d}:agent:a%d v\n", i % 3000, i
  for (t = 0; t < 3000; t++) printf "SET cache:{t%d}:agent:keep v\n", t }' |
  it_redis_cli --pipe >/dev/null || fail "filling Redis failed"

step "one worker, both pipelines, --consumers 2, drains both"
port=$(it_free_port)
# The worker's own --batch-ms and --commit-ms (it_worker_start's are
# shorter): the largest windows, the most sums held.
it_worker_start w1 --consumers 2 --metrics-addr "127.0.0.1:$port" \
  --batch-ms 500 --commit-ms 1000
pid=$(it_worker_pid w1)
it_wait_consumed "$lines" 300
for _ in $(seq 1 600); do
  inv=$(it_metric "127.0.0.1:$port" tally_invalidation_messages_total)
  [ "${inv:-0}" -ge "$INVALIDATIONS" ] && break
  sleep 0.2
done
[ "${inv:-0}" -ge "$INVALIDATIONS" ] ||
  fail "consumed ${inv:-0} of $INVALIDATIONS invalidations in 120 s"
hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
echo "    peak RSS $((hwm / 1024)) MiB"
[ "$hwm" -le $((64 * 1024)) ] ||
  fail "peak RSS $((hwm / 1024)) MiB is over the 64 MiB bound"
it_assert_sums "$IT_DIR/expect"
# The counter moves as each invalidation is read, before its batch's
# UNLINKs: look until the keys are gone.
for _ in $(seq 1 100); do
  left=$(it_redis_cli --scan --pattern 'cache:*:agent:a*' | wc -l)
  [ "$left" -eq 0 ] && break
  sleep 0.2
done
kept=$(it_redis_cli --scan --pattern 'cache:*:agent:keep' | wc -l)
[ "$left" -eq 0 ] || fail "$left invalidated keys are still in Redis"
[ "$kept" -eq 3000 ] || fail "$kept of 3000 other keys kept"
it_worker_stop w1
echo "PASS: peak RSS $((hwm / 1024)) MiB (bound 64) with $lines events and" \
  "$INVALIDATIONS invalidations drained at once by 2 members; sums exact," \
  "every invalidated key gone, every other key kept"
