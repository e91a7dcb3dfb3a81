#!/usr/bin/env bash
# SIGKILL at precise steps (the worker's test-only fault points,
# TALLY_TEST_FAULT=NAME[:N]), then a restart without them:
#   after-pg-commit  the batch is committed in Postgres, the offsets not
#                    yet in Kafka: nothing may count twice;
#   inside-txn       everything of the batch written, COMMIT not sent:
#                    nothing may be lost;
#   before-redis-apply  invalidations read, not applied: they are applied
#                    after the restart.
# Each ends on exact totals against what was produced.
#
# usage: test_fault_crash_points.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

"$TALLY_GEN" --count 20000 --seed 17 --tenants 200 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)
it_produce "$IT_DIR/events.jsonl"

# A transaction per batch (--commit-batches 1): the points land on
# batches; test_worker_window_kill9.sh has them inside windows.
args=(--batch-size 1000 --batch-ms 100 --commit-ms 100 --commit-batches 1
  -X session.timeout.ms=3000)
step "kill -9 right after the third Postgres commit, before the Kafka commit"
it_crash_at a1 after-pg-commit:3 "${args[@]}"
at=$(it_committed)
echo "    killed with $at of $total committed in Postgres"
[ "$at" -gt 0 ] && [ "$at" -lt "$total" ] || fail "killed at $at of $total"

step "kill -9 inside the transaction of the second batch of a new worker"
it_crash_at a2 inside-txn:2 "${args[@]}"
at2=$(it_committed)
echo "    killed with $at2 of $total committed"
[ "$at2" -ge "$at" ] || fail "positions went back: $at -> $at2"

step "a worker without fault points finishes: exact sums"
it_worker_start a3 "${args[@]}"
it_wait_consumed "$total" 120
it_assert_sums "$IT_DIR/expect"
events=$(it_summary "$IT_DIR/expect.summary" events)
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$got" = "$events" ] || fail "dedupe store has $got events, expected $events"
it_worker_stop a3

step "invalidations: kill -9 between reading a batch and applying it"
for i in $(seq 1 50); do echo "SET cache:{t9}:document:d$i v"; done |
  it_redis_cli >/dev/null
for i in $(seq 1 50); do
  printf '{"tenant_id":"t9","data_type":"document","resource_id":"d%d"}\n' "$i"
done >"$IT_DIR/inv.jsonl"
"$TALLY" produce --topic cache-invalidation --file "$IT_DIR/inv.jsonl" \
  >>"$IT_DIR/produce.log" 2>&1 || fail "producing the invalidations"
it_crash_at i1 before-redis-apply --usage-topic "" -X session.timeout.ms=3000
left=$(it_redis_cli --scan --pattern 'cache:{t9}:*' | wc -l)
[ "$left" -eq 50 ] || fail "$left of 50 keys left after the kill, expected 50"
it_worker_start i2 --usage-topic "" -X session.timeout.ms=3000
for _ in $(seq 1 600); do
  left=$(it_redis_cli --scan --pattern 'cache:{t9}:*' | wc -l)
  [ "$left" -eq 0 ] && break
  sleep 0.1
done
[ "$left" -eq 0 ] || fail "$left keys not invalidated after the restart"
it_worker_stop i2
echo "PASS: after-pg-commit and inside-txn kills: $events events counted" \
  "exactly once of $total messages; the 50 invalidations read before a" \
  "kill were applied after the restart"
