"""Gram statistics of a linear layer's inputs, and the three ways to fuse its weight from them.

Gradient fusion (Mix-of-Show) solves, for every adapted linear layer,

    W* = argmin_W  sum_i || W X_i - W_i X_i ||^2,      W_i = W0 + a_i dW_i,

where ``X_i`` (n x T_i) are the layer's inputs while concept i's own model runs. The objective
depends on the data only through

    G = sum_i X_i X_i^T  (n x n),   B = sum_i W_i X_i X_i^T  (m x n),   c = sum_i ||W_i X_i||^2,

    f(W) = tr(W G W^T) - 2 tr(W B^T) + c,

so :class:`GramStats` accumulates exactly these, in float64, call by call (forward hooks feed it
one batch at a time; no activation is ever kept). Memory is at most ``2 n^2 + m n`` numbers per
layer while recording (``G``, ``B`` and the current concept's pending Gram), whatever the number
of concepts or recorded tokens.

Solvers (pure functions of the statistics):

- :func:`solve_closed_form` -- the normal equations with a ridge anchored at the base weight,
  ``W = (B + lam W0)(G + lam I)^-1``. Text and K/V systems are rank-deficient (N concepts x a few
  tokens < n): on input directions no concept covers (``G v = 0``) this gives ``W v = W0 v``
  exactly, as the original's LBFGS started at W0 does; an unanchored ridge would send them to
  zero. ``lam = ridge * mean(diag G)`` (default ``ridge = 1e-6``): relative to the Gram's scale,
  so it means the same for a text layer and for a 64x64 self-attention layer. The ridge costs at
  most ``lam ||W - W0||^2`` of objective against any other W (LBFGS's included); at ``1e-4`` that
  bias left the rank-deficient K/V layers above the original's LBFGS objective in
  ``bench/fusion.py``, at ``1e-6`` every layer kind is below it, while the float64 Cholesky stays
  well conditioned (``cond <= ~1e6 n``) and uncovered directions still keep W0 to ~1e-10.
- :func:`solve_lbfgs` -- the original's iterative solve: ``torch.optim.LBFGS`` (lr 1, history
  25, strong Wolfe, tolerances 1e-16) from W0, keeping the best iterate; here on the Gram form of
  the objective (float64) instead of on stored activations.
- :func:`weight_fusion` -- the baseline ``W0 + sum_i (a_i / N) dW_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "GramStats",
    "objective",
    "ridge_lambda",
    "solve_closed_form",
    "solve_lbfgs",
    "weight_fusion",
]

DEFAULT_RIDGE = 1e-6


@dataclass
class GramStats:
    """Running ``G = sum X X^T``, ``B = sum W_i X X^T``, ``c = sum ||W_i X||^2`` of one layer (float64).

    ``update(x, W_i)`` adds rows to a pending Gram ``P`` of the current target weight; when a
    different target tensor arrives (the next concept) or on :meth:`finalize`, ``P`` is folded in:
    ``G += P``, ``B += W_i P``, ``c += tr(W_i P W_i^T)``. That costs ``T n^2`` per call plus
    ``m n^2`` per concept, instead of ``3 T n^2`` for forming ``W_i x`` on every call. Targets are
    told apart by identity: pass the same tensor object for all rows of one concept and do not
    modify it in place before the next concept or ``finalize()``. ``count`` is the number of rows.
    """

    gram: torch.Tensor | None = None  # n x n
    cross: torch.Tensor | None = None  # m x n
    const: float = 0.0
    count: int = 0
    _pending: torch.Tensor | None = field(default=None, repr=False)
    _pending_target: torch.Tensor | None = field(default=None, repr=False)
    _const_t: torch.Tensor | None = field(default=None, repr=False)  # on-device running c

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, target_weight: torch.Tensor) -> None:
        """Add rows ``inputs`` (..., n) whose target outputs are ``target_weight @ x`` (m x n)."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            return
        if target_weight.shape[-1] != x.shape[1]:
            raise ValueError(f"Inputs of width {x.shape[1]} for a weight of shape {tuple(target_weight.shape)}")
        if self._pending_target is not target_weight:
            self._flush()
            self._pending = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self._pending_target = target_weight
        self._pending.addmm_(x.T, x)
        self.count += x.shape[0]

    @torch.no_grad()
    def _flush(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        w = self._pending_target.to(device=pending.device, dtype=torch.float64)
        self._pending_target = None
        wp = w @ pending
        if self.gram is None:
            self.gram = pending
            self.cross = wp
            self._const_t = (wp * w).sum()
        else:
            self.gram += pending
            self.cross += wp
            self._const_t = self._const_t + (wp * w).sum()

    def finalize(self) -> "GramStats":
        """Fold in the pending rows and move the running constant to ``const`` (one device sync)."""
        self._flush()
        if self._const_t is not None:
            self.const += float(self._const_t)
            self._const_t = None
        return self

    def merged(self, other: "GramStats") -> "GramStats":
        """The statistics of both sets of rows (for combining per-concept recordings)."""
        a, b = self.finalize(), other.finalize()
        if a.gram is None:
            return b
        if b.gram is None:
            return a
        return GramStats(
            a.gram + b.gram.to(a.gram.device),
            a.cross + b.cross.to(a.cross.device),
            a.const + b.const,
            a.count + b.count,
        )

    @property
    def empty(self) -> bool:
        return self.gram is None and self._pending is None


def objective(weight: torch.Tensor, stats: GramStats) -> float:
    """``sum_i ||W X_i - W_i X_i||^2`` from the statistics (float64; 0 when nothing was seen)."""
    stats.finalize()
    if stats.empty:
        return 0.0
    w = weight.to(device=stats.gram.device, dtype=torch.float64)
    value = ((w @ stats.gram) * w).sum() - 2.0 * (w * stats.cross).sum() + stats.const
    return max(float(value), 0.0)  # a sum of squares; below ~1e-16 c the expansion only rounds


def ridge_lambda(gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    """``ridge * mean(diag G)``: the ridge relative to the Gram's scale (0 for an empty Gram)."""
    if ridge < 0:
        raise ValueError(f"Invalid ridge: {ridge} (expected >= 0)")
    return float(ridge * gram.diagonal().mean().clamp_min(0.0))


@torch.no_grad()
def solve_closed_form(stats: GramStats, w0: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``W = (B + lam W0)(G + lam I)^-1`` in float64 (Cholesky; LU if the matrix is not SPD).

    Returns float64 on the statistics' device; W0 itself when no inputs were recorded.
    """
    stats.finalize()
    if stats.empty or stats.count == 0:
        return w0.to(torch.float64).clone()
    gram, cross = stats.gram, stats.cross
    w0_64 = w0.to(device=gram.device, dtype=torch.float64, copy=True)  # scaled in place below
    if gram.shape[0] != w0.shape[1] or cross.shape != w0.shape:
        raise ValueError(
            f"Gram statistics of shape {tuple(cross.shape)} do not match a weight of shape {tuple(w0.shape)}"
        )
    lam = ridge_lambda(gram, ridge)
    if float(gram.diagonal().max()) == 0.0:  # all-zero inputs: nothing to fit
        return w0_64
    system = gram.clone()
    system.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        rhs = w0_64.mul_(lam).add_(cross).T  # (n, m); the system is symmetric, so solve for W^T
        return torch.cholesky_solve(rhs, chol).T.contiguous()
    # not positive definite (ridge 0 on a rank-deficient Gram): the anchored minimum-norm change,
    # W0 + (B - W0 G) G^+, the limit of the ridge solution as lam -> 0
    residual = cross - w0_64 @ gram
    return w0_64 + residual @ torch.linalg.pinv(system, hermitian=True)


def solve_lbfgs(
    stats: GramStats,
    w0: torch.Tensor,
    iters: int = 500,
    history_size: int = 25,
) -> torch.Tensor:
    """The original's LBFGS from W0 (lr 1, strong Wolfe, tolerances 1e-16), best iterate kept.

    The loss is the mean squared error ``f(W) / (count * m)`` like the original's ``mse_loss``,
    computed from the Grams in float64. Returns float64 on the statistics' device.
    """
    if iters < 1:
        raise ValueError(f"Invalid LBFGS iterations: {iters} (expected >= 1)")
    stats.finalize()
    if stats.empty or stats.count == 0:
        return w0.to(torch.float64).clone()
    gram, cross = stats.gram, stats.cross
    scale = 1.0 / (stats.count * w0.shape[0])
    weight = w0.to(device=gram.device, dtype=torch.float64).clone().requires_grad_(True)
    best = {"loss": math.inf, "weight": weight.detach().clone()}
    optimizer = torch.optim.LBFGS(
        [weight],
        lr=1,
        max_iter=iters,
        history_size=history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-16,
        tolerance_change=1e-16,
    )

    @torch.no_grad()
    def closure() -> torch.Tensor:
        # f = tr(W G W^T) - 2 tr(W B^T) + c and its gradient 2 (W G - B): one matmul, no autograd
        wg = weight @ gram
        loss = ((weight * (wg - 2.0 * cross)).sum() + stats.const) * scale
        weight.grad = (2.0 * scale) * (wg - cross)
        value = float(loss)
        if value < best["loss"]:
            best["loss"], best["weight"] = value, weight.detach().clone()
        return loss

    optimizer.step(closure)
    return best["weight"]


@torch.no_grad()
def weight_fusion(
    w0: torch.Tensor, deltas: Sequence[torch.Tensor | None], alphas: Sequence[float]
) -> torch.Tensor:
    """Baseline ``W0 + sum_i (a_i / N) dW_i`` (N = all concepts; None = concept left the layer alone)."""
    if len(deltas) != len(alphas):
        raise ValueError(f"{len(deltas)} deltas but {len(alphas)} alphas")
    out = w0.to(torch.float64).clone()
    n = len(deltas)
    for delta, alpha in zip(deltas, alphas):
        if delta is not None:
            out += (alpha / n) * delta.to(device=out.device, dtype=torch.float64)
    return out
