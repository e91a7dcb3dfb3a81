#!/usr/bin/env bash
# cache.c against a private redis-server: runs tests/unit/test_cache_redis
# with a server of its own, which the tests flush, shut down and restart.
#
#   test_cache.sh TEST_CACHE_REDIS [--no-bench]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../scripts/stack.sh
source "$root/scripts/stack.sh"

bin=$(readlink -f "$1")
bench=--bench
[ "${2:-}" = "--no-bench" ] && bench=
dir=$(mktemp -d /tmp/tally-cache.XXXXXX)

cleanup() {
  local rc=$?
  set +e
  stack_stop "$dir"
  if [ $rc -ne 0 ]; then
    echo "=== test failed (rc=$rc); redis log:" >&2
    tail -20 "$dir/redis/log" >&2
  fi
  rm -rf "$dir"
  exit $rc
}
trap cleanup EXIT

stack_start_redis "$dir"
port=$(cat "$dir/redis/port")
# How stack_start_redis started it, on the same port, for the outage test.
restart="redis-server --port $port --bind 127.0.0.1 --dir $dir/redis"
restart+=" --save '' --appendonly no --daemonize yes"
restart+=" --pidfile $dir/redis/pid --logfile $dir/redis/log"

"$bin" --redis "redis://127.0.0.1:$port/0" --restart "$restart" $bench
