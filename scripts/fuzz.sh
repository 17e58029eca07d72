#!/usr/bin/env bash
# Coverage-guided fuzzing of the C API: builds the libFuzzer targets (fuzz/; clang, ASan + UBSan,
# coverage instrumentation) into build-fuzz, then runs each from its corpus in fuzz/corpus/<name>
# (read, never written: new inputs go to a scratch folder). Any finding (a crash, a sanitizer
# report, a broken promise of nsa.h, a leak, a timeout, running out of memory) fails the run and
# leaves the input that triggers it under build-fuzz/findings/.
#
#   scripts/fuzz.sh                     every target for 60 s (CI)
#   scripts/fuzz.sh --time 600 fwd bwd  two targets for 10 minutes each
#   scripts/fuzz.sh --runs 1000000      the long campaign: one million executions per target
#   scripts/fuzz.sh --merge ...         afterwards, add the inputs that found new coverage to the
#                                       corpus in the repository (libFuzzer -merge=1)
#   replay one input:  build-fuzz/fuzz/fuzz_<name> <file>
#
# Targets run --jobs at a time (default: the number of cores); each is one process whose calls
# use 0 (OpenMP's default) to 3 library threads, as the input chooses.
set -euo pipefail
cd "$(dirname "$0")/.."

limit=(-max_total_time=60)
jobs=$(nproc)
merge=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

scripts/setup.sh
mkdir -p build-fuzz
if ! CC=clang CXX=clang++ BUILD_DIR=build-fuzz scripts/build.sh -DNSA_FUZZ=ON -DNSA_BUILD_TESTS=OFF \
  -DNSA_BUILD_TOOLS=OFF -DNSA_BUILD_BENCH=OFF >build-fuzz/build.log 2>&1; then
  tail -60 build-fuzz/build.log >&2
  echo "fuzz.sh: the build failed (build-fuzz/build.log)" >&2
  exit 1
fi
# The list has no final newline: read reports end of file, and under set -e that must not stop us.
if [ ${#targets[@]} -eq 0 ]; then IFS=';' read -r -a targets < build-fuzz/fuzz_targets.txt || true; fi
if [ ${#targets[@]} -eq 0 ]; then echo "fuzz.sh: no targets in build-fuzz/fuzz_targets.txt" >&2; exit 1; fi

out=build-fuzz/findings
mkdir -p "$out"
# The library's OpenMP threads sleep when idle instead of spinning: a target runs thousands of
# short calls per second, and spinning threads of one target would starve the other.
export OMP_WAIT_POLICY=passive
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
  local t=$1 corpus=fuzz/corpus/$1 scratch
  scratch=$(mktemp -d)
  mkdir -p "$corpus"
  local rc=0
  build-fuzz/fuzz/fuzz_"$t" "${limit[@]}" -timeout=30 -rss_limit_mb=4096 -max_len=2048 \
    -print_final_stats=1 -artifact_prefix="$out/$t-" "$scratch" "$corpus" >"$out/$t.log" 2>&1 || rc=$?
  if [ "$merge" = 1 ] && [ $rc -eq 0 ]; then
    build-fuzz/fuzz/fuzz_"$t" -merge=1 "$corpus" "$scratch" >>"$out/$t.log" 2>&1 || rc=$?
  fi
  rm -rf "$scratch"
  local execs cov
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*/[0-9]*[a-zA-Z]*' "$out/$t.log" | tail -1)
  printf 'fuzz %-13s %s  executions %s  %s\n' "$t" "$([ $rc -eq 0 ] && echo ok || echo FAILED)" \
    "${execs:-?}" "$cov"
  echo "$rc" >"$out/$t.rc"
  if [ $rc -ne 0 ]; then
    grep -v '^#[0-9]\|^INFO\|NEW_FUNC' "$out/$t.log" | tail -40
    return 1
  fi
}
export -f run_one
export out merge
export limit_str="${limit[*]}"

start=$SECONDS
rm -f "$out"/*.rc
printf '%s\n' "${targets[@]}" |
  xargs -P "$jobs" -I{} bash -c 'limit=($limit_str); run_one "$@"' _ {} || true
passed=0
for t in "${targets[@]}"; do
  [ "$(cat "$out/$t.rc" 2>/dev/null)" = 0 ] && passed=$((passed + 1))
done
failed=$((${#targets[@]} - passed))
echo "fuzz: ${#targets[@]} targets (${limit[*]}) in $((SECONDS - start)) s: $([ $failed = 0 ] && echo clean || echo "FINDINGS, see $out")"
echo "fuzz: $passed passed, $failed failed"
[ $failed = 0 ]
