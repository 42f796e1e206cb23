"""Load pipelines and schedulers by name; add, save, load and toggle LoRA adapters.

LoRA files are diffusers-format safetensors (`pytorch_lora_weights.safetensors`) carrying the
adapter's peft config (rank, alpha, targets) in their header, so that `pipe.load_lora_weights(dir)`
of stock diffusers rebuilds what we trained, at its scale alpha / rank, and vice versa.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deradiff.errors import UserError
from deradiff.io import atomic_dir, write_json_atomic

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
    "flow_sde": "deradiff.flow:FlowMatchSDEScheduler",  # same marginals, per-step Gaussian: path KL
}


def scheduler_class(name: str):
    """The scheduler class registered as `name`: a diffusers class name or "module:Class"."""
    import importlib

    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    module, _, cls = SCHEDULERS[name].rpartition(":")
    return getattr(importlib.import_module(module) if module else diffusers, cls)


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


def lora_state_dict(denoiser: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in peft key format (no `unet.` prefix, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=adapter_name)


DENOISERS = ("unet", "transformer")  # the pipeline attributes a denoiser may live in


def denoiser_name(pipe) -> str:
    """The pipeline attribute holding the denoiser module: "unet" (SD1.x/2.x/XL) or "transformer"
    (SD3, Flux). The one place that knows it, for LoRA loading, training and realignment."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise UserError(
        f"{type(pipe).__name__} has no `unet` or `transformer` module; "
        "deradiff needs a diffusion pipeline with a denoiser (UNet or transformer)"
    )


def lora_adapter_config(denoiser: nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's peft LoraConfig as a JSON-ready dict (r, lora_alpha, target_modules,
    rank_pattern, alpha_pattern, use_rslora, ...): what diffusers needs to rebuild the same layers
    at the same scale alpha / r. Without it a loader assumes alpha = r."""
    configs = getattr(denoiser, "peft_config", {})
    if adapter_name not in configs:
        raise UserError(f"the {type(denoiser).__name__} has no LoRA adapter {adapter_name!r} "
                        f"(adapters: {sorted(configs)}); add one with add_lora or load_lora first")
    config = configs[adapter_name].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _save_kwargs(pipe_cls, name: str, layers: dict, config: dict) -> dict:
    """Keyword arguments of `pipe_cls.save_lora_weights` for denoiser `name` (unet/transformer),
    the adapter config included (diffusers >= 0.35 stores it in the file's header)."""
    import inspect

    kwargs = {f"{name}_lora_layers": layers}
    meta_kw = f"{name}_lora_adapter_metadata"
    if meta_kw in inspect.signature(pipe_cls.save_lora_weights).parameters:
        kwargs[meta_kw] = config
    elif (config["lora_alpha"] != config["r"] or config["rank_pattern"] or config["alpha_pattern"]
          or config["use_rslora"]):  # a scale alpha / r other than 1 somewhere: loaders would assume 1
        import diffusers

        raise UserError(f"diffusers {diffusers.__version__} cannot store this LoRA's alpha "
                        f"({config['lora_alpha']}, rank {config['r']}) in its file, so it would reload at the "
                        f"wrong scale: pip install -U 'diffusers>=0.35'")
    return kwargs


def save_lora(pipe, out_dir: str | os.PathLike, metadata: dict | None = None,
              adapter_name: str = "default") -> Path:
    """Write the denoiser's LoRA as `out_dir/pytorch_lora_weights.safetensors` (diffusers format),
    with its peft config (rank, alpha, targets) in the safetensors header, where both
    `load_lora` and stock `pipe.load_lora_weights` read it. `metadata` (run facts: beta, base,
    method) goes to `out_dir/lora_info.json`. The folder is replaced whole or not at all.
    """
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    kwargs = _save_kwargs(type(pipe), name, lora_state_dict(denoiser, adapter_name),
                          lora_adapter_config(denoiser, adapter_name))
    with atomic_dir(out_dir) as tmp:
        type(pipe).save_lora_weights(tmp, safe_serialization=True, **kwargs)
        if metadata:
            write_json_atomic(tmp / "lora_info.json", metadata)
    return Path(out_dir) / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a file or a diffusers-format directory; its header
    is read, so a truncated or foreign file is refused here, before any model is loaded."""
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
        path = preferred if preferred.exists() else candidates[0]
    elif not path.exists():
        raise UserError(f"LoRA path {path} does not exist")
    elif path.suffix != ".safetensors":
        raise UserError(
            f"LoRA {path} is not a .safetensors file; pickled checkpoints (.bin/.pt/.ckpt) are "
            "refused because loading them can run code. Convert it with safetensors.torch.save_file"
        )
    _check_safetensors_header(path)
    return path


def _check_safetensors_header(path: Path) -> None:
    """Raise UserError unless `path` is a complete safetensors file (safetensors checks that the
    header parses and that its tensors cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        size = path.stat().st_size
        raise UserError(f"LoRA file {path} ({size} bytes) is truncated or not a safetensors file "
                        f"({str(err).splitlines()[0]}): copy or download it again") from None


def _lora_file_contents(lora_file: Path) -> tuple[dict[str, dict[str, list[int]]], dict]:
    """Shapes of the peft-format LoRA tensors of the denoiser, by module name (prefix `unet.` /
    `transformer.` removed): {module: {"lora_A": shape, "lora_B": shape, "lora_B.bias": shape}},
    and the adapter config stored in the header (keys without the prefix; {} when absent).

    Text-encoder tensors and non-peft formats (kohya, old diffusers) are left to diffusers' converters.
    """
    import json

    from safetensors import safe_open

    prefixes = ("unet.", "transformer.")
    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(lora_file), framework="pt") as f:
        try:
            header = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        except json.JSONDecodeError as err:
            raise UserError(f"LoRA file {lora_file} has a damaged lora_adapter_metadata header ({err}): "
                            "save it again") from None
        for key in f.keys():
            match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
            if match is None or key.startswith("text_encoder"):
                continue
            module_name = match.group(1)
            for prefix in prefixes:
                module_name = module_name.removeprefix(prefix)
            shapes.setdefault(module_name, {})[match.group(2).removesuffix(".weight")] = f.get_slice(key).get_shape()
    config = {}
    for key, value in header.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                config[key.removeprefix(prefix)] = value
    return shapes, config


def _header_rank(config: dict, module_name: str) -> int | None:
    """The rank the header's config gives `module_name` (rank_pattern as peft matches it), or None."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return int(rank)
    return None if config.get("r") is None else int(config["r"])


def _module_mismatches(name: str, shapes: dict[str, list[int]], layer: nn.Module, rank: int | None) -> list[str]:
    """How one module's LoRA tensors disagree with its layer (Linear or Conv): in/out sizes,
    A/B ranks, kernel, and the rank the header declares. Empty when they fit."""
    if "lora_A" not in shapes or "lora_B" not in shapes:
        return [f"{name} (has {'lora_A' if 'lora_A' in shapes else 'lora_B'} only)"]
    a, b = shapes["lora_A"], shapes["lora_B"]
    weight = getattr(layer, "weight", None)
    n_in = getattr(layer, "in_features", getattr(layer, "in_channels", None))
    n_out = getattr(layer, "out_features", getattr(layer, "out_channels", None))
    if n_in is None or n_out is None or weight is None:
        return []  # a layer kind this check does not know: diffusers decides
    if len(a) != weight.ndim or len(b) != weight.ndim:  # e.g. a linear LoRA for a conv layer
        return [f"{name} (LoRA tensors {len(a)}-D, model weight {weight.ndim}-D)"]
    problems = []
    if a[1] != n_in:
        problems.append(f"{name} (LoRA in={a[1]}, model in={n_in})")
    if b[0] != n_out or shapes.get("lora_B.bias", [n_out])[0] != n_out:
        problems.append(f"{name} (LoRA out={b[0]}, model out={n_out})")
    if a[0] != b[1] * getattr(layer, "groups", 1):
        problems.append(f"{name} (lora_A rank {a[0]} != lora_B rank {b[1]})")
    elif rank is not None and a[0] != rank:
        problems.append(f"{name} (tensors have rank {a[0]}, the file's header says {rank})")
    kernel = getattr(layer, "kernel_size", None)
    if kernel is not None and tuple(a[2:]) != tuple(kernel):
        problems.append(f"{name} (LoRA kernel {tuple(a[2:])}, model kernel {tuple(kernel)})")
    return problems


def _cross_attention_hint(shapes: dict, modules: dict[str, nn.Module]) -> str:
    """"; it seems to be for ..." when the LoRA's cross-attention width (attn2.to_k inputs)
    differs from the model's; "" otherwise."""
    lora_dims = {s["lora_A"][1] for n, s in shapes.items() if n.endswith("attn2.to_k") and "lora_A" in s}
    model_dims = {getattr(getattr(m, "base_layer", m), "in_features", None)
                  for n, m in modules.items() if n.endswith("attn2.to_k")} - {None}
    if not lora_dims or lora_dims <= model_dims:
        return ""
    dim = sorted(lora_dims - model_dims)[0]
    base = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(dim, "an unknown base")
    mine = ", ".join(map(str, sorted(model_dims))) or "none"
    return f"; it seems to be for a base with cross_attention_dim={dim} ({base}), this model's is {mine}"


def check_lora_matches(denoiser: nn.Module, lora_file: Path) -> None:
    """Raise a one-line UserError if a peft-format LoRA tensor names a module absent from
    `denoiser` or does not fit its layer (in/out sizes, A/B ranks, kernel, header rank)."""
    _check_safetensors_header(lora_file)
    shapes, config = _lora_file_contents(lora_file)
    modules = dict(denoiser.named_modules())
    missing, mismatched = [], []
    for name, module_shapes in shapes.items():
        module = modules.get(name)
        if module is None:
            missing.append(name)
            continue
        layer = getattr(module, "base_layer", module)
        mismatched += _module_mismatches(name, module_shapes, layer, _header_rank(config, name))
    if missing or mismatched:
        detail = (missing[:3] and f"{len(missing)} modules not in the model, e.g. {missing[:3]}") or ""
        if mismatched:
            detail += f"{'; ' if detail else ''}{len(mismatched)} shape mismatches, e.g. {mismatched[:2]}"
        hint = _cross_attention_hint(shapes, modules)
        raise UserError(f"LoRA {lora_file} does not fit this {type(denoiser).__name__}: {detail}{hint}")


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "default", alpha: float | None = None) -> None:
    """Check and load a diffusers-format LoRA into the pipeline's denoiser (safetensors only).

    diffusers rebuilds the adapter from the config in the file's header (rank, alpha, targets),
    so a LoRA saved by save_lora reloads at its trained scale alpha / r. A file without that
    header and without alpha tensors (old deradiff versions, other peft-format tools) loads at
    alpha = rank (scale 1), with a one-line note on stderr; `alpha` gives such a file its
    trained lora_alpha (scale alpha / r per module; save_lora then stores it). Passing `alpha`
    for a file that carries its own is refused.
    """
    lora_file = resolve_lora_file(path)
    denoiser = getattr(pipe, denoiser_name(pipe))
    check_lora_matches(denoiser, lora_file)
    carries_alpha = lora_file_carries_alpha(lora_file)
    if alpha is not None and carries_alpha:
        raise UserError(f"LoRA {lora_file} carries its own lora alpha; load it without alpha={alpha:g}")
    if alpha is not None and not (alpha > 0 and alpha < float("inf")):
        raise UserError(f"alpha must be a positive number, got {alpha}")
    pipe.load_lora_weights(
        str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name, use_safetensors=True
    )
    if alpha is not None:
        _set_lora_alpha(denoiser, adapter_name, alpha)
    elif not carries_alpha:
        print(f"note: LoRA {lora_file} carries no lora alpha (no adapter metadata in its header, no alpha "
              "tensors), so it is loaded with alpha = rank (scale 1); if it was trained with another alpha, "
              "load it with deradiff.models.load_lora(pipe, path, alpha=ALPHA) and re-save it with "
              "deradiff.models.save_lora, which stores the alpha", file=sys.stderr)


def lora_file_carries_alpha(lora_file: str | os.PathLike) -> bool:
    """Whether a safetensors LoRA file says its lora alpha: adapter metadata for the denoiser in
    the header (diffusers >= 0.35, save_lora) or alpha tensors (kohya and older formats)."""
    _, config = _lora_file_contents(Path(lora_file))
    if config:
        return True
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        return any(key.endswith("alpha") for key in f.keys())


def _set_lora_alpha(denoiser: nn.Module, adapter_name: str, alpha: float) -> None:
    """Give a loaded adapter lora_alpha = alpha: scale alpha / r in every layer, and the config
    save_lora writes."""
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_alpha:
            module.lora_alpha[adapter_name] = alpha
            module.scaling[adapter_name] = alpha / module.r[adapter_name]
    config = denoiser.peft_config[adapter_name]
    config.lora_alpha, config.alpha_pattern = alpha, {}


def set_lora_scale(denoiser: nn.Module, scale: float) -> None:
    """Weight-space baseline: scale every LoRA delta by `scale` (NOT realignment; see docs/method.md)."""
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                module.scaling[name] = scale * module.lora_alpha[name] / module.r[name]


# -- pipelines and schedulers --------------------------------------------------------------------


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  revision: str | None = None, variant: str | None = None, vae: str | None = None,
                  components: Mapping[str, nn.Module | None] | None = None):
    """A diffusers pipeline from a registered model name (deradiff.plugins, e.g. "toy"), a local
    folder, or a hub id (safetensors only).

    `vae` replaces the pipeline's VAE (e.g. "madebyollin/sdxl-vae-fp16-fix" for SDXL in fp16).
    `components` are taken instead of loaded, as diffusers' from_pretrained takes them: a module
    (e.g. an already trained UNet), or None to leave the component out (neither downloaded nor
    loaded; e.g. the VAE and text encoders when a latent cache holds their outputs). Names the
    pipeline does not have are ignored. A registered model whose `load` takes a `components`
    keyword is handed them; one whose `load` does not is loaded whole, then they replace its own.
    """
    from deradiff.plugins import model_entry

    components = dict(components or {})
    entry = model_entry(name_or_path)
    if entry is not None:
        return _load_registered(entry, dtype, device, components)
    from diffusers import AutoencoderKL, DiffusionPipeline

    try:
        extra = pipeline_components(name_or_path, components, revision)
        if vae and "vae" not in extra:
            extra["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, use_safetensors=True)
        pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, use_safetensors=True,
                                                 revision=revision, variant=variant, **extra)
    except (OSError, ValueError) as err:
        where = "local folder" if Path(name_or_path).exists() else "hub id (is the hub reachable / cached?)"
        raise UserError(f"cannot load pipeline {name_or_path!r} (or vae {vae!r}) as a {where}: "
                        f"{str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def component_config(name_or_path: str | os.PathLike, component: str, revision: str | None = None) -> dict:
    """The config.json of one component of a diffusers pipeline (local folder or hub id), read
    without its weights, e.g. component_config(path, "transformer")["guidance_embeds"]."""
    from diffusers.configuration_utils import ConfigMixin

    class ComponentConfig(ConfigMixin):
        config_name = "config.json"  # what every diffusers model writes; ConfigMixin itself names none

    try:
        return dict(ComponentConfig.load_config(str(name_or_path), subfolder=component, revision=revision))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {component}/config.json of {str(name_or_path)!r}: "
                        f"{str(err).splitlines()[0]}") from None


def pipeline_components(name_or_path: str | os.PathLike, components: Mapping[str, nn.Module | None],
                        revision: str | None = None) -> dict[str, nn.Module | None]:
    """The entries of `components` that name components of the pipeline at `name_or_path` (in its
    model_index.json): keyword arguments of DiffusionPipeline.from_pretrained, which loads none of
    them (a None is left out, a module is used as it is). Others would be warned about and ignored."""
    if not components:
        return {}
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(name_or_path), revision=revision)
    return {name: module for name, module in components.items() if name in index}


def _load_registered(entry, dtype: torch.dtype, device: str, components: dict):
    """entry.load(dtype, device), with `components` handed to a loader that takes them, else put
    in place after loading (the replaced modules are then freed)."""
    import inspect

    if not components:
        return entry.load(dtype=dtype, device=device)
    if "components" in inspect.signature(entry.load).parameters:
        return entry.load(dtype=dtype, device=device, components=components)
    pipe = entry.load(dtype=dtype, device=device)
    for name, module in components.items():
        if name in pipe.config:
            setattr(pipe, name, module)
    return pipe


def set_scheduler(pipe, name: str, **overrides) -> None:
    """Replace the pipeline's scheduler by `name` (see SCHEDULERS), keeping its noise schedule."""
    cls = scheduler_class(name)
    config = dict(pipe.scheduler.config)
    if name in ("ddim", "ddpm"):
        config["clip_sample"] = overrides.pop("clip_sample", False)
    pipe.scheduler = cls.from_config({**config, **overrides})
