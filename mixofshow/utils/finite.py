"""Finding non-finite values (NaN, +-inf) in a set of tensors with one host synchronisation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["first_non_finite", "check_finite"]


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, None when all are finite.

    One reduction per tensor on its own device, then a single transfer of all the flags.
    """
    if not tensors:
        return None
    names = list(tensors)
    first = next(iter(tensors.values())).device
    flags = torch.stack([torch.isfinite(t.detach()).all().to(first) for t in tensors.values()]).tolist()
    for name, finite in zip(names, flags):
        if not finite:
            return name
    return None


def check_finite(
    tensors: Mapping[str, torch.Tensor], where: str, advice: str = "", error: type[ValueError] = ValueError
) -> None:
    """Raise ``error`` naming ``where`` and the first tensor with a NaN or an infinity."""
    bad = first_non_finite(tensors)
    if bad is not None:
        values = tensors[bad].detach()
        nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        raise error(
            f"{where}: tensor {bad!r} holds non-finite values ({nan} NaN, {inf} inf of "
            f"{values.numel()}){'; ' + advice if advice else ''}"
        )
