"""Reward models, chosen by name from one registry, with one interface.

    from deradiff.rewards import get_reward
    reward = get_reward("toy")                       # a torch.nn.Module
    scores = reward.score(images, prompts)           # (B,) float, images (B, 3, H, W) in [-1, 1]
    reward.differentiable                            # True: usable for reward-gradient training

Every reward subclasses `Reward` and implements `score(images, prompts) -> Tensor (B,)`:
images are float (B, 3, H, W) in [-1, 1] (the diffusers convention, on any device), prompts a
list of B strings, higher is better. Entries are lazy (module path + class name) so listing or
validating a recipe imports nothing heavy; whether a reward is differentiable is known from the
entry alone (`is_differentiable(name)`), before any model is built.

A weighted sum of registered rewards is a reward too, named by a spec of NAME=WEIGHT terms:

    reward_weights("toy=1,toy_contrast=0.5")        # {"toy": 1.0, "toy_contrast": 0.5}, checked
    get_reward("toy=1,toy_contrast=0.5")             # WeightedReward: 1 * toy + 0.5 * toy_contrast
    is_differentiable("toy=1,toy_contrast=0.5")      # True iff every part is

Wherever a reward is named (a recipe's `method.reward`, `deradiff evaluate --reward`) such a
spec works. A spec is weighted when it holds "=" before any ":" (so "hpsv2:version=v2.1" stays
one reward with options); weights are finite and non-zero (negative: a penalty), each reward
named once; a plain name is weight 1.

To add a reward: write deradiff/rewards/<name>.py with a `Reward` subclass and add one
`RewardEntry` line to `REWARDS`; a plug-in calls `register_reward(name, RewardEntry(...))` from
its register() (see deradiff.plugins).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from deradiff.errors import UserError
from deradiff.plugins import load_plugins


class Reward(torch.nn.Module):
    """Base class: `score(images, prompts) -> (B,)`; `forward` is the same call."""

    name: str = ""
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)

    @staticmethod
    def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Raise UserError unless images is (B, 3, H, W) float and there are B prompts."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise UserError(f"rewards take images of shape (B, 3, H, W) in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise UserError(f"rewards take float images in [-1, 1], got dtype {images.dtype}; "
                            "convert uint8 with x / 127.5 - 1")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            n = "a string" if isinstance(prompts, str) else len(prompts)
            raise UserError(f"rewards take one prompt per image: {images.shape[0]} images, {n} prompts")


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: where its class lives, and what it is."""

    module: str
    cls: str
    differentiable: bool
    help: str


REWARDS: dict[str, RewardEntry] = {
    "clipscore": RewardEntry("deradiff.rewards.clipscore", "CLIPScore", True,
                             "prompt-image CLIP similarity 100*cos (openai/clip-vit-large-patch14)"),
    "pickscore": RewardEntry("deradiff.rewards.pickscore", "PickScore", True,
                             "PickScore_v1 (CLIP-H tuned on Pick-a-Pic): logit_scale * cos(image, prompt)"),
    "hpsv2": RewardEntry("deradiff.rewards.hpsv2", "HPSv2", True,
                         "HPSv2 (version=v2.0, default) or HPSv2.1 (version=v2.1): open_clip ViT-H-14 "
                         "tuned on HPDv2, cos(image, prompt)"),
    "imagereward": RewardEntry("deradiff.rewards.imagereward", "ImageReward", True,
                               "ImageReward v1.0 (BLIP ViT-L + cross-attention BERT + MLP, THUDM/ImageReward), "
                               "normalized reward (official mean/std)"),
    "aesthetic": RewardEntry("deradiff.rewards.aesthetic", "AestheticScore", True,
                             "LAION aesthetic predictor v2 (MLP on CLIP ViT-L/14 embeddings), prompt ignored"),
}


def register_reward(name: str, entry: RewardEntry) -> None:
    """Add a reward (plug-ins call this from their register())."""
    REWARDS[name] = entry


def available_rewards() -> list[str]:
    load_plugins()
    return sorted(REWARDS)


def _entry(name: str) -> RewardEntry:
    load_plugins()
    if name not in REWARDS:
        listing = ", ".join(f"{k} ({'differentiable' if v.differentiable else 'not differentiable'})"
                            for k, v in sorted(REWARDS.items()))
        raise UserError(f"unknown reward {name!r}; registered rewards: {listing}")
    return REWARDS[name]


WEIGHTED_FORMAT = "write NAME=WEIGHT terms separated by commas, e.g. toy=1,toy_contrast=0.5"


def is_weighted(spec: str) -> bool:
    """Whether `spec` is a weighted sum ("toy=1,toy_contrast=0.5"): an "=" before any ":" (in
    "hpsv2:version=v2.1" the "=" belongs to the options of one reward)."""
    head, eq, _ = str(spec).partition("=")
    return bool(eq) and ":" not in head


def reward_weights(spec: str) -> dict[str, float]:
    """{registered reward: weight} of a reward spec: a plain name is {name: 1.0}; "toy=1,
    toy_contrast=0.5" its terms in the order written. UserError (one line) for an empty spec or
    term, a term without "=", an unknown name, a weight that is not a finite non-zero number, or
    a name given twice."""
    text = str(spec).strip()
    if not is_weighted(text):
        _entry(text)  # the registry's listing when unknown
        return {text: 1.0}
    weights: dict[str, float] = {}
    for term in text.split(","):
        name, eq, value = (part.strip() for part in term.partition("="))
        if not eq or not name:
            raise UserError(f"cannot read reward spec {text!r} at {term.strip()!r}: {WEIGHTED_FORMAT}")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight == 0:
            raise UserError(f"reward spec {text!r}: the weight of {name!r} must be a finite non-zero number, "
                            f"got {value!r} ({WEIGHTED_FORMAT})")
        if name in weights:
            raise UserError(f"reward spec {text!r} names {name!r} twice: give each reward one weight")
        _entry(name)
        weights[name] = weight
    return weights


def format_weights(weights: Mapping[str, float]) -> str:
    """The canonical spec of {reward: weight}: terms sorted by name, weights as `:g` writes them
    unless that loses digits ("toy=1,toy_contrast=0.5"); reward_weights reads it back."""
    def number(x: float) -> str:
        text = f"{x:g}"
        return text if float(text) == x else repr(float(x))

    return ",".join(f"{name}={number(float(w))}" for name, w in sorted(weights.items()))


def is_differentiable(name: str) -> bool:
    """Whether reward `name` (or every part of a weighted spec) passes gradients to the images
    (needed by reward-gradient methods)."""
    return all(_entry(part).differentiable for part in reward_weights(name))


def get_reward(name: str, **kwargs) -> Reward:
    """Build reward `name` (kwargs go to its constructor), in eval mode with frozen weights; a
    weighted spec builds a WeightedReward of its parts (no kwargs: the parts take their defaults)."""
    if is_weighted(name):
        from deradiff.rewards.weighted import WeightedReward

        if kwargs:
            raise UserError(f"reward spec {name!r} is a weighted sum: its parts take no options ({sorted(kwargs)})")
        return WeightedReward({part: (w, get_reward(part)) for part, w in reward_weights(name).items()}).eval()
    entry = _entry(name)
    reward = getattr(importlib.import_module(entry.module), entry.cls)(**kwargs)
    reward.requires_grad_(False)
    return reward.eval()
