"""The concept file: one ``.safetensors`` holding an ED-LoRA concept, never a pickle.

Tensors::

    embeddings.<word>                 (L, dim)  layer-wise token embeddings of a concept word
    text_encoder.<module>.lora_down   (r, n)    A
    text_encoder.<module>.lora_up     (m, r)    B
    unet.<module>.lora_down / lora_up

Metadata (strings; JSON where structured): format, base_model, rank, scale, words, class_words,
num_layers, text_dim, optimizer, steps, replace_mapping, and free-form ``extra``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixofshow.models.identity import CONCEPT_FORMAT, FUSED_FORMAT
from mixofshow.utils.finite import check_finite
from mixofshow.utils.io import FileFormatError, load_safetensors, save_safetensors
from mixofshow.utils.io import dataclass_from_metadata, dataclass_to_metadata

__all__ = ["CONCEPT_FORMAT", "ConceptMeta", "ConceptFile", "save_concept", "load_concept"]

_SPOILED = "the concept is spoiled (its training diverged); retrain it, e.g. with a lower learning rate"

_COMPONENTS = ("text_encoder", "unet")
_RAW_STRINGS = ("base_model", "optimizer")  # stored as is; every other field as JSON


@dataclass
class ConceptMeta:
    base_model: str
    rank: int
    scale: float
    words: list[str]
    num_layers: int
    text_dim: int
    class_words: dict[str, str | None] = field(default_factory=dict)
    optimizer: str = "adamw"
    steps: int = 0
    replace_mapping: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return dataclass_to_metadata(self, CONCEPT_FORMAT, _RAW_STRINGS)

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: str) -> "ConceptMeta":
        kind = "a mixofshow concept file (import Mix-of-Show .pth files with `mixofshow import`)"
        required = ("base_model", "rank", "scale", "words", "num_layers", "text_dim")
        return dataclass_from_metadata(cls, meta, where, CONCEPT_FORMAT, kind, _RAW_STRINGS, required)


@dataclass
class ConceptFile:
    meta: ConceptMeta
    embeddings: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "unet.<module>" -> (A, B)

    def component_lora(self, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.lora.items() if k.startswith(prefix)}


def save_concept(path: str | os.PathLike, concept: ConceptFile) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for word, emb in concept.embeddings.items():
        tensors[f"embeddings.{word}"] = emb.float()
    for name, (a, b) in concept.lora.items():
        tensors[f"{name}.lora_down"] = a.float()
        tensors[f"{name}.lora_up"] = b.float()
    check_finite(tensors, f"{path}: not written", "a concept file never holds NaN or inf")
    save_safetensors(path, tensors, concept.meta.to_strings())


def load_concept(path: str | os.PathLike) -> ConceptFile:
    """Read and validate a concept file; errors name the file and the key.

    Every consumer (sampling, fusion, export) loads concepts here, so a file holding a
    NaN or an infinity is refused once for all of them, naming the file and the tensor.
    """
    where = str(path)
    if Path(path).suffix in (".pth", ".pt", ".ckpt", ".bin"):
        raise FileFormatError(
            f"{where}: a pickled checkpoint; convert it with `mixofshow import {where} OUT.safetensors`"
        )
    tensors, raw_meta = load_safetensors(path)
    if raw_meta.get("format") == FUSED_FORMAT:
        raise FileFormatError(
            f"{where}: a fused model (several concepts merged into the weights), not one concept's file; "
            f"sample it with `mixofshow sample --concept {where}`, or write it as a diffusers pipeline folder "
            "with `mixofshow fuse CONFIG --diffusers-output DIR`; export takes one trained concept"
        )
    meta = ConceptMeta.from_strings(raw_meta, where)
    check_finite(tensors, where, _SPOILED, FileFormatError)
    embeddings, downs, ups = {}, {}, {}
    for key, value in tensors.items():
        if key.startswith("embeddings."):
            embeddings[key[len("embeddings."):]] = value
        elif key.endswith(".lora_down") and key.split(".", 1)[0] in _COMPONENTS:
            downs[key[: -len(".lora_down")]] = value
        elif key.endswith(".lora_up") and key.split(".", 1)[0] in _COMPONENTS:
            ups[key[: -len(".lora_up")]] = value
        else:
            raise FileFormatError(f"{where}: unexpected tensor {key!r}")
    for word in meta.words:
        if word not in embeddings:
            raise FileFormatError(f"{where}: no tensor 'embeddings.{word}' for concept word {word!r}")
        if embeddings[word].shape != (meta.num_layers, meta.text_dim):
            raise FileFormatError(
                f"{where}: 'embeddings.{word}' has shape {tuple(embeddings[word].shape)}, expected "
                f"({meta.num_layers}, {meta.text_dim})"
            )
    if downs.keys() != ups.keys():
        odd = sorted(downs.keys() ^ ups.keys())[0]
        raise FileFormatError(f"{where}: LoRA layer {odd!r} lacks its lora_down or lora_up tensor")
    lora = {}
    for name in downs:
        a, b = downs[name], ups[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FileFormatError(
                f"{where}: LoRA layer {name!r} has lora_down {tuple(a.shape)} and lora_up "
                f"{tuple(b.shape)}; expected r x n and m x r"
            )
        lora[name] = (a, b)
    return ConceptFile(meta=meta, embeddings=embeddings, lora=lora)
