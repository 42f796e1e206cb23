"""What the tests that run train/align.py in a subprocess share: its environment and the losses
it logs.

    from align_runs import align_env, dpo_losses
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def align_env(**extra: str) -> dict:
    """The environment of a train/align.py subprocess: offline, one thread, a single process
    (no inherited WORLD_SIZE), plus `extra`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def dpo_losses(run_dir: Path) -> dict[int, float]:
    """{step: dpo/loss} from a run directory's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["dpo/loss"] for r in rows}
