"""The realigned denoiser inside stock diffusers pipelines: exactness, modes, schedules, path KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import add_random_lora, build_tiny_sd15

from deradiff.errors import UserError
from deradiff.models import add_lora, set_lora_scale, set_scheduler
from deradiff.realign import (
    LambdaSchedule,
    RealignedDenoiser,
    emulated_beta,
    parse_lambda,
    path_kl,
    realigned,
    step_mean_coefficient,
)

PROMPTS = ["a red circle on a dark background", "a blue square"]
SCHEDULERS = ["ddim", "ddpm", "euler", "euler_a", "dpmpp", "unipc", "pndm", "lms"]


def _run(pipe, guidance=3.0, steps=4, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                output_type="np", generator=gen, **kw).images


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_lambda_0_and_1_are_bit_exact_for_every_scheduler(tiny_sd15, scheduler, guidance):
    adapted, base = tiny_sd15
    set_scheduler(adapted, scheduler)
    set_scheduler(base, scheduler)
    expected_base, expected_aligned = _run(base, guidance), _run(adapted, guidance)
    assert np.abs(expected_base - expected_aligned).max() > 1e-3, "LoRA too weak for the test to mean anything"
    with realigned(adapted, lam=0.0):
        got_base = _run(adapted, guidance)
    with realigned(adapted, lam=1.0):
        got_aligned = _run(adapted, guidance)
    np.testing.assert_array_equal(got_base, expected_base)
    np.testing.assert_array_equal(got_aligned, expected_aligned)


def test_sdxl_pipeline_lambda_0_and_1_exact_and_proxies_add_embedding(tiny_sdxl):
    adapted, base = tiny_sdxl
    with realigned(adapted, lam=0.0) as denoiser:
        # SDXL pipelines read this attribute of their unet: it must pass through.
        assert denoiser.add_embedding.linear_1.in_features == 80
        got_base = _run(adapted, steps=3)
    with realigned(adapted, lam=1.0):
        got_aligned = _run(adapted, steps=3)
    np.testing.assert_array_equal(got_base, _run(base, steps=3))
    np.testing.assert_array_equal(got_aligned, _run(adapted, steps=3))
    with realigned(adapted, lam=0.5, mode="mixed_batch"):
        mixed = _run(adapted, steps=3)
    with realigned(adapted, lam=0.5):
        two = _run(adapted, steps=3)
    np.testing.assert_allclose(mixed, two, atol=1e-5)


@pytest.mark.parametrize("stack_weights", [True, False])  # the stacked (CPU default) and sliced routes
@pytest.mark.parametrize("lam", [0.5, 2.0, "cosine:0,2"])
def test_mixed_batch_equals_two_forward(tiny_sd15, lam, stack_weights):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    with realigned(adapted, lam=lam, mode="two_forward"):
        two = _run(adapted)
    with realigned(adapted, lam=lam, mode="mixed_batch", stack_weights=stack_weights):
        one = _run(adapted)
    # Not bit-exact: the doubled batch may pick other CPU kernels (~1e-6 per forward).
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_denoiser_output_is_the_mix_and_commutes_with_guidance(tiny_sd15):
    adapted, base = tiny_sd15
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 16, 16, generator=gen)
    ehs = torch.randn(4, 16, 32, generator=gen)
    t = torch.tensor(500)
    ref = base.unet(x, t, encoder_hidden_states=ehs).sample
    aligned = adapted.unet(x, t, encoder_hidden_states=ehs).sample
    lam, g = 1.7, 4.0
    denoiser = RealignedDenoiser(adapted.unet, lam=lam)
    out = denoiser(x, t, encoder_hidden_states=ehs)
    assert type(out).__name__ == "UNet2DConditionOutput"
    torch.testing.assert_close(out.sample, (1 - lam) * ref + lam * aligned, rtol=0, atol=1e-6)
    as_tuple = denoiser(x, t, encoder_hidden_states=ehs, return_dict=False)
    assert isinstance(as_tuple, tuple)

    def guide(e):
        uncond, cond = e.chunk(2)
        return uncond + g * (cond - uncond)

    # Guiding the mixed output == mixing the two guided outputs (CFG is linear).
    torch.testing.assert_close(guide(out.sample), (1 - lam) * guide(ref) + lam * guide(aligned), atol=1e-5, rtol=0)


def test_two_model_mode_matches_lora_mode(tiny_sd15):
    """A second full model (merged LoRA) as aligned, the base as reference: same mix."""
    import copy

    adapted, base = tiny_sd15
    merged = copy.deepcopy(adapted.unet)
    merged.fuse_lora() if hasattr(merged, "fuse_lora") else None
    merged = merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else merged
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    lora_mode = RealignedDenoiser(adapted.unet, lam=2.0)(x, 300, encoder_hidden_states=ehs).sample
    two_model = RealignedDenoiser(merged, lam=2.0, reference=base.unet)(x, 300, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(lora_mode, two_model, atol=1e-4, rtol=1e-4)


def test_schedule_values_hit_the_pipeline_timesteps(tiny_sd15):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    schedule = parse_lambda("linear:0,2")
    with realigned(adapted, lam=schedule) as denoiser:
        _run(adapted, steps=5)
    timesteps = [int(t) for t in adapted.scheduler.timesteps]
    assert [r.timestep for r in denoiser.records] == timesteps
    for rec in denoiser.records:
        assert rec.lam == pytest.approx(2.0 * (1 - rec.timestep / 1000))
    step = parse_lambda("step:1,3@500")
    assert step(999) == 1 and step(500) == 1 and step(499) == 3
    cosine = parse_lambda("cosine:0,2")
    assert cosine(1000) == pytest.approx(0) and cosine(500) == pytest.approx(1) and cosine(0) == pytest.approx(2)
    assert str(parse_lambda("step:1,3@500")) == "step:1,3@500"


def test_output_mixing_is_not_lora_scaling(tiny_sd15):
    """The weight-space knob (LoRA scale = lam) is a different model: measure how different."""
    adapted, base = tiny_sd15
    set_scheduler(adapted, "ddim")
    set_scheduler(base, "ddim")
    ref, full = _run(base), _run(adapted)
    with realigned(adapted, lam=0.5):
        mixed = _run(adapted)
    set_lora_scale(adapted.unet, 0.5)
    try:
        scaled = _run(adapted)
    finally:
        set_lora_scale(adapted.unet, 1.0)
    np.testing.assert_array_equal(_run(adapted), full)  # scale restored
    gap = np.abs(mixed - scaled).mean() / np.abs(full - ref).mean()
    print(f"output mix vs LoRA scale at lam=0.5: gap = {gap:.1%} of the base-to-aligned difference")
    assert gap > 0.01


@pytest.mark.parametrize("scheduler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.3)])
def test_path_kl_matches_two_scheduler_steps_with_shared_noise(tiny_sd15, scheduler, eta):
    """KL from the records == sum_t lam^2 ||mu_aligned - mu_ref||^2 / (2 sigma_t^2), where the
    means come from the real scheduler stepping each guided output with the same noise."""
    import copy

    adapted, _ = tiny_sd15
    set_scheduler(adapted, scheduler)
    lam, g = 1.5, 2.0
    kwargs = {"eta": eta} if scheduler == "ddim" else {}
    with realigned(adapted, lam=lam) as denoiser:
        _run(adapted, guidance=g, steps=6, **kwargs)
    got = path_kl(denoiser.records, adapted.scheduler, guidance_scale=g, eta=eta)
    assert got is not None and got.shape == (len(PROMPTS),)

    expected = torch.zeros(len(PROMPTS))
    x = torch.zeros(len(PROMPTS), 4, 16, 16)
    for rec in denoiser.records:
        uncond, cond = rec.delta.chunk(2)
        delta = lam * (uncond + g * (cond - uncond))
        steps = []
        for out in (delta, torch.zeros_like(delta)):
            sched = copy.deepcopy(adapted.scheduler)
            steps.append(sched.step(out, int(rec.timestep), x, generator=torch.Generator().manual_seed(0),
                                    **kwargs).prev_sample)
        _, sigma = step_mean_coefficient(adapted.scheduler, rec.timestep, eta)
        if sigma > 0:
            expected += (steps[0] - steps[1]).flatten(1).pow(2).sum(1) / (2 * sigma**2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (got > 0).all()


def test_path_kl_is_zero_at_lambda_0_scales_as_lambda_squared_and_none_when_deterministic(tiny_sd15):
    from dataclasses import replace

    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddpm")
    with realigned(adapted, lam=0.0) as denoiser:
        _run(adapted, guidance=1.0)
    assert torch.equal(path_kl(denoiser.records, adapted.scheduler), torch.zeros(len(PROMPTS)))
    with realigned(adapted, lam=1.0) as denoiser:
        _run(adapted, guidance=1.0)
    at_one = path_kl(denoiser.records, adapted.scheduler)
    # Same per-step deltas, lam doubled: the emulated KL is 4x (KL_path ~ lam^2).
    doubled = [replace(r, lam=2.0) for r in denoiser.records]
    torch.testing.assert_close(path_kl(doubled, adapted.scheduler), 4 * at_one)
    set_scheduler(adapted, "ddim")
    with realigned(adapted, lam=1.0) as denoiser:
        _run(adapted, guidance=1.0)
    assert path_kl(denoiser.records, adapted.scheduler, eta=0.0) is None
    assert path_kl(denoiser.records, adapted.scheduler, eta=1.0) is not None


def test_context_manager_restores_the_pipeline(tiny_sd15, tmp_path):
    adapted, _ = tiny_sd15
    original = adapted.unet
    with pytest.raises(RuntimeError):
        with realigned(adapted, lam=2.0):
            assert isinstance(adapted.unet, RealignedDenoiser)
            raise RuntimeError("boom")
    assert adapted.unet is original
    adapted.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "unet").is_dir()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "wiggle:0,1", "linear:0", "abc"])
def test_bad_lambda_is_a_clear_error(bad):
    with pytest.raises(UserError, match="lambda"):
        parse_lambda(bad)


def test_bad_inputs_are_clear_errors(tiny_sd15):
    adapted, base = tiny_sd15
    with pytest.raises(UserError, match="no LoRA adapter"):
        RealignedDenoiser(base.unet, lam=1.0)
    with pytest.raises(UserError, match="mixed_batch"):
        RealignedDenoiser(adapted.unet, lam=1.0, reference=base.unet, mode="mixed_batch")
    with pytest.raises(UserError, match="mode"):
        RealignedDenoiser(adapted.unet, lam=1.0, mode="three_forward")

    class NoDenoiser:
        text_encoder = torch.nn.Linear(1, 1)

    with pytest.raises(UserError, match="no `unet` or `transformer`"):
        with realigned(NoDenoiser(), lam=1.0):
            pass
    assert LambdaSchedule("constant", 2.0, 2.0)(123) == 2.0
    assert math.isfinite(parse_lambda("1e3")(0))


# -- several active adapters -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapter_unet(tmp_path_factory):
    """A tiny SD1.5 UNet with two random LoRA adapters, "default" and "second", both active."""
    unet = build_tiny_sd15(tmp_path_factory.mktemp("two_adapters")).unet
    add_random_lora(unet, seed=1)
    add_lora(unet, rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
             adapter_name="second")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B.second" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    unet.set_adapters(["default", "second"])
    return unet


def _unet_inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, 16, 32, generator=gen)


def test_two_forward_uses_every_active_adapter(two_adapter_unet):
    unet = two_adapter_unet
    x, ehs = _unet_inputs()
    both = unet(x, 400, encoder_hidden_states=ehs).sample
    unet.set_adapters(["default"])
    try:
        first_only = unet(x, 400, encoder_hidden_states=ehs).sample
    finally:
        unet.set_adapters(["default", "second"])
    assert (both - first_only).abs().max() > 1e-3, "second adapter too weak for the test to mean anything"
    got = RealignedDenoiser(unet, lam=1.0, mode="two_forward")(x, 400, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(got, both, rtol=0, atol=0)


def test_mixed_batch_refuses_several_active_adapters(two_adapter_unet):
    """peft routes one adapter name per batch row, so "both adapters on these rows" cannot be said:
    mixed_batch must refuse instead of silently using the first adapter only."""
    x, ehs = _unet_inputs()
    with pytest.raises(UserError, match=r"default, second.*two_forward") as info:
        RealignedDenoiser(two_adapter_unet, lam=1.0, mode="mixed_batch")(x, 400, encoder_hidden_states=ehs)
    assert "\n" not in str(info.value)


def test_mixed_batch_with_one_of_two_adapters_active_uses_it(two_adapter_unet):
    unet = two_adapter_unet
    x, ehs = _unet_inputs()
    unet.set_adapters(["second"])
    try:
        expected = unet(x, 400, encoder_hidden_states=ehs).sample
        got = RealignedDenoiser(unet, lam=1.0, mode="mixed_batch")(x, 400, encoder_hidden_states=ehs).sample
    finally:
        unet.set_adapters(["default", "second"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- the time axis of lambda schedules ---------------------------------------------------------


def _pipe_with(pipe, scheduler):
    """The same modules with another scheduler (the session fixture stays untouched)."""
    return type(pipe)(**{**pipe.components, "scheduler": scheduler})


def test_schedule_reads_num_train_timesteps_from_the_pipeline_scheduler(tiny_sd15):
    from diffusers import DDIMScheduler

    adapted, _ = tiny_sd15
    sched = DDIMScheduler(num_train_timesteps=500, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = _pipe_with(adapted, sched)
    with realigned(pipe, lam="linear:0,2") as denoiser:
        _run(pipe, steps=5)
    assert denoiser.num_train_timesteps == 500
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    assert [r.timestep for r in denoiser.records] == timesteps and max(timesteps) > 250
    for rec in denoiser.records:
        assert rec.lam == pytest.approx(2.0 * (1 - rec.timestep / 500))
    # An explicit value wins; without one (and no scheduler) the axis is 1000 steps.
    assert RealignedDenoiser(adapted.unet, lam="linear:0,2", num_train_timesteps=250).lam_at(125) == 1.0
    assert RealignedDenoiser(adapted.unet, lam="linear:0,2").lam_at(500) == 1.0
    with pytest.raises(UserError, match="num_train_timesteps"):
        RealignedDenoiser(adapted.unet, num_train_timesteps=0)


def test_flow_matching_timesteps_map_to_progress_one_minus_sigma(tiny_sd15):
    """FlowMatchEulerDiscreteScheduler hands the denoiser t = sigma * num_train_timesteps: the
    schedule's progress must be u = 1 - sigma, whatever num_train_timesteps and shift are."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapted, _ = tiny_sd15
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0)
    sched.set_timesteps(5)
    pipe = _pipe_with(adapted, sched)
    x, ehs = _unet_inputs(batch=1)
    with realigned(pipe, lam="linear:0,2") as denoiser:
        for t in sched.timesteps:
            pipe.unet(x, t, encoder_hidden_states=ehs)
    got = [r.lam for r in denoiser.records]
    expected = [2.0 * (1.0 - float(s)) for s in sched.sigmas[:-1]]
    assert got == pytest.approx(expected, abs=1e-5)


# -- lambda policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), "nan", float("inf")])
def test_non_finite_constant_lambda_says_lambda_not_schedule_start(bad):
    with pytest.raises(UserError, match=r"^lambda must be a finite number, got (nan|inf)$"):
        parse_lambda(bad)
    with pytest.raises(UserError, match="lambda schedule start must be a finite number"):
        parse_lambda("linear:nan,1")


def test_emulated_beta_is_beta0_over_lambda_and_refuses_nonpositive_lambda():
    assert emulated_beta(0.1, 2.0) == pytest.approx(0.05)
    assert emulated_beta(0.1, 0.5) == pytest.approx(0.2)
    for lam in (0.0, -1.0):
        with pytest.raises(UserError, match="lambda <= 0 has no KL strength"):
            emulated_beta(0.1, lam)
    for lam in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="lambda"):
            emulated_beta(0.1, lam)
    with pytest.raises(UserError, match="beta0"):
        emulated_beta(0.0, 1.0)
