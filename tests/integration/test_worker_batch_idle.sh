#!/usr/bin/env bash
# --batch-idle-ms: once every partition is read to its end and no message
# came for that long, the open batch commits without waiting for the
# rest of --batch-ms (the end of a backlog); with --batch-idle-ms 0 it
# waits for --batch-ms as before. Sums exact either way. And a
# transaction of several batches (a window) commits once open for
# --commit-ms, or at --commit-batches without it.
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
step "a backlog many times the pre-fetch queue: no early batch while it lasts"
# 1 MiB of queue: librdkafka stops fetching again and again, and the
# consumer finds its queue empty in between; with --batch-idle-ms 1 only
# the partitions' ends (not the pauses) may close a batch, so every batch
# but the last is full.
"$TALLY_GEN" --count 20000 --seed 6 --tenants 200 --dup-rate 0.05 \
  --expect "$IT_DIR/expect2" >"$IT_DIR/events2.jsonl"
lines2=$(it_summary "$IT_DIR/expect2.summary" lines)
it_produce "$IT_DIR/events2.jsonl"
it_merge_expect "$IT_DIR/expect.all" "$IT_DIR/expect" "$IT_DIR/expect2"
all=$((lines + lines2))
mport=$(it_free_port)
it_worker_start w3 --group g3 --batch-ms "$LONG_MS" --batch-size 2000 \
  --commit-batches 1 --batch-idle-ms 1 -X queued.max.messages.kbytes=1024 \
  --log-level debug --metrics-addr "127.0.0.1:$mport"
it_wait_consumed "$all" 120 g3
it_wait_log w3 "committed 1 batches in one transaction: $((all % 2000)) messages" 10
sizes=$(grep -oE "committed 1 batches in one transaction: [0-9]+ messages" \
  "$IT_DIR/w3.log" | awk '{ print $7 }')
full=$(grep -cx 2000 <<<"$sizes" || true)
[ "$full" -eq $((all / 2000)) ] && [ "$(wc -l <<<"$sizes")" -eq $((full + 1)) ] ||
  fail "batches of $(tr '\n' ' ' <<<"$sizes")for $all messages: expected" \
    "$((all / 2000)) of 2000 and one of $((all % 2000))"
it_assert_sums "$IT_DIR/expect.all"
# The queue filled and drained again and again: the nudger thread woke
# librdkafka's fetcher each time (pipeline.c).
nudges=$(it_metric "127.0.0.1:$mport" tally_usage_fetch_nudges_total)
[ "${nudges:-0}" -gt 0 ] ||
  fail "no fetch nudges while 20,000 messages went through a 1 MiB queue"
it_worker_stop w3

# The whole topic again in new groups (every event counted before: the
# sums stay), in batches of 100 that close by size: only --commit-ms or
# --commit-batches closes a window while the backlog lasts. Runs worker
# NAME in group NAME with --commit-ms MS and sets $largest to its largest
# window (batches in one transaction, from its debug log).
largest_window() {
  it_worker_start "$1" --group "$1" --batch-ms "$LONG_MS" --batch-size 100 \
    --batch-idle-ms 0 --commit-batches 48 --commit-ms "$2" --log-level debug
  it_wait_consumed "$all" 120 "$1"
  it_worker_stop "$1"
  largest=$(grep -oE "committed [0-9]+ batches in one transaction" \
    "$IT_DIR/$1.log" | awk '$2 > m { m = $2 } END { print m + 0 }')
}
step "--commit-ms 1: a window commits within a few batches, not at --commit-batches"
# A window's age is checked when a batch is sealed and while the next
# one fills; past 1 ms after its first batch went in, it commits.
largest_window w4 1
[ "$largest" -ge 1 ] && [ "$largest" -lt 10 ] ||
  fail "with --commit-ms 1 the largest window had $largest batches"
largest4=$largest
step "--commit-ms 600000: windows of --commit-batches (48)"
largest_window w5 600000
[ "$largest" -eq 48 ] ||
  fail "with --commit-ms 600000 the largest window had $largest batches"
it_assert_sums "$IT_DIR/expect.all"
echo "PASS: a backlog smaller than a batch committed once caught up, well" \
  "within --batch-ms ($LONG_MS ms); with --batch-idle-ms 0 it waited" \
  "for the stop; a backlog of $all through a 1 MiB queue came in" \
  "$((all / 2000)) full batches and one of $((all % 2000)) ($nudges fetch" \
  "nudges); windows of" \
  "at most $largest4 batches with --commit-ms 1 and of 48 without; sums exact"
