"""The `deradiff` command line: one subcommand per library entry point.

Each subcommand lives in a library module exposing `add_arguments(parser)` and
`run(args) -> int`; this file only routes. Modules are imported lazily so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deradiff.errors import UserError

# name -> (module, one-line help). Nested groups use a space: "toy pretrain".
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("deradiff.evaluation.sample", "sample images from a (realigned) pipeline and write a grid + path KL"),
    "evaluate": ("deradiff.evaluation.evaluate", "sample a lambda grid x prompts x seeds (realigned, weight-scaled, retrained) and score it; resumable, shardable"),
    "search": ("deradiff.evaluation.search", "choose lambda from realigned samples only (budgeted or weighted objective, golden-section, bootstrap)"),
    "adapt": ("deradiff.evaluation.adapt", "choose lambda per prompt from a pilot on few seeds, then compare with the best single lambda on fresh seeds (paired intervals)"),
    "validate": ("deradiff.evaluation.validate", "realigned vs baselines retrained at beta0/lambda: per-metric gaps with intervals, compute saved"),
    "compare": ("deradiff.evaluation.compare", "several validations side by side (e.g. baselines trained 1x/2x/4x as long): matching, gaps, path-KL growth"),
    "report": ("deradiff.evaluation.report", "report.md + CSV/JSON tables + plots (reward vs lambda, frontier, image grid) of an evaluation folder"),
    "cache": ("deradiff.training.cache", "encode a DPO recipe's preference pairs once (VAE latents of both flips + caption embeddings) into data.latent_cache"),
    "lab": ("deradiff.analytic", "exact realignment errors on analytic Gaussian(-mixture) diffusions and rectified flows (--family flow)"),
    "toy pretrain": ("deradiff.toy.pretrain", "rebuild the shipped toy pipeline + classifier from scratch (deterministic)"),
    "toy sample-check": ("deradiff.toy.quality", "measure the toy quality bar (classifier color/shape accuracy) of a toy pipeline"),
    "toy hack": ("deradiff.toy.hack", "plot the toy reward vs prior fidelity as a pixel leash weakens (reward hacking)"),
    "toy make-prefs": ("deradiff.toy.prefs", "synthetic Pick-a-Pic-format preference pairs from the toy pipeline, Bradley-Terry labels on the toy reward"),
    "slurm submit": ("deradiff.slurm", "check a recipe, then submit training, the beta sweep or the lambda search to SLURM"),
}


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, like a UserError: the problem (naming the flag), then where the
    options are listed; exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deradiff",
        description="Align a diffusion model once, realign it at sampling time (DeRaDiff).",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_) in COMMANDS.items():
        parts = name.split()
        subparsers = top
        if len(parts) == 2:
            if parts[0] not in groups:
                group = top.add_parser(parts[0], help=f"{parts[0]} commands")
                groups[parts[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            subparsers = groups[parts[0]]
        sub = subparsers.add_parser(
            parts[-1], help=help_, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        sub.set_defaults(_module=module)
        # Lazy: import the module only to add its arguments when this subcommand is chosen.
        sub.set_defaults(_name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse once to learn the subcommand, then let its module add its own arguments.
    first_pass = [a for a in argv if a not in ("-h", "--help")]
    if not first_pass or first_pass[0].startswith("-"):
        parser.parse_args(argv)  # top-level --help or a usage error
    known, _ = parser.parse_known_args(first_pass)
    module = importlib.import_module(known._module)
    sub = _find_subparser(parser, known._name)
    module.add_arguments(sub)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0) > 0:  # every subcommand with --threads: torch CPU threads
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"deradiff {known._name}: error: {err}", file=sys.stderr)
        return 2


def _find_subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for part in name.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[part]
    return parser


if __name__ == "__main__":
    sys.exit(main())
