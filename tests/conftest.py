"""Shared fixtures: tiny SD1.5- and SDXL-shaped pipelines built from configs (no downloads)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist workers share the cores: one thread each, and for the commands they launch,
    # instead of several workers' thread pools spinning against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _byte_level_tokenizer(directory, cls_name: str = "CLIPTokenizer"):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges): any text works.

    Built with from_pretrained on a folder: transformers 5 silently ignores vocab_file= kwargs.
    """
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = getattr(transformers, cls_name).from_pretrained(str(directory), model_max_length=48)
    assert len(tok) == len(vocab), "tokenizer vocabulary was not read from the folder"
    return tok


def _text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=520, projection_dim=32,
        max_position_embeddings=48,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, sample_size=32,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def build_tiny_sd15(tmp_dir):
    """SD1.5-shaped pipeline: CLIP text encoder, cross-attention UNet, 16x16 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(), tokenizer=_byte_level_tokenizer(tmp_dir / "tok"),
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(tmp_dir):
    """SDXL-shaped pipeline: two text encoders, pooled embeds and time ids (added_cond_kwargs)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(), text_encoder_2=_text_encoder(with_projection=True),
        tokenizer=_byte_level_tokenizer(tmp_dir / "tok1"),
        tokenizer_2=_byte_level_tokenizer(tmp_dir / "tok2"), unet=unet, scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny convolutions run fastest on one thread, and many times
    faster than on two when the machine's cores are shared. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def add_random_lora(unet, rank: int = 4, strength: float = 0.3, seed: int = 1) -> None:
    """Inject a LoRA and give it random nonzero B so the adapted model differs from the base."""
    from deradiff.models import add_lora

    add_lora(unet, rank=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * strength)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """(pipe_with_lora, pipe_base): same weights, the first with a random LoRA on its UNet."""
    root = tmp_path_factory.mktemp("sd15")
    base = build_tiny_sd15(root)
    adapted = build_tiny_sd15(root)
    add_random_lora(adapted.unet)
    return adapted, base


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base = build_tiny_sdxl(root)
    adapted = build_tiny_sdxl(root)
    add_random_lora(adapted.unet)
    return adapted, base


def write_pick_a_pic_parquet(path, n_pairs: int, seed: int = 0, size: int = 32) -> None:
    """Pick-a-Pic v2-format pairs from the procedural toy domain: the image with the larger,
    more vivid shape is preferred (label_0 = 1 when it is jpg_0), ~10% ties."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from deradiff.toy import domain

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n_pairs):
        img0, spec0 = domain.sample(seed, 2 * i, size)
        img1, _ = domain.sample(seed + 1, 2 * i, size, caption=spec0.caption)
        encoded = []
        for img in (img0, img1):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            encoded.append(buf.getvalue())
        score = [float(np.abs(im.astype(float) - im.mean()).mean()) for im in (img0, img1)]
        label = 0.5 if i % 10 == 9 else float(score[0] > score[1])
        rows["caption"].append(spec0.caption)
        rows["jpg_0"].append(encoded[0])
        rows["jpg_1"].append(encoded[1])
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A saved random-weight toy pipeline and train/test preference parquets, on disk."""
    from deradiff.toy.pipeline import build_toy_pipeline

    root = tmp_path_factory.mktemp("toy_world")
    pipe = build_toy_pipeline(seed=0)
    pipe.save_pretrained(root / "pipe")
    write_pick_a_pic_parquet(root / "prefs" / "train.parquet", 48, seed=0)
    write_pick_a_pic_parquet(root / "prefs" / "test.parquet", 16, seed=100)
    return root
