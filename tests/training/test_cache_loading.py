"""Training from a latent cache loads only what it trains: the denoiser and the scheduler.

The VAE, the text encoders and their tokenizers are never instantiated, for every family (SD1.5,
SDXL, SD3, FLUX) and for the toy plug-in; sample grids load them for their duration around the
trained denoiser, which is not loaded a second time; losses and grids are those of a run that
loads the whole pipeline. (Cached vs uncached losses: tests/test_train.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from deradiff.models import denoiser_name, load_pipeline
from deradiff.training.conditioning import REPLACED_BY_CACHE
from deradiff.training.recipe_load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
LEFT_OUT = dict.fromkeys(REPLACED_BY_CACHE)


@contextmanager
def loaded_components() -> Iterator[list[str]]:
    """Names of the pipeline components that diffusers' from_pretrained loads inside the block,
    in order (its load_sub_model, called once per component it instantiates)."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    names: list[str] = []
    real = pipeline_utils.load_sub_model

    def spy(*args, **kwargs):
        names.append(kwargs["name"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_utils, "load_sub_model", spy)
        yield names


def _recipe(toy_world, cache, out, *over: str):
    return load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [
        f"model.name_or_path={toy_world / 'pipe'}", f"data.path={toy_world / 'prefs' / 'train.parquet'}",
        "data.eval_path=null", f"data.latent_cache={cache}", "data.num_workers=0", "trainer.max_steps=3",
        "trainer.per_device_batch_size=4", "trainer.checkpoint_every=100", "trainer.eval_every=0",
        "trainer.log_every=1", "trainer.warmup_steps=0", "trainer.sample_every=2", f"trainer.output_dir={out}",
        "sample.prompts=[a red circle on a dark background]", "sample.images_per_prompt=1",
        "sample.num_inference_steps=2", *over])


@pytest.fixture(scope="module")
def cache(toy_world, tmp_path_factory):
    from deradiff.training.cache import build_cache

    folder = tmp_path_factory.mktemp("cache-loading") / "cache"
    build_cache(_recipe(toy_world, folder, folder.parent / "unused"), batch_size=16, num_workers=0,
                log=lambda _: None)
    return folder


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_a_cached_run_never_loads_the_vae_text_encoder_or_tokenizer(toy_world, cache, tmp_path,
                                                                    fresh_accelerate_state):
    from deradiff.training.methods import METHODS
    from deradiff.training.trainer import make_accelerator, prepare_pipeline

    recipe = _recipe(toy_world, cache, tmp_path / "run")
    accelerator = make_accelerator(recipe, tmp_path)
    with loaded_components() as names:
        pipe = prepare_pipeline(recipe, accelerator)
        method = METHODS["dpo"](recipe, pipe, accelerator)  # opens the cache, checks its identity and family
    assert sorted(names) == ["scheduler", "unet"]
    assert pipe.vae is None and pipe.text_encoder is None and pipe.tokenizer is None
    assert len(method.dataset) == 44
    # the spy sees what an uncached run loads
    with loaded_components() as names:
        prepare_pipeline(_recipe(toy_world, cache, tmp_path / "run", "data.latent_cache=null"), accelerator)
    assert {"vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= set(names)


def _fit(recipe, whole_pipeline: bool) -> tuple[dict, list[str]]:
    """Train in this process: ({step: dpo/loss}, components loaded from disk). whole_pipeline:
    load the VAE and text encoders anyway (as before the cached path left them out)."""
    from accelerate.state import AcceleratorState

    from deradiff.training import trainer
    from deradiff.training.methods import METHODS

    run_dir = Path(recipe.trainer.output_dir)
    with pytest.MonkeyPatch.context() as mp, loaded_components() as names:
        mp.setattr(trainer, "_install_preemption_handlers", lambda: {"flag": False, "name": ""})
        if whole_pipeline:
            mp.setattr(trainer, "left_out", lambda recipe: ())
        trainer.fit(recipe, METHODS["dpo"], run_dir)
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["dpo/loss"] for r in rows}, names


def test_cached_losses_and_sample_grids_are_those_of_the_whole_pipeline(toy_world, cache, tmp_path):
    """Same losses, bit for bit, and the same sample grids (step 2 and the final step 3); the
    grids load the VAE, text encoder and tokenizer each time, never the UNet again."""
    lean_losses, lean_loaded = _fit(_recipe(toy_world, cache, tmp_path / "lean"), whole_pipeline=False)
    whole_losses, _ = _fit(_recipe(toy_world, cache, tmp_path / "whole"), whole_pipeline=True)
    assert sorted(lean_losses) == [1, 2, 3] and lean_losses == whole_losses
    grids = ("step-000002.png", "step-000003.png")
    for name in grids:
        lean, whole = ((tmp_path / run / "samples" / name).read_bytes() for run in ("lean", "whole"))
        assert lean == whole, name
    assert lean_loaded.count("unet") == 1 and lean_loaded[:2] in (["unet", "scheduler"], ["scheduler", "unet"])
    assert lean_loaded.count("vae") == lean_loaded.count("text_encoder") == lean_loaded.count("tokenizer") == 2


def _tiny_pipeline(family: str, tmp_path: Path) -> Path:
    """A tiny pipeline of `family` saved in a folder; "flux-schnell": FLUX without guidance_embeds."""
    from conftest import build_tiny_sd15, build_tiny_sdxl
    from tiny_flow import build_tiny_flux, build_tiny_sd3

    build = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux,
             "flux-schnell": lambda folder: build_tiny_flux(folder, guidance_embeds=False)}
    folder = tmp_path / family
    build[family](tmp_path / "parts").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "flux-schnell"])
def test_building_a_cache_never_loads_the_denoiser_and_writes_what_the_whole_pipeline_writes(family, tmp_path):
    """`deradiff cache` loads the VAE and text encoders only (FLUX.1's transformer would be 48 GB
    in float32); its shards are those of a cache built from the whole pipeline, FLUX.1-dev's
    guidance stored and schnell's not, as the loaded transformer's config says."""
    from conftest import write_pick_a_pic_parquet
    from safetensors.torch import load_file

    from deradiff.training.cache import build_cache

    folder = _tiny_pipeline(family, tmp_path)
    write_pick_a_pic_parquet(tmp_path / "train.parquet", 6, seed=1, size=40)
    kind = family.split("-")[0]

    def recipe(cache: Path):
        return load_recipe(None, [f"model.name_or_path={folder}", f"model.kind={kind}", "method.beta=100",
                                  "method.guidance_scale=3.5", f"data.path={tmp_path / 'train.parquet'}",
                                  "data.eval_path=null", "data.resolution=32", f"data.latent_cache={cache}"])

    with loaded_components() as names:
        build_cache(recipe(tmp_path / "lean"), batch_size=4, num_workers=0, log=lambda _: None)
    assert "scheduler" in names and not {"unet", "transformer"} & set(names), names
    build_cache(recipe(tmp_path / "whole"), batch_size=4, num_workers=0, log=lambda _: None,
                pipe=load_pipeline(str(folder)))
    for name in ("train-00000.safetensors", "train-text.safetensors"):
        lean, whole = (load_file(str(tmp_path / c / name)) for c in ("lean", "whole"))
        assert lean.keys() == whole.keys(), name
        for key in lean:
            torch.testing.assert_close(lean[key], whole[key], rtol=0, atol=0, msg=f"{name}: {key}")
    text = load_file(str(tmp_path / "lean" / "train-text.safetensors"))
    assert ("guidance" in text) == (family == "flux")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_every_family_loads_without_its_encoders_and_completes_around_its_denoiser(family, tmp_path):
    """Left out: only the denoiser and the scheduler are loaded, and the family is still
    recognised. Completed around a given denoiser: that very module, not loaded again, and the
    pipeline's defaults read from it (SDXL and SD3 take their image size from the denoiser)."""
    from deradiff.training.families import check_family

    folder = _tiny_pipeline(family, tmp_path)
    with loaded_components() as names:
        lean = load_pipeline(str(folder), components=LEFT_OUT)
    name = denoiser_name(lean)
    assert sorted(names) == sorted([name, "scheduler"])
    assert all(getattr(lean, n, None) is None for n in REPLACED_BY_CACHE)
    check_family(family, lean)
    with loaded_components() as names:
        full = load_pipeline(str(folder), components={name: getattr(lean, name)})
    assert name not in names and getattr(full, name) is getattr(lean, name)
    assert full.vae is not None and full.text_encoder is not None and full.tokenizer is not None
    plain = load_pipeline(str(folder))
    assert getattr(full, "default_sample_size", None) == getattr(plain, "default_sample_size", None)


def test_an_unsupported_pipeline_is_refused_with_or_without_its_transformer():
    from deradiff.errors import UserError
    from deradiff.training.families import family_of

    class PixArtAlphaPipeline:  # a transformer pipeline of no supported family
        def __init__(self, transformer):
            self.transformer, self.config = transformer, {"transformer": ["diffusers", "PixArtTransformer2DModel"]}

    class PixArtTransformer2DModel(torch.nn.Module):
        pass

    with pytest.raises(UserError, match=r"^PixArtAlphaPipeline \(its denoiser: PixArtTransformer2DModel\) is not a "):
        family_of(PixArtAlphaPipeline(PixArtTransformer2DModel()))
    with pytest.raises(UserError, match=r"^PixArtAlphaPipeline is not a supported family"):
        family_of(PixArtAlphaPipeline(None))  # left out, as `deradiff cache` loads it: not taken for SD1.5


@pytest.mark.parametrize("model", ["toy", "toy-flow"])
def test_the_toy_plugin_leaves_components_out_and_keeps_a_given_denoiser_in_its_dtype(model):
    with loaded_components() as names:
        lean = load_pipeline(model, components=LEFT_OUT)
    name = denoiser_name(lean)
    assert sorted(names) == sorted([name, "scheduler"]) and lean.vae is None and lean.text_encoder is None
    denoiser = getattr(lean, name)
    full = load_pipeline(model, dtype=torch.bfloat16, components={name: denoiser})
    assert getattr(full, name) is denoiser and next(denoiser.parameters()).dtype == torch.float32
    assert next(full.vae.parameters()).dtype == next(full.text_encoder.parameters()).dtype == torch.bfloat16


def test_a_plugin_loader_without_components_gets_them_set_after_loading(tmp_path, monkeypatch):
    from conftest import build_tiny_sd15

    from deradiff.plugins import MODELS, ModelEntry, load_plugins

    load_plugins()
    monkeypatch.setitem(MODELS, "whole-only", ModelEntry(load=lambda dtype=None, device="cpu": build_tiny_sd15(tmp_path),
                                                         help="a plug-in loader that always loads everything"))
    pipe = load_pipeline("whole-only", components=LEFT_OUT)
    assert pipe.vae is None and pipe.text_encoder is None and pipe.tokenizer is None and pipe.unet is not None
