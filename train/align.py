"""Train ONE aligned LoRA from a recipe: Diffusion-DPO or KL-regularized reward fine-tuning.

    # one process (CPU or one GPU)
    accelerate launch train/align.py recipe=recipes/toy-dpo.yaml
    # override any recipe key with dotted key=value
    accelerate launch train/align.py recipe=recipes/toy-dpo.yaml trainer.lr=1e-4 method.beta=2500
    # several GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file configs/accelerate/zero2.yaml train/align.py recipe=recipes/sd15-dpo-pickapic.yaml
    # two CPU processes (gloo), e.g. to test distribution on a laptop
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/align.py recipe=recipes/toy-dpo.yaml

The run directory (trainer.output_dir) receives recipe.yaml, metrics.jsonl, TensorBoard logs,
checkpoints/step-N (resume state) and lora/pytorch_lora_weights.safetensors. Re-running the
same command resumes from the latest checkpoint; a different recipe in the same directory is
refused (trainer.resume=force overrides). A sweep recipe (sweep.lambdas) trains one run per
lambda at beta / lambda into output_dir/lambda-<lambda>, skipping finished ones;
sweep.index=i trains only the i-th (a SLURM array task).
"""

from __future__ import annotations

import sys
from pathlib import Path

from deradiff.errors import UserError


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from deradiff.training.recipe_load import recipe_keys

        print(__doc__ + "\nRecipe keys (each settable as key=value; see deradiff/training/recipe.py for meanings):\n  "
              + "\n  ".join(recipe_keys()))
        return 0
    from deradiff.training.recipe_checks import preflight
    from deradiff.training.recipe_load import load_recipe
    from deradiff.training.recipe_runs import check_resume, sweep_recipes

    try:
        recipe = load_recipe(argv)  # validated: unknown keys, types, ranges, cross-field checks
        preflight(recipe)  # files and machine: data present, bitsandbytes, fp16 needs CUDA
        # A sweep recipe trains one run per lambda at beta / lambda (sweep.index: just one).
        runs = [r for _, r in sweep_recipes(recipe)] if recipe.sweep.lambdas else [recipe]
        for run in runs:
            check_resume(run, Path(run.trainer.output_dir))  # refuse a directory holding another recipe
        from deradiff.training.methods import METHODS
        from deradiff.training.trainer import fit, is_finished

        for run in runs:
            run_dir = Path(run.trainer.output_dir)
            if is_finished(run_dir, run.trainer.max_steps):
                print(f"{run_dir}: finished already (lora/ and summary.json present), skipped")
                continue
            fit(run, METHODS[run.method.name], run_dir)
    except UserError as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
