"""Atomic file writes and pickle-free (safetensors + JSON) storage of nested state.

Every file the project writes goes through :func:`atomic_write_bytes`: temp file in the same
folder, fsync, rename. A killed process leaves the old file or the new one, never half of one.
Files get the mode a plain ``open()`` would give them (``0666`` less the user's umask: ``0644``
by default), not ``mkstemp``'s private ``0600``. A write that fails because of the place (no
space, read-only, no permission) raises :class:`~mixofshow.utils.paths.OutputPathError` naming
the file. Output locations are checked before any work by :mod:`mixofshow.utils.paths`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mixofshow.utils.paths import current_umask, place_error

__all__ = [
    "file_sha256",
    "atomic_write_bytes",
    "atomic_write_text",
    "read_json",
    "save_safetensors",
    "load_safetensors",
    "flatten_state",
    "unflatten_state",
    "FileFormatError",
    "dataclass_to_metadata",
    "dataclass_from_metadata",
]


class FileFormatError(ValueError):
    """A file a user gave us is missing, corrupt or of the wrong kind."""


def read_json(path: str | os.PathLike, what: str = "", error: type[Exception] = ValueError) -> Any:
    """The JSON document in ``path``; an unreadable file or invalid JSON raises
    ``error("{what}{path}: not valid JSON (...)")`` (``what`` names it, e.g. ``"concept list "``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what}{path}: not valid JSON ({err})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks): ties a result to the exact file it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise place_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # as open() would, not mkstemp's 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise place_error(path, err) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a ``.safetensors`` file atomically (tensors made contiguous, on CPU)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(data, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file: (tensors, metadata); clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path}: not a readable .safetensors file ({err})") from None
    return tensors, dict(header.get("__metadata__", {}) or {})


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested dicts/lists into (tensors by dotted path, a JSON-able skeleton).

    Tensors are replaced by ``{"__tensor__": key}``; tuples become lists (torch state dicts
    accept either). Used to store optimizer state and RNG state without pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            if not all(isinstance(k, (str, int)) for k in value):
                raise TypeError(f"Cannot store dict keys of type {[type(k) for k in value]} at {path!r}")
            return {
                "__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()]
            }
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"Cannot store a {type(value).__name__} at {path!r}")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def dataclass_to_metadata(obj: Any, fmt: str, raw: tuple[str, ...]) -> dict[str, str]:
    """A metadata dataclass as safetensors metadata: fields in ``raw`` as is, the rest as JSON."""
    out = {"format": fmt}
    for key, value in dataclasses.asdict(obj).items():
        out[key] = value if key in raw else json.dumps(value)
    return out


def dataclass_from_metadata(
    cls: type, meta: dict[str, str], where: str, fmt: str, kind: str, raw: tuple[str, ...], required: tuple[str, ...]
) -> Any:
    """Inverse of :func:`dataclass_to_metadata`; errors name the file and the key."""
    found = meta.get("format")
    if found != fmt:
        raise FileFormatError(f"{where}: not {kind} (metadata 'format' is {found!r}, expected {fmt!r})")
    kwargs: dict[str, Any] = {}
    for name in cls.__dataclass_fields__:
        if name not in meta:
            if name in required:
                raise FileFormatError(f"{where}: metadata key {name!r} is missing")
            continue
        try:
            kwargs[name] = meta[name] if name in raw else json.loads(meta[name])
        except json.JSONDecodeError:
            raise FileFormatError(f"{where}: metadata key {name!r} is not valid JSON: {meta[name]!r}") from None
    return cls(**kwargs)
