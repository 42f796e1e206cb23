"""Text conditioning for training: prompt embeddings for SD1.5- and SDXL-shaped pipelines.

Uses the pipeline's own `encode_prompt` (no copied pipeline code), and builds SDXL's
`added_cond_kwargs` (pooled text embeds + time ids from original size, crop and target size)
the way the SDXL pipelines and the official Diffusion-DPO SDXL training do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """UNet keyword arguments for a batch: encoder_hidden_states (B, L, D) and, for SDXL,
    added_cond_kwargs {"text_embeds": (B, D2), "time_ids": (B, 6)}."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None

    def as_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def repeat(self, n: int) -> Conditioning:
        """Concatenate the batch n times along dim 0 (e.g. for the w/l halves of a DPO pair)."""
        ehs = self.encoder_hidden_states.repeat(n, 1, 1)
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(ehs, added)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode_prompts(
    pipe,
    prompts: list[str],
    device: torch.device | str,
    resolution: int | None = None,
    original_sizes: torch.Tensor | None = None,
    crops_top_left: torch.Tensor | None = None,
) -> Conditioning:
    """Frozen text-encoder conditioning for `prompts` (no classifier-free duplication).

    SDXL time ids are (original_h, original_w, crop_top, crop_left, target_h, target_w) per
    sample; without per-sample sizes they default to the training resolution and no crop.
    """
    if not is_sdxl(pipe):
        embeds, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return Conditioning(embeds)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    n = len(prompts)
    size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
    if original_sizes is None:
        original_sizes = torch.tensor([[size, size]] * n)
    if crops_top_left is None:
        crops_top_left = torch.zeros(n, 2, dtype=torch.long)
    target = torch.tensor([[size, size]] * n)
    time_ids = torch.cat([original_sizes, crops_top_left, target], dim=1).to(device, embeds.dtype)
    return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids})
