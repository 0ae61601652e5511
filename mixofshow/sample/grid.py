"""One PNG showing many samples: rows of equally sized images (validation writes one per step)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mixofshow.utils.io import atomic_write_bytes

__all__ = ["image_grid", "save_grid"]


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Paste ``rows[i][j]`` at row i, column j on a white canvas, ``pad`` pixels apart.

    Cells are as large as the largest image; shorter rows leave their right end blank.
    """
    images = [im for row in rows for im in row]
    if not images:
        raise ValueError("image_grid: no images")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (cols * w + (cols + 1) * pad, len(rows) * h + (len(rows) + 1) * pad), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[Image.Image]]) -> Path:
    """:func:`image_grid` written atomically as a PNG; returns ``path``."""
    buf = io.BytesIO()
    image_grid(rows).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
