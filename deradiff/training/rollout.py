"""Stochastic sampling trajectories with per-step means, log-probabilities and KL to the reference.

Two samplers, both with Gaussian steps N(mu_theta(x_t, t), sigma_t^2 I) whose variance does not
depend on the model, so the exact per-step KL between the model and the reference (LoRA
disabled) at the same x_t is ||mu_theta - mu_ref||^2 / (2 sigma_t^2) (docs/method.md section 4):
- UNet families (SD1.5, SDXL): DDIM with eta > 0 (eta = 1 gives DDPM-like ancestral noise);
  the mean comes from the scheduler's own `step()` with zero variance noise, so no scheduler
  math is duplicated here.
- Flow families (SD3, FLUX): deradiff.flow.FlowMatchSDEScheduler (Flow-GRPO's SDE with the flow
  ODE's marginals); the mean a x + c v and the std come from its `step_coefficients`, so the
  per-step KL equals its `step_kl` and the log-probability its `step_log_prob`. The sampling
  schedule is the stock pipeline's (deradiff.training.families.FlowFamily.set_timesteps).

The denoiser is called through its family (deradiff.training.families, chosen by the
Conditioning's family): classifier-free guidance batches [uncond; cond] for UNets and SD3;
FLUX.1-dev's guidance is an input carried by the conditioning.

This is the training-time rollout (gradients through chosen steps, keyed noise), not a copy of
a pipeline's __call__: prompts are encoded by the caller and images decoded by `decode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deradiff.flow import FlowMatchSDEScheduler
from deradiff.models import adapters_disabled
from deradiff.seeding import SALT_ROLLOUT_INIT, SALT_ROLLOUT_STEP, keyed_randn
from deradiff.training.conditioning import Conditioning
from deradiff.training.families import get_family
from deradiff.training.losses import gaussian_kl, gaussian_log_prob


@dataclass(frozen=True)
class RolloutSpec:
    """How training rollouts are sampled and scored; built once when a method is set up.

    scheduler: DDIMScheduler (UNet families) or deradiff.flow.FlowMatchSDEScheduler (flow
    families), the rollouts' own (mutated: set_timesteps); latent_shape: (C, h, w) of one latent;
    num_steps: sampling steps N; eta: DDIM eta (> 0; flow families take noise_level from their
    scheduler instead); guidance: classifier-free guidance scale (1 = none; FLUX.1-dev: its
    guidance input, carried by the conditioning); seed: key of the noise.
    vae and reward_fn (images (B, 3, H, W) in [-1, 1], prompts) -> (B,): what `score` decodes
    and scores final latents with; sampling alone does not need them.
    """

    scheduler: Any
    latent_shape: tuple[int, int, int]
    num_steps: int
    eta: float = 1.0
    guidance: float = 1.0
    seed: int = 0
    vae: Any = None
    reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None

    def score(self, x0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 rewards of final latents x0 (B, C, h, w); gradients flow when they carry them."""
        if self.vae is None or self.reward_fn is None:
            raise ValueError("this RolloutSpec has no vae and reward_fn to score with")
        return self.reward_fn(decode(self.vae, x0), prompts).float()


@dataclass
class Trajectory:
    """A batch of B sampling paths over S steps.

    latents: (S + 1, B, C, h, w) x_T ... x_0 (detached); timesteps: (S,); sigmas: (S,);
    log_probs, kls: (S, B) per-step log p_theta(x_{t-1} | x_t) and KL to the reference
    (detached); x0: (B, C, h, w) final latents, carrying gradients through the last
    `grad_steps` steps when requested; kl_grad: (B,) KL summed over the steps with gradient.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor
    kls: torch.Tensor
    x0: torch.Tensor
    kl_grad: torch.Tensor

    @property
    def path_kl(self) -> torch.Tensor:
        """(B,) KL of the whole path to the reference path, in nats."""
        return self.kls.sum(0)


def guided_output(unet, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning | None,
                  guidance: float) -> torch.Tensor:
    """Classifier-free guided network output for a batch (one forward on [uncond; cond]);
    without uncond (or at guidance 1) one plain call. t: the scheduler's timestep."""
    family = get_family(cond.family)
    if uncond is None or guidance == 1.0:
        return family.predict(unet, x, t, cond)
    out_u, out_c = family.predict(unet, torch.cat([x, x]), t, uncond.cat(cond)).chunk(2)
    return out_u + guidance * (out_c - out_u)


def set_sampling_timesteps(scheduler, num_steps: int, latent_shape: tuple[int, ...], family: str) -> None:
    """The sampling schedule of `num_steps` steps for latents of `latent_shape` (C, h, w)."""
    fam = get_family(family)
    if fam.flow:
        fam.set_timesteps(scheduler, num_steps, tuple(latent_shape[-2:]))
    else:
        scheduler.set_timesteps(num_steps)


def step_mean_and_sigma(scheduler, out: torch.Tensor, t, x: torch.Tensor, eta: float) -> tuple[torch.Tensor, float]:
    """The step's Gaussian (mean, std) at x with network output `out`. Flow SDE: mean a x + c v
    in float32 and std from step_coefficients (eta unused). DDIM: mean via scheduler.step with
    zero noise, std eta x sqrt(DDIM variance)."""
    if isinstance(scheduler, FlowMatchSDEScheduler):
        k = scheduler.step_coefficients(float(t))
        return k.a * x.float() + k.c * out.float(), k.std
    mean = scheduler.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    sigma = eta * math.sqrt(float(scheduler._get_variance(int(t), prev_t)))
    return mean, sigma


def sample_trajectory(
    unet,
    reference_unet,
    spec: RolloutSpec,
    cond: Conditioning,
    uncond: Conditioning | None,
    sample_ids: list[int],
    step: int,
    grad_steps: int = 0,
) -> Trajectory:
    """Sample B = len(sample_ids) paths as `spec` says; noise is keyed by (spec.seed, step, sample id).

    grad_steps = K > 0 keeps the autograd graph through the last K steps (DRaFT-K): x0 and
    kl_grad then carry gradients w.r.t. the LoRA; the earlier steps run without gradients.
    """
    scheduler, latent_shape, num_steps, seed = spec.scheduler, spec.latent_shape, spec.num_steps, spec.seed
    if isinstance(scheduler, FlowMatchSDEScheduler):
        if scheduler.config.noise_level <= 0:
            raise ValueError("the KL needs a stochastic sampler: set the FlowMatchSDEScheduler's noise_level > 0")
    elif spec.eta <= 0:
        raise ValueError("the KL needs a stochastic sampler: set eta > 0 (eta = 1 is DDPM-like)")
    set_sampling_timesteps(scheduler, num_steps, latent_shape, cond.family)
    timesteps = scheduler.timesteps
    device = cond.encoder_hidden_states.device
    dtype = cond.encoder_hidden_states.dtype
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma = 1
    x = keyed_randn(latent_shape, sample_ids, seed, step, salt=SALT_ROLLOUT_INIT).to(device, dtype) * init_sigma
    latents, log_probs, kls, sigmas = [x.detach()], [], [], []
    kl_grad = torch.zeros(len(sample_ids), device=device)
    for i, t in enumerate(timesteps):
        with_grad = torch.is_grad_enabled() and i >= num_steps - grad_steps
        with torch.set_grad_enabled(with_grad):
            mean, sigma = _step_gaussian(unet, spec, x, t, cond, uncond)
        with torch.no_grad(), adapters_disabled(reference_unet):
            ref_mean, _ = _step_gaussian(reference_unet, spec, x, t, cond, uncond)
        noise = keyed_randn(latent_shape, sample_ids, seed, step, salt=SALT_ROLLOUT_STEP + i).to(device, dtype)
        x_prev = (mean + sigma * noise if sigma > 0 else mean).to(dtype)  # the flow mean is float32
        kl = gaussian_kl(mean.float(), ref_mean.float(), sigma) if sigma > 0 else torch.zeros_like(kl_grad)
        if with_grad:
            kl_grad = kl_grad + kl
        kls.append(kl.detach())
        log_probs.append(gaussian_log_prob(x_prev.detach().float(), mean.detach().float(), sigma)
                         if sigma > 0 else torch.zeros_like(kl_grad))
        sigmas.append(sigma)
        x = x_prev if with_grad else x_prev.detach()
        latents.append(x.detach())
    return Trajectory(torch.stack(latents), timesteps.clone(), torch.tensor(sigmas), torch.stack(log_probs),
                      torch.stack(kls), x, kl_grad)


def _step_gaussian(unet, spec: RolloutSpec, x: torch.Tensor, t, cond: Conditioning,
                   uncond: Conditioning | None) -> tuple[torch.Tensor, float]:
    """(mean, std) of `unet`'s sampling step from x at timestep t under `spec`."""
    out = guided_output(unet, x, t, cond, uncond, spec.guidance)
    return step_mean_and_sigma(spec.scheduler, out, t, x, spec.eta)


def step_log_prob_and_kl(unet, reference_unet, spec: RolloutSpec, traj: Trajectory, index: int, cond: Conditioning,
                         uncond: Conditioning | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) log p_theta(x_{t-1} | x_t) of the stored transition `index`, with gradients, and its KL
    to the reference (with gradients): the per-step quantities PPO/DDPO re-evaluates."""
    x, x_prev, t = traj.latents[index], traj.latents[index + 1], traj.timesteps[index]
    mean, sigma = _step_gaussian(unet, spec, x, t, cond, uncond)
    with torch.no_grad(), adapters_disabled(reference_unet):
        ref_mean, _ = _step_gaussian(reference_unet, spec, x, t, cond, uncond)
    return gaussian_log_prob(x_prev.float(), mean.float(), sigma), gaussian_kl(mean.float(), ref_mean.float(), sigma)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W), about [-1, 1] (not clamped, so reward gradients flow)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
