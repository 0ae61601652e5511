"""Common base of the LoRA optimizers: param groups made of LoRA pairs (or StelLA triples).

A group is given as ``{"pairs": [(A, B), ...], "scale": s, "lr": ..., ...}`` with ``A`` r x n
(lora_down) and ``B`` m x r (lora_up); StelLA takes ``{"triples": [(U, S, V), ...]}``. Internally
the factors are stored flat in ``group["params"]`` (A0, B0, A1, B1, ...), so torch's own
``state_dict()``/``load_state_dict()`` work unchanged, and the pairs are read back from that
order. Per-pair state lives under the pair's first tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from mixofshow.optim.full_grad import FullGradients

__all__ = ["LoRAOptimizer", "bucket_by_shape", "check_positive", "check_beta"]


class LoRAOptimizer(torch.optim.Optimizer):
    """Base class: validates and flattens factor groups; subclasses implement ``step``.

    Class attributes:
        group_key: ``"pairs"`` or ``"triples"``.
        needs_full_grad: the optimizer reads the full gradient ``G = dL/dW`` (m x n) of every
            pair, from the :class:`~mixofshow.optim.full_grad.FullGradients` bound to it
            (``build_optimizer(..., full_grads=...)``), through :meth:`full_grad` or
            :meth:`full_grad_energies`.
        full_grad_energies_only: it reads only G's row/column energies (the hook may reduce G at
            once, see ``choose_mode``).
    """

    group_key: ClassVar[str] = "pairs"
    needs_full_grad: ClassVar[bool] = False
    full_grad_energies_only: ClassVar[bool] = False
    full_grads: FullGradients | None = None

    def __init__(self, groups: Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        arity = 2 if self.group_key == "pairs" else 3
        flat_groups = []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or self.group_key not in group:
                raise ValueError(
                    f"Param group {i} of {type(self).__name__} needs a {self.group_key!r} key "
                    f"(a list of {'(A, B)' if arity == 2 else '(U, S, V)'} tuples)"
                )
            group = dict(group)
            factors = [tuple(f) for f in group.pop(self.group_key)]
            for j, f in enumerate(factors):
                if len(f) != arity:
                    raise ValueError(f"Group {i}, entry {j}: expected {arity} tensors, got {len(f)}")
                self._check_factors(f, f"group {i}, entry {j}")
            group["params"] = [t for f in factors for t in f]
            flat_groups.append(group)
        defaults.setdefault("scale", 1.0)
        super().__init__(flat_groups, defaults)

    @classmethod
    def _check_factors(cls, f: Sequence[torch.Tensor], where: str) -> None:
        if any(t.dim() != 2 for t in f):
            raise ValueError(f"{where}: factors must be 2-D, got shapes {[tuple(t.shape) for t in f]}")
        if cls.group_key == "pairs":
            a, b = f
            if a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{where}: A must be r x n and B m x r, got A {tuple(a.shape)}, B {tuple(b.shape)}"
                )
        else:
            u, s, v = f
            r = s.shape[0]
            if s.shape != (r, r) or u.shape[1] != r or v.shape[1] != r:
                raise ValueError(
                    f"{where}: expected U m x r, S r x r, V n x r, got "
                    f"{tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}"
                )

    def factor_tuples(self, group: dict[str, Any]) -> list[tuple[torch.Tensor, ...]]:
        """The group's pairs ``(A, B)`` (or triples ``(U, S, V)``) in the order given."""
        params = group["params"]
        k = 2 if self.group_key == "pairs" else 3
        return [tuple(params[i : i + k]) for i in range(0, len(params), k)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self.full_grads is not None:
            self.full_grads.zero_()

    # -- the full gradient (only optimizers with needs_full_grad) -----------------------------
    def bind_full_grads(self, full_grads: FullGradients) -> None:
        """Read the full gradients from ``full_grads``, which must hold every pair of the groups."""
        for group in self.param_groups:
            for a, b in self.factor_tuples(group):
                if a not in full_grads or full_grads.shape(a) != (b.shape[0], a.shape[1]):
                    raise ValueError(
                        f"{type(self).__name__}: the full gradients given do not hold the pair with "
                        f"A {tuple(a.shape)}, B {tuple(b.shape)}"
                    )
        if full_grads.mode != "matrix" and not self.full_grad_energies_only:
            raise ValueError(f"{type(self).__name__} reads G itself: its full gradients need mode 'matrix'")
        self.full_grads = full_grads

    def has_full_grad(self, a: torch.Tensor) -> bool:
        return self.full_grads is not None and self.full_grads.has_grad(a)

    def full_grad(self, a: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """G (m x n) of the pair whose A is ``a``; a clear error when it was not recorded."""
        return self._require(self.full_grads.grad(a) if self.full_grads is not None else None, a, shape)

    def full_grad_energies(self, a: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rowsum(G^2), colsum(G^2))`` of the pair whose A is ``a`` (m and n entries)."""
        found = self.full_grads.energies(a) if self.full_grads is not None else None
        self._require(found, a, shape)
        return found

    def _require(self, found, a: torch.Tensor, shape: tuple[int, int]):
        if found is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the full weight gradient dL/dW of every LoRA layer, but "
                f"the pair with A of shape {tuple(a.shape)} has none: pass full_grads= "
                f"(mixofshow.optim.full_grad.FullGradients, attached to the layers) to build_optimizer"
            )
        return found


def bucket_by_shape(tensors: Sequence[Sequence[torch.Tensor]]) -> dict[tuple, list[int]]:
    """Indices of factor tuples grouped by (shapes, dtype, device), for batched linear algebra."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(tensors):
        key = (tuple(tuple(t.shape) for t in f), f[0].dtype, f[0].device)
        buckets[key].append(i)
    return dict(buckets)


def check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` for a negative (or zero, when not allowed) hyper-parameter."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value}")


def check_beta(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value}")
