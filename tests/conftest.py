"""Shared fixtures. Tests never touch the network and run on the CPU with the embedded model."""

from __future__ import annotations

import os

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
