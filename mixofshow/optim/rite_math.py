"""LoRA-RITE's math, batched over rows of equal shape, and its plain per-pair reference.

The update, its options and the layout are described in :mod:`mixofshow.optim.lora_rite` (the
optimizer) and ``docs/optimizers.md``; this module holds the pure functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mixofshow.optim.batching import inverse_sqrt, sym, tiny, triangular_inverse

__all__ = [
    "Prepared",
    "bias_corrected_decay",
    "escape_mass",
    "lora_rite_reference",
    "rite_apply",
    "rite_prepare",
    "unmagnified_reference",
]


def bias_corrected_decay(beta: float, step: int) -> float:
    """``b (1 - b^(t-1)) / (1 - b^t)`` for the 1-based step t (0 at t = 1)."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta**step)


class Prepared(NamedTuple):
    """Step 1 for the blocks of one batch (rows: factors ``X`` in {A, B^T}, r-major)."""

    q: list[torch.Tensor]  # per block: Q_X^T (N_j, r, k_j), the row's own basis
    partner_rinv: torch.Tensor  # (N, r, r): R^-1 of the row's partner (R_B^-1 for an A row)
    partner_transport: torch.Tensor  # (N, r, r): T = Q_p^T Q_p,prev of the partner's basis
    u: list[torch.Tensor]  # per block: the unmagnified gradient, transposed (N_j, r, k_j)
    gram: torch.Tensor  # (N, r, r): u u^T / k
    sq_norm: torch.Tensor  # (N,): ||u||^2 (after skipping)
    keep: torch.Tensor | None  # (N,): 0 for skipped rows, 1 otherwise (None: skipping off)


def _partner(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([x[lo:hi] for lo, hi in ranges])


def rite_prepare(
    xs: list[torch.Tensor],
    gs: list[torch.Tensor],
    q_prev: list[torch.Tensor],
    partner_ranges: list[tuple[int, int]],
    skip: float,
) -> Prepared:
    """Step 1 and the transports (step 2), batched over blocks of rows ``X`` in {A, B^T}.

    Args:
        xs, gs: per block, factors and their gradients in the r-major layout (N_j, r, k_j).
        q_prev: per block, the previous bases ``Q_X^T`` (zeros at step 1).
        partner_ranges: row ranges whose concatenation lists each row's partner (B for A).
        skip: skip threshold (0 = off).
    """
    qs, rs = zip(*(torch.linalg.qr(x.mT) for x in xs))
    qs = [q.mT for q in qs]  # contiguous: LAPACK returns column-major Q
    transports = torch.cat([q @ qp.mT for q, qp in zip(qs, q_prev)])
    partner_rinv = _partner(triangular_inverse(torch.cat(rs)), partner_ranges)
    us, raw_grams, offset = [], [], 0
    for g in gs:  # gA_^T = R_B^-T G_A, gB_^T = R_A^-T G_B^T
        u = partner_rinv[offset : offset + len(g)].mT @ g
        us.append(u)
        raw_grams.append(u @ u.mT)
        offset += len(g)
    raw = torch.cat(raw_grams)
    sq_norm = raw.diagonal(dim1=-2, dim2=-1).sum(-1)
    inv_k = torch.cat([torch.full_like(rg[:, 0, 0], 1.0 / g.shape[-1]) for rg, g in zip(raw_grams, gs)])
    keep = None
    if skip > 0:  # RMS of u = sqrt(||u||^2 / (r k))
        keep = (sq_norm * inv_k / raw.shape[-1] <= skip * skip).to(raw.dtype)
        sq_norm = sq_norm * keep
    gram = raw * inv_k[:, None, None]
    partner_t = _partner(transports, partner_ranges)
    return Prepared(list(qs), partner_rinv, partner_t, us, gram, sq_norm, keep)


def rite_apply(
    xs: list[torch.Tensor],
    prep: Prepared,
    v_prev: torch.Tensor,
    m_prev: list[torch.Tensor],
    *,
    lr: float,
    beta1_hat: float,
    beta2_hat: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None,
    update_capping: float = 0.0,
    escape_prev: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Steps 3-6, batched: returns the new factors, second / first moments (r-major) and the
    escape masses (``None`` unless ``escape_prev``, the (N,) previous ones, is given).

    Skipping and clipping scale ``u`` by ``c``; they are folded into the r x r matrices
    (``c^2`` into the Gram, ``c`` into ``V^-1/2``), so no pass over ``u`` is needed.
    """
    c = prep.keep
    if grad_scale is not None:
        c = grad_scale.expand_as(prep.sq_norm) if c is None else c * grad_scale
    gram = prep.gram if c is None else prep.gram * (c * c)[:, None, None]
    t = prep.partner_transport
    v_moved = sym(t @ v_prev @ t.mT)
    escape = None
    if escape_prev is not None:
        escape = beta2_hat * (escape_prev + escape_mass(v_prev, v_moved))
    v = sym(beta2_hat * v_moved + (1.0 - beta2_hat) * gram)
    scale = (1.0 - beta1_hat) if c is None else ((1.0 - beta1_hat) * c)[:, None, None]
    precond = inverse_sqrt(v, eps, escape) * scale
    t_first = beta1_hat * t
    new_xs, new_ms, offset = [], [], 0
    for x, u, m in zip(xs, prep.u, m_prev):
        rows = slice(offset, offset + len(x))
        # M^T <- b1 T M^T + (1 - b1) S^T;  X <- X (1 - lr wd) - lr R_partner^-1 cap(M)^T
        m = torch.baddbmm(torch.bmm(precond[rows], u), t_first[rows], m)
        step = m
        if update_capping > 0:  # M / max(1, RMS(M) / cap), per factor
            rms = (m.square().sum((-2, -1)) / m[0].numel()).sqrt()
            step = m / (rms / update_capping).clamp_min(1.0)[:, None, None]
        x = torch.baddbmm(x, prep.partner_rinv[rows], step, beta=1.0 - lr * weight_decay, alpha=-lr)
        new_ms.append(m)
        new_xs.append(x)
        offset += len(x)
    return new_xs, v, new_ms, escape


def escape_mass(v_prev: torch.Tensor, v_moved: torch.Tensor) -> torch.Tensor:
    """The second-moment mass the basis transport lost, per matrix (the reference's
    ``get_unmagnified_rotate_second_escape``): ``min(max_i(lam_i(V) - lam_i(T V T^T))_+,
    (tr V - tr T V T^T)_+)`` with both spectra in ascending order."""
    eye = tiny(v_prev.dtype) * torch.eye(v_prev.shape[-1], dtype=v_prev.dtype, device=v_prev.device)
    lam_old = torch.linalg.eigvalsh(v_prev + eye)
    lam_new = torch.linalg.eigvalsh(v_moved + eye)
    eig_gap = (lam_old - lam_new).amax(-1).clamp_min(0.0)
    trace = lambda x: x.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    return torch.minimum(eig_gap, (trace(v_prev) - trace(v_moved)).clamp_min(0.0))


def unmagnified_reference(
    a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, skip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-pair step 1 with ``pinv`` (as the reference code): (gA_ n x r, gB_ m x r)."""
    ga_ = ga.T @ torch.linalg.pinv(torch.linalg.qr(b)[1])
    gb_ = gb @ torch.linalg.pinv(torch.linalg.qr(a.T)[1])
    if skip > 0:
        ga_ = ga_ * (ga_.square().mean().sqrt() <= skip)
        gb_ = gb_ * (gb_.square().mean().sqrt() <= skip)
    return ga_, gb_


def lora_rite_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    ga: torch.Tensor,
    gb: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    skip: float,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-pair LoRA-RITE step in the paper's layout (state updated in place).

    ``grad_scale`` is the global clipping factor, computed by the caller from the unmagnified
    gradients of all pairs. Returns the new (A, B).
    """
    n, m, r = a.shape[1], b.shape[0], a.shape[0]
    if not state:
        zeros = dict(dtype=a.dtype, device=a.device)
        state.update(step=0, q_a=torch.zeros(n, r, **zeros), q_b=torch.zeros(m, r, **zeros))
        state.update(v_a=torch.zeros(r, r, **zeros), v_b=torch.zeros(r, r, **zeros))
        state.update(m_a=torch.zeros(n, r, **zeros), m_b=torch.zeros(m, r, **zeros))
    state["step"] += 1
    b1 = bias_corrected_decay(betas[0], state["step"])
    b2 = bias_corrected_decay(betas[1], state["step"])
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    ga_, gb_ = unmagnified_reference(a, b, ga, gb, skip)
    ga_, gb_ = ga_ * grad_scale, gb_ * grad_scale
    t_a, t_b = q_b.T @ state["q_b"], q_a.T @ state["q_a"]
    v_a = b2 * t_a @ state["v_a"] @ t_a.T + (1 - b2) * ga_.T @ ga_ / n
    v_b = b2 * t_b @ state["v_b"] @ t_b.T + (1 - b2) * gb_.T @ gb_ / m
    m_a = b1 * state["m_a"] @ t_a.T + (1 - b1) * ga_ @ inverse_sqrt(v_a, eps)
    m_b = b1 * state["m_b"] @ t_b.T + (1 - b1) * gb_ @ inverse_sqrt(v_b, eps)
    state.update(q_a=q_a, q_b=q_b, v_a=v_a, v_b=v_b, m_a=m_a, m_b=m_b)
    a_new = a - lr * (torch.linalg.pinv(r_b) @ m_a.T + weight_decay * a)
    b_new = b - lr * (m_b @ torch.linalg.pinv(r_a).T + weight_decay * b)
    return a_new, b_new
