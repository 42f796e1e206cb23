"""The latent and text-embedding cache (deradiff.training.cache) on the toy world: what it
stores equals what the uncached run computes, and a cache made for another recipe is refused.
(The cached vs uncached training losses: tests/test_train.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deradiff.errors import UserError
from deradiff.training.cache import build_cache, open_cache
from deradiff.training.recipe_load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(toy_world, cache, *over: str):
    return load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [
        f"model.name_or_path={toy_world / 'pipe'}", f"data.path={toy_world / 'prefs' / 'train.parquet'}",
        f"data.eval_path={toy_world / 'prefs' / 'test.parquet'}", f"data.latent_cache={cache}", *over])


@pytest.fixture(scope="module")
def cache(toy_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("latent-cache") / "cache"
    build_cache(_recipe(toy_world, folder), batch_size=16, shard_pairs=16, num_workers=0, log=lambda _: None)
    return folder


def test_cached_pairs_hold_the_uncached_posteriors_flips_and_embeddings(toy_world, cache):
    """Pair i at epoch e: the VAE posterior (mean, std) of exactly the images the uncached
    PreferencePairs gives at that epoch (its keyed flip), and the caption's text embeddings."""
    from deradiff.models import load_pipeline
    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.data import load_preference_dataset

    recipe = _recipe(toy_world, cache)
    pairs = open_cache(recipe).pairs("train", seed=0, random_flip=True)
    plain, _ = load_preference_dataset(recipe.data, seed=0)
    assert len(pairs) == len(plain) == 44 and len(pairs.split["shards"]) == 3  # 16 + 16 + 12
    pipe = load_pipeline(str(toy_world / "pipe"))
    flips = set()
    for epoch, index in ((0, 0), (0, 17), (1, 17), (2, 40), (3, 40), (5, 3)):
        plain.set_epoch(epoch)
        want, got = plain[index], pairs.item(index, epoch)
        flips.add(pairs.flip_of(index, epoch))
        with torch.no_grad():
            dist = pipe.vae.encode(torch.stack([want["pixel_values_w"], want["pixel_values_l"]])).latent_dist
        torch.testing.assert_close(got["latent_mean"], dist.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["latent_std"], dist.std, rtol=1e-5, atol=1e-5)
        assert got["caption"] == want["caption"] and got["original_size"] == want["original_size"]
        cond = encode_prompts(pipe, [want["caption"]], "cpu")
        torch.testing.assert_close(got["text"]["encoder_hidden_states"], cond.encoder_hidden_states[0],
                                   rtol=1e-5, atol=1e-5)
    assert flips == {True, False}, "the checks cover flipped and unflipped pairs"
    held_out = open_cache(recipe).pairs("eval", seed=0, random_flip=False)
    assert len(held_out) == 15 and held_out.metrics()["data/kept"] == 15


def test_cached_latents_are_the_uncached_posterior_draw(toy_world, cache):
    """cached_latents = dpo.encode_latents' keyed draw from the same posterior."""
    from deradiff.models import load_pipeline
    from deradiff.training.cache import cached_latents, collate_cached
    from deradiff.training.data import collate_pairs, load_preference_dataset
    from deradiff.training.dpo import encode_latents

    recipe = _recipe(toy_world, cache)
    pairs = open_cache(recipe).pairs("train", seed=0, random_flip=True)
    plain, _ = load_preference_dataset(recipe.data, seed=0)
    ids, epoch = [3, 30, 11], 2
    plain.set_epoch(epoch)
    batch = collate_pairs([plain[i] for i in ids])
    pipe = load_pipeline(str(toy_world / "pipe"))
    keys = [2 * i for i in ids] + [2 * i + 1 for i in ids]
    want = encode_latents(pipe.vae, torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]]), keys, 0, epoch)
    cached = collate_cached([pairs.item(i, epoch) for i in ids])
    got = cached_latents(cached, ids, 0, epoch, pipe.vae.config.scaling_factor, 0.0, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cache_made_for_another_recipe_is_refused_in_one_line(toy_world, cache, tmp_path):
    def refusal(recipe) -> str:
        with pytest.raises(UserError) as err:
            open_cache(recipe)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "data.resolution 32 (this recipe: 64)" in refusal(_recipe(toy_world, cache, "data.resolution=64"))
    # another VAE: the same pipeline with one VAE weight changed
    other = tmp_path / "pipe"
    shutil.copytree(toy_world / "pipe", other)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.01)
    vae.save_pretrained(other / "vae")
    message = refusal(_recipe(toy_world, cache, f"model.name_or_path={other}"))
    assert f"latent cache {cache} was made for another VAE / text encoders" in message
    assert "deradiff cache recipe=" in message
    # other data (a file with other content)
    data = tmp_path / "train.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(toy_world / "prefs" / "train.parquet").slice(0, 40), data)
    assert "another data (files or selection)" in refusal(_recipe(toy_world, cache, f"data.path={data}"))
    assert "holds no latent cache" in refusal(_recipe(toy_world, tmp_path / "empty"))
    # a cache of both flips serves a recipe without flips; a sweep's other betas are the same recipe
    assert open_cache(_recipe(toy_world, cache, "data.random_flip=false", "method.beta=500")).has("train")


def test_building_refuses_what_it_cannot_cache_and_keeps_a_finished_cache(toy_world, cache, tmp_path):
    with pytest.raises(UserError, match="data.random_crop=true cannot be cached"):
        build_cache(_recipe(toy_world, tmp_path / "c", "data.random_crop=true"))
    with pytest.raises(UserError, match="recipe: .*data.random_crop=true cannot be cached"):
        load_recipe(ROOT / "recipes" / "toy-dpo.yaml", ["data.random_crop=true", f"data.latent_cache={tmp_path}"])
    with pytest.raises(UserError, match="data.latent_cache serves method dpo"):
        load_recipe(ROOT / "recipes" / "toy-kl-grad.yaml", [f"data.latent_cache={tmp_path}"])
    with pytest.raises(UserError, match=f"{cache} holds the latent cache of another data.resolution"):
        build_cache(_recipe(toy_world, cache, "data.resolution=16"))
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    lines = []
    build_cache(_recipe(toy_world, cache), log=lines.append)
    assert "nothing to do" in lines[0] and before == {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_sdxl_cached_conditioning_is_the_encoded_one_with_per_pair_time_ids(tmp_path):
    """SDXL: pooled text embeds come from the cache's table, time ids from each pair's original
    size and crop, as encode_prompts builds them for the uncached batch."""
    from conftest import build_tiny_sdxl, write_pick_a_pic_parquet

    from deradiff.training.cache import cached_conditioning, collate_cached
    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.data import collate_pairs, load_preference_dataset

    pipe = build_tiny_sdxl(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    write_pick_a_pic_parquet(tmp_path / "train.parquet", 12, seed=0, size=40)  # 40 px -> resized and cropped
    recipe = load_recipe(ROOT / "recipes" / "sdxl-dpo-pickapic.yaml", [
        f"model.name_or_path={tmp_path / 'pipe'}", "model.vae_name_or_path=null", "model.mixed_precision=no",
        "data.source=parquet", f"data.path={tmp_path / 'train.parquet'}", "data.eval_path=null", "data.eval_split=null",
        "data.resolution=32", f"data.latent_cache={tmp_path / 'cache'}", "data.max_train_samples=null"])
    build_cache(recipe, batch_size=4, num_workers=0, pipe=pipe, log=lambda _: None)
    pairs = open_cache(recipe).pairs("train", seed=0, random_flip=True)
    plain, _ = load_preference_dataset(recipe.data, seed=0)
    ids = [0, 5, 9]
    got = cached_conditioning(collate_cached([pairs.item(i, 1) for i in ids]), "sdxl", 32, "cpu")
    plain.set_epoch(1)
    batch = collate_pairs([plain[i] for i in ids])
    want = encode_prompts(pipe, batch["captions"], "cpu", 32, batch["original_sizes"], batch["crops_top_left"])
    assert got.family == want.family == "sdxl"
    torch.testing.assert_close(got.encoder_hidden_states, want.encoder_hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.added_cond_kwargs["text_embeds"], want.added_cond_kwargs["text_embeds"],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.added_cond_kwargs["time_ids"], want.added_cond_kwargs["time_ids"])
    assert want.added_cond_kwargs["time_ids"][:, :2].eq(40).all()  # original 40 x 40, not the target 32
