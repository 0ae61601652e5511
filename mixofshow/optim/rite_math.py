"""LoRA-RITE's math, batched over rows of equal shape, and its plain per-pair reference.

The update, its options and the layout are described in :mod:`mixofshow.optim.lora_rite` (the
optimizer) and ``docs/optimizers.md``; this module holds the pure functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mixofshow.optim.batching import inverse_sqrt, sym, tiny, triangular_inverse

__all__ = [
    "Bases",
    "Prepared",
    "bias_corrected_decay",
    "escape_mass",
    "lora_rite_reference",
    "rite_apply",
    "rite_bases",
    "rite_prepare",
    "unmagnified_reference",
]


def bias_corrected_decay(beta: float, step: int) -> float:
    """``b (1 - b^(t-1)) / (1 - b^t)`` for the 1-based step t (0 at t = 1)."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta**step)


class Bases(NamedTuple):
    """The factors' bases for one batch: ``Q^T = L^-1 Y`` per row, kept as the pair (Y, L^-1)."""

    y: list[torch.Tensor]  # per block (N_j, r, k_j): rows Y with Q^T = L^-1 Y
    linv: torch.Tensor  # (N, r, r): L^-1 (lower triangular; I where Y = Q^T)
    rinv: torch.Tensor  # (N, r, r): R^-1 of X^T = Q R (upper triangular)
    cond_sq: torch.Tensor  # (N,): cond_F(R)^2 where the direct way found it (inf elsewhere)
    householder: int  # how many blocks needed a Householder QR


class Prepared(NamedTuple):
    """Steps 1-2 for the blocks of one batch (rows: factors ``X`` in {A, B^T}, r-major)."""

    bases: Bases
    partner_rinv: torch.Tensor  # (N, r, r): R^-1 of the row's partner (R_B^-1 for an A row)
    partner_transport: torch.Tensor  # (N, r, r): T = Q_p^T Q_p,prev of the partner's basis
    u: list[torch.Tensor]  # per block: u = R_p^-T g, the unmagnified gradient (N_j, r, k_j), or g
    u_map: list[torch.Tensor | None]  # per block: None, or R_p^-T where ``u`` holds g (u = u_map g)
    gram: torch.Tensor  # (N, r, r): u u^T / k
    sq_norm: torch.Tensor  # (N,): ||u||^2 (after skipping)
    keep: torch.Tensor | None  # (N,): 0 for skipped rows, 1 otherwise (None: skipping off)


FOLD_CONDITION = 1.5  # fold R_p^-T into the preconditioner where cond_F(R_p) <= 1.5 r
DIRECT_CONDITION = 1.5  # bases from the Cholesky of X X^T where cond_F(R) <= 1.5 r
PRECONDITIONED_TOLERANCE = 0.8  # ||Y Y^T / mean eigenvalue - I||_F <= 0.8: cond(Y Y^T) <= 9


def rite_bases(xs: list[torch.Tensor], rinv_prev: torch.Tensor | None) -> Bases:
    """Thin QR ``X^T = Q R`` of every row, from r x r Grams where that is accurate.

    Three ways, tried in turn per block (one host sync each on CUDA):

    - *direct*: ``X X^T = L L^T`` (Cholesky), ``Q^T = L^-1 X``, ``R = L^T``; one Gram of the
      k-long rows. Its rounding error grows with ``cond(X)^2``, so it is kept only where
      ``cond_F(R) <= 1.5 r`` (``cond_2 <= 24`` at r = 16).
    - *preconditioned*: the factors move little per step, so ``Y = R_prev^-T X`` is nearly
      orthonormal (up to scale) and a Cholesky QR of it, ``Y Y^T = L L^T``, is as accurate as a
      Householder QR: ``Q^T = L^-1 Y``, ``R = L^T R_prev``; one product and one Gram. Kept where
      ``||Y Y^T / mean(lambda) - I||_F <= 0.8``.
    - *Householder* (``torch.linalg.qr``, ``R^-1`` from
      :func:`~mixofshow.optim.batching.triangular_inverse`): the first step (``rinv_prev`` is
      None), a zero or jumping factor.

    At rank 16 on CPU the direct way costs a seventh of a Householder QR, the preconditioned one
    a third.
    """
    r = xs[0].shape[1]
    eye = torch.eye(r, dtype=xs[0].dtype, device=xs[0].device)
    spans = list(_spans(xs))
    n = len(xs)
    ys: list[torch.Tensor | None] = [None] * n
    linvs: list[torch.Tensor | None] = [None] * n
    rinvs: list[torch.Tensor | None] = [None] * n
    conds = [torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device) for x in xs]
    if rinv_prev is not None:
        checks = []
        for j, x in enumerate(xs):  # direct
            gram = sym(x @ x.mT)
            low, info = torch.linalg.cholesky_ex(gram)
            linv = torch.linalg.solve_triangular(low, eye.expand_as(low), upper=False)
            # cond_F(R)^2 = ||R||_F^2 ||R^-1||_F^2 = tr(X X^T) ||L^-1||_F^2
            cond = gram.diagonal(dim1=-2, dim2=-1).sum(-1) * linv.square().sum((-2, -1))
            conds[j] = cond.where(info == 0, torch.inf)
            checks.append(conds[j].amax())
            ys[j], linvs[j], rinvs[j] = x, linv, linv.mT
        limit = (DIRECT_CONDITION * r) ** 2
        retry = [j for j, good in enumerate((torch.stack(checks) <= limit).tolist()) if not good]
        checks = []
        for j in retry:  # preconditioned
            x, (lo, hi) = xs[j], spans[j]
            conds[j] = torch.full_like(conds[j], torch.inf)
            if x.is_contiguous():
                y = rinv_prev[lo:hi].mT @ x
            else:  # keep a k-major block k-major: Y^T = X^T R_prev^-1
                y = (x.mT @ rinv_prev[lo:hi]).mT
            gram = sym(y @ y.mT)
            mean = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
            low, info = torch.linalg.cholesky_ex(gram)
            checks.append(torch.linalg.matrix_norm(gram / mean - eye).where(info == 0, torch.inf).amax())
            linv = torch.linalg.solve_triangular(low, eye.expand_as(low), upper=False)
            ys[j], linvs[j], rinvs[j] = y, linv, rinv_prev[lo:hi] @ linv.mT
        if retry:
            for j, good in zip(retry, (torch.stack(checks) <= PRECONDITIONED_TOLERANCE).tolist()):
                if not good:
                    ys[j] = None
    householder = 0
    for j, x in enumerate(xs):
        if ys[j] is None:
            q, rr = torch.linalg.qr(x.mT)
            ys[j] = q.mT  # contiguous: LAPACK returns column-major Q
            linvs[j] = eye.expand(len(x), r, r)
            rinvs[j] = triangular_inverse(rr)
            householder += 1
    return Bases(ys, torch.cat(linvs), torch.cat(rinvs), torch.cat(conds), householder)


def _partner(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([x[lo:hi] for lo, hi in ranges])


def rite_prepare(
    xs: list[torch.Tensor],
    gs: list[torch.Tensor],
    prev: Bases | None,
    partner_ranges: list[tuple[int, int]],
    skip: float,
) -> Prepared:
    """Step 1 and the transports (step 2), batched over blocks of rows ``X`` in {A, B^T}.

    The bases come from :func:`rite_bases`; the transport is
    ``T = Q^T Q_prev = L^-1 (Y Y_prev^T) L_prev^-T``. The unmagnified gradient ``u = R_p^-T g``
    is not formed where the partner is well conditioned (``cond_F(R_p) <= 1.5 r``, so
    ``cond_2(R_p) <= 24`` at r = 16, as measured by the direct way of :func:`rite_bases`): its
    Gram is ``R_p^-T (g g^T) R_p^-1`` and ``R_p^-T`` is folded into the preconditioner, one
    product of k-long rows less. The Gram's rounding error relative to its size grows with
    ``cond(R_p)^2`` that way (with ``cond(R_p)`` when u is formed first), hence the bound; other
    blocks form u. The choice is one host sync per batch on CUDA.

    Args:
        xs, gs: per block, factors and their gradients in the r-major layout (N_j, r, k_j).
        prev: the previous step's bases (None at step 1: ``T = 0``).
        partner_ranges: row ranges whose concatenation lists each row's partner (B for A).
        skip: skip threshold (0 = off).
    """
    bases = rite_bases(xs, None if prev is None else prev.rinv)
    if prev is None:
        transports = torch.zeros_like(bases.rinv)
    else:
        cross = torch.cat([y @ yp.mT for y, yp in zip(bases.y, prev.y)])
        transports = bases.linv @ cross @ prev.linv.mT
    partner_rinv = _partner(bases.rinv, partner_ranges)
    cond_sq = _partner(bases.cond_sq, partner_ranges)
    limit = (FOLD_CONDITION * partner_rinv.shape[-1]) ** 2
    spans = list(_spans(gs))
    folds = (torch.stack([cond_sq[lo:hi].amax() for lo, hi in spans]) <= limit).tolist()
    us, maps, raw = [], [], []
    for g, (lo, hi), fold in zip(gs, spans, folds):  # gA_^T = R_B^-T G_A, gB_^T = R_A^-T G_B^T
        rinv_t = partner_rinv[lo:hi].mT
        if fold:  # u u^T = R_p^-T (g g^T) R_p^-1; u itself is never formed
            us.append(g)
            maps.append(rinv_t)
            raw.append(rinv_t @ (g @ g.mT) @ rinv_t.mT)
        else:
            u = rinv_t @ g
            us.append(u)
            maps.append(None)
            raw.append(u @ u.mT)
    raw = sym(torch.cat(raw))
    lengths = torch.cat([x.new_full((len(x),), float(x.shape[-1])) for x in xs])
    sq_norm = raw.diagonal(dim1=-2, dim2=-1).sum(-1)
    keep = None
    if skip > 0:  # RMS of u = sqrt(||u||^2 / (r k))
        keep = (sq_norm / (lengths * raw.shape[-1]) <= skip * skip).to(raw.dtype)
        sq_norm = sq_norm * keep
    gram = raw / lengths[:, None, None]
    partner_t = _partner(transports, partner_ranges)
    return Prepared(bases, partner_rinv, partner_t, us, maps, gram, sq_norm, keep)


def _spans(blocks: list[torch.Tensor]):
    """(start, stop) of each block's rows in the batch."""
    start = 0
    for block in blocks:
        yield start, start + len(block)
        start += len(block)


FRAME_TOLERANCE = 0.5  # ||P^T P - I||_F of a first moment's frame: cond(P) <= sqrt(3)


def rite_apply(
    xs: list[torch.Tensor],
    prep: Prepared,
    v_prev: torch.Tensor,
    m_prev: list[torch.Tensor],
    frame_prev: torch.Tensor,
    *,
    lr: float,
    beta1_hat: float,
    beta2_hat: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None,
    update_capping: float = 0.0,
    escape_prev: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Steps 3-6, batched: returns the new factors, second moments, first moments (r-major) with
    their frames, and the escape masses (``None`` unless ``escape_prev``, the (N,) previous ones,
    is given).

    The first moment is kept as ``M^T = P N`` with an r x r frame ``P`` (``frame_prev``: identity
    at the first step): the transport ``M^T <- b1 T M^T + S^T`` becomes ``P <- T P`` and
    ``N <- b1 N + P^-1 S^T``, one product of k-long rows instead of two, and the step uses
    ``(R_partner^-1 P) N``. A block whose frames drift from orthogonal (``||P^T P - I||_F > 0.5``;
    the first step, where ``T = 0``) is rebased, ``N <- P N``, ``P <- I``. That decision is one
    host sync per batch on CUDA. ``m_prev`` is overwritten with the new ``N`` (returned).

    A block of ``xs`` given as the transposed view of a contiguous (N, k, r) tensor (B factors)
    is updated in that layout and returned as such a view, so its copy back to the parameters is
    a plain one. Skipping and clipping scale ``u`` by ``c``; they are folded into the r x r
    matrices (``c^2`` into the Gram, ``c`` into ``V^-1/2``), so no pass over ``u`` is needed.
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
    frame = t @ frame_prev
    eye = torch.eye(frame.shape[-1], dtype=frame.dtype, device=frame.device)
    drift = torch.linalg.matrix_norm(frame.mT @ frame - eye)
    bounds = list(_spans(xs))
    keep_frame = (torch.stack([drift[lo:hi].amax() for lo, hi in bounds]) <= FRAME_TOLERANCE).tolist()
    frames = []
    new_xs, new_ms = [], []
    for x, u, u_map, m, (lo, hi), kept in zip(xs, prep.u, prep.u_map, m_prev, bounds, keep_frame):
        p = frame[lo:hi]
        to_m = precond[lo:hi] if u_map is None else precond[lo:hi] @ u_map  # S^T = to_m u
        if kept:  # N <- b1 N + P^-1 S^T
            m = torch.baddbmm(m, torch.linalg.solve(p, to_m), u, beta=beta1_hat, out=m)
        else:  # rebase: N <- b1 T P_prev N + S^T, P <- I
            m = torch.baddbmm(torch.bmm(beta1_hat * p, m), to_m, u, out=m)
            p = eye.expand_as(p)
        frames.append(p)
        to_x = prep.partner_rinv[lo:hi]  # X <- X (1 - lr wd) - lr R_partner^-1 cap(P N)
        step = m
        if update_capping > 0:  # M / max(1, RMS(M) / cap), per factor
            step = p @ m
            rms = (step.square().sum((-2, -1)) / step[0].numel()).sqrt()
            step = step / (rms / update_capping).clamp_min(1.0)[:, None, None]
        elif kept:
            to_x = to_x @ p
        decay = 1.0 - lr * weight_decay
        if x.is_contiguous():
            x = torch.baddbmm(x, to_x, step, beta=decay, alpha=-lr)
        else:  # X^T <- X^T (1 - lr wd) - lr step^T to_x^T in the (N, k, r) layout
            x = torch.baddbmm(x.mT, step.mT, to_x.mT, beta=decay, alpha=-lr).mT
        new_ms.append(m)
        new_xs.append(x)
    return new_xs, v, new_ms, torch.cat(frames), escape


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
