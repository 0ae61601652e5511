"""Build the Gradio app, start its worker process and serve it.

Safety (docs: README "Web app"): files are served only from the runs folder (``allowed_paths``;
Gradio's file route refuses everything else), uploads are limited by ``max_file_size`` and
validated by ``app/uploads.py``, and user errors become ``gr.Error`` messages, never tracebacks
(``show_error`` stays off for anything else).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from app.context import AppContext
from app.tab_compare import build_compare_tab
from app.jobs import JobStore
from app.tab_fuse import _trained, build_fuse_tab
from app.tab_queue import build_queue_tab
from app.tab_runs import build_runs_tab
from app.tab_sample import _concepts, build_sample_tab
from app.tab_train import _hp_updates, build_train_tab
from app.login import LoginThrottle
from app.uploads import LIMITS

__all__ = ["build_app", "serve", "start_worker"]

log = logging.getLogger(__name__)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_app(ctx: AppContext) -> gr.Blocks:
    # uploads land in Gradio's cache; files older than a day are removed every hour
    with gr.Blocks(title="mixofshow", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## mixofshow: ED-LoRA concepts, fused and sampled")
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                optimizer, hp = build_train_tab(ctx)
            with gr.Tab("Fuse", id="fuse") as fuse_tab:
                fuse_concepts = build_fuse_tab(ctx)
            with gr.Tab("Sample", id="sample") as sample_tab:
                sample_concept = build_sample_tab(ctx)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(ctx)
            with gr.Tab("Runs", id="runs") as runs_tab:
                run, refresh_runs = build_runs_tab(ctx)
            with gr.Tab("Queue", id="queue"):
                build_queue_tab(ctx)
        demo.load(lambda n: _hp_updates(n), optimizer, hp, api_visibility="private")
        # lists of what is on disk: fresh at page load and whenever their tab is opened
        for event in (demo.load, runs_tab.select):
            event(refresh_runs, run, run, api_visibility="private")
        for event in (demo.load, sample_tab.select):
            event(lambda: gr.update(choices=_concepts(ctx)), None, sample_concept, api_visibility="private")
        for event in (demo.load, fuse_tab.select):
            event(lambda: gr.update(choices=_trained(ctx)), None, fuse_concepts, api_visibility="private")
    return demo


def start_worker(runs_dir: Path, device: str) -> subprocess.Popen:
    """The worker process (app/worker.py); it exits by itself when this process is gone.

    Its output goes to ``<runs>/worker.log``, not to this process's stdout: when that is a pipe
    (``mixofshow app | tee log``) and Ctrl+C ends the reader too, a write would raise
    BrokenPipeError inside a running training instead of letting it checkpoint.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "app.worker", "--runs-dir", str(runs_dir), "--device", device,
           "--parent", str(os.getpid())]
    with open(runs_dir / "worker.log", "ab") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def serve(runs_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860,
          auth: tuple[str, str] | None = None, device: str | None = None, block: bool = True,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, models_dir: str | None = None):
    """Mark jobs of a previous app run that died with it, start the worker, serve the pages."""
    runs = Path(runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    store = JobStore(runs / "jobs.sqlite")
    interrupted = store.recover()
    if interrupted:
        log.warning("jobs %s were interrupted when the app last stopped; Resume continues them", interrupted)
    ctx = AppContext(runs, store, device or default_device(), Path(models_dir).resolve() if models_dir else None)
    worker = start_worker(runs, ctx.device)

    def stop_worker() -> None:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # a running training checkpoints, then stops
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()

    atexit.register(stop_worker)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=8)
    scheme = "https" if ssl_certfile else "http"
    print(f"mixofshow app: {scheme}://{host}:{port}  (runs folder {runs}; jobs on {ctx.device}; "
          f"worker log {runs / 'worker.log'})", flush=True)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        allowed_paths=[str(runs)],
        max_file_size=LIMITS.max_bytes,
        prevent_thread_lock=not block,
        footer_links=["gradio"],
        quiet=True,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_verify=False,  # a self-signed certificate is the common case on one's own machine
        # failed logins slow down, then lock the client out (app/login.py)
        app_kwargs={"middleware": [Middleware(LoginThrottle)]} if auth else None,
    )
