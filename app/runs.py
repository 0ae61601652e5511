"""What is on disk in the app's runs folder: training runs, fused models, sample sets.

Layout (everything the app writes stays under the runs folder, which is the only folder the
web server may serve files from)::

    <runs>/jobs.sqlite              the job store (app/jobs.py)
    <runs>/<name>/                  a training run (mixofshow train's run folder: config.yaml,
                                    checkpoints/, samples/, logs/, metrics.json, <name>.safetensors)
    <runs>/fused/<name>/<name>.safetensors   a fused model (and app.log)
    <runs>/samples/<id>/            a sample set (PNG files and index.json)
    <runs>/uploads/<id>/            uploaded training images (app/uploads.py)
    <runs>/compare/<name>/          an optimizer comparison (mixofshow compare's folder: runs/,
                                    comparison.md/.csv/.json, loss_curves.png, scores.png, grid.png)
    <runs>/presets/<name>.yaml      saved training presets (the YAML `mixofshow train` takes)

A run made by ``mixofshow train --output-dir <runs>/<name>`` outside the app shows up too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunInfo", "concept_files", "images_of", "inside", "list_runs", "read_text"]

_SPECIAL = {"fused", "samples", "uploads", "presets", "exports", "compare"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved, if it lies inside ``root``; ``ValueError`` otherwise."""
    root_r, p = Path(root).resolve(), Path(path).resolve()
    if p != root_r and root_r not in p.parents:
        raise ValueError(f"{path}: not inside the app's runs folder {root}")
    return p


@dataclass
class RunInfo:
    kind: str  # "train", "fused" or "samples"
    name: str
    path: Path
    concept: Path | None = None  # the concept / fused file, once written
    metrics: dict[str, Any] = field(default_factory=dict)
    modified: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.name}"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> float:
    try:
        return max((p.stat().st_mtime for p in path.iterdir()), default=path.stat().st_mtime)
    except OSError:
        return 0.0


def list_runs(runs_dir: str | os.PathLike) -> list[RunInfo]:
    """Every run folder under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    runs: list[RunInfo] = []
    if not root.is_dir():
        return runs
    for d in root.iterdir():
        if d.is_dir() and d.name not in _SPECIAL and ((d / "config.yaml").is_file() or (d / "app_request.yaml").is_file()):
            concept = d / f"{d.name}.safetensors"
            metrics = _json(d / "metrics.json")
            if metrics.get("concept_path"):
                concept = Path(metrics["concept_path"])
            runs.append(RunInfo("train", d.name, d, concept if concept.is_file() else None, metrics, _mtime(d)))
    for d in (root / "fused").glob("*/"):
        f = d / f"{d.name}.safetensors"
        runs.append(RunInfo("fused", d.name, d, f if f.is_file() else None, {}, _mtime(d)))
    for d in (root / "samples").glob("*/"):
        runs.append(RunInfo("samples", d.name, d, None, _json(d / "index.json"), _mtime(d)))
    runs.sort(key=lambda r: r.modified, reverse=True)
    return runs


def concept_files(runs_dir: str | os.PathLike) -> list[Path]:
    """Trained concept and fused files in the runs folder, newest first (what Sample can load)."""
    return [r.concept for r in list_runs(runs_dir) if r.concept is not None]


def images_of(folder: str | os.PathLike, limit: int = 200) -> list[Path]:
    """Images under ``folder`` (recursively), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()]
    found.sort(key=lambda p: (p.stat().st_mtime, str(p)), reverse=True)
    return found[:limit]


def read_text(path: str | os.PathLike, tail: int = 20_000) -> str:
    """The end of a text file (for logs), or '' when it does not exist."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return data[-tail:].decode("utf-8", errors="replace")
