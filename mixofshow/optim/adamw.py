"""AdamW on every LoRA factor: the Mix-of-Show baseline.

Paper: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
https://arxiv.org/abs/1711.05101. Reference code: ``torch.optim.AdamW``; this optimizer calls the
same fused kernel (``torch._fused_adamw_``, 3-4x faster than the foreach path on CPU), so its
results are bit-identical to ``torch.optim.AdamW(fused=True)``.

Update of every tensor ``X`` (A and B alike) with gradient ``g`` at step ``t``::

    m <- b1 m + (1 - b1) g                v <- b2 v + (1 - b2) g^2
    X <- X (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Mix-of-Show defaults: betas (0.9, 0.999), weight decay 0.01; lr 1e-5 (text encoder LoRA),
1e-4 (UNet LoRA). ``loraplus`` and ``scaled_adamw`` reuse :func:`adamw_update`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.adamw import adamw as _torch_adamw

from mixofshow.optim.base import LoRAOptimizer, check_betas, check_lr, check_positive
from mixofshow.optim.registry import OptimizerSpec

__all__ = [
    "AdamW",
    "SPECS",
    "adam_lists",
    "adam_state",
    "adamw_reference",
    "adamw_update",
    "check_adamw_hparams",
    "fused_supported",
]

try:  # private helper; the list has been stable since torch 2.2
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover
    _FUSED_DEVICES = frozenset({"cpu", "cuda"})


def fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device``."""
    return device.type in _FUSED_DEVICES


def adam_state(state: dict[str, Any], p: torch.Tensor, fused: bool) -> dict[str, Any]:
    """Create (lazily) the AdamW state of ``p`` with torch's layout: step, exp_avg, exp_avg_sq.

    The step is a float32 scalar tensor, on the parameter's device for the fused kernel and on
    the CPU for the foreach path (as in ``torch.optim.AdamW``).
    """
    step_device = p.device if fused else torch.device("cpu")
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif state["step"].device != step_device:  # e.g. a CPU checkpoint loaded for GPU params
        state["step"] = state["step"].to(device=step_device, dtype=torch.float32)
    return state


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool,
) -> None:
    """One in-place AdamW step on lists of tensors (steps are incremented here).

    ``fused=True`` calls torch's fused kernel directly (all tensors on one device with one
    dtype, as :func:`adam_lists` groups them), skipping the functional wrapper's regrouping;
    otherwise torch's foreach implementation. Both are ``torch.optim.AdamW``'s own code paths.
    """
    if not params:
        return
    if fused:
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    _torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


def adamw_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain AdamW for one tensor at (1-based) ``step``: returns new (p, exp_avg, exp_avg_sq)."""
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    p = p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return p, exp_avg, exp_avg_sq


def check_adamw_hparams(lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """``ValueError`` for an invalid learning rate, beta, epsilon or weight decay."""
    check_lr(lr)
    check_betas(betas)
    check_positive("eps", eps)
    check_positive("weight_decay", weight_decay)


class AdamW(LoRAOptimizer):
    """AdamW on all LoRA factors (``torch.optim.AdamW`` semantics, fused kernel by default).

    Args:
        params: groups ``{"pairs": [(A, B), ...], "lr": ..., ...}``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay default 0.01).
        fused: ``None`` picks the fused kernel when the device has one, ``False`` forces foreach.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fused: bool | None = None,
        **extra: Any,
    ) -> None:
        check_adamw_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        super().__init__(params, {**defaults, **self._extra_defaults(**extra)})

    def _extra_defaults(self, **extra: Any) -> dict[str, Any]:
        """Hyper-parameters of subclasses (LoRA+ adds ``ratio``); none for plain AdamW."""
        if extra:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(extra)}")
        return {}

    def _lr_split(self, group: dict[str, Any], pairs: list[tuple[torch.Tensor, ...]]) -> list[tuple[float, list[torch.Tensor]]]:
        """(lr multiplier, tensors) of a group's pairs; AdamW treats every factor alike."""
        return [(1.0, [t for f in pairs for t in f])]

    def _step_buckets(self, buckets: list[tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]]) -> None:
        # element-wise: the shape buckets do not matter, one fused call per group and lr
        by_group: dict[int, tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]] = {}
        for group, pairs in buckets:
            by_group.setdefault(id(group), (group, []))[1].extend(pairs)
        for group, pairs in by_group.values():
            beta1, beta2 = group["betas"]
            for multiplier, tensors in self._lr_split(group, pairs):
                for (fused, *_), lists in self._gather(group, tensors).items():
                    adamw_update(
                        *lists,
                        lr=group["lr"] * multiplier,
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        fused=fused,
                    )

    def _gather(
        self, group: dict[str, Any], tensors: Sequence[torch.Tensor]
    ) -> dict[tuple, tuple[list[torch.Tensor], ...]]:
        # per tensor, as torch.optim.AdamW: a factor without a gradient is left alone
        with_grad = [p for p in tensors if p.grad is not None]
        return adam_lists(self.state, with_grad, [p.grad for p in with_grad], group["fused"])


def adam_lists(
    state: dict[torch.Tensor, dict[str, Any]],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fused: bool | None,
) -> dict[tuple, tuple[list[torch.Tensor], ...]]:
    """(params, grads, exp_avgs, exp_avg_sqs, steps) lists for :func:`adamw_update`, keyed by
    (fused, device, dtype); ``fused=None`` takes the fused kernel when the device has one."""
    out: dict[tuple, tuple[list[torch.Tensor], ...]] = {}
    for p, g in zip(params, grads):
        if g.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        use_fused = fused if fused is not None else p.device.type in _FUSED_DEVICES
        st = adam_state(state[p], p, use_fused)
        key = (use_fused, p.device, p.dtype)
        lists = out.get(key)
        if lists is None:
            lists = out[key] = ([], [], [], [], [])
        lists[0].append(p)
        lists[1].append(g)
        lists[2].append(st["exp_avg"])
        lists[3].append(st["exp_avg_sq"])
        lists[4].append(st["step"])
    return out


SPECS = [
    OptimizerSpec(
        name="adamw",
        cls=AdamW,
        paper="Loshchilov & Hutter, ICLR 2019 (Mix-of-Show baseline)",
        memory="2(m+n)r (Adam moments on A and B)",
        reconstructed=False,
        recommended_lr={"unet": 1e-4, "text_encoder": 1e-5},
    )
]
