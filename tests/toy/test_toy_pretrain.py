"""`deradiff toy pretrain` on a smoke-sized config, and the quality measurement."""

from __future__ import annotations

import json

import pytest
import torch

from deradiff.errors import UserError
from deradiff.toy.pretrain import PretrainConfig, pretrain

SMOKE = dict(classifier_steps=3, vae_steps=3, vae_batch=4, pool_size=96, unet_steps=3, unet_batch=8, eval_images=4)


def test_smoke_pretrain_writes_a_loadable_verified_asset_root(tmp_path):
    from deradiff.toy.classifier import load_classifier
    from deradiff.toy.pipeline import load_toy_pipeline
    from deradiff.toy.store import verify_manifest

    out = tmp_path / "assets"
    results = pretrain(PretrainConfig(**SMOKE), out, progress=False)
    manifest = verify_manifest(out)
    assert {"pipeline/model_index.json", "classifier/model.safetensors", "quality.json"} <= set(manifest)
    saved = json.loads((out / "quality.json").read_text())
    assert saved["quality"]["n"] == 4 and saved["config"]["unet_steps"] == 3
    pipe = load_toy_pipeline(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(results["vae_scaling_factor"])
    assert load_classifier(out).config.width > 0
    assert not list(tmp_path.glob(".assets.*")), "temporary folder left behind"


def test_bad_settings_are_refused_before_work(tmp_path):
    with pytest.raises(UserError, match="unet_steps must be positive"):
        pretrain(PretrainConfig(unet_steps=0), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_measure_quality_scores_against_the_prompts():
    from deradiff.toy.classifier import ShapeClassifier
    from deradiff.toy.pipeline import build_toy_pipeline
    from deradiff.toy.quality import labels_of, measure_quality

    torch.manual_seed(0)
    report = measure_quality(build_toy_pipeline(), ShapeClassifier().eval(), n=6, batch_size=3,
                             num_inference_steps=2)
    assert report.n == 6 and 0 <= report.color <= 1 and report.num_inference_steps == 2
    labels = labels_of(["a red circle on a dark background", "a blue cross on a light background"])
    assert labels["color"].tolist() == [0, 2] and labels["shape"].tolist() == [0, 3]


def test_pretraining_is_deterministic(tmp_path):
    from deradiff.toy.store import verify_manifest

    sums = []
    for name in ("a", "b"):
        pretrain(PretrainConfig(**SMOKE), tmp_path / name, progress=False)
        manifest = verify_manifest(tmp_path / name)
        sums.append({k: v for k, v in manifest.items() if k != "quality.json"})  # timings differ
    assert sums[0] == sums[1]
    changed = pretrain(PretrainConfig(**{**SMOKE, "seed": 1}), tmp_path / "c", progress=False)
    assert changed["config"]["seed"] == 1
    assert verify_manifest(tmp_path / "c")["pipeline/unet/diffusion_pytorch_model.safetensors"] != \
        sums[0]["pipeline/unet/diffusion_pytorch_model.safetensors"]
