"""A run folder belongs to one run: refuse to mix runs, replace one, or check a resume against it.

A folder holds a run when a run left its state there: ``metrics.json``, a checkpoint in
``checkpoints/`` or the concept file ``<name>.safetensors``; the run's files are those and
``config.yaml``, ``logs/``, ``samples/``. Then

- a new run is refused (the error says how to continue it or replace it);
- ``overwrite`` removes exactly those files (nothing else in the folder) -- after the new run
  has been built, so a config that fails to build leaves the old run as it was;
- ``resume`` continues from the newest checkpoint, after checking that the resolved config
  matches the one saved in it: every differing key is named. Only the keys of
  :data:`RESUME_MAY_CHANGE` may differ (``configs/README.md``, "Run folders and resuming").
  A run that has already finished is left untouched.

While a run trains, its process holds :class:`RunLock` on the folder, so a second process
started into the same folder (even into a new one, at the same moment) gets an error naming the
holder instead of mixing two runs' files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixofshow.train.checkpoint import latest_checkpoint, load_checkpoint
from mixofshow.train.config import TrainConfig
from mixofshow.utils.config import ConfigError, load_yaml, to_dict

__all__ = ["RESUME_MAY_CHANGE", "RunFolder", "RunLock", "claim_run_folder", "config_differences", "clear_run",
           "flatten_config"]

log = logging.getLogger(__name__)

_RUN_FILES = ("config.yaml", "metrics.json", "checkpoints", "logs", "samples")
_PATH_KEYS = ("data.concept_list", "validation.prompts_file", "base_model", "base_model_config")

# Keys that may differ between a run's saved config and the config it is resumed with: they change
# how long it runs, how often it saves, logs or validates, and where, but not what a step computes.
# A larger train.max_steps extends a run; with the linear schedule the remaining steps then follow
# the new horizon's learning rates.
RESUME_MAY_CHANGE = (
    "output_dir",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.device",
    "train.gradient_checkpointing",
    "train.nan_policy",
    "train.max_skipped_steps",
    "validation",  # the whole section
)


class RunLock:
    """An exclusive lock on a run folder for the life of a run: ``flock`` on ``<folder>/.lock``.

    The operating system releases it when the process ends, however it ends (a killed run leaves
    no stale lock). The file records the holder (pid, host, start time) for the error message.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"output_dir: {self.path.parent} is in use by a run that is still training ({holder}); "
                "wait for it to end, stop it, or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class RunFolder:
    path: Path
    checkpoint: Path | None = None  # where to resume from (None: start at step 0)
    finished: bool = False  # resume of a run that has nothing left to do
    saved_step: int = 0
    to_clear: list[Path] = field(default_factory=list)  # overwrite: the old run's files


def flatten_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A config dict as ``{"train.max_steps": 1000, "optimizer.params": {...}, ...}``.

    Sections are flattened one level: a mapping-valued key (``optimizer.params``,
    ``data.replace_mapping``) stays one value.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _comparable(key: str, value: Any) -> Any:
    if key in _PATH_KEYS and isinstance(value, str) and value != "embedded" and os.path.exists(value):
        return os.path.normpath(os.path.abspath(value))
    return list(value) if isinstance(value, tuple) else value


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved X, now Y"`` for every key whose value differs (keys a resume may change excepted).

    Keys the saved config does not have (a run saved by an older version) are not compared.
    """
    old, new = flatten_config(saved), flatten_config(current)
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE) or key not in old:
            continue
        before, after = _comparable(key, old[key]), _comparable(key, new.get(key, "(not set)"))
        if before != after:
            diffs.append(f"{key}: saved {old[key]!r}, now {new.get(key, '(not set)')!r}")
    return diffs


def _run_files(out: Path, names: set[str]) -> list[Path]:
    """The run's files in ``out``; none unless a run left state there (checkpoints, metrics, a concept).

    ``config.yaml``, ``logs/`` and ``samples/`` alone are not a run's state (nothing to resume,
    and they may be the user's own), so they are neither a reason to refuse nor ever removed alone.
    """
    concepts = [out / f"{n}.safetensors" for n in sorted(names) if (out / f"{n}.safetensors").is_file()]
    has_state = (out / "metrics.json").is_file() or latest_checkpoint(out / "checkpoints") is not None or concepts
    if not has_state:
        return []
    return [out / n for n in _RUN_FILES if (out / n).exists()] + concepts


def _saved_names(out: Path) -> set[str]:
    """The run names recorded in the folder (config copy, metrics), to find their concept files."""
    names = set()
    try:
        names.add(str(load_yaml(out / "config.yaml").get("name", "concept")))
    except (ConfigError, OSError):
        pass
    try:
        names.add(str(json.loads((out / "metrics.json").read_text()).get("name")))
    except (OSError, ValueError, AttributeError):
        pass
    return names


def _saved_config(out: Path, checkpoint: Path | None) -> tuple[dict[str, Any] | None, str]:
    if checkpoint is not None:
        return load_checkpoint(checkpoint, restore_rng=False).state.get("config"), str(checkpoint)
    if (out / "config.yaml").is_file():
        return load_yaml(out / "config.yaml"), str(out / "config.yaml")
    return None, ""


def claim_run_folder(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Decide what this run may do with ``config.output_dir``; raise ``ConfigError`` when it may not."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the run or replace it, not both")
    out = Path(config.output_dir)
    if not out.is_dir():
        if resume:
            log.warning("--resume: %s does not exist; starting a new run", out)
        return RunFolder(out)
    found = _run_files(out, _saved_names(out) | {config.name})
    if not found:
        if resume:
            log.warning("--resume: no run in %s; starting from step 0", out)
        return RunFolder(out)
    if overwrite:
        return RunFolder(out, to_clear=found)
    listing = ", ".join(p.name for p in found)
    if not resume:
        raise ConfigError(
            f"output_dir: {out} already holds a run ({listing}); continue it with --resume, replace it "
            "with --overwrite, or choose another --output-dir"
        )
    checkpoint = latest_checkpoint(out / "checkpoints")
    saved, source = _saved_config(out, checkpoint)
    if saved is not None:
        diffs = config_differences(saved, to_dict(config))
        if diffs:
            raise ConfigError(
                f"--resume: the config differs from the run's saved config ({source}): {'; '.join(diffs)}. "
                "Resume with the saved values, or start a new run (--overwrite or another --output-dir); "
                f"a resume may change only {', '.join(RESUME_MAY_CHANGE)}"
            )
    if checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", out / "checkpoints")
        return RunFolder(out)
    step = int(checkpoint.name.rsplit("_", 1)[-1])
    max_steps = config.train.max_steps
    if step > max_steps:
        raise ConfigError(
            f"train.max_steps: the run in {out} has done {step} steps; a resume can only extend it "
            f"(train.max_steps >= {step}), got {max_steps}"
        )
    return RunFolder(out, checkpoint, finished=step == max_steps and _finished(out), saved_step=step)


def _finished(out: Path) -> bool:
    """Whether the folder's metrics say the run finished and its concept file is there."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    concept = metrics.get("concept_path") if isinstance(metrics, dict) else None
    return bool(metrics.get("finished")) and concept is not None and Path(concept).is_file()


def clear_run(folder: RunFolder) -> None:
    """Remove the old run's files found by :func:`claim_run_folder` (``overwrite``)."""
    for path in folder.to_clear:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if folder.to_clear:
        log.info("--overwrite: removed the previous run's %s", ", ".join(p.name for p in folder.to_clear))
