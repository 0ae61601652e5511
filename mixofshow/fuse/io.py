"""The fused file: several concepts fused into one model, stored as a change to the base model.

One ``.safetensors`` file, never a pickle::

    embeddings.<word>            (L, dim)  layer-wise token embeddings of every fused concept word
    text_encoder.<module>.delta  (m, n)    W_fused - W0 of each changed text-encoder linear layer
    unet.<module>.delta          (m, n)    W_fused - W0 of each changed UNet linear layer

Only layers some concept adapted are stored; everything else is the base model's. The change is
stored instead of the fused weight so that it loads on top of the base model in any dtype
without losing precision (``W0 + delta`` in float32), and so that ``lora_scale`` interpolates
between the base model (0) and the fused one (1), like a concept file's LoRA scale.

Metadata (strings; JSON where structured): ``format`` = ``mixofshow.fused/1``, ``base_model``,
``num_layers``, ``text_dim``, ``words``, ``concepts`` (per concept: name, file, words, prompt,
alphas, base model, optimizer, steps, rank), ``method``, ``settings``, ``objectives``.

:func:`apply_fused` loads it onto a base pipeline: it adds the tokens, sets the fused weights and
installs the layer-wise attention processors; ``mixofshow sample`` calls it for fused files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixofshow.concepts.attention import install_layerwise_attention, num_cross_attention_layers
from mixofshow.concepts.lora import LoRALinear
from mixofshow.concepts.tokens import LayerwiseTextEncoder, add_concept_words, layer_token_names
from mixofshow.models.identity import FUSED_FORMAT
from mixofshow.utils.finite import check_finite
from mixofshow.utils.io import FileFormatError, load_safetensors, save_safetensors
from mixofshow.utils.io import dataclass_from_metadata, dataclass_to_metadata

__all__ = ["FUSED_FORMAT", "FusedMeta", "FusedFile", "FusedModel", "save_fused", "load_fused", "apply_fused"]

_COMPONENTS = ("text_encoder", "unet")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FusedMeta:
    base_model: str
    num_layers: int
    text_dim: int
    words: list[str]
    concepts: list[dict[str, Any]] = field(default_factory=list)
    method: str = "closed-form"
    settings: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return dataclass_to_metadata(self, FUSED_FORMAT, _RAW)

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: str) -> "FusedMeta":
        required = ("base_model", "num_layers", "text_dim", "words")
        return dataclass_from_metadata(cls, meta, where, FUSED_FORMAT, "a fused model", _RAW, required)


_RAW = ("base_model", "method")  # stored as is; every other field as JSON


@dataclass
class FusedFile:
    meta: FusedMeta
    embeddings: dict[str, torch.Tensor]  # word -> (L, dim)
    deltas: dict[str, torch.Tensor]  # "unet.<module>" -> W_fused - W0 (m, n)


def save_fused(path: str | os.PathLike, fused: FusedFile, dtype: str = "fp32") -> None:
    """Write ``fused`` atomically; the weight changes in ``dtype`` (fp32, fp16 or bf16)."""
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid save dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    tensors = {f"embeddings.{w}": e.float() for w, e in fused.embeddings.items()}
    tensors.update({f"{key}.delta": d.to(_DTYPES[dtype]) for key, d in fused.deltas.items()})
    check_finite(tensors, f"{path}: not written", "a fused file never holds NaN or inf")
    save_safetensors(path, tensors, fused.meta.to_strings())


def load_fused(path: str | os.PathLike) -> FusedFile:
    """Read and validate a fused file; errors name the file and the key."""
    where = str(path)
    if not Path(path).is_file():
        raise FileFormatError(f"{where}: no such file (expected a fused model .safetensors)")
    tensors, raw = load_safetensors(path)
    meta = FusedMeta.from_strings(raw, where)
    check_finite(tensors, where, "the fused model is spoiled; fuse its concepts again", FileFormatError)
    embeddings, deltas = {}, {}
    for key, value in tensors.items():
        if key.startswith("embeddings."):
            embeddings[key[len("embeddings."):]] = value.float()
        elif key.endswith(".delta") and key.split(".", 1)[0] in _COMPONENTS and value.dim() == 2:
            deltas[key[: -len(".delta")]] = value
        else:
            raise FileFormatError(f"{where}: unexpected tensor {key!r}")
    for word in meta.words:
        if word not in embeddings:
            raise FileFormatError(f"{where}: no tensor 'embeddings.{word}' for fused word {word!r}")
        if tuple(embeddings[word].shape) != (meta.num_layers, meta.text_dim):
            raise FileFormatError(
                f"{where}: 'embeddings.{word}' has shape {tuple(embeddings[word].shape)}, expected "
                f"({meta.num_layers}, {meta.text_dim})"
            )
    return FusedFile(meta=meta, embeddings=embeddings, deltas=deltas)


@dataclass
class FusedModel:
    """What :func:`apply_fused` returns: the fused words and their layer-wise prompt encoder."""

    encoder: LayerwiseTextEncoder
    words: list[str]
    token_ids: dict[str, list[int]]
    meta: FusedMeta
    processors: list = field(default_factory=list)
    num_layers: int = 0

    @property
    def concepts(self) -> list[dict[str, Any]]:
        return self.meta.concepts


def apply_fused(pipe, fused: FusedFile | str | os.PathLike, lora_scale: float = 1.0) -> FusedModel:
    """Load a fused model onto a base pipeline (in place): tokens, weights, layer-wise attention.

    ``pipe`` must hold the base model's weights; each changed layer becomes
    ``W0 + lora_scale * delta`` (computed in float32). Everything is checked before anything
    is changed, so a file that does not fit leaves ``pipe`` as it was.
    """
    where = "fused model" if isinstance(fused, FusedFile) else str(fused)
    if not isinstance(fused, FusedFile):
        fused = load_fused(fused)
    meta = fused.meta
    num_layers = num_cross_attention_layers(pipe.unet)
    text_dim = pipe.text_encoder.config.hidden_size
    if (num_layers, text_dim) != (meta.num_layers, meta.text_dim):
        raise FileFormatError(
            f"{where}: made for base model {meta.base_model!r} ({meta.num_layers} cross-attention "
            f"layers, text width {meta.text_dim}); this one has {num_layers} and {text_dim}"
        )
    modules = {}
    for key, delta in fused.deltas.items():
        component, _, name = key.partition(".")
        try:
            module = getattr(pipe, component).get_submodule(name)
        except AttributeError:
            raise FileFormatError(
                f"{where}: layer {key!r} does not exist in this base model (made for {meta.base_model!r})"
            ) from None
        module = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != tuple(delta.shape):
            raise FileFormatError(
                f"{where}: tensor '{key}.delta' has shape {tuple(delta.shape)}, the base model's layer is "
                f"{tuple(getattr(module, 'weight', torch.empty(0)).shape)} (made for {meta.base_model!r})"
            )
        modules[key] = module
    vocab = pipe.tokenizer.get_vocab()
    taken = [w for w in meta.words if any(n in vocab for n in layer_token_names(w, num_layers))]
    if taken:
        raise FileFormatError(f"{where}: concept word {taken[0]!r} is already loaded on this pipeline")

    token_ids = add_concept_words(
        pipe.tokenizer, pipe.text_encoder, meta.words, num_layers, init=dict(fused.embeddings)
    )
    with torch.no_grad():
        for key, module in modules.items():
            weight = module.weight.float() + lora_scale * fused.deltas[key].to(module.weight.device).float()
            module.weight.copy_(weight.to(module.weight.dtype))
    processors = install_layerwise_attention(pipe.unet)
    encoder = LayerwiseTextEncoder(pipe.tokenizer, pipe.text_encoder, num_layers, meta.words)
    return FusedModel(encoder, list(meta.words), token_ids, meta, processors, num_layers)
