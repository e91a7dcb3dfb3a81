#!/usr/bin/env bash
# All of tally's tests: installs what they need, builds twice (ASan+UBSan
# for the unit tests, RelWithDebInfo for the integration tests against
# real Postgres and tally devbroker) and runs ctest.
#   scripts/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

bash "$here/scripts/deps.sh"
echo "== unit tests (ASan + UBSan)"
bash "$here/scripts/build.sh" "$here/build-asan" -DTALLY_SANITIZE=ON
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir "$here/build-asan" \
  --output-on-failure -j"$(nproc)" -LE integration
echo "== integration tests"
bash "$here/scripts/build.sh" "$here/build"
ctest --test-dir "$here/build" --output-on-failure -L integration
