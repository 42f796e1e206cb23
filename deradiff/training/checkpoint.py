"""Checkpoints that resume exactly: accelerate state + a small TrainState, written atomically.

Layout of a run directory:
    run_dir/recipe.yaml                 the resolved recipe
    run_dir/checkpoints/step-000120/    accelerate.save_state (model/optimizer/scheduler/RNG,
                                        DeepSpeed shards when used) + train_state.json
    run_dir/lora/                       the final LoRA (diffusers format, safetensors)
A checkpoint is written to checkpoints/.tmp-step-N and renamed when complete, so a run killed
mid-write leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where training is: optimizer step and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of the current epoch already consumed (all ranks)
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
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


def _deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def save_checkpoint(accelerator, run_dir: str | os.PathLike, state: TrainState, keep: int = 2) -> Path:
    """Save accelerate state + TrainState under checkpoints/step-N atomically; keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # DeepSpeed saves its engine's module itself (our LoRA-only hook does not apply): keep only
    # the trainable (LoRA) parameters; the frozen base comes from the model on load.
    kwargs = {"exclude_frozen_parameters": True} if _deepspeed(accelerator) else {}
    accelerator.save_state(str(tmp), safe_serialization=True, **kwargs)
    accelerator.wait_for_everyone()  # every rank's shards are in tmp before it is renamed
    if accelerator.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps(state.state_dict(), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
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
