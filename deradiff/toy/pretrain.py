"""`deradiff toy pretrain`: rebuild the shipped toy weights from scratch, deterministically.

Stages (one thread by default, so the result depends only on the seed and the library versions):
1. the shape/color/background classifier, on fresh procedural images;
2. the AutoencoderKL, to reconstruct images the classifier still reads correctly; its
   `scaling_factor` is set to 1 / std of the latents;
3. the UNet and the CLIP text encoder jointly, on a fixed pool of encoded images whose
   captions cycle through all 48 domain captions (10% replaced by "" for classifier-free
   guidance), epsilon loss with min-SNR weighting, EMA weights;
4. the quality bar on 512 generated images (test prompts cycled, default sampler).

The asset root it writes (default: the package's `deradiff/toy/assets/`) holds `pipeline/`,
`classifier/`, `quality.json` and the SHA-256 `manifest.json`; it is replaced only at the end.

    deradiff toy pretrain                       # about 30 min on 2 CPU cores
    deradiff toy pretrain --out /tmp/toy --unet-steps 50 --vae-steps 50 --eval-images 16   # smoke
    deradiff toy pretrain --family flow         # the SD3-style twin (deradiff.toy.flow_pretrain)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from deradiff.errors import UserError
from deradiff.io import atomic_dir, write_text_atomic
from deradiff.toy.domain import ShapesDataset, all_captions


@dataclass
class PretrainConfig:
    """Every knob of the pretraining run; the defaults produce the shipped weights."""

    seed: int = 0
    threads: int = 1
    classifier_steps: int = 500
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    pool_size: int = 12288  # encoded training images (each caption 256 times)
    unet_steps: int = 2200
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    eval_images: int = 512

    def validate(self) -> None:
        errors = [f"{k} must be positive" for k, v in asdict(self).items()
                  if k not in ("seed", "caption_dropout") and v <= 0]
        if not 0 <= self.caption_dropout < 1:
            errors.append("caption_dropout must be in [0, 1)")
        if errors:
            raise UserError("bad pretraining settings: " + "; ".join(errors))


def _cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _images(dataset: ShapesDataset, start: int, n: int) -> torch.Tensor:
    return torch.stack([dataset[i]["pixel_values"] for i in range(start, start + n)])


# -- stage 2: the autoencoder --------------------------------------------------------------------


def train_vae(cfg: PretrainConfig, progress: bool = True):
    """AutoencoderKL trained on fresh procedural images: MSE + a small KL term."""
    from deradiff.toy.pipeline import build_vae

    torch.manual_seed(cfg.seed + 2)
    vae = build_vae().train()
    data = ShapesDataset(cfg.vae_steps * cfg.vae_batch, seed=cfg.seed + 2000)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _cosine(opt, cfg.vae_steps, warmup=min(100, cfg.vae_steps // 10 + 1))
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        x = _images(data, step * cfg.vae_batch, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = nn.functional.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def evaluate_vae(vae, classifier, n: int = 512, seed: int = 54321) -> dict[str, float]:
    """Classifier accuracy on reconstructions of `n` fresh images, and their MSE in [-1, 1] units."""
    from deradiff.toy.quality import labels_of

    data = ShapesDataset(n, seed=seed)
    x = _images(data, 0, n)
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(128)]).clamp(-1, 1)
    pred = classifier.predict(recon)
    truth = labels_of([data[i]["caption"] for i in range(n)])
    acc = {f"recon_{k}": (pred[k] == truth[k]).float().mean().item() for k in truth}
    return {**acc, "recon_mse": nn.functional.mse_loss(recon, x).item()}


@torch.no_grad()
def encode_pool(vae, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool_size, 4, 16, 16) unscaled latent means and (pool_size,) caption indices into
    all_captions(); captions cycle so every caption is equally frequent."""
    captions = all_captions()
    data = ShapesDataset(cfg.pool_size, seed=cfg.seed + 4000, captions=captions)
    latents = []
    for start in range(0, cfg.pool_size, 256):
        n = min(256, cfg.pool_size - start)
        latents.append(vae.encode(_images(data, start, n)).latent_dist.mode())
    caption_ids = torch.arange(cfg.pool_size) % len(captions)
    return torch.cat(latents), caption_ids


# -- stage 3: the denoiser and the text encoder ----------------------------------------------------


def _snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample: min-SNR weighting for epsilon prediction."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def caption_tokens(tokenizer) -> torch.Tensor:
    """(49, MAX_LENGTH) token ids of all_captions() and, as the last row, the empty prompt."""
    texts = [*all_captions(), ""]
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def fit_denoiser(params: list[nn.Parameter], latents: torch.Tensor, caption_ids: torch.Tensor, loss_of,
                 steps: int, batch: int, lr: float, cfg: PretrainConfig, gen: torch.Generator,
                 desc: str, progress: bool = True) -> None:
    """The denoiser training loop shared by the UNet and the flow transformer: AdamW with warmup
    + cosine, shuffled epochs over the latent pool, caption dropout to the empty prompt (the
    last text row, for classifier-free guidance), gradient clipping, EMA weights copied into
    `params` at the end.

    loss_of(x0, rows, gen) -> scalar loss: x0 (B, 4, 16, 16) latents, rows (B,) indices into
    [*all_captions(), ""]; it draws its noise from `gen` after the dropout draw.
    """
    from diffusers.training_utils import EMAModel

    uncond_row = len(all_captions())
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = _cosine(opt, steps, warmup=min(200, steps // 10 + 1))
    n = latents.shape[0]
    order = torch.randperm(n, generator=gen)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        start = (step * batch) % n
        if start + batch > n:  # new epoch: reshuffle
            order, start = torch.randperm(n, generator=gen), 0
        idx = order[start : start + batch]
        rows = caption_ids[idx].clone()
        rows[torch.rand(len(idx), generator=gen) < cfg.caption_dropout] = uncond_row
        loss = loss_of(latents[idx], rows, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)


def train_denoiser(latents: torch.Tensor, caption_ids: torch.Tensor, cfg: PretrainConfig, progress: bool = True):
    """Train UNet + text encoder on `latents` (already scaled to unit std): epsilon loss with
    min-SNR weighting. Returns both with their EMA weights copied in, in eval mode."""
    from diffusers import DDPMScheduler

    from deradiff.toy.pipeline import SCHEDULER_CONFIG, build_text_encoder, build_unet
    from deradiff.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(cfg.seed + 5)
    unet, text_encoder = build_unet().train(), build_text_encoder().train()
    tokens = caption_tokens(build_toy_tokenizer())
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})

    def loss_of(x0: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(tokens[rows])[0]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * _snr_weights(noise_scheduler, t, cfg.snr_gamma)).mean()

    params = [*unet.parameters(), *text_encoder.parameters()]
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    fit_denoiser(params, latents, caption_ids, loss_of, cfg.unet_steps, cfg.unet_batch, cfg.unet_lr, cfg, gen,
                 "unet", progress)
    return unet.eval(), text_encoder.eval()


# -- the whole run ---------------------------------------------------------------------------------


def with_threads(threads: int, fn, *args):
    """fn(*args) with torch using `threads` CPU threads; the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def versions() -> dict[str, str]:
    """Library versions the weights depend on (recorded in quality.json)."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_asset_root(out: Path, pipe, results: dict, classifier=None) -> None:
    """Replace the asset root `out` with pipeline/, classifier/ (if given), quality.json and the
    manifest. Asset roots nested in the old `out` (the flow twin in the package's assets) are
    carried over unchanged."""
    import shutil

    from deradiff.toy.classifier import save_classifier
    from deradiff.toy.pipeline import PIPELINE_SUBDIR
    from deradiff.toy.store import nested_roots, write_manifest

    with atomic_dir(out) as tmp:
        for nested in nested_roots(out) if out.is_dir() else []:
            shutil.copytree(nested, tmp / nested.relative_to(out))
        pipe.save_pretrained(tmp / PIPELINE_SUBDIR, safe_serialization=True)
        if classifier is not None:
            save_classifier(classifier, tmp / "classifier")
        # unsorted keys, as shipped: quality.json is hashed into the manifest
        write_text_atomic(tmp / "quality.json", json.dumps(results, indent=2) + "\n")
        write_manifest(tmp)


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, progress: bool = True) -> dict:
    """Run all stages and write the asset root `out` (replaced at the end). Returns the
    measurements also written to `out/quality.json`. Restores torch's thread count after."""
    cfg.validate()
    return with_threads(cfg.threads, _pretrain, cfg, Path(out), progress)


def _pretrain(cfg: PretrainConfig, out: Path, progress: bool) -> dict:
    from deradiff.toy.classifier import evaluate_classifier, train_classifier
    from deradiff.toy.pipeline import assemble_pipeline
    from deradiff.toy.quality import measure_quality

    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()

    classifier = train_classifier(steps=cfg.classifier_steps, seed=cfg.seed, progress=progress)
    classifier_acc = evaluate_classifier(classifier)
    timings["classifier_s"] = time.perf_counter() - t0
    print(f"classifier on fresh images: {classifier_acc}", flush=True)

    t = time.perf_counter()
    vae = train_vae(cfg, progress)
    vae_quality = evaluate_vae(vae, classifier)
    print(f"vae: {vae_quality}", flush=True)
    latents, caption_ids = encode_pool(vae, cfg)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    unet, text_encoder = train_denoiser(latents * scaling, caption_ids, cfg, progress)
    timings["unet_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = assemble_pipeline(vae, text_encoder, unet)
    report = measure_quality(pipe, classifier, n=cfg.eval_images, seed=cfg.seed, progress=progress)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    timings["cpu_s"] = time.process_time() - cpu0  # wall time inflates when other jobs share the cores
    print(report.summary(), flush=True)

    results = {
        "quality": asdict(report), "classifier": classifier_acc, "vae": vae_quality,
        "vae_scaling_factor": scaling, "timings": timings, "config": asdict(cfg),
        "versions": versions(), "command": "deradiff toy pretrain",
    }
    write_asset_root(out, pipe, results, classifier)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deradiff.toy.flow_pretrain import FlowPretrainConfig

    d, f = PretrainConfig(), FlowPretrainConfig()
    parser.add_argument("--family", choices=["unet", "flow"], default="unet",
                        help="unet: the whole toy (classifier, VAE, UNet; assets/); flow: the SD3-style twin's "
                             "transformer on the shipped VAE and text encoder (assets/flow/)")
    parser.add_argument("--out", default=None,
                        help="asset root to write (replaced at the end); default: the package's shipped assets "
                             "(assets/ or assets/flow/)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch CPU threads; results are reproducible for a fixed thread count")
    parser.add_argument("--classifier-steps", type=int, default=d.classifier_steps,
                        help="classifier optimizer steps (batch 64; unet family)")
    parser.add_argument("--vae-steps", type=int, default=d.vae_steps,
                        help=f"VAE optimizer steps (batch {d.vae_batch}; unet family)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help=f"images encoded once to latents for the denoiser stage (default {d.pool_size}; "
                             f"flow family {f.pool_size})")
    parser.add_argument("--unet-steps", type=int, default=d.unet_steps,
                        help=f"UNet + text encoder optimizer steps (batch {d.unet_batch}; unet family)")
    parser.add_argument("--transformer-steps", type=int, default=f.steps,
                        help=f"SD3 transformer optimizer steps (batch {f.batch}; flow family)")
    parser.add_argument("--base", default=None,
                        help="flow family: UNet toy asset root whose VAE, text encoder and classifier it uses "
                             "(default: the shipped one)")
    parser.add_argument("--eval-images", type=int, default=d.eval_images,
                        help="generated images scored by the classifier at the end")


def run(args: argparse.Namespace) -> int:
    from deradiff.toy.store import ASSET_DIR

    if args.family == "flow":
        from deradiff.toy.flow import FLOW_ASSET_DIR
        from deradiff.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow

        pool = {} if args.pool_size is None else {"pool_size": args.pool_size}
        flow = FlowPretrainConfig(seed=args.seed, threads=args.threads, steps=args.transformer_steps,
                                  eval_images=args.eval_images, base=args.base, **pool)
        out = args.out or str(FLOW_ASSET_DIR)
        results = pretrain_flow(flow, out)
    else:
        pool = {} if args.pool_size is None else {"pool_size": args.pool_size}
        cfg = PretrainConfig(
            seed=args.seed, threads=args.threads, classifier_steps=args.classifier_steps, vae_steps=args.vae_steps,
            unet_steps=args.unet_steps, eval_images=args.eval_images, **pool,
        )
        out = args.out or str(ASSET_DIR)
        results = pretrain(cfg, out)
    print(f"wrote {out} in {results['timings']['total_s'] / 60:.1f} min")
    return 0
