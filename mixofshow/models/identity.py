"""Model identity: what a file was made for, and the sampling state every consumer shares.

One home for what training, sampling, validation, fusion and export all need to agree on:

- the name of a pipeline's base model (:func:`base_model_name`) and whether two recorded names
  mean the same model (:func:`same_base_model`; the embedded model answers to two names);
- the ``format`` strings in the metadata of the project's files (:data:`CONCEPT_FORMAT`,
  :data:`FUSED_FORMAT`);
- the sample-time LoRA scale (:func:`set_lora_scale`);
- putting a pipeline into sampling state and back (:func:`sampling_state`): eval mode, an optional
  LoRA scale, and on exit the train/eval modes and LoRA scales it had before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from mixofshow.concepts.lora import LoRALinear
from mixofshow.models.embedded import EMBEDDED_NAME

__all__ = [
    "CONCEPT_FORMAT",
    "FUSED_FORMAT",
    "EMBEDDED_ALIASES",
    "base_model_name",
    "same_base_model",
    "set_lora_scale",
    "sampling_state",
]

CONCEPT_FORMAT = "mixofshow.edlora/1"  # one trained ED-LoRA concept (mixofshow/concepts/io.py)
FUSED_FORMAT = "mixofshow.fused/1"  # several concepts fused into one model (mixofshow/fuse/io.py)
EMBEDDED_ALIASES = frozenset({"embedded", EMBEDDED_NAME})  # config spelling, recorded name


def base_model_name(pipe) -> str:
    """The name a pipeline was loaded from (hub id, folder, file, or the embedded model's name)."""
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "unknown"))


def same_base_model(a: str, b: str) -> bool:
    """Whether two recorded base-model names mean the same model (embedded aliases, trailing /)."""
    if a in EMBEDDED_ALIASES or b in EMBEDDED_ALIASES:
        return a in EMBEDDED_ALIASES and b in EMBEDDED_ALIASES
    return a.rstrip("/") == b.rstrip("/")


def _components(pipe) -> list[nn.Module]:
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "text_encoder", "vae")) if m is not None]


def set_lora_scale(pipe, scale: float) -> dict[LoRALinear, float]:
    """Set the multiplier of every LoRA layer in the UNet and text encoder; returns the old ones.

    0 shows a concept's embeddings alone, 1 the trained concept. A fused model has no LoRA layers
    (its changes are in the weights): its scale is applied when it is loaded.
    """
    previous: dict[LoRALinear, float] = {}
    for component in _components(pipe):
        for module in component.modules():
            if isinstance(module, LoRALinear):
                previous[module] = module.multiplier
                module.multiplier = float(scale)
    return previous


@contextmanager
def sampling_state(pipe, lora_scale: float | None = None) -> Iterator[None]:
    """UNet, text encoder and VAE in eval mode (and every LoRA layer at ``lora_scale`` when given)
    for the ``with`` block; afterwards each module's train/eval mode and LoRA scale are as before."""
    modules = _components(pipe)
    was_training = [[(m, m.training) for m in module.modules()] for module in modules]
    old_scales = set_lora_scale(pipe, lora_scale) if lora_scale is not None else {}
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for layer, value in old_scales.items():
            layer.multiplier = value
        for states in was_training:
            for m, training in states:
                m.training = training
