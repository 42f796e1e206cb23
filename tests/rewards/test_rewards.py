"""The reward registry: lookup by name, one interface, differentiability known up front."""

from __future__ import annotations

import importlib

import pytest
import torch

from deradiff.errors import UserError
from deradiff.plugins import load_plugins
from deradiff.rewards import REWARDS, Reward, available_rewards, get_reward, is_differentiable

load_plugins()  # plug-ins (the toy world) register their rewards


def test_toy_reward_by_name_scores_a_batch():
    reward = get_reward("toy")
    assert isinstance(reward, Reward) and reward.name == "toy" and not reward.training
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    scores = reward.score(images, ["a red circle on a dark background"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.equal(reward(images, ["p"] * 3), scores)  # forward is score


def test_kwargs_reach_the_constructor():
    assert get_reward("toy", blur_sigma=0.0).blur_sigma == 0.0


def test_gradient_flows_through_a_differentiable_reward():
    assert is_differentiable("toy")
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    get_reward("toy").score(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_unknown_name_lists_the_registry():
    with pytest.raises(UserError, match=r"unknown reward 'pickscor'.*toy \(differentiable\)"):
        get_reward("pickscor")
    with pytest.raises(UserError, match="registered rewards"):
        is_differentiable("nope")
    assert available_rewards() == sorted(REWARDS)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_entry_matches_its_class(name):
    """The registry's differentiable flag (read without building) agrees with the class."""
    entry = REWARDS[name]
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    assert issubclass(cls, Reward)
    assert cls.differentiable == entry.differentiable
    assert cls.name == name


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.zeros(2, 4, 8, 8), ["a", "b"], "B, 3, H, W"),
        (torch.zeros(3, 8, 8), ["a"], "B, 3, H, W"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], "float images"),
        (torch.zeros(2, 3, 8, 8), ["a"], "2 images, 1 prompts"),
        (torch.zeros(1, 3, 8, 8), "a", "a string"),
    ],
)
def test_bad_inputs_are_user_errors(images, prompts, match):
    with pytest.raises(UserError, match=match):
        get_reward("toy").score(images, prompts)
