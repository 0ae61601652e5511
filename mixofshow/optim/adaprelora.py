"""AdaPreLoRA: Adafactor-preconditioned LoRA with a closed-form factor-space solve.

Paper: "AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation", Ziyun Liu, Fengmiao Bian,
Jian-Feng Cai, https://arxiv.org/abs/2605.08734. No public code; reconstructed from the paper's
description (see ``docs/optimizers.md``, AdaPreLoRA).

Adafactor statistics of ``G = dL/dW`` (only its row/column energies are read, which the LoRA
layer's hook can compute without keeping G: ``mixofshow/optim/full_grad.py``)
with ``b2_t = 1 - t^-0.8``, a weight-space preconditioner ``H(Y) = P Y Q`` and, among the factor
updates reproducing a W direction, the one of least H-weighted imbalance::

    R <- b2_t R + (1 - b2_t) rowsum(G^2 + eps),   Cc <- b2_t Cc + (1 - b2_t) colsum(G^2 + eps)
    P = diag(sqrt(R)),   Q = diag(sqrt(Cc)) / sqrt(sum R)          (H^-1 G = Adafactor direction)
    MA, MB = bias-corrected EMA_beta1 of G_A = s B^T G, G_B = s G A^T   (the "AdamW" variant)
    K_B = B^T P B,   K_A = A Q A^T
    dA = K_B^-1 MA [Q^-1 - 1/2 A^T K_A^-1 A]
    dB = [P^-1 MB - 1/2 B K_B^-1 B^T MB] K_A^-1
    A <- A - lr (dA / s^2 + wd A),   B <- B - lr (dB / s^2 + wd B)

Because MA, MB carry the factor s of the autograd gradients, the 1/s^2 makes ``W = W0 + s B A``
move by lr times the H-orthogonal projection of ``H^-1 G`` onto ``{B X + Y A}`` (for beta1 = 0).
The r x r solves are damped (``K + damping tr(K)/r I``) and run in float32 (LU, no host sync).
"""

from __future__ import annotations

from typing import Any

import torch

from mixofshow.optim.base import HyperParameterError, LoRAOptimizer, check_beta, check_lr, check_positive
from mixofshow.optim.batching import compute_dtype
from mixofshow.optim.bucketed import (
    apply_,
    grad_or_zeros,
    next_steps,
    per_pair,
    state_tensor,
)
from mixofshow.optim.lift import damp
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "AdaPreLoRA",
    "adafactor_scales",
    "adaprelora_direction",
    "adaprelora_direction_reference",
    "adaprelora_update",
    "SPECS",
]


def adafactor_scales(row_energy, col_energy, row, col, weight, eps):
    """New Adafactor energies ``(R, Cc)`` and the diagonals ``(p, q)`` of ``P``, ``Q`` (batched).

    ``row_energy = rowsum(G^2)`` (k, m), ``col_energy = colsum(G^2)`` (k, n): the sums of
    ``G^2 + eps`` are these plus ``n eps`` and ``m eps``. ``weight = 1 - b2_t = t^decay_rate``
    (a float, or a (k, 1) tensor when steps differ).
    """
    m, n = row_energy.shape[-1], col_energy.shape[-1]
    row = torch.lerp(row, row_energy + n * eps, weight)
    col = torch.lerp(col, col_energy + m * eps, weight)
    p = row.sqrt()
    q = col.sqrt() * row.sum(-1, keepdim=True).rsqrt()
    return row, col, p, q


def _solve(k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # LU solve without the error check (which would sync the host); k is damped SPD
    return torch.linalg.solve_ex(k, x)[0]


def adaprelora_direction(b, a, ma, mb, p, q, damping: float = 0.0):
    """Batched closed-form factor directions ``(dA, dB)``; pure function.

    Args:
        b: B (k, m, r); a: A (k, r, n).
        ma: stands for ``B^T G`` (k, r, n); mb: for ``G A^T`` (k, m, r).
        p: diagonal of P (k, m); q: diagonal of Q (k, n); both positive.
        damping: relative damping of ``K_B``, ``K_A``.
    """
    dt = compute_dtype(b.dtype)
    b, a, ma, mb, p, q = (t.to(dt) for t in (b, a, ma, mb, p, q))
    bt, at = b.transpose(-1, -2), a.transpose(-1, -2)
    k_b = damp(bt @ (p[..., :, None] * b), damping)
    k_a = damp((a * q[..., None, :]) @ at, damping)
    y = _solve(k_b, ma)  # K_B^-1 B^T G
    y_ka = _solve(k_a, (y @ at).transpose(-1, -2)).transpose(-1, -2)  # K_B^-1 B^T G A^T K_A^-1
    da = y / q[..., None, :] - 0.5 * (y_ka @ a)
    inner = mb / p[..., :, None] - 0.5 * (b @ _solve(k_b, bt @ mb))
    db = _solve(k_a, inner.transpose(-1, -2)).transpose(-1, -2)
    return da, db


def adaprelora_direction_reference(b, a, g, p, q, damping: float = 0.0):
    """Plain one-pair ``(dA, dB)`` from a full ``G`` with explicit P, Q and inverses (tests only)."""
    dt = compute_dtype(b.dtype)
    b, a, g, p, q = (t.to(dt) for t in (b, a, g, p, q))
    big_p, big_q = torch.diag(p), torch.diag(q)
    k_b_inv = torch.linalg.inv(damp(b.T @ big_p @ b, damping))
    k_a_inv = torch.linalg.inv(damp(a @ big_q @ a.T, damping))
    da = k_b_inv @ (b.T @ g) @ (torch.diag(1 / q) - 0.5 * a.T @ k_a_inv @ a)
    db = (torch.diag(1 / p) @ g @ a.T - 0.5 * b @ k_b_inv @ b.T @ g @ a.T) @ k_a_inv
    return da, db


def adaprelora_update(
    a_list, b_list, ga, gb, energies, row, col, ma, mb, steps,
    *, lr, beta1, eps, decay_rate, damping, weight_decay, scale,
) -> None:  # fmt: skip
    """One AdaPreLoRA step for a shape bucket; updates state lists and factors in place.

    ``energies``: per pair ``(rowsum(G^2), colsum(G^2))`` of its full gradient."""
    dt = compute_dtype(a_list[0].dtype)
    row_e = torch.stack([e[0] for e in energies]).to(dt)
    col_e = torch.stack([e[1] for e in energies]).to(dt)
    weight = per_pair([float(t) ** decay_rate for t in steps], row_e, 2)
    new_row, new_col, p, q = adafactor_scales(row_e, col_e, torch.stack(row), torch.stack(col), weight, eps)
    torch._foreach_copy_(row, list(new_row.unbind(0)))
    torch._foreach_copy_(col, list(new_col.unbind(0)))
    torch._foreach_lerp_(ma + mb, ga + gb, 1.0 - beta1)
    bc = per_pair([1.0 - beta1**t for t in steps], p, 3)
    a, b = torch.stack(a_list).to(dt), torch.stack(b_list).to(dt)
    da, db = adaprelora_direction(b, a, torch.stack(ma) / bc, torch.stack(mb) / bc, p, q, damping)
    if weight_decay != 0.0:
        torch._foreach_mul_(a_list + b_list, 1.0 - lr * weight_decay)
    apply_(a_list, da, -lr / scale**2)
    apply_(b_list, db, -lr / scale**2)


class AdaPreLoRA(LoRAOptimizer):
    """AdaPreLoRA: Adafactor's Kronecker-diagonal preconditioner mapped to the factors in closed form.

    Args:
        groups: ``[{"pairs": [(A, B), ...], "lr": ..., "scale": s}, ...]``; each layer must record
            its full gradient (only its row/column energies are used).
        lr: learning rate.
        beta1: momentum of the factor gradients (0 disables it).
        eps: Adafactor's eps1, added to ``G^2``.
        decay_rate: Adafactor's exponent, ``b2_t = 1 - t^decay_rate``.
        damping: relative damping of the r x r matrices ``K_B``, ``K_A``.
        weight_decay: decoupled weight decay on both factors.
    """

    needs_full_grad = True
    full_grad_energies_only = True

    def __init__(
        self,
        groups,
        lr: float = 1e-4,
        beta1: float = 0.9,
        eps: float = 1e-30,
        decay_rate: float = -0.8,
        damping: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        check_beta("beta1", beta1)
        check_positive("eps", eps, allow_zero=False)
        if isinstance(decay_rate, bool) or not isinstance(decay_rate, (int, float)) or not decay_rate < 0.0:
            raise HyperParameterError("decay_rate", f"Invalid decay_rate: {decay_rate} (expected < 0)")
        check_positive("damping", damping)
        check_positive("weight_decay", weight_decay)
        defaults = {
            "lr": lr, "beta1": beta1, "eps": eps, "decay_rate": decay_rate,
            "damping": damping, "weight_decay": weight_decay,
        }  # fmt: skip
        super().__init__(groups, defaults)

    def _step_bucket(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]]) -> None:
        a_list = [a for a, _ in pairs]
        b_list = [b for _, b in pairs]
        states = [self.state[a] for a in a_list]
        a0, b0 = pairs[0]
        m, n = b0.shape[0], a0.shape[1]
        sdt, dev = compute_dtype(a0.dtype), a0.device
        energies = [self.full_grad_energies(a, (m, n)) for a in a_list]
        ga = [grad_or_zeros(a, sdt) for a in a_list]
        gb = [grad_or_zeros(b, sdt) for b in b_list]
        row = [state_tensor(s, "row", (m,), sdt, dev) for s in states]
        col = [state_tensor(s, "col", (n,), sdt, dev) for s in states]
        ma = [state_tensor(s, "exp_avg_A", tuple(a0.shape), sdt, dev) for s in states]
        mb = [state_tensor(s, "exp_avg_B", tuple(b0.shape), sdt, dev) for s in states]
        hp = {k: group[k] for k in ("lr", "beta1", "eps", "decay_rate", "damping", "weight_decay")}
        adaprelora_update(
            a_list, b_list, ga, gb, energies, row, col, ma, mb, next_steps(states), scale=group["scale"], **hp
        )


SPECS = [
    OptimizerSpec(
        name="adaprelora",
        cls=AdaPreLoRA,
        paper="Liu, Bian & Cai, arXiv 2605.08734 (AdaPreLoRA)",
        memory="(m+n)(r+1) (row/column energies of G, momentum on A, B)",
        reconstructed=True,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
]
