"""Tiny SD3- and FLUX-shaped flow-matching pipelines built from configs (no downloads).

Real diffusers/transformers classes at toy sizes: a 16-latent-channel AutoencoderKL, CLIP text
encoders (byte-level tokenizers from tests/conftest.py), a T5 encoder with a character-level
Unigram tokenizer, and an SD3Transformer2DModel / FluxTransformer2DModel of one or two blocks.
One pipeline call at 32x32 pixels (16x16 latents) and a few steps takes tens of milliseconds.

    from tiny_flow import add_random_transformer_lora, build_tiny_flux, build_tiny_sd3
"""

from __future__ import annotations

import string

import torch
from conftest import _byte_level_tokenizer, _text_encoder

LATENT_CHANNELS = 16
T5_DIM = 64  # SD3 pads the concatenated CLIP states (2 x 32) up to the T5 width
MAX_SEQUENCE_LENGTH = 16  # pass as the pipelines' max_sequence_length (their defaults are 256 and 512)

# Attention projections of the joint (MM-DiT) blocks: image stream and text stream.
TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _t5_tokenizer():
    """A T5 tokenizer whose Unigram vocabulary is the printable ASCII characters: any text works."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    assert len(tok) == len(pieces), "tokenizer vocabulary was not taken from `vocab`"
    return tok


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae16():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def build_tiny_sd3(tmp_dir, num_layers: int = 2, num_attention_heads: int = 4, attention_head_dim: int = 8):
    """SD3-shaped: two CLIP encoders with projection + T5, an MM-DiT on 16-channel 16x16 latents.

    Classifier-free guidance batches [uncond; cond] rows when guidance_scale > 1. The MM-DiT's
    depth and width (heads x head dim) are parameters so benchmarks can size it up.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads, joint_attention_dim=T5_DIM,
        caption_projection_dim=num_attention_heads * attention_head_dim,  # the text stream runs at the model width
        pooled_projection_dim=64, pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae16(),
        text_encoder=_text_encoder(with_projection=True), tokenizer=_byte_level_tokenizer(tmp_dir / "tok1"),
        text_encoder_2=_text_encoder(with_projection=True), tokenizer_2=_byte_level_tokenizer(tmp_dir / "tok2"),
        text_encoder_3=_t5_encoder(), tokenizer_3=_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux(tmp_dir, guidance_embeds: bool = True):
    """FLUX-shaped: CLIP (pooled) + T5, a double- and a single-stream block on packed 2x2 latents.

    guidance_embeds=True is FLUX.1-dev: the pipeline's guidance_scale is a model input (one call
    per step, no [uncond; cond] batch). The pipeline hands the transformer timestep / 1000.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()
    # FLUX.1's scheduler: resolution-dependent shift (the pipeline computes mu from the token count).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae16(), text_encoder=_text_encoder(),
        tokenizer=_byte_level_tokenizer(tmp_dir / "tok1"), text_encoder_2=_t5_encoder(),
        tokenizer_2=_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_transformer_lora(transformer, rank: int = 4, strength: float = 0.3, seed: int = 1) -> None:
    """A LoRA on every attention projection (joint-attention text stream too), random nonzero B."""
    from deradiff.models import add_lora

    add_lora(transformer, rank=rank, target_modules=TRANSFORMER_LORA_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * strength)
