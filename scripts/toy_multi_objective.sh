#!/usr/bin/env bash
# Multi-objective realignment on the embedded toy world (CPU, offline), the run behind
# docs/toy-multi-objective/report.md. Two LoRAs, each aligned once to its own reward at the same beta
# (toy-kl-grad, beta 1e-6): `color` on the vivid-color reward `toy`, `contrast` on `toy_contrast`
# (another optimum). Mixed at sampling time with a lambda vector,
#     out = out_ref + lam_color (out_color - out_ref) + lam_contrast (out_contrast - out_ref),
# they emulate the model trained on lam_color * toy + lam_contrast * toy_contrast at that beta
# (KL-optimal models; docs/method.md section 2, "Several rewards"). Evidence that could come out the
# other way: LoRAs retrained on those weighted rewards (method.reward="toy=W1,toy_contrast=W2"), sampled
# on the same prompts and noise, against the realigned model at the vector that should emulate them
# (paired gaps per metric with intervals).
# Stages (re-running resumes every one):
#   1/5 train color and contrast (recipes/toy-kl-grad.yaml, method.reward toy / toy_contrast)
#   2/5 train one LoRA per weighting in WEIGHTS on the weighted reward, same recipe and beta
#   3/5 search the product grid GRID_COLOR x GRID_CONTRAST of lambda vectors: maximize
#       reward/toy + reward/toy_contrast under a path-KL budget (MAX_PATH_KL nats)
#   4/5 validate: each weighted LoRA against the realigned model at its vector (on the grid: reused)
#   5/5 report: Pareto front (reward/toy, reward/toy_contrast) with the retrained LoRAs, search, validation
# Cost on 2 idle cores (estimated): training 5 runs x ~4 min, sampling 16 vectors x 12 prompts x 4 seeds
# (768 realigned images, 3 model forwards per step) + 3 x 48 retrained images, about 1 h in all.
# Knobs: RUNS, OUT, SEEDS, MAX_PROMPTS, SAMPLE_STEPS, GRID_COLOR, GRID_CONTRAST, WEIGHTS (space-separated
# W_toy,W_contrast pairs), MAX_PATH_KL, TRAIN_OVERRIDES. A smoke run (a few minutes):
#   TRAIN_OVERRIDES="trainer.max_steps=2 trainer.warmup_steps=0 method.num_steps=3 trainer.per_device_batch_size=2 \
#     sample.images_per_prompt=1 sample.num_inference_steps=3" SEEDS="0 1" MAX_PROMPTS=2 SAMPLE_STEPS=3 \
#     GRID_COLOR=0,1 GRID_CONTRAST=0,1 WEIGHTS="1,0.5 0.5,1" RUNS=/tmp/mo-smoke OUT=/tmp/mo-smoke/report \
#     scripts/toy_multi_objective.sh
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
# Tiny models: one torch thread per process is fastest, and keeps parallel jobs from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-multi-objective}"
SEEDS="${SEEDS:-0 1 2 3}"
GRID_COLOR="${GRID_COLOR:-0,0.5,1,2}"
GRID_CONTRAST="${GRID_CONTRAST:-0,0.5,1,2}"
WEIGHTS="${WEIGHTS:-1,1 1,0.5 0.5,1}"   # on the grid (same beta: the vector is the weights), so reused
MAX_PATH_KL="${MAX_PATH_KL:-500}"
read -r -a TRAIN_OVERRIDES <<< "${TRAIN_OVERRIDES:-}"
read -r -a SEED_ARGS <<< "$SEEDS"
read -r -a WEIGHT_PAIRS <<< "$WEIGHTS"
MO="$RUNS/toy-mo"
EVAL="$RUNS/toy-mo-eval"
RECIPE=recipes/toy-kl-grad.yaml
# DDIM with eta = 1 (as the rollouts sample) so every image gets its emulated path KL; the same
# prompts, seeds and noise for every vector and every retrained LoRA.
EVAL_ARGS=(--lora "color=$MO/color" "contrast=$MO/contrast" --prompts toy:test --seeds "${SEED_ARGS[@]}"
           --steps "${SAMPLE_STEPS:-20}" --guidance 3 --scheduler ddim --eta 1.0 --reward toy toy_contrast)
[ -z "${MAX_PROMPTS:-}" ] || EVAL_ARGS+=(--max-prompts "$MAX_PROMPTS")

step "1/5 train color (reward toy) and contrast (reward toy_contrast): $RECIPE, same beta"
align recipe="$RECIPE" trainer.output_dir="$MO/color" method.reward=toy "${TRAIN_OVERRIDES[@]}"
align recipe="$RECIPE" trainer.output_dir="$MO/contrast" method.reward=toy_contrast "${TRAIN_OVERRIDES[@]}"

step "2/5 retrain on weighted rewards: ${WEIGHT_PAIRS[*]} (W_toy,W_contrast)"
BASELINES=()
for pair in "${WEIGHT_PAIRS[@]}"; do
    IFS=, read -r w_toy w_contrast <<< "$pair"
    run="$MO/w-$w_toy-$w_contrast"
    align recipe="$RECIPE" trainer.output_dir="$run" method.reward="toy=$w_toy,toy_contrast=$w_contrast" \
        "${TRAIN_OVERRIDES[@]}"
    BASELINES+=("$run")
done

step "3/5 search lambda vectors color in {$GRID_COLOR} x contrast in {$GRID_CONTRAST}: maximize the reward sum, path KL <= $MAX_PATH_KL nats"
"$BIN/deradiff" search --out "$EVAL" "${EVAL_ARGS[@]}" --grid-vector "color=$GRID_COLOR" "contrast=$GRID_CONTRAST" \
    --weights reward/toy=1 reward/toy_contrast=1 --max-path-kl "$MAX_PATH_KL"

step "4/5 validate: each weighted LoRA against the realigned model at the vector that emulates it"
"$BIN/deradiff" validate --out "$EVAL" "${EVAL_ARGS[@]}" --baselines "${BASELINES[@]}"

step "5/5 report"
"$BIN/deradiff" report --eval "$EVAL" --out "$OUT" --pareto-x reward/toy --pareto-y reward/toy_contrast
echo
echo "done: open $OUT/report.md"
