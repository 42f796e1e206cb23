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
