#!/usr/bin/env bash
# Ingestion while the dedupe store is pruned: does removing a backlog of
# expired rows slow counting down?
#
#   scripts/bench_retention.sh [EVENTS] [PARTITIONS] [EXPIRED]
#                              (default 1000000, 64, 1000000)
#
# Four runs, each on a fresh private stack (scripts/stack.sh) holding
# EXPIRED expired rows in tally.token_usage_events (inserted with SQL:
# distinct keys, occurred_at 40-60 days ago, then VACUUM ANALYZE), each
# counting the same EVENTS events (tally-gen, as scripts/bench.sh) with
# one worker:
#   (a) a backlog (produced before the worker starts), --prune-interval 0
#       (never prunes): the baseline;
#   (b) the same backlog, --prune-interval 5: the first pruning 5 s after
#       start (once the group has joined and counting has begun; with 1 s
#       the idle worker would delete everything while joining), then a
#       50,000-row delete whenever the committer is idle, no batch is due
#       and expired rows remain;
#   (c) the events produced at BENCH_RATE/s (default 15,000) while the
#       worker runs, --prune-interval 0: steady traffic, the baseline;
#   (d) as (c), pruning as in (b): the case pruning is for.
# Each reports events/s from the first message to the last commit (exact
# sums checked), the batch commit durations (the worker's debug batch
# timings: fence + dedupe and sums + COMMIT; p50/p90/p99/max), the
# longest lock wait Postgres saw (log_lock_waits at 10 ms, and
# pg_stat_activity sampled every 0.2 s), and the expired rows deleted
# before the first message, while counting and after the last commit.
# BENCH_PRUNE_INTERVAL changes (b)'s and (d)'s interval, BENCH_RATE
# (c)'s and (d)'s rate; BENCH_RUNS="c d" runs only those (default all
# four); BENCH_KEEP=1 keeps the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=${1:-1000000}
partitions=${2:-64}
expired=${3:-1000000}
prune_b=${BENCH_PRUNE_INTERVAL:-5}
rate_c=${BENCH_RATE:-15000}
runs=${BENCH_RUNS:-a b c d}

bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build-bench" -DBUILD_TESTING=OFF
TALLY=$here/build-bench/worker/tally
GEN=$here/build-bench/worker/tally-gen
# shellcheck source=stack.sh
source "$here/scripts/stack.sh"

top=$(mktemp -d /tmp/tally-bench-ret.XXXXXX)
chmod 755 "$top" # the stack runs Postgres as its own user
dir=""
wpid=""
spid=""
cleanup() {
  [ -n "$wpid" ] && kill -KILL "$wpid" 2>/dev/null
  [ -n "$spid" ] && kill -KILL "$spid" 2>/dev/null
  [ -n "$dir" ] && stack_stop "$dir"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$top"
}
trap cleanup EXIT

echo "== generating $events events"
"$GEN" --count "$events" --tenants 3000 --seed 11 --dup-rate 0.05 \
  --expect "$top/expect" >"$top/events.jsonl"
lines=$(awk '$1 == "lines" { print $2 }' "$top/expect.summary")

# Percentile P (0-100) of the numbers on stdin.
pct() {
  sort -n | awk -v p="$1" '{ v[NR] = $1 }
    END { if (NR == 0) { print "-"; exit }
          i = int((NR - 1) * p / 100 + 0.5) + 1; print v[i] }'
}
ts() { date -d "$1" +%s.%N; }

# Produces the events at RATE lines/s (a chunk of RATE lines a second),
# then writes the time it finished to $dir/paced.end.
paced_produce() {
  local rate=$1 t0 i=0 c
  mkdir -p "$dir/chunks"
  split -l "$rate" -d -a 5 "$top/events.jsonl" "$dir/chunks/c."
  t0=$(date +%s.%N)
  for c in "$dir"/chunks/c.*; do
    "$TALLY" produce --file "$c" -X partitioner=random 2>>"$dir/produce.log"
    i=$((i + 1))
    sleep "$(echo "x = $t0 + $i - $(date +%s.%N); if (x < 0) 0 else x" | bc)"
  done
  date +%s.%N >"$dir/paced.end"
}

# run NAME PRUNE_INTERVAL [RATE]: prints "name=value" lines into
# $top/NAME.res. Without RATE the events are a backlog produced before
# the worker starts; with RATE they are produced at RATE/s while it runs.
run() {
  local name=$1 prune=$2 rate=${3:-} port got first last secs ppid=""
  dir="$top/$name"
  mkdir -p "$dir"
  stack_start "$dir" "$partitions" >/dev/null
  # shellcheck disable=SC1091
  source "$dir/env"
  "$TALLY" migrate >"$dir/migrate.log" 2>&1
  $PSQL -q -c "ALTER SYSTEM SET log_lock_waits = on" \
        -c "ALTER SYSTEM SET deadlock_timeout = '10ms'" \
        -c "SELECT pg_reload_conf()" >/dev/null
  echo "== ($name) inserting $expired expired rows"
  $PSQL -q -c "INSERT INTO tally.token_usage_events
      (tenant_id, idempotency_key, occurred_at, token_type, operation,
       model, tokens, prompt_tokens, completion_tokens, source)
    SELECT 'tenant-' || (g % 3000), 'expired-' || g,
           now() - interval '40 days' - (g % 1728000) * interval '1 second',
           'llm', 'chat', 'gpt-4o', 100, 60, 40, 'sql'
      FROM generate_series(1, $expired) g" \
    -c "VACUUM ANALYZE tally.token_usage_events" >/dev/null
  if [ -z "$rate" ]; then
    "$TALLY" produce --file "$top/events.jsonl" -X partitioner=random \
      2>"$dir/produce.log"
    /usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" \
      token-usage
  fi

  # Lock waits as pg_stat_activity shows them (ms, the longest per sample).
  (while :; do
     $PSQL -At -c "SELECT coalesce(max(extract(epoch FROM
                     clock_timestamp() - state_change) * 1000)::int, 0)
                   FROM pg_stat_activity WHERE wait_event_type = 'Lock'" \
       2>/dev/null || true
     sleep 0.2
   done) >"$dir/lockwaits" &
  spid=$!
  port=$(stack_free_port)
  echo "== ($name) consuming with one worker, --prune-interval $prune"
  "$TALLY" worker --metrics-addr "127.0.0.1:$port" --log-level debug \
    --prune-interval "$prune" >"$dir/worker.log" 2>&1 &
  wpid=$!
  if [ -n "$rate" ]; then
    paced_produce "$rate" &
    ppid=$!
  fi
  while :; do
    got=$($PSQL -At -c "SELECT coalesce(sum(next_offset), 0)
                        FROM tally.consumer_offsets" 2>/dev/null || echo 0)
    [ "$got" = "$lines" ] && break
    kill -0 "$wpid" 2>/dev/null || { tail "$dir/worker.log"; exit 1; }
    sleep 0.5
  done
  first=$(grep -m1 "first message" "$dir/worker.log" | cut -d' ' -f1)
  last=$($PSQL -At -c "SELECT to_char(max(updated_at) AT TIME ZONE 'UTC',
                        'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                       FROM tally.consumer_offsets")
  if [ -n "$ppid" ]; then
    wait "$ppid"
    /usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" \
      token-usage
  fi
  # (b), (c): let it finish the expired rows (at most 120 s more).
  if [ "$prune" -gt 0 ]; then
    for _ in $(seq 1 240); do
      [ "$($PSQL -At -c "SELECT count(*) FROM tally.token_usage_events
            WHERE idempotency_key LIKE 'expired-%'")" = 0 ] && break
      sleep 0.5
    done
  fi
  kill -KILL "$spid" 2>/dev/null; wait "$spid" 2>/dev/null || true
  spid=""
  kill -TERM "$wpid"
  wait "$wpid" || true
  wpid=""
  secs=$(echo "scale=1; ($(ts "$last") - $(ts "$first")) / 1" | bc)

  it_tsv() {
    $PSQL -At -F $'\t' -c "SELECT tenant_id, day, token_type, operation,
        model, agent_id, tokens, prompt_tokens, completion_tokens,
        thoughts_tokens, cached_tokens, events
      FROM tally.token_usage_daily" | LC_ALL=C sort
  }
  local exact=MISMATCH
  it_tsv >"$dir/daily.tsv"
  LC_ALL=C sort "$top/expect" | cmp -s - "$dir/daily.tsv" && exact=exact

  # Commit durations (ms) of the batches: the worker's debug timings.
  # fence + dedupe and sums + COMMIT.
  sed -n 's/.*batch timings: fence \([0-9.]*\) ms, dedupe and sums \([0-9.]*\) ms.*, commit \([0-9.]*\) ms.*/\1 \2 \3/p' \
    "$dir/worker.log" | awk '{ printf "%.1f\n", $1 + $2 + $3 }' \
    >"$dir/commits"
  # Prunes: "<ts> ... pruned N events ... in M ms".
  awk '/pruned [0-9]+ events/ {
         for (i = 1; i <= NF; i++) {
           if ($i == "pruned") n = $(i + 1)
           if ($i == "in") ms = $(i + 1)
         }
         print $1, n, ms }' "$dir/worker.log" >"$dir/prunes"
  local f_s l_s before=0 during=0 after=0 t n ms
  f_s=$(ts "$first"); l_s=$(ts "$last")
  while read -r t n ms; do
    t=$(ts "$t")
    if [ "$(echo "$t < $f_s" | bc)" = 1 ]; then before=$((before + n))
    elif [ "$(echo "$t <= $l_s" | bc)" = 1 ]; then during=$((during + n))
    else after=$((after + n)); fi
  done <"$dir/prunes"
  local pg_wait
  pg_wait=$(sed -n 's/.*still waiting for .* after \([0-9.]*\) ms.*/\1/p' \
    "$dir/pg/log" | pct 100)
  {
    echo "secs=$secs"
    if [ -n "$rate" ]; then
      echo "behind_txt=, last commit $(echo "scale=1; ($l_s - $(cat "$dir/paced.end")) / 1" | bc) s after the last produce"
    fi
    if [ "$prune" -gt 0 ]; then
      echo "deleted_txt=$before before the first message, **$during while counting**, $after after the last commit ($(wc -l <"$dir/prunes") deletes of <= 50,000: p50 $(cut -d' ' -f3 "$dir/prunes" | pct 50) ms, max $(cut -d' ' -f3 "$dir/prunes" | pct 100) ms; $($PSQL -At -c "SELECT count(*) FROM tally.token_usage_events WHERE idempotency_key LIKE 'expired-%'") left)"
    else
      echo "deleted_txt=none (pruning off)"
    fi
    echo "rate=$(echo "scale=0; $lines / $secs" | bc)"
    echo "exact=$exact"
    echo "batches=$(wc -l <"$dir/commits")"
    echo "c50=$(pct 50 <"$dir/commits")"
    echo "c90=$(pct 90 <"$dir/commits")"
    echo "c99=$(pct 99 <"$dir/commits")"
    echo "cmax=$(pct 100 <"$dir/commits")"
    echo "lock_sampled=$(pct 100 <"$dir/lockwaits")"
    echo "lock_logged=${pg_wait:--}"
    echo "prunes=$(wc -l <"$dir/prunes")"
    echo "prune_ms_max=$(cut -d' ' -f3 "$dir/prunes" | pct 100)"
    echo "prune_ms_p50=$(cut -d' ' -f3 "$dir/prunes" | pct 50)"
    echo "del_before=$before"
    echo "del_during=$during"
    echo "del_after=$after"
    echo "left=$($PSQL -At -c "SELECT count(*) FROM tally.token_usage_events
                  WHERE idempotency_key LIKE 'expired-%'")"
  } >"$top/$name.res"
  stack_stop "$dir"
  dir=""
}

for name in $runs; do
  case $name in
  a) run a 0 ;;
  b) run b "$prune_b" ;;
  c) run c 0 "$rate_c" ;;
  d) run d "$prune_b" "$rate_c" ;;
  *) echo "BENCH_RUNS: no run '$name' (a, b, c, d)" >&2; exit 2 ;;
  esac
done
r() { awk -v k="$2" 'index($0, k "=") == 1 { print substr($0, length(k) + 2) }' "$top/$1.res"; }

cat <<OUT
== result ($(nproc) cores, $(uname -m), $lines events on $partitions partitions, $expired expired rows in the store)
| run | first message -> last commit | batch commit p50 / p90 / p99 / max | longest lock wait | expired rows deleted | sums |
|---|---|---|---|---|---|
OUT
# row NAME LABEL: one line of the table.
row() {
  local n=$1
  echo "| $2 | $(r "$n" secs) s: **$(r "$n" rate) events/s**$(r "$n" behind_txt) | $(r "$n" c50) / $(r "$n" c90) / $(r "$n" c99) / $(r "$n" cmax) ms ($(r "$n" batches) batches) | sampled $(r "$n" lock_sampled) ms, logged (>10 ms) $(r "$n" lock_logged) | $(r "$n" deleted_txt) | $(r "$n" exact) |"
}
for name in $runs; do
  case $name in
  a) row a "(a) backlog, \`--prune-interval 0\`" ;;
  b) row b "(b) backlog, \`--prune-interval $prune_b\`" ;;
  c) row c "(c) $rate_c/s, \`--prune-interval 0\`" ;;
  d) row d "(d) $rate_c/s, \`--prune-interval $prune_b\`" ;;
  esac
done
for name in $runs; do
  [ "$(r "$name" exact)" = exact ] || exit 1
done

