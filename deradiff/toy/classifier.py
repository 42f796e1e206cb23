"""A small CNN that reads shape, color and background off a toy image: the judge of prompt
adherence, and (through its penultimate features) the space for distribution distances.

Trained in well under a minute on one thread on fresh procedural images; shipped as
`assets/classifier/model.safetensors` + `config.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from deradiff.errors import UserError
from deradiff.io import atomic_write, write_text_atomic
from deradiff.toy.domain import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, ShapesDataset

HEADS = {"shape": len(SHAPES), "color": len(COLOR_NAMES), "background": len(BACKGROUND_NAMES)}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 16
    feature_dim: int = 128
    image_size: int = 32


class ShapeClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), global pooling, a feature layer, three heads."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w = config.width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 2 * w))
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, config.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, n) for k, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, feature_dim) penultimate features.
        Other sizes are resized to the training size (bilinear)."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        x = self.body(images)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.neck(x)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'shape': (B, 4), 'color': (B, 6), 'background': (B, 2)} logits."""
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Argmax labels per head, (B,) int64 each, computed in chunks."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        for chunk in images.split(batch_size):
            for k, v in self.logits(chunk).items():
                out[k].append(v.argmax(-1))
        return {k: torch.cat(v) for k, v in out.items()}


def _batch(dataset: ShapesDataset, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    items = [dataset[i] for i in range(start, start + n)]
    images = torch.stack([it["pixel_values"] for it in items])
    labels = {k: torch.tensor([it[k] for it in items]) for k in HEADS}
    return images, labels


def _degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise and blur on half the batch, so generated (slightly soft, noisy) images are
    judged by what they show rather than by their texture."""
    b = images.shape[0]
    blurred = nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    images = pick * blurred + (1 - pick) * images
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.1
    return images + sigma * torch.randn(images.shape, generator=gen)


def train_classifier(
    steps: int = 500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True
) -> ShapeClassifier:
    """Train on fresh procedural images of stream `seed` (every batch new). Deterministic for a
    fixed thread count. Returns the model in eval mode."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ShapeClassifier()
    data = ShapesDataset(steps * batch_size, seed=seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in tqdm(range(steps), desc="classifier", disable=not progress):
        images, labels = _batch(data, step * batch_size, batch_size)
        logits = model.logits(_degrade(images, gen))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate_classifier(model: ShapeClassifier, n: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Accuracy per head on `n` fresh procedural images of stream `seed`."""
    images, labels = _batch(ShapesDataset(n, seed=seed), 0, n)
    pred = model.predict(images)
    return {k: (pred[k] == labels[k]).float().mean().item() for k in HEADS}


def save_classifier(model: ShapeClassifier, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors into `directory` (each file atomically)."""
    from safetensors.torch import save

    directory = Path(directory)
    with atomic_write(directory / WEIGHTS_NAME, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    # no trailing newline, as shipped: config.json is hashed into the asset manifest
    write_text_atomic(directory / CONFIG_NAME, json.dumps(asdict(model.config), indent=2))
    return directory


def load_classifier(path: str | os.PathLike | None = None) -> ShapeClassifier:
    """The shipped classifier (eval mode), or the one saved in `path` (a folder or the asset root).

    The shipped files are checked against the asset manifest first.
    """
    from safetensors.torch import load_file

    from deradiff.toy.store import ASSET_DIR, verify_manifest

    root = Path(path) if path is not None else ASSET_DIR
    if (root / "manifest.json").exists() or path is None:
        verify_manifest(root)
        root = root / "classifier"
    if not (root / WEIGHTS_NAME).exists():
        raise UserError(f"no {WEIGHTS_NAME} in {root}; rebuild the toy assets with `deradiff toy pretrain`")
    config = ClassifierConfig(**json.loads((root / CONFIG_NAME).read_text()))
    model = ShapeClassifier(config)
    model.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
    return model.eval()
