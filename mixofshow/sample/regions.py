"""Regions of a regionally controlled sample: a prompt, a negative prompt and a box or mask each.

A region file (YAML or JSON) is a list of regions, or a mapping with ``regions:`` (and optionally
``conditions:``, see :mod:`mixofshow.sample.adapters`)::

    regions:
      - prompt: "a photo of <potter1> <potter2>, standing"
        negative_prompt: "blurry"          # optional; default: the global negative prompt
        box: [0, 0, 512, 256]              # top, left, bottom, right: pixels ...
      - prompt: "a photo of <hermione1> <hermione2>"
        box: [0.0, 0.5, 1.0, 1.0]          # ... or fractions, when all four are in [0, 1]
      - prompt: "a red umbrella"
        mask: umbrella.png                 # or a single-channel PNG of the image's size

Mix-of-Show's own region string is accepted too (``"[prompt]-*-[negative]-*-[top, left, bottom,
right]|..."``, boxes in pixels; an empty box ``[]`` is the whole image). The format is described
in the README ("Regional sampling").

At a feature map of ``h x w``, a box covers rows ``ceil(top * h / H) .. floor(bottom * h / H)``
(and likewise columns), as Mix-of-Show computes it; a mask is area-averaged to ``h x w``.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Region",
    "load_region_file",
    "read_yaml_file",
    "parse_region_string",
    "regions_from_data",
    "check_regions",
    "region_maps",
]

_EPS = 1e-9  # fractions such as 0.3 * 10 must not round up to the next row


@dataclass
class Region:
    prompt: str  # encoded layer-wise, like the global prompt
    negative_prompt: str | None = None  # None: the global negative prompt
    box: tuple[float, float, float, float] | None = None  # top, left, bottom, right (pixels or fractions)
    mask: str | Path | None = None  # single-channel PNG, same size as the image; instead of a box

    def label(self, index: int) -> str:
        return f"region {index} ({self.prompt!r})"


def parse_region_string(text: str) -> list[Region]:
    """Mix-of-Show's ``"[prompt]-*-[negative]-*-[top, left, bottom, right]|..."`` (pixels)."""
    regions = []
    for i, part in enumerate(p for p in text.split("|") if p.strip()):
        pieces = [p.strip() for p in part.split("-*-")]
        if len(pieces) != 3:
            raise ValueError(
                f"region {i}: {part!r} is not '[prompt]-*-[negative prompt]-*-[top, left, bottom, right]'"
            )
        prompt, negative = (_unbracket(p, i) for p in pieces[:2])
        try:
            box = ast.literal_eval(pieces[2])
        except (ValueError, SyntaxError):
            raise ValueError(f"region {i} ({prompt!r}): box {pieces[2]!r} is not a list of 4 numbers") from None
        region = Region(prompt=prompt, negative_prompt=negative)
        region.box = None if box in ([], ()) else _box(box, region.label(i))
        regions.append(region)
    if not regions:
        raise ValueError(f"region string {text!r} holds no region")
    return regions


def _unbracket(text: str, index: int) -> str:
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"region {index}: {text!r} must be written in square brackets, e.g. [a dog]")
    return text[1:-1].strip()


def _box(value: Any, label: str) -> tuple[float, float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise ValueError(f"{label}: box {value!r} is not [top, left, bottom, right] (4 finite numbers)")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def regions_from_data(data: Any, where: str, base_dir: str | os.PathLike | None = None) -> list[Region]:
    """Regions from parsed YAML/JSON: a list of mappings, or a Mix-of-Show region string.

    Relative mask paths are resolved against ``base_dir`` (the region file's folder).
    """
    if isinstance(data, str):
        return parse_region_string(data)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: regions must be a non-empty list (or a Mix-of-Show region string)")
    regions = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: region {i} must be a mapping with prompt and box or mask, got {item!r}")
        unknown = sorted(set(item) - {"prompt", "negative_prompt", "box", "mask"})
        prompt = item.get("prompt")
        label = f"{where}: region {i} ({prompt!r})"
        if unknown:
            raise ValueError(f"{label}: unknown key {unknown[0]!r} (expected prompt, negative_prompt, box, mask)")
        if ("box" in item) == ("mask" in item):
            raise ValueError(f"{label}: give exactly one of box and mask")
        region = Region(prompt=prompt, negative_prompt=item.get("negative_prompt"))
        if "box" in item:
            region.box = _box(item["box"], label)
        else:
            mask = Path(str(item["mask"]))
            region.mask = mask if mask.is_absolute() or base_dir is None else Path(base_dir) / mask
        regions.append(region)
    return regions


def read_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of a YAML or JSON file; clear errors naming ``what`` and the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (expected YAML or JSON)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{what} {path}: cannot be read as YAML/JSON ({err})") from None


def load_region_file(path: str | os.PathLike) -> tuple[list[Region], list[Any]]:
    """(regions, raw condition entries) of a YAML/JSON region file."""
    path = Path(path)
    data = read_yaml_file(path, "region file")
    conditions: list[Any] = []
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"regions", "conditions"})
        if unknown:
            raise ValueError(f"region file {path}: unknown key {unknown[0]!r} (expected regions, conditions)")
        conditions = data.get("conditions") or []
        data = data.get("regions")
    return regions_from_data(data, f"region file {path}", path.parent), conditions


def _pixel_box(box: Sequence[float], height: int, width: int) -> tuple[float, float, float, float]:
    if all(0.0 <= v <= 1.0 for v in box):
        return box[0] * height, box[1] * width, box[2] * height, box[3] * width
    return tuple(box)  # type: ignore[return-value]


def check_regions(regions: Sequence[Region], height: int, width: int) -> None:
    """Raise ``ValueError`` naming the region (index and prompt) and the bad value."""
    for i, region in enumerate(regions):
        label = region.label(i)
        if not isinstance(region.prompt, str) or not region.prompt.strip():
            raise ValueError(f"{label}: empty prompt (every region needs a prompt)")
        if region.negative_prompt is not None and not isinstance(region.negative_prompt, str):
            raise ValueError(f"{label}: negative_prompt {region.negative_prompt!r} is not a string")
        if region.box is not None and region.mask is not None:
            raise ValueError(f"{label}: give a box or a mask, not both")
        if region.mask is not None:
            _load_mask(region, i, height, width)
            continue
        box = (0.0, 0.0, 1.0, 1.0) if region.box is None else _box(region.box, label)
        top, left, bottom, right = _pixel_box(box, height, width)
        if bottom <= top or right <= left:
            raise ValueError(f"{label}: box {list(region.box)} is empty or inverted (need top < bottom, left < right)")
        if top < 0 or left < 0 or bottom > height + _EPS or right > width + _EPS:
            raise ValueError(
                f"{label}: box {list(region.box)} lies outside the {height} x {width} image "
                "(top, left, bottom, right in pixels, or fractions in [0, 1])"
            )


def _load_mask(region: Region, index: int, height: int, width: int):
    import numpy as np
    import torch
    from PIL import Image

    label = region.label(index)
    path = Path(region.mask)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: mask {path} does not exist")
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if mode not in ("1", "L", "I", "I;16", "F"):
                raise ValueError(
                    f"{label}: mask {path} has mode {mode} ({len(img.getbands())} channels); "
                    "expected a single-channel (grayscale) PNG"
                )
            array = np.asarray(img.convert("F"), dtype=np.float32)
    except OSError as err:
        raise ValueError(f"{label}: mask {path} is not a readable image ({err})") from None
    if size != (width, height):
        raise ValueError(f"{label}: mask {path} is {size[0]} x {size[1]} (w x h), the image is {width} x {height}")
    peak = {"1": 1.0, "L": 255.0, "I;16": 65535.0}.get(mode, max(float(array.max()), 1.0))
    mask = torch.from_numpy(array / peak).clamp(0, 1)
    if float(mask.max()) <= 0:
        raise ValueError(f"{label}: mask {path} is empty (all black)")
    return mask


def region_maps(
    regions: Sequence[Region], height: int, width: int
) -> Callable[[int, int], Any]:
    """``maps(h, w)`` -> (R, h, w) float tensor of each region's coverage of an ``h x w`` feature map."""
    import torch
    import torch.nn.functional as F

    check_regions(regions, height, width)
    masks = [_load_mask(r, i, height, width) if r.mask is not None else None for i, r in enumerate(regions)]
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def maps(h: int, w: int) -> torch.Tensor:
        if (h, w) in cache:
            return cache[(h, w)]
        out = torch.zeros(len(regions), h, w)
        for r, (region, mask) in enumerate(zip(regions, masks)):
            if mask is not None:
                out[r] = F.adaptive_avg_pool2d(mask[None, None], (h, w))[0, 0]
                continue
            box = (0.0, 0.0, 1.0, 1.0) if region.box is None else region.box
            top, left, bottom, right = _pixel_box(box, height, width)
            r0, r1 = math.ceil(top * h / height - _EPS), math.floor(bottom * h / height + _EPS)
            c0, c1 = math.ceil(left * w / width - _EPS), math.floor(right * w / width + _EPS)
            out[r, r0:r1, c0:c1] = 1.0
        cache[(h, w)] = out
        return out

    return maps
