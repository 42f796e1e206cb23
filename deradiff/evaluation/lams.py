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
from deradiff.realign import LambdaSchedule, emulated_beta, parse_lambda

LAM_POLICY = ("lambda >= 0: sampling at lambda emulates training at beta = beta0 / lambda "
              "(0 = reference, 1 = aligned, > 1 extrapolates); negative lambdas are refused")


@dataclass(frozen=True)
class Lam:
    """A checked lambda: a constant or a schedule over t; `name` is its key in the results table."""

    schedule: LambdaSchedule

    @property
    def name(self) -> str:
        return str(self.schedule)

    @property
    def value(self) -> float | None:
        """The constant lambda, or None for a schedule."""
        return self.schedule.start if self.schedule.kind == "constant" else None

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__  # how --help shows the defaults


def parse_lam(spec: str | float | Lam) -> Lam:
    """A number ("2", 0.5) or schedule ("linear:0,2", "cosine:0,2", "step:1,2@500"); UserError for
    a non-finite number, an unreadable spec or a negative lambda (see LAM_POLICY)."""
    if isinstance(spec, Lam):
        return spec
    text = str(spec).strip()
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
