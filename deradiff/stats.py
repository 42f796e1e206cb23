"""Confidence intervals over prompts: a cluster (group) bootstrap shared by metrics and evaluation.

Images generated for the same prompt are not independent (same caption, same difficulty), so
intervals resample whole prompts, not single images.

    bootstrap_ci(values, groups)          # a mean over prompts with its interval
    paired_kid(fx, fy, groups)            # KID between two paired sample sets per prompt, interval over prompts
    draws = group_draws(n_groups, 1000)   # one resample of the prompts shared by several statistics
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
    draws = group_draws(n_groups, n_boot, seed)
    replicates = (draws @ sums) / (draws @ counts)
    return estimate(float(v.mean()), replicates, alpha)


def group_draws(n_groups: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """How many times each group is drawn in each bootstrap replicate: (n_boot, n_groups) counts
    summing to n_groups per row. The same `seed` gives the same draws (bootstrap_ci's)."""
    return np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)


def estimate(value: float, replicates: np.ndarray, alpha: float = 0.05) -> Estimate:
    """`value` with the percentile interval [alpha / 2, 1 - alpha / 2] of its bootstrap `replicates`."""
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(value), float(lo), float(hi))


def kid_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    """KID's cubic polynomial kernel k(a, b) = (a . b / D + coef) ** degree between the rows of
    x (m, D) and y (n, D): (m, n)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def paired_kid_blocks(fx: np.ndarray, fy: np.ndarray, ids: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of groups (p, q): the sum of the paired MMD^2 kernel h over pairs of samples i in
    p, j in q, i != j, and how many such pairs: two (n_groups, n_groups) arrays.

    fx, fy (n, D): features of two sample sets whose row i is one pair (the same prompt and noise
    in both sets); ids (n,) each pair's group in [0, n_groups). h(z_i, z_j) = k(x_i, x_j) +
    k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i) leaves out k(x_i, y_i), so the U-statistic stays
    unbiased when x_i and y_i are dependent (Gretton et al. 2012, JMLR, Lemma 6)."""
    fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
    kxy = kid_kernel(fx, fy)
    h = kid_kernel(fx, fx) + kid_kernel(fy, fy) - kxy - kxy.T
    np.fill_diagonal(h, 0.0)
    onehot = np.zeros((ids.size, n_groups))
    onehot[np.arange(ids.size), ids] = 1.0
    sizes = onehot.sum(0)
    return onehot.T @ h @ onehot, np.outer(sizes, sizes) - np.diag(sizes)


def block_replicates(sums: np.ndarray, counts: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Bootstrap replicates (n_boot,) of a U-statistic from its group-pair block sums and counts
    (n_groups, n_groups): pairs of groups weigh by the product of their draw counts (pairs of a
    sample with its own copy are left out)."""
    num = np.einsum("bp,pq,bq->b", draws, sums, draws)
    den = np.einsum("bp,pq,bq->b", draws, counts, draws)
    return num / np.maximum(den, 1e-300)


def paired_kid(fx: np.ndarray | torch.Tensor, fy: np.ndarray | torch.Tensor, groups: Sequence[Hashable],
               n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, within_groups: bool = True) -> Estimate:
    """KID (unbiased MMD^2 with KID's kernel) between two paired sample sets, with a bootstrap
    interval over groups (prompts).

    fx, fy (n, D): features, row i of both from the same prompt and noise; groups (n,) each
    row's prompt. within_groups (default): per prompt, the U-statistic over that prompt's pairs
    (its seeds), averaged over the prompts with >= 2 pairs: a distance between the two models'
    images of the same prompt. False: one U-statistic over all pairs (the prompt mixtures).
    About 0 (it can be slightly negative) when both sets come from the same distribution; in the
    features' squared units."""
    fx, fy = (np.asarray(f.detach().cpu().double() if torch.is_tensor(f) else f, np.float64) for f in (fx, fy))
    if fx.shape != fy.shape or fx.ndim != 2 or fx.shape[0] < 2:
        raise UserError(f"paired_kid needs two (n, D) feature sets of the same shape, n >= 2; got {fx.shape}, {fy.shape}")
    if len(groups) != fx.shape[0]:
        raise UserError(f"paired_kid: {fx.shape[0]} pairs but {len(groups)} group labels")
    _, ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(ids.max()) + 1
    sums, counts = paired_kid_blocks(fx, fy, ids, n_groups)
    if not within_groups:
        draws = group_draws(n_groups, n_boot, seed)
        return estimate(sums.sum() / counts.sum(), block_replicates(sums, counts, draws), alpha)
    per_group = within_group_values(sums, counts)
    per_group = per_group[np.isfinite(per_group)]
    if per_group.size == 0:
        raise UserError("paired_kid within groups needs a group with >= 2 pairs (>= 2 seeds per prompt)")
    draws = group_draws(per_group.size, n_boot, seed)
    return estimate(per_group.mean(), draws @ per_group / per_group.size, alpha)


def within_group_values(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per group, its own U-statistic from block sums and counts (n_groups, n_groups): the
    diagonal blocks, (n_groups,); NaN for a group with < 2 samples."""
    diag = np.diag(counts)
    return np.where(diag > 0, np.diag(sums) / np.maximum(diag, 1), np.nan)
