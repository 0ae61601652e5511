"""The LoRA-S horizontal lift: a weight-space direction mapped to the LoRA factors.

Paper: "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", Jinyang Zheng and
Tong Wu, ICLR 2026, https://openreview.net/forum?id=Guo2XGgxZA. Reference code: the authors'
Gitee repository (sanjin998/lora_s) was not reachable; reconstructed from the paper's
description (Algorithm 1) and checked numerically, see ``docs/optimizers.md`` (LoRA-S).

With ``S_B = B^T B``, ``S_A = A A^T`` (r x r) and a direction ``Xd`` (m x n) for the product ``B A``::

    C  = B^T Xd A^T,   M = S_B S_A,   solve  M K + K M = C           (Sylvester, r x r)
    Bd = (Xd A^T - B S_A K) S_A^-1
    Ad = S_B^-1 (B^T Xd - K S_B A)

``Bd A + B Ad`` is the tangent projection ``P_B Xd + Xd P_A - P_B Xd P_A`` and ``(Bd, Ad)`` is
horizontal for the metric ``tr(S_B^-1 Bd^T VB) + tr(S_A^-1 Ad VA^T)``. Only ``XA = Xd A^T`` and
``BX = B^T Xd`` enter, so directions built from factors never form an m x n matrix.

The Sylvester equation is solved in a canonical gauge: with ``S_B = V diag(e) V^T`` (eigh) and
``N = diag(e)^1/2 V^T S_A V diag(e)^1/2 = Q diag(lam) Q^T`` (eigh; N is orthogonally similar to
``S_B^1/2 S_A S_B^1/2``), the gauge ``R = V diag(e)^-1/2 Q`` turns ``S_B`` into ``I`` and ``S_A``
into ``diag(lam)``, so ``M`` is diagonal and ``K~_ij = C~_ij / (lam_i + lam_j)``. Both Grams are
damped (``S + delta I``, ``delta = damping * tr(S) / r + tiny``) so a zero-initialised ``B`` gives
finite output. All r x r algebra runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from mixofshow.optim.batching import compute_dtype, sym, tiny

__all__ = ["damp", "lift_core", "lift_products", "horizontal_lift", "horizontal_lift_reference"]


def damp(s: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
    """``S + (damping * tr(S) / r + tiny) I`` for a batch of symmetric PSD r x r matrices.

    ``damping``: a float, or one value per matrix (shape ``s.shape[:-2]``).
    """
    r = s.shape[-1]
    trace = s.diagonal(dim1=-2, dim2=-1).sum(-1)
    delta = trace * (damping / r) + tiny(s.dtype)
    return s + delta[..., None, None] * torch.eye(r, dtype=s.dtype, device=s.device)


def _eigh(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # eigh of a trace-normalised copy: tiny Grams (B near its zero init) would otherwise underflow
    # inside LAPACK/cuSOLVER (squares of 1e-19 are denormal in float32); eigenvectors are unchanged
    t = s.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny(s.dtype))[..., None]
    w, v = torch.linalg.eigh(s / t[..., None])
    return w * t, v


def lift_products(b: torch.Tensor, a: torch.Tensor, xd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xd A^T, B^T Xd)`` from a full direction ``Xd`` (k x m x n, or one m x n)."""
    dt = compute_dtype(xd.dtype)
    xd, a, b = xd.to(dt), a.to(dt), b.to(dt)
    return xd @ a.transpose(-1, -2), b.transpose(-1, -2) @ xd


def lift_core(
    s_b: torch.Tensor,
    s_a: torch.Tensor,
    c: torch.Tensor,
    damping: float | torch.Tensor = 0.0,
    return_k: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The r x r part of the lift, batched over any pairs (of any shapes) that share r.

    Args:
        s_b: ``B^T B``, (k, r, r) (undamped).
        s_a: ``A A^T``, (k, r, r) (undamped).
        c: ``B^T Xd A^T``, (k, r, r).
        damping: relative damping of both Grams, a float or one value per pair, shape (k,).
        return_k: also return the Sylvester matrix K (the "decay matrix").

    Returns:
        ``(S_A^-1, L, S_B^-1, R)`` (and ``K``) of the damped Grams, such that
        ``Bd = Xd A^T S_A^-1 - B L`` and ``Ad = S_B^-1 B^T Xd - R A`` (``L = S_A K S_A^-1``,
        ``R = S_B^-1 K S_B``). No host synchronisation and no data-dependent Python branches.
    """
    dt = s_b.dtype
    s_b = damp(sym(s_b), damping)
    s_a = damp(sym(s_a), damping)

    # 1. canonical gauge R = V e^-1/2 Q: R^T S_B R = I, R^-1 S_A R^-T = diag(lam)
    e, v = _eigh(s_b)
    e = e.clamp_min(tiny(dt))
    e_sqrt = e.sqrt()
    n_mat = sym(e_sqrt[..., :, None] * (v.transpose(-1, -2) @ s_a @ v) * e_sqrt[..., None, :])
    lam, q = _eigh(n_mat)
    lam = lam.clamp_min(torch.finfo(dt).tiny)  # >= e_min * floor > 0 in exact arithmetic
    r_mat = (v / e_sqrt[..., None, :]) @ q  # R
    r_inv = q.transpose(-1, -2) @ (e_sqrt[..., :, None] * v.transpose(-1, -2))  # R^-1

    # 2. Sylvester in that gauge: diag(lam) K~ + K~ diag(lam) = C~ = R^T C R^-T
    c_t = r_mat.transpose(-1, -2) @ c @ r_inv.transpose(-1, -2)
    k_t = c_t / (lam[..., :, None] + lam[..., None, :])

    # 3. back to the given gauge: S_A^-1 = R^-T lam^-1 R^-1, S_B^-1 = R R^T
    s_a_inv = (r_inv.transpose(-1, -2) / lam[..., None, :]) @ r_inv
    s_b_inv = r_mat @ r_mat.transpose(-1, -2)
    # B S_A K S_A^-1 = B R lam K~ lam^-1 R^-1 ;  S_B^-1 K S_B = R K~ R^-1
    left = r_mat @ (lam[..., :, None] * k_t / lam[..., None, :]) @ r_inv
    right = r_mat @ k_t @ r_inv
    out = (s_a_inv, left, s_b_inv, right)
    if return_k:
        out = out + (r_inv.transpose(-1, -2) @ k_t @ r_mat.transpose(-1, -2),)  # K = R^-T K~ R^T
    return out


def horizontal_lift(
    b: torch.Tensor,
    a: torch.Tensor,
    xa: torch.Tensor,
    bx: torch.Tensor,
    damping: float = 0.0,
    return_k: bool = False,
):
    """Batched horizontal lift of the direction whose products are ``xa = Xd A^T``, ``bx = B^T Xd``.

    Args:
        b: B, (k, m, r) (or one m x r).
        a: A, (k, r, n) (or one r x n).
        xa: ``Xd A^T``, (k, m, r).
        bx: ``B^T Xd``, (k, r, n).
        damping: relative damping of ``S_B`` and ``S_A`` (0 keeps only a tiny absolute floor).
        return_k: also return the Sylvester matrix K (the "decay matrix").

    Returns:
        ``(Bd, Ad)`` (and ``K``) in the compute dtype (float32, or float64 for float64 input).
        No host synchronisation and no data-dependent Python branches.
    """
    single = b.dim() == 2
    if single:
        b, a, xa, bx = b[None], a[None], xa[None], bx[None]
    dt = compute_dtype(b.dtype)
    b, a, xa, bx = b.to(dt), a.to(dt), xa.to(dt), bx.to(dt)
    bt = b.transpose(-1, -2)
    s_a_inv, left, s_b_inv, right, *k = lift_core(bt @ b, a @ a.transpose(-1, -2), bt @ xa, damping, return_k)
    out = (xa @ s_a_inv - b @ left, s_b_inv @ bx - right @ a, *k)
    if single:
        out = tuple(t[0] for t in out)
    return out


def horizontal_lift_reference(
    b: torch.Tensor, a: torch.Tensor, xd: torch.Tensor, damping: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain one-pair lift (m x n ``xd``): Kronecker solve of the Sylvester equation, explicit inverses.

    Returns ``(Bd, Ad, K)``. For tests only (it forms m x n and r^2 x r^2 matrices).
    """
    dt = compute_dtype(b.dtype)
    b, a, xd = b.to(dt), a.to(dt), xd.to(dt)
    r = b.shape[1]
    s_b = damp(b.T @ b, damping)
    s_a = damp(a @ a.T, damping)
    m_mat = s_b @ s_a
    c = b.T @ xd @ a.T
    eye = torch.eye(r, dtype=dt, device=b.device)
    # column-major vec: vec(M K + K M) = (I kron M + M^T kron I) vec(K)
    lhs = torch.kron(eye, m_mat.contiguous()) + torch.kron(m_mat.T.contiguous(), eye)
    k = torch.linalg.solve(lhs, c.T.reshape(-1)).reshape(r, r).T
    bd = (xd @ a.T - b @ s_a @ k) @ torch.linalg.inv(s_a)
    ad = torch.linalg.inv(s_b) @ (b.T @ xd - k @ s_b @ a)
    return bd, ad, k
