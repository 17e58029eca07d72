#!/usr/bin/env bash
# Quiet against loaded, in one run: each `nsa bench` command given (or the default set) runs
# quiet, then beside one busy process started in its own session (`setsid`, as a data loader or
# another service would run: a loop that never sleeps), which is stopped afterwards. Prints both
# JSON rows per command and a summary table (loaded / quiet time) on stdout.
#
#   scripts/bench_shared.sh                    # decode bf16 32k, forward f32 16k, 2 threads
#   scripts/bench_shared.sh "bench decode --lengths 65536 --batch 1 --dtype bf16"
set -euo pipefail
cd "$(dirname "$0")/.."
nsa=${NSA:-build/tools/nsa}
if [ $# -eq 0 ]; then
  set -- "bench decode --lengths 32768 --batch 1 --dtype bf16 --threads 2 --repeats 9" \
         "bench --lengths 16384 --threads 2 --repeats 3"
fi
busy_pid=
stop_busy() { if [ -n "$busy_pid" ]; then kill -- -"$busy_pid" 2>/dev/null || true; busy_pid=; fi; }
trap stop_busy EXIT
summary=()
for cmd in "$@"; do
  echo "quiet:  nsa $cmd" >&2
  quiet=$($nsa $cmd --json)
  setsid sh -c 'while :; do :; done' &
  busy_pid=$!
  sleep 1
  echo "loaded: nsa $cmd (busy loop pid $busy_pid)" >&2
  loaded=$($nsa $cmd --json)
  stop_busy
  echo "{\"command\": \"nsa $cmd\", \"quiet\": $quiet, \"loaded\": $loaded}"
  summary+=("$(python3 - "$cmd" "$quiet" "$loaded" <<'PY'
import json, sys
cmd, quiet, loaded = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for q, l in zip(quiet, loaded):
    dense = "" if q.get("dense_ms") is None or l.get("dense_ms") is None else (
        f" | {q['dense_ms']:.3f} | {l['dense_ms']:.3f} | {l['dense_ms'] / q['dense_ms']:.2f}x")
    print(f"| nsa {cmd} (T={q['T']}) | {q['ms']:.3f} | {l['ms']:.3f} | {l['ms'] / q['ms']:.2f}x"
          f"{dense} |")
PY
)")
done
echo "| command | NSA quiet ms | NSA loaded ms | loaded / quiet | dense quiet ms | dense loaded ms | loaded / quiet |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${summary[@]}"
