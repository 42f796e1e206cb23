"""`deradiff toy make-prefs`: synthetic preference pairs in the Pick-a-Pic v2 format.

    deradiff toy make-prefs --out data/toy-prefs                 # shipped toy pipeline
    deradiff toy make-prefs --out /tmp/p --pairs-per-prompt 4 --steps 10   # a quick small set
    deradiff toy make-prefs --family flow --out data/toy-flow-prefs  # from the flow-matching twin

For each prompt, two images are sampled from the pretrained toy pipeline (the UNet toy, or with
--family flow its flow-matching twin, Euler ODE) with different seeds
and labelled by a Bradley-Terry model on the toy reward r (deradiff.toy.reward, computed on the
stored 8-bit images):

    P(image 0 preferred) = sigmoid((r_0 - r_1) / temperature),   label drawn from it;

the `tie_fraction` of pairs with the smallest |r_0 - r_1| become ties (0.5 / 0.5). Train pairs
use the train prompts, test pairs the held-out test prompts (deradiff.toy.prompts).

Files in OUT (each written atomically):
    train.parquet, test.parquet   columns caption (string), jpg_0, jpg_1 (binary: PNG bytes; JPEG
                                  would blur 32x32 images, and Pick-a-Pic also holds some PNGs
                                  under these names), label_0, label_1 (float64: 1/0, 0/1 or
                                  0.5/0.5), plus diagnostics reward_0, reward_1 (float64) and
                                  seed_0, seed_1 (int64, the sampling seeds)
    corrupt.parquet               valid test rows interleaved with rows whose image bytes do not
                                  decode (truncated, not an image, empty); their labels are decided
                                  (no ties), so a loader must skip and count exactly these
    bad_labels.parquet            valid test rows interleaved with rows whose labels are invalid
                                  (1/1, 2/-1, NaN); a loader must refuse the file
    corrupt.json                  for each of the two files: its row count and [{row, kind}]
    meta.json                     the settings, counts, tie and label statistics, timing

Load with `datasets.load_dataset("parquet", data_files={"train": "OUT/train.parquet", ...})`.

Measured (`deradiff toy make-prefs --out /tmp/toyprefs`, shipped pipeline, defaults, one thread
on a busy 2-core machine): 2016 train + 192 test pairs in 194 s; 5% ties; the median reward gap
|r_0 - r_1| is 0.018, and labels agree with the reward order on 83% of decided pairs.
`deradiff.training.data.filter_pairs` reads train.parquet whole, skips exactly the 3 broken pairs of
corrupt.parquet, and refuses bad_labels.parquet.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.io import atomic_write, write_text_atomic

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "reward_0", "reward_1", "seed_0", "seed_1")
# Deliberately broken rows for testing loaders, by file: undecodable images (a loader should
# skip and count them) and invalid labels (a loader should refuse the file, naming the rows).
CORRUPT_KINDS = {
    "corrupt.parquet": (
        "truncated_jpg_0",     # PNG cut in half
        "not_an_image_jpg_1",  # bytes that are no image at all
        "empty_jpg_0",         # zero bytes
    ),
    "bad_labels.parquet": (
        "labels_both_one",     # label_0 = label_1 = 1: not a preference
        "label_out_of_range",  # label_0 = 2, label_1 = -1
        "nan_label",           # label_0 = NaN
    ),
}
TEST_SEED_OFFSET = 10_000_000  # test pairs draw seeds far from train pairs'
FAMILIES = ("unet", "flow")


@dataclass
class PrefsConfig:
    """Settings of one synthetic preference set (see the module docstring)."""

    out: str = "data/toy-prefs"
    family: str = "unet"  # "unet": the toy StableDiffusionPipeline; "flow": its SD3 twin (toy-flow)
    pipeline: str | None = None  # toy asset root of that family; None = the shipped weights
    pairs_per_prompt: int = 56  # x 36 train prompts = 2016 train pairs
    test_pairs_per_prompt: int = 16  # x 12 test prompts = 192 test pairs
    seed: int = 0
    temperature: float = 0.01
    tie_fraction: float = 0.05
    # DDIM steps: 10 samples 2.3x faster than the default sampler's 25 at the same measured quality
    # (72 images of the train prompts, shipped pipeline: adherence 1.00 at both, KID 0.037 vs 0.051)
    steps: int | None = 10
    guidance: float | None = None  # classifier-free guidance; None = the toy default
    batch_size: int = 64
    corrupt: int = 3  # broken rows in each of corrupt.parquet and bad_labels.parquet

    def validate(self) -> None:
        errors = []
        if self.family not in FAMILIES:
            errors.append(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.pairs_per_prompt < 1 or self.test_pairs_per_prompt < 1:
            errors.append("--pairs-per-prompt and --test-pairs-per-prompt must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            errors.append(f"--temperature must be > 0 (reward units), got {self.temperature}")
        if not 0 <= self.tie_fraction < 1:
            errors.append(f"--tie-fraction must be in [0, 1), got {self.tie_fraction}")
        if self.steps is not None and self.steps < 1:
            errors.append(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            errors.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.corrupt < 0:
            errors.append(f"--corrupt must be >= 0, got {self.corrupt}")
        if errors:
            raise UserError("; ".join(errors))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PrefsConfig()
    p.add_argument("--out", default=d.out, help="output folder for train/test/corrupt parquet files and meta.json")
    p.add_argument("--family", choices=FAMILIES, default=d.family,
                   help="unet: sample the toy StableDiffusionPipeline (DDIM); flow: its StableDiffusion3Pipeline "
                        "twin, model toy-flow (flow-matching Euler; 10 steps pass the toy quality bar too)")
    p.add_argument("--pipeline", default=d.pipeline,
                   help="toy asset folder from `deradiff toy pretrain [--family flow] --out`; unset: the shipped weights")
    p.add_argument("--pairs-per-prompt", type=int, default=d.pairs_per_prompt,
                   help="pairs per train prompt (36 train prompts)")
    p.add_argument("--test-pairs-per-prompt", type=int, default=d.test_pairs_per_prompt,
                   help="pairs per held-out test prompt (12 test prompts)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of image sampling and of label draws")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="Bradley-Terry temperature in reward units: P(0 preferred) = sigmoid((r0 - r1) / T)")
    p.add_argument("--tie-fraction", type=float, default=d.tie_fraction,
                   help="fraction of pairs (per split) with the smallest reward gap labelled as ties 0.5/0.5")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="sampling steps (the toy samplers use 25; 10 draws the same quality 2.3x faster)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="guidance scale (default: the toy sampler's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per pipeline call")
    p.add_argument("--corrupt", type=int, default=d.corrupt,
                   help="broken rows in each test file: corrupt.parquet cycles through "
                        f"{', '.join(CORRUPT_KINDS['corrupt.parquet'])}; bad_labels.parquet through "
                        f"{', '.join(CORRUPT_KINDS['bad_labels.parquet'])} (0: neither file)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny convolutions: 1 is fastest on a busy CPU; 0: torch's default)")


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG file bytes (lossless; deterministic for the same pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def bradley_terry_labels(r0: np.ndarray, r1: np.ndarray, temperature: float, tie_fraction: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(label_0, label_1) float64 arrays: ties (0.5) for the round(tie_fraction * n) pairs with the
    smallest |r0 - r1|, otherwise label_0 ~ Bernoulli(sigmoid((r0 - r1) / temperature))."""
    from scipy.special import expit  # the logistic sigmoid, without overflow

    r0, r1 = np.asarray(r0, np.float64), np.asarray(r1, np.float64)
    p0 = expit((r0 - r1) / temperature)
    label_0 = (rng.random(r0.shape) < p0).astype(np.float64)
    n_ties = int(round(tie_fraction * r0.size))
    if n_ties:
        ties = np.argsort(np.abs(r0 - r1), kind="stable")[:n_ties]
        label_0[ties] = 0.5
    return label_0, 1.0 - label_0


def sample_pairs(pipe, prompts: list[str], pairs_per_prompt: int, seed_base: int, call: dict,
                 batch_size: int, desc: str) -> dict[str, list]:
    """Two images per pair, pairs_per_prompt pairs per prompt. Image j of pair k uses a generator
    seeded seed_base + 2k + j, so images do not depend on batch size. Returns columns caption,
    images_0, images_1 (uint8 HxWx3 lists), seed_0, seed_1."""
    captions = [p for p in prompts for _ in range(pairs_per_prompt)]
    # Flatten to one image list: pair k -> rows 2k, 2k + 1.
    flat_captions = [c for c in captions for _ in range(2)]
    flat_seeds = [seed_base + i for i in range(len(flat_captions))]
    images: list[np.ndarray] = []
    for start in tqdm(range(0, len(flat_captions), batch_size), desc=desc, unit="batch"):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator().manual_seed(s) for s in flat_seeds[chunk]]
        with torch.no_grad():
            out = pipe(flat_captions[chunk], generator=gens, **call).images
        arr = (out.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        images.extend(arr)
    return {"caption": captions, "images_0": images[0::2], "images_1": images[1::2],
            "seed_0": flat_seeds[0::2], "seed_1": flat_seeds[1::2]}


def label_pairs(pairs: dict[str, list], temperature: float, tie_fraction: float,
                rng: np.random.Generator) -> dict[str, list]:
    """Score both images with the toy reward (on the 8-bit pixels) and draw Bradley-Terry labels;
    returns the parquet columns."""
    from deradiff.toy.domain import to_tensor
    from deradiff.toy.reward import toy_reward

    with torch.no_grad():
        r0 = toy_reward(to_tensor(np.stack(pairs["images_0"]))).double().numpy()
        r1 = toy_reward(to_tensor(np.stack(pairs["images_1"]))).double().numpy()
    label_0, label_1 = bradley_terry_labels(r0, r1, temperature, tie_fraction, rng)
    return {
        "caption": list(pairs["caption"]),
        "jpg_0": [png_bytes(im) for im in pairs["images_0"]],
        "jpg_1": [png_bytes(im) for im in pairs["images_1"]],
        "label_0": label_0.tolist(), "label_1": label_1.tolist(),
        "reward_0": r0.tolist(), "reward_1": r1.tolist(),
        "seed_0": list(pairs["seed_0"]), "seed_1": list(pairs["seed_1"]),
    }


def schema():
    import pyarrow as pa

    return pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("reward_0", pa.float64()), ("reward_1", pa.float64()),
        ("seed_0", pa.int64()), ("seed_1", pa.int64()),
    ])


def write_parquet(columns: dict[str, list], path: Path) -> Path:
    """Write columns (COLUMNS order, `schema()` types) to `path` atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: columns[k] for k in COLUMNS}, schema=schema())
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)
    return Path(path)


def corrupt_rows(columns: dict[str, list], n_corrupt: int, kinds: tuple[str, ...],
                 n_valid: int = 8) -> tuple[dict[str, list], list[dict]]:
    """The first min(n_valid, rows) rows of `columns` interleaved with n_corrupt broken copies of
    rows (kinds cycling through `kinds`); returns the table and [{'row', 'kind'}]."""
    n_rows = len(columns["caption"])

    def row(i: int) -> dict:
        return {k: columns[k][i % n_rows] for k in COLUMNS}

    valid = [row(i) for i in range(min(n_valid, n_rows))]
    bad = []
    for j in range(n_corrupt):
        kind = kinds[j % len(kinds)]
        bad.append((_corrupt(row(j), kind), kind))
    rows, manifest = [], []
    while valid or bad:
        if valid:
            rows.append(valid.pop(0))
        if bad:
            r, kind = bad.pop(0)
            manifest.append({"row": len(rows), "kind": kind})
            rows.append(r)
    return {k: [r[k] for r in rows] for k in COLUMNS}, manifest


def _corrupt(row: dict, kind: str) -> dict:
    row = dict(row)
    if row["label_0"] == 0.5:  # loaders drop ties before decoding: keep broken rows decided
        row["label_0"], row["label_1"] = 1.0, 0.0
    if kind == "truncated_jpg_0":
        row["jpg_0"] = row["jpg_0"][: len(row["jpg_0"]) // 2]
    elif kind == "not_an_image_jpg_1":
        row["jpg_1"] = b"this is not an image"
    elif kind == "empty_jpg_0":
        row["jpg_0"] = b""
    elif kind == "labels_both_one":
        row["label_0"], row["label_1"] = 1.0, 1.0
    elif kind == "label_out_of_range":
        row["label_0"], row["label_1"] = 2.0, -1.0
    elif kind == "nan_label":
        row["label_0"] = float("nan")
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return row


def split_stats(columns: dict[str, list]) -> dict:
    """Counts and how often the label agrees with the reward order (non-tie pairs)."""
    l0 = np.asarray(columns["label_0"])
    gap = np.asarray(columns["reward_0"]) - np.asarray(columns["reward_1"])
    decided = l0 != 0.5
    agree = ((l0 == 1) == (gap > 0))[decided]
    return {
        "pairs": int(l0.size), "ties": int((~decided).sum()),
        "label_0_preferred": int((l0 == 1).sum()), "label_1_preferred": int((l0 == 0).sum()),
        "agreement_with_reward_order": float(agree.mean()) if agree.size else float("nan"),
        "abs_reward_gap_median": float(np.median(np.abs(gap))),
        "reward_mean": float(np.mean(np.concatenate([columns["reward_0"], columns["reward_1"]]))),
    }


def make_prefs(cfg: PrefsConfig, pipe=None) -> dict:
    """Build the preference set described by `cfg` (see the module docstring); returns meta.
    `pipe`: a toy pipeline of cfg.family to use instead of loading cfg.pipeline (tests)."""
    from deradiff.toy.prompts import test_prompts, train_prompts

    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.out)
    load, sampling_kwargs = _family_pipeline(cfg.family)
    if pipe is None:
        pipe = load(cfg.pipeline)
    call = sampling_kwargs()
    if cfg.steps is not None:
        call["num_inference_steps"] = cfg.steps
    if cfg.guidance is not None:
        call["guidance_scale"] = cfg.guidance
    call["output_type"] = "pt"
    rng = np.random.default_rng([cfg.seed, 1])  # label draws; image seeds come from cfg.seed below
    meta: dict = {"config": asdict(cfg), "sampler": {k: v for k, v in call.items() if k != "output_type"}}
    splits = {"train": (train_prompts(), cfg.pairs_per_prompt, 0),
              "test": (test_prompts(), cfg.test_pairs_per_prompt, TEST_SEED_OFFSET)}
    tables = {}
    for name, (prompts, per_prompt, offset) in splits.items():
        seed_base = cfg.seed * 100_000_000 + offset
        pairs = sample_pairs(pipe, prompts, per_prompt, seed_base, call, cfg.batch_size, f"sampling {name}")
        tables[name] = label_pairs(pairs, cfg.temperature, cfg.tie_fraction, rng)
        write_parquet(tables[name], out / f"{name}.parquet")
        meta[name] = split_stats(tables[name])
    if cfg.corrupt:
        listing = {}
        for filename, kinds in CORRUPT_KINDS.items():
            columns, manifest = corrupt_rows(tables["test"], cfg.corrupt, kinds)
            write_parquet(columns, out / filename)
            listing[filename] = {"rows": len(columns["caption"]), "corrupt": manifest}
        _write_json(out / "corrupt.json", listing)
        meta["corrupt"] = {k: {"rows": v["rows"], "broken": len(v["corrupt"])} for k, v in listing.items()}
    meta["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(out / "meta.json", meta)
    return meta


def _family_pipeline(family: str):
    """(load(asset_root), sampling_kwargs()) of the toy pipeline of `family`."""
    if family == "flow":
        from deradiff.toy.flow import flow_sampling_kwargs, load_flow_pipeline

        return load_flow_pipeline, flow_sampling_kwargs
    from deradiff.toy.pipeline import load_toy_pipeline, toy_sampling_kwargs

    return load_toy_pipeline, toy_sampling_kwargs


def load_prefs(directory: str | os.PathLike, splits: tuple[str, ...] = ("train", "test"), cache_dir=None):
    """The preference files of `directory` as a datasets.DatasetDict (one split per file);
    `cache_dir` is where datasets keeps its Arrow cache (default: its own)."""
    import datasets

    directory = Path(directory)
    files = {s: str(directory / f"{s}.parquet") for s in splits}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise UserError(f"preference files missing: {missing}; create them with `deradiff toy make-prefs --out {directory}`")
    return datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir)


def _write_json(path: Path, obj) -> None:
    # keys in insertion order (not write_json_atomic's sorted order), as meta.json always had
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    fields = PrefsConfig.__dataclass_fields__
    cfg = PrefsConfig(**{k: getattr(args, k) for k in fields})
    cfg.validate()
    meta = make_prefs(cfg)
    for split in ("train", "test"):
        s = meta[split]
        print(f"{split}: {s['pairs']} pairs, {s['ties']} ties, label agrees with reward order on "
              f"{s['agreement_with_reward_order']:.1%} of decided pairs")
    for filename, c in meta.get("corrupt", {}).items():
        print(f"{filename}: {c['rows']} rows, {c['broken']} broken (listed in corrupt.json)")
    print(f"wrote {cfg.out}/ in {meta['seconds']}s")
    return 0
