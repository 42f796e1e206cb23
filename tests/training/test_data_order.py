"""Which rows each rank sees per step: DataOrder (indexable data) and StreamOrder (streamed)."""

from __future__ import annotations

import pytest

from deradiff.errors import UserError
from deradiff.training.data_order import DataOrder, StreamOrder


class FakeStream:
    """An iterable dataset of n items whose order depends on the epoch, like a shuffled stream."""

    def __init__(self, n: int, tag: str = ""):
        self.n, self.tag, self.epoch, self.passes = n, tag, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.passes += 1
        order = range(self.n) if self.epoch % 2 == 0 else reversed(range(self.n))
        return iter({"item": f"{self.tag}{i}", "epoch": self.epoch} for i in order)


def test_data_order_splits_a_global_batch_the_same_way_for_any_process_count():
    one = DataOrder(64, per_device=4, processes=1, accumulation=1, seed=0)
    two = DataOrder(64, per_device=2, processes=2, accumulation=1, seed=0)
    for step in (0, 5, 17):  # 17 is in the second epoch
        assert one.indices(step, 0, 0) == two.indices(step, 0, 0) + two.indices(step, 0, 1)
    assert one.epoch_of(17) == 1
    rows, ids, epoch = one.rows(list(range(100, 164)), 3, 0, 0)
    assert rows == [100 + i for i in ids] and epoch == 0


def test_stream_order_walks_positions_wraps_epochs_and_keys_uniquely_per_rank():
    order = StreamOrder(per_device=3, processes=2, accumulation=2)
    stream = FakeStream(10)
    seen = [order.rows(stream, step, micro, rank=1) for step in range(3) for micro in range(2)]
    items = [r["item"] for rows, _, _ in seen for r in rows]
    assert items[:10] == [str(i) for i in range(10)] and items[10:] == ["9", "8", "7", "6", "5", "4", "3", "2"]
    assert [epoch for _, _, epoch in seen] == [0, 0, 0, 0, 1, 1]  # epoch of a batch = of its first row (position 9: epoch 0)
    keys = [k for _, ids, _ in seen for k in ids]
    assert keys == [p * 2 + 1 for p in range(18)]  # rank 1 of 2: odd keys; rank 0 would get the even ones
    # A fresh order (a resumed run) reaches the same rows for a later step by re-reading.
    resumed = StreamOrder(per_device=3, processes=2, accumulation=2)
    assert resumed.rows(FakeStream(10), 2, 1, rank=1) == seen[-1]
    # Asking for an earlier step restarts the pass instead of returning wrong rows.
    assert order.rows(stream, 0, 0, rank=1) == seen[0]


def test_stream_order_refuses_a_stream_with_nothing_in_it():
    with pytest.raises(UserError, match="no usable pair"):
        StreamOrder(per_device=2, processes=1, accumulation=1).rows(FakeStream(0), 0, 0, rank=0)


def test_closing_a_read_ahead_stops_and_closes_its_producer_before_returning():
    """The consumer stopping early (end of training) must leave no reader thread running and the
    producer closed in it: a stream still open at interpreter exit aborts the process."""
    import threading
    import time

    from deradiff.training.data_order import _read_ahead

    closed = threading.Event()

    def produce():
        try:
            for i in range(1000):
                time.sleep(0.01)  # reading one element takes a while
                yield i
        finally:
            closed.set()

    reader = _read_ahead(produce(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()
    assert closed.is_set()
    assert not any(t.name == "deradiff-stream-reader" and t.is_alive() for t in threading.enumerate())


def test_a_read_ahead_raises_its_producers_error_in_the_consumer():
    from deradiff.training.data_order import _read_ahead

    def produce():
        yield 1
        raise UserError("bad row 7")

    reader = _read_ahead(produce(), depth=1)
    assert next(reader) == 1
    with pytest.raises(UserError, match="bad row 7"):
        next(reader)
