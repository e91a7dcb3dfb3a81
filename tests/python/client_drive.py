"""Drives scripts/tally_client.py for the client integration tests.

    client_drive.py usage OUT           a few thousand calls, re-calls
    client_drive.py unreachable OUT     call latency, broker unreachable
    client_drive.py fallback PHASE OUT  phases of test_client_fallback.sh
    client_drive.py inv-seed OUT        keys to seed
    client_drive.py inv-send OUT        the invalidations
    client_drive.py inv-check OUT NOTICES KEYS
                                        what Redis and the notices show

The connection settings come from the environment (the stack's env file);
each mode writes what the shell test compares under OUT.
"""
import asyncio
import collections
import datetime
import json
import os
import random
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))  # tests/python/ -> the repository
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import tally_client as tc  # noqa: E402

UTC = datetime.timezone.utc


def fail(msg):
    sys.exit("FAIL: " + msg)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------
# Token usage: generated calls and the exact sums they must give

def make_calls(rng, n, tenants, prefix, explicit_rate):
    """n distinct events as keyword dicts (some without key, some with an
    explicit occurred_at, metadata, scopes and breakdowns)."""
    now = datetime.datetime.now(UTC)
    calls = []
    for i in range(n):
        c = dict(tenant_id="%s-%d" % (prefix, rng.randrange(tenants)),
                 tokens=rng.randrange(0, 5000),
                 model=rng.choice(["gpt-4o", "gpt-4o-mini", "emb-3",
                                   "claude"]),
                 token_type=rng.choice([tc.TOKEN_TYPE_LLM,
                                        tc.TOKEN_TYPE_EMBEDDING]),
                 operation=rng.choice([tc.OPERATION_CHAT, tc.OPERATION_QUERY,
                                       tc.OPERATION_VECTOR_SEARCH,
                                       tc.OPERATION_EMBEDDING,
                                       tc.OPERATION_INGESTION]))
        if rng.random() < 0.9:
            c["idempotency_key"] = "%s-req-%d" % (prefix, i)
        if rng.random() < 0.5:
            c["agent_id"] = "a%d" % rng.randrange(5)
            c["conversation_id"] = "c%d" % rng.randrange(50)
        if rng.random() < 0.2:
            c["collection_id"] = "l%d" % rng.randrange(3)
        if rng.random() < 0.1:
            c["owner_tenant_id"] = "owner-1"
        if rng.random() < 0.5:
            c["prompt_tokens"] = rng.randrange(0, 3000)
            c["completion_tokens"] = rng.randrange(0, 2000)
            c["thoughts_tokens"] = rng.randrange(0, 100)
            c["cached_tokens"] = rng.randrange(0, 100)
        if rng.random() < 0.3:
            c["metadata"] = {"request": {"id": i, "tags": ["x", "é"]},
                             "stream": rng.random() < 0.5}
        if rng.random() < explicit_rate:
            at = now - datetime.timedelta(seconds=rng.randrange(0, 3 * 86400))
            c["occurred_at"] = (at if rng.random() < 0.5 else
                                at.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
        calls.append(c)
    return calls


class Recording(tc.Client):
    """The client, noting the occurred_at it fixed for each event (the
    day the worker must bucket it in)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stamped = {}

    def _send(self, pending, topic):
        if pending.kind == "usage":
            ev = pending.event
            self.stamped[(ev["tenant_id"], ev["idempotency_key"])] = \
                ev["occurred_at"]
        super()._send(pending, topic)


def use_recording(**kw):
    """Makes a Recording client the module's default one."""
    tc.shutdown()
    tc._default = Recording(**kw)
    return tc._default


def day_of(occurred_at):
    """The UTC day of an occurred_at as given or stamped."""
    if isinstance(occurred_at, datetime.datetime):
        return occurred_at.astimezone(UTC).date().isoformat()
    us = tc._parse_rfc3339("occurred_at", occurred_at)
    return (datetime.date(1970, 1, 1) +
            datetime.timedelta(microseconds=us)).isoformat()


def expect_rows(calls, client, keys):
    """The daily table (tests/integration/lib.sh it_daily_tsv layout) the
    calls must give, once each. keys[i] is what call i returned."""
    sums = collections.defaultdict(lambda: [0] * 6)
    for c, key in zip(calls, keys):
        at = c.get("occurred_at")
        if at is None:
            at = client.stamped[(c["tenant_id"], key)]
        b = (c["tenant_id"], day_of(at), c["token_type"], c["operation"],
             c.get("model", ""), c.get("agent_id", ""))
        s = sums[b]
        for j, f in enumerate(("tokens", "prompt_tokens", "completion_tokens",
                               "thoughts_tokens", "cached_tokens")):
            s[j] += c.get(f, 0)
        s[5] += 1
    return ["\t".join(list(b) + [str(v) for v in s]) for b, s in
            sorted(sums.items())]


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


BAD_CALLS = [
    ("tenant_id", dict(tenant_id="t 1")),
    ("tenant_id", dict(tenant_id=None)),
    ("tokens", dict(tokens=-1)),
    ("tokens", dict(tokens=1.5)),
    ("tokens", dict(tokens="10")),
    ("tokens", dict(tokens=False)),
    ("token_type", dict(token_type="gpt")),
    ("operation", dict(operation="CHAT")),
    ("model", dict(model="")),
    ("idempotency_key", dict(idempotency_key="kafka:token-usage:0:1")),
    ("agent_id", dict(agent_id="a/1")),
    ("conversation_id", dict(conversation_id="{c}")),
    ("prompt_tokens", dict(prompt_tokens=10 ** 13)),
    ("occurred_at", dict(occurred_at="yesterday")),
    ("occurred_at", dict(occurred_at="2020-01-01T00:00:00Z")),
    ("metadata", dict(metadata="{}")),
    ("metadata", dict(metadata={"big": "x" * 9000})),
]
BAD_INVALIDATIONS = [
    ("data_type", dict(tenant_id="t1", data_type="Agent", resource_id="a1")),
    ("resource_id", dict(tenant_id="t1", data_type="agent",
                         resource_id="a:1")),
    ("tenant_id", dict(tenant_id="t1}", data_type="agent", resource_id="a1")),
    ("cascade", dict(tenant_id="t1", data_type="agent", resource_id="*",
                     cascade=True)),
    ("cascade", dict(tenant_id="t1", data_type="agent", resource_id="a1",
                     cascade=1)),
]


def check_bad_calls(client):
    before = client.stats()["sent"]
    good = dict(tenant_id="t1", tokens=1, token_type="llm", operation="chat")
    bad = [(client.track, field, dict(good, **change))
           for field, change in BAD_CALLS]
    bad += [(client.invalidate, field, call)
            for field, call in BAD_INVALIDATIONS]
    for fn, field, call in bad:
        try:
            fn(**call)
        except ValueError as e:
            if not str(e).startswith(field + ":"):
                fail("bad call %r: ValueError %r does not name %s"
                     % (call, str(e), field))
        else:
            fail("bad call %r did not raise ValueError" % (call,))
    if client.stats()["sent"] != before:
        fail("a bad call was sent")
    print("    %d bad calls raised ValueError naming the field" % len(bad))


def run_calls(client, calls, recalls, rng):
    """Sends every call once, then the re-calls, shuffled in; half through
    the coroutines (asyncio.gather), half through the sync twins from four
    threads. Returns the keys the first call of each returned."""
    order = list(range(len(calls))) + recalls
    rng.shuffle(order)
    # a re-call must follow its first call (its key, its stamped time)
    seen, first, later = set(), [], []
    for i in order:
        (later if i in seen else first).append(i)
        seen.add(i)
    keys = [None] * len(calls)

    async def via_async(idx):
        for j in range(0, len(idx), 200):
            got = await asyncio.gather(*(tc.track_token_usage(**calls[i])
                                         for i in idx[j:j + 200]))
            for i, k in zip(idx[j:j + 200], got):
                if keys[i] is None:
                    keys[i] = k
                elif keys[i] != k:
                    fail("a re-call of %s returned key %s" % (keys[i], k))

    def via_sync(idx):
        for i in idx:
            k = tc.track_token_usage_sync(**calls[i])
            if keys[i] is None:
                keys[i] = k
            elif keys[i] != k:
                fail("a re-call of %s returned key %s" % (keys[i], k))

    for batch in (first, later):
        half = len(batch) // 2
        sync_part, async_part = batch[:half], batch[half:]
        threads = [threading.Thread(target=via_sync,
                                    args=(sync_part[j::4],))
                   for j in range(4)]
        for t in threads:
            t.start()
        asyncio.run(via_async(async_part))
        for t in threads:
            t.join()
    return keys


def mode_usage(out):
    rng = random.Random(8)
    client = use_recording(spool=os.path.join(out, "usage.spool"))
    calls = make_calls(rng, 3000, 40, "cu", 0.35)
    keyed = [i for i, c in enumerate(calls) if "idempotency_key" in c]
    recalls = [rng.choice(keyed) for _ in range(900)]
    t0 = time.monotonic()
    keys = run_calls(client, calls, recalls, rng)
    took = time.monotonic() - t0
    check_bad_calls(client)
    left = tc.flush(120)
    s = tc.stats()
    print("    %d calls (%d re-calls) in %.2f s; stats %s"
          % (len(calls) + len(recalls), len(recalls), took, s))
    if left or s["delivered"] != len(calls) + len(recalls) or s["failed"] \
            or s["fallen_back"] or s["spooled"] or s["lost"]:
        fail("not every call was delivered to Kafka: %s" % s)
    write_lines(os.path.join(out, "usage.expect"),
                expect_rows(calls, client, keys))
    with open(os.path.join(out, "usage.sent"), "w") as f:
        f.write("%d %d\n" % (s["delivered"], len(recalls)))


def mode_unreachable(out):
    client = tc.Client(brokers="127.0.0.1:%d" % closed_port(),
                       spool=os.path.join(out, "unreachable.spool"),
                       pg_dsn="", register_exit=False)
    times = []
    for i in range(3000):
        t0 = time.perf_counter()
        client.track(tenant_id="t-un", tokens=i, token_type="llm",
                     operation="chat", idempotency_key="un-%d" % i)
        client.invalidate(tenant_id="t-un", data_type="agent",
                          resource_id="a%d" % i)
        times.append(time.perf_counter() - t0)
    times.sort()
    med, p99 = statistics.median(times), times[int(len(times) * 0.99)]
    print("    broker unreachable: 3000 x (track + invalidate): median "
          "%.0f us, p99 %.0f us, max %.1f ms"
          % (med * 1e6, p99 * 1e6, times[-1] * 1e3))
    # Microseconds, on a loaded shared machine: generous bounds.
    if med > 0.002 or p99 > 0.05:
        fail("calls wait while the broker is unreachable")
    client.close(timeout=0)  # undelivered: spooled, not lost
    s = client.stats()
    if s["spooled"] != 6000 or s["lost"]:
        fail("closing did not spool the undelivered events: %s" % s)


# ---------------------------------------------------------------------
# Fallback phases

def fallback_plan(out):
    rng = random.Random(11)
    a = make_calls(rng, 400, 10, "fa", 1.0)   # all with occurred_at: re-sent
    b = make_calls(rng, 300, 10, "fb", 0.5)
    for i, c in enumerate(a):  # sent again in phase resend: keyed
        c.setdefault("idempotency_key", "fa-req-%d" % i)
    for c in a + b:
        if isinstance(c.get("occurred_at"), datetime.datetime):
            c["occurred_at"] = c["occurred_at"].isoformat()
    keyed = [i for i, c in enumerate(a) if "idempotency_key" in c]
    plan = {"a": a, "b": b, "a_recalls": [rng.choice(keyed)
                                          for _ in range(100)]}
    with open(os.path.join(out, "fallback.plan"), "w") as f:
        json.dump(plan, f)
    return plan


def mode_fallback(phase, out):
    path = os.path.join(out, "fallback.plan")
    plan = fallback_plan(out) if phase == "a" else json.load(open(path))
    spool = os.path.join(out, "fallback.spool")
    rng = random.Random(phase)
    if phase in ("a", "b"):
        # The broker unreachable (nothing listens at its address).
        client = use_recording(brokers="127.0.0.1:%d" % closed_port(),
                              spool=spool, message_timeout_ms=1500,
                              pg_retry_s=1.0)
    else:
        client = use_recording(spool=spool)
    calls = plan["a"] if phase in ("a", "resend") else plan["b"]
    recalls = plan["a_recalls"] if phase == "a" else []
    keys = run_calls(client, calls, recalls, rng)
    left = tc.flush(120)
    s = tc.stats()
    n = len(calls) + len(recalls)
    print("    phase %s: %d calls; stats %s" % (phase, n, s))
    want = {"a": dict(failed=n, fallen_back=n, spooled=0),
            "b": dict(failed=n, fallen_back=0, spooled=n),
            "resend": dict(delivered=n, failed=0, fallen_back=0,
                           spooled=0)}[phase]
    if left or s["lost"] or any(s[k] != v for k, v in want.items()):
        fail("phase %s: stats %s, expected %s" % (phase, s, want))
    if phase in ("a", "b"):
        write_lines(os.path.join(out, "fallback.expect.%s" % phase),
                    expect_rows(calls, client, keys))


# ---------------------------------------------------------------------
# Invalidations

TENANTS = ("t1", "t2", "t10")


def seed_keys():
    """A tenant's cached keys, built with the layout the services use."""
    k = []
    for t in TENANTS:
        for a in ("a1", "a10", "a2"):
            for dt in (tc.CACHE_TYPE_AGENT, tc.CACHE_TYPE_AGENT_CONFIG,
                       tc.CACHE_TYPE_AGENT_TOOLS):
                k.append(tc.cache_key(t, dt, a))
        for a, conv in (("a1", "c1"), ("a1", "c2"), ("a10", "c3"),
                        ("a2", "c9"), ("a2", "c8"), (None, "c7")):
            k.append(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION, conv,
                                  agent_id=a, conversation_id=conv))
            k.append(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION_MEMORY, conv,
                                  agent_id=a, conversation_id=conv))
            k.append(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION_MESSAGES_LIST,
                                  conv, agent_id=a, conversation_id=conv))
            for m in ("m1", "m2"):
                k.append(tc.cache_key(t, tc.CACHE_TYPE_CONVERSATION_MESSAGE,
                                      m, agent_id=a, conversation_id=conv))
        k.append(tc.cache_key(t, tc.CACHE_TYPE_AGENT_EXECUTION_STATE, "e1",
                              agent_id="a1"))
        k.append(tc.cache_key(t, tc.CACHE_TYPE_AGENT_EXECUTION_STATE, "e2",
                              agent_id="a1"))
        for coll, d in (("l1", "d1"), ("l1", "d2"), ("l2", "d3")):
            k.append(tc.cache_key(t, tc.CACHE_TYPE_DOCUMENT, d,
                                  collection_id=coll))
        for q in ("q1", "q2"):
            k.append(tc.cache_key(t, tc.CACHE_TYPE_QUERY_RESULT, q))
        k.append(tc.cache_key(t, tc.CACHE_TYPE_COLLECTION_METADATA, "l1"))
    return sorted(k)


# (how it is called, the invalidation it stands for)
INVALIDATIONS = [
    ("CacheManager.invalidate", dict(
        tenant_id="t1", data_type=tc.CACHE_TYPE_AGENT_EXECUTION_STATE,
        resource_id="e1", agent_id="a1")),
    ("CacheManager.invalidate", dict(
        tenant_id="t1", data_type=tc.CACHE_TYPE_DOCUMENT, resource_id="*",
        collection_id="l1")),
    ("CacheManager.invalidate_sync", dict(
        tenant_id="t1", data_type=tc.CACHE_TYPE_QUERY_RESULT,
        resource_id="*")),
    ("invalidate_agent_cache_cascade", dict(
        tenant_id="t1", agent_id="a1", invalidate_conversations=True)),
    ("invalidate_agent_cache_cascade_sync", dict(
        tenant_id="t1", agent_id="a2", invalidate_conversations=False)),
    ("invalidate_conversation_cache_cascade", dict(
        tenant_id="t1", conversation_id="c9", agent_id="a2")),
    ("invalidate_conversation_cache_cascade_sync", dict(
        tenant_id="t1", conversation_id="c7")),
    ("CacheManager.invalidate", dict(
        tenant_id="t1", data_type=tc.CACHE_TYPE_AGENT, resource_id="a10")),
]


def as_event(how, kw):
    """The invalidation fields a call stands for."""
    if how.startswith("invalidate_agent"):
        return dict(tenant_id=kw["tenant_id"], data_type="agent",
                    resource_id=kw["agent_id"], cascade=True,
                    invalidate_conversations=kw["invalidate_conversations"])
    if how.startswith("invalidate_conversation"):
        return dict(tenant_id=kw["tenant_id"], data_type="conversation",
                    resource_id=kw["conversation_id"],
                    conversation_id=kw["conversation_id"],
                    agent_id=kw.get("agent_id"), cascade=True)
    return kw


def mode_inv_seed(out):
    write_lines(os.path.join(out, "inv.seed"), seed_keys())


def mode_inv_send(out):
    tc.configure(spool=os.path.join(out, "inv.spool"))
    ids = []

    async def main():
        for how, kw in INVALIDATIONS:
            if how.startswith("CacheManager."):
                fn = getattr(tc.CacheManager, how.split(".")[1])
            else:
                fn = getattr(tc, how)
            r = fn(**kw)
            ids.append(await r if asyncio.iscoroutine(r) else r)
    asyncio.run(main())
    if tc.flush(60) or tc.stats()["delivered"] != len(INVALIDATIONS):
        fail("invalidations not delivered: %s" % tc.stats())
    with open(os.path.join(out, "inv.ids"), "w") as f:
        json.dump(ids, f)


def mode_inv_check(out, notices_path, keys_path):
    seed = seed_keys()
    ids = json.load(open(os.path.join(out, "inv.ids")))
    remaining = set(seed)
    expected = {}
    for (how, kw), eid in zip(INVALIDATIONS, ids):
        t = tc.cache_targets(**as_event(how, kw))
        gone = {k for k in remaining if k in t.keys or
                any(k.startswith(p) for p in t.prefixes)}
        remaining -= gone
        expected[eid] = (how, t, len(gone))
    now = set(open(keys_path).read().split())
    if now != remaining:
        fail("keys in Redis: missing %s, extra %s"
             % (sorted(remaining - now)[:10], sorted(now - remaining)[:10]))
    # Hand-checked facts, independent of cache_targets():
    for t in ("t2", "t10"):
        mine = [k for k in seed if k.startswith("cache:{%s}:" % t)]
        if not set(mine) <= now:
            fail("tenant %s lost keys: %s" % (t, sorted(set(mine) - now)))
    for k in ("cache:{t1}:agent_config:a10", "cache:{t1}:agent_tools:a10",
              "cache:{t1}:conversation:agent=a10:conv=c3:c3",
              "cache:{t1}:conversation_message:agent=a2:conv=c8:m1",
              "cache:{t1}:document:coll=l2:d3",
              "cache:{t1}:agent_execution_state:agent=a1:e2"):
        if k not in now:
            fail("%s should have survived" % k)
    for k in ("cache:{t1}:agent:a1", "cache:{t1}:agent_tools:a2",
              "cache:{t1}:conversation_memory:agent=a1:conv=c2:c2",
              "cache:{t1}:conversation_message:agent=a2:conv=c9:m2",
              "cache:{t1}:conversation_messages_list:conv=c7:c7",
              "cache:{t1}:document:coll=l1:d2", "cache:{t1}:query_result:q1",
              "cache:{t1}:agent:a10"):
        if k in now:
            fail("%s should have been deleted" % k)
    raw = open(notices_path, "rb").read().split(b"\n")
    notes = [json.loads(raw[i + 2]) for i in range(len(raw) - 2)
             if raw[i] == b"message" and raw[i + 1] == b"cache:invalidations"]
    if len(notes) != len(INVALIDATIONS):
        fail("%d notices for %d invalidations" % (len(notes),
                                                  len(INVALIDATIONS)))
    for n in notes:
        how, t, deleted = expected.get(n.get("event_id"), (None, None, None))
        if how is None:
            fail("notice with an unknown event_id: %r" % n)
        if (n["tenant_id"] != "t1" or sorted(n["keys"]) != sorted(t.keys) or
                sorted(n["prefixes"]) != sorted(t.prefixes) or
                n["deleted"] != deleted):
            fail("%s: notice %r, expected keys %s prefixes %s deleted %d"
                 % (how, n, t.keys, t.prefixes, deleted))
        print("    %-42s deleted %2d  %s" % (how, deleted, " ".join(
            list(t.keys) + [p + "*" for p in t.prefixes])))
    print("    %d keys seeded, %d deleted, t2 and t10 untouched"
          % (len(seed), len(seed) - len(now)))


MODES = {"usage": mode_usage, "unreachable": mode_unreachable,
         "fallback": mode_fallback, "inv-seed": mode_inv_seed,
         "inv-send": mode_inv_send, "inv-check": mode_inv_check}


def main():
    import logging
    logging.basicConfig(level=os.environ.get("CLIENT_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(message)s")
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        fail("usage: client_drive.py %s ARGS..." % "|".join(MODES))
    MODES[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
