"""Lambda values as the evaluation handles them: parsed and checked once where they enter.

    lam = parse_lam("linear:0,2")       # Lam: its schedule, its name "linear:0,2", value None
    parse_lam("0.50").name              # "0.5": the results table's `lam` column
    p.add_argument("--lam", nargs="+", type=lambda_arg)   # argparse hands over Lam values

Policy (LAM_POLICY, stated in every --help that takes lambdas): lambda >= 0. Realigning at
lambda emulates training at KL strength beta = beta0 / lambda (docs/method.md section 2):
0 is the reference model, 1 the aligned one, > 1 extrapolates. A negative or non-finite
lambda (or a schedule with a negative start or end) is refused with a one-line error.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from deradiff.errors import UserError
from deradiff.realign import (
    LambdaSchedule,
    LambdaVector,
    emulated_beta,
    is_lambda_vector,
    parse_lambda,
    parse_lambda_vector,
)

LAM_POLICY = ("lambda >= 0: sampling at lambda emulates training at beta = beta0 / lambda "
              "(0 = reference, 1 = aligned, > 1 extrapolates); negative lambdas are refused")


@dataclass(frozen=True)
class Lam:
    """A checked lambda: a constant or a schedule over t, or a lambda vector (one lambda per
    named LoRA adapter, `vector`; then `schedule` is None); `name` is its key in the results
    table (a vector's canonical string, e.g. "color=1.5,contrast=0.5")."""

    schedule: LambdaSchedule | None
    vector: LambdaVector | None = None

    @property
    def name(self) -> str:
        return str(self.vector) if self.vector is not None else str(self.schedule)

    @property
    def value(self) -> float | None:
        """The constant lambda, or None for a schedule or a vector."""
        if self.vector is not None:
            return None
        return self.schedule.start if self.schedule.kind == "constant" else None

    @property
    def is_vector(self) -> bool:
        return self.vector is not None

    @property
    def adapters(self) -> int:
        """Adapters one realigned call mixes: K for a vector, 1 for a scalar lambda."""
        return len(self.vector.names) if self.vector is not None else 1

    @property
    def realign_lam(self) -> LambdaSchedule | LambdaVector:
        """What deradiff.realign.realigned takes as `lam`."""
        return self.vector if self.vector is not None else self.schedule

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__  # how --help shows the defaults


def parse_lam(spec: str | float | Lam) -> Lam:
    """A number ("2", 0.5) or schedule ("linear:0,2", "cosine:0,2", "step:1,2@500"), or a lambda
    vector ("color=1.5,contrast=0.5"); UserError for a non-finite number, an unreadable spec or a
    negative lambda (see LAM_POLICY; in a vector, any adapter's)."""
    if isinstance(spec, Lam):
        return spec
    text = str(spec).strip()
    if is_lambda_vector(text):
        return _parse_vector(text)
    try:
        number: float | None = float(text)
    except ValueError:
        number = None
    if number is not None and not math.isfinite(number):
        raise UserError(f"lambda must be a finite number, got {text!r}")
    schedule = parse_lambda(text if number is None else number)
    if schedule.start < 0 or schedule.end < 0:
        raise UserError(f"lambda must be >= 0 (sampling at lambda emulates beta = beta0 / lambda), got {text!r}")
    return Lam(schedule)


def _parse_vector(text: str) -> Lam:
    vector = parse_lambda_vector(text)  # refuses non-finite values and bad names
    for name, schedule in vector.items:
        if schedule.start < 0 or schedule.end < 0:
            raise UserError(f"lambda of adapter {name!r} must be >= 0 (sampling at lambda emulates "
                            f"beta = beta0 / lambda), got {text!r}")
    return Lam(None, vector)


def check_adapters(lams: Sequence[Lam], adapters: Sequence[str], flag: str = "--lam") -> None:
    """UserError (one line) unless every vector in `lams` names only loaded adapters (the NAME of
    each --lora NAME=PATH), and vectors come with named adapters at all."""
    for lam in lams:
        if lam.vector is None:
            continue
        if not adapters:
            raise UserError(f"{flag} {lam.name} is a lambda vector: load named LoRAs with --lora NAME=PATH ...")
        unknown = [n for n in lam.vector.names if n not in adapters]
        if unknown:
            raise UserError(f"{flag} {lam.name} names adapter {unknown[0]!r}, not loaded; the --lora names: "
                            f"{sorted(adapters)}")


def constant(value: float) -> Lam:
    """The constant lambda `value` (checked like any other)."""
    return parse_lam(float(value))


def lambda_arg(text: str) -> Lam:
    """argparse `type=` for lambdas: the parse error becomes argparse's one-line usage error."""
    try:
        return parse_lam(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_grid(values: Sequence[str | float | Lam], flag: str = "--lam") -> list[Lam]:
    """A lambda grid; UserError for an empty grid or a value listed twice ("1" and "1.0" alike)."""
    if not values:
        raise UserError(f"the lambda grid is empty: pass {flag} with at least one value, e.g. {flag} 0 0.5 1 2")
    lams = [parse_lam(v) for v in values]
    names = [lam.name for lam in lams]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"the lambda grid has duplicates: {dups} (in {[str(v) for v in values]}); list each value once")
    return lams


def equivalent_beta(beta0: float | None, lam: float) -> float | None:
    """beta0 / lam, the KL strength sampling at `lam` emulates (deradiff.realign.emulated_beta);
    None when beta0 is unknown (or not > 0, so unusable) or lam is 0 (the reference model has no
    finite beta). Never negative: lam < 0 raises."""
    if beta0 is None or not beta0 > 0 or lam == 0:
        return None
    return emulated_beta(beta0, lam)
