#!/usr/bin/env bash
# The main job on the embedded toy world (CPU, offline), called by `make demo`:
# preference data -> one aligned LoRA (Diffusion-DPO) -> realigned lambda grid -> lambda search
# -> report with plots and an image grid. Re-running resumes every stage.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
OUT="${OUT:-runs/demo}"
LAMS="0 0.5 1 2 4 8"
# DDIM with eta = 1 is stochastic, so every image also gets its emulated path KL.
EVAL_ARGS=(--prompts toy:test --seeds 0 1 --steps 10 --scheduler ddim --eta 1.0 --reward toy)
mkdir -p "$OUT"

step "1/6 exact realignment on analytic diffusions (deradiff lab)"
"$BIN/deradiff" lab --samples 8000 --out "$OUT/lab.json"  # README figures: the default 40000 (a few minutes)

step "2/6 synthetic Pick-a-Pic preference pairs from the shipped toy pipeline"
PREFS="$OUT/toy-prefs"
[ -f "$PREFS/train.parquet" ] || "$BIN/deradiff" toy make-prefs --out "$PREFS" --pairs-per-prompt 24 --threads 2

step "3/6 train ONE aligned LoRA with Diffusion-DPO (beta0 = 2000, official convention)"
align recipe=recipes/toy-dpo.yaml trainer.output_dir="$OUT/toy-dpo" \
    data.path="$PREFS/train.parquet" data.eval_path="$PREFS/test.parquet"

step "4/6 realign it over lambda = $LAMS on held-out prompts (no retraining)"
"$BIN/deradiff" evaluate --lora "$OUT/toy-dpo" --out "$OUT/eval" --lam $LAMS --baseline lora-scale "${EVAL_ARGS[@]}"

step "5/6 pick lambda by sampling only: max toy reward with prompt adherence kept"
"$BIN/deradiff" search --out "$OUT/eval" --grid $LAMS --maximize reward/toy --refine 2 \
    --budget 'fidelity/color_acc>=0.9' 'fidelity/shape_acc>=0.8'

step "6/6 report: tables, plots, image grid"
"$BIN/deradiff" report --eval "$OUT/eval" --out "$OUT/report"
echo
echo "done: open $OUT/report/report.md (LoRA: $OUT/toy-dpo/lora, samples: $OUT/toy-dpo/samples/)"
