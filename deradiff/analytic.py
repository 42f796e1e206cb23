"""Exact ground truth for realignment: Gaussian-mixture data under the VP diffusion of diffusers.

Data distribution p_ref = sum_k w_k N(mu_k, Sigma_k) in R^d. Under the forward process that
DDPM/DDIM schedulers define, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the marginal is
again a mixture,

    p_t = sum_k w_k N(sqrt(abar_t) mu_k, abar_t Sigma_k + (1 - abar_t) I),

so the ideal noise prediction is closed form: eps*(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t).
:class:`AnalyticDenoiser` wraps it as a model the real diffusers schedulers drive, with abar_t
read from the scheduler's own ``alphas_cumprod`` (float64 throughout).

Tilted target (docs/method.md section 1). With a linear reward r(x) = a.x, completing the square

    N(x; mu, Sigma) exp(a.x / beta) = exp(a.mu / beta + a^T Sigma a / (2 beta^2)) N(x; mu + Sigma a / beta, Sigma)

gives p_ref(x) exp(r(x) / beta) / Z = sum_k w'_k N(mu_k + Sigma_k a / beta, Sigma_k) with
w'_k ∝ w_k exp(a.mu_k / beta + a^T Sigma_k a / (2 beta^2)) and
Z = sum_k w_k exp(a.mu_k / beta + a^T Sigma_k a / (2 beta^2)): again a mixture.

Realignment mixes eps_lam = (1 - lam) eps_ref + lam eps_beta0 and asks whether this is the model
trained at beta0 / lam. One Gaussian: eps* is affine in the data mean and the tilt moves the mean
by lam Sigma a / beta0, so the mixed eps IS eps* of the target, at every t: realignment is exact.
A mixture: the noised tilted marginal is p_t^beta ∝ exp(g_t.x / beta) sum_k w_k exp(h_k(t) / beta)
N_k,t(x) (equal Sigma_k; h_k(t) = a.mu_k - abar_t mu_k^T C_t^-1 Sigma a, C_t = abar_t Sigma +
(1 - abar_t) I), and the geometric mixture p_t^ref^(1-lam) (p_t^beta0)^lam differs from it
whenever the h_k(t) differ: realignment is then an approximation, exact only at lam = 0 and 1.

Two errors are kept apart (docs/method.md section 2): realignment error (realigned vs the exact model
at beta0 / lam, same sampler, same noise) and sampler error (any finite chain vs the target).
For Gaussian data every sampler here is affine in (x_T, step noise), so
:func:`exact_output_moments` propagates mean and covariance through the real scheduler exactly.
For mixtures the lab reports signed gaps, realigned minus exact model, of the component weights
and the mean, estimated from samples drawn with common noise (the same x_T and the same step
noise for both models): :func:`paired_gap` takes the standard error from the per-sample
differences, which is far below either model's own spread, and a gap within 3 SE of zero is
printed as not resolved.

    deradiff lab                          # Gaussian and GMM tables, DDIM (50) and DDPM (1000)
    deradiff lab --scheduler euler --lambdas 0 0.5 1 2 4 --out lab.json
    deradiff lab --family flow            # the same for rectified flow (deradiff/analytic_flow.py)
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from deradiff.errors import UserError
from deradiff.flow import DEFAULT_NOISE_LEVEL
from deradiff.io import write_json_atomic

DTYPE = torch.float64
# deradiff.models.SCHEDULERS names that run the VP (epsilon) diffusion; flow matching is not VP.
LAB_SCHEDULERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp", "unipc", "pndm", "lms")
# ... and those of the rectified-flow family (`deradiff lab --family flow`, deradiff/analytic_flow.py).
FLOW_LAB_SCHEDULERS = ("flow_euler", "flow_sde")
FAMILIES = {
    "vp": "VP diffusion (DDPM/DDIM-type schedulers, epsilon prediction)",
    "flow": "rectified flow (flow-matching schedulers, velocity prediction)",
}
DEFAULT_STEPS = {"ddpm": 1000}  # every other scheduler: 50
# Mixture samples per (scheduler, lambda). At 40k the weakest realigned-minus-exact gap of the
# default problem (DDPM 1000, lambda 2, weights) lay 6.4 SE from zero (3 SE needs ~9k, 5 SE ~24k);
# only the second mean coordinate at lambda 0.5, near zero, stays unresolved.
MIXTURE_SAMPLES = 40_000


# -- Gaussian mixtures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]); weights (K,), means (K, d), covs (K, d, d), float64."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self):
        w, m, c = (torch.as_tensor(v, dtype=DTYPE) for v in (self.weights, self.means, self.covs))
        if w.ndim != 1 or m.ndim != 2 or c.ndim != 3 or m.shape[0] != w.shape[0] or c.shape != (
            w.shape[0], m.shape[1], m.shape[1]
        ):
            raise UserError(
                f"mixture shapes must be weights (K,), means (K, d), covs (K, d, d); got "
                f"{tuple(w.shape)}, {tuple(m.shape)}, {tuple(c.shape)}"
            )
        if (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise UserError(f"mixture weights must be positive and sum to 1, got {w.tolist()}")
        w = w / w.sum()  # float32 inputs sum to 1 only to float32 precision
        if not torch.allclose(c, c.transpose(-1, -2)) or torch.linalg.cholesky_ex(c).info.any():
            raise UserError("mixture covariances must be symmetric positive definite")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)
        # Sigma_k = U_k diag(s_k) U_k^T; the noised covariance abar Sigma_k + (1 - abar) I shares U_k,
        # which makes noised_score two batched matmuls per call (the sampler's hot loop).
        eigvals, eigvecs = torch.linalg.eigh(c)
        object.__setattr__(self, "_eigvals", eigvals)
        object.__setattr__(self, "_eigvecs", eigvecs)

    @classmethod
    def gaussian(cls, mean: Sequence[float] | Tensor, cov: Sequence[Sequence[float]] | Tensor) -> GaussianMixture:
        """A single Gaussian N(mean, cov) as a one-component mixture."""
        return cls(torch.ones(1), torch.as_tensor(mean, dtype=DTYPE)[None], torch.as_tensor(cov, dtype=DTYPE)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """(d,) mean of the mixture."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """(d, d) covariance of the mixture (within plus between components)."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    def noised(self, abar: float) -> GaussianMixture:
        """Marginal of sqrt(abar) x0 + sqrt(1 - abar) eps, x0 ~ self: means * sqrt(abar), covs abar S + (1-abar) I."""
        eye = torch.eye(self.dim, dtype=DTYPE)
        return GaussianMixture(self.weights, math.sqrt(abar) * self.means, abar * self.covs + (1.0 - abar) * eye)

    def _component_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log w_k + log N_k(x), shape (N, K), and the component scores -Sigma_k^-1 (x - mu_k), (N, K, d)."""
        chol = torch.linalg.cholesky(self.covs)  # (K, d, d)
        diff = (x[:, None, :] - self.means[None]).permute(1, 2, 0)  # (K, d, N)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)  # L^-1 (x - mu)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        log_norm = -0.5 * (white**2).sum(1) - 0.5 * log_det[:, None] - 0.5 * self.dim * math.log(2 * math.pi)
        scores = -torch.linalg.solve_triangular(chol.transpose(-1, -2), white, upper=True)  # (K, d, N)
        return (torch.log(self.weights)[:, None] + log_norm).T, scores.permute(2, 0, 1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log density at x (N, d) -> (N,)."""
        return torch.logsumexp(self._component_terms(x.to(DTYPE))[0], dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities p(k | x), (N, K)."""
        return torch.softmax(self._component_terms(x.to(DTYPE))[0], dim=1)

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) at x (N, d) -> (N, d): responsibility-weighted component scores."""
        log_terms, scores = self._component_terms(x.to(DTYPE))
        return torch.einsum("nk,nkd->nd", torch.softmax(log_terms, dim=1), scores)

    def noised_score(self, x: Tensor, abar: float) -> Tensor:
        """grad log p_t at x (N, d) for the marginal at abar: equals self.noised(abar).score(x), faster."""
        ev = abar * self._eigvals + (1.0 - abar)  # (K, d) eigenvalues of the noised covariances
        diff = x.to(DTYPE)[None] - math.sqrt(abar) * self.means[:, None, :]  # (K, N, d)
        y = torch.bmm(diff, self._eigvecs)  # coordinates in each component's eigenbasis
        y_scaled = y / ev[:, None, :]
        log_terms = (
            torch.log(self.weights)[:, None] - 0.5 * (y * y_scaled).sum(-1) - 0.5 * torch.log(ev).sum(-1)[:, None]
        )
        resp = torch.softmax(log_terms, dim=0) if len(self.weights) > 1 else torch.ones_like(log_terms)
        return -torch.bmm(resp[:, :, None] * y_scaled, self._eigvecs.transpose(1, 2)).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n iid draws, (n, d)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self.means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(self.covs)[k], z)

    def _tilt_log_factors(self, a: Tensor, beta: float) -> Tensor:
        c = torch.as_tensor(a, dtype=DTYPE) / beta
        return torch.log(self.weights) + self.means @ c + 0.5 * torch.einsum("i,kij,j->k", c, self.covs, c)

    def tilted(self, a: Sequence[float] | Tensor, beta: float) -> GaussianMixture:
        """p(x) exp(a.x / beta) / Z, exactly (module docstring); beta = inf returns self."""
        if math.isinf(beta):
            return self
        c = torch.as_tensor(a, dtype=DTYPE) / beta
        log_w = self._tilt_log_factors(a, beta)
        return GaussianMixture(torch.softmax(log_w, 0), self.means + torch.einsum("kij,j->ki", self.covs, c), self.covs)

    def log_tilt_normalizer(self, a: Sequence[float] | Tensor, beta: float) -> float:
        """log Z = log E_p[exp(a.x / beta)]."""
        return float(torch.logsumexp(self._tilt_log_factors(torch.as_tensor(a, dtype=DTYPE), beta), 0))


def tilted_target(base: GaussianMixture, a: Sequence[float] | Tensor, beta0: float, lam: float) -> GaussianMixture:
    """The model KL-trained at beta0 / lam: base tilted by exp(lam a.x / beta0); lam = 0 is the base."""
    return base if lam == 0 else base.tilted(a, beta0 / lam)


# -- the closed-form denoiser ---------------------------------------------------------------------


class AnalyticDenoiser(nn.Module):
    """eps*(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t) for GMM data: a model schedulers can drive.

    Call it as a UNet: ``model(sample, timestep) -> eps`` with sample (N, d) and timestep a number
    or tensor. abar_t comes from `alphas_cumprod` (the scheduler's); a fractional t (Euler-type
    schedulers) interpolates sigma = sqrt((1 - abar) / abar) linearly in t, as those schedulers do.
    """

    def __init__(self, data: GaussianMixture, alphas_cumprod: Tensor):
        super().__init__()
        self.data = data
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod).to(DTYPE))
        # What pipelines and RealignedDenoiser read from a denoiser.
        self.config = SimpleNamespace(num_train_timesteps=len(alphas_cumprod), in_channels=data.dim)

    @classmethod
    def for_scheduler(cls, data: GaussianMixture, scheduler) -> AnalyticDenoiser:
        return cls(data, scheduler.alphas_cumprod)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def abar(self, timestep: float) -> float:
        acp = self.alphas_cumprod
        t = float(timestep)
        if t == int(t):
            return float(acp[int(t)])
        sigmas = ((1.0 - acp) / acp).sqrt()
        lo = int(math.floor(t))
        sigma = sigmas[lo] + (t - lo) * (sigmas[lo + 1] - sigmas[lo])
        return float(1.0 / (1.0 + sigma**2))

    def forward(self, sample: Tensor, timestep: float | Tensor, *args, **kwargs) -> Tensor:
        x = sample.to(DTYPE)
        ts = torch.as_tensor(timestep, dtype=DTYPE).flatten()
        if ts.numel() <= 1 or bool((ts == ts[0]).all()):
            return self._eps(x, float(ts[0]) if ts.numel() else 0.0)
        return torch.stack([self._eps(x[i : i + 1], float(t))[0] for i, t in enumerate(ts)])

    def marginal(self, timestep: float) -> GaussianMixture:
        """The noised data distribution p_t at `timestep` (what x_t is drawn from)."""
        return self.data.noised(self.abar(timestep))

    def _eps(self, x: Tensor, t: float) -> Tensor:
        abar = self.abar(t)
        return -math.sqrt(1.0 - abar) * self.data.noised_score(x, abar)


def analytic_model(data: GaussianMixture, scheduler) -> nn.Module:
    """The closed-form model of `data` for `scheduler`'s family: the velocity of
    deradiff.analytic_flow under a flow-matching scheduler, else the VP AnalyticDenoiser."""
    from deradiff.realign import _is_flow_matching

    if _is_flow_matching(scheduler):
        from deradiff.analytic_flow import AnalyticVelocity

        return AnalyticVelocity.for_scheduler(data, scheduler)
    return AnalyticDenoiser.for_scheduler(data, scheduler)


def realign(reference: nn.Module, aligned: nn.Module, lam: float) -> nn.Module:
    """The project's RealignedDenoiser in two-model mode: (1 - lam) * reference + lam * aligned."""
    from deradiff.realign import RealignedDenoiser

    return RealignedDenoiser(aligned, lam=lam, reference=reference, record=False)


# -- driving the real schedulers ------------------------------------------------------------------


def make_scheduler(name: str, **overrides):
    """A diffusers scheduler by deradiff name (LAB_SCHEDULERS) with its default VP schedule.

    DDPM/DDIM get clip_sample=False: clipping x0 to [-1, 1] would make the step nonlinear.
    """
    import diffusers

    from deradiff.models import SCHEDULERS

    if name not in LAB_SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} for the lab; choose from {list(LAB_SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    if name in ("ddim", "ddpm"):
        overrides.setdefault("clip_sample", False)
    return cls(**overrides)


def run_sampler(
    model: nn.Module, scheduler, num_steps: int, x_T: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Denoise x_T (N, d) standard normal draws, scaled by init_noise_sigma, with a fresh copy of
    `scheduler` over `num_steps` steps; step noise comes from `generator`. Returns x_0 (N, d).
    Flow-matching schedulers have neither init_noise_sigma nor scale_model_input: x_T as it is."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    x = x_T.to(DTYPE) * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    # Deterministic multistep schedulers (UniPC, PNDM, LMS) take no generator.
    extra = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        eps = model(scale(x, t), t)
        x = sched.step(eps, t, x, **extra).prev_sample
    return x


def draw_samples(model: nn.Module, scheduler, num_steps: int, n: int, dim: int, seed: int) -> Tensor:
    """n samples (n, d); the same seed gives the same initial and step noise to any model."""
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, dim, generator=gen, dtype=DTYPE)
    return run_sampler(model, scheduler, num_steps, x_T, generator=gen)


@contextmanager
def _scripted_noise(scheduler, noise: Callable[[int, tuple], Tensor]):
    """Make the scheduler's step noise `noise(call_index, shape)` instead of random draws.

    diffusers schedulers draw step noise through `randn_tensor` imported into their module, so
    replacing that name there scripts the noise without touching the step math. Yields a
    one-element list counting the draws.
    """
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    calls = [0]

    def scripted(shape, *args, **kwargs):
        out = noise(calls[0], tuple(shape))
        calls[0] += 1
        return out

    if original is not None:
        module.randn_tensor = scripted
    try:
        yield calls
    finally:
        if original is not None:
            module.randn_tensor = original


def _count_noise_draws(scheduler, num_steps: int, dim: int) -> int:
    """How many times a chain draws step noise (independent of the model: run with eps = 0)."""
    with _scripted_noise(scheduler, lambda m, shape: torch.zeros(shape, dtype=DTYPE)) as calls:
        run_sampler(lambda x, t: torch.zeros_like(x), scheduler, num_steps, torch.zeros(1, dim, dtype=DTYPE))
    return calls[0]


def exact_output_moments(
    model: nn.Module, scheduler, num_steps: int, seed: int = 0, dim: int | None = None, rtol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Exact mean (d,) and covariance (d, d) of the sampler's output, for a model whose eps is
    affine in x_t (Gaussian data, or a lambda-mix of Gaussian models).

    Then the whole chain is affine: x_0 = A x_T + b + sum_m S_m z_m with x_T, z_m ~ N(0, I). One
    batched run reads b (row x_T = 0, no noise), A (rows x_T = e_i) and every S_m (rows with
    z_m = e_i) off the real scheduler, multistep history included; mean = b and
    cov = A A^T + sum_m S_m S_m^T. `dim` defaults to model.config.in_channels. An extra row with
    random x_T and noise checks the affine claim to `rtol` (relative to the largest output) and
    raises ValueError when it fails (non-Gaussian data, clipping).
    """
    d = dim or model.config.in_channels
    n_draws = _count_noise_draws(scheduler, num_steps, d)
    rows = 1 + d + n_draws * d + 1  # mean, x_T basis, noise basis per draw, check row
    gen = torch.Generator().manual_seed(seed)
    check_x = torch.randn(d, generator=gen, dtype=DTYPE)
    check_z = torch.randn(max(n_draws, 1), d, generator=gen, dtype=DTYPE)

    def basis_noise(m: int, shape: tuple) -> Tensor:
        if m >= n_draws or shape != (rows, d):
            raise ValueError(f"scheduler drew unexpected noise (draw {m}, shape {shape}); cannot script it")
        z = torch.zeros(shape, dtype=DTYPE)
        z[1 + d + m * d : 1 + d + (m + 1) * d] = torch.eye(d, dtype=DTYPE)
        z[-1] = check_z[m]
        return z

    x_T = torch.zeros(rows, d, dtype=DTYPE)
    x_T[1 : 1 + d] = torch.eye(d, dtype=DTYPE)
    x_T[-1] = check_x
    with _scripted_noise(scheduler, basis_noise):
        out = run_sampler(model, scheduler, num_steps, x_T)
    b = out[0]
    A = (out[1 : 1 + d] - b).T  # column i = response to e_i
    S = (out[1 + d : -1] - b).reshape(n_draws, d, d).transpose(1, 2)  # (M, d, d)
    predicted = b + A @ check_x + torch.einsum("mij,mj->i", S, check_z[:n_draws])
    scale = out.abs().max().clamp_min(1.0)
    if (predicted - out[-1]).abs().max() > rtol * scale:
        raise ValueError(
            "the sampler is not affine in (x_T, noise) for this model: exact moments need Gaussian "
            "data, an epsilon-linear scheduler and no clipping (clip_sample=False)"
        )
    cov = A @ A.T + torch.einsum("mij,mkj->ik", S, S)
    return b, 0.5 * (cov + cov.T)


# -- error measures --------------------------------------------------------------------------------


def mean_error(mean: Tensor, target_mean: Tensor, target_cov: Tensor) -> float:
    """||mean - target_mean|| in units of the target's RMS spread sqrt(tr(cov) / d)."""
    spread = math.sqrt(float(torch.trace(target_cov)) / target_cov.shape[0])
    return float(torch.linalg.norm(mean - target_mean)) / spread


def cov_error(cov: Tensor, target_cov: Tensor) -> float:
    """Relative Frobenius error ||cov - target_cov||_F / ||target_cov||_F."""
    return float(torch.linalg.norm(cov - target_cov) / torch.linalg.norm(target_cov))


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size sample sets x, y (N, d): the RMS over
    random unit directions of the 1-D W2 distance of the projections (sorted samples)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    dirs = projection_directions(x.shape[1], n_projections, seed)
    return sorted_projection_distance(sorted_projections(x, dirs), sorted_projections(y, dirs))


def projection_directions(dim: int, n_projections: int = 256, seed: int = 0) -> Tensor:
    """(d, P) random unit directions, the same for a given seed."""
    dirs = torch.randn(dim, n_projections, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return dirs / dirs.norm(dim=0, keepdim=True)


def sorted_projections(x: Tensor, dirs: Tensor) -> Tensor:
    """Projections of x (N, d) on dirs (d, P), each direction's sorted, (P, N). Sorted along the
    contiguous axis with numpy: sorting (N, P) along N was 3-5x slower, and dominated the lab."""
    return torch.from_numpy(np.sort((dirs.T @ x.to(DTYPE).T).numpy(), axis=1))


def sorted_projection_distance(px: Tensor, py: Tensor) -> float:
    """Sliced W2 from two sorted_projections results of equal shape (P, N)."""
    return float(((px - py) ** 2).mean().sqrt())


# A gap counts as resolved when it lies more than this many standard errors from zero.
RESOLVE_Z = 3.0


class Gap(NamedTuple):
    """A signed Monte Carlo estimate and its standard error, both (...) tensors of one shape."""

    value: Tensor
    se: Tensor


def mean_with_se(values: Tensor) -> Gap:
    """Mean over the first axis of per-sample values (n, ...) and its standard error
    std / sqrt(n), the std with n - 1 in the denominator; n >= 2."""
    n = values.shape[0]
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 samples, got {n}")
    v = values.to(DTYPE)
    return Gap(v.mean(0), v.std(0, correction=1) / math.sqrt(n))


def paired_gap(a: Tensor, b: Tensor) -> Gap:
    """Signed mean of a - b over paired samples a, b (n, ...) with its standard error.

    Row i of a and of b must come from the same noise (common random numbers). The SE is taken
    from the per-sample differences a_i - b_i, so what the two share cancels: under common noise
    it is far smaller than the SE of either mean, which an unpaired sqrt(se_a^2 + se_b^2) would give.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired_gap needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_with_se(a.to(DTYPE) - b.to(DTYPE))


def gap_status(value: float, se: float, z: float = RESOLVE_Z) -> str:
    """'exact' (identical samples: zero gap, zero SE), 'resolved' (|value| > z SE) or 'not resolved'."""
    if value == 0.0 and se == 0.0:
        return "exact"
    return "resolved" if abs(value) > z * se else "not resolved"


def _spread_timesteps(scheduler, num_steps: int, at_most: int = 100) -> list[float]:
    """At most `at_most` of the sampler's timesteps, evenly spread (eps checks need not visit all)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    ts = sched.timesteps.tolist()
    stride = max(1, math.ceil(len(ts) / at_most))
    return ts[::stride]


def eps_discrepancy(
    model: nn.Module, exact: nn.Module, timesteps: Sequence[float], n: int, seed: int
) -> tuple[float, float]:
    """Difference of eps between `model` and `exact` at n draws x_t ~ p_t of exact's data per
    timestep: (largest difference norm relative to exact's RMS eps norm, RMS per coordinate).
    `exact`: an AnalyticDenoiser or AnalyticVelocity (any model with `marginal(t)`); for the
    latter the outputs compared are velocities."""
    gen = torch.Generator().manual_seed(seed)
    worst, sq, count = 0.0, 0.0, 0
    for t in timesteps:
        x = exact.marginal(float(t)).sample(n, gen)
        e_model, e_exact = model(x, t), exact(x, t)
        diff = (e_model - e_exact).norm(dim=1)
        worst = max(worst, float(diff.max() / e_exact.norm(dim=1).pow(2).mean().sqrt()))
        sq, count = sq + float(diff.pow(2).sum()), count + n
    return worst, math.sqrt(sq / count / exact.data.dim)


@contextmanager
def single_thread():
    """Run torch on one thread inside the block: on these tiny (N, 2) tensors intra-op threads only
    add start-up cost, and on a busy machine their barriers made the lab 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the lab ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabProblem:
    """The analytic cases: base data distributions and the linear reward r(x) = reward . x."""

    gaussian: GaussianMixture
    mixture: GaussianMixture
    reward: Tensor


def default_problem() -> LabProblem:
    """A correlated 2-D Gaussian and a two-component 2-D mixture (unequal covariances) whose
    weights the reward tilts strongly, so the mixture's realignment error is visible."""
    gaussian = GaussianMixture.gaussian([0.5, -0.25], [[0.25, 0.08], [0.08, 0.16]])
    mixture = GaussianMixture(
        torch.tensor([0.7, 0.3], dtype=DTYPE),
        torch.tensor([[-0.8, 0.3], [0.8, -0.3]], dtype=DTYPE),
        torch.tensor([[[0.10, 0.02], [0.02, 0.08]], [[0.15, -0.05], [-0.05, 0.08]]], dtype=DTYPE),
    )
    return LabProblem(gaussian, mixture, torch.tensor([1.0, -0.5], dtype=DTYPE))


RealignFn = Callable[[nn.Module, nn.Module, float], nn.Module]


def _exact_and_realigned(base: GaussianMixture, reward: Tensor, beta0: float, lam: float, scheduler,
                         realign_fn: RealignFn) -> tuple[GaussianMixture, nn.Module, nn.Module]:
    """The target at beta0 / lam, its exact denoiser, and the base + beta0-model realigned at lam."""
    target = tilted_target(base, reward, beta0, lam)
    exact = analytic_model(target, scheduler)
    realigned = realign_fn(
        analytic_model(base, scheduler), analytic_model(tilted_target(base, reward, beta0, 1.0), scheduler), lam
    )
    return target, exact, realigned


@single_thread()
def gaussian_case(base: GaussianMixture, reward: Tensor, beta0: float, lam: float, scheduler, num_steps: int,
                  n_samples: int = 64, seed: int = 0, realign_fn: RealignFn = realign, affine_rtol: float = 1e-6) -> dict:
    """Errors of realignment at lam on Gaussian data, with exact sampler-output moments.

    realign_*: realigned vs exact model at beta0 / lam through the same sampler (should be ~0);
    sampler_*: exact model's output vs the tilted target (finite-step error, same for both);
    eps_max_rel: largest eps difference at x_t ~ p_t; traj_max: largest sample difference under
    the same noise, in units of the target's spread. affine_rtol: exact_output_moments' check.
    """
    if base.weights.numel() != 1:
        raise ValueError("gaussian_case needs a single Gaussian (one component)")
    target, exact, realigned = _exact_and_realigned(base, reward, beta0, lam, scheduler, realign_fn)
    m_r, c_r = exact_output_moments(realigned, scheduler, num_steps, seed, base.dim, affine_rtol)
    m_e, c_e = exact_output_moments(exact, scheduler, num_steps, seed, base.dim, affine_rtol)
    t_mean, t_cov = target.mean(), target.cov()
    eps_max, _ = eps_discrepancy(realigned, exact, _spread_timesteps(scheduler, num_steps), 64, seed)
    x_r = draw_samples(realigned, scheduler, num_steps, n_samples, base.dim, seed)
    x_e = draw_samples(exact, scheduler, num_steps, n_samples, base.dim, seed)
    spread = math.sqrt(float(torch.trace(t_cov)) / base.dim)
    return {
        "lambda": lam,
        "beta": beta0 / lam if lam else math.inf,
        "realign_mean_err": mean_error(m_r, m_e, c_e),
        "realign_cov_err": cov_error(c_r, c_e),
        "eps_max_rel": eps_max,
        "traj_max": float((x_r - x_e).abs().max()) / spread,
        "sampler_mean_err": mean_error(m_e, t_mean, t_cov),
        "sampler_cov_err": cov_error(c_e, t_cov),
        "realigned_vs_target_mean_err": mean_error(m_r, t_mean, t_cov),
        "realigned_vs_target_cov_err": cov_error(c_r, t_cov),
    }


@single_thread()
def mixture_case(base: GaussianMixture, reward: Tensor, beta0: float, lam: float, scheduler, num_steps: int,
                 n_samples: int = MIXTURE_SAMPLES, seed: int = 0, realign_fn: RealignFn = realign) -> dict:
    """Errors of realignment at lam on mixture data: Monte Carlo with common noise.

    The realigned (r) and the exact model at beta0 / lam (e) are sampled from the same x_T and
    step noise. Weights are the target posterior's soft assignment averaged over samples, so the
    exact model with a perfect sampler gives the target weights (t). Keys:

    - weight_gap, weight_gap_se (K,): signed E_r[p_t(k | x)] - E_e[p_t(k | x)], paired SE;
    - mean_gap, mean_gap_se (d,): signed E_r[x] - E_e[x], paired SE, in target spreads;
    - exact_weight_err, exact_mean_err (+ _se): exact model minus target (the sampler's own error,
      the same for a retrained model), unpaired SE;
    - eps_rms: RMS eps difference per coordinate, r vs e, at x_t ~ p_t (up to 100 of the sampler's
      timesteps): the cause of every gap; traj_rms: RMS sample difference, r vs e;
    - sw_*: sliced W2 between r, e and iid target samples (sw_e_t: sampler + Monte Carlo floor).

    Distances are in units of the target's RMS spread sqrt(tr(cov) / d).
    """
    target, exact, realigned = _exact_and_realigned(base, reward, beta0, lam, scheduler, realign_fn)
    _, eps_rms = eps_discrepancy(realigned, exact, _spread_timesteps(scheduler, num_steps), 256, seed)
    # The same seed gives both models the same x_T and step noise: the gaps below are paired.
    x_r = draw_samples(realigned, scheduler, num_steps, n_samples, base.dim, seed)
    x_e = draw_samples(exact, scheduler, num_steps, n_samples, base.dim, seed)
    x_t = target.sample(n_samples, torch.Generator().manual_seed(seed + 1))
    spread = math.sqrt(float(torch.trace(target.cov())) / base.dim)
    resp_e = target.responsibilities(x_e)
    weight_gap = paired_gap(target.responsibilities(x_r), resp_e)
    mean_gap = paired_gap(x_r / spread, x_e / spread)
    exact_weight = mean_with_se(resp_e - target.weights)
    exact_mean = mean_with_se((x_e - target.mean()) / spread)
    dirs = projection_directions(base.dim, seed=seed)
    p_r, p_e, p_t = (sorted_projections(x, dirs) for x in (x_r, x_e, x_t))
    return {
        "lambda": lam,
        "beta": beta0 / lam if lam else math.inf,
        "samples": n_samples,
        "target_weights": target.weights.tolist(),
        "eps_rms": eps_rms,
        "traj_rms": float((x_r - x_e).pow(2).sum(1).mean().sqrt()) / spread,
        "weight_gap": weight_gap.value.tolist(), "weight_gap_se": weight_gap.se.tolist(),
        "mean_gap": mean_gap.value.tolist(), "mean_gap_se": mean_gap.se.tolist(),
        "exact_weight_err": exact_weight.value.tolist(), "exact_weight_err_se": exact_weight.se.tolist(),
        "exact_mean_err": exact_mean.value.tolist(), "exact_mean_err_se": exact_mean.se.tolist(),
        "sw_r_e": sorted_projection_distance(p_r, p_e) / spread,
        "sw_r_t": sorted_projection_distance(p_r, p_t) / spread,
        "sw_e_t": sorted_projection_distance(p_e, p_t) / spread,
    }


GAUSSIAN_COLUMNS = [
    ("lambda", "lam", "{:g}"), ("beta", "beta", "{:.3g}"),
    ("realign_mean_err", "realign mean", "{:.1e}"), ("realign_cov_err", "realign cov", "{:.1e}"),
    ("eps_max_rel", "eps max", "{:.1e}"), ("traj_max", "traj max", "{:.1e}"),
    ("sampler_mean_err", "sampler mean", "{:.1e}"), ("sampler_cov_err", "sampler cov", "{:.1e}"),
]
MIXTURE_COLUMNS = [
    ("lambda", "lam", "{:g}"), ("beta", "beta", "{:.3g}"),
    ("target_weights", "target w", None), ("eps_rms", "eps rms", "{:.1e}"), ("traj_rms", "traj rms", "{:.3f}"),
    ("sw_r_e", "SW r-e", "{:.3f}"), ("sw_r_t", "SW r-t", "{:.3f}"), ("sw_e_t", "SW e-t", "{:.3f}"),
]
# Signed gap columns: (row key, header label, entries left out at the end); the SE is under
# key + "_se". Weight gaps sum to zero, so the last component's is left out (minus the others').
REALIGN_GAPS = [("weight_gap", "w", 1), ("mean_gap", "mean", 0)]
EXACT_ERRORS = [("exact_weight_err", "w", 1), ("exact_mean_err", "mean", 0)]
# The single-Gaussian bar: realigned and exact model moments must agree to this (relative).
GAUSSIAN_BAR = 1e-4


def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """A plain-text table of `rows` with (key, header, fmt) columns; fmt is a format string, None
    (a list of numbers, joined by '/') or a callable(row) -> str."""
    def cell(row, key, fmt):
        if callable(fmt):
            return fmt(row)
        value = row[key]
        if fmt is None:
            return "/".join(f"{v:.2f}" for v in value)
        return fmt.format(value)

    body = [[header for _, header, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _gap_cell(value: float, se: float) -> str:
    status = gap_status(value, se)
    if status == "exact":
        return "0 (exact)"
    return f"{value:+.4f} ± {se:.4f}" + ("" if status == "resolved" else " *")


def _shown(row: dict, key: str, left_out: int) -> range:
    return range(max(len(row[key]) - left_out, 1))


def gap_columns(rows: list[dict], gaps: list[tuple[str, str, int]], suffix: str) -> list[tuple]:
    """format_table columns: 'lam', then one 'value ± SE' column per shown entry of each gap key."""
    columns = [("lambda", "lam", "{:g}")]
    for key, label, left_out in gaps:
        for i in _shown(rows[0], key, left_out):
            columns.append((key, f"{label}[{i}] {suffix}",
                            lambda r, key=key, i=i: _gap_cell(r[key][i], r[key + "_se"][i])))
    return columns


def unresolved(rows: list[dict], gaps: list[tuple[str, str, int]]) -> tuple[list[str], int]:
    """'lam L label[i]' for every shown gap entry within RESOLVE_Z SE of zero (and not exactly
    zero), and how many entries were shown in all."""
    shown = [(r, key, label, i) for r in rows for key, label, left_out in gaps for i in _shown(r, key, left_out)]
    missed = [f"lam {r['lambda']:g} {label}[{i}]" for r, key, label, i in shown
              if gap_status(r[key][i], r[key + "_se"][i]) == "not resolved"]
    return missed, len(shown)


def run_lab(schedulers: Sequence[str], lambdas: Sequence[float], beta0: float, steps: int | None,
            n_samples: int, seed: int, problem: LabProblem | None = None, progress: bool = False) -> dict:
    """Every (scheduler, case, lambda) row; a JSON-ready dict."""
    from tqdm import tqdm

    problem = problem or default_problem()
    result = {"config": lab_config(schedulers, lambdas, beta0, n_samples, seed, problem), "gaussian": [], "mixture": []}
    jobs = [(s, case, lam) for s in schedulers for case in ("gaussian", "mixture") for lam in lambdas]
    for name, case, lam in tqdm(jobs, desc="lab", disable=not progress, leave=False):
        scheduler = make_scheduler(name)
        n_steps = steps or DEFAULT_STEPS.get(name, 50)
        if case == "gaussian":
            row = gaussian_case(problem.gaussian, problem.reward, beta0, lam, scheduler, n_steps, seed=seed)
        else:
            row = mixture_case(problem.mixture, problem.reward, beta0, lam, scheduler, n_steps, n_samples, seed)
        result[case].append({"scheduler": name, "steps": n_steps, **row})
    return result


def lab_config(schedulers: Sequence[str], lambdas: Sequence[float], beta0: float, n_samples: int, seed: int,
               problem: LabProblem) -> dict:
    """The "config" entry of a lab result: the run's settings and the problem's distributions."""
    return {
        "schedulers": list(schedulers), "lambdas": list(lambdas), "beta0": beta0, "samples": n_samples,
        "seed": seed, "resolve_z": RESOLVE_Z, "reward": problem.reward.tolist(),
        "gaussian": {"mean": problem.gaussian.means[0].tolist(), "cov": problem.gaussian.covs[0].tolist()},
        "mixture": {"weights": problem.mixture.weights.tolist(), "means": problem.mixture.means.tolist(),
                    "covs": problem.mixture.covs.tolist()},
    }


def render_lab(result: dict) -> str:
    """The lab's tables per scheduler (Gaussian; mixture; mixture gaps r-e and e-t) with a legend."""
    parts = []
    cfg = result["config"]
    for name in cfg["schedulers"]:
        g = [r for r in result["gaussian"] if r["scheduler"] == name]
        m = [r for r in result["mixture"] if r["scheduler"] == name]
        steps = g[0]["steps"] if g else m[0]["steps"]
        parts.append(
            f"== {name}, {steps} steps: single Gaussian, exact output moments (realigned vs exact model "
            f"at beta0/lam, and exact model vs tilted target) ==\n" + format_table(g, GAUSSIAN_COLUMNS)
        )
        parts.append(_render_mixture(name, steps, m, cfg["samples"]))
    parts.append(_gaussian_verdict(result["gaussian"]))
    parts.append(
        "Single Gaussian: what remains beside realignment is the sampler's finite-step error, the same "
        "for the retrained model.\nMixture: realignment is an approximation, exact only at lam = 0 and 1; "
        "its error is the eps/traj columns and the r-e gaps. w[k] = the target posterior's soft weight "
        "of component k averaged over samples (the last component's gap is minus the sum of the "
        "others'); mean and SW in units of the target's RMS spread; "
        f"± is one standard error; * = not resolved (|gap| <= {RESOLVE_Z:g} SE): its size and sign are "
        "unknown at this sample size (raise --samples)."
    )
    return "\n\n".join(parts)


def _render_mixture(name: str, steps: int, rows: list[dict], samples: int, columns: list[tuple] = MIXTURE_COLUMNS) -> str:
    head = f"== {name}, {steps} steps: {len(rows[0]['target_weights'])}-component mixture, {samples} samples"
    lines = [
        f"{head}, common noise (r = realigned, e = exact model at beta0/lam, t = target) ==",
        format_table(rows, columns), "",
        f"{head}: realigned minus exact model, same x_T and step noise, ± paired SE ==",
        format_table(rows, gap_columns(rows, REALIGN_GAPS, "r-e")), "",
        f"{head}: exact model minus target (the sampler's own error), ± SE ==",
        format_table(rows, gap_columns(rows, EXACT_ERRORS, "e-t")),
    ]
    for label, gaps in (("r-e", REALIGN_GAPS), ("e-t", EXACT_ERRORS)):
        missed, total = unresolved(rows, gaps)
        if missed:
            lines.append(f"not resolved at {samples} samples ({label}, {len(missed)} of {total}): "
                         + ", ".join(missed))
    return "\n".join(lines)


def _gaussian_verdict(rows: list[dict]) -> str:
    if not rows:
        return "Single Gaussian: no rows."
    worst = max(max(r["realign_mean_err"], r["realign_cov_err"]) for r in rows)
    verdict = "realignment exact" if worst <= GAUSSIAN_BAR else "ABOVE THE BAR: realignment is NOT exact here"
    return (f"Single Gaussian, realigned vs exact model (same sampler and noise), largest mean/cov error "
            f"{worst:.1e} (bar {GAUSSIAN_BAR:g}): {verdict}.")


# -- CLI --------------------------------------------------------------------------------------------


DEFAULT_LAB_SCHEDULERS = {"vp": ["ddim", "ddpm"], "flow": list(FLOW_LAB_SCHEDULERS)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=list(FAMILIES), default="vp",
                   help="vp: " + FAMILIES["vp"] + "; flow: " + FAMILIES["flow"] + ", x_s = (1 - s) x0 + s eps, "
                   "v = eps - x0, the same Gaussian and mixture problems (deradiff/analytic_flow.py)")
    p.add_argument("--scheduler", nargs="+", default=None, choices=LAB_SCHEDULERS + FLOW_LAB_SCHEDULERS, metavar="NAME",
                   help=f"schedulers to run; vp: from {list(LAB_SCHEDULERS)} (default ddim ddpm); flow: "
                   f"{list(FLOW_LAB_SCHEDULERS)} (diffusers' Euler ODE; deradiff.flow's SDE, see --noise-level; "
                   "default both)")
    p.add_argument("--noise-level", type=float, default=DEFAULT_NOISE_LEVEL,
                   help="flow_sde only: the SDE's noise scale (0 = the Euler ODE; sqrt(2) = memoryless)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps for every scheduler; unset: 1000 for ddpm, 50 for the others")
    p.add_argument("--samples", type=int, default=MIXTURE_SAMPLES,
                   help="Monte Carlo samples per mixture row (realigned and exact model share their noise)")
    p.add_argument("--beta", type=float, default=1.0, help="KL strength beta0 of the 'aligned' (tilted) model")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0],
                   help="realignment strengths; lambda emulates beta0 / lambda (0 = reference)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared sampling noise")
    p.add_argument("--out", default=None, help="write the table as JSON to this path")


def _check_args(args: argparse.Namespace) -> None:
    if not math.isfinite(args.beta) or args.beta <= 0:
        raise UserError(f"--beta must be a positive finite number, got {args.beta}")
    bad = [v for v in args.lambdas if not math.isfinite(v)]
    if bad:
        raise UserError(f"--lambdas must be finite numbers, got {bad}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.samples < 2:
        raise UserError(f"--samples must be at least 2, got {args.samples}")
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file path such as {args.out}/lab.json")
    allowed = FLOW_LAB_SCHEDULERS if args.family == "flow" else LAB_SCHEDULERS
    wrong = [name for name in args.scheduler or [] if name not in allowed]
    if wrong:
        raise UserError(f"--scheduler {' '.join(wrong)} is not of --family {args.family}; choose from {list(allowed)}"
                        + ("" if args.family == "flow" else " or pass --family flow"))
    if not math.isfinite(args.noise_level) or args.noise_level < 0:
        raise UserError(f"--noise-level must be a finite number >= 0, got {args.noise_level}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    schedulers = args.scheduler or DEFAULT_LAB_SCHEDULERS[args.family]
    start = time.perf_counter()
    if args.family == "flow":
        from deradiff.analytic_flow import render_flow_lab, run_flow_lab

        result = run_flow_lab(schedulers, args.lambdas, args.beta, args.steps, args.samples, args.seed,
                              noise_level=args.noise_level, progress=True)
        text = render_flow_lab(result)
    else:
        result = run_lab(schedulers, args.lambdas, args.beta, args.steps, args.samples, args.seed, progress=True)
        text = render_lab(result)
    result = {"family": args.family, **result, "seconds": round(time.perf_counter() - start, 2)}
    print(f"deradiff lab, family {args.family}: {FAMILIES[args.family]}\n")
    print(text)
    print(f"\n({result['seconds']} s)")
    if args.out:
        # inf (lambda = 0 means beta = inf) is written as null to keep the file valid JSON.
        write_json_atomic(args.out, _finite(result))
        print(f"wrote {args.out}")
    return 0


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
