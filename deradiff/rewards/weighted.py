"""A weighted sum of rewards as one reward: what `get_reward("toy=1,toy_contrast=0.5")` builds.

    reward = get_reward("toy=1,toy_contrast=0.5")
    reward.score(images, prompts)        # (B,) = 1 * toy(images) + 0.5 * toy_contrast(images)
    reward.weights                       # {"toy": 1.0, "toy_contrast": 0.5}

Training on sum_i w_i r_i at KL weight beta is what realignment with a lambda vector emulates
(docs/method.md section 2, "Several rewards"): LoRA_i trained on r_i at beta_i, mixed with
lam_i = w_i * beta_i / beta. The retrained weighted LoRAs are the check of that claim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from deradiff.rewards import Reward, format_weights


class WeightedReward(Reward):
    """sum_i w_i * part_i.score(images, prompts), (B,) float32; differentiable iff every part is.

    parts: {registered reward name: (weight, Reward)}; `name` is the canonical spec
    (deradiff.rewards.format_weights), e.g. "toy=1,toy_contrast=0.5".
    """

    def __init__(self, parts: Mapping[str, tuple[float, Reward]]):
        super().__init__()
        if not parts:
            raise ValueError("a weighted reward needs at least one part")
        self.weights = {name: float(w) for name, (w, _) in parts.items()}
        self.parts = torch.nn.ModuleDict({name: reward for name, (_, reward) in parts.items()})
        self.name = format_weights(self.weights)
        self.differentiable = all(reward.differentiable for reward in self.parts.values())

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        total = None
        for name, reward in self.parts.items():
            term = self.weights[name] * reward.score(images, prompts).float()
            total = term if total is None else total + term
        return total
