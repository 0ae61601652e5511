"""Reading a sample folder's index and turning its prompts into CLIP-T texts.

CLIP-T compares an image with ``"A photo depicts " + prompt`` where every run of a concept's
words (``<robot1> <robot2>``) is replaced by that concept's class word (``robot``), as
Mix-of-Show's evaluation does. Words and class words come from the concept file's metadata
(``words``, ``class_words``); a fused file lists its concepts, whose own files give theirs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from mixofshow.utils.io import read_json

__all__ = ["read_index", "concept_classes", "class_text", "list_images"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_index(samples_dir: str | Path) -> dict[str, Any]:
    """``index.json`` of a folder written by ``mixofshow sample``; errors name the file and key."""
    path = Path(samples_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a folder written by `mixofshow sample`)")
    doc = read_json(path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise ValueError(f"{path}: key 'images' must be a non-empty list")
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}: images[{i}] needs string keys 'file' and 'prompt'")
        if not (Path(samples_dir) / entry["file"]).is_file():
            raise FileNotFoundError(f"{path}: images[{i}] names {entry['file']!r}, which is not in {samples_dir}")
    return doc


def _concept_file_classes(path: Path) -> list[tuple[list[str], str | None]]:
    from mixofshow.sample.load import FUSED_FORMAT, adapter_metadata

    meta, _ = adapter_metadata(path)
    if meta.get("format") == FUSED_FORMAT:
        out = []
        for entry in json.loads(meta.get("concepts", "[]")):
            words, classes = list(entry.get("words", [])), entry.get("class_words")
            if not classes and entry.get("file") and Path(entry["file"]).is_file():
                out.extend(_concept_file_classes(Path(entry["file"])))
                continue
            cls = next((c for c in (classes or {}).values() if c), None)
            out.append((words, cls))
        return out
    words = json.loads(meta.get("words", "[]"))
    classes = json.loads(meta.get("class_words", "{}"))
    return [(list(words), next((classes.get(w) for w in words if classes.get(w)), None))]


def concept_classes(
    concept: str | Path | None, overrides: dict[str, str] | None = None, where: str = "index.json"
) -> dict[str, str]:
    """concept word -> class word, from the concept (or fused) file and ``overrides``.

    ``overrides`` maps words (or space-separated word runs, ``"<a1> <a2>"``) to class words.
    """
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    if concept:
        path = Path(concept)
        if path.is_file():
            for words, cls in _concept_file_classes(path):
                for w in words:
                    if cls:
                        mapping[w] = cls
                    else:
                        unknown.append(w)
        else:
            log.warning("%s: concept file %s not found; concept words need --class-word", where, path)
    for key, cls in (overrides or {}).items():
        for w in key.split():
            mapping[w] = cls
            if w in unknown:
                unknown.remove(w)
    if unknown:
        log.warning("concept words %s have no class word in %s; pass --class-word", unknown, concept)
    return mapping


def class_text(prompt: str, classes: dict[str, str]) -> str:
    """The prompt with each run of one concept's words replaced by its class word."""
    if classes:
        words = "|".join(re.escape(w) for w in sorted(classes, key=len, reverse=True))
        run = re.compile(rf"(?:{words})(?:\s+(?:{words}))*")

        def replace(match: re.Match) -> str:
            names = match.group(0).split()
            out = []
            for name in names:  # a run may hold two concepts' words; keep one class word per concept
                cls = classes[name]
                if not out or out[-1] != cls:
                    out.append(cls)
            return " ".join(out)

        prompt = run.sub(replace, prompt)
    left = re.findall(r"<[^<>\s]+>", prompt)
    if left:
        raise ValueError(
            f"prompt {prompt!r}: concept word {left[0]} has no class word (the concept file records none); "
            f"pass --class-word '{left[0]}=CLASS'"
        )
    return prompt


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder (sorted); an error naming the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference-images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--reference-images {folder}: no images ({', '.join(_IMAGE_SUFFIXES)})")
    return files
