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

`batches(order, dataset, collate, start_step, rank, num_workers)` yields the collated
micro-batches of either order from a torch DataLoader whose workers decode and augment ahead of
training; the batches are the same for any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
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


# -- batches from DataLoader workers ------------------------------------------------------------


def default_num_workers() -> int:
    """min(4, usable CPUs - 1) where worker processes can be forked (Linux), else 0."""
    import multiprocessing
    import os

    if "fork" not in multiprocessing.get_all_start_methods():
        return 0  # spawned workers would have to pickle the methods' collate closures
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus - 1))


class _IndexedBatches(torch.utils.data.Dataset):
    """Micro-batches addressed by (step, micro): order.rows + collate, a pure function of the key."""

    def __init__(self, order: DataOrder, dataset, collate, rank: int):
        self.order, self.dataset, self.collate, self.rank = order, dataset, collate, rank

    def __getitem__(self, key: tuple[int, int]):
        rows, ids, epoch = self.order.rows(self.dataset, key[0], key[1], self.rank)
        return self.collate(rows, ids), epoch, _report(self.dataset)


class _Steps(torch.utils.data.Sampler):
    """(step, micro) for every micro-batch from `start` on, without end."""

    def __init__(self, start: int, accumulation: int):
        self.start, self.accumulation = start, accumulation

    def __iter__(self):
        step = self.start
        while True:
            for micro in range(self.accumulation):
                yield step, micro
            step += 1


def _stream_batches(order: StreamOrder, dataset, collate, rank: int, start: int):
    """A rank's streamed micro-batches from step `start` on, read by a fresh StreamOrder."""
    order = StreamOrder(order.per_device, order.processes, order.accumulation)
    step = start
    while True:
        for micro in range(order.accumulation):
            rows, ids, epoch = order.rows(dataset, step, micro, rank)
            yield collate(rows, ids), epoch, _report(dataset)
        step += 1


READER_JOIN_S = 60.0  # how long closing a read-ahead waits for the element being read


def _read_ahead(produce: Iterator, depth: int) -> Iterator:
    """`produce`'s elements, computed by a background thread up to `depth` ahead (decoding and
    resizing release the GIL). Its exception is re-raised here; closing stops the thread, closes
    `produce` in it and waits for it (at most READER_JOIN_S)."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item) -> bool:
        """Put `item` for the consumer; False once the consumer has stopped."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for element in produce:
                if not hand_over((element, None)):
                    return
        except BaseException as err:  # handed to the consumer, raised there, unless it has stopped
            hand_over((None, err))
        finally:
            # In this thread: a stream left open here would be torn down by interpreter exit while
            # its native reader threads still run (seen as "terminate called without an active
            # exception", status -6).
            getattr(produce, "close", lambda: None)()

    thread = threading.Thread(target=work, name="deradiff-stream-reader", daemon=True)
    thread.start()
    try:
        while True:
            element, err = ready.get()
            if err is not None:
                raise err
            yield element
    finally:
        stop.set()
        thread.join(READER_JOIN_S)


def _report(dataset) -> dict | None:
    """What a dataset learnt while reading (corrupt rows, stream counts), for the main process."""
    return dataset.worker_report() if hasattr(dataset, "worker_report") else None


def _as_is(element):
    return element


def batches(order: DataOrder | StreamOrder, dataset, collate, start_step: int, rank: int, num_workers: int = 0,
            prefetch_factor: int = 2, pin_memory: bool = False) -> Iterator[tuple[dict, int]]:
    """(collated micro-batch, epoch) for every micro-batch from optimizer step `start_step` on,
    in the order of `order.rows`, from a torch DataLoader.

    With num_workers > 0, worker processes read, decode, augment and collate whole micro-batches
    ahead of training (prefetch_factor each) while the main process trains; the batches and
    their order are those of num_workers = 0, bit for bit, because every item is a pure function
    of its key (augmentation keyed by pair id and epoch via deradiff.seeding.keyed_generator,
    never by a worker's RNG). A streamed dataset is read in order by one background thread
    instead (num_workers x prefetch_factor micro-batches ahead). What a worker's copy of the
    dataset learns (corrupt rows found, a stream's counts) is handed to the main process's
    dataset through its `absorb(report)`. pin_memory: page-locked batches (indexed data) for
    faster copies to a CUDA device.
    """
    import copy
    import multiprocessing

    if isinstance(order, StreamOrder):
        # A thread on a copy of the dataset, not a worker process: `datasets` shards and reseeds
        # a stream iterated inside a DataLoader worker, which would change its order.
        reader = copy.copy(dataset) if num_workers > 0 else dataset
        produced = _stream_batches(order, reader, collate, rank, start_step)
        loader = _read_ahead(produced, num_workers * prefetch_factor) if num_workers > 0 else produced
    else:
        extra = {}
        if num_workers > 0:
            extra["prefetch_factor"] = prefetch_factor
            if "fork" in multiprocessing.get_all_start_methods():
                extra["multiprocessing_context"] = "fork"  # the methods' collate functions are closures
        # A private generator: creating the iterator must not draw from the global RNG (LoRA
        # dropout draws from it, and a resumed run would see other numbers).
        loader = torch.utils.data.DataLoader(
            _IndexedBatches(order, dataset, collate, rank), batch_size=None, sampler=_Steps(start_step, order.accumulation),
            collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0), worker_init_fn=_outlive_stop_signals if num_workers else None,
            **extra)
    try:
        for batch, epoch, report in loader:
            if report is not None:
                dataset.absorb(report)
            yield batch, epoch
    except UserError as err:  # raised in a worker: DataLoader adds the worker's traceback
        raise UserError(_worker_message(str(err))) from None
    finally:
        getattr(loader, "close", lambda: None)()  # now, not at garbage collection: stops the reader


def _worker_message(text: str) -> str:
    """The UserError's own one-line message out of DataLoader's 'Caught UserError in DataLoader
    worker process 0. Original Traceback ...' text."""
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split("UserError: ", 1)[-1]


# SLURM's default KillWait: after it, SIGKILL ends every process of the step anyway.
STOP_GRACE_S = 30.0


def _outlive_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker outlives SIGTERM/SIGINT by STOP_GRACE_S and ignores SIGUSR1.

    SLURM's preemption and time-limit signals reach every process of the job, and a worker
    killed by them would crash the step the trainer finishes before it checkpoints. Ignoring
    them for good would hang the exit instead: at interpreter exit multiprocessing terminates
    (SIGTERM) and then joins any worker still alive. So a stop signal starts a timer that
    exits the worker with status 0 (which the training process does not treat as a crash);
    the trainer shuts its workers down itself well before that on every way out.
    """
    import os
    import signal
    import threading

    def exit_later(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)
        timer = threading.Timer(STOP_GRACE_S, os._exit, (0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_later)
