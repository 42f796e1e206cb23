"""The toy world's flow-matching twin: a stock diffusers `StableDiffusion3Pipeline` at tiny sizes.

Same images, captions, VAE and tokenizer as the UNet toy (deradiff.toy.pipeline); what differs
is the denoiser and its training objective, so every code path that runs SD3 runs here on CPU.

Parts:
- `AutoencoderKL`: a copy of the toy's (frozen, shipped weights), with `shift_factor=0.0`
  registered because SD3's pipeline reads it. 32x32x3 images <-> 16x16x4 latents.
- `text_encoder` and `text_encoder_2`: `CLIPTextModelWithProjection`s whose text model is the
  shipped toy CLIP text encoder (frozen) and whose projection is the identity. SD3 concatenates
  their penultimate hidden states (2 x 64 = 128 features per token, MAX_LENGTH tokens) and their
  pooled outputs (128 features). Both use the toy tokenizer (one token per toy word).
- No T5 (`text_encoder_3 = tokenizer_3 = None`, which SD3 allows): the pipeline appends
  `max_sequence_length` zero tokens instead. Attention sees each of them, so the count is part of
  the model: it was trained with T5_TOKENS and `flow_sampling_kwargs()` passes that count.
  Callers that encode prompts themselves pass `max_sequence_length=T5_TOKENS` too.
- `SD3Transformer2DModel` (MM-DiT) on 2x2 latent patches (64 image tokens), TRANSFORMER_CONFIG.
- `FlowMatchEulerDiscreteScheduler(shift=SHIFT)`: rectified flow x_s = (1 - s) x0 + s eps,
  the transformer predicts v = eps - x0 at timestep 1000 s.

`build_flow_pipeline(seed)` builds it with random weights (tests);
`load_flow_pipeline()` loads the shipped weights (assets/flow/) after checking their SHA-256.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.toy.pipeline import IMAGE_SIZE, LATENT_SIZE, PIPELINE_SUBDIR, TEXT_CONFIG
from deradiff.toy.store import ASSET_DIR, verify_manifest

FLOW_ASSET_DIR = ASSET_DIR / "flow"
FLOW_REBUILD_HINT = "rebuild them with `deradiff toy pretrain --family flow` (about 25 min on 1 CPU core)"
DEFAULT_STEPS = 25  # Euler steps of the default sampler
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale of the default sampler
T5_TOKENS = 1  # zero placeholder tokens standing in for T5 (pipeline's max_sequence_length)
SHIFT = 1.0  # 64 image tokens: SD3's shift 3.0 is for 4096
TEXT_WIDTH = 2 * TEXT_CONFIG["projection_dim"]  # two CLIP encoders, concatenated

TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
    attention_head_dim=24, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH,
    caption_projection_dim=96, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=LATENT_SIZE // 2,
)


def flow_sampling_kwargs() -> dict:
    """Keyword arguments of the default sampler for `pipe(prompt, **kwargs)`; images come back
    as float (B, 3, 32, 32) in [0, 1] (output_type "pt")."""
    return dict(
        num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE, height=IMAGE_SIZE,
        width=IMAGE_SIZE, max_sequence_length=T5_TOKENS, output_type="pt",
    )


def build_transformer(config: dict | None = None):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**(config or TRANSFORMER_CONFIG))


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def projected_text_encoder(text_encoder):
    """A `CLIPTextModelWithProjection` around a copy of `text_encoder`'s text model (a toy
    `CLIPTextModel`), with an identity projection: pooled output = final EOS hidden state."""
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(copy.deepcopy(text_encoder.config))
    # transformers 5's CLIPTextModel holds the text model's modules directly
    model.text_model.load_state_dict(text_encoder.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(*model.text_projection.weight.shape))
    return model.eval().requires_grad_(False)


def flow_vae(vae):
    """A frozen copy of the toy VAE with the `shift_factor` SD3's pipeline reads (0: none)."""
    vae = copy.deepcopy(vae).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return vae


def assemble_flow_pipeline(vae, text_encoder, transformer, scheduler=None):
    """A `StableDiffusion3Pipeline` from the toy VAE and CLIP text encoder (copied, frozen) and
    a transformer (eval mode, no progress bar)."""
    from diffusers import StableDiffusion3Pipeline

    from deradiff.toy.tokenizer import build_toy_tokenizer

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=scheduler or build_flow_scheduler(), vae=flow_vae(vae),
        text_encoder=projected_text_encoder(text_encoder), tokenizer=build_toy_tokenizer(),
        text_encoder_2=projected_text_encoder(text_encoder), tokenizer_2=build_toy_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flow_pipeline(seed: int = 0, transformer_config: dict | None = None):
    """The toy `StableDiffusion3Pipeline` with random weights (seeded); built in well under a
    second. For tests."""
    from deradiff.toy.pipeline import build_text_encoder, build_vae

    torch.manual_seed(seed)
    vae, text_encoder = build_vae(), build_text_encoder()
    return assemble_flow_pipeline(vae, text_encoder, build_transformer(transformer_config))


def resolve_flow_root(path: str | os.PathLike | None) -> Path:
    """The flow asset root (manifest.json + pipeline/) for `path`, which may also name its
    pipeline/ folder. None means the package's shipped flow assets."""
    if path is None:
        return FLOW_ASSET_DIR
    path = Path(path)
    if not path.exists():
        raise UserError(f"toy flow asset folder {path} does not exist; create it with "
                        f"`deradiff toy pretrain --family flow --out {path}`")
    if (path / "model_index.json").exists() and not (path / "manifest.json").exists():
        return path.parent
    return path


def load_flow_pipeline(path: str | os.PathLike | None = None, components: dict | None = None):
    """The pretrained toy `StableDiffusion3Pipeline` (CPU, float32, eval, no progress bar).

    `path` is an asset root written by `deradiff toy pretrain --family flow --out DIR` (default:
    the weights shipped in deradiff/toy/assets/flow/). Every file is checked against the root's
    SHA-256 manifest first; a missing or corrupt file raises UserError saying how to rebuild.
    `components`: modules to use instead of loading, None to leave one out
    (deradiff.models.load_pipeline).
    """
    from diffusers import StableDiffusion3Pipeline

    from deradiff.models import pipeline_components

    root = resolve_flow_root(path)
    verify_manifest(root, FLOW_REBUILD_HINT)
    pipe_dir = root / PIPELINE_SUBDIR
    if not (pipe_dir / "model_index.json").exists():
        raise UserError(f"no {PIPELINE_SUBDIR}/model_index.json in {root}; {FLOW_REBUILD_HINT}")
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(pipe_dir), local_files_only=True, use_safetensors=True,
        **{"text_encoder_3": None, "tokenizer_3": None, **pipeline_components(pipe_dir, components or {})},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- training ---------------------------------------------------------------------------------------


@torch.no_grad()
def encode_texts(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pipeline hands its transformer for `texts`, as the pipeline computes it:
    (N, MAX_LENGTH + T5_TOKENS, TEXT_WIDTH) token states and (N, TEXT_WIDTH) pooled states."""
    embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=T5_TOKENS)
    return embeds, pooled


def logit_normal_sigmas(n: int, gen: torch.Generator, mean: float = 0.0, std: float = 1.0,
                        shift: float = SHIFT) -> torch.Tensor:
    """(n,) training noise levels s in (0, 1): sigmoid(N(mean, std)) as SD3 trains, then the
    scheduler's shift s -> shift s / (1 + (shift - 1) s)."""
    u = torch.sigmoid(torch.randn(n, generator=gen) * std + mean)
    return shift * u / (1 + (shift - 1) * u)


def rectified_flow_loss(transformer, x0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """Mean squared error of the predicted velocity against v = eps - x0 at x_s = (1 - s) x0 + s eps.

    x0: (B, 4, 16, 16) scaled latents; embeds/pooled: the rows' text conditioning."""
    noise = torch.randn(x0.shape, generator=gen)
    s = logit_normal_sigmas(x0.shape[0], gen).view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    pred = transformer(hidden_states=noisy, timestep=s.flatten() * 1000, encoder_hidden_states=embeds,
                       pooled_projections=pooled).sample
    return torch.nn.functional.mse_loss(pred, noise - x0)
