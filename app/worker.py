"""The job worker: a separate process that runs queued jobs one at a time on one device.

The web server starts it (``python -m app.worker --runs-dir DIR --device DEV --parent PID``) and
only talks to it through the job store (``app/jobs.py``), so a closed browser tab never stops a
job (Gradio cancels an event's generator when its page disconnects; nothing here runs in one).
When the server goes away (its pid changes under us) or the worker gets SIGTERM / SIGINT, a
running training job is asked to stop at the next step (which writes a checkpoint) and is
recorded as ``interrupted``, ready to resume; a hard deadline then ends the process anyway.

Each job logs to ``<run folder>/app.log``. The worker drives the library only:
``mixofshow.train.loop.train``, ``mixofshow.fuse.run.fuse_concepts``,
``mixofshow.sample.pipeline.iter_samples``, ``mixofshow.evaluate.compare``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from app.jobs import Job, JobStore

__all__ = ["TrainingRate", "main", "run_job", "run_worker"]

log = logging.getLogger("app.worker")


class TrainingRate:
    """Seconds per training step, counting only the time between training steps: the time a
    validation or checkpoint takes (reported when it is done) is left out, so the ETA is the time
    the remaining steps need, not inflated by the samples drawn so far."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0
        self.prev: tuple[float, int] | None = None

    def update(self, phase: str, step: int, now: float) -> float | None:
        if phase == "train" and self.prev is not None and step > self.prev[1]:
            self.seconds += now - self.prev[0]
            self.steps += step - self.prev[1]
        self.prev = (now, step)
        return self.seconds / self.steps if self.steps else None

_REPORT_EVERY = 0.5  # seconds between progress writes while training
_SHUTDOWN_GRACE = 20.0  # seconds a running job gets to checkpoint after the server died



def _train(store: JobStore, job: Job, shutdown: threading.Event) -> str:
    from mixofshow.train.config import load_train_config
    from mixofshow.train.loop import train

    run_dir = Path(job.run_dir)
    request = run_dir / "app_request.yaml"
    if not request.is_file():  # first start; a resume keeps the file it started with
        from mixofshow.utils.io import atomic_write_text

        atomic_write_text(request, yaml.safe_dump(job.config["train"], sort_keys=False))
    config = load_train_config(request, {"output_dir": str(run_dir), "train.device": job.device})
    clock = {"last": 0.0}
    rate = TrainingRate()
    pending: list[tuple[int, float]] = []
    state: dict[str, Any] = {}

    def progress(p) -> None:
        now = time.perf_counter()
        seconds_per_step = rate.update(p.phase, p.step, now)
        if p.phase == "train" and p.loss is not None:
            pending.append((p.step, float(p.loss)))
        state.update(step=p.step, max_steps=p.max_steps, loss=p.loss, lr=p.lr, phase=p.phase,
                     seconds_per_step=seconds_per_step,
                     eta=seconds_per_step * (p.max_steps - p.step) if seconds_per_step else None)
        if p.path:
            state[f"last_{p.phase}"] = p.path
        if p.phase != "train" or now - clock["last"] >= _REPORT_EVERY or p.step == p.max_steps:
            store.report(job.id, dict(state), list(pending))
            pending.clear()
            clock["last"] = now

    def commands() -> list[str]:
        requests = store.take_commands(job.id)
        return requests + ["stop"] if shutdown.is_set() else requests

    result = train(config, progress=progress, resume=job.resume, commands=commands)
    store.report(job.id, dict(state, concept=str(result.concept_path) if result.concept_path else None),
                 list(pending))
    if result.stopped:
        return "interrupted" if shutdown.is_set() else "stopped"
    return "done"


def _fuse(store: JobStore, job: Job, shutdown: threading.Event) -> str:
    from mixofshow.fuse.config import FuseConfig
    from mixofshow.fuse.run import fuse_concepts
    from mixofshow.utils.config import from_dict

    config = from_dict(FuseConfig, dict(job.config["fuse"], device=job.device), where=f"job #{job.id}")
    store.report(job.id, {"phase": "loading", "concepts": len(config.concepts)})
    started = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        eta = (time.perf_counter() - started) / done * (total - done) if done else None
        store.report(job.id, {"phase": f"fusing ({stage})", "done": done, "total": total, "unit": "layers",
                              "eta": eta, "concepts": len(config.concepts)})

    outcome = fuse_concepts(config, progress=False, on_progress=progress)
    store.report(job.id, {"phase": "done", "output": str(outcome.output), "seconds": round(outcome.seconds, 2)})
    return "done"


def _sample(store: JobStore, job: Job, shutdown: threading.Event) -> str:
    import torch

    from mixofshow.models.loading import load_pipeline
    from mixofshow.sample.load import load_adapter
    from mixofshow.sample.pipeline import SampleConfig, check_inputs, iter_samples

    from mixofshow.sample.adapters import conditions_from_data

    c = dict(job.config["sample"])
    c["conditions"] = conditions_from_data(c.get("conditions"), f"job #{job.id}") or None
    config = SampleConfig(**c, output_dir=job.run_dir)
    check_inputs(config)
    total = len(config.prompts) * config.num_images
    store.report(job.id, {"phase": "loading", "done": 0, "total": total})
    pipe = load_pipeline(config.base_model)
    adapter = load_adapter(pipe, config.concept, lora_scale=config.lora_scale)
    pipe.to(torch.device(job.device))
    done, started = 0, time.perf_counter()  # the clock starts after the model load: ETA of the images only
    for _ in iter_samples(pipe, adapter.encoder, config, progress=False):
        done += 1
        per_image = (time.perf_counter() - started) / done
        store.report(job.id, {"phase": "sampling", "done": done, "total": total,
                              "seconds_per_image": per_image, "eta": per_image * (total - done)})
        if shutdown.is_set():
            return "interrupted"
        if "stop" in store.take_commands(job.id):
            return "stopped"
    store.report(job.id, {"phase": "done", "done": done, "total": total})
    return "done"


def _compare(store: JobStore, job: Job, shutdown: threading.Event) -> str:
    """``compare`` into the job's folder; a stop request cancels it, resubmitting resumes it."""
    from mixofshow.evaluate import compare
    from mixofshow.utils.io import atomic_write_text

    c = job.config["compare"]
    run_dir = Path(job.run_dir)
    train_cfg = dict(c["train"])
    train_cfg["train"] = dict(train_cfg.get("train") or {}, device=job.device)
    config_path = run_dir / "compare_config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(train_cfg, sort_keys=False))
    stop = {"asked": False}
    state: dict[str, Any] = {"runs": {}}
    clock = {"last": 0.0}

    def should_stop() -> bool:
        if shutdown.is_set() or "stop" in store.take_commands(job.id):
            stop["asked"] = True
        return stop["asked"]

    def progress(p) -> None:
        state.update(phase=p.phase, run=p.run, step=p.step, total=p.total, runs_done=p.runs_done,
                     runs_total=p.runs_total, eta=p.eta_seconds, message=p.message)
        if p.run and p.phase in ("train", "lr-grid"):
            state["runs"][p.run] = [p.step, p.total]
        now = time.perf_counter()
        if p.phase not in ("train", "lr-grid") or now - clock["last"] >= _REPORT_EVERY or p.step == p.total:
            store.report(job.id, dict(state))
            clock["last"] = now

    result = compare(config_path, c["optimizers"], seeds=c["seeds"], steps=c["steps"], output_dir=run_dir,
                     progress=progress, should_stop=should_stop, **c.get("options", {}))
    if result.cancelled:
        store.report(job.id, dict(state, phase="cancelled"))
        return "interrupted" if shutdown.is_set() else "stopped"
    store.report(job.id, dict(state, phase="done", clip_note=result.clip_note,
                              files={k: str(v) for k, v in result.files.items()}))
    return "done"


_RUNNERS = {"train": _train, "fuse": _fuse, "sample": _sample, "compare": _compare}


def run_job(store: JobStore, job: Job, shutdown: threading.Event | None = None) -> str:
    """Run one claimed job to its end; records and returns its final state."""
    shutdown = shutdown or threading.Event()
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "app.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    error = None
    try:
        log.info("job #%d (%s %s) starts on %s%s", job.id, job.kind, job.name, job.device,
                 " (resume)" if job.resume else "")
        state = _RUNNERS[job.kind](store, job, shutdown)
    except (ValueError, FileNotFoundError) as err:  # the user's config or files: say what is wrong
        log.error("job #%d failed: %s", job.id, err)
        state, error = "failed", str(err)
    except Exception as err:  # a bug: keep the traceback in the run's log
        log.error("job #%d crashed:\n%s", job.id, traceback.format_exc())
        state, error = "failed", f"internal error ({type(err).__name__}: {err}); the traceback is in {handler.baseFilename}"
    finally:
        root.removeHandler(handler)
        handler.close()
    store.finish(job.id, state, error)
    log.info("job #%d: %s", job.id, state)
    return state


def run_worker(runs_dir: str | os.PathLike, device: str, parent: int | None = None, poll: float = 0.5) -> None:
    """Claim and run jobs for ``device`` until the parent process (the web server) is gone."""
    store = JobStore(Path(runs_dir) / "jobs.sqlite")
    shutdown = threading.Event()

    def on_signal(signum, frame) -> None:
        shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watchdog() -> None:
        while not shutdown.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("the app server is gone: stopping the running job")
                shutdown.set()
            time.sleep(0.2)
        time.sleep(_SHUTDOWN_GRACE)
        log.error("the running job did not stop within %.0f s; exiting", _SHUTDOWN_GRACE)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()
    log.info("worker %d serves %s on %s", os.getpid(), runs_dir, device)
    while not shutdown.is_set():
        job = store.claim(device, os.getpid())
        if job is None:
            time.sleep(poll)
            continue
        run_job(store, job, shutdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.worker", description="the app's job worker")
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--parent", type=int, help="exit when this process (the web server) is gone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mixofshow.utils.memory import tune_cpu_allocator

    tune_cpu_allocator()
    run_worker(args.runs_dir, args.device, args.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
