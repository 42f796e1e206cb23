"""The toy rewards (vividness "toy", contrast "toy_contrast"): formula properties, gradients,
batching, and that the vivid one can be hacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deradiff.errors import UserError
from deradiff.toy import domain
from deradiff.toy.reward import (
    ToyContrastReward,
    ToyReward,
    contrast_reward,
    luma_map,
    toy_reward,
    vividness_map,
)


def _render(shape="circle", color="red", background="dark", radius=0.3, cx=0.5, cy=0.5):
    spec = domain.ShapeSpec(shape, color, background, cx, cy, radius)
    return domain.to_tensor(domain.render(spec))[None]


def _real(n: int, seed: int = 0, captions=None) -> tuple[torch.Tensor, list[str]]:
    data = domain.ShapesDataset(n, seed=seed, captions=captions)
    items = [data[i] for i in range(n)]
    return torch.stack([it["pixel_values"] for it in items]), [it["caption"] for it in items]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest


@pytest.fixture(scope="module")
def classifier():
    """The shipped toy classifier (the judge of prompt adherence)."""
    from deradiff.toy.classifier import load_classifier

    return load_classifier()


def test_range_gray_and_pure_colors():
    gray = torch.full((2, 3, 16, 16), 0.3)
    pure = torch.zeros(6, 3, 16, 16) - 1  # the six vivid corners of the RGB cube
    for i, rgb in enumerate([(1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 1, 1), (0, 0, 1), (1, 0, 1)]):
        pure[i] = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) * 2 - 1
    assert torch.allclose(toy_reward(gray), torch.zeros(2), atol=1e-7)
    assert torch.allclose(toy_reward(pure), torch.ones(6), atol=1e-5)
    real, _ = _real(64)
    r = toy_reward(real)
    assert r.shape == (64,) and (r > 0).all() and (r < 0.5).all()


def test_prefers_vivid_and_large():
    large, small = _render(radius=0.34), _render(radius=0.15)
    assert toy_reward(large) > 1.5 * toy_reward(small)
    vivid = _render(color="red")
    dull = domain.to_tensor(
        (0.5 * domain.render(domain.ShapeSpec("circle", "red", "dark")) + 0.5 * 128).astype(np.uint8)
    )[None]  # same shape, colors halfway to gray
    assert toy_reward(vivid) > 2 * toy_reward(dull)
    assert toy_reward(_render(color="purple")) < toy_reward(_render(color="yellow"))  # dull vs bright hue


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 7, 7, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: toy_reward(t), (x,), eps=1e-6, atol=1e-6)
    r = toy_reward(x)
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gray_background_far_from_shape_gets_no_gradient():
    x = _render(radius=0.15, cx=0.3, cy=0.3).requires_grad_(True)
    toy_reward(x).sum().backward()
    grad = x.grad[0].abs().sum(0)
    assert grad[:12, :12].sum() > 0  # on and around the shape
    assert grad[-6:, -6:].max() == 0  # gray corner beyond the blur's reach: squared chroma, zero slope


def test_batching_equals_per_sample():
    x, captions = _real(10, seed=3)
    batched = toy_reward(x, captions)
    single = torch.cat([toy_reward(x[i : i + 1], captions[i : i + 1]) for i in range(10)])
    assert torch.allclose(batched, single, atol=1e-6)
    assert torch.allclose(ToyReward().score(x, captions), batched)


def test_dtype_and_shape_checks():
    x, captions = _real(3)
    assert toy_reward(x.double()).dtype == torch.float64
    assert vividness_map(x).shape == (3, 32, 32)
    with pytest.raises(UserError, match="B, 3, H, W"):
        toy_reward(x[:, :2])
    with pytest.raises(UserError, match="one prompt per image"):
        ToyReward().score(x, captions[:2])
    with pytest.raises(UserError, match="blur_sigma"):
        ToyReward(blur_sigma=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_gpu():
    x, _ = _real(4)
    assert torch.allclose(toy_reward(x.cuda()).cpu(), toy_reward(x), atol=1e-5)
    assert torch.allclose(contrast_reward(x.cuda()).cpu(), contrast_reward(x), atol=1e-5)


# -- toy_contrast: a second reward with another optimum (multi-objective realignment) ----------


def test_contrast_ranks_large_shapes_above_small_ones_on_every_color_and_background():
    for color in domain.COLOR_NAMES:
        for background in domain.BACKGROUND_NAMES:
            for shape in domain.SHAPES:
                large = _render(shape, color, background, radius=0.34)
                small = _render(shape, color, background, radius=0.15)
                assert contrast_reward(large) > 2 * contrast_reward(small), (shape, color, background)


def test_contrast_optimum_differs_from_the_vivid_optimum():
    half = torch.ones(1, 3, 32, 32)
    half[..., :16] = -1  # left half black, right half white
    pure_red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert contrast_reward(half) > 0.9 and toy_reward(half) == 0  # contrast's optimum: no vividness
    assert toy_reward(pure_red) > 0.99 and contrast_reward(pure_red).abs() < 1e-10  # and the reverse
    # On the domain the two disagree: yellow on light is vivid but low-contrast, blue on light the reverse.
    yellow, blue = _render(color="yellow", background="light"), _render(color="blue", background="light")
    assert toy_reward(yellow) > toy_reward(blue) and contrast_reward(yellow) < 0.1 * contrast_reward(blue)


def test_contrast_range_shape_batching_and_prompt_ignored():
    x, captions = _real(16, seed=5)
    r = contrast_reward(x)
    assert r.shape == (16,) and (r >= 0).all() and (r <= 1).all()
    assert luma_map(x).shape == (16, 32, 32)
    single = torch.cat([contrast_reward(x[i : i + 1]) for i in range(16)])
    assert torch.allclose(r, single, atol=1e-6)
    assert torch.allclose(ToyContrastReward().score(x, captions), r)
    assert torch.allclose(ToyContrastReward().score(x, ["a"] * 16), r)
    assert contrast_reward(x.double()).dtype == torch.float64
    with pytest.raises(UserError, match="B, 3, H, W"):
        contrast_reward(x[:, :2])
    with pytest.raises(UserError, match="blur_sigma"):
        ToyContrastReward(blur_sigma=-1)


def test_contrast_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 7, 7, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: contrast_reward(t), (x,), eps=1e-6, atol=1e-6)
    image = _render(radius=0.2).requires_grad_(True)
    contrast_reward(image).sum().backward()
    assert image.grad.abs().sum() > 0


def test_contrast_is_registered_as_a_differentiable_reward():
    from deradiff.rewards import get_reward, is_differentiable

    reward = get_reward("toy_contrast")
    assert isinstance(reward, ToyContrastReward) and reward.name == "toy_contrast"
    assert is_differentiable("toy_contrast")
    x, captions = _real(2)
    torch.testing.assert_close(reward.score(x, captions), contrast_reward(x))


def test_hackable_unleashed_ascent_destroys_fidelity_leashed_keeps_it(classifier):
    from deradiff.toy.hack import leashed_ascent
    from deradiff.toy.metrics import FidelityJudge

    judge = FidelityJudge(classifier, n_reference=16)
    x0, captions = _real(24, seed=11, captions=domain.all_captions()[::2])
    before = judge.adherence(x0, captions)["all"].float().mean()
    leashed = leashed_ascent(x0, captions, toy_reward, leash=10.0, steps=150)
    free = leashed_ascent(x0, captions, toy_reward, leash=0.0, steps=150)
    r0, r_leashed, r_free = (toy_reward(x).mean() for x in (x0, leashed, free))
    assert r0 < r_leashed < r_free and r_free > 0.8
    assert before >= 0.9
    assert judge.adherence(leashed, captions)["all"].float().mean() >= before - 0.1
    assert judge.adherence(free, captions)["all"].float().mean() <= 0.5
    # the whole image has turned one color: almost no spatial variation left
    assert free.std(dim=(2, 3)).mean() < 0.25 * x0.std(dim=(2, 3)).mean()
