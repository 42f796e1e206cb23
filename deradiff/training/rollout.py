"""Stochastic sampling trajectories with per-step means, log-probabilities and KL to the reference.

The sampler is DDIM with eta > 0 (eta = 1 gives DDPM-like ancestral noise): each step is a
Gaussian N(mu_theta(x_t, t), sigma_t^2 I) whose mean comes from the scheduler's own `step()`
with zero variance noise, so no scheduler math is duplicated here. The reference branch (LoRA
disabled) gives mu_ref at the same x_t, and the exact per-step KL between the two
equal-variance Gaussians is ||mu_theta - mu_ref||^2 / (2 sigma_t^2) (docs/method.md section 4).

This is the training-time rollout (gradients through chosen steps, keyed noise), not a copy of
a pipeline's __call__: prompts are encoded by the caller and images decoded by `decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deradiff.models import adapters_disabled
from deradiff.seeding import SALT_ROLLOUT_INIT, SALT_ROLLOUT_STEP, keyed_randn
from deradiff.training.conditioning import Conditioning
from deradiff.training.losses import gaussian_kl, gaussian_log_prob


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
    """Classifier-free guided network output for a batch (one forward on [uncond; cond])."""
    if uncond is None or guidance == 1.0:
        return unet(x, t, **cond.as_kwargs(), return_dict=False)[0]
    both = Conditioning(
        torch.cat([uncond.encoder_hidden_states, cond.encoder_hidden_states]),
        None if cond.added_cond_kwargs is None else
        {k: torch.cat([uncond.added_cond_kwargs[k], v]) for k, v in cond.added_cond_kwargs.items()},
    )
    out_u, out_c = unet(torch.cat([x, x]), t, **both.as_kwargs(), return_dict=False)[0].chunk(2)
    return out_u + guidance * (out_c - out_u)


def step_mean_and_sigma(scheduler, out: torch.Tensor, t, x: torch.Tensor, eta: float) -> tuple[torch.Tensor, float]:
    """The DDIM step's Gaussian: mean via scheduler.step with zero noise, and its std."""
    mean = scheduler.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    sigma = eta * math.sqrt(float(scheduler._get_variance(int(t), prev_t)))
    return mean, sigma


def sample_trajectory(
    unet,
    reference_unet,
    scheduler,
    cond: Conditioning,
    uncond: Conditioning | None,
    latent_shape: tuple[int, ...],
    sample_ids: list[int],
    seed: int,
    step: int,
    num_steps: int,
    eta: float = 1.0,
    guidance: float = 1.0,
    grad_steps: int = 0,
) -> Trajectory:
    """Sample B = len(sample_ids) paths; noise is keyed by (seed, step, sample id).

    grad_steps = K > 0 keeps the autograd graph through the last K steps (DRaFT-K): x0 and
    kl_grad then carry gradients w.r.t. the LoRA; the earlier steps run without gradients.
    """
    if eta <= 0:
        raise ValueError("the KL needs a stochastic sampler: set eta > 0 (eta = 1 is DDPM-like)")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    device = cond.encoder_hidden_states.device
    dtype = cond.encoder_hidden_states.dtype
    x = keyed_randn(latent_shape, sample_ids, seed, step, salt=SALT_ROLLOUT_INIT).to(device, dtype) * scheduler.init_noise_sigma
    latents, log_probs, kls, sigmas = [x.detach()], [], [], []
    kl_grad = torch.zeros(len(sample_ids), device=device)
    for i, t in enumerate(timesteps):
        with_grad = torch.is_grad_enabled() and i >= num_steps - grad_steps
        with torch.set_grad_enabled(with_grad):
            mean, sigma = step_mean_and_sigma(scheduler, guided_output(unet, x, t, cond, uncond, guidance), t, x, eta)
        with torch.no_grad(), adapters_disabled(reference_unet):
            ref_mean, _ = step_mean_and_sigma(
                scheduler, guided_output(reference_unet, x, t, cond, uncond, guidance), t, x, eta)
        noise = keyed_randn(latent_shape, sample_ids, seed, step, salt=SALT_ROLLOUT_STEP + i).to(device, dtype)
        x_prev = mean + sigma * noise if sigma > 0 else mean
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


def step_log_prob_and_kl(unet, reference_unet, scheduler, traj: Trajectory, index: int, cond: Conditioning,
                         uncond: Conditioning | None, guidance: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) log p_theta(x_{t-1} | x_t) of the stored transition `index`, with gradients, and its KL
    to the reference (with gradients): the per-step quantities PPO/DDPO re-evaluates."""
    x, x_prev, t = traj.latents[index], traj.latents[index + 1], traj.timesteps[index]
    mean, sigma = step_mean_and_sigma(scheduler, guided_output(unet, x, t, cond, uncond, guidance), t, x, eta)
    with torch.no_grad(), adapters_disabled(reference_unet):
        ref_mean, _ = step_mean_and_sigma(scheduler, guided_output(reference_unet, x, t, cond, uncond, guidance), t, x, eta)
    return gaussian_log_prob(x_prev.float(), mean.float(), sigma), gaussian_kl(mean.float(), ref_mean.float(), sigma)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W), about [-1, 1] (not clamped, so reward gradients flow)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
