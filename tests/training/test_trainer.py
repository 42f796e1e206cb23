"""The trainer's optimizer choice (the loop itself runs end to end in test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deradiff.training.recipe_load import load_recipe
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


# -- memory and speed knobs ---------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """Each Accelerator below may use another mixed precision: accelerate's state is a
    process-wide singleton that refuses a change, so reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _toy_dpo_step(toy_world, tmp_path, *overrides: str, objective: str = "dpo"):
    """The trainer's pipeline (make_accelerator + prepare_pipeline) on the toy world, a random
    LoRA (so the model differs from the reference), and one DPO loss on 2 pairs; backward of the
    loss (objective "dpo") or of the model's mean denoising error ("mse").
    Returns (pipe, per-pair errors, loss, LoRA gradients by name)."""
    from accelerate.state import AcceleratorState

    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.dpo import dpo_errors
    from deradiff.training.losses import diffusion_dpo_loss
    from deradiff.training.trainer import make_accelerator, prepare_pipeline

    AcceleratorState._reset_state(True)
    recipe = load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [f"model.name_or_path={toy_world / 'pipe'}", *overrides])
    accelerator = make_accelerator(recipe, tmp_path)
    torch.manual_seed(0)  # the LoRA's A matrices (as fit's set_seed)
    pipe = prepare_pipeline(recipe, accelerator)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pixels = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    pipe.unet.train()
    cond = encode_prompts(pipe, ["a red circle on a dark background", "a blue square on a light background"],
                          accelerator.device)
    with accelerator.autocast():
        errors = dpo_errors(pipe.unet, pipe.unet, pipe.vae, pipe.scheduler, pixels[:2], pixels[2:], cond,
                            pair_ids=[0, 1], seed=0, epoch=0, split_backward=recipe.model.split_backward)
    loss, _ = diffusion_dpo_loss(*errors, beta=2000)
    (loss if objective == "dpo" else (errors[0] + errors[1]).mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    return pipe, torch.stack([e.detach().float() for e in errors]), loss.detach(), grads


def test_bf16_autocast_freezes_weights_in_bf16_and_trains_the_lora_in_fp32(toy_world, tmp_path,
                                                                          fresh_accelerate_state):
    pipe, errors, loss, grads = _toy_dpo_step(toy_world, tmp_path, "model.mixed_precision=bf16", objective="mse")
    assert pipe.unet.conv_in.weight.dtype == pipe.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    lora = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    _, errors32, loss32, grads32 = _toy_dpo_step(toy_world, tmp_path, objective="mse")
    # bf16 keeps ~3 significant digits: the per-image errors, and the LoRA gradients of the
    # denoising error, agree with fp32 to a few percent. The DPO loss does not: beta/2 = 1000
    # multiplies differences of errors, so bf16 rounding moves it by O(1) at a random LoRA.
    torch.testing.assert_close(errors, errors32, rtol=0.05, atol=1e-3)
    assert torch.isfinite(loss) and 0 < float(loss) < 20
    flat, flat32 = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, grads32))
    assert float(torch.nn.functional.cosine_similarity(flat, flat32, dim=0)) > 0.99
    assert float((flat.norm() / flat32.norm() - 1).abs()) < 0.05


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(toy_world, tmp_path, fresh_accelerate_state):
    pipe, errors, loss, grads = _toy_dpo_step(toy_world, tmp_path, "model.gradient_checkpointing=true")
    assert pipe.unet.is_gradient_checkpointing
    _, errors_plain, loss_plain, grads_plain = _toy_dpo_step(toy_world, tmp_path)
    torch.testing.assert_close(errors, errors_plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_split_backward_gives_the_batched_loss_and_lora_gradients(toy_world, tmp_path, fresh_accelerate_state,
                                                                 checkpointing):
    flags = ["model.gradient_checkpointing=true"] if checkpointing else []
    _, errors, loss, grads = _toy_dpo_step(toy_world, tmp_path, "model.split_backward=true", *flags)
    _, errors_plain, loss_plain, grads_plain = _toy_dpo_step(toy_world, tmp_path)
    torch.testing.assert_close(errors, errors_plain, rtol=1e-5, atol=1e-7)
    # beta / 2 = 1000 multiplies differences of errors: one-image and batched kernels' rounding
    # (1e-7 in an error) moves the loss by ~1e-4 of itself, and the gradients' weights with it.
    torch.testing.assert_close(loss, loss_plain, rtol=1e-4, atol=1e-6)
    assert grads.keys() == grads_plain.keys()
    assert sum(float(g.abs().sum()) for g in grads_plain.values()) > 0
    for name in grads:  # to 1e-4 of each tensor's largest entry (measured: 5e-6 of the largest overall)
        scale = float(grads_plain[name].abs().max())
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=0, atol=1e-4 * scale, msg=name)


def test_split_backward_under_zero3_is_refused_before_loading(toy_world, tmp_path, fresh_accelerate_state,
                                                             monkeypatch):
    from deradiff.errors import UserError
    from deradiff.training import trainer

    monkeypatch.setattr(trainer, "_zero3", lambda accelerator: True)
    monkeypatch.setattr(trainer, "prepare_pipeline", lambda *a: pytest.fail("loaded the pipeline"))
    recipe = load_recipe(ROOT / "recipes" / "toy-dpo.yaml", [f"model.name_or_path={toy_world / 'pipe'}",
                                                             "model.split_backward=true"])
    with pytest.raises(UserError, match="model.split_backward=true under DeepSpeed ZeRO-3.*use ZeRO-2"):
        trainer.fit(recipe, None, tmp_path / "run")


def test_attention_runs_through_sdpa_processors(toy_world, tmp_path, fresh_accelerate_state, monkeypatch):
    """diffusers' default attention with torch 2 is AttnProcessor2_0, which calls
    F.scaled_dot_product_attention; the LoRA (peft) keeps it."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor2_0

    from deradiff.training.trainer import attention_kinds

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe, *_ = _toy_dpo_step(toy_world, tmp_path)
    processors = pipe.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    assert attention_kinds(pipe.unet) == "AttnProcessor2_0"
    assert calls, "the UNet's attention called SDPA"


def test_compile_option_compiles_the_denoiser_in_place(toy_world, tmp_path, fresh_accelerate_state, monkeypatch):
    """trainer.compile=true: nn.Module.compile on the denoiser (lazy: compiling happens at the first
    forward, minutes with inductor on CPU, so this test records the call and runs eagerly)."""
    from deradiff.training import trainer

    compiled = []
    monkeypatch.setattr(trainer, "compile_denoiser", lambda module: compiled.append(module))
    pipe, *_ = _toy_dpo_step(toy_world, tmp_path, "trainer.compile=true")
    assert compiled == [pipe.unet]


@pytest.mark.slow
def test_a_compiled_denoiser_gives_the_eager_loss_and_gradients(tmp_path):
    """compile_denoiser on a tiny SD1.5-shaped UNet with a LoRA, LoRA-enabled and reference
    (adapters disabled) calls: the eager numbers. Backend aot_eager (dynamo + autograd tracing,
    ~30 s here); the trainer's inductor adds code generation (~6 min for this UNet on a busy CPU)."""
    from conftest import build_tiny_sd15

    from deradiff.models import adapters_disabled, add_lora
    from deradiff.training.trainer import compile_denoiser

    unet = build_tiny_sd15(tmp_path).unet
    unet.requires_grad_(False)
    add_lora(unet, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x, t, ehs = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]), torch.randn(2, 8, 32, generator=gen)
    unet.train()

    def loss_and_grads():
        for p in unet.parameters():
            p.grad = None
        out = unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        with torch.no_grad(), adapters_disabled(unet):
            ref = unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        loss = (out - x).pow(2).mean() - (ref - x).pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters() if p.requires_grad]

    eager_loss, eager_grads = loss_and_grads()
    compile_denoiser(unet, backend="aot_eager")
    loss, grads = loss_and_grads()
    assert unet._compiled_call_impl is not None
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_before_loading(monkeypatch):
    import shutil

    from deradiff.errors import UserError
    from deradiff.training.recipe_checks import preflight

    recipe = load_recipe(ROOT / "recipes" / "toy-kl-grad.yaml", ["trainer.compile=true"])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"trainer.compile=true on CPU needs a C\+\+ compiler"):
        preflight(recipe)


def test_lora_info_records_method_beta_base_step_and_the_reward_of_reward_methods():
    from deradiff.training.recipe_load import load_recipe
    from deradiff.training.trainer import lora_info

    kl = load_recipe("toy-kl-grad", ["method.reward=toy=1,toy_contrast=0.5"])
    assert lora_info(kl, 7) == {"method": "kl_grad", "beta": 1e-6, "base": "toy", "step": 7,
                                "reward": "toy=1,toy_contrast=0.5"}
    dpo = load_recipe("toy-dpo")
    assert lora_info(dpo, 3) == {"method": "dpo", "beta": 2000.0, "base": "toy", "step": 3}
