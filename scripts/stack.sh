#!/usr/bin/env bash
# A private local stack for tally: Postgres and Redis from Debian's
# packages and `tally devbroker`, each on a free port, all under one
# directory. Source it for the functions, or run it:
#
#   scripts/stack.sh start DIR [PARTITIONS]   start all, write DIR/env
#   scripts/stack.sh stop DIR                 stop all
#
# DIR/env exports TALLY_BROKERS, TALLY_PG_DSN, TALLY_REDIS_URL, PSQL.
# TALLY (path of the tally binary) must be set or found in build/.
# STACK_BROKER_ARGS adds devbroker flags (e.g. "-X debug=mock --log-level
# debug": the mock cluster's group coordinator in DIR/broker/log).

stack_free_port() {
  local port
  for _ in $(seq 1 100); do
    # Below the kernel's ephemeral range (32768+), where outgoing
    # connections could hold the port.
    port=$((10000 + RANDOM % 22000))
    if ! (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "stack: no free port" >&2
  return 1
}

stack_pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] || { echo "stack: Postgres binaries not found" >&2; return 1; }
  echo "$d"
}

# Runs a Postgres tool as the unprivileged owner of the data directory
# (initdb and postgres refuse to run as root).
stack_pg_as() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

stack_pg_start() {
  local dir=$1 bin
  bin=$(stack_pg_bin) || return 1
  stack_pg_as "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/log" -w -t 60 \
    -o "-p $(cat "$dir/pg/port") -k $dir/pg -c listen_addresses=127.0.0.1 ${STACK_PG_OPTS:-}" \
    start >/dev/null
}

stack_pg_stop() {
  local dir=$1 mode=${2:-fast} bin
  bin=$(stack_pg_bin) || return 1
  stack_pg_as "$bin/pg_ctl" -D "$dir/pg/data" -m "$mode" -w -t 60 stop \
    >/dev/null 2>&1 || true
}

stack_start_pg() {
  local dir=$1 bin port
  bin=$(stack_pg_bin) || return 1
  mkdir -p "$dir/pg"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir/pg"; chmod 755 "$dir"; fi
  port=$(stack_free_port)
  echo "$port" > "$dir/pg/port"
  stack_pg_as "$bin/initdb" -D "$dir/pg/data" -U tally -A trust \
    --no-sync -E UTF8 --locale=C.UTF-8 >"$dir/pg/initdb.log" 2>&1 || {
    cat "$dir/pg/initdb.log" >&2; return 1; }
  cat >> "$dir/pg/data/postgresql.conf" <<CONF
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
# A new cluster creates each of its WAL segments (16 MiB) as it goes,
# and by default writes it full of zeros first, which cost Postgres more
# CPU than the bench's worker did in some runs; a server in service
# recycles old segments instead. Off, a new segment is created with
# one write at its end; WAL is still fsynced as before (durability is
# the same).
wal_init_zero = off
max_connections = 50
unix_socket_directories = '$dir/pg'
CONF
  stack_pg_start "$dir" || { cat "$dir/pg/log" >&2; return 1; }
  stack_pg_as "$bin/createdb" -h 127.0.0.1 -p "$port" -U tally tally
}

stack_start_redis() {
  local dir=$1 port
  mkdir -p "$dir/redis"
  port=$(stack_free_port)
  echo "$port" > "$dir/redis/port"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/redis" \
    --save "" --appendonly no --daemonize yes \
    --pidfile "$dir/redis/pid" --logfile "$dir/redis/log" >/dev/null
  for _ in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "stack: redis did not start" >&2
  return 1
}

stack_start_broker() {
  local dir=$1 partitions=${2:-8}
  mkdir -p "$dir/broker"
  rm -f "$dir/broker/bootstrap"
  "$TALLY" devbroker --partitions "$partitions" \
    --bootstrap-file "$dir/broker/bootstrap" \
    --control "$dir/broker/control" ${STACK_BROKER_ARGS:-} \
    >"$dir/broker/out" 2>"$dir/broker/log" &
  echo $! > "$dir/broker/pid"
  for _ in $(seq 1 100); do
    [ -s "$dir/broker/bootstrap" ] && return 0
    sleep 0.1
  done
  echo "stack: devbroker did not start" >&2
  cat "$dir/broker/log" >&2
  return 1
}

stack_start() {
  local dir=$1 partitions=${2:-8}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  stack_start_pg "$dir" || return 1
  stack_start_redis "$dir" || return 1
  stack_start_broker "$dir" "$partitions" || return 1
  cat > "$dir/env" <<ENV
export TALLY_PG_DSN="host=127.0.0.1 port=$(cat "$dir/pg/port") user=tally dbname=tally"
export TALLY_BROKERS="$(cat "$dir/broker/bootstrap")"
export TALLY_REDIS_URL="redis://127.0.0.1:$(cat "$dir/redis/port")/0"
export PSQL="$(stack_pg_bin)/psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $(cat "$dir/pg/port") -U tally -d tally"
ENV
}

stack_stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  if [ -f "$dir/broker/pid" ]; then
    kill "$(cat "$dir/broker/pid")" 2>/dev/null || true
    wait "$(cat "$dir/broker/pid")" 2>/dev/null || true
  fi
  if [ -f "$dir/redis/pid" ]; then
    kill "$(cat "$dir/redis/pid")" 2>/dev/null || true
  fi
  if [ -d "$dir/pg/data" ]; then
    stack_pg_stop "$dir" immediate
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  here=$(cd "$(dirname "$0")/.." && pwd)
  TALLY=${TALLY:-$here/build/worker/tally}
  case "${1:-}" in
    start) stack_start "$2" "${3:-8}"; cat "$2/env" ;;
    stop) stack_stop "$2" ;;
    *) echo "usage: $0 start|stop DIR [PARTITIONS]" >&2; exit 2 ;;
  esac
fi

# CPU seconds (user+sys) of the given pids, summed, with 2 decimals; for
# the benchmarks.
stack_cpu_s() {
  local t=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    t=$((t + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "scale=2; $t / $(getconf CLK_TCK)" | bc
}
