"""tally_client: the services' side of tally, in one module.

A drop-in for the calls the Python (asyncio) services make today:

    from tally_client import (track_token_usage, CacheManager,
                              invalidate_agent_cache_cascade,
                              invalidate_conversation_cache_cascade,
                              TOKEN_TYPE_LLM, OPERATION_QUERY)

    await track_token_usage(tenant_id="t1", tokens=120, model="gpt-4o",
                            token_type=TOKEN_TYPE_LLM,
                            operation=OPERATION_QUERY,
                            idempotency_key="req-42")
    await CacheManager.invalidate(tenant_id="t1", data_type="agent",
                                  resource_id="a1")

Every call checks the contract's rules at once (a bad call raises
ValueError naming the field), turns the call into one JSON event and
hands it to an idempotent lz4 Kafka producer keyed by tenant; it never
waits for the network and never raises because of the broker. Delivery
reports are served on a background thread. An event that cannot reach
Kafka (a delivery error, or the local queue full) is recorded through
the synchronous SQL path tally.track_token_usage(...) when a DSN is
configured (it dedupes against the worker), and appended to a spool file
of JSON lines when that fails too; `tally produce --file SPOOL` replays
it (`--topic cache-invalidation --file SPOOL.invalidation` for the
invalidations), and a replay counts nothing twice.

Configuration: the worker's environment variables (TALLY_BROKERS,
TALLY_USAGE_TOPIC, TALLY_INVALIDATION_TOPIC, TALLY_PG_DSN, TALLY_SPOOL,
TALLY_CACHE_PREFIX, TALLY_DEDUPE_DAYS), or one configure(...) call.

The Redis key layout (CONTRACT.md, "Redis key layout") is here too:
cache_key(), cache_prefix() and cache_targets() build exactly the keys
and prefix sets the worker deletes, pinned by the same vectors as the C
code (schemas/examples/cache-invalidation/*/targets).

Standard library plus Debian's python3-confluent-kafka (imported when the
first event is sent) and python3-psycopg2 (imported only for the SQL
fallback).
"""

import atexit
import collections
import datetime
import functools
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid

__all__ = [
    "TOKEN_TYPE_LLM", "TOKEN_TYPE_EMBEDDING",
    "OPERATION_CHAT", "OPERATION_QUERY", "OPERATION_VECTOR_SEARCH",
    "OPERATION_EMBEDDING", "OPERATION_INGESTION",
    "CACHE_TYPE_AGENT", "CACHE_TYPE_AGENT_CONFIG", "CACHE_TYPE_AGENT_TOOLS",
    "CACHE_TYPE_CONVERSATION", "CACHE_TYPE_CONVERSATION_MEMORY",
    "CACHE_TYPE_CONVERSATION_MESSAGE",
    "CACHE_TYPE_CONVERSATION_MESSAGES_LIST",
    "CACHE_TYPE_AGENT_EXECUTION_STATE", "CACHE_TYPE_COLLECTION_METADATA",
    "CACHE_TYPE_DOCUMENT", "CACHE_TYPE_QUERY_RESULT", "CONVERSATION_TYPES",
    "track_token_usage", "track_token_usage_sync",
    "CacheManager",
    "invalidate_agent_cache_cascade", "invalidate_agent_cache_cascade_sync",
    "invalidate_conversation_cache_cascade",
    "invalidate_conversation_cache_cascade_sync",
    "cache_key", "cache_prefix", "cache_targets", "cache_glob",
    "CacheTargets", "usage_event", "invalidation_event",
    "configure", "get_client", "flush", "stats", "shutdown", "Client",
]

log = logging.getLogger("tally_client")

# ---------------------------------------------------------------------
# Constants (the contract's enum values and data types)

TOKEN_TYPE_LLM = "llm"
TOKEN_TYPE_EMBEDDING = "embedding"

OPERATION_CHAT = "chat"
OPERATION_QUERY = "query"
OPERATION_VECTOR_SEARCH = "vector_search"
OPERATION_EMBEDDING = "embedding"
OPERATION_INGESTION = "ingestion"

CACHE_TYPE_AGENT = "agent"
CACHE_TYPE_AGENT_CONFIG = "agent_config"
CACHE_TYPE_AGENT_TOOLS = "agent_tools"
CACHE_TYPE_CONVERSATION = "conversation"
CACHE_TYPE_CONVERSATION_MEMORY = "conversation_memory"
CACHE_TYPE_CONVERSATION_MESSAGE = "conversation_message"
CACHE_TYPE_CONVERSATION_MESSAGES_LIST = "conversation_messages_list"
CACHE_TYPE_AGENT_EXECUTION_STATE = "agent_execution_state"
CACHE_TYPE_COLLECTION_METADATA = "collection_metadata"
CACHE_TYPE_DOCUMENT = "document"
CACHE_TYPE_QUERY_RESULT = "query_result"

# Always cached with the conv segment set to their conversation.
CONVERSATION_TYPES = (
    CACHE_TYPE_CONVERSATION,
    CACHE_TYPE_CONVERSATION_MEMORY,
    CACHE_TYPE_CONVERSATION_MESSAGE,
    CACHE_TYPE_CONVERSATION_MESSAGES_LIST,
)

TOKEN_TYPES = (TOKEN_TYPE_LLM, TOKEN_TYPE_EMBEDDING)
OPERATIONS = (OPERATION_CHAT, OPERATION_QUERY, OPERATION_VECTOR_SEARCH,
              OPERATION_EMBEDDING, OPERATION_INGESTION)

DEFAULT_CACHE_PREFIX = "cache"
TOKENS_MAX = 10 ** 12
ID_MAX = 128
KEY_MAX = 512
MODEL_MAX = 128
EVENT_ID_MAX = 256        # the worker's limit (the contract sets none)
METADATA_MAX = 8192
MAX_DEPTH = 32            # nesting of the whole message
MAX_MESSAGE_BYTES = 1024 * 1024
FUTURE_LIMIT_US = 3600 * 10 ** 6
US_PER_DAY = 86400 * 10 ** 6

_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}", re.ASCII)
_DATA_TYPE_RE = re.compile(r"[a-z0-9_]{1,64}", re.ASCII)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:(Z)|([+-])(\d{2}):(\d{2}))", re.ASCII)
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


# ---------------------------------------------------------------------
# Validation: the contract's rules at the call; ValueError names the field

def _fail(field, message):
    raise ValueError("%s: %s" % (field, message))


def _show(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_utf8(field, value):
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(field, "not valid UTF-8 (a lone surrogate?): %s" % _show(value))


def _check_id(field, value, required=False):
    """An id (^[A-Za-z0-9_.@-]{1,128}$), or None when optional."""
    if value is None:
        if required:
            _fail(field, "required")
        return None
    if not isinstance(value, str):
        _fail(field, "must be a string, got %s" % type(value).__name__)
    if not _ID_RE.fullmatch(value):
        _fail(field, "must match ^[A-Za-z0-9_.@-]{1,128}$, got %s"
              % _show(value))
    return value


def _check_text(field, value, max_bytes):
    """1..max_bytes bytes of UTF-8 without control characters, or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(field, "must be a string, got %s" % type(value).__name__)
    n = len(_check_utf8(field, value))
    if not 1 <= n <= max_bytes:
        _fail(field, "must be 1..%d bytes, got %d" % (max_bytes, n))
    if _CONTROL_RE.search(value):
        _fail(field, "must not contain control characters "
              "(U+0000-U+001F, U+007F-U+009F): %s" % _show(value))
    return value


def _check_count(field, value, required=False):
    """A JSON integer in [0, 10^12], or None (absent) when optional."""
    if value is None:
        if required:
            _fail(field, "required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, "must be an integer, got %s" % _show(value))
    if not 0 <= value <= TOKENS_MAX:
        _fail(field, "must be 0..10^12, got %d" % value)
    return int(value)


def _check_enum(field, value, allowed):
    if value is None:
        _fail(field, "required")
    if not isinstance(value, str):
        _fail(field, "must be a string, got %s" % type(value).__name__)
    if value not in allowed:
        _fail(field, "unknown value %s (known: %s)"
              % (_show(value), ", ".join(allowed)))
    return value


def _check_bool(field, value):
    if value is None:
        return False
    if not isinstance(value, bool):
        _fail(field, "must be true or false, got %s" % _show(value))
    return value


def _epoch_us(y, mo, d, h, mi, s, frac_us, offset_s):
    days = datetime.date(y, mo, d).toordinal() - 719163  # 1970-01-01
    secs = days * 86400 + h * 3600 + mi * 60 + s - offset_s
    return secs * 10 ** 6 + frac_us


def _parse_rfc3339(field, text):
    """The contract's timestamp: µs since the epoch, or ValueError."""
    m = _RFC3339_RE.fullmatch(text)
    bad = ("not YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM) with a real "
           "date: %s" % _show(text))
    if not m:
        _fail(field, bad)
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    frac_us = int((frac + "000000")[:6]) if frac else 0
    offset = 0
    if not m.group(8):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            _fail(field, bad)
        offset = (oh * 60 + om) * 60 * (-1 if m.group(9) == "-" else 1)
    if y < 1 or not 1 <= mo <= 12 or h > 23 or mi > 59 or s > 59:
        _fail(field, bad)
    try:
        return _epoch_us(y, mo, d, h, mi, s, frac_us, offset)
    except ValueError:  # no such day
        _fail(field, bad)


def _format_us(us):
    """µs since the epoch as YYYY-MM-DDTHH:MM:SS.ffffffZ."""
    dt = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now_us():
    return time.time_ns() // 1000


def _check_occurred_at(value, now_us, dedupe_days):
    """A datetime with tzinfo or an RFC 3339 string, inside the window
    [now - dedupe_days, now + 1 h]. Returns the text to send."""
    field = "occurred_at"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            _fail(field, "a datetime needs a tzinfo (e.g. timezone.utc)")
        utc = value.astimezone(datetime.timezone.utc)
        text = utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    elif isinstance(value, str):
        text = value
    else:
        _fail(field, "must be an RFC 3339 string or a datetime, got %s"
              % _show(value))
    at = _parse_rfc3339(field, text)
    oldest = now_us - dedupe_days * US_PER_DAY
    if at < oldest:
        _fail(field, "%s is before the %d-day dedupe window (starts %s)"
              % (text, dedupe_days, _format_us(oldest)))
    if at > now_us + FUTURE_LIMIT_US:
        _fail(field, "%s is more than 1 h ahead" % text)
    return text


def _walk_json(field, value, depth):
    """Checks what json.dumps would send for metadata: objects with string
    names, finite numbers within int64, valid UTF-8 without U+0000, at most
    MAX_DEPTH levels in the whole message."""
    if depth > MAX_DEPTH:
        _fail(field, "nested more than %d levels (in the message)"
              % MAX_DEPTH)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(field, "member names must be strings, got %s"
                      % _show(k))
            _walk_string(field, k)
            _walk_json(field, v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_json(field, v, depth + 1)
    elif isinstance(value, str):
        _walk_string(field, value)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            _fail(field, "integer out of the int64 range: %d" % value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            _fail(field, "NaN and infinities are not JSON")
    else:
        _fail(field, "%s is not JSON" % type(value).__name__)


def _walk_string(field, s):
    _check_utf8(field, s)
    if "\x00" in s:
        _fail(field, "U+0000 in a string")


def _dumps(obj):
    """The one serialization of every event: compact, in the given order,
    UTF-8; metadata with sorted names. Deterministic, so a re-call with the
    same arguments sends the same bytes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)


def _check_metadata(value):
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("metadata", "must be a dict (a JSON object), got %s"
              % type(value).__name__)
    _walk_json("metadata", value, 2)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False, sort_keys=True)
    n = len(text.encode("utf-8"))
    if n > METADATA_MAX:
        _fail("metadata", "%d bytes as sent, at most %d" % (n, METADATA_MAX))
    return json.loads(text, object_pairs_hook=collections.OrderedDict)


# Field order of a token-usage event as sent.
_USAGE_FIELDS = (
    "idempotency_key", "tenant_id", "tokens", "token_type", "operation",
    "model", "agent_id", "conversation_id", "collection_id",
    "owner_tenant_id", "prompt_tokens", "completion_tokens",
    "thoughts_tokens", "cached_tokens", "occurred_at", "metadata")


def usage_event(tenant_id=None, tokens=None, model=None, token_type=None,
                operation=None, idempotency_key=None, metadata=None,
                agent_id=None, conversation_id=None, collection_id=None,
                owner_tenant_id=None, prompt_tokens=None,
                completion_tokens=None, thoughts_tokens=None,
                cached_tokens=None, occurred_at=None, *, token_types=None,
                operations=None, dedupe_days=35, now_us=None):
    """Validates one token-usage call against the contract and returns the
    event as an ordered dict, exactly what is sent (None fields left out).
    occurred_at and idempotency_key stay None when not given (the client
    fixes them, see Client.track). Raises ValueError naming the field."""
    now_us = _now_us() if now_us is None else now_us
    ev = collections.OrderedDict()
    if idempotency_key is not None:
        _check_text("idempotency_key", idempotency_key, KEY_MAX)
        if idempotency_key.startswith("kafka:"):
            _fail("idempotency_key", "the prefix kafka: is reserved")
    ev["idempotency_key"] = idempotency_key
    ev["tenant_id"] = _check_id("tenant_id", tenant_id, required=True)
    ev["tokens"] = _check_count("tokens", tokens, required=True)
    ev["token_type"] = _check_enum("token_type", token_type,
                                   token_types or TOKEN_TYPES)
    ev["operation"] = _check_enum("operation", operation,
                                  operations or OPERATIONS)
    ev["model"] = _check_text("model", model, MODEL_MAX)
    for f, v in (("agent_id", agent_id), ("conversation_id", conversation_id),
                 ("collection_id", collection_id),
                 ("owner_tenant_id", owner_tenant_id)):
        ev[f] = _check_id(f, v)
    for f, v in (("prompt_tokens", prompt_tokens),
                 ("completion_tokens", completion_tokens),
                 ("thoughts_tokens", thoughts_tokens),
                 ("cached_tokens", cached_tokens)):
        ev[f] = _check_count(f, v)
    ev["occurred_at"] = (None if occurred_at is None else
                         _check_occurred_at(occurred_at, now_us, dedupe_days))
    ev["metadata"] = _check_metadata(metadata)
    return collections.OrderedDict((k, v) for k, v in ev.items()
                                   if v is not None or k in
                                   ("idempotency_key", "occurred_at"))


def invalidation_event(tenant_id=None, data_type=None, resource_id=None,
                       agent_id=None, conversation_id=None,
                       collection_id=None, cascade=False,
                       invalidate_conversations=False, event_id=None):
    """Validates one invalidation against the contract and returns the
    event as an ordered dict (None fields and false flags left out).
    Raises ValueError naming the field."""
    ev = collections.OrderedDict()
    ev["tenant_id"] = _check_id("tenant_id", tenant_id, required=True)
    if data_type is None:
        _fail("data_type", "required")
    if not isinstance(data_type, str) or not _DATA_TYPE_RE.fullmatch(
            data_type):
        _fail("data_type", "must match ^[a-z0-9_]{1,64}$, got %s"
              % _show(data_type))
    ev["data_type"] = data_type
    if resource_id != "*":
        _check_id("resource_id", resource_id, required=True)
    ev["resource_id"] = resource_id
    for f, v in (("agent_id", agent_id), ("conversation_id", conversation_id),
                 ("collection_id", collection_id)):
        if _check_id(f, v) is not None:
            ev[f] = v
    if _check_bool("cascade", cascade):
        if resource_id == "*":
            _fail("cascade", 'not with resource_id "*"')
        ev["cascade"] = True
    if _check_bool("invalidate_conversations", invalidate_conversations):
        ev["invalidate_conversations"] = True
    if event_id is not None:
        ev["event_id"] = _check_text("event_id", event_id, EVENT_ID_MAX)
    return ev


# ---------------------------------------------------------------------
# The Redis key layout (CONTRACT.md), the same as worker/src/cache_key.c

CacheTargets = collections.namedtuple("CacheTargets",
                                      "keys prefixes items")
CacheTargets.__doc__ = """What one invalidation names: exact keys,
prefix sets (every key starting with one), and both as ("key"|"prefix",
string) pairs in the worker's order (the event's own key or prefix, then
the cascade's keys, then its prefixes), each string once."""


def _check_prefix(prefix):
    if prefix is None:
        return os.environ.get("TALLY_CACHE_PREFIX") or DEFAULT_CACHE_PREFIX
    if not isinstance(prefix, str) or not prefix or "{" in prefix or \
            "}" in prefix:
        _fail("prefix", "must be a non-empty string without braces, got %s"
              % _show(prefix))
    return prefix


def _scope(prefix, tenant_id, data_type, agent_id, conversation_id,
           collection_id):
    s = "%s:{%s}:%s" % (prefix, tenant_id, data_type)
    if agent_id:
        s += ":agent=" + agent_id
    if conversation_id:
        s += ":conv=" + conversation_id
    if collection_id:
        s += ":coll=" + collection_id
    return s + ":"


def cache_prefix(tenant_id, data_type, agent_id=None, conversation_id=None,
                 collection_id=None, prefix=None):
    """P(type): cache:{<tenant>}:<type>[:agent=A][:conv=C][:coll=L]:, the
    prefix of every key of that type in that scope. Refuses ids outside the
    id pattern (ValueError)."""
    ev = invalidation_event(tenant_id=tenant_id, data_type=data_type,
                            resource_id="*", agent_id=agent_id,
                            conversation_id=conversation_id,
                            collection_id=collection_id)
    return _scope(_check_prefix(prefix), ev["tenant_id"], data_type,
                  agent_id, conversation_id, collection_id)


def cache_key(tenant_id, data_type, resource_id, agent_id=None,
              conversation_id=None, collection_id=None, prefix=None):
    """The one key of a resource: P(data_type) + resource_id. Refuses ids
    outside the id pattern and the wildcard (ValueError). The four
    conversation types are cached with conversation_id set to their
    conversation (CONVERSATION_TYPES)."""
    if resource_id == "*":
        _fail("resource_id", 'a key names one resource, not "*" '
              "(cache_prefix() names them all)")
    invalidation_event(tenant_id=tenant_id, data_type=data_type,
                       resource_id=resource_id, agent_id=agent_id,
                       conversation_id=conversation_id,
                       collection_id=collection_id)
    return _scope(_check_prefix(prefix), tenant_id, data_type, agent_id,
                  conversation_id, collection_id) + resource_id


def cache_targets(tenant_id, data_type, resource_id, agent_id=None,
                  conversation_id=None, collection_id=None, cascade=False,
                  invalidate_conversations=False, prefix=None, event_id=None):
    """The keys and prefix sets one invalidation deletes, cascades
    included, exactly as the worker builds them:
    - resource R: key P(data_type)+R; "*": prefix P(data_type);
    - agent R with cascade: also keys P(agent_config)+R, P(agent_tools)+R;
      with invalidate_conversations also the prefixes
      cache:{t}:<ct>:agent=R: for the four conversation types;
    - conversation R with cascade: the prefixes
      cache:{t}:<ct>[:agent=<agent_id>]:conv=R: for the four types.
    Returns CacheTargets; raises ValueError for a call the worker would
    reject."""
    ev = invalidation_event(tenant_id=tenant_id, data_type=data_type,
                            resource_id=resource_id, agent_id=agent_id,
                            conversation_id=conversation_id,
                            collection_id=collection_id, cascade=cascade,
                            invalidate_conversations=invalidate_conversations,
                            event_id=event_id)
    prefix = _check_prefix(prefix)
    items = []

    def add(kind, s):
        if (kind, s) not in items:
            items.append((kind, s))

    def scope(t, a, c, l):
        return _scope(prefix, tenant_id, t, a, c, l)

    r = resource_id
    if r == "*":
        add("prefix", scope(data_type, agent_id, conversation_id,
                            collection_id))
    else:
        add("key", scope(data_type, agent_id, conversation_id,
                         collection_id) + r)
    if ev.get("cascade"):
        if data_type == CACHE_TYPE_AGENT:
            for t in (CACHE_TYPE_AGENT_CONFIG, CACHE_TYPE_AGENT_TOOLS):
                add("key", scope(t, agent_id, conversation_id,
                                 collection_id) + r)
            if ev.get("invalidate_conversations"):
                for t in CONVERSATION_TYPES:
                    add("prefix", scope(t, r, None, None))
        elif data_type == CACHE_TYPE_CONVERSATION:
            for t in CONVERSATION_TYPES:
                add("prefix", scope(t, agent_id, r, None))
    return CacheTargets(
        keys=tuple(s for k, s in items if k == "key"),
        prefixes=tuple(s for k, s in items if k == "prefix"),
        items=tuple(items))


def cache_glob(prefix):
    """The Redis SCAN MATCH pattern for every key starting with prefix
    (glob specials escaped), as the worker's cache_glob_escape()."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


# ---------------------------------------------------------------------
# The client: producer, delivery thread, fallback thread, spool

_Pending = collections.namedtuple("_Pending", "kind tenant value event")


def _env_int(name, default):
    v = os.environ.get(name)
    try:
        return int(v) if v else default
    except ValueError:
        raise ValueError("%s: not an integer: %r" % (name, v))


class Client:
    """One producer and its threads. Thread-safe; every public method
    returns without waiting for the network. Use the module functions
    (configured by configure() or the environment) unless a service needs
    two clients."""

    def __init__(self, brokers=None, usage_topic=None,
                 invalidation_topic=None, pg_dsn=None, spool=None,
                 invalidation_spool=None, cache_prefix=None,
                 dedupe_days=None, message_timeout_ms=30000,
                 max_queue=100000, max_fallback_queue=100000,
                 exit_timeout=5.0, pg_retry_s=5.0, pg_connect_timeout=5,
                 kafka_config=None, token_types=None, operations=None,
                 memo_size=100000, register_exit=True):
        env = os.environ
        self.brokers = brokers or env.get("TALLY_BROKERS") or "localhost:9092"
        self.usage_topic = (usage_topic if usage_topic is not None else
                            env.get("TALLY_USAGE_TOPIC", "token-usage"))
        self.invalidation_topic = (
            invalidation_topic if invalidation_topic is not None else
            env.get("TALLY_INVALIDATION_TOPIC", "cache-invalidation"))
        self.pg_dsn = pg_dsn if pg_dsn is not None else env.get(
            "TALLY_PG_DSN")
        self.spool = os.path.abspath(spool or env.get("TALLY_SPOOL") or
                                     "tally-spool.jsonl")
        self.invalidation_spool = os.path.abspath(
            invalidation_spool or env.get("TALLY_INVALIDATION_SPOOL") or
            self.spool + ".invalidation")
        self.cache_prefix = _check_prefix(cache_prefix)
        self.dedupe_days = (dedupe_days if dedupe_days is not None else
                            _env_int("TALLY_DEDUPE_DAYS", 35))
        self.token_types = tuple(token_types or TOKEN_TYPES)
        self.operations = tuple(operations or OPERATIONS)
        self.exit_timeout = exit_timeout
        self.max_fallback_queue = max_fallback_queue
        self.pg_retry_s = pg_retry_s
        self.pg_connect_timeout = pg_connect_timeout
        self.kafka_config = {
            "bootstrap.servers": self.brokers,
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 20,
            "queue.buffering.max.messages": max_queue,
            "message.timeout.ms": message_timeout_ms,
            "client.id": "tally-client",
        }
        self.kafka_config.update(kafka_config or {})

        self._lock = threading.Lock()
        self._stats = collections.Counter(
            sent=0, delivered=0, failed=0, fallen_back=0, spooled=0,
            queue_full=0, lost=0)
        self._producer = None
        self._producer_broken = False
        self._outstanding = {}  # seq -> _Pending, until its report
        self._seq = itertools.count(1)
        self._memo = collections.OrderedDict()  # (tenant, key) -> occurred_at
        self._memo_size = memo_size
        self._fallback_q = collections.deque()
        self._fallback_cv = threading.Condition(self._lock)
        self._fallback_busy = None  # the item the fallback thread holds
        self._threads = []
        self._stop = threading.Event()
        self._closed = False
        self._pg = None
        self._pg_down_until = 0.0
        self._spool_lock = threading.Lock()
        self._log_budget = {}
        if register_exit:
            atexit.register(self.close)

    # -- public ---------------------------------------------------------

    def track(self, **kw):
        """Validates a token-usage call (ValueError at once), fixes its
        idempotency key and occurred_at, and sends it. Returns the
        idempotency key. The same call again (same key, same arguments)
        sends the same bytes, so the worker sees a duplicate, never a
        conflict: occurred_at, when not given, is the time of the first
        call with that key (remembered for the last memo_size keys)."""
        ev = usage_event(token_types=self.token_types,
                         operations=self.operations,
                         dedupe_days=self.dedupe_days, **kw)
        key = ev["idempotency_key"]
        if key is None:  # a new event: its own key, now
            key = ev["idempotency_key"] = "py:" + uuid.uuid4().hex
            if ev["occurred_at"] is None:
                ev["occurred_at"] = _format_us(_now_us())
        elif ev["occurred_at"] is None:
            ev["occurred_at"] = self._occurred_at(ev["tenant_id"], key)
        if "metadata" in ev:
            ev.move_to_end("metadata")
        value = _dumps(ev).encode("utf-8")
        self._send(_Pending("usage", ev["tenant_id"], value, ev),
                   self.usage_topic)
        return key

    def invalidate(self, **kw):
        """Validates an invalidation (ValueError at once) and sends it.
        Returns its event_id (generated when not given)."""
        if kw.get("event_id") is None:
            kw["event_id"] = "py-" + uuid.uuid4().hex
        ev = invalidation_event(**kw)
        value = _dumps(ev).encode("utf-8")
        self._send(_Pending("invalidation", ev["tenant_id"], value, ev),
                   self.invalidation_topic)
        return ev["event_id"]

    def stats(self):
        """Counters: sent (handed to the producer), delivered, failed
        (delivery errors), queue_full, fallen_back (recorded through SQL),
        spooled, lost (not even spooled: logged with the event), and the
        events still pending."""
        with self._lock:
            s = dict(self._stats)
            s["pending"] = len(self._outstanding) + len(self._fallback_q) + (
                1 if self._fallback_busy is not None else 0)
        return s

    def flush(self, timeout=None):
        """Waits up to timeout seconds (None: until done) for every event
        to be delivered or fallen back. Returns how many are still
        pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        producer = self._producer
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if producer is not None:
                producer.flush(0.1 if left is None else min(left, 0.1))
            with self._lock:
                if not self._outstanding and not self._fallback_q and \
                        self._fallback_busy is None:
                    return 0
                if producer is None or not self._outstanding:
                    self._fallback_cv.wait(0.1 if left is None else
                                           min(left, 0.1))
        return self.stats()["pending"]

    def close(self, timeout=None):
        """Flushes with a bounded wait (exit_timeout), then spools whatever
        is still pending, stops the threads. Registered with atexit."""
        if self._closed:
            return
        left = self.flush(self.exit_timeout if timeout is None else timeout)
        with self._lock:
            self._closed = True
            rest = list(self._outstanding.values()) + list(self._fallback_q)
            self._outstanding.clear()
            self._fallback_q.clear()
            busy = self._fallback_busy
            self._fallback_cv.notify_all()
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        if busy is not None and any(t.is_alive() for t in self._threads):
            rest.append(busy)  # a replay dedupes it if it also landed
        if left or rest:
            log.warning("tally_client: exiting with %d undelivered events: "
                        "spooling them", len(rest))
        for p in rest:
            self._spool_one(p, "undelivered at exit", sync=True)
        if self._producer is not None:
            try:
                self._producer.purge()
                self._producer.flush(0)
            except Exception:  # pragma: no cover - best effort at exit
                pass
        if self._pg is not None:
            try:
                self._pg.close()
            except Exception:  # pragma: no cover
                pass
            self._pg = None
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover
            pass

    # -- internals ------------------------------------------------------

    def _occurred_at(self, tenant, key):
        now = _format_us(_now_us())
        with self._lock:
            got = self._memo.get((tenant, key))
            if got is not None:
                self._memo.move_to_end((tenant, key))
                return got
            self._memo[(tenant, key)] = now
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return now

    def _count(self, name, n=1):
        with self._lock:
            self._stats[name] += n

    def _log_limited(self, level, what, msg, *args):
        """Logs every event's fallback, but at most 20 lines per second per
        kind (then one line saying how many were only counted)."""
        now = int(time.monotonic())
        with self._lock:
            sec, n = self._log_budget.get(what, (now, 0))
            if sec != now:
                if n > 20:
                    log.log(level, "tally_client: %d more %s in the last "
                            "second (counted in stats())", n - 20, what)
                sec, n = now, 0
            self._log_budget[what] = (sec, n + 1)
        if n < 20:
            log.log(level, msg, *args)

    def _ensure_producer(self):
        if self._producer is not None or self._producer_broken:
            return self._producer
        with self._lock:
            if self._producer is not None or self._producer_broken:
                return self._producer
            try:
                from confluent_kafka import Producer
                conf = dict(self.kafka_config)
                conf.setdefault("error_cb", self._on_error)
                conf.setdefault("logger",
                                logging.getLogger("tally_client.kafka"))
                self._producer = Producer(conf)
            except Exception as e:
                self._producer_broken = True
                log.error("tally_client: no Kafka producer (%s); every "
                          "event goes to the fallback", e)
                return None
            t = threading.Thread(target=self._poll_loop,
                                 name="tally-client-delivery", daemon=True)
            t.start()
            self._threads.append(t)
        return self._producer

    def _on_error(self, err):
        if err.fatal():
            log.error("tally_client: fatal producer error: %s; new events "
                      "go to the fallback", err)
            self._producer_broken = True
        else:
            self._log_limited(logging.DEBUG, "kafka errors",
                              "tally_client: kafka: %s", err)

    def _poll_loop(self):
        producer = self._producer
        while not self._stop.is_set():
            try:
                producer.poll(0.1)
            except Exception as e:  # a callback raised: keep serving
                log.error("tally_client: delivery thread: %s", e)

    def _send(self, pending, topic):
        producer = None if self._closed or not topic else \
            self._ensure_producer()
        if producer is None or self._producer_broken:
            why = ("closed" if self._closed else "no topic" if not topic
                   else "no producer")
            self._fallback(pending, why)
            return
        seq = next(self._seq)
        with self._lock:
            self._outstanding[seq] = pending
        try:
            producer.produce(topic, value=pending.value,
                             key=pending.tenant.encode("utf-8"),
                             on_delivery=functools.partial(
                                 self._on_delivery, seq))
        except BufferError:
            with self._lock:
                self._outstanding.pop(seq, None)
                self._stats["queue_full"] += 1
            self._fallback(pending, "local queue full")
            return
        except Exception as e:
            with self._lock:
                self._outstanding.pop(seq, None)
                self._stats["failed"] += 1
            self._fallback(pending, "produce refused: %s" % e)
            return
        self._count("sent")

    def _on_delivery(self, seq, err, msg):
        with self._lock:
            pending = self._outstanding.pop(seq, None)
            if pending is None:  # already spooled at exit
                return
            if err is None:
                self._stats["delivered"] += 1
                if not self._outstanding:
                    self._fallback_cv.notify_all()
                return
            self._stats["failed"] += 1
        self._fallback(pending, "delivery failed: %s" % err)

    def _fallback(self, pending, why):
        """Queues the event for the fallback thread (SQL, then spool); past
        max_fallback_queue it is spooled right here (a local append)."""
        with self._lock:
            if self._closed:
                direct = True
            elif len(self._fallback_q) >= self.max_fallback_queue:
                direct = True
            else:
                direct = False
                self._fallback_q.append((pending, why))
                self._fallback_cv.notify_all()
                if not any(t.name == "tally-client-fallback"
                           for t in self._threads):
                    t = threading.Thread(target=self._fallback_loop,
                                         name="tally-client-fallback",
                                         daemon=True)
                    self._threads.append(t)
                    t.start()
        if direct:
            self._spool_one(pending, why, sync=False)

    def _fallback_loop(self):
        while True:
            with self._lock:
                while not self._fallback_q and not self._stop.is_set():
                    self._fallback_cv.wait(0.5)
                if not self._fallback_q:
                    return
                pending, why = self._fallback_q.popleft()
                self._fallback_busy = pending
            try:
                if not (pending.kind == "usage" and self._record_sql(
                        pending, why)):
                    self._spool_one(pending, why, sync=True)
            finally:
                with self._lock:
                    self._fallback_busy = None
                    self._fallback_cv.notify_all()

    def _record_sql(self, pending, why):
        """tally.track_token_usage(...) with the event's fields; True when
        recorded (counted, or a duplicate of what the worker counted)."""
        if not self.pg_dsn or time.monotonic() < self._pg_down_until:
            return False
        ev = pending.event
        try:
            import psycopg2
        except ImportError as e:
            log.error("tally_client: SQL fallback unavailable (%s; Debian: "
                      "python3-psycopg2)", e)
            self._pg_down_until = time.monotonic() + 3600
            return False
        args, params = [], {}
        for f in _USAGE_FIELDS:
            if f not in ev:
                continue
            cast = {"occurred_at": "::timestamptz", "metadata": "::jsonb",
                    "tokens": "::bigint"}.get(f, "")
            args.append("%s => %%(%s)s%s" % (f, f, cast))
            params[f] = _dumps(ev[f]) if f == "metadata" else ev[f]
        sql = "SELECT tally.track_token_usage(%s)" % ", ".join(args)
        try:
            if self._pg is None:
                self._pg = psycopg2.connect(
                    self.pg_dsn, connect_timeout=self.pg_connect_timeout,
                    application_name="tally-client")
                self._pg.autocommit = True
            with self._pg.cursor() as cur:
                cur.execute(sql, params)
                counted = cur.fetchone()[0]
        except psycopg2.Error as e:
            code = getattr(e, "pgcode", None)
            if code == "22023":  # invalid: the worker will dead-letter it
                log.error("tally_client: token-usage %s/%s refused by SQL "
                          "(%s): spooling it", ev["tenant_id"],
                          ev["idempotency_key"], str(e).strip())
                return False
            self._pg_down_until = time.monotonic() + self.pg_retry_s
            self._log_limited(logging.WARNING, "SQL failures",
                              "tally_client: SQL fallback failed (%s); "
                              "spooling for %.0f s", str(e).strip(),
                              self.pg_retry_s)
            try:
                self._pg.close()
            except Exception:
                pass
            self._pg = None
            return False
        self._count("fallen_back")
        self._log_limited(logging.WARNING, "SQL fallbacks",
                          "tally_client: token-usage %s/%s: %s; recorded "
                          "through SQL (%s)", ev["tenant_id"],
                          ev["idempotency_key"], why,
                          "counted" if counted else "already counted")
        return True

    def _spool_one(self, pending, why, sync):
        path = (self.spool if pending.kind == "usage" else
                self.invalidation_spool)
        try:
            with self._spool_lock:
                with open(path, "ab") as f:
                    f.write(pending.value + b"\n")
                    f.flush()
                    if sync:
                        os.fsync(f.fileno())
        except OSError as e:
            self._count("lost")
            log.error("tally_client: LOST %s event (%s; spool %s: %s): %s",
                      pending.kind, why, path, e,
                      pending.value.decode("utf-8", "replace"))
            return
        self._count("spooled")
        self._log_limited(logging.WARNING, "spooled events",
                          "tally_client: %s event of %s: %s; spooled to %s",
                          pending.kind, pending.tenant, why, path)


# ---------------------------------------------------------------------
# The module's default client and the drop-in calls

_default = None
_default_lock = threading.Lock()


def configure(**kw):
    """Sets up the default client (keyword arguments of Client; anything
    not given comes from the environment). A previous default client is
    flushed (bounded) and closed first. Returns the client."""
    global _default
    with _default_lock:
        old, _default = _default, Client(**kw)
    if old is not None:
        old.close()
    return _default


def get_client():
    """The default client, built from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client()
    return _default


def flush(timeout=None):
    return get_client().flush(timeout)


def stats():
    return get_client().stats()


def shutdown(timeout=None):
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close(timeout)


def _coroutine_of(fn):
    """The coroutine twin of a fire-and-forget call: same signature and
    behaviour, for `await`; it never suspends on the network."""
    @functools.wraps(fn)
    async def coroutine(*args, **kw):
        return fn(*args, **kw)
    coroutine.__name__ = coroutine.__qualname__ = fn.__name__[:-len("_sync")]
    return coroutine


def track_token_usage_sync(tenant_id=None, tokens=None, model=None,
                           token_type=None, operation=None,
                           idempotency_key=None, metadata=None, agent_id=None,
                           conversation_id=None, collection_id=None,
                           owner_tenant_id=None, prompt_tokens=None,
                           completion_tokens=None, thoughts_tokens=None,
                           cached_tokens=None, occurred_at=None):
    """Records one token-usage event (fire and forget). Returns its
    idempotency key (generated when not given). ValueError for a bad
    call, naming the field; nothing else raises."""
    return get_client().track(
        tenant_id=tenant_id, tokens=tokens, model=model,
        token_type=token_type, operation=operation,
        idempotency_key=idempotency_key, metadata=metadata,
        agent_id=agent_id, conversation_id=conversation_id,
        collection_id=collection_id, owner_tenant_id=owner_tenant_id,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        thoughts_tokens=thoughts_tokens, cached_tokens=cached_tokens,
        occurred_at=occurred_at)


def invalidate_sync(tenant_id=None, data_type=None, resource_id=None,
                    agent_id=None, conversation_id=None, collection_id=None,
                    cascade=False, invalidate_conversations=False,
                    event_id=None):
    """Invalidates one resource (resource_id "*": every resource of the
    type in the scope), fire and forget. Returns the event_id."""
    return get_client().invalidate(
        tenant_id=tenant_id, data_type=data_type, resource_id=resource_id,
        agent_id=agent_id, conversation_id=conversation_id,
        collection_id=collection_id, cascade=cascade,
        invalidate_conversations=invalidate_conversations, event_id=event_id)


def invalidate_agent_cache_cascade_sync(tenant_id=None, agent_id=None,
                                        invalidate_conversations=True,
                                        event_id=None):
    """The agent, its config and tools; with invalidate_conversations
    (default, as the services call it) every conversation type cached
    under the agent."""
    return get_client().invalidate(
        tenant_id=tenant_id, data_type=CACHE_TYPE_AGENT,
        resource_id=agent_id, cascade=True,
        invalidate_conversations=invalidate_conversations, event_id=event_id)


def invalidate_conversation_cache_cascade_sync(tenant_id=None,
                                               conversation_id=None,
                                               agent_id=None, event_id=None):
    """The conversation and everything of the four conversation types
    cached under it (under agent_id when given)."""
    return get_client().invalidate(
        tenant_id=tenant_id, data_type=CACHE_TYPE_CONVERSATION,
        resource_id=conversation_id, agent_id=agent_id,
        conversation_id=conversation_id, cascade=True, event_id=event_id)


track_token_usage = _coroutine_of(track_token_usage_sync)
invalidate_agent_cache_cascade = _coroutine_of(
    invalidate_agent_cache_cascade_sync)
invalidate_conversation_cache_cascade = _coroutine_of(
    invalidate_conversation_cache_cascade_sync)


class CacheManager:
    """The services' cache manager, as far as tally is concerned: the key
    layout and the invalidations (applied by the worker, then announced on
    Redis channel cache:invalidations). invalidate() is the coroutine,
    invalidate_sync() its twin."""

    invalidate_sync = staticmethod(invalidate_sync)
    invalidate = staticmethod(_coroutine_of(invalidate_sync))

    @staticmethod
    def key(tenant_id, data_type, resource_id, agent_id=None,
            conversation_id=None, collection_id=None):
        return cache_key(tenant_id, data_type, resource_id, agent_id,
                         conversation_id, collection_id,
                         prefix=get_client().cache_prefix)

    @staticmethod
    def prefix(tenant_id, data_type, agent_id=None, conversation_id=None,
               collection_id=None):
        return cache_prefix(tenant_id, data_type, agent_id, conversation_id,
                            collection_id, prefix=get_client().cache_prefix)
