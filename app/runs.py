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

__all__ = ["RunInfo", "concept_files", "confined", "delete_run", "images_of", "inside", "list_runs", "read_text"]

_SPECIAL = {"fused", "samples", "uploads", "presets", "exports", "compare"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved, if it lies inside ``root``; ``ValueError`` otherwise."""
    root_r, p = Path(root).resolve(), Path(path).resolve()
    if p != root_r and root_r not in p.parents:
        raise ValueError(f"{path}: not inside the app's runs folder {root}")
    return p


def confined(root: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """``path`` resolved (symlinks followed) if it lies inside ``root``, else ``None``: every file the
    app reads for display goes through here, so a link inside a run folder shows nothing outside."""
    try:
        return inside(root, path)
    except (ValueError, OSError):
        return None


def delete_run(root: str | os.PathLike, folder: str | os.PathLike, busy: set[Path] = frozenset()) -> Path:
    """Remove a run folder of the runs folder; refuses the runs folder itself, its own sub-folders
    (jobs, uploads, presets...), a folder a job is running in (``busy``) and one whose training
    process holds its lock (a run started from the command line). Returns the removed folder."""
    import shutil

    from mixofshow.train.folder import RunLock
    from mixofshow.utils.config import ConfigError

    root_r = Path(root).resolve()
    target = confined(root_r, folder)
    if target is None or target == root_r or not target.is_dir():
        raise ValueError(f"{folder}: not a run folder inside the app's runs folder {root}")
    if target.parent == root_r and target.name in _SPECIAL:
        raise ValueError(f"{folder}: the app's own {target.name}/ folder, not a run")
    if any(target == b.resolve() or target in b.resolve().parents for b in busy):
        raise ValueError(f"{folder}: a job is running in it; stop it first")
    try:
        with RunLock(target):  # a training process (app or CLI) holds this while it runs
            shutil.rmtree(target)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return target


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


def _json(root: Path, path: Path) -> dict[str, Any]:
    real = confined(root, path)
    if real is None:
        return {}
    try:
        data = json.loads(real.read_text(encoding="utf-8"))
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
    def file_in(path: Path) -> Path | None:
        real = confined(root, path)
        return path if real is not None and real.is_file() else None

    for d in root.iterdir():
        if d.is_dir() and d.name not in _SPECIAL and confined(root, d) is not None \
                and (file_in(d / "config.yaml") or file_in(d / "app_request.yaml")):
            metrics = _json(root, d / "metrics.json")
            concept = Path(metrics["concept_path"]) if metrics.get("concept_path") else d / f"{d.name}.safetensors"
            runs.append(RunInfo("train", d.name, d, file_in(concept), metrics, _mtime(d)))
    for d in (root / "fused").glob("*/"):
        if confined(root, d) is not None:
            runs.append(RunInfo("fused", d.name, d, file_in(d / f"{d.name}.safetensors"), {}, _mtime(d)))
    for d in (root / "samples").glob("*/"):
        if confined(root, d) is not None:
            runs.append(RunInfo("samples", d.name, d, None, _json(root, d / "index.json"), _mtime(d)))
    runs.sort(key=lambda r: r.modified, reverse=True)
    return runs


def concept_files(runs_dir: str | os.PathLike) -> list[Path]:
    """Trained concept and fused files in the runs folder, newest first (what Sample can load)."""
    return [r.concept for r in list_runs(runs_dir) if r.concept is not None]


def images_of(root: str | os.PathLike, folder: str | os.PathLike, limit: int = 200) -> list[Path]:
    """Images under ``folder`` (recursively) that resolve inside ``root``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
             and confined(root, p) is not None]
    found.sort(key=lambda p: (p.stat().st_mtime, str(p)), reverse=True)
    return found[:limit]


def read_text(root: str | os.PathLike, path: str | os.PathLike, tail: int = 20_000) -> str:
    """The end of a text file under ``root`` (for logs), or '' when it does not exist or resolves
    outside ``root``."""
    real = confined(root, path)
    if real is None:
        return ""
    try:
        data = real.read_bytes()
    except OSError:
        return ""
    return data[-tail:].decode("utf-8", errors="replace")
