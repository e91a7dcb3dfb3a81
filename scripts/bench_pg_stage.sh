#!/usr/bin/env bash
# The Postgres stage of tally alone: no Kafka, no parsing in the timings.
#
#   scripts/bench_pg_stage.sh [EVENTS] [DESIGN:BATCH:CONNS[:SPLIT[:WINDOW]]...]
#
# Starts a private Postgres (scripts/stack.sh: fsync on, the stack's
# settings), generates EVENTS events (default 500,000) with tally-gen as
# scripts/bench.sh does (3,000 tenants, seed 11, 5% duplicates; --now in
# the middle of a month unless BENCH_NOW is set), then for each
# configuration creates a fresh database (tally migrate), replays the
# batch transactions with tally-pgstage (worker/tools/pg_stage.c: the
# worker's own parser and batch code, and for design `real` its own
# store_commit_batch()) and checks the sums against the generator's.
# Default configurations: the current code at 10,000 and 50,000 messages
# per transaction, on 1 connection and on 2 (disjoint tenants, then
# overlapping ones). DESIGN is one of tally-pgstage's (--help): real,
# onepass, binary, lean, nomonth, window. BATCH is the messages per
# transaction (for real, the size of the worker's batch in memory; with
# WINDOW > 1, a transaction holds WINDOW such batches: store_window_add
# and store_window_commit). SPLIT is `overlap` (the connections share
# tenants and keys) or `disjoint` (split by tenant, the default).
#
# Each configuration runs BENCH_REPEAT times (default 2); every run prints
# one line: messages/s, Postgres CPU µs per message (all processes of the
# cluster), the backends' CPU µs per message by step, and the load
# average when it started. Lines also go to $BENCH_OUT (JSON lines) when
# set. BENCH_KEEP=1 keeps the directory. BENCH_TOOL_ARGS adds tally-pgstage
# flags (e.g. --sync-commit). BENCH_PG_SETTINGS="name=value ..." sets
# Postgres settings for every session of the database (ALTER DATABASE),
# e.g. "work_mem=64MB jit=off". BENCH_STAGE runs another tally-pgstage
# binary; with BENCH_BASE set to one built from an older commit, DESIGN
# `base` is that binary's `real` (a baseline run beside the others, in
# the same conditions).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=${1:-500000}
shift || true
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(real:10000:1 real:50000:1
  real:10000:2 real:10000:2:overlap real:50000:2 real:50000:2:overlap)
repeat=${BENCH_REPEAT:-2}
now=${BENCH_NOW:-$(date -u -d "$(date -u +%Y-%m-15T12:00:00Z)" +%s)}

bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build-bench" -DBUILD_TESTING=OFF
TALLY=$here/build-bench/worker/tally
GEN=$here/build-bench/worker/tally-gen
STAGE=${BENCH_STAGE:-$here/build-bench/worker/tally-pgstage}
# shellcheck source=stack.sh
source "$here/scripts/stack.sh"

dir=$(mktemp -d /tmp/tally-bench-pg.XXXXXX)
chmod 755 "$dir"
cleanup() {
  stack_stop "$dir"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
stack_start_pg "$dir" >/dev/null
port=$(cat "$dir/pg/port")
dsn="host=127.0.0.1 port=$port user=tally dbname=tally"
psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U tally "$@"; }
postmaster=$(head -1 "$dir/pg/data/postmaster.pid")

echo "== generating $events events (--now $(date -u -d "@$now" +%FT%TZ))"
"$GEN" --count "$events" --tenants 3000 --seed 11 --dup-rate 0.05 \
  --now "$now" --expect "$dir/expect" >"$dir/events.jsonl"
LC_ALL=C sort "$dir/expect" >"$dir/expect.sorted"
echo "   $(awk '$1 == "events" { e = $2 } $1 == "buckets" { b = $2 }
  END { print e " events, " b " daily buckets" }' "$dir/expect.summary")"

# BENCH_PRELOAD=N: the dedupe store holds N older events (distinct keys,
# occurred_at 10-25 days back) before each run, as it does in steady
# state (it keeps --dedupe-days of traffic): a template database, loaded
# once and analyzed, copied for each run.
template=template0
if [ "${BENCH_PRELOAD:-0}" -gt 0 ]; then
  echo "== preloading the dedupe store with $BENCH_PRELOAD events"
  psql_ -d postgres -c "CREATE DATABASE tally_preload"
  TALLY_PG_DSN="${dsn/dbname=tally/dbname=tally_preload}" "$TALLY" migrate \
    2>/dev/null
  psql_ -d tally_preload -c "INSERT INTO tally.token_usage_events
      (tenant_id, idempotency_key, occurred_at, token_type, operation, model,
       tokens, payload_hash, source)
    SELECT 'tenant-' || (g % 3000), 'old-' || g,
      to_timestamp($now) - interval '10 days' - (g % 1296000) * interval '1 second',
      'llm', 'chat', 'gpt-4o', 100, g, 'token-usage/0/' || g
    FROM generate_series(1, $BENCH_PRELOAD) g" -c "VACUUM ANALYZE"
  template=tally_preload
fi

fresh_db() {
  psql_ -d postgres -c "DROP DATABASE IF EXISTS tally" \
    -c "CREATE DATABASE tally TEMPLATE $template"
  for kv in ${BENCH_PG_SETTINGS:-}; do
    psql_ -d postgres -c "ALTER DATABASE tally SET ${kv%%=*} = '${kv#*=}'"
  done
  TALLY_PG_DSN=$dsn "$TALLY" migrate 2>/dev/null
  if [ "$1" = lean ]; then
    psql_ -d tally -c "ALTER TABLE tally.token_usage_events
      DROP COLUMN source, DROP COLUMN counted_at"
  fi
}

check_sums() {
  psql_ -d tally -F $'\t' -c "SELECT tenant_id, day, token_type, operation,
      model, agent_id, tokens, prompt_tokens, completion_tokens,
      thoughts_tokens, cached_tokens, events FROM tally.token_usage_daily" |
    LC_ALL=C sort | cmp -s - "$dir/expect.sorted" || { echo "daily MISMATCH"; return; }
  [ "$1" = nomonth ] && { echo exact; return; }
  local diff
  diff=$(psql_ -d tally -c "SELECT count(*) FROM (SELECT tenant_id,
      date_trunc('month', day)::date AS month, token_type, operation, model,
      agent_id, sum(tokens) AS tokens, sum(events) AS events
      FROM tally.token_usage_daily GROUP BY 1, 2, 3, 4, 5, 6) d
      FULL JOIN tally.token_usage_monthly m
      USING (tenant_id, month, token_type, operation, model, agent_id)
      WHERE d.tokens IS DISTINCT FROM m.tokens
         OR d.events IS DISTINCT FROM m.events")
  [ "$diff" = 0 ] && echo exact || echo "monthly MISMATCH ($diff)"
}

printf '%-8s %10s %-10s %9s %9s %9s  %-9s %s\n' design batch conns msgs/s \
  "pg µs/m" "be µs/m" sums "load; backend CPU µs/msg by step"
for cfg in "${configs[@]}"; do
  IFS=: read -r design batch conns split window <<<"$cfg"
  bin=$STAGE
  if [ "$design" = base ]; then
    bin=${BENCH_BASE:?BENCH_BASE: the baseline tally-pgstage}
    design=real
  fi
  args=(--design "$design" --batch "$batch" --conns "$conns")
  [ "${split:-}" = overlap ] && args+=(--overlap)
  [ -n "${window:-}" ] && args+=(--window "$window")
  for _ in $(seq 1 "$repeat"); do
    fresh_db "$design"
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    # shellcheck disable=SC2086
    out=$(TALLY_PG_DSN=$dsn "$bin" --file "$dir/events.jsonl" \
      --now "$now" --pg-pid "$postmaster" "${args[@]}" \
      ${BENCH_TOOL_ARGS:-} 2>>"$dir/stage.log")
    sums=$(check_sums "$design")
    [ "$bin" = "$STAGE" ] || out=${out/\"design\":\"real\"/\"design\":\"base\"}
    [ -n "${BENCH_OUT:-}" ] &&
      echo "${out%\}},\"load\":\"$load\",\"sums\":\"$sums\"}" >>"$BENCH_OUT"
    python3 - "$out" "$load" "$sums" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
conns = str(r["conns"]) + ("" if r["split"] == "-" else " " + r["split"])
steps = " ".join("%s %.1f" % (k, v["cpu_us"]) for k, v in r["steps"].items())
for k in ("retries", "window_deadlocks"):
    if r.get(k):
        steps += "; %s %d" % (k, r[k])
batch = str(r["batch"]) + ("x%d" % r["window"] if r.get("window", 1) > 1 else "")
print("%-8s %10s %-10s %9.0f %9.1f %9.1f  %-9s %s; %s" % (
    r["design"], batch, conns, r["msgs_per_s"],
    r["pg_cpu_us_per_msg"], r["backend_cpu_us_per_msg"], sys.argv[3],
    sys.argv[2], steps))
PY
  done
done
