"""Trained LoRAs as the evaluation sees them: the aligned one and the retrained baselines.

    run = lora_run("runs/toy-sweep/lambda-2")   # rank (from the weights), beta, base model, training time
    check_baselines(lora_run("runs/toy-dpo"), [run, ...])   # refuses another base model or rank
    baseline_lambda(beta0, run.beta)            # the lambda at which realignment emulates it
    emulating_vector(adapters, run)             # the lambda vector that emulates a run trained on a
                                                # weighted reward (named LoRAs, one reward each)

A LoRA is given as a training run folder (holding lora/, recipe.yaml, summary.json), a LoRA
folder (pytorch_lora_weights.safetensors + lora_info.json) or the .safetensors file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deradiff.errors import UserError

RECIPE = "recipe.yaml"  # a training run's resolved recipe (plain YAML)
# Training methods whose method.reward is what the LoRA was trained on (the others, e.g. dpo, learn
# from preferences and carry the field's default): read as data, never from the training code.
REWARD_METHODS = ("kl_grad", "kl_pg")


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
    reward: str | None = None  # the reward spec it was trained on ("toy", "toy=1,toy_contrast=0.5"), if any

    @property
    def label(self) -> str:
        return (self.run_dir or self.file.parent).name


def lora_run(path: str | os.PathLike) -> LoraRun:
    """Read a LoRA's rank (from its weights), beta, base model and reward (lora_info.json, else the
    run's recipe.yaml; the reward only of reward-trained methods, REWARD_METHODS) and training wall
    time (summary.json, else the last time_s of metrics.jsonl)."""
    file = resolve_lora(path)
    run_dir = next((d for d in (file.parent, file.parent.parent) if (d / RECIPE).exists()
                    or (d / "summary.json").exists()), None)
    info = json.loads((file.parent / "lora_info.json").read_text()) if (file.parent / "lora_info.json").exists() else {}
    beta, base, reward = info.get("beta"), info.get("base"), info.get("reward")
    # lora_info.json names the method: a dpo LoRA's recipe has no reward to look up
    reward_unread = reward is None and info.get("method", REWARD_METHODS[0]) in REWARD_METHODS
    if run_dir is not None and (beta is None or base is None or reward_unread) and (run_dir / RECIPE).exists():
        recipe = _recipe_fields(run_dir / RECIPE)
        beta = beta if beta is not None else recipe["beta"]
        base = base if base is not None else recipe["base"]
        if reward is None and recipe["method"] in REWARD_METHODS:
            reward = recipe["reward"]
    return LoraRun(str(path), file, _lora_rank(file), None if beta is None else float(beta), base, run_dir,
                   _training_seconds(run_dir), None if reward is None else str(reward))


def trained_base(path: str | os.PathLike, default: str) -> str:
    """The base model a LoRA was trained on (its lora_info.json, else its run's recipe.yaml), so
    that a LoRA of toy-flow or SDXL is sampled on its own base without naming it; `default` when
    the LoRA records none (e.g. a file from elsewhere)."""
    return lora_run(path).base or default


def _recipe_fields(path: Path) -> dict:
    """method.beta, method.name, method.reward and model.name_or_path of a run's resolved recipe, read as plain YAML data
    (the evaluation reads a training run's files, never the training code)."""
    from omegaconf import OmegaConf

    try:
        recipe = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # a YAML syntax error of any kind: the file is unreadable
        raise UserError(f"{path} is not readable YAML: {str(err).splitlines()[0]}") from None
    recipe = recipe if isinstance(recipe, dict) else {}

    def section(name: str) -> dict:
        return recipe.get(name) if isinstance(recipe.get(name), dict) else {}

    method = section("method")
    return {"beta": method.get("beta"), "method": method.get("name"), "reward": method.get("reward"),
            "base": section("model").get("name_or_path")}


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
    base model or LoRA rank, an unknown beta, or two baselines at the same beta on the same
    reward (baselines on differently weighted rewards may share one)."""
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
    keys = [(b.beta, b.reward) for b in baselines if b.beta is not None]
    if len(set(keys)) != len(keys):
        problems.append(f"two baselines share a beta: {[b.beta for b in baselines if b.beta is not None]}")
    if problems:
        raise UserError("baselines do not match the aligned LoRA: " + "; ".join(problems)
                        + ". Train them from the same recipe with only method.beta changed (recipe sweep)")


def baseline_lambda(beta0: float, beta: float) -> float:
    """lam = beta0 / beta, rounded to 6 significant digits (its name in the results table);
    UserError unless both betas are > 0 (lambda >= 0 by policy)."""
    if not (beta0 > 0 and beta > 0):
        raise UserError(f"beta0 = {beta0:g} and baseline beta = {beta:g}: both must be > 0 (lambda = beta0 / beta)")
    return float(f"{beta0 / beta:.6g}")


# -- lambda vectors: named LoRAs, each trained on one reward -----------------------------------------


def adapter_rewards(adapters: Mapping[str, LoraRun]) -> dict[str, tuple[str, float, float]]:
    """{adapter: (reward, its weight c_i, beta_i)} of named LoRAs each trained on one reward
    (c_i * r_i, c_i = 1 for a plain name) at a known beta; UserError (one line) naming the
    adapter that is not, or two adapters trained on the same reward (then a weighted reward has
    no unique emulating vector)."""
    from deradiff.rewards import reward_weights

    out: dict[str, tuple[str, float, float]] = {}
    for name, run in adapters.items():
        if run.reward is None or run.beta is None or not run.beta > 0:
            raise UserError(f"LoRA {name!r} ({run.path}) records no reward or beta > 0 (lora_info.json / recipe.yaml "
                            f"of a {'/'.join(REWARD_METHODS)} run): a lambda vector emulates reward-trained LoRAs")
        weights = reward_weights(run.reward)
        if len(weights) != 1:
            raise UserError(f"LoRA {name!r} was trained on a weighted reward ({run.reward}): the emulating vector is "
                            "defined when each named LoRA was trained on one reward")
        (reward, weight), = weights.items()
        out[name] = (reward, weight, run.beta)
    rewards = [r for r, _, _ in out.values()]
    twice = sorted({r for r in rewards if rewards.count(r) > 1})
    if twice:
        raise UserError(f"two named LoRAs were trained on reward {twice[0]!r}: name one LoRA per reward")
    return out


def emulating_vector(adapters: Mapping[str, LoraRun], run: LoraRun) -> dict[str, float]:
    """{adapter: lam_i} of the lambda vector that emulates `run`, a LoRA trained on the weighted
    reward sum_r w_r r at beta: mixing LoRA_i (trained on c_i r_i at beta_i) at lam_i emulates
    training on sum_i lam_i c_i r_i / beta_i at KL weight 1 (docs/method.md section 2), which is
    sum_r w_r r / beta when lam_i = w_{r_i} beta_i / (c_i beta); 6 significant digits, 0 for an
    adapter whose reward `run` does not weigh. UserError (one line) for a run without reward or
    beta, or a reward no adapter was trained on."""
    from deradiff.rewards import reward_weights

    if run.reward is None or run.beta is None or not run.beta > 0:
        raise UserError(f"baseline {run.path} records no reward or beta > 0 (lora_info.json / recipe.yaml of a "
                        f"{'/'.join(REWARD_METHODS)} run): it cannot be placed against a lambda vector")
    parts = adapter_rewards(adapters)
    weights = reward_weights(run.reward)
    by_reward = {reward: name for name, (reward, _, _) in parts.items()}
    missing = [r for r in weights if r not in by_reward]
    if missing:
        raise UserError(f"baseline {run.path} was trained on {run.reward}, but no named LoRA on {missing[0]!r} "
                        f"(LoRAs: {', '.join(f'{n}: {r}' for n, (r, _, _) in parts.items())})")
    return {name: float(f"{weights.get(reward, 0.0) * beta_i / (c * run.beta):.6g}")
            for name, (reward, c, beta_i) in parts.items()}


def emulated_weights(adapters: Mapping[str, LoraRun], lam: Mapping[str, float], beta: float) -> dict[str, float]:
    """{reward: w_r}: mixing the named LoRAs at `lam` emulates training on sum_r w_r r at KL
    weight `beta`, w_r = beta * sum_i lam_i c_i / beta_i over the adapters i trained on r."""
    out: dict[str, float] = {}
    for name, (reward, c, beta_i) in adapter_rewards(adapters).items():
        out[reward] = out.get(reward, 0.0) + beta * float(lam.get(name, 0.0)) * c / beta_i
    return out
