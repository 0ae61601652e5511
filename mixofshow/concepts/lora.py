"""LoRA layers for ED-LoRA: ``y = W0 x + s * m * B (A x)``.

We own this layer instead of using PEFT's because the LoRA optimizers need three things PEFT's
``LoraLayer`` does not give: (1) the full weight gradient ``G = dy^T x`` (or its row/column
statistics) computed in a backward hook for the optimizers that ask for it, (2) StelLA's
three-factor ``U S V^T`` form, and (3) rank dropout (DropLoRA) on the r-dimensional activation.
Checkpoints are exported to PEFT/diffusers and kohya key layouts (see ``concepts/export.py``).

Shapes follow ``docs/optimizers.md``: ``A = lora_down`` is r x n, ``B = lora_up`` is m x r.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALinear",
    "inject_lora",
    "lora_layers",
    "text_encoder_lora_targets",
    "unet_lora_targets",
]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the linear layer to adapt; its weights are frozen.
        rank: r.
        scale: s in ``W0 + s B A`` (Mix-of-Show: ``s = alpha = 1``; PEFT: ``alpha / r``).
        rank_dropout: DropLoRA's dropout probability on the r-dimensional activation (0 = off).
        factorization: ``"ab"`` (``B A``, zero-initialised B) or ``"usv"`` (StelLA's
            ``U S V^T`` with orthonormal U, V and zero S).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        scale: float = 1.0,
        rank_dropout: float = 0.0,
        factorization: str = "ab",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"Invalid LoRA rank: {rank} (expected an integer >= 1)")
        if not 0.0 <= rank_dropout < 1.0:
            raise ValueError(f"Invalid rank_dropout: {rank_dropout} (expected 0 <= p < 1)")
        if factorization not in ("ab", "usv"):
            raise ValueError(f"Invalid factorization: {factorization!r} (expected 'ab' or 'usv')")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.scale = float(scale)
        self.multiplier = 1.0  # sample-time LoRA scale (0 shows the embeddings alone)
        self.rank_dropout = rank_dropout
        self.factorization = factorization
        # a FullGradients (mixofshow/optim/full_grad.py) when the optimizer reads G = dy^T x
        self.full_grad_sink = None
        m, n = base.out_features, base.in_features
        kw = {"device": base.weight.device, "dtype": torch.float32}
        if factorization == "ab":
            self.lora_down = nn.Parameter(torch.empty(rank, n, **kw))
            self.lora_up = nn.Parameter(torch.zeros(m, rank, **kw))
            with torch.no_grad():  # kaiming-uniform (a = sqrt 5), as nn.Linear and Mix-of-Show
                bound = 1.0 / math.sqrt(n)
                init = torch.rand(rank, n, generator=generator, dtype=torch.float32) * 2 * bound - bound
                self.lora_down.copy_(init)
        else:
            self.lora_U = nn.Parameter(_random_orthonormal(m, rank, generator, **kw))
            self.lora_S = nn.Parameter(torch.zeros(rank, rank, **kw))
            self.lora_V = nn.Parameter(_random_orthonormal(n, rank, generator, **kw))

    # diffusers and transformers sometimes read these off the projection
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ``B A`` equal to the update (for ``usv``: ``A = V^T``, ``B = U S``)."""
        if self.factorization == "ab":
            return self.lora_down, self.lora_up
        return self.lora_V.T, self.lora_U @ self.lora_S

    def delta_weight(self) -> torch.Tensor:
        """The m x n update ``s * m * B A`` (float32)."""
        a, b = self.factors()
        return (self.scale * self.multiplier) * (b @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.multiplier == 0.0:
            return out
        dtype = out.dtype
        if self.factorization == "ab":
            h = F.linear(x.to(self.lora_down.dtype), self.lora_down)
            h = self._drop(h)
            h = F.linear(h, self.lora_up)
        else:
            h = F.linear(x.to(self.lora_V.dtype), self.lora_V.T)
            h = self._drop(F.linear(h, self.lora_S))
            h = F.linear(h, self.lora_U)
        result = out + (self.scale * self.multiplier) * h.to(dtype)
        if self.full_grad_sink is not None and result.requires_grad:
            self.full_grad_sink.record(self, x, result)
        return result

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and self.rank_dropout > 0.0:
            return F.dropout(h, p=self.rank_dropout, training=True)
        return h

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scale={self.scale}, factorization={self.factorization!r}, "
            f"rank_dropout={self.rank_dropout}"
        )


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator | None, **kw) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q.to(**kw)


def text_encoder_lora_targets(model: nn.Module) -> list[str]:
    """Names of the q/k/v/out projections of every CLIP self-attention (48 in SD 1.5)."""
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "q_proj"):
            names += [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    return names


def unet_lora_targets(unet: nn.Module) -> list[str]:
    """to_q/to_k/to_v/to_out.0 of the transformer blocks' attn1 and attn2 (128 in SD 1.5)."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn1", "attn2"):
            names += [f"{name}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
    return names


def inject_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    scale: float,
    rank_dropout: float = 0.0,
    factorization: str = "ab",
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Replace each named ``nn.Linear`` in ``model`` by a :class:`LoRALinear` wrapping it.

    ``generator`` draws the initial factors (pass a seeded one for reproducible runs).
    """
    layers: dict[str, LoRALinear] = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if isinstance(base, LoRALinear):
            raise ValueError(f"LoRA is already injected at {name!r}")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"Cannot add LoRA to {name!r}: expected nn.Linear, got {type(base)}")
        layer = LoRALinear(base, rank, scale, rank_dropout, factorization, generator)
        if child.isdigit():
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
        layers[name] = layer
    return layers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer in ``model``, names as given to :func:`inject_lora`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module
