"""Weighted sums of registered rewards ("toy=1,toy_contrast=0.5"): the value and the gradient are
the weighted sums of the parts', differentiability is all of the parts', bad specs are one-line
errors, and a recipe naming one passes (or fails) the pre-flight check."""

from __future__ import annotations

import pytest
import torch

from deradiff.errors import UserError
from deradiff.plugins import load_plugins
from deradiff.rewards import (
    REWARDS,
    RewardEntry,
    format_weights,
    get_reward,
    is_differentiable,
    is_weighted,
    reward_weights,
)
from deradiff.rewards.weighted import WeightedReward

load_plugins()  # the toy rewards
PROMPTS = ["a red circle on a dark background", "a blue square on a light background", "a green cross"]


def test_weighted_reward_is_the_weighted_sum_of_its_parts_value_and_gradient():
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reward = get_reward("toy=1.0, toy_contrast=-0.5")
    assert isinstance(reward, WeightedReward) and reward.differentiable and not reward.training
    assert reward.name == "toy=1,toy_contrast=-0.5" and reward.weights == {"toy": 1.0, "toy_contrast": -0.5}
    x = images.clone().requires_grad_(True)
    combined = reward.score(x, PROMPTS)
    (grad,) = torch.autograd.grad(combined.sum(), x)
    y = images.clone().requires_grad_(True)
    parts = get_reward("toy").score(y, PROMPTS) - 0.5 * get_reward("toy_contrast").score(y, PROMPTS)
    (grad_parts,) = torch.autograd.grad(parts.sum(), y)
    assert combined.shape == (3,) and combined.dtype == torch.float32
    assert torch.allclose(combined, parts, atol=1e-7) and torch.allclose(grad, grad_parts, atol=1e-7)
    assert grad.abs().sum() > 0
    assert torch.equal(get_reward("toy=2").score(images, PROMPTS), 2 * get_reward("toy").score(images, PROMPTS))
    assert not any(p.requires_grad for p in reward.parameters())


def test_spec_parsing_and_canonical_form():
    assert reward_weights("toy") == {"toy": 1.0}
    assert reward_weights("toy_contrast=0.5,toy=1") == {"toy_contrast": 0.5, "toy": 1.0}
    assert format_weights({"toy_contrast": 0.5, "toy": 1.0}) == "toy=1,toy_contrast=0.5"
    assert reward_weights(format_weights({"toy": 1 / 3})) == {"toy": 1 / 3}  # no digits lost
    assert is_weighted("toy=1") and not is_weighted("toy") and not is_weighted("hpsv2:version=v2.1")
    assert is_differentiable("toy=1,toy_contrast=0.5")


def test_differentiable_only_when_every_part_is(monkeypatch):
    monkeypatch.setitem(REWARDS, "blackbox", RewardEntry("deradiff.toy.reward", "ToyReward", False, "test"))
    assert not is_differentiable("toy=1,blackbox=1") and is_differentiable("toy=1")


@pytest.mark.parametrize("spec, message", [
    ("toy=1,nope=2", "unknown reward 'nope'"),
    ("toy=abc", "the weight of 'toy' must be a finite non-zero number, got 'abc'"),
    ("toy=inf", "finite non-zero"),
    ("toy=0,toy_contrast=1", "finite non-zero"),
    ("toy=1,toy=2", "names 'toy' twice"),
    ("toy=1,,toy_contrast=1", "cannot read reward spec"),
    ("toy=1,toy_contrast", "cannot read reward spec"),
    ("=1", "cannot read reward spec"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    for call in (reward_weights, is_differentiable, get_reward):
        with pytest.raises(UserError, match=message) as err:
            call(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="take no options"):
        get_reward("toy=1", blur_sigma=0.0)


def test_recipe_preflight_takes_a_weighted_reward_and_refuses_a_bad_one():
    from deradiff.training.recipe_checks import preflight
    from deradiff.training.recipe_load import RECIPES_DIR, load_recipe

    recipe = load_recipe(RECIPES_DIR / "toy-kl-grad.yaml", ["method.reward=toy=1,toy_contrast=0.5"])
    assert recipe.method.reward == "toy=1,toy_contrast=0.5"
    preflight(recipe)
    for spec, message in [("toy=1,toy_contrast=x", "the weight of 'toy_contrast'"), ("toy=1,nope=1", "unknown reward 'nope'")]:
        with pytest.raises(UserError, match=f"^recipe: method.reward: .*{message}") as err:
            preflight(load_recipe(RECIPES_DIR / "toy-kl-pg.yaml", [f"method.reward={spec}"]))
        assert "\n" not in str(err.value)
