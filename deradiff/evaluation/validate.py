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

Tests that can fail (docs/method.md section 5):
- matching (evaluation/matching.py): the realigned samples at each lambda_k against EVERY
  baseline, by KID on the fidelity judge's features (computed from the stored PNGs) and by each
  metric's paired gap; it passes at lambda_k when the nearest baseline is baseline k. With the
  distance to baseline k as a fraction of the spacing to its neighbour, the matching accuracy,
  and per distance whether the evaluation was large enough (interval width < spacing) or what
  size (prompts x seeds) would be.
- selection (with OUT/search.json): the retrained model at the searched lambda (`--selected RUN`,
  a run retrained at beta0 / lambda*, else the nearest baseline) meets the search's budgets
  (e.g. --max-path-kl) and its value of the maximized metric lies within the interval of the
  best baseline that meets them.
Baselines trained on another base model or LoRA rank are refused. Writes OUT/validation.json and
OUT/validation.md.

Lambda vectors (multi-objective realignment; docs/method.md section 2, "Several rewards"): with
named LoRAs, each trained on one reward r_i at beta_i (--lora color=runs/color contrast=runs/contrast),
the baselines are LoRAs retrained on weighted rewards sum_r w_r r at beta (method.reward
"toy=1,toy_contrast=0.5", read from their recipe.yaml). Mixing at lam_i = w_{r_i} beta_i / beta
emulates each (`baselines.emulating_vector`); the realigned model at that vector and the baseline
are sampled on the same prompts and seeds and compared per metric as above (paired gap with its
interval, in CI, gap CI contains 0). No weight-scaled arm, matching test or selection check for
vectors; the compute ratio compares the baselines' training time with the vector search's
sampling (OUT/search.json), else with the realigned samples at the emulating vectors.

    deradiff validate --lora color=runs/mo/color contrast=runs/mo/contrast --out runs/mo-eval \
        --baselines runs/mo/w-1-0.5 runs/mo/w-1-1 --prompts toy:test --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from deradiff.errors import UserError
from deradiff.evaluation.baselines import emulated_weights, emulating_vector, lora_run
from deradiff.evaluation.config import config_from_args
from deradiff.evaluation.evaluate import Evaluator
from deradiff.evaluation.lams import LAM_POLICY, Lam, parse_lam
from deradiff.evaluation.matching import SampleSet, format_matching, match, matching_markdown
from deradiff.evaluation.options import add_eval_arguments, log_command
from deradiff.evaluation.results import (
    LORA_SCALE,
    REALIGNED,
    Table,
    format_estimate,
    markdown_table,
    per_prompt_table,
    pil_to_tensor,
    write_json,
)
from deradiff.evaluation.search import meets_budgets
from deradiff.io import write_text_atomic
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


def validate(ev: Evaluator, lora_scale: bool = True, n_boot: int = 1000, alpha: float = 0.05,
             selected: str | None = None) -> dict:
    """Sample what is missing and compare every baseline with realignment (and weight scaling);
    the matching test over the baselines other than `selected` (the arm of a run retrained at the
    searched lambda, kept for the selection check)."""
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
    matched = {arm: lam for arm, lam in lams.items() if arm != selected}
    return {"beta0": ev.beta0, "alpha": alpha,
            "baselines": [{"label": b.label, "lam": lams[arm].value, "beta": b.beta, "path": b.path, "wall_s": b.wall_s,
                           "selected": arm == selected, "aligned": is_aligned(ev, arm)} for arm, b in ev.baselines.items()],
            "comparisons": comparisons, "per_metric": _per_metric(comparisons),
            "matching": matching(ev, table, rows, matched, n_boot, alpha)}


def vector_lams(ev: Evaluator) -> dict[str, Lam]:
    """arm -> the lambda vector that emulates each weighted-reward baseline (named LoRAs); UserError
    (one line) for a baseline that no vector of these LoRAs emulates (baselines.emulating_vector),
    or one a non-negative vector cannot (a negative weight)."""
    adapters = {name: lora_run(path) for name, path in ev.cfg.loras.items()}
    out = {}
    for arm, run in ev.baselines.items():
        vector = emulating_vector(adapters, run)
        negative = [n for n, v in vector.items() if v < 0]
        if negative:
            raise UserError(f"baseline {run.path} ({run.reward}) needs lambda {vector[negative[0]]:g} < 0 for adapter "
                            f"{negative[0]!r}: realignment emulates non-negative weights only; drop that baseline")
        out[arm] = parse_lam(",".join(f"{n}={v!r}" for n, v in vector.items()))
    return out


def validate_vectors(ev: Evaluator, n_boot: int = 1000, alpha: float = 0.05) -> dict:
    """Sample what is missing and compare every weighted-reward baseline with the realigned model
    at the lambda vector that emulates it; the record has "kind": "vector" (see the module doc)."""
    if not ev.baselines:
        raise UserError("validate needs --baselines (LoRAs retrained on weighted rewards, e.g. method.reward="
                        "toy=1,toy_contrast=0.5)")
    lams = vector_lams(ev)  # every baseline placed before anything is sampled
    grid = sorted({lam.name: lam for lam in lams.values()}.values(), key=lambda lam: lam.name)
    rows = ev.ensure(REALIGNED, grid)
    for arm, lam in lams.items():
        rows += ev.ensure(arm, [lam])
    table = per_prompt_table(rows, ev.out, ev.judge())
    adapters = {name: lora_run(path) for name, path in ev.cfg.loras.items()}
    comparisons = []
    for arm, lam in lams.items():
        run = ev.baselines[arm]
        for metric in sorted(table[(arm, lam.name)]):
            real = paired(table, (REALIGNED, lam.name), (arm, lam.name), metric, n_boot, alpha)
            if real is None:
                continue
            comparisons.append({
                "baseline": run.label, "reward": run.reward, "beta": run.beta, "lam": lam.name,
                "vector": lam.vector.constants(), "metric": metric, "realigned": real["a"], "retrained": real["b"],
                "gap": real["gap"], "n_prompts": real["n_prompts"],
                "in_baseline_ci": real["b"][1] <= real["a"][0] <= real["b"][2],
                "gap_ci_has_zero": real["gap"][1] <= 0.0 <= real["gap"][2]})
    return {"kind": "vector", "beta0": ev.beta0, "alpha": alpha,
            "adapters": {n: {"reward": a.reward, "beta": a.beta, "path": a.path} for n, a in adapters.items()},
            "baselines": [{"label": b.label, "reward": b.reward, "beta": b.beta, "lam": lams[arm].name,
                           "vector": lams[arm].vector.constants(), "path": b.path, "wall_s": b.wall_s,
                           "emulated_weights": emulated_weights(adapters, lams[arm].vector.constants(), b.beta)}
                          for arm, b in ev.baselines.items()],
            "comparisons": comparisons, "per_metric": _per_metric(comparisons), "matching": None}


def matching(ev: Evaluator, table: Table, rows: list[dict], lams: dict, n_boot: int, alpha: float) -> dict | None:
    """The matching record (evaluation/matching.py) of the baselines `lams` (arm -> Lam): per
    arm, its per-prompt metrics and the judge's features of its stored images."""
    wanted = {(REALIGNED, lam.name) for lam in lams.values()} | {(arm, lam.name) for arm, lam in lams.items()}
    features = image_features([r for r in rows if (r["arm"], r["lam"]) in wanted], ev.out, ev.judge())

    def sample_set(key: tuple[str, str]) -> SampleSet:
        return SampleSet(table.get(key, {}), None if features is None else features.get(key, {}))

    arms = list(lams)
    baselines = [{"label": ev.baselines[arm].label, "lam": lams[arm].value, "beta": ev.baselines[arm].beta}
                 for arm in arms]
    n_seeds = len({r["seed"] for r in rows if r["arm"] == REALIGNED})
    # The aligned LoRA given as a baseline is realignment at lambda 1 exactly: a neighbour, not a test.
    realigned = [None if is_aligned(ev, arm) else sample_set((REALIGNED, lams[arm].name)) for arm in arms]
    return match(baselines, realigned, [sample_set((arm, lams[arm].name)) for arm in arms], n_seeds, n_boot, alpha)


def is_aligned(ev: Evaluator, arm: str) -> bool:
    """Whether baseline `arm` is the aligned LoRA itself (the same file)."""
    aligned = getattr(getattr(ev, "aligned", None), "file", None)
    return aligned is not None and Path(ev.baselines[arm].file).resolve() == Path(aligned).resolve()


def image_features(rows: list[dict], out: Path, judge, batch: int = 256) -> dict | None:
    """(arm, lam) -> (prompt, seed) -> the judge's features (D,) of each row's stored PNG; None
    when there is no judge or it has no `features(images)` (then matching uses the metrics only)."""
    extract = getattr(judge, "features", None)
    if extract is None or not rows:
        return None
    from PIL import Image

    out_features: dict[tuple[str, str], dict[tuple[str, int], np.ndarray]] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        images = pil_to_tensor([Image.open(out / r["image"]) for r in chunk])
        feats = np.asarray(extract(images), dtype=np.float64)
        for r, f in zip(chunk, feats, strict=True):
            out_features.setdefault((r["arm"], r["lam"]), {})[(r["prompt"], r["seed"])] = f
    return out_features


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


def compute_ratio(record: dict, ev: Evaluator, search: dict | None, search_source: str = "search.json",
                  lams: set[str] | None = None) -> dict:
    """The sweep's training seconds against the search's sampling seconds (from the search
    record `search`, read from `search_source`; None: the realigned samples at the baselines' lambdas,
    or at `lams`, table names, when given). The sweep is the baselines other than the aligned
    LoRA (trained either way) and a --selected run."""
    sweep = [b for b in record["baselines"] if not b.get("selected") and not b.get("aligned")]
    walls = [b["wall_s"] for b in sweep]
    unknown = [b["label"] for b in sweep if b["wall_s"] is None]
    sweep_s = sum(w for w in walls if w is not None)
    if search is not None:
        search_s = float(search["cost"]["sample_s"])
        images = search["cost"].get("images")
        source = search_source
    else:
        lams = lams if lams is not None else {lam.name for lam in ev.baseline_lams().values()}
        used = [r for k, r in ev.rows.items() if k[0] == REALIGNED and k[1] in lams]
        search_s, images = sum(r.get("time_s", 0.0) for r in used), len(used)
        source = "realigned samples at the baselines' lambdas (no search.json)"
    return {"sweep_train_s": sweep_s, "sweep_runs": len(walls), "baselines_without_time": unknown,
            "search_sample_s": round(search_s, 2), "search_images": images, "search_source": source,
            "ratio": sweep_s / search_s if search_s > 0 and sweep_s > 0 else None}


def _retrained(record: dict) -> dict[str, dict]:
    """baseline label -> {"lam": lambda, metric: [value, lo, hi] of the retrained model}."""
    out: dict[str, dict] = {}
    for c in record["comparisons"]:
        label = c.get("baseline") or f"lambda-{c['lam']:g}"
        out.setdefault(label, {"lam": c["lam"]})[c["metric"]] = c["retrained"]
    return out


def search_check(record: dict, search: dict, selected: str | None = None) -> dict | None:
    """Is the searched lambda a good pick by the retrained models?

    The retrained model at the chosen lambda is `selected` (the label of a run retrained at
    beta0 / lambda*), else the baseline nearest the chosen lambda in log lambda. It passes when
    it meets the search's budgets (search.json "budgets", on its retrained means, e.g. its own
    path KL) and its value of the maximized metric lies within the interval of the best baseline
    that meets them. None for a weighted objective or a metric without comparisons."""
    metric = search.get("maximize")
    rows = {label: r for label, r in _retrained(record).items() if metric in r}
    chosen = float(search["chosen_lambda"])
    if not metric or not rows or chosen <= 0:
        return None
    budgets = [tuple(b) for b in search.get("budgets") or []]

    def feasible(r: dict) -> bool | None:  # None: a budget metric the baseline was not measured on
        if any(m not in r for m, _, _ in budgets):
            return None
        return meets_budgets({m: r[m][0] for m, _, _ in budgets}, budgets)

    source = "selected" if selected in rows else "nearest"
    pick = selected if source == "selected" else min(rows, key=lambda lab: abs(math.log(rows[lab]["lam"] / chosen)))
    ok = [lab for lab in rows if feasible(rows[lab])]
    best = max(ok, key=lambda lab: rows[lab][metric][0]) if ok else None
    within = best is not None and rows[pick][metric][0] >= rows[best][metric][1]
    meets = feasible(rows[pick])
    lams = [r["lam"] for r in rows.values()]
    return {"metric": metric, "chosen_lambda": chosen, "budgets": [list(b) for b in budgets], "source": source,
            "baseline": pick, "nearest_lambda": rows[pick]["lam"], "nearest_retrained": rows[pick][metric],
            "meets_budget": meets, "feasible": sorted(ok, key=lambda lab: rows[lab]["lam"]),
            "best_lambda": None if best is None else rows[best]["lam"],
            "best_retrained": None if best is None else rows[best][metric],
            "within_best_interval": within, "passed": bool(within and meets),
            "inside_sweep_range": min(lams) <= chosen <= max(lams),
            "at_chosen_lambda": abs(math.log(rows[pick]["lam"] / chosen)) < 0.01}


def format_search_check(check: dict) -> str:
    """One sentence on `search_check`'s verdict."""
    est = check["nearest_retrained"]
    budgets = " and ".join(f"{m} {op} {b:g}" for m, op, b in check.get("budgets", []))
    where = "" if check["inside_sweep_range"] else " (outside the sweep's lambda range, so the nearest baseline stands in)"
    who = ("the run retrained at beta0 / lambda*" if check.get("source") == "selected"
           else f"the nearest baseline, lambda {check['nearest_lambda']:g}")
    if check.get("source") == "selected" and not check.get("at_chosen_lambda", True):
        who += f" (trained at lambda {check['nearest_lambda']:g}, not the chosen one)"
    text = (f"search: chose lambda {check['chosen_lambda']:g}{where}" + (f" under {budgets}" if budgets else "")
            + f"; retrained {check['metric']} of {who} is {est[0]:.4g} [{est[1]:.3g}, {est[2]:.3g}]")
    if budgets:
        meets = check.get("meets_budget")
        text += ", " + {True: "meets the budget", False: "VIOLATES the budget", None: "budget not measured"}[meets]
    best = check["best_retrained"]
    if best is None:
        return text + "; no retrained baseline meets the budget: FAIL"
    text += (f"; the best {'feasible ' if budgets else ''}baseline (lambda {check['best_lambda']:g}) "
             f"{best[0]:.4g} [{best[1]:.3g}, {best[2]:.3g}]: "
             f"{'within' if check['within_best_interval'] else 'NOT within'} its interval")
    return text + (": " + ("PASS" if check.get("passed") else "FAIL") if "passed" in check else "")


def _est(e) -> str:
    return f"{e[0]:.4g} [{e[1]:.3g}, {e[2]:.3g}]"


def format_validation(record: dict) -> str:
    if record.get("kind") == "vector":
        return format_vector_validation(record)
    lines = [f"{'lam':>7s} {'metric':26s} {'realigned':>26s} {'retrained':>26s} {'gap [CI]':>28s}  in-CI  "
             + ("lora-scale gap" if any("lora_scale_gap" in c for c in record["comparisons"]) else "")]
    for c in record["comparisons"]:
        extra = f"  {_est(c['lora_scale_gap'])}" if "lora_scale_gap" in c else ""
        lines.append(f"{c['lam']:>7g} {c['metric']:26s} {_est(c['realigned']):>26s} {_est(c['retrained']):>26s} "
                     f"{_est(c['gap']):>28s}  {'yes' if c['in_baseline_ci'] else 'no ':5s}{extra}")
    for metric, m in record["per_metric"].items():
        lines.append(f"{metric}: realigned within the retrained interval for {m['in_baseline_ci']}/{m['baselines']} "
                     f"baselines; output mixing closer than weight scaling for {m['mixing_closer']}/{m['baselines']}")
    if record.get("matching"):
        lines.append(format_matching(record["matching"]))
    comp = record["compute"]
    if comp["ratio"] is not None:
        lines.append(f"compute: sweep {comp['sweep_train_s']:.1f}s of training vs {comp['search_sample_s']:.1f}s of "
                     f"sampling ({comp['search_source']}): {comp['ratio']:.1f}x")
    if record.get("search_check"):
        lines.append(format_search_check(record["search_check"]))
    return "\n".join(lines)




def validation_markdown(record: dict) -> list[str]:
    """The validation section of a report (and of OUT/validation.md): gaps per lambda and metric,
    the matching test, the compute ratio and the selection check."""
    if record.get("kind") == "vector":
        return vector_validation_markdown(record)
    parts = ["## Validation against retrained baselines", "",
             "Gap = realigned - retrained, paired over prompts; intervals are bootstrap over prompts at level "
             f"{1 - record['alpha']:.0%}. 'in CI': the realigned value lies in the retrained value's interval.", ""]
    has_scale = any("lora_scale_gap" in c for c in record["comparisons"])
    head = ["lambda", "beta", "metric", "realigned", "retrained", "gap", "in CI"] + (
        ["LoRA-scale gap", "mixing closer"] if has_scale else [])
    body = []
    for c in record["comparisons"]:
        line = [f"{c['lam']:g}", format_estimate(c["beta"]), c["metric"], format_estimate(*c["realigned"]), format_estimate(*c["retrained"]),
                format_estimate(*c["gap"]), "yes" if c["in_baseline_ci"] else "**no**"]
        if has_scale:
            line += [format_estimate(*c["lora_scale_gap"]) if "lora_scale_gap" in c else "-", "yes" if c.get("mixing_closer") else "no"]
        body.append(line)
    parts += [markdown_table(head, body), ""]
    parts += [markdown_table(["metric", "in CI", "gap CI contains 0", "mixing closer than weight scaling"],
                             [[m, f"{v['in_baseline_ci']}/{v['baselines']}", f"{v['gap_ci_has_zero']}/{v['baselines']}",
                               f"{v['mixing_closer']}/{v['baselines']}"] for m, v in record["per_metric"].items()]), ""]
    if record.get("matching"):
        parts += matching_markdown(record["matching"], markdown_table)
    comp = record.get("compute", {})
    if comp.get("ratio"):
        images = f", {comp['search_images']} images" if comp.get("search_images") else ""
        runs = f" {comp['sweep_runs']} runs" if comp.get("sweep_runs") else ""
        parts += [f"Compute: the sweep trained{runs} for {comp['sweep_train_s']:.1f} s; the search sampled for {comp['search_sample_s']:.1f} s{images} "
                  f"({comp['search_source']}): **{comp['ratio']:.1f}x** less.", ""]
    if record.get("search_check"):
        parts += [format_search_check(record["search_check"]).replace("search: c", "Search check: c", 1) + ".", ""]
    if comp.get("baselines_without_time"):
        parts += [f"Baselines without a training time: {comp['baselines_without_time']}.", ""]
    return parts


def _weights_text(weights: dict[str, float]) -> str:
    return " + ".join(f"{w:.4g}*{r}" for r, w in weights.items())


def format_vector_validation(record: dict) -> str:
    """The vector validation as plain text: per baseline and metric, realigned vs retrained."""
    lines = [f"{'baseline':18s} {'vector':28s} {'metric':22s} {'realigned':>24s} {'retrained':>24s} {'gap [CI]':>26s}  in-CI"]
    for c in record["comparisons"]:
        lines.append(f"{c['baseline']:18s} {c['lam']:28s} {c['metric']:22s} {_est(c['realigned']):>24s} "
                     f"{_est(c['retrained']):>24s} {_est(c['gap']):>26s}  {'yes' if c['in_baseline_ci'] else 'no'}")
    for metric, m in record["per_metric"].items():
        lines.append(f"{metric}: realigned within the retrained interval for {m['in_baseline_ci']}/{m['baselines']} "
                     f"weighted baselines; gap interval contains 0 for {m['gap_ci_has_zero']}/{m['baselines']}")
    comp = record.get("compute", {})
    if comp.get("ratio") is not None:
        lines.append(f"compute: weighted retraining {comp['sweep_train_s']:.1f}s vs {comp['search_sample_s']:.1f}s of "
                     f"sampling ({comp['search_source']}): {comp['ratio']:.1f}x")
    return "\n".join(lines)


def vector_validation_markdown(record: dict) -> list[str]:
    """The report section of a vector validation: which vector emulates which retrained LoRA, and
    the paired gaps per metric."""
    adapters = ", ".join(f"`{n}` on {a['reward']} at beta {format_estimate(a['beta'])}" for n, a in record["adapters"].items())
    parts = ["## Validation against LoRAs retrained on weighted rewards", "",
             f"Named LoRAs: {adapters}. A LoRA retrained on sum_r w_r r at beta is emulated by mixing at "
             "lam_i = w_i beta_i / beta (realigning with a vector emulates training on sum_i lam_i r_i / beta_i at KL "
             "weight 1). Gap = realigned - retrained, paired over prompts; bootstrap intervals over prompts at level "
             f"{1 - record['alpha']:.0%}; 'in CI': the realigned value lies in the retrained value's interval.", ""]
    parts += [markdown_table(["retrained", "reward", "beta", "emulating vector"],
                             [[b["label"], b["reward"], format_estimate(b["beta"]), b["lam"]] for b in record["baselines"]]), ""]
    parts += [markdown_table(["retrained", "vector", "metric", "realigned", "retrained value", "gap", "in CI"],
                             [[c["baseline"], c["lam"], c["metric"], format_estimate(*c["realigned"]),
                               format_estimate(*c["retrained"]), format_estimate(*c["gap"]),
                               "yes" if c["in_baseline_ci"] else "**no**"] for c in record["comparisons"]]), ""]
    parts += [markdown_table(["metric", "in CI", "gap CI contains 0"],
                             [[m, f"{v['in_baseline_ci']}/{v['baselines']}", f"{v['gap_ci_has_zero']}/{v['baselines']}"]
                              for m, v in record["per_metric"].items()]), ""]
    comp = record.get("compute", {})
    if comp.get("ratio"):
        parts += [f"Compute: the {comp['sweep_runs']} weighted retrainings took {comp['sweep_train_s']:.1f} s; the "
                  f"vector search sampled for {comp['search_sample_s']:.1f} s ({comp['search_source']}): "
                  f"**{comp['ratio']:.1f}x** less.", ""]
    return parts


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    p.add_argument("--baselines", nargs="+", required=True, metavar="RUN",
                   help="baseline LoRAs trained at beta_k = beta0 / lambda_k (beta_k > 0): run folders (lora/, "
                   f"lora_info.json or recipe.yaml, summary.json), LoRA folders or files; {LAM_POLICY}")
    p.add_argument("--selected", default=None, metavar="RUN",
                   help="a run retrained at beta0 / lambda* (the searched lambda): sampled like a baseline and used "
                   "by the selection check instead of the nearest baseline (left out of the matching test)")
    p.add_argument("--no-lora-scale", action="store_true", help="skip the weight-space baseline (LoRA scale = lambda)")
    p.add_argument("--search", default=None, help="search.json whose cost enters the compute ratio (default: OUT/search.json)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    baselines = [lora_run(b) for b in args.baselines]
    selected = lora_run(args.selected) if args.selected else None
    out = Path(args.out)
    search_file = Path(args.search) if args.search else out / "search.json"
    if args.search and not search_file.exists():
        raise UserError(f"--search {search_file} does not exist: run `deradiff search --out {out}` first")
    if cfg.loras and selected is not None:
        raise UserError("--selected applies to a scalar search; with named LoRAs the baselines are weighted-reward runs")
    start = time.perf_counter()
    ev = Evaluator(cfg, out, baselines=baselines + ([selected] if selected else []))
    if cfg.loras:
        return _run_vectors(ev, args, out, search_file, start)
    log_command(out, args)
    arm = next((a for a, b in ev.baselines.items() if b is selected), None)
    record = validate(ev, not args.no_lora_scale, args.n_boot, args.alpha, selected=arm)
    search = json.loads(search_file.read_text()) if search_file.exists() else None
    record["compute"] = compute_ratio(record, ev, search, str(search_file))
    if search is not None:
        record["search_check"] = search_check(record, search, selected.label if selected else None)
    return _write_record(record, out, start)


def _write_record(record: dict, out: Path, start: float) -> int:
    """Stamp the wall time, write validation.json and validation.md, print the table."""
    record["wall_s"] = round(time.perf_counter() - start, 2)
    write_json(out / "validation.json", record)
    write_text_atomic(out / "validation.md", "\n".join(["# Validation", "", *validation_markdown(record)]))
    print(format_validation(record))
    print(f"-> {out / 'validation.json'}, {out / 'validation.md'}")
    return 0


def _run_vectors(ev: Evaluator, args: argparse.Namespace, out: Path, search_file: Path, start: float) -> int:
    """`deradiff validate` with named LoRAs: the weighted-reward baselines against their vectors."""
    vector_lams(ev)  # a baseline no vector emulates stops here, before the command is logged
    log_command(out, args)
    record = validate_vectors(ev, args.n_boot, args.alpha)
    search = json.loads(search_file.read_text()) if search_file.exists() else None
    if search is not None and search.get("kind") != "vector":
        search = None
    record["compute"] = compute_ratio(record, ev, search, str(search_file), {b["lam"] for b in record["baselines"]})
    return _write_record(record, out, start)
