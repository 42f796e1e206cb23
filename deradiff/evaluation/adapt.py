"""`deradiff adapt`: choose lambda per prompt from a cheap pilot, then test the policy on fresh seeds.

    deradiff adapt --out runs/eval --pilot-seeds 0 1 --eval-seeds 10 11 12 13 --grid 0 0.5 1 2 4 \\
        --maximize reward/toy --budget 'fidelity/color_acc>=0.9' [--max-path-kl NATS]

1. Pilot: realigned samples at every grid lambda on the pilot seeds (through `deradiff evaluate`'s
   code path, into the same folder: resumable, rows already there are reused).
2. Per prompt: the grid lambda maximizing the objective among those whose pilot metrics (that
   prompt's mean over the pilot seeds) meet every budget; ties go to the smaller lambda; a prompt
   with no feasible lambda takes the smallest grid lambda (counted and reported).
3. The best single lambda from the same pilot data: `deradiff search`'s rule on the grid (the
   objective of the metric means over prompts, budgets on those means; bootstrap over prompts).
4. Evaluation on the eval seeds (disjoint from the pilot seeds, refused otherwise): each prompt
   at its own lambda (the adaptive policy) and every prompt at the single lambda; per metric the
   mean of each, the paired difference adaptive - single with a bootstrap interval over prompts,
   and whether each policy meets the budgets on the eval seeds (metric means over prompts).

Both policies' images are ordinary realigned rows of OUT/results.jsonl: the adaptive policy's
image of prompt p and seed s is the realigned row (lambda_p, p, s), so a prompt whose choice is
the single lambda shares its images with the single policy (common random numbers: its paired
difference is exactly 0) and `deradiff report` reads the folder as any other. The folder's seeds
(config.json) are the pilot seeds then the eval seeds. Writes OUT/adapt.json: the choices per
prompt, the single lambda, the seeds, the comparison and the cost in images and seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deradiff.errors import UserError
from deradiff.evaluation.config import config_from_args, expected_metrics
from deradiff.evaluation.evaluate import Evaluator
from deradiff.evaluation.lams import LAM_POLICY, Lam, lambda_arg, parse_grid
from deradiff.evaluation.options import add_eval_arguments, log_command, positive_float
from deradiff.evaluation.results import (
    REALIGNED,
    SET_METRICS,
    format_estimate,
    per_prompt_table,
    row_key,
    write_json,
)
from deradiff.evaluation.search import Evaluated, Objective, bootstrap_choice, meets_budgets, parse_objective
from deradiff.evaluation.validate import paired

ADAPT = "adapt.json"
ADAPTIVE = "adaptive"  # the policy's key in the comparison (its images are realigned rows)


@dataclass(frozen=True)
class Choice:
    """One prompt's lambda: the grid lambda picked from its pilot metrics, whether any grid lambda
    met its budgets (False: the smallest grid lambda, as a fallback), and its pilot objective."""

    lam: float
    feasible: bool
    objective: float


def check_seeds(pilot: Sequence[int], eval_: Sequence[int]) -> None:
    """UserError (one line) unless both seed lists are non-empty, distinct and disjoint."""
    for flag, seeds in (("--pilot-seeds", pilot), ("--eval-seeds", eval_)):
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"{flag} must be distinct and non-empty, got {list(seeds)}")
    shared = sorted(set(pilot) & set(eval_))
    if shared:
        raise UserError(f"--pilot-seeds and --eval-seeds overlap at {shared}: the evaluation needs fresh seeds, "
                        "so give seeds the pilot did not use (e.g. --pilot-seeds 0 1 --eval-seeds 10 11 12 13)")


def prompt_objective(point: Evaluated, prompt: str, objective: Objective) -> float:
    """The objective of one prompt at one lambda from its own metrics; -inf when a budget fails."""
    return objective({m: point.per_prompt[m][prompt] for m in objective.metrics})


def choose_per_prompt(points: Sequence[Evaluated], objective: Objective) -> dict[str, Choice]:
    """prompt -> Choice: per prompt, the lambda maximizing the objective among the lambdas whose
    metrics for THAT prompt meet every budget; ties go to the smaller lambda, and a prompt with no
    feasible lambda gets the smallest one (feasible False). `points`: one per grid lambda, with
    every objective metric for every prompt."""
    ordered = sorted(points, key=lambda p: p.lam)
    choices = {}
    for prompt in _prompts(ordered, objective):
        best, best_value = ordered[0], -math.inf
        for point in ordered:  # ascending, strict >: the first maximum is the smallest lambda
            value = prompt_objective(point, prompt, objective)
            if value > best_value:
                best, best_value = point, value
        choices[prompt] = Choice(best.lam, math.isfinite(best_value), best_value)
    return choices


def choose_single(points: Sequence[Evaluated], objective: Objective, n_boot: int = 1000, alpha: float = 0.05) -> dict:
    """The best single lambda by `deradiff search`'s rule (search.bootstrap_choice: the objective
    of the metric means over prompts, budgets on those means, the smallest lambda among ties) with
    its bootstrap interval over prompts; with no feasible lambda, the smallest (feasible False)."""
    ordered = sorted(points, key=lambda p: p.lam)
    if not any(math.isfinite(objective(p.means())) for p in ordered):
        return {"lam": ordered[0].lam, "feasible": False, "lambda_interval": None, "win_rate": None}
    choice = bootstrap_choice(ordered, objective, n_boot, alpha)
    return {"lam": ordered[choice["best_index"]].lam, "feasible": True, "lambda_interval": choice["lambda_interval"],
            "win_rate": choice["win_rate"], "budget_met_rate": choice["budget_met_rate"]}


def _prompts(points: Sequence[Evaluated], objective: Objective) -> list[str]:
    """The prompts with every objective metric at every lambda; UserError when some lack one."""
    sets = [set(p.per_prompt[m]) for p in points for m in objective.metrics]
    every, some = set.intersection(*sets), set.union(*sets)
    if not every or every != some:
        missing = sorted(some - every)[:3]
        raise UserError(f"objective metrics {objective.metrics} are not measured for every prompt at every grid "
                        f"lambda (e.g. {missing}); set metrics such as fidelity/kid need >= 2 pilot seeds")
    return sorted(every)


# -- sampling: the pilot and the evaluation -------------------------------------------------------


def pilot(ev: Evaluator, grid: Sequence[Lam], seeds: Sequence[int], objective: Objective) -> tuple[list[Evaluated], list[dict]]:
    """Realigned rows of every grid lambda on the pilot seeds (sampled if missing), and per lambda
    the objective's metrics per prompt (each prompt's mean over the pilot seeds)."""
    rows = ev.ensure(REALIGNED, grid, seeds=seeds)
    judge = ev.judge() if any(m in SET_METRICS for m in objective.metrics) else None  # KID needs images
    table = per_prompt_table(rows, ev.out, judge)
    points = []
    for lam in grid:
        entry = table[(REALIGNED, lam.name)]
        missing = [m for m in objective.metrics if m not in entry]
        if missing:
            raise UserError(f"objective metrics {missing} are not measured; available: {sorted(entry)} "
                            "(rewards come from --reward; path_kl needs a stochastic sampler, e.g. --scheduler ddpm)")
        points.append(Evaluated(lam.value, {m: entry[m] for m in objective.metrics}))
    return points, rows


def evaluate_policies(ev: Evaluator, grid: Sequence[Lam], choices: dict[str, Choice], single: float,
                      seeds: Sequence[int]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[dict]]:
    """Sample the eval seeds: each prompt at its chosen lambda, every prompt at `single`.
    Returns (adaptive, single) as metric -> prompt -> value (means over the eval seeds) and the
    rows used (each once: a prompt whose choice is `single` shares its rows)."""
    by_value = {lam.value: lam for lam in grid}
    ids: dict[float, list[int]] = {}
    for pid, prompt in enumerate(ev.cfg.prompts):
        ids.setdefault(choices[prompt].lam, []).append(pid)
    rows = ev.ensure(REALIGNED, [by_value[single]], seeds=seeds)
    for lam, pids in sorted(ids.items()):
        rows += ev.ensure(REALIGNED, [by_value[lam]], pids, seeds)
    rows = list({row_key(r): r for r in rows}.values())  # per_prompt_table would count a shared row twice
    table = per_prompt_table(rows, ev.out, ev.judge())
    fixed = table[(REALIGNED, by_value[single].name)]
    adaptive: dict[str, dict[str, float]] = {}
    for prompt, choice in choices.items():
        for metric, values in table[(REALIGNED, by_value[choice.lam].name)].items():
            if prompt in values:
                adaptive.setdefault(metric, {})[prompt] = values[prompt]
    return adaptive, fixed, rows


def compare(adaptive: dict[str, dict[str, float]], single: dict[str, dict[str, float]], objective: Objective,
            n_boot: int = 1000, alpha: float = 0.05) -> dict:
    """Per metric: each policy's mean over prompts and the paired gap adaptive - single, with
    bootstrap intervals over prompts; the budgets on the metric means of each policy; the verdict
    on the maximized metric (adaptive beats single when the gap's interval lies above 0 and it
    meets every budget)."""
    table = {(ADAPTIVE, ""): adaptive, (REALIGNED, ""): single}
    metrics = []
    for metric in sorted(set(adaptive) & set(single)):
        est = paired(table, (ADAPTIVE, ""), (REALIGNED, ""), metric, n_boot, alpha)
        if est is not None:
            metrics.append({"metric": metric, "adaptive": est["a"], "single": est["b"], "gap": est["gap"],
                            "n_prompts": est["n_prompts"]})
    means = {name: {m["metric"]: m[name][0] for m in metrics} for name in (ADAPTIVE, "single")}
    budgets = [{"metric": m, "op": op, "bound": bound, "adaptive": means[ADAPTIVE].get(m), "single": means["single"].get(m),
                "adaptive_met": _met(means[ADAPTIVE], (m, op, bound)), "single_met": _met(means["single"], (m, op, bound))}
               for m, op, bound in objective.budgets]
    record = {"metrics": metrics, "budgets": budgets,
              "adaptive_meets_budgets": all(b["adaptive_met"] for b in budgets),
              "single_meets_budgets": all(b["single_met"] for b in budgets),
              "prompts_meeting_budgets": share_meeting(adaptive, objective.budgets)}
    record["verdict"] = verdict(record, objective.metric)
    return record


def _met(means: dict[str, float], budget: tuple[str, str, float]) -> bool:
    return budget[0] in means and meets_budgets(means, [budget])


def share_meeting(values: dict[str, dict[str, float]], budgets: Sequence[tuple[str, str, float]]) -> float | None:
    """The fraction of prompts whose own values (metric -> prompt -> value) meet every budget;
    None without budgets or values."""
    if not budgets or any(m not in values for m, _, _ in budgets):
        return None
    prompts = sorted(set.intersection(*(set(values[m]) for m, _, _ in budgets)))
    met = [meets_budgets({m: values[m][p] for m, _, _ in budgets}, budgets) for p in prompts]
    return float(np.mean(met)) if met else None


def verdict(record: dict, metric: str) -> str:
    """One sentence: does the adaptive policy beat the single lambda on `metric` within the budgets?"""
    row = next((m for m in record["metrics"] if m["metric"] == metric), None)
    if row is None:
        return f"{metric} was not measured on the eval seeds"
    gap, lo, hi = row["gap"]
    within = "" if record["adaptive_meets_budgets"] else " but misses a budget on the eval seeds"
    if lo > 0:
        head = "adaptive beats the single lambda" if not within else "adaptive scores higher"
    elif hi < 0:
        head = "adaptive is worse than the single lambda"
    else:
        head = "no clear difference (the interval contains 0)"
    return f"{head} on {metric}: adaptive - single = {format_estimate(gap, lo, hi)}{within}"


# -- the command ----------------------------------------------------------------------------------


def adapt(ev: Evaluator, grid: Sequence[Lam], objective: Objective, pilot_seeds: Sequence[int],
          eval_seeds: Sequence[int], n_boot: int = 1000, alpha: float = 0.05) -> dict:
    """Pilot, per-prompt and single choices, evaluation on fresh seeds; returns the adapt record."""
    check_seeds(pilot_seeds, eval_seeds)
    points, pilot_rows = pilot(ev, grid, pilot_seeds, objective)
    choices = choose_per_prompt(points, objective)
    single = choose_single(points, objective, n_boot, alpha)
    adaptive, fixed, eval_rows = evaluate_policies(ev, grid, choices, single["lam"], eval_seeds)
    names = {lam.value: lam.name for lam in grid}
    return {
        "objective": objective.describe(), "maximize": objective.metric, "budgets": [list(b) for b in objective.budgets],
        "grid": [lam.value for lam in grid], "pilot_seeds": list(pilot_seeds), "eval_seeds": list(eval_seeds),
        "n_prompts": len(choices),
        "choices": [{"prompt_id": pid, "prompt": prompt, "lam": choices[prompt].lam, "feasible": choices[prompt].feasible,
                     "pilot_objective": choices[prompt].objective if choices[prompt].feasible else None}
                    for pid, prompt in enumerate(ev.cfg.prompts)],
        "lambda_counts": {names[v]: n for v, n in sorted(Counter(c.lam for c in choices.values()).items())},
        "infeasible_prompts": sum(not c.feasible for c in choices.values()),
        "single": single,
        "pilot": [{"lam": p.lam, "objective": objective(p.means()), **p.means()} for p in sorted(points, key=lambda p: p.lam)],
        "comparison": compare(adaptive, fixed, objective, n_boot, alpha),
        "cost": {"pilot_images": len(pilot_rows), "eval_images": len(eval_rows),
                 "pilot_sample_s": _seconds(pilot_rows), "eval_sample_s": _seconds(eval_rows)},
    }


def _seconds(rows: Sequence[dict]) -> float:
    return round(sum(r.get("time_s", 0.0) for r in rows), 2)


def format_adapt(record: dict) -> str:
    """The record as readable lines: choices, the single lambda, the comparison table, the verdict."""
    counts = ", ".join(f"lambda {k}: {n}" for k, n in record["lambda_counts"].items())
    single = record["single"]
    lines = [f"{record['objective']}; pilot seeds {record['pilot_seeds']}, eval seeds {record['eval_seeds']}, "
             f"{record['n_prompts']} prompts",
             f"per-prompt choices (prompts per lambda): {counts}"
             + (f"; {_prompts_text(record['infeasible_prompts'])} with no feasible lambda took the smallest"
                if record["infeasible_prompts"] else ""),
             f"best single lambda: {single['lam']:g}" + (
                 f" (bootstrap interval [{single['lambda_interval'][0]:g}, {single['lambda_interval'][1]:g}])"
                 if single["feasible"] else " (no grid lambda meets the budgets on the pilot: the smallest)"),
             "", f"{'metric':24s} {'adaptive':>28s} {'single':>28s} {'adaptive - single':>28s}"]
    comparison = record["comparison"]
    for m in comparison["metrics"]:
        cells = [format_estimate(*m[k]) for k in (ADAPTIVE, "single", "gap")]
        lines.append(f"{m['metric']:24s} " + " ".join(f"{c:>28s}" for c in cells))
    for b in comparison["budgets"]:
        lines.append(f"budget {b['metric']} {b['op']} {b['bound']:g} on the eval seeds: adaptive "
                     f"{format_estimate(b['adaptive'])} ({'met' if b['adaptive_met'] else 'MISSED'}), single "
                     f"{format_estimate(b['single'])} ({'met' if b['single_met'] else 'MISSED'})")
    if comparison["prompts_meeting_budgets"] is not None:
        lines.append(f"prompts meeting their budgets under the adaptive policy: {comparison['prompts_meeting_budgets']:.0%}")
    cost = record["cost"]
    lines += [comparison["verdict"],
              f"cost: pilot {cost['pilot_images']} images ({cost['pilot_sample_s']:.1f}s of sampling), eval "
              f"{cost['eval_images']} images ({cost['eval_sample_s']:.1f}s); {cost.get('sampled_now', 0)} sampled now, "
              f"{cost.get('wall_s', 0.0):.1f}s wall"]
    return "\n".join(lines)


def _prompts_text(n: int) -> str:
    return f"{n} prompt" + ("" if n == 1 else "s")


def adapt_markdown(record: dict) -> list[str]:
    """The "Adaptive lambda" section of report.md: the choices, the comparison table, the verdict."""
    from deradiff.evaluation.results import markdown_table

    single, comparison = record["single"], record["comparison"]
    counts = ", ".join(f"{k}: {n}" for k, n in record["lambda_counts"].items())
    infeasible = record["infeasible_prompts"]
    parts = ["## Adaptive lambda", "",
             f"Per prompt, the grid lambda that would {record['objective']} for that prompt on the pilot seeds "
             f"{record['pilot_seeds']}; compared on the fresh seeds {record['eval_seeds']} with the best single lambda "
             f"**{single['lam']:g}** chosen from the same pilot" + ("" if single["feasible"] else " (none met the budgets: "
             "the smallest)") + f". Prompts per lambda: {counts}" + (f"; {_prompts_text(infeasible)} had no feasible "
             "lambda and took the smallest" if infeasible else "") + ". Both policies' images are realigned rows of the "
             "tables below.", "",
             markdown_table(["metric", "adaptive", "single", "adaptive - single (paired)"],
                            [[m["metric"], *[format_estimate(*m[k]) for k in (ADAPTIVE, "single", "gap")]]
                             for m in comparison["metrics"]]), ""]
    budgets = [f"{b['metric']} {b['op']} {b['bound']:g}: adaptive {'met' if b['adaptive_met'] else '**missed**'}, "
               f"single {'met' if b['single_met'] else '**missed**'}" for b in comparison["budgets"]]
    if budgets:
        parts += ["Budgets on the eval seeds (means over prompts): " + "; ".join(budgets) + ".", ""]
    return parts + [f"Verdict: {comparison['verdict']}.", ""]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p, seeds=False)
    p.add_argument("--pilot-seeds", nargs="+", type=int, required=True,
                   help="seeds of the pilot that picks each prompt's lambda (few, e.g. 0 1)")
    p.add_argument("--eval-seeds", nargs="+", type=int, required=True,
                   help="fresh seeds, disjoint from the pilot's, on which both policies are compared")
    p.add_argument("--grid", nargs="+", type=lambda_arg, default=[lambda_arg(v) for v in ("0", "0.5", "1", "2", "4")],
                   help=f"constant lambdas the choices are made from; {LAM_POLICY}")
    p.add_argument("--maximize", required=True, metavar="METRIC", help="metric to maximize, e.g. reward/toy")
    p.add_argument("--budget", nargs="*", default=[], metavar="METRIC<=B",
                   help="constraints, e.g. 'fidelity/color_acc>=0.9': per prompt for the adaptive choice, on the "
                   "means over prompts for the single lambda")
    p.add_argument("--max-path-kl", type=positive_float, default=None, metavar="NATS",
                   help="path-KL budget, same as --budget 'path_kl<=NATS' (needs a stochastic sampler)")


def run(args: argparse.Namespace) -> int:
    if hasattr(args, "seeds"):
        raise UserError("adapt takes --pilot-seeds and --eval-seeds instead of --seeds")
    check_seeds(args.pilot_seeds, args.eval_seeds)  # before any work
    grid = parse_grid(args.grid, "--grid")
    if any(lam.value is None for lam in grid):
        raise UserError("--grid takes constant lambdas only (each prompt gets one number)")
    objective = parse_objective(args.maximize, args.budget, [], args.max_path_kl)
    cfg = config_from_args(argparse.Namespace(**vars(args), seeds=[*args.pilot_seeds, *args.eval_seeds]))
    unknown = [m for m in objective.metrics if m not in expected_metrics(cfg)]
    if unknown:
        raise UserError(f"objective metrics {unknown} are not measured by this evaluation; available: "
                        f"{expected_metrics(cfg)} (rewards come from --reward)")
    if len(args.pilot_seeds) < 2 and any(m in SET_METRICS for m in objective.metrics):
        raise UserError(f"{[m for m in objective.metrics if m in SET_METRICS]} are set metrics over a prompt's "
                        "seeds: give >= 2 --pilot-seeds")
    out = Path(args.out)
    start = time.perf_counter()
    ev = Evaluator(cfg, out)
    log_command(out, args)
    record = adapt(ev, grid, objective, args.pilot_seeds, args.eval_seeds, args.n_boot, args.alpha)
    record["cost"].update(sampled_now=ev.sampled, resampled=ev.resampled, wall_s=round(time.perf_counter() - start, 2))
    write_json(out / ADAPT, record)
    print(format_adapt(record))
    print(f"-> {out / ADAPT}")
    return 0
