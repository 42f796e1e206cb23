"""`deradiff compare`: several validations side by side, e.g. baselines trained 1x, 2x and 4x as long.

    deradiff compare --eval runs/conv-1x runs/conv-2x runs/conv-4x \\
        --labels "400 steps" "800 steps" "1600 steps" --out docs/toy-convergence

Each --eval folder holds a `deradiff validate` record (validation.json) of one realigned LoRA
against its own retrained baselines; the folders differ in one thing, named by --labels (how long
the baselines trained, the sample size, the sampler...). Realignment emulates each beta's OPTIMAL
model exactly (docs/method.md section 5), so as baselines approach their optima the
realigned-vs-retrained gaps should shrink; this writes the evidence either way:
  report.md     per label: matching accuracy on every distance, the median distance to the
                matching baseline as a fraction of the spacing to its neighbour, per metric the
                mean |gap| over the tested lambdas and the counts in CI; how path KL grows with
                lambda (the slope of log path KL on log lambda: realigned models' drift scales as
                lambda^2, slope 2 exactly, and so does the optimum's while the drift is small);
                per lambda and metric the gap with its interval
  compare.json  the same numbers; compare.csv one row per label, lambda and metric
  gaps.png      per metric: the gap realigned - retrained against lambda, one series per label
  path_kl.png   path KL against lambda (log-log): realigned and retrained, per label
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from deradiff.errors import UserError
from deradiff.evaluation.plots import Series, metric_panels
from deradiff.evaluation.report import write_csv
from deradiff.evaluation.results import format_estimate, markdown_table, write_json
from deradiff.io import write_text_atomic

VALIDATION = "validation.json"
PATH_KL = "path_kl"


def load_validation(folder: Path) -> dict:
    """The scalar validation record of an evaluation folder, refused in one line when absent."""
    path = folder / VALIDATION
    if not path.exists():
        raise UserError(f"{folder} has no {VALIDATION}: run `deradiff validate --out {folder} ...` first")
    record = json.loads(path.read_text())
    if record.get("kind") == "vector":
        raise UserError(f"{path} validates lambda vectors; compare takes scalar validations (one LoRA, baselines "
                        "at beta0 / lambda)")
    return record


def log_slope(lams: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) on log(lambda) over the positive points (None below 2)."""
    pts = [(math.log(lam), math.log(v)) for lam, v in zip(lams, values, strict=True) if lam > 0 and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def tested(record: dict) -> list[dict]:
    """The comparisons at baselines other than the aligned LoRA itself (lambda 1 is it, exactly)."""
    return [c for c in record["comparisons"] if not math.isclose(c["lam"], 1.0)]


def path_kl_rows(record: dict) -> list[dict]:
    """The record's path-KL comparisons, by lambda (every validated lambda, 1 included)."""
    return sorted((c for c in record["comparisons"] if c["metric"] == PATH_KL), key=lambda c: c["lam"])


def path_kl_slopes(record: dict) -> dict:
    """Slopes of log path KL on log lambda, realigned and retrained, over every validated lambda."""
    rows = path_kl_rows(record)
    lams = [c["lam"] for c in rows]
    return {arm: log_slope(lams, [c[arm][0] for c in rows]) for arm in ("realigned", "retrained")}


def summarize_validation(record: dict) -> dict:
    """One label's headline numbers: matching per distance, per-metric gaps and counts, path-KL slopes."""
    comps = tested(record)
    metrics = {}
    for metric in dict.fromkeys(c["metric"] for c in comps):
        rows = [c for c in comps if c["metric"] == metric]
        metrics[metric] = {"mean_abs_gap": float(np.mean([abs(c["gap"][0]) for c in rows])),
                           "in_baseline_ci": sum(c["in_baseline_ci"] for c in rows),
                           "gap_ci_has_zero": sum(c["gap_ci_has_zero"] for c in rows), "lambdas": len(rows)}
    matching = {}
    for name, d in ((record.get("matching") or {}).get("distances") or {}).items():
        fractions = [r["fraction"] for r in d["rows"] if r["fraction"] is not None]
        matching[name] = {"accuracy": d["accuracy"],
                          "median_fraction": statistics.median(fractions) if fractions else None,
                          "large_enough": d["resolution"]["large_enough"]}
    primary = (record.get("matching") or {}).get("primary")
    return {"metrics": metrics, "matching": matching, "primary": primary, "path_kl_slope": path_kl_slopes(record),
            "sweep_train_s": record.get("compute", {}).get("sweep_train_s")}


def compare_rows(labels: Sequence[str], records: Sequence[dict]) -> list[dict]:
    """One row per label, lambda and metric: realigned, retrained and gap, each [estimate, lo, hi]."""
    return [{"label": label, "lam": c["lam"], "beta": c["beta"], "metric": c["metric"], "realigned": c["realigned"],
             "retrained": c["retrained"], "gap": c["gap"], "in_baseline_ci": c["in_baseline_ci"]}
            for label, record in zip(labels, records, strict=True) for c in tested(record)]


def plot_gaps(rows: Sequence[dict], labels: Sequence[str], path: Path) -> Path:
    panels = {}
    for metric in dict.fromkeys(r["metric"] for r in rows):
        panels[metric] = []
        for i, label in enumerate(labels):
            pts = sorted((r for r in rows if r["metric"] == metric and r["label"] == label), key=lambda r: r["lam"])
            if pts:
                panels[metric].append(Series.of(label, [r["lam"] for r in pts], [r["gap"] for r in pts], "o-", f"C{i}"))
    return metric_panels(panels, path, "lambda  (beta = beta0 / lambda)", zero_line=True)


def plot_path_kl(labels: Sequence[str], records: Sequence[dict], path: Path) -> Path:
    series = []
    for i, (label, record) in enumerate(zip(labels, records, strict=True)):
        rows = path_kl_rows(record)
        for arm, fmt in (("realigned", "o-"), ("retrained", "D--")):
            series.append(Series.of(f"{label}: {arm}", [c["lam"] for c in rows], [c[arm] for c in rows], fmt, f"C{i}"))
    return metric_panels({"path KL (nats)": series}, path, "lambda  (beta = beta0 / lambda)",
                         log_y=("path KL (nats)",))


def _num(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _by_label(head: str, keys: Sequence[str], labels: Sequence[str], per_label: Sequence[dict],
              cell: Callable[[dict], str]) -> str:
    """A markdown table: one row per key, one column per label, `cell` of that label's entry ("-" if none)."""
    return markdown_table([head, *labels], [[k, *["-" if d.get(k) is None else cell(d[k]) for d in per_label]]
                                            for k in keys])


def compare_markdown(labels: Sequence[str], folders: Sequence[Path], summaries: Sequence[dict], rows: Sequence[dict],
                     out: Path, has_path_kl: bool) -> str:
    parts = ["# Validations compared", "",
             "Each label is one `deradiff validate` run: a realigned LoRA against its own retrained baselines at "
             "beta0 / lambda, on the same prompts and seeds. Gap = realigned - retrained, paired over prompts.", ""]
    parts += [markdown_table(["label", "evaluation folder", "sweep training (s)"],
                             [[lab, f"`{os.path.relpath(f, out)}`", _num(s["sweep_train_s"], ".0f")]
                              for lab, f, s in zip(labels, folders, summaries, strict=True)]), ""]
    names = list(dict.fromkeys(n for s in summaries for n in s["matching"]))
    if names:
        parts += ["## Matching", "",
                  "Per distance: lambdas whose nearest baseline is the matching one, and the median distance to "
                  "the matching baseline as a fraction of the spacing to its nearer neighbour (lower is closer; "
                  "below 0.5 is nearer its own baseline than halfway to the neighbour).", ""]
        parts += [_by_label("distance", names, labels, [s["matching"] for s in summaries],
                            lambda m: f"{m['accuracy'][0]}/{m['accuracy'][1]}, {_num(m['median_fraction'])}"
                            + ("" if m["large_enough"] else " (unresolved)")), ""]
    metrics = list(dict.fromkeys(m for s in summaries for m in s["metrics"]))
    parts += ["## Gaps per metric", "",
              "Mean |gap| over the tested lambdas (lambda 1 is the aligned LoRA itself), then how many lambdas have "
              "the realigned value inside the retrained value's interval and a gap interval containing 0.", ""]
    parts += [_by_label("metric", metrics, labels, [s["metrics"] for s in summaries],
                        lambda m: f"{m['mean_abs_gap']:.4g} (in CI {m['in_baseline_ci']}/{m['lambdas']}, "
                        f"gap 0 {m['gap_ci_has_zero']}/{m['lambdas']})"), ""]
    if has_path_kl:
        parts += ["## How path KL grows with lambda", "",
                  "Slope of log path KL on log lambda over the validated lambdas. Realignment's drift from the "
                  "reference scales as lambda^2 (slope 2) by construction. The optimal model at beta0 / lambda "
                  "drifts as lambda^2 too while the drift is small (its KL to the reference is about "
                  "Var(r) lambda^2 / (2 beta0^2)), so a retrained slope moving toward 2 is the baselines "
                  "converging toward what realignment emulates, and one that stays put is not.", ""]
        parts += [markdown_table(["label", "realigned slope", "retrained slope"],
                                 [[lab, _num(s["path_kl_slope"]["realigned"]), _num(s["path_kl_slope"]["retrained"])]
                                  for lab, s in zip(labels, summaries, strict=True)]), ""]
        parts += ["![path KL against lambda](path_kl.png)", ""]
    parts += ["## Gap per lambda", "", "![gaps](gaps.png)", ""]
    parts += [markdown_table(["metric", "lambda", *labels],
                             [[metric, f"{lam:g}", *[next((format_estimate(*r["gap"]) for r in rows if r["metric"] == metric
                                                           and r["lam"] == lam and r["label"] == lab), "-")
                                                     for lab in labels]]
                              for metric in metrics for lam in sorted({r["lam"] for r in rows if r["metric"] == metric})]),
              ""]
    parts += ["Tables: [compare.csv](compare.csv), [compare.json](compare.json).", ""]
    return "\n".join(parts)


def build_comparison(folders: Sequence[Path], labels: Sequence[str], out: Path) -> Path:
    """Write report.md, compare.{json,csv}, gaps.png and path_kl.png; returns report.md's path."""
    if len(labels) != len(folders):
        raise UserError(f"--labels gives {len(labels)} names for {len(folders)} --eval folders; give one per folder")
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels must be distinct, got {list(labels)}")
    records = [load_validation(f) for f in folders]
    summaries = [summarize_validation(r) for r in records]
    rows = compare_rows(labels, records)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"labels": list(labels), "folders": [str(f) for f in folders],
                                      "summaries": dict(zip(labels, summaries, strict=True)), "rows": rows})
    write_csv(out / "compare.csv", rows)
    plot_gaps(rows, labels, out / "gaps.png")
    has_path_kl = any(c["metric"] == PATH_KL for r in records for c in r["comparisons"])
    if has_path_kl:
        plot_path_kl(labels, records, out / "path_kl.png")
    return write_text_atomic(out / "report.md", compare_markdown(labels, folders, summaries, rows, out, has_path_kl))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", nargs="+", required=True, metavar="FOLDER",
                   help="evaluation folders, each with a `deradiff validate` record (validation.json)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="one name per folder, in order (default: the folders' names)")
    p.add_argument("--out", required=True, help="folder for report.md, compare.{json,csv}, gaps.png, path_kl.png")


def run(args: argparse.Namespace) -> int:
    folders = [Path(f) for f in args.eval]
    labels = args.labels or [f.name for f in folders]
    path = build_comparison(folders, labels, Path(args.out))
    summary = json.loads((Path(args.out) / "compare.json").read_text())["summaries"]
    for label, s in summary.items():
        primary = s["matching"].get(s["primary"]) if s["primary"] else None
        acc = f"{primary['accuracy'][0]}/{primary['accuracy'][1]}" if primary else "-"
        slope = s["path_kl_slope"]
        print(f"{label}: matching ({s['primary'] or '-'}) {acc}; path-KL slope realigned {_num(slope['realigned'])}, "
              f"retrained {_num(slope['retrained'])}")
    print(f"report -> {path}")
    return 0
