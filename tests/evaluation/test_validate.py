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
from deradiff.evaluation.results import LORA_SCALE, REALIGNED, RETRAINED
from deradiff.evaluation.validate import compute_ratio, format_search_check, paired, search_check, validate


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
        from deradiff.training.recipe import Recipe, save_resolved

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
    compute = compute_ratio(record, ev, None)
    # 2 lambdas x 12 prompts x 0.5 s of realigned sampling against 80 s of training
    assert compute["sweep_train_s"] == 80.0 and compute["search_sample_s"] == 12.0
    assert compute["ratio"] == pytest.approx(80 / 12)
    from_search = compute_ratio(record, ev, {"cost": {"sample_s": 4.0}}, str(tmp_path / "search.json"))
    assert from_search["ratio"] == 20.0 and from_search["search_source"] == str(tmp_path / "search.json")


def test_search_check_compares_the_nearest_baseline_with_the_best():
    def row(lam, mean, lo, hi):
        return {"metric": "reward/x", "lam": lam, "retrained": [mean, lo, hi]}

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
