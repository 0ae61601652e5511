"""LoRA-RITE: transformation-invariant adaptive matrix preconditioning for LoRA.

Paper: Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA
Optimization", ICLR 2025, https://arxiv.org/abs/2410.20625. Reference code: google-research
(JAX, ``lora_rite``) and the first author's PyTorch port
https://github.com/gkevinyen5418/LoRA-RITE (``lora_rite.py``), whose defaults are used here.

Update, per pair with ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), at step ``t``::

    gA_ = G_A^T R_B^-1  (n x r)          gB_ = G_B R_A^-1  (m x r)        unmagnified grads
    [skip a factor whose RMS(g_) > skip_threshold; scale all g_ by min(1, clip / ||all g_||)]
    T_A = Q_B^T Q_B,prev                 T_B = Q_A^T Q_A,prev             basis transport
    V_A <- b2^ T_A V_A T_A^T + (1 - b2^) gA_^T gA_ / n                   (B side: / m)
    S_A = gA_ V_A^-1/2                   (eigh, 1 / (sqrt(lambda) + eps))
    M_A <- b1^ M_A T_A^T + (1 - b1^) S_A
    A <- A - lr (R_B^-1 M_A^T + wd A)    B <- B - lr (M_B R_A^-T + wd B)

with bias correction folded into the decays, ``b^_t = b (1 - b^(t-1)) / (1 - b^t)``.
Everything is equivariant under ``(B, A) -> (B R, R^-1 A)``: with ``wd = 0`` and clipping and
skipping off, the sequence of ``W = s B A`` does not depend on the gauge ``R``.

Options of the reference (both off by default there and here):

- ``update_capping = c > 0``: the step uses ``M / max(1, RMS(M) / c)`` (per factor; the stored
  first moment stays uncapped).
- ``apply_escape``: the second-moment mass lost by the basis transport is kept as a scalar per
  factor, ``E <- b2^ (E + min(max_i(lam_i(V_prev) - lam_i(T V_prev T^T))_+, (tr V_prev - tr T V_prev T^T)_+))``
  (eigenvalues in ascending order), and the preconditioner becomes ``1 / (sqrt(lambda + E) + eps)``.

Implementation notes: the factors are handled as rows ``X`` in {A, B^T} (r-major, so every
batched product is a fast ``r x r @ r x k`` one); rows of equal shape form one block (A and B^T
rows together when m == n), each block gets one QR and a few products, and the r x r algebra of a
whole group (triangular inverses, the eigh of every ``V``) runs as one batched call. Skipping and
clipping are folded into r x r factors. The state is stored r-major (``q_a = Q_A^T``,
``m_a = M_A^T``, ...) and in float32 for fp16/bf16 factors. ``R^-1`` is a triangular inverse whose
negligible pivots are floored (the reference uses ``pinv``), which maps a zero B to a zero
unmagnified gradient; eigenvalues of ``V`` are floored at 0 before the square root (the reference
turns the NaN of a rounding-negative one into a zero update). Skipping and clipping are tensor
masks (no branching on values), so the only host sync on CUDA is the one ``torch.linalg.eigh``
makes. Not implemented: the reference's ``balance_param`` and ``relative_epsilon`` (off by
default there; its ``relative_epsilon`` path does not run as published). Math and tests:
``docs/optimizers.md``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mixofshow.optim.base import (
    HyperParameterError,
    LoRAOptimizer,
    check_betas,
    check_lr,
    check_positive,
    step_counters,
)
from mixofshow.optim.batching import (
    compute_dtype,
    inverse_sqrt,
    stack,
    sym,
    tiny,
    triangular_inverse,
)
from mixofshow.optim.bucketed import grad_or_zeros
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "LoRARite",
    "Prepared",
    "SPECS",
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


class LoRARite(LoRAOptimizer):
    """LoRA-RITE on LoRA pairs, batched over pairs of equal shape.

    Args:
        params: groups ``{"pairs": [(A, B), ...], "lr": ...}``.
        lr: learning rate.
        betas: decays of the first moment and of the r x r second moments.
        eps: added to ``sqrt(lambda)`` of the second moments.
        weight_decay: decoupled, ``X -= lr wd X``.
        clip_threshold: clip the norm of all unmagnified gradients (of every group) to this
            value; 0 turns it off (reference ``clip_unmagnified_grad``, default 1).
        skip_threshold: zero a factor's unmagnified gradient whose RMS exceeds this value;
            0 turns it off (reference ``update_skipping``, default 1).
        update_capping: cap the RMS of each factor's step (its first moment) at this value;
            0 turns it off (reference default 0).
        apply_escape: add the second-moment mass lost by the basis transport to the
            preconditioner's eigenvalues (reference default off).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip_threshold: float = 1.0,
        skip_threshold: float = 1.0,
        update_capping: float = 0.0,
        apply_escape: bool = False,
    ) -> None:
        check_lr(lr)
        betas = check_betas(betas)
        for name, value in (("eps", eps), ("weight_decay", weight_decay), ("clip_threshold", clip_threshold),
                            ("skip_threshold", skip_threshold), ("update_capping", update_capping)):  # fmt: skip
            check_positive(name, value)
        if not isinstance(apply_escape, bool):
            raise HyperParameterError("apply_escape", f"Invalid apply_escape: {apply_escape!r} (expected true or false)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_threshold=clip_threshold,
            skip_threshold=skip_threshold, update_capping=update_capping, apply_escape=apply_escape,
        )  # fmt: skip
        super().__init__(params, defaults)
        # id(first view) -> (stacked tensor, its row views) of the state written by the last step
        self._written: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._written = {}

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        # 1. unmagnified gradients of every batch (all groups first: clipping uses their norm)
        work = []
        for group, batch in self._batches(buckets):
            xs = [stack(block.factors(), batch.dtype) for block in batch.blocks]
            gs = [stack(block.grads(batch.dtype), batch.dtype) for block in batch.blocks]
            q_prev = [self._read(batch, block.states, "q_", x) for block, x in zip(batch.blocks, xs)]
            prep = rite_prepare(xs, gs, q_prev, batch.partner_ranges, group["skip_threshold"])
            work.append((group, batch, xs, prep))
        norm = None
        if any(group["clip_threshold"] > 0 for group, *_ in work):
            sq = [prep.sq_norm.sum().to(work[0][3].sq_norm) for *_, prep in work]
            norm = torch.stack(sq).sum().sqrt()
        # 2.-6. transport, moments, preconditioning and the step
        written: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        for group, batch, xs, prep in work:
            grad_scale = None
            if group["clip_threshold"] > 0:  # min(1, c / norm); c / 0 = inf -> 1
                grad_scale = (group["clip_threshold"] / norm).clamp(max=1.0).to(prep.gram)
            states = [st for block in batch.blocks for st in block.states]
            t = batch.step + 1
            beta1, beta2 = group["betas"]
            escape_prev = None
            if group["apply_escape"]:
                escape_prev = self._read(batch, states, "escape_", prep.sq_norm)
            new_xs, v, new_ms, escape = rite_apply(
                xs,
                prep,
                self._read(batch, states, "v_", prep.gram),
                [self._read(batch, block.states, "m_", x) for block, x in zip(batch.blocks, xs)],
                lr=group["lr"],
                beta1_hat=bias_corrected_decay(beta1, t),
                beta2_hat=bias_corrected_decay(beta2, t),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_scale=grad_scale,
                update_capping=group["update_capping"],
                escape_prev=escape_prev,
            )
            for block, x_new, q, m in zip(batch.blocks, new_xs, prep.q, new_ms):
                torch._foreach_copy_(block.factors(), x_new.unbind(0))
                _write(block.states, "q_", q, written)
                _write(block.states, "m_", m, written)
            _write(states, "v_", v, written)
            if escape is not None:
                _write(states, "escape_", escape, written)
            pair_states = list({id(st): st for st, _ in states}.values())
            torch._foreach_add_(step_counters(pair_states), 1.0)
        self._written = written

    def _read(
        self, batch: _Batch, states: list[_RowState], prefix: str, like: torch.Tensor
    ) -> torch.Tensor:
        """The rows' stacked state (zeros at the first step); no copy when the previous step
        wrote exactly these tensors (checked by identity, so edits in place are seen)."""
        if batch.step == 0:
            return torch.zeros_like(like)
        current = [st[prefix + side] for st, side in states]
        cached = self._written.get(id(current[0]))
        if cached is not None and len(cached[1]) == len(current):
            if all(map(operator.is_, current, cached[1])):
                return cached[0]
        return stack(current, like.dtype)

    def _batches(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> list[tuple[dict, _Batch]]:
        """The driver's shape buckets, batched per group by (rank, compute dtype, device, step).

        Inside a batch, pairs of one shape form blocks: A and B^T rows share one block when
        m == n (one QR, one product for both sides), else A rows and B^T rows are two blocks.
        """
        batches: dict[tuple, tuple[dict, _Batch]] = {}
        for group, pairs in buckets:
            by_step: dict[int, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
            for a, b in pairs:
                st = self.state[a]
                step = int(step_counters([st])[0])
                by_step.setdefault(step, []).append((a, b, st))
            (a0, b0) = pairs[0]
            cdt = compute_dtype(a0.dtype)
            for step, bucket in by_step.items():
                key = (id(group), a0.shape[0], cdt, a0.device, step)
                _, batch = batches.setdefault(key, (group, _Batch(cdt, step)))
                batch.add(bucket, square=b0.shape[0] == a0.shape[1])
        return list(batches.values())


_RowState = tuple[dict, str]  # (the pair's state dict, "a" | "b")


def _write(
    states: list[_RowState],
    prefix: str,
    stacked: torch.Tensor,
    written: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
) -> None:
    """Store the rows of ``stacked`` as per-pair state views and remember them for ``_read``."""
    views = stacked.unbind(0)
    for (st, side), view in zip(states, views):
        st[prefix + side] = view
    written[id(views[0])] = (stacked, views)


@dataclass
class _Block:
    """Rows of equal shape: A rows (r x n) and/or B^T rows (r x m), one batched QR."""

    params: list[torch.Tensor] = field(default_factory=list)
    transposed: list[bool] = field(default_factory=list)
    states: list[_RowState] = field(default_factory=list)

    def add(self, rows: list[tuple[torch.Tensor, dict]], side: str) -> None:
        self.params += [p for p, _ in rows]
        self.transposed += [side == "b"] * len(rows)
        self.states += [(st, side) for _, st in rows]

    def factors(self) -> list[torch.Tensor]:
        return [p.mT if t else p for p, t in zip(self.params, self.transposed)]

    def grads(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The rows' gradients (zeros for a factor without one while its partner has one)."""
        gs = [grad_or_zeros(p, dtype) for p in self.params]
        return [g.mT if t else g for g, t in zip(gs, self.transposed)]


@dataclass
class _Batch:
    """Blocks of one ``rite_prepare``/``rite_apply`` call (one rank, dtype, device and step)."""

    dtype: torch.dtype
    step: int
    blocks: list[_Block] = field(default_factory=list)
    partner_ranges: list[tuple[int, int]] = field(default_factory=list)
    n_rows: int = 0

    def add(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict]], square: bool) -> None:
        a_block, b_block = _Block(), _Block()
        a_block.add([(a, st) for a, _, st in pairs], "a")
        (a_block if square else b_block).add([(b, st) for _, b, st in pairs], "b")
        self.blocks += [a_block] if square else [a_block, b_block]
        k, lo = len(pairs), self.n_rows
        self.partner_ranges += [(lo + k, lo + 2 * k), (lo, lo + k)]  # A rows <-> B rows
        self.n_rows += 2 * k


SPECS = [
    OptimizerSpec(
        name="lora_rite",
        cls=LoRARite,
        paper="Yen et al., ICLR 2025",
        memory="2(m+n)r + 2r^2 (first moments, bases, r x r second moments)",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    )
]
