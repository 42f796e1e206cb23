"""The training loop shared by every method: setup -> fit -> (train_step, log, checkpoint) -> save.

A method (Diffusion-DPO, KL reward gradient, KL policy gradient) supplies a dataset of rows and
a step function `step(unet, batch, step, micro, epoch) -> (loss, metrics)`; everything else (accelerate and
DeepSpeed, mixed precision, accumulation, clipping, logging, sample grids, atomic checkpoints,
exact resume) lives here once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.io import atomic_write, write_json_atomic
from deradiff.models import DENOISERS, LORA_WEIGHT_NAME, add_lora, denoiser_name, lora_state_dict, save_lora
from deradiff.training.checkpoint import (
    TrainState,
    any_rank,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    write_failure,
    writes_into,
)
from deradiff.training.conditioning import REPLACED_BY_CACHE, TEXT_ENCODERS
from deradiff.training.data_order import DataOrder, StreamOrder, batches, default_num_workers
from deradiff.training.recipe import Recipe

# Exit status after a preemption signal was honoured (checkpoint saved): EX_TEMPFAIL,
# "try again"; slurm/*.sbatch requeues the job on it.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Method:
    """What a training method contributes to the shared loop."""

    name: str
    dataset: torch.utils.data.Dataset  # rows; a row's position in the dataset is its id
    collate: Callable[[list[dict], list[int]], dict]  # (rows, ids) -> batch
    # step(unet, batch, step, micro, epoch) -> (loss, metrics), called once per accumulation
    # micro-batch: step = optimizer steps done, micro = index of the micro-batch in this step
    # (0 .. gradient_accumulation - 1), epoch = epoch of the batch's rows. `unet` is the trainable
    # model as accelerate prepared it (DDP/DeepSpeed-wrapped); accelerator.unwrap_model(unet) is
    # the plain module, which with adapters_disabled() is the reference.
    step: Callable[[torch.nn.Module, dict, int, int, int], tuple[torch.Tensor, dict[str, float]]]
    describe: str = ""  # one line for the start-of-run log (e.g. the beta convention)
    # evaluate(unet) -> metrics on held-out data (no gradients), at trainer.eval_every and the end
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    # data_stats() -> counts of the training data so far (data/*: rows read, dropped, corrupt),
    # totals over processes; a collective, called by every rank at each logged step
    data_stats: Callable[[], dict[str, float]] | None = None
    # whether reading rows is worth DataLoader worker processes (decoding and augmenting images);
    # False: rows are read in the training process (prompt lists)
    parallel_data: bool = False


class Throughput:
    """Where training time goes, per logging window and over the whole invocation.

    A step's time runs from asking for its first micro-batch to the end of its optimizer step
    and metric reduction (evaluation, sample grids, checkpoints and logging are not counted);
    its data wait is the time spent waiting for micro-batches (decoding and collation when
    they run in the training process, the queue of DataLoader workers otherwise). Metrics:

        perf/samples_per_s   global samples (pairs or images) per second of step time
        perf/sec_per_step    seconds per optimizer step
        perf/data_wait_frac  data wait / step time, in [0, 1]
        perf/peak_mem_mib    peak memory so far, MiB: torch.cuda.max_memory_allocated on a CUDA
                             device, else the process's peak resident set (getrusage ru_maxrss;
                             DataLoader workers are other processes and not counted)
    """

    def __init__(self, global_batch: int, device: torch.device):
        self.global_batch, self.device = global_batch, device
        self.window = [0, 0.0, 0.0]  # steps, step seconds, data-wait seconds since the last log
        self.total = [0, 0.0, 0.0]  # the same since the start of this invocation

    def add(self, step_s: float, data_s: float) -> None:
        for acc in (self.window, self.total):
            acc[0] += 1
            acc[1] += step_s
            acc[2] += data_s

    def _metrics(self, steps: int, step_s: float, data_s: float) -> dict[str, float]:
        if steps == 0 or step_s <= 0:
            return {"perf/peak_mem_mib": peak_memory_mib(self.device)}
        return {"perf/samples_per_s": steps * self.global_batch / step_s, "perf/sec_per_step": step_s / steps,
                "perf/data_wait_frac": min(1.0, data_s / step_s), "perf/peak_mem_mib": peak_memory_mib(self.device)}

    def window_metrics(self) -> dict[str, float]:
        """The perf/* metrics of the steps since the last call (then starts a new window)."""
        out = self._metrics(*self.window)
        self.window = [0, 0.0, 0.0]
        return out

    def totals(self) -> dict[str, float]:
        """perf/* over every step of this invocation, plus perf/steps_timed, perf/train_s (step
        seconds) and perf/data_wait_s, for summary.json."""
        steps, step_s, data_s = self.total
        return {**self._metrics(steps, step_s, data_s), "perf/steps_timed": float(steps),
                "perf/train_s": step_s, "perf/data_wait_s": data_s}


def lora_info(recipe: Recipe, step: int) -> dict:
    """What lora/lora_info.json records beside the weights, so a LoRA folder says what it is:
    method, beta, base model, step and, for reward methods, the reward it was aligned to (a name
    or a weighted spec such as "toy=1,toy_contrast=0.5")."""
    info = {"method": recipe.method.name, "beta": recipe.method.beta, "base": recipe.model.name_or_path, "step": step}
    if recipe.method.name != "dpo":
        info["reward"] = recipe.method.reward
    return info


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max allocated on a CUDA device, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """A run is finished when its final LoRA and summary exist (both written at the very end) and
    it reached `max_steps` (raising trainer.max_steps continues a finished run)."""
    summary = run_dir / "summary.json"
    if not ((run_dir / "lora" / LORA_WEIGHT_NAME).exists() and summary.exists()):
        return False
    try:
        return int(json.loads(summary.read_text()).get("step", -1)) >= max_steps
    except (ValueError, OSError):  # a summary being written or damaged: not finished
        return False


def make_accelerator(recipe, run_dir: Path):
    """accelerate.Accelerator for this recipe: mixed precision, accumulation, trackers, gloo on CPU."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this, accelerate on CPU believes num_processes=1 on every rank.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=recipe.model.mixed_precision,
        gradient_accumulation_steps=recipe.trainer.gradient_accumulation,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.trainer.per_device_batch_size
        ds["gradient_accumulation_steps"] = recipe.trainer.gradient_accumulation
        ds["gradient_clipping"] = recipe.trainer.max_grad_norm
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_pipeline(recipe, accelerator):
    """Load the pipeline (without the components of `left_out(recipe)`), freeze it in the compute
    dtype, add the LoRA with fp32 parameters."""
    from deradiff.models import load_pipeline

    m = recipe.model
    with _whole_modules(accelerator):
        pipe = load_pipeline(m.name_or_path, revision=m.revision, variant=m.variant, vae=m.vae_name_or_path,
                             components=dict.fromkeys(left_out(recipe)))
    dtype = weight_dtype(accelerator)
    for name in (*FROZEN_ENCODERS, *DENOISERS):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.to(accelerator.device)
            if dtype != torch.float32:
                module.to(dtype=dtype)
    denoiser = getattr(pipe, denoiser_name(pipe))  # the UNet, or the SD3 / FLUX transformer
    add_lora(denoiser, rank=recipe.lora.rank, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
             target_modules=list(recipe.lora.target_modules))
    for p in denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 under fp16/bf16 autocast
    if recipe.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if recipe.trainer.compile:
        compile_denoiser(denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _whole_modules(accelerator) -> Iterator[None]:
    """Inside the block, transformers builds models whole, not sharded by deepspeed.zero.Init.

    Under ZeRO-3 accelerate registers its DeepSpeed config with transformers whatever
    zero3_init_flag says, so the pipeline's text encoders would be partitioned at load time: our
    own forward calls (prompt encoding) would then see empty weights, and ranks loading components
    in different orders desynchronize zero.Init's broadcasts. Only the denoiser is DeepSpeed's, in
    accelerator.prepare.
    """
    if not _zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


FROZEN_ENCODERS = ("vae", *TEXT_ENCODERS)


def left_out(recipe) -> tuple[str, ...]:
    """Pipeline components that training does not load: REPLACED_BY_CACHE with a latent cache,
    else none. Sample grids load them for their duration (_complete_pipeline)."""
    return REPLACED_BY_CACHE if recipe.data.latent_cache else ()


def compile_denoiser(denoiser: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile the denoiser in place (nn.Module.compile: same module, same parameter names,
    so LoRA checkpoints and peft's adapter toggling are unchanged). Lazy: the first forward
    compiles, once for the LoRA-enabled call and once for the reference (adapters disabled)."""
    denoiser.compile(backend=backend)


def attention_kinds(denoiser: torch.nn.Module) -> str:
    """The denoiser's attention processor classes, e.g. "AttnProcessor2_0" (diffusers' default
    with torch 2: torch.nn.functional.scaled_dot_product_attention, i.e. SDPA)."""
    processors = getattr(denoiser, "attn_processors", {})
    return ", ".join(sorted({type(p).__name__ for p in processors.values()})) or "none"


def make_optimizer(recipe, params):
    t = recipe.trainer
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("trainer.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _register_lora_only_checkpointing(accelerator, unet) -> None:
    """Checkpoint only the LoRA weights (safetensors), not the frozen base UNet."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        with _whole_lora(accelerator, unet):  # every rank calls the hook
            if accelerator.is_main_process:
                save_file({k: v.detach().cpu().contiguous()
                           for k, v in lora_state_dict(accelerator.unwrap_model(unet)).items()},
                          os.path.join(output_dir, "lora.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        from peft import set_peft_model_state_dict

        if not _zero3(accelerator):  # ZeRO-3's engine restored its LoRA shards (and their fp32 masters) itself
            set_peft_model_state_dict(accelerator.unwrap_model(unet),
                                      load_file(os.path.join(input_dir, "lora.safetensors")))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


@contextmanager
def _whole_lora(accelerator, unet) -> Iterator[None]:
    """Inside the block the LoRA parameters hold their whole values on every rank. Under ZeRO-3
    each rank keeps only its shard (the parameter itself is an empty tensor); a collective then:
    every rank enters the block. Elsewhere it does nothing."""
    if not _zero3(accelerator):
        yield
        return
    import deepspeed

    params = [p for p in accelerator.unwrap_model(unet).parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def fit(recipe, method_factory: Callable, run_dir: Path) -> dict:
    """Train one LoRA as the recipe says; resume from the run's latest checkpoint if there is one."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from deradiff.training.recipe_runs import save_resolved

    accelerator = make_accelerator(recipe, run_dir)
    if recipe.model.split_backward and _zero3(accelerator):
        raise UserError("model.split_backward=true under DeepSpeed ZeRO-3: each rank holds only shards of the LoRA, "
                        "which the per-image gradients need whole; use ZeRO-2 or set model.split_backward=false")
    t = recipe.trainer
    set_seed(t.seed)  # the LoRA init (and anything else drawing from global RNGs) is reproducible
    pipe = prepare_pipeline(recipe, accelerator)
    if recipe.data.latent_cache:
        accelerator.print(f"latent cache {recipe.data.latent_cache}: the VAE and text encoders are not kept in "
                          f"memory (not loaded: {', '.join(n for n in left_out(recipe) if n in pipe.config)})")
    method: Method = method_factory(recipe, pipe, accelerator)
    if hasattr(method.dataset, "__len__"):
        order = DataOrder(len(method.dataset), t.per_device_batch_size, accelerator.num_processes,
                          t.gradient_accumulation, t.seed)
        if order.steps_per_epoch < 1:
            raise UserError(
                f"the dataset has {len(method.dataset)} rows, fewer than one global batch of {order.global_batch} "
                f"(per_device_batch_size x processes x gradient_accumulation): lower the batch or add data"
            )
    else:  # streamed: each rank reads its own shard
        order = StreamOrder(t.per_device_batch_size, accelerator.num_processes, t.gradient_accumulation)
    params = [p for p in getattr(pipe, denoiser_name(pipe)).parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps * accelerator.num_processes,
                                 num_training_steps=t.max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(getattr(pipe, denoiser_name(pipe)), optimizer,
                                                        lr_scheduler)
    _register_lora_only_checkpointing(accelerator, unet)
    state = TrainState()
    if accelerator.is_main_process:
        remove_stale_temps(run_dir)  # a killed save's partial folder: free its space first
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and t.resume == "never":
        raise UserError(f"{run_dir} already has checkpoints ({checkpoint.name}) and trainer.resume=never: "
                        "choose another trainer.output_dir or set trainer.resume=auto")
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if accelerator.is_main_process:
            _truncate_jsonl(run_dir / "metrics.jsonl", state.step)  # drop steps logged after it
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if accelerator.is_main_process:
        save_resolved(recipe, run_dir)
        accelerator.init_trackers("deradiff")
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 leaves slices: ds_numel is the whole
    accelerator.print(
        f"{method.name}: {method.describe} | {n_trainable / 1e6:.2f}M trainable LoRA params | global batch "
        f"{order.global_batch} = {t.per_device_batch_size} per device x {accelerator.num_processes} processes x "
        f"{t.gradient_accumulation} accumulation | {order.describe()} | {t.max_steps} steps | attention "
        f"{attention_kinds(accelerator.unwrap_model(unet))}"
    )
    log_path = run_dir / "metrics.jsonl"
    preempted = _install_preemption_handlers()
    bar = tqdm(total=t.max_steps, initial=state.step, desc=method.name, disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    start = time.perf_counter()
    last: dict[str, float] = {}
    perf, perf_last = Throughput(order.global_batch, accelerator.device), {}
    # Closed on every way out (an error too): a DataLoader worker left running at interpreter exit
    # is terminated by multiprocessing and joined, and workers outlive SIGTERM for a grace period.
    with closing(_micro_batches(recipe, method, order, state.step, accelerator)) as micro_batches:
        while state.step < t.max_steps:
            step_metrics: list[dict] = []
            unet.train()
            step_start, data_s = time.perf_counter(), 0.0
            for micro in range(t.gradient_accumulation):
                fetch_start = time.perf_counter()
                batch, epoch = next(micro_batches)
                data_s += time.perf_counter() - fetch_start
                with accelerator.accumulate(unet):
                    loss, metrics = method.step(unet, batch, state.step, micro, epoch)
                    _check_finite(loss, state, batch, run_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                        if norm is not None:  # DeepSpeed clips inside its engine and returns None
                            metrics["train/grad_norm"] = float(norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_metrics.append(metrics)
            state.step += 1
            state.epoch = epoch
            state.samples_seen += order.global_batch
            last = _reduce_metrics(accelerator, step_metrics)
            perf.add(time.perf_counter() - step_start, data_s)
            last["train/lr"] = lr_scheduler.get_last_lr()[0]
            last["train/epoch"] = epoch
            if method.evaluate is not None and ((t.eval_every and state.step % t.eval_every == 0)
                                                or state.step == t.max_steps):
                unet.eval()
                last.update(method.evaluate(unet))
            log_now = state.step % t.log_every == 0 or state.step == t.max_steps
            if log_now and method.data_stats is not None:
                last.update(method.data_stats())
            if log_now:
                perf_last = perf.window_metrics()
                last.update(perf_last)
            if accelerator.is_main_process and log_now:
                accelerator.log(last, step=state.step)
                _append_jsonl(log_path, {"step": state.step, **last, "time_s": round(time.perf_counter() - start, 3)})
            shown = {**perf_last, **last}
            bar.set_postfix({short: f"{shown[k]:.4g}" for k, short in _BAR_KEYS.items() if k in shown})
            bar.update()
            if t.sample_every and state.step % t.sample_every == 0 and state.step < t.max_steps:
                save_sample_grid(recipe, pipe, accelerator, run_dir / "samples" / f"step-{state.step:06d}.png")
            stop = any_rank(accelerator, preempted["flag"])
            if stop or state.step % t.checkpoint_every == 0 or state.step == t.max_steps:
                save_checkpoint(accelerator, run_dir, state, keep=t.keep_checkpoints)
            if stop:
                bar.close()
                accelerator.print(f"preempted ({preempted['name']}): checkpoint at step {state.step} saved; "
                                  f"re-run the same command to resume")
                accelerator.end_training()
                sys.exit(PREEMPTED_EXIT_CODE)
    bar.close()
    accelerator.wait_for_everyone()
    save_sample_grid(recipe, pipe, accelerator, run_dir / "samples" / f"step-{state.step:06d}.png")
    with _whole_lora(accelerator, unet):  # ZeRO-3: gathered on every rank, written by the main one
        if accelerator.is_main_process:
            setattr(pipe, denoiser_name(pipe), accelerator.unwrap_model(unet))
            summary = {"step": state.step, "wall_s": round(time.perf_counter() - start, 1), **last, **perf.totals()}
            with writes_into(run_dir, f"the final LoRA and summary.json were not written; checkpoint "
                                      f"step-{state.step:06d} and metrics.jsonl are intact"):
                save_lora(pipe, run_dir / "lora", metadata=lora_info(recipe, state.step))
                write_json_atomic(run_dir / "summary.json", summary)
            accelerator.print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in summary.items())
                              + f" | LoRA: {run_dir / 'lora' / LORA_WEIGHT_NAME}")
    accelerator.end_training()
    return last


def _micro_batches(recipe, method: Method, order, start_step: int, accelerator):
    """(batch, epoch) per micro-batch from `start_step` on: read by data.num_workers DataLoader
    workers (data.prefetch_factor batches ahead each, pinned when training on CUDA) for methods
    whose rows are worth it, else in this process. The batches are the same either way."""
    d = recipe.data
    workers = 0
    if method.parallel_data:
        workers = default_num_workers() if d.num_workers is None else d.num_workers
    return batches(order, method.dataset, method.collate, start_step, accelerator.process_index,
                   num_workers=workers, prefetch_factor=d.prefetch_factor,
                   pin_memory=accelerator.device.type == "cuda")


# metric -> its short name in the progress bar
_BAR_KEYS = {"dpo/loss": "loss", "dpo/implicit_acc": "acc", "eval/dpo/implicit_acc": "eval_acc",
             "kl/loss": "loss", "kl/reward": "reward", "kl/path_kl": "kl", "eval/kl/reward": "eval_reward",
             "perf/samples_per_s": "samples/s", "perf/data_wait_frac": "data_wait", "perf/peak_mem_mib": "peak_MiB"}


def save_sample_grid(recipe, pipe, accelerator, path: Path) -> None:
    """Main process: recipe.sample prompts (rows) x images, from the base (first column) and the
    current LoRA model (the rest), same seeds, written atomically as a PNG."""
    from deradiff.grids import save_image_grid

    s = recipe.sample
    if not s.prompts or not accelerator.is_main_process or _zero3(accelerator):  # ZeRO-3 shards weights over ranks
        return
    with _complete_pipeline(recipe, pipe, accelerator) as full:
        rows = _sample_rows(s, full)
    with writes_into(path.parent, f"sample grid {path.name} was not written"):
        save_image_grid(rows, path, row_labels=[p[:28] for p in s.prompts],
                        col_labels=["base"] + [f"lora #{j}" for j in range(s.images_per_prompt)])


@contextmanager
def _complete_pipeline(recipe, pipe, accelerator) -> Iterator:
    """`pipe` when it has its VAE and text encoders; else (a latent cache left them out) a pipeline
    of the trained denoiser and freshly loaded other components, freed when the block ends."""
    if all(getattr(pipe, name, None) is not None for name in FROZEN_ENCODERS if name in pipe.config):
        yield pipe
        return
    from deradiff.models import load_pipeline

    m = recipe.model
    name = denoiser_name(pipe)
    # handed to the loader, not loaded a second time; the pipeline is built around it (SD3 and
    # SDXL read their default image size from the denoiser they are built with)
    full = load_pipeline(m.name_or_path, dtype=weight_dtype(accelerator), device=str(accelerator.device),
                         revision=m.revision, variant=m.variant, vae=m.vae_name_or_path,
                         components={name: getattr(pipe, name)})
    try:
        yield full
    finally:
        del full


@torch.no_grad()
def _sample_rows(s, pipe) -> list[list]:
    """Per prompt of sample section `s`: the base image, then s.images_per_prompt LoRA images (uint8 HWC)."""
    from deradiff.models import adapters_disabled, set_scheduler

    training_scheduler = pipe.scheduler
    set_scheduler(pipe, s.scheduler)
    rows = []
    for i, prompt in enumerate(s.prompts):
        kwargs = dict(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, output_type="np")
        gen = torch.Generator().manual_seed(s.seed + i)
        with adapters_disabled(getattr(pipe, denoiser_name(pipe))):
            base = pipe(prompt, generator=gen, **kwargs).images[0]
        gen = torch.Generator().manual_seed(s.seed + i)
        tuned = pipe(prompt, num_images_per_prompt=s.images_per_prompt, generator=gen, **kwargs).images
        rows.append([(img * 255).round().astype("uint8") for img in (base, *tuned)])
    pipe.scheduler = training_scheduler
    return rows


def _install_preemption_handlers() -> dict:
    """SIGUSR1/SIGTERM (SLURM's warning signal, preemption) ask for a checkpoint and exit after
    the current step instead of dying mid-step."""
    state = {"flag": False, "name": ""}

    def handler(signum, _frame):
        state["flag"], state["name"] = True, signal.Signals(signum).name

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, handler)
    return state


def _check_finite(loss: torch.Tensor, state: TrainState, batch: dict, run_dir: Path) -> None:
    if not torch.isfinite(loss).all():
        captions = batch.get("captions", batch.get("prompts", []))[:4]
        last = latest_checkpoint(run_dir)
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at step {state.step + 1} (captions {captions}); "
            f"last good checkpoint: {last or 'none'} (left intact). Lower trainer.lr or check the data."
        )


def _reduce_metrics(accelerator, per_micro: list[dict]) -> dict[str, float]:
    """Mean over accumulation micro-batches and processes."""
    keys = sorted(per_micro[0])
    local = torch.tensor([[m[k] for k in keys] for m in per_micro], dtype=torch.float64).mean(0)
    total = accelerator.reduce(local.to(accelerator.device), reduction="mean")
    return {k: float(v) for k, v in zip(keys, total.tolist(), strict=True) if math.isfinite(v)}


def _append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line; a failed write (full disk) is cut off again, so the file keeps only
    whole lines, and raises a one-line UserError."""
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
        except OSError as err:
            f.truncate(size)
            raise (write_failure(err, path.parent, f"step {row['step']} was not logged; {path.name} is intact "
                                                   "up to the step before") or err) from None


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows of steps <= max_step (those a resumed run does not log again)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= max_step]
    with atomic_write(path) as f:
        f.write("".join(r + "\n" for r in rows))
