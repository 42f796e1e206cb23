"""A saved LoRA reloads as the model that was trained: same rank, alpha (scale alpha / r) and
targets, through stock diffusers `pipe.load_lora_weights` and through deradiff's `load_lora`
(the `deradiff sample` / `evaluate` path). Before the fix the file carried no adapter config and
a LoRA with alpha != rank came back at scale 1 (one UNet call off by up to ~1.3)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_sd15, build_tiny_sdxl

from deradiff.models import load_lora, save_lora

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet_inputs(unet, seed: int = 0) -> dict:
    """One UNet call's inputs for this UNet's shapes (SDXL's added_cond_kwargs included)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
        "timestep": torch.tensor([999, 300]),
        "encoder_hidden_states": torch.randn(2, 7, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, n_text, generator=gen),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return inputs


@torch.no_grad()
def _unet_out(pipe, inputs: dict) -> torch.Tensor:
    return pipe.unet(**inputs).sample


def _with_lora(base, seed: int = 1, **config):
    """A copy of `base` with a peft LoRA (config: LoraConfig kwargs) whose B is random and nonzero."""
    from peft import LoraConfig

    pipe = copy.deepcopy(base)
    pipe.unet.add_adapter(LoraConfig(init_lora_weights="gaussian", target_modules=TARGETS, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pipe


def _reloaded(base, lora_dir) -> dict:
    """Fresh copies of `base` with the saved LoRA loaded, by loader."""
    stock, ours = copy.deepcopy(base), copy.deepcopy(base)
    stock.load_lora_weights(str(lora_dir))
    load_lora(ours, lora_dir)
    return {"stock load_lora_weights": stock, "deradiff load_lora": ours}


CASES = {
    "sd15 r4 alpha8": (build_tiny_sd15, {"r": 4, "lora_alpha": 8}),
    "sd15 rank/alpha patterns": (build_tiny_sd15, {"r": 4, "lora_alpha": 8, "rank_pattern": {"attn2.to_k": 2},
                                                   "alpha_pattern": {"proj_out": 1}}),
    "sdxl r4 alpha8": (build_tiny_sdxl, {"r": 4, "lora_alpha": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_lora_reloads_at_its_trained_scale(case, tmp_path):
    build, config = CASES[case]
    base = build(tmp_path)
    trained = _with_lora(base, **config)
    save_lora(trained, tmp_path / "lora")
    inputs = _unet_inputs(base.unet)
    want = _unet_out(trained, inputs)
    assert (want - _unet_out(base, inputs)).abs().max() > 0.05, "the LoRA must change the model"
    for loader, pipe in _reloaded(base, tmp_path / "lora").items():
        got = _unet_out(pipe, inputs)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{loader}: max diff {(got - want).abs().max():.3g}"
        (cfg,) = pipe.unet.peft_config.values()  # stock names it default_0
        assert (cfg.r, cfg.lora_alpha) == (config["r"], config["lora_alpha"]), loader
        assert cfg.rank_pattern == config.get("rank_pattern", {}), loader
        assert cfg.alpha_pattern == config.get("alpha_pattern", {}), loader
        assert set(cfg.target_modules) == set(TARGETS), loader


def test_save_lora_refuses_a_diffusers_that_cannot_store_alpha(tmp_path, monkeypatch):
    """diffusers < 0.35 has no `unet_lora_adapter_metadata`: saving alpha != rank would silently
    lose the scale, so it is refused; alpha == rank needs no metadata and still saves."""
    from diffusers import StableDiffusionPipeline

    from deradiff.errors import UserError

    real = StableDiffusionPipeline.save_lora_weights.__func__

    def old_save(cls, save_directory, unet_lora_layers=None, safe_serialization=True):
        return real(cls, save_directory, unet_lora_layers=unet_lora_layers, safe_serialization=safe_serialization)

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", classmethod(old_save))
    base = build_tiny_sd15(tmp_path)
    with pytest.raises(UserError, match=r"cannot store this LoRA's alpha .*diffusers>=0.35"):
        save_lora(_with_lora(base, r=4, lora_alpha=8), tmp_path / "a8")
    assert not (tmp_path / "a8").exists()
    assert save_lora(_with_lora(base, r=4, lora_alpha=4), tmp_path / "a4").exists()


# -- end to end: the real trainer, then the saved run folder ----------------------------------------


@pytest.fixture(scope="module")
def trained_run(toy_world, tmp_path_factory):
    """Train 2 DPO steps on the toy world with lora.rank=4 lora.alpha=8, in this process, keeping
    the trained pipeline as it was when the trainer saved it. -> (pipe, run_dir)."""
    from deradiff.training import trainer
    from deradiff.training.methods import METHODS
    from deradiff.training.recipe_load import load_recipe

    run_dir = tmp_path_factory.mktemp("alpha_run") / "run"
    recipe = load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [
        f"model.name_or_path={toy_world / 'pipe'}", "data.source=parquet",
        f"data.path={toy_world / 'prefs' / 'train.parquet'}", "data.eval_path=null",
        "lora.rank=4", "lora.alpha=8", "method.beta=2000", "trainer.lr=1e-2", "trainer.warmup_steps=0",
        "trainer.max_steps=2", "trainer.per_device_batch_size=2", "trainer.checkpoint_every=2",
        "trainer.eval_every=0", "trainer.sample_every=0", "sample.images_per_prompt=1",
        "sample.num_inference_steps=1", f"trainer.output_dir={run_dir}",
    ])
    kept = {}
    real_save = trainer.save_lora

    def keep_and_save(pipe, out_dir, **kw):
        kept["pipe"] = pipe
        return real_save(pipe, out_dir, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "save_lora", keep_and_save)
        # the pytest process keeps its own SIGTERM/SIGUSR1 handlers
        mp.setattr(trainer, "_install_preemption_handlers", lambda: {"flag": False, "name": ""})
        trainer.fit(recipe, METHODS["dpo"], run_dir)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # later in-process users start clean
    pipe = kept["pipe"]
    pipe.unet.eval()
    return pipe, run_dir


def test_trained_lora_run_folder_reloads_as_the_trained_model(trained_run):
    from deradiff.models import load_pipeline
    from deradiff.realign import realigned
    from deradiff.training.recipe_runs import load_resolved

    trained, run_dir = trained_run
    cfg = trained.unet.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    base = load_pipeline(load_resolved(run_dir).model.name_or_path)
    inputs = _unet_inputs(base.unet)
    want = _unet_out(trained, inputs)
    assert (want - _unet_out(base, inputs)).abs().max() > 1e-4, "training must have moved the LoRA"
    for loader, pipe in _reloaded(base, run_dir / "lora").items():
        got = _unet_out(pipe, inputs)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{loader}: max diff {(got - want).abs().max():.3g}"
        with torch.no_grad(), realigned(pipe, lam=1.0, record=False):
            mixed = pipe.unet(**inputs).sample
        assert torch.allclose(mixed, want, rtol=0, atol=1e-6), f"{loader}, realigned lambda=1"
