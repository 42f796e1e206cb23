"""Which dataset rows each process sees at each optimizer step: a pure function of the step.

DataOrder (a dataset with a length): for optimizer step s with global batch
G = per_device x processes x accumulation, the rows are perm(seed, epoch)[k*G : (k+1)*G]
(k = step within the epoch), split into accumulation micro-batches and then across ranks.
Nothing about the data position needs saving to resume, and 1 process with batch 2B sees the
same rows per step as 2 processes with batch B.

StreamOrder (a streamed dataset, no length): each rank reads its own shard of the stream;
step s, micro-batch m takes the rank's items at positions (s*A + m)*B ... + B, starting a new
epoch (a reshuffled pass) when the shard runs out. Resuming re-reads the shard up to the
position (no state saved). Rows differ between 1 and 2 processes (each rank has its own shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deradiff.errors import UserError


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

    def describe(self) -> str:
        return f"{self.steps_per_epoch} steps/epoch"

    def rows(self, dataset, step: int, micro: int, rank: int) -> tuple[list[dict], list[int], int]:
        """(items, their keys, epoch) for step `step`, micro-batch `micro` on rank `rank`."""
        epoch = self.epoch_of(step)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)  # augmentation (crop/flip) keyed by epoch
        ids = self.indices(step, micro, rank)
        return [dataset[i] for i in ids], ids, epoch

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        """Dataset rows for optimizer step `step`, accumulation micro-batch `micro`, rank `rank`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
        start = k * self.global_batch + (micro * self.processes + rank) * self.per_device
        return perm[start : start + self.per_device].tolist()


class StreamOrder:
    """Rank-local positions in a streamed dataset (see the module docstring). Keys of items
    (noise, timesteps) are position * processes + rank: unique across ranks and resumable."""

    def __init__(self, per_device: int, processes: int, accumulation: int):
        self.per_device, self.processes, self.accumulation = per_device, processes, accumulation
        self._reset()

    @property
    def global_batch(self) -> int:
        return self.per_device * self.processes * self.accumulation

    def describe(self) -> str:
        return "streamed, a shard per rank"

    def _reset(self) -> None:
        self._iterator, self._position, self._epoch, self._in_epoch = None, 0, 0, 0

    def _next(self, dataset) -> tuple[dict, int]:
        while True:
            if self._iterator is None:
                dataset.set_epoch(self._epoch)
                self._iterator, self._in_epoch = iter(dataset), 0
            item = next(self._iterator, None)
            if item is not None:
                self._in_epoch += 1
                self._position += 1
                return item, self._epoch
            if self._in_epoch == 0:
                raise UserError("the streamed dataset yielded no usable pair in a whole pass over this rank's shard")
            self._iterator, self._epoch = None, self._epoch + 1

    def rows(self, dataset, step: int, micro: int, rank: int) -> tuple[list[dict], list[int], int]:
        """(items, their keys, epoch of the first) for step `step`, micro-batch `micro`."""
        start = (step * self.accumulation + micro) * self.per_device
        if start < self._position:
            self._reset()
        while self._position < start:
            self._next(dataset)
        first = self._position
        items, epochs = zip(*(self._next(dataset) for _ in range(self.per_device)), strict=True)
        ids = [(first + j) * self.processes + rank for j in range(self.per_device)]
        return list(items), ids, epochs[0]
