"""`deradiff toy hack`: reward hacking made visible, the reward / prior-fidelity trade-off.

    deradiff toy hack --out runs/toy-hack                    # real procedural images, < 1 min on CPU
    deradiff toy hack --source pipeline --out runs/toy-hack  # images from the pretrained toy pipeline

Starting from images x0 (real procedural images, or samples of the toy pipeline), gradient
ascent on the pixels maximizes, per image,

    J(x) = toy_reward(x) - leash * mean((x - x0)^2)        (x kept in [-1, 1])

for a range of leash strengths, strong to none. The leash is the pixel-space analog of the KL
term of KL-regularized alignment (for Gaussians of equal variance sigma^2 around x and x0 the
KL is |x - x0|^2 / (2 sigma^2)). At each strength it measures the reward and the prior-fidelity
metrics (deradiff.toy.metrics) with 95% intervals over prompts, and writes:

    OUT/hack.json   config and one record per leash: reward, rmsd to x0, fidelity/* as [value, lo, hi]
    OUT/hack.png    reward, adherence and KID against leash strength (strong -> none)
    OUT/grid.png    example images, one row per leash strength

Measured on a busy 2-core CPU (one thread): 47 s with the defaults (96 real images, 8 leash
strengths); 84 s with --source pipeline (sampling included). Both show reward rising and
adherence falling as the leash weakens (table in deradiff/toy/reward.py). From pipeline samples,
whose gray backgrounds carry faint color noise, the unleashed run stalls in a mosaic of pure
colors (reward 0.90, below the 0.93 reached at leash 0.5): a local optimum, with adherence
(0.18) and KID (2.3) as ruined as at leash 0.5 (0.23, 2.4).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.grids import save_image_grid
from deradiff.io import atomic_write, write_text_atomic
from deradiff.stats import bootstrap_ci

DEFAULT_LEASHES = (30.0, 10.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["real", "pipeline"], default="real",
                   help="start from real procedural images, or from samples of the toy pipeline")
    p.add_argument("--pipeline", default=None,
                   help="with --source pipeline: toy asset folder from `deradiff toy pretrain --out`; "
                        "unset: the shipped weights")
    p.add_argument("--classifier", default=None,
                   help="toy classifier folder or asset root for the fidelity metrics; unset: the shipped one")
    p.add_argument("--prompts", choices=["all", "train", "test"], default="all", help="toy prompt set")
    p.add_argument("--per-prompt", type=int, default=2, help="images per prompt (>= 2: KID and diversity need pairs)")
    p.add_argument("--leash", type=float, nargs="+", default=list(DEFAULT_LEASHES),
                   help="leash strengths, each >= 0 (0 = no leash); run and plotted in the given order")
    p.add_argument("--steps", type=int, default=200, help="Adam steps of gradient ascent per leash strength")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate, in pixel units ([-1, 1] range)")
    p.add_argument("--examples", type=int, default=8, help="columns of the example grid (distinct prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting images and of the bootstrap")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (these tensors are tiny: 1 is fastest on a busy CPU; 0 = torch's default)")
    p.add_argument("--out", default="runs/toy-hack", help="output folder")


def leashed_ascent(
    x0: torch.Tensor,
    prompts: Sequence[str],
    reward_fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    leash: float,
    steps: int = 200,
    lr: float = 0.02,
) -> torch.Tensor:
    """Maximize reward_fn(x, prompts) - leash * mean((x - x0)^2) per image by Adam on the pixels of
    x (B, 3, H, W), projected to [-1, 1] after each step. Returns the final x (no grad)."""
    x0 = x0.detach()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        objective = reward_fn(x, prompts) - leash * (x - x0).pow(2).mean(dim=(1, 2, 3))
        opt.zero_grad(set_to_none=True)
        (-objective.sum()).backward()  # rows are independent: the sum ascends each one
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    return x.detach()


def real_images(prompts: Sequence[str], per_prompt: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """per_prompt real procedural images of each prompt (prompt-major order), in [-1, 1]."""
    from deradiff.toy.domain import sample, to_tensor

    captions = [p for p in prompts for _ in range(per_prompt)]
    arrays = np.stack([sample(seed, i, caption=c)[0] for i, c in enumerate(captions)])
    return to_tensor(arrays), captions


def pipeline_images(pipe, prompts: Sequence[str], per_prompt: int, seed: int,
                    batch_size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """per_prompt samples of the toy pipeline per prompt (default sampler), in [-1, 1]; image i
    uses its own generator seeded (seed, i), so results do not depend on batch_size."""
    from deradiff.toy.pipeline import toy_sampling_kwargs

    captions = [p for p in prompts for _ in range(per_prompt)]
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc="sampling", unit="batch"):
        chunk = captions[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + j) for j in range(len(chunk))]
        with torch.no_grad():
            images = pipe(chunk, generator=gens, **toy_sampling_kwargs()).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out), captions


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3) arrays."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return list(arr)


def _short(caption: str) -> str:
    """'a red circle on a dark background' -> 'red circle, dark'."""
    from deradiff.toy.domain import parse_caption

    spec = parse_caption(caption)
    return f"{spec.color} {spec.shape}, {spec.background}"


def leash_label(leash: float) -> str:
    return "none" if leash == 0 else f"{leash:g}"


def plot_tradeoff(records: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Three panels against leash strength (categorical axis, in record order): reward; color,
    shape, background accuracy and adherence; KID to real data. Error bars: the intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.arange(len(records))
    labels = [leash_label(r["leash"]) for r in records]

    def series(key):
        v = np.array([r[key] for r in records], dtype=float)
        return v[:, 0], np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]])

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        (axes[0], [("reward", "toy reward")], "toy reward (higher = more vivid)"),
        (axes[1], [("fidelity/color_acc", "color"), ("fidelity/shape_acc", "shape"),
                   ("fidelity/background_acc", "background"), ("fidelity/adherence", "all three")],
         "prompt adherence (classifier accuracy)"),
        (axes[2], [("fidelity/kid", "KID")], "KID to real data (0 = like the data)"),
    ]
    for ax, keys, ylabel in panels:
        for key, name in keys:
            value, err = series(key)
            ax.errorbar(xs, value, yerr=np.abs(err), marker="o", capsize=3, label=name)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("leash strength (strong -> none)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    axes[1].set_ylim(-0.05, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def write_json(path: Path, obj) -> None:
    # keys in insertion order (not write_json_atomic's sorted order): config, then records
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    from deradiff.rewards import get_reward
    from deradiff.toy.metrics import FidelityJudge
    from deradiff.toy.prompts import prompt_set

    if args.per_prompt < 2:
        raise UserError(f"--per-prompt must be >= 2 (KID and diversity compare images of a prompt), got {args.per_prompt}")
    if any(not math.isfinite(w) or w < 0 for w in args.leash):
        raise UserError(f"--leash values must be finite and >= 0 (0 = no leash), got {args.leash}")
    if args.steps < 1 or args.lr <= 0:
        raise UserError(f"--steps must be >= 1 and --lr > 0, got {args.steps} and {args.lr}")
    prompts = prompt_set(args.prompts)
    out = Path(args.out)

    from deradiff.toy.classifier import load_classifier

    judge = FidelityJudge(load_classifier(args.classifier))
    reward = get_reward("toy")
    if args.source == "pipeline":
        from deradiff.toy.pipeline import load_toy_pipeline

        x0, captions = pipeline_images(load_toy_pipeline(args.pipeline), prompts, args.per_prompt, args.seed)
    else:
        x0, captions = real_images(prompts, args.per_prompt, args.seed)

    records, rows = [], []
    # One example per column, spread over the prompt list (it is ordered shape-major).
    spread = np.linspace(0, len(prompts) - 1, min(args.examples, len(prompts))).round().astype(int)
    first_of_prompt = [int(k) * args.per_prompt for k in spread]
    for leash in tqdm(args.leash, desc="leash strengths", unit="leash"):
        x = leashed_ascent(x0, captions, reward.score, leash, args.steps, args.lr)
        with torch.no_grad():
            r = reward.score(x, captions)
        metrics = judge.metrics(x, captions, seed=args.seed)
        record = {"leash": leash, "reward": list(bootstrap_ci(r, captions, seed=args.seed)),
                  "rmsd": (x - x0).pow(2).mean().sqrt().item()}
        record.update({k: list(v) for k, v in metrics.items()})
        records.append(record)
        rows.append(to_uint8(x[first_of_prompt]))
        tqdm.write(f"leash {leash_label(leash):>5}: reward {record['reward'][0]:.3f}  "
                   f"adherence {record['fidelity/adherence'][0]:.2f}  kid {record['fidelity/kid'][0]:.3f}")

    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "subcommand")}
    write_json(out / "hack.json", {"config": config, "n_images": len(captions), "records": records})
    source = "real procedural images" if args.source == "real" else "toy pipeline samples"
    plot_tradeoff(records, out / "hack.png",
                  f"Hacking the toy reward by pixel ascent on {len(captions)} {source} ({args.steps} Adam steps)")
    save_image_grid(rows, out / "grid.png", row_labels=[f"leash {leash_label(w)}" for w in args.leash],
                    col_labels=[_short(captions[i]) for i in first_of_prompt], cell=128)
    print(f"wrote {out}/hack.json, {out}/hack.png, {out}/grid.png")
    return 0
