#!/usr/bin/env bash
# tally offsets show / reset: positions in Postgres and in the Kafka group
# move together (to a time, to explicit offsets), refused while a worker
# runs, --dry-run changes nothing, the lag shown matches, and a worker
# started after a reset consumes from there (what it counted before is
# recognised as duplicates: the sums stay exact).
#
# usage: test_ops_offsets.sh TALLY TALLY_GEN
source "$(dirname "$0")/lib.sh"
it_setup "$1" "$2" 4

# Postgres positions of the group as "partition=offset,..." and the sum.
pg_positions() {
  it_sql "SELECT string_agg(partition || '=' || next_offset, ','
          ORDER BY partition) FROM tally.consumer_offsets
          WHERE group_id = 'tally' AND topic = 'token-usage'"
}
# The same from `tally offsets show --json`: column postgres or kafka.
show_column() {
  "$TALLY" offsets show --topic token-usage --json |
    "$IT_PYTHON" -c 'import json, sys
rows = [json.loads(l) for l in sys.stdin]
print(",".join("%d=%s" % (r["partition"], r[sys.argv[1]]) for r in rows))' "$1"
}
epochs() {
  it_sql "SELECT string_agg(epoch::text, ',' ORDER BY partition)
          FROM tally.consumer_offsets WHERE group_id = 'tally'"
}

step "two batches of events, produced a few seconds apart"
"$TALLY_GEN" --count 6000 --seed 21 --tenants 200 --dup-rate 0.05 \
  --expect "$IT_DIR/expect" >"$IT_DIR/events.jsonl"
head -n 2500 "$IT_DIR/events.jsonl" >"$IT_DIR/a.jsonl"
tail -n +2501 "$IT_DIR/events.jsonl" >"$IT_DIR/b.jsonl"
it_produce "$IT_DIR/a.jsonl"
sleep 1.5
between=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
sleep 1.5
it_produce "$IT_DIR/b.jsonl"
total=6000

step "a worker consumes everything; offsets show: no lag"
worker_args=(-X session.timeout.ms=3000)
it_worker_start w1 "${worker_args[@]}"
it_wait_consumed "$total" 120
sleep 1 # the Kafka commit follows the Postgres one
[ "$(show_column kafka)" = "$(pg_positions)" ] ||
  fail "Kafka's committed offsets $(show_column kafka) != Postgres $(pg_positions)"
"$TALLY" offsets show >"$IT_DIR/show.txt"
grep -E '^token-usage +tally +total +0$' "$IT_DIR/show.txt" >/dev/null ||
  fail "offsets show does not say lag 0: $(cat "$IT_DIR/show.txt")"

step "reset refused while the worker runs (exit 1), nothing moves"
before=$(pg_positions)
before_epochs=$(epochs)
rc=0
"$TALLY" offsets reset --to earliest --timeout 10 >"$IT_DIR/refused.out" \
  2>"$IT_DIR/refused.err" || rc=$?
[ "$rc" -eq 1 ] || fail "reset with a running worker exited $rc, expected 1"
grep -q "active members" "$IT_DIR/refused.err" ||
  fail "the refusal does not say why: $(cat "$IT_DIR/refused.err")"
[ "$(pg_positions)" = "$before" ] || fail "a refused reset moved Postgres"
it_assert_alive w1 "after a refused reset"

step "stop the worker (kill -9; its 3 s session expires)"
it_worker_kill9 w1
sleep 4
before_epochs=$(epochs)

step "--dry-run prints the plan and changes nothing"
"$TALLY" offsets reset --to earliest --dry-run >"$IT_DIR/dry.out" ||
  fail "dry run failed"
grep -q "dry run: nothing changed" "$IT_DIR/dry.out" || fail "no dry-run line"
[ "$(grep -cE '^ +[0-9]+ .* 0$' "$IT_DIR/dry.out")" -eq 4 ] ||
  fail "the plan does not move 4 partitions to 0: $(cat "$IT_DIR/dry.out")"
[ "$(pg_positions)" = "$before" ] || fail "--dry-run moved Postgres"
[ "$(epochs)" = "$before_epochs" ] || fail "--dry-run bumped epochs"
[ "$(show_column kafka)" = "$before" ] || fail "--dry-run moved Kafka"

step "reset --to $between: both move to the first message of batch two"
"$TALLY" offsets reset --to "$between" >"$IT_DIR/reset1.out" \
  2>"$IT_DIR/reset1.err" || fail "reset to a time failed: $(cat "$IT_DIR/reset1.err")"
sum=$(it_committed)
[ "$sum" -eq 2500 ] || fail "after the reset to $between Postgres sums to $sum, expected 2500"
[ "$(show_column kafka)" = "$(pg_positions)" ] ||
  fail "Kafka $(show_column kafka) != Postgres $(pg_positions) after the reset"
[ "$(show_column postgres)" = "$(pg_positions)" ] || fail "offsets show's postgres column is wrong"
new_epochs=$(epochs)
paste -d ' ' <(tr , '\n' <<<"$before_epochs") <(tr , '\n' <<<"$new_epochs") |
  while read -r a b; do [ "$b" -gt "$a" ] || exit 1; done ||
  fail "epochs not bumped: $before_epochs -> $new_epochs"

step "offsets show: the lag is the log end minus the Postgres position"
"$TALLY" offsets show --topic token-usage --json >"$IT_DIR/show.json"
"$IT_PYTHON" - "$IT_DIR/show.json" "$((total - 2500))" <<'PY' || fail "lag does not match"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 4, rows
for r in rows:
    assert r["lag"] == r["log_end"] - r["postgres"], r
    assert r["kafka"] == r["postgres"], r
assert sum(r["lag"] for r in rows) == int(sys.argv[2]), rows
print("    lag per partition:", [r["lag"] for r in rows])
PY
"$TALLY" offsets show --topic token-usage |
  grep -E "^token-usage +tally +total +$((total - 2500))$" >/dev/null ||
  fail "the text table's total lag is not $((total - 2500))"

step "reset --to 0=5,1=7: only those partitions move, in both places"
p2=$(it_sql "SELECT next_offset FROM tally.consumer_offsets WHERE partition = 2")
"$TALLY" offsets reset --to 0=5,1=7 >/dev/null 2>"$IT_DIR/reset2.err" ||
  fail "explicit reset failed: $(cat "$IT_DIR/reset2.err")"
pos=$(pg_positions)
[[ "$pos" == 0=5,1=7,2=$p2,* ]] || fail "positions after 0=5,1=7: $pos"
[ "$(show_column kafka)" = "$pos" ] || fail "Kafka $(show_column kafka) != $pos"

step "usage errors exit 2 and name the flag"
for bad in "--to bogus" "--to 0=99999999" "--to 9=1" "--topic nope --to latest" ""; do
  rc=0
  # shellcheck disable=SC2086
  "$TALLY" offsets reset $bad >/dev/null 2>"$IT_DIR/bad.err" || rc=$?
  [ "$rc" -eq 2 ] || fail "offsets reset $bad exited $rc, expected 2"
  grep -qE -- "--to|--topic" "$IT_DIR/bad.err" ||
    fail "offsets reset $bad: message names no flag: $(cat "$IT_DIR/bad.err")"
done
"$TALLY" help offsets | grep -q "tally offsets reset" || fail "tally help offsets"
"$TALLY" offsets reset --help | grep -q -- "--dry-run" || fail "offsets reset --help"

step "the invalidation group moves in Kafka only"
"$TALLY" offsets reset --topic cache-invalidation --to latest >/dev/null \
  2>"$IT_DIR/reset3.err" || fail "invalidation reset failed: $(cat "$IT_DIR/reset3.err")"
"$TALLY" offsets show --topic cache-invalidation --json |
  "$IT_PYTHON" -c 'import json, sys
rows = [json.loads(l) for l in sys.stdin]
assert rows and all(r["kafka"] == r["log_end"] and r["postgres"] is None
                    and r["group"] == "tally.invalidation" for r in rows), rows' ||
  fail "the invalidation group's offsets did not move to the log end"
[ "$(pg_positions)" = "$pos" ] || fail "the invalidation reset touched Postgres"

step "a worker resumes from the reset positions; duplicates, exact sums"
it_worker_start w2 "${worker_args[@]}"
it_wait_log w2 "token-usage \[0\]: claimed .*resuming at offset 5" 60
it_wait_consumed "$total" 120
it_assert_sums "$IT_DIR/expect"
it_worker_stop w2
echo "PASS: offsets reset to a time and to offsets moved Postgres and Kafka together"
