"""Aspect-ratio bucketing (as kohya's sd-scripts): train each image at a size close to its own shape.

Instead of padding every image to a square, ``data.buckets: true`` sorts the images into
*buckets*: sizes ``(w, h)``, multiples of ``step`` pixels (the base model's total downsampling,
64 for SD 1.x), with ``w * h <= resolution ** 2`` and an aspect ratio of at most ``max_ratio``.
Each image goes to the bucket whose aspect ratio is nearest to its own (in log ratio) and is
resized to exactly that size: no crop, no padding, so a portrait photo keeps its head and feet.
Every batch holds images of one bucket (they stack into one tensor).

The batch plan of an epoch is a pure function of (seed, epoch): images are shuffled inside their
bucket, cut into batches of ``batch_size`` (a bucket's last batch is filled up with its first
images again, so every batch is full), and the batches of all buckets are shuffled together. A
resumed run therefore draws the same batches as a straight one.

With ED-LoRA's masked loss, a mask is resized with its image to the bucket; since nothing is
padded, the loss covers exactly the subject's pixels (without masks, the whole image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["bucket_sizes", "nearest_bucket", "epoch_batches", "batches_per_epoch"]


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """The buckets: for each width (a multiple of ``step``), the tallest height whose area fits."""
    if resolution < step:
        raise ValueError(f"data.resolution {resolution} is smaller than the bucket step {step}")
    area = resolution * resolution
    sizes = set()
    for w in range(step, resolution * 4 + step, step):
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            sizes.add((w, h))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` (log scale)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def batches_per_epoch(bucket_of: Sequence[int], batch_size: int) -> int:
    counts: dict[int, int] = {}
    for b in bucket_of:
        counts[b] = counts.get(b, 0) + 1
    return sum(math.ceil(c / batch_size) for c in counts.values())


def epoch_batches(bucket_of: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The epoch's batches (lists of sample indices, each from one bucket), drawn from ``generator``."""
    members: dict[int, list[int]] = {}
    for index, b in enumerate(bucket_of):
        members.setdefault(b, []).append(index)
    batches = []
    for b in sorted(members):
        order = [members[b][i] for i in torch.randperm(len(members[b]), generator=generator).tolist()]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            batch += [order[i % len(order)] for i in range(batch_size - len(batch))]  # fill the last one
            batches.append(batch)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
