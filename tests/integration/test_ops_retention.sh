#!/usr/bin/env bash
# Retention: the worker deletes expired events from the dedupe store while
# it counts. 100,000 events past the window (occurred_at 40-60 days ago,
# inserted with SQL) and a few recent ones; a worker with
# --prune-interval 8 counts a stream of events produced in chunks
# meanwhile (its first pruning comes 8 s after start, once counting has
# begun: an idle worker joining its group would prune before). In the end no expired row is left (deleted in 50,000-row
# steps, not one step an interval), the recent rows and every counted
# event are still there, and the sums equal tally-gen's expectation.
#
# usage: test_ops_retention.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

expired=100000
step "the store holds $expired expired events and 4 recent ones"
it_sql "INSERT INTO tally.token_usage_events
    (tenant_id, idempotency_key, occurred_at, token_type, operation, model,
     tokens, source)
  SELECT 'old-' || (g % 100), 'expired-' || g,
         now() - interval '40 days' - (g % 1728000) * interval '1 second',
         'llm', 'chat', 'm1', 10, 'sql'
    FROM generate_series(1, $expired) g" >/dev/null
# Inside the window (the worker deletes past --dedupe-days + 1 = 36 days).
it_sql "INSERT INTO tally.token_usage_events
    (tenant_id, idempotency_key, occurred_at, token_type, operation, model,
     tokens, source)
  VALUES ('recent', 'r1', now(), 'llm', 'chat', 'm1', 1, 'sql'),
         ('recent', 'r2', now() - interval '1 day', 'llm', 'chat', 'm1', 1, 'sql'),
         ('recent', 'r3', now() - interval '30 days', 'llm', 'chat', 'm1', 1, 'sql'),
         ('recent', 'r4', now() - interval '35 days', 'llm', 'chat', 'm1', 1, 'sql')" \
  >/dev/null

step "a worker prunes while events are produced in chunks"
"$TALLY_GEN" --count 30000 --tenants 200 --seed 7 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
counted=$(it_summary "$IT_DIR/expect.summary" events)
it_worker_start w1 --prune-interval 8
it_wait_log w1 "consuming token-usage" 30
# 2,000 lines every 0.5 s (15 chunks, ~10 s of traffic).
it_produce_trickle "$IT_DIR/events.jsonl" 2000 0.5
it_trickle_wait
it_assert_retained token-usage
it_wait_consumed "$lines" 60

left=""
for _ in $(seq 1 300); do
  left=$(it_sql "SELECT count(*) FROM tally.token_usage_events
                 WHERE idempotency_key LIKE 'expired-%'")
  [ "$left" = 0 ] && break
  sleep 0.1
done
[ "$left" = 0 ] || fail "$left expired events left after 30 s"
deleted=$(grep -Eo 'pruned [0-9]+ events' "$IT_DIR/w1.log" |
  awk '{ s += $2 } END { print s + 0 }')
steps=$(grep -c 'pruned 50000 events' "$IT_DIR/w1.log" || true)
[ "$deleted" = "$expired" ] ||
  fail "the worker logged $deleted events pruned, expected $expired"
[ "$steps" -ge 2 ] || fail "expected 50,000-row steps, the log has $steps"
# While counting: the first deletion after the first message (timestamps
# in one format, compared as strings).
first_msg=$(grep -m1 'first message' "$IT_DIR/w1.log" | cut -d' ' -f1)
first_prune=$(grep -m1 'pruned [0-9]* events' "$IT_DIR/w1.log" | cut -d' ' -f1)
[[ "$first_prune" > "$first_msg" ]] ||
  fail "pruned at $first_prune, before counting began at $first_msg"
# Between two deletes, at least four times the first one's duration
# passes (they take at most a fifth of the connection's time). Each line
# is logged as its delete ends: "<time> info pruned N events ... in T ms".
grep -E 'pruned [0-9]+ events' "$IT_DIR/w1.log" |
  while read -r ts rest; do
    echo "$(date -d "$ts" +%s%3N) $(sed -E 's/.* in ([0-9]+) ms$/\1/' <<<"$rest")"
  done >"$IT_DIR/prunes"
gaps=$(awk 'NR > 1 { start = $1 - $2; if (start - end < 4 * took - 2)
                       printf "%d ms after a %d ms delete; ", start - end, took }
            { end = $1; took = $2 }' "$IT_DIR/prunes")
[ -z "$gaps" ] || fail "deletes too close together: $gaps"

step "the recent rows and the counted events stay; the sums are exact"
recent=$(it_sql "SELECT string_agg(idempotency_key, ' ' ORDER BY
                 idempotency_key) FROM tally.token_usage_events
                 WHERE tenant_id = 'recent'")
[ "$recent" = "r1 r2 r3 r4" ] || fail "recent rows left: '$recent'"
stored=$(it_sql "SELECT count(*) FROM tally.token_usage_events
                 WHERE source <> 'sql'")
[ "$stored" = "$counted" ] ||
  fail "$stored counted events in the store, expected $counted"
it_assert_sums "$IT_DIR/expect"
it_worker_stop w1
echo "PASS: $expired expired events pruned in $steps full steps while" \
  "$lines messages were counted; recent rows and sums intact"
