"""bootstrap_ci: a cluster bootstrap over prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deradiff.errors import UserError
from deradiff.stats import Estimate, bootstrap_ci


def _grouped(n_groups: int, per_group: int = 4, seed: int = 0):
    """Values with a per-group effect (so groups matter) around 0.5."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    # evenly spread normal quantiles: the spread between prompts is the same at every n_groups
    effects = rng.permutation(norm.ppf((np.arange(n_groups) + 0.5) / n_groups) * 0.2)
    values = (0.5 + effects[:, None] + rng.normal(0, 0.05, (n_groups, per_group))).ravel()
    groups = np.repeat([f"prompt {g}" for g in range(n_groups)], per_group)
    return values, list(groups)


def test_contains_point_estimate_and_is_deterministic():
    values, groups = _grouped(20)
    est = bootstrap_ci(values, groups, n_boot=500, seed=3)
    assert isinstance(est, Estimate)
    assert est.value == pytest.approx(values.mean())
    assert est.lo < est.value < est.hi
    assert bootstrap_ci(values, groups, n_boot=500, seed=3) == est
    assert bootstrap_ci(values, groups, n_boot=500, seed=4) != est


def test_narrows_with_more_prompts():
    widths = []
    for n_groups in (8, 32, 128):
        values, groups = _grouped(n_groups, seed=n_groups)
        est = bootstrap_ci(values, groups, n_boot=2000)
        widths.append(est.hi - est.lo)
    assert widths[0] > 1.5 * widths[1] > 1.5 * 1.5 * widths[2]


def test_resamples_groups_not_values():
    """Correlated values within a prompt: the group bootstrap is wider than the naive one."""
    values, groups = _grouped(10, per_group=20)
    naive = bootstrap_ci(values, None, n_boot=2000)
    grouped = bootstrap_ci(values, groups, n_boot=2000)
    assert (grouped.hi - grouped.lo) > 2 * (naive.hi - naive.lo)


def test_level_and_inputs():
    values, groups = _grouped(30)
    wide, narrow = bootstrap_ci(values, groups, alpha=0.01), bootstrap_ci(values, groups, alpha=0.3)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi
    assert bootstrap_ci(torch.tensor(values), groups) == bootstrap_ci(values, groups)
    one = bootstrap_ci([1.0, 2.0, 3.0], ["p", "p", "p"])
    assert one == Estimate(2.0, 2.0, 2.0)  # one prompt: nothing to resample
    assert tuple(bootstrap_ci([1.0, 1.0])) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(values=[]), "no values"),
        (dict(values=[1.0, float("nan")]), "non-finite"),
        (dict(values=[1.0, 2.0], groups=["a"]), "2 values but 1 group"),
        (dict(values=[1.0], alpha=1.5), "alpha"),
        (dict(values=[1.0], n_boot=0), "n_boot"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(UserError, match=match):
        bootstrap_ci(**kwargs)


# -- paired KID between two sample sets ---------------------------------------------------------


def _direct_paired_kid(x, y):
    """The paired MMD^2 U-statistic written out pair by pair (the definition)."""
    n, d = x.shape

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    total = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
                for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def test_paired_kid_is_the_paired_u_statistic_and_zero_for_identical_sets():
    from deradiff.stats import paired_kid

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.0, size=(9, 5))
    groups = [f"p{i % 3}" for i in range(9)]
    pooled = paired_kid(x, y, groups, n_boot=50, within_groups=False)
    assert pooled.value == pytest.approx(_direct_paired_kid(x, y))
    per_prompt = [_direct_paired_kid(x[i::3], y[i::3]) for i in range(3)]
    assert paired_kid(x, y, groups, n_boot=50).value == pytest.approx(np.mean(per_prompt))
    assert paired_kid(x, x.copy(), groups, n_boot=50) == Estimate(0.0, 0.0, 0.0)
    with pytest.raises(UserError, match="2 seeds per prompt"):
        paired_kid(x[:3], y[:3], ["a", "b", "c"])  # one pair per prompt: no within-prompt statistic
    assert paired_kid(torch.tensor(x), torch.tensor(y), groups, n_boot=50) == paired_kid(x, y, groups, n_boot=50)


def test_paired_kid_separates_shifted_sets_and_ignores_the_pairing():
    """Pairs that share noise (y = x + shift) are not mistaken for a small distance: the estimator
    leaves out k(x_i, y_i), so a shift is as far paired as unpaired."""
    from deradiff.stats import paired_kid

    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 8))
    groups = [f"p{i // 4}" for i in range(48)]
    for within in (True, False):
        same = paired_kid(x, x + rng.normal(0, 0.05, x.shape), groups, n_boot=300, within_groups=within)
        shifted = paired_kid(x, x + 1.0, groups, n_boot=300, within_groups=within)
        assert abs(same.value) < 0.01 and shifted.lo > 10 * abs(same.value)
        unpaired = paired_kid(x, rng.normal(size=(48, 8)) + 1.0, groups, n_boot=300, within_groups=within)
        assert unpaired.lo < shifted.hi and shifted.lo < unpaired.hi  # the same distance, within noise
    with pytest.raises(UserError, match="same shape"):
        paired_kid(x, x[:5], groups)


def test_group_draws_are_bootstrap_cis_and_block_replicates_weigh_pairs_of_groups():
    from deradiff.stats import block_replicates, estimate, group_draws

    values, groups = _grouped(12, per_group=1)
    draws = group_draws(12, 400, seed=2)
    assert draws.shape == (400, 12) and (draws.sum(1) == 12).all()
    replicates = draws @ values / 12  # one value per group: the pooled mean
    assert estimate(values.mean(), replicates) == bootstrap_ci(values, n_boot=400, seed=2)
    # all blocks equal: every replicate is that value
    assert np.allclose(block_replicates(np.full((3, 3), 2.0), np.ones((3, 3)), group_draws(3, 5)), 2.0)
