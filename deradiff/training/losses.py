"""Training losses as pure functions: tensors in, (scalar loss, metrics dict of floats) out.

Diffusion-DPO (Wallace et al., CVPR 2024), the exact per-step Gaussian KL between two
equal-variance denoising policies, Gaussian log-probabilities and a DDPO-style clipped PPO
objective (Black et al., 2024), and the KL-regularized reward objective of DRaFT/DPOK-style
fine-tuning. Nothing here touches a model, so every formula is tested on hand-built tensors
(tests/test_losses.py). Metric names are namespaced: `dpo/*`, `ppo/*`, `kl/*`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

DPOConvention = Literal["official", "diffusers"]
LogProbReduction = Literal["sum", "mean"]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (B, ...) x (B, ...) -> (B,), computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).pow(2)
    return err.mean(dim=tuple(range(1, err.ndim)))


def dpo_scale(beta: float, convention: DPOConvention) -> float:
    """The factor multiplying the margin difference inside the sigmoid.

    "official" (Salesforce DiffusionDPO train.py, diffusers' SDXL DPO script): beta / 2, with
    beta_dpo = 2000 (SD1.5, paper) or 5000 (SDXL). "diffusers" (diffusers' SD1.5 DPO script):
    beta itself, default 2500. So official beta 5000 == diffusers beta 2500.
    """
    if convention == "official":
        return beta / 2.0
    if convention == "diffusers":
        return float(beta)
    raise ValueError(f"unknown DPO beta convention {convention!r}; use 'official' or 'diffusers'")


def dpo_logits(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
               ref_err_l: torch.Tensor) -> torch.Tensor:
    """(B,) implicit reward margins before the beta scale: (r_w - r_l) - (m_w - m_l); > 0 where
    the model prefers x_w more than the reference does. The reference errors carry no gradient."""
    return (ref_err_w - ref_err_l).detach() - (model_err_w - model_err_l)


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where a margin of `dpo_logits` is positive, 0 where negative, 1/2 on exact ties."""
    return (logits > 0).float() + 0.5 * (logits == 0).float()


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    convention: DPOConvention = "official",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO loss for B pairs that share timestep and noise within each pair.

    Args:
        model_err_w, model_err_l: (B,) per-sample MSE of the trained model on the preferred (w)
            and rejected (l) image, e.g. `per_sample_mse(eps_theta, eps)`.
        ref_err_w, ref_err_l: (B,) the same for the reference (no gradient needed).
        beta: the DPO temperature in the chosen convention (see `dpo_scale`).
    Returns:
        loss = mean_i -log sigmoid(-s * ((m_w - m_l) - (r_w - r_l))), s = dpo_scale(beta, convention),
        and metrics:
          dpo/loss
          dpo/implicit_acc  fraction of pairs where the model's margin beats the reference's,
                            i.e. (m_w - m_l) < (r_w - r_l); exact ties count 1/2 (as diffusers'
                            scripts do; the official code counts them 0). With a zero-initialized
                            LoRA every pair is a tie at step 0, so it starts at 0.5 = chance.
          dpo/model_margin  mean (m_w - m_l); negative: the model denoises x_w better than x_l
          dpo/ref_margin    mean (r_w - r_l)
          dpo/logit         mean s * ((r_w - r_l) - (m_w - m_l)), the implicit reward margin
          dpo/model_mse, dpo/ref_mse  mean error over both images
          dpo/kl_proxy      mean ((m_w - r_w) + (m_l - r_l)) / 2: how much worse than the reference
                            the model denoises the data. 0 at init; it is a drift indicator, not a
                            KL (the exact per-step KL needs both predictions: `gaussian_kl`).
    """
    for name, t in (("model_err_l", model_err_l), ("ref_err_w", ref_err_w), ("ref_err_l", ref_err_l)):
        if t.shape != model_err_w.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, model_err_w {tuple(model_err_w.shape)}")
    if model_err_w.ndim != 1:
        raise ValueError(f"expected per-sample errors of shape (B,), got {tuple(model_err_w.shape)}")
    scale = dpo_scale(beta, convention)
    model_margin = model_err_w - model_err_l
    ref_margin = (ref_err_w - ref_err_l).detach()
    logits = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l)
    loss = -F.logsigmoid(scale * logits).mean()
    with torch.no_grad():
        acc = implicit_accuracy(logits)
        metrics = {
            "dpo/loss": float(loss),
            "dpo/implicit_acc": float(acc.mean()),
            "dpo/model_margin": float(model_margin.mean()),
            "dpo/ref_margin": float(ref_margin.mean()),
            "dpo/logit": float((scale * logits).mean()),
            "dpo/model_mse": float(((model_err_w + model_err_l) / 2).mean()),
            "dpo/ref_mse": float(((ref_err_w + ref_err_l) / 2).mean()),
            "dpo/kl_proxy": float(((model_err_w - ref_err_w + model_err_l - ref_err_l) / 2).mean()),
        }
    return loss, metrics


def _sigma_like(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor broadcastable to x: a scalar, (B,) per sample, or x's full shape."""
    if not isinstance(sigma, torch.Tensor) and not sigma > 0:
        # Tensors are not checked: that would synchronize the device at every sampling step.
        raise ValueError(f"sigma must be > 0, got {sigma} (a deterministic step has no Gaussian density)")
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 1 and x.ndim > 1 and s.shape[0] == x.shape[0]:
        s = s.view(-1, *([1] * (x.ndim - 1)))
    return s


def gaussian_kl(mu_a: torch.Tensor, mu_b: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mu_a, sigma^2 I) || N(mu_b, sigma^2 I)) per sample, in nats: (B, ...) -> (B,).

    Equal variances make the KL exactly ||mu_a - mu_b||^2 / (2 sigma^2), summed over all
    non-batch dimensions; it is symmetric. sigma: scalar, (B,), or broadcastable to mu.
    """
    s = _sigma_like(sigma, mu_a)
    kl = (mu_a - mu_b).pow(2) / (2 * s.pow(2))
    return kl.sum(dim=tuple(range(1, kl.ndim)))


def gaussian_log_prob(
    x: torch.Tensor, mu: torch.Tensor, sigma: float | torch.Tensor, reduction: LogProbReduction = "sum"
) -> torch.Tensor:
    """log N(x; mu, sigma^2 I) per sample: (B, ...) -> (B,).

    reduction="sum" is the exact log density. "mean" divides it by the number of dimensions,
    as DDPO does (its PPO clip range 1e-4 is calibrated to that scale).
    """
    s = _sigma_like(sigma, x)
    lp = -(x - mu).pow(2) / (2 * s.pow(2)) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, lp.ndim))
    if reduction == "sum":
        return lp.sum(dim=dims)
    if reduction == "mean":
        return lp.mean(dim=dims)
    raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'mean'")


def ppo_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DDPO's clipped surrogate for one denoising step of B trajectories.

    Args:
        log_prob_new: (B,) log pi_theta(x_{t-1} | x_t) under the current parameters (with grad).
        log_prob_old: (B,) the same under the parameters that sampled the trajectory.
        advantages: (B,) normalized advantages (see `normalize_advantages_per_prompt`);
            clamped to [-adv_clip_max, adv_clip_max] when given (DDPO uses 5).
        clip_range: the ratio is clipped to [1 - clip_range, 1 + clip_range].
    Returns:
        loss = mean max(-A * ratio, -A * clip(ratio)), and metrics ppo/loss, ppo/clipfrac
        (fraction with |ratio - 1| > clip_range), ppo/approx_kl (mean (log ratio)^2 / 2, DDPO's
        estimator), ppo/ratio (mean ratio).
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = advantages.detach()
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob_new - log_prob_old.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "ppo/loss": float(loss),
            "ppo/clipfrac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "ppo/approx_kl": float(0.5 * log_ratio.pow(2).mean()),
            "ppo/ratio": float(ratio.mean()),
        }
    return loss, metrics


def normalize_advantages_per_prompt(
    rewards: torch.Tensor,
    prompt_ids: Sequence[Hashable] | torch.Tensor,
    eps: float = 1e-6,
    min_count: int = 2,
) -> torch.Tensor:
    """(reward - mean) / (std + eps) within each prompt's samples: (B,) -> (B,).

    DDPO's per-prompt stat tracking, computed on the given batch (gather all processes' samples
    first for statistics over the global batch). Prompts with fewer than `min_count` samples
    use the batch-wide mean and std instead. std is the population std (ddof 0), as numpy's.
    prompt_ids: one hashable per sample (the prompt string or an integer id).
    """
    r = rewards.detach().float()
    if r.ndim != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(r.shape)}")
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if len(ids) != r.shape[0]:
        raise ValueError(f"{len(ids)} prompt ids for {r.shape[0]} rewards")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(ids):
        groups.setdefault(key, []).append(i)
    mean = torch.full_like(r, r.mean().item())
    std = torch.full_like(r, r.std(unbiased=False).item() if r.numel() > 1 else 0.0)
    for rows in groups.values():
        if len(rows) >= min_count:
            idx = torch.tensor(rows, device=r.device)
            mean[idx] = r[idx].mean()
            std[idx] = r[idx].std(unbiased=False)
    return (r - mean) / (std + eps)


def kl_regularized_reward_loss(
    reward: torch.Tensor, path_kl: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative KL-regularized objective: -(reward - beta * path_kl).mean().

    Args:
        reward: (B,) reward of each final sample x_0 (differentiable for reward-gradient methods).
        path_kl: (B,) sum over sampling steps of the per-step KL to the reference (`gaussian_kl`).
        beta: KL weight; the optimum of E[r] - beta * KL is p_ref * exp(r / beta).
    Returns the loss and metrics kl/loss, kl/reward, kl/reward_std, kl/path_kl, kl/objective.
    """
    if reward.shape != path_kl.shape:
        raise ValueError(f"reward {tuple(reward.shape)} and path_kl {tuple(path_kl.shape)} differ in shape")
    objective = reward - beta * path_kl
    loss = -objective.mean()
    with torch.no_grad():
        metrics = {
            "kl/loss": float(loss),
            "kl/reward": float(reward.float().mean()),
            "kl/reward_std": float(reward.float().std(unbiased=False)) if reward.numel() > 1 else 0.0,
            "kl/path_kl": float(path_kl.float().mean()),
            "kl/objective": float(objective.float().mean()),
        }
    return loss, metrics
