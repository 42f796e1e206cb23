"""Synthetic preference data: Bradley-Terry labels, the Pick-a-Pic parquet format, broken files."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from deradiff.errors import UserError
from deradiff.toy.prefs import (
    CORRUPT_KINDS,
    PrefsConfig,
    bradley_terry_labels,
    load_prefs,
    make_prefs,
    sample_pairs,
)
from deradiff.toy.prompts import test_prompts as _test_prompts  # not collected as a test
from deradiff.toy.prompts import train_prompts

PAIRS, TEST_PAIRS, BROKEN = 2, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest


@pytest.fixture(scope="module")
def pipe():
    from deradiff.toy.pipeline import build_toy_pipeline

    return build_toy_pipeline(seed=0)  # random weights: the format does not need a trained model


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, pipe):
    out = tmp_path_factory.mktemp("prefs")
    cfg = PrefsConfig(out=str(out), pairs_per_prompt=PAIRS, test_pairs_per_prompt=TEST_PAIRS, steps=2,
                      batch_size=40, corrupt=BROKEN, temperature=0.002, tie_fraction=0.1)
    meta = make_prefs(cfg, pipe=pipe)
    ds = load_prefs(out, cache_dir=str(tmp_path_factory.mktemp("hf_cache")))
    return out, meta, ds


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _valid_labels(l0, l1) -> bool:
    return (l0, l1) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}


def test_bradley_terry_labels():
    rng = np.random.default_rng(0)
    r0, r1 = rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000)
    l0, l1 = bradley_terry_labels(r0, r1, temperature=1.0, tie_fraction=0.1, rng=np.random.default_rng(1))
    ties = l0 == 0.5
    assert ties.sum() == 2000 and np.all(l0 + l1 == 1)
    gap = np.abs(r0 - r1)
    assert gap[ties].max() <= gap[~ties].min()  # ties are the closest pairs
    p0 = 1 / (1 + np.exp(-(r0 - r1)))
    assert l0[~ties].mean() == pytest.approx(p0[~ties].mean(), abs=0.01)  # labels drawn at the BT rate
    sharp, _ = bradley_terry_labels(r0, r1, temperature=1e-6, tie_fraction=0.0, rng=np.random.default_rng(1))
    assert np.array_equal(sharp == 1, r0 > r1)
    flat, _ = bradley_terry_labels(r0, r1, temperature=1e6, tie_fraction=0.0, rng=np.random.default_rng(1))
    assert 0.48 < ((flat == 1) == (r0 > r1)).mean() < 0.52


def test_parquet_round_trip_with_datasets(prefs):
    from deradiff.toy.domain import to_tensor
    from deradiff.toy.reward import toy_reward

    _, meta, ds = prefs
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) == PAIRS * len(train_prompts()) and len(ds["test"]) == TEST_PAIRS * len(_test_prompts())
    features = ds["train"].features
    assert {k: features[k].dtype for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")} == {
        "caption": "string", "jpg_0": "binary", "jpg_1": "binary", "label_0": "float64", "label_1": "float64"}
    for split, prompts, per_prompt in (("train", train_prompts(), PAIRS), ("test", _test_prompts(), TEST_PAIRS)):
        rows = ds[split]
        assert Counter(rows["caption"]) == {p: per_prompt for p in prompts}
        assert all(_valid_labels(a, b) for a, b in zip(rows["label_0"], rows["label_1"], strict=True))
        assert sum(v == 0.5 for v in rows["label_0"]) == round(0.1 * len(rows)) == meta[split]["ties"]
        img0 = np.stack([_decode(b) for b in rows["jpg_0"]])
        img1 = np.stack([_decode(b) for b in rows["jpg_1"]])
        assert img0.shape == (len(rows), 32, 32, 3) and img0.dtype == np.uint8
        # the stored rewards are the toy reward of the stored pixels, and the labels follow them
        r0 = toy_reward(to_tensor(img0)).double().numpy()
        assert np.allclose(r0, rows["reward_0"], atol=1e-6)
        assert np.allclose(toy_reward(to_tensor(img1)).double().numpy(), rows["reward_1"], atol=1e-6)
        assert meta[split]["agreement_with_reward_order"] > 0.7
    seeds = [s for split in ("train", "test") for col in ("seed_0", "seed_1") for s in ds[split][col]]
    assert len(set(seeds)) == len(seeds)


def test_broken_files_contain_what_they_claim(prefs, tmp_path):
    import datasets

    from deradiff.training.data import filter_pairs

    out, meta, _ = prefs
    listing = json.loads((out / "corrupt.json").read_text())
    assert set(listing) == set(CORRUPT_KINDS)
    for filename, info in listing.items():
        rows = datasets.load_dataset("parquet", data_files=str(out / filename), split="train",
                                     cache_dir=str(tmp_path / filename))
        assert len(rows) == info["rows"] == meta["corrupt"][filename]["rows"]
        broken = {c["row"]: c["kind"] for c in info["corrupt"]}
        assert len(broken) == BROKEN and set(broken.values()) == set(CORRUPT_KINDS[filename])
        for i, row in enumerate(rows):
            decodes = all(_decodes(row[k]) for k in ("jpg_0", "jpg_1"))
            labels_ok = _valid_labels(row["label_0"], row["label_1"])
            if filename == "corrupt.parquet":
                assert decodes != (i in broken), (i, broken.get(i))
                assert labels_ok and (i not in broken or row["label_0"] != 0.5)  # broken rows: no ties
            else:
                assert labels_ok != (i in broken), (i, broken.get(i))
                assert decodes
        # the project's Pick-a-Pic loader skips and counts exactly the broken images, and refuses bad labels
        if filename == "corrupt.parquet":
            _, stats = filter_pairs(rows, filename)
            assert stats.corrupt == BROKEN
        else:
            with pytest.raises(UserError, match=f"{BROKEN} row\\(s\\) with invalid labels"):
                filter_pairs(rows, filename)


def _decodes(data: bytes) -> bool:
    try:
        _decode(data)
    except Exception:
        return False
    return True


def test_images_do_not_depend_on_batch_size(pipe):
    call = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt")
    prompts = _test_prompts()[:3]
    a = sample_pairs(pipe, prompts, 2, 123, call, batch_size=5, desc="a")
    b = sample_pairs(pipe, prompts, 2, 123, call, batch_size=12, desc="b")
    for key in ("images_0", "images_1"):
        diff = np.abs(np.stack(a[key]).astype(int) - np.stack(b[key]).astype(int))
        assert diff.max() <= 1  # the same seeds; batch size may only move float rounding
    assert a["seed_0"] == b["seed_0"] and a["caption"] == b["caption"]


def test_cli_on_a_saved_pipeline(tmp_path, pipe):
    from deradiff.cli import main
    from deradiff.toy.store import write_manifest

    root = tmp_path / "assets"
    pipe.save_pretrained(str(root / "pipeline"), safe_serialization=True)
    write_manifest(root)
    out = tmp_path / "prefs"
    args = ["toy", "make-prefs", "--pipeline", str(root), "--out", str(out), "--pairs-per-prompt", "1",
            "--test-pairs-per-prompt", "1", "--steps", "1", "--corrupt", "0", "--threads", "1"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.parquet", "train.parquet"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["pairs"] == len(train_prompts()) and meta["sampler"]["num_inference_steps"] == 1


@pytest.mark.parametrize("flag, value, match", [
    ("--temperature", "0", "temperature"),
    ("--tie-fraction", "1", "tie-fraction"),
    ("--pairs-per-prompt", "0", "pairs-per-prompt"),
    ("--pipeline", "/does/not/exist", "does not exist"),
])
def test_bad_input_stops_before_sampling(tmp_path, capsys, flag, value, match):
    from deradiff.cli import main

    assert main(["toy", "make-prefs", "--out", str(tmp_path / "o"), flag, value]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_validate_collects_errors():
    with pytest.raises(UserError, match="temperature.*steps"):
        PrefsConfig(temperature=-1, steps=0).validate()


def test_flow_family_samples_the_flow_twin_and_writes_the_same_format(tmp_path):
    """--family flow: pairs drawn by the shipped StableDiffusion3Pipeline twin with its own sampler
    settings (one T5 placeholder token), same columns and labels as the UNet family."""
    from deradiff.toy.flow import load_flow_pipeline

    cfg = PrefsConfig(out=str(tmp_path / "flow"), family="flow", pairs_per_prompt=1, test_pairs_per_prompt=1,
                      steps=2, batch_size=96, corrupt=0)
    meta = make_prefs(cfg)
    assert meta["sampler"]["max_sequence_length"] == 1 and meta["sampler"]["num_inference_steps"] == 2
    ds = load_prefs(tmp_path / "flow", cache_dir=str(tmp_path / "hf_cache"))
    assert len(ds["train"]) == len(train_prompts()) and len(ds["test"]) == len(_test_prompts())
    row = ds["test"][0]
    first = _decode(row["jpg_0"])
    # the first test image is the flow twin's sample for that caption and seed (not the UNet toy's)
    pipe = load_flow_pipeline()
    from deradiff.toy.flow import flow_sampling_kwargs

    direct = pipe([row["caption"]], generator=[torch.Generator().manual_seed(row["seed_0"])],
                  **{**flow_sampling_kwargs(), "num_inference_steps": 2}).images
    expect = (direct.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()[0]
    assert np.array_equal(first, expect)


def test_unknown_family_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--family must be one of unet, flow"):
        make_prefs(PrefsConfig(out=str(tmp_path), family="dit"))
