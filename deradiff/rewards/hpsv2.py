"""HPSv2 / HPSv2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on human preference pairs.

    reward = get_reward("hpsv2")                                   # xswu/HPSv2:HPS_v2_compressed.pt
    reward = get_reward("hpsv2", version="v2.1")                   # HPS_v2.1_compressed.pt
    reward = get_reward("hpsv2", checkpoint="/models/hps_v2.safetensors")

`version` picks the published weights in xswu/HPSv2: "v2.0" (HPS_v2_compressed.pt, the default,
as in the hpsv2 package) or "v2.1" (HPS_v2.1_compressed.pt, the authors' later release; same
architecture and score, other weights). It is ignored when `checkpoint` names a file.

score = cos(image, prompt) with open_clip's unit-norm features (the diagonal of
image_features @ text_features.T, as the official `hpsv2.score`; about 0.25-0.30 for SD images).

The checkpoint holds the whole CLIP (not only a head): the model is built with random weights
(`pretrained=None`, nothing downloaded) and the checkpoint loaded into it. The published
files are pickles; they are read with torch.load(weights_only=True) only
(open_clip's loader, which rebuilds tensors and plain containers and never runs code). A
.safetensors conversion is read with safetensors and preferred when you have one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deradiff.errors import UserError
from deradiff.rewards import Reward
from deradiff.rewards.clipscore import clip_pixels
from deradiff.rewards.hub import fetch_file

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(Reward):
    """HPSv2 behind the reward interface; differentiable through open_clip's preprocessing.

    Args:
        checkpoint: a local .safetensors / .pt file or "<repo>:<file>" on the hub; None = the
            published file of `version` in xswu/HPSv2.
        version: "v2.0" or "v2.1" (only used when checkpoint is None).
        arch: the open_clip architecture name (tests register tiny ones with add_model_config).
    """

    name = "hpsv2"
    differentiable = True

    def __init__(self, checkpoint: str | None = None, version: str = "v2.0", arch: str = "ViT-H-14"):
        super().__init__()
        import open_clip

        if version not in HPS_FILES:
            raise UserError(f"unknown HPS version {version!r}; choose from {sorted(HPS_FILES)}")
        path = fetch_file(checkpoint or f"{HPS_REPO}:{HPS_FILES[version]}", "HPSv2", "checkpoint")
        try:
            self.model = open_clip.create_model(arch, pretrained=None)
        except RuntimeError as err:
            raise UserError(f"unknown open_clip architecture {arch!r}: {err}") from None
        try:
            open_clip.load_checkpoint(self.model, str(path), strict=True, weights_only=True)
        except Exception as err:  # unpicklable content, key or shape mismatch
            raise UserError(f"{path} is not an HPSv2 {arch} checkpoint that loads with weights_only=True: "
                            f"{str(err).strip().splitlines()[0]}") from None
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.geometry = (size, size, list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                         list(cfg.get("std", open_clip.OPENAI_DATASET_STD)))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        dtype = next(self.model.parameters()).dtype
        pixels = clip_pixels(images.to(self.device), *self.geometry).to(dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (image * text).sum(-1)
