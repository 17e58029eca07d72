#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test nsa. Safe to run twice: it installs
# only the packages that are missing, and does nothing when all are present.
set -euo pipefail

packages=(
  g++ cmake ninja-build pkg-config   # toolchain
  libgtest-dev libbenchmark-dev      # tests and microbenchmarks
  libcli11-dev nlohmann-json3-dev    # the nsa command-line tool
  libhwy-dev                         # portable SIMD with runtime dispatch (CPU kernels)
  libopenblas-dev                    # sgemm for the mlp compression
  clang libomp-dev libclang-rt-dev   # the clang build, and libFuzzer with its sanitizers (fuzz/)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
