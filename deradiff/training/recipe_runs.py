"""The recipe of a run directory: saved resolved, compared when a run resumes, and the per-lambda
recipes of a sweep.

    save_resolved(recipe, run_dir)          # run_dir/recipe.yaml, itself a loadable recipe
    check_resume(recipe, run_dir)           # refuse to resume a run of a different recipe
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deradiff.errors import UserError
from deradiff.training.recipe import Recipe
from deradiff.training.recipe_load import load_recipe

RECIPE_FILE = "recipe.yaml"  # the resolved recipe inside a run directory

# Keys that may change when a run is resumed (the rest must equal the saved recipe).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "trainer.max_steps",
    "trainer.resume",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.sample_every",
    "data.max_eval_samples",
    "data.cache_dir",
    "data.num_workers",
    "data.prefetch_factor",
    "data.latent_cache",  # checked against the recipe by its identity, wherever it lies
    "data.reference_errors",  # stored errors are those the run computes (keyed by everything they depend on)
    "sample",
    "sweep",
)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The full recipe as YAML (every key, defaults included); `load_recipe` reads it back."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/recipe.yaml atomically (deradiff.io) and return its path."""
    from deradiff.io import write_text_atomic

    target = Path(run_dir) / RECIPE_FILE
    text = (
        "# Resolved recipe of this run (defaults <- recipe file <- overrides). Reproduce with:\n"
        f"#   accelerate launch train/align.py recipe={target}\n" + recipe_to_yaml(recipe)
    )
    return write_text_atomic(target, text)


def load_resolved(run_dir: str | os.PathLike) -> Recipe | None:
    """The recipe saved in a run directory, or None when there is none."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except UserError as err:
        raise UserError(f"the saved recipe of run {run_dir} does not load with this version: {err}") from None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_recipes(a: Recipe, b: Recipe, ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ, as "key: a_value -> b_value", sorted.

    ignore: keys, or section names (e.g. "sample") to skip entirely.
    """
    skip = tuple(ignore)
    fa, fb = _flat(recipe_to_dict(a)), _flat(recipe_to_dict(b))
    return [
        f"{k}: {fa[k]!r} -> {fb[k]!r}"
        for k in sorted(fa)
        if fa[k] != fb[k] and not any(k == s or k.startswith(s + ".") for s in skip)
    ]


def check_resume(recipe: Recipe, run_dir: str | os.PathLike) -> list[str]:
    """Compare `recipe` with the one saved in run_dir; return the differences.

    Raises UserError when the run directory holds a different recipe (beyond RESUME_SAFE_KEYS)
    and trainer.resume is not "force". Returns [] for a new run directory.
    """
    saved = load_resolved(run_dir)
    if saved is None:
        return []
    diff = diff_recipes(saved, recipe, ignore=RESUME_SAFE_KEYS)
    if diff and recipe.trainer.resume != "force":
        raise UserError(
            f"{run_dir} holds a run of a different recipe (saved -> now): " + "; ".join(diff)
            + ". Choose another trainer.output_dir, or pass trainer.resume=force to resume anyway"
        )
    return diff


def sweep_recipes(recipe: Recipe) -> list[tuple[float, Recipe]]:
    """(lambda, recipe) per sweep point: method.beta = beta / lambda, output_dir/lambda-<lambda>.

    lambda > 1 is a weaker KL leash (smaller beta); realigning the base run at lambda emulates
    the run at beta / lambda, which is what these baselines are trained to check. With
    sweep.index set, only that point. Each returned recipe has an empty sweep (one run).
    """
    if recipe.method.beta is None:
        raise UserError("method.beta is required to derive the sweep's betas")
    out = []
    lambdas = recipe.sweep.lambdas
    if recipe.sweep.index is not None:
        lambdas = [lambdas[recipe.sweep.index]]
    for lam in lambdas:
        r = copy.deepcopy(recipe)
        r.method.beta = recipe.method.beta / lam
        r.trainer.output_dir = str(Path(recipe.trainer.output_dir) / f"lambda-{lam:g}")
        r.sweep.lambdas, r.sweep.index = [], None
        out.append((lam, r))
    return out
