"""Layer-wise cross-attention: each UNet cross-attention layer reads its own text context.

ED-LoRA encodes a prompt once per cross-attention layer (layer l uses the l-th token of every
concept word). The L contexts travel to the UNet concatenated along the sequence axis,
``(batch, L * T, dim)``; the processor installed on the l-th cross-attention layer (forward order)
slices out its own ``T`` tokens and hands them to the stock diffusers processor (SDPA, or
xformers when installed and on CUDA). Self-attention is left alone.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

__all__ = [
    "LayerwiseAttnProcessor",
    "cross_attention_layers",
    "install_layerwise_attention",
    "num_cross_attention_layers",
    "default_attention_processor",
]


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention modules (``attn2`` of every transformer block) in forward order.

    ``named_modules`` walks down blocks, then the mid block, then up blocks, which is the order
    the UNet calls them (16 layers for SD 1.x: 6 down, 1 mid, 9 up).
    """
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False):
            layers.append((name, module))
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    layers.sort(key=lambda item: order.get(item[0].split(".", 1)[0], 3))  # stable within a part
    return layers


def num_cross_attention_layers(unet: nn.Module) -> int:
    """How many tokens each concept word expands to: one per cross-attention layer."""
    return len(cross_attention_layers(unet))


def default_attention_processor(device: torch.device | str | None = None):
    """xformers' memory-efficient processor when installed and on CUDA, else PyTorch SDPA."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            import xformers.ops  # noqa: F401
            from diffusers.models.attention_processor import XFormersAttnProcessor

            return XFormersAttnProcessor()
        except ImportError:
            pass
    return AttnProcessor2_0()


class LayerwiseAttnProcessor:
    """Give cross-attention layer ``index`` of ``num_layers`` its own slice of the context.

    With ``store_attention`` on, the attention probabilities over the layer's tokens are computed
    explicitly and kept in ``last_attention`` as (batch, heads, queries, tokens) for the
    attention-regularisation loss; otherwise the inner (fused) processor does the work.
    """

    def __init__(self, index: int, num_layers: int, inner=None) -> None:
        self.index = index
        self.num_layers = num_layers
        self.inner = inner if inner is not None else AttnProcessor2_0()
        self.store_attention = False
        self.last_attention: torch.Tensor | None = None

    def context_for_layer(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        seq = encoder_hidden_states.shape[1]
        if seq % self.num_layers:
            raise ValueError(
                f"Layer-wise context has {seq} tokens, not a multiple of the {self.num_layers} "
                "cross-attention layers; encode prompts with LayerwiseTextEncoder"
            )
        tokens = seq // self.num_layers
        return encoder_hidden_states[:, self.index * tokens : (self.index + 1) * tokens]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        context = self.context_for_layer(encoder_hidden_states)
        if not self.store_attention:
            return self.inner(attn, hidden_states, context, attention_mask, temb, **kwargs)
        return self._explicit(attn, hidden_states, context)

    def _explicit(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor):
        # Plain softmax attention so the probabilities can be kept; only used while training
        # with attention regularisation (transformer blocks: 3-D input, no norms, no residual).
        batch, queries, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
        self.last_attention = probs
        out = (probs @ v).transpose(1, 2).reshape(batch, queries, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        return out / attn.rescale_output_factor


def install_layerwise_attention(unet: nn.Module, inner_factory=None) -> list[LayerwiseAttnProcessor]:
    """Set a :class:`LayerwiseAttnProcessor` on every cross-attention layer; returns them in order."""
    layers = cross_attention_layers(unet)
    processors = []
    for index, (_, module) in enumerate(layers):
        inner = inner_factory() if inner_factory is not None else default_attention_processor(
            next(unet.parameters()).device
        )
        proc = LayerwiseAttnProcessor(index, len(layers), inner)
        module.set_processor(proc)
        processors.append(proc)
    return processors
