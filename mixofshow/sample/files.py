"""Files of a sample folder: image names, PNG parameter chunks, ``index.json``, contact sheets.

``index.json`` (format ``mixofshow.samples/1``) has top-level ``format``, ``concept``,
``base_model`` and ``images``: one entry per image with ``file``, ``prompt`` (what the text
encoder read: a prompt longer than its window is cut, and the full text is kept in
``full_prompt``), ``seed``, ``negative_prompt``, ``steps``, ``guidance_scale``, ``scheduler``,
``lora_scale``, ``height``, ``width``, ``concept_sha256``, ``prompt_index``, ``image_index`` and, when used,
``regions``, ``region_strength``, ``region_steps`` and ``conditions``; ``grids`` lists the
contact sheets. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mixofshow.utils.io import atomic_write_text

__all__ = [
    "INDEX_FORMAT",
    "slugify",
    "image_filename",
    "grid_filename",
    "read_png_parameters",
    "png_bytes",
    "write_index",
    "contact_sheet",
]

INDEX_FORMAT = "mixofshow.samples/1"


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "prompt"


def image_filename(prompt_index: int, prompt: str, seed: int) -> str:
    return f"{prompt_index:03d}_{slugify(prompt)}_{seed}.png"


def grid_filename(prompt_index: int, prompt: str) -> str:
    return f"grids/{prompt_index:03d}_{slugify(prompt)}.png"


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a sample's PNG text chunk."""
    with Image.open(path) as img:
        text = img.text.get("parameters") if hasattr(img, "text") else None
    if text is None:
        raise ValueError(f"{path}: no 'parameters' text chunk (not written by mixofshow sample?)")
    return json.loads(text)


def png_bytes(image: Image.Image, params: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_index(
    out_dir: Path,
    images: Sequence[dict[str, Any]],
    concept: str | None,
    base_model: str,
    grids: Sequence[dict[str, Any]] = (),
) -> None:
    doc: dict[str, Any] = {"format": INDEX_FORMAT, "concept": concept, "base_model": base_model, "images": list(images)}
    if grids:
        doc["grids"] = list(grids)
    atomic_write_text(out_dir / "index.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def contact_sheet(paths: Sequence[Path], columns: int | None = None, pad: int = 2) -> Image.Image:
    """The images at ``paths`` tiled row by row (about square; white gaps of ``pad`` pixels)."""
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    sheet = Image.new("RGB", (columns * w + (columns - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for n, img in enumerate(images):
        sheet.paste(img, ((n % columns) * (w + pad), (n // columns) * (h + pad)))
    return sheet

