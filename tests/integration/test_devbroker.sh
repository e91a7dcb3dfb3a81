#!/usr/bin/env bash
# tally devbroker and tally produce end to end: topics, kcat and
# confluent-kafka round trips, --validate, signals, exit codes.
#
# usage: test_devbroker.sh /path/to/tally     (kcat from PATH; the
# confluent-kafka part needs python3-confluent-kafka: scripts/deps.sh)
set -euo pipefail

TALLY=${1:?usage: test_devbroker.sh /path/to/tally}
PYTHON=/usr/bin/python3
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tally-devbroker.XXXXXX")
DB_PID=

cleanup() {
    if [ -n "$DB_PID" ] && kill -0 "$DB_PID" 2>/dev/null; then
        kill -KILL "$DB_PID" 2>/dev/null || true
        wait "$DB_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    if [ -s "$TMP/devbroker.err" ]; then
        echo "--- devbroker stderr:" >&2
        tail -20 "$TMP/devbroker.err" >&2
    fi
    exit 1
}

step() { echo "--- $*"; }

command -v kcat >/dev/null || { echo "FAIL: kcat not in PATH (scripts/deps.sh installs it)"; exit 1; }
[ -x "$TALLY" ] || fail "$TALLY is not executable"

# Consumes a whole topic (every partition to its end) as "key|value" lines,
# sorted.
consume() {
    timeout 30 kcat -b "$BOOTSTRAP" -C -t "$1" -o beginning -e -q \
        -f '%k|%s\n' | LC_ALL=C sort
}

# ---------------------------------------------------------------- usage
step "usage errors exit 2"
rc=0
"$TALLY" devbroker --bogus >/dev/null 2>"$TMP/bogus.err" || rc=$?
[ "$rc" -eq 2 ] || fail "devbroker --bogus exited $rc, expected 2"
grep -q -- "--bogus" "$TMP/bogus.err" ||
    fail "devbroker --bogus does not name the flag: $(cat "$TMP/bogus.err")"
rc=0
"$TALLY" devbroker --partitions 0 >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] || fail "devbroker --partitions 0 exited $rc, expected 2"
rc=0
"$TALLY" produce --bogus </dev/null >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] || fail "produce --bogus exited $rc, expected 2"
"$TALLY" devbroker --help | grep -q "5 MiB" ||
    fail "devbroker --help does not mention the mock's retention limit"

# ---------------------------------------------------------------- start
step "start devbroker --partitions 4"
BOOTSTRAP_FILE=$TMP/bootstrap
"$TALLY" devbroker --partitions 4 --bootstrap-file "$BOOTSTRAP_FILE" \
    >"$TMP/devbroker.out" 2>"$TMP/devbroker.err" &
DB_PID=$!
for _ in $(seq 200); do
    [ -s "$BOOTSTRAP_FILE" ] && break
    kill -0 "$DB_PID" 2>/dev/null || fail "devbroker exited at start"
    sleep 0.05
done
[ -s "$BOOTSTRAP_FILE" ] || fail "no bootstrap file after 10 s"
BOOTSTRAP=$(cat "$BOOTSTRAP_FILE")
[[ "$BOOTSTRAP" =~ ^127\.0\.0\.1:[0-9]+$ ]] ||
    fail "unexpected bootstrap address '$BOOTSTRAP'"
for _ in $(seq 100); do
    [ -s "$TMP/devbroker.out" ] && break
    sleep 0.05
done
[ "$(cat "$TMP/devbroker.out")" = "$BOOTSTRAP" ] ||
    fail "stdout '$(cat "$TMP/devbroker.out")' != file '$BOOTSTRAP'"
echo "bootstrap $BOOTSTRAP"

# ---------------------------------------------------------------- metadata
step "kcat -L lists the topics"
timeout 30 kcat -b "$BOOTSTRAP" -L >"$TMP/metadata" ||
    fail "kcat -L failed"
for topic in token-usage token-usage.dlq cache-invalidation \
    cache-invalidation.dlq; do
    grep -q "topic \"$topic\" with 4 partitions" "$TMP/metadata" ||
        fail "topic $topic with 4 partitions missing: $(cat "$TMP/metadata")"
done

# ---------------------------------------------------------------- kcat
step "kcat round trip"
printf 'k1|v1\nk2|v2\nk3|v3\n' >"$TMP/kcat.in"
timeout 30 kcat -b "$BOOTSTRAP" -P -t cache-invalidation -K '|' \
    <"$TMP/kcat.in" || fail "kcat -P failed"
consume cache-invalidation >"$TMP/kcat.out"
diff -u "$TMP/kcat.in" "$TMP/kcat.out" || fail "kcat round trip differs"

# ---------------------------------------------------------------- produce
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ev() { # ev TENANT KEY TOKENS
    printf '{"idempotency_key":"%s","tenant_id":"%s","tokens":%s,' "$2" "$1" "$3"
    printf '"token_type":"llm","operation":"chat","model":"gpt-4o",'
    printf '"occurred_at":"%s"}\n' "$NOW"
}

step "tally produce: keyed by tenant_id, unkeyed otherwise"
{
    ev t1 a1 10
    ev t2 a2 20
    echo
    echo 'not json'
    ev t1 a3 30
} >"$TMP/plain.jsonl"
"$TALLY" produce --brokers "$BOOTSTRAP" --topic token-usage \
    --file "$TMP/plain.jsonl" 2>"$TMP/plain.err" ||
    fail "tally produce exited $?: $(cat "$TMP/plain.err")"
{
    echo "|not json"
    ev t1 a1 10 | sed 's/^/t1|/'
    ev t1 a3 30 | sed 's/^/t1|/'
    ev t2 a2 20 | sed 's/^/t2|/'
} | LC_ALL=C sort >"$TMP/plain.expected"
consume token-usage >"$TMP/plain.out"
diff -u "$TMP/plain.expected" "$TMP/plain.out" ||
    fail "tally produce: messages differ"

step "tally produce from stdin with env TALLY_BROKERS"
ev t3 b1 5 | TALLY_BROKERS=$BOOTSTRAP "$TALLY" produce \
    --topic token-usage.dlq 2>"$TMP/stdin.err" ||
    fail "produce from stdin failed: $(cat "$TMP/stdin.err")"
consume token-usage.dlq | grep -q '^t3|{"idempotency_key":"b1"' ||
    fail "produce from stdin: message missing"

step "tally produce --validate: reports line 3, sends the rest, exit 1"
{
    ev t4 c1 1
    echo
    echo '{"tenant_id":"t4","tokens":"12","token_type":"llm","operation":"chat"}'
    ev t4 c2 2
} >"$TMP/validate.jsonl"
rc=0
"$TALLY" produce --brokers "$BOOTSTRAP" --topic val --validate \
    --file "$TMP/validate.jsonl" 2>"$TMP/validate.err" || rc=$?
[ "$rc" -eq 1 ] || fail "produce --validate exited $rc, expected 1"
grep -q '^line 3: wrong_type: ' "$TMP/validate.err" ||
    fail "no 'line 3: wrong_type' report: $(cat "$TMP/validate.err")"
[ "$(grep -c '^line ' "$TMP/validate.err")" -eq 1 ] ||
    fail "more than one invalid line reported: $(cat "$TMP/validate.err")"
[ "$(consume val | grep -c '^t4|')" -eq 2 ] ||
    fail "produce --validate did not send the 2 valid lines"
rc=0
ev t5 d1 1 | "$TALLY" produce --brokers "$BOOTSTRAP" --topic val \
    --validate 2>/dev/null || rc=$?
[ "$rc" -eq 0 ] || fail "produce --validate of a valid line exited $rc"

# ---------------------------------------------------------------- python
step "confluent-kafka (python) producer, consumer group"
if "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    "$PYTHON" - "$BOOTSTRAP" <<'EOF' || fail "confluent-kafka checks failed"
import sys, time
from confluent_kafka import Consumer, Producer

bootstrap = sys.argv[1]
n = 100
errors = []
p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
for i in range(n):
    p.produce("py-roundtrip", key=b"k%d" % (i % 7), value=b"v%d" % i,
              on_delivery=lambda err, msg: err and errors.append(err))
if p.flush(30) != 0 or errors:
    sys.exit("python producer: undelivered %r" % errors[:3])


def consume_all(topic, group, want):
    """Consumes with a consumer group until `want` messages arrived,
    committing synchronously; returns the messages as (key, value)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    got = []
    deadline = time.time() + 30
    while len(got) < want and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            sys.exit("python consumer: %s" % m.error())
        got.append((m.key(), m.value()))
        c.commit(message=m, asynchronous=False)
    committed = sum(tp.offset for tp in c.committed(c.assignment(),
                                                    timeout=10)
                    if tp.offset >= 0)
    c.close()
    if len(got) != want:
        sys.exit("python consumer (%s): %d of %d messages"
                 % (topic, len(got), want))
    if committed != want:
        sys.exit("python consumer (%s): committed %d, expected %d"
                 % (topic, committed, want))
    return got


got = consume_all("py-roundtrip", "tally-test-py", n)
if sorted(v for _, v in got) != sorted(b"v%d" % i for i in range(n)):
    sys.exit("python round trip: values differ")

# What tally produce sent, through a consumer group: keyed by tenant_id.
import json
for key, value in consume_all("token-usage", "tally-test-usage", 4):
    try:
        tenant = json.loads(value)["tenant_id"].encode()
    except ValueError:
        tenant = None
    if key != tenant:
        sys.exit("token-usage: key %r for %r" % (key, value))
print("confluent-kafka: ok")
EOF
else
    echo "FAIL: $PYTHON cannot import confluent_kafka (scripts/deps.sh installs python3-confluent-kafka)"
    exit 1
fi

# ---------------------------------------------------------------- stop
step "SIGTERM stops devbroker with exit 0"
kill -TERM "$DB_PID"
rc=0
wait "$DB_PID" || rc=$?
DB_PID=
[ "$rc" -eq 0 ] || fail "devbroker exited $rc after SIGTERM, expected 0"
[ ! -e "$BOOTSTRAP_FILE" ] || fail "bootstrap file left behind"

echo "PASS"
