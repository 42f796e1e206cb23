"""Flow-matching pipelines (SD3, FLUX) under realignment, and the flow SDE sampler (deradiff.flow)."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from tiny_flow import MAX_SEQUENCE_LENGTH, add_random_transformer_lora, build_tiny_flux, build_tiny_sd3

from deradiff.errors import UserError
from deradiff.flow import FlowMatchSDEScheduler, gaussian_log_prob
from deradiff.realign import (
    RealignedDenoiser,
    _repeat_call,
    path_kl,
    realigned,
    records_guidance_scale,
    step_mean_coefficient,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a blue square"]
SDE_SEED = 7


@pytest.fixture(scope="module")
def flow_pipes(tmp_path_factory):
    """{"sd3": (adapted, base), "flux": (adapted, base)}: same weights, adapted with a random
    LoRA on every attention projection of its transformer (text stream included)."""
    pipes = {}
    for name, build in (("sd3", build_tiny_sd3), ("flux", build_tiny_flux)):
        root = tmp_path_factory.mktemp(name)
        adapted, base = build(root), build(root)
        add_random_transformer_lora(adapted.transformer)
        pipes[name] = (adapted, base)
    return pipes


def _with_scheduler(pipe, kind: str, noise_level: float = 0.7):
    """The same modules with the Euler ODE ("euler") or the SDE sampler ("sde") as scheduler."""
    if kind == "sde":
        scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=noise_level)
    else:
        scheduler = copy.deepcopy(pipe.scheduler)
    return type(pipe)(**{**pipe.components, "scheduler": scheduler})


def _run(pipe, guidance: float, steps: int = 4) -> torch.Tensor:
    """Output latents; the SDE noise is seeded too (pipelines do not hand step() their generator)."""
    if isinstance(pipe.scheduler, FlowMatchSDEScheduler):
        pipe.scheduler.generator = torch.Generator().manual_seed(SDE_SEED)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                output_type="latent", generator=torch.Generator().manual_seed(0),
                max_sequence_length=MAX_SEQUENCE_LENGTH).images


# SD3: classifier-free guidance (batched [uncond; cond] rows) and none; FLUX.1-dev: guidance is
# a transformer input, so each call already holds both branches' inputs for one row per sample.
CASES = [("sd3", 3.0), ("sd3", 1.0), ("flux", 3.5)]


@pytest.mark.parametrize("scheduler", ["euler", "sde"])
@pytest.mark.parametrize("family,guidance", CASES)
def test_lambda_0_and_1_are_bit_exact(flow_pipes, family, guidance, scheduler):
    adapted, base = (_with_scheduler(p, scheduler) for p in flow_pipes[family])
    expected_base, expected_aligned = _run(base, guidance), _run(adapted, guidance)
    assert (expected_base - expected_aligned).abs().max() > 1e-2, "LoRA too weak for the test to mean anything"
    for kwargs in ({"mode": "two_forward"}, {"reference": base.transformer}):
        with realigned(adapted, lam=0.0, **kwargs):
            got_base = _run(adapted, guidance)
        with realigned(adapted, lam=1.0, **kwargs):
            got_aligned = _run(adapted, guidance)
        assert torch.equal(got_base, expected_base), kwargs
        assert torch.equal(got_aligned, expected_aligned), kwargs
    # One call on the doubled batch: exact where the doubled batch picks the same CPU kernels
    # (SD3 with CFG here), within float rounding elsewhere (docs: design, mixed batch).
    for lam, expected in ((0.0, expected_base), (1.0, expected_aligned)):
        with realigned(adapted, lam=lam, mode="mixed_batch"):
            got = _run(adapted, guidance)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stack_weights", [True, False])  # the stacked (CPU default) and sliced routes
@pytest.mark.parametrize("family,guidance", CASES)
def test_mixed_batch_equals_two_forward_at_lambda_2(flow_pipes, family, guidance, stack_weights):
    adapted, _ = flow_pipes[family]
    with realigned(adapted, lam=2.0) as two:
        want = _run(adapted, guidance)
    with realigned(adapted, lam=2.0, mode="mixed_batch", stack_weights=stack_weights) as one:
        got = _run(adapted, guidance)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert [r.timestep for r in one.records] == pytest.approx([r.timestep for r in two.records])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_linear_schedule_follows_progress_one_minus_sigma(flow_pipes, family):
    """SD3 hands its transformer t = sigma * 1000, FLUX t / 1000 = sigma: both must read as
    progress u = 1 - sigma, and the records hold the scheduler's own timesteps."""
    adapted, _ = flow_pipes[family]
    pipe = _with_scheduler(adapted, "euler")
    with realigned(pipe, lam="linear:0,2") as denoiser:
        _run(pipe, 3.0, steps=5)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:-1]]
    assert len(set(sigmas)) == 5 and min(sigmas) < 0.5  # a schedule that spans the axis
    assert [r.lam for r in denoiser.records] == pytest.approx([2.0 * (1.0 - s) for s in sigmas], abs=1e-5)
    assert [r.timestep for r in denoiser.records] == pytest.approx(pipe.scheduler.timesteps.tolist(), abs=1e-3)
    # An explicit scale is taken as given.
    with realigned(pipe, lam="linear:0,2", timestep_scale=1.0) as denoiser:
        _run(pipe, 3.0, steps=5)
    scale = 1000.0 if family == "flux" else 1.0
    assert [r.timestep * scale for r in denoiser.records] == pytest.approx(pipe.scheduler.timesteps.tolist(), abs=1e-3)


def test_positional_transformer_call_reads_the_timestep_by_name(flow_pipes):
    """SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections,
    timestep): the second positional argument is not the timestep."""
    adapted, _ = flow_pipes["sd3"]
    gen = torch.Generator().manual_seed(0)
    x, ehs, pooled = torch.randn(2, 16, 16, 16, generator=gen), torch.randn(2, 5, 64, generator=gen), torch.randn(2, 64)
    t = torch.tensor([250.0, 250.0])
    denoiser = RealignedDenoiser(adapted.transformer, lam="linear:0,2")
    by_position = denoiser(x, ehs, pooled, t, return_dict=False)[0]
    by_name = denoiser(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                       return_dict=False)[0]
    assert [r.timestep for r in denoiser.records] == [250.0, 250.0]
    assert denoiser.records[0].lam == pytest.approx(1.5)
    assert torch.equal(by_position, by_name)


def test_mixed_batch_does_not_double_flux_position_ids(flow_pipes):
    """txt_ids/img_ids are (L, 3) without a batch dim: a batch of L rows must leave them alone."""
    adapted, _ = flow_pipes["flux"]
    n = 4
    gen = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(n, n, 64, generator=gen), "encoder_hidden_states": torch.randn(n, n, 64, generator=gen),
        "pooled_projections": torch.randn(n, 32, generator=gen), "timestep": torch.full((n,), 0.6),
        "guidance": torch.full((n,), 3.5), "txt_ids": torch.zeros(n, 3), "img_ids": torch.rand(n, 3, generator=gen),
        "joint_attention_kwargs": {}, "return_dict": False,
    }
    _, doubled = _repeat_call((), kwargs, n, 2, None)
    assert doubled["txt_ids"] is kwargs["txt_ids"] and doubled["img_ids"] is kwargs["img_ids"]
    assert doubled["hidden_states"].shape[0] == doubled["guidance"].shape[0] == 2 * n
    two = RealignedDenoiser(adapted.transformer, lam=1.5)(**kwargs)[0]
    one = RealignedDenoiser(adapted.transformer, lam=1.5, mode="mixed_batch")(**kwargs)[0]
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)


def test_records_guidance_scale_by_pipeline(flow_pipes):
    assert records_guidance_scale(flow_pipes["sd3"][0], 4.0) == 4.0
    assert records_guidance_scale(flow_pipes["flux"][0], 4.0) == 1.0


# -- the SDE sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("family,guidance", [("sd3", 3.0), ("flux", 3.5)])
def test_sde_at_noise_level_0_is_the_euler_ode_bit_for_bit(flow_pipes, family, guidance):
    _, base = flow_pipes[family]
    euler, sde = _with_scheduler(base, "euler"), _with_scheduler(base, "sde", noise_level=0.0)
    assert torch.equal(_run(sde, guidance), _run(euler, guidance))
    noisy = _with_scheduler(base, "sde", noise_level=0.7)
    assert (_run(noisy, guidance) - _run(euler, guidance)).abs().max() > 1e-2


def _reference_step(sched, v, t, x, noise, noise_level):
    """The SDE step written as its drift (module docstring), in float64, with Flow-GRPO's
    conventions: g^2 = noise_level^2 s / (1 - s), 1 - sigmas[1] in place of 1 - s at s = 1."""
    i = int((sched.timesteps == t).nonzero()[0])
    s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    dt = s_next - s
    g2 = noise_level**2 * s / (1.0 - (float(sched.sigmas[1]) if s == 1.0 else s))
    x, v = x.double(), v.double()
    eps_hat = x + (1.0 - s) * v
    mean = x + dt * (v + g2 / (2.0 * s) * eps_hat)
    std = math.sqrt(g2 * -dt)
    return mean + std * noise.double(), mean, std


def test_sde_step_matches_its_drift_form_and_its_log_prob_matches_a_normal():
    sched = FlowMatchSDEScheduler(shift=3.0, noise_level=0.7)
    sched.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    for t in sched.timesteps:
        sched._step_index = None
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        out = sched.step(v, t, x, generator=torch.Generator().manual_seed(1))
        want_prev, want_mean, want_std = _reference_step(sched, v, t, x, noise, 0.7)
        torch.testing.assert_close(out.prev_sample.double(), want_prev, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.prev_sample_mean.double(), want_mean, rtol=1e-5, atol=1e-5)
        assert out.std == pytest.approx(want_std, rel=1e-9)
        # The exact density, summed over dimensions (Flow-GRPO reports the mean over them).
        lp = sched.step_log_prob(v, t, x, out.prev_sample)
        normal = torch.distributions.Normal(want_mean, want_std)
        torch.testing.assert_close(lp.double(), normal.log_prob(out.prev_sample.double()).flatten(1).sum(1),
                                   rtol=1e-5, atol=1e-3)


def test_step_kl_and_per_row_timesteps_match_torch_distributions():
    sched = FlowMatchSDEScheduler(shift=3.0, noise_level=0.5)
    sched.set_timesteps(5)
    gen = torch.Generator().manual_seed(2)
    x, v1, v2 = (torch.randn(4, 3, 8, generator=gen) for _ in range(3))
    rows = sched.timesteps[[0, 1, 3, 4]]  # a replay batch: every row from its own step
    kl = sched.step_kl(v1, v2, rows, x)
    mean1, std = sched.step_distribution(v1, rows, x)
    for i, t in enumerate(rows):
        k = sched.step_coefficients(float(t))
        m1 = k.a * x[i].double() + k.c * v1[i].double()
        m2 = k.a * x[i].double() + k.c * v2[i].double()
        torch.testing.assert_close(mean1[i].double(), m1, rtol=1e-5, atol=1e-5)
        assert float(std[i]) == pytest.approx(k.std, rel=1e-6)
        want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, k.std),
                                                 torch.distributions.Normal(m2, k.std)).sum()
        assert float(kl[i]) == pytest.approx(float(want), rel=1e-4)
    y = torch.randn(4, 3, 8, generator=gen)
    want = torch.distributions.Normal(mean1.double(), std.double()).log_prob(y.double()).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(y, mean1, std).double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_log_prob(y, mean1, 0.0)


def test_sde_keeps_the_flow_marginals_on_a_gaussian():
    """x_0 ~ N(m, s0^2), exact velocity: the SDE and the ODE both land on N(m, s0^2)."""
    m, s0, n = 1.5, 0.5, 40000

    def velocity(x, s):  # E[eps - x_0 | x_s] for x_s = (1 - s) x_0 + s eps
        var = (1 - s) ** 2 * s0**2 + s**2
        centered = x - (1 - s) * m
        return s / var * centered - (m + (1 - s) * s0**2 / var * centered)

    for noise_level in (0.0, 0.7):
        sched = FlowMatchSDEScheduler(noise_level=noise_level)
        sched.set_timesteps(200)
        sched.generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
        for t in sched.timesteps:
            s = float(sched.sigmas[sched.step_index or 0])
            x = sched.step(velocity(x.double(), s).float(), t, x).prev_sample
        assert float(x.mean()) == pytest.approx(m, abs=0.02), noise_level
        assert float(x.std()) == pytest.approx(s0, rel=0.05), noise_level


@pytest.mark.parametrize("family,guidance", [("sd3", 3.0), ("flux", 3.5)])
def test_path_kl_under_the_sde_is_the_sum_of_per_step_kls(flow_pipes, family, guidance):
    """path_kl from the records == sum over steps of ||mu_lam - mu_ref||^2 / (2 std^2), the means
    taken from the real scheduler stepping the two (guided) outputs with the same noise."""
    adapted, _ = flow_pipes[family]
    pipe = _with_scheduler(adapted, "sde")
    lam = 1.5
    with realigned(pipe, lam=lam) as denoiser:
        latents = _run(pipe, guidance)
    g = records_guidance_scale(pipe, guidance)
    got = path_kl(denoiser.records, pipe.scheduler, guidance_scale=g)
    assert got is not None and got.shape == (len(PROMPTS),) and (got > 0).all()

    expected = torch.zeros(len(PROMPTS))
    x = torch.zeros(len(PROMPTS), *latents.shape[1:])
    for rec in denoiser.records:
        delta = rec.delta
        if g > 1:
            uncond, cond = delta.chunk(2)
            delta = uncond + g * (cond - uncond)
        steps = []
        for out in (lam * delta, torch.zeros_like(delta)):
            sched = copy.deepcopy(pipe.scheduler)
            sched._step_index = None  # start at this record's step (FLUX sets a begin index of 0)
            sched.set_begin_index(int(torch.argmin((sched.timesteps - rec.timestep).abs())))
            steps.append(sched.step(out, rec.timestep, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        std = pipe.scheduler.step_coefficients(rec.timestep).std
        expected += (steps[0] - steps[1]).flatten(1).pow(2).sum(1) / (2 * std**2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    # lam = 0 costs nothing; the noiseless sampler has no path KL.
    with realigned(pipe, lam=0.0) as denoiser:
        _run(pipe, guidance)
    assert torch.equal(path_kl(denoiser.records, pipe.scheduler, guidance_scale=g), torch.zeros(len(PROMPTS)))
    ode = _with_scheduler(adapted, "sde", noise_level=0.0)
    with realigned(ode, lam=lam) as denoiser:
        _run(ode, guidance)
    assert path_kl(denoiser.records, ode.scheduler, guidance_scale=g) is None


def test_path_kl_is_none_under_the_euler_ode(flow_pipes):
    """No step distribution, no path KL (this used to fail on a missing alphas_cumprod)."""
    adapted, _ = flow_pipes["sd3"]
    pipe = _with_scheduler(adapted, "euler")
    with realigned(pipe, lam=1.0) as denoiser:
        _run(pipe, 1.0, steps=2)
    assert step_mean_coefficient(pipe.scheduler, denoiser.records[0].timestep) == (pytest.approx(math.nan, nan_ok=True), None)
    assert path_kl(denoiser.records, pipe.scheduler) is None


def test_sde_scheduler_config_round_trip_and_refusals(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    parent = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters)
    ours = set(inspect.signature(FlowMatchSDEScheduler.__init__).parameters)
    assert parent <= ours, f"diffusers added scheduler options to re-declare: {sorted(parent - ours)}"
    sched = FlowMatchSDEScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, noise_level=0.4)
    assert sched.config.noise_level == 0.4 and sched.config.shift == 3.0
    sched.save_config(tmp_path)
    assert FlowMatchSDEScheduler.from_pretrained(tmp_path).config.noise_level == 0.4
    for bad in (-0.1, float("nan")):
        with pytest.raises(UserError, match="noise_level"):
            FlowMatchSDEScheduler(noise_level=bad)
    with pytest.raises(UserError, match="stochastic_sampling"):
        FlowMatchSDEScheduler(stochastic_sampling=True)
    with pytest.raises(UserError, match="timestep_scale"):
        RealignedDenoiser(torch.nn.Linear(1, 1), reference=torch.nn.Linear(1, 1), timestep_scale=0.0)


def test_flux_true_cfg_path_kl_counts_each_step_once_with_the_guided_prediction(flow_pipes):
    """FluxPipeline's true CFG (true_cfg_scale > 1 with a negative prompt) calls the transformer
    twice per step, cond then uncond. The path KL is one term per step, of the guided velocity:
    sum_t ||c_t (v_mix - v_ref)||^2 / (2 std_t^2), v = v_u + g (v_c - v_u) for each of the two
    models, computed here directly from the transformer calls the pipeline made."""
    from deradiff.models import adapters_disabled

    adapted, _ = flow_pipes["flux"]
    pipe = _with_scheduler(adapted, "sde")
    lam, true_cfg, steps = 1.5, 3.0, 4
    calls = []
    with realigned(pipe, lam=lam) as denoiser:
        hook = denoiser.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs), with_kwargs=True)
        pipe.scheduler.generator = torch.Generator().manual_seed(SDE_SEED)
        pipe(PROMPTS, negative_prompt=["blurry", "dark"], true_cfg_scale=true_cfg, num_inference_steps=steps,
             guidance_scale=3.5, height=32, width=32, output_type="latent", max_sequence_length=MAX_SEQUENCE_LENGTH,
             generator=torch.Generator().manual_seed(0))
        hook.remove()
    assert len(calls) == len(denoiser.records) == 2 * steps
    g = records_guidance_scale(pipe, 3.5, true_cfg_scale=true_cfg)
    assert g == true_cfg and records_guidance_scale(pipe, 3.5) == 1.0
    got = path_kl(denoiser.records, pipe.scheduler, guidance_scale=g)

    expected = torch.zeros(len(PROMPTS))
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            (cond, uncond) = calls[2 * i:2 * i + 2]
            with adapters_disabled(adapted.transformer):
                ref = [adapted.transformer(**kw)[0] for kw in (cond, uncond)]
            aligned = [adapted.transformer(**kw)[0] for kw in (cond, uncond)]
            mixed = [(1 - lam) * r + lam * a for r, a in zip(ref, aligned, strict=True)]
            v_ref = ref[1] + true_cfg * (ref[0] - ref[1])
            v_mix = mixed[1] + true_cfg * (mixed[0] - mixed[1])
            k = pipe.scheduler.step_coefficients(float(t))
            expected += (k.c * (v_mix - v_ref)).flatten(1).pow(2).sum(1) / (2 * k.std**2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="true_cfg_scale"):  # two calls per step, no scale: refused
        path_kl(denoiser.records, pipe.scheduler, guidance_scale=1.0)
