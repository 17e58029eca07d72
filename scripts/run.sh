#!/usr/bin/env bash
# The main job: set up, build, then a real demonstration on built-in defaults: the build and
# machine facts, one paper-config case (one GQA group of 16 query heads, Dk=192, Dv=128,
# T=1000) run through every backend, forward and backward, and checked against the float64
# reference, then the NSA forward timed against the dense baseline at 4k and 8k tokens, the
# backward against the dense flash backward at 8k, and KV-cache decode steps against dense
# decode at 8k and 32k cached tokens (docs/benchmarks.md has more).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/tools/nsa info
build/tools/nsa check
build/tools/nsa bench --lengths 4096,8192 --repeats 1
build/tools/nsa bench --pass bwd --lengths 8192 --repeats 1
build/tools/nsa bench decode --lengths 8192,32768 --batch 1 --dtype bf16
