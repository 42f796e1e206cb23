#!/usr/bin/env bash
# KL-regularized reward fine-tuning (toy-kl-grad, DRaFT-1 + exact per-step KL) at four KL
# strengths on the embedded toy world (CPU, offline), the run behind docs/toy-kl-sweep/report.md:
# train beta in {1e-5, 1e-6, 1e-7, 1e-8} (recipes/toy-kl-sweep.yaml), sample every run on the
# held-out prompts with the same seeds, score reward, fidelity and path KL, and realign the
# beta0 = 1e-6 run to each other beta. Re-running resumes every stage.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
# Tiny models: one torch thread per process is fastest, and keeps parallel jobs from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-kl-sweep}"
SWEEP="$RUNS/toy-kl-sweep"
EVAL="$RUNS/toy-kl-eval"
BASELINES=("$SWEEP/lambda-0.1" "$SWEEP/lambda-10" "$SWEEP/lambda-100")
EVAL_ARGS=(--prompts toy:test --seeds 0 1 2 3 --steps 20 --guidance 3 --scheduler ddim --eta 1.0 --reward toy)

step "1/3 train toy-kl-grad at beta = 1e-6 / lambda, lambda in 1 0.1 10 100 (one after another)"
align recipe=recipes/toy-kl-sweep.yaml trainer.output_dir="$SWEEP"

step "2/3 sample every run (and the base, and the beta0 run realigned to each beta) on held-out prompts"
"$BIN/deradiff" evaluate --lora "$SWEEP/lambda-1" --out "$EVAL" --lam 0 1 "${EVAL_ARGS[@]}"
"$BIN/deradiff" validate --lora "$SWEEP/lambda-1" --out "$EVAL" --baselines "${BASELINES[@]}" "${EVAL_ARGS[@]}"

step "3/3 report"
"$BIN/deradiff" report --eval "$EVAL" --out "$OUT" --frontier-x path_kl
echo
echo "done: open $OUT/report.md"
