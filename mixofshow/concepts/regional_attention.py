"""Regionally controllable cross-attention (Mix-of-Show's regional sampler) as diffusers processors.

Every cross-attention layer attends to the global prompt and to R region prompts. The region
contexts are layer-wise like the global one (``(batch, R, L * T, dim)``, layer l reads its own
``T`` tokens), and all ``1 + R`` contexts of every image go through the layer's key/value
projections and one SDPA call together, so a batch costs one UNet call per step whatever R is.
The output at a pixel covered by regions with weights ``m_r`` (1 inside a box) is::

    out = g + s * a * (sum_r m_r o_r / sum_r m_r - g),    a = min(sum_r m_r, 1)

with ``g`` the global prompt's output, ``o_r`` region r's, and ``s`` the region strength
(Mix-of-Show's replace ratio, 1: inside a box only the regions speak; overlapping regions are
averaged). Outside every region ``a = 0`` and the output is the global one, bit for bit. The
README's "Regional sampling" section describes the whole sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from mixofshow.concepts.attention import LayerwiseAttnProcessor, cross_attention_layers

__all__ = ["RegionState", "RegionalAttnProcessor", "regional_attention", "feature_size"]


@dataclass
class RegionState:
    """What every regional processor of one UNet reads; the sampler fills it before each call."""

    contexts: torch.Tensor | None = None  # (UNet batch, R, L * T, dim), CFG order [uncond; cond]
    maps: Callable[[int, int], torch.Tensor] | None = None  # (h, w) -> (R, h, w) coverage
    latent_size: tuple[int, int] = (0, 0)  # (h, w) of the latents: resolves a layer's query length
    strength: float = 1.0  # replace ratio s
    active: bool = True  # False: every processor behaves as the plain layer-wise one
    _cache: dict = field(default_factory=dict)

    def weights(self, queries: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, N) normalised region weights and (N,) blend factor ``s * a`` for N query pixels."""
        key = (queries, device, dtype)
        if key not in self._cache:
            h, w = feature_size(self.latent_size, queries)
            m = self.maps(h, w).reshape(-1, h * w).to(device=device, dtype=torch.float32)
            total = m.sum(0)
            norm = m / total.clamp(min=1e-12)
            blend = self.strength * total.clamp(max=1.0)
            self._cache[key] = (norm.to(dtype), blend.to(dtype))
        return self._cache[key]


def feature_size(latent_size: tuple[int, int], queries: int) -> tuple[int, int]:
    """(h, w) of the UNet level with ``queries`` pixels: each down-sampling halves, rounding up."""
    h, w = latent_size
    for _ in range(16):
        if h * w == queries:
            return h, w
        if h == w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"no UNet level of latents {latent_size} has {queries} pixels")


class RegionalAttnProcessor:
    """Wraps a layer's :class:`LayerwiseAttnProcessor`; adds the region prompts while active."""

    def __init__(self, base: LayerwiseAttnProcessor, state: RegionState) -> None:
        self.base = base
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        state = self.state
        if not state.active or state.contexts is None or state.contexts.shape[1] == 0:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None or hidden_states.ndim != 3 or attn.group_norm is not None:
            raise ValueError("regional attention supports the cross-attention of SD transformer blocks only")
        return self._regional(attn, hidden_states, self.base.context_for_layer(encoder_hidden_states))

    def region_context(self) -> torch.Tensor:
        """This layer's slice of the region contexts: (UNet batch, R, T, dim)."""
        contexts = self.state.contexts
        tokens = contexts.shape[2] // self.base.num_layers
        return contexts[:, :, self.base.index * tokens : (self.base.index + 1) * tokens]

    def _regional(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, queries, _ = hidden_states.shape
        regions = self.region_context()
        if regions.shape[0] != batch:
            raise ValueError(f"region contexts are for a UNet batch of {regions.shape[0]}, got {batch}")
        groups = 1 + regions.shape[1]
        # global context first, then the regions': (batch * (1 + R), T, dim), one projection each
        contexts = torch.cat([context.unsqueeze(1), regions.to(context.dtype)], dim=1).flatten(0, 1)
        if attn.norm_cross:
            contexts = attn.norm_encoder_hidden_states(contexts)
        residual = hidden_states
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(contexts), attn.to_v(contexts)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, 1, queries, heads, head_dim).transpose(2, 3)
        query = query.expand(batch, groups, heads, queries, head_dim).reshape(batch * groups, heads, queries, head_dim)
        key = key.view(batch * groups, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch * groups, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, groups, queries, heads * head_dim)
        glob, local = out[:, 0], out[:, 1:]
        norm, blend = self.state.weights(queries, out.device, out.dtype)
        mean = torch.einsum("rn,brnc->bnc", norm, local)
        out = glob + blend[None, :, None] * (mean - glob)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def regional_attention(unet: torch.nn.Module, state: RegionState) -> Iterator[list[RegionalAttnProcessor]]:
    """Put a :class:`RegionalAttnProcessor` on every cross-attention layer; restore on exit.

    A layer whose processor is not layer-wise (a bare base model) is treated as a single-layer
    context (``LayerwiseAttnProcessor(0, 1)`` around its processor).
    """
    layers = cross_attention_layers(unet)
    old = [module.processor for _, module in layers]
    processors = []
    for (_, module), proc in zip(layers, old):
        base = proc if isinstance(proc, LayerwiseAttnProcessor) else LayerwiseAttnProcessor(0, 1, proc)
        processors.append(RegionalAttnProcessor(base, state))
        module.set_processor(processors[-1])
    try:
        yield processors
    finally:
        for (_, module), proc in zip(layers, old):
            module.set_processor(proc)
