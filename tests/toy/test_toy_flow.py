"""The toy world's flow-matching twin (deradiff.toy.flow): shipped weights verified and sampling
deterministically, its quality bar, smoke-sized pretraining, and its registry entry."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deradiff.errors import UserError
from deradiff.toy.flow import (
    FLOW_ASSET_DIR,
    T5_TOKENS,
    build_flow_pipeline,
    flow_sampling_kwargs,
    load_flow_pipeline,
)
from deradiff.toy.pipeline import IMAGE_SIZE

PROMPTS = ["a red circle on a dark background", "a blue cross on a light background"]
SMOKE = dict(pool_size=64, steps=3, batch=8, eval_images=4)


@pytest.fixture(scope="module")
def shipped():
    return load_flow_pipeline()


def _sample(pipe, prompts, seed=0, **kw):
    kwargs = {**flow_sampling_kwargs(), "num_inference_steps": 2, **kw}
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_registry_resolves_toy_flow():
    from deradiff.plugins import model_entry

    entry = model_entry("toy-flow")
    assert entry is not None and entry.family == "sd3" and entry.default_prompts == "toy:train"
    assert entry.sampling_defaults["max_sequence_length"] == T5_TOKENS
    assert entry.sampling_defaults["height"] == IMAGE_SIZE
    assert set(entry.identity()) == {"toy_flow_manifest_sha256"} and entry.identity()["toy_flow_manifest_sha256"]
    entry.check_prompt(PROMPTS[0])
    with pytest.raises(UserError, match="magenta"):
        entry.check_prompt("a magenta cross on a light background")
    assert type(entry.load()).__name__ == "StableDiffusion3Pipeline"


def test_shipped_flow_pipeline_is_an_sd3_pipeline_on_the_toy_vae(shipped):
    from deradiff.toy.pipeline import load_toy_pipeline
    from deradiff.toy.store import verify_manifest

    manifest = verify_manifest(FLOW_ASSET_DIR)
    assert "pipeline/transformer/diffusion_pytorch_model.safetensors" in manifest
    assert sum((FLOW_ASSET_DIR / name).stat().st_size for name in manifest) < 12 * 2**20
    assert shipped.text_encoder_3 is None and shipped.tokenizer_3 is None
    assert type(shipped.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    toy_vae = load_toy_pipeline().vae.state_dict()
    assert all(torch.equal(v, toy_vae[k]) for k, v in shipped.vae.state_dict().items())
    quality = json.loads((FLOW_ASSET_DIR / "quality.json").read_text())["quality"]
    assert quality["n"] == 512 and quality["color"] >= 0.90 and quality["shape"] >= 0.80


def test_shipped_flow_pipeline_samples_deterministically(shipped):
    a, b = _sample(shipped, PROMPTS, seed=3), _sample(shipped, PROMPTS, seed=3)
    assert a.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.equal(a, b)
    assert not torch.equal(a, _sample(shipped, PROMPTS, seed=4))


def test_damaged_flow_assets_are_refused(tmp_path):
    root = tmp_path / "flow"
    shutil.copytree(FLOW_ASSET_DIR, root)
    weights = root / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checksum mismatch.*toy pretrain --family flow"):
        load_flow_pipeline(root)
    with pytest.raises(UserError, match="--family flow --out"):
        load_flow_pipeline(tmp_path / "nowhere")


def test_shipped_flow_pipeline_meets_the_quality_bar(shipped):
    from deradiff.toy.quality import measure_quality

    report = measure_quality(shipped, n=64, seed=1, **{**flow_sampling_kwargs(), "num_inference_steps": 10})
    # 64 images: the bar minus a margin of about two standard errors
    assert report.color >= 0.82 and report.shape >= 0.70, report.summary()


def test_flow_pretraining_is_deterministic_and_writes_a_verified_root(tmp_path):
    from deradiff.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow
    from deradiff.toy.store import verify_manifest

    sums = []
    for name in ("a", "b"):
        results = pretrain_flow(FlowPretrainConfig(**SMOKE), tmp_path / name, progress=False)
        manifest = verify_manifest(tmp_path / name)
        sums.append({k: v for k, v in manifest.items() if k != "quality.json"})  # timings differ
    assert sums[0] == sums[1]
    assert results["quality"]["n"] == 4 and results["config"]["steps"] == 3
    pipe = load_flow_pipeline(tmp_path / "a" / "pipeline")  # the pipeline/ folder names its root too
    assert _sample(pipe, PROMPTS[:1]).shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    weights = "pipeline/transformer/diffusion_pytorch_model.safetensors"
    pretrain_flow(FlowPretrainConfig(**{**SMOKE, "seed": 1}), tmp_path / "c", progress=False)
    assert verify_manifest(tmp_path / "c")[weights] != sums[0][weights]
    assert not list(tmp_path.glob(".tmp-*")), "temporary folder left behind"


def test_bad_flow_settings_are_refused_before_work(tmp_path):
    from deradiff.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow

    with pytest.raises(UserError, match="steps must be positive"):
        pretrain_flow(FlowPretrainConfig(steps=0), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_rectified_flow_loss_regresses_eps_minus_x0():
    from deradiff.toy.flow import encode_texts, logit_normal_sigmas, rectified_flow_loss

    pipe = build_flow_pipeline(seed=0)
    embeds, pooled = encode_texts(pipe, PROMPTS)
    assert embeds.shape[1] == pipe.tokenizer.model_max_length + T5_TOKENS and pooled.shape == (2, 128)
    s = logit_normal_sigmas(10_000, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.02  # logit-normal(0, 1), no shift

    class Oracle(torch.nn.Module):  # predicts eps - x0 exactly, knowing both from the generator
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            s = (timestep / 1000).view(-1, 1, 1, 1)
            noise = (hidden_states - (1 - s) * x0) / s
            return type("Out", (), {"sample": noise - x0})()

    x0 = torch.randn(2, 4, 16, 16)
    loss = rectified_flow_loss(Oracle(), x0, embeds, pooled, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_nested_asset_roots_stay_out_of_the_parent_manifest_and_survive_its_rewrite(tmp_path):
    from deradiff.toy.pretrain import write_asset_root
    from deradiff.toy.store import verify_manifest, write_manifest

    root = tmp_path / "assets"
    (root / "flow").mkdir(parents=True)
    (root / "old.txt").write_text("old")
    (root / "flow" / "weights.bin").write_bytes(b"flow")
    write_manifest(root / "flow")
    assert set(write_manifest(root) and verify_manifest(root)) == {"old.txt"}

    write_asset_root(root, build_flow_pipeline(seed=0), {"quality": None})
    assert not (root / "old.txt").exists() and (root / "flow" / "weights.bin").read_bytes() == b"flow"
    verify_manifest(root / "flow")
    assert not any(name.startswith("flow/") for name in verify_manifest(root))


def test_pretrain_command_routes_the_flow_family(monkeypatch, tmp_path):
    from deradiff import cli
    from deradiff.toy import flow_pretrain

    seen = {}

    def fake(cfg, out, progress=True):
        seen.update(cfg=cfg, out=out)
        return {"timings": {"total_s": 1.0}}

    monkeypatch.setattr(flow_pretrain, "pretrain_flow", fake)
    assert cli.main(["toy", "pretrain", "--family", "flow", "--transformer-steps", "7"]) == 0
    assert seen["cfg"].steps == 7 and seen["cfg"].pool_size == flow_pretrain.FlowPretrainConfig().pool_size
    assert seen["out"] == str(FLOW_ASSET_DIR)
