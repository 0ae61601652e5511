"""AdamS (Adam-Sylvester): Adam directions lifted horizontally onto the LoRA factors.

Paper: "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", Jinyang Zheng and
Tong Wu, ICLR 2026, https://openreview.net/forum?id=Guo2XGgxZA. Reference code (Gitee,
sanjin998/lora_s) was not reachable: reconstructed from the paper's description.

``adams`` (low memory, state 2(m+n)r)::

    DA = -mA^ / (sqrt(vA^) + eps),  DB = -mB^ / (sqrt(vB^) + eps)     (Adam on G_A, G_B)
    Xd = DB A + B DA                                                  (never formed: Xd A^T, B^T Xd)
    (Bd, Ad) = lift(B, A, Xd);  B += lr Bd;  A += lr Ad

``adams-full`` (state 2mn, needs the full gradient G = dL/dW)::

    Xd = -m^ / (sqrt(v^) + eps)   (Adam moments on G);   lift;   step

No weight decay: the Sylvester matrix K of the lift acts as a data-dependent decay (for
``Xd = -lam B A`` it is ``-lam/2 I``, ordinary weight decay), so these optimizers reject a non-zero
``weight_decay``. ``adams`` is invariant only under signed permutations of the rank dimension
(element-wise Adam is not gauge-equivariant); ``adams-full`` is gauge-invariant.
"""

from __future__ import annotations

from typing import Any

import torch

from mixofshow.optim.base import LoRAOptimizer, check_betas, check_lr, check_no_weight_decay, check_positive
from mixofshow.optim.batching import compute_dtype, concat_call
from mixofshow.optim.bucketed import (
    DirectionBatch,
    adam_directions_,
    apply_,
    grad_or_zeros,
    next_steps,
    state_tensor,
)
from mixofshow.optim.lift import horizontal_lift, horizontal_lift_reference, lift_core, lift_products
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "AdamS",
    "AdamSFull",
    "adams_grams",
    "adams_maps",
    "adams_full_update",
    "adams_reference",
    "SPECS",
]


# ----------------------------------------------------------------------------- the math


def adams_grams(ad: torch.Tensor, bd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The r x 2r products of one bucket, from ``[A; DA]`` (k, 2r, n) and ``[B^T; DB^T]`` (k, 2r, m).

    Returns ``[S_A; DA A^T]`` (k, 2r, r) and ``[S_B, B^T DB]`` (k, r, 2r): with :func:`adams_maps`
    they give the whole step as two more products (``Xd = DB A + B DA`` is never formed, nor
    ``Xd A^T`` and ``B^T Xd``).
    """
    r = ad.shape[1] // 2
    return ad @ ad[:, :r].mT, bd[:, :r] @ bd.mT


def adams_maps(
    ga: torch.Tensor, gb: torch.Tensor, damping: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lift of ``Xd = DB A + B DA`` as two r x 2r maps ``N1``, ``N2`` (batched, any buckets):
    ``Bd^T = N1 [B^T; DB^T]`` and ``Ad = N2 [A; DA]``.

    With ``S_A, Q = DA A^T`` (from ``ga``) and ``S_B, P = B^T DB`` (from ``gb``):
    ``Xd A^T = DB S_A + B Q^T``, ``B^T Xd = P A + S_B DA``, ``C = B^T Xd A^T = P S_A + S_B Q``, so
    ``Bd^T = S_A^-T (Xd A^T)^T - L^T B^T = [S_A^-T Q^T - L^T, S_A^-T S_A] [B^T; DB^T]`` and
    ``Ad = S_B^-1 B^T Xd - R A = [S_B^-1 P - R, S_B^-1 S_B] [A; DA]``.
    """
    r = gb.shape[1]
    s_a, q = ga[:, :r], ga[:, r:]
    s_b, p = gb[..., :r], gb[..., r:]
    s_a_inv, left, s_b_inv, right = lift_core(s_b, s_a, p @ s_a + s_b @ q, damping)
    n1 = torch.cat([s_a_inv.mT @ q.mT - left.mT, s_a_inv.mT @ s_a], -1)
    n2 = torch.cat([s_b_inv @ p - right, s_b_inv @ s_b], -1)
    return n1, n2


def adams_full_update(a_list, b_list, g_list, m, v, steps, *, lr, beta1, beta2, eps, damping) -> None:
    """One ``adams-full`` step for a shape bucket: Adam on the full gradients, lift, step.

    ``steps``: the pairs' step counters (CPU scalar tensors, already incremented).
    """
    dt = compute_dtype(a_list[0].dtype)
    xd = torch.zeros(len(a_list), *g_list[0].shape, dtype=dt, device=a_list[0].device)
    adam_directions_(list(xd.unbind(0)), g_list, m, v, steps, beta1=beta1, beta2=beta2, eps=eps)
    a, b = torch.stack(a_list).to(dt), torch.stack(b_list).to(dt)
    xa, bx = lift_products(b, a, xd)
    bd, ad = horizontal_lift(b, a, xa, bx, damping=damping)
    apply_(b_list, bd, lr)
    apply_(a_list, ad, lr)


def adams_reference(a, b, ga, gb, state, *, lr, beta1, beta2, eps, damping, full_grad=None):
    """Plain one-pair AdamS step (forms Xd, Kronecker Sylvester solve); returns new ``(A, B)``.

    ``state`` is a dict updated in place (``t``, ``m``/``v`` lists). With ``full_grad`` given the
    moments are on it (``adams-full``); otherwise on ``(ga, gb)`` (``adams``).
    """
    t = state["t"] = state.get("t", 0) + 1
    grads = [full_grad] if full_grad is not None else [ga, gb]
    state.setdefault("m", [torch.zeros_like(g) for g in grads])
    state.setdefault("v", [torch.zeros_like(g) for g in grads])
    dirs = []
    for g, m, v in zip(grads, state["m"], state["v"]):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        dirs.append(-(m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps))
    xd = dirs[0] if full_grad is not None else dirs[1] @ a + b @ dirs[0]
    bd, ad, _ = horizontal_lift_reference(b, a, xd, damping)
    return a + lr * ad, b + lr * bd


# ----------------------------------------------------------------------------- the optimizers


class AdamS(LoRAOptimizer):
    """AdamS (LoRA-S): Adam factor directions, lifted horizontally through the Sylvester equation.

    Args:
        groups: ``[{"pairs": [(A, B), ...], "lr": ..., "scale": ...}, ...]``.
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        damping: relative damping of the r x r Grams in the lift (``S + damping tr(S)/r I``).
        weight_decay: must be 0; the Sylvester matrix K replaces weight decay.
    """

    full: bool = False

    def __init__(
        self,
        groups,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        damping: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        betas = check_betas(betas)
        check_positive("eps", eps)
        check_positive("damping", damping)
        check_no_weight_decay(weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "damping": damping}
        super().__init__(groups, defaults)

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        if self.full:
            super()._step_buckets(buckets)
            return
        # 1. Adam directions DA, DB of every factor: one fused pass for all buckets
        directions = DirectionBatch()
        prepared = []
        for group, pairs in buckets:
            a_list = [a for a, _ in pairs]
            b_list = [b for _, b in pairs]
            states = [self.state[a] for a in a_list]
            a0, b0 = pairs[0]
            sdt, dev = compute_dtype(a0.dtype), a0.device
            next_steps(states)
            da = torch.zeros(len(pairs), *a0.shape, dtype=sdt, device=dev)
            db = torch.zeros(len(pairs), *b0.shape, dtype=sdt, device=dev)
            moments = {
                f"{key}_{name}": [state_tensor(s, f"{key}_{name}", tuple(x.shape), sdt, dev) for s in states]
                for key in ("exp_avg", "exp_avg_sq")
                for name, x in (("A", a0), ("B", b0))
            }
            directions.add(
                group,
                [*da.unbind(0), *db.unbind(0)],
                [grad_or_zeros(a, sdt) for a in a_list] + [grad_or_zeros(b, sdt) for b in b_list],
                moments["exp_avg_A"] + moments["exp_avg_B"],
                moments["exp_avg_sq_A"] + moments["exp_avg_sq_B"],
                [s["step"] for s in states] * 2,
            )
            prepared.append((group, a_list, b_list, da, db))
        directions.run()
        # 2. per bucket [A; DA], [B^T; DB^T] (r-major) and their Grams; 3. the lift of all buckets
        stacked = []
        for _, a_list, b_list, da, db in prepared:
            ad = torch.cat([torch.stack(a_list).to(da.dtype), da], 1)
            bd = torch.cat([torch.stack(b_list).to(db.dtype).mT, db.mT], 1)
            stacked.append((ad, bd))
        maps = concat_call(
            adams_maps, [adams_grams(ad, bd) for ad, bd in stacked], [p[0]["damping"] for p in prepared]
        )
        # 4. the steps, two products per bucket
        for (group, a_list, b_list, _, _), (ad, bd), (n1, n2) in zip(prepared, stacked, maps):
            apply_(b_list, (n1 @ bd).mT, group["lr"])
            apply_(a_list, n2 @ ad, group["lr"])

    def _step_bucket(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]]) -> None:
        # adams-full: Adam moments on the full gradient, one bucket at a time
        beta1, beta2 = group["betas"]
        a_list = [a for a, _ in pairs]
        b_list = [b for _, b in pairs]
        states = [self.state[a] for a in a_list]
        a0, b0 = pairs[0]
        sdt, dev = compute_dtype(a0.dtype), a0.device
        shape = (b0.shape[0], a0.shape[1])
        grads = [self.full_grad(a, shape).to(sdt) for a in a_list]
        m = [state_tensor(s, "exp_avg", shape, sdt, dev) for s in states]
        v = [state_tensor(s, "exp_avg_sq", shape, sdt, dev) for s in states]
        next_steps(states)
        adams_full_update(
            a_list, b_list, grads, m, v, [s["step"] for s in states],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], damping=group["damping"],
        )  # fmt: skip


class AdamSFull(AdamS):
    """``adams-full``: Adam moments on the full m x n gradient (state 2mn), then the lift."""

    full = True
    needs_full_grad = True


SPECS = [
    OptimizerSpec(
        name="adams",
        cls=AdamS,
        paper="Zheng & Wu, ICLR 2026 (LoRA-S, AdamS)",
        memory="2(m+n)r (Adam moments on A, B)",
        reconstructed=True,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
    OptimizerSpec(
        name="adams-full",
        cls=AdamSFull,
        paper="Zheng & Wu, ICLR 2026 (LoRA-S, AdamS on the full gradient)",
        memory="2mn (Adam moments on the full gradient G)",
        reconstructed=True,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
]
