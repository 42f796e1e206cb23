"""What an evaluation folder holds samples of (`EvalConfig`), and the resume check on it.

    cfg = config_from_args(args)      # the command line, else OUT/config.json, else defaults
    check_resume_config(out, cfg)     # UserError with the difference if OUT holds other samples
    write_identity(out, cfg)          # OUT/config.json, written when the first samples are made

OUT/config.json counts only once the folder holds results: a run that failed before its first
image (a bad pipeline, a LoRA that does not fit, a reward that is not at hand) neither locks the
folder nor lends its arguments as defaults to the next run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from deradiff.errors import UserError
from deradiff.evaluation.baselines import resolve_lora, trained_base
from deradiff.evaluation.results import RESULTS
from deradiff.io import sha256_file, write_json_atomic

CONFIG = "config.json"
DEFAULT_PIPELINE, DEFAULT_PROMPTS, DEFAULT_REWARDS = "toy", "toy:test", ("toy",)


@dataclass
class EvalConfig:
    """What an evaluation folder holds samples of; `identity()` must match on resume."""

    lora: str
    pipeline: str = DEFAULT_PIPELINE
    # Named LoRAs {adapter name: path} for lambda vectors (--lora NAME=PATH ...); then `lora` is
    # the first one's path (its beta and base stand for the run). None: the single `lora`.
    loras: dict[str, str] | None = None
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    eta: float = 0.0
    noise_level: float | None = None  # flow_sde's (None: its default)
    size: int | None = None
    mode: str = "auto"  # auto | two_forward | mixed_batch (deradiff.evaluation.sampling.choose_mode)
    dtype: str = "float32"
    rewards: list[str] = field(default_factory=lambda: list(DEFAULT_REWARDS))
    fidelity: str = "auto"  # auto | none | a registered judge name
    classifier: str | None = None  # the judge's weights (None: its shipped ones)
    beta0: float | None = None
    device: str = "cpu"
    batch_size: int = 8

    @property
    def judge(self) -> str | None:
        """The fidelity judge's registered name, or None when fidelity is off."""
        from deradiff.plugins import judge_for

        if self.fidelity == "none":
            return None
        return judge_for(self.prompts) if self.fidelity == "auto" else self.fidelity

    def identity(self) -> dict:
        """The fields that define the samples (not where or how fast they are made), with the
        LoRA, the judge's weights and the registered model identified by content."""
        from deradiff.plugins import judge_entry, model_entry

        out = {k: v for k, v in asdict(self).items()
               if k not in ("device", "batch_size", "lora", "loras", "classifier", "beta0")}
        if self.noise_level is None:  # absent, as in folders sampled before the option existed
            del out["noise_level"]
        if self.loras:
            out["lora_sha256"] = {name: sha256_file(resolve_lora(path)) for name, path in sorted(self.loras.items())}
        else:
            out["lora_sha256"] = sha256_file(resolve_lora(self.lora))
        judge = self.judge
        out["fidelity"] = judge  # "auto" and a name that resolve alike make the same samples
        if judge is not None:
            out.update(judge_entry(judge).identity(self.classifier))
        model = model_entry(self.pipeline)
        if model is not None and model.identity is not None:  # e.g. re-pretrained weights make other samples
            out.update(model.identity())
        return out

    def judge_entry(self):
        """The fidelity judge's registry entry (its metric names), or None when fidelity is off."""
        from deradiff.plugins import judge_entry

        judge = self.judge
        return None if judge is None else judge_entry(judge)

    def load_judge(self, device: str = "cpu"):
        """The fidelity judge (with `adherence` and `metrics`), or None when fidelity is off."""
        entry = self.judge_entry()
        return None if entry is None else entry.load(self.classifier, device)


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


def expected_metrics(cfg: EvalConfig) -> list[str]:
    """The metric names an evaluation with `cfg` can produce (path_kl only with a stochastic sampler)."""
    names = [f"reward/{parse_reward_spec(spec)[0]}" for spec in cfg.rewards] + ["path_kl"]
    judge = cfg.judge_entry()
    if judge is not None:
        names += list(judge.image_metrics.values()) + (list(judge.set_metrics) if len(cfg.seeds) >= 2 else [])
    return names


# -- the folder's identity ------------------------------------------------------------------------


def has_results(out: Path) -> bool:
    """Whether the folder holds sampled rows (results.jsonl or a shard's file, non-empty)."""
    out = Path(out)
    files = [out / RESULTS, *(out / "shards").glob("*-of-*.jsonl")]
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def _saved(out: Path) -> dict | None:
    """OUT/config.json, or None when there is none or the folder holds no results (then it is a
    failed run's, which neither binds nor informs the next)."""
    path = Path(out) / CONFIG
    if not path.exists() or not has_results(out):
        return None
    return json.loads(path.read_text())


def check_resume_config(out: Path, cfg: EvalConfig, identity: dict | None = None) -> None:
    """Refuse, with the difference, when the folder holds results of a different configuration."""
    saved = _saved(out)
    if saved is None:
        return
    now = identity if identity is not None else cfg.identity()
    before = saved["identity"]
    if isinstance(before.get("fidelity"), bool):  # folders from before judges had names: True was the only judge
        before = {**before, "fidelity": now.get("fidelity") if before["fidelity"] else None}
    diff = [f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if diff:
        raise UserError(f"{out} holds results of a different configuration (saved -> now): " + "; ".join(diff)
                        + f". Use another --out, or delete {Path(out) / CONFIG} and {Path(out) / RESULTS} to start over")


def write_identity(out: Path, cfg: EvalConfig, identity: dict | None = None) -> None:
    """Write OUT/config.json: the identity checked on resume and the options reused as defaults."""
    now = identity if identity is not None else cfg.identity()
    write_json_atomic(Path(out) / CONFIG, {"identity": now, "config": asdict(cfg)})


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items: {value[0]!r}, ..., {value[-1]!r}]"
    return repr(value)


def load_saved_config(out: Path) -> EvalConfig | None:
    """The configuration the folder's results were sampled with (None: no results yet)."""
    saved = _saved(out)
    if saved is None:
        return None
    config = saved["config"]
    return EvalConfig(**{f.name: config[f.name] for f in fields(EvalConfig) if f.name in config})


# -- from the command line ------------------------------------------------------------------------

_GIVEN = ("lora", "pipeline", "seeds", "steps", "guidance", "scheduler", "eta", "noise_level", "size", "mode", "dtype",
          "fidelity", "classifier", "beta0")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An EvalConfig from the command line, falling back to OUT/config.json for unset options
    (so `deradiff search --out DIR` reuses the evaluation's settings) and then to defaults."""
    from deradiff.prompts import load_prompts

    saved = load_saved_config(Path(args.out))
    base = asdict(saved) if saved is not None else {}
    # Options left unset are absent from args (argparse.SUPPRESS): the saved config or the default applies.
    given = {k: getattr(args, k) for k in _GIVEN if hasattr(args, k)}
    if "lora" in given:
        from deradiff.evaluation.options import parse_loras

        loras = parse_loras(given["lora"])
        named = isinstance(loras, dict)
        given["lora"], given["loras"] = (next(iter(loras.values())), loras) if named else (loras, None)
    if hasattr(args, "reward"):
        given["rewards"] = list(args.reward)
    if hasattr(args, "prompts") or saved is None:
        given["prompts"] = load_prompts(getattr(args, "prompts", DEFAULT_PROMPTS), getattr(args, "max_prompts", None))
    merged = {**base, **given, "device": args.device, "batch_size": args.batch_size}
    if not merged.get("lora"):
        raise UserError("which LoRA? pass --lora (a training run folder, LoRA folder or .safetensors file)")
    if "pipeline" not in merged:
        merged["pipeline"] = trained_base(merged["lora"], DEFAULT_PIPELINE)
    cfg = EvalConfig(**merged)
    check_config(cfg)
    return cfg


def check_config(cfg: EvalConfig) -> None:
    """Every check that needs no model: LoRA file, seeds, batch size, rewards, prompts, judge."""
    from deradiff.evaluation.sampling import check_noise_level, check_prompts
    from deradiff.plugins import judge_entry
    from deradiff.rewards import available_rewards, get_reward

    for path in cfg.loras.values() if cfg.loras else [cfg.lora]:
        resolve_lora(path)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds must be distinct and non-empty, got {cfg.seeds}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.beta0 is not None and not cfg.beta0 > 0:
        raise UserError(f"--beta0 must be > 0, got {cfg.beta0}")
    for spec in cfg.rewards:
        name, _ = parse_reward_spec(spec)
        if name not in available_rewards():
            get_reward(name)  # raises the registry's listing
    check_prompts(cfg.pipeline, cfg.prompts)
    check_noise_level(cfg.scheduler, cfg.noise_level)
    if cfg.fidelity not in ("auto", "none") and not judge_entry(cfg.fidelity).accepts(cfg.prompts):
        raise UserError(f"--fidelity {cfg.fidelity}: the judge cannot score these prompts "
                        f"({judge_entry(cfg.fidelity).help}); use --fidelity auto or none")
