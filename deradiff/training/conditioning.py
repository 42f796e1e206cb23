"""Text conditioning for training: prompt embeddings of every family's denoiser.

`encode_prompts(pipe, prompts, device)` uses the pipeline's own `encode_prompt` (no copied
pipeline code), through the family table of deradiff.training.families: SD1.5 (CLIP), SDXL
(two CLIPs, pooled embeds, time ids from original size and crop, as the SDXL pipelines and the
official Diffusion-DPO SDXL training build them), SD3 (CLIP-L + CLIP-G + T5) and FLUX (CLIP-L
pooled + T5, text ids, the distilled guidance input). `PromptCache` encodes a fixed prompt list
once so that the text encoders (T5-XXL: ~9.5 GB in bf16) can leave memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """Denoiser inputs that come from the prompts, for a batch of B rows.

    encoder_hidden_states: (B, L, D) text token states (every family).
    added_cond_kwargs: SDXL {"text_embeds": (B, D2), "time_ids": (B, 6)}.
    pooled_projections: SD3 / FLUX pooled text embedding (B, P).
    txt_ids: FLUX text position ids (L, 3), shared by all rows.
    guidance: FLUX.1-dev's distilled guidance scale per row (B,), float32.
    family: the model family these were encoded for (deradiff.training.families.FAMILIES).
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None
    pooled_projections: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    family: str = "sd15"

    def as_kwargs(self) -> dict:
        """UNet keyword arguments (sd15, sdxl); transformers are called by their family's predict."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """Apply fn to every per-row tensor (dim 0 = rows); txt_ids, shared, is kept."""
        def opt(t):
            return None if t is None else fn(t)

        added = None if self.added_cond_kwargs is None else {k: fn(v) for k, v in self.added_cond_kwargs.items()}
        return replace(self, encoder_hidden_states=fn(self.encoder_hidden_states), added_cond_kwargs=added,
                       pooled_projections=opt(self.pooled_projections), guidance=opt(self.guidance))

    def repeat(self, n: int) -> Conditioning:
        """The batch n times along dim 0: [a, b] -> [a, b, a, b] (the w/l halves of DPO pairs)."""
        return self.map_rows(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def repeat_each(self, n: int) -> Conditioning:
        """Each row n times in place: [a, b] -> [a, a, b, b] (n samples per prompt)."""
        return self.map_rows(lambda t: t.repeat_interleave(n, dim=0))

    def cat(self, other: Conditioning) -> Conditioning:
        """Rows of self, then rows of other (e.g. [uncond; cond] for classifier-free guidance)."""
        if other.family != self.family:
            raise ValueError(f"cannot concatenate {self.family} and {other.family} conditioning")
        pairs = {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        out = {}
        for name, (a, b) in pairs.items():
            if name in ("txt_ids", "family") or a is None:
                out[name] = a
            elif name == "added_cond_kwargs":
                out[name] = {k: torch.cat([a[k], b[k]]) for k in a}
            else:
                out[name] = torch.cat([a, b])
        return Conditioning(**out)

    def to(self, device) -> Conditioning:
        moved = self.map_rows(lambda t: t.to(device))
        return replace(moved, txt_ids=None if self.txt_ids is None else self.txt_ids.to(device))

    def rows(self, index: list[int]) -> Conditioning:
        """The rows at `index`, in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.map_rows(lambda t: t[idx.to(t.device)])


@torch.no_grad()
def encode_prompts(
    pipe,
    prompts: list[str],
    device: torch.device | str,
    resolution: int | None = None,
    original_sizes: torch.Tensor | None = None,
    crops_top_left: torch.Tensor | None = None,
    guidance: float | None = None,
    max_sequence_length: int | None = None,
) -> Conditioning:
    """Frozen text-encoder conditioning for `prompts` (no classifier-free duplication), for the
    pipeline's family. guidance: FLUX.1-dev's distilled guidance scale; max_sequence_length: SD3 /
    FLUX T5 tokens (None = the pipeline's default); both ignored by UNet families."""
    from deradiff.training.families import family_of, get_family

    return get_family(family_of(pipe)).encode(pipe, prompts, device, resolution, original_sizes, crops_top_left,
                                              guidance, max_sequence_length)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# The pipeline components a latent cache stands in for (deradiff.training.cache): it holds their
# outputs, its identity hashes their files, and training runs from it do not load them.
REPLACED_BY_CACHE = ("vae", *TEXT_ENCODERS, *TOKENIZERS)


class PromptCache:
    """Conditioning of a fixed prompt list, encoded once (in chunks) and kept on the CPU.

    encode(prompts, device) -> Conditioning of those prompts (each must be in the list); the
    text encoders are not touched again, so `drop_text_encoders(pipe)` can free them.
    """

    def __init__(self, pipe, prompts: list[str], device, chunk: int = 16, **encode_kwargs):
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        unique = list(self.index)
        parts = [encode_prompts(pipe, unique[i:i + chunk], device, **encode_kwargs).to("cpu")
                 for i in range(0, len(unique), chunk)]
        self.table = parts[0]
        for part in parts[1:]:
            self.table = self.table.cat(part)

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.table.encoder_hidden_states, self.table.pooled_projections, self.table.guidance):
            total += 0 if t is None else t.numel() * t.element_size()
        for t in (self.table.added_cond_kwargs or {}).values():
            total += t.numel() * t.element_size()
        return total

    def encode(self, prompts: list[str], device) -> Conditioning:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} prompts were not encoded in advance, e.g. {missing[0]!r}")
        return self.table.rows([self.index[p] for p in prompts]).to(device)


def drop_text_encoders(pipe) -> int:
    """Remove the pipeline's text encoders (set to None, as the SD3 pipeline allows for T5) and
    return the number of parameters freed; call after every needed prompt is encoded."""
    import gc

    freed = 0
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if module is not None:
            freed += sum(p.numel() for p in module.parameters())
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
