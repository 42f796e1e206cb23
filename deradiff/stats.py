"""Confidence intervals over prompts: a cluster (group) bootstrap shared by metrics and evaluation.

Images generated for the same prompt are not independent (same caption, same difficulty), so
intervals resample whole prompts, not single images.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from deradiff.errors import UserError


class Estimate(NamedTuple):
    """A point estimate with its confidence interval [lo, hi]; unpacks as (value, lo, hi)."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray | torch.Tensor,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Mean of `values` (N,) with a percentile bootstrap interval at level 1 - alpha.

    `groups` (N,) labels each value's cluster (e.g. its prompt); each bootstrap replicate draws
    as many groups as there are, with replacement, and takes the pooled mean of their values (a
    group with more values weighs more, as in the point estimate). None makes every value its
    own group. One group gives a zero-width interval. Deterministic for a fixed `seed`.
    """
    v = (values.detach().cpu().double().numpy() if torch.is_tensor(values)
         else np.asarray(values, dtype=np.float64)).reshape(-1)
    if v.size == 0:
        raise UserError("bootstrap_ci got no values: pass at least one")
    if not np.all(np.isfinite(v)):
        raise UserError(f"bootstrap_ci got {int((~np.isfinite(v)).sum())} non-finite values; drop them first")
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise UserError(f"n_boot must be >= 1, got {n_boot}")
    if groups is None:
        ids = np.arange(v.size)
    else:
        if len(groups) != v.size:
            raise UserError(f"bootstrap_ci: {v.size} values but {len(groups)} group labels")
        _, ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(ids.max()) + 1
    sums = np.bincount(ids, weights=v, minlength=n_groups)
    counts = np.bincount(ids, minlength=n_groups).astype(np.float64)
    # How many times each group is drawn in each replicate: (n_boot, n_groups).
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    replicates = (draws @ sums) / (draws @ counts)
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(v.mean()), float(lo), float(hi))
