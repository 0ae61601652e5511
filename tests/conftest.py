"""Shared fixtures. Tests never touch the network and run on the CPU with the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def embedded_pipeline_factory():
    """Build a fresh embedded pipeline (each call gets its own modules; weights identical)."""
    from mixofshow.models.embedded import build_embedded_pipeline

    return build_embedded_pipeline


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: for tests of tiny tensors, where a second thread only adds
    synchronisation (and stalls when the machine is busy). Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- training helpers (tests/test_train*.py) -------------------------------------------------
EXAMPLE_TRAIN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "example.yaml")
# the shipped configs train on the toy world; tests of the machinery (not of learning) use the
# random embedded model, several times faster: these overrides, or the same as --set arguments
EMBEDDED = {"base_model": "embedded", "data.resolution": 128}
EMBEDDED_ARGS = ["--set", "base_model=embedded", "--set", "data.resolution=128"]


@pytest.fixture
def small_train_config():
    """``make(root, **{"key.sub": value})``: the shipped example config, 4 CPU steps of batch 1,
    a checkpoint every 2 steps, no validation, run folder ``root / "run"``."""
    from mixofshow.train.config import load_train_config

    def make(root, **overrides):
        base = {
            **EMBEDDED,
            "output_dir": str(root / "run"),
            "train.max_steps": 4,
            "train.batch_size": 1,
            "train.checkpoint_every": 2,
            "validation.every": -1,
        }
        base.update(overrides)
        return load_train_config(EXAMPLE_TRAIN_CONFIG, base)

    return make


@pytest.fixture
def checkpoint_weights():
    """``weights(run_dir)``: the trainable tensors of a run folder's newest checkpoint."""
    from mixofshow.train.checkpoint import latest_checkpoint
    from mixofshow.utils.io import load_safetensors

    def weights(run_dir):
        tensors, _ = load_safetensors(latest_checkpoint(run_dir / "checkpoints") / "trainable.safetensors")
        return tensors

    return weights


# -- CLI helpers (tests/test_cli.py, test_examples.py, ...) ---------------------------------
REPO = Path(__file__).resolve().parents[1]


def run_mixofshow(*args: str, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m mixofshow ARGS`` in a subprocess (this checkout first on PYTHONPATH), text output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "mixofshow", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with one error line on stderr (no traceback) that contains every needle."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
