"""Launch the web app as a real server process (loopback only) for the app tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python -m app`` on 127.0.0.1 with its own runs folder; ``kill()`` is a hard SIGKILL."""

    def __init__(self, runs_dir: Path, port: int | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, ssl_context=None, piped: bool = False) -> None:
        self.runs_dir, self.port = Path(runs_dir), port or free_port()
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
        self.log = open(self.runs_dir.parent / f"app-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(self.port), "--runs-dir", str(self.runs_dir), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE if piped else self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}: {self.log_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=2, context=ssl_context)
                return
            except OSError:
                time.sleep(0.5)
        text = self.log_text()  # before stop() closes the log
        self.stop()
        raise RuntimeError(f"app did not start: {text}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.runs_dir.parent / f"app-{self.port}.log").read_text(errors="replace")[-4000:]

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def train_args(name: str, steps: int, checkpoint_every: int = 2, validation_every: int = -1,
               optimizer: str = "adamw") -> list:
    """The Train tab's form values for the shipped robot concept (the /train_submit inputs)."""
    return ["shipped concept", "robot", None, None, None, "",
            name, "<robot1> <robot2>", "robot", "embedded", 64, optimizer, 2, steps, 1,
            1e-4, 1e-5, 1e-3, checkpoint_every, validation_every, "a photo of <robot1> <robot2>",
            *[""] * 8]


def job(client, job_id) -> dict:
    return client.predict(int(job_id), api_name="/job_info")


def wait_for(client, job_id, pred, timeout: float = 240.0, every: float = 0.3) -> dict:
    deadline = time.time() + timeout
    info = job(client, job_id)
    while not pred(info):
        if time.time() > deadline:
            raise AssertionError(f"job #{job_id} never reached the expected state: {info}")
        time.sleep(every)
        info = job(client, job_id)
    return info
