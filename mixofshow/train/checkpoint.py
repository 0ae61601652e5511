"""Resumable training checkpoints, written atomically and without pickle.

A checkpoint is a folder ``checkpoints/step_000123`` holding

    trainable.safetensors   LoRA factors (by parameter name) and the concept-token rows
    state.safetensors       optimizer states, RNG states; the rest (step, flags, lr schedule,
                            the resolved config) as JSON in the file's metadata

The folder is written under a temporary name and renamed when complete, so a killed run leaves
either a whole checkpoint or none. ``latest_checkpoint`` ignores unfinished temporaries.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixofshow.utils.io import FileFormatError, flatten_state, load_safetensors, save_safetensors
from mixofshow.utils.io import unflatten_state

__all__ = ["Checkpoint", "checkpoint_path", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints"]

_PREFIX = "step_"


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    state: dict[str, Any]  # optimizer / embedding-optimizer state dicts, rng, flags, config


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(_numpy_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: Path, step: int) -> Path:
    """``folder/step_000123``: where the checkpoint of ``step`` lives."""
    return folder / f"{_PREFIX}{step:06d}"


def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write :func:`checkpoint_path` atomically; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(tmp / "trainable.safetensors", trainable, {"step": str(step)})
    tensors, skeleton = flatten_state(dict(state, rng=rng_state()))
    save_safetensors(tmp / "state.safetensors", tensors, {"step": str(step), "skeleton": json.dumps(skeleton)})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(path: Path, restore_rng: bool = True) -> Checkpoint:
    trainable, meta = load_safetensors(path / "trainable.safetensors")
    tensors, smeta = load_safetensors(path / "state.safetensors")
    try:
        state = unflatten_state(json.loads(smeta["skeleton"]), tensors)
        step = int(smeta["step"])
    except (KeyError, ValueError) as err:
        raise FileFormatError(f"{path}: checkpoint state is incomplete or corrupt ({err})") from None
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint(step=step, trainable=trainable, state=state)


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step complete checkpoint in ``folder`` (None if there is none)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints."""
    done = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)),
        key=lambda p: int(p.name[len(_PREFIX):]),
    )
    for old in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
