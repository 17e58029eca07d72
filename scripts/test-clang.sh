#!/usr/bin/env bash
# The whole test suite built with clang (Debian's, 14 on Debian 12) instead of g++: the library
# and its tests must compile with both, and pass with both. Extra arguments go to ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CC=clang CXX=clang++ BUILD_DIR=build-clang scripts/build.sh -DNSA_BUILD_BENCH=OFF
ctest --test-dir build-clang --output-on-failure --parallel "$(nproc)" "$@"
