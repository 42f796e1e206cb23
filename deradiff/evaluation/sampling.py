"""The sampling primitive that `deradiff sample` and `deradiff evaluate` share.

    sampler = load_sampler("toy", lora="runs/toy-dpo/lora", steps=20, scheduler="ddpm")
    images, kls = sampler.sample(["a red circle on a dark background"], [0], parse_lam("2"))
    sampler.throughput.as_dict()    # images/s and the realignment overhead so far

`load_sampler` loads a pipeline (a registered model, a local folder or a hub id), optionally
replaces its scheduler and loads a LoRA; the call keywords start from the registered model's
`sampling_defaults` (deradiff.plugins), then --steps / --guidance / --size / --eta. `sample`
draws realigned images, each row's noise from its own seed (a generator per row, so an image
does not depend on which rows share its batch), and returns each image's emulated path KL to
the reference (None for deterministic samplers). The realignment mode "auto" picks two_forward
or mixed_batch per call by `choose_mode`; `Sampler.throughput` sums where the time went.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deradiff.errors import UserError
from deradiff.evaluation.lams import Lam
from deradiff.io import atomic_write
from deradiff.realign import MODES as REALIGN_MODES
from deradiff.realign import LambdaSchedule, path_kl, realigned, records_guidance_scale

AUTO = "auto"
MODES = (AUTO, *REALIGN_MODES)  # --mode choices
# choose_mode's measured rule: on CPU, mixed_batch while the denoiser sees at most this many rows
# per call (images x 2 with classifier-free guidance); see choose_mode for the measurement.
CPU_MIXED_BATCH_MAX_ROWS = 16
# Interleaved (realigned, plain) call pairs timed per input shape for the realignment overhead;
# the median of their ratios counts, so one timing disturbed by other load does not set it.
PLAIN_TIMING_REPEATS = 5


def choose_mode(rows: int, device: str | torch.device, adapters: int = 1) -> str:
    """The realignment mode for a denoiser call of `rows` rows (images per pipeline call, x 2
    under classifier-free guidance) on `device`: "mixed_batch" (one forward on 2 x rows) or
    "two_forward" (two forwards on rows). Both give the same images up to float rounding.

    Rule: on CPU, mixed_batch while rows <= CPU_MIXED_BATCH_MAX_ROWS (16: up to 8 images per
    call with CFG), else two_forward; on CUDA and other accelerators, two_forward (not measured
    here: `make bench-gpu` measures both modes at SD shapes).

    Measured with `OMP_NUM_THREADS=2 python benchmarks/sampling.py` (-> benchmarks/results/
    sampling.json; `--threads 1 --out benchmarks/results/sampling_1thread.json` for the second),
    toy pipeline (1.9M-param UNet) and an 8.7M-param tiny UNet, CFG 3, 2 DDIM steps, on an
    idle 2-core machine, with the mixed batch routed by deradiff.routing (one batched matmul
    per LoRA layer). Time of mixed_batch / two_forward per call:
        rows                      2      4      8     16     32
        toy, 2 threads          0.60   0.71   0.76   0.86   1.06
        toy, 1 thread           0.72   0.67   0.76   0.97   0.92
        unet8m, 2 threads       0.66   0.72   0.74   0.69   1.05
        unet8m, 1 thread        0.74   0.58   0.73   0.85   0.98
    So the one call pays off while per-call overhead matters and stops paying at about 32
    rows; 16 is the bound every measurement supports. (With peft's per-row routing, before
    deradiff.routing, the same benchmark under load gave a bound of 4.)

    A lambda vector over `adapters` (K) LoRAs runs mixed_batch on (1 + K) x rows rows, so the
    bound is on that: (1 + K) x rows <= 2 x CPU_MIXED_BATCH_MAX_ROWS (K = 1: the rule above).
    """
    if torch.device(device).type != "cpu":
        return "two_forward"
    return "mixed_batch" if rows * (1 + adapters) <= 2 * CPU_MIXED_BATCH_MAX_ROWS else "two_forward"


@dataclass
class Throughput:
    """Where a Sampler's time went, summed over its calls (seconds; CUDA work synchronized).

    sample_s: wall time of the pipeline calls (text encoding, denoising, decoding);
    denoise_s: of which spent in the realigned denoiser;
    plain_s: what those denoiser calls would have taken as one plain forward each (the aligned
        model alone, as sampling without realignment does): denoise_s x the median ratio of
        PLAIN_TIMING_REPEATS interleaved plain / realigned calls on a call's own inputs, measured
        once per input shape (see plain_fraction);
    modes: images sampled per realignment mode.
    """

    images: int = 0
    sample_s: float = 0.0
    denoise_s: float = 0.0
    plain_s: float = 0.0
    modes: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.sample_s if self.images and self.sample_s > 0 else None

    @property
    def overhead(self) -> float | None:
        """Realigned sampling time over plain sampling time (one forward per step): e.g. 1.9
        means realignment made sampling 1.9x slower. None before any image."""
        plain = self.sample_s - self.denoise_s + self.plain_s
        return self.sample_s / plain if self.images and plain > 0 else None

    def add(self, images: int, sample_s: float, denoise_s: float, plain_s: float, mode: str) -> None:
        self.images += images
        self.sample_s += sample_s
        self.denoise_s += denoise_s
        self.plain_s += plain_s
        self.modes[mode] = self.modes.get(mode, 0) + images

    def merge(self, other: dict) -> None:
        """Add another sampler's `as_dict()` (e.g. a worker process's)."""
        self.images += other["images"]
        self.sample_s += other["sample_s"]
        self.denoise_s += other["denoise_s"]
        self.plain_s += other["plain_forward_s"]
        for mode, n in other["modes"].items():
            self.modes[mode] = self.modes.get(mode, 0) + n

    def as_dict(self) -> dict:
        """JSON-ready: images, seconds, images_per_s and realign_overhead (rounded)."""
        def r(v):
            return None if v is None else round(v, 4)

        return {"images": self.images, "sample_s": r(self.sample_s), "denoise_s": r(self.denoise_s),
                "plain_forward_s": r(self.plain_s), "images_per_s": r(self.images_per_s),
                "realign_overhead": r(self.overhead), "modes": dict(self.modes)}

    def postfix(self) -> dict:
        """Short fields for a progress bar."""
        out = {}
        if self.images_per_s is not None:
            out["img/s"] = f"{self.images_per_s:.2f}"
        if self.overhead is not None:
            out["realign"] = f"x{self.overhead:.2f}"
        return out


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
    mode: str = AUTO  # auto | two_forward | mixed_batch
    reference: torch.nn.Module | None = None  # two-model mode: the full reference UNet
    throughput: Throughput = field(default_factory=Throughput)
    _plain_fraction: dict = field(default_factory=dict, repr=False)  # input shapes, mode -> plain / realigned

    def mode_for(self, n_images: int, lam: Lam | None = None) -> str:
        """The realignment mode a call with n_images prompts at `lam` uses (AUTO resolved by
        choose_mode, which counts 1 + K rows per image row for a vector over K adapters)."""
        if self.mode != AUTO:
            return self.mode
        if self.reference is not None:  # two-model mode has no mixed batch
            return "two_forward"
        guidance = self.call.get("guidance_scale", getattr(self.pipe, "_guidance_scale", 1.0))
        cfg_rows = 2 if records_guidance_scale(self.pipe, guidance) > 1.0 else 1
        adapters = lam.adapters if isinstance(lam, Lam) else 1
        return choose_mode(n_images * cfg_rows, self.pipe.device, adapters)

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], lam: Lam | LambdaSchedule):
        """Realigned images (PIL) for prompts[i] with noise from seeds[i], and their emulated path KL
        (floats, or None for deterministic samplers). Each row's noise depends only on its seed."""
        schedule = lam.realign_lam if isinstance(lam, Lam) else lam
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        mode = self.mode_for(len(prompts), lam if isinstance(lam, Lam) else None)
        device = self.pipe.device
        timer = _CallTimer(device)
        start = _clock(device)
        if hasattr(self.pipe.scheduler, "generator"):
            # Samplers whose step noise the pipeline cannot hand over (the flow SDE) draw it from the
            # same per-row generators, so each image still depends only on its seed.
            self.pipe.scheduler.generator = generators
        with realigned(self.pipe, lam=schedule, reference=self.reference, mode=mode) as denoiser, timer.on(denoiser):
            images = self.pipe(list(prompts), generator=generators, **self.call).images
        sample_s = _clock(device) - start
        plain_s = timer.seconds * self._plain_fraction_of(denoiser, timer.first, device)
        self.throughput.add(len(images), sample_s, timer.seconds, plain_s, mode)
        guidance = self.call.get("guidance_scale", getattr(self.pipe, "_guidance_scale", 1.0))
        scale = records_guidance_scale(self.pipe, guidance, true_cfg_scale(self.call))
        kl = path_kl(denoiser.records, self.pipe.scheduler, guidance_scale=scale, eta=self.eta)
        return images, [None] * len(images) if kl is None else [float(v) for v in kl]

    @torch.no_grad()
    def _plain_fraction_of(self, denoiser, call: tuple | None, device) -> float:
        """plain_fraction of the realigned `denoiser` and its aligned model on a recorded call's
        (args, kwargs), measured once per input shape, mode and lambda vector (whose zero entries
        skip adapters). The denoiser's records are left as the pipeline call made them."""
        if call is None:
            return 0.0
        args, kwargs = call
        shapes = tuple(tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        key = (shapes, denoiser.mode, None if denoiser.vector is None else str(denoiser.vector))
        if key not in self._plain_fraction:
            kept = len(denoiser.records)
            self._plain_fraction[key] = plain_fraction(lambda: denoiser(*args, **kwargs),
                                                       lambda: denoiser.aligned(*args, **kwargs), device)
            del denoiser.records[kept:]
        return self._plain_fraction[key]


def plain_fraction(realigned_call, plain_call, device, repeats: int = PLAIN_TIMING_REPEATS) -> float:
    """Time of `plain_call()` over time of `realigned_call()` (no-argument callables on the same
    inputs): the median over `repeats` adjacent pairs, after one untimed pair that pays any
    warm-up. Each pair runs both under the same machine load, and the pairs alternate which runs
    first, so the ratio is a same-conditions measurement that one disturbed timing cannot set."""
    realigned_call()
    plain_call()
    ratios = []
    for i in range(repeats):
        first, second = (realigned_call, plain_call) if i % 2 == 0 else (plain_call, realigned_call)
        start = _clock(device)
        first()
        middle = _clock(device)
        second()
        end = _clock(device)
        realigned_s, plain_s = (middle - start, end - middle) if i % 2 == 0 else (end - middle, middle - start)
        ratios.append(plain_s / max(realigned_s, 1e-12))
    return statistics.median(ratios)


def true_cfg_scale(call: dict) -> float:
    """The true-CFG scale a FluxPipeline-style call `pipe(**call)` runs with: true_cfg_scale when
    it is given with a negative prompt (then the pipeline calls its transformer twice per step),
    else 1."""
    negative = call.get("negative_prompt") is not None or (
        call.get("negative_prompt_embeds") is not None and call.get("negative_pooled_prompt_embeds") is not None)
    return float(call.get("true_cfg_scale", 1.0)) if negative else 1.0


def _clock(device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _CallTimer:
    """Times a module's calls (count, seconds) and keeps the first call's inputs."""

    def __init__(self, device):
        self.device, self.calls, self.seconds, self.first = device, 0, 0.0, None
        self._start = 0.0

    @contextmanager
    def on(self, module: torch.nn.Module):
        def before(_module, args, kwargs):
            if self.first is None:
                self.first = (args, kwargs)
            self._start = _clock(self.device)

        def after(_module, _args, _kwargs, _out):
            self.calls += 1
            self.seconds += _clock(self.device) - self._start

        handles = [module.register_forward_pre_hook(before, with_kwargs=True),
                   module.register_forward_hook(after, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def load_sampler(pipeline: str, *, dtype: str = "float32", device: str = "cpu", scheduler: str | None = None,
                 lora: str | os.PathLike | dict[str, str] | None = None, adapter_name: str = "default",
                 reference_unet: str | None = None, steps: int | None = None, guidance: float | None = None,
                 size: int | None = None, eta: float = 0.0, mode: str = AUTO,
                 noise_level: float | None = None) -> Sampler:
    """Load the pipeline (and LoRA, and a reference UNet for two-model mode) and build its Sampler.
    `lora` may be a dict {adapter name: path}: each LoRA loaded as a named adapter, for lambda vectors.
    noise_level: the flow_sde scheduler's (None: its default)."""
    from deradiff.models import load_lora, load_pipeline, set_scheduler

    check_noise_level(scheduler, noise_level)
    torch_dtype = getattr(torch, dtype)
    pipe = load_pipeline(pipeline, dtype=torch_dtype, device=device)
    if scheduler:
        set_scheduler(pipe, scheduler, **({} if noise_level is None else {"noise_level": noise_level}))
    pipe.set_progress_bar_config(disable=True)
    reference = None
    if reference_unet:
        from diffusers import UNet2DConditionModel

        reference = UNet2DConditionModel.from_pretrained(reference_unet, use_safetensors=True)
        reference.to(device, torch_dtype)
    if isinstance(lora, dict):
        for name, path in lora.items():
            load_lora(pipe, path, adapter_name=name)
    elif lora:
        load_lora(pipe, lora, adapter_name=adapter_name)
    call = sampling_kwargs(pipeline, steps, guidance, size, eta)
    return Sampler(pipe, call, eta, mode, reference)


def check_noise_level(scheduler: str | None, noise_level: float | None) -> None:
    """--noise-level is the flow SDE's: refuse it with any other sampler (it would be ignored)."""
    if noise_level is not None and scheduler != "flow_sde":
        raise UserError(f"--noise-level sets the flow SDE's noise; it needs --scheduler flow_sde (got --scheduler "
                        f"{scheduler or 'the pipeline default'})")


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
