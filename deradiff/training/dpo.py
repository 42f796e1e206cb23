"""One Diffusion-DPO step on a batch of preference pairs (Wallace et al., CVPR 2024).

The preferred (w) and rejected (l) images of a pair share the timestep and the noise; the
reference is the same UNet with its LoRA disabled (no second copy in memory). The loss itself
is the pure function `deradiff.training.losses.diffusion_dpo_loss`:

    loss, metrics = diffusion_dpo_loss(*dpo_errors(unet, unet, vae, scheduler, w, l, cond, ids, seed, epoch),
                                       beta=2000, convention="official")
"""

from __future__ import annotations

import torch

from deradiff.models import adapters_disabled
from deradiff.seeding import SALT_DPO_NOISE, SALT_DPO_TIMESTEP, SALT_DPO_VAE, keyed_randint, keyed_randn
from deradiff.training.conditioning import Conditioning
from deradiff.training.losses import per_sample_mse


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, keys: list[int] | None = None, seed: int = 0,
                   step: int = 0) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, h, w): a draw from the VAE posterior
    keyed by `keys` (see deradiff.seeding), or the posterior mean when keys is None."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    latents = dist.mean
    if keys is not None:
        noise = keyed_randn(latents.shape[1:], keys, seed, step, salt=SALT_DPO_VAE)
        latents = latents + dist.std * noise.to(latents.device, latents.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the network regresses: the noise (epsilon) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported for DPO; use epsilon or v_prediction")


def dpo_errors(
    unet,
    reference_unet,
    vae,
    noise_scheduler,
    pixel_values_w: torch.Tensor,
    pixel_values_l: torch.Tensor,
    cond: Conditioning,
    pair_ids: list[int],
    seed: int,
    epoch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair denoising errors of the model and the reference on B preference pairs.

    Args:
        unet: the trainable (possibly accelerate-wrapped) UNet with its LoRA enabled.
        reference_unet: the same UNet unwrapped; run with adapters disabled, without gradients.
        pixel_values_w, pixel_values_l: (B, 3, H, W) in [-1, 1], preferred and rejected.
        cond: text conditioning for the B prompts.
        pair_ids, seed, epoch: key the noise, timestep and VAE draw of each pair, so results do
            not depend on how pairs are split across processes or on resuming.
    Returns (model_err_w, model_err_l, ref_err_w, ref_err_l), each (B,) (per-sample MSE).
    """
    # Image keys: 2 * id for the preferred image of pair `id`, 2 * id + 1 for the rejected one.
    image_keys = [2 * i for i in pair_ids] + [2 * i + 1 for i in pair_ids]
    latents = encode_latents(vae, torch.cat([pixel_values_w, pixel_values_l]), image_keys, seed, epoch)
    device = latents.device
    noise = keyed_randn(latents.shape[1:], pair_ids, seed, epoch, salt=SALT_DPO_NOISE).to(device, latents.dtype)
    noise = noise.repeat(2, 1, 1, 1)
    num_train = noise_scheduler.config.num_train_timesteps
    timesteps = keyed_randint(num_train, pair_ids, seed, epoch, salt=SALT_DPO_TIMESTEP).to(device).repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    kwargs = cond.repeat(2).as_kwargs()
    model_pred = unet(noisy, timesteps, **kwargs, return_dict=False)[0]
    with torch.no_grad(), adapters_disabled(reference_unet):
        ref_pred = reference_unet(noisy, timesteps, **kwargs, return_dict=False)[0]
    model_err = per_sample_mse(model_pred.float(), target.float())
    ref_err = per_sample_mse(ref_pred.float(), target.float())
    m_w, m_l = model_err.chunk(2)
    r_w, r_l = ref_err.chunk(2)
    return m_w, m_l, r_w, r_l
