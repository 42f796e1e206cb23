"""One Diffusion-DPO step on a batch of preference pairs (Wallace et al., CVPR 2024), any family.

The preferred (w) and rejected (l) images of a pair share the timestep (or flow sigma) and the
noise; the reference is the same denoiser with its LoRA disabled (no second copy in memory).
What the denoiser regresses depends on the family (deradiff.training.families): eps or v for
SD1.5/SDXL UNets, the flow velocity v = eps - x0 at x_s = (1 - s) x0 + s eps for SD3/FLUX
transformers. The loss itself is the pure function `deradiff.training.losses.diffusion_dpo_loss`:

    loss, metrics = diffusion_dpo_loss(*dpo_errors(unet, unet, vae, scheduler, w, l, cond, ids, seed, epoch),
                                       beta=2000, convention="official")

Flow DPO uses the same loss and conventions; only the scale of beta differs in practice
(Flow-GRPO's SD3.5-M DPO: beta 100 in the official convention, yifan123/flow_grpo config/dpo.py,
against SD1.5's 2000 and SDXL's 5000; see recipes/sd35m-dpo-pickapic.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deradiff.models import adapters_disabled
from deradiff.seeding import SALT_DPO_NOISE, SALT_DPO_VAE, keyed_randn
from deradiff.training.conditioning import Conditioning
from deradiff.training.families import TimestepSampling, check_family, get_family, guidance_input
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
    sampling: TimestepSampling | None = None,
    split_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair denoising errors of the model and the reference on B preference pairs.

    Args:
        unet: the trainable (possibly accelerate-wrapped) denoiser (UNet or transformer) with its
            LoRA enabled.
        reference_unet: the same denoiser unwrapped; run with adapters disabled, without gradients.
        noise_scheduler: the pipeline's scheduler (DDPM-type, or flow matching for SD3/FLUX).
        pixel_values_w, pixel_values_l: (B, 3, H, W) in [-1, 1], preferred and rejected.
        cond: text conditioning for the B prompts; its `family` picks noising, target and call.
        pair_ids, seed, epoch: key the noise, timestep and VAE draw of each pair, so results do
            not depend on how pairs are split across processes or on resuming.
        sampling: flow families: how sigma is drawn (default logit-normal(0, 1), as SD3).
        split_backward: run the model on one image at a time, each backpropagated before the
            next (see `model_errors_one_at_a_time`): the same gradient, one image's activations.
    Returns (model_err_w, model_err_l, ref_err_w, ref_err_l), each (B,) (per-sample MSE).
    """
    # Image keys: 2 * id for the preferred image of pair `id`, 2 * id + 1 for the rejected one.
    image_keys = [2 * i for i in pair_ids] + [2 * i + 1 for i in pair_ids]
    latents = encode_latents(vae, torch.cat([pixel_values_w, pixel_values_l]), image_keys, seed, epoch)
    return dpo_errors_from_latents(unet, reference_unet, noise_scheduler, latents, cond, pair_ids, seed, epoch,
                                   sampling, split_backward=split_backward)


def dpo_errors_from_latents(unet, reference_unet, noise_scheduler, latents: torch.Tensor, cond: Conditioning,
                            pair_ids: list[int], seed: int, epoch: int, sampling: TimestepSampling | None = None,
                            ref_errors: tuple[torch.Tensor, torch.Tensor] | None = None,
                            split_backward: bool = False):
    """`dpo_errors` from scaled latents (2B, C, h, w): the B preferred, then the B rejected.

    ref_errors: the reference's (err_w, err_l), each (B,), when they are known already (stored by
    an earlier run of a sweep, deradiff.training.reference_errors): the reference forward is
    skipped and they are returned as they are (float32, on the latents' device).
    """
    family = get_family(cond.family)
    noisy, timesteps, target, both = _noised_pairs(family, noise_scheduler, latents, cond, pair_ids, seed, epoch,
                                                   sampling)
    # The reference runs first: its transient activations are freed before the model's forward
    # keeps its own for the backward, so the step's peak holds one set, not both.
    if ref_errors is None:
        r_w, r_l = _reference_errors(family, reference_unet, noisy, timesteps, both, target)
    else:
        r_w, r_l = (e.to(latents.device, torch.float32) for e in ref_errors)
        if r_w.shape != (len(pair_ids),) or r_l.shape != (len(pair_ids),):
            raise ValueError(f"ref_errors of shapes {tuple(r_w.shape)}, {tuple(r_l.shape)} for {len(pair_ids)} pairs")
    if split_backward and torch.is_grad_enabled():
        errors = model_errors_one_at_a_time(family, unet, reference_unet, noisy, timesteps, both, target)
    else:
        errors = per_sample_mse(family.predict(unet, noisy, timesteps, both).float(), target.float())
    m_w, m_l = errors.chunk(2)
    return m_w, m_l, r_w, r_l


def model_errors_one_at_a_time(family, unet, module, noisy: torch.Tensor, timesteps: torch.Tensor,
                               cond: Conditioning, target: torch.Tensor) -> torch.Tensor:
    """Per-row errors (N,) of the model, computed one row at a time, holding one row's activations.

    Every row but the last is run through `module` (the unwrapped denoiser) and backpropagated at
    once into its own gradient g_i over the trainable parameters theta (LoRA-sized); its error is
    returned as err_i + <theta, g_i> - <theta, g_i>.detach(): the same value, and the gradient
    g_i when the loss is backpropagated. The last row runs through `unet` (possibly DDP- or
    DeepSpeed-wrapped) and keeps its graph, so the trainer's one backward call reaches every
    row's gradient scaled by dloss/derr_i, exactly the batched gradient up to float rounding, and
    gradient synchronisation and loss scaling see an ordinary forward and backward. The compute
    is the batched step's (N forwards and backwards of one row: less efficient where a batch of
    N fills the device better); the memory is one row's activations plus N - 1 LoRA-sized
    gradients. LoRA dropout draws its masks per row.
    noisy, target: (N, C, h, w); timesteps: (N,); cond: N rows.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    errors = []
    for i in range(noisy.shape[0]):
        last = i == noisy.shape[0] - 1
        row_cond = cond.map_rows(lambda t, i=i: t[i:i + 1])
        pred = family.predict(unet if last else module, noisy[i:i + 1], timesteps[i:i + 1], row_cond)
        err = per_sample_mse(pred.float(), target[i:i + 1].float())
        if not last:
            grads = torch.autograd.grad(err.sum(), params, allow_unused=True)
            err = err.detach() + _gradient_carrier(params, grads)
        errors.append(err)
    return torch.cat(errors)


def _gradient_carrier(params: list[torch.Tensor], grads) -> torch.Tensor:
    """A scalar of value 0 whose gradient with respect to each of `params` is its entry of `grads`."""
    terms = [(p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None]
    if not terms:  # no trainable parameter reached this row
        return torch.zeros((), device=params[0].device if params else None)
    inner = torch.stack(terms).sum()
    return inner - inner.detach()


def dpo_reference_errors(reference_unet, noise_scheduler, latents: torch.Tensor, cond: Conditioning,
                         pair_ids: list[int], seed: int, epoch: int, sampling: TimestepSampling | None = None):
    """The reference half of `dpo_errors_from_latents` alone: (ref_err_w, ref_err_l), each (B,),
    the same draws (what `deradiff cache --reference-epochs` stores)."""
    family = get_family(cond.family)
    noisy, timesteps, target, both = _noised_pairs(family, noise_scheduler, latents, cond, pair_ids, seed, epoch,
                                                   sampling)
    return _reference_errors(family, reference_unet, noisy, timesteps, both, target)


def _noised_pairs(family, noise_scheduler, latents, cond, pair_ids, seed, epoch, sampling):
    """(noisy latents, timesteps, target, conditioning), all 2B rows: pair i's two images share
    its keyed noise and timestep."""
    device = latents.device
    noise = keyed_randn(latents.shape[1:], pair_ids, seed, epoch, salt=SALT_DPO_NOISE).to(device, latents.dtype)
    noise = noise.repeat(2, 1, 1, 1)
    timesteps = family.training_timesteps(noise_scheduler, pair_ids, seed, epoch, sampling).to(device).repeat(2)
    noisy, target = family.noised(noise_scheduler, latents, noise, timesteps)
    return noisy, timesteps, target, cond.repeat(2)


@torch.no_grad()
def _reference_errors(family, reference_unet, noisy, timesteps, both, target):
    """Per-sample MSE of the reference (adapters disabled), split into (w, l), each (B,)."""
    with adapters_disabled(reference_unet):
        ref_pred = family.predict(reference_unet, noisy, timesteps, both)
    return per_sample_mse(ref_pred.float(), target.float()).chunk(2)


@dataclass(frozen=True)
class DPOSettings:
    """What a recipe fixes about a DPO step beyond the loss: the family (checked against the
    pipeline), the flow sigma sampling, and FLUX.1-dev's guidance input."""

    family: str
    sampling: TimestepSampling
    guidance: float | None
    max_sequence_length: int | None = None

    @property
    def encode_kwargs(self) -> dict:
        """Keyword arguments of encode_prompts for this family (guidance, T5 length)."""
        return {"guidance": self.guidance, "max_sequence_length": self.max_sequence_length}

    def describe(self) -> str:
        if not get_family(self.family).flow:
            return "target: eps/v of the scheduler, timesteps uniform"
        extra = f", guidance input {self.guidance:g}" if self.guidance is not None else ""
        return (f"flow target v = eps - x0 at x_s = (1 - s) x0 + s eps, {self.sampling.describe()} into the "
                f"scheduler's shifted training sigmas{extra}")


def dpo_settings(recipe, pipe) -> DPOSettings:
    """DPOSettings of a recipe for a loaded pipeline (UserError if model.kind names another family)."""
    check_family(recipe.model.kind, pipe)
    m = recipe.method
    sampling = TimestepSampling(m.sigma_sampling, m.logit_mean, m.logit_std)
    return DPOSettings(recipe.model.kind, sampling, guidance_input(recipe, pipe), recipe.model.max_sequence_length)
