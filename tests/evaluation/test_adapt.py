"""`deradiff adapt`: the per-prompt choice rule on synthetic pilot tables, the seed checks, and a
reduced end-to-end run on a random-weight toy world (pilot, evaluation, resume, report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.adapt import (
    ADAPT,
    check_seeds,
    choose_per_prompt,
    choose_single,
    compare,
    share_meeting,
)
from deradiff.evaluation.results import RESULTS, read_rows
from deradiff.evaluation.search import Evaluated, parse_objective
from tests.evaluation.test_evaluate import make_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest

PROMPTS = ["a red circle on a dark background", "a blue square on a light background",
           "a green triangle on a dark background"]


def pilot_points(table: dict[float, dict[str, tuple[float, float]]]) -> list[Evaluated]:
    """{lam: {prompt: (reward, fidelity)}} -> the pilot's Evaluated points."""
    return [Evaluated(lam, {"reward/x": {p: v[0] for p, v in by_prompt.items()},
                            "fidelity/f": {p: v[1] for p, v in by_prompt.items()}})
            for lam, by_prompt in table.items()]


# -- the choice rule ------------------------------------------------------------------------------

# reward grows with lambda for every prompt; fidelity falls at a prompt-specific lambda
PILOT = {
    0.0: {"early": (0.0, 1.0), "late": (0.0, 1.0), "tie": (0.0, 1.0), "never": (0.0, 0.5)},
    1.0: {"early": (1.0, 0.95), "late": (1.0, 1.0), "tie": (2.0, 1.0), "never": (1.0, 0.5)},
    2.0: {"early": (2.0, 0.6), "late": (2.0, 1.0), "tie": (2.0, 1.0), "never": (2.0, 0.5)},
    4.0: {"early": (4.0, 0.2), "late": (4.0, 0.95), "tie": (1.0, 1.0), "never": (4.0, 0.1)},
}


def test_each_prompt_takes_its_best_lambda_within_its_own_budget():
    objective = parse_objective("reward/x", ["fidelity/f>=0.9"], [])
    choices = choose_per_prompt(pilot_points(PILOT), objective)
    assert {p: c.lam for p, c in choices.items()} == {"early": 1.0, "late": 4.0, "tie": 1.0, "never": 0.0}
    assert choices["tie"].objective == 2.0  # lambdas 1 and 2 tie at reward 2: the smaller wins
    assert [p for p, c in choices.items() if not c.feasible] == ["never"]  # no lambda meets 0.9: the smallest
    assert math.isinf(choices["never"].objective)
    # the order of the points does not matter, and without budgets every prompt takes its maximum
    shuffled = pilot_points(dict(reversed(PILOT.items())))
    assert choose_per_prompt(shuffled, objective) == choices
    free = choose_per_prompt(shuffled, parse_objective("reward/x", [], []))
    assert {p: c.lam for p, c in free.items()} == {"early": 4.0, "late": 4.0, "tie": 1.0, "never": 4.0}


def test_the_single_lambda_uses_the_budgets_on_prompt_means():
    """Means of fidelity: 0.875 at 0, 0.86 at 1, 0.775 at 2: >= 0.86 holds up to lambda 1; the
    per-prompt rule would let 'late' go to 4, the single rule cannot."""
    points = pilot_points(PILOT)
    single = choose_single(points, parse_objective("reward/x", ["fidelity/f>=0.86"], []), n_boot=200)
    assert single["lam"] == 1.0 and single["feasible"] and single["lambda_interval"][0] <= 1.0
    strict = choose_single(points, parse_objective("reward/x", ["fidelity/f>=0.99"], []), n_boot=50)
    assert strict == {"lam": 0.0, "feasible": False, "lambda_interval": None, "win_rate": None}


def test_comparison_pairs_prompts_and_checks_budgets_on_the_eval_means():
    objective = parse_objective("reward/x", ["fidelity/f>=0.9"], [])
    adaptive = {"reward/x": {"a": 2.0, "b": 3.0, "c": 1.0}, "fidelity/f": {"a": 0.95, "b": 0.9, "c": 0.8}}
    single = {"reward/x": {"a": 1.5, "b": 2.5, "c": 0.5}, "fidelity/f": {"a": 1.0, "b": 1.0, "c": 1.0}}
    record = compare(adaptive, single, objective, n_boot=200)
    reward = next(m for m in record["metrics"] if m["metric"] == "reward/x")
    assert reward["gap"] == [pytest.approx(0.5)] * 3  # the same gap on every prompt: a zero-width interval
    assert reward["adaptive"][0] == pytest.approx(2.0) and reward["n_prompts"] == 3
    assert not record["adaptive_meets_budgets"] and record["single_meets_budgets"]  # mean 0.883 < 0.9
    assert record["prompts_meeting_budgets"] == pytest.approx(2 / 3)
    assert record["verdict"].startswith("adaptive scores higher on reward/x") and "misses a budget" in record["verdict"]
    adaptive["fidelity/f"]["c"] = 0.95
    assert compare(adaptive, single, objective, n_boot=200)["verdict"].startswith("adaptive beats the single lambda")
    assert share_meeting(adaptive, []) is None


def test_seed_lists_must_be_distinct_and_disjoint():
    check_seeds([0, 1], [10, 11])
    for pilot, eval_, match in [([0, 1], [1, 2], r"overlap at \[1\]"), ([0, 0], [1], "--pilot-seeds must be distinct"),
                                ([0], [], "--eval-seeds must be distinct and non-empty")]:
        with pytest.raises(UserError, match=match):
            check_seeds(pilot, eval_)


# -- the command on the toy world -----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random toy pipeline and classifier on disk, and an aligned LoRA (beta 1)."""
    from deradiff.toy.classifier import ShapeClassifier, save_classifier
    from deradiff.toy.pipeline import build_toy_pipeline

    root = tmp_path_factory.mktemp("adapt-world")
    build_toy_pipeline(seed=0).save_pretrained(root / "pipe")
    torch.manual_seed(0)
    save_classifier(ShapeClassifier(), root / "classifier")
    make_lora(root, "aligned", 1.0, seed=1)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def adapt_argv(world, out, pilot=("0", "1"), eval_=("10", "11"), *extra):
    return ["adapt", "--pipeline", str(world / "pipe"), "--lora", str(world / "aligned"), "--prompts",
            str(world / "prompts.txt"), "--steps", "2", "--guidance", "3", "--size", "32", "--scheduler", "ddpm",
            "--classifier", str(world / "classifier"), "--n-boot", "100", "--out", str(out),
            "--pilot-seeds", *pilot, "--eval-seeds", *eval_, "--grid", "0", "1", "2", "--maximize", "reward/toy",
            "--budget", "fidelity/background_acc>=0.5", *extra]


def test_overlapping_seeds_are_refused_before_sampling(world, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(adapt_argv(world, out, ("0", "1"), ("1", "2"))) == 2
    err = capsys.readouterr().err
    assert "overlap at [1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main([*adapt_argv(world, out), "--seeds", "0", "1"]) == 2
    assert "instead of --seeds" in capsys.readouterr().err and not out.exists()


def test_adapt_help_lists_its_own_seed_options_only(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = capsys.readouterr().out
    assert "--pilot-seeds" in text and "--eval-seeds" in text and "--seeds SEEDS" not in text


def test_adapt_end_to_end_is_consistent_with_the_results_and_resumes(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = adapt_argv(world, out)
    assert main(argv) == 0, capsys.readouterr().err
    assert "adaptive - single" in capsys.readouterr().out
    record = json.loads((out / ADAPT).read_text())
    rows = read_rows(out / RESULTS)
    assert {r["arm"] for r in rows} == {"realigned"}
    assert record["pilot_seeds"] == [0, 1] and record["eval_seeds"] == [10, 11] and record["grid"] == [0, 1, 2]
    pilot = [r for r in rows if r["seed"] in (0, 1)]
    evals = [r for r in rows if r["seed"] in (10, 11)]
    assert len(pilot) + len(evals) == len(rows)
    assert len(pilot) == 3 * 3 * 2 == record["cost"]["pilot_images"]  # every grid lambda x prompt x pilot seed

    # the choices follow the rule from the pilot rows themselves
    budget = 0.5
    choice = {c["prompt"]: c for c in record["choices"]}
    infeasible = 0
    for prompt in PROMPTS:
        mean = {(lam, m): np.mean([r[m] for r in pilot if r["lam_value"] == lam and r["prompt"] == prompt])
                for lam in (0, 1, 2) for m in ("reward/toy", "fidelity/background_acc")}
        feasible = [lam for lam in (0, 1, 2) if mean[(lam, "fidelity/background_acc")] >= budget]
        expected = max(feasible, key=lambda lam: (mean[(lam, "reward/toy")], -lam)) if feasible else 0
        infeasible += not feasible
        assert choice[prompt]["lam"] == expected and choice[prompt]["feasible"] == bool(feasible)
    assert record["infeasible_prompts"] == infeasible
    single = record["single"]["lam"]

    # eval rows: each prompt at its own lambda and at the single one, nothing else
    expected_eval = {(lam, p, s) for p in PROMPTS for s in (10, 11) for lam in (choice[p]["lam"], single)}
    assert {(r["lam_value"], r["prompt"], r["seed"]) for r in evals} == expected_eval
    assert record["cost"]["eval_images"] == len(evals)
    reward = next(m for m in record["comparison"]["metrics"] if m["metric"] == "reward/toy")
    per_prompt = {p: np.mean([r["reward/toy"] for r in evals if r["prompt"] == p and r["lam_value"] == choice[p]["lam"]])
                  for p in PROMPTS}
    assert reward["adaptive"][0] == pytest.approx(np.mean(list(per_prompt.values())), abs=1e-6)
    gap = np.mean([per_prompt[p] - np.mean([r["reward/toy"] for r in evals if r["prompt"] == p and r["lam_value"] == single])
                   for p in PROMPTS])
    assert reward["gap"][0] == pytest.approx(gap, abs=1e-6) and reward["gap"][1] <= reward["gap"][0] <= reward["gap"][2]

    # resume: nothing is sampled again and the record is the same
    assert main(argv) == 0
    assert "0 sampled now" in capsys.readouterr().out
    again = json.loads((out / ADAPT).read_text())
    assert again["cost"]["sampled_now"] == 0 and again["choices"] == record["choices"]
    assert again["comparison"] == record["comparison"]

    # the report reads the folder and shows the adaptive section
    assert main(["report", "--eval", str(out), "--n-boot", "50"]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "## Adaptive lambda" in text and f"best single lambda **{single:g}**" in text
    assert "| reward/toy |" in text and "deradiff adapt" in text
