#!/usr/bin/env bash
# A catalogue of bad token-usage messages, one or more per reason code the
# worker can give (usage_event.h), interleaved with good ones, produced
# with `tally produce` as raw lines (invalid UTF-8 and NUL bytes included).
# Every bad one must land in token-usage.dlq exactly once with its reason,
# a message, where it came from, its key, value (truncated past
# --max-message-bytes, with tally.error.truncated: true) and timestamp;
# the good ones are counted exactly; the worker stays up.
#
# usage: test_worker_dlq.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
MAX_BYTES=16384 # room for metadata_too_large (> 8 KiB) under too_large

step "a bad -X property is a configuration error (exit 2)"
rc=0
timeout 30 "$TALLY" worker -X bogus.property=1 --metrics-addr "" \
  >"$IT_DIR/bogus.log" 2>&1 || rc=$?
[ "$rc" -eq 2 ] || fail "worker -X bogus.property=1 exited $rc, expected 2"
grep -q "bogus.property" "$IT_DIR/bogus.log" ||
  fail "worker -X bogus.property=1 does not name the property"

step "write the catalogue"
"$IT_PYTHON" - "$IT_DIR" "$MAX_BYTES" <<'EOF'
import datetime as dt, json, sys

out, max_bytes = sys.argv[1], int(sys.argv[2])
now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
def ts(delta=dt.timedelta()):
    return (now + delta).strftime("%Y-%m-%dT%H:%M:%SZ")
yday = (now - dt.timedelta(days=1)).strftime("%Y-%m-%d")

def ev(**kw):
    """A valid event with kw merged in (None: the field is left out)."""
    e = {"idempotency_key": "k", "tenant_id": "t-bad", "tokens": 7,
         "token_type": "llm", "operation": "chat", "occurred_at": ts()}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not None}

def js(obj):
    return json.dumps(obj, separators=(",", ":")).encode()

def raw(s):
    return s.encode() if isinstance(s, str) else s

deep = "1"
for _ in range(40):
    deep = '{"a":' + deep + "}"

bad = [  # (reason, line)
    ("invalid_json", b'{"tenant_id":"t-bad","tokens":5'),
    ("invalid_json", b"this is not json"),
    ("invalid_json", b'{"tenant_id":"t-bad"} trailing'),
    ("invalid_utf8", b'{"tenant_id":"t-bad","tokens":1,"token_type":"llm",'
                     b'"operation":"chat","model":"\xff\xfe"}'),
    ("invalid_utf8", b'{"tenant_id":"t-bad","model":"\xc0\xaf"}'),
    ("nul_character", b'{"tenant_id":"t-bad","tokens":1,"token_type":"llm",'
                      b'"operation":"chat","model":"a\x00b"}'),
    ("nul_character", raw(js(ev(model="a\u0000b")).decode())),
    ("duplicate_member", b'{"tenant_id":"t-bad","tenant_id":"t-other",'
                         b'"tokens":1,"token_type":"llm","operation":"chat"}'),
    ("too_deep", raw('{"tenant_id":"t-bad","tokens":1,"token_type":"llm",'
                     '"operation":"chat","metadata":' + deep + "}")),
    ("not_object", b"[1,2,3]"),
    ("not_object", b'"just a string"'),
    ("not_object", b"42"),
    ("unsupported_schema_version", js(ev(schema_version=2))),
    ("missing_field", js(ev(tokens=None))),
    ("missing_field", js(ev(tenant_id=None))),
    ("missing_field", js(ev(token_type=None))),
    ("missing_field", js(ev(operation=None))),
    ("wrong_type", raw(js(ev(tokens=0)).decode().replace('"tokens":0', '"tokens":1.0'))),
    ("wrong_type", raw(js(ev(tokens=0)).decode().replace('"tokens":0', '"tokens":1e3'))),
    ("wrong_type", js(ev(tokens="12"))),
    ("wrong_type", js(ev(tenant_id=42))),
    ("wrong_type", js(ev(schema_version="1"))),
    ("wrong_type", js(ev(metadata=[1, 2]))),
    ("out_of_range", js(ev(tokens=-5))),
    ("out_of_range", js(ev(tokens=10**12 + 1))),
    ("out_of_range", raw(js(ev(tokens=0)).decode().replace(
        '"tokens":0', '"tokens":9223372036854775808'))),
    ("out_of_range", js(ev(prompt_tokens=-1))),
    ("invalid_id", js(ev(tenant_id="has space"))),
    ("invalid_id", js(ev(tenant_id="x" * 129))),
    ("invalid_id", js(ev(agent_id="a/b"))),
    ("invalid_id", js(ev(tenant_id=""))),
    ("invalid_string", js(ev(model=""))),
    ("invalid_string", js(ev(model="gpt\u0001x"))),
    ("invalid_string", js(ev(model="m" * 129))),
    ("invalid_string", js(ev(idempotency_key="k" * 513))),
    ("invalid_string", js(ev(idempotency_key="a\u0085b"))),
    ("reserved_key", js(ev(idempotency_key="kafka:token-usage:0:1"))),
    ("unknown_enum", js(ev(token_type="audio"))),
    ("unknown_enum", js(ev(operation="rerank"))),
    ("invalid_timestamp", js(ev(occurred_at="now"))),
    ("invalid_timestamp", js(ev(occurred_at="2024-02-30T00:00:00Z"))),
    ("invalid_timestamp", js(ev(occurred_at=ts()[:-1]))),  # no offset
    ("invalid_timestamp", js(ev(occurred_at=yday + "T23:59:60Z"))),
    ("invalid_timestamp", js(ev(occurred_at=ts().lower()))),
    ("invalid_timestamp", js(ev(occurred_at=ts()[:-4] + "Z"))),  # no seconds
    ("too_old", js(ev(occurred_at=ts(-dt.timedelta(days=40))))),
    ("too_far_future", js(ev(occurred_at=ts(dt.timedelta(hours=2))))),
    ("metadata_too_large", js(ev(metadata={"blob": "x" * 9000}))),
    ("too_large", js(ev(metadata={"blob": "y" * 8000},
                        model="z" * 100, extra="w" * (max_bytes + 3000)))),
]
# Good ones: a null optional field is absent, unknown fields are ignored.
good = []
for i in range(40):
    extra = {}
    if i % 3 == 0:
        extra = {"model": None, "agent_id": None, "metadata": None}
    elif i % 3 == 1:
        extra = {"unknown_field": {"x": [1, 2]}, "metadata": {"i": i}}
    good.append(js(ev(idempotency_key="good-%d" % i, tenant_id="t-good",
                      tokens=1000 + i, **extra)))

lines, reasons = [], []
gi = iter(good)
for r, line in bad:
    assert b"\n" not in line and not line.endswith(b"\r"), r
    lines.append(next(gi, None) or js(ev(idempotency_key="good-x", tenant_id="t-good")))
    reasons.append(None)
    lines.append(line)
    reasons.append(r)
for g in gi:
    lines.append(g)
    reasons.append(None)
# good-x may repeat (a duplicate key): count the good events by key.
with open(out + "/catalogue.jsonl", "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
with open(out + "/catalogue.json", "w") as f:
    json.dump([{"reason": r, "value": l.hex()} for r, l in zip(reasons, lines)], f)
goods = {}
for r, l in zip(reasons, lines):
    if r is None:
        e = json.loads(l)
        goods.setdefault(e["idempotency_key"], e["tokens"])
with open(out + "/good.txt", "w") as f:
    f.write("%d %d %d\n" % (len(goods), sum(goods.values()), len(lines)))
print("%d lines: %d bad, %d good events" % (len(lines), len(bad), len(goods)))
EOF
read -r good_events good_tokens total <"$IT_DIR/good.txt"

step "produce it with tally produce (raw lines, no --validate)"
rc=0
"$TALLY" produce --file "$IT_DIR/catalogue.jsonl" >>"$IT_DIR/produce.log" 2>&1 ||
  rc=$?
[ "$rc" -eq 0 ] || fail "tally produce exited $rc"
sleep 1 # dead letters must carry the original timestamps, not the worker's

step "a worker with --max-message-bytes $MAX_BYTES and metrics"
# The token-usage pipeline alone: the worker's cache-invalidation consumer
# would be a second member of its group, which can join a generation
# later (the token-usage one migrates first); a Kafka commit queued behind
# that rebalance's JoinGroup gets ILLEGAL_GENERATION from tally devbroker,
# the assignment is lost and the open batch is read again, its bad
# messages dead-lettered a second time. One member, one generation: each
# exactly once, as checked below.
port=$(it_free_port)
it_worker_start w1 --max-message-bytes "$MAX_BYTES" \
  --metrics-addr "127.0.0.1:$port" --invalidation-topic ""
it_wait_consumed "$total" 60
it_assert_alive w1 "after the catalogue"

step "every bad message is in token-usage.dlq, as it was, with its reason"
"$IT_PYTHON" - "$IT_DIR" "$TALLY_BROKERS" "$MAX_BYTES" <<'EOF' ||
import json, sys
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING, KafkaError

out, brokers, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
cat = json.load(open(out + "/catalogue.json"))
by_value = {}
for i, c in enumerate(cat):
    by_value.setdefault(bytes.fromhex(c["value"]), []).append(i)

def read_all(topic):
    c = Consumer({"bootstrap.servers": brokers, "group.id": "dlq-check",
                  "enable.partition.eof": True, "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10)
    parts = sorted(md.topics[topic].partitions)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    eof, msgs = set(), []
    while len(eof) < len(parts):
        m = c.poll(10)
        if m is None:
            sys.exit("timeout reading %s" % topic)
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                eof.add(m.partition())
                continue
            sys.exit("reading %s: %s" % (topic, m.error()))
        msgs.append(m)
    c.close()
    return msgs

errors = []
def check(cond, what):
    if not cond:
        errors.append(what)

orig = {(m.partition(), m.offset()): m for m in read_all("token-usage")}
check(len(orig) == len(cat), "token-usage holds %d messages, produced %d"
      % (len(orig), len(cat)))
# tally produce sent each line as it is (NUL and invalid UTF-8 included).
line_of = {}
used = set()
for po, m in orig.items():
    idx = [i for i in by_value.get(m.value(), []) if i not in used]
    if not idx:
        errors.append("token-usage %s holds bytes that are no catalogue "
                      "line: %r" % (po, m.value()[:80]))
        continue
    used.add(idx[0])
    line_of[po] = idx[0]

dlq = read_all("token-usage.dlq")
seen = {}
for d in dlq:
    h = {}
    for k, v in d.headers() or []:
        check(k not in h, "header %s twice" % k)
        h[k] = v.decode("utf-8", "replace") if v is not None else None
    where = "dlq %d/%d" % (d.partition(), d.offset())
    try:
        po = (int(h.get("tally.error.partition")), int(h.get("tally.error.offset")))
    except (TypeError, ValueError):
        errors.append("%s: bad partition/offset headers %r" % (where, h))
        continue
    check(h.get("tally.error.topic") == "token-usage",
          "%s: tally.error.topic is %r" % (where, h.get("tally.error.topic")))
    o = orig.get(po)
    if o is None:
        errors.append("%s points at %s, not a message of token-usage" % (where, po))
        continue
    check(po not in seen, "%s: %s dead-lettered twice" % (where, po))
    seen[po] = d
    i = line_of.get(po)
    want = cat[i]["reason"] if i is not None else "?"
    where += " (line %s, expected %s)" % (i, want)
    check(want is not None, "%s: a good message was dead-lettered: %r" % (where, h))
    check(h.get("tally.error.reason") == want,
          "%s: reason %r" % (where, h.get("tally.error.reason")))
    check(bool(h.get("tally.error.message")), "%s: empty tally.error.message" % where)
    check(d.key() == o.key(), "%s: key %r, original %r" % (where, d.key(), o.key()))
    check(d.timestamp() == o.timestamp(), "%s: timestamp %r, original %r"
          % (where, d.timestamp(), o.timestamp()))
    if len(o.value()) > max_bytes:
        check(d.value() == o.value()[:max_bytes],
              "%s: value of %d bytes is not the original's first %d"
              % (where, len(d.value() or b""), max_bytes))
        check(h.get("tally.error.truncated") == "true",
              "%s: no tally.error.truncated: true (%r)" % (where, h))
    else:
        check(d.value() == o.value(), "%s: value differs from the original" % where)
        check("tally.error.truncated" not in h,
              "%s: tally.error.truncated on a message that fits" % where)
for po, i in line_of.items():
    if cat[i]["reason"] is not None and po not in seen:
        errors.append("line %d (%s) at %s is not in the DLQ"
                      % (i, cat[i]["reason"], po))
reasons = sorted({c["reason"] for c in cat if c["reason"]})
print("%d dead letters checked, %d reasons: %s" % (len(dlq), len(reasons), " ".join(reasons)))
with open(out + "/dlq_reasons.txt", "w") as f:
    for d in dlq:
        f.write(dict(d.headers())["tally.error.reason"].decode() + "\n")
for e in errors[:40]:
    print("  " + e)
sys.exit(1 if errors else 0)
EOF
  fail "dead letters differ from the bad messages (see above)"

step "the good events are counted exactly"
got=$(it_sql "SELECT count(*) || ' ' || sum(tokens) FROM tally.token_usage_events")
[ "$got" = "$good_events $good_tokens" ] ||
  fail "stored events/tokens are $got, expected $good_events $good_tokens"
got=$(it_sql "SELECT sum(events) || ' ' || sum(tokens) || ' ' ||
              string_agg(DISTINCT tenant_id, ',') FROM tally.token_usage_daily")
[ "$got" = "$good_events $good_tokens t-good" ] ||
  fail "daily sums are $got, expected $good_events $good_tokens t-good"

step "the dead-letter metric counts each reason"
curl -fsS "http://127.0.0.1:$port/metrics" >"$IT_DIR/metrics.txt" ||
  fail "metrics endpoint did not answer"
sort "$IT_DIR/dlq_reasons.txt" | uniq -c | while read -r n reason; do
  grep -Eq "^tally_usage_dead_letters_total\{reason=\"$reason\"\} $n\$" \
    "$IT_DIR/metrics.txt" ||
    fail "metric tally_usage_dead_letters_total{reason=\"$reason\"} is not $n:" \
      "$(grep "reason=\"$reason\"" "$IT_DIR/metrics.txt")"
done
it_assert_alive w1 "at the end"
it_worker_stop w1
echo "PASS: $(wc -l <"$IT_DIR/dlq_reasons.txt") dead letters exact;" \
  "$good_events good events counted"
