"""The loop every pre-training stage shares: schedule, EMA, exact resume, evaluation, metrics.

A stage supplies ``loss(step) -> tensor`` (it draws its own batch from the step number, so the
data order and the noise are pure functions of ``(seed, stage, step)``) and
``evaluate() -> dict`` (run on the EMA weights). The loop does warm-up + cosine learning rate,
gradient clipping, an EMA of the weights, a checkpoint every ``checkpoint_every`` steps
(weights, EMA, optimizer, step and seconds spent, one ``.safetensors`` file written atomically)
and an evaluation every ``eval_every`` steps, appended to ``metrics.json``. Killing the process
loses at most the steps since the last checkpoint; resuming repeats a straight run exactly on
the same device and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mixofshow.utils.io import atomic_write_text, flatten_state, load_safetensors, save_safetensors, unflatten_state

__all__ = ["StageConfig", "Ema", "batch_indices", "step_generator", "run_stage", "read_metrics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageConfig:
    steps: int  # optimizer steps in all
    batch: int  # scenes per step
    lr: float  # peak AdamW learning rate
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0
    ema: float = 0.999  # EMA decay of the weights (warmed up as (1 + s) / (10 + s))
    clip: float = 1.0  # gradient-norm clipping
    eval_every: int = 500
    checkpoint_every: int = 250


def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


class Ema:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(self.shadow, strict=False)


def _stream_seed(seed: int, stage: str, *parts: int) -> int:
    """A 63-bit seed derived from the run seed, the stage name and integers (stable across runs)."""
    rng = np.random.default_rng([seed, *[ord(c) for c in stage], *parts])
    return int(rng.integers(0, 2**63 - 1))


def batch_indices(n: int, batch: int, step: int, seed: int, stage: str) -> np.ndarray:
    """Scene indices of ``step``: consecutive slices of a fresh permutation per epoch."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng(_stream_seed(seed, stage, epoch)).permutation(n)
    return perm[k * batch : (k + 1) * batch]


def step_generator(seed: int, stage: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one step (noise, timesteps, caption drop-out)."""
    return torch.Generator(device=device).manual_seed(_stream_seed(seed, stage, 1 << 30, step))


def read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {"evals": [], "seconds": 0.0}


def run_stage(
    name: str,
    folder: Path,
    module: nn.Module,
    cfg: StageConfig,
    loss: Callable[[int], torch.Tensor],
    evaluate: Callable[[], dict],
    max_minutes: float | None = None,
    inputs: str = "",
) -> dict:
    """Train ``module`` for ``cfg.steps`` from the latest checkpoint in ``folder``; returns metrics.

    At the end (or after ``max_minutes``, at a checkpoint) the EMA weights are left in ``module``
    only when the stage is complete; ``metrics.json`` says ``"done": true`` then. The checkpoint
    records ``cfg`` and ``inputs`` (what the stage is built on, e.g. the sha256 of the frozen VAE
    the UNet learns the latents of); resuming with other ones is an error, not a silent mix.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "checkpoint.safetensors"
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = Ema(module, cfg.ema)
    metrics = read_metrics(folder)
    start = 0
    if ckpt.is_file():
        start = _load(ckpt, module, ema, opt, cfg, inputs)
        log.info("%s: resumed at step %d from %s", name, start, ckpt)
    metrics["config"] = asdict(cfg)
    started, spent0 = time.monotonic(), metrics.get("seconds", 0.0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, unit="step", mininterval=5)
    step = start
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        value = loss(step)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        ema.update(module, step)
        bar.set_postfix(loss=f"{value.item():.4f}", refresh=False)
        done = step + 1
        last = done == cfg.steps
        out_of_time = max_minutes is not None and time.monotonic() - started > max_minutes * 60
        if done % cfg.checkpoint_every == 0 or last or out_of_time:
            metrics["seconds"] = spent0 + time.monotonic() - started
            metrics["step"] = done
            if done % cfg.eval_every == 0 or last:
                metrics["evals"].append({"step": done, "loss": value.item(), **_eval_ema(module, ema, evaluate)})
                log.info("%s step %d: %s", name, done, metrics["evals"][-1])
            _save(ckpt, module, ema, opt, done, cfg, inputs)
            atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=1))
            if out_of_time and not last:
                log.info("%s: stopped after %.0f min at step %d (resumable)", name, max_minutes, done)
                return metrics
    ema.copy_to(module)
    metrics["done"] = True
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def _eval_ema(module: nn.Module, ema: Ema, evaluate: Callable[[], dict]) -> dict:
    live = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ema.copy_to(module)
    module.eval()
    try:
        with torch.no_grad():
            return evaluate()
    finally:
        module.load_state_dict(live)
        module.train()


def _save(path: Path, module: nn.Module, ema: Ema, opt: torch.optim.Optimizer, step: int, cfg: StageConfig,
          inputs: str) -> None:
    opt_tensors, skeleton = flatten_state(opt.state_dict(), "opt")
    tensors = {**{f"model.{k}": v for k, v in module.state_dict().items()},
               **{f"ema.{k}": v for k, v in ema.shadow.items()}, **opt_tensors}
    save_safetensors(path, tensors, {"step": str(step), "optimizer": json.dumps(skeleton),
                                     "config": json.dumps(asdict(cfg), sort_keys=True), "inputs": inputs})


def _load(path: Path, module: nn.Module, ema: Ema, opt: torch.optim.Optimizer, cfg: StageConfig, inputs: str) -> int:
    tensors, meta = load_safetensors(path)
    for key, now in (("config", json.dumps(asdict(cfg), sort_keys=True)), ("inputs", inputs)):
        if key in meta and meta[key] != now:
            raise ValueError(f"{path}: made with {key} {meta[key]}, now {now}; it cannot continue this stage "
                             "(delete it to start the stage again)")
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema.shadow:
        ema.shadow[k].copy_(tensors[f"ema.{k}"])
    opt.load_state_dict(unflatten_state(json.loads(meta["optimizer"]), {k: v for k, v in tensors.items() if k.startswith("opt.")}))
    return int(meta["step"])
