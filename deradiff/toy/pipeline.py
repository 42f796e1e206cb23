"""The toy world's text-to-image model: a stock diffusers `StableDiffusionPipeline` at tiny sizes.

Parts (all real diffusers/transformers classes, so every code path that runs SD1.5 runs here):
- `AutoencoderKL` with one downsampling: 32x32x3 images <-> 16x16x4 latents (0.35M params).
  Why latent rather than a no-downsampling near-identity VAE on 16x16 images: 32x32 keeps
  triangles and crosses distinguishable at the sizes the domain draws, the UNet still works
  at 16x16 (pixel-space cost), and `pipe.vae` does real work, like SD's. The VAE is trained
  first, to reconstruct images the classifier reads (>= 99%), before the UNet sees a latent.
- `UNet2DConditionModel` on 16x16x4 latents, channels (32, 64, 80) at 16/8/4 px (1.9M params), one resnet
  per level, cross-attention only at the lowest resolution (4x4) and in the mid block.
- `CLIPTextModel` (2 layers, width 64) with a `CLIPTokenizer` in which each toy word is one
  token (deradiff.toy.tokenizer); prompts are checked against the toy vocabulary by
  `check_prompt` rather than silently split into bytes.
- `DDIMScheduler` with SD's scaled-linear betas, epsilon prediction and `clip_sample=False`.

`build_toy_pipeline(seed)` builds it with random weights in well under a second (for tests);
`load_toy_pipeline()` loads the shipped pretrained weights after checking their SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.toy import domain
from deradiff.toy.store import ASSET_DIR, REBUILD_HINT, verify_manifest
from deradiff.toy.tokenizer import MAX_LENGTH, build_toy_tokenizer, vocab_size

IMAGE_SIZE = 32  # pixels; the pipeline's default height/width
LATENT_SIZE = 16
DEFAULT_STEPS = 25  # DDIM steps of the default sampler
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale of the default sampler
PIPELINE_SUBDIR = "pipeline"

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=MAX_LENGTH, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(24, 48), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, mid_block_add_attention=False, sample_size=IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 80), norm_num_groups=16, cross_attention_dim=TEXT_CONFIG["hidden_size"],
    attention_head_dim=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def toy_sampling_kwargs() -> dict:
    """Keyword arguments of the default sampler for `pipe(prompt, **kwargs)`.

    output_type "pt" returns float images (B, 3, 32, 32) in [0, 1]; the classifier wants
    [-1, 1] (`images * 2 - 1`).
    """
    return dict(
        num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
        height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt",
    )


def check_prompt(prompt: str) -> domain.ShapeSpec:
    """Parse a toy prompt; raise UserError naming words outside the toy vocabulary (or the
    missing shape/color/background) instead of letting the tokenizer split them into bytes."""
    try:
        return domain.parse_caption(prompt)
    except ValueError as err:
        raise UserError(f"{str(err).rstrip('.')}; write prompts like {domain.all_captions()[0]!r}") from None


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size(), **TEXT_CONFIG))


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoder, unet, scheduler=None):
    """A `StableDiffusionPipeline` from toy parts (eval mode, no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_toy_tokenizer(),
        unet=unet.eval(), scheduler=scheduler or build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_toy_pipeline(seed: int = 0):
    """The toy `StableDiffusionPipeline` with random weights (seeded): same architecture as the
    shipped one, built in well under a second. For tests and for pretraining's starting point."""
    torch.manual_seed(seed)
    vae, text_encoder, unet = build_vae(), build_text_encoder(), build_unet()
    return assemble_pipeline(vae, text_encoder, unet)


def resolve_asset_root(path: str | os.PathLike | None) -> Path:
    """The asset root (holding manifest.json and pipeline/) for `path`, which may also name the
    pipeline/ folder itself. None means the package's shipped assets."""
    if path is None:
        return ASSET_DIR
    path = Path(path)
    if not path.exists():
        raise UserError(f"toy asset folder {path} does not exist; create it with `deradiff toy pretrain --out {path}`")
    if (path / "model_index.json").exists() and not (path / "manifest.json").exists():
        return path.parent
    return path


def load_toy_pipeline(path: str | os.PathLike | None = None, components: dict | None = None):
    """The pretrained toy `StableDiffusionPipeline` (CPU, float32, eval, no progress bar).

    `path` is an asset root written by `deradiff toy pretrain --out DIR` (default: the weights
    shipped in the package). Every file is checked against the root's SHA-256 manifest first;
    a missing or corrupt file raises UserError saying how to rebuild. `components`: modules to
    use instead of loading, None to leave one out (deradiff.models.load_pipeline).
    """
    from diffusers import StableDiffusionPipeline

    from deradiff.models import pipeline_components

    root = resolve_asset_root(path)
    verify_manifest(root)
    pipe_dir = root / PIPELINE_SUBDIR
    if not (pipe_dir / "model_index.json").exists():
        raise UserError(f"no {PIPELINE_SUBDIR}/model_index.json in {root}; {REBUILD_HINT}")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(pipe_dir), local_files_only=True, use_safetensors=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, **pipeline_components(pipe_dir, components or {}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
