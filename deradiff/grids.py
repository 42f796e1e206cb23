"""Image grids with row and column labels, saved as PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deradiff.io import atomic_write


def save_image_grid(
    images: list[list[np.ndarray | Image.Image]],
    path: str | os.PathLike,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int = 96,
) -> Path:
    """Save a rows x cols grid of images (uint8 HxWx3 arrays or PIL images) with labels.

    Small images are upscaled with nearest neighbour to `cell` pixels so 32x32 toys stay crisp.
    Written whole or not at all (deradiff.io.atomic_write).
    """
    rows, cols = len(images), max(len(r) for r in images)
    left = 8 + 6 * max((len(s) for s in row_labels or []), default=0) if row_labels else 0
    top = 16 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (cell + 2), top + rows * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            canvas.paste(pil.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * (cell + 2), top + r * (cell + 2)))
        if row_labels:
            draw.text((4, top + r * (cell + 2) + cell // 2 - 5), row_labels[r], fill="black")
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * (cell + 2) + 4, 2), label, fill="black")
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG")
    return Path(path)
