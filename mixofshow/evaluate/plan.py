"""What a comparison runs: one ordinary training run per (optimizer, seed), with fair settings.

Every run trains the same config (data, concept, LoRA rank, schedule) with the same step budget
and seed list; only the LoRA optimizer, its learning rates and hyper-parameters differ. Learning
rates per optimizer come from, in order: the config's ``optimizers:`` table, the registry's
``recommended_lr`` (README "Optimizers"), the config's own ``optimizer`` section. The token
embeddings always train with AdamW at the config's ``lr_embedding`` (the same for all runs).

The ``optimizers:`` table (top level of the training config; only ``mixofshow compare`` reads
it, ``mixofshow train`` rejects the key; ``configs/README.md``)::

    optimizers:
      adamw: {lr_unet: 1.0e-4, lr_text_encoder: 1.0e-5}
      adams: {lr_unet: 3.0e-4, lr_text_encoder: 3.0e-5, params: {damping: 1.0e-6}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixofshow.utils.config import ConfigError, from_dict, load_yaml

__all__ = ["OptimizerEntry", "RunPlan", "COMPARE_KEYS", "check_names", "read_optimizers_table", "resolve_lrs", "run_plan"]

COMPARE_KEYS = ("optimizers",)  # top-level keys of a training config that only compare reads


@dataclass
class OptimizerEntry:
    lr_unet: float | None = None  # UNet LoRA learning rate (null: registry / config default)
    lr_text_encoder: float | None = None  # text-encoder LoRA learning rate
    params: dict[str, Any] | None = None  # the optimizer's hyper-parameters (null: registry defaults)


@dataclass
class RunPlan:
    name: str  # folder name under the comparison's runs/ (or grid/)
    optimizer: str
    seed: int
    lr_unet: float
    lr_text_encoder: float
    lr_source: str  # "optimizers table", "registry recommended_lr", "config optimizer section", "+ lr grid x..."
    params: dict[str, Any]
    output_dir: str
    steps: int
    kind: str = "run"  # "run" or "grid"
    device: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def read_optimizers_table(path: str | os.PathLike) -> dict[str, OptimizerEntry]:
    data = load_yaml(path).get("optimizers") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: optimizers: expected a mapping of optimizer name -> settings")
    return {name: from_dict(OptimizerEntry, value, where=str(path), key=f"optimizers.{name}") for name, value in data.items()}


def resolve_lrs(name: str, config, table: dict[str, OptimizerEntry]) -> tuple[float, float, str]:
    """(lr_unet, lr_text_encoder, where they came from) for optimizer ``name``."""
    from mixofshow.optim import get_spec

    spec = get_spec(name)
    entry = table.get(name)
    recommended = dict(getattr(spec, "recommended_lr", {}) or {})
    opt = config.optimizer
    if entry is not None and entry.lr_unet is not None:
        text = entry.lr_text_encoder if entry.lr_text_encoder is not None else recommended.get("text_encoder", opt.lr_text_encoder)
        return entry.lr_unet, text, "optimizers table"
    if recommended.get("unet") is not None:
        return recommended["unet"], recommended.get("text_encoder", opt.lr_text_encoder), "registry recommended_lr"
    return opt.lr_unet, opt.lr_text_encoder, "config optimizer section"


def _params(name: str, config, table: dict[str, OptimizerEntry]) -> dict[str, Any]:
    entry = table.get(name)
    if entry is not None and entry.params is not None:
        return dict(entry.params)
    # the config's hyper-parameters are meant for its own optimizer; the others get their defaults
    return dict(config.optimizer.params) if name == config.optimizer.name else {}


def _slug(value: float) -> str:
    return f"{value:.3g}".replace("+", "")


def run_plan(
    config, table: dict[str, OptimizerEntry], optimizers: list[str], seeds: list[int], steps: int,
    output_dir: Path, lr_factors: dict[str, float] | None = None, kind: str = "run",
) -> list[RunPlan]:
    """One :class:`RunPlan` per (optimizer, seed); ``lr_factors`` scales both LoRA lrs per optimizer."""
    plans = []
    for name in optimizers:
        lr_u, lr_t, source = resolve_lrs(name, config, table)
        factor = (lr_factors or {}).get(name, 1.0)
        if factor != 1.0:
            lr_u, lr_t, source = lr_u * factor, lr_t * factor, f"{source} x {factor:g} (lr grid)"
        params = _params(name, config, table)
        for seed in seeds:
            folder = f"{name}_lr{_slug(lr_u)}_seed{seed}"
            out = output_dir / "runs" / folder if kind == "run" else output_dir / folder
            overrides = {
                "name": config.name,
                "output_dir": str(out),
                "seed": seed,
                "optimizer.name": name,
                "optimizer.lr_unet": lr_u,
                "optimizer.lr_text_encoder": lr_t,
                "optimizer.params": params,
                "train.max_steps": steps,
                "validation.every": -1,  # the comparison samples every run itself, identically
            }
            plans.append(RunPlan(folder, name, seed, lr_u, lr_t, source, params, str(out), steps, kind,
                                 overrides=overrides))
    return plans


def check_names(optimizers: list[str]) -> list[str]:
    from mixofshow.optim import get_spec

    if not optimizers:
        raise ValueError("--optimizers: give at least one optimizer name (`mixofshow optimizers` lists them)")
    for name in optimizers:
        get_spec(name)
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"--optimizers: {optimizers} names an optimizer twice")
    return optimizers

