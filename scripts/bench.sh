#!/usr/bin/env bash
# End-to-end benchmark of tally worker on this machine, with tally
# devbroker, Postgres and the worker side by side.
#
#   scripts/bench.sh [EVENTS] [PARTITIONS]   (default 500000, 64)
#
# Produces EVENTS events (3000 tenants with skewed popularity, a handful of
# models and operations, 5% duplicates, 0.1% bad lines (BENCH_BAD_RATE:
# dead-lettered by tally, rejected by the peer), 90% from the last two days and a
# tail over 30 days) as a backlog, then starts one worker and measures:
# events/s from the first message consumed to the last sum committed, the
# worker's peak RSS (VmHWM), and where the time went (the worker's own
# counters, and CPU seconds of the worker, Postgres and the broker).
# Finally it checks the sums against the generator's expectation.
# Messages are keyed by tenant_id, as the services' client
# (scripts/tally_client.py) and `tally produce` send them, so a tenant's
# events share a partition and members of a group hold disjoint tenants.
# The mock broker keeps only 5 MiB per partition and keying makes the
# partitions as skewed as the tenants (the busiest holds 8% of the
# events): 500,000 events fit in 64 partitions, and the script fails if
# the broker dropped anything. BENCH_PARTITIONER=random spreads the
# backlog at random instead (duplicates then cross partitions, which the
# dedupe store handles; the members' sums rows overlap).
# BENCH_TENANTS sets the number of tenants (default 3000; e.g. 200000
# makes nearly every event a daily bucket of its own, so that every
# transaction holds the most sums the worker keeps in memory).
# BENCH_PG_OPTS adds Postgres settings ("-c name=value ...", e.g. "-c
# wal_init_zero=on" for a new cluster's default).
# BENCH_WRAP runs the worker under a wrapper (e.g. "valgrind --tool=massif
# --massif-out-file=/tmp/massif.out" to see what the heap holds at its
# peak; the RSS printed is then the wrapper's).
# BENCH_WORKER_ARGS adds worker flags (e.g. "--consumers 2"); BENCH_PEER=0
# skips the Python peer. BENCH_INVALIDATIONS=N also produces N exact
# cache invalidations (over the same tenants) as a backlog, so that both
# of the worker's pipelines drain one at once: the peak RSS is then both
# pipelines' (the run waits for all N to be consumed too).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=${1:-500000}
partitions=${2:-64}
batch_args=${BENCH_WORKER_ARGS:-}

bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build-bench" -DBUILD_TESTING=OFF
TALLY=$here/build-bench/worker/tally
GEN=$here/build-bench/worker/tally-gen
# shellcheck source=stack.sh
source "$here/scripts/stack.sh"

dir=$(mktemp -d /tmp/tally-bench.XXXXXX)
wpid=""
cleanup() {
  [ -n "$wpid" ] && kill -KILL "$wpid" 2>/dev/null
  stack_stop "$dir"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
# Commit timestamps: the end of a run is its last batch's COMMIT.
export STACK_PG_OPTS="-c track_commit_timestamp=on ${BENCH_PG_OPTS:-}"
stack_start "$dir" "$partitions" >/dev/null
# shellcheck disable=SC1091
source "$dir/env"

# CPU seconds of this stack's Postgres: the postmaster, its live children
# and the children it has reaped (backends that exited); other Postgres
# servers on the machine are not counted.
pg_cpu_s() {
  local pm t
  pm=$(head -1 "$dir/pg/data/postmaster.pid")
  t=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pm/stat")
  t=$((t + $(pgrep -P "$pm" | sed 's|.*|/proc/&/stat|' |
             xargs -r cat 2>/dev/null | awk '{ s += $14 + $15 } END { print s + 0 }')))
  echo "scale=1; $t / $(getconf CLK_TCK)" | bc
}
# CPU time the hypervisor gave to others while we wanted it (the steal
# column of /proc/stat, all CPUs): on a shared virtual machine, a run
# with seconds of it measured a slower machine.
steal_s() {
  awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" { printf "%.1f", $9 / hz }' /proc/stat
}
# When the last batch of SCHEMA's consumer committed (its offsets row's
# commit timestamp), as RFC 3339.
last_commit() {
  $PSQL -At -c "SELECT to_char(max(pg_xact_commit_timestamp(xmin))
                  AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                FROM $1.consumer_offsets"
}
# Rows where SCHEMA's monthly table differs from its daily one rolled up.
monthly_mismatches() {
  local d="$1.token_usage_daily" m="$1.token_usage_monthly"
  $PSQL -At -c "SELECT count(*) FROM (
      (SELECT tenant_id, date_trunc('month', day)::date, token_type,
              operation, model, agent_id, sum(tokens), sum(prompt_tokens),
              sum(completion_tokens), sum(thoughts_tokens),
              sum(cached_tokens), sum(events)
       FROM $d GROUP BY 1, 2, 3, 4, 5, 6
       EXCEPT ALL SELECT tenant_id, month, token_type, operation, model,
              agent_id, tokens, prompt_tokens, completion_tokens,
              thoughts_tokens, cached_tokens, events FROM $m)
      UNION ALL
      (SELECT tenant_id, month, token_type, operation, model, agent_id,
              tokens, prompt_tokens, completion_tokens, thoughts_tokens,
              cached_tokens, events FROM $m
       EXCEPT ALL SELECT tenant_id, date_trunc('month', day)::date,
              token_type, operation, model, agent_id, sum(tokens),
              sum(prompt_tokens), sum(completion_tokens),
              sum(thoughts_tokens), sum(cached_tokens), sum(events)
       FROM $d GROUP BY 1, 2, 3, 4, 5, 6)) d"
}

# ---- peer: the Python consumer tally is measured against (issue 9) -------
# bench_peer runs scripts/peer_consumer.py (confluent-kafka, psycopg2,
# batches with keys, sums and offsets in one transaction; see its
# docstring) on the same backlog, from offset 0 in its own group and
# schema (peer.*), after tally's run; measured the same way (first message
# consumed to its last batch's COMMIT, as for tally), its sums checked against the same
# expectation (and its monthly table against its daily one). Prints its
# lines after the result block and fails the bench if its sums differ.
# BENCH_PEER=0 skips it.
bench_peer() {
  [ "${BENCH_PEER:-1}" != "0" ] || return 0
  local pg0 pg1 rc=0 res pfirst plast psecs pexact
  pg0=$(pg_cpu_s)
  # A stall is cut off: at least 200 messages/s plus 2 minutes.
  timeout --signal=TERM $((120 + lines / 200)) \
    /usr/bin/python3 "$here/scripts/peer_consumer.py" --until-end \
      --group tally-peer --schema peer >"$dir/peer.out" 2>"$dir/peer.log" &
  wpid=$!
  wait "$wpid" || rc=$?
  wpid=""
  pg1=$(pg_cpu_s)
  res=$(grep '^peer-result ' "$dir/peer.out" || true)
  if [ "$rc" -ne 0 ] || [ -z "$res" ]; then
    tail "$dir/peer.log"
    echo "   peer (python)       FAILED (exit $rc, log $dir/peer.log)"
    return 1
  fi
  bench_peer_field() { tr ' ' '\n' <<<"$res" | awk -F= -v k="$1" '$1 == k { print $2 }'; }
  pfirst=$(grep -m1 "first message" "$dir/peer.log" | cut -d' ' -f1)
  plast=$(last_commit peer)
  psecs=$(echo "$(date -d "$plast" +%s.%N) - $(date -d "$pfirst" +%s.%N)" | bc)
  $PSQL -At -F $'\t' -c "SELECT tenant_id, day, token_type, operation, model,
      agent_id, tokens, prompt_tokens, completion_tokens, thoughts_tokens,
      cached_tokens, events FROM peer.token_usage_daily" |
    LC_ALL=C sort >"$dir/peer-daily.tsv"
  pexact="sums exact"
  LC_ALL=C sort "$dir/expect" | cmp -s - "$dir/peer-daily.tsv" ||
    pexact="sums MISMATCH (daily)"
  [ "$(monthly_mismatches peer)" = 0 ] ||
    pexact="sums MISMATCH (monthly)"
  cat <<PEER
   peer (python)       $(echo "scale=0; $lines / $psecs" | bc) messages/s, peak RSS $(($(bench_peer_field vmhwm_kb) / 1024)) MiB, $pexact
   peer run            $(bench_peer_field messages) messages ($(bench_peer_field counted) counted, $(bench_peer_field dup_batch) + $(bench_peer_field dup_store) duplicates, $(bench_peer_field rejected) rejected), $(bench_peer_field batches) batches, first msg -> last commit ${psecs} s
   peer CPU seconds    peer $(bench_peer_field cpu_s), postgres $(echo "$pg1 - $pg0" | bc)
   ratio               $(printf '%.1f' "$(echo "scale=3; $psecs / $secs" | bc)")× the peer
PEER
  [ "$pexact" = "sums exact" ]
}
# ---- end of peer -----------------------------------------------------------

echo "== generating $events events"
"$GEN" --count "$events" --tenants "${BENCH_TENANTS:-3000}" --seed 11 --dup-rate 0.05 \
  --bad-rate "${BENCH_BAD_RATE:-0.001}" \
  --expect "$dir/expect" >"$dir/events.jsonl"
lines=$(awk '$1 == "lines" { print $2 }' "$dir/expect.summary")
buckets=$(awk '$1 == "buckets" { print $2 }' "$dir/expect.summary")
echo "   $lines lines, $(du -m "$dir/events.jsonl" | cut -f1) MiB," \
     "$buckets daily buckets"

echo "== producing the backlog to $partitions partitions"
t0=$(date +%s.%N)
produce_args=()
[ -n "${BENCH_PARTITIONER:-}" ] &&
  produce_args=(-X "partitioner=$BENCH_PARTITIONER")
"$TALLY" produce --file "$dir/events.jsonl" "${produce_args[@]}" \
  2>"$dir/produce.log"
t1=$(date +%s.%N)
/usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" token-usage
echo "   $(echo "scale=0; $lines / ($t1 - $t0)" | bc) lines/s"

invalidations=${BENCH_INVALIDATIONS:-0}
if [ "$invalidations" -gt 0 ]; then
  echo "== producing $invalidations cache invalidations as a backlog too"
  awk -v n="$invalidations" 'BEGIN { for (i = 0; i < n; i++)
      printf "{\"tenant_id\":\"tenant-%d\",\"data_type\":\"agent\",\"resource_id\":\"a%d\"}\n",
        i % 3000, i }' >"$dir/invalidations.jsonl"
  "$TALLY" produce --topic cache-invalidation \
    --file "$dir/invalidations.jsonl" 2>>"$dir/produce.log"
  /usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" \
    cache-invalidation
fi

port=$(stack_free_port)
broker_pid=$(cat "$dir/broker/pid")
pg_cpu0=$(pg_cpu_s)
broker_cpu0=$(stack_cpu_s "$broker_pid")
steal0=$(steal_s)
echo "== consuming with one worker $batch_args"
# shellcheck disable=SC2086
${BENCH_WRAP:-} "$TALLY" worker --metrics-addr "127.0.0.1:$port" $batch_args \
  >"$dir/worker.log" 2>&1 &
wpid=$!
w_start=$(date +%s.%N)
rss_peak=0
inv_secs=""
while :; do
  got=$($PSQL -At -c "SELECT coalesce(sum(next_offset), 0)
                      FROM tally.consumer_offsets" 2>/dev/null || echo 0)
  # When the invalidation backlog was drained (to the poll's 0.5 s).
  if [ "$invalidations" -gt 0 ] && [ -z "$inv_secs" ]; then
    inv=$(curl -s "127.0.0.1:$port/metrics" |
      awk '$1 == "tally_invalidation_messages_total" { print $2 }')
    [ "${inv:-0}" -ge "$invalidations" ] &&
      inv_secs=$(printf "%.1f" "$(echo "$(date +%s.%N) - $w_start" | bc)")
  fi
  if [ "$got" = "$lines" ]; then
    [ "$invalidations" -eq 0 ] || [ -n "$inv_secs" ] && break
  fi
  kill -0 "$wpid" 2>/dev/null || { tail "$dir/worker.log"; exit 1; }
  sleep 0.5
done
rss_peak=$(awk '/VmHWM/ { print $2 }' "/proc/$wpid/status")
# The last COMMIT is in Postgres; the worker counts it in its metrics
# right after it learns of it.
sleep 1
curl -s "127.0.0.1:$port/metrics" >"$dir/metrics"
worker_cpu=$(stack_cpu_s "$wpid")
pg_cpu=$(echo "$(pg_cpu_s) - $pg_cpu0" | bc)
broker_cpu=$(echo "$(stack_cpu_s "$broker_pid") - $broker_cpu0" | bc)
steal=$(echo "$(steal_s) - $steal0" | bc)
kill -TERM "$wpid"
wait "$wpid" || true
wpid=""

first=$(grep -m1 "first message" "$dir/worker.log" | cut -d' ' -f1)
last=$(last_commit tally)
secs=$(echo "$(date -d "$last" +%s.%N) - $(date -d "$first" +%s.%N)" | bc)
metric() { awk -v m="$1" '$1 == m { print $2 }' "$dir/metrics"; }
counted=$(metric tally_usage_events_counted_total)

echo "== checking the sums against what was produced"
$PSQL -At -F $'\t' -c "SELECT tenant_id, day, token_type, operation, model,
    agent_id, tokens, prompt_tokens, completion_tokens, thoughts_tokens,
    cached_tokens, events FROM tally.token_usage_daily" |
  LC_ALL=C sort >"$dir/daily.tsv"
if ! LC_ALL=C sort "$dir/expect" | cmp -s - "$dir/daily.tsv"; then
  exact="MISMATCH (daily)"
elif [ "$(monthly_mismatches tally)" != 0 ]; then
  exact="MISMATCH (monthly)"
else
  exact="exact"
fi

# A group that rebalanced after its first assignment (a member without
# partitions for a while: the mock's coordinator makes a rebalance wait
# for session.timeout.ms, 45 s) measured that wait, not the pipeline.
members=$(grep -c 'consuming token-usage as group' "$dir/worker.log" || true)
assigns=$(grep -c 'rebalance (token-usage): assigned' "$dir/worker.log" || true)
if [ "$assigns" != "$members" ]; then
  echo "!! the group rebalanced during the run ($assigns assignments for" \
       "$members members): this figure includes the wait (BENCH_KEEP=1 keeps" \
       "the worker's log)" >&2
fi

cat <<OUT
== result ($(nproc) cores, $(uname -m), librdkafka $(dpkg-query -W -f='${Version}' librdkafka-dev))
   messages            $lines ($counted counted, $(metric 'tally_usage_duplicates_total{where="batch"}') + $(metric 'tally_usage_duplicates_total{where="store"}') duplicates, $(awk '$1 ~ /^tally_usage_dead_letters_total/ { s += $2 } END { print s + 0 }' "$dir/metrics") dead letters)
   first msg -> last commit  ${secs} s
   throughput          $(echo "scale=0; $lines / $secs" | bc) messages/s end to end
   worker peak RSS     $((rss_peak / 1024)) MiB$([ "$invalidations" -gt 0 ] && echo " (with $invalidations cache invalidations drained at the same time: $(metric tally_invalidation_messages_total) consumed, all within ${inv_secs} s of the worker's start)")
   batches             $(metric tally_usage_batches_total) in $(metric tally_usage_transactions_total) transactions
   rebalances          $(metric tally_usage_rebalances_total) (one assignment a member is the start; more means the group rebalanced during the run)
   worker time: parse $(echo "scale=1; $(metric tally_usage_parse_seconds_total) / 1" | bc) s, waiting in poll $(echo "scale=1; $(metric tally_usage_poll_seconds_total) / 1" | bc) s, waiting for commits $(echo "scale=1; $(metric tally_usage_commit_wait_seconds_total) / 1" | bc) s
   postgres commits    $(echo "scale=1; $(metric tally_usage_commit_seconds_total) / 1" | bc) s in the committer thread
   CPU seconds         worker $worker_cpu, postgres $pg_cpu, broker $broker_cpu (steal $steal s)
   sums                $exact (daily against the generator, monthly against the daily)
OUT
bench_peer
[ "$exact" = "exact" ]
