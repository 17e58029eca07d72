#!/usr/bin/env bash
# The Python suite: sets up .venv (scripts/setup-python.sh), installs the package from this
# checkout with `pip install .` (the C++ library and the extension built by scikit-build-core in
# build-py/, reused by the next run), then runs pytest on tests/python. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-python.sh
venv=${NSA_VENV:-.venv}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# No build isolation: the build tools are in the venv already (and a machine without network can
# build too).
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps .
# From the repository root `import nsa` finds the installed package (python/ is not on the path).
"$venv/bin/python" -m pytest -q tests/python "$@"
