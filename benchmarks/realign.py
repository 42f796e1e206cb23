"""Benchmark: the cost of realignment against aligned-only sampling and two full denoiser copies.

    python benchmarks/realign.py                      # UNet: table + benchmarks/results/realign.json
    python benchmarks/realign.py --batch 8 --steps 20
    OMP_NUM_THREADS=1 python benchmarks/realign.py --family flow --threads 1
                                                      # SD3 MM-DiT: benchmarks/results/realign_flow.json

Families (only how the pipeline is built differs; both are sized so the denoiser's weights
dominate memory):
  unet   StableDiffusionPipeline, UNet2DConditionModel (--width 128: 35M params), DDIM, random
         rank-8 LoRA on attention and proj_in/out
  flow   StableDiffusion3Pipeline, SD3Transformer2DModel of 6 joint blocks (--width 384 = 6 heads
         of 64: 31M params), FlowMatchEulerDiscreteScheduler, random rank-8 LoRA on every
         attention projection (image and text streams); --size 32 px = 16x16 latents = 64 tokens
Approaches, same pipeline, prompts, seeds and scheduler, output_type="latent" so the denoiser
dominates:
  aligned_only   one denoiser with the LoRA, one forward per step (plain sampling, no realignment)
  two_forward    RealignedDenoiser, LoRA mode, reference by disabling the adapter
  mixed_batch    RealignedDenoiser, LoRA mode, one forward on the doubled batch (stacked weights,
                 deradiff.routing's CPU default)
  mixed_sliced   the same, sliced route (no weight copies; the default on accelerators)
  two_copies     the official approach: a second full denoiser (LoRA merged), two forwards
Each approach runs in its own process so peak memory (ru_maxrss above the post-import
baseline: weights + activations) is not polluted by the others. Times are medians over
repeats; ratios are taken within this one run (runs on a shared machine differ in speed: the
JSON records the load average before and after).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import parse_and_run, peak_rss_mib, write_results

APPROACHES = ("aligned_only", "two_forward", "mixed_batch", "mixed_sliced", "two_copies")
FLOW_LAYERS = 6  # joint (MM-DiT) blocks of the flow family's transformer
FLOW_HEAD_DIM = 64  # SD3's head width; --width sets the number of heads


def _with_tests_on_path() -> None:
    """The tiny-pipeline builders live with the tests (tests/conftest.py, tests/tiny_flow.py)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def build_unet(width: int, seed: int = 0):
    """A tiny SD pipeline with a UNet of base width `width` (128: 35M params) and a random rank-8 LoRA."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _with_tests_on_path()
    from conftest import _byte_level_tokenizer, _text_encoder, _vae, add_random_lora

    torch.manual_seed(seed)
    w = width
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w, 2 * w, 2 * w), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is read into memory
        tokenizer = _byte_level_tokenizer(Path(tmp))
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(), tokenizer=tokenizer,
        unet=unet, scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    add_random_lora(pipe.unet, rank=8, strength=0.05)
    return pipe


def build_flow(width: int):
    """The tiny SD3 pipeline of tests/tiny_flow.py with a FLOW_LAYERS-block MM-DiT of `width`
    channels (width / 64 heads; 384: 31M params) and a random rank-8 LoRA on its attention."""
    _with_tests_on_path()
    from tiny_flow import add_random_transformer_lora, build_tiny_sd3

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizers are read into memory
        pipe = build_tiny_sd3(Path(tmp), num_layers=FLOW_LAYERS, num_attention_heads=width // FLOW_HEAD_DIM,
                              attention_head_dim=FLOW_HEAD_DIM)
    add_random_transformer_lora(pipe.transformer, rank=8, strength=0.05)
    return pipe


def _flow_call_kwargs() -> dict:
    _with_tests_on_path()
    from tiny_flow import MAX_SEQUENCE_LENGTH

    return {"max_sequence_length": MAX_SEQUENCE_LENGTH}


@dataclass(frozen=True)
class Family:
    """What differs per family: the pipeline builder and its defaults; the measurement is shared."""

    build: Callable  # width -> pipeline whose denoiser carries a random LoRA
    width: int  # default --width
    width_multiple: int  # --width must be a multiple (UNet: norm groups; flow: heads of 64)
    warm_width: int  # throwaway pipeline that pays imports and kernel initialization
    size: int  # default --size, px
    out: str  # default --out
    sampler: str  # for the printed header
    shape_keys: tuple[str, ...]  # denoiser config entries recorded as its shape
    call_kwargs: Callable[[], dict] = dict  # extra pipeline-call arguments


FAMILIES = {
    "unet": Family(build_unet, width=128, width_multiple=16, warm_width=16, size=16, out="benchmarks/results/realign.json",
                   sampler="DDIM", shape_keys=("block_out_channels", "layers_per_block", "cross_attention_dim")),
    "flow": Family(build_flow, width=384, width_multiple=FLOW_HEAD_DIM, warm_width=FLOW_HEAD_DIM, size=32,
                   out="benchmarks/results/realign_flow.json", sampler="FlowMatchEuler",
                   shape_keys=("num_layers", "num_attention_heads", "attention_head_dim", "patch_size",
                               "joint_attention_dim", "caption_projection_dim"),
                   call_kwargs=_flow_call_kwargs),
}


def _count_m(modules) -> float:
    """Parameters of `modules`, millions, LoRA weights left out."""
    return sum(p.numel() for m in modules for n, p in m.named_parameters() if "lora_" not in n) / 1e6


def describe(pipe, family: Family, out) -> dict:
    """Shapes and parameter counts of the pipeline as built (before any LoRA merge)."""
    from deradiff.models import denoiser_name

    attr = denoiser_name(pipe)
    model = getattr(pipe, attr)
    others = [m for name, m in pipe.components.items() if name != attr and hasattr(m, "named_parameters")]
    return {
        "denoiser": type(model).__name__,
        "denoiser_config": {k: model.config[k] for k in family.shape_keys},
        "latent_shape": list(out.shape),
        "denoiser_params_m": _count_m([model]),
        "lora_params_m": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) / 1e6,
        "other_components_params_m": _count_m(others),
    }


def two_copies(pipe):
    """Turn `pipe` into the official setup: its denoiser is a copy with the LoRA merged into the
    weights; returns the other, base copy (LoRA removed) as the reference."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    from deradiff.models import denoiser_name

    attr = denoiser_name(pipe)
    reference = getattr(pipe, attr)
    aligned = copy.deepcopy(reference)
    aligned.fuse_lora()
    aligned.unload_lora()
    reference.unload_lora()
    setattr(pipe, attr, aligned)
    assert not any(isinstance(m, BaseTunerLayer) for m in (*aligned.modules(), *reference.modules()))
    return reference


def worker(approach: str, args) -> dict:
    import torch

    from deradiff.models import denoiser_name
    from deradiff.realign import realigned

    family = FAMILIES[args.family]
    torch.set_num_threads(args.threads)
    kw = dict(guidance_scale=1.0, height=args.size, width=args.size, output_type="latent", **family.call_kwargs())
    # Pay imports and kernel initialization on a throwaway small pipeline first, so the
    # baseline leaves out everything but this approach's weights and activations.
    warm = family.build(family.warm_width)
    with torch.no_grad():
        warm(["x"], num_inference_steps=2, **kw)
    del warm
    base_rss = peak_rss_mib()
    pipe = family.build(args.width)
    setup = None
    reference = two_copies(pipe) if approach == "two_copies" else None
    n_params = sum(p.numel() for p in getattr(pipe, denoiser_name(pipe)).parameters())
    prompts = ["a red circle on a dark background"] * args.batch

    def sample():
        gen = torch.Generator().manual_seed(0)
        if approach == "aligned_only":
            return pipe(prompts, num_inference_steps=args.steps, generator=gen, **kw).images
        mode = "mixed_batch" if approach.startswith("mixed") else "two_forward"
        with realigned(pipe, lam=0.5, reference=reference, mode=mode, record=False,
                       stack_weights=approach == "mixed_batch"):
            return pipe(prompts, num_inference_steps=args.steps, generator=gen, **kw).images

    with torch.no_grad():
        out = sample()  # warm-up
        if approach == "aligned_only":
            setup = describe(pipe, family, out)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = sample()
            times.append(time.perf_counter() - start)
    return {
        "approach": approach,
        f"{denoiser_name(pipe)}_params_m": n_params / 1e6,
        "sec_per_image": statistics.median(times) / args.batch,
        "sec_per_step": statistics.median(times) / args.steps,
        "peak_mib": peak_rss_mib() - base_rss,
        "checksum": float(out.double().abs().mean()),
        "setup": setup,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratios(results: dict[str, dict]) -> dict:
    """Add each approach's time/memory ratios to aligned_only and two_copies; return the summary."""
    official, plain = results["two_copies"], results["aligned_only"]
    for r in results.values():
        r["time_ratio_vs_two_copies"] = r["sec_per_image"] / official["sec_per_image"]
        r["mem_ratio_vs_two_copies"] = r["peak_mib"] / official["peak_mib"]
        r["time_ratio_vs_aligned_only"] = r["sec_per_image"] / plain["sec_per_image"]
        r["mem_ratio_vs_aligned_only"] = r["peak_mib"] / plain["peak_mib"]
    realigned_sums = [results[a]["checksum"] for a in ("two_forward", "mixed_batch", "mixed_sliced", "two_copies")]
    return {
        "two_forward_time_vs_two_plain_evals": results["two_forward"]["time_ratio_vs_two_copies"],
        "two_forward_mem_vs_two_copies": results["two_forward"]["mem_ratio_vs_two_copies"],
        "mixed_batch_time_vs_two_forward": results["mixed_batch"]["sec_per_image"] / results["two_forward"]["sec_per_image"],
        "two_forward_time_vs_aligned_only": results["two_forward"]["time_ratio_vs_aligned_only"],
        "mixed_batch_time_vs_aligned_only": results["mixed_batch"]["time_ratio_vs_aligned_only"],
        "two_forward_mem_vs_aligned_only": results["two_forward"]["mem_ratio_vs_aligned_only"],
        "mixed_batch_mem_vs_aligned_only": results["mixed_batch"]["mem_ratio_vs_aligned_only"],
        "mixed_sliced_time_vs_two_forward": (results["mixed_sliced"]["sec_per_image"]
                                             / results["two_forward"]["sec_per_image"]),
        "mixed_sliced_mem_vs_aligned_only": results["mixed_sliced"]["mem_ratio_vs_aligned_only"],
        # The four realigned approaches sample the same lam=0.5 path: their outputs must agree.
        "realigned_checksum_rel_spread": (max(realigned_sums) - min(realigned_sums)) / max(map(abs, realigned_sums)),
    }


def report(args, results: dict[str, dict], setup: dict, summary: dict) -> None:
    """The table and the headline ratios on stdout."""
    family = FAMILIES[args.family]
    lat = setup["latent_shape"]
    print(f"{setup['denoiser']} {setup['denoiser_params_m']:.1f}M params (+{setup['lora_params_m']:.2f}M LoRA, "
          f"other components {setup['other_components_params_m']:.2f}M), batch {args.batch}, {args.steps} "
          f"{family.sampler} steps, {args.threads} threads, {args.size}x{args.size} px (latents {lat[1:]})")
    print(f"{'approach':<14}{'s/image':>9}{'s/step':>8}{'peak MiB':>9}{'time/aligned':>13}{'mem/aligned':>12}"
          f"{'time/2copies':>13}{'mem/2copies':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['sec_per_image']:>9.4f}{r['sec_per_step']:>8.4f}{r['peak_mib']:>9.1f}"
              f"{r['time_ratio_vs_aligned_only']:>13.2f}{r['mem_ratio_vs_aligned_only']:>12.2f}"
              f"{r['time_ratio_vs_two_copies']:>13.2f}{r['mem_ratio_vs_two_copies']:>12.2f}")
    print("targets: two_forward time <= 1.1x two plain evaluations per step "
          f"(got {summary['two_forward_time_vs_two_plain_evals']:.2f}x); peak memory <= 0.55x two copies "
          f"(got {summary['two_forward_mem_vs_two_copies']:.2f}x); mixed_batch / two_forward time "
          f"= {summary['mixed_batch_time_vs_two_forward']:.2f}; realigned outputs agree to "
          f"{summary['realigned_checksum_rel_spread']:.1e} (relative)")


def _multiple_of(k: int) -> Callable[[str], int]:
    """argparse type: a positive multiple of k."""
    def parse(text: str) -> int:
        value = int(text)
        if value <= 0 or value % k:
            raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of {k}")
        return value
    return parse


def _family_of(argv) -> Family:
    """--family, read ahead of the full parse because it sets the other options' defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", choices=sorted(FAMILIES), default="unet")
    return FAMILIES[pre.parse_known_args(argv)[0].family]


def main(argv=None) -> int:
    family = _family_of(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="unet", help="denoiser family (see above)")
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per approach (median)")
    p.add_argument("--width", type=_multiple_of(family.width_multiple), default=family.width,
                   help="unet: base channel width (64: 8.7M params, 128: 35M); flow: transformer width, "
                        "a multiple of 64 (64: 0.9M, 384: 31M)")
    p.add_argument("--size", type=int, default=family.size,
                   help="image side in px (latent side = size / 2; flow: a multiple of 4, at most 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=family.out)
    load_before = os.getloadavg()
    args, results = parse_and_run(p, __file__, APPROACHES, worker, argv)
    if results is None:  # this process was one worker
        return 0
    setup = results["aligned_only"]["setup"]
    for r in results.values():
        del r["setup"]
    setup["device"] = {"kind": "cpu", "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    summary = ratios(results)
    report(args, results, setup, summary)
    write_results(args.out, args, results, summary, setup=setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
