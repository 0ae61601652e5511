"""Gram statistics of a linear layer's inputs, and the three ways to fuse its weight from them.

Gradient fusion (Mix-of-Show) solves, for every adapted linear layer,

    W* = argmin_W  sum_i || W X_i - W_i X_i ||^2,      W_i = W0 + D_i   (D_i = a_i s B_i A_i),

where ``X_i`` (n x T_i) are the layer's inputs while concept i's own model runs. Written for the
change ``E = W - W0``, the objective depends on the data only through

    G = sum_i X_i X_i^T  (n x n),   C = sum_i D_i X_i X_i^T  (m x n),   c = sum_i ||D_i X_i||^2,

    f(W) = tr(E G E^T) - 2 tr(E C^T) + c,

so :class:`GramStats` accumulates exactly these, in float64, call by call (forward hooks feed it
one batch at a time; no activation is ever kept). A concept's rows first go into a pending Gram
``P``; when the next concept starts, ``P`` is folded in. Concept changes are LoRAs, so ``D_i`` is
kept low-rank (:class:`LowRank`, ``up`` m x r, ``down`` r x n) and ``C = sum_i up_i (down_i P_i)``
is stored as its factors: folding costs ``r n^2`` instead of ``m n^2``, and the solve below needs
``N r`` right-hand sides instead of ``m``. Dense changes (m x n) are accepted too. Memory while
recording is ``2 n^2`` numbers per layer (``G`` and ``P``) plus ``(m + n) r`` per concept,
whatever the number of recorded tokens. ``G`` and ``P`` are symmetric: for wide layers only the
blocks on and above the diagonal are multiplied (:func:`add_gram_`). Layers that read the same
input (q, k, v of an attention) share one ``G`` and ``P`` (``GramStats(..., share=)``), so a
transformer block's six spatial layers need four Grams.

Solvers (pure functions of the statistics):

- :func:`solve_closed_form` -- the normal equations with a ridge anchored at the base weight,
  ``W = (sum_i W_i P_i + lam W0)(G + lam I)^-1 = W0 + C (G + lam I)^-1``. Text and K/V systems
  are rank-deficient (N concepts x a few tokens < n): on input directions no concept covers
  (``G v = 0``) this gives ``W v = W0 v`` exactly, as the original's LBFGS started at W0 does; an
  unanchored ridge would send them to zero. ``lam = ridge * mean(diag G)`` (default
  ``ridge = 1e-6``): relative to the Gram's scale, so it means the same for a text layer and for
  a 64x64 self-attention layer. The ridge costs at most ``lam ||W - W0||^2`` of objective against
  any other W (LBFGS's included); at ``1e-4`` that bias left the rank-deficient K/V layers above
  the original's LBFGS objective in ``bench/fusion.py``, at ``1e-6`` every layer kind is below it,
  while the float64 Cholesky stays well conditioned (``cond <= ~1e6 n``) and uncovered directions
  still keep W0 to ~1e-10.
- :func:`solve_lbfgs` -- the original's iterative solve: ``torch.optim.LBFGS`` (lr 1, history
  25, strong Wolfe, tolerances 1e-16) from W0, keeping the best iterate; here on the Gram form of
  the objective (float64) instead of on stored activations.
- :func:`weight_fusion` -- the baseline ``W0 + sum_i (a_i / N) dW_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GramStats",
    "LowRank",
    "add_gram_",
    "symmetrize_",
    "objective",
    "ridge_lambda",
    "solve_closed_form",
    "solve_lbfgs",
    "weight_fusion",
]

DEFAULT_RIDGE = 1e-6
_PANEL_WIDTH = 128  # columns per panel of the symmetric Gram product (the fastest width measured)


@dataclass(frozen=True, eq=False)
class LowRank:
    """A weight change ``up @ down`` (``up`` m x r, ``down`` r x n), e.g. ``a s B A`` of a LoRA."""

    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"LowRank factors of shapes {tuple(self.up.shape)} and {tuple(self.down.shape)} do not chain"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1])

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


Delta = torch.Tensor | LowRank | None  # a concept's change of one layer (None: it left it alone)


@torch.no_grad()
def add_gram_(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x^T x`` on and above the diagonal blocks (below them: left as is).

    Wide Grams are computed in column panels of ``_PANEL_WIDTH``, each only from its diagonal
    block rightwards (about half the work of the full product; 1.35-1.6x faster in float64 on a
    2-core CPU for widths 320-1280); finish with :func:`symmetrize_`.
    """
    n = x.shape[1]
    if n < 2 * _PANEL_WIDTH:
        gram.addmm_(x.T, x)
        return
    for start in range(0, n, _PANEL_WIDTH):
        stop = start + _PANEL_WIDTH
        gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])


def symmetrize_(gram: torch.Tensor) -> torch.Tensor:
    """Mirror the strict upper triangle of a Gram built by :func:`add_gram_` into the lower one."""
    diagonal = gram.diagonal().clone()
    upper = gram.triu(1)
    torch.add(upper, upper.T, out=gram)
    gram.diagonal().copy_(diagonal)
    return gram


class _Inputs:
    """The input side of one or more layers that read the same tensor: ``G``, the pending ``P``
    of the current concept, the row count, and the layers (heads) to fold ``P`` into."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None  # n x n
        self.pending: torch.Tensor | None = None
        self.marker: object = None  # the concept the pending rows belong to
        self.count = 0
        self.heads: list[GramStats] = []
        self.last: torch.Tensor | None = None  # the last input, and the heads that read it
        self.fed: set[int] = set()

    def same_concept(self, marker: object) -> bool:
        if isinstance(marker, tuple) and isinstance(self.marker, tuple):
            return marker == self.marker
        return marker is self.marker

    def check_all_fed(self) -> None:
        if self.last is not None and len(self.fed) != len(self.heads):
            raise RuntimeError(
                f"{len(self.heads)} layers were declared to read the same input, but only "
                f"{len(self.fed)} of them received the last one; do not share their Gram statistics"
            )

    @torch.no_grad()
    def flush(self) -> None:
        if self.pending is None:
            return
        pending, self.pending = symmetrize_(self.pending), None
        self.gram = pending if self.gram is None else self.gram.add_(pending)
        for head in self.heads:
            head._fold(pending)


class GramStats:
    """Running ``G``, ``C`` and ``c`` of one layer with base weight ``base`` (m x n), in float64.

    ``update(x, delta)`` adds rows ``x`` (..., n) of a concept whose weight is ``base + delta``
    (:class:`LowRank`, a dense m x n tensor, or None for a concept that left the layer alone).
    Concepts are told apart by ``concept`` (any value) when given, else by the identity of
    ``delta``: pass the same object for all rows of one concept, and a new one for the next.
    ``count`` is the number of rows.

    Layers that read the same input tensor (q, k, v of one attention) can share ``G`` and ``P``:
    ``GramStats(base_k, share=stats_q)``. Each of them still calls ``update`` with the same tensor
    object and its own change (with ``concept`` given); the first to see a tensor adds its rows,
    the others only take note, so the Gram is built once for all of them. A shared layer that is
    given a different tensor is an error.
    """

    def __init__(self, base: torch.Tensor, share: GramStats | None = None) -> None:
        if base.dim() != 2:
            raise ValueError(f"GramStats needs a 2-d base weight, got shape {tuple(base.shape)}")
        if share is not None and share.shape[1] != base.shape[1]:
            raise ValueError(
                f"Cannot share inputs of width {share.shape[1]} with a weight of shape {tuple(base.shape)}"
            )
        self.base = base
        self._inputs = share._inputs if share is not None else _Inputs()
        self._inputs.heads.append(self)
        self.dense_cross: torch.Tensor | None = None  # m x n: sum of dense changes' D P
        self.ups: list[torch.Tensor] = []  # m x r per low-rank change
        self.projs: list[torch.Tensor] = []  # down P, r x n per low-rank change
        self.const = 0.0
        self._delta: Delta = None  # this layer's change for the pending rows
        self._const_t: torch.Tensor | None = None  # on-device running c

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)

    @property
    def gram(self) -> torch.Tensor | None:
        return self._inputs.gram

    @property
    def count(self) -> int:
        return self._inputs.count

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, delta: Delta, concept: object = None) -> None:
        """Add rows ``inputs`` (..., n) whose target outputs are ``(base + delta) @ x``."""
        m, n = self.shape
        if inputs.shape[-1] != n:
            raise ValueError(f"Inputs of width {inputs.shape[-1]} for a weight of shape {(m, n)}")
        if delta is not None and tuple(delta.shape) != (m, n):
            raise ValueError(f"A change of shape {tuple(delta.shape)} for a weight of shape {(m, n)}")
        shared = self._inputs
        empty = inputs.numel() == 0  # changes nothing (and must not relabel the pending rows)
        if len(shared.heads) > 1:
            if concept is None:
                raise ValueError("Layers sharing their inputs need update(..., concept=...)")
            if inputs is shared.last and id(self) not in shared.fed:  # rows already added
                shared.fed.add(id(self))
                if not empty:
                    self._delta = delta
                return
            shared.check_all_fed()
            shared.last, shared.fed = inputs, {id(self)}
        if empty:
            return
        marker = ("concept", concept) if concept is not None else delta
        x = inputs.reshape(-1, n).to(torch.float64)
        if shared.pending is None or not shared.same_concept(marker):
            shared.flush()
            shared.pending = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            shared.marker = marker
        self._delta = delta
        add_gram_(shared.pending, x)
        shared.count += x.shape[0]

    @torch.no_grad()
    def _fold(self, pending: torch.Tensor) -> None:
        """Fold the finished concept's Gram ``P`` into this layer's ``C`` and ``c``."""
        delta, self._delta = self._delta, None
        if delta is None:
            return
        f64 = {"device": pending.device, "dtype": torch.float64}
        if isinstance(delta, LowRank):
            up, down = delta.up.to(**f64), delta.down.to(**f64)
            proj = down @ pending  # r x n
            self.ups.append(up)
            self.projs.append(proj)
            const = ((proj @ down.T) * (up.T @ up)).sum()  # tr(up down P down^T up^T)
        else:
            d = delta.to(**f64)
            dp = d @ pending
            self.dense_cross = dp if self.dense_cross is None else self.dense_cross + dp
            const = (dp * d).sum()
        self._const_t = const if self._const_t is None else self._const_t + const

    def finalize(self) -> "GramStats":
        """Fold in the pending rows and move the running constant to ``const`` (one device sync)."""
        self._inputs.check_all_fed()
        self._inputs.flush()
        if self._const_t is not None:
            self.const += float(self._const_t)
            self._const_t = None
        return self

    def cross(self) -> torch.Tensor | None:
        """``C = sum_i D_i P_i`` as one m x n float64 matrix (None when nothing was recorded)."""
        self.finalize()
        if self.gram is None:
            return None
        out = torch.zeros(self.shape, dtype=torch.float64, device=self.gram.device)
        if self.dense_cross is not None:
            out += self.dense_cross
        if self.ups:
            out += torch.cat(self.ups, 1) @ torch.cat(self.projs, 0)
        return out

    def merged(self, other: "GramStats") -> "GramStats":
        """The statistics of both sets of rows (for combining per-concept recordings)."""
        a, b = self.finalize(), other.finalize()
        if a.shape != b.shape or not torch.equal(a.base.cpu(), b.base.cpu()):
            raise ValueError("Cannot merge Gram statistics of different base weights")
        if a.gram is None:
            return b
        if b.gram is None:
            return a
        dev = a.gram.device
        out = GramStats(a.base)
        out._inputs.gram = a.gram + b.gram.to(dev)
        out._inputs.count = a.count + b.count
        dense = [d.to(dev) for d in (a.dense_cross, b.dense_cross) if d is not None]
        out.dense_cross = sum(dense[1:], dense[0]) if dense else None
        out.ups = a.ups + [u.to(dev) for u in b.ups]
        out.projs = a.projs + [p.to(dev) for p in b.projs]
        out.const = a.const + b.const
        return out

    @property
    def empty(self) -> bool:
        return self.gram is None and self._inputs.pending is None


def _change(weight: torch.Tensor, stats: GramStats) -> torch.Tensor:
    """``E = W - W0`` in float64 on the statistics' device."""
    f64 = {"device": stats.gram.device, "dtype": torch.float64}
    return weight.to(**f64) - stats.base.to(**f64)


def objective(weight: torch.Tensor, stats: GramStats) -> float:
    """``sum_i ||W X_i - W_i X_i||^2`` from the statistics (float64; 0 when nothing was seen)."""
    stats.finalize()
    if stats.empty:
        return 0.0
    e = _change(weight, stats)
    value = ((e @ stats.gram) * e).sum() + stats.const
    if stats.dense_cross is not None:
        value -= 2.0 * (e * stats.dense_cross).sum()
    for up, proj in zip(stats.ups, stats.projs):
        value -= 2.0 * ((up.T @ e) * proj).sum()  # tr(E proj^T up^T)
    return max(float(value), 0.0)  # a sum of squares; below ~1e-16 c the expansion only rounds


def ridge_lambda(gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    """``ridge * mean(diag G)``: the ridge relative to the Gram's scale (0 for an empty Gram)."""
    if ridge < 0:
        raise ValueError(f"Invalid ridge: {ridge} (expected >= 0)")
    return float(ridge * gram.diagonal().mean().clamp_min(0.0))


@torch.no_grad()
def solve_closed_form(stats: GramStats, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``W = W0 + C (G + lam I)^-1`` in float64 (Cholesky; the pseudo-inverse if not SPD).

    Low-rank changes make ``C^T = [proj_1^T ...] [up_1 ...]^T``, so the solve has ``N r``
    right-hand sides. Returns float64 on the statistics' device; W0 when no inputs were recorded.
    """
    stats.finalize()
    if stats.empty or stats.count == 0:
        return stats.base.to(torch.float64).clone()
    gram = stats.gram
    w0 = stats.base.to(device=gram.device, dtype=torch.float64)
    if float(gram.diagonal().max()) == 0.0:  # all-zero inputs: nothing to fit
        return w0.clone()
    system = gram.clone()
    system.diagonal().add_(ridge_lambda(gram, ridge))
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:

        def solve(rhs: torch.Tensor) -> torch.Tensor:  # (n, k) -> (G + lam I)^-1 rhs
            return torch.cholesky_solve(rhs, chol)

    else:
        # not positive definite (ridge 0 on a rank-deficient Gram): the anchored minimum-norm
        # change W0 + C G^+, the limit of the ridge solution as lam -> 0
        pinv = torch.linalg.pinv(system, hermitian=True)

        def solve(rhs: torch.Tensor) -> torch.Tensor:
            return pinv @ rhs

    out = w0.clone()
    if stats.ups:
        z = solve(torch.cat(stats.projs, 0).T)  # n x (N r); the system is symmetric
        out.addmm_(torch.cat(stats.ups, 1), z.T)
    if stats.dense_cross is not None:
        out += solve(stats.dense_cross.T).T
    return out


def solve_lbfgs(stats: GramStats, iters: int = 500, history_size: int = 25) -> torch.Tensor:
    """The original's LBFGS from W0 (lr 1, strong Wolfe, tolerances 1e-16), best iterate kept.

    The loss is the mean squared error ``f(W) / (count * m)`` like the original's ``mse_loss``,
    computed from the Grams in float64 (on the change ``E = W - W0``, started at 0). Returns
    float64 on the statistics' device.
    """
    if iters < 1:
        raise ValueError(f"Invalid LBFGS iterations: {iters} (expected >= 1)")
    stats.finalize()
    if stats.empty or stats.count == 0:
        return stats.base.to(torch.float64).clone()
    gram, cross = stats.gram, stats.cross()
    scale = 1.0 / (stats.count * stats.shape[0])
    change = torch.zeros_like(cross, requires_grad=True)
    best = {"loss": math.inf, "change": change.detach().clone()}
    optimizer = torch.optim.LBFGS(
        [change],
        lr=1,
        max_iter=iters,
        history_size=history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-16,
        tolerance_change=1e-16,
    )

    @torch.no_grad()
    def closure() -> torch.Tensor:
        # f = tr(E G E^T) - 2 tr(E C^T) + c and its gradient 2 (E G - C): one matmul, no autograd
        eg = change @ gram
        loss = ((change * (eg - 2.0 * cross)).sum() + stats.const) * scale
        change.grad = (2.0 * scale) * (eg - cross)
        value = float(loss)
        if value < best["loss"]:
            best["loss"], best["change"] = value, change.detach().clone()
        return loss

    optimizer.step(closure)
    return stats.base.to(cross) + best["change"]


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
