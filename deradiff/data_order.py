"""Which dataset rows each process sees at each optimizer step: a pure function of the step.

For optimizer step s with global batch G = per_device x processes x accumulation, the rows are
perm(seed, epoch)[k*G : (k+1)*G] (k = step within the epoch), split into accumulation
micro-batches and then across ranks. Nothing about the data position needs saving to resume,
and 1 process with batch 2B sees the same rows per step as 2 processes with batch B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataOrder:
    dataset_size: int
    per_device: int
    processes: int
    accumulation: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        """Dataset rows for optimizer step `step`, accumulation micro-batch `micro`, rank `rank`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
        start = k * self.global_batch + (micro * self.processes + rank) * self.per_device
        return perm[start : start + self.per_device].tolist()
