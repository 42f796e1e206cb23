"""The trainer's optimizer choice (the loop itself runs end to end in test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deradiff.training.recipe import load_recipe
from deradiff.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[2]


def _one_step(optimizer_name: str) -> tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    recipe = load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [f"trainer.optimizer={optimizer_name}", "trainer.lr=1e-2"])
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8192))  # >= 4096 elements: bitsandbytes keeps 8-bit state
    before = param.detach().clone()
    opt = make_optimizer(recipe, [param])
    param.grad = torch.randn(8192, generator=torch.Generator().manual_seed(1))
    opt.step()
    return opt, before, param.detach()


def test_adamw8bit_keeps_8bit_state_and_steps_like_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    opt, before, after = _one_step("adamw8bit")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    _, before32, after32 = _one_step("adamw")
    assert torch.equal(before, before32)
    step8, step32 = after - before, after32 - before32
    # Adam's first step is lr * sign(grad) (+ decay); the 8-bit one must agree to quantization error.
    assert torch.allclose(step8, step32, atol=2e-3)
    assert float(step8.abs().mean()) > 5e-3


# -- a full disk while writing ------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def accelerator_and_run(tmp_path):
    """A CPU Accelerator with a prepared tiny model/optimizer, one good checkpoint (step 2) and
    two logged steps in metrics.jsonl."""
    from accelerate import Accelerator

    from deradiff.training.checkpoint import TrainState, save_checkpoint
    from deradiff.training.trainer import _append_jsonl

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    run = tmp_path / "run"
    save_checkpoint(accelerator, run, TrainState(step=2, samples_seen=8))
    for step in (1, 2, 3):
        _append_jsonl(run / "metrics.jsonl", {"step": step, "dpo/loss": 0.69})
    return accelerator, run


def _torch_writer_error() -> RuntimeError:
    """What torch.save raised on a full tmpfs: the stream error, then another while handling it."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 298368 vs 298256")  # noqa: B904
        except RuntimeError as err:
            return err


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("basic_ios::clear: iostream error"), _torch_writer_error()],
                         ids=["enospc", "iostream", "torch-chain"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_what_was_written(accelerator_and_run, monkeypatch,
                                                                                error):
    import shutil
    from collections import namedtuple

    from deradiff.errors import UserError
    from deradiff.training.checkpoint import TrainState, latest_checkpoint, save_checkpoint

    accelerator, run = accelerator_and_run
    before = _tree(run)

    def torch_save_until_the_disk_is_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 1000)  # part of the file made it to the disk
        raise error

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", torch_save_until_the_disk_is_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(UserError) as err:
        save_checkpoint(accelerator, run, TrainState(step=4, samples_seen=16))
    message = str(err.value)
    assert "\n" not in message
    assert f"no space left on the disk holding {run / 'checkpoints'}" in message
    assert "checkpoint step-000004 was not written" in message and "step-000002 and metrics.jsonl are intact" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"], "the partial folder is removed"
    assert _tree(run) == before, "the previous checkpoint and metrics.jsonl are unchanged"
    assert latest_checkpoint(run).name == "step-000002"


def test_a_killed_save_leaves_a_temporary_folder_that_the_next_save_removes(accelerator_and_run):
    from deradiff.training.checkpoint import TrainState, remove_stale_temps, save_checkpoint

    accelerator, run = accelerator_and_run
    for name in (".tmp-step-000004", ".tmp-step-000004.x1y2z3"):  # old and atomic_dir naming
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "optimizer.bin").write_bytes(b"\0" * 1000)
    save_checkpoint(accelerator, run, TrainState(step=4))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert remove_stale_temps(run) == []


def test_a_full_disk_while_logging_keeps_whole_lines(accelerator_and_run, monkeypatch):
    import errno
    import json

    from deradiff.errors import UserError
    from deradiff.training import trainer

    _, run = accelerator_and_run
    log = run / "metrics.jsonl"
    before = log.read_bytes()

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "open", lambda path, mode: HalfWritten(open(path, mode)), raising=False)
    with pytest.raises(UserError, match=r"^no space left on the disk holding .*step 4 was not logged"):
        trainer._append_jsonl(log, {"step": 4, "dpo/loss": 0.5})
    assert log.read_bytes() == before
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


# -- throughput reporting -----------------------------------------------------------------------


def test_throughput_windows_and_totals():
    from deradiff.training.trainer import Throughput

    perf = Throughput(global_batch=4, device=torch.device("cpu"))
    perf.add(0.5, 0.1)
    perf.add(1.5, 0.3)
    window = perf.window_metrics()
    assert window["perf/samples_per_s"] == pytest.approx(8 / 2.0)
    assert window["perf/sec_per_step"] == pytest.approx(1.0)
    assert window["perf/data_wait_frac"] == pytest.approx(0.2)
    assert window["perf/peak_mem_mib"] > 10  # this process's peak RSS: Python + torch
    perf.add(1.0, 2.0)  # a clock quirk cannot push the fraction past 1
    assert perf.window_metrics()["perf/data_wait_frac"] == 1.0
    assert set(perf.window_metrics()) == {"perf/peak_mem_mib"}, "an empty window reports memory only"
    totals = perf.totals()
    assert totals["perf/steps_timed"] == 3 and totals["perf/train_s"] == pytest.approx(3.0)
    assert totals["perf/samples_per_s"] == pytest.approx(12 / 3.0)
    assert totals["perf/data_wait_s"] == pytest.approx(2.4)
