"""Progress reports and cancellation shared by :func:`evaluate` and :func:`compare`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Progress", "Cancelled", "mean_std"]


@dataclass
class Progress:
    phase: str  # "plan", "lr-grid", "train", "sample", "heldout", "score", "report", "done", "cancelled"
    run: str | None = None  # run name (compare) or sample folder (evaluate)
    step: int = 0  # steps (train) or images (score) done in this run / phase
    total: int = 0  # steps or images this run / phase has
    runs_done: int = 0
    runs_total: int = 0
    eta_seconds: float | None = None  # whole call; None until something was timed
    message: str = ""


class Cancelled(Exception):
    """``should_stop`` returned True; a comparison called again resumes where this one stopped."""


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1) of the values that are not None.

    A NaN or infinite value (a diverged run) makes both NaN: it is reported, never dropped.
    """
    vals = [float(v) for v in values if v is not None]
    if any(not math.isfinite(v) for v in vals):
        return {"mean": math.nan, "std": math.nan, "n": len(vals)}
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
    }
