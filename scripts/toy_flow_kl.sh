#!/usr/bin/env bash
# KL-regularized fine-tuning of the flow-matching toy twin and its realignment (CPU, offline), the run
# behind docs/toy-flow-kl/report.md: train recipes/toy-flow-kl-grad.yaml (DRaFT-1 through the flow
# SDE at the memoryless noise level, beta 1e-6, 200 steps) -> realign it over lambda in {0, 1, 3, 10, 30}
# on the held-out prompts under the flow SDE (path KL per image) -> report. Re-running resumes.
# Measured on a 2-core machine shared with another job: training 671 s wall, sampling 240 images 84 s.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-flow-kl}"
RUN="$RUNS/toy-flow-kl-grad"
EVAL="$RUNS/toy-flow-kl-eval"
read -r -a TRAIN_OVERRIDES <<< "${TRAIN_OVERRIDES:-}"

step "1/3 train toy-flow-kl-grad (beta 1e-6 on the path KL, reward toy)"
align recipe=recipes/toy-flow-kl-grad.yaml trainer.output_dir="$RUN" "${TRAIN_OVERRIDES[@]}"

step "2/3 realign it over lambda = 0 1 3 10 30 (beta 1e-6 / lambda) under the flow SDE"
"$BIN/deradiff" evaluate --lora "$RUN" --out "$EVAL" --lam 0 1 3 10 30 --prompts toy:test \
    --seeds ${SEEDS:-0 1 2 3} --steps "${SAMPLE_STEPS:-20}" --guidance 3 --scheduler flow_sde --reward toy

step "3/3 report"
"$BIN/deradiff" report --eval "$EVAL" --out "$OUT"
echo
echo "done: open $OUT/report.md"
