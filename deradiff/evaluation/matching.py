"""The matching test: among ALL retrained baselines, is the realigned model at lambda_k nearest
to the one trained at beta0 / lambda_k?

    record = match(baselines, realigned, retrained, n_seeds=4)   # part of `deradiff validate`

Each baseline k (trained at beta_k = beta0 / lambda_k) gives one test: the realigned samples at
lambda_k are compared with every baseline's samples, on the same prompts and noise, by
- kid: KID on the fidelity judge's features between the two models' images of each prompt
  (its seeds), paired over seed so shared noise is no false closeness, averaged over prompts
  (deradiff.stats.paired_kid): a distance between distributions; needs >= 2 seeds per prompt;
- every metric (rewards, fidelity, path KL): the paired gap realigned - retrained per prompt;
  its distance is |gap|.
Realignment passes at lambda_k on a distance when the nearest baseline is baseline k (a tie is
no pass); the matching accuracy counts the lambdas that pass. The aligned LoRA itself, given as
a baseline, is a neighbour (a column) but no test (realignment at lambda 1 is it, exactly). The evidence could come out the
other way: a realigned model that drifts like a neighbour fails.

Scale: the distance to baseline k as a fraction of the spacing between baseline k and its
nearer neighbour in lambda (for KID in MMD units, sqrt(KID)); below 1/2 the realigned model is
nearer its own baseline than halfway to the neighbour. Match rate: the share of bootstrap
resamples of the prompts in which baseline k is nearest. Resolution: the width of the interval
of the distance to baseline k against that spacing; the evaluation is large enough when every
width is below its spacing, and intervals narrow as 1/sqrt(n), so the size it would take is n
times (width / spacing)^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from deradiff.stats import estimate, group_draws, paired_kid_blocks

KID = "kid"  # the name of the distribution distance among the metrics' distances


@dataclass
class SampleSet:
    """One arm at one lambda: metric -> prompt -> value (mean over seeds), and each image's
    judge features (D,) keyed by (prompt, seed) (None: no judge with features)."""

    per_prompt: dict[str, dict[str, float]]
    features: dict[tuple[str, int], np.ndarray] | None = None


# -- pure verdicts on distance matrices ------------------------------------------------------------


def nearest_index(distances: Sequence[float], rel_tol: float = 1e-9) -> int | None:
    """Index of the smallest distance, or None when two or more tie for it (no evidence)."""
    d = np.asarray(distances, dtype=np.float64)
    best = float(d.min())
    ties = np.flatnonzero(np.abs(d - best) <= rel_tol * max(1.0, abs(best)))
    return int(ties[0]) if ties.size == 1 else None


def adjacent_spacing(between: np.ndarray) -> np.ndarray:
    """Per baseline k (ordered by lambda), the distance to its nearer neighbour in lambda,
    min(between[k, k-1], between[k, k+1]): (J,). NaN without a neighbour (J = 1)."""
    n = between.shape[0]
    out = np.full(n, np.nan)
    for k in range(n):
        near = [between[k, j] for j in (k - 1, k + 1) if 0 <= j < n and np.isfinite(between[k, j])]
        if near:
            out[k] = min(near)
    return out


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if np.isfinite(den) and den > 0 and np.isfinite(num) else None


def verdict_rows(dist: np.ndarray, boot: np.ndarray, between: np.ndarray, width: np.ndarray,
                 to_distance: Callable[[float], float] = float, matches: Sequence[int] | None = None) -> list[dict]:
    """One verdict per realigned lambda k against baselines j = 0..J-1 (ordered by lambda).

    dist (K, J) distances, row k matching baseline matches[k] (default k); boot (n_boot, K, J)
    their bootstrap replicates; between (J, J) distances between baselines (adjacent ones used);
    width (K,) the interval width of the distance to the matching baseline; to_distance maps a
    distance to the units in which fractions are taken (identity; sqrt for KID). Returns per k:
    nearest (index or None), passed, match_rate, spacing, fraction (distance to the matching
    baseline / spacing), width_over_spacing."""
    spacing = adjacent_spacing(between)
    matches = list(range(dist.shape[0])) if matches is None else list(matches)
    rows = []
    for k, m in enumerate(matches):
        near = nearest_index(dist[k])
        rows.append({
            "nearest": near, "passed": near == m,
            "match_rate": float(np.mean(np.argmin(boot[:, k, :], axis=1) == m)),
            "spacing": None if not np.isfinite(spacing[m]) else float(spacing[m]),
            "fraction": _ratio(to_distance(dist[k, m]), to_distance(spacing[m])) if np.isfinite(spacing[m]) else None,
            "width": float(width[k]),
            "width_over_spacing": _ratio(width[k], spacing[m]),
        })
    return rows


def resolution(ratios: Sequence[float | None], n_prompts: int, n_seeds: int) -> dict:
    """Was the evaluation large enough to resolve adjacent baselines (every interval width below
    its spacing), and what size would be: intervals narrow as 1/sqrt(n), so n grows by the worst
    (width / spacing)^2. None ratios (baselines that do not differ) make it unresolvable."""
    out = {"n_prompts": n_prompts, "n_seeds": n_seeds}
    if not ratios or any(r is None for r in ratios):
        return {**out, "width_over_spacing": None, "large_enough": False, "needed_prompts": None,
                "needed_images": None, "note": "adjacent baselines do not differ on it: no size resolves them"}
    worst = max(ratios)
    factor = max(worst, 1.0) ** 2
    return {**out, "width_over_spacing": float(worst), "large_enough": bool(worst < 1.0),
            "needed_prompts": math.ceil(n_prompts * factor - 1e-9),
            "needed_images": math.ceil(n_prompts * n_seeds * factor - 1e-9)}


# -- the distances --------------------------------------------------------------------------------


def _common_prompts(sets: Sequence[SampleSet], metric: str) -> list[str]:
    keys = [set(s.per_prompt.get(metric, {})) for s in sets]
    return sorted(set.intersection(*keys)) if keys else []


def gap_distances(metric: str, realigned: Sequence[SampleSet], retrained: Sequence[SampleSet], n_boot: int,
                  alpha: float, seed: int = 0) -> dict | None:
    """Paired gaps realigned_k - retrained_j of `metric` per prompt, for all k, j (prompts every set
    has): estimates (K, J) of [value, lo, hi], distances |gap|, their replicates, and the spacing
    |mean_j - mean_l| between baselines. None when no prompt has the metric in every set."""
    prompts = _common_prompts([*realigned, *retrained], metric)
    if not prompts:
        return None
    real = np.array([[s.per_prompt[metric][p] for p in prompts] for s in realigned])  # (K, P)
    base = np.array([[s.per_prompt[metric][p] for p in prompts] for s in retrained])  # (J, P)
    gaps = real[:, None, :] - base[None, :, :]  # (K, J, P)
    draws = group_draws(len(prompts), n_boot, seed)
    boot = np.einsum("bp,kjp->bkj", draws, gaps) / len(prompts)
    point = gaps.mean(-1)
    means = base.mean(1)
    return {"kind": "gap", "n_prompts": len(prompts), "point": point, "boot": boot,
            "between": np.abs(means[:, None] - means[None, :]), "to_distance": float, "abs": True, "alpha": alpha}


def kid_distances(realigned: Sequence[SampleSet], retrained: Sequence[SampleSet], n_boot: int, alpha: float,
                  seed: int = 0) -> dict | None:
    """Per-prompt paired KID (deradiff.stats.paired_kid, within prompts) between realigned_k and
    retrained_j for all k, j, and between adjacent baselines, on the (prompt, seed) pairs every
    set has and the prompts with >= 2 of them; None without features or such prompts."""
    sets = [*realigned, *retrained]
    if any(s.features is None for s in sets):
        return None
    keys = set.intersection(*(set(s.features) for s in sets))
    by_prompt: dict[str, list] = {}
    for key in sorted(keys):
        by_prompt.setdefault(key[0], []).append(key)
    prompts = sorted(p for p, ks in by_prompt.items() if len(ks) >= 2)
    if not prompts:
        return None

    def per_prompt(a: SampleSet, b: SampleSet) -> np.ndarray:
        """(P,) the paired U-statistic of each prompt's seeds."""
        out = np.empty(len(prompts))
        for i, p in enumerate(prompts):
            fx = np.stack([np.asarray(a.features[k], np.float64) for k in by_prompt[p]])
            fy = np.stack([np.asarray(b.features[k], np.float64) for k in by_prompt[p]])
            sums, counts = paired_kid_blocks(fx, fy, np.zeros(len(fx), dtype=int), 1)
            out[i] = sums[0, 0] / counts[0, 0]
        return out

    values = np.stack([np.stack([per_prompt(r, b) for b in retrained]) for r in realigned])  # (K, J, P)
    draws = group_draws(len(prompts), n_boot, seed)
    J = len(retrained)
    between = np.full((J, J), np.nan)
    for j in range(J - 1):
        between[j, j + 1] = between[j + 1, j] = per_prompt(retrained[j], retrained[j + 1]).mean()
    return {"kind": KID, "n_prompts": len(prompts), "n_pairs": sum(len(by_prompt[p]) for p in prompts),
            "point": values.mean(-1), "boot": np.einsum("bp,kjp->bkj", draws, values) / len(prompts),
            "between": between, "to_distance": lambda v: math.sqrt(max(float(v), 0.0)), "abs": False, "alpha": alpha}


def _finish(raw: dict, labels: Sequence[str], lams: Sequence[float], matches: Sequence[int], n_seeds: int) -> dict:
    """Verdicts, accuracy and resolution of one distance, as JSON-ready data."""
    point, boot = raw["point"], raw["boot"]
    ests = [[estimate(point[k, j], boot[:, k, j], raw["alpha"]) for j in range(len(labels))] for k in range(len(matches))]
    width = np.array([ests[k][m].hi - ests[k][m].lo for k, m in enumerate(matches)])
    dist, dboot = (np.abs(point), np.abs(boot)) if raw["abs"] else (point, boot)
    verdicts = verdict_rows(dist, dboot, raw["between"], width, raw["to_distance"], matches)
    rows = []
    for k, (m, v) in enumerate(zip(matches, verdicts, strict=True)):
        rows.append({"lam": lams[m], "baseline": labels[m],
                     "to": {labels[j]: list(ests[k][j]) for j in range(len(labels))},
                     **v, "nearest": None if v["nearest"] is None else labels[v["nearest"]]})
    passed = sum(r["passed"] for r in rows)
    return {"kind": raw["kind"], "n_prompts": raw["n_prompts"], "rows": rows, "accuracy": [passed, len(rows)],
            "resolution": resolution([r["width_over_spacing"] for r in rows], raw["n_prompts"], n_seeds)}


def match(baselines: Sequence[dict], realigned: Sequence[SampleSet | None], retrained: Sequence[SampleSet],
          n_seeds: int, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict | None:
    """The matching record of `baselines` (dicts with label, lam, beta), each with the realigned
    samples at its lambda (None: a neighbour only, not tested, e.g. the aligned LoRA itself, which
    realignment at lambda 1 reproduces exactly) and its own samples, in the same order. None with
    fewer than 2 baselines (every realigned model would be trivially nearest its own) or none tested."""
    if len(baselines) < 2 or all(r is None for r in realigned):
        return None
    order = sorted(range(len(baselines)), key=lambda i: baselines[i]["lam"])
    bases = [baselines[i] for i in order]
    matches = [j for j, i in enumerate(order) if realigned[i] is not None]
    real, base = [realigned[order[j]] for j in matches], [retrained[i] for i in order]
    labels, lams = [b["label"] for b in bases], [float(b["lam"]) for b in bases]
    distances: dict[str, dict] = {}
    raw = kid_distances(real, base, n_boot, alpha, seed)
    if raw is not None:
        distances[KID] = _finish(raw, labels, lams, matches, n_seeds)
    metrics = sorted({m for s in [*real, *base] for m in s.per_prompt})
    for metric in metrics:
        raw = gap_distances(metric, real, base, n_boot, alpha, seed)
        if raw is not None:
            distances[metric] = _finish(raw, labels, lams, matches, n_seeds)
    if not distances:
        return None
    primary = KID if KID in distances else next((m for m in distances if m.startswith("reward/")), next(iter(distances)))
    return {"baselines": [{"label": b["label"], "lam": float(b["lam"]), "beta": b.get("beta"), "tested": j in matches}
                          for j, b in enumerate(bases)],
            "n_seeds": n_seeds, "alpha": alpha, "primary": primary, "accuracy": distances[primary]["accuracy"],
            "distances": distances}


# -- text and markdown -----------------------------------------------------------------------------


def _est(e: Sequence[float]) -> str:
    return f"{e[0]:.4g} [{e[1]:.3g}, {e[2]:.3g}]"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _count(n: int) -> str:
    return f"{n:.2g}" if n >= 100_000 else str(n)


def _size(res: dict) -> str:
    """The size the resolution asks for: 'P prompts x S seeds' (the current one when large enough)."""
    if res["needed_prompts"] is None:
        return "no size: adjacent baselines do not differ on it"
    if res["large_enough"]:
        return f"{res['n_prompts']} prompts x {res['n_seeds']} seeds (as run)"
    return (f"~{_count(res['needed_prompts'])} prompts x {res['n_seeds']} seeds (~{_count(res['needed_images'])} "
            f"images per arm; now {res['n_prompts']} x {res['n_seeds']})")


def verdict_sentence(record: dict) -> str:
    """The headline: matching accuracy on the primary distance and whether the size resolved it."""
    d = record["distances"][record["primary"]]
    passed, total = d["accuracy"]
    res = d["resolution"]
    size = ("large enough to resolve adjacent baselines" if res["large_enough"]
            else "NOT large enough to resolve adjacent baselines (needed: " + _size(res) + ")")
    return (f"matching ({record['primary']}): the nearest baseline is the matching one for {passed}/{total} lambdas; "
            f"the evaluation was {size}")


def format_matching(record: dict) -> str:
    """Plain text for the terminal: the primary distance's matrix, then one line per distance."""
    d = record["distances"][record["primary"]]
    labels = [b["label"] for b in record["baselines"]]
    lines = [f"matching on {record['primary']} (rows: realigned at lambda; columns: baselines)",
             f"{'lam':>7s} " + " ".join(f"{lab:>24s}" for lab in labels) + "  nearest          pass  to-match/spacing"]
    for r in d["rows"]:
        cells = " ".join(f"{_est(r['to'][lab]):>24s}" for lab in labels)
        lines.append(f"{r['lam']:>7g} {cells}  {str(r['nearest']):16s} {'yes' if r['passed'] else 'NO ':4s}  "
                     f"{_num(r['fraction'])}")
    for name, dist in record["distances"].items():
        res = dist["resolution"]
        lines.append(f"{name}: nearest is the matching baseline for {dist['accuracy'][0]}/{dist['accuracy'][1]}; "
                     f"interval width / spacing {_num(res['width_over_spacing'])}: "
                     + ("large enough" if res["large_enough"] else "NOT large enough; needed: " + _size(res)))
    lines.append(verdict_sentence(record))
    return "\n".join(lines)


def matching_markdown(record: dict, table: Callable[[Sequence[str], Sequence[Sequence]], str]) -> list[str]:
    """The report's matching section: the primary distance's matrix, the matrix of each reward's
    paired gap, and a per-distance table of accuracy, spacing fractions and resolution."""
    labels = [b["label"] for b in record["baselines"]]
    level = f"{1 - record['alpha']:.0%}"
    parts = ["### Matching: is the nearest baseline the one trained at beta0 / lambda?", "",
             "Rows: the realigned model at lambda; columns: every retrained baseline, on the same prompts and noise. "
             f"Entries: the distance with its {level} bootstrap interval over prompts (KID: per prompt, between the "
             "two models' images of its seeds on the judge's features, paired over seeds, averaged over prompts; "
             "a metric: the paired gap realigned - retrained), **bold** the nearest. Pass: the nearest is "
             "the matching baseline. 'to match / spacing': the distance to the matching baseline over the distance "
             "between it and its nearer neighbour in lambda (KID in MMD units, sqrt(KID)); below 0.5 is nearer "
             "its own baseline than halfway to the neighbour. 'match rate': share of bootstrap resamples of the "
             "prompts in which the matching baseline is nearest.", "",
             f"**{verdict_sentence(record)}.**", ""]
    shown = [record["primary"]] + [m for m in record["distances"] if m.startswith("reward/") and m != record["primary"]]
    for name in shown:
        d = record["distances"][name]
        body = []
        for r in d["rows"]:
            cells = [f"**{_est(r['to'][lab])}**" if lab == r["nearest"] else _est(r["to"][lab]) for lab in labels]
            body.append([f"{r['lam']:g}", *cells, r["nearest"] or "tie", "yes" if r["passed"] else "**no**",
                         _num(r["fraction"]), _num(r["match_rate"])])
        parts += [f"{name} ({'paired KID' if d['kind'] == KID else 'paired gap'}, {d['n_prompts']} prompts); "
                  f"accuracy {d['accuracy'][0]}/{d['accuracy'][1]}:", "",
                  table(["lambda", *[f"vs {lab}" for lab in labels], "nearest", "pass", "to match / spacing",
                         "match rate"], body), ""]
    parts += ["Every distance: matching accuracy, the distance to the matching baseline as a fraction of the "
              "spacing per lambda, and whether the evaluation was large enough (the interval of the distance to "
              "the matching baseline narrower than the spacing, for every lambda; the size needed scales the "
              "prompts by (width / spacing)^2):", ""]
    body = []
    for name, d in record["distances"].items():
        res = d["resolution"]
        body.append([name, f"{d['accuracy'][0]}/{d['accuracy'][1]}", ", ".join(_num(r["fraction"]) for r in d["rows"]),
                     ", ".join(_num(r["width_over_spacing"]) for r in d["rows"]),
                     "yes" if res["large_enough"] else "**no**", _size(res)])
    parts += [table(["distance", "nearest is matching", "to match / spacing (per lambda)",
                     "interval width / spacing (per lambda)", "large enough", "size needed"], body), ""]
    return parts
