#!/usr/bin/env bash
# Kafka misbehaving, through tally devbroker's fault injection (--control):
#  a. partitions lost mid-batch (heartbeats answered UNKNOWN_MEMBER_ID):
#     the open batch is dropped and read again, never committed;
#  b. Kafka's committed offsets ahead of Postgres's: positions come from
#     Postgres, nothing is skipped;
#  c. every broker down for 20 s, then errors injected on Fetch,
#     Heartbeat and OffsetCommit: the worker waits and goes on;
#  d. the dead-letter topic failing: the bad message's partition does not
#     advance past it until its dead letter is acknowledged;
#  e. an offset commit refused as REBALANCE_IN_PROGRESS: Kafka commits
#     are held, not sent again on the next poll, and catch up afterwards.
# Each phase ends on exact sums.
#
# usage: test_fault_broker.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

# A command to the broker's control pipe: broker down | up | errors ...
broker() {
  echo "$*" >"$IT_DIR/broker/control"
  it_wait_broker_log "control: " 10
}
it_wait_broker_log() {
  local want=$((${broker_cmds:-0} + 1))
  for _ in $(seq 1 $(($2 * 10))); do
    [ "$(grep -c "$1" "$IT_DIR/broker/log")" -ge "$want" ] && {
      broker_cmds=$want
      return 0
    }
    sleep 0.1
  done
  fail "the broker did not take the command"
}

# Generates N events with SEED into NAME.jsonl and NAME.expect.
gen() {
  "$TALLY_GEN" --count "$2" --seed "$3" --tenants 100 --dup-rate 0.05 \
    --expect "$IT_DIR/$1.expect" >"$IT_DIR/$1.jsonl"
}

session=(-X session.timeout.ms=6000 -X heartbeat.interval.ms=500)

step "a. partitions lost while a batch is open"
gen a 5000 51
it_produce "$IT_DIR/a.jsonl"
port=$(it_free_port)
it_worker_start w1 --batch-ms 20000 --batch-idle-ms 0 \
  --batch-size 100000 --metrics-addr "127.0.0.1:$port" "${session[@]}"
for _ in $(seq 1 300); do
  got=$(it_metric "127.0.0.1:$port" tally_usage_messages_total 2>/dev/null ||
    true)
  [ "${got:-0}" -ge 5000 ] && break
  sleep 0.1
done
[ "${got:-0}" -ge 5000 ] || fail "w1 read ${got:-0} of 5000 messages"
[ "$(it_committed)" = 0 ] || fail "the batch was committed before the loss"
broker errors Heartbeat 3 UNKNOWN_MEMBER_ID
it_wait_log w1 "abandoned \(partitions lost\)" 30
it_wait_consumed 5000 90
it_assert_sums "$IT_DIR/a.expect"
it_worker_kill9 w1

step "b. Kafka's committed offsets ahead of Postgres's"
gen b 20000 52
it_produce "$IT_DIR/b.jsonl"
it_worker_start w2 --batch-size 1000 --batch-ms 100 --commit-ms 100 \
  "${session[@]}"
it_wait_progress 5000 60 >/dev/null
it_worker_kill9 w2
at=$(it_committed)
sleep 7 # the killed member's session expires
# A member of group tally that commits the end offsets and vanishes
# without leaving (its session expires like a crashed worker's).
"$IT_PYTHON" - "$TALLY_BROKERS" <<'EOF' || fail "could not move the Kafka offsets"
import os, sys, time
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "tally",
              "enable.auto.commit": False, "session.timeout.ms": 6000,
              "heartbeat.interval.ms": 500,
              "partition.assignment.strategy": "cooperative-sticky"})
t = "token-usage"
c.subscribe([t])
deadline = time.time() + 60
while len(c.assignment()) < 4 and time.time() < deadline:
    c.poll(0.2)
parts = [tp.partition for tp in c.assignment()]
assert len(parts) == 4, parts
ends = [TopicPartition(t, p, c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1])
        for p in parts]
c.commit(offsets=ends, asynchronous=False)
got = c.committed([TopicPartition(t, p) for p in parts], timeout=10)
assert sorted(g.offset for g in got) == sorted(e.offset for e in ends), got
sys.stdout.flush()
os._exit(0)
EOF
sleep 7 # its session expires
echo "    Postgres at $at of 25000; Kafka's group offsets moved to the end"
it_merge_expect "$IT_DIR/ab.expect" "$IT_DIR/a.expect" "$IT_DIR/b.expect"
it_worker_start w3 --batch-size 1000 --batch-ms 100 --commit-ms 100 \
  "${session[@]}"
it_wait_consumed 25000 90
it_assert_sums "$IT_DIR/ab.expect"

step "c. every broker down for 20 s, then Fetch/Heartbeat/OffsetCommit errors"
gen c 20000 53
it_produce "$IT_DIR/c.jsonl"
it_wait_progress 25000 60 >/dev/null
broker down
sleep 20
it_assert_alive w3 "while the brokers were down"
broker up
broker errors Fetch 20 NOT_LEADER_FOR_PARTITION
broker errors Heartbeat 10 NOT_COORDINATOR
broker errors OffsetCommit 10 NOT_COORDINATOR
it_merge_expect "$IT_DIR/abc.expect" "$IT_DIR/ab.expect" "$IT_DIR/c.expect"
it_wait_consumed 45000 120
it_assert_sums "$IT_DIR/abc.expect"
it_assert_alive w3 "after the brokers came back"

step "d. the dead-letter topic failing"
p0_end() {
  "$IT_PYTHON" - "$TALLY_BROKERS" <<'EOF'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "probe"})
print(c.get_watermark_offsets(TopicPartition("token-usage", 0), timeout=10)[1])
c.close()
EOF
}
{
  echo '{"tenant_id":"t-dlq","tokens": not json}'
  for i in $(seq 1 20); do
    printf '{"tenant_id":"t-dlq","idempotency_key":"d-%d","tokens":%d,"token_type":"llm","operation":"chat","model":"m"}\n' "$i" "$i"
  done
} >"$IT_DIR/d.jsonl"
bad_at=$(p0_end)
# Every Produce fails from before the worker reads the bad message: it is
# held (SIGSTOP, well within its session) while kcat writes the lines.
kill -STOP "$(it_worker_pid w3)"
kcat -P -b "$TALLY_BROKERS" -t token-usage -p 0 -l "$IT_DIR/d.jsonl" ||
  { kill -CONT "$(it_worker_pid w3)"; fail "kcat could not produce"; }
broker errors Produce 100000 TOPIC_AUTHORIZATION_FAILED
kill -CONT "$(it_worker_pid w3)"
echo "    the bad message is token-usage [0] offset $bad_at"
# At least 10 s of failing dead letters (each one fails when its
# message.timeout.ms passes or the broker refuses it for good), and the
# position of partition 0 never past the bad message.
failed_seen=0
for i in $(seq 1 60); do
  sleep 1
  pos=$(it_sql "SELECT next_offset FROM tally.consumer_offsets
                WHERE group_id = 'tally' AND topic = 'token-usage'
                AND partition = 0")
  [ "$pos" -le "$bad_at" ] ||
    fail "partition 0 advanced to $pos past the bad message at $bad_at" \
      "while its dead letter could not be delivered"
  grep -q "dead letter.*not delivered\|dead letters failed" \
    "$IT_DIR/w3.log" && failed_seen=1
  [ "$failed_seen" = 1 ] && [ "$i" -ge 10 ] && break
done
[ "$failed_seen" = 1 ] || fail "w3 did not log the failed dead letters"
broker clear Produce
it_wait_consumed $((45000 + 21)) 120
got=$(it_sql "SELECT sum(tokens) FROM tally.token_usage_daily
              WHERE tenant_id = 't-dlq'")
[ "$got" = 210 ] || fail "t-dlq counted $got tokens, expected 210"
it_assert_alive w3 "after the dead-letter topic recovered"

step "e. an offset commit refused as REBALANCE_IN_PROGRESS"
# librdkafka 2.0.2 (cooperative-sticky) rejoins the group after such a
# refusal, and a member that commits again during the rebalance makes it
# go round again (librdkafka #4059): the worker holds its Kafka commits
# after one (kafka_consumer_commit()) until a rebalance callback, or 60 s,
# where it used to send them again on its next poll (caught up within 2 s
# here). Counting goes on meanwhile (positions are in Postgres), and
# Kafka's offsets catch up afterwards.
gen e 5000 57
retries0=$(grep -c 'a Kafka offset commit failed' "$IT_DIR/w3.log" || true)
broker errors OffsetCommit 1 REBALANCE_IN_PROGRESS
t0=$(date +%s)
it_produce "$IT_DIR/e.jsonl"
it_wait_consumed $((45000 + 21 + 5000)) 120
kafka_sum() {
  "$IT_PYTHON" - "$TALLY_BROKERS" <<'EOF'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "tally",
              "enable.auto.commit": False})
t = "token-usage"
parts = sorted(c.list_topics(t, timeout=10).topics[t].partitions)
print(sum(max(tp.offset, 0)
          for tp in c.committed([TopicPartition(t, p) for p in parts],
                                timeout=10)))
c.close()
EOF
}
want=$(it_committed)
for _ in $(seq 1 100); do
  [ "$(kafka_sum)" = "$want" ] && break
  sleep 1
done
got=$(kafka_sum)
[ "$got" = "$want" ] ||
  fail "Kafka's committed offsets add up to $got, Postgres's to $want"
took=$(($(date +%s) - t0))
retries=$(($(grep -c 'a Kafka offset commit failed' "$IT_DIR/w3.log") - retries0))
echo "    Kafka's offsets caught up with Postgres after ${took} s;" \
  "$retries commits sent again"
[ "$took" -ge 5 ] ||
  fail "Kafka's offsets caught up ${took} s after the refusal: commits" \
    "were not held after REBALANCE_IN_PROGRESS"
[ "$retries" -le 3 ] ||
  fail "$retries commits sent again: none while held was expected"
it_merge_expect "$IT_DIR/abce.expect" "$IT_DIR/abc.expect" "$IT_DIR/e.expect"
it_daily_tsv | grep -v '^t-dlq	' >"$IT_DIR/daily-e.tsv"
LC_ALL=C sort "$IT_DIR/abce.expect" | diff - "$IT_DIR/daily-e.tsv" >&2 ||
  fail "daily sums (but t-dlq's, checked in d) differ from what was produced"
it_assert_alive w3 "after the refused commits"
it_worker_stop w3
echo "PASS: partitions lost mid-batch, Kafka offsets ahead, 20 s without" \
  "brokers, Fetch/Heartbeat/OffsetCommit errors, a failing dead-letter" \
  "topic and a commit refused as REBALANCE_IN_PROGRESS: exact sums over" \
  "50,021 messages"
