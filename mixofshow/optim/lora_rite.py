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

The math is in ``rite_math.py``. Implementation notes: the factors are handled as rows ``X`` in
{A, B^T} (r-major; B stays in its own (m, r) layout and is read through transposed views, so no
transposing copies are made); A factors and B factors of one shape form two blocks. No QR is
formed after the first step where r x r Grams are accurate (``rite_bases``: from the Cholesky
of ``X X^T`` for well-conditioned factors, else of ``Y = R_prev^-T X``, else Householder); the
unmagnified gradient of a well-conditioned partner is folded into the preconditioner; the first
moment is kept as ``M^T = P N`` with an r x r frame ``P`` that absorbs the basis transport (so
the moment costs one product per step). The state per factor: ``y_a``, ``linv_a`` (the basis
``Q_A^T = linv_a y_a``), ``rinv_a`` (``R^-1``), ``m_a`` (``N``), ``frame_a`` (``P``), ``v_a``
(and ``_b``), as rows (r x k; ``y_b`` may be a transposed view), in float32 for fp16/bf16
factors, updated in place (a step that rebinds
thousands of new state tensors keeps Python's cyclic GC busy). ``R^-1`` is a triangular inverse
whose negligible pivots are floored (the reference uses ``pinv``), which maps a zero B to a zero
unmagnified gradient; eigenvalues of ``V`` are floored at 0 before the square root (the
reference turns the NaN of a rounding-negative one into a zero update). Skipping and clipping
are tensor masks; the host syncs on CUDA are ``torch.linalg.eigh``'s and one per batch for each
choice of path a step makes. Not implemented: the reference's ``balance_param`` and
``relative_epsilon`` (off by default there; its ``relative_epsilon`` path does not run as
published). Math and tests: ``docs/optimizers.md``.
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
    Bases,
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

    STATE_KEYS = ("y_", "linv_", "rinv_", "m_", "frame_", "v_")  # per factor, + "a" / "b"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._written = {}
        for st in self.state.values():
            if float(st.get("step", 0)) > 0:
                missing = [key + side for key in self.STATE_KEYS for side in "ab" if key + side not in st]
                if missing:
                    raise RuntimeError(
                        f"LoRA-RITE optimizer state lacks {', '.join(missing)}: it was saved by another "
                        "version of mixofshow (before the state held the bases as y/linv/rinv and the first "
                        "moment in a frame); resume it with that version or start a new run"
                    )

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        # 1. unmagnified gradients of every batch (all groups first: clipping uses their norm)
        work = []
        for group, batch in self._batches(buckets):
            xs = [block.rows(stack(block.factors(), batch.dtype)) for block in batch.blocks]
            gs = [block.rows(stack(block.grads(batch.dtype), batch.dtype)) for block in batch.blocks]
            prev = None  # the previous step's bases (none at the first step)
            if batch.step > 0:
                states = [st for block in batch.blocks for st in block.states]
                like = xs[0].new_empty(len(states), xs[0].shape[1], xs[0].shape[1])
                prev = Bases(
                    [self._read(batch, block.states, "y_", x) for block, x in zip(batch.blocks, xs)],
                    self._read(batch, states, "linv_", like),
                    self._read(batch, states, "rinv_", like),
                    like.new_empty(0),
                    0,
                )
            prep = rite_prepare(xs, gs, prev, batch.partner_ranges, group["skip_threshold"])
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
            if batch.step == 0:
                frame = torch.eye(prep.gram.shape[-1], dtype=prep.gram.dtype, device=prep.gram.device)
                frame = frame.expand_as(prep.gram)
            else:
                frame = self._read(batch, states, "frame_", prep.gram)
            new_xs, v, new_ms, frame, escape = rite_apply(
                xs,
                prep,
                self._read(batch, states, "v_", prep.gram),
                [self._read(batch, block.states, "m_", x) for block, x in zip(batch.blocks, xs)],
                frame,
                lr=group["lr"],
                beta1_hat=bias_corrected_decay(beta1, t),
                beta2_hat=bias_corrected_decay(beta2, t),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_scale=grad_scale,
                update_capping=group["update_capping"],
                escape_prev=escape_prev,
            )
            for block, x_new, y, m in zip(batch.blocks, new_xs, prep.bases.y, new_ms):
                torch._foreach_copy_(block.factors(), block.rows(x_new).unbind(0))
                self._write(block.states, "y_", y, written)
                self._write(block.states, "m_", m, written)
            self._write(states, "linv_", prep.bases.linv, written)
            self._write(states, "rinv_", prep.bases.rinv, written)
            self._write(states, "v_", v, written)
            self._write(states, "frame_", frame, written)
            if escape is not None:
                self._write(states, "escape_", escape, written)
            pair_states = list({id(st): st for st, _ in states}.values())
            torch._foreach_add_(step_counters(pair_states), 1.0)
        self._written = written

    def _read(
        self, batch: _Batch, states: list[_RowState], prefix: str, like: torch.Tensor
    ) -> torch.Tensor:
        """The rows' stacked state (zeros at the first step); no copy when the previous step
        wrote exactly these tensors (checked by identity, so edits in place are seen)."""
        if batch.step == 0:  # contiguous zeros, also for a transposed ``like``
            return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        cached = self._cached(states, prefix)
        return cached[0] if cached is not None else stack([st[prefix + side] for st, side in states], like.dtype)

    def _cached(self, states: list[_RowState], prefix: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """(stacked tensor, its row views) the previous step wrote, if the rows hold exactly those views."""
        current = [st.get(prefix + side) for st, side in states]
        cached = self._written.get(id(current[0]))
        if cached is not None and len(cached[1]) == len(current) and all(map(operator.is_, current, cached[1])):
            return cached
        return None

    def _write(
        self,
        states: list[_RowState],
        prefix: str,
        stacked: torch.Tensor,
        written: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    ) -> None:
        """Store the rows of ``stacked`` as the rows' state and remember them for ``_read``.

        Where the rows still hold the views the previous step wrote, ``stacked`` is copied into
        their tensor: rebinding a few thousand new views per step would keep Python's cyclic
        garbage collector running full collections (3 ms a step at rank 16 on CPU).
        """
        cached = self._cached(states, prefix)
        if cached is not None and cached[0].shape == stacked.shape and cached[0].dtype == stacked.dtype:
            if stacked is not cached[0]:  # (the first moments are updated in place)
                cached[0].copy_(stacked)
            written[id(cached[1][0])] = cached
            return
        views = stacked.unbind(0)
        for (st, side), view in zip(states, views):
            st[prefix + side] = view
        written[id(views[0])] = (stacked, views)

    def _batches(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> list[tuple[dict, _Batch]]:
        """The driver's shape buckets, batched per group by (rank, compute dtype, device, step).

        Inside a batch, pairs of one shape form two blocks, their A factors and their B factors.
        """
        batches: dict[tuple, tuple[dict, _Batch]] = {}
        for group, pairs in buckets:
            by_step: dict[int, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
            for a, b in pairs:
                st = self.state[a]
                step = int(step_counters([st])[0])
                by_step.setdefault(step, []).append((a, b, st))
            a0 = pairs[0][0]
            cdt = compute_dtype(a0.dtype)
            for step, bucket in by_step.items():
                key = (id(group), a0.shape[0], cdt, a0.device, step)
                _, batch = batches.setdefault(key, (group, _Batch(cdt, step)))
                batch.add(bucket)
        return list(batches.values())


_RowState = tuple[dict, str]  # (the pair's state dict, "a" | "b")


@dataclass
class _Block:
    """Factors of equal shape and side: A (r x n, r-major) or B (m x r, k-major, handled as the
    rows B^T through transposed views), in their own layout (no transposing copies)."""

    kmajor: bool
    params: list[torch.Tensor] = field(default_factory=list)
    states: list[_RowState] = field(default_factory=list)

    def add(self, rows: list[tuple[torch.Tensor, dict]], side: str) -> None:
        self.params += [p for p, _ in rows]
        self.states += [(st, side) for _, st in rows]

    def factors(self) -> list[torch.Tensor]:
        return self.params

    def grads(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The factors' gradients (zeros for a factor without one while its partner has one)."""
        return [grad_or_zeros(p, dtype) for p in self.params]

    def rows(self, stacked: torch.Tensor) -> torch.Tensor:
        """The stacked factors (or gradients) as rows (N, r, k): B^T is a transposed view."""
        return stacked.mT if self.kmajor else stacked


@dataclass
class _Batch:
    """Blocks of one ``rite_prepare``/``rite_apply`` call (one rank, dtype, device and step)."""

    dtype: torch.dtype
    step: int
    blocks: list[_Block] = field(default_factory=list)
    partner_ranges: list[tuple[int, int]] = field(default_factory=list)
    n_rows: int = 0

    def add(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> None:
        a_block, b_block = _Block(kmajor=False), _Block(kmajor=True)
        a_block.add([(a, st) for a, _, st in pairs], "a")
        b_block.add([(b, st) for _, b, st in pairs], "b")
        self.blocks += [a_block, b_block]
        k, lo = len(pairs), self.n_rows
        self.partner_ranges += [(lo + k, lo + 2 * k), (lo, lo + k)]  # A rows <-> B rows
        self.n_rows += 2 * k


SPECS = [
    OptimizerSpec(
        name="lora_rite",
        cls=LoRARite,
        paper="Yen et al., ICLR 2025",
        memory="2(m+n)r + 8r^2 (first moments, bases; r x r second moments, basis and moment frames)",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    )
]
