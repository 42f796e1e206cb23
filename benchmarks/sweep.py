"""Benchmark: a beta sweep of Diffusion-DPO runs on the toy world whose later runs read the
reference's errors stored by the first (data.reference_errors, deradiff.training.reference_errors),
against the same runs trained independently.

    OMP_NUM_THREADS=1 python benchmarks/sweep.py --repeats 3          # 5 betas x 24 steps, ~5 min
    python benchmarks/sweep.py --betas 2 --steps 2 --pairs 16 --heldout 4 --out /tmp/sweep.json   # ~1 min

Both sweeps train the same recipe (recipes/toy-dpo.yaml on the toy pipeline with random weights,
32x32 pairs drawn from the toy domain, read from a latent cache; LoRA rank 8, --batch pairs per
step, --steps steps, the held-out evaluation at the end with its 4 draws per pair, no sample
grids) at betas 500, 1000, 2000, ... through the trainer's fit, in one process per repeat, after
an untimed one-step warm-up run (imports and first allocations, which every job of a real sweep
pays alike). Their runs are interleaved beta by beta, so that other work on a shared machine
slows both sweeps alike. Shared: the first run writes the errors into a fresh store, the others
read them and skip the reference forward. Reported: per run and sweep the wall time of fit
(set-up, steps, evaluation, checkpoint and save), its CPU time (this process, one thread: what
other processes on the machine barely change) and its step time (perf/train_s); the ratios
shared / independent (medians over --repeats); the training micro-batches that read stored
errors; the largest difference of the logged losses and held-out metrics between the sweeps'
runs of the same beta (0 = the same numbers).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import run_workers, write_results

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("independent", "shared")


def write_pairs(path: Path, n: int, seed: int) -> None:
    """n Pick-a-Pic-format pairs of toy-domain images (PNG, 32x32); the first image preferred in
    odd rows (labels do not change the cost)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from deradiff.toy import domain

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(n):
        images, spec = [], None
        for stream in (seed, seed + 1):
            image, spec = domain.sample(stream, i, 32, caption=spec.caption if spec else None)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            images.append(buf.getvalue())
        rows["caption"].append(spec.caption)
        rows["jpg_0"].append(images[0])
        rows["jpg_1"].append(images[1])
        rows["label_0"].append(float(i % 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def recipe(args, world: Path, out: Path, beta: float, store: Path | None):
    from deradiff.training.recipe_load import load_recipe

    return load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [
        f"model.name_or_path={world / 'pipe'}", f"data.path={world / 'train.parquet'}",
        f"data.eval_path={world / 'test.parquet'}", f"data.latent_cache={world / 'cache'}", "data.num_workers=0",
        f"data.reference_errors={store or 'off'}", f"method.beta={beta:g}", "sample.prompts=[]",
        f"trainer.max_steps={args.steps}", f"trainer.per_device_batch_size={args.batch}", "trainer.warmup_steps=0",
        "trainer.log_every=1", f"trainer.checkpoint_every={args.steps}", "trainer.eval_every=0",
        f"trainer.output_dir={out}"])


def make_world(args, folder: Path) -> None:
    """The toy pipeline (random weights), train/held-out pairs and their latent cache."""
    import torch

    from deradiff.toy.pipeline import build_toy_pipeline
    from deradiff.training.cache import build_cache

    torch.set_num_threads(args.threads)
    pipe = build_toy_pipeline(seed=0)
    pipe.save_pretrained(folder / "pipe")
    write_pairs(folder / "train.parquet", args.pairs, seed=0)
    write_pairs(folder / "test.parquet", args.heldout, seed=100)
    build_cache(recipe(args, folder, folder / "unused", 1.0, None), batch_size=16, num_workers=0, log=lambda _: None)


def betas(n: int) -> list[float]:
    return [500.0 * 2**i for i in range(n)]


def fit_run(args, world: Path, sweep: str, beta: float) -> dict:
    """One timed run of a sweep: wall and CPU time of fit (this process, one thread), step time,
    stored-error counts, logged losses and held-out metrics."""
    from accelerate.state import AcceleratorState

    from deradiff.training import trainer
    from deradiff.training.methods import METHODS

    out = world / sweep / f"beta-{beta:g}"
    store = world / "store" if sweep == "shared" else None
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(recipe(args, world, out, beta, store), METHODS["dpo"], out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"beta": beta, "wall_s": wall, "cpu_s": cpu, "train_s": summary["perf/train_s"],
            "stored": summary.get("data/reference_errors_stored", 0.0),
            "computed": summary.get("data/reference_errors_computed", float(args.steps)),
            "losses": [r["dpo/loss"] for r in rows],
            "eval": {k: v for k, v in summary.items() if k.startswith("eval/")}}


def run_sweeps(args) -> dict:
    """Worker: both sweeps in this process, their runs interleaved beta by beta (independent, then
    shared), so that other work on the machine slows both alike; after an untimed warm-up run."""
    import torch
    from accelerate.state import AcceleratorState

    from deradiff.training import trainer
    from deradiff.training.methods import METHODS

    torch.set_num_threads(args.threads)
    world = Path(args.world)
    for folder in (*SWEEPS, "store", "warm-up"):  # an earlier repeat's runs (they would resume) and errors
        shutil.rmtree(world / folder, ignore_errors=True)
    warm = recipe(args, world, world / "warm-up", 1.0, None)
    warm.trainer.max_steps = warm.trainer.checkpoint_every = 1
    trainer.fit(warm, METHODS["dpo"], world / "warm-up")  # imports, first allocations: not timed
    AcceleratorState._reset_state(reset_partial_state=True)
    runs: dict[str, list] = {s: [] for s in SWEEPS}
    for beta in betas(args.betas):
        for sweep in SWEEPS:
            runs[sweep].append(fit_run(args, world, sweep, beta))
    return {s: {"runs": r, **{k: sum(x[k] for x in r) for k in ("wall_s", "cpu_s", "train_s")}}
            for s, r in runs.items()}


def summarize(repeats: list[dict]) -> dict:
    """shared / independent ratios (median over repeats) of wall, CPU and step time; stored
    micro-batches; the largest differences of losses and held-out metrics between the sweeps."""
    def ratios(key: str) -> list[float]:
        return [r["shared"][key] / r["independent"][key] for r in repeats]

    pairs = [(i, s) for r in repeats for i, s in zip(r["independent"]["runs"], r["shared"]["runs"], strict=True)]
    shared = repeats[0]["shared"]["runs"]
    return {"wall_ratio": statistics.median(ratios("wall_s")), "cpu_ratio": statistics.median(ratios("cpu_s")),
            "train_ratio": statistics.median(ratios("train_s")), "wall_ratios": ratios("wall_s"),
            "stored_micro_batches": sum(r["stored"] for r in shared),
            "micro_batches": sum(r["stored"] + r["computed"] for r in shared),
            "max_loss_diff": max(abs(a - b) for i, s in pairs for a, b in zip(i["losses"], s["losses"], strict=True)),
            "max_eval_diff": max(abs(i["eval"][k] - s["eval"][k]) for i, s in pairs for k in i["eval"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=int, default=5, help="runs per sweep: betas 500, 1000, 2000, ...")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--pairs", type=int, default=96, help="training pairs (steps x batch > pairs: a second epoch)")
    p.add_argument("--heldout", type=int, default=16, help="held-out pairs, evaluated at the end of each run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="run both sweeps this many times (a process each); "
                                                          "the ratios are medians over them")
    p.add_argument("--world", help=argparse.SUPPRESS)  # set by the parent for its workers
    p.add_argument("--worker", choices=("sweeps",), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_sweeps(args)))
        return 0
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="deradiff-sweep-"))
    try:
        make_world(args, tmp)
        args.world = str(tmp)
        repeats = [run_workers(str(Path(__file__).resolve()), ["sweeps"], args)["sweeps"] for _ in range(args.repeats)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(repeats)
    shown = min(repeats, key=lambda r: abs(r["shared"]["wall_s"] / r["independent"]["wall_s"] - summary["wall_ratio"]))
    print(f"Diffusion-DPO beta sweep on the toy world: {args.betas} runs x {args.steps} steps x {args.batch} pairs, "
          f"{args.threads} thread(s), load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; the repeat of "
          f"median wall ratio ({len(repeats)} repeats):")
    columns = [(s, k) for s in SWEEPS for k in ("wall_s", "cpu_s", "train_s")]
    print(f"{'beta':>8}" + "".join(f"{s + ' ' + k:>20}" for s, k in columns) + f"{'stored micro-batches':>22}")
    for i, beta in enumerate(betas(args.betas)):
        cells = "".join(f"{shown[s]['runs'][i][k]:>20.2f}" for s, k in columns)
        run = shown["shared"]["runs"][i]
        print(f"{beta:>8g}{cells}{run['stored']:>15.0f} of {run['stored'] + run['computed']:.0f}")
    print(f"{'total':>8}" + "".join(f"{shown[s][k]:>20.2f}" for s, k in columns))
    print("summary: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={[round(x, 3) for x in v]}"
                                  for k, v in summary.items()))
    del args.world  # a removed temporary folder
    write_results(args.out, args, {"repeats": repeats}, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
