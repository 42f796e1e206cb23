"""Trained LoRAs as the evaluation sees them: the aligned one and the retrained baselines.

    run = lora_run("runs/toy-sweep/lambda-2")   # rank (from the weights), beta, base model, training time
    check_baselines(lora_run("runs/toy-dpo"), [run, ...])   # refuses another base model or rank
    baseline_lambda(beta0, run.beta)            # the lambda at which realignment emulates it

A LoRA is given as a training run folder (holding lora/, recipe.yaml, summary.json), a LoRA
folder (pytorch_lora_weights.safetensors + lora_info.json) or the .safetensors file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deradiff.errors import UserError

RECIPE = "recipe.yaml"  # a training run's resolved recipe (plain YAML)


def resolve_lora(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a training run folder (holding lora/), a LoRA
    folder, or the file itself."""
    from deradiff.models import resolve_lora_file

    path = Path(path)
    if path.is_dir() and (path / "lora").is_dir():
        path = path / "lora"
    return resolve_lora_file(path)


@dataclass
class LoraRun:
    """A trained LoRA and what its run says about it (any field may be unknown: None)."""

    path: str
    file: Path
    rank: int
    beta: float | None
    base: str | None
    run_dir: Path | None
    wall_s: float | None

    @property
    def label(self) -> str:
        return (self.run_dir or self.file.parent).name


def lora_run(path: str | os.PathLike) -> LoraRun:
    """Read a LoRA's rank (from its weights), beta and base model (lora_info.json, else the run's
    recipe.yaml) and training wall time (summary.json, else the last time_s of metrics.jsonl)."""
    file = resolve_lora(path)
    run_dir = next((d for d in (file.parent, file.parent.parent) if (d / RECIPE).exists()
                    or (d / "summary.json").exists()), None)
    info = json.loads((file.parent / "lora_info.json").read_text()) if (file.parent / "lora_info.json").exists() else {}
    beta, base = info.get("beta"), info.get("base")
    if run_dir is not None and (beta is None or base is None) and (run_dir / RECIPE).exists():
        recipe = _recipe_fields(run_dir / RECIPE)
        beta = beta if beta is not None else recipe["beta"]
        base = base if base is not None else recipe["base"]
    return LoraRun(str(path), file, _lora_rank(file), None if beta is None else float(beta), base, run_dir,
                   _training_seconds(run_dir))


def trained_base(path: str | os.PathLike, default: str) -> str:
    """The base model a LoRA was trained on (its lora_info.json, else its run's recipe.yaml), so
    that a LoRA of toy-flow or SDXL is sampled on its own base without naming it; `default` when
    the LoRA records none (e.g. a file from elsewhere)."""
    return lora_run(path).base or default


def _recipe_fields(path: Path) -> dict:
    """method.beta and model.name_or_path of a run's resolved recipe, read as plain YAML data
    (the evaluation reads a training run's files, never the training code)."""
    from omegaconf import OmegaConf

    try:
        recipe = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # a YAML syntax error of any kind: the file is unreadable
        raise UserError(f"{path} is not readable YAML: {str(err).splitlines()[0]}") from None
    recipe = recipe if isinstance(recipe, dict) else {}

    def section(name: str) -> dict:
        return recipe.get(name) if isinstance(recipe.get(name), dict) else {}

    return {"beta": section("method").get("beta"), "base": section("model").get("name_or_path")}


def _lora_rank(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            if "lora_A" in key or "lora.down" in key:
                return int(f.get_slice(key).get_shape()[0])
    raise UserError(f"{file} holds no LoRA A/down matrices: is it a LoRA?")


def _training_seconds(run_dir: Path | None) -> float | None:
    if run_dir is None:
        return None
    summary = run_dir / "summary.json"
    if summary.exists():
        wall = json.loads(summary.read_text()).get("wall_s")
        if wall is not None:
            return float(wall)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        times = [json.loads(ln).get("time_s") for ln in metrics.read_text().splitlines() if ln.strip()]
        times = [t for t in times if t is not None]
        return float(times[-1]) if times else None
    return None


def check_baselines(aligned: LoraRun, baselines: Sequence[LoraRun]) -> None:
    """Refuse baselines that cannot stand for the aligned model at another beta: a different
    base model or LoRA rank, an unknown beta, or two baselines at the same beta."""
    problems = []
    for b in baselines:
        if b.rank != aligned.rank:
            problems.append(f"{b.path}: LoRA rank {b.rank} != aligned rank {aligned.rank}")
        if b.base and aligned.base and b.base != aligned.base:
            problems.append(f"{b.path}: base model {b.base!r} != aligned base {aligned.base!r}")
        if b.beta is None:
            problems.append(f"{b.path}: unknown beta (no lora_info.json or recipe.yaml beside it)")
        elif not b.beta > 0:
            problems.append(f"{b.path}: beta {b.beta:g} is not > 0 (its lambda = beta0 / beta must be >= 0)")
    betas = [b.beta for b in baselines if b.beta is not None]
    if len(set(betas)) != len(betas):
        problems.append(f"two baselines share a beta: {betas}")
    if problems:
        raise UserError("baselines do not match the aligned LoRA: " + "; ".join(problems)
                        + ". Train them from the same recipe with only method.beta changed (recipe sweep)")


def baseline_lambda(beta0: float, beta: float) -> float:
    """lam = beta0 / beta, rounded to 6 significant digits (its name in the results table);
    UserError unless both betas are > 0 (lambda >= 0 by policy)."""
    if not (beta0 > 0 and beta > 0):
        raise UserError(f"beta0 = {beta0:g} and baseline beta = {beta:g}: both must be > 0 (lambda = beta0 / beta)")
    return float(f"{beta0 / beta:.6g}")
