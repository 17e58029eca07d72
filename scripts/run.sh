#!/usr/bin/env bash
# The main job: set up, build, then a real demonstration on built-in defaults: the build and
# machine facts, and one paper-config case (one GQA group of 16 query heads, Dk=192, Dv=128,
# T=1000) run through every backend and checked against the float64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/tools/nsa info
build/tools/nsa check
