"""`deradiff validate`: does the realigned model stand in for models retrained at other betas?

    deradiff validate --lora runs/toy-dpo --baselines runs/toy-sweep/lambda-0.25 \\
        runs/toy-sweep/lambda-0.5 runs/toy-sweep/lambda-2 runs/toy-sweep/lambda-4 \\
        --prompts toy:test --seeds 0 1 2 3 --out runs/eval

The aligned LoRA was trained at beta0, each baseline at beta_k; realigning at
lambda_k = beta0 / beta_k emulates baseline k (docs/method.md section 5). On the same prompts and
seeds (sampled through `deradiff evaluate`'s code path, into the same folder) this reports, per
lambda_k and metric: the realigned value, the retrained value, their gap (realigned - retrained,
paired per prompt) with a bootstrap interval over prompts, whether the realigned value lies in
the retrained value's interval, and whether the gap's interval contains 0. The weight-space
baseline (the aligned LoRA scaled by lambda_k) gets the same gap, so the report shows whether
output mixing is closer to retraining than weight scaling. Compute: the sweep's training time
(summary.json wall_s, else the last time_s of metrics.jsonl) against the search's sampling time
(OUT/search.json, else the realigned samples at the lambda_k), as a ratio.
Baselines trained on another base model or LoRA rank are refused. Writes OUT/validation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from deradiff.errors import UserError
from deradiff.evaluation.baselines import lora_run
from deradiff.evaluation.config import config_from_args
from deradiff.evaluation.evaluate import Evaluator
from deradiff.evaluation.lams import LAM_POLICY
from deradiff.evaluation.options import add_eval_arguments, log_command
from deradiff.evaluation.results import LORA_SCALE, REALIGNED, Table, per_prompt_table, write_json
from deradiff.stats import bootstrap_ci


def paired(table: Table, a: tuple[str, str], b: tuple[str, str], metric: str, n_boot: int, alpha: float) -> dict | None:
    """a's and b's estimates of `metric` and the gap a - b, paired over the prompts both have."""
    va, vb = table.get(a, {}).get(metric), table.get(b, {}).get(metric)
    if not va or not vb:
        return None
    prompts = sorted(set(va) & set(vb))
    if not prompts:
        return None
    ea = bootstrap_ci([va[p] for p in prompts], n_boot=n_boot, alpha=alpha)
    eb = bootstrap_ci([vb[p] for p in prompts], n_boot=n_boot, alpha=alpha)
    gap = bootstrap_ci([va[p] - vb[p] for p in prompts], n_boot=n_boot, alpha=alpha)
    return {"a": list(ea), "b": list(eb), "gap": list(gap), "n_prompts": len(prompts)}


def validate(ev: Evaluator, lora_scale: bool = True, n_boot: int = 1000, alpha: float = 0.05) -> dict:
    """Sample what is missing and compare every baseline with realignment (and weight scaling)."""
    if not ev.baselines:
        raise UserError("validate needs --baselines (LoRAs trained at beta0 / lambda_k)")
    lams = ev.baseline_lams()
    grid = sorted(set(lams.values()), key=lambda lam: lam.value)
    rows = ev.ensure(REALIGNED, grid)
    if lora_scale:
        rows += ev.ensure(LORA_SCALE, grid)
    for arm, lam in lams.items():
        rows += ev.ensure(arm, [lam])
    table = per_prompt_table(rows, ev.out, ev.judge())
    comparisons = []
    for arm, lam_ in sorted(lams.items(), key=lambda kv: kv[1].value):
        name, lam = lam_.name, lam_.value
        retrained = (arm, name)
        for metric in sorted(table[retrained]):
            real = paired(table, (REALIGNED, name), retrained, metric, n_boot, alpha)
            if real is None:
                continue
            row = {"baseline": arm.split(":", 1)[1], "lam": lam, "beta": ev.baselines[arm].beta, "metric": metric,
                   "realigned": real["a"], "retrained": real["b"], "gap": real["gap"], "n_prompts": real["n_prompts"],
                   "in_baseline_ci": real["b"][1] <= real["a"][0] <= real["b"][2],
                   "gap_ci_has_zero": real["gap"][1] <= 0.0 <= real["gap"][2]}
            scaled = paired(table, (LORA_SCALE, name), retrained, metric, n_boot, alpha) if lora_scale else None
            if scaled is not None:
                row.update(lora_scale=scaled["a"], lora_scale_gap=scaled["gap"],
                           mixing_closer=abs(real["gap"][0]) < abs(scaled["gap"][0]))
            comparisons.append(row)
    return {"beta0": ev.beta0, "alpha": alpha,
            "baselines": [{"label": b.label, "lam": lams[arm].value, "beta": b.beta, "path": b.path, "wall_s": b.wall_s}
                          for arm, b in ev.baselines.items()],
            "comparisons": comparisons, "per_metric": _per_metric(comparisons)}


def _per_metric(comparisons: list[dict]) -> dict:
    """Per metric: how many baselines the realigned value matches (in CI, gap CI has 0) and how
    often output mixing is closer to the retrained model than weight scaling."""
    out: dict[str, dict] = {}
    for c in comparisons:
        m = out.setdefault(c["metric"], {"baselines": 0, "in_baseline_ci": 0, "gap_ci_has_zero": 0, "mixing_closer": 0})
        m["baselines"] += 1
        m["in_baseline_ci"] += int(c["in_baseline_ci"])
        m["gap_ci_has_zero"] += int(c["gap_ci_has_zero"])
        m["mixing_closer"] += int(c.get("mixing_closer", False))
    return out


def compute_ratio(record: dict, ev: Evaluator, search: dict | None, search_source: str = "search.json") -> dict:
    """The sweep's training seconds against the search's sampling seconds (from the search
    record `search`, read from `search_source`; None: the realigned samples at the baselines' lambdas)."""
    walls = [b["wall_s"] for b in record["baselines"]]
    unknown = [b["label"] for b in record["baselines"] if b["wall_s"] is None]
    sweep_s = sum(w for w in walls if w is not None)
    if search is not None:
        search_s = float(search["cost"]["sample_s"])
        source = search_source
    else:
        lams = {lam.name for lam in ev.baseline_lams().values()}
        search_s = sum(r.get("time_s", 0.0) for k, r in ev.rows.items() if k[0] == REALIGNED and k[1] in lams)
        source = "realigned samples at the baselines' lambdas (no search.json)"
    return {"sweep_train_s": sweep_s, "baselines_without_time": unknown, "search_sample_s": round(search_s, 2),
            "search_source": source, "ratio": sweep_s / search_s if search_s > 0 and sweep_s > 0 else None}


def search_check(record: dict, search: dict) -> dict | None:
    """Is the searched lambda a good pick by the retrained models? Takes the baseline nearest the
    chosen lambda (in log lambda) and compares its retrained value of the searched metric with
    the best baseline's interval. None for a weighted objective or a metric without comparisons."""
    metric = search.get("maximize")
    rows = [c for c in record["comparisons"] if c["metric"] == metric]
    chosen = float(search["chosen_lambda"])
    if not rows or chosen <= 0:
        return None
    nearest = min(rows, key=lambda c: abs(math.log(c["lam"] / chosen)))
    best = max(rows, key=lambda c: c["retrained"][0])
    return {"metric": metric, "chosen_lambda": chosen, "nearest_lambda": nearest["lam"],
            "nearest_retrained": nearest["retrained"], "best_lambda": best["lam"], "best_retrained": best["retrained"],
            "within_best_interval": nearest["retrained"][0] >= best["retrained"][1],
            "inside_sweep_range": min(c["lam"] for c in rows) <= chosen <= max(c["lam"] for c in rows)}


def format_search_check(check: dict) -> str:
    """One sentence on `search_check`'s verdict."""
    est = check["nearest_retrained"]
    best = check["best_retrained"]
    where = "" if check["inside_sweep_range"] else " (outside the sweep's lambda range, so the nearest baseline stands in)"
    return (f"search: chose lambda {check['chosen_lambda']:g}{where}; retrained {check['metric']} at lambda "
            f"{check['nearest_lambda']:g} is {est[0]:.4g} [{est[1]:.3g}, {est[2]:.3g}], the best baseline (lambda "
            f"{check['best_lambda']:g}) {best[0]:.4g} [{best[1]:.3g}, {best[2]:.3g}]: "
            f"{'within' if check['within_best_interval'] else 'NOT within'} the best baseline's interval")


def format_validation(record: dict) -> str:
    lines = [f"{'lam':>7s} {'metric':26s} {'realigned':>26s} {'retrained':>26s} {'gap [CI]':>28s}  in-CI  "
             + ("lora-scale gap" if any("lora_scale_gap" in c for c in record["comparisons"]) else "")]

    def est(e):
        return f"{e[0]:.4g} [{e[1]:.3g}, {e[2]:.3g}]"

    for c in record["comparisons"]:
        extra = f"  {est(c['lora_scale_gap'])}" if "lora_scale_gap" in c else ""
        lines.append(f"{c['lam']:>7g} {c['metric']:26s} {est(c['realigned']):>26s} {est(c['retrained']):>26s} "
                     f"{est(c['gap']):>28s}  {'yes' if c['in_baseline_ci'] else 'no ':5s}{extra}")
    for metric, m in record["per_metric"].items():
        lines.append(f"{metric}: realigned within the retrained interval for {m['in_baseline_ci']}/{m['baselines']} "
                     f"baselines; output mixing closer than weight scaling for {m['mixing_closer']}/{m['baselines']}")
    comp = record["compute"]
    if comp["ratio"] is not None:
        lines.append(f"compute: sweep {comp['sweep_train_s']:.1f}s of training vs {comp['search_sample_s']:.1f}s of "
                     f"sampling ({comp['search_source']}): {comp['ratio']:.1f}x")
    if record.get("search_check"):
        lines.append(format_search_check(record["search_check"]))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    p.add_argument("--baselines", nargs="+", required=True, metavar="RUN",
                   help="baseline LoRAs trained at beta_k = beta0 / lambda_k (beta_k > 0): run folders (lora/, "
                   f"lora_info.json or recipe.yaml, summary.json), LoRA folders or files; {LAM_POLICY}")
    p.add_argument("--no-lora-scale", action="store_true", help="skip the weight-space baseline (LoRA scale = lambda)")
    p.add_argument("--search", default=None, help="search.json whose cost enters the compute ratio (default: OUT/search.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    baselines = [lora_run(b) for b in args.baselines]
    out = Path(args.out)
    start = time.perf_counter()
    ev = Evaluator(cfg, out, baselines=baselines)
    log_command(out, args)
    record = validate(ev, not args.no_lora_scale, args.n_boot, args.alpha)
    search_file = Path(args.search) if args.search else out / "search.json"
    search = json.loads(search_file.read_text()) if search_file.exists() else None
    record["compute"] = compute_ratio(record, ev, search, str(search_file))
    if search is not None:
        record["search_check"] = search_check(record, search)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    write_json(out / "validation.json", record)
    print(format_validation(record))
    print(f"-> {out / 'validation.json'}")
    return 0
