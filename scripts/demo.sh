#!/usr/bin/env bash
# The main job on the embedded toy world (CPU, offline). Called by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY="${VENV:-.venv}/bin"
OUT="${OUT:-runs/demo}"
mkdir -p "$OUT"
echo "== 1/1 exact realignment on analytic diffusions (deradiff lab)"
"$PY/deradiff" lab --out "$OUT/lab.json"
echo "demo outputs in $OUT/"
