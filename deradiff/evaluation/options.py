"""Command-line options: checked argparse types, the options evaluate / search / validate share,
and the log of commands run into an evaluation folder.

A bad value stops at parse time with argparse's one-line error naming the flag, e.g.
`deradiff evaluate: error: argument --steps: must be an integer >= 1, got '0'` (exit status 2).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.evaluation.lams import LAM_POLICY, check_adapters
from deradiff.evaluation.sampling import AUTO, MODES


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (denoising steps, image size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (classifier-free guidance scale)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a KL strength beta)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


_ADAPTER_ITEM = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=(.+)")


def parse_loras(items: str | list[str] | None) -> str | dict[str, str] | None:
    """--lora values: one plain PATH (today's single adapter) -> that path; NAME=PATH items
    (several named adapters, for lambda vectors) -> {name: path} in the order given. UserError
    (one line) for several plain paths, plain and named items mixed, or a name given twice."""
    if items is None or isinstance(items, str):
        return items
    named = [_ADAPTER_ITEM.fullmatch(item) for item in items]
    if not any(named):
        if len(items) > 1:
            raise UserError(f"--lora got {len(items)} paths: give one PATH, or name each LoRA as NAME=PATH "
                            "(e.g. --lora color=runs/a/lora contrast=runs/b/lora)")
        return items[0]
    if not all(named):
        plain = items[named.index(None)]
        raise UserError(f"--lora mixes a plain path ({plain!r}) with NAME=PATH items: name every LoRA")
    loras: dict[str, str] = {}
    for match in named:
        if match.group(1) in loras:
            raise UserError(f"--lora names adapter {match.group(1)!r} twice: give each name once")
        loras[match.group(1)] = match.group(2)
    return loras


def check_lora_lams(loras: str | dict[str, str] | None, lams, flag: str = "--lam") -> None:
    """UserError (one line) unless the lambdas fit the LoRAs: vectors only over named --lora
    adapters, and scalar lambdas only with a single adapter."""
    names = list(loras) if isinstance(loras, dict) else []
    check_adapters(lams, names, flag)
    if len(names) > 1:
        scalar = next((lam for lam in lams if not lam.is_vector), None)
        if scalar is not None:
            raise UserError(f"{flag} {scalar.name} is one lambda but {len(names)} LoRAs are loaded: give a vector "
                            f"per value, e.g. {','.join(f'{n}={scalar.name}' for n in names)}")


def add_sampler_arguments(p: argparse.ArgumentParser, unset=None) -> None:
    """--steps, --guidance, --scheduler, --eta, --noise-level, --size, --mode, --dtype; `unset` is the default of
    each (argparse.SUPPRESS: absent unless given, so a saved configuration can fill it)."""
    from deradiff.models import SCHEDULERS

    def default(value):
        return value if unset is None else unset

    p.add_argument("--steps", default=unset, type=positive_int, help="denoising steps, >= 1 (default: the pipeline's)")
    p.add_argument("--guidance", default=unset, type=non_negative_float,
                   help="classifier-free guidance scale, >= 0 (default: the pipeline's)")
    p.add_argument("--scheduler", default=unset, choices=sorted(SCHEDULERS),
                   help="replace the pipeline's scheduler (ddpm, or ddim with --eta > 0, give a path KL)")
    p.add_argument("--eta", default=default(0.0), type=float,
                   help="DDIM eta; > 0 makes DDIM stochastic so the path KL is defined (default: 0)")
    p.add_argument("--noise-level", default=unset, type=non_negative_float,
                   help="--scheduler flow_sde: the SDE's noise scale a, g = a sqrt(s / (1 - s)), >= 0; 0 is the "
                   "Euler ODE, sqrt(2) ~ 1.414 memoryless (default: 0.7, Flow-GRPO's)")
    p.add_argument("--size", default=unset, type=positive_int, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--mode", default=default(AUTO), choices=MODES,
                   help="realignment: two forwards, one mixed batch, or auto: by a rule measured per device and "
                   "rows per call (deradiff.evaluation.sampling.choose_mode) (default: auto)")
    p.add_argument("--dtype", default=default("float32"), choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default: float32)")


def add_eval_arguments(p: argparse.ArgumentParser, seeds: bool = True) -> None:
    """Options shared by evaluate, search, validate and adapt (what to sample and how); `seeds=False`
    hides --seeds from --help (adapt takes --pilot-seeds and --eval-seeds, and refuses --seeds)."""
    from deradiff.plugins import judge_names
    from deradiff.prompts import describe_sets

    p.add_argument("--out", required=True, help="evaluation folder (results.jsonl, images/, config.json); "
                   "re-running into it resumes, and options not given are read from its config.json "
                   "(once it holds results)")
    unset = argparse.SUPPRESS  # absent from args unless given: the saved config or the default applies
    p.add_argument("--lora", default=unset, nargs="+", metavar="[NAME=]PATH",
                   help="aligned LoRA: training run folder, LoRA folder or .safetensors file; or several named "
                   "LoRAs (color=runs/a contrast=runs/b) mixed by lambda vectors (--lam color=1.5,contrast=0.5)")
    p.add_argument("--pipeline", default=unset,
                   help="a registered model (e.g. toy, toy-flow), a local diffusers folder or a hub id (default: the "
                   "base the LoRA was trained on, from its lora_info.json or run recipe; else toy)")
    p.add_argument("--prompts", default=unset, help=f"prompt set: {describe_sets()} (default: toy:test)")
    p.add_argument("--max-prompts", default=unset, type=positive_int, help="use only the first N prompts of the set")
    p.add_argument("--seeds", default=unset, nargs="+", type=int,
                   help="one image per prompt and seed (default: 0 1 2 3)" if seeds else argparse.SUPPRESS)
    add_sampler_arguments(p, unset)
    p.add_argument("--reward", default=unset, nargs="+", metavar="NAME[:K=V,...]",
                   help="rewards to score with, options after a colon, e.g. toy, pickscore, "
                   "hpsv2:version=v2.1,checkpoint=/m/hps.pt (default: toy)")
    p.add_argument("--fidelity", default=unset, choices=["auto", "none", *judge_names()],
                   help="prior-fidelity judge (per image, and set metrics such as KID and diversity per prompt): "
                   "auto (default) = the first registered judge that accepts every prompt, none, or a judge by name")
    p.add_argument("--classifier", default=unset,
                   help="weights folder of the fidelity judge (e.g. the toy classifier; default: the shipped one)")
    p.add_argument("--beta0", default=unset, type=positive_float,
                   help="beta (> 0) the aligned LoRA was trained at (default: from its lora_info.json / recipe.yaml); "
                   f"{LAM_POLICY}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample and score")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is fastest for the toy model when other jobs share the CPU)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates over prompts for intervals")
    p.add_argument("--alpha", type=float, default=0.05, help="intervals at level 1 - alpha")


def command_words(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The options of a parsed command as words that parse back to it (options left empty,
    unset or off are left out; `skip` names more to leave out)."""
    words = []
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "subcommand", *skip) or value is None or value is False or value == []:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return words


def log_command(out: Path, args: argparse.Namespace) -> None:
    """Append the command, with every option it ran with, to out/commands.txt (a line that runs
    as written: options left empty, unset or off are left out)."""
    words = ["deradiff", *getattr(args, "_name", "?").split(), *command_words(args)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(" ".join(shlex.quote(w) for w in words) + "\n")
