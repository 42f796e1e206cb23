"""Exact ground truth for realignment under rectified flow: the flow-matching twin of analytic.py.

Diffusers' flow-matching convention (SD3, FLUX; deradiff/flow.py): x_s = (1 - s) x0 + s eps with
s = sigma in [0, 1], eps ~ N(0, I); the model predicts the velocity v = eps - x0, and
FlowMatchEulerDiscreteScheduler hands it t = s * num_train_timesteps (1000 s).

Data p = sum_k w_k N(mu_k, S_k) (analytic.GaussianMixture). Given component k, x_s is Gaussian,
x_s | k ~ N((1 - s) mu_k, C_k) with C_k = (1 - s)^2 S_k + s^2 I, so p_s is again a mixture
(:func:`flow_marginal`). The ideal velocity is the regression target's conditional mean
v*(x, s) = E[eps - x0 | x_s = x]. From eps = (x_s - (1 - s) x0) / s, eps - x0 = (x_s - x0) / s, so

    v*(x, s) = (x - E[x0 | x_s = x]) / s,   E[x0 | x, k] = mu_k + (1 - s) S_k C_k^-1 (x - (1 - s) mu_k).

With I - (1 - s) S_k C_k^-1 = s (s I - (1 - s) S_k) C_k^-1 the 1/s cancels:

    v*(x, s) = sum_k r_k(x) [(s I - (1 - s) S_k) C_k^-1 (x - (1 - s) mu_k) - mu_k],   r_k(x) = p(k | x_s = x),

finite on all of [0, 1] (s = 1: C_k = I, v* = x - E[x0]; s = 0: v* = -x). Equivalently (Tweedie,
s < 1) v* = -(x + s grad log p_s(x)) / (1 - s). :class:`AnalyticVelocity` is this field as a model
the real flow schedulers drive, in float64.

Realignment. One Gaussian: v* is affine in the data mean, v* = B_s x - ((1 - s) B_s + I) mu with
B_s = (s I - (1 - s) S) C^-1 fixed by S and s, and the linear reward's tilt moves the mean by
S a / beta (analytic.py), so (1 - lam) v*_ref + lam v*_beta0 IS v* of the target at beta0 / lam at
every (x, s): exact for any sampler. Mixtures: the tilt reweights the components in an
s-dependent way, as for VP, and realignment is an approximation, exact only at lam = 0 and 1.

What the lab compares (single Gaussian; every chain here is affine in its noise):
- realign_*: realigned vs the exact model at beta0 / lam through the same scheduler (its own
  `step`), with output moments read exactly off the chain (analytic.exact_output_moments): the
  sampler's finite-step error is common to both and cancels, what remains is realignment's.
- sampler_*: the exact model vs the tilted target at the same steps (the sampler's own error,
  the same for a retrained model; Euler's covariance error is ~3 / steps).
- limit_*: realigned vs the tilted target itself as steps -> infinity. Moments are propagated
  in float64 through the scheduler's own step x' = a x + c v + std z (a, c, std from
  FlowMatchSDEScheduler.coefficients_at; a = 1, c = ds, std = 0 for the Euler ODE) with
  v = A x + b read off the model, mean M m + c b and covariance M P M^T + std^2 I (M = a I + c A),
  at S and 2S steps, then Richardson-extrapolated (Euler's error is C h + O(h^2) in the grid step
  h ~ 1 / (S - 1)); limit_sampler_* is the same for the exact model. No Monte Carlo and no
  float32 rounding enter (the diffusers step rounds x to float32: realign_* reads the real chain
  at the lab's steps, limit_* does not). Euler ODE: ~2e-5 at S = 400. The flow SDE below noise
  level ~1.2 converges slower than 1 / S (its g = noise_level sqrt(s / (1 - s)) is singular at
  s = 1): there the extrapolated value is the sampler's remaining error, equal for both models.
Mixtures: analytic.mixture_case, signed gaps (realigned minus exact model, common noise) of the
component weights and the mean with paired standard errors.

    deradiff lab --family flow                                  # flow_euler and flow_sde, 50 steps
    deradiff lab --family flow --scheduler flow_sde --noise-level 1.4142 --out flow.json
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from deradiff.analytic import (
    DTYPE,
    FLOW_LAB_SCHEDULERS,
    GAUSSIAN_BAR,
    GAUSSIAN_COLUMNS,
    MIXTURE_COLUMNS,
    MIXTURE_SAMPLES,
    RESOLVE_Z,
    GaussianMixture,
    LabProblem,
    RealignFn,
    _exact_and_realigned,
    _gaussian_verdict,
    _render_mixture,
    cov_error,
    default_problem,
    format_table,
    gaussian_case,
    lab_config,
    mean_error,
    mixture_case,
    realign,
    single_thread,
)
from deradiff.errors import UserError
from deradiff.flow import DEFAULT_NOISE_LEVEL

DEFAULT_STEPS = 50
# Steps S of the continuum check (S and 2S, extrapolated): the Euler ODE's is 1.8e-5 at 400.
LIMIT_STEPS = 400
# Diffusers' flow steps round x to float32: exact_output_moments' affine check gets this much
# relative slack per step (measured residuals: <1e-5 at 200 steps, <1e-4 at 1000).
FLOAT32_RTOL_PER_STEP = 2e-7


def flow_marginal(data: GaussianMixture, s: float) -> GaussianMixture:
    """Law of x_s = (1 - s) x0 + s eps, x0 ~ data: means (1 - s) mu_k, covs (1 - s)^2 S_k + s^2 I."""
    eye = torch.eye(data.dim, dtype=DTYPE)
    return GaussianMixture(data.weights, (1.0 - s) * data.means, (1.0 - s) ** 2 * data.covs + s**2 * eye)


class AnalyticVelocity(nn.Module):
    """v*(x_s, s) = E[eps - x0 | x_s] for Gaussian-mixture data (module docstring): a model flow
    schedulers can drive.

    Call it as a flow transformer: ``model(sample, timestep) -> v`` with sample (N, d) and timestep
    a number or tensor on the scheduler's axis, s = timestep / num_train_timesteps (SD3's
    convention: FlowMatchEulerDiscreteScheduler's timesteps are sigma * num_train_timesteps); a
    (N,) timestep is per row. Output (N, d), float64.
    """

    def __init__(self, data: GaussianMixture, num_train_timesteps: int = 1000):
        super().__init__()
        self.data = data
        # What pipelines and RealignedDenoiser read from a denoiser (device comes from the buffer).
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps, in_channels=data.dim)
        self.register_buffer("_anchor", torch.zeros((), dtype=DTYPE), persistent=False)
        # C_k = (1 - s)^2 S_k + s^2 I shares S_k's eigenvectors: two batched matmuls per call.
        self._eigvals, self._eigvecs = torch.linalg.eigh(data.covs)

    @classmethod
    def for_scheduler(cls, data: GaussianMixture, scheduler) -> AnalyticVelocity:
        return cls(data, scheduler.config.num_train_timesteps)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def sigma(self, timestep: float) -> float:
        """s in [0, 1] of a timestep on the scheduler's axis."""
        return float(timestep) / self.config.num_train_timesteps

    def marginal(self, timestep: float) -> GaussianMixture:
        """The law p_s of x_s at `timestep` (what analytic.eps_discrepancy draws x_s from)."""
        return flow_marginal(self.data, self.sigma(timestep))

    def forward(self, sample: Tensor, timestep: float | Tensor, *args, **kwargs) -> Tensor:
        x = sample.to(DTYPE)
        ts = torch.as_tensor(timestep, dtype=DTYPE).flatten()
        if ts.numel() <= 1 or bool((ts == ts[0]).all()):
            return self.velocity(x, self.sigma(ts[0]) if ts.numel() else 0.0)
        return torch.stack([self.velocity(x[i : i + 1], self.sigma(t))[0] for i, t in enumerate(ts)])

    def velocity(self, x: Tensor, s: float) -> Tensor:
        """v*(x, s) for x (N, d) at s in [0, 1] -> (N, d), in each component's eigenbasis."""
        lam, vecs, mu = self._eigvals, self._eigvecs, self.data.means
        ev = (1.0 - s) ** 2 * lam + s**2  # (K, d) eigenvalues of C_k
        y = torch.bmm(x.to(DTYPE)[None] - (1.0 - s) * mu[:, None, :], vecs)  # (K, N, d): x - (1 - s) mu_k
        y_scaled = y / ev[:, None, :]  # C_k^-1 (x - (1 - s) mu_k), eigen-coordinates
        log_terms = (
            torch.log(self.data.weights)[:, None] - 0.5 * (y * y_scaled).sum(-1) - 0.5 * torch.log(ev).sum(-1)[:, None]
        )
        resp = torch.softmax(log_terms, dim=0)  # (K, N): r_k(x)
        v_k = torch.bmm(y_scaled * (s - (1.0 - s) * lam)[:, None, :], vecs.transpose(1, 2)) - mu[:, None, :]
        return (resp[:, :, None] * v_k).sum(0)

    def posterior_mean(self, x: Tensor, s: float) -> Tensor:
        """E[x0 | x_s = x] = x - s v*(x, s), (N, d)."""
        return x.to(DTYPE) - s * self.velocity(x, s)


# -- schedulers and exact moments --------------------------------------------------------------------


def make_flow_scheduler(name: str, noise_level: float = DEFAULT_NOISE_LEVEL, **overrides):
    """A flow-matching scheduler by deradiff name: "flow_euler" (diffusers' Euler ODE) or
    "flow_sde" (deradiff.flow.FlowMatchSDEScheduler at `noise_level`); default config otherwise
    (shift 1: sigmas evenly spaced from 1 to 1 / num_train_timesteps, then 0)."""
    from deradiff.models import scheduler_class

    if name not in FLOW_LAB_SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} for the flow lab; choose from {list(FLOW_LAB_SCHEDULERS)}")
    if name == "flow_sde":
        overrides["noise_level"] = noise_level
    return scheduler_class(name)(**overrides)


def _step_coefficients(scheduler, num_steps: int) -> list:
    """StepCoefficients (a, c, std) of every step of `scheduler` at num_steps, computed by
    FlowMatchSDEScheduler from the scheduler's own sigmas (noise level 0 for the Euler ODE)."""
    from deradiff.flow import FlowMatchSDEScheduler

    config = dict(scheduler.config)
    config["noise_level"] = config.get("noise_level", 0.0)
    sched = FlowMatchSDEScheduler.from_config(config)
    sched.set_timesteps(num_steps)
    return [(t, sched.coefficients_at(i)) for i, t in enumerate(sched.timesteps.tolist())]


def propagate_moments(model: nn.Module, scheduler, num_steps: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact output mean (d,) and covariance (d, d) of `scheduler`'s chain from x_T ~ N(0, I), in
    float64, for a model whose velocity is affine in x (Gaussian data, or a lambda-mix of such).

    Per step v = A x + b is read off the model at x = 0 and the unit vectors, and the moments go
    through x' = a x + c v + std z (module docstring). Raises ValueError when a random check row
    shows the model is not affine.
    """
    d = dim or model.config.in_channels
    eye = torch.eye(d, dtype=DTYPE)
    check = torch.randn(1, d, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    rows = torch.cat([torch.zeros(1, d, dtype=DTYPE), eye, check])
    mean, cov = torch.zeros(d, dtype=DTYPE), eye.clone()
    for t, k in _step_coefficients(scheduler, num_steps):
        out = model(rows, t).to(DTYPE)
        b, A = out[0], (out[1 : 1 + d] - out[0]).T
        if (out[-1] - (A @ check[0] + b)).abs().max() > 1e-9 * out.abs().max().clamp_min(1.0):
            raise ValueError("the model's velocity is not affine in x (non-Gaussian data): no exact moments")
        M = k.a * eye + k.c * A
        mean = M @ mean + k.c * b
        cov = M @ cov @ M.T + k.std**2 * eye
    return mean, 0.5 * (cov + cov.T)


def limit_moments(model: nn.Module, scheduler, num_steps: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Output mean and covariance extrapolated to infinitely many steps: propagate_moments at
    num_steps (S) and 2S, Richardson for an error C h, h ~ 1 / (S - 1): X_2S + (S - 1) / S (X_2S - X_S)."""
    (m1, c1), (m2, c2) = (propagate_moments(model, scheduler, n, dim) for n in (num_steps, 2 * num_steps))
    w = (num_steps - 1) / num_steps
    return m2 + w * (m2 - m1), c2 + w * (c2 - c1)


# -- the cases ---------------------------------------------------------------------------------------


@single_thread()
def flow_gaussian_case(base: GaussianMixture, reward: Tensor, beta0: float, lam: float, scheduler, num_steps: int,
                       limit_steps: int | None = None, n_samples: int = 64, seed: int = 0,
                       realign_fn: RealignFn = realign) -> dict:
    """analytic.gaussian_case under a flow scheduler (eps_max_rel is v_max_rel: largest velocity
    difference, realigned vs exact model, at x_s ~ p_s), plus the continuum check (module
    docstring): limit_mean_err, limit_cov_err (realigned vs tilted target) and limit_sampler_*
    (exact model vs target), both at limit_steps (default LIMIT_STEPS) and twice, extrapolated."""
    row = gaussian_case(base, reward, beta0, lam, scheduler, num_steps, n_samples, seed, realign_fn,
                        affine_rtol=max(1e-6, FLOAT32_RTOL_PER_STEP * num_steps))
    row["v_max_rel"] = row.pop("eps_max_rel")
    target, exact, realigned = _exact_and_realigned(base, reward, beta0, lam, scheduler, realign_fn)
    t_mean, t_cov = target.mean(), target.cov()
    for key, model in (("limit", realigned), ("limit_sampler", exact)):
        mean, cov = limit_moments(model, scheduler, limit_steps or LIMIT_STEPS, base.dim)
        row[f"{key}_mean_err"], row[f"{key}_cov_err"] = mean_error(mean, t_mean, t_cov), cov_error(cov, t_cov)
    return row


def flow_mixture_case(base: GaussianMixture, reward: Tensor, beta0: float, lam: float, scheduler, num_steps: int,
                      n_samples: int = MIXTURE_SAMPLES, seed: int = 0, realign_fn: RealignFn = realign) -> dict:
    """analytic.mixture_case under a flow scheduler; its eps_rms is v_rms (RMS velocity difference
    per coordinate, realigned vs exact model, at x_s ~ p_s)."""
    row = mixture_case(base, reward, beta0, lam, scheduler, num_steps, n_samples, seed, realign_fn)
    row["v_rms"] = row.pop("eps_rms")
    return row


def run_flow_lab(schedulers: Sequence[str], lambdas: Sequence[float], beta0: float, steps: int | None,
                 n_samples: int, seed: int, noise_level: float = DEFAULT_NOISE_LEVEL, limit_steps: int | None = None,
                 problem: LabProblem | None = None, progress: bool = False) -> dict:
    """Every (scheduler, case, lambda) row of the flow family; a JSON-ready dict like analytic.run_lab's,
    with "family": "flow" and the SDE's noise level (rows of flow_euler carry noise_level 0)."""
    from tqdm import tqdm

    problem = problem or default_problem()
    limit_steps = limit_steps or LIMIT_STEPS
    config = {**lab_config(schedulers, lambdas, beta0, n_samples, seed, problem),
              "noise_level": noise_level, "limit_steps": limit_steps}
    result = {"family": "flow", "config": config, "gaussian": [], "mixture": []}
    jobs = [(s, case, lam) for s in schedulers for case in ("gaussian", "mixture") for lam in lambdas]
    for name, case, lam in tqdm(jobs, desc="flow lab", disable=not progress, leave=False):
        scheduler = make_flow_scheduler(name, noise_level)
        n_steps = steps or DEFAULT_STEPS
        if case == "gaussian":
            row = flow_gaussian_case(problem.gaussian, problem.reward, beta0, lam, scheduler, n_steps, limit_steps,
                                     seed=seed)
        else:
            row = flow_mixture_case(problem.mixture, problem.reward, beta0, lam, scheduler, n_steps, n_samples, seed)
        level = noise_level if name == "flow_sde" else 0.0
        result[case].append({"scheduler": name, "noise_level": level, "steps": n_steps, **row})
    return result


# -- rendering ---------------------------------------------------------------------------------------

FLOW_GAUSSIAN_COLUMNS = [
    ("v_max_rel", "v max", "{:.1e}") if key == "eps_max_rel" else (key, header, fmt)
    for key, header, fmt in GAUSSIAN_COLUMNS
] + [("limit_mean_err", "limit mean", "{:.1e}"), ("limit_cov_err", "limit cov", "{:.1e}"),
     ("limit_sampler_cov_err", "limit cov e", "{:.1e}")]
FLOW_MIXTURE_COLUMNS = [
    ("v_rms", "v rms", "{:.1e}") if key == "eps_rms" else (key, header, fmt) for key, header, fmt in MIXTURE_COLUMNS
]


def _label(name: str, rows: list[dict]) -> str:
    return f"{name} (noise level {rows[0]['noise_level']:g})" if name == "flow_sde" else name


def render_flow_lab(result: dict) -> str:
    """The flow lab's tables per scheduler, its verdicts and a legend (the style of analytic.render_lab)."""
    parts = []
    cfg = result["config"]
    for name in cfg["schedulers"]:
        g = [r for r in result["gaussian"] if r["scheduler"] == name]
        m = [r for r in result["mixture"] if r["scheduler"] == name]
        label, steps = _label(name, g or m), (g or m)[0]["steps"]
        parts.append(
            f"== {label}, {steps} steps, rectified flow: single Gaussian, exact output moments (realigned vs "
            f"exact model at beta0/lam; exact model vs tilted target; limit: {cfg['limit_steps']} and "
            f"{2 * cfg['limit_steps']} steps extrapolated) ==\n" + format_table(g, FLOW_GAUSSIAN_COLUMNS)
        )
        parts.append(_render_mixture(label, steps, m, cfg["samples"], FLOW_MIXTURE_COLUMNS))
    parts.append(_gaussian_verdict(result["gaussian"]))
    parts.extend(_limit_verdict(name, [r for r in result["gaussian"] if r["scheduler"] == name])
                 for name in cfg["schedulers"])
    parts.append(
        "v = velocity (eps - x0). limit: realigned vs the tilted target as steps -> infinity (float64 moments "
        "through the scheduler's step coefficients, Richardson); limit cov e: the same for the exact model, "
        "i.e. the sampler's own limit. Mixture: realignment is an approximation, exact only at lam = 0 and 1; "
        "w[k] = the target posterior's soft weight of component k averaged over samples; mean and SW in "
        f"units of the target's RMS spread; ± is one standard error; * = not resolved (|gap| <= {RESOLVE_Z:g} "
        "SE, raise --samples)."
    )
    return "\n\n".join(parts)


def _limit_verdict(name: str, rows: list[dict]) -> str:
    if not rows:
        return f"{name}: no single-Gaussian rows."
    worst = max(max(r["limit_mean_err"], r["limit_cov_err"]) for r in rows)
    sampler = max(max(r["limit_sampler_mean_err"], r["limit_sampler_cov_err"]) for r in rows)
    head = f"{_label(name, rows)}, realigned vs tilted target in the step limit: largest error {worst:.1e}"
    if worst <= GAUSSIAN_BAR:
        return f"{head} (bar {GAUSSIAN_BAR:g}): realignment reaches the target."
    why = ("; at this noise level the flow SDE's error decays slower than 1/steps (its diffusion "
           "g = noise_level sqrt(s / (1 - s)) is singular at s = 1), so the extrapolation is no limit: "
           "it is the sampler's error left at these steps") if name == "flow_sde" else ""
    return (f"{head}, above the bar {GAUSSIAN_BAR:g}; the exact model's is {sampler:.1e}, so it is the "
            f"sampler's, not realignment's{why}.")

