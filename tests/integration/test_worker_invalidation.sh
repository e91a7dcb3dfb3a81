#!/usr/bin/env bash
# Cache invalidation end to end: a worker against private Redis, Kafka
# (tally devbroker) and Postgres. The exact keys each kind of event
# removes and keeps (exact, "*", scoped "*", agent and conversation
# cascades, other tenants untouched), hostile values dead-lettered with
# their reason and nothing deleted, one notice per applied event in
# partition order, offsets committed to Kafka, Redis down (counting goes
# on, invalidations wait and are applied after it is back, no restart),
# Postgres down (invalidations go on), SIGTERM exits 0.
#
# usage: test_worker_invalidation.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
T0=$SECONDS

# ---------------------------------------------------------------------
# Python helpers (the Debian interpreter: it has confluent_kafka).

# The scenario: seed keys, events in produce order, what each removes.
# plan DIR NAME: writes NAME.seed (keys, sorted), NAME.jsonl (lines to
# produce), NAME.json (applied events with their expected notice, hostile
# lines with their reason).
plan() {
  "$IT_PYTHON" - "$IT_DIR" "$1" <<'EOF'
import json, sys
out, name = sys.argv[1], sys.argv[2]
P = "cache"

def K(t, typ, res, agent=None, conv=None, coll=None):
    s = "%s:{%s}:%s" % (P, t, typ)
    if agent: s += ":agent=" + agent
    if conv: s += ":conv=" + conv
    if coll: s += ":coll=" + coll
    return s + ":" + res

CONV_TYPES = ["conversation", "conversation_memory", "conversation_message",
              "conversation_messages_list"]
seed, applied, hostile, lines = [], [], [], []

def applied_ev(ev, keys=(), prefixes=(), deletes=()):
    applied.append({"event": ev, "keys": sorted(keys),
                    "prefixes": sorted(prefixes), "deletes": sorted(deletes)})
    lines.append(json.dumps(ev, ensure_ascii=False))

def hostile_ev(line, reason):
    if not isinstance(line, str):
        line = json.dumps(line)
    hostile.append({"line": line, "reason": reason})
    lines.append(line)

if name == "main":
    for t in ["t1", "t10", "t2"]:
        for a in ["a1", "a2", "a3", "a10"]:
            for typ in ["agent", "agent_config", "agent_tools"]:
                seed.append(K(t, typ, a))
        for a, c in [("a1", "c1"), ("a1", "c2"), ("a2", "c3"), ("a3", "c8"),
                     ("a4", "c5"), ("a4", "c6"), ("a10", "c1"), ("a5", "c7")]:
            for typ in CONV_TYPES:
                seed.append(K(t, typ, c if typ != "conversation_message"
                              else "m1", a, c))
            seed.append(K(t, "conversation_message", "m2", a, c))
            seed.append(K(t, "agent_execution_state", "run1", a, c))
        seed += [K(t, "conversation", "c5", conv="c5"),
                 K(t, "conversation", "c7", conv="c7"),
                 K(t, "conversation_memory", "c7", conv="c7"),
                 K(t, "conversation_message", "m1", conv="c7"),
                 K(t, "document", "d1"), K(t, "document", "d2"),
                 K(t, "document", "d3"), K(t, "document", "d4", coll="k1"),
                 K(t, "documents", "d1"), K(t, "document_meta", "d1"),
                 K(t, "collection_metadata", "k1", coll="k1"),
                 K(t, "collection_metadata", "k2", coll="k2"),
                 K(t, "query_result", "q1"), K(t, "query_result", "q2")]
    seed += ["cache:t1:agent:a1", "other:{t1}:agent:a1", "cache:{t1}x:agent:a1"]

    # Applied: each removes keys no other one does, so that every notice's
    # `deleted` is known whatever the batches.
    applied_ev({"tenant_id": "t1", "data_type": "agent", "resource_id": "a2",
                "event_id": "e1-exact"},
               keys=[K("t1", "agent", "a2")], deletes=[K("t1", "agent", "a2")])
    hostile_ev({"tenant_id": "t1:*", "data_type": "document",
                "resource_id": "*"}, "invalid_id")
    applied_ev({"tenant_id": "t1", "data_type": "query_result",
                "resource_id": "q9"}, keys=[K("t1", "query_result", "q9")])
    hostile_ev({"tenant_id": "t1}", "data_type": "agent",
                "resource_id": "a1"}, "invalid_id")
    applied_ev({"tenant_id": "t1", "data_type": "document", "resource_id": "*",
                "event_id": "e3 wildcard \u00fc/\u20ac"},
               prefixes=["cache:{t1}:document:"],
               deletes=[K("t1", "document", d) for d in ["d1", "d2", "d3"]]
               + [K("t1", "document", "d4", coll="k1")])
    hostile_ev({"tenant_id": "t10", "data_type": "agent",
                "resource_id": "a1*"}, "invalid_id")
    applied_ev({"tenant_id": "t1", "data_type": "collection_metadata",
                "resource_id": "*", "collection_id": "k1"},
               prefixes=["cache:{t1}:collection_metadata:coll=k1:"],
               deletes=[K("t1", "collection_metadata", "k1", coll="k1")])
    hostile_ev({"tenant_id": "t10", "data_type": "Agent",
                "resource_id": "a1"}, "invalid_data_type")
    applied_ev({"tenant_id": "t1", "data_type": "conversation_message",
                "resource_id": "*", "agent_id": "a2", "conversation_id": "c3"},
               prefixes=["cache:{t1}:conversation_message:agent=a2:conv=c3:"],
               deletes=[K("t1", "conversation_message", m, "a2", "c3")
                        for m in ["m1", "m2"]])
    hostile_ev({"tenant_id": "t10", "data_type": "agent", "resource_id": "*",
                "cascade": True}, "cascade_wildcard")
    applied_ev({"tenant_id": "t1", "data_type": "agent", "resource_id": "a3",
                "cascade": True, "event_id": "e6"},
               keys=[K("t1", typ, "a3")
                     for typ in ["agent", "agent_config", "agent_tools"]],
               deletes=[K("t1", typ, "a3")
                        for typ in ["agent", "agent_config", "agent_tools"]])
    hostile_ev({"tenant_id": "t10", "data_type": "document",
                "resource_id": "*", "agent_id": "a1:*"}, "invalid_id")
    conv_a1 = [K("t1", typ, c if typ != "conversation_message" else m, "a1", c)
               for c in ["c1", "c2"] for typ in CONV_TYPES
               for m in (["m1", "m2"] if typ == "conversation_message" else [None])]
    applied_ev({"tenant_id": "t1", "data_type": "agent", "resource_id": "a1",
                "cascade": True, "invalidate_conversations": True,
                "event_id": "e7"},
               keys=[K("t1", typ, "a1")
                     for typ in ["agent", "agent_config", "agent_tools"]],
               prefixes=["cache:{t1}:%s:agent=a1:" % typ for typ in CONV_TYPES],
               deletes=[K("t1", typ, "a1")
                        for typ in ["agent", "agent_config", "agent_tools"]]
               + conv_a1)
    hostile_ev({"tenant_id": "*", "data_type": "document",
                "resource_id": "*"}, "invalid_id")
    applied_ev({"tenant_id": "t1", "data_type": "conversation",
                "resource_id": "c5", "agent_id": "a4", "cascade": True},
               keys=["cache:{t1}:conversation:agent=a4:c5"],
               prefixes=["cache:{t1}:%s:agent=a4:conv=c5:" % typ
                         for typ in CONV_TYPES],
               deletes=[K("t1", typ, "c5" if typ != "conversation_message"
                          else m, "a4", "c5")
                        for typ in CONV_TYPES
                        for m in (["m1", "m2"] if typ == "conversation_message"
                                  else [None])])
    hostile_ev({"tenant_id": "t10", "data_type": "document:*",
                "resource_id": "d1"}, "invalid_data_type")
    applied_ev({"tenant_id": "t1", "data_type": "conversation",
                "resource_id": "c7", "cascade": True, "event_id": "e9"},
               keys=["cache:{t1}:conversation:c7"],
               prefixes=["cache:{t1}:%s:conv=c7:" % typ for typ in CONV_TYPES],
               deletes=[K("t1", "conversation", "c7", conv="c7"),
                        K("t1", "conversation_memory", "c7", conv="c7"),
                        K("t1", "conversation_message", "m1", conv="c7")])
    hostile_ev({"tenant_id": "t10", "data_type": "agent", "resource_id": "a1",
                "cascade": "true"}, "wrong_type")
    # invalidate_conversations without cascade, cascade on another type:
    # only the exact key.
    applied_ev({"tenant_id": "t1", "data_type": "agent_config",
                "resource_id": "a10", "invalidate_conversations": True},
               keys=[K("t1", "agent_config", "a10")],
               deletes=[K("t1", "agent_config", "a10")])
    hostile_ev({"tenant_id": "t10", "data_type": "agent", "resource_id": "a1",
                "schema_version": 2}, "unsupported_schema_version")
    applied_ev({"tenant_id": "t1", "data_type": "conversation_memory",
                "resource_id": "c6", "agent_id": "a4", "conversation_id": "c6",
                "cascade": True},
               keys=[K("t1", "conversation_memory", "c6", "a4", "c6")],
               deletes=[K("t1", "conversation_memory", "c6", "a4", "c6")])
    hostile_ev({"tenant_id": "t10", "data_type": "agent"}, "missing_field")
    applied_ev({"tenant_id": "t2", "data_type": "agent_tools",
                "resource_id": "*", "event_id": "e12"},
               prefixes=["cache:{t2}:agent_tools:"],
               deletes=[K("t2", "agent_tools", a)
                        for a in ["a1", "a2", "a3", "a10"]])
    hostile_ev({"tenant_id": "t10", "data_type": "document",
                "resource_id": "*", "collection_id": "k1}"}, "invalid_id")
    hostile_ev({"tenant_id": "t1", "data_type": "document",
                "resource_id": "d1", "conversation_id": "*"}, "invalid_id")
    hostile_ev("cache:{t1}:*", "invalid_json")
    # null is absent, extra fields ignored, schema_version 1 accepted.
    applied_ev({"schema_version": 1, "tenant_id": "t1",
                "data_type": "query_result", "resource_id": "q1",
                "agent_id": None, "event_id": None, "extra": {"x": 1}},
               keys=[K("t1", "query_result", "q1")],
               deletes=[K("t1", "query_result", "q1")])
elif name in ("down", "pgdown"):
    tag = "x" if name == "down" else "y"
    for t in ["t1", "t2", "t10", "t3", "t4", "t5"]:
        seed += [K(t, "agent", tag + "1"), K(t, "agent", tag + "2"),
                 K(t, "document", tag + "d1", coll=tag + "k"),
                 K(t, "document", tag + "d2", coll=tag + "k")]
        applied_ev({"tenant_id": t, "data_type": "agent",
                    "resource_id": tag + "1", "event_id": name + "-" + t},
                   keys=[K(t, "agent", tag + "1")],
                   deletes=[K(t, "agent", tag + "1")])
        applied_ev({"tenant_id": t, "data_type": "document",
                    "resource_id": "*", "collection_id": tag + "k"},
                   prefixes=["cache:{%s}:document:coll=%sk:" % (t, tag)],
                   deletes=[K(t, "document", d, coll=tag + "k")
                            for d in [tag + "d1", tag + "d2"]])
seed.sort()
deleted = set()
for a in applied:
    for k in a["deletes"]:
        assert k in seed, k
        assert k not in deleted, k
        deleted.add(k)
with open("%s/%s.seed" % (out, name), "w") as f:
    f.writelines(k + "\n" for k in seed)
with open("%s/%s.survivors" % (out, name), "w") as f:
    f.writelines(k + "\n" for k in seed if k not in deleted)
with open("%s/%s.jsonl" % (out, name), "w", encoding="utf-8") as f:
    f.writelines(l + "\n" for l in lines)
json.dump({"applied": applied, "hostile": hostile},
          open("%s/%s.json" % (out, name), "w"))
EOF
}

# Sets every key of FILE in Redis (RESP through redis-cli --pipe).
seed_redis() {
  "$IT_PYTHON" - "$1" <<'EOF' | it_redis_cli --pipe >"$IT_DIR/seed.log" 2>&1 ||
import sys
out = sys.stdout.buffer
for k in open(sys.argv[1], "rb").read().split(b"\n"):
    if k:
        args = [b"SET", k, b"v"]
        out.write(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
EOF
    fail "cannot seed redis from $1"
}

# Every key in Redis, sorted.
redis_keys() {
  it_redis_cli --scan | LC_ALL=C sort
}

# Fails unless the keys in Redis are exactly those of FILE.
assert_keys() {
  redis_keys >"$IT_DIR/keys.now"
  if ! diff <(LC_ALL=C sort "$1") "$IT_DIR/keys.now" >"$IT_DIR/keys.diff"; then
    head -40 "$IT_DIR/keys.diff" >&2
    fail "the keys in Redis are not those of $1 ($2; '<' missing, '>' extra)"
  fi
}

# Waits until the keys in Redis are exactly those of FILE:
# wait_keys FILE TIMEOUT WHAT
wait_keys() {
  for _ in $(seq 1 $(($2 * 10))); do
    redis_keys | cmp -s - <(LC_ALL=C sort "$1") && return 0
    sleep 0.1
  done
  assert_keys "$1" "$3"
}

# A background subscriber to cache:invalidations writing to FILE:
# subscribe NAME (pid in $IT_DIR/NAME.pid, killed by it_cleanup).
subscribe() {
  redis-cli -p "$(cat "$IT_DIR/redis/port")" subscribe cache:invalidations \
    >"$IT_DIR/$1.out" 2>&1 &
  echo $! >"$IT_DIR/$1.pid"
  IT_WORKERS+=("$1")
  for _ in $(seq 1 50); do
    grep -q '^subscribe$' "$IT_DIR/$1.out" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "the subscriber $1 did not subscribe"
}

unsubscribe() {
  kill "$(cat "$IT_DIR/$1.pid")" 2>/dev/null || true
  wait "$(cat "$IT_DIR/$1.pid")" 2>/dev/null || true
}

# Number of notices a subscriber got.
notices() {
  "$IT_PYTHON" - "$IT_DIR/$1.out" <<'EOF'
import sys
l = open(sys.argv[1], "rb").read().split(b"\n")
print(sum(1 for i in range(len(l) - 2)
          if l[i] == b"message" and l[i + 1] == b"cache:invalidations"))
EOF
}

wait_notices() { # wait_notices SUB N TIMEOUT
  local got=0
  for _ in $(seq 1 $(($3 * 10))); do
    got=$(notices "$1")
    [ "$got" -ge "$2" ] && return 0
    sleep 0.1
  done
  fail "subscriber $1 got $got notices of $2 after $3 s"
}

# Checks the notices of subscriber SUB against plan NAME: one per applied
# event, in produce order per tenant (each tenant's events share a
# partition), fields exactly as the contract says.
check_notices() {
  "$IT_PYTHON" - "$IT_DIR/$1.out" "$IT_DIR/$2.json" <<'EOF' ||
import json, sys
raw = open(sys.argv[1], "rb").read().split(b"\n")
plan = json.load(open(sys.argv[2]))
got = [raw[i + 2] for i in range(len(raw) - 2)
       if raw[i] == b"message" and raw[i + 1] == b"cache:invalidations"]
errors = []
notes = []
for g in got:
    try:
        notes.append(json.loads(g.decode("utf-8")))
    except Exception as e:
        errors.append("notice is not JSON (%s): %r" % (e, g[:200]))
if len(got) != len(plan["applied"]):
    errors.append("%d notices for %d applied events" % (len(got), len(plan["applied"])))
by_tenant = {}
for a in plan["applied"]:
    by_tenant.setdefault(a["event"]["tenant_id"], []).append(a)
seen = {}
for n in notes:
    t = n.get("tenant_id") if isinstance(n, dict) else None
    exp = by_tenant.get(t, [])
    i = seen.get(t, 0)
    seen[t] = i + 1
    if i >= len(exp):
        errors.append("extra notice for tenant %r: %r" % (t, n))
        continue
    a = exp[i]
    ev = a["event"]
    want_fields = {"tenant_id", "keys", "prefixes", "deleted"}
    if ev.get("event_id") is not None:
        want_fields.add("event_id")
    where = "notice %d of %s (event %s)" % (i, t, json.dumps(ev, ensure_ascii=False))
    if set(n) != want_fields:
        errors.append("%s: fields %s, expected %s" % (where, sorted(n), sorted(want_fields)))
    if ev.get("event_id") is not None and n.get("event_id") != ev["event_id"]:
        errors.append("%s: event_id %r" % (where, n.get("event_id")))
    if not isinstance(n.get("keys"), list) or sorted(n["keys"]) != a["keys"]:
        errors.append("%s: keys %r, expected %r" % (where, n.get("keys"), a["keys"]))
    if not isinstance(n.get("prefixes"), list) or sorted(n["prefixes"]) != a["prefixes"]:
        errors.append("%s: prefixes %r, expected %r" % (where, n.get("prefixes"), a["prefixes"]))
    if n.get("deleted") != len(a["deletes"]) or type(n.get("deleted")) is not int:
        errors.append("%s: deleted %r, expected %d" % (where, n.get("deleted"), len(a["deletes"])))
for t, exp in by_tenant.items():
    if seen.get(t, 0) < len(exp):
        errors.append("tenant %s: %d notices of %d" % (t, seen.get(t, 0), len(exp)))
for e in errors[:30]:
    print("  " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
    fail "the notices on cache:invalidations ($1) are not what plan $2 expects"
}

# Checks cache-invalidation.dlq against plan NAME: each hostile line
# exactly once, with its reason and the original key, value, timestamp,
# partition and offset; no applied event there.
check_dlq() {
  "$IT_PYTHON" - "$TALLY_BROKERS" "$IT_DIR/$1.json" <<'EOF' ||
import json, sys
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING, KafkaError
brokers, plan = sys.argv[1], json.load(open(sys.argv[2]))

def read_all(topic):
    c = Consumer({"bootstrap.servers": brokers, "group.id": "inv-check",
                  "enable.partition.eof": True, "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10)
    if topic not in md.topics or md.topics[topic].error is not None:
        sys.exit("no topic %s" % topic)
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
orig = {(m.partition(), m.offset()): m for m in read_all("cache-invalidation")}
want = {}
for h in plan["hostile"]:
    want[h["line"].encode()] = h["reason"]
dlq = read_all("cache-invalidation.dlq")
seen = set()
for d in dlq:
    h = {k: (v.decode() if v is not None else None) for k, v in d.headers() or []}
    where = "dlq %d/%d %r" % (d.partition(), d.offset(), d.value()[:80])
    v = d.value()
    if v not in want:
        errors.append("%s: not a hostile line of the plan" % where)
        continue
    if v in seen:
        errors.append("%s: dead-lettered twice" % where)
    seen.add(v)
    if h.get("tally.error.reason") != want[v]:
        errors.append("%s: reason %r, expected %r" % (where, h.get("tally.error.reason"), want[v]))
    if not h.get("tally.error.message"):
        errors.append("%s: no tally.error.message" % where)
    if h.get("tally.error.topic") != "cache-invalidation":
        errors.append("%s: tally.error.topic %r" % (where, h.get("tally.error.topic")))
    if "tally.error.truncated" in h:
        errors.append("%s: tally.error.truncated on a small message" % where)
    try:
        o = orig[(int(h["tally.error.partition"]), int(h["tally.error.offset"]))]
    except (KeyError, TypeError, ValueError):
        errors.append("%s: partition/offset headers %r point nowhere" % (where, h))
        continue
    if o.value() != v:
        errors.append("%s: value differs from the original at that offset" % where)
    if o.key() != d.key():
        errors.append("%s: key %r, original %r" % (where, d.key(), o.key()))
    if o.timestamp() != d.timestamp():
        errors.append("%s: timestamp %r, original %r" % (where, d.timestamp(), o.timestamp()))
for v, r in want.items():
    if v not in seen:
        errors.append("hostile line %r (%s) is not in the DLQ" % (v, r))
for e in errors[:30]:
    print("  " + e, file=sys.stderr)
print("%d dead letters checked" % len(dlq))
sys.exit(1 if errors else 0)
EOF
    fail "cache-invalidation.dlq is not what plan $1 expects"
}

# Compares the group's committed offsets on cache-invalidation in Kafka
# with the end offsets; prints the mismatches, returns 1 if any.
offsets_at_end() { # [GROUP]
  "$IT_PYTHON" - "$TALLY_BROKERS" "${1:-tally}" <<'EOF'
import sys
from confluent_kafka import Consumer, TopicPartition
brokers, group, topic = sys.argv[1], sys.argv[2], "cache-invalidation"
c = Consumer({"bootstrap.servers": brokers, "group.id": group,
              "enable.auto.commit": False})
parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
bad = []
for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10):
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
    committed = tp.offset if tp.offset >= 0 else 0  # none: nothing consumed
    if committed != hi:
        bad.append("partition %d: committed %d, end %d" % (tp.partition, tp.offset, hi))
c.close()
print("; ".join(bad))
sys.exit(1 if bad else 0)
EOF
}

wait_offsets_at_end() {
  local why
  for _ in $(seq 1 "$1"); do
    why=$(offsets_at_end tally.invalidation) && return 0
    sleep 1
  done
  fail "Kafka offsets of group tally.invalidation on cache-invalidation: $why"
}

# Token-usage events: usage_events FILE TENANT N (tokens 1..N, key i).
usage_events() {
  for i in $(seq 1 "$3"); do
    printf '{"tenant_id":"%s","idempotency_key":"%s-%d","tokens":%d,"token_type":"llm","operation":"chat","model":"m"}\n' \
      "$2" "$2" "$i" "$i"
  done >"$1"
}

tenant_tokens() {
  it_sql "SELECT coalesce(sum(tokens), 0) FROM tally.token_usage_daily
          WHERE tenant_id = '$1'"
}

wait_tokens() { # wait_tokens TENANT WANT TIMEOUT WHAT
  local got
  for _ in $(seq 1 $(($3 * 10))); do
    got=$(tenant_tokens "$1")
    [ "$got" = "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 has $got tokens in Postgres, expected $2 ($4)"
}

# ---------------------------------------------------------------------
step "1. seed Redis (tenants t1, t10, t2), subscribe, start a worker"
plan main
seed_redis "$IT_DIR/main.seed"
assert_keys "$IT_DIR/main.seed" "after seeding"
subscribe sub1
it_worker_start w1
# Both consumers joined their groups (tally, tally.invalidation): produce once both have their
# partitions, so that no commit races the second one's join (a commit
# refused for a stale generation makes the assignment "lost").
it_wait_log w1 "rebalance \(cache-invalidation\): assigned [1-9]" 30
it_wait_log w1 "rebalance \(token-usage\): assigned [1-9]" 30

step "2. produce the invalidations (applied and hostile, interleaved)"
it_produce "$IT_DIR/main.jsonl" --topic cache-invalidation
n_applied=$("$IT_PYTHON" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["applied"]))' "$IT_DIR/main.json")
wait_notices sub1 "$n_applied" 30
wait_offsets_at_end 30
assert_keys "$IT_DIR/main.survivors" "after the invalidations"
echo "    $(wc -l <"$IT_DIR/main.seed") keys seeded, $(wc -l <"$IT_DIR/main.survivors") kept"
check_dlq main

step "3. one notice per applied event, in order, with the contract's fields"
check_notices sub1 main

step "4. offsets committed to Kafka equal the end offsets"
wait_offsets_at_end 10
# Nothing applied twice after the commit.
sleep 1
[ "$(notices sub1)" = "$n_applied" ] ||
  fail "$(notices sub1) notices after the commit, expected $n_applied"
unsubscribe sub1
it_assert_alive w1 "after the main batch"

step "5. Redis down: counting goes on, invalidations wait, then apply"
plan down
seed_redis "$IT_DIR/down.seed"
redis_keys >"$IT_DIR/down.before"
cat "$IT_DIR/main.survivors" "$IT_DIR/down.seed" | LC_ALL=C sort \
  >"$IT_DIR/down.all"
assert_keys "$IT_DIR/down.all" "before the outage"
# The keys survive the restart through dump.rdb: nobody can connect to
# the new Redis before they are back.
it_redis_stop save
it_produce "$IT_DIR/down.jsonl" --topic cache-invalidation
it_wait_log w1 "cache-invalidation: [0-9]+ messages not applied" 20
usage_events "$IT_DIR/usage1.jsonl" u-down 40
it_produce "$IT_DIR/usage1.jsonl"
wait_tokens u-down 820 30 "token-usage while Redis is down"
# Nothing of the pending invalidations is committed before Redis took it.
if offsets_at_end tally.invalidation >/dev/null; then
  fail "cache-invalidation offsets committed while Redis is down"
fi
it_wait_log w1 "retrying in 2 s" 20
it_assert_alive w1 "while Redis is down"
! it_redis_cli ping >/dev/null 2>&1 || fail "redis came back by itself"
grep -E "retrying in [0-9]+ s" "$IT_DIR/w1.log" | tail -3 | sed 's/^/    /'
it_redis_start
cat "$IT_DIR/main.survivors" "$IT_DIR/down.survivors" | LC_ALL=C sort \
  >"$IT_DIR/down.after"
wait_keys "$IT_DIR/down.after" 40 "after Redis came back"
it_wait_log w1 "redis (reachable|available again)" 5
wait_offsets_at_end 20
it_assert_alive w1 "after Redis came back"

step "6. Postgres down: invalidations go on"
subscribe sub2
plan pgdown
seed_redis "$IT_DIR/pgdown.seed"
stack_pg_stop "$IT_DIR" fast
it_produce "$IT_DIR/pgdown.jsonl" --topic cache-invalidation
usage_events "$IT_DIR/usage2.jsonl" u-pgdown 10
it_produce "$IT_DIR/usage2.jsonl"
cat "$IT_DIR/down.after" "$IT_DIR/pgdown.survivors" | LC_ALL=C sort \
  >"$IT_DIR/pgdown.after"
wait_keys "$IT_DIR/pgdown.after" 20 "while Postgres is down"
wait_notices sub2 "$(wc -l <"$IT_DIR/pgdown.jsonl")" 10
wait_offsets_at_end 20
check_notices sub2 pgdown
unsubscribe sub2
it_assert_alive w1 "while Postgres is down"
stack_pg_start "$IT_DIR" || fail "Postgres did not start again"
wait_tokens u-pgdown 55 60 "token-usage after Postgres came back"
wait_tokens u-down 820 1 "token-usage counted once"

step "7. the dead letters are still exactly the hostile lines; SIGTERM"
check_dlq main
it_worker_stop w1
grep -q "stopped cleanly" "$IT_DIR/w1.log" || fail "no 'stopped cleanly' in the log"
if grep -E "^[0-9T:.-]+Z error " "$IT_DIR/w1.log" >&2; then
  fail "errors in the worker's log"
fi
echo "PASS: invalidations applied as the contract says, through Redis and" \
  "Postgres outages ($((SECONDS - T0)) s)"
