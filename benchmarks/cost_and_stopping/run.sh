#!/usr/bin/env bash
# Runs (or resumes) the two issue-13 experiments one after the other; each log is in its experiment folder.
# usage: bash benchmarks/cost_and_stopping/run.sh OUT_ROOT   (from the repository root, venv active)
set -euo pipefail
out=${1:?OUT_ROOT}
here=$(dirname "$0")
for s in random_fg33 clasp_pe; do
  mkdir -p "$out/$s"
  alseg run "$here/$s.yaml" --out "$out/$s" >> "$out/$s.out" 2>&1
done
