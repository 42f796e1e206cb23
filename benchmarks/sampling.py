"""Benchmark: realigned sampling throughput by batch size, two_forward against mixed_batch.

    OMP_NUM_THREADS=2 python benchmarks/sampling.py     # table + benchmarks/results/sampling.json
    python benchmarks/sampling.py --batches 1 2 4 --repeats 3 --models toy --threads 1

What `--mode auto` is tuned on (deradiff.evaluation.sampling.choose_mode). Models, random
weights with a random rank-8 LoRA, CFG 3 (the denoiser sees rows = 2 x batch), DDIM,
output_type="latent" (decoding does not depend on the mode):
  toy     the toy world's pipeline (1.9M-param UNet, 32 px: 16x16x4 latents)
  unet8m  a larger tiny SD UNet (width 64: 8.7M params, 16 px: 8x8x4 latents; benchmarks/realign.py)
Approaches, per batch of B images: plain (one forward per step with the LoRA on: sampling
without realignment), two_forward and mixed_batch (deradiff.realign). Times are minima over
repeats (the least disturbed by other work on a shared machine), the three approaches
interleaved so that drifting load hits all alike. Batches run smallest first, both models at
each, until --max-s is spent (the rest are listed as skipped). The rule printed at the end: per
model, the largest rows per call up to which mixed_batch was faster than two_forward at every
batch measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import write_results

APPROACHES = ("plain", "two_forward", "mixed_batch")
MODELS = {"toy": 32, "unet8m": 16}  # name -> image side in pixels
GUIDANCE = 3.0


def _random_lora(unet, seed: int = 1) -> None:
    import torch

    from deradiff.models import add_lora

    add_lora(unet, rank=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def build(model: str):
    """The model's pipeline with a random LoRA and DDIM, progress bar off."""
    from diffusers import DDIMScheduler

    if model == "toy":
        from deradiff.toy.pipeline import build_toy_pipeline

        pipe = build_toy_pipeline(seed=0)
        _random_lora(pipe.unet)
    else:
        from realign import build_unet as build_sd  # benchmarks/realign.py: a tiny SD pipeline, LoRA included

        pipe = build_sd(64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts_for(batch: int) -> list[str]:
    from deradiff.toy.prompts import prompt_set

    captions = prompt_set("test")
    return [captions[i % len(captions)] for i in range(batch)]


def time_batch(pipe, size: int, batch: int, args) -> dict:
    """{approach: {"sec_per_call", "images_per_s"}} for one pipeline and batch size."""
    import torch

    from deradiff.realign import realigned

    prompts = prompts_for(batch)

    def call(approach: str):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        kw = dict(num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=size, width=size,
                  output_type="latent", generator=gens)
        if approach == "plain":
            return pipe(prompts, **kw).images
        with realigned(pipe, lam=0.5, mode=approach):
            return pipe(prompts, **kw).images

    times: dict[str, list[float]] = {a: [] for a in APPROACHES}
    with torch.no_grad():
        for a in APPROACHES:
            call(a)  # warm-up at this shape
        for _ in range(args.repeats):
            for a in APPROACHES:
                start = time.perf_counter()
                call(a)
                times[a].append(time.perf_counter() - start)
    return {a: {"sec_per_call": min(t), "images_per_s": batch / min(t)} for a, t in times.items()}


def mixed_max_rows(batches: dict) -> int:
    """The largest denoiser rows per call (2 x batch: CFG) up to which mixed_batch beat
    two_forward at every measured batch; 0 when it lost already at the smallest."""
    best = 0
    for batch in sorted(batches):
        r = batches[batch]
        if r["mixed_batch"]["sec_per_call"] < r["two_forward"]["sec_per_call"]:
            best = 2 * batch
        else:
            break
    return best


def measure(args) -> dict:
    """{model: {"unet_params_m", "batches": {batch: time_batch(...)}, "skipped": [batches]}}."""
    start = time.perf_counter()
    pipes = {m: build(m) for m in args.models}
    results = {m: {"unet_params_m": round(sum(p.numel() for n, p in pipe.unet.named_parameters()
                                              if "lora_" not in n) / 1e6, 2), "batches": {}, "skipped": []}
               for m, pipe in pipes.items()}
    for batch in sorted(args.batches):
        for model, pipe in pipes.items():
            if time.perf_counter() - start > args.max_s:
                results[model]["skipped"].append(batch)
                continue
            r = results[model]["batches"][batch] = time_batch(pipe, MODELS[model], batch, args)
            print(f"  {model} batch {batch}: " + ", ".join(f"{a} {r[a]['images_per_s']:.1f} img/s" for a in APPROACHES),
                  file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="images per pipeline call")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps per call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per approach and batch (minimum)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--max-s", type=float, default=150.0, help="start no new batch size after this many seconds")
    p.add_argument("--out", default="benchmarks/results/sampling.json")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    start = time.perf_counter()
    results = measure(args)
    print(f"{args.steps} DDIM steps, CFG {GUIDANCE:g} (denoiser rows = 2 x batch), {args.threads} threads, cpu, "
          f"best of {args.repeats}; {time.perf_counter() - start:.0f}s")
    print(f"{'model':<8}{'batch':>6}{'rows':>6}{'plain img/s':>13}{'two_fwd img/s':>15}{'mixed img/s':>13}"
          f"{'mixed/two time':>16}{'two/plain time':>16}")
    summary: dict = {"device": "cpu", "threads": args.threads}
    for model, res in results.items():
        for batch, r in res["batches"].items():
            r["mixed_over_two_time"] = r["mixed_batch"]["sec_per_call"] / r["two_forward"]["sec_per_call"]
            r["two_over_plain_time"] = r["two_forward"]["sec_per_call"] / r["plain"]["sec_per_call"]
            print(f"{model:<8}{batch:>6}{2 * batch:>6}{r['plain']['images_per_s']:>13.1f}"
                  f"{r['two_forward']['images_per_s']:>15.1f}{r['mixed_batch']['images_per_s']:>13.1f}"
                  f"{r['mixed_over_two_time']:>16.2f}{r['two_over_plain_time']:>16.2f}")
        if res["skipped"]:
            print(f"{model:<8} skipped (--max-s {args.max_s:g} spent): batches {res['skipped']}")
        summary[f"{model}_mixed_batch_max_rows"] = mixed_max_rows(res["batches"])
    print("rule: mixed_batch faster than two_forward up to denoiser rows per call = "
          + ", ".join(f"{m}: {summary[f'{m}_mixed_batch_max_rows']}" for m in results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, args, results, summary)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
