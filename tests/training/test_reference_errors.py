"""Stored reference errors (deradiff.training.reference_errors) on the toy world: a sweep's later
beta reads the first run's errors, trains exactly as an independent run and never calls the
reference UNet; resuming, precomputing, other settings and several processes writing at once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from deradiff.errors import UserError
from deradiff.training.recipe_load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4  # 4 pairs per step: 11 steps per epoch of the 44 toy pairs


def _recipe(toy_world, cache, out, *over: str):
    return load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [
        f"model.name_or_path={toy_world / 'pipe'}", f"data.path={toy_world / 'prefs' / 'train.parquet'}",
        f"data.eval_path={toy_world / 'prefs' / 'test.parquet'}", f"data.latent_cache={cache}",
        "data.max_eval_samples=4", "data.num_workers=0", "method.eval_draws=1", "sample.prompts=[]",
        f"trainer.max_steps={STEPS}", "trainer.per_device_batch_size=4", "trainer.checkpoint_every=2",
        "trainer.eval_every=0", "trainer.log_every=1", "trainer.warmup_steps=0", f"trainer.output_dir={out}", *over])


def _fit(recipe) -> dict:
    """Train in this process; -> {"losses": {step: dpo/loss}, "summary", "calls": UNet forwards
    with the LoRA disabled (the reference) and enabled (the model)}."""
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DConditionModel

    from deradiff.models import tuner_layers
    from deradiff.training import trainer
    from deradiff.training.methods import METHODS

    calls = {"reference": 0, "model": 0}
    forward = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):
        layers = tuner_layers(self)
        calls["reference" if layers and all(x._disable_adapters for x in layers) else "model"] += 1
        return forward(self, *args, **kwargs)

    run_dir = Path(recipe.trainer.output_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet2DConditionModel, "forward", counted)
        mp.setattr(trainer, "_install_preemption_handlers", lambda: {"flag": False, "name": ""})
        trainer.fit(recipe, METHODS["dpo"], run_dir)
    AcceleratorState._reset_state(reset_partial_state=True)  # later in-process users start clean
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["dpo/loss"] for r in rows}, "calls": calls,
            "summary": json.loads((run_dir / "summary.json").read_text())}


def _assert_same_training(got: dict, want: dict) -> None:
    assert sorted(got["losses"]) == list(range(1, STEPS + 1)) == sorted(want["losses"])
    for step, loss in want["losses"].items():
        assert abs(got["losses"][step] - loss) <= 1e-6, (step, got["losses"][step], loss)
    for key in ("eval/dpo/loss", "eval/dpo/ref_mse", "eval/dpo/model_mse", "dpo/ref_mse"):
        assert abs(got["summary"][key] - want["summary"][key]) <= 1e-6, key


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """(toy_world, its latent cache, a scratch folder)."""
    from deradiff.training.cache import build_cache

    root = tmp_path_factory.mktemp("reference-errors")
    cache = root / "cache"
    build_cache(_recipe(toy_world, cache, root / "unused"), batch_size=16, num_workers=0, log=lambda _: None)
    return toy_world, cache, root


@pytest.fixture(scope="module")
def independent(world) -> dict:
    """The sweep's second beta trained on its own (no store)."""
    toy_world, cache, root = world
    return _fit(_recipe(toy_world, cache, root / "independent", "method.beta=500"))


@pytest.fixture(scope="module")
def first_run(world) -> dict:
    """The sweep's first beta, storing its reference errors in data.latent_cache/reference-errors."""
    toy_world, cache, root = world
    return _fit(_recipe(toy_world, cache, root / "beta-2000", "method.beta=2000", "data.reference_errors=on"))


def test_the_second_beta_reads_the_first_runs_errors_and_skips_the_reference(world, first_run, independent):
    toy_world, cache, root = world
    assert first_run["calls"]["reference"] == STEPS + 1  # 4 steps + the final held-out evaluation
    assert first_run["summary"]["data/reference_errors_computed"] == STEPS
    assert first_run["summary"]["data/reference_errors_stored"] == 0
    second = _fit(_recipe(toy_world, cache, root / "beta-500", "method.beta=500", "data.reference_errors=on"))
    assert second["calls"]["reference"] == 0 and second["calls"]["model"] == independent["calls"]["model"]
    assert second["summary"]["data/reference_errors_stored"] == STEPS
    assert second["summary"]["data/reference_errors_computed"] == 0
    _assert_same_training(second, independent)
    assert independent["calls"]["reference"] == STEPS + 1
    assert "data/reference_errors_stored" not in independent["summary"]  # off: no store, no count


def test_a_resumed_run_stores_and_reads_its_errors_and_trains_as_the_uninterrupted_one(world, independent):
    """Stopped after 2 steps (a checkpoint) and resumed to 4 in a fresh store folder: the losses
    are the uninterrupted run's; the store then serves a later beta completely."""
    toy_world, cache, root = world
    store = root / "store-resumed"
    over = ("method.beta=500", f"data.reference_errors={store}")
    half = _fit(_recipe(toy_world, cache, root / "resumed", *over, "trainer.max_steps=2"))
    assert half["summary"]["step"] == 2 and half["calls"]["reference"] == 2 + 1
    rest = _fit(_recipe(toy_world, cache, root / "resumed", *over))
    assert rest["calls"]["reference"] == 2, "steps 3-4 computed; the held-out draws read from the first half"
    assert rest["summary"]["data/reference_errors_computed"] == 2
    _assert_same_training(rest, independent)
    later = _fit(_recipe(toy_world, cache, root / "later", "method.beta=1000", f"data.reference_errors={store}"))
    assert later["calls"]["reference"] == 0 and later["summary"]["data/reference_errors_stored"] == STEPS


def test_precomputed_errors_serve_every_micro_batch(world, independent, monkeypatch):
    """`deradiff cache ... --reference-epochs 1`: epoch 0 and the held-out draws, computed in other
    batches than training's (so equal to float rounding), then no reference forward in training;
    the precomputation loads the denoiser alone (the cache stands in for the encoders)."""
    import deradiff.models
    from deradiff.training.cache import add_arguments, run

    loaded = []
    real_load = deradiff.models.load_pipeline

    def spy(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]
    monkeypatch.setattr(deradiff.models, "load_pipeline", spy)

    toy_world, cache, root = world
    store = root / "store-precomputed"
    items = [f"recipe={ROOT / 'recipes' / 'toy-dpo.yaml'}", f"model.name_or_path={toy_world / 'pipe'}",
             f"data.path={toy_world / 'prefs' / 'train.parquet'}", f"data.eval_path={toy_world / 'prefs' / 'test.parquet'}",
             f"data.latent_cache={cache}", "data.max_eval_samples=4", "method.eval_draws=1"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UserError, match="data.reference_errors=on"):
        run(parser.parse_args([*items, "--reference-epochs", "1"]))
    assert run(parser.parse_args([*items, f"data.reference_errors={store}", "--reference-epochs", "1",
                                  "--batch-size", "8", "--device", "cpu", "--num-workers", "0"])) == 0
    assert loaded and all(p.vae is None and p.text_encoder is None for p in loaded)
    monkeypatch.undo()
    [folder] = [p for p in store.iterdir() if p.is_dir()]
    got = _fit(_recipe(toy_world, cache, root / "precomputed", "method.beta=500", f"data.reference_errors={store}"))
    assert got["calls"]["reference"] == 0 and got["summary"]["data/reference_errors_stored"] == STEPS
    for step, loss in independent["losses"].items():
        assert abs(got["losses"][step] - loss) <= 1e-5, (step, got["losses"][step], loss)
    assert [p.name for p in store.iterdir()] == [folder.name], "training used the precomputed store"


def test_a_store_made_with_other_settings_is_ignored_with_a_note_naming_the_difference(world, first_run):
    from diffusers import DDIMScheduler

    from deradiff.training.cache import open_cache
    from deradiff.training.reference_errors import identity_difference, open_store, store_identity

    toy_world, cache, root = world
    scheduler = DDIMScheduler.from_pretrained(toy_world / "pipe", subfolder="scheduler")
    held_out = [0, 1, 2, 3]  # the first run's final evaluation stored these pairs' draw -1

    base = _recipe(toy_world, cache, root / "unused", "data.reference_errors=on")
    opened_cache = open_cache(base)  # (the cache's rows depend on the seed: it samples held-out pairs)

    def opened(*over: str):
        lines: list[str] = []
        store = open_store(_recipe(toy_world, cache, root / "unused", "data.reference_errors=on", *over),
                           opened_cache, scheduler, log=lines.append)
        return store, lines

    same, lines = opened("method.beta=1")  # another beta: the same store
    assert same.lookup(held_out, -1) is not None and not any("ignoring" in line for line in lines)
    other, lines = opened("trainer.seed=1")
    assert "ignoring 1 store(s)" in lines[0] and "trainer.seed 0 (this run: 1)" in lines[0] and "\n" not in lines[0]
    assert other.folder != same.folder and len(other) == 0 and other.lookup(held_out, -1) is None
    _, lines = opened("data.random_flip=false")
    assert "data.random_flip True (this run: False)" in lines[0]
    now = store_identity(base, opened_cache, scheduler)
    v_pred = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    assert identity_difference(now, store_identity(base, opened_cache, v_pred)) == \
        "prediction_type 'epsilon' (this run: 'v_prediction')"
    bf16 = _recipe(toy_world, cache, root / "unused", "data.reference_errors=on", "model.mixed_precision=bf16")
    assert identity_difference(now, store_identity(bf16, opened_cache, scheduler)) == \
        "model.mixed_precision 'no' (this run: 'bf16')"
    changed = {**now, "data.latent_cache": "0" * 64}
    assert identity_difference(changed, now).startswith("latent cache")


def test_processes_and_runs_writing_at_once_never_collide(tmp_path):
    """Ranks 0 and 1 of one run and rank 0 of another write into one store folder: three shards
    under distinct names, each whole; a reader sees every draw (held-out negative epochs too), a
    draw stored twice once; a half-written temporary and a foreign file are ignored."""
    from deradiff.training.reference_errors import ReferenceErrorStore

    folder = tmp_path / "store"
    folder.mkdir()
    writers = [ReferenceErrorStore(folder, rank=r) for r in (0, 1, 0)]
    for writer, pairs in zip(writers, ([0, 1], [2, 3], [1, 4, 5]), strict=True):  # pair 1: both runs
        base = torch.tensor(pairs, dtype=torch.float32)
        writer.add(pairs, 0, base + 0.25, base + 0.5)
    writers[0].add([7, 8], -1, torch.tensor([7.25, 8.25]), torch.tensor([7.5, 8.5]))  # held-out draws
    (folder / ".errors-r00000-x.safetensors.abc.tmp").write_bytes(b"half")  # what a killed writer leaves
    (folder / "errors-foreign.safetensors").write_bytes(b"not safetensors")
    for w in writers:
        w.flush()
    shards = sorted(p.name for p in folder.glob("errors-r*.safetensors"))
    assert len(shards) == 3 and len({s.split("-")[1] for s in shards}) == 2  # ranks 00000 (twice) and 00001
    reader = ReferenceErrorStore(folder)
    assert len(reader) == 6 + 2  # pairs 0-5 at epoch 0 (pair 1 once), 7-8 held out
    err_w, err_l = reader.lookup([5, 0, 3, 1], 0)
    torch.testing.assert_close(err_w, torch.tensor([5.25, 0.25, 3.25, 1.25]))
    torch.testing.assert_close(err_l, torch.tensor([5.5, 0.5, 3.5, 1.5]))
    torch.testing.assert_close(reader.lookup([8, 7], -1)[0], torch.tensor([8.25, 7.25]))
    assert reader.lookup([0, 6], 0) is None and reader.lookup([0], 1) is None  # all or nothing
    assert reader.lookup([7], 0) is None  # the held-out draw of pair 7 is not a training draw
    assert (reader.stored, reader.computed) == (1, 3)  # training micro-batches only
    # each writer read the others' shards when it flushed: the last one sees everything
    assert len(writers[2]) == 8 and writers[0].refresh() == 2 and len(writers[0]) == 8


def test_an_unwritable_store_is_read_only_and_processes_can_agree_to_compute(tmp_path, monkeypatch):
    """A failed write (full disk, read-only folder) leaves training going with a warning; the
    errors stay usable in this process. ZeRO-3's agreement: one process without its errors makes
    every process compute."""
    from deradiff.training import reference_errors
    from deradiff.training.reference_errors import ReferenceErrorStore

    def full_disk(*args, **kwargs):
        raise UserError("no space left on the disk holding /x: free space there or write elsewhere")

    store = ReferenceErrorStore(tmp_path)
    store.add([0, 1], 0, torch.tensor([0.5, 1.5]), torch.tensor([0.25, 1.25]))
    monkeypatch.setattr(reference_errors, "atomic_write", full_disk)
    store.flush()
    assert not store.writable and not list(tmp_path.iterdir())
    assert store.lookup([1, 0], 0) is not None
    assert store.lookup([1, 0], 0, agree=lambda found: False) is None and (store.stored, store.computed) == (1, 1)


def test_the_recipe_key_is_checked_once(tmp_path):
    base = ROOT / "recipes" / "toy-dpo.yaml"
    assert load_recipe(base).data.reference_errors == "off"
    on = load_recipe(base, [f"data.latent_cache={tmp_path}", "data.reference_errors=on"])
    assert on.data.reference_errors == "on"  # not YAML's boolean True
    yaml = tmp_path / "r.yaml"
    yaml.write_text(base.read_text().replace("  random_flip: true\n", "  random_flip: true\n  reference_errors: off\n"))
    assert load_recipe(yaml).data.reference_errors == "off"
    with pytest.raises(UserError, match="data.reference_errors stores errors of the latent cache's draws"):
        load_recipe(base, ["data.reference_errors=on"])
    with pytest.raises(UserError, match="data.reference_errors is empty"):
        load_recipe(base, [f"data.latent_cache={tmp_path}", "data.reference_errors=' '"])
