"""The toy StableDiffusionPipeline: tokenizer, prompt checks, build/save/load round trip,
checksummed loading of shipped weights, prompt split, and the shipped quality bar (slow)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deradiff.errors import UserError
from deradiff.toy import domain, prompts
from deradiff.toy.pipeline import (
    IMAGE_SIZE,
    build_toy_pipeline,
    check_prompt,
    load_toy_pipeline,
    toy_sampling_kwargs,
)
from deradiff.toy.tokenizer import MAX_LENGTH, build_toy_tokenizer, vocab_size

FAST = dict(num_inference_steps=2, guidance_scale=3.0, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return build_toy_pipeline(seed=0)


def _images(pipe, captions, seed=0, **kw):
    return pipe(captions, generator=torch.Generator().manual_seed(seed), **{**FAST, **kw}).images


def test_tokenizer_has_one_token_per_toy_word():
    tok = build_toy_tokenizer()
    assert len(tok) == vocab_size()
    for word in domain.VOCABULARY:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    for caption in domain.all_captions():
        ids = tok(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= MAX_LENGTH
    assert tok.convert_ids_to_tokens(tok("")["input_ids"]) == ["<|startoftext|>", "<|endoftext|>"]


def test_check_prompt_names_unknown_words():
    assert check_prompt("a blue cross on a light background").shape == "cross"
    with pytest.raises(UserError, match="magenta"):
        check_prompt("a magenta cross on a light background")
    with pytest.raises(UserError, match="must name one shape"):
        check_prompt("a blue on a light background")


def test_sampling_kwargs_give_images_of_the_toy_size(pipe):
    kwargs = toy_sampling_kwargs()
    assert {"num_inference_steps", "guidance_scale", "height", "width", "output_type"} <= set(kwargs)
    out = pipe(["a red circle on a dark background"], generator=torch.Generator().manual_seed(0),
               **{**kwargs, "num_inference_steps": 2}).images
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out.min() >= 0 and out.max() <= 1


def test_build_is_seeded(pipe):
    again, other = build_toy_pipeline(seed=0), build_toy_pipeline(seed=1)
    w = pipe.unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight)
    assert not torch.equal(w, other.unet.conv_in.weight)


def test_save_and_from_pretrained_round_trip_offline(pipe, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    captions = ["a red circle on a dark background", "a green cross on a light background"]
    assert torch.equal(_images(pipe, captions), _images(loaded, captions))
    assert len(loaded.tokenizer) == vocab_size()
    assert loaded.scheduler.config.clip_sample is False


def _asset_root(pipe, root):
    from deradiff.toy.classifier import ShapeClassifier, save_classifier
    from deradiff.toy.store import write_manifest

    pipe.save_pretrained(root / "pipeline", safe_serialization=True)
    save_classifier(ShapeClassifier(), root / "classifier")
    write_manifest(root)
    return root


def test_load_toy_pipeline_verifies_checksums(pipe, tmp_path):
    root = _asset_root(pipe, tmp_path / "assets")
    loaded = load_toy_pipeline(root)
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert load_toy_pipeline(root / "pipeline").unet is not None  # the pipeline folder works too

    weights = root / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checksum mismatch.*deradiff toy pretrain"):
        load_toy_pipeline(root)
    weights.unlink()
    with pytest.raises(UserError, match=r"missing.*deradiff toy pretrain"):
        load_toy_pipeline(root)
    (root / "manifest.json").unlink()
    with pytest.raises(UserError, match="deradiff toy pretrain"):
        load_toy_pipeline(root)
    with pytest.raises(UserError, match="does not exist"):
        load_toy_pipeline(tmp_path / "nowhere")


def test_prompt_split_is_a_fixed_balanced_partition():
    test, train = prompts.test_prompts(), prompts.train_prompts()
    assert test == prompts.test_prompts() and train == prompts.train_prompts()
    assert not set(test) & set(train) and sorted(test + train) == sorted(domain.all_captions())
    specs = [domain.parse_caption(c) for c in test]
    assert {s.shape for s in specs} == set(domain.SHAPES)
    assert {s.color for s in specs} == set(domain.COLOR_NAMES)
    # every held-out caption's shape-color pair is seen in training with the other background
    train_pairs = {(s.shape, s.color) for s in map(domain.parse_caption, train)}
    assert all((s.shape, s.color) in train_pairs for s in specs)


def test_shipped_assets_match_their_manifest():
    from deradiff.toy.store import ASSET_DIR, verify_manifest

    manifest = verify_manifest(ASSET_DIR)
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in manifest
    total = sum((ASSET_DIR / name).stat().st_size for name in manifest)
    assert total < 20 * 2**20
    quality = json.loads((ASSET_DIR / "quality.json").read_text())["quality"]
    assert quality["color"] >= 0.90 and quality["shape"] >= 0.80


def test_shipped_pipeline_draws_the_prompt_not_a_fixed_image():
    pipe = load_toy_pipeline()
    red, blue = (_images(pipe, [f"a {c} square on a dark background"] * 4, num_inference_steps=10)
                 for c in ("red", "blue"))
    # channel means: red prompts are redder than blue prompts, and vice versa
    assert red[:, 0].mean() > blue[:, 0].mean() and blue[:, 2].mean() > red[:, 2].mean()


@pytest.mark.slow
def test_shipped_pipeline_meets_the_quality_bar():
    from deradiff.toy.quality import measure_quality

    report = measure_quality(load_toy_pipeline(), n=96, seed=1)
    # 96 images: the bar minus a margin of about two standard errors
    assert report.color >= 0.84 and report.shape >= 0.72, report.summary()


def test_copied_assets_load_from_a_path(tmp_path):
    from deradiff.toy.store import ASSET_DIR

    shutil.copytree(ASSET_DIR, tmp_path / "copy", ignore=shutil.ignore_patterns("__pycache__"))
    assert load_toy_pipeline(tmp_path / "copy").vae.config.scaling_factor > 0
