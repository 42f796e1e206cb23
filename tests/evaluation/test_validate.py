"""Validation against retrained baselines: run metadata, refusals, paired gaps and compute ratio
(with small fake LoRA files and a stub evaluator; the real pipeline runs in test_evaluate.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from deradiff.errors import UserError
from deradiff.evaluation.baselines import baseline_lambda, check_baselines, lora_run
from deradiff.evaluation.lams import constant
from deradiff.evaluation.results import LORA_SCALE, REALIGNED, RETRAINED, SET_METRICS
from deradiff.evaluation.validate import (
    compute_ratio,
    format_search_check,
    format_validation,
    image_features,
    paired,
    search_check,
    validate,
    validation_markdown,
)


def fake_run(root, name, rank=4, info=None, summary=None, metrics=None, recipe=None):
    """A run folder with lora/pytorch_lora_weights.safetensors of the given rank."""
    lora = root / name / "lora"
    lora.mkdir(parents=True)
    save_file({"unet.mid.attn.to_q.lora_A.weight": torch.zeros(rank, 8),
               "unet.mid.attn.to_q.lora_B.weight": torch.zeros(8, rank)}, lora / "pytorch_lora_weights.safetensors")
    if info is not None:
        (lora / "lora_info.json").write_text(json.dumps(info))
    if summary is not None:
        (root / name / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if recipe is not None:
        from deradiff.training.recipe import Recipe
        from deradiff.training.recipe_runs import save_resolved

        r = Recipe()
        r.method.beta, r.model.name_or_path, r.lora.rank = recipe["beta"], recipe["base"], rank
        save_resolved(r, root / name)
    return root / name


def test_lora_run_reads_rank_beta_base_and_training_time(tmp_path):
    a = lora_run(fake_run(tmp_path, "a", rank=4, info={"beta": 1000, "base": "toy"}, summary={"wall_s": 12.5}))
    assert (a.rank, a.beta, a.base, a.wall_s, a.label) == (4, 1000.0, "toy", 12.5, "a")
    # no lora_info.json: beta and base from the resolved recipe; no summary: the last logged time_s
    b = lora_run(fake_run(tmp_path, "b", rank=4, recipe={"beta": 250.0, "base": "toy"},
                          metrics=[{"step": 1, "time_s": 3.0}, {"step": 2, "time_s": 7.5}]))
    assert (b.beta, b.base, b.wall_s) == (250.0, "toy", 7.5)
    assert lora_run(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors").label == "b"
    assert baseline_lambda(1000.0, 250.0) == 4.0 and baseline_lambda(1.0, 3.0) == pytest.approx(0.333333)


def test_evaluate_and_sample_default_to_the_base_the_lora_was_trained_on(tmp_path):
    """No --pipeline: a LoRA trained on toy-flow is sampled on toy-flow (not the default toy UNet,
    which it does not fit); a given --pipeline wins; a LoRA recording no base falls back to toy."""
    import argparse

    from deradiff.evaluation.baselines import trained_base
    from deradiff.evaluation.config import config_from_args

    flow = fake_run(tmp_path, "flow", info={"beta": 100, "base": "toy-flow"})
    bare = fake_run(tmp_path, "bare")
    assert trained_base(flow, "toy") == "toy-flow" and trained_base(bare, "toy") == "toy"

    def config(**given):
        args = argparse.Namespace(out=str(tmp_path / "e"), device="cpu", batch_size=8, prompts="toy:test",
                                  max_prompts=1, **given)
        return config_from_args(args)

    assert config(lora=[str(flow)]).pipeline == "toy-flow"
    assert config(lora=[str(flow)], pipeline="toy").pipeline == "toy"
    assert config(lora=[str(bare)]).pipeline == "toy"


def test_mismatched_baselines_are_refused_with_the_mismatch(tmp_path):
    aligned = lora_run(fake_run(tmp_path, "aligned", info={"beta": 1.0, "base": "toy"}))
    ok = lora_run(fake_run(tmp_path, "ok", info={"beta": 2.0, "base": "toy"}))
    check_baselines(aligned, [ok])
    cases = [
        (fake_run(tmp_path, "r8", rank=8, info={"beta": 3.0, "base": "toy"}), "LoRA rank 8 != aligned rank 4"),
        (fake_run(tmp_path, "sd", info={"beta": 3.0, "base": "sd15"}), "base model 'sd15' != aligned base 'toy'"),
        (fake_run(tmp_path, "nobeta", info={"base": "toy"}), "unknown beta"),
        (fake_run(tmp_path, "same", info={"beta": 2.0, "base": "toy"}), "share a beta"),
    ]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            check_baselines(aligned, [ok, lora_run(path)])


def test_paired_gap_is_per_prompt():
    table = {("realigned", "1"): {"m": {"a": 1.0, "b": 2.0, "c": 3.0, "only_here": 9.0}},
             ("retrained:x", "1"): {"m": {"a": 0.5, "b": 1.5, "c": 2.5}}}
    out = paired(table, ("realigned", "1"), ("retrained:x", "1"), "m", n_boot=200, alpha=0.05)
    assert out["n_prompts"] == 3 and out["gap"] == [0.5, 0.5, 0.5]  # constant gap: zero-width interval
    assert out["a"][0] == 2.0 and out["b"][0] == 1.5
    assert paired(table, ("realigned", "1"), ("retrained:x", "1"), "other", 10, 0.05) is None


class StubEvaluator:
    """Two baselines at lambda 0.5 and 2; per prompt, reward = lam + prompt noise for realigned
    and retrained (the same model), lam * 0.6 for weight scaling; each image took 0.5 s."""

    def __init__(self, tmp_path):
        self.out, self.beta0 = tmp_path, 1.0
        self.baselines = {f"{RETRAINED}:lambda-0.5": _Run("lambda-0.5", 2.0, 30.0),
                          f"{RETRAINED}:lambda-2": _Run("lambda-2", 0.5, 50.0)}
        self.rows: dict[tuple, dict] = {}

    def judge(self):
        return None

    def baseline_lams(self):
        return {arm: constant(1.0 / b.beta) for arm, b in self.baselines.items()}

    def ensure(self, arm, lams, prompt_ids=None):
        rows = []
        for lam in lams:
            value = lam.value
            for i in range(12):
                noise = 0.05 * ((i * 7) % 5 - 2)
                reward = value * 0.6 if arm == LORA_SCALE else value + noise + (0.01 * (2 * (i % 2) - 1) if arm != REALIGNED else 0)
                row = {"arm": arm, "lam": lam.name, "prompt": f"p{i}", "seed": 0, "prompt_id": i,
                       "reward/x": reward, "time_s": 0.5}
                self.rows[(arm, row["lam"], row["prompt"], 0)] = row
                rows.append(row)
        return rows


class _Run:
    def __init__(self, label, beta, wall_s):
        self.label, self.beta, self.wall_s, self.path = label, beta, wall_s, f"/runs/{label}"


def test_validate_reports_gaps_verdicts_and_compute(tmp_path):
    ev = StubEvaluator(tmp_path)
    record = validate(ev, lora_scale=True, n_boot=300, alpha=0.05)
    rows = {c["lam"]: c for c in record["comparisons"]}
    assert sorted(rows) == [0.5, 2.0]
    # realigned - retrained = -/+0.01 on alternate prompts: mean 0; weight scaling - retrained =
    # -0.4 lam - noise -/+ 0.01, and the prompt noise averages -1/120 over the 12 prompts
    for lam, c in rows.items():
        assert c["in_baseline_ci"] and c["gap_ci_has_zero"] and c["mixing_closer"]
        assert c["gap"][0] == pytest.approx(0.0, abs=1e-12)
        assert c["lora_scale_gap"][0] == pytest.approx(-0.4 * lam + 1 / 120)
    assert record["per_metric"]["reward/x"] == {"baselines": 2, "in_baseline_ci": 2, "gap_ci_has_zero": 2,
                                               "mixing_closer": 2}
    # no judge: the matching test runs on the metrics, each realigned lambda nearest its own baseline
    matching = record["matching"]
    assert matching["primary"] == "reward/x" and matching["accuracy"] == [2, 2]
    assert [b["label"] for b in matching["baselines"]] == ["lambda-0.5", "lambda-2"]
    assert all(r["fraction"] < 0.05 for r in matching["distances"]["reward/x"]["rows"])
    compute = compute_ratio(record, ev, None)
    # 2 lambdas x 12 prompts x 0.5 s of realigned sampling against 80 s of training
    assert compute["sweep_train_s"] == 80.0 and compute["search_sample_s"] == 12.0 and compute["search_images"] == 24
    assert compute["ratio"] == pytest.approx(80 / 12)
    from_search = compute_ratio(record, ev, {"cost": {"sample_s": 4.0}}, str(tmp_path / "search.json"))
    assert from_search["ratio"] == 20.0 and from_search["search_source"] == str(tmp_path / "search.json")


def test_search_check_compares_the_nearest_baseline_with_the_best():
    def row(lam, mean, lo, hi):
        return {"baseline": f"lambda-{lam:g}", "metric": "reward/x", "lam": lam, "retrained": [mean, lo, hi]}

    record = {"comparisons": [row(0.5, 0.10, 0.08, 0.12), row(2.0, 0.20, 0.18, 0.22), row(4.0, 0.21, 0.19, 0.23),
                              {**row(2.0, 0.9, 0.9, 0.9), "metric": "fidelity/x"}]}
    check = search_check(record, {"maximize": "reward/x", "chosen_lambda": 1.8})
    assert check["nearest_lambda"] == 2.0 and check["best_lambda"] == 4.0
    assert check["within_best_interval"] and check["inside_sweep_range"]
    far = search_check(record, {"maximize": "reward/x", "chosen_lambda": 0.6})
    assert far["nearest_lambda"] == 0.5 and not far["within_best_interval"]
    assert "NOT within" in format_search_check(far)
    beyond = search_check(record, {"maximize": "reward/x", "chosen_lambda": 8.0})
    assert beyond["nearest_lambda"] == 4.0 and not beyond["inside_sweep_range"]
    assert search_check(record, {"maximize": None, "chosen_lambda": 2.0}) is None


def test_validate_needs_baselines(tmp_path):
    ev = StubEvaluator(tmp_path)
    ev.baselines = {}
    with pytest.raises(UserError, match="needs --baselines"):
        validate(ev)


def test_search_check_holds_the_retrained_pick_to_the_search_budget():
    """Reward grows with lambda but so does the retrained path KL; under path_kl <= 100 the best
    feasible baseline is lambda 2 (lambda 4 drifts 300 nats)."""
    def rows(label, lam, reward, kl):
        return [{"baseline": label, "lam": lam, "metric": "reward/x", "retrained": reward},
                {"baseline": label, "lam": lam, "metric": "path_kl", "retrained": [kl, kl * 0.8, kl * 1.2]}]

    record = {"comparisons": [*rows("lambda-0.5", 0.5, [0.10, 0.08, 0.12], 10.0),
                              *rows("lambda-2", 2.0, [0.20, 0.18, 0.22], 60.0),
                              *rows("lambda-4", 4.0, [0.30, 0.28, 0.32], 300.0),
                              *rows("star", 1.7, [0.19, 0.17, 0.21], 50.0)]}
    search = {"maximize": "reward/x", "chosen_lambda": 1.7, "budgets": [["path_kl", "<=", 100.0]]}
    nearest = search_check(record, search)
    assert nearest["source"] == "nearest" and nearest["baseline"] == "star"  # nearest in log lambda: 1.7
    assert nearest["feasible"] == ["lambda-0.5", "star", "lambda-2"] and nearest["best_lambda"] == 2.0
    assert nearest["meets_budget"] and nearest["within_best_interval"] and nearest["passed"]
    assert "meets the budget" in format_search_check(nearest) and format_search_check(nearest).endswith("PASS")
    # without the budget the unconstrained best (lambda 4) is out of reach: the same pick FAILS
    free = search_check(record, {**search, "budgets": []})
    assert free["best_lambda"] == 4.0 and not free["passed"]
    # a supplied run retrained at beta0 / lambda* stands in for the nearest baseline
    chosen = search_check(record, {**search, "chosen_lambda": 3.5}, selected="star")
    assert chosen["source"] == "selected" and chosen["nearest_lambda"] == 1.7 and chosen["passed"]
    assert "retrained at beta0 / lambda*" in format_search_check(chosen)
    # a pick that violates the budget fails even if its reward is the best
    over = search_check(record, {**search, "chosen_lambda": 4.0})
    assert over["baseline"] == "lambda-4" and over["meets_budget"] is False and not over["passed"]
    assert "VIOLATES the budget" in format_search_check(over)
    none = search_check(record, {**search, "budgets": [["path_kl", "<=", 1.0]]})
    assert none["best_retrained"] is None and "no retrained baseline meets the budget: FAIL" in format_search_check(none)


class FeatureJudge:
    """Features of an image: its mean RGB (a stand-in for a judge's classifier features)."""

    def features(self, images):
        return images.mean(dim=(2, 3))

    def metrics(self, images, prompts, n_boot=1):  # no set metrics of its own
        from deradiff.stats import Estimate

        return {m: Estimate(float("nan"), float("nan"), float("nan")) for m in SET_METRICS}


def _png(root, rel, value):
    import numpy as np
    from PIL import Image

    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / rel)


def test_image_features_come_from_the_stored_pngs(tmp_path):
    rows = [{"arm": "realigned", "lam": "2", "prompt": "p", "seed": s, "image": f"images/r/p_s{s}.png"} for s in (0, 1)]
    for r, value in zip(rows, (0, 255), strict=True):
        _png(tmp_path, r["image"], value)
    feats = image_features(rows, tmp_path, FeatureJudge(), batch=1)
    assert sorted(feats[("realigned", "2")]) == [("p", 0), ("p", 1)]
    assert feats[("realigned", "2")][("p", 0)].tolist() == [-1.0] * 3 and feats[("realigned", "2")][("p", 1)].tolist() == [1.0] * 3
    assert image_features(rows, tmp_path, None) is None and image_features(rows, tmp_path, object()) is None


class ImageStubEvaluator(StubEvaluator):
    """StubEvaluator with 2 seeds and stored PNGs: gray level 60 + 40 * log2(lam / 0.5) + prompt
    and seed effects for every arm (+2 for realigned), so realigned and retrained at the same
    lambda look alike; with `swap`, the baselines' images are those of the other lambda (a
    baseline set that does not match)."""

    def __init__(self, tmp_path, swap=False):
        super().__init__(tmp_path)
        self.swap = swap

    def judge(self):
        return FeatureJudge()

    def ensure(self, arm, lams, prompt_ids=None):
        import math

        rows = []
        for seed in (0, 1):
            for row in super().ensure(arm, lams, prompt_ids):
                row = {**row, "seed": seed}
                lam = float(row["lam"])
                if self.swap and arm.startswith(RETRAINED):
                    lam = 2.5 - lam  # 0.5 <-> 2
                level = 60 + 40 * math.log2(lam / 0.5) + 3 * (row["prompt_id"] % 4) + 5 * seed + 2 * (arm == REALIGNED)
                row["image"] = f"images/{arm.replace(':', '-')}/lam={row['lam']}/p{row['prompt_id']}_s{seed}.png"
                _png(self.out, row["image"], int(level))
                self.rows[(arm, row["lam"], row["prompt"], seed)] = row
                rows.append(row)
        return rows


def test_validate_matching_on_stored_images_passes_and_fails(tmp_path):
    good = validate(ImageStubEvaluator(tmp_path / "good"), lora_scale=False, n_boot=200)["matching"]
    assert good["primary"] == "kid" and good["accuracy"] == [2, 2]
    assert all(r["nearest"] == r["baseline"] for r in good["distances"]["kid"]["rows"])
    bad_record = validate(ImageStubEvaluator(tmp_path / "bad", swap=True), lora_scale=False, n_boot=200)
    bad = bad_record["matching"]
    assert bad["accuracy"] == [0, 2]
    assert [r["nearest"] for r in bad["distances"]["kid"]["rows"]] == ["lambda-2", "lambda-0.5"]
    bad_record["compute"] = {"ratio": None}
    text = format_validation(bad_record)
    assert "matching (kid): the nearest baseline is the matching one for 0/2 lambdas" in text
    md = "\n".join(validation_markdown(bad_record))
    assert "### Matching" in md and "accuracy 0/2" in md


# -- the reduced end-to-end run of scripts/toy_matching.sh -----------------------------------------


def _scaled_loras(root, strength=0.2):
    """On the shipped toy pipeline: a random LoRA (the aligned one, beta0 = 1) and copies of it with
    B scaled by s, saved at beta = 1 / s: weight scaling by s stands in for retraining at
    beta0 / s (close to output mixing by s for a weak LoRA at s <= 1)."""
    import torch

    from deradiff.models import add_lora, save_lora
    from deradiff.toy.pipeline import load_toy_pipeline

    pipe = load_toy_pipeline()
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4)
    gen = torch.Generator().manual_seed(1)
    b = {k: torch.randn(p.shape, generator=gen) * strength for k, p in pipe.unet.named_parameters() if "lora_B" in k}

    def save(name, scale, beta):
        with torch.no_grad():
            for k, p in pipe.unet.named_parameters():
                if k in b:
                    p.copy_(b[k] * scale)
        save_lora(pipe, root / name / "lora", metadata={"beta": beta, "base": "toy", "method": "dpo"})
        (root / name / "summary.json").write_text(json.dumps({"wall_s": 10.0}))
        return root / name

    runs = {name: save(name, scale, beta) for name, scale, beta in [
        ("aligned", 1.0, 1.0), ("lambda-0.25", 0.25, 4.0), ("lambda-0.75", 0.75, 4 / 3), ("lambda-0.5", 0.5, 2.0),
        # a baseline set that does not match: each claims the other's beta
        ("claims-0.25", 0.75, 4.0), ("claims-0.75", 0.25, 4 / 3)]}
    return runs


@pytest.mark.slow
def test_matching_end_to_end_on_the_toy_world_passes_and_fails(tmp_path, one_thread):
    """evaluate -> search under a path-KL budget -> validate (matching table, selection check) ->
    report, on the shipped toy pipeline with 4 DDIM steps; then a baseline set whose betas are
    swapped, on which matching FAILS."""
    from deradiff.cli import main
    from deradiff.evaluation.results import RESULTS, read_rows

    runs = _scaled_loras(tmp_path)
    out = tmp_path / "eval"
    common = ["--pipeline", "toy", "--lora", str(runs["aligned"]), "--prompts", "toy:test", "--max-prompts", "8",
              "--seeds", "0", "1", "2", "--steps", "4", "--scheduler", "ddim", "--eta", "1.0", "--reward", "toy",
              "--n-boot", "200", "--out", str(out)]
    assert main(["evaluate", *common, "--lam", "0.25"]) == 0
    kl = [r["path_kl"] for r in read_rows(out / RESULTS) if r["lam"] == "0.25"]
    budget = 6 * sum(kl) / len(kl)  # path KL ~ lambda^2: lambda 0.5 (4x) fits, 0.75 (9x) does not
    assert main(["search", *common, "--grid", "0.25", "0.5", "0.75", "1", "--refine", "0", "--maximize", "reward/toy",
                 "--max-path-kl", f"{budget:.6g}"]) == 0
    search = json.loads((out / "search.json").read_text())
    assert search["max_path_kl"] == pytest.approx(budget, rel=1e-5) and search["chosen_lambda"] in (0.25, 0.5)
    assert all((p["objective"] == float("-inf")) == (p["path_kl"] > budget) for p in search["evaluated"])

    baselines = [str(runs[n]) for n in ("aligned", "lambda-0.25", "lambda-0.75")]
    assert main(["validate", *common, "--baselines", *baselines, "--selected", str(runs["lambda-0.5"]),
                 "--no-lora-scale"]) == 0
    record = json.loads((out / "validation.json").read_text())
    matching = record["matching"]
    assert [(b["label"], b["tested"]) for b in matching["baselines"]] == [
        ("lambda-0.25", True), ("lambda-0.75", True), ("aligned", False)]  # the selected run is no column
    assert matching["primary"] == "kid" and matching["accuracy"] == [2, 2]
    check = record["search_check"]
    assert check["source"] == "selected" and check["nearest_lambda"] == 0.5 and check["meets_budget"] is True
    assert "lambda-0.75" not in check["feasible"] and "aligned" not in check["feasible"]
    assert "### Matching" in (out / "validation.md").read_text()
    # the sweep is the two baselines (10 s each): not the aligned LoRA, not the --selected run
    assert record["compute"]["sweep_train_s"] == 20.0 and record["compute"]["sweep_runs"] == 2

    swapped = [str(runs[n]) for n in ("aligned", "claims-0.25", "claims-0.75")]
    assert main(["validate", *common, "--baselines", *swapped, "--no-lora-scale"]) == 0
    failed = json.loads((out / "validation.json").read_text())["matching"]
    assert failed["accuracy"] == [0, 2]
    assert [r["nearest"] for r in failed["distances"]["kid"]["rows"]] == ["claims-0.75", "claims-0.25"]

    assert main(["report", "--eval", str(out), "--n-boot", "100"]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "matching (kid): the nearest baseline is the matching one for 0/2 lambdas" in text
    assert "Path-KL budget:" in text and (out / "report" / "matching.csv").stat().st_size > 0
