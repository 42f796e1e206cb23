"""`deradiff evaluate`: sample a lambda grid x prompts x seeds with the realigned pipeline and score it.

    deradiff evaluate --pipeline toy --lora runs/toy-dpo --lam 0 0.5 1 2 4 linear:0,2 \\
        --prompts toy:test --seeds 0 1 2 3 --reward toy --baseline lora-scale \\
        --baselines runs/toy-sweep/lambda-0.5 runs/toy-sweep/lambda-2 --out runs/eval

Arms, all on the same prompts and seeds (so every comparison is paired):
- realigned: output mixing, (1 - lam) * reference + lam * aligned per step (any schedule);
- lora-scale: the weight-space baseline, the aligned LoRA's scale set to lam (constant lams);
- retrained:<name>: a baseline LoRA trained at beta_k (its lam is beta0 / beta_k).
Every image goes through `realigned(...)` so its emulated path KL to the reference is recorded
(baselines at lam = 1 with their own adapter, which is bit-identical to sampling them).

The output folder (`--out`) is self-describing and resumable:
  config.json      what must not change between runs into this folder (pipeline, LoRA hash,
                   sampler, prompts, seeds, rewards); a different one is refused with the diff
  results.jsonl    one row per image, appended as it is made: arm, lam, prompt_id, prompt,
                   seed, image, path_kl, reward/<name>, fidelity/<name> (toy), time_s
  images/<arm>/lam=<lam>/p<prompt_id>_s<seed>.png
  shards/<i>-of-<n>.jsonl   rows of `--shard i/n` jobs (a contiguous prompt range each);
                   `--merge` folds them into results.jsonl
  commands.txt     every command run into the folder
Re-running samples only what is missing; stored images that are missing or do not decode
are sampled again and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.evaluation.baselines import LoraRun, baseline_lambda, check_baselines, lora_run, resolve_lora
from deradiff.evaluation.results import (
    RESULTS,
    SET_METRICS,
    drop_torn_tail,
    format_summary,
    lam_name,
    lam_value,
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
from deradiff.realign import MODES, LambdaSchedule, denoiser_attribute, parse_lambda, path_kl, realigned

CONFIG = "config.json"
REALIGNED, LORA_SCALE, RETRAINED = "realigned", "lora-scale", "retrained"
ALIGNED_ADAPTER = "aligned"
# per-image fidelity columns, named as deradiff.toy.metrics names its estimates
ADHERENCE_COLUMNS = {"color": "fidelity/color_acc", "shape": "fidelity/shape_acc",
                     "background": "fidelity/background_acc", "all": "fidelity/adherence"}


# -- configuration ------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """What an evaluation folder holds samples of; `identity()` must match on resume."""

    lora: str
    pipeline: str = "toy"
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    eta: float = 0.0
    size: int | None = None
    mode: str = "two_forward"
    dtype: str = "float32"
    rewards: list[str] = field(default_factory=lambda: ["toy"])
    fidelity: str = "auto"  # auto | toy | none
    classifier: str | None = None
    beta0: float | None = None
    device: str = "cpu"
    batch_size: int = 8

    def identity(self) -> dict:
        """The fields that define the samples (not where or how fast they are made), with the
        LoRA (and classifier) identified by content hash."""
        out = {k: v for k, v in asdict(self).items() if k not in ("device", "batch_size", "lora", "classifier", "beta0")}
        out["lora_sha256"] = file_sha256(resolve_lora(self.lora))
        out["fidelity"] = self.uses_fidelity  # "auto" and "toy" that resolve alike make the same samples
        out["classifier_sha256"] = _classifier_hash(self.classifier) if self.uses_fidelity else None
        if self.pipeline == "toy":  # re-pretrained toy weights make other samples
            from deradiff.toy.store import ASSET_DIR, MANIFEST_NAME

            manifest = ASSET_DIR / MANIFEST_NAME
            out["toy_manifest_sha256"] = file_sha256(manifest) if manifest.exists() else None
        return out

    @property
    def uses_fidelity(self) -> bool:
        if self.fidelity == "auto":
            return all(_is_toy_caption(p) for p in self.prompts)
        return self.fidelity == "toy"


def expected_metrics(cfg: EvalConfig) -> list[str]:
    """The metric names an evaluation with `cfg` can produce (path_kl only with a stochastic sampler)."""
    names = [f"reward/{parse_reward_spec(spec)[0]}" for spec in cfg.rewards] + ["path_kl"]
    if cfg.uses_fidelity:
        names += list(ADHERENCE_COLUMNS.values()) + (list(SET_METRICS) if len(cfg.seeds) >= 2 else [])
    return names


def _is_toy_caption(prompt: str) -> bool:
    from deradiff.toy.domain import parse_caption

    try:
        parse_caption(prompt)
        return True
    except ValueError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _classifier_hash(path: str | None) -> str:
    from deradiff.toy.classifier import WEIGHTS_NAME
    from deradiff.toy.store import ASSET_DIR

    root = Path(path) if path else ASSET_DIR
    candidates = [root / WEIGHTS_NAME, root / "classifier" / WEIGHTS_NAME]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"no toy classifier at {root} (looked for {[str(p) for p in candidates]}): pass "
                        "--classifier DIR, rebuild the toy assets with `deradiff toy pretrain`, or --fidelity none")
    return file_sha256(found)


def check_resume_config(out: Path, cfg: EvalConfig) -> None:
    """Write out/config.json, or refuse when the folder holds samples of a different config."""
    now = cfg.identity()
    path = out / CONFIG
    if path.exists():
        saved = json.loads(path.read_text())["identity"]
        diff = [f"{k}: {_short(saved.get(k))} -> {_short(now.get(k))}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            raise UserError(f"{out} holds results of a different configuration (saved -> now): " + "; ".join(diff)
                            + f". Use another --out, or delete {path} and {out / RESULTS} to start over")
    write_json(path, {"identity": now, "config": asdict(cfg)})


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items: {value[0]!r}, ..., {value[-1]!r}]"
    return repr(value)


def load_saved_config(out: Path) -> EvalConfig | None:
    path = Path(out) / CONFIG
    if not path.exists():
        return None
    saved = json.loads(path.read_text())["config"]
    return EvalConfig(**{f.name: saved[f.name] for f in fields(EvalConfig) if f.name in saved})


# -- lambda grids ---------------------------------------------------------------------------------


def parse_grid(values: Sequence[str | float]) -> list[LambdaSchedule]:
    """Lambda values / schedules; UserError for an empty grid or duplicates."""
    if not values:
        raise UserError("the lambda grid is empty: pass --lam with at least one value, e.g. --lam 0 0.5 1 2")
    schedules = [parse_lambda(v) for v in values]
    names = [str(s) for s in schedules]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"the lambda grid has duplicates: {dups} (in {list(map(str, values))}); list each value once")
    return schedules


# -- sampling -------------------------------------------------------------------------------------


def sample_batch(pipe, prompts: list[str], seeds: list[int], schedule, call: dict, eta: float = 0.0,
                 reference=None, mode: str = "two_forward"):
    """Realigned images (PIL) for prompts[i] with noise from seed[i] and their emulated path KL
    (floats, or None for deterministic samplers). Each row's noise depends only on its seed."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with realigned(pipe, lam=schedule, reference=reference, mode=mode) as denoiser:
        images = pipe(list(prompts), generator=generators, **call).images
    guidance = call.get("guidance_scale", getattr(pipe, "_guidance_scale", 1.0))
    kl = path_kl(denoiser.records, pipe.scheduler, guidance_scale=guidance, eta=eta)
    return images, [None] * len(images) if kl is None else [float(v) for v in kl]


def image_ok(path: Path) -> bool:
    """Whether a stored PNG exists and decodes completely."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # missing, truncated, not an image: all mean sample it again
        return False


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """"name" or "name:key=value,key=value" (e.g. "hpsv2:version=v2.1,checkpoint=/m/hps.pt")."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"reward {spec!r}: options are key=value, comma-separated (got {item!r})")
        kwargs[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return name, kwargs


class Evaluator:
    """Samples and scores the rows an evaluation folder is missing; loads models only if needed.

    `ensure(arm, lams, prompt_ids)` returns the table rows of those arm x lams x prompt_ids x
    seeds, sampling the missing (or corrupt) ones first.
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
        check_resume_config(self.out, cfg)
        # A shard also reuses rows already merged into results.jsonl; it writes only its own file.
        merged = read_rows(self.out / RESULTS) if self.results.name != RESULTS else []
        self.rows = {row_key(r): r for r in [*merged, *read_rows(self.results)]}
        self._verified: set[tuple] = set()
        self.resampled = 0  # stored images found missing or corrupt, sampled again
        self.sampled = 0
        self._pipe = self._rewards = self._judge = None

    # -- what an arm is ----------------------------------------------------------------------
    def baseline_lams(self) -> dict[str, float]:
        """arm name -> lambda = beta0 / beta of each retrained baseline."""
        return {arm: baseline_lambda(self.beta0, b.beta) for arm, b in self.baselines.items()}

    def _jobs(self, arm: str, lams: Sequence, prompt_ids: Iterable[int]) -> list[tuple[str, str, int, int]]:
        jobs = []
        for lam in lams:
            name = lam_name(lam)
            if arm != REALIGNED and lam_value(name) is None:
                raise UserError(f"arm {arm} needs constant lambdas, got schedule {name}")
            jobs += [(arm, name, pid, seed) for pid in prompt_ids for seed in self.cfg.seeds]
        return jobs

    def ensure(self, arm: str, lams: Sequence, prompt_ids: Iterable[int] | None = None) -> list[dict]:
        if arm not in (REALIGNED, LORA_SCALE) and arm not in self.baselines:
            raise UserError(f"unknown arm {arm!r}; known: {[REALIGNED, LORA_SCALE, *self.baselines]}")
        prompt_ids = list(range(len(self.cfg.prompts)) if prompt_ids is None else prompt_ids)
        jobs = self._jobs(arm, lams, prompt_ids)
        todo = []
        for job in jobs:
            key = (job[0], job[1], self.cfg.prompts[job[2]], job[3])
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
        return [self.rows[(a, lam, self.cfg.prompts[p], s)] for a, lam, p, s in jobs]

    # -- models, loaded on first use ---------------------------------------------------------
    def _load(self) -> None:
        if self._pipe is not None:
            return
        from deradiff.evaluation.sample import pipeline_call_kwargs
        from deradiff.models import load_lora, load_pipeline, set_scheduler
        from deradiff.rewards import get_reward

        cfg = self.cfg
        self._rewards = {}
        for spec in cfg.rewards:
            name, kwargs = parse_reward_spec(spec)
            self._rewards[f"reward/{name}"] = get_reward(name, **kwargs).to(cfg.device)
        self._judge = self._judge or load_judge(cfg, cfg.device)
        pipe = load_pipeline(cfg.pipeline, dtype=getattr(torch, cfg.dtype), device=cfg.device)
        if cfg.scheduler:
            set_scheduler(pipe, cfg.scheduler)
        pipe.set_progress_bar_config(disable=True)
        load_lora(pipe, self.aligned.file, adapter_name=ALIGNED_ADAPTER)
        self._call = pipeline_call_kwargs(cfg)
        self._pipe = pipe

    @contextmanager
    def _arm(self, arm: str, lam: str):
        """Activate an arm's adapter; yields the lambda to realign with."""
        from deradiff.models import load_lora, set_lora_scale

        pipe = self._pipe
        if arm == REALIGNED:
            pipe.set_adapters([ALIGNED_ADAPTER])
            yield parse_lambda(lam)
        elif arm == LORA_SCALE:
            pipe.set_adapters([ALIGNED_ADAPTER])
            denoiser = getattr(pipe, denoiser_attribute(pipe))
            set_lora_scale(denoiser, float(lam))
            try:
                yield parse_lambda(1.0)
            finally:
                set_lora_scale(denoiser, 1.0)
        else:
            name = f"baseline{list(self.baselines).index(arm)}"
            load_lora(pipe, self.baselines[arm].file, adapter_name=name)
            pipe.set_adapters([name])
            try:
                yield parse_lambda(1.0)
            finally:
                pipe.set_adapters([ALIGNED_ADAPTER])
                pipe.delete_adapters(name)

    def _sample(self, todo: list[tuple[str, str, int, int]]) -> None:
        self._load()
        cfg = self.cfg
        self.results.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.results)
        bar = tqdm(total=len(todo), desc="evaluate", unit="img", dynamic_ncols=True)
        groups: dict[tuple[str, str], list] = {}
        for job in todo:
            groups.setdefault(job[:2], []).append(job)
        with open(self.results, "a") as table:
            for (arm, lam), jobs in groups.items():
                with self._arm(arm, lam) as schedule:
                    for start in range(0, len(jobs), cfg.batch_size):
                        chunk = jobs[start:start + cfg.batch_size]
                        t0 = time.perf_counter()
                        prompts = [cfg.prompts[j[2]] for j in chunk]
                        images, kls = sample_batch(self._pipe, prompts, [j[3] for j in chunk], schedule,
                                                   self._call, cfg.eta, mode=cfg.mode)
                        scores = self._score(images, prompts)
                        dt = (time.perf_counter() - t0) / len(chunk)
                        for i, (arm_, lam_, pid, seed) in enumerate(chunk):
                            rel = Path("images") / arm_.replace(":", "-") / f"lam={lam_}" / f"p{pid:04d}_s{seed}.png"
                            _save_png(images[i], self.out / rel)
                            row = {"arm": arm_, "lam": lam_, "lam_value": lam_value(lam_), "prompt_id": pid,
                                   "prompt": cfg.prompts[pid], "seed": seed, "image": str(rel), "path_kl": kls[i],
                                   **{k: float(v[i]) for k, v in scores.items()}, "time_s": round(dt, 4)}
                            if arm_ in self.baselines:
                                row["beta"] = self.baselines[arm_].beta
                            table.write(json.dumps(row) + "\n")
                            table.flush()
                            key = row_key(row)
                            self.rows[key] = row
                            self._verified.add(key)
                        self.sampled += len(chunk)
                        bar.set_postfix(arm=arm, lam=lam)
                        bar.update(len(chunk))
        bar.close()

    @torch.no_grad()
    def _score(self, images, prompts: list[str]) -> dict[str, torch.Tensor]:
        x = pil_to_tensor(images).to(self.cfg.device)
        scores = {name: r.score(x, prompts).float().cpu() for name, r in self._rewards.items()}
        if self._judge is not None:
            correct = self._judge.adherence(x, prompts)
            scores.update({col: correct[k].float().cpu() for k, col in ADHERENCE_COLUMNS.items()})
        return scores

    def judge(self):
        """The toy fidelity judge (None when the prompts are not toy captions)."""
        if self._judge is None:
            self._judge = load_judge(self.cfg)
        return self._judge


def load_judge(cfg: EvalConfig, device: str = "cpu"):
    """The toy FidelityJudge of a config (its classifier), or None when fidelity is off."""
    if not cfg.uses_fidelity:
        return None
    from deradiff.toy.classifier import load_classifier
    from deradiff.toy.metrics import FidelityJudge

    return FidelityJudge(load_classifier(cfg.classifier).to(device))


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# -- CLI ------------------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by evaluate, search and validate (what to sample and how)."""
    from deradiff.models import SCHEDULERS
    from deradiff.prompts import describe_sets

    p.add_argument("--out", required=True, help="evaluation folder (results.jsonl, images/, config.json); "
                   "re-running into it resumes, and options not given are read from its config.json")
    unset = argparse.SUPPRESS  # absent from args unless given: the saved config or the default applies
    p.add_argument("--lora", default=unset,
                   help="aligned LoRA: training run folder, LoRA folder or .safetensors file")
    p.add_argument("--pipeline", default=unset, help="'toy', a local diffusers folder or a hub id (default: toy)")
    p.add_argument("--prompts", default=unset, help=f"prompt set: {describe_sets()} (default: toy:test)")
    p.add_argument("--max-prompts", default=unset, type=int, help="use only the first N prompts of the set")
    p.add_argument("--seeds", default=unset, nargs="+", type=int,
                   help="one image per prompt and seed (default: 0 1 2 3)")
    p.add_argument("--steps", default=unset, type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", default=unset, type=float,
                   help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--scheduler", default=unset, choices=sorted(SCHEDULERS),
                   help="replace the pipeline's scheduler (ddpm, or ddim with --eta > 0, give a path KL)")
    p.add_argument("--eta", default=unset, type=float,
                   help="DDIM eta; > 0 makes DDIM stochastic so the path KL is defined (default: 0)")
    p.add_argument("--size", default=unset, type=int, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--mode", default=unset, choices=MODES,
                   help="realignment: two forwards or one mixed batch (default: two_forward)")
    p.add_argument("--dtype", default=unset, choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default: float32)")
    p.add_argument("--reward", default=unset, nargs="+", metavar="NAME[:K=V,...]",
                   help="rewards to score with, options after a colon, e.g. toy, pickscore, "
                   "hpsv2:version=v2.1,checkpoint=/m/hps.pt (default: toy)")
    p.add_argument("--fidelity", default=unset, choices=["auto", "toy", "none"],
                   help="toy prior-fidelity metrics (classifier accuracy per image; KID and diversity per "
                   "prompt); auto (default) = on when every prompt is a toy caption")
    p.add_argument("--classifier", default=unset,
                   help="toy classifier folder for the fidelity metrics (default: the shipped one)")
    p.add_argument("--beta0", default=unset, type=float,
                   help="beta the aligned LoRA was trained at (default: from its lora_info.json / recipe.yaml)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample and score")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is fastest for the toy model when other jobs share the CPU)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates over prompts for intervals")
    p.add_argument("--alpha", type=float, default=0.05, help="intervals at level 1 - alpha")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An EvalConfig from the command line, falling back to OUT/config.json for unset options
    (so `deradiff search --out DIR` reuses the evaluation's settings) and then to defaults."""
    from deradiff.prompts import load_prompts

    saved = load_saved_config(Path(args.out))
    base = asdict(saved) if saved is not None else {}
    # Options left unset are absent from args (argparse.SUPPRESS): the saved config or the default applies.
    given = {k: getattr(args, k) for k in ("lora", "pipeline", "seeds", "steps", "guidance", "scheduler", "eta",
                                           "size", "mode", "dtype", "fidelity", "classifier", "beta0") if hasattr(args, k)}
    if hasattr(args, "reward"):
        given["rewards"] = list(args.reward)
    if hasattr(args, "prompts") or saved is None:
        given["prompts"] = load_prompts(getattr(args, "prompts", "toy:test"), getattr(args, "max_prompts", None))
    merged = {**base, **given, "device": args.device, "batch_size": args.batch_size}
    if not merged.get("lora"):
        raise UserError("which LoRA? pass --lora (a training run folder, LoRA folder or .safetensors file)")
    cfg = EvalConfig(**merged)
    _check_config(cfg)
    return cfg


def _check_config(cfg: EvalConfig) -> None:
    from deradiff.rewards import available_rewards


    resolve_lora(cfg.lora)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds must be distinct and non-empty, got {cfg.seeds}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    for spec in cfg.rewards:
        name, _ = parse_reward_spec(spec)
        if name not in available_rewards():
            from deradiff.rewards import get_reward

            get_reward(name)  # raises the registry's listing
    if cfg.pipeline == "toy":
        from deradiff.toy.pipeline import check_prompt

        for prompt in cfg.prompts:
            check_prompt(prompt)
    if cfg.fidelity == "toy" and not cfg.uses_fidelity:
        raise UserError("--fidelity toy needs toy captions as prompts")


def log_command(out: Path, args: argparse.Namespace) -> None:
    """Append the command, with every option it ran with, to out/commands.txt."""
    words = ["deradiff", *getattr(args, "_name", "?").split()]
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "subcommand") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(" ".join(shlex.quote(w) for w in words) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    p.add_argument("--lam", nargs="+", default=["0", "0.5", "1", "2"],
                   help="lambda grid: values (0 = reference, 1 = aligned, > 1 extrapolates) or schedules "
                   "linear:0,2 / cosine:0,2 / step:1,2@500")
    p.add_argument("--baseline", choices=[LORA_SCALE], default=None,
                   help="also sample the weight-space baseline: the aligned LoRA scaled by lambda (constant lambdas)")
    p.add_argument("--baselines", nargs="+", default=[], metavar="RUN",
                   help="retrained baseline LoRAs (run folders with lora/ and lora_info.json or recipe.yaml); "
                   "each is sampled once, at its lambda = beta0 / beta")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="sample only prompt range I of N (parallel jobs write OUT/shards/I-of-N.jsonl)")
    p.add_argument("--merge", action="store_true", help="merge OUT/shards/*.jsonl into OUT/results.jsonl and exit")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.merge:
        rows = merge_shards(out)
        print(f"merged {len(rows)} rows -> {out / RESULTS}")
        return 0
    grid = parse_grid(args.lam)
    shard = parse_shard(args.shard)
    cfg = config_from_args(args)
    baselines = [lora_run(b) for b in args.baselines]
    ev = Evaluator(cfg, out, shard, baselines)
    log_command(out, args)  # after every input check: only commands that ran are recorded
    ids = shard_prompt_ids(len(cfg.prompts), shard)
    start = time.perf_counter()
    rows = ev.ensure(REALIGNED, grid, ids)
    if args.baseline == LORA_SCALE:
        rows += ev.ensure(LORA_SCALE, [s for s in grid if s.kind == "constant"], ids)
    for arm, lam in ev.baseline_lams().items():
        rows += ev.ensure(arm, [lam], ids)
    if ev.resampled:
        print(f"re-sampled {ev.resampled} stored images that were missing or corrupt")
    print(f"{len(rows)} images ({ev.sampled} sampled now, {time.perf_counter() - start:.1f}s) -> {ev.results}")
    if shard != (0, 1):
        print(f"shard {shard[0]}/{shard[1]} done; after all shards: deradiff evaluate --merge --out {out}")
        return 0
    summary = summarize(per_prompt_table(rows, out, ev.judge()), args.n_boot, args.alpha)
    write_json(out / "summary.json", summary)
    print(format_summary(summary))
    return 0

