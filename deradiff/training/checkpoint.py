"""Checkpoints that resume exactly: accelerate state + a small TrainState, written atomically.

Layout of a run directory:
    run_dir/recipe.yaml                 the resolved recipe
    run_dir/checkpoints/step-000120/    accelerate.save_state (model/optimizer/scheduler/RNG,
                                        DeepSpeed shards when used) + train_state.json
    run_dir/lora/                       the final LoRA (diffusers format, safetensors)
A checkpoint is written into a temporary sibling folder (checkpoints/.tmp-step-N.*, via
deradiff.io.atomic_dir) and renamed when complete, so a run killed mid-write leaves the previous
checkpoint as the latest valid one. A write that fails (a full disk) removes the temporary
folder and raises one UserError on every process; temporary folders left by a killed run are
removed before the next checkpoint and when a run starts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.io import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"  # deradiff.io.atomic_dir's temporary folders: .tmp-<name>.<random>
# Messages of writes that failed for want of space: errno 28 as Python, torch (C++ streams) and
# safetensors (Rust) report it.
_FULL_MARKERS = ("No space left", "[Errno 28]", "os error 28", "StorageFull")
# Messages of writes that failed without saying why: torch's C++ writer on a full disk raises
# "basic_ios::clear: iostream error", then, while handling it, "... unexpected pos N vs M".
_WRITE_MARKERS = ("iostream error", "file write failed", "PytorchStreamWriter failed", "unexpected pos")
LOW_SPACE_BYTES = 64 << 20  # below this much free space, a failed write is put down to a full disk


@dataclass
class TrainState:
    """Where training is: the optimizer step, the epoch of its data, pairs or prompts seen."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:  # keys of older versions (batches_in_epoch) are ignored
                setattr(self, key, value)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "train_state.json").exists()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Remove checkpoints/.tmp-* folders left by a save that was killed (they hold disk space).
    Call it only while no process writes a checkpoint. Returns the folders removed."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.glob(f"{_TEMP_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_failure(err: BaseException, folder: Path, what: str) -> UserError | None:
    """One-line UserError for a write into `folder` that failed for want of space (or, with
    plenty of space left, for a reason the writer did not give); None for any other error.

    what: what was not written, and what is intact, e.g. "checkpoint step-000006 was not written".
    """
    chain = _chain(err)
    text = " | ".join(str(e) for e in chain)
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) or \
        any(m in text for m in _FULL_MARKERS)
    if not full and not any(m in text for m in _WRITE_MARKERS):
        return None
    free = _free_bytes(folder)
    shown = "unknown" if free is None else f"{free / 2**20:.0f} MiB"
    if full or (free is not None and free < LOW_SPACE_BYTES):
        return UserError(f"no space left on the disk holding {folder} ({shown} free): {what}. Free space there "
                         "(or set trainer.output_dir elsewhere), then re-run the same command to resume")
    reason = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return UserError(f"writing into {folder} failed ({reason}) with {shown} free (a quota? a failing disk?): "
                     f"{what}. Fix the disk, then re-run the same command to resume")


def _chain(err: BaseException) -> list[BaseException]:
    """err and the exceptions it was raised from or while handling, outermost first."""
    found: list[BaseException] = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None


@contextmanager
def writes_into(folder: Path, what: str) -> Iterator[None]:
    """Turn a failed write inside the block (see `write_failure`) into its one-line UserError."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        failure = write_failure(err, folder, what)
        if failure is None:
            raise
        raise failure from None


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if the flag is set on any (a collective: all ranks must call it)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


@contextmanager
def _shared_temp_dir(accelerator, final: Path) -> Iterator[Path]:
    """atomic_dir(final) held by the main process; every process gets the temporary folder to
    write its part into. Renamed onto `final` when the block ends without an error."""
    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list([str(tmp)])
            yield tmp
    else:
        from accelerate.utils import broadcast_object_list

        box = [None]
        broadcast_object_list(box)
        yield Path(box[0])


def save_checkpoint(accelerator, run_dir: str | os.PathLike, state: TrainState, keep: int = 2) -> Path:
    """Save accelerate state + TrainState as checkpoints/step-N, atomically; keep the newest `keep`.

    A failed write (a full disk) on any rank raises one UserError on every rank, after the
    temporary folder is removed; the earlier checkpoints are untouched.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:06d}"
    if accelerator.is_main_process:
        remove_stale_temps(run_dir)
    previous = latest_checkpoint(run_dir)
    what = (f"checkpoint {final.name} was not written and its partial copy was removed; "
            f"{previous.name if previous else 'no earlier checkpoint'} and metrics.jsonl are intact")
    # DeepSpeed saves its engine's module itself (our LoRA-only hook does not apply): keep only
    # the trainable (LoRA) parameters; the frozen base comes from the model on load.
    kwargs = {"exclude_frozen_parameters": True} if _deepspeed(accelerator) else {}
    with _shared_temp_dir(accelerator, final) as tmp:
        failure: BaseException | None = None
        try:
            accelerator.save_state(str(tmp), safe_serialization=True, **kwargs)
            if accelerator.is_main_process:  # inside the temporary folder: atomic with it
                (tmp / "train_state.json").write_text(json.dumps(state.state_dict(), indent=2))
        except (OSError, RuntimeError) as err:
            failure = err
        # Every rank's shards are in tmp (or some rank failed) before main renames it; all ranks
        # agree on failing, so none waits for the others forever.
        if any_rank(accelerator, failure is not None):
            if failure is None:
                raise UserError(f"another process failed to write checkpoint {final}: see its error")
            raise (write_failure(failure, root, what) or failure)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> TrainState:
    """Restore accelerate state (model, optimizer, scheduler, RNG) and return the TrainState."""
    accelerator.load_state(str(checkpoint), **({"load_module_strict": False} if _deepspeed(accelerator) else {}))
    state = TrainState()
    state.load_state_dict(json.loads((checkpoint / "train_state.json").read_text()))
    return state
