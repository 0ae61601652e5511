"""Output locations checked before any work, without importing torch.

Commands call :func:`check_output_dir` / :func:`check_output_file` on every output location
first, so a folder that is a file, lies under a file, is not writable or has no space left is one
clear message (``mixofshow`` exits 2) instead of a traceback after minutes of work. Files are
then written by :mod:`mixofshow.utils.io` with the mode :func:`current_umask` gives.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = [
    "MIN_FREE_BYTES",
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "current_umask",
    "place_error",
]


class OutputPathError(ValueError):
    """An output location cannot be written (a file, under a file, read-only, full)."""


MIN_FREE_BYTES = 64 * 2**20  # free space an output location must have before work starts

# errors of the place being written, not of the program: reported as OutputPathError
_PLACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def check_output_dir(path: str | os.PathLike, what: str = "output folder", min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Check that folder ``path`` exists or can be created, is writable and has space.

    Raises :class:`OutputPathError` naming ``what`` and the path; creates nothing.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path}: exists and is a file, not a folder")
    _check_folder(path, f"{what} {path}", min_free_bytes)
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file", min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """:func:`check_output_dir` for the folder of file ``path``; ``path`` itself must not be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what} {path}: is a folder, expected a file name")
    _check_folder(path.parent, f"{what} {path}", min_free_bytes)
    return path


def _check_folder(folder: Path, label: str, min_free_bytes: int) -> None:
    existing = folder
    while not existing.is_dir():  # the nearest folder that exists: where the first mkdir happens
        if existing.exists() or existing.is_symlink():
            raise OutputPathError(f"{label}: cannot be created under {existing}, which is not a folder")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{label}: not writable (no write permission in {existing})")
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise OutputPathError(
            f"{label}: no space left on its file system ({free / 2**20:.1f} MiB free, at least "
            f"{min_free_bytes / 2**20:.0f} MiB needed)"
        )


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic; there is no getter)
    os.umask(mask)
    return mask


def place_error(path: Path, err: OSError) -> Exception:
    """``err`` as an :class:`OutputPathError` naming ``path`` when the place is at fault, else ``err``."""
    if err.errno in _PLACE_ERRNOS:
        return OutputPathError(f"{path}: cannot write: {err.strerror or err}")
    return err
