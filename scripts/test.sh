#!/usr/bin/env bash
# All of tally's tests: installs what they need, then
#  1. builds with ASan + UBSan (no recovery) into build-asan/ and runs the
#     whole suite there, unit tests (fuzz corpus replays included) and
#     integration tests against real Postgres, Redis and tally devbroker:
#     any leak, invalid access or undefined behaviour in any tally process
#     fails the test it happens in;
#  2. builds RelWithDebInfo into build/ and runs there only what needs
#     an uninstrumented binary: test_worker_dlq.sh and
#     test_worker_invalidation.sh with the worker under valgrind memcheck
#     (label valgrind; no invalid access, no leak), and the peak-RSS
#     tests (label rss): messages near --max-message-bytes, and both
#     pipelines with --consumers 2 draining backlogs at once.
# About 12 minutes on 2 cores (ASan costs the integration suite next to
# nothing: it waits on Postgres, the broker and timeouts, not on the worker).
#   scripts/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

bash "$here/scripts/deps.sh"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
echo "== ASan + UBSan build"
bash "$here/scripts/build.sh" "$here/build-asan" -DTALLY_SANITIZE=ON
echo "== unit tests (ASan + UBSan)"
ctest --test-dir "$here/build-asan" --output-on-failure -j"$(nproc)" \
  -LE integration
echo "== integration tests (ASan + UBSan)"
ctest --test-dir "$here/build-asan" --output-on-failure -L integration
unset ASAN_OPTIONS UBSAN_OPTIONS
echo "== optimised build: valgrind memcheck, peak RSS"
bash "$here/scripts/build.sh" "$here/build"
ctest --test-dir "$here/build" --output-on-failure -L "valgrind|rss"
