"""StelLA: LoRA as ``U S V^T`` with U and V kept on the Stiefel manifold.

Paper: "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel Manifold", Zhizhong Li,
Sina Sajadmanesh, Jingtao Li, Lingjuan Lyu, 2025, https://arxiv.org/abs/2510.01938.
Reference code: https://github.com/SonyResearch/stella (PEFT tuner with pre/post optimizer-step
hooks around a Euclidean optimizer); this is an independent optimizer-side implementation.

Triples ``(U m x r, S r x r, V n x r)``, ``dW = s U S V^T``. Per step, for X in {U, V}::

    g <- g - X sym(X^T g)                        (Riemannian gradient, embedded metric)
    D  = -lr m^ / (sqrt(v^) + eps)               (Adam on the Riemannian gradient; no weight decay)
    D <- D - X sym(X^T D);   X <- polar(X + D)   (tangent projection, polar retraction)

and ``S`` takes a plain AdamW step (torch's kernel; decoupled ``weight_decay`` applies to S
only). U and V are batched by their own shape across layers and groups; their Adam moments are
kept transposed (r x m, r x n), in the layout of the batched algebra. The polar factor comes from
the eigendecomposition of the r x r Gram ``Y^T Y`` (see :func:`polar`), in float32 (float64 for
float64 factors). Needs ``LoRALinear(factorization="usv")``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from mixofshow.optim.adamw import adamw_update
from mixofshow.optim.base import check_beta, check_positive
from mixofshow.optim.batching import compute_dtype, concat_call, inverse_sqrt, sym
from mixofshow.optim.bucketed import (
    BucketedLoRAOptimizer,
    DirectionBatch,
    grad_or_zeros,
    per_pair,
    state_tensor,
    step_counters,
)
from mixofshow.optim.registry import OptimizerSpec

__all__ = ["StelLA", "stiefel_project", "stiefel_project_t", "polar", "stella_reference", "SPECS"]


def stiefel_project(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Tangent projection ``d - x sym(x^T d)`` at ``x`` on the Stiefel manifold (batched)."""
    return stiefel_project_t(x.mT, d.mT).mT


def stiefel_project_t(xt: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """:func:`stiefel_project` in the r-major layout: ``x^T`` and ``d^T`` (k, r, m) in, the
    projection's transpose out (``(r x r) @ (r x m)`` products, the fast ones on CPU)."""
    return dt - sym(xt @ dt.mT) @ xt


def polar(y: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``y (y^T y)^-1/2`` (= ``W Zt`` of the thin SVD ``y = W Sigma Zt``).

    Batched, through the eigendecomposition of the r x r Gram instead of an SVD of the m x r
    matrix (several times faster on CPU). Forming ``y^T y`` squares y's condition number, which
    is harmless for the retraction: there ``y = X + D`` with ``X^T D`` skew, so
    ``y^T y = I + D^T D`` has every eigenvalue >= 1. ``y`` must have full column rank.
    """
    return y @ inverse_sqrt(sym(y.mT @ y), 0.0)


def stella_reference(u, s, v, gu, gs, gv, state, *, lr, beta1, beta2, eps, weight_decay):
    """Plain one-triple StelLA step; returns new ``(U, S, V)`` (``state`` dict updated in place)."""
    t = state["t"] = state.get("t", 0) + 1

    def adam(key, g):
        mm = state[key + "m"] = beta1 * state.get(key + "m", torch.zeros_like(g)) + (1 - beta1) * g
        vm = state[key + "v"] = beta2 * state.get(key + "v", torch.zeros_like(g)) + (1 - beta2) * g * g
        return -lr * (mm / (1 - beta1**t)) / ((vm / (1 - beta2**t)).sqrt() + eps)

    def tangent(x, d):
        return d - x @ (x.T @ d + d.T @ x) / 2

    new = {}
    for key, x, g in (("U", u, gu), ("V", v, gv)):
        y = x + tangent(x, adam(key, tangent(x, g)))
        w, _, zt = torch.linalg.svd(y, full_matrices=False)
        new[key] = w @ zt
    new_s = s * (1 - lr * weight_decay) + adam("S", gs)
    return new["U"], new_s, new["V"]


class StelLA(BucketedLoRAOptimizer):
    """StelLA: Riemannian Adam on the Stiefel factors U, V and AdamW on S.

    Args:
        groups: ``[{"triples": [(U, S, V), ...], "lr": ...}, ...]``.
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        weight_decay: decoupled weight decay on S only (U, V are orthonormal).
    """

    group_key = "triples"

    def __init__(
        self,
        groups,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        check_positive("lr", lr)
        check_beta("beta1", betas[0])
        check_beta("beta2", betas[1])
        check_positive("eps", eps)
        check_positive("weight_decay", weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(groups, defaults)

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        # U and V are updated independently of each other given their gradients, so they are
        # batched by their own shape across triples, buckets and groups (V of every n x 768 layer
        # together, ...), all in the r-major layout (X^T: (k, r, m); their Adam moments too), where
        # every batched product is (r x r) @ (r x m) or (r x m) @ (m x r).
        directions = DirectionBatch()
        factors = defaultdict(list)
        for group, triples in buckets:
            states = [self.state[u] for u, _, _ in triples]
            s_list = [s for _, s, _ in triples]
            sdt, dev = compute_dtype(s_list[0].dtype), s_list[0].device
            shape = tuple(s_list[0].shape)
            beta1, beta2 = group["betas"]
            # S: torch's AdamW step (fused kernel on CPU; float32 copies of low-precision S, whose
            # moments are float32); it also advances the triples' step counters
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
            for triple, st in zip(triples, states):
                for name, x in (("U", triple[0]), ("V", triple[2])):
                    factors[(tuple(x.shape), x.dtype, x.device)].append((x, name, group, st))
        # 1. Z = [X^T; D^T] (k, 2r, m): X^T now, Riemannian gradients g - X sym(X^T g), and Adam on
        # them (one fused pass for everything) writes D^T into Z's lower half
        stiefel = []
        for entries in factors.values():
            xs = [e[0] for e in entries]
            sdt, dev = compute_dtype(xs[0].dtype), xs[0].device
            (m, r), k = xs[0].shape, len(xs)
            z = torch.zeros(k, 2 * r, m, dtype=sdt, device=dev)
            xt = z[:, :r]
            xt.copy_(torch.stack(xs).mT)
            gt = torch.stack([grad_or_zeros(x, sdt) for x in xs]).mT.contiguous()  # r-major, like rgt
            rgt = stiefel_project_t(xt, gt)
            outs, grads = z[:, r:].unbind(0), rgt.unbind(0)
            by_group: dict[int, list[int]] = defaultdict(list)
            for i, e in enumerate(entries):
                by_group[id(e[2])].append(i)
            for idx in by_group.values():
                sts = [(entries[i][3], entries[i][1]) for i in idx]
                directions.add(
                    entries[idx[0]][2], [outs[i] for i in idx], [grads[i] for i in idx],
                    [state_tensor(st, f"exp_avg_{name}", (r, m), sdt, dev) for st, name in sts],
                    [state_tensor(st, f"exp_avg_sq_{name}", (r, m), sdt, dev) for st, name in sts],
                    [st["step"] for st, _ in sts],
                )  # fmt: skip
            stiefel.append((xs, z, per_pair([e[2]["lr"] for e in entries], z, 3)))
        directions.run()
        # 2. Y = X + P_X(lr D), i.e. Y^T = T Z with T = [I - lr sym(X^T D), lr I]; its Gram is
        # T (Z Z^T) T^T, so the retraction X <- Y (Y^T Y)^-1/2 is X^T <- (Y^T Y)^-1/2 T Z: two
        # products of Z per shape, the rest r x r (the inverse square roots of all shapes at once)
        maps, grams = [], []
        for _, z, lr in stiefel:
            r = z.shape[1] // 2
            h = sym(z @ z.mT)
            eye = torch.eye(r, dtype=z.dtype, device=z.device).expand(z.shape[0], r, r)
            t = torch.cat([eye - lr * sym(h[:, :r, r:]), lr * eye], -1)
            maps.append(t)
            grams.append((sym(t @ h @ t.mT),))
        inverses = concat_call(lambda g: (inverse_sqrt(g, 0.0),), grams)
        for (xs, z, _), t, (w,) in zip(stiefel, maps, inverses):
            torch._foreach_copy_(xs, list(((w @ t) @ z).mT.to(xs[0].dtype).contiguous().unbind(0)))


SPECS = [
    OptimizerSpec(
        name="stella",
        cls=StelLA,
        paper="Li, Sajadmanesh, Li & Lyu, arXiv 2510.01938, 2025 (StelLA)",
        memory="2(m+n+r)r (Adam moments on U, S, V)",
        reconstructed=False,
        defaults={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
        factorization="usv",
    ),
]
