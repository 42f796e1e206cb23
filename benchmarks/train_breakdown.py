"""Benchmark: where a Diffusion-DPO step's time goes at SD1.5 shape, with and without the latent
cache (deradiff.training.cache) and DataLoader workers.

    python benchmarks/train_breakdown.py            # SD1.5 shape, ~4-5 min on 2 CPU cores, ~11 GB RAM
    python benchmarks/train_breakdown.py --tiny     # the same code at toy widths, seconds

Models have SD1.5's shapes and random weights, built in memory (no downloads): UNet 860M
parameters (320/640/1280/1280, cross-attention 768), VAE 84M (128/256/512/512), CLIP-L-sized
text encoder 123M; LoRA rank 8 on the attention projections; batch 1 pair; the pairs are 640x512
JPEGs written by the script, resized and center-cropped to 512 and flipped by the keyed draw.
Every part runs through the toolkit's own code:

  data       PreferencePairs item + collate_pairs (decode, resize, crop, flip); with the cache:
             CachedPairs item + collate_cached + cached_latents + cached_conditioning
  encode     dpo.encode_latents (VAE posterior draw of both images) + encode_prompts (CLIP);
             nothing with the cache
  unet       dpo_errors_from_latents (trained and reference forward) + the loss's backward
  optimizer  AdamW step + zero_grad on the LoRA parameters

With W workers the data part is the time a step waits for its batch while DataLoader workers
prepare batches ahead and the training process is busy (a CPU-bound matmul loop of --busy
seconds per step, competing for the cores as the UNet would). The real UNet step is much longer
than --busy, and a longer step only leaves the workers more time, so the wait reported is an
upper bound. Step times are sums of the parts, measured in one process; the UNet and optimizer
parts do not depend on the data path and are measured once (one repeat: a step is minutes here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mib, write_results


def _byte_tokenizer(folder: Path, max_length: int):
    """A CLIP tokenizer over the 256 byte symbols (no merges, no download): any caption works."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in bytes_to_unicode().values():
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def build_pipeline(tiny: bool, folder: Path):
    """An SD1.5-shaped StableDiffusionPipeline with random weights (tiny: toy widths)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                    cross_attention_dim=32, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, latent_channels=4)
        text = CLIPTextConfig(vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)
    else:  # SD1.5: diffusers' UNet defaults are its blocks; cross-attention dim 768 (CLIP-L)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=CLIPTextModel(text).eval(),
                                   tokenizer=_byte_tokenizer(folder / "tokenizer", 77), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_pairs(path: Path, n: int, size: tuple[int, int]) -> None:
    """n Pick-a-Pic-format pairs of smooth random JPEGs (quality 90), w x h = size."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(n):
        images = []
        for _ in range(2):
            small = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8))
            buf = io.BytesIO()
            small.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
        rows["caption"].append(f"a photo of object {i} on a table, detailed, soft light")
        rows["jpg_0"].append(images[0])
        rows["jpg_1"].append(images[1])
        rows["label_0"].append(float(i % 2))
    pq.write_table(pa.table(rows), path)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _busy(seconds: float) -> None:
    """Occupy the torch threads for `seconds` (stands in for the UNet step)."""
    import torch

    a = torch.randn(384, 384)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = (a @ a).clamp_(-1, 1)


def loader_wait(dataset, collate, workers: int, busy: float, steps: int) -> dict:
    """Median wait for the next batch (steps 2..) while the consumer is busy `busy` s per step,
    and the first batch's wait (worker start-up), through the trainer's data_order.batches."""
    from deradiff.training.data_order import DataOrder, batches

    order = DataOrder(len(dataset), 1, 1, 1, seed=0)
    it = batches(order, dataset, collate, 0, 0, num_workers=workers, prefetch_factor=2)
    waits = []
    for _ in range(steps):
        start = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - start)
        _busy(busy)
    it.close()
    return {"wait_s": statistics.median(waits[1:]), "first_wait_s": waits[0]}


def _mib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def measure(args) -> dict:
    import torch

    from deradiff.models import add_lora
    from deradiff.training.cache import (
        LatentCache,
        build_cache,
        cached_conditioning,
        cached_latents,
        collate_cached,
    )
    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.data import collate_pairs, load_preference_dataset
    from deradiff.training.data_order import default_num_workers
    from deradiff.training.dpo import dpo_errors_from_latents, encode_latents
    from deradiff.training.losses import diffusion_dpo_loss
    from deradiff.training.recipe_load import load_recipe

    torch.set_num_threads(args.threads)
    workers = default_num_workers() if args.workers is None else args.workers
    tmp = Path(tempfile.mkdtemp(prefix="train_breakdown."))
    res = 64 if args.tiny else 512
    start = time.perf_counter()
    pipe = build_pipeline(args.tiny, tmp)
    out: dict = {"weights_mib": {"unet": _mib(pipe.unet), "vae": _mib(pipe.vae), "text_encoder": _mib(pipe.text_encoder)},
                 "workers": workers, "build_s": time.perf_counter() - start}
    write_pairs(tmp / "pairs.parquet", args.pairs, (res * 5 // 4, res))
    over = ["model.name_or_path=in-memory-sd15-shape", f"data.path={tmp / 'pairs.parquet'}", "data.eval_path=null",
            f"data.resolution={res}", "method.beta=2000", f"trainer.output_dir={tmp / 'run'}"]
    recipe = load_recipe(None, over)
    pairs, _ = load_preference_dataset(recipe.data, seed=0)

    def collate(rows, ids):
        return {**collate_pairs(rows), "ids": ids}

    # data, in the training process: decode + resize + crop + flip + collate of one pair
    out["data_s"] = _median_time(lambda: collate([pairs[0]], [0]), 5)
    batch = collate([pairs[0]], [0])
    # encode: the VAE posterior draw of both images + the caption's CLIP states
    with torch.no_grad():
        out["text_s"] = _median_time(lambda: encode_prompts(pipe, batch["captions"], "cpu"), 3)
        cond = encode_prompts(pipe, batch["captions"], "cpu")
        start = time.perf_counter()
        latents = encode_latents(pipe.vae, torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]]), [0, 1], 0, 0)
        out["vae_s"] = time.perf_counter() - start
    # the latent cache of one pair (one flip: the build's cost is the VAE's, measured above)
    cache_dir = tmp / "cache"
    cache_recipe = load_recipe(None, [*over, f"data.latent_cache={cache_dir}", "data.random_flip=false",
                                      "data.max_train_samples=1"])
    start = time.perf_counter()
    build_cache(cache_recipe, batch_size=1, num_workers=0, pipe=pipe, log=lambda _: None)
    out["cache_build_s_per_pair"] = time.perf_counter() - start
    cache = LatentCache(cache_dir, json.loads((cache_dir / "manifest.json").read_text()))
    cached = cache.pairs("train", 0, False)  # one flip stored; a read takes one flip either way

    def cached_collate(rows, ids):
        return {**collate_cached(rows), "ids": ids}

    def read_cached():
        b = cached_collate([cached[0]], [0])
        return (cached_latents(b, [0], 0, 0, cache.scaling_factor, cache.shift_factor, "cpu"),
                cached_conditioning(b, "sd15", res, "cpu"))

    out["cache_read_s"] = _median_time(read_cached, 5)
    # UNet forward (trained + reference) and backward, optimizer
    unet = pipe.unet
    add_lora(unet, rank=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    start = time.perf_counter()
    errors = dpo_errors_from_latents(unet, unet, pipe.scheduler, latents, cond, [0], seed=0, epoch=0)
    out["unet_forward_s"] = time.perf_counter() - start
    loss, _ = diffusion_dpo_loss(*errors, beta=2000)
    start = time.perf_counter()
    loss.backward()
    out["unet_backward_s"] = time.perf_counter() - start

    # the same gradients each repeat; torch's first AdamW steps on CPU are much slower than later
    # ones (~4 s vs 0.2 s for 2.6M parameters in 512 tensors here): report the steady state
    opt_times = [_median_time(optimizer.step, 1) for _ in range(6)]
    out["optimizer_first_s"], out["optimizer_s"] = opt_times[0], statistics.median(opt_times[3:])
    out["zero_grad_s"] = _median_time(lambda: optimizer.zero_grad(set_to_none=True), 1)
    # the data wait with DataLoader workers while the training process is busy
    steps = 4 if args.tiny else 6
    for name, dataset, coll in (("uncached", pairs, collate), ("cached", cached, cached_collate)):
        for w in sorted({0, workers}):
            out[f"{name}_workers{w}"] = loader_wait(dataset, coll, w, args.busy, steps)
    out["peak_rss_mib"] = peak_rss_mib()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def summarize(m: dict) -> tuple[dict, dict]:
    """Per configuration: the parts of a step (s), the step, its data-wait fraction, and the
    step relative to uncached with no workers."""
    unet = m["unet_forward_s"] + m["unet_backward_s"]
    encode = m["vae_s"] + m["text_s"]
    configs = {}
    for name, enc in (("uncached", encode), ("cached", 0.0)):
        for w in sorted({0, m["workers"]}):
            data = m[f"{name}_workers{w}"]["wait_s"]
            parts = {"data": data, "encode": enc, "unet": unet, "optimizer": m["optimizer_s"] + m["zero_grad_s"]}
            step = sum(parts.values())
            configs[f"{name}, {w} workers"] = {**parts, "step": step, "data_wait_frac": data / step}
    base = configs["uncached, 0 workers"]["step"]
    for c in configs.values():
        c["vs_uncached_0_workers"] = c["step"] / base
    summary = {
        "cached_step_vs_uncached": configs[f"cached, {m['workers']} workers"]["step"] / base,
        "encode_share_of_uncached_step": encode / base,
        "data_wait_frac_uncached_workers": configs[f"uncached, {m['workers']} workers"]["data_wait_frac"],
        "data_wait_frac_uncached_no_workers": configs["uncached, 0 workers"]["data_wait_frac"],
        "encoder_weights_vs_unet": (m["weights_mib"]["vae"] + m["weights_mib"]["text_encoder"]) / m["weights_mib"]["unet"],
    }
    return configs, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy widths and 64 px (seconds; a smoke test of the script)")
    p.add_argument("--pairs", type=int, default=6, help="JPEG pairs written (the data part cycles over them)")
    p.add_argument("--busy", type=float, default=None, help="seconds the training process is busy per step while "
                                                            "workers load (stands in for the UNet step; default 3, "
                                                            "--tiny 0.3)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.num_workers's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/train_breakdown.json")
    args = p.parse_args(argv)
    args.busy = args.busy if args.busy is not None else (0.3 if args.tiny else 3.0)
    load_before = os.getloadavg()
    start = time.perf_counter()
    measured = measure(args)
    configs, summary = summarize(measured)
    measured.update(wall_s=time.perf_counter() - start, loadavg_before=load_before, loadavg_after=os.getloadavg())
    w = measured["workers"]
    print(f"Diffusion-DPO step breakdown, {'tiny' if args.tiny else 'SD1.5'} shape (UNet "
          f"{measured['weights_mib']['unet']:.0f} MiB, VAE {measured['weights_mib']['vae']:.0f} MiB, text encoder "
          f"{measured['weights_mib']['text_encoder']:.0f} MiB fp32), batch 1 pair, {args.threads} threads, "
          f"load average {load_before[0]:.1f} -> {measured['loadavg_after'][0]:.1f}")
    names = list(configs)
    print(f"{'seconds':<20}" + "".join(f"{n:>22}" for n in names))
    for part in ("data", "encode", "unet", "optimizer", "step", "data_wait_frac", "vs_uncached_0_workers"):
        print(f"{part:<20}" + "".join(f"{configs[n][part]:>22.4g}" for n in names))
    print(f"cache build: {measured['cache_build_s_per_pair']:.1f} s per pair per flip (once per data set, model, "
          f"resolution); cache read {measured['cache_read_s'] * 1e3:.1f} ms vs decode+augment "
          f"{measured['data_s'] * 1e3:.1f} ms per pair; first batch from {w} worker(s): "
          f"{measured[f'uncached_workers{w}']['first_wait_s']:.2f} s")
    print("summary: " + ", ".join(f"{k}={v:.3g}" for k, v in summary.items()))
    write_results(args.out, args, {"measured": measured, "configs": configs}, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
