"""`deradiff search`: choose lambda from realigned samples only (no retraining).

    deradiff search --lora runs/toy-dpo --prompts toy:test --seeds 0 1 2 3 --out runs/eval \\
        --grid 0 0.5 1 2 4 --maximize reward/toy --budget "fidelity/adherence>=0.8" --refine 4
    deradiff search --out runs/eval --maximize reward/toy --max-path-kl 500
    deradiff search --out runs/eval --weights reward/toy=1 path_kl=-0.001
    deradiff search --lora color=runs/mo/color contrast=runs/mo/contrast --out runs/mo-eval \
        --grid-vector color=0,1,2 contrast=0,1,2 --maximize reward/toy --budget "reward/toy_contrast>=0.1"

Objectives (on each metric's mean over prompts and seeds):
- constrained: maximize one metric subject to budgets "metric<=bound" / "metric>=bound"
  (a floor on a fidelity metric, a cap on any metric); infeasible lambdas score -inf.
- weighted: maximize sum_m w_m * metric_m (negative weights for costs such as path_kl); budgets
  apply to it too.
A path-KL budget is first-class: `--max-path-kl NATS` caps the realigned model's mean path KL to
the reference (nats per sample, the drift that beta prices) and is the same as
`--budget 'path_kl<=NATS'`; path_kl needs a stochastic sampler (--scheduler ddpm, or ddim with
--eta > 0). search.json records the budgets, so `deradiff validate` can check that the retrained
model at the chosen lambda meets them.
The grid is sampled first (through `deradiff evaluate`'s code path, into the same folder, so
everything is resumable and reused); then golden-section refinement spends `--refine` more
lambdas inside the bracket around the best grid point. All lambdas share prompts and seeds
(common random numbers), so the objective is smooth in lambda. Uncertainty: a bootstrap over
prompts re-picks lambda on each replicate; the spread of those picks is the chosen lambda's
interval. Writes OUT/search.json (chosen lambda, beta = beta0 / lambda, every evaluated
lambda, cost in images and seconds).

Lambda vectors (named LoRAs, --lora NAME=PATH ...): `--grid-vector NAME=V1,V2,... ...` samples
the product grid of the adapters' values (through the same evaluate code path, resumable) and
picks the best feasible vector by the same objective, budgets and bootstrap over prompts; ties
go to the vector with the smallest sum of lambdas. There is no golden-section refinement over
vectors (refine the grid instead). search.json then holds "kind": "vector", the chosen vector,
each adapter's bootstrap interval, and the reward weights the chosen vector emulates (LoRA_i
trained on r_i at beta_i: training on sum_i lam_i r_i / beta_i at KL weight 1).
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deradiff.errors import UserError
from deradiff.evaluation.baselines import LoraRun, emulated_weights, lora_run
from deradiff.evaluation.config import config_from_args, expected_metrics
from deradiff.evaluation.evaluate import Evaluator
from deradiff.evaluation.lams import (
    LAM_POLICY,
    Lam,
    constant,
    equivalent_beta,
    lambda_arg,
    parse_grid,
    parse_lam,
)
from deradiff.evaluation.options import add_eval_arguments, check_lora_lams, log_command, positive_float
from deradiff.evaluation.results import REALIGNED, SET_METRICS, lam_name, per_prompt_table, write_json

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...
DEFAULT_GRID = ("0", "0.5", "1", "2", "4")
DEFAULT_REFINE = 4
PATH_KL = "path_kl"
_BUDGET = re.compile(r"^\s*([\w/.-]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass
class Objective:
    """What lambda should maximize. kind "constrained": `metric` subject to `budgets`;
    kind "weighted": sum of weights[m] * m."""

    kind: str
    metric: str | None = None
    budgets: list[tuple[str, str, float]] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        names = [self.metric] if self.metric else []
        return sorted(set(names + [b[0] for b in self.budgets] + list(self.weights)))

    def __call__(self, means: dict[str, float]) -> float:
        """Objective of one lambda from its metric means; -inf when a budget is violated."""
        if not meets_budgets(means, self.budgets):
            return -math.inf
        if self.kind == "weighted":
            return float(sum(w * means[m] for m, w in self.weights.items()))
        return float(means[self.metric])

    def describe(self) -> str:
        budget = " and ".join(f"{m} {op} {b:g}" for m, op, b in self.budgets)
        goal = (" + ".join(f"{w:g}*{m}" for m, w in self.weights.items()) if self.kind == "weighted"
                else self.metric)
        return f"maximize {goal}" + (f" subject to {budget}" if budget else "")


def meets_budgets(means: dict[str, float], budgets: Sequence[Sequence]) -> bool:
    """Whether metric means satisfy every budget (metric, "<=" or ">=", bound)."""
    return all(means[m] <= bound if op == "<=" else means[m] >= bound for m, op, bound in budgets)


def parse_objective(maximize: str | None, budgets: Sequence[str], weights: Sequence[str],
                    max_path_kl: float | None = None) -> Objective:
    """The objective of --maximize / --weights with the budgets of --budget and --max-path-kl."""
    if weights and maximize:
        raise UserError("choose one objective: --weights (weighted) or --maximize (constrained)")
    parsed_budgets = []
    for text in budgets:
        match = _BUDGET.match(text)
        if not match:
            raise UserError(f"--budget wants METRIC<=BOUND or METRIC>=BOUND (e.g. 'path_kl<=50'), got {text!r}")
        parsed_budgets.append((match[1], match[2], float(match[3])))
    if max_path_kl is not None:
        if not max_path_kl > 0:
            raise UserError(f"--max-path-kl is a budget in nats and must be > 0, got {max_path_kl:g}")
        parsed_budgets.append((PATH_KL, "<=", float(max_path_kl)))
    if weights:
        parsed = {}
        for item in weights:
            name, eq, value = item.partition("=")
            try:
                parsed[name.strip()] = float(value)
            except ValueError:
                raise UserError(f"--weights wants METRIC=WEIGHT, got {item!r}") from None
            if not eq:
                raise UserError(f"--weights wants METRIC=WEIGHT, got {item!r}")
        return Objective("weighted", budgets=parsed_budgets, weights=parsed)
    if not maximize:
        raise UserError("no objective: pass --maximize METRIC [--budget 'METRIC<=BOUND' ...] or --weights M=W ...")
    return Objective("constrained", metric=maximize, budgets=parsed_budgets)


@dataclass
class Evaluated:
    """Per-prompt values of the objective's metrics at one lambda (a constant `lam`, or a lambda
    vector: `vector` {adapter: lambda}, `lam` None)."""

    lam: float | None
    per_prompt: dict[str, dict[str, float]]  # metric -> prompt -> value
    vector: dict[str, float] | None = None

    def means(self) -> dict[str, float]:
        return {m: float(np.mean(list(v.values()))) for m, v in self.per_prompt.items()}

    @property
    def name(self) -> str:
        """The results-table key: "1.5", or a vector's canonical "color=1,contrast=0.5"."""
        return lam_name(self.vector) if self.vector is not None else f"{self.lam:g}"


def golden_section(f: Callable[[float], float], a: float, b: float, n_evals: int) -> list[float]:
    """Spend n_evals evaluations of f looking for a maximum in [a, b]; returns the points tried.
    Ties go to the lower half (smaller lambda: the more conservative choice)."""
    tried: list[float] = []
    if n_evals < 1 or b <= a:
        return tried
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc = f(c)
    tried.append(c)
    if n_evals == 1:
        return tried
    fd = f(d)
    tried.append(d)
    for _ in range(n_evals - 2):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
            tried.append(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
            tried.append(d)
    return tried


def _replicates(points: Sequence[Evaluated], objective: Objective, n_boot: int, seed: int,
                grid_flag: str = "--grid") -> tuple[np.ndarray, np.ndarray, int]:
    """The objective of each point (L,) on the prompt means, and (n_boot, L) on bootstrap
    resamples of the prompts (the same resample for every point), and the number of prompts;
    UserError when no point meets the budgets."""
    prompts = sorted(set.intersection(*(set(v) for p in points for v in p.per_prompt.values())))
    if not prompts:
        raise UserError("no prompt has values for every objective metric at every lambda")
    matrix = {m: np.array([[p.per_prompt[m][q] for q in prompts] for p in points]) for m in objective.metrics}
    n = len(prompts)
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (n_boot, n)
    boot_means = {m: draws @ v.T / n for m, v in matrix.items()}  # (n_boot, L)
    values = np.array([[objective({m: boot_means[m][b, i] for m in matrix}) for i in range(len(points))]
                       for b in range(n_boot)])
    point = np.array([objective({m: v[i].mean() for m, v in matrix.items()}) for i in range(len(points))])
    if not np.isfinite(point).any():
        raise UserError(f"no evaluated lambda meets the budget: loosen --budget / --max-path-kl or add smaller lambdas "
                        f"to {grid_flag}")
    return point, values, n


def _picks(point: np.ndarray, values: np.ndarray) -> tuple[int, np.ndarray]:
    """The point estimate's pick (the first maximum: points come ordered so that ties go to the
    smaller lambda) and the index each bootstrap replicate with a feasible point picks."""
    best = int(np.argmax(point))
    feasible_rows = np.isfinite(values).any(axis=1)
    picks = np.argmax(values[feasible_rows], axis=1) if feasible_rows.any() else np.array([best])
    return best, picks


def _at_best(point: np.ndarray, values: np.ndarray, best: int, alpha: float, n: int) -> dict:
    """The chosen point's objective with its bootstrap interval and how often its budgets hold."""
    at_best = values[:, best]
    finite = at_best[np.isfinite(at_best)]
    return {"objective_value": float(point[best]),
            "objective_interval": [float(v) for v in np.quantile(finite, [alpha / 2, 1 - alpha / 2])] if finite.size else None,
            "budget_met_rate": float(np.isfinite(at_best).mean()),
            "n_prompts": n,
            "objectives": [float(v) for v in point]}


def bootstrap_choice(points: Sequence[Evaluated], objective: Objective, n_boot: int, alpha: float,
                     seed: int = 0) -> dict:
    """Re-pick lambda on bootstrap resamples of the prompts (the same resample for every lambda).

    Returns the interval of the picked lambda, how often each lambda wins, and for the point
    estimate's pick its objective interval and (constrained) how often its budgets hold."""
    point, values, n = _replicates(points, objective, n_boot, seed)
    lams = np.array([p.lam for p in points])
    best, picks = _picks(point, values)
    lo, hi = np.quantile(lams[picks], [alpha / 2, 1 - alpha / 2])
    return {"best_index": best, "lambda_interval": [float(lo), float(hi)],
            "win_rate": {f"{lam:g}": float(np.mean(lams[picks] == lam)) for lam in lams},
            **_at_best(point, values, best, alpha, n)}


def bootstrap_vector_choice(points: Sequence[Evaluated], objective: Objective, n_boot: int, alpha: float,
                            seed: int = 0) -> dict:
    """`bootstrap_choice` over lambda vectors (points with `vector`, ordered by the sum of their
    lambdas so that ties go to the smallest): each adapter's interval is that of its lambda among
    the replicates' picks; the win rate is keyed by the vector's name."""
    point, values, n = _replicates(points, objective, n_boot, seed, "--grid-vector")
    best, picks = _picks(point, values)
    adapters = list(points[0].vector)
    comps = np.array([[p.vector[a] for a in adapters] for p in points])  # (L, K)
    interval = {a: [float(q) for q in np.quantile(comps[picks, k], [alpha / 2, 1 - alpha / 2])]
                for k, a in enumerate(adapters)}
    return {"best_index": best, "lambda_interval": interval,
            "win_rate": {p.name: float(np.mean(picks == i)) for i, p in enumerate(points)},
            **_at_best(point, values, best, alpha, n)}


def _objective_values(table: dict[str, dict[str, float]], objective: Objective) -> dict[str, dict[str, float]]:
    """metric -> prompt -> value of the objective's metrics from one lambda's per-prompt table;
    UserError naming the ones not measured."""
    missing = [m for m in objective.metrics if m not in table]
    if missing:
        raise UserError(f"objective metrics {missing} are not measured; available: {sorted(table)} "
                        "(rewards come from --reward; fidelity/* need toy prompts; path_kl needs a "
                        "stochastic sampler, e.g. --scheduler ddpm or --eta 1)")
    return {m: table[m] for m in objective.metrics}


def search(ev: Evaluator, grid: Sequence[float], objective: Objective, refine: int, n_boot: int = 1000,
           alpha: float = 0.05, digits: int = 4) -> dict:
    """Sample the grid, refine by golden section, bootstrap the choice; returns the search record."""
    judge = ev.judge() if any(m in SET_METRICS for m in objective.metrics) else None  # KID needs images
    points: dict[str, Evaluated] = {}
    rows_used: dict[tuple, dict] = {}

    def evaluate(value: float) -> Evaluated:
        lam = constant(float(f"{value:.{digits}g}"))
        name = lam.name
        if name not in points:
            rows = ev.ensure(REALIGNED, [lam])
            rows_used.update({(r["lam"], r["prompt"], r["seed"]): r for r in rows})
            table = per_prompt_table(rows, ev.out, judge)[(REALIGNED, name)]
            points[name] = Evaluated(lam.value, _objective_values(table, objective))
        return points[name]

    def f(lam: float) -> float:
        return objective(evaluate(lam).means())

    for lam in grid:
        evaluate(lam)
    ordered = sorted(points.values(), key=lambda p: p.lam)
    scores = [objective(p.means()) for p in ordered]
    if not any(math.isfinite(s) for s in scores):
        raise UserError("no grid lambda meets the budget: loosen --budget / --max-path-kl or add smaller lambdas to --grid")
    i = int(np.argmax(scores))
    lo, hi = ordered[max(i - 1, 0)].lam, ordered[min(i + 1, len(ordered) - 1)].lam
    golden_section(f, lo, hi, refine)
    ordered = sorted(points.values(), key=lambda p: p.lam)
    choice = bootstrap_choice(ordered, objective, n_boot, alpha)
    chosen = ordered[choice.pop("best_index")].lam
    objectives = choice.pop("objectives")
    beta0 = ev.beta0
    return {
        "objective": objective.describe(),
        "maximize": objective.metric if objective.kind == "constrained" else None,
        "weights": objective.weights or None,
        "budgets": [list(b) for b in objective.budgets],
        "max_path_kl": min((b for m, op, b in objective.budgets if m == PATH_KL and op == "<="), default=None),
        "chosen_lambda": chosen,
        "lambda_interval": choice.pop("lambda_interval"),
        "beta0": beta0,
        "equivalent_beta": equivalent_beta(beta0, chosen),
        **choice,
        "evaluated": [{"lam": p.lam, "objective": obj, **p.means()} for p, obj in zip(ordered, objectives, strict=True)],
        "bracket": [lo, hi],
        "at_grid_edge": chosen in (min(grid), max(grid)) and chosen != 0,
        "cost": {"images": len(rows_used), "lambdas": len(ordered),
                 "sample_s": round(sum(r.get("time_s", 0.0) for r in rows_used.values()), 2)},
    }


# -- lambda vectors ------------------------------------------------------------------------------


def vector_grid(items: Sequence[str]) -> list[Lam]:
    """The product grid of --grid-vector items NAME=V1,V2,... (one per adapter), as lambda vectors
    ordered by the sum of their lambdas, then by name (so ties in the objective go to the smallest
    vector). UserError (one line) for an item without "=", an empty, non-numeric, negative or
    repeated value, or an adapter named twice."""
    axes: dict[str, list[float]] = {}
    for item in items:
        name, eq, values = (part.strip() for part in item.partition("="))
        if not eq or not name or not values:
            raise UserError(f"--grid-vector wants NAME=V1,V2,... per adapter (e.g. color=0,1,2 contrast=0,1,2), got {item!r}")
        if name in axes:
            raise UserError(f"--grid-vector names adapter {name!r} twice: give each adapter one list of values")
        try:
            numbers = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--grid-vector {item!r}: the values must be numbers (constant lambdas; no schedules)") from None
        if len(set(numbers)) != len(numbers):
            raise UserError(f"--grid-vector {item!r} lists a value twice: list each value once")
        axes[name] = numbers
    if not axes:
        raise UserError("--grid-vector is empty: give NAME=V1,V2,... per adapter, e.g. color=0,1,2 contrast=0,1,2")
    names = list(axes)
    vectors = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]
    lams = [parse_lam(",".join(f"{n}={v!r}" for n, v in vec.items())) for vec in vectors]  # checks >= 0, finite
    return sorted(lams, key=lambda lam: (sum(lam.vector.constants().values()), lam.name))


def search_vectors(ev: Evaluator, grid: Sequence[Lam], objective: Objective, n_boot: int = 1000,
                   alpha: float = 0.05, adapters: dict[str, LoraRun] | None = None) -> dict:
    """Sample every lambda vector of `grid` (realigned arm, resumable) and pick the best feasible
    one with a bootstrap over prompts; returns the search record ("kind": "vector"). `adapters`
    (name -> the named LoRA's run) add the reward weights each vector emulates, when every
    adapter records its reward and beta."""
    judge = ev.judge() if any(m in SET_METRICS for m in objective.metrics) else None  # KID needs images
    rows = ev.ensure(REALIGNED, list(grid))
    table = per_prompt_table(rows, ev.out, judge)
    points = [Evaluated(None, _objective_values(table.get((REALIGNED, lam.name), {}), objective),
                        lam.vector.constants()) for lam in grid]
    choice = bootstrap_vector_choice(points, objective, n_boot, alpha)
    best = points[choice.pop("best_index")]
    objectives = choice.pop("objectives")
    emulate = _emulation(adapters, ev.beta0)
    edges = {a: (min(p.vector[a] for p in points), max(p.vector[a] for p in points)) for a in best.vector}
    return {
        "kind": "vector",
        "objective": objective.describe(),
        "maximize": objective.metric if objective.kind == "constrained" else None,
        "weights": objective.weights or None,
        "budgets": [list(b) for b in objective.budgets],
        "max_path_kl": min((b for m, op, b in objective.budgets if m == PATH_KL and op == "<="), default=None),
        "chosen_lambda": None,  # a scalar search's field; the pick is chosen_vector
        "chosen": best.name,
        "chosen_vector": best.vector,
        "lambda_interval": choice.pop("lambda_interval"),
        "beta0": ev.beta0,
        "emulates": None if emulate is None else {"beta": ev.beta0, "weights": emulate(best.vector)},
        **choice,
        "evaluated": [{"lam": p.name, "vector": p.vector, "objective": obj, **p.means(),
                       **({"emulated_weights": emulate(p.vector)} if emulate else {})}
                      for p, obj in zip(points, objectives, strict=True)],
        "at_grid_edge": sorted(a for a, v in best.vector.items() if v in edges[a] and v != 0),
        "cost": {"images": len(rows), "lambdas": len(points),
                 "sample_s": round(sum(r.get("time_s", 0.0) for r in rows), 2)},
    }


def _emulation(adapters: dict[str, LoraRun] | None, beta: float | None):
    """vector -> {reward: weight} it emulates at KL weight `beta` (deradiff.evaluation.baselines.
    emulated_weights), or None when an adapter records no reward or beta (then nothing is claimed)."""
    if not adapters or beta is None:
        return None
    try:
        emulated_weights(adapters, {}, beta)
    except UserError:
        return None
    return lambda vector: {r: float(f"{w:.6g}") for r, w in emulated_weights(adapters, vector, beta).items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    # --grid and --refine are absent unless given: --grid-vector refuses them, and commands.txt logs only what ran
    p.add_argument("--grid", nargs="+", type=lambda_arg, default=argparse.SUPPRESS,
                   help="constant lambdas sampled first (the refinement searches around the best one; default: "
                   f"{' '.join(DEFAULT_GRID)}); {LAM_POLICY}")
    p.add_argument("--grid-vector", nargs="+", default=None, metavar="NAME=V1,V2,...",
                   help="with named LoRAs (--lora NAME=PATH ...): one list of lambdas per adapter, e.g. color=0,1,2 "
                   "contrast=0,1,2; the product grid of lambda vectors is sampled and the best feasible vector picked "
                   "(same objective, budgets and bootstrap; ties go to the smallest sum of lambdas). No golden-section "
                   "refinement over vectors: refine the grid instead")
    p.add_argument("--maximize", default=None, metavar="METRIC",
                   help="constrained objective: metric to maximize, e.g. reward/toy or reward/pickscore")
    p.add_argument("--budget", nargs="*", default=[], metavar="METRIC<=B",
                   help="constraints, e.g. 'path_kl<=50' or 'fidelity/adherence>=0.8' (metric means over prompts)")
    p.add_argument("--max-path-kl", type=positive_float, default=None, metavar="NATS",
                   help="path-KL budget: the realigned model's mean path KL to the reference (nats per sample) "
                   "must stay <= NATS; same as --budget 'path_kl<=NATS' (needs a stochastic sampler: "
                   "--scheduler ddpm, or ddim with --eta > 0)")
    p.add_argument("--weights", nargs="*", default=[], metavar="METRIC=W",
                   help="weighted objective instead: maximize sum W*METRIC, e.g. reward/toy=1 path_kl=-0.001 "
                   "(budgets still apply)")
    p.add_argument("--refine", type=int, default=argparse.SUPPRESS,
                   help=f"extra lambdas for golden-section refinement (default: {DEFAULT_REFINE}; 0 = grid only; "
                   "scalar --grid only)")


def run(args: argparse.Namespace) -> int:
    vectors = vector_grid(args.grid_vector) if args.grid_vector is not None else None
    given_grid, refine = getattr(args, "grid", None), getattr(args, "refine", None)
    if vectors is not None and (given_grid is not None or refine is not None):
        raise UserError("--grid-vector searches a product grid of lambda vectors without refinement: drop "
                        + ("--grid" if given_grid is not None else "--refine"))
    grid = parse_grid(given_grid or [lambda_arg(v) for v in DEFAULT_GRID], "--grid")
    if any(lam.value is None for lam in grid):
        raise UserError("--grid takes constant lambdas only (the search is over a number)")
    refine = DEFAULT_REFINE if refine is None else refine
    if refine < 0:
        raise UserError(f"--refine must be >= 0, got {refine}")
    objective = parse_objective(args.maximize, args.budget, args.weights, args.max_path_kl)
    cfg = config_from_args(args)
    unknown = [m for m in objective.metrics if m not in expected_metrics(cfg)]
    if unknown:
        raise UserError(f"objective metrics {unknown} are not measured by this evaluation; available: "
                        f"{expected_metrics(cfg)} (rewards come from --reward)")
    if vectors is not None:
        check_lora_lams(cfg.loras or cfg.lora, vectors, "--grid-vector")
    elif cfg.loras:
        example = " ".join(f"{name}=0,1,2" for name in cfg.loras)
        raise UserError(f"named LoRAs ({', '.join(cfg.loras)}) are mixed by lambda vectors: search them with "
                        f"--grid-vector NAME=V1,V2,... per adapter, e.g. --grid-vector {example}")
    out = Path(args.out)
    start = time.perf_counter()
    ev = Evaluator(cfg, out)
    log_command(out, args)
    if vectors is not None:
        adapters = {name: lora_run(path) for name, path in cfg.loras.items()}
        record = search_vectors(ev, vectors, objective, args.n_boot, args.alpha, adapters)
    else:
        record = search(ev, [lam.value for lam in grid], objective, refine, args.n_boot, args.alpha)
    record["cost"].update(sampled_now=ev.sampled, resampled=ev.resampled, wall_s=round(time.perf_counter() - start, 2))
    write_json(out / "search.json", record)
    if vectors is not None:
        print(format_vector_search(record, objective.metrics))
        print(f"-> {out / 'search.json'}")
        return 0
    lam, (lo, hi) = record["chosen_lambda"], record["lambda_interval"]
    beta = record["equivalent_beta"]
    print(f"{record['objective']}: chosen lambda {lam:g} (bootstrap interval [{lo:g}, {hi:g}], "
          f"{record['n_prompts']} prompts)" + (f" -> beta = beta0 / lambda = {beta:.4g}" if beta else ""))
    if record["max_path_kl"] is not None:
        kl = next(p[PATH_KL] for p in record["evaluated"] if p["lam"] == lam)
        print(f"path-KL budget {record['max_path_kl']:g} nats: path KL {kl:.4g} at the chosen lambda; the budget held "
              f"in {record['budget_met_rate']:.0%} of the bootstrap resamples of the prompts")
    if record["at_grid_edge"]:
        print(f"note: lambda {lam:g} is at the edge of the grid; the optimum may lie beyond it: extend --grid")
    for p in record["evaluated"]:
        print("  lam {:>8g}  objective {:>10.4g}  ".format(p["lam"], p["objective"])
              + "  ".join(f"{m}={p[m]:.4g}" for m in objective.metrics))
    cost = record["cost"]
    print(f"cost: {cost['images']} images over {cost['lambdas']} lambdas, {cost['sample_s']:.1f}s of sampling "
          f"({cost['sampled_now']} sampled now, {cost['wall_s']:.1f}s wall) -> {out / 'search.json'}")
    return 0


def format_vector_search(record: dict, metrics: Sequence[str]) -> str:
    """The vector search's verdict, the reward weights it emulates and every evaluated vector."""
    interval = ", ".join(f"{a} [{lo:g}, {hi:g}]" for a, (lo, hi) in record["lambda_interval"].items())
    lines = [f"{record['objective']}: chosen vector {record['chosen']} (bootstrap intervals {interval}; "
             f"{record['n_prompts']} prompts)"]
    if record.get("emulates"):
        weights = " + ".join(f"{w:.4g}*{r}" for r, w in record["emulates"]["weights"].items())
        lines.append(f"emulates training on {weights} at beta = {record['emulates']['beta']:.4g}")
    if record["at_grid_edge"]:
        lines.append(f"note: {', '.join(record['at_grid_edge'])} at the edge of its grid values; the optimum may lie "
                     "beyond: extend --grid-vector")
    for p in record["evaluated"]:
        lines.append("  {:>28s}  objective {:>10.4g}  ".format(p["lam"], p["objective"])
                     + "  ".join(f"{m}={p[m]:.4g}" for m in metrics))
    cost = record["cost"]
    lines.append(f"cost: {cost['images']} images over {cost['lambdas']} vectors, {cost['sample_s']:.1f}s of sampling "
                 f"({cost['sampled_now']} sampled now, {cost['wall_s']:.1f}s wall)")
    return "\n".join(lines)
