"""Editing a concept folder (``image/``, ``caption/``, ``mask/``): list it, show masks, remove images.

What a trainer GUI's dataset panel does, as library functions the app calls: every rule about
the folder layout stays here (``mixofshow.data.concept`` reads the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mixofshow.data.captions import read_captions
from mixofshow.data.concept import IMAGE_EXTENSIONS

__all__ = ["DatasetRow", "list_dataset", "mask_overlay", "remove_image"]


@dataclass(frozen=True)
class DatasetRow:
    stem: str
    image: Path
    caption: str  # first line of caption/NAME.txt ('' if none)
    mask: Path | None  # mask/NAME.png if there is one


def list_dataset(folder: str | Path) -> list[DatasetRow]:
    """The images of a concept folder with their captions and masks, by name."""
    folder = Path(folder)
    if not (folder / "image").is_dir():
        raise ValueError(f"{folder}: not a concept folder (expected image/, caption/, mask/ inside)")
    images = sorted(p for p in (folder / "image").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    captions = read_captions(images, folder / "caption")
    rows = []
    for image, caption in zip(images, captions):
        mask = folder / "mask" / f"{image.stem}.png"
        rows.append(DatasetRow(image.stem, image, caption, mask if mask.is_file() else None))
    return rows


def mask_overlay(image: str | Path, mask: str | Path | None, size: int = 160) -> Image.Image:
    """A thumbnail with everything outside the mask dimmed and tinted (what the masked loss ignores)."""
    with Image.open(image) as img:
        rgb = img.convert("RGB")
    rgb.thumbnail((size, size))
    if mask is None:
        return rgb
    with Image.open(mask) as m:
        weight = np.asarray(m.convert("L").resize(rgb.size, Image.Resampling.BILINEAR), np.float32)[..., None] / 255.0
    tint = np.array([40, 40, 120], np.float32)
    pixels = np.asarray(rgb, np.float32)
    shown = weight * pixels + (1 - weight) * (0.35 * pixels + 0.65 * tint)
    return Image.fromarray(shown.round().clip(0, 255).astype(np.uint8))


def remove_image(folder: str | Path, stem: str) -> list[Path]:
    """Delete an image with its caption and mask; returns the files removed."""
    folder = Path(folder)
    rows = {r.stem: r for r in list_dataset(folder)}
    if stem not in rows:
        raise ValueError(f"{folder}: no image named {stem!r} (images: {', '.join(sorted(rows)) or 'none'})")
    if len(rows) == 1:
        raise ValueError(f"{folder}: {stem!r} is the last image; a concept needs at least one")
    removed = []
    for path in (rows[stem].image, folder / "caption" / f"{stem}.txt", rows[stem].mask):
        if path is not None and path.is_file():
            path.unlink()
            removed.append(path)
    return removed
