#!/usr/bin/env bash
# Readiness and the pipelines' histograms (these need the pipelines to
# report: metrics_readiness("token-usage") and ("cache-invalidation"),
# tally_usage_batch_messages, tally_usage_commit_duration_seconds).
# /readyz is 200 while both pipelines are ready, 503 with a one-line
# reason naming Postgres while Postgres is stopped (and /healthz stays
# 200), 200 again after it is back; the same for Redis; the histograms'
# counts agree with the batches committed; /metrics stays promtool-clean.
#
# usage: test_obs_ready.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 2

PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
[ -x "$PROMTOOL" ] || fail "promtool not installed (scripts/deps.sh)"
M="127.0.0.1:$(it_free_port)"
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)

readyz() { # prints "STATUS BODY"
  local body status
  body=$(curl -sS --max-time 5 -w '\n%{http_code}' "http://$M/readyz") ||
    fail "GET /readyz failed"
  status=${body##*$'\n'}
  echo "$status ${body%$'\n'*}"
}
# wait_ready STATUS TIMEOUT [REGEX]: until /readyz answers STATUS (and
# its body matches REGEX, case-insensitive); prints the last answer.
wait_ready() {
  local want=$1 timeout=$2 re=${3:-.} got=""
  for _ in $(seq 1 $((timeout * 5))); do
    got=$(readyz)
    if [ "${got%% *}" = "$want" ] && echo "${got#* }" | grep -Eiq -- "$re"; then
      echo "$got"
      return 0
    fi
    sleep 0.2
  done
  fail "/readyz did not answer $want /$re/ within ${timeout}s (last: $got)"
}
assert_one_line() {
  [ "$(printf '%s\n' "${1#* }" | wc -l)" = 1 ] && [ -n "${1#* }" ] ||
    fail "/readyz body is not one line: '$1'"
}

step "a worker with both pipelines; /readyz 503 or 200 at once, 200 when settled"
it_worker_start w1 --metrics-addr "$M"
for _ in $(seq 1 100); do
  curl -fsS --max-time 1 "http://$M/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
first=$(readyz)
case "${first%% *}" in 200 | 503) ;; *) fail "/readyz answered '$first'" ;; esac
got=$(wait_ready 200 60 '^ready$')
echo "ready: $got"
# (grep reads a here-string: a pipe from curl into grep -q can fail under
# pipefail when grep exits before curl has written everything.)
grep -q '^tally_ready{check="token-usage"} 1$' <<<"$(curl -fsS "http://$M/metrics")" ||
  fail "no tally_ready{check=\"token-usage\"} 1"
grep -q '^tally_ready{check="cache-invalidation"} 1$' \
  <<<"$(curl -fsS "http://$M/metrics")" ||
  fail "no tally_ready{check=\"cache-invalidation\"} 1"

step "events; the histograms count the batches"
for i in $(seq 1 300); do
  printf '{"idempotency_key":"r-%d","tenant_id":"t1","tokens":1,"token_type":"llm","operation":"chat","occurred_at":"%s"}\n' \
    "$i" "$NOW"
done >"$IT_DIR/r.jsonl"
it_produce "$IT_DIR/r.jsonl"
it_wait_consumed 300 120
sleep 1
curl -fsS "http://$M/metrics" >"$IT_DIR/metrics.txt"
"$PROMTOOL" check metrics <"$IT_DIR/metrics.txt" ||
  fail "/metrics is not promtool-clean"
batches=$(awk '$1 == "tally_usage_batches_total" { print $2 }' "$IT_DIR/metrics.txt")
for h in tally_usage_batch_messages tally_usage_commit_duration_seconds; do
  grep -q "^# TYPE $h histogram$" "$IT_DIR/metrics.txt" ||
    fail "no histogram $h (not wired in usage_consumer.c yet?)"
  count=$(awk -v m="${h}_count" '$1 == m { print $2 }' "$IT_DIR/metrics.txt")
  inf=$(awk -v m="${h}_bucket{le=\"+Inf\"}" '$1 == m { print $2 }' "$IT_DIR/metrics.txt")
  [ "$count" = "$batches" ] && [ "$inf" = "$count" ] ||
    fail "$h: count $count, +Inf bucket $inf, batches $batches"
done
sum=$(awk '$1 == "tally_usage_batch_messages_sum" { print $2 }' "$IT_DIR/metrics.txt")
[ "$sum" = 300 ] || fail "tally_usage_batch_messages_sum is $sum, not 300"

# Traffic during each outage, so that a pipeline that only notices a
# dependency when it uses it notices too (a periodic check needs none).
usage_during() { # usage_during NAME: 20 events produced now
  for i in $(seq 1 20); do
    printf '{"idempotency_key":"%s-%d","tenant_id":"t2","tokens":1,"token_type":"llm","operation":"chat","occurred_at":"%s"}\n' \
      "$1" "$i" "$NOW"
  done >"$IT_DIR/$1.jsonl"
  it_produce "$IT_DIR/$1.jsonl"
}

step "Postgres stopped: 503 naming it, /healthz still 200"
stack_pg_stop "$IT_DIR"
usage_during pgdown
got=$(wait_ready 503 60 'token-usage.*postgres')
echo "pg down: $got"
assert_one_line "$got"
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$M/healthz")" = 200 ] ||
  fail "/healthz not 200 while Postgres is down"
grep -q '^tally_ready{check="token-usage"} 0$' <<<"$(curl -fsS "http://$M/metrics")" ||
  fail "tally_ready{check=\"token-usage\"} is not 0 while Postgres is down"
stack_pg_start "$IT_DIR" || fail "postgres did not start again"
got=$(wait_ready 200 120 '^ready$')
echo "pg back: $got"

it_wait_consumed 320 120

step "Redis stopped: 503 naming it; back: 200"
it_redis_stop
echo '{"tenant_id":"t1","data_type":"agent","resource_id":"a1"}' \
  >"$IT_DIR/inv.jsonl"
"$TALLY" produce --topic cache-invalidation --file "$IT_DIR/inv.jsonl" \
  >>"$IT_DIR/produce.log" 2>&1 || fail "produce to cache-invalidation failed"
got=$(wait_ready 503 60 'cache-invalidation.*redis')
echo "redis down: $got"
assert_one_line "$got"
it_redis_start
got=$(wait_ready 200 120 '^ready$')
echo "redis back: $got"

it_assert_alive w1 "after the outages"
it_worker_stop w1
echo "ok"
