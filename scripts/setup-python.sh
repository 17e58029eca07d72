#!/usr/bin/env bash
# The Python environment for nsa's Python package and its tests: a virtual environment in .venv
# (or $NSA_VENV) with NumPy, pytest, matplotlib (scripts/plot_bench.py), torch (PyPI's wheel: a
# CUDA build of about 4 GB with its NVIDIA packages; it runs on the CPU too), and the build tools
# `pip install .` uses (scikit-build-core, nanobind). Safe to run twice: does nothing when
# everything imports.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${NSA_VENV:-.venv}
python=${PYTHON:-python3}
packages=("numpy" "pytest" "torch>=2.4" "scikit-build-core>=0.10" "nanobind>=2.0" "tqdm" "matplotlib")

if [ -x "$venv/bin/python" ] &&
   "$venv/bin/python" -c "import numpy, pytest, torch, scikit_build_core, nanobind, tqdm, matplotlib" 2>/dev/null; then
  echo "setup-python: $venv complete ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's own python3 keeps venv in a separate package.
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-venv
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
fi
echo "setup-python: installing ${packages[*]} into $venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${packages[@]}"
