"""Stored reference errors for Diffusion-DPO: the frozen reference's per-pair denoising errors,
computed once and read by every later run of a beta sweep.

    # the first run of a sweep stores them as it trains; the later runs read them
    accelerate launch train/align.py recipe=recipes/toy-dpo.yaml data.latent_cache=runs/toy-cache \\
        data.reference_errors=on method.beta=2000
    accelerate launch train/align.py recipe=... data.latent_cache=runs/toy-cache data.reference_errors=on \\
        method.beta=500
    # or precompute them for 3 epochs (e.g. a SLURM job the sweep's array depends on)
    deradiff cache recipe=... data.latent_cache=runs/toy-cache data.reference_errors=on --reference-epochs 3

Why this works: a DPO micro-batch draws the timestep (or flow sigma), the noise and the VAE
posterior sample of pair i at epoch e from generators keyed by (seed, i, e) (deradiff.seeding),
and the reference is the denoiser with its LoRA disabled, which training never changes. So the
reference's errors of a draw -- two numbers, the per-sample MSE of the preferred and of the
rejected image -- depend on neither method.beta nor the LoRA: every run of a sweep computes the
same ones. A micro-batch all of whose (pair, epoch) draws are stored skips the reference forward
(`dpo_errors_from_latents(..., ref_errors=...)`): one of about four forward-equivalents of a step
(the model's forward and backward are the other three; on the toy world a reading run's steps
take ~0.7x the time, benchmarks/sweep.py). Otherwise the whole micro-batch runs as usual and the
missing errors are stored.

What identifies a store (`store_identity`): the latent cache (SHA-256 of its manifest: data, VAE,
text encoders, encoding, resolution, augmentation), the reference denoiser (a plug-in model's
identity, else SHA-256 of its unet/ or transformer/ files), the noise scheduler's config
(prediction type, schedule, shift), model.kind, model.mixed_precision, trainer.seed,
data.resolution, data.random_flip, model.max_sequence_length and, for flow families, the sigma
sampling (and FLUX's guidance input). Each identity has its own subfolder (named by its digest), so stores of other
settings (a seed sweep, another precision) live side by side: a run ignores them, noting the
first setting in which each differs, and never reads errors made with other settings.
Not keyed: the device, the batch layout and trainer.compile, which change the reference's
numbers only by float rounding (with the same layout on the same machine they are bit-identical).

Writing, safe for runs that start together (no locks): each process buffers the errors it
computes and writes them as a new shard file, whole or not at all (deradiff.io.atomic_write), under
a name no other process uses (rank and a random id), at checkpoint steps, at the last step,
after each evaluation, and at least every FLUSH_SECONDS; at the same points it reads the shards
other processes and runs wrote since (runs started together thus share from their first write
on; to share from the first step, precompute). Shards are never rewritten; a draw stored twice (two runs
computed it at once; the copies agree to float rounding) keeps the copy read first. A crash or
a preemption loses only the errors not written yet, which later runs compute again; a store that
cannot be written (read-only, full disk) is read only, with a warning. Under DeepSpeed ZeRO-3
the processes agree per micro-batch whether to skip the reference (`agreement`). Held-out draws
are keyed by their negative epochs (-1 - draw, see methods' evaluate): one key space serves both.

Layout of a store folder (data.reference_errors=DIR, or data.latent_cache/reference-errors for =on):
    <digest>/identity.json                       the settings the errors were computed with
    <digest>/errors-r<rank>-<id>.safetensors     pair, epoch (n,) int64; err_w, err_l (n,) float32

Counts (this invocation, micro-batches summed over processes), in metrics.jsonl and summary.json:
data/reference_errors_stored (the reference forward skipped) and data/reference_errors_computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deradiff.errors import UserError
from deradiff.io import atomic_write, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

STORE_VERSION = 1
STORE_DIR = "reference-errors"  # data.reference_errors=on: this folder inside data.latent_cache
IDENTITY = "identity.json"
FLUSH_SECONDS = 600.0  # write (and read others') errors at least this often: sweeps started together share sooner
FLUSH_ENTRIES = 1 << 16  # ... and whenever this many draws wait (1 MiB of keys and values)
_SCHEDULER_NOISE = ("_diffusers_version", "_use_default_values", "_name_or_path")  # config keys that change no number


# -- identity -----------------------------------------------------------------------------------


def store_root(recipe) -> Path | None:
    """The folder of stores that data.reference_errors names; None when it is off."""
    value = recipe.data.reference_errors
    if value == "off":
        return None
    return Path(recipe.data.latent_cache) / STORE_DIR if value == "on" else Path(value)


def store_identity(recipe, cache, scheduler) -> dict:
    """Everything the reference's errors of a keyed draw depend on (see the module docstring),
    keyed by the recipe key that sets each (JSON-normalized, as it is saved).

    cache: the opened LatentCache; scheduler: the pipeline's noise scheduler."""
    from deradiff.training.cache import MANIFEST, denoiser_identity
    from deradiff.training.recipe import FLOW_KINDS

    m, d, me = recipe.model, recipe.data, recipe.method
    flow = m.kind in FLOW_KINDS
    config = {k: v for k, v in dict(scheduler.config).items() if k not in _SCHEDULER_NOISE}
    identity = {
        "format": STORE_VERSION,
        "data.latent_cache": sha256_file(Path(cache.folder) / MANIFEST),
        "model.name_or_path": denoiser_identity(recipe),
        "model.kind": m.kind,
        "model.mixed_precision": m.mixed_precision,
        "prediction_type": config.get("prediction_type"),
        "scheduler": config,
        "trainer.seed": recipe.trainer.seed,
        "data.resolution": d.resolution,
        "data.random_flip": d.random_flip,
        "method.sigma_sampling": me.sigma_sampling if flow else None,
        "method.logit_mean": me.logit_mean if flow else None,
        "method.logit_std": me.logit_std if flow else None,
        "method.guidance_scale": me.guidance_scale if m.kind == "flux" else None,
        "model.max_sequence_length": m.max_sequence_length,
    }
    return json.loads(json.dumps(identity, default=str))


_WHAT = {"format": "store format", "data.latent_cache": "latent cache (data.latent_cache: another or rebuilt)",
         "model.name_or_path": "reference denoiser (model.name_or_path weights)",
         "scheduler": "noise scheduler config"}


def identity_difference(saved: dict, now: dict) -> str | None:
    """The first setting in which two store identities differ, in words; None when equal."""
    for key in now:
        if saved.get(key) != now[key]:
            return _WHAT.get(key) or f"{key} {saved.get(key)!r} (this run: {now[key]!r})"
    return None


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def other_stores_note(root: Path, identity: dict) -> str | None:
    """One line naming the stores in `root` made with other settings (ignored) and how each differs."""
    mine = _digest(identity)
    differences = []
    for path in sorted(root.glob(f"*/{IDENTITY}")):
        if path.parent.name == mine:
            continue
        try:
            saved = json.loads(path.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            continue
        differences.append(f"{path.parent.name}: {identity_difference(saved, identity) or 'same settings'}")
    if not differences:
        return None
    return (f"reference errors: ignoring {len(differences)} store(s) in {root} made with other settings "
            f"({'; '.join(differences)})")


# -- the store ----------------------------------------------------------------------------------


def _keys(pair_ids, epoch: int) -> np.ndarray:
    """(B,) int64 keys of the draws (pair, epoch); pair ids < 2**32, |epoch| < 2**31."""
    pairs = np.asarray(pair_ids, dtype=np.int64)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= 1 << 32):
        raise ValueError(f"pair ids must be in [0, 2**32), got {pairs.min()}..{pairs.max()}")
    return np.int64(epoch) * (1 << 32) + pairs


class ReferenceErrorStore:
    """The stored reference errors of one identity (a folder), as a sorted in-memory index:
    16 bytes per stored draw. One object per process; see the module docstring for when it
    writes and reads shards."""

    def __init__(self, folder: str | Path, rank: int = 0, flush_entries: int = FLUSH_ENTRIES,
                 flush_seconds: float = FLUSH_SECONDS):
        self.folder, self.rank = Path(folder), rank
        self.flush_entries, self.flush_seconds = flush_entries, flush_seconds
        self._keys = np.empty(0, dtype=np.int64)  # sorted, unique
        self._values = np.empty((0, 2), dtype=np.float32)  # (err_w, err_l) per key
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        self._seen: set[str] = set()
        self._last_flush = time.monotonic()
        self.stored = self.computed = 0  # training micro-batches (epoch >= 0) looked up: hits, misses
        self.writable = True  # False after a failed write (read-only folder, full disk)
        self.refresh()

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, pair_ids: list[int], epoch: int, agree: Callable[[bool], bool] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(err_w, err_l), each (B,) float32, when every draw (pair, epoch) is stored; else None.
        agree: combines this process's answer with the other processes' (`agreement`). Counts
        training micro-batches (epoch >= 0) in `stored` / `computed`."""
        keys = _keys(pair_ids, epoch)
        pos = np.searchsorted(self._keys, keys)
        found = bool(len(self._keys)) and bool((self._keys[np.minimum(pos, len(self._keys) - 1)] == keys).all())
        if agree is not None:
            found = agree(found)
        if epoch >= 0:
            self.stored += found
            self.computed += not found
        if not found:
            return None
        values = self._values[pos]
        return torch.from_numpy(values[:, 0].copy()), torch.from_numpy(values[:, 1].copy())

    def add(self, pair_ids: list[int], epoch: int, err_w: torch.Tensor, err_l: torch.Tensor) -> None:
        """Buffer computed errors, each (B,), to be written at the next flush."""
        values = torch.stack([err_w.detach().float().cpu(), err_l.detach().float().cpu()], dim=1).numpy()
        self._pending.append((_keys(pair_ids, epoch), values))
        self._pending_n += len(values)

    def maybe_flush(self, force: bool = False) -> None:
        """`flush` when forced, when FLUSH_ENTRIES draws wait, or FLUSH_SECONDS after the last one."""
        if force or self._pending_n >= self.flush_entries or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered errors as one new shard (atomically), then read the shards that
        other processes and runs wrote since."""
        from safetensors.torch import save

        self._last_flush = time.monotonic()
        if self._pending:
            keys = np.concatenate([k for k, _ in self._pending])
            values = np.concatenate([v for _, v in self._pending])
            self._pending, self._pending_n = [], 0
            self._merge(keys, values)
            name = f"errors-r{self.rank:05d}-{uuid.uuid4().hex[:16]}.safetensors"
            tensors = {"pair": torch.from_numpy(keys % (1 << 32)), "epoch": torch.from_numpy(keys // (1 << 32)),
                       "err_w": torch.from_numpy(values[:, 0].copy()), "err_l": torch.from_numpy(values[:, 1].copy())}
            if self.writable:
                try:
                    with atomic_write(self.folder / name, "wb") as f:
                        f.write(save(tensors))
                    self._seen.add(name)
                except (OSError, UserError) as err:  # the store only saves time: training goes on
                    self.writable = False
                    logger.warning("reference errors: cannot write into %s (%s); reading only from now on",
                                   self.folder, err)
        self.refresh()

    def refresh(self) -> int:
        """Read shards not read yet (in name order); returns how many. An unreadable file (not
        one of ours: ours are written whole) is skipped with a warning."""
        from safetensors.torch import load_file

        new = sorted(p for p in self.folder.glob("errors-*.safetensors") if p.name not in self._seen)
        for path in new:
            self._seen.add(path.name)
            try:
                t = load_file(str(path))
                keys = t["epoch"].numpy() * (1 << 32) + t["pair"].numpy()
                values = torch.stack([t["err_w"], t["err_l"]], dim=1).float().numpy()
            except Exception as err:  # a damaged or foreign file: the errors are computed instead
                logger.warning("reference errors: skipping unreadable %s (%s)", path, err)
                continue
            self._merge(keys, values)
        return len(new)

    def _merge(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add draws to the index; a key already there keeps its value (first copy wins)."""
        all_keys = np.concatenate([self._keys, keys])
        all_values = np.concatenate([self._values, values])
        self._keys, first = np.unique(all_keys, return_index=True)
        self._values = all_values[first]


def open_store(recipe, cache, scheduler, rank: int = 0, log=print) -> ReferenceErrorStore | None:
    """The store of this recipe's settings (None when data.reference_errors=off): its folder is
    made (with identity.json) if new; stores of other settings beside it are noted and ignored."""
    root = store_root(recipe)
    if root is None:
        return None
    identity = store_identity(recipe, cache, scheduler)
    note = other_stores_note(root, identity) if root.is_dir() else None
    if note:
        log(note)
    folder = root / _digest(identity)
    writable = True
    if not (folder / IDENTITY).exists():  # several processes may write it: the same content, atomically
        try:
            write_json_atomic(folder / IDENTITY, {"identity": identity})
        except (OSError, UserError) as err:
            writable = False
            log(f"reference errors: cannot write into {folder} ({err}); training computes every reference forward")
    store = ReferenceErrorStore(folder, rank)
    store.writable = writable
    log(f"reference errors: {folder}: {len(store)} stored draws (a micro-batch whose draws are all stored skips "
        "the reference forward)")
    return store


def agreement(accelerator) -> Callable[[bool], bool] | None:
    """For `lookup`: under DeepSpeed ZeRO-3 (the denoiser's weights sharded over the processes,
    gathered by collectives inside each forward) every process must run the reference forward or
    none, so a micro-batch reads stored errors only when all processes found theirs (one small
    all-reduce per micro-batch). None otherwise: each process decides alone."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.num_processes == 1 or plugin is None or plugin.zero_stage != 3:
        return None

    def agree(found: bool) -> bool:
        flag = torch.tensor([float(found)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)

    return agree


def store_counts(store: ReferenceErrorStore, accelerator) -> dict[str, float]:
    """data/reference_errors_stored and _computed: training micro-batches of this invocation whose
    reference forward was skipped or run, summed over processes (a collective)."""
    counts = torch.tensor([store.stored, store.computed], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    stored, computed = counts.tolist()
    return {"data/reference_errors_stored": stored, "data/reference_errors_computed": computed}


# -- precomputing (deradiff cache --reference-epochs N) ---------------------------------------------


@torch.no_grad()
def precompute(recipe, epochs: int, batch_size: int = 8, device: str | None = None, log=print,
               pipe=None) -> ReferenceErrorStore:
    """Store the reference errors of every training pair at epochs 0 .. epochs-1 (and of the
    held-out pairs' method.eval_draws draws, when the recipe evaluates), as training would
    compute them: the recipe's latent cache, the denoiser in model.mixed_precision under autocast.
    Draws already stored are skipped. pipe: an already loaded pipeline (None = load the model)."""
    from deradiff.models import denoiser_name, load_pipeline
    from deradiff.training.cache import (
        REPLACED_BY_CACHE,
        cached_conditioning,
        cached_latents,
        collate_cached,
        open_cache,
    )
    from deradiff.training.dpo import dpo_reference_errors, dpo_settings

    cache = open_cache(recipe)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = recipe.model
    if pipe is None:  # the cache stands in for the VAE and text encoders: only the denoiser is loaded
        pipe = load_pipeline(m.name_or_path, revision=m.revision, variant=m.variant, vae=m.vae_name_or_path,
                             components=dict.fromkeys(REPLACED_BY_CACHE))
    settings = dpo_settings(recipe, pipe)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(m.mixed_precision)
    denoiser = getattr(pipe, denoiser_name(pipe)).to(device, dtype or torch.float32)
    store = open_store(recipe, cache, pipe.scheduler, log=log)
    seed = recipe.trainer.seed
    jobs = [("train", epoch) for epoch in range(epochs)]
    if (recipe.data.eval_path or recipe.data.eval_split) and cache.has("eval"):
        jobs += [("eval", -1 - draw) for draw in range(recipe.method.eval_draws)]
    start, computed = time.perf_counter(), 0
    for split, epoch in jobs:
        pairs = cache.pairs(split, seed, recipe.data.random_flip if split == "train" else False)
        denoiser.train(split == "train")  # as the trainer runs it (train steps, eval in eval mode)
        for first in range(0, len(pairs), batch_size):
            ids = list(range(first, min(first + batch_size, len(pairs))))
            if store.lookup(ids, epoch) is not None:
                continue
            batch = collate_cached([pairs.item(i, epoch) for i in ids])
            latents = cached_latents(batch, ids, seed, epoch, cache.scaling_factor, cache.shift_factor, device)
            cond = cached_conditioning(batch, m.kind, recipe.data.resolution, device)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                store.add(ids, epoch, *dpo_reference_errors(denoiser, pipe.scheduler, latents, cond, ids, seed, epoch,
                                                            settings.sampling))
            computed += len(ids)
            store.maybe_flush()
        store.flush()
        log(f"reference errors: {split} epoch {epoch}: {len(pairs)} pairs stored")
    log(f"reference errors: {computed} draws computed, {len(store)} stored in {store.folder} "
        f"({time.perf_counter() - start:.1f} s)")
    return store

