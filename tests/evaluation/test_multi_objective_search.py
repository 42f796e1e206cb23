"""Multi-objective realignment through the commands: search over a product grid of lambda vectors,
validation against LoRAs retrained on weighted rewards (the emulating vector lam_i = w_i beta_i / beta),
and the report's Pareto front. Pure parts on stubs; one reduced end-to-end run on the shipped toy
pipeline with random LoRAs saved as reward-trained runs (lora_info.json names reward and beta)."""

from __future__ import annotations

import json

import pytest
import torch

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.baselines import check_baselines, emulated_weights, emulating_vector, lora_run
from deradiff.evaluation.report import pareto_front
from deradiff.evaluation.search import Objective, parse_objective, search_vectors, vector_grid
from tests.evaluation.test_validate import fake_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest
PROMPTS = [f"prompt {i}" for i in range(6)]


def test_vector_grid_is_the_product_ordered_by_total_lambda():
    grid = vector_grid(["contrast=0,1", "color=0,2,1"])
    assert [lam.name for lam in grid] == ["color=0,contrast=0", "color=0,contrast=1", "color=1,contrast=0",
                                          "color=1,contrast=1", "color=2,contrast=0", "color=2,contrast=1"]
    assert all(lam.is_vector and lam.value is None for lam in grid)
    for items, message in [(["color"], "wants NAME=V1,V2"), (["color=0,x"], "must be numbers"),
                           (["color=0,0"], "lists a value twice"), (["color=0", "color=1"], "names adapter 'color' twice"),
                           (["color=-1,0"], "must be >= 0"), (["color=inf"], "finite"), ([], "is empty")]:
        with pytest.raises(UserError, match=message):
            vector_grid(items)


class VectorStub:
    """Rows for lambda vectors: reward/a = a, reward/b = b - (a + b)^2 / 8 + noise per prompt,
    path_kl = (a + b)^2."""

    out, beta0 = None, 1.0

    def __init__(self, tmp_path):
        self.out, self.calls = tmp_path, []

    def judge(self):
        return None

    def ensure(self, arm, lams, prompt_ids=None):
        self.calls.append([lam.name for lam in lams])
        rows = []
        for lam in lams:
            v = lam.vector.constants()
            for i, p in enumerate(PROMPTS):
                rows.append({"arm": arm, "lam": lam.name, "prompt_id": i, "prompt": p, "seed": 0, "image": "x.png",
                             "reward/a": v["a"] + 0.01 * i, "reward/b": v["b"] - (v["a"] + v["b"]) ** 2 / 8 + 0.02 * i,
                             "path_kl": (v["a"] + v["b"]) ** 2, "time_s": 0.5})
        return rows


def test_vector_search_picks_the_best_feasible_vector_with_bootstrap(tmp_path):
    ev = VectorStub(tmp_path)
    grid = vector_grid(["a=0,1,2", "b=0,1,2"])
    record = search_vectors(ev, grid, parse_objective("reward/a", ["path_kl<=4"], []), n_boot=200)
    assert len(ev.calls) == 1 and len(ev.calls[0]) == 9  # the whole grid in one pass (resumable)
    assert record["kind"] == "vector" and record["chosen_lambda"] is None
    # reward/a grows with a; (a + b)^2 <= 4 allows a = 2 only with b = 0
    assert record["chosen"] == "a=2,b=0" and record["chosen_vector"] == {"a": 2.0, "b": 0.0}
    assert record["lambda_interval"] == {"a": [2.0, 2.0], "b": [0.0, 0.0]} and record["budget_met_rate"] == 1.0
    assert record["win_rate"]["a=2,b=0"] == 1.0 and record["at_grid_edge"] == ["a"]
    assert [p["lam"] for p in record["evaluated"]][:3] == ["a=0,b=0", "a=0,b=1", "a=1,b=0"]
    assert record["cost"] == {"images": 9 * 6, "lambdas": 9, "sample_s": 9 * 6 * 0.5}
    assert record["emulates"] is None  # no named LoRA runs given: nothing claimed
    # ties go to the smallest total lambda: reward/a - reward/a is flat
    flat = search_vectors(ev, grid, Objective("weighted", weights={"path_kl": 0.0}), n_boot=50)
    assert flat["chosen"] == "a=0,b=0"
    with pytest.raises(UserError, match="--grid-vector"):
        search_vectors(ev, grid, parse_objective("reward/a", ["path_kl<=-1"], []), n_boot=10)


def test_emulating_vector_and_weights(tmp_path):
    color = lora_run(fake_run(tmp_path, "color", info={"method": "kl_grad", "beta": 2e-6, "base": "toy", "reward": "toy"}))
    contrast = lora_run(fake_run(tmp_path, "contrast", info={"method": "kl_grad", "beta": 1e-6, "base": "toy",
                                                              "reward": "toy_contrast=2"}))
    weighted = lora_run(fake_run(tmp_path, "w", info={"method": "kl_grad", "beta": 1e-6, "base": "toy",
                                                       "reward": "toy=1,toy_contrast=0.5"}))
    adapters = {"color": color, "contrast": contrast}
    # lam_i = w_i beta_i / (c_i beta): color 1 * 2e-6 / 1e-6, contrast 0.5 * 1e-6 / (2 * 1e-6)
    vector = emulating_vector(adapters, weighted)
    assert vector == {"color": 2.0, "contrast": 0.25}
    assert emulated_weights(adapters, vector, 1e-6) == pytest.approx({"toy": 1.0, "toy_contrast": 0.5})
    only_color = lora_run(fake_run(tmp_path, "c", info={"method": "kl_grad", "beta": 4e-6, "base": "toy", "reward": "toy"}))
    assert emulating_vector(adapters, only_color) == {"color": 0.5, "contrast": 0.0}
    # the reward comes from the run's recipe when lora_info.json does not say; a dpo run has none
    assert lora_run(fake_run(tmp_path, "dpo", info={"method": "dpo", "beta": 1.0})).reward is None
    # weighted baselines may share a beta; the same reward at the same beta may not
    check_baselines(color, [weighted, lora_run(fake_run(tmp_path, "w2", info={
        "method": "kl_grad", "beta": 1e-6, "base": "toy", "reward": "toy=0.5,toy_contrast=1"}))])
    with pytest.raises(UserError, match="share a beta"):
        check_baselines(color, [weighted, lora_run(fake_run(tmp_path, "w3", info={
            "method": "kl_grad", "beta": 1e-6, "base": "toy", "reward": "toy=1,toy_contrast=0.5"}))])
    bad = [({"color": color, "again": only_color}, weighted, "two named LoRAs were trained on reward 'toy'"),
           ({"color": color}, weighted, "no named LoRA on 'toy_contrast'"),
           ({"color": color, "contrast": weighted}, only_color, "was trained on a weighted reward"),
           (adapters, lora_run(fake_run(tmp_path, "nor", info={"method": "dpo", "beta": 1.0})), "records no reward")]
    for named, run, message in bad:
        with pytest.raises(UserError, match=message):
            emulating_vector(named, run)


def test_pareto_front_keeps_the_non_dominated_points():
    pts = [{"x": 0.0, "y": 1.0}, {"x": 1.0, "y": 1.0}, {"x": 0.5, "y": 0.5}, {"x": 2.0, "y": 0.0}, {"x": 1.0, "y": 0.9}]
    assert pareto_front(pts, "x", "y") == [1, 3]
    kl = [{"r": 1.0, "path_kl": 5.0}, {"r": 1.0, "path_kl": 3.0}, {"r": 2.0, "path_kl": 9.0}, {"r": 0.0, "path_kl": 0.0}]
    assert pareto_front(kl, "path_kl", "r") == [3, 1, 2]  # lower path KL is better


# -- end to end on the toy pipeline ---------------------------------------------------------------

FAST = ["--max-prompts", "1", "--seeds", "0", "1", "--steps", "2", "--scheduler", "ddpm", "--fidelity", "none",
        "--reward", "toy", "toy_contrast", "--n-boot", "20"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four random LoRAs saved as toy-kl-grad runs at beta 1e-6: `color` (reward toy), `contrast`
    (toy_contrast) and two retrained on weighted rewards."""
    from deradiff.models import load_pipeline, save_lora
    from tests.conftest import add_random_lora

    root = tmp_path_factory.mktemp("mo")
    pipe = load_pipeline("toy")
    add_random_lora(pipe.unet, seed=1)
    specs = {"color": "toy", "contrast": "toy_contrast", "w-1-0.5": "toy=1,toy_contrast=0.5",
             "w-0.5-1": "toy=0.5,toy_contrast=1"}
    for seed, (name, reward) in enumerate(specs.items(), start=2):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in pipe.unet.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        save_lora(pipe, root / name / "lora", metadata={"method": "kl_grad", "beta": 1e-6, "base": "toy",
                                                        "reward": reward})
        (root / name / "summary.json").write_text(json.dumps({"wall_s": 60.0}))  # a run folder: its training time
    return root


def test_search_validate_report_over_lambda_vectors(runs, tmp_path, capsys, monkeypatch):
    # the realignment-overhead timing (12 forwards per new vector) is not under test here
    monkeypatch.setattr("deradiff.evaluation.sampling.plain_fraction", lambda *args, **kwargs: 0.5)
    out = tmp_path / "eval"
    named = ["--lora", f"color={runs / 'color'}", f"contrast={runs / 'contrast'}"]
    search = ["search", "--out", str(out), *named, *FAST, "--grid-vector", "color=0,1", "contrast=0,1",
              "--maximize", "reward/toy", "--budget", "reward/toy_contrast>=0"]
    assert main(search) == 0, capsys.readouterr().err
    record = json.loads((out / "search.json").read_text())
    assert record["kind"] == "vector" and record["cost"]["images"] == 4 * 2 and record["cost"]["sampled_now"] == 8
    assert record["chosen"] in [p["lam"] for p in record["evaluated"]]
    # same betas: the vector's lambdas are the weights it emulates
    assert record["emulates"] == {"beta": 1e-6, "weights": {"toy": record["chosen_vector"]["color"],
                                                            "toy_contrast": record["chosen_vector"]["contrast"]}}
    assert "chosen vector" in capsys.readouterr().out
    assert main(search) == 0  # resumes: nothing sampled again
    assert json.loads((out / "search.json").read_text())["cost"]["sampled_now"] == 0

    baselines = ["--baselines", str(runs / "w-1-0.5"), str(runs / "w-0.5-1")]
    assert main(["validate", "--out", str(out), *named, *FAST, *baselines]) == 0, capsys.readouterr().err
    validation = json.loads((out / "validation.json").read_text())
    assert validation["kind"] == "vector"
    assert {b["label"]: b["lam"] for b in validation["baselines"]} == {
        "w-1-0.5": "color=1,contrast=0.5", "w-0.5-1": "color=0.5,contrast=1"}
    gaps = {(c["baseline"], c["metric"]) for c in validation["comparisons"]}
    assert {("w-1-0.5", "reward/toy"), ("w-0.5-1", "reward/toy_contrast"), ("w-1-0.5", "path_kl")} <= gaps
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    retrained = [r for r in rows if r["arm"].startswith("retrained:")]
    assert len(retrained) == 4 and {r["lam"] for r in retrained} == {"color=1,contrast=0.5", "color=0.5,contrast=1"}
    assert len(rows) == 8 + 2 * 2 + 4  # grid + the two emulating vectors + the two baselines
    assert validation["compute"]["search_source"].endswith("search.json")

    assert main(["report", "--eval", str(out), "--n-boot", "20"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert (out / "report" / "pareto.png").stat().st_size > 0 and not (out / "report" / "reward_vs_lambda.png").exists()
    for heading in ("## Search over lambda vectors", "## Validation against LoRAs retrained on weighted rewards",
                    "## Pareto front over lambda vectors", "(reward/toy, reward/toy_contrast)"):
        assert heading in report
    assert main(["report", "--eval", str(out), "--n-boot", "20", "--pareto-x", "path_kl", "--pareto-y", "reward/toy"]) == 0
    assert "(path_kl, reward/toy)" in (out / "report" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", "--eval", str(out), "--pareto-x", "reward/nope"]) == 2
    err = capsys.readouterr().err
    assert "--pareto-x 'reward/nope' is not measured" in err and err.count("\n") == 1


def test_vector_search_cli_refusals_are_one_line_before_sampling(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    named = ["--lora", f"color={runs / 'color'}", f"contrast={runs / 'contrast'}", *FAST, "--maximize", "reward/toy"]
    cases = [(["--grid-vector", "color=0,1", "--refine", "2"], "without refinement: drop --refine"),
             (["--grid-vector", "color=0,1", "--grid", "0", "1"], "without refinement: drop --grid"),
             (["--grid-vector", "color=0,1", "style=0,1"], "--grid-vector color=0,style=0 names adapter 'style', not loaded"),
             (["--grid-vector", "color=0,1", "contrast=-1"], "lambda of adapter 'contrast' must be >= 0")]
    for extra, message in cases:
        assert main(["search", "--out", str(out), *named, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()
