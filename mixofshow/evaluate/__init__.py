"""Evaluation (CLIP-T, CLIP-I, DINO) and optimizer comparisons.

``evaluate(samples_dir, ...)`` scores a folder written by ``mixofshow sample``;
``compare(config, optimizers, ...)`` trains, samples and scores one run per optimizer and seed.
Both are imported lazily, so that ``mixofshow --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "compare", "Progress", "Cancelled", "ClipSpec", "CompareResult", "MissingWeightsError"]

_WHERE = {
    "evaluate": "scores",
    "compare": "comparison",
    "CompareResult": "comparison",
    "Progress": "progress",
    "Cancelled": "progress",
    "ClipSpec": "clip",
    "MissingWeightsError": "clip",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mixofshow.evaluate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"mixofshow.evaluate.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
