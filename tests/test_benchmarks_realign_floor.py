"""benchmarks/realign_floor.py at a tiny size: every arm runs, the cheaper mixed-batch routings
give what peft's per-row routing and two forwards give, and the model is left as it was."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def floor():
    """The benchmark module (benchmarks/ on sys.path for its `common` and `realign` imports);
    those top-level names are dropped from sys.modules afterwards."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        yield importlib.import_module("realign_floor")
    for name in {"realign_floor", "realign", "common"} - before:
        sys.modules.pop(name, None)


def test_routings_agree_with_peft_and_restore_the_model(floor):
    lora_unet, plain, layers, merged = floor.build_models(16)
    weights = {layer: layer.base_layer.weight for layer in layers}
    inputs = floor.make_inputs(lora_unet, rows=2, side=8)
    arms = floor.make_arms(lora_unet, plain, layers, merged, inputs)
    assert tuple(arms) == floor.ARMS
    checks = floor.check_outputs(lora_unet, inputs, arms)
    for name in floor.MIX_ARMS:
        assert checks[name]["mix_max_abs_diff"] <= 1e-5, (name, checks[name])
        assert checks[name].get("delta_max_abs_diff", 0.0) <= 1e-5, (name, checks[name])
    assert checks["delta_max_abs"] > 1e-3  # the LoRA changes the output: the check has teeth
    assert not any("forward" in vars(layer) for layer in layers)  # routed_rows took its forwards back
    assert all(layer.base_layer.weight is weight for layer, weight in weights.items())  # merged_weights too
    assert not any(layer._disable_adapters for layer in layers)
    with torch.no_grad():  # the LoRA still applies after all arms ran
        assert torch.equal(arms["lora_on"](), arms["lora_on"]())
    profiled = floor.profile_arms(arms, ("plain_one_call", "mixed_mask"), calls=1)
    assert profiled["mixed_mask"]["aten_ops_per_call"] > profiled["plain_one_call"]["aten_ops_per_call"] > 0


@pytest.mark.slow
def test_realign_floor_benchmark_runs_end_to_end(floor, tmp_path):
    out = tmp_path / "floor.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "realign_floor.py"), "--width", "16", "--shapes", "1x8", "2x4",
         "--repeats", "1", "--threads", "1", "--no-profile", "--out", str(out)],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["rows"], r["latent_side"]) for r in result["results"]] == [(1, 8), (2, 4)]
    for shape in result["results"]:
        assert set(shape["ms_per_call"]) == set(floor.ARMS)
        assert all(v > 0 for v in shape["ms_per_call"].values())
        assert all(c["mix_max_abs_diff"] <= 1e-5 for c in shape["checks"].values() if isinstance(c, dict))
    assert set(result["summary"]) == {"1x8", "2x4"}
    assert "floor_one_call_vs_two_calls" in proc.stdout
