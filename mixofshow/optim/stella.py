"""StelLA: LoRA as ``U S V^T`` with U and V kept on the Stiefel manifold.

Paper: "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel Manifold", Zhizhong Li,
Sina Sajadmanesh, Jingtao Li, Lingjuan Lyu, 2025, https://arxiv.org/abs/2510.01938.
Reference code: https://github.com/SonyResearch/stella (PEFT tuner with pre/post optimizer-step
hooks around a Euclidean optimizer); this is an independent optimizer-side implementation.

Triples ``(U m x r, S r x r, V n x r)``, ``dW = s U S V^T``. Per step, for X in {U, V}::

    g <- g - X sym(X^T g)                        (Riemannian gradient, embedded metric)
    D  = -lr m^ / (sqrt(v^) + eps)               (Adam on the Riemannian gradient; no weight decay)
    D <- D - X sym(X^T D);   X <- polar(X + D)   (tangent projection, polar retraction via thin SVD)

and ``S`` takes a plain AdamW step (decoupled ``weight_decay`` applies to S only). The SVD runs in
float32 (float64 for float64 factors). Needs ``LoRALinear(factorization="usv")``.
"""

from __future__ import annotations

from typing import Any

import torch

from mixofshow.optim.adams import (
    BucketedLoRAOptimizer,
    adam_directions,
    apply_,
    grad_or_zeros,
    next_steps,
    state_tensor,
)
from mixofshow.optim.base import check_beta, check_positive
from mixofshow.optim.batching import compute_dtype
from mixofshow.optim.registry import OptimizerSpec

__all__ = ["StelLA", "stiefel_project", "polar", "stella_update", "stella_reference", "SPECS"]


def stiefel_project(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Tangent projection ``d - x sym(x^T d)`` at ``x`` on the Stiefel manifold (batched)."""
    xtd = x.transpose(-1, -2) @ d
    return d - x @ (0.5 * (xtd + xtd.transpose(-1, -2)))


def polar(y: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``W Zt`` of ``y = W Sigma Zt`` (thin SVD, batched)."""
    w, _, zt = torch.linalg.svd(y, full_matrices=False)
    return w @ zt


def stella_update(
    u_list, s_list, v_list, gu, gs, gv, m, v, steps, *, lr, beta1, beta2, eps, weight_decay
) -> None:
    """One StelLA step for a shape bucket. ``m``, ``v``: Adam moments ordered U..., S..., V...."""
    k = len(u_list)
    dt = compute_dtype(u_list[0].dtype)
    u, vv = torch.stack(u_list).to(dt), torch.stack(v_list).to(dt)
    # 1. Riemannian gradients of U and V
    rgu = stiefel_project(u, torch.stack(gu).to(dt))
    rgv = stiefel_project(vv, torch.stack(gv).to(dt))
    # 2. Adam on (rgU, gS, rgV); S gets a plain AdamW step
    grads = list(rgu.to(m[0].dtype).unbind(0)) + list(gs) + list(rgv.to(m[0].dtype).unbind(0))
    dirs = adam_directions(m, v, grads, beta1, beta2, eps, list(steps) * 3)
    if weight_decay != 0.0:
        torch._foreach_mul_(s_list, 1.0 - lr * weight_decay)
    apply_(s_list, torch.stack(dirs[k : 2 * k]), lr)
    # 3. tangent-projected steps, polar retraction
    for xs, x, d in ((u_list, u, dirs[:k]), (v_list, vv, dirs[2 * k :])):
        step = stiefel_project(x, lr * torch.stack(d).to(dt))
        torch._foreach_copy_(xs, list(polar(x + step).to(xs[0].dtype).unbind(0)))


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

    def _step_bucket(self, group: dict[str, Any], triples: list[tuple[torch.Tensor, ...]]) -> None:
        u_list, s_list, v_list = (list(x) for x in zip(*triples))
        states = [self.state[u] for u in u_list]
        sdt, dev = compute_dtype(u_list[0].dtype), u_list[0].device
        m, v = [], []
        for name, xs in (("U", u_list), ("S", s_list), ("V", v_list)):
            shape = tuple(xs[0].shape)
            m += [state_tensor(st, f"exp_avg_{name}", shape, sdt, dev) for st in states]
            v += [state_tensor(st, f"exp_avg_sq_{name}", shape, sdt, dev) for st in states]
        grads = [[grad_or_zeros(x, sdt) for x in xs] for xs in (u_list, s_list, v_list)]
        beta1, beta2 = group["betas"]
        stella_update(
            u_list, s_list, v_list, *grads, m, v, next_steps(states),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        )  # fmt: skip


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
