"""What differs per model family in training, behind one table keyed by the recipe's model.kind.

    family = FAMILIES[recipe.model.kind]       # "sd15", "sdxl", "sd3", "flux"
    cond = family.encode(pipe, prompts, device, guidance=...)          # Conditioning, via pipe.encode_prompt
    t = family.training_timesteps(scheduler, pair_ids, seed, epoch, sampling)   # keyed, (B,)
    noisy, target = family.noised(scheduler, x0, noise, t)             # what the denoiser regresses
    out = family.predict(denoiser, noisy, t, cond)                      # one denoiser call, (B, C, h, w)

Two kinds of noising:
- UNet families (sd15, sdxl): a DDPM-type scheduler; integer timesteps uniform in
  [0, num_train_timesteps); x_t = scheduler.add_noise(x0, eps, t); target eps or v
  (prediction_type). The numbers are those of the runs made before flow families existed.
- Flow families (sd3, flux): diffusers' rectified flow, x_s = (1 - s) x0 + s eps, target
  v = eps - x0. s is drawn as diffusers' SD3/FLUX training scripts draw it:
  u ~ compute_density_for_timestep_sampling (uniform, or logit-normal: sigmoid(N(mean, std)))
  indexes the training schedule of a fresh copy of the pipeline's scheduler, whose sigmas carry
  the scheduler's shift (SD3.5: 3.0; FLUX.1 shifts by resolution at sampling only, so its
  training sigmas are unshifted). Timesteps t = 1000 s are on the scheduler's axis, as SD3's
  pipeline hands them to its transformer; FLUX's takes t / 1000 (predict divides).

Denoiser calls: UNets take (x, t, encoder_hidden_states[, added_cond_kwargs]); SD3's transformer
(hidden_states, timestep, encoder_hidden_states, pooled_projections); FLUX's transformer packed
2x2 latent patches with img_ids / txt_ids, pooled_projections and, for FLUX.1-dev (guidance
distilled), the guidance scale as an input (`Conditioning.guidance`) instead of two branches.
Packing uses FluxPipeline's own _pack_latents / _unpack_latents / _prepare_latent_image_ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from deradiff.errors import UserError
from deradiff.seeding import SALT_DPO_SIGMA, SALT_DPO_TIMESTEP, keyed_generator, keyed_randint
from deradiff.training.conditioning import Conditioning

SigmaSampling = Literal["uniform", "logit_normal"]


@dataclass(frozen=True)
class TimestepSampling:
    """How flow families draw the training sigma of a pair (diffusers' weighting_scheme):
    "uniform" (u ~ U[0, 1)) or "logit_normal" (u = sigmoid(N(logit_mean, logit_std)), SD3's
    default with mean 0, std 1). Ignored by UNet families (uniform integer timesteps)."""

    scheme: SigmaSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def describe(self) -> str:
        if self.scheme == "uniform":
            return "sigma index uniform"
        return f"sigma index logit-normal({self.logit_mean:g}, {self.logit_std:g})"


class UNetFamily:
    """SD1.5 / SD2 (one CLIP encoder) and SDXL (two encoders, pooled embeds, time ids)."""

    flow = False
    cfg = True  # classifier-free guidance batches [uncond; cond]

    def __init__(self, name: Literal["sd15", "sdxl"]):
        self.name = name

    def encode(self, pipe, prompts: list[str], device, resolution: int | None = None,
               original_sizes: torch.Tensor | None = None, crops_top_left: torch.Tensor | None = None,
               guidance: float | None = None, max_sequence_length: int | None = None) -> Conditioning:
        """Frozen text conditioning (no classifier-free duplication). SDXL time ids are
        (original_h, original_w, crop_top, crop_left, target_h, target_w) per sample; without
        per-sample sizes they default to the training resolution and no crop."""
        if self.name == "sd15":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
            return Conditioning(embeds, family="sd15")
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
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids}, family="sdxl")

    def predict(self, denoiser, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        return denoiser(x, t, **cond.as_kwargs(), return_dict=False)[0]

    def training_timesteps(self, scheduler, pair_ids: list[int], seed: int, epoch: int,
                           sampling: TimestepSampling | None = None) -> torch.Tensor:
        """(B,) integer timesteps, uniform, keyed by pair id."""
        return keyed_randint(scheduler.config.num_train_timesteps, pair_ids, seed, epoch, salt=SALT_DPO_TIMESTEP)

    def noised(self, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, target): add_noise, and eps or v by the scheduler's prediction_type."""
        noisy = scheduler.add_noise(x0, noise, t)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"prediction_type {kind!r} is not supported for DPO; use epsilon or v_prediction")

    def latent_channels(self, pipe) -> int:
        return pipe.unet.config.in_channels


class FlowFamily:
    """Rectified-flow transformers: SD3 / SD3.5 ("sd3") and FLUX.1 ("flux")."""

    flow = True

    def __init__(self, name: Literal["sd3", "flux"]):
        self.name = name
        self.cfg = name == "sd3"  # FLUX.1-dev takes the guidance as an input, not two branches

    # -- prompts ----------------------------------------------------------------------------------

    def encode(self, pipe, prompts: list[str], device, resolution: int | None = None,
               original_sizes: torch.Tensor | None = None, crops_top_left: torch.Tensor | None = None,
               guidance: float | None = None, max_sequence_length: int | None = None) -> Conditioning:
        """The stock pipeline's encode_prompt: SD3 concatenates CLIP-L and CLIP-G states with T5's
        and pools the two CLIPs; FLUX takes T5 states and the CLIP-L pooled embedding. FLUX.1-dev
        also needs `guidance` (the distilled guidance scale, e.g. 3.5), stored per row; a transformer
        without guidance_embeds ignores it (with the transformer left out, a given one is stored).
        max_sequence_length: T5 tokens; None = the pipeline's default (SD3 256, FLUX 512)."""
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        if self.name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                      **length)
            return Conditioning(embeds, pooled_projections=pooled, family="sd3")
        embeds, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                     num_images_per_prompt=1, **length)
        rows = None
        # with the transformer left out (building a latent cache) the caller knows whether it takes guidance
        takes_guidance = guidance is not None if pipe.transformer is None else pipe.transformer.config.guidance_embeds
        if takes_guidance:
            if guidance is None:
                raise ValueError("this FLUX transformer is guidance-distilled (FLUX.1-dev): pass guidance=, "
                                 "e.g. method.guidance_scale=3.5")
            rows = torch.full((len(prompts),), float(guidance), device=embeds.device, dtype=torch.float32)
        return Conditioning(embeds, pooled_projections=pooled, txt_ids=txt_ids, guidance=rows, family="flux")

    # -- the denoiser call --------------------------------------------------------------------------

    def predict(self, denoiser, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """Velocity v (B, C, h, w) at latents x and timesteps t (scalar or (B,), on the scheduler's
        axis: 1000 sigma)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if self.name == "sd3":
            return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                            pooled_projections=cond.pooled_projections, return_dict=False)[0]
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=cond.guidance,
                       pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.encoder_hidden_states,
                       txt_ids=cond.txt_ids, img_ids=img_ids, return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE factor: latent sizes with factor 1.
        return FluxPipeline._unpack_latents(out, h, w, vae_scale_factor=1)

    # -- training noise -----------------------------------------------------------------------------

    @staticmethod
    def training_schedule(scheduler):
        """A fresh copy of the scheduler: its training sigmas (num_train_timesteps of them, with
        the shift), untouched by any set_timesteps the pipeline's own scheduler went through."""
        return type(scheduler).from_config(scheduler.config)

    def training_timesteps(self, scheduler, pair_ids: list[int], seed: int, epoch: int,
                           sampling: TimestepSampling | None = None) -> torch.Tensor:
        """(B,) timesteps 1000 s of the training schedule; pair i's draw depends only on
        (seed, epoch, pair id), through diffusers' compute_density_for_timestep_sampling."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sampling = sampling or TimestepSampling()
        schedule = self.training_schedule(scheduler)
        n = schedule.config.num_train_timesteps
        u = torch.cat([compute_density_for_timestep_sampling(
            sampling.scheme, 1, logit_mean=sampling.logit_mean, logit_std=sampling.logit_std,
            generator=keyed_generator(seed, epoch, SALT_DPO_SIGMA, k)) for k in pair_ids])
        index = (u * n).long().clamp(0, n - 1)
        return schedule.timesteps[index]

    def noised(self, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_s, v): x_s = (1 - s) x0 + s eps with s = t / num_train_timesteps; v = eps - x0."""
        s = (t.to(torch.float32) / scheduler.config.num_train_timesteps).view(-1, *([1] * (x0.ndim - 1)))
        s = s.to(x0.device, x0.dtype)
        return (1.0 - s) * x0 + s * noise, noise - x0

    def latent_channels(self, pipe) -> int:
        return pipe.vae.config.latent_channels

    # -- sampling -----------------------------------------------------------------------------------

    def set_timesteps(self, scheduler, num_steps: int, latent_hw: tuple[int, int]) -> None:
        """The sampling schedule the stock pipeline would use for this latent size: FLUX's sigmas
        linspace(1, 1/N, N); the resolution shift mu from the packed token count (h/2)(w/2)
        whenever the scheduler shifts dynamically."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        kwargs = {}
        if self.name == "flux":
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        if cfg.get("use_dynamic_shifting", False):
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            kwargs["mu"] = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        scheduler.set_timesteps(num_steps, **kwargs)


FAMILIES: dict[str, UNetFamily | FlowFamily] = {
    "sd15": UNetFamily("sd15"),
    "sdxl": UNetFamily("sdxl"),
    "sd3": FlowFamily("sd3"),
    "flux": FlowFamily("flux"),
}


def get_family(name: str) -> UNetFamily | FlowFamily:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def guidance_input(recipe, pipe) -> float | None:
    """method.guidance_scale where the denoiser takes the guidance as an input (FLUX.1-dev's
    guidance_embeds, read from the transformer's config.json when it is not loaded), else None."""
    from deradiff.models import component_config

    m = recipe.model
    if m.kind != "flux":
        return None
    transformer = getattr(pipe, "transformer", None)
    config = transformer.config if transformer is not None else component_config(m.name_or_path, "transformer",
                                                                                 m.revision)
    return recipe.method.guidance_scale if config.get("guidance_embeds") else None


def family_of(pipe) -> str:
    """The family of a loaded pipeline, from its denoiser (or, left out as when a latent cache is
    built, the pipeline's class) and text encoders (a second text encoder, loaded or left out: a
    pipeline loaded for training from a latent cache has none in memory)."""
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else type(pipe).__name__
    if name.startswith(("SD3", "StableDiffusion3")):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if transformer is not None or "transformer" in getattr(pipe, "config", {}):  # e.g. PixArt, its transformer left out
        denoiser = f" (its denoiser: {name})" if transformer is not None else ""
        raise UserError(f"{type(pipe).__name__}{denoiser} is not a supported family (sd15, sdxl, sd3, flux)")
    has_second = getattr(pipe, "text_encoder_2", None) is not None or "text_encoder_2" in getattr(pipe, "config", {})
    return "sdxl" if has_second else "sd15"


def check_family(kind: str, pipe, where: str = "model.kind") -> UNetFamily | FlowFamily:
    """The family of `pipe`, after checking that the recipe names it: a one-line UserError otherwise."""
    actual = family_of(pipe)
    if actual != kind:
        raise UserError(f"{where}={kind} but the pipeline is a {type(pipe).__name__} ({actual}): set {where}={actual}")
    return get_family(kind)
