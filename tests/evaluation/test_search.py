"""The lambda search: objectives, golden-section refinement and the bootstrap over prompts, on a
stub evaluator whose per-prompt metrics are known functions of lambda (no model needed)."""

from __future__ import annotations

import math

import pytest

from deradiff.errors import UserError
from deradiff.evaluation.search import (
    Evaluated,
    Objective,
    bootstrap_choice,
    golden_section,
    parse_objective,
    search,
)

PROMPTS = [f"prompt {i}" for i in range(8)]


class StubEvaluator:
    """Rows for any lambda: reward = reward_fn(lam, prompt index), path_kl = 10 lam^2."""

    def __init__(self, tmp_path, reward_fn, seeds=(0, 1)):
        self.out, self.beta0, self.reward_fn, self.seeds = tmp_path, 2.0, reward_fn, seeds
        self.sampled_lams: list[str] = []

    def judge(self):
        return None

    def ensure(self, arm, lams, prompt_ids=None):
        rows = []
        for lam in lams:
            name, value = lam.name, lam.value
            self.sampled_lams.append(name)
            rows += [{"arm": arm, "lam": name, "prompt_id": i, "prompt": p, "seed": s, "image": "x.png",
                      "reward/x": self.reward_fn(value, i), "path_kl": 10 * value**2, "time_s": 0.25}
                     for i, p in enumerate(PROMPTS) for s in self.seeds]
        return rows


def test_golden_section_finds_the_maximum_and_prefers_smaller_lambda_on_ties():
    tried = golden_section(lambda x: -(x - 1.3) ** 2, 0.0, 4.0, 25)
    assert len(tried) == 25 and abs(tried[-1] - 1.3) < 1e-3
    assert golden_section(lambda x: 0.0, 0.0, 4.0, 1) == [pytest.approx(4 - 4 * 0.6180339887)]
    flat = golden_section(lambda x: 0.0, 0.0, 4.0, 12)
    assert flat[-1] < 0.05  # ties shrink toward the lower end
    assert golden_section(lambda x: 0.0, 1.0, 1.0, 5) == []


def test_objective_parsing_and_values():
    obj = parse_objective("reward/x", ["path_kl<=20", "fidelity/adherence >= 0.8"], [])
    assert obj.budgets == [("path_kl", "<=", 20.0), ("fidelity/adherence", ">=", 0.8)]
    assert obj({"reward/x": 3.0, "path_kl": 19.0, "fidelity/adherence": 0.9}) == 3.0
    assert obj({"reward/x": 3.0, "path_kl": 21.0, "fidelity/adherence": 0.9}) == -math.inf
    assert obj.metrics == ["fidelity/adherence", "path_kl", "reward/x"]
    weighted = parse_objective(None, [], ["reward/x=1", "path_kl=-0.5"])
    assert weighted({"reward/x": 3.0, "path_kl": 2.0}) == 2.0 and "0.5*path_kl" in weighted.describe()
    for args, match in [((None, [], []), "no objective"), (("r", [], ["r=1"]), "choose one objective"),
                        (("r", ["path_kl<20"], []), "--budget wants"), ((None, [], ["r:1"]), "--weights wants")]:
        with pytest.raises(UserError, match=match):
            parse_objective(*args)


def test_weighted_search_refines_to_the_interior_maximum(tmp_path):
    ev = StubEvaluator(tmp_path, lambda lam, i: -((lam - 1.3) ** 2) + 0.1 * i)
    record = search(ev, [0, 1, 2, 4], Objective("weighted", weights={"reward/x": 1.0}), refine=8, n_boot=200)
    assert abs(record["chosen_lambda"] - 1.3) < 0.05
    assert record["bracket"] == [0.0, 2.0]  # the neighbours of the best grid point, 1
    # the prompt offsets cancel in the comparison: every bootstrap replicate picks the same lambda
    assert record["lambda_interval"] == [record["chosen_lambda"]] * 2
    assert record["equivalent_beta"] == pytest.approx(2.0 / record["chosen_lambda"])
    n_lams = len(record["evaluated"])
    assert n_lams <= 4 + 8 and len(set(ev.sampled_lams)) == n_lams  # each lambda sampled once
    assert record["cost"] == {"images": n_lams * 8 * 2, "lambdas": n_lams, "sample_s": n_lams * 8 * 2 * 0.25}


def test_budgeted_search_stops_at_the_budget(tmp_path):
    """Reward grows with lambda; path_kl = 10 lam^2 <= 22.5 allows lambda <= 1.5."""
    ev = StubEvaluator(tmp_path, lambda lam, i: lam + 0.01 * i)
    obj = parse_objective("reward/x", ["path_kl<=22.5"], [])
    record = search(ev, [0, 1, 2, 4], obj, refine=10, n_boot=200)
    assert 1.4 <= record["chosen_lambda"] <= 1.5
    assert record["budget_met_rate"] == 1.0
    with pytest.raises(UserError, match="no grid lambda meets the budget"):
        search(StubEvaluator(tmp_path, lambda lam, i: lam), [1, 2], parse_objective("reward/x", ["path_kl<=1"], []), 2)


def test_bootstrap_interval_widens_with_prompt_disagreement():
    """Half the prompts prefer lambda 1, half lambda 2 (slightly more): the pick is uncertain."""
    per_prompt = {1.0: {f"p{i}": (1.0 if i % 2 else 0.0) for i in range(10)},
                  2.0: {f"p{i}": (0.0 if i % 2 else 1.1) for i in range(10)}}
    points = [Evaluated(lam, {"reward/x": v}) for lam, v in per_prompt.items()]
    out = bootstrap_choice(points, Objective("weighted", weights={"reward/x": 1.0}), n_boot=500, alpha=0.05)
    assert out["best_index"] == 1 and out["lambda_interval"] == [1.0, 2.0]
    assert 0.2 < out["win_rate"]["1"] < 0.8 and out["win_rate"]["1"] + out["win_rate"]["2"] == pytest.approx(1.0)
    lo, hi = out["objective_interval"]
    assert lo < out["objective_value"] < hi


def test_unmeasured_objective_metric_lists_what_is_available(tmp_path):
    ev = StubEvaluator(tmp_path, lambda lam, i: lam)
    with pytest.raises(UserError, match=r"objective metrics \['reward/pickscore'\] are not measured.*reward/x"):
        search(ev, [0, 1], parse_objective("reward/pickscore", [], []), refine=0)


def test_search_cli_rejects_schedules_in_the_grid(tmp_path, capsys):
    from deradiff.cli import main

    assert main(["search", "--out", str(tmp_path), "--grid", "0", "linear:0,2", "--maximize", "reward/toy"]) == 2
    assert "constant lambdas only" in capsys.readouterr().err


def test_search_cli_checks_the_objective_before_sampling(tmp_path, capsys):
    from deradiff.cli import main
    from deradiff.models import add_lora, save_lora
    from deradiff.toy.pipeline import build_toy_pipeline

    pipe = build_toy_pipeline(seed=0)
    add_lora(pipe.unet, rank=2)
    save_lora(pipe, tmp_path / "lora", metadata={"beta": 1.0})
    argv = ["search", "--out", str(tmp_path / "eval"), "--lora", str(tmp_path / "lora"), "--fidelity", "none",
            "--maximize", "reward/pickscore"]
    assert main(argv) == 2
    assert "['reward/pickscore'] are not measured" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.jsonl").exists()


def test_path_kl_budget_is_first_class(tmp_path):
    """--max-path-kl NATS is the budget 'path_kl<=NATS', for either objective, and search.json
    records it: path_kl = 10 lam^2 <= 22.5 allows lambda <= 1.5 while reward grows with lambda."""
    obj = parse_objective("reward/x", [], [], max_path_kl=22.5)
    assert obj.budgets == [("path_kl", "<=", 22.5)] and obj.describe() == "maximize reward/x subject to path_kl <= 22.5"
    assert parse_objective("reward/x", ["path_kl<=22.5"], []) == obj  # the budget grammar says the same
    record = search(StubEvaluator(tmp_path, lambda lam, i: lam + 0.01 * i), [0, 1, 2, 4], obj, refine=10, n_boot=200)
    assert 1.4 <= record["chosen_lambda"] <= 1.5 and record["max_path_kl"] == 22.5
    assert record["budgets"] == [["path_kl", "<=", 22.5]] and record["maximize"] == "reward/x"
    chosen = next(p for p in record["evaluated"] if p["lam"] == record["chosen_lambda"])
    assert chosen["path_kl"] <= 22.5
    # a weighted objective honours the budget too: alone it would take lambda 4
    weighted = parse_objective(None, [], ["reward/x=1"], max_path_kl=22.5)
    assert "subject to path_kl <= 22.5" in weighted.describe()
    picked = search(StubEvaluator(tmp_path, lambda lam, i: lam), [0, 1, 2, 4], weighted, refine=0, n_boot=50)
    assert picked["chosen_lambda"] == 1.0 and picked["weights"] == {"reward/x": 1.0}
    with pytest.raises(UserError, match="must be > 0"):
        parse_objective("reward/x", [], [], max_path_kl=0.0)
    with pytest.raises(UserError, match="--max-path-kl"):
        search(StubEvaluator(tmp_path, lambda lam, i: lam), [1, 2], parse_objective("reward/x", [], [], 1.0), 0)


def test_search_cli_takes_max_path_kl_in_nats(tmp_path, capsys):
    from deradiff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["search", "--out", str(tmp_path), "--maximize", "reward/toy", "--max-path-kl", "-5"])
    assert exit_.value.code == 2 and "argument --max-path-kl: must be > 0" in capsys.readouterr().err
