"""StelLA: LoRA as ``U S V^T`` with U and V kept on the Stiefel manifold.

Paper: "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel Manifold", Zhizhong Li,
Sina Sajadmanesh, Jingtao Li, Lingjuan Lyu, 2025, https://arxiv.org/abs/2510.01938.
Reference code: https://github.com/SonyResearch/stella (``stella/tuner/stiefel.py`` and the pre/post
optimizer-step hooks of ``stella/tuner/model.py`` around a Euclidean optimizer). This is an
independent optimizer-side implementation of the same rule, with the authors' defaults.

Triples ``(U m x r, S r x r, V n x r)``, ``dW = s U S V^T``. Per step, for X in {U, V} (rows x r)::

    g <- g - X g^T X                     (metric="canonical", the authors' euclidean2riemannian)
      or g - X sym(X^T g)                (metric="euclidean": the embedded-metric projection)
    D  = -lr m^ / (sqrt(v^) + eps)       (Adam on the Riemannian gradient, no weight decay)
    D <- D / sqrt(rows / c)              (grad_scaling; skipped when rows == c)
    D <- D - X sym(X^T D)                (tangent projection)
    X <- polar(X + D)                    (retraction="polar": U Vt of the thin SVD)
      or exp_map(X, D)                   (retraction="exp_map": the canonical-metric geodesic)

and ``S`` takes a plain AdamW step (torch's kernel; ``weight_decay`` applies to S only: on U, V the
tangent projection would remove it anyway, ``P_X(X) = 0``). ``grad_scaling``: ``True`` takes
``c`` = the group's ``hidden_size`` (the param-group builder sets the text encoder's hidden size;
768, SD 1.x's, when a group has none), a number sets ``c``, ``False`` turns it off.

Implementation: U and V are batched by their own shape across layers and groups, stored as the
batched products run fastest on CPU (:func:`~mixofshow.optim.batching.rows_layout`: their own
(rows, r) layout from rank 8, else r-major), their Adam moments too (shape (rows, r), or (r, rows)
below rank 8). The polar factor is
``Y (Y^T Y)^-1/2`` from the eigendecomposition of the r x r Gram (see :func:`polar`), in float32
(float64 for float64 factors). Needs ``LoRALinear(factorization="usv")``. Math and tests:
``docs/optimizers.md``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from mixofshow.optim.adamw import adamw_update
from mixofshow.optim.base import (
    HyperParameterError,
    LoRAOptimizer,
    check_betas,
    check_choice,
    check_lr,
    check_positive,
    step_counters,
)
from mixofshow.optim.batching import compute_dtype, concat_call, inverse_sqrt, rows_layout, rows_matmul, sym
from mixofshow.optim.bucketed import DirectionBatch, grad_or_zeros, per_pair, state_tensor
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "DEFAULT_HIDDEN_SIZE",
    "SPECS",
    "StelLA",
    "polar",
    "stella_reference",
    "stiefel_exp",
    "stiefel_project",
]

DEFAULT_HIDDEN_SIZE = 768  # SD 1.x's text encoder (CLIP ViT-L/14): c when a group has no hidden_size
METRICS = ("canonical", "euclidean")
RETRACTIONS = ("polar", "exp_map")


def stiefel_project(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Tangent projection ``d - x sym(x^T d)`` at ``x`` on the Stiefel manifold (batched)."""
    return d - x @ sym(x.mT @ d)


def polar(y: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``y (y^T y)^-1/2`` (= ``W Zt`` of the thin SVD ``y = W Sigma Zt``).

    Batched, through the eigendecomposition of the r x r Gram instead of an SVD of the m x r
    matrix (several times faster on CPU). Forming ``y^T y`` squares y's condition number, which
    is harmless for the retraction: there ``y = X + D`` with ``X^T D`` skew, so
    ``y^T y = I + D^T D`` has every eigenvalue >= 1. ``y`` must have full column rank.
    """
    return y @ inverse_sqrt(sym(y.mT @ y), 0.0)


def stiefel_exp(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The canonical-metric geodesic from ``x`` along the tangent ``d`` (batched (k, m, r)).

    Edelman, Arias & Smith (1998), eq. 2.45, as the authors' ``exp_map``: with ``A = x^T d`` and
    ``d - x A = Q R`` (thin QR), ``[x, Q] expm([[A, -R^T], [R, 0]]) [I; 0]``.
    """
    r = x.shape[-1]
    a = x.mT @ d
    q, rr = torch.linalg.qr(d - x @ a)
    top = torch.cat([a, -rr.mT], -1)
    bottom = torch.cat([rr, torch.zeros_like(rr)], -1)
    e = torch.linalg.matrix_exp(torch.cat([top, bottom], -2))
    return x @ e[..., :r, :r] + q @ e[..., r:, :r]


def stella_reference(
    u, s, v, gu, gs, gv, state, *, lr, beta1, beta2, eps, weight_decay,
    metric="canonical", scaling_c=None, retraction="polar",
):  # fmt: skip
    """Plain one-triple StelLA step, per matrix, written from the authors' rule; returns new
    ``(U, S, V)`` (``state`` updated in place). ``scaling_c``: c of the gradient scaling (None: off)."""
    t = state["t"] = state.get("t", 0) + 1

    def adam(key, g):
        mm = state[key + "m"] = beta1 * state.get(key + "m", torch.zeros_like(g)) + (1 - beta1) * g
        vm = state[key + "v"] = beta2 * state.get(key + "v", torch.zeros_like(g)) + (1 - beta2) * g * g
        return -lr * (mm / (1 - beta1**t)) / ((vm / (1 - beta2**t)).sqrt() + eps)

    def tangent(x, d):
        return d - x @ (x.T @ d + d.T @ x) / 2

    new = {}
    for key, x, g in (("U", u, gu), ("V", v, gv)):
        rg = g - x @ g.T @ x if metric == "canonical" else tangent(x, g)
        d = adam(key, rg)
        rows = x.shape[0]
        if scaling_c is not None and rows != scaling_c:
            d = d / math.sqrt(rows / scaling_c)
        d = tangent(x, d)
        if retraction == "polar":
            w, _, zt = torch.linalg.svd(x + d, full_matrices=False)
            new[key] = w @ zt
        else:
            a = x.T @ d
            q, rr = torch.linalg.qr(d - x @ a)
            block = torch.cat([torch.cat([a, -rr.T], 1), torch.cat([rr, torch.zeros_like(rr)], 1)], 0)
            mn = torch.linalg.matrix_exp(block)[:, : x.shape[1]]
            new[key] = torch.cat([x, q], 1) @ mn
    new_s = s * (1 - lr * weight_decay) + adam("S", gs)
    return new["U"], new_s, new["V"]


def _storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, k, r) as the contiguous tensor that holds it ((N, r, k) for r-major storage)."""
    return t if t.is_contiguous() else t.mT


class StelLA(LoRAOptimizer):
    """StelLA: Riemannian Adam on the Stiefel factors U, V and AdamW on S.

    Args:
        groups: ``[{"triples": [(U, S, V), ...], "lr": ...}, ...]``; a group may carry
            ``hidden_size`` (c of ``grad_scaling=True``).
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        weight_decay: decoupled weight decay on S only (U, V are orthonormal).
        metric: Riemannian gradient: ``"canonical"`` (authors', ``g - X g^T X``) or
            ``"euclidean"`` (``g - X sym(X^T g)``).
        grad_scaling: ``True`` (authors' default: divide the step by ``sqrt(rows / c)``, c the
            model's hidden size), ``False``, or the number ``c``.
        retraction: ``"polar"`` (authors' default) or ``"exp_map"``.
    """

    group_key = "triples"

    group_facts = ("hidden_size",)  # the text encoder's width, for grad_scaling

    def __init__(
        self,
        groups,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        metric: str = "canonical",
        grad_scaling: bool | float = True,
        retraction: str = "polar",
    ) -> None:
        check_lr(lr)
        betas = check_betas(betas)
        check_positive("eps", eps)
        check_positive("weight_decay", weight_decay)
        check_choice("metric", metric, METRICS)
        check_choice("retraction", retraction, RETRACTIONS)
        if not isinstance(grad_scaling, bool):
            check_positive("grad_scaling", grad_scaling, allow_zero=False)
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "metric": metric, "grad_scaling": grad_scaling, "retraction": retraction,
        }  # fmt: skip
        super().__init__(groups, defaults)
        for group in self.param_groups:  # per-group overrides fail now, not at the first step
            check_choice("metric", group["metric"], METRICS)
            check_choice("retraction", group["retraction"], RETRACTIONS)
            self._scaling_c(group)

    @staticmethod
    def _scaling_c(group: dict[str, Any]) -> float | None:
        scaling = group["grad_scaling"]
        if scaling is False:
            return None
        c = group.get("hidden_size", DEFAULT_HIDDEN_SIZE) if scaling is True else scaling
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
            raise HyperParameterError("grad_scaling", f"Invalid hidden_size for grad_scaling: {c!r}")
        return float(c)

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        # U and V are updated independently of each other given their gradients, so they are
        # batched by their own shape (and retraction) across triples, buckets and groups (V of every
        # n x 768 layer together, ...)
        directions = DirectionBatch()
        factors = defaultdict(list)
        for group, triples in buckets:
            self._step_s(group, triples)
            for triple in triples:
                st = self.state[triple[0]]
                for name, x in (("U", triple[0]), ("V", triple[2])):
                    factors[(tuple(x.shape), x.dtype, x.device, group["retraction"])].append((x, name, group, st))
        # 1. X, the Riemannian gradients and Adam on them (one fused pass for everything) writes
        # D into a zero buffer; X is (k, rows, r) in the storage of rows_layout, which D, the
        # Adam moments and the products follow (no transposing copies from rank 8 on)
        stiefel = []
        for entries in factors.values():
            xs = [e[0] for e in entries]
            sdt, dev = compute_dtype(xs[0].dtype), xs[0].device
            x = rows_layout(torch.stack(xs).to(sdt))
            g = torch.stack([grad_or_zeros(x, sdt) for x in xs])
            h = x.mT @ g  # X^T g
            canonical = [e[2]["metric"] == "canonical" for e in entries]
            if all(canonical):
                hh = h.mT  # g - X g^T X
            elif not any(canonical):
                hh = sym(h)  # g - X sym(X^T g)
            else:  # groups with different metrics in one shape bucket
                pick = torch.tensor(canonical, device=dev)[:, None, None]
                hh = torch.where(pick, h.mT, sym(h))
            rg = rows_matmul(x, hh, rows_layout(g), alpha=-1.0)
            del g, h, hh
            d = torch.zeros_like(x)
            stored = _storage(d)  # contiguous, for the fused Adam kernel
            outs, grads = stored.unbind(0), _storage(rg).unbind(0)
            by_group: dict[int, list[int]] = defaultdict(list)
            for i, e in enumerate(entries):
                by_group[id(e[2])].append(i)
            shape, m = tuple(stored.shape[1:]), x.shape[1]
            for idx in by_group.values():
                sts = [(entries[i][3], entries[i][1]) for i in idx]
                directions.add(
                    entries[idx[0]][2], [outs[i] for i in idx], [grads[i] for i in idx],
                    [state_tensor(st, f"exp_avg_{name}", shape, sdt, dev) for st, name in sts],
                    [state_tensor(st, f"exp_avg_sq_{name}", shape, sdt, dev) for st, name in sts],
                    [st["step"] for st, _ in sts],
                )  # fmt: skip
            # the step size per factor: lr / sqrt(rows / c) with gradient scaling
            steps = []
            for _, _, group, _ in entries:
                c = self._scaling_c(group)
                steps.append(group["lr"] / math.sqrt(m / c) if c is not None and m != c else group["lr"])
            stiefel.append((xs, x, d, per_pair(steps, d, 3), entries[0][2]["retraction"]))
        directions.run()
        # 2. Y = X + P_X(eta D) = eta D + X (I - eta sym(X^T D)) (two products of the rows-long
        # operands), then the retraction: polar X <- Y (Y^T Y)^-1/2, the inverse square roots of
        # every shape at once
        polar_jobs, grams = [], []
        for xs, x, d, eta, retraction in stiefel:
            eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
            if isinstance(eta, float):
                y = rows_matmul(x, eye - eta * sym(x.mT @ d), d, beta=eta)
            else:  # groups with different step sizes in one shape bucket
                y = rows_matmul(x, eye - eta * sym(x.mT @ d), eta * d)
            del d
            if retraction == "exp_map":
                torch._foreach_copy_(xs, list(stiefel_exp(x, y - x).to(xs[0].dtype).unbind(0)))
                continue
            polar_jobs.append((xs, y))
            grams.append((sym(y.mT @ y),))
        inverses = concat_call(lambda g: (inverse_sqrt(g, 0.0),), grams)
        for (xs, y), (w,) in zip(polar_jobs, inverses):
            torch._foreach_copy_(xs, list(rows_matmul(y, w).to(xs[0].dtype).unbind(0)))

    def _step_s(self, group: dict[str, Any], triples: list[tuple[torch.Tensor, ...]]) -> None:
        """S: torch's AdamW step (fused kernel on CPU; float32 copies of low-precision S, whose
        moments are float32); it also advances the triples' step counters."""
        states = [self.state[u] for u, _, _ in triples]
        s_list = [s for _, s, _ in triples]
        sdt, dev = compute_dtype(s_list[0].dtype), s_list[0].device
        shape = tuple(s_list[0].shape)
        beta1, beta2 = group["betas"]
        params = s_list if s_list[0].dtype == sdt else [s.to(sdt) for s in s_list]
        adamw_update(
            params, [grad_or_zeros(s, sdt) for s in s_list],
            [state_tensor(st, "exp_avg_S", shape, sdt, dev) for st in states],
            [state_tensor(st, "exp_avg_sq_S", shape, sdt, dev) for st in states],
            step_counters(states),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], fused=dev.type == "cpu",
        )  # fmt: skip
        if params is not s_list:
            torch._foreach_copy_(s_list, params)


SPECS = [
    OptimizerSpec(
        name="stella",
        cls=StelLA,
        paper="Li, Sajadmanesh, Li & Lyu, arXiv 2510.01938, 2025 (StelLA)",
        memory="2(m+n+r)r (Adam moments on U, S, V)",
        reconstructed=False,
        factorization="usv",
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
]
