#!/usr/bin/env bash
# The client's invalidation calls against a real Redis through the worker:
# keys for tenants t1, t2 and t10 built with the client's key layout; for
# t1 an exact key, two wildcards, agent cascades with and without
# invalidate_conversations, conversation cascades with and without agent,
# a plain agent key, through CacheManager.invalidate, the cascade helpers
# and their sync twins. Redis keeps exactly what the contract says, t2 and
# t10 are untouched, and each call's notice on cache:invalidations names
# exactly the keys and prefixes of cache_targets(). Then tally produce
# --validate checks a cache-invalidation file as invalidations.
#
# usage: test_client_invalidation.sh TALLY TALLY_GEN
source "$(dirname "$0")/client_lib.sh"
it_setup "$1" "$2" 4
T0=$SECONDS
redis_port=$(cat "$IT_DIR/redis/port")

step "1. seed Redis, subscribe to cache:invalidations, start a worker"
drive inv-seed "$IT_DIR"
while read -r k; do printf 'SET %s v\n' "$k"; done <"$IT_DIR/inv.seed" |
  it_redis_cli >/dev/null
[ "$(it_redis_cli dbsize)" = "$(wc -l <"$IT_DIR/inv.seed")" ] ||
  fail "seeding Redis failed"
redis-cli -p "$redis_port" subscribe cache:invalidations \
  >"$IT_DIR/notices.out" 2>&1 &
echo $! >"$IT_DIR/sub.pid"
IT_WORKERS+=(sub)
client_worker_start
it_wait_log w1 "rebalance \(cache-invalidation\): assigned [1-9]" 30

step "2. every kind of invalidation through tally_client.py"
drive inv-send "$IT_DIR"
n=$(/usr/bin/python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$IT_DIR/inv.ids")
for _ in $(seq 1 300); do
  [ "$(grep -c '^cache:invalidations$' "$IT_DIR/notices.out")" -ge "$n" ] &&
    break
  sleep 0.1
done

step "3. Redis and the notices are what the contract says"
it_redis_cli --scan | LC_ALL=C sort >"$IT_DIR/keys.now"
drive inv-check "$IT_DIR" "$IT_DIR/notices.out" "$IT_DIR/keys.now"

step "4. tally produce --validate on cache-invalidation checks invalidations"
cat >"$IT_DIR/inv.jsonl" <<'JSON'
{"tenant_id":"t2","data_type":"agent_execution_state","resource_id":"e2","agent_id":"a1"}
{"tenant_id":"t2","data_type":"agent","resource_id":"*","cascade":true}
{"tenant_id":"t2","data_type":"Agent","resource_id":"a1"}
JSON
rc=0
"$TALLY" produce --topic cache-invalidation --validate \
  --file "$IT_DIR/inv.jsonl" 2>"$IT_DIR/validate.err" || rc=$?
[ "$rc" = 1 ] || fail "produce --validate exited $rc, expected 1"
grep -q '^line 2: cascade_wildcard: ' "$IT_DIR/validate.err" &&
  grep -q '^line 3: invalid_data_type: ' "$IT_DIR/validate.err" ||
  fail "produce --validate: $(cat "$IT_DIR/validate.err")"
[ "$(grep -c '^line ' "$IT_DIR/validate.err")" = 2 ] ||
  fail "produce --validate rejected a valid invalidation"
for _ in $(seq 1 100); do
  [ "$(it_redis_cli exists 'cache:{t2}:agent_execution_state:agent=a1:e2')" = 0 ] &&
    break
  sleep 0.1
done
[ "$(it_redis_cli exists 'cache:{t2}:agent_execution_state:agent=a1:e2')" = 0 ] ||
  fail "the valid line was not sent and applied"
rc=0
"$TALLY" produce --topic other-topic --kind invalidation --validate \
  --file "$IT_DIR/inv.jsonl" 2>"$IT_DIR/validate2.err" || rc=$?
[ "$rc" = 1 ] && [ "$(grep -c '^line ' "$IT_DIR/validate2.err")" = 2 ] ||
  fail "--kind invalidation: rc $rc, $(cat "$IT_DIR/validate2.err")"

it_worker_stop w1
echo "PASS: every invalidation call applied as the contract says," \
  "other tenants untouched ($((SECONDS - T0)) s)"
