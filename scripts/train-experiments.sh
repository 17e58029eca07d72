#!/usr/bin/env bash
# The trainability experiments of docs/training.md, end to end: set up .venv, install the package,
# train the three twins on tinyshakespeare and on passkey retrieval, evaluate the passkey runs,
# measure training and generation speed, and write the plots (docs/img/) and tables (runs/report.md).
# Runs one thing at a time on every core (they are timed). About an hour on a 2-core machine.
# Arguments: the experiments to run (default: shakespeare passkey speed report).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-python.sh
py=${NSA_VENV:-.venv}/bin/python
"$py" -m pip install -q --no-build-isolation --no-deps .
runs=${NSA_RUNS:-runs}
what=("${@:-shakespeare passkey speed report}")
for job in ${what[*]}; do
  case $job in
    shakespeare|passkey)
      for attn in nsa full window; do
        # --resume: a finished run is kept (and an interrupted one continued) on a rerun.
        "$py" -m train run --preset "$job" --attn "$attn" --out "$runs/$job-$attn" --resume
        if [ "$job" = passkey ]; then
          "$py" -m train passkey-eval --run "$runs/$job-$attn"
        fi
      done ;;
    speed) "$py" -m train speed --runs "$runs" --out "$runs/speed.json" ;;
    report) "$py" -m train report --runs "$runs" --docs docs | tee "$runs/report.md" ;;
    *) echo "unknown experiment: $job (shakespeare, passkey, speed, report)" >&2; exit 2 ;;
  esac
done
