"""`deradiff toy pretrain --family flow`: train the flow-matching twin's transformer, deterministically.

The twin (deradiff.toy.flow) reuses the UNet toy's shipped VAE, CLIP text encoder and tokenizer,
frozen; only the `SD3Transformer2DModel` is trained:
1. the same latent pool as the UNet stage (deradiff.toy.pretrain.encode_pool: captions cycle
   through all 48 domain captions), encoded by the base VAE and scaled by its scaling_factor;
2. the pipeline's own text conditioning of the 48 captions and "" (encode_prompt, computed once);
3. rectified flow: x_s = (1 - s) x0 + s eps, target v = eps - x0, s logit-normal (SD3's
   training density), 10% of captions replaced by "" for classifier-free guidance; the training
   loop (AdamW, warmup + cosine, EMA) is the UNet stage's (deradiff.toy.pretrain.fit_denoiser);
4. the quality bar on `eval_images` generated images (test prompts cycled, default sampler),
   scored by the base root's classifier.

It writes the asset root `out` (default: deradiff/toy/assets/flow/) with `pipeline/`,
`quality.json` and the SHA-256 `manifest.json`, replaced only at the end.

    deradiff toy pretrain --family flow                      # about 25 min on 1 CPU core
    deradiff toy pretrain --family flow --out /tmp/flow --transformer-steps 20 --pool-size 256 --eval-images 16
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.toy.domain import all_captions


@dataclass
class FlowPretrainConfig:
    """Every knob of the flow twin's pretraining; the defaults produce the shipped weights.
    `caption_dropout` and `ema_decay` have the UNet stage's meaning (fit_denoiser reads them)."""

    seed: int = 0
    threads: int = 1
    pool_size: int = 12288  # encoded training images (each caption 256 times), as the UNet stage
    steps: int = 2400
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_images: int = 512
    base: str | None = None  # UNet toy asset root (VAE, text encoder, classifier); None: shipped

    def validate(self) -> None:
        errors = [f"{k} must be positive" for k, v in asdict(self).items()
                  if k not in ("seed", "caption_dropout", "base") and v <= 0]
        if not 0 <= self.caption_dropout < 1:
            errors.append("caption_dropout must be in [0, 1)")
        if errors:
            raise UserError("bad flow pretraining settings: " + "; ".join(errors))


def train_transformer(pipe, latents: torch.Tensor, caption_ids: torch.Tensor, cfg: FlowPretrainConfig,
                      progress: bool = True):
    """Train `pipe.transformer` in place on `latents` (scaled as the pipeline decodes them) with
    the rectified-flow loss; the text encoders stay frozen. Returns it with its EMA weights, eval."""
    from deradiff.toy.flow import encode_texts, rectified_flow_loss
    from deradiff.toy.pretrain import fit_denoiser

    embeds, pooled = encode_texts(pipe, [*all_captions(), ""])  # rows of fit_denoiser's caption ids
    transformer = pipe.transformer.train()

    def loss_of(x0: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return rectified_flow_loss(transformer, x0, embeds[rows], pooled[rows], gen)

    gen = torch.Generator().manual_seed(cfg.seed + 8)
    fit_denoiser(list(transformer.parameters()), latents, caption_ids, loss_of, cfg.steps, cfg.batch, cfg.lr,
                 cfg, gen, "transformer", progress)
    return transformer.eval()


def pretrain_flow(cfg: FlowPretrainConfig, out: str | os.PathLike, progress: bool = True) -> dict:
    """Train the twin and write the asset root `out` (replaced at the end). Returns the
    measurements also written to `out/quality.json`. Restores torch's thread count after."""
    from deradiff.toy.pretrain import with_threads

    cfg.validate()
    return with_threads(cfg.threads, _pretrain_flow, cfg, Path(out), progress)


def _pretrain_flow(cfg: FlowPretrainConfig, out: Path, progress: bool) -> dict:
    from deradiff.toy.classifier import load_classifier
    from deradiff.toy.flow import assemble_flow_pipeline, build_transformer, flow_sampling_kwargs
    from deradiff.toy.pipeline import load_toy_pipeline, resolve_asset_root
    from deradiff.toy.pretrain import encode_pool, versions, write_asset_root
    from deradiff.toy.quality import measure_quality

    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    base_root = resolve_asset_root(cfg.base)
    base, classifier = load_toy_pipeline(base_root), load_classifier(base_root)
    latents, caption_ids = encode_pool(base.vae, cfg)
    latents = latents * base.vae.config.scaling_factor  # SD3 decodes z / scaling_factor + shift (0)
    timings["pool_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    torch.manual_seed(cfg.seed + 7)
    pipe = assemble_flow_pipeline(base.vae, base.text_encoder, build_transformer())
    train_transformer(pipe, latents, caption_ids, cfg, progress)
    timings["transformer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sampling = flow_sampling_kwargs()
    report = measure_quality(pipe, classifier, n=cfg.eval_images, seed=cfg.seed, progress=progress, **sampling)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    timings["cpu_s"] = time.process_time() - cpu0  # wall time inflates when other jobs share the cores
    print(report.summary(), flush=True)

    results = {
        "quality": asdict(report), "sampling": sampling, "timings": timings, "config": asdict(cfg),
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "versions": versions(), "command": "deradiff toy pretrain --family flow",
    }
    write_asset_root(out, pipe, results)
    return results
