"""The full weight gradients ``G = dL/dW`` of LoRA layers, for the optimizers that read them.

``adams-full`` and ``lracs`` read ``G`` itself (m x n); ``adaprelora`` reads only its row and
column energies (sums of ``G^2`` per row and per column). Plain LoRA training never forms ``G``:
the :class:`~mixofshow.concepts.lora.LoRALinear` layer computes it in a backward hook from its
input ``x`` and output gradient ``dy`` (``G = dy^T x``, one GEMM, fp32 accumulation) when a
:class:`FullGradients` is attached to it. The training loop owns that object (one per run, only
for the layers whose optimizer asks for it), the optimizer reads it (``build_optimizer(...,
full_grads=...)``), and the loop's gradient steps cover it: ``clip_grad_norm_`` (``train.
max_grad_norm``), the fp16 loss scaler's unscale (``finish_backward_``), and the all-reduce of
multi-process training (:meth:`FullGradients.all_reduce_`). See README.md, "Optimizers".

Two modes (:func:`choose_mode`):

- ``"matrix"``: ``G`` is kept (fp32, m x n per layer), summed over every backward pass of the step
  (micro-batches), then all-reduced, clipped, unscaled, read. The row/column statistics of a sum
  are not the sums of the statistics, so this is the only correct mode with gradient accumulation
  or several processes.
- ``"energies"``: ``G`` lives only inside the hook, which reduces it at once to its row and column
  energies; nothing m x n survives the backward pass. Only with one backward pass per step in one
  process, and only for optimizers that read nothing else (``energies_only``). A layer called
  several times in one forward pass keeps its partial ``G`` until its last hook of the step has run
  (the energies of the sum, never the sum of energies).

Scaling: ``G`` scales linearly, its energies quadratically (:meth:`FullGradients.mul_`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mixofshow.concepts.lora import LoRALinear, lora_layers

__all__ = [
    "ENERGIES",
    "MATRIX",
    "FullGradients",
    "choose_mode",
    "clip_grad_norm_",
    "finish_backward_",
    "full_gradients_for",
]

MATRIX = "matrix"
ENERGIES = "energies"


def choose_mode(energies_only: bool, accumulation_steps: int = 1, num_processes: int = 1) -> str:
    """``"energies"`` when the optimizer reads only G's row/column energies and each step is one
    backward pass in one process; ``"matrix"`` (keep G) otherwise."""
    if energies_only and accumulation_steps == 1 and num_processes == 1:
        return ENERGIES
    return MATRIX


class _Slot:
    """One layer's gradient: ``g`` (m x n) or its energies ``row`` (m), ``col`` (n)."""

    __slots__ = ("a", "shape", "g", "row", "col", "pending", "keep")

    def __init__(self, a: torch.Tensor, shape: tuple[int, int]) -> None:
        self.a = a  # the pair's A (lora_down): the key the optimizer reads by
        self.shape = shape
        self.g: torch.Tensor | None = None
        self.row: torch.Tensor | None = None
        self.col: torch.Tensor | None = None
        self.pending = 0  # hooks registered in a forward pass that have not run yet
        self.keep = False  # reduce only when read (a checkpointing recomputation was seen)

    def reduce(self) -> None:
        g2 = self.g.square()
        self.row, self.col, self.g = g2.sum(-1), g2.sum(-2), None


class FullGradients:
    """The full gradients ``G = dL/dW`` of a set of LoRA pairs, filled by the layers' hooks.

    Args:
        pairs: the ``(A, B)`` pairs (A r x n, B m x r); G of a pair is m x n, keyed by its A.
        mode: ``"matrix"`` (keep G) or ``"energies"`` (row/column energies only); see the module
            docstring and :func:`choose_mode`.
    """

    def __init__(self, pairs: Iterable[Sequence[torch.Tensor]], mode: str = MATRIX) -> None:
        if mode not in (MATRIX, ENERGIES):
            raise ValueError(f"Invalid full-gradient mode: {mode!r} (expected {MATRIX!r} or {ENERGIES!r})")
        self.mode = mode
        self._slots: dict[int, _Slot] = {}
        for a, b in pairs:
            self._slots[id(a)] = _Slot(a, (b.shape[0], a.shape[1]))
        self._layers: list[LoRALinear] = []

    @classmethod
    def for_layers(cls, layers: Iterable[LoRALinear], mode: str = MATRIX) -> "FullGradients":
        """One for ``layers`` (``"ab"`` factorization), attached: their hooks fill it from now on."""
        layers = list(layers)
        for layer in layers:
            if layer.factorization != "ab":
                raise ValueError(f"Full gradients need 'ab' LoRA layers, got {layer.factorization!r}")
        full = cls([(layer.lora_down, layer.lora_up) for layer in layers], mode)
        for layer in layers:
            layer.full_grad_sink = full
        full._layers = layers
        return full

    def detach(self) -> None:
        """Stop the attached layers' hooks (they no longer compute G)."""
        for layer in self._layers:
            if layer.full_grad_sink is self:
                layer.full_grad_sink = None
        self._layers = []

    # -- filled by the layers ----------------------------------------------------------------
    def record(self, layer: LoRALinear, x: torch.Tensor, out: torch.Tensor) -> None:
        """Called by ``layer.forward``: add ``dy^T x`` to the layer's G when ``out``'s gradient runs."""
        slot = self._slot(layer.lora_down)
        x = x.detach()
        seen = slot.pending > 0 or slot.g is not None or slot.row is not None
        if seen and torch._C._current_graph_task_id() != -1:
            # a forward run inside the backward pass: gradient checkpointing recomputing a forward
            # already counted. Its hook never runs with non-reentrant checkpointing and runs with
            # reentrant checkpointing, so it is not counted and G is reduced only when read.
            slot.keep = True
            out.register_hook(lambda dy: self._accumulate(slot, x, dy, counted=False))
            return
        if self.mode == ENERGIES and slot.row is not None:
            raise RuntimeError(
                "Full gradients in 'energies' mode saw a second backward pass in one step; the "
                "energies of a sum are not the sum of energies: use mode 'matrix' (choose_mode with "
                "the step's accumulation_steps and num_processes)"
            )
        slot.pending += 1
        out.register_hook(lambda dy: self._accumulate(slot, x, dy, counted=True))

    def _accumulate(self, slot: _Slot, x: torch.Tensor, dy: torch.Tensor, counted: bool) -> None:
        if slot.row is not None:
            raise RuntimeError(
                "Full gradients in 'energies' mode got a contribution after reducing G to its "
                "energies (a layer recomputed by reentrant gradient checkpointing after its own hook "
                "ran?); use mode 'matrix'"
            )
        dt = torch.float64 if torch.float64 in (x.dtype, dy.dtype) else torch.float32
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)
        if slot.g is None:
            slot.g = dy2.T @ x2  # the one GEMM per layer and backward
        else:  # a product then a sum (not addmm_, whose blocked GEMM adds into G panel by panel):
            # gradient accumulation then sums each pass's G exactly as DDP's all-reduce does
            slot.g.add_(dy2.T @ x2)
        if counted:
            slot.pending -= 1
        if self.mode == ENERGIES and slot.pending == 0 and not slot.keep:
            slot.reduce()

    def set_(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Set the G of the pair whose A is ``a`` directly (custom loops, tests, benches)."""
        slot = self._slot(a)
        if tuple(g.shape) != slot.shape:
            raise ValueError(f"Full gradient of shape {tuple(g.shape)}, expected {slot.shape}")
        slot.g, slot.row, slot.col, slot.pending = g.detach().clone(), None, None, 0
        if self.mode == ENERGIES:
            slot.reduce()

    # -- read by the optimizer ----------------------------------------------------------------
    def __contains__(self, a: torch.Tensor) -> bool:
        return id(a) in self._slots and self._slots[id(a)].a is a

    def shape(self, a: torch.Tensor) -> tuple[int, int]:
        return self._slot(a).shape

    def has_grad(self, a: torch.Tensor) -> bool:
        slot = self._slot(a)
        return slot.g is not None or slot.row is not None

    def grad(self, a: torch.Tensor) -> torch.Tensor | None:
        """G (m x n) of the pair whose A is ``a``, or None when its layer had no backward pass."""
        if self.mode == ENERGIES:
            raise RuntimeError("This optimizer reads G itself; build its FullGradients in mode 'matrix'")
        return self._slot(a).g

    def energies(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rowsum(G^2), colsum(G^2))`` of the pair whose A is ``a`` (None without a gradient)."""
        slot = self._slot(a)
        if slot.g is not None:
            if self.mode == ENERGIES:  # partial contributions whose last hook never ran
                slot.reduce()
            else:
                g2 = slot.g.square()
                return g2.sum(-1), g2.sum(-2)
        return None if slot.row is None else (slot.row, slot.col)

    # -- the training loop's gradient steps ---------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The G matrices, one per pair in a fixed order (zeros where no backward reached it), so
        every process all-reduces the same list; ``"matrix"`` mode only."""
        if self.mode != MATRIX:
            raise RuntimeError(
                "Full gradients in 'energies' mode cannot be all-reduced (the energies of a sum are "
                "not the sum of energies); multi-process training needs mode 'matrix'"
            )
        out = []
        for slot in self._slots.values():
            if slot.g is None:
                slot.g = torch.zeros(slot.shape, dtype=torch.float32, device=slot.a.device)
            out.append(slot.g)
        return out

    def all_reduce_(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Reduce every G across processes with ``reduce_fn`` (in place, or returning the result),
        e.g. ``lambda t: accelerator.reduce(t, reduction="mean")``: the same averaging as the
        factor gradients get from DDP."""
        for g in self.tensors():
            result = reduce_fn(g)
            if result is not None and result is not g:
                g.copy_(result)

    def norm_sq(self) -> torch.Tensor:
        """``sum ||G||_F^2`` over the pairs (0-d fp32 tensor; no host sync): G's share of the
        global gradient norm."""
        total = torch.zeros((), dtype=torch.float32)
        for slot in self._slots.values():
            if slot.g is not None:
                part = slot.g.square().sum()
            elif slot.row is not None:
                part = slot.row.sum()  # rowsum(G^2) adds up to ||G||^2
            else:
                continue
            total = total.to(part.device) + part.float()
        return total

    def mul_(self, factor: float | torch.Tensor) -> None:
        """Scale every G by ``factor`` (its energies by ``factor^2``): clipping, unscaling."""
        for slot in self._slots.values():
            if slot.g is not None:
                slot.g.mul_(factor)
            if slot.row is not None:
                sq = factor * factor
                slot.row.mul_(sq)
                slot.col.mul_(sq)

    def unscale_(self, inv_scale: float | torch.Tensor) -> None:
        """Undo a loss scale: ``G <- G * inv_scale`` (as GradScaler.unscale_ does to ``.grad``)."""
        self.mul_(inv_scale)

    def zero_(self) -> None:
        """Forget every G (``optimizer.zero_grad()`` calls this): the next step starts from none."""
        for slot in self._slots.values():
            slot.g = slot.row = slot.col = None
            slot.pending, slot.keep = 0, False

    def _slot(self, a: torch.Tensor) -> _Slot:
        slot = self._slots.get(id(a))
        if slot is None or slot.a is not a:
            raise KeyError(f"No full gradient is kept for the pair with A of shape {tuple(a.shape)}")
        return slot


def full_gradients_for(
    components: Mapping[str, nn.Module],
    optimizer_cls: type,
    accumulation_steps: int = 1,
    num_processes: int = 1,
) -> FullGradients | None:
    """The full gradients the optimizer class asks for (``needs_full_grad``), attached to the
    trainable LoRA layers of ``components``; None (no hook, no cost) when it asks for none."""
    if not getattr(optimizer_cls, "needs_full_grad", False):
        return None
    energies_only = bool(getattr(optimizer_cls, "full_grad_energies_only", False))
    mode = choose_mode(energies_only, accumulation_steps, num_processes)
    layers = [
        layer
        for module in components.values()
        for _, layer in lora_layers(module)
        if any(p.requires_grad for p in layer.parameters(recurse=False))
    ]
    return FullGradients.for_layers(layers, mode)


def finish_backward_(accelerator: Any, full_grads: FullGradients | None) -> None:
    """After the step's last backward pass: average G across processes (the factor gradients'
    averaging), then undo the fp16 loss scale on every gradient (factor gradients through
    accelerate, G here), so clipping and the optimizer see true gradients. A no-op in one fp32
    process. ``accelerator`` needs ``num_processes``, ``scaler``, ``reduce`` and
    ``unscale_gradients`` (accelerate's ``Accelerator``)."""
    if full_grads is not None and accelerator.num_processes > 1:
        full_grads.all_reduce_(lambda t: accelerator.reduce(t, reduction="mean"))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    accelerator.unscale_gradients()
    if full_grads is not None:
        # the same scale the factor gradients were just divided by (GradScaler keeps 1/scale in
        # fp32 as well); read before the scaler's update at the optimizer step
        full_grads.unscale_(1.0 / scaler.get_scale())


def clip_grad_norm_(
    params: Iterable[torch.Tensor], full_grads: FullGradients | None, max_norm: float
) -> torch.Tensor:
    """Clip the global 2-norm of the parameters' gradients and the full gradients to ``max_norm``.

    The same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    clamped to 1, applied without a host sync), with ``||G||_F^2`` of every pair added to the
    norm. Returns the total norm before clipping.
    """
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_grad_norm: expected a positive number, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    squares = [torch.linalg.vector_norm(g.float()).square() for g in grads]
    if full_grads is not None:
        squares.append(full_grads.norm_sq())
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    total = torch.stack([s.to(device) for s in squares]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    if full_grads is not None:
        full_grads.mul_(coef)
    return total
