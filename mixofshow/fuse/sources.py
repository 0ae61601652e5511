"""The concepts to fuse: their files, alphas and prompts, checked against each other.

Errors a user can cause are ``ValueError`` naming the files: concepts trained on different base
models (or with different layer counts or text widths), a concept word that two files define,
a file that is missing or not a concept file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mixofshow.concepts.io import ConceptFile, load_concept
from mixofshow.concepts.tokens import layer_token_names
from mixofshow.fuse.config import FuseConceptConfig
from mixofshow.fuse.gram import LowRank
from mixofshow.models.identity import same_base_model
from mixofshow.utils.io import FileFormatError

__all__ = ["FuseSource", "load_sources", "check_compatible"]

TEXT, UNET = "text_encoder", "unet"


@dataclass
class FuseSource:
    """One concept to fuse: its file, contents, alphas and the string that names it in prompts."""

    path: str
    concept: ConceptFile
    text_encoder_alpha: float = 1.0
    unet_alpha: float = 1.0
    prompt: str = ""

    def __post_init__(self) -> None:
        if not self.prompt:
            self.prompt = default_prompt(self.concept)

    @property
    def words(self) -> list[str]:
        return list(self.concept.meta.words)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def alpha(self, key: str) -> float:
        return self.text_encoder_alpha if key.startswith(TEXT + ".") else self.unet_alpha

    def changes(self, key: str) -> bool:
        """Whether the concept changes layer ``key`` at all (a LoRA with non-zero factors and alpha)."""
        pair = self.concept.lora.get(key)
        return pair is not None and self.alpha(key) != 0 and bool(pair[0].any()) and bool(pair[1].any())

    def delta(self, key: str) -> torch.Tensor | None:
        """``dW = s B A`` (float32) of layer ``key`` (``"unet.<module>"``), None if not adapted."""
        pair = self.concept.lora.get(key)
        if pair is None:
            return None
        a, b = pair
        return self.concept.meta.scale * (b.float() @ a.float())

    def change(self, key: str) -> LowRank | None:
        """``a_i dW_i = (a_i s B) A`` of layer ``key`` as factors, None where the concept left it."""
        if not self.changes(key):
            return None
        a, b = self.concept.lora[key]
        return LowRank((self.alpha(key) * self.concept.meta.scale) * b.float(), a.float())

    def target(self, key: str, w0: torch.Tensor) -> torch.Tensor:
        """``W_i = W0 + a_i dW_i`` in float32 on ``w0``'s device (W0 where the concept left it)."""
        delta = self.delta(key)
        if delta is None:
            return w0.float()
        return w0.float() + self.alpha(key) * delta.to(w0.device)

    def describe(self) -> dict:
        meta = self.concept.meta
        return {
            "name": self.name,
            "file": Path(self.path).name,
            "words": meta.words,
            "tokens": {w: layer_token_names(w, meta.num_layers) for w in meta.words},
            "prompt": self.prompt,
            "text_encoder_alpha": self.text_encoder_alpha,
            "unet_alpha": self.unet_alpha,
            "base_model": meta.base_model,
            "optimizer": meta.optimizer,
            "steps": meta.steps,
            "rank": meta.rank,
        }


def default_prompt(concept: ConceptFile) -> str:
    """The concept's replace string (``"<cat1> <cat2>"``): its mapping's value, else its words."""
    values = {v for v in concept.meta.replace_mapping.values() if isinstance(v, str)}
    if len(values) == 1:
        (value,) = values
        if all(w in value for w in concept.meta.words):
            return value
    return " ".join(concept.meta.words)


def load_sources(specs: Sequence[FuseConceptConfig]) -> list[FuseSource]:
    """Read every concept file and check them against each other (see :func:`check_compatible`)."""
    sources = []
    for index, spec in enumerate(specs):
        path = Path(spec.file)
        if not path.is_file():
            raise FileFormatError(f"concepts[{index}]: concept file not found: {path}")
        concept = load_concept(path)
        sources.append(
            FuseSource(str(path), concept, spec.text_encoder_alpha, spec.unet_alpha, spec.prompt or "")
        )
    check_compatible(sources)
    return sources


def check_compatible(sources: Sequence[FuseSource]) -> None:
    """Same base model, layer count, text width and LoRA layer shapes; no word defined twice."""
    if not sources:
        raise ValueError("No concepts to fuse")
    first = sources[0]
    ref = first.concept.meta
    owner: dict[str, str] = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for src in sources:
        meta = src.concept.meta
        if not same_base_model(meta.base_model, ref.base_model):
            raise ValueError(
                f"Concepts trained on different base models: {first.path} on {ref.base_model!r}, "
                f"{src.path} on {meta.base_model!r}; fuse concepts of one base model"
            )
        for field_name, what in (("num_layers", "cross-attention layers"), ("text_dim", "text width")):
            if getattr(meta, field_name) != getattr(ref, field_name):
                raise ValueError(
                    f"Concepts made for different models: {first.path} has {getattr(ref, field_name)} "
                    f"{what}, {src.path} has {getattr(meta, field_name)}"
                )
        for word in meta.words:
            if word in owner:
                raise ValueError(
                    f"Concept word {word!r} is defined by both {owner[word]} and {src.path}; "
                    "retrain one concept with other words (each fused concept needs its own)"
                )
            owner[word] = src.path
        for key, (a, b) in src.concept.lora.items():
            shape = (b.shape[0], a.shape[1])
            if key in shapes and shapes[key][0] != shape:
                raise ValueError(
                    f"LoRA layer {key!r} is {shapes[key][0]} in {shapes[key][1]} but {shape} in "
                    f"{src.path}; the concepts were made for different models"
                )
            shapes.setdefault(key, (shape, src.path))
        if not any(w in src.prompt for w in meta.words):
            raise ValueError(
                f"{src.path}: prompt {src.prompt!r} contains none of the concept's words {meta.words}"
            )
