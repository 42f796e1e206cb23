"""The hub recipes (SD1.5/SDXL/SD3.5-M/FLUX.1-dev DPO, SD1.5/SD3.5-M KL) run their real code path
on tiny stand-in pipelines of the same architecture (tests/conftest.py, tests/tiny_flow.py):
only model/data locations and sizes are overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_sd15, build_tiny_sdxl
from tiny_flow import MAX_SEQUENCE_LENGTH, build_tiny_flux, build_tiny_sd3

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "model.vae_name_or_path": "null", "model.mixed_precision": "no", "data.resolution": 32,
    "data.eval_path": "null", "data.eval_split": "null", "data.eval_prompts": "null", "data.verify_images": "true",
    "trainer.max_steps": 2, "trainer.per_device_batch_size": 2, "trainer.gradient_accumulation": 2,
    "trainer.warmup_steps": 0, "trainer.checkpoint_every": 2, "trainer.eval_every": 0, "trainer.sample_every": 0,
    "sample.prompts": "[]",
}


@pytest.mark.parametrize("recipe,builder,extra", [
    ("sd15-dpo-pickapic", build_tiny_sd15, {}),
    ("sdxl-dpo-pickapic", build_tiny_sdxl, {}),
    ("sd15-kl-pickscore", build_tiny_sd15, {"method.reward": "toy", "method.num_steps": 3, "data.prompts": "toy"}),
    # Flow families: slow (about 20 s each on 2 CPU cores); CI runs them.
    pytest.param("sd35m-dpo-pickapic", build_tiny_sd3, {"model.max_sequence_length": MAX_SEQUENCE_LENGTH},
                 marks=pytest.mark.slow),
    pytest.param("flux-dev-dpo-pickapic", build_tiny_flux, {"model.max_sequence_length": MAX_SEQUENCE_LENGTH},
                 marks=pytest.mark.slow),
    pytest.param("sd35m-kl-pickscore", build_tiny_sd3,
                 {"model.max_sequence_length": MAX_SEQUENCE_LENGTH, "method.reward": "toy", "method.num_steps": 3,
                  "data.prompts": "toy", "method.samples_per_prompt": 2, "model.drop_text_encoders": "true"},
                 marks=pytest.mark.slow),
])
def test_hub_recipe_runs_on_a_tiny_standin(recipe, builder, extra, toy_world, tmp_path):
    pipe = builder(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "run"
    overrides = {**SMALL, "model.name_or_path": str(tmp_path / "pipe"), "trainer.output_dir": str(out), **extra}
    if "dpo" in recipe:
        overrides.update({"data.source": "parquet", "data.path": str(toy_world / "prefs" / "train.parquet")})
    cmd = [sys.executable, str(ROOT / "train" / "align.py"), f"recipe=recipes/{recipe}.yaml",
           *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    loss_key = "dpo/loss" if "dpo" in recipe else "kl/loss"
    assert loss_key in summary
