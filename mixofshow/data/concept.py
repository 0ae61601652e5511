"""Concept datasets in the Mix-of-Show layout: images, captions and subject masks.

A concept folder holds ``image/`` (jpg/png), ``caption/<stem>.txt`` (first line, e.g.
``<TOK>, glasses, upper body``) and optionally ``mask/<stem>.png`` (grayscale, white = subject).
A concept-list JSON names such folders::

    [{"instance_prompt": "<TOK>", "instance_data_dir": "robot/image",
      "caption_dir": "robot/caption", "mask_dir": "robot/mask"}]

Relative paths are resolved against the JSON's folder; ``caption_dir`` and ``mask_dir`` are
optional (without captions the caption is the instance prompt). A ``replace_mapping`` such as
``{"<TOK>": "<robot1> <robot2>"}`` turns the placeholder into the concept's two words.

Everything that can be wrong with the files is checked when the dataset is built, and raises
:class:`ConceptDataError` naming the file: among others an image without its caption or mask
(when the folder is given) and a caption or mask without its image. Images and masks are decoded once at construction (this
is also the corruption check) and kept in memory as PIL images when ``cache_images`` is true (the
default: concept sets are a few dozen small pictures); otherwise they are re-read on every access.

All randomness of :meth:`ConceptDataset.get` comes from the ``torch.Generator`` it is given, so a
training loop can reproduce any step by seeding one generator per step.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from mixofshow.utils.io import read_json

from .buckets import nearest_bucket
from .transforms import (
    DEFAULT_TEMPLATES,
    apply_template,
    check_templates,
    pad_to_square,
    replace_tokens,
    resize_to_bucket,
    shuffle_caption_tags,
    uniform,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ConceptDataError",
    "ConceptSource",
    "ConceptSample",
    "ConceptDataset",
    "scan_concept",
    "load_concept_list",
    "collate",
    "load_prompt_list",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SOURCE_KEYS = ("instance_prompt", "instance_data_dir", "caption_dir", "mask_dir")
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


class ConceptDataError(ValueError):
    """A concept folder, caption, mask, concept list or prompt file is not as expected."""


@dataclass(frozen=True)
class ConceptSource:
    """One entry of a concept list: where a concept's images, captions and masks live."""

    instance_prompt: str  # placeholder written in the captions, e.g. "<TOK>"
    instance_data_dir: Path  # folder of images
    caption_dir: Path | None = None  # folder of <stem>.txt; None: caption = instance_prompt
    mask_dir: Path | None = None  # folder of <stem>.png grayscale masks; None: no masks


@dataclass(frozen=True)
class ConceptSample:
    """One training image with its caption (raw, before templates) and optional mask."""

    image_path: Path
    caption: str
    mask_path: Path | None
    instance_prompt: str
    caption_path: Path | None = None  # None: the caption is the instance prompt


# ----------------------------------------------------------------------------- concept lists


def _resolve(base: Path, value: Any, key: str, path: Path, index: int) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConceptDataError(
            f"{path}: entry {index}: '{key}' must be a non-empty path string, got {value!r}"
        )
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def load_concept_list(path: str | os.PathLike[str]) -> list[ConceptSource]:
    """Read a Mix-of-Show concept-list JSON (a list of dicts); relative paths use its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConceptDataError(f"concept list {path} does not exist (expected a JSON file)")
    data = read_json(path, "concept list ", ConceptDataError)
    if not isinstance(data, list) or not data:
        raise ConceptDataError(
            f"concept list {path} must be a non-empty JSON list of objects with keys "
            f"{', '.join(_SOURCE_KEYS)}"
        )
    base = path.parent
    sources: list[ConceptSource] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ConceptDataError(f"{path}: entry {i} must be an object, got {entry!r}")
        unknown = sorted(set(entry) - set(_SOURCE_KEYS))
        if unknown:
            raise ConceptDataError(
                f"{path}: entry {i}: unknown key(s) {unknown}; expected {list(_SOURCE_KEYS)}"
            )
        for key in ("instance_prompt", "instance_data_dir"):
            if key not in entry:
                raise ConceptDataError(f"{path}: entry {i}: missing required key '{key}'")
        prompt = entry["instance_prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConceptDataError(
                f"{path}: entry {i}: 'instance_prompt' must be a non-empty string, got {prompt!r}"
            )
        optional = {
            key: _resolve(base, entry[key], key, path, i) if entry.get(key) is not None else None
            for key in ("caption_dir", "mask_dir")
        }
        sources.append(
            ConceptSource(
                instance_prompt=prompt.strip(),
                instance_data_dir=_resolve(
                    base, entry["instance_data_dir"], "instance_data_dir", path, i
                ),
                **optional,
            )
        )
    return sources


# ----------------------------------------------------------------------------- scanning


def _read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConceptDataError(f"caption {path} cannot be read as UTF-8 text: {err}") from err
    first = text.splitlines()[0].strip() if text.strip() else ""
    if not first:
        raise ConceptDataError(f"caption {path} is empty (expected a caption on its first line)")
    return first


def scan_concept(source: ConceptSource) -> list[ConceptSample]:
    """List a concept's images with their captions and masks; checks the files exist.

    Images are not decoded here (see :class:`ConceptDataset`); captions are read.
    """
    image_dir = source.instance_data_dir
    if not image_dir.is_dir():
        raise ConceptDataError(f"image folder {image_dir} does not exist (instance_data_dir)")
    for key, folder in (("caption_dir", source.caption_dir), ("mask_dir", source.mask_dir)):
        if folder is not None and not folder.is_dir():
            raise ConceptDataError(f"{key} folder {folder} does not exist")
    images = sorted(
        p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise ConceptDataError(
            f"image folder {image_dir} holds no images (expected {', '.join(IMAGE_EXTENSIONS)})"
        )
    stems: dict[str, Path] = {}
    samples: list[ConceptSample] = []
    for image_path in images:
        if image_path.stem in stems:
            raise ConceptDataError(
                f"images {stems[image_path.stem]} and {image_path} share the name "
                f"'{image_path.stem}', so their caption and mask would be ambiguous"
            )
        stems[image_path.stem] = image_path
        if source.caption_dir is not None:
            caption_path = source.caption_dir / f"{image_path.stem}.txt"
            if not caption_path.is_file():
                raise ConceptDataError(
                    f"image {image_path} has no caption: expected {caption_path}"
                )
            caption = _read_caption(caption_path)
            if source.instance_prompt not in caption:
                raise ConceptDataError(
                    f"caption {caption_path} ({caption!r}) does not contain the instance "
                    f"token {source.instance_prompt!r}"
                )
        else:
            caption_path, caption = None, source.instance_prompt
        mask_path = None
        if source.mask_dir is not None:
            mask_path = source.mask_dir / f"{image_path.stem}.png"
            if not mask_path.is_file():
                raise ConceptDataError(f"image {image_path} has no mask: expected {mask_path}")
        samples.append(
            ConceptSample(image_path, caption, mask_path, source.instance_prompt, caption_path)
        )
    _check_orphans(source, stems)
    return samples


def _check_orphans(source: ConceptSource, stems: Mapping[str, Path]) -> None:
    """A caption or mask whose image is missing means a lost training image: an error."""
    for kind, folder, suffixes in (
        ("caption", source.caption_dir, (".txt",)),
        ("mask", source.mask_dir, IMAGE_EXTENSIONS),
    ):
        if folder is None:
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
                if path.stem not in stems:
                    raise ConceptDataError(
                        f"{kind} {path} has no image: expected "
                        f"{source.instance_data_dir / path.stem}{{{','.join(IMAGE_EXTENSIONS)}}}"
                    )


def _open_image(path: Path, mode: str) -> Image.Image:
    """Decode an image fully (EXIF orientation applied for RGB photos)."""
    try:
        with Image.open(path) as img:
            img.load()
            if mode == "RGB":
                img = ImageOps.exif_transpose(img)
            return img.convert(mode)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        kind = "image" if mode == "RGB" else "mask"
        raise ConceptDataError(f"{kind} {path} is corrupt or not an image: {err}") from err


def _check_mapping(replace_mapping: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(replace_mapping, Mapping) or not replace_mapping:
        raise ConceptDataError(
            "replace_mapping must be a non-empty mapping like {'<TOK>': '<robot1> <robot2>'}, "
            f"got {replace_mapping!r}"
        )
    for key, value in replace_mapping.items():
        if not all(isinstance(x, str) and x.strip() for x in (key, value)):
            raise ConceptDataError(
                f"replace_mapping entry {key!r}: {value!r} must map a non-empty string to a "
                "non-empty string"
            )
    return dict(replace_mapping)


# ----------------------------------------------------------------------------- dataset


class ConceptDataset(torch.utils.data.Dataset):
    """Images, masks and template-wrapped prompts of one or more concepts.

    With ``buckets`` (sizes ``(w, h)``, :mod:`mixofshow.data.buckets`) each image is resized to
    the bucket nearest its aspect ratio and flipped with ``flip_p``; otherwise, the image transform
    (see :func:`mixofshow.data.transforms.pad_to_square`): with probability
    ``crop_p`` a random window is cut along the long side (from the whole length down to a
    square); the result is resized so its long side is ``resolution * scale`` (scale uniform in
    ``scale_range``), pasted at a random place on a black ``resolution`` square (padding gets
    mask 0) and flipped horizontally with probability ``flip_p``.

    Prompt: the caption's tags (comma-separated) are shuffled keeping the first one, wrapped in a
    random template (``None`` in ``templates`` means "as is"), and the placeholders are replaced
    through ``replace_mapping``.
    """

    def __init__(
        self,
        sources: Sequence[ConceptSource] | str | os.PathLike[str],
        replace_mapping: Mapping[str, str],
        resolution: int,
        templates: Sequence[str | None] | None = DEFAULT_TEMPLATES,
        shuffle_tags: bool = True,
        flip_p: float = 0.5,
        use_masks: bool = True,
        repeats: int = 1,
        crop_p: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.0),
        cache_images: bool = True,
        buckets: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = load_concept_list(sources)
        if not sources:
            raise ConceptDataError("no concept sources given (expected at least one)")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ConceptDataError(f"resolution must be a positive int, got {resolution!r}")
        for name, p in (("flip_p", flip_p), ("crop_p", crop_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise ConceptDataError(f"{name} must be in [0, 1], got {p!r}")
        lo, hi = scale_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ConceptDataError(
                f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range!r}"
            )
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConceptDataError(f"repeats must be a positive int, got {repeats!r}")
        try:
            self.templates: tuple[str | None, ...] = check_templates(templates)
        except ValueError as err:
            raise ConceptDataError(str(err)) from err
        self.replace_mapping = _check_mapping(replace_mapping)
        self.resolution = resolution
        self.shuffle_tags = shuffle_tags
        self.flip_p = float(flip_p)
        self.crop_p = float(crop_p)
        self.scale_range = (float(lo), float(hi))
        self.use_masks = use_masks
        self.repeats = repeats
        self.cache_images = cache_images

        self.samples: list[ConceptSample] = []
        for source in sources:
            if source.instance_prompt not in self.replace_mapping:
                raise ConceptDataError(
                    f"instance token {source.instance_prompt!r} of {source.instance_data_dir} is "
                    f"missing from replace_mapping (keys: {sorted(self.replace_mapping)})"
                )
            self.samples.extend(scan_concept(source))
        known = set(self.replace_mapping)
        for value in self.replace_mapping.values():
            known.update(value.split())
        self._images: list[Image.Image | None] = []
        self._masks: list[Image.Image | None] = []
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self.sample_bucket: list[int] = []  # per image: its bucket (aspect-ratio bucketing only)
        for sample in self.samples:
            unknown = sorted(set(_PLACEHOLDER.findall(sample.caption)) - known)
            if unknown:
                where = sample.caption_path or f"instance prompt of {sample.image_path}"
                raise ConceptDataError(
                    f"caption {where} ({sample.caption!r}) uses placeholder(s) {unknown} "
                    f"missing from replace_mapping (keys: {sorted(self.replace_mapping)})"
                )
            image, mask = self._decode(sample)
            self._images.append(image if cache_images else None)
            self._masks.append(mask if cache_images else None)
            if self.buckets:
                self.sample_bucket.append(nearest_bucket(*image.size, self.buckets))
        logger.info(
            "concept dataset: %d images from %d source(s), resolution %d, repeats %d",
            len(self.samples), len(sources), resolution, repeats,
        )

    def _decode(self, sample: ConceptSample) -> tuple[Image.Image, Image.Image | None]:
        image = _open_image(sample.image_path, "RGB")
        if not self.use_masks or sample.mask_path is None:
            return image, None
        mask = _open_image(sample.mask_path, "L")
        if mask.size != image.size:
            raise ConceptDataError(
                f"mask {sample.mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{sample.image_path} is {image.size[0]}x{image.size[1]} (expected the same size)"
            )
        if mask.getextrema()[1] == 0:  # the masked loss would train on nothing, silently (loss 0.0)
            raise ConceptDataError(
                f"mask {sample.mask_path} is all black (no subject pixel) for image {sample.image_path}: "
                "expected white where the subject is; fix the mask, or train without masks (data.use_masks: false)"
            )
        return image, mask

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def bucket_of(self) -> list[int]:
        """The bucket of every dataset index (with repeats); bucketing only."""
        if not self.buckets:
            raise ValueError("the dataset was built without buckets")
        return [self.sample_bucket[k % len(self.samples)] for k in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, None)

    def prompt_for(self, caption: str, generator: torch.Generator | None = None) -> str:
        """Shuffle tags (first kept), wrap in a random template, replace placeholders."""
        if self.shuffle_tags:
            caption = shuffle_caption_tags(caption, generator)
        choice = min(int(uniform(generator) * len(self.templates)), len(self.templates) - 1)
        return replace_tokens(apply_template(self.templates[choice], caption), self.replace_mapping)

    def get(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """One sample; every random choice is drawn from ``generator`` (global RNG if None)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of length {len(self)}")
        i = index % len(self.samples)
        sample = self.samples[i]
        image, mask = self._images[i], self._masks[i]
        if image is None:
            image, mask = self._decode(sample)
        if self.buckets:
            size = self.buckets[self.sample_bucket[i]]
            pixel_values, pixel_mask = resize_to_bucket(image, mask, size, generator, self.flip_p)
        else:
            pixel_values, pixel_mask = pad_to_square(
                image, mask, self.resolution, generator,
                crop_p=self.crop_p, flip_p=self.flip_p, scale_range=self.scale_range,
            )
        return {
            "pixel_values": pixel_values,
            "mask": pixel_mask,
            "prompt": self.prompt_for(sample.caption, generator),
            "path": str(sample.image_path),
        }


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: ``pixel_values`` (B,3,R,R), ``mask`` (B,1,R,R), ``prompt``/``path`` lists."""
    if not samples:
        raise ValueError("collate() needs at least one sample")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]).contiguous(),
        "mask": torch.stack([s["mask"] for s in samples]).contiguous(),
        "prompt": [s["prompt"] for s in samples],
        "path": [s["path"] for s in samples],
    }


def load_prompt_list(path: str | os.PathLike[str]) -> list[str]:
    """Prompts of a validation prompt file: one a line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConceptDataError(f"prompt file {path} does not exist (expected a text file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConceptDataError(f"prompt file {path} cannot be read as UTF-8 text: {err}") from err
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ConceptDataError(f"prompt file {path} holds no prompts (expected one per line)")
    return prompts
