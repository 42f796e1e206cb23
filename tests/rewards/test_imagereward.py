"""ImageReward through its real loading code on a tiny random model in the published checkpoint
layout (tiny_imagereward.py), checked against scores from the image-reward package itself
(imagereward_reference.py). Nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_imagereward import MED, PROMPTS, VISION, images_uint8, tiny_state, write_vocab

from deradiff.errors import UserError
from deradiff.rewards import get_reward, is_differentiable
from deradiff.rewards.imagereward import SCORE_MEAN, SCORE_STD, ImageReward

# The package's ImageReward.score (image-reward 1.5, transformers 4.46.3, timm 0.6.13) on
# images_uint8(4, H, W) through its PIL/torchvision preprocessing, prompt i with image i.
REFERENCE_32x32 = [-1.1493076086044312, -0.5413435697555542, -0.28575387597084045, -1.820151925086975]
REFERENCE_40x48 = [-0.736880898475647, -0.8016051650047302, -0.4536267817020416, -1.372506856918335]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model as a published-style pickle (ImageReward.pt) and as safetensors, plus its
    tokenizer folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("imagereward")
    state = tiny_state()
    torch.save(state, root / "ImageReward.pt")
    save_file(state, root / "ImageReward.safetensors")
    write_vocab(root / "tok")
    return root


def _load(files, checkpoint="ImageReward.pt", **kwargs):
    kwargs = {"tokenizer": str(files / "tok"), "med_config": MED, "vision": VISION, **kwargs}
    return get_reward("imagereward", checkpoint=str(files / checkpoint), **kwargs)


@pytest.fixture(scope="module")
def reward(files):
    return _load(files)


def _images(h: int = 32, w: int = 32, n: int = len(PROMPTS)) -> torch.Tensor:
    return images_uint8(n, h, w).float() / 127.5 - 1


def test_scores_match_the_image_reward_package(reward):
    """Same weights, same images: our BLIP-from-transformers equals the package's model."""
    assert isinstance(reward, ImageReward) and not reward.training and is_differentiable("imagereward")
    with torch.no_grad():
        scores = reward.score(_images(), PROMPTS)
    torch.testing.assert_close(scores, torch.tensor(REFERENCE_32x32), atol=1e-4, rtol=0)


def test_resize_and_crop_follow_the_package(reward):
    """Non-square images larger than the ViT input: shorter side resized, center crop. Tensor
    bicubic vs PIL bicubic differ slightly; the scores spread over ~1 and agree within 0.03."""
    with torch.no_grad():
        scores = reward.score(_images(40, 48), PROMPTS)
    torch.testing.assert_close(scores, torch.tensor(REFERENCE_40x48), atol=0.03, rtol=0)
    assert scores.argsort().tolist() == torch.tensor(REFERENCE_40x48).argsort().tolist()


def test_pickle_and_safetensors_load_the_same_weights(reward, files):
    from_safetensors = _load(files, "ImageReward.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(from_safetensors.score(_images(), PROMPTS), reward.score(_images(), PROMPTS),
                                   atol=0, rtol=0)


def test_a_half_precision_checkpoint_loads_as_float32(reward, files, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.half() if v.is_floating_point() else v for k, v in tiny_state().items()}, tmp_path / "fp16.safetensors")
    half = _load(files, str(tmp_path / "fp16.safetensors"))
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(half.score(_images(), PROMPTS), reward.score(_images(), PROMPTS), atol=0.02, rtol=0)


def test_shapes_batching_and_determinism(reward):
    images = _images()
    with torch.no_grad():
        batch = reward.score(images, PROMPTS)
        again = reward(images, PROMPTS)
        singles = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(PROMPTS))])
    assert batch.shape == (len(PROMPTS),) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert batch.unique().numel() == len(PROMPTS)


def test_differentiable_wrt_images(reward):
    images = _images(40, 48, n=2).requires_grad_(True)
    reward.score(images, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_prompts_are_truncated_to_35_tokens(reward):
    long = PROMPTS[3]
    with torch.no_grad():
        scores = reward.score(_images()[[3, 3]], [long, long + ", a red circle"])
    assert scores[0] == scores[1]


def test_the_official_normalization_is_applied(files):
    """A head that outputs the constant c scores (c - mean) / std for every image."""
    reward = _load(files)
    last = reward.mlp.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.5)
        scores = reward.score(_images(), PROMPTS)
    expected = (1.5 - 0.16717362830052426) / 1.0333394966054072
    assert (SCORE_MEAN, SCORE_STD) == (0.16717362830052426, 1.0333394966054072)
    torch.testing.assert_close(scores, torch.full((len(PROMPTS),), expected), atol=1e-6, rtol=0)


def test_pickle_that_runs_code_is_refused(files, tmp_path):
    """weights_only=True: a checkpoint holding an arbitrary object is refused, never unpickled."""
    torch.save({**tiny_state(), "payload": np.dtype("float32")}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only"):
        _load(files, str(tmp_path / "evil.pt"))


def test_a_checkpoint_of_another_model_is_refused(files, tmp_path):
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(2, 2), **tiny_state()}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"not an ImageReward checkpoint: unexpected keys \['visual.proj'\]"):
        _load(files, str(tmp_path / "other.safetensors"))
    state = tiny_state()
    del state["mlp.layers.7.bias"]
    save_file(state, tmp_path / "no_head.safetensors")
    with pytest.raises(UserError, match=r"does not fit the ImageReward mlp model.*layers.7.bias"):
        _load(files, str(tmp_path / "no_head.safetensors"))


def test_a_tiny_checkpoint_does_not_fit_the_published_architecture(files):
    with pytest.raises(UserError, match="does not fit the ImageReward vision model.*vision="):
        _load(files, vision=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vision": {"depth": 2}}, r"unknown ImageReward vision field\(s\) \['depth'\]"),
        ({"med_config": {**MED, "vocab_size": 10}}, r"'.*tok' has 29 tokens with \[DEC\] and \[ENC\], the text encoder 10: pass tokenizer="),
        ({"med_config": "/nonexistent/med_config.json"}, "med_config=/path/to/file"),
    ],
)
def test_bad_options_are_user_errors(files, kwargs, match):
    with pytest.raises(UserError, match=match):
        _load(files, **kwargs)


def test_missing_weights_say_where_and_how(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"ImageReward weights 'ImageReward.pt' from hub repo 'THUDM/ImageReward'.*checkpoint="):
        get_reward("imagereward", tokenizer=str(files / "tok"), med_config=MED, vision=VISION)
    # transformers 5 loads a hub id that is not cached as a tokenizer of special tokens only (4 raised).
    with pytest.raises(UserError, match=r"ImageReward tokenizer.*'bert-base-uncased'.*tokenizer="):
        get_reward("imagereward", checkpoint=str(files / "ImageReward.pt"))
