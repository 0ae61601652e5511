"""One comparison run, start to finish, and several of them in worker processes.

A run is an ordinary training run folder (``mixofshow train`` writes the same): it is trained
with ``resume=True`` (a finished run is skipped, an unfinished one continues from its newest
checkpoint), then sampled with the comparison's prompts and seeds into ``eval_samples/`` and
measured on the held-out draws (``heldout.json``). Each step is skipped when its output is
complete, so calling again after a crash or a cancellation repeats nothing that was finished.
``compare_losses.json`` keeps every step's loss and wall time as seen through the progress
callback, for metrics files that do not list them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixofshow.evaluate.plan import COMPARE_KEYS, RunPlan

__all__ = ["SampleSettings", "execute_run", "read_json", "run_all", "run_finished"]

log = logging.getLogger(__name__)

Report = Callable[[str, str, int, int], None]  # (run, phase, step, total)


@dataclass
class SampleSettings:
    prompts: list[str] = field(default_factory=list)  # concept words as trained
    num_images: int = 2  # per prompt, seeds seed..seed+N-1 (the same for every run)
    seed: int = 0
    steps: int = 20  # sampler steps
    guidance_scale: float = 7.5
    scheduler: str = "ddim"  # Mix-of-Show's evaluation sampler
    heldout_draws: int = 16  # draws of the held-out denoising loss (heldout.py)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_finished(out: Path, max_steps: int) -> bool:
    """True when the folder holds a complete training run of ``max_steps`` steps."""
    metrics = read_json(out / "metrics.json")
    concept = metrics.get("concept_path")
    finished = metrics.get("finished", not metrics.get("stopped", True) and metrics.get("steps", 0) >= max_steps)
    return bool(finished) and metrics.get("steps") == max_steps and bool(concept) and Path(concept).is_file()


def _load_config(config_path: str, plan: RunPlan):
    from mixofshow.train.config import load_train_config

    return load_train_config(config_path, plan.overrides, ignore=COMPARE_KEYS)


def _check_same_run(out: Path, config) -> None:
    """A folder written for other settings is an error, never silently resumed."""
    import yaml

    from mixofshow.utils.config import to_dict

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    wanted = yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False))
    for section in set(saved) | set(wanted):
        a, b = saved.get(section), wanted.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = {k: v for k, v in a.items() if k != "device"}, {k: v for k, v in b.items() if k != "device"}
        if a != b:
            raise ValueError(
                f"{saved_path}: this run folder holds a run with other settings (key {section!r}); "
                "use another --output-dir or delete the folder"
            )


def _train(config, plan: RunPlan, report: Report, should_stop) -> bool:
    """Train (or resume); returns False when stopped. Keeps the per-step record up to date."""
    from mixofshow.train.loop import train
    from mixofshow.utils.io import atomic_write_text

    out = Path(plan.output_dir)
    record_path = out / "compare_losses.json"
    record = read_json(record_path)
    losses, seconds = list(record.get("losses", [])), list(record.get("step_seconds", []))
    last = {"step": None, "elapsed": None}

    def save() -> None:
        atomic_write_text(record_path, json.dumps({"losses": losses, "step_seconds": seconds}))

    def progress(p) -> None:
        if p.phase == "train" and p.loss is not None:
            if last["step"] is None:  # first step of this call: drop what a killed call left after the checkpoint
                del losses[p.step - 1 :], seconds[p.step - 1 :]
            losses.append(float(p.loss))
            timed = last["elapsed"] is not None  # the first step of a call includes building the model
            seconds.append(p.elapsed - last["elapsed"] if timed else None)
            last.update(step=p.step, elapsed=p.elapsed)
            report(plan.name, "train", p.step, p.max_steps)
        elif p.phase in ("checkpoint", "done", "stopped"):
            save()

    result = train(config, progress=progress, should_stop=should_stop, resume=True)
    save()
    return not result.stopped


def _sampled(folder: Path, settings: SampleSettings) -> bool:
    index = read_json(folder / "index.json")
    images = index.get("images", [])
    want = [(p, settings.seed + k) for p in settings.prompts for k in range(settings.num_images)]
    have = [(e.get("prompt"), e.get("seed")) for e in images if e.get("steps") == settings.steps
            and e.get("scheduler") == settings.scheduler and (folder / e.get("file", "")).is_file()]
    return have == want


def execute_run(config_path: str, plan: RunPlan, settings: SampleSettings, report: Report,
                should_stop: Callable[[], bool] | None = None) -> str:
    """Train, sample and measure one run; returns ``"done"``, ``"stopped"`` or ``"diverged"``
    (training hit a NaN / inf and stopped, ``train.nan_policy``; it is reported, not retried)."""
    from mixofshow.utils.io import atomic_write_text

    config = _load_config(config_path, plan)
    out = Path(plan.output_dir)
    _check_same_run(out, config)
    if not run_finished(out, plan.steps):
        if read_json(out / "metrics.json").get("error"):
            return "diverged"  # the same settings fail the same way again (training is deterministic)
        try:
            if not _train(config, plan, report, should_stop):
                return "stopped"
        except ValueError as err:
            if type(err).__name__ != "NonFiniteError":  # mixofshow.train.finite (train.nan_policy)
                raise
            log.warning("%s diverged: %s", plan.name, err)
            return "diverged"
    concept = read_json(out / "metrics.json")["concept_path"]
    samples = out / "eval_samples"
    heldout = read_json(out / "heldout.json")
    need_samples = plan.kind == "run" and not _sampled(samples, settings)
    need_heldout = heldout.get("draws") != settings.heldout_draws or heldout.get("concept") != concept
    if not (need_samples or need_heldout):
        return "done"
    if should_stop is not None and should_stop():
        return "stopped"
    import torch

    from mixofshow.concepts.edlora import EDLoRA
    from mixofshow.evaluate.heldout import HELDOUT_SEED, heldout_loss
    from mixofshow.models.loading import load_pipeline
    from mixofshow.sample.pipeline import SampleConfig, generate

    device = config.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(config.base_model, config=config.base_model_config)
    model = EDLoRA.from_concept(pipe, concept)
    pipe.to(device)
    if need_samples:
        report(plan.name, "sample", 0, len(settings.prompts) * settings.num_images)
        generate(pipe, model.encoder, SampleConfig(
            prompts=settings.prompts, num_images=settings.num_images, seed=settings.seed,
            steps=settings.steps, guidance_scale=settings.guidance_scale, scheduler=settings.scheduler,
            output_dir=samples, concept=concept, base_model=config.base_model,
        ), progress=False)
    if need_heldout:
        report(plan.name, "heldout", 0, settings.heldout_draws)
        loss = heldout_loss(config, concept, settings.heldout_draws, device, model=model)
        atomic_write_text(out / "heldout.json", json.dumps(
            {"loss": loss, "draws": settings.heldout_draws, "seed": HELDOUT_SEED, "concept": concept}))
    return "done"


# -- worker processes ---------------------------------------------------------------------
_DEVICE: str | None = None


def _init_worker(devices, threads: int) -> None:
    global _DEVICE
    import torch

    from mixofshow.utils.memory import tune_cpu_allocator

    _DEVICE = devices.get() if devices is not None else None
    torch.set_num_threads(threads)
    tune_cpu_allocator()


def _worker(config_path: str, plan: RunPlan, settings: SampleSettings, queue, stop) -> tuple[str, str]:
    if _DEVICE is not None:
        plan.overrides["train.device"] = _DEVICE

    def report(run, phase, step, total):
        queue.put((run, phase, step, total))

    return plan.name, execute_run(config_path, plan, settings, report, should_stop=stop.is_set)


def run_all(config_path: str, plans: list[RunPlan], settings: SampleSettings, report: Report,
            should_stop: Callable[[], bool] | None, jobs: int = 1, devices: list[str] | None = None) -> dict[str, str]:
    """Run every plan (in this process when ``jobs == 1`` and no devices); returns run -> status."""
    workers = len(devices) if devices else jobs
    if workers <= 1 or len(plans) <= 1:
        status = {}
        for plan in plans:
            if devices:
                plan.overrides["train.device"] = devices[0]
            if should_stop is not None and should_stop():
                status[plan.name] = "stopped"
                continue
            status[plan.name] = execute_run(config_path, plan, settings, report, should_stop)
        return status
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(plans))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")  # CUDA and fork do not mix
    with ctx.Manager() as manager:
        messages, stop = manager.Queue(), manager.Event()
        device_queue = None
        if devices:
            device_queue = manager.Queue()
            for d in devices[:workers]:
                device_queue.put(d)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(device_queue, threads)) as pool:
            pending = {pool.submit(_worker, config_path, plan, settings, messages, stop) for plan in plans}
            status: dict[str, str] = {}
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        report(*messages.get_nowait())
                    except queue_mod.Empty:
                        break
                if should_stop is not None and should_stop():
                    stop.set()
                for future in done:
                    name, result = future.result()  # a worker's error is raised here
                    status[name] = result
            while not messages.empty():
                report(*messages.get())
            return status

