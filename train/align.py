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
        return print_help(argv)
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


def print_help(argv: list[str]) -> int:
    """--help: this docstring and every recipe key (default, the start of its meaning);
    --help TOPIC: the whole description of one key or section, e.g. --help model.split_backward."""
    from deradiff.training.recipe_help import recipe_help

    at = next(i for i, a in enumerate(argv) if a in ("-h", "--help"))
    topic = argv[at + 1] if at + 1 < len(argv) and "=" not in argv[at + 1] else None
    try:
        if topic is not None:
            print(recipe_help(topic))
            return 0
    except UserError as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 2
    print(__doc__ + "\nRecipe keys = their defaults (key=value sets one; `--help KEY` or `--help SECTION` prints "
          "the whole description):\n" + recipe_help())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
