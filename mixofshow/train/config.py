"""The training config: one dataclass per YAML section, each field with its meaning and advice.

``configs/README.md`` documents every key; ``configs/example.yaml`` runs as shipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixofshow.utils.config import Bounds, ConfigError, apply_overrides, check_bounds, from_dict, load_yaml

__all__ = [
    "DataConfig",
    "ConceptConfig",
    "LoRASection",
    "OptimizerConfig",
    "TrainLoopConfig",
    "ValidationConfig",
    "TrainConfig",
    "VALUE_BOUNDS",
    "load_train_config",
]


@dataclass
class DataConfig:
    concept_list: str  # concept-list JSON (Mix-of-Show layout); relative to the config file
    replace_mapping: dict[str, str] = field(default_factory=dict)  # {"<TOK>": "<w1> <w2>"}
    resolution: int = 512  # training crop size in pixels (the embedded model uses 64)
    use_masks: bool = True  # masked loss when the concept has masks
    shuffle_tags: bool = True  # shuffle caption tags, keeping the first
    flip_p: float = 0.5  # horizontal-flip probability
    templates: bool = True  # wrap captions in "a photo of a {}"-style templates
    buckets: bool = False  # aspect-ratio bucketing: each image at its own shape, area <= resolution^2 (no crop, no padding)


@dataclass
class ConceptConfig:
    words: list[str]  # concept words, e.g. ["<potter1>", "<potter2>"]
    class_words: dict[str, str] = field(default_factory=dict)  # word -> class word to copy (else random)
    init_std: float = 0.013  # std of the random initialisation of words without a class word
    freeze_norm: float | None = 0.55  # freeze embeddings once their mean norm reaches this (null: never)


@dataclass
class LoRASection:
    rank: int = 4
    scale: float = 1.0  # s in W0 + s B A (Mix-of-Show: alpha = 1, no 1/r)
    rank_dropout: float = 0.0  # DropLoRA; 0.3 is the paper's default when on
    text_encoder: bool = True
    unet: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # `mixofshow optimizers` lists the choices
    lr_embedding: float = 1e-3  # token embeddings (always AdamW)
    lr_text_encoder: float = 1e-5
    lr_unet: float = 1e-4
    weight_decay_embedding: float = 0.01
    params: dict[str, Any] = field(default_factory=dict)  # optimizer hyper-parameters, e.g. {betas: [0.9, 0.999]}


@dataclass
class TrainLoopConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_schedule: Literal["linear", "constant"] = "linear"  # linear: decay to 0 at max_steps
    warmup_steps: int = 0
    max_grad_norm: float | None = None  # clip the LoRA + embedding gradients and the full gradient G (null: off)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # fp16 needs CUDA; bf16 works on CPU too
    gradient_checkpointing: bool = False  # trade compute for memory
    noise_offset: float = 0.01  # noise += offset * randn(B, C, 1, 1)
    attention_reg_weight: float = 0.0  # Mix-of-Show's optional attention regularisation (0.01)
    min_snr_gamma: float | None = None  # Min-SNR loss weighting min(SNR, gamma) / SNR (null: off; kohya: 5)
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    log_every: int = 10  # steps between tensorboard scalars
    device: str | None = None  # null: accelerate's choice (CUDA when available)
    nan_policy: Literal["stop", "skip-step"] = "stop"  # non-finite loss/gradient: stop, or skip that step
    max_skipped_steps: int = 10  # skip-step: stop once more steps than this were skipped in the run


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validation sample grids (0: only at the end; -1: never)
    prompts: list[str] = field(default_factory=list)  # prompts with concept words
    prompts_file: str | None = None  # or a prompt list file (one per line)
    lora_scales: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    num_images: int = 2  # per prompt and scale (the original: 8, seeds 0..7)
    steps: int = 50  # sampler steps (DPM-Solver)
    guidance_scale: float = 7.5
    seed: int = 0
    negative_prompt: str = ""


@dataclass
class TrainConfig:
    data: DataConfig
    concept: ConceptConfig
    name: str = "concept"  # run and concept file name
    base_model: str = "embedded"  # "embedded", a hub id, a diffusers folder or a .safetensors file
    base_model_config: str | None = None  # for a single-file base model: its diffusers config folder
    output_dir: str = "runs/concept"  # everything of the run goes here
    seed: int = 0
    lora: LoRASection = field(default_factory=LoRASection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        check_bounds(self, VALUE_BOUNDS)
        if not self.concept.words:
            raise ValueError("concept.words must list at least one concept word, e.g. ['<potter1>']")
        for word in self.concept.class_words:
            if word not in self.concept.words:
                raise ValueError(f"concept.class_words names {word!r}, which is not in concept.words")
        _check_optimizer(self.optimizer)


def _check_optimizer(optimizer: OptimizerConfig) -> None:
    """An unknown ``optimizer.name`` or a bad ``optimizer.params`` entry fails at config load."""
    from mixofshow.optim.registry import check_hparams, get_spec  # imports torch: only when a config is built

    try:
        get_spec(optimizer.name)
    except ValueError as err:
        raise ValueError(f"optimizer.name: {err}") from None
    try:
        check_hparams(optimizer.name, optimizer.params)
    except ValueError as err:  # the message starts with the hyper-parameter's key
        raise ValueError(f"optimizer.params.{err}") from None


# Allowed values, checked whenever a TrainConfig is built (configs/README.md gives the meanings).
VALUE_BOUNDS: dict[str, Bounds] = {
    "data.resolution": Bounds(ge=8, multiple_of=8),
    "data.flip_p": Bounds(ge=0, le=1),
    "concept.init_std": Bounds(ge=0),
    "concept.freeze_norm": Bounds(gt=0),
    "lora.rank": Bounds(ge=1),
    "lora.scale": Bounds(),
    "lora.rank_dropout": Bounds(ge=0, lt=1),
    "optimizer.lr_embedding": Bounds(ge=0),
    "optimizer.lr_text_encoder": Bounds(ge=0),
    "optimizer.lr_unet": Bounds(ge=0),
    "optimizer.weight_decay_embedding": Bounds(ge=0),
    "train.max_steps": Bounds(ge=1),
    "train.batch_size": Bounds(ge=1),
    "train.gradient_accumulation_steps": Bounds(ge=1),
    "train.warmup_steps": Bounds(ge=0),
    "train.max_grad_norm": Bounds(gt=0),
    "train.noise_offset": Bounds(ge=0),
    "train.attention_reg_weight": Bounds(ge=0),
    "train.min_snr_gamma": Bounds(gt=0),
    "train.checkpoint_every": Bounds(ge=0),
    "train.keep_checkpoints": Bounds(ge=1),
    "train.log_every": Bounds(ge=1),
    "train.max_skipped_steps": Bounds(ge=0),
    "validation.every": Bounds(ge=-1),
    "validation.lora_scales": Bounds(),
    "validation.num_images": Bounds(ge=1),
    "validation.steps": Bounds(ge=1),
    "validation.guidance_scale": Bounds(),
}


def load_train_config(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None, ignore: tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML training config; relative paths in it are taken relative to the file.

    Top-level keys named in ``ignore`` belong to another reader (``mixofshow compare`` reads
    ``optimizers``) and are skipped.
    """
    path = Path(path)
    data = {k: v for k, v in load_yaml(path).items() if k not in ignore}
    apply_overrides(data, overrides or {}, where=str(path))
    config = from_dict(TrainConfig, data, where=str(path))
    base = path.parent
    config.data.concept_list = _relative_to(base, config.data.concept_list)
    if config.validation.prompts_file:
        config.validation.prompts_file = _relative_to(base, config.validation.prompts_file)
    if config.base_model != "embedded" and (base / config.base_model).exists():
        config.base_model = str(base / config.base_model)
    return config


def _relative_to(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def check_config(config: TrainConfig) -> None:
    """Checks that need the file system; raises ConfigError naming the key."""
    if not Path(config.data.concept_list).is_file():
        raise ConfigError(f"data.concept_list: file not found: {config.data.concept_list}")
