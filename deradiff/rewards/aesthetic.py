"""LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"): an MLP on unit-norm CLIP ViT-L/14
image embeddings, predicting a 1-10 rating. The prompt is ignored.

    reward = get_reward("aesthetic")
    reward = get_reward("aesthetic", clip="/models/clip-vit-large-patch14", mlp="/models/aesthetic.safetensors")

The MLP is the published one (five Linear layers with dropout and no activations; keys
layers.{0,2,4,6,7}.*). Its weights come from `mlp`: a .safetensors file (preferred) or the
published pickle `aesthetic-model.pth` / `sac+logos+ava1-l14-linearMSE.pth`, read with
torch.load(weights_only=True) only (tensors, never code); default: the copy on the hub that
trl's DDPO example uses. The CLIP is transformers' openai/clip-vit-large-patch14, as in
ddpo-pytorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deradiff.errors import UserError
from deradiff.rewards.clipscore import CLIP_L14, CLIPSimilarity
from deradiff.rewards.hub import fetch_file, load_weights

DEFAULT_MLP = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"


class AestheticMLP(nn.Module):
    """The published head: embedding (B, D) -> rating (B, 1); D = 768 for ViT-L/14."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScore(CLIPSimilarity):
    """Predicted aesthetic rating (B,) of images (B, 3, H, W) in [-1, 1]; differentiable."""

    name = "aesthetic"
    default_model = CLIP_L14

    def __init__(self, clip: str | None = None, mlp: str = DEFAULT_MLP, processor: str | None = None,
                 use_safetensors: bool = True):
        super().__init__(model=clip, processor=processor, use_safetensors=use_safetensors)
        dim = self.model.config.projection_dim
        self.mlp = AestheticMLP(dim)
        state = load_weights(fetch_file(mlp, "aesthetic MLP", "mlp"))
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"aesthetic MLP weights {mlp!r} do not fit the published head on {dim}-dim CLIP "
                            f"embeddings: {str(err).splitlines()[0]}") from None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        embeddings = self.image_features(images)
        head = next(self.mlp.parameters())
        return self.mlp(embeddings.to(head.dtype)).squeeze(-1).float()
