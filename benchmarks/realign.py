"""Benchmark: the cost of realignment against aligned-only sampling and two full UNet copies.

    python benchmarks/realign.py                      # table + benchmarks/results/realign.json
    python benchmarks/realign.py --batch 8 --steps 20

Approaches, same pipeline, prompts, seeds and scheduler (DDIM), output_type="latent" so the
denoiser dominates:
  aligned_only   one UNet with the LoRA, one forward per step (plain sampling, no realignment)
  two_forward    RealignedDenoiser, LoRA mode, reference by disabling the adapter
  mixed_batch    RealignedDenoiser, LoRA mode, one forward on the doubled batch
  two_copies     the official approach: a second full UNet (LoRA merged), two forwards
Each approach runs in its own process so peak memory (ru_maxrss above the post-import
baseline: weights + activations) is not polluted by the others. Times are medians over
repeats; ratios are taken within this one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import parse_and_run, peak_rss_mib, write_results

APPROACHES = ("aligned_only", "two_forward", "mixed_batch", "two_copies")


def build(unet_width: int, seed: int = 0):
    """A tiny SD pipeline with a several-million-parameter UNet and a random rank-8 LoRA."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import _byte_level_tokenizer, _text_encoder, _vae, add_random_lora

    torch.manual_seed(seed)
    w = unet_width
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w, 2 * w, 2 * w), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    import tempfile

    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(), tokenizer=_byte_level_tokenizer(Path(tempfile.mkdtemp())),
        unet=unet, scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    add_random_lora(pipe.unet, rank=8, strength=0.05)
    return pipe


def worker(approach: str, args) -> dict:
    import copy

    import torch

    from deradiff.realign import realigned

    torch.set_num_threads(args.threads)
    # Pay imports and kernel initialization on a throwaway 16-channel pipeline first, so the
    # baseline leaves out everything but this approach's weights and activations.
    warm = build(16)
    with torch.no_grad():
        warm(["x"], num_inference_steps=2, height=args.size, width=args.size, output_type="latent")
    del warm
    base_rss = peak_rss_mib()
    pipe = build(args.width)
    reference = None
    if approach == "two_copies":
        # Two full UNets: the aligned one with its LoRA merged into the weights, and the base.
        from peft.tuners.tuners_utils import BaseTunerLayer

        aligned = copy.deepcopy(pipe.unet)
        aligned.fuse_lora()
        aligned.unload_lora()
        reference = pipe.unet
        reference.unload_lora()
        pipe.unet = aligned
        assert not any(isinstance(m, BaseTunerLayer) for m in (*aligned.modules(), *reference.modules()))
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    prompts = ["a red circle on a dark background"] * args.batch

    def sample():
        gen = torch.Generator().manual_seed(0)
        kw = dict(num_inference_steps=args.steps, guidance_scale=1.0, height=args.size, width=args.size,
                  output_type="latent", generator=gen)
        if approach == "aligned_only":
            return pipe(prompts, **kw).images
        mode = "mixed_batch" if approach == "mixed_batch" else "two_forward"
        with realigned(pipe, lam=0.5, reference=reference, mode=mode, record=False):
            return pipe(prompts, **kw).images

    with torch.no_grad():
        sample()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = sample()
            times.append(time.perf_counter() - start)
    return {
        "approach": approach,
        "unet_params_m": n_params / 1e6,
        "sec_per_image": statistics.median(times) / args.batch,
        "peak_mib": peak_rss_mib() - base_rss,
        "checksum": float(out.double().abs().mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per approach (median)")
    p.add_argument("--width", type=int, default=128, help="UNet base channel width (64: 8.7M params, 128: 35M)")
    p.add_argument("--size", type=int, default=16, help="image side in px (latent side = size / 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/realign.json")
    args, results = parse_and_run(p, __file__, APPROACHES, worker, argv)
    if results is None:  # this process was one worker
        return 0
    official = results["two_copies"]
    plain = results["aligned_only"]
    print(f"UNet {plain['unet_params_m']:.1f}M params, batch {args.batch}, {args.steps} DDIM steps, "
          f"{args.threads} threads, {args.size}x{args.size} px ({args.size // 2}x{args.size // 2} latents)")
    print(f"{'approach':<14}{'s/image':>10}{'peak MiB':>10}{'time / two_copies':>19}{'mem / two_copies':>18}")
    for name, r in results.items():
        r["time_ratio_vs_two_copies"] = r["sec_per_image"] / official["sec_per_image"]
        r["mem_ratio_vs_two_copies"] = r["peak_mib"] / official["peak_mib"]
        r["time_ratio_vs_aligned_only"] = r["sec_per_image"] / plain["sec_per_image"]
        print(f"{name:<14}{r['sec_per_image']:>10.4f}{r['peak_mib']:>10.1f}"
              f"{r['time_ratio_vs_two_copies']:>19.2f}{r['mem_ratio_vs_two_copies']:>18.2f}")
    summary = {
        "two_forward_time_vs_two_plain_evals": results["two_forward"]["sec_per_image"] / official["sec_per_image"],
        "two_forward_mem_vs_two_copies": results["two_forward"]["mem_ratio_vs_two_copies"],
        "mixed_batch_time_vs_two_forward": results["mixed_batch"]["sec_per_image"] / results["two_forward"]["sec_per_image"],
    }
    print("targets: two_forward time <= 1.1x two plain evaluations per step "
          f"(got {summary['two_forward_time_vs_two_plain_evals']:.2f}x); peak memory <= 0.55x two copies "
          f"(got {summary['two_forward_mem_vs_two_copies']:.2f}x); mixed_batch / two_forward time "
          f"= {summary['mixed_batch_time_vs_two_forward']:.2f}")
    write_results(args.out, args, results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
