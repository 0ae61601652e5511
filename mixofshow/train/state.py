"""Run state: what a run has done so far, saved in every checkpoint and reported in ``metrics.json``.

A checkpoint (``mixofshow/train/checkpoint.py``) holds the trainable tensors, both optimizers'
states, the RNG states, the resolved config and the :class:`RunState` (steps, every step's loss,
the time spent, ...), so that metrics cover the whole run across any number of stops and resumes.
``metrics.json`` is rewritten atomically at every checkpoint and at the end; it is strict JSON
(a non-finite number is written as ``null``).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mixofshow.train.build import Setup
from mixofshow.train.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from mixofshow.train.finite import NonFiniteError
from mixofshow.utils.config import ConfigError, to_dict
from mixofshow.utils.finite import first_non_finite
from mixofshow.utils.io import atomic_write_text

__all__ = [
    "RunState", "OptimizerClock", "save_run", "restore_run", "build_metrics", "write_metrics", "peak_memory_mb",
    "recorded_seconds",
]


@dataclass
class RunState:
    step: int = 0  # optimizer steps done (skipped steps included)
    losses: list[float | None] = field(default_factory=list)  # one per step; None: the step was skipped
    seconds: float = 0.0  # wall time of every session of the run, up to the last update
    timed_steps: int = 0  # steps whose time is in step_seconds (steps redone after a kill count twice)
    step_seconds: float = 0.0  # wall time inside steps: forward, backward, check, update
    optimizer_steps: int = 0
    optimizer_seconds: float = 0.0  # wall time of the LoRA optimizer's step()
    peak_memory_mb: float = 0.0  # the highest of every session
    skipped_steps: int = 0  # steps dropped by train.nan_policy = skip-step
    embeddings_frozen: bool = False
    _session: tuple[float, float] = field(default=(0.0, 0.0), repr=False, compare=False)  # not saved

    def start_session(self) -> None:
        self._session = (time.perf_counter(), self.seconds)

    def update(self, device: torch.device) -> None:
        """Bring ``seconds`` and ``peak_memory_mb`` up to now."""
        started, before = self._session
        self.seconds = before + time.perf_counter() - started
        self.peak_memory_mb = max(self.peak_memory_mb, peak_memory_mb(device))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        return cls(**{k: v for k, v in data.items() if k in known})


class OptimizerClock:
    """Times the LoRA optimizer's ``step()`` into a :class:`RunState` without a host sync.

    On the CPU with ``perf_counter``; on CUDA with a pair of events per step, read once they have
    completed (:meth:`collect`, called after the next step's sync or with ``wait`` at a save).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[Any, Any]] = []

    @contextmanager
    def time(self, state: RunState) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            state.optimizer_seconds += time.perf_counter() - start
            state.optimizer_steps += 1
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((start, end))

    def collect(self, state: RunState, wait: bool = False) -> None:
        still = []
        for start, end in self.pending:
            if wait or end.query():
                end.synchronize()
                state.optimizer_seconds += start.elapsed_time(end) / 1000.0
                state.optimizer_steps += 1
            else:
                still.append((start, end))
        self.pending = still


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory torch has allocated on ``device``; else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def save_run(setup: Setup, state: RunState) -> Path:
    """Write checkpoint ``step_{state.step}`` (and prune old ones); never one with NaN weights."""
    config = setup.config
    trainable = {k: v.detach() for k, v in setup.trainable().items()}
    bad = first_non_finite(trainable)
    if bad is not None:
        raise NonFiniteError(f"step {state.step}: tensor {bad!r} is not finite; no checkpoint written", state.step)
    state.update(setup.accelerator.device)
    extra = {
        "optimizer": setup.optimizer.state_dict(),
        "emb_optimizer": setup.emb_optimizer.state_dict(),
        "embeddings_frozen": state.embeddings_frozen,
        "optimizer_name": setup.spec.name,
        "lr_schedule": {"name": config.train.lr_schedule, "max_steps": config.train.max_steps,
                        "warmup_steps": config.train.warmup_steps, "next_step": state.step},
        "config": to_dict(config),
        "run": state.to_dict(),
    }
    folder = Path(config.output_dir) / "checkpoints"
    path = save_checkpoint(folder, state.step, trainable, extra)
    prune_checkpoints(folder, config.train.keep_checkpoints)
    return path


def restore_run(setup: Setup, path: Path) -> RunState:
    """Load checkpoint ``path`` into ``setup`` (weights, optimizers, RNG); returns its run state."""
    ckpt = load_checkpoint(path)
    saved_name = ckpt.state.get("optimizer_name")
    if saved_name != setup.spec.name:
        raise ConfigError(
            f"{path}: checkpoint was trained with optimizer {saved_name!r}, the config asks for "
            f"{setup.spec.name!r}; resume with the same optimizer or start a new output_dir"
        )
    params = setup.trainable()
    if set(params) != set(ckpt.trainable):
        odd = sorted(set(params) ^ set(ckpt.trainable))[0]
        raise ConfigError(f"{path}: checkpoint does not match the configured model (parameter {odd!r})")
    with torch.no_grad():
        for name, p in params.items():
            saved = ckpt.trainable[name]
            if saved.shape != p.shape:
                raise ConfigError(f"{path}: {name!r} has shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
            p.copy_(saved)
    for key, optimizer in (("optimizer", setup.optimizer), ("emb_optimizer", setup.emb_optimizer)):
        try:
            optimizer.load_state_dict(ckpt.state[key])
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"{path}: the saved {key.replace('_', ' ')} state does not fit this run ({err}); "
                "start a new run with --overwrite or another output_dir"
            ) from None
    if "run" in ckpt.state:
        state = RunState.from_dict(ckpt.state["run"])
    else:  # a checkpoint written before the run state was saved: its losses are unknown
        state = RunState(step=ckpt.step, losses=[None] * ckpt.step)
    state.step = ckpt.step
    state.embeddings_frozen = bool(ckpt.state["embeddings_frozen"])
    if state.embeddings_frozen:
        setup.freeze_embeddings()
    return state


def _finite_losses(losses: list[float | None]) -> list[float]:
    return [x for x in losses if x is not None and math.isfinite(x)]


def build_metrics(
    setup: Setup, state: RunState, *, stopped: bool, concept_path: Path | None, error: str | None = None
) -> dict[str, Any]:
    """The ``metrics.json`` document of the run as it stands.

    Its keys are listed in ``configs/README.md``, "Run folders and resuming".
    """
    config = setup.config
    finite = _finite_losses(state.losses)
    last_10 = finite[-10:]
    return {
        "name": config.name,
        "optimizer": setup.spec.name,
        "steps": state.step,
        "max_steps": config.train.max_steps,
        "stopped": stopped,
        "finished": concept_path is not None and state.step >= config.train.max_steps,
        "seconds": round(state.seconds, 3),
        "seconds_per_step": state.step_seconds / state.timed_steps if state.timed_steps else None,
        "optimizer_step_seconds": (
            state.optimizer_seconds / state.optimizer_steps if state.optimizer_steps else None
        ),
        "peak_memory_mb": round(state.peak_memory_mb, 1),
        "losses": list(state.losses),
        "final_loss": finite[-1] if finite else None,
        "mean_loss_last_10": sum(last_10) / len(last_10) if last_10 else None,
        "skipped_steps": state.skipped_steps,
        "embeddings_frozen": state.embeddings_frozen,
        "concept_path": str(concept_path) if concept_path else None,
        "error": error,
    }


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def recorded_seconds(output_dir: Path, step: int) -> float:
    """The run's total ``seconds`` in ``metrics.json`` when it describes ``step``, else 0.

    The last checkpoint of a finished run is written before the concept file and the final
    validation; the metrics written after them hold the run's true total, which a resume that
    extends the run must continue from."""
    try:
        metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return 0.0
    seconds = metrics.get("seconds") if metrics.get("steps") == step else None
    return float(seconds) if isinstance(seconds, (int, float)) else 0.0


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> None:
    """Rewrite ``metrics.json`` atomically as strict JSON (non-finite numbers become null)."""
    text = json.dumps(_strict(metrics), indent=2, allow_nan=False)
    atomic_write_text(Path(output_dir) / "metrics.json", text + "\n")
