"""Captions for a concept's images: edit them, fill them from a template, or caption with a local model.

A concept folder holds ``image/NAME.ext`` and the caption ``caption/NAME.txt`` the trainer reads
(first line; ``mixofshow.data.concept``). Every write here is atomic.

- :func:`template_captions` always works: ``"<TOK>, {class word}"`` (or any template with
  ``{stem}`` and ``{class_word}``) for each image.
- :func:`model_captions` runs an image-captioning model from a local folder (transformers BLIP
  or Florence-2, as kohya_ss and fluxgym offer) and puts ``<TOK>`` in front. Nothing is
  downloaded: a folder that is missing or not such a model is a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixofshow.utils.io import atomic_write_text

__all__ = ["CaptionError", "caption_path", "read_captions", "write_caption", "template_captions", "model_captions"]


class CaptionError(ValueError):
    """A caption could not be made or written; the message names the file or model folder."""


def caption_path(image: str | Path, caption_dir: str | Path) -> Path:
    return Path(caption_dir) / f"{Path(image).stem}.txt"


def read_captions(images: Sequence[str | Path], caption_dir: str | Path) -> list[str]:
    """The first line of each image's caption file ('' where there is none)."""
    out = []
    for image in images:
        path = caption_path(image, caption_dir)
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        out.append(lines[0].strip() if lines else "")
    return out


def write_caption(image: str | Path, caption_dir: str | Path, caption: str) -> Path:
    """Write ``caption`` (one line) as the image's ``NAME.txt``, atomically."""
    text = " ".join(str(caption).split())
    if not text:
        raise CaptionError(f"{Path(image).name}: an empty caption; write at least the concept placeholder (<TOK>)")
    path = caption_path(image, caption_dir)
    atomic_write_text(path, text + "\n")
    return path


def template_captions(images: Sequence[str | Path], caption_dir: str | Path, template: str = "<TOK>, {class_word}",
                      class_word: str = "") -> list[Path]:
    """Caption every image from ``template`` (``{stem}``, ``{class_word}``); returns the files written."""
    out = []
    for image in images:
        text = template.format(stem=Path(image).stem, class_word=class_word).strip().strip(",").strip()
        out.append(write_caption(image, caption_dir, text or "<TOK>"))
    return out


def model_captions(images: Sequence[str | Path], caption_dir: str | Path, model_dir: str | Path,
                   prefix: str = "<TOK>, ", max_new_tokens: int = 30) -> list[Path]:
    """Caption every image with the BLIP or Florence-2 model in ``model_dir`` (local only)."""
    import json

    folder = Path(model_dir)
    config = folder / "config.json"
    if not config.is_file():
        raise CaptionError(f"captioning model {folder}: no config.json there; point at a local BLIP or Florence-2 "
                           "folder (nothing is downloaded), or use the template captioner")
    kind = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    from PIL import Image
    from transformers import AutoProcessor, BlipForConditionalGeneration, Florence2ForConditionalGeneration

    # transformers' own classes: no code from the model folder is run (no trust_remote_code)
    classes = {"blip": (BlipForConditionalGeneration, None), "florence2": (Florence2ForConditionalGeneration, "<CAPTION>")}
    if kind not in classes:
        raise CaptionError(f"captioning model {folder}: model_type {kind!r}; expected one of {sorted(classes)}")
    cls, task = classes[kind]
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CaptionError(f"captioning model {folder}: cannot be loaded offline ({str(err).splitlines()[0]})") from None
    out = []
    for image in images:
        with Image.open(image) as img:
            inputs = processor(images=img.convert("RGB"), text=task, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        out.append(write_caption(image, caption_dir, prefix + text))
    return out
