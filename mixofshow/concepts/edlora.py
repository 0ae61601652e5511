"""ED-LoRA on a Stable Diffusion pipeline: concept words, LoRA layers and layer-wise attention.

:class:`EDLoRA` turns a stock ``StableDiffusionPipeline`` into an ED-LoRA model in place:
concept tokens in the tokenizer and embedding table, LoRA on the text-encoder and UNet attention
projections, and a layer-wise processor on each UNet cross-attention layer. The same object is
used to train, to save a concept file, and to load one for sampling or fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixofshow.concepts.attention import install_layerwise_attention, num_cross_attention_layers
from mixofshow.concepts.io import ConceptFile, ConceptMeta, load_concept
from mixofshow.concepts.lora import (
    LoRALinear,
    inject_lora,
    text_encoder_lora_targets,
    unet_lora_targets,
)
from mixofshow.concepts.tokens import LayerwiseTextEncoder, add_concept_words, concept_embedding
from mixofshow.models.identity import base_model_name, set_lora_scale
from mixofshow.utils.io import FileFormatError

__all__ = ["LoRAConfig", "EDLoRA", "base_model_name"]  # base_model_name: re-exported from models/identity.py


@dataclass
class LoRAConfig:
    rank: int = 4  # Mix-of-Show default
    scale: float = 1.0  # s in W0 + s B A; Mix-of-Show uses alpha = 1 with no 1/r
    rank_dropout: float = 0.0  # DropLoRA; 0.3 is the paper's default when on
    factorization: str = "ab"  # "usv" for StelLA
    text_encoder: bool = True  # LoRA on the 4 projections of every CLIP self-attention
    unet: bool = True  # LoRA on to_q/k/v/out of every attn1 and attn2


class EDLoRA:
    """An ED-LoRA model on top of ``pipe`` (modified in place).

    Args:
        pipe: a ``StableDiffusionPipeline``.
        words: the concept words, e.g. ``["<potter1>", "<potter2>"]``.
        init: per word, a class word, an (L, dim) tensor, or None (random, N(0, init_std^2)).
        lora: LoRA layer settings; None adds no LoRA (embeddings only).
        generator: RNG for random initialisation.
        init_std: std of the random initialisation of words without ``init``.
    """

    def __init__(
        self,
        pipe,
        words: list[str],
        init: dict | None = None,
        lora: LoRAConfig | None = LoRAConfig(),
        generator: torch.Generator | None = None,
        init_std: float = 0.013,
    ) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.text_encoder: nn.Module = pipe.text_encoder
        self.unet: nn.Module = pipe.unet
        self.num_layers = num_cross_attention_layers(self.unet)
        if self.num_layers == 0:
            raise ValueError("The UNet has no cross-attention layers; ED-LoRA needs a text-conditioned UNet")
        self.words = list(words)
        self.lora_config = lora
        self.token_ids = add_concept_words(
            self.tokenizer, self.text_encoder, self.words, self.num_layers, init, std=init_std, generator=generator
        )
        self.layers: dict[str, dict[str, LoRALinear]] = {"text_encoder": {}, "unet": {}}
        if lora is not None:
            args = (lora.rank, lora.scale, lora.rank_dropout, lora.factorization, generator)
            if lora.text_encoder:
                self.layers["text_encoder"] = inject_lora(
                    self.text_encoder, text_encoder_lora_targets(self.text_encoder), *args
                )
            if lora.unet:
                self.layers["unet"] = inject_lora(self.unet, unet_lora_targets(self.unet), *args)
        self.processors = install_layerwise_attention(self.unet)
        self.encoder = LayerwiseTextEncoder(self.tokenizer, self.text_encoder, self.num_layers, self.words)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.get_input_embeddings().base.embedding_dim

    def embedding_parameter(self) -> nn.Parameter:
        """The trainable table of all concept-token rows."""
        return self.text_encoder.get_input_embeddings().new

    def all_layers(self) -> dict[str, LoRALinear]:
        return {f"{c}.{n}": layer for c, layers in self.layers.items() for n, layer in layers.items()}

    def set_lora_multiplier(self, value: float) -> None:
        """Sample-time LoRA scale: 0 shows the embeddings alone, 1 the trained concept."""
        set_lora_scale(self.pipe, value)

    def concept_mean_norm(self) -> torch.Tensor:
        """Mean L2 norm of the concept-token embeddings (Mix-of-Show freezes them at 0.55)."""
        return self.embedding_parameter().detach().norm(dim=-1).mean()

    def to_concept_file(self, meta: ConceptMeta) -> ConceptFile:
        embeddings = {w: concept_embedding(self.text_encoder, ids) for w, ids in self.token_ids.items()}
        lora = {}
        for name, layer in self.all_layers().items():
            a, b = layer.factors()
            lora[name] = (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
        return ConceptFile(meta=meta, embeddings=embeddings, lora=lora)

    def meta(self, **fields) -> ConceptMeta:
        cfg = self.lora_config or LoRAConfig()
        single = {"base_model_sha256": self.pipe.config.get("_mixofshow_sha256"),  # a single file's content
                  "base_model_config": self.pipe.config.get("_mixofshow_config")}  # and its config, if given
        if any(single.values()):
            fields["extra"] = {**fields.get("extra", {}), **{k: v for k, v in single.items() if v}}
        return ConceptMeta(
            base_model=base_model_name(self.pipe),
            rank=cfg.rank,
            scale=cfg.scale,
            words=self.words,
            num_layers=self.num_layers,
            text_dim=self.text_dim,
            **fields,
        )

    @classmethod
    def from_concept(cls, pipe, concept: ConceptFile | str, multiplier: float = 1.0) -> "EDLoRA":
        """Load a concept file onto ``pipe`` (LoRA layers in ``B A`` form)."""
        if not isinstance(concept, ConceptFile):
            where = str(concept)
            concept = load_concept(concept)
        else:
            where = "concept"
        meta = concept.meta
        layers_needed = {k.split(".", 1)[0] for k in concept.lora}
        lora = LoRAConfig(
            rank=meta.rank,
            scale=meta.scale,
            text_encoder="text_encoder" in layers_needed,
            unet="unet" in layers_needed,
        ) if concept.lora else None
        num_layers = num_cross_attention_layers(pipe.unet)
        if num_layers != meta.num_layers:
            raise FileFormatError(
                f"{where}: trained with {meta.num_layers} cross-attention layers (base model "
                f"{meta.base_model!r}), but this UNet has {num_layers}; load it on its base model"
            )
        model = cls(pipe, meta.words, init=dict(concept.embeddings), lora=lora)
        model.load_lora(concept, where)
        model.set_lora_multiplier(multiplier)
        return model

    def load_lora(self, concept: ConceptFile, where: str = "concept") -> None:
        layers = self.all_layers()
        missing = sorted(set(concept.lora) - set(layers))
        if missing:
            raise FileFormatError(
                f"{where}: LoRA layer {missing[0]!r} does not exist in this model; was it trained on "
                f"base model {concept.meta.base_model!r}?"
            )
        with torch.no_grad():
            for name, (a, b) in concept.lora.items():
                layer = layers[name]
                if a.shape != layer.lora_down.shape or b.shape != layer.lora_up.shape:
                    raise FileFormatError(
                        f"{where}: LoRA layer {name!r} has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                        f"the model expects {tuple(layer.lora_down.shape)}/{tuple(layer.lora_up.shape)}"
                    )
                layer.lora_down.copy_(a)
                layer.lora_up.copy_(b)
