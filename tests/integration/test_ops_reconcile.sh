#!/usr/bin/env bash
# tally reconcile: finds a daily bucket corrupted by hand, one deleted by
# hand and a corrupted monthly bucket; --fix repairs them while a worker
# keeps counting a producer trickle, and the sums end exact; --against
# reports a legacy table's buckets over the threshold (and missing ones)
# with the summary counts, none under it.
#
# usage: test_ops_reconcile.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4
FROM=$(date -u -d '-31 days' +%F)
TO=$(date -u +%F)
range=(--from "$FROM" --to "$TO")

# reconcile ARGS...: runs it, output in $IT_DIR/rec.out, exit code in $rc.
reconcile() {
  rc=0
  "$TALLY" reconcile "$@" >"$IT_DIR/rec.out" 2>"$IT_DIR/rec.err" || rc=$?
}
key="tenant_id, day, token_type, operation, model, agent_id"

step "20,000 events; the first half counted by a worker"
"$TALLY_GEN" --count 20000 --seed 33 --tenants 100 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
head -n 10000 "$IT_DIR/events.jsonl" >"$IT_DIR/a.jsonl"
tail -n +10001 "$IT_DIR/events.jsonl" >"$IT_DIR/b.jsonl"
it_produce "$IT_DIR/a.jsonl"
it_worker_start w1
it_wait_consumed 10000 120
reconcile "${range[@]}"
[ "$rc" -eq 0 ] || fail "reconcile of correct sums exited $rc: $(cat "$IT_DIR/rec.out" "$IT_DIR/rec.err")"
grep -q ", 0 differ; .* 0 differ$" "$IT_DIR/rec.out" || fail "$(cat "$IT_DIR/rec.out")"

step "corrupt by hand: a daily row's tokens, a deleted daily row, a monthly row"
# The busiest buckets: the trickle below keeps adding to them during --fix.
it_sql "CREATE TABLE victims AS SELECT $key, tokens FROM tally.token_usage_daily
        ORDER BY events DESC, $key LIMIT 2"
it_sql "UPDATE tally.token_usage_daily SET tokens = tokens + 1234
        WHERE ($key) = (SELECT $key FROM victims ORDER BY tokens DESC LIMIT 1)"
it_sql "DELETE FROM tally.token_usage_daily
        WHERE ($key) = (SELECT $key FROM victims ORDER BY tokens ASC LIMIT 1)"
it_sql "UPDATE tally.token_usage_monthly SET events = events - 1
        WHERE ($(sed 's/day/month/' <<<"$key")) = (SELECT $(sed 's/day/month/' <<<"$key")
          FROM tally.token_usage_monthly ORDER BY events ASC, tenant_id DESC LIMIT 1)"
reconcile "${range[@]}"
[ "$rc" -eq 1 ] || fail "reconcile of corrupted sums exited $rc, expected 1"
cat "$IT_DIR/rec.out"
[ "$(grep -c '^daily ' "$IT_DIR/rec.out")" -eq 2 ] || fail "expected 2 daily buckets reported"
[ "$(grep -c '^monthly ' "$IT_DIR/rec.out")" -eq 1 ] || fail "expected 1 monthly bucket reported"
grep -q "^daily .*: stored (none); expected tokens" "$IT_DIR/rec.out" ||
  fail "the deleted bucket is not reported as missing"
t=$(it_sql "SELECT tokens FROM victims ORDER BY tokens DESC LIMIT 1")
grep -q "stored tokens $((t + 1234)) .*; expected tokens $t " "$IT_DIR/rec.out" ||
  fail "the corrupted bucket is not reported with both values ($((t + 1234)) vs $t)"
reconcile "${range[@]}" --json
tail -1 "$IT_DIR/rec.out" | grep -q '"daily_differing":2,"monthly_checked":[0-9]*,"monthly_differing":1' ||
  fail "JSON summary: $(tail -1 "$IT_DIR/rec.out")"

step "--fix while the worker counts a producer trickle of 10,000 more"
it_produce_trickle "$IT_DIR/b.jsonl" 500 0.2
fixes=0
while kill -0 "$IT_TRICKLE_PID" 2>/dev/null; do
  reconcile "${range[@]}" --fix
  [ "$rc" -eq 0 ] || fail "reconcile --fix exited $rc: $(cat "$IT_DIR/rec.err")"
  fixes=$((fixes + 1))
  [ "$fixes" -eq 1 ] && { grep -q "all repaired" "$IT_DIR/rec.out" || fail "first --fix repaired nothing: $(cat "$IT_DIR/rec.out")"; }
  sleep 0.3
done
it_trickle_wait
echo "    $fixes --fix runs during the trickle"
[ "$fixes" -ge 3 ] || fail "only $fixes --fix runs overlapped the trickle"
it_wait_consumed 20000 120
it_assert_sums "$IT_DIR/expect"
reconcile "${range[@]}"
[ "$rc" -eq 0 ] || fail "after --fix reconcile still finds: $(cat "$IT_DIR/rec.out")"
it_assert_alive w1 "after the fixes"
grep -qi "deadlock" "$IT_DIR/w1.log" && fail "the worker hit a deadlock"

step "--against a legacy table: 3 over the threshold, 2 under, 1 missing each side"
it_sql "CREATE SCHEMA legacy;
        CREATE TABLE legacy.daily AS SELECT * FROM tally.token_usage_daily;
        CREATE TABLE legacy.close AS SELECT * FROM tally.token_usage_daily"
n=$(it_sql "SELECT count(*) FROM tally.token_usage_daily")
it_sql "CREATE TABLE picks AS SELECT $key, row_number() OVER (ORDER BY tokens DESC, $key) AS r
        FROM tally.token_usage_daily"
it_sql "UPDATE legacy.daily l SET tokens = l.tokens + 500 FROM picks p
        WHERE p.r <= 3 AND (l.tenant_id, l.day, l.token_type, l.operation, l.model, l.agent_id)
          = (p.tenant_id, p.day, p.token_type, p.operation, p.model, p.agent_id);
        UPDATE legacy.daily l SET tokens = l.tokens - 60 FROM picks p
        WHERE p.r IN (4, 5) AND (l.tenant_id, l.day, l.token_type, l.operation, l.model, l.agent_id)
          = (p.tenant_id, p.day, p.token_type, p.operation, p.model, p.agent_id);
        DELETE FROM legacy.daily l USING picks p
        WHERE p.r = 6 AND (l.tenant_id, l.day, l.token_type, l.operation, l.model, l.agent_id)
          = (p.tenant_id, p.day, p.token_type, p.operation, p.model, p.agent_id);
        INSERT INTO legacy.daily (tenant_id, day, token_type, operation, model, agent_id, tokens)
          VALUES ('legacy-only', current_date, 'llm', 'chat', '', '', 5);
        UPDATE legacy.close l SET tokens = l.tokens + 99 FROM picks p
        WHERE p.r <= 10 AND (l.tenant_id, l.day, l.token_type, l.operation, l.model, l.agent_id)
          = (p.tenant_id, p.day, p.token_type, p.operation, p.model, p.agent_id)"
reconcile "${range[@]}" --against legacy.daily
[ "$rc" -eq 1 ] || fail "--against with differences exited $rc"
cat "$IT_DIR/rec.out" | tail -6
want="against legacy.daily $FROM..$TO: $((n + 1)) buckets compared, $((n - 4)) within threshold, 3 over it, 1 missing in legacy.daily, 1 missing in tally"
[ "$(tail -1 "$IT_DIR/rec.out")" = "$want" ] || fail "summary: $(tail -1 "$IT_DIR/rec.out"), expected: $want"
[ "$(grep -c '^over ' "$IT_DIR/rec.out")" -eq 3 ] || fail "3 'over' lines expected"
reconcile "${range[@]}" --against legacy.daily --threshold-pct 50 --json
tail -1 "$IT_DIR/rec.out" | grep -q '"within":'"$((n - 1))"',"over":0,"missing_in_table":1,"missing_in_tally":1' ||
  fail "--threshold-pct 50: $(tail -1 "$IT_DIR/rec.out")"
reconcile "${range[@]}" --against legacy.close
[ "$rc" -eq 0 ] || fail "--against a table within the threshold exited $rc: $(cat "$IT_DIR/rec.out")"
grep -q ": $n buckets compared, $n within threshold, 0 over it, 0 missing in legacy.close, 0 missing in tally$" \
  "$IT_DIR/rec.out" || fail "$(cat "$IT_DIR/rec.out")"
reconcile "${range[@]}" --against legacy.close --threshold 50
[ "$rc" -eq 1 ] || fail "--threshold 50 should put 10 buckets over it"
grep -q ", 10 over it," "$IT_DIR/rec.out" || fail "$(tail -1 "$IT_DIR/rec.out")"

step "usage errors exit 2 naming the flag; no SQL injection through --against"
for args in "--from $FROM" "--from 2024-02-30 --to $TO" "--from $TO --to $FROM" \
  "${range[*]} --threshold 5" "${range[*]} --against legacy.daily --fix" \
  "${range[*]} --against legacy.daily;DROP_TABLE_x" "${range[*]} --against nosuch.table" \
  "--from 2000-01-01 --to $TO --fix"; do
  # shellcheck disable=SC2086
  reconcile $args
  [ "$rc" -eq 2 ] || fail "reconcile $args exited $rc, expected 2"
  grep -qE -- "--from|--to|--threshold|--fix|--against" "$IT_DIR/rec.err" ||
    fail "reconcile $args: $(cat "$IT_DIR/rec.err")"
done
reconcile "${range[@]}" --against 'legacy.daily; DROP TABLE legacy.close'
[ "$rc" -eq 2 ] || fail "an injected --against exited $rc"
[ "$(it_sql "SELECT to_regclass('legacy.close') IS NOT NULL")" = t ] || fail "legacy.close was dropped"
"$TALLY" help reconcile | grep -q -- "--against" || fail "tally help reconcile"
it_worker_stop w1
echo "PASS: reconcile found 2 daily + 1 monthly corruptions, --fix ($fixes runs) repaired them under load, --against counted"
