"""One Diffusion-DPO step on a tiny SD1.5-shaped pipeline."""

from __future__ import annotations

import math

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
