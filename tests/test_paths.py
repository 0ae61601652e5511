"""Output locations checked before work; atomic writes keep the user's umask."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from mixofshow.utils import io as io_mod
from mixofshow.utils.io import atomic_write_bytes, save_safetensors
from mixofshow.utils.paths import OutputPathError, check_output_dir, check_output_file, current_umask


@pytest.fixture
def umask():
    """Set the umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path, umask):
    import torch

    umask(0o022)
    assert current_umask() == 0o022
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    save_safetensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
    assert _mode(tmp_path / "a.bin") == 0o644 and _mode(tmp_path / "t.safetensors") == 0o644
    umask(0o077)
    atomic_write_bytes(tmp_path / "a.bin", b"y")  # replacing keeps atomicity and takes the new mode
    assert _mode(tmp_path / "a.bin") == 0o600 and (tmp_path / "a.bin").read_bytes() == b"y"
    umask(0o002)
    atomic_write_bytes(tmp_path / "b.bin", b"z")
    assert _mode(tmp_path / "b.bin") == 0o664
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fused_diffusers_folder_follows_the_umask(tmp_path, umask, embedded_pipeline_factory):
    from mixofshow.fuse.export import export_diffusers
    from mixofshow.fuse.io import FusedMeta

    umask(0o022)
    pipe = embedded_pipeline_factory()
    meta = FusedMeta(base_model="embedded", num_layers=1, text_dim=1, words=[], method="weight")
    folder = export_diffusers(pipe, tmp_path / "out", meta)
    assert _mode(folder) == 0o755
    assert _mode(folder / "model_index.json") == 0o644


def test_check_output_dir_accepts_new_and_existing_folders(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # creates nothing
    assert check_output_file(tmp_path / "a" / "f.safetensors") == tmp_path / "a" / "f.safetensors"


def test_check_output_locations_refuse_files_and_folders_in_the_wrong_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=f"run {blocker}: exists and is a file, not a folder"):
        check_output_dir(blocker, "run")
    with pytest.raises(OutputPathError, match=f"run {blocker / 'x' / 'y'}: cannot be created under {blocker}, which is not a folder"):
        check_output_dir(blocker / "x" / "y", "run")
    with pytest.raises(OutputPathError, match=f"out {tmp_path}: is a folder, expected a file name"):
        check_output_file(tmp_path, "out")
    with pytest.raises(OutputPathError, match=f"out {blocker / 'f.bin'}: cannot be created under {blocker}"):
        check_output_file(blocker / "f.bin", "out")
    assert isinstance(OutputPathError("x"), ValueError)  # the CLI's exit-2 path


def test_check_output_dir_not_writable_and_no_space(tmp_path, monkeypatch):
    """Root ignores permission bits, so os.access is monkeypatched to say "not writable"."""
    denied = tmp_path / "ro"
    denied.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == denied else real_access(p, mode, **kw))
    with pytest.raises(OutputPathError, match=f"run {denied / 'new'}: not writable \\(no write permission in {denied}\\)"):
        check_output_dir(denied / "new", "run")
    with pytest.raises(OutputPathError, match=f"out {denied / 'f.bin'}: not writable"):
        check_output_file(denied / "f.bin", "out")
    check_output_dir(tmp_path / "other")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    with pytest.raises(OutputPathError, match=r"no space left on its file system \(3\.0 MiB free, at least 64 MiB needed\)"):
        check_output_dir(tmp_path / "other")
    check_output_dir(tmp_path / "other", min_free_bytes=2**20)


def test_write_failures_of_the_place_name_the_file(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_mod.os, "fdopen", lambda fd, mode: _Writer(fd, full))
    with pytest.raises(OutputPathError, match=f"{tmp_path / 'a.bin'}: cannot write: No space left on device"):
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.undo()
    with pytest.raises(OutputPathError, match=f"{blocker / 'a.bin'}: cannot write"):
        atomic_write_bytes(blocker / "a.bin", b"x")


class _Writer:
    """A file object whose write fails as ``fail`` says."""

    def __init__(self, fd, fail):
        self.fd, self.fail = fd, fail

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def fileno(self):
        return self.fd

    def write(self, data):
        self.fail(self.fd, data)
