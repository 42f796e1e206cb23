"""The GPU benchmark's CPU-sized variant: the same code at tiny shapes, so the script a GPU
session runs once is known to work, and its built-in correctness check (LoRA-toggle and
two-model realignment give the same samples) holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(script: str, args: list[str], out: Path, timeout: int) -> subprocess.CompletedProcess:
    """benchmarks/<script>.py with args and --out out, one thread, offline; asserts it exits 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out", str(out)],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_gpu_benchmark_tiny_runs_and_agrees(tmp_path):
    out = tmp_path / "gpu.json"
    _run_benchmark("gpu", ["--tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "1", "--steps", "2"], out, timeout=300)
    result = json.loads(out.read_text())
    sampling = [r for r in result["rows"] if r["bench"] == "sampling"]
    assert {(r["family"], r["approach"], r["batch"]) for r in sampling} == {
        (f, a, b) for f in ("sd15", "sdxl", "sd3")
        for a in ("aligned_only", "two_forward", "mixed_batch", "mixed_stacked", "two_models") for b in (1, 4)}
    for r in sampling:  # same lambda and noise: LoRA toggle == a second full model with the LoRA merged
        assert r["two_forward_vs_two_models_max_abs"] <= 1e-4 * max(1.0, r["final_latent_max_abs"]), r
        assert r["sec_per_step"] > 0 and r["peak_gib"] is None  # memory is measured on CUDA only
    dpo = [r for r in result["rows"] if r["bench"] == "dpo_step"]
    variants = {(r["gradient_checkpointing"], r["cached"], r["split_backward"]): r for r in dpo}
    assert set(variants) == {(a, b, False) for a in (False, True) for b in (False, True)} | {(False, True, True),
                                                                                             (True, True, True)}
    assert all(0 < r["loss"] < 10 for r in dpo)
    for ckpt in (False, True):  # the same steps from the same weights: split_backward changes no number
        assert variants[(ckpt, True, True)]["loss"] == pytest.approx(variants[(ckpt, True, False)]["loss"], rel=1e-4)
    assert result["summary"]["sd15/b1/two_models/time_vs_two_models"] == 1.0


@pytest.mark.slow
def test_sweep_benchmark_tiny_shares_the_reference_errors_and_agrees(tmp_path):
    """benchmarks/sweep.py at 2 betas x 2 steps: the second shared run reads every micro-batch's
    reference errors and both sweeps log the same numbers."""
    out = tmp_path / "sweep.json"
    proc = _run_benchmark("sweep", ["--betas", "2", "--steps", "2", "--pairs", "16", "--heldout", "4"], out, timeout=600)
    result = json.loads(out.read_text())
    shared = result["results"]["repeats"][0]["shared"]["runs"]
    assert [r["stored"] for r in shared] == [0, 2] and [r["computed"] for r in shared] == [2, 0]
    assert result["summary"]["max_loss_diff"] <= 1e-6 and result["summary"]["max_eval_diff"] <= 1e-6
    assert result["summary"]["wall_ratio"] > 0 and "summary: wall_ratio=" in proc.stdout


@pytest.mark.slow
def test_sweep_benchmark_sd15_tiny_shares_the_reference_errors_and_agrees(tmp_path):
    """benchmarks/sweep.py --model sd15 --tiny (train_breakdown's SD1.5-shaped pipeline at toy
    widths, 64 px JPEG pairs, the SD1.5 recipe) at 2 betas x 2 steps: the JSON's structure, the
    second shared run reads every micro-batch's reference errors, both sweeps log the same numbers."""
    out = tmp_path / "sweep_sd15.json"
    proc = _run_benchmark("sweep", ["--model", "sd15", "--tiny", "--betas", "2", "--steps", "2", "--threads", "1"], out, timeout=300)
    result = json.loads(out.read_text())
    config = result["config"]
    assert (config["model"], config["tiny"], config["resolution"]) == ("sd15", True, 64)
    assert (config["batch"], config["pairs"], config["heldout"], config["draws"]) == (1, 2, 1, 4)
    assert "world" not in config and result["repeats_done"] == 1  # no removed temporary folder recorded
    params = result["world"]["params"]
    assert params["unet"] > params["vae"] > 0 and params["text_encoder"] > 0
    repeat = result["results"]["repeats"][0]
    for sweep in ("independent", "shared"):
        runs = repeat[sweep]
        assert [r["beta"] for r in runs["runs"]] == [500.0, 1000.0]
        assert runs["wall_s"] == pytest.approx(sum(r["wall_s"] for r in runs["runs"]))
        for r in runs["runs"]:
            assert len(r["losses"]) == 2 and r["eval"] and 0 < r["train_s"] < r["wall_s"] and r["peak_rss_mib"] > 0
    shared = repeat["shared"]["runs"]
    assert [r["stored"] for r in shared] == [0, 2] and [r["computed"] for r in shared] == [2, 0]
    summary = result["summary"]
    assert summary["max_loss_diff"] <= 1e-6 and summary["max_eval_diff"] <= 1e-6
    assert (summary["stored_micro_batches"], summary["micro_batches"]) == (2, 4)
    for key in ("wall_ratio", "cpu_ratio", "train_ratio", "peak_rss_mib"):
        assert summary[key] > 0, key
    assert "on tiny shape, 64 px" in proc.stdout and "summary: wall_ratio=" in proc.stdout


@pytest.mark.slow
def test_realign_benchmark_flow_family_tiny(tmp_path):
    """benchmarks/realign.py --family flow at the smallest size: an SD3 pipeline whose MM-DiT carries
    a LoRA, all four approaches, and the three realigned ones (LoRA toggle on two forwards or one
    doubled batch, or a second transformer with the LoRA merged) sample the same latents."""
    out = tmp_path / "realign_flow.json"
    proc = _run_benchmark("realign", ["--family", "flow", "--width", "128", "--size", "16", "--steps", "1", "--repeats", "1", "--threads", "1"], out, timeout=300)
    result = json.loads(out.read_text())
    assert result["config"]["family"] == "flow" and result["config"]["width"] == 128
    setup = result["setup"]
    assert setup["denoiser"] == "SD3Transformer2DModel" and setup["latent_shape"] == [1, 16, 8, 8]
    assert setup["denoiser_config"]["num_attention_heads"] * setup["denoiser_config"]["attention_head_dim"] == 128
    assert setup["denoiser_params_m"] > 10 * setup["other_components_params_m"]  # the transformer dominates
    results = result["results"]
    assert list(results) == ["aligned_only", "two_forward", "mixed_batch", "mixed_sliced", "two_copies"]
    for name, r in results.items():
        assert r["sec_per_image"] > 0 and r["sec_per_step"] > 0, name
        assert r["peak_mib"] >= 0 and r["transformer_params_m"] > 0, name
    assert results["two_copies"]["transformer_params_m"] == pytest.approx(setup["denoiser_params_m"])  # LoRA merged
    assert results["aligned_only"]["time_ratio_vs_aligned_only"] == 1.0
    assert results["two_copies"]["mem_ratio_vs_two_copies"] == 1.0
    summary = result["summary"]
    assert summary["realigned_checksum_rel_spread"] <= 1e-5
    assert summary["two_forward_mem_vs_two_copies"] > 0 and summary["mixed_batch_time_vs_aligned_only"] > 0
    assert summary["mixed_sliced_time_vs_two_forward"] > 0 and summary["mixed_sliced_mem_vs_aligned_only"] > 0
    assert "two_copies" in proc.stdout and "targets:" in proc.stdout


@pytest.mark.slow
def test_sampling_benchmark_runs_both_models(tmp_path):
    """benchmarks/sampling.py (what choose_mode's rule is measured by) at one batch and one step,
    both models: each builds, samples in every approach and lands in the JSON with its rule."""
    out = tmp_path / "sampling.json"
    _run_benchmark("sampling", ["--batches", "1", "--steps", "1", "--repeats", "1", "--threads", "1"], out, timeout=300)
    result = json.loads(out.read_text())
    for model in ("toy", "unet8m"):
        batch = result["results"][model]["batches"]["1"]
        assert all(batch[a]["sec_per_call"] > 0 for a in ("plain", "two_forward", "mixed_batch"))
        assert f"{model}_mixed_batch_max_rows" in result["summary"]


def test_rounds_rotate_the_approaches_and_take_medians(monkeypatch):
    """--rounds N: every approach's process runs N times, round r starting at approach r, and
    each numeric field is the median over its rounds."""
    from argparse import Namespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    order, seconds = [], {"a": iter([3.0, 1.0, 2.0, 7.0]), "b": iter([5.0, 4.0, 6.0])}

    def fake_run(cmd, **kwargs):
        approach = cmd[cmd.index("--worker") + 1]
        assert not any(word.startswith("--rounds") for word in cmd)
        order.append(approach)
        out = json.dumps({"sec": next(seconds[approach]), "name": approach, "flag": True})
        return subprocess.CompletedProcess(cmd, 0, stdout=f"log line\n{out}\n", stderr="")

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    results = common.run_workers("bench.py", ["a", "b"], Namespace(rounds=3, worker=None, out="x.json", size=8))
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert results["a"]["sec"] == 2.0 and results["b"]["sec"] == 5.0 and results["a"]["flag"] is True
    assert [r["sec"] for r in results["a"]["rounds"]] == [3.0, 1.0, 2.0] and results["b"]["name"] == "b"
    single = common.run_workers("bench.py", ["a"], Namespace(rounds=1, worker=None, out="x.json"))
    assert "rounds" not in single["a"]
