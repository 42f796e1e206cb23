"""`deradiff report`: one report.md with tables (markdown, CSV, JSON) and plots (PNG) of an evaluation folder.

    deradiff report --eval runs/eval            # writes runs/eval/report/

Reads what evaluate / search / validate / adapt left in the folder (results.jsonl, config.json,
commands.txt, search.json, validation.json, adapt.json) and writes:
  report.md                 what was run, the chosen lambda, the validation verdicts, the per-prompt
                            (adaptive) lambda against the single one, the tables
  summary.{csv,json}        per arm and lambda: every metric's mean over prompts with its interval
  validation.{csv,json}     per baseline and metric: realigned, retrained, gap (if validated)
  matching.csv              the matching test: per distance (KID, each metric), realigned lambda
                            and baseline, the distance with its interval, nearest and pass
  reward_vs_lambda.png      each reward against lambda: realigned (band = interval), weight
                            scaling, retrained baselines as points, the chosen lambda
  frontier.png              reward against a fidelity metric (or path KL): the trade-off curve
  validation.png            every validated metric against lambda: realigned, retrained (and the
                            weight-scaled LoRA), each with its interval (if validated)
  pareto.png                lambda vectors (named LoRAs): each evaluated vector as a point in
                            (reward A, reward B) with intervals, the non-dominated ones joined and
                            labelled, LoRAs retrained on weighted rewards as distinct markers;
                            the front as a table in report.md (--pareto-x / --pareto-y)
  grid.png                  prompts x lambda, first seed, realigned
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from deradiff.errors import UserError
from deradiff.evaluation.adapt import ADAPT, adapt_markdown
from deradiff.evaluation.config import CONFIG, load_saved_config, parse_reward_spec
from deradiff.evaluation.plots import Series, metric_panels, save_fig
from deradiff.evaluation.results import (
    LORA_SCALE,
    LOWER_IS_BETTER,
    REALIGNED,
    RESULTS,
    format_estimate,
    format_summary,
    lam_value,
    lam_vector,
    markdown_table,
    per_prompt_table,
    read_rows,
    summarize,
    write_json,
)
from deradiff.evaluation.validate import validation_markdown
from deradiff.io import atomic_write, write_text_atomic

MAX_GRID_PROMPTS = 6




def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def _series(summary: Sequence[dict], arm: str, metric: str) -> tuple[list[float], list[float], list[float], list[float]]:
    pts = sorted((r["lam_value"], r[metric], r[f"{metric}_lo"], r[f"{metric}_hi"]) for r in summary
                 if r["arm"] == arm and r["lam_value"] is not None and metric in r)
    return tuple(map(list, zip(*pts, strict=True))) if pts else ([], [], [], [])  # type: ignore[return-value]


def plot_reward_vs_lambda(summary: Sequence[dict], rewards: Sequence[str], path: Path, chosen: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], rewards, strict=True):
        lam, v, lo, hi = _series(summary, REALIGNED, metric)
        ax.plot(lam, v, "o-", color="C0", label="realigned (output mixing)")
        ax.fill_between(lam, lo, hi, color="C0", alpha=0.2)
        lam, v, lo, hi = _series(summary, LORA_SCALE, metric)
        if lam:
            ax.plot(lam, v, "s--", color="C1", label="LoRA scale = lambda (weight space)")
            ax.fill_between(lam, lo, hi, color="C1", alpha=0.12)
        retrained = [r for r in summary if r["arm"].startswith("retrained:") and metric in r]
        if retrained:
            ax.errorbar([r["lam_value"] for r in retrained], [r[metric] for r in retrained],
                        yerr=[[r[metric] - r[f"{metric}_lo"] for r in retrained],
                              [r[f"{metric}_hi"] - r[metric] for r in retrained]],
                        fmt="D", color="C3", capsize=4, label="retrained at beta0 / lambda")
        if chosen is not None:
            ax.axvline(chosen, color="k", ls=":", lw=1, label=f"search: lambda = {chosen:g}")
        ax.set_xlabel("lambda  (beta = beta0 / lambda)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path)


def plot_frontier(summary: Sequence[dict], reward: str, x_metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    styles = {REALIGNED: ("o-", "C0", "realigned"), LORA_SCALE: ("s--", "C1", "LoRA scale = lambda")}
    for arm, (fmt, color, label) in styles.items():
        pts = sorted((r["lam_value"], r[x_metric], r[reward]) for r in summary
                     if r["arm"] == arm and r["lam_value"] is not None and x_metric in r and reward in r)
        if not pts:
            continue
        ax.plot([p[1] for p in pts], [p[2] for p in pts], fmt, color=color, label=label)
        if arm == REALIGNED:
            for lam, x, y in pts:
                ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    retrained = [r for r in summary if r["arm"].startswith("retrained:") and x_metric in r and reward in r]
    for r in retrained:
        ax.errorbar(r[x_metric], r[reward], xerr=[[r[x_metric] - r[f"{x_metric}_lo"]], [r[f"{x_metric}_hi"] - r[x_metric]]],
                    yerr=[[r[reward] - r[f"{reward}_lo"]], [r[f"{reward}_hi"] - r[reward]]], fmt="D", color="C3", capsize=3)
        ax.annotate(f"{r['lam_value']:g}", (r[x_metric], r[reward]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="C3")
    if retrained:
        ax.plot([], [], "D", color="C3", label="retrained (label: lambda)")
    ax.set_xlabel(x_metric + ("  (lower = closer to the prior)" if x_metric in LOWER_IS_BETTER else ""))
    ax.set_ylabel(reward)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path)


def plot_validation(record: dict, path: Path) -> Path | None:
    """validation.png: one panel per metric, the realigned model and the retrained baselines against
    lambda (= beta0 / beta), each with its interval; None for a record without scalar comparisons."""
    comps = record.get("comparisons", [])
    if record.get("kind") == "vector" or not comps:  # vectors have no lambda axis (pareto.png shows them)
        return None
    panels = {}
    for metric in dict.fromkeys(c["metric"] for c in comps):
        rows = sorted((c for c in comps if c["metric"] == metric), key=lambda c: c["lam"])
        lams = [c["lam"] for c in rows]
        panels[metric] = [Series.of("realigned", lams, [c["realigned"] for c in rows], "o-", "C0"),
                          Series.of("retrained at beta0 / lambda", lams, [c["retrained"] for c in rows], "D--", "C3")]
        if all("lora_scale" in c for c in rows):
            panels[metric].append(Series.of("LoRA scale = lambda", lams, [c["lora_scale"] for c in rows], "s:", "C1"))
    return metric_panels(panels, path, "lambda  (beta = beta0 / lambda)", log_y=("path_kl",))


def image_grid(rows: Sequence[dict], eval_dir: Path, path: Path) -> Path | None:
    """Prompts (up to MAX_GRID_PROMPTS) x realigned constant lambdas (else constant lambda vectors,
    by the sum of their lambdas), first seed."""
    from PIL import Image

    from deradiff.grids import save_image_grid

    def by_total(name: str) -> tuple:
        return sum(lam_vector(name).values()), name

    mine = [r for r in rows if r["arm"] == REALIGNED and r["lam_value"] is not None]
    key = lam_value
    if not mine:
        mine = [r for r in rows if r["arm"] == REALIGNED and lam_vector(r["lam"]) is not None]
        key = by_total
    if not mine:
        return None
    seed = min(r["seed"] for r in mine)
    lams = sorted({r["lam"] for r in mine}, key=key)
    prompts = sorted({(r["prompt_id"], r["prompt"]) for r in mine})[:MAX_GRID_PROMPTS]
    cells = {(r["prompt"], r["lam"]): r["image"] for r in mine if r["seed"] == seed}
    blank = Image.new("RGB", (8, 8), "white")
    grid = [[Image.open(eval_dir / cells[(p, lam)]) if (p, lam) in cells else blank for lam in lams] for _, p in prompts]
    labels = [f"p{i} {p[:28]}" + ("..." if len(p) > 28 else "") for i, p in prompts]
    if key is by_total:  # a vector's values in adapter-name order (the report names the order)
        columns = [" / ".join(f"{v:g}" for _, v in sorted(lam_vector(lam).items())) for lam in lams]
    else:
        columns = [f"lam={lam}" for lam in lams]
    return save_image_grid(grid, path, row_labels=labels, col_labels=columns)


# -- lambda vectors: the Pareto front and the vector search -----------------------------------------


def pareto_front(points: Sequence[dict], x: str, y: str) -> list[int]:
    """Indices of the non-dominated points (dicts with metrics x and y), sorted by x: a point is
    dominated when another is at least as good on both and better on one; better is higher,
    lower for LOWER_IS_BETTER metrics (path KL, KID)."""
    sign = {m: -1.0 if m in LOWER_IS_BETTER else 1.0 for m in (x, y)}
    vals = [(sign[x] * p[x], sign[y] * p[y]) for p in points]
    front = [i for i, (a, b) in enumerate(vals)
             if not any(c >= a and d >= b and (c > a or d > b) for c, d in vals)]
    return sorted(front, key=lambda i: points[i][x])


def pareto_axes(metrics: Sequence[str], cfg, pareto_x: str | None, pareto_y: str | None) -> tuple[str, str] | None:
    """The (x, y) metrics of the Pareto plot: the given ones (UserError when not measured), else the
    first two rewards in the order evaluated (None when there are fewer than two)."""
    for flag, name in (("--pareto-x", pareto_x), ("--pareto-y", pareto_y)):
        if name is not None and name not in metrics:
            raise UserError(f"{flag} {name!r} is not measured here; choose from {list(metrics)}")
    order = [f"reward/{parse_reward_spec(spec)[0]}" for spec in cfg.rewards] if cfg is not None else []
    rewards = [m for m in order if m in metrics] + [m for m in metrics if m.startswith("reward/") and m not in order]
    x = pareto_x or next((m for m in rewards if m != pareto_y), None)
    y = pareto_y or next((m for m in rewards if m != x), None)
    return (x, y) if x and y and x != y else None


def plot_pareto(points: Sequence[dict], retrained: Sequence[dict], x: str, y: str, path: Path) -> Path:
    """Every lambda vector (summary rows of the realigned arm) at (x, y) with its intervals as error
    bars, the non-dominated ones joined and labelled with their vector; retrained rows (arm
    retrained:<label>, lam = the vector that emulates them) as diamonds, each joined by a dotted
    line to the realigned point at its vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(rows, fmt, **kw):
        ax.errorbar([r[x] for r in rows], [r[y] for r in rows],
                    xerr=[[r[x] - r[f"{x}_lo"] for r in rows], [r[f"{x}_hi"] - r[x] for r in rows]],
                    yerr=[[r[y] - r[f"{y}_lo"] for r in rows], [r[f"{y}_hi"] - r[y] for r in rows]],
                    fmt=fmt, capsize=3, **kw)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    front = [points[i] for i in pareto_front(points, x, y)]
    bars(points, "o", color="C0", alpha=0.45, ms=4, lw=0.8, label="realigned lambda vector")
    ax.plot([r[x] for r in front], [r[y] for r in front], "-o", color="C0", lw=1.5, label="Pareto front (realigned)")
    middle = (min(r[x] for r in points) + max(r[x] for r in points)) / 2
    for r in front:  # labels point inwards, so the right-most ones stay inside the figure
        right = r[x] > middle
        ax.annotate(r["lam"], (r[x], r[y]), textcoords="offset points", xytext=(-4 if right else 4, 4),
                    ha="right" if right else "left", fontsize=6.5)
    by_lam = {r["lam"]: r for r in points}
    if retrained:
        bars(retrained, "D", color="C3", ms=6, elinewidth=0.8, alpha=0.8, label="retrained on a weighted reward")
    for r in retrained:
        ax.annotate(r["arm"].split(":", 1)[1], (r[x], r[y]), textcoords="offset points", xytext=(4, -11),
                    fontsize=6.5, color="C3")
        twin = by_lam.get(r["lam"])
        if twin is not None:
            ax.plot([r[x], twin[x]], [r[y], twin[y]], ":", color="C3", lw=1)
    ax.set_xlabel(x + ("  (lower is better)" if x in LOWER_IS_BETTER else ""))
    ax.set_ylabel(y + ("  (lower is better)" if y in LOWER_IS_BETTER else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path)


def pareto_section(summary: Sequence[dict], metrics: Sequence[str], cfg, path: Path,
                   pareto_x: str | None = None, pareto_y: str | None = None) -> list[str] | None:
    """Draw pareto.png and return the report's "Pareto front" section, when the folder holds
    realigned lambda-vector rows measured on two metrics (else None, nothing drawn)."""
    axes = pareto_axes(metrics, cfg, pareto_x, pareto_y)
    vectors = [r for r in summary if lam_vector(r["lam"]) is not None]
    if axes is None or not vectors:
        return None
    x, y = axes
    has = [r for r in vectors if all(k in r for k in (x, f"{x}_lo", y, f"{y}_lo"))]
    points = [r for r in has if r["arm"] == REALIGNED]
    retrained = [r for r in has if r["arm"].startswith("retrained:")]
    if not points:
        return None
    plot_pareto(points, retrained, x, y, path)
    extra = [m for m in ("path_kl", "fidelity/adherence", "fidelity/kid") if m in metrics and m not in axes]
    front = [points[i] for i in pareto_front(points, x, y)]

    def cells(r):
        return [format_estimate(r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")) for m in (x, y, *extra)]

    parts = ["## Pareto front over lambda vectors", "",
             f"{len(points)} lambda vectors, {len(front)} non-dominated in ({x}, {y}) "
             "(higher is better unless noted; intervals: bootstrap over prompts)."
             + (" Diamonds: LoRAs retrained on weighted rewards, joined to the vector that emulates them." if retrained else ""),
             "", f"![Pareto front]({path.name})", "",
             markdown_table(["vector", *(x, y, *extra)], [[r["lam"], *cells(r)] for r in front]), ""]
    if retrained:
        parts += [markdown_table(["retrained", "emulating vector", *(x, y, *extra)],
                                 [[r["arm"].split(":", 1)[1], r["lam"], *cells(r)] for r in retrained]), ""]
    return parts


def vector_search_markdown(search: dict) -> list[str]:
    """The report's section of a search over lambda vectors (search.json "kind": "vector")."""
    cost = search["cost"]
    interval = ", ".join(f"{a} [{lo:g}, {hi:g}]" for a, (lo, hi) in search["lambda_interval"].items())
    emulates = search.get("emulates")
    parts = ["## Search over lambda vectors", "", f"Objective: {search['objective']}.", "",
             f"Chosen vector **{search['chosen']}** (bootstrap intervals over prompts: {interval})"
             + (", emulating training on " + " + ".join(f"{w:.4g} {r}" for r, w in emulates["weights"].items())
                + f" at beta = {emulates['beta']:.4g}" if emulates else "")
             + f". Budgets held in {search.get('budget_met_rate', 0):.0%} of the bootstrap resamples. Cost: "
             f"{cost['images']} images at {cost['lambdas']} vectors, {cost['sample_s']:.1f} s of sampling "
             "(no refinement between grid points).", ""]
    if search.get("at_grid_edge"):
        parts += [f"Note: {', '.join(search['at_grid_edge'])} at the edge of its grid values; the optimum may lie beyond.", ""]
    cols = [m for m in search["evaluated"][0] if m not in ("lam", "vector", "objective", "emulated_weights")]
    parts += [markdown_table(["vector", "objective", *cols],
                             [[p["lam"], format_estimate(p["objective"]), *[format_estimate(p[c]) for c in cols]]
                              for p in search["evaluated"]]), ""]
    return parts


def matching_rows(matching: dict) -> list[dict]:
    """One CSV row per distance, realigned lambda and baseline: the distance with its interval,
    and whether that baseline is the matching one and the nearest."""
    rows = []
    for name, d in matching["distances"].items():
        for r in d["rows"]:
            for label, (value, lo, hi) in r["to"].items():
                rows.append({"distance": name, "kind": d["kind"], "lam": r["lam"], "baseline": label, "value": value,
                             "lo": lo, "hi": hi, "matching": label == r["baseline"], "nearest": label == r["nearest"],
                             "passed": r["passed"], "fraction": r["fraction"], "match_rate": r["match_rate"]})
    return rows


def build_report(eval_dir: Path, out: Path, n_boot: int = 1000, alpha: float = 0.05, frontier_x: str | None = None,
                 pareto_x: str | None = None, pareto_y: str | None = None) -> Path:
    """Write every table, plot and report.md for an evaluation folder; returns report.md's path."""
    rows = read_rows(eval_dir / RESULTS)
    if not rows:
        hint = " (shard results? run `deradiff evaluate --merge`)" if (eval_dir / "shards").exists() else ""
        raise UserError(f"no results in {eval_dir / RESULTS}{hint}: run `deradiff evaluate --out {eval_dir}` first")
    cfg = load_saved_config(eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = cfg.load_judge() if cfg is not None else None
    summary = summarize(per_prompt_table(rows, eval_dir, judge), n_boot, alpha)
    write_json(out / "summary.json", summary)
    write_csv(out / "summary.csv", summary)
    search = json.loads((eval_dir / "search.json").read_text()) if (eval_dir / "search.json").exists() else None
    validation = json.loads((eval_dir / "validation.json").read_text()) if (eval_dir / "validation.json").exists() else None
    metrics = sorted({k for r in summary for k in r if f"{k}_lo" in r})
    rewards = [m for m in metrics if m.startswith("reward/")] or metrics[:1]
    if frontier_x and frontier_x not in metrics:
        raise UserError(f"--frontier-x {frontier_x!r} is not measured here; choose from {metrics}")
    x_metric = frontier_x or next((m for m in ("fidelity/adherence", "fidelity/kid", "path_kl") if m in metrics), None)
    chosen = search["chosen_lambda"] if search else None
    scalar = any(r["lam_value"] is not None for r in summary)  # a folder of lambda vectors has no lambda axis
    if scalar:
        plot_reward_vs_lambda(summary, rewards, out / "reward_vs_lambda.png", chosen)
    if x_metric and rewards and scalar:
        plot_frontier(summary, rewards[0], x_metric, out / "frontier.png")
    pareto = pareto_section(summary, metrics, cfg, out / "pareto.png", pareto_x, pareto_y)
    grid = image_grid(rows, eval_dir, out / "grid.png")
    has_validation_plot = bool(validation) and plot_validation(validation, out / "validation.png") is not None
    adapt = json.loads((eval_dir / ADAPT).read_text()) if (eval_dir / ADAPT).exists() else None
    md = _markdown(eval_dir, out, cfg, summary, metrics, search, validation, x_metric if scalar else None,
                   grid is not None, adapt, scalar=scalar, pareto=pareto, validation_plot=has_validation_plot)
    if validation:
        write_json(out / "validation.json", validation)
        write_csv(out / "validation.csv", validation["comparisons"])
        if validation.get("matching"):
            write_csv(out / "matching.csv", matching_rows(validation["matching"]))
    return write_text_atomic(out / "report.md", md)


def _markdown(eval_dir, out, cfg, summary, metrics, search, validation, x_metric, has_grid, adapt=None,
              scalar: bool = True, pareto: list[str] | None = None, validation_plot: bool = False) -> str:
    rel = os.path.relpath(eval_dir, out)
    parts = ["# DeRaDiff evaluation report", ""]
    if cfg is not None:
        lora = (", ".join(f"`{n}` = `{p}`" for n, p in cfg.loras.items()) if cfg.loras else f"`{cfg.lora}`")
        parts += [f"Evaluation folder `{eval_dir}`: pipeline `{cfg.pipeline}`, "
                  f"{'named LoRAs ' if cfg.loras else 'aligned LoRA '}{lora}"
                  + (f" (beta0 = {cfg.beta0:g})" if cfg.beta0 else "") + f", {len(cfg.prompts)} prompts x "
                  f"{len(cfg.seeds)} seeds, rewards {', '.join(cfg.rewards)}, sampler "
                  f"{cfg.scheduler or 'pipeline default'} (steps {cfg.steps or 'default'}, guidance "
                  f"{cfg.guidance if cfg.guidance is not None else 'default'}, eta {cfg.eta:g}"
                  + (f", noise level {cfg.noise_level:g}" if cfg.noise_level is not None else "") + ").", ""]
    commands = eval_dir / "commands.txt"
    if commands.exists():
        parts += ["## Commands", "", "```", commands.read_text().strip(), "```", ""]
    if search and search.get("kind") == "vector":
        parts += vector_search_markdown(search)
    elif search:
        lo, hi = search["lambda_interval"]
        beta = search.get("equivalent_beta")
        cost = search["cost"]
        parts += ["## Search", "", f"Objective: {search['objective']}.", "",
                  f"Chosen lambda **{search['chosen_lambda']:g}** (bootstrap interval over prompts [{lo:g}, {hi:g}])"
                  + (f", equivalent to training at beta = beta0 / lambda = **{beta:.4g}**" if beta else "") + ". "
                  f"Cost: {cost['images']} images at {cost['lambdas']} lambdas, {cost['sample_s']:.1f} s of sampling.", ""]
        if search.get("max_path_kl") is not None:
            kl = next((p.get("path_kl") for p in search["evaluated"] if p["lam"] == search["chosen_lambda"]), None)
            parts += [f"Path-KL budget: {search['max_path_kl']:g} nats per sample; the chosen lambda's mean path KL is "
                      f"{format_estimate(kl)} nats, and the budget held in {search.get('budget_met_rate', 0):.0%} of the "
                      "bootstrap resamples of the prompts.", ""]
        cols = [m for m in search["evaluated"][0] if m not in ("lam", "objective")]
        parts += [markdown_table(["lambda", "objective", *cols],
                                 [[f"{p['lam']:g}", format_estimate(p["objective"]), *[format_estimate(p[c]) for c in cols]]
                                  for p in search["evaluated"]]), ""]
    if validation:
        parts += validation_markdown(validation)
    parts += pareto or []
    if adapt:
        parts += adapt_markdown(adapt)
    parts += ["## Metrics per arm and lambda", "",
              "Mean over prompts (each prompt's mean over seeds) [bootstrap interval over prompts]. Arms: realigned "
              "(output mixing), lora-scale (weight space), retrained:<run>.", ""]
    parts += [markdown_table(["arm", "lambda", *metrics],
                             [[r["arm"], r["lam"], *[format_estimate(r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")) for m in metrics]]
                              for r in summary]), ""]
    if scalar or x_metric or has_grid or validation_plot:
        parts += ["## Plots", ""] + (["![reward vs lambda](reward_vs_lambda.png)", ""] if scalar else [])
    if x_metric:
        parts += [f"![reward / {x_metric} frontier](frontier.png)", ""]
    if validation_plot:
        parts += ["Every validated metric against lambda: the realigned model and the baselines retrained at "
                  "beta0 / lambda, with their intervals (path KL on a log scale):", "",
                  "![realigned vs retrained](validation.png)", ""]
    if has_grid:
        axis = (f"lambda vector ({' / '.join(sorted(cfg.loras))})" if cfg is not None and cfg.loras and not scalar
                else "lambda")
        parts += [f"Realigned samples, prompts x {axis} (first seed):", "", "![grid](grid.png)", ""]
    parts += ["Tables: [summary.csv](summary.csv), [summary.json](summary.json)"
              + (", [validation.csv](validation.csv), [validation.json](validation.json)" if validation else "")
              + (", [matching.csv](matching.csv)" if validation and validation.get("matching") else "")
              + f". Images: `{rel}/images/`.", ""]
    return "\n".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="evaluation folder written by evaluate / search / validate")
    p.add_argument("--out", default=None, help="report folder (default: EVAL/report)")
    p.add_argument("--frontier-x", default=None, help="x metric of the frontier plot "
                   "(default: fidelity/adherence, else fidelity/kid, else path_kl)")
    p.add_argument("--pareto-x", default=None, metavar="METRIC", help="x metric of the Pareto plot of lambda vectors "
                   "(default: the first reward evaluated, e.g. reward/toy)")
    p.add_argument("--pareto-y", default=None, metavar="METRIC", help="y metric of the Pareto plot of lambda vectors "
                   "(default: the second reward evaluated, e.g. reward/toy_contrast)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates over prompts")
    p.add_argument("--alpha", type=float, default=0.05, help="intervals at level 1 - alpha")


def run(args: argparse.Namespace) -> int:
    eval_dir = Path(args.eval)
    if not (eval_dir / CONFIG).exists() and not (eval_dir / RESULTS).exists():
        raise UserError(f"{eval_dir} is not an evaluation folder (no {CONFIG} / {RESULTS})")
    out = Path(args.out) if args.out else eval_dir / "report"
    path = build_report(eval_dir, out, args.n_boot, args.alpha, args.frontier_x, args.pareto_x, args.pareto_y)
    print(format_summary(json.loads((out / "summary.json").read_text())))
    print(f"report -> {path}")
    return 0
