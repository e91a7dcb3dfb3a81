"""Unit tests of scripts/tally_client.py (no stack needed).

- The key layout against the vectors that pin the C code
  (schemas/examples/cache-invalidation/*/targets), the contract's three
  examples among them.
- The call-time validation against the same fixtures the C parsers are
  judged by (both kinds): every case the Python API can express is
  accepted or refused as the worker does.
- Deterministic payloads: a re-call with the same key sends the same bytes.
- Fire-and-forget with an unreachable broker: calls return at once, and
  the events end in the spool (after a delivery timeout, and at exit).

Run: /usr/bin/python3 -m unittest discover -s tests/python -v
"""
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tally_client as tc  # noqa: E402
from client_drive import closed_port  # noqa: E402

EXAMPLES = os.path.join(ROOT, "schemas", "examples")
# tests/unit/case_ctx.h: 2026-01-15T12:00:00Z, window 35 days
CASE_NOW_US = 1768478400000000

INVALIDATION_FIELDS = ("tenant_id", "data_type", "resource_id", "agent_id",
                       "conversation_id", "collection_id", "cascade",
                       "invalidate_conversations", "event_id")
USAGE_FIELDS = ("tenant_id", "tokens", "model", "token_type", "operation",
                "idempotency_key", "metadata", "agent_id", "conversation_id",
                "collection_id", "owner_tenant_id", "prompt_tokens",
                "completion_tokens", "thoughts_tokens", "cached_tokens",
                "occurred_at")

# Reasons about the bytes of the message, not about a field's value: the
# Python API builds the bytes itself, so they cannot arise from a call.
BYTE_LEVEL = {"invalid_json", "invalid_utf8", "duplicate_member",
              "not_object", "too_large"}

# Fixture cases that a call cannot express, with why (none today: metadata
# is limited on its bytes as sent, and the client sends its own compact
# serialization, which the escaped and whitespace cases happen to agree
# with).
NOT_EXPRESSIBLE = {}


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def cases(kind):
    d = os.path.join(EXAMPLES, kind)
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        if not os.path.isfile(os.path.join(path, "input.json")):
            continue
        expected = read(os.path.join(path, "expected")).strip()
        ctx = {}
        if os.path.exists(os.path.join(path, "ctx")):
            for line in read(os.path.join(path, "ctx")).splitlines():
                if line.strip():
                    k, _, v = line.partition("=")
                    ctx[k] = v
        yield name, path, expected, ctx


def strict_load(raw):
    """The input as Python sees it, or None when the JSON itself is not
    something json.loads accepts strictly (duplicates, NaN, bad UTF-8)."""
    def pairs(items):
        names = [k for k, _ in items]
        if len(names) != len(set(names)):
            raise ValueError("duplicate")
        return dict(items)

    def no_constant(c):
        raise ValueError(c)
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs,
                          parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


class KeyVectors(unittest.TestCase):
    """cache_targets() against every targets file, in order."""

    def test_targets_files(self):
        n = 0
        for name, path, expected, ctx in cases("cache-invalidation"):
            if expected != "ok":
                continue
            with self.subTest(case=name):
                ev = strict_load(read(os.path.join(path, "input.json"),
                                      "rb"))
                self.assertIsNotNone(ev)
                args = {k: ev.get(k) for k in INVALIDATION_FIELDS
                        if ev.get(k) is not None}
                t = tc.cache_targets(prefix=ctx.get("prefix", "cache"),
                                     **args)
                want = [tuple(line.split(" ", 1)) for line in
                        read(os.path.join(path, "targets"))
                        .splitlines() if line.strip()]
                self.assertEqual([tuple(i) for i in t.items], want)
                self.assertEqual(list(t.keys),
                                 [s for k, s in want if k == "key"])
                self.assertEqual(list(t.prefixes),
                                 [s for k, s in want if k == "prefix"])
                # cache_key / cache_prefix give the event's own target
                kind, own = want[0]
                scope = {k: args.get(k) for k in ("agent_id",
                         "conversation_id", "collection_id")}
                if kind == "key":
                    self.assertEqual(tc.cache_key(
                        args["tenant_id"], args["data_type"],
                        args["resource_id"], prefix=ctx.get("prefix"),
                        **scope), own)
                else:
                    self.assertEqual(tc.cache_prefix(
                        args["tenant_id"], args["data_type"],
                        prefix=ctx.get("prefix"), **scope), own)
                n += 1
        self.assertGreater(n, 40)

    def test_contract_examples_are_vectors(self):
        """CONTRACT.md's three example keys, byte for byte, each the
        target of a vector."""
        targets = set()
        for name, path, expected, ctx in cases("cache-invalidation"):
            if expected == "ok" and "prefix" not in ctx:
                targets.update(read(os.path.join(path, "targets"))
                               .splitlines())
        for key in ("cache:{t1}:agent:a1",
                    "cache:{t1}:conversation_memory:agent=a1:conv=c9:c9",
                    "cache:{t1}:conversation_message:agent=a1:conv=c9:m42"):
            self.assertIn("key " + key, targets)
        self.assertEqual(tc.cache_key("t1", tc.CACHE_TYPE_AGENT, "a1"),
                         "cache:{t1}:agent:a1")
        self.assertEqual(tc.cache_key("t1", tc.CACHE_TYPE_CONVERSATION_MEMORY,
                                      "c9", agent_id="a1",
                                      conversation_id="c9"),
                         "cache:{t1}:conversation_memory:agent=a1:conv=c9:c9")
        self.assertEqual(tc.cache_key("t1", tc.CACHE_TYPE_CONVERSATION_MESSAGE,
                                      "m42", agent_id="a1",
                                      conversation_id="c9"),
                         "cache:{t1}:conversation_message:agent=a1:conv=c9:m42")

    def test_refuses_ids_outside_the_pattern(self):
        for bad in ("", "a:b", "{t}", "a*", "a?", "a[1]", "a b", "é",
                    "x" * 129, "a\\b", None, 7):
            with self.assertRaises(ValueError) as cm:
                tc.cache_key(bad, "agent", "a1")
            self.assertIn("tenant_id", str(cm.exception))
            if bad is not None:
                with self.assertRaises(ValueError):
                    tc.cache_key("t1", "agent", bad)
                with self.assertRaises(ValueError) as cm:
                    tc.cache_prefix("t1", "agent", agent_id=bad)
                self.assertIn("agent_id", str(cm.exception))
        for bad in ("Agent", "a-b", "a:b", "", "x" * 65):
            with self.assertRaises(ValueError) as cm:
                tc.cache_key("t1", bad, "a1")
            self.assertIn("data_type", str(cm.exception))
        with self.assertRaises(ValueError):
            tc.cache_key("t1", "agent", "*")
        with self.assertRaises(ValueError):
            tc.cache_targets("t1", "agent", "*", cascade=True)

    def test_glob(self):
        self.assertEqual(tc.cache_glob("c*?[x]\\:{t1}:document:"),
                         "c\\*\\?\\[x\\]\\\\:{t1}:document:*")

    def test_constants(self):
        self.assertEqual(tc.CACHE_TYPE_CONVERSATION_MESSAGES_LIST,
                         "conversation_messages_list")
        self.assertEqual(len([n for n in dir(tc)
                              if n.startswith("CACHE_TYPE_")]), 11)


class Validation(unittest.TestCase):
    """The calls accept and refuse what the worker's parsers do."""

    def run_kind(self, kind, fields, check):
        compared = skipped = 0
        for name, path, expected, ctx in cases(kind):
            key = "%s/%s" % (kind, name)
            ev = strict_load(read(os.path.join(path, "input.json"),
                                  "rb"))
            if (key in NOT_EXPRESSIBLE or expected in BYTE_LEVEL or
                    ev is None or not isinstance(ev, dict) or
                    "schema_version" in ev and expected != "ok" or
                    "kafka_timestamp_ms" in ctx or
                    "max_message_bytes" in ctx or
                    (expected != "ok" and set(ev) - set(fields) -
                     {"schema_version"})):
                skipped += 1
                continue
            args = {k: ev[k] for k in fields if ev.get(k) is not None}
            with self.subTest(case=key, expected=expected):
                if expected == "ok":
                    check(args, ctx)
                else:
                    with self.assertRaises(ValueError):
                        check(args, ctx)
            compared += 1
        return compared, skipped

    def test_invalidation_fixtures(self):
        def check(args, ctx):
            tc.invalidation_event(**args)
        compared, _ = self.run_kind("cache-invalidation",
                                    INVALIDATION_FIELDS, check)
        self.assertGreater(compared, 80)

    def test_usage_fixtures(self):
        def check(args, ctx):
            now = CASE_NOW_US
            if "now" in ctx:
                now = tc._parse_rfc3339("now", ctx["now"])
            tt, op = list(tc.TOKEN_TYPES), list(tc.OPERATIONS)
            if "add_token_type" in ctx:
                tt.append(ctx["add_token_type"])
            if "add_operation" in ctx:
                op.append(ctx["add_operation"])
            tc.usage_event(now_us=now, token_types=tt, operations=op,
                           dedupe_days=int(ctx.get("dedupe_days", 35)),
                           **args)
        compared, _ = self.run_kind("token-usage", USAGE_FIELDS, check)
        self.assertGreater(compared, 90)

    def test_errors_name_the_field(self):
        good = dict(tenant_id="t1", tokens=5, token_type=tc.TOKEN_TYPE_LLM,
                    operation=tc.OPERATION_CHAT)
        bad = [
            ("tenant_id", dict(tenant_id="a b")),
            ("tenant_id", dict(tenant_id=None)),
            ("tokens", dict(tokens=-1)),
            ("tokens", dict(tokens=True)),
            ("tokens", dict(tokens=1.0)),
            ("tokens", dict(tokens="12")),
            ("tokens", dict(tokens=10 ** 12 + 1)),
            ("token_type", dict(token_type="LLM")),
            ("operation", dict(operation="search")),
            ("model", dict(model="")),
            ("model", dict(model="a\nb")),
            ("model", dict(model="x" * 129)),
            ("idempotency_key", dict(idempotency_key="kafka:x")),
            ("idempotency_key", dict(idempotency_key="k" * 513)),
            ("agent_id", dict(agent_id="a:1")),
            ("owner_tenant_id", dict(owner_tenant_id="")),
            ("cached_tokens", dict(cached_tokens=-5)),
            ("occurred_at", dict(occurred_at="2026-01-15 12:00:00Z")),
            ("occurred_at", dict(occurred_at="2000-01-01T00:00:00Z")),
            ("occurred_at", dict(occurred_at=__import__("datetime")
                                 .datetime(2026, 1, 1))),
            ("metadata", dict(metadata=[1])),
            ("metadata", dict(metadata={"a": float("nan")})),
            ("metadata", dict(metadata={"a": "x" * 9000})),
            ("metadata", dict(metadata={1: "x"})),
            ("metadata", dict(metadata={"a": "\x00"})),
            ("metadata", dict(metadata={"a": object()})),
        ]
        for field, change in bad:
            with self.subTest(field=field, change=repr(change)[:60]):
                with self.assertRaises(ValueError) as cm:
                    tc.usage_event(**dict(good, **change))
                self.assertTrue(str(cm.exception).startswith(field + ":"),
                                str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            tc.invalidation_event(tenant_id="t1", data_type="agent",
                                  resource_id="a1", cascade="yes")
        self.assertTrue(str(cm.exception).startswith("cascade:"))
        with self.assertRaises(ValueError) as cm:
            tc.invalidation_event(tenant_id="t1", data_type="agent",
                                  resource_id="*", cascade=True)
        self.assertTrue(str(cm.exception).startswith("cascade:"))


class Capture(tc.Client):
    """A client that records what it would send."""

    def __init__(self, **kw):
        super().__init__(register_exit=False, **kw)
        self.sent = []

    def _send(self, pending, topic):
        self.sent.append((topic, pending.tenant, pending.value))


class Payloads(unittest.TestCase):

    def test_recall_sends_identical_bytes(self):
        c = Capture()
        call = dict(tenant_id="t1", tokens=10, model="m",
                    token_type=tc.TOKEN_TYPE_LLM,
                    operation=tc.OPERATION_QUERY, idempotency_key="req-1",
                    metadata={"b": 1, "a": {"y": [1, 2], "x": "é"}},
                    agent_id="a1", conversation_id="c1", collection_id="l1",
                    owner_tenant_id="t0", prompt_tokens=4,
                    completion_tokens=6)
        c.track(**call)
        time.sleep(0.01)
        c.track(**dict(call, metadata={"a": {"x": "é", "y": [1, 2]},
                                       "b": 1}))
        self.assertEqual(c.sent[0], c.sent[1])
        topic, key, value = c.sent[0]
        self.assertEqual((topic, key), ("token-usage", "t1"))
        ev = json.loads(value)
        self.assertEqual(ev["idempotency_key"], "req-1")
        self.assertRegex(ev["occurred_at"],
                         r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertEqual(list(ev)[-1], "metadata")
        # without a key, each call is a new event with its own key
        k1 = c.track(tenant_id="t1", tokens=1, token_type="llm",
                     operation="chat")
        k2 = c.track(tenant_id="t1", tokens=1, token_type="llm",
                     operation="chat")
        self.assertNotEqual(k1, k2)
        self.assertTrue(k1.startswith("py:"))

    def test_invalidation_payload(self):
        c = Capture()
        eid = c.invalidate(tenant_id="t1", data_type="agent",
                           resource_id="a1", cascade=True,
                           invalidate_conversations=True)
        topic, key, value = c.sent[0]
        self.assertEqual((topic, key), ("cache-invalidation", "t1"))
        self.assertEqual(json.loads(value), {
            "tenant_id": "t1", "data_type": "agent", "resource_id": "a1",
            "cascade": True, "invalidate_conversations": True,
            "event_id": eid})


class Unreachable(unittest.TestCase):
    """Fire and forget with nothing listening at the brokers' address."""

    def test_calls_return_at_once_then_spool(self):
        with tempfile.TemporaryDirectory() as d:
            spool = os.path.join(d, "spool.jsonl")
            c = tc.Client(brokers="127.0.0.1:%d" % closed_port(),
                          spool=spool, pg_dsn="", message_timeout_ms=1500,
                          register_exit=False)
            times = []
            for i in range(2000):
                t0 = time.perf_counter()
                c.track(tenant_id="t1", tokens=i, token_type="llm",
                        operation="chat", idempotency_key="k%d" % i)
                times.append(time.perf_counter() - t0)
            asyncio.run(self._async_calls())  # the default client, spooled
            med = statistics.median(times)
            print("\n    2000 calls, broker unreachable: median %.1f us, "
                  "max %.1f ms" % (med * 1e6, max(times) * 1e3))
            self.assertLess(med, 0.002)
            self.assertEqual(c.flush(60), 0)
            s = c.stats()
            self.assertEqual((s["sent"], s["failed"], s["spooled"]),
                             (2000, 2000, 2000), s)
            lines = read(spool, "rb").splitlines()
            self.assertEqual(sorted(json.loads(l)["idempotency_key"]
                                    for l in lines),
                             sorted("k%d" % i for i in range(2000)))
            c.close()

    async def _async_calls(self):
        with tempfile.TemporaryDirectory() as d:
            tc.configure(brokers="127.0.0.1:%d" % closed_port(),
                         spool=os.path.join(d, "s"), pg_dsn="",
                         message_timeout_ms=500, register_exit=False)
            await tc.track_token_usage(tenant_id="t1", tokens=1,
                                       token_type=tc.TOKEN_TYPE_LLM,
                                       operation=tc.OPERATION_CHAT)
            await tc.CacheManager.invalidate(tenant_id="t1",
                                             data_type="agent",
                                             resource_id="a1")
            await tc.invalidate_agent_cache_cascade(tenant_id="t1",
                                                    agent_id="a1")
            await tc.invalidate_conversation_cache_cascade(
                tenant_id="t1", conversation_id="c1", agent_id="a1")
            with self.assertRaises(ValueError):
                await tc.track_token_usage(tenant_id="t 1", tokens=1,
                                           token_type="llm",
                                           operation="chat")
            tc.flush(30)
            s = tc.stats()
            tc.shutdown()
            self.assertEqual(s["spooled"], 4, s)
            self.assertEqual(len(read(os.path.join(d, "s")).splitlines()), 1)
            self.assertEqual(len(read(os.path.join(d, "s.invalidation")).splitlines()), 3)

    def test_exit_hook_spools_within_its_bound(self):
        with tempfile.TemporaryDirectory() as d:
            code = (
                "import sys; sys.path.insert(0, %r)\n"
                "import tally_client as tc\n"
                "tc.configure(exit_timeout=1.0, message_timeout_ms=300000)\n"
                "for i in range(500):\n"
                "    tc.track_token_usage_sync(tenant_id='t1', tokens=i,\n"
                "        token_type='llm', operation='chat',\n"
                "        idempotency_key='x%%d' %% i)\n"
                "tc.CacheManager.invalidate_sync(tenant_id='t1',\n"
                "    data_type='agent', resource_id='a1')\n"
                % os.path.join(ROOT, "scripts"))
            env = dict(os.environ,
                       TALLY_BROKERS="127.0.0.1:%d" % closed_port(),
                       TALLY_SPOOL=os.path.join(d, "spool"), TALLY_PG_DSN="")
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", code], env=env, check=True,
                           timeout=60)
            took = time.monotonic() - t0
            self.assertLess(took, 20)
            self.assertEqual(len(read(os.path.join(d, "spool")).splitlines()), 500)
            self.assertEqual(len(read(os.path.join(d, "spool.invalidation")).splitlines()), 1)


if __name__ == "__main__":
    unittest.main()
