#!/usr/bin/env bash
# Validation of realignment on the embedded toy world (CPU, offline), the run behind
# docs/toy-validation/report.md:
# preference data -> the toy-sweep baselines (toy-dpo at beta0 / lambda, lambda in {0.25, 0.5, 1, 2, 4})
# -> realign the lambda = 1 LoRA over a grid -> search lambda by sampling only
# -> validate against the retrained baselines -> report. Re-running resumes every stage.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
# Tiny models: one torch thread per process is fastest, and keeps parallel jobs from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-validation}"
SWEEP="$RUNS/toy-sweep"
EVAL="$RUNS/toy-validation"
LAMS="0 0.5 1 2 4 8"   # the search grid; validate adds the baselines' lambdas (0.25)
BASELINES=("$SWEEP/lambda-0.25" "$SWEEP/lambda-0.5" "$SWEEP/lambda-2" "$SWEEP/lambda-4")
# DDIM with eta = 1 (stochastic) so every image also gets its emulated path KL. Two seeds per
# prompt keep the search at 192 images (12 held-out prompts x 2 seeds x 8 lambdas).
EVAL_ARGS=(--prompts toy:test --seeds 0 1 --steps 25 --scheduler ddim --eta 1.0 --reward toy)

step "1/5 synthetic Pick-a-Pic preference pairs (deradiff toy make-prefs defaults)"
[ -f "$RUNS/toy-prefs/train.parquet" ] || "$BIN/deradiff" toy make-prefs --out "$RUNS/toy-prefs" --threads 2

step "2/5 the sweep: toy-dpo at beta0 / lambda for lambda in 1 0.25 0.5 2 4 (one after another)"
align recipe=recipes/toy-sweep.yaml trainer.output_dir="$SWEEP" \
    data.path="$RUNS/toy-prefs/train.parquet" data.eval_path="$RUNS/toy-prefs/test.parquet"

step "3/5 realign the lambda = 1 LoRA over lambda = $LAMS; pick lambda by sampling only"
"$BIN/deradiff" evaluate --lora "$SWEEP/lambda-1" --out "$EVAL" --lam $LAMS --baseline lora-scale "${EVAL_ARGS[@]}"
"$BIN/deradiff" search --out "$EVAL" --grid $LAMS --maximize reward/toy --refine 2 \
    --budget 'fidelity/color_acc>=0.9' 'fidelity/shape_acc>=0.8'

step "4/5 validate: realigned vs retrained at each lambda_k, same prompts and seeds"
"$BIN/deradiff" validate --lora "$SWEEP/lambda-1" --out "$EVAL" --baselines "${BASELINES[@]}" "${EVAL_ARGS[@]}"

step "5/5 report"
"$BIN/deradiff" report --eval "$EVAL" --out "$OUT"
echo
echo "done: open $OUT/report.md"
