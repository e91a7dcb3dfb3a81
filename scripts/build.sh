#!/usr/bin/env bash
# Configures and builds tally into DIR (default build/) with the given
# CMake options; used by demo.sh, test.sh and bench.sh.
#   scripts/build.sh [DIR] [cmake options...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/build}
shift || true
cmake -S "$here" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$dir" -j"$(nproc)" >/dev/null
