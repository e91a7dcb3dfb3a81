#!/usr/bin/env bash
# --batch-idle-ms: once every partition is read to its end and no message
# came for that long, the open batch commits without waiting for the
# rest of --batch-ms (the end of a backlog); with --batch-idle-ms 0 it
# waits for --batch-ms as before. Sums exact either way.
#
# usage: test_worker_batch_idle.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
# Far longer than either wait below: a batch closed by --batch-ms could
# not meet them.
LONG_MS=60000

step "a backlog of 300 messages, smaller than a batch"
"$TALLY_GEN" --count 300 --seed 5 --tenants 20 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
lines=$(it_summary "$IT_DIR/expect.summary" lines)
it_produce "$IT_DIR/events.jsonl"

step "caught up: the partial batch commits long before --batch-ms"
it_worker_start w1 --batch-ms "$LONG_MS" --batch-size 100000 \
  --log-level debug
it_wait_log w1 "first message: " 60
it_wait_consumed "$lines" 20
it_assert_sums "$IT_DIR/expect"
# Logged when the loop collects the commit, a moment after Postgres has it.
it_wait_log w1 "committed [0-9]+ batches in one transaction" 10
grep -q "committed 1 batches in one transaction: $lines messages" \
  "$IT_DIR/w1.log" || fail "the $lines messages were not one batch"
it_worker_stop w1

step "--batch-idle-ms 0: the batch waits for --batch-ms (or the stop)"
it_worker_start w2 --group g2 --batch-ms "$LONG_MS" --batch-size 100000 \
  --batch-idle-ms 0
it_wait_log w2 "first message: " 60
sleep 5
got=$(it_committed g2)
[ "$got" = 0 ] || fail "group g2 committed $got messages before --batch-ms"
it_worker_stop w2 # commits the open batch
[ "$(it_committed g2)" = "$lines" ] ||
  fail "group g2 committed $(it_committed g2) of $lines at the stop"
it_assert_sums "$IT_DIR/expect"
echo "PASS: a backlog smaller than a batch committed once caught up, well" \
  "within --batch-ms ($LONG_MS ms); with --batch-idle-ms 0 it waited" \
  "for the stop; sums exact"
