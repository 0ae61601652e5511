"""One PNG showing many samples: rows of equally sized images (validation writes one per step)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from mixofshow.utils.io import atomic_write_bytes

__all__ = ["image_grid", "save_grid"]


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, min_cell: int = 128) -> Image.Image:
    """Paste ``rows[i][j]`` at row i, column j on a white canvas, ``pad`` pixels apart.

    Cells are as large as the largest image; images smaller than ``min_cell`` pixels (the toy
    world's 64 x 64) are enlarged by a whole factor, pixels as squares, so that they and their
    labels can be read. Shorter rows leave their right end blank. With
    ``row_labels`` a left margin names each row; with ``col_labels`` a top band names each column
    (wrapped to the cell's width, at most three lines).
    """
    images = [im for row in rows for im in row]
    if not images:
        raise ValueError("image_grid: no images")
    factor = max(1, -(-min_cell // max(max(im.width, im.height) for im in images)))
    if factor > 1:
        rows = [[im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in row]
                for row in rows]
        images = [im for row in rows for im in row]
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    cols = max(len(row) for row in rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag")[3] + 2
    left = max((probe.textlength(t) for t in row_labels), default=0) + 2 * pad + 4 if row_labels else 0
    wrapped = [_wrap(probe, t, w) for t in col_labels] if col_labels else []
    top = max((len(lines) for lines in wrapped), default=0) * line_h + pad if wrapped else 0
    canvas = Image.new("RGB", (int(left) + cols * w + (cols + 1) * pad, int(top) + len(rows) * h + (len(rows) + 1) * pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x0, y0 = int(left), int(top)
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((x0 + pad + j * (w + pad), pad + k * line_h), line, fill="black")
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((pad + 2, y0 + pad + i * (h + pad) + h // 2 - line_h // 2), row_labels[i], fill="black")
        for j, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (x0 + pad + j * (w + pad), y0 + pad + i * (h + pad)))
    return canvas


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int = 3) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    return lines


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[Image.Image]], **labels) -> Path:
    """:func:`image_grid` (``row_labels``, ``col_labels``) written atomically as a PNG; returns ``path``."""
    buf = io.BytesIO()
    image_grid(rows, **labels).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
