#!/usr/bin/env bash
# Messages near --max-message-bytes and over it, in a backlog, with
# ordinary events among them: the worker's peak RSS stays within the
# README's 64 MiB bound although every large value compresses about
# 200:1 (librdkafka decompresses whole fetch responses: tally keeps them
# small); messages over the limit are dead-lettered by their size
# (too_large, truncated) and the ordinary events count exactly.
#
# usage: test_fault_large.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 16
LARGE=80
OVER=4
SMALL=400

step "a backlog: $LARGE messages of ~900 KB, $OVER over 1 MiB, $SMALL small"
"$IT_PYTHON" - "$LARGE" "$OVER" "$SMALL" >"$IT_DIR/large.jsonl" <<'EOF'
import json, sys
large, over, small = map(int, sys.argv[1:])
def ev(i, **kw):
    e = {"tenant_id": "t%d" % i, "idempotency_key": "k%d" % i, "tokens": i,
         "token_type": "llm", "operation": "chat", "model": "m"}
    e.update(kw)
    return json.dumps(e)
n = 0
for i in range(small):
    print(ev(i))
    if i % 5 == 0 and n < large:
        print(ev(100000 + n, metadata={"blob": "x" * 900000}))
        n += 1
    if i % 100 == 0 and i // 100 < over:
        print(ev(200000 + i, metadata={"blob": "y" * 1200000}))
EOF
total=$(wc -l <"$IT_DIR/large.jsonl")
want_tokens=$((SMALL * (SMALL - 1) / 2))
"$TALLY" produce --file "$IT_DIR/large.jsonl" -X message.max.bytes=2000000 \
  >>"$IT_DIR/produce.log" 2>&1 || fail "produce failed"
it_assert_retained token-usage

step "one worker drains it; its peak RSS"
it_worker_start w1
pid=$(it_worker_pid w1)
it_wait_consumed "$total" 180
hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
echo "    peak RSS $((hwm / 1024)) MiB for $total messages"
[ "$hwm" -le $((64 * 1024)) ] ||
  fail "peak RSS $((hwm / 1024)) MiB is over the 64 MiB bound"
got=$(it_sql "SELECT coalesce(sum(tokens), 0) || ' ' || coalesce(sum(events), 0)
              FROM tally.token_usage_daily")
[ "$got" = "$want_tokens $SMALL" ] ||
  fail "counted $got, expected $want_tokens $SMALL"
big=$(grep -c "rejected (metadata_too_large)" "$IT_DIR/w1.log" || true)
[ "$big" -eq "$LARGE" ] || fail "$big metadata_too_large, expected $LARGE"
over=$(grep -c "rejected (too_large)" "$IT_DIR/w1.log" || true)
[ "$over" -eq "$OVER" ] || fail "$over too_large, expected $OVER"
it_worker_stop w1
echo "PASS: peak RSS $((hwm / 1024)) MiB (bound 64) for $LARGE messages of" \
  "~900 KB and $OVER over 1 MiB; $SMALL small events counted exactly"
