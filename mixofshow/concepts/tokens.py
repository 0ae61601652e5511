"""Concept words, their layer-wise tokens, and the layer-wise prompt encoding of ED-LoRA.

A concept word such as ``<potter1>`` expands to one token per UNet cross-attention layer,
``<potter1_l0> ... <potter1_l{L-1}>``. The new rows live in :class:`ConceptTokenEmbedding`, a
small trainable table beside the frozen CLIP vocabulary, so the original rows can never change
(Mix-of-Show trains the whole matrix and resets the other rows after every step).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConceptTokenEmbedding",
    "LayerwiseTextEncoder",
    "layer_token_names",
    "concept_embedding",
    "add_concept_words",
]

_WORD = re.compile(r"^<[a-z0-9][a-z0-9_\-]*>$")


def layer_token_names(word: str, num_layers: int) -> list[str]:
    """``<w>`` -> ``["<w_l0>", ..., "<w_l{L-1}>"]`` (closed brackets: no token is a prefix of another)."""
    return [f"{word[:-1]}_l{i}>" for i in range(num_layers)]


class ConceptTokenEmbedding(nn.Module):
    """The frozen CLIP token embedding plus a trainable table of concept-token rows.

    Ids below ``base.num_embeddings`` read the frozen table; ids at or above it read ``new``.
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.new = nn.Parameter(torch.empty(0, base.embedding_dim, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:  # the full table, for code that reads it (e.g. export)
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    def append(self, rows: torch.Tensor) -> range:
        """Add rows (k x dim); returns their ids."""
        start = self.num_base + self.new.shape[0]
        data = torch.cat([self.new.data, rows.to(self.new.device, torch.float32)])
        self.new = nn.Parameter(data, requires_grad=self.new.requires_grad)
        return range(start, start + rows.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.num_base
        out = F.embedding(torch.where(is_new, 0, ids), self.base.weight)
        if self.new.shape[0] == 0:
            return out
        extra = F.embedding(torch.where(is_new, ids - self.num_base, 0), self.new).to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), extra, out)


def _token_embedding(text_encoder: nn.Module) -> ConceptTokenEmbedding:
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, ConceptTokenEmbedding):
        emb = ConceptTokenEmbedding(emb)
        text_encoder.set_input_embeddings(emb)
    return emb


def add_concept_words(
    tokenizer,
    text_encoder: nn.Module,
    words: Sequence[str],
    num_layers: int,
    init: dict[str, str | torch.Tensor | None] | None = None,
    std: float = 0.013,
    generator: torch.Generator | None = None,
) -> dict[str, list[int]]:
    """Register concept words: add L tokens each to the tokenizer and embedding table.

    ``init[word]`` is a class word (its embedding is copied to all L tokens, e.g. ``"man"``), an
    (L, dim) tensor of embeddings (loading a trained concept), or None for N(0, std^2).
    Returns ``{word: [token ids]}``.
    """
    init = init or {}
    emb = _token_embedding(text_encoder)
    dim = emb.base.embedding_dim
    ids: dict[str, list[int]] = {}
    for word in words:
        if not _WORD.match(word):
            raise ValueError(f"Invalid concept word {word!r}: expected <name> in lower case (CLIP lower-cases prompts), e.g. <potter1>")
        names = layer_token_names(word, num_layers)
        clash = [n for n in names if n in tokenizer.get_vocab()]
        if clash:
            raise ValueError(f"Concept word {word!r} is already in the tokenizer ({clash[0]})")
        value = init.get(word)
        if value is None:
            rows = torch.randn(num_layers, dim, generator=generator) * std
        elif isinstance(value, str):
            rows = _class_word_embedding(tokenizer, emb, value).expand(num_layers, dim).clone()
        else:
            rows = torch.as_tensor(value, dtype=torch.float32)
            if rows.shape != (num_layers, dim):
                raise ValueError(
                    f"Embedding of {word!r} has shape {tuple(rows.shape)}; this model expects "
                    f"({num_layers}, {dim}) (cross-attention layers, text width)"
                )
        added = tokenizer.add_tokens(names)
        if added != num_layers:
            raise ValueError(f"Could not add the tokens of {word!r} to the tokenizer")
        token_ids = tokenizer.convert_tokens_to_ids(names)
        new_ids = emb.append(rows)
        if list(new_ids) != list(token_ids):
            raise RuntimeError(
                f"Tokenizer ids {token_ids} and embedding rows {list(new_ids)} disagree for {word!r}"
            )
        ids[word] = token_ids
    return ids


def _class_word_embedding(tokenizer, emb: ConceptTokenEmbedding, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"Class word {word!r} must be a single CLIP token, got {len(ids)} tokens")
    return emb.base.weight[ids[0]].detach().float().cpu()


def concept_embedding(text_encoder: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """The (L, dim) embedding rows of one concept word."""
    emb = _token_embedding(text_encoder)
    rows = torch.as_tensor(list(token_ids)) - emb.num_base
    return emb.new.detach()[rows].clone()


class LayerwiseTextEncoder:
    """Encode prompts into ED-LoRA's layer-wise context, with one batched text-encoder call.

    ``encode(["a photo of <potter1> <potter2>"])`` returns (batch, L * 77, dim): the prompt is
    rewritten L times (layer l uses ``<w_l{l}>`` for every concept word ``<w>``), the B * L
    prompts go through the text encoder together, and the results are laid out layer after
    layer along the sequence axis, as :class:`~mixofshow.concepts.attention.LayerwiseAttnProcessor`
    expects.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, num_layers: int, words: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.num_layers = num_layers
        self.words = list(words)

    def layer_prompts(self, prompt: str) -> list[str]:
        if not self.words:
            return [prompt] * self.num_layers
        pattern = re.compile("|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True)))
        return [pattern.sub(lambda m: f"{m.group(0)[:-1]}_l{i}>", prompt) for i in range(self.num_layers)]

    def window(self, prompt: str) -> tuple[int, str]:
        """(tokens, text read): the prompt's token count (BOS/EOS included) and the prompt as
        the text encoder reads it, cut to its window (``model_max_length``, 77 for CLIP) when
        longer: decoded from the kept tokens (CLIP's lower-case spelling), concept words as written."""
        text = self.layer_prompts(prompt)[0]
        limit = self.tokenizer.model_max_length
        ids = self.tokenizer(text, verbose=False).input_ids  # verbose: no too-long warning, we give ours
        if len(ids) <= limit:
            return len(ids), prompt
        seen = self.tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True)
        seen = re.sub(r"<([a-z0-9][a-z0-9_\-]*)_l0>", r" <\1> " if self.words else r" <\1_l0> ", seen)
        return len(ids), " ".join(seen.split())

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B * L, 77) token ids, prompt-major."""
        expanded = [p for prompt in prompts for p in self.layer_prompts(prompt)]
        return self.tokenizer(
            expanded,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(ids.to(device))[0]  # last hidden state (B * L, T, dim)
        batch = ids.shape[0] // self.num_layers
        return hidden.reshape(batch, self.num_layers * hidden.shape[1], hidden.shape[2])

    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_ids(self.tokenize(prompts))
