"""Multi-objective realignment: LoRA adapters mixed with a lambda vector (docs/method.md section 2,
"Several rewards"). Exact corners, both modes, the scalar API unchanged, path KL, parsing, errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd15

from deradiff.errors import UserError
from deradiff.models import adapters_disabled, add_lora, set_scheduler
from deradiff.realign import (
    LambdaSchedule,
    LambdaVector,
    RealignedDenoiser,
    mix_outputs,
    parse_lambda_vector,
    path_kl,
    realigned,
    step_mean_coefficient,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest

PROMPTS = ["a red circle on a dark background", "a blue square"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
ADAPTERS = ("color", "contrast")


def _add_random_adapter(unet, name: str, seed: int, strength: float = 0.3) -> None:
    add_lora(unet, rank=4, target_modules=TARGETS, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in unet.named_parameters():
            if f"lora_B.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * strength)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny SD1.5 pipeline with two random LoRA adapters, "color" and "contrast", both active
    (the user's state, which every realigned call must leave as it found it)."""
    pipe = build_tiny_sd15(tmp_path_factory.mktemp("multi"))
    for seed, name in enumerate(ADAPTERS, start=1):
        _add_random_adapter(pipe.unet, name, seed)
    pipe.unet.set_adapters(list(ADAPTERS))
    return pipe


def _run(pipe, guidance=3.0, steps=3, **kw):
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                output_type="np", generator=gen, **kw).images


def _only(pipe, names, **kw):
    """The stock pipeline with only `names` active (none: every adapter disabled)."""
    if not names:
        with adapters_disabled(pipe.unet):
            return _run(pipe, **kw)
    pipe.unet.set_adapters(list(names))
    try:
        return _run(pipe, **kw)
    finally:
        pipe.unet.set_adapters(list(ADAPTERS))


def _layer_state(unet):
    from deradiff.models import tuner_layers

    return [(list(m.active_adapters), m._disable_adapters) for m in tuner_layers(unet)]


def _inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, 16, 32, generator=gen)


# -- corners and modes ---------------------------------------------------------------------------


def test_corners_are_bit_exact_in_two_forward_and_close_in_mixed_batch(pipe):
    set_scheduler(pipe, "ddim")
    base, color, contrast = _only(pipe, []), _only(pipe, ["color"]), _only(pipe, ["contrast"])
    assert np.abs(color - contrast).max() > 1e-3 and np.abs(color - base).max() > 1e-3, "adapters too weak"
    before = _layer_state(pipe.unet)
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    corners = [({"color": 1, "contrast": 0}, color), ({"color": 0, "contrast": 1}, contrast),
               ({"color": 0, "contrast": 0}, base)]
    for lam, expected in corners:
        with realigned(pipe, lam=lam):
            np.testing.assert_array_equal(_run(pipe), expected)
        with realigned(pipe, lam=lam, mode="mixed_batch"):
            np.testing.assert_allclose(_run(pipe), expected, atol=1e-5, rtol=0)
    assert _layer_state(pipe.unet) == before  # the user's active adapters, both on, restored
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads  # no set_adapter side effects


@pytest.mark.parametrize("stack_weights", [True, False])  # the stacked (CPU default) and sliced routes
def test_two_forward_and_mixed_batch_agree(pipe, stack_weights):
    set_scheduler(pipe, "ddpm")
    for lam in ({"color": 1.5, "contrast": 0.5}, "color=cosine:0,2,contrast=-0.5"):
        with realigned(pipe, lam=lam, mode="two_forward") as two:
            images_two = _run(pipe)
        with realigned(pipe, lam=lam, mode="mixed_batch", stack_weights=stack_weights) as one:
            images_one = _run(pipe)
        np.testing.assert_allclose(images_one, images_two, atol=1e-5, rtol=0)
        for a, b in zip(one.records, two.records, strict=True):
            assert a.lams == b.lams and a.lam == b.lam == 1.0
            torch.testing.assert_close(a.delta, b.delta, atol=1e-5, rtol=0)


def test_denoiser_output_is_the_vector_mix_of_single_adapter_outputs(pipe):
    unet = pipe.unet
    x, ehs = _inputs()
    with adapters_disabled(unet):
        ref = unet(x, 400, encoder_hidden_states=ehs).sample
    outs = {}
    for name in ADAPTERS:
        unet.set_adapters([name])
        outs[name] = unet(x, 400, encoder_hidden_states=ehs).sample
    unet.set_adapters(list(ADAPTERS))
    lams = {"color": 1.5, "contrast": 0.5}
    got = RealignedDenoiser(unet, lam=lams)(x, 400, encoder_hidden_states=ehs).sample
    expected = ref + sum(lam * (outs[n] - ref) for n, lam in lams.items())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, mix_outputs(ref, outs, lams), atol=0, rtol=0)


def test_mix_form_is_exact_at_the_corners_where_the_difference_form_is_not():
    gen = torch.Generator().manual_seed(0)
    ref, a, b = (torch.randn(4096, generator=gen) for _ in range(3))
    outs = {"a": a, "b": b}
    assert torch.equal(mix_outputs(ref, outs, {"a": 1.0, "b": 0.0}), a)
    assert torch.equal(mix_outputs(ref, outs, {"a": 0.0, "b": 0.0}), ref)
    assert torch.equal(mix_outputs(ref, {"a": a}, {"a": 1.0, "b": 0.0}), a)  # skipped zero adapter
    assert torch.equal(mix_outputs(ref, outs, {"a": 0.5, "b": 0.5}), 0.5 * a + 0.5 * b)
    difference_form = ref + 1.0 * (a - ref) + 0.0 * (b - ref)
    assert not torch.equal(difference_form, a)  # why mix_outputs is written as it is


def test_one_adapter_vector_equals_the_scalar_api_and_zero_lambdas_cost_no_forward(pipe):
    """{"color": lam} is the scalar mix with "color" active, bit for bit; adapters at lambda 0
    are not evaluated (two forwards per call, not three)."""
    unet = pipe.unet
    x, ehs = _inputs()
    unet.set_adapters(["color"])
    try:
        scalar = RealignedDenoiser(unet, lam=1.7)(x, 400, encoder_hidden_states=ehs).sample
    finally:
        unet.set_adapters(list(ADAPTERS))
    calls = []
    handle = unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        vector = RealignedDenoiser(unet, lam={"color": 1.7, "contrast": 0})(x, 400, encoder_hidden_states=ehs).sample
    finally:
        handle.remove()
    assert torch.equal(vector, scalar) and len(calls) == 2


def test_named_adapters_loaded_from_saved_loras(pipe, tmp_path):
    """The intended workflow: each LoRA saved on its own, loaded by name into a fresh pipeline."""
    from deradiff.models import load_lora, save_lora

    set_scheduler(pipe, "ddim")
    fresh = build_tiny_sd15(tmp_path)
    for name in ADAPTERS:
        save_lora(pipe, tmp_path / name, adapter_name=name)
        load_lora(fresh, tmp_path / name, adapter_name=name)
    set_scheduler(fresh, "ddim")
    with realigned(fresh, lam="color=1,contrast=0"):
        got = _run(fresh)
    np.testing.assert_array_equal(got, _only(pipe, ["color"]))


# -- path KL -------------------------------------------------------------------------------------


def test_path_kl_of_a_vector_matches_scheduler_steps_of_the_mixed_and_reference_outputs(pipe):
    """Direct: at every recorded call, the guided reference and single-adapter outputs from the
    plain UNet, mixed by hand, stepped by the real scheduler with shared noise; KL = sum_t
    ||mu_mix - mu_ref||^2 / (2 sigma_t^2)."""
    set_scheduler(pipe, "ddpm")
    lams, g = {"color": 1.5, "contrast": 0.5}, 2.0
    calls = []
    with realigned(pipe, lam=lams) as denoiser:
        handle = denoiser.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)),
                                                    with_kwargs=True)
        _run(pipe, guidance=g, steps=4)
        handle.remove()
    got = path_kl(denoiser.records, pipe.scheduler, guidance_scale=g)
    assert got is not None and got.shape == (len(PROMPTS),) and (got > 0).all()
    assert all(r.lam == 1.0 and r.lams == lams for r in denoiser.records)

    def guided(args, kwargs, names):
        if names:
            pipe.unet.set_adapters(names)
            out = pipe.unet(*args, **kwargs)[0]
            pipe.unet.set_adapters(list(ADAPTERS))
        else:
            with adapters_disabled(pipe.unet):
                out = pipe.unet(*args, **kwargs)[0]
        uncond, cond = out.chunk(2)
        return uncond + g * (cond - uncond)

    expected = torch.zeros(len(PROMPTS))
    x = torch.zeros(len(PROMPTS), 4, 16, 16)
    with torch.no_grad():
        for (args, kwargs), rec in zip(calls, denoiser.records, strict=True):
            ref = guided(args, kwargs, [])
            mixed = (1 - sum(lams.values())) * ref + sum(lam * guided(args, kwargs, [n]) for n, lam in lams.items())
            means = [copy.deepcopy(pipe.scheduler).step(out, int(rec.timestep), x,
                                                        generator=torch.Generator().manual_seed(0)).prev_sample
                     for out in (mixed, ref)]
            _, sigma = step_mean_coefficient(pipe.scheduler, rec.timestep)
            if sigma > 0:
                expected += (means[0] - means[1]).flatten(1).pow(2).sum(1) / (2 * sigma**2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_path_kl_is_zero_at_the_zero_vector_and_scalar_records_keep_their_meaning(pipe):
    set_scheduler(pipe, "ddpm")
    with realigned(pipe, lam={"color": 0, "contrast": 0}) as denoiser:
        _run(pipe, guidance=1.0, steps=2)
    assert torch.equal(path_kl(denoiser.records, pipe.scheduler), torch.zeros(len(PROMPTS)))
    pipe.unet.set_adapters(["color"])
    try:
        with realigned(pipe, lam=2.0) as scalar:
            _run(pipe, guidance=1.0, steps=2)
        with realigned(pipe, lam={"color": 2.0}) as vector:
            _run(pipe, guidance=1.0, steps=2)
    finally:
        pipe.unet.set_adapters(list(ADAPTERS))
    assert [r.lam for r in scalar.records] == [2.0, 2.0] and scalar.records[0].lams is None
    torch.testing.assert_close(path_kl(vector.records, pipe.scheduler), path_kl(scalar.records, pipe.scheduler))


# -- the lambda vector as a value ----------------------------------------------------------------


def test_parse_round_trips_and_is_a_canonical_key():
    v = parse_lambda_vector("size=0.5, color=1.5")
    assert str(v) == "color=1.5,size=0.5" and v.names == ("color", "size")
    assert v == parse_lambda_vector({"color": 1.5, "size": "0.5"}) == parse_lambda_vector(v)
    assert hash(v) == hash(parse_lambda_vector("color=1.5,size=0.5"))
    assert v.constants() == {"color": 1.5, "size": 0.5} and v(123) == {"color": 1.5, "size": 0.5}
    for text in ["color=linear:0,2,size=step:1,3@500", "a=cosine:0,2", "color=1.5,size=-0.5", "b.c-d_e=2,x=0"]:
        assert str(parse_lambda_vector(text)) == text
    exact = parse_lambda_vector({"a": 1 / 3, "b": LambdaSchedule("linear", 0.1234567, 2.0)})
    assert parse_lambda_vector(str(exact)) == exact and str(exact).startswith("a=0.3333333333333333,")
    sched = parse_lambda_vector("color=linear:0,2,size=1")
    assert sched.constants() is None and sched["color"] == LambdaSchedule("linear", 0.0, 2.0)
    assert sched(500) == {"color": pytest.approx(1.0), "size": 1.0}


@pytest.mark.parametrize("bad,match", [
    ("", "cannot read lambda vector"), ("1.5", "cannot read lambda vector"),
    ("color=1.5,0.5", "adapter 'color' in a lambda vector: cannot read lambda '1.5,0.5'"),
    ("color=", "adapter 'color' in a lambda vector"),
    ("color=nan", r"adapter 'color' in a lambda vector: lambda must be a finite number"),
    ("color=inf,size=1", "finite"), ("color=wiggle:0,1", "lambda schedule"),
    ("color=1,color=2", "given twice"), ("__base__=1", "reserved|not '__base__'"), ("9lives=1", "adapter name"),
])
def test_bad_vectors_are_one_line_errors(bad, match):
    with pytest.raises(UserError, match=match) as info:
        parse_lambda_vector(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        LambdaVector(())


def test_unknown_adapter_names_the_available_ones_before_any_work(pipe):
    with pytest.raises(UserError, match=r"unknown adapter 'size'.*\['color', 'contrast'\]") as info:
        with realigned(pipe, lam="color=1,size=0.5"):
            pass
    assert "\n" not in str(info.value)
    assert isinstance(pipe.unet, torch.nn.Module) and not isinstance(pipe.unet, RealignedDenoiser)
    with pytest.raises(UserError, match="reference=None"):
        RealignedDenoiser(pipe.unet, lam={"color": 1}, reference=copy.deepcopy(pipe.unet))


def test_fused_adapters_are_refused(tmp_path):
    unet = build_tiny_sd15(tmp_path).unet
    _add_random_adapter(unet, "color", seed=1)
    unet.fuse_lora()
    with pytest.raises(UserError, match="unfuse"):
        RealignedDenoiser(unet, lam={"color": 1.0})
    assert math.isfinite(float(unet.conv_in.weight.sum()))
