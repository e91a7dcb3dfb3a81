#!/usr/bin/env bash
# The counting rule, case by case: one count per (tenant_id,
# idempotency_key) for duplicates in one batch, across batches, across
# partitions and through tally.track_token_usage() in either order;
# implicit keys (kafka:<topic>:<partition>:<offset>) survive kill -9 and a
# replay through another group, while two identical messages without key
# are two events; --start-from latest/earliest on a new group; an enum
# value added while the worker runs; Kafka's committed offsets follow
# Postgres; the metrics endpoint counts what was counted.
#
# usage: test_worker_dedupe.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# A valid event line: ev TENANT KEY TOKENS [OPERATION] (KEY "-": none)
ev() {
  local key=""
  [ "$2" = "-" ] || key="\"idempotency_key\":\"$2\","
  printf '{%s"tenant_id":"%s","tokens":%s,"token_type":"llm","operation":"%s","model":"m1","occurred_at":"%s"}\n' \
    "$key" "$1" "$3" "${4:-chat}" "$NOW"
}
# Messages in the topic so far (what a group must have consumed).
produced=0
send() { # send FILE: produce it, count its lines
  it_produce "$1"
  produced=$((produced + $(grep -c . "$1")))
}
# Events and tokens of a tenant in the daily table: "events tokens".
tenant_sums() {
  it_sql "SELECT coalesce(sum(events), 0) || ' ' || coalesce(sum(tokens), 0)
          FROM tally.token_usage_daily WHERE tenant_id = '$1'"
}
expect_tenant() { # expect_tenant TENANT EVENTS TOKENS WHAT
  local got
  got=$(tenant_sums "$1")
  [ "$got" = "$2 $3" ] || fail "$4: $1 has events/tokens $got, expected $2 $3"
}
# Waits until both consumers of worker NAME (token-usage and
# cache-invalidation, two members of its group) have their partitions.
# Started a few seconds apart (the token-usage one connects to Postgres
# and migrates first), they can join in two generations; a Kafka commit
# queued behind the second rebalance's JoinGroup gets ILLEGAL_GENERATION
# from tally devbroker and the assignment is lost: messages are read
# again, and the exact metric counts below would be off. So nothing is
# produced before the group settled.
settled() {
  it_wait_log "$1" "rebalance \(cache-invalidation\): assigned [1-9]" 120
  it_wait_log "$1" "rebalance \(token-usage\): assigned [1-9]" 120
}

# ====================================================================
# Enough that a worker cannot finish them between a kill and the next
# (40,000 did not: the second kill landed after the end).
IMPLICIT=100000
step "1. implicit keys: $IMPLICIT events without idempotency_key, kill -9 twice"
"$TALLY_GEN" --count "$IMPLICIT" --seed 51 --tenants 200 --dup-rate 0 \
  --implicit-rate 1 --expect "$IT_DIR/expect_implicit" >"$IT_DIR/implicit.jsonl"
[ "$(it_summary "$IT_DIR/expect_implicit.summary" implicit)" = "$IMPLICIT" ] ||
  fail "tally-gen did not write $IMPLICIT implicit events"
# Two identical messages without key: two offsets, two events.
{ ev t-twice - 5; ev t-twice - 5; } >"$IT_DIR/twice.jsonl"
send "$IT_DIR/implicit.jsonl"
send "$IT_DIR/twice.jsonl"
kargs=(--batch-size 1000 --batch-ms 100 --commit-ms 100
  -X session.timeout.ms=3000)
it_worker_start wk "${kargs[@]}"
prev=0
for k in 1 2; do
  it_progress_moment "$prev" "$produced" >/dev/null
  it_worker_kill9 wk
  prev=$(it_committed)
  [ "$prev" -lt "$produced" ] || fail "kill $k landed after the end"
  echo "    kill $k at $prev of $produced"
  it_worker_start wk "${kargs[@]}"
done
it_wait_consumed "$produced" 120
it_worker_stop wk
implicit_tokens=$(it_summary "$IT_DIR/expect_implicit.summary" tokens)
got=$(it_sql "SELECT count(*) || ' ' || sum(tokens) FROM tally.token_usage_events
              WHERE idempotency_key LIKE 'kafka:token-usage:%'")
[ "$got" = "$((IMPLICIT + 2)) $((implicit_tokens + 10))" ] ||
  fail "implicit-key events/tokens are $got, expected $((IMPLICIT + 2))" \
    "$((implicit_tokens + 10))"
expect_tenant t-twice 2 10 "two identical messages without key"
# A replay of the whole topic through a new group (earliest, the default)
# reads every message and counts none of them again. The backlog is there
# before the worker starts, so it runs the token-usage pipeline alone: one
# member, one generation, no rebalance to read messages twice (settled).
port=$(it_free_port)
it_worker_start wr --group replay --metrics-addr "127.0.0.1:$port" \
  --invalidation-topic ""
it_wait_consumed "$produced" 120 replay
m=$(it_metric "127.0.0.1:$port" tally_usage_messages_total)
[ "$m" = "$produced" ] ||
  fail "the replay group (earliest) read $m messages, the topic has $produced"
m=$(it_metric "127.0.0.1:$port" tally_usage_events_counted_total)
[ "$m" = 0 ] || fail "the replay counted $m events again"
got=$(it_sql "SELECT count(*) FROM tally.token_usage_events")
[ "$got" = $((IMPLICIT + 2)) ] ||
  fail "the replay changed the dedupe store: $got events"
it_worker_stop wr

# ====================================================================
step "2. one long-lived worker with long batches and metrics"
t2=$(it_sql "SELECT now()")
mport=$(it_free_port)
M="127.0.0.1:$mport"
it_worker_start w1 --batch-ms 2000 --batch-idle-ms 0 --batch-size 100000 \
  --metrics-addr "$M"
w1_started=$SECONDS
settled w1
metric() { it_metric "$M" "$1"; }
# Metrics move when the main loop collects a commit, a moment after
# Postgres has it: expect_metric SERIES VALUE
expect_metric() {
  local got=""
  for _ in $(seq 1 50); do
    got=$(metric "$1")
    [ "$got" = "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 is '$got', expected $2"
}

step "2a. duplicates within one batch (three copies, and a conflict)"
{
  ev t-inb k1 100
  ev t-inb k1 100
  ev t-inb k2 40
  ev t-inb k1 100
  ev t-inb k2 41 # same key, other payload: the first wins
} >"$IT_DIR/inbatch.jsonl"
send "$IT_DIR/inbatch.jsonl"
it_wait_consumed "$produced" 30
expect_tenant t-inb 2 140 "duplicates within a batch"
expect_metric 'tally_usage_duplicates_total{where="batch"}' 3
expect_metric tally_usage_conflicts_total 1
# One batch: they were duplicates within it.
expect_metric tally_usage_batches_total 1

step "2b. duplicates across batches (again after a commit, and a conflict)"
# Three batches: the event, the same again, the key with another payload.
for tokens in 500 500 999; do
  ev t-xb x1 "$tokens" >"$IT_DIR/xb.jsonl"
  send "$IT_DIR/xb.jsonl"
  it_wait_consumed "$produced" 30
done
expect_tenant t-xb 1 500 "duplicates across batches"
expect_metric 'tally_usage_duplicates_total{where="store"}' 2
expect_metric tally_usage_conflicts_total 2
grep -q "conflict: tenant t-xb key x1" "$IT_DIR/w1.log" ||
  fail "the conflict on t-xb/x1 is not in the log"

step "2c. one key on two partitions (kcat -p 0 / -p 1, other Kafka keys)"
ev t-xp p1 300 | kcat -P -b "$TALLY_BROKERS" -t token-usage -p 0 -k a ||
  fail "kcat -p 0 failed"
ev t-xp p1 300 | kcat -P -b "$TALLY_BROKERS" -t token-usage -p 1 -k b ||
  fail "kcat -p 1 failed"
produced=$((produced + 2))
it_wait_consumed "$produced" 30
expect_tenant t-xp 1 300 "one key on two partitions"
got=$(it_sql "SELECT count(DISTINCT split_part(source, '/', 2))
  FROM tally.token_usage_events WHERE tenant_id = 't-xp'")
[ "$got" = 1 ] || fail "t-xp/p1 stored $got times"

step "2d. tally.track_token_usage() and Kafka: one count, either order"
track() { # track TENANT KEY TOKENS [OPERATION]: prints t or f
  it_sql "SELECT tally.track_token_usage(tenant_id => '$1', tokens => $3,
            token_type => 'llm', operation => '${4:-chat}', model => 'm1',
            idempotency_key => '$2', occurred_at => '$NOW')"
}
[ "$(track t-sql sql-first 111)" = t ] || fail "a new key through SQL: not counted"
[ "$(track t-sql sql-first 111)" = f ] || fail "the same key through SQL again: not false"
ev t-sql sql-first 111 >"$IT_DIR/sqlfirst.jsonl"
send "$IT_DIR/sqlfirst.jsonl"
it_wait_consumed "$produced" 30
expect_tenant t-sql 1 111 "SQL first, then Kafka"
ev t-sql kafka-first 222 >"$IT_DIR/kafkafirst.jsonl"
send "$IT_DIR/kafkafirst.jsonl"
it_wait_consumed "$produced" 30
[ "$(track t-sql kafka-first 222)" = f ] ||
  fail "a key counted from Kafka was counted again through SQL"
expect_tenant t-sql 2 333 "Kafka first, then SQL"
got=$(it_sql "SELECT string_agg(idempotency_key || '=' || source, ',' ORDER BY idempotency_key)
  FROM tally.token_usage_events WHERE tenant_id = 't-sql'")
case "$got" in
  kafka-first=token-usage/*,sql-first=sql) ;;
  *) fail "t-sql's events come from $got" ;;
esac

step "2e. tally.track_token_usage() raises SQLSTATE 22023 on bad input"
bad_call() { # bad_call 'named args' : must fail with 22023
  local out rc=0
  out=$($PSQL -c '\set VERBOSITY verbose' \
    -c "SELECT tally.track_token_usage($1)" 2>&1) || rc=$?
  [ "$rc" -ne 0 ] || fail "track_token_usage($1) succeeded"
  grep -q "ERROR:  22023:" <<<"$out" ||
    fail "track_token_usage($1): not SQLSTATE 22023: $out"
}
base="tenant_id => 't-bad', token_type => 'llm', operation => 'chat'"
bad_call "$base, tokens => -1"
bad_call "$base, tokens => 1000000000001"
bad_call "$base, tokens => NULL"
bad_call "tenant_id => 'bad id', tokens => 1, token_type => 'llm', operation => 'chat'"
bad_call "tenant_id => NULL, tokens => 1, token_type => 'llm', operation => 'chat'"
bad_call "tenant_id => 't-bad', tokens => 1, token_type => 'audio', operation => 'chat'"
bad_call "tenant_id => 't-bad', tokens => 1, token_type => 'llm', operation => 'rerank'"
bad_call "$base, tokens => 1, idempotency_key => 'kafka:token-usage:0:1'"
bad_call "$base, tokens => 1, idempotency_key => ''"
bad_call "$base, tokens => 1, model => ''"
bad_call "$base, tokens => 1, agent_id => 'a/b'"
bad_call "$base, tokens => 1, prompt_tokens => -1"
bad_call "$base, tokens => 1, occurred_at => now() - interval '40 days'"
bad_call "$base, tokens => 1, occurred_at => now() + interval '2 hours'"
bad_call "$base, tokens => 1, metadata => '[1]'::jsonb"
bad_call "$base, tokens => 1, schema_version => 2"
[ "$(tenant_sums t-bad)" = "0 0" ] || fail "a rejected call counted something"

step "2f. ALTER TYPE ... ADD VALUE 'rerank' while the worker runs"
it_sql "ALTER TYPE tally.operation_type ADD VALUE 'rerank'" >/dev/null
[ "$(track t-rr rr-sql 7 rerank)" = t ] || fail "SQL with operation rerank"
# The worker re-reads the enums on an unknown value at most every 10 s.
wait_s=$((w1_started + 11 - SECONDS))
[ "$wait_s" -le 0 ] || sleep "$wait_s"
ev t-rr rr-kafka 77 rerank >"$IT_DIR/rerank.jsonl"
send "$IT_DIR/rerank.jsonl"
it_wait_consumed "$produced" 30
got=$(it_sql "SELECT operation || ' ' || events || ' ' || tokens
  FROM tally.token_usage_daily WHERE tenant_id = 't-rr'")
[ "$got" = "rerank 2 84" ] ||
  fail "t-rr's rerank events: '$got', expected 'rerank 2 84' (dead-lettered?)"
dl=$(curl -fsS "http://$M/metrics" |
  awk '$1 ~ /^tally_usage_dead_letters_total/ { s += $2 } END { print s + 0 }')
[ "$dl" = 0 ] || fail "$dl dead letters in a test without bad messages"

step "2g. the metrics endpoint counted what w1 counted"
want=$(it_sql "SELECT count(*) FROM tally.token_usage_events
               WHERE source <> 'sql' AND counted_at >= '$t2'")
[ "$want" = 6 ] || fail "w1 counted $want events, expected 6"
expect_metric tally_usage_events_counted_total "$want"
expect_metric tally_usage_messages_total $((5 + 3 + 2 + 1 + 1 + 1)) # 2a..2f

step "2h. Kafka's committed offsets equal the positions in Postgres"
it_worker_stop w1
check_committed() { # check_committed GROUP
  it_sql "SELECT partition || ' ' || coalesce(next_offset, -1001)
          FROM tally.consumer_offsets WHERE group_id = '$1'
          ORDER BY partition" >"$IT_DIR/pg_offsets.$1"
  "$IT_PYTHON" - "$TALLY_BROKERS" "$1" >"$IT_DIR/kafka_offsets.$1" <<'EOF' ||
import sys
from confluent_kafka import Consumer, TopicPartition
brokers, group = sys.argv[1], sys.argv[2]
c = Consumer({"bootstrap.servers": brokers, "group.id": group,
              "enable.auto.commit": False})
parts = sorted(c.list_topics("token-usage", timeout=10).topics["token-usage"].partitions)
for tp in c.committed([TopicPartition("token-usage", p) for p in parts], timeout=10):
    print(tp.partition, tp.offset)
c.close()
EOF
    fail "cannot read the committed offsets of group $1"
  diff "$IT_DIR/pg_offsets.$1" "$IT_DIR/kafka_offsets.$1" >&2 ||
    fail "group $1: Kafka's committed offsets (right) differ from Postgres (left)"
}
check_committed tally
check_committed replay

# ====================================================================
step "3. --start-from latest on a new group skips the backlog"
lport=$(it_free_port)
it_worker_start wl --group late --start-from latest --metrics-addr "127.0.0.1:$lport"
settled wl
for _ in $(seq 1 300); do
  [ "$(grep -c "no stored position: starting at the latest offset" \
    "$IT_DIR/wl.log")" -ge 4 ] && break
  sleep 0.1
done
[ "$(grep -c "starting at the latest offset" "$IT_DIR/wl.log")" -ge 4 ] ||
  fail "the late group did not claim its 4 partitions"
sleep 3 # the end offsets are looked up after the claim
"$TALLY_GEN" --count 50 --seed 52 --tenants 10 --dup-rate 0 \
  --expect "$IT_DIR/expect_late" >"$IT_DIR/late.jsonl"
send "$IT_DIR/late.jsonl"
for _ in $(seq 1 300); do
  [ "$(it_metric "127.0.0.1:$lport" tally_usage_messages_total)" -ge 50 ] && break
  sleep 0.1
done
sleep 1
got=$(it_metric "127.0.0.1:$lport" tally_usage_messages_total)
[ "$got" = 50 ] ||
  fail "the late group read $got messages, expected only the 50 new ones"
got=$(it_metric "127.0.0.1:$lport" tally_usage_events_counted_total)
[ "$got" = 50 ] || fail "the late group counted $got events, expected 50"
it_worker_stop wl
echo "PASS: every duplicate counted once; implicit keys, SQL, enums," \
  "start-from, offsets and metrics as they should be"
