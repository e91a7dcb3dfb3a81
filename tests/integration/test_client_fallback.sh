#!/usr/bin/env bash
# Fallback, never loss: with the broker unreachable (nothing listening at
# the client's brokers address) events land through the SQL path
# tally.track_token_usage(); with Postgres stopped too they land in the
# spool; once both are back, the first events sent again through Kafka
# and the spool replayed twice with `tally produce --file SPOOL` count
# every event exactly once, with no conflict.
#
# usage: test_client_fallback.sh TALLY TALLY_GEN
source "$(dirname "$0")/client_lib.sh"
it_setup "$1" "$2" 4
T0=$SECONDS
spool="$IT_DIR/fallback.spool"

client_worker_start

step "1. broker unreachable: 400 events and 100 re-calls through SQL"
drive fallback a "$IT_DIR"
[ ! -s "$spool" ] || fail "events were spooled while Postgres was up"
grep -q "recorded through SQL" "$IT_DIR/drive.log" ||
  fail "the SQL fallbacks are not logged"
it_assert_sums "$IT_DIR/fallback.expect.a"
echo "    $(it_sql "SELECT sum(events) FROM tally.token_usage_daily") events" \
  "counted through SQL"

step "2. Postgres stopped too: 300 events into the spool"
stack_pg_stop "$IT_DIR" fast
drive fallback b "$IT_DIR"
[ "$(wc -l <"$spool")" = 300 ] ||
  fail "the spool has $(wc -l <"$spool") lines, expected 300"
grep -q "spooled to $spool" "$IT_DIR/drive.log" ||
  fail "the spooled events are not logged"

step "3. both back: the first 400 again through Kafka, the spool replayed twice"
stack_pg_start "$IT_DIR" || fail "Postgres did not start again"
drive fallback resend "$IT_DIR"
it_produce "$spool"
it_produce "$spool"
it_wait_consumed 1000 120
it_merge_expect "$IT_DIR/fallback.expect" "$IT_DIR/fallback.expect.a" \
  "$IT_DIR/fallback.expect.b"
it_assert_sums "$IT_DIR/fallback.expect"
client_assert_no_conflicts
echo "    $(it_sql "SELECT sum(events) FROM tally.token_usage_daily") events," \
  "each once; $(client_metric_sum tally_usage_duplicates_total) duplicates," \
  "0 conflicts"

it_worker_stop w1
echo "PASS: SQL, then spool, then replay: every event counted once" \
  "($((SECONDS - T0)) s)"
