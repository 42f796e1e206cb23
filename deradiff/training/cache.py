"""A latent and text-embedding cache for Diffusion-DPO: encode the preference pairs once.

    deradiff cache recipe=recipes/toy-dpo.yaml data.latent_cache=runs/toy-cache
    accelerate launch train/align.py recipe=recipes/toy-dpo.yaml data.latent_cache=runs/toy-cache

`deradiff cache` runs the frozen VAE over every training (and held-out) pair and the frozen text
encoder(s) over every distinct caption, and writes safetensors shards into the folder named by
data.latent_cache. A run whose recipe names the folder reads them instead: the VAE, the text
encoders and their tokenizers are neither downloaded nor loaded (the pipeline holds the denoiser
and the scheduler; sample grids load the rest for their duration, deradiff.training.trainer), and
no image is decoded. Every run of a beta sweep, and a run resumed on another machine, reads the
same cache.

What is stored, per pair i of the filtered training set (the same rows, in the same order, as
the uncached run indexes; a pair whose image does not decode holds the next decodable pair, as
PreferencePairs does):
  - the VAE posterior of both images, mean and std (C, h, w) each, NOT a sample: training draws
    latents = mean + std * keyed noise with the uncached run's keys (seed, epoch, image), so the
    posterior sampling and the loss are those of the uncached run to float tolerance;
  - both horizontal flips when data.random_flip (the flip of pair i at epoch e is the uncached
    run's keyed draw), else the unflipped images only. The crop is fixed: the center crop.
    data.random_crop=true cannot be cached (the crop offset would have to be stored per epoch)
    and is refused;
  - the index of its caption in the text table, and the original size and crop (SDXL time ids).
The text table holds one row per distinct caption: every tensor of the family's Conditioning
(encoder states, pooled embeddings, FLUX text ids and guidance); SDXL time ids are rebuilt per
pair from the stored geometry, as the uncached run builds them.

A cache is identified by the content of the data (SHA-256 of every parquet file; for a hub
dataset its id, revision and split), the rows selected (max samples, the seed when it samples,
image verification), the model (a plug-in model's identity, else SHA-256 of the VAE, text
encoder and tokenizer files), model.kind and the prompt-encoding settings, the resolution and
the augmentation. A run refuses a cache whose identity differs, naming the difference in one line.

Layout of data.latent_cache:
    manifest.json                      identity, key, counts, shapes, VAE scaling, shard list
    train-00000.safetensors, ...       mean, std (n, F, 2, C, h, w) [F = flips, 2 = (w, l)],
                                       text_row, original_size, crop_top_left (n, ...)
    train-text.safetensors             the text table (rows = distinct captions)
    train-captions.json                the distinct captions, in table order
    eval-*                             the same for the held-out pairs (no flips)
    reference-errors/                  with data.reference_errors=on: the reference's stored DPO
                                       errors (deradiff.training.reference_errors; `deradiff cache
                                       ... --reference-epochs N` precomputes N epochs of them)
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from deradiff.errors import UserError
from deradiff.io import atomic_dir, sha256_file, write_json_atomic
from deradiff.seeding import SALT_DPO_VAE, keyed_randn
from deradiff.training.conditioning import REPLACED_BY_CACHE
from deradiff.training.data import pair_generator

CACHE_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ENCODER_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
_DENOISER_PARTS = ("unet", "transformer")  # what makes the reference (deradiff.training.reference_errors)


# -- identity -----------------------------------------------------------------------------------


def cache_problems(recipe) -> list[str]:
    """Why this recipe's data cannot be cached (messages naming the key and the fix)."""
    d = recipe.data
    problems = []
    if recipe.method.name != "dpo":
        problems.append(f"data.latent_cache serves method dpo (preference pairs), not {recipe.method.name}: "
                        "set data.latent_cache=null")
    if d.streaming:
        problems.append("data.latent_cache replaces reading the data: set data.streaming=false (the cache "
                        "indexes the filtered pairs)")
    if d.random_crop:
        problems.append("data.random_crop=true cannot be cached (the crop changes every epoch): set "
                        "data.random_crop=false (center crop; flips are cached both ways) or data.latent_cache=null")
    return problems


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: str | os.PathLike) -> str:
    """sha256_file, remembered per (path, size, mtime) within the process: the pre-flight check,
    the trainer and every run of a sweep hash each file once."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _files_digest(files: list[Path], root: Path | None = None) -> dict[str, str]:
    """{name (relative to root): sha256} of each file."""
    return {str(f.relative_to(root) if root else f.name): _sha256(f) for f in files}


def data_identity(recipe) -> dict:
    """What selects and fills the cached rows: data files by content, or the hub dataset."""
    from deradiff.training.data import parquet_files

    d = recipe.data
    sampled = d.max_train_samples is not None or d.max_eval_samples is not None
    ident: dict[str, Any] = {"source": d.source, "max_train_samples": d.max_train_samples,
                             "max_eval_samples": d.max_eval_samples, "verify_images": d.verify_images,
                             "seed": recipe.trainer.seed if sampled else None}
    if d.source == "hub":
        ident.update(path=d.path, revision=d.revision, split=d.split, eval_split=d.eval_split)
    else:
        ident["train_files"] = sorted(_sha256(f) for f in parquet_files(d.path))
        ident["eval_files"] = sorted(_sha256(f) for f in parquet_files(d.eval_path)) if d.eval_path else None
    return ident


def _component_folder(name_or_path: str, revision: str | None) -> Path | None:
    """The local folder holding a pipeline's (or VAE's) files: the folder itself, or the hub
    snapshot in the local cache; None when neither is at hand."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{p}/*" for p in REPLACED_BY_CACHE] + ["*.json", "*.safetensors"]
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: identified by name and revision only
        return None


def _encoder_files(folder: Path, top_level: bool, parts: tuple[str, ...] = REPLACED_BY_CACHE) -> list[Path]:
    parts = [folder] if top_level else [folder / p for p in parts]
    found = []
    for part in parts:
        if part.is_dir():
            pattern = "*" if top_level else "**/*"
            found += [f for f in part.glob(pattern) if f.is_file() and f.suffix in _ENCODER_SUFFIXES]
    return sorted(found)


def model_identity(recipe) -> dict:
    """What makes the cached latents and embeddings: the VAE and the text encoders (and their
    tokenizers), by content where their files are at hand."""
    from deradiff.plugins import model_entry

    m = recipe.model
    entry = model_entry(m.name_or_path)
    if entry is not None:
        return {"model": m.name_or_path, **(entry.identity() if entry.identity else {})}
    ident: dict[str, Any] = {"model": m.name_or_path, "revision": m.revision, "variant": m.variant,
                             "vae": m.vae_name_or_path}
    folder = _component_folder(m.name_or_path, m.revision)
    if folder is not None:
        ident["files"] = _files_digest(_encoder_files(folder, top_level=False), folder)
    if m.vae_name_or_path:
        vae_folder = _component_folder(m.vae_name_or_path, None)
        if vae_folder is not None:
            ident["vae_files"] = _files_digest(_encoder_files(vae_folder, top_level=True), vae_folder)
    return ident


def denoiser_identity(recipe) -> dict:
    """What makes the reference denoiser (the UNet or transformer with its LoRA disabled): a
    plug-in model's identity, else SHA-256 of the unet/ or transformer/ files where they are at
    hand (as `model_identity` identifies the VAE and text encoders)."""
    from deradiff.plugins import model_entry

    m = recipe.model
    entry = model_entry(m.name_or_path)
    if entry is not None:
        return {"model": m.name_or_path, **(entry.identity() if entry.identity else {})}
    ident: dict[str, Any] = {"model": m.name_or_path, "revision": m.revision, "variant": m.variant}
    folder = _component_folder(m.name_or_path, m.revision)
    if folder is not None:
        ident["files"] = _files_digest(_encoder_files(folder, top_level=False, parts=_DENOISER_PARTS), folder)
    return ident


def cache_identity(recipe) -> dict:
    """Everything a cache's contents depend on (see the module docstring)."""
    m = recipe.model
    return {
        "version": CACHE_VERSION,
        "data": data_identity(recipe),
        "model": model_identity(recipe),
        "kind": m.kind,
        "encode": {"max_sequence_length": m.max_sequence_length,
                   "guidance": recipe.method.guidance_scale if m.kind == "flux" else None},
        "resolution": recipe.data.resolution,
        "augmentation": {"crop": "center", "flips": [False, True] if recipe.data.random_flip else [False]},
    }


_WHAT = {"version": "cache format", "data": "data (files or selection)", "model": "VAE / text encoders",
         "kind": "model.kind", "encode": "prompt encoding (max_sequence_length / guidance)",
         "resolution": "data.resolution", "augmentation": "augmentation (data.random_flip)"}


def identity_difference(saved: dict, now: dict) -> str | None:
    """The first part of two identities that differs, in words; None when the saved cache serves
    the recipe (equal, except that a cache of both flips also serves a recipe without flips)."""
    for key, what in _WHAT.items():
        if key == "augmentation" and saved[key]["crop"] == now[key]["crop"] and \
                set(now[key]["flips"]) <= set(saved[key]["flips"]):
            continue
        if saved.get(key) != now.get(key):
            if key in ("resolution", "kind", "version"):
                return f"{what} {saved.get(key)!r} (this recipe: {now.get(key)!r})"
            if key == "augmentation":
                return f"{what}: flips {saved[key]['flips']} (this recipe: {now[key]['flips']})"
            return what
    return None


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentCache:
    """An opened, checked cache folder (see `open_cache`)."""

    folder: Path
    manifest: dict

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["vae"]["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.manifest["vae"]["shift_factor"])

    def has(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def pairs(self, split: str, seed: int, random_flip: bool) -> CachedPairs:
        if not self.has(split):
            raise UserError(f"latent cache {self.folder} holds no {split} pairs: rebuild it with `deradiff cache` "
                            "for this recipe")
        if random_flip and self.manifest["splits"][split]["flips"] < 2:
            raise UserError(f"latent cache {self.folder} holds unflipped {split} pairs only: set data.random_flip=false "
                            "or rebuild it with data.random_flip=true")
        return CachedPairs(self.folder, self.manifest["splits"][split], seed, random_flip)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def open_cache(recipe, identity: dict | None = None) -> LatentCache:
    """The cache named by data.latent_cache, checked against the recipe: UserError (one line)
    when it is missing, unfinished or made for other data, another VAE / text encoder, another
    resolution or another augmentation."""
    folder = Path(recipe.data.latent_cache)
    rebuild = f"build one with `deradiff cache recipe=... data.latent_cache={folder}` using this recipe"
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"data.latent_cache {str(folder)!r} holds no latent cache ({MANIFEST} missing): {rebuild}")
    now = identity if identity is not None else cache_identity(recipe)
    difference = identity_difference(manifest["identity"], now)
    if difference is not None:
        raise UserError(f"latent cache {folder} was made for another {difference}: {rebuild.replace(str(folder), 'NEW_DIR')}"
                        " or point data.latent_cache at a cache made for it")
    if recipe.data.eval_path or recipe.data.eval_split:
        if "eval" not in manifest["splits"]:
            raise UserError(f"latent cache {folder} holds no held-out pairs but the recipe evaluates on them: {rebuild}")
    return LatentCache(folder, manifest)


class CachedPairs(torch.utils.data.Dataset):
    """Cached preference pairs, indexed like PreferencePairs. Item i (at the epoch set by
    set_epoch, or item(i, epoch)) is a dict:

        latent_mean, latent_std: (2, C, h, w) float32, [preferred, rejected], of the flip that
            the uncached run draws for pair i at this epoch
        text_row: int (row of the text table); caption: str; original_size, crop_top_left; index
    """

    def __init__(self, folder: Path, split: dict, seed: int, random_flip: bool):
        self.folder, self.split, self.seed, self.random_flip = Path(folder), split, seed, random_flip
        self.epoch = 0
        self.shard_pairs = int(split["shard_pairs"])
        self.captions: list[str] = json.loads((self.folder / split["captions"]).read_text())
        self._handles: dict[str, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.split["pairs"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _open(self, name: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def flip_of(self, index: int, epoch: int) -> bool:
        """The uncached run's flip of pair `index` at `epoch`: transform_pair's first draw from
        pair_generator when the crop is centered (no crop draws before it)."""
        return self.random_flip and bool(torch.rand((), generator=pair_generator(self.seed, epoch, index)) < 0.5)

    def item(self, index: int, epoch: int) -> dict:
        shard = self._open(self.split["shards"][index // self.shard_pairs])
        row = index % self.shard_pairs
        f = 1 if self.flip_of(index, epoch) else 0
        text_row = int(shard.get_slice("text_row")[row])
        return {"latent_mean": shard.get_slice("mean")[row, f].float(),
                "latent_std": shard.get_slice("std")[row, f].float(),
                "text": self.text_row(text_row), "caption": self.captions[text_row],
                "original_size": tuple(shard.get_slice("original_size")[row].tolist()),
                "crop_top_left": tuple(shard.get_slice("crop_top_left")[row].tolist()), "index": index}

    def __getitem__(self, index: int) -> dict:
        return self.item(index, self.epoch)

    def text_row(self, row: int) -> dict[str, torch.Tensor]:
        """Row `row` of the text table, by field name (floating point as float32; txt_ids, shared
        by all rows, whole)."""
        table = self._open(self.split["text"])
        out = {}
        for name in table.keys():
            tensor = table.get_tensor(name) if name == "txt_ids" else table.get_slice(name)[row]
            out[name] = tensor.float() if tensor.is_floating_point() else tensor
        return out

    # the trainer's data counts, as the uncached run reports them
    @property
    def bad_rows(self) -> set[int]:
        return set()

    def metrics(self, bad_rows: set[int] | None = None) -> dict[str, float]:
        return {k: float(v) for k, v in self.split["stats"].items()}


def collate_cached(items: list[dict]) -> dict:
    """Items of CachedPairs -> captions (B), latent_mean_w/_l and latent_std_w/_l (B, C, h, w),
    text {field: (B, ...)} (txt_ids shared), original_sizes, crops_top_left (B, 2) int64,
    indices (B,)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    mean = torch.stack([e["latent_mean"] for e in items])
    std = torch.stack([e["latent_std"] for e in items])
    text = {name: items[0]["text"][name] if name == "txt_ids" else torch.stack([e["text"][name] for e in items])
            for name in items[0]["text"]}
    return {"captions": [e["caption"] for e in items], "text": text,
            "latent_mean_w": mean[:, 0], "latent_mean_l": mean[:, 1],
            "latent_std_w": std[:, 0], "latent_std_l": std[:, 1],
            "original_sizes": torch.tensor([e["original_size"] for e in items], dtype=torch.long),
            "crops_top_left": torch.tensor([e["crop_top_left"] for e in items], dtype=torch.long),
            "indices": torch.tensor([e["index"] for e in items], dtype=torch.long)}


def cached_latents(batch: dict, pair_ids: list[int], seed: int, epoch: int, scaling_factor: float,
                   shift_factor: float, device) -> torch.Tensor:
    """Scaled latents (2B, C, h, w), preferred then rejected: the posterior draw that
    dpo.encode_latents makes from the VAE's output, here from the cached mean and std."""
    mean = torch.cat([batch["latent_mean_w"], batch["latent_mean_l"]]).to(device)
    std = torch.cat([batch["latent_std_w"], batch["latent_std_l"]]).to(device)
    keys = [2 * i for i in pair_ids] + [2 * i + 1 for i in pair_ids]  # as dpo_errors keys images
    noise = keyed_randn(mean.shape[1:], keys, seed, epoch, salt=SALT_DPO_VAE)
    latents = mean + std * noise.to(device, mean.dtype)
    return (latents - shift_factor) * scaling_factor


def cached_conditioning(batch: dict, family: str, resolution: int, device):
    """The Conditioning of a cached batch, as encode_prompts builds it for these captions (SDXL
    time ids from each pair's original size and crop, target = the training resolution)."""
    from deradiff.training.conditioning import Conditioning

    t = batch["text"]
    added = None
    if "added.text_embeds" in t:
        n = len(batch["captions"])
        target = torch.tensor([[resolution, resolution]] * n)
        time_ids = torch.cat([batch["original_sizes"], batch["crops_top_left"], target], dim=1)
        added = {"text_embeds": t["added.text_embeds"].to(device),
                 "time_ids": time_ids.to(device, t["encoder_hidden_states"].dtype)}
    opt = {k: t[k].to(device) for k in ("pooled_projections", "txt_ids", "guidance") if k in t}
    return Conditioning(t["encoder_hidden_states"].to(device), added, family=family, **opt)


# -- building -----------------------------------------------------------------------------------


def _conditioning_tensors(cond) -> dict[str, torch.Tensor]:
    """The text table's fields of a Conditioning (per-prompt tensors; SDXL time ids are per pair
    and rebuilt from the geometry, so they are left out)."""
    out = {}
    for f in fields(cond):
        value = getattr(cond, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = value
        elif f.name == "added_cond_kwargs" and value is not None:
            out["added.text_embeds"] = value["text_embeds"]
    return out


class _PairsToEncode(torch.utils.data.Dataset):
    """Pair i of the filtered set, centered and unflipped: (index, caption, w, l, geometry)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        item = self.pairs[index]
        return (index, item["caption"], item["pixel_values_w"], item["pixel_values_l"], item["original_size"],
                item["crop_top_left"])


def _as_list(batch):
    return batch


@torch.no_grad()
def _encode_split(pipe, pairs, flips: list[bool], batch_size: int, num_workers: int, dtype: torch.dtype,
                  device) -> dict[str, torch.Tensor]:
    """Posterior mean and std (n, F, 2, C, h, w) of every pair's images in each flip, and the
    per-pair caption index and geometry; plus "captions" (distinct, in order)."""
    from deradiff.training.data import PreferencePairs

    plain = PreferencePairs(pairs.rows, pairs.resolution, random_crop=False, random_flip=False, seed=pairs.seed,
                            stats=pairs.stats)
    loader = torch.utils.data.DataLoader(_PairsToEncode(plain), batch_size=batch_size, collate_fn=_as_list,
                                         num_workers=num_workers,
                                         **({"multiprocessing_context": "fork"} if num_workers else {}))
    means, stds, text_row, sizes, crops, captions = [], [], [], [], [], {}
    vae = pipe.vae
    for items in loader:
        w = torch.stack([it[2] for it in items])
        lo = torch.stack([it[3] for it in items])
        views = [torch.cat([w, lo]) if not flip else torch.cat([w, lo]).flip(-1) for flip in flips]
        dist = vae.encode(torch.cat(views).to(device, vae.dtype)).latent_dist
        b, f = len(items), len(flips)
        shape = (f, 2, b, *dist.mean.shape[1:])  # [flip][w/l][pair] -> (pair, flip, w/l)
        means.append(dist.mean.float().reshape(shape).permute(2, 0, 1, 3, 4, 5).to("cpu", dtype))
        stds.append(dist.std.float().reshape(shape).permute(2, 0, 1, 3, 4, 5).to("cpu", dtype))
        for it in items:
            text_row.append(captions.setdefault(it[1], len(captions)))
            sizes.append(it[4])
            crops.append(it[5])
    return {"mean": torch.cat(means), "std": torch.cat(stds), "text_row": torch.tensor(text_row, dtype=torch.long),
            "original_size": torch.tensor(sizes, dtype=torch.long), "crop_top_left": torch.tensor(crops, dtype=torch.long),
            "captions": list(captions)}


@torch.no_grad()
def _text_table(pipe, captions: list[str], recipe, device, chunk: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.families import guidance_input

    m = recipe.model
    kwargs = {"max_sequence_length": m.max_sequence_length, "guidance": guidance_input(recipe, pipe)}
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(captions), chunk):
        cond = encode_prompts(pipe, captions[start:start + chunk], device, recipe.data.resolution, **kwargs)
        parts.append({k: v.to("cpu") for k, v in _conditioning_tensors(cond).items()})
    table = {}
    for name in parts[0]:
        table[name] = parts[0][name] if name == "txt_ids" else torch.cat([p[name] for p in parts])
        if table[name].is_floating_point() and name != "guidance":
            table[name] = table[name].to(dtype)
    return table


def _write_split(out: Path, split: str, encoded: dict, text: dict, shard_pairs: int, stats: dict) -> dict:
    from safetensors.torch import save_file

    n = len(encoded["text_row"])
    shards = []
    for k, start in enumerate(range(0, n, shard_pairs)):
        name = f"{split}-{k:05d}.safetensors"
        save_file({key: encoded[key][start:start + shard_pairs].contiguous()
                   for key in ("mean", "std", "text_row", "original_size", "crop_top_left")}, str(out / name))
        shards.append(name)
    save_file({k: v.contiguous() for k, v in text.items()}, str(out / f"{split}-text.safetensors"))
    (out / f"{split}-captions.json").write_text(json.dumps(encoded["captions"]))
    mode = 0o666 & ~_umask()  # safetensors writes 0600; a sweep's runs (and users) share the cache
    for name in [*shards, f"{split}-text.safetensors"]:
        (out / name).chmod(mode)
    return {"pairs": n, "shard_pairs": shard_pairs, "shards": shards, "text": f"{split}-text.safetensors",
            "captions": f"{split}-captions.json", "flips": int(encoded["mean"].shape[1]),
            "distinct_captions": len(encoded["captions"]), "stats": stats}


def build_cache(recipe, batch_size: int = 8, shard_pairs: int = 1024, dtype: str = "float32",
                device: str | None = None, num_workers: int | None = None, log=print, command: str = "",
                pipe=None) -> Path:
    """Encode the recipe's training (and held-out) pairs into data.latent_cache; returns the
    folder. A folder already holding this recipe's cache is kept as it is; one holding another
    cache is refused (choose another folder). pipe: an already loaded pipeline of the recipe's
    model (benchmarks build one in memory); None = load model.name_or_path."""
    from deradiff.models import DENOISERS, load_pipeline
    from deradiff.training.data import load_preference_dataset
    from deradiff.training.data_order import default_num_workers
    from deradiff.training.families import check_family
    from deradiff.training.recipe_checks import prefs_hint

    problems = cache_problems(recipe)
    if not recipe.data.latent_cache:
        problems.insert(0, "name the cache folder: data.latent_cache=FOLDER")
    if problems:
        raise UserError("; ".join(problems))
    folder = Path(recipe.data.latent_cache)
    identity = cache_identity(recipe)
    saved = read_manifest(folder)
    if saved is not None:
        difference = identity_difference(saved["identity"], identity)
        if difference is None:
            log(f"{folder}: a latent cache serving this recipe is there already ({saved['splits']['train']['pairs']} "
                "training pairs); nothing to do")
            return folder
        raise UserError(f"{folder} holds the latent cache of another {difference}: choose another "
                        "data.latent_cache folder (or delete that one)")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"data.latent_cache {str(folder)!r} exists and is not a latent cache: choose an empty or new folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = default_num_workers() if num_workers is None else num_workers
    m, d, start = recipe.model, recipe.data, time.perf_counter()
    if pipe is None:  # the denoiser is not needed (nor read: FLUX.1's would be 48 GB in float32)
        pipe = load_pipeline(m.name_or_path, revision=m.revision, variant=m.variant, vae=m.vae_name_or_path,
                             device=device, components=dict.fromkeys(DENOISERS))
    check_family(m.kind, pipe)
    flips = [False, True] if d.random_flip else [False]
    splits = {"train": flips}
    if d.eval_path or d.eval_split:
        splits["eval"] = [False]
    manifest_splits = {}
    with atomic_dir(folder) as out:
        for split, split_flips in splits.items():
            pairs, stats = load_preference_dataset(d, which=split, seed=recipe.trainer.seed, hint=prefs_hint(recipe))
            log(f"{split}: encoding {len(pairs)} pairs x {len(split_flips)} flip(s) with the VAE ...")
            encoded = _encode_split(pipe, pairs, split_flips, batch_size, workers, DTYPES[dtype], device)
            log(f"{split}: encoding {len(encoded['captions'])} distinct captions ...")
            text = _text_table(pipe, encoded["captions"], recipe, device, batch_size, DTYPES[dtype])
            manifest_splits[split] = _write_split(out, split, encoded, text, shard_pairs, pairs.metrics())
        vae_config = pipe.vae.config
        manifest = {"identity": identity, "key": _digest(identity), "splits": manifest_splits, "dtype": dtype,
                    "latent_shape": list(encoded["mean"].shape[3:]), "family": recipe.model.kind,
                    "vae": {"scaling_factor": float(vae_config.scaling_factor),
                            "shift_factor": float(getattr(vae_config, "shift_factor", None) or 0.0)},
                    "made_by": command,
                    "seconds": round(time.perf_counter() - start, 1)}
        write_json_atomic(out / MANIFEST, manifest)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    log(f"{folder}: {manifest_splits['train']['pairs']} training pairs"
        + (f", {manifest_splits['eval']['pairs']} held-out" if "eval" in manifest_splits else "")
        + f", {size:.1f} MiB, {manifest['seconds']} s")
    return folder


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("items", nargs="*", metavar="recipe=PATH|key=value",
                        help="the training recipe and overrides, as for train/align.py; data.latent_cache names "
                             "the folder to write")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per VAE call (x2 images x flips)")
    parser.add_argument("--shard-pairs", type=int, default=1024, help="pairs per safetensors shard")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="stored precision (float16 halves the size; the loss then differs by its rounding)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers decoding images (default: data.num_workers, else min(4, CPUs - 1))")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--reference-epochs", type=int, default=0, metavar="N",
                        help="also store the reference's DPO errors of epochs 0..N-1 (and the held-out draws) where "
                             "data.reference_errors says, so that every run of a sweep skips the reference forward "
                             "(deradiff.training.reference_errors); 0 = only the latent cache")


def run(args) -> int:
    from deradiff.training.recipe_checks import preflight
    from deradiff.training.recipe_load import load_recipe

    recipe = load_recipe(args.items)
    preflight(recipe, check_cache=False)
    for name, value in (("--batch-size", args.batch_size), ("--shard-pairs", args.shard_pairs)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    epochs = args.reference_epochs
    if epochs < 0 or (epochs and recipe.data.reference_errors == "off"):
        raise UserError(f"--reference-epochs {epochs}: give N >= 0, and name where the errors go with "
                        "data.reference_errors=on (inside the cache) or =DIR")
    workers = args.num_workers if args.num_workers is not None else recipe.data.num_workers
    build_cache(recipe, args.batch_size, args.shard_pairs, args.dtype, args.device, workers,
                command=shlex.join(["deradiff", "cache", *sys.argv[2:]]))
    if epochs:
        from deradiff.training.reference_errors import precompute

        precompute(recipe, epochs, args.batch_size, args.device)
    return 0
