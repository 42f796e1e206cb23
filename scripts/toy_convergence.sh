#!/usr/bin/env bash
# Do baselines trained closer to their optimum agree better with realignment? (issue 14, item 3)
# The run behind docs/toy-convergence/report.md.
# The theory: realigning the beta0 model by lambda emulates the OPTIMAL model at beta0 / lambda exactly.
# Finite training gives neither optimum, so the toy's realigned-vs-retrained gaps mix the emulation's
# error with each run's distance from its optimum. This trains the Diffusion-DPO toy sweep
# (recipes/toy-sweep.yaml: beta0 = 2000, lambda in {0.25, 0.5, 1, 2, 4}) at 1x, 2x and 4x the recipe's
# 400 steps, realigns each multiplier's own lambda = 1 run, validates it against that multiplier's
# baselines (the matching table, every metric's paired gap, path KL), and compares the three:
# do the gaps shrink, does matching improve, does path KL's growth with lambda (realigned: lambda^2,
# exactly; retrained at 400 steps: about linear) move toward lambda^2 as the baselines converge?
# It could come out either way; the report says which.
# Cost: one 400-step run is ~2 min of one idle core, so the 2x and 4x sweeps are 60 core-minutes at
# 5 lambdas (LAMBDAS="0.5 1 2": 24); then ~4 min of sampling per multiplier (12 prompts x 8 seeds,
# 25 DDIM steps, the baselines + the realigned model at their lambdas).
# Stages resume: a finished run or evaluation is reused, a killed run resumes from its checkpoint
# (the 1x sweep is toy_validation.sh's / toy_matching.sh's runs/toy-sweep). Knobs: MULTIPLIERS
# (default "1 2 4"), LAMBDAS (default "0.25 0.5 1 2 4"; must hold 1), JOBS (training runs at once,
# one thread each; default 2), SEEDS, MAX_PROMPTS, SAMPLE_STEPS, RUNS, OUT.
cd "$(dirname "$0")/.." || exit 1
source scripts/common.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-docs/toy-convergence}"
read -r -a MULTS <<< "${MULTIPLIERS:-1 2 4}"
read -r -a SEED_ARGS <<< "${SEEDS:-0 1 2 3 4 5 6 7}"
read -r -a LAMS <<< "${LAMBDAS:-0.25 0.5 1 2 4}"
BASE_STEPS=400
DATA=(data.path="$RUNS/toy-prefs/train.parquet" data.eval_path="$RUNS/toy-prefs/test.parquet")

sweep_dir() { if [ "$1" = 1 ]; then echo "$RUNS/toy-sweep"; else echo "$RUNS/toy-sweep-steps${1}x"; fi; }
eval_dir() { echo "$RUNS/toy-convergence-${1}x"; }

train_point() {  # one lambda at M x the recipe's steps; checkpoints and evals keep their count
    local m="$1" lam="$2"
    align recipe=recipes/toy-sweep.yaml trainer.output_dir="$(sweep_dir "$m")" "sweep.lambdas=[$lam]" "${DATA[@]}" \
        trainer.max_steps=$((BASE_STEPS * m)) trainer.checkpoint_every=$((100 * m)) \
        trainer.eval_every=$((50 * m)) trainer.sample_every=$((100 * m)) > "$(sweep_dir "$m")-lambda-$lam.log" 2>&1
}

step "1/3 the toy-dpo sweep at ${MULTS[*]} x $BASE_STEPS steps"
if [ ! -f "$RUNS/toy-prefs/train.parquet" ]; then
    "$BIN/deradiff" toy make-prefs --out "$RUNS/toy-prefs" --threads 2
fi
mkdir -p "$RUNS"
running=0
for m in "${MULTS[@]}"; do
    for lam in "${LAMS[@]}"; do
        if [ "$running" -ge "${JOBS:-2}" ]; then wait -n; running=$((running - 1)); fi
        echo "training ${m}x lambda $lam -> $(sweep_dir "$m")/lambda-$lam (log: $(sweep_dir "$m")-lambda-$lam.log)"
        train_point "$m" "$lam" &
        running=$((running + 1))
    done
done
wait

step "2/3 validate each multiplier's realigned lambda = 1 run against its own baselines"
evals=()
for m in "${MULTS[@]}"; do
    sweep="$(sweep_dir "$m")"
    baselines=()
    for lam in "${LAMS[@]}"; do baselines+=("$sweep/lambda-$lam"); done
    args=(--lora "$sweep/lambda-1" --prompts toy:test --seeds "${SEED_ARGS[@]}"
          --steps "${SAMPLE_STEPS:-25}" --scheduler ddim --eta 1.0 --reward toy)
    [ -z "${MAX_PROMPTS:-}" ] || args+=(--max-prompts "$MAX_PROMPTS")
    "$BIN/deradiff" validate --out "$(eval_dir "$m")" "${args[@]}" --baselines "${baselines[@]}" --no-lora-scale
    evals+=("$(eval_dir "$m")")
done

step "3/3 compare the validations"
labels=()
for m in "${MULTS[@]}"; do labels+=("$((BASE_STEPS * m)) steps"); done
"$BIN/deradiff" compare --eval "${evals[@]}" --labels "${labels[@]}" --out "$OUT"
echo
echo "done: open $OUT/report.md"
