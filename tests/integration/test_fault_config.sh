#!/usr/bin/env bash
# Configuration that could break the guarantees: every -X property tally
# relies on is refused with exit 2, naming it and why; configuration
# errors that librdkafka finds at start are exit 2 too; sizes a user may
# raise (message.max.bytes) work, and the worker counts with them.
#
# usage: test_fault_config.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

# Runs the worker with ARGS and asserts exit 2 with WORD in its stderr:
# refused WORD ARGS...
refused() {
  local word=$1 rc=0
  shift
  timeout 30 "$TALLY" worker --metrics-addr "" "$@" \
    >"$IT_DIR/refused.log" 2>&1 || rc=$?
  [ "$rc" -eq 2 ] || fail "worker $* exited $rc, expected 2: $(tail -3 "$IT_DIR/refused.log")"
  grep "^tally worker: " "$IT_DIR/refused.log" | grep -qF -- "$word" ||
    fail "worker $* does not name $word: $(tail -3 "$IT_DIR/refused.log")"
  echo "    exit 2: $(grep "^tally worker: " "$IT_DIR/refused.log" | head -1)"
  refusals=$((refusals + 1))
}
refusals=0

step "properties tally relies on are refused (exit 2, named, with why)"
refused enable.auto.offset.store -X enable.auto.offset.store=true
refused enable.auto.commit -X enable.auto.commit=true
refused partition.assignment.strategy -X partition.assignment.strategy=range
refused group.id -X group.id=other
refused isolation.level -X isolation.level=read_uncommitted
refused auto.offset.reset -X auto.offset.reset=latest
refused group.instance.id -X group.instance.id=w1
refused acks -X acks=0
refused transactional.id -X transactional.id=t1

step "configuration errors librdkafka reports at start are exit 2"
refused fetch.max.bytes -X fetch.max.bytes=100000 -X message.max.bytes=200000
refused max.poll.interval.ms -X session.timeout.ms=30000 \
  -X max.poll.interval.ms=10000
refused no.such.property -X no.such.property=1
refused --invalidation-group --invalidation-group tally
TALLY_INVALIDATION_GROUP=tally refused TALLY_INVALIDATION_GROUP

step "-X message.max.bytes=16777216 works: the worker counts"
"$TALLY_GEN" --count 2000 --seed 3 --tenants 20 --expect "$IT_DIR/expect" \
  >"$IT_DIR/events.jsonl"
total=$(it_summary "$IT_DIR/expect.summary" lines)
it_produce "$IT_DIR/events.jsonl"
it_worker_start w1 -X message.max.bytes=16777216
it_wait_consumed "$total" 60
it_assert_sums "$IT_DIR/expect"
it_worker_stop w1
echo "PASS: $refusals refusals with exit 2; message.max.bytes=16777216 counted" \
  "$total messages exactly"
