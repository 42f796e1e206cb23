"""Benchmark: a Diffusion-DPO step with the reference as the LoRA-disabled UNet vs a frozen copy.

    python benchmarks/train.py                       # table + benchmarks/results/train.json

Approaches, same UNet, batch, pairs, noise and timesteps:
  lora_toggle   the reference is the trained UNet with its adapter disabled (this toolkit)
  frozen_copy   a second, frozen full UNet as the reference (the official Diffusion-DPO code)
Each runs in its own process; peak memory is ru_maxrss above a post-warm-up baseline, so it
counts weights, optimizer state and activations. Time is the median step over repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from common import parse_and_run, peak_rss_mib, write_results

APPROACHES = ("lora_toggle", "frozen_copy")


def _unet(width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=16, cross_attention_dim=64,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def worker(approach: str, args) -> dict:
    import torch

    from deradiff.models import adapters_disabled, add_lora
    from deradiff.training.losses import diffusion_dpo_loss, per_sample_mse

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warm = _unet(16)
    add_lora(warm, rank=4)
    warm(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 4, 64)).sample.sum().backward()
    del warm
    base_rss = peak_rss_mib()
    torch.manual_seed(0)
    unet = _unet(args.width)
    unet.requires_grad_(False)
    reference = copy.deepcopy(unet) if approach == "frozen_copy" else None
    add_lora(unet, rank=args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    x = torch.randn(2 * b, 4, args.latent, args.latent, generator=gen)
    noise = torch.randn(b, 4, args.latent, args.latent, generator=gen).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (b,), generator=gen).repeat(2)
    ehs = torch.randn(2 * b, 8, 64, generator=gen)

    def step():
        pred = unet(x, t, encoder_hidden_states=ehs).sample
        with torch.no_grad():
            if reference is None:
                with adapters_disabled(unet):
                    ref = unet(x, t, encoder_hidden_states=ehs).sample
            else:
                ref = reference(x, t, encoder_hidden_states=ehs).sample
        m_w, m_l = per_sample_mse(pred, noise).chunk(2)
        r_w, r_l = per_sample_mse(ref, noise).chunk(2)
        loss, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=2000)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"approach": approach, "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "sec_per_step": statistics.median(times), "peak_mib": peak_rss_mib() - base_rss, "loss": loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    p.add_argument("--latent", type=int, default=8, help="latent side (8: weights dominate memory)")
    p.add_argument("--width", type=int, default=128, help="UNet base width (128: ~35M params)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/train.json")
    args, results = parse_and_run(p, __file__, APPROACHES, worker, argv)
    if results is None:  # this process was one worker
        return 0
    ours, official = results["lora_toggle"], results["frozen_copy"]
    summary = {"time_ratio": ours["sec_per_step"] / official["sec_per_step"],
               "memory_ratio": ours["peak_mib"] / official["peak_mib"],
               "same_loss": abs(ours["loss"] - official["loss"]) < 1e-5}
    print(f"DPO step, UNet {ours['unet_params_m']:.1f}M params, {args.batch} pairs, latent {args.latent}x{args.latent}, "
          f"LoRA rank {args.rank}, {args.threads} threads")
    print(f"{'reference':<14}{'s/step':>10}{'peak MiB':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['sec_per_step']:>10.4f}{r['peak_mib']:>10.1f}")
    print(f"lora_toggle / frozen_copy: time {summary['time_ratio']:.2f}x (target <= 1.05), "
          f"memory {summary['memory_ratio']:.2f}x (target <= 0.6); same loss: {summary['same_loss']}")
    write_results(args.out, args, results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
