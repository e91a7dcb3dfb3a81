#!/usr/bin/env bash
# tally's main job on a local embedded stack: installs what it needs,
# builds, starts tally devbroker with a private Postgres and Redis, sends
# sample events (with duplicates and bad ones), runs the worker until
# everything is counted, then prints the daily and monthly tables and the
# dead-letter count. Then the cache half: a tenant's cached keys (and the
# same ids under another tenant) in Redis, cascades and a wildcard
# published through scripts/tally_client.py, the keys before and after and
# the notices on cache:invalidations. Everything is stopped and removed at
# the end.
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
sub_pid=""
cleanup() {
  set +e # a killed child's status must not stop the cleanup
  for pid in $worker_pid $sub_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  stack_stop "$dir"
  rm -rf "$dir"
}
trap cleanup EXIT

echo "== starting tally devbroker, Postgres and Redis in $dir"
stack_start "$dir" 8
# shellcheck disable=SC1091
source "$dir/env"
# The client's spool (used only if Kafka and Postgres both fail) stays in
# $dir, removed with it.
export TALLY_SPOOL="$dir/client-spool.jsonl"
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
grep -E "progress" "$dir/worker.log" | tail -2 || true

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

echo
echo "== the cache half: keys in Redis, invalidations through tally_client.py"
redis="redis-cli -p $(cat "$dir/redis/port")"
# The services' key layout, from the client (the same vectors pin the C
# code): tenant acme's agent a1 with its config, tools and conversations,
# conversation c2 under agent a2, query results; the same ids under globex.
PYTHONPATH="$here/scripts" /usr/bin/python3 - >"$dir/keys.seed" <<'PY'
import tally_client as tc
for t in ("acme", "globex"):
    print(tc.cache_key(t, tc.CACHE_TYPE_AGENT, "a1"))
    print(tc.cache_key(t, tc.CACHE_TYPE_AGENT_CONFIG, "a1"))
    print(tc.cache_key(t, tc.CACHE_TYPE_AGENT_TOOLS, "a1"))
    for agent, conv in (("a1", "c1"), ("a2", "c2")):
        print(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION, conv,
                           agent_id=agent, conversation_id=conv))
        print(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION_MEMORY, conv,
                           agent_id=agent, conversation_id=conv))
        for m in ("m1", "m2"):
            print(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION_MESSAGE, m,
                               agent_id=agent, conversation_id=conv))
    print(tc.cache_key(t, tc.CACHE_TYPE_AGENT, "a2"))
    for q in ("q1", "q2"):
        print(tc.cache_key(t, tc.CACHE_TYPE_QUERY_RESULT, q))
PY
while read -r k; do printf 'SET %s cached\n' "$k"; done <"$dir/keys.seed" |
  $redis >/dev/null
$redis subscribe cache:invalidations >"$dir/notices" 2>&1 &
sub_pid=$!
echo "-- before: $($redis dbsize) keys"
$redis --scan | LC_ALL=C sort | sed 's/^/   /'

echo "-- publishing (scripts/tally_client.py):"
PYTHONPATH="$here/scripts" /usr/bin/python3 - <<'PY'
import asyncio
import tally_client as tc
from tally_client import (CacheManager, invalidate_agent_cache_cascade,
                          invalidate_conversation_cache_cascade)

async def main():
    await invalidate_agent_cache_cascade(tenant_id="acme", agent_id="a1",
                                         invalidate_conversations=True)
    print("   invalidate_agent_cache_cascade(tenant_id='acme', "
          "agent_id='a1', invalidate_conversations=True)")
    await invalidate_conversation_cache_cascade(
        tenant_id="acme", conversation_id="c2", agent_id="a2")
    print("   invalidate_conversation_cache_cascade(tenant_id='acme', "
          "conversation_id='c2', agent_id='a2')")
    await CacheManager.invalidate(tenant_id="acme",
                                  data_type=tc.CACHE_TYPE_QUERY_RESULT,
                                  resource_id="*")
    print("   CacheManager.invalidate(tenant_id='acme', "
          "data_type='query_result', resource_id='*')")

asyncio.run(main())
tc.flush(30)
print("   client: %s" % tc.stats())
PY
for _ in $(seq 1 300); do
  [ "$(grep -c '^cache:invalidations$' "$dir/notices")" -ge 3 ] && break
  sleep 0.1
done
echo "-- after: $($redis dbsize) keys (globex untouched, acme's agent a2 kept)"
$redis --scan | LC_ALL=C sort | sed 's/^/   /'
echo "-- notices received on cache:invalidations:"
# redis-cli prints each message as three lines: message, channel, payload.
awk 'p == 2 { print "   " $0 }
     { if ($0 == "message") p = 1
       else if (p == 1 && $0 == "cache:invalidations") p = 2
       else p = 0 }' "$dir/notices"

kill -TERM "$worker_pid"
wait "$worker_pid" || true
worker_pid=""
grep -E "stopped" "$dir/worker.log" | tail -1
echo "== done; removing $dir"
