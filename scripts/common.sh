# Sourced by the toy-world scripts (demo.sh, toy_validation.sh, toy_kl_sweep.sh) after they cd
# to the repository root: strict mode, offline hub, the venv's tools, and two helpers.
set -euo pipefail
export HF_HUB_OFFLINE=1
BIN="${VENV:-.venv}/bin"

step() { echo; echo "== $*"; }

# One training run in one CPU process: align recipe=... key=value ...
align() {
    "$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        train/align.py "$@"
}
