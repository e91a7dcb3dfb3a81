#!/usr/bin/env bash
# Fuzzes the decoders with libFuzzer: installs clang from Debian, builds
# the fuzz_* targets (tests/fuzz/, ASan + UBSan, no recovery) into
# build-fuzz/ and runs each for SECONDS, one after another.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   (default 60; all targets)
#
# Targets: usage_event, invalidation, cache_key. Each starts from the
# examples' input.json files (schemas/examples/<kind>/), the extra seeds
# in tests/fuzz/seeds/<target>/ and the regressions in
# tests/fuzz/regressions/<target>/; none of these is written to.
# Everything the run produces stays out of the source tree, under
# $TALLY_FUZZ_DIR (default build-fuzz/run/):
#   corpus/<target>/     inputs that found new coverage, kept between runs
#                        so that the next run goes on from there
#   artifacts/<target>/  crashes, timeouts, leaks, each also minimized
#                        (min-*); fix the bug, then copy the minimized
#                        input to tests/fuzz/regressions/<target>/ under a
#                        name that says what it was
#   logs/<target>.log    libFuzzer's output
# Exit status 0 if no target failed, 1 otherwise, 2 on usage errors.
# Environment: FUZZ_JOBS=N runs N libFuzzer workers per target (-fork=N).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

all=(usage_event invalidation cache_key)
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
case $secs in
'' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a number" >&2; exit 2 ;;
esac
for t in "${targets[@]}"; do
  case " ${all[*]} " in
  *" $t "*) ;;
  *) echo "fuzz.sh: unknown target $t (${all[*]})" >&2; exit 2 ;;
  esac
done

# clang 14 is bookworm's default clang; its libFuzzer runtime
# (libclang_rt.fuzzer-x86_64.a) is in libclang-rt-14-dev.
bash "$here/scripts/deps.sh"
missing=()
for p in clang-14 libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "fuzz.sh: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
fi

build=$here/build-fuzz
CC=clang-14 cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTALLY_FUZZ=ON >/dev/null
cmake --build "$build" -j"$(nproc)" \
  --target "${targets[@]/#/fuzz_}" >/dev/null

work=${TALLY_FUZZ_DIR:-$build/run}
failed=()
for t in "${targets[@]}"; do
  case $t in
  usage_event) kind=token-usage ;;
  *) kind=cache-invalidation ;;
  esac
  # The examples' inputs under their case names, in a scratch folder
  # (libFuzzer would read the expected/ctx files of a case folder too).
  seeds=$work/seeds/$t
  rm -rf "$seeds"
  mkdir -p "$seeds" "$work/corpus/$t" "$work/artifacts/$t" "$work/logs"
  for f in "$here/schemas/examples/$kind"/*/input.json; do
    cp "$f" "$seeds/$(basename "$(dirname "$f")").json"
  done
  dirs=("$work/corpus/$t" "$seeds")
  for d in "$here/tests/fuzz/seeds/$t" "$here/tests/fuzz/regressions/$t"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  fork=()
  [ -n "${FUZZ_JOBS:-}" ] && fork=(-fork="$FUZZ_JOBS" -ignore_crashes=1)

  log=$work/logs/$t.log
  echo "== fuzz_$t for ${secs}s (log: $log)"
  rc=0
  touch "$work/artifacts/$t/.start"
  (cd "$work/artifacts/$t" &&
    "$build/tests/fuzz/fuzz_$t" -max_total_time="$secs" -max_len=16384 \
      -timeout=10 -dict="$here/tests/fuzz/json.dict" -print_final_stats=1 \
      -artifact_prefix="$work/artifacts/$t/" "${fork[@]}" "${dirs[@]}") \
    >"$log" 2>&1 || rc=$?
  grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$log" | tail -2 ||
    true
  # With FUZZ_JOBS libFuzzer goes on after a crash: its artifacts tell.
  mapfile -t new < <(find "$work/artifacts/$t" -maxdepth 1 -type f -newer \
    "$work/artifacts/$t/.start" \( -name 'crash-*' -o -name 'timeout-*' \
    -o -name 'leak-*' -o -name 'oom-*' \) | sort)
  if [ $rc -ne 0 ] || [ ${#new[@]} -gt 0 ]; then
    failed+=("$t")
    echo "fuzz_$t FAILED (rc=$rc):" >&2
    grep -E 'ERROR:|invariant failed|SUMMARY' "$log" | head -5 >&2 || true
    for a in "${new[@]}"; do
      min=$work/artifacts/$t/min-$(basename "$a")
      "$build/tests/fuzz/fuzz_$t" -minimize_crash=1 -runs=20000 \
        -exact_artifact_path="$min" "$a" >>"$log.min" 2>&1 || true
      [ -f "$min" ] || cp "$a" "$min"
      echo "  input: $min ($(wc -c <"$min") bytes)" >&2
    done
  fi
done
echo "corpus and artifacts: $work"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]}" >&2
  exit 1
fi
