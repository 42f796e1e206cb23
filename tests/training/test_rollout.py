"""Training rollouts: per-step Gaussian means from the scheduler, exact KL, keyed noise, DRaFT-K grads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deradiff.models import set_scheduler
from deradiff.training.conditioning import encode_prompts
from deradiff.training.rollout import RolloutSpec, sample_trajectory, step_log_prob_and_kl

PROMPTS = ["a red circle", "a blue square", "a green cross"]


def _traj(pipe, ids, prompts, grad_steps=0, guidance=1.0):
    cond = encode_prompts(pipe, prompts, "cpu")
    uncond = encode_prompts(pipe, [""] * len(prompts), "cpu") if guidance > 1 else None
    spec = RolloutSpec(pipe.scheduler, (4, 8, 8), num_steps=5, eta=1.0, guidance=guidance, seed=0)
    return sample_trajectory(pipe.unet, pipe.unet, spec, cond, uncond, ids, step=3, grad_steps=grad_steps)


def test_shapes_kl_and_log_probs(tiny_sd15):
    adapted, base = tiny_sd15
    set_scheduler(adapted, "ddim")
    set_scheduler(base, "ddim")
    with torch.no_grad():
        traj = _traj(adapted, [0, 1, 2], PROMPTS, guidance=2.0)
    assert traj.latents.shape == (6, 3, 4, 8, 8) and traj.kls.shape == (5, 3) and traj.log_probs.shape == (5, 3)
    assert (traj.path_kl > 0).all()
    # Re-evaluating a stored transition gives back the sampling-time log-prob and KL.
    cond = encode_prompts(adapted, PROMPTS, "cpu")
    uncond = encode_prompts(adapted, [""] * 3, "cpu")
    with torch.no_grad():
        spec = RolloutSpec(adapted.scheduler, (4, 8, 8), num_steps=5, eta=1.0, guidance=2.0)
        lp, kl = step_log_prob_and_kl(adapted.unet, adapted.unet, spec, traj, 2, cond, uncond)
    torch.testing.assert_close(lp, traj.log_probs[2], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(kl, traj.kls[2], rtol=1e-4, atol=1e-6)


def test_kl_is_zero_without_an_adapter_effect(tiny_sd15):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    saved = {n: p.detach().clone() for n, p in adapted.unet.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in adapted.unet.named_parameters():
                if "lora_B" in n:
                    p.zero_()
            traj = _traj(adapted, [0, 1], PROMPTS[:2])
        assert torch.equal(traj.path_kl, torch.zeros(2))
    finally:
        with torch.no_grad():
            for n, p in adapted.unet.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_noise_is_keyed_by_sample_id_not_batch_position(tiny_sd15):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    with torch.no_grad():
        both = _traj(adapted, [7, 9], PROMPTS[:2])
        alone = _traj(adapted, [9], PROMPTS[1:2])
    torch.testing.assert_close(both.x0[1:], alone.x0, atol=1e-5, rtol=1e-5)


def test_draft_k_gradients_reach_the_lora_only_through_the_last_k_steps(tiny_sd15):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    traj = _traj(adapted, [0, 1], PROMPTS[:2], grad_steps=2)
    assert traj.x0.requires_grad and traj.kl_grad.requires_grad
    (traj.x0.square().mean() + traj.kl_grad.mean()).backward()
    grads = [p.grad for n, p in adapted.unet.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    adapted.unet.zero_grad(set_to_none=True)
    no_grad = _traj(adapted, [0, 1], PROMPTS[:2], grad_steps=0)
    assert not no_grad.x0.requires_grad


# -- flow families: FlowMatchSDEScheduler rollouts ---------------------------------------------------


@pytest.fixture(scope="module")
def flow_pipes(tmp_path_factory):
    """Tiny SD3 and FLUX.1-dev-shaped pipelines, each with a random nonzero transformer LoRA."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_flow import add_random_transformer_lora, build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("flow_rollout")
    pipes = {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux", guidance_embeds=True)}
    for pipe in pipes.values():
        add_random_transformer_lora(pipe.transformer, rank=2, strength=0.2)
    return pipes


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_rollout_kl_and_log_probs_are_the_sde_schedulers(flow_pipes, family):
    from deradiff.flow import FlowMatchSDEScheduler
    from deradiff.models import adapters_disabled
    from deradiff.training.rollout import guided_output, set_sampling_timesteps

    pipe = flow_pipes[family]
    scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    guidance = 3.0  # SD3: classifier-free guidance over [uncond; cond]; FLUX.1-dev: its guidance input
    cond = encode_prompts(pipe, PROMPTS[:2], "cpu", guidance=guidance, max_sequence_length=16)
    uncond = encode_prompts(pipe, ["", ""], "cpu", max_sequence_length=16) if family == "sd3" else None
    shape = (16, 8, 8)
    spec = RolloutSpec(scheduler, shape, num_steps=4, guidance=guidance)
    with torch.no_grad():
        traj = sample_trajectory(pipe.transformer, pipe.transformer, spec, cond, uncond, [0, 1], step=3)
    assert traj.latents.shape == (5, 2, *shape) and (traj.path_kl > 0).all()
    for i, t in enumerate(traj.timesteps):
        x = traj.latents[i]
        with torch.no_grad():
            v = guided_output(pipe.transformer, x, t, cond, uncond, guidance)
            with adapters_disabled(pipe.transformer):
                v_ref = guided_output(pipe.transformer, x, t, cond, uncond, guidance)
        torch.testing.assert_close(traj.kls[i], scheduler.step_kl(v, v_ref, t, x), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(traj.log_probs[i], scheduler.step_log_prob(v, t, x, traj.latents[i + 1]),
                                   rtol=1e-5, atol=1e-3)
    # The schedule is the stock pipeline's for this latent size (FLUX: sigmas 1..1/N, shift mu by tokens).
    pipe(PROMPTS[0], num_inference_steps=4, height=16, width=16, output_type="latent", max_sequence_length=16,
         guidance_scale=guidance)
    set_sampling_timesteps(scheduler, 4, shape, family)
    torch.testing.assert_close(scheduler.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    # DRaFT-K: the last step carries gradients to the LoRA.
    grad_traj = sample_trajectory(pipe.transformer, pipe.transformer, spec, cond, uncond, [0, 1], step=3, grad_steps=1)
    (grad_traj.x0.square().mean() + grad_traj.kl_grad.mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pipe.transformer.named_parameters()
               if "lora" in n)
    pipe.transformer.zero_grad(set_to_none=True)
