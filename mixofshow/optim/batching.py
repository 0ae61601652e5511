"""Helpers shared by the batched LoRA optimizers: stacking pairs of equal shape, compute dtypes.

The r x r linear algebra of the matrix-preconditioned optimizers is batched over the pairs of one
shape bucket (``bucket_by_shape``). The math is written on *rows* in the r-major layout: ``A``
(r x n), ``B^T`` (r x m) and their gradients, so that every batched product is
``(r x r) @ (r x k)`` or ``(r x k) @ (k x r)``. Where a factor's own layout is k x r, the rows
can be a transposed view of it, which saves the transposing copies: LoRA-RITE's B always, StelLA's
U and V from rank 8 (:func:`rows_layout`, :func:`rows_matmul`; below rank 8 its (k x r) @ (r x r)
products are several times slower than r-major ones on CPU, torch 2.14).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "concat_call",
    "compute_dtype",
    "inverse_sqrt",
    "keep_saved_state_dtypes",
    "rows_layout",
    "rows_matmul",
    "stack",
    "sym",
    "tiny",
    "triangular_inverse",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the r x r algebra: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


SMALL_RANK = 8  # below it, (k x r) @ (r x r) products run several times slower than r-major ones


def rows_layout(x: torch.Tensor) -> torch.Tensor:
    """Stacked factors ``x`` (N, k, r) in the storage the batched products are fastest on (CPU,
    torch 2.14, ``python bench/optimizers.py``): their own, k-major, from r = 8 (no transposing
    copy; a (k x r) @ (r x r) product costs about the r-major one there), else r-major (a
    transposed view of a contiguous (N, r, k): at r = 4 the r-major product is 8x faster)."""
    return x if x.shape[-1] >= SMALL_RANK else x.mT.contiguous().mT


def rows_matmul(
    x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None, *, beta: float = 1.0, alpha: float = 1.0
) -> torch.Tensor:
    """``beta add + alpha x @ w`` for ``x`` (N, k, r), stored like ``x`` (see :func:`rows_layout`)."""
    if x.is_contiguous():
        return torch.bmm(x, w) if add is None else torch.baddbmm(add, x, w, beta=beta, alpha=alpha)
    xt, wt = x.mT, w.mT  # r-major storage: (w^T x^T)^T
    out = torch.bmm(wt, xt) if add is None else torch.baddbmm(add.mT, wt, xt, beta=beta, alpha=alpha)
    return out.mT


def tiny(dtype: torch.dtype) -> float:
    """A positive floor for damping terms: sqrt of the smallest normal number of ``dtype``.

    Its inverse (1e19 in float32) is still finite, so ``(0 + tiny)^-1 @ 0`` is exactly 0.
    """
    return torch.finfo(dtype).tiny ** 0.5


def sym(x: torch.Tensor) -> torch.Tensor:
    """Symmetric part of a batch of square matrices."""
    return 0.5 * (x + x.mT)


def triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of upper-triangular r x r matrices, negligible pivots floored.

    Pivots below ``r eps max|pivot| + tiny`` are replaced by that floor, so a zero (or rank
    deficient) factor gives a finite inverse; the gradients it multiplies vanish there.
    """
    d = r.diagonal(dim1=-2, dim2=-1)
    k = r.shape[-1]
    floor = d.abs().amax(-1, keepdim=True) * (k * torch.finfo(r.dtype).eps) + tiny(r.dtype)
    safe = r.triu(1) + torch.diag_embed(torch.where(d.abs() > floor, d, floor))
    eye = torch.eye(k, dtype=r.dtype, device=r.device).expand_as(r)
    return torch.linalg.solve_triangular(safe, eye, upper=True)


def inverse_sqrt(v: torch.Tensor, eps: float, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``U diag(1 / (sqrt(max(lambda, 0) + shift) + eps)) U^T`` for a batch of symmetric matrices.

    ``shift`` (one value per matrix, default 0) is LoRA-RITE's escape mass. ``tiny I`` is added
    first: cuSOLVER has failed on all-zero matrices (pytorch#94772), which a zero-initialised B
    produces at step 1. Note that on CUDA ``eigh`` synchronises with the host.
    """
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    lam, u = torch.linalg.eigh(v + tiny(v.dtype) * eye)
    lam = lam.clamp_min(0.0)
    if shift is not None:
        lam = lam + shift[..., None]
    return (u * (1.0 / (lam.sqrt() + eps)).unsqueeze(-2)) @ u.mT


def stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.stack(tensors)`` cast to ``dtype``, without a copy when possible.

    State written as ``stacked.unbind(0)`` at the previous step (consecutive contiguous slices of
    one tensor) is recognised and viewed as the stacked tensor again.
    """
    t0 = tensors[0]
    if t0._base is not None and _consecutive_slices(tensors):
        out = t0.as_strided((len(tensors), *t0.shape), (t0.numel(), *t0.stride()), t0.storage_offset())
    else:
        out = torch.stack(list(tensors))
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def _consecutive_slices(tensors: Sequence[torch.Tensor]) -> bool:
    t0 = tensors[0]
    if not t0.is_contiguous():
        return False
    root, shape, stride = t0._base, t0.shape, t0.stride()
    offset, numel = t0.storage_offset(), t0.numel()
    return all(
        t._base is root and t.shape == shape and t.stride() == stride
        and t.storage_offset() == offset + i * numel
        for i, t in enumerate(tensors)
    )  # fmt: skip


def keep_saved_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of floating state to the parameter's dtype.

    torch casts every floating state tensor to its parameter's dtype when loading, which would
    turn the float32 r x r statistics of bf16/fp16 factors into bf16. Call this right after
    ``super().load_state_dict(state_dict)``: it puts back the saved tensors (moved to the
    parameter's device, dtype unchanged).
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_state = state_dict["state"]
    for pid, p in zip(saved_ids, params):
        for key, value in saved_state.get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                optimizer.state[p][key] = value.to(device=p.device)


def concat_call(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    items: Sequence[tuple[torch.Tensor, ...]],
    scalars: Sequence[float] | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """``fn`` on several batches at once: per batch, ``fn(*tensors, scalar)`` split back.

    ``items[i]`` are batch i's tensors (leading dimension k_i); batches whose tensors agree in
    the other dimensions, dtype and device are concatenated and ``fn`` is called once on them,
    with the scalar (if ``scalars`` are given) as a float when all agree, else one value per row
    (a (sum k_i,) tensor).
    ``fn`` must treat rows independently and return tensors with the same leading dimension.
    Small per-pair algebra (r x r) costs a few dozen ops whatever the batch size, so one call
    for every shape bucket of every group saves most of their per-op cost.
    """
    keyed: dict[tuple, list[int]] = defaultdict(list)
    for i, tensors in enumerate(items):
        t0 = tensors[0]
        keyed[(tuple(t.shape[1:] for t in tensors), t0.dtype, t0.device)].append(i)
    out: list[tuple[torch.Tensor, ...]] = [()] * len(items)
    for idx in keyed.values():
        sizes = [items[i][0].shape[0] for i in idx]
        joined = [torch.cat([items[i][j] for i in idx]) for j in range(len(items[idx[0]]))]
        if scalars is not None:
            values = [float(scalars[i]) for i in idx]
            scalar: float | torch.Tensor = values[0]
            if any(v != values[0] for v in values):
                rows = [v for v, k in zip(values, sizes) for _ in range(k)]
                scalar = torch.tensor(rows, dtype=joined[0].dtype).to(joined[0].device)
            joined.append(scalar)
        results = fn(*joined)
        for i, parts in zip(idx, zip(*(t.split(sizes) for t in results))):
            out[i] = parts
    return out
