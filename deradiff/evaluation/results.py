"""The results table of an evaluation folder, and its aggregation into estimates over prompts.

One JSONL row per image (arm, lam, prompt_id, prompt, seed, image, path_kl, reward/*, fidelity/*,
time_s), keyed by (arm, lam, prompt, seed); later rows replace earlier ones. Aggregation first
averages each prompt's seeds, then bootstraps over prompts (images of one prompt are not
independent): `per_prompt_table` -> `summarize`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from deradiff.errors import UserError
from deradiff.io import write_text_atomic
from deradiff.realign import LambdaSchedule, LambdaVector, is_lambda_vector, parse_lambda, parse_lambda_vector

RESULTS = "results.jsonl"
# the arms of the table: output mixing, the LoRA scaled in weight space, retrained:<run label>
REALIGNED, LORA_SCALE, RETRAINED = "realigned", "lora-scale", "retrained"
SET_METRICS = ("fidelity/kid", "fidelity/diversity_rel")  # per prompt, from all its seeds' images
LOWER_IS_BETTER = ("path_kl", "fidelity/kid")


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON, whole or not at all (keys in their order; unknown types as str)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lam_name(lam: float | str | LambdaSchedule | LambdaVector) -> str:
    """The results-table key of a lambda: a schedule's str, or a vector's canonical string."""
    if is_lambda_vector(lam):
        return str(parse_lambda_vector(lam))
    return str(parse_lambda(lam))


def lam_value(name: str) -> float | None:
    """The constant lambda of a table name, None for a schedule or a lambda vector (the number
    plots and searches sort by; see lam_vector for a vector's values)."""
    if is_lambda_vector(name):
        return None
    schedule = parse_lambda(name)
    return schedule.start if schedule.kind == "constant" else None


def lam_vector(name: str) -> dict[str, float] | None:
    """{adapter: lambda} of a constant lambda-vector table name ("color=1.5,contrast=0.5"); None
    for a scalar, a schedule, or a vector holding a schedule."""
    return parse_lambda_vector(name).constants() if is_lambda_vector(name) else None


def row_key(row: dict) -> tuple:
    return row["arm"], row["lam"], row["prompt"], row["seed"]


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL results file; a torn last line (a crash mid-write) is ignored, any other
    unreadable line is an error. Later rows replace earlier ones with the same key."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows: dict[tuple, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise UserError(f"{path} line {i + 1} is not JSON: the results file is corrupt; "
                            "delete the line (or the file, to resample everything)") from None
        rows[row_key(row)] = row
    return list(rows.values())


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Write a JSONL table, whole or not at all."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-append) so that appended rows start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def merge_shards(out: Path) -> list[dict]:
    """Fold out/shards/*-of-N.jsonl into out/results.jsonl (all N shards must be there)."""
    shards = sorted((out / "shards").glob("*-of-*.jsonl"))
    if not shards:
        raise UserError(f"no shard results in {out / 'shards'}: run `deradiff evaluate --shard i/n --out {out}` first")
    totals = {s.stem.split("-of-")[1] for s in shards}
    if len(totals) != 1:
        raise UserError(f"shards of different splits in {out / 'shards'}: {[s.name for s in shards]}")
    n = int(totals.pop())
    missing = [i for i in range(n) if not (out / "shards" / f"{i}-of-{n}.jsonl").exists()]
    if missing:
        raise UserError(f"shards {missing} of {n} have no results yet in {out / 'shards'}; run them, then merge")
    merged = {row_key(r): r for r in read_rows(out / RESULTS)}
    for shard in shards:
        merged.update({row_key(r): r for r in read_rows(shard)})
    rows = sorted(merged.values(), key=lambda r: (r["arm"], r["lam"], r["prompt_id"], r["seed"]))
    write_rows(out / RESULTS, rows)
    return rows


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard wants i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_prompt_ids(n_prompts: int, shard: tuple[int, int]) -> range:
    """The contiguous prompt-id range of shard (i, n)."""
    i, n = shard
    return range(i * n_prompts // n, (i + 1) * n_prompts // n)


def pil_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL RGB images -> float (B, 3, H, W) in [-1, 1] (the values stored on disk, so scores
    recomputed from the saved PNGs are identical)."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


# -- aggregation: per-prompt values, then estimates over prompts ----------------------------------

Table = dict[tuple[str, str], dict[str, dict[str, float]]]  # (arm, lam) -> metric -> prompt -> value


def metric_names(rows: Sequence[dict]) -> list[str]:
    """Per-image numeric columns present in the rows (rewards, fidelity, path_kl)."""
    names = {k for r in rows for k, v in r.items()
             if (k.startswith(("reward/", "fidelity/")) or k == "path_kl") and v is not None}
    return sorted(names)


def per_prompt_table(rows: Sequence[dict], out: Path | None = None, judge=None) -> Table:
    """Mean over seeds of every per-image metric, per (arm, lam) and prompt; with a judge and
    >= 2 seeds also the per-prompt set metrics KID and relative diversity, from the stored images."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["lam"]), {}).setdefault(r["prompt"], []).append(r)
    names = metric_names(rows)
    table: Table = {}
    for key, by_prompt in groups.items():
        entry: dict[str, dict[str, float]] = {}
        for name in names:
            vals = {p: float(np.mean([r[name] for r in rs])) for p, rs in by_prompt.items()
                    if all(r.get(name) is not None for r in rs)}
            if vals:
                entry[name] = vals
        if judge is not None and out is not None:
            for prompt, rs in by_prompt.items():
                if len(rs) < 2:
                    continue
                from PIL import Image

                images = pil_to_tensor([Image.open(out / r["image"]) for r in rs])
                est = judge.metrics(images, [prompt] * len(rs), n_boot=1)
                for m in SET_METRICS:
                    if math.isfinite(est[m].value):
                        entry.setdefault(m, {})[prompt] = est[m].value
        table[key] = entry
    return table


def summarize(table: Table, n_boot: int = 1000, alpha: float = 0.05) -> list[dict]:
    """One row per (arm, lam): each metric's mean over prompts with a bootstrap interval over
    prompts, as metric, metric_lo, metric_hi; plus n_prompts."""
    from deradiff.stats import bootstrap_ci

    out = []
    for (arm, lam), metrics in sorted(table.items(), key=lambda kv: (kv[0][0], _lam_sort(kv[0][1]))):
        row: dict = {"arm": arm, "lam": lam, "lam_value": lam_value(lam),
                     "n_prompts": max((len(v) for v in metrics.values()), default=0)}
        for name, per_prompt in sorted(metrics.items()):
            est = bootstrap_ci(list(per_prompt.values()), n_boot=n_boot, alpha=alpha)
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = est
        out.append(row)
    return out


def _lam_sort(name: str) -> tuple:
    value = lam_value(name)
    return (0, value, "") if value is not None else (1, 0.0, name)


def format_summary(summary: Sequence[dict], metrics: Sequence[str] | None = None) -> str:
    """A plain-text table: one line per (arm, lam), value [lo, hi] per metric (default: the
    rewards, path_kl, fidelity/adherence and fidelity/kid; summary.json has them all)."""
    if not summary:
        return "(no rows)"
    present = sorted({k for r in summary for k in r if f"{k}_lo" in r})
    metrics = metrics or [m for m in present if m.startswith("reward/") or m in (
        "path_kl", "fidelity/adherence", "fidelity/kid")] or present
    head = f"{'arm':24s} {'lam':>12s}  " + "  ".join(f"{m:>28s}" for m in metrics)
    lines = [head]
    for r in summary:
        cells = [f"{r[m]:.4g} [{r[m + '_lo']:.3g}, {r[m + '_hi']:.3g}]" if m in r else "-" for m in metrics]
        lines.append(f"{r['arm']:24s} {r['lam']:>12s}  " + "  ".join(f"{c:>28s}" for c in cells))
    return "\n".join(lines)


def format_estimate(value, lo=None, hi=None) -> str:
    """A table cell: "-" for None, 4 significant digits, and "[lo, hi]" when an interval is given."""
    if value is None:
        return "-"
    if lo is None:
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{value:.4g} [{lo:.3g}, {hi:.3g}]"
