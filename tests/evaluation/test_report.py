"""`deradiff report` on a synthetic evaluation folder (rows, images, search and validation records)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.config import EvalConfig
from deradiff.evaluation.report import build_report, markdown_table
from deradiff.evaluation.results import RESULTS, write_json

PROMPTS = ["a red circle on a dark background", "a blue square on a light background", "a green cross on a dark background"]
ARMS = {"realigned": ["0", "0.5", "1", "2", "linear:0,2"], "lora-scale": ["0.5", "2"], "retrained:lambda-2": ["2"]}


def reward(arm: str, lam: str, prompt_id: int, seed: int) -> float:
    base = {"0": 0.0, "0.5": 0.5, "1": 1.0, "2": 2.0, "linear:0,2": 1.0}[lam]
    return base * (0.8 if arm == "lora-scale" else 1.0) + 0.1 * prompt_id + 0.01 * seed


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rows = []
    for arm, lams in ARMS.items():
        for lam in lams:
            for pid, prompt in enumerate(PROMPTS):
                for seed in (0, 1):
                    rel = f"images/{arm.replace(':', '-')}/lam={lam}/p{pid:04d}_s{seed}.png"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.full((32, 32, 3), 40 * pid + 20 * seed, np.uint8)).save(root / rel)
                    value = None if lam.startswith("linear") else float(lam)
                    rows.append({"arm": arm, "lam": lam, "lam_value": value, "prompt_id": pid, "prompt": prompt,
                                 "seed": seed, "image": rel, "path_kl": 10.0 * (value or 1.0) ** 2,
                                 "reward/toy": reward(arm, lam, pid, seed), "fidelity/adherence": float(pid != 2),
                                 "time_s": 0.1})
    (root / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(lora="runs/toy-dpo", prompts=PROMPTS, seeds=[0, 1], fidelity="none", beta0=1000.0)
    write_json(root / "config.json", {"identity": {}, "config": asdict(cfg)})
    (root / "commands.txt").write_text("deradiff evaluate --out x --lam 0 0.5 1 2\n")
    write_json(root / "search.json", {
        "objective": "maximize reward/toy subject to path_kl <= 30", "chosen_lambda": 1.5, "lambda_interval": [1.0, 2.0],
        "equivalent_beta": 666.7, "cost": {"images": 24, "lambdas": 4, "sample_s": 2.4},
        "evaluated": [{"lam": 1.0, "objective": 1.1, "reward/toy": 1.1, "path_kl": 10.0},
                      {"lam": 1.5, "objective": 1.6, "reward/toy": 1.6, "path_kl": 22.5}]})
    write_json(root / "validation.json", {
        "alpha": 0.05, "beta0": 1000.0,
        "comparisons": [{"baseline": "lambda-2", "lam": 2.0, "beta": 500.0, "metric": "reward/toy",
                         "realigned": [2.1, 2.0, 2.2], "retrained": [2.1, 2.0, 2.2], "gap": [0.0, -0.01, 0.01],
                         "in_baseline_ci": True, "gap_ci_has_zero": True, "lora_scale": [1.7, 1.6, 1.8],
                         "lora_scale_gap": [-0.4, -0.5, -0.3], "mixing_closer": True, "n_prompts": 3},
                        {"baseline": "lambda-2", "lam": 2.0, "beta": 500.0, "metric": "path_kl",
                         "realigned": [40.0, 40.0, 40.0], "retrained": [30.0, 29.0, 31.0], "gap": [10.0, 9.0, 11.0],
                         "in_baseline_ci": False, "gap_ci_has_zero": False, "n_prompts": 3}],
        "per_metric": {"reward/toy": {"baselines": 1, "in_baseline_ci": 1, "gap_ci_has_zero": 1, "mixing_closer": 1}},
        "compute": {"sweep_train_s": 240.0, "search_sample_s": 2.4, "search_source": "search.json", "ratio": 100.0,
                    "baselines_without_time": []}})
    return root


def test_report_tables_plots_and_markdown(eval_dir, tmp_path):
    out = tmp_path / "report"
    path = build_report(eval_dir, out, n_boot=200)
    text = path.read_text()
    assert "Chosen lambda **1.5**" in text and "beta0 / lambda = **666.7**" in text
    assert "**100.0x** less" in text and "| 2 | 500 | path_kl |" in text and "**no**" in text
    assert "deradiff evaluate --out x" in text
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == sum(len(v) for v in ARMS.values())
    row = next(r for r in summary if r["arm"] == "lora-scale" and r["lam"] == "2")
    expected = np.mean([reward("lora-scale", "2", p, s) for p in range(3) for s in (0, 1)])
    assert float(row["reward/toy"]) == pytest.approx(expected)
    assert float(row["reward/toy_lo"]) < expected < float(row["reward/toy_hi"])
    with open(out / "validation.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for name in ("reward_vs_lambda.png", "frontier.png"):
        assert Image.open(out / name).size[0] > 300
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 96 and grid.height >= 3 * 96  # 4 constant lambdas x 3 prompts


def test_report_cli_and_errors(eval_dir, tmp_path, capsys):
    assert main(["report", "--eval", str(eval_dir), "--n-boot", "50", "--frontier-x", "path_kl"]) == 0
    assert (eval_dir / "report" / "report.md").exists()
    assert main(["report", "--eval", str(tmp_path)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err
    with pytest.raises(UserError, match="--frontier-x 'fidelity/kid' is not measured"):
        build_report(eval_dir, tmp_path / "r", n_boot=50, frontier_x="fidelity/kid")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / RESULTS).write_text("")
    with pytest.raises(UserError, match="no results"):
        build_report(tmp_path / "empty", tmp_path / "r2")


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_report_shows_the_matching_test_and_the_path_kl_budget(eval_dir, tmp_path):
    """A validation record with a matching table (one lambda fails) and a search under a path-KL
    budget: the report says both, and writes matching.csv."""
    import shutil

    from deradiff.evaluation.matching import SampleSet, match

    folder = tmp_path / "eval"
    shutil.copytree(eval_dir, folder)
    bases = [{"label": "lambda-0.5", "lam": 0.5, "beta": 2000.0}, {"label": "lambda-2", "lam": 2.0, "beta": 500.0}]
    prompts = [f"p{i}" for i in range(6)]

    def model(level):
        return SampleSet({"reward/toy": {p: level + 0.01 * i for i, p in enumerate(prompts)}})

    validation = json.loads((folder / "validation.json").read_text())
    # realigned at lambda 2 lands on the lambda-0.5 baseline: matching fails there
    validation["matching"] = match(bases, [model(0.5), model(0.5)], [model(0.5), model(2.0)], n_seeds=2, n_boot=50)
    write_json(folder / "validation.json", validation)
    search = json.loads((folder / "search.json").read_text())
    search.update(max_path_kl=30.0, budgets=[["path_kl", "<=", 30.0]], budget_met_rate=0.9)
    write_json(folder / "search.json", search)
    text = build_report(folder, tmp_path / "report", n_boot=50).read_text()
    assert "### Matching" in text and "the nearest baseline is the matching one for 1/2 lambdas" in text
    assert "| 2 | **0 [0, 0]** | -1.5 [-1.5, -1.5] | lambda-0.5 | **no** |" in text
    assert "Path-KL budget: 30 nats per sample; the chosen lambda's mean path KL is 22.5 nats" in text
    with open(tmp_path / "report" / "matching.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 and {r["distance"] for r in rows} == {"reward/toy"}


def test_report_plots_every_validated_metric_against_lambda(eval_dir, tmp_path):
    """validation.png: one panel per validated metric (here reward/toy and path_kl, realigned vs
    retrained, the weight-scaled arm where validated); linked from report.md; none for vectors."""
    from deradiff.evaluation.report import plot_validation

    text = build_report(eval_dir, tmp_path / "report", n_boot=50).read_text()
    assert "![realigned vs retrained](validation.png)" in text
    image = Image.open(tmp_path / "report" / "validation.png")
    assert image.width > 2 * 400  # two metric panels side by side
    record = json.loads((eval_dir / "validation.json").read_text())
    assert plot_validation({**record, "kind": "vector"}, tmp_path / "v.png") is None
    assert plot_validation({**record, "comparisons": []}, tmp_path / "v.png") is None
    assert not (tmp_path / "v.png").exists()
