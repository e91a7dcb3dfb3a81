#!/usr/bin/env bash
# Installs what tally needs to build, run and test, from Debian's packages.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  librdkafka-dev libjansson-dev libhiredis-dev libpq-dev libmicrohttpd-dev
  libcmocka-dev
  postgresql redis-server kcat procps iproute2 curl bc
  python3 python3-jsonschema python3-confluent-kafka python3-psycopg2
  docker-compose prometheus
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts a system Redis and Postgres where it can; tally uses its own
# private servers on free ports, so these are not needed.
