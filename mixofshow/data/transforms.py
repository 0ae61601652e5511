"""Seeded image and caption transforms for concept datasets.

Every function that makes a random choice takes a ``torch.Generator`` (``None`` means torch's
global RNG), so a sample can be reproduced exactly from a seed.

Image transform, after Mix-of-Show's resize-crop-pad (its ``HumanResizeCropFinalV3``): instead of
resizing the short side to the resolution, cropping, and resizing again, the crop window is worked
out in the original image's pixels and resampled once (``Image.resize(box=...)``), which gives the
same geometry with a single interpolation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "resize_to_bucket",
    "DEFAULT_TEMPLATES",
    "uniform",
    "check_templates",
    "apply_template",
    "shuffle_caption_tags",
    "replace_tokens",
    "pad_to_square",
]

# Caption templates in the spirit of Mix-of-Show / textual inversion; "{}" receives the caption.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of one {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a rendition of a {}",
)


def uniform(generator: torch.Generator | None, n: int | None = None) -> float | torch.Tensor:
    """A float in [0, 1) (or ``n`` of them as a tensor) drawn from ``generator``."""
    if n is None:
        return float(torch.rand((), generator=generator))
    return torch.rand(n, generator=generator, dtype=torch.float64)


def check_templates(templates: Sequence[str | None] | None) -> tuple[str | None, ...]:
    """Validate templates: each is None (caption as is) or a string with exactly one ``{}``."""
    if templates is None:
        return (None,)
    if isinstance(templates, str):
        templates = (templates,)
    checked = tuple(templates)
    if not checked:
        raise ValueError("templates must not be empty (use None to keep captions as they are)")
    for t in checked:
        if t is not None and (not isinstance(t, str) or t.count("{}") != 1):
            raise ValueError(f"template {t!r} must be None or a string with exactly one '{{}}'")
    return checked


def apply_template(template: str | None, caption: str) -> str:
    """``template.format(caption)``; ``None`` returns the caption unchanged."""
    return caption if template is None else template.replace("{}", caption)


def shuffle_caption_tags(caption: str, generator: torch.Generator | None = None) -> str:
    """Shuffle the comma-separated tags of a caption, keeping the first tag first.

    Tags are stripped and re-joined with ``", "``; empty tags are dropped.
    """
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    if len(tags) <= 2:
        return ", ".join(tags)
    rest = tags[1:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join([tags[0]] + [rest[j] for j in order])


def replace_tokens(text: str, mapping: Mapping[str, str]) -> str:
    """Replace every key of ``mapping`` in ``text`` in one pass (longest key first)."""
    if not mapping:
        return text
    keys = sorted(mapping, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(k) for k in keys))
    return pattern.sub(lambda m: mapping[m.group(0)], text)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 PIL image -> float32 tensor (H,W[,C]) of 0..255, owning its memory."""
    return torch.from_numpy(np.array(img, dtype=np.float32, copy=True))


def pad_to_square(
    image: Image.Image,
    mask: Image.Image | None,
    resolution: int,
    generator: torch.Generator | None = None,
    crop_p: float = 0.5,
    flip_p: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop along the long side, fit into a square canvas, random flip.

    1. With probability ``crop_p`` keep a random window of the long side whose length is uniform
       between the short side (a square crop) and the full length; otherwise keep everything.
    2. Resize the window so its long side is ``round(resolution * s)``, ``s`` uniform in
       ``scale_range`` (bicubic for the image, bilinear for the mask).
    3. Paste it at a uniformly random position on a ``resolution`` square canvas: black image
       (-1), mask 0 on the padding.
    4. Flip horizontally with probability ``flip_p``.

    Returns ``pixel_values`` (3,R,R) float32 in [-1, 1] and ``mask`` (1,R,R) float32 in [0, 1]
    (1 = subject; all ones inside the pasted image when ``mask`` is None; soft at mask edges).
    """
    # Always draw the same number of values so the generator state after a sample does not
    # depend on the branch taken.
    u_crop, u_len, u_off, u_scale, u_x, u_y, u_flip = uniform(generator, 7).tolist()
    w, h = image.size
    short, long = min(w, h), max(w, h)

    # 1. crop window along the long side, in original pixels
    length = float(long)
    offset = 0.0
    if long > short and u_crop < crop_p:
        length = short + u_len * (long - short)
        offset = u_off * (long - length)
    if w >= h:
        box = (offset, 0.0, offset + length, float(h))
    else:
        box = (0.0, offset, float(w), offset + length)
    box_w, box_h = box[2] - box[0], box[3] - box[1]

    # 2. size of the window on the canvas
    lo, hi = scale_range
    target = max(1, round(resolution * (lo + u_scale * (hi - lo))))
    factor = target / max(box_w, box_h)
    out_w = min(resolution, max(1, round(box_w * factor)))
    out_h = min(resolution, max(1, round(box_h * factor)))
    resized = image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)

    # 3. paste on the canvas
    left = round(u_x * (resolution - out_w))
    top = round(u_y * (resolution - out_h))
    canvas = torch.full((3, resolution, resolution), -1.0)
    rgb = _to_tensor(resized).permute(2, 0, 1)
    canvas[:, top : top + out_h, left : left + out_w] = rgb / 127.5 - 1.0
    mask_canvas = torch.zeros((1, resolution, resolution))
    if mask is None:
        mask_canvas[:, top : top + out_h, left : left + out_w] = 1.0
    else:
        m = mask.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        mask_canvas[0, top : top + out_h, left : left + out_w] = _to_tensor(m) / 255.0

    # 4. flip
    if u_flip < flip_p:
        canvas = canvas.flip(-1)
        mask_canvas = mask_canvas.flip(-1)
    return canvas.clamp_(-1.0, 1.0).contiguous(), mask_canvas.clamp_(0.0, 1.0).contiguous()


def resize_to_bucket(
    image: Image.Image,
    mask: Image.Image | None,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    flip_p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aspect-ratio bucketing's transform (:mod:`mixofshow.data.buckets`): resize to exactly
    ``size`` = (w, h) (bicubic image, bilinear mask), no crop, no padding; flip with ``flip_p``.

    Returns ``pixel_values`` (3,h,w) in [-1, 1] and ``mask`` (1,h,w) in [0, 1] (all ones without a mask).
    """
    (u_flip,) = uniform(generator, 1).tolist()
    w, h = size
    pixels = _to_tensor(image.resize((w, h), Image.Resampling.BICUBIC)).permute(2, 0, 1) / 127.5 - 1.0
    if mask is None:
        weights = torch.ones((1, h, w))
    else:
        weights = _to_tensor(mask.resize((w, h), Image.Resampling.BILINEAR))[None] / 255.0
    if u_flip < flip_p:
        pixels, weights = pixels.flip(-1), weights.flip(-1)
    return pixels.clamp_(-1.0, 1.0).contiguous(), weights.clamp_(0.0, 1.0).contiguous()
