"""Uploaded training images, captions and masks: validated, then written as a concept folder.

Nothing an upload claims is trusted: the type comes from the content (PIL's decoder, not the
file name), sizes and counts are bounded, the pixel count is checked from the header before
any decoding (a decompression bomb is refused without being expanded), and every image is
decoded fully and re-encoded as PNG into ``<runs dir>/uploads/<id>/`` in the layout of
``datasets/README.md`` (``image/``, ``caption/``, ``mask/`` and a concept-list JSON).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mixofshow.utils.io import atomic_write_text

__all__ = ["LIMITS", "UploadError", "UploadLimits", "check_image", "save_concept_upload", "save_condition_upload"]

TOKEN = "<TOK>"  # the placeholder captions use (datasets/README.md)
_FORMATS = {"PNG", "JPEG", "WEBP", "BMP"}


class UploadError(ValueError):
    """An upload was refused; the message names the file and the rule it broke."""


@dataclass(frozen=True)
class UploadLimits:
    max_files: int = 64  # images per concept
    max_bytes: int = 20 * 1024 * 1024  # per file (also the server's max_file_size)
    max_pixels: int = 4096 * 4096  # width x height, checked before decoding
    max_caption_bytes: int = 4096


LIMITS = UploadLimits()


def _name(path: str | os.PathLike) -> str:
    return Path(path).name


def check_image(path: str | os.PathLike, limits: UploadLimits = LIMITS, mode: str = "RGB") -> Image.Image:
    """Open, bound and fully decode one uploaded image; ``UploadError`` says why it is refused."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"{path.name}: {size / 2**20:.1f} MB is over the {limits.max_bytes / 2**20:.0f} MB limit")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        raise UploadError(f"{path.name}: too many pixels (over {limits.max_pixels} in total)") from None
    except Exception:  # PIL raises several types for non-images
        raise UploadError(f"{path.name}: not an image (expected PNG, JPEG, WEBP or BMP content)") from None
    with img:
        if img.format not in _FORMATS:
            raise UploadError(f"{path.name}: {img.format} images are not accepted (PNG, JPEG, WEBP or BMP)")
        w, h = img.size
        if w * h > limits.max_pixels or w < 8 or h < 8:
            raise UploadError(f"{path.name}: {w}x{h} pixels; expected between 8x8 and "
                              f"{limits.max_pixels} pixels in total")
        try:
            img.load()
            return img.convert(mode)
        except Exception as err:
            raise UploadError(f"{path.name}: the image is truncated or corrupt ({err})") from None


def _stem_map(files: list[str], kind: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in files:
        stem = Path(f).stem
        if stem in out:
            raise UploadError(f"two {kind} files are named {stem!r}; names must be unique")
        out[stem] = f
    return out


def save_concept_upload(
    images: list[str],
    captions: list[str] | None,
    masks: list[str] | None,
    uploads_dir: str | os.PathLike,
    limits: UploadLimits = LIMITS,
) -> Path:
    """Validate an upload and write it as a concept folder; returns its concept-list JSON.

    Captions (``NAME.txt``) and masks (``NAME.png``, white = subject) pair with the image of the
    same name; an image without a caption is captioned ``<TOK>``, one without a mask trains on
    the whole image. A caption that does not name ``<TOK>`` gets it prepended.
    """
    images, captions, masks = list(images or []), list(captions or []), list(masks or [])
    if not images:
        raise UploadError("upload at least one training image")
    if len(images) > limits.max_files or len(masks) > limits.max_files or len(captions) > limits.max_files:
        raise UploadError(f"at most {limits.max_files} images (and as many captions and masks) per concept")
    by_stem = _stem_map(images, "image")
    caption_map, mask_map = _stem_map(captions, "caption"), _stem_map(masks, "mask")
    for kind, table in (("caption", caption_map), ("mask", mask_map)):
        orphans = sorted(set(table) - set(by_stem))
        if orphans:
            raise UploadError(f"{kind} {orphans[0]!r} has no image of the same name")
    decoded = {stem: check_image(f, limits) for stem, f in by_stem.items()}
    decoded_masks = {stem: check_image(f, limits, mode="L") for stem, f in mask_map.items()}
    for stem, mask in decoded_masks.items():
        if mask.size != decoded[stem].size:
            raise UploadError(f"mask {stem!r} is {mask.size[0]}x{mask.size[1]}, its image "
                              f"{decoded[stem].size[0]}x{decoded[stem].size[1]}")
    texts = {}
    for stem, f in caption_map.items():
        raw = Path(f).read_bytes()
        if len(raw) > limits.max_caption_bytes:
            raise UploadError(f"{_name(f)}: captions are limited to {limits.max_caption_bytes} bytes")
        try:
            text = raw.decode("utf-8").strip().splitlines()
        except UnicodeDecodeError:
            raise UploadError(f"{_name(f)}: a caption must be UTF-8 text") from None
        line = text[0].strip() if text else ""
        texts[stem] = line if TOKEN in line else f"{TOKEN}, {line}".rstrip(", ")

    root = Path(uploads_dir) / uuid.uuid4().hex[:12]
    for sub in ("image", "caption", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, img in decoded.items():
        img.save(root / "image" / f"{stem}.png")
        atomic_write_text(root / "caption" / f"{stem}.txt", texts.get(stem, TOKEN) + "\n")
        mask = decoded_masks.get(stem) or Image.new("L", img.size, 255)
        mask.save(root / "mask" / f"{stem}.png")
    concept_list = root / "concept.json"
    atomic_write_text(concept_list, json.dumps([{
        "instance_prompt": TOKEN, "instance_data_dir": "image", "caption_dir": "caption", "mask_dir": "mask",
    }], indent=2))
    return concept_list


def save_condition_upload(image: str | os.PathLike, uploads_dir: str | os.PathLike,
                          limits: UploadLimits = LIMITS) -> Path:
    """Validate one T2I-Adapter condition image and re-encode it as ``<uploads_dir>/<id>/condition.png``."""
    img = check_image(image, limits)
    root = Path(uploads_dir) / uuid.uuid4().hex[:12]
    root.mkdir(parents=True, exist_ok=True)
    out = root / "condition.png"
    img.save(out)
    return out
