"""One Diffusion-DPO step on a tiny SD1.5-shaped pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_sd15

from deradiff.models import add_lora
from deradiff.training.conditioning import encode_prompts
from deradiff.training.dpo import dpo_errors
from deradiff.training.losses import diffusion_dpo_loss


def _pairs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1, torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1


def _step(pipe, w, lose, ids, prompts):
    cond = encode_prompts(pipe, prompts, "cpu")
    errors = dpo_errors(pipe.unet, pipe.unet, pipe.vae, pipe.scheduler, w, lose, cond, pair_ids=ids, seed=0, epoch=0)
    return diffusion_dpo_loss(*errors, beta=2000, convention="official")


def test_fresh_lora_equals_reference_so_loss_is_log2(tmp_path):
    pipe = build_tiny_sd15(tmp_path)
    add_lora(pipe.unet, rank=4)  # B = 0: the adapted model is the reference
    w, lose = _pairs(3)
    loss, metrics = _step(pipe, w, lose, [0, 1, 2], ["a", "b", "c"])
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert metrics["dpo/implicit_acc"] == 0.5 and metrics["dpo/kl_proxy"] == 0.0


def test_per_pair_noise_does_not_depend_on_batch_split_and_gradient_flows(tiny_sd15):
    adapted, _ = tiny_sd15
    w, lose = _pairs(4, seed=1)
    prompts = ["a red circle", "b", "c", "d"]
    _, full = _step(adapted, w, lose, [10, 11, 12, 13], prompts)
    halves = [_step(adapted, w[i:i + 2], lose[i:i + 2], [10 + i, 11 + i], prompts[i:i + 2])[1] for i in (0, 2)]
    for key in ("dpo/model_margin", "dpo/ref_margin", "dpo/loss"):
        assert math.isclose(full[key], (halves[0][key] + halves[1][key]) / 2, rel_tol=1e-4, abs_tol=1e-7)
    loss, _ = _step(adapted, w, lose, [10, 11, 12, 13], prompts)
    loss.backward()
    grads = [p.grad for n, p in adapted.unet.named_parameters() if "lora" in n]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    base_grads = [p.grad for n, p in adapted.unet.named_parameters() if "lora" not in n]
    assert all(g is None for g in base_grads)
    adapted.unet.zero_grad(set_to_none=True)


# -- flow families (SD3, FLUX): velocity target, keyed sigma ------------------------------------------


class _LinearVelocity(torch.nn.Module):
    """An SD3-shaped stand-in transformer: v = a * x + t / 1000 (no text dependence)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        return (self.a * hidden_states + timestep.view(-1, 1, 1, 1) / 1000,)


def test_flow_dpo_loss_equals_a_hand_computation():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from deradiff.seeding import SALT_DPO_NOISE, SALT_DPO_SIGMA, keyed_generator, keyed_randn
    from deradiff.training.conditioning import Conditioning
    from deradiff.training.dpo import dpo_errors_from_latents
    from deradiff.training.families import TimestepSampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))  # w0, w1, l0, l1
    cond = Conditioning(torch.zeros(2, 1, 4), pooled_projections=torch.zeros(2, 4), family="sd3")
    ids, seed, epoch, beta = [7, 9], 3, 2, 100.0
    model, reference = _LinearVelocity(-0.5), _LinearVelocity(-0.2)
    errors = dpo_errors_from_latents(model, reference, scheduler, latents, cond, ids, seed, epoch,
                                     TimestepSampling("logit_normal", 0.0, 1.0))
    loss, _ = diffusion_dpo_loss(*errors, beta=beta, convention="official")

    # By hand: per pair, u = sigmoid(N(0, 1)) from the pair's keyed generator picks sigma in the
    # shift-3 training schedule; x_s = (1 - s) x0 + s eps with the pair's noise; target eps - x0.
    hand = []
    for pair, key in enumerate(ids):
        u = torch.sigmoid(torch.normal(0.0, 1.0, (1,), generator=keyed_generator(seed, epoch, SALT_DPO_SIGMA, key)))
        index = int(u * 1000)
        unshifted = 1 - index / 1000  # training sigmas run from 1 down to 1/1000
        s = 3 * unshifted / (1 + 2 * unshifted)
        eps = keyed_randn((2, 3, 3), [key], seed, epoch, salt=SALT_DPO_NOISE)[0]
        errs = {}
        for name, a in (("model", -0.5), ("ref", -0.2)):
            for side, x0 in (("w", latents[pair]), ("l", latents[2 + pair])):
                x_s = (1 - s) * x0 + s * eps
                errs[name, side] = float(((a * x_s + s - (eps - x0)) ** 2).mean())
        margin = (errs["model", "w"] - errs["model", "l"]) - (errs["ref", "w"] - errs["ref", "l"])
        hand.append(-math.log(1 / (1 + math.exp(beta / 2 * margin))))
    assert math.isclose(loss.item(), sum(hand) / 2, rel_tol=1e-4)


def test_flow_sigmas_are_logit_normal_in_the_unshifted_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from deradiff.training.families import FAMILIES, TimestepSampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ids = list(range(4000))
    for scheme, quartiles in (("logit_normal", (0.338, 0.5, 0.662)), ("uniform", (0.25, 0.5, 0.75))):
        t = FAMILIES["sd3"].training_timesteps(scheduler, ids, 0, 0, TimestepSampling(scheme))
        s = t / 1000
        unshifted = s / (3 - 2 * s)  # undo the shift s = 3 x / (1 + 2 x)
        q = torch.quantile(1 - unshifted, torch.tensor([0.25, 0.5, 0.75]))
        assert torch.allclose(q, torch.tensor(quartiles), atol=0.02), (scheme, q)
    again = FAMILIES["sd3"].training_timesteps(scheduler, [5, 6], 0, 0, TimestepSampling())
    assert torch.equal(again, FAMILIES["sd3"].training_timesteps(scheduler, [7, 5, 6], 0, 0, TimestepSampling())[1:])


def test_flow_dpo_on_tiny_sd3_and_flux_starts_at_log2_and_does_not_depend_on_the_split(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_flow import build_tiny_flux, build_tiny_sd3

    w, lose = _pairs(4, seed=2)
    w, lose = (torch.nn.functional.interpolate(x, size=32) for x in (w, lose))
    prompts = ["a red circle", "b", "c", "d"]
    for build in (build_tiny_sd3, build_tiny_flux):
        pipe = build(tmp_path / build.__name__)
        add_lora(pipe.transformer, rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])

        def step(ids, rows, pipe=pipe):
            cond = encode_prompts(pipe, [prompts[i] for i in rows], "cpu", guidance=3.5, max_sequence_length=8)
            errors = dpo_errors(pipe.transformer, pipe.transformer, pipe.vae, pipe.scheduler, w[rows], lose[rows],
                                cond, pair_ids=ids, seed=0, epoch=1)
            return diffusion_dpo_loss(*errors, beta=100)

        loss, metrics = step([10, 11, 12, 13], [0, 1, 2, 3])
        assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and metrics["dpo/implicit_acc"] == 0.5
        with torch.no_grad():  # a nonzero LoRA: model != reference
            for name, p in pipe.transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        _, full = step([10, 11, 12, 13], [0, 1, 2, 3])
        halves = [step([10 + i, 11 + i], [i, i + 1])[1] for i in (0, 2)]
        for key in ("dpo/model_margin", "dpo/ref_margin", "dpo/loss"):
            assert math.isclose(full[key], (halves[0][key] + halves[1][key]) / 2, rel_tol=1e-4, abs_tol=1e-7)


# -- split_backward: one image's activations, the batched gradient ---------------------------------


class _SavedActivations:
    """Bytes of tensors the autograd graph holds for the backward (parameters left out), live and
    at their peak, counted through torch.autograd.graph.saved_tensors_hooks."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.data_ptr() for p in module.parameters()}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        if t.data_ptr() in self.params:
            return t
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tensor, counter):
        self.tensor, self.counter, self.nbytes = tensor, counter, tensor.numel() * tensor.element_size()
        counter.live += self.nbytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.nbytes


def _family_pipe(family, tmp_path, tiny_sd15, tiny_sdxl):
    """(pipe, denoiser, image side, encode kwargs) of a tiny pipeline with a nonzero LoRA."""
    if family in ("sd15", "sdxl"):
        pipe = (tiny_sd15 if family == "sd15" else tiny_sdxl)[0]
        return pipe, pipe.unet, 16, {}
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_flow import add_random_transformer_lora, build_tiny_flux, build_tiny_sd3

    pipe = (build_tiny_sd3 if family == "sd3" else build_tiny_flux)(tmp_path / family)
    add_random_transformer_lora(pipe.transformer, rank=2)
    return pipe, pipe.transformer, 32, {"guidance": 3.5, "max_sequence_length": 8}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_split_backward_gives_the_batched_gradient_holding_one_image(family, tmp_path, tiny_sd15, tiny_sdxl):
    pipe, denoiser, side, kwargs = _family_pipe(family, tmp_path, tiny_sd15, tiny_sdxl)
    w, lose = (torch.nn.functional.interpolate(x, size=side) for x in _pairs(2, seed=3))
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], "cpu", **kwargs)
    lora = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)

    def run(split: bool):
        counter = _SavedActivations(denoiser)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            errors = dpo_errors(denoiser, denoiser, pipe.vae, pipe.scheduler, w, lose, cond, pair_ids=[4, 9], seed=0,
                                epoch=2, split_backward=split)
            loss, _ = diffusion_dpo_loss(*errors, beta=50, convention="diffusers")
            loss.backward()
        grads = {n: p.grad.clone() for n, p in lora.items()}
        denoiser.zero_grad(set_to_none=True)
        return torch.stack([e.detach() for e in errors]), loss.detach(), grads, counter.peak

    errors, loss, grads, peak = run(True)
    errors_b, loss_b, grads_b, peak_b = run(False)
    torch.testing.assert_close(errors, errors_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, loss_b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in grads_b.values()) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_b[name], rtol=0, atol=1e-4 * float(grads_b[name].abs().max()),
                                   msg=name)
    # 4 images (2 pairs): the graph held at once is one image's, plus LoRA-sized gradients
    assert peak < 0.4 * peak_b, (peak, peak_b)  # measured 0.26-0.31 (ideal 0.25)
