"""The one skeleton of every LoRA optimizer: param groups of LoRA pairs (or StelLA triples), the
step driver, the step counters, "has a gradient", the full-gradient accessor and the shared
hyper-parameter validators. ``docs/optimizers.md`` ("How to add an optimizer") shows its use.

A group is given as ``{"pairs": [(A, B), ...], "scale": s, "lr": ..., ...}`` with ``A`` r x n
(lora_down) and ``B`` m x r (lora_up); StelLA takes ``{"triples": [(U, S, V), ...]}``. Internally
the factors are stored flat in ``group["params"]`` (A0, B0, A1, B1, ...), so torch's own
``state_dict()``/``load_state_dict()`` work unchanged, and the pairs are read back from that
order. Per-pair state lives under the pair's first tensor.

``step()`` collects, in every group, the factor tuples that have a gradient (:meth:`has_grad`),
groups them into shape buckets and hands the list of ``(group, tuples)`` buckets to
``_step_buckets``, which by default calls ``_step_bucket(group, tuples)`` on each; optimizers that
batch across buckets and groups override ``_step_buckets``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from mixofshow.optim.batching import keep_saved_state_dtypes
from mixofshow.optim.full_grad import FullGradients

__all__ = [
    "HyperParameterError",
    "LoRAOptimizer",
    "bucket_by_shape",
    "check_beta",
    "check_betas",
    "check_choice",
    "check_lr",
    "check_no_weight_decay",
    "check_positive",
    "step_counters",
]


# ----------------------------------------------------------------------------- validators


class HyperParameterError(ValueError):
    """A bad hyper-parameter: ``key`` is the name it is set by (``optimizer.params.<key>``), the
    message is torch/timm style (``Invalid beta1: 1.5``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_lr(lr: float) -> None:
    """``ValueError`` (``Invalid learning rate: ...``) unless ``lr >= 0``."""
    if not _is_number(lr) or lr < 0:
        raise HyperParameterError("lr", f"Invalid learning rate: {lr}")


def check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    """``ValueError`` for a non-number, a negative (or, when not allowed, zero) hyper-parameter."""
    if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise HyperParameterError(name, f"Invalid {name}: {value}")


def check_beta(name: str, value: float) -> None:
    """``ValueError`` unless ``0 <= value < 1``."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise HyperParameterError(name, f"Invalid {name}: {value}")


def check_betas(betas: Sequence[float]) -> tuple[float, float]:
    """Validate Adam's ``(beta1, beta2)``; returns them as a tuple."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise HyperParameterError("betas", f"Invalid betas: {betas!r} (expected two numbers, e.g. [0.9, 0.999])")
    for i, beta in enumerate(betas, 1):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise HyperParameterError("betas", f"Invalid beta{i}: {beta}")
    return float(betas[0]), float(betas[1])


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise HyperParameterError(name, f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


def check_no_weight_decay(weight_decay: float) -> None:
    """The LoRA-S optimizers take no weight decay: the Sylvester matrix of the lift replaces it."""
    if weight_decay != 0.0:
        raise HyperParameterError(
            "weight_decay",
            f"Invalid weight_decay: {weight_decay} (LoRA-S optimizers take no weight decay; "
            "the Sylvester matrix K of the horizontal lift replaces it)",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- shared pieces


def bucket_by_shape(tensors: Sequence[Sequence[torch.Tensor]]) -> dict[tuple, list[int]]:
    """Indices of factor tuples grouped by (shapes, dtype, device), for batched linear algebra."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(tensors):
        key = (tuple(tuple(t.shape) for t in f), f[0].dtype, f[0].device)
        buckets[key].append(i)
    return dict(buckets)


def step_counters(states: list[dict]) -> list[torch.Tensor]:
    """The step counters of these per-pair states: the one counter type of every optimizer here,
    a float32 scalar tensor on the CPU (as ``torch.optim.Adam`` keeps it: reading it never syncs),
    created at 0. They are incremented in place, so a ``state_dict()`` is a view of the running
    state and ``load_state_dict`` copies. (Only torch's fused AdamW kernel on an accelerator keeps
    its counters on the device, see ``adamw.adam_state``.)"""
    for st in states:
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
    return [st["step"] for st in states]


# ----------------------------------------------------------------------------- the driver


class LoRAOptimizer(torch.optim.Optimizer):
    """Base class: validates and flattens factor groups, drives ``step()`` over shape buckets.

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
    group_facts: ClassVar[tuple[str, ...]] = ()  # group keys read besides the hyper-parameters (set by the builder)
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
        # a key this optimizer does not read would be ignored silently (a typo, or another
        # optimizer's hyper-parameter): refuse it, naming the ones it takes
        allowed = set(defaults) | {"params", "lr", "scale", "name"} | set(self.group_facts)
        for i, group in enumerate(flat_groups):
            unknown = sorted(set(group) - allowed)
            if unknown:
                known = sorted(set(defaults) - {"scale"})
                raise ValueError(f"Param group {i} of {type(self).__name__}: unknown hyper-parameter(s) {unknown}; "
                                 f"it takes {known}")
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

    def has_grad(self, f: Sequence[torch.Tensor]) -> bool:
        """The one definition of "this pair takes a step": a factor has a gradient or the pair
        has a full gradient. Missing factor gradients then count as zeros."""
        return any(t.grad is not None for t in f) or (self.needs_full_grad and self.has_full_grad(f[0]))

    # -- the driver -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = []
        for group in self.param_groups:
            tuples = [f for f in self.factor_tuples(group) if self.has_grad(f)]
            buckets += [(group, [tuples[i] for i in idx]) for idx in bucket_by_shape(tuples).values()]
        if buckets:
            self._step_buckets(buckets)
        return loss

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        for group, tuples in buckets:
            self._step_bucket(group, tuples)

    def _step_bucket(self, group: dict[str, Any], tuples: list[tuple[torch.Tensor, ...]]) -> None:
        raise NotImplementedError

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        keep_saved_state_dtypes(self, state_dict)  # fp32 statistics of bf16/fp16 factors stay fp32
        for st in self.state.values():
            for key, value in st.items():
                if key == "step":  # the CPU counter of step_counters
                    st[key] = torch.as_tensor(value, dtype=torch.float32).detach().to("cpu").clone()
                elif isinstance(value, torch.Tensor):  # own copies: updates must not reach the dict
                    st[key] = value.clone()
