#!/usr/bin/env bash
# tally's main job on a local embedded stack: installs what it needs,
# builds, starts tally devbroker with a private Postgres and Redis, sends
# sample events (with duplicates and bad ones), runs the worker until
# everything is counted, then prints the daily and monthly tables and the
# dead-letter count. Everything is stopped at the end.
#   scripts/demo.sh [EVENTS]   (default 20000)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=${1:-20000}

echo "== installing dependencies (Debian packages) and building"
bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build"
TALLY=$here/build/worker/tally
GEN=$here/build/worker/tally-gen
# shellcheck source=stack.sh
source "$here/scripts/stack.sh"

dir=$(mktemp -d /tmp/tally-demo.XXXXXX)
worker_pid=""
cleanup() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
  stack_stop "$dir"
}
trap cleanup EXIT

echo "== starting tally devbroker, Postgres and Redis in $dir"
stack_start "$dir" 8
# shellcheck disable=SC1091
source "$dir/env"
echo "   brokers $TALLY_BROKERS"
echo "   postgres $TALLY_PG_DSN"

echo "== producing $events sample events (5% duplicates, 1% bad)"
"$GEN" --count "$events" --tenants 200 --dup-rate 0.05 --bad-rate 0.01 \
  --expect "$dir/expect" >"$dir/events.jsonl"
"$TALLY" produce --file "$dir/events.jsonl"
lines=$(awk '$1 == "lines" { print $2 }' "$dir/expect.summary")

echo "== running tally worker (log: $dir/worker.log)"
"$TALLY" worker --metrics-addr "" >"$dir/worker.log" 2>&1 &
worker_pid=$!
for _ in $(seq 1 600); do
  done_msgs=$($PSQL -At -c "SELECT coalesce(sum(next_offset), 0)
                            FROM tally.consumer_offsets" 2>/dev/null || echo 0)
  [ "$done_msgs" = "$lines" ] && break
  sleep 0.2
done
kill -TERM "$worker_pid"
wait "$worker_pid" || true
worker_pid=""
grep -E "progress|stopped" "$dir/worker.log" | tail -3

echo
echo "== tally.token_usage_daily (top 15 rows by tokens)"
$PSQL -c "SELECT tenant_id, day, token_type, operation, model, agent_id,
                 tokens, events
            FROM tally.token_usage_daily ORDER BY tokens DESC LIMIT 15"
echo "== tally.token_usage_monthly (per month and operation)"
$PSQL -c "SELECT month, token_type, operation, sum(tokens) AS tokens,
                 sum(events) AS events, count(DISTINCT tenant_id) AS tenants
            FROM tally.token_usage_monthly GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
counted=$($PSQL -At -c "SELECT sum(events) FROM tally.token_usage_daily")
dlq=$(kcat -b "$TALLY_BROKERS" -C -t token-usage.dlq -e -q -f 'x\n' 2>/dev/null |
      wc -l)
echo "== $lines messages: $counted events counted (expected" \
     "$(awk '$1 == "events" { print $2 }' "$dir/expect.summary")), $dlq dead" \
     "letters in token-usage.dlq (expected" \
     "$(awk '$1 == "bad" { print $2 }' "$dir/expect.summary"))"
echo "   reasons: $(kcat -b "$TALLY_BROKERS" -C -t token-usage.dlq -e -q \
  -f '%h\n' 2>/dev/null | grep -o 'tally.error.reason=[a-z_]*' |
  sed 's/tally.error.reason=//' | sort | uniq -c | sort -rn |
  awk '{ printf "%s %s, ", $2, $1 }')"
