"""LoRA save/load (diffusers format), adapter toggling, scheduler and pipeline loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd15
from safetensors.torch import save_file

from deradiff.errors import UserError
from deradiff.models import (
    adapters_disabled,
    check_lora_matches,
    load_lora,
    load_pipeline,
    lora_adapter_names,
    resolve_lora_file,
    save_lora,
    set_scheduler,
)


def _images(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np", generator=gen).images


def test_adapters_disabled_gives_the_base_exactly_and_restores(tiny_sd15):
    adapted, base = tiny_sd15
    set_scheduler(adapted, "ddim")
    set_scheduler(base, "ddim")
    with adapters_disabled(adapted.unet):
        np.testing.assert_array_equal(_images(adapted), _images(base))
    assert np.abs(_images(adapted) - _images(base)).max() > 1e-3
    assert lora_adapter_names(adapted.unet) == ["default"]
    assert lora_adapter_names(base.unet) == []


def test_save_lora_round_trips_through_stock_load_lora_weights(tiny_sd15, tmp_path):
    adapted, _ = tiny_sd15
    set_scheduler(adapted, "ddim")
    path = save_lora(adapted, tmp_path / "lora", metadata={"beta": 1.0})
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    assert not list(tmp_path.glob(".lora.*")), "temporary folder left behind"
    fresh = build_tiny_sd15(tmp_path)
    set_scheduler(fresh, "ddim")
    fresh.load_lora_weights(str(tmp_path / "lora"))  # stock diffusers reads our file
    np.testing.assert_allclose(_images(fresh), _images(adapted), atol=1e-6)
    other = build_tiny_sd15(tmp_path)
    set_scheduler(other, "ddim")
    load_lora(other, tmp_path / "lora")
    np.testing.assert_allclose(_images(other), _images(adapted), atol=1e-6)


def test_lora_for_another_base_is_refused_with_a_hint(tiny_sd15, tmp_path):
    adapted, _ = tiny_sd15
    bad = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(16, 4),
        "unet.mid_block.nonexistent.lora_A.weight": torch.zeros(4, 8),
    }
    save_file(bad, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=r"cross_attention_dim=2048 \(SDXL\)") as err:
        check_lora_matches(adapted.unet, tmp_path / "x.safetensors")
    assert "mid_block.nonexistent" in str(err.value) and "shape mismatch" in str(err.value)


def test_pickled_or_missing_lora_is_refused(tmp_path):
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="not a .safetensors"):
        resolve_lora_file(tmp_path / "lora.bin")
    with pytest.raises(UserError, match="does not exist"):
        resolve_lora_file(tmp_path / "nope.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no .safetensors"):
        resolve_lora_file(tmp_path / "d")


def test_unknown_scheduler_lists_the_valid_ones(tiny_sd15):
    with pytest.raises(UserError, match="ddim"):
        set_scheduler(tiny_sd15[0], "fancy")


def test_set_scheduler_turns_off_x0_clipping(tiny_sd15):
    set_scheduler(tiny_sd15[0], "ddpm")
    assert tiny_sd15[0].scheduler.config.clip_sample is False


def test_missing_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load pipeline"):
        load_pipeline(str(tmp_path / "nothing-here"))
