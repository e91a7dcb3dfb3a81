#!/usr/bin/env bash
# Peak RSS of one worker draining a backlog of messages near
# --max-message-bytes: N messages of ~900 KB on 64 partitions (as much as
# tally devbroker keeps), each with an oversized metadata (dead-lettered
# without being counted), in two shapes: SHAPE=members (54,000 small JSON
# members, compresses like real JSON) or SHAPE=run (one 900 KB string of
# one character, lz4 ~200:1). Prints the worker's VmHWM and the time.
#   scripts/bench_large.sh [N] [SHAPE] [worker args...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-280}
SHAPE=${2:-members}
shift 2 || shift $#
bash "$here/scripts/deps.sh"
bash "$here/scripts/build.sh" "$here/build"
TALLY=$here/build/worker/tally
source "$here/scripts/stack.sh"
D=$(mktemp -d /tmp/tally-large.XXXXXX)
trap 'stack_stop "$D"; rm -rf "$D"' EXIT
stack_start "$D" 64 >/dev/null
source "$D/env"
"$TALLY" migrate >/dev/null 2>&1
/usr/bin/python3 - "$N" "$SHAPE" >"$D/large.jsonl" <<'PY'
import json, sys
n, shape = int(sys.argv[1]), sys.argv[2]
meta = ({"blob": "x" * 900000} if shape == "run"
        else {"k%d" % j: j for j in range(54000)})
for i in range(n):
    print(json.dumps({"tenant_id": "t%d" % i, "idempotency_key": "k%d" % i,
                      "tokens": 1, "token_type": "llm", "operation": "chat",
                      "metadata": meta}))
PY
"$TALLY" produce --file "$D/large.jsonl" -X message.max.bytes=2000000 \
  >/dev/null 2>&1
/usr/bin/python3 "$here/scripts/low_watermarks.py" "$TALLY_BROKERS" \
  token-usage || { echo "the backlog outgrew tally devbroker" >&2; exit 1; }
t0=$(date +%s.%N)
"$TALLY" worker --metrics-addr "" "$@" >"$D/w.log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  got=$($PSQL -At -c "SELECT coalesce(sum(next_offset), 0)
                      FROM tally.consumer_offsets")
  [ "$got" -ge "$N" ] && break
  sleep 0.2
done
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
kill -TERM "$pid"
wait "$pid" || true
echo "$N messages ($SHAPE) of $(head -1 "$D/large.jsonl" | wc -c) bytes:" \
  "$(echo "$t1 - $t0" | bc) s; peak RSS $((hwm / 1024)) MiB;" \
  "$(grep -c 'rejected (metadata_too_large)' "$D/w.log") dead-lettered"
