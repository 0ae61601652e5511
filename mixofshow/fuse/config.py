"""The fusion config: which concept files, with which weights, fused how, written where.

``configs/fuse_example.yaml`` is a documented example. Relative concept paths are taken from the
current directory (where ``mixofshow train`` wrote ``runs/<name>/<name>.safetensors``), falling
back to the config file's folder; output paths are relative to the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mixofshow.utils.config import ConfigError, from_dict, load_yaml

__all__ = ["METHODS", "FuseConceptConfig", "FuseConfig", "config_summary", "load_fuse_config"]

METHODS = ("closed-form", "lbfgs", "weight")


@dataclass
class FuseConceptConfig:
    file: str  # a concept file written by `mixofshow train` (.safetensors)
    text_encoder_alpha: float = 1.0  # a_i for the text-encoder LoRA: W_i = W0 + a_i dW_i
    unet_alpha: float = 1.0  # a_i for the UNet LoRA (the original's defaults are 1.0 each)
    prompt: str | None = None  # the concept as written in prompts; null: its words joined ("<cat1> <cat2>")


@dataclass
class FuseConfig:
    concepts: list[FuseConceptConfig]  # two or more concept files (one also works: re-solves it)
    output: str = "runs/fused/fused.safetensors"  # the compact fused file
    base_model: str | None = None  # null: the base model recorded in the concept files
    base_model_config: str | None = None  # for a single-file base model: its diffusers config folder
    # closed-form: seconds; lbfgs: the original's iterative solve (for comparison; minutes per
    # layer on a CPU at SD 1.5 sizes); weight: the average W0 + sum_i (a_i / N) dW_i (no recording)
    method: Literal["closed-form", "lbfgs", "weight"] = "closed-form"
    diffusers_output: str | None = None  # also write a full diffusers folder here (null: no)
    ridge: float = 1e-6  # closed form: lam = ridge * mean(diag(sum_i G_i)), anchored at W0
    spatial_steps: int = 20  # sampler steps recorded per concept for the spatial layers (original: 20)
    resolution: int | None = None  # pixels of the spatial-stage samples; null: the model's native size
    lbfgs_text_iters: int = 500  # lbfgs: iterations for text-encoder and K/V layers (original: 500)
    lbfgs_unet_iters: int = 50  # lbfgs: iterations for spatial layers (original: 50)
    device: str | None = None  # null: CUDA when available, else CPU
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # model dtype while recording (Grams are float64)
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of the stored weight changes
    seed: int = 0  # noise of the spatial-stage samples

    def __post_init__(self) -> None:
        if not self.concepts:
            raise ValueError("concepts: list at least one concept file, e.g. [{file: runs/cat/cat.safetensors}]")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.spatial_steps < 1:
            raise ValueError(f"spatial_steps must be >= 1, got {self.spatial_steps}")
        if self.lbfgs_text_iters < 1 or self.lbfgs_unet_iters < 1:
            raise ValueError("lbfgs_text_iters and lbfgs_unet_iters must be >= 1")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not self.output.endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")


def load_fuse_config(path: str | os.PathLike, overrides: dict | None = None) -> FuseConfig:
    """Read a YAML fusion config; ``overrides`` (top-level keys) win over the file."""
    path = Path(path)
    data = load_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = from_dict(FuseConfig, data, where=str(path))
    for index, concept in enumerate(config.concepts):
        concept.file = _resolve(concept.file, path.parent)
        if not Path(concept.file).is_file():
            raise ConfigError(
                f"{path}: concepts[{index}].file: no such file: {concept.file} (train it first, "
                "e.g. `mixofshow train configs/example.yaml`)"
            )
    if config.base_model and not Path(config.base_model).exists() and (path.parent / config.base_model).exists():
        config.base_model = str(path.parent / config.base_model)
    return config


def _resolve(value: str, config_dir: Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or not (config_dir / p).exists():
        return str(p)
    return str(config_dir / p)


def config_summary(config: FuseConfig) -> dict:
    """The parts of the config worth recording in the fused file's metadata."""
    return {
        "method": config.method,
        "ridge": config.ridge,
        "spatial_steps": config.spatial_steps,
        "resolution": config.resolution,
        "lbfgs_text_iters": config.lbfgs_text_iters,
        "lbfgs_unet_iters": config.lbfgs_unet_iters,
        "seed": config.seed,
        "dtype": config.dtype,
    }

