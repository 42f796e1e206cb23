#!/usr/bin/env bash
# The main job on the embedded toy world (CPU, offline), called by `make demo`:
# preference data -> one aligned LoRA (Diffusion-DPO) -> realigned lambda grid -> lambda search
# -> report with plots and an image grid. Re-running resumes every stage.
#   FAMILY=unet (default): the toy StableDiffusionPipeline (UNet, DDIM); OUT runs/demo
#   FAMILY=flow: its flow-matching twin toy-flow (StableDiffusion3Pipeline, rectified flow): Flow-DPO,
#                sampled with the flow SDE (path KL per image); OUT runs/demo-flow
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
FAMILY="${FAMILY:-unet}"
LAMS="0 0.5 1 2 4 8"
case "$FAMILY" in
    # DDIM with eta = 1 and the flow SDE are stochastic, so every image also gets its emulated path KL.
    unet) OUT="${OUT:-runs/demo}"; RECIPE=toy-dpo; BETA=2000; SAMPLER=(--scheduler ddim --eta 1.0);;
    flow) OUT="${OUT:-runs/demo-flow}"; RECIPE=toy-flow-dpo; BETA=1000; SAMPLER=(--scheduler flow_sde);;
    *) echo "FAMILY must be unet or flow, got '$FAMILY'" >&2; exit 2;;
esac
EVAL_ARGS=(--prompts toy:test --seeds 0 1 --steps 10 "${SAMPLER[@]}" --reward toy)
mkdir -p "$OUT"

step "1/6 exact realignment on analytic $([ "$FAMILY" = flow ] && echo "rectified flows" || echo diffusions) (deradiff lab)"
"$BIN/deradiff" lab --family "$([ "$FAMILY" = flow ] && echo flow || echo vp)" --samples 8000 --out "$OUT/lab.json"

step "2/6 synthetic Pick-a-Pic preference pairs from the shipped toy pipeline ($FAMILY family)"
PREFS="$OUT/toy-prefs"
[ -f "$PREFS/train.parquet" ] || "$BIN/deradiff" toy make-prefs --family "$FAMILY" --out "$PREFS" --pairs-per-prompt 24 --threads 2

step "3/6 train ONE aligned LoRA with $([ "$FAMILY" = flow ] && echo Flow-)Diffusion-DPO (beta0 = $BETA, official convention)"
align recipe="recipes/$RECIPE.yaml" trainer.output_dir="$OUT/$RECIPE" \
    data.path="$PREFS/train.parquet" data.eval_path="$PREFS/test.parquet"

step "4/6 realign it over lambda = $LAMS on held-out prompts (no retraining)"
"$BIN/deradiff" evaluate --lora "$OUT/$RECIPE" --out "$OUT/eval" --lam $LAMS --baseline lora-scale "${EVAL_ARGS[@]}"

step "5/6 pick lambda by sampling only: max toy reward with prompt adherence kept"
"$BIN/deradiff" search --out "$OUT/eval" --grid $LAMS --maximize reward/toy --refine 2 \
    --budget 'fidelity/color_acc>=0.9' 'fidelity/shape_acc>=0.8'

step "6/6 report: tables, plots, image grid"
"$BIN/deradiff" report --eval "$OUT/eval" --out "$OUT/report"
echo
echo "done: open $OUT/report/report.md (LoRA: $OUT/$RECIPE/lora, samples: $OUT/$RECIPE/samples/)"
