"""ImageReward (Xu et al., 2023): BLIP (ViT-L/16 image encoder, BERT text encoder with cross-attention
to the image) and an MLP head, trained on 137k expert comparisons of text-to-image outputs.

    reward = get_reward("imagereward")            # THUDM/ImageReward:ImageReward.pt + bert-base-uncased
    reward = get_reward("imagereward", checkpoint="/models/ImageReward.safetensors",
                        tokenizer="/models/bert-base-uncased")
    reward.score(images, prompts)                 # (B,), images (B, 3, H, W) in [-1, 1]

score = (mlp(h) - 0.16717362830052426) / 1.0333394966054072, where h is the text encoder's [CLS]
output for the prompt (BERT-uncased tokens, padded/truncated to 35) reading every ViT token of the
image through cross-attention: the official `ImageReward.score` / `score_gard` (mean 0 and std 1 on
its authors' benchmark; roughly -2..2). Differentiable: the image goes through a tensor version
of the official preprocessing (bicubic resize of the shorter side to 224, center crop, CLIP mean/std).

Built from transformers' BLIP classes (BlipVisionModel, BlipTextModel) rather than the
`image-reward` package: the package pins timm==0.6.13 and fairscale==0.4.13 and its BLIP code
imports functions that transformers 5 removed, so it cannot live next to this project's
dependencies. The checkpoint stays in the package's layout (keys blip.visual_encoder.*,
blip.text_encoder.*, mlp.layers.*), renamed on load; tests/rewards/test_imagereward.py checks the
scores against the package's own code on a tiny model (tests/rewards/imagereward_reference.py).

The published ImageReward.pt is a pickle: it is read with torch.load(weights_only=True) only
(tensors and plain containers, never code); a .safetensors file with the same keys is preferred.
The default architecture is the published one; `vision` and `med_config` change it (tests build
tiny models this way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from deradiff.errors import UserError
from deradiff.rewards import Reward
from deradiff.rewards.aesthetic import AestheticMLP
from deradiff.rewards.clipscore import clip_pixels
from deradiff.rewards.hub import fetch_file, from_pretrained, load_weights

IMAGEREWARD_CHECKPOINT = "THUDM/ImageReward:ImageReward.pt"
BERT_TOKENIZER = "bert-base-uncased"
# The official normalization of the head's output (ImageReward.__init__).
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's ViT-L/16 at 224 (create_vit("large", 224)): mlp_ratio 4, LayerNorm eps 1e-6.
VIT_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=16)
# BLIP's med_config.json (the copy in THUDM/ImageReward is the same); BERT field names.
MED_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=30524, max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
                  hidden_act="gelu")
# Parts of the published checkpoint that scoring does not use (BLIP's contrastive projections,
# the pickled position-id buffer).
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _vision_key(key: str) -> str:
    """BLIP VisionTransformer key (after 'blip.visual_encoder.') -> transformers BlipVisionModel key."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in fixed:
        return fixed[key]
    if not key.startswith("blocks."):
        return key  # unknown: reported as unexpected by load_state_dict
    _, index, rest = key.split(".", 2)
    for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                     ("attn.proj.", "self_attn.projection.")):
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return f"encoder.layers.{index}.{rest}"


def split_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a checkpoint in the image-reward package's layout into state dicts for the
    "vision" (BlipVisionModel), "text" (BlipTextModel) and "mlp" parts, keys renamed.

    Keys the scorer never uses (_UNUSED, and other BLIP heads under 'blip.') are dropped; any
    other key lands in "other" so the caller can report it."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}, "other": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            parts["vision"][_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.startswith(_UNUSED):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
        elif not key.startswith(_UNUSED) and not key.startswith("blip."):
            parts["other"][key] = value
    return parts


def _med_config(med_config: str | dict | None) -> dict:
    """The text encoder's BERT fields: MED_CONFIG, updated from a med_config.json (path or
    "<repo>:<file>") or a dict; fields outside MED_CONFIG (architectures, encoder_width...) ignored."""
    if med_config is None:
        return dict(MED_CONFIG)
    if not isinstance(med_config, dict):
        path = fetch_file(med_config, "ImageReward med_config", "med_config")
        try:
            med_config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"ImageReward med_config {str(path)!r} is not a JSON file: {err}") from None
    return {**MED_CONFIG, **{k: v for k, v in med_config.items() if k in MED_CONFIG}}


def _vision_config(vision: dict | None) -> dict:
    """BLIP ViT fields: VIT_L16 with `vision` overrides (intermediate_size follows hidden_size x 4
    unless given, as BLIP's mlp_ratio)."""
    vision = dict(vision or {})
    unknown = sorted(set(vision) - set(VIT_L16))
    if unknown:
        raise UserError(f"unknown ImageReward vision field(s) {unknown}; choose from {sorted(VIT_L16)}")
    if "hidden_size" in vision and "intermediate_size" not in vision:
        vision["intermediate_size"] = 4 * vision["hidden_size"]
    return {**VIT_L16, **vision}


def build_blip(vision: dict, text: dict):
    """(BlipVisionModel, BlipTextModel): BLIP's ViT and its BERT text encoder whose layers
    cross-attend to the ViT tokens (is_decoder=True only adds those layers; scoring runs it
    bidirectionally). Built on whatever device is current (ImageReward builds on "meta")."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_model = BlipVisionModel(BlipVisionConfig(**vision, layer_norm_eps=1e-6, hidden_act="gelu"))
    text_config = BlipTextConfig(**text, encoder_hidden_size=vision["hidden_size"], is_decoder=True,
                                 bos_token_id=None, eos_token_id=None, sep_token_id=None)
    return vision_model, BlipTextModel(text_config, add_pooling_layer=False)


class ImageReward(Reward):
    """ImageReward v1.0 behind the reward interface; differentiable with respect to the images.

    Args:
        checkpoint: a local .safetensors / .pt file in the image-reward package's key layout, or
            "<repo>:<file>" on the hub; None = THUDM/ImageReward:ImageReward.pt.
        tokenizer: a folder or hub id of the BERT tokenizer (BLIP adds [DEC] and [ENC] to it).
        med_config: the text encoder's config (BLIP's med_config.json as a path, "<repo>:<file>"
            or dict); None = the published one.
        vision: overrides of the ViT-L/16 fields (hidden_size, intermediate_size,
            num_hidden_layers, num_attention_heads, image_size, patch_size).
    """

    name = "imagereward"
    differentiable = True

    def __init__(self, checkpoint: str | None = None, tokenizer: str = BERT_TOKENIZER,
                 med_config: str | dict | None = None, vision: dict | None = None):
        super().__init__()
        vision_cfg, text_cfg = _vision_config(vision), _med_config(med_config)
        self.tokenizer = self._tokenizer(tokenizer, text_cfg["vocab_size"])
        path = fetch_file(checkpoint or IMAGEREWARD_CHECKPOINT, "ImageReward", "checkpoint")
        parts = split_checkpoint(load_weights(path))
        if parts["other"]:
            raise UserError(f"{path} is not an ImageReward checkpoint: unexpected keys "
                            f"{sorted(parts['other'])[:3]} (expected blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
        # Built without memory or random init ("meta"), then given the checkpoint's tensors: a
        # random init of the 445M parameters would cost ~15 s of CPU for values thrown away.
        with torch.device("meta"):
            self.vision_model, self.text_model = build_blip(vision_cfg, text_cfg)
        self.mlp = AestheticMLP(text_cfg["hidden_size"])  # ImageReward's MLP is the same five Linear layers
        for module, part in ((self.vision_model, "vision"), (self.text_model, "text"), (self.mlp, "mlp")):
            self._load(module, parts[part], path, part)
        embeddings = self.text_model.embeddings  # its one buffer outside the checkpoint
        embeddings.position_ids = torch.arange(embeddings.position_embeddings.num_embeddings).unsqueeze(0)
        if any(t.is_meta for t in (*self.parameters(), *self.buffers())):
            raise RuntimeError("ImageReward: a tensor was left unloaded (transformers' BLIP changed?)")
        self.image_size = vision_cfg["image_size"]

    @staticmethod
    def _tokenizer(name: str, vocab_size: int):
        """BLIP's tokenizer: BERT's plus [DEC] and [ENC] (ids 30522, 30523 in bert-base-uncased),
        which must fill the text encoder's `vocab_size` embeddings exactly."""
        from transformers import BertTokenizer

        tokenizer = from_pretrained(BertTokenizer, name, "ImageReward tokenizer", "tokenizer")
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        if len(tokenizer) != vocab_size:
            # transformers 5 returns a tokenizer of special tokens only for a hub id it cannot find.
            raise UserError(f"ImageReward tokenizer {name!r} has {len(tokenizer)} tokens with [DEC] and [ENC], the "
                            f"text encoder {vocab_size}: pass tokenizer=<folder of the bert-base-uncased tokenizer> "
                            f"(`hf download {BERT_TOKENIZER}`); offline, a hub id that is not cached loads empty")
        return tokenizer

    @staticmethod
    def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], path, part: str) -> None:
        # float32 whatever the file holds (as loading into a float32 model would); .half() after.
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
            raise UserError(f"{path} does not fit the ImageReward {part} model (check vision= / med_config= "
                            f"for a non-standard architecture): {detail[:300]}") from None

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """BLIP input (B, 3, S, S), S = image_size, from images (B, 3, H, W) in [-1, 1]: the
        official Resize(S, bicubic) + CenterCrop(S) + CLIP normalization, on tensors."""
        return clip_pixels(images.to(self.device), self.image_size, self.image_size, CLIP_MEAN, CLIP_STD)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        image_tokens = self.vision_model(pixel_values=self.pixels(images).to(dtype)).last_hidden_state
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        # Every image token is attended (the package passes an all-ones encoder_attention_mask).
        hidden = self.text_model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                 encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        head = self.mlp.layers[0].weight
        rewards = self.mlp(hidden[:, 0].to(head.dtype)).squeeze(-1).float()
        return (rewards - SCORE_MEAN) / SCORE_STD
