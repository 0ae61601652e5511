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

The math is in ``rite_math.py``. Implementation notes: the factors are handled as rows ``X`` in {A, B^T} (r-major, so every
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
from typing import Any

import torch

from mixofshow.optim.base import (
    HyperParameterError,
    LoRAOptimizer,
    check_betas,
    check_lr,
    check_positive,
    step_counters,
)
from mixofshow.optim.batching import compute_dtype, stack
from mixofshow.optim.bucketed import grad_or_zeros
from mixofshow.optim.registry import OptimizerSpec
from mixofshow.optim.rite_math import (
    Prepared,
    bias_corrected_decay,
    lora_rite_reference,
    rite_apply,
    rite_prepare,
    unmagnified_reference,
)

__all__ = [
    "LoRARite",
    "Prepared",
    "SPECS",
    "lora_rite_reference",
    "rite_apply",
    "rite_prepare",
    "unmagnified_reference",
]


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
