# Helpers of the client tests (test_client*.sh) on top of lib.sh: the
# driver (client_drive.py) with Debian's python3, the worker's metrics,
# a subscriber to cache:invalidations.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENT_DRIVE="$IT_ROOT/tests/python/client_drive.py"

# Runs a mode of the driver, its log in $IT_DIR/drive.log: drive MODE ARGS...
drive() {
  echo "=== drive $*" >>"$IT_DIR/drive.log"
  /usr/bin/python3 "$CLIENT_DRIVE" "$@" 2>>"$IT_DIR/drive.log" | tee -a "$IT_DIR/drive.log" ||
    { tail -30 "$IT_DIR/drive.log" >&2; fail "client_drive.py $1 failed"; }
}

# Starts worker w1 with its metrics on a free port ($CLIENT_METRICS).
client_worker_start() {
  CLIENT_METRICS="127.0.0.1:$(it_free_port)"
  it_worker_start w1 --metrics-addr "$CLIENT_METRICS" "$@"
  it_wait_log w1 "rebalance \(token-usage\): assigned [1-9]" 60
}

# Sum of every series of a metric: client_metric_sum NAME
client_metric_sum() {
  curl -fsS --max-time 5 "http://$CLIENT_METRICS/metrics" |
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 }
                   END { printf "%d\n", s }'
}

# Fails unless the worker saw no conflicting payload (metric and log).
client_assert_no_conflicts() {
  local c
  c=$(client_metric_sum tally_usage_conflicts_total)
  [ "$c" = 0 ] || fail "tally_usage_conflicts_total is $c"
  if grep -q "conflict:" "$IT_DIR/w1.log"; then
    grep "conflict:" "$IT_DIR/w1.log" | head -5 >&2
    fail "conflicts in the worker's log"
  fi
}

# Messages the worker has consumed and committed so far.
client_messages() {
  it_committed
}
