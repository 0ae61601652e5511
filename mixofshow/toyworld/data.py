"""Rendered splits of the toy world, cached as uint8 arrays for pre-training and evaluation.

``render_split`` writes ``<dir>/<split>.npy`` (N x S x S x 3, uint8, loaded without pickles) and
``<dir>/<split>.jsonl`` (one scene's ground truth per line) atomically; an existing cache is
reused only when its ``<split>.json`` says it was made with the same seed, size and count.
``Split`` holds one split in memory and hands out batches as float tensors in [-1, 1], optionally
with the mirrored half (image flipped, positions swapped in the ground truth and caption).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mixofshow.toyworld.world import Scene, mirrored, scene
from mixofshow.utils.io import atomic_write_bytes, atomic_write_text

__all__ = ["GENERATOR_VERSION", "from_uint8", "Split", "render_split", "load_split"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when a change to world.py / draw.py changes the pixels


def render_split(folder: str | Path, split: str, count: int, seed: int, size: int = 64) -> Path:
    """Render ``count`` scenes of ``split`` into ``folder`` unless an identical cache is there."""
    folder = Path(folder)
    info = {"split": split, "count": count, "seed": seed, "size": size, "version": GENERATOR_VERSION}
    info_path = folder / f"{split}.json"
    if info_path.is_file() and json.loads(info_path.read_text()) == info and (folder / f"{split}.npy").is_file():
        return folder
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    lines = []
    for i in tqdm(range(count), desc=f"render {split}", unit="scene", mininterval=2):
        images[i], s = scene(split, i, seed, size)
        lines.append(json.dumps(s.to_dict()))
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    atomic_write_bytes(folder / f"{split}.npy", buf.getvalue())
    atomic_write_text(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(info_path, json.dumps(info))
    return folder


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """N x S x S x 3 uint8 images as the models read them: N x 3 x S x S floats in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class Split:
    images: np.ndarray  # N x S x S x 3 uint8
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, index: np.ndarray, mirror: bool = False) -> tuple[torch.Tensor, list[Scene]]:
        """Images (B x 3 x S x S in [-1, 1]) and scenes of ``index``; ``mirror`` appends their mirrors."""
        x = from_uint8(self.images[index])
        scenes = [self.scenes[i] for i in index]
        if mirror:
            size = x.shape[-1]
            x = torch.cat([x, x.flip(-1)])
            scenes = scenes + [mirrored(s, size) for s in scenes]
        return x, scenes


def load_split(folder: str | Path, split: str) -> Split:
    folder = Path(folder)
    images = np.load(folder / f"{split}.npy", allow_pickle=False)
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        scenes = [Scene.from_dict(json.loads(line)) for line in f if line.strip()]
    if len(scenes) != len(images):
        raise ValueError(f"{folder}/{split}: {len(images)} images but {len(scenes)} scenes; delete the folder to re-render")
    return Split(images, scenes)
