# Shared helpers for tally's integration tests: a private stack per test
# (Postgres, Redis, tally devbroker), workers in the background, waits on
# what Postgres says, exact comparisons. Source it, then call it_setup.
#
#   it_setup TALLY TALLY_GEN [PARTITIONS]
#
# Everything lives in $IT_DIR and is torn down by an EXIT trap.

set -euo pipefail

IT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../scripts/stack.sh
source "$IT_ROOT/scripts/stack.sh"

IT_WORKERS=()

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

step() {
  echo "--- $*"
}

it_cleanup() {
  local rc=$?
  set +e
  for name in "${IT_WORKERS[@]}"; do
    local pidf="$IT_DIR/$name.pid"
    [ -f "$pidf" ] && kill -KILL "$(cat "$pidf")" 2>/dev/null
  done
  stack_stop "$IT_DIR"
  if [ $rc -ne 0 ]; then
    echo "=== test failed (rc=$rc); logs in $IT_DIR:" >&2
    for f in "$IT_DIR"/*.log; do
      [ -f "$f" ] || continue
      echo "=== $f (last 40 lines)" >&2
      tail -40 "$f" >&2
    done
  elif [ -z "${IT_KEEP:-}" ]; then
    rm -rf "$IT_DIR"
  fi
  exit $rc
}

it_setup() {
  TALLY=$(readlink -f "$1")
  TALLY_GEN=$(readlink -f "$2")
  local partitions=${3:-4}
  IT_DIR=$(mktemp -d /tmp/tally-it.XXXXXX)
  trap it_cleanup EXIT
  stack_start "$IT_DIR" "$partitions" || fail "stack did not start"
  # shellcheck disable=SC1091
  source "$IT_DIR/env"
  # Fast group changes for tests; production keeps librdkafka's defaults.
  IT_KAFKA_ARGS=(-X session.timeout.ms=6000 -X heartbeat.interval.ms=500)
  $TALLY migrate >"$IT_DIR/migrate.log" 2>&1 || fail "migrate failed"
}

# psql returning bare values.
it_sql() {
  $PSQL -At -c "$1"
}

# Starts a worker named NAME in the background: it_worker_start NAME [args]
it_worker_start() {
  local name=$1
  shift
  "$TALLY" worker --metrics-addr "" --batch-ms 200 "${IT_KAFKA_ARGS[@]}" \
    "$@" >>"$IT_DIR/$name.log" 2>&1 &
  echo $! >"$IT_DIR/$name.pid"
  IT_WORKERS+=("$name")
}

it_worker_pid() {
  cat "$IT_DIR/$1.pid"
}

# Stops a worker with SIGTERM and asserts it exits 0 within 60 s.
it_worker_stop() {
  local name=$1 pid rc=0
  pid=$(it_worker_pid "$name")
  kill -TERM "$pid" 2>/dev/null || fail "worker $name is not running"
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && fail "worker $name did not stop on SIGTERM"
  wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || fail "worker $name exited $rc after SIGTERM"
}

it_worker_kill9() {
  local pid
  pid=$(it_worker_pid "$1")
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Produces a JSON-lines file to the usage topic.
it_produce() {
  "$TALLY" produce --file "$1" "${@:2}" >>"$IT_DIR/produce.log" 2>&1 ||
    fail "produce $1 failed"
}

# Waits until the group's positions in Postgres add up to N messages
# (every message consumed and committed), at most T seconds (default 120).
it_wait_consumed() {
  local want=$1 timeout=${2:-120} group=${3:-tally} got=""
  for _ in $(seq 1 $((timeout * 5))); do
    got=$(it_sql "SELECT coalesce(sum(next_offset), 0) FROM
                  tally.consumer_offsets WHERE group_id = '$group'")
    [ "$got" = "$want" ] && return 0
    sleep 0.2
  done
  fail "after ${timeout}s the group $group committed $got of $want messages"
}

# The daily table in the generator's TSV layout, sorted in byte order.
it_daily_tsv() {
  $PSQL -At -F $'\t' -c "SELECT tenant_id, day, token_type, operation,
      model, agent_id, tokens, prompt_tokens, completion_tokens,
      thoughts_tokens, cached_tokens, events
    FROM tally.token_usage_daily" | LC_ALL=C sort
}

# Asserts the daily table equals the generator's expectation exactly, and
# the monthly table equals the daily one rolled up.
it_assert_sums() {
  local expect=$1
  it_daily_tsv >"$IT_DIR/daily.tsv"
  LC_ALL=C sort "$expect" >"$IT_DIR/expect.tsv"
  if ! diff -q "$IT_DIR/expect.tsv" "$IT_DIR/daily.tsv" >/dev/null; then
    diff "$IT_DIR/expect.tsv" "$IT_DIR/daily.tsv" | head -20 >&2
    fail "daily sums differ from what was produced ($expect)"
  fi
  local bad
  bad=$(it_sql "SELECT count(*) FROM (
      SELECT tenant_id, date_trunc('month', day)::date AS month, token_type,
             operation, model, agent_id, sum(tokens) t, sum(events) e,
             sum(prompt_tokens) p, sum(completion_tokens) c,
             sum(thoughts_tokens) th, sum(cached_tokens) ca
        FROM tally.token_usage_daily GROUP BY 1, 2, 3, 4, 5, 6
      EXCEPT
      SELECT tenant_id, month, token_type, operation, model, agent_id,
             tokens, events, prompt_tokens, completion_tokens,
             thoughts_tokens, cached_tokens
        FROM tally.token_usage_monthly) x")
  [ "$bad" = "0" ] || fail "monthly sums differ from daily ones ($bad rows)"
  local nm nd
  nm=$(it_sql "SELECT count(*) FROM tally.token_usage_monthly")
  nd=$(it_sql "SELECT count(*) FROM (SELECT DISTINCT tenant_id,
      date_trunc('month', day), token_type, operation, model, agent_id
      FROM tally.token_usage_daily) x")
  [ "$nm" = "$nd" ] || fail "monthly has $nm rows, daily rolls up to $nd"
}

# Value of a line "key N" in a generator summary file.
it_summary() {
  awk -v k="$2" '$1 == k { print $2 }' "$1"
}
