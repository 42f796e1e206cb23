"""Benchmark: a beta sweep of Diffusion-DPO runs whose later runs read the reference's errors
stored by the first (data.reference_errors, deradiff.training.reference_errors), against the same
runs trained independently; on the toy world or at SD1.5 shape.

    OMP_NUM_THREADS=1 python benchmarks/sweep.py --repeats 3          # toy: 5 betas x 24 steps, ~5 min
    python benchmarks/sweep.py --betas 2 --steps 2 --pairs 16 --heldout 4 --out /tmp/sweep.json   # ~1 min
    OMP_NUM_THREADS=1 python benchmarks/sweep.py --model sd15 --threads 1   # SD1.5 shape, 256 px: see
                                                                            # benchmarks/results/sweep_sd15.json
    OMP_NUM_THREADS=1 python benchmarks/sweep.py --model sd15 --tiny --betas 2 --steps 2 --out /tmp/s.json  # ~1 min

--model toy: recipes/toy-dpo.yaml on the toy pipeline with random weights, 32x32 pairs drawn from
the toy domain. --model sd15: recipes/sd15-dpo-pickapic.yaml (fp32, no gradient checkpointing,
constant lr) on the SD1.5-shaped pipeline of benchmarks/train_breakdown.py (random weights: UNet
860M, VAE 84M, CLIP-L-sized text encoder 123M; --tiny: its toy widths), written with
save_pretrained, and its smooth random 5:4 JPEG pairs, resized and center-cropped to
--resolution px; each run loads the denoiser and scheduler only (the cache stands in for the
VAE and text encoders; benchmarks/results/sweep_sd15.json was measured while that change was
landing, so its runs may have loaded the whole pipeline and dropped the encoders after set-up).
Both: pairs read from one latent cache (data.latent_cache, built once in a process of its own,
both flips), LoRA rank 8 (sd15: on to_q, to_k, to_v, to_out.0), --batch pairs per step,
--steps steps, the held-out evaluation at the end with its --draws draws per pair, a checkpoint
at the last step, no sample grids; betas 500, 1000, 2000, ... through the trainer's fit, in one
process per repeat, after an untimed one-step warm-up run (imports and first allocations, which
every job of a real sweep pays alike; at SD1.5 shape its evaluation takes one draw). Their runs are
interleaved beta by beta, so that other work on a shared machine slows both sweeps alike.
Shared: the first run writes the errors into a fresh store, the others read them and skip the
reference forward (the first also hashes the UNet's files, the store's identity: remembered
within the process, so that a sweep of separate jobs pays it in each run, here once).
Reported: per run and sweep the wall time of fit (load, set-up, steps, evaluation, checkpoint and
save), its CPU time (this process, one thread: what other processes on the machine barely
change) and its step time (perf/train_s); the ratios shared / independent (medians over
--repeats); the training micro-batches that read stored errors; the largest difference of the
logged losses and held-out metrics between the sweeps' runs of the same beta (0 = the same
numbers); the peak resident memory of the world-building and the sweeping processes.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mib, run_workers, write_results

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("independent", "shared")
# per --model: steps, batch, pairs, heldout, resolution (sd15 --tiny: 64), result file
DEFAULTS = {"toy": {"steps": 24, "batch": 8, "pairs": 96, "heldout": 16, "resolution": 32, "out": "sweep.json"},
            "sd15": {"steps": 3, "batch": 1, "pairs": None, "heldout": 1, "resolution": 256, "out": "sweep_sd15.json"}}


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


def write_jpeg_pairs(folder: Path, train: int, heldout: int, resolution: int) -> None:
    """train.parquet and test.parquet in `folder`: the first `train` and the next `heldout` of
    train_breakdown's smooth random JPEG pairs, 5:4 (w x h = 1.25 x resolution)."""
    import pyarrow.parquet as pq
    from train_breakdown import write_pairs as write_breakdown_pairs

    write_breakdown_pairs(folder / "all.parquet", train + heldout, (resolution * 5 // 4, resolution))
    table = pq.read_table(folder / "all.parquet")
    pq.write_table(table.slice(0, train), folder / "train.parquet")
    pq.write_table(table.slice(train, heldout), folder / "test.parquet")
    (folder / "all.parquet").unlink()


def recipe(args, world: Path, out: Path, beta: float, store: Path | None):
    """The sweep's recipe at `beta` (store: the shared reference-error folder, None = off)."""
    from deradiff.training.recipe_load import load_recipe

    common = [f"model.name_or_path={world / 'pipe'}", f"data.path={world / 'train.parquet'}",
              f"data.eval_path={world / 'test.parquet'}", f"data.latent_cache={world / 'cache'}",
              "data.num_workers=0", f"data.reference_errors={store or 'off'}", f"method.beta={beta:g}",
              f"method.eval_draws={args.draws}", "sample.prompts=[]", f"trainer.max_steps={args.steps}",
              f"trainer.per_device_batch_size={args.batch}", "trainer.warmup_steps=0", "trainer.log_every=1",
              f"trainer.checkpoint_every={args.steps}", "trainer.eval_every=0", f"trainer.output_dir={out}"]
    if args.model == "toy":
        return load_recipe(ROOT / "recipes" / "toy-dpo.yaml", common)
    # SD1.5's recipe on the CPU: fp32, no gradient checkpointing (as benchmarks/diffusers_dpo.py),
    # local parquet pairs, one micro-batch per step, no held-out prompts or sample grids
    return load_recipe(ROOT / "recipes" / "sd15-dpo-pickapic.yaml", [
        *common, "model.mixed_precision=no", "model.gradient_checkpointing=false", "data.source=parquet",
        "data.eval_split=null", "data.eval_prompts=null", f"data.resolution={args.resolution}",
        "trainer.gradient_accumulation=1", "trainer.lr_scheduler=constant", "trainer.sample_every=0"])


def make_world(args, folder: Path) -> dict:
    """The pipeline (random weights), train/held-out pairs and their latent cache; returns the
    pipeline's parameter counts and this process's peak resident memory."""
    import torch

    from deradiff.training.cache import build_cache

    torch.set_num_threads(args.threads)
    if args.model == "toy":
        from deradiff.toy.pipeline import build_toy_pipeline

        pipe = build_toy_pipeline(seed=0)
        write_pairs(folder / "train.parquet", args.pairs, seed=0)
        write_pairs(folder / "test.parquet", args.heldout, seed=100)
    else:
        from train_breakdown import build_pipeline

        pipe = build_pipeline(args.tiny, folder / "build")
        write_jpeg_pairs(folder, args.pairs, args.heldout, args.resolution)
    pipe.save_pretrained(folder / "pipe")
    params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}
    del pipe
    gc.collect()
    build_cache(recipe(args, folder, folder / "unused", 1.0, None), batch_size=16 if args.model == "toy" else 1,
                num_workers=0, log=lambda _: None)
    return {"params": params, "peak_rss_mib": peak_rss_mib()}


def betas(n: int) -> list[float]:
    return [500.0 * 2**i for i in range(n)]


def fit_run(args, world: Path, sweep: str, beta: float) -> dict:
    """One timed run of a sweep: wall and CPU time of fit (this process, one thread), step time,
    stored-error counts, logged losses and held-out metrics, the process's peak memory so far."""
    from accelerate.state import AcceleratorState

    from deradiff.training import trainer
    from deradiff.training.methods import METHODS

    out = world / sweep / f"beta-{beta:g}"
    store = world / "store" if sweep == "shared" else None
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(recipe(args, world, out, beta, store), METHODS["dpo"], out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()  # the run's pipeline, before the next one loads its own
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"beta": beta, "wall_s": wall, "cpu_s": cpu, "train_s": summary["perf/train_s"],
            "stored": summary.get("data/reference_errors_stored", 0.0),
            "computed": summary.get("data/reference_errors_computed", float(args.steps)),
            "losses": [r["dpo/loss"] for r in rows],
            "eval": {k: v for k, v in summary.items() if k.startswith("eval/")},
            "peak_rss_mib": peak_rss_mib()}


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
    if args.model != "toy":  # one held-out draw, not minutes of them at SD1.5 shape (the held-out pairs
        warm.method.eval_draws = 1  # stay: they are part of the latent cache's identity)
    trainer.fit(warm, METHODS["dpo"], world / "warm-up")  # imports, first allocations: not timed
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
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
            "max_eval_diff": max(abs(i["eval"][k] - s["eval"][k]) for i, s in pairs for k in i["eval"]),
            "peak_rss_mib": max(x["peak_rss_mib"] for r in repeats for s in SWEEPS for x in r[s]["runs"])}


def _flag(value: str) -> bool:
    return value in ("True", "true", "1")  # --tiny, and --tiny=True|False as run_workers passes it on


def parse_args(argv=None) -> argparse.Namespace:
    """Options, with --steps, --batch, --pairs, --heldout, --resolution and --out defaulting per --model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(DEFAULTS), default="toy",
                   help="toy world, or an SD1.5-shaped pipeline with random weights")
    p.add_argument("--tiny", type=_flag, nargs="?", const=True, default=False,
                   help="--model sd15 at toy widths and 64 px (a smoke test of the script)")
    p.add_argument("--betas", type=int, default=5, help="runs per sweep: betas 500, 1000, 2000, ...")
    p.add_argument("--steps", type=int, help="optimizer steps per run (toy 24, sd15 3)")
    p.add_argument("--batch", type=int, help="pairs per step (toy 8, sd15 1)")
    p.add_argument("--pairs", type=int, help="training pairs, steps x batch > pairs: a second epoch "
                                             "(toy 96, sd15 steps x batch)")
    p.add_argument("--heldout", type=int, help="held-out pairs, evaluated at the end of each run (toy 16, sd15 1)")
    p.add_argument("--draws", type=int, default=4, help="keyed draws per held-out pair (method.eval_draws)")
    p.add_argument("--resolution", type=int, help="sd15: image side, px (256; --tiny 64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="run both sweeps this many times (a process each); "
                                                          "the ratios are medians over them")
    p.add_argument("--world", help=argparse.SUPPRESS)  # set by the parent for its workers
    p.add_argument("--worker", choices=("world", "sweeps"), help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.tiny and args.model != "sd15":
        p.error("--tiny is for --model sd15 (the toy world is tiny already)")
    defaults = dict(DEFAULTS[args.model], resolution=64 if args.tiny else DEFAULTS[args.model]["resolution"])
    for key in ("steps", "batch", "heldout", "resolution"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.pairs is None:
        args.pairs = defaults["pairs"] or args.steps * args.batch
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / defaults["out"])
    return args


def print_table(args, repeats: list[dict], summary: dict, load: tuple[float, float]) -> None:
    shown = min(repeats, key=lambda r: abs(r["shared"]["wall_s"] / r["independent"]["wall_s"] - summary["wall_ratio"]))
    where = "the toy world" if args.model == "toy" else (f"{'tiny' if args.tiny else 'SD1.5'} shape, "
                                                        f"{args.resolution} px")
    print(f"Diffusion-DPO beta sweep on {where}: {args.betas} runs x {args.steps} steps x {args.batch} pairs, "
          f"{args.threads} thread(s), load average {load[0]:.1f} -> {load[1]:.1f}; the repeat of "
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        work = {"world": make_world, "sweeps": run_sweeps}[args.worker]
        print(json.dumps(work(args, Path(args.world)) if args.worker == "world" else work(args)))
        return 0
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="deradiff-sweep-"))
    script, config = str(Path(__file__).resolve()), argparse.Namespace(**vars(args))
    del config.world  # the temporary folder, removed at the end
    repeats: list[dict] = []
    try:
        args.world = str(tmp)
        world = run_workers(script, ["world"], args)["world"]  # in its own process: its memory is freed
        for _ in range(args.repeats):  # the results so far after each repeat: a run stopped late keeps them
            repeats.append(run_workers(script, ["sweeps"], args)["sweeps"])
            write_results(args.out, config, {"repeats": repeats}, summarize(repeats), world=world,
                          repeats_done=len(repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(args, repeats, summarize(repeats), (load_before[0], os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
