"""Procedural image domain: one colored shape on a light or dark background, with a caption.

Every image is a pure function of (seed, index), so datasets are reproducible on any machine.
Images are uint8 RGB arrays of shape (size, size, 3); captions read
"a red circle on a dark background".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.75),
    "orange": (0.98, 0.55, 0.08),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = {"light": 0.86, "dark": 0.12}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
VOCABULARY = ("a", "on", "background", *SHAPES, *COLOR_NAMES, *BACKGROUND_NAMES)

_SUPERSAMPLE = 4  # anti-aliased edges: render at 4x and average down


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows. Position and radius are fractions of the image side."""

    shape: str
    color: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.3

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_captions() -> list[str]:
    """Every caption of the domain (4 shapes x 6 colors x 2 backgrounds = 48), in a fixed order."""
    return [
        ShapeSpec(s, c, b).caption for s in SHAPES for c in COLOR_NAMES for b in BACKGROUND_NAMES
    ]


def parse_caption(caption: str) -> ShapeSpec:
    """Inverse of ShapeSpec.caption; raises ValueError naming the words the vocabulary lacks."""
    words = caption.lower().replace(",", " ").split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(
            f"caption {caption!r} uses words outside the toy vocabulary: {unknown}. "
            f"Known shapes {list(SHAPES)}, colors {list(COLOR_NAMES)}, backgrounds {list(BACKGROUND_NAMES)}."
        )
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    background = next((w for w in words if w in BACKGROUNDS), None)
    if shape is None or color is None or background is None:
        raise ValueError(
            f"caption {caption!r} must name one shape {list(SHAPES)}, one color {list(COLOR_NAMES)} "
            f"and one background {list(BACKGROUND_NAMES)}"
        )
    return ShapeSpec(shape, color, background)


def random_spec(rng: np.random.Generator, caption: str | None = None) -> ShapeSpec:
    """A random spec; with `caption`, only size and position are random."""
    base = parse_caption(caption) if caption else ShapeSpec(
        SHAPES[rng.integers(len(SHAPES))],
        COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
        BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))],
    )
    radius = float(rng.uniform(0.2, 0.34))
    cx, cy = (float(v) for v in rng.uniform(radius + 0.04, 1 - radius - 0.04, size=2))
    return ShapeSpec(base.shape, base.color, base.background, cx, cy, radius)


def _mask(spec: ShapeSpec, n: int) -> np.ndarray:
    """Boolean (n, n) mask of the shape on an n x n grid of pixel centers in [0, 1]."""
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords - spec.cx, coords - spec.cy)
    r = spec.radius
    if spec.shape == "circle":
        return x * x + y * y <= r * r
    if spec.shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8 * r
    if spec.shape == "triangle":  # upright, apex at the top (y grows downwards)
        top, bottom = -r, 0.7 * r
        half_width = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)
    if spec.shape == "cross":
        arm = 0.33 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    raise ValueError(f"unknown shape {spec.shape!r}; choose from {list(SHAPES)}")


def render(spec: ShapeSpec, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render `spec` as a uint8 (size, size, 3) RGB array; `rng` adds slight color jitter."""
    jitter = rng.uniform(-0.06, 0.06, size=4) if rng is not None else np.zeros(4)
    n = size * _SUPERSAMPLE
    mask = _mask(spec, n).astype(np.float32)
    mask = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = np.clip(np.asarray(COLORS[spec.color]) + jitter[:3], 0, 1)
    bg = np.clip(BACKGROUNDS[spec.background] + jitter[3], 0, 1)
    img = mask * fg + (1 - mask) * bg
    return np.round(img * 255).astype(np.uint8)


def sample(seed: int, index: int, size: int = 32, caption: str | None = None) -> tuple[np.ndarray, ShapeSpec]:
    """Image number `index` of the stream `seed`: deterministic, independent of other indices."""
    rng = np.random.default_rng([seed, index])
    spec = random_spec(rng, caption)
    return render(spec, size, rng), spec


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], the diffusers convention."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` procedural samples of stream `seed`: dicts with `pixel_values` (3, H, W) in [-1, 1],
    `caption`, and integer labels `shape`, `color`, `background`."""

    def __init__(self, length: int, seed: int = 0, size: int = 32, captions: list[str] | None = None):
        self.length, self.seed, self.size, self.captions = length, seed, size, captions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        caption = self.captions[index % len(self.captions)] if self.captions else None
        image, spec = sample(self.seed, index, self.size, caption)
        return {
            "pixel_values": to_tensor(image),
            "caption": spec.caption,
            "shape": SHAPES.index(spec.shape),
            "color": COLOR_NAMES.index(spec.color),
            "background": BACKGROUND_NAMES.index(spec.background),
        }
