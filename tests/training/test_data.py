"""Pick-a-Pic preference loading on tiny parquet files built here, and prompt files."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from deradiff.errors import UserError
from deradiff.training.data import (
    PreferencePairs,
    collate_pairs,
    decode_image,
    filter_pairs,
    load_preference_dataset,
    resolve_parquet_files,
    transform_pair,
)
from deradiff.training.recipe import DataSection

R = 16  # training resolution in these tests


def _image(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    """An image whose left half has `color` and right half is black: flips are visible."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = color
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95)
    return buf.getvalue()


RED, GREEN = (230, 20, 20), (20, 230, 20)
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def _write_parquet(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _rows() -> list[dict]:
    """The preferred image is always red, the rejected one green."""
    return [
        {"caption": "pair 0", "jpg_0": _image(RED), "jpg_1": _image(GREEN, fmt="JPEG"), "label_0": 1.0, "label_1": 0.0},
        {"caption": "pair 1 (flipped)", "jpg_0": _image(GREEN, fmt="JPEG"), "jpg_1": _image(RED), "label_0": 0.0, "label_1": 1.0},
        {"caption": "tie", "jpg_0": _image(RED), "jpg_1": _image(GREEN), "label_0": 0.5, "label_1": 0.5},
        {"caption": "corrupt", "jpg_0": CORRUPT, "jpg_1": _image(GREEN), "label_0": 1.0, "label_1": 0.0},
        {"caption": "pair 4 (tall)", "jpg_0": _image(RED, (40, 48)), "jpg_1": _image(GREEN, (32, 32)), "label_0": 1.0, "label_1": 0.0},
        {"caption": "pair 5 (flipped)", "jpg_0": _image(GREEN), "jpg_1": _image(RED), "label_0": 0, "label_1": 1},
    ]


@pytest.fixture()
def prefs(tmp_path) -> DataSection:
    train = _write_parquet(tmp_path / "train.parquet", _rows())
    test = _write_parquet(tmp_path / "test.parquet", [_rows()[0], _rows()[1]])
    return DataSection(source="parquet", path=train, eval_path=test, resolution=R, random_flip=True,
                       cache_dir=str(tmp_path / "hf-cache"))


def _dominant(pixels: torch.Tensor) -> str:
    red, green = pixels[0].mean().item(), pixels[1].mean().item()
    return "red" if red > green else "green"


def _bright_left(pixels: torch.Tensor) -> bool:
    half = pixels.shape[-1] // 2
    return pixels[:, :, :half].mean().item() > pixels[:, :, half:].mean().item()


def test_filtering_stats_ties_flips_and_corrupt_rows(prefs):
    pairs, stats = load_preference_dataset(prefs)
    assert (stats.rows, stats.ties, stats.corrupt, stats.flipped, stats.kept) == (6, 1, 1, 2, 4)
    assert len(pairs) == 4
    assert "1 ties dropped" in stats.summary() and "1 with a corrupt image" in stats.summary()
    captions = []
    for i in range(len(pairs)):
        item = pairs[i]
        captions.append(item["caption"])
        assert item["pixel_values_w"].shape == item["pixel_values_l"].shape == (3, R, R)
        assert item["pixel_values_w"].min() >= -1 and item["pixel_values_w"].max() <= 1
        # the preferred image comes first, also for label_0 == 0 rows
        assert _dominant(item["pixel_values_w"]) == "red" and _dominant(item["pixel_values_l"]) == "green"
    assert captions == ["pair 0", "pair 1 (flipped)", "pair 4 (tall)", "pair 5 (flipped)"]


def test_flip_is_shared_by_both_images_and_keyed_by_epoch(prefs):
    pairs, _ = load_preference_dataset(prefs, seed=3)
    seen = set()
    for epoch in range(8):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            item = pairs[i]
            w_left, l_left = _bright_left(item["pixel_values_w"]), _bright_left(item["pixel_values_l"])
            assert w_left == l_left, "both images of a pair get the same flip"
            seen.add(w_left)
    assert seen == {True, False}, "random_flip flips some pairs and not others"
    # Deterministic: the same (seed, epoch, index) gives the same tensors.
    pairs.set_epoch(5)
    again, _ = load_preference_dataset(prefs, seed=3)
    again.set_epoch(5)
    assert torch.equal(pairs[2]["pixel_values_w"], again[2]["pixel_values_w"])
    no_flip, _ = load_preference_dataset(replace(prefs, random_flip=False))
    assert all(_bright_left(no_flip[i]["pixel_values_w"]) for i in range(len(no_flip)))


def test_geometry_for_sdxl_time_ids(prefs):
    pairs, _ = load_preference_dataset(replace(prefs, random_flip=False))
    tall = pairs[2]
    assert tall["caption"] == "pair 4 (tall)"
    # 40 wide x 48 high: resized to 16 x 19 (shorter side 16), center crop top = round(1.5) = 2
    assert tall["original_size"] == (48, 40) and tall["crop_top_left"] == (2, 0)
    assert pairs[0]["original_size"] == (32, 32) and pairs[0]["crop_top_left"] == (0, 0)
    crops = set()
    random_crop, _ = load_preference_dataset(replace(prefs, random_crop=True))
    for epoch in range(12):
        random_crop.set_epoch(epoch)
        top, left = random_crop[2]["crop_top_left"]
        assert 0 <= top <= 19 - R and left == 0
        crops.add(top)
    assert len(crops) > 1, "random crops vary with the epoch"


def test_transform_pair_matches_torchvision_official_pipeline():
    """Center crop + no flip equals the official Diffusion-DPO torchvision transform."""
    from torchvision import transforms

    official = transforms.Compose([
        transforms.Resize(R, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(R),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    a = decode_image(_image(RED, (40, 48)))
    b = decode_image(_image(GREEN, (40, 48), fmt="JPEG"))
    tw, tl, geo = transform_pair(a, b, R, random_crop=False, random_flip=False)
    torch.testing.assert_close(tw, official(a), atol=1e-6, rtol=0)
    torch.testing.assert_close(tl, official(b), atol=1e-6, rtol=0)
    assert not geo.flipped


def test_collate(prefs):
    pairs, _ = load_preference_dataset(prefs)
    batch = collate_pairs([pairs[i] for i in range(3)])
    assert batch["pixel_values_w"].shape == batch["pixel_values_l"].shape == (3, 3, R, R)
    assert batch["captions"] == ["pair 0", "pair 1 (flipped)", "pair 4 (tall)"]
    assert batch["original_sizes"].dtype == torch.long and batch["original_sizes"].tolist()[2] == [48, 40]
    assert batch["crops_top_left"].shape == (3, 2) and batch["indices"].tolist() == [0, 1, 2]


def test_lazy_corrupt_rows_are_skipped_and_counted(prefs):
    pairs, stats = load_preference_dataset(replace(prefs, verify_images=False))
    assert len(pairs) == 5 and stats.corrupt == 0
    item = pairs[2]  # the corrupt row: replaced by the next decodable pair
    assert item["caption"] == "pair 4 (tall)" and stats.corrupt == 1
    pairs[2]
    assert stats.corrupt == 1, "a known-bad row is counted once"


def test_corrupt_counts_as_metrics_indexed_and_streamed(prefs, caplog):
    pairs, _ = load_preference_dataset(replace(prefs, verify_images=False))
    pairs[2]  # the corrupt row, found while iterating
    assert pairs.metrics()["data/corrupt"] == 1 and pairs.bad_rows == {2}
    assert pairs.metrics(bad_rows={2, 3})["data/corrupt"] == 2  # united over ranks by the trainer
    verified, _ = load_preference_dataset(prefs)
    assert verified.metrics() == {"data/pairs_read": 6.0, "data/ties": 1.0, "data/flipped": 2.0,
                                  "data/corrupt": 1.0, "data/kept": 4.0}
    stream, stats = load_preference_dataset(replace(prefs, streaming=True))
    with caplog.at_level("WARNING", logger="deradiff.training.data"):
        list(stream)
    assert stats.as_metrics() == verified.metrics(), "the first pass counts the data as the indexed path does"
    assert "skipping streamed row" in caplog.text
    stream.set_epoch(1)
    list(stream)  # a second pass re-reads the same rows: not counted again
    assert stats.as_metrics() == verified.metrics()


def test_max_samples_and_held_out_pairs(prefs):
    pairs, stats = load_preference_dataset(replace(prefs, max_train_samples=3, verify_images=False))
    assert stats.rows == 3 and len(pairs) + stats.ties == 3
    held_out, stats = load_preference_dataset(prefs, which="eval")
    assert stats.kept == 2 and not held_out.random_flip
    assert all(_dominant(held_out[i]["pixel_values_w"]) == "red" for i in range(2))
    with pytest.raises(UserError, match="data.eval_path"):
        load_preference_dataset(replace(prefs, eval_path=None), which="eval")


def test_streaming_gives_the_same_pairs(prefs):
    stream, stats = load_preference_dataset(replace(prefs, streaming=True))
    items = list(stream)  # shuffled through a buffer: the same pairs, in a seeded order
    assert sorted(i["caption"] for i in items) == ["pair 0", "pair 1 (flipped)", "pair 4 (tall)", "pair 5 (flipped)"]
    assert [i["caption"] for i in load_preference_dataset(replace(prefs, streaming=True))[0]] == \
        [i["caption"] for i in items]
    assert (stats.ties, stats.corrupt, stats.flipped, stats.kept) == (1, 1, 2, 4)
    assert all(_dominant(i["pixel_values_w"]) == "red" for i in items)
    assert collate_pairs(items)["pixel_values_l"].shape == (4, 3, R, R)


def test_bad_labels_missing_columns_and_empty_sets(tmp_path, prefs):
    bad = _rows()[:2] + [{"caption": "x", "jpg_0": _image(RED), "jpg_1": _image(GREEN), "label_0": 0.7, "label_1": 0.3}]
    path = _write_parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(UserError, match=r"1 row\(s\) with invalid labels, first at row 2: label_0 = 0.7"):
        load_preference_dataset(replace(prefs, path=path))
    inconsistent = [{**_rows()[0], "label_1": 1.0}]
    path = _write_parquet(tmp_path / "inconsistent.parquet", inconsistent)
    with pytest.raises(UserError, match="do not sum to 1"):
        load_preference_dataset(replace(prefs, path=path))
    no_label = [{k: v for k, v in r.items() if k not in ("label_0", "label_1")} for r in _rows()]
    path = _write_parquet(tmp_path / "nolabel.parquet", no_label)
    with pytest.raises(UserError, match=r"lacks the Pick-a-Pic column\(s\) label_0 \(has: caption, jpg_0, jpg_1\)"):
        load_preference_dataset(replace(prefs, path=path))
    ties = [_rows()[2], _rows()[2]]
    path = _write_parquet(tmp_path / "ties.parquet", ties)
    with pytest.raises(UserError, match="no preference pairs left after filtering"):
        load_preference_dataset(replace(prefs, path=path))
    with pytest.raises(UserError, match="no preference pairs left"):
        load_preference_dataset(replace(prefs, path=path, streaming=True))
    all_corrupt = [_rows()[3]]
    path = _write_parquet(tmp_path / "corrupt.parquet", all_corrupt)
    with pytest.raises(UserError, match="no preference pairs left"):
        load_preference_dataset(replace(prefs, path=path))
    with pytest.raises(UserError, match=r"no parquet file matches .*\(make them with `make-prefs`\)"):
        load_preference_dataset(replace(prefs, path=str(tmp_path / "missing.parquet")),
                                hint="make them with `make-prefs`")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_csv_is_refused_with_one_line_naming_the_file(tmp_path, prefs, streaming):
    csv = tmp_path / "pairs.csv"
    csv.write_text("caption,jpg_0,jpg_1,label_0\na,x,y,1\n")
    with pytest.raises(UserError) as err:
        load_preference_dataset(replace(prefs, path=str(csv), streaming=streaming))
    assert f"data.path file {str(csv)!r} is not a parquet file" in str(err.value)
    assert "\n" not in str(err.value)


def test_filter_pairs_accepts_datasets_image_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(_rows()[:2]).cast_column("jpg_0", datasets.Image(decode=False))
    rows, stats = filter_pairs(ds, "in-memory")
    pairs = PreferencePairs(rows, R, stats=stats)
    assert stats.kept == 2 and _dominant(pairs[1]["pixel_values_w"]) == "red"
    assert decode_image({"bytes": _image(RED), "path": None}).size == (32, 32)
    assert decode_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(CORRUPT)


def test_resolve_parquet_files(tmp_path):
    for name in ("b", "a"):
        _write_parquet(tmp_path / f"{name}.parquet", _rows()[:1])
    expected = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert resolve_parquet_files(str(tmp_path)) == expected
    assert resolve_parquet_files(str(tmp_path / "*.parquet")) == expected
    with pytest.raises(UserError, match="no parquet file"):
        resolve_parquet_files(str(tmp_path / "none-*.parquet"))


# -- DataLoader workers -------------------------------------------------------------------------


def _loaded(prefs, workers: int, start: int, n: int, streaming: bool):
    """n (batch, epoch) from step `start` on, 2 pairs per micro-batch, 2 micro-batches per step,
    and the dataset (its counts as the training process sees them)."""
    from deradiff.training.data_order import DataOrder, StreamOrder, batches

    pairs, _ = load_preference_dataset(replace(prefs, streaming=streaming, verify_images=False), seed=3)
    order = StreamOrder(2, 1, 2) if streaming else DataOrder(len(pairs), 2, 1, 2, seed=3)
    it = batches(order, pairs, lambda rows, ids: {**collate_pairs(rows), "ids": ids}, start, 0, num_workers=workers)
    got = [next(it) for _ in range(n)]
    it.close()
    return got, pairs


@pytest.mark.parametrize("streaming", [False, True], ids=["indexed", "streamed"])
def test_loader_workers_give_the_batches_of_the_training_process_from_any_step(prefs, streaming, monkeypatch):
    """Workers (a reader thread for a stream) decode and augment (flips keyed by pair and epoch)
    the same tensors in the same order as the training process, also when starting at a later
    step (resume); the corrupt row a worker finds is counted in the training process."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s after each streamed pass
    ref, ref_pairs = _loaded(prefs, 0, 0, 10, streaming)
    for workers, start in ((2, 0), (2, 2)):
        got, pairs = _loaded(prefs, workers, start, 6, streaming)
        for (a, epoch_a), (b, epoch_b) in zip(ref[2 * start:], got, strict=False):
            assert epoch_a == epoch_b and a["ids"] == b["ids"] and a["captions"] == b["captions"]
            assert torch.equal(a["pixel_values_w"], b["pixel_values_w"])
            assert torch.equal(a["pixel_values_l"], b["pixel_values_l"])
        if start == 0:  # the counts of rows read up to the last batch taken, as without workers
            counts = pairs.stats.as_metrics() if streaming else pairs.metrics()
            assert counts == (ref_pairs.stats.as_metrics() if streaming else ref_pairs.metrics())
            assert counts["data/corrupt"] == 1
    assert {epoch for _, epoch in ref} == {0, 1, 2, 3, 4} if not streaming else {0, 1, 2, 3}
    flips = {bool(b["pixel_values_w"][0, 0, :, : R // 2].mean() > b["pixel_values_w"][0, 0, :, R // 2:].mean())
             for b, _ in ref}
    assert flips == {True, False}, "the comparison covers flipped and unflipped pairs"


def test_a_user_error_in_a_worker_is_one_line():
    from deradiff.training.data_order import _worker_message

    text = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise UserError("m")\n'
            "deradiff.errors.UserError: parquet 'x': invalid labels in streamed row 3: label_0 = 2\n")
    assert _worker_message(text) == "parquet 'x': invalid labels in streamed row 3: label_0 = 2"
    assert _worker_message("plain message") == "plain message"


def test_a_worker_outlives_a_stop_signal_then_exits_cleanly(prefs, monkeypatch):
    """SLURM's SIGTERM reaches DataLoader workers too: a worker keeps serving batches (the trainer
    finishes its step and checkpoints), exits with status 0 after the grace period (so the exit of
    a process that leaves workers behind cannot hang on multiprocessing's terminate-and-join),
    and ignores SIGUSR1."""
    import multiprocessing
    import signal
    import time

    from deradiff.training import data_order

    monkeypatch.setattr(data_order, "STOP_GRACE_S", 5.0)
    ref, _ = _loaded(prefs, 0, 0, 6, streaming=False)
    pairs, _ = load_preference_dataset(replace(prefs, verify_images=False), seed=3)
    it = data_order.batches(data_order.DataOrder(len(pairs), 2, 1, 2, seed=3), pairs,
                            lambda rows, ids: {**collate_pairs(rows), "ids": ids}, 0, 0, num_workers=1,
                            prefetch_factor=1)
    got = [next(it)]
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGUSR1)
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    got += [next(it) for _ in range(3)]
    assert worker.is_alive(), "the worker died of the stop signal instead of finishing the step"
    assert [b["ids"] for b, _ in got] == [b["ids"] for b, _ in ref[:4]]
    worker.join(timeout=30)
    assert worker.exitcode == 0, f"the worker did not leave cleanly after the grace period: {worker.exitcode}"
    it.close()
