"""GPU benchmark at real model sizes (random weights, nothing downloaded): realigned sampling and
one Diffusion-DPO LoRA step, time and peak memory, one JSON.

    python benchmarks/gpu.py                          # on a GPU: SD1.5, SDXL, SD3.5-medium shapes, bf16
    python benchmarks/gpu.py --dtype fp16 --steps 20
    python benchmarks/gpu.py --tiny --device cpu      # the CPU-sized variant (what CI runs)

What it measures (each row in benchmarks/results/gpu.json and in the printed table):
- sampling: the denoising loop of each family at native resolution (SD1.5 64x64 latents, SDXL
  128x128, SD3.5-medium 128x128 x 16 channels) with a random rank-16 LoRA on the attention
  projections, at batch 1 and 4 (rows per denoiser call: with classifier-free guidance a
  pipeline doubles them), for five approaches: `aligned_only` (one forward per step, no
  realignment), `two_forward` (RealignedDenoiser, LoRA toggled), `mixed_batch` (one forward on
  the doubled batch, the device's default route: sliced, no weight copies, on GPUs),
  `mixed_stacked` (the same with stacked merged weights, the CPU default: does stacking pay on
  a GPU?) and `two_models` (a second full denoiser with the LoRA merged: the official
  approach). Text encoding and VAE decoding are left out: they are the same for every
  approach. The final latents of `two_forward` and `two_models` must agree (same lambda, same
  noise): the script checks it and records the difference.
- dpo_step: one Diffusion-DPO step (the trainer's deradiff.training.dpo: reference forward with
  the LoRA disabled, forward of the LoRA model on 2 pairs, backward, AdamW) on the SD1.5-shaped
  UNet at 512 px, with and without gradient checkpointing, with and without the VAE and text
  encoder (`cached`: latents and text embeddings precomputed, the encoders not in memory;
  `uncached`: 512 px images are VAE-encoded and captions CLIP-encoded inside the step), and
  cached with model.split_backward (each image's forward and backward on its own).
Time: median of `--repeats` after a warm-up, CUDA-synchronized. Peak memory: the CUDA allocator's
peak during the measured work (weights included); on CPU it is not measured (null).
The whole default run takes a few minutes on one H100/H200-class GPU (budget: under 8).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deradiff.models import add_lora  # noqa: E402
from deradiff.realign import RealignedDenoiser  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MMDIT_TARGETS = [*UNET_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
APPROACHES = ("aligned_only", "two_forward", "mixed_batch", "mixed_stacked", "two_models")
# RealignedDenoiser stack_weights per mixed approach: mixed_batch is the device's default route
# (sliced on GPUs, stacked on CPU), mixed_stacked forces the stacked weights (deradiff.routing)
STACK_WEIGHTS = {"mixed_batch": None, "mixed_stacked": True}


# -- model shapes --------------------------------------------------------------------------------


def sd15_unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # stable-diffusion-v1-5 unet/config.json: the defaults with cross_attention_dim 768
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    common = dict(addition_embed_type="text_time", addition_time_embed_dim=8 if tiny else 256,
                  use_linear_projection=True)
    if tiny:
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=16,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            **common)
    # stable-diffusion-xl-base-1.0 unet/config.json
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), **common)


def sd3_transformer(tiny: bool):
    from diffusers import SD3Transformer2DModel

    if tiny:
        return SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
    # stable-diffusion-3.5-medium transformer/config.json
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))


def conditioning(family: str, model, batch: int, device, dtype) -> dict:
    """Random conditioning of the right shapes for one denoiser call on `batch` rows."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if family == "sd3":
        tokens = 16 if cfg.joint_attention_dim < 256 else 77 + 256  # CLIP-L/G + T5 tokens
        return {"encoder_hidden_states": randn(batch, tokens, cfg.joint_attention_dim),
                "pooled_projections": randn(batch, cfg.pooled_projection_dim)}
    cond = {"encoder_hidden_states": randn(batch, 77, cfg.cross_attention_dim)}
    if family == "sdxl":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim),
                                     "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * batch, device=device, dtype=dtype)}
    return cond


FAMILIES = {"sd15": (sd15_unet, UNET_TARGETS), "sdxl": (sdxl_unet, UNET_TARGETS), "sd3": (sd3_transformer, MMDIT_TARGETS)}


def build(family: str, tiny: bool, device, dtype, lora_rank: int = 16):
    """The denoiser with a random LoRA (nonzero B, so the adapted model differs from the base)."""
    make, targets = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = make(tiny)
    model = model.to(dtype).eval().requires_grad_(False)
    add_lora(model, rank=lora_rank, target_modules=targets)
    g = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    return model


def scheduler_for(family: str):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


# -- measurement ---------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def timed(fn, repeats: int, device) -> tuple[float, object]:
    """(median seconds, last result) of fn() over `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def denoise(model, family: str, batch: int, steps: int, device, dtype, cond: dict) -> torch.Tensor:
    """A plain denoising loop: the scheduler steps the model output from fixed initial noise."""
    sched = scheduler_for(family)
    sched.set_timesteps(steps, device=device)
    cfg = model.config
    side = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # flow schedulers start at unit noise
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.expand(batch).to(device)
            out = model(x, tt, **cond).sample if family != "sd3" else model(hidden_states=x, timestep=tt, **cond).sample
            x = sched.step(out, t, x).prev_sample
    return x


def sampling_rows(args, device, dtype) -> list[dict]:
    rows = []
    for family in args.families:
        aligned = build(family, args.tiny, device, dtype)
        n_params = sum(p.numel() for n, p in aligned.named_parameters() if "lora_" not in n)
        for batch in args.batches:
            cond = conditioning(family, aligned, batch, device, dtype)
            finals = {}
            for approach in APPROACHES:
                reference = None
                if approach == "two_models":  # the official approach: two full weight copies
                    reference = copy.deepcopy(aligned)
                    reference.unload_lora()
                    merged = copy.deepcopy(aligned)
                    merged.fuse_lora()
                    merged.unload_lora()
                _reset_peak(device)
                if approach == "aligned_only":
                    model = aligned
                elif approach == "two_models":
                    model = RealignedDenoiser(merged, lam=args.lam, reference=reference, record=False)
                else:
                    mode = "two_forward" if approach == "two_forward" else "mixed_batch"
                    model = RealignedDenoiser(aligned, lam=args.lam, mode=mode, record=False,
                                              stack_weights=STACK_WEIGHTS.get(approach))
                seconds, final = timed(lambda m=model, f=family, c=cond, b=batch:
                                       denoise(m, f, b, args.steps, device, dtype, c), args.repeats, device)
                finals[approach] = final.float().cpu()
                rows.append({"bench": "sampling", "family": family, "approach": approach, "batch": batch,
                             "params_m": n_params / 1e6, "sec_per_step": seconds / args.steps,
                             "images_per_s": batch / seconds, "peak_gib": _peak_gib(device)})
                print(_fmt(rows[-1]), flush=True)
                if approach == "two_models":
                    del model, merged, reference
            # Same lambda, same noise: the LoRA-toggle and two-model realignments must agree.
            diff = (finals["two_forward"] - finals["two_models"]).abs().max().item()
            scale = finals["two_models"].abs().max().item()
            for row in rows[-len(APPROACHES):]:
                row["two_forward_vs_two_models_max_abs"] = diff
                row["final_latent_max_abs"] = scale
        del aligned
        _reset_peak(device)
    return rows


DPO_VARIANTS = [  # (gradient_checkpointing, cached, split_backward)
    (False, False, False), (False, True, False), (True, False, False), (True, True, False),
    (False, True, True), (True, True, True),
]


def dpo_rows(args, device, dtype) -> list[dict]:
    rows = []
    for checkpointing, cached, split in DPO_VARIANTS:
        _reset_peak(device)
        step = make_dpo_step(args, device, dtype, checkpointing, cached, split)
        seconds, loss = timed(step, args.repeats, device)
        rows.append({"bench": "dpo_step", "family": "sd15", "gradient_checkpointing": checkpointing,
                     "cached": cached, "split_backward": split, "pairs": args.dpo_pairs, "sec_per_step": seconds,
                     "peak_gib": _peak_gib(device), "loss": float(loss)})
        print(_fmt(rows[-1]), flush=True)
        del step
    return rows


def make_dpo_step(args, device, dtype, checkpointing: bool, cached: bool, split: bool = False):
    """A closure running one Diffusion-DPO LoRA step (deradiff.training.dpo, as the trainer runs it)
    on the SD1.5-shaped UNet (fp32 weights, autocast in `dtype`); uncached steps VAE-encode 512 px
    images and CLIP-encode captions; `split`: model.split_backward."""
    from torch.nn import functional as F

    from deradiff.training.conditioning import Conditioning
    from deradiff.training.dpo import dpo_errors_from_latents
    from deradiff.training.losses import diffusion_dpo_loss

    unet = build("sd15", args.tiny, device, dtype=torch.float32, lora_rank=8).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    pairs, side = args.dpo_pairs, unet.config.sample_size
    vae, text = (None, None) if cached else _encoders(args.tiny, device)
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2 * pairs, 3, side * 8, side * 8, generator=g).to(device) * 2 - 1
    latents0 = torch.randn(2 * pairs, 4, side, side, generator=g).to(device)
    emb0 = torch.randn(pairs, 77, unet.config.cross_attention_dim, generator=g).to(device)
    ids = torch.randint(0, 1000, (pairs, 77), generator=g).to(device)
    sched = scheduler_for("sd15")
    autocast = dict(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    epochs = itertools.count()  # each step draws its own keyed timesteps and noise

    def step():
        with torch.autocast(**autocast):
            if cached:
                latents, emb = latents0, emb0
            else:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * 0.18215
                    emb = text(ids % text.config.vocab_size)[0]
                    emb = F.pad(emb, (0, unet.config.cross_attention_dim - emb.shape[-1]))
            errors = dpo_errors_from_latents(unet, unet, sched, latents, Conditioning(emb), list(range(pairs)),
                                             seed=0, epoch=next(epochs), split_backward=split)
            loss, _ = diffusion_dpo_loss(*errors, beta=2000)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _encoders(tiny: bool, device):
    """A random SD-shaped VAE and CLIP-L text encoder (the parts a latent cache makes unnecessary)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        if tiny:
            vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
            text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, vocab_size=1000, bos_token_id=0, eos_token_id=2))
        else:  # stable-diffusion-v1-5 vae/ and text_encoder/ configs
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
            text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, vocab_size=49408))
    return vae.eval().requires_grad_(False), text.eval().requires_grad_(False)


def _fmt(row: dict) -> str:
    peak = f"{row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else "-"
    if row["bench"] == "sampling":
        return (f"sampling {row['family']:<5} {row['approach']:<13} batch {row['batch']}: "
                f"{row['sec_per_step'] * 1e3:8.1f} ms/step  {row['images_per_s']:7.2f} img/s  peak {peak}")
    return (f"dpo_step sd15 checkpointing={row['gradient_checkpointing']!s:<5} cached={row['cached']!s:<5} "
            f"split={row['split_backward']!s:<5}: "
            f"{row['sec_per_step'] * 1e3:8.1f} ms/step  peak {peak}")


def summarize(rows: list[dict]) -> dict:
    """Ratios within this run: realignment vs two full models and vs plain sampling; DPO knobs."""
    out = {}
    sampling = {(r["family"], r["batch"], r["approach"]): r for r in rows if r["bench"] == "sampling"}
    for (family, batch, approach), r in sampling.items():
        two = sampling[(family, batch, "two_models")]
        plain = sampling[(family, batch, "aligned_only")]
        key = f"{family}/b{batch}/{approach}"
        out[f"{key}/time_vs_two_models"] = r["sec_per_step"] / two["sec_per_step"]
        out[f"{key}/time_vs_aligned_only"] = r["sec_per_step"] / plain["sec_per_step"]
        if r["peak_gib"] is not None:
            out[f"{key}/mem_vs_two_models"] = r["peak_gib"] / two["peak_gib"]
    dpo = {(r["gradient_checkpointing"], r["cached"], r["split_backward"]): r for r in rows if r["bench"] == "dpo_step"}
    if (False, False, False) in dpo:
        base = dpo[(False, False, False)]
        for (ckpt, cached, split), r in dpo.items():
            key = f"dpo/ckpt={ckpt}/cached={cached}/split={split}"
            out[f"{key}/time_vs_uncached"] = r["sec_per_step"] / base["sec_per_step"]
            if r["peak_gib"] is not None:
                out[f"{key}/mem_vs_uncached"] = r["peak_gib"] / base["peak_gib"]
    return out


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="weights and activations for sampling; autocast dtype for the DPO step (LoRA in fp32)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the same code)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="rows per denoiser call")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per sampling measurement")
    p.add_argument("--lam", type=float, default=2.0, help="realignment lambda")
    p.add_argument("--dpo-pairs", type=int, default=2, help="preference pairs per DPO step")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) after one warm-up")
    p.add_argument("--skip-dpo", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    args = p.parse_args(argv)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        print("note: low-precision sampling on CPU is slow; use --dtype fp32 there", file=sys.stderr)
    start = time.perf_counter()
    print(f"device: {device_name(device)}; dtype {args.dtype}; {'tiny' if args.tiny else 'full-size'} shapes")
    rows = sampling_rows(args, device, dtype)
    if not args.skip_dpo:
        rows += dpo_rows(args, device, dtype)
    result = {"device": device_name(device), "torch": torch.__version__, "config": vars(args), "rows": rows,
              "summary": summarize(rows), "wall_s": time.perf_counter() - start}
    from deradiff.io import write_json_atomic

    write_json_atomic(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
