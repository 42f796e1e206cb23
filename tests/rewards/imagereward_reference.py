"""Reference scores for tests/rewards/test_imagereward.py, from the image-reward package's own code.

Not a test: the package cannot be installed next to this project (it pins timm==0.6.13 and
fairscale, and its BLIP code needs transformers 4), so this runs in a separate environment:

    python -m venv /tmp/irref
    /tmp/irref/bin/pip install torch torchvision pillow "transformers==4.46.3" "timm==0.6.13" "fairscale==0.4.13"
    /tmp/irref/bin/pip install --no-deps image-reward==1.5
    /tmp/irref/bin/python tests/rewards/imagereward_reference.py

(The package's __init__ also imports its ReFL trainer and OpenAI's clip; they are not needed and
skipped below.)

It builds the package's ImageReward (its VisionTransformer, its med.py BertModel, its MLP, its
`score` method, its torchvision preprocessing on PIL images) at the sizes of tiny_imagereward.py,
checks that the state dict has exactly the layout the test writes, loads tiny_state() and prints
one score per (image, prompt) pair: the REFERENCE_* constants in the test.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from tiny_imagereward import (  # noqa: E402
    MED,
    PROJ,
    PROMPTS,
    VISION,
    images_uint8,
    published_layout,
    tiny_state,
    write_vocab,
)


def _skip_package_init() -> None:
    """Make `ImageReward` and `ImageReward.models` bare packages, so that importing the scorer
    does not run their __init__ (which imports ReFL's datasets/diffusers and clip)."""
    spec = importlib.util.find_spec("ImageReward")
    root = spec.submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module


def package_model(vocab_dir: Path):
    _skip_package_init()
    from ImageReward.ImageReward import MLP, ImageReward, _transform
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    blip = nn.Module()
    blip.visual_encoder = VisionTransformer(
        img_size=VISION["image_size"], patch_size=VISION["patch_size"], embed_dim=VISION["hidden_size"],
        depth=VISION["num_hidden_layers"], num_heads=VISION["num_attention_heads"],
        mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"], drop_path_rate=0.1)
    config = BertConfig(**MED)
    config.encoder_width = VISION["hidden_size"]
    blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
    blip.vision_proj = nn.Linear(VISION["hidden_size"], PROJ)
    blip.text_proj = nn.Linear(MED["hidden_size"], PROJ)
    tokenizer = BertTokenizer(str(vocab_dir / "vocab.txt"))  # init_tokenizer(), from a local vocabulary
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    blip.tokenizer = tokenizer

    model = ImageReward.__new__(ImageReward)  # ImageReward.__init__ with the tiny sizes
    nn.Module.__init__(model)
    model.device, model.blip, model.preprocess = "cpu", blip, _transform(VISION["image_size"])
    model.mlp = MLP(MED["hidden_size"])
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    return model.eval()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = package_model(write_vocab(Path(tmp) / "tok"))
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert layout == published_layout(), sorted(set(layout) ^ set(published_layout()))
    model.load_state_dict(tiny_state(), strict=True)
    for name, (h, w) in (("REFERENCE_32x32", (32, 32)), ("REFERENCE_40x48", (40, 48))):
        images = images_uint8(len(PROMPTS), h, w)
        pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        with torch.no_grad():
            scores = [model.score(prompt, pil) for prompt, pil in zip(PROMPTS, pils, strict=True)]
        print(f"{name} = {scores!r}")


if __name__ == "__main__":
    main()
