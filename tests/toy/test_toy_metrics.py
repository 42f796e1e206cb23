"""Prior-fidelity metrics: they must tell real images from shuffled captions, noise and copies."""

from __future__ import annotations

import math
import random

import pytest
import torch

from deradiff.errors import UserError
from deradiff.stats import Estimate
from deradiff.toy import domain
from deradiff.toy.metrics import FidelityJudge, fidelity_metrics, kernel_distance, mean_pairwise_distance

NAMES = ("color_acc", "shape_acc", "background_acc", "adherence", "diversity", "diversity_rel", "kid")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest


@pytest.fixture(scope="module")
def judge():
    """A judge with the shipped classifier."""
    from deradiff.toy.classifier import load_classifier

    return FidelityJudge(load_classifier(), n_reference=32)


@pytest.fixture(scope="module")
def real():
    """4 real images for each of 24 captions (a stream other than the judge's reference)."""
    captions = domain.all_captions()[::2]
    data = domain.ShapesDataset(96, seed=77, captions=[c for c in captions for _ in range(4)])
    items = [data[i] for i in range(96)]
    return torch.stack([it["pixel_values"] for it in items]), [it["caption"] for it in items]


def test_kernel_distance_is_torchmetrics_kid_for_equal_sizes():
    from torchmetrics.image.kid import poly_mmd

    torch.manual_seed(0)
    x, y = torch.randn(20, 8), torch.randn(20, 8) + 0.3
    assert kernel_distance(x, y).item() == pytest.approx(poly_mmd(x.double(), y.double()).item(), rel=1e-9)
    # unequal sizes: near zero for one distribution, large for a shifted one
    same = kernel_distance(torch.randn(300, 8), torch.randn(500, 8)).item()
    shifted = kernel_distance(torch.randn(300, 8), torch.randn(500, 8) + 1).item()
    assert abs(same) < 0.05 < shifted
    with pytest.raises(UserError, match="at least 2"):
        kernel_distance(x[:1], y)


def test_mean_pairwise_distance():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(pts).item() == pytest.approx((5 + 5 + 0) / 3)


def test_names_and_intervals(judge, real):
    images, captions = real
    metrics = judge.metrics(images, captions, n_boot=200)
    assert list(metrics) == [f"fidelity/{n}" for n in NAMES]
    for name, est in metrics.items():
        assert isinstance(est, Estimate)
        assert est.lo <= est.value <= est.hi, name
    assert metrics["fidelity/adherence"].value >= 0.9
    assert abs(metrics["fidelity/diversity_rel"].value - 1) < 0.2  # as varied as the data
    assert abs(metrics["fidelity/kid"].value) < 0.1


def test_shuffled_captions_drop_adherence(judge, real):
    images, captions = real
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    right = judge.metrics(images, captions, n_boot=300)
    wrong = judge.metrics(images, shuffled, n_boot=300)
    for name in ("fidelity/adherence", "fidelity/color_acc", "fidelity/shape_acc"):
        assert wrong[name].hi < right[name].lo, name
    assert wrong["fidelity/adherence"].value < 0.3
    assert wrong["fidelity/kid"].lo > right["fidelity/kid"].hi  # the images no longer match their prompts


def test_noise_and_copies_raise_the_distance(judge, real):
    images, captions = real
    base = judge.metrics(images, captions, n_boot=300)
    noise = judge.metrics(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                          captions, n_boot=300)
    assert noise["fidelity/kid"].lo > base["fidelity/kid"].hi
    assert noise["fidelity/adherence"].value < 0.3
    copies = images.view(24, 4, 3, 32, 32)[:, :1].expand(24, 4, 3, 32, 32).reshape(96, 3, 32, 32)
    collapsed = judge.metrics(copies, captions, n_boot=300)  # mode collapse: one image per prompt, 4 times
    assert collapsed["fidelity/diversity"].value == pytest.approx(0, abs=1e-6)
    assert collapsed["fidelity/kid"].lo > base["fidelity/kid"].hi


def test_one_image_per_prompt_leaves_per_prompt_metrics_undefined(judge, real):
    images, captions = real
    metrics = judge.metrics(images[::4], captions[::4], n_boot=50)
    assert metrics["fidelity/adherence"].value >= 0.9
    assert all(math.isnan(v) for v in metrics["fidelity/kid"])


def test_bad_input(judge, real):
    images, captions = real
    with pytest.raises(UserError, match="toy vocabulary"):
        judge.metrics(images[:2], ["a red circle on a dark background", "a pink circle on a dark background"])
    with pytest.raises(UserError, match="one prompt per image"):
        judge.metrics(images[:3], captions[:2])
    with pytest.raises(UserError, match="float images"):
        judge.metrics(images[:2, 0], captions[:2])


def test_one_shot_function_matches_the_judge(judge, real):
    images, captions = real
    a = fidelity_metrics(images[:16], captions[:16], judge.classifier, n_reference=32, n_boot=100)
    b = judge.metrics(images[:16], captions[:16], n_boot=100)
    for name in a:
        assert a[name].value == pytest.approx(b[name].value, rel=1e-5, abs=1e-6)
