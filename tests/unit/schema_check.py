#!/usr/bin/python3
"""Checks the example fixtures against the JSON Schemas.

usage: schema_check.py SCHEMAS_DIR

For each event kind, SCHEMAS_DIR/<kind>.schema.json must be a valid draft
2020-12 schema, every examples/<kind>/<case>/input.json whose `expected` is
"ok" must validate, and every other one must fail: either as JSON (strict
parse) or against the schema, unless the case is listed in SKIP with the
reason the schema cannot express the rule. Exit 0 on success, 1 on a
mismatch, 77 (ctest: skipped) when the jsonschema module is missing.
"""
import json
import os
import sys

try:
    import jsonschema
except ImportError:
    print("python3-jsonschema is not installed: skipped")
    sys.exit(77)

KINDS = ("token-usage", "cache-invalidation")

# Rejected cases whose rule a JSON Schema cannot express, so that the
# schema (rightly) accepts their input.
SKIP = {
    "token-usage": {
        # Limits on the raw message, checked before any decoding.
        "too_large": "--max-message-bytes is a worker setting",
        "too_deep_metadata_33": "nesting depth is not a schema keyword",
        "too_deep_unknown_array": "nesting depth is not a schema keyword",
        "metadata_8193_bytes": "limit on the raw bytes of metadata",
        "metadata_too_large_multibyte": "limit on the raw bytes of metadata",
        "metadata_too_large_escaped_name": "limit on the raw bytes of metadata",
        # Number syntax: draft 2020-12 calls 1.0 an integer, and the
        # parsed value of 1e3 or -0.0 no longer shows its spelling.
        "schema_version_real": "1.0 is an integer to JSON Schema",
        "tokens_real_1_0": "1.0 is an integer to JSON Schema",
        "tokens_exponent_1e3": "1e3 is an integer to JSON Schema",
        "tokens_negative_zero_real": "-0.0 is an integer to JSON Schema",
        # Values past int64 are a decoder limit (jansson), not a rule on
        # unknown fields, which the schema leaves open.
        "number_past_2_63_unknown_field": "int64 decoder limit",
        "number_real_overflow": "double decoder limit",
        # U+0000 is banned in every string, including unknown fields and
        # metadata, which the schema leaves open.
        "nul_escaped_in_value": "U+0000 inside metadata",
        "nul_escaped_in_member_name": "U+0000 in an unknown member name",
        # Bytes vs characters: maxLength counts characters.
        "key_513_bytes_multibyte": "length limit in bytes",
        "model_129_bytes_multibyte": "length limit in bytes",
        # Enum values come from Postgres at start (ALTER TYPE ... ADD
        # VALUE), so the schema only requires a short string.
        "token_type_unknown": "enum read from the database",
        "token_type_wrong_case": "enum read from the database",
        "operation_unknown": "enum read from the database",
        # Time: a real calendar date and the window around the worker's
        # clock.
        "occurred_at_feb_30": "calendar validity",
        "occurred_at_feb_29_non_leap": "calendar validity",
        "occurred_at_too_old": "dedupe window, worker's clock",
        "occurred_at_too_old_by_offset": "dedupe window, worker's clock",
        "occurred_at_too_far_future": "future limit, worker's clock",
        "occurred_at_leap_day_too_old": "dedupe window, worker's clock",
        "kafka_timestamp_too_old": "Kafka timestamp, not in the message",
        # Python's re lets $ match before a final newline; ECMA 262 (the
        # schema's regex dialect) does not, so the schema is right.
        "occurred_at_trailing_newline": "python re $ before a final \\n",
    },
    "cache-invalidation": {
        # Limits on the raw message, checked before any decoding.
        "too_large": "--max-message-bytes is a worker setting",
        "too_deep_33": "nesting depth is not a schema keyword",
        "too_deep_objects_33": "nesting depth is not a schema keyword",
        "too_deep_after_escaped_quote": "nesting depth is not a schema keyword",
        # U+0000 is banned in every string, including unknown fields.
        "nul_escaped_in_event_id": "U+0000 in a free-text string",
        "nul_escaped_in_unknown_field": "U+0000 inside an unknown field",
        "nul_escaped_in_member_name": "U+0000 in an unknown member name",
        # Decoder limits (jansson: int64, double) on unknown fields.
        "out_of_range_unknown_integer": "int64 decoder limit",
        "out_of_range_unknown_real": "double decoder limit",
        "schema_version_real": "1.0 is an integer to JSON Schema",
        # Python's re lets $ match before a final newline; ECMA 262 (the
        # schema's regex dialect) does not, so the schema is right.
        "tenant_id_newline": "python re $ before a final \\n",
        # event_id: the contract gives no limit, the worker takes 1..256
        # bytes without control characters (it is logged and published).
        "event_id_257": "worker-side event_id limit, not in the contract",
        "event_id_257_bytes_multibyte": "worker-side limit, in bytes",
        "event_id_empty": "worker-side event_id limit, not in the contract",
        "event_id_newline": "worker-side event_id limit, not in the contract",
        "event_id_del": "worker-side event_id limit, not in the contract",
        "event_id_c1": "worker-side event_id limit, not in the contract",
    },
}


class Rejected(ValueError):
    pass


def no_duplicates(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise Rejected("duplicate member %r" % k)
        seen.add(k)
    return dict(pairs)


def no_constant(name):
    raise Rejected("not JSON: %s" % name)


def strict_load(raw):
    """Parses like the worker's JSON layer: UTF-8, no duplicate member
    names, no NaN/Infinity, no lone surrogates, one value."""
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=no_duplicates,
                         parse_constant=no_constant)
        # lone surrogates from \ud800 escapes cannot be re-encoded
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
        return doc
    except (UnicodeError, ValueError, RecursionError) as e:
        raise Rejected(str(e)) from e


def check_kind(schemas_dir, kind):
    with open(os.path.join(schemas_dir, kind + ".schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for example in schema.get("examples", []):
        validator.validate(example)

    cases_dir = os.path.join(schemas_dir, "examples", kind)
    failures = counted = skipped = 0
    used_skips = set()
    for name in sorted(os.listdir(cases_dir)):
        case = os.path.join(cases_dir, name)
        if not os.path.isfile(os.path.join(case, "input.json")):
            continue
        with open(os.path.join(case, "expected")) as f:
            expected = f.read().strip()
        with open(os.path.join(case, "input.json"), "rb") as f:
            raw = f.read()
        counted += 1
        if expected != "ok" and name in SKIP[kind]:
            used_skips.add(name)
            skipped += 1
            continue
        try:
            doc = strict_load(raw)
            errors = [e.message for e in validator.iter_errors(doc)]
        except Rejected as e:
            doc, errors = None, ["not strict JSON: %s" % e]
        if expected == "ok" and errors:
            print("FAIL %s/%s: expected ok, schema says: %s"
                  % (kind, name, errors[0][:200]))
            failures += 1
        elif expected != "ok" and not errors:
            print("FAIL %s/%s: expected %s, schema accepts it"
                  % (kind, name, expected))
            failures += 1
    for name in sorted(set(SKIP[kind]) - used_skips):
        print("FAIL %s: SKIP lists %s, which is not a rejected case"
              % (kind, name))
        failures += 1
    print("%s: %d cases, %d skipped (not expressible), %d failures"
          % (kind, counted, skipped, failures))
    return failures


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    failures = sum(check_kind(sys.argv[1], kind) for kind in KINDS)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
