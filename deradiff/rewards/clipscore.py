"""CLIPScore (prompt-image similarity) and the CLIP plumbing shared by PickScore and the aesthetic score.

    reward = get_reward("clipscore")                      # openai/clip-vit-large-patch14
    reward = get_reward("clipscore", model="/models/clip-vit-large-patch14")
    reward.score(images, prompts)                         # (B,), images (B, 3, H, W) in [-1, 1]

CLIPScore is 100 * cos(image, prompt) with transformers' CLIP: torchmetrics' convention without
its clamp at 0 (Hessel et al. use 2.5 * max(cos, 0)). For any image with cos > 0 (every real
image-prompt pair with CLIP-L) the values are equal; unclamped, the score keeps a gradient and
still ranks images that a clamp would tie at 0. Unlike torchmetrics' metric it is
differentiable: `clip_pixels` does CLIP's resize / center crop / normalize on tensors (bicubic
with antialiasing, as the processor's PIL path does up to interpolation details), so gradients
reach the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deradiff.rewards import Reward
from deradiff.rewards.hub import from_pretrained

CLIP_L14 = "openai/clip-vit-large-patch14"


def clip_pixels(images: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP input from images (B, 3, H, W) in [-1, 1]: resize the shorter side to `size`
    (bicubic, antialiased), center-crop `crop` x `crop`, normalize by mean/std. Differentiable."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    new_h, new_w = max(crop, round(h * size / min(h, w))), max(crop, round(w * size / min(h, w)))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def processor_geometry(image_processor) -> tuple[int, int, list[float], list[float]]:
    """(resize shorter side, crop side, mean, std) of a transformers CLIP image processor."""
    def side(value, *keys):
        if value is None or isinstance(value, int):
            return value
        # a dict (slow processors) or a SizeDict (fast processors): the first key that is set
        return next((value.get(k) for k in keys if value.get(k) is not None), None)

    size = side(image_processor.size, "shortest_edge", "height")
    crop = side(image_processor.crop_size, "height") or size
    return int(size), int(crop), list(image_processor.image_mean), list(image_processor.image_std)


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features.
    return out if torch.is_tensor(out) else out.pooler_output


class CLIPSimilarity(Reward):
    """A transformers CLIPModel + CLIPProcessor scoring each image against its own prompt.

    Subclasses set the default model/processor ids and `finish(cos) -> score`.
    """

    differentiable = True
    default_model = CLIP_L14
    default_processor: str | None = None  # None: the processor saved with the model

    def __init__(self, model: str | None = None, processor: str | None = None, use_safetensors: bool = True):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        model = model or self.default_model
        processor = processor or self.default_processor or model
        what = f"{self.name} model"
        self.model = from_pretrained(CLIPModel, model, what, "model", use_safetensors=use_safetensors)
        self.processor = from_pretrained(CLIPProcessor, processor, f"{self.name} processor", "processor")
        self.geometry = processor_geometry(self.processor.image_processor)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) for images (B, 3, H, W) in [-1, 1]."""
        pixels = clip_pixels(images.to(self.device), *self.geometry).to(self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D); prompts truncated to the tokenizer's 77 tokens."""
        tok = self.processor.tokenizer
        tokens = tok(list(prompts), padding=True, truncation=True, max_length=min(77, tok.model_max_length),
                     return_tensors="pt").to(self.device)
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)

    def finish(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return self.finish(cos)


class CLIPScore(CLIPSimilarity):
    """100 * cos between each image and its prompt (torchmetrics' CLIPScore scale, no clamp at 0)."""

    name = "clipscore"

    def finish(self, cos: torch.Tensor) -> torch.Tensor:
        return 100.0 * cos
