"""The rectified-flow lab: exact velocity of Gaussian mixtures, realignment on diffusers' flow Euler ODE
and deradiff.flow's SDE, and `deradiff lab --family flow`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_analytic import (
    WrongMix,
    assert_agree,
    assert_paired,
    deterministic_expectations,
    mixture_1d,
    mixture_2d,
)

import deradiff.analytic_flow as analytic_flow
from deradiff.analytic import (
    DTYPE,
    GAUSSIAN_BAR,
    default_problem,
    draw_samples,
    exact_output_moments,
    realign,
    tilted_target,
)
from deradiff.analytic_flow import (
    AnalyticVelocity,
    flow_gaussian_case,
    flow_marginal,
    flow_mixture_case,
    limit_moments,
    make_flow_scheduler,
    propagate_moments,
)
from deradiff.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

MEMORYLESS = math.sqrt(2.0)


def models(base, reward, lam, scheduler, beta0=1.0):
    """(target at beta0 / lam, realigned model at lam, exact model of the target)."""
    target = tilted_target(base, reward, beta0, lam)
    ref = AnalyticVelocity.for_scheduler(base, scheduler)
    aligned = AnalyticVelocity.for_scheduler(tilted_target(base, reward, beta0, 1.0), scheduler)
    return target, realign(ref, aligned, lam), AnalyticVelocity.for_scheduler(target, scheduler)


# -- the exact velocity ------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.2, 0.7])
def test_flow_marginal_is_the_convolution_1d(s):
    # x_s = (1 - s) x0 + s eps: density of x_s = integral of p(x0) N(x; (1 - s) x0, s^2) dx0.
    base = mixture_1d()
    x0 = torch.linspace(-10, 10, 20001, dtype=DTYPE)
    p0 = base.log_prob(x0[:, None]).exp()
    xs = torch.linspace(-4, 4, 41, dtype=DTYPE)
    kernel = torch.exp(-((xs[:, None] - (1 - s) * x0[None]) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi))
    quadrature = torch.trapezoid(kernel * p0[None], x0, dim=1)
    assert torch.allclose(flow_marginal(base, s).log_prob(xs[:, None]).exp(), quadrature, atol=1e-9)


@pytest.mark.parametrize("s", [0.02, 0.5, 0.97])
def test_velocity_matches_tweedie_autograd(s):
    # v* = (x - E[x0 | x]) / s with Tweedie's E[x0 | x] = (x + s^2 grad log p_s(x)) / (1 - s).
    base = mixture_2d()
    marginal = flow_marginal(base, s)
    x = marginal.sample(64, torch.Generator().manual_seed(1)).requires_grad_(True)
    (score,) = torch.autograd.grad(marginal.log_prob(x).sum(), x)
    x = x.detach()
    velocity = AnalyticVelocity(base).velocity(x, s)
    assert torch.allclose(velocity, -(x + s * score) / (1 - s), atol=1e-9)
    assert torch.allclose(AnalyticVelocity(base).posterior_mean(x, s), (x + s**2 * score) / (1 - s), atol=1e-9)


def test_velocity_at_the_ends():
    base, x = mixture_2d(), torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    model = AnalyticVelocity(base)
    # s = 1: x_1 = eps is independent of x0, v = x - E[x0]; s = 0: x_0 = x0, v = E[eps] - x = -x.
    assert torch.allclose(model.velocity(x, 1.0), x - base.mean(), atol=1e-12)
    assert torch.allclose(model.velocity(x, 0.0), -x, atol=1e-12)


def test_posterior_mean_and_velocity_match_monte_carlo():
    # E[x0 | x_s = x] and E[eps - x0 | x_s = x] by importance weights N(x; (1 - s) x0, s^2 I), x0 ~ p.
    base, s, n = mixture_2d(), 0.6, 400_000
    x0 = base.sample(n, torch.Generator().manual_seed(2))
    points = torch.tensor([[0.0, 0.0], [-0.5, 0.4], [0.6, -0.2]], dtype=DTYPE)
    model = AnalyticVelocity(base)
    for x in points:
        logw = -((x[None] - (1 - s) * x0) ** 2).sum(1) / (2 * s**2)
        w = torch.softmax(logw, 0)
        eps = (x[None] - (1 - s) * x0) / s
        for values, exact in ((x0, model.posterior_mean(x[None], s)[0]), (eps - x0, model.velocity(x[None], s)[0])):
            mc = w @ values
            se = ((w**2) @ (values - mc) ** 2).sqrt()  # delta-method SE of a self-normalized mean
            assert ((mc - exact).abs() < 5 * se).all(), (x.tolist(), mc.tolist(), exact.tolist(), se.tolist())
            assert (se < 0.01).all()


def test_velocity_reads_the_scheduler_timesteps():
    base, scheduler = mixture_2d(), make_flow_scheduler("flow_euler")
    model = AnalyticVelocity.for_scheduler(base, scheduler)
    scheduler.set_timesteps(10)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    t = scheduler.timesteps[3]
    s = float(scheduler.sigmas[3])
    assert float(t) == pytest.approx(1000 * s, rel=1e-6)
    assert torch.allclose(model(x, t), model.velocity(x, s), atol=1e-6)
    assert torch.allclose(model(x, scheduler.timesteps[0]), x - base.mean(), atol=1e-12)  # t = 1000: s = 1
    assert model.marginal(500.0).means.equal(flow_marginal(base, 0.5).means)
    rows = model(x, torch.tensor([100.0, 100.0, 500.0, 900.0, 900.0]))
    assert torch.allclose(rows[2], model.velocity(x[2:3], 0.5)[0]) and torch.allclose(rows[4], model.velocity(x[4:5], 0.9)[0])


# -- single Gaussian: exact moments and the step limit ----------------------------------------------


@pytest.mark.parametrize("name,noise", [("flow_euler", 0.0), ("flow_sde", 0.7)])
def test_propagated_moments_equal_the_real_scheduler(name, noise):
    problem = default_problem()
    scheduler = make_flow_scheduler(name, noise)
    _, realigned, _ = models(problem.gaussian, problem.reward, 2.0, scheduler)
    mean, cov = propagate_moments(realigned, scheduler, 20)
    chain_mean, chain_cov = exact_output_moments(realigned, scheduler, 20)  # through scheduler.step
    assert torch.allclose(mean, chain_mean, atol=1e-6) and torch.allclose(cov, chain_cov, atol=1e-6)
    x = draw_samples(realigned, scheduler, 20, 40_000, 2, seed=3)
    se = (torch.diagonal(cov) / x.shape[0]).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.01)
    with pytest.raises(ValueError, match="not affine"):
        propagate_moments(AnalyticVelocity(problem.mixture), scheduler, 5)


@pytest.mark.parametrize("name,noise", [("flow_euler", 0.0), ("flow_sde", 0.7)])
def test_gaussian_realignment_is_exact(name, noise):
    problem, scheduler = default_problem(), make_flow_scheduler(name, noise)
    for lam in (0.5, 1.0, 2.0):
        row = flow_gaussian_case(problem.gaussian, problem.reward, 1.0, lam, scheduler, 50, limit_steps=250)
        # Realigned vs the exact beta0 / lam model through the same scheduler and noise: exact moments.
        assert row["realign_mean_err"] <= GAUSSIAN_BAR and row["realign_cov_err"] <= GAUSSIAN_BAR, row
        assert row["v_max_rel"] < 1e-12 and row["traj_max"] < 1e-6
        # The chain at 50 steps misses the target by the sampler's own error, the same for both models,
        # and the continuum limit of the realigned chain is the exact model's.
        assert row["sampler_cov_err"] > 1e-3
        assert row["limit_cov_err"] == pytest.approx(row["limit_sampler_cov_err"], abs=1e-10)
        if name == "flow_euler":  # the ODE's limit is the tilted target itself
            assert row["limit_mean_err"] <= GAUSSIAN_BAR and row["limit_cov_err"] <= GAUSSIAN_BAR, row


def test_memoryless_sde_reaches_the_target():
    # At noise level sqrt(2) the SDE's step error is second order: realigned reaches the tilted target.
    problem, scheduler = default_problem(), make_flow_scheduler("flow_sde", MEMORYLESS)
    target, realigned, _ = models(problem.gaussian, problem.reward, 2.0, scheduler)
    mean, cov = limit_moments(realigned, scheduler, 250)
    assert torch.allclose(mean, target.mean(), atol=1e-6)
    assert torch.linalg.norm(cov - target.cov()) <= GAUSSIAN_BAR * torch.linalg.norm(target.cov())


@pytest.mark.parametrize("name", ["flow_euler", "flow_sde"])
def test_wrong_mixing_is_caught(name):
    problem = default_problem()
    row = flow_gaussian_case(problem.gaussian, problem.reward, 1.0, 0.5, make_flow_scheduler(name), 20,
                             limit_steps=20, realign_fn=WrongMix)
    assert row["realign_mean_err"] > 1e-2 and row["v_max_rel"] > 1e-2
    assert row["limit_mean_err"] > 1e-2


@pytest.mark.parametrize("name", ["flow_euler", "flow_sde"])
def test_lambda_0_and_1_are_the_base_and_beta0_models(name):
    problem, scheduler = default_problem(), make_flow_scheduler(name)
    for base in (problem.gaussian, problem.mixture):
        for lam in (0.0, 1.0):
            _, realigned, exact = models(base, problem.reward, lam, scheduler)
            assert torch.equal(draw_samples(realigned, scheduler, 10, 256, 2, seed=5),
                               draw_samples(exact, scheduler, 10, 256, 2, seed=5))


# -- mixtures: signed gaps with paired standard errors -------------------------------------------------


def test_mixture_gaps_match_quadrature_on_the_ode():
    problem, scheduler, lam, steps = default_problem(), make_flow_scheduler("flow_euler"), 2.0, 20
    row = flow_mixture_case(problem.mixture, problem.reward, 1.0, lam, scheduler, steps, n_samples=4000, seed=0)
    target, realigned, exact = models(problem.mixture, problem.reward, lam, scheduler)
    spread = math.sqrt(float(torch.trace(target.cov())) / 2)

    def f(x):
        return torch.cat([target.responsibilities(x), x / spread], 1)

    e_r = deterministic_expectations(realigned, scheduler, steps, f)
    e_e = deterministic_expectations(exact, scheduler, steps, f)
    assert_agree(row, ("weight_gap", "mean_gap"), e_r - e_e, resolved=True)
    assert_paired(row)
    assert row["v_rms"] > 1e-2 and "eps_rms" not in row


def test_mixture_gaps_on_the_sde_are_paired_and_vanish_at_0_and_1():
    problem, scheduler = default_problem(), make_flow_scheduler("flow_sde")
    rows = {lam: flow_mixture_case(problem.mixture, problem.reward, 1.0, lam, scheduler, 20, n_samples=1500)
            for lam in (0.0, 1.0, 2.0)}
    for lam in (0.0, 1.0):
        assert rows[lam]["v_rms"] == 0.0 and rows[lam]["weight_gap"] == [0.0, 0.0]
        assert rows[lam]["mean_gap_se"] == [0.0, 0.0]
    gap, se = torch.tensor(rows[2.0]["mean_gap"]), torch.tensor(rows[2.0]["mean_gap_se"])
    assert (se > 0).all() and (gap.abs() > 10 * se).all()
    assert_paired(rows[2.0])


# -- `deradiff lab --family flow` ------------------------------------------------------------------


def test_flow_lab_command_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analytic_flow, "LIMIT_STEPS", 40)
    out = tmp_path / "flow.json"
    code = main(["lab", "--family", "flow", "--scheduler", "flow_euler", "flow_sde", "--noise-level", "1.0",
                 "--steps", "8", "--samples", "300", "--lambdas", "0", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "family flow" in printed and "flow_sde (noise level 1)" in printed and "v rms" in printed
    data = json.loads(out.read_text())
    assert data["family"] == "flow" and data["config"]["noise_level"] == 1.0 and data["config"]["limit_steps"] == 40
    assert [(r["scheduler"], r["lambda"], r["noise_level"]) for r in data["gaussian"]] == [
        ("flow_euler", 0.0, 0.0), ("flow_euler", 2.0, 0.0), ("flow_sde", 0.0, 1.0), ("flow_sde", 2.0, 1.0)]
    assert all(r["realign_cov_err"] <= GAUSSIAN_BAR for r in data["gaussian"])
    assert data["mixture"][1]["v_rms"] > 1e-2 and len(data["mixture"][1]["weight_gap_se"]) == 2
    assert data["gaussian"][0]["beta"] is None


def test_vp_lab_json_names_its_family(tmp_path):
    out = tmp_path / "vp.json"
    assert main(["lab", "--scheduler", "ddim", "--steps", "5", "--samples", "50", "--lambdas", "1",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["family"] == "vp"


@pytest.mark.parametrize("argv,message", [
    (["--family", "flow", "--scheduler", "ddim"], "not of --family flow"),
    (["--scheduler", "flow_sde"], "pass --family flow"),
    (["--family", "flow", "--noise-level", "-1"], ">= 0"),
])
def test_flow_lab_bad_input(argv, message, capsys):
    assert main(["lab", *argv]) == 2
    assert message in capsys.readouterr().err


def test_lab_help_explains_the_family(capsys):
    with pytest.raises(SystemExit):
        main(["lab", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--family {vp,flow}" in text and "rectified flow" in text and "--noise-level" in text
    assert "flow_euler" in text and "flow_sde" in text
