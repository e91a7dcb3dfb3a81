#!/usr/bin/env bash
# The command line: exit codes (0 ok, 1 runtime failure, 2 usage or
# configuration error), messages that name what is wrong, help for every
# command with each flag's default and environment variable, flags over
# environment, -X pass-through. Needs no stack.
#
# usage: test_cli.sh TALLY [TALLY_GEN]
set -euo pipefail
TALLY=$(readlink -f "${1:?usage: test_cli.sh TALLY}")
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tally-cli.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# A Postgres that is certainly not there: a worker that gets past its
# configuration waits for it, so such runs are bounded by `timeout`.
NO_PG="host=127.0.0.1 port=1 connect_timeout=1"
FAILURES=0

fail() {
  echo "FAIL: $*" >&2
  FAILURES=$((FAILURES + 1))
}

step() { echo "--- $*"; }

# run EXPECTED_RC DESCRIPTION -- COMMAND...: runs it (stdin empty, at most
# 10 s), keeps stdout in $TMP/out and stderr in $TMP/err.
run() {
  local want=$1 what=$2 rc=0
  shift 3
  timeout -k 5 10 "$@" </dev/null >"$TMP/out" 2>"$TMP/err" || rc=$?
  if [ "$rc" -ne "$want" ]; then
    [ "$rc" -eq 124 ] && what="$what (still running after 10 s)"
    fail "$what: exit $rc, expected $want; stderr: $(head -c 400 "$TMP/err")"
    return 1
  fi
}

# stderr (or stdout with -o) must contain a fixed string.
says() {
  local file=$TMP/err
  [ "$1" = -o ] && { file=$TMP/out; shift; }
  grep -qF -- "$1" "$file" ||
    fail "${2:-output} does not say '$1': $(head -c 400 "$file")"
}

step "tally alone, unknown commands"
run 2 "tally" -- "$TALLY" && says "usage: tally"
run 2 "tally nope" -- "$TALLY" nope && says "nope"
run 2 "tally help nope" -- "$TALLY" help nope && says "nope"
run 0 "tally --help" -- "$TALLY" --help && says -o "usage: tally"
run 0 "tally help" -- "$TALLY" help && says -o "worker"
run 0 "tally version" -- "$TALLY" version && says -o "tally"

step "help for every command"
for cmd in worker produce devbroker migrate; do
  run 0 "tally $cmd --help" -- "$TALLY" "$cmd" --help &&
    says -o "usage: tally $cmd" "tally $cmd --help"
  run 0 "tally help $cmd" -- "$TALLY" help "$cmd" &&
    says -o "usage: tally $cmd" "tally help $cmd"
  [ -s "$TMP/err" ] && fail "tally help $cmd wrote to stderr: $(head -c 200 "$TMP/err")"
  # Every flag is followed by its default before the next flag.
  awk '
    /^  --/ { if (flag != "" && !seen) print flag; flag = $1; seen = 0; next }
    /^  -X|^  -h/ { if (flag != "" && !seen) print flag; flag = ""; next }
    /default:/ { seen = 1 }
    END { if (flag != "" && !seen) print flag }' "$TMP/out" >"$TMP/nodefault"
  [ -s "$TMP/nodefault" ] &&
    fail "tally $cmd --help: no default for $(tr '\n' ' ' <"$TMP/nodefault")"
done

step "the contract's connection flags, with defaults and variables"
run 0 "tally help worker" -- "$TALLY" help worker || true
while read -r flag env default; do
  [ "$default" = "-" ] && default="(empty)"
  # The flag's line, then its details up to the next flag.
  awk -v f="--$flag" '
    $1 == f { on = 1; print; next }
    on && /^  -/ { exit }
    on { print }' "$TMP/out" >"$TMP/flag"
  [ -s "$TMP/flag" ] || { fail "tally help worker: no --$flag"; continue; }
  grep -qF "default: $default" "$TMP/flag" ||
    fail "--$flag: default is not '$default': $(tr -s ' \n' ' ' <"$TMP/flag")"
  grep -qF "$env" "$TMP/flag" ||
    fail "--$flag: environment variable $env not named: $(tr -s ' \n' ' ' <"$TMP/flag")"
done <<'EOF'
brokers TALLY_BROKERS localhost:9092
group TALLY_GROUP tally
pg-dsn TALLY_PG_DSN -
redis-url TALLY_REDIS_URL redis://localhost:6379/0
metrics-addr TALLY_METRICS_ADDR 127.0.0.1:9464
usage-topic TALLY_USAGE_TOPIC token-usage
invalidation-topic TALLY_INVALIDATION_TOPIC cache-invalidation
EOF
grep -q "pg-dsn.*libpq" "$TMP/out" ||
  fail "--pg-dsn does not say that empty means libpq's defaults"
grep -q "metrics-addr.*empty: off" "$TMP/out" ||
  fail "--metrics-addr does not say that empty turns it off"

step "usage errors: exit 2, naming the culprit"
run 2 "worker --bogus" -- "$TALLY" worker --bogus && says "--bogus"
run 2 "worker --bogus=1" -- "$TALLY" worker --bogus=1 && says "--bogus"
run 2 "worker -z" -- "$TALLY" worker -z && says "-z"
run 2 "worker extra argument" -- "$TALLY" worker extra && says "extra"
run 2 "worker --batch-size 0" -- "$TALLY" worker --batch-size 0 &&
  says "--batch-size"
run 2 "worker --batch-size=-5" -- "$TALLY" worker --batch-size=-5 &&
  says "--batch-size"
run 2 "worker --batch-size x" -- "$TALLY" worker --batch-size x &&
  says "--batch-size"
run 2 "worker --batch-size (no value)" -- "$TALLY" worker --batch-size &&
  says "--batch-size"
run 2 "worker --commit-batches 0" -- "$TALLY" worker --commit-batches 0 &&
  says "--commit-batches"
run 2 "worker --commit-batches 49" -- "$TALLY" worker --commit-batches 49 &&
  says "--commit-batches"
run 2 "worker --commit-ms 0" -- "$TALLY" worker --commit-ms 0 &&
  says "--commit-ms"
run 2 "worker --batch-idle-ms -1" -- "$TALLY" worker --batch-idle-ms -1 &&
  says "--batch-idle-ms"
run 2 "TALLY_BATCH_IDLE_MS=soon" -- env TALLY_BATCH_IDLE_MS=soon \
  "$TALLY" worker && says "TALLY_BATCH_IDLE_MS"
run 2 "worker --start-from sideways" -- "$TALLY" worker --start-from sideways &&
  says "--start-from"
run 2 "worker --no-migrate=maybe" -- "$TALLY" worker --no-migrate=maybe &&
  says "--no-migrate"
run 2 "worker --log-level loud" -- "$TALLY" worker --log-level loud &&
  says "--log-level"
run 2 "worker --brokers ''" -- "$TALLY" worker --brokers "" && says "--brokers"
run 2 "worker -X novalue" -- "$TALLY" worker -X novalue && says "novalue"
run 2 "worker -X (nothing)" -- "$TALLY" worker -X && says "-X"
run 2 "produce --bogus" -- "$TALLY" produce --bogus && says "--bogus"
run 2 "produce --file /nonexistent" -- "$TALLY" produce --file /nonexistent/x &&
  says "/nonexistent/x"
run 2 "devbroker --partitions 0" -- "$TALLY" devbroker --partitions 0 &&
  says "--partitions"
run 2 "migrate --bogus" -- "$TALLY" migrate --bogus && says "--bogus"

step "environment variables: bad values name the variable"
run 2 "TALLY_BATCH_SIZE=x" -- env TALLY_BATCH_SIZE=x "$TALLY" worker &&
  says "TALLY_BATCH_SIZE"
run 2 "TALLY_BATCH_SIZE=0" -- env TALLY_BATCH_SIZE=0 "$TALLY" worker &&
  says "TALLY_BATCH_SIZE"
run 2 "TALLY_COMMIT_MS=1s" -- env TALLY_COMMIT_MS=1s "$TALLY" worker &&
  says "TALLY_COMMIT_MS"
run 2 "TALLY_COMMIT_BATCHES=many" -- env TALLY_COMMIT_BATCHES=many \
  "$TALLY" worker && says "TALLY_COMMIT_BATCHES"
run 2 "TALLY_START_FROM=sideways" -- env TALLY_START_FROM=sideways \
  "$TALLY" worker && says "TALLY_START_FROM"
run 2 "TALLY_NO_MIGRATE=perhaps" -- env TALLY_NO_MIGRATE=perhaps \
  "$TALLY" worker && says "TALLY_NO_MIGRATE"
# Checked later than the others (when the listener starts), still a
# configuration error that must name where the value came from.
run 2 "TALLY_METRICS_ADDR=256.0.0.1:99999" -- env \
  TALLY_METRICS_ADDR=256.0.0.1:99999 "$TALLY" worker --pg-dsn "$NO_PG" &&
  says "TALLY_METRICS_ADDR"
run 2 "--metrics-addr 256.0.0.1:99999" -- "$TALLY" worker \
  --metrics-addr 256.0.0.1:99999 --pg-dsn "$NO_PG" && says "--metrics-addr"
run 2 "TALLY_DEDUPE_DAYS=-1 (produce)" -- env TALLY_DEDUPE_DAYS=-1 \
  "$TALLY" produce && says "TALLY_DEDUPE_DAYS"

step "flags win over environment variables"
# Both topics empty is a configuration error found before any connection;
# the flags decide, whatever the variables say.
run 2 "--usage-topic '' --invalidation-topic '' over the variables" -- \
  env TALLY_USAGE_TOPIC=token-usage TALLY_INVALIDATION_TOPIC=cache-invalidation \
  "$TALLY" worker --usage-topic "" --invalidation-topic "" \
  --metrics-addr "" --pg-dsn "$NO_PG" && says "nothing to consume"
run 2 "TALLY_USAGE_TOPIC='' TALLY_INVALIDATION_TOPIC=''" -- \
  env TALLY_USAGE_TOPIC= TALLY_INVALIDATION_TOPIC= "$TALLY" worker \
  --metrics-addr "" --pg-dsn "$NO_PG" && says "nothing to consume"
# The other way round the worker gets past its configuration and waits
# for Postgres (stopped by SIGTERM: a clean exit, 0).
rc=0
env TALLY_USAGE_TOPIC= TALLY_INVALIDATION_TOPIC= TALLY_START_FROM=earliest \
  TALLY_METRICS_ADDR=256.0.0.1:99999 "$TALLY" worker --usage-topic token-usage \
  --start-from latest --metrics-addr "" --pg-dsn "$NO_PG" \
  --brokers 127.0.0.1:1 </dev/null >"$TMP/out" 2>"$TMP/err" &
pid=$!
sleep 2
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || fail "worker waiting for Postgres exited $rc on SIGTERM"
  grep -q "retrying in" "$TMP/err" ||
    fail "the worker did not say it waits for Postgres: $(head -c 400 "$TMP/err")"
else
  wait "$pid" || rc=$?
  fail "--usage-topic/--metrics-addr flags did not win over the environment" \
    "(exit $rc): $(head -c 400 "$TMP/err")"
fi

step "-X list and librdkafka properties"
for cmd in worker produce devbroker; do
  run 0 "$cmd -X list" -- "$TALLY" "$cmd" -X list &&
    says -o "bootstrap.servers" "$cmd -X list"
done
run 2 "produce -X bogus.property=1" -- "$TALLY" produce -X bogus.property=1 &&
  says "bogus.property"
run 2 "produce -X linger.ms=notanumber" -- "$TALLY" produce \
  -X linger.ms=notanumber && says "linger.ms"
run 2 "devbroker -X bogus.property=1" -- "$TALLY" devbroker \
  -X bogus.property=1 && says "bogus.property"
# The worker must reject a bad property as a configuration error, before
# (and without) connecting to anything.
run 2 "worker -X bogus.property=1" -- "$TALLY" worker -X bogus.property=1 \
  --metrics-addr "" --pg-dsn "$NO_PG" && says "bogus.property"

if [ "$FAILURES" -gt 0 ]; then
  echo "FAIL: $FAILURES checks failed" >&2
  exit 1
fi
echo "PASS: exit codes, messages and help as the contract says"
