"""Riemannian preconditioned LoRA: scaled GD and scaled AdamW.

Paper: Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
ICML 2024, https://arxiv.org/abs/2402.02347. Reference code:
https://github.com/pilancilab/Riemannian_Preconditioned_LoRA (``custom_optimizers.py``: ``SGDr``,
``AdamWr``).

Update, per pair with ``W = s B A`` and pre-step factors::

    S_B = s^2 B^T B        S_A = s^2 A A^T        D(S) = S + (reg tr(S) / r + tiny) I
    gA~ = D(S_B)^-1 G_A    gB~ = G_B D(S_A)^-1
    scaled_gd:     X <- X (1 - lr wd) - lr gX~          (X in {A, B})
    scaled_adamw:  AdamW (adamw.py) on gA~, gB~

To first order scaled GD moves ``W`` by ``-lr (P_B G + G P_A)``, whatever the gauge of (B, A).

Differences from the reference code, all deliberate:

- the Gram matrices carry ``s^2``, so the W-space step does not depend on the LoRA scale (the
  reference ignores ``s``; Mix-of-Show has ``s = 1``, where both agree);
- both preconditioners use the pre-step factors (the reference's ``AdamWr`` preconditions B's
  gradient with the already updated A);
- damping relative to the trace (``reg``) instead of a bare inverse with an identity fallback when
  it fails, so zero-initialised B (``S_B = 0``, ``G_A = 0``) needs no special case and no sync;
- ``scaled_adamw`` is torch's AdamW (bias correction on); the reference ``AdamWr`` ran without
  bias correction, betas (0.9, 0.98), eps 1e-6.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mixofshow.optim.adamw import adam_lists, adamw_update, check_adamw_hparams
from mixofshow.optim.base import LoRAOptimizer, check_lr, check_positive
from mixofshow.optim.batching import compute_dtype, stack, tiny
from mixofshow.optim.bucketed import grad_or_zeros
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "ScaledGD",
    "ScaledAdamW",
    "SPECS",
    "damped_inverse",
    "precondition",
    "precondition_reference",
]


def damped_inverse(s: torch.Tensor, reg: float) -> torch.Tensor:
    """``(S + (reg tr(S)/r + tiny) I)^-1`` for a batch of symmetric PSD r x r matrices.

    ``inv_ex`` (LU) rather than Cholesky: it does not fail when rounding makes a damped,
    rank-deficient ``S`` slightly indefinite, and it never synchronises with the host.
    """
    r = s.shape[-1]
    delta = s.diagonal(dim1=-2, dim2=-1).sum(-1) * (reg / r) + tiny(s.dtype)
    eye = torch.eye(r, dtype=s.dtype, device=s.device)
    inv, _ = torch.linalg.inv_ex(s + delta[..., None, None] * eye)
    return inv


def precondition(
    a: torch.Tensor, bt: torch.Tensor, ga: torch.Tensor, gbt: torch.Tensor, scale: float, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched preconditioning in the r-major layout.

    Args:
        a, ga: ``A`` and ``G_A``, shape (batch, r, n).
        bt, gbt: ``B^T`` and ``G_B^T``, shape (batch, r, m).
    Returns:
        ``gA~`` (batch, r, n) and ``gB~^T`` (batch, r, m).
    """
    s2 = scale * scale
    inv_sb = damped_inverse((bt @ bt.mT) * s2, reg)
    inv_sa = damped_inverse((a @ a.mT) * s2, reg)
    return inv_sb @ ga, inv_sa.mT @ gbt


def precondition_reference(
    a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, scale: float, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-pair version of :func:`precondition`: A (r x n), B (m x r) -> (gA~, gB~)."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=a.dtype, device=a.device)

    def damped(s: torch.Tensor) -> torch.Tensor:
        return s + (reg * torch.trace(s) / r + tiny(s.dtype)) * eye

    s_b = scale**2 * b.T @ b
    s_a = scale**2 * a @ a.T
    return torch.linalg.solve(damped(s_b), ga), torch.linalg.solve(damped(s_a), gb.T).T


def scaled_gd_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], *, lr: float, weight_decay: float
) -> None:
    """``X <- X (1 - lr wd) - lr g`` on lists of tensors."""
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, grads, alpha=-lr)


class ScaledGD(LoRAOptimizer):
    """Scaled (Riemannian preconditioned) gradient descent on LoRA pairs.

    Args:
        params: groups ``{"pairs": [(A, B), ...], "scale": s, "lr": ...}``.
        lr: learning rate.
        reg: damping of the r x r Gram matrices, relative to their mean eigenvalue.
        weight_decay: decoupled weight decay on A and B.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        reg: float = 1e-6,
        weight_decay: float = 0.0,
        **extra: Any,
    ) -> None:
        check_lr(lr)
        check_positive("reg", reg)
        check_positive("weight_decay", weight_decay)
        defaults = dict(lr=lr, reg=reg, weight_decay=weight_decay)
        super().__init__(params, {**defaults, **self._extra_defaults(**extra)})

    def _extra_defaults(self, **extra: Any) -> dict[str, Any]:
        """Hyper-parameters of the AdamW variant; none for scaled GD."""
        if extra:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(extra)}")
        return {}

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        by_group: dict[int, tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]] = {}
        for group, pairs in buckets:
            _, params, grads = by_group.setdefault(id(group), (group, [], []))
            self._precondition_bucket(group, pairs, params, grads)
        for group, params, grads in by_group.values():
            self._update(group, params, grads)

    def _precondition_bucket(
        self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]], params: list, grads: list
    ) -> None:
        """Append the bucket's factors and their preconditioned gradients (in the factors' dtype)."""
        a_list = [a for a, _ in pairs]
        b_list = [b for _, b in pairs]
        dtype = a_list[0].dtype
        cdt = compute_dtype(dtype)
        ga, gbt = precondition(
            stack(a_list, cdt),
            stack(b_list, cdt).mT.contiguous(),
            torch.stack([grad_or_zeros(a, cdt) for a in a_list]),
            torch.stack([grad_or_zeros(b, cdt) for b in b_list]).mT.contiguous(),
            group["scale"],
            group["reg"],
        )
        params += a_list + b_list
        grads += ga.to(dtype).unbind(0)
        grads += gbt.mT.to(dtype).contiguous().unbind(0)

    def _update(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        scaled_gd_update(params, grads, lr=group["lr"], weight_decay=group["weight_decay"])


class ScaledAdamW(ScaledGD):
    """AdamW on the preconditioned gradients of :class:`ScaledGD` (not gauge invariant).

    Args:
        params: groups ``{"pairs": [(A, B), ...], "scale": s, "lr": ...}``.
        lr, betas, eps, weight_decay, fused: as :class:`mixofshow.optim.adamw.AdamW`.
        reg: damping of the r x r Gram matrices, relative to their mean eigenvalue.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        reg: float = 1e-6,
        fused: bool | None = None,
    ) -> None:
        check_adamw_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, lr, reg, weight_decay, betas=tuple(betas), eps=eps, fused=fused)

    def _extra_defaults(
        self, *, betas: tuple[float, float], eps: float, fused: bool | None
    ) -> dict[str, Any]:
        return dict(betas=betas, eps=eps, fused=fused)

    def _update(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        beta1, beta2 = group["betas"]
        for (fused, *_), lists in adam_lists(self.state, params, grads, group["fused"]).items():
            adamw_update(
                *lists,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                fused=fused,
            )


SPECS = [
    OptimizerSpec(
        name="scaled_gd",
        cls=ScaledGD,
        paper="Zhang & Pilanci, ICML 2024",
        memory="none",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
    OptimizerSpec(
        name="scaled_adamw",
        cls=ScaledAdamW,
        paper="Zhang & Pilanci, ICML 2024",
        memory="2(m+n)r (Adam moments on the preconditioned gradients)",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    ),
]
