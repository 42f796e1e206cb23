#!/usr/bin/env bash
# Create .venv and install deradiff with everything it needs, from nothing.
# torch goes in first, pinned with its matching torchvision: otherwise pip may pull a
# multi-GB CUDA build, or a torchvision whose C++ ops do not match torch (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test,deepspeed,optim8bit}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt torch torchvision 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e ".[${EXTRAS}]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" - <<'PY'
import torch, torchvision, diffusers, peft, accelerate, open_clip  # noqa: F401  fail loudly here
print(f"installed: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"diffusers {diffusers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")
PY
