#!/usr/bin/env bash
# Benchmark of the cache-invalidation pipeline: tally devbroker, Redis and
# one worker side by side (Postgres runs, but only the invalidation half
# of the worker is on).
#
#   scripts/bench_invalidation.sh [KEYS] [EVENTS] [WILDCARDS] [PARTITIONS]
#                                 (default 1000000 200000 100 16)
#
# Exact part: KEYS keys in the contract's layout over KEYS/1000 tenants
# (per tenant 200 agent, 300 document, 300 conversation_message and 200
# query_result keys), EVENTS exact invalidations of existing agent keys
# produced as a backlog (keyed by tenant, interleaved), then one worker:
# keys/s from its first message to the last offset committed to the
# group; every targeted key gone, every other key there, one notice per
# event (a subscriber on the channel; each event_id once, deleted 1).
#
# Wildcard part: KEYS keys again, WILDCARDS wildcard invalidations as a
# backlog (half a tenant's documents, half a tenant's messages of one
# agent), then the worker: SCAN calls (INFO commandstats, after CONFIG
# RESETSTAT) against one full pass at the worker's --scan-count measured
# just before on the same key space, the keys removed, the notices, and
# the latency of a concurrent GET loop (tally-redis-probe: one GET every
# 500 us, as another client sees it) from the first message to the last
# commit, next to the same loop on the idle server just before (what the
# machine's own load gives) and Redis's slow log (how long Redis itself
# was busy with one command).
#
# Both parts also print CPU per event of the worker, Redis and the broker,
# per worker thread CPU and time spent waiting for a core (schedstat),
# Redis's own time per command, and the load average before and after:
# on a shared machine, run it more than once. The invalidation consumer's
# prefetch queue (2 MiB by default) caps the exact part at about 30,000
# keys/s; BENCH_WORKER_ARGS="-X queued.max.messages.kbytes=16384" lifts it.
#
# BENCH_WORKER_ARGS adds worker flags (e.g. --scan-count 500);
# BENCH_ONLY=exact or BENCH_ONLY=wildcard runs that part only;
# BENCH_PERF=1 records the worker with perf (DWARF call graphs) during
# the exact part and prints the share of each library and function;
# BENCH_KEEP=1 keeps the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
keys=${1:-1000000}
events=${2:-200000}
wildcards=${3:-100}
partitions=${4:-16}
worker_args=${BENCH_WORKER_ARGS:-}
tenants=$((keys / 1000))
[ "$tenants" -ge 1 ] || { echo "KEYS: at least 1000" >&2; exit 2; }
[ "$events" -le $((tenants * 200)) ] ||
  { echo "EVENTS: at most KEYS/5 (the agent keys)" >&2; exit 2; }
[ "$wildcards" -le "$tenants" ] ||
  { echo "WILDCARDS: at most KEYS/1000 (one tenant each)" >&2; exit 2; }

bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build-bench" -DBUILD_TESTING=OFF
TALLY=$here/build-bench/worker/tally
PROBE=$here/build-bench/worker/tally-redis-probe
# shellcheck source=stack.sh
source "$here/scripts/stack.sh"

dir=$(mktemp -d /tmp/tally-benchinv.XXXXXX)
wpid="" subpid="" probepid=""
cleanup() {
  local p
  for p in $probepid $subpid $wpid; do
    kill -KILL "$p" 2>/dev/null || true
  done
  stack_stop "$dir"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
stack_start "$dir" "$partitions" >/dev/null
# shellcheck disable=SC1091
source "$dir/env"
rport=$(cat "$dir/redis/port")
R() { redis-cli -p "$rport" "$@"; }
group=bench-inv
channel=cache:invalidations
scan_count=$(awk '{ for (i = 1; i < NF; i++) if ($i == "--scan-count")
                      print $(i + 1) }' <<<"$worker_args")
scan_count=${scan_count:-$("$TALLY" worker --help |
  awk '$1 == "--scan-count" { f = 1 }
       f && $1 == "default:" && !done { sub(/;$/, "", $2); print $2; done = 1 }')}
scan_count=${scan_count:-1000}

# usec_per FILE CMD: Redis's own microseconds per call of CMD (INFO
# commandstats saved in FILE)
usec_per() { awk -F'[:=,]' -v c="cmdstat_$2" '$1 == c { print $7 }' "$1"; }

# Per thread name of pid: "name cpu=S wait=S", CPU seconds and seconds
# spent runnable but waiting for a core (schedstat): what the machine's
# other load took from it.
thread_cpu() {
  local t
  for t in /proc/"$1"/task/*; do
    [ -r "$t/stat" ] || continue
    awk -v hz="$(getconf CLK_TCK)" -v ss="$(cat "$t/schedstat")" '{
      s = $0; sub(/^[0-9]+ \(/, "", s); name = s; sub(/\) .*/, "", name)
      sub(/^.*\) /, "", s); split(s, f, " "); split(ss, w, " ")
      print name, (f[12] + f[13]) / hz, w[2] / 1e9 }' "$t/stat"
  done | awk '{ c[$1] += $2; w[$1] += $3 }
    END { for (n in c) printf "%s cpu=%.2f wait=%.2f\n", n, c[n], w[n] }' |
    sort
}

# The key space: KEYS SETs through redis-cli --pipe (RESP).
load_keys() {
  R FLUSHALL >/dev/null
  awk -v tenants="$tenants" 'BEGIN {
    for (t = 0; t < tenants; t++) {
      p = "cache:{t" t "}:"
      for (i = 0; i < 200; i++) k[n++] = p "agent:a" i
      for (i = 0; i < 300; i++) k[n++] = p "document:d" i
      for (i = 0; i < 300; i++)
        k[n++] = p "conversation_message:agent=a" (i % 20) ":conv=c" (i % 50) \
                 ":m" i
      for (i = 0; i < 200; i++) k[n++] = p "query_result:q" i
      for (j = 0; j < n; j++)
        printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n", length(k[j]), k[j]
      n = 0
    }
  }' | R --pipe >"$dir/load.log"
  local got
  got=$(R DBSIZE)
  [ "$got" = "$keys" ] || { echo "loaded $got keys, not $keys" >&2; exit 1; }
  sleep 1 # let the rehash that followed the last growth finish
}

# Runs the worker until the group has committed `want` offsets in all;
# prints "first applied committed" (epoch seconds): first message seen in
# /metrics, the last invalidation applied, the last offset committed.
# Signals the GET probe (if any): SIGUSR1 at the first message, SIGTERM
# once committed.
run_worker() {
  local want=$1 applied_want=$2 log=$dir/worker.$3.log mport
  mport=$(stack_free_port)
  # shellcheck disable=SC2086
  "$TALLY" worker --usage-topic "" --invalidation-group "$group" \
    --metrics-addr "127.0.0.1:$mport" --log-level debug $worker_args \
    >"$log" 2>&1 &
  wpid=$!
  /usr/bin/python3 - "$TALLY_BROKERS" "$group" "$mport" "$want" \
    "$applied_want" "$partitions" "${probepid:-0}" "$wpid" "${perf:-}" \
    >"$dir/times" 2>"$dir/perf.log" <<'EOF'
import os, re, signal, subprocess, sys, time, urllib.request
from confluent_kafka import Consumer, TopicPartition
brokers, group, mport = sys.argv[1], sys.argv[2], sys.argv[3]
want, applied_want, parts = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
probe, worker, perf = int(sys.argv[7]), int(sys.argv[8]), sys.argv[9]
c = Consumer({"bootstrap.servers": brokers, "group.id": group,
              "enable.auto.commit": False})
tps = [TopicPartition("cache-invalidation", p) for p in range(parts)]
url = "http://127.0.0.1:%s/metrics" % mport
first = applied = None
deadline = time.time() + 600
while time.time() < deadline:
    os.kill(worker, 0)  # still running
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        time.sleep(0.01)
        continue
    msgs = sum(float(v) for v in re.findall(
        r"^tally_invalidation_messages_total (\S+)", text, re.M))
    done = sum(float(v) for v in re.findall(
        r"^tally_invalidations_applied_total\{[^}]*\} (\S+)", text, re.M))
    if first is None and msgs > 0:
        first = time.time()
        if probe:
            os.kill(probe, signal.SIGUSR1)
        if perf:  # every thread of the worker, from the first message on
            perf = subprocess.Popen(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384",
                                     "-o", perf, "-p", str(worker)],
                                    stdout=sys.stderr)
    if applied is None and done >= applied_want:
        applied = time.time()
    if applied is not None:
        got = sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
        if got >= want:
            committed = time.time()
            if probe:
                os.kill(probe, signal.SIGTERM)
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait()
            print("%.3f %.3f %.3f" % (first, applied, committed))
            c.close()
            sys.exit(0)
    else:
        time.sleep(0.02)
sys.exit("timed out")
EOF
}

stop_worker() {
  kill -TERM "$wpid"
  wait "$wpid" || { echo "worker failed"; tail "$dir"/worker.*.log; exit 1; }
  wpid=""
}

# Subscribes to the notice channel (one "message" per notice).
subscribe() {
  redis-cli -p "$rport" --raw SUBSCRIBE "$channel" >"$dir/$1" &
  subpid=$!
  for _ in $(seq 1 50); do
    [ "$(R PUBSUB NUMSUB "$channel" | tail -1)" = 1 ] && return 0
    sleep 0.1
  done
  echo "subscriber did not start" >&2
  exit 1
}
unsubscribe() {
  R PUBLISH "$channel" end-of-bench >/dev/null
  for _ in $(seq 1 100); do
    grep -q '^end-of-bench$' "$dir/$1" && break
    sleep 0.1
  done
  kill "$subpid" 2>/dev/null || true
  wait "$subpid" 2>/dev/null || true
  subpid=""
}

redis_pid=$(cat "$dir/redis/pid")
broker_pid=$(cat "$dir/broker/pid")
exact_done=0 # offsets the exact part committed
if [ "${BENCH_ONLY:-}" != wildcard ]; then
# =====================================================================
echo "== exact: $keys keys over $tenants tenants, $events invalidations"
load_keys
awk -v tenants="$tenants" -v events="$events" 'BEGIN {
  for (i = 0; i < 200 && n < events; i++)
    for (t = 0; t < tenants && n < events; t++) {
      printf "{\"tenant_id\":\"t%d\",\"data_type\":\"agent\",", t
      printf "\"resource_id\":\"a%d\",\"event_id\":\"x%d\"}\n", i, n++
    }
}' >"$dir/exact.jsonl"
"$TALLY" produce --topic cache-invalidation --file "$dir/exact.jsonl" \
  2>"$dir/produce.log"
/usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" \
  cache-invalidation

subscribe notices.exact
load0=$(cut -d' ' -f1-3 /proc/loadavg)
redis_cpu0=$(stack_cpu_s "$redis_pid")
broker_cpu0=$(stack_cpu_s "$broker_pid")
perf=${BENCH_PERF:+$dir/perf.data}
R CONFIG RESETSTAT >/dev/null
run_worker "$events" "$events" exact
exact_done=$events
perf=""
read -r first applied committed <"$dir/times"
worker_cpu=$(stack_cpu_s "$wpid")
threads=$(thread_cpu "$wpid")
rss_peak=$(awk '/VmHWM/ { print $2 }' "/proc/$wpid/status")
redis_cpu=$(echo "$(stack_cpu_s "$redis_pid") - $redis_cpu0" | bc)
broker_cpu=$(echo "$(stack_cpu_s "$broker_pid") - $broker_cpu0" | bc)
load1=$(cut -d' ' -f1-3 /proc/loadavg)
R INFO commandstats | tr -d '\r' >"$dir/commandstats.exact"
stop_worker
batches=$(grep -c 'invalidations applied' "$dir/worker.exact.log" || true)
apply_ms=$(awk '/invalidations applied in/ { s += $(NF - 10) } END { print s + 0 }' \
  "$dir/worker.exact.log")
unsubscribe notices.exact

secs=$(echo "$committed - $first" | bc)
left_agent=$("$PROBE" keys 127.0.0.1 "$rport" 'cache:{t*}:agent:*' 1000 | wc -l)
left_total=$(R DBSIZE)
grep -o '"event_id":"x[0-9]*"' "$dir/notices.exact" | sort -u >"$dir/ids"
notices=$(grep -c '^{' "$dir/notices.exact" || true)
ids=$(wc -l <"$dir/ids")
deleted1=$(grep -c '"deleted":1,' "$dir/notices.exact" || true)
exact_ok=yes
[ "$left_agent" = $((tenants * 200 - events)) ] || exact_ok=no
[ "$left_total" = $((keys - events)) ] || exact_ok=no
[ "$notices" = "$events" ] && [ "$ids" = "$events" ] &&
  [ "$deleted1" = "$events" ] || exact_ok=no
per_ev() { echo "scale=2; $1 * 1000000 / $events" | bc; }

cat <<OUT
== result, exact part ($(nproc) cores, $(uname -m), redis $(redis-server --version |
  grep -o 'v=[0-9.]*' | cut -c3-), librdkafka $(dpkg-query -W \
  -f='${Version}' librdkafka-dev))
   worker flags        ${worker_args:-(defaults)}, --scan-count $scan_count
   keys, events        $keys keys, $events invalidations of one existing key each
   load average        $load0 before, $load1 after
   first msg -> last commit  $secs s (last applied $(echo "$applied - $first" | bc) s)
   throughput          $(echo "scale=0; $events / $secs" | bc) keys/s end to end
   Redis rounds        $batches (cache_apply calls), $(echo "scale=2; $apply_ms / 1000" | bc) s in them
   keys left           $left_agent targeted (want $((tenants * 200 - events))), $left_total in all (want $((keys - events)))
   notices             $notices received, $ids distinct event_ids, $deleted1 with deleted 1 (want $events each)
   worker peak RSS     $((rss_peak / 1024)) MiB
   CPU seconds         worker $worker_cpu, redis $redis_cpu, broker $broker_cpu
   CPU us per event    worker $(per_ev "$worker_cpu"), redis $(per_ev "$redis_cpu"), broker $(per_ev "$broker_cpu")
   redis per call      UNLINK $(usec_per "$dir/commandstats.exact" unlink) us, PUBLISH $(usec_per "$dir/commandstats.exact" publish) us (inside Redis, without reading and replying)
   worker threads (CPU s): $(echo "$threads" | tr '\n' ' ')
   exact check         $exact_ok
OUT
if [ -n "${BENCH_PERF:-}" ] && [ -s "$dir/perf.data" ]; then
  echo "== perf (exact part, worker, by library)"
  perf report -i "$dir/perf.data" --no-children -g none --sort dso --stdio 2>/dev/null |
    grep -v '^#' | grep -v "^$" | head -15 || true
  perf report -i "$dir/perf.data" --no-children -g none --sort dso,sym --stdio 2>/dev/null |
    grep -v "^#" | grep -v "^$" | grep "%" | head -40 >"$dir/perf.sym" || true
  cat "$dir/perf.sym"
fi
[ "$exact_ok" = yes ] || exit 1
[ "${BENCH_ONLY:-}" = exact ] && exit 0
fi

# =====================================================================
echo "== wildcard: $keys keys, $wildcards wildcard invalidations"
load_keys
awk -v tenants="$tenants" -v n="$wildcards" 'BEGIN {
  step = int(tenants / n)
  for (i = 0; i < n; i++) {
    t = i * step
    if (i % 2 == 0)
      printf "{\"tenant_id\":\"t%d\",\"data_type\":\"document\",\"resource_id\":\"*\",\"event_id\":\"w%d\"}\n", t, i
    else
      printf "{\"tenant_id\":\"t%d\",\"data_type\":\"conversation_message\",\"agent_id\":\"a%d\",\"resource_id\":\"*\",\"event_id\":\"w%d\"}\n", t, i % 20, i
  }
}' >"$dir/wild.jsonl"
# what they remove: 300 documents, or the 15 messages of one agent
wild_want=$(( (wildcards + 1) / 2 * 300 + wildcards / 2 * 15 ))
"$TALLY" produce --topic cache-invalidation --file "$dir/wild.jsonl" \
  2>>"$dir/produce.log"
one_pass=$("$PROBE" scanpass 127.0.0.1 "$rport" 'cache:{t*' "$scan_count")
subscribe notices.wild
R CONFIG SET slowlog-log-slower-than 1000 >/dev/null
R CONFIG SET slowlog-max-len 100000 >/dev/null
R SLOWLOG RESET >/dev/null
R CONFIG RESETSTAT >/dev/null
"$PROBE" latency 127.0.0.1 "$rport" 'cache:{t1}:query_result:q' 200 500 \
  >"$dir/probe.out" &
probepid=$!
"$PROBE" latency 127.0.0.1 "$rport" 'cache:{t1}:query_result:q' 200 500 \
  >"$dir/probe.idle" &
idlepid=$!
sleep 2
kill -TERM "$idlepid"
wait "$idlepid"
wload0=$(cut -d' ' -f1-3 /proc/loadavg)
redis_cpu0=$(stack_cpu_s "$redis_pid")
thread_cpu "$redis_pid" >"$dir/redis.threads0"
run_worker $((exact_done + wildcards)) "$wildcards" wild
thread_cpu "$redis_pid" >"$dir/redis.threads1"
wait "$probepid"
probepid=""
read -r wfirst wapplied wcommitted <"$dir/times"
wredis_cpu=$(echo "$(stack_cpu_s "$redis_pid") - $redis_cpu0" | bc)
R INFO commandstats | tr -d '\r' >"$dir/commandstats.wild"
scans=$(awk -F'[:=,]' '$1 == "cmdstat_scan" { print $3 }' "$dir/commandstats.wild")
slow=$("$PROBE" slowlog 127.0.0.1 "$rport")
wload1=$(cut -d' ' -f1-3 /proc/loadavg)
stop_worker
unsubscribe notices.wild
"$PROBE" keys 127.0.0.1 "$rport" '*' 1000 >"$dir/keys.after"
awk 'NR == FNR { if (match($0, /"tenant_id":"[^"]*"/)) {
                   t = substr($0, RSTART + 13, RLENGTH - 14)
                   if ($0 ~ /"data_type":"document"/)
                     p["cache:{" t "}:document:"] = 1
                   else if (match($0, /"agent_id":"[^"]*"/))
                     p["cache:{" t "}:conversation_message:agent=" \
                       substr($0, RSTART + 12, RLENGTH - 13) ":"] = 1 }
                 next }
     { for (q in p) if (index($0, q) == 1) { left++; break } }
     END { print left + 0 }' "$dir/wild.jsonl" "$dir/keys.after" \
  >"$dir/wild.left"
wild_left=$(cat "$dir/wild.left")
wleft_total=$(wc -l <"$dir/keys.after")
wnotices=$(grep -c '^{' "$dir/notices.wild" || true)
wdeleted=$(grep -o '"deleted":[0-9]*' "$dir/notices.wild" |
  awk -F: '{ s += $2 } END { print s + 0 }')
wild_ok=yes
[ "$wild_left" = 0 ] && [ "$wleft_total" = $((keys - wild_want)) ] &&
  [ "$wnotices" = "$wildcards" ] && [ "$wdeleted" = "$wild_want" ] ||
  wild_ok=no

cat <<OUT
== result, wildcard part
   keys, events        $keys keys, $wildcards wildcard invalidations (common prefix cache:{t)
   load average        $wload0 before, $wload1 after
   first msg -> last commit  $(echo "$wcommitted - $wfirst" | bc) s (last applied $(echo "$wapplied - $wfirst" | bc) s)
   SCAN calls          $scans; one pass at COUNT $scan_count: $one_pass (ratio $(echo "scale=2; $scans / $one_pass" | bc))
   keys removed        $((keys - wleft_total)) (want $wild_want), $wild_left left under the prefixes
   notices             $wnotices (want $wildcards), deleted summing to $wdeleted
   redis CPU           $wredis_cpu s (GET probe included)
   redis per call      SCAN $(usec_per "$dir/commandstats.wild" scan) us, UNLINK $(usec_per "$dir/commandstats.wild" unlink) us, PUBLISH $(usec_per "$dir/commandstats.wild" publish) us on average
   redis slow log      $slow
   GET probe, idle     $(cat "$dir/probe.idle")
   GET probe, during   $(cat "$dir/probe.out")
   wildcard check      $wild_ok
OUT
[ "$wild_ok" = yes ]
