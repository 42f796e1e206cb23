"""PNG plots shared by `deradiff report` and `deradiff compare`: one panel per metric, each a few
series of estimates with intervals against lambda."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deradiff.io import atomic_write


@dataclass
class Series:
    """One line of a panel: x (lambda), the estimates y and their interval [lo, hi], all the same length."""

    label: str
    x: list[float]
    y: list[float]
    lo: list[float]
    hi: list[float]
    fmt: str = "o-"
    color: str | None = None

    @classmethod
    def of(cls, label: str, x: Sequence[float], estimates: Sequence[Sequence[float]], fmt: str = "o-",
           color: str | None = None) -> Series:
        """A series from one [estimate, lo, hi] triple per x (the form validation records store)."""
        y, lo, hi = (list(v) for v in zip(*estimates, strict=True)) if estimates else ([], [], [])
        return cls(label, list(x), y, lo, hi, fmt, color)


def save_fig(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG, whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def metric_panels(panels: dict[str, Sequence[Series]], path: Path, xlabel: str, log_x: bool = True,
                  zero_line: bool = False, log_y: Sequence[str] = ()) -> Path:
    """One panel per metric (title = its key), up to 3 per row; each series drawn with error bars
    at its interval. `log_y`: the metrics drawn on a log y axis (their non-positive points dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (metric, series) in zip(axes.flat, panels.items(), strict=False):
        positive = metric in log_y
        for i, s in enumerate(series):
            pts = [p for p in zip(s.x, s.y, s.lo, s.hi, strict=True) if not positive or p[1] > 0]
            if not pts:
                continue
            x, y, lo, hi = map(list, zip(*pts, strict=True))
            # series side by side at each x, so that overlapping intervals stay readable
            shift = (i - (len(series) - 1) / 2) * 0.03
            x = [v * (1 + shift) if log_x else v + shift for v in x]
            ax.errorbar(x, y, yerr=[[max(v - a, 0.0) for v, a in zip(y, lo, strict=True)],
                                    [max(b - v, 0.0) for v, b in zip(y, hi, strict=True)]],
                        fmt=s.fmt, color=s.color, capsize=3, ms=4, label=s.label)
        if zero_line:
            ax.axhline(0.0, color="k", lw=0.8, ls=":")
        if log_x:
            ax.set_xscale("log")
            ticks = sorted({v for s in series for v in s.x if v > 0})
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if positive:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_fig(fig, path)
