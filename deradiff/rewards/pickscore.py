"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    reward = get_reward("pickscore")   # yuvalkirstain/PickScore_v1 + the CLIP-ViT-H-14 processor
    reward = get_reward("pickscore", model="/models/PickScore_v1", processor="/models/CLIP-ViT-H-14")

score = logit_scale.exp() * cos(image, prompt), as in the PickScore README (about 20-23 for SD
images). Weights are read from safetensors; a folder with only pytorch_model.bin needs
use_safetensors=False (transformers then reads it with torch.load(weights_only=True)).
"""

from __future__ import annotations

import torch

from deradiff.rewards.clipscore import CLIPSimilarity


class PickScore(CLIPSimilarity):
    """PickScore_v1 behind the reward interface; differentiable through CLIP preprocessing."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def finish(self, cos: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * cos
