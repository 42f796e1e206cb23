"""Preference pairs in the Pick-a-Pic v2 format, and prompt lists, through `datasets`.

Pick-a-Pic v2 rows have `caption`, `jpg_0`, `jpg_1` (encoded image bytes) and `label_0`
(1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie; `label_1` = 1 - label_0). Loading follows
the official Diffusion-DPO code: ties are dropped, pairs with label_0 == 0 are swapped so the
preferred image always comes first (w, l), images are resized (shorter side) to the training
resolution, center- or randomly cropped, randomly flipped, and scaled to [-1, 1]. Unlike the
official code, one crop offset and one flip decision serve both images of a pair (the SDXL DPO
script does the same), and randomness is keyed by (seed, epoch, pair index), so a pair gets
the same augmentation however batches are split across processes or resumed.

Bad data is caught before training: missing columns (named), labels outside {0, 0.5, 1},
nothing left after filtering. Undecodable images are skipped and counted (`PreferenceStats`).

    pairs, stats = load_preference_dataset(recipe.data, seed=recipe.trainer.seed)
    batch = collate_pairs([pairs[i] for i in ids])   # pixel_values_w/_l (B, 3, H, W), captions, ...
"""

from __future__ import annotations

import glob
import io
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from deradiff.errors import UserError
from deradiff.seeding import keyed_generator

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from deradiff.training.recipe import DataSection

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
VALID_LABELS = (0.0, 0.5, 1.0)


@dataclass
class PreferenceStats:
    """What loading did to the rows. `corrupt` counts pairs with an undecodable image, found
    up front (verify_images) or while iterating (then it grows during training). For a streamed
    set every count grows as the first pass over the stream reads rows."""

    rows: int = 0  # rows read (after max samples)
    ties: int = 0  # label_0 == 0.5, dropped
    flipped: int = 0  # label_0 == 0, swapped so the preferred image is first
    corrupt: int = 0  # undecodable image in the pair, skipped
    kept: int = 0  # pairs available for training (before lazily found corrupt ones)

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        return (f"{self.rows} pairs read: {self.ties} ties dropped, {self.flipped} flipped (preferred image "
                f"second), {self.corrupt} with a corrupt image skipped, {self.kept} kept")

    def as_metrics(self) -> dict[str, float]:
        """The counts as namespaced metrics (metrics.jsonl, TensorBoard, summary.json)."""
        return {"data/pairs_read": float(self.rows), "data/ties": float(self.ties),
                "data/flipped": float(self.flipped), "data/corrupt": float(self.corrupt),
                "data/kept": float(self.kept)}


# -- images -------------------------------------------------------------------------------------


def decode_image(value: Any) -> PILImage.Image:
    """An RGB PIL image from encoded bytes, a datasets Image dict ({"bytes", "path"}) or a PIL
    image. Raises ValueError if it cannot be decoded (the full image is decoded, not only its header)."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError(f"not an encoded image: {type(value).__name__}")
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as err:
        raise ValueError(f"undecodable image: {err}") from None


@dataclass(frozen=True)
class PairGeometry:
    """Where the training crop of a pair came from, for SDXL's time ids."""

    original_size: tuple[int, int]  # (height, width) of the preferred image before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool  # horizontally flipped


def transform_pair(
    image_w: PILImage.Image,
    image_l: PILImage.Image,
    resolution: int,
    random_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, PairGeometry]:
    """Both images of a pair -> two (3, resolution, resolution) tensors in [-1, 1] and the geometry.

    As the official code: resize the shorter side to `resolution` (bilinear, antialiased),
    crop (random, or centered as torchvision's CenterCrop rounds), flip horizontally with
    probability 1/2. The rejected image is first resized to the preferred image's size (as
    diffusers' SDXL DPO script), so one crop offset and one flip decision apply to both.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if image_l.size != image_w.size:
        image_l = image_l.resize(image_w.size, resample=2)  # 2 = PIL bilinear
    original_size = (image_w.height, image_w.width)
    images = [TF.resize(im, resolution, interpolation=InterpolationMode.BILINEAR) for im in (image_w, image_l)]
    width, height = images[0].size
    if random_crop:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    else:
        top = int(round((height - resolution) / 2.0))
        left = int(round((width - resolution) / 2.0))
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    tensors = []
    for im in images:
        im = TF.crop(im, top, left, resolution, resolution)
        if flip:
            im = TF.hflip(im)
        tensors.append(TF.to_tensor(im) * 2.0 - 1.0)
    return tensors[0], tensors[1], PairGeometry(original_size, (top, left), flip)


def pair_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation randomness of one pair in one epoch, independent of batching and ranks."""
    return keyed_generator(seed, epoch, index)


@dataclass(eq=False)
class PairAugmentation:
    """The keyed augmentation both pair datasets apply (base of PreferencePairs and
    StreamingPreferencePairs): resize to `resolution`, crop, flip, keyed by (seed, epoch, index).
    Call `set_epoch` at each epoch."""

    resolution: int
    random_crop: bool = False
    random_flip: bool = True
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def augmented_item(self, caption: str, image_w: PILImage.Image, image_l: PILImage.Image, index: int) -> dict:
        """A dataset item: caption; pixel_values_w, pixel_values_l: (3, R, R) in [-1, 1];
        original_size: (h, w); crop_top_left: (top, left); index."""
        gen = pair_generator(self.seed, self.epoch, index)
        pw, pl, geo = transform_pair(image_w, image_l, self.resolution, self.random_crop, self.random_flip, gen)
        return {"caption": caption, "pixel_values_w": pw, "pixel_values_l": pl,
                "original_size": geo.original_size, "crop_top_left": geo.crop_top_left, "index": index}


# -- loading rows -------------------------------------------------------------------------------


def parquet_files(path: str) -> list[str]:
    """A parquet file, a folder of *.parquet, or a glob -> the sorted files it names (maybe none)."""
    p = Path(path)
    return sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else sorted(glob.glob(path))


def resolve_parquet_files(path: str, hint: str = "") -> list[str]:
    """`parquet_files(path)`, or UserError (ending with `hint`) when it names none."""
    files = parquet_files(path)
    if not files:
        raise UserError(f"no parquet file matches {path!r}{hint}")
    return files


def parquet_schema_problem(files: Sequence[str], key: str) -> str | None:
    """The first file that does not open as parquet (a CSV, say) or lacks a Pick-a-Pic column,
    as a message naming `key` and the file; None when all are usable. Reads only the footers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            columns = pq.read_schema(file).names
        except (pa.ArrowException, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return (f"{key} file {file!r} is not a parquet file ({reason}): preference pairs must be parquet "
                    f"with columns {', '.join(REQUIRED_COLUMNS)} (convert it, e.g. pandas.read_csv(...).to_parquet(...))")
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            return (f"{key} file {file!r} lacks the Pick-a-Pic column(s) {', '.join(missing)} (has: "
                    f"{', '.join(columns)}); preference pairs need {', '.join(REQUIRED_COLUMNS)}")
    return None


def check_columns(columns: Sequence[str], where: str) -> None:
    """UserError naming the Pick-a-Pic columns that `columns` lacks."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(
            f"{where} lacks the Pick-a-Pic column(s) {', '.join(missing)} (has: {', '.join(columns)}); "
            f"preference data needs {', '.join(REQUIRED_COLUMNS)}"
        )


def _label_problem(label_0: Any, label_1: Any = None) -> str | None:
    if not isinstance(label_0, numbers.Real) or isinstance(label_0, bool) or float(label_0) not in VALID_LABELS:
        return f"label_0 = {label_0!r} (must be 0, 0.5 or 1)"
    if label_1 is not None and not math.isclose(float(label_0) + float(label_1), 1.0):
        return f"label_0 = {label_0!r} and label_1 = {label_1!r} do not sum to 1"
    return None


def _check_labels(label_0: list, label_1: list | None, where: str) -> None:
    bad = [(i, p) for i, (a, b) in enumerate(zip(label_0, label_1 or [None] * len(label_0), strict=True))
           if (p := _label_problem(a, b)) is not None]
    if bad:
        i, problem = bad[0]
        raise UserError(f"{where}: {len(bad)} row(s) with invalid labels, first at row {i}: {problem}; "
                        "Pick-a-Pic labels are 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (tie)")


def _open_rows(data: DataSection, which: Literal["train", "eval"], hint: str = ""):
    """The raw rows named by the recipe's data section (a datasets Dataset or IterableDataset).
    hint: how to make the parquet files, added to the error when none is found."""
    import datasets

    if data.source == "hub":
        split = data.split if which == "train" else data.eval_split
        if split is None:
            raise UserError("no held-out split configured: set data.eval_split (e.g. validation_unique)")
        where = f"dataset {data.path!r} split {split!r}"
        try:
            ds = datasets.load_dataset(data.path, split=split, revision=data.revision,
                                       streaming=data.streaming, cache_dir=data.cache_dir)
        except Exception as err:  # hub, network and split errors all mean: cannot use this dataset
            raise UserError(f"cannot load {where}: {str(err).strip().splitlines()[0]}") from None
        return ds, where
    path = data.path if which == "train" else data.eval_path
    if path is None:
        raise UserError("no held-out pairs configured: set data.eval_path to a parquet file")
    files = resolve_parquet_files(path, f" ({hint})" if hint else "")
    problem = parquet_schema_problem(files, "data.path" if which == "train" else "data.eval_path")
    if problem is not None:
        raise UserError(problem)
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=data.streaming,
                               cache_dir=data.cache_dir)
    return ds, f"parquet {path!r}"


def filter_pairs(
    ds,
    where: str,
    max_samples: int | None = None,
    seed: int = 0,
    verify_images: bool = True,
) -> tuple[Any, PreferenceStats]:
    """Validate and filter a map-style Pick-a-Pic `datasets.Dataset`.

    Checks columns and labels (UserError), keeps `max_samples` rows of a seeded shuffle (as the
    official code), drops ties, and, with verify_images, drops pairs with an undecodable image.
    Rows are selected, never rewritten: the swap of label_0 == 0 pairs happens on access.
    Returns the filtered dataset (columns caption, jpg_0, jpg_1, label_0) and the stats.
    """
    check_columns(ds.column_names, where)
    stats = PreferenceStats()
    keep_cols = ["caption", "jpg_0", "jpg_1", "label_0"]
    labels_1 = ds["label_1"] if "label_1" in ds.column_names else None
    labels = ds["label_0"]
    _check_labels(list(labels), None if labels_1 is None else list(labels_1), where)
    ds = ds.select_columns(keep_cols)
    if max_samples is not None and max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_samples))
        labels = ds["label_0"]
    stats.rows = len(ds)
    decided = [i for i, v in enumerate(labels) if float(v) != 0.5]
    stats.ties = stats.rows - len(decided)
    ds = ds.select(decided)
    if verify_images and len(ds) > 0:
        def decodable(batch: dict) -> list[bool]:
            return [_decodes(a) and _decodes(b) for a, b in zip(batch["jpg_0"], batch["jpg_1"], strict=True)]

        before = len(ds)
        ds = ds.filter(decodable, batched=True, batch_size=64, desc="checking images")
        stats.corrupt = before - len(ds)
    stats.flipped = sum(1 for v in ds["label_0"] if float(v) == 0.0)
    stats.kept = len(ds)
    if stats.kept == 0:
        raise UserError(f"{where}: no preference pairs left after filtering ({stats.summary()})")
    return ds, stats


def _decodes(value: Any) -> bool:
    try:
        decode_image(value)
    except ValueError:
        return False
    return True


# -- torch datasets -----------------------------------------------------------------------------


class PreferencePairs(PairAugmentation, torch.utils.data.Dataset):
    """Map-style preference pairs, preferred image first. Item i is a dict:

        caption: str; pixel_values_w, pixel_values_l: (3, R, R) in [-1, 1];
        original_size: (h, w); crop_top_left: (top, left); index: i

    Augmentation is keyed by (seed, epoch, i); call `set_epoch` at each epoch. A pair whose image
    fails to decode (possible when not verified up front) is replaced by the next decodable
    pair and counted in `stats.corrupt`.
    """

    def __init__(self, rows, resolution: int, random_crop: bool = False, random_flip: bool = True,
                 seed: int = 0, stats: PreferenceStats | None = None):
        super().__init__(resolution, random_crop, random_flip, seed)
        self.rows = rows
        self.stats = stats if stats is not None else PreferenceStats(rows=len(rows), kept=len(rows))
        self._bad: set[int] = set()
        self._corrupt_up_front = self.stats.corrupt

    @property
    def bad_rows(self) -> set[int]:
        """Rows found undecodable while iterating (on this process), beyond those dropped up front."""
        return set(self._bad)

    def metrics(self, bad_rows: set[int] | None = None) -> dict[str, float]:
        """`stats.as_metrics()`, counting as corrupt those dropped up front plus `bad_rows` (the
        union over processes of `bad_rows`; default: this process's)."""
        found = self._bad if bad_rows is None else bad_rows
        return {**self.stats.as_metrics(), "data/corrupt": float(self._corrupt_up_front + len(found))}

    def worker_report(self) -> dict:
        """What reading taught this copy (the rows found corrupt), for `absorb` in the training
        process when a DataLoader worker did the reading."""
        return {"bad_rows": sorted(self._bad)}

    def absorb(self, report: dict) -> None:
        """Merge a DataLoader worker copy's `worker_report` into this dataset's counts."""
        self._bad.update(report["bad_rows"])
        self.stats.corrupt = self._corrupt_up_front + len(self._bad)

    def __len__(self) -> int:
        return len(self.rows)

    def raw_pair(self, index: int) -> tuple[str, PILImage.Image, PILImage.Image]:
        """(caption, preferred image, rejected image), decoded; ValueError if undecodable."""
        row = self.rows[index]
        first, second = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        if float(row["label_0"]) == 0.0:
            first, second = second, first
        return row["caption"], first, second

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                caption, image_w, image_l = self.raw_pair(i)
            except ValueError as err:
                self._bad.add(i)
                self.stats.corrupt += 1
                logger.warning("skipping pair %d: %s (%d corrupt so far)", i, err, self.stats.corrupt)
                continue
            return self.augmented_item(caption, image_w, image_l, index)
        raise UserError(f"no decodable preference pair left among {n} rows")


class StreamingPreferencePairs(PairAugmentation, torch.utils.data.IterableDataset):
    """Iterable preference pairs from a streamed dataset, items as `PreferencePairs`' (index =
    position in the filtered stream). Labels are validated as rows arrive (UserError on the
    first bad one); ties and corrupt pairs are skipped and counted in `stats`."""

    def __init__(self, stream, where: str, resolution: int, random_crop: bool = False,
                 random_flip: bool = True, seed: int = 0, max_samples: int | None = None):
        check_columns(list(stream.column_names or REQUIRED_COLUMNS), where)
        super().__init__(resolution, random_crop, random_flip, seed)
        self.stream = stream
        self.where = where
        self.max_samples = max_samples
        self.stats = PreferenceStats()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)  # reseeds a shuffled stream's buffer

    def __copy__(self) -> StreamingPreferencePairs:
        """A reader of the same stream with its own counts (for a background reader)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.stats = PreferenceStats(**asdict(self.stats))
        return clone

    def worker_report(self) -> dict:
        """The counts so far (rows read up to the last item produced), for `absorb` in the
        training process when a background reader reads the stream."""
        return {"stats": asdict(self.stats)}

    def absorb(self, report: dict) -> None:
        """Take a background reader's counts (`worker_report`) as this dataset's."""
        for key, value in report["stats"].items():
            setattr(self.stats, key, value)  # in place: `stats` returned by the loader is this object

    def raw_pairs(self) -> Iterator[tuple[str, PILImage.Image, PILImage.Image]]:
        """(caption, preferred, rejected) for each usable row. The first pass (epoch 0) counts
        its rows in `stats` and logs each corrupt one; later passes re-read the same rows and
        leave `stats` alone, so the counts describe the data, as for an indexed set."""
        first_pass = self.epoch == 0
        stats = self.stats if first_pass else PreferenceStats()
        stream = self.stream.take(self.max_samples) if self.max_samples is not None else self.stream
        for row in stream:
            stats.rows += 1
            problem = _label_problem(row.get("label_0"), row.get("label_1"))
            if problem is not None:
                raise UserError(f"{self.where}: invalid labels in streamed row {stats.rows - 1}: {problem}")
            if float(row["label_0"]) == 0.5:
                stats.ties += 1
                continue
            try:
                first, second = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
            except ValueError as err:
                stats.corrupt += 1
                if first_pass:
                    logger.warning("skipping streamed row %d: %s (%d corrupt so far)", stats.rows - 1, err,
                                   stats.corrupt)
                continue
            if float(row["label_0"]) == 0.0:
                first, second = second, first
                stats.flipped += 1
            stats.kept += 1
            yield row["caption"], first, second

    def __iter__(self) -> Iterator[dict]:
        for index, (caption, image_w, image_l) in enumerate(self.raw_pairs()):
            yield self.augmented_item(caption, image_w, image_l, index)

    def check_not_empty(self) -> None:
        """UserError if the stream yields no usable pair (reads until the first one)."""
        for _ in self.raw_pairs():
            self.stats = PreferenceStats()
            return
        raise UserError(f"{self.where}: no preference pairs left after filtering ({self.stats.summary()})")


def collate_pairs(examples: Sequence[dict]) -> dict:
    """Items of `PreferencePairs` -> a batch:

        captions: list[str] (B); pixel_values_w, pixel_values_l: (B, 3, R, R);
        original_sizes, crops_top_left: (B, 2) int64 (SDXL time ids); indices: (B,) int64
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    return {
        "captions": [e["caption"] for e in examples],
        "pixel_values_w": torch.stack([e["pixel_values_w"] for e in examples]).contiguous().float(),
        "pixel_values_l": torch.stack([e["pixel_values_l"] for e in examples]).contiguous().float(),
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crops_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
        "indices": torch.tensor([e["index"] for e in examples], dtype=torch.long),
    }


STREAM_SHUFFLE_BUFFER = 1000  # rows; a streamed training set is shuffled through this buffer, reseeded per epoch


def load_preference_dataset(
    data: DataSection, which: Literal["train", "eval"] = "train", seed: int = 0, rank: int = 0, world_size: int = 1,
    hint: str = "",
) -> tuple[PreferencePairs | StreamingPreferencePairs, PreferenceStats]:
    """The recipe's preference pairs, validated and filtered, ready to index (or iterate, when
    data.streaming). which="eval" reads the held-out pairs (data.eval_path or data.eval_split,
    at most data.max_eval_samples) without random crop or flip. Logs the stats summary.

    A streamed training set is the first data.max_train_samples rows, this rank's share of them
    (`datasets.distributed.split_dataset_by_node`: whole files when they divide evenly, else
    every world_size-th row), shuffled through a STREAM_SHUFFLE_BUFFER-row buffer keyed by seed
    and epoch. hint: how to make missing parquet files (e.g. a model plug-in's prefs_hint)."""
    ds, where = _open_rows(data, which, hint)
    train = which == "train"
    max_samples = data.max_train_samples if train else data.max_eval_samples
    random_crop, random_flip = (data.random_crop, data.random_flip) if train else (False, False)
    if data.streaming:
        if train:
            from datasets.distributed import split_dataset_by_node

            if max_samples is not None:
                ds, max_samples = ds.take(max_samples), None
            if world_size > 1:
                ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
            ds = ds.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        pairs = StreamingPreferencePairs(ds, where, data.resolution, random_crop, random_flip, seed, max_samples)
        pairs.check_not_empty()
        return pairs, pairs.stats
    rows, stats = filter_pairs(ds, where, max_samples, seed, data.verify_images)
    logger.info("%s: %s", where, stats.summary())
    return PreferencePairs(rows, data.resolution, random_crop, random_flip, seed, stats), stats

