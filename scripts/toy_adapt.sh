#!/usr/bin/env bash
# Per-prompt adaptive lambda on the embedded toy world (CPU, offline), the run behind
# docs/toy-adapt/report.md. The realigned LoRA is the middle run of the KL sweep (toy-kl-grad at
# beta0 = 1e-6, the family where reward hacking starts inside the lambda grid; trained here if
# missing, as scripts/toy_matching.sh FAMILY=kl trains it).
#   pilot: every grid lambda on 4 pilot seeds per held-out prompt; per prompt, the lambda with the
#          highest toy reward among those whose pilot adherence meets the budget for that prompt;
#   eval:  8 fresh seeds (disjoint from the pilot's): each prompt at its own lambda vs every prompt
#          at the best single lambda chosen from the same pilot, paired over prompts.
# Knobs for a smoke run: PILOT_SEEDS, EVAL_SEEDS, MAX_PROMPTS, SAMPLE_STEPS, TRAIN_OVERRIDES, RUNS, OUT.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-adapt}"
SWEEP="$RUNS/toy-kl-sweep"
EVAL="$RUNS/toy-adapt"
read -r -a PILOT <<< "${PILOT_SEEDS:-0 1 2 3}"
read -r -a FRESH <<< "${EVAL_SEEDS:-100 101 102 103 104 105 106 107}"
read -r -a TRAIN_OVERRIDES <<< "${TRAIN_OVERRIDES:-}"
ARGS=(--lora "$SWEEP/lambda-1" --prompts toy:test --steps "${SAMPLE_STEPS:-20}" --guidance 3
      --scheduler ddim --eta 1.0 --reward toy)
[ -z "${MAX_PROMPTS:-}" ] || ARGS+=(--max-prompts "$MAX_PROMPTS")

step "1/3 the aligned LoRA: toy-kl-grad at beta0 = 1e-6 (recipes/toy-kl-sweep.yaml, lambda 1)"
align recipe=recipes/toy-kl-sweep.yaml trainer.output_dir="$SWEEP" sweep.index=0 "${TRAIN_OVERRIDES[@]}"

step "2/3 adapt: pilot on seeds ${PILOT[*]}, per-prompt lambda, then fresh seeds ${FRESH[*]}"
"$BIN/deradiff" adapt --out "$EVAL" "${ARGS[@]}" --pilot-seeds "${PILOT[@]}" --eval-seeds "${FRESH[@]}" \
    --grid 0 0.3 1 3 10 30 --maximize reward/toy --budget 'fidelity/color_acc>=0.9' 'fidelity/shape_acc>=0.8'

step "3/3 report"
"$BIN/deradiff" report --eval "$EVAL" --out "$OUT"
echo
echo "done: open $OUT/report.md"
