#!/usr/bin/env bash
# Operations: a worker's /metrics is clean under `promtool check metrics`
# (no warnings) and has tally_build_info and counters in seconds; a real
# Prometheus server scrapes it and answers a query for a tally series;
# /healthz is 200, other paths 404, other methods 405 with Allow; the
# listener binds [::1]:PORT and :PORT (IPv6 and IPv4), and a bad address is
# exit 2 naming --metrics-addr; --log-format json (and TALLY_LOG_FORMAT)
# writes one JSON object per line, librdkafka's lines included.
#
# usage: test_obs.sh TALLY TALLY_GEN
#   OBS_PROM_QUERY: the PromQL the Prometheus server must answer with at
#   least one series (default tally_usage_messages_total).
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 2

OBS_PROM_QUERY=${OBS_PROM_QUERY:-tally_usage_lag_messages}
PROMETHEUS=${PROMETHEUS:-$(command -v prometheus || true)}
PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
[ -x "$PROMETHEUS" ] && [ -x "$PROMTOOL" ] ||
  fail "prometheus/promtool not installed (scripts/deps.sh installs them)"

NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
events() { # events N PREFIX: N valid events, one bad line
  for i in $(seq 1 "$1"); do
    printf '{"idempotency_key":"%s-%d","tenant_id":"t%d","tokens":%d,"token_type":"llm","operation":"chat","model":"m","occurred_at":"%s"}\n' \
      "$2" "$i" $((i % 3)) "$i" "$NOW"
  done
  echo 'not json'
}

# HTTP status of a request: http_status METHOD URL [curl args]
http_status() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X "$1" "${@:3}" "$2"
}

# Waits until URL answers 200: wait_http URL [TIMEOUT]
wait_http() {
  for _ in $(seq 1 $((${2:-30} * 10))); do
    [ "$(http_status GET "$1" -g)" = 200 ] && return 0
    sleep 0.1
  done
  fail "$1 did not answer 200 within ${2:-30} s"
}

# Every line of FILE is one JSON object with ts, level and msg.
assert_json_lines() {
  /usr/bin/python3 - "$1" <<'PY' || fail "$1 has lines that are not log JSON"
import json, sys
n = 0
for no, line in enumerate(open(sys.argv[1], encoding="utf-8"), 1):
    obj = json.loads(line)
    assert isinstance(obj, dict), (no, line)
    assert set(obj) == {"ts", "level", "msg"}, (no, line)
    assert obj["level"] in ("debug", "info", "warn", "error"), (no, line)
    n += 1
assert n > 0, "no lines"
print(f"{sys.argv[1]}: {n} JSON log lines")
PY
}

P1=$(it_free_port)
M="127.0.0.1:$P1"
step "a worker with --log-format json, metrics on $M; 200 events"
events 200 a >"$IT_DIR/a.jsonl"
# -X debug=cgrp: librdkafka's own lines, through kafka.c's log callback.
it_worker_start w1 --metrics-addr "$M" --log-format json --log-level debug \
  -X debug=cgrp
it_produce "$IT_DIR/a.jsonl"
it_wait_consumed 201 120
wait_http "http://$M/healthz"

step "promtool check metrics: no errors, no warnings"
curl -fsS --max-time 5 "http://$M/metrics" >"$IT_DIR/metrics.txt" ||
  fail "GET /metrics failed"
rc=0
"$PROMTOOL" check metrics <"$IT_DIR/metrics.txt" >"$IT_DIR/promtool.out" 2>&1 ||
  rc=$?
[ "$rc" -eq 0 ] && [ ! -s "$IT_DIR/promtool.out" ] ||
  fail "promtool check metrics (rc $rc): $(cat "$IT_DIR/promtool.out")"
echo "promtool: clean ($(grep -c '^tally_' "$IT_DIR/metrics.txt") series lines)"
grep -Eq '^tally_build_info\{version="[^"]+"\} 1$' "$IT_DIR/metrics.txt" ||
  fail "no tally_build_info{version=...} 1"
for name in tally_usage_commit_seconds_total tally_usage_parse_seconds_total \
  tally_usage_poll_seconds_total tally_usage_commit_wait_seconds_total; do
  grep -Eq "^$name [0-9]+\.[0-9]+$" "$IT_DIR/metrics.txt" ||
    fail "$name is missing or not in seconds"
done
grep -Eq '^tally_[a-z_]*(nanoseconds|micros|milliseconds)' \
  "$IT_DIR/metrics.txt" && fail "a metric is not in base units"
[ "$(it_metric "$M" tally_usage_messages_total)" = 201 ] ||
  fail "tally_usage_messages_total is not 201"
grep -i 'content-type: text/plain; version=0.0.4' \
  <(curl -sS -D - -o /dev/null "http://$M/metrics") >/dev/null ||
  fail "/metrics is not text/plain; version=0.0.4"

step "methods and paths"
[ "$(http_status GET "http://$M/healthz")" = 200 ] || fail "/healthz not 200"
[ "$(curl -sS "http://$M/healthz")" = ok ] || fail "/healthz body is not ok"
[ "$(http_status GET "http://$M/nope")" = 404 ] || fail "/nope not 404"
[ "$(http_status HEAD "http://$M/metrics" -I)" = 200 ] || fail "HEAD not 200"
for method in POST PUT DELETE; do
  got=$(http_status "$method" "http://$M/metrics" --data x)
  [ "$got" = 405 ] || fail "$method /metrics answered $got, not 405"
done
curl -sS -D - -o /dev/null -X POST --data x "http://$M/readyz" |
  grep -Eiq '^allow: GET' || fail "405 without Allow: GET"
it_assert_alive w1 "after the requests"

step "a real Prometheus scrapes it (every 1 s); query: $OBS_PROM_QUERY"
PP=$(it_free_port)
mkdir -p "$IT_DIR/prom/data"
cat >"$IT_DIR/prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: tally
    static_configs:
      - targets: ["$M"]
EOF
"$PROMTOOL" check config "$IT_DIR/prom/prometheus.yml" >/dev/null ||
  fail "the test's prometheus.yml is not valid"
"$PROMETHEUS" --config.file="$IT_DIR/prom/prometheus.yml" \
  --storage.tsdb.path="$IT_DIR/prom/data" \
  --web.listen-address="127.0.0.1:$PP" >>"$IT_DIR/prometheus.log" 2>&1 &
echo $! >"$IT_DIR/prometheus.pid"
IT_WORKERS+=(prometheus)
wait_http "http://127.0.0.1:$PP/-/ready" 60
prom_query() { # the number of series the query returns
  curl -fsS --max-time 5 "http://127.0.0.1:$PP/api/v1/query" \
    --data-urlencode "query=$1" |
    /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin)
assert d["status"] == "success", d
print(len(d["data"]["result"]))'
}
n=0
for _ in $(seq 1 60); do
  n=$(prom_query "$OBS_PROM_QUERY" 2>/dev/null || echo 0)
  [ "$n" -gt 0 ] && break
  sleep 1
done
[ "$n" -gt 0 ] || fail "Prometheus has no series for $OBS_PROM_QUERY after 60 s"
[ "$(prom_query 'up{job="tally"} == 1')" = 1 ] ||
  fail "Prometheus says the target is not up"
[ "$(prom_query 'tally_build_info')" -gt 0 ] ||
  fail "Prometheus has no tally_build_info"
echo "Prometheus: $n series for $OBS_PROM_QUERY, target up"
kill -TERM "$(cat "$IT_DIR/prometheus.pid")" 2>/dev/null || true

step "json logs: every line of the worker (librdkafka's too) is log JSON"
it_worker_stop w1
assert_json_lines "$IT_DIR/w1.log"
grep '"level":"warn"' "$IT_DIR/w1.log" | grep -v 'rejected (invalid_json)' |
  grep -q . && fail "unexpected warnings in w1.log: $(grep '"level":"warn"' \
    "$IT_DIR/w1.log" | grep -v 'rejected (invalid_json)' | head -3)"
grep -q '"msg":"stopped cleanly"' "$IT_DIR/w1.log" ||
  fail "no 'stopped cleanly' line in w1.log"
grep -q '"msg":"kafka ' "$IT_DIR/w1.log" || fail "no librdkafka line in w1.log"
TALLY_LOG_FORMAT=json "$TALLY" migrate >/dev/null 2>"$IT_DIR/migrate-json.log" ||
  fail "TALLY_LOG_FORMAT=json tally migrate failed"
assert_json_lines "$IT_DIR/migrate-json.log"
"$TALLY" migrate --log-format text 2>&1 | grep -Eq '^[0-9-]+T[0-9:.]+Z info ' ||
  fail "--log-format text is not the text layout"

step "bad --log-format / --metrics-addr: exit 2, naming the setting"
expect_exit2() { # expect_exit2 WORD CMD...: exit 2 and WORD in stderr
  local word=$1 rc=0
  shift
  "$@" >"$IT_DIR/bad.out" 2>&1 || rc=$?
  [ "$rc" -eq 2 ] || fail "$* exited $rc, not 2: $(cat "$IT_DIR/bad.out")"
  grep -qF -- "$word" "$IT_DIR/bad.out" ||
    fail "$* does not name $word: $(cat "$IT_DIR/bad.out")"
}
expect_exit2 --log-format "$TALLY" worker --log-format yaml
expect_exit2 TALLY_LOG_FORMAT env TALLY_LOG_FORMAT=xml "$TALLY" migrate
for addr in '::1:9464' '[::1]' '[::1:9464' '1.2.3.4:0' 'example.org:80' \
  '127.0.0.1:http'; do
  expect_exit2 --metrics-addr "$TALLY" worker --metrics-addr "$addr" \
    --usage-topic "" --pg-dsn "host=/nonexistent"
done
expect_exit2 TALLY_METRICS_ADDR env TALLY_METRICS_ADDR='[::1' "$TALLY" worker

step "IPv6: [::1]:PORT, and :PORT on both families"
P2=$(it_free_port)
P3=$(it_free_port)
# Invalidation-only workers with groups of their own: they only serve.
it_worker_start w2 --metrics-addr "[::1]:$P2" --usage-topic "" \
  --invalidation-group obs-v6
it_worker_start w3 --metrics-addr ":$P3" --usage-topic "" \
  --invalidation-group obs-any
wait_http "http://[::1]:$P2/healthz"
[ "$(http_status GET "http://127.0.0.1:$P2/healthz")" = 000 ] ||
  fail "[::1]:$P2 also answers on 127.0.0.1"
"$PROMTOOL" check metrics < <(curl -fsS -g "http://[::1]:$P2/metrics") ||
  fail "/metrics over IPv6 is not clean"
wait_http "http://[::1]:$P3/healthz"
wait_http "http://127.0.0.1:$P3/healthz"
it_worker_stop w2
it_worker_stop w3
echo "ok"
