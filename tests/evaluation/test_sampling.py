"""The sampling primitive: batch independence of each image, the auto mode rule, throughput."""

from __future__ import annotations

import pytest
import torch
from conftest import add_random_lora

from deradiff.errors import UserError
from deradiff.evaluation import sampling as sampling_module
from deradiff.evaluation.lams import parse_lam
from deradiff.evaluation.sampling import (
    CPU_MIXED_BATCH_MAX_ROWS,
    Sampler,
    Throughput,
    choose_mode,
    plain_fraction,
    true_cfg_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest

PROMPTS = ["a red circle on a dark background", "a blue square on a light background",
           "a green triangle on a dark background", "a yellow cross on a light background"]


@pytest.fixture(scope="module")
def toy_pipe():
    """The toy pipeline with random weights, a random LoRA and DDPM (stochastic: a path KL)."""
    from diffusers import DDPMScheduler

    from deradiff.toy.pipeline import build_toy_pipeline

    pipe = build_toy_pipeline(seed=0)
    add_random_lora(pipe.unet, rank=4, strength=0.2)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler(pipe, mode: str, guidance: float = 3.0) -> Sampler:
    call = dict(num_inference_steps=3, guidance_scale=guidance, height=32, width=32, output_type="pt")
    return Sampler(pipe, call, mode=mode)


@pytest.mark.parametrize("mode", ["two_forward", "mixed_batch"])
def test_an_image_does_not_depend_on_its_batch(toy_pipe, mode):
    """8 (prompt, seed) rows in one call give the images and path KLs of 8 calls of one row:
    each row's noise comes from its own seeded generator."""
    prompts = [PROMPTS[i % 4] for i in range(8)]
    seeds = [0, 1, 0, 1, 2, 3, 2, 3]
    lam = parse_lam("linear:0,2")
    s = sampler(toy_pipe, mode)
    batched, kl_batched = s.sample(prompts, seeds, lam)
    for i in range(8):
        one, kl_one = s.sample([prompts[i]], [seeds[i]], lam)
        assert torch.allclose(one[0], batched[i], atol=1e-5), (i, (one[0] - batched[i]).abs().max())
        assert kl_one[0] == pytest.approx(kl_batched[i], rel=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # different seeds, different images


def test_auto_mode_follows_the_measured_rule(toy_pipe):
    n = CPU_MIXED_BATCH_MAX_ROWS
    assert choose_mode(n, "cpu") == "mixed_batch" and choose_mode(n + 1, "cpu") == "two_forward"
    assert choose_mode(1, "cuda:0") == "two_forward"  # not measured on accelerators: the safe default
    # rows per call count classifier-free guidance: it doubles the denoiser's batch
    with_cfg, without = sampler(toy_pipe, "auto", guidance=3.0), sampler(toy_pipe, "auto", guidance=1.0)
    assert with_cfg.mode_for(n // 2) == "mixed_batch" and with_cfg.mode_for(n // 2 + 1) == "two_forward"
    assert without.mode_for(n) == "mixed_batch" and without.mode_for(n + 1) == "two_forward"
    assert sampler(toy_pipe, "two_forward").mode_for(1) == "two_forward"  # explicit modes stay
    two_models = Sampler(toy_pipe, {"guidance_scale": 3.0}, mode="auto", reference=torch.nn.Linear(1, 1))
    assert two_models.mode_for(1) == "two_forward"  # no mixed batch with a second model


def test_throughput_counts_images_modes_and_the_realignment_overhead(toy_pipe):
    s = sampler(toy_pipe, "auto")
    big = CPU_MIXED_BATCH_MAX_ROWS  # x 2 rows with CFG: two_forward
    s.sample(PROMPTS[:1], [0], parse_lam("1"))
    s.sample([PROMPTS[0]] * big, list(range(big)), parse_lam("1"))
    t = s.throughput
    assert t.images == 1 + big and t.modes == {"mixed_batch": 1, "two_forward": big}
    assert 0 < t.plain_s < t.denoise_s < t.sample_s  # two forwards per step cost more than one
    assert t.overhead > 1.0 and t.images_per_s > 0
    d = t.as_dict()
    assert d["images"] == 1 + big and d["realign_overhead"] == round(t.overhead, 4)
    total = Throughput()
    total.merge(d)
    total.merge(d)
    assert total.images == 2 * d["images"] and total.modes == {"mixed_batch": 2, "two_forward": 2 * big}
    assert total.overhead == pytest.approx(t.overhead, rel=1e-3)
    assert Throughput().overhead is None and Throughput().postfix() == {}


def test_plain_fraction_is_the_median_of_interleaved_pairs(monkeypatch):
    """A realigned call costs 2 time units and a plain one 1, except one plain call slowed to 10 by
    other load: the ratio stays 0.5 (one plain timing, as before, could read 10 / 2)."""
    now, order = [0.0], []
    monkeypatch.setattr(sampling_module, "_clock", lambda device: now[0])
    plain_costs = iter([1.0, 10.0, 1.0, 1.0, 1.0, 1.0])  # warm-up pair first

    def realigned():
        order.append("r")
        now[0] += 2.0

    def plain():
        order.append("p")
        now[0] += next(plain_costs)

    assert plain_fraction(realigned, plain, "cpu", repeats=5) == 0.5
    assert order == ["r", "p", "r", "p", "p", "r", "r", "p", "p", "r", "r", "p"]  # alternating pairs


def test_timing_the_plain_forward_leaves_the_path_kl_alone(toy_pipe):
    s = sampler(toy_pipe, "two_forward")
    images, kl_first = s.sample(PROMPTS[:2], [0, 1], parse_lam("2"))  # measures plain / realigned
    fraction = next(iter(s._plain_fraction.values()))
    assert len(s._plain_fraction) == 1 and 0 < fraction < 1  # a plain forward is the cheaper one
    _, kl_again = s.sample(PROMPTS[:2], [0, 1], parse_lam("2"))  # reuses it
    assert len(s._plain_fraction) == 1 and kl_again == kl_first and None not in kl_first
    assert s.throughput.plain_s == pytest.approx(s.throughput.denoise_s * fraction, rel=1e-9)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_sde_sampling_is_per_seed_and_has_path_kl(tmp_path, family):
    """Under the flow SDE (step noise drawn by the scheduler, not the pipeline) each image still
    depends only on its seed, and every image gets a finite path KL; FLUX's guidance is a model
    input, so its records are not split into [uncond; cond] rows."""
    from tiny_flow import MAX_SEQUENCE_LENGTH, add_random_transformer_lora, build_tiny_flux, build_tiny_sd3

    from deradiff.models import set_scheduler

    pipe = build_tiny_sd3(tmp_path) if family == "sd3" else build_tiny_flux(tmp_path, guidance_embeds=True)
    add_random_transformer_lora(pipe.transformer)
    set_scheduler(pipe, "flow_sde", noise_level=0.7)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt",
                max_sequence_length=MAX_SEQUENCE_LENGTH)
    s = Sampler(pipe, call, mode="two_forward")
    lam = parse_lam("2")
    batched, kl_batched = s.sample(["a cat", "a dog", "a cat"], [0, 1, 1], lam)
    one, kl_one = s.sample(["a dog"], [1], lam)
    assert torch.allclose(one[0], batched[1], atol=1e-5)
    assert all(k is not None and k > 0 for k in kl_batched) and kl_one[0] == pytest.approx(kl_batched[1], rel=1e-4)
    assert not torch.allclose(batched[1], batched[2], atol=1e-3)  # same seed, other prompt
    if family == "flux":  # true CFG: two transformer calls per step, one path-KL term of the guided velocity
        true_cfg = {**call, "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
        assert true_cfg_scale(true_cfg) == 2.0 and true_cfg_scale({**call, "true_cfg_scale": 2.0}) == 1.0
        _, kl_cfg = Sampler(pipe, true_cfg, mode="two_forward").sample(["a dog"], [1], lam)
        assert kl_cfg[0] is not None and kl_cfg[0] > 0 and kl_cfg[0] != pytest.approx(kl_one[0], rel=1e-3)


def test_the_flow_sde_noise_level_is_set_and_refused_with_other_samplers(monkeypatch):
    from deradiff.evaluation import sampling
    from deradiff.flow import DEFAULT_NOISE_LEVEL

    assert sampling.load_sampler("toy-flow", scheduler="flow_sde", noise_level=1.25).pipe.scheduler.config.noise_level == 1.25
    assert sampling.load_sampler("toy-flow", scheduler="flow_sde").pipe.scheduler.config.noise_level == DEFAULT_NOISE_LEVEL
    monkeypatch.setattr("deradiff.models.load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    for scheduler in (None, "flow_euler", "ddim"):
        with pytest.raises(UserError, match="--noise-level sets the flow SDE's noise; it needs --scheduler flow_sde"):
            sampling.load_sampler("toy-flow", scheduler=scheduler, noise_level=1.0)
