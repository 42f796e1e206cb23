"""Benchmark: our Diffusion-DPO trainer (train/align.py, with and without the latent cache)
against diffusers' example examples/research_projects/diffusion_dpo/train_diffusion_dpo.py,
side by side on the same SD1.5-shaped model, data, batch and LoRA.

    # the example is not part of this repository: save its source outside it first (see below)
    python benchmarks/diffusers_dpo.py --example /tmp/dd/train_diffusion_dpo.py        # 256 px, 3 repeats, ~7 GB RAM
    python benchmarks/diffusers_dpo.py --example /tmp/dd/train_diffusion_dpo.py --tiny --repeats 1 \\
        --out /tmp/diffusers_dpo.json                                                  # toy widths, ~2 min

The 256 px run (benchmarks/results/diffusers_dpo.json, --repeats 2) took 9.3 min on 2 quiet
cores (load average 1.5-2.2): world 1 min, cache 0.8 min, 8 runs of 0.8-1.1 min each (beside
other jobs, load 4-6, runs took 2.5-5 min).

Getting the example (the copy measured: blob a65767d0 of huggingface/diffusers, identical at tag
v0.40.0 and on main at 58eb52c0; its last change is c9c82173, 2025-08-11):
    git show 58eb52c0:examples/research_projects/diffusion_dpo/train_diffusion_dpo.py > /tmp/dd/train_diffusion_dpo.py

The world (in a temporary folder): the SD1.5-shaped pipeline of benchmarks/train_breakdown.py
(random weights: UNet 860M, VAE 84M, CLIP-L-sized text encoder 123M, byte tokenizer), written
with save_pretrained so that both tools load the same files; --pairs Pick-a-Pic-format JPEG pairs
(5:4, resized and center-cropped to --resolution) in data/train.parquet, which the example reads
with load_dataset(folder) and our trainer as data.source=parquet. Both train fp32 on the CPU, one
pair per step, LoRA rank 8 (alpha 8) on to_q/to_k/to_v/to_out.0, AdamW lr --lr constant, grad
clip 1.0, random flips, no DataLoader workers, no evaluation, checkpoints or sample grids inside
the timed steps, the same gradient checkpointing setting (off by default), each through
`accelerate launch --num_processes 1` with --threads torch threads, offline.

Runs alternate example, ours cached, ours uncached, ours cached with model.split_backward=true
(each image of a pair backpropagated on its own: the same gradient, one image's activations),
--repeats times, one at a time, so that other
load on the machine hits all alike. The cache (`deradiff cache`) is built once before them and
its time reported separately. Per run:

  step_s        seconds per optimizer step, median of steps 2..N (the first holds one-off warm-up):
                ours from metrics.jsonl perf/sec_per_step (batch fetch to optimizer step), the
                example from the times of its "Steps" progress-bar updates (recorded by a shim
                that wraps tqdm around the example, whose code is otherwise unchanged)
  peak_rss_mib  peak resident memory of the training process (ru_maxrss of the launched process
                tree from wait4: the largest process, i.e. the trainer), load included
  steps_rss_mib the trainer's largest resident memory sampled every 0.5 s after its first step
                (load transients excluded)

Peak memory cannot fall below the UNet's share of the weights by leaving out the VAE and text
encoders: fp32 SD1.5 is UNet 859.5M of 1066.2M parameters, 0.806, and everything else a step
holds (activations, LoRA, optimizer, the Python runtime) is common to both tools and only raises
the ratio toward 1.

The example's code runs unchanged but for one line, patched in memory only when wandb is not
installed: its top-level `import wandb` becomes `wandb = None` (wandb is used only with
--report_to wandb; both tools report to tensorboard here).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("example", "cached", "uncached", "split")
# our runs' extra recipe keys per tool (split: the cached run, each image backpropagated on its own)
OUR_OVERRIDES = {"cached": ["CACHE"], "uncached": [], "split": ["CACHE", "model.split_backward=true"]}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the example's LoraConfig target_modules
# git blob ids of example copies we know: what the JSON records about the file measured
KNOWN_EXAMPLES = {
    "a65767d084b6fbd8a910250cd1d7f74e9b03ae7f": "huggingface/diffusers tag v0.40.0 and main 58eb52c0 (2026-08-23); "
                                                "last changed by c9c82173 (2025-08-11)",
}
SHIM = "shim-example"  # argv[1] of this script when accelerate launches it around the example


# -- the world both tools read -------------------------------------------------------------------


def git_blob_id(data: bytes) -> str:
    """The id git gives a file of these bytes (`git hash-object`), to name the example's version."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def recipe_dict(world: Path, args) -> dict:
    """Our recipe, matched to the example's settings (output_dir and the cache are set per run)."""
    return {
        "model": {"name_or_path": str(world / "pipe"), "kind": "sd15", "mixed_precision": "no",
                  "gradient_checkpointing": bool(args.gradient_checkpointing)},
        "lora": {"rank": args.rank, "alpha": None, "target_modules": LORA_TARGETS},
        "data": {"source": "parquet", "path": str(world / "data" / "train.parquet"), "eval_path": None,
                 "resolution": args.resolution, "random_crop": False, "random_flip": True, "verify_images": False,
                 "num_workers": 0},
        # the example's default: beta_dpo 2500 without the 1/2 (the loss's cost does not depend on it)
        "method": {"name": "dpo", "beta": 2500.0, "beta_convention": "diffusers"},
        "trainer": {"output_dir": str(world / "runs" / "unset"), "seed": 0, "max_steps": args.steps,
                    "per_device_batch_size": 1, "gradient_accumulation": 1, "lr": args.lr,
                    "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "log_every": 1,
                    "checkpoint_every": 100000, "eval_every": 0, "sample_every": 0},
        "sample": {"prompts": []},
    }


def example_args(world: Path, run_dir: Path, args) -> list[str]:
    """The example's command line for the same settings as recipe_dict."""
    out = ["--pretrained_model_name_or_path", str(world / "pipe"), "--dataset_name", str(world / "data"),
           "--dataset_split_name", "train", "--cache_dir", str(world / "hf-datasets"), "--output_dir", str(run_dir),
           "--resolution", str(args.resolution), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
           "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000", "--learning_rate", str(args.lr),
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", str(args.rank), "--beta_dpo", "2500",
           "--max_grad_norm", "1.0", "--seed", "0", "--mixed_precision", "no", "--dataloader_num_workers", "0",
           "--report_to", "tensorboard"]
    return out + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def make_world(world: Path, args) -> dict:
    """Pipeline folder, pairs and our recipe file under `world`; returns what it took."""
    import yaml
    from train_breakdown import build_pipeline, write_pairs

    from deradiff.io import write_text_atomic
    from deradiff.training.recipe_load import load_recipe

    start = time.perf_counter()
    pipe = build_pipeline(args.tiny, world / "build")
    pipe.save_pretrained(world / "pipe", safe_serialization=True)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    del pipe
    (world / "data").mkdir(parents=True, exist_ok=True)
    write_pairs(world / "data" / "train.parquet", args.pairs, (args.resolution * 5 // 4, args.resolution))
    write_text_atomic(world / "recipe.yaml", yaml.safe_dump(recipe_dict(world, args), sort_keys=False))

    load_recipe(world / "recipe.yaml")  # validated here, before any run
    return {"params": params, "build_s": time.perf_counter() - start}


# -- one run: launch, watch memory, read its steps ----------------------------------------------


def launch_prefix(args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(args.threads)]


def run_env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("WANDB_MODE", None)
    return env


class RssWatch:
    """Samples the largest resident set among a process and its descendants every `period` s;
    `after` says when to start counting (e.g. once the first step is done)."""

    def __init__(self, pid: int, after, period: float = 0.5):
        self.pid, self.after, self.period = pid, after, period
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _largest_mib(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        sizes = []
        for p in procs:
            try:
                sizes.append(p.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                pass
        return max(sizes, default=0.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            if self.after():
                self.peak_mib = max(self.peak_mib, self._largest_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def run_once(cmd: list[str], env: dict, run_dir: Path, stepped) -> dict:
    """Run `cmd` (log in run_dir/log.txt): wall seconds, peak RSS of its largest process (wait4),
    peak RSS sampled after `stepped()` turns true, exit status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watch = RssWatch(proc.pid, stepped)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0,
            "steps_rss_mib": watch.stop(), "cpu_s": usage.ru_utime + usage.ru_stime}


def example_steps(steps_file: Path) -> list[float]:
    """Step seconds from the shim's file: the first line is the bar's creation time, then one
    time per progress-bar update (one optimizer step each)."""
    times = [float(x) for x in _lines(steps_file)]
    return [b - a for a, b in pairwise(times)]


def our_steps(run_dir: Path) -> tuple[list[float], list[float], float | None]:
    """(step seconds, dpo/loss per step, the trainer's own perf/peak_mem_mib) from metrics.jsonl."""
    rows = [json.loads(ln) for ln in _lines(run_dir / "metrics.jsonl")]
    peak = rows[-1].get("perf/peak_mem_mib") if rows else None
    return [r["perf/sec_per_step"] for r in rows], [r["dpo/loss"] for r in rows], peak


def lora_params(path: Path) -> dict:
    """Tensors and parameters in a saved LoRA file (both tools write pytorch_lora_weights.safetensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    return {"tensors": len(shapes), "params": sum(int(math.prod(s)) for s in shapes)}


def run_tool(tool: str, world: Path, run_dir: Path, args) -> dict:
    """One training run of `tool` (example, cached, uncached, split) with its step times and memory."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if tool == "example":
        steps_file = run_dir / "steps.txt"
        cmd = [*launch_prefix(args), str(Path(__file__).resolve()), SHIM, str(Path(args.example).resolve()),
               str(steps_file), *example_args(world, run_dir / "out", args)]
        out = run_once(cmd, run_env(args), run_dir, lambda: len(_lines(steps_file)) >= 2)
        out["steps_s"] = example_steps(steps_file)
        lora = run_dir / "out" / "pytorch_lora_weights.safetensors"
    else:
        cmd = [*launch_prefix(args), str(ROOT / "train" / "align.py"), f"recipe={world / 'recipe.yaml'}",
               f"trainer.output_dir={run_dir / 'out'}"]
        cmd += [f"data.latent_cache={world / 'cache'}" if o == "CACHE" else o for o in OUR_OVERRIDES[tool]]
        out = run_once(cmd, run_env(args), run_dir, lambda: bool(_lines(run_dir / "out" / "metrics.jsonl")))
        out["steps_s"], out["losses"], out["trainer_peak_mem_mib"] = our_steps(run_dir / "out")
        lora = run_dir / "out" / "lora" / "pytorch_lora_weights.safetensors"
    if out["rc"] != 0 or len(out["steps_s"]) != args.steps:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{tool} run failed (exit {out['rc']}, {len(out['steps_s'])} steps timed):\n{tail}")
    out["lora"] = lora_params(lora)  # the same adapter in both tools: the same tensors and sizes
    return out


def build_cache(world: Path, args) -> dict:
    """`deradiff cache` of the pairs (both flips, captions) into world/cache: time and memory."""
    cmd = [str(Path(sys.executable).parent / "deradiff"), "cache", f"recipe={world / 'recipe.yaml'}",
           f"data.latent_cache={world / 'cache'}", "--num-workers", "0", "--threads", str(args.threads)]
    out = run_once(cmd, run_env(args), world / "cache-log", lambda: True)
    if out["rc"] != 0:
        raise RuntimeError(f"deradiff cache failed:\n{(world / 'cache-log' / 'log.txt').read_text()[-3000:]}")
    return {**out, "s_per_pair": out["wall_s"] / args.pairs}


# -- the example, inside the launched process ----------------------------------------------------


WANDB_PATCH = ("import wandb\n", "wandb = None  # harness: wandb is not installed; used only with --report_to wandb\n")


def example_source(example: str, have_wandb: bool) -> tuple[str, list[str]]:
    """The example's source as it is run, and the patches applied to it (in memory; none when
    wandb is installed: its top-level `import wandb` is the one line that needs it)."""
    src = Path(example).read_text()
    if have_wandb:
        return src, []
    if src.count(WANDB_PATCH[0]) != 1:
        raise RuntimeError(f"{example}: expected one line {WANDB_PATCH[0]!r}; is this the diffusers DPO example?")
    return src.replace(*WANDB_PATCH), [f"{WANDB_PATCH[0].strip()!r} -> {WANDB_PATCH[1].strip()!r}"]


def shim_example(example: str, steps_file: str, argv: list[str]) -> None:
    """Run the example script as __main__, appending a time to `steps_file` when its "Steps"
    progress bar is created and at each update (after each optimizer step)."""
    import importlib.util

    import tqdm.auto

    src, _ = example_source(example, importlib.util.find_spec("wandb") is not None)
    base = tqdm.auto.tqdm

    def mark() -> None:
        with open(steps_file, "a") as f:
            f.write(f"{time.perf_counter():.6f}\n")

    class TimedBar(base):
        def __init__(self, *a, **k):
            self._timed = k.get("desc") == "Steps"  # the example's training bar; not datasets' bars
            super().__init__(*a, **k)
            if self._timed:
                mark()

        def update(self, n=1):
            out = super().update(n)
            if self._timed:
                mark()
            return out

    tqdm.auto.tqdm = TimedBar  # the example does `from tqdm.auto import tqdm` when it is run below
    sys.argv = [example, *argv]
    sys.path.insert(0, str(Path(example).parent))
    exec(compile(src, example, "exec"), {"__name__": "__main__", "__file__": example})


# -- summary -------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Per tool: median step seconds over steps 2..N of all its runs, median first step, median
    peak and during-steps RSS over its runs; then ours / example for each of our tools, the
    issue's targets (cached step <= 0.85x, peak memory <= 0.8x; the latter for split too), and the
    largest loss difference of cached vs uncached and vs split within a repeat. `runs`: {"tool", "repeat", "steps_s", ...}."""
    tools: dict[str, dict] = {}
    for tool in TOOLS:
        mine = [r for r in runs if r["tool"] == tool]
        if not mine:
            continue
        tools[tool] = {
            "runs": len(mine),
            "step_s": _median([s for r in mine for s in r["steps_s"][1:]]),
            "first_step_s": _median([r["steps_s"][0] for r in mine]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in mine]),
            "steps_rss_mib": _median([r["steps_rss_mib"] for r in mine]),
            "wall_s": _median([r["wall_s"] for r in mine]),
        }
    summary: dict = {}
    ex = tools.get("example")
    for tool in OUR_OVERRIDES:
        if ex is None or tool not in tools:
            continue
        for key in ("step_s", "peak_rss_mib", "steps_rss_mib"):
            if tools[tool][key] and ex[key]:
                summary[f"{tool}/{key}_vs_example"] = tools[tool][key] / ex[key]
        pairs = [(o, e) for o in runs for e in runs if o["tool"] == tool and e["tool"] == "example"
                 and o["repeat"] == e["repeat"] and len(o["steps_s"]) > 1 and len(e["steps_s"]) > 1]
        summary[f"{tool}/step_s_vs_example_per_repeat"] = [
            statistics.median(o["steps_s"][1:]) / statistics.median(e["steps_s"][1:]) for o, e in pairs]
    if "cached/step_s_vs_example" in summary:
        summary["target_step_0.85_met"] = summary["cached/step_s_vs_example"] <= 0.85
    if "cached/peak_rss_mib_vs_example" in summary:
        summary["target_memory_0.8_met"] = summary["cached/peak_rss_mib_vs_example"] <= 0.8
    if "split/peak_rss_mib_vs_example" in summary:
        summary["split/target_memory_0.8_met"] = summary["split/peak_rss_mib_vs_example"] <= 0.8
    for other in ("uncached", "split"):
        diffs = [abs(a - b) for c in runs for u in runs if c["tool"] == "cached" and u["tool"] == other
                 and c["repeat"] == u["repeat"] for a, b in zip(c.get("losses", []), u.get("losses", []), strict=True)]
        if diffs:
            summary[f"cached_vs_{other}_max_loss_diff"] = max(diffs)
    return tools, summary


def format_table(tools: dict, summary: dict) -> str:
    """The printed table: one column per tool."""
    names = list(tools)
    rows = [("step (s, median of steps 2..N)", "step_s"), ("first step (s)", "first_step_s"),
            ("peak RSS (MiB)", "peak_rss_mib"), ("RSS during steps (MiB)", "steps_rss_mib"),
            ("run wall time (s)", "wall_s")]
    lines = [f"{'':<32}" + "".join(f"{n:>14}" for n in names)]
    for label, key in rows:
        lines.append(f"{label:<32}" + "".join(
            f"{tools[n][key]:>14.1f}" if tools[n][key] is not None else f"{'-':>14}" for n in names))
    for key in ("step_s", "peak_rss_mib", "steps_rss_mib"):
        cells = [summary.get(f"{n}/{key}_vs_example") for n in names]
        lines.append(f"{key + ' vs example':<32}" + "".join(
            f"{c:>13.3f}x" if c is not None else f"{'1.000x' if n == 'example' else '-':>14}"
            for n, c in zip(names, cells, strict=True)))
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", required=True, help="path of train_diffusion_dpo.py (kept outside this repository)")
    p.add_argument("--tiny", action="store_true", help="toy widths at 64 px (a smoke test of the harness)")
    p.add_argument("--resolution", type=int, default=None, help="training side in px (default 256; --tiny 64)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (>= 2; step 1 is not counted)")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool, alternated in --tools order")
    p.add_argument("--pairs", type=int, default=4, help="JPEG pairs written (and cached); steps cycle over them")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both tools with gradient checkpointing")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    p.add_argument("--keep", default=None, help="keep the world and run folders here instead of a temp folder")
    p.add_argument("--out", default="benchmarks/results/diffusers_dpo.json")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 256)
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step is warm-up and not counted")
    args.tools = [t for t in args.tools.split(",") if t]
    if bad := [t for t in args.tools if t not in TOOLS]:
        p.error(f"--tools: unknown {bad}; choose from {','.join(TOOLS)}")
    return args


def describe_example(args) -> dict:
    """What the JSON records about the example measured: its git blob, known version, patches."""
    data = Path(args.example).read_bytes()
    blob = git_blob_id(data)
    return {"path": str(args.example), "git_blob": blob, "sha256": hashlib.sha256(data).hexdigest(),
            "known_as": KNOWN_EXAMPLES.get(blob, "unknown version: see its git_blob"),
            "patches": example_source(args.example, importlib.util.find_spec("wandb") is not None)[1],
            "shim": "run as __main__ by this script under accelerate launch, tqdm.auto.tqdm wrapped to time its "
                    "Steps bar; its code otherwise unchanged",
            "launch": ["accelerate", "launch", *launch_prefix(args)[3:]],
            "args": example_args(Path("WORLD"), Path("RUN/out"), args)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SHIM]:
        shim_example(argv[1], argv[2], argv[3:])
        return 0
    args = parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor
    from importlib.metadata import version
    from multiprocessing import get_context

    from common import write_results

    example = describe_example(args)
    versions = {**{k: version(k) for k in ("diffusers", "torch", "transformers", "peft", "accelerate", "datasets")},
                "threads": args.threads, "cpus": os.cpu_count()}
    world = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="diffusers_dpo."))
    world.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    # in a child process, so that this one does not hold the built pipeline's memory during the runs
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        made = pool.submit(make_world, world, args).result()
    print(f"world in {world}: {made['build_s']:.0f} s; parameters {made['params']}", flush=True)
    cache = build_cache(world, args) if {"cached", "split"} & set(args.tools) else None
    if cache:
        print(f"cache: {cache['wall_s']:.0f} s for {args.pairs} pairs (both flips), peak RSS "
              f"{cache['peak_rss_mib']:.0f} MiB", flush=True)
    runs: list[dict] = []
    for repeat in range(args.repeats):
        for tool in args.tools:
            out = run_tool(tool, world, world / "runs" / f"{tool}-{repeat}", args)
            runs.append({"tool": tool, "repeat": repeat, **out})
            print(f"repeat {repeat} {tool:>8}: steps {[round(s, 2) for s in out['steps_s']]} s, peak RSS "
                  f"{out['peak_rss_mib']:.0f} MiB, during steps {out['steps_rss_mib']:.0f} MiB, wall "
                  f"{out['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        # written after every repeat: a run cut short still leaves the repeats it finished
        tools, summary = summarize(runs)
        measured = {"world": made, "cache": cache, "runs": runs, "tools": tools, "repeats_done": repeat + 1,
                    "recipe": recipe_dict(Path("WORLD"), args), "wall_s": time.perf_counter() - start,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        write_results(args.out, args, measured, summary, example=example, versions=versions)
    print(f"Diffusion-DPO, {'tiny' if args.tiny else 'SD1.5'} shape, {args.resolution} px, fp32 CPU, 1 pair per step, "
          f"LoRA rank {args.rank}, {args.threads} threads, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.repeats} runs x {args.steps} steps per tool")
    print(format_table(tools, summary))
    print("summary: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if not args.keep:
        shutil.rmtree(world, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
