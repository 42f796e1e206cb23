"""Analytic ground truth: tilted mixtures, noised scores, and realignment on real diffusers schedulers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from deradiff.analytic import (
    DTYPE,
    AnalyticDenoiser,
    GaussianMixture,
    default_problem,
    draw_samples,
    exact_output_moments,
    gap_status,
    gaussian_case,
    make_scheduler,
    mean_with_se,
    mixture_case,
    paired_gap,
    run_sampler,
    sliced_wasserstein,
    tilted_target,
)
from deradiff.cli import main

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def mixture_1d() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE),
        torch.tensor([[-1.0], [0.5], [2.0]], dtype=DTYPE),
        torch.tensor([[[0.3]], [[0.1]], [[0.6]]], dtype=DTYPE),
    )


def mixture_2d() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([0.6, 0.4], dtype=DTYPE),
        torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=DTYPE),
        torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.4]]], dtype=DTYPE),
    )


def grid_2d(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(lo, hi, n, dtype=DTYPE)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1), float(axis[1] - axis[0]) ** 2


# -- the tilted target --------------------------------------------------------------------------


def test_tilted_mixture_matches_quadrature_1d():
    base, a, beta = mixture_1d(), torch.tensor([1.3], dtype=DTYPE), 0.7
    x = torch.linspace(-15, 15, 30001, dtype=DTYPE)[:, None]
    unnormalized = torch.exp(base.log_prob(x) + (x @ a) / beta)
    z = torch.trapezoid(unnormalized, x[:, 0])
    tilted = base.tilted(a, beta)
    assert torch.allclose(tilted.log_prob(x).exp(), unnormalized / z, atol=1e-10)
    assert base.log_tilt_normalizer(a, beta) == pytest.approx(math.log(z), abs=1e-9)
    # The weights really move (the test is not passing on an unchanged mixture).
    assert (tilted.weights - base.weights).abs().max() > 0.1


def test_tilted_mixture_matches_quadrature_2d():
    base, a, beta = mixture_2d(), torch.tensor([0.8, -1.1], dtype=DTYPE), 0.9
    x, cell = grid_2d(-9.0, 9.0, 601)
    unnormalized = torch.exp(base.log_prob(x) + (x @ a) / beta)
    density = unnormalized / (unnormalized.sum() * cell)
    tilted = base.tilted(a, beta)
    assert torch.allclose(tilted.log_prob(x).exp(), density, atol=1e-8)
    mean = (density[:, None] * x).sum(0) * cell
    centered = x - mean
    cov = (density[:, None, None] * centered[:, :, None] * centered[:, None, :]).sum(0) * cell
    assert torch.allclose(tilted.mean(), mean, atol=1e-8)
    assert torch.allclose(tilted.cov(), cov, atol=1e-8)


def test_tilted_importance_weights_monte_carlo():
    base, a, beta = mixture_2d(), torch.tensor([0.5, 0.7], dtype=DTYPE), 1.2
    x = base.sample(400_000, torch.Generator().manual_seed(0))
    w = torch.softmax((x @ a) / beta, 0)
    tilted = base.tilted(a, beta)
    assert torch.allclose((w[:, None] * x).sum(0), tilted.mean(), atol=0.01)
    # Soft assignment under the tilted posterior recovers its weights.
    assert torch.allclose((w[:, None] * tilted.responsibilities(x)).sum(0), tilted.weights, atol=0.01)


def test_tilt_limits():
    base, a = mixture_2d(), torch.tensor([0.5, 0.7], dtype=DTYPE)
    assert tilted_target(base, a, 1.0, 0.0) is base
    assert base.tilted(a, math.inf) is base
    # beta0 / lam: lam = 2 at beta0 = 1 is the model at beta 0.5.
    assert torch.equal(tilted_target(base, a, 1.0, 2.0).means, base.tilted(a, 0.5).means)


def test_bad_mixture_is_rejected():
    from deradiff.errors import UserError

    with pytest.raises(UserError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(UserError, match="positive definite"):
        GaussianMixture.gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])


# -- the noised marginal and its score ----------------------------------------------------------


@pytest.mark.parametrize("abar", [0.9, 0.3, 0.02])
def test_noised_marginal_is_the_convolution_1d(abar):
    base = mixture_1d()
    x0 = torch.linspace(-10, 10, 20001, dtype=DTYPE)
    p0 = base.log_prob(x0[:, None]).exp()
    xt = torch.linspace(-4, 4, 41, dtype=DTYPE)
    kernel = torch.exp(-((xt[:, None] - math.sqrt(abar) * x0[None]) ** 2) / (2 * (1 - abar)))
    kernel = kernel / math.sqrt(2 * math.pi * (1 - abar))
    quadrature = torch.trapezoid(kernel * p0[None], x0, dim=1)
    assert torch.allclose(base.noised(abar).log_prob(xt[:, None]).exp(), quadrature, atol=1e-9)


@pytest.mark.parametrize("abar", [0.999, 0.5, 0.01])
def test_noised_score_matches_autograd(abar):
    base = mixture_2d()
    x = base.noised(abar).sample(64, torch.Generator().manual_seed(1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(base.noised(abar).log_prob(x).sum(), x)
    assert torch.allclose(base.noised(abar).score(x.detach()), grad, atol=1e-10)
    assert torch.allclose(base.noised_score(x.detach(), abar), grad, atol=1e-10)


def test_denoiser_reads_the_scheduler_schedule():
    base, scheduler = mixture_2d(), make_scheduler("ddpm")
    model = AnalyticDenoiser.for_scheduler(base, scheduler)
    x = torch.randn(5, 2, dtype=DTYPE)
    abar = float(scheduler.alphas_cumprod[400])
    assert torch.allclose(model(x, 400), -math.sqrt(1 - abar) * base.noised(abar).score(x), atol=1e-12)
    assert torch.equal(model(x, torch.tensor(400)), model(x, 400))
    # Fractional timesteps (Euler) land between the neighbours; per-row timesteps are per row.
    assert float(scheduler.alphas_cumprod[401]) < model.abar(400.5) < abar
    rows = model(x, torch.tensor([10, 10, 500, 500, 900]))
    assert torch.allclose(rows[2], model(x[2:3], 500)[0]) and torch.allclose(rows[4], model(x[4:5], 900)[0])


# -- single Gaussian: realignment is exact ------------------------------------------------------


@pytest.mark.parametrize("name,steps", [("ddim", 50), ("ddpm", 250)])
def test_gaussian_realignment_is_exact(name, steps):
    problem, scheduler = default_problem(), make_scheduler(name)
    for lam in LAMBDAS:
        row = gaussian_case(problem.gaussian, problem.reward, 1.0, lam, scheduler, steps)
        for key in ("realign_mean_err", "realign_cov_err", "eps_max_rel", "traj_max"):
            assert row[key] < 1e-10, (name, lam, key, row[key])
        # The sampler's own finite-step error is real, and separate.
        assert row["sampler_cov_err"] > 1e-3


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp", "unipc", "pndm", "lms"])
def test_gaussian_realignment_exact_on_other_schedulers(name):
    problem = default_problem()
    row = gaussian_case(problem.gaussian, problem.reward, 1.0, 2.0, make_scheduler(name), 20, n_samples=16)
    # Euler-type schedulers step in float32: exact up to float32 rounding.
    assert row["realign_mean_err"] < 1e-6 and row["realign_cov_err"] < 1e-6 and row["traj_max"] < 1e-6


class WrongMix(nn.Module):
    """A mixing rule that is NOT realignment: ref + lam * aligned (unnormalized)."""

    def __init__(self, reference, aligned, lam):
        super().__init__()
        self.reference, self.aligned, self.lam = reference, aligned, lam

    def forward(self, x, t):
        return self.reference(x, t) + self.lam * self.aligned(x, t)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_wrong_mixing_is_caught(name):
    problem = default_problem()
    row = gaussian_case(problem.gaussian, problem.reward, 1.0, 0.5, make_scheduler(name), 30, realign_fn=WrongMix)
    assert row["realign_mean_err"] > 1e-2 or row["realign_cov_err"] > 1e-2
    assert row["eps_max_rel"] > 1e-2


# -- exact output moments ------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps", [("ddim", 10), ("ddpm", 40), ("euler_a", 10)])
def test_exact_moments_match_monte_carlo(name, steps):
    problem, scheduler = default_problem(), make_scheduler(name)
    model = AnalyticDenoiser.for_scheduler(problem.gaussian, scheduler)
    mean, cov = exact_output_moments(model, scheduler, steps)
    x = draw_samples(model, scheduler, steps, 40_000, 2, seed=3)
    se = (torch.diagonal(cov) / x.shape[0]).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.01)
    # Few steps: the sampler visibly misses the data covariance, and the exact moments say so.
    assert torch.linalg.norm(cov - problem.gaussian.cov()) > 0.02


def test_sampler_error_shrinks_with_steps():
    problem, scheduler = default_problem(), make_scheduler("ddim")
    errors = [gaussian_case(problem.gaussian, problem.reward, 1.0, 1.0, scheduler, n, n_samples=4)["sampler_cov_err"]
              for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_exact_moments_refuse_a_non_gaussian_model():
    problem, scheduler = default_problem(), make_scheduler("ddim")
    with pytest.raises(ValueError, match="not affine"):
        exact_output_moments(AnalyticDenoiser.for_scheduler(problem.mixture, scheduler), scheduler, 10)


# -- mixture: realignment is an approximation ---------------------------------------------------


def test_mixture_realignment_error_is_real_and_vanishes_at_0_and_1():
    problem, scheduler = default_problem(), make_scheduler("ddim")
    rows = {lam: mixture_case(problem.mixture, problem.reward, 1.0, lam, scheduler, 20, n_samples=1000)
            for lam in (0.0, 1.0, 2.0)}
    for lam in (0.0, 1.0):
        assert rows[lam]["eps_rms"] == 0.0 and rows[lam]["traj_rms"] == 0.0 and rows[lam]["sw_r_e"] == 0.0
    for lam in (0.0, 1.0):  # identical samples: zero gaps with zero SE, reported as exact
        assert rows[lam]["weight_gap"] == [0.0, 0.0] and rows[lam]["mean_gap_se"] == [0.0, 0.0]
    assert rows[2.0]["eps_rms"] > 1e-2
    assert rows[2.0]["sw_r_e"] > 0.1
    # The realigned mean is off by many paired SEs, and by more than the exact model's own error.
    gap, se = torch.tensor(rows[2.0]["mean_gap"]), torch.tensor(rows[2.0]["mean_gap_se"])
    assert (gap.abs() > 10 * se).all()
    assert gap.norm() > 3 * torch.tensor(rows[2.0]["exact_mean_err"]).norm()
    assert rows[2.0]["sw_r_t"] > rows[2.0]["sw_e_t"] + 0.05


def test_mixture_realignment_exact_when_the_tilt_does_not_reweight():
    # Equal isotropic covariances and a reward orthogonal to the means' separation: the tilt
    # shifts every component alike, so the geometric mixture is exact again (module docstring).
    mixture = GaussianMixture(
        torch.tensor([0.7, 0.3]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 0.2 * torch.eye(2).expand(2, 2, 2)
    )
    reward = torch.tensor([0.0, 1.0], dtype=DTYPE)
    row = mixture_case(mixture, reward, 1.0, 2.0, make_scheduler("ddim"), 20, n_samples=500)
    assert row["eps_rms"] < 1e-12 and row["traj_rms"] < 1e-10


def test_sliced_wasserstein_sees_a_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=gen, dtype=DTYPE)
    assert sliced_wasserstein(x, x) == 0.0
    shifted = sliced_wasserstein(x, x + torch.tensor([0.5, 0.0], dtype=DTYPE))
    # Projected shift 0.5 |cos theta| has RMS 0.5 / sqrt(2) over random directions.
    assert shifted == pytest.approx(0.5 / math.sqrt(2), rel=0.1)


# -- signed gaps with paired standard errors --------------------------------------------------------


def test_paired_se_comes_from_per_sample_differences():
    # Differences 2, 3, 2, 3: mean 2.5, std (n - 1) sqrt(1/3), SE sqrt(1/3) / 2. The SE of a alone
    # (values 3, 5, 4, 8) is 1.08: pairing removes what a and b share.
    a = torch.tensor([3.0, 5.0, 4.0, 8.0], dtype=DTYPE)
    b = torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=DTYPE)
    gap = paired_gap(a, b)
    assert float(gap.value) == pytest.approx(2.5)
    assert float(gap.se) == pytest.approx(math.sqrt(1 / 3) / 2, rel=1e-12)
    assert float(mean_with_se(a).se) == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-12)
    # Common noise in (n, d) samples: the SE is the differences' spread (0.01), not the samples' (1).
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(40_000, 2, generator=gen, dtype=DTYPE)
    own = torch.randn(40_000, 2, generator=gen, dtype=DTYPE)
    gap = paired_gap(shared + 0.01 * own + torch.tensor([0.3, -0.2], dtype=DTYPE), shared)
    assert torch.allclose(gap.se, torch.full((2,), 0.01 / 200, dtype=DTYPE), rtol=0.03)
    assert torch.allclose(gap.value, torch.tensor([0.3, -0.2], dtype=DTYPE), atol=5 * 0.01 / 200)
    assert paired_gap(shared, shared).se.eq(0).all()


def test_gap_status():
    assert gap_status(0.0, 0.0) == "exact"
    assert gap_status(-0.031, 0.01) == "resolved"
    assert gap_status(0.029, 0.01) == "not resolved"
    assert gap_status(0.0, 0.01) == "not resolved"


def plain_mix(reference, aligned, lam):
    """(1 - lam) eps_ref + lam eps_aligned written out here, not the project's RealignedDenoiser."""
    return lambda x, t: (1 - lam) * reference(x, t) + lam * aligned(x, t)


def models_at(base, reward, lam, scheduler):
    target = tilted_target(base, reward, 1.0, lam)
    ref = AnalyticDenoiser.for_scheduler(base, scheduler)
    aligned = AnalyticDenoiser.for_scheduler(tilted_target(base, reward, 1.0, 1.0), scheduler)
    return target, plain_mix(ref, aligned, lam), AnalyticDenoiser.for_scheduler(target, scheduler)


def deterministic_expectations(model, scheduler, steps, f, half_width=7.0, m=201):
    """E[f(x_0)] for a deterministic sampler and 2-D data without sampling: the trapezoid rule for
    x_T ~ N(0, I) on an m x m grid pushed through the chain (converged to ~1e-6 at m = 201)."""
    axis = torch.linspace(-half_width, half_width, m, dtype=DTYPE)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    x_T = torch.stack([xx.flatten(), yy.flatten()], 1)
    weights = torch.exp(-0.5 * (x_T**2).sum(1))
    return (weights / weights.sum()) @ f(run_sampler(model, scheduler, steps, x_T))


def ddpm_expectations(model, scheduler, steps, f, monkeypatch, half_width=8.0, m=2001, nodes=32):
    """E[f(x_0)] for a DDPM chain and 1-D data without sampling: V(x) = E[f(x_0) | x_t = x],
    recursed backward on a grid (linear interpolation, Gauss-Hermite over each step's noise),
    then integrated against x_T ~ N(0, 1). Each step's mean map and noise scale are read off the
    real scheduler with its noise set to 0 and to 1 (converged to ~1e-6 at m = 2001)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    noise = [0.0]
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **_: torch.full(shape, noise[0], dtype=DTYPE))
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    grid = torch.linspace(-half_width, half_width, m, dtype=DTYPE)
    steps_maps = []
    for t in sched.timesteps:
        eps = model(grid[:, None], t)
        noise[0] = 0.0
        mean = sched.step(eps, t, grid[:, None]).prev_sample[:, 0]
        noise[0] = 1.0
        steps_maps.append((mean, float((sched.step(eps, t, grid[:, None]).prev_sample[:, 0] - mean).mean())))
    monkeypatch.undo()
    z, wz = np.polynomial.hermite_e.hermegauss(nodes)
    wz = wz / wz.sum()
    mean, sigma = steps_maps[-1]
    assert sigma == 0.0  # DDPM's last step adds no noise
    value = f(mean[:, None]).numpy()  # (m, F)
    for mean, sigma in reversed(steps_maps[:-1]):
        points = (mean.numpy()[:, None] + sigma * z[None]).ravel()
        value = np.stack([np.interp(points, grid.numpy(), v).reshape(m, nodes) @ wz for v in value.T], 1)
    density = torch.exp(-0.5 * grid**2)
    density = density / torch.trapezoid(density, grid)
    return torch.trapezoid(density[:, None] * torch.from_numpy(value), grid, dim=0)


def assert_paired(row):
    """Common noise: the mean gap's paired SE is far below the exact model's own (unpaired) SE."""
    assert (torch.tensor(row["mean_gap_se"]) < 0.3 * torch.tensor(row["exact_mean_err_se"])).all()


def assert_agree(row, keys, truth, resolved=False):
    """The lab's signed estimates row[keys] (concatenated) lie within 3 reported SE of `truth`;
    with `resolved`, the mean entries and the largest weight entry of `truth` are > 3 SE from
    zero, so the agreement is not vacuous."""
    value = torch.tensor([v for key in keys for v in row[key]], dtype=DTYPE)
    se = torch.tensor([v for key in keys for v in row[key + "_se"]], dtype=DTYPE)
    assert ((value - truth).abs() <= 3 * se).all(), (keys, value.tolist(), truth.tolist(), se.tolist())
    if resolved:
        k = len(row[keys[0]])
        for i in [int(truth[:k].abs().argmax()), *range(k, len(truth))]:
            assert abs(truth[i]) > 3 * se[i], (i, truth.tolist(), se.tolist())


def test_lab_gap_matches_quadrature_ddim():
    problem, scheduler, lam, steps = default_problem(), make_scheduler("ddim"), 2.0, 20
    row = mixture_case(problem.mixture, problem.reward, 1.0, lam, scheduler, steps, n_samples=4000, seed=0)
    target, realigned, exact = models_at(problem.mixture, problem.reward, lam, scheduler)
    spread = math.sqrt(float(torch.trace(target.cov())) / 2)

    def f(x):
        return torch.cat([target.responsibilities(x), x / spread], 1)

    e_r = deterministic_expectations(realigned, scheduler, steps, f)
    e_e = deterministic_expectations(exact, scheduler, steps, f)
    assert_agree(row, ("weight_gap", "mean_gap"), e_r - e_e, resolved=True)
    assert_paired(row)
    # Not checked here: the exact model's unpaired error vs target. Seed 0's 4000 x_T draws have
    # a sample mean 3.1 SE off along y, which DDIM passes on to it; the paired gap cancels that.


def test_lab_gap_matches_backward_recursion_ddpm(monkeypatch):
    # Stochastic sampler: the pairing must share the step noise too, or the SE would not hold.
    base, reward = mixture_1d(), torch.tensor([1.0], dtype=DTYPE)
    scheduler, lam, steps = make_scheduler("ddpm"), 2.0, 50
    row = mixture_case(base, reward, 1.0, lam, scheduler, steps, n_samples=4000, seed=0)
    target, realigned, exact = models_at(base, reward, lam, scheduler)
    spread = math.sqrt(float(torch.trace(target.cov())))

    def f(x):
        return torch.cat([target.responsibilities(x), x / spread], 1)

    e_r = ddpm_expectations(realigned, scheduler, steps, f, monkeypatch)
    e_e = ddpm_expectations(exact, scheduler, steps, f, monkeypatch)
    assert_agree(row, ("weight_gap", "mean_gap"), e_r - e_e, resolved=True)
    assert_paired(row)
    truth = torch.cat([target.weights, target.mean() / spread])
    assert_agree(row, ("exact_weight_err", "exact_mean_err"), e_e - truth)


# -- the `deradiff lab` command -----------------------------------------------------------------


def test_lab_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "lab.json"
    code = main(["lab", "--scheduler", "ddim", "--steps", "10", "--samples", "300",
                 "--lambdas", "0", "1", "2", "--beta", "0.8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "single Gaussian" in printed and "mixture" in printed
    data = json.loads(out.read_text())
    assert [r["lambda"] for r in data["gaussian"]] == [0.0, 1.0, 2.0]
    assert data["gaussian"][0]["beta"] is None  # lambda 0: beta = inf, written as null
    assert data["mixture"][2]["beta"] == pytest.approx(0.4)
    assert all(r["realign_cov_err"] < 1e-10 for r in data["gaussian"])
    assert data["mixture"][2]["eps_rms"] > 1e-2 and data["mixture"][1]["eps_rms"] == 0.0
    assert data["mixture"][2]["samples"] == 300 and len(data["mixture"][2]["weight_gap_se"]) == 2
    assert "paired SE" in printed and "realignment exact" in printed


@pytest.mark.parametrize("argv,message", [
    (["--lambdas", "nan"], "finite"),
    (["--beta", "0"], "positive"),
    (["--steps", "0"], "at least 1"),
])
def test_lab_bad_input(argv, message, capsys):
    assert main(["lab", *argv]) == 2
    assert message in capsys.readouterr().err


def test_lab_unknown_scheduler_lists_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lab", "--scheduler", "heun"])
    assert exc.value.code == 2
    assert "ddim" in capsys.readouterr().err
