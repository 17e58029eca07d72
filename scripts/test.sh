#!/usr/bin/env bash
# The whole test suite: set up, build, run every C++ test with ctest (extra arguments go to ctest),
# then the Python suite (scripts/test-python.sh: .venv with torch, `pip install .`, pytest).
# NSA_PYTHON=0 skips the Python suite (the C++ suite needs no Python packages).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure --parallel "$(nproc)" "$@"
if [ "${NSA_PYTHON:-1}" != 0 ]; then
  scripts/test-python.sh
fi
