"""`deradiff sample`: images from a realigned pipeline over a lambda grid, with path KL.

    deradiff sample --pipeline toy --lora runs/toy-dpo/lora --lam 0 0.5 1 2 \\
        --prompt "a red circle on a dark background" --seeds 0 1 --out runs/samples

Writes OUT/images/lam=<lam>/p<prompt>_s<seed>.png, OUT/grid.png (rows: prompt x seed,
columns: lambda) and OUT/samples.jsonl (one line per image with its emulated path KL).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.grids import save_image_grid
from deradiff.models import SCHEDULERS, load_lora, load_pipeline, set_scheduler
from deradiff.realign import MODES, LambdaSchedule, parse_lambda


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", default="toy", help="'toy', a local diffusers folder, or a hub id")
    p.add_argument("--lora", help="aligned LoRA: a .safetensors file or a diffusers-format folder")
    p.add_argument("--reference-unet", help="two-model mode: folder of a full reference UNet; "
                   "then --pipeline holds the aligned (e.g. official Diffusion-DPO) UNet")
    p.add_argument("--lam", nargs="+", default=["1.0"],
                   help="lambda values or schedules: 2.0, linear:0,2, cosine:0,2, step:1,2@500")
    p.add_argument("--prompt", nargs="*", default=[], help="prompts, inline")
    p.add_argument("--prompts-file", help="text file, one prompt per line (# comments ignored)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one image per prompt and seed")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="replace the pipeline's scheduler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (>0 makes DDIM stochastic: path KL defined)")
    p.add_argument("--mode", choices=MODES, default="two_forward", help="two forwards or one mixed batch")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--out", default="runs/samples", help="output folder")


def read_prompts(inline: list[str], path: str | None) -> list[str]:
    prompts = list(inline)
    if path:
        if not Path(path).is_file():
            raise UserError(f"prompts file {path} does not exist")
        lines = Path(path).read_text().splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT ... or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without a model is checked first.
    schedules: list[LambdaSchedule] = [parse_lambda(v) for v in args.lam]
    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.lora is None and args.reference_unet is None:
        raise UserError("realignment needs --lora (LoRA mode) or --reference-unet (two-model mode)")
    if args.lora:
        from deradiff.models import resolve_lora_file

        resolve_lora_file(args.lora)
    if args.pipeline == "toy":
        from deradiff.toy.pipeline import check_prompt

        for prompt in prompts:
            check_prompt(prompt)

    pipe = load_pipeline(args.pipeline, dtype=getattr(torch, args.dtype), device=args.device)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    reference = None
    if args.reference_unet:
        from diffusers import UNet2DConditionModel

        reference = UNet2DConditionModel.from_pretrained(args.reference_unet, use_safetensors=True)
        reference.to(args.device, getattr(torch, args.dtype))
    if args.lora:
        load_lora(pipe, args.lora)
    call = pipeline_call_kwargs(args)
    out = Path(args.out)
    rows: list[dict] = []
    grid: dict[tuple[int, int], list] = {}
    bar = tqdm(total=len(schedules) * len(prompts) * len(args.seeds), desc="sampling", unit="img")
    start = time.perf_counter()
    for schedule in schedules:
        for pi, prompt in enumerate(prompts):
            for seed in args.seeds:
                image, kl = sample_one(pipe, prompt, seed, schedule, reference, args.mode, call, args.eta)
                path = out / "images" / f"lam={schedule}" / f"p{pi:03d}_s{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                grid.setdefault((pi, seed), []).append(image)
                rows.append({"lam": str(schedule), "prompt": prompt, "seed": seed, "path_kl": kl,
                             "image": str(path.relative_to(out))})
                bar.set_postfix(lam=str(schedule), kl="n/a" if kl is None else f"{kl:.3g}")
                bar.update()
    bar.close()
    write_jsonl(out / "samples.jsonl", rows)
    keys = sorted(grid)
    save_image_grid([grid[k] for k in keys], out / "grid.png",
                    row_labels=[f"p{p} s{s}" for p, s in keys], col_labels=[f"lam={s}" for s in schedules])
    print(f"{len(rows)} images in {time.perf_counter() - start:.1f}s -> {out}/grid.png, {out}/samples.jsonl")
    return 0


def pipeline_call_kwargs(args) -> dict:
    kwargs: dict = {}
    if args.pipeline == "toy":
        from deradiff.toy.pipeline import toy_sampling_kwargs

        kwargs.update(toy_sampling_kwargs())
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.size is not None:
        kwargs["height"] = kwargs["width"] = args.size
    if args.eta:
        kwargs["eta"] = args.eta
    kwargs["output_type"] = "pil"
    return kwargs


def sample_one(pipe, prompt, seed, schedule, reference, mode, call, eta):
    """One realigned image and its emulated path KL (None for deterministic samplers)."""
    from deradiff.evaluation.evaluate import sample_batch

    images, kls = sample_batch(pipe, [prompt], [seed], schedule, call, eta, reference=reference, mode=mode)
    return images[0], kls[0]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
