"""`deradiff evaluate`: sample a lambda grid x prompts x seeds with the realigned pipeline and score it.

    deradiff evaluate --pipeline toy --lora runs/toy-dpo --lam 0 0.5 1 2 4 linear:0,2 \\
        --prompts toy:test --seeds 0 1 2 3 --reward toy --baseline lora-scale \\
        --baselines runs/toy-sweep/lambda-0.5 runs/toy-sweep/lambda-2 --out runs/eval

Arms, all on the same prompts and seeds (so every comparison is paired):
- realigned: output mixing, (1 - lam) * reference + lam * aligned per step (any schedule); with
  named LoRAs (--lora color=runs/a contrast=runs/b) lambda vectors (--lam color=1.5,contrast=0.5),
  rows keyed by the vector's canonical string (lam_value None; results.lam_vector reads it back);
  `deradiff search --grid-vector` and `deradiff validate` (weighted-reward baselines) take them;
- lora-scale: the weight-space baseline, the aligned LoRA's scale set to lam (constant lams);
- retrained:<name>: a baseline LoRA trained at beta_k (its lam is beta0 / beta_k); with named
  LoRAs, one trained on a weighted reward (its lam is the vector that emulates it, set by validate).
Every image goes through `realigned(...)` so its emulated path KL to the reference is recorded
(baselines at lam = 1 with their own adapter, which is bit-identical to sampling them).

The output folder (`--out`) is self-describing and resumable:
  config.json      what must not change between runs into this folder (pipeline, LoRA hash,
                   sampler, prompts, seeds, rewards, judge); written with the first samples, and
                   once results exist a different configuration is refused with the diff
  results.jsonl    one row per image, appended as it is made: arm, lam, prompt_id, prompt,
                   seed, image, path_kl, reward/<name>, fidelity/<name> (the judge's columns,
                   deradiff.plugins.JudgeEntry), mode (two_forward | mixed_batch), time_s
  images/<arm>/lam=<lam>/p<prompt_id>_s<seed>.png
  shards/<i>-of-<n>.jsonl   rows of `--shard i/n` jobs (a contiguous prompt range each);
                   `--merge` folds them into results.jsonl; <i>-of-<n>.sampling.json: the
                   shard's sampling throughput
  summary.json     {"summary": one row per (arm, lam) with every metric's mean over prompts and
                   its interval, "sampling": this run's images, images_per_s (per process),
                   realign_overhead (realigned sampling time / the time with one plain forward per
                   step; plain and realigned calls timed in interleaved pairs once per input
                   shape, median ratio), modes, wall_s, processes}
  commands.txt     every command run into the folder
One node, several GPUs: `--devices cuda:0,cuda:1` starts one `--shard i/n` process per device
and merges their rows (the same rows as one process would make).
Re-running samples only what is missing; stored images that are missing or do not decode
are sampled again and counted. Modules: sampling.py (the sampling primitive), config.py (the
folder's identity), options.py (shared options), lams.py (lambda values); this file is the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.evaluation.baselines import LoraRun, baseline_lambda, check_baselines, lora_run, resolve_lora
from deradiff.evaluation.config import (
    EvalConfig,
    check_resume_config,
    config_from_args,
    parse_reward_spec,
    write_identity,
)
from deradiff.evaluation.lams import LAM_POLICY, Lam, constant, lambda_arg, parse_grid
from deradiff.evaluation.options import add_eval_arguments, check_lora_lams, command_words, log_command
from deradiff.evaluation.results import (
    LORA_SCALE,
    REALIGNED,
    RESULTS,
    RETRAINED,
    drop_torn_tail,
    format_summary,
    merge_shards,
    parse_shard,
    per_prompt_table,
    pil_to_tensor,
    read_rows,
    row_key,
    shard_prompt_ids,
    summarize,
    write_json,
)
from deradiff.evaluation.sampling import Throughput, image_ok, load_sampler, save_png

ALIGNED_ADAPTER = "aligned"
ONE = constant(1.0)  # a baseline arm samples its own adapter as the aligned model

Job = tuple[str, Lam, int, int]  # arm, lambda, prompt id, seed


class Evaluator:
    """Samples and scores the rows an evaluation folder is missing; loads models only if needed.

    `ensure(arm, lams, prompt_ids, seeds)` returns the table rows of those arm x lams x prompt_ids
    x seeds (default: every prompt, the folder's seeds; `seeds` picks some of them, e.g. the pilot
    seeds of `deradiff adapt`), sampling the missing (or corrupt) ones first. OUT/config.json is
    written when the first image is about to be stored, so a run that fails before leaves the
    folder open.
    """

    def __init__(self, cfg: EvalConfig, out: str | os.PathLike, shard: tuple[int, int] = (0, 1),
                 baselines: Sequence[LoraRun] = ()):
        self.cfg, self.out = cfg, Path(out)
        self.results = self.out / RESULTS if shard == (0, 1) else self.out / "shards" / f"{shard[0]}-of-{shard[1]}.jsonl"
        self.aligned = lora_run(cfg.lora)
        self.beta0 = cfg.beta0 if cfg.beta0 is not None else self.aligned.beta
        self.baselines = {f"{RETRAINED}:{b.label}": b for b in baselines}
        if len(self.baselines) != len(baselines):
            raise UserError(f"baselines must have distinct folder names, got {[b.label for b in baselines]}")
        if baselines:
            check_baselines(self.aligned, baselines)
            if self.beta0 is None:
                raise UserError(f"the aligned LoRA {cfg.lora} has no beta (lora_info.json / recipe.yaml): pass --beta0")
            if not self.beta0 > 0:
                raise UserError(f"the aligned LoRA {cfg.lora} has beta {self.beta0:g}; pass --beta0 (> 0)")
        self.identity = cfg.identity()
        check_resume_config(self.out, cfg, self.identity)
        # A shard also reuses rows already merged into results.jsonl; it writes only its own file.
        merged = read_rows(self.out / RESULTS) if self.results.name != RESULTS else []
        self.rows = {row_key(r): r for r in [*merged, *read_rows(self.results)]}
        self._verified: set[tuple] = set()
        self.resampled = 0  # stored images found missing or corrupt, sampled again
        self.sampled = 0
        self._sampler = self._rewards = self._judge = None
        self.judge_entry = cfg.judge_entry()  # its metric names; None when fidelity is off

    # -- what an arm is ----------------------------------------------------------------------
    def baseline_lams(self) -> dict[str, Lam]:
        """arm name -> lambda = beta0 / beta of each retrained baseline."""
        return {arm: constant(baseline_lambda(self.beta0, b.beta)) for arm, b in self.baselines.items()}

    def _jobs(self, arm: str, lams: Sequence[Lam], prompt_ids: Iterable[int], seeds: Sequence[int]) -> list[Job]:
        jobs = []
        for lam in lams:
            if arm == LORA_SCALE and lam.is_vector:
                raise UserError(f"arm {arm} scales one LoRA and cannot mix a lambda vector ({lam}): "
                                "sample vectors with the realigned arm")
            if arm != REALIGNED and lam.value is None and not lam.is_vector:  # a baseline's vector is its label
                raise UserError(f"arm {arm} needs constant lambdas, got schedule {lam}")
            jobs += [(arm, lam, pid, seed) for pid in prompt_ids for seed in seeds]
        return jobs

    def _check_named(self, arm: str, lams: Sequence[Lam]) -> None:
        """UserError (one line) for lambdas this folder's LoRAs cannot realign with; with named
        LoRAs (lambda vectors) there is no weight-scaled arm, and scalar lambdas only with one LoRA."""
        loras = self.cfg.loras
        if loras and (arm == LORA_SCALE or (len(loras) > 1 and not all(lam.is_vector for lam in lams))):
            raise UserError(f"{self.out} holds named LoRAs ({', '.join(loras)}) mixed by lambda vectors: sample it "
                            "with `deradiff evaluate --lam NAME=LAM,...`, `deradiff search --grid-vector ...` or "
                            "`deradiff validate` with weighted-reward baselines (no weight-scaled arm, no scalar grid)")
        check_lora_lams(loras or self.cfg.lora, lams)

    def _key(self, job: Job) -> tuple:
        arm, lam, pid, seed = job
        return arm, lam.name, self.cfg.prompts[pid], seed

    def ensure(self, arm: str, lams: Sequence[Lam], prompt_ids: Iterable[int] | None = None,
               seeds: Sequence[int] | None = None) -> list[dict]:
        if arm not in (REALIGNED, LORA_SCALE) and arm not in self.baselines:
            raise UserError(f"unknown arm {arm!r}; known: {[REALIGNED, LORA_SCALE, *self.baselines]}")
        prompt_ids = list(range(len(self.cfg.prompts)) if prompt_ids is None else prompt_ids)
        seeds = list(self.cfg.seeds if seeds is None else seeds)
        if not set(seeds) <= set(self.cfg.seeds):  # the folder's identity names every seed it holds
            raise ValueError(f"seeds {sorted(set(seeds) - set(self.cfg.seeds))} are not among {self.cfg.seeds}")
        self._check_named(arm, lams)
        jobs = self._jobs(arm, lams, prompt_ids, seeds)
        todo = []
        for job in jobs:
            key = self._key(job)
            row = self.rows.get(key)
            if row is not None and key not in self._verified:
                if image_ok(self.out / row["image"]):
                    self._verified.add(key)
                else:
                    self.resampled += 1
                    row = None
            if row is None:
                todo.append(job)
        if todo:
            self._sample(todo)
        return [self.rows[self._key(job)] for job in jobs]

    # -- models, loaded on first use ---------------------------------------------------------
    def _load(self) -> None:
        if self._sampler is not None:
            return
        from deradiff.rewards import get_reward

        cfg = self.cfg
        self._rewards = {}
        for spec in cfg.rewards:
            name, kwargs = parse_reward_spec(spec)
            self._rewards[f"reward/{name}"] = get_reward(name, **kwargs).to(cfg.device)
        self._judge = self._judge or cfg.load_judge(cfg.device)
        # named LoRAs may be given as training run folders too (their lora/ holds the file)
        loras = {name: resolve_lora(path) for name, path in cfg.loras.items()} if cfg.loras else None
        self._sampler = load_sampler(cfg.pipeline, dtype=cfg.dtype, device=cfg.device, scheduler=cfg.scheduler,
                                     lora=loras or self.aligned.file, adapter_name=ALIGNED_ADAPTER, steps=cfg.steps,
                                     guidance=cfg.guidance, size=cfg.size, eta=cfg.eta, mode=cfg.mode,
                                     noise_level=cfg.noise_level)

    @contextmanager
    def _arm(self, arm: str, lam: Lam):
        """Activate an arm's adapter; yields the lambda to realign with."""
        from deradiff.models import denoiser_name, load_lora, set_lora_scale

        pipe = self._sampler.pipe
        if arm == REALIGNED and self.cfg.loras:
            yield lam  # named LoRAs: realign picks each vector's adapters itself (checked in ensure)
        elif arm == REALIGNED:
            pipe.set_adapters([ALIGNED_ADAPTER])
            yield lam
        elif arm == LORA_SCALE:
            pipe.set_adapters([ALIGNED_ADAPTER])
            denoiser = getattr(pipe, denoiser_name(pipe))
            set_lora_scale(denoiser, lam.value)
            try:
                yield ONE
            finally:
                set_lora_scale(denoiser, 1.0)
        else:
            name = f"baseline{list(self.baselines).index(arm)}"
            load_lora(pipe, self.baselines[arm].file, adapter_name=name)
            pipe.set_adapters([name])
            try:
                yield ONE
            finally:
                pipe.set_adapters(list(self.cfg.loras or [ALIGNED_ADAPTER]))
                pipe.delete_adapters(name)

    def _sample(self, todo: list[Job]) -> None:
        """Sample `todo`, one pipeline call per --batch-size jobs of one (arm, lambda): a call
        carries rows of several prompts and seeds (each row's noise from its own seed, so an image
        does not depend on its batch). Lambdas stay separate calls: the denoiser mixes with one
        lambda (schedule) per call and records it as one float per step for the path KL, and the
        lora-scale and retrained arms change the adapter itself per lambda; per-row lambdas would
        save at most the one partly filled call at the end of each lambda's jobs."""
        self._load()  # a model, LoRA or reward that fails to load leaves the folder as it was
        write_identity(self.out, self.cfg, self.identity)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.results)
        bar = tqdm(total=len(todo), desc=self._bar_name(), unit="img", dynamic_ncols=True)
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in todo:
            groups.setdefault((job[0], job[1].name), []).append(job)
        with open(self.results, "a") as table:
            for (arm, lam_name), jobs in groups.items():
                with self._arm(arm, jobs[0][1]) as lam:
                    for start in range(0, len(jobs), self.cfg.batch_size):
                        for row in self._sample_chunk(jobs[start:start + self.cfg.batch_size], lam):
                            table.write(json.dumps(row) + "\n")
                            table.flush()
                            self.rows[row_key(row)] = row
                            self._verified.add(row_key(row))
                        bar.set_postfix(arm=arm, lam=lam_name, **self.throughput.postfix())
                        bar.update(min(self.cfg.batch_size, len(jobs) - start))
        bar.close()

    def _sample_chunk(self, chunk: list[Job], lam: Lam) -> list[dict]:
        """Sample, store and score one batch of jobs; returns their table rows."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = [cfg.prompts[pid] for _, _, pid, _ in chunk]
        mode = self._sampler.mode_for(len(chunk), lam)
        images, kls = self._sampler.sample(prompts, [seed for *_, seed in chunk], lam)
        scores = self._score(images, prompts)
        dt = (time.perf_counter() - t0) / len(chunk)
        rows = []
        for i, (arm, job_lam, pid, seed) in enumerate(chunk):
            rel = Path("images") / arm.replace(":", "-") / f"lam={job_lam.name}" / f"p{pid:04d}_s{seed}.png"
            save_png(images[i], self.out / rel)
            row = {"arm": arm, "lam": job_lam.name, "lam_value": job_lam.value, "prompt_id": pid,
                   "prompt": cfg.prompts[pid], "seed": seed, "image": str(rel), "path_kl": kls[i],
                   **{k: float(v[i]) for k, v in scores.items()}, "mode": mode, "time_s": round(dt, 4)}
            if arm in self.baselines:
                row["beta"] = self.baselines[arm].beta
            rows.append(row)
        self.sampled += len(chunk)
        return rows

    @torch.no_grad()
    def _score(self, images, prompts: list[str]) -> dict[str, torch.Tensor]:
        x = pil_to_tensor(images).to(self.cfg.device)
        scores = {name: r.score(x, prompts).float().cpu() for name, r in self._rewards.items()}
        if self._judge is not None and self.judge_entry.image_metrics:
            per_image = self._judge.adherence(x, prompts)
            scores.update({col: per_image[k].float().cpu() for k, col in self.judge_entry.image_metrics.items()})
        return scores

    @property
    def throughput(self) -> Throughput:
        """This run's sampling time so far (images/s, realignment overhead, modes)."""
        return self._sampler.throughput if self._sampler is not None else Throughput()

    def _bar_name(self) -> str:
        name = self.results.stem
        return "evaluate" if name == "results" else f"evaluate {name}"

    def judge(self):
        """The fidelity judge (None when fidelity is off or no judge accepts the prompts)."""
        if self._judge is None:
            self._judge = self.cfg.load_judge()
        return self._judge


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    p.add_argument("--lam", nargs="+", type=lambda_arg, default=[lambda_arg(v) for v in ("0", "0.5", "1", "2")],
                   help="lambda grid: values (0 = reference, 1 = aligned, > 1 extrapolates) or schedules "
                   "linear:0,2 / cosine:0,2 / step:1,2@500; with named LoRAs (--lora NAME=PATH ...), lambda "
                   f"vectors color=1.5,contrast=0.5 (realigned arm only); {LAM_POLICY}")
    p.add_argument("--baseline", choices=[LORA_SCALE], default=None,
                   help="also sample the weight-space baseline: the aligned LoRA scaled by lambda (constant lambdas)")
    p.add_argument("--baselines", nargs="+", default=[], metavar="RUN",
                   help="retrained baseline LoRAs (run folders with lora/ and lora_info.json or recipe.yaml); "
                   "each is sampled once, at its lambda = beta0 / beta")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="sample only prompt range I of N (parallel jobs write OUT/shards/I-of-N.jsonl)")
    p.add_argument("--devices", default=None, metavar="D0,D1,...",
                   help="one process per device on this node (e.g. cuda:0,cuda:1; cpu,cpu works too), each "
                   "sampling one shard of the prompts, then merged into OUT/results.jsonl; replaces --device")
    p.add_argument("--merge", action="store_true", help="merge OUT/shards/*.jsonl into OUT/results.jsonl and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --devices process


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.merge:
        rows = merge_shards(out)
        print(f"merged {len(rows)} rows -> {out / RESULTS}")
        return 0
    grid = parse_grid(args.lam)
    vectors = [lam.name for lam in grid if lam.is_vector]
    if vectors and (args.baseline or args.baselines):
        raise UserError(f"lambda vectors ({vectors[0]}, ...) are sampled with the realigned arm only: "
                        "drop --baseline / --baselines, or evaluate them in another --out")
    shard = parse_shard(args.shard)
    devices = parse_devices(args.devices)
    if devices and shard != (0, 1):
        raise UserError("--devices splits the prompts into shards itself: leave out --shard")
    cfg = config_from_args(args)
    check_lora_lams(cfg.loras or cfg.lora, grid)  # before the folder is touched
    baselines = [lora_run(b) for b in args.baselines]
    ev = Evaluator(cfg, out, shard, baselines)
    if not args.worker:
        log_command(out, args)  # after every input check: only commands that ran are recorded
    start = time.perf_counter()
    throughput = None
    if devices:
        throughput = sample_on_devices(args, devices, out)
        ev = Evaluator(cfg, out, shard, baselines)  # reads the merged rows
    rows = ensure_all(ev, args, grid, shard_prompt_ids(len(cfg.prompts), shard))
    if ev.resampled:
        print(f"re-sampled {ev.resampled} stored images that were missing or corrupt")
    wall = time.perf_counter() - start
    throughput = throughput or ev.throughput
    print(f"{len(rows)} images ({throughput.images} sampled now, {wall:.1f}s) -> {ev.results}" + _rates(throughput))
    sampling = {**throughput.as_dict(), "wall_s": round(wall, 2), "processes": len(devices) or 1}
    if shard != (0, 1):
        ev.results.parent.mkdir(parents=True, exist_ok=True)
        ev.results.touch()  # an empty shard file: this shard is done, with nothing left to sample
        write_json(out / "shards" / f"{shard[0]}-of-{shard[1]}.sampling.json", sampling)
        if not args.worker:
            print(f"shard {shard[0]}/{shard[1]} done; after all shards: deradiff evaluate --merge --out {out}")
        return 0
    summary = summarize(per_prompt_table(rows, out, ev.judge()), args.n_boot, args.alpha)
    write_json(out / "summary.json", {"summary": summary, "sampling": sampling})
    print(format_summary(summary))
    return 0


def ensure_all(ev: Evaluator, args: argparse.Namespace, grid: Sequence[Lam], ids: Iterable[int]) -> list[dict]:
    """The rows of every arm the command asks for (realigned, lora-scale, retrained), sampled if missing."""
    ids = list(ids)
    rows = ev.ensure(REALIGNED, grid, ids)
    if args.baseline == LORA_SCALE:
        rows += ev.ensure(LORA_SCALE, [lam for lam in grid if lam.value is not None], ids)
    for arm, lam in ev.baseline_lams().items():
        rows += ev.ensure(arm, [lam], ids)
    return rows


def _rates(t: Throughput) -> str:
    if t.images_per_s is None:
        return ""
    overhead = "" if t.overhead is None else f", realignment x{t.overhead:.2f} the time of plain sampling"
    return f"; {t.images_per_s:.2f} img/s per process{overhead}; modes {t.modes}"


# -- one process per device -----------------------------------------------------------------------


def parse_devices(text: str | None) -> list[str]:
    """"cuda:0,cuda:1" -> ["cuda:0", "cuda:1"] ([] for None); UserError for a device torch cannot
    name or a CUDA device this machine does not have."""
    if text is None:
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UserError(f"--devices wants a comma-separated list such as cuda:0,cuda:1, got {text!r}")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UserError(f"--devices: {d!r} is not a device (write cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--devices: {d} is not on this machine (torch sees {torch.cuda.device_count()} CUDA "
                            "devices); list the ones it has, or cpu")
    return devices


def worker_commands(args: argparse.Namespace, devices: Sequence[str]) -> list[list[str]]:
    """`deradiff evaluate` for each device: the same options, --shard i/n and --device D_i (CPU
    workers share the cores: --threads is split among them unless given)."""
    n = len(devices)
    n_cpu = sum(torch.device(d).type == "cpu" for d in devices)
    base = command_words(args, skip=("devices", "device", "shard", "threads", "worker"))
    commands = []
    for i, device in enumerate(devices):
        threads = args.threads or (max(1, (os.cpu_count() or 1) // n_cpu) if torch.device(device).type == "cpu" else 0)
        extra = ["--shard", f"{i}/{n}", "--device", device, "--worker"] + (["--threads", str(threads)] if threads else [])
        commands.append([sys.executable, "-m", "deradiff.cli", "evaluate", *base, *extra])
    return commands


def sample_on_devices(args: argparse.Namespace, devices: Sequence[str], out: Path) -> Throughput:
    """Run one shard process per device, wait for all, merge their rows into OUT/results.jsonl
    (then their shard files go: the rows are merged); returns their summed throughput."""
    n = len(devices)
    stale = sorted(p.name for p in (out / "shards").glob("*-of-*.jsonl") if not p.name.endswith(f"-of-{n}.jsonl"))
    if stale:
        raise UserError(f"{out / 'shards'} holds shard results of another split ({', '.join(stale)}): run "
                        f"`deradiff evaluate --merge --out {out}`, then remove {out / 'shards'}")
    procs = [subprocess.Popen(cmd) for cmd in worker_commands(args, devices)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C or a kill: the workers go too (their rows so far are kept)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    failed = [f"{i}/{n} on {devices[i]} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise UserError(f"shard {', '.join(failed)} failed (its error is above); the rows made so far are kept: "
                        "run the same command again to finish")
    rows = merge_shards(out)
    throughput = Throughput()
    for i in range(n):
        stats = out / "shards" / f"{i}-of-{n}.sampling.json"
        throughput.merge(json.loads(stats.read_text()))
        stats.unlink()
        (out / "shards" / f"{i}-of-{n}.jsonl").unlink(missing_ok=True)
    print(f"merged {len(rows)} rows of {n} processes ({', '.join(devices)}) -> {out / RESULTS}")
    return throughput
