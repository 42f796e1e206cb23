"""The trainer's optimizer choice (the loop itself runs end to end in test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deradiff.training.recipe import load_recipe
from deradiff.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[2]


def _one_step(optimizer_name: str) -> tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    recipe = load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [f"trainer.optimizer={optimizer_name}", "trainer.lr=1e-2"])
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8192))  # >= 4096 elements: bitsandbytes keeps 8-bit state
    before = param.detach().clone()
    opt = make_optimizer(recipe, [param])
    param.grad = torch.randn(8192, generator=torch.Generator().manual_seed(1))
    opt.step()
    return opt, before, param.detach()


def test_adamw8bit_keeps_8bit_state_and_steps_like_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    opt, before, after = _one_step("adamw8bit")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    _, before32, after32 = _one_step("adamw")
    assert torch.equal(before, before32)
    step8, step32 = after - before, after32 - before32
    # Adam's first step is lr * sign(grad) (+ decay); the 8-bit one must agree to quantization error.
    assert torch.allclose(step8, step32, atol=2e-3)
    assert float(step8.abs().mean()) > 5e-3
