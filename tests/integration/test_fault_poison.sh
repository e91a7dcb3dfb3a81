#!/usr/bin/env bash
# Poison isolation and dead letters once per process.
#
# A daily row sits near the bigint maximum; one event lands in that bucket
# (its sum would overflow: Postgres refuses the batch with "bigint out of
# range"), followed by 1,000 ordinary events and 100 bad messages. While
# the worker works through them, its Postgres connections are terminated
# again and again, so batches are rewound and consumed again. Expected:
# only the poison event is dead-lettered (reason store_rejected, the SQL
# error in the message, its original value), the 1,000 others count
# exactly, the poison row is untouched, and each of the 100 bad messages
# has exactly one dead letter although their batches were retried.
#
# usage: test_fault_poison.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
NEAR_MAX=9223372036854775000
GOOD=1000
BAD=100

step "a daily row near the bigint maximum"
it_sql "INSERT INTO tally.token_usage_daily (tenant_id, day, token_type,
          operation, model, agent_id, tokens, events)
        VALUES ('t-poison', (now() AT TIME ZONE 'UTC')::date, 'llm', 'chat',
          'm', '', $NEAR_MAX, 1)" >/dev/null

step "write the poison event, $GOOD ordinary ones and $BAD bad messages"
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
{
  printf '{"tenant_id":"t-poison","idempotency_key":"poison-1","tokens":1000,"token_type":"llm","operation":"chat","model":"m","occurred_at":"%s"}\n' "$now"
  for i in $(seq 1 "$GOOD"); do
    printf '{"tenant_id":"t-ok-%d","idempotency_key":"ok-%d","tokens":%d,"token_type":"llm","operation":"chat","model":"m","occurred_at":"%s"}\n' \
      $((i % 50)) "$i" "$i" "$now"
    if [ $((i % 10)) -eq 0 ]; then
      printf '{"tenant_id":"t-bad","tokens": oops %d}\n' "$i"
    fi
  done
} >"$IT_DIR/events.jsonl"
total=$(wc -l <"$IT_DIR/events.jsonl")
[ "$total" -eq $((1 + GOOD + BAD)) ] || fail "wrote $total lines"
want_tokens=$((GOOD * (GOOD + 1) / 2))

step "produce them in a trickle; terminate the worker's Postgres connections"
step "every second meanwhile (batches are rewound and consumed again)"
it_worker_start w1 --batch-size 50 --batch-ms 100 --commit-ms 100
it_wait_log w1 "rebalance \(token-usage\): assigned [1-9]" 30
it_produce_trickle "$IT_DIR/events.jsonl" 60 1
kills=0
for _ in $(seq 1 12); do
  sleep 1
  n=$(it_pg_terminate_workers)
  kills=$((kills + n))
done
it_trickle_wait
echo "    $kills connections terminated"
[ "$kills" -gt 0 ] || fail "no worker connection was terminated"
it_wait_consumed "$total" 120
it_assert_alive w1 "after the poison event"

step "the 1,000 ordinary events count exactly; the poison row is untouched"
got=$(it_sql "SELECT sum(tokens) || ' ' || sum(events)
              FROM tally.token_usage_daily WHERE tenant_id LIKE 't-ok-%'")
[ "$got" = "$want_tokens $GOOD" ] ||
  fail "ordinary events: tokens/events $got, expected $want_tokens $GOOD"
got=$(it_sql "SELECT tokens || ' ' || events FROM tally.token_usage_daily
              WHERE tenant_id = 't-poison'")
[ "$got" = "$NEAR_MAX 1" ] || fail "the poison row changed: $got"
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events
              WHERE tenant_id = 't-poison'")
[ "$got" = 0 ] || fail "the poison event is in the dedupe store ($got)"
grep -q "looking for the events it refuses" "$IT_DIR/w1.log" ||
  fail "the worker did not log the poison search"

step "dead letters: one store_rejected, one per bad message"
"$IT_PYTHON" - "$TALLY_BROKERS" "$BAD" <<'EOF' || fail "token-usage.dlq is not as expected"
import json, sys, time
from confluent_kafka import Consumer, TopicPartition
brokers, bad = sys.argv[1], int(sys.argv[2])
c = Consumer({"bootstrap.servers": brokers, "group.id": "dlq-check",
              "enable.auto.commit": False, "auto.offset.reset": "earliest"})
topic = "token-usage.dlq"
parts = c.list_topics(topic, timeout=10).topics[topic].partitions
tps = [TopicPartition(topic, p, 0) for p in parts]
ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in parts}
c.assign(tps)
msgs, deadline = [], time.time() + 30
while sum(ends.values()) > len(msgs) and time.time() < deadline:
    m = c.poll(0.5)
    if m is not None and not m.error():
        msgs.append(m)
c.close()
errors = []
by_reason, sources = {}, {}
for m in msgs:
    h = {k: (v or b"").decode() for k, v in (m.headers() or [])}
    r = h.get("tally.error.reason")
    by_reason[r] = by_reason.get(r, 0) + 1
    src = (h.get("tally.error.partition"), h.get("tally.error.offset"))
    sources[src] = sources.get(src, 0) + 1
    if r == "store_rejected":
        if "bigint out of range" not in h.get("tally.error.message", ""):
            errors.append("store_rejected message: %r" % h.get("tally.error.message"))
        v = json.loads(m.value())
        if v.get("idempotency_key") != "poison-1" or m.key() != b"t-poison":
            errors.append("store_rejected value/key: %r %r" % (m.key(), m.value()[:80]))
dups = {s: n for s, n in sources.items() if n > 1}
if dups:
    errors.append("%d messages dead-lettered more than once, e.g. %r" %
                  (len(dups), list(dups.items())[:3]))
if by_reason.get("store_rejected") != 1:
    errors.append("store_rejected: %r, expected 1" % by_reason.get("store_rejected"))
if by_reason.get("invalid_json") != bad:
    errors.append("invalid_json: %r, expected %d" % (by_reason.get("invalid_json"), bad))
for e in errors:
    print("  " + e, file=sys.stderr)
print("    dead letters by reason: %r" % by_reason)
sys.exit(1 if errors else 0)
EOF
rewinds=$(grep -c "abandoned" "$IT_DIR/w1.log" || true)
echo "    $rewinds batches abandoned and consumed again"
it_worker_stop w1
echo "PASS: poison event dead-lettered alone (store_rejected), $GOOD events" \
  "counted exactly, $BAD bad messages dead-lettered once each across" \
  "$kills terminated connections"
