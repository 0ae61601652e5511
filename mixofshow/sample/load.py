"""Load a concept (``mixofshow.edlora/1``) or a fused model (``mixofshow.fused/1``) onto a pipeline.

The file's metadata ``format`` decides how it is applied. Before anything is changed, the file's
base model is compared with the pipeline's: a different name with fitting shapes only warns (a
concept trained on SD 1.5 runs on any SD 1.x fine-tune), shapes that do not fit are an error
naming the file, the tensor and both shapes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from mixofshow.concepts.attention import (
    LayerwiseAttnProcessor,
    cross_attention_layers,
    default_attention_processor,
    num_cross_attention_layers,
)
from mixofshow.concepts.edlora import EDLoRA
from mixofshow.concepts.tokens import LayerwiseTextEncoder
from mixofshow.models.identity import CONCEPT_FORMAT, FUSED_FORMAT, base_model_name, same_base_model
from mixofshow.utils.io import FileFormatError

__all__ = ["FUSED_FORMAT", "BaseModel", "adapter_metadata", "check_base_model", "load_adapter", "load_base"]

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def adapter_metadata(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes) of a ``.safetensors`` adapter file, without reading the tensors."""
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise FileFormatError(
            f"{path}: a pickled checkpoint; convert an original Mix-of-Show .pth with "
            f"`mixofshow import {path} OUT.safetensors --base-model ...` first"
        )
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file (expected a concept or fused .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{path}: not a readable .safetensors file ({err})") from None
    return meta, shapes


def _json_int(meta: dict[str, str], key: str, where: str) -> int | None:
    if key not in meta:
        return None
    try:
        return int(json.loads(meta[key]))
    except (ValueError, TypeError):
        raise FileFormatError(f"{where}: metadata key {key!r} is not an integer: {meta[key]!r}") from None


def check_base_model(
    pipe, meta: dict[str, str], shapes: dict[str, tuple[int, ...]], where: str
) -> None:
    """Warn when the base-model names differ; raise ``FileFormatError`` when shapes do not fit."""
    expected, actual = meta.get("base_model", "unknown"), base_model_name(pipe)
    num_layers = _json_int(meta, "num_layers", where)
    have_layers = num_cross_attention_layers(pipe.unet)
    if num_layers is not None and num_layers != have_layers:
        raise FileFormatError(
            f"{where}: made for base model {expected!r} with {num_layers} cross-attention layers, "
            f"but the loaded base model {actual!r} has {have_layers}; use --base-model {expected}"
        )
    text_dim = _json_int(meta, "text_dim", where)
    have_dim = pipe.text_encoder.config.hidden_size
    if text_dim is not None and text_dim != have_dim:
        raise FileFormatError(
            f"{where}: made for base model {expected!r} with text width {text_dim}, but the loaded "
            f"base model {actual!r} has {have_dim}; use --base-model {expected}"
        )
    components = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    for key, shape in shapes.items():
        component, _, rest = key.partition(".")
        if component not in components or not rest.endswith((".lora_down", ".lora_up")):
            continue
        module_name, _, kind = rest.rpartition(".")
        try:
            module = components[component].get_submodule(module_name)
        except AttributeError:
            raise FileFormatError(
                f"{where}: tensor {key!r} adapts {component}.{module_name}, which the loaded base "
                f"model {actual!r} does not have (file made for {expected!r})"
            ) from None
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        bad = (kind == "lora_down" and (len(shape) != 2 or shape[1] != in_f)) or (
            kind == "lora_up" and (len(shape) != 2 or shape[0] != out_f)
        )
        if bad:
            want = f"(r, {in_f})" if kind == "lora_down" else f"({out_f}, r)"
            raise FileFormatError(
                f"{where}: tensor {key!r} has shape {shape}, the loaded base model {actual!r} needs "
                f"{want}; the file was made for base model {expected!r}"
            )
    if not same_base_model(expected, actual):
        log.warning(
            "%s was made for base model %r but is loaded on %r; shapes fit, results may differ",
            where, expected, actual,
        )


def load_adapter(pipe, path: str | os.PathLike, lora_scale: float = 1.0) -> Any:
    """Apply the concept or fused model in ``path`` to ``pipe`` (in place).

    Returns an object with ``.encoder`` (a ``LayerwiseTextEncoder``) and ``.words``: an
    :class:`~mixofshow.concepts.edlora.EDLoRA` for a concept file, or what
    ``mixofshow.fuse.io.apply_fused`` returns for a fused model.
    """
    where = str(path)
    meta, shapes = adapter_metadata(path)
    fmt = meta.get("format")
    if fmt not in (CONCEPT_FORMAT, FUSED_FORMAT):
        raise FileFormatError(
            f"{where}: unknown adapter format {fmt!r} in the file's metadata (expected "
            f"{CONCEPT_FORMAT!r} for a concept or {FUSED_FORMAT!r} for a fused model); "
            "original Mix-of-Show .pth files are converted with `mixofshow import`"
        )
    check_base_model(pipe, meta, shapes, where)
    if fmt == CONCEPT_FORMAT:
        return EDLoRA.from_concept(pipe, where, multiplier=lora_scale)
    try:
        from mixofshow.fuse.io import apply_fused
    except ImportError as err:
        raise FileFormatError(f"{where}: a fused model, but fused loading is unavailable ({err})") from None
    return apply_fused(pipe, where, lora_scale)


@dataclass
class BaseModel:
    """The bare base model, as :func:`load_adapter` returns a concept: ``.encoder`` and ``.words``."""

    encoder: LayerwiseTextEncoder
    words: list[str]


def load_base(pipe) -> BaseModel:
    """Sample ``pipe`` without a concept: every cross-attention layer reads one shared context.

    The prompt is encoded once (``num_layers=1``) and each layer's processor is a
    ``LayerwiseAttnProcessor(0, 1)`` around the stock one, so regional sampling and the
    sampler's code path are the same as with a concept.
    """
    device = next(pipe.unet.parameters()).device
    for _, module in cross_attention_layers(pipe.unet):
        if not isinstance(module.processor, LayerwiseAttnProcessor):
            module.set_processor(LayerwiseAttnProcessor(0, 1, default_attention_processor(device)))
    return BaseModel(LayerwiseTextEncoder(pipe.tokenizer, pipe.text_encoder, 1), [])
