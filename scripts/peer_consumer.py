#!/usr/bin/python3
"""A batched Python consumer doing tally's exactly-once work: the peer that
scripts/bench.sh measures tally against (issue 9).

Written the way a careful Python team would write it (confluent-kafka,
psycopg2), not a strawman:

- A consumer group of its own (--group), enable.auto.commit=false.
  Positions live in Postgres (<schema>.consumer_offsets): on assignment the
  member claims its partitions (bumps an epoch, reads the stored position)
  and seeks there; no stored position: the earliest offset.
- Every message is validated against the contract's rules (required
  fields, JSON types, integers 0..10^12 with no fraction or exponent, ids,
  enums read from Postgres, strict RFC 3339 occurred_at inside the dedupe
  window, schema_version, reserved keys, duplicate members, size limits).
  Rejected messages are counted by reason and skipped, or dead-lettered to
  --dlq-topic with the contract's headers (acknowledged before the batch
  commits) when that flag is given.
- Batches of --batch-size messages or --batch-ms, deduplicated in memory by
  (tenant_id, idempotency_key), first wins. Then ONE transaction: the
  partitions' next offsets (only where our epoch still holds: fencing),
  the batch's events into <schema>.token_usage_events (every field, as
  tally stores them) with ON CONFLICT DO NOTHING RETURNING, the newly
  inserted ones summed in Python per day and per month, both upserted
  (execute_values, ON CONFLICT DO UPDATE SET x = t.x + excluded.x), all in
  sorted order; COMMIT. Then the offsets go to the Kafka group too, for
  lag tools.
- Session settings as tally's (worker/src/usage_store.c): UTC,
  statement/lock/idle timeouts, synchronous_commit = off (safe for the
  same reason: positions commit with the sums).
- One batch commits in a thread (psycopg2 releases the GIL while it
  waits for Postgres) while the next is consumed and validated, as
  tally's committer thread does; --no-pipeline commits in the consuming
  thread. Rebalances wait for it; the open batch commits on revocation.
- A failed batch is rolled back, the open one dropped, and the partitions
  rewound to the stored positions, then consumed again after 1 s.
- librdkafka's consumer defaults otherwise (its pre-fetch queue is what
  most of the peak RSS is); -X passes any property.

Not done (tally does): payload-conflict reporting, pruning past the
window, bisecting a batch Postgres refuses for its data, refusing -X
properties the guarantees rest on. Metadata is limited to 8 KiB as
re-serialised (compact) and stored so, not byte for byte as it appeared.

--until-end stops once every partition of the topic is committed up to
the end offset seen at start (meant for a group of one); SIGTERM/SIGINT
finish and commit the open batch, then stop. At the end it prints
messages/s from the first message consumed to the last commit, and its
peak RSS (VmHWM).
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import re
import signal
import sys
import time

from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE,
                             Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
import psycopg2
from psycopg2.extras import execute_values

TOKENS_MAX = 10**12
ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}", re.ASCII)
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
TS_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})"
                   r"(?:\.(\d+))?(?:Z|([+-])(\d{2}):(\d{2}))", re.ASCII)
MAX_DEPTH = 32
METADATA_MAX = 8192
KEY_MAX = 512
MODEL_MAX = 128
FUTURE_LIMIT_US = 3600 * 10**6
DAY_US = 86400 * 10**6
EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
EVENT_COLUMNS = ("tenant_id, idempotency_key, occurred_at, token_type,"
                 " operation, model, agent_id, conversation_id,"
                 " collection_id, owner_tenant_id, tokens, prompt_tokens,"
                 " completion_tokens, thoughts_tokens, cached_tokens,"
                 " metadata, source")
SUMS = ("tokens", "prompt_tokens", "completion_tokens", "thoughts_tokens",
        "cached_tokens", "events")


def log(msg):
    now = datetime.datetime.now(datetime.timezone.utc)
    print("%s.%03dZ peer: %s" % (now.strftime("%Y-%m-%dT%H:%M:%S"),
                                 now.microsecond // 1000, msg),
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------------
# Validation

class Rejected(Exception):
    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class DuplicateMember(Exception):
    pass


class Fenced(Exception):
    """Another member claimed one of the batch's partitions."""


def _object(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise DuplicateMember(next(k for i, (k, _) in enumerate(pairs)
                                   if k in dict(pairs[:i])))
    return d


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


# One decoder for every message (json.loads with arguments builds one a
# call). NaN and Infinity are Python's extensions, not JSON.
DECODER = json.JSONDecoder(object_pairs_hook=_object,
                           parse_constant=_no_constant)


def _depth(v):
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


def _has_nul(v):
    if isinstance(v, str):
        return "\x00" in v
    if isinstance(v, dict):
        return any(_has_nul(k) or _has_nul(x) for k, x in v.items())
    if isinstance(v, list):
        return any(map(_has_nul, v))
    return False


def _nbytes(s):
    return len(s) if s.isascii() else len(s.encode())


def _day_of(y, m, d, cache={}):
    """Days since 1970-01-01, or None for a date that does not exist."""
    k = (y, m, d)
    days = cache.get(k, False)
    if days is False:
        try:
            days = datetime.date(y, m, d).toordinal() - EPOCH_ORDINAL
        except ValueError:
            days = None
        cache[k] = days
    return days


def parse_rfc3339_us(s):
    """Microseconds since the epoch, or None if s is not strict RFC 3339."""
    m = TS_RE.fullmatch(s)
    if not m:
        return None
    y, mo, d, h, mi, sec, frac, sign, oh, om = m.groups()
    days = _day_of(int(y), int(mo), int(d))
    h, mi, sec = int(h), int(mi), int(sec)
    if days is None or h > 23 or mi > 59 or sec > 59:
        return None
    off = 0
    if sign:
        oh, om = int(oh), int(om)
        if oh > 23 or om > 59:
            return None
        off = (oh * 60 + om) * 60 * (1 if sign == "+" else -1)
    us = (days * 86400 + h * 3600 + mi * 60 + sec - off) * 10**6
    if frac:
        us += int(frac[:6].ljust(6, "0"))
    return us


class Validator:
    """The contract's rules for one token-usage message."""

    def __init__(self, args, token_types, operations):
        self.topic = args.topic
        self.max_bytes = args.max_message_bytes
        self.window_us = args.dedupe_days * DAY_US
        self.token_types = token_types
        self.operations = operations

    def _id(self, doc, name, required):
        v = doc.get(name)
        if v is None:
            if required:
                raise Rejected("missing_field", "%s: required" % name)
            return None
        if type(v) is not str:
            raise Rejected("wrong_type", "%s: must be a string" % name)
        if not ID_RE.fullmatch(v):
            raise Rejected("invalid_id", "%s: not an id: %.64r" % (name, v))
        return v

    @staticmethod
    def _count(doc, name, required):
        v = doc.get(name)
        if v is None:
            if required:
                raise Rejected("missing_field", "%s: required" % name)
            return 0
        if type(v) is not int:  # bool, float (1.0, 1e3) and str refused
            raise Rejected("wrong_type",
                           "%s: must be a JSON integer 0..10^12" % name)
        if not 0 <= v <= TOKENS_MAX:
            raise Rejected("out_of_range",
                           "%s: must be an integer 0..10^12" % name)
        return v

    @staticmethod
    def _text(doc, name, max_bytes):
        v = doc.get(name)
        if v is None:
            return None
        if type(v) is not str:
            raise Rejected("wrong_type", "%s: must be a string" % name)
        if not 1 <= _nbytes(v) <= max_bytes or CONTROL_RE.search(v):
            raise Rejected("invalid_string",
                           "%s: 1..%d bytes, no control characters"
                           % (name, max_bytes))
        return v

    def _enum(self, doc, name, values):
        v = doc.get(name)
        if v is None:
            raise Rejected("missing_field", "%s: required" % name)
        if type(v) is not str:
            raise Rejected("wrong_type", "%s: must be a string" % name)
        if v not in values:
            raise Rejected("unknown_enum",
                           "%s: unknown value %.64r" % (name, v))
        return v

    def _occurred_at_us(self, doc, ts_ms, now_us):
        v = doc.get("occurred_at")
        if v is None:
            at = now_us if ts_ms is None else ts_ms * 1000
        elif type(v) is not str:
            raise Rejected("wrong_type", "occurred_at: must be a string")
        else:
            at = parse_rfc3339_us(v)
            if at is None:
                raise Rejected("invalid_timestamp",
                               "occurred_at: not RFC 3339: %.64r" % v)
        if at < now_us - self.window_us:
            raise Rejected("too_old", "occurred_at: before the dedupe window")
        if at > now_us + FUTURE_LIMIT_US:
            raise Rejected("too_far_future", "occurred_at: more than 1 h ahead")
        return at

    def parse(self, value, partition, offset, ts_ms, now_us):
        """(row for the events table, UTC day number) or raises Rejected."""
        if value is None:
            raise Rejected("invalid_json", "no value")
        if len(value) > self.max_bytes:
            raise Rejected("too_large", "%d bytes, at most %d"
                           % (len(value), self.max_bytes))
        try:
            text = value.decode("utf-8")
            doc = DECODER.decode(text)
        except UnicodeDecodeError as e:
            raise Rejected("invalid_utf8", str(e)) from None
        except DuplicateMember as e:
            raise Rejected("duplicate_member",
                           "member %r twice" % e.args[0]) from None
        except (ValueError, RecursionError) as e:
            raise Rejected("invalid_json", str(e)) from None
        if type(doc) is not dict:
            raise Rejected("not_object", "not a JSON object")
        if text.count("{") + text.count("[") > MAX_DEPTH and \
                _depth(doc) > MAX_DEPTH:
            raise Rejected("too_deep", "nested deeper than %d" % MAX_DEPTH)
        if "\\u0000" in text and _has_nul(doc):
            raise Rejected("nul_character", "U+0000 in a string")
        sv = doc.get("schema_version")
        if sv is not None and (type(sv) is not int or sv != 1):
            raise Rejected("unsupported_schema_version",
                           "schema_version: only 1 is known")
        tenant = self._id(doc, "tenant_id", True)
        key = self._text(doc, "idempotency_key", KEY_MAX)
        if key is None:
            key = "kafka:%s:%d:%d" % (self.topic, partition, offset)
        elif key.startswith("kafka:"):
            raise Rejected("reserved_key", "idempotency_key: kafka: is "
                           "reserved for the implicit key")
        tokens = self._count(doc, "tokens", True)
        token_type = self._enum(doc, "token_type", self.token_types)
        operation = self._enum(doc, "operation", self.operations)
        model = self._text(doc, "model", MODEL_MAX) or ""
        agent = self._id(doc, "agent_id", False)
        conversation = self._id(doc, "conversation_id", False)
        collection = self._id(doc, "collection_id", False)
        owner = self._id(doc, "owner_tenant_id", False)
        count = self._count
        prompt = count(doc, "prompt_tokens", False)
        completion = count(doc, "completion_tokens", False)
        thoughts = count(doc, "thoughts_tokens", False)
        cached = count(doc, "cached_tokens", False)
        at_us = self._occurred_at_us(doc, ts_ms, now_us)
        md = doc.get("metadata")
        if md is not None:
            if type(md) is not dict:
                raise Rejected("wrong_type", "metadata: must be an object")
            md = json.dumps(md, ensure_ascii=False, separators=(",", ":"))
            if _nbytes(md) > METADATA_MAX:
                raise Rejected("metadata_too_large",
                               "metadata: more than %d bytes" % METADATA_MAX)
        occurred_at = doc.get("occurred_at") or datetime.datetime.fromtimestamp(
            at_us / 1e6, datetime.timezone.utc)
        row = (tenant, key, occurred_at, token_type, operation, model, agent,
               conversation, collection, owner, tokens, prompt, completion,
               thoughts, cached, md,
               "%s/%d/%d" % (self.topic, partition, offset))
        return row, at_us // DAY_US


# ---------------------------------------------------------------------
# Postgres

# The peer's tables are tally's (sql/001_schema.sql: the sums, the events
# with every field, the positions), in the peer's schema.
SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           os.pardir, "sql", "001_schema.sql")

SESSION_SQL = ("SET client_min_messages = warning;"
               "SET statement_timeout = '120s';"
               "SET lock_timeout = '15s';"
               "SET idle_in_transaction_session_timeout = '30s';"
               "SET TIME ZONE 'UTC';"
               # As tally: positions commit in the same transaction as
               # the sums, so a commit lost in a crash is consumed again.
               "SET synchronous_commit = off")

SUMS_TEMPLATE = "(%s)" % ", ".join(["%s"] * 12 + ["now()"])
SUMS_UPDATE = ", ".join("%s = t.%s + excluded.%s" % (c, c, c) for c in SUMS)


def upsert_sums_sql(s, period):
    col = {"daily": "day", "monthly": "month"}[period]
    return ("INSERT INTO {s}.token_usage_{p} AS t (tenant_id, {c},"
            " token_type, operation, model, agent_id, {sums}, updated_at)"
            " VALUES %s ON CONFLICT (tenant_id, {c}, token_type, operation,"
            " model, agent_id) DO UPDATE SET {upd}, updated_at = now()"
            ).format(s=s, p=period, c=col, sums=", ".join(SUMS),
                     upd=SUMS_UPDATE)


class Store:
    def __init__(self, args):
        self.dsn = args.pg_dsn
        self.s = args.schema
        self.group = args.group
        self.topic = args.topic
        self.owner = "%s/%d" % (os.uname().nodename, os.getpid())
        self.conn = None
        self.insert_events_sql = (
            "INSERT INTO %s.token_usage_events (%s) VALUES %%s"
            " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
            " RETURNING tenant_id, idempotency_key" % (self.s, EVENT_COLUMNS))
        self.daily_sql = upsert_sums_sql(self.s, "daily")
        self.monthly_sql = upsert_sums_sql(self.s, "monthly")
        self.advance_sql = (
            "UPDATE %s.consumer_offsets o SET next_offset = v.n,"
            " updated_at = now()"
            " FROM unnest(%%s::int[], %%s::bigint[], %%s::bigint[])"
            " AS v(p, n, e) WHERE o.group_id = %%s AND o.topic = %%s"
            " AND o.partition = v.p AND o.epoch = v.e" % self.s)

    def connect(self):
        if self.conn is not None and not self.conn.closed:
            return
        self.conn = psycopg2.connect(self.dsn, application_name="tally-peer",
                                     connect_timeout=10)
        with self.conn.cursor() as cur:
            cur.execute(SESSION_SQL)
        self.conn.commit()

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def reset(self):
        """After a failure: roll back, or drop a broken connection."""
        try:
            self.conn.rollback()
        except psycopg2.Error:
            self.close()

    def migrate(self):
        """Creates the schema with tally's tables unless it exists."""
        with open(SCHEMA_FILE) as f:
            ddl = re.sub(r"\btally\.", self.s + ".", f.read())
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                        ("tally-peer-schema:" + self.s,))
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                        (self.s,))
            if cur.fetchone() is None:
                cur.execute("CREATE SCHEMA %s" % self.s)
                cur.execute(ddl)
        self.conn.commit()

    def enums(self):
        with self.conn.cursor() as cur:
            out = []
            for t in ("token_type", "operation_type"):
                cur.execute("SELECT enumlabel FROM pg_enum WHERE enumtypid"
                            " = %s::regtype", ("%s.%s" % (self.s, t),))
                out.append(frozenset(r[0] for r in cur.fetchall()))
        self.conn.commit()
        return out

    def claim(self, partitions):
        """{partition: (next_offset or None, epoch)}, in one transaction."""
        with self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO %s.consumer_offsets AS o (group_id, topic,"
                " partition, owner) SELECT %%s, %%s, p, %%s"
                " FROM unnest(%%s::int[]) AS p ORDER BY p"
                " ON CONFLICT (group_id, topic, partition) DO UPDATE"
                " SET epoch = o.epoch + 1, owner = excluded.owner,"
                " claimed_at = now()"
                " RETURNING partition, next_offset, epoch" % self.s,
                (self.group, self.topic, self.owner, sorted(partitions)))
            got = {p: (n, e) for p, n, e in cur.fetchall()}
        self.conn.commit()
        return got

    def commit_batch(self, batch, epochs):
        """One transaction: offsets (fenced), new events, sums. Returns the
        number of events counted (not seen before)."""
        parts = sorted(batch.next_offsets)
        t = [time.monotonic()]
        with self.conn.cursor() as cur:
            # First, so that the offsets rows are locked before anything
            # else: a member claiming them waits for this transaction.
            cur.execute(self.advance_sql,
                        (parts, [batch.next_offsets[p] for p in parts],
                         [epochs[p] for p in parts], self.group, self.topic))
            if cur.rowcount != len(parts):
                raise Fenced("%d of %d partitions claimed by another member"
                             % (len(parts) - cur.rowcount, len(parts)))
            t.append(time.monotonic())
            rows = sorted(batch.events.values(), key=lambda r: r[:2])
            inserted = execute_values(cur, self.insert_events_sql, rows,
                                      page_size=len(rows) or 1, fetch=True)
            t.append(time.monotonic())
            daily, monthly = aggregate(batch, inserted)
            self.sum_rows = len(daily) + len(monthly)
            t.append(time.monotonic())
            for sql, sums in ((self.daily_sql, daily),
                              (self.monthly_sql, monthly)):
                if sums:
                    execute_values(cur, sql, sums, template=SUMS_TEMPLATE,
                                   page_size=len(sums))
            t.append(time.monotonic())
        self.conn.commit()
        t.append(time.monotonic())
        self.timings = [b - a for a, b in zip(t, t[1:])]
        return len(inserted)


def _date(day, cache={}):
    d = cache.get(day)
    if d is None:
        d = cache[day] = datetime.date.fromordinal(day + EPOCH_ORDINAL)
    return d


def aggregate(batch, inserted):
    """Daily and monthly rows (sorted) of the newly inserted events."""
    daily = {}
    for k in inserted:
        r = batch.events[k[0], k[1]]
        bucket = (r[0], batch.days[k[0], k[1]], r[3], r[4], r[5], r[6] or "")
        s = daily.get(bucket)
        if s is None:
            daily[bucket] = [r[10], r[11], r[12], r[13], r[14], 1]
        else:
            s[0] += r[10]
            s[1] += r[11]
            s[2] += r[12]
            s[3] += r[13]
            s[4] += r[14]
            s[5] += 1
    monthly = {}
    for (t, day, tt, op, model, agent), s in daily.items():
        bucket = (t, _date(day).replace(day=1), tt, op, model, agent)
        m = monthly.get(bucket)
        if m is None:
            monthly[bucket] = list(s)
        else:
            for i in range(6):
                m[i] += s[i]
    daily_rows = [(t, _date(day), tt, op, model, agent, *s)
                  for (t, day, tt, op, model, agent), s in sorted(
                      daily.items())]
    monthly_rows = [(*k, *s) for k, s in sorted(monthly.items())]
    return daily_rows, monthly_rows


# ---------------------------------------------------------------------
# The consumer

class Batch:
    def __init__(self):
        self.events = {}        # (tenant, key) -> events-table row
        self.days = {}          # (tenant, key) -> UTC day number
        self.next_offsets = {}  # partition -> last offset + 1
        self.rejected = []      # (message, reason, text), for dead letters
        self.messages = 0
        self.duplicates = 0
        self.opened = None


class Peer:
    def __init__(self, args):
        self.args = args
        self.topic = args.topic
        self.store = Store(args)
        self.stop = False
        self.batch = Batch()
        self.epochs = {}       # partition -> epoch of our claim
        self.committed = {}    # partition -> next offset committed
        self.ends = None       # partition -> (low, high) at start
        self.first_at = None
        self.last_commit_at = None
        self.stats = dict(messages=0, counted=0, dup_batch=0, dup_store=0,
                          rejected=0, batches=0, failures=0)
        self.reasons = {}
        self.enums_at = 0.0
        # With --pipeline (the default) one batch commits in a thread
        # (psycopg2 releases the GIL while Postgres works) while the next
        # one is consumed and validated, as tally's committer does.
        self.committer = (concurrent.futures.ThreadPoolExecutor(1)
                          if args.pipeline else None)
        self.inflight = None   # the Future of the committing batch
        conf = {"bootstrap.servers": args.brokers, "group.id": args.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False}
        conf.update(args.X)
        self.consumer = Consumer(conf)
        self.producer = None
        if args.dlq_topic:
            pconf = {"bootstrap.servers": args.brokers, "acks": "all",
                     "enable.idempotence": True, "linger.ms": 5}
            pconf.update(args.X)
            self.producer = Producer(pconf)

    # -- start ---------------------------------------------------------

    def start(self):
        self.store.connect()
        self.store.migrate()
        self.load_enums()
        if self.args.until_end:
            meta = self.consumer.list_topics(self.topic, timeout=10)
            t = meta.topics.get(self.topic)
            if t is None or t.error is not None:
                raise SystemExit("peer: topic %s not found" % self.topic)
            self.ends = {p: self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=10)
                for p in t.partitions}
            log("until-end: %d messages in %d partitions" % (
                sum(h for _, h in self.ends.values()), len(self.ends)))
        self.consumer.subscribe([self.topic], on_assign=self.on_assign,
                                on_revoke=self.on_revoke,
                                on_lost=self.on_lost)

    def load_enums(self):
        tt, op = self.store.enums()
        self.validator = Validator(self.args, tt, op)
        self.enums_at = time.monotonic()

    # -- rebalances (called from consume(), in the main thread) --------

    def on_assign(self, consumer, partitions):
        self.settle()
        parts = [tp.partition for tp in partitions]
        while True:
            try:
                self.store.connect()
                got = self.store.claim(parts)
                break
            except psycopg2.Error as e:
                log("claim failed, again in 1 s: %s" % str(e).strip())
                self.store.reset()
                time.sleep(1)
        for tp in partitions:
            n, epoch = got[tp.partition]
            self.epochs[tp.partition] = epoch
            tp.offset = OFFSET_BEGINNING if n is None else n
            if n is not None:
                self.committed[tp.partition] = n
        consumer.assign(partitions)
        log("assigned %d partitions" % len(partitions))

    def on_revoke(self, consumer, partitions):
        self.flush()  # the open batch, before the partitions go
        self.settle()
        self.forget(partitions)

    def on_lost(self, consumer, partitions):
        self.settle()
        self.batch = Batch()  # someone else may own them: drop, not commit
        self.forget(partitions)

    def forget(self, partitions):
        # committed keeps the last position known (for --until-end); a
        # new assignment reads it from Postgres again.
        for tp in partitions:
            self.epochs.pop(tp.partition, None)

    # -- the loop ------------------------------------------------------

    def run(self):
        args = self.args
        while not self.stop and not self.done():
            if self.inflight is not None and self.inflight.done():
                self.settle()
            b = self.batch
            wait = 0.5
            if b.opened is not None:
                wait = max(0.0, min(wait, b.opened + args.batch_ms / 1000.0
                                    - time.monotonic()))
            msgs = self.consumer.consume(
                num_messages=max(1, args.batch_size - b.messages),
                timeout=wait)
            if msgs:
                self.add(msgs)
            b = self.batch
            if b.messages >= args.batch_size or (
                    b.opened is not None and time.monotonic() - b.opened
                    >= args.batch_ms / 1000.0):
                self.flush()
        self.flush()
        self.settle()

    def add(self, msgs):
        b = self.batch
        now_us = time.time_ns() // 1000
        parse = self.validator.parse
        events, days = b.events, b.days
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            p, off = m.partition(), m.offset()
            if p not in self.epochs:
                continue  # a message of a partition revoked meanwhile
            if self.first_at is None:
                self.first_at = time.time()
                log("first message: %s [%d] offset %d" % (self.topic, p, off))
            if b.opened is None:
                b.opened = time.monotonic()
            b.messages += 1
            b.next_offsets[p] = off + 1
            ts_type, ts_ms = m.timestamp()
            if ts_type == TIMESTAMP_NOT_AVAILABLE:
                ts_ms = None
            try:
                row, day = parse(m.value(), p, off, ts_ms, now_us)
            except Rejected as r:
                if r.reason == "unknown_enum" and \
                        time.monotonic() - self.enums_at >= 10:
                    self.settle()  # the connection is free for a query
                    if self.batch is not b:
                        return  # rewound: the rest comes again
                    self.load_enums()  # ALTER TYPE ... ADD VALUE
                    parse = self.validator.parse
                    try:
                        row, day = parse(m.value(), p, off, ts_ms, now_us)
                    except Rejected as r2:
                        r = r2
                    else:
                        r = None
                if r is not None:
                    b.rejected.append((m, r.reason, str(r)))
                    continue
            k = (row[0], row[1])
            if k in events:
                b.duplicates += 1  # first wins
                continue
            events[k] = row
            days[k] = day

    # -- commits -------------------------------------------------------

    def flush(self):
        """Hands the open batch to the committer (after the previous one
        settled): at most one batch commits while the next one fills."""
        b = self.batch
        if b.messages == 0:
            return
        self.settle()
        if self.batch is not b:  # the previous one failed: b was dropped
            return
        self.batch = Batch()
        epochs = {p: self.epochs[p] for p in b.next_offsets}
        if self.committer is not None:
            self.inflight = self.committer.submit(self.commit, b, epochs)
        else:
            self.inflight = concurrent.futures.Future()
            self.inflight.set_result(self.commit(b, epochs))
            self.settle()

    def commit(self, b, epochs):
        """Dead letters, then the batch's transaction (in the committer
        thread with --pipeline). Returns (batch, counted or error, time)."""
        try:
            if not self.dead_letters(b):
                raise RuntimeError("dead letters not acknowledged")
            self.store.connect()
            counted = self.store.commit_batch(b, epochs)
        except (psycopg2.Error, Fenced, RuntimeError) as e:
            self.store.reset()
            return b, e, None
        return b, counted, time.time()

    def settle(self):
        """Waits for the committing batch; then counts it and commits its
        offsets to Kafka too, or rewinds after a failure."""
        if self.inflight is None:
            return
        b, counted, at = self.inflight.result()
        self.inflight = None
        if at is None:
            self.stats["failures"] += 1
            log("batch of %d messages failed, rewinding: %s"
                % (b.messages, str(counted).strip()))
            self.rewind(b)
            return
        self.last_commit_at = at
        if self.args.verbose:
            log("batch: %d messages, %d new, %d sum rows; ms: offsets %.0f,"
                " events %.0f, aggregate %.0f, sums %.0f, commit %.0f"
                % (b.messages, counted, self.store.sum_rows,
                   *(x * 1e3 for x in self.store.timings)))
        st = self.stats
        st["messages"] += b.messages
        st["counted"] += counted
        st["dup_batch"] += b.duplicates
        st["dup_store"] += len(b.events) - counted
        st["rejected"] += len(b.rejected)
        st["batches"] += 1
        for _, reason, _ in b.rejected:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.committed.update(b.next_offsets)
        # For lag tools only; the positions that count are in Postgres.
        self.consumer.commit(offsets=[
            TopicPartition(self.topic, p, n)
            for p, n in sorted(b.next_offsets.items())], asynchronous=True)

    def rewind(self, b):
        """Drops the open batch too (it follows the failed one) and seeks
        every partition of ours back to its stored position."""
        parts = set(b.next_offsets) | set(self.batch.next_offsets)
        self.batch = Batch()
        time.sleep(1)
        for p in sorted(parts):
            if p not in self.epochs:
                continue
            n = self.committed.get(p)
            try:
                self.consumer.seek(TopicPartition(
                    self.topic, p, OFFSET_BEGINNING if n is None else n))
            except KafkaException as e:  # not fetched yet: starts there
                log("seek %s [%d]: %s" % (self.topic, p, e))

    def dead_letters(self, b):
        """Sends the batch's dead letters and waits for their acks; False
        if any failed."""
        if not b.rejected or self.producer is None:
            return True
        failed = []

        def report(err, _msg):
            if err is not None:
                failed.append(err)

        for m, reason, text in b.rejected:
            value = m.value() or b""
            headers = [("tally.error.reason", reason),
                       ("tally.error.message", text),
                       ("tally.error.topic", self.topic),
                       ("tally.error.partition", str(m.partition())),
                       ("tally.error.offset", str(m.offset()))]
            if len(value) > self.args.max_message_bytes:
                value = value[:self.args.max_message_bytes]
                headers.append(("tally.error.truncated", "true"))
            ts_type, ts_ms = m.timestamp()
            self.producer.produce(
                self.args.dlq_topic, key=m.key(), value=value,
                headers=headers, on_delivery=report,
                timestamp=0 if ts_type == TIMESTAMP_NOT_AVAILABLE else ts_ms)
        return self.producer.flush(30) == 0 and not failed

    def done(self):
        if self.ends is None:
            return False
        for p, (low, high) in self.ends.items():
            n = self.committed.get(p)
            if high > 0 and (n if n is not None else low) < high:
                return False
        return True

    def close(self):
        self.flush()
        self.settle()
        self.consumer.close()
        if self.committer is not None:
            self.committer.shutdown()
        if self.producer is not None:
            self.producer.flush(30)
        self.store.close()


def vmhwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def report(peer):
    st = peer.stats
    secs = ((peer.last_commit_at - peer.first_at)
            if peer.first_at and peer.last_commit_at else 0.0)
    rate = st["messages"] / secs if secs > 0 else 0.0
    t = os.times()
    hwm = vmhwm_kb()
    log("%d messages (%d counted, %d + %d duplicates in batch + store, "
        "%d rejected%s), %d batches, %d failed"
        % (st["messages"], st["counted"], st["dup_batch"], st["dup_store"],
           st["rejected"],
           "".join(", %s %d" % kv for kv in sorted(peer.reasons.items())),
           st["batches"], st["failures"]))
    log("first message -> last commit %.3f s: %.0f messages/s; peak RSS "
        "%d MiB; CPU %.1f s" % (secs, rate, hwm // 1024,
                                t.user + t.system))
    # One line for scripts (bench.sh).
    print("peer-result messages=%d counted=%d dup_batch=%d dup_store=%d "
          "rejected=%d batches=%d failures=%d seconds=%.3f rate=%.0f "
          "vmhwm_kb=%d cpu_s=%.2f"
          % (st["messages"], st["counted"], st["dup_batch"], st["dup_store"],
             st["rejected"], st["batches"], st["failures"], secs, rate, hwm,
             t.user + t.system), flush=True)


# ---------------------------------------------------------------------

def parse_args(argv):
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="peer_consumer.py",
        description="A batched Python consumer doing tally's exactly-once "
        "work (token-usage -> daily and monthly sums in Postgres, once per "
        "(tenant_id, idempotency_key)), to measure tally against.",
        epilog="Writes into its own schema, created if missing with "
        "tally's tables (sql/001_schema.sql). Prints messages/s (first message consumed to "
        "last commit) and peak RSS at the end, and a 'peer-result' line "
        "for scripts. Exit 0 on a clean stop, 1 on failure, 2 on usage "
        "errors.")
    ap.add_argument("--brokers", default=env("TALLY_BROKERS",
                                             "localhost:9092"))
    ap.add_argument("--pg-dsn", default=env("TALLY_PG_DSN", ""),
                    help="libpq conninfo or URI (default: PG* variables)")
    ap.add_argument("--group", default="tally-peer",
                    help="consumer group (default %(default)s)")
    ap.add_argument("--topic", default="token-usage")
    ap.add_argument("--schema", default="peer",
                    help="Postgres schema of its tables (default "
                    "%(default)s)")
    ap.add_argument("--dlq-topic", default="",
                    help="dead-letter rejected messages there (default: "
                    "skip and count them)")
    ap.add_argument("--batch-size", type=int, default=10000)
    ap.add_argument("--batch-ms", type=int, default=1000)
    ap.add_argument("--dedupe-days", type=int, default=35)
    ap.add_argument("--max-message-bytes", type=int, default=1 << 20)
    ap.add_argument("--until-end", action="store_true",
                    help="stop once every partition is committed up to the "
                    "end offset seen at start")
    ap.add_argument("-X", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka property for the consumer (and the "
                    "dead-letter producer)")
    ap.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                    help="commit in the consuming thread (default: one "
                    "batch commits in a thread while the next one fills)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log each batch with its timings")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.schema):
        ap.error("--schema: a lower-case SQL identifier")
    if args.batch_size < 1 or args.batch_ms < 1 or args.dedupe_days < 1:
        ap.error("--batch-size, --batch-ms, --dedupe-days: at least 1")
    props = {}
    for kv in args.X:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            ap.error("-X %s: not KEY=VALUE" % kv)
        props[k] = v
    args.X = props
    return args


def main(argv):
    args = parse_args(argv)
    peer = Peer(args)

    def on_signal(signum, _frame):
        log("signal %d: finishing the batch" % signum)
        peer.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        peer.start()
        peer.run()
        peer.close()
    except (KafkaException, psycopg2.Error) as e:
        log("failed: %s" % str(e).strip())
        return 1
    report(peer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
