"""`deradiff sample`: images from a realigned pipeline over a lambda grid, with path KL.

    deradiff sample --pipeline toy --lora runs/toy-dpo/lora --lam 0 0.5 1 2 \\
        --prompt "a red circle on a dark background" --seeds 0 1 --out runs/samples

Several rewards: load named LoRAs and give lambda vectors (one lambda per adapter; the key in
samples.jsonl and the image folder is the vector's canonical string, adapters sorted):

    deradiff sample --pipeline toy --lora color=runs/a/lora contrast=runs/b/lora \
        --lam color=1.5,contrast=0.5 color=0,contrast=1 --prompt "a red circle" --out runs/mix

Writes OUT/images/lam=<lam>/p<prompt>_s<seed>.png, OUT/grid.png (rows: prompt x seed,
columns: lambda) and OUT/samples.jsonl (one line per image with its emulated path KL and the
realignment mode that made it). A folder
that already holds samples is refused unless --overwrite (then they are replaced as a whole).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deradiff.errors import UserError
from deradiff.evaluation.baselines import trained_base
from deradiff.evaluation.config import DEFAULT_PIPELINE
from deradiff.evaluation.lams import LAM_POLICY, Lam, lambda_arg
from deradiff.evaluation.options import add_sampler_arguments, check_lora_lams, parse_loras
from deradiff.evaluation.sampling import Sampler, check_prompts, load_sampler, save_png
from deradiff.grids import save_image_grid
from deradiff.io import atomic_dir, write_text_atomic

OUTPUTS = ("samples.jsonl", "grid.png", "images")  # what a sample folder holds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", help="a registered model (e.g. toy, toy-flow), a local diffusers folder, or a hub id "
                   "(default: the base the LoRA was trained on, from its lora_info.json or run recipe; else toy)")
    p.add_argument("--lora", nargs="+", metavar="[NAME=]PATH",
                   help="aligned LoRA: a .safetensors file or a diffusers-format folder; or several named "
                   "LoRAs (color=runs/a/lora contrast=runs/b/lora) mixed by lambda vectors in --lam")
    p.add_argument("--reference-unet", help="two-model mode: folder of a full reference UNet; "
                   "then --pipeline holds the aligned (e.g. official Diffusion-DPO) UNet")
    p.add_argument("--lam", nargs="+", type=lambda_arg, default=[lambda_arg("1.0")],
                   help=f"lambda values or schedules: 2.0, linear:0,2, cosine:0,2, step:1,2@500; with named LoRAs, "
                   f"lambda vectors: color=1.5,contrast=0.5; {LAM_POLICY}")
    p.add_argument("--prompt", nargs="*", default=[], help="prompts, inline")
    p.add_argument("--prompts-file", help="text file, one prompt per line (# comments ignored)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one image per prompt and seed")
    add_sampler_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/samples", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples (grid.png, samples.jsonl, images/) an earlier run left in --out")


def read_prompts(inline: list[str], path: str | None) -> list[str]:
    """The inline prompts, then the file's lines (blank lines and # comments skipped)."""
    prompts = list(inline)
    if path:
        if not Path(path).is_file():
            raise UserError(f"prompts file {path} does not exist")
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise UserError(f"no prompts in {path!r}: every line is blank or a # comment; write one prompt per line")
        prompts += from_file
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT ... or --prompts-file FILE")
    return prompts


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run's samples unless told to."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise UserError(f"{out} already holds samples ({', '.join(found)}): pass --overwrite to replace them, "
                        "or choose another --out")


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without a model is checked first.
    lams: list[Lam] = list(args.lam)  # checked by lambda_arg
    prompts = read_prompts(args.prompt, args.prompts_file)
    loras = parse_loras(args.lora)
    if loras is None and args.reference_unet is None:
        raise UserError("realignment needs --lora (LoRA mode) or --reference-unet (two-model mode)")
    check_lora_lams(loras, lams)
    if isinstance(loras, dict) and args.reference_unet:
        raise UserError("named LoRAs (--lora NAME=PATH) mix adapters of one model: drop --reference-unet")
    if loras:
        from deradiff.models import resolve_lora_file

        for path in loras.values() if isinstance(loras, dict) else [loras]:
            resolve_lora_file(path)
    if args.pipeline is None:
        first = next(iter(loras.values())) if isinstance(loras, dict) else loras
        args.pipeline = trained_base(first, DEFAULT_PIPELINE) if first else DEFAULT_PIPELINE
    check_prompts(args.pipeline, prompts)
    out = Path(args.out)
    check_out(out, args.overwrite)

    sampler = load_sampler(args.pipeline, dtype=args.dtype, device=args.device, scheduler=args.scheduler,
                           lora=loras, reference_unet=args.reference_unet, steps=args.steps,
                           guidance=args.guidance, size=args.size, eta=args.eta, mode=args.mode,
                           noise_level=args.noise_level)
    start = time.perf_counter()
    with atomic_dir(out / "images") as images_dir:  # the images replace earlier ones as a whole
        rows, grid = sample_grid(sampler, lams, prompts, args.seeds, images_dir)
    write_text_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    keys = sorted(grid)
    save_image_grid([grid[k] for k in keys], out / "grid.png",
                    row_labels=[f"p{p} s{s}" for p, s in keys], col_labels=[f"lam={lam}" for lam in lams])
    t = sampler.throughput
    rate = "" if t.overhead is None else f" ({t.images_per_s:.2f} img/s, realignment x{t.overhead:.2f} plain sampling)"
    print(f"{len(rows)} images in {time.perf_counter() - start:.1f}s{rate} -> {out}/grid.png, {out}/samples.jsonl")
    return 0


def sample_grid(sampler: Sampler, lams: list[Lam], prompts: list[str], seeds: list[int], images_dir: Path):
    """One image per lambda x prompt x seed, saved under images_dir/lam=<lam>/; returns the
    samples.jsonl rows and the images by (prompt index, seed), one per lambda in order."""
    rows: list[dict] = []
    grid: dict[tuple[int, int], list] = {}
    bar = tqdm(total=len(lams) * len(prompts) * len(seeds), desc="sampling", unit="img")
    for lam in lams:
        for pi, prompt in enumerate(prompts):
            for seed in seeds:
                images, kls = sampler.sample([prompt], [seed], lam)  # one at a time: a row's pixels do not depend on its batch
                name = Path(f"lam={lam}") / f"p{pi:03d}_s{seed}.png"
                save_png(images[0], images_dir / name)
                grid.setdefault((pi, seed), []).append(images[0])
                rows.append({"lam": lam.name, "prompt": prompt, "seed": seed, "path_kl": kls[0],
                             "image": str("images" / name), "mode": sampler.mode_for(1, lam)})
                bar.set_postfix(lam=lam.name, kl="n/a" if kls[0] is None else f"{kls[0]:.3g}")
                bar.update()
    bar.close()
    return rows, grid
