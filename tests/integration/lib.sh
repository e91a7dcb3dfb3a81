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
  # A sanitizer report from any process of the stack (the broker's exit
  # status goes unchecked, a worker killed with -9 has none) fails the
  # test as a non-zero exit would.
  if [ $rc -eq 0 ] && it_sanitizer_reports; then
    echo "FAIL: sanitizer reports in the logs above" >&2
    rc=1
  fi
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

# Prints the ASan/LSan/UBSan reports found in $IT_DIR's logs; true if any.
it_sanitizer_reports() {
  grep -rsE -A3 '==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: ' \
    --include='*.log' --include=log "$IT_DIR" >&2
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
# With IT_WORKER_WRAPPER set (a command line, split at spaces), the worker
# runs under it, e.g. IT_WORKER_WRAPPER="valgrind --error-exitcode=99";
# its pid is then the wrapper's, which must pass signals on or, like
# valgrind, be the worker's own process.
it_worker_start() {
  local name=$1 wrapper=()
  shift
  [ -n "${IT_WORKER_WRAPPER:-}" ] && read -ra wrapper <<<"$IT_WORKER_WRAPPER"
  "${wrapper[@]}" "$TALLY" worker --metrics-addr "" --batch-ms 200 \
    --commit-ms 200 "${IT_KAFKA_ARGS[@]}" "$@" >>"$IT_DIR/$name.log" 2>&1 &
  echo $! >"$IT_DIR/$name.pid"
  IT_WORKERS+=("$name")
}

it_worker_pid() {
  cat "$IT_DIR/$1.pid"
}

# Waits up to 60 s for worker NAME to exit, reaps it and sets IT_RC to
# its exit status (not in a subshell: `wait` needs the worker's parent);
# fails with WHY if it is still running: it_worker_reap NAME WHY
it_worker_reap() {
  local name=$1 pid rc=0
  pid=$(it_worker_pid "$name")
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && fail "worker $name $2"
  wait "$pid" || rc=$?
  # Reaped: its pid may be reused (pid_max is 32768 and the tests start
  # thousands of processes), so it_cleanup must not signal it any more.
  rm -f "$IT_DIR/$name.pid"
  IT_RC=$rc
}

# Stops a worker with SIGTERM and asserts it exits 0 within 60 s.
it_worker_stop() {
  local name=$1
  kill -TERM "$(it_worker_pid "$name")" 2>/dev/null ||
    fail "worker $name is not running"
  it_worker_reap "$name" "did not stop on SIGTERM"
  [ "$IT_RC" -eq 0 ] || fail "worker $name exited $IT_RC after SIGTERM"
}

it_worker_kill9() {
  local pid
  pid=$(it_worker_pid "$1")
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$IT_DIR/$1.pid" # reaped: see it_worker_stop
}

# Starts worker NAME with a test fault point armed (TALLY_TEST_FAULT, see
# worker/src/fault.h) and waits until the fault killed it with SIGKILL:
# it_crash_at NAME FAULT [worker args...]
it_crash_at() {
  local name=$1 fault=$2
  shift 2
  TALLY_TEST_FAULT=$fault it_worker_start "$name" "$@"
  it_worker_reap "$name" "was not killed at $fault"
  [ "$IT_RC" -eq 137 ] ||
    fail "$name exited $IT_RC at $fault, expected 137 (SIGKILL)"
  grep -q "TALLY_TEST_FAULT: killing the process at ${fault%%:*}" \
    "$IT_DIR/$name.log" || fail "$name did not die at $fault"
}

# Produces a JSON-lines file to the usage topic, and checks that the
# broker still holds every message (tally devbroker keeps ~5 MiB per
# partition).
it_produce() {
  "$TALLY" produce --file "$1" "${@:2}" >>"$IT_DIR/produce.log" 2>&1 ||
    fail "produce $1 failed"
  it_assert_retained token-usage
}

it_assert_retained() {
  /usr/bin/python3 "$IT_ROOT/scripts/low_watermarks.py" "$TALLY_BROKERS" \
    "$1" || fail "the test's backlog outgrew tally devbroker"
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

# ---------------------------------------------------------------------
# Helpers for the robustness tests (kill -9, Postgres restarts, groups,
# dead letters, dedupe).

# The Debian interpreter (python3-confluent-kafka); a pyenv python3 on
# PATH may not have the module.
IT_PYTHON=/usr/bin/python3

# Sum of a group's positions in Postgres: it_committed [GROUP]
it_committed() {
  it_sql "SELECT coalesce(sum(next_offset), 0) FROM tally.consumer_offsets
          WHERE group_id = '${1:-tally}'"
}

# Waits until a group's positions in Postgres add up to more than N:
# it_wait_progress N [TIMEOUT] [GROUP]. Prints the new sum.
it_wait_progress() {
  local above=$1 timeout=${2:-60} group=${3:-tally} got=0
  for _ in $(seq 1 $((timeout * 10))); do
    got=$(it_committed "$group")
    if [ "$got" -gt "$above" ]; then
      echo "$got"
      return 0
    fi
    sleep 0.1
  done
  fail "after ${timeout}s the group $group has not moved past $above"
}

# A moment for a kill placed by progress, not by time (a fixed delay after
# progress let a fast machine finish a test's backlog before its last
# kill): waits for the group's next commit past PREV, then for a random
# 500-5,000 messages more (at most up to TOTAL - 1), then a random 0-150
# ms, so that the kill lands anywhere in the batches' cycle. Prints
# "MOVED STEP MS". it_progress_moment PREV TOTAL [GROUP]
it_progress_moment() {
  local prev=$1 total=$2 group=${3:-tally} moved step ms target
  moved=$(it_wait_progress "$prev" 60 "$group")
  step=$(it_rand 500 5000)
  target=$((moved + step < total - 1 ? moved + step : total - 1))
  [ "$target" -gt "$moved" ] &&
    it_wait_progress "$target" 60 "$group" >/dev/null
  ms=$(it_rand 0 150)
  sleep "$(printf '0.%03d' "$ms")"
  echo "$moved $step $ms"
}

# True while worker NAME's process exists.
it_worker_alive() {
  kill -0 "$(it_worker_pid "$1")" 2>/dev/null
}

# Fails unless worker NAME is running.
it_assert_alive() {
  it_worker_alive "$1" || fail "worker $1 is not running (${2:-})"
}

# Waits until worker NAME's log matches the extended regex RE:
# it_wait_log NAME RE [TIMEOUT]
it_wait_log() {
  local name=$1 re=$2 timeout=${3:-60}
  for _ in $(seq 1 $((timeout * 10))); do
    grep -Eq -- "$re" "$IT_DIR/$name.log" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "after ${timeout}s the log of $name shows no /$re/"
}

# A random integer in [LO, HI]: it_rand LO HI
it_rand() {
  echo $(($1 + RANDOM % ($2 - $1 + 1)))
}

# Produces FILE in chunks of LINES lines, one chunk every SECS seconds, in
# the background (a producer that keeps going while a test disturbs the
# workers): it_produce_trickle FILE LINES SECS. it_trickle_wait waits for
# it to end and fails if a chunk could not be produced.
it_produce_trickle() {
  local file=$1 lines=$2 secs=$3 dir
  dir=$(mktemp -d "$IT_DIR/trickle.XXXXXX")
  split -l "$lines" -d -a 5 "$file" "$dir/chunk."
  (
    for chunk in "$dir"/chunk.*; do
      "$TALLY" produce --file "$chunk" -X message.timeout.ms=30000 \
        >>"$IT_DIR/produce.log" 2>&1 ||
        { echo "FAIL: produce $chunk failed" >&2; exit 1; }
      sleep "$secs"
    done
  ) &
  IT_TRICKLE_PID=$!
  # Killed by it_cleanup like a worker if the test fails.
  echo "$IT_TRICKLE_PID" >"$IT_DIR/trickle.pid"
  IT_WORKERS+=(trickle)
}

it_trickle_wait() {
  local rc=0
  wait "$IT_TRICKLE_PID" || rc=$?
  rm -f "$IT_DIR/trickle.pid"
  [ "$rc" -eq 0 ] || fail "the background producer failed ($rc)"
}

# Adds up expectation files of tally-gen (TSV, same bucket in several
# files summed) into OUT: it_merge_expect OUT FILE...
it_merge_expect() {
  local out=$1
  shift
  cat "$@" | awk -F '\t' -v OFS='\t' '
    { k = $1 OFS $2 OFS $3 OFS $4 OFS $5 OFS $6
      for (i = 7; i <= 12; i++) s[k, i] += $i; keys[k] = 1 }
    END { for (k in keys) { line = k
            for (i = 7; i <= 12; i++) line = line OFS sprintf("%.0f", s[k, i])
            print line } }' | LC_ALL=C sort >"$out"
}

# A value from a worker's /metrics: it_metric HOST:PORT 'name{labels}'
# (the series exactly as rendered; prints nothing when absent).
it_metric() {
  curl -fsS --max-time 5 "http://$1/metrics" |
    awk -v m="$2" '$1 == m { print $2 }'
}

# ---------------------------------------------------------------------
# Redis outages (the cache-invalidation tests).

# redis-cli against the private Redis: it_redis_cli ARGS...
it_redis_cli() {
  redis-cli -p "$(cat "$IT_DIR/redis/port")" "$@"
}

# Stops the private Redis: it_redis_stop [nosave|save]. With save, Redis
# writes $IT_DIR/redis/dump.rdb first, which it_redis_start loads again
# (keys put back atomically, before anyone can connect). Returns once the
# port is closed.
it_redis_stop() {
  local mode=${1:-nosave}
  it_redis_cli shutdown "$mode" >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do
    it_redis_cli ping >/dev/null 2>&1 || return 0
    sleep 0.1
  done
  fail "redis did not stop"
}

# Starts the private Redis again on its port, as stack_start_redis did
# (loading $IT_DIR/redis/dump.rdb if there is one); waits for PONG.
it_redis_start() {
  local port
  port=$(cat "$IT_DIR/redis/port")
  redis-server --port "$port" --bind 127.0.0.1 --dir "$IT_DIR/redis" \
    --save "" --appendonly no --daemonize yes \
    --pidfile "$IT_DIR/redis/pid" --logfile "$IT_DIR/redis/log" \
    >/dev/null || fail "redis-server did not start again on $port"
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  fail "redis did not answer on $port after a restart"
}

# A free TCP port for a listener of the test (e.g. --metrics-addr), below
# the kernel's ephemeral range: a port in that range may be the local port
# of one of the many client connections of a test, invisible to a connect
# check, and bind() then fails with "Address already in use".
it_free_port() {
  local lo port
  lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$lo" -gt 12000 ] 2>/dev/null || lo=32768
  for _ in $(seq 1 100); do
    port=$((10000 + RANDOM % (lo - 10000)))
    if ! (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  fail "no free port below $lo"
}

# Terminates the worker's Postgres connections (application_name tally);
# prints how many.
it_pg_terminate_workers() {
  it_sql "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE application_name = 'tally' AND pid <> pg_backend_pid()"
}
