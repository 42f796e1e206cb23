"""Load pipelines and schedulers by name; add, save, load and toggle LoRA adapters.

LoRA files are diffusers-format safetensors (`pytorch_lora_weights.safetensors`), so that
`pipe.load_lora_weights(dir)` of stock diffusers reads what we write and vice versa.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deradiff.errors import UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# scheduler name -> diffusers class name; every one consumes the model output linearly.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


# -- adapters ------------------------------------------------------------------------------------


def lora_adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters injected in `model` (empty when it has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.active_adapters:
                if name not in names:
                    names.append(name)
    return names


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The peft adapter layers inside `model` (cache it: walking a large UNet takes ~1 ms)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module, layers: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Run the block with every LoRA adapter of `model` off: the reference model, bit-exact,
    without a second copy of the weights. Used by realignment and by DPO/KL training.

    Flips peft's per-layer switch directly: `enable_adapters()` would also reset the adapters'
    requires_grad flags, which must not change behind a trainer's (or a user's) back.
    """
    layers = tuner_layers(model) if layers is None else layers
    was_disabled = [m._disable_adapters for m in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer._disable_adapters = disabled


def add_lora(
    denoiser: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Inject a trainable LoRA (B initialized to zero: the model starts equal to the base)."""
    from peft import LoraConfig

    targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    denoiser.add_adapter(config, adapter_name=adapter_name)
    return denoiser


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft key format (no `unet.` prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser)


def save_lora(pipe, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the denoiser's LoRA as `out_dir/pytorch_lora_weights.safetensors` (diffusers format).

    Written into a temporary sibling folder and renamed, so a crash never leaves half a file.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        type(pipe).save_lora_weights(
            tmp, unet_lora_layers=lora_state_dict(pipe.unet), safe_serialization=True
        )
        if metadata:
            import json

            (tmp / "lora_info.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a file or a diffusers-format directory."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            found = sorted(p.name for p in path.iterdir())[:8]
            raise UserError(
                f"no .safetensors LoRA file in {path} (found {found}); save LoRAs with "
                f"save_lora / pipe.save_lora_weights(..., safe_serialization=True)"
            )
        preferred = path / LORA_WEIGHT_NAME
        return preferred if preferred.exists() else candidates[0]
    if not path.exists():
        raise UserError(f"LoRA path {path} does not exist")
    if path.suffix != ".safetensors":
        raise UserError(
            f"LoRA {path} is not a .safetensors file; pickled checkpoints (.bin/.pt/.ckpt) are "
            "refused because loading them can run code. Convert it with safetensors.torch.save_file"
        )
    return path


def check_lora_matches(denoiser: nn.Module, lora_file: Path) -> None:
    """Raise UserError if peft-format LoRA keys name modules or shapes absent from `denoiser`."""
    from safetensors import safe_open

    modules = dict(denoiser.named_modules())
    missing, mismatched, cross_dims = [], [], set()
    with safe_open(str(lora_file), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue  # lora_B mirrors lora_A; non-peft formats are left to diffusers' converters
            module_name = key.split(".lora_A.")[0]
            for prefix in ("unet.", "transformer."):
                module_name = module_name.removeprefix(prefix)
            shape = f.get_slice(key).get_shape()
            if module_name.endswith("attn2.to_k"):
                cross_dims.add(shape[-1])
            module = modules.get(module_name)
            if module is None:
                missing.append(module_name)
                continue
            base = getattr(module, "base_layer", module)
            expected = getattr(base, "in_features", getattr(base, "in_channels", None))
            if expected is not None and shape[1] != expected:
                mismatched.append(f"{module_name} (LoRA in={shape[1]}, model in={expected})")
    if missing or mismatched:
        hint = ""
        if cross_dims:
            dim = sorted(cross_dims)[0]
            base = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(dim, "an unknown base")
            hint = f"; it seems to be for a base with cross_attention_dim={dim} ({base})"
        detail = (missing[:3] and f"{len(missing)} modules not in the model, e.g. {missing[:3]}") or ""
        if mismatched:
            detail += f"{'; ' if detail else ''}{len(mismatched)} shape mismatches, e.g. {mismatched[:2]}"
        raise UserError(f"LoRA {lora_file} does not fit this {type(denoiser).__name__}: {detail}{hint}")


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Check and load a diffusers-format LoRA into the pipeline's denoiser (safetensors only)."""
    lora_file = resolve_lora_file(path)
    check_lora_matches(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, lora_file)
    pipe.load_lora_weights(
        str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name, use_safetensors=True
    )


def set_lora_scale(denoiser: nn.Module, scale: float) -> None:
    """Weight-space baseline: scale every LoRA delta by `scale` (NOT realignment; see method.md)."""
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                module.scaling[name] = scale * module.lora_alpha[name] / module.r[name]


# -- pipelines and schedulers --------------------------------------------------------------------


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  revision: str | None = None, variant: str | None = None, vae: str | None = None):
    """A diffusers pipeline from a registered model name (deradiff.plugins, e.g. "toy"), a local
    folder, or a hub id (safetensors only).

    `vae` replaces the pipeline's VAE (e.g. "madebyollin/sdxl-vae-fp16-fix" for SDXL in fp16).
    """
    from deradiff.plugins import model_entry

    entry = model_entry(name_or_path)
    if entry is not None:
        return entry.load(dtype=dtype, device=device)
    from diffusers import AutoencoderKL, DiffusionPipeline

    try:
        extra = {}
        if vae:
            extra["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, use_safetensors=True)
        pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, use_safetensors=True,
                                                 revision=revision, variant=variant, **extra)
    except (OSError, ValueError) as err:
        where = "local folder" if Path(name_or_path).exists() else "hub id (is the hub reachable / cached?)"
        raise UserError(f"cannot load pipeline {name_or_path!r} (or vae {vae!r}) as a {where}: "
                        f"{str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_scheduler(pipe, name: str, **overrides) -> None:
    """Replace the pipeline's scheduler by `name` (see SCHEDULERS), keeping its noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    config = dict(pipe.scheduler.config)
    if name in ("ddim", "ddpm"):
        config.setdefault("clip_sample", False)
        config["clip_sample"] = overrides.pop("clip_sample", False)
    pipe.scheduler = cls.from_config({**config, **overrides})
