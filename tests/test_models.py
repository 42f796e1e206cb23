"""LoRA save/load (diffusers format), adapter toggling, scheduler and pipeline loading errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd15
from safetensors.torch import save_file

from deradiff.errors import UserError
from deradiff.models import (
    LORA_WEIGHT_NAME,
    adapters_disabled,
    check_lora_matches,
    denoiser_name,
    load_lora,
    load_pipeline,
    lora_adapter_names,
    lora_file_carries_alpha,
    resolve_lora_file,
    save_lora,
    set_scheduler,
)


@pytest.fixture
def sd15(tiny_sd15):
    """This test's own copy of (pipe_with_lora, pipe_base): tests here change schedulers, and the
    session-wide fixture must look the same to every test whatever the order."""
    return copy.deepcopy(tiny_sd15)


def _images(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np", generator=gen).images


def test_adapters_disabled_gives_the_base_exactly_and_restores(sd15):
    adapted, base = sd15
    set_scheduler(adapted, "ddim")
    set_scheduler(base, "ddim")
    with adapters_disabled(adapted.unet):
        np.testing.assert_array_equal(_images(adapted), _images(base))
    assert np.abs(_images(adapted) - _images(base)).max() > 1e-3
    assert lora_adapter_names(adapted.unet) == ["default"]
    assert lora_adapter_names(base.unet) == []


def test_save_lora_round_trips_through_stock_load_lora_weights(sd15, tmp_path):
    adapted, _ = sd15
    set_scheduler(adapted, "ddim")
    path = save_lora(adapted, tmp_path / "lora", metadata={"beta": 1.0})
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lora"], "temporary folder left behind"
    fresh = build_tiny_sd15(tmp_path)
    set_scheduler(fresh, "ddim")
    fresh.load_lora_weights(str(tmp_path / "lora"))  # stock diffusers reads our file
    np.testing.assert_allclose(_images(fresh), _images(adapted), atol=1e-6)
    other = build_tiny_sd15(tmp_path)
    set_scheduler(other, "ddim")
    load_lora(other, tmp_path / "lora")
    np.testing.assert_allclose(_images(other), _images(adapted), atol=1e-6)


def test_lora_for_another_base_is_refused_with_a_hint(sd15, tmp_path):
    adapted, _ = sd15
    bad = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(16, 4),
        "unet.mid_block.nonexistent.lora_A.weight": torch.zeros(4, 8),
    }
    save_file(bad, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=r"cross_attention_dim=2048 \(SDXL\), this model.s is 32$") as err:
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


def test_unknown_scheduler_lists_the_valid_ones(sd15):
    with pytest.raises(UserError, match="ddim"):
        set_scheduler(sd15[0], "fancy")


def test_set_scheduler_turns_off_x0_clipping(sd15):
    set_scheduler(sd15[0], "ddpm")
    assert sd15[0].scheduler.config.clip_sample is False


def test_missing_pipeline_is_a_clear_error(tmp_path):
    for components in (None, {"vae": None}):  # leaving a component out reads model_index.json first
        with pytest.raises(UserError, match="cannot load pipeline"):
            load_pipeline(str(tmp_path / "nothing-here"), components=components)


def test_denoiser_name_picks_the_module_attribute():
    class Flux:  # a transformer pipeline whose `unet` slot holds something other than a module
        unet = "not a module"
        transformer = torch.nn.Linear(1, 1)

    class NoDenoiser:
        text_encoder = torch.nn.Linear(1, 1)

    assert denoiser_name(Flux()) == "transformer"
    with pytest.raises(UserError, match="no `unet` or `transformer` module"):
        denoiser_name(NoDenoiser())


# -- damaged or mismatched LoRA files: one-line UserErrors, before anything is loaded ---------------

ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 16
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # Conv2d 16 -> 16, 1x1


def _saved_lora(adapted, tmp_path) -> dict[str, torch.Tensor]:
    """The adapted model's LoRA as save_lora writes it (keys prefixed `unet.`)."""
    from safetensors.torch import load_file

    return load_file(save_lora(adapted, tmp_path / "good"))


def _scaling(pipe, adapter_name: str) -> set[float]:
    from peft.tuners.lora import LoraLayer

    return {m.scaling[adapter_name] for m in pipe.unet.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def test_a_lora_file_without_alpha_loads_at_scale_one_with_a_note(sd15, tmp_path, capsys):
    adapted, _ = sd15
    save_file(_saved_lora(adapted, tmp_path), tmp_path / "bare.safetensors")  # the tensors, no adapter metadata
    fresh = build_tiny_sd15(tmp_path)
    capsys.readouterr()
    load_lora(fresh, tmp_path / "good", adapter_name="saved")  # save_lora's file: its alpha is in the header
    assert "lora alpha" not in capsys.readouterr().err and lora_file_carries_alpha(tmp_path / "good" / LORA_WEIGHT_NAME)
    load_lora(fresh, tmp_path / "bare.safetensors", adapter_name="bare")
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "bare.safetensors carries no lora alpha" in note
    assert "alpha = rank" in note and "save_lora" in note and "alpha=" in note
    assert _scaling(fresh, "bare") == {1.0}
    # Told its alpha, the file loads at alpha / r, and save_lora stores it: it reloads so, silently.
    rank = fresh.unet.peft_config["bare"].r
    load_lora(fresh, tmp_path / "bare.safetensors", adapter_name="told", alpha=2 * rank)
    assert _scaling(fresh, "told") == {2.0} and capsys.readouterr().err == ""
    fresh.set_adapters(["told"])
    resaved = save_lora(fresh, tmp_path / "resaved", adapter_name="told")
    load_lora(fresh, resaved, adapter_name="reloaded")
    assert _scaling(fresh, "reloaded") == {2.0} and capsys.readouterr().err == ""
    with pytest.raises(UserError, match="carries its own lora alpha"):
        load_lora(fresh, resaved, adapter_name="twice", alpha=3.0)


def _refusal(pipe, tensors: dict, tmp_path, metadata: dict | None = None) -> str:
    """load_lora's one-line UserError for a file holding `tensors`; the model is left untouched."""
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(UserError) as err:
        load_lora(pipe, tmp_path / "bad.safetensors")
    assert lora_adapter_names(pipe.unet) == []
    message = str(err.value)
    assert "\n" not in message and "bad.safetensors" in message
    return message


@pytest.mark.parametrize("cut", ["half", "5 bytes"])
def test_truncated_lora_file_is_a_clear_error(sd15, tmp_path, cut):
    good = save_lora(sd15[0], tmp_path / "good")
    data = good.read_bytes()
    (tmp_path / "cut").mkdir()
    bad = tmp_path / "cut" / "pytorch_lora_weights.safetensors"
    bad.write_bytes(data[: len(data) // 2] if cut == "half" else data[:5])
    for given in (bad, bad.parent):  # the file, or its folder
        with pytest.raises(UserError, match=r"pytorch_lora_weights.safetensors .*truncated or not a safetensors file"):
            resolve_lora_file(given)
    with pytest.raises(UserError, match="truncated"):
        load_lora(sd15[1], bad.parent)


def test_lora_b_with_the_wrong_output_size_is_refused(sd15, tmp_path):
    tensors = _saved_lora(sd15[0], tmp_path)
    tensors[f"unet.{ATTN2_K}.lora_B.weight"] = torch.zeros(24, 4)
    message = _refusal(sd15[1], tensors, tmp_path)
    assert f"1 shape mismatches, e.g. ['{ATTN2_K} (LoRA out=24, model out=16)']" in message
    assert "cross_attention_dim" not in message  # the LoRA's cross-attention width is this model's


def test_lora_a_and_b_ranks_that_disagree_are_refused(sd15, tmp_path):
    tensors = _saved_lora(sd15[0], tmp_path)
    tensors[f"unet.{ATTN2_K}.lora_B.weight"] = torch.zeros(16, 3)
    message = _refusal(sd15[1], tensors, tmp_path)
    assert f"{ATTN2_K} (lora_A rank 4 != lora_B rank 3)" in message


def test_conv_lora_with_another_kernel_or_linear_shape_is_refused(sd15, tmp_path):
    tensors = _saved_lora(sd15[0], tmp_path)
    tensors[f"unet.{PROJ_IN}.lora_A.weight"] = torch.zeros(4, 16, 3, 3)
    assert f"{PROJ_IN} (LoRA kernel (3, 3), model kernel (1, 1))" in _refusal(sd15[1], tensors, tmp_path)
    tensors[f"unet.{PROJ_IN}.lora_A.weight"] = torch.zeros(4, 16)  # a LoRA for a linear proj_in (SD2/SDXL)
    tensors[f"unet.{PROJ_IN}.lora_B.weight"] = torch.zeros(16, 4)
    assert f"{PROJ_IN} (LoRA tensors 2-D, model weight 4-D)" in _refusal(sd15[1], tensors, tmp_path)


def test_header_rank_that_disagrees_with_the_tensors_is_refused(sd15, tmp_path):
    import json

    tensors = _saved_lora(sd15[0], tmp_path)
    header = {"unet.r": 8, "unet.lora_alpha": 8, "unet.target_modules": ["to_k"]}
    message = _refusal(sd15[1], tensors, tmp_path, {"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    assert "(tensors have rank 4, the file's header says 8)" in message


def test_missing_module_gives_no_cross_attention_hint_when_the_width_matches(sd15, tmp_path):
    tensors = _saved_lora(sd15[0], tmp_path)
    tensors["unet.mid_block.nonexistent.lora_A.weight"] = torch.zeros(4, 8)
    tensors["unet.mid_block.nonexistent.lora_B.weight"] = torch.zeros(8, 4)
    message = _refusal(sd15[1], tensors, tmp_path)
    assert "1 modules not in the model, e.g. ['mid_block.nonexistent']" in message
    assert "cross_attention_dim" not in message and "unknown base" not in message


def test_flow_sde_scheduler_is_set_by_name_and_keeps_the_schedule(tmp_path):
    from tiny_flow import build_tiny_sd3

    from deradiff.flow import FlowMatchSDEScheduler
    from deradiff.models import set_scheduler

    pipe = build_tiny_sd3(tmp_path)
    shift = pipe.scheduler.config.shift
    set_scheduler(pipe, "flow_sde", noise_level=0.7)
    assert type(pipe.scheduler) is FlowMatchSDEScheduler
    assert pipe.scheduler.config.noise_level == 0.7 and pipe.scheduler.config.shift == shift
    with pytest.raises(UserError, match="unknown scheduler 'flow_ode'"):
        set_scheduler(pipe, "flow_ode")
