"""The sampling primitive that `deradiff sample` and `deradiff evaluate` share.

    sampler = load_sampler("toy", lora="runs/toy-dpo/lora", steps=20, scheduler="ddpm")
    images, kls = sampler.sample(["a red circle on a dark background"], [0], parse_lam("2"))

`load_sampler` loads a pipeline (a registered model, a local folder or a hub id), optionally
replaces its scheduler and loads a LoRA; the call keywords start from the registered model's
`sampling_defaults` (deradiff.plugins), then --steps / --guidance / --size / --eta. `sample`
draws realigned images, each row's noise from its own seed, and returns each image's emulated
path KL to the reference (None for deterministic samplers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deradiff.evaluation.lams import Lam
from deradiff.io import atomic_write
from deradiff.realign import LambdaSchedule, path_kl, realigned


def check_prompts(pipeline: str, prompts: Sequence[str]) -> None:
    """UserError for the first prompt a registered model cannot draw (any prompt for other pipelines)."""
    from deradiff.plugins import model_entry

    entry = model_entry(pipeline)
    if entry is not None and entry.check_prompt is not None:
        for prompt in prompts:
            entry.check_prompt(prompt)


def sampling_kwargs(pipeline: str, steps: int | None = None, guidance: float | None = None,
                    size: int | None = None, eta: float = 0.0) -> dict:
    """Keywords for `pipe(prompts, **kwargs)`: the registered model's defaults, then the options
    given (None: keep the default); images come back as PIL."""
    from deradiff.plugins import model_entry

    entry = model_entry(pipeline)
    kwargs: dict = dict(entry.sampling_defaults) if entry is not None else {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if size is not None:
        kwargs["height"] = kwargs["width"] = size
    if eta:
        kwargs["eta"] = eta
    kwargs["output_type"] = "pil"
    return kwargs


@dataclass
class Sampler:
    """A loaded pipeline and how to call it; `sample` draws realigned images."""

    pipe: Any
    call: dict
    eta: float = 0.0
    mode: str = "two_forward"
    reference: torch.nn.Module | None = None  # two-model mode: the full reference UNet

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], lam: Lam | LambdaSchedule):
        """Realigned images (PIL) for prompts[i] with noise from seeds[i], and their emulated path KL
        (floats, or None for deterministic samplers). Each row's noise depends only on its seed."""
        schedule = lam.schedule if isinstance(lam, Lam) else lam
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with realigned(self.pipe, lam=schedule, reference=self.reference, mode=self.mode) as denoiser:
            images = self.pipe(list(prompts), generator=generators, **self.call).images
        guidance = self.call.get("guidance_scale", getattr(self.pipe, "_guidance_scale", 1.0))
        kl = path_kl(denoiser.records, self.pipe.scheduler, guidance_scale=guidance, eta=self.eta)
        return images, [None] * len(images) if kl is None else [float(v) for v in kl]


def load_sampler(pipeline: str, *, dtype: str = "float32", device: str = "cpu", scheduler: str | None = None,
                 lora: str | os.PathLike | None = None, adapter_name: str = "default",
                 reference_unet: str | None = None, steps: int | None = None, guidance: float | None = None,
                 size: int | None = None, eta: float = 0.0, mode: str = "two_forward") -> Sampler:
    """Load the pipeline (and LoRA, and a reference UNet for two-model mode) and build its Sampler."""
    from deradiff.models import load_lora, load_pipeline, set_scheduler

    torch_dtype = getattr(torch, dtype)
    pipe = load_pipeline(pipeline, dtype=torch_dtype, device=device)
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    reference = None
    if reference_unet:
        from diffusers import UNet2DConditionModel

        reference = UNet2DConditionModel.from_pretrained(reference_unet, use_safetensors=True)
        reference.to(device, torch_dtype)
    if lora:
        load_lora(pipe, lora, adapter_name=adapter_name)
    call = sampling_kwargs(pipeline, steps, guidance, size, eta)
    return Sampler(pipe, call, eta, mode, reference)


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG, whole or not at all."""
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


def image_ok(path: Path) -> bool:
    """Whether a stored PNG exists and decodes completely."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # missing, truncated, not an image: all mean sample it again
        return False
