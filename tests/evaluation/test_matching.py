"""The matching test on constructed numbers: nearest-baseline choice, spacing fractions, accuracy,
resolution and the size it asks for, and a baseline set on which matching fails."""

from __future__ import annotations

import numpy as np
import pytest

from deradiff.evaluation.matching import (
    KID,
    SampleSet,
    adjacent_spacing,
    format_matching,
    match,
    matching_markdown,
    nearest_index,
    resolution,
    verdict_rows,
)
from deradiff.evaluation.results import markdown_table


def test_nearest_index_and_ties():
    assert nearest_index([0.3, 0.1, 0.5]) == 1
    assert nearest_index([-0.2, 0.1]) == 0  # KID can be negative: still the smallest
    assert nearest_index([0.1, 0.5, 0.1]) is None  # a tie is no evidence for either


def test_adjacent_spacing_takes_the_nearer_neighbour_in_lambda():
    means = np.array([0.0, 1.0, 3.0, 7.0])
    between = np.abs(means[:, None] - means[None, :])
    assert adjacent_spacing(between).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert np.isnan(adjacent_spacing(np.zeros((1, 1)))).all()  # one baseline: no spacing


def test_verdicts_pass_fail_fractions_and_match_rate():
    """Baselines at means 0, 1, 3; the realigned values 0.2, 2.3, 2.9: the second is nearer the
    third baseline (|2.3 - 3| = 0.7 < |2.3 - 1| = 1.3), so lambda 2 fails."""
    real = np.array([0.2, 2.3, 2.9])
    base = np.array([0.0, 1.0, 3.0])
    dist = np.abs(real[:, None] - base[None, :])
    boot = np.stack([dist, dist, dist + np.array([[0, 0, 0], [0, 0, 0], [0, -1.85, 0]])])  # 1 of 3 flips row 3
    between = np.abs(base[:, None] - base[None, :])
    rows = verdict_rows(dist, boot, between, width=np.array([0.1, 0.5, 4.0]))
    assert [r["nearest"] for r in rows] == [0, 2, 2] and [r["passed"] for r in rows] == [True, False, True]
    assert [r["spacing"] for r in rows] == [1.0, 1.0, 2.0]
    assert [r["fraction"] for r in rows] == pytest.approx([0.2, 1.3, 0.05])
    assert [r["match_rate"] for r in rows] == pytest.approx([1.0, 0.0, 2 / 3])
    assert [r["width_over_spacing"] for r in rows] == pytest.approx([0.1, 0.5, 2.0])
    # fractions taken in another unit (KID: MMD = sqrt(KID))
    kid = verdict_rows(np.array([[0.04, 0.5], [0.5, 0.01]]), np.zeros((1, 2, 2)), np.array([[0, 0.16], [0.16, 0]]),
                       np.zeros(2), to_distance=lambda v: max(v, 0.0) ** 0.5)
    assert [r["fraction"] for r in kid] == pytest.approx([0.5, 0.25])


def test_resolution_says_when_the_evaluation_was_too_small_and_what_size_would_do():
    ok = resolution([0.5, 0.8], n_prompts=12, n_seeds=4)
    assert ok["large_enough"] and ok["needed_prompts"] == 12 and ok["needed_images"] == 48
    small = resolution([2.0, 0.5], n_prompts=12, n_seeds=4)  # width twice the spacing: 4x the prompts
    assert not small["large_enough"] and small["width_over_spacing"] == 2.0
    assert (small["needed_prompts"], small["needed_images"]) == (48, 192)
    flat = resolution([0.5, None], n_prompts=12, n_seeds=4)  # two baselines with the same value
    assert not flat["large_enough"] and flat["needed_prompts"] is None and "no size" in flat["note"]


PROMPTS = [f"p{i}" for i in range(10)]
SEEDS = (0, 1, 2)


def sample_set(level: float, seed: int, noise: float = 0.02, dim: int = 6) -> SampleSet:
    """A model whose reward per prompt is level + a prompt effect + noise, and whose features
    sit around level * e_0 + a prompt effect (the same prompt effects for every model)."""
    rng = np.random.default_rng(seed)
    prompt_effect = np.random.default_rng(99).normal(0, 0.3, (len(PROMPTS), dim))
    reward = {p: level + prompt_effect[i, 1] + rng.normal(0, noise) for i, p in enumerate(PROMPTS)}
    features = {(p, s): level * np.eye(dim)[0] + prompt_effect[i] + rng.normal(0, 0.1, dim)
                for i, p in enumerate(PROMPTS) for s in SEEDS}
    return SampleSet({"reward/x": reward}, features)


BASELINES = [{"label": "lambda-0.5", "lam": 0.5, "beta": 2.0}, {"label": "lambda-2", "lam": 2.0, "beta": 0.5},
             {"label": "lambda-4", "lam": 4.0, "beta": 0.25}]
LEVELS = {0.5: 0.0, 2.0: 1.0, 4.0: 2.0}


def test_match_passes_when_realignment_lands_on_its_baseline_and_fails_when_it_does_not():
    retrained = [sample_set(LEVELS[b["lam"]], seed=i) for i, b in enumerate(BASELINES)]
    good = [sample_set(LEVELS[b["lam"]] + 0.05, seed=10 + i) for i, b in enumerate(BASELINES)]
    record = match(BASELINES, good, retrained, n_seeds=len(SEEDS), n_boot=200)
    assert record["primary"] == KID and record["accuracy"] == [3, 3]
    assert record["distances"]["reward/x"]["accuracy"] == [3, 3]
    kid = record["distances"][KID]
    assert all(r["nearest"] == r["baseline"] and r["fraction"] < 0.5 for r in kid["rows"])
    assert kid["resolution"]["large_enough"] and kid["n_prompts"] == len(PROMPTS)

    # the realigned model at lambda 4 drifts only as far as the lambda-2 baseline: it FAILS there
    drifted = good[:2] + [sample_set(LEVELS[2.0] + 0.05, seed=12)]
    bad = match(BASELINES, drifted, retrained, n_seeds=len(SEEDS), n_boot=200)
    assert bad["accuracy"] == [2, 3]
    last = bad["distances"][KID]["rows"][-1]
    assert last["lam"] == 4.0 and last["nearest"] == "lambda-2" and not last["passed"] and last["fraction"] > 0.5
    assert bad["distances"]["reward/x"]["rows"][-1]["nearest"] == "lambda-2"
    assert last["match_rate"] < 0.05
    text = format_matching(bad)
    assert "2/3 lambdas" in text and "NO" in text
    md = "\n".join(matching_markdown(bad, markdown_table))
    assert "| 4 |" in md and "**no**" in md and "accuracy 2/3" in md


def test_match_needs_two_baselines_and_reports_unresolved_sizes():
    retrained = [sample_set(LEVELS[b["lam"]], seed=i) for i, b in enumerate(BASELINES)]
    assert match(BASELINES[:1], retrained[:1], retrained[:1], n_seeds=3) is None
    # baselines 0.001 apart on the reward with noise 0.2: far too few prompts to resolve them

    def noisy(k):
        rng = np.random.default_rng(k)
        return SampleSet({"reward/x": {p: 0.001 * k + rng.normal(0, 0.2) for p in PROMPTS}})

    record = match(BASELINES, [noisy(10 + k) for k in range(3)], [noisy(k) for k in range(3)], n_seeds=2, n_boot=200)
    assert record["primary"] == "reward/x"  # no features: the reward decides
    res = record["distances"]["reward/x"]["resolution"]
    assert not res["large_enough"] and res["width_over_spacing"] > 1.5
    assert res["needed_prompts"] == pytest.approx(len(PROMPTS) * res["width_over_spacing"] ** 2, abs=1)
    assert "NOT large enough" in format_matching(record)


def test_a_neighbour_only_baseline_is_a_column_but_not_a_test():
    """The aligned LoRA (lambda 1) given as a baseline: no row of its own, but the realigned model
    at lambda 2 that only drifted as far as lambda 1 is caught by it."""
    bases = [*BASELINES[:1], {"label": "lambda-1", "lam": 1.0, "beta": 1.0}, *BASELINES[1:]]
    levels = {0.5: 0.0, 1.0: 0.5, 2.0: 1.0, 4.0: 2.0}
    retrained = [sample_set(levels[b["lam"]], seed=i) for i, b in enumerate(bases)]
    realigned = [sample_set(levels[b["lam"]] + 0.05, seed=10 + i) if b["lam"] != 1.0 else None
                 for i, b in enumerate(bases)]
    record = match(bases, realigned, retrained, n_seeds=len(SEEDS), n_boot=200)
    rows = record["distances"][KID]["rows"]
    assert [r["lam"] for r in rows] == [0.5, 2.0, 4.0] and record["accuracy"] == [3, 3]
    assert all("lambda-1" in r["to"] for r in rows)
    assert [b["tested"] for b in record["baselines"]] == [True, False, True, True]
    realigned[2] = sample_set(levels[1.0] + 0.05, seed=12)  # lambda 2 drifted only as far as lambda 1
    bad = match(bases, realigned, retrained, n_seeds=len(SEEDS), n_boot=200)
    assert bad["accuracy"] == [2, 3] and bad["distances"][KID]["rows"][1]["nearest"] == "lambda-1"
    assert match(bases, [None] * 4, retrained, n_seeds=3) is None
