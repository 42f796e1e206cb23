"""A tiny ImageReward in the image-reward package's checkpoint layout, built offline and
deterministically (torch only), shared by tests/rewards/test_imagereward.py and
tests/rewards/imagereward_reference.py (which scores it with the package's own code)."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

# BLIP ViT fields as deradiff.rewards.imagereward names them (mlp_ratio 4 as BLIP's create_vit).
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
# med_config.json fields (BERT names); encoder_width follows the ViT as BLIP_Pretrain sets it.
WORDS = ["a", "an", "the", "of", "on", "in", "red", "blue", "green", "circle", "square", "photo", "cat", "dog",
         "astronaut", "riding", "horse", "background", "dark", "bright", ",", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_VOCAB = len(SPECIAL) + len(WORDS) + 2  # BLIP's tokenizer adds [DEC] and [ENC]
MED = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=N_VOCAB,
           max_position_embeddings=64, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu",
           architectures=["BertModel"], model_type="bert", type_vocab_size=2, add_cross_attention=True,
           encoder_width=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
PROJ = 16  # BLIP_Pretrain's contrastive projections (in the checkpoint, unused by the score)

PROMPTS = [
    "a red circle on a dark background",
    "a photo of a cat",
    "an astronaut riding a horse",
    ", ".join(["a blue square in the bright background"] * 6),  # > 35 tokens: truncated
]


def write_vocab(directory: Path) -> Path:
    """A bert-base-uncased-style tokenizer folder (vocab.txt) with the words of PROMPTS."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return directory


def published_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the package's ImageReward state dict for VISION / MED (ImageReward.pt layout)."""
    d, di, dt, dti = VISION["hidden_size"], VISION["intermediate_size"], MED["hidden_size"], MED["intermediate_size"]
    p = VISION["patch_size"]
    n_pos = (VISION["image_size"] // p) ** 2 + 1
    keys: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, d), "blip.visual_encoder.pos_embed": (1, n_pos, d),
        "blip.visual_encoder.patch_embed.proj.weight": (d, 3, p, p), "blip.visual_encoder.patch_embed.proj.bias": (d,),
        "blip.visual_encoder.norm.weight": (d,), "blip.visual_encoder.norm.bias": (d,),
    }
    for i in range(VISION["num_hidden_layers"]):
        b = f"blip.visual_encoder.blocks.{i}."
        keys |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                 b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                 b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (di, d),
                 b + "mlp.fc1.bias": (di,), b + "mlp.fc2.weight": (d, di), b + "mlp.fc2.bias": (d,)}
    t = "blip.text_encoder."
    keys |= {t + "embeddings.position_ids": (1, MED["max_position_embeddings"]),
             t + "embeddings.word_embeddings.weight": (N_VOCAB, dt),
             t + "embeddings.position_embeddings.weight": (MED["max_position_embeddings"], dt),
             t + "embeddings.LayerNorm.weight": (dt,), t + "embeddings.LayerNorm.bias": (dt,)}
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, width in (("attention", dt), ("crossattention", d)):
            keys |= {f"{b}{att}.self.query.weight": (dt, dt), f"{b}{att}.self.query.bias": (dt,),
                     f"{b}{att}.self.key.weight": (dt, width), f"{b}{att}.self.key.bias": (dt,),
                     f"{b}{att}.self.value.weight": (dt, width), f"{b}{att}.self.value.bias": (dt,),
                     f"{b}{att}.output.dense.weight": (dt, dt), f"{b}{att}.output.dense.bias": (dt,),
                     f"{b}{att}.output.LayerNorm.weight": (dt,), f"{b}{att}.output.LayerNorm.bias": (dt,)}
        keys |= {b + "intermediate.dense.weight": (dti, dt), b + "intermediate.dense.bias": (dti,),
                 b + "output.dense.weight": (dt, dti), b + "output.dense.bias": (dt,),
                 b + "output.LayerNorm.weight": (dt,), b + "output.LayerNorm.bias": (dt,)}
    keys |= {"blip.vision_proj.weight": (PROJ, d), "blip.vision_proj.bias": (PROJ,),
             "blip.text_proj.weight": (PROJ, dt), "blip.text_proj.bias": (PROJ,)}
    widths = [dt, 1024, 128, 64, 16, 1]  # ImageReward's MLP: Linear layers at indices 0, 2, 4, 6, 7
    for index, i, o in zip((0, 2, 4, 6, 7), widths[:-1], widths[1:], strict=True):
        keys |= {f"mlp.layers.{index}.weight": (o, i), f"mlp.layers.{index}.bias": (o,)}
    return keys


def tiny_state() -> dict[str, torch.Tensor]:
    """Deterministic random weights for published_layout(): each tensor from a generator seeded by
    its key; linear weights scaled by 1/sqrt(fan_in) so that signal survives the layers."""
    state = {}
    for key, shape in published_layout().items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        x = torch.randn(shape, generator=gen)
        if "norm" in key.lower() and key.endswith("weight"):
            x = 1 + 0.1 * x
        elif key.endswith("bias"):
            x = 0.1 * x
        elif "embeddings." not in key and not key.endswith(("cls_token", "pos_embed")):
            x = x / torch.tensor(shape[1:]).prod().sqrt()  # linear and patch-conv weights
        state[key] = x.contiguous()
    return state


def images_uint8(n: int = 4, height: int = 32, width: int = 32) -> torch.Tensor:
    """n distinct structured images (n, 3, height, width), uint8 (so PIL and tensor paths agree)."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, height // 4, width // 4, generator=gen)
    return (coarse.repeat_interleave(4, -1).repeat_interleave(4, -2) * 255).round().to(torch.uint8)
